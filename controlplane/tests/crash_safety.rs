//! Crash safety: what the registry acknowledged (201) survives a SIGKILL, and nothing partial is
//! ever visible, neither through the API nor as a file under `<data>/blobs/`. The soak at the end
//! repeats the kill 100 times (`LIGHTER_SOAK_KILLS`) over one data directory while pushes,
//! mounts, deletes and garbage collections race.

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
    blob_of_len(seed, blob_len(seed))
}

fn blob_of_len(seed: u64, len: usize) -> Vec<u8> {
    static POOL: OnceLock<Vec<u8>> = OnceLock::new();
    let pool = POOL.get_or_init(|| common::random_bytes(2 * 1024 * 1024 + 4096, 0xC0FFEE));
    assert!((8..=2 * 1024 * 1024).contains(&len));
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

// ---- the soak: SIGKILL after SIGKILL during pushes, deletes and garbage collections ----------

/// Kills of the whole process tree in the soak (issue 13: "at least 100").
const SOAK_KILLS: u64 = 100;
const SOAK_REPOS: usize = 4;
/// Threads pushing, mounting and deleting; one more collects garbage.
const SOAK_WORKERS: u64 = 3;
/// Blobs present at once above which the workers only delete, so that every verification (one
/// GET per object the test knows) stays short however many rounds ran before.
const SOAK_PRESENT_BLOBS_MAX: usize = 120;
/// Blobs known to be absent kept as candidates for a push of the same bytes again.
const SOAK_ABSENT_BLOBS_MAX: usize = 60;

/// What the soak knows of one object from the answers it received.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Known {
    Present,
    Absent,
    /// A request changing it got no answer (the kill came first): the restart tells which.
    Unknown,
}

/// Something a repository can hold. Image `seed` is config blob `seed`, layer blob `seed + 1`, the
/// manifest over them and the tag `i<seed>` naming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Object {
    Blob { repo: usize, seed: u64 },
    Manifest { repo: usize, seed: u64 },
    Tag { repo: usize, seed: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    known: Known,
    /// A worker's request about it is under way: no other worker touches it meanwhile, so the
    /// answer alone says what it is now.
    busy: bool,
}

type Model = std::collections::BTreeMap<Object, Entry>;

fn soak_repo(repo: usize) -> String {
    format!("soak/r{repo}")
}

/// From a few bytes to 600 KB: big ones span several PATCHes and are often mid-body at the kill.
fn soak_blob(seed: u64) -> Vec<u8> {
    let len = match seed % 4 {
        0 => 17 + (seed as usize % 1000),
        1 => 20 * 1024 + (seed as usize % 4096),
        2 => 200 * 1024 + (seed as usize % 10_000),
        _ => 600 * 1024 - (seed as usize % 10_000),
    };
    blob_of_len(seed, len)
}

fn soak_manifest(seed: u64) -> Vec<u8> {
    to_bytes(&image_manifest_value(
        &soak_blob(seed),
        &[&soak_blob(seed + 1)],
    ))
}

/// The path that serves an object, and the bytes it must serve.
fn soak_path(object: Object) -> (String, Vec<u8>) {
    match object {
        Object::Blob { repo, seed } => {
            let bytes = soak_blob(seed);
            let digest = common::sha256(&bytes);
            (format!("/v2/{}/blobs/{digest}", soak_repo(repo)), bytes)
        }
        Object::Manifest { repo, seed } => {
            let bytes = soak_manifest(seed);
            let digest = common::sha256(&bytes);
            (format!("/v2/{}/manifests/{digest}", soak_repo(repo)), bytes)
        }
        Object::Tag { repo, seed } => (
            format!("/v2/{}/manifests/i{seed}", soak_repo(repo)),
            soak_manifest(seed),
        ),
    }
}

/// splitmix64: the soak's choices are a function of its seeds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One server's life in the soak: the requests its workers send until the kill.
struct Round<'a> {
    server: &'a Server,
    model: &'a std::sync::Mutex<Model>,
    in_flight: AtomicUsize,
    killed: std::sync::atomic::AtomicBool,
    /// Answers other than the expected ones, received before the kill.
    refusals: std::sync::Mutex<Vec<String>>,
    /// Acknowledged operations by kind, for the soak's summary.
    tally: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

/// A request's answer: status and `Location`.
struct Answer {
    status: u16,
    location: Option<String>,
}

impl Round<'_> {
    fn repo_url(&self, repo: usize, rest: &str) -> String {
        self.server.url(&format!("/v2/{}/{rest}", soak_repo(repo)))
    }

    /// Sends a request (counted as in flight until its whole answer is read); None without one.
    fn send(&self, rb: reqwest::blocking::RequestBuilder) -> Option<Answer> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let answer = rb.send().and_then(|r| {
            let status = r.status().as_u16();
            let location = r
                .headers()
                .get("Location")
                .and_then(|l| l.to_str().ok())
                .map(|l| location_url(self.server, l));
            r.bytes().map(|_| Answer { status, location })
        });
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        answer.ok()
    }

    /// The answer if its status is `want`. Otherwise None, and an unexpected status is recorded
    /// unless the kill had begun (a plane may see the other die).
    fn expect(&self, answer: Option<Answer>, want: u16, what: &str) -> Option<Answer> {
        let answer = answer?;
        if answer.status == want {
            return Some(answer);
        }
        if !self.killed.load(Ordering::SeqCst) {
            let e = format!("{what}: {} instead of {want}", answer.status);
            self.refusals.lock().unwrap().push(e);
        }
        None
    }

    /// Pushes blob `seed` one of three ways: 201 gives Present, anything else Unknown.
    fn push_blob(&self, repo: usize, seed: u64, how: u64) -> Known {
        let bytes = soak_blob(seed);
        let digest = common::sha256(&bytes);
        let what = format!("push of blob {seed} ({} bytes) to r{repo}", bytes.len());
        let c = client();
        let uploads = self.repo_url(repo, "blobs/uploads/");
        let acked = match how % 3 {
            0 => self.send(
                c.post(format!("{uploads}?digest={digest}"))
                    .body(bytes.clone()),
            ),
            1 => self
                .expect(self.send(c.post(&uploads)), 202, &what)
                .and_then(|a| a.location)
                .and_then(|l| {
                    let put = with_query(&l, &format!("digest={digest}"));
                    self.send(c.put(put).body(bytes.clone()))
                }),
            _ => {
                let mut location = self
                    .expect(self.send(c.post(&uploads)), 202, &what)
                    .and_then(|a| a.location);
                let mut offset = 0;
                for chunk in bytes.chunks(128 * 1024) {
                    let Some(l) = location else { break };
                    let end = offset + chunk.len() - 1;
                    let patch = c
                        .patch(l)
                        .header("Content-Range", format!("{offset}-{end}"))
                        .body(chunk.to_vec());
                    location = self
                        .expect(self.send(patch), 202, &what)
                        .and_then(|a| a.location);
                    offset = end + 1;
                }
                location.and_then(|l| self.send(c.put(with_query(&l, &format!("digest={digest}")))))
            }
        };
        match self.expect(acked, 201, &what) {
            Some(_) => {
                self.count(
                    [
                        "blob pushes (POST)",
                        "blob pushes (POST, PUT)",
                        "blob pushes (PATCH)",
                    ][how as usize % 3],
                );
                Known::Present
            }
            None => Known::Unknown,
        }
    }

    fn count(&self, kind: &'static str) {
        *self.tally.lock().unwrap().entry(kind).or_default() += 1;
    }

    /// Marks a random free object that `wanted` accepts as busy.
    fn claim(&self, rng: &mut Rng, wanted: impl Fn(&Object, Known) -> bool) -> Option<Object> {
        let mut model = self.model.lock().unwrap();
        let free: Vec<Object> = model
            .iter()
            .filter(|(o, e)| !e.busy && wanted(o, e.known))
            .map(|(o, _)| *o)
            .collect();
        let object = *free.get(rng.below(free.len().max(1)))?;
        model.get_mut(&object).unwrap().busy = true;
        Some(object)
    }

    /// Records what a request said about an object and frees it.
    fn settle(&self, object: Object, known: Known) {
        let entry = Entry { known, busy: false };
        self.model.lock().unwrap().insert(object, entry);
    }

    /// A new object, busy until settled.
    fn create(&self, object: Object) {
        let entry = Entry {
            known: Known::Unknown,
            busy: true,
        };
        let old = self.model.lock().unwrap().insert(object, entry);
        assert!(old.is_none(), "seed of {object:?} reused");
    }

    /// One worker: random operations on the model until the server stops answering. Returns
    /// false once a request got no (expected) answer.
    fn operate(&self, rng: &mut Rng, fresh: &mut impl FnMut() -> u64) -> bool {
        let present_blobs = self
            .model
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, e)| matches!(o, Object::Blob { .. }) && e.known == Known::Present)
            .count();
        let full = present_blobs >= SOAK_PRESENT_BLOBS_MAX;
        let c = client();
        let op = rng.below(12);
        match op {
            // Delete a blob from a repository.
            0..=2 => {
                let Some(o @ Object::Blob { repo, seed }) = self.claim(rng, |o, k| {
                    matches!(o, Object::Blob { .. }) && k == Known::Present
                }) else {
                    return full || self.push_new_blob(rng, fresh);
                };
                let digest = common::sha256(&soak_blob(seed));
                let a = self.send(c.delete(self.repo_url(repo, &format!("blobs/{digest}"))));
                let done = self.expect(a, 202, &format!("delete of {o:?}")).is_some();
                self.settle(o, if done { Known::Absent } else { Known::Unknown });
                if done {
                    self.count("blob deletes");
                }
                done
            }
            // Delete a manifest by digest (and so its tag).
            3 => {
                let mut model = self.model.lock().unwrap();
                let free: Vec<(usize, u64)> = model
                    .iter()
                    .filter_map(|(o, e)| match *o {
                        Object::Manifest { repo, seed } if !e.busy && e.known == Known::Present => {
                            Some((repo, seed))
                        }
                        _ => None,
                    })
                    .filter(|&(repo, seed)| {
                        let tag = model.get(&Object::Tag { repo, seed });
                        tag.is_none_or(|e| !e.busy)
                    })
                    .collect();
                let Some(&(repo, seed)) = free.get(rng.below(free.len().max(1))) else {
                    drop(model);
                    return full || self.push_new_blob(rng, fresh);
                };
                let (manifest, tag) = (Object::Manifest { repo, seed }, Object::Tag { repo, seed });
                // A tag known absent may have been forgotten (`soak_prune`).
                let tag_before = model.get(&tag).map_or(Known::Absent, |e| e.known);
                model.get_mut(&manifest).unwrap().busy = true;
                model.insert(
                    tag,
                    Entry {
                        known: tag_before,
                        busy: true,
                    },
                );
                drop(model);
                let digest = common::sha256(&soak_manifest(seed));
                let a = self.send(c.delete(self.repo_url(repo, &format!("manifests/{digest}"))));
                let done = self
                    .expect(a, 202, &format!("delete of {manifest:?}"))
                    .is_some();
                if done {
                    self.count("manifest deletes");
                }
                let (m, t) = match (done, tag_before) {
                    (true, _) => (Known::Absent, Known::Absent),
                    (false, Known::Absent) => (Known::Unknown, Known::Absent),
                    (false, _) => (Known::Unknown, Known::Unknown),
                };
                self.settle(manifest, m);
                self.settle(tag, t);
                done
            }
            // Delete a tag (its manifest stays).
            4 => {
                let Some(o @ Object::Tag { repo, seed }) = self.claim(rng, |o, k| {
                    matches!(o, Object::Tag { .. }) && k == Known::Present
                }) else {
                    return full || self.push_new_blob(rng, fresh);
                };
                let a = self.send(c.delete(self.repo_url(repo, &format!("manifests/i{seed}"))));
                let done = self.expect(a, 202, &format!("delete of {o:?}")).is_some();
                self.settle(o, if done { Known::Absent } else { Known::Unknown });
                if done {
                    self.count("tag deletes");
                }
                done
            }
            _ if full => true,
            // Mount a blob from the repository holding it into one that does not.
            5 => {
                let mut model = self.model.lock().unwrap();
                let pairs: Vec<(Object, Object)> = model
                    .iter()
                    .filter(|(_, e)| !e.busy && e.known == Known::Present)
                    .filter_map(|(o, _)| match *o {
                        Object::Blob { repo, seed } => Some((repo, seed)),
                        _ => None,
                    })
                    .flat_map(|(from, seed)| {
                        (0..SOAK_REPOS).filter(move |&r| r != from).map(move |to| {
                            let source = Object::Blob { repo: from, seed };
                            (source, Object::Blob { repo: to, seed })
                        })
                    })
                    .filter(|(_, target)| {
                        model
                            .get(target)
                            .is_none_or(|e| !e.busy && e.known == Known::Absent)
                    })
                    .collect();
                let Some(&(source, target)) = pairs.get(rng.below(pairs.len().max(1))) else {
                    drop(model);
                    return self.push_new_blob(rng, fresh);
                };
                model.get_mut(&source).unwrap().busy = true;
                model.insert(
                    target,
                    Entry {
                        known: Known::Absent,
                        busy: true,
                    },
                );
                drop(model);
                let (Object::Blob { repo: from, seed }, Object::Blob { repo: to, .. }) =
                    (source, target)
                else {
                    unreachable!()
                };
                let digest = common::sha256(&soak_blob(seed));
                let url = self.repo_url(
                    to,
                    &format!("blobs/uploads/?mount={digest}&from={}", soak_repo(from)),
                );
                let a = self.send(c.post(url));
                let done = self.expect(a, 201, &format!("mount of {source:?} into r{to}"));
                self.settle(source, Known::Present);
                let known = if done.is_some() {
                    self.count("mounts");
                    Known::Present
                } else {
                    Known::Unknown
                };
                self.settle(target, known);
                done.is_some()
            }
            // Push the bytes of a deleted blob again (garbage collection may be removing them).
            6 => {
                let Some(o @ Object::Blob { repo, seed }) = self.claim(rng, |o, k| {
                    matches!(o, Object::Blob { .. }) && k == Known::Absent
                }) else {
                    return self.push_new_blob(rng, fresh);
                };
                let known = self.push_blob(repo, seed, rng.next());
                self.settle(o, known);
                known == Known::Present
            }
            // Push an image: config, layer, then the manifest under its tag.
            7..=8 => {
                let repo = rng.below(SOAK_REPOS);
                let seed = fresh();
                let config = Object::Blob { repo, seed };
                let layer = Object::Blob {
                    repo,
                    seed: seed + 1,
                };
                let (manifest, tag) = (Object::Manifest { repo, seed }, Object::Tag { repo, seed });
                for o in [config, layer, manifest, tag] {
                    self.create(o);
                }
                let mut blobs = [Known::Unknown; 2];
                for (i, known) in blobs.iter_mut().enumerate() {
                    *known = self.push_blob(repo, seed + i as u64, rng.next());
                    if *known != Known::Present {
                        break;
                    }
                }
                let mut pushed = Known::Absent; // not sent
                if blobs == [Known::Present; 2] {
                    let a = self.send(
                        c.put(self.repo_url(repo, &format!("manifests/i{seed}")))
                            .header("Content-Type", OCI_MANIFEST)
                            .body(soak_manifest(seed)),
                    );
                    let done = self.expect(a, 201, &format!("push of {manifest:?}"));
                    pushed = if done.is_some() {
                        self.count("manifest pushes");
                        Known::Present
                    } else {
                        Known::Unknown
                    };
                }
                self.settle(config, blobs[0]);
                let layer_known = match blobs[0] {
                    Known::Present => blobs[1],
                    _ => Known::Absent, // not sent
                };
                self.settle(layer, layer_known);
                self.settle(manifest, pushed);
                self.settle(tag, pushed);
                pushed == Known::Present
            }
            _ => self.push_new_blob(rng, fresh),
        }
    }

    fn push_new_blob(&self, rng: &mut Rng, fresh: &mut impl FnMut() -> u64) -> bool {
        let o = Object::Blob {
            repo: rng.below(SOAK_REPOS),
            seed: fresh(),
        };
        let Object::Blob { repo, seed } = o else {
            unreachable!()
        };
        self.create(o);
        let known = self.push_blob(repo, seed, rng.next());
        self.settle(o, known);
        known == Known::Present
    }

    /// Garbage collections, a few tens of milliseconds apart, until the server stops answering.
    fn collect_garbage(&self, rng: &mut Rng) {
        for _ in 0..10_000 {
            let a = self.send(client().post(self.server.url("/v2/_lighter/gc")));
            if self.expect(a, 200, "garbage collection").is_none() {
                return;
            }
            self.count("garbage collections");
            std::thread::sleep(Duration::from_millis(5 + rng.below(40) as u64));
        }
    }
}

/// After a restart: every object known present is served with its exact bytes, every one known
/// absent is not, and an unknown one is either (then known). No tag names a missing manifest, and
/// every file under `blobs/` hashes to its name. Returns how many objects are present.
fn soak_verify(server: &Server, model: &mut Model, kill: u64) -> usize {
    for (&object, entry) in model.iter_mut() {
        assert!(!entry.busy, "{object:?} still busy after the round");
        let (path, want) = soak_path(object);
        let r = get(server, &path);
        let found = match r.status {
            200 => {
                assert!(
                    r.body == want,
                    "after kill {kill}: {object:?} is served with {} bytes that are not its own \
                     ({} expected): a partial or foreign file is visible",
                    r.body.len(),
                    want.len()
                );
                if !matches!(object, Object::Blob { .. }) {
                    assert_eq!(r.header("Docker-Content-Digest"), common::sha256(&want));
                }
                true
            }
            404 => false,
            _ => panic!("after kill {kill}: GET {path}: {}", r.describe()),
        };
        match entry.known {
            Known::Present => assert!(found, "after kill {kill}: acknowledged {object:?} is gone"),
            Known::Absent => assert!(
                !found,
                "after kill {kill}: {object:?}, deleted and acknowledged (or never sent), is back"
            ),
            Known::Unknown => {}
        }
        entry.known = if found { Known::Present } else { Known::Absent };
    }
    for (&object, entry) in model.iter() {
        if let (Object::Tag { repo, seed }, Known::Present) = (object, entry.known) {
            assert_eq!(
                model[&Object::Manifest { repo, seed }].known,
                Known::Present,
                "after kill {kill}: tag {object:?} names a missing manifest"
            );
        }
    }
    assert_blobs_hash_to_their_names(&server.data_dir);
    model.values().filter(|e| e.known == Known::Present).count()
}

/// Forgets what cannot change any more: manifests and tags known absent (their seeds are never
/// pushed again), and the oldest absent blobs beyond those kept to be pushed again.
fn soak_prune(model: &mut Model) {
    model.retain(|o, e| matches!(o, Object::Blob { .. }) || e.known != Known::Absent);
    let absent: Vec<Object> = model
        .iter()
        .filter(|(_, e)| e.known == Known::Absent)
        .map(|(o, _)| *o)
        .collect();
    for o in absent
        .iter()
        .take(absent.len().saturating_sub(SOAK_ABSENT_BLOBS_MAX))
    {
        model.remove(o);
    }
}

// Layout / the publish protocol and gc, as a soak (issue 13, "Crash consistency"): 100 SIGKILLs
// of the whole process tree, each during concurrent pushes (monolithic, POST then PUT, chunked),
// mounts, deletes of blobs, manifests and tags, and garbage collections; after each restart every
// acknowledged push not deleted since is intact, every acknowledged delete holds, whatever was in
// flight is whole or absent, and every blob file hashes to its name.
#[test]
fn soak_sigkill_during_pushes_deletes_and_gc_loses_nothing_acknowledged() {
    let kills = std::env::var("LIGHTER_SOAK_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(SOAK_KILLS);
    let tmp = tempfile::tempdir().unwrap();
    let model = std::sync::Mutex::new(Model::new());
    let started = std::time::Instant::now();
    let (mut requests_at_kill, mut present) = (0, 0);
    let mut tally = std::collections::BTreeMap::<&str, u64>::new();
    for kill in 0..kills {
        let mut server = Server::start_in(tmp.path(), &[]);
        if kill > 0 {
            present = soak_verify(&server, &mut model.lock().unwrap(), kill);
            soak_prune(&mut model.lock().unwrap());
        }
        let round = Round {
            server: &server,
            model: &model,
            in_flight: AtomicUsize::new(0),
            killed: Default::default(),
            refusals: Default::default(),
            tally: Default::default(),
        };
        let mut rng = Rng(kill);
        // 100 to 400 ms of traffic, then the kill.
        let traffic = Duration::from_millis(100 + rng.below(300) as u64);
        std::thread::scope(|scope| {
            for w in 0..SOAK_WORKERS {
                let round = &round;
                scope.spawn(move || {
                    let mut rng = Rng(kill * 1000 + w);
                    // Seeds of this worker in this round; images take two.
                    let mut next = (kill * SOAK_WORKERS + w) * 1_000_000;
                    let mut fresh = || {
                        next += 2;
                        next
                    };
                    for _ in 0..10_000 {
                        if !round.operate(&mut rng, &mut fresh) {
                            return;
                        }
                    }
                });
            }
            let round = &round;
            scope.spawn(move || round.collect_garbage(&mut Rng(kill * 1000 + 999)));
            std::thread::sleep(traffic);
            let mut spins = 0u64;
            while round.in_flight.load(Ordering::SeqCst) == 0 {
                spins += 1;
                assert!(spins < 100_000_000, "no request ever in flight");
                std::hint::spin_loop();
            }
            requests_at_kill += round.in_flight.load(Ordering::SeqCst);
            round.killed.store(true, Ordering::SeqCst);
            kill_tree(server.pid());
        });
        let refusals = round.refusals.lock().unwrap().clone();
        assert!(refusals.is_empty(), "before kill {kill}: {refusals:?}");
        for (kind, n) in round.tally.into_inner().unwrap() {
            *tally.entry(kind).or_default() += n;
        }
        server.kill();
    }
    let server = Server::start_in(tmp.path(), &[]);
    let present_at_end = soak_verify(&server, &mut model.lock().unwrap(), kills);
    eprintln!(
        "soak: {kills} kills in {:?}, {requests_at_kill} requests in flight at the kills, \
         {present} objects present before the last round, {present_at_end} at the end; \
         acknowledged: {tally:?}",
        started.elapsed()
    );
    // The restarted server still takes pushes in every repository.
    for repo in 0..SOAK_REPOS {
        let bytes = common::random_bytes(5000, 8_000_000 + repo as u64);
        let digest = push_blob(&server, &soak_repo(repo), &bytes);
        assert_eq!(
            get(&server, &format!("/v2/{}/blobs/{digest}", soak_repo(repo))).body,
            bytes
        );
    }
}
