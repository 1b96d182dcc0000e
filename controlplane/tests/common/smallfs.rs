//! Small file systems for the tests of a full disk: a tmpfs of a few MiB (root only; the
//! callers skip with a message otherwise), unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size, unmounted (lazily, so a process still using it does not stop it)
/// on drop.
pub struct SmallFs {
    at: PathBuf,
    /// The directory it is mounted on, when it made its own.
    _dir: Option<tempfile::TempDir>,
}

impl SmallFs {
    /// A tmpfs of `mib` MiB on a new temporary directory; None (with a line saying why) if it
    /// cannot be mounted.
    pub fn mount(mib: u32) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = SmallFs::mount_on(dir.path(), mib)?;
        fs._dir = Some(dir);
        Some(fs)
    }

    /// A tmpfs of `mib` MiB with room for at most `inodes` files and directories, on a new
    /// temporary directory; None (with a line saying why) if it cannot be mounted.
    pub fn mount_with_inodes(mib: u32, inodes: u32) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = SmallFs::mount_opts(dir.path(), &format!("size={mib}m,nr_inodes={inodes}"))?;
        fs._dir = Some(dir);
        Some(fs)
    }

    /// A tmpfs of `mib` MiB on `dir` (which must exist), hiding what it held.
    pub fn mount_on(dir: &Path, mib: u32) -> Option<SmallFs> {
        SmallFs::mount_opts(dir, &format!("size={mib}m"))
    }

    fn mount_opts(dir: &Path, options: &str) -> Option<SmallFs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(SmallFs {
            at: dir.to_owned(),
            _dir: None,
        })
    }

    /// Where it is mounted.
    pub fn root(&self) -> &Path {
        &self.at
    }

    /// A data directory on it (not made yet).
    pub fn path(&self) -> PathBuf {
        self.at.join("data")
    }

    /// Bytes free, from statvfs.
    pub fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.at.to_str().unwrap()).unwrap();
        // SAFETY: statvfs into a zeroed struct, with a NUL-terminated path.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
            s.f_bavail * s.f_frsize
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}
