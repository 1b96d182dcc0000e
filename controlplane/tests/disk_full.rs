//! A full file system (issue 13, "Disk full"): a push that runs out of space gets a clear 5xx
//! OCI error, leaves no partial blob, upload or tag behind and gives its space back; the
//! registry keeps serving pulls and takes the push once space is there again. The data
//! directory is a small tmpfs mounted by the test (root; skipped with a message otherwise).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{random_bytes, sha256, Server};

/// A tmpfs of `mib` MiB, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(mib: u32) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(SmallFs { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Bytes free, from statvfs.
    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
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
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn assert_storage_full(status: u16, body: &str) {
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("\"code\":\"UNKNOWN\""), "{body}");
    assert!(body.contains("storage is full"), "{body}");
}

#[test]
fn a_push_that_fills_the_disk_fails_cleanly_and_succeeds_once_space_is_back() {
    let Some(fs) = SmallFs::mount(8) else { return };
    let mut server = Server::start_in(&fs.path(), &[]);
    let c = Server::client();
    let free_at_start = fs.free();

    // Something to pull throughout.
    let small = random_bytes(4096, 1);
    let small_digest = sha256(&small);
    let r = c
        .post(server.url(&format!("/v2/t/app/blobs/uploads/?digest={small_digest}")))
        .body(small.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);

    // Monolithic (OCI distribution spec, "Pushing a blob monolithically"): 12 MB into 8 MiB.
    let big = random_bytes(12 << 20, 2);
    let big_digest = sha256(&big);
    let r = c
        .post(server.url(&format!("/v2/t/app/blobs/uploads/?digest={big_digest}")))
        .body(big.clone())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_storage_full(status, &r.text().unwrap());

    // Chunked ("Pushing a blob in chunks"): the chunk that does not fit fails the same way.
    let r = c
        .post(server.url("/v2/t/app/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut location = server.url(r.headers()["location"].to_str().unwrap());
    let mut failed = None;
    for (i, chunk) in big.chunks(3 << 20).enumerate() {
        let start = i * (3 << 20);
        let r = c
            .patch(&location)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{start}-{}", start + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .unwrap();
        if r.status() != 202 {
            failed = Some((r.status().as_u16(), r.text().unwrap()));
            break;
        }
        location = server.url(r.headers()["location"].to_str().unwrap());
    }
    let (status, body) = failed.expect("12 MB fit into 8 MiB");
    assert_storage_full(status, &body);
    // Abandoned, as a client does after an error: its space comes back.
    let r = c.delete(&location).send().unwrap();
    assert!([204, 404].contains(&r.status().as_u16()), "{}", r.status());

    // Nothing partial anywhere: no blob but the small one, no upload, no temp file.
    let data = fs.path();
    let blobs: Vec<_> = files_under(&data.join("blobs"));
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert!(files_under(&data.join("uploads")).is_empty());
    assert!(files_under(&data.join("tmp")).is_empty());
    let r = c
        .head(server.url(&format!("/v2/t/app/blobs/{big_digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(
        fs.free() + (256 << 10) >= free_at_start,
        "space not given back: {} free, {} at start",
        fs.free(),
        free_at_start
    );

    // Still serving pulls.
    let r = c
        .get(server.url(&format!("/v2/t/app/blobs/{small_digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().unwrap()[..], &small[..]);

    // Space comes back (a restart on a bigger file system stands in for an operator growing
    // the volume): the same push is taken.
    drop(c);
    server.kill();
    let bigger = SmallFs::mount(32).expect("mounted once already");
    let copy = Command::new("cp")
        .arg("-a")
        .arg(&data)
        .arg(bigger.dir.path())
        .status()
        .unwrap();
    assert!(copy.success());
    let server = Server::start_in(&bigger.path(), &[]);
    let c = Server::client();
    let r = c
        .post(server.url(&format!("/v2/t/app/blobs/uploads/?digest={big_digest}")))
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .get(server.url(&format!("/v2/t/app/blobs/{big_digest}")))
        .send()
        .unwrap();
    assert_eq!(sha256(&r.bytes().unwrap()), big_digest);
}

#[test]
fn a_manifest_push_on_a_full_disk_leaves_no_tag() {
    let Some(fs) = SmallFs::mount(8) else { return };
    let server = Server::start_in(&fs.path(), &[]);
    let c = Server::client();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = sha256(config);
    let r = c
        .post(server.url(&format!("/v2/t/app/blobs/uploads/?digest={config_digest}")))
        .body(config.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    // Fill the file system from outside (another tenant of the volume).
    let filler = fs.dir.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 8 << 20]);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [],
        "annotations": {"pad": "x".repeat(64 << 10)}
    });
    let r = c
        .put(server.url("/v2/t/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_storage_full(status, &r.text().unwrap());
    let r = c
        .get(server.url("/v2/t/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(files_under(&fs.path().join("tmp")).is_empty());
    // Space back: the same push is taken.
    std::fs::remove_file(&filler).unwrap();
    let r = c
        .put(server.url("/v2/t/app/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
}
