//! Publishing: every file under the data directory appears by the publish protocol (temp
//! file in `tmp/`, fsync, rename, fsync the directory) and leaves by a synced removal. Here
//! are [`Layout::commit`], the one way an ingest becomes a blob, and every other write:
//! content, links, tags, referrers, the token key, the workload inventory, and their deletion.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use super::ingest::{hash_reader, Ingest};
use super::{exists, Layout, ManifestEntry};
use crate::digest::Digest;
use crate::name::{RepoName, Tag};
use crate::route::UploadId;

/// Why a commit refused to publish an ingest.
#[derive(Debug)]
pub enum CommitError {
    /// The bytes do not hash to the expected digest; nothing was published.
    DigestMismatch {
        /// Boxed: digests are stored inline, and errors should stay small.
        computed: Box<Digest>,
    },
    Io(io::Error),
}

impl From<io::Error> for CommitError {
    fn from(e: io::Error) -> Self {
        CommitError::Io(e)
    }
}

impl Layout {
    /// Verifies the ingest against `expected` and publishes it: fsync, rename into `blobs/`,
    /// fsync the directory, link it into the session's repository. On a mismatch nothing becomes
    /// visible and the session is dropped.
    pub fn commit(&self, ingest: Ingest, expected: &Digest) -> Result<(), CommitError> {
        let Ingest {
            id,
            name,
            mut file,
            hasher,
            ..
        } = ingest;
        let computed = if hasher.algorithm() == expected.algorithm() {
            hasher.finish()
        } else {
            file.seek(SeekFrom::Start(0))?;
            let mut h = expected.algorithm().hasher();
            hash_reader(&mut file, &mut h)?;
            h.finish()
        };
        if &computed != expected {
            drop(file);
            self.remove_ingest(&id)?;
            return Err(CommitError::DigestMismatch {
                computed: Box::new(computed),
            });
        }
        let dest = self.blob_path(expected);
        if exists(&dest)? {
            drop(file);
        } else {
            file.sync_all()?;
            drop(file);
            self.ensure_dir(dest.parent().expect("blob path has a parent"))?;
            fs::rename(self.upload_data_path(&id), &dest)?;
            sync_dir(dest.parent().expect("blob path has a parent"))?;
        }
        self.link_blob(&name, expected)?;
        self.remove_ingest(&id)?;
        Ok(())
    }

    /// Publishes small content (a manifest) by digest; the caller computed the digest from these
    /// very bytes.
    pub fn put_content(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        debug_assert_eq!(&Digest::of(digest.algorithm(), bytes), digest);
        let dest = self.blob_path(digest);
        if exists(&dest)? {
            return Ok(());
        }
        self.publish(&dest, bytes)
    }

    /// Makes published content visible in a repository (a push or a mount).
    pub fn link_blob(&self, name: &RepoName, digest: &Digest) -> io::Result<()> {
        let link = self.blob_link_path(name, digest);
        if exists(&link)? {
            return Ok(());
        }
        self.publish(&link, b"")
    }

    /// Records that the repository holds the manifest, with its media type. The content must be
    /// published first ([`Layout::put_content`]).
    pub fn link_manifest(
        &self,
        name: &RepoName,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        debug_assert!(!media_type.contains(['\n', ' ']));
        self.publish(
            &self.manifest_link_path(name, digest),
            format!("{media_type}\n").as_bytes(),
        )
    }

    /// Points a tag at a manifest, atomically replacing what it pointed at.
    pub fn put_tag(&self, name: &RepoName, tag: &Tag, entry: &ManifestEntry) -> io::Result<()> {
        let put = self.publish(
            &self.tag_path(name, tag),
            format!("{} {}\n", entry.digest, entry.media_type).as_bytes(),
        );
        self.changed();
        put
    }

    /// Records `descriptor` (JSON) as a referrer of `subject` in the repository.
    pub fn put_referrer(
        &self,
        name: &RepoName,
        subject: &Digest,
        referrer: &Digest,
        descriptor: &[u8],
    ) -> io::Result<()> {
        self.publish(&self.referrer_path(name, subject, referrer), descriptor)
    }

    /// Replaces the workload inventory ([`Layout::inventory_path`]) with `bytes`, atomically.
    pub fn put_inventory(&self, bytes: &[u8]) -> io::Result<()> {
        self.publish(&self.inventory_path(), bytes)
    }

    // ---- deletes ------------------------------------------------------------------------------

    /// Removes a tag. False if there was none.
    pub fn delete_tag(&self, name: &RepoName, tag: &Tag) -> io::Result<bool> {
        self.removed(remove_synced(&self.tag_path(name, tag)))
    }

    /// Removes a manifest from the repository, and first every tag pointing at it, so no tag ever
    /// points at a missing manifest. False if the repository did not hold it.
    pub fn delete_manifest(&self, name: &RepoName, digest: &Digest) -> io::Result<bool> {
        for tag in self.tags_of(name, digest)? {
            self.removed(remove_synced(&self.tag_path(name, &tag)))?;
        }
        self.removed(remove_synced(&self.manifest_link_path(name, digest)))
    }

    /// Removes a referrer record.
    pub fn delete_referrer(
        &self,
        name: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> io::Result<bool> {
        self.removed(remove_synced(&self.referrer_path(name, subject, referrer)))
    }

    /// Removes a blob from the repository (its content stays for other repositories).
    pub fn delete_blob(&self, name: &RepoName, digest: &Digest) -> io::Result<bool> {
        self.removed(remove_synced(&self.blob_link_path(name, digest)))
    }

    /// Removes published content (eviction). Repositories must have been unlinked first.
    pub fn delete_content(&self, digest: &Digest) -> io::Result<bool> {
        self.removed(remove_synced(&self.blob_path(digest)))
    }

    /// Bumps the generation after a removal (whatever its outcome: a failed one may have
    /// removed the file before failing to sync).
    fn removed(&self, r: io::Result<bool>) -> io::Result<bool> {
        self.changed();
        r
    }

    // ---- the publish protocol -----------------------------------------------------------------

    /// Writes `bytes` to `dest` so that a reader sees the old file or the whole new one, never a
    /// part, and so that it survives a crash once this returns: temp file, fsync, rename, fsync dir.
    fn publish(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        self.publish_with_mode(dest, bytes, 0o666)
    }

    /// [`Layout::publish`] with the new file's mode (before the umask).
    fn publish_with_mode(&self, dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.tmp_file_path(&UploadId::random()?);
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            let parent = dest.parent().expect("published paths have a parent");
            self.ensure_dir(parent)?;
            fs::rename(&tmp, dest)?;
            sync_dir(parent)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Publishes the usage summary ([`Layout::usage_path`]), replacing the previous one whole.
    pub fn put_usage(&self, bytes: &[u8]) -> io::Result<()> {
        self.publish(&self.usage_path(), bytes)
    }

    /// Publishes the token signing key ([`Layout::token_key_path`]) unless one is there; the
    /// key in place afterwards.
    pub fn create_token_key(&self, pem: &[u8]) -> io::Result<Vec<u8>> {
        let dest = self.token_key_path();
        if let Ok(existing) = fs::read(&dest) {
            return Ok(existing);
        }
        self.publish_with_mode(&dest, pem, 0o600)?;
        Ok(pem.to_vec())
    }

    /// `mkdir -p` that fsyncs each parent it adds an entry to, so new directories survive a crash.
    pub(super) fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.as_os_str().is_empty() || exists(dir)? {
            return Ok(());
        }
        let Some(parent) = dir.parent() else {
            return Ok(()); // the filesystem root
        };
        self.ensure_dir(parent)?;
        match fs::create_dir(dir) {
            Ok(()) => sync_dir(parent),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_synced(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path.parent().expect("data paths have a parent"))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::scratch;
    use super::*;
    use crate::digest::Algorithm;

    #[test]
    fn committed_blob_is_visible_only_in_its_repository() {
        let (_d, l) = scratch();
        let a = RepoName::parse("a").unwrap();
        let b = RepoName::parse("b").unwrap();
        let mut ingest = l
            .create_ingest(&a, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(b"hello").unwrap();
        let digest = Digest::of(Algorithm::Sha256, b"hello");
        l.commit(ingest, &digest).unwrap();
        assert_eq!(l.blob_size(&a, &digest).unwrap(), Some(5));
        assert_eq!(l.blob_size(&b, &digest).unwrap(), None);
        assert_eq!(fs::read(l.blob_path(&digest)).unwrap(), b"hello");
        assert_eq!(fs::read_dir(l.root().join("uploads")).unwrap().count(), 0);
    }

    #[test]
    fn commit_with_wrong_digest_publishes_nothing() {
        let (_d, l) = scratch();
        let a = RepoName::parse("a").unwrap();
        let mut ingest = l
            .create_ingest(&a, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(b"hello").unwrap();
        let wrong = Digest::of(Algorithm::Sha256, b"other");
        assert!(matches!(
            l.commit(ingest, &wrong),
            Err(CommitError::DigestMismatch { .. })
        ));
        assert!(!l.content_exists(&wrong).unwrap());
        assert_eq!(l.blob_size(&a, &wrong).unwrap(), None);
    }

    #[test]
    fn commit_rehashes_when_the_algorithm_differs() {
        let (_d, l) = scratch();
        let a = RepoName::parse("a").unwrap();
        let mut ingest = l
            .create_ingest(&a, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(b"hello").unwrap();
        let d512 = Digest::of(Algorithm::Sha512, b"hello");
        l.commit(ingest, &d512).unwrap();
        assert_eq!(l.blob_size(&a, &d512).unwrap(), Some(5));
    }
}
