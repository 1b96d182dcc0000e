//! Usage (issue 14): pulls summed per repository, tag and digest from the event log
//! (`GET /v2/_lighter/usage`, `lighter usage`), the `lighter events` command, and questions over
//! a large log answered in bounded memory. Real pulls from several client addresses, the real
//! binary's CLI, real restarts.

mod common;
mod oci;

use std::io::Write;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{sha256, Server, BIN};
use oci::push_blob;
use serde_json::Value;

/// An image (config and one layer) pushed as `repo:tag`; its manifest's bytes and the layer's
/// digest and bytes.
fn push_image(server: &Server, repo: &str, tag: &str) -> (Vec<u8>, String, Vec<u8>) {
    let layer = common::random_bytes(30_000, 7);
    let layer_digest = push_blob(server, repo, &layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(server, repo, config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": common::OCI_MANIFEST,
        "config": {"mediaType": common::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": common::OCI_LAYER, "digest": layer_digest, "size": layer.len()}],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let r = Server::client()
        .put(server.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("Content-Type", common::OCI_MANIFEST)
        .body(bytes.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    (bytes, layer_digest, layer)
}

/// A client whose connections come from `ip` (a loopback address: another node, as far as
/// the registry can tell).
fn client_from(ip: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

fn usage(server: &Server, query: &str) -> Value {
    let r = Server::client()
        .get(server.url(&format!("/v2/_lighter/usage?{query}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{query}");
    assert_eq!(r.headers()["content-type"], "application/json");
    serde_json::from_str(&r.text().unwrap()).unwrap()
}

/// The usage answer once `done` holds for it (the drain and the summary each run every
/// second or less, on CPU time nothing else wants: up to 60 s on a busy machine).
fn usage_when(server: &Server, query: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = usage(server, query);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "usage never got there: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn row<'a>(v: &'a Value, key: &str, want: &str) -> &'a Value {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[key] == want)
        .unwrap_or_else(|| panic!("no row with {key} = {want} in {v}"))
}

fn lighter(args: &[&str]) -> (String, String, bool) {
    let out = Command::new(BIN).args(args).output().expect("run lighter");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.success(),
    )
}

/// Pulls from three addresses: by tag, by digest, blobs, HEADs and a 404.
struct Pulled {
    manifest: String,
    layer: String,
    layer_len: usize,
}

fn pull_from_three_clients(server: &Server, repo: &str) -> Pulled {
    let (manifest, layer_digest, layer) = push_image(server, repo, "v1");
    let manifest_digest = sha256(&manifest);
    let accept = common::OCI_MANIFEST;
    for (ip, by_tag, by_digest, blobs) in [
        ("127.0.0.1", 2, 0, 2),
        ("127.0.0.2", 1, 1, 1),
        ("127.0.0.3", 0, 0, 0),
    ] {
        let c = client_from(ip);
        let get = |path: String| {
            let r = c
                .get(server.url(&path))
                .header("Accept", accept)
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            r.bytes().unwrap()
        };
        for _ in 0..by_tag {
            assert_eq!(get(format!("/v2/{repo}/manifests/v1")), manifest);
        }
        for _ in 0..by_digest {
            assert_eq!(
                get(format!("/v2/{repo}/manifests/{manifest_digest}")),
                manifest
            );
        }
        for _ in 0..blobs {
            assert_eq!(
                get(format!("/v2/{repo}/blobs/{layer_digest}")).len(),
                layer.len()
            );
        }
        // A HEAD is not a pull; a 404 is nothing.
        let r = c
            .head(server.url(&format!("/v2/{repo}/manifests/v1")))
            .header("Accept", accept)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let missing = format!("sha256:{}", "0".repeat(64));
        let r = c
            .get(server.url(&format!("/v2/{repo}/blobs/{missing}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    Pulled {
        manifest: manifest_digest,
        layer: layer_digest,
        layer_len: layer.len(),
    }
}

/// Checks the summary of `pull_from_three_clients`: 4 manifest pulls (3 by tag, 1 by
/// digest), 3 blob pulls, 3 HEADs, from 3 addresses (the third only HEADs).
fn check_counts(server: &Server, repo: &str, p: &Pulled) {
    let by_repo = usage_when(server, &format!("repository={repo}"), |v| {
        v["rows"][0]["pulls"] == 4 && v["rows"][0]["blob_pulls"] == 3 && v["rows"][0]["heads"] == 3
    });
    assert_eq!(by_repo["source"], "summary");
    assert_eq!(by_repo["complete"], true);
    let r = row(&by_repo, "repository", repo);
    assert_eq!(r["clients"], 3, "{r}");
    assert_eq!(r["identities"], 0);
    assert_eq!(r["estimated"], false);
    // Bytes: what the log says was sent for those GETs (bodies and heads).
    let events: Vec<Value> = Server::client()
        .get(server.url(&format!("/v2/_lighter/events?repository={repo}")))
        .send()
        .unwrap()
        .text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sent: u64 = events
        .iter()
        .filter(|e| e["status"] == 200 && e["action"].as_str().unwrap().starts_with("pull_"))
        .map(|e| e["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(r["bytes"], sent);
    assert!(sent as usize > 3 * p.layer_len);
    let first = r["first_pull_unix_us"].as_u64().unwrap();
    let last = r["last_pull_unix_us"].as_u64().unwrap();
    assert!(first < last, "{r}");
    assert!(r["first_pull"].as_str().unwrap().ends_with('Z'));

    let by_tag = usage(server, &format!("by=tag&repository={repo}"));
    let rows = by_tag["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{by_tag}");
    let t = row(&by_tag, "tag", "v1");
    assert_eq!(
        (t["pulls"].as_u64(), t["heads"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(t["clients"], 3);

    let by_digest = usage(server, &format!("by=digest&repository={repo}"));
    assert_eq!(
        by_digest["rows"].as_array().unwrap().len(),
        2,
        "{by_digest}"
    );
    let m = row(&by_digest, "digest", &p.manifest);
    assert_eq!(
        (m["pulls"].as_u64(), m["blob_pulls"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(m["clients"], 3);
    let l = row(&by_digest, "digest", &p.layer);
    assert_eq!(
        (l["pulls"].as_u64(), l["blob_pulls"].as_u64()),
        (Some(0), Some(3))
    );
    assert_eq!(l["clients"], 2);
    assert!(l["bytes"].as_u64().unwrap() > 3 * p.layer_len as u64);
}

#[test]
fn pulls_from_three_clients_are_counted_per_repository_tag_and_digest() {
    let server = Server::start();
    let p = pull_from_three_clients(&server, "use/app");
    check_counts(&server, "use/app", &p);
    // Another repository's pulls stay its own.
    let other = pull_from_three_clients(&server, "use/other");
    check_counts(&server, "use/other", &other);
    let all = usage(&server, "");
    let names: Vec<&str> = all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["repository"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["use/app", "use/other"]);
    // A window read from the log agrees with the summary, and one in the future is empty.
    let window = usage(&server, "since=0&by=digest&repository=use/app");
    assert_eq!(window["source"], "log");
    assert_eq!(row(&window, "digest", &p.manifest)["pulls"], 4);
    assert_eq!(row(&window, "digest", &p.layer)["blob_pulls"], 3);
    let future = usage(&server, "since=4102444800000");
    assert_eq!(future["rows"].as_array().unwrap().len(), 0);
}

#[test]
fn usage_pages_follow_next_and_bad_parameters_are_400() {
    let server = Server::start();
    let c = Server::client();
    for i in 0..5 {
        let repo = format!("page/r{i}");
        let d = push_blob(&server, &repo, format!("blob {i}").as_bytes());
        let r = c
            .get(server.url(&format!("/v2/{repo}/blobs/{d}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    usage_when(&server, "", |v| v["rows"].as_array().unwrap().len() == 5);
    let mut seen = Vec::new();
    let mut path = "/v2/_lighter/usage?limit=2".to_owned();
    for _ in 0..5 {
        let r = c.get(server.url(&path)).send().unwrap();
        assert_eq!(r.status(), 200);
        let link = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
        seen.extend(
            v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["repository"].as_str().unwrap().to_owned()),
        );
        match link {
            Some(l) => {
                assert!(v["next"].is_string());
                path = l
                    .split_once('<')
                    .unwrap()
                    .1
                    .split_once('>')
                    .unwrap()
                    .0
                    .to_owned();
            }
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["page/r0", "page/r1", "page/r2", "page/r3", "page/r4"]
    );
    for bad in ["by=image", "limit=0", "limit=x", "since=yesterday"] {
        let r = c
            .get(server.url(&format!("/v2/_lighter/usage?{bad}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED", "{bad}");
    }
    // Still serving.
    assert_eq!(usage(&server, "")["rows"].as_array().unwrap().len(), 5);
}

// The summary is saved with the log position it covers: a restart (graceful or a kill) counts
// nothing twice, and a summary that is gone is rebuilt from the log.
#[test]
fn usage_survives_restarts_and_is_rebuilt_when_gone() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(data.path(), &["--usage-save-interval-ms", "200"]);
    let d = push_blob(&server, "keep/app", b"kept");
    let c = Server::client();
    let pull = |server: &Server, n: usize| {
        for _ in 0..n {
            let r = c
                .get(server.url(&format!("/v2/keep/app/blobs/{d}")))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    let pulls = |v: &Value| v["rows"][0]["blob_pulls"].as_u64().unwrap_or(0);
    pull(&server, 5);
    usage_when(&server, "", |v| pulls(v) == 5);
    // Saved (every 200 ms here), then killed: the next start reads only what came after.
    let saved = data.path().join("events/usage.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&saved).is_ok_and(|s| s.contains("\"blob_pulls\":5")) {
        assert!(Instant::now() < deadline, "usage.json never saved");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.kill();
    let mut server = Server::start_in(data.path(), &[]);
    pull(&server, 2);
    let v = usage_when(&server, "", |v| pulls(v) >= 7 && v["complete"] == true);
    assert_eq!(pulls(&v), 7, "{v}");
    // A graceful stop saves up to the end of the log.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.alive() {
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::read_to_string(&saved)
        .unwrap()
        .contains("\"blob_pulls\":7"));
    // Gone: rebuilt from the log, same counts.
    std::fs::remove_file(&saved).unwrap();
    let server = Server::start_in(data.path(), &[]);
    let v = usage_when(&server, "", |v| v["complete"] == true && pulls(v) == 7);
    assert_eq!(v["rows"][0]["clients"], 1);
    // Garbage in its place: rebuilt too.
    drop(server);
    std::fs::write(&saved, b"{not json").unwrap();
    let server = Server::start_in(data.path(), &[]);
    usage_when(&server, "", |v| v["complete"] == true && pulls(v) == 7);
}

// `lighter usage` and `lighter events`, the built binary, as a table and as JSON.
#[test]
fn the_usage_and_events_commands_print_tables_and_json() {
    let server = Server::start();
    let p = pull_from_three_clients(&server, "cli/app");
    check_counts(&server, "cli/app", &p);
    let registry = server.url("");

    let (out, err, ok) = lighter(&["usage", "--registry", &registry, "--by", "tag"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "REPOSITORY",
            "TAG",
            "PULLS",
            "BLOB",
            "PULLS",
            "HEADS",
            "BYTES",
            "CLIENTS",
            "IDENTITIES",
            "FIRST",
            "PULL",
            "LAST",
            "PULL"
        ]
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&cells[..5], ["cli/app", "v1", "3", "0", "3"], "{out}");
    assert_eq!(cells[7], "3", "clients: {out}");

    let (out, err, ok) = lighter(&["usage", "--registry", &registry, "--by", "digest", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["by"], "digest");
    assert_eq!(row(&v, "digest", &p.manifest)["pulls"], 4);
    assert_eq!(row(&v, "digest", &p.layer)["blob_pulls"], 3);
    assert_eq!(v, {
        let mut api = usage(&server, "by=digest");
        api.as_object_mut().unwrap().remove("next");
        api
    });

    // Events: JSON lines as the API gives them; a table with one row each.
    let api: Vec<Value> = Server::client()
        .get(server.url("/v2/_lighter/events?repository=cli/app"))
        .send()
        .unwrap()
        .text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Each client's pulls, HEAD and 404 (13), and whatever else the log holds of the repository.
    assert!(api.len() >= 13, "{api:?}");
    let (out, err, ok) = lighter(&[
        "events",
        "--registry",
        &registry,
        "--repository",
        "cli/app",
        "--json",
    ]);
    assert!(ok, "{err}");
    let got: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, api);
    let (out, err, ok) = lighter(&[
        "events",
        "--registry",
        &registry,
        "--repository",
        "cli/app",
        "--action",
        "pull_blob",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "TIME",
            "ACTION",
            "REPOSITORY",
            "REFERENCE",
            "STATUS",
            "BYTES",
            "CLIENT",
            "IDENTITY"
        ]
    );
    // TIME is two words: the status is the sixth.
    let blobs: Vec<&&str> = lines[1..]
        .iter()
        .filter(|l| l.split_whitespace().nth(5) == Some("200"))
        .collect();
    assert_eq!(blobs.len(), 3, "{out}");
    let short = &p.layer[..19];
    for l in &blobs {
        assert!(
            l.contains("pull_blob") && l.contains("cli/app") && l.contains(short),
            "{l}"
        );
        assert!(
            l.contains("29.") && l.contains("KiB"),
            "bytes for people: {l}"
        );
    }
    // --limit pages through the log and stops.
    let (out, _, ok) = lighter(&["events", "--registry", &registry, "--limit", "4", "--json"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 4);
    // Errors name what was wrong.
    let (_, err, ok) = lighter(&["usage", "--registry", &registry, "--since", "yesterday"]);
    assert!(!ok);
    assert!(err.contains("400") && err.contains("since"), "{err}");
    let (_, err, ok) = lighter(&["events", "--registry", "http://127.0.0.1:1"]);
    assert!(!ok);
    assert!(
        err.starts_with("lighter events: http://127.0.0.1:1"),
        "{err}"
    );
}

// --- a large log ---------------------------------------------------------------------------

const REPOS: u64 = 200;
const TAGS_PER_REPO: u64 = 5;
const DIGESTS_PER_REPO: u64 = 20;
const CLIENTS: u64 = 1000;

/// `n` pulls written as the event log's files (the documented line format), 4 files, over the
/// last `n` ms; returns the time of the first line (unix µs).
fn write_log(dir: &std::path::Path, n: u64) -> u64 {
    let events = dir.join("events");
    std::fs::create_dir_all(&events).unwrap();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let start_us = now_us - n * 1000 - 60_000_000;
    let per_file = n.div_ceil(4);
    let mut out = None;
    for i in 0..n {
        let t = start_us + i * 1000;
        if i % per_file == 0 {
            let f = std::fs::File::create(events.join(format!("{}.jsonl", t / 1000))).unwrap();
            out = Some(std::io::BufWriter::with_capacity(1 << 20, f));
        }
        let w = out.as_mut().unwrap();
        let repo = i % REPOS;
        let digest = format!(
            "sha256:{:064x}",
            (i / REPOS) % DIGESTS_PER_REPO + repo * 1000
        );
        let (action, reference) = if i % 3 == 0 {
            ("pull_manifest", format!("v{}", (i / REPOS) % TAGS_PER_REPO))
        } else {
            ("pull_blob", digest.clone())
        };
        writeln!(
            w,
            r#"{{"time":"x","time_unix_us":{t},"source":"dataplane","action":"{action}","repository":"big/r{repo}","reference":"{reference}","status":200,"bytes":{},"duration_us":50,"digest":"{digest}","client":"10.0.{}.{}","user_agent":"containerd/2.0","core":{}}}"#,
            1000 + i % 7,
            (i % CLIENTS) / 256,
            (i % CLIENTS) % 256,
            i % 2
        )
        .unwrap();
    }
    out.unwrap().flush().unwrap();
    start_us
}

/// The control plane's peak resident memory (VmHWM), bytes.
fn control_plane_peak_rss(server: &Server) -> u64 {
    let pid = server
        .children()
        .into_iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"control-plane"))
        })
        .expect("the control plane's process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Writes `n` events, starts the registry over them and asks: the summary rebuilt from the
/// whole log, events filtered and paged, usage paged and in a window; checks the answers and
/// that the control plane's peak memory stayed under `rss_max_bytes`.
fn large_log(n: u64, rss_max_bytes: u64) {
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let start_us = write_log(data.path(), n);
    let log_bytes: u64 = std::fs::read_dir(data.path().join("events"))
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();
    eprintln!(
        "wrote {n} events ({log_bytes} bytes) in {:?}",
        started.elapsed()
    );
    let server = Server::start_in(data.path(), &[]);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let all = loop {
        let v = usage(&server, "limit=10000");
        if v["complete"] == true {
            break v;
        }
        assert!(Instant::now() < deadline, "the summary was never rebuilt");
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("summary rebuilt from the log in {:?}", started.elapsed());
    let rows = all["rows"].as_array().unwrap();
    assert_eq!(rows.len() as u64, REPOS);
    let total: u64 = rows
        .iter()
        .map(|r| r["pulls"].as_u64().unwrap() + r["blob_pulls"].as_u64().unwrap())
        .sum();
    assert_eq!(total, n);
    let r0 = row(&all, "repository", "big/r0");
    assert_eq!(r0["clients"], CLIENTS / REPOS, "{r0}");
    assert_eq!(r0["first_pull_unix_us"], start_us);
    assert_eq!(
        all["entries"].as_u64().unwrap(),
        REPOS * (1 + TAGS_PER_REPO + DIGESTS_PER_REPO)
    );

    // Events: a filter that matches few lines spread over every file, paged.
    let started = Instant::now();
    let c = Server::client();
    let mut path =
        "/v2/_lighter/events?repository=big/r7&action=pull_manifest&limit=5000".to_owned();
    let mut got = 0u64;
    loop {
        let r = c.get(server.url(&path)).send().unwrap();
        assert_eq!(r.status(), 200);
        let link = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        for l in r.text().unwrap().lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["repository"], "big/r7");
            got += 1;
        }
        match link {
            Some(l) => {
                path = l
                    .split_once('<')
                    .unwrap()
                    .1
                    .split_once('>')
                    .unwrap()
                    .0
                    .to_owned()
            }
            None => break,
        }
    }
    let want = (0..n).filter(|i| i % REPOS == 7 && i % 3 == 0).count() as u64;
    assert_eq!(got, want);
    eprintln!(
        "{got} events in pages of 5000 out of {n} in {:?}",
        started.elapsed()
    );

    // Usage by digest, paged from the summary; and a window (the last quarter) from the log.
    let started = Instant::now();
    let mut after = String::new();
    let mut digests = 0u64;
    loop {
        let q = if after.is_empty() {
            "by=digest&limit=1000".to_owned()
        } else {
            format!("by=digest&limit=1000&after={after}")
        };
        let v = usage(&server, &q);
        digests += v["rows"].as_array().unwrap().len() as u64;
        match v["next"].as_str() {
            Some(next) => after = next.replace('@', "%40"),
            None => break,
        }
    }
    assert_eq!(digests, REPOS * DIGESTS_PER_REPO);
    let since_ms = (start_us + n * 3 / 4 * 1000) / 1000;
    let window = usage(&server, &format!("since={since_ms}&limit=10000"));
    assert_eq!(window["source"], "log");
    let in_window: u64 = window["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pulls"].as_u64().unwrap() + r["blob_pulls"].as_u64().unwrap())
        .sum();
    let want = (0..n)
        .filter(|i| (start_us + i * 1000) >= since_ms * 1000)
        .count() as u64;
    assert_eq!(in_window, want);
    eprintln!("usage paged and windowed in {:?}", started.elapsed());

    let peak = control_plane_peak_rss(&server);
    eprintln!(
        "control plane peak RSS (VmHWM) {} MiB over {n} events, {} MiB of log",
        peak >> 20,
        log_bytes >> 20
    );
    assert!(
        peak < rss_max_bytes,
        "peak RSS {peak} bytes over the bound {rss_max_bytes}"
    );
}

// A log of 100,000 events (about 40 MB): every answer right, the control plane under 64 MiB.
#[test]
fn a_large_log_is_summed_and_queried_in_bounded_memory() {
    large_log(100_000, 64 << 20);
}

// The same over 1,000,000 events (about 400 MB of log), under the same bound: memory does not
// grow with the log. Minutes in a debug build: `cargo test --test usage -- --ignored`.
#[test]
#[ignore]
fn a_million_events_are_summed_and_queried_in_bounded_memory() {
    large_log(1_000_000, 64 << 20);
}

/// `lighter events --follow --json` prints what is logged after it starts, each line once: a
/// pull made before it started (printed first, from the log), then pulls made while it runs,
/// then it is stopped (it runs until then, as `tail -f`).
#[test]
fn events_follow_prints_new_lines_as_they_are_logged() {
    use std::io::BufRead;
    let server = Server::start();
    let (manifest, _, _) = push_image(&server, "cli/follow", "v1");
    let digest = sha256(&manifest);
    let pull = || {
        let r = Server::client()
            .get(server.url("/v2/cli/follow/manifests/v1"))
            .header("accept", common::OCI_MANIFEST)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    pull();
    let mut child = Command::new(BIN)
        .args([
            "events",
            "--registry",
            &server.url(""),
            "--repository",
            "cli/follow",
        ])
        .args(["--action", "pull_manifest", "--json", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run lighter events --follow");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<Value> = Vec::new();
    let wait_for = |n: usize, seen: &mut Vec<Value>| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while seen.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => seen.push(serde_json::from_str(&line).expect("a JSON line")),
                Err(_) => panic!("{} of {n} lines after 60 s: {seen:?}", seen.len()),
            }
        }
    };
    wait_for(1, &mut seen);
    pull();
    pull();
    wait_for(3, &mut seen);
    // Nothing else comes: no line twice.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    while let Ok(line) = rx.try_recv() {
        seen.push(serde_json::from_str(&line).expect("a JSON line"));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for e in &seen {
        assert_eq!(e["action"], "pull_manifest");
        assert_eq!(e["repository"], "cli/follow");
        assert_eq!(e["digest"], digest.as_str());
        assert_eq!(e["status"], 200);
    }
    let times: Vec<u64> = seen
        .iter()
        .map(|e| e["time_unix_us"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in time order: {times:?}"
    );
}
