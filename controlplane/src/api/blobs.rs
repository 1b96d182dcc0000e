//! Blobs: pull (`GET`/`HEAD` with `Range`), delete, and push: monolithic (`POST ?digest=`,
//! `POST` then `PUT`), chunked (`PATCH`), upload status, cancel, cross-repository mount.
//! Spec: "Pulling blobs", "Pushing blobs", "Mounting a blob from another repository",
//! "Deleting Blobs".

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use lighter_layout::range::{self, RangeAnswer};
use lighter_layout::{Algorithm, CommitError, Digest, Ingest, RepoName, UploadId};

use super::{
    content_length, empty, file_body, header, param, query, receive, set, streamed, Response,
    Result,
};
use crate::app::{block, App};
use crate::error::{ApiError, Code};
use crate::uploads::Session;

pub fn get(
    app: &App,
    req: &Request<Incoming>,
    name: &RepoName,
    digest: &Digest,
) -> Result<Response> {
    let Some((file, len)) = block(|| app.layout.open_blob(name, digest))? else {
        return Err(blob_unknown(name, digest));
    };
    let head = req.method() == Method::HEAD;
    let part = requested_part(req, len)?;
    let body = if head {
        None
    } else {
        Some(file_body(file, part.start, part.count)?)
    };
    let mut r = blob_response(body, digest, &part);
    set(&mut r, "etag", &format!("\"{digest}\""));
    Ok(r)
}

/// The part of a blob of `len` bytes a request asks for (its `Range`, single ranges only).
pub struct Part {
    pub status: StatusCode,
    pub start: u64,
    pub count: u64,
    pub len: u64,
}

/// Reads the `Range` header: the whole blob, one part of it, or 416.
pub fn requested_part(req: &Request<Incoming>, len: u64) -> Result<Part> {
    Part::of(req.headers().get("range").map(|v| v.as_bytes()), len)
}

impl Part {
    /// The part a `Range` header value (if any) asks of a blob of `len` bytes, or 416.
    pub fn of(range: Option<&[u8]>, len: u64) -> Result<Part> {
        let (status, start, count) = match range::answer(range, len) {
            RangeAnswer::Full => (StatusCode::OK, 0, len),
            RangeAnswer::Partial { start, end } => {
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
            }
            RangeAnswer::Unsatisfiable => {
                return Err(ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    Code::SizeInvalid,
                    format!("range not satisfiable: the blob is {len} bytes"),
                )
                .with_header("content-range", format!("bytes */{len}")))
            }
        };
        Ok(Part {
            status,
            start,
            count,
            len,
        })
    }
}

/// A blob answer with its headers; no body for `HEAD`.
pub fn blob_response(body: Option<super::Body>, digest: &Digest, part: &Part) -> Response {
    let mut r = match body {
        Some(b) => streamed(b),
        None => empty(),
    };
    *r.status_mut() = part.status;
    set(&mut r, "content-type", lighter_layout::media::OCTET_STREAM);
    set(&mut r, "content-length", &part.count.to_string());
    set(&mut r, "docker-content-digest", &digest.to_string());
    set(&mut r, "accept-ranges", "bytes");
    if part.status == StatusCode::PARTIAL_CONTENT {
        let last = part.start + part.count - 1;
        set(
            &mut r,
            "content-range",
            &format!("bytes {}-{last}/{}", part.start, part.len),
        );
    }
    r
}

pub async fn delete(app: &App, name: &RepoName, digest: &Digest) -> Result<Response> {
    if let Some(bucket) = &app.bucket {
        crate::bucket::sync_immutable_tags(app, bucket, name, None).await?;
    }
    // An immutable release's blobs stay: checked before the bucket, whose unlink is final.
    block(|| -> Result<()> {
        let _tags = app.tag_writes(name);
        crate::immutable::check_blob_delete(app, name, digest)
    })?;
    // The journal of deletes, then the bucket, then this cache: a kill at any point leaves no
    // replica's cache (this one's, read back at its start, included) holding a link the
    // bucket lost; an entry whose delete then fails only costs the replicas a miss.
    let in_bucket = match &app.bucket {
        Some(bucket) => {
            let d = lighter_layout::bucket::Deletion::Blob(name.clone(), digest.clone());
            bucket.journal_delete(&d).await?;
            bucket.unlink_blob(name, digest).await?
        }
        None => false,
    };
    let found = block(|| -> Result<bool> {
        let _tags = app.tag_writes(name);
        crate::immutable::check_blob_delete(app, name, digest)?;
        Ok(app.layout.delete_blob(name, digest)?)
    })?;
    if !found && !in_bucket {
        return Err(blob_unknown(name, digest));
    }
    let e = crate::events::Event::new("delete_blob")
        .with("repository", name.as_str())
        .with("digest", digest.to_string())
        .with("status", 202);
    crate::events::record(app, e);
    Ok(accepted())
}

/// `POST /v2/<name>/blobs/uploads/`: mount, single-POST monolithic push, or a new session.
///
/// `may_mount_from` says whether the caller may pull from a repository (None: access control is
/// off). With access control on, a mount needs a `from` the caller may pull; otherwise it is a
/// new session, as for a blob that is not there, so a mount never reveals another repository's
/// content.
pub async fn start_upload(
    app: &App,
    req: Request<Incoming>,
    name: &RepoName,
    may_mount_from: Option<&(dyn Fn(&RepoName) -> bool + Sync)>,
) -> Result<Response> {
    let q = query(&req);
    let mount = param(&q, "mount").filter(|_| {
        may_mount_from.is_none_or(|may| {
            param(&q, "from")
                .and_then(|f| RepoName::parse(f).ok())
                .is_some_and(|f| may(&f))
        })
    });
    if let Some(mount) = mount {
        let digest = parse_digest(mount)?;
        let from = param(&q, "from")
            .map(|from| {
                RepoName::parse(from)
                    .map_err(|e| ApiError::bad_request(Code::NameInvalid, format!("from: {e}")))
            })
            .transpose()?;
        let mounted = match &app.bucket {
            Some(bucket) => {
                // What the bucket holds, wherever it was pushed.
                let mountable = match &from {
                    Some(from) => bucket.blob_linked(from, &digest).await?,
                    None => bucket.content_size(&digest).await?.is_some(),
                };
                // Touched before it is linked (garbage collection), and unmountable if gone.
                let mountable = mountable && bucket.link_blob_touched(name, &digest).await?;
                if mountable {
                    block(|| {
                        let _publishing = app.publishing();
                        app.layout.link_blob(name, &digest)
                    })?;
                }
                mountable
            }
            None => block(|| -> std::io::Result<bool> {
                let _publishing = app.publishing();
                let mountable = match &from {
                    Some(from) => app.layout.blob_size(from, &digest)?.is_some(),
                    None => app.layout.content_exists(&digest)?,
                };
                if mountable {
                    app.layout.link_blob(name, &digest)?;
                }
                Ok(mountable)
            })?,
        };
        if mounted {
            let bytes = block(|| app.layout.blob_size(name, &digest))?;
            let e = crate::events::Event::new("mount_blob")
                .with("repository", name.as_str())
                .with("digest", digest.to_string())
                .with_text("from", from.as_ref())
                .with("bytes", bytes)
                .with("status", 201);
            crate::events::record(app, e);
            return Ok(created_blob(name, &digest));
        }
        // Not mountable: fall through to a new session, as the spec asks (202).
    }
    let algorithm = match param(&q, "digest-algorithm") {
        None => Algorithm::Sha256,
        Some(a) => Algorithm::from_name(a).ok_or_else(|| {
            ApiError::bad_request(
                Code::DigestInvalid,
                format!("unsupported digest-algorithm {a:?}: use sha256 or sha512"),
            )
        })?,
    };
    if let Some(d) = param(&q, "digest") {
        let digest = parse_digest(d)?;
        let length = content_length(&req)?;
        let mut session = app.uploads.create(name, digest.algorithm())?;
        let ingest = session.ingest.take().expect("new session has an ingest");
        let id = ingest.id().clone();
        app.uploads.forget(&id);
        let result = push_whole(app, req.into_body(), ingest, length, &digest).await;
        if result.is_err() {
            let _ = block(|| app.layout.remove_ingest(&id));
        }
        result?;
        return Ok(created_blob(name, &digest));
    }
    let session = app.uploads.create(name, algorithm)?;
    let mut r = upload_progress(name, ingest(&session));
    *r.status_mut() = StatusCode::ACCEPTED;
    Ok(r)
}

/// `GET <upload>`: 204 with the session's `Range`.
pub async fn upload_status(app: &App, name: &RepoName, id: &UploadId) -> Result<Response> {
    let session = app.uploads.get(name, id).await?;
    let mut r = upload_progress(name, ingest(&session));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

/// `PATCH <upload>`: appends a chunk; `Content-Range` (optional) must start where the session ends.
pub async fn patch_upload(
    app: &App,
    req: Request<Incoming>,
    name: &RepoName,
    id: &UploadId,
) -> Result<Response> {
    let mut session = app.uploads.get(name, id).await?;
    append_chunk(app, req, &mut session).await?;
    let mut r = upload_progress(name, ingest(&session));
    *r.status_mut() = StatusCode::ACCEPTED;
    Ok(r)
}

/// `PUT <upload>?digest=`: appends the optional final chunk, verifies, publishes.
pub async fn finish_upload(
    app: &App,
    req: Request<Incoming>,
    name: &RepoName,
    id: &UploadId,
) -> Result<Response> {
    let q = query(&req);
    let digest = parse_digest(param(&q, "digest").ok_or_else(|| {
        ApiError::bad_request(
            Code::DigestInvalid,
            "closing PUT needs ?digest=<digest of the whole blob>",
        )
    })?)?;
    let mut session = app.uploads.get(name, id).await?;
    append_chunk(app, req, &mut session).await?;
    let ingest = session.ingest.take().expect("a live session has an ingest");
    app.uploads.forget(id);
    drop(session);
    commit(app, ingest, &digest).await?;
    Ok(created_blob(name, &digest))
}

/// `DELETE <upload>`: cancels the session and drops its bytes.
pub async fn cancel_upload(app: &App, name: &RepoName, id: &UploadId) -> Result<Response> {
    let mut session = app.uploads.get(name, id).await?;
    session.ingest = None;
    app.uploads.forget(id);
    block(|| app.layout.remove_ingest(id))?;
    let mut r = empty();
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

// ---- helpers --------------------------------------------------------------------------------

fn ingest(session: &Session) -> &Ingest {
    session
        .ingest
        .as_ref()
        .expect("a live session has an ingest")
}

async fn push_whole(
    app: &App,
    body: Incoming,
    mut ingest: Ingest,
    length: Option<u64>,
    digest: &Digest,
) -> Result<()> {
    let received = receive(app, body, &mut ingest, length).await?;
    if length.is_some_and(|l| l != received) {
        return Err(size_mismatch(length.unwrap_or(0), received));
    }
    commit(app, ingest, digest).await
}

/// Whether an ingest's bytes are `digest` (hashed again if the session hashed another way).
fn verified(app: &App, ingest: &Ingest, digest: &Digest) -> std::io::Result<bool> {
    let running = ingest.digest();
    if running.algorithm() == digest.algorithm() {
        return Ok(&running == digest);
    }
    let file = app.layout.open_ingest_reader(ingest.id())?;
    let mut hasher = digest.algorithm().hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    loop {
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut buf, offset)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(&hasher.finish() == digest)
}

/// Publishes an upload (logged as a push); with `[storage.s3]`, once the bucket holds it.
async fn commit(app: &App, ingest: Ingest, digest: &Digest) -> Result<()> {
    let (name, bytes, id) = (ingest.name().clone(), ingest.len(), ingest.id().clone());
    if let Some(bucket) = &app.bucket {
        let stored = async {
            // Bytes that are not the digest go no further: the commit below says so.
            if !block(|| verified(app, &ingest, digest))? {
                return Ok(());
            }
            let file = block(|| app.layout.open_ingest_reader(&id))?;
            let since = bucket.store_blob(file, bytes, digest).await?;
            bucket.link_blob(&name, digest).await?;
            let link = lighter_layout::bucket::blob_link_key(&name, digest);
            bucket.confirm_linked(digest, &link, since).await
        };
        if let Err(e) = stored.await {
            drop(ingest);
            let _ = block(|| app.layout.remove_ingest(&id));
            return Err(e);
        }
    }
    match block(|| {
        let _publishing = app.publishing();
        app.layout.commit(ingest, digest)
    }) {
        Ok(()) => {
            let e = crate::events::Event::new("push_blob")
                .with("repository", name.as_str())
                .with("digest", digest.to_string())
                .with("bytes", bytes)
                .with("status", 201);
            crate::events::record(app, e);
            Ok(())
        }
        Err(CommitError::DigestMismatch { computed }) => Err(ApiError::bad_request(
            Code::DigestInvalid,
            format!("the uploaded bytes have digest {computed}, not {digest}; nothing was stored"),
        )
        .with_detail(
            serde_json::json!({"expected": digest.to_string(), "computed": computed.to_string()}),
        )),
        Err(CommitError::Io(e)) if app.bucket.is_some() => {
            // The bucket holds it (acknowledged): this cache could not take it (a full disk),
            // and pulls of it are served from the bucket.
            let n = crate::metrics::Counters::add(&app.counters.bucket_cache_write_failures, 1);
            tracing::warn!(repository = %name, %digest, bucket_cache_write_failures = n, "blob pushed to the bucket, not cached here: {e}");
            let _ = block(|| app.layout.remove_ingest(&id));
            Ok(())
        }
        Err(CommitError::Io(e)) => Err(e.into()),
    }
}

/// Appends the request body to the session, all or nothing.
async fn append_chunk(app: &App, req: Request<Incoming>, session: &mut Session) -> Result<()> {
    let length = content_length(&req)?;
    let offset = ingest(session).len();
    let range = header(&req, "content-range")
        .map(parse_content_range)
        .transpose()?;
    if let Some((start, end)) = range {
        if start != offset {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::BlobUploadInvalid,
                format!("chunk starts at {start} but the upload has {offset} bytes: send the chunk starting at {offset}"),
            )
            .with_header("range", range_header(offset))
            .with_header("location", upload_location(ingest(session).name(), ingest(session).id())));
        }
        if let Some(l) = length {
            if l != end - start + 1 {
                return Err(ApiError::bad_request(
                    Code::SizeInvalid,
                    format!(
                        "Content-Range {start}-{end} is {} bytes but Content-Length is {l}",
                        end - start + 1
                    ),
                ));
            }
        }
    }
    let expected = range.map(|(s, e)| e - s + 1).or(length);
    let ingest = session
        .ingest
        .as_mut()
        .expect("a live session has an ingest");
    let checkpoint = ingest.checkpoint();
    let result = receive(app, req.into_body(), ingest, expected)
        .await
        .and_then(|received| match expected {
            Some(e) if e != received => Err(size_mismatch(e, received)),
            _ => Ok(()),
        });
    session.last_active = std::time::Instant::now();
    if let Err(e) = result {
        let ingest = session
            .ingest
            .as_mut()
            .expect("a live session has an ingest");
        block(|| ingest.rollback(checkpoint))?;
        return Err(e);
    }
    Ok(())
}

/// `Content-Range: <start>-<end>` (inclusive), as the spec's chunk upload defines it; also accepts
/// the RFC form `bytes <start>-<end>/<total or *>` some clients send.
fn parse_content_range(v: &str) -> Result<(u64, u64)> {
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            Code::BlobUploadInvalid,
            format!("malformed Content-Range {v:?}: expected <start>-<end>"),
        )
    };
    let s = v.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let num = |x: &str| {
        (!x.is_empty() && x.len() <= 19 && x.bytes().all(|c| c.is_ascii_digit()))
            .then(|| x.parse::<u64>().ok())
            .flatten()
    };
    match (num(a), num(b)) {
        (Some(a), Some(b)) if b >= a => Ok((a, b)),
        _ => Err(bad()),
    }
}

fn parse_digest(s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| ApiError::bad_request(Code::DigestInvalid, e.to_string()))
}

fn size_mismatch(expected: u64, received: u64) -> ApiError {
    ApiError::bad_request(
        Code::SizeInvalid,
        format!("expected {expected} bytes, received {received}; nothing was stored"),
    )
}

/// `Range: 0-<last offset>` of an upload; `0-0` when empty, as Distribution answers.
fn range_header(len: u64) -> String {
    format!("0-{}", len.saturating_sub(1))
}

fn upload_location(name: &RepoName, id: &UploadId) -> String {
    format!("/v2/{name}/blobs/uploads/{}", id.as_str())
}

fn upload_progress(name: &RepoName, ingest: &Ingest) -> Response {
    let mut r = empty();
    set(&mut r, "location", &upload_location(name, ingest.id()));
    set(&mut r, "range", &range_header(ingest.len()));
    set(&mut r, "docker-upload-uuid", ingest.id().as_str());
    set(&mut r, "content-length", "0");
    r
}

fn created_blob(name: &RepoName, digest: &Digest) -> Response {
    let mut r = empty();
    *r.status_mut() = StatusCode::CREATED;
    set(&mut r, "location", &format!("/v2/{name}/blobs/{digest}"));
    set(&mut r, "docker-content-digest", &digest.to_string());
    set(&mut r, "content-length", "0");
    r
}

fn accepted() -> Response {
    let mut r = empty();
    *r.status_mut() = StatusCode::ACCEPTED;
    set(&mut r, "content-length", "0");
    r
}

fn blob_unknown(name: &RepoName, digest: &Digest) -> ApiError {
    ApiError::not_found(
        Code::BlobUnknown,
        format!("blob {digest} is not in repository {name}"),
    )
}
