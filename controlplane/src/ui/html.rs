//! HTML pieces of the web page (pure): escaping, the page shell with its stylesheet, numbers
//! and times for people, and the bar chart (inline SVG). Everything that came from a client or
//! a pusher (names, tags, user agents, addresses) goes through [`esc`] or [`Url`] on its way
//! into a page.

use std::fmt::Write as _;

/// `s` safe in HTML text and in a double- or single-quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Controls (a user agent may hold anything) would not render anyway.
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A query value percent-encoded: safe in a URL and (no `&`, `<`, quotes) in an attribute.
pub fn url(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The path of a page (the web page lives under this prefix).
pub const BASE: &str = "/v2/_lighter/ui";

const STYLE: &str = "
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline}
header b{font-size:17px}
header a{color:#cfd6e4;text-decoration:none}
header a:hover{color:#fff}
main{max-width:1180px;margin:0 auto;padding:16px 24px 40px}
h1{font-size:20px;margin:8px 0 12px;word-break:break-all}
h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e8}
th,td{padding:6px 10px;text-align:left;border-bottom:1px solid #eceef2;vertical-align:top}
th{background:#eef0f4;font-weight:600;font-size:13px;white-space:nowrap}
td.n,th.n{text-align:right;white-space:nowrap}
tr:hover td{background:#fafbfc}
code,.mono{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.wrap{overflow-wrap:anywhere}
.muted{color:#6b7385}
.card{background:#fff;border:1px solid #dde1e8;padding:12px 16px;margin:0 0 12px}
.stats{display:flex;gap:32px;flex-wrap:wrap}
.stats div b{display:block;font-size:20px}
.pager{margin:10px 0;display:flex;gap:16px}
.bad{color:#b42318}
.ok{color:#067647}
a{color:#1f5fbf}
svg text{font:11px system-ui,sans-serif;fill:#6b7385}
form.filter{margin:0 0 10px;display:flex;gap:8px;align-items:center;flex-wrap:wrap}
form.filter input{padding:4px 6px;border:1px solid #c5cad3}
";

/// A whole page: `title` (plain text) and `body` (HTML). With `refresh_s`, the page reloads
/// itself that often (a meta refresh, no script).
pub fn page(title: &str, body: &str, refresh_s: Option<u32>) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    if let Some(s) = refresh_s {
        let _ = write!(out, "<meta http-equiv=\"refresh\" content=\"{s}\">");
    }
    let _ = write!(
        out,
        "<title>{} · Lighter</title><style>{STYLE}</style></head><body>",
        esc(title)
    );
    let _ = write!(
        out,
        "<header><b>Lighter</b><a href=\"{BASE}/\">Repositories</a><a href=\"{BASE}/events\">Events</a><a href=\"{BASE}/outdated\">Out of date</a></header><main>"
    );
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    out
}

/// `1.5 MiB`, `512 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// A size for a table: [`bytes`], exact in its title (`<span title="1536 bytes">1.5 KiB</span>`).
pub fn size(n: u64) -> String {
    format!("<span title=\"{n} bytes\">{}</span>", bytes(n))
}

/// A time as `<span title="2026-11-30T23:30:00Z">5 min ago</span>`; `—` when unknown.
pub fn when(unix_us: Option<u64>, now_us: u64) -> String {
    let Some(t) = unix_us else {
        return "<span class=\"muted\">—</span>".into();
    };
    let full = crate::events::rfc3339(t);
    let full = format!("{}Z", &full[..19]);
    format!(
        "<span title=\"{full}\">{}</span>",
        ago(now_us.saturating_sub(t))
    )
}

/// `just now`, `42 s ago`, `5 min ago`, `3 h ago`, `12 days ago`.
pub fn ago(us: u64) -> String {
    let s = us / 1_000_000;
    match s {
        0..=4 => "just now".into(),
        5..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

/// The start of a digest for a table (`sha256:0123456789ab`), the whole in its title.
pub fn short_digest(d: &str) -> String {
    let (alg, hex) = d.split_once(':').unwrap_or(("", d));
    let cut: String = hex.chars().take(12).collect();
    format!(
        "<code title=\"{}\">{}:{}</code>",
        esc(d),
        esc(alg),
        esc(&cut)
    )
}

/// A bar chart of `values` (oldest first) as inline SVG: one bar per value, its count in the
/// bar's tooltip, `labels` (index, text) under chosen bars.
pub fn bar_chart(values: &[u64], labels: &[(usize, String)], caption: &str) -> String {
    const W: usize = 1100;
    const H: usize = 150;
    const TOP: usize = 16;
    const AXIS: usize = 20;
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let n = values.len().max(1);
    let slot = W as f64 / n as f64;
    let bar = (slot * 0.8).max(1.0);
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg viewBox=\"0 0 {W} {}\" width=\"100%\" role=\"img\" aria-label=\"{}\">",
        H + AXIS,
        esc(caption)
    );
    let _ = write!(
        out,
        "<line x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\" stroke=\"#c5cad3\"/><text x=\"2\" y=\"11\">max {max}</text>"
    );
    for (i, &v) in values.iter().enumerate() {
        let h = (v as f64 / max as f64 * (H - TOP) as f64).round();
        let x = i as f64 * slot + (slot - bar) / 2.0;
        let _ = write!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" fill=\"#3b7dd8\"><title>{v}</title></rect>",
            H as f64 - h
        );
        if v > 0 && h < 12.0 {
            // Small counts stay visible.
            let _ = write!(
                out,
                "<rect x=\"{x:.1}\" y=\"{}\" width=\"{bar:.1}\" height=\"2\" fill=\"#3b7dd8\"/>",
                H - 2
            );
        }
    }
    for (i, text) in labels {
        // The first and last labels stay inside the chart.
        let (x, anchor) = match *i {
            0 => (0.0, "start"),
            i if i + 1 == n => (W as f64, "end"),
            i => (i as f64 * slot + slot / 2.0, "middle"),
        };
        let _ = write!(
            out,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"{anchor}\">{}</text>",
            H + 15,
            esc(text)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_and_urls_no_separators() {
        let hostile = "<script>alert('x')</script>\"&\u{1}";
        let e = esc(hostile);
        assert_eq!(
            e,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;\u{fffd}"
        );
        assert_eq!(url("a/b c&d=\"<"), "a/b%20c%26d%3D%22%3C");
    }

    #[test]
    fn sizes_and_ages_read_like_a_person_writes_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(50 << 20), "50 MiB");
        assert_eq!(ago(0), "just now");
        assert_eq!(ago(42_000_000), "42 s ago");
        assert_eq!(ago(300_000_000), "5 min ago");
        assert_eq!(ago(3 * 3_600_000_000), "3 h ago");
        assert_eq!(ago(12 * 86_400_000_000), "12 days ago");
    }

    #[test]
    fn the_chart_has_one_bar_per_value_and_escaped_labels() {
        // The 1 is too small to see beside 100: it gets a visible stub too.
        let svg = bar_chart(&[0, 100, 1], &[(0, "<b>".into())], "pulls");
        assert_eq!(svg.matches("<rect").count(), 3 + 1, "{svg}");
        assert!(svg.contains("<title>100</title>"));
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"));
    }
}
