//! `lighter retention [--dry-run]`: applies the retention rules in a running registry
//! (`POST /v2/_lighter/retention`) and prints its JSON report: the tags removed (or, dry, that
//! would be), each with its repository, digest, rule and times.

use clap::Args;

use crate::RegistryArgs;

#[derive(Args)]
pub struct RetentionArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Only report what would be removed.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: RetentionArgs) -> Result<(), String> {
    let dry_run = if args.dry_run { "true" } else { "false" };
    let report = super::run(async {
        let url = super::api_url(&args.registry, "retention");
        let client = super::client(&args.registry)?;
        let req = client.post(&url).query(&[("dry_run", dry_run)]);
        super::answer(&url, super::with_credentials(req, &args.registry)?).await
    })?;
    println!("{}", report.trim_end());
    Ok(())
}
