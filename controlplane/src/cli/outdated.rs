//! `lighter outdated`: the workloads of a running registry's inventory whose image tag has moved
//! since they were admitted (`GET /v2/_lighter/inventory?outdated=true`), as a table, or as the
//! API's JSON with `--json`.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::RegistryArgs;

/// `lighter outdated`'s flags.
#[derive(Args)]
pub struct OutdatedArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Only this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only this repository (Lighter's name, e.g. `team/app` or `docker.io/library/nginx`).
    #[arg(long)]
    repository: Option<String>,
    /// Print the API's answer (`{"entries": [...]}`, every page's) instead of a table.
    #[arg(long)]
    json: bool,
    /// Rows asked for per request (the answer comes in pages, followed to the end).
    #[arg(long, default_value_t = 1000)]
    page_size: usize,
}

pub fn run(args: OutdatedArgs) -> ExitCode {
    match fetch(&args) {
        Ok(body) if args.json => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok(body) => match serde_json::from_str::<Value>(&body) {
            Ok(v) => {
                print!("{}", table(v["entries"].as_array().map_or(&[][..], |e| e)));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lighter outdated: the registry's answer is not JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("lighter outdated: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `GET <registry>/v2/_lighter/inventory?outdated=true[&namespace=][&repository=]`, page
/// after page: `{"entries": [...]}` with every page's entries.
fn fetch(args: &OutdatedArgs) -> Result<String, String> {
    let r = &args.registry;
    let mut query = vec![("outdated", "true".to_owned())];
    if let Some(ns) = &args.namespace {
        query.push(("namespace", ns.clone()));
    }
    if let Some(repo) = &args.repository {
        query.push(("repository", repo.clone()));
    }
    super::run(async {
        let client = super::client(r)?;
        let (_, entries) = super::get_pages(
            &client,
            r,
            "inventory",
            &query,
            "entries",
            args.page_size,
            usize::MAX,
        )
        .await?;
        Ok(serde_json::json!({ "entries": entries }).to_string())
    })
}

/// The rows as aligned columns under a header; a sentence when there are none.
fn table(entries: &[Value]) -> String {
    if entries.is_empty() {
        return "no workload runs an image whose tag has moved\n".to_owned();
    }
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_owned();
    let mut rows = vec![[
        "NAMESPACE".to_owned(),
        "WORKLOAD".to_owned(),
        "OBJECT".to_owned(),
        "CONTAINER".to_owned(),
        "IMAGE".to_owned(),
        "RUNS".to_owned(),
        "TAG NOW".to_owned(),
        "TAG MOVED".to_owned(),
    ]];
    for e in entries {
        let o = &e["outdated"];
        rows.push([
            s(e, "namespace"),
            format!("{}/{}", s(e, "owner_kind"), s(e, "owner_name")),
            format!("{}/{}", s(e, "kind"), s(e, "name")),
            s(e, "container"),
            s(e, "image"),
            short(&s(e, "digest")),
            short(&s(o, "current_digest")),
            o["moved_ago_ms"]
                .as_u64()
                .map_or_else(String::new, |ms| format!("{} ago", ago(ms))),
        ]);
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in r.iter().zip(widths).enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{cell:<w$}   "));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `sha256:` and the first 12 hex digits: enough to tell digests apart by eye.
fn short(digest: &str) -> String {
    match digest.split_once(':') {
        Some((alg, hex)) => format!("{alg}:{}", &hex[..hex.len().min(12)]),
        None => digest.to_owned(),
    }
}

/// A duration in its largest whole unit: `42s`, `5m`, `3h`, `12d`.
fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_in_their_largest_whole_unit() {
        assert_eq!(ago(0), "0s");
        assert_eq!(ago(59_999), "59s");
        assert_eq!(ago(60_000), "1m");
        assert_eq!(ago(3_599_000), "59m");
        assert_eq!(ago(7_200_000), "2h");
        assert_eq!(ago(86_400_000 * 12 + 5), "12d");
    }

    #[test]
    fn digests_are_shortened_to_twelve_hex_digits() {
        assert_eq!(
            short("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            "sha256:e3b0c44298fc"
        );
        assert_eq!(short(""), "");
    }
}
