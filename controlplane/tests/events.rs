//! The event log (issue 14, first part): what the data plane's cores serve is recorded in their
//! rings, drained by the control plane into `<data>/events/*.jsonl`, queried at
//! `GET /v2/_lighter/events`, and counted as `lighter_dataplane_*` metrics. Real pulls (skopeo),
//! real restarts (SIGTERM and kill -9), real files.

mod common;
mod oci;

use std::time::{Duration, Instant};

use common::clients::{clients, ok, Tools};
use common::events::{events, events_until};
use common::{sha256, Server};
use oci::push_blob;
use serde_json::Value;

/// `GET` of a blob by digest: 200 and the blob's bytes.
fn pull(server: &Server, repo: &str, digest: &str) {
    let r = Server::client()
        .get(server.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().unwrap()), digest);
}

#[test]
fn pulls_are_logged_with_digest_bytes_client_and_agent_and_counted() {
    let server = Server::start();
    let blob = common::random_bytes(12_345, 1);
    let digest = push_blob(&server, "ev/app", &blob);
    for _ in 0..3 {
        let r = Server::client()
            .get(server.url(&format!("/v2/ev/app/blobs/{digest}")))
            .header("User-Agent", "events-test/1.0")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().unwrap().len(), blob.len());
    }
    let r = Server::client()
        .head(server.url(&format!("/v2/ev/app/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = Server::client()
        .get(server.url(&format!("/v2/ev/app/blobs/{missing}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);

    let got = events(&server, "repository=ev/app&source=dataplane", 5);
    assert_eq!(got.len(), 5, "{got:?}");
    let pulls: Vec<&Value> = got.iter().filter(|e| e["action"] == "pull_blob").collect();
    assert_eq!(pulls.len(), 4);
    for e in &pulls[..3] {
        assert_eq!(e["digest"], digest.as_str());
        assert_eq!(e["status"], 200);
        assert!(
            e["bytes"].as_u64().unwrap() > blob.len() as u64,
            "head and body: {e}"
        );
        assert_eq!(e["client"], "127.0.0.1");
        assert_eq!(e["user_agent"], "events-test/1.0");
        assert_eq!(e["source"], "dataplane");
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(pulls[3]["status"], 404);
    assert_eq!(pulls[3]["digest"], missing.as_str());
    let heads: Vec<&Value> = got.iter().filter(|e| e["action"] == "head_blob").collect();
    assert_eq!(heads.len(), 1);

    // Filters: by digest, by action, by time window.
    assert_eq!(
        events(&server, &format!("digest={digest}&source=dataplane"), 4).len(),
        4
    );
    assert_eq!(events(&server, "action=head_blob", 1).len(), 1);
    let first = got[0]["time_unix_us"].as_u64().unwrap();
    let later = events(&server, &format!("since={}", first / 1000 + 1), 0);
    assert!(later.len() < got.len());
    assert!(events(&server, "until=1000", 0).is_empty());

    let m = server.metrics();
    assert_eq!(
        m["lighter_dataplane_requests_total{route=\"blob\",status=\"2xx\"}"],
        4
    );
    assert_eq!(
        m["lighter_dataplane_requests_total{route=\"blob\",status=\"4xx\"}"],
        1
    );
    assert!(m["lighter_dataplane_sent_bytes_total"] > 3 * blob.len() as u64);
    assert_eq!(m["lighter_dataplane_pull_duration_seconds_count"], 5);
    assert!(m["lighter_dataplane_handoffs_total"] >= 1, "the push");
    assert!(m["lighter_events_logged_total"] >= 5);
    assert_eq!(m["lighter_events_dropped_total"], 0);
    assert_eq!(m["lighter_dataplane_engine{engine=\"io_uring\"}"], 1);
}

#[test]
fn pages_follow_the_link_and_bad_parameters_are_400() {
    let server = Server::start();
    let digest = push_blob(&server, "ev/pages", b"paged");
    for _ in 0..7 {
        pull(&server, "ev/pages", &digest);
    }
    events(&server, "repository=ev/pages&source=dataplane", 7);
    let mut url = server.url("/v2/_lighter/events?repository=ev/pages&source=dataplane&limit=3");
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = Server::client().get(&url).send().unwrap();
        assert_eq!(r.status(), 200);
        let next = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_owned());
        let lines: Vec<Value> = r
            .text()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() <= 3);
        seen.extend(lines);
        let Some(next) = next else { break };
        let path = next
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .unwrap()
            .0;
        url = server.url(path);
    }
    assert_eq!(seen.len(), 7, "every event once, in order");
    let times: Vec<u64> = seen
        .iter()
        .map(|e| e["time_unix_us"].as_u64().unwrap())
        .collect();
    // Time order (within a drain exactly; across drains, within the few µs a drain takes).
    assert!(times.windows(2).all(|w| w[0] <= w[1] + 5_000), "{times:?}");

    for bad in ["limit=0", "limit=10001", "since=yesterday", "cursor=nope"] {
        let r = Server::client()
            .get(server.url(&format!("/v2/_lighter/events?{bad}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
        assert!(body["errors"][0]["message"].is_string(), "{bad}: {body}");
    }
}

// A kill -9 of the whole tree loses at most what the rings held and the drain had not taken
// (up to DRAIN_EVERY_MS of pulls); the restart drains the old rings before the new data plane
// replaces them, and no line already written is lost or torn.
#[test]
fn events_survive_restarts_and_a_kill() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(data.path(), &[]);
    let digest = push_blob(&server, "ev/kill", b"survives");
    for _ in 0..5 {
        pull(&server, "ev/kill", &digest);
    }
    assert_eq!(
        events(&server, "repository=ev/kill&source=dataplane", 5).len(),
        5
    );
    // Drained and written: a kill now loses none of them.
    server.kill();
    let mut server = Server::start_in(data.path(), &[]);
    assert_eq!(
        events(&server, "repository=ev/kill&source=dataplane", 5).len(),
        5
    );
    // Pulled for longer than a drain's period right up to a kill: a drain ran meanwhile and
    // left the records too recent to write (ORDER_SLACK_US) in the rings, drained at the next
    // start. (They used to be taken and held in memory, and the kill lost them.)
    let started = std::time::Instant::now();
    let mut pulled = 0;
    while started.elapsed() < std::time::Duration::from_millis(600) {
        pull(&server, "ev/kill", &digest);
        pulled += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.kill();
    let server = Server::start_in(data.path(), &[]);
    let all = events(&server, "repository=ev/kill&source=dataplane", 5 + pulled);
    assert_eq!(
        all.len(),
        5 + pulled,
        "the rings were drained at the restart"
    );
    // Every line of every file is whole JSON.
    for f in std::fs::read_dir(data.path().join("events")).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(text.ends_with('\n'));
        for l in text.lines() {
            serde_json::from_str::<Value>(l).expect("whole lines");
        }
    }
}

// events_file_max_bytes and events_retention_bytes keep the log's size bounded under a storm.
#[test]
fn rotation_keeps_the_log_within_its_retention() {
    let server = Server::start_args(&[
        "--events-file-max-bytes",
        "8192",
        "--events-retention-bytes",
        "32768",
    ]);
    let digest = push_blob(&server, "ev/storm", b"storm");
    let c = Server::client();
    for round in 0..6 {
        for _ in 0..40 {
            let r = c
                .get(server.url(&format!("/v2/ev/storm/blobs/{digest}")))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        // Let a drain write them (each drain is a write; files rotate between drains).
        std::thread::sleep(Duration::from_millis(300));
        let _ = round;
    }
    std::thread::sleep(Duration::from_millis(500));
    let dir = server.data_dir.join("events");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().metadata().unwrap().len())
        .collect();
    let total: u64 = files.iter().sum();
    assert!(files.len() >= 2, "rotated: {files:?}");
    // The bound holds up to the file being written (one drain's lines past a file's limit).
    assert!(
        total <= 32768 + 8192 + 40 * 600,
        "{total} bytes in {files:?}"
    );
    // What is left is queryable, newest included.
    assert!(!events(&server, "repository=ev/storm", 1).is_empty());
}

/// A ring the drain has not emptied yet takes no more records: the pulls that find it full
/// are served all the same, and each is either logged or counted as dropped, never both,
/// never neither.
#[test]
fn pulls_that_find_their_ring_full_are_served_and_counted_as_dropped() {
    // 1 KiB a core: room for a handful of pulls between two drains (every 250 ms).
    let server = Server::start_args(&["--events-ring-records", "1", "--cores", "1"]);
    let blob = common::random_bytes(1_000, 9);
    let digest = push_blob(&server, "full/ring", &blob);
    let pulls = 60;
    for _ in 0..pulls {
        pull(&server, "full/ring", &digest);
    }
    let dropped = server.metrics()["lighter_events_dropped_total"] as usize;
    let logged = events_until(&server, "repository=full/ring&action=pull_blob", |l| {
        l.len() + dropped >= pulls
    });
    assert!(dropped > 0, "a 1 KiB ring cannot hold {pulls} pulls");
    assert_eq!(logged.len() + dropped, pulls, "{dropped} dropped");
    // The log says where its gap is (and a warning too).
    let gap = events_until(&server, "action=events_dropped", |l| !l.is_empty());
    assert_eq!(gap.len(), 1, "{gap:?}");
    let reported = gap[0]["dataplane"].as_u64().unwrap() as usize;
    assert!(
        reported > 0 && reported <= dropped,
        "{reported} of {dropped}"
    );
    assert_eq!(gap[0]["controlplane"], 0);
    assert!(server
        .wait_for_log(
            "records dropped since the last report",
            Duration::from_secs(5)
        )
        .is_some());
    assert_eq!(
        server.metrics()["lighter_dataplane_requests_total{route=\"blob\",status=\"2xx\"}"],
        pulls as u64,
        "every pull counted"
    );
}

/// With the log off, nothing is logged, the endpoint says why, and the data plane's counters
/// are still there: metrics do not need the log.
#[test]
fn the_event_log_can_be_off_and_the_endpoint_says_so_and_pulls_are_still_counted() {
    let server = Server::start_args(&["--events-ring-records", "0"]);
    let r = Server::client()
        .get(server.url("/v2/_lighter/events"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("events_ring_records"));

    let blob = common::random_bytes(5_000, 7);
    let digest = push_blob(&server, "off/app", &blob);
    for _ in 0..3 {
        pull(&server, "off/app", &digest);
    }
    let m = server.metrics();
    assert_eq!(
        m["lighter_dataplane_requests_total{route=\"blob\",status=\"2xx\"}"],
        3
    );
    assert!(m["lighter_dataplane_sent_bytes_total"] > 3 * blob.len() as u64);
    assert_eq!(m["lighter_dataplane_pull_duration_seconds_count"], 3);
    assert!(m["lighter_dataplane_handoffs_total"] >= 1, "the push");
    assert_eq!(m["lighter_events_logged_total"], 0);
    assert_eq!(m["lighter_events_dropped_total"], 0, "no record is offered");
    // Each core's ring is its header alone (its counters); no file of the log is written.
    let rings: Vec<_> = std::fs::read_dir(server.data_dir.join("run/events"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!rings.is_empty());
    for ring in rings {
        assert_eq!(ring.metadata().unwrap().len(), 4096, "{:?}", ring.path());
    }
    assert!(!server.data_dir.join("events").exists());
}

// A real client's pull: skopeo copies an image out; its manifest and blob GETs are logged
// with the digests it asked for.
#[test]
fn a_skopeo_pull_is_logged() {
    if !clients(&["skopeo"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let layer = common::random_bytes(40_000, 9);
    let layer_digest = push_blob(&server, "ev/skopeo", &layer);
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(&server, "ev/skopeo", config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let r = Server::client()
        .put(server.url("/v2/ev/skopeo/manifests/v1"))
        .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .body(bytes.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let out = tools.path().join("out");
    ok(&mut tools.skopeo(&[
        "--insecure-policy",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{}/ev/skopeo:v1", server.host()),
        &format!("dir:{}", out.display()),
    ]));
    let got = events(&server, "repository=ev/skopeo&source=dataplane", 3);
    let manifests: Vec<&Value> = got
        .iter()
        .filter(|e| e["action"] == "pull_manifest" && e["reference"] == "v1")
        .collect();
    assert!(!manifests.is_empty(), "{got:?}");
    assert_eq!(manifests[0]["digest"], sha256(&bytes).as_str());
    assert!(manifests[0]["user_agent"]
        .as_str()
        .unwrap()
        .contains("skopeo"));
    let layer_pulls: Vec<&Value> = got
        .iter()
        .filter(|e| e["action"] == "pull_blob" && e["digest"] == layer_digest.as_str())
        .collect();
    assert_eq!(layer_pulls.len(), 1, "{got:?}");
    assert_eq!(layer_pulls[0]["status"], 200);
}

/// The CPUs a thread of `pid` named `name` may run on (`Cpus_allowed_list` of its status).
fn thread_cpus(pid: u32, name: &str) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned());
        }
    }
    None
}

/// With a data plane thread pinned to its own CPU (one core of several), the control plane's
/// drain runs only on the other CPUs: the log never takes time on a serving core.
#[test]
fn the_drain_stays_off_the_data_planes_pinned_cpu() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let server = Server::start_args(&["--cores", "1"]);
    let (mut dp, mut cp) = (None, None);
    for pid in server.children() {
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.contains("data-plane") {
            dp = Some(pid);
        } else if cmdline.contains("control-plane") {
            cp = Some(pid);
        }
    }
    let (dp, cp) = (dp.expect("a data plane"), cp.expect("a control plane"));
    // The core threads start just after the data plane says it listens.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pinned = loop {
        match thread_cpus(dp, "lighter-dp-0") {
            Some(cpus) => break cpus,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no data plane core thread within 30 s"),
        }
    };
    assert!(
        pinned.parse::<u32>().is_ok(),
        "one data plane thread of two CPUs is pinned to one CPU: {pinned}"
    );
    loop {
        let drain = thread_cpus(cp, "lighter-events").unwrap_or_default();
        let cpus: Vec<&str> = drain.split(',').collect();
        if !drain.is_empty() && !cpus.iter().any(|c| *c == pinned || covers(c, &pinned)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the drain may still run on CPU {pinned}: {drain}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a `Cpus_allowed_list` item (`3` or `0-5`) holds `cpu`.
fn covers(item: &str, cpu: &str) -> bool {
    let cpu: u32 = cpu.parse().unwrap();
    match item.split_once('-') {
        Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).contains(&cpu),
        None => item.parse::<u32>() == Ok(cpu),
    }
}
