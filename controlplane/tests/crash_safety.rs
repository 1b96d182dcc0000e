//! Crash safety: what the registry acknowledged (201) survives a SIGKILL, and nothing partial is
//! ever visible, neither through the API nor as a file under `<data>/blobs/`.

mod common;
mod oci;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use common::{kill_tree, Server};
use oci::*;

/// A push the server acknowledged with 201.
#[derive(Debug)]
enum Ack {
    /// A blob: regenerated from its seed to compare.
    Blob {
        repo: String,
        seed: u64,
        digest: String,
    },
    /// A manifest pushed under a tag.
    Tag {
        repo: String,
        tag: String,
        manifest: Vec<u8>,
        digest: String,
    },
    /// A manifest deletion sent: until acknowledged, the manifest may or may not be gone.
    Deleting { digest: String },
    /// A manifest (and so its tag) deleted by digest.
    Deleted {
        repo: String,
        tag: String,
        digest: String,
    },
    /// The server answered something else than expected before it was killed.
    Unexpected(String),
}

fn blob_len(seed: u64) -> usize {
    // From a few bytes to 2 MiB, so some uploads are mid-body when the kill comes.
    match seed % 4 {
        0 => 17 + (seed as usize % 1000),
        1 => 64 * 1024 + (seed as usize % 4096),
        2 => 700 * 1024 + (seed as usize % 10_000),
        _ => 2 * 1024 * 1024 - (seed as usize % 10_000),
    }
}

/// The content of blob `seed`: its seed, then a slice of a shared random pool. Cheap to make (the
/// pushing threads spend their time in requests, not generating bytes) and distinct per seed.
fn blob(seed: u64) -> Vec<u8> {
    static POOL: OnceLock<Vec<u8>> = OnceLock::new();
    let pool = POOL.get_or_init(|| common::random_bytes(2 * 1024 * 1024 + 4096, 0xC0FFEE));
    let len = blob_len(seed);
    let start = (seed % 4096) as usize;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&seed.to_le_bytes());
    out.extend_from_slice(&pool[start..start + len - 8]);
    out
}

/// How a push ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// 201.
    Acked,
    /// The server answered, but not with the expected status.
    Refused(String),
    /// No answer: the connection failed (the server was killed).
    NoAnswer,
}

/// The response if it has status `want`, else how the push ended.
fn expect(
    r: reqwest::Result<reqwest::blocking::Response>,
    want: u16,
    what: &str,
) -> Result<reqwest::blocking::Response, Outcome> {
    let r = r.map_err(|_| Outcome::NoAnswer)?;
    if r.status().as_u16() == want {
        return Ok(r);
    }
    let status = r.status();
    let body = r.text().unwrap_or_default();
    Err(Outcome::Refused(format!("{what}: {status} {body}")))
}

fn location_of(server: &Server, r: &reqwest::blocking::Response) -> String {
    location_url(server, r.headers()["Location"].to_str().unwrap())
}

/// Pushes a blob one of three ways (single POST, POST then PUT, chunked PATCHes).
fn try_push_blob(server: &Server, repo: &str, bytes: &[u8], how: u64) -> Outcome {
    match push_blob_steps(server, repo, bytes, how) {
        Ok(_) => Outcome::Acked,
        Err(outcome) => outcome,
    }
}

fn push_blob_steps(server: &Server, repo: &str, bytes: &[u8], how: u64) -> Result<(), Outcome> {
    let digest = common::sha256(bytes);
    let c = client();
    let what = |step: &str| format!("{step} of {digest} ({} bytes) in {repo}", bytes.len());
    let uploads = server.url(&format!("/v2/{repo}/blobs/uploads/"));
    match how % 3 {
        0 => {
            let r = c
                .post(format!("{uploads}?digest={digest}"))
                .body(bytes.to_vec())
                .send();
            expect(r, 201, &what("single POST"))?;
        }
        1 => {
            let r = expect(c.post(&uploads).send(), 202, &what("POST"))?;
            let put = with_query(&location_of(server, &r), &format!("digest={digest}"));
            expect(c.put(put).body(bytes.to_vec()).send(), 201, &what("PUT"))?;
        }
        _ => {
            let r = expect(c.post(&uploads).send(), 202, &what("POST"))?;
            let mut location = location_of(server, &r);
            let mut offset = 0;
            for chunk in bytes.chunks(256 * 1024) {
                let end = offset + chunk.len() - 1;
                let r = c
                    .patch(&location)
                    .header("Content-Range", format!("{offset}-{end}"))
                    .body(chunk.to_vec())
                    .send();
                let r = expect(r, 202, &what("PATCH"))?;
                location = location_of(server, &r);
                offset = end + 1;
            }
            let put = with_query(&location, &format!("digest={digest}"));
            expect(c.put(put).send(), 201, &what("closing PUT"))?;
        }
    }
    Ok(())
}

/// One pushing thread: distinct blobs in its own repository, every third blob a manifest over it
/// under a fresh tag, and every sixth blob the deletion (by digest) of the manifest before last. Stops at the first transport error (the kill).
fn pusher(
    server: &Server,
    round: u64,
    thread: u64,
    in_flight: &AtomicUsize,
    acks: mpsc::Sender<Ack>,
) {
    let repo = format!("crash/t{thread}");
    let config = format!(r#"{{"thread":{thread}}}"#).into_bytes();
    match try_push_blob(server, &repo, &config, 0) {
        Outcome::Acked => {}
        Outcome::Refused(e) => {
            let _ = acks.send(Ack::Unexpected(e));
            return;
        }
        Outcome::NoAnswer => return,
    }
    // (tag, digest) of this thread's acknowledged manifests.
    let mut manifests: Vec<(String, String)> = Vec::new();
    for i in 0..10_000u64 {
        let seed = round * 100_000_000 + thread * 1_000_000 + i;
        let bytes = blob(seed);
        in_flight.fetch_add(1, Ordering::SeqCst);
        let pushed = try_push_blob(server, &repo, &bytes, i);
        in_flight.fetch_sub(1, Ordering::SeqCst);
        match pushed {
            Outcome::Acked => {
                let digest = common::sha256(&bytes);
                let _ = acks.send(Ack::Blob {
                    repo: repo.clone(),
                    seed,
                    digest,
                });
            }
            Outcome::Refused(e) => {
                let _ = acks.send(Ack::Unexpected(e));
                return;
            }
            Outcome::NoAnswer => return,
        }
        if i % 3 == 2 {
            // Over the blob just acknowledged.
            let manifest = to_bytes(&image_manifest_value(&config, &[&bytes]));
            let tag = format!("r{round}-i{i}");
            in_flight.fetch_add(1, Ordering::SeqCst);
            let r = client()
                .put(server.url(&format!("/v2/{repo}/manifests/{tag}")))
                .header("Content-Type", OCI_MANIFEST)
                .body(manifest.clone())
                .send();
            in_flight.fetch_sub(1, Ordering::SeqCst);
            match r {
                Ok(r) if r.status().as_u16() == 201 => {
                    let digest = common::sha256(&manifest);
                    manifests.push((tag.clone(), digest.clone()));
                    let _ = acks.send(Ack::Tag {
                        repo: repo.clone(),
                        tag,
                        manifest,
                        digest,
                    });
                }
                Ok(r) => {
                    let _ = acks.send(Ack::Unexpected(format!("manifest push: {}", r.status())));
                    return;
                }
                Err(_) => return,
            }
        }
        if i % 6 == 5 {
            // The manifest pushed three blobs ago, if it was acknowledged.
            let Some((tag, digest)) = manifests
                .iter()
                .find(|(t, _)| *t == format!("r{round}-i{}", i - 3))
                .cloned()
            else {
                continue;
            };
            let _ = acks.send(Ack::Deleting {
                digest: digest.clone(),
            });
            in_flight.fetch_add(1, Ordering::SeqCst);
            let r = client()
                .delete(server.url(&format!("/v2/{repo}/manifests/{digest}")))
                .send();
            in_flight.fetch_sub(1, Ordering::SeqCst);
            match r {
                Ok(r) if r.status().as_u16() == 202 => {
                    let _ = acks.send(Ack::Deleted {
                        repo: repo.clone(),
                        tag,
                        digest,
                    });
                }
                Ok(r) => {
                    let _ = acks.send(Ack::Unexpected(format!("manifest delete: {}", r.status())));
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

/// After a restart: every acknowledged blob and tag is intact, every tag that exists resolves,
/// and every file under blobs/ hashes to its name.
fn verify(server: &Server, acked: &[Ack]) {
    let mut blobs = 0;
    let mut tags = 0;
    // Manifests whose deletion was sent (acknowledged or not): their tags may be gone.
    let deleting: Vec<&str> = acked
        .iter()
        .filter_map(|a| match a {
            Ack::Deleting { digest } => Some(digest.as_str()),
            _ => None,
        })
        .collect();
    let mut deleted = 0;
    for ack in acked {
        match ack {
            Ack::Blob { repo, seed, digest } => {
                let r = get(server, &format!("/v2/{repo}/blobs/{digest}"));
                assert_eq!(
                    r.status, 200,
                    "acknowledged blob {digest} in {repo} is gone"
                );
                assert_eq!(
                    r.body.len(),
                    blob_len(*seed),
                    "acknowledged blob {digest} has the wrong length"
                );
                assert_eq!(common::sha256(&r.body), *digest);
                assert!(r.body == blob(*seed), "acknowledged blob {digest} changed");
                blobs += 1;
            }
            Ack::Tag {
                repo,
                tag,
                manifest,
                digest,
            } => {
                if deleting.contains(&digest.as_str()) {
                    continue;
                }
                let r = get(server, &format!("/v2/{repo}/manifests/{tag}"));
                assert_eq!(r.status, 200, "acknowledged tag {repo}:{tag} is gone");
                assert_eq!(&r.body, manifest, "tag {repo}:{tag} changed");
                assert_eq!(r.header("Docker-Content-Digest"), digest);
                tags += 1;
            }
            Ack::Deleting { .. } => {}
            Ack::Deleted { repo, tag, digest } => {
                deleted += 1;
                let r = get(server, &format!("/v2/{repo}/manifests/{digest}"));
                assert_eq!(r.status, 404, "deleted manifest {digest} in {repo} is back");
                let r = get(server, &format!("/v2/{repo}/manifests/{tag}"));
                assert_eq!(
                    r.status, 404,
                    "tag {repo}:{tag} of a deleted manifest is back"
                );
            }
            Ack::Unexpected(e) => panic!("the server refused a push before the kill: {e}"),
        }
    }
    // Tags whose push was in flight may or may not exist, but none may dangle.
    let catalog = get(server, "/v2/_catalog");
    catalog.assert_status(200);
    for repo in catalog.json()["repositories"].as_array().unwrap() {
        let repo = repo.as_str().unwrap();
        let list = get(server, &format!("/v2/{repo}/tags/list"));
        list.assert_status(200);
        for tag in list.json()["tags"].as_array().unwrap() {
            let tag = tag.as_str().unwrap();
            let r = get(server, &format!("/v2/{repo}/manifests/{tag}"));
            assert_eq!(r.status, 200, "listed tag {repo}:{tag} does not resolve");
            assert_eq!(common::sha256(&r.body), r.header("Docker-Content-Digest"));
        }
    }
    let on_disk = assert_blobs_hash_to_their_names(&server.data_dir);
    assert!(
        on_disk >= blobs,
        "{on_disk} blob files for {blobs} acknowledged blobs"
    );
    eprintln!(
        "verified {blobs} blobs, {tags} tags, {deleted} deletions, {on_disk} files under blobs/"
    );
}

// Layout / the publish protocol: "a push acknowledged after the call returns survives a crash"
#[test]
fn acknowledged_pushes_survive_sigkill_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(tmp.path(), &[]);
    let mut acked = Vec::new();
    for i in 0..6u64 {
        let bytes = blob(i);
        assert_eq!(try_push_blob(&server, "seq", &bytes, i), Outcome::Acked);
        acked.push(Ack::Blob {
            repo: "seq".into(),
            seed: i,
            digest: common::sha256(&bytes),
        });
    }
    let img = push_image(&server, "seq/img", Some("v1"), 7);
    acked.push(Ack::Tag {
        repo: "seq/img".into(),
        tag: "v1".into(),
        manifest: img.manifest.clone(),
        digest: img.digest.clone(),
    });
    // An upload left half done.
    let location = start_upload(&server, "seq");
    patch_chunk(&server, &location, 0, &common::random_bytes(1000, 99)).assert_status(202);

    crash(&mut server);
    assert!(!server.alive());
    let server = Server::start_in(tmp.path(), &[]);
    verify(&server, &acked);
    // The restarted server takes new pushes.
    let img2 = push_image(&server, "seq/img", Some("v2"), 8);
    assert_eq!(get(&server, "/v2/seq/img/manifests/v2").body, img2.manifest);
}

// Layout / the publish protocol, under load: SIGKILL while several pushes are in flight, three
// times over the same data directory
#[test]
fn sigkill_during_concurrent_pushes_loses_nothing_acknowledged_and_shows_nothing_partial() {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 3;
    let tmp = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    for round in 0..ROUNDS {
        // Kill at a different depth each round.
        let blob_acks_before_kill = 20 + 15 * round as usize;
        let tag_acks_before_kill = 4 + round as usize;
        let mut server = Server::start_in(tmp.path(), &[]);
        let (tx, rx) = mpsc::channel();
        let in_flight = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let tx = tx.clone();
                let (server, in_flight) = (&server, &in_flight);
                scope.spawn(move || pusher(server, round, t, in_flight, tx));
            }
            let (mut blob_acks, mut tag_acks) = (0, 0);
            while blob_acks < blob_acks_before_kill || tag_acks < tag_acks_before_kill {
                let ack = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("pushes stopped being acknowledged");
                match &ack {
                    Ack::Blob { .. } => blob_acks += 1,
                    Ack::Tag { .. } => tag_acks += 1,
                    Ack::Deleting { .. } | Ack::Deleted { .. } => {}
                    Ack::Unexpected(e) => panic!("the server refused a push: {e}"),
                }
                acked.push(ack);
            }
            // Kill while at least one request is in flight (pushers only pause between requests
            // for a memcpy, so this ends at once).
            let mut spins = 0u64;
            while in_flight.load(Ordering::SeqCst) == 0 {
                spins += 1;
                assert!(spins < 100_000_000, "no request ever in flight");
                std::hint::spin_loop();
            }
            kill_tree(server.pid());
        });
        drop(tx);
        // Acknowledgements that raced with the kill were still 201s from the server; refusals
        // after the kill may be the kill's doing.
        acked.extend(rx.iter().filter(|a| !matches!(a, Ack::Unexpected(_))));
        server.kill();
        assert!(!server.alive());

        let server = Server::start_in(tmp.path(), &[]);
        verify(&server, &acked);
    }
    // The restarted server takes new pushes in every repository.
    let server = Server::start_in(tmp.path(), &[]);
    for t in 0..THREADS {
        let bytes = common::random_bytes(5000, 7_000_000 + t);
        let digest = push_blob(&server, &format!("crash/t{t}"), &bytes);
        assert_eq!(
            get(&server, &format!("/v2/crash/t{t}/blobs/{digest}")).body,
            bytes
        );
    }
}

// spec: Use Cases / Resumable Push: an upload session survives a SIGKILL and continues after it
#[test]
fn upload_session_resumes_after_sigkill_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(tmp.path(), &[]);
    let bytes = common::random_bytes(300_000, 98);
    let digest = common::sha256(&bytes);
    let location = start_upload(&server, "resume");
    let r = patch_chunk(&server, &location, 0, &bytes[..100_000]);
    r.assert_status(202);
    let location = r.header("Location").to_string();
    crash(&mut server);

    let server = Server::start_in(tmp.path(), &[]);
    let status = get(&server, &location_path(&location));
    status.assert_status(204);
    assert_eq!(status.header("Range"), "0-99999");
    let r = patch_chunk(
        &server,
        status.header("Location"),
        100_000,
        &bytes[100_000..200_000],
    );
    r.assert_status(202);
    assert_eq!(r.header("Range"), "0-199999");
    put_upload(&server, r.header("Location"), &digest, &bytes[200_000..]).assert_status(201);
    assert_eq!(
        get(&server, &format!("/v2/resume/blobs/{digest}")).body,
        bytes
    );
}
