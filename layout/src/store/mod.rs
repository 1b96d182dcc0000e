//! The data directory: the one place that maps objects to paths and writes files. See the crate
//! documentation for the tree and the publish protocol. Split where a backend would be:
//! - `paths`: the tree, the only code that builds a path under the data directory;
//! - `read`: what serving needs (opening blobs and manifests, resolving tags, listing), all the
//!   data plane uses;
//! - `ingest`: bytes on their way to becoming a blob ([`Ingest`], [`PartWriter`], checkpoints);
//! - `publish`: the publish protocol and everything written with it: [`Layout::commit`] (the
//!   one way an ingest becomes a blob), content, links, tags, referrers, and their removal;
//! - `generation`: the counter the writer bumps after a change a reader's memory could miss.
//!
//! Each adds its own methods to [`Layout`]; the types are re-exported here.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::inline::InlineStr;

mod generation;
mod ingest;
mod paths;
mod publish;
mod read;

pub use generation::Generation;
pub use ingest::{Checkpoint, Ingest, PartWriter};
pub use publish::CommitError;
pub use read::{BlobLink, FileId};

/// Longest media type stored (`type/subtype`, 127 characters each).
pub const MEDIA_TYPE_LENGTH_MAX: usize = 255;

/// A manifest as a reader needs it: its digest and the media type to send as `Content-Type`.
/// Inline strings: resolving a manifest allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub digest: Digest,
    pub media_type: InlineStr<MEDIA_TYPE_LENGTH_MAX>,
}

/// A handle on a data directory. Cheap to clone; holds no open files (a writer's handle maps
/// the namespace generation, shared by its clones).
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    /// The writer's: bumped after every change readers must not miss.
    generation: Option<std::sync::Arc<Generation>>,
}

impl Layout {
    /// A handle for reading. Creates nothing and changes nothing.
    pub fn open(root: impl Into<PathBuf>) -> Layout {
        let root = root.into();
        // Absolute, so every path built under it has a parent (`data` works like `./data`).
        let root = std::path::absolute(&root).unwrap_or(root);
        Layout {
            root,
            generation: None,
        }
    }

    /// A handle for the single writer (the control plane): creates the top-level directories and
    /// removes temp files left by a crash. Upload sessions are kept: they can be resumed.
    pub fn open_writer(root: impl Into<PathBuf>) -> io::Result<Layout> {
        let mut layout = Layout::open(root);
        for dir in layout.top_dirs() {
            layout.ensure_dir(&dir)?;
        }
        layout.generation = Some(std::sync::Arc::new(Generation::open_writer(
            &layout.generation_path(),
        )?));
        for entry in fs::read_dir(layout.tmp_dir())? {
            let entry = entry?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A reader's view of the namespace generation (None until a writer has opened the data
    /// directory).
    pub fn generation(&self) -> io::Result<Option<Generation>> {
        Generation::open_reader(&self.generation_path())
    }

    /// After a change readers must not miss (see [`Generation`]).
    fn changed(&self) {
        if let Some(g) = &self.generation {
            g.bump();
        }
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

fn corrupt(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("corrupt {what} file in the data directory"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;

    /// A writer's handle on a fresh data directory (kept while the `TempDir` lives).
    pub(super) fn scratch() -> (tempfile::TempDir, Layout) {
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
}
