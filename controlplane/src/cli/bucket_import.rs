//! `lighter bucket-import [--dry-run]`: copies the repositories of a data directory into the
//! bucket of `[storage.s3]`: the step that switches an existing registry to replicas. Run it
//! once, with the same `--config` and `--data-dir` the registry will use, before the replicas
//! start (a replica serves a tag the bucket lacks for at most `tag_ttl_ms`, then drops it).
//!
//! Offline: it reads the data directory through `lighter-layout` and writes the bucket through
//! [`Bucket`], in the order pushes do (content before the key that names it: blobs, then
//! manifests, images before the indexes naming them, with their referrer records, then tags), so a replica reading the
//! bucket meanwhile never finds a key naming missing content. Idempotent: content and links
//! already in the bucket are not written again. A tag the bucket already has (pushed through a
//! replica since) is kept as the bucket has it and reported. Mirrored repositories are left out:
//! they are caches of their upstreams.

use std::io;

use lighter_layout::media::ManifestKind;
use lighter_layout::{Digest, Layout, RepoName, Tag};
use serde::Serialize;

use crate::bucket::Bucket;
use crate::config::Config;

#[derive(Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub repositories: u64,
    /// Mirrored repositories, left out.
    pub skipped_mirrored: u64,
    /// Blob and manifest content uploaded (or, dry, that would be).
    pub content_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Content the bucket already held.
    pub content_present: u64,
    pub blob_links: u64,
    pub manifest_links: u64,
    /// Records of manifests with a subject (the referrers API), for manifests copied.
    pub referrers: u64,
    pub tags_written: u64,
    /// Tags the bucket already has naming the same manifest.
    pub tags_present: u64,
    /// Tags the bucket has naming another manifest: kept as the bucket has them.
    pub tags_kept: Vec<KeptTag>,
    /// Links whose content the data directory lacks (evicted from a cache): not imported.
    pub missing_content: Vec<String>,
}

#[derive(Serialize)]
pub struct KeptTag {
    pub repository: String,
    pub tag: String,
    pub local: String,
    pub bucket: String,
}

/// Imports `config.data_dir` into `config.storage.s3`'s bucket.
pub fn run(config: &Config, dry_run: bool) -> Result<Report, String> {
    let s3 = config
        .storage
        .s3
        .as_ref()
        .ok_or("the configuration has no [storage.s3]: there is no bucket to import into")?;
    let bucket = Bucket::new(s3)?;
    let layout = Layout::open(&config.data_dir);
    let mirror_prefixes: Vec<String> = config
        .upstreams
        .iter()
        .map(|u| lighter_layout::mirror_prefix(&u.name))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut report = Report {
            dry_run,
            ..Report::default()
        };
        let repos = layout
            .repositories()
            .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
        for repo in repos {
            let Ok(name) = RepoName::parse(&repo) else {
                continue;
            };
            if name.rest().is_some() && mirror_prefixes.iter().any(|p| p == name.first_component())
            {
                report.skipped_mirrored += 1;
                continue;
            }
            report.repositories += 1;
            import_repository(&layout, &bucket, &name, dry_run, &mut report)
                .await
                .map_err(|e| format!("repository {name}: {e}"))?;
        }
        Ok(report)
    })
}

/// Reads back the links in `made` (emptied) after one settle: each fails, its link removed,
/// if a garbage collection removed its content meanwhile.
async fn read_back(bucket: &Bucket, made: &mut Vec<(Digest, String)>) -> crate::api::Result<()> {
    if made.is_empty() {
        return Ok(());
    }
    crate::bucket::settle().await;
    for (digest, key) in made.drain(..) {
        bucket.read_back(&digest, &key).await?;
    }
    Ok(())
}

async fn import_repository(
    layout: &Layout,
    bucket: &Bucket,
    name: &RepoName,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), String> {
    let io = |e: io::Error| e.to_string();
    let api = |e: crate::error::ApiError| e.message;
    // Links made, read back together after one settle (bucket/gc.rs `confirm_linked`, split:
    // the wait is per batch, not per link).
    let mut made: Vec<(Digest, String)> = Vec::new();
    for digest in layout.blob_link_digests(name).map_err(io)? {
        let Some((file, len)) = layout.open_content(&digest).map_err(io)? else {
            report.missing_content.push(format!("{name}@{digest}"));
            continue;
        };
        let present = bucket.content_size(&digest).await.map_err(api)? == Some(len);
        if present {
            report.content_present += 1;
        } else {
            report.content_uploaded += 1;
            report.bytes_uploaded += len;
        }
        let linked = bucket.blob_linked(name, &digest).await.map_err(api)?;
        if !linked {
            report.blob_links += 1;
        }
        if dry_run || (present && linked) {
            continue;
        }
        // A linker like a push (bucket/gc.rs): content uploaded, or touched if the bucket holds
        // it, then linked within half of gc_grace_ms and found again.
        let since = bucket.store_blob(file, len, &digest).await.map_err(api)?;
        if !linked {
            bucket.link_blob(name, &digest).await.map_err(api)?;
            bucket.linked_in_time(&digest, since).map_err(api)?;
            let key = lighter_layout::bucket::blob_link_key(name, &digest);
            made.push((digest, key));
        }
    }
    read_back(bucket, &mut made).await.map_err(api)?;
    // Images before the indexes that name them: a manifest's references are in the bucket
    // before it is.
    let mut manifests = Vec::new();
    for digest in layout.manifest_links(name).map_err(io)? {
        let Some(entry) = layout.manifest(name, &digest).map_err(io)? else {
            continue;
        };
        let Some(bytes) = layout.read_content(&digest).map_err(io)? else {
            report.missing_content.push(format!("{name}@{digest}"));
            continue;
        };
        let index = lighter_layout::media::manifest_kind(entry.media_type.as_str())
            == Some(ManifestKind::Index);
        manifests.push((index, digest, entry.media_type, bytes));
    }
    manifests.sort_by_key(|(index, ..)| *index);
    for (_, digest, media_type, bytes) in manifests {
        let present = bucket
            .manifest(name, &digest, bytes.len() as u64)
            .await
            .map_err(api)?
            .is_some();
        if present {
            report.content_present += 1;
            continue;
        }
        report.content_uploaded += 1;
        report.bytes_uploaded += bytes.len() as u64;
        report.manifest_links += 1;
        if !dry_run {
            let since = std::time::Instant::now();
            bucket
                .put_manifest(name, &digest, media_type.as_str(), bytes.clone().into())
                .await
                .map_err(api)?;
            bucket.linked_in_time(&digest, since).map_err(api)?;
            let key = lighter_layout::bucket::manifest_link_key(name, &digest);
            made.push((digest.clone(), key));
        }
        // A manifest with a subject: its record for the referrers API, as a push writes it.
        let Ok(inspected) = lighter_layout::manifest::inspect(&bytes, Some(media_type.as_str()))
        else {
            continue;
        };
        if let Some(subject) = &inspected.subject {
            report.referrers += 1;
            if !dry_run {
                let descriptor = inspected.referrer_descriptor(&digest, bytes.len() as u64);
                let descriptor = serde_json::to_vec(&descriptor).expect("JSON of JSON values");
                bucket
                    .put_referrer(name, subject, &digest, descriptor.into())
                    .await
                    .map_err(api)?;
            }
        }
    }
    // Before any tag names them.
    read_back(bucket, &mut made).await.map_err(api)?;
    for tag in layout.tags(name).map_err(io)?.unwrap_or_default() {
        let Ok(tag) = Tag::parse(&tag) else { continue };
        let Some(local) = layout.tag(name, &tag).map_err(io)? else {
            continue;
        };
        match bucket.tag(name, &tag).await.map_err(api)? {
            Some(there) if there.digest == local.digest => report.tags_present += 1,
            Some(there) => report.tags_kept.push(KeptTag {
                repository: name.to_string(),
                tag: tag.to_string(),
                local: local.digest.to_string(),
                bucket: there.digest.to_string(),
            }),
            None => {
                report.tags_written += 1;
                if !dry_run {
                    bucket.put_tag(name, &tag, &local).await.map_err(api)?;
                }
            }
        }
    }
    Ok(())
}
