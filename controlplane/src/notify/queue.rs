//! The durable notification queue and its delivery.
//!
//! On disk (`<data-dir>/notifications/`): append-only segment files `<seq>.jsonl`, one
//! CloudEvent per line, and one cursor per endpoint (`cursors/<key>`: `"<seq> <offset>\n"`,
//! where its next event starts). One writer thread appends what [`Queue::push`] left in memory
//! (fsync per batch), rotates a segment once it passes a eighth of the bound, drops segments
//! every endpoint has passed, and, when the segments pass `notifications_queue_max_bytes`,
//! drops the oldest segment and counts, per endpoint, the events in it that endpoint had not
//! received yet. A start opens a new segment (a torn last line of the previous one is skipped).
//!
//! One task per endpoint reads from its cursor, POSTs each event it wants until a 2xx answer
//! (backoff from `notifications_retry_initial_ms`, doubling to `notifications_retry_max_ms`), and
//! only then moves its cursor: in order, at least once (a crash between the answer and the
//! cursor's save sends that event again).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::{Endpoint, SIGNATURE_HEADER};
use crate::app::block;

/// Events held in memory for the writer; past it the newest are dropped and counted (only if
/// the disk stalls: the writer takes them within milliseconds).
const MEMORY_EVENTS_MAX: usize = 65_536;
/// Longest line read back (events are a few hundred bytes).
const LINE_MAX_BYTES: u64 = 1 << 20;
/// Smallest segment before rotation.
const SEGMENT_MIN_BYTES: u64 = 512;
/// Largest segment before rotation.
const SEGMENT_MAX_BYTES: u64 = 4 << 20;

/// A place in the queue: segment and byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub seq: u64,
    pub offset: u64,
}

/// An endpoint as the delivery task needs it.
pub struct Target {
    pub endpoint: Endpoint,
    pub secret: Option<ring::hmac::Key>,
    pub http: reqwest::Client,
}

#[derive(Default)]
struct TargetCounters {
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    dropped: AtomicU64,
}

pub struct Queue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    targets: Vec<Target>,
    counters: Vec<TargetCounters>,
    memory: Mutex<VecDeque<Vec<u8>>>,
    wake: Condvar,
    state: Mutex<State>,
    /// The end of what is written: readers read up to here.
    written: watch::Sender<Pos>,
    queued: AtomicU64,
    written_events: AtomicU64,
    /// Events never written: memory full, or the disk refused them.
    unwritten: AtomicU64,
    queue_bytes: AtomicU64,
}

struct State {
    /// Segments on disk, oldest first, with their sizes; the last is being written.
    segments: VecDeque<(u64, u64)>,
    /// Each target's next event.
    cursors: Vec<Pos>,
}

impl Queue {
    /// Opens (creates) the queue directory, finds its segments and the targets' cursors, and
    /// starts a new segment.
    pub fn open(dir: PathBuf, max_bytes: u64, targets: Vec<Target>) -> io::Result<Arc<Queue>> {
        std::fs::create_dir_all(dir.join("cursors"))?;
        let mut segments: Vec<(u64, u64)> = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.push((seq, entry.metadata()?.len()));
        }
        segments.sort_unstable();
        let current = segments.last().map_or(1, |(s, _)| s + 1);
        File::create(segment_path(&dir, current))?;
        sync_dir(&dir)?;
        segments.push((current, 0));
        let first = segments[0].0;
        let cursors = targets
            .iter()
            .map(|t| {
                let saved = read_cursor(&dir, &t.endpoint.key());
                match saved {
                    Some(p) if p.seq < first => Pos {
                        seq: first,
                        offset: 0,
                    },
                    Some(p) if p.seq <= current => p,
                    // New endpoint (or a cursor from elsewhere): from now on.
                    _ => Pos {
                        seq: current,
                        offset: 0,
                    },
                }
            })
            .collect();
        let queue_bytes: u64 = segments.iter().map(|(_, b)| b).sum();
        let counters = targets.iter().map(|_| TargetCounters::default()).collect();
        Ok(Arc::new(Queue {
            segment_bytes: (max_bytes / 8).clamp(SEGMENT_MIN_BYTES, SEGMENT_MAX_BYTES),
            dir,
            max_bytes,
            targets,
            counters,
            memory: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            state: Mutex::new(State {
                segments: segments.into(),
                cursors,
            }),
            written: watch::channel(Pos {
                seq: current,
                offset: 0,
            })
            .0,
            queued: AtomicU64::new(0),
            written_events: AtomicU64::new(0),
            unwritten: AtomicU64::new(0),
            queue_bytes: AtomicU64::new(queue_bytes),
        }))
    }

    /// Whether any endpoint wants this event.
    pub fn wanted(&self, action: &str, repository: &str) -> bool {
        self.targets
            .iter()
            .any(|t| t.endpoint.wants(action, repository))
    }

    /// Hands one event (a JSON line without its newline) to the writer.
    pub fn push(&self, line: Vec<u8>) {
        let mut m = lock(&self.memory);
        if m.len() >= MEMORY_EVENTS_MAX {
            drop(m);
            self.unwritten.fetch_add(1, Ordering::Relaxed);
            return;
        }
        m.push_back(line);
        drop(m);
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Waits up to `within` for memory to be written out.
    pub fn flush(&self, within: Duration) {
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            let done = self.written_events.load(Ordering::Relaxed)
                + self.unwritten.load(Ordering::Relaxed)
                >= self.queued.load(Ordering::Relaxed);
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn cursor(&self, i: usize) -> Pos {
        self.state().cursors[i]
    }

    /// Moves target `i` from `from` to `to`, unless its cursor moved meanwhile (its events
    /// were dropped under it).
    fn advance(&self, i: usize, from: Pos, to: Pos) {
        let mut st = self.state();
        if st.cursors[i] == from {
            st.cursors[i] = to;
        }
    }

    /// The writer: memory → the current segment, fsynced per batch; then rotation, cleanup and
    /// the bound.
    fn write_loop(self: Arc<Queue>) {
        let mut seq = self.written.borrow().seq;
        let mut file = match open_append(&segment_path(&self.dir, seq)) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(
                    "notifications: cannot open segment {seq}: {e}; nothing will be queued"
                );
                return;
            }
        };
        let mut size = 0u64;
        let mut buf = Vec::new();
        let mut written_now = 0u64;
        loop {
            let batch: Vec<Vec<u8>> = {
                let mut m = lock(&self.memory);
                if m.is_empty() {
                    m = self
                        .wake
                        .wait_timeout(m, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                m.drain(..).collect()
            };
            if !batch.is_empty() {
                buf.clear();
                for line in &batch {
                    buf.extend_from_slice(line);
                    buf.push(b'\n');
                }
                match file.write_all(&buf).and_then(|()| file.sync_data()) {
                    Ok(()) => {
                        size += buf.len() as u64;
                        written_now = batch.len() as u64;
                        let mut st = self.state();
                        if let Some(last) = st.segments.back_mut() {
                            last.1 = size;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            events = batch.len(),
                            "notifications: cannot write the queue: {e}; events dropped"
                        );
                        self.unwritten
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        // No torn line stays behind.
                        let _ = file.set_len(size);
                    }
                }
                self.written.send_replace(Pos { seq, offset: size });
            }
            let over = self.queue_bytes() > self.max_bytes;
            if size >= self.segment_bytes || (over && size > 0) {
                match rotate(&self.dir, seq + 1) {
                    Ok(f) => {
                        file = f;
                        seq += 1;
                        size = 0;
                        self.state().segments.push_back((seq, 0));
                        self.written.send_replace(Pos { seq, offset: 0 });
                    }
                    Err(e) => {
                        tracing::warn!("notifications: cannot start segment {}: {e}", seq + 1)
                    }
                }
            }
            self.trim();
            // Counted once the bound is applied too: whoever sees the count sees its drops.
            self.written_events
                .fetch_add(std::mem::take(&mut written_now), Ordering::Relaxed);
        }
    }

    fn queue_bytes(&self) -> u64 {
        self.state().segments.iter().map(|(_, b)| b).sum()
    }

    /// Removes segments every target has passed, then the oldest ones past the bound (their
    /// events not yet received counted as dropped, per target, and its cursor moved on).
    fn trim(&self) {
        let mut st = self.state();
        // The segment being written (the last) stays.
        while st.segments.len() >= 2 {
            let first = st.segments[0].0;
            let passed = st.cursors.iter().all(|c| c.seq > first);
            let total: u64 = st.segments.iter().map(|(_, b)| b).sum();
            if !passed && total <= self.max_bytes {
                break;
            }
            let path = segment_path(&self.dir, first);
            if !passed {
                for (i, c) in st.cursors.iter_mut().enumerate() {
                    if c.seq > first {
                        continue;
                    }
                    let n = count_wanted(&path, c.offset, &self.targets[i].endpoint);
                    if n > 0 {
                        self.counters[i].dropped.fetch_add(n, Ordering::Relaxed);
                        tracing::warn!(endpoint = self.targets[i].endpoint.label(), dropped = n, "notifications: queue over notifications_queue_max_bytes, oldest events dropped");
                    }
                    *c = Pos {
                        seq: first + 1,
                        offset: 0,
                    };
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("notifications: cannot remove {}: {e}", path.display());
                    break;
                }
            }
            st.segments.pop_front();
        }
        let total: u64 = st.segments.iter().map(|(_, b)| b).sum();
        self.queue_bytes.store(total, Ordering::Relaxed);
    }

    /// The metrics, in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let one = |v: &AtomicU64| vec![(String::new(), v.load(Ordering::Relaxed))];
        let per = |f: fn(&TargetCounters) -> &AtomicU64| {
            self.targets
                .iter()
                .zip(&self.counters)
                .map(|(t, c)| {
                    (
                        format!("{{endpoint=\"{}\"}}", escape_label(t.endpoint.label())),
                        f(c).load(Ordering::Relaxed),
                    )
                })
                .collect::<Vec<_>>()
        };
        metric(
            "lighter_notifications_queued_total",
            "counter",
            "Events handed to the notification queue.",
            one(&self.queued),
        );
        metric(
            "lighter_notifications_written_total",
            "counter",
            "Events written to the notification queue on disk.",
            one(&self.written_events),
        );
        metric(
            "lighter_notifications_unwritten_total",
            "counter",
            "Events never written to the queue (memory full or a disk error).",
            one(&self.unwritten),
        );
        metric(
            "lighter_notifications_queue_bytes",
            "gauge",
            "Bytes of the notification queue's segments on disk.",
            one(&self.queue_bytes),
        );
        metric(
            "lighter_notifications_delivered_total",
            "counter",
            "Events an endpoint acknowledged with a 2xx answer.",
            per(|c| &c.delivered),
        );
        metric(
            "lighter_notifications_failed_attempts_total",
            "counter",
            "Deliveries that failed (no answer, or not 2xx) and will be tried again.",
            per(|c| &c.failed_attempts),
        );
        metric(
            "lighter_notifications_dropped_total",
            "counter",
            "Events an endpoint never received: the oldest, dropped past notifications_queue_max_bytes.",
            per(|c| &c.dropped),
        );
    }
}

/// Starts the writer thread and one delivery task per target.
pub fn start(queue: &Arc<Queue>, retry_initial: Duration, retry_max: Duration) {
    let q = queue.clone();
    std::thread::Builder::new()
        .name("lighter-notify".into())
        .spawn(move || q.write_loop())
        .expect("spawn the notification writer");
    for i in 0..queue.targets.len() {
        tokio::spawn(deliver_loop(queue.clone(), i, retry_initial, retry_max));
    }
}

/// What a reader finds at a position.
enum Next {
    /// An event (its line without the newline) and where the next one starts.
    Event(Vec<u8>, Pos),
    /// Nothing more in this segment: go on at that position.
    Skip(Pos),
    /// Nothing written yet.
    Wait,
}

fn read_next(dir: &Path, pos: Pos, written: Pos) -> io::Result<Next> {
    let next_segment = Pos {
        seq: pos.seq + 1,
        offset: 0,
    };
    let limit = if pos.seq == written.seq {
        written.offset.saturating_sub(pos.offset)
    } else if pos.seq < written.seq {
        LINE_MAX_BYTES
    } else {
        return Ok(Next::Wait);
    };
    if limit == 0 {
        return Ok(Next::Wait);
    }
    let mut file = match File::open(segment_path(dir, pos.seq)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && pos.seq < written.seq => {
            return Ok(Next::Skip(next_segment))
        }
        Err(e) => return Err(e),
    };
    file.seek(io::SeekFrom::Start(pos.offset))?;
    let mut line = Vec::new();
    BufReader::new(file.take(limit.min(LINE_MAX_BYTES))).read_until(b'\n', &mut line)?;
    if line.last() == Some(&b'\n') {
        let end = Pos {
            seq: pos.seq,
            offset: pos.offset + line.len() as u64,
        };
        line.pop();
        return Ok(Next::Event(line, end));
    }
    // A segment's end (or a torn line left by a crash): the next segment, once there is one.
    if pos.seq < written.seq {
        Ok(Next::Skip(next_segment))
    } else {
        Ok(Next::Wait)
    }
}

/// Whether `endpoint` wants the event on this line (by its type and repository).
fn line_wanted(line: &[u8], endpoint: &Endpoint) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
        return false;
    };
    let action = v["type"]
        .as_str()
        .and_then(|t| t.strip_prefix("io.lighter."))
        .unwrap_or_default();
    let repository = v["data"]["repository"].as_str().unwrap_or_default();
    endpoint.wants(action, repository)
}

/// Events of the segment at `path` from `offset` that `endpoint` wants.
fn count_wanted(path: &Path, offset: u64, endpoint: &Endpoint) -> u64 {
    let Ok(mut file) = File::open(path) else {
        return 0;
    };
    if file.seek(io::SeekFrom::Start(offset)).is_err() {
        return 0;
    }
    BufReader::new(file)
        .split(b'\n')
        .map_while(Result::ok)
        .filter(|l| line_wanted(l, endpoint))
        .count() as u64
}

/// One endpoint's delivery: forever, in order.
async fn deliver_loop(q: Arc<Queue>, i: usize, retry_initial: Duration, retry_max: Duration) {
    let mut written = q.written.subscribe();
    let key = q.targets[i].endpoint.key();
    let mut saved = None;
    loop {
        let pos = q.cursor(i);
        let end = *written.borrow_and_update();
        match block(|| read_next(&q.dir, pos, end)) {
            Ok(Next::Event(line, next)) => {
                if line_wanted(&line, &q.targets[i].endpoint)
                    && !send(&q, i, pos, &line, retry_initial, retry_max).await
                {
                    // Dropped under us: go on from where the cursor now is.
                    continue;
                }
                q.advance(i, pos, next);
            }
            Ok(Next::Skip(next)) => q.advance(i, pos, next),
            Ok(Next::Wait) => {
                if saved != Some(pos) {
                    match block(|| write_cursor(&q.dir, &key, pos)) {
                        Ok(()) => saved = Some(pos),
                        Err(e) => tracing::warn!("notifications: cannot save a cursor: {e}"),
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), written.changed()).await;
            }
            Err(e) => {
                tracing::warn!("notifications: cannot read the queue: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Each delivered event's place is saved, so a crash resends at most the one in flight.
        let now = q.cursor(i);
        if now != pos && saved != Some(now) {
            match block(|| write_cursor(&q.dir, &key, now)) {
                Ok(()) => saved = Some(now),
                Err(e) => tracing::warn!("notifications: cannot save a cursor: {e}"),
            }
        }
    }
}

/// POSTs `line` to target `i` until it answers 2xx; false if its cursor left `pos` meanwhile
/// (the event was dropped past the bound).
async fn send(
    q: &Queue,
    i: usize,
    pos: Pos,
    line: &[u8],
    retry_initial: Duration,
    retry_max: Duration,
) -> bool {
    let t = &q.targets[i];
    let signature = t.secret.as_ref().map(|k| super::signature(k, line));
    let mut backoff = retry_initial;
    let mut attempts = 0u64;
    loop {
        if q.cursor(i) != pos {
            return false;
        }
        let mut req = t
            .http
            .post(&t.endpoint.url)
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .body(line.to_vec());
        if let Some(s) = &signature {
            req = req.header(SIGNATURE_HEADER, s.as_str());
        }
        let why = match req.send().await {
            Ok(r) if r.status().is_success() => {
                q.counters[i].delivered.fetch_add(1, Ordering::Relaxed);
                if attempts > 0 {
                    tracing::info!(
                        endpoint = t.endpoint.label(),
                        attempts,
                        "notifications: endpoint reachable again"
                    );
                }
                return true;
            }
            Ok(r) => format!("answered {}", r.status()),
            Err(e) => e.to_string(),
        };
        attempts += 1;
        q.counters[i]
            .failed_attempts
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            endpoint = t.endpoint.label(),
            attempts,
            retry_in_ms = backoff.as_millis() as u64,
            "notifications: delivery failed: {why}"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(retry_max);
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.jsonl"))
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn rotate(dir: &Path, seq: u64) -> io::Result<File> {
    let f = open_append(&segment_path(dir, seq))?;
    sync_dir(dir)?;
    Ok(f)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_cursor(dir: &Path, key: &str) -> Option<Pos> {
    let text = std::fs::read_to_string(dir.join("cursors").join(key)).ok()?;
    let (seq, offset) = text.trim_end().split_once(' ')?;
    Some(Pos {
        seq: seq.parse().ok()?,
        offset: offset.parse().ok()?,
    })
}

/// Saves a cursor by rename (a crash leaves the old or the new one, never a torn one).
fn write_cursor(dir: &Path, key: &str, pos: Pos) -> io::Result<()> {
    let cursors = dir.join("cursors");
    let tmp = cursors.join(format!(".{key}.tmp"));
    std::fs::write(&tmp, format!("{} {}\n", pos.seq, pos.offset))?;
    std::fs::rename(&tmp, cursors.join(key))
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
