//! HTTPS on the registry port (`tls_cert_path`, `tls_key_path`), with rustls.
//!
//! Where the kernel offers TLS (the `tls` ULP), the record layer could be handed to it after
//! the handshake and bodies would keep going out with sendfile; this machine's kernel has no
//! such module, so that path is not built yet: [`kernel_tls`] says at start which one is in
//! use, as the engine choice does. In user space, the epoll driver runs each connection through
//! a rustls session: request bytes are decrypted into the same [`crate::conn::Conn`] state
//! machine, response heads are encrypted as they are, and a body is read from its file in
//! `BODY_CHUNK_BYTES` pieces and encrypted (the one place blob bytes cross user space: they
//! must, to be encrypted). At most one piece of ciphertext waits per connection.
//!
//! A request for the control plane cannot take its socket along (the TLS session lives here),
//! so the connection is relayed: a Unix socket pair, one end handed over exactly like a client
//! socket (with the client's address), the other end and the session moved to a relay thread
//! that decrypts towards the control plane and encrypts its answers. Relays are the cold path
//! (pushes, lists, refusals); at most `RELAYS_MAX` run at once. When the control plane gives
//! the pair's end back after its answer (see `handoff`), the relay sends the rest of the
//! answer, gathers the plaintext that followed the request, and returns the connection and its
//! session to the core it came from ([`Inbox`]): the client's next request (a pull after a 401,
//! the next blob of a push) is the core's again, on the same TLS session.
//!
//! The certificate and key are reloaded when their files change (checked every second), and a
//! pair that does not match (mid-rotation) is not taken.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConnection;

use crate::conn::Step;
use crate::worker::Worker;

/// Plaintext read from a body file and encrypted at a time.
const BODY_CHUNK_BYTES: usize = 64 << 10;
/// Relayed connections (handed to the control plane) at once, all cores together.
const RELAYS_MAX: usize = 1024;
/// Bytes a relay reads from either side at a time.
const RELAY_READ_BYTES: usize = 16 << 10;
/// Plaintext a relay holds for the control plane before it stops reading the client.
const RELAY_BUFFER_BYTES: usize = 64 << 10;

static RELAYS: AtomicUsize = AtomicUsize::new(0);

/// Certificate and key files, and the field names that configure them (for messages).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// What the certificate is for, in the log: `TLS` (the registry port), `webhook`.
    pub name: &'static str,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_field: &'static str,
    pub key_field: &'static str,
}

/// A certificate resolver that picks up new certificate and key files.
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.files.cert)
            .finish()
    }
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_pair(f: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{} {}: {e}", f.cert_field, f.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{} {}: no certificate",
            f.cert_field,
            f.cert.display()
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(&f.key)
        .map_err(|e| format!("{} {}: {e}", f.key_field, f.key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{} {}: {e}", f.key_field, f.key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    // Mid-rotation one file may be new and the other old: never serve a mismatched pair.
    pair.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            f.cert.display(),
            f.key.display()
        )
    })?;
    Ok(Arc::new(pair))
}

impl ReloadingCert {
    pub fn load(files: TlsFiles) -> Result<ReloadingCert, String> {
        let pair = load_pair(&files)?;
        let times = (modified(&files.cert), modified(&files.key));
        Ok(ReloadingCert {
            current: RwLock::new((pair, times.0, times.1)),
            files,
        })
    }

    /// Takes the files again if either changed and they make a matching pair.
    pub fn reload_if_changed(&self) {
        let times = (modified(&self.files.cert), modified(&self.files.key));
        {
            let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
            if (cur.1, cur.2) == times {
                return;
            }
        }
        match load_pair(&self.files) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = (pair, times.0, times.1);
                tracing::info!(cert = %self.files.cert.display(), "{} certificate reloaded", self.files.name);
            }
            // Mid-rotation (one file written, not the other): keep serving the old pair.
            Err(e) => tracing::warn!("{} certificate not reloaded yet: {e}", self.files.name),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}

/// A rustls server configuration (ring, TLS 1.2 and 1.3, HTTP/1.1) over a reloading resolver.
pub fn server_config(resolver: Arc<ReloadingCert>) -> Arc<rustls::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// Whether the kernel can take over the TLS record layer (the `tls` ULP); why not, if not.
pub fn kernel_tls() -> Result<(), String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let s = std::net::TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let ulp = b"tls";
    // SAFETY: setsockopt on a socket we own, with a buffer of the length given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().to_string())
    }
}

/// The TLS sessions of one core's connections, by connection index.
pub struct Sessions {
    config: Arc<rustls::ServerConfig>,
    sessions: Vec<Option<ServerConnection>>,
    chunk: Box<[u8]>,
    /// Connections coming back to this core from relays.
    pub inbox: Arc<Inbox>,
}

/// A relayed connection on its way back to its core: the client's socket, its session, and
/// the plaintext received past the request the control plane answered.
pub struct Returning {
    pub client: OwnedFd,
    pub session: ServerConnection,
    pub bytes: Vec<u8>,
}

/// Where relays leave connections for their core, and the eventfd that wakes the core's loop.
pub struct Inbox {
    items: std::sync::Mutex<Vec<Returning>>,
    event: OwnedFd,
}

impl Inbox {
    fn new() -> io::Result<Inbox> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Inbox {
            items: Default::default(),
            // SAFETY: a new descriptor we own.
            event: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The descriptor the core's loop watches.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn put(&self, r: Returning) {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).push(r);
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    /// Everything waiting (and the wake-up cleared).
    pub fn take(&self) -> Vec<Returning> {
        let mut count = [0u8; 8];
        // SAFETY: an 8-byte read from our eventfd.
        unsafe { libc::read(self.event.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Sessions {
    pub fn new(config: Arc<rustls::ServerConfig>) -> io::Result<Sessions> {
        Ok(Sessions {
            config,
            sessions: Vec::new(),
            chunk: vec![0u8; BODY_CHUNK_BYTES].into_boxed_slice(),
            inbox: Arc::new(Inbox::new()?),
        })
    }

    /// Takes back a connection a relay returned: its session at `idx`.
    pub fn restore(&mut self, idx: usize, session: ServerConnection) {
        if self.sessions.len() <= idx {
            self.sessions.resize_with(idx + 1, || None);
        }
        self.sessions[idx] = Some(session);
    }

    /// A new session for the connection at `idx`; false if rustls refuses (never expected).
    pub fn open(&mut self, idx: usize) -> bool {
        if self.sessions.len() <= idx {
            self.sessions.resize_with(idx + 1, || None);
        }
        match ServerConnection::new(self.config.clone()) {
            Ok(mut s) => {
                // Room for a chunk of body and a head; more waits for a flush.
                s.set_buffer_limit(Some(2 * BODY_CHUNK_BYTES));
                self.sessions[idx] = Some(s);
                true
            }
            Err(e) => {
                tracing::error!("cannot start a TLS session: {e}");
                false
            }
        }
    }

    pub fn close(&mut self, idx: usize) {
        if let Some(s) = self.sessions.get_mut(idx) {
            *s = None;
        }
    }
}

/// A raw socket as `Read + Write` for rustls.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::sys::recv(self.0, buf)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::sys::send(self.0, buf, false)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a connection waits for after [`drive`].
enum Next {
    Again,
    Wait,
    Close,
}

/// Moves a TLS connection forward until it would block (the epoll driver's `drive` for HTTPS).
/// `watch(fd, false)` stops the driver watching a socket that leaves this core, `watch(fd,
/// true)` watches it again if it stays after all.
pub fn drive(w: &mut Worker, s: &mut Sessions, idx: usize, watch: impl Fn(RawFd, bool)) {
    // Plaintext encrypted since the last flush: a response head and a small body go out in one
    // send, a large body a chunk at a time.
    let mut unflushed = 0;
    loop {
        let next = step(w, s, idx, &watch, &mut unflushed);
        match next {
            Next::Again => {}
            Next::Wait => return,
            Next::Close => {
                if let (Some(e), Some(Some(t))) = (
                    w.conns.get(idx).and_then(|e| e.as_ref()),
                    s.sessions.get_mut(idx),
                ) {
                    t.send_close_notify();
                    let _ = t.write_tls(&mut Fd(e.fd.as_raw_fd()));
                }
                s.close(idx);
                w.remove(idx);
                return;
            }
        }
    }
}

fn step(
    w: &mut Worker,
    s: &mut Sessions,
    idx: usize,
    watch: &impl Fn(RawFd, bool),
    unflushed: &mut usize,
) -> Next {
    let Some(entry) = w.conns.get_mut(idx).and_then(|e| e.as_mut()) else {
        return Next::Wait;
    };
    let Some(Some(tls)) = s.sessions.get_mut(idx) else {
        return Next::Close;
    };
    let fd = entry.fd.as_raw_fd();
    let sending = matches!(entry.conn.step(), Step::SendHead | Step::SendBody);
    // Ciphertext out before anything else, except more of a response while less than a chunk
    // of it waits.
    if !sending || *unflushed >= BODY_CHUNK_BYTES {
        *unflushed = 0;
    }
    while tls.wants_write() && *unflushed == 0 {
        match tls.write_tls(&mut Fd(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    let conn = &mut entry.conn;
    match conn.step() {
        Step::Recv => match tls.reader().read(conn.recv_space()) {
            Ok(n) => {
                // 0: the client's close_notify.
                conn.on_recv(n, &w.ctx);
                Next::Again
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match tls.read_tls(&mut Fd(fd)) {
                Ok(0) => {
                    conn.on_recv(0, &w.ctx);
                    Next::Again
                }
                Ok(_) => match tls.process_new_packets() {
                    Ok(_) => Next::Again,
                    Err(e) => {
                        tracing::debug!("TLS: {e}");
                        // The alert rustls queued goes out in Close.
                        Next::Close
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Next::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Next::Again,
                Err(_) => Next::Close,
            },
            // Closed without close_notify.
            Err(_) => Next::Close,
        },
        Step::SendHead => {
            // A head and a body that fit one chunk go out as one record, when nothing waits.
            if *unflushed == 0 && !tls.wants_write() {
                let body = coalesce(conn, &mut s.chunk);
                if body > 0 {
                    let head = conn.head_pending().len();
                    return match tls.writer().write(&s.chunk[..head + body]) {
                        Ok(n) if n == head + body => {
                            *unflushed += n;
                            conn.on_head_sent(head, &w.ctx);
                            conn.on_body_sent(body, &w.ctx);
                            Next::Again
                        }
                        _ => Next::Close,
                    };
                }
            }
            match tls.writer().write(conn.head_pending()) {
                // rustls' buffer is full: flush first.
                Ok(0) => {
                    *unflushed = BODY_CHUNK_BYTES;
                    Next::Again
                }
                Ok(n) => {
                    *unflushed += n;
                    conn.on_head_sent(n, &w.ctx);
                    Next::Again
                }
                Err(_) => Next::Close,
            }
        }
        Step::SendBody => {
            let body = conn.body().expect("SendBody has a body");
            let want = (body.end - body.offset).min(s.chunk.len() as u64) as usize;
            let read = {
                use std::os::unix::fs::FileExt;
                body.file.read_at(&mut s.chunk[..want], body.offset)
            };
            match read {
                Ok(0) => {
                    conn.on_body_eof();
                    Next::Again
                }
                // What rustls does not take now is read again from the file next time.
                Ok(n) => match tls.writer().write(&s.chunk[..n]) {
                    Ok(0) => {
                        *unflushed = BODY_CHUNK_BYTES;
                        Next::Again
                    }
                    Ok(taken) => {
                        *unflushed += taken;
                        conn.on_body_sent(taken, &w.ctx);
                        Next::Again
                    }
                    Err(_) => Next::Close,
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Next::Again,
                Err(e) => {
                    tracing::error!("data directory read failed: {e}");
                    Next::Close
                }
            }
        }
        Step::Handoff => {
            watch(fd, false);
            match relay(w, s, idx) {
                Ok(()) => Next::Wait,
                Err(e) => {
                    tracing::error!("cannot hand a request to the control plane: {e}");
                    watch(fd, true);
                    if let Some(e) = w.conns.get_mut(idx).and_then(|e| e.as_mut()) {
                        e.conn.handoff_failed();
                    }
                    Next::Again
                }
            }
        }
        Step::Close => Next::Close,
    }
}

/// Copies the pending head and the whole body into `chunk` if they fit; the body's length (0:
/// they do not fit, or the file ended early, or there is no body).
fn coalesce(conn: &crate::conn::Conn, chunk: &mut [u8]) -> usize {
    use std::os::unix::fs::FileExt;
    let Some(body) = conn.body() else { return 0 };
    let head = conn.head_pending();
    let len = (body.end - body.offset) as usize;
    if head.len() + len > chunk.len() {
        return 0;
    }
    chunk[..head.len()].copy_from_slice(head);
    if let Some((_, bytes)) = conn.head_with_bytes() {
        chunk[head.len()..head.len() + len].copy_from_slice(bytes);
        return len;
    }
    match body
        .file
        .read_exact_at(&mut chunk[head.len()..head.len() + len], body.offset)
    {
        Ok(()) => len,
        Err(_) => 0,
    }
}

/// Hands the connection to the control plane through a socket pair and moves the session to a
/// relay thread. On success the connection has left this core.
fn relay(w: &mut Worker, s: &mut Sessions, idx: usize) -> io::Result<()> {
    if RELAYS.fetch_add(1, Ordering::AcqRel) >= RELAYS_MAX {
        RELAYS.fetch_sub(1, Ordering::AcqRel);
        return Err(io::Error::other("too many relayed connections"));
    }
    let want_back = !w.stopping();
    let result = (|| {
        let entry = w.conns[idx].as_ref().expect("live connection");
        let peer = crate::sys::peer_ip(entry.fd.as_raw_fd());
        let (ours, theirs) = socket_pair()?;
        let back = crate::handoff::send(
            &w.config.control_socket_path,
            theirs.as_raw_fd(),
            entry.conn.unconsumed(),
            peer,
            want_back,
        )?;
        Ok((ours, want_back.then_some(OwnedFd::from(back))))
    })();
    let (ours, back) = match result {
        Ok(o) => o,
        Err(e) => {
            RELAYS.fetch_sub(1, Ordering::AcqRel);
            return Err(e);
        }
    };
    let session = s.sessions[idx]
        .take()
        .expect("session of a live connection");
    let client = w.take(idx).fd;
    let idle = Duration::from_millis(w.config.idle_timeout_ms);
    let pending_max = w.config.request_header_size_max_bytes;
    let inbox = s.inbox.clone();
    let spawned = std::thread::Builder::new()
        .name("lighter-tls-relay".into())
        .stack_size(128 << 10)
        .spawn(move || {
            let back = back.map(|b| (b, pending_max));
            if let Some(r) = relay_loop(client, session, ours, back, idle) {
                inbox.put(r);
            }
            RELAYS.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        // The connection is gone with the closure; the client sees it closed.
        RELAYS.fetch_sub(1, Ordering::AcqRel);
        tracing::error!("cannot start a TLS relay: {e}");
    }
    Ok(())
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new descriptors into `fds` on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Relays one connection until either side is done or nothing moves for `idle`, or until the
/// control plane gives the connection back on `back` (the handoff's Unix socket, with the
/// most bytes it may bring): then returns it for its core.
fn relay_loop(
    client: OwnedFd,
    mut tls: ServerConnection,
    pair: OwnedFd,
    mut back: Option<(OwnedFd, usize)>,
    idle: Duration,
) -> Option<Returning> {
    let (c, p) = (client.as_raw_fd(), pair.as_raw_fd());
    let mut to_pair: Vec<u8> = Vec::with_capacity(RELAY_BUFFER_BYTES);
    let mut buf = vec![0u8; RELAY_READ_BYTES];
    let (mut client_done, mut pair_done, mut pair_shut) = (false, false, false);
    // The control plane has started its answer. While it may give the connection back, what
    // the client sends next (its next request, often with a large body) is left in the
    // socket for the core that takes the connection back: decrypted here, it could not all be
    // handed over with the connection.
    let mut answering = false;
    let shut_wr = |fd: RawFd| {
        // SAFETY: shutdown of a socket we own.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    };
    loop {
        while tls.wants_write() {
            match tls.write_tls(&mut Fd(c)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        while !to_pair.is_empty() {
            match crate::sys::send(p, &to_pair, false) {
                Ok(n) => {
                    to_pair.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        if client_done && to_pair.is_empty() && !pair_shut {
            // The client is done sending: so is the control plane's side of the request.
            shut_wr(p);
            pair_shut = true;
        }
        if pair_done && !tls.wants_write() {
            return None;
        }
        let mut fds = [
            libc::pollfd {
                fd: c,
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: p,
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: back.as_ref().map_or(-1, |(b, _)| b.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if !client_done && to_pair.len() < RELAY_BUFFER_BYTES && !(answering && back.is_some()) {
            fds[0].events |= libc::POLLIN;
        }
        if tls.wants_write() {
            fds[0].events |= libc::POLLOUT;
        }
        if !pair_done && !tls.wants_write() {
            fds[1].events |= libc::POLLIN;
        }
        if !to_pair.is_empty() {
            fds[1].events |= libc::POLLOUT;
        }
        // SAFETY: three valid pollfd entries (a negative fd is ignored).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, idle.as_millis() as libc::c_int) };
        if n == 0 {
            return None;
        }
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        if fds[2].revents != 0 {
            let (b, pending_max) = back.take().expect("polled");
            let mut pending = vec![0u8; pending_max];
            match crate::handoff::receive_back(b.as_raw_fd(), &mut pending) {
                crate::handoff::Returned::Connection(theirs, n) => {
                    pending.truncate(n);
                    let held = Held {
                        pending,
                        to_pair,
                        pending_max,
                    };
                    return give_back(client, tls, &pair, theirs, held, idle);
                }
                // Closed: the control plane ends the connection; the relay sees it end.
                crate::handoff::Returned::Closed => {}
                crate::handoff::Returned::NotYet => back = Some((b, pending_max)),
            }
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !client_done {
            match tls.read_tls(&mut Fd(c)) {
                Ok(0) => client_done = true,
                Ok(_) => {
                    if tls.process_new_packets().is_err() {
                        let _ = tls.write_tls(&mut Fd(c));
                        return None;
                    }
                    loop {
                        match tls.reader().read(&mut buf) {
                            Ok(0) => {
                                client_done = true;
                                break;
                            }
                            Ok(n) => to_pair.extend_from_slice(&buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                client_done = true;
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !pair_done {
            match crate::sys::recv(p, &mut buf) {
                Ok(0) => {
                    pair_done = true;
                    tls.send_close_notify();
                }
                Ok(n) => {
                    answering = true;
                    if tls.writer().write_all(&buf[..n]).is_err() {
                        return None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    pair_done = true;
                    tls.send_close_notify();
                }
            }
        }
    }
}

/// Sends everything rustls holds for the client, waiting up to `idle` for room each time;
/// None if the client takes nothing for that long or the connection fails.
fn flush_all(tls: &mut ServerConnection, c: RawFd, idle: Duration) -> Option<()> {
    while tls.wants_write() {
        match tls.write_tls(&mut Fd(c)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fd = libc::pollfd {
                    fd: c,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut fd, 1, idle.as_millis() as libc::c_int) } <= 0 {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(())
}

/// Plaintext of the client's held when the connection comes back: what the control plane
/// never read of the handoff, what the relay had not passed on yet, and the most that may go
/// back to the core (a request head's worth).
struct Held {
    pending: Vec<u8>,
    to_pair: Vec<u8>,
    pending_max: usize,
}

/// The control plane gave the connection back (`theirs`, its end of the pair, and `pending`,
/// what it never read of the handoff): the rest of its answer (waiting in `pair`) goes out
/// encrypted, and the plaintext that followed the request (`pending`, what is still queued
/// towards the control plane, what the relay held, what rustls decrypted) goes with the
/// connection to its core. None (the connection closes) if that is more than a request head's
/// worth or the client stops taking the answer for `idle`.
fn give_back(
    client: OwnedFd,
    mut tls: ServerConnection,
    pair: &OwnedFd,
    theirs: OwnedFd,
    held: Held,
    idle: Duration,
) -> Option<Returning> {
    let Held {
        mut pending,
        to_pair,
        pending_max,
    } = held;
    let mut buf = vec![0u8; RELAY_READ_BYTES];
    // The answer's last bytes: all in the pair by now (the control plane flushed first). Each
    // piece is sent before the next is read: rustls holds at most its buffer limit.
    let c = client.as_raw_fd();
    loop {
        flush_all(&mut tls, c, idle)?;
        match crate::sys::recv(pair.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => tls.writer().write_all(&buf[..n]).ok()?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    // What follows the request, in the order the client sent it.
    loop {
        match crate::sys::recv(theirs.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if pending.len() > pending_max {
            return None;
        }
    }
    pending.extend_from_slice(&to_pair);
    loop {
        match tls.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        if pending.len() > pending_max {
            return None;
        }
    }
    if pending.len() > pending_max {
        return None;
    }
    Some(Returning {
        client,
        session: tls,
        bytes: pending,
    })
}
