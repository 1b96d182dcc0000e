//! Thin, checked wrappers over the system calls the drivers share: sockets, sendfile, pinning.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A non-blocking TCP listener with SO_REUSEPORT, so each core can have its own on one port.
/// `unsent_max_bytes` (TCP_NOTSENT_LOWAT, 0: the kernel's default) passes on to every
/// connection it accepts.
pub fn listener(addr: SocketAddr, backlog: i32, unsent_max_bytes: u32) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr outlives the bind call.
    unsafe {
        let fd = OwnedFd::from_raw_fd(check(libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            check(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            ))?;
        }
        let (storage, len) = sockaddr(addr);
        check(libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        ))?;
        if unsent_max_bytes > 0 {
            let v = unsent_max_bytes.min(i32::MAX as u32) as libc::c_int;
            check(libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            ))?;
        }
        check(libc::listen(fd.as_raw_fd(), backlog))?;
        Ok(fd)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            (storage, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            (storage, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// The address a listener is bound to (to learn the port picked for port 0).
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: getsockname writes at most `len` bytes into storage; a TcpListener borrowed without
    // taking ownership reads the same address.
    let l = std::mem::ManuallyDrop::new(unsafe { std::net::TcpListener::from_raw_fd(fd) });
    l.local_addr()
}

/// The address of a connected socket's peer (None if it cannot be read: the peer is gone).
pub fn peer_ip(fd: RawFd) -> Option<std::net::IpAddr> {
    // SAFETY: getpeername on a socket borrowed without taking ownership.
    let s = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    s.peer_addr().ok().map(|a| a.ip())
}

/// accept4, non-blocking and close-on-exec; Ok(None) when no connection is waiting.
pub fn accept(listener: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: accept4 with null address pointers.
    let fd = unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            // The peer gave up between SYN and accept: not our error.
            _ if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
            // Out of descriptors or memory: the connection stays queued until some are free
            // (the next readiness), and the core goes on serving the ones it has.
            _ if e.raw_os_error().is_some_and(accept_starved) => {
                warn_accept_starved(e.raw_os_error().unwrap_or(0));
                Ok(None)
            }
            _ => Err(e),
        };
    }
    // SAFETY: accept4 returned a fresh descriptor we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_nodelay(fd.as_raw_fd());
    Ok(Some(fd))
}

/// An accept failed for want of descriptors or memory: retrying at once only spins.
pub fn accept_starved(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// Logs a starved accept, at most once every 10 s per process (a flood would repeat it per
/// connection attempt).
pub fn warn_accept_starved(errno: i32) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_SECS: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_SECS.load(Ordering::Relaxed);
    if now >= last + 10
        && LAST_SECS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "cannot accept connections: {} (lower connections_per_core_max or raise \
             RLIMIT_NOFILE); new connections wait in the listen queue",
            io::Error::from_raw_os_error(errno)
        );
    }
}

pub fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid pointer and length; failure only costs latency.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            4,
        );
    }
}

pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for `len` bytes.
    check_size(unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) })
}

/// Flags for sending a response head: no SIGPIPE, and MSG_MORE when a body follows so the head
/// and the first body bytes leave in one segment.
pub fn send_flags(more: bool) -> libc::c_int {
    libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 }
}

pub fn send(fd: RawFd, buf: &[u8], more: bool) -> io::Result<usize> {
    // SAFETY: the buffer is valid for `len` bytes.
    check_size(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), send_flags(more)) })
}

/// Sends `a` then `b` in one system call (a head and a body held in memory).
pub fn send_two(fd: RawFd, a: &[u8], b: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // SAFETY: a zeroed msghdr is valid; the iovecs point at buffers valid for their lengths,
    // which the kernel only reads.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: as above; `msg` outlives the call.
    check_size(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) })
}

/// Largest single sendfile, so one big blob does not monopolise a core.
pub const SENDFILE_CHUNK_BYTES: usize = 4 << 20;

/// Bytes one [`sendfile`] call asks for when `remaining` are left to send.
pub fn sendfile_count(remaining: u64) -> usize {
    remaining.min(SENDFILE_CHUNK_BYTES as u64) as usize
}

/// Sends file bytes from `offset` to the socket without copying them through user space: at
/// most [`sendfile_count`] of `count`.
pub fn sendfile(sock: RawFd, file: RawFd, offset: u64, count: u64) -> io::Result<usize> {
    let mut off = offset as libc::off_t;
    let n = sendfile_count(count);
    // SAFETY: sendfile reads `off` and writes it back; both descriptors are open.
    check_size(unsafe { libc::sendfile(sock, file, &mut off, n) })
}

pub fn shutdown(fd: RawFd) {
    // SAFETY: shutting down a socket we own; errors (already closed by peer) are irrelevant.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Pins the calling thread to one CPU. Best effort: a cpuset may forbid it.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) applies to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(libc::sched_setaffinity(
            0,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        ))?;
    }
    Ok(())
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as above, reading the affinity mask of this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// CPUs the machine has online.
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Raises the soft limit on open files to the hard limit: each connection holds a socket and,
/// while sending, a file.
/// The open-file limit (soft) now.
pub fn nofile_limit() -> u64 {
    // SAFETY: getrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur
        } else {
            1024
        }
    }
}

pub fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notsent_lowat(fd: RawFd) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt with a valid pointer and length.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    /// `send_unsent_max_bytes` is set on the listener only: accepted connections must inherit it.
    #[test]
    fn accepted_connections_inherit_the_unsent_limit() {
        let l = listener("127.0.0.1:0".parse().unwrap(), 16, 65536).unwrap();
        let addr = local_addr(l.as_raw_fd()).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let conn = loop {
            if let Some(fd) = accept(l.as_raw_fd()).unwrap() {
                break fd;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no connection accepted"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(notsent_lowat(conn.as_raw_fd()), 65536);
        let plain = listener("127.0.0.1:0".parse().unwrap(), 16, 0).unwrap();
        assert_ne!(
            notsent_lowat(plain.as_raw_fd()),
            65536,
            "0 leaves the kernel's default"
        );
    }
}
