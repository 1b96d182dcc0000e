//! What both drivers share for one core: the connection table, the per-core context, deadlines,
//! handoff and shutdown. Nothing here is shared between cores.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Conn, Ctx, Step};
use crate::{handoff, sys, Config};
use lighter_layout::events::counter;

pub struct Entry {
    pub fd: OwnedFd,
    pub conn: Conn,
    /// An io_uring operation on this connection has not completed yet (its buffers are in use).
    pub inflight: bool,
    /// Close as soon as nothing is in flight.
    pub closing: bool,
    /// Handed to the control plane, which gives it back when it stays open: `fd` is then the
    /// handoff's Unix socket, watched for the return ([`Worker::take_back`]).
    pub returning: bool,
}

/// Where a handoff left the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handed {
    /// Gone for good (the control plane will close it).
    Left,
    /// With the control plane; `fd` is now the Unix socket it comes back on.
    Returning,
    /// The control plane could not be reached: the connection answers 503 and closes.
    Failed,
}

pub struct Worker {
    pub config: Arc<Config>,
    pub ctx: Ctx,
    /// Boxed so buffer addresses stay put while the kernel uses them.
    pub conns: Vec<Option<Box<Entry>>>,
    free: Vec<usize>,
    pub live: usize,
    /// Of `live`, connections being closed (aborted while an operation was in flight).
    closing: usize,
    /// When the log last said the core was full.
    full_logged: Option<Instant>,
    shutdown: Arc<AtomicBool>,
    shutdown_deadline: Option<Instant>,
    next_sweep: Instant,
    next_cache_check: Instant,
}

/// How often deadlines and the shutdown flag are checked.
pub const TICK_MS: u64 = 250;
/// How often the open-file cache is checked for content removed from the data directory.
const CACHE_CHECK_MS: u64 = 5_000;

impl Worker {
    pub fn new(config: Arc<Config>, shutdown: Arc<AtomicBool>, core: usize) -> Worker {
        let layout = lighter_layout::Layout::open(&config.data_dir);
        // The ring holds the core's counters whether or not the event log is on; with it
        // off, the header alone (no room for records, so no pull is recorded).
        let path = layout.event_ring_path(core);
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let events =
            lighter_layout::events::RingWriter::create(&path, config.events_ring_records, started)
                .map_err(|e| {
                    tracing::warn!(
                "core {core}: no event ring at {} ({e}): its pulls are not logged nor counted",
                path.display()
            )
                })
                .ok();
        let mut cache = crate::cache::Cache::default();
        cache.watch_generation(&layout);
        let ctx = Ctx {
            layout,
            cache: std::cell::RefCell::new(cache),
            mirrors: config.mirrors.clone(),
            bucket_tag_ttl_ms: config.bucket_tag_ttl_ms,
            now: Instant::now(),
            idle_timeout_ms: config.idle_timeout_ms,
            request_header_timeout_ms: config.request_header_timeout_ms,
            access: config.auth.as_ref().map(|a| {
                crate::access::Access::new(a).expect("checked when the data plane started")
            }),
            health: Some(crate::health::Health {
                control_socket_path: config.control_socket_path.clone(),
                data_dir: config.data_dir.clone(),
                disk_free_min_bytes: config.disk_free_min_bytes,
            }),
            events,
        };
        Worker {
            config,
            ctx,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            closing: 0,
            full_logged: None,
            shutdown,
            shutdown_deadline: None,
            next_sweep: Instant::now(),
            next_cache_check: Instant::now() + Duration::from_millis(CACHE_CHECK_MS),
        }
    }

    /// Adds an accepted connection; None (and the socket closed) when the core is full.
    pub fn add(&mut self, fd: OwnedFd) -> Option<usize> {
        if self.shutdown_deadline.is_some() {
            return None;
        }
        // A full core makes room by closing its longest-idle connection (one between requests,
        // nothing received): idle connections, however many, cannot lock clients out.
        if self.live - self.closing >= self.config.connections_per_core_max && !self.evict_idle() {
            return None;
        }
        let peer = peer_for(&self.ctx, fd.as_raw_fd());
        let entry = Box::new(Entry {
            fd,
            conn: Conn::new(self.config.request_header_size_max_bytes, peer, &self.ctx),
            inflight: false,
            closing: false,
            returning: false,
        });
        self.live += 1;
        if let Some(r) = &self.ctx.events {
            r.add(counter::ACCEPTED, 1);
            r.set(counter::OPEN, self.live as u64);
        }
        Some(match self.free.pop() {
            Some(i) => {
                self.conns[i] = Some(entry);
                i
            }
            None => {
                self.conns.push(Some(entry));
                self.conns.len() - 1
            }
        })
    }

    /// Adds a connection that comes back from elsewhere (a TLS relay) with the `bytes` that
    /// followed its last request; None (and the socket closed) when the core is full or the
    /// bytes do not fit a request head.
    pub fn add_returned(&mut self, fd: OwnedFd, bytes: &[u8]) -> Option<usize> {
        let idx = self.add(fd)?;
        let entry = self.conns[idx].as_mut().expect("just added");
        let space = entry.conn.return_space();
        if bytes.len() > space.len() {
            self.remove(idx);
            return None;
        }
        space[..bytes.len()].copy_from_slice(bytes);
        entry.conn.resume(bytes.len(), entry.conn.peer(), &self.ctx);
        Some(idx)
    }

    /// Takes a connection out of this core (it lives on elsewhere).
    pub fn take(&mut self, idx: usize) -> Box<Entry> {
        let entry = self.conns[idx].take().expect("live connection");
        self.live -= 1;
        self.closing -= usize::from(entry.closing);
        self.free.push(idx);
        self.count_open();
        entry
    }

    pub fn remove(&mut self, idx: usize) {
        if let Some(e) = self.conns[idx].take() {
            self.live -= 1;
            self.closing -= usize::from(e.closing);
            self.free.push(idx);
            self.count_open();
        }
    }

    fn count_open(&self) {
        if let Some(r) = &self.ctx.events {
            r.set(counter::OPEN, self.live as u64);
        }
    }

    /// Adds to one of this core's counters (when its ring could be made).
    pub fn count(&self, c: usize, n: u64) {
        if let Some(r) = &self.ctx.events {
            r.add(c, n);
        }
    }

    /// Closes the connection that has waited longest for its next request (the earliest idle
    /// deadline); false if no connection is idle.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let e = e.as_ref()?;
                let idle = !e.closing
                    && !e.returning
                    && e.conn.step() == Step::Recv
                    && e.conn.unconsumed().is_empty();
                idle.then_some((e.conn.deadline, i))
            })
            .min();
        let Some((_, idx)) = victim else {
            return false;
        };
        let now = self.ctx.now;
        if self
            .full_logged
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.full_logged = Some(now);
            tracing::warn!(
                connections_per_core_max = self.config.connections_per_core_max,
                "a core is full: closing its longest-idle connections to take new ones"
            );
        }
        if self.conns[idx].as_ref().is_some_and(|e| e.inflight) {
            self.abort(idx);
        } else {
            self.remove(idx);
        }
        self.count(counter::EVICTED, 1);
        true
    }

    /// Hands the connection to the control plane, or answers 503 if it cannot be reached.
    pub fn handoff(&mut self, idx: usize) -> Handed {
        let want_back = self.shutdown_deadline.is_none();
        self.count(counter::HANDOFFS, 1);
        let entry = self.conns[idx].as_mut().expect("live connection");
        debug_assert_eq!(entry.conn.step(), Step::Handoff);
        match handoff::send(
            &self.config.control_socket_path,
            entry.fd.as_raw_fd(),
            entry.conn.unconsumed(),
            None,
            want_back,
        ) {
            Ok(back) if want_back => {
                // Our descriptor of the client's socket closes here: the control plane's is
                // the one that keeps the connection open now.
                entry.fd = OwnedFd::from(back);
                entry.returning = true;
                Handed::Returning
            }
            Ok(_) => {
                self.remove(idx);
                Handed::Left
            }
            Err(e) => {
                tracing::error!(
                    "cannot hand a request to the control plane at {}: {e}",
                    self.config.control_socket_path.display()
                );
                entry.conn.handoff_failed();
                Handed::Failed
            }
        }
    }

    /// Takes a handed-over connection back if the control plane has returned it: Some(true)
    /// when it is a client connection of this core again (with the bytes that came with it
    /// already processed), Some(false) when it is gone, None when nothing came yet.
    pub fn take_back(&mut self, idx: usize) -> Option<bool> {
        let entry = self.conns[idx].as_mut().expect("live connection");
        debug_assert!(entry.returning);
        let got = handoff::receive_back(entry.fd.as_raw_fd(), entry.conn.return_space());
        match got {
            handoff::Returned::Connection(fd, n) => {
                let peer = peer_for(&self.ctx, fd.as_raw_fd());
                entry.fd = fd;
                entry.returning = false;
                entry.conn.resume(n, peer, &self.ctx);
                self.count(counter::RETURNS, 1);
                Some(true)
            }
            handoff::Returned::Closed => {
                self.remove(idx);
                Some(false)
            }
            handoff::Returned::NotYet => None,
        }
    }

    /// Every TICK_MS: closes connections past their deadline, and drives shutdown. Returns the
    /// connections to close and whether the worker should exit.
    pub fn tick(&mut self, expired: &mut Vec<usize>) -> bool {
        expired.clear();
        let now = self.ctx.now;
        if now < self.next_sweep {
            return false;
        }
        self.next_sweep = now + Duration::from_millis(TICK_MS);
        if now >= self.next_cache_check {
            self.next_cache_check = now + Duration::from_millis(CACHE_CHECK_MS);
            let mut cache = self.ctx.cache.borrow_mut();
            cache.drop_removed();
            cache.watch_generation(&self.ctx.layout);
        }
        if self.shutdown.load(Ordering::Relaxed) && self.shutdown_deadline.is_none() {
            self.shutdown_deadline =
                Some(now + Duration::from_millis(self.config.shutdown_grace_ms));
        }
        let stopping = self.shutdown_deadline;
        for (i, e) in self.conns.iter().enumerate() {
            let Some(e) = e else { continue };
            // A connection with the control plane has that side's timeouts; when stopping it
            // is not taken back (the control plane closes it after its answer).
            let idle =
                e.returning || (e.conn.step() == Step::Recv && e.conn.unconsumed().is_empty());
            let late = !e.returning && now >= e.conn.deadline;
            if late || stopping.is_some_and(|d| idle || now >= d) {
                expired.push(i);
            }
        }
        stopping.is_some() && self.live == expired.len()
    }

    pub fn stopping(&self) -> bool {
        self.shutdown_deadline.is_some()
    }

    /// Shuts a socket down so an operation in flight on it completes.
    pub fn abort(&mut self, idx: usize) {
        if let Some(e) = self.conns[idx].as_mut() {
            if !e.closing {
                e.closing = true;
                self.closing += 1;
            }
            sys::shutdown(e.fd.as_raw_fd());
        }
    }
}

/// The client's address, when access control (`anonymous_cidrs`) or the event log needs it.
fn peer_for(ctx: &crate::conn::Ctx, fd: std::os::fd::RawFd) -> Option<std::net::IpAddr> {
    match &ctx.access {
        Some(a) if a.wants_peer_address() => sys::peer_ip(fd),
        _ if ctx.pull_log().is_some() => sys::peer_ip(fd),
        _ => None,
    }
}
