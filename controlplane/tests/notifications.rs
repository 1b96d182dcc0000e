//! Notifications and tag watches (issue 15): `[[notifications]]` endpoints receive a CloudEvents
//! 1.0 JSON event (structured mode, HMAC-SHA256 signed) for pushes, tag moves, deletes, mirror
//! fetches and tag watches, at least once and in order, from a durable queue that survives an
//! endpoint going away and a kill -9 of the control plane; the queue's bound drops the oldest
//! and counts. The receiver is a small HTTP server in the test, on loopback.

mod common;
mod oci;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::clients::{clients, Image, Tools};
use common::{sha256, Launch, Server, OCI_MANIFEST};
use oci::{delete, get, push_blob, push_manifest};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// An HTTP server on loopback that answers every POST 200 and records it. Stopping it closes
/// its listener: deliveries meet a refused connection until it starts again on the same port.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        Self::start_on(0, Arc::default())
    }

    fn start_on(port: u16, got: Arc<Mutex<Vec<Received>>>) -> Receiver {
        Self::launch(port, got, None)
    }

    /// HTTPS with this certificate and key.
    fn start_tls(cert: &Path, key: &Path) -> Receiver {
        let files = lighter_dataplane::tls::TlsFiles {
            name: "receiver",
            cert: cert.to_owned(),
            key: key.to_owned(),
            cert_field: "cert",
            key_field: "key",
        };
        let resolver = Arc::new(lighter_dataplane::tls::ReloadingCert::load(files).unwrap());
        let tls = lighter_dataplane::tls::server_config(resolver);
        Self::launch(0, Arc::default(), Some(tls))
    }

    fn launch(
        port: u16,
        got: Arc<Mutex<Vec<Received>>>,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, g) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let received = match &tls {
                            None => serve_one(conn),
                            Some(cfg) => tokio_rustls::rustls::ServerConnection::new(cfg.clone())
                                .ok()
                                .and_then(|c| {
                                    serve_one(tokio_rustls::rustls::StreamOwned::new(c, conn))
                                }),
                        };
                        if let Some(r) = received {
                            g.lock().unwrap().push(r);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver {
            port,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    /// Started again on the same port, keeping what it received.
    fn restart(&mut self) {
        self.stop();
        *self = Receiver::start_on(self.port, self.got.clone());
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// What arrived at `path`, once `done` says it is complete (polled, up to 60 s).
    fn wait(&self, path: &str, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got: Vec<Received> = self
                .received()
                .into_iter()
                .filter(|r| r.path == path)
                .collect();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within 60 s; received {:#?}",
                got.iter().map(|r| r.json()).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request (head and Content-Length body), answers 200 and closes.
fn serve_one(conn: impl Read + Write) -> Option<Received> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    assert_eq!(method, "POST", "notifications are POSTed");
    let conn = reader.get_mut();
    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .ok()?;
    conn.flush().ok()?;
    Some(Received {
        path,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Lighter
// ---------------------------------------------------------------------------------------------

/// Writes `toml` as `lighter.toml` in `dir` and starts Lighter over `data` with it.
fn lighter(dir: &Path, data: &Path, toml: &str) -> Server {
    let path = dir.join("lighter.toml");
    std::fs::write(&path, toml).unwrap();
    Launch::new(data)
        .args(&["--config", path.to_str().unwrap()])
        .start()
}

/// Polls the metrics until `name` reaches `want` (up to 30 s).
fn wait_metric(server: &Server, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = server.metrics().get(name).copied().unwrap_or(0);
        if v >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {v}, not {want}, after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pushes a one-layer image whose config says `n` under `repo:tag`; its manifest digest.
fn push_small(server: &Server, repo: &str, tag: &str, n: u64) -> (String, usize) {
    let config = format!("{{\"n\":{n}}}").into_bytes();
    let layer = common::random_bytes(64, n);
    push_blob(server, repo, &config);
    push_blob(server, repo, &layer);
    let manifest = serde_json::to_vec(&oci::image_manifest_value(&config, &[&layer])).unwrap();
    let digest = push_manifest(server, repo, tag, OCI_MANIFEST, &manifest);
    (digest, manifest.len())
}

fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&key, body)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The (type, subject) of each event, in arrival order.
fn kinds(got: &[Received]) -> Vec<(String, String)> {
    got.iter()
        .map(|r| {
            let v = r.json();
            (
                v["type"].as_str().unwrap().to_owned(),
                v["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// A skopeo push, a tag moved by a second push, a tag delete and a manifest delete over HTTP
/// arrive as CloudEvents 1.0 in structured mode, in that order, each with its fields and a
/// valid HMAC-SHA256 of the body under the endpoint's secret (from a file). The configuration
/// of the issue works as written (`actions = ["push", "delete"]`) beside one that hears all.
#[test]
fn pushes_moves_and_deletes_arrive_as_signed_cloudevents() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = b"s3cret-for-the-test";
    std::fs::write(dir.path().join("secret"), [&secret[..], b"\n"].concat()).unwrap();
    let toml = format!(
        "notifications_source = \"https://registry.test\"\n\
         [[notifications]]\nurl = \"{}\"\nactions = [\"push\", \"delete\"]\n\
         [[notifications]]\nurl = \"{}\"\nsecret_file = \"{}\"\n",
        receiver.url("/issue"),
        receiver.url("/all"),
        dir.path().join("secret").display()
    );
    let server = lighter(dir.path(), &dir.path().join("data"), &toml);

    let mut pushed = None;
    if clients(&["skopeo"]) {
        let tools = Tools::plain(server.host());
        let img = Image::build("amd64", 7, "notifications", None, |i| {
            (format!("layer {i}\n"), Image::blob(7, i, 4096, 40))
        });
        tools.push(&img, "team/app:v1", &["--dest-tls-verify=false"]);
        pushed = Some((img.digest.clone(), img.manifest.len()));
    }
    let (d1, size1) = pushed.unwrap_or_else(|| push_small(&server, "team/app", "v1", 1));
    let (d2, size2) = push_small(&server, "team/app", "v1", 2);
    assert_eq!(delete(&server, "/v2/team/app/manifests/v1").status, 202);
    assert_eq!(
        delete(&server, &format!("/v2/team/app/manifests/{d1}")).status,
        202
    );

    let all = receiver.wait("/all", "five events at /all", |g| g.len() >= 5);
    assert_eq!(
        kinds(&all),
        [
            ("io.lighter.push", "team/app:v1".to_owned()),
            ("io.lighter.push", "team/app:v1".to_owned()),
            ("io.lighter.move", "team/app:v1".to_owned()),
            ("io.lighter.delete", "team/app:v1".to_owned()),
            ("io.lighter.delete", format!("team/app@{d1}")),
        ]
        .map(|(t, s)| (t.to_owned(), s))
    );
    let mut ids = std::collections::HashSet::new();
    for r in &all {
        assert_eq!(
            r.headers["content-type"],
            "application/cloudevents+json; charset=utf-8"
        );
        assert_eq!(
            r.headers["x-lighter-signature"],
            format!("sha256={}", hmac_hex(secret, &r.body)),
            "HMAC of {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["source"], "https://registry.test");
        assert_eq!(v["datacontenttype"], "application/json");
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(
            ids.insert(v["id"].as_str().unwrap().to_owned()),
            "ids are unique: {v}"
        );
        assert_eq!(v["data"]["repository"], "team/app");
        assert_eq!(v["data"]["identity"], Value::Null, "anonymous: {v}");
    }
    let d: Vec<Value> = all.iter().map(|r| r.json()["data"].clone()).collect();
    assert_eq!(d[0]["digest"], d1.as_str());
    assert_eq!(d[0]["size"], size1 as u64);
    assert_eq!(d[0]["tag"], "v1");
    assert_eq!(d[0]["media_type"], OCI_MANIFEST);
    assert_eq!(d[0]["old_digest"], Value::Null);
    assert_eq!(d[1]["digest"], d2.as_str());
    assert_eq!(d[1]["size"], size2 as u64);
    assert_eq!(d[2]["digest"], d2.as_str());
    assert_eq!(d[2]["old_digest"], d1.as_str(), "a move names both digests");
    assert_eq!(d[3]["action"], "delete_tag");
    assert_eq!(d[3]["digest"], d2.as_str());
    assert_eq!(d[4]["action"], "delete_manifest");
    assert_eq!(d[4]["digest"], d1.as_str());
    assert_eq!(d[4]["tag"], Value::Null);

    // actions = ["push", "delete"]: the move is not sent there, and no secret, no signature.
    let issue = receiver.wait("/issue", "four events at /issue", |g| g.len() >= 4);
    let types: Vec<String> = kinds(&issue).into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        types,
        [
            "io.lighter.push",
            "io.lighter.push",
            "io.lighter.delete",
            "io.lighter.delete"
        ]
    );
    assert!(issue
        .iter()
        .all(|r| !r.headers.contains_key("x-lighter-signature")));
    // The same events, by id.
    let all_ids: Vec<Value> = all.iter().map(|r| r.json()["id"].clone()).collect();
    for r in &issue {
        assert!(all_ids.contains(&r.json()["id"]));
    }
    let m = server.metrics();
    let label = format!("{{endpoint=\"{}\"}}", receiver.url("/all"));
    assert_eq!(
        m[&format!("lighter_notifications_delivered_total{label}")],
        5
    );
    assert_eq!(m[&format!("lighter_notifications_dropped_total{label}")], 0);
}

/// An https:// endpoint signed by a private CA: with the CA in `ca_file` events arrive; without
/// it (the built-in roots only) every attempt fails and is counted, nothing is delivered.
#[test]
fn https_endpoint_with_a_private_ca_in_ca_file() {
    if !common::clients::on_path("openssl") {
        eprintln!("skipped: no openssl CLI");
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    common::tls::make_ca(pki.path());
    let (cert, key) = common::tls::make_leaf(pki.path(), "hook", "lighter-test-hook", 1501);
    let receiver = Receiver::start_tls(&cert, &key);
    let (trusting, untrusting) = (
        format!("https://127.0.0.1:{}/trusting", receiver.port),
        format!("https://127.0.0.1:{}/untrusting", receiver.port),
    );
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "notifications_retry_initial_ms = 50\nnotifications_retry_max_ms = 100\n\
         [[notifications]]\nurl = \"{trusting}\"\nca_file = \"{}\"\n\
         [[notifications]]\nurl = \"{untrusting}\"\n",
        pki.path().join("ca.crt").display()
    );
    let server = lighter(dir.path(), &dir.path().join("data"), &toml);
    let (digest, _) = push_small(&server, "team/app", "v1", 1);
    let got = receiver.wait("/trusting", "the push over https", |g| !g.is_empty());
    assert_eq!(got[0].json()["data"]["digest"], digest.as_str());
    wait_metric(
        &server,
        &format!("lighter_notifications_failed_attempts_total{{endpoint=\"{untrusting}\"}}"),
        2,
    );
    let m = server.metrics();
    assert_eq!(
        m[&format!("lighter_notifications_delivered_total{{endpoint=\"{untrusting}\"}}")],
        0
    );
    assert!(receiver.received().iter().all(|r| r.path == "/trusting"));
}

/// Filters: an endpoint for pushes under `team/` gets exactly those; one for deletes gets every
/// repository's deletes and nothing else.
#[test]
fn filters_pick_actions_and_repository_prefixes() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[notifications]]\nurl = \"{}\"\nactions = [\"push\"]\nrepositories = [\"team/\"]\n\
         [[notifications]]\nurl = \"{}\"\nactions = [\"delete\"]\n",
        receiver.url("/team-pushes"),
        receiver.url("/deletes"),
    );
    let server = lighter(dir.path(), &dir.path().join("data"), &toml);
    push_small(&server, "team/app", "v1", 1);
    push_small(&server, "teamx/app", "v1", 2);
    push_small(&server, "other/app", "v1", 3);
    push_small(&server, "team/app", "v2", 4);
    for repo in ["teamx/app", "team/app"] {
        assert_eq!(
            delete(&server, &format!("/v2/{repo}/manifests/v1")).status,
            202
        );
    }
    // The last event each wants has come: delivery is in order, so nothing earlier is missing.
    let pushes = receiver.wait("/team-pushes", "team/app:v2", |g| {
        g.iter().any(|r| r.json()["subject"] == "team/app:v2")
    });
    assert_eq!(
        kinds(&pushes),
        [
            ("io.lighter.push".to_owned(), "team/app:v1".to_owned()),
            ("io.lighter.push".to_owned(), "team/app:v2".to_owned()),
        ]
    );
    let deletes = receiver.wait("/deletes", "the delete of team/app:v1", |g| {
        g.iter().any(|r| r.json()["subject"] == "team/app:v1")
    });
    assert_eq!(
        kinds(&deletes),
        [
            ("io.lighter.delete".to_owned(), "teamx/app:v1".to_owned()),
            ("io.lighter.delete".to_owned(), "team/app:v1".to_owned()),
        ]
    );
}

/// The receiver goes away mid-stream and the control plane is killed (-9) while events wait for
/// it; after both come back every event arrives, each once at least, in push order per
/// repository (and overall: one endpoint is served in order).
#[test]
fn receiver_and_control_plane_killed_mid_stream_lose_nothing_and_keep_order() {
    let mut receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let toml = format!(
        "notifications_retry_initial_ms = 50\nnotifications_retry_max_ms = 400\n\
         [[notifications]]\nurl = \"{}\"\nactions = [\"push\"]\n",
        receiver.url("/hook"),
    );
    let mut server = lighter(dir.path(), &data, &toml);
    let mut order: Vec<String> = Vec::new();
    let mut push = |server: &Server, i: u64| {
        let repo = ["alpha/app", "beta/app"][i as usize % 2];
        let tag = format!("t{i}");
        push_small(server, repo, &tag, i);
        order.push(format!("{repo}:{tag}"));
    };
    for i in 0..8 {
        push(&server, i);
    }
    receiver.wait("/hook", "the first eight", |g| g.len() >= 8);
    receiver.stop();
    for i in 8..20 {
        push(&server, i);
    }
    // Written to the queue on disk (within milliseconds of each push), then a crash.
    wait_metric(&server, "lighter_notifications_written_total", 20);
    server.kill();
    let server = lighter(dir.path(), &data, &toml);
    for i in 20..26 {
        push(&server, i);
    }
    receiver.restart();
    let got = receiver.wait("/hook", "all 26 events", |g| {
        let subjects: std::collections::HashSet<String> = g
            .iter()
            .map(|r| r.json()["subject"].as_str().unwrap().to_owned())
            .collect();
        subjects.len() >= 26
    });
    // At least once: a repeat may only be the event in flight when the endpoint went away.
    let mut seen = std::collections::HashSet::new();
    let mut arrived: Vec<String> = Vec::new();
    for r in &got {
        let v = r.json();
        if seen.insert(v["id"].as_str().unwrap().to_owned()) {
            arrived.push(v["subject"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(arrived, order, "every push once, in push order");
    for repo in ["alpha/app", "beta/app"] {
        let of = |v: &[String]| -> Vec<String> {
            v.iter().filter(|s| s.starts_with(repo)).cloned().collect()
        };
        assert_eq!(of(&arrived), of(&order), "order of {repo}");
    }
    assert!(
        got.len() <= arrived.len() + 2,
        "repeats only of events in flight: {} for {}",
        got.len(),
        arrived.len()
    );
}

/// With the endpoint down, a queue past `notifications_queue_max_bytes` drops its oldest events
/// and counts them; what arrives when the endpoint comes back is the newest events in order,
/// and delivered plus dropped is everything.
#[test]
fn the_bound_drops_the_oldest_and_counts() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/hook");
    let toml = format!(
        "notifications_queue_max_bytes = 4096\nnotifications_retry_initial_ms = 50\n\
         notifications_retry_max_ms = 200\n[[notifications]]\nurl = \"{url}\"\n"
    );
    let server = lighter(dir.path(), &dir.path().join("data"), &toml);
    let total = 30u64;
    let mut order = Vec::new();
    for i in 0..total {
        push_small(&server, "team/app", &format!("t{i}"), i);
        order.push(format!("team/app:t{i}"));
    }
    wait_metric(&server, "lighter_notifications_written_total", total);
    let label = format!("{{endpoint=\"{url}\"}}");
    let dropped = server.metrics()[&format!("lighter_notifications_dropped_total{label}")];
    assert!(dropped > 0, "30 events of ~700 bytes pass 4096 bytes");
    let queue_bytes = server.metrics()["lighter_notifications_queue_bytes"];
    assert!(queue_bytes <= 4096, "queue on disk: {queue_bytes} bytes");

    let receiver = Receiver::start_on(port, Arc::default());
    let got = receiver.wait("/hook", "the newest events", |g| {
        g.iter().any(|r| r.json()["subject"] == "team/app:t29")
    });
    let subjects: Vec<String> = kinds(&got).into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        subjects,
        order[dropped as usize..],
        "the newest {} in order, after {dropped} dropped",
        total - dropped
    );
    let m = server.metrics();
    assert_eq!(
        m[&format!("lighter_notifications_delivered_total{label}")] + dropped,
        total
    );
    assert_eq!(
        m[&format!("lighter_notifications_dropped_total{label}")],
        dropped
    );
}

/// A tag watch on a mirrored tag: when the tag moves upstream (a second Lighter), the watch
/// notices within its period, prefetches the new image, and then notifies (and logs
/// `watch_tag`); the new content is
/// here before any client asked for it (pulled with upstream gone).
#[test]
fn a_tag_watch_notices_a_move_prefetches_and_notifies() {
    let mut upstream = Server::start();
    let (v1, _) = push_small(&upstream, "library/nginx", "1.27", 1);
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\n\
         [[tag_watches]]\nimage = \"docker.io/library/nginx:1.27\"\ninterval_ms = 200\n\
         [[notifications]]\nurl = \"{}\"\nactions = [\"watch\", \"move\", \"mirror\"]\n",
        upstream.url(""),
        receiver.url("/hook"),
    );
    let server = lighter(dir.path(), &dir.path().join("data"), &toml);
    // The first round warms the tag as it is (no move yet, no notification).
    let local = "docker.io/library/nginx";
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(dir.path().join(format!("data/repos/{local}/_tags/1.27")))
        .map_or(true, |t| !t.starts_with(&v1))
    {
        assert!(Instant::now() < deadline, "the watch's first round");
        std::thread::sleep(Duration::from_millis(20));
    }

    let config = b"{\"n\":2}".to_vec();
    let layer = common::random_bytes(64, 2);
    let (v2, _) = push_small(&upstream, "library/nginx", "1.27", 2);
    let got = receiver.wait("/hook", "the watch's notification", |g| {
        g.iter().any(|r| r.json()["type"] == "io.lighter.watch")
    });
    let watch = got
        .iter()
        .map(|r| r.json())
        .find(|v| v["type"] == "io.lighter.watch")
        .unwrap();
    assert_eq!(watch["subject"], format!("{local}:1.27"));
    assert_eq!(watch["data"]["digest"], v2.as_str());
    assert_eq!(watch["data"]["old_digest"], v1.as_str());
    assert_eq!(watch["data"]["upstream"], "docker.io");
    assert_eq!(
        watch["data"]["prefetched_bytes"],
        (config.len() + layer.len()) as u64
    );
    // Before it, in order: the mirror fetched the new manifest and saw the tag move, then the
    // prefetch fetched both blobs; the first round's fetches of v1 came before all that.
    let (config_digest, layer_digest) = (sha256(&config), sha256(&layer));
    let v2_events: Vec<Value> = got
        .iter()
        .map(|r| r.json())
        .skip_while(|v| v["data"]["digest"] != v2.as_str())
        .collect();
    let seen: Vec<(String, String)> = v2_events
        .iter()
        .map(|v| {
            (
                v["type"].as_str().unwrap().to_owned(),
                v["data"]["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 5, "{v2_events:#?}");
    assert_eq!(seen[0], ("io.lighter.mirror".to_owned(), v2.clone()));
    assert_eq!(v2_events[0]["data"]["kind"], "manifest");
    assert_eq!(seen[1], ("io.lighter.move".to_owned(), v2.clone()));
    assert_eq!(v2_events[1]["data"]["old_digest"], v1.as_str());
    let mut blobs = vec![seen[2].clone(), seen[3].clone()];
    blobs.sort();
    let mut want = vec![
        ("io.lighter.mirror".to_owned(), config_digest.clone()),
        ("io.lighter.mirror".to_owned(), layer_digest.clone()),
    ];
    want.sort();
    assert_eq!(blobs, want);
    assert_eq!(v2_events[2]["data"]["kind"], "blob");
    assert_eq!(seen[4], ("io.lighter.watch".to_owned(), v2.clone()));
    let before: Vec<Value> = got.iter().map(|r| r.json()).take(got.len() - 5).collect();
    assert!(
        before.iter().all(|v| v["type"] == "io.lighter.mirror"),
        "the first round: only fetches of v1: {before:#?}"
    );
    assert!(before.iter().any(|v| v["data"]["digest"] == v1.as_str()));

    // The event log has it too, with the same digests.
    let logged = common::events::events(&server, "action=watch_tag", 1);
    assert_eq!(logged.len(), 1, "{logged:#?}");
    assert_eq!(logged[0]["repository"], local);
    assert_eq!(logged[0]["reference"], "1.27");
    assert_eq!(logged[0]["digest"], v2.as_str());
    assert_eq!(logged[0]["old_digest"], v1.as_str());

    // Upstream gone: the new image is served from what the watch prefetched.
    upstream.kill();
    let m = oci::get_manifest(&server, local, &v2, OCI_MANIFEST);
    assert_eq!(m.status, 200, "{}", m.describe());
    assert_eq!(sha256(&m.body), v2);
    for blob in [&config, &layer] {
        let r = get(&server, &format!("/v2/{local}/blobs/{}", sha256(blob)));
        assert_eq!(r.status, 200, "{}", r.describe());
        assert!(r.body == *blob, "blob bytes");
    }
}
