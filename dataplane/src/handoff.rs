//! Handoff of a client connection to the control plane: the socket itself travels over the
//! control socket (a Unix socket) as SCM_RIGHTS, followed by the bytes already read from it. The
//! control plane then serves that connection directly, so pushes stream from the client to the
//! control plane with no relay and no copy in the data plane, whatever their size.
//!
//! After its answer the control plane gives a kept-alive connection back on the same Unix
//! socket (the *return*), so a client's next request (a push's next blob, a pull after a 401)
//! reaches the data plane again without a new TCP connection. The core that handed it over
//! waits for that return like for any other socket event, and takes the connection back into
//! its loop; a control plane that closes the Unix socket instead has closed the connection.
//!
//! Nothing here blocks: the connect and the send are non-blocking, so an overloaded control plane
//! costs the client a 503, never the core's other connections.
//!
//! Wire format on a fresh control-socket connection: `u32` little-endian length, then that many
//! bytes (the unanswered request bytes); the descriptor rides on the first byte. Flags in the
//! length's top bits: [`ADDRESS_FOLLOWS`] when the descriptor is not the client's own socket (a
//! TLS connection relayed through a socket pair, see `tls`): the client's address follows the
//! bytes, one byte 4 or 6, then 16 bytes (an IPv4 address in the first 4); [`RETURN_WANTED`]
//! when the sender waits for the connection's return. A return is the same length-and-bytes
//! message, without flags, sent back on that connection with the client's socket: the bytes
//! the control plane read past its answer (the start of the next request).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The length's flag: the client's address follows the bytes.
pub const ADDRESS_FOLLOWS: u32 = 1 << 31;
/// The length's flag: give the connection back on this socket after the answer, if it stays
/// open.
pub const RETURN_WANTED: u32 = 1 << 30;
/// The flags of the length word.
pub const FLAGS: u32 = ADDRESS_FOLLOWS | RETURN_WANTED;

/// Sends `client` and the `pending` bytes to the control plane listening at `socket`; `peer`,
/// the client's address, when `client` is not the client's own socket. Returns the Unix socket
/// on which the connection comes back when `want_back` (else drop it).
pub fn send(
    socket: &Path,
    client: RawFd,
    pending: &[u8],
    peer: Option<std::net::IpAddr>,
    want_back: bool,
) -> io::Result<UnixStream> {
    let stream = connect_nonblocking(socket)?;
    let mut address = [0u8; 17];
    let mut flags = if want_back { RETURN_WANTED } else { 0 };
    match peer {
        None => {}
        Some(std::net::IpAddr::V4(a)) => {
            address[0] = 4;
            address[1..5].copy_from_slice(&a.octets());
            flags |= ADDRESS_FOLLOWS;
        }
        Some(std::net::IpAddr::V6(a)) => {
            address[0] = 6;
            address[1..].copy_from_slice(&a.octets());
            flags |= ADDRESS_FOLLOWS;
        }
    }
    let address = if peer.is_some() {
        &address[..]
    } else {
        &[][..]
    };
    if pending.len() as u32 & FLAGS != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "handoff too long",
        ));
    }
    let len = (pending.len() as u32 | flags).to_le_bytes();
    send_all_with_fd(stream.as_raw_fd(), client, &[&len, pending, address])?;
    Ok(stream)
}

/// Gives a connection back (the control plane's side of a return): `client` and the `pending`
/// bytes, on the Unix socket `back` its handoff came on. The whole message goes in one
/// sendmsg or not at all (a fresh Unix socket takes it at once), so the receiver reads it
/// whole.
pub fn send_back(back: RawFd, client: RawFd, pending: &[u8]) -> io::Result<()> {
    if pending.len() as u32 & FLAGS != 0 || pending.len() > u32::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "return too long",
        ));
    }
    let len = (pending.len() as u32).to_le_bytes();
    let sent = sendmsg_with_fd(back, client, &[&len, pending])?;
    if sent < len.len() + pending.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the data plane's socket took part of a return",
        ));
    }
    Ok(())
}

/// What came back on a handoff's Unix socket.
pub enum Returned {
    /// The connection, and how many bytes of the next request were written into the buffer.
    Connection(OwnedFd, usize),
    /// The control plane closed the connection (or the message was not a whole return).
    Closed,
    /// Nothing yet.
    NotYet,
}

/// Reads a return from `back` (non-blocking) into `buf` (a connection's receive buffer).
pub fn receive_back(back: RawFd, buf: &mut [u8]) -> Returned {
    let mut len = [0u8; 4];
    let (fd, n) = match recvmsg_with_fd(back, &mut [&mut len, buf]) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Returned::NotYet,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Returned::NotYet,
        Err(_) => return Returned::Closed,
    };
    let Some(fd) = fd else {
        return Returned::Closed;
    };
    if n < len.len() {
        return Returned::Closed;
    }
    let want = u32::from_le_bytes(len) as usize;
    let got = n - len.len();
    if got != want {
        return Returned::Closed;
    }
    Returned::Connection(fd, got)
}

/// sendmsg of `parts` with `fd` riding on the first byte, then the rest of the bytes if the
/// first call took only part of them.
fn send_all_with_fd(sock: RawFd, fd: RawFd, parts: &[&[u8]]) -> io::Result<()> {
    use std::io::Write;
    let sent = sendmsg_with_fd(sock, fd, parts)?;
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if sent < total {
        // The descriptor went with the first byte; the rest is plain data. A fresh Unix socket
        // takes a request head at once; if it ever does not, the control plane is overloaded.
        let rest: Vec<u8> = parts.concat();
        // SAFETY: a borrowed view of `sock`, not closed here.
        let mut s = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(sock) });
        s.write_all(&rest[sent..])?;
    }
    Ok(())
}

/// One sendmsg of up to three byte slices with one descriptor (SCM_RIGHTS).
fn sendmsg_with_fd(sock: RawFd, fd: RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 3];
    assert!(parts.len() <= iov.len());
    for (v, p) in iov.iter_mut().zip(parts) {
        v.iov_base = p.as_ptr() as *mut _;
        v.iov_len = p.len();
    }
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = [0u8; 64];
    assert!(space <= control.len());
    // SAFETY: msghdr is plain data; every pointer in it refers to buffers that outlive sendmsg,
    // and the control message is written inside `control` via the CMSG macros.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = parts.len();
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// One recvmsg into `bufs` (at most two), taking at most one descriptor (any others are
/// closed). End of stream is an UnexpectedEof error.
pub fn recvmsg_with_fd(
    sock: RawFd,
    bufs: &mut [&mut [u8]],
) -> io::Result<(Option<OwnedFd>, usize)> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 2];
    assert!(bufs.len() <= iov.len());
    for (v, b) in iov.iter_mut().zip(bufs.iter_mut()) {
        v.iov_base = b.as_mut_ptr().cast();
        v.iov_len = b.len();
    }
    let mut control = [0u8; 64];
    // SAFETY: msghdr points at live local buffers; descriptors received are taken into OwnedFd
    // exactly once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = bufs.len();
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
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
        if n == 0 && fd.is_none() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok((fd, n as usize))
    }
}

/// Connects without blocking the core's loop: a control plane whose accept queue is full
/// answers WouldBlock (the client gets a 503) instead of stalling every connection of the core.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; the path is copied in bounds (checked) and the socket
    // is owned by the UnixStream on success, closed on failure.
    unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        if bytes.len() >= addr.sun_path.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "control socket path too long",
            ));
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let fd = libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        if libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}
