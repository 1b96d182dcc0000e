//! Handoff of a client connection to the control plane: the socket itself travels over the
//! control socket (a Unix socket) as SCM_RIGHTS, followed by the bytes already read from it. The
//! control plane then serves that connection directly, so pushes stream from the client to the
//! control plane with no relay and no copy in the data plane, whatever their size.
//!
//! Wire format on a fresh control-socket connection: `u32` little-endian length, then that many
//! bytes (the unanswered request bytes); the descriptor rides on the first byte.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Sends `client` and the `pending` bytes to the control plane listening at `socket`.
pub fn send(socket: &Path, client: RawFd, pending: &[u8]) -> io::Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(std::time::Duration::from_secs(5)))?;
    let len = (pending.len() as u32).to_le_bytes();
    let mut iov = [
        libc::iovec {
            iov_base: len.as_ptr() as *mut _,
            iov_len: len.len(),
        },
        libc::iovec {
            iov_base: pending.as_ptr() as *mut _,
            iov_len: pending.len(),
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
    let total = len.len() + pending.len();
    if sent < total {
        // The descriptor went with the first byte; the rest is plain data.
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&len);
        rest.extend_from_slice(pending);
        stream.write_all(&rest[sent..])?;
    }
    Ok(())
}
