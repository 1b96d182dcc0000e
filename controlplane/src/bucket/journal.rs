//! The journal of deletes: how a delete made through one replica reaches the others' caches.
//!
//! A delete removes the repository's keys in the bucket, then writes one empty object under
//! `deleted/` whose key says what was deleted and when (`lighter_layout::bucket::journal_key`),
//! then removes the local copy and answers. Every replica lists the journal every
//! `deletes_poll_ms` from a little before its previous listing (a LIST with start-after) and drops from its cache what each new entry names: the tag, the manifest
//! link (with the tags naming it and its referrer record), or the blob link. Its data plane
//! then misses and hands the request over, and the control plane asks the bucket, which
//! answers 404.
//!
//! Applying an entry only drops cached state; the bucket stays the truth. So applying one
//! twice, or one for something pushed again after the delete, costs a miss and nothing else:
//! the next pull fills the cache from the bucket again. That is what makes the journal simple:
//! no ordering between replicas is needed, only that every entry is read once.
//!
//! Each entry is applied twice: when first read, and once more when it leaves the window
//! below, so a miss that read the bucket just before the delete and published into the cache
//! just after the first application is dropped too.
//!
//! Entries are stamped with the writer's clock and appear when their PUT completes, which may
//! be later than their stamp (a slow or retried PUT) or earlier than a reader's clock says
//! (clocks differ). Each listing therefore starts `late_ms` before the previous listing's
//! start by this replica's own clock (never by a stamp read, which a writer's clock ahead
//! would push forward), and the keys already applied within that window are remembered and
//! skipped. A listing that fails is tried again after `deletes_poll_ms` from the same place.
//!
//! Pruning: every replica removes entries older than `deletes_retention_ms`, at most once per
//! tenth of it, by listing from the start of the journal and stopping at the first young one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lighter_layout::bucket::{self as keys, Deletion};
use object_store::path::Path;

use super::Bucket;
use crate::api::Result;
use crate::app::App;
use crate::clock::now_ms;

/// What a replica allows for the difference between its clock and another replica's.
const CLOCK_SKEW_MS: u64 = 10_000;

/// A nonce that keeps two entries of one millisecond apart (two replicas, or one replica's
/// two deletes).
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.finish()
}

impl Bucket {
    /// Records a delete in the journal, once the bucket's own keys for it are removed.
    pub async fn journal_delete(&self, d: &Deletion) -> Result<()> {
        self.put(keys::journal_key(now_ms(), nonce(), d), Bytes::new())
            .await
    }

    /// How far back a listing of the journal starts before the previous one began: an entry's
    /// PUT may complete this long after its stamp (every try of a request), plus the clocks'
    /// difference.
    fn journal_late_ms(&self) -> u64 {
        let tries = self.config.retries_max as u64 + 1;
        self.config.request_timeout_ms.saturating_mul(tries) + CLOCK_SKEW_MS
    }

    /// The journal's entries after `cursor`, in key order: (key, stamp, delete); keys that are
    /// not journal entries are skipped.
    async fn journal_after(&self, cursor: &str) -> Result<Vec<(String, u64, Deletion)>> {
        let prefix = Path::from(keys::JOURNAL_PREFIX.trim_end_matches('/'));
        let mut listed = self
            .store
            .list_with_offset(Some(&prefix), &Path::from(cursor));
        let mut out = Vec::new();
        while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
            let meta = meta.map_err(|e| self.unavailable("list the journal of deletes", e))?;
            let key = meta.location.as_ref().to_owned();
            if let Some((stamp, d)) = keys::parse_journal_key(&key) {
                out.push((key, stamp, d));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes the journal's entries stamped before `cutoff_ms`; how many.
    async fn prune_journal(&self, cutoff_ms: u64) -> Result<u64> {
        let prefix = Path::from(keys::JOURNAL_PREFIX.trim_end_matches('/'));
        let mut listed = self.store.list(Some(&prefix));
        let mut old = Vec::new();
        while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
            let meta = meta.map_err(|e| self.unavailable("list the journal of deletes", e))?;
            let key = meta.location.as_ref().to_owned();
            match keys::parse_journal_key(&key) {
                Some((stamp, _)) if stamp >= cutoff_ms => break,
                // Not an entry (written by something else): the journal's, so removed too.
                _ => old.push(key),
            }
        }
        drop(listed);
        let n = old.len() as u64;
        for key in old {
            self.delete(key).await?;
        }
        Ok(n)
    }
}

/// Drops one deleted thing from this replica's cache; whether it held it.
pub fn apply(app: &App, d: &Deletion) -> std::io::Result<bool> {
    let name = d.repository();
    let _tags = app.tag_writes(name);
    match d {
        Deletion::Tag(_, tag) => app.layout.delete_tag(name, tag),
        Deletion::Blob(_, digest) => app.layout.delete_blob(name, digest),
        Deletion::Manifest(_, digest) => {
            let subject = crate::api::manifests::subject_of(app, digest);
            let found = app.layout.delete_manifest(name, digest)?;
            if let (true, Some(subject)) = (found, subject) {
                app.layout.delete_referrer(name, &subject, digest)?;
            }
            Ok(found)
        }
    }
}

/// Longest the first reading may hold up the control plane's start (the supervisor waits 30 s
/// for the control socket).
const CATCH_UP_TIMEOUT_MS: u64 = 10_000;

/// Where a replica's reading of the journal stands: read up to `since` (its own clock, unix
/// ms), and the entries of the window before it that were applied.
pub struct Read {
    since: u64,
    applied: HashSet<String>,
    listed_before: bool,
}

/// The first reading, when the control plane starts: every retained entry (what was deleted
/// while this replica was stopped, or through it just before a crash, may be in its cache).
/// Bounded by the bucket's request timeouts; if the bucket cannot be read, [`follow`] tries
/// again at its first poll.
pub async fn catch_up(app: &Arc<App>) -> Read {
    let mut read = Read {
        since: now_ms().saturating_sub(
            app.bucket
                .as_ref()
                .map_or(0, |b| b.config.deletes_retention_ms),
        ),
        applied: HashSet::new(),
        listed_before: false,
    };
    if let Some(bucket) = app.bucket.as_ref() {
        // Bounded: a replica must start (and serve its cache) while the bucket is down.
        let limit = Duration::from_millis(CATCH_UP_TIMEOUT_MS);
        let done = tokio::time::timeout(limit, read_once(app, bucket, &mut read)).await;
        if done.is_err() {
            tracing::warn!(
                "the journal of deletes was not read within {CATCH_UP_TIMEOUT_MS} ms of the start: serving, and reading it in the background"
            );
        }
        if done == Ok(true) {
            tracing::info!("journal of deletes read");
            // What it read from before the window was applied just now: only the entries that
            // leave the window from here on are applied a second time.
            let floor = read.since.saturating_sub(bucket.journal_late_ms());
            read.applied
                .retain(|k| matches!(keys::parse_journal_key(k), Some((s, _)) if s >= floor));
            read.listed_before = true;
        }
    }
    read
}

/// One listing of the journal from `read.since - late`, each entry not yet applied applied;
/// false if the bucket could not be read.
async fn read_once(app: &Arc<App>, bucket: &crate::bucket::Bucket, read: &mut Read) -> bool {
    let late = bucket.journal_late_ms();
    let started = now_ms();
    let floor = read.since.saturating_sub(late);
    let c = &app.counters;
    let entries = match bucket.journal_after(&keys::journal_cursor(floor)).await {
        Ok(e) => e,
        Err(e) => {
            crate::metrics::Counters::add(&c.journal_read_failures, 1);
            tracing::warn!("cannot read the journal of deletes: {}", e.message);
            return false;
        }
    };
    for (key, _, d) in entries {
        if read.applied.contains(&key) {
            continue;
        }
        let app2 = app.clone();
        let d2 = d.clone();
        match tokio::task::spawn_blocking(move || apply(&app2, &d2)).await {
            Ok(Ok(found)) => {
                if found {
                    tracing::info!(
                        ?d,
                        "deleted through another replica: dropped from the cache"
                    );
                }
                read.applied.insert(key);
                crate::metrics::Counters::add(&c.journal_entries_applied, 1);
            }
            Ok(Err(e)) => tracing::warn!(?d, "cannot apply a delete from the journal: {e}"),
            Err(e) => tracing::warn!(?d, "cannot apply a delete from the journal: {e}"),
        }
    }
    read.since = read.since.max(started);
    crate::metrics::Counters::add(&c.journal_reads, 1);
    c.journal_last_read_unix_ms
        .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    true
}

/// The replica's reader of the journal, after [`catch_up`]: runs for the life of the control
/// plane.
pub async fn follow(app: Arc<App>, mut read: Read) {
    let Some(bucket) = app.bucket.as_ref() else {
        return;
    };
    let poll = Duration::from_millis(bucket.config.deletes_poll_ms);
    let retention = bucket.config.deletes_retention_ms;
    let late = bucket.journal_late_ms();
    let mut pruned = Instant::now();
    loop {
        tokio::time::sleep(poll).await;
        if !read_once(&app, bucket, &mut read).await {
            continue;
        }
        let (since, applied) = (read.since, &mut read.applied);
        let floor = since.saturating_sub(late);
        let mut leaving = Vec::new();
        applied.retain(|k| match keys::parse_journal_key(k) {
            Some((s, _)) if s >= floor => true,
            Some((_, d)) => {
                leaving.push(d);
                false
            }
            None => false,
        });
        // (Not after the first listing: what it read from before the window was applied now.)
        let again = std::mem::replace(&mut read.listed_before, true);
        if again && !leaving.is_empty() {
            // Once more as they leave the window: a miss that read the bucket before the delete
            // and published into the cache after the first application is dropped now.
            let app2 = app.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for d in &leaving {
                    if let Err(e) = apply(&app2, d) {
                        tracing::warn!(?d, "cannot apply a delete from the journal: {e}");
                    }
                }
            })
            .await;
        }
        if pruned.elapsed() >= Duration::from_millis(retention / 10) {
            pruned = Instant::now();
            match bucket
                .prune_journal(now_ms().saturating_sub(retention))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "journal of deletes pruned"),
                Err(e) => tracing::warn!("cannot prune the journal of deletes: {}", e.message),
            }
        }
    }
}
