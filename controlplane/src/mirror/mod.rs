//! The pull-through cache. A repository `<upstream>/<path>` (or `<path>` asked with
//! `?ns=<upstream>`) mirrors `<path>` of that upstream. The data plane serves what is cached; its
//! misses and stale tags come here:
//! - tags are resolved upstream with `HEAD` and cached for `tag_ttl_ms`; when upstream is down
//!   the cached digest is served (stale), logged and counted;
//! - manifests are fetched, verified against their digest and published;
//! - blobs are fetched once however many clients ask (single flight): the download is written to
//!   an ingest, each client streams from that file as it grows (first bytes before the blob is
//!   complete), and the blob is published only after its digest is verified. Bad bytes are
//!   discarded and every follower gets an error, never a completed body.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, StatusCode};
use lighter_layout::inline::InlineStr;
use lighter_layout::{Digest, ManifestEntry, Reference, RepoName, Tag, UploadId};
use tokio::sync::watch;

use crate::api::{self, set, Response, Result};
use crate::app::{block, App};
use crate::error::{ApiError, Code};
use crate::metrics::Counters;

pub mod evict;
pub mod follow;
pub mod prefetch;
pub mod upstream;

use upstream::{UpstreamClient, UpstreamError, MANIFEST_ACCEPT};

/// Every configured upstream, and the downloads in flight.
pub struct Mirrors {
    pub upstreams: Vec<UpstreamClient>,
    /// Woken after each completed download, so the size cap is enforced promptly.
    pub downloaded: tokio::sync::Notify,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
}

/// A blob being fetched: the ingest clients read from, and its progress.
pub(crate) struct Download {
    id: UploadId,
    /// The repository it was started for (and links the blob into when it is published).
    name: RepoName,
    pub(crate) progress: watch::Receiver<Progress>,
    /// Its bytes come from peers now (not yet from upstream).
    from_peers: std::sync::atomic::AtomicBool,
    /// Makes a download from peers give them up and go on from upstream.
    to_upstream: tokio::sync::Notify,
}

impl Download {
    /// Waits for its end: verified and published, or failed (why); None if it was abandoned.
    pub(crate) async fn finished(&self) -> Option<std::result::Result<(), String>> {
        let mut progress = self.progress.clone();
        let done = progress.wait_for(|p| p.outcome.is_some()).await.ok()?;
        done.outcome.clone()
    }
}

impl Download {
    /// A peer asks this node, as the blob's owner, for a blob it is itself receiving from
    /// peers: those peers may be fed by that very requester (a chain whose owner died), so the
    /// download goes on from upstream instead, and no cycle can form.
    pub(crate) fn switch_to_upstream(&self) {
        if self.from_peers.load(std::sync::atomic::Ordering::Acquire) {
            self.to_upstream.notify_one();
        }
    }
}

#[derive(Clone, Default)]
pub(crate) struct Progress {
    /// The blob's size, from the first source's answer.
    pub(crate) total: Option<u64>,
    pub(crate) written: u64,
    /// Every byte is in and matches the digest: followers may send the last byte (publication,
    /// with its fsyncs, comes after and does not hold clients up).
    pub(crate) verified: bool,
    /// Set once: Ok when verified and published.
    pub(crate) outcome: Option<std::result::Result<(), String>>,
}

impl Progress {
    /// The progress of a file that is complete and verified (stored content): nothing to wait
    /// for, so no sender is kept (a receiver reads a closed channel's last value).
    pub(crate) fn done(len: u64) -> watch::Receiver<Progress> {
        watch::channel(Progress {
            total: Some(len),
            written: len,
            verified: true,
            outcome: Some(Ok(())),
        })
        .1
    }

    /// How far a follower wanting `..end` may send now: the last byte waits for the verdict, as
    /// a client holding Content-Length bytes would take the body as complete even if the
    /// connection were aborted afterwards.
    fn sendable(&self, end: u64) -> u64 {
        let limit = if self.verified {
            end
        } else {
            end.saturating_sub(1)
        };
        self.written.min(limit)
    }

    /// The download failed before its bytes were verified: followers must abort.
    fn failure(&self) -> Option<&str> {
        match &self.outcome {
            Some(Err(e)) if !self.verified => Some(e),
            _ => None,
        }
    }
}

/// A request for mirrored content: the local repository, the upstream, its repository path.
pub struct Target<'a> {
    pub name: RepoName,
    pub upstream: &'a UpstreamClient,
    pub path: String,
}

impl Mirrors {
    pub fn new(upstreams: Vec<UpstreamClient>) -> Mirrors {
        Mirrors {
            upstreams,
            downloaded: tokio::sync::Notify::new(),
            downloads: Mutex::new(HashMap::new()),
        }
    }

    /// Blob downloads running now.
    pub fn downloads_in_flight(&self) -> usize {
        self.downloads.lock().expect("downloads lock").len()
    }

    /// Same mapping as the data plane's: `?ns=` first, then the name's first component.
    pub fn target(&self, name: &RepoName, ns: Option<&str>) -> Option<Target<'_>> {
        if let Some(up) = ns.and_then(|ns| self.upstreams.iter().find(|u| u.config.name == ns)) {
            let local = RepoName::mirrored(&up.config.name, name)?;
            let path = local.rest().expect("mirrored names have a rest").to_owned();
            return Some(Target {
                name: local,
                upstream: up,
                path,
            });
        }
        let rest = name.rest()?;
        let up = self
            .upstreams
            .iter()
            .find(|u| u.prefix == name.first_component())?;
        Some(Target {
            name: name.clone(),
            upstream: up,
            path: rest.to_owned(),
        })
    }
}

/// `GET`/`HEAD /v2/<name>/manifests/<reference>` of a mirrored repository.
pub async fn manifest(
    app: &App,
    req: &Request<Incoming>,
    t: &Target<'_>,
    reference: &Reference,
) -> Result<Response> {
    ensure_manifest(app, t, reference).await?;
    api::manifests::get(app, req, &t.name, reference)
}

/// Makes the local tag current: fresh → as is; else ask upstream, falling back to the cached
/// digest when upstream is unavailable.
async fn resolve_tag(app: &App, t: &Target<'_>, tag: &Tag) -> Result<()> {
    refresh_tag(app, t, tag, false).await
}

/// [`resolve_tag`], or with `force` (a tag watch) asking upstream whatever the tag's age.
pub(crate) async fn refresh_tag(app: &App, t: &Target<'_>, tag: &Tag, force: bool) -> Result<()> {
    let cached = block(|| app.layout.tag_with_time(&t.name, tag))?;
    let ttl = Duration::from_millis(t.upstream.config.tag_ttl_ms);
    if let Some((_, written)) = &cached {
        if !force && written.elapsed().is_ok_and(|age| age < ttl) {
            return Ok(());
        }
    }
    let path = format!("/v2/{}/manifests/{tag}", t.path);
    match t
        .upstream
        .send(Method::HEAD, &path, &t.path, Some(MANIFEST_ACCEPT))
        .await
    {
        Ok(resp) => {
            let digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Digest::parse(v).ok());
            match digest {
                Some(d) => {
                    if let Some(entry) = block(|| app.layout.manifest(&t.name, &d))? {
                        // Known content: only the tag's time (and maybe its target) changes.
                        block(|| app.layout.put_tag(&t.name, tag, &entry))?;
                        let old = cached.as_ref().map(|(e, _)| &e.digest);
                        if old != Some(&d) {
                            let e = crate::events::Event::new("move_tag")
                                .with("repository", t.name.as_str())
                                .with("reference", tag.as_str())
                                .with("digest", d.to_string())
                                .with_text("old_digest", old)
                                .with("upstream", t.upstream.config.name.as_str());
                            crate::events::record(app, e);
                        }
                    } else {
                        fetch_manifest(app, t, &d.to_string(), Some(&d), Some(tag)).await?;
                    }
                }
                // Upstream gave no digest on HEAD: fetch by tag.
                None => fetch_manifest(app, t, tag.as_str(), None, Some(tag)).await?,
            }
            Ok(())
        }
        Err(UpstreamError::Unavailable(why)) if cached.is_some() => {
            let n = Counters::add(&app.counters.stale_tags_served, 1);
            tracing::warn!(repository = %t.name, %tag, stale_tags_served = n, "{why}; serving the cached tag");
            let digest = block(|| app.layout.tag(&t.name, tag))?.map(|e| e.digest);
            let e = crate::events::Event::new("mirror_stale")
                .with("repository", t.name.as_str())
                .with("reference", tag.as_str())
                .with_text("digest", digest)
                .with("upstream", t.upstream.config.name.as_str())
                .with("error", why);
            crate::events::record(app, e);
            Ok(())
        }
        Err(UpstreamError::Status(StatusCode::NOT_FOUND)) => Err(ApiError::not_found(
            Code::ManifestUnknown,
            format!("{} has no tag {tag} in {}", t.upstream.config.name, t.path),
        )),
        Err(e) => Err(ApiError::not_found(
            Code::ManifestUnknown,
            format!("tag {tag} of {} is not cached, and {e}", t.name),
        )),
    }
}

/// Fetches a manifest by `reference` (tag or digest), verifies it, publishes it (and the tag);
/// logged as a `mirror_fetch`, whatever the outcome.
async fn fetch_manifest(
    app: &App,
    t: &Target<'_>,
    reference: &str,
    expected: Option<&Digest>,
    tag: Option<&Tag>,
) -> Result<()> {
    let old = match tag {
        Some(tag) => block(|| app.layout.tag(&t.name, tag))?.map(|e| e.digest),
        None => None,
    };
    let fetched = fetch_manifest_once(app, t, reference, expected, tag).await;
    let e = crate::events::Event::new("mirror_fetch")
        .with("kind", "manifest")
        .with("upstream", t.upstream.config.name.as_str())
        .with("repository", t.name.as_str())
        .with("reference", reference);
    let e = match &fetched {
        Ok((digest, bytes)) => e
            .with("digest", digest.to_string())
            .with("bytes", *bytes)
            .with("outcome", "cached"),
        Err(err) => e
            .with_text("digest", expected)
            .with("outcome", "failed")
            .with("status", err.status.as_u16())
            .with("error", err.message.clone()),
    };
    crate::events::record(app, e);
    // A tag the fetch moved (upstream's tag now names another digest).
    if let (Some(tag), Ok((digest, _))) = (tag, &fetched) {
        if old.as_ref() != Some(digest) {
            let e = crate::events::Event::new("move_tag")
                .with("repository", t.name.as_str())
                .with("reference", tag.as_str())
                .with("digest", digest.to_string())
                .with_text("old_digest", old)
                .with("upstream", t.upstream.config.name.as_str());
            crate::events::record(app, e);
        }
    }
    fetched.map(|_| ())
}

/// [`fetch_manifest`]'s work: the digest and size of what was published.
async fn fetch_manifest_once(
    app: &App,
    t: &Target<'_>,
    reference: &str,
    expected: Option<&Digest>,
    tag: Option<&Tag>,
) -> Result<(Digest, u64)> {
    let path = format!("/v2/{}/manifests/{reference}", t.path);
    let resp = t
        .upstream
        .send(Method::GET, &path, &t.path, Some(MANIFEST_ACCEPT))
        .await
        .map_err(|e| upstream_error(t, &format!("manifest {reference}"), e))?;
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| lighter_layout::media::strip_parameters(v).to_owned());
    let header_digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    let max = app.config.manifest_size_max_bytes;
    if resp.content_length().is_some_and(|l| l > max) {
        return Err(ApiError::not_found(
            Code::ManifestUnknown,
            format!("upstream manifest {reference} is over manifest_size_max_bytes"),
        ));
    }
    let mut bytes = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            upstream_error(
                t,
                "manifest body",
                UpstreamError::Unavailable(e.to_string()),
            )
        })?;
        if bytes.len() + chunk.len() > max as usize {
            return Err(ApiError::not_found(
                Code::ManifestUnknown,
                format!("upstream manifest {reference} is over manifest_size_max_bytes"),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    let want = expected.or(header_digest.as_ref());
    let digest = Digest::of(
        want.map_or(lighter_layout::Algorithm::Sha256, Digest::algorithm),
        &bytes,
    );
    if want.is_some_and(|w| w != &digest) {
        tracing::error!(repository = %t.name, reference, %digest, "upstream sent a manifest that does not match its digest; discarded");
        return Err(ApiError::not_found(
            Code::ManifestUnknown,
            format!(
                "upstream sent manifest bytes that do not match {}; nothing was cached",
                want.expect("checked")
            ),
        ));
    }
    let inspected =
        lighter_layout::manifest::inspect(&bytes, content_type.as_deref()).map_err(|m| {
            ApiError::not_found(
                Code::ManifestUnknown,
                format!("upstream manifest {reference} is not usable: {m}"),
            )
        })?;
    let entry = ManifestEntry {
        digest: digest.clone(),
        media_type: InlineStr::new(&inspected.media_type)
            .expect("stored media types are short ASCII"),
    };
    block(|| -> std::io::Result<()> {
        let _publishing = app.publishing();
        app.layout.put_content(&digest, &bytes)?;
        app.layout
            .link_manifest(&t.name, &digest, &entry.media_type)?;
        if let Some(tag) = tag {
            app.layout.put_tag(&t.name, tag, &entry)?;
        }
        Ok(())
    })?;
    Counters::add(&app.counters.manifests_fetched, 1);
    tracing::info!(repository = %t.name, %digest, "manifest cached from upstream");
    Ok((digest, bytes.len() as u64))
}

/// Makes a manifest of the mirror local (resolving a tag upstream as a pull would); returns
/// its digest.
pub async fn ensure_manifest(app: &App, t: &Target<'_>, reference: &Reference) -> Result<Digest> {
    match reference {
        Reference::Digest(d) => {
            if block(|| app.layout.manifest(&t.name, d))?.is_none() {
                fetch_manifest(app, t, &d.to_string(), Some(d), None).await?;
            }
            Ok(d.clone())
        }
        Reference::Tag(tag) => {
            resolve_tag(app, t, tag).await?;
            block(|| app.layout.tag(&t.name, tag))?
                .map(|e| e.digest)
                .ok_or_else(|| {
                    ApiError::not_found(
                        Code::ManifestUnknown,
                        format!("tag {tag} of {} vanished", t.name),
                    )
                })
        }
    }
}

/// Content is shared by digest, repositories are not: a blob this node already holds (or is
/// downloading, or containerd holds) for other repositories is linked into (or joined for) a
/// mirrored repository only once upstream says that repository has it. Otherwise anyone who
/// may pull one mirrored repository could read any stored blob by its digest.
pub(crate) async fn upstream_confirms(app: &App, t: &Target<'_>, digest: &Digest) -> Result<()> {
    let held = {
        // Publishing links the blob and ends the download under this lock: looked at together,
        // a download finishing for this very repository is never taken for another's.
        let downloads = app.mirrors.downloads.lock().expect("downloads lock");
        match downloads.get(digest) {
            Some(dl) if dl.name == t.name => return Ok(()),
            Some(_) => true,
            None => {
                // Linked here before (its content since evicted, or only in containerd's
                // store): a member.
                if block(|| app.layout.blob_linked(&t.name, digest))? {
                    return Ok(());
                }
                block(|| app.layout.content_exists(digest))?
                    || app
                        .containerd
                        .as_ref()
                        .is_some_and(|c| matches!(block(|| c.open(digest)), Ok(Some(_))))
            }
        }
    };
    if !held {
        return Ok(());
    }
    let path = format!("/v2/{}/blobs/{digest}", t.path);
    t.upstream
        .send(Method::HEAD, &path, &t.path, None)
        .await
        .map(|_| ())
        .map_err(|e| upstream_error(t, &format!("blob {digest}"), e))
}

/// Makes a blob of the mirror local, waiting for its download; returns its size.
pub async fn ensure_blob(app: &Arc<App>, t: &Target<'_>, digest: &Digest) -> Result<u64> {
    if let Some(size) = block(|| app.layout.blob_size(&t.name, digest))? {
        return Ok(size);
    }
    upstream_confirms(app, t, digest).await?;
    if let Some(size) = block(|| app.link_if_present(&t.name, digest))? {
        return Ok(size);
    }
    let Some((dl, _file)) = join_or_start(app, t, digest, Via::Peers)? else {
        return block(|| app.layout.content_size(digest))?.ok_or_else(|| {
            ApiError::not_found(Code::BlobUnknown, "blob vanished after its download")
        });
    };
    match dl.finished().await {
        Some(Ok(())) => {
            // Another repository's download may have fetched it: link it here too.
            block(|| app.link_if_present(&t.name, digest))?.ok_or_else(|| {
                ApiError::not_found(Code::BlobUnknown, "blob removed right after its download")
            })
        }
        Some(Err(e)) => Err(ApiError::not_found(Code::BlobUnknown, e)),
        None => Err(ApiError::not_found(Code::BlobUnknown, "download abandoned")),
    }
}

/// `GET`/`HEAD /v2/<name>/blobs/<digest>` of a mirrored repository.
pub async fn blob(
    app: &Arc<App>,
    req: &Request<Incoming>,
    t: &Target<'_>,
    digest: &Digest,
) -> Result<Response> {
    if block(|| app.layout.blob_size(&t.name, digest))?.is_some() {
        return api::blobs::get(app, req, &t.name, digest);
    }
    upstream_confirms(app, t, digest).await?;
    if block(|| app.link_if_present(&t.name, digest))?.is_some() {
        // Cached for another repository, and upstream has it in this one: shared.
        return api::blobs::get(app, req, &t.name, digest);
    }
    if req.method() == Method::HEAD {
        let path = format!("/v2/{}/blobs/{digest}", t.path);
        let resp = t
            .upstream
            .send(Method::HEAD, &path, &t.path, None)
            .await
            .map_err(|e| upstream_error(t, &format!("blob {digest}"), e))?;
        let mut r = api::empty();
        set(
            &mut r,
            "content-length",
            &resp.content_length().unwrap_or(0).to_string(),
        );
        set(&mut r, "content-type", lighter_layout::media::OCTET_STREAM);
        set(&mut r, "docker-content-digest", &digest.to_string());
        return Ok(r);
    }
    let Some((dl, file)) = join_or_start(app, t, digest, Via::Peers)? else {
        return api::blobs::get(app, req, &t.name, digest);
    };
    let mut progress = dl.progress.clone();
    let started = progress
        .wait_for(|p| p.total.is_some() || p.outcome.is_some())
        .await
        .map(|p| p.clone())
        .unwrap_or_default();
    let total = match (started.total, &started.outcome) {
        (Some(t), _) => t,
        (None, Some(Ok(()))) => started.written,
        (None, Some(Err(e))) => return Err(ApiError::not_found(Code::BlobUnknown, e.clone())),
        (None, None) => return Err(ApiError::not_found(Code::BlobUnknown, "download ended")),
    };
    let part = api::blobs::requested_part(req, total)?;
    let body = follow(
        file,
        dl.progress.clone(),
        part.start,
        part.start + part.count,
    );
    let r = api::blobs::blob_response(Some(body), digest, &part);
    Ok(r)
}

/// Where a download may get its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Via {
    /// A client of this node missed: ask the blob's owner among the peers (if there are
    /// peers and it is not this node), upstream after them.
    Peers,
    /// A peer asked this node as the blob's owner: upstream only, so requests never travel on
    /// from peer to peer.
    Upstream,
}

/// The download of `digest` in flight, if any, with its ingest opened for reading. Never
/// starts one.
pub(crate) fn in_flight(
    app: &App,
    digest: &Digest,
) -> Result<Option<(Arc<Download>, std::fs::File)>> {
    let downloads = app.mirrors.downloads.lock().expect("downloads lock");
    let Some(dl) = downloads.get(digest) else {
        return Ok(None);
    };
    // The ingest is renamed only under this lock, so it is still there.
    let file = block(|| app.layout.open_ingest_reader(&dl.id))?;
    Ok(Some((dl.clone(), file)))
}

/// The download of `digest` in flight, or a new one, with its ingest opened for reading; None if
/// the blob was published (by a download that finished since the caller looked) and is now
/// linked into the repository.
pub(crate) fn join_or_start(
    app: &Arc<App>,
    t: &Target<'_>,
    digest: &Digest,
    via: Via,
) -> Result<Option<(Arc<Download>, std::fs::File)>> {
    let source = Source::Upstream {
        upstream: t.upstream.config.name.clone(),
        path: t.path.clone(),
        via,
    };
    join_or_start_from(app, &t.name, digest, source)
}

/// Where a download's bytes come from.
pub(crate) enum Source {
    /// A mirrored upstream's repository `path` (through the node tier's peers first, with
    /// [`Via::Peers`]).
    Upstream {
        upstream: String,
        path: String,
        via: Via,
    },
    /// The bucket of `[storage.s3]` (a replica's miss).
    Bucket,
}

/// [`join_or_start`] for any source: the one download of `digest` into this node's store.
pub(crate) fn join_or_start_from(
    app: &Arc<App>,
    repo: &RepoName,
    digest: &Digest,
    source: Source,
) -> Result<Option<(Arc<Download>, std::fs::File)>> {
    let mut downloads = app.mirrors.downloads.lock().expect("downloads lock");
    // Downloads publish under this lock: checked again here, a blob is never fetched twice.
    if block(|| app.link_if_present(repo, digest))?.is_some() {
        return Ok(None);
    }
    if let Some(dl) = downloads.get(digest) {
        // The ingest is renamed only under this lock, so it is still there.
        let file = block(|| app.layout.open_ingest_reader(&dl.id))?;
        return Ok(Some((dl.clone(), file)));
    }
    let id = UploadId::random()?;
    let ingest = block(|| app.layout.create_ingest(repo, &id, digest.algorithm()))?;
    let file = block(|| app.layout.open_ingest_reader(&id))?;
    let (tx, rx) = watch::channel(Progress::default());
    let via_peers = matches!(
        source,
        Source::Upstream {
            via: Via::Peers,
            ..
        }
    );
    let dl = Arc::new(Download {
        id,
        name: repo.clone(),
        progress: rx,
        from_peers: std::sync::atomic::AtomicBool::new(via_peers && app.peers.is_some()),
        to_upstream: tokio::sync::Notify::new(),
    });
    downloads.insert(digest.clone(), dl.clone());
    drop(downloads);
    let app = app.clone();
    let name = repo.clone();
    let digest = digest.clone();
    let this = dl.clone();
    tokio::spawn(async move {
        let counters = &app.counters;
        let mut ingest = ingest;
        let mut from_peers = Vec::new();
        // The data directory failed while peers sent the blob: upstream would fare no better.
        let mut local_failure = None;
        let (upstream_name, path) = match &source {
            Source::Upstream { upstream, path, .. } => (upstream.clone(), path.clone()),
            // Named so in the `mirror_fetch` event.
            Source::Bucket => ("bucket".to_owned(), String::new()),
        };
        if via_peers {
            if let Some(peers) = &app.peers {
                let fetched = crate::peers::fetch::blob(
                    &app,
                    peers,
                    &name,
                    &digest,
                    &mut ingest,
                    &tx,
                    &mut from_peers,
                );
                let switched = tokio::select! {
                    r = fetched => {
                        local_failure = r.err();
                        false
                    }
                    () = this.to_upstream.notified() => true,
                };
                this.from_peers
                    .store(false, std::sync::atomic::Ordering::Release);
                if switched {
                    tracing::info!(%digest, "asked as the owner while receiving from peers: going on from upstream");
                    // A parallel fetch may have written past the verified prefix.
                    if let Err(e) = block(|| ingest.cut()) {
                        tracing::warn!(%digest, "cannot cut the download back: {e}");
                    }
                }
            }
        }
        let complete = tx.borrow().total.is_some_and(|t| t == ingest.len());
        let result = match (complete, local_failure, &source) {
            (true, _, _) => Ok(ingest),
            (false, Some(why), _) => Err((ingest.id().clone(), format!("blob {digest}: {why}"))),
            (false, None, Source::Upstream { .. }) => {
                let up = app
                    .mirrors
                    .upstreams
                    .iter()
                    .find(|u| u.config.name == upstream_name)
                    .expect("configured");
                download(up, &path, &digest, ingest, &tx, counters).await
            }
            (false, None, Source::Bucket) => {
                let bucket = app.bucket.as_ref().expect("a bucket download has a bucket");
                crate::bucket::download(bucket, &digest, ingest, &tx, counters).await
            }
        };
        let verified = result
            .as_ref()
            .is_ok_and(|ingest| ingest.digest() == digest);
        Counters::add(
            match verified {
                true => &counters.blob_downloads_verified,
                false => &counters.blob_downloads_failed,
            },
            1,
        );
        if let Ok(ingest) = &result {
            if verified {
                // Followers finish now; the fsyncs and the rename happen while they do, the
                // slow one outside the downloads lock.
                tx.send_modify(|p| p.verified = true);
                if let Err(e) = block(|| ingest.sync()) {
                    tracing::warn!(%digest, "cannot flush the download: {e}");
                }
            } else if let Some(peers) = &app.peers {
                // Some of the bytes came from peers: one of them lied (or broke). Ask others.
                for p in &from_peers {
                    peers.suspect(p);
                }
            }
        }
        let outcome = {
            let mut downloads = app.mirrors.downloads.lock().expect("downloads lock");
            let outcome = match result {
                Ok(ingest) => {
                    match block(|| {
                        let _publishing = app.publishing();
                        app.layout.commit(ingest, &digest)
                    }) {
                        Ok(()) => Ok(()),
                        Err(lighter_layout::CommitError::DigestMismatch { computed }) => {
                            Counters::add(&counters.blob_digest_mismatches, 1);
                            let source = match from_peers.is_empty() {
                                true => "upstream".to_owned(),
                                false => format!(
                                    "peers {}",
                                    from_peers
                                        .iter()
                                        .map(|p| p.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            };
                            tracing::error!(repository = %name, %digest, %computed, "{source} sent bytes that do not match the digest; discarded");
                            Err(format!("{source} sent bytes that do not match {digest}; nothing was cached"))
                        }
                        Err(lighter_layout::CommitError::Io(e)) => {
                            tracing::warn!(repository = %name, %digest, "download not cached: cannot store the blob: {e}");
                            Err(format!("cannot store the blob: {e}"))
                        }
                    }
                }
                Err((ingest_id, why)) => {
                    // Its clients get an aborted body; the log says why (a full disk, a broken
                    // upstream) for whoever looks into their failed pulls.
                    tracing::warn!(repository = %name, %digest, "download failed, nothing cached: {why}");
                    let _ = block(|| app.layout.remove_ingest(&ingest_id));
                    Err(why)
                }
            };
            downloads.remove(&digest);
            outcome
        };
        let e = crate::events::Event::new("mirror_fetch")
            .with("kind", "blob")
            .with("upstream", upstream_name.as_str())
            .with("repository", name.as_str())
            .with("digest", digest.to_string())
            .with("bytes", tx.borrow().written)
            .with(
                "peers",
                from_peers
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect::<Vec<_>>(),
            );
        let e = match &outcome {
            Ok(()) => e.with("outcome", "cached"),
            Err(why) => e.with("outcome", "failed").with("error", why.as_str()),
        };
        crate::events::record(&app, e);
        if outcome.is_ok() {
            tracing::info!(repository = %name, %digest, "blob cached");
            app.mirrors.downloaded.notify_one();
            if let (Some(peers), false) = (app.peers.clone(), from_peers.is_empty()) {
                let digest = digest.clone();
                tokio::spawn(
                    async move { crate::peers::fetch::report_held(&peers, &digest).await },
                );
            }
        }
        tx.send_modify(|p| {
            p.verified |= outcome.is_ok();
            p.outcome = Some(outcome);
        });
    });
    Ok(Some((dl, file)))
}

/// Streams the upstream blob into the ingest (from the byte it holds: a download that peers
/// could not finish resumes here), publishing progress.
async fn download(
    up: &UpstreamClient,
    path: &str,
    digest: &Digest,
    mut ingest: lighter_layout::Ingest,
    tx: &watch::Sender<Progress>,
    counters: &Counters,
) -> std::result::Result<lighter_layout::Ingest, (UploadId, String)> {
    let id = ingest.id().clone();
    let fail = |why: String| (id.clone(), why);
    let offset = ingest.len();
    let resp = up
        .get_blob(&format!("/v2/{path}/blobs/{digest}"), path, offset)
        .await
        .map_err(|e| fail(format!("blob {digest}: {e}")))?;
    let skip =
        resume(&resp, offset, tx).map_err(|why| fail(format!("blob {digest}: upstream {why}")))?;
    let idle = Duration::from_millis(up.config.body_idle_timeout_ms);
    receive(
        resp.bytes_stream(),
        &mut ingest,
        tx,
        idle,
        skip,
        &counters.blob_fetch_upstream_bytes,
        counters,
    )
    .await
    .map_err(|f| match f {
        Fault::Source(why) => fail(format!("blob {digest}: upstream {why}")),
        Fault::Local(why) => fail(format!("blob {digest}: {why}")),
    })?;
    Ok(ingest)
}

/// Where a blob answer to a request from byte `offset` (`Range` past 0) starts: the bytes of
/// its body to drop (a 200 repeats the blob from its first byte; a 206 must start at
/// `offset`). Records the blob's size in `tx`, which must agree with what earlier sources
/// said.
pub(crate) fn resume(
    resp: &reqwest::Response,
    offset: u64,
    tx: &watch::Sender<Progress>,
) -> std::result::Result<u64, String> {
    let skip = match resp.status() {
        StatusCode::PARTIAL_CONTENT if range_start(resp) != Some(offset) => {
            return Err(format!("answered another range than bytes={offset}-"))
        }
        StatusCode::PARTIAL_CONTENT => 0,
        _ => offset,
    };
    if let Some(total) = blob_total(resp, offset, skip) {
        record_total(tx, total)?;
    }
    Ok(skip)
}

/// Records a blob's size, which must agree with what earlier sources said.
pub(crate) fn record_total(
    tx: &watch::Sender<Progress>,
    total: u64,
) -> std::result::Result<(), String> {
    match tx.borrow().total {
        Some(known) if known != total => {
            return Err(format!("gave the size {total}, earlier sources {known}"))
        }
        _ => {}
    }
    tx.send_modify(|p| p.total = Some(total));
    Ok(())
}

/// The blob's whole size from an answer to a request from `offset` (`skip` bytes of the body
/// to be dropped): Content-Range's total, else offset + Content-Length.
fn blob_total(resp: &reqwest::Response, offset: u64, skip: u64) -> Option<u64> {
    if resp.status() == StatusCode::PARTIAL_CONTENT {
        return resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, t)| t.trim().parse().ok());
    }
    resp.content_length().map(|l| l + offset - skip)
}

/// The first byte of a 206 answer.
pub(crate) fn range_start(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split_once('-'))
        .and_then(|(s, _)| s.trim().parse().ok())
}

/// Why bytes from a source did not all arrive: the source's fault, or this node's.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The source refused, broke, stalled, or sent what it should not.
    Source(String),
    /// The bytes cannot be kept here (the data directory is full or failing): no source is
    /// to blame, and another would fare no better.
    Local(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Source(why) | Fault::Local(why) => f.write_str(why),
        }
    }
}

/// Streams a blob body into the ingest (dropping its first `skip` bytes), publishing progress.
/// Fails if the body pauses longer than `idle`, breaks, or goes past the known total (the
/// source's fault), or cannot be written (this node's). `source` counts the bytes by where
/// they came from.
pub(crate) async fn receive<E: std::fmt::Display>(
    stream: impl futures_util::Stream<Item = std::result::Result<Bytes, E>>,
    ingest: &mut lighter_layout::Ingest,
    tx: &watch::Sender<Progress>,
    idle: Duration,
    mut skip: u64,
    source: &std::sync::atomic::AtomicU64,
    counters: &Counters,
) -> std::result::Result<(), Fault> {
    let total = tx.borrow().total;
    let mut stream = std::pin::pin!(stream);
    // Chunks are small (a few KiB to tens of KiB): write them together (one writev, no copy
    // into a bigger buffer). When the source pauses, a little is held for up to
    // DOWNLOAD_GATHER_MS in case more comes (a slow source trickles: writing and waking every
    // follower per chunk costs more CPU than the bytes); a lot is written at once.
    let mut buf = Pending::default();
    let gather = Duration::from_millis(DOWNLOAD_GATHER_MS);
    let write_failed = |e: std::io::Error| {
        Fault::Local(format!("body cannot be written to the data directory: {e}"))
    };
    loop {
        let next = match futures_util::FutureExt::now_or_never(stream.next()) {
            Some(n) => n,
            None => {
                let early = if buf.bytes > 0 && buf.bytes < DOWNLOAD_EAGER_BYTES {
                    tokio::time::timeout(gather, stream.next()).await.ok()
                } else {
                    None
                };
                match early {
                    Some(n) => n,
                    None => {
                        flush(ingest, &mut buf, tx).map_err(write_failed)?;
                        match tokio::time::timeout(idle, stream.next()).await {
                            Ok(n) => n,
                            Err(_) => {
                                return Err(Fault::Source(format!(
                                    "stalled for {} ms",
                                    idle.as_millis()
                                )))
                            }
                        }
                    }
                }
            }
        };
        let mut chunk = match next {
            None => break,
            Some(Err(e)) => return Err(Fault::Source(format!("body broke: {e}"))),
            Some(Ok(c)) => c,
        };
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            skip -= n;
            chunk = chunk.slice(n as usize..);
            if chunk.is_empty() {
                continue;
            }
        }
        if total.is_some_and(|t| ingest.len() + (buf.bytes + chunk.len()) as u64 > t) {
            return Err(Fault::Source("sent more than the blob's size".into()));
        }
        Counters::add(&counters.blob_download_bytes, chunk.len() as u64);
        Counters::add(source, chunk.len() as u64);
        buf.bytes += chunk.len();
        buf.chunks.push(chunk);
        if buf.bytes >= DOWNLOAD_WRITE_BYTES {
            flush(ingest, &mut buf, tx).map_err(write_failed)?;
        }
    }
    flush(ingest, &mut buf, tx).map_err(write_failed)?;
    if total.is_some_and(|t| ingest.len() < t) {
        return Err(Fault::Source(format!(
            "ended early, at byte {} of {}",
            ingest.len(),
            total.unwrap_or(0)
        )));
    }
    Ok(())
}

/// Bytes gathered from upstream before a write to the ingest.
const DOWNLOAD_WRITE_BYTES: usize = 512 << 10;
/// Gathered bytes written as soon as upstream pauses; fewer wait up to DOWNLOAD_GATHER_MS.
const DOWNLOAD_EAGER_BYTES: usize = 128 << 10;
const DOWNLOAD_GATHER_MS: u64 = 2;

/// Upstream chunks received and not yet written.
#[derive(Default)]
struct Pending {
    chunks: Vec<Bytes>,
    bytes: usize,
}

/// Writes what was gathered and tells the followers.
fn flush(
    ingest: &mut lighter_layout::Ingest,
    buf: &mut Pending,
    tx: &watch::Sender<Progress>,
) -> std::io::Result<()> {
    if buf.chunks.is_empty() {
        return Ok(());
    }
    let pieces: Vec<&[u8]> = buf.chunks.iter().map(|c| &c[..]).collect();
    // A page-cache write, but it may sleep in dirty-page throttling: not on a worker.
    block(|| ingest.write_pieces(&pieces))?;
    drop(pieces);
    buf.chunks.clear();
    buf.bytes = 0;
    let written = ingest.len();
    tx.send_modify(|p| p.written = written);
    Ok(())
}

/// A body that reads `start..end` of a file being written, as far as `progress` says it is,
/// waiting for more; it fails if the download fails, so no client completes a bad body.
pub(crate) fn follow(
    file: std::fs::File,
    progress: watch::Receiver<Progress>,
    start: u64,
    end: u64,
) -> api::Body {
    /// Largest read per body frame.
    const CHUNK_BYTES: u64 = 512 << 10;
    struct State {
        file: Arc<std::fs::File>,
        progress: watch::Receiver<Progress>,
        pos: u64,
        finished: bool,
    }
    let state = State {
        file: Arc::new(file),
        progress,
        pos: start,
        finished: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut st| async move {
        if st.finished {
            return None;
        }
        let fail = |mut st: State, e: String| {
            st.finished = true;
            Some((Err(std::io::Error::other(e)), st))
        };
        // Wait for bytes past `pos`, or for the verdict.
        let available = loop {
            let p = st.progress.borrow_and_update().clone();
            if let Some(e) = p.failure() {
                return fail(st, e.to_owned());
            }
            // All bytes sent and verified: end cleanly.
            if p.verified && st.pos >= end {
                return None;
            }
            let sendable = p.sendable(end);
            if sendable > st.pos {
                break sendable;
            }
            if p.outcome.is_some() {
                return fail(st, "download ended before the requested bytes".into());
            }
            if st.progress.changed().await.is_err() {
                return fail(st, "download abandoned".into());
            }
        };
        let n = (available - st.pos).min(CHUNK_BYTES) as usize;
        // Page-cache reads of bytes just written: cheaper in place than on the blocking pool.
        let read = block(|| {
            let mut buf = vec![0u8; n];
            std::os::unix::fs::FileExt::read_exact_at(&*st.file, &mut buf, st.pos)
                .map(|()| Bytes::from(buf))
        });
        match read {
            Ok(bytes) => {
                st.pos += n as u64;
                Some((Ok(Frame::data(bytes)), st))
            }
            Err(e) => fail(st, e.to_string()),
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn upstream_error(t: &Target<'_>, what: &str, e: UpstreamError) -> ApiError {
    // 404 for everything: containerd moves on to the next host (or the origin) on any 4xx.
    ApiError::not_found(
        match what.starts_with("blob") {
            true => Code::BlobUnknown,
            false => Code::ManifestUnknown,
        },
        format!(
            "{what} of {} is not cached and could not be fetched: {e}",
            t.name
        ),
    )
}
