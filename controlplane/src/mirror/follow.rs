//! A download's followers on handed-over connections, without hyper in the way: the body goes
//! from the growing ingest to the client's socket with sendfile, as the data plane serves a
//! cached blob, so a cold pull's bytes cross user space once (upstream → ingest), not three times
//! (ingest → a buffer → hyper → the socket).
//!
//! Only a `GET` of a blob that is not stored yet takes this path: a mirrored blob, or, with
//! `[storage.s3]`, a blob of a repository kept in the bucket (a replica's miss, downloaded from
//! the bucket by the same single flight). The data plane handed the socket over with the whole
//! request head, so the head is read here with httparse. Anything else, or anything unusual (a
//! request body, a head that does not parse), goes to hyper, which answers the same request the
//! slower way.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
// The data plane read the head with as many headers at most.
use lighter_dataplane::conn::HEADERS_MAX;
use lighter_layout::{route, Digest, RepoName, Route};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Progress;
use crate::api::{self, blobs::Part};
use crate::app::{block, App};
use crate::error::{ApiError, Code};
use crate::handoff::Prefixed;

/// A blob `GET` this path can answer.
struct BlobGet {
    name: RepoName,
    ns: Option<String>,
    digest: Digest,
    range: Option<Vec<u8>>,
    authorization: Option<Vec<u8>>,
    agent: String,
}

/// Serves `io`'s request if it is the `GET` of a mirrored blob, or of a blob kept in the bucket,
/// that has to be downloaded; otherwise gives the connection back, untouched, for hyper.
pub async fn try_serve(app: &Arc<App>, io: Prefixed) -> Option<Prefixed> {
    if app.mirrors.upstreams.is_empty() && app.bucket.is_none() {
        return Some(io);
    }
    let Some(get) = blob_get(io.pending()) else {
        return Some(io);
    };
    // A mirrored repository, else (as `api::backed` decides) one kept in the bucket.
    let target = app.mirrors.target(&get.name, get.ns.as_deref());
    let repo = match (&target, &app.bucket) {
        (Some(t), _) => t.name.clone(),
        (None, Some(_)) => get.name.clone(),
        (None, None) => return Some(io),
    };
    let mut identity = String::new();
    if let Some(auth) = &app.auth {
        let (authz, ip) = (get.authorization.as_deref(), io.peer_ip());
        match auth.may_pull_now(authz, ip, repo.as_str()) {
            Some(who) => identity = who,
            None => return Some(io),
        }
    }
    // Logged as the data plane would have: a pull of this blob, by this client.
    let origin = crate::events::Origin {
        client: io.peer_ip(),
        identity: identity.into(),
        user_agent: get.agent.clone(),
    };
    let started = std::time::Instant::now();
    let (name, digest) = (repo, get.digest.clone());
    let served = crate::events::with_origin(origin, async move {
        let answered = match &target {
            Some(target) => serve(app, io, &get, target).await,
            None => serve_from_bucket(app, io, &get).await,
        };
        if let Ok((status, bytes)) = &answered {
            let e = crate::events::Event::new("pull_blob")
                .with("repository", name.as_str())
                .with("reference", digest.to_string())
                .with("digest", digest.to_string())
                .with("status", *status)
                .with("bytes", *bytes)
                .with("duration_us", started.elapsed().as_micros() as u64);
            crate::events::record(app, e);
        }
        answered
    })
    .await;
    served.err()
}

/// [`try_serve`]'s answer once access is settled: the status and body bytes sent, or the
/// connection back for hyper.
async fn serve(
    app: &Arc<App>,
    io: Prefixed,
    get: &BlobGet,
    target: &super::Target<'_>,
) -> Result<(u16, u64), Prefixed> {
    if let Err(e) = super::upstream_confirms(app, target, &get.digest).await {
        let status = e.status.as_u16();
        answer_error(io, e).await;
        return Ok((status, 0));
    }
    // containerd holds it (and Lighter dropped its own copy): no download.
    if let Some(c) = &app.containerd {
        if let Ok(Some((file, len))) = block(|| c.open(&get.digest)) {
            let progress = Progress::done(len);
            let range = get.range.as_deref();
            return Ok(answer_blob(app, io, file, progress, &get.digest, range, None).await);
        }
    }
    let (dl, file) = match super::join_or_start(app, target, &get.digest, super::Via::Peers) {
        Ok(Some(joined)) => joined,
        // Published since: hyper serves it from the store.
        Ok(None) => return Err(io),
        Err(e) => {
            let status = e.status.as_u16();
            answer_error(io, e).await;
            return Ok((status, 0));
        }
    };
    let (progress, range) = (dl.progress.clone(), get.range.as_deref());
    Ok(answer_blob(app, io, file, progress, &get.digest, range, None).await)
}

/// [`serve`] for a repository kept in the bucket: a blob this replica does not hold but the
/// bucket links in the repository is downloaded once (the mirror's single flight from
/// `Source::Bucket`, as `bucket::blob` starts it for hyper) and followed with sendfile. A
/// blob held here (published since the data plane looked) goes back to hyper.
async fn serve_from_bucket(
    app: &Arc<App>,
    io: Prefixed,
    get: &BlobGet,
) -> Result<(u16, u64), Prefixed> {
    let bucket = app.bucket.as_ref().expect("called with a bucket");
    let (name, digest) = (&get.name, &get.digest);
    let started = async {
        if crate::bucket::held_here(app, bucket, name, digest).await? {
            return Ok(None);
        }
        super::join_or_start_from(app, name, digest, super::Source::Bucket)
    }
    .await;
    let (dl, file) = match started {
        Ok(Some(joined)) => joined,
        // Held here now, or not to be had (a 404, the bucket down): hyper answers, and keeps
        // the connection for the client's next (pipelined) request, which this path cannot.
        Ok(None) | Err(_) => return Err(io),
    };
    // A download that fails before its size is known is the bucket's failure: 503, as hyper's
    // path answers it, not the 404 of a blob an upstream does not have.
    if let Err(e) = crate::bucket::first_total(bucket, &dl).await {
        let status = e.status.as_u16();
        answer_error(io, e).await;
        return Ok((status, 0));
    }
    let (progress, range) = (dl.progress.clone(), get.range.as_deref());
    Ok(answer_blob(app, io, file, progress, digest, range, None).await)
}

/// What a peer transfer spends: the node's upload budget, and the counter of bytes sent.
pub(crate) type Upload<'a> = (&'a crate::peers::Limiter, &'a std::sync::atomic::AtomicU64);

/// Answers a blob `GET` on a handed-over connection (its `Range`, if any) from `file`, as far
/// as `progress` says it is written: the head once the size is known, the body with sendfile,
/// the last byte once the download is verified; a reset if it fails. Closes the connection.
/// The status sent and the body's bytes (0 when the body was cut short).
pub(crate) async fn answer_blob(
    app: &App,
    io: Prefixed,
    file: std::fs::File,
    mut progress: tokio::sync::watch::Receiver<Progress>,
    digest: &Digest,
    range: Option<&[u8]>,
    upload: Option<Upload<'_>>,
) -> (u16, u64) {
    let started = progress
        .wait_for(|p| p.total.is_some() || p.outcome.is_some())
        .await
        .map(|p| p.clone())
        .unwrap_or_default();
    let total = match (started.total, &started.outcome) {
        (Some(t), _) => t,
        (None, Some(Ok(()))) => started.written,
        (None, Some(Err(e))) => {
            answer_error(io, ApiError::not_found(Code::BlobUnknown, e.clone())).await;
            return (404, 0);
        }
        (None, None) => {
            let e = ApiError::not_found(Code::BlobUnknown, "download ended");
            answer_error(io, e).await;
            return (404, 0);
        }
    };
    let part = match Part::of(range, total) {
        Ok(p) => p,
        Err(e) => {
            let status = e.status.as_u16();
            answer_error(io, e).await;
            return (status, 0);
        }
    };
    let head = head_bytes(&api::blobs::blob_response(None, digest, &part));
    let idle = Duration::from_millis(app.config.idle_timeout_ms);
    let mut tcp = io.into_tcp();
    let sent = async {
        write_all(&mut tcp, &head, idle).await?;
        send_body(
            &tcp,
            file.as_raw_fd(),
            progress,
            part.start,
            part.start + part.count,
            idle,
            upload,
        )
        .await
    }
    .await;
    match sent {
        Ok(()) => {
            let _ = tcp.shutdown().await;
            (part.status.as_u16(), part.count)
        }
        Err(e) => {
            tracing::debug!(%digest, "blob transfer aborted: {e}");
            abort(&tcp);
            (part.status.as_u16(), 0)
        }
    }
}

/// The request, if it is a `GET` of a blob with no body.
fn blob_get(head: &[u8]) -> Option<BlobGet> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) || req.method != Some("GET") {
        return None;
    }
    let (path, query) = match req.path?.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path?, None),
    };
    let Ok(Route::Blob { name, digest }) = route::parse(path) else {
        return None;
    };
    let mut range = None;
    let mut authorization = None;
    let mut agent = String::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("user-agent") {
            agent = String::from_utf8_lossy(h.value).into_owned();
        }
        if h.name.eq_ignore_ascii_case("authorization") {
            authorization = Some(h.value.to_vec());
        }
        if h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return None;
        }
        if h.name.eq_ignore_ascii_case("range") {
            range = Some(h.value.to_vec());
        }
    }
    let ns = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    Some(BlobGet {
        name,
        ns,
        digest,
        range,
        authorization,
        agent,
    })
}

/// Sends `start..end` of the ingest as the download writes it; the last byte only once the
/// download is verified. An error means the client must not take the body as complete.
async fn send_body(
    tcp: &TcpStream,
    file: RawFd,
    mut progress: tokio::sync::watch::Receiver<Progress>,
    start: u64,
    end: u64,
    idle: Duration,
    upload: Option<Upload<'_>>,
) -> io::Result<()> {
    let mut pos = start;
    loop {
        let (sendable, verified, ended) = {
            let p = progress.borrow_and_update();
            if let Some(e) = p.failure() {
                return Err(io::Error::other(e.to_owned()));
            }
            (p.sendable(end), p.verified, p.outcome.is_some())
        };
        if verified && pos >= end {
            return Ok(());
        }
        if sendable > pos {
            while pos < sendable {
                tokio::time::timeout(idle, tcp.writable())
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")
                    })??;
                let mut count = sendable - pos;
                if let Some((limiter, _)) = upload {
                    count = limiter.take(count.min(SENDFILE_CHUNK_BYTES)).await;
                }
                match tcp.try_io(tokio::io::Interest::WRITABLE, || {
                    sendfile(tcp.as_raw_fd(), file, pos, count)
                }) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        pos += n as u64;
                        if let Some((limiter, sent)) = upload {
                            crate::metrics::Counters::add(sent, n as u64);
                            // What the kernel did not take goes back to the budget.
                            limiter.give_back(count - n as u64);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if let Some((limiter, _)) = upload {
                            limiter.give_back(count);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            continue;
        }
        if ended {
            return Err(io::Error::other(
                "download ended before the requested bytes",
            ));
        }
        if progress.changed().await.is_err() {
            return Err(io::Error::other("download abandoned"));
        }
    }
}

/// sendfile(2) of up to `count` bytes of `file` from `offset`.
/// Bytes per sendfile call: bounded so one follower does not hold a worker thread for long.
const SENDFILE_CHUNK_BYTES: u64 = 4 << 20;

fn sendfile(sock: RawFd, file: RawFd, offset: u64, count: u64) -> io::Result<usize> {
    let mut off = offset as libc::off_t;
    let n = count.min(SENDFILE_CHUNK_BYTES) as usize;
    // SAFETY: both descriptors are open for the duration of the call; `off` is ours.
    let sent = unsafe { libc::sendfile(sock, file, &mut off, n) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

async fn write_all(tcp: &mut TcpStream, bytes: &[u8], idle: Duration) -> io::Result<()> {
    tokio::time::timeout(idle, tcp.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
}

/// Answers an error (the OCI error JSON) and closes.
pub(crate) async fn answer_error(io: Prefixed, e: ApiError) {
    let r = api::error_response(e, false);
    let head = head_bytes(&r);
    let body = r
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut tcp = io.into_tcp();
    let _ = tcp.write_all(&head).await;
    let _ = tcp.write_all(&body).await;
    let _ = tcp.shutdown().await;
}

/// The status line and headers of `r`, with `Connection: close` (a handed-over connection
/// serves one request).
pub(crate) fn head_bytes<B>(r: &hyper::Response<B>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let status = r.status();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in r.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

/// Closes with a reset, so the client sees a failed transfer, never a short one it could take
/// for complete.
fn abort(tcp: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our open socket with a correctly sized option value. A zero linger
    // never blocks: the close that follows sends RST at once.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
