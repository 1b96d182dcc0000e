//! Subcommands that ask a running registry and print its answer: `lighter events`,
//! `lighter usage`, `lighter outdated` and `lighter retention` (a table for people, `--json` for programs). They reach
//! the registry as `lighter prefetch` and `lighter gc` do ([`crate::RegistryArgs`]); and
//! `lighter bucket-import`, which works offline on a data directory and a bucket.

pub mod bucket_import;
pub mod events;
pub mod outdated;
pub mod retention;
pub mod usage;

use crate::RegistryArgs;

/// An HTTP client for the registry: its CA certificates trusted (`--ca-file`), saying it is
/// `lighter/<version>` (the event log's `user_agent` tells the commands apart from clients).
pub fn client(r: &RegistryArgs) -> Result<reqwest::Client, String> {
    let mut client =
        reqwest::Client::builder().user_agent(concat!("lighter/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &r.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("--ca-file {}: {e}", ca.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("--ca-file {}: {e}", ca.display()))?
        {
            client = client.add_root_certificate(cert);
        }
    }
    client.build().map_err(|e| e.to_string())
}

/// `req` with the registry's credentials (`--credentials USER:PASSWORD`), if any.
pub fn with_credentials(
    req: reqwest::RequestBuilder,
    r: &RegistryArgs,
) -> Result<reqwest::RequestBuilder, String> {
    Ok(match &r.credentials {
        None => req,
        Some(c) => {
            let (user, password) = c
                .split_once(':')
                .ok_or("--credentials: expected USER:PASSWORD")?;
            req.basic_auth(user, Some(password))
        }
    })
}

/// Runs `f` on a runtime of one thread (the subcommands make a few requests, one at a time).
pub fn run<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f)
}

/// `GET <registry>/v2/_lighter/<api>?<query>`: the body on success, else the error with the
/// registry's message.
pub async fn get(
    client: &reqwest::Client,
    r: &RegistryArgs,
    api: &str,
    query: &[(&str, String)],
) -> Result<String, String> {
    let url = api_url(r, api);
    answer(&url, with_credentials(client.get(&url).query(query), r)?).await
}

/// `GET <registry>/v2/_lighter/<api>?<query>` page after page (`limit`, then `after=<next>`),
/// collecting each page's `key` rows until the last page or `max_rows`: the first page's answer
/// and the rows. Bounded: each page moves the cursor forward.
pub async fn get_pages(
    client: &reqwest::Client,
    r: &RegistryArgs,
    api: &str,
    query: &[(&str, String)],
    key: &str,
    page_rows: usize,
    max_rows: usize,
) -> Result<(serde_json::Value, Vec<serde_json::Value>), String> {
    let mut first = None;
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = query.to_vec();
        q.push(("limit", page_rows.min(max_rows - rows.len()).to_string()));
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let body = get(client, r, api, &q).await?;
        let mut page: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("the registry's answer is not JSON: {e}"))?;
        if let Some(more) = page[key].as_array_mut() {
            rows.append(more);
        }
        after = page["next"].as_str().map(str::to_owned);
        let first = first.get_or_insert(page);
        if after.is_none() || rows.len() >= max_rows {
            return Ok((std::mem::take(first), rows));
        }
    }
}

/// `<registry>/v2/_lighter/<api>`
pub fn api_url(r: &RegistryArgs, api: &str) -> String {
    format!("{}/v2/_lighter/{api}", r.registry.trim_end_matches('/'))
}

/// Sends `req` (to `url`): the body on success, else the error with the registry's message.
pub async fn answer(url: &str, req: reqwest::RequestBuilder) -> Result<String, String> {
    let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {}", body.trim_end()))
    }
}

/// Rows as a table: a header, columns padded to their widest cell, numbers (the columns
/// `numeric` says) aligned right.
pub fn table(header: &[&str], numeric: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if numeric.get(i).copied().unwrap_or(false) {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes for people: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// An RFC 3339 time as a table shows it: to the second, without the `T` and `Z` (UTC).
pub fn time(rfc3339: &str) -> String {
    let s = rfc3339.get(..19).unwrap_or(rfc3339);
    s.replacen('T', " ", 1)
}

/// A digest shortened for a table: the algorithm and 12 hex digits.
pub fn short_digest(d: &str) -> String {
    match d.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}", &hex[..12]),
        _ => d.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_text_left_and_numbers_right() {
        let t = table(
            &["NAME", "N"],
            &[false, true],
            &[
                vec!["a".into(), "1".into()],
                vec!["long".into(), "100".into()],
            ],
        );
        assert_eq!(t, "NAME    N\na       1\nlong  100\n");
    }

    #[test]
    fn bytes_times_and_digests_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(12 << 20), "12.0 MiB");
        assert_eq!(time("2026-11-30T23:30:00.123456Z"), "2026-11-30 23:30:00");
        assert_eq!(
            short_digest(&format!("sha256:{}", "ab".repeat(32))),
            "sha256:abababababab"
        );
        assert_eq!(short_digest("v1"), "v1");
    }
}
