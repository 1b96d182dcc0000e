//! Ingests: bytes on their way to becoming a blob, in `uploads/<id>/`. An upload session and a
//! download (mirror, peers) are the same kind of ingest: append-only with its running hash,
//! checkpoints to roll a failed chunk back, a [`PartWriter`] for parts fetched at their offsets,
//! and reopened after a restart. Only [`Layout::commit`] makes one visible.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};

use super::{corrupt, list_names, read_small, Layout, SMALL_FILE_MAX_BYTES};
use crate::digest::{Algorithm, Digest, Hasher};
use crate::name::RepoName;
use crate::route::UploadId;

impl Layout {
    /// Starts an upload session for `name`, hashing with `algorithm`.
    pub fn create_ingest(
        &self,
        name: &RepoName,
        id: &UploadId,
        algorithm: Algorithm,
    ) -> io::Result<Ingest> {
        fs::create_dir(self.upload_dir(id))?;
        fs::write(
            self.upload_meta_path(id),
            format!("{}\n{}\n", name, algorithm.name()),
        )?;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .read(true)
            .open(self.upload_data_path(id))?;
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
        let mut buf = [0u8; SMALL_FILE_MAX_BYTES];
        let Some(meta) = read_small(&self.upload_meta_path(id), &mut buf)? else {
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
            .open(self.upload_data_path(id))
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
        for n in list_names(&self.uploads_dir())? {
            let Some(id) = UploadId::parse(&n) else {
                continue;
            };
            let modified = fs::metadata(self.upload_data_path(&id))
                .or_else(|_| fs::metadata(self.upload_dir(&id)))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            out.push((id, modified));
        }
        Ok(out)
    }

    /// Opens an ingest's bytes for reading while it is still being written (a mirror download
    /// that clients follow as it grows).
    pub fn open_ingest_reader(&self, id: &UploadId) -> io::Result<File> {
        File::open(self.upload_data_path(id))
    }

    /// A writer of `ingest`'s bytes at any offset past what it holds: for a blob fetched in
    /// several parts at once (the parts become the ingest's with [`Ingest::absorb`]).
    pub fn ingest_parts(&self, ingest: &Ingest) -> io::Result<PartWriter> {
        // Not O_APPEND, whose writes ignore the offset.
        let file = OpenOptions::new()
            .write(true)
            .open(self.upload_data_path(&ingest.id))?;
        Ok(PartWriter { file })
    }

    /// Drops an upload session and its bytes.
    pub fn remove_ingest(&self, id: &UploadId) -> io::Result<()> {
        match fs::remove_dir_all(self.upload_dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// An upload session being received: an append-only file in `uploads/<id>/` and the running hash.
pub struct Ingest {
    pub(super) id: UploadId,
    pub(super) name: RepoName,
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) hasher: Hasher,
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

pub(super) fn hash_reader(file: &mut File, hasher: &mut Hasher) -> io::Result<u64> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::scratch;
    use super::*;

    #[test]
    fn parts_written_out_of_order_commit_as_one_verified_blob() {
        let (_d, l) = scratch();
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
        let (_d, l) = scratch();
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
    fn reopened_ingest_resumes_hash_and_rollback_forgets() {
        let (_d, l) = scratch();
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
}
