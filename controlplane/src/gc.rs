//! Garbage collection: removes published content that no repository holds. Content becomes
//! unreachable when every repository that linked it deleted the blob or the manifest (a
//! `DELETE`), since a repository serves only what it links. Mirrored content is not special:
//! what a mirrored repository links is kept (the cache cap evicts it, see `mirror::evict`).
//!
//! Runs inside the control plane, the one writer, while pushes go on: the candidates are found
//! without locks, then removed under `App::publishing` held exclusively after the links are
//! read again, so content that a push or a mount linked meanwhile stays. Upload sessions are
//! not content (they live in `uploads/` until committed) and are left alone.

use std::sync::{Arc, RwLock};

use lighter_layout::Layout;
use serde::Serialize;

use crate::app::App;

/// What a collection found and did.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Published content looked at.
    pub blobs: u64,
    pub bytes: u64,
    /// Of which no repository holds.
    pub unreferenced_blobs: u64,
    pub unreferenced_bytes: u64,
    /// Removed (0 on a dry run).
    pub removed_blobs: u64,
    pub removed_bytes: u64,
    /// What was removed (for the event log).
    #[serde(skip)]
    pub removed: Vec<lighter_layout::Digest>,
    /// With `[storage.s3]`: the collection of the bucket, which runs first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<crate::bucket::BucketReport>,
}

/// Digests a `gc` event lists; past them it says how many more.
const GC_EVENT_DIGESTS_MAX: usize = 1000;

/// One collection for the API or the timer: waits for one in progress, runs off the workers,
/// counts and logs what it removed.
pub async fn run(app: &Arc<App>, dry_run: bool) -> std::io::Result<Report> {
    let _one = app.gc.lock().await;
    let in_bucket = match &app.bucket {
        Some(bucket) => Some(
            bucket
                .collect(dry_run)
                .await
                .map_err(|e| std::io::Error::other(e.message))?,
        ),
        None => None,
    };
    let worker = app.clone();
    let mut report =
        tokio::task::spawn_blocking(move || collect(&worker.layout, &worker.publishing, dry_run))
            .await
            .map_err(std::io::Error::other)??;
    let c = &app.counters;
    crate::metrics::Counters::add(&c.gc_runs, 1);
    crate::metrics::Counters::add(&c.gc_removed_blobs, report.removed_blobs);
    crate::metrics::Counters::add(&c.gc_removed_bytes, report.removed_bytes);
    if let Some(b) = &in_bucket {
        crate::metrics::Counters::add(&c.gc_bucket_removed_blobs, b.removed_blobs);
        crate::metrics::Counters::add(&c.gc_bucket_removed_bytes, b.removed_bytes);
        tracing::info!(
            dry_run,
            blobs = b.blobs,
            links = b.links,
            unreferenced_blobs = b.unreferenced_blobs,
            young_blobs = b.young_blobs,
            postponed_blobs = b.postponed_blobs,
            removed_blobs = b.removed_blobs,
            removed_bytes = b.removed_bytes,
            stopped_early = b.stopped_early,
            "garbage collection of the bucket done"
        );
    }
    report.bucket = in_bucket;
    tracing::info!(
        dry_run,
        blobs = report.blobs,
        unreferenced_blobs = report.unreferenced_blobs,
        removed_blobs = report.removed_blobs,
        removed_bytes = report.removed_bytes,
        "garbage collection done"
    );
    if !dry_run {
        let listed = report.removed.len().min(GC_EVENT_DIGESTS_MAX);
        let removed: Vec<String> = report.removed[..listed]
            .iter()
            .map(|d| d.to_string())
            .collect();
        let e = crate::events::Event::new("gc")
            .with("removed_blobs", report.removed_blobs)
            .with("bytes", report.removed_bytes)
            .with("blobs", report.blobs)
            .with("removed", removed)
            .with(
                "removed_unlisted",
                (listed < report.removed.len()).then_some(report.removed.len() - listed),
            );
        let e = match &report.bucket {
            Some(b) => {
                let listed = b.removed.len().min(GC_EVENT_DIGESTS_MAX);
                let removed: Vec<String> =
                    b.removed[..listed].iter().map(|d| d.to_string()).collect();
                e.with("bucket_removed_blobs", b.removed_blobs)
                    .with("bucket_bytes", b.removed_bytes)
                    .with("bucket_removed", removed)
            }
            None => e,
        };
        crate::events::record(app, e);
    }
    Ok(report)
}

/// One collection over the data directory.
pub fn collect(layout: &Layout, publishing: &RwLock<()>, dry_run: bool) -> std::io::Result<Report> {
    let linked = layout.linked_digests()?;
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    let mut candidates = Vec::new();
    for (digest, size) in layout.contents()? {
        report.blobs += 1;
        report.bytes += size;
        if !linked.contains(&digest) {
            report.unreferenced_blobs += 1;
            report.unreferenced_bytes += size;
            candidates.push((digest, size));
        }
    }
    if dry_run || candidates.is_empty() {
        return Ok(report);
    }
    let _exclusive = publishing.write().unwrap_or_else(|p| p.into_inner());
    let linked = layout.linked_digests()?;
    for (digest, size) in candidates {
        if linked.contains(&digest) {
            continue;
        }
        if layout.delete_content(&digest)? {
            tracing::info!(%digest, size_bytes = size, "garbage collected: no repository holds it");
            report.removed_blobs += 1;
            report.removed_bytes += size;
            report.removed.push(digest);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lighter_layout::{Algorithm, Digest, RepoName};

    #[test]
    fn removes_only_what_no_repository_holds() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let repo = RepoName::parse("team/app").unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::of(Algorithm::Sha256, bytes);
            layout.put_content(&d, bytes).unwrap();
            d
        };
        let (kept_blob, kept_manifest, orphan) = (put(b"layer"), put(b"{}"), put(b"orphan!"));
        layout.link_blob(&repo, &kept_blob).unwrap();
        layout
            .link_manifest(
                &repo,
                &kept_manifest,
                "application/vnd.oci.image.manifest.v1+json",
            )
            .unwrap();
        let lock = RwLock::new(());

        let dry = collect(&layout, &lock, true).unwrap();
        assert_eq!(
            (dry.blobs, dry.unreferenced_blobs, dry.removed_blobs),
            (3, 1, 0)
        );
        assert_eq!(dry.unreferenced_bytes, 7);
        assert!(
            layout.content_exists(&orphan).unwrap(),
            "a dry run removes nothing"
        );

        let done = collect(&layout, &lock, false).unwrap();
        assert_eq!((done.removed_blobs, done.removed_bytes), (1, 7));
        assert!(!layout.content_exists(&orphan).unwrap());
        assert!(layout.content_exists(&kept_blob).unwrap());
        assert!(layout.content_exists(&kept_manifest).unwrap());
        assert_eq!(collect(&layout, &lock, false).unwrap().removed_blobs, 0);
    }
}
