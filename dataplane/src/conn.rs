//! One client connection as a state machine that knows nothing about how I/O is done: the
//! drivers (`uring`, `epoll`) ask it what to do next ([`Step`]), do it, and report back. It parses
//! requests with httparse from a fixed buffer, answers the pull path itself from the data
//! directory (response head built in a reused buffer, body sent from the file by the driver with
//! sendfile), and marks anything else for handoff to the control plane.

use std::cell::RefCell;
use std::fs::File;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use lighter_layout::events::{Action, Record};
use lighter_layout::media;
use lighter_layout::range::{self, RangeAnswer};
use lighter_layout::{route, Digest, Layout, Reference, Route};

/// Longest a core answers a stale cached tag from its cache after handing one pull of it over
/// to be refreshed (bounded by the tag's TTL too).
const STALE_TAG_GRACE_MS: u64 = 5000;

/// A mirrored blob's last-pull time is recorded at most this often.
const PULL_TIME_GRANULARITY: std::time::Duration = std::time::Duration::from_secs(1);

/// Most headers parsed in one request; more gets 431.
pub const HEADERS_MAX: usize = 64;

/// What the connection needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Receive into [`Conn::recv_space`].
    Recv,
    /// Send [`Conn::head_pending`].
    SendHead,
    /// Send the body file ([`Conn::body`]) from its offset, zero-copy.
    SendBody,
    /// Give the socket and [`Conn::unconsumed`] to the control plane.
    Handoff,
    /// Close the connection.
    Close,
}

/// A file region still to be sent.
pub struct BodyFile {
    pub file: Rc<File>,
    pub offset: u64,
    pub end: u64,
    /// The whole file in memory (a small manifest): sent with the head in one system call.
    pub bytes: Option<Rc<[u8]>>,
}

/// What a worker shares with its connections (per core; nothing here is shared across cores).
pub struct Ctx {
    pub layout: Layout,
    /// Open blob files and resolved manifest references of this core.
    pub cache: RefCell<Cache>,
    pub mirrors: Vec<crate::Mirror>,
    /// With `[storage.s3]`: every repository outside the mirrors is a cache of the bucket (its
    /// misses and tags older than this go to the control plane, as a mirror's do).
    pub bucket_tag_ttl_ms: Option<u64>,
    /// The time of the event loop's round: read once per round, not per request.
    pub now: Instant,
    pub idle_timeout_ms: u64,
    pub request_header_timeout_ms: u64,
    /// Access control, when on: what may be pulled without the control plane.
    pub access: Option<crate::access::Access>,
    /// `/healthz` and `/readyz` (None: 404, as any path outside `/v2/`).
    pub health: Option<crate::health::Health>,
    /// This core's ring: its counters, and its pulls' records when it takes records (the
    /// event log on). None: it could not be made.
    pub events: Option<lighter_layout::events::RingWriter>,
}

impl Ctx {
    /// This core's ring when it takes pulls' records (the event log on).
    pub fn pull_log(&self) -> Option<&lighter_layout::events::RingWriter> {
        self.events.as_ref().filter(|r| r.takes_records())
    }
}

/// The response being sent, as the event ring will see it once its last byte is out.
struct Pending {
    /// A response of the connection's own is under way (not a handoff).
    active: bool,
    /// Its record is filled in (a manifest or blob request, the event log on).
    recorded: bool,
    /// Its record was not filled in: the ring had no room when the request came (the drain
    /// is behind), so it is counted as dropped once the response is out.
    shed: bool,
    /// `lighter_layout::events::ROUTES` index.
    route: usize,
    /// When its request was parsed.
    started: Instant,
    /// Bytes of it sent so far.
    sent: u64,
    record: Record,
}

/// Indexes of `lighter_layout::events::ROUTES`.
const ROUTE_BASE: usize = 0;
const ROUTE_MANIFEST: usize = 1;
const ROUTE_BLOB: usize = 2;
const ROUTE_HEALTH: usize = 3;
const ROUTE_OTHER: usize = 4;

pub struct Conn {
    rbuf: Box<[u8]>,
    rlen: usize,
    head: Vec<u8>,
    head_pos: usize,
    body: Option<BodyFile>,
    close_after: bool,
    handoff: bool,
    /// When the connection is closed if nothing happens.
    pub deadline: Instant,
    /// Whether a request has started arriving (the header timeout runs).
    reading_request: bool,
    /// The client's address, when access control (`anonymous_cidrs`) or the event log needs
    /// it.
    peer: Option<IpAddr>,
    ev: Pending,
}

impl Conn {
    pub fn new(request_header_size_max_bytes: usize, peer: Option<IpAddr>, ctx: &Ctx) -> Conn {
        Conn {
            rbuf: vec![0u8; request_header_size_max_bytes].into_boxed_slice(),
            rlen: 0,
            head: Vec::with_capacity(512),
            head_pos: 0,
            body: None,
            close_after: false,
            handoff: false,
            deadline: ctx.now + std::time::Duration::from_millis(ctx.idle_timeout_ms),
            reading_request: false,
            peer,
            ev: Pending {
                active: false,
                recorded: false,
                shed: false,
                route: ROUTE_OTHER,
                started: ctx.now,
                sent: 0,
                record: Record::empty(),
            },
        }
    }

    pub fn step(&self) -> Step {
        if self.head_pos < self.head.len() {
            Step::SendHead
        } else if self.body.is_some() {
            Step::SendBody
        } else if self.handoff {
            Step::Handoff
        } else if self.close_after {
            Step::Close
        } else {
            Step::Recv
        }
    }

    pub fn recv_space(&mut self) -> &mut [u8] {
        debug_assert!(self.rlen < self.rbuf.len());
        &mut self.rbuf[self.rlen..]
    }

    pub fn head_pending(&self) -> &[u8] {
        &self.head[self.head_pos..]
    }

    pub fn body(&self) -> Option<&BodyFile> {
        self.body.as_ref()
    }

    /// The pending head and the whole body, when the body is in memory and nothing of it has
    /// been sent: both go out in one system call ([`Conn::on_sent`] then).
    pub fn head_with_bytes(&self) -> Option<(&[u8], &[u8])> {
        let body = self.body.as_ref()?;
        let bytes = body.bytes.as_deref()?;
        let rest = bytes.get(body.offset as usize..body.end as usize)?;
        Some((self.head_pending(), rest))
    }

    /// `n` bytes of [`Conn::head_with_bytes`] were sent: the head's, then the body's.
    pub fn on_sent(&mut self, n: usize, ctx: &Ctx) {
        let head = n.min(self.head_pending().len());
        self.on_head_sent(head, ctx);
        if n > head {
            self.on_body_sent(n - head, ctx);
        }
    }

    /// Bytes received and not answered: the request being handed off and any pipelined after it.
    pub fn unconsumed(&self) -> &[u8] {
        &self.rbuf[..self.rlen]
    }

    /// `n` bytes were received into [`Conn::recv_space`] (0: the peer closed).
    pub fn on_recv(&mut self, n: usize, ctx: &Ctx) {
        if n == 0 {
            self.close_after = true;
            return;
        }
        self.rlen += n;
        self.touch(ctx);
        self.process(ctx);
    }

    pub fn on_head_sent(&mut self, n: usize, ctx: &Ctx) {
        self.head_pos += n;
        self.ev.sent += n as u64;
        debug_assert!(self.head_pos <= self.head.len());
        self.touch(ctx);
        if self.head_pos == self.head.len() && self.body.is_none() {
            self.finish_response(ctx);
        }
    }

    pub fn on_body_sent(&mut self, n: usize, ctx: &Ctx) {
        let body = self.body.as_mut().expect("body being sent");
        body.offset += n as u64;
        self.ev.sent += n as u64;
        debug_assert!(body.offset <= body.end);
        let done = body.offset >= body.end;
        self.touch(ctx);
        if done {
            self.body = None;
            self.finish_response(ctx);
        }
    }

    /// The body file ended before its recorded length (it cannot, as blobs are immutable, unless
    /// the data directory was damaged): the response cannot be completed.
    pub fn on_body_eof(&mut self) {
        tracing::error!("blob file shorter than its size: closing the connection");
        self.body = None;
        self.close_after = true;
    }

    /// The client's address, when access control or the event log needs it.
    pub fn peer(&self) -> Option<IpAddr> {
        self.peer
    }

    /// Where a connection coming back from the control plane brings its bytes: the whole
    /// receive buffer (what it held was handed over with the request).
    pub fn return_space(&mut self) -> &mut [u8] {
        &mut self.rbuf[..]
    }

    /// The connection is back from the control plane, with `n` bytes of what follows in
    /// [`Conn::return_space`]: a fresh start, as after a response of its own.
    pub fn resume(&mut self, n: usize, peer: Option<IpAddr>, ctx: &Ctx) {
        self.rlen = n;
        self.head.clear();
        self.head_pos = 0;
        self.body = None;
        self.close_after = false;
        self.handoff = false;
        self.reading_request = false;
        self.peer = peer;
        self.deadline = ctx.now + std::time::Duration::from_millis(ctx.idle_timeout_ms);
        self.process(ctx);
    }

    /// The control plane could not take the request: answer 503 and close.
    pub fn handoff_failed(&mut self) {
        self.handoff = false;
        self.error_close(
            503,
            "Service Unavailable",
            "the registry's control plane is unavailable, retry later",
        );
    }

    fn touch(&mut self, ctx: &Ctx) {
        if !self.reading_request {
            self.deadline = ctx.now + std::time::Duration::from_millis(ctx.idle_timeout_ms);
        }
    }

    fn finish_response(&mut self, ctx: &Ctx) {
        if self.ev.active {
            self.ev.active = false;
            if let Some(ring) = &ctx.events {
                // The event loop's clock, read once per round of completions (as `started`):
                // a pull's duration is then exact to a round, and logging it reads no clock.
                record_response(ring, &mut self.ev, status_of(&self.head), ctx.now);
            }
        }
        self.head.clear();
        self.head_pos = 0;
        if !self.close_after {
            self.process(ctx);
        }
    }

    /// Parses and answers requests while the buffer holds complete ones and no output is pending.
    fn process(&mut self, ctx: &Ctx) {
        debug_assert!(self.head_pos == self.head.len() && self.body.is_none());
        if self.rlen == 0 {
            self.reading_request = false;
            return;
        }
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers);
        let consumed = match req.parse(&self.rbuf[..self.rlen]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.rlen == self.rbuf.len() {
                    self.error_close(
                        431,
                        "Request Header Fields Too Large",
                        "request head is larger than request_header_size_max_bytes",
                    );
                } else if !self.reading_request {
                    self.reading_request = true;
                    self.deadline =
                        ctx.now + std::time::Duration::from_millis(ctx.request_header_timeout_ms);
                }
                return;
            }
            Err(httparse::Error::TooManyHeaders) => {
                self.error_close(
                    431,
                    "Request Header Fields Too Large",
                    "too many request headers",
                );
                return;
            }
            Err(_) => {
                self.error_close(400, "Bad Request", "malformed HTTP request");
                return;
            }
        };
        self.reading_request = false;
        self.ev.active = true;
        self.ev.recorded = false;
        self.ev.shed = false;
        self.ev.route = ROUTE_OTHER;
        // The request's arrival: the loop's time, read when its bytes came in.
        self.ev.started = ctx.now;
        self.ev.sent = 0;
        let answer = answer(&req, ctx, self.peer, &mut self.head, &mut self.ev);
        match answer {
            Answer::Handoff => {
                self.ev.active = false;
                self.head.clear();
                self.handoff = true;
                return;
            }
            Answer::Done { body, close } => {
                self.body = body;
                self.close_after |= close;
            }
        }
        self.rbuf.copy_within(consumed..self.rlen, 0);
        self.rlen -= consumed;
        self.touch(ctx);
    }

    fn error_close(&mut self, status: u16, reason: &str, message: &str) {
        self.ev.active = true;
        self.ev.recorded = false;
        self.ev.shed = false;
        self.ev.route = ROUTE_OTHER;
        self.ev.sent = 0;
        self.head.clear();
        write_error(
            &mut self.head,
            status,
            reason,
            "UNSUPPORTED",
            message,
            false,
            true,
        );
        self.close_after = true;
        self.rlen = 0;
    }
}

enum Answer {
    Handoff,
    Done { body: Option<BodyFile>, close: bool },
}

/// The pull path: `GET`/`HEAD` of `/v2/`, blobs and manifests. Everything else is handed off.
fn answer(
    req: &httparse::Request,
    ctx: &Ctx,
    peer: Option<IpAddr>,
    head: &mut Vec<u8>,
    ev: &mut Pending,
) -> Answer {
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Answer::Handoff;
    };
    let is_head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Answer::Handoff,
    };
    let mut close = version == 0;
    let mut range_header = None;
    let mut has_body = false;
    let mut authorization = None;
    let mut agent: &[u8] = b"";
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            let v = h.value;
            if v.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if v.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("range") {
            range_header = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            has_body |= h.value != b"0";
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(h.value);
        } else if name.eq_ignore_ascii_case("user-agent") {
            agent = h.value;
        }
    }
    if has_body {
        return Answer::Handoff;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    // What the event ring records of a pull, once its last byte is out.
    let record =
        |ev: &mut Pending, action: Action, name: &lighter_layout::RepoName, reference: &[&str]| {
            if let Some(ring) = ctx.pull_log() {
                // A ring without room would drop the record: it is not made (the serving core
                // sheds the log's work first when the drain falls behind).
                if !ring.has_room() {
                    ev.shed = true;
                    return;
                }
                let r = &mut ev.record;
                r.start(action, name.as_str(), reference);
                r.set_agent(agent);
                r.set_client(peer);
                ev.recorded = true;
            }
        };
    if let (Some(h), "/healthz" | "/readyz") = (&ctx.health, path) {
        ev.route = ROUTE_HEALTH;
        let not_ready = if path == "/readyz" {
            h.not_ready()
        } else {
            None
        };
        let body = match not_ready {
            None if path == "/healthz" => r#"{"status":"ok"}"#.to_string(),
            None => r#"{"status":"ready"}"#.to_string(),
            Some(why) => format!(r#"{{"status":"not ready","reason":"{why}"}}"#),
        };
        let (status, reason) = match not_ready {
            None => (200, "OK"),
            Some(_) => (503, "Service Unavailable"),
        };
        write_head(
            head,
            status,
            reason,
            "application/json",
            body.len() as u64,
            close,
            |_| {},
        );
        if !is_head {
            head.extend_from_slice(body.as_bytes());
        }
        return Answer::Done { body: None, close };
    }
    let route = match route::parse(path) {
        Ok(r) => r,
        Err(route::RouteError::NotFound) => {
            return not_found(
                head,
                "UNSUPPORTED",
                "no such endpoint: the registry API lives under /v2/",
                is_head,
                close,
            );
        }
        // Bad names and digests: the control plane words the error.
        Err(_) => return Answer::Handoff,
    };
    // Not allowed here: the control plane answers (401, 403, 429) or serves it (Basic).
    // The caller's identity (a token's subject) goes into the record; anonymous: none.
    ev.record.set_identity(b"");
    let may_pull = |ev: &mut Pending, name: Option<&lighter_layout::RepoName>| {
        ctx.access.as_ref().is_none_or(|a| {
            let who = |subject: &str| ev.record.set_identity(subject.as_bytes());
            a.may_pull(authorization, peer, name.map(|n| n.as_str()), ctx.now, who)
        })
    };
    match route {
        Route::Base => {
            ev.route = ROUTE_BASE;
            if !may_pull(ev, None) {
                return Answer::Handoff;
            }
            write_head(head, 200, "OK", "application/json", 2, close, |_| {});
            if !is_head {
                head.extend_from_slice(b"{}");
            }
            Answer::Done { body: None, close }
        }
        Route::Blob { name, digest } => {
            let Some((name, mirror)) = mirror_of(ctx, name, query) else {
                return Answer::Handoff;
            };
            // A mirror's repository or the bucket's: a cache, filled by the control plane.
            let cache_of = mirror.map(|m| m.tag_ttl_ms).or(ctx.bucket_tag_ttl_ms);
            if !may_pull(ev, Some(&name)) {
                return Answer::Handoff;
            }
            ev.route = ROUTE_BLOB;
            let action = if is_head {
                Action::BlobHead
            } else {
                Action::BlobGet
            };
            let d = [digest.algorithm().name(), ":", digest.hex()];
            record(ev, action, &name, &d);
            if ev.recorded {
                ev.record.set_digest(&d);
            }
            let opened = ctx
                .cache
                .borrow_mut()
                .blob(&ctx.layout, &name, &digest, ctx.now);
            match opened {
                Ok(Some((file, len))) => {
                    let record = cache_of.is_some()
                        && ctx.cache.borrow_mut().record_pull(
                            &name,
                            &digest,
                            ctx.now,
                            PULL_TIME_GRANULARITY,
                        );
                    if record {
                        // Feeds the cache's least-recently-pulled eviction.
                        let touched =
                            ctx.layout
                                .touch_blob_link(&name, &digest, PULL_TIME_GRANULARITY);
                        if let Err(e) = touched {
                            tracing::debug!("cannot record a pull of {digest}: {e}");
                        }
                    }
                    send_file(
                        head,
                        BodyFile {
                            file,
                            offset: 0,
                            end: len,
                            bytes: None,
                        },
                        &digest,
                        media::OCTET_STREAM,
                        true,
                        range_header,
                        is_head,
                        close,
                    )
                }
                // A cache miss: the control plane fetches it from upstream or the bucket.
                Ok(None) if cache_of.is_some() => Answer::Handoff,
                Ok(None) => not_found(
                    head,
                    "BLOB_UNKNOWN",
                    "blob unknown to repository",
                    is_head,
                    close,
                ),
                Err(e) => io_error(head, e, is_head),
            }
        }
        Route::Manifest { name, reference } => {
            let Some((name, mirror)) = mirror_of(ctx, name, query) else {
                return Answer::Handoff;
            };
            let cache_of = mirror.map(|m| m.tag_ttl_ms).or(ctx.bucket_tag_ttl_ms);
            if !may_pull(ev, Some(&name)) {
                return Answer::Handoff;
            }
            ev.route = ROUTE_MANIFEST;
            let action = if is_head {
                Action::ManifestHead
            } else {
                Action::ManifestGet
            };
            match &reference {
                Reference::Tag(t) => record(ev, action, &name, &[t.as_str()]),
                Reference::Digest(d) => {
                    record(ev, action, &name, &[d.algorithm().name(), ":", d.hex()])
                }
            }
            let resolved = ctx
                .cache
                .borrow_mut()
                .manifest(&ctx.layout, &name, &reference, ctx.now);
            let entry = match (resolved, &reference, cache_of) {
                // A cached tag older than its TTL is checked against its source first: this
                // core hands one pull over to refresh it and answers the others from the cache
                // meanwhile, for at most the TTL (and STALE_TAG_GRACE_MS).
                (Ok(Some((_, id))), Reference::Tag(_), Some(ttl_ms))
                    if !fresh(id.modified(), ttl_ms)
                        && ctx.cache.borrow_mut().stale_handoff(
                            &name,
                            &reference,
                            ctx.now,
                            Duration::from_millis(ttl_ms.min(STALE_TAG_GRACE_MS)),
                        ) =>
                {
                    return Answer::Handoff
                }
                (r, _, _) => r.map(|found| found.map(|(e, _)| e)),
            };
            let entry = match entry {
                Ok(Some(e)) => e,
                Ok(None) if cache_of.is_some() => return Answer::Handoff,
                Ok(None) => {
                    return not_found(
                        head,
                        "MANIFEST_UNKNOWN",
                        "manifest unknown to repository",
                        is_head,
                        close,
                    );
                }
                Err(e) => return io_error(head, e, is_head),
            };
            if !accepts(req, &entry.media_type) {
                // Negotiation (child selection, refusal) is the control plane's.
                return Answer::Handoff;
            }
            if ev.recorded {
                let d = &entry.digest;
                ev.record.set_digest(&[d.algorithm().name(), ":", d.hex()]);
            }
            let opened = ctx
                .cache
                .borrow_mut()
                .manifest_content(&ctx.layout, &entry.digest);
            match opened {
                Ok(Some((file, len, bytes))) => send_file(
                    head,
                    BodyFile {
                        file,
                        offset: 0,
                        end: len,
                        bytes,
                    },
                    &entry.digest,
                    &entry.media_type,
                    false,
                    None,
                    is_head,
                    close,
                ),
                Ok(None) if cache_of.is_some() => Answer::Handoff,
                Ok(None) => not_found(
                    head,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown to repository",
                    is_head,
                    close,
                ),
                Err(e) => io_error(head, e, is_head),
            }
        }
        _ => Answer::Handoff,
    }
}

/// The status code of a response head ("HTTP/1.1 200 ..."); 0 if there is none.
fn status_of(head: &[u8]) -> u16 {
    match head.get(9..12) {
        Some(d) if d.iter().all(u8::is_ascii_digit) => {
            d.iter().fold(0u16, |n, &c| n * 10 + u16::from(c - b'0'))
        }
        _ => 0,
    }
}

/// Counts a response whose last byte is out, and records it if it was a pull.
fn record_response(
    ring: &lighter_layout::events::RingWriter,
    ev: &mut Pending,
    status: u16,
    now: Instant,
) {
    let latency_us = now.saturating_duration_since(ev.started).as_micros() as u64;
    let pull = matches!(ev.route, ROUTE_MANIFEST | ROUTE_BLOB);
    ring.count(ev.route, status, ev.sent, pull.then_some(latency_us));
    if ev.recorded {
        let r = &mut ev.record;
        r.status = status;
        r.bytes_sent = ev.sent;
        r.duration_us = latency_us;
        r.time_unix_us = unix_us_at(now);
        ring.push(r);
        ev.recorded = false;
    } else if ev.shed {
        ring.count_dropped();
        ev.shed = false;
    }
}

/// Unix µs at `now`, from this thread's reading of the wall clock, taken again once it is a
/// second old: one clock read a response instead of two. A step of the wall clock shows within
/// a second; between readings the time follows the monotonic clock.
fn unix_us_at(now: Instant) -> u64 {
    use std::cell::Cell;
    thread_local! {
        static ANCHOR: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    }
    ANCHOR.with(|anchor| match anchor.get() {
        Some((at, unix_us)) if now >= at && now - at < std::time::Duration::from_secs(1) => {
            unix_us + (now - at).as_micros() as u64
        }
        _ => {
            let unix_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            anchor.set(Some((now, unix_us)));
            unix_us
        }
    })
}

/// The repository to read and the mirror it belongs to, if any: `?ns=<upstream>` (containerd's
/// mirror convention) maps `name` to `<upstream>/<name>`; a name whose first component is an
/// upstream (`/v2/docker.io/library/nginx/...`) is that upstream's. None: no valid local name.
fn mirror_of<'c>(
    ctx: &'c Ctx,
    name: lighter_layout::RepoName,
    query: &str,
) -> Option<(lighter_layout::RepoName, Option<&'c crate::Mirror>)> {
    if ctx.mirrors.is_empty() {
        return Some((name, None));
    }
    let ns = query.split('&').find_map(|kv| kv.strip_prefix("ns="));
    let named =
        |m: &&crate::Mirror, ns: &str| m.name == ns || m.name_encoded.eq_ignore_ascii_case(ns);
    if let Some(m) = ns.and_then(|ns| ctx.mirrors.iter().find(|m| named(m, ns))) {
        return lighter_layout::RepoName::mirrored(&m.name, &name).map(|n| (n, Some(m)));
    }
    let m = ctx
        .mirrors
        .iter()
        .find(|m| name.rest().is_some() && m.prefix == name.first_component());
    Some((name, m))
}

fn fresh(written: std::time::SystemTime, ttl_ms: u64) -> bool {
    written
        .elapsed()
        .is_ok_and(|age| age.as_millis() < u128::from(ttl_ms))
}

/// Whether the `Accept` headers (if any) take `media_type` or anything.
fn accepts(req: &httparse::Request, media_type: &str) -> bool {
    let mut seen = false;
    for h in req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("accept"))
    {
        seen = true;
        let Ok(v) = std::str::from_utf8(h.value) else {
            continue;
        };
        for t in v.split(',') {
            let t = media::strip_parameters(t);
            if t == media_type || t == "*/*" || t == "application/*" || t == "application/json" {
                return true;
            }
        }
    }
    !seen
}

/// Answers with `content` (the whole file, from offset 0), or the part `range_header` asks for.
#[allow(clippy::too_many_arguments)]
fn send_file(
    head: &mut Vec<u8>,
    content: BodyFile,
    digest: &Digest,
    content_type: &str,
    ranges: bool,
    range_header: Option<&[u8]>,
    is_head: bool,
    close: bool,
) -> Answer {
    let len = content.end;
    let (status, reason, start, count) = match if ranges {
        range::answer(range_header, len)
    } else {
        RangeAnswer::Full
    } {
        RangeAnswer::Full => (200, "OK", 0, len),
        RangeAnswer::Partial { start, end } => (206, "Partial Content", start, end - start + 1),
        RangeAnswer::Unsatisfiable => {
            let msg_len = ERROR_JSON_PREFIX.len()
                + "SIZE_INVALID".len()
                + ERROR_JSON_MIDDLE.len()
                + "range not satisfiable".len()
                + ERROR_JSON_SUFFIX.len();
            write_head(
                head,
                416,
                "Range Not Satisfiable",
                "application/json",
                msg_len as u64,
                close,
                |h| {
                    h.extend_from_slice(b"Content-Range: bytes */");
                    push_u64(h, len);
                    h.extend_from_slice(b"\r\n");
                },
            );
            if !is_head {
                write_error_body(head, "SIZE_INVALID", "range not satisfiable");
            }
            return Answer::Done { body: None, close };
        }
    };
    write_head(head, status, reason, content_type, count, close, |h| {
        for (name, quote) in [
            (&b"Docker-Content-Digest: "[..], &b""[..]),
            (b"Etag: ", b"\""),
        ] {
            h.extend_from_slice(name);
            h.extend_from_slice(quote);
            h.extend_from_slice(digest.algorithm().name().as_bytes());
            h.push(b':');
            h.extend_from_slice(digest.hex().as_bytes());
            h.extend_from_slice(quote);
            h.extend_from_slice(b"\r\n");
        }
        if ranges {
            h.extend_from_slice(b"Accept-Ranges: bytes\r\n");
        }
        if status == 206 {
            h.extend_from_slice(b"Content-Range: bytes ");
            push_u64(h, start);
            h.push(b'-');
            push_u64(h, start + count - 1);
            h.push(b'/');
            push_u64(h, len);
            h.extend_from_slice(b"\r\n");
        }
    });
    let body = (!is_head && count > 0).then_some(BodyFile {
        offset: start,
        end: start + count,
        ..content
    });
    Answer::Done { body, close }
}

/// A 404 with the OCI error body.
fn not_found(head: &mut Vec<u8>, code: &str, message: &str, is_head: bool, close: bool) -> Answer {
    write_error(head, 404, "Not Found", code, message, is_head, close);
    Answer::Done { body: None, close }
}

fn io_error(head: &mut Vec<u8>, e: std::io::Error, is_head: bool) -> Answer {
    tracing::error!("data directory read failed: {e}");
    write_error(
        head,
        500,
        "Internal Server Error",
        "UNKNOWN",
        "storage error, see the registry's log",
        is_head,
        true,
    );
    Answer::Done {
        body: None,
        close: true,
    }
}

fn write_head(
    head: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    len: u64,
    close: bool,
    extra: impl FnOnce(&mut Vec<u8>),
) {
    // Written piece by piece: `core::fmt` here was a measurable share of a small GET's CPU.
    head.extend_from_slice(b"HTTP/1.1 ");
    push_u64(head, u64::from(status));
    head.push(b' ');
    head.extend_from_slice(reason.as_bytes());
    head.extend_from_slice(b"\r\nContent-Type: ");
    head.extend_from_slice(content_type.as_bytes());
    head.extend_from_slice(b"\r\nContent-Length: ");
    push_u64(head, len);
    head.extend_from_slice(b"\r\nDocker-Distribution-Api-Version: registry/2.0\r\n");
    extra(head);
    if close {
        head.extend_from_slice(b"Connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

const ERROR_JSON_PREFIX: &str = "{\"errors\":[{\"code\":\"";
const ERROR_JSON_MIDDLE: &str = "\",\"message\":\"";
const ERROR_JSON_SUFFIX: &str = "\"}]}";

/// An OCI error response; `message` must need no JSON escaping (it is always a literal here).
fn write_error(
    head: &mut Vec<u8>,
    status: u16,
    reason: &str,
    code: &str,
    message: &str,
    is_head: bool,
    close: bool,
) {
    debug_assert!(!message.contains(['"', '\\']));
    let len = ERROR_JSON_PREFIX.len()
        + code.len()
        + ERROR_JSON_MIDDLE.len()
        + message.len()
        + ERROR_JSON_SUFFIX.len();
    write_head(
        head,
        status,
        reason,
        "application/json",
        len as u64,
        close,
        |_| {},
    );
    if !is_head {
        write_error_body(head, code, message);
    }
}

fn write_error_body(head: &mut Vec<u8>, code: &str, message: &str) {
    for part in [
        ERROR_JSON_PREFIX,
        code,
        ERROR_JSON_MIDDLE,
        message,
        ERROR_JSON_SUFFIX,
    ] {
        head.extend_from_slice(part.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_times_follow_the_wall_clock_from_one_reading_a_second() {
        let wall = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64
        };
        let t0 = Instant::now();
        let before = wall();
        let a = unix_us_at(t0);
        let b = unix_us_at(t0 + std::time::Duration::from_millis(300));
        let c = unix_us_at(t0 + std::time::Duration::from_millis(1500));
        let after = wall();
        // Within the wall clock's readings around it (a re-anchor may read up to now), and in
        // step with the monotonic clock in between.
        assert!(before <= a + 1000 && a <= after, "{before} {a} {after}");
        assert_eq!(b - a, 300_000);
        // Past a second the wall clock is read again: the time is then, not t0 + 1.5 s.
        assert!(c <= after + 1000 && c >= before, "{c} {before} {after}");
    }

    fn ctx(dir: &std::path::Path) -> Ctx {
        Ctx {
            layout: Layout::open(dir),
            cache: Default::default(),
            mirrors: Vec::new(),
            bucket_tag_ttl_ms: None,
            now: Instant::now(),
            idle_timeout_ms: 1000,
            request_header_timeout_ms: 1000,
            access: None,
            health: None,
            events: None,
        }
    }

    fn feed(conn: &mut Conn, bytes: &[u8], ctx: &Ctx) {
        conn.recv_space()[..bytes.len()].copy_from_slice(bytes);
        conn.on_recv(bytes.len(), ctx);
    }

    #[test]
    fn base_answers_and_pipelined_requests_are_answered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let mut c = Conn::new(8192, None, &ctx);
        feed(
            &mut c,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\n\r\n",
            &ctx,
        );
        assert_eq!(c.step(), Step::SendHead);
        let first = String::from_utf8(c.head_pending().to_vec()).unwrap();
        assert!(
            first.starts_with("HTTP/1.1 200 OK\r\n") && first.ends_with("\r\n\r\n{}"),
            "{first}"
        );
        let n = c.head_pending().len();
        c.on_head_sent(n, &ctx);
        let second = String::from_utf8(c.head_pending().to_vec()).unwrap();
        assert!(second.starts_with("HTTP/1.1 404 Not Found\r\n"), "{second}");
        let n = c.head_pending().len();
        c.on_head_sent(n, &ctx);
        assert_eq!(c.step(), Step::Recv);
    }

    #[test]
    fn partial_requests_wait_and_oversized_heads_get_431() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let mut c = Conn::new(64, None, &ctx);
        feed(&mut c, b"GET /v2/ HTTP/1.1\r\n", &ctx);
        assert_eq!(c.step(), Step::Recv);
        feed(&mut c, &[b'a'; 45], &ctx);
        assert_eq!(c.step(), Step::SendHead);
        assert!(c.head_pending().starts_with(b"HTTP/1.1 431 "));
    }

    #[test]
    fn pushes_and_lists_are_handed_off_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let mut c = Conn::new(8192, None, &ctx);
        let req = b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        feed(&mut c, req, &ctx);
        assert_eq!(c.step(), Step::Handoff);
        assert_eq!(c.unconsumed(), req);
        let mut c = Conn::new(8192, None, &ctx);
        feed(&mut c, b"GET /v2/a/tags/list HTTP/1.1\r\n\r\n", &ctx);
        assert_eq!(c.step(), Step::Handoff);
    }

    #[test]
    fn garbage_gets_400_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let mut c = Conn::new(8192, None, &ctx);
        feed(&mut c, b"\x00\x01\x02 garbage\r\n\r\n", &ctx);
        assert!(c.head_pending().starts_with(b"HTTP/1.1 400 "));
        let n = c.head_pending().len();
        c.on_head_sent(n, &ctx);
        assert_eq!(c.step(), Step::Close);
    }
}
