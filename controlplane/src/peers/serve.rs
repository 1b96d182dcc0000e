//! Peers' requests: `GET /v2/_lighter/peer/blobs/<digest>?repo=<mirrored repository>`, handed
//! over by the data plane and answered here before hyper sees them, the body by sendfile within
//! the node's `peer_upload_max_bytes_per_sec`.
//!
//! A node asked as the blob's **owner** either sends the requester to a node that holds or is
//! receiving the blob ([`super::fanout`]: 307) or serves it itself, from its store, containerd's
//! content store, or its download in flight, starting that download from upstream if there is
//! none (only owners go upstream for peers). With `direct=1` (the peer it was sent to failed,
//! named in `failed=`) it serves itself. A node asked because the owner **sent** the requester
//! (`sent_by_owner=1`) serves only what it holds or is receiving, else 404, and refuses (503)
//! when it is already serving many peers that blob; the requester then asks the owner directly.
//! A node asked with `held_only=1` (by a new owner, for a blob this node may have owned before)
//! serves only a whole, verified copy. A node asked as owner while it is itself receiving the
//! blob from peers switches that download to upstream: after an owner's death its former chain
//! could otherwise feed itself in a circle.
//! Blobs only, by digest: peers never resolve tags or serve manifests for each other.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use lighter_dataplane::conn::HEADERS_MAX;
use lighter_layout::{route, Digest, RepoName, Route};

use super::fanout::Choice;
use super::{PeerUrl, Peers, PEER_HEADER};
use crate::app::{block, App};
use crate::error::{ApiError, Code};
use crate::handoff::Prefixed;
use crate::metrics::Counters;
use crate::mirror::follow::{answer_blob, answer_error, head_bytes};
use crate::mirror::{self, Progress, Via};

/// A peer's request, read from the handed-over head: a `GET` of the blob, or a `POST ?held=1`
/// saying the peer now holds the whole, verified blob.
struct PeerGet {
    held: bool,
    digest: Digest,
    repo: Option<String>,
    requester: Option<String>,
    range: Option<Vec<u8>>,
    direct: bool,
    sent_by_owner: bool,
    /// Only a whole, verified copy (the asker owns the blob and wants no cycle).
    held_only: bool,
    failed: Option<String>,
}

/// Serves `io`'s request if it is a peer's blob `GET`; otherwise gives the connection back.
pub async fn try_serve(app: &Arc<App>, io: Prefixed) -> Option<Prefixed> {
    let Some(get) = peer_get(io.pending()) else {
        return Some(io);
    };
    let Some(peers) = app.peers.clone() else {
        let e = ApiError::not_found(
            Code::Unsupported,
            "this registry has no peers (node tier off)",
        );
        answer_error(io, e).await;
        return None;
    };
    if app.auth.is_some() && !io.peer_ip().is_some_and(|ip| peers.is_member_ip(ip)) {
        let e = ApiError::new(
            hyper::StatusCode::FORBIDDEN,
            Code::Denied,
            "with access control on, only the node tier's peers may fetch blobs by digest",
        );
        answer_error(io, e).await;
        return None;
    }
    let counters = &app.counters;
    // A requester is trusted as a future source only if it is a peer this node knows.
    let requester = get.requester.as_deref().filter(|r| peers.is_member(r));
    if get.held {
        if let (Some(me), Some(r)) = (peers.me(), requester) {
            let mut f = peers.fanout.lock().unwrap_or_else(|p| p.into_inner());
            f.held(&get.digest, me.as_str(), r, Instant::now());
        }
        answer_empty(io, hyper::StatusCode::ACCEPTED, &[]).await;
        return None;
    }
    if let (Some(failed), Some(_)) = (&get.failed, requester) {
        peers.fanout_failed(&get.digest, failed);
    }
    // Asked as the blob's owner (not sent here by one, not a previous owner's check).
    let as_owner = !get.sent_by_owner && !get.held_only;
    let local = match block(|| local_source(app, &get.digest, get.held_only, as_owner)) {
        Ok(l) => l,
        Err(e) => {
            answer_error(io, e).await;
            return None;
        }
    };
    if as_owner && !get.direct {
        if let Some(me) = peers.me() {
            // A large blob held whole here and by others: ranges from several at once.
            let held_len = local.as_ref().and_then(|(_, p)| {
                let p = p.borrow();
                p.verified.then_some(p.total).flatten()
            });
            let parallel = match (held_len, requester) {
                (Some(len), Some(r))
                    if peers.parallel_min_bytes > 0 && len >= peers.parallel_min_bytes =>
                {
                    let mut f = peers.fanout.lock().unwrap_or_else(|p| p.into_inner());
                    let sources = f.parallel_sources(
                        &get.digest,
                        me.as_str(),
                        true,
                        r,
                        super::PARALLEL_SOURCES_MAX,
                        Instant::now(),
                    );
                    (!sources.is_empty()).then_some((sources, len))
                }
                _ => None,
            };
            if let Some((sources, len)) = parallel {
                Counters::add(&counters.peer_requests_redirected, 1);
                let to = sources[0].clone();
                let extra = [
                    (super::SOURCES_HEADER, sources.join(", ")),
                    (super::SIZE_HEADER, len.to_string()),
                ];
                redirect(io, &to, &get, &extra).await;
                return None;
            }
            let choice = {
                let mut f = peers.fanout.lock().unwrap_or_else(|p| p.into_inner());
                f.choose(
                    &get.digest,
                    me.as_str(),
                    requester,
                    peers.fanout_max,
                    Instant::now(),
                )
            };
            if let Choice::Redirect(to) = choice {
                Counters::add(&counters.peer_requests_redirected, 1);
                redirect(io, &to, &get, &[]).await;
                return None;
            }
        }
    }
    let (file, progress) = match local {
        Some(found) => found,
        None if !as_owner => {
            Counters::add(&counters.peer_requests_not_found, 1);
            let e = ApiError::not_found(Code::BlobUnknown, "this peer does not hold that blob");
            answer_error(io, e).await;
            return None;
        }
        None => match start(app, &get) {
            Ok(found) => found,
            Err(e) => {
                Counters::add(&counters.peer_requests_not_found, 1);
                answer_error(io, e).await;
                return None;
            }
        },
    };
    let Some(_serving) = Serving::begin(&peers, &get.digest, get.sent_by_owner) else {
        Counters::add(&counters.peer_requests_busy, 1);
        let e = ApiError::new(
            hyper::StatusCode::SERVICE_UNAVAILABLE,
            Code::TooManyRequests,
            "this peer is serving that blob to enough peers; ask the owner",
        );
        answer_error(io, e).await;
        return None;
    };
    Counters::add(&counters.peer_requests_served, 1);
    let upload = (&peers.upload, &counters.peer_served_bytes);
    answer_blob(
        app,
        io,
        file,
        progress,
        &get.digest,
        get.range.as_deref(),
        Some(upload),
    )
    .await;
    None
}

type Source = (std::fs::File, tokio::sync::watch::Receiver<Progress>);

/// The blob from this node: its store, containerd's, or a download in flight.
/// With `held_only`, a download in flight does not count. `as_owner`: a download in flight
/// that receives from peers goes on from upstream (see `Download::switch_to_upstream`).
fn local_source(
    app: &App,
    digest: &Digest,
    held_only: bool,
    as_owner: bool,
) -> crate::api::Result<Option<Source>> {
    let stored = app.layout.open_content(digest)?;
    let held = match (stored, &app.containerd) {
        (Some(f), _) => Some(f),
        (None, Some(c)) => c.open(digest)?,
        (None, None) => None,
    };
    if let Some((file, len)) = held {
        return Ok(Some((file, Progress::done(len))));
    }
    if held_only {
        return Ok(None);
    }
    Ok(mirror::in_flight(app, digest)?.map(|(dl, file)| {
        if as_owner {
            dl.switch_to_upstream();
        }
        (file, dl.progress.clone())
    }))
}

/// As the owner: this node's download of the blob, from upstream.
fn start(app: &Arc<App>, get: &PeerGet) -> crate::api::Result<Source> {
    let repo = get
        .repo
        .as_deref()
        .and_then(|r| RepoName::parse(r).ok())
        .ok_or_else(|| ApiError::not_found(Code::BlobUnknown, "no repo= to fetch the blob from"))?;
    let target = app.mirrors.target(&repo, None).ok_or_else(|| {
        ApiError::not_found(
            Code::BlobUnknown,
            format!("{repo} is not a repository of an upstream this node mirrors"),
        )
    })?;
    match mirror::join_or_start(app, &target, &get.digest, Via::Upstream)? {
        Some((dl, file)) => Ok((file, dl.progress.clone())),
        // Published since the first look.
        None => block(|| app.layout.open_content(&get.digest))?
            .map(|(file, len)| (file, Progress::done(len)))
            .ok_or_else(|| ApiError::not_found(Code::BlobUnknown, "blob vanished")),
    }
}

/// A 307 to the peer the owner chose (and `extra` headers).
async fn redirect(io: Prefixed, to: &str, get: &PeerGet, extra: &[(&'static str, String)]) {
    let mut location = format!("{to}/v2/_lighter/peer/blobs/{}?sent_by_owner=1", get.digest);
    if let Some(repo) = &get.repo {
        location.push_str("&repo=");
        location.extend(form_urlencoded::byte_serialize(repo.as_bytes()));
    }
    let mut headers = vec![("location", location)];
    headers.extend(extra.iter().cloned());
    answer_empty(io, hyper::StatusCode::TEMPORARY_REDIRECT, &headers).await;
}

/// An answer without a body, then a close.
async fn answer_empty(io: Prefixed, status: hyper::StatusCode, headers: &[(&'static str, String)]) {
    let mut r = crate::api::empty();
    *r.status_mut() = status;
    for (name, value) in headers {
        crate::api::set(&mut r, name, value);
    }
    crate::api::set(&mut r, "content-length", "0");
    let head = head_bytes(&r);
    let mut tcp = io.into_tcp();
    use tokio::io::AsyncWriteExt;
    let _ = tcp.write_all(&head).await;
    let _ = tcp.shutdown().await;
}

/// The request, if it is a peer's `GET` of a blob with no body.
fn peer_get(head: &[u8]) -> Option<PeerGet> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let held = match req.method {
        Some("GET") => false,
        Some("POST") => true,
        _ => return None,
    };
    let (path, query) = req.path?.split_once('?').unwrap_or((req.path?, ""));
    let Ok(Route::PeerBlob { digest }) = route::parse(path) else {
        return None;
    };
    let mut get = PeerGet {
        held,
        digest,
        repo: None,
        requester: None,
        range: None,
        direct: false,
        sent_by_owner: false,
        held_only: false,
        failed: None,
    };
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return None;
        }
        if h.name.eq_ignore_ascii_case("range") {
            get.range = Some(h.value.to_vec());
        }
        if h.name.eq_ignore_ascii_case(PEER_HEADER) {
            get.requester = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| PeerUrl::parse(v).ok())
                .map(|p| p.as_str().to_owned());
        }
    }
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "repo" => get.repo = Some(v.into_owned()),
            "direct" => get.direct = v == "1",
            "sent_by_owner" => get.sent_by_owner = v == "1",
            "held_only" => get.held_only = v == "1",
            "failed" => get.failed = PeerUrl::parse(&v).ok().map(|p| p.as_str().to_owned()),
            _ => {}
        }
    }
    // A POST is only the report of a held blob.
    if get.held && !form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "held" && v == "1") {
        return None;
    }
    Some(get)
}

/// One transfer to a peer, counted per blob while it runs.
struct Serving<'a> {
    peers: &'a Peers,
    digest: Digest,
}

impl<'a> Serving<'a> {
    /// None when a node the owner sent a peer to already serves that blob to twice
    /// `peer_fanout_max` peers (the owner's picture was off; it will serve the peer itself).
    fn begin(peers: &'a Peers, digest: &Digest, sent_by_owner: bool) -> Option<Serving<'a>> {
        let mut active = peers.active.lock().unwrap_or_else(|p| p.into_inner());
        let n = active.entry(digest.clone()).or_insert(0);
        if sent_by_owner && *n >= peers.fanout_max.saturating_mul(2) {
            if *n == 0 {
                active.remove(digest);
            }
            return None;
        }
        *n += 1;
        Some(Serving {
            peers,
            digest: digest.clone(),
        })
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let mut active = self.peers.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = active.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.digest);
            }
        }
    }
}

/// Transfers to peers running now, per blob.
pub type Active = std::sync::Mutex<HashMap<Digest, u32>>;
