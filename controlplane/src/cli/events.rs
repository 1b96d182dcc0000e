//! `lighter events`: the event log (`GET /v2/_lighter/events`), oldest first, as a table or as
//! JSON lines; `--follow` keeps asking for what comes next.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::RegistryArgs;

/// How often `--follow` asks for new lines.
const FOLLOW_EVERY_MS: u64 = 1000;
/// Lines asked per request.
const PAGE_LINES: usize = 1000;

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Only this repository.
    #[arg(long)]
    repository: Option<String>,
    /// Only this digest.
    #[arg(long)]
    digest: Option<String>,
    /// Only this action (pull_manifest, head_manifest, pull_blob, head_blob, …).
    #[arg(long)]
    action: Option<String>,
    /// Only this client address.
    #[arg(long)]
    client: Option<String>,
    /// From this time on: unix milliseconds or RFC 3339 (2026-11-29T23:30:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Before this time.
    #[arg(long)]
    until: Option<String>,
    /// Most lines printed (without --follow).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// JSON lines, as the registry gives them, instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep printing new lines as they are logged (until interrupted).
    #[arg(long)]
    follow: bool,
}

pub fn run(args: EventsArgs) -> Result<(), String> {
    if args.limit == 0 {
        return Err("--limit must be at least 1".into());
    }
    super::run(async {
        let client = super::client(&args.registry)?;
        let mut filters: Vec<(&str, String)> = Vec::new();
        for (key, v) in [
            ("repository", &args.repository),
            ("digest", &args.digest),
            ("action", &args.action),
            ("client", &args.client),
            ("until", &args.until),
        ] {
            if let Some(v) = v {
                filters.push((key, v.clone()));
            }
        }
        let mut since = args.since.clone();
        let mut cursor: Option<String> = None;
        let mut printed = 0usize;
        let mut header = !args.json;
        // Lines printed at the latest time seen: a poll from that time gives them again.
        let mut last_time: Option<u64> = None;
        let mut at_last_time: Vec<String> = Vec::new();
        loop {
            let mut query = filters.clone();
            if let Some(s) = &since {
                query.push(("since", s.clone()));
            }
            let page = if args.follow {
                PAGE_LINES
            } else {
                PAGE_LINES.min(args.limit - printed)
            };
            query.push(("limit", page.to_string()));
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let (body, next) = get_page(&client, &args.registry, &query).await?;
            let mut rows = Vec::new();
            for text in body.lines() {
                let v: Value = serde_json::from_str(text)
                    .map_err(|e| format!("the registry sent a line that is not JSON: {e}"))?;
                let t = v["time_unix_us"].as_u64().unwrap_or(0);
                if args.follow && last_time == Some(t) && at_last_time.iter().any(|l| l == text) {
                    continue;
                }
                if last_time != Some(t) {
                    last_time = Some(t);
                    at_last_time.clear();
                }
                at_last_time.push(text.to_owned());
                if args.json {
                    println!("{text}");
                } else {
                    rows.push(row(&v));
                }
                printed += 1;
            }
            if !rows.is_empty() || header {
                let t = super::table(HEADER, NUMERIC, &rows);
                // The header once, at the top.
                let skip = if header {
                    0
                } else {
                    t.find('\n').map_or(0, |i| i + 1)
                };
                print!("{}", &t[skip..]);
                header = false;
            }
            match next {
                Some(c) if args.follow || printed < args.limit => cursor = Some(c),
                _ if !args.follow => return Ok(()),
                _ => {
                    // At the end: ask again from the latest time seen.
                    cursor = None;
                    if let Some(t) = last_time {
                        since = Some(crate::events::rfc3339(t));
                    }
                    tokio::time::sleep(Duration::from_millis(FOLLOW_EVERY_MS)).await;
                }
            }
        }
    })
}

const HEADER: &[&str] = &[
    "TIME",
    "ACTION",
    "REPOSITORY",
    "REFERENCE",
    "STATUS",
    "BYTES",
    "CLIENT",
    "IDENTITY",
];
const NUMERIC: &[bool] = &[false, false, false, false, true, true, false, false];

/// A line of the log as a row of the table.
fn row(v: &Value) -> Vec<String> {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    let reference = match v["reference"].as_str() {
        Some(r) if !r.is_empty() => super::short_digest(r),
        _ => super::short_digest(&s("digest")),
    };
    vec![
        super::time(&s("time")),
        s("action"),
        s("repository"),
        reference,
        v["status"]
            .as_u64()
            .map_or(String::new(), |n| n.to_string()),
        v["bytes"].as_u64().map_or(String::new(), super::bytes),
        s("client"),
        s("identity"),
    ]
}

/// One page: its lines, and the cursor of the next page (from its `Link` header).
async fn get_page(
    client: &reqwest::Client,
    r: &RegistryArgs,
    query: &[(&str, String)],
) -> Result<(String, Option<String>), String> {
    let url = format!("{}/v2/_lighter/events", r.registry.trim_end_matches('/'));
    let req = super::with_credentials(client.get(&url).query(query), r)?;
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let next = resp
        .headers()
        .get("link")
        .and_then(|l| l.to_str().ok())
        .and_then(cursor_of_link);
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", body.trim_end()));
    }
    Ok((body, next))
}

/// The `cursor=` of a `Link: </v2/_lighter/events?…&cursor=X>; rel="next"`.
fn cursor_of_link(link: &str) -> Option<String> {
    let target = link.split_once('<')?.1.split_once('>')?.0;
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("cursor="))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_comes_from_the_link() {
        let l = "</v2/_lighter/events?repository=a&limit=2&cursor=17-4096>; rel=\"next\"";
        assert_eq!(cursor_of_link(l).as_deref(), Some("17-4096"));
        assert_eq!(cursor_of_link("nonsense"), None);
    }
}
