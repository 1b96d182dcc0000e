//! Reads: opening blobs and manifests of a repository, resolving tags, listing tags,
//! repositories, referrers, links and content. Everything the data plane does goes through
//! here (its one write, [`Layout::touch_blob_link`], included), with paths built in a
//! per-thread buffer so that serving allocates nothing.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::paths::{BLOB_LINKS, MANIFEST_LINKS, TAGS};
use super::{corrupt, exists, list_names, read_small, Layout, ManifestEntry, SMALL_FILE_MAX_BYTES};
use crate::digest::{Algorithm, Digest};
use crate::inline::InlineStr;
use crate::name::{Reference, RepoName, Tag};

/// Depth bound for walking `repos/` (a name has at most 128 components of 2 characters).
const REPO_DEPTH_MAX: usize = 128;

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

impl Layout {
    /// The identity of the file a manifest reference resolves through (the tag file, or the
    /// manifest link), without reading it: one `statx`. None if absent.
    pub fn manifest_ref_id(
        &self,
        name: &RepoName,
        reference: &Reference,
    ) -> io::Result<Option<FileId>> {
        let meta = self.with_path(
            |p| match reference {
                Reference::Tag(t) => Self::push_tag(p, name, t),
                Reference::Digest(d) => Self::push_repo_item(p, name, MANIFEST_LINKS, d),
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
        self.with_path(
            |p| Self::push_repo_item(p, name, BLOB_LINKS, digest),
            exists,
        )
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
            |p| Self::push_tag(p, name, tag),
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
            |p| Self::push_repo_item(p, name, MANIFEST_LINKS, digest),
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
        for dir in self.repo_item_dirs(name) {
            if exists(&dir)? {
                return Ok(true);
            }
        }
        Ok(false)
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
        let top = self.repos_dir();
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
            for (digest, path) in self.links(&repo, BLOB_LINKS)? {
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
            let dir = self.links_dir(repo, kind, alg);
            for hex in list_names(&dir)? {
                if let Ok(digest) = Digest::parse(&format!("{}:{hex}", alg.name())) {
                    out.push((digest, dir.join(hex)));
                }
            }
        }
        Ok(out)
    }

    /// The blobs one repository holds (its blob links).
    pub fn blob_link_digests(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        Ok(self
            .links(repo, BLOB_LINKS)?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// The manifests one repository holds (its manifest links).
    pub fn manifest_links(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        Ok(self
            .links(repo, MANIFEST_LINKS)?
            .into_iter()
            .map(|(d, _)| d)
            .collect())
    }

    /// Every digest some repository holds: its blob links and its manifest links (for garbage
    /// collection: content outside this set is reachable by no request).
    pub fn linked_digests(&self) -> io::Result<std::collections::HashSet<Digest>> {
        let mut out = std::collections::HashSet::new();
        for repo in self.repositories()? {
            let Ok(repo) = RepoName::parse(&repo) else {
                continue;
            };
            for kind in [BLOB_LINKS, MANIFEST_LINKS] {
                out.extend(self.links(&repo, kind)?.into_iter().map(|(d, _)| d));
            }
        }
        Ok(out)
    }

    /// The digests one repository holds (its blob and manifest links), each once: what its
    /// stored size is counted over.
    pub fn repo_digests(&self, repo: &RepoName) -> io::Result<Vec<Digest>> {
        let mut out: Vec<Digest> = self
            .links(repo, BLOB_LINKS)?
            .into_iter()
            .chain(self.links(repo, MANIFEST_LINKS)?)
            .map(|(d, _)| d)
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Every piece of published content with its size.
    pub fn contents(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for alg in Algorithm::ALL {
            let top = self.blobs_dir(alg);
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

    /// The workload inventory as last published ([`Layout::put_inventory`]), if there is one;
    /// an error if it is over `size_max_bytes`.
    pub fn read_inventory(&self, size_max_bytes: u64) -> io::Result<Option<Vec<u8>>> {
        let f = match File::open(self.inventory_path()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        f.take(size_max_bytes + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > size_max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("inventory.json is over {size_max_bytes} bytes"),
            ));
        }
        Ok(Some(bytes))
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
}

fn walk_repos(top: &Path, dir: &Path, depth: usize, out: &mut Vec<String>) -> io::Result<()> {
    if depth > REPO_DEPTH_MAX {
        return Ok(());
    }
    let mut is_repo = false;
    for n in list_names(dir)? {
        if n.starts_with('_') {
            is_repo |= [MANIFEST_LINKS, BLOB_LINKS, TAGS].contains(&n.as_str());
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

#[cfg(test)]
mod tests {
    use super::super::tests::scratch;
    use super::*;

    #[test]
    fn tags_manifests_referrers_and_catalog() {
        let (_d, l) = scratch();
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
