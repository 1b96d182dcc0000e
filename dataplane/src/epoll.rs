//! The fallback driver, for where io_uring cannot be set up (old kernels, seccomp profiles that
//! block it): edge-triggered epoll, non-blocking sockets, the same [`Conn`] state machine, and the
//! same zero-copy body sends (sendfile).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::conn::Step;
use crate::sys;
use crate::worker::{Handed, Worker, TICK_MS};

const LISTENER: u64 = u64::MAX;
/// The TLS relays' inbox: connections coming back to this core.
const INBOX: u64 = u64::MAX - 1;
/// Events taken per epoll_wait.
const EVENTS_MAX: usize = 256;

/// Runs one core's loop; with `tls`, every connection speaks HTTPS (see `tls`).
pub fn run(
    mut w: Worker,
    listener: OwnedFd,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> io::Result<()> {
    let mut sessions = tls.map(crate::tls::Sessions::new).transpose()?;
    if let Some(r) = &w.ctx.events {
        r.set(lighter_layout::events::counter::ENGINE, 2);
    }
    // SAFETY: epoll_create1 returns a new descriptor or -1.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is ours.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    // Edge-triggered: level-triggered, a queued connection that cannot be accepted (no
    // descriptor left) would wake every epoll_wait at once, and the core would spin.
    let listener_events = (libc::EPOLLIN | libc::EPOLLET) as u32;
    ctl(
        ep.as_raw_fd(),
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        listener_events,
        LISTENER,
    )?;
    if let Some(s) = &sessions {
        ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            s.inbox.event_fd(),
            libc::EPOLLIN as u32,
            INBOX,
        )?;
    }
    let mut listener = Some(listener);
    let mut listener_rearm = Instant::now();
    // SAFETY: epoll_event is plain data.
    let mut events: Vec<libc::epoll_event> = vec![unsafe { std::mem::zeroed() }; EVENTS_MAX];
    let mut expired = Vec::new();
    loop {
        // SAFETY: the events buffer holds EVENTS_MAX entries.
        let n = unsafe {
            libc::epoll_wait(
                ep.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS_MAX as i32,
                TICK_MS as i32,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        w.ctx.now = Instant::now();
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == INBOX {
                let Some(s) = &mut sessions else { continue };
                for r in s.inbox.take() {
                    let raw = r.client.as_raw_fd();
                    let Some(idx) = w.add_returned(r.client, &r.bytes) else {
                        continue;
                    };
                    s.restore(idx, r.session);
                    if ctl(
                        ep.as_raw_fd(),
                        libc::EPOLL_CTL_ADD,
                        raw,
                        CLIENT_EVENTS,
                        idx as u64,
                    )
                    .is_err()
                    {
                        s.close(idx);
                        w.remove(idx);
                        continue;
                    }
                    drive_tls(&mut w, ep.as_raw_fd(), s, idx);
                }
            } else if token == LISTENER {
                let Some(l) = &listener else { continue };
                while let Some(fd) = sys::accept(l.as_raw_fd())? {
                    let raw = fd.as_raw_fd();
                    let Some(idx) = w.add(fd) else { continue };
                    let flags =
                        (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
                    if ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, raw, flags, idx as u64).is_err() {
                        w.remove(idx);
                        continue;
                    }
                    match &mut sessions {
                        Some(s) => {
                            if !s.open(idx) {
                                w.remove(idx);
                                continue;
                            }
                            // The handshake is part of the first request's head: it gets the
                            // header timeout, not the idle one.
                            let header = std::time::Duration::from_millis(
                                w.config.request_header_timeout_ms,
                            );
                            if let Some(e) = w.conns[idx].as_mut() {
                                e.conn.deadline = w.ctx.now + header;
                            }
                            drive_tls(&mut w, ep.as_raw_fd(), s, idx);
                        }
                        None => drive(&mut w, ep.as_raw_fd(), idx),
                    }
                }
            } else {
                match &mut sessions {
                    Some(s) => drive_tls(&mut w, ep.as_raw_fd(), s, token as usize),
                    None => drive(&mut w, ep.as_raw_fd(), token as usize),
                }
            }
        }
        if let (true, Some(l)) = (w.ctx.now >= listener_rearm, &listener) {
            // Every tick: an accept that stopped before the queue was empty (out of
            // descriptors) gets a new edge if connections still wait.
            listener_rearm = w.ctx.now + std::time::Duration::from_millis(TICK_MS);
            let (ep, l) = (ep.as_raw_fd(), l.as_raw_fd());
            let _ = ctl(ep, libc::EPOLL_CTL_MOD, l, listener_events, LISTENER);
        }
        let exit = w.tick(&mut expired);
        for &idx in &expired {
            w.remove(idx);
            if let Some(s) = &mut sessions {
                s.close(idx);
            }
        }
        if w.stopping() {
            // Stop accepting; the kernel hands queued connections to no one once it is closed.
            if let Some(l) = listener.take() {
                let _ = ctl(ep.as_raw_fd(), libc::EPOLL_CTL_DEL, l.as_raw_fd(), 0, 0);
            }
        }
        if exit || (w.stopping() && w.live == 0) {
            return Ok(());
        }
    }
}

fn drive_tls(w: &mut Worker, ep: RawFd, s: &mut crate::tls::Sessions, idx: usize) {
    crate::tls::drive(w, s, idx, |fd, on| {
        let _ = if on {
            let flags = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            ctl(ep, libc::EPOLL_CTL_ADD, fd, flags, idx as u64)
        } else {
            ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0)
        };
    });
}

/// What a client connection is watched for.
const CLIENT_EVENTS: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// Moves a connection forward until it would block, then leaves it to the next edge.
fn drive(w: &mut Worker, ep: RawFd, idx: usize) {
    loop {
        let Some(entry) = w.conns.get_mut(idx).and_then(|e| e.as_mut()) else {
            return;
        };
        if entry.returning {
            // With the control plane: its Unix socket is watched, for the connection's return.
            match w.take_back(idx) {
                Some(true) => {
                    let fd = w.conns[idx].as_ref().expect("taken back").fd.as_raw_fd();
                    if ctl(ep, libc::EPOLL_CTL_ADD, fd, CLIENT_EVENTS, idx as u64).is_err() {
                        w.remove(idx);
                        return;
                    }
                    continue;
                }
                _ => return,
            }
        }
        let fd = entry.fd.as_raw_fd();
        let conn = &mut entry.conn;
        let step = conn.step();
        let result = match step {
            Step::Recv => sys::recv(fd, conn.recv_space()).map(|n| conn.on_recv(n, &w.ctx)),
            Step::SendHead => {
                let more = conn.body().is_some();
                match conn.head_with_bytes() {
                    Some((head, body)) => sys::send_two(fd, head, body),
                    None => sys::send(fd, conn.head_pending(), more),
                }
                .map(|n| conn.on_sent(n, &w.ctx))
            }
            Step::SendBody => {
                let body = conn.body().expect("SendBody has a body");
                match sys::sendfile(
                    fd,
                    body.file.as_raw_fd(),
                    body.offset,
                    body.end - body.offset,
                ) {
                    Ok(0) => {
                        conn.on_body_eof();
                        Ok(())
                    }
                    Ok(n) => {
                        conn.on_body_sent(n, &w.ctx);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Step::Handoff => {
                // The socket lives on in the control plane: stop watching it here first.
                let _ = ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
                match w.handoff(idx) {
                    Handed::Left => return,
                    Handed::Returning => {
                        let back = w.conns[idx].as_ref().expect("returning").fd.as_raw_fd();
                        let flags = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
                        if ctl(ep, libc::EPOLL_CTL_ADD, back, flags, idx as u64).is_err() {
                            w.remove(idx);
                            return;
                        }
                    }
                    Handed::Failed => {
                        let _ = ctl(ep, libc::EPOLL_CTL_ADD, fd, CLIENT_EVENTS, idx as u64);
                    }
                }
                continue;
            }
            Step::Close => {
                w.remove(idx);
                return;
            }
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                w.remove(idx);
                return;
            }
        }
    }
}

fn ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: a valid epoll descriptor and event struct.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
