//! A full file system (issue 13, "Disk full"): a push that runs out of space gets a clear 5xx
//! OCI error, leaves no partial blob, upload or tag behind and gives its space back; the
//! registry keeps serving pulls and takes the push once space is there again. The data
//! directory is a small tmpfs mounted by the test (root; skipped with a message otherwise).
//! The same for the pull-through cache: a cold blob download that runs out of space aborts the
//! clients following it, publishes nothing and gives its space back.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::smallfs::SmallFs;
use common::{random_bytes, sha256, Server};

/// The event log's rings and files share the volume and grow with every request: the push
/// tests' space accounting (what a failed push gives back) cannot tell them from a push's, so
/// those servers run without one (the last test here, and `tests/events.rs`, cover the log).
const NO_EVENT_LOG: &[&str] = &["--events-ring-records", "0"];

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
    let mut server = Server::start_in(&fs.path(), NO_EVENT_LOG);
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
        .arg(bigger.root())
        .status()
        .unwrap();
    assert!(copy.success());
    let server = Server::start_in(&bigger.path(), NO_EVENT_LOG);
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
    let server = Server::start_in(&fs.path(), NO_EVENT_LOG);
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
    let filler = fs.root().join("filler");
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

/// CNCF Distribution (`docker-registry serve`) on a loopback port with its storage in `dir`,
/// killed on drop: the upstream of a pull-through mirror. (`mirror.rs` has the full-featured one;
/// this test needs only start, push and stop.)
struct Upstream {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Upstream {
    /// None (with a message) when `docker-registry` is missing and `LIGHTER_SKIP_CLIENT_TESTS=1`.
    fn start() -> Option<Upstream> {
        let on_path = std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p).any(|d| d.join("docker-registry").is_file())
        });
        if !on_path {
            assert!(
                std::env::var("LIGHTER_SKIP_CLIENT_TESTS").is_ok_and(|v| v == "1"),
                "docker-registry is not installed (Debian: docker-registry); install it or set \
                 LIGHTER_SKIP_CLIENT_TESTS=1"
            );
            eprintln!("skipped: LIGHTER_SKIP_CLIENT_TESTS=1 (needs docker-registry)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        for _attempt in 0..5 {
            let port = common::free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: lighter-disk-full-tests\n",
                    dir.path().join("storage").display()
                ),
            )
            .unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn docker-registry");
            let addr = format!("127.0.0.1:{port}").parse().unwrap();
            let c = Server::client();
            for _ in 0..400 {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                if c.get(format!("http://{addr}/v2/")).send().is_ok() {
                    return Some(Upstream {
                        child,
                        addr,
                        _dir: dir,
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start in 5 attempts");
    }

    /// POST then PUT, asserting 201; the blob's digest.
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let c = Server::client();
        let digest = sha256(bytes);
        let r = c
            .post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let location = match location.starts_with("http") {
            true => location,
            false => format!("http://{}{location}", self.addr),
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = c
            .put(format!("{location}{sep}digest={digest}"))
            .body(bytes.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "upstream blob push");
        digest
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET read to its end or to its failure: status, body so far, transport error.
fn fetch(url: &str) -> (u16, Vec<u8>, Option<String>) {
    use std::io::Read;
    let mut r = match Server::client().get(url).send() {
        Ok(r) => r,
        Err(e) => return (0, Vec::new(), Some(e.to_string())),
    };
    let status = r.status().as_u16();
    let mut body = Vec::new();
    let error = r.read_to_end(&mut body).err().map(|e| e.to_string());
    (status, body, error)
}

/// Issue 13, "Disk full", for the pull-through cache: a cold blob whose download runs out of
/// space half-way. Every client following it gets an aborted body (never a complete one),
/// nothing is published, the ingest's space comes back, other pulls go on, and the same pull
/// succeeds once there is room.
#[test]
fn a_mirror_download_that_fills_the_disk_aborts_its_clients_and_publishes_nothing() {
    let Some(fs) = SmallFs::mount(16) else { return };
    let Some(upstream) = Upstream::start() else {
        return;
    };
    let big = random_bytes(8 << 20, 3);
    let big_digest = upstream.push_blob("library/app", &big);
    let small = random_bytes(64 << 10, 4);
    let small_digest = upstream.push_blob("library/app", &small);
    let other = random_bytes(100 << 10, 5);
    let other_digest = upstream.push_blob("library/app", &other);
    let third = random_bytes(100 << 10, 6);
    let third_digest = upstream.push_blob("library/app", &third);
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("lighter.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"docker.io\"\nurl = \"http://{}\"\n",
            upstream.addr
        ),
    )
    .unwrap();
    let server = Server::start_in(
        &fs.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            NO_EVENT_LOG[0],
            NO_EVENT_LOG[1],
        ],
    );
    let blob_url = |digest: &str| server.url(&format!("/v2/docker.io/library/app/blobs/{digest}"));

    // One blob cached while there is room: pulled throughout.
    let (status, body, error) = fetch(&blob_url(&small_digest));
    assert_eq!((status, error), (200, None));
    assert!(body == small);

    // Another tenant of the volume leaves 3 MiB: the 8 MiB blob cannot fit.
    let filler = fs.root().join("filler");
    std::fs::write(&filler, vec![0u8; (fs.free() - (3 << 20)) as usize]).unwrap();
    let free_before = fs.free();

    // Two clients follow the cold download.
    let followers: Vec<_> = (0..2)
        .map(|_| {
            let url = blob_url(&big_digest);
            std::thread::spawn(move || fetch(&url))
        })
        .collect();
    for (i, follower) in followers.into_iter().enumerate() {
        let (status, body, error) = follower.join().unwrap();
        eprintln!(
            "follower {i}: status {status}, {} of {} bytes, error {error:?}",
            body.len(),
            big.len()
        );
        if status == 200 {
            assert!(
                error.is_some() && body.len() < big.len(),
                "follower {i} got a 200 whose body completed ({} bytes) though the download \
                 ran out of space",
                body.len()
            );
            assert!(
                big.starts_with(&body),
                "follower {i} got bytes that are not the blob's"
            );
        } else {
            assert!(
                status == 0 || status >= 500 || status == 404,
                "follower {i}: status {status}"
            );
        }
    }
    let m = server.url("/v2/_lighter/metrics");
    let metrics =
        common::prometheus_values(&Server::client().get(m).send().unwrap().text().unwrap());
    assert_eq!(
        metrics["lighter_mirror_blob_downloads_total{result=\"failed\"}"], 1,
        "{metrics:?}"
    );
    assert!(server
        .wait_for_log("No space left on device", std::time::Duration::from_secs(5))
        .is_some());

    // Nothing published, no link, no ingest left, the space given back.
    let data = fs.path();
    let hex = big_digest.strip_prefix("sha256:").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !files_under(&data.join("uploads")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed download's ingest is still there: {:?}",
            files_under(&data.join("uploads"))
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let named: Vec<_> = files_under(&data)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(hex))
        .collect();
    assert!(
        named.is_empty(),
        "published after a failed download: {named:?}"
    );
    assert!(files_under(&data.join("tmp")).is_empty());
    assert!(
        fs.free() + (256 << 10) >= free_before,
        "space not given back: {} free, {free_before} before the download",
        fs.free()
    );

    // Other pulls go on: a cached blob, and a cold one that fits.
    let (status, body, error) = fetch(&blob_url(&small_digest));
    assert_eq!((status, error), (200, None));
    assert!(body == small);
    let (status, body, error) = fetch(&blob_url(&other_digest));
    assert_eq!((status, error), (200, None));
    assert!(body == other);

    let rest = fs.root().join("rest");
    let _ = std::fs::write(&rest, vec![0u8; fs.free() as usize]);
    // No room at all: the download fails at its first write. A client the answer has not
    // started for gets 507 saying why; one whose 200 head already left (the race between the
    // first upstream bytes and the failed write) gets an aborted body, never a complete one.
    let r = Server::client()
        .get(blob_url(&third_digest))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    match r.text() {
        Ok(body) => {
            eprintln!("cold pull on a full disk: {status} {body}");
            assert_storage_full(status, &body);
        }
        Err(e) => {
            eprintln!("cold pull on a full disk: {status}, body aborted: {e}");
            assert_eq!(status, 200, "an error answer is whole");
        }
    }
    std::fs::remove_file(&rest).unwrap();

    // Room again: the same pull succeeds, and the blob is published whole.
    std::fs::remove_file(&filler).unwrap();
    let r = Server::client().get(blob_url(&big_digest)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], big_digest.as_str());
    assert_eq!(sha256(&r.bytes().unwrap()), big_digest);
    let stored = data.join("blobs/sha256").join(&hex[..2]).join(hex);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !stored.exists() {
        assert!(std::time::Instant::now() < deadline, "never published");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(sha256(&std::fs::read(&stored).unwrap()), big_digest);
}

// The event log on a full volume: the rings were allocated whole at start (a page of a mapped
// file first written on a full file system would kill the data plane with SIGBUS), so pulls go
// on; the drain says it cannot write; once there is room, pulls are logged again.
#[test]
fn the_event_log_on_a_full_disk_neither_stops_pulls_nor_stays_broken() {
    let Some(fs) = SmallFs::mount(16) else {
        return;
    };
    let server = Server::start_in(&fs.path(), &[]);
    let c = Server::client();
    let blob = random_bytes(4096, 5);
    let digest = sha256(&blob);
    let r = c
        .post(server.url(&format!("/v2/ev/full/blobs/uploads/?digest={digest}")))
        .body(blob.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let pull = || {
        let r = c
            .get(server.url(&format!("/v2/ev/full/blobs/{digest}")))
            .header("user-agent", "before")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().unwrap().as_ref(), blob.as_slice());
    };
    pull();
    // Fill the volume to the last byte.
    let filler = fs.root().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
    }
    assert!(fs.free() < 64 << 10, "full: {} free", fs.free());
    for _ in 0..50 {
        pull();
    }
    assert!(
        server
            .wait_for_log("event log:", std::time::Duration::from_secs(30))
            .is_some(),
        "the drain says it cannot write"
    );
    // Room again: pulls are logged.
    std::fs::remove_file(&filler).unwrap();
    let r = c
        .get(server.url(&format!("/v2/ev/full/blobs/{digest}")))
        .header("user-agent", "after-the-disk-was-full")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = c
            .get(server.url("/v2/_lighter/events?repository=ev/full"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        if text.contains("after-the-disk-was-full") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not logged: {text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
