//! Retention (`[[retention]]`, `POST /v2/_lighter/retention`, `lighter retention`) against the
//! real binary: on a repository of 50 tags, a dry run lists exactly the tags the rules do not
//! keep and removes nothing; the run removes exactly those (and the manifests and blob links
//! only they kept: Distribution spec, "Deleting tags", "Deleting Manifests"), each removal an
//! event; garbage collection then frees exactly the bytes of the blobs only the removed
//! manifests used.

mod common;
mod oci;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{sha256, Server, OCI_MANIFEST};
use oci::*;
use serde_json::Value;

const CONFIG: &str = r#"
[[immutable_tags]]
prefix = "ci/"
tags = ["v*"]

[[retention]]
prefix = "ci/"
keep_newest = 10
keep_pulled_within_ms = 3600000
keep = ["latest", "stable"]
"#;

fn start_with(config: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("lighter.toml");
    std::fs::write(&path, config).unwrap();
    let p = path.display().to_string();
    let server = Server::launch_temp(|l| l.args(&["--config", &p]));
    (server, dir)
}

fn put(server: &Server, repo: &str, reference: &str, manifest: &[u8]) {
    send(req::put_manifest(
        server,
        repo,
        reference,
        OCI_MANIFEST,
        manifest.to_vec(),
    ))
    .assert_status(201);
}

fn tags(server: &Server, repo: &str) -> BTreeSet<String> {
    let r = get(server, &format!("/v2/{repo}/tags/list"));
    r.assert_status(200);
    r.strings("tags").into_iter().collect()
}

fn removed_tags(report: &Value) -> BTreeSet<String> {
    report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["repository"], "ci/app", "{r}");
            assert_eq!(r["rule"], "retention[0]", "{r}");
            r["tag"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// One build: its own config and layer, and the shared base layer.
struct Build {
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer: Vec<u8>,
}

#[test]
fn retention_on_fifty_tags_dry_run_run_and_gc_free_exactly_the_expected_bytes() {
    let (server, _config) = start_with(CONFIG);
    let repo = "ci/app";
    let base = common::random_bytes(20_000, 999);
    push_blob(&server, repo, &base);
    let builds: Vec<Build> = (0..47u64)
        .map(|i| {
            let config =
                format!(r#"{{"architecture":"amd64","os":"linux","build":{i}}}"#).into_bytes();
            let layer = common::random_bytes(1000 + 37 * i as usize, i);
            push_blob(&server, repo, &config);
            push_blob(&server, repo, &layer);
            let manifest = to_bytes(&image_manifest_value(&config, &[&base, &layer]));
            put(&server, repo, &format!("build-{i:02}"), &manifest);
            Build {
                manifest,
                config,
                layer,
            }
        })
        .collect();
    put(&server, repo, "latest", &builds[46].manifest);
    put(&server, repo, "stable", &builds[5].manifest);
    put(&server, repo, "v1", &builds[3].manifest);
    assert_eq!(tags(&server, repo).len(), 50);
    // An untagged manifest pushed by digest shares build 10's layer; another repository holds
    // build 0's layer. Both layers stay on disk.
    let config_u = br#"{"architecture":"amd64","os":"linux","untagged":true}"#.to_vec();
    push_blob(&server, repo, &config_u);
    let untagged = to_bytes(&image_manifest_value(&config_u, &[&builds[10].layer]));
    put(&server, repo, &sha256(&untagged), &untagged);
    push_blob(&server, "other/app", &builds[0].layer);

    // build-20 is pulled (by containerd, say): kept by keep_pulled_within_ms.
    get_manifest(&server, repo, "build-20", OCI_MANIFEST).assert_status(200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let u = get(&server, "/v2/_lighter/usage?by=tag&repository=ci/app").json();
        let pulled = u["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["tag"] == "build-20" && r["pulls"].as_u64() >= Some(1));
        if pulled && u["complete"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pull never reached the usage summary: {u}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Kept: latest, stable (names), v1 (immutable), build-37..46 (the newest ten of the
    // rest), build-20 (pulled). The other 36 go.
    let expected: BTreeSet<String> = (0..37)
        .filter(|&i| i != 20)
        .map(|i| format!("build-{i:02}"))
        .collect();
    assert_eq!(expected.len(), 36);
    // Their images, but build 5 (stable) and build 3 (v1): 34 manifests and their configs go;
    // their layers too, but build 10's (the untagged manifest uses it). GC then frees all of
    // that but build 0's layer (other/app links it).
    let gone: Vec<usize> = (0..37).filter(|&i| ![3, 5, 20].contains(&i)).collect();
    assert_eq!(gone.len(), 34);
    let freed: Vec<&[u8]> = gone
        .iter()
        .flat_map(|&i| {
            let b = &builds[i];
            let mut v: Vec<&[u8]> = vec![&b.manifest, &b.config];
            if i != 0 && i != 10 {
                v.push(&b.layer);
            }
            v
        })
        .collect();
    let freed_bytes: u64 = freed.iter().map(|b| b.len() as u64).sum();

    // The dry run, through the CLI: exactly those, nothing removed.
    let out = std::process::Command::new(common::BIN)
        .args(["retention", "--dry-run", "--registry"])
        .arg(server.url(""))
        .output()
        .unwrap();
    assert!(out.status.success(), "lighter retention --dry-run: {out:?}");
    let dry: Value = serde_json::from_slice(&out.stdout).expect("lighter retention prints JSON");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(removed_tags(&dry), expected, "{dry}");
    assert_eq!(dry["removed_tags"], 36);
    assert_eq!(dry["tags"], 50);
    assert_eq!(dry["unlinked_manifests"], 34, "{dry}");
    assert_eq!(dry["unlinked_blobs"], 34 + 33, "{dry}");
    assert_eq!(tags(&server, repo).len(), 50, "a dry run removes nothing");
    let gc_dry = post(&server, "/v2/_lighter/gc?dry_run=true");
    gc_dry.assert_status(200);
    assert_eq!(gc_dry.json()["unreferenced_blobs"], 0);

    // The run, through the API: the same tags go, the rest stay and pull.
    let r = post(&server, "/v2/_lighter/retention");
    r.assert_status(200);
    let run = r.json();
    assert_eq!(run["dry_run"], false);
    assert_eq!(removed_tags(&run), expected, "{run}");
    let remaining: BTreeSet<String> = tags(&server, repo);
    let mut want: BTreeSet<String> = (37..47).map(|i| format!("build-{i:02}")).collect();
    want.extend(["build-20", "latest", "stable", "v1"].map(String::from));
    assert_eq!(remaining, want);
    for (tag, build) in [("stable", 5), ("v1", 3), ("build-20", 20), ("latest", 46)] {
        let r = get_manifest(&server, repo, tag, OCI_MANIFEST);
        r.assert_status(200);
        assert_eq!(r.body, builds[build].manifest, "{tag}");
    }
    get_manifest(&server, repo, "build-00", OCI_MANIFEST).assert_error(404, "MANIFEST_UNKNOWN");
    get_manifest(&server, repo, &sha256(&builds[0].manifest), OCI_MANIFEST)
        .assert_error(404, "MANIFEST_UNKNOWN");
    get_manifest(&server, repo, &sha256(&untagged), OCI_MANIFEST).assert_status(200);

    // Each removal is an event.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = get(&server, "/v2/_lighter/events?action=retention_delete_tag");
        r.assert_status(200);
        let lines: Vec<Value> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 36 {
            let logged: BTreeSet<String> = lines
                .iter()
                .map(|l| l["reference"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(logged, expected);
            assert_eq!(lines.len(), 36);
            // Who asked (the POST above), though the work ran on a blocking thread.
            for l in &lines {
                assert_eq!(l["client"], "127.0.0.1", "{l}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} retention events",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Garbage collection frees exactly the blobs only the removed manifests used.
    let r = post(&server, "/v2/_lighter/gc");
    r.assert_status(200);
    let gc = r.json();
    assert_eq!(gc["removed_blobs"], freed.len() as u64, "{gc}");
    assert_eq!(gc["removed_bytes"], freed_bytes, "{gc}");
    for b in &freed {
        let hex = &sha256(b)["sha256:".len()..];
        assert!(!server
            .data_dir
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists());
    }
    let blob = get(&server, &format!("/v2/{repo}/blobs/{}", sha256(&base)));
    blob.assert_status(200);
    assert_eq!(blob.body, base);

    // Nothing more to do.
    let again = post(&server, "/v2/_lighter/retention").json();
    assert_eq!(again["removed_tags"], 0, "{again}");
}

/// With `retention_interval_ms`, the rules apply by themselves: of four tags, `keep_newest = 1`
/// and `keep = ["latest"]` leave the newest and `latest`; a repository no rule covers keeps all.
#[test]
fn the_timer_applies_the_rules() {
    let (server, _config) = start_with(
        "retention_interval_ms = 200\n\
         [[retention]]\nprefix = \"ci/\"\nkeep_newest = 1\nkeep = [\"latest\"]\n",
    );
    for repo in ["ci/timer", "team/app"] {
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        push_blob(&server, repo, &config);
        for (i, tag) in ["a", "b", "latest", "c"].iter().enumerate() {
            let layer = common::random_bytes(500, i as u64);
            push_blob(&server, repo, &layer);
            put(
                &server,
                repo,
                tag,
                &to_bytes(&image_manifest_value(&config, &[&layer])),
            );
        }
    }
    let want: BTreeSet<String> = ["c", "latest"].map(String::from).into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while tags(&server, "ci/timer") != want {
        assert!(Instant::now() < deadline, "{:?}", tags(&server, "ci/timer"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tags(&server, "team/app").len(), 4);
}

#[test]
fn the_endpoint_refuses_bad_parameters_and_needs_rules() {
    let (server, _config) = start_with(CONFIG);
    post(&server, "/v2/_lighter/retention?dry_run=maybe").assert_error(400, "UNSUPPORTED");
    get(&server, "/v2/_lighter/retention").assert_error(405, "UNSUPPORTED");
    let plain = Server::start();
    post(&plain, "/v2/_lighter/retention").assert_error(404, "UNSUPPORTED");
}

#[test]
fn bad_rules_are_refused_at_start() {
    for (config, needle) in [
        (
            "[[retention]]\nprefix = \"ci/\"\n",
            "retention[0] has neither",
        ),
        (
            "[[retention]]\nprefix = \"ci/\"\nkeep_newest = 1\nkeep = [\"a/b\"]\n",
            "retention[0].keep",
        ),
        (
            "events_ring_records = 0\n[[retention]]\nprefix = \"ci/\"\nkeep_pulled_within_ms = 1000\n",
            "events_ring_records = 0",
        ),
        (
            "[[retention]]\nprefix = \"ci/\"\nkeep_newest = 1\n[storage.s3]\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9\"\nregion = \"r\"\n",
            "does not work with [storage.s3]",
        ),
    ] {
        common::assert_config_refused(config, needle);
    }
}
