//! The data directory: the one place that maps objects to paths and writes files. See the crate
//! documentation for the tree and the publish protocol.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::inline::InlineStr;
use crate::name::{RepoName, Tag};
use crate::route::UploadId;

/// Depth bound for walking `repos/` (a name has at most 128 components of 2 characters).
const REPO_DEPTH_MAX: usize = 128;

/// Longest media type stored (`type/subtype`, 127 characters each).
pub const MEDIA_TYPE_LENGTH_MAX: usize = 255;

/// A manifest as a reader needs it: its digest and the media type to send as `Content-Type`.
/// Inline strings: resolving a manifest allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub digest: Digest,
    pub media_type: InlineStr<MEDIA_TYPE_LENGTH_MAX>,
}

/// A blob's presence in a repository, and when it was last pulled from there (the link's
/// modification time: set when linked, refreshed by the data plane on pulls of mirrored blobs).
#[derive(Clone, Debug)]
pub struct BlobLink {
    pub repo: RepoName,
    pub digest: Digest,
    pub last_pulled: std::time::SystemTime,
}

/// Identity of a small metadata file (a tag, a manifest link) as it is now: publishing replaces
/// the file (a new inode, new times), so an unchanged identity means unchanged content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileId {
    fn of(m: &fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    /// When the file was last written.
    pub fn modified(&self) -> std::time::SystemTime {
        let ns = self.mtime_ns.max(0) as u128;
        std::time::UNIX_EPOCH
            + std::time::Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
    }
}

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

/// A handle on a data directory. Cheap to clone; holds no open files.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A handle for reading. Creates nothing and changes nothing.
    pub fn open(root: impl Into<PathBuf>) -> Layout {
        let root = root.into();
        // Absolute, so every path built under it has a parent (`data` works like `./data`).
        let root = std::path::absolute(&root).unwrap_or(root);
        Layout { root }
    }

    /// A handle for the single writer (the control plane): creates the top-level directories and
    /// removes temp files left by a crash. Upload sessions are kept: they can be resumed.
    pub fn open_writer(root: impl Into<PathBuf>) -> io::Result<Layout> {
        let layout = Layout::open(root);
        for dir in ["blobs", "repos", "uploads", "tmp"] {
            layout.ensure_dir(&layout.root.join(dir))?;
        }
        for entry in fs::read_dir(layout.tmp_dir())? {
            let entry = entry?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    // ---- paths: the only code that builds them ------------------------------------------------

    /// `auth/token-key.pem`: the key that signs the registry's access tokens when none is
    /// configured (private: mode 0600).
    pub fn token_key_path(&self) -> PathBuf {
        self.root.join("auth").join("token-key.pem")
    }

    /// `blobs/<alg>/<first two hex>/<hex>`
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(&hex[..2])
            .join(hex)
    }

    fn repo_dir(&self, name: &RepoName) -> PathBuf {
        self.root.join("repos").join(name.as_str())
    }

    /// `repos/<name>/_blobs/<alg>/<hex>`: empty; its presence puts the blob in the repository.
    pub fn blob_link_path(&self, name: &RepoName, digest: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// `repos/<name>/_manifests/<alg>/<hex>`: holds the manifest's media type.
    pub fn manifest_link_path(&self, name: &RepoName, digest: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_manifests")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn tags_dir(&self, name: &RepoName) -> PathBuf {
        self.repo_dir(name).join("_tags")
    }

    /// `repos/<name>/_tags/<tag>`: holds `<digest> <media type>\n`.
    pub fn tag_path(&self, name: &RepoName, tag: &Tag) -> PathBuf {
        self.tags_dir(name).join(tag.as_str())
    }

    fn referrers_dir(&self, name: &RepoName, subject: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_referrers")
            .join(subject.algorithm().name())
            .join(subject.hex())
    }

    /// `repos/<name>/_referrers/<alg>/<subject hex>/<alg>-<hex>`: the referrer's descriptor (JSON).
    fn referrer_path(&self, name: &RepoName, subject: &Digest, referrer: &Digest) -> PathBuf {
        self.referrers_dir(name, subject).join(format!(
            "{}-{}",
            referrer.algorithm().name(),
            referrer.hex()
        ))
    }

    fn upload_dir(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    // ---- reads --------------------------------------------------------------------------------

    /// Runs `f` on a path under the root built by `build` in a per-thread buffer: the read path
    /// builds paths without allocating. Not reentrant (reads do not nest).
    fn with_path<R>(&self, build: impl FnOnce(&mut PathBuf), f: impl FnOnce(&Path) -> R) -> R {
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

    fn push_blob(p: &mut PathBuf, digest: &Digest) {
        let hex = digest.hex();
        p.push("blobs");
        p.push(digest.algorithm().name());
        p.push(&hex[..2]);
        p.push(hex);
    }

    fn push_repo_item(p: &mut PathBuf, name: &RepoName, kind: &str, digest: &Digest) {
        p.push("repos");
        p.push(name.as_str());
        p.push(kind);
        p.push(digest.algorithm().name());
        p.push(digest.hex());
    }

    /// The identity of the file a manifest reference resolves through (the tag file, or the
    /// manifest link), without reading it: one `statx`. None if absent.
    pub fn manifest_ref_id(
        &self,
        name: &RepoName,
        reference: &crate::name::Reference,
    ) -> io::Result<Option<FileId>> {
        let meta = self.with_path(
            |p| match reference {
                crate::name::Reference::Tag(t) => {
                    p.push("repos");
                    p.push(name.as_str());
                    p.push("_tags");
                    p.push(t.as_str());
                }
                crate::name::Reference::Digest(d) => Self::push_repo_item(p, name, "_manifests", d),
            },
            |p| fs::metadata(p),
        );
        match meta {
            Ok(m) => Ok(Some(FileId::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the blob is in the repository (one `statx`).
    pub fn blob_linked(&self, name: &RepoName, digest: &Digest) -> io::Result<bool> {
        self.with_path(|p| Self::push_repo_item(p, name, "_blobs", digest), exists)
    }

    /// The size of a blob if it is in the repository.
    pub fn blob_size(&self, name: &RepoName, digest: &Digest) -> io::Result<Option<u64>> {
        if !self.blob_linked(name, digest)? {
            return Ok(None);
        }
        match self.with_path(|p| Self::push_blob(p, digest), |p| fs::metadata(p)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a blob of the repository: the file and its length.
    pub fn open_blob(&self, name: &RepoName, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        if !self.blob_linked(name, digest)? {
            return Ok(None);
        }
        self.open_content(digest)
    }

    /// Opens published content by digest, whatever repository holds it.
    pub fn open_content(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match self.with_path(|p| Self::push_blob(p, digest), |p| File::open(p)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads small published content (a manifest) whole.
    pub fn read_content(&self, digest: &Digest) -> io::Result<Option<Vec<u8>>> {
        let Some((file, len)) = self.open_content(digest)? else {
            return Ok(None);
        };
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Whether content is published at all (in any repository).
    pub fn content_exists(&self, digest: &Digest) -> io::Result<bool> {
        exists(&self.blob_path(digest))
    }

    /// The manifest a tag points at.
    pub fn tag(&self, name: &RepoName, tag: &Tag) -> io::Result<Option<ManifestEntry>> {
        let mut buf = [0u8; SMALL_FILE_MAX_BYTES];
        let read = self.with_path(
            |p| {
                p.push("repos");
                p.push(name.as_str());
                p.push("_tags");
                p.push(tag.as_str());
            },
            |p| read_small(p, &mut buf),
        )?;
        let Some(text) = read else {
            return Ok(None);
        };
        let (digest, media_type) = text
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| corrupt("tag"))?;
        let digest = Digest::parse(digest).map_err(|_| corrupt("tag"))?;
        let media_type = InlineStr::new(media_type).ok_or_else(|| corrupt("tag"))?;
        Ok(Some(ManifestEntry { digest, media_type }))
    }

    /// The manifest a tag points at and when the tag was last written (a mirror's tag is
    /// rewritten each time it is checked against upstream).
    pub fn tag_with_time(
        &self,
        name: &RepoName,
        tag: &Tag,
    ) -> io::Result<Option<(ManifestEntry, std::time::SystemTime)>> {
        let modified = match fs::metadata(self.tag_path(name, tag)) {
            Ok(m) => m.modified()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(self.tag(name, tag)?.map(|e| (e, modified)))
    }

    /// The manifest of that digest, if it is in the repository.
    pub fn manifest(&self, name: &RepoName, digest: &Digest) -> io::Result<Option<ManifestEntry>> {
        let mut buf = [0u8; SMALL_FILE_MAX_BYTES];
        let read = self.with_path(
            |p| Self::push_repo_item(p, name, "_manifests", digest),
            |p| read_small(p, &mut buf),
        )?;
        let Some(media_type) = read else {
            return Ok(None);
        };
        let media_type =
            InlineStr::new(media_type.trim_end()).ok_or_else(|| corrupt("manifest link"))?;
        Ok(Some(ManifestEntry {
            digest: digest.clone(),
            media_type,
        }))
    }

    /// Whether the repository exists (holds or held anything).
    pub fn repo_exists(&self, name: &RepoName) -> io::Result<bool> {
        let dir = self.repo_dir(name);
        Ok(exists(&dir.join("_manifests"))?
            || exists(&dir.join("_blobs"))?
            || exists(&dir.join("_tags"))?)
    }

    /// The repository's tags, sorted ("ASCIIbetical"), or None if the repository is unknown.
    pub fn tags(&self, name: &RepoName) -> io::Result<Option<Vec<String>>> {
        if !self.repo_exists(name)? {
            return Ok(None);
        }
        let mut tags = list_names(&self.tags_dir(name))?;
        tags.retain(|t| Tag::parse(t).is_ok());
        tags.sort();
        Ok(Some(tags))
    }

    /// The tags of the repository that point at `digest`.
    pub fn tags_of(&self, name: &RepoName, digest: &Digest) -> io::Result<Vec<Tag>> {
        let mut out = Vec::new();
        for t in self.tags(name)?.unwrap_or_default() {
            let tag = Tag::parse(&t).map_err(|_| corrupt("tag name"))?;
            if self.tag(name, &tag)?.is_some_and(|e| &e.digest == digest) {
                out.push(tag);
            }
        }
        Ok(out)
    }

    /// Every repository name, sorted.
    pub fn repositories(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let top = self.root.join("repos");
        walk_repos(&top, &top, 0, &mut out)?;
        out.sort();
        Ok(out)
    }

    /// Descriptors (JSON, as stored by [`Layout::put_referrer`]) of the manifests of the repository
    /// whose subject is `subject`, ordered by referrer digest.
    pub fn referrers(&self, name: &RepoName, subject: &Digest) -> io::Result<Vec<Vec<u8>>> {
        let dir = self.referrers_dir(name, subject);
        let mut names = list_names(&dir)?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if n.starts_with('.') {
                continue;
            }
            match fs::read(dir.join(&n)) {
                Ok(bytes) => out.push(bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every blob link of every repository (for cache accounting and eviction).
    pub fn blob_links(&self) -> io::Result<Vec<BlobLink>> {
        let mut out = Vec::new();
        for repo in self.repositories()? {
            let Ok(repo) = RepoName::parse(&repo) else {
                continue;
            };
            for (digest, path) in self.links(&repo, "_blobs")? {
                let Ok(meta) = fs::symlink_metadata(path) else {
                    continue;
                };
                out.push(BlobLink {
                    repo: repo.clone(),
                    digest,
                    last_pulled: meta.modified()?,
                });
            }
        }
        Ok(out)
    }

    /// The links of one kind (`_blobs`, `_manifests`) in a repository: digests and paths.
    fn links(&self, repo: &RepoName, kind: &str) -> io::Result<Vec<(Digest, PathBuf)>> {
        let mut out = Vec::new();
        for alg in Algorithm::ALL {
            let dir = self.repo_dir(repo).join(kind).join(alg.name());
            for hex in list_names(&dir)? {
                if let Ok(digest) = Digest::parse(&format!("{}:{hex}", alg.name())) {
                    out.push((digest, dir.join(hex)));
                }
            }
        }
        Ok(out)
    }

    /// Every digest some repository holds: its blob links and its manifest links (for garbage
    /// collection: content outside this set is reachable by no request).
    pub fn linked_digests(&self) -> io::Result<std::collections::HashSet<Digest>> {
        let mut out = std::collections::HashSet::new();
        for repo in self.repositories()? {
            let Ok(repo) = RepoName::parse(&repo) else {
                continue;
            };
            for kind in ["_blobs", "_manifests"] {
                out.extend(self.links(&repo, kind)?.into_iter().map(|(d, _)| d));
            }
        }
        Ok(out)
    }

    /// Every piece of published content with its size.
    pub fn contents(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for alg in Algorithm::ALL {
            let top = self.root.join("blobs").join(alg.name());
            for prefix in list_names(&top)? {
                for hex in list_names(&top.join(&prefix))? {
                    let Ok(d) = Digest::parse(&format!("{}:{hex}", alg.name())) else {
                        continue;
                    };
                    if !hex.starts_with(&prefix) {
                        continue;
                    }
                    if let Ok(meta) = fs::symlink_metadata(top.join(&prefix).join(&hex)) {
                        out.push((d, meta.len()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Size of published content, if present.
    pub fn content_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records a pull of a blob from a repository, at most once per `granularity` (the only
    /// metadata the data plane changes: the link's modification time).
    pub fn touch_blob_link(
        &self,
        name: &RepoName,
        digest: &Digest,
        granularity: std::time::Duration,
    ) -> io::Result<()> {
        let link = self.blob_link_path(name, digest);
        let modified = fs::symlink_metadata(&link)?.modified()?;
        if modified.elapsed().is_ok_and(|age| age < granularity) {
            return Ok(());
        }
        File::options()
            .write(true)
            .open(&link)?
            .set_modified(std::time::SystemTime::now())
    }

    /// Removes published content (eviction). Repositories must have been unlinked first.
    pub fn delete_content(&self, digest: &Digest) -> io::Result<bool> {
        remove_synced(&self.blob_path(digest))
    }

    // ---- ingest: the one way bytes become a blob ---------------------------------------------

    /// Starts an upload session for `name`, hashing with `algorithm`.
    pub fn create_ingest(
        &self,
        name: &RepoName,
        id: &UploadId,
        algorithm: Algorithm,
    ) -> io::Result<Ingest> {
        let dir = self.upload_dir(id);
        fs::create_dir(&dir)?;
        fs::write(
            dir.join("repo"),
            format!("{}\n{}\n", name, algorithm.name()),
        )?;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(dir.join("data"))?;
        Ok(Ingest {
            id: id.clone(),
            name: name.clone(),
            file,
            len: 0,
            hasher: algorithm.hasher(),
        })
    }

    /// Reopens an upload session left on disk (after a restart): re-hashes what was received.
    pub fn reopen_ingest(&self, id: &UploadId) -> io::Result<Option<Ingest>> {
        let dir = self.upload_dir(id);
        let mut buf = [0u8; SMALL_FILE_MAX_BYTES];
        let Some(meta) = read_small(&dir.join("repo"), &mut buf)? else {
            return Ok(None);
        };
        let mut lines = meta.lines();
        let name = lines
            .next()
            .and_then(|n| RepoName::parse(n).ok())
            .ok_or_else(|| corrupt("upload session"))?;
        let algorithm = lines
            .next()
            .and_then(Algorithm::from_name)
            .ok_or_else(|| corrupt("upload session"))?;
        let mut file = match OpenOptions::new()
            .append(true)
            .read(true)
            .open(dir.join("data"))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut hasher = algorithm.hasher();
        let len = hash_reader(&mut file, &mut hasher)?;
        Ok(Some(Ingest {
            id: id.clone(),
            name,
            file,
            len,
            hasher,
        }))
    }

    /// Ids of the upload sessions on disk, with the time they last received bytes.
    pub fn ingests(&self) -> io::Result<Vec<(UploadId, std::time::SystemTime)>> {
        let mut out = Vec::new();
        for n in list_names(&self.root.join("uploads"))? {
            let Some(id) = UploadId::parse(&n) else {
                continue;
            };
            let dir = self.upload_dir(&id);
            let modified = fs::metadata(dir.join("data"))
                .or_else(|_| fs::metadata(&dir))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            out.push((id, modified));
        }
        Ok(out)
    }

    /// Opens an ingest's bytes for reading while it is still being written (a mirror download
    /// that clients follow as it grows).
    pub fn open_ingest_reader(&self, id: &UploadId) -> io::Result<File> {
        File::open(self.upload_dir(id).join("data"))
    }

    /// A writer of `ingest`'s bytes at any offset past what it holds: for a blob fetched in
    /// several parts at once (the parts become the ingest's with [`Ingest::absorb`]).
    pub fn ingest_parts(&self, ingest: &Ingest) -> io::Result<PartWriter> {
        // Not O_APPEND, whose writes ignore the offset.
        let file = OpenOptions::new()
            .write(true)
            .open(self.upload_dir(&ingest.id).join("data"))?;
        Ok(PartWriter { file })
    }

    /// Drops an upload session and its bytes.
    pub fn remove_ingest(&self, id: &UploadId) -> io::Result<()> {
        match fs::remove_dir_all(self.upload_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

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
            fs::rename(self.upload_dir(&id).join("data"), &dest)?;
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
        self.publish(
            &self.tag_path(name, tag),
            format!("{} {}\n", entry.digest, entry.media_type).as_bytes(),
        )
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

    // ---- deletes ------------------------------------------------------------------------------

    /// Removes a tag. False if there was none.
    pub fn delete_tag(&self, name: &RepoName, tag: &Tag) -> io::Result<bool> {
        remove_synced(&self.tag_path(name, tag))
    }

    /// Removes a manifest from the repository, and first every tag pointing at it, so no tag ever
    /// points at a missing manifest. False if the repository did not hold it.
    pub fn delete_manifest(&self, name: &RepoName, digest: &Digest) -> io::Result<bool> {
        for tag in self.tags_of(name, digest)? {
            remove_synced(&self.tag_path(name, &tag))?;
        }
        remove_synced(&self.manifest_link_path(name, digest))
    }

    /// Removes a referrer record.
    pub fn delete_referrer(
        &self,
        name: &RepoName,
        subject: &Digest,
        referrer: &Digest,
    ) -> io::Result<bool> {
        remove_synced(&self.referrer_path(name, subject, referrer))
    }

    /// Removes a blob from the repository (its content stays for other repositories).
    pub fn delete_blob(&self, name: &RepoName, digest: &Digest) -> io::Result<bool> {
        remove_synced(&self.blob_link_path(name, digest))
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
        let tmp = self.tmp_dir().join(UploadId::random()?.as_str());
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
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
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

/// An upload session being received: an append-only file in `uploads/<id>/` and the running hash.
pub struct Ingest {
    id: UploadId,
    name: RepoName,
    file: File,
    len: u64,
    hasher: Hasher,
}

/// Writes parts of an ingest at their offsets (see [`Layout::ingest_parts`]).
pub struct PartWriter {
    file: File,
}

impl PartWriter {
    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, bytes, offset)
    }
}

/// The state of an ingest before a chunk, to roll back to if the chunk fails half-way.
#[derive(Clone)]
pub struct Checkpoint {
    len: u64,
    hasher: Hasher,
}

impl Ingest {
    pub fn id(&self) -> &UploadId {
        &self.id
    }

    pub fn name(&self) -> &RepoName {
        &self.name
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends several pieces with as few `writev` calls as the kernel allows: for bytes that
    /// arrive in many small buffers (a network body), without gathering them in another one.
    /// On an error the file is cut back to its length before the call.
    pub fn write_pieces(&mut self, pieces: &[&[u8]]) -> io::Result<()> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        let mut done = 0;
        while done < total {
            match self.file.write_vectored(rest) {
                Ok(0) => {
                    let _ = self.file.set_len(self.len);
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => {
                    done += n;
                    io::IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = self.file.set_len(self.len);
                    return Err(e);
                }
            }
        }
        for p in pieces {
            self.hasher.update(p);
        }
        self.len += total as u64;
        Ok(())
    }

    /// Takes in the bytes up to `to` that a [`PartWriter`] wrote past [`Ingest::len`]: reads
    /// and hashes them (they are in the page cache).
    pub fn absorb(&mut self, to: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        const CHUNK_BYTES: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK_BYTES.min(to.saturating_sub(self.len) as usize)];
        while self.len < to {
            let n = CHUNK_BYTES.min((to - self.len) as usize);
            self.file.read_exact_at(&mut buf[..n], self.len)?;
            self.hasher.update(&buf[..n]);
            self.len += n as u64;
        }
        Ok(())
    }

    /// Drops whatever [`PartWriter`]s wrote past [`Ingest::len`] (a parallel fetch given up), so
    /// appending can go on.
    pub fn cut(&mut self) -> io::Result<()> {
        self.file.set_len(self.len)
    }

    /// Flushes the bytes to disk ahead of [`Layout::commit`], whose own flush then has little
    /// left to do: lets a caller keep the slow part out of a critical section.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The digest of the bytes written so far, in the ingest's algorithm.
    pub fn digest(&self) -> Digest {
        self.hasher.clone().finish()
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            len: self.len,
            hasher: self.hasher.clone(),
        }
    }

    /// Forgets everything written after `checkpoint`.
    pub fn rollback(&mut self, checkpoint: Checkpoint) -> io::Result<()> {
        debug_assert!(checkpoint.len <= self.len);
        self.file.set_len(checkpoint.len)?;
        self.len = checkpoint.len;
        self.hasher = checkpoint.hasher;
        Ok(())
    }
}

impl UploadId {
    /// A fresh random id (128 bits from the kernel's CSPRNG).
    pub fn random() -> io::Result<UploadId> {
        let mut bytes = [0u8; 16];
        // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != bytes.len() as isize {
            return Err(io::Error::last_os_error());
        }
        Ok(UploadId::from_bytes(bytes))
    }
}

fn hash_reader(file: &mut File, hasher: &mut Hasher) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Longest small metadata file Lighter writes (a tag: digest and media type).
const SMALL_FILE_MAX_BYTES: usize = 512;

/// Reads a small metadata file into `buf`, without allocating.
fn read_small<'b>(
    path: &Path,
    buf: &'b mut [u8; SMALL_FILE_MAX_BYTES],
) -> io::Result<Option<&'b str>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut len = 0;
    loop {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        if len == buf.len() {
            return Err(corrupt("metadata (too long)"));
        }
    }
    std::str::from_utf8(&buf[..len])
        .map(Some)
        .map_err(|_| corrupt("metadata (not UTF-8)"))
}

fn list_names(dir: &Path) -> io::Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in rd {
        if let Ok(name) = entry?.file_name().into_string() {
            out.push(name);
        }
    }
    Ok(out)
}

fn walk_repos(top: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) -> io::Result<()> {
    if depth > REPO_DEPTH_MAX {
        return Ok(());
    }
    let mut is_repo = false;
    for n in list_names(dir)? {
        if n.starts_with('_') {
            is_repo |= matches!(n.as_str(), "_manifests" | "_blobs" | "_tags");
        } else if fs::symlink_metadata(dir.join(&n))?.is_dir() {
            walk_repos(top, &dir.join(&n), depth + 1, out)?;
        }
    }
    if is_repo {
        if let Some(name) = dir.strip_prefix(top).ok().and_then(|p| p.to_str()) {
            if RepoName::parse(name).is_ok() {
                out.push(name.to_owned());
            }
        }
    }
    Ok(())
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

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt {what} file in the data directory"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        (dir, layout)
    }

    #[test]
    fn a_relative_data_dir_works() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let l = Layout::open_writer("data");
        std::env::set_current_dir(old).unwrap();
        let l = l.unwrap();
        assert!(l.root().is_absolute());
        let d = Digest::of(Algorithm::Sha256, b"x");
        l.put_content(&d, b"x").unwrap();
        assert!(dir.path().join("data/blobs").is_dir());
    }

    #[test]
    fn parts_written_out_of_order_commit_as_one_verified_blob() {
        let (_d, l) = layout();
        let a = RepoName::parse("a").unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(Algorithm::Sha256, &bytes);
        let mut ingest = l
            .create_ingest(&a, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(&bytes[..1000]).unwrap();
        let parts = l.ingest_parts(&ingest).unwrap();
        // The last part first, then the middle; the ingest holds only its prefix meanwhile.
        parts.write_at(2_000_000, &bytes[2_000_000..]).unwrap();
        parts.write_at(1000, &bytes[1000..2_000_000]).unwrap();
        assert_eq!(ingest.len(), 1000);
        ingest.absorb(2_000_000).unwrap();
        ingest.absorb(3_000_000).unwrap();
        assert_eq!(ingest.len(), 3_000_000);
        assert_eq!(ingest.digest(), digest);
        l.commit(ingest, &digest).unwrap();
        assert_eq!(l.blob_size(&a, &digest).unwrap(), Some(3_000_000));
    }

    #[test]
    fn a_parallel_fetch_given_up_is_cut_back_and_appending_goes_on() {
        let (_d, l) = layout();
        let a = RepoName::parse("a").unwrap();
        let mut ingest = l
            .create_ingest(&a, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(b"head").unwrap();
        l.ingest_parts(&ingest)
            .unwrap()
            .write_at(100, b"stray")
            .unwrap();
        ingest.cut().unwrap();
        ingest.write(b" tail").unwrap();
        let digest = Digest::of(Algorithm::Sha256, b"head tail");
        assert_eq!(ingest.digest(), digest);
        l.commit(ingest, &digest).unwrap();
        assert_eq!(l.blob_size(&a, &digest).unwrap(), Some(9));
    }

    #[test]
    fn committed_blob_is_visible_only_in_its_repository() {
        let (_d, l) = layout();
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
        let (_d, l) = layout();
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
        let (_d, l) = layout();
        let a = RepoName::parse("a").unwrap();
        let mut ingest = l
            .create_ingest(&a, &UploadId::random().unwrap(), Algorithm::Sha256)
            .unwrap();
        ingest.write(b"hello").unwrap();
        let d512 = Digest::of(Algorithm::Sha512, b"hello");
        l.commit(ingest, &d512).unwrap();
        assert_eq!(l.blob_size(&a, &d512).unwrap(), Some(5));
    }

    #[test]
    fn reopened_ingest_resumes_hash_and_rollback_forgets() {
        let (_d, l) = layout();
        let a = RepoName::parse("a/b").unwrap();
        let id = UploadId::random().unwrap();
        let mut ingest = l.create_ingest(&a, &id, Algorithm::Sha256).unwrap();
        ingest.write(b"hel").unwrap();
        let cp = ingest.checkpoint();
        ingest.write(b"XXXX").unwrap();
        ingest.rollback(cp).unwrap();
        drop(ingest);
        let mut ingest = l.reopen_ingest(&id).unwrap().unwrap();
        assert_eq!(ingest.len(), 3);
        assert_eq!(ingest.name(), &a);
        ingest.write(b"lo").unwrap();
        let digest = Digest::of(Algorithm::Sha256, b"hello");
        l.commit(ingest, &digest).unwrap();
        assert_eq!(l.open_blob(&a, &digest).unwrap().unwrap().1, 5);
    }

    #[test]
    fn tags_manifests_referrers_and_catalog() {
        let (_d, l) = layout();
        let a = RepoName::parse("x/y").unwrap();
        let m = br#"{"schemaVersion":2}"#;
        let digest = Digest::of(Algorithm::Sha256, m);
        l.put_content(&digest, m).unwrap();
        l.link_manifest(&a, &digest, crate::media::OCI_MANIFEST)
            .unwrap();
        let entry = l.manifest(&a, &digest).unwrap().unwrap();
        assert_eq!(&*entry.media_type, crate::media::OCI_MANIFEST);
        for t in ["v2", "v1", "latest"] {
            l.put_tag(&a, &Tag::parse(t).unwrap(), &entry).unwrap();
        }
        assert_eq!(l.tags(&a).unwrap().unwrap(), ["latest", "v1", "v2"]);
        assert_eq!(
            l.tag(&a, &Tag::parse("v1").unwrap()).unwrap().unwrap(),
            entry
        );
        l.put_referrer(&a, &digest, &digest, b"{}").unwrap();
        assert_eq!(l.referrers(&a, &digest).unwrap(), vec![b"{}".to_vec()]);
        l.link_blob(&RepoName::parse("x").unwrap(), &digest)
            .unwrap();
        assert_eq!(l.repositories().unwrap(), ["x", "x/y"]);
        assert!(l.delete_manifest(&a, &digest).unwrap());
        assert_eq!(l.tags(&a).unwrap().unwrap(), Vec::<String>::new());
        assert!(l.manifest(&a, &digest).unwrap().is_none());
        assert_eq!(l.tags(&RepoName::parse("nope").unwrap()).unwrap(), None);
    }
}
