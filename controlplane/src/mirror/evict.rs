//! The cache's size cap: when the content held by mirrored repositories passes
//! `cache_size_max_bytes`, the blobs pulled least recently are removed until it fits. Never
//! removed: content also held by a repository outside the mirrors (pushed locally, so a local
//! manifest may need it) or by a pinned repository (`cache_pinned_repositories`).
//!
//! With `[storage.s3]`, every repository outside the mirrors is a cache of the bucket too
//! (`all_cached`): its blobs are evicted the same way, and fetched again on the next miss.
//!
//! With containerd's content store mounted (`containerd_content_dir`), anything that could be
//! evicted and that containerd holds too is removed first, whatever the cap: the node serves it
//! from containerd's copy, so nothing is stored twice.

use std::collections::HashMap;

use lighter_layout::{ContainerdContent, Digest, Layout, RepoName};

/// What a sweep found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub cached_bytes: u64,
    pub evicted_blobs: usize,
    pub evicted_bytes: u64,
    /// Of the evicted: held by containerd.
    pub deduplicated_blobs: usize,
    /// Each blob removed, in order (for the event log).
    pub removed: Vec<Removed>,
}

/// A blob a sweep removed: its digest, size, the repositories that held it, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Removed {
    pub digest: Digest,
    pub size: u64,
    pub repositories: Vec<RepoName>,
    /// containerd holds it (else: least recently pulled over the cap).
    pub containerd: bool,
}

/// Whether `repo` is `prefix` or inside it (`a/b` is inside `a`, `ab` is not).
fn under(repo: &str, prefix: &str) -> bool {
    repo == prefix || (repo.starts_with(prefix) && repo.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// One pass: measures the cache, drops what containerd holds (if given) and evicts down to
/// `cap_bytes` (0: no cap). The deletions happen under `publishing` held exclusively, after
/// measuring again under it: a push or a download that linked a blob since the first look
/// protects it.
pub fn sweep(
    layout: &Layout,
    upstreams: &[String],
    all_cached: bool,
    pinned: &[String],
    cap_bytes: u64,
    publishing: &std::sync::RwLock<()>,
    containerd: Option<&ContainerdContent>,
) -> std::io::Result<Sweep> {
    let cap_bytes = if cap_bytes == 0 { u64::MAX } else { cap_bytes };
    let held_elsewhere = |digest: &Digest, size: u64| {
        containerd.is_some_and(|c| c.size(digest).ok().flatten() == Some(size))
    };
    let first = plan(layout, upstreams, all_cached, pinned)?;
    let duplicates = first
        .candidates
        .iter()
        .any(|(_, d, size, _)| held_elsewhere(d, *size));
    if first.cached_bytes <= cap_bytes && !duplicates {
        return Ok(Sweep {
            cached_bytes: first.cached_bytes,
            ..Sweep::default()
        });
    }
    let _exclusive = publishing.write().unwrap_or_else(|p| p.into_inner());
    let plan = plan(layout, upstreams, all_cached, pinned)?;
    let mut result = Sweep {
        cached_bytes: plan.cached_bytes,
        ..Sweep::default()
    };
    let mut total = plan.cached_bytes;
    let (elsewhere, rest): (Vec<_>, Vec<_>) = plan
        .candidates
        .into_iter()
        .partition(|(_, d, size, _)| held_elsewhere(d, *size));
    for (dedup, (_, digest, size, repos)) in elsewhere
        .into_iter()
        .map(|c| (true, c))
        .chain(rest.into_iter().map(|c| (false, c)))
    {
        if !dedup && total <= cap_bytes {
            break;
        }
        for repo in &repos {
            layout.delete_blob(repo, &digest)?;
        }
        layout.delete_content(&digest)?;
        if dedup {
            tracing::info!(%digest, size_bytes = size, "dropped from the cache: containerd holds it");
            result.deduplicated_blobs += 1;
        } else {
            tracing::info!(%digest, size_bytes = size, "evicted from the cache (least recently pulled)");
        }
        total -= size;
        result.evicted_blobs += 1;
        result.evicted_bytes += size;
        result.removed.push(Removed {
            digest,
            size,
            repositories: repos,
            containerd: dedup,
        });
    }
    Ok(result)
}

/// What the cache holds, and what may go, least recently pulled first.
struct Plan {
    cached_bytes: u64,
    candidates: Vec<(std::time::SystemTime, Digest, u64, Vec<RepoName>)>,
}

fn plan(
    layout: &Layout,
    upstreams: &[String],
    all_cached: bool,
    pinned: &[String],
) -> std::io::Result<Plan> {
    struct Held {
        last_pulled: std::time::SystemTime,
        mirror_repos: Vec<RepoName>,
        protected: bool,
    }
    let mut held: HashMap<Digest, Held> = HashMap::new();
    for link in layout.blob_links()? {
        let repo = link.repo.as_str();
        let mirrored = all_cached || upstreams.iter().any(|u| under(repo, u));
        let protected = !mirrored || pinned.iter().any(|p| under(repo, p));
        let h = held.entry(link.digest).or_insert(Held {
            last_pulled: link.last_pulled,
            mirror_repos: Vec::new(),
            protected: false,
        });
        h.protected |= protected;
        if mirrored {
            h.mirror_repos.push(link.repo);
            h.last_pulled = h.last_pulled.max(link.last_pulled);
        }
    }
    let mut cached_bytes = 0;
    let mut candidates = Vec::new();
    for (digest, h) in held {
        if h.mirror_repos.is_empty() {
            continue;
        }
        let size = layout.content_size(&digest)?.unwrap_or(0);
        cached_bytes += size;
        if !h.protected {
            candidates.push((h.last_pulled, digest, size, h.mirror_repos));
        }
    }
    candidates.sort_by_key(|c| c.0);
    Ok(Plan {
        cached_bytes,
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lighter_layout::{Algorithm, UploadId};

    fn put(layout: &Layout, repo: &str, bytes: &[u8], age_s: u64) -> Digest {
        let name = RepoName::parse(repo).unwrap();
        let mut ingest = layout
            .create_ingest(&name, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(bytes).unwrap();
        let d = Digest::of(Algorithm::Sha256, bytes);
        layout.commit(ingest, &d).unwrap();
        let link = layout.blob_link_path(&name, &d);
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(link)
            .unwrap()
            .set_modified(t)
            .unwrap();
        d
    }

    #[test]
    fn least_recently_pulled_goes_first_and_protected_content_stays() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_writer(dir.path()).unwrap();
        let oldest = put(&l, "docker.io/library/a", &[1; 1000], 300);
        let pinned = put(&l, "docker.io/library/pinned", &[2; 1000], 400);
        let local = put(&l, "docker.io/library/b", &[3; 1000], 500);
        put(&l, "team/app", &[3; 1000], 500); // the same bytes pushed locally
        let newest = put(&l, "docker.io/library/a", &[4; 1000], 10);
        let ups = ["docker.io".to_string()];
        let pins = ["docker.io/library/pinned".to_string()];
        let s = sweep(&l, &ups, false, &pins, 3000, &Default::default(), None).unwrap();
        assert_eq!(s.cached_bytes, 4000);
        assert_eq!((s.evicted_blobs, s.evicted_bytes), (1, 1000));
        assert_eq!(
            s.removed,
            vec![Removed {
                digest: oldest.clone(),
                size: 1000,
                repositories: vec![RepoName::parse("docker.io/library/a").unwrap()],
                containerd: false,
            }]
        );
        assert!(!l.content_exists(&oldest).unwrap());
        for kept in [&pinned, &local, &newest] {
            assert!(l.content_exists(kept).unwrap());
        }
        // Nothing more can go: what is left is protected or within the cap.
        let s = sweep(&l, &ups, false, &pins, 1, &Default::default(), None).unwrap();
        assert_eq!(s.evicted_blobs, 1);
        assert!(!l.content_exists(&newest).unwrap());
        assert!(l.content_exists(&pinned).unwrap() && l.content_exists(&local).unwrap());
    }

    #[test]
    fn with_a_bucket_pushed_repositories_are_a_cache_too() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_writer(dir.path()).unwrap();
        let old = put(&l, "team/app", &[5; 1000], 300);
        let new = put(&l, "team/app", &[6; 1000], 10);
        // Without a bucket, pushed content is the only copy: never evicted.
        let s = sweep(&l, &[], false, &[], 1500, &Default::default(), None).unwrap();
        assert_eq!((s.cached_bytes, s.evicted_blobs), (0, 0));
        // With one, it is a cache of the bucket: the least recently pulled goes, link and all.
        let s = sweep(&l, &[], true, &[], 1500, &Default::default(), None).unwrap();
        assert_eq!((s.cached_bytes, s.evicted_blobs), (2000, 1));
        assert!(!l.content_exists(&old).unwrap() && l.content_exists(&new).unwrap());
        let name = RepoName::parse("team/app").unwrap();
        assert!(!l.blob_linked(&name, &old).unwrap());
    }

    #[test]
    fn what_containerd_holds_is_dropped_whatever_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_writer(dir.path().join("data")).unwrap();
        let ctd = dir.path().join("containerd");
        std::fs::create_dir_all(ctd.join("blobs/sha256")).unwrap();
        let store = ContainerdContent::new(&ctd);
        let both = put(&l, "docker.io/library/a", &[1; 1000], 10);
        let ours = put(&l, "docker.io/library/a", &[2; 1000], 500);
        let local = put(&l, "team/app", &[3; 1000], 10);
        let resized = put(&l, "docker.io/library/b", &[4; 1000], 10);
        for (d, len) in [(&both, 1000), (&local, 1000), (&resized, 999)] {
            std::fs::write(store.blob_path(d), vec![0u8; len]).unwrap();
        }
        let ups = ["docker.io".to_string()];
        let s = sweep(&l, &ups, false, &[], 0, &Default::default(), Some(&store)).unwrap();
        assert_eq!((s.evicted_blobs, s.deduplicated_blobs), (1, 1));
        assert!(!l.content_exists(&both).unwrap());
        assert!(!l
            .blob_linked(&RepoName::parse("docker.io/library/a").unwrap(), &both)
            .unwrap());
        // Kept: not in containerd, pushed locally, or a different file under the same name.
        for kept in [&ours, &local, &resized] {
            assert!(l.content_exists(kept).unwrap());
        }
        // Nothing more to do, no cap.
        let s = sweep(&l, &ups, false, &[], 0, &Default::default(), Some(&store)).unwrap();
        assert_eq!(s.evicted_blobs, 0);
    }

    #[test]
    fn prefix_match_respects_component_boundaries() {
        assert!(under("docker.io/library/a", "docker.io"));
        assert!(under("docker.io", "docker.io"));
        assert!(!under("docker.iox/a", "docker.io"));
    }
}
