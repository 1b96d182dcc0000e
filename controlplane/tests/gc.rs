//! Garbage collection of content no repository holds (`POST /v2/_lighter/gc`, `lighter gc`,
//! `gc_interval_ms`), against the real binary. A repository serves only what it links
//! (Distribution spec, "Deleting blobs" and "Deleting manifests": a delete makes content
//! unreachable from that repository); content that no repository links any more is reachable by
//! no request, and garbage collection removes it from disk, while pushes, mounts and pulls go on.

mod common;
mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{sha256, Server};
use oci::*;
use serde_json::Value;

fn content_path(server: &Server, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    server
        .data_dir
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

fn gc(server: &Server, query: &str) -> Value {
    let r = post(server, &format!("/v2/_lighter/gc{query}"));
    r.assert_status(200);
    r.json()
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

/// Two images share a layer; one is deleted (its manifest and its blob links). A dry run
/// reports exactly its unshared content and removes nothing; a collection (through the CLI)
/// removes exactly that; the other image still pulls byte for byte; the deleted one can be
/// pushed again.
#[test]
fn gc_removes_exactly_the_content_no_repository_holds() {
    let server = Server::start();
    let shared = common::random_bytes(5000, 1);
    let a_only = common::random_bytes(7000, 2);
    let b_only = common::random_bytes(9000, 3);
    let config_a = br#"{"architecture":"amd64","os":"linux","image":"a"}"#.to_vec();
    let config_b = br#"{"architecture":"amd64","os":"linux","image":"b"}"#.to_vec();
    let push = |repo: &str, config: &[u8], layers: &[&[u8]]| -> String {
        push_blob(&server, repo, config);
        for l in layers {
            push_blob(&server, repo, l);
        }
        let manifest = to_bytes(&image_manifest_value(config, layers));
        push_manifest(&server, repo, "1.0", OCI_MANIFEST, &manifest);
        sha256(&manifest)
    };
    let manifest_a = push("team/a", &config_a, &[&shared, &a_only]);
    let manifest_b = push("team/b", &config_b, &[&shared, &b_only]);

    // Delete image a: the manifest (and so its tag), then every blob link of team/a.
    delete(&server, &format!("/v2/team/a/manifests/{manifest_a}")).assert_status(202);
    for blob in [&config_a, &shared, &a_only] {
        delete(&server, &format!("/v2/team/a/blobs/{}", sha256(blob))).assert_status(202);
    }
    let gone = [manifest_a.clone(), sha256(&config_a), sha256(&a_only)];
    let kept = [
        manifest_b.clone(),
        sha256(&config_b),
        sha256(&shared),
        sha256(&b_only),
    ];
    let before = count_files(&server.data_dir.join("blobs"));
    assert_eq!(before, 7, "three pieces of a, four of b (one shared)");

    let dry = gc(&server, "?dry_run=true");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["blobs"], 7);
    assert_eq!(dry["unreferenced_blobs"], 3, "{dry}");
    let unreferenced_bytes: u64 = config_a.len() as u64
        + a_only.len() as u64
        + std::fs::metadata(content_path(&server, &manifest_a))
            .unwrap()
            .len();
    assert_eq!(dry["unreferenced_bytes"], unreferenced_bytes);
    assert_eq!(dry["removed_blobs"], 0);
    for d in gone.iter().chain(&kept) {
        assert!(content_path(&server, d).exists(), "a dry run removed {d}");
    }

    let out = Command::new(common::BIN)
        .args(["gc", "--registry", &server.url("")])
        .output()
        .unwrap();
    assert!(out.status.success(), "lighter gc: {out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("lighter gc prints JSON");
    assert_eq!(report["dry_run"], false);
    assert_eq!(report["removed_blobs"], 3, "{report}");
    assert_eq!(report["removed_bytes"], unreferenced_bytes);
    for d in &gone {
        assert!(!content_path(&server, d).exists(), "{d} is still on disk");
    }
    for d in &kept {
        assert!(content_path(&server, d).exists(), "{d} was removed");
    }
    assert_eq!(count_files(&server.data_dir.join("blobs")), 4);

    // b is whole; a comes back with a push; a second collection finds nothing.
    let m = get_manifest(&server, "team/b", "1.0", OCI_MANIFEST);
    m.assert_status(200);
    assert_eq!(sha256(&m.body), manifest_b);
    for blob in [&config_b, &shared, &b_only] {
        let r = get(&server, &format!("/v2/team/b/blobs/{}", sha256(blob)));
        r.assert_status(200);
        assert!(r.body == *blob);
    }
    let again = push("team/a", &config_a, &[&shared, &a_only]);
    assert_eq!(again, manifest_a);
    let r = get(&server, &format!("/v2/team/a/blobs/{}", sha256(&a_only)));
    r.assert_status(200);
    assert!(r.body == a_only);
    assert_eq!(gc(&server, "")["removed_blobs"], 0);

    let metrics = get(&server, "/v2/_lighter/metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("\nlighter_gc_removed_blobs_total 3\n"),
        "{text}"
    );
    assert!(text.contains("\nlighter_gc_runs_total 3\n"), "{text}");
}

/// Pushes, mounts and deletes of the same content race with collections that see it
/// unreferenced: every push and mount that was acknowledged is then pullable, byte for byte,
/// and nothing acknowledged is ever removed (a collection re-reads the links with publishing
/// paused before it removes anything).
#[test]
fn collections_racing_pushes_of_the_same_content_lose_nothing() {
    let server = Arc::new(Server::start());
    let blob = Arc::new(common::random_bytes(64 << 10, 9));
    let digest = sha256(&blob);
    let done = Arc::new(AtomicBool::new(false));
    let collector = {
        let (server, done) = (server.clone(), done.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            let mut removed = 0;
            while !done.load(Ordering::Relaxed) {
                let r = gc(&server, "");
                removed += r["removed_blobs"].as_u64().unwrap();
                runs += 1;
            }
            (runs, removed)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    while rounds < 150 && Instant::now() < deadline {
        // Push (the content may still be on disk, unreferenced: the push only links it).
        push_blob(&server, "race/a", &blob);
        let r = get(&server, &format!("/v2/race/a/blobs/{digest}"));
        assert_eq!(
            r.status,
            200,
            "round {rounds}: pushed, then {}",
            r.describe()
        );
        assert!(r.body == *blob, "round {rounds}");
        // Mount into another repository, then drop it from the first.
        let m = open_upload(&server, "race/b", &format!("mount={digest}&from=race/a"));
        assert_eq!(m.status, 201, "round {rounds}: mount: {}", m.describe());
        delete(&server, &format!("/v2/race/a/blobs/{digest}")).assert_status(202);
        let r = get(&server, &format!("/v2/race/b/blobs/{digest}"));
        assert_eq!(
            r.status,
            200,
            "round {rounds}: mounted, then {}",
            r.describe()
        );
        assert!(r.body == *blob, "round {rounds}");
        delete(&server, &format!("/v2/race/b/blobs/{digest}")).assert_status(202);
        rounds += 1;
    }
    done.store(true, Ordering::Relaxed);
    let (runs, removed) = collector.join().unwrap();
    eprintln!("{rounds} rounds, {runs} collections, {removed} removals");
    assert!(
        runs > 1 && rounds > 10,
        "the race ran: {rounds} rounds, {runs} collections"
    );
    // Unreferenced at the end: the last collection takes it.
    gc(&server, "");
    assert!(!content_path(&server, &digest).exists());
    assert_alive(&server);
}

/// Bad input to the endpoint and the periodic collector (`gc_interval_ms`).
#[test]
fn gc_endpoint_input_and_the_timer() {
    let server = Server::start_args(&["--gc-interval-ms", "300"]);
    let r = post(&server, "/v2/_lighter/gc?dry_run=maybe");
    r.assert_error(400, "UNSUPPORTED");
    let r = get(&server, "/v2/_lighter/gc");
    r.assert_error(405, "UNSUPPORTED");
    // An orphan: pushed, then unlinked; the timer collects it without being asked.
    let digest = push_blob(&server, "timer/app", b"collected by the timer");
    delete(&server, &format!("/v2/timer/app/blobs/{digest}")).assert_status(202);
    let deadline = Instant::now() + Duration::from_secs(20);
    while content_path(&server, &digest).exists() {
        assert!(Instant::now() < deadline, "the timer never collected");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        server
            .wait_for_log("garbage collection done", Duration::from_secs(5))
            .is_some(),
        "collections are logged"
    );
}
