//! The tree drawn in the crate documentation, as paths: every path under the data directory is
//! built here and nowhere else (reads, ingests and publishing ask for theirs). A backend that
//! keeps objects elsewhere would map the same names to its own keys.

use std::path::{Path, PathBuf};

use super::Layout;
use crate::digest::{Algorithm, Digest};
use crate::name::{RepoName, Tag};
use crate::route::UploadId;

/// In `repos/<name>/`: the blobs the repository holds (`<alg>/<hex>`, empty files).
pub(super) const BLOB_LINKS: &str = "_blobs";
/// In `repos/<name>/`: the manifests the repository holds (`<alg>/<hex>`, their media type).
pub(super) const MANIFEST_LINKS: &str = "_manifests";
/// In `repos/<name>/`: the tags.
pub(super) const TAGS: &str = "_tags";

impl Layout {
    /// The top-level directories a writer creates.
    pub(super) fn top_dirs(&self) -> [PathBuf; 4] {
        ["blobs", "repos", "uploads", "tmp"].map(|dir| self.root.join(dir))
    }

    /// `auth/token-key.pem`: the key that signs the registry's access tokens when none is
    /// configured (private: mode 0600).
    pub fn token_key_path(&self) -> PathBuf {
        self.root.join("auth").join("token-key.pem")
    }

    /// `run/events/`: the data plane cores' event rings.
    pub fn event_rings_dir(&self) -> PathBuf {
        self.root.join("run").join("events")
    }

    /// `run/events/core-<n>.ring`
    pub fn event_ring_path(&self, core: usize) -> PathBuf {
        self.event_rings_dir().join(format!("core-{core}.ring"))
    }

    /// `run/generation`: the namespace generation ([`super::Generation`]).
    pub fn generation_path(&self) -> PathBuf {
        self.root.join("run").join("generation")
    }

    /// `events/`: the event log's files.
    pub fn event_log_dir(&self) -> PathBuf {
        self.root.join("events")
    }

    /// `inventory.json`: the workloads the admission webhook has seen and the images they
    /// run, rewritten whole by the publish protocol.
    pub fn inventory_path(&self) -> PathBuf {
        self.root.join("inventory.json")
    }

    /// `notifications/`: the notification queue's segments (`<seq>.jsonl`) and, under
    /// `cursors/`, how far each endpoint has received.
    pub fn notifications_dir(&self) -> PathBuf {
        self.root.join("notifications")
    }

    /// `events/usage.json`: the usage summed from the event log, and how far into the log.
    pub fn usage_path(&self) -> PathBuf {
        self.event_log_dir().join("usage.json")
    }

    /// `blobs/<alg>/`
    pub(super) fn blobs_dir(&self, algorithm: Algorithm) -> PathBuf {
        self.root.join("blobs").join(algorithm.name())
    }

    /// `blobs/<alg>/<first two hex>/<hex>`
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs_dir(digest.algorithm()).join(&hex[..2]).join(hex)
    }

    /// `repos/`
    pub(super) fn repos_dir(&self) -> PathBuf {
        self.root.join("repos")
    }

    /// `repos/<name>/`
    pub(super) fn repo_dir(&self, name: &RepoName) -> PathBuf {
        self.repos_dir().join(name.as_str())
    }

    /// The directories whose presence makes `repos/<name>/` a repository.
    pub(super) fn repo_item_dirs(&self, name: &RepoName) -> [PathBuf; 3] {
        let dir = self.repo_dir(name);
        [MANIFEST_LINKS, BLOB_LINKS, TAGS].map(|kind| dir.join(kind))
    }

    /// `repos/<name>/<kind>/<alg>/`: the links of one kind ([`BLOB_LINKS`], [`MANIFEST_LINKS`]).
    pub(super) fn links_dir(&self, name: &RepoName, kind: &str, algorithm: Algorithm) -> PathBuf {
        self.repo_dir(name).join(kind).join(algorithm.name())
    }

    /// `repos/<name>/_blobs/<alg>/<hex>`: empty; its presence puts the blob in the repository.
    pub fn blob_link_path(&self, name: &RepoName, digest: &Digest) -> PathBuf {
        self.links_dir(name, BLOB_LINKS, digest.algorithm())
            .join(digest.hex())
    }

    /// `repos/<name>/_manifests/<alg>/<hex>`: holds the manifest's media type.
    pub fn manifest_link_path(&self, name: &RepoName, digest: &Digest) -> PathBuf {
        self.links_dir(name, MANIFEST_LINKS, digest.algorithm())
            .join(digest.hex())
    }

    /// `repos/<name>/_tags/`
    pub(super) fn tags_dir(&self, name: &RepoName) -> PathBuf {
        self.repo_dir(name).join(TAGS)
    }

    /// `repos/<name>/_tags/<tag>`: holds `<digest> <media type>\n`.
    pub fn tag_path(&self, name: &RepoName, tag: &Tag) -> PathBuf {
        self.tags_dir(name).join(tag.as_str())
    }

    /// `repos/<name>/_referrers/<alg>/<subject hex>/`
    pub(super) fn referrers_dir(&self, name: &RepoName, subject: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_referrers")
            .join(subject.algorithm().name())
            .join(subject.hex())
    }

    /// `repos/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>`: the referrer's descriptor (JSON).
    pub(super) fn referrer_path(
        &self,
        name: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> PathBuf {
        self.referrers_dir(name, subject).join(format!(
            "{}-{}",
            referrer.algorithm().name(),
            referrer.hex()
        ))
    }

    /// `uploads/`
    pub(super) fn uploads_dir(&self) -> PathBuf {
        self.root.join("uploads")
    }

    /// `uploads/<id>/`: one upload session or download (an ingest).
    pub(super) fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.uploads_dir().join(id.as_str())
    }

    /// `uploads/<id>/data`: the bytes received so far.
    pub(super) fn upload_data_path(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("data")
    }

    /// `uploads/<id>/repo`: `<name>\n<alg>\n`.
    pub(super) fn upload_meta_path(&self, id: &UploadId) -> PathBuf {
        self.upload_dir(id).join("repo")
    }

    /// `tmp/`
    pub(super) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// `tmp/<random id>`: a temp file of the publish protocol.
    pub(super) fn tmp_file_path(&self, id: &UploadId) -> PathBuf {
        self.tmp_dir().join(id.as_str())
    }

    // Without allocating, for the read path: the same paths pushed onto a reused buffer.

    /// Runs `f` on a path under the root built by `build` in a per-thread buffer: the read path
    /// builds paths without allocating. Not reentrant (reads do not nest).
    pub(super) fn with_path<R>(
        &self,
        build: impl FnOnce(&mut PathBuf),
        f: impl FnOnce(&Path) -> R,
    ) -> R {
        thread_local! {
            static SCRATCH: std::cell::RefCell<PathBuf> = std::cell::RefCell::new(PathBuf::with_capacity(1024));
        }
        SCRATCH.with(|cell| {
            let mut p = cell.borrow_mut();
            p.as_mut_os_string().clear();
            p.push(&self.root);
            build(&mut p);
            f(&p)
        })
    }

    /// `blobs/<alg>/<first two hex>/<hex>`, as [`Layout::blob_path`].
    pub(super) fn push_blob(p: &mut PathBuf, digest: &Digest) {
        let hex = digest.hex();
        p.push("blobs");
        p.push(digest.algorithm().name());
        p.push(&hex[..2]);
        p.push(hex);
    }

    /// `repos/<name>/<kind>/<alg>/<hex>`, as [`Layout::blob_link_path`] and
    /// [`Layout::manifest_link_path`].
    pub(super) fn push_repo_item(p: &mut PathBuf, name: &RepoName, kind: &str, digest: &Digest) {
        p.push("repos");
        p.push(name.as_str());
        p.push(kind);
        p.push(digest.algorithm().name());
        p.push(digest.hex());
    }

    /// `repos/<name>/_tags/<tag>`, as [`Layout::tag_path`].
    pub(super) fn push_tag(p: &mut PathBuf, name: &RepoName, tag: &Tag) {
        p.push("repos");
        p.push(name.as_str());
        p.push(TAGS);
        p.push(tag.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_path_pushes_the_same_paths_the_builders_build() {
        let l = Layout::open("/data");
        let name = RepoName::parse("team/app").unwrap();
        let tag = Tag::parse("v1").unwrap();
        for d in [
            Digest::of(Algorithm::Sha256, b"x"),
            Digest::of(Algorithm::Sha512, b"x"),
        ] {
            let pushed = |push: &dyn Fn(&mut PathBuf)| l.with_path(push, Path::to_path_buf);
            assert_eq!(pushed(&|p| Layout::push_blob(p, &d)), l.blob_path(&d));
            assert_eq!(
                pushed(&|p| Layout::push_repo_item(p, &name, BLOB_LINKS, &d)),
                l.blob_link_path(&name, &d)
            );
            assert_eq!(
                pushed(&|p| Layout::push_repo_item(p, &name, MANIFEST_LINKS, &d)),
                l.manifest_link_path(&name, &d)
            );
        }
        let pushed = l.with_path(|p| Layout::push_tag(p, &name, &tag), Path::to_path_buf);
        assert_eq!(pushed, l.tag_path(&name, &tag));
        assert_eq!(pushed, Path::new("/data/repos/team/app/_tags/v1"));
    }
}
