//! The event log: what the data plane's cores served (their rings, `lighter_layout::events`)
//! and what the control plane did (pushes, tag moves, deletes, mounts, mirror fetches, garbage
//! collections, admission decisions: [`Event`]s in a bounded queue, [`EventLog::record`]),
//! drained every `DRAIN_EVERY_MS` by one writer into append-only files of JSON lines under
//! `<data-dir>/events/`, and the cores' counters for the metrics.
//!
//! Lines come out in time order: each drain sorts what it took from the rings and the queue
//! together, and writes only what is older than `ORDER_SLACK_US` (the rest waits for the next
//! drain), so a later drain never writes a line older than one already written unless its
//! record reached its ring more than `ORDER_SLACK_US` after its time (a data plane thread
//! stalled between its last byte and its push). The control plane's events take their time
//! when queued, under the queue's lock, so they are never late.
//!
//! Files are named by the time (unix ms) of their first record, so a query skips what is
//! outside its window without opening it; one grows until `events_file_max_bytes`, then the
//! next starts; the oldest go when all of them pass `events_retention_bytes` or one's last write
//! is older than `events_retention_ms`. Each drained batch is written and flushed as a whole.
//! A ring's records too recent to write (`ORDER_SLACK_US`) stay in the ring until a later
//! drain, unless the ring is half full: then all are taken and the recent ones held in memory.
//! So a crash loses nothing of the rings, and under load at most the ring records held back
//! (`ORDER_SLACK_US` of pulls) and the control plane's queued events; never a line already
//! written; a torn last line (power loss mid-write) is skipped by readers.
//!
//! Queries read the files line by line (`GET /v2/_lighter/events`), so their memory is bounded
//! by the page they return, not by the log.

use std::fs::File;
use std::io::{self, BufRead, Seek, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value};
use std::sync::Arc;

use crate::clock::{now_ms, now_us};

mod format;
mod rings;
mod taken;

pub use format::rfc3339;
pub use rings::{DataplaneCounters, Rings};
use taken::Taken;

/// How often the rings are drained; sooner (`DRAIN_BUSY_MS`) while a drain finds a ring half
/// full.
pub const DRAIN_EVERY_MS: u64 = 250;
const DRAIN_BUSY_MS: u64 = 10;
/// How often the drain looks at the drop counters, and how often at most it reports new
/// drops (see [`EventLog::report_drops`]).
const DROPS_CHECK_EVERY_MS: u64 = 1000;
const DROPS_REPORT_EVERY_MS: u64 = 60_000;
/// How often the file being written is synced to disk.
const SYNC_EVERY_MS: u64 = 1000;
/// Records taken from one ring per drain (a ring holds `events_ring_records`).
const DRAIN_MAX: usize = 65_536;
/// A drain writes what is older than this; newer lines wait for the next drain, so that what
/// reaches a ring or the queue a little late still comes out in time order.
const ORDER_SLACK_US: u64 = 100_000;

/// One thing the control plane did, for the log: an action and its fields. Who asked (the
/// client's address, identity and user agent) is added from the request being served
/// ([`with_origin`]); the time, when it is queued.
#[derive(Debug)]
pub struct Event {
    time_unix_us: u64,
    action: &'static str,
    fields: Map<String, Value>,
}

impl Event {
    /// An event of the request being served (its origin taken now, if there is one).
    pub fn new(action: &'static str) -> Event {
        let mut e = Event {
            time_unix_us: 0,
            action,
            fields: Map::new(),
        };
        let _ = ORIGIN.try_with(|o| {
            if let Some(c) = o.client {
                e.fields.insert("client".into(), c.to_string().into());
            }
            let identity = o.identity.borrow();
            if !identity.is_empty() {
                e.fields.insert("identity".into(), identity.clone().into());
            }
            if !o.user_agent.is_empty() {
                e.fields
                    .insert("user_agent".into(), o.user_agent.clone().into());
            }
        });
        e
    }

    /// An event of work done elsewhere (a blocking thread) on behalf of the request `like` was
    /// made for: its origin (client, identity, user agent) is `like`'s.
    pub fn new_like(action: &'static str, like: &Event) -> Event {
        let mut e = Event {
            time_unix_us: 0,
            action,
            fields: Map::new(),
        };
        for k in ["client", "identity", "user_agent"] {
            if let Some(v) = like.fields.get(k) {
                e.fields.insert(k.to_owned(), v.clone());
            }
        }
        e
    }

    /// Adds a field (`null` values are left out).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Event {
        let v = value.into();
        if !v.is_null() {
            self.fields.insert(key.to_owned(), v);
        }
        self
    }

    /// What happened (`push_manifest`, `move_tag`, ...).
    pub fn action(&self) -> &'static str {
        self.action
    }

    /// Its fields, who asked included.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Adds a field given as text (`None`: left out).
    pub fn with_text(self, key: &str, value: Option<impl std::fmt::Display>) -> Event {
        match value {
            Some(v) => self.with(key, v.to_string()),
            None => self,
        }
    }
}

/// Who made the request being served, for its events.
#[derive(Debug, Default)]
pub struct Origin {
    pub client: Option<IpAddr>,
    /// The caller's identity once access control identified it ([`set_identity`]); empty:
    /// anonymous.
    pub identity: std::cell::RefCell<String>,
    pub user_agent: String,
}

tokio::task_local! {
    static ORIGIN: Origin;
}

/// Runs `f` (a request's handling) with `origin` as the origin of the events it records.
pub async fn with_origin<F: std::future::Future>(origin: Origin, f: F) -> F::Output {
    ORIGIN.scope(origin, f).await
}

/// The identity of the request being served, once access control found it.
pub fn set_identity(identity: &str) {
    let _ = ORIGIN.try_with(|o| identity.clone_into(&mut o.identity.borrow_mut()));
}

/// Offers `event` to the notification endpoints (if any), and queues it if the log is on.
pub fn record(app: &crate::app::App, event: Event) {
    if let Some(n) = &app.notify {
        n.offer(&event);
    }
    if let Some(log) = &app.events {
        log.record(event);
    }
}

/// The event log's files and the data plane's rings.
pub struct EventLog {
    dir: PathBuf,
    rings: Arc<Rings>,
    file_max_bytes: u64,
    retention_bytes: u64,
    retention_ms: u64,
    state: Mutex<State>,
    /// The control plane's events not yet drained, oldest first (held for an instant only:
    /// to push, or to take them all).
    queue: Mutex<Vec<Event>>,
    queue_max: usize,
    /// Events dropped because the queue was full.
    queue_dropped: AtomicU64,
    /// Lines written since start.
    logged: AtomicU64,
    /// The usage summary, once it has caught up with the log: each drain hands it the pulls
    /// it wrote.
    usage: std::sync::OnceLock<std::sync::Arc<crate::usage::Summary>>,
}

struct State {
    /// The file being appended to: its path and size.
    current: Option<(File, PathBuf, u64)>,
    /// When the current file was last fsynced.
    synced: std::time::Instant,
    /// Taken but too recent to write yet (see `ORDER_SLACK_US`), formatted; and a spare
    /// arena, so drains reuse their memory.
    held: Taken,
    spare: Vec<u8>,
    /// The control plane's events being formatted (the queue's memory, swapped).
    events: Vec<Event>,
    /// The lines of one drain, in order.
    out: Vec<u8>,
}

impl EventLog {
    /// The log of `layout`'s data directory, taking the records of `rings` (made to be
    /// drained).
    pub fn new(
        layout: &lighter_layout::Layout,
        config: &crate::config::Config,
        rings: Arc<Rings>,
    ) -> EventLog {
        EventLog {
            dir: layout.event_log_dir(),
            rings,
            file_max_bytes: config.events_file_max_bytes,
            retention_bytes: config.events_retention_bytes,
            retention_ms: config.events_retention_ms,
            state: Mutex::new(State {
                current: None,
                synced: std::time::Instant::now(),
                held: Taken::default(),
                spare: Vec::new(),
                events: Vec::new(),
                out: Vec::new(),
            }),
            queue: Mutex::new(Vec::new()),
            queue_max: config.events_queue_records as usize,
            queue_dropped: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            usage: std::sync::OnceLock::new(),
        }
    }

    /// Queues one of the control plane's events for the next drain, timed now; dropped (and
    /// counted) when the queue is full. Never waits for the disk.
    pub fn record(&self, mut event: Event) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.queue_max {
            drop(q);
            self.queue_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Timed under the lock: the queue is in time order.
        event.time_unix_us = now_us();
        q.push(event);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what the rings and the queue hold into the log (all of it: at shutdown); the
    /// lines written.
    pub fn drain(&self) -> io::Result<u64> {
        self.drain_some(true).map(|(n, _)| n)
    }

    /// Takes what the rings and the queue hold into the log, but for what is newer than
    /// `ORDER_SLACK_US` unless `all`; the lines written, and whether a ring was at least half
    /// full (the drain should come back sooner).
    fn drain_some(&self, all: bool) -> io::Result<(u64, bool)> {
        // Before anything is taken: whatever reaches a ring or the queue after this instant is
        // timed after `now - ORDER_SLACK_US`, unless it was late by more than the slack.
        let cutoff = match all {
            true => u64::MAX,
            false => now_us().saturating_sub(ORDER_SLACK_US),
        };
        let mut guard = self.state();
        let st = &mut *guard;
        let mut rings = self.rings.lock();
        // Each record is formatted as it is taken; what is held from the last drain already
        // is.
        let mut taken = std::mem::take(&mut st.held);
        let mut busy = false;
        let mut replaced = Vec::new();
        for (path, readers) in rings.by_path.iter() {
            let core = core_of(path);
            for (i, r) in readers.iter().enumerate() {
                // An old mapping (a data plane replaced it) is taken whole, and done once
                // drained.
                let old = i + 1 < readers.len();
                // Records too recent to write stay in their ring, where a crash does not lose
                // them; all of a ring half full are taken (and held in memory) to make room.
                let full = r.half_full();
                let before = if full || old { u64::MAX } else { cutoff };
                r.drain_each(DRAIN_MAX, before, |rec| taken.push_record(rec, core));
                busy |= full;
                if old {
                    replaced.push(path.clone());
                }
            }
        }
        std::mem::swap(
            &mut st.events,
            &mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()),
        );
        for e in st.events.drain(..) {
            taken.push_event(&e);
        }
        // Both planes' lines in time order; those too recent wait for the next drain.
        let ready = taken.sort(cutoff);
        st.out.clear();
        taken.write_ready(&mut st.out);
        let mut out = std::mem::take(&mut st.out);
        for path in replaced {
            rings.retire_replaced(&path);
        }
        drop(rings);
        let written = match out.is_empty() {
            true => Ok(None),
            false => self.append(st, &out).map(Some),
        };
        if let (Ok(Some(end)), Some(usage)) = (&written, self.usage.get()) {
            usage.add_drained(taken.ready_pulls(), end);
        }
        taken.retire_ready(&mut st.spare);
        st.held = taken;
        out.clear();
        st.out = out;
        written?;
        let n = ready as u64;
        self.logged.fetch_add(n, Ordering::Relaxed);
        Ok((n, busy))
    }

    /// Has the drain hand `usage` the pulls of every line it writes from now on, once `usage`
    /// has read what the log holds (with the drain held, so no line is missed or counted
    /// twice); the lines read.
    pub fn hand_usage_over(
        &self,
        usage: &std::sync::Arc<crate::usage::Summary>,
    ) -> io::Result<u64> {
        let _drain = self.state();
        let n = usage.follow()?;
        usage.go_live();
        let _ = self.usage.set(usage.clone());
        Ok(n)
    }

    /// Syncs the file being written to disk (at shutdown).
    pub fn sync(&self) -> io::Result<()> {
        match &self.state().current {
            Some((f, _, _)) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Appends whole lines to the current file, starting a new one past `file_max_bytes`, then
    /// applies the retention; where the log now ends.
    fn append(&self, st: &mut State, bytes: &[u8]) -> io::Result<Cursor> {
        let full = st
            .current
            .as_ref()
            .is_none_or(|(_, _, size)| *size >= self.file_max_bytes);
        if full {
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("{}.jsonl", now_ms()));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            let size = f.metadata()?.len();
            st.current = Some((f, path, size));
            self.expire(st);
        }
        let (f, path, size) = st.current.as_mut().expect("opened");
        f.write_all(bytes)?;
        *size += bytes.len() as u64;
        let end = Cursor {
            file_ms: file_ms_of(path).unwrap_or(0),
            offset: *size,
        };
        // Written lines survive a crash of this process at once (they are in the page cache);
        // against a power loss they are synced at most a second later.
        if st.synced.elapsed() >= Duration::from_millis(SYNC_EVERY_MS) {
            f.sync_data()?;
            st.synced = std::time::Instant::now();
        }
        Ok(end)
    }

    /// Removes the oldest files while the log is over its size or they are past their age;
    /// never the current one.
    fn expire(&self, st: &State) {
        let current = st.current.as_ref().map(|(_, p, _)| p.clone());
        let mut files = log_files(&self.dir);
        let mut total: u64 = files.iter().map(|f| f.size).sum();
        let oldest_kept = now_ms().saturating_sub(self.retention_ms);
        files.sort_by_key(|f| f.start_ms);
        for f in files {
            if Some(&f.path) == current.as_ref() {
                break;
            }
            if total <= self.retention_bytes && f.modified_ms >= oldest_kept {
                break;
            }
            match std::fs::remove_file(&f.path) {
                Ok(()) => total -= f.size,
                Err(e) => tracing::warn!("cannot expire event log {}: {e}", f.path.display()),
            }
        }
    }

    /// The data plane's counters, and the log's own.
    pub fn counters(&self) -> DataplaneCounters {
        DataplaneCounters {
            control_dropped: self.queue_dropped.load(Ordering::Relaxed),
            logged: self.logged.load(Ordering::Relaxed),
            ..self.rings.counters()
        }
    }

    /// Lines matching `q`, oldest first, at most `q.limit`; and where the next page starts.
    pub fn query(&self, q: &Query) -> io::Result<(Vec<Value>, Option<Cursor>)> {
        let mut files = log_files(&self.dir);
        files.sort_by_key(|f| f.start_ms);
        let mut out = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if q.cursor.as_ref().is_some_and(|c| f.start_ms < c.file_ms) {
                continue;
            }
            if q.until_us.is_some_and(|u| f.start_ms * 1000 > u) {
                break;
            }
            // Everything in a file is older than the next file's start.
            let next_start = files.get(i + 1).map(|n| n.start_ms);
            if q.since_us
                .is_some_and(|s| next_start.is_some_and(|n| n * 1000 < s))
            {
                continue;
            }
            let mut r = io::BufReader::new(File::open(&f.path)?);
            let mut offset = match &q.cursor {
                Some(c) if c.file_ms == f.start_ms => c.offset,
                _ => 0,
            };
            r.seek(io::SeekFrom::Start(offset))?;
            let mut buf = String::new();
            loop {
                buf.clear();
                let n = r.read_line(&mut buf)?;
                if n == 0 || !buf.ends_with('\n') {
                    break;
                }
                offset += n as u64;
                let Ok(v) = serde_json::from_str::<Value>(&buf) else {
                    continue;
                };
                if q.matches(&v) {
                    out.push(v);
                    if out.len() == q.limit {
                        let next = Cursor {
                            file_ms: f.start_ms,
                            offset,
                        };
                        return Ok((out, Some(next)));
                    }
                }
            }
        }
        Ok((out, None))
    }
}

/// Block read at a time by [`EventLog::scan_newest`], which reads the files from their end.
const BACK_READ_BYTES: usize = 64 << 10;
/// Longest line [`EventLog::scan_newest`] keeps (a data plane record's line is under 4 KiB);
/// a longer one is skipped.
const LINE_MAX_BYTES: usize = 256 << 10;
/// A newest-first scan with `since_us` stops at the first line older than `since_us` by this
/// much (lines are in time order but for records that reached their ring late).
const SCAN_SINCE_SLACK_US: u64 = 60_000_000;

/// How far a [`EventLog::scan_newest`] went.
#[derive(Debug, Default)]
pub struct Scanned {
    /// Lines read, matching or not.
    pub lines: u64,
    /// It stopped at its bound of lines, not at the start of the log or by `visit`'s choice.
    pub capped: bool,
    /// Where the last line read starts (as `before`, a next scan goes on after it).
    pub last: Option<Cursor>,
}

impl EventLog {
    /// Lines matching `q`'s filters (not its `limit` and `cursor`), newest first, each with the
    /// place where it starts (as `before`, the next call goes on from there), starting before
    /// `before` if given, until `visit` returns false or `lines_max` lines (matching or not)
    /// have been read. Files are read backwards in blocks: the memory is a block and a line,
    /// whatever the log holds.
    pub fn scan_newest(
        &self,
        q: &Query,
        before: Option<&Cursor>,
        lines_max: u64,
        mut visit: impl FnMut(Value, Cursor) -> bool,
    ) -> io::Result<Scanned> {
        use std::os::unix::fs::FileExt;
        let mut files = log_files(&self.dir);
        files.sort_by_key(|f| std::cmp::Reverse(f.start_ms));
        let mut block = vec![0u8; BACK_READ_BYTES];
        let mut scanned = Scanned::default();
        for (i, f) in files.iter().enumerate() {
            if before.is_some_and(|c| f.start_ms > c.file_ms) {
                continue;
            }
            if q.until_us.is_some_and(|u| f.start_ms * 1000 >= u) {
                continue;
            }
            // Everything in a file is older than the next newer file's start.
            let newer_start = i.checked_sub(1).map(|j| files[j].start_ms);
            if q.since_us
                .is_some_and(|s| newer_start.is_some_and(|n| n * 1000 < s))
            {
                return Ok(scanned);
            }
            let file = File::open(&f.path)?;
            let len = file.metadata()?.len();
            let mut pos = match before {
                Some(c) if c.file_ms == f.start_ms => c.offset.min(len),
                _ => len,
            };
            // `acc` holds the bytes from `pos` to the end of the newest line not yet visited;
            // bytes after the last newline (a torn line) are dropped.
            let mut acc: Vec<u8> = Vec::new();
            let mut skipping = false;
            loop {
                while let Some(&last) = acc.last() {
                    if last != b'\n' {
                        match acc.iter().rposition(|&b| b == b'\n') {
                            Some(k) => acc.truncate(k + 1),
                            None if pos == 0 => acc.clear(),
                            None => break,
                        }
                        continue;
                    }
                    let body = &acc[..acc.len() - 1];
                    let (start, line) = match body.iter().rposition(|&b| b == b'\n') {
                        Some(k) => (k + 1, &body[k + 1..]),
                        None if pos == 0 => (0, body),
                        None => break,
                    };
                    let at = Cursor {
                        file_ms: f.start_ms,
                        offset: pos + start as u64,
                    };
                    scanned.lines += 1;
                    scanned.last = Some(at.clone());
                    if let Ok(v) = serde_json::from_slice::<Value>(line) {
                        let t = v["time_unix_us"].as_u64().unwrap_or(0);
                        if q.since_us
                            .is_some_and(|s| t.saturating_add(SCAN_SINCE_SLACK_US) < s)
                        {
                            return Ok(scanned);
                        }
                        if q.matches(&v) && !visit(v, at) {
                            return Ok(scanned);
                        }
                    }
                    if scanned.lines >= lines_max {
                        scanned.capped = true;
                        return Ok(scanned);
                    }
                    acc.truncate(start);
                }
                if pos == 0 {
                    break;
                }
                if acc.len() > LINE_MAX_BYTES {
                    acc.clear();
                    skipping = true;
                }
                let n = (pos as usize).min(BACK_READ_BYTES);
                pos -= n as u64;
                file.read_exact_at(&mut block[..n], pos)?;
                let mut read = &block[..n];
                if skipping {
                    // The rest of an overlong line: what precedes its start is next.
                    match read.iter().rposition(|&b| b == b'\n') {
                        Some(k) => {
                            read = &read[..k + 1];
                            skipping = false;
                        }
                        None => continue,
                    }
                }
                let mut joined = Vec::with_capacity(read.len() + acc.len());
                joined.extend_from_slice(read);
                joined.extend_from_slice(&acc);
                acc = joined;
            }
        }
        Ok(scanned)
    }
}

/// Where a page of a query ends: a file (by its start) and a byte offset in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub file_ms: u64,
    pub offset: u64,
}

impl Cursor {
    pub fn parse(s: &str) -> Option<Cursor> {
        let (f, o) = s.split_once('-')?;
        Some(Cursor {
            file_ms: f.parse().ok()?,
            offset: o.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.file_ms, self.offset)
    }
}

/// A query's filters: each given one must match exactly (`repository`, `digest`, `action`,
/// `client`, `identity`, `source`), and the time must be in `[since, until)`.
#[derive(Debug, Default)]
pub struct Query {
    pub source: Option<String>,
    pub repository: Option<String>,
    pub digest: Option<String>,
    pub action: Option<String>,
    pub client: Option<String>,
    pub identity: Option<String>,
    pub since_us: Option<u64>,
    pub until_us: Option<u64>,
    pub limit: usize,
    pub cursor: Option<Cursor>,
}

impl Query {
    fn matches(&self, v: &Value) -> bool {
        let eq = |field: &str, want: &Option<String>| {
            want.as_ref()
                .is_none_or(|w| v[field].as_str() == Some(w.as_str()))
        };
        let t = v["time_unix_us"].as_u64().unwrap_or(0);
        eq("repository", &self.repository)
            && eq("digest", &self.digest)
            && eq("action", &self.action)
            && eq("client", &self.client)
            && eq("identity", &self.identity)
            && eq("source", &self.source)
            && self.since_us.is_none_or(|s| t >= s)
            && self.until_us.is_none_or(|u| t < u)
    }
}

/// A file of the log, named by the time of its first line.
pub(crate) struct LogFile {
    pub path: PathBuf,
    pub start_ms: u64,
    pub size: u64,
    pub modified_ms: u64,
}

/// The files of the log in `dir`, in no order.
pub(crate) fn log_files(dir: &Path) -> Vec<LogFile> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let path = e.path();
            let start_ms = file_ms_of(&path)?;
            let meta = e.metadata().ok()?;
            let modified_ms = crate::clock::ms_of(meta.modified().ok()?);
            Some(LogFile {
                path,
                start_ms,
                size: meta.len(),
                modified_ms,
            })
        })
        .collect()
}

/// The time a log file is named by (`<unix ms>.jsonl`).
fn file_ms_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

fn core_of(path: &Path) -> Option<u64> {
    path.file_stem()?
        .to_str()?
        .strip_prefix("core-")?
        .parse()
        .ok()
}

/// `since`/`until` as given: unix milliseconds, or RFC 3339 UTC (`2026-11-29T23:30:00Z`, with
/// or without a fraction).
pub fn parse_time_us(s: &str) -> Option<u64> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().ok()?.checked_mul(1000);
    }
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&dd) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let micros = if frac.is_empty() {
        0
    } else {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let f: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        f.parse::<u64>().ok()?
    };
    // Civil date to days (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}

/// Sets the calling thread's CPUs to those the process may use but `cpus` (all of them when
/// that leaves none, or `cpus` is empty).
fn keep_off_cpus(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity/sched_setaffinity on this thread (0)
    // with its size; CPU_ISSET/CPU_CLR/CPU_COUNT read and write only that set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        // The process's CPUs: those of the thread that started the control plane.
        if libc::sched_getaffinity(
            std::process::id() as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        ) != 0
        {
            return;
        }
        let all = set;
        for &c in cpus {
            if c < libc::CPU_SETSIZE as usize {
                libc::CPU_CLR(c, &mut set);
            }
        }
        let chosen = match libc::CPU_COUNT(&set) {
            0 => all,
            _ => set,
        };
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &chosen) == 0 {
            tracing::debug!(
                ?cpus,
                "event log drain kept off the data plane's pinned CPUs"
            );
        }
    }
}

/// What the drain last said about drops.
#[derive(Default)]
struct Drops {
    /// The totals reported (data plane records, control plane events).
    reported: (u64, u64),
    checked: Option<std::time::Instant>,
    report: Option<std::time::Instant>,
}

impl EventLog {
    /// Records dropped since the last report go into the log itself, as an `events_dropped`
    /// event, and into a warning: a reader of the log learns where it has a gap, not only the
    /// metrics. The first drops are reported at once (within `DROPS_CHECK_EVERY_MS`), later
    /// ones at most every `DROPS_REPORT_EVERY_MS`.
    fn report_drops(&self, d: &mut Drops) {
        let due = |at: Option<std::time::Instant>, ms: u64| {
            at.is_none_or(|t| t.elapsed() >= Duration::from_millis(ms))
        };
        if !due(d.checked, DROPS_CHECK_EVERY_MS) || !due(d.report, DROPS_REPORT_EVERY_MS) {
            return;
        }
        d.checked = Some(std::time::Instant::now());
        let c = self.counters();
        let dataplane = c.dropped.saturating_sub(d.reported.0);
        let controlplane = c.control_dropped.saturating_sub(d.reported.1);
        if dataplane == 0 && controlplane == 0 {
            return;
        }
        d.reported = (c.dropped, c.control_dropped);
        d.report = d.checked;
        tracing::warn!(
            dataplane,
            controlplane,
            "event log: records dropped since the last report, so the log has a gap (rings or queue full: the drain runs on CPU time serving leaves; lighter_events_dropped_total counts them)"
        );
        self.record(
            Event::new("events_dropped")
                .with("dataplane", dataplane)
                .with("controlplane", controlplane),
        );
    }
}

/// Runs the drain every `DRAIN_EVERY_MS` on a thread of its own (file writes and fsync stay
/// off the async threads) until the process ends.
pub fn start_draining(log: std::sync::Arc<EventLog>) {
    let spawned = std::thread::Builder::new()
        .name("lighter-events".into())
        .spawn(move || {
            // Serving comes first: the drain runs on CPU time nothing else wants (SCHED_IDLE;
            // nice 19 where that is refused). On cores serving keeps saturated the rings fill,
            // and what they cannot hold is dropped and counted, never waited for.
            // SAFETY: sched_setscheduler and setpriority on this thread's own id, with a
            // param struct that lives across the call.
            unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
                }
            }
            let mut pause = DRAIN_EVERY_MS;
            let mut kept_off: Vec<usize> = Vec::new();
            let mut drops = Drops::default();
            loop {
                std::thread::sleep(Duration::from_millis(pause));
                // Off the CPUs the data plane's threads own (pinned: dedicated cores), so the
                // log never runs on a serving core; on floating threads, anywhere.
                let pinned = log.rings.pinned_cpus();
                if pinned != kept_off {
                    keep_off_cpus(&pinned);
                    kept_off = pinned;
                }
                log.report_drops(&mut drops);
                pause = match log.drain_some(false) {
                    Ok((_, true)) => DRAIN_BUSY_MS,
                    Ok(_) => DRAIN_EVERY_MS,
                    Err(e) => {
                        tracing::warn!("event log: {e}");
                        DRAIN_EVERY_MS
                    }
                };
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the event log's drain: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lighter_layout::events::Record;

    #[test]
    fn times_round_trip_and_bad_ones_are_refused() {
        let t = 1_796_081_400_123_456;
        assert_eq!(rfc3339(t), "2026-11-30T23:30:00.123456Z");
        assert_eq!(parse_time_us(&rfc3339(t)), Some(t));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            parse_time_us("2000-02-29T12:00:00Z"),
            Some(951_825_600_000_000)
        );
        assert_eq!(rfc3339(951_825_600_000_000), "2000-02-29T12:00:00.000000Z");
        assert_eq!(parse_time_us("1700000000000"), Some(1_700_000_000_000_000));
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "1.5",
        ] {
            assert_eq!(parse_time_us(bad), None, "{bad}");
        }
    }

    #[test]
    fn lines_are_json_with_every_field_escaped() {
        let mut r = Record::empty();
        r.start(
            lighter_layout::events::Action::ManifestGet,
            "team/app",
            &["v1"],
        );
        r.set_digest(&["sha256:", "ab"]);
        r.set_agent("agent \"quoted\" \\ \u{1}".as_bytes());
        r.set_client(Some("::1".parse().unwrap()));
        r.status = 200;
        r.bytes_sent = 512;
        r.duration_us = 7;
        r.time_unix_us = 951_825_600_000_000;
        let mut out = Vec::new();
        format::line(&mut out, &r, Some(3));
        assert_eq!(out.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2000-02-29T12:00:00.000000Z");
        assert_eq!(v["action"], "pull_manifest");
        assert_eq!(v["repository"], "team/app");
        assert_eq!(v["reference"], "v1");
        assert_eq!(v["digest"], "sha256:ab");
        assert_eq!(v["user_agent"], "agent \"quoted\" \\ \u{1}");
        assert_eq!(v["client"], "::1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bytes"], 512);
        assert_eq!(v["core"], 3);
    }

    /// A log of two files of numbered lines (`n` in `reference`, times increasing), the
    /// second ending in a torn line.
    fn numbered_log(lines: u64) -> (tempfile::TempDir, EventLog) {
        let dir = tempfile::tempdir().unwrap();
        let layout = lighter_layout::Layout::open(dir.path());
        let rings = Arc::new(Rings::new(layout.event_rings_dir(), true));
        let log = EventLog::new(&layout, &crate::config::Config::default(), rings);
        std::fs::create_dir_all(layout.event_log_dir()).unwrap();
        let half = lines / 2;
        for (start_ms, range) in [(1000, 0..half), (2000, half..lines)] {
            let mut text = String::new();
            for n in range {
                let repo = if n % 3 == 0 { "three" } else { "other" };
                text.push_str(&format!(
                    "{{\"time_unix_us\":{},\"action\":\"pull_manifest\",\"repository\":\"{repo}\",\"reference\":\"{n}\",\"pad\":\"{}\"}}\n",
                    1_000_000 + n * 1000,
                    "x".repeat((n % 97) as usize)
                ));
            }
            if start_ms == 2000 {
                text.push_str("{\"time_unix_us\":9999999,\"action\":\"pull_ma");
            }
            std::fs::write(
                layout.event_log_dir().join(format!("{start_ms}.jsonl")),
                text,
            )
            .unwrap();
        }
        (dir, log)
    }

    #[test]
    fn newest_first_scans_read_backwards_across_blocks_and_files_and_resume() {
        let total = 3000;
        let (_dir, log) = numbered_log(total);
        let n_of = |v: &Value| v["reference"].as_str().unwrap().parse::<u64>().unwrap();
        // Everything, newest first; the torn line is no line.
        let mut all = Vec::new();
        log.scan_newest(&Query::default(), None, u64::MAX, |v, _| {
            all.push(n_of(&v));
            true
        })
        .unwrap();
        assert_eq!(all, (0..total).rev().collect::<Vec<_>>());
        // Pages of 7 of repository "three", each going on from the last one's place.
        let q = Query {
            repository: Some("three".into()),
            ..Query::default()
        };
        let mut seen: Vec<u64> = Vec::new();
        let mut before: Option<Cursor> = None;
        loop {
            let mut page = Vec::new();
            let mut last = None;
            log.scan_newest(&q, before.as_ref(), u64::MAX, |v, at| {
                page.push(n_of(&v));
                last = Some(at);
                page.len() < 7
            })
            .unwrap();
            seen.extend(&page);
            if page.len() < 7 {
                break;
            }
            before = last;
        }
        let want: Vec<u64> = (0..total).rev().filter(|n| n % 3 == 0).collect();
        assert_eq!(seen, want);
        // `since` stops the scan (past the ordering slack) instead of reading the rest.
        let q = Query {
            since_us: Some(1_000_000 + (total - 10) * 1000),
            ..Query::default()
        };
        let mut recent = Vec::new();
        log.scan_newest(&q, None, u64::MAX, |v, _| {
            recent.push(n_of(&v));
            true
        })
        .unwrap();
        assert_eq!(recent, ((total - 10)..total).rev().collect::<Vec<_>>());
        // The bound counts every line read, matching or not, and says where it stopped.
        let q = Query {
            repository: Some("nowhere".into()),
            ..Query::default()
        };
        let scanned = log
            .scan_newest(&q, None, 100, |_, _| panic!("nothing matches"))
            .unwrap();
        assert_eq!(scanned.lines, 100);
        assert!(scanned.capped);
        let more = log
            .scan_newest(&q, scanned.last.as_ref(), u64::MAX, |_, _| false)
            .unwrap();
        assert_eq!((more.lines, more.capped), (total - 100, false));
    }

    #[test]
    fn cursors_round_trip() {
        let c = Cursor {
            file_ms: 17,
            offset: 4096,
        };
        assert_eq!(Cursor::parse(&c.to_string()), Some(c));
        assert_eq!(Cursor::parse("x-1"), None);
    }
}
