//! The control plane's end of a connection handoff (see `lighter_dataplane::handoff`): accepts on
//! the control socket, receives the client's TCP socket (SCM_RIGHTS) and the request bytes the
//! data plane already read, and gives hyper a stream that yields those bytes first.
//!
//! A handed-over connection serves one request here. When the data plane waits for it back
//! ([`Handoff::back`]) and the exchange left the connection reusable (HTTP/1.1, no `close` on
//! either side, the request's body read to its end, nothing else started), it is given back
//! after the answer with the bytes read past the request ([`give_back`]): a client's next
//! request goes to the data plane on the same connection. Otherwise the connection is closed,
//! lingering ([`linger`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use lighter_dataplane::handoff::{ADDRESS_FOLLOWS, FLAGS, RETURN_WANTED};

/// A handed-over client connection: the bytes already read, then the socket.
///
/// The socket is the client's TCP socket, or, for a TLS connection the data plane relays, its
/// end of a Unix socket pair carrying the decrypted stream; both are read, written, shut down
/// and sendfile'd to alike, so it is held as a `TcpStream` either way, and the client's
/// address travels with the handoff ([`Prefixed::peer_ip`]).
pub struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
    peer: Option<std::net::IpAddr>,
    /// The length of the handed-over request, head and body (None: not a whole head, or a
    /// body whose end its head does not tell: chunked, or a bad Content-Length).
    request_len: Option<u64>,
    /// Set while the connection may be given back: shutting down only flushes, and reads and
    /// writes are noted in it.
    exchange: Option<Arc<Exchange>>,
}

/// A handoff received: the connection, and the Unix socket to give it back on when the data
/// plane waits for it.
pub struct Handoff {
    pub io: Prefixed,
    pub back: Option<UnixStream>,
}

/// Receives one handoff on `stream`. `prefix_max_bytes` bounds the bytes accepted with it.
pub async fn receive(stream: UnixStream, prefix_max_bytes: usize) -> io::Result<Handoff> {
    let mut first = [0u8; 4];
    let (fd, got) = loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            lighter_dataplane::handoff::recvmsg_with_fd(stream.as_raw_fd(), &mut [&mut first])
        }) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    let fd =
        fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "handoff without a socket"))?;
    let mut stream = stream;
    if got < first.len() {
        stream.read_exact(&mut first[got..]).await?;
    }
    let word = u32::from_le_bytes(first);
    let relayed = word & ADDRESS_FOLLOWS != 0;
    let wants_back = word & RETURN_WANTED != 0;
    let len = (word & !FLAGS) as usize;
    if len > prefix_max_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handoff prefix over the request header limit",
        ));
    }
    let mut prefix = vec![0u8; len];
    stream.read_exact(&mut prefix).await?;
    let peer = if relayed {
        let mut a = [0u8; 17];
        stream.read_exact(&mut a).await?;
        match a[0] {
            4 => Some(std::net::IpAddr::from(
                <[u8; 4]>::try_from(&a[1..5]).expect("4 bytes"),
            )),
            6 => Some(std::net::IpAddr::from(
                <[u8; 16]>::try_from(&a[1..]).expect("16 bytes"),
            )),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "handoff with a bad client address",
                ))
            }
        }
    } else {
        None
    };
    let tcp = std::net::TcpStream::from(fd);
    tcp.set_nonblocking(true)?;
    let request_len = request_len(&prefix);
    Ok(Handoff {
        io: Prefixed {
            prefix,
            pos: 0,
            inner: TcpStream::from_std(tcp)?,
            peer,
            request_len,
            exchange: None,
        },
        back: wants_back.then_some(stream),
    })
}

/// The length of the request at the start of `bytes`, head and body, when its head is whole
/// and says where the body ends (Content-Length, or no body).
fn request_len(bytes: &[u8]) -> Option<u64> {
    let mut headers = [httparse::EMPTY_HEADER; lighter_dataplane::conn::HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = req.parse(bytes).ok()? else {
        return None;
    };
    let mut body = 0u64;
    let mut lengths = 0;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            body = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        }
    }
    (lengths <= 1).then_some(head as u64 + body)
}

impl Prefixed {
    /// The bytes handed over and not yet read: the request head (and anything pipelined).
    pub fn pending(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }

    /// The client's address.
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        self.peer
            .or_else(|| self.inner.peer_addr().ok().map(|a| a.ip()))
    }

    /// The client's socket, dropping what was not read of the handed-over bytes.
    pub fn into_tcp(self) -> TcpStream {
        self.inner
    }

    /// A second descriptor of the client's socket: it keeps the connection open after hyper
    /// has answered and dropped its own, for [`linger`].
    pub fn socket_dup(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.inner.as_fd().try_clone_to_owned()
    }

    /// Prepares the connection to be given back after its one request, if that request's
    /// length is known: from then on the reader gets exactly that request and nothing past it
    /// (hyper never starts a second one: what follows is the data plane's), shutting down
    /// only flushes, and what is read and written is noted in the returned [`Exchange`].
    pub fn keep_open(&mut self) -> Option<Arc<Exchange>> {
        let x = Arc::new(Exchange {
            request_len: self.request_len?,
            ..Exchange::default()
        });
        self.exchange = Some(x.clone());
        Some(x)
    }
}

/// One exchange on a handed-over connection that may be given back: noted by the connection
/// ([`Prefixed`]) and by the service wrapper around the API, read by [`reusable`].
#[derive(Default)]
pub struct Exchange {
    /// The length of the handed-over request, head and body: all hyper is given.
    request_len: u64,
    /// Bytes given to hyper so far (the handoff's, then the socket's).
    delivered: AtomicU64,
    /// Set by the first write: the answer has started.
    answering: AtomicBool,
    /// Requests hyper read on the connection.
    requests: AtomicU64,
    /// Nothing in the exchange closes the connection.
    reusable: AtomicBool,
}

impl Exchange {
    /// Whether the answer has started (its head is out).
    pub fn answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    /// A write to the client: the answer has started, unless it is an interim `100 Continue`
    /// (after which hyper still encodes the real answer, which must not say `close`).
    fn note_write(&self, bytes: &[u8]) {
        if !bytes.starts_with(b"HTTP/1.1 1") {
            self.answering.store(true, Ordering::Relaxed);
        }
    }

    /// Notes a request: whether its head leaves the connection reusable.
    pub fn request<B>(&self, req: &hyper::Request<B>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let h = req.headers();
        let ok = req.version() == hyper::Version::HTTP_11
            && !closes(h)
            && !h.contains_key(hyper::header::UPGRADE);
        self.reusable.store(ok, Ordering::Relaxed);
    }

    /// Looks at the answer before hyper writes it: when the exchange cannot leave the
    /// connection reusable (the request's head said so, the answer closes or switches
    /// protocols, or the body was answered before hyper read all of it), the answer says
    /// `Connection: close`, so the client does not send another request on it.
    pub fn answer<B>(&self, res: &mut hyper::Response<B>) {
        let body_read = self.delivered.load(Ordering::Relaxed) >= self.request_len;
        let ok = self.reusable.load(Ordering::Relaxed)
            && body_read
            && !closes(res.headers())
            && res.status() != hyper::StatusCode::SWITCHING_PROTOCOLS;
        if !ok {
            self.reusable.store(false, Ordering::Relaxed);
            if res.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                res.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
        }
    }
}

/// Whether a `Connection` header says `close`.
fn closes(h: &hyper::HeaderMap) -> bool {
    h.get_all(hyper::header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    })
}

/// The bytes to give back with a connection hyper has finished with (`read_buf`, what hyper
/// read and did not use, then what it never read of the handoff), if the exchange left it
/// reusable: exactly one request, its whole head and body consumed, nothing more than a
/// request head's worth pending.
pub fn reusable(io: &Prefixed, read_buf: &[u8], pending_max: usize) -> Option<Vec<u8>> {
    let x = io.exchange.as_ref()?;
    let consumed = x
        .delivered
        .load(Ordering::Relaxed)
        .checked_sub(read_buf.len() as u64)?;
    let whole = x.requests.load(Ordering::Relaxed) == 1
        && x.reusable.load(Ordering::Relaxed)
        && consumed == x.request_len;
    let pending = read_buf.len() + io.pending().len();
    if !whole || pending > pending_max {
        return None;
    }
    let mut bytes = Vec::with_capacity(pending);
    bytes.extend_from_slice(read_buf);
    bytes.extend_from_slice(io.pending());
    Some(bytes)
}

/// What [`reusable`] found, for the log.
pub fn why_not(io: &Prefixed, read_buf: &[u8]) -> String {
    match &io.exchange {
        None => "not kept open".into(),
        Some(x) => format!(
            "requests {}, reusable {}, request length {}, delivered {}, unread {}, pending {}",
            x.requests.load(Ordering::Relaxed),
            x.reusable.load(Ordering::Relaxed),
            x.request_len,
            x.delivered.load(Ordering::Relaxed),
            read_buf.len(),
            io.pending().len()
        ),
    }
}

/// Gives the connection back to the data plane on `back` with the `pending` bytes; on success
/// this process keeps no descriptor of it.
pub async fn give_back(back: UnixStream, io: Prefixed, pending: &[u8]) -> io::Result<()> {
    back.writable().await?;
    back.try_io(Interest::WRITABLE, || {
        lighter_dataplane::handoff::send_back(back.as_raw_fd(), io.inner.as_raw_fd(), pending)
    })
}

/// Shuts the sending half of a socket down (the answer is complete).
pub fn shut_write(socket: &OwnedFd) {
    // SAFETY: shutdown of a socket descriptor we hold; errors (already closed) do not matter.
    unsafe {
        libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR);
    }
}

/// The last step of a handed-over connection, once hyper has answered and shut down its
/// sending half: reads and discards what the client still sends (a body answered before it
/// was read) until the client closes its half, pauses for a second, or `linger` passes, then
/// closes. Closing with unread bytes makes the kernel reset the connection, and a client still
/// writing its body may lose the answer to that reset (nginx's lingering close).
pub async fn linger(socket: OwnedFd, linger: Duration) {
    /// Longest wait for more bytes from the client before closing anyway.
    const LINGER_IDLE: Duration = Duration::from_millis(1000);
    if linger.is_zero() {
        return;
    }
    let Ok(mut io) = TcpStream::from_std(std::net::TcpStream::from(socket)) else {
        return;
    };
    let deadline = tokio::time::Instant::now() + linger;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(LINGER_IDLE);
        match tokio::time::timeout(wait, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Kept open for a return: nothing past the one request (see `keep_open`). No wake-up
        // is due; hyper has the request and ends once it has answered.
        let allowed = match &this.exchange {
            Some(x) => {
                let left = x.request_len - x.delivered.load(Ordering::Relaxed);
                if left == 0 {
                    return Poll::Pending;
                }
                usize::try_from(left).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos)
                .min(buf.remaining())
                .min(allowed);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if let Some(x) = &this.exchange {
                x.delivered.fetch_add(n as u64, Ordering::Relaxed);
            }
            return Poll::Ready(Ok(()));
        }
        let mut limited = buf.take(allowed);
        let r = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        // SAFETY: `limited` is a view of `buf`'s unfilled part; its first `n` bytes were
        // filled by the read.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        if let Some(x) = &this.exchange {
            x.delivered.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(x) = &self.exchange {
            x.note_write(buf);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(x) = &self.exchange {
            if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
                x.note_write(first);
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.exchange.is_some() {
            // hyper has flushed its answer; whether the connection goes back to the data
            // plane or closes is decided once hyper is done.
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
