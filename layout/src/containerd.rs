//! containerd's content store, read-only: the node tier serves blobs a node's containerd already
//! holds from there instead of keeping a second copy. containerd writes a blob under `ingest/`
//! and renames it to `blobs/<alg>/<hex>` once its digest is verified, so a file there is
//! complete. containerd may remove it at any time (its own garbage collection): callers treat
//! a missing file as a miss.
//!
//! ```text
//! <containerd_content_dir>/            e.g. /var/lib/containerd/io.containerd.content.v1.content
//! ├── blobs/<alg>/<hex>                complete, verified content
//! └── ingest/                          downloads in progress (never read)
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::Digest;

#[derive(Clone, Debug)]
pub struct ContainerdContent {
    root: PathBuf,
}

impl ContainerdContent {
    pub fn new(root: impl Into<PathBuf>) -> ContainerdContent {
        ContainerdContent { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `blobs/<alg>/<hex>`: a digest is validated lowercase hex, so this stays under the root.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Opens a blob containerd holds: the file and its length.
    pub fn open(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The size of a blob containerd holds.
    pub fn size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.blob_path(digest)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_found_by_digest_and_ingests_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContainerdContent::new(dir.path());
        let d = Digest::of(crate::Algorithm::Sha256, b"layer");
        assert!(store.open(&d).unwrap().is_none());
        std::fs::create_dir_all(dir.path().join("ingest").join("x")).unwrap();
        std::fs::write(dir.path().join("ingest").join("x").join("data"), b"lay").unwrap();
        assert!(store.size(&d).unwrap().is_none());
        std::fs::create_dir_all(dir.path().join("blobs").join("sha256")).unwrap();
        std::fs::write(store.blob_path(&d), b"layer").unwrap();
        assert_eq!(store.size(&d).unwrap(), Some(5));
        assert_eq!(store.open(&d).unwrap().unwrap().1, 5);
        assert!(store
            .blob_path(&d)
            .ends_with(format!("blobs/sha256/{}", d.hex())));
    }
}
