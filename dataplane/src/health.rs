//! `GET /healthz` and `GET /readyz`, answered by the data plane itself (no handoff, no
//! credentials), for the probes in deploy/. Liveness is this core answering; readiness also
//! needs the control plane taking connections, the data directory's file system writable and
//! at least `disk_free_min_bytes` free on it. A few system calls per probe, never on the pull
//! path.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

pub struct Health {
    pub control_socket_path: PathBuf,
    pub data_dir: PathBuf,
    pub disk_free_min_bytes: u64,
}

impl Health {
    /// None when ready; otherwise why not (a literal that needs no JSON escaping).
    pub fn not_ready(&self) -> Option<&'static str> {
        if crate::handoff::connect_nonblocking(&self.control_socket_path).is_err() {
            return Some("the control plane is not taking connections");
        }
        let Ok(path) = std::ffi::CString::new(self.data_dir.as_os_str().as_bytes()) else {
            return Some("the data directory cannot be examined");
        };
        // SAFETY: statvfs into a zeroed struct, with a NUL-terminated path.
        let s = unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(path.as_ptr(), &mut s) != 0 {
                return Some("the data directory cannot be examined");
            }
            s
        };
        if s.f_flag & libc::ST_RDONLY != 0 {
            return Some("the data directory is on a read-only file system");
        }
        if (s.f_bavail as u64).saturating_mul(s.f_frsize as u64) < self.disk_free_min_bytes {
            return Some("free space of the data directory is below disk_free_min_bytes");
        }
        None
    }
}
