//! What the pages show, read from the store and the event log (blocking: called through
//! `app::block`). Sizes count each blob once; pulls are counted from the event log newest
//! first, reading at most `ui_events_scan_max` lines per page.

use std::collections::{HashMap, HashSet};

use lighter_layout::media::ManifestKind;
use lighter_layout::{Digest, Layout, ManifestEntry, RepoName, Tag};
use serde_json::Value;

use crate::events::{EventLog, Query, Scanned};

/// How deep an index's children are followed when sizing a tag (an index of indexes at most).
const INDEX_DEPTH_MAX: usize = 2;
/// Most distinct references whose pulls one repository page counts (tags and digests).
const REFERENCES_MAX: usize = 10_000;

/// One tag of a repository.
pub struct TagRow {
    pub tag: String,
    pub digest: Digest,
    pub kind: &'static str,
    /// The manifest and everything it references (an index's children and theirs), each
    /// once.
    pub size_bytes: u64,
    /// When the tag was last written (pushed, or for a mirror refreshed from upstream).
    pub pushed_unix_us: Option<u64>,
    pub pulls: Pulls,
}

/// Pulls counted from the event log: manifest GETs answered 2xx (a HEAD is not a pull, a blob
/// GET is part of one).
#[derive(Clone, Copy, Default)]
pub struct Pulls {
    /// Within the last 24 hours.
    pub day: u64,
    /// Within the last 30 days.
    pub month: u64,
    pub last_unix_us: Option<u64>,
}

impl Pulls {
    fn add(&mut self, t: u64, now_us: u64) {
        if t + DAY_US >= now_us {
            self.day += 1;
        }
        if t + 30 * DAY_US >= now_us {
            self.month += 1;
        }
        self.last_unix_us = self.last_unix_us.max(Some(t));
    }

    fn merge(&mut self, o: &Pulls) {
        self.day += o.day;
        self.month += o.month;
        self.last_unix_us = self.last_unix_us.max(o.last_unix_us);
    }
}

pub const HOUR_US: u64 = 3_600_000_000;
pub const DAY_US: u64 = 24 * HOUR_US;

/// Whether an event line is a pull (see [`Pulls`]): its time and reference.
fn pull(v: &Value) -> Option<(u64, &str)> {
    if v["action"] != "pull_manifest" {
        return None;
    }
    let status = v["status"].as_u64()?;
    if !(200..300).contains(&status) {
        return None;
    }
    Some((v["time_unix_us"].as_u64()?, v["reference"].as_str()?))
}

/// Pulls of each of `names` (the repositories on a page of the overview): one scan of the log,
/// newest first, until it is past 30 days and every one of them has a last pull, or
/// `scan_max` lines.
pub fn repo_pulls(
    log: &EventLog,
    names: &[String],
    now_us: u64,
    scan_max: u64,
) -> std::io::Result<(HashMap<String, Pulls>, Scanned)> {
    let mut out: HashMap<String, Pulls> = names
        .iter()
        .map(|n| (n.clone(), Pulls::default()))
        .collect();
    let mut unseen: HashSet<&str> = names.iter().map(String::as_str).collect();
    let scan = log.scan_newest(&Query::default(), None, scan_max, |v, _| {
        if let Some((t, _)) = pull(&v) {
            if let Some(repo) = v["repository"].as_str() {
                if let Some(p) = out.get_mut(repo) {
                    p.add(t, now_us);
                    unseen.remove(repo);
                }
            }
        }
        let past = v["time_unix_us"]
            .as_u64()
            .is_some_and(|t| t + 30 * DAY_US < now_us);
        !(past && unseen.is_empty())
    })?;
    Ok((out, scan))
}

/// A repository's pulls over time: per hour for the last 24 hours and per day for the last 30
/// days (oldest first), and per reference (a tag, or a digest asked by digest).
pub struct History {
    pub hourly: [u64; 24],
    pub daily: [u64; 30],
    pub by_reference: HashMap<String, Pulls>,
    pub total: Pulls,
    pub scan: Scanned,
}

/// One scan of the log for `repo`, newest first, until it is past 30 days and every reference
/// in `wanted` (its tags and their digests) has a last pull, or `scan_max` lines.
pub fn history(
    log: &EventLog,
    repo: &str,
    wanted: &[String],
    now_us: u64,
    scan_max: u64,
) -> std::io::Result<History> {
    let mut h = History {
        hourly: [0; 24],
        daily: [0; 30],
        by_reference: HashMap::new(),
        total: Pulls::default(),
        scan: Scanned::default(),
    };
    let mut unseen: HashSet<&str> = wanted.iter().map(String::as_str).collect();
    let q = Query {
        repository: Some(repo.to_owned()),
        ..Query::default()
    };
    let scan = log.scan_newest(&q, None, scan_max, |v, _| {
        let time = v["time_unix_us"].as_u64().unwrap_or(0);
        if let Some((t, reference)) = pull(&v) {
            h.total.add(t, now_us);
            let age = now_us.saturating_sub(t);
            if let Some(slot) = h.hourly.len().checked_sub(1 + (age / HOUR_US) as usize) {
                h.hourly[slot] += 1;
            }
            if let Some(slot) = h.daily.len().checked_sub(1 + (age / DAY_US) as usize) {
                h.daily[slot] += 1;
            }
            unseen.remove(reference);
            if h.by_reference.len() < REFERENCES_MAX || h.by_reference.contains_key(reference) {
                h.by_reference
                    .entry(reference.to_owned())
                    .or_default()
                    .add(t, now_us);
            }
        }
        !(time + 30 * DAY_US < now_us && unseen.is_empty())
    })?;
    h.scan = scan;
    Ok(h)
}

/// The repositories of a page of the overview: names after `last`, at most `n`, and whether
/// more follow.
pub fn repositories(
    layout: &Layout,
    last: Option<&str>,
    n: usize,
) -> std::io::Result<(Vec<String>, bool)> {
    let mut all = layout.repositories()?;
    all.retain(|r| last.is_none_or(|l| r.as_str() > l));
    let more = all.len() > n;
    all.truncate(n);
    Ok((all, more))
}

/// A repository's tag count and stored size (each blob and manifest once).
pub fn repo_summary(layout: &Layout, name: &str) -> std::io::Result<(usize, u64)> {
    let Ok(repo) = RepoName::parse(name) else {
        return Ok((0, 0));
    };
    let tags = layout.tags(&repo)?.map_or(0, |t| t.len());
    let mut size = 0;
    for d in layout.repo_digests(&repo)? {
        size += layout.content_size(&d)?.unwrap_or(0);
    }
    Ok((tags, size))
}

/// The tags of a page of a repository (after `last`, at most `n`) with their digests and
/// sizes, and whether more follow. None if the repository is unknown.
pub fn tags(
    layout: &Layout,
    repo: &RepoName,
    last: Option<&str>,
    n: usize,
) -> std::io::Result<Option<(Vec<TagRow>, bool)>> {
    let Some(mut all) = layout.tags(repo)? else {
        return Ok(None);
    };
    all.retain(|t| last.is_none_or(|l| t.as_str() > l));
    let more = all.len() > n;
    all.truncate(n);
    let mut rows = Vec::with_capacity(all.len());
    for t in all {
        let Ok(tag) = Tag::parse(&t) else { continue };
        let Some((entry, written)) = layout.tag_with_time(repo, &tag)? else {
            continue;
        };
        let kind = match lighter_layout::media::manifest_kind(entry.media_type.as_str()) {
            Some(ManifestKind::Index) => "index",
            Some(_) => "image",
            None => "other",
        };
        let mut seen = HashSet::new();
        let size_bytes = reachable_size(layout, repo, &entry, 0, &mut seen)?;
        let pushed_unix_us = written
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_micros() as u64);
        rows.push(TagRow {
            tag: t,
            digest: entry.digest,
            kind,
            size_bytes,
            pushed_unix_us,
            pulls: Pulls::default(),
        });
    }
    Ok(Some((rows, more)))
}

/// The size of a manifest and of what it references, each digest once (`seen`).
fn reachable_size(
    layout: &Layout,
    repo: &RepoName,
    manifest: &ManifestEntry,
    depth: usize,
    seen: &mut HashSet<Digest>,
) -> std::io::Result<u64> {
    if !seen.insert(manifest.digest.clone()) {
        return Ok(0);
    }
    let Some(bytes) = layout.read_content(&manifest.digest)? else {
        return Ok(0);
    };
    let mut total = bytes.len() as u64;
    let media_type = manifest.media_type.as_str();
    let Ok(inspected) = lighter_layout::manifest::inspect(&bytes, Some(media_type)) else {
        return Ok(total);
    };
    for r in &inspected.references {
        match inspected.kind {
            ManifestKind::Index if depth < INDEX_DEPTH_MAX => {
                if let Some(child) = layout.manifest(repo, r)? {
                    total += reachable_size(layout, repo, &child, depth + 1, seen)?;
                }
            }
            ManifestKind::Index => {}
            _ => {
                if seen.insert(r.clone()) {
                    total += layout.content_size(r)?.unwrap_or(0);
                }
            }
        }
    }
    Ok(total)
}

/// A tag's pulls: those asking for it by name and those asking for its digest.
pub fn tag_pulls(h: &History, tag: &str, digest: &Digest) -> Pulls {
    let mut p = Pulls::default();
    for key in [tag.to_owned(), digest.to_string()] {
        if let Some(q) = h.by_reference.get(&key) {
            p.merge(q);
        }
    }
    p
}

/// All-time figures of the usage summary (`crate::usage`), kept as the log grows.
#[derive(Clone, Copy, Default)]
pub struct Totals {
    pub pulls: u64,
    pub clients: u64,
    /// `clients` is an estimate (many distinct clients).
    pub estimated: bool,
    pub last_unix_us: Option<u64>,
}

/// The summary's rows `by` repository (keyed by name) or by tag of `repository` (keyed by
/// tag); and whether the summary has read the whole log since start.
pub fn usage_totals(
    summary: &crate::usage::Summary,
    by: crate::usage::By,
    repository: Option<&str>,
) -> std::io::Result<(HashMap<String, Totals>, bool)> {
    let page = summary.query(&crate::usage::UsageQuery {
        by,
        repository: repository.map(str::to_owned),
        since_us: None,
        until_us: None,
        after: None,
        limit: usize::MAX,
    })?;
    let rows = page
        .rows
        .into_iter()
        .map(|r| {
            let key = match by {
                crate::usage::By::Repository => r.repository,
                _ => r.tag.unwrap_or_default(),
            };
            let t = Totals {
                pulls: r.pulls,
                clients: r.clients,
                estimated: r.estimated,
                last_unix_us: r.last_pull_unix_us,
            };
            (key, t)
        })
        .collect();
    Ok((rows, page.complete))
}
