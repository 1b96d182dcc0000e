//! Handoff of a client connection to the control plane: the socket itself travels over the
//! control socket (a Unix socket) as SCM_RIGHTS, followed by the bytes already read from it. The
//! control plane then serves that connection directly, so pushes stream from the client to the
//! control plane with no relay and no copy in the data plane, whatever their size.
//!
//! Nothing here blocks: the connect and the send are non-blocking, so an overloaded control plane
//! costs the client a 503, never the core's other connections.
//!
//! Wire format on a fresh control-socket connection: `u32` little-endian length, then that many
//! bytes (the unanswered request bytes); the descriptor rides on the first byte. When the
//! descriptor is not the client's own socket (a TLS connection relayed through a socket pair,
//! see `tls`), the length's top bit is set and the client's address follows the bytes: one
//! byte 4 or 6, then 16 bytes (an IPv4 address in the first 4).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The length's flag: the client's address follows the bytes.
pub const ADDRESS_FOLLOWS: u32 = 1 << 31;

/// Sends `client` and the `pending` bytes to the control plane listening at `socket`; `peer`,
/// the client's address, when `client` is not the client's own socket.
pub fn send(
    socket: &Path,
    client: RawFd,
    pending: &[u8],
    peer: Option<std::net::IpAddr>,
) -> io::Result<()> {
    let mut stream = connect_nonblocking(socket)?;
    let mut address = [0u8; 17];
    let flag = match peer {
        None => 0,
        Some(std::net::IpAddr::V4(a)) => {
            address[0] = 4;
            address[1..5].copy_from_slice(&a.octets());
            ADDRESS_FOLLOWS
        }
        Some(std::net::IpAddr::V6(a)) => {
            address[0] = 6;
            address[1..].copy_from_slice(&a.octets());
            ADDRESS_FOLLOWS
        }
    };
    let address = if peer.is_some() {
        &address[..]
    } else {
        &[][..]
    };
    let len = (pending.len() as u32 | flag).to_le_bytes();
    let mut iov = [
        libc::iovec {
            iov_base: len.as_ptr() as *mut _,
            iov_len: len.len(),
        },
        libc::iovec {
            iov_base: pending.as_ptr() as *mut _,
            iov_len: pending.len(),
        },
        libc::iovec {
            iov_base: address.as_ptr() as *mut _,
            iov_len: address.len(),
        },
    ];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = [0u8; 64];
    assert!(space <= control.len());
    // SAFETY: msghdr is plain data; every pointer in it refers to buffers that outlive sendmsg,
    // and the control message is written inside `control` via the CMSG macros.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), client);
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let sent = sent as usize;
    let total = len.len() + pending.len() + address.len();
    if sent < total {
        // The descriptor went with the first byte; the rest is plain data. A fresh Unix socket
        // takes a request head at once; if it ever does not, the control plane is overloaded.
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&len);
        rest.extend_from_slice(pending);
        rest.extend_from_slice(address);
        stream.write_all(&rest[sent..])?;
    }
    Ok(())
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
