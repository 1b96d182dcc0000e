//! Usage: the event log's pulls summed per repository, tag and digest (pulls, bytes, distinct
//! clients and identities, first and last pull), kept current without reading the log per
//! question.
//!
//! A thread of its own (`lighter-usage`, on CPU time nothing else wants) reads the log's files
//! from a position (a file and a byte offset, like a query's cursor) to their end, adding every
//! line to a [`Usage`] in memory; then, with the drain held, it reads what was written
//! meanwhile and hands over: from then on the drain adds the pulls of the lines it writes, with
//! the log's new end ([`Summary::add_drained`]), so nothing is parsed back. Every
//! `usage_save_interval_ms` the summary and the position it covers are published together to
//! `events/usage.json` (`Layout::put_usage`: temp file, fsync, rename). A restart loads that
//! file and reads only the lines written after its position, so nothing is counted twice or
//! missed; without it (first start, or a log that no longer holds its position) the summary is
//! rebuilt from every file of the log.
//!
//! What counts: `pull_manifest` and `pull_blob` lines answered 2xx are pulls; `head_manifest`
//! and `head_blob` answered 2xx are `heads`, counted apart; failed requests are not counted (a
//! flood of 404s for made-up names makes no entries). A repository's row sums its manifest and
//! blob pulls; a tag's row counts the manifest pulls by that tag (a blob GET names no tag); a
//! digest's row counts the pulls of that digest (a manifest by tag or digest, or a blob).
//!
//! Memory is bounded: at most `usage_entries_max` entries (repositories, tags and digests); when
//! full, the least recently pulled tenth goes (`evicted` counts them). Distinct clients and
//! identities are exact up to [`EXACT_MAX`] per entry, then a 256-register HyperLogLog
//! (about 6.5 % standard error; the row then says `estimated`).
//!
//! Questions with `since`/`until` are not about the whole log: they are answered by reading the
//! files that overlap the window (skipping the others by name), into a summary with the same
//! bounds.

use foldhash::HashMap;
use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufRead, Seek};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::events::{log_files, rfc3339, Cursor};

/// Distinct values kept exactly per entry (then estimated).
pub const EXACT_MAX: usize = 32;
/// Registers of the HyperLogLog estimate (a byte each).
const SKETCH_REGISTERS: usize = 256;
/// How often the following thread looks for new lines.
const FOLLOW_EVERY_MS: u64 = 1000;
/// Lines added per hold of the summary's lock (questions are answered in between).
const LINES_PER_LOCK: usize = 16_384;
/// The saved file's format.
const VERSION: u32 = 1;

/// Distinct values seen (hashed): exact while few, an estimate beyond.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Distinct {
    /// Sorted hashes.
    Exact(Vec<u64>),
    /// HyperLogLog registers, hex.
    #[serde(with = "hex_registers")]
    Sketch(Box<[u8; SKETCH_REGISTERS]>),
}

impl Default for Distinct {
    fn default() -> Distinct {
        Distinct::Exact(Vec::new())
    }
}

impl Distinct {
    fn insert(&mut self, h: u64) {
        match self {
            Distinct::Exact(v) => {
                if let Err(at) = v.binary_search(&h) {
                    if v.len() < EXACT_MAX {
                        v.insert(at, h);
                    } else {
                        let mut s = Box::new([0u8; SKETCH_REGISTERS]);
                        for &x in v.iter().chain(std::iter::once(&h)) {
                            sketch_add(&mut s, x);
                        }
                        *self = Distinct::Sketch(s);
                    }
                }
            }
            Distinct::Sketch(s) => sketch_add(s, h),
        }
    }

    /// How many, and whether that is an estimate.
    fn count(&self) -> (u64, bool) {
        match self {
            Distinct::Exact(v) => (v.len() as u64, false),
            Distinct::Sketch(s) => (sketch_estimate(s), true),
        }
    }
}

fn sketch_add(s: &mut [u8; SKETCH_REGISTERS], h: u64) {
    let index = (h >> 56) as usize;
    // The rank of the first 1 bit in the other 56 bits (a guard bit bounds it at 57).
    let rank = ((h << 8) | 0x80).leading_zeros() as u8 + 1;
    s[index] = s[index].max(rank);
}

fn sketch_estimate(s: &[u8; SKETCH_REGISTERS]) -> u64 {
    let m = SKETCH_REGISTERS as f64;
    let sum: f64 = s.iter().map(|&r| 2f64.powi(-i32::from(r))).sum();
    let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
    let zeros = s.iter().filter(|&&r| r == 0).count();
    let e = if raw <= 2.5 * m && zeros > 0 {
        // Small counts: linear counting.
        m * (m / zeros as f64).ln()
    } else {
        raw
    };
    e.round() as u64
}

mod hex_registers {
    use super::SKETCH_REGISTERS;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &[u8; SKETCH_REGISTERS], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Box<[u8; SKETCH_REGISTERS]>, D::Error> {
        let hex = String::deserialize(d)?;
        let mut out = Box::new([0u8; SKETCH_REGISTERS]);
        if hex.len() != SKETCH_REGISTERS * 2 || !hex.is_ascii() {
            return Err(serde::de::Error::custom("sketch: wrong length"));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o =
                u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

/// A stable 64-bit hash (FNV-1a, then a mixer so every bit counts): the same across restarts
/// and builds, as the saved summary needs.
pub(crate) fn hash(s: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The counts of one repository, tag or digest.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counters {
    /// Manifest GETs answered 2xx.
    pulls: u64,
    /// Blob GETs answered 2xx.
    blob_pulls: u64,
    /// HEADs answered 2xx.
    heads: u64,
    /// Bytes sent for those GETs (response heads included).
    bytes: u64,
    /// Unix µs of the first and last GET (0: none yet).
    first_us: u64,
    last_us: u64,
    clients: Distinct,
    identities: Distinct,
}

impl Counters {
    fn add(&mut self, p: &Pull) {
        match p.kind {
            Kind::ManifestGet => self.pulls += 1,
            Kind::BlobGet => self.blob_pulls += 1,
            Kind::Head => self.heads += 1,
        }
        if p.kind != Kind::Head {
            self.bytes += p.bytes;
            if self.first_us == 0 || p.time_unix_us < self.first_us {
                self.first_us = p.time_unix_us;
            }
            self.last_us = self.last_us.max(p.time_unix_us);
        }
        if let Some(c) = p.client {
            self.clients.insert(c);
        }
        if let Some(i) = p.identity {
            self.identities.insert(i);
        }
    }

    /// When it was last used (pulls, else when made), for eviction.
    fn recency(&self) -> u64 {
        self.last_us
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    ManifestGet,
    BlobGet,
    Head,
}

impl Kind {
    /// The kind of pull a line's action records, if it is one usage counts (when answered 2xx).
    pub(crate) fn of(action: &str) -> Option<Kind> {
        match action {
            "pull_manifest" => Some(Kind::ManifestGet),
            "pull_blob" => Some(Kind::BlobGet),
            "head_manifest" | "head_blob" => Some(Kind::Head),
            _ => None,
        }
    }
}

/// One line of the log as far as usage cares: read from a line, or handed over by the drain
/// as it writes the line. The client and identity come hashed ([`hash`] of their text).
pub(crate) struct Pull<'a> {
    pub time_unix_us: u64,
    pub kind: Kind,
    pub repository: &'a str,
    pub reference: &'a str,
    pub digest: Option<&'a str>,
    pub bytes: u64,
    pub client: Option<u64>,
    pub identity: Option<u64>,
}

/// The fields of a log line usage reads (borrowed where the JSON has no escapes).
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(default)]
    time_unix_us: u64,
    #[serde(borrow)]
    action: Cow<'a, str>,
    #[serde(borrow, default)]
    repository: Cow<'a, str>,
    #[serde(borrow, default)]
    reference: Cow<'a, str>,
    #[serde(borrow, default)]
    digest: Option<Cow<'a, str>>,
    #[serde(default)]
    status: u16,
    #[serde(default)]
    bytes: u64,
    #[serde(borrow, default)]
    client: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    identity: Option<Cow<'a, str>>,
}

impl Line<'_> {
    /// The pull this line records, if it is one that counts.
    fn pull(&self) -> Option<Pull<'_>> {
        let kind = Kind::of(&self.action)?;
        if !(200..300).contains(&self.status) || self.repository.is_empty() {
            return None;
        }
        Some(Pull {
            time_unix_us: self.time_unix_us,
            kind,
            repository: &self.repository,
            reference: &self.reference,
            digest: self.digest.as_deref().filter(|d| !d.is_empty()),
            bytes: self.bytes,
            client: self
                .client
                .as_deref()
                .filter(|c| !c.is_empty())
                .map(|c| hash(c.as_bytes())),
            identity: self
                .identity
                .as_deref()
                .filter(|i| !i.is_empty())
                .map(|i| hash(i.as_bytes())),
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Repo {
    total: Counters,
    tags: HashMap<String, Counters>,
    digests: HashMap<String, Counters>,
}

/// Pulls summed per repository, tag and digest, within `entries_max` entries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Usage {
    version: u32,
    /// How far into the log this summary has read.
    log_file_ms: u64,
    log_offset: u64,
    /// The first line's time (unix µs; 0: none yet).
    from_us: u64,
    /// Entries removed to make room.
    evicted: u64,
    entries: usize,
    #[serde(skip)]
    entries_max: usize,
    repos: HashMap<String, Repo>,
}

/// What a row sums: a repository, a tag or a digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Repository,
    Tag,
    Digest,
}

impl By {
    pub fn parse(s: &str) -> Option<By> {
        Some(match s {
            "repository" => By::Repository,
            "tag" => By::Tag,
            "digest" => By::Digest,
            _ => return None,
        })
    }
}

/// One row of a usage answer.
#[derive(Clone, Debug, Serialize)]
pub struct UsageRow {
    pub repository: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Manifest GETs answered 2xx (image pulls).
    pub pulls: u64,
    /// Blob GETs answered 2xx.
    pub blob_pulls: u64,
    /// HEADs answered 2xx (not pulls).
    pub heads: u64,
    /// Bytes sent for the GETs.
    pub bytes: u64,
    /// Distinct client addresses (nodes, for pulls by containerd).
    pub clients: u64,
    /// Distinct identities (records that name one).
    pub identities: u64,
    /// Whether `clients` or `identities` is an estimate (past `EXACT_MAX`).
    pub estimated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_pull: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pull: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_pull_unix_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pull_unix_us: Option<u64>,
}

impl UsageRow {
    fn new(repository: &str, tag: Option<&str>, digest: Option<&str>, c: &Counters) -> UsageRow {
        let (clients, e1) = c.clients.count();
        let (identities, e2) = c.identities.count();
        let time = |us: u64| (us > 0).then_some(us);
        UsageRow {
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
            pulls: c.pulls,
            blob_pulls: c.blob_pulls,
            heads: c.heads,
            bytes: c.bytes,
            clients,
            identities,
            estimated: e1 || e2,
            first_pull: time(c.first_us).map(rfc3339),
            last_pull: time(c.last_us).map(rfc3339),
            first_pull_unix_us: time(c.first_us),
            last_pull_unix_us: time(c.last_us),
        }
    }
}

/// A usage question.
#[derive(Clone, Debug)]
pub struct UsageQuery {
    pub by: By,
    /// Only this repository's rows.
    pub repository: Option<String>,
    /// A window `[since, until)`, unix µs; none: everything the summary covers.
    pub since_us: Option<u64>,
    pub until_us: Option<u64>,
    /// Rows after this key (a previous page's `next`).
    pub after: Option<String>,
    pub limit: usize,
}

/// A usage answer: rows in key order (repository, then tag or digest).
#[derive(Clone, Debug, Serialize)]
pub struct UsagePage {
    pub by: &'static str,
    /// `summary` (kept as the log grows) or `log` (a window read from the files).
    pub source: &'static str,
    /// False while the summary is still reading the log written before this start (a
    /// rebuild): the counts are then partial.
    pub complete: bool,
    /// The time of the first line counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub entries: usize,
    pub entries_max: usize,
    pub evicted: u64,
    pub rows: Vec<UsageRow>,
    /// The key to ask `after=` for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

impl Usage {
    pub fn new(entries_max: usize) -> Usage {
        Usage {
            version: VERSION,
            log_file_ms: 0,
            log_offset: 0,
            from_us: 0,
            evicted: 0,
            entries: 0,
            entries_max,
            repos: HashMap::default(),
        }
    }

    fn position(&self) -> Option<Cursor> {
        (self.log_file_ms > 0).then_some(Cursor {
            file_ms: self.log_file_ms,
            offset: self.log_offset,
        })
    }

    /// Adds one line of the log (ignored unless it is a pull that counts).
    fn add_line(&mut self, text: &str) {
        let Ok(line) = serde_json::from_str::<Line>(text) else {
            return;
        };
        if let Some(p) = line.pull() {
            self.add(&p);
        }
    }

    fn add(&mut self, p: &Pull) {
        if self.from_us == 0 || p.time_unix_us < self.from_us {
            self.from_us = p.time_unix_us;
        }
        // A manifest asked by tag (tags cannot hold ':'; a blob's reference is its digest).
        let tag =
            (p.kind != Kind::BlobGet && !p.reference.is_empty() && !p.reference.contains(':'))
                .then_some(p.reference);
        // Room for up to three new entries.
        if self.entries + 3 > self.entries_max {
            self.evict();
        }
        let repo = match self.repos.get_mut(p.repository) {
            Some(r) => r,
            None => {
                self.entries += 1;
                self.repos.entry(p.repository.to_owned()).or_default()
            }
        };
        repo.total.add(p);
        if let Some(t) = tag {
            match repo.tags.get_mut(t) {
                Some(c) => c.add(p),
                None => {
                    self.entries += 1;
                    repo.tags.entry(t.to_owned()).or_default().add(p);
                }
            }
        }
        if let Some(d) = p.digest {
            match repo.digests.get_mut(d) {
                Some(c) => c.add(p),
                None => {
                    self.entries += 1;
                    repo.digests.entry(d.to_owned()).or_default().add(p);
                }
            }
        }
    }

    /// Removes the least recently pulled tenth of the entries (tags and digests, and
    /// repositories left with neither).
    fn evict(&mut self) {
        let mut times: Vec<u64> = Vec::with_capacity(self.entries);
        for r in self.repos.values() {
            times.extend(r.tags.values().map(Counters::recency));
            times.extend(r.digests.values().map(Counters::recency));
            if r.tags.is_empty() && r.digests.is_empty() {
                times.push(r.total.recency());
            }
        }
        if times.is_empty() {
            return;
        }
        let k = (self.entries_max / 10).clamp(1, times.len());
        let (_, &mut cutoff, _) = times.select_nth_unstable(k - 1);
        let mut removed = 0usize;
        let mut budget = k;
        for r in self.repos.values_mut() {
            for map in [&mut r.tags, &mut r.digests] {
                map.retain(|_, c| {
                    if budget > 0 && c.recency() <= cutoff {
                        budget -= 1;
                        removed += 1;
                        false
                    } else {
                        true
                    }
                });
            }
        }
        self.repos.retain(|_, r| {
            let empty = r.tags.is_empty() && r.digests.is_empty();
            if empty && budget > 0 && r.total.recency() <= cutoff {
                budget -= 1;
                removed += 1;
                false
            } else {
                true
            }
        });
        self.entries -= removed;
        self.evicted += removed as u64;
    }

    /// The rows `q` asks for (its window is not looked at here).
    pub fn page(&self, q: &UsageQuery, source: &'static str) -> UsagePage {
        let mut keys: Vec<(&str, Option<&str>, &Counters)> = Vec::new();
        for (name, r) in &self.repos {
            if q.repository.as_deref().is_some_and(|want| want != name) {
                continue;
            }
            match q.by {
                By::Repository => keys.push((name, None, &r.total)),
                By::Tag => keys.extend(
                    r.tags
                        .iter()
                        .map(|(t, c)| (name.as_str(), Some(t.as_str()), c)),
                ),
                By::Digest => keys.extend(
                    r.digests
                        .iter()
                        .map(|(d, c)| (name.as_str(), Some(d.as_str()), c)),
                ),
            }
        }
        keys.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let start = match &q.after {
            None => 0,
            Some(after) => {
                let (repo, key) = split_key(after);
                keys.partition_point(|k| (k.0, k.1) <= (repo, key))
            }
        };
        let end = keys.len().min(start + q.limit);
        let rows: Vec<UsageRow> = keys[start..end]
            .iter()
            .map(|(repo, key, c)| match q.by {
                By::Repository => UsageRow::new(repo, None, None, c),
                By::Tag => UsageRow::new(repo, *key, None, c),
                By::Digest => UsageRow::new(repo, None, *key, c),
            })
            .collect();
        let next = (end < keys.len() && end > start).then(|| {
            let (repo, key, _) = keys[end - 1];
            match key {
                None => repo.to_owned(),
                Some(k) => format!("{repo}@{k}"),
            }
        });
        UsagePage {
            by: match q.by {
                By::Repository => "repository",
                By::Tag => "tag",
                By::Digest => "digest",
            },
            source,
            complete: true,
            from: (self.from_us > 0).then(|| rfc3339(self.from_us)),
            entries: self.entries,
            entries_max: self.entries_max,
            evicted: self.evicted,
            rows,
            next,
        }
    }
}

/// `repo@key` → (repo, Some(key)); `repo` → (repo, None). Names and tags cannot hold `@`.
fn split_key(k: &str) -> (&str, Option<&str>) {
    match k.split_once('@') {
        Some((r, t)) => (r, Some(t)),
        None => (k, None),
    }
}

/// Reads whole lines of the log from `from` on (everything if none), files oldest first,
/// skipping files that start at or after `until_us`; calls `each` with the lines, at most
/// `batch` at a time, and the position after them. A torn last line is left for later.
fn read_log(
    dir: &std::path::Path,
    from: Option<&Cursor>,
    until_us: Option<u64>,
    skip_before_us: Option<u64>,
    batch: usize,
    mut each: impl FnMut(&[String], &Cursor),
) -> io::Result<()> {
    let mut files = log_files(dir);
    files.sort_by_key(|f| f.start_ms);
    let mut lines: Vec<String> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        if from.is_some_and(|c| f.start_ms < c.file_ms) {
            continue;
        }
        if until_us.is_some_and(|u| f.start_ms * 1000 >= u) {
            break;
        }
        // Everything in a file is older than the next file's start.
        let next_start = files.get(i + 1).map(|n| n.start_ms);
        if skip_before_us.is_some_and(|s| next_start.is_some_and(|n| n * 1000 < s)) {
            continue;
        }
        let mut offset = match from {
            Some(c) if c.file_ms == f.start_ms => c.offset,
            _ => 0,
        };
        let file = match File::open(&f.path) {
            Ok(file) => file,
            // Expired meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut r = io::BufReader::with_capacity(1 << 16, file);
        r.seek(io::SeekFrom::Start(offset))?;
        let mut n_lines = 0;
        loop {
            if lines.len() <= n_lines {
                lines.push(String::new());
            }
            let buf = &mut lines[n_lines];
            buf.clear();
            let n = r.read_line(buf)?;
            if n == 0 || !buf.ends_with('\n') {
                break;
            }
            offset += n as u64;
            n_lines += 1;
            if n_lines == batch {
                each(
                    &lines[..n_lines],
                    &Cursor {
                        file_ms: f.start_ms,
                        offset,
                    },
                );
                n_lines = 0;
            }
        }
        each(
            &lines[..n_lines],
            &Cursor {
                file_ms: f.start_ms,
                offset,
            },
        );
    }
    Ok(())
}

/// The summary kept as the log grows, and the window questions read from the log.
pub struct Summary {
    dir: PathBuf,
    layout: lighter_layout::Layout,
    entries_max: usize,
    save_every: Duration,
    usage: Mutex<Usage>,
    /// Held through a [`Summary::follow`], so two never read the same lines.
    following: Mutex<()>,
    /// Whether the summary has caught up with the log since start (before that, questions
    /// without a window would see part of it).
    ready: std::sync::atomic::AtomicBool,
    /// The drain hands over every pull it writes ([`Summary::add_drained`]); the files are no
    /// longer followed.
    live: std::sync::atomic::AtomicBool,
    /// Lines were added since the last save.
    changed: std::sync::atomic::AtomicBool,
}

impl Summary {
    /// The saved summary, if it is one this can continue from; else an empty one (rebuilt by
    /// [`Summary::follow`] from the whole log).
    pub fn load(layout: &lighter_layout::Layout, config: &crate::config::Config) -> Summary {
        let entries_max = config.usage_entries_max;
        let dir = layout.event_log_dir();
        let saved = std::fs::read(layout.usage_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Usage>(&b).ok())
            .filter(|u| u.version == VERSION)
            .filter(|u| {
                // The log must still hold the position (a log rewritten under it: rebuild).
                let at = u.position();
                at.is_none_or(|c| {
                    let f = dir.join(format!("{}.jsonl", c.file_ms));
                    std::fs::metadata(f).map_or(true, |m| m.len() >= c.offset)
                })
            });
        let usage = match saved {
            Some(mut u) => {
                u.entries_max = entries_max;
                if u.entries > entries_max {
                    while u.entries + 3 > entries_max && u.entries > 0 {
                        u.evict();
                    }
                }
                u
            }
            None => Usage::new(entries_max),
        };
        Summary {
            dir,
            layout: layout.clone(),
            entries_max,
            save_every: Duration::from_millis(config.usage_save_interval_ms),
            usage: Mutex::new(usage),
            following: Mutex::new(()),
            ready: std::sync::atomic::AtomicBool::new(false),
            live: std::sync::atomic::AtomicBool::new(false),
            changed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the lines written since the last call; the number of lines read. Nothing once the
    /// drain hands its pulls over.
    pub fn follow(&self) -> io::Result<u64> {
        use std::sync::atomic::Ordering;
        let _one = self.following.lock().unwrap_or_else(|e| e.into_inner());
        if self.live.load(Ordering::Acquire) {
            return Ok(0);
        }
        let from = self.usage().position();
        let mut read = 0u64;
        read_log(
            &self.dir,
            from.as_ref(),
            None,
            None,
            LINES_PER_LOCK,
            |lines, at| {
                let mut u = self.usage();
                for l in lines {
                    u.add_line(l);
                }
                u.log_file_ms = at.file_ms;
                u.log_offset = at.offset;
                read += lines.len() as u64;
            },
        )?;
        self.ready.store(true, Ordering::Release);
        if read > 0 {
            self.changed.store(true, Ordering::Release);
        }
        Ok(read)
    }

    /// From now on the drain hands over what it writes: called once the summary has read the
    /// log to its end, with the drain held (`EventLog::hand_usage_over`), so no line is missed
    /// or counted twice.
    pub(crate) fn go_live(&self) {
        let _one = self.following.lock().unwrap_or_else(|e| e.into_inner());
        self.live.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Adds the pulls of lines the drain just wrote, which end the log at `end`.
    pub(crate) fn add_drained<'a>(&self, pulls: impl Iterator<Item = Pull<'a>>, end: &Cursor) {
        let mut u = self.usage();
        for p in pulls {
            u.add(&p);
        }
        u.log_file_ms = end.file_ms;
        u.log_offset = end.offset;
        self.changed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Publishes the summary and its position (`events/usage.json`).
    pub fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec(&*self.usage()).expect("JSON of the summary");
        self.layout.put_usage(&bytes)
    }

    /// Whether the summary has read the log up to its end at least once since start.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The answer to `q`: from the summary, or (with a window) from the log's files.
    pub fn query(&self, q: &UsageQuery) -> io::Result<UsagePage> {
        if q.since_us.is_none() && q.until_us.is_none() {
            let mut page = self.usage().page(q, "summary");
            page.complete = self.ready();
            return Ok(page);
        }
        let mut u = Usage::new(self.entries_max);
        let (since, until) = (q.since_us.unwrap_or(0), q.until_us.unwrap_or(u64::MAX));
        read_log(
            &self.dir,
            None,
            q.until_us,
            q.since_us,
            LINES_PER_LOCK,
            |lines, _| {
                for l in lines {
                    let Ok(line) = serde_json::from_str::<Line>(l) else {
                        continue;
                    };
                    if !(since..until).contains(&line.time_unix_us) {
                        continue;
                    }
                    if q.repository
                        .as_deref()
                        .is_some_and(|r| r != line.repository)
                    {
                        continue;
                    }
                    if let Some(p) = line.pull() {
                        u.add(&p);
                    }
                }
            },
        )?;
        Ok(u.page(q, "log"))
    }
}

/// Catches up with the log on a thread of its own (at the lowest priority, like the drain,
/// though less low), then has the drain hand over every pull it writes, and saves every
/// `usage_save_interval_ms` while anything was added, until the process ends.
pub fn start_following(summary: Arc<Summary>, log: Arc<crate::events::EventLog>) {
    let spawned = std::thread::Builder::new()
        .name("lighter-usage".into())
        .spawn(move || {
            use std::sync::atomic::Ordering;
            // A little CPU, never much: nice 19 (not the drain's SCHED_IDLE, which a busy
            // node could starve for minutes while the summary is rebuilt).
            // SAFETY: setpriority on this thread's own id.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
            }
            let started = Instant::now();
            // Most of the log is read without holding the drain; the last lines, written
            // meanwhile, with it held.
            let caught_up = summary
                .follow()
                .and_then(|n| Ok(n + log.hand_usage_over(&summary)?));
            match caught_up {
                Ok(n) => tracing::info!(
                    lines = n,
                    ms = started.elapsed().as_millis() as u64,
                    "usage summary caught up with the event log"
                ),
                Err(e) => tracing::warn!("usage summary: {e}"),
            }
            // From now on it only saves, on CPU time nothing else wants (SCHED_IDLE; at
            // nice 19 it took the load generator's core from under it between requests in
            // the one-core load test).
            // SAFETY: sched_setscheduler on this thread, with a valid param.
            unsafe {
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
            }
            let mut saved = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(FOLLOW_EVERY_MS));
                // Not live (the hand-over failed, e.g. an unreadable file): read the files.
                if let Err(e) = summary.follow() {
                    tracing::warn!("usage summary: {e}");
                }
                if saved.elapsed() >= summary.save_every
                    && summary.changed.swap(false, Ordering::AcqRel)
                {
                    if let Err(e) = summary.save() {
                        summary.changed.store(true, Ordering::Release);
                        tracing::warn!("cannot save the usage summary: {e}");
                    }
                    saved = Instant::now();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the usage summary: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(
        action: &str,
        repo: &str,
        reference: &str,
        digest: &str,
        client: &str,
        t: u64,
    ) -> String {
        format!(
            r#"{{"time_unix_us":{t},"action":"{action}","repository":"{repo}","reference":"{reference}","digest":"{digest}","status":200,"bytes":100,"client":"{client}"}}"#
        )
    }

    #[test]
    fn tags_digests_and_repositories_count_what_they_should() {
        let mut u = Usage::new(1000);
        let d = "sha256:aa";
        let b = "sha256:bb";
        u.add_line(&pull("pull_manifest", "app", "v1", d, "10.0.0.1", 5));
        u.add_line(&pull("pull_manifest", "app", d, d, "10.0.0.2", 6));
        u.add_line(&pull("pull_blob", "app", b, b, "10.0.0.2", 7));
        u.add_line(&pull("head_manifest", "app", "v1", d, "10.0.0.3", 8));
        // A 404 makes nothing.
        u.add_line(r#"{"time_unix_us":9,"action":"pull_blob","repository":"nope","reference":"x","status":404,"bytes":10}"#);
        u.add_line("not json");
        let q = |by| UsageQuery {
            by,
            repository: None,
            since_us: None,
            until_us: None,
            after: None,
            limit: 100,
        };
        let r = u.page(&q(By::Repository), "summary").rows;
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].pulls, r[0].blob_pulls, r[0].heads, r[0].bytes),
            (2, 1, 1, 300)
        );
        assert_eq!(r[0].clients, 3);
        assert_eq!(r[0].first_pull_unix_us, Some(5));
        assert_eq!(r[0].last_pull_unix_us, Some(7));
        let t = u.page(&q(By::Tag), "summary").rows;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].tag.as_deref(), Some("v1"));
        assert_eq!((t[0].pulls, t[0].heads, t[0].clients), (1, 1, 2));
        let ds = u.page(&q(By::Digest), "summary").rows;
        assert_eq!(ds.len(), 2);
        assert_eq!(ds[0].digest.as_deref(), Some(d));
        assert_eq!((ds[0].pulls, ds[0].heads), (2, 1));
        assert_eq!((ds[1].blob_pulls, ds[1].bytes), (1, 100));
        assert_eq!(u.entries, 4);
    }

    #[test]
    fn pages_follow_keys_and_end() {
        let mut u = Usage::new(1000);
        for i in 0..25 {
            u.add_line(&pull(
                "pull_blob",
                &format!("r{i:02}"),
                "sha256:1",
                "sha256:1",
                "c",
                1,
            ));
        }
        let mut q = UsageQuery {
            by: By::Repository,
            repository: None,
            since_us: None,
            until_us: None,
            after: None,
            limit: 10,
        };
        let mut seen = Vec::new();
        for _ in 0..10 {
            let p = u.page(&q, "summary");
            seen.extend(p.rows.into_iter().map(|r| r.repository));
            match p.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = (0..25).map(|i| format!("r{i:02}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn entries_stay_under_their_cap_and_the_oldest_go() {
        let mut u = Usage::new(100);
        for i in 0..1000u64 {
            let d = format!("sha256:{i}");
            u.add_line(&pull("pull_blob", "r", &d, &d, "c", i + 1));
            assert!(u.entries <= 100, "{}", u.entries);
        }
        assert!(u.evicted >= 900 - 3);
        // The most recent survive.
        assert!(u.repos["r"].digests.contains_key("sha256:999"));
        assert!(!u.repos["r"].digests.contains_key("sha256:0"));
        // The repository's total still counts everything.
        assert_eq!(u.repos["r"].total.blob_pulls, 1000);
    }

    #[test]
    fn distinct_counts_are_exact_then_estimated_within_a_few_percent() {
        let mut d = Distinct::default();
        for i in 0..EXACT_MAX {
            d.insert(hash(format!("10.0.{i}.1").as_bytes()));
            d.insert(hash(format!("10.0.{i}.1").as_bytes()));
        }
        assert_eq!(d.count(), (EXACT_MAX as u64, false));
        for n in [1_000u64, 20_000] {
            let mut d = Distinct::default();
            for i in 0..n {
                d.insert(hash(format!("client-{i}").as_bytes()));
            }
            let (e, estimated) = d.count();
            assert!(estimated);
            let err = (e as f64 - n as f64).abs() / n as f64;
            assert!(err < 0.2, "{n}: {e}");
        }
    }

    #[test]
    fn the_summary_round_trips_through_json() {
        let mut u = Usage::new(1000);
        for i in 0..100 {
            u.add_line(&pull(
                "pull_manifest",
                "app",
                "v1",
                "sha256:a",
                &format!("c{i}"),
                3,
            ));
        }
        u.log_file_ms = 7;
        u.log_offset = 99;
        let back: Usage = serde_json::from_slice(&serde_json::to_vec(&u).unwrap()).unwrap();
        assert_eq!(back.position(), u.position());
        assert_eq!(back.entries, 3);
        let c = &back.repos["app"].tags["v1"];
        assert_eq!(c.pulls, 100);
        assert_eq!(c.clients.count(), u.repos["app"].tags["v1"].clients.count());
    }
}
