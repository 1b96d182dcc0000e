//! `lighter usage`: pulls per repository, tag or digest (`GET /v2/_lighter/usage`), every page,
//! as a table or as one JSON object.

use clap::Args;
use serde_json::Value;

use crate::RegistryArgs;

/// Rows asked per request.
const PAGE_ROWS: usize = 1000;

#[derive(Args)]
pub struct UsageArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// One row per repository, tag or digest.
    #[arg(long, default_value = "repository", value_parser = ["repository", "tag", "digest"])]
    by: String,
    /// Only this repository's rows.
    #[arg(long)]
    repository: Option<String>,
    /// Only pulls from this time on (read from the log's files): unix milliseconds or RFC 3339.
    #[arg(long)]
    since: Option<String>,
    /// Only pulls before this time.
    #[arg(long)]
    until: Option<String>,
    /// Most rows printed.
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
    /// One JSON object (the registry's answer, every page's rows together) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: UsageArgs) -> Result<(), String> {
    if args.limit == 0 {
        return Err("--limit must be at least 1".into());
    }
    let mut query: Vec<(&str, String)> = vec![("by", args.by.clone())];
    for (key, v) in [
        ("repository", &args.repository),
        ("since", &args.since),
        ("until", &args.until),
    ] {
        if let Some(v) = v {
            query.push((key, v.clone()));
        }
    }
    let (mut answer, rows) = super::run(async {
        let client = super::client(&args.registry)?;
        super::get_pages(
            &client,
            &args.registry,
            "usage",
            &query,
            "rows",
            PAGE_ROWS,
            args.limit,
        )
        .await
    })?;
    if args.json {
        answer["rows"] = Value::Array(rows);
        if let Some(o) = answer.as_object_mut() {
            o.remove("next");
        }
        println!("{answer}");
        return Ok(());
    }
    let key = match args.by.as_str() {
        "tag" => Some(("TAG", "tag")),
        "digest" => Some(("DIGEST", "digest")),
        _ => None,
    };
    let mut header = vec!["REPOSITORY"];
    header.extend(key.map(|k| k.0));
    header.extend([
        "PULLS",
        "BLOB PULLS",
        "HEADS",
        "BYTES",
        "CLIENTS",
        "IDENTITIES",
        "FIRST PULL",
        "LAST PULL",
    ]);
    let mut numeric = vec![false];
    numeric.extend(key.map(|_| false));
    numeric.extend([true, true, true, true, true, true, false, false]);
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or(0).to_string();
            let estimated = if r["estimated"] == true { "~" } else { "" };
            let mut row = vec![r["repository"].as_str().unwrap_or("").to_owned()];
            row.extend(key.map(|(_, k)| {
                let v = r[k].as_str().unwrap_or("");
                if k == "digest" {
                    super::short_digest(v)
                } else {
                    v.to_owned()
                }
            }));
            row.extend([
                n("pulls"),
                n("blob_pulls"),
                n("heads"),
                super::bytes(r["bytes"].as_u64().unwrap_or(0)),
                format!("{estimated}{}", n("clients")),
                format!("{estimated}{}", n("identities")),
                super::time(r["first_pull"].as_str().unwrap_or("-")),
                super::time(r["last_pull"].as_str().unwrap_or("-")),
            ]);
            row
        })
        .collect();
    print!("{}", super::table(&header, &numeric, &table));
    if answer["complete"] == false {
        eprintln!("lighter usage: the registry is still reading its event log; counts are partial");
    }
    Ok(())
}
