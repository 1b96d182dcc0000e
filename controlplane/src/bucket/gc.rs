//! Garbage collection of the bucket, and the linkers' side of it (see "Garbage collection of
//! the bucket" in docs/ARCHITECTURE.md for why these steps are enough).
//!
//! - A collector reads the store's clock (`T`: the last-modified of `gc/clock`, PUT just
//!   before), lists every key under `repos/` (blob and manifest links, and the manifests tags
//!   name), then the content under `blobs/`. Content no key names and last modified before
//!   `T - gc_grace_ms` is a candidate; each is read again (HEAD) just before its DELETE and
//!   spared if it was modified since. A sweep stops deleting once `gc_grace_ms / 2` has passed
//!   since it began (the next one goes on). Collectors need no lock between them: deleting
//!   content that is unlinked and old is the same act whoever does it, and done twice is done.
//! - A linker (anything that PUTs a key naming content) first makes the content's
//!   last-modified recent: it uploads the content, or touches it (a server-side copy onto
//!   itself, which Garage dates anew; a missing object, or a store that refuses the copy,
//!   means the content must be uploaded again). After the link's PUT it checks that no more than `gc_grace_ms / 2` has
//!   passed since, and that the content is still there; otherwise the request fails (503) and
//!   nothing is acknowledged.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use lighter_layout::bucket::{self as keys, RepoKey};
use lighter_layout::{Digest, RepoName};
use object_store::path::Path;
use object_store::ObjectStoreExt;
use serde::Serialize;

use super::Bucket;
use crate::api::Result;
use crate::error::{ApiError, Code};

/// A collector sends a content's DELETE at most this long after it sent the HEAD that found the
/// content old and unlinked (else it reads it again), and a linker reads its content back at
/// least twice this long after its refresh (touch or upload) completed. A DELETE decided on a
/// HEAD that the store answered before a refresh is sent within the window of that HEAD, so,
/// reaching the store within the window again, it lands before the linker's read-back, which
/// then finds the content gone and fails the link: no acknowledged link names content a
/// collector removes. (The one assumption: a DELETE reaches the store within this long of
/// being sent; a collector that sees its DELETE answered later than twice the window warns.)
pub const DELETE_WINDOW_MS: u64 = 200;

/// What a collection of the bucket found and did.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct BucketReport {
    /// Content objects listed, and their bytes.
    pub blobs: u64,
    pub bytes: u64,
    /// Keys under `repos/` read (links and tags).
    pub links: u64,
    /// Content no key names.
    pub unreferenced_blobs: u64,
    pub unreferenced_bytes: u64,
    /// Of which younger than `gc_grace_ms` (by the store's clock), or touched during the sweep.
    pub young_blobs: u64,
    /// Old and unlinked, but the store answered too slowly to delete them within
    /// `DELETE_WINDOW_MS` of reading them: left to the next sweep.
    pub postponed_blobs: u64,
    /// Removed (0 on a dry run).
    pub removed_blobs: u64,
    pub removed_bytes: u64,
    /// The sweep reached `gc_grace_ms / 2` and stopped deleting; the next one goes on.
    pub stopped_early: bool,
    /// What was removed (for the event log).
    #[serde(skip)]
    pub removed: Vec<Digest>,
}

impl Bucket {
    /// Makes content's last-modified now (a server-side copy onto itself); false if it could
    /// not: the bucket does not hold it, or the store refuses a copy that changes nothing (AWS
    /// S3 does); either way the content must be uploaded again before it is linked.
    pub async fn touch(&self, digest: &Digest) -> Result<bool> {
        let key = keys::content_key(digest);
        let path = Path::from(key.as_str());
        let refused = match self.store.copy(&path, &path).await {
            Ok(()) => return Ok(true),
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => e,
        };
        // Reachable and holding it, yet no copy: a store that refuses copies onto themselves.
        match self.store.head(&path).await {
            Ok(_) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| tracing::warn!(bucket = self.config.bucket, "cannot copy {key} onto itself ({refused}; some stores refuse copies that change nothing): content the bucket holds is uploaded again (a mount opens an upload) instead of being touched; logged once"));
                Ok(false)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.unavailable(&format!("refresh {key}"), e)),
        }
    }

    /// Stores a blob (see [`Bucket::put_blob`]: uploaded, or touched if the bucket holds it);
    /// the instant from which its last-modified is known to be recent, for
    /// [`Bucket::confirm_linked`]. An upload that took long is followed by a touch, so a large
    /// blob's link is not refused for the time its upload took.
    pub async fn store_blob(
        &self,
        file: std::fs::File,
        len: u64,
        digest: &Digest,
    ) -> Result<Instant> {
        let since = Instant::now();
        self.put_blob(file, len, digest).await?;
        if since.elapsed().as_millis() as u64 > self.config.gc_grace_ms / 4 {
            let again = Instant::now();
            if self.touch(digest).await? {
                return Ok(again);
            }
            // Not touched: `confirm_linked` judges by the upload's start, and its HEAD finds a
            // collected blob.
        }
        Ok(since)
    }

    /// Links content the bucket already holds into a repository (a mount): touched first, then
    /// linked and confirmed. False (nothing linked) if the bucket does not hold it.
    pub async fn link_blob_touched(&self, name: &RepoName, digest: &Digest) -> Result<bool> {
        let since = Instant::now();
        if !self.touch(digest).await? {
            return Ok(false);
        }
        self.link_blob(name, digest).await?;
        self.confirm_linked(digest, &keys::blob_link_key(name, digest), since)
            .await?;
        Ok(true)
    }

    /// After a link's PUT (`link_key`) to content made recent at `since`: fails unless at
    /// most `gc_grace_ms / 2` has passed and the content is still there (a collector that
    /// read it as old and unlinked just before the touch may have removed it; then the link,
    /// which names nothing, is removed again). [`Bucket::linked_in_time`], [`settle`], then
    /// [`Bucket::read_back`]; a linker of many (bucket-import) checks each in time, settles
    /// once, and reads them all back.
    pub async fn confirm_linked(
        &self,
        digest: &Digest,
        link_key: &str,
        since: Instant,
    ) -> Result<()> {
        self.linked_in_time(digest, since)?;
        settle().await;
        self.read_back(digest, link_key).await
    }

    /// Fails unless at most `gc_grace_ms / 2` has passed since the content was made recent
    /// (`since`): called right after the link's PUT.
    pub fn linked_in_time(&self, digest: &Digest, since: Instant) -> Result<()> {
        let took = since.elapsed().as_millis() as u64;
        if took > self.config.gc_grace_ms / 2 {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                format!(
                    "linking {digest} in the bucket took {took} ms, over half of gc_grace_ms ({} ms): a garbage collection may remove it; nothing was acknowledged, try again",
                    self.config.gc_grace_ms
                ),
            )
            .with_header("retry-after", "5".into()));
        }
        Ok(())
    }

    /// The content is still there (after [`settle`]); if not, its link is removed again and
    /// the link fails.
    pub async fn read_back(&self, digest: &Digest, link_key: &str) -> Result<()> {
        if self.content_size(digest).await?.is_none() {
            self.delete(link_key.to_owned()).await?;
            return Err(collected(digest));
        }
        Ok(())
    }

    /// The store's clock now, in ms since the epoch: the last-modified of an object written
    /// just now (so replicas' clocks do not matter; the store's times are to the second).
    async fn store_now_ms(&self) -> Result<i64> {
        self.put(keys::CLOCK_KEY.to_owned(), Bytes::new()).await?;
        let meta = self
            .store
            .head(&Path::from(keys::CLOCK_KEY))
            .await
            .map_err(|e| self.unavailable(&format!("read {}", keys::CLOCK_KEY), e))?;
        Ok(meta.last_modified.timestamp_millis())
    }

    /// Every digest a key under `repos/` names: blob and manifest links, and tags' manifests;
    /// with the number of keys read.
    async fn linked_digests(&self) -> Result<(HashSet<Digest>, u64)> {
        let prefix = Path::from(keys::REPOS_PREFIX.trim_end_matches('/'));
        let mut listed = self.store.list(Some(&prefix));
        let mut linked = HashSet::new();
        let mut tags = Vec::new();
        let mut n = 0;
        while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
            let meta = meta.map_err(|e| self.unavailable("list repos/", e))?;
            match keys::parse_repo_key(meta.location.as_ref()) {
                Some(RepoKey::Blob(_, d) | RepoKey::Manifest(_, d)) => {
                    linked.insert(d);
                }
                Some(RepoKey::Tag(name, tag)) => tags.push((name, tag)),
                None => continue,
            }
            n += 1;
        }
        drop(listed);
        for (name, tag) in tags {
            if let Some(entry) = self.tag(&name, &tag).await? {
                linked.insert(entry.digest);
            }
        }
        Ok((linked, n))
    }

    /// One collection of the bucket.
    pub async fn collect(&self, dry_run: bool) -> Result<BucketReport> {
        let started = Instant::now();
        let grace = self.config.gc_grace_ms;
        // A dry run writes nothing to the bucket (it may run with read-only credentials), so
        // it judges age by this replica's clock rather than the store's.
        let now_ms = match dry_run {
            true => crate::clock::now_ms() as i64,
            false => self.store_now_ms().await?,
        };
        let cutoff = now_ms - grace as i64;
        let (linked, links) = self.linked_digests().await?;
        let mut report = BucketReport {
            links,
            ..Default::default()
        };
        let prefix = Path::from(keys::CONTENT_PREFIX.trim_end_matches('/'));
        let mut listed = self.store.list(Some(&prefix));
        let mut candidates = Vec::new();
        while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
            let meta = meta.map_err(|e| self.unavailable("list blobs/", e))?;
            let Some(digest) = keys::parse_content_key(meta.location.as_ref()) else {
                continue;
            };
            report.blobs += 1;
            report.bytes += meta.size;
            if linked.contains(&digest) {
                continue;
            }
            report.unreferenced_blobs += 1;
            report.unreferenced_bytes += meta.size;
            if meta.last_modified.timestamp_millis() >= cutoff {
                report.young_blobs += 1;
                continue;
            }
            candidates.push(digest);
        }
        drop(listed);
        if dry_run {
            return Ok(report);
        }
        for digest in candidates {
            if started.elapsed().as_millis() as u64 > grace / 2 {
                report.stopped_early = true;
                break;
            }
            let key = keys::content_key(&digest);
            let path = Path::from(key.as_str());
            // Read again just before the delete: a linker's touch since the listing spares it.
            let (meta, asked) = match self.read_again(&path, &key, cutoff).await? {
                ReadAgain::Gone => continue,
                ReadAgain::Slow => {
                    report.postponed_blobs += 1;
                    continue;
                }
                ReadAgain::Read(meta, asked) => (meta, asked),
            };
            if meta.last_modified.timestamp_millis() >= cutoff {
                report.young_blobs += 1;
                continue;
            }
            self.delete(key).await?;
            let took = asked.elapsed();
            if took > 2 * Duration::from_millis(DELETE_WINDOW_MS) {
                tracing::warn!(%digest, ms = took.as_millis() as u64, "a DELETE in the bucket was answered over twice DELETE_WINDOW_MS after the HEAD that allowed it: a link made meanwhile may name removed content if the store applied it that late");
            }
            tracing::info!(%digest, size_bytes = meta.size, "garbage collected from the bucket: no repository links it");
            report.removed_blobs += 1;
            report.removed_bytes += meta.size;
            report.removed.push(digest);
        }
        Ok(report)
    }
}

/// What a collector's second look at a candidate found.
enum ReadAgain {
    Gone,
    /// Three HEADs each answered later than `DELETE_WINDOW_MS`: no DELETE may follow them.
    Slow,
    /// Its metadata, and when the HEAD that read it was sent.
    Read(object_store::ObjectMeta, Instant),
}

impl Bucket {
    /// HEADs a candidate again, up to three times, until an answer comes within
    /// `DELETE_WINDOW_MS` of its request (or says the content is young: no DELETE follows).
    async fn read_again(&self, path: &Path, key: &str, cutoff: i64) -> Result<ReadAgain> {
        for _ in 0..3 {
            let sent = Instant::now();
            match self.store.head(path).await {
                Ok(meta)
                    if meta.last_modified.timestamp_millis() >= cutoff
                        || sent.elapsed() <= Duration::from_millis(DELETE_WINDOW_MS) =>
                {
                    return Ok(ReadAgain::Read(meta, sent))
                }
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => return Ok(ReadAgain::Gone),
                Err(e) => return Err(self.unavailable(&format!("look up {key}"), e)),
            }
        }
        Ok(ReadAgain::Slow)
    }
}

/// Waits out any DELETE a collector decided before a linker's refresh (`2 * DELETE_WINDOW_MS`
/// from the refresh's answer; see [`DELETE_WINDOW_MS`]), before the linker reads back.
pub async fn settle() {
    tokio::time::sleep(2 * Duration::from_millis(DELETE_WINDOW_MS)).await;
}

fn collected(digest: &Digest) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Code::Unavailable,
        format!(
            "{digest} was removed from the bucket by a garbage collection while it was being linked; nothing was acknowledged, push it again"
        ),
    )
    .with_header("retry-after", "1".into())
}
