//! The replicated mode (`[storage.s3]`): an S3-compatible bucket is the durable store of every
//! repository outside the mirrors, and each replica's data directory a bounded cache of it,
//! which the data plane serves as always.
//!
//! - Pushes: a blob goes to the bucket (one PUT, or a multipart upload in
//!   `part_size_bytes` parts streamed from the ingest file) and is linked there before it is
//!   committed locally and acknowledged; a manifest's content and link, then its tags, likewise.
//!   The bucket failing fails the push with 503 `UNAVAILABLE`; nothing is acknowledged that
//!   the bucket does not hold.
//! - Misses (handed over by the data plane, as a mirror's are): a blob linked in the bucket is
//!   downloaded once however many clients ask (the mirror's single flight, `mirror::Source::
//!   Bucket`), streamed to them while it arrives, published after its digest is verified; a
//!   manifest is fetched and verified by digest; a tag older than `tag_ttl_ms` is read again
//!   from the bucket (served stale, with a warning, while the bucket is down).
//!
//! What the bucket must offer: a PUT that replaces an object whole (readers see the old or the
//! new object, never part of one) and read-after-write of a new object. Conditional writes are
//! not needed, and not used: Garage ignores `If-None-Match`/`If-Match` on PUT. Content and
//! links are content addressed (two replicas writing one key write the same bytes); a tag is
//! one object, so two replicas pushing one tag at once leave the last PUT's value, whole, in
//! the bucket, and every replica converges on it within `tag_ttl_ms`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use lighter_layout::bucket as keys;
use lighter_layout::{Digest, ManifestEntry, Reference, RepoName, Tag, UploadId};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use tokio::sync::watch;

use crate::api::{self, set, Response, Result};
use crate::app::{block, App};
use crate::config::S3;
use crate::error::{ApiError, Code};
use crate::metrics::Counters;
use crate::mirror::Progress;

mod gc;
pub mod journal;
pub use gc::{settle, BucketReport};

/// Parts of one multipart upload sent at once; with the part being filled, a push holds at
/// most this many plus one `part_size_bytes` in memory.
pub const S3_PARTS_IN_FLIGHT: usize = 2;
/// Bytes read from an ingest file per step of an upload.
const READ_BYTES: usize = 1 << 20;

/// The bucket and the two clients that reach it.
pub struct Bucket {
    /// Requests bounded by `request_timeout_ms` as a whole.
    store: Arc<dyn ObjectStore>,
    /// Blob downloads: no bound on the whole (a large blob takes its time), each pause bounded
    /// by `body_idle_timeout_ms` where the body is read.
    streams: Arc<dyn ObjectStore>,
    pub config: S3,
}

impl Bucket {
    pub fn new(c: &S3) -> std::result::Result<Bucket, String> {
        let key_id = credential(
            c.access_key_id_file.as_deref(),
            "AWS_ACCESS_KEY_ID",
            "access_key_id_file",
        )?;
        let secret = credential(
            c.secret_access_key_file.as_deref(),
            "AWS_SECRET_ACCESS_KEY",
            "secret_access_key_file",
        )?;
        let ca = match &c.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("storage.s3.ca_file {}: cannot read: {e}", path.display())
                })?;
                object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    format!(
                        "storage.s3.ca_file {}: not PEM certificates: {e}",
                        path.display()
                    )
                })?
            }
            None => Vec::new(),
        };
        let build = |timeout: Option<Duration>| {
            let mut options = ClientOptions::new()
                .with_connect_timeout(Duration::from_millis(c.connect_timeout_ms))
                .with_allow_http(
                    c.endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                );
            options = match timeout {
                Some(t) => options.with_timeout(t),
                None => options.with_timeout_disabled(),
            };
            for cert in &ca {
                options = options.with_root_certificate(cert.clone());
            }
            let retry = RetryConfig {
                backoff: Default::default(),
                max_retries: c.retries_max,
                retry_timeout: Duration::from_millis(c.request_timeout_ms),
            };
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&c.bucket)
                .with_region(&c.region)
                .with_access_key_id(&key_id)
                .with_secret_access_key(&secret)
                .with_virtual_hosted_style_request(!c.path_style)
                .with_client_options(options)
                .with_retry(retry);
            if let Some(endpoint) = &c.endpoint {
                b = b.with_endpoint(endpoint);
            }
            if let Ok(token) = std::env::var("AWS_SESSION_TOKEN") {
                b = b.with_token(token);
            }
            b.build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| format!("storage.s3: {e}"))
        };
        Ok(Bucket {
            store: build(Some(Duration::from_millis(c.request_timeout_ms)))?,
            streams: build(None)?,
            config: c.clone(),
        })
    }

    fn unavailable(&self, what: &str, e: object_store::Error) -> ApiError {
        tracing::warn!(bucket = self.config.bucket, "cannot {what}: {e}");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            format!(
                "the object store (bucket {}) cannot {what}: {e}; nothing was acknowledged, try again",
                self.config.bucket
            ),
        )
        .with_header("retry-after", "5".into())
    }

    /// The size of the object at `key`; None if there is none.
    async fn size(&self, key: String) -> Result<Option<u64>> {
        match self.store.head(&Path::from(key.as_str())).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unavailable(&format!("look up {key}"), e)),
        }
    }

    /// A small object whole (at most `max` bytes); None if there is none.
    async fn small(&self, key: String, max: u64) -> Result<Option<Bytes>> {
        let got = match self.store.get(&Path::from(key.as_str())).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable(&format!("read {key}"), e)),
        };
        if got.meta.size > max {
            return Err(ApiError::internal(
                "bucket",
                format!("{key} is {} bytes, over {max}", got.meta.size),
            ));
        }
        got.bytes()
            .await
            .map(Some)
            .map_err(|e| self.unavailable(&format!("read {key}"), e))
    }

    async fn put(&self, key: String, bytes: Bytes) -> Result<()> {
        self.store
            .put(&Path::from(key.as_str()), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(&format!("store {key}"), e))
    }

    /// Stores a blob read from `file` (`len` bytes, already verified to be `digest`), unless
    /// the bucket has it (then touched, for garbage collection: see `gc.rs`): one PUT, or a
    /// multipart upload streamed in `part_size_bytes` parts.
    pub async fn put_blob(&self, file: std::fs::File, len: u64, digest: &Digest) -> Result<()> {
        let key = keys::content_key(digest);
        if self.touch(digest).await? {
            return Ok(());
        }
        let part = self.config.part_size_bytes;
        if len <= part {
            let mut buf = vec![0u8; len as usize];
            block(|| std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0))?;
            return self.put(key, Bytes::from(buf)).await;
        }
        let path = Path::from(key.as_str());
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.unavailable(&format!("start uploading {key}"), e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part as usize);
        let mut buf = vec![0u8; READ_BYTES];
        let mut offset = 0u64;
        let sent = async {
            while offset < len {
                w.wait_for_capacity(S3_PARTS_IN_FLIGHT).await?;
                let n = (len - offset).min(READ_BYTES as u64) as usize;
                block(|| std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf[..n], offset))
                    .map_err(|e| object_store::Error::Generic {
                    store: "ingest",
                    source: Box::new(e),
                })?;
                w.write(&buf[..n]);
                offset += n as u64;
            }
            Ok::<_, object_store::Error>(())
        }
        .await;
        match sent {
            Ok(()) => w
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| self.unavailable(&format!("store {key}"), e)),
            Err(e) => {
                let _ = w.abort().await;
                Err(self.unavailable(&format!("store {key}"), e))
            }
        }
    }

    /// Puts a blob stored in the bucket in a repository there.
    pub async fn link_blob(&self, name: &RepoName, digest: &Digest) -> Result<()> {
        self.put(keys::blob_link_key(name, digest), Bytes::new())
            .await
    }

    /// Whether the repository holds the blob in the bucket.
    pub async fn blob_linked(&self, name: &RepoName, digest: &Digest) -> Result<bool> {
        Ok(self
            .size(keys::blob_link_key(name, digest))
            .await?
            .is_some())
    }

    /// The size of content in the bucket; None if it is not there.
    pub async fn content_size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.size(keys::content_key(digest)).await
    }

    /// Stores a manifest's bytes (verified to be `digest`) and links it into the repository.
    pub async fn put_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<()> {
        self.put(keys::content_key(digest), bytes).await?;
        self.put(
            keys::manifest_link_key(name, digest),
            Bytes::from(format!("{media_type}\n")),
        )
        .await
    }

    /// A manifest of the repository in the bucket: its media type and bytes, the bytes
    /// verified against `digest`; None if the repository does not hold it.
    pub async fn manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<(ManifestEntry, Bytes)>> {
        let key = keys::manifest_link_key(name, digest);
        let Some(link) = self.small(key.clone(), 4096).await? else {
            return Ok(None);
        };
        let media_type = keys::parse_manifest_link(&link)
            .ok_or_else(|| ApiError::internal("bucket", format!("{key} is not a manifest link")))?;
        let Some(bytes) = self.small(keys::content_key(digest), max).await? else {
            return Err(ApiError::internal(
                "bucket",
                format!("{key} links content the bucket does not hold"),
            ));
        };
        let computed = Digest::of(digest.algorithm(), &bytes);
        if &computed != digest {
            return Err(ApiError::internal(
                "bucket",
                format!("the bucket's {digest} holds bytes of digest {computed}"),
            ));
        }
        let entry = ManifestEntry {
            digest: digest.clone(),
            media_type,
        };
        Ok(Some((entry, bytes)))
    }

    pub async fn put_tag(&self, name: &RepoName, tag: &Tag, entry: &ManifestEntry) -> Result<()> {
        self.put(
            keys::tag_key(name, tag),
            Bytes::from(keys::tag_record(entry)),
        )
        .await
    }

    /// The manifest a tag names in the bucket; None if the bucket has no such tag.
    pub async fn tag(&self, name: &RepoName, tag: &Tag) -> Result<Option<ManifestEntry>> {
        let key = keys::tag_key(name, tag);
        let Some(bytes) = self.small(key.clone(), 4096).await? else {
            return Ok(None);
        };
        keys::parse_tag_record(&bytes)
            .map(Some)
            .ok_or_else(|| ApiError::internal("bucket", format!("{key} is not a tag record")))
    }
}

impl Bucket {
    async fn delete(&self, key: String) -> Result<()> {
        match self.store.delete(&Path::from(key.as_str())).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable(&format!("delete {key}"), e)),
        }
    }

    /// The repository's tags in the bucket, sorted.
    pub async fn tag_names(&self, name: &RepoName) -> Result<Vec<String>> {
        let prefix = keys::tags_prefix(name);
        let prefix = Path::from(prefix.trim_end_matches('/'));
        let mut listed = self.store.list(Some(&prefix));
        let mut names = Vec::new();
        while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
            let meta = meta.map_err(|e| self.unavailable(&format!("list {prefix}"), e))?;
            if let Some(tag) = meta.location.filename() {
                names.push(tag.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes a blob from a repository in the bucket (its content stays); whether it was
    /// there.
    pub async fn unlink_blob(&self, name: &RepoName, digest: &Digest) -> Result<bool> {
        let found = self.blob_linked(name, digest).await?;
        self.delete(keys::blob_link_key(name, digest)).await?;
        Ok(found)
    }

    /// Removes a tag from the bucket; whether it was there.
    pub async fn delete_tag(&self, name: &RepoName, tag: &Tag) -> Result<bool> {
        let key = keys::tag_key(name, tag);
        let found = self.size(key.clone()).await?.is_some();
        self.delete(key).await?;
        Ok(found)
    }

    /// Removes a manifest from a repository in the bucket, the tags naming it first (no tag
    /// names a missing manifest); its content stays. Whether it was there.
    pub async fn unlink_manifest(&self, name: &RepoName, digest: &Digest) -> Result<bool> {
        let key = keys::manifest_link_key(name, digest);
        let found = self.size(key.clone()).await?.is_some();
        for t in self.tag_names(name).await? {
            let Ok(tag) = Tag::parse(&t) else { continue };
            if self
                .tag(name, &tag)
                .await?
                .is_some_and(|e| &e.digest == digest)
            {
                self.delete(keys::tag_key(name, &tag)).await?;
            }
        }
        self.delete(key).await?;
        Ok(found)
    }
}

/// A credential from the file named in the config, else the environment variable.
fn credential(
    file: Option<&std::path::Path>,
    env: &str,
    field: &str,
) -> std::result::Result<String, String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("storage.s3.{field} {}: cannot read: {e}", path.display()))?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_owned());
    }
    std::env::var(env).map_err(|_| {
        format!("storage.s3 needs credentials: set {env}, or name a file in storage.s3.{field}")
    })
}

/// Streams a blob from the bucket into the ingest (from the byte it holds), publishing
/// progress; the mirror's download verifies and publishes it after.
pub(crate) async fn download(
    bucket: &Bucket,
    digest: &Digest,
    mut ingest: lighter_layout::Ingest,
    tx: &watch::Sender<Progress>,
    counters: &Counters,
) -> std::result::Result<lighter_layout::Ingest, (UploadId, String)> {
    let id = ingest.id().clone();
    let fail = |why: String| (id.clone(), format!("blob {digest}: bucket {why}"));
    let offset = ingest.len();
    let key = keys::content_key(digest);
    let options = GetOptions {
        range: (offset > 0).then_some(GetRange::Offset(offset)),
        ..Default::default()
    };
    let got = bucket
        .streams
        .get_opts(&Path::from(key.as_str()), options)
        .await
        .map_err(|e| fail(e.to_string()))?;
    crate::mirror::record_total(tx, got.meta.size).map_err(fail)?;
    let idle = Duration::from_millis(bucket.config.body_idle_timeout_ms);
    crate::mirror::receive(
        got.into_stream(),
        &mut ingest,
        tx,
        idle,
        0,
        &counters.blob_fetch_bucket_bytes,
        counters,
    )
    .await
    .map_err(|f| match f {
        crate::mirror::Fault::Source(why) => fail(why),
        crate::mirror::Fault::Local(why) => (id.clone(), format!("blob {digest}: {why}")),
    })?;
    Ok(ingest)
}

/// `GET`/`HEAD` of a blob the data plane did not find (a miss of this replica's cache).
pub async fn blob(
    app: &Arc<App>,
    bucket: &Bucket,
    req: &Request<Incoming>,
    name: &RepoName,
    digest: &Digest,
) -> Result<Response> {
    if held_here(app, bucket, name, digest).await? {
        return api::blobs::get(app, req, name, digest);
    }
    if block(|| app.link_if_present(name, digest))?.is_some() {
        return api::blobs::get(app, req, name, digest);
    }
    if req.method() == Method::HEAD {
        let Some(size) = bucket.content_size(digest).await? else {
            return Err(ApiError::not_found(
                Code::BlobUnknown,
                format!("blob {digest} is linked in the bucket but its content is missing"),
            ));
        };
        let mut r = api::empty();
        set(&mut r, "content-length", &size.to_string());
        set(&mut r, "content-type", lighter_layout::media::OCTET_STREAM);
        set(&mut r, "docker-content-digest", &digest.to_string());
        return Ok(r);
    }
    let started =
        crate::mirror::join_or_start_from(app, name, digest, crate::mirror::Source::Bucket)?;
    let Some((dl, file)) = started else {
        return api::blobs::get(app, req, name, digest);
    };
    let total = first_total(bucket, &dl).await?;
    let part = api::blobs::requested_part(req, total)?;
    let body = crate::mirror::follow(
        file,
        dl.progress.clone(),
        part.start,
        part.start + part.count,
    );
    Ok(api::blobs::blob_response(Some(body), digest, &part))
}

/// Whether this replica holds blob `digest` of `name` (serve it from the cache). If not, the
/// repository must hold it here (a link whose content was evicted) or in the bucket, else 404:
/// repository isolation holds for misses too.
pub(crate) async fn held_here(
    app: &App,
    bucket: &Bucket,
    name: &RepoName,
    digest: &Digest,
) -> Result<bool> {
    if block(|| app.layout.blob_size(name, digest))?.is_some() {
        return Ok(true);
    }
    if !block(|| app.layout.blob_linked(name, digest))? && !bucket.blob_linked(name, digest).await?
    {
        return Err(ApiError::not_found(
            Code::BlobUnknown,
            format!("blob {digest} is not in repository {name}"),
        ));
    }
    Ok(false)
}

/// The size of a blob downloading from the bucket, once the bucket's first answer is in; a
/// download that failed before it is the bucket's failure: 503.
pub(crate) async fn first_total(bucket: &Bucket, dl: &crate::mirror::Download) -> Result<u64> {
    let first = dl
        .progress
        .clone()
        .wait_for(|p| p.total.is_some() || p.outcome.is_some())
        .await
        .map(|p| p.clone())
        .unwrap_or_default();
    match (first.total, &first.outcome) {
        (Some(t), _) => Ok(t),
        (None, Some(Ok(()))) => Ok(first.written),
        (None, Some(Err(e))) => Err(fetch_failed(bucket, e)),
        (None, None) => Err(fetch_failed(bucket, "download ended")),
    }
}

/// Makes a blob of the repository local from the bucket, waiting for the whole download (for
/// the admission checks, which read it from disk); its size.
pub async fn ensure_blob(
    app: &Arc<App>,
    bucket: &Bucket,
    name: &RepoName,
    digest: &Digest,
) -> Result<u64> {
    if held_here(app, bucket, name, digest).await? {
        if let Some(size) = block(|| app.layout.blob_size(name, digest))? {
            return Ok(size);
        }
    }
    if let Some((dl, _file)) =
        crate::mirror::join_or_start_from(app, name, digest, crate::mirror::Source::Bucket)?
    {
        match dl.finished().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(fetch_failed(bucket, &e)),
            None => return Err(fetch_failed(bucket, "download abandoned")),
        }
    }
    // Published by this download or another repository's: linked here too.
    block(|| app.link_if_present(name, digest))?
        .ok_or_else(|| fetch_failed(bucket, "the blob was not published after its download"))
}

pub(crate) fn fetch_failed(bucket: &Bucket, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Code::Unavailable,
        format!(
            "the blob is not cached here and the object store (bucket {}) could not supply it: {why}",
            bucket.config.bucket
        ),
    )
    .with_header("retry-after", "5".into())
}

/// `GET`/`HEAD` of a manifest the data plane did not find, or of a tag it found stale.
pub async fn manifest(
    app: &Arc<App>,
    bucket: &Bucket,
    req: &Request<Incoming>,
    name: &RepoName,
    reference: &Reference,
) -> Result<Response> {
    match reference {
        Reference::Digest(d) => ensure_manifest(app, bucket, name, d).await?,
        Reference::Tag(tag) => resolve_tag(app, bucket, name, tag).await?,
    }
    api::manifests::get(app, req, name, reference)
}

/// Makes a manifest of the repository local: from the bucket if the cache lacks it.
async fn ensure_manifest(app: &App, bucket: &Bucket, name: &RepoName, d: &Digest) -> Result<()> {
    let cached = block(|| -> std::io::Result<bool> {
        Ok(app.layout.manifest(name, d)?.is_some() && app.layout.content_exists(d)?)
    })?;
    if cached {
        return Ok(());
    }
    let max = app.config.manifest_size_max_bytes;
    let Some((entry, bytes)) = bucket.manifest(name, d, max).await? else {
        return Err(ApiError::not_found(
            Code::ManifestUnknown,
            format!("manifest {d} is not in repository {name}"),
        ));
    };
    block(|| -> std::io::Result<()> {
        let _publishing = app.publishing();
        app.layout.put_content(d, &bytes)?;
        app.layout.link_manifest(name, d, &entry.media_type)
    })?;
    Counters::add(&app.counters.manifests_fetched, 1);
    tracing::debug!(repository = %name, digest = %d, "manifest cached from the bucket");
    Ok(())
}

/// Makes the local tag current: younger than `tag_ttl_ms` → as is; else as the bucket says
/// (the cached value, stale, while the bucket is unavailable).
///
/// Stale while revalidating: a stale cached value is first written again as it is (fresh for
/// another `tag_ttl_ms`), so the pulls that arrive while the bucket is read are served it by
/// the data plane instead of all being handed over to wait for the same read. A tag moved
/// through another replica is thus served here within `tag_ttl_ms` plus one read of the
/// bucket (and, while the bucket cannot be read, the cached value for another TTL each try).
async fn resolve_tag(app: &App, bucket: &Bucket, name: &RepoName, tag: &Tag) -> Result<()> {
    let ttl = Duration::from_millis(bucket.config.tag_ttl_ms);
    let fresh = |written: &std::time::SystemTime| written.elapsed().is_ok_and(|age| age < ttl);
    let cached = block(|| app.layout.tag_with_time(name, tag))?;
    if cached.as_ref().is_some_and(|(_, w)| fresh(w)) {
        return Ok(());
    }
    // Read again under the lock: another request may have refreshed it meanwhile (None), or
    // it is written again as it is (Some: its digest) or absent (Some(None)).
    let revalidating = block(|| -> std::io::Result<Option<Option<Digest>>> {
        let _publishing = app.publishing();
        let _tags = app.tag_writes(name);
        match app.layout.tag_with_time(name, tag)? {
            Some((_, written)) if fresh(&written) => Ok(None),
            Some((entry, _)) => {
                app.layout.put_tag(name, tag, &entry)?;
                Ok(Some(Some(entry.digest)))
            }
            None => Ok(Some(None)),
        }
    })?;
    match revalidating {
        None => Ok(()),
        Some(old) => reread_tag(app, bucket, name, tag, old).await,
    }
}

/// The tag as the bucket says now: cached here with its manifest, removed here if the bucket
/// has it no more (404), or, while the bucket is unavailable, the cached value kept.
async fn reread_tag(
    app: &App,
    bucket: &Bucket,
    name: &RepoName,
    tag: &Tag,
    old: Option<Digest>,
) -> Result<()> {
    match bucket.tag(name, tag).await {
        Ok(Some(entry)) => {
            ensure_manifest(app, bucket, name, &entry.digest).await?;
            block(|| {
                let _publishing = app.publishing();
                let _tags = app.tag_writes(name);
                app.layout.put_tag(name, tag, &entry)
            })?;
            if old.as_ref() != Some(&entry.digest) {
                let e = crate::events::Event::new("move_tag")
                    .with("repository", name.as_str())
                    .with("reference", tag.as_str())
                    .with("digest", entry.digest.to_string())
                    .with_text("old_digest", old)
                    .with("source", "bucket");
                crate::events::record(app, e);
            }
            Ok(())
        }
        Ok(None) => {
            // Deleted through another replica (a push writes the bucket first).
            if old.is_some() {
                block(|| app.layout.delete_tag(name, tag))?;
            }
            Err(ApiError::not_found(
                Code::ManifestUnknown,
                format!("tag {tag} is not in repository {name}"),
            ))
        }
        Err(e) if old.is_some() && e.status == StatusCode::SERVICE_UNAVAILABLE => {
            let n = Counters::add(&app.counters.stale_tags_served, 1);
            tracing::warn!(repository = %name, %tag, stale_tags_served = n, "{}; serving the cached tag", e.message);
            let e = crate::events::Event::new("bucket_stale")
                .with("repository", name.as_str())
                .with("reference", tag.as_str())
                .with_text("digest", old)
                .with("error", e.message);
            crate::events::record(app, e);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The references of a manifest being pushed that this replica's cache lacks but the bucket
/// holds in the repository (pushed through another replica): linked here, their content
/// fetched when pulled. Returns the digests still missing.
pub async fn adopt_references(
    app: &App,
    bucket: &Bucket,
    name: &RepoName,
    index: bool,
    missing: Vec<Digest>,
) -> Result<Vec<Digest>> {
    let mut still = Vec::new();
    for d in missing {
        if index {
            match ensure_manifest(app, bucket, name, &d).await {
                Ok(()) => continue,
                Err(e) if e.status == StatusCode::NOT_FOUND => still.push(d),
                Err(e) => return Err(e),
            }
        } else if bucket.blob_linked(name, &d).await? {
            block(|| {
                let _publishing = app.publishing();
                app.layout.link_blob(name, &d)
            })?;
        } else {
            still.push(d);
        }
    }
    Ok(still)
}

/// Most levels of repository names the catalog's walk of the bucket descends (as the data
/// directory's walk).
const CATALOG_DEPTH_MAX: usize = 128;
/// Referrer records read from the bucket at once.
const REFERRERS_IN_FLIGHT: usize = 8;

impl Bucket {
    /// Every repository the bucket holds, sorted; with `last`, those after it (and perhaps a
    /// few before: subtrees wholly at or before `last` are not listed). One LIST per level of
    /// each name: a prefix under `repos/` is a repository when a link folder is below it.
    pub async fn repositories(&self, last: Option<&str>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut pending = vec![(String::new(), 0usize)];
        while let Some((name, depth)) = pending.pop() {
            let prefix = Path::from(format!("{}{name}", keys::REPOS_PREFIX).trim_end_matches('/'));
            let listed = self
                .store
                .list_with_delimiter(Some(&prefix))
                .await
                .map_err(|e| self.unavailable(&format!("list {prefix}"), e))?;
            let mut is_repository = false;
            for child in &listed.common_prefixes {
                let Some(part) = child.filename() else {
                    continue;
                };
                if part.starts_with('_') {
                    is_repository |= keys::LINK_FOLDERS.contains(&part);
                    continue;
                }
                let child_name = if name.is_empty() {
                    part.to_owned()
                } else {
                    format!("{name}/{part}")
                };
                if depth < CATALOG_DEPTH_MAX && !wholly_before(&child_name, last) {
                    pending.push((child_name, depth + 1));
                }
            }
            if is_repository && RepoName::parse(&name).is_ok() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether the bucket holds the repository (a link folder below its prefix): a
    /// repository of blobs and untagged manifests has an empty tag list, not an unknown name.
    pub async fn holds_repository(&self, name: &RepoName) -> Result<bool> {
        let prefix = Path::from(format!("{}{name}", keys::REPOS_PREFIX).as_str());
        let listed = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.unavailable(&format!("list {prefix}"), e))?;
        Ok(listed.common_prefixes.iter().any(|p| {
            p.filename()
                .is_some_and(|f| keys::LINK_FOLDERS.contains(&f))
        }))
    }

    /// Records the descriptor (JSON) of a manifest whose subject is `subject`.
    pub async fn put_referrer(
        &self,
        name: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: Bytes,
    ) -> Result<()> {
        self.put(keys::referrer_key(name, subject, referrer), descriptor)
            .await
    }

    /// Removes a referrer record (whether it was there or not).
    pub async fn delete_referrer(
        &self,
        name: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> Result<()> {
        self.delete(keys::referrer_key(name, subject, referrer))
            .await
    }

    /// The records (JSON descriptors) of the subject's referrers in the repository, ordered by
    /// referrer digest; with `last`, only those after that digest.
    pub async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        last: Option<&str>,
    ) -> Result<Vec<Vec<u8>>> {
        let prefix = keys::referrers_prefix(name, subject);
        let prefix = Path::from(prefix.trim_end_matches('/'));
        let mut listed = self.store.list(Some(&prefix));
        let mut found = Vec::new();
        while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
            let meta = meta.map_err(|e| self.unavailable(&format!("list {prefix}"), e))?;
            let Some(referrer) = meta.location.filename().and_then(keys::referrer_of_key) else {
                continue;
            };
            if last.is_some_and(|l| referrer.to_string().as_str() <= l) {
                continue;
            }
            found.push((referrer.to_string(), meta.location.to_string()));
        }
        found.sort();
        let reads = found
            .into_iter()
            .map(|(_, key)| async move { self.small(key, 1 << 20).await });
        let records: Vec<Result<Option<Bytes>>> =
            futures_util::StreamExt::collect(futures_util::StreamExt::buffered(
                futures_util::stream::iter(reads),
                REFERRERS_IN_FLIGHT,
            ))
            .await;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            // One deleted between the listing and its read is simply gone.
            if let Some(bytes) = r? {
                out.push(bytes.to_vec());
            }
        }
        Ok(out)
    }
}

/// Admission on a replica: the checks of `[[admission.require]]` and of presence read this
/// replica's cache, so what they read of an image kept in the bucket is made local first: its
/// tag as the bucket says and its manifest; with `referrers`, the records of its referrers
/// (the local index made to match the bucket's), their manifests, cosign's classic `.sig`
/// tag's, and those manifests' layers up to `layer_size_max_bytes` (signature payloads,
/// reports).
pub async fn warm_for_admission(
    app: &Arc<App>,
    bucket: &Bucket,
    name: &RepoName,
    reference: &Reference,
    referrers: bool,
    layer_size_max_bytes: u64,
) -> Result<()> {
    let digest = match reference {
        Reference::Digest(d) => {
            ensure_manifest(app, bucket, name, d).await?;
            d.clone()
        }
        Reference::Tag(t) => {
            resolve_tag(app, bucket, name, t).await?;
            match block(|| app.layout.tag(name, t))? {
                Some(entry) => entry.digest,
                None => return Ok(()),
            }
        }
    };
    if !referrers {
        return Ok(());
    }
    let digest_of = |raw: &[u8]| {
        let d: serde_json::Value = serde_json::from_slice(raw).ok()?;
        Digest::parse(d["digest"].as_str()?).ok()
    };
    let records = bucket.referrers(name, &digest, None).await?;
    let mut artifacts = Vec::new();
    for raw in &records {
        let Some(referrer) = digest_of(raw) else {
            continue;
        };
        ensure_manifest(app, bucket, name, &referrer).await?;
        block(|| {
            let _publishing = app.publishing();
            app.layout.put_referrer(name, &digest, &referrer, raw)
        })?;
        artifacts.push(referrer);
    }
    // Records deleted through another replica go from the local index too.
    for raw in block(|| app.layout.referrers(name, &digest))? {
        if let Some(gone) = digest_of(&raw).filter(|d| !artifacts.contains(d)) {
            block(|| app.layout.delete_referrer(name, &digest, &gone))?;
        }
    }
    let sig = crate::admission::require::classic_sig_tag(&digest);
    if resolve_tag(app, bucket, name, &sig).await.is_ok() {
        if let Some(entry) = block(|| app.layout.tag(name, &sig))? {
            artifacts.push(entry.digest);
        }
    }
    for m in artifacts {
        let Some(bytes) = block(|| app.layout.read_content(&m))? else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        for layer in v["layers"].as_array().into_iter().flatten() {
            let size = layer["size"].as_u64().unwrap_or(u64::MAX);
            let Some(d) = layer["digest"].as_str().and_then(|d| Digest::parse(d).ok()) else {
                continue;
            };
            if size <= layer_size_max_bytes {
                ensure_blob(app, bucket, name, &d).await?;
            }
        }
    }
    Ok(())
}

/// Immutable tags across replicas: `immutable.rs` checks this replica's tags, which may lag
/// the bucket (a tag pushed through another replica, not yet pulled here). Before a push or a
/// delete that an `[[immutable_tags]]` rule may refuse, the repository's immutable tags
/// (`only` those, when given) are made to match the bucket's, their manifests local. Two
/// replicas writing one tag at the same moment can still both pass: the bucket offers no
/// conditional write to arbitrate.
pub async fn sync_immutable_tags(
    app: &App,
    bucket: &Bucket,
    name: &RepoName,
    only: Option<&[Tag]>,
) -> Result<()> {
    if !crate::immutable::covers_repository(app, name) {
        return Ok(());
    }
    let tags: Vec<Tag> = match only {
        Some(tags) => tags.to_vec(),
        None => {
            let mut all = bucket.tag_names(name).await?;
            all.extend(block(|| app.layout.tags(name))?.unwrap_or_default());
            all.sort();
            all.dedup();
            all.iter().filter_map(|t| Tag::parse(t).ok()).collect()
        }
    };
    for tag in tags {
        if crate::immutable::is_immutable(app, name, tag.as_str()).is_none() {
            continue;
        }
        match bucket.tag(name, &tag).await? {
            Some(entry) => {
                ensure_manifest(app, bucket, name, &entry.digest).await?;
                block(|| {
                    let _publishing = app.publishing();
                    app.layout.put_tag(name, &tag, &entry)
                })?;
                if only.is_none() {
                    // A blob delete is checked against an index's images too: theirs, here.
                    ensure_children(app, bucket, name, &entry.digest).await?;
                }
            }
            None => {
                block(|| app.layout.delete_tag(name, &tag))?;
            }
        }
    }
    Ok(())
}

/// The child manifests of index `d` (if it is one), made local from the bucket.
async fn ensure_children(app: &App, bucket: &Bucket, name: &RepoName, d: &Digest) -> Result<()> {
    let Some(bytes) = block(|| app.layout.read_content(d))? else {
        return Ok(());
    };
    let Ok(index) = lighter_layout::manifest::inspect(&bytes, None) else {
        return Ok(());
    };
    if index.kind != lighter_layout::media::ManifestKind::Index {
        return Ok(());
    }
    for child in &index.references {
        match ensure_manifest(app, bucket, name, child).await {
            Ok(()) => {}
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True when every repository name `name` or below it (`name/...`) sorts at or before
/// `last`: the catalog's page after `last` needs nothing from that subtree.
fn wholly_before(name: &str, last: Option<&str>) -> bool {
    let Some(last) = last else { return false };
    let subtree = format!("{name}/");
    last > subtree.as_str() && !last.starts_with(&subtree)
}

#[cfg(test)]
mod tests {
    use super::wholly_before;

    #[test]
    fn a_subtree_is_skipped_only_when_all_its_names_come_at_or_before_last() {
        assert!(!wholly_before("team", None));
        // "team/app" and "team" sort before "tools".
        assert!(wholly_before("team", Some("tools")));
        // "team/z" sorts after "team/app".
        assert!(!wholly_before("team", Some("team/app")));
        // '-' sorts before '/': every "team/..." comes after "team-x".
        assert!(!wholly_before("team", Some("team-x")));
        assert!(!wholly_before("team", Some("team")));
        assert!(!wholly_before("zeta", Some("alpha")));
    }
}
