//! The OCI Distribution API over the layout: routing (by `lighter_layout::route`) to the handlers
//! of each endpoint family, and the small response helpers they share.

use std::convert::Infallible;
use std::io::{self, Seek, SeekFrom};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use lighter_layout::{route, Ingest, Route, RouteError};
use tokio::io::AsyncReadExt;

use crate::app::{block, App};
use crate::error::{ApiError, Code};
use crate::metrics::Counters;
use lighter_access::Action;
use std::net::IpAddr;

pub mod blobs;
mod lists;
pub mod manifests;
pub mod pace;

pub type Body = BoxBody<Bytes, io::Error>;
pub type Response = hyper::Response<Body>;
pub type Result<T> = std::result::Result<T, ApiError>;

/// Answers one request. Never fails: errors become OCI error responses.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    client: Option<IpAddr>,
) -> std::result::Result<Response, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    // A pull the control plane answers (handed over by the data plane: a mirror's miss, a
    // negotiation, Basic credentials) is logged like the data plane's own.
    let pull = app.events.as_ref().and_then(|_| pull_of(&app, &req));
    let origin = crate::events::Origin {
        client,
        identity: Default::default(),
        user_agent: header(&req, "user-agent").unwrap_or_default().to_owned(),
    };
    let response = crate::events::with_origin(origin, async {
        let response = match dispatch(&app, req, client).await {
            Ok(r) => r,
            Err(e) => {
                if e.status == StatusCode::FORBIDDEN
                    && !matches!(method, Method::GET | Method::HEAD)
                {
                    record_denied(&app, &method, &path, &e);
                }
                error_response(e, method == Method::HEAD)
            }
        };
        if let Some((action, name, reference)) = pull {
            record_pull(&app, &response, action, name, reference, started);
        }
        response
    })
    .await;
    tracing::debug!(%method, path, status = response.status().as_u16(), "request");
    Ok(response)
}

/// Logs a change refused with 403 (access control, an immutable tag): who tried what, for the
/// audit trail. Refused reads are not logged (a scanner's probes would flood the log).
fn record_denied(app: &App, method: &Method, path: &str, e: &ApiError) {
    let e = crate::events::Event::new("denied")
        .with("method", method.as_str())
        .with("path", path)
        .with_text(
            "repository",
            match route::parse(path) {
                Ok(
                    Route::Blob { name, .. }
                    | Route::UploadStart { name }
                    | Route::Upload { name, .. }
                    | Route::Manifest { name, .. }
                    | Route::Tags { name }
                    | Route::Referrers { name, .. },
                ) => Some(name),
                _ => None,
            },
        )
        .with("status", e.status.as_u16())
        .with("code", e.code.as_str())
        .with("message", e.message.as_str());
    crate::events::record(app, e);
}

/// The action, local repository and reference of a manifest or blob `GET`/`HEAD`.
fn pull_of(app: &App, req: &Request<Incoming>) -> Option<(&'static str, String, String)> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return None,
    };
    let (action, name, reference) = match route::parse(req.uri().path()).ok()? {
        Route::Manifest { name, reference } => (
            if head {
                "head_manifest"
            } else {
                "pull_manifest"
            },
            name,
            reference.to_string(),
        ),
        Route::Blob { name, digest } => (
            if head { "head_blob" } else { "pull_blob" },
            name,
            digest.to_string(),
        ),
        _ => return None,
    };
    Some((action, local(app, req, &name), reference))
}

/// Logs a pull the control plane answered (but the challenge of a 401, which every client
/// with credentials meets first): its status, the body's length and the time to the answer.
fn record_pull(
    app: &App,
    r: &Response,
    action: &'static str,
    name: String,
    reference: String,
    started: std::time::Instant,
) {
    let status = r.status().as_u16();
    if status == 401 {
        return;
    }
    let head = action.starts_with("head");
    let digest = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| reference.starts_with("sha").then(|| reference.clone()));
    let bytes = match head {
        true => 0,
        false => r
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0),
    };
    let e = crate::events::Event::new(action)
        .with("repository", name)
        .with("reference", reference)
        .with("status", status)
        .with("bytes", bytes)
        .with("duration_us", started.elapsed().as_micros() as u64)
        .with_text("digest", digest);
    crate::events::record(app, e);
}

async fn dispatch(
    app: &Arc<App>,
    req: Request<Incoming>,
    client: Option<IpAddr>,
) -> Result<Response> {
    let route = route::parse(req.uri().path()).map_err(route_error)?;
    let method = req.method().clone();
    let caller = match &app.auth {
        None if route == Route::Token => {
            return Err(ApiError::not_found(
                Code::Unsupported,
                "access control is off: no tokens are needed",
            ))
        }
        None => None,
        Some(auth) => {
            let host = crate::auth::host_of(header(&req, "host"), app.config.listen);
            if route == Route::Token {
                let (config, counters) = (&app.config, &app.counters);
                return crate::auth::endpoint::handle(auth, req, client, &host, config, counters)
                    .await;
            }
            let caller = auth
                .identify(
                    crate::auth::authorization(&req),
                    client,
                    &host,
                    &app.counters,
                )
                .await;
            if let Ok(c) = &caller {
                crate::events::set_identity(c.name());
            }
            let checked = caller.and_then(|caller| {
                authorise(app, auth, &caller, &req, &route, client, &host).map(|()| caller)
            });
            match checked {
                Ok(caller) => Some(caller),
                // A browser asks its user for a password only when challenged with Basic.
                Err(e) if route == Route::Ui && e.status == StatusCode::UNAUTHORIZED => {
                    return Err(e.basic_challenge())
                }
                Err(e) => return Err(e),
            }
        }
    };
    let may = |name: &str, action| match (&app.auth, &caller) {
        (Some(auth), Some(c)) => auth.permits(c, client, name, action),
        _ => true,
    };
    if let Some(r) = mirrored(app, &req, &route).await {
        return r;
    }
    if let Some(r) = backed(app, &req, &route).await {
        return r;
    }
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(json(StatusCode::OK, b"{}".to_vec())),
        (Route::Catalog, Method::GET) => {
            lists::catalog(app, &req, |repo| match (&app.auth, &caller) {
                (Some(auth), Some(c)) => auth.lists(c, client, repo),
                _ => true,
            })
            .await
        }
        (Route::Prefetch, Method::POST) => crate::mirror::prefetch::handle(app, &req).await,
        (Route::Metrics, Method::GET) => Ok(metrics(app)),
        (Route::Gc, Method::POST) => gc(app, &req).await,
        (Route::Retention, Method::POST) => crate::retention::handle(app, &req).await,
        (Route::Events, Method::GET) => events(app, &req).await,
        (Route::Inventory, Method::GET) => inventory(app, &req),
        (Route::Usage, Method::GET) => usage(app, &req).await,
        (Route::Ui, _) => crate::ui::handle(app, &req).await,
        // Peers ask on the registry port, where the data plane hands them over and
        // `peers::serve` answers before hyper sees them.
        (Route::PeerBlob { .. }, _) => Err(ApiError::not_found(
            Code::Unsupported,
            "peer transfers are served on the registry port, to GET requests of the node tier",
        )),
        (Route::Tags { name }, Method::GET) => lists::tags(app, &req, &name).await,
        (Route::Referrers { name, digest }, Method::GET) => {
            lists::referrers(app, &req, &name, &digest).await
        }
        (Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
            blobs::get(app, &req, &name, &digest)
        }
        (Route::Blob { name, digest }, Method::DELETE) => blobs::delete(app, &name, &digest).await,
        (Route::UploadStart { name }, Method::POST) => {
            let from = |from: &lighter_layout::RepoName| may(from.as_str(), Action::Pull);
            let from: Option<&(dyn Fn(&lighter_layout::RepoName) -> bool + Sync)> =
                app.auth.as_ref().map(|_| &from as _);
            blobs::start_upload(app, req, &name, from).await
        }
        (Route::Upload { name, id }, Method::GET) => blobs::upload_status(app, &name, &id).await,
        (Route::Upload { name, id }, Method::PATCH) => {
            blobs::patch_upload(app, req, &name, &id).await
        }
        (Route::Upload { name, id }, Method::PUT) => {
            blobs::finish_upload(app, req, &name, &id).await
        }
        (Route::Upload { name, id }, Method::DELETE) => blobs::cancel_upload(app, &name, &id).await,
        (Route::Manifest { name, reference }, Method::GET | Method::HEAD) => {
            manifests::get(app, &req, &name, &reference)
        }
        (Route::Manifest { name, reference }, Method::PUT) => {
            manifests::put(app, req, &name, &reference).await
        }
        (Route::Manifest { name, reference }, Method::DELETE) => {
            manifests::delete(app, &name, &reference).await
        }
        (_, method) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            format!("{method} is not allowed on this endpoint"),
        )),
    }
}

/// Whether `caller` may make this request: what it does to which repository (for a mirror, its
/// local name), by the rules. `/v2/` itself needs credentials that check out (it is how
/// clients learn that theirs work); the catalog is filtered instead.
fn authorise(
    app: &App,
    auth: &crate::auth::Auth,
    caller: &crate::auth::Caller,
    req: &Request<Incoming>,
    route: &Route,
    client: Option<IpAddr>,
    host: &str,
) -> Result<()> {
    let method = req.method();
    let read = matches!(*method, Method::GET | Method::HEAD);
    let (name, action) = match route {
        Route::Base if caller.is_anonymous() => {
            Counters::add(&app.counters.auth_denied, 1);
            return Err(auth.unauthorized(host, None, None));
        }
        Route::Base | Route::Catalog | Route::Token | Route::PeerBlob { .. } => return Ok(()),
        Route::Prefetch => ("_lighter/prefetch".to_owned(), Action::Admin),
        Route::Metrics => ("_lighter/metrics".to_owned(), Action::Admin),
        Route::Gc => ("_lighter/gc".to_owned(), Action::Admin),
        Route::Retention => ("_lighter/retention".to_owned(), Action::Admin),
        Route::Events => ("_lighter/events".to_owned(), Action::Admin),
        Route::Inventory => ("_lighter/inventory".to_owned(), Action::Admin),
        Route::Usage => ("_lighter/usage".to_owned(), Action::Admin),
        Route::Ui => ("_lighter/ui".to_owned(), Action::Admin),
        Route::Tags { name } | Route::Referrers { name, .. } => {
            (local(app, req, name), Action::Pull)
        }
        Route::Blob { name, .. } | Route::Manifest { name, .. } => (
            local(app, req, name),
            match *method {
                Method::DELETE => Action::Delete,
                Method::PUT => Action::Push,
                _ if read => Action::Pull,
                _ => return Ok(()),
            },
        ),
        Route::UploadStart { name } | Route::Upload { name, .. } => {
            (local(app, req, name), Action::Push)
        }
    };
    if auth.permits(caller, client, &name, action) {
        return Ok(());
    }
    Counters::add(&app.counters.auth_denied, 1);
    tracing::info!(client = ?client, user = caller.name(), repository = name, action = action.word(), "refused by the access rules");
    Err(auth.refuse(caller, client, host, &name, action))
}

/// The local name of a repository a request names (a mirror's, with `?ns=`).
fn local(app: &App, req: &Request<Incoming>, name: &lighter_layout::RepoName) -> String {
    let q = query(req);
    app.mirrors
        .target(name, param(&q, "ns"))
        .map_or_else(|| name.as_str().to_owned(), |t| t.name.as_str().to_owned())
}

/// Requests for repositories of the pull-through cache; None for local repositories.
async fn mirrored(
    app: &Arc<App>,
    req: &Request<Incoming>,
    route: &Route,
) -> Option<Result<Response>> {
    if app.mirrors.upstreams.is_empty() {
        return None;
    }
    let name = match route {
        Route::Blob { name, .. } | Route::Manifest { name, .. } => name,
        Route::UploadStart { name } | Route::Upload { name, .. } => name,
        _ => return None,
    };
    let q = query(req);
    let target = app.mirrors.target(name, param(&q, "ns"))?;
    let pull = matches!(*req.method(), Method::GET | Method::HEAD);
    Some(match route {
        Route::Blob { digest, .. } if pull => crate::mirror::blob(app, req, &target, digest).await,
        Route::Manifest { reference, .. } if pull => crate::mirror::manifest(app, req, &target, reference).await,
        _ if *req.method() == Method::DELETE => return None,
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Code::Denied,
            format!(
                "repository {} mirrors {} and is read-only: push to a repository outside the mirror prefix",
                target.name, target.upstream.config.name
            ),
        )),
    })
}

/// Pulls of repositories kept in the bucket (`[storage.s3]`): the data plane's misses and
/// stale tags, filled from the bucket. None for anything else.
async fn backed(
    app: &Arc<App>,
    req: &Request<Incoming>,
    route: &Route,
) -> Option<Result<Response>> {
    let bucket = app.bucket.as_ref()?;
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    Some(match route {
        Route::Blob { name, digest } => crate::bucket::blob(app, bucket, req, name, digest).await,
        Route::Manifest { name, reference } => {
            crate::bucket::manifest(app, bucket, req, name, reference).await
        }
        _ => return None,
    })
}

/// `?dry_run=` of an admin run (garbage collection, retention): true, 1 or empty; false, 0 or
/// absent; anything else is a 400.
pub fn dry_run(req: &Request<Incoming>) -> Result<bool> {
    match param(&query(req), "dry_run") {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            Code::Unsupported,
            format!("dry_run={other:?}: expected true or false"),
        )),
    }
}

/// `POST /v2/_lighter/gc[?dry_run=true]`: one garbage collection (one at a time); its report.
async fn gc(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response> {
    let dry_run = dry_run(req)?;
    let report = crate::gc::run(app, dry_run).await?;
    Ok(json(
        StatusCode::OK,
        serde_json::to_vec(&report).expect("JSON of a report"),
    ))
}

/// Most lines one page of `GET /v2/_lighter/events` returns.
const EVENTS_PAGE_MAX: usize = 10_000;

/// `GET /v2/_lighter/events[?repository=&digest=&action=&client=&identity=&source=&since=&until=&limit=]`: the
/// event log, oldest first, as JSON lines; a `Link` header points to the next page.
async fn events(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response> {
    let Some(log) = app.events.clone() else {
        return Err(ApiError::not_found(
            Code::Unsupported,
            "the event log is off (events_ring_records = 0)",
        ));
    };
    let q = query(req);
    let time = |key: &str| -> Result<Option<u64>> {
        match param(&q, key) {
            None => Ok(None),
            Some(v) => crate::events::parse_time_us(v).map(Some).ok_or_else(|| {
                ApiError::bad_request(
                    Code::Unsupported,
                    format!("{key}={v:?}: expected unix milliseconds or RFC 3339 (…Z)"),
                )
            }),
        }
    };
    let limit = match param(&q, "limit") {
        None => 1000,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=EVENTS_PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    Code::Unsupported,
                    format!("limit={v:?}: expected 1 to {EVENTS_PAGE_MAX}"),
                ))
            }
        },
    };
    let cursor = match param(&q, "cursor") {
        None => None,
        Some(v) => Some(crate::events::Cursor::parse(v).ok_or_else(|| {
            ApiError::bad_request(
                Code::Unsupported,
                format!("cursor={v:?} is not one this gave"),
            )
        })?),
    };
    let text = |key: &str| param(&q, key).map(str::to_owned);
    let filter = crate::events::Query {
        repository: text("repository"),
        digest: text("digest"),
        action: text("action"),
        client: text("client"),
        identity: text("identity"),
        source: text("source"),
        since_us: time("since")?,
        until_us: time("until")?,
        limit,
        cursor,
    };
    let (lines, next) = crate::app::block(move || log.query(&filter))
        .map_err(|e| ApiError::internal("reading the event log", e))?;
    let mut body = Vec::new();
    for v in &lines {
        serde_json::to_writer(&mut body, v).expect("JSON of a value");
        body.push(b'\n');
    }
    let mut r = full(body);
    set(&mut r, "content-type", "application/x-ndjson");
    if let Some(next) = next {
        let kept: Vec<String> = q
            .iter()
            .filter(|(k, _)| k != "cursor")
            .map(|(k, v)| format!("{k}={}", percent(v)))
            .chain(std::iter::once(format!("cursor={next}")))
            .collect();
        set(
            &mut r,
            "link",
            &format!("</v2/_lighter/events?{}>; rel=\"next\"", kept.join("&")),
        );
    }
    Ok(r)
}

/// `GET /v2/_lighter/inventory[?namespace=&repository=&outdated=true&limit=&after=]`: the
/// workloads the admission webhook saw, each container with its image, digest and, if its tag
/// has moved since, `outdated`, in pages (JSON: `{"entries": [...], "next": <cursor or null>}`,
/// and a `Link` header to the next page).
fn inventory(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response> {
    let q = query(req);
    let outdated_only = match param(&q, "outdated") {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                Code::Unsupported,
                format!("outdated={other:?}: expected true or false"),
            ))
        }
    };
    let filter = crate::inventory::Filter {
        namespace: param(&q, "namespace").map(str::to_owned),
        repository: param(&q, "repository").map(str::to_owned),
        outdated_only,
    };
    let limit = page_limit(&q, INVENTORY_PAGE_DEFAULT, INVENTORY_PAGE_MAX)?;
    let after = param(&q, "after").map(str::to_owned);
    let (rows, next) = crate::app::block(|| app.inventory.page(&filter, after.as_deref(), limit));
    let body = serde_json::to_vec(&serde_json::json!({ "entries": rows, "next": next }))
        .expect("JSON of rows");
    let mut r = json(StatusCode::OK, body);
    if let Some(next) = &next {
        link_next(&mut r, &q, "inventory", next);
    }
    Ok(r)
}

/// Rows of `GET /v2/_lighter/inventory` a page holds unless `limit` says otherwise, and at
/// most.
const INVENTORY_PAGE_DEFAULT: usize = 1000;
const INVENTORY_PAGE_MAX: usize = 10_000;

/// Rows one page of `GET /v2/_lighter/usage` returns unless `limit` says otherwise, and at
/// most.
const USAGE_PAGE_DEFAULT: usize = 1000;
const USAGE_PAGE_MAX: usize = 10_000;

/// `GET /v2/_lighter/usage[?by=repository|tag|digest&repository=&since=&until=&limit=&after=]`:
/// pulls summed per repository, tag or digest, in key order, as one JSON object; its `next`
/// (and a `Link` header) asks for the next page.
async fn usage(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response> {
    let Some(summary) = app.usage.clone() else {
        return Err(ApiError::not_found(
            Code::Unsupported,
            "the event log is off (events_ring_records = 0), so there is no usage",
        ));
    };
    let q = query(req);
    let bad = |msg: String| ApiError::bad_request(Code::Unsupported, msg);
    let time = |key: &str| -> Result<Option<u64>> {
        match param(&q, key) {
            None => Ok(None),
            Some(v) => crate::events::parse_time_us(v).map(Some).ok_or_else(|| {
                bad(format!(
                    "{key}={v:?}: expected unix milliseconds or RFC 3339 (…Z)"
                ))
            }),
        }
    };
    let by = match param(&q, "by") {
        None => crate::usage::By::Repository,
        Some(v) => crate::usage::By::parse(v)
            .ok_or_else(|| bad(format!("by={v:?}: expected repository, tag or digest")))?,
    };
    let limit = page_limit(&q, USAGE_PAGE_DEFAULT, USAGE_PAGE_MAX)?;
    let filter = crate::usage::UsageQuery {
        by,
        repository: param(&q, "repository").map(str::to_owned),
        since_us: time("since")?,
        until_us: time("until")?,
        after: param(&q, "after").map(str::to_owned),
        limit,
    };
    let page = crate::app::block(move || summary.query(&filter))
        .map_err(|e| ApiError::internal("reading the event log", e))?;
    let mut r = json(
        StatusCode::OK,
        serde_json::to_vec(&page).expect("JSON of a usage page"),
    );
    if let Some(next) = &page.next {
        link_next(&mut r, &q, "usage", next);
    }
    Ok(r)
}

/// A page's `limit`: `default` when not given, else 1 to `max`.
fn page_limit(q: &[(String, String)], default: usize, max: usize) -> Result<usize> {
    match param(q, "limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                Code::Unsupported,
                format!("limit={v:?}: expected 1 to {max}"),
            )),
        },
    }
}

/// Sets the `Link` header to the next page of `_lighter/<api>`: this query, `after=<next>`.
fn link_next(r: &mut Response, q: &[(String, String)], api: &str, next: &str) {
    let kept: Vec<String> = q
        .iter()
        .filter(|(k, _)| k != "after")
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .chain(std::iter::once(format!("after={}", percent(next))))
        .collect();
    set(
        r,
        "link",
        &format!("</v2/_lighter/{api}?{}>; rel=\"next\"", kept.join("&")),
    );
}

/// Percent-encodes what a query value may not hold as is.
fn percent(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET /v2/_lighter/metrics`.
fn metrics(app: &App) -> Response {
    let gauges = crate::metrics::Gauges {
        blob_downloads_in_flight: app.mirrors.downloads_in_flight() as u64,
        upload_sessions: app.uploads.open_sessions() as u64,
        peers: app.peers.as_ref().map_or(0, |p| p.live() as u64),
    };
    let mut text = crate::metrics::render(&app.counters, &gauges);
    // The data plane's counters are there with the event log off too.
    let dataplane = match &app.events {
        Some(e) => e.counters(),
        None => app.rings.counters(),
    };
    crate::metrics::render_dataplane(&mut text, &dataplane);
    if let Some(n) = &app.notify {
        n.render_metrics(&mut text);
    }
    let mut r = full(text.into_bytes());
    set(
        &mut r,
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
    );
    r
}

fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::NotFound => ApiError::not_found(
            Code::Unsupported,
            "no such endpoint: the registry API lives under /v2/",
        ),
        RouteError::Name(e) => ApiError::bad_request(Code::NameInvalid, e.to_string()),
        RouteError::Digest(e) => ApiError::bad_request(Code::DigestInvalid, e.to_string()),
        RouteError::Tag(e) => ApiError::bad_request(Code::ManifestInvalid, e.to_string()),
        RouteError::UploadId => ApiError::not_found(
            Code::BlobUploadUnknown,
            "no such upload session: the id is not one this registry issues",
        ),
    }
}

pub fn error_response(e: ApiError, head: bool) -> Response {
    let body = e.body();
    let len = body.len();
    let mut r = if head { empty() } else { full(body) };
    *r.status_mut() = e.status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    for (name, value) in e.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    r
}

// ---- response helpers ---------------------------------------------------------------------------

fn base_headers(r: &mut Response) {
    r.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
}

pub fn empty() -> Response {
    let mut r = hyper::Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    base_headers(&mut r);
    r
}

pub fn streamed(body: Body) -> Response {
    let mut r = hyper::Response::new(body);
    base_headers(&mut r);
    r
}

pub fn full(bytes: Vec<u8>) -> Response {
    let mut r = hyper::Response::new(
        Full::new(Bytes::from(bytes))
            .map_err(|e| match e {})
            .boxed(),
    );
    base_headers(&mut r);
    r
}

pub fn json(status: StatusCode, bytes: Vec<u8>) -> Response {
    let len = bytes.len();
    let mut r = full(bytes);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// Streams `len` bytes of `file` from `start`, in bounded chunks.
pub fn file_body(mut file: std::fs::File, start: u64, len: u64) -> io::Result<Body> {
    /// Read size of a streamed blob body.
    const CHUNK_BYTES: usize = 256 << 10;
    file.seek(SeekFrom::Start(start))?;
    let reader = tokio::fs::File::from_std(file).take(len);
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, CHUNK_BYTES);
    Ok(StreamBody::new(stream.map_ok(Frame::data)).boxed())
}

pub fn set(r: &mut Response, name: &'static str, value: &str) {
    r.headers_mut().insert(
        name,
        HeaderValue::from_str(value).expect("header values we build are ASCII"),
    );
}

/// Query parameters, percent-decoded.
pub fn query(req: &Request<impl Sized>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

pub fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub fn header<'a>(req: &'a Request<impl Sized>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The declared `Content-Length`, if any.
pub fn content_length(req: &Request<impl Sized>) -> Result<Option<u64>> {
    match header(req, "content-length") {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            ApiError::bad_request(Code::SizeInvalid, "Content-Length is not a number")
        }),
    }
}

/// A request body that could not be read: too slow (408) or broken (400), with `code`.
pub fn body_error(code: Code, e: pace::BoxError) -> ApiError {
    if e.is::<pace::TooSlow>() {
        return ApiError::new(StatusCode::REQUEST_TIMEOUT, code, e.to_string());
    }
    ApiError::bad_request(
        code,
        format!("request body ended early or was malformed: {e}"),
    )
}

/// Buffer filled from the request body before each write to the ingest.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Streams a request body into an ingest with bounded memory: at most `limit` bytes, at the
/// pace `pace::Paced` asks for. Returns the bytes received. On an error part of the body may
/// have been written: the caller rolls back or drops the ingest.
pub async fn receive(
    app: &App,
    body: Incoming,
    ingest: &mut Ingest,
    limit: Option<u64>,
) -> Result<u64> {
    let mut body = pace::Paced::new(body, &app.config);
    let mut buf = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
    let mut received = 0u64;
    loop {
        let frame = match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(body_error(Code::BlobUploadInvalid, e)),
            Some(Ok(frame)) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if limit.is_some_and(|l| received > l) {
            return Err(ApiError::bad_request(
                Code::SizeInvalid,
                "request body is longer than its Content-Length or Content-Range",
            ));
        }
        buf.extend_from_slice(&data);
        if buf.len() >= WRITE_BUFFER_BYTES {
            block(|| ingest.write(&buf))?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        block(|| ingest.write(&buf))?;
    }
    Ok(received)
}
