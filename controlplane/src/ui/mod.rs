//! The registry's web page, `GET /v2/_lighter/ui/`: server-rendered HTML, no script, one
//! inline stylesheet. Pages: the repositories (tags, stored size, pulls, last pull), one
//! repository (its tags with digests, sizes, when pushed, pulls; pulls per hour and per day as
//! an SVG bar chart), the event stream (newest first, filtered, paged) and the out-of-date
//! workloads. Needs `admin` of `_lighter/ui` when access control is on; a browser is asked for
//! Basic credentials.
//!
//! Every page reads the store and at most `ui_events_scan_max` lines of the event log (newest
//! first, `EventLog::scan_newest`), so its cost is bounded whatever the log holds.

mod data;
pub mod html;

use std::fmt::Write as _;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use lighter_layout::RepoName;

use crate::api::{full, param, query, set, Response, Result};
use crate::app::{block, App};
use crate::clock::now_us;
use crate::error::{ApiError, Code};
use crate::events::{Cursor, Query};
use data::{Pulls, DAY_US};
use html::{esc, url, when, BASE};

/// Rows of a page unless `n=` says otherwise (at most `list_page_size_max`).
const ROWS_DEFAULT: usize = 100;
/// Seconds between reloads of the event stream's first page with `refresh=1`.
const REFRESH_S: u32 = 10;

/// Answers a request for a page.
pub async fn handle(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response> {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "the web page answers GET only",
        ));
    }
    let q = query(req);
    let n = rows(app, &q)?;
    let now_us = now_us();
    let page = match req.uri().path().strip_prefix(BASE).unwrap_or("") {
        "" | "/" => block(|| overview(app, &q, n, now_us))?,
        "/repository" => block(|| repository(app, &q, n, now_us))?,
        "/events" => block(|| events(app, &q, n, now_us))?,
        "/outdated" => block(|| outdated(app, &q, n, now_us))?,
        other => {
            return Err(ApiError::not_found(
                Code::Unsupported,
                format!(
                    "no page {}: the web page is {BASE}/",
                    other.trim_start_matches('/')
                ),
            ))
        }
    };
    let mut r = full(page.into_bytes());
    set(&mut r, "content-type", "text/html; charset=utf-8");
    set(&mut r, "cache-control", "no-store");
    // Nothing runs on these pages, nothing is loaded from elsewhere, and no other site frames
    // them: should an escape ever be missed, the browser still runs no injected script.
    set(
        &mut r,
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'; form-action 'self'",
    );
    set(&mut r, "x-content-type-options", "nosniff");
    Ok(r)
}

fn rows(app: &App, q: &[(String, String)]) -> Result<usize> {
    let max = app.config.list_page_size_max;
    match param(q, "n") {
        None => Ok(ROWS_DEFAULT.min(max)),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                Code::Unsupported,
                format!("n={v:?}: expected 1 to {max} (list_page_size_max)"),
            )),
        },
    }
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::internal(what, e)
}

/// A note under a table saying how much of the log the counts cover.
fn scan_note(app: &App, scan: &crate::events::Scanned) -> String {
    if app.events.is_none() {
        return "<p class=\"muted\">The event log is off (<code>events_ring_records = 0</code>): no pulls are counted.</p>".into();
    }
    if scan.capped {
        return format!(
            "<p class=\"muted\">Pulls are counted over the newest {} lines of the event log (<code>ui_events_scan_max</code>); older pulls are not shown.</p>",
            scan.lines
        );
    }
    String::new()
}

/// Pulls in 24 h and 30 days (from the scan), all-time pulls and clients (from the usage
/// summary, when there is one), and the last pull (the later of both).
fn pull_cells(p: &Pulls, t: Option<&data::Totals>, clients: bool, now_us: u64) -> String {
    let mut out = format!(
        "<td class=\"n\">{}</td><td class=\"n\">{}</td>",
        p.day, p.month
    );
    let t = t.copied().unwrap_or_default();
    let _ = write!(out, "<td class=\"n\">{}</td>", t.pulls.max(p.month));
    if clients {
        let approx = if t.estimated { "≈" } else { "" };
        let _ = write!(out, "<td class=\"n\">{approx}{}</td>", t.clients);
    }
    let _ = write!(
        out,
        "<td>{}</td>",
        when(p.last_unix_us.max(t.last_unix_us), now_us)
    );
    out
}

/// The usage summary's rows, or none (the event log is off).
fn totals(
    app: &App,
    by: crate::usage::By,
    repository: Option<&str>,
) -> Result<std::collections::HashMap<String, data::Totals>> {
    match &app.usage {
        Some(u) => Ok(data::usage_totals(u, by, repository)
            .map_err(io_error("reading the usage summary"))?
            .0),
        None => Ok(Default::default()),
    }
}

/// `/v2/_lighter/ui/`: the repositories.
fn overview(app: &App, q: &[(String, String)], n: usize, now_us: u64) -> Result<String> {
    let last = param(q, "last");
    let (names, more) =
        data::repositories(&app.layout, last, n).map_err(io_error("listing the repositories"))?;
    let (pulls, scan) = match &app.events {
        Some(log) => data::repo_pulls(log, &names, now_us, app.config.ui_events_scan_max)
            .map_err(io_error("reading the event log"))?,
        None => Default::default(),
    };
    let stale = app.inventory.rows(&crate::inventory::Filter {
        outdated_only: true,
        ..Default::default()
    });
    let mut body = String::new();
    body.push_str("<h1>Repositories</h1>");
    if !stale.is_empty() {
        let _ = write!(
            body,
            "<p class=\"card\"><span class=\"bad\">{} containers</span> run an image whose tag has moved since: <a href=\"{BASE}/outdated\">Out of date →</a></p>",
            stale.len()
        );
    }
    if names.is_empty() && last.is_none() {
        body.push_str("<p class=\"card\">No repositories yet: push an image to start.</p>");
        return Ok(html::page("Repositories", &body, None));
    }
    let all_time = totals(app, crate::usage::By::Repository, None)?;
    body.push_str("<table><thead><tr><th>Repository</th><th class=\"n\">Tags</th><th class=\"n\">Stored</th><th class=\"n\">Pulls 24 h</th><th class=\"n\">Pulls 30 d</th><th class=\"n\">Pulls</th><th class=\"n\">Clients</th><th>Last pulled</th></tr></thead><tbody>");
    for name in &names {
        let (tags, size) =
            data::repo_summary(&app.layout, name).map_err(io_error("reading a repository"))?;
        let p = pulls.get(name).copied().unwrap_or_default();
        let _ = write!(
            body,
            "<tr><td class=\"wrap\"><a href=\"{BASE}/repository?name={}\">{}</a></td><td class=\"n\">{tags}</td><td class=\"n\">{}</td>{}</tr>",
            url(name),
            esc(name),
            html::size(size),
            pull_cells(&p, all_time.get(name), true, now_us)
        );
    }
    body.push_str("</tbody></table>");
    if more {
        let last = names.last().map_or("", String::as_str);
        let _ = write!(
            body,
            "<div class=\"pager\"><a href=\"{BASE}/?n={n}&amp;last={}\">Next page →</a></div>",
            url(last)
        );
    }
    body.push_str(&scan_note(app, &scan));
    body.push_str("<p class=\"muted\">Stored: every blob and manifest the repository holds, each counted once. A pull is a manifest GET answered 2xx (HEADs are not pulls).</p>");
    Ok(html::page("Repositories", &body, None))
}

/// `/v2/_lighter/ui/repository?name=`: one repository.
fn repository(app: &App, q: &[(String, String)], n: usize, now_us: u64) -> Result<String> {
    let Some(name) = param(q, "name") else {
        return Err(ApiError::bad_request(
            Code::NameInvalid,
            "name= is missing: which repository?",
        ));
    };
    let repo = RepoName::parse(name)
        .map_err(|e| ApiError::bad_request(Code::NameInvalid, e.to_string()))?;
    let last = param(q, "last");
    let Some((mut tags, more)) =
        data::tags(&app.layout, &repo, last, n).map_err(io_error("reading the tags"))?
    else {
        return Err(ApiError::not_found(
            Code::NameUnknown,
            format!("repository {name} is not known"),
        ));
    };
    let (tag_count, size) =
        data::repo_summary(&app.layout, name).map_err(io_error("reading a repository"))?;
    let history = match &app.events {
        Some(log) => {
            let wanted: Vec<String> = tags
                .iter()
                .flat_map(|t| [t.tag.clone(), t.digest.to_string()])
                .collect();
            Some(
                data::history(log, name, &wanted, now_us, app.config.ui_events_scan_max)
                    .map_err(io_error("reading the event log"))?,
            )
        }
        None => None,
    };
    if let Some(h) = &history {
        for t in &mut tags {
            t.pulls = data::tag_pulls(h, &t.tag, &t.digest);
        }
    }
    let total = history.as_ref().map(|h| h.total).unwrap_or_default();
    let repo_time = totals(app, crate::usage::By::Repository, Some(name))?;
    let repo_time = repo_time.get(name).copied().unwrap_or_default();
    let tag_time = totals(app, crate::usage::By::Tag, Some(name))?;
    let mut body = String::new();
    let _ = write!(body, "<h1>{}</h1>", esc(name));
    let _ = write!(
        body,
        "<div class=\"card stats\"><div><b>{tag_count}</b>tags</div><div><b>{}</b>stored</div><div><b>{}</b>pulls in 24 h</div><div><b>{}</b>pulls in 30 days</div><div><b>{}</b>pulls in all</div><div><b>{}{}</b>clients</div><div><b>{}</b>last pulled</div></div>",
        html::size(size),
        total.day,
        total.month,
        repo_time.pulls.max(total.month),
        if repo_time.estimated { "≈" } else { "" },
        repo_time.clients,
        when(total.last_unix_us.max(repo_time.last_unix_us), now_us)
    );
    if let Some(h) = &history {
        body.push_str("<h2>Pulls per hour, last 24 hours</h2><div class=\"card\">");
        let labels: Vec<(usize, String)> = (0..24)
            .step_by(6)
            .map(|i| (i, format!("{} h ago", 24 - i)))
            .chain(std::iter::once((23, "this hour".to_string())))
            .collect();
        body.push_str(&html::bar_chart(&h.hourly, &labels, "pulls per hour"));
        body.push_str("</div><h2>Pulls per day, last 30 days</h2><div class=\"card\">");
        let labels: Vec<(usize, String)> = (0..30)
            .step_by(5)
            .map(|i| {
                let day = now_us - (29 - i as u64) * DAY_US;
                (i, crate::events::rfc3339(day)[5..10].to_string())
            })
            .chain(std::iter::once((29, "today".to_string())))
            .collect();
        body.push_str(&html::bar_chart(&h.daily, &labels, "pulls per day"));
        body.push_str("</div>");
    }
    body.push_str("<h2>Tags</h2>");
    if tags.is_empty() {
        body.push_str("<p class=\"card\">No tags.</p>");
    } else {
        body.push_str("<table><thead><tr><th>Tag</th><th>Digest</th><th>Kind</th><th class=\"n\">Size</th><th>Pushed</th><th class=\"n\">Pulls 24 h</th><th class=\"n\">Pulls 30 d</th><th class=\"n\">Pulls</th><th>Last pulled</th></tr></thead><tbody>");
        for t in &tags {
            let _ = write!(
                body,
                "<tr><td class=\"wrap\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td>{}</tr>",
                esc(&t.tag),
                html::short_digest(&t.digest.to_string()),
                t.kind,
                html::size(t.size_bytes),
                when(t.pushed_unix_us, now_us),
                pull_cells(&t.pulls, tag_time.get(&t.tag), false, now_us)
            );
        }
        body.push_str("</tbody></table>");
        if more {
            let last = tags.last().map_or("", |t| t.tag.as_str());
            let _ = write!(
                body,
                "<div class=\"pager\"><a href=\"{BASE}/repository?name={}&amp;n={n}&amp;last={}\">Next tags →</a></div>",
                url(name),
                url(last)
            );
        }
    }
    let scan = history.map(|h| h.scan).unwrap_or_default();
    body.push_str(&scan_note(app, &scan));
    body.push_str("<p class=\"muted\">Size: the manifest and everything it references (an index's child manifests and their blobs), each counted once. Pushed: when the tag was last written. A tag's pulls are manifest GETs of it by name or of its digest.</p>");
    let _ = write!(
        body,
        "<p><a href=\"{BASE}/events?repository={}\">Events of {} →</a></p>",
        url(name),
        esc(name)
    );
    Ok(html::page(name, &body, None))
}

/// `/v2/_lighter/ui/events[?repository=&action=&client=&before=&n=&refresh=1]`: the event
/// stream, newest first.
fn events(app: &App, q: &[(String, String)], n: usize, now_us: u64) -> Result<String> {
    let Some(log) = &app.events else {
        let body = "<h1>Events</h1><p class=\"card\">The event log is off (<code>events_ring_records = 0</code>).</p>";
        return Ok(html::page("Events", body, None));
    };
    let text = |key: &str| param(q, key).filter(|v| !v.is_empty()).map(str::to_owned);
    let filter = Query {
        repository: text("repository"),
        action: text("action"),
        client: text("client"),
        digest: text("digest"),
        ..Query::default()
    };
    let before = match param(q, "before") {
        None | Some("") => None,
        Some(v) => Some(Cursor::parse(v).ok_or_else(|| {
            ApiError::bad_request(
                Code::Unsupported,
                format!("before={v:?} is not one this gave"),
            )
        })?),
    };
    let mut lines = Vec::with_capacity(n);
    let mut next = None;
    let scan_max = app.config.ui_events_scan_max;
    let scanned = log
        .scan_newest(&filter, before.as_ref(), scan_max, |v, at| {
            lines.push(v);
            next = Some(at);
            lines.len() < n
        })
        .map_err(io_error("reading the event log"))?;
    let capped = scanned.capped;
    if capped {
        // The next page goes on after the last line read, matching or not.
        next = scanned.last;
    }
    let refresh = before.is_none() && param(q, "refresh") == Some("1");
    let mut body = String::new();
    body.push_str("<h1>Events</h1>");
    // The filters, as a form that reloads this page.
    let value = |key: &str| esc(param(q, key).unwrap_or(""));
    let _ = write!(
        body,
        "<form class=\"filter\" method=\"get\" action=\"{BASE}/events\">Repository <input name=\"repository\" value=\"{}\" size=\"28\"> Action <input name=\"action\" value=\"{}\" size=\"14\" placeholder=\"pull_manifest\"> Client <input name=\"client\" value=\"{}\" size=\"14\"><button>Filter</button>",
        value("repository"),
        value("action"),
        value("client")
    );
    let keep: String = ["repository", "action", "client", "digest"]
        .iter()
        .filter_map(|k| text(k).map(|v| format!("&amp;{k}={}", url(&v))))
        .collect();
    if refresh {
        let _ = write!(
            body,
            " <a href=\"{BASE}/events?n={n}{keep}\">Stop refreshing</a>"
        );
    } else {
        let _ = write!(
            body,
            " <a href=\"{BASE}/events?n={n}{keep}&amp;refresh=1\">Refresh every {REFRESH_S} s</a>"
        );
    }
    body.push_str("</form>");
    if lines.is_empty() {
        body.push_str("<p class=\"card\">No events match.</p>");
    } else {
        body.push_str("<table><thead><tr><th>Time</th><th>Action</th><th>Repository</th><th>Reference</th><th>Digest</th><th class=\"n\">Status</th><th class=\"n\">Bytes</th><th>Client</th><th>User agent</th></tr></thead><tbody>");
        for v in &lines {
            body.push_str(&event_row(v, now_us));
        }
        body.push_str("</tbody></table>");
    }
    if capped {
        let _ = write!(
            body,
            "<p class=\"muted\">Read {} lines of the event log (<code>ui_events_scan_max</code>) before this page was full: \"Older\" goes on from there.</p>",
            scanned.lines
        );
    }
    body.push_str("<div class=\"pager\">");
    if before.is_some() {
        let _ = write!(body, "<a href=\"{BASE}/events?n={n}{keep}\">← Newest</a>");
    }
    if lines.len() == n || capped {
        if let Some(at) = &next {
            let _ = write!(
                body,
                "<a href=\"{BASE}/events?n={n}{keep}&amp;before={at}\">Older →</a>"
            );
        }
    }
    body.push_str("</div>");
    let title = match &filter.repository {
        Some(r) => format!("Events of {r}"),
        None => "Events".into(),
    };
    Ok(html::page(&title, &body, refresh.then_some(REFRESH_S)))
}

fn event_row(v: &serde_json::Value, now_us: u64) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("");
    let status = v["status"].as_u64();
    let class = match status {
        Some(200..=399) => "ok",
        Some(_) => "bad",
        None => "muted",
    };
    let repo = s("repository");
    let repo_cell = if repo.is_empty() {
        String::new()
    } else {
        format!(
            "<a href=\"{BASE}/repository?name={}\">{}</a>",
            url(repo),
            esc(repo)
        )
    };
    let digest = match v["digest"].as_str() {
        Some(d) => html::short_digest(d),
        None => String::new(),
    };
    let bytes = v["bytes"].as_u64().map(html::bytes).unwrap_or_default();
    let mut client = esc(s("client"));
    if let Some(id) = v["identity"].as_str() {
        let _ = write!(client, "<br><span class=\"muted\">{}</span>", esc(id));
    }
    format!(
        "<tr><td>{}</td><td>{}</td><td class=\"wrap\">{repo_cell}</td><td class=\"wrap\">{}</td><td>{digest}</td><td class=\"n {class}\">{}</td><td class=\"n\">{bytes}</td><td class=\"mono\">{client}</td><td class=\"wrap muted\">{}</td></tr>",
        when(v["time_unix_us"].as_u64(), now_us),
        esc(s("action")),
        esc(s("reference")),
        status.map(|s| s.to_string()).unwrap_or_default(),
        esc(s("user_agent"))
    )
}

/// `/v2/_lighter/ui/outdated[?namespace=&repository=&all=1&skip=&n=]`: workloads whose image
/// tag has moved since they were admitted (with `all=1`, every workload the inventory holds).
fn outdated(app: &App, q: &[(String, String)], n: usize, now_us: u64) -> Result<String> {
    let text = |key: &str| param(q, key).filter(|v| !v.is_empty()).map(str::to_owned);
    let all = param(q, "all") == Some("1");
    let skip = match param(q, "skip") {
        None | Some("") => 0,
        Some(v) => v.parse::<usize>().map_err(|_| {
            ApiError::bad_request(Code::Unsupported, format!("skip={v:?}: expected a number"))
        })?,
    };
    let filter = crate::inventory::Filter {
        namespace: text("namespace"),
        repository: text("repository"),
        outdated_only: !all,
    };
    let rows = app.inventory.rows(&filter);
    let total = rows.len();
    let mut body = String::new();
    body.push_str(if all {
        "<h1>Workloads</h1>"
    } else {
        "<h1>Out of date</h1>"
    });
    let value = |key: &str| esc(param(q, key).unwrap_or(""));
    let _ = write!(
        body,
        "<form class=\"filter\" method=\"get\" action=\"{BASE}/outdated\">Namespace <input name=\"namespace\" value=\"{}\" size=\"16\"> Repository <input name=\"repository\" value=\"{}\" size=\"28\">{}<button>Filter</button>",
        value("namespace"),
        value("repository"),
        if all { "<input type=\"hidden\" name=\"all\" value=\"1\">" } else { "" }
    );
    let keep: String = ["namespace", "repository"]
        .iter()
        .filter_map(|k| text(k).map(|v| format!("&amp;{k}={}", url(&v))))
        .collect();
    if all {
        let _ = write!(
            body,
            " <a href=\"{BASE}/outdated?n={n}{keep}\">Only out of date</a>"
        );
    } else {
        let _ = write!(
            body,
            " <a href=\"{BASE}/outdated?n={n}{keep}&amp;all=1\">Every workload</a>"
        );
    }
    body.push_str("</form>");
    if total == 0 {
        body.push_str(if all {
            "<p class=\"card\">The admission webhook has seen no workloads (or none match).</p>"
        } else {
            "<p class=\"card ok\">No workload runs an image whose tag has moved since it was admitted.</p>"
        });
        return Ok(html::page("Out of date", &body, None));
    }
    let _ = write!(
        body,
        "<p class=\"muted\">{total} {}.</p>",
        if all {
            "containers of workloads"
        } else {
            "containers run an image whose tag now points elsewhere"
        }
    );
    body.push_str("<table><thead><tr><th>Namespace</th><th>Workload</th><th>Object</th><th>Container</th><th>Image</th><th>Runs</th><th>Tag now</th><th>Tag moved</th></tr></thead><tbody>");
    for r in rows.iter().skip(skip).take(n) {
        let e = &r.entry;
        let image = match &e.repository {
            Some(repo) => format!(
                "<a href=\"{BASE}/repository?name={}\">{}</a>",
                url(repo),
                esc(&e.image)
            ),
            None => esc(&e.image),
        };
        let runs = match &e.digest {
            Some(d) => html::short_digest(d),
            None => "<span class=\"muted\">unknown</span>".into(),
        };
        let (now, moved) = match &r.outdated {
            Some(o) => (
                format!(
                    "<span class=\"bad\">{}</span>",
                    html::short_digest(&o.current_digest)
                ),
                when(Some(o.moved_at_ms * 1000), now_us),
            ),
            None if e.pinned => (
                "<span class=\"muted\">pinned by digest</span>".into(),
                String::new(),
            ),
            None => ("<span class=\"ok\">same</span>".into(), String::new()),
        };
        let container_type = match e.container_type {
            crate::inventory::ContainerType::Container => "",
            crate::inventory::ContainerType::Init => " <span class=\"muted\">(init)</span>",
            crate::inventory::ContainerType::Ephemeral => {
                " <span class=\"muted\">(ephemeral)</span>"
            }
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"wrap\">{}/{}</td><td class=\"wrap\">{}/{}</td><td>{}{container_type}</td><td class=\"wrap\">{image}</td><td>{runs}</td><td>{now}</td><td>{moved}</td></tr>",
            esc(&e.namespace),
            esc(&e.owner_kind),
            esc(&e.owner_name),
            esc(&e.kind),
            esc(&e.name),
            esc(&e.container),
        );
    }
    body.push_str("</tbody></table><div class=\"pager\">");
    let all_param = if all { "&amp;all=1" } else { "" };
    if skip > 0 {
        let _ = write!(
            body,
            "<a href=\"{BASE}/outdated?n={n}{keep}{all_param}&amp;skip={}\">← Previous</a>",
            skip.saturating_sub(n)
        );
    }
    if skip + n < total {
        let _ = write!(
            body,
            "<a href=\"{BASE}/outdated?n={n}{keep}{all_param}&amp;skip={}\">Next →</a>",
            skip + n
        );
    }
    body.push_str("</div><p class=\"muted\">What the admission webhook saw: each container with the digest its image's tag pointed to when admitted; \"Tag now\" is where that tag points in Lighter now (for a mirrored image, as last refreshed from upstream), \"Tag moved\" when it got that value.</p>");
    Ok(html::page("Out of date", &body, None))
}
