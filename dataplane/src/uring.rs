//! The io_uring driver: one ring per core. Accepts are multishot, receives are ring operations,
//! and a periodic timeout drives deadlines. Response heads are sent at once (a ring `Send` only
//! when the socket is full) and bodies go out with sendfile straight from the page cache
//! (io_uring has no sendfile, and its splice runs in kernel worker threads), armed by a ring poll
//! when the socket is full. One submit-and-wait per loop iteration
//! carries every operation of every connection of the core.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::conn::Step;
use crate::sys;
use crate::worker::{Handed, Worker, TICK_MS};

/// Submission queue entries per ring.
pub const RING_ENTRIES: u32 = 1024;

/// Accepted sockets must be non-blocking: a body send that would block must return EAGAIN (and
/// wait on a ring poll), never stall the core's loop.
const ACCEPT_FLAGS: i32 = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;

const ACCEPT: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;
const CANCEL: u64 = u64::MAX - 2;
const OP_RECV: u64 = 0;
const OP_SEND: u64 = 1;
const OP_POLLOUT: u64 = 2;
/// A poll for the return of a connection handed to the control plane (on its Unix socket).
const OP_RETURN: u64 = 3;

fn user_data(idx: usize, op: u64) -> u64 {
    ((idx as u64) << 2) | op
}

/// Creates a ring for the calling thread, or says why io_uring cannot be used here.
///
/// The ring runs its completion work only when this thread asks for completions
/// (`DEFER_TASKRUN`, with `SINGLE_ISSUER`, Linux 6.1): by default a receive that becomes ready
/// interrupts the thread and runs at the end of whatever system call it is in, a sendfile among
/// them, while the client's core still holds that socket's lock from delivering the request, and
/// the thread spins on the lock (17 % of the data plane's samples under Range GETs, one core
/// each). Older kernels get `COOP_TASKRUN` (5.19, no interrupt) or a plain ring.
pub fn probe() -> io::Result<IoUring> {
    let deferred = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES);
    match deferred {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        other => return other,
    }
    match IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES),
        other => other,
    }
}

pub fn run(mut w: Worker, mut ring: IoUring, listener: OwnedFd) -> io::Result<()> {
    if let Some(r) = &w.ctx.events {
        r.set(lighter_layout::events::counter::ENGINE, 1);
    }
    let tick = types::Timespec::new().nsec((TICK_MS * 1_000_000) as u32);
    arm_accept(&mut ring, &listener)?;
    push(
        &mut ring,
        opcode::Timeout::new(&tick).build().user_data(TICK),
    )?;
    let mut listener = Some(listener);
    // An accept starved of descriptors or memory is armed again at the next tick: at once, it
    // would fail again at once, and the core would spin.
    let mut accept_starved = false;
    let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(RING_ENTRIES as usize);
    let mut expired = Vec::new();
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        w.ctx.now = Instant::now();
        completions.clear();
        completions.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &completions {
            match ud {
                ACCEPT => {
                    if res >= 0 {
                        // SAFETY: a successful accept completion carries a new descriptor we own.
                        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(res) };
                        sys::set_nodelay(fd.as_raw_fd());
                        if let Some(idx) = w.add(fd) {
                            schedule(&mut w, &mut ring, idx)?;
                        }
                    }
                    if !cqueue::more(flags) && res < 0 && sys::accept_starved(-res) {
                        sys::warn_accept_starved(-res);
                        accept_starved = true;
                    } else if !cqueue::more(flags) {
                        if let Some(l) = &listener {
                            arm_accept(&mut ring, l)?;
                        }
                    }
                }
                TICK => {
                    let exit = w.tick(&mut expired);
                    for &idx in &expired {
                        close(&mut w, idx);
                    }
                    if w.stopping() && listener.is_some() {
                        // The pending accept holds the listener open: cancel it, then close.
                        push(
                            &mut ring,
                            opcode::AsyncCancel::new(ACCEPT).build().user_data(CANCEL),
                        )?;
                        listener = None;
                    }
                    if exit || (w.stopping() && w.live == 0) {
                        return Ok(());
                    }
                    if let (true, Some(l)) = (std::mem::take(&mut accept_starved), &listener) {
                        arm_accept(&mut ring, l)?;
                    }
                    push(
                        &mut ring,
                        opcode::Timeout::new(&tick).build().user_data(TICK),
                    )?;
                }
                CANCEL => {}
                _ => {
                    let idx = (ud >> 2) as usize;
                    let op = ud & 3;
                    let Some(entry) = w.conns.get_mut(idx).and_then(|e| e.as_mut()) else {
                        continue;
                    };
                    entry.inflight = false;
                    if entry.closing {
                        w.remove(idx);
                        continue;
                    }
                    if res < 0 {
                        let errno = -res;
                        if errno == libc::EAGAIN || errno == libc::EINTR {
                            schedule(&mut w, &mut ring, idx)?;
                        } else {
                            w.remove(idx);
                        }
                        continue;
                    }
                    match op {
                        OP_RECV => entry.conn.on_recv(res as usize, &w.ctx),
                        OP_SEND => entry.conn.on_head_sent(res as usize, &w.ctx),
                        // OP_POLLOUT: the socket has room again; OP_RETURN: the control plane
                        // wrote on the handoff's socket.
                        _ => {}
                    }
                    schedule(&mut w, &mut ring, idx)?;
                }
            }
        }
    }
}

/// Queues the multishot accept on the core's listener.
fn arm_accept(ring: &mut IoUring, listener: &OwnedFd) -> io::Result<()> {
    push(
        ring,
        opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(ACCEPT_FLAGS)
            .build()
            .user_data(ACCEPT),
    )
}

/// Queues the connection's next operation, doing synchronous steps (sendfile, handoff, close)
/// on the way.
fn schedule(w: &mut Worker, ring: &mut IoUring, idx: usize) -> io::Result<()> {
    loop {
        let Some(entry) = w.conns.get_mut(idx).and_then(|e| e.as_mut()) else {
            return Ok(());
        };
        debug_assert!(!entry.inflight);
        if entry.returning {
            match w.take_back(idx) {
                Some(true) => continue,
                Some(false) => return Ok(()),
                None => {
                    let entry = w.conns[idx].as_mut().expect("returning");
                    let back = types::Fd(entry.fd.as_raw_fd());
                    let sqe = opcode::PollAdd::new(back, libc::POLLIN as u32).build();
                    entry.inflight = true;
                    return push(ring, sqe.user_data(user_data(idx, OP_RETURN)));
                }
            }
        }
        let fd = types::Fd(entry.fd.as_raw_fd());
        let conn = &mut entry.conn;
        match conn.step() {
            Step::Recv => {
                let buf = conn.recv_space();
                let sqe = opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32).build();
                entry.inflight = true;
                return push(ring, sqe.user_data(user_data(idx, OP_RECV)));
            }
            Step::SendHead => {
                // A response head almost always fits the socket buffer: send it now rather than
                // spend a ring round trip; queue it on the ring only if the socket is full.
                let more = conn.body().is_some();
                let sent = match conn.head_with_bytes() {
                    Some((head, body)) => sys::send_two(fd.0, head, body),
                    None => sys::send(fd.0, conn.head_pending(), more),
                };
                match sent {
                    Ok(n) => conn.on_sent(n, &w.ctx),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let head = conn.head_pending();
                        let sqe = opcode::Send::new(fd, head.as_ptr(), head.len() as u32)
                            .flags(sys::send_flags(more))
                            .build();
                        entry.inflight = true;
                        return push(ring, sqe.user_data(user_data(idx, OP_SEND)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        w.remove(idx);
                        return Ok(());
                    }
                }
            }
            Step::SendBody => {
                let body = conn.body().expect("SendBody has a body");
                let asked = sys::sendfile_count(body.end - body.offset);
                match sys::sendfile(
                    fd.0,
                    body.file.as_raw_fd(),
                    body.offset,
                    body.end - body.offset,
                ) {
                    Ok(0) => conn.on_body_eof(),
                    Ok(n) => {
                        conn.on_body_sent(n, &w.ctx);
                        // Short: the socket took what it had room for. Another call now would
                        // only read file pages into the kernel's pipe for an EAGAIN; the poll
                        // completes once there is room (at once, if there already is).
                        if n < asked && conn.step() == Step::SendBody {
                            let sqe = opcode::PollAdd::new(fd, libc::POLLOUT as u32).build();
                            entry.inflight = true;
                            return push(ring, sqe.user_data(user_data(idx, OP_POLLOUT)));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let sqe = opcode::PollAdd::new(fd, libc::POLLOUT as u32).build();
                        entry.inflight = true;
                        return push(ring, sqe.user_data(user_data(idx, OP_POLLOUT)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        w.remove(idx);
                        return Ok(());
                    }
                }
            }
            Step::Handoff => {
                if w.handoff(idx) == Handed::Left {
                    return Ok(());
                }
            }
            Step::Close => {
                w.remove(idx);
                return Ok(());
            }
        }
    }
}

/// Closes now, or once the operation in flight completes.
fn close(w: &mut Worker, idx: usize) {
    match w.conns.get(idx).and_then(|e| e.as_ref()) {
        Some(e) if e.inflight => w.abort(idx),
        Some(_) => w.remove(idx),
        None => {}
    }
}

fn push(ring: &mut IoUring, sqe: squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every buffer an entry points to is owned by a boxed connection that is not
        // freed or touched while its operation is in flight (`Entry::inflight`).
        if unsafe { ring.submission().push(&sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}
