//! The namespace generation: a counter in `run/generation` (8 bytes of shared memory) that the
//! writer bumps after every change that can make a reader's remembered answer wrong: a tag
//! written or removed; a manifest, blob or referrer removed from a repository; content removed.
//! Adding a link or content needs no bump: readers remember only what they found.
//!
//! A reader (the data plane) that read generation G *before* checking a tag or link on disk may
//! reuse what it found while the generation is still G, without asking the file system again:
//! a change that its check missed was made after the check, so its bump came after G was read.
//! The file is opened, never replaced, so a restarted writer bumps the counter readers already
//! map. Its bytes are written once, when it is created, never left a hole: touching a hole of a
//! mapping needs a block (on tmpfs, even to read it), and on a full file system that is a
//! SIGBUS, not an error.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const BYTES: usize = 8;

/// A mapping of the generation counter: writable for the writer, read-only for readers.
pub struct Generation {
    map: *mut u8,
}

// SAFETY: the mapping is only reached through an `AtomicU64`, and unmapped once in Drop.
unsafe impl Send for Generation {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Generation {}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Generation({})", self.current())
    }
}

impl Generation {
    /// The writer's mapping: opens the file, creating it (at 0, its bytes written and synced)
    /// if absent or never written, never truncating it.
    pub(crate) fn open_writer(path: &Path) -> io::Result<Generation> {
        use std::os::unix::fs::FileExt;
        fs::create_dir_all(path.parent().expect("run/generation has a parent"))?;
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !written(&file)? {
            file.write_all_at(&[0; BYTES], 0)?;
            file.sync_all()?;
        }
        Self::map(&file, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// A reader's mapping, or None while no writer has created the file.
    pub fn open_reader(path: &Path) -> io::Result<Option<Generation>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if !written(&file)? {
            return Ok(None);
        }
        Self::map(&file, libc::PROT_READ).map(Some)
    }

    fn map(file: &File, prot: libc::c_int) -> io::Result<Generation> {
        // SAFETY: a shared mapping of the first 8 bytes of a file at least that long; unmapped
        // in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BYTES,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Generation { map: p.cast() })
    }

    fn word(&self) -> &AtomicU64 {
        // SAFETY: a page-aligned mapping of at least 8 bytes, live until Drop.
        unsafe { &*self.map.cast::<AtomicU64>() }
    }

    /// The generation now. Read it before checking the file system, not after.
    pub fn current(&self) -> u64 {
        self.word().load(Ordering::Acquire)
    }

    /// After a change readers must not miss (the writer's mapping only).
    pub(crate) fn bump(&self) {
        self.word().fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether the file holds its 8 bytes, written (a block behind them, not a hole).
fn written(file: &File) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok(m.len() >= BYTES as u64 && m.blocks() > 0)
}

impl Drop for Generation {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.map.cast(), BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_the_writers_bumps_and_a_reopened_writer_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("generation");
        assert!(Generation::open_reader(&path).unwrap().is_none());
        let w = Generation::open_writer(&path).unwrap();
        let r = Generation::open_reader(&path).unwrap().unwrap();
        assert_eq!(r.current(), 0);
        w.bump();
        w.bump();
        assert_eq!(r.current(), 2);
        drop(w);
        let w = Generation::open_writer(&path).unwrap();
        assert_eq!(w.current(), 2, "never truncated");
        w.bump();
        assert_eq!(r.current(), 3, "the same file, not a new one");
    }

    #[test]
    fn a_file_never_written_is_not_mapped_by_readers_and_is_written_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation");
        File::create(&path).unwrap().set_len(8).unwrap(); // a hole, as a crash could leave
        assert!(Generation::open_reader(&path).unwrap().is_none());
        let w = Generation::open_writer(&path).unwrap();
        w.bump();
        assert_eq!(
            Generation::open_reader(&path).unwrap().unwrap().current(),
            1
        );
    }
}
