//! The control plane's end of a connection handoff (see `lighter_dataplane::handoff`): accepts on
//! the control socket, receives the client's TCP socket (SCM_RIGHTS) and the request bytes the
//! data plane already read, and gives hyper a stream that yields those bytes first.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

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
}

/// Receives one handoff on `stream`. `prefix_max_bytes` bounds the bytes accepted with it.
pub async fn receive(stream: UnixStream, prefix_max_bytes: usize) -> io::Result<Prefixed> {
    let mut first = [0u8; 4];
    let (fd, got) = loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            recv_with_fd(stream.as_raw_fd(), &mut first)
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
    let relayed = word & lighter_dataplane::handoff::ADDRESS_FOLLOWS != 0;
    let len = (word & !lighter_dataplane::handoff::ADDRESS_FOLLOWS) as usize;
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
    Ok(Prefixed {
        prefix,
        pos: 0,
        inner: TcpStream::from_std(tcp)?,
        peer,
    })
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
}

impl Prefixed {
    /// A second descriptor of the client's socket: it keeps the connection open after hyper
    /// has answered, shut down its sending half and dropped its own, for [`linger`].
    pub fn socket_dup(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        self.inner.as_fd().try_clone_to_owned()
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

/// recvmsg of up to `buf.len()` bytes and at most one descriptor.
fn recv_with_fd(sock: RawFd, buf: &mut [u8]) -> io::Result<(Option<OwnedFd>, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u8; 64];
    // SAFETY: msghdr points at live local buffers; descriptors received are taken into OwnedFd
    // exactly once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut fd = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count =
                    ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((fd, n as usize))
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
