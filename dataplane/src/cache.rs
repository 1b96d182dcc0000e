//! Per-core caches of the pull path, direct-mapped and sized at start, so the steady state
//! neither allocates nor repeats system calls nginx would not make:
//! - open blob files by digest (content is immutable, so an open file stays right; whether the
//!   repository holds the blob is still checked on every request);
//! - resolved manifest references (tag or digest → digest and media type), valid while the
//!   tag file or manifest link keeps its identity (publishing always replaces the file).

use std::fs::File;
use std::io;
use std::rc::Rc;

use lighter_layout::{Digest, FileId, Layout, ManifestEntry, Reference, RepoName};

/// Open blob files kept per core.
pub const BLOB_SLOTS: usize = 256;
/// Resolved manifest references kept per core.
pub const MANIFEST_SLOTS: usize = 256;

struct BlobSlot {
    digest: Digest,
    file: Rc<File>,
    len: u64,
}

struct ManifestSlot {
    name: RepoName,
    reference: Reference,
    id: FileId,
    entry: ManifestEntry,
}

pub struct Cache {
    blobs: Vec<Option<BlobSlot>>,
    manifests: Vec<Option<ManifestSlot>>,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            blobs: (0..BLOB_SLOTS).map(|_| None).collect(),
            manifests: (0..MANIFEST_SLOTS).map(|_| None).collect(),
        }
    }
}

/// FNV-1a over some strings.
fn hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Cache {
    /// Opens a blob of the repository: one `statx` for the link when the file is cached.
    pub fn blob(
        &mut self,
        layout: &Layout,
        name: &RepoName,
        digest: &Digest,
    ) -> io::Result<Option<(Rc<File>, u64)>> {
        if !layout.blob_linked(name, digest)? {
            return Ok(None);
        }
        self.content(layout, digest)
    }

    /// Opens content by digest through the cache.
    pub fn content(
        &mut self,
        layout: &Layout,
        digest: &Digest,
    ) -> io::Result<Option<(Rc<File>, u64)>> {
        let slot = &mut self.blobs[(hash(&[digest.hex()]) % BLOB_SLOTS as u64) as usize];
        if let Some(s) = slot {
            if &s.digest == digest {
                return Ok(Some((s.file.clone(), s.len)));
            }
        }
        let Some((file, len)) = layout.open_content(digest)? else {
            return Ok(None);
        };
        let file = Rc::new(file);
        *slot = Some(BlobSlot {
            digest: digest.clone(),
            file: file.clone(),
            len,
        });
        Ok(Some((file, len)))
    }

    /// Forgets open files whose content was removed (evicted by the pull-through cache, or
    /// deleted), so their disk space returns now rather than when the slot is next reused. One
    /// `fstat` per cached file; called every few seconds. Returns how many were dropped.
    pub fn drop_removed(&mut self) -> usize {
        use std::os::unix::fs::MetadataExt;
        let mut dropped = 0;
        for slot in &mut self.blobs {
            let removed = slot
                .as_ref()
                .is_some_and(|s| s.file.metadata().is_ok_and(|m| m.nlink() == 0));
            if removed {
                *slot = None;
                dropped += 1;
            }
        }
        dropped
    }

    /// Resolves a manifest reference: one `statx` when cached. Also returns when the tag (or link)
    /// was last written, for mirrors' tag TTLs.
    pub fn manifest(
        &mut self,
        layout: &Layout,
        name: &RepoName,
        reference: &Reference,
    ) -> io::Result<Option<(ManifestEntry, FileId)>> {
        let Some(id) = layout.manifest_ref_id(name, reference)? else {
            return Ok(None);
        };
        let key = match reference {
            Reference::Tag(t) => hash(&[name.as_str(), t.as_str()]),
            Reference::Digest(d) => hash(&[name.as_str(), d.hex()]),
        };
        let slot = &mut self.manifests[(key % MANIFEST_SLOTS as u64) as usize];
        if let Some(s) = slot {
            if s.id == id && &s.name == name && &s.reference == reference {
                return Ok(Some((s.entry.clone(), id)));
            }
        }
        let entry = match reference {
            Reference::Tag(t) => layout.tag(name, t)?,
            Reference::Digest(d) => layout.manifest(name, d)?,
        };
        let Some(entry) = entry else {
            return Ok(None);
        };
        *slot = Some(ManifestSlot {
            name: name.clone(),
            reference: reference.clone(),
            id,
            entry: entry.clone(),
        });
        Ok(Some((entry, id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_content_is_dropped_and_kept_content_stays() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let kept = Digest::of(lighter_layout::Algorithm::Sha256, b"kept");
        let gone = Digest::of(lighter_layout::Algorithm::Sha256, b"gone");
        layout.put_content(&kept, b"kept").unwrap();
        layout.put_content(&gone, b"gone").unwrap();
        let mut cache = Cache::default();
        assert!(cache.content(&layout, &kept).unwrap().is_some());
        assert!(cache.content(&layout, &gone).unwrap().is_some());
        assert_eq!(cache.drop_removed(), 0, "nothing removed yet");
        std::fs::remove_file(layout.blob_path(&gone)).unwrap();
        assert_eq!(cache.drop_removed(), 1);
        assert_eq!(cache.drop_removed(), 0);
        let slots = cache.blobs.iter().flatten().count();
        assert_eq!(slots, 1, "the kept file stays cached");
        assert!(cache.content(&layout, &gone).unwrap().is_none());
    }
}
