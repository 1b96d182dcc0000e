//! What both drivers share for one core: the connection table, the per-core context, deadlines,
//! handoff and shutdown. Nothing here is shared between cores.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{Conn, Ctx, Step};
use crate::{handoff, sys, Config};

pub struct Entry {
    pub fd: OwnedFd,
    pub conn: Conn,
    /// An io_uring operation on this connection has not completed yet (its buffers are in use).
    pub inflight: bool,
    /// Close as soon as nothing is in flight.
    pub closing: bool,
}

pub struct Worker {
    pub config: Arc<Config>,
    pub ctx: Ctx,
    /// Boxed so buffer addresses stay put while the kernel uses them.
    pub conns: Vec<Option<Box<Entry>>>,
    free: Vec<usize>,
    pub live: usize,
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
    pub fn new(config: Arc<Config>, shutdown: Arc<AtomicBool>) -> Worker {
        let ctx = Ctx {
            layout: lighter_layout::Layout::open(&config.data_dir),
            cache: Default::default(),
            mirrors: config.mirrors.clone(),
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
        };
        Worker {
            config,
            ctx,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            shutdown,
            shutdown_deadline: None,
            next_sweep: Instant::now(),
            next_cache_check: Instant::now() + Duration::from_millis(CACHE_CHECK_MS),
        }
    }

    /// Adds an accepted connection; None (and the socket closed) when the core is full.
    pub fn add(&mut self, fd: OwnedFd) -> Option<usize> {
        if self.live >= self.config.connections_per_core_max || self.shutdown_deadline.is_some() {
            return None;
        }
        let peer = match &self.ctx.access {
            Some(a) if a.wants_peer_address() => sys::peer_ip(fd.as_raw_fd()),
            _ => None,
        };
        let entry = Box::new(Entry {
            fd,
            conn: Conn::new(self.config.request_header_size_max_bytes, peer, &self.ctx),
            inflight: false,
            closing: false,
        });
        self.live += 1;
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

    /// Takes a connection out of this core (it lives on elsewhere).
    pub fn take(&mut self, idx: usize) -> Box<Entry> {
        let entry = self.conns[idx].take().expect("live connection");
        self.live -= 1;
        self.free.push(idx);
        entry
    }

    pub fn remove(&mut self, idx: usize) {
        if self.conns[idx].take().is_some() {
            self.live -= 1;
            self.free.push(idx);
        }
    }

    /// Hands the connection to the control plane, or answers 503 if it cannot be reached.
    /// Returns true when the connection left this core.
    pub fn handoff(&mut self, idx: usize) -> bool {
        let entry = self.conns[idx].as_mut().expect("live connection");
        debug_assert_eq!(entry.conn.step(), Step::Handoff);
        match handoff::send(
            &self.config.control_socket_path,
            entry.fd.as_raw_fd(),
            entry.conn.unconsumed(),
            None,
        ) {
            Ok(()) => {
                self.remove(idx);
                true
            }
            Err(e) => {
                tracing::error!(
                    "cannot hand a request to the control plane at {}: {e}",
                    self.config.control_socket_path.display()
                );
                entry.conn.handoff_failed();
                false
            }
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
            self.ctx.cache.borrow_mut().drop_removed();
        }
        if self.shutdown.load(Ordering::Relaxed) && self.shutdown_deadline.is_none() {
            self.shutdown_deadline =
                Some(now + Duration::from_millis(self.config.shutdown_grace_ms));
        }
        let stopping = self.shutdown_deadline;
        for (i, e) in self.conns.iter().enumerate() {
            let Some(e) = e else { continue };
            let idle = e.conn.step() == Step::Recv && e.conn.unconsumed().is_empty();
            if now >= e.conn.deadline || stopping.is_some_and(|d| idle || now >= d) {
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
            e.closing = true;
            sys::shutdown(e.fd.as_raw_fd());
        }
    }
}
