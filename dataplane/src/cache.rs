//! Per-core caches of the pull path, direct-mapped and sized at start, so the steady state
//! neither allocates nor makes system calls nginx would not make:
//! - open blob files by digest (content is immutable, so an open file stays right);
//! - the repositories found to hold a blob (its link file exists);
//! - resolved manifest references (tag or digest → digest and media type), valid while the
//!   tag file or manifest link keeps its identity (publishing always replaces the file).
//!
//! What was found on disk is reused without asking the file system again while the namespace
//! generation ([`lighter_layout::store::Generation`]) is the one read before it was checked, and
//! for at most [`REVALIDATE_AFTER`] (so a change made behind the control plane's back, by hand,
//! shows within that); a tag moved or anything removed bumps the generation and everything is
//! checked again. Without the generation (no control plane has opened the data directory yet),
//! every request checks.

use std::fs::File;
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

use lighter_layout::store::Generation;
use lighter_layout::{Digest, FileId, Layout, ManifestEntry, Reference, RepoName};

/// Open blob files kept per core.
pub const BLOB_SLOTS: usize = 256;
/// Repository-holds-blob answers kept per core.
pub const LINK_SLOTS: usize = 256;
/// Resolved manifest references kept per core.
pub const MANIFEST_SLOTS: usize = 256;
/// Largest manifest a core keeps in memory, to send it with its head in one system call.
pub const INLINE_MAX_BYTES: u64 = 16 << 10;
/// Most manifest bytes a core keeps in memory.
pub const INLINE_BUDGET_BYTES: usize = 1 << 20;
/// Longest a checked answer is reused while the generation stays the same.
pub const REVALIDATE_AFTER: Duration = Duration::from_secs(1);

/// A manifest's open file, its length and, when small, its bytes.
pub type OpenManifest = (Rc<File>, u64, Option<Rc<[u8]>>);

struct BlobSlot {
    digest: Digest,
    file: Rc<File>,
    len: u64,
    /// The content, for a manifest of at most [`INLINE_MAX_BYTES`] (read once, on its first
    /// GET; content is immutable).
    bytes: Option<Rc<[u8]>>,
}

/// When an answer was checked on disk, and at which generation.
#[derive(Clone, Copy)]
struct Checked {
    generation: u64,
    at: Instant,
}

impl Checked {
    fn still(self, generation: Option<u64>, now: Instant) -> bool {
        generation == Some(self.generation)
            && now.saturating_duration_since(self.at) < REVALIDATE_AFTER
    }
}

struct LinkSlot {
    name: RepoName,
    digest: Digest,
    checked: Checked,
}

struct ManifestSlot {
    name: RepoName,
    reference: Reference,
    id: FileId,
    entry: ManifestEntry,
    checked: Option<Checked>,
    /// When this core last handed a pull of this reference, cached but stale, to the control
    /// plane to refresh it (see [`Cache::stale_handoff`]).
    handed_over: Option<Instant>,
}

pub struct Cache {
    blobs: Vec<Option<BlobSlot>>,
    links: Vec<Option<LinkSlot>>,
    manifests: Vec<Option<ManifestSlot>>,
    generation: Option<Generation>,
    /// Per (repository, blob) hash: when this core last recorded a pull of it on the link
    /// (the modification time the cache's eviction reads). A collision only skips a record
    /// for a second.
    pulls: Vec<(u64, Option<Instant>)>,
    /// Bytes the blob slots hold in memory (at most [`INLINE_BUDGET_BYTES`]).
    inline_bytes: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            blobs: (0..BLOB_SLOTS).map(|_| None).collect(),
            links: (0..LINK_SLOTS).map(|_| None).collect(),
            manifests: (0..MANIFEST_SLOTS).map(|_| None).collect(),
            generation: None,
            pulls: vec![(0, None); LINK_SLOTS],
            inline_bytes: 0,
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

/// A digest's slot key: its first 16 hex digits (a digest is uniformly distributed; hashing
/// all 64 of them was a measurable share of a blob GET).
fn digest_key(digest: &Digest) -> u64 {
    digest.hex().as_bytes()[..16].iter().fold(0u64, |k, &c| {
        let v = match c {
            b'0'..=b'9' => c - b'0',
            _ => c.wrapping_sub(b'a') + 10,
        };
        (k << 4) | u64::from(v & 0xf)
    })
}

/// A (repository, digest) slot key.
fn hash_with(name: &RepoName, digest: &Digest) -> u64 {
    hash(&[name.as_str()]) ^ digest_key(digest)
}

/// The manifest slot of a (repository, reference).
fn manifest_slot(name: &RepoName, reference: &Reference) -> usize {
    let key = match reference {
        Reference::Tag(t) => hash(&[name.as_str(), t.as_str()]),
        Reference::Digest(d) => hash_with(name, d),
    };
    (key % MANIFEST_SLOTS as u64) as usize
}

impl Cache {
    /// Maps the namespace generation if there is one yet (at start, and now and then until a
    /// control plane has created it).
    pub fn watch_generation(&mut self, layout: &Layout) {
        if self.generation.is_none() {
            match layout.generation() {
                Ok(g) => self.generation = g,
                Err(e) => tracing::debug!("cannot map the namespace generation: {e}"),
            }
        }
    }

    fn generation_now(&self) -> Option<u64> {
        self.generation.as_ref().map(Generation::current)
    }

    /// Opens a blob of the repository: no system call when the file is cached and the link was
    /// checked at the current generation; one `statx` for the link otherwise.
    pub fn blob(
        &mut self,
        layout: &Layout,
        name: &RepoName,
        digest: &Digest,
        now: Instant,
    ) -> io::Result<Option<(Rc<File>, u64)>> {
        // Before the check: a removal the check misses bumps the generation after this.
        let generation = self.generation_now();
        let key = (hash_with(name, digest) % LINK_SLOTS as u64) as usize;
        let known = self.links[key].as_ref().is_some_and(|s| {
            s.checked.still(generation, now) && &s.digest == digest && &s.name == name
        });
        if !known {
            if !layout.blob_linked(name, digest)? {
                return Ok(None);
            }
            if let Some(generation) = generation {
                self.links[key] = Some(LinkSlot {
                    name: name.clone(),
                    digest: digest.clone(),
                    checked: Checked {
                        generation,
                        at: now,
                    },
                });
            }
        }
        self.content(layout, digest)
    }

    /// Whether a pull of blob `digest` of `name` should be recorded on disk now: not if this
    /// core recorded one within `every`. Without this, every cached pull of a mirror's or the
    /// bucket's blob built the link's path and `lstat`ed it.
    pub fn record_pull(
        &mut self,
        name: &RepoName,
        digest: &Digest,
        now: Instant,
        every: Duration,
    ) -> bool {
        let h = hash_with(name, digest);
        let slot = &mut self.pulls[(h % LINK_SLOTS as u64) as usize];
        if slot.0 == h
            && slot
                .1
                .is_some_and(|at| now.saturating_duration_since(at) < every)
        {
            return false;
        }
        *slot = (h, Some(now));
        true
    }

    /// Opens content by digest through the cache.
    pub fn content(
        &mut self,
        layout: &Layout,
        digest: &Digest,
    ) -> io::Result<Option<(Rc<File>, u64)>> {
        Ok(self
            .content_slot(layout, digest)?
            .and_then(|i| self.blobs[i].as_ref().map(|s| (s.file.clone(), s.len))))
    }

    /// Opens a manifest's content by digest through the cache, with its bytes when it is small
    /// enough to keep in memory (read on the first call, then kept while the slot lasts and
    /// the core's budget allows).
    pub fn manifest_content(
        &mut self,
        layout: &Layout,
        digest: &Digest,
    ) -> io::Result<Option<OpenManifest>> {
        use std::os::unix::fs::FileExt;
        let Some(i) = self.content_slot(layout, digest)? else {
            return Ok(None);
        };
        let budget = INLINE_BUDGET_BYTES - self.inline_bytes;
        let Some(s) = self.blobs[i].as_mut() else {
            return Ok(None);
        };
        if s.bytes.is_none() && s.len <= INLINE_MAX_BYTES && s.len as usize <= budget {
            let mut bytes = vec![0u8; s.len as usize];
            // A read that fails leaves the manifest to sendfile, which reports it.
            if s.file.read_exact_at(&mut bytes, 0).is_ok() {
                self.inline_bytes += bytes.len();
                s.bytes = Some(bytes.into());
            }
        }
        Ok(Some((s.file.clone(), s.len, s.bytes.clone())))
    }

    /// The slot holding `digest`'s open content, opened into it if need be.
    fn content_slot(&mut self, layout: &Layout, digest: &Digest) -> io::Result<Option<usize>> {
        let i = (digest_key(digest) % BLOB_SLOTS as u64) as usize;
        if self.blobs[i].as_ref().is_some_and(|s| &s.digest == digest) {
            return Ok(Some(i));
        }
        let Some((file, len)) = layout.open_content(digest)? else {
            return Ok(None);
        };
        self.clear_slot(i);
        self.blobs[i] = Some(BlobSlot {
            digest: digest.clone(),
            file: Rc::new(file),
            len,
            bytes: None,
        });
        Ok(Some(i))
    }

    fn clear_slot(&mut self, i: usize) {
        if let Some(s) = self.blobs[i].take() {
            self.inline_bytes -= s.bytes.map_or(0, |b| b.len());
        }
    }

    /// Forgets open files whose content was removed (evicted by the pull-through cache, or
    /// deleted), so their disk space returns now rather than when the slot is next reused. One
    /// `fstat` per cached file; called every few seconds. Returns how many were dropped.
    pub fn drop_removed(&mut self) -> usize {
        use std::os::unix::fs::MetadataExt;
        let mut dropped = 0;
        for i in 0..self.blobs.len() {
            let removed = self.blobs[i]
                .as_ref()
                .is_some_and(|s| s.file.metadata().is_ok_and(|m| m.nlink() == 0));
            if removed {
                self.clear_slot(i);
                dropped += 1;
            }
        }
        dropped
    }

    /// Resolves a manifest reference: no system call when cached and checked at the current
    /// generation, one `statx` when cached otherwise. Also returns when the tag (or link) was
    /// last written, for mirrors' tag TTLs.
    pub fn manifest(
        &mut self,
        layout: &Layout,
        name: &RepoName,
        reference: &Reference,
        now: Instant,
    ) -> io::Result<Option<(ManifestEntry, FileId)>> {
        // Before the check: a change the check misses bumps the generation after this.
        let generation = self.generation_now();
        let slot = &mut self.manifests[manifest_slot(name, reference)];
        if let Some(s) = slot {
            let known = s.checked.is_some_and(|c| c.still(generation, now));
            if known && &s.name == name && &s.reference == reference {
                return Ok(Some((s.entry.clone(), s.id)));
            }
        }
        let Some(id) = layout.manifest_ref_id(name, reference)? else {
            return Ok(None);
        };
        let checked = generation.map(|generation| Checked {
            generation,
            at: now,
        });
        if let Some(s) = slot {
            if s.id == id && &s.name == name && &s.reference == reference {
                s.checked = checked;
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
            checked,
            handed_over: None,
        });
        Ok(Some((entry, id)))
    }

    /// Whether a pull of `reference`, cached but older than its TTL, goes to the control plane
    /// (which refreshes it from upstream or the bucket) or is answered from the cache: the first
    /// goes, then none for `grace`, so a refresh costs one handoff per core instead of one per
    /// pull arriving while upstream answers. A refresh rewrites the tag, which replaces the slot.
    pub fn stale_handoff(
        &mut self,
        name: &RepoName,
        reference: &Reference,
        now: Instant,
        grace: Duration,
    ) -> bool {
        match &mut self.manifests[manifest_slot(name, reference)] {
            Some(s) if &s.name == name && &s.reference == reference => {
                if s.handed_over
                    .is_some_and(|at| now.saturating_duration_since(at) < grace)
                {
                    return false;
                }
                s.handed_over = Some(now);
                true
            }
            _ => true,
        }
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

    #[test]
    fn small_manifests_are_kept_in_memory_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::of(lighter_layout::Algorithm::Sha256, bytes);
            layout.put_content(&d, bytes).unwrap();
            d
        };
        let small = put(b"{\"schemaVersion\":2}");
        let big = put(&vec![b' '; INLINE_MAX_BYTES as usize + 1]);
        let mut cache = Cache::default();
        let (_, len, bytes) = cache.manifest_content(&layout, &small).unwrap().unwrap();
        assert_eq!(len, 19);
        assert_eq!(bytes.as_deref(), Some(&b"{\"schemaVersion\":2}"[..]));
        let (_, len, bytes) = cache.manifest_content(&layout, &big).unwrap().unwrap();
        assert_eq!(
            (len, bytes),
            (INLINE_MAX_BYTES + 1, None),
            "too big: sendfile"
        );
        assert_eq!(cache.inline_bytes, 19);
        // Kept: the second call reads nothing (the file's bytes are the cached ones).
        let a = cache.manifest_content(&layout, &small).unwrap().unwrap().2;
        let b = cache.manifest_content(&layout, &small).unwrap().unwrap().2;
        assert!(Rc::ptr_eq(a.as_ref().unwrap(), b.as_ref().unwrap()));
        // The budget: manifests past it are sent from their files.
        let mut n = 0;
        while cache.inline_bytes + INLINE_MAX_BYTES as usize <= INLINE_BUDGET_BYTES {
            let d = put(format!("{n:016384}").as_bytes());
            assert!(cache
                .manifest_content(&layout, &d)
                .unwrap()
                .unwrap()
                .2
                .is_some());
            n += 1;
            assert!(n < 2 * BLOB_SLOTS, "the budget holds {n} manifests");
        }
        for m in n..n + 8 {
            let d = put(format!("{m:016384}").as_bytes());
            assert!(cache.manifest_content(&layout, &d).unwrap().is_some());
            assert!(cache.inline_bytes <= INLINE_BUDGET_BYTES);
        }
        // A removed manifest's bytes leave the budget with its slot.
        std::fs::remove_file(layout.blob_path(&small)).unwrap();
        let before = cache.inline_bytes;
        cache.drop_removed();
        assert_eq!(cache.inline_bytes, before - 19);
    }

    #[test]
    fn checked_answers_are_reused_until_the_generation_moves_or_they_age() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let reader = Layout::open(dir.path());
        let name = RepoName::parse("team/app").unwrap();
        let other = RepoName::parse("team/other").unwrap();
        let d = Digest::of(lighter_layout::Algorithm::Sha256, b"layer");
        layout.put_content(&d, b"layer").unwrap();
        layout.link_blob(&name, &d).unwrap();
        layout.link_blob(&other, &d).unwrap();
        let mut cache = Cache::default();
        cache.watch_generation(&reader);
        let t0 = Instant::now();
        assert!(cache.blob(&reader, &name, &d, t0).unwrap().is_some());
        assert!(cache.blob(&reader, &other, &d, t0).unwrap().is_some());

        // Removed behind the control plane's back (no bump): still served from memory until
        // the answer ages, then checked again.
        std::fs::remove_file(layout.blob_link_path(&other, &d)).unwrap();
        assert!(cache.blob(&reader, &other, &d, t0).unwrap().is_some());
        let later = t0 + REVALIDATE_AFTER;
        assert!(cache.blob(&reader, &other, &d, later).unwrap().is_none());

        // Removed by the writer: the bump makes the very next request check.
        assert!(layout.delete_blob(&name, &d).unwrap());
        assert!(cache.blob(&reader, &name, &d, t0).unwrap().is_none());
        layout.link_blob(&name, &d).unwrap();
        assert!(cache.blob(&reader, &name, &d, t0).unwrap().is_some());

        // A tag moved by the writer is seen at once.
        let tag = lighter_layout::Tag::parse("v1").unwrap();
        let entry = |digest: &Digest| ManifestEntry {
            digest: digest.clone(),
            media_type: lighter_layout::inline::InlineStr::new(
                "application/vnd.oci.image.manifest.v1+json",
            )
            .unwrap(),
        };
        let m1 = Digest::of(lighter_layout::Algorithm::Sha256, b"m1");
        let m2 = Digest::of(lighter_layout::Algorithm::Sha256, b"m2");
        layout.put_tag(&name, &tag, &entry(&m1)).unwrap();
        let reference = Reference::Tag(tag.clone());
        let got = |c: &mut Cache| {
            c.manifest(&reader, &name, &reference, t0)
                .unwrap()
                .unwrap()
                .0
        };
        assert_eq!(got(&mut cache).digest, m1);
        assert_eq!(got(&mut cache).digest, m1, "from memory");
        layout.put_tag(&name, &tag, &entry(&m2)).unwrap();
        assert_eq!(got(&mut cache).digest, m2);
        assert!(layout.delete_tag(&name, &tag).unwrap());
        assert!(cache
            .manifest(&reader, &name, &reference, t0)
            .unwrap()
            .is_none());
    }
}
