//! Connections handed to the control plane come back to the data plane after the answer (RFC
//! 9112 §9.3, persistence): a push's requests, a pull after a refusal, a catalog read, all on one
//! TCP connection, whichever plane answers each. A connection the exchange cannot leave clean (a
//! body not read to its end, a chunked body, `Connection: close`, HTTP/1.0) is closed, and its
//! answer says so.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::clients::{clients, descriptor, gunzip, gzip, ok, tar, write_layout, Tools};
use common::containerd::Containerd;
use common::{prometheus_values, sha256, Server, OCI_MANIFEST};
use serde_json::json;

/// An answer read off a connection.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn closes(&self) -> bool {
        self.header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// One client connection, requests written by hand so the test sees which socket carries them.
struct Conn {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(server: &Server) -> Conn {
        let stream = TcpStream::connect(server.host()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Conn {
            stream: Box::new(stream),
            buf: Vec::new(),
        }
    }

    /// Over TLS, trusting only the CA in `ca` (one handshake for the connection's life).
    fn open_tls(server: &Server, ca: &std::path::Path) -> Conn {
        use rustls_pki_types::pem::PemObject;
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let session = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(server.host()).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            stream: Box::new(rustls::StreamOwned::new(session, tcp)),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write a request");
        self.stream.flush().expect("flush a request");
    }

    /// Writes what the server may no longer read.
    fn send_rest(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: registry\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes);
    }

    /// Reads one answer (Content-Length framed; HEAD answers have no body).
    fn answer(&mut self, head_request: bool) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().expect("the connection closed before an answer");
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).expect("ascii head");
        self.buf.drain(..end);
        let status = head[9..12].parse().expect("status code");
        let mut a = Answer {
            status,
            head,
            body: Vec::new(),
        };
        let len: usize = match a.header("Content-Length") {
            Some(v) if !head_request => v.parse().unwrap(),
            _ => 0,
        };
        while self.buf.len() < len {
            self.fill().expect("the connection closed inside a body");
        }
        a.body = self.buf.drain(..len).collect();
        a
    }

    fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }

    /// True when the server has closed the connection (nothing more to read).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill().is_none()
    }

    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        self.request(method, path, headers, body);
        self.answer(method == "HEAD")
    }
}

fn handoff_counts(server: &Server) -> (u64, u64) {
    let text = reqwest::blocking::get(server.url("/v2/_lighter/metrics"))
        .unwrap()
        .text()
        .unwrap();
    let v = prometheus_values(&text);
    (
        v["lighter_handoffs_total"],
        v["lighter_handoffs_returned_total"],
    )
}

/// A push (POST, PATCH, PUT, manifest PUT), pulls of what it pushed, and a catalog read, all
/// on one connection: the control plane answers the writes, the data plane the pulls.
fn push_and_pull_on_one_connection(server: &Server) {
    push_and_pull_on(Conn::open(server));
}

fn push_and_pull_on(mut c: Conn) {
    let repo = "keep/alive";
    let layer = common::random_bytes(300_000, 7);
    let digest = sha256(&layer);

    let a = c.exchange("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");
    assert_eq!(a.status, 202, "{}", a.head);
    assert!(
        !a.closes(),
        "a clean exchange keeps the connection: {}",
        a.head
    );
    let location = a.header("Location").unwrap().to_string();

    let a = c.exchange(
        "PATCH",
        &location,
        &[("Content-Type", "application/octet-stream")],
        &layer,
    );
    assert_eq!(a.status, 202, "{}", a.head);
    let location = a.header("Location").unwrap().to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let a = c.exchange("PUT", &format!("{location}{sep}digest={digest}"), &[], b"");
    assert_eq!(a.status, 201, "{}", a.head);
    assert_eq!(a.header("Docker-Content-Digest"), Some(digest.as_str()));

    // The blob, from the data plane, on the same connection.
    let a = c.exchange("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], b"");
    assert_eq!(a.status, 200);
    assert_eq!(sha256(&a.body), digest);
    assert_eq!(a.body, layer);

    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let config_digest = sha256(config);
    let a = c.exchange(
        "POST",
        &format!("/v2/{repo}/blobs/uploads/?digest={config_digest}"),
        &[],
        config,
    );
    assert_eq!(a.status, 201, "{}", a.head);

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", &layer)],
    }))
    .unwrap();
    let a = c.exchange(
        "PUT",
        &format!("/v2/{repo}/manifests/v1"),
        &[("Content-Type", OCI_MANIFEST)],
        &manifest,
    );
    assert_eq!(a.status, 201, "{}", a.head);
    let a = c.exchange(
        "GET",
        &format!("/v2/{repo}/manifests/v1"),
        &[("Accept", OCI_MANIFEST)],
        b"",
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.body, manifest);
    let a = c.exchange("GET", "/v2/_catalog", &[], b"");
    assert_eq!(a.status, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&a.body).unwrap()["repositories"],
        json!([repo])
    );
    let a = c.exchange("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], b"");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("Content-Length"), Some("300000"));
}

#[test]
fn a_push_and_its_pulls_share_one_connection_io_uring() {
    let server = Server::start_args(&["--io-engine", "io_uring"]);
    let (before, returned_before) = handoff_counts(&server);
    push_and_pull_on_one_connection(&server);
    let (after, returned_after) = handoff_counts(&server);
    // The metrics reads are handoffs too: one each.
    let handed = after - before - 1;
    assert_eq!(handed, 6, "six requests went to the control plane");
    // The first metrics read's connection comes back too (reqwest keeps it).
    let returned = returned_after - returned_before;
    assert!(
        (6..=7).contains(&returned),
        "each came back: {returned_before} -> {returned_after}"
    );
}

// Over HTTPS the control plane's requests are relayed by the data plane; the relay gives the
// connection and its TLS session back to the core after each answer: one handshake for all.
#[test]
fn a_push_and_its_pulls_share_one_tls_connection() {
    let pki = tempfile::tempdir().unwrap();
    common::tls::make_ca(pki.path());
    let (crt, key) = common::tls::make_leaf(pki.path(), "leaf", "registry", 1);
    let server = Server::start_args(&[
        "--tls-cert-path",
        crt.to_str().unwrap(),
        "--tls-key-path",
        key.to_str().unwrap(),
    ]);
    let ca = pki.path().join("ca.crt");
    push_and_pull_on(Conn::open_tls(&server, &ca));
    let c = common::tls::https_client(&ca, true);
    let text = c
        .get(server.https_url("/v2/_lighter/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let v = prometheus_values(&text);
    assert_eq!(v["lighter_handoffs_total"], 7, "six requests and this one");
    assert_eq!(
        v["lighter_handoffs_returned_total"], 6,
        "every one came back"
    );
}

#[test]
fn a_push_and_its_pulls_share_one_connection_epoll() {
    let server = Server::start_args(&["--io-engine", "epoll"]);
    push_and_pull_on_one_connection(&server);
}

// RFC 9112 §9.3.2 (pipelining): requests sent at once are answered in order, whichever plane
// answers each and wherever the next one's bytes were when the connection changed hands.
#[test]
fn pipelined_requests_are_answered_in_order_across_the_planes() {
    for engine in ["io_uring", "epoll"] {
        let server = Server::start_args(&["--io-engine", engine]);
        let mut c = Conn::open(&server);
        let mut batch = Vec::new();
        for path in [
            "/v2/",
            "/v2/_catalog",
            "/v2/",
            "/v2/_catalog?n=1",
            "/v2/nothing/tags/list",
        ] {
            batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: r\r\n\r\n").as_bytes());
        }
        c.send(&batch);
        let statuses: Vec<(u16, bool)> = (0..5)
            .map(|_| {
                let a = c.answer(false);
                (a.status, a.body.starts_with(b"{\"repositories\""))
            })
            .collect();
        assert_eq!(
            statuses,
            [
                (200, false),
                (200, true),
                (200, false),
                (200, true),
                (404, false)
            ],
            "{engine}"
        );
        let a = c.exchange("GET", "/v2/", &[], b"");
        assert_eq!(a.status, 200, "{engine}: the connection still serves");
    }
}

// A body the answer did not wait for (a 404 before a 1 MiB upload was read): the answer says
// `Connection: close` and the connection closes; the rest of the body is never read as a
// request by either plane.
#[test]
fn a_body_answered_before_it_was_read_closes_the_connection() {
    let server = Server::start();
    let body = vec![b'G'; 1 << 20];
    // The head says a 1 MiB body follows; only part of it is sent before the answer.
    let head_only = format!(
        "PUT /v2/no/such/blobs/uploads/abc?digest={} HTTP/1.1\r\nHost: r\r\nContent-Length: {}\r\n\r\n",
        sha256(&body),
        body.len()
    );
    let mut c = Conn::open(&server);
    c.send(head_only.as_bytes());
    c.send(&body[..4096]);
    let a = c.answer(false);
    assert_eq!(a.status, 404, "{}", a.head);
    assert!(
        a.closes(),
        "the answer says the connection ends: {}",
        a.head
    );
    let _ = c.send_rest(&body[4096..]);
    assert!(c.closed(), "nothing more is answered on it");
    // The server is fine.
    assert_eq!(
        Conn::open(&server).exchange("GET", "/v2/", &[], b"").status,
        200
    );
}

// RFC 9112 §9.6 and §9.3: `Connection: close` and HTTP/1.0 end the connection after the
// answer; a chunked body (whose end the hand-back cannot see) too, and the answer says so.
#[test]
fn close_http10_and_chunked_end_the_connection() {
    let server = Server::start();

    let mut c = Conn::open(&server);
    let a = c.exchange("GET", "/v2/_catalog", &[("Connection", "close")], b"");
    assert_eq!(a.status, 200);
    assert!(a.closes(), "{}", a.head);
    assert!(c.closed());

    let mut c = Conn::open(&server);
    c.send(b"GET /v2/_catalog HTTP/1.0\r\nHost: r\r\n\r\n");
    let a = c.answer(false);
    assert_eq!(a.status, 200);
    assert!(c.closed());

    let mut c = Conn::open(&server);
    let a = c.exchange("POST", "/v2/chunk/ed/blobs/uploads/", &[], b"");
    let location = a.header("Location").unwrap().to_string();
    let data = common::random_bytes(10_000, 3);
    let mut req = format!(
        "PATCH {location} HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        data.len()
    )
    .into_bytes();
    req.extend_from_slice(&data);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    c.send(&req);
    let a = c.answer(false);
    assert_eq!(a.status, 202, "{}", a.head);
    assert_eq!(a.header("Range"), Some("0-9999"));
    assert!(a.closes(), "{}", a.head);
    assert!(c.closed());
}

/// A 12-layer image as an OCI layout under `dir` (tag `v1`), and its manifest and layers.
fn twelve_layer_layout(dir: &std::path::Path) -> (Vec<u8>, Vec<Vec<u8>>) {
    let layers: Vec<Vec<u8>> = (0..12u64)
        .map(|i| {
            gzip(&tar(&[(
                format!("layer-{i}.bin"),
                common::random_bytes(20_000 + i as usize * 1000, 100 + i),
            )]))
        })
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| sha256(&gunzip(l))).collect::<Vec<_>>()},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
    }))
    .unwrap();
    let mut blobs: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
    blobs.push(&config);
    blobs.push(&manifest);
    write_layout(dir, &blobs, &[("v1", OCI_MANIFEST, &manifest)]);
    (manifest, layers)
}

fn assert_stored(server: &Server, repo: &str, manifest: &[u8], layers: &[Vec<u8>]) {
    let pulled = Server::client()
        .get(server.url(&format!("/v2/{repo}/manifests/v1")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(pulled.as_ref(), manifest);
    for l in layers {
        let got = Server::client()
            .get(server.url(&format!("/v2/{repo}/blobs/{}", sha256(l))))
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(sha256(&got), sha256(l));
    }
}

// The counted effect with a real keep-alive client: containerd's `ctr images push` of a
// 12-layer image. Every request the control plane answers gives its connection back, and the
// image arrives whole.
#[test]
fn containerd_push_gives_every_connection_back() {
    if !clients(&["ctr", "containerd"]) {
        return;
    }
    let server = Server::start();
    let ctd = Containerd::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let (manifest, layers) = twelve_layer_layout(&layout);
    let archive = work.path().join("image.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let name = format!("{}/keep/ctr", server.host());
    let out = ctd.output(&[
        "images",
        "import",
        "--no-unpack",
        "--base-name",
        &name,
        &archive.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "ctr import: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (before, returned_before) = handoff_counts(&server);
    let out = ctd.output(&["images", "push", "--plain-http", &format!("{name}:v1")]);
    assert!(
        out.status.success(),
        "ctr push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (after, returned_after) = handoff_counts(&server);
    let handed = after - before - 1;
    let returned = returned_after - returned_before;
    // Per blob a POST and a PUT; then the manifest.
    assert!(
        handed > 2 * 13,
        "containerd's writes went to the control plane: {handed}"
    );
    assert!(
        returned + 1 >= handed,
        "every handed-over connection came back: {returned} of {handed}"
    );
    assert_stored(&server, "keep/ctr", &manifest, &layers);
}

// skopeo (containers/image, as podman and buildah) asks `Connection: close` on every request:
// the control plane's answers say `close` and each connection ends, as asked; the push works.
#[test]
fn skopeo_asks_close_and_gets_it() {
    if !clients(&["skopeo"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let layout = tools.path().join("layout");
    let (manifest, layers) = twelve_layer_layout(&layout);
    let (before, returned_before) = handoff_counts(&server);
    ok(&mut tools.copy(
        &["--preserve-digests", "--dest-tls-verify=false"],
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/keep/skopeo:v1", server.host()),
    ));
    let (after, returned_after) = handoff_counts(&server);
    assert!(after - before > 2 * 13);
    // Only the metrics read's own connection may have come back.
    assert!(returned_after - returned_before <= 1);
    assert_stored(&server, "keep/skopeo", &manifest, &layers);
}

// RFC 9112 §9.5: a server may close idle connections. A core at connections_per_core_max
// closes the connection that has waited longest for a request to take a new one, so idle
// connections, however many, do not lock clients out; a connection in the middle of a request
// is never the one closed.
#[test]
fn a_full_core_closes_its_longest_idle_connection_for_a_new_one() {
    for engine in ["io_uring", "epoll"] {
        let server = Server::start_args(&[
            "--cores",
            "1",
            "--connections-per-core-max",
            "4",
            "--io-engine",
            engine,
        ]);
        // A request half sent: not idle, never evicted.
        let mut busy = Conn::open(&server);
        busy.send(b"GET /v2/ HTTP/1.1\r\nHost: r\r\n");
        std::thread::sleep(Duration::from_millis(50));
        let mut idle: Vec<Conn> = (0..3)
            .map(|_| {
                let mut c = Conn::open(&server);
                assert_eq!(c.exchange("GET", "/v2/", &[], b"").status, 200);
                std::thread::sleep(Duration::from_millis(20));
                c
            })
            .collect();
        // The core is full; each newcomer is served, and the oldest idle connection goes.
        for round in 0..3 {
            let mut c = Conn::open(&server);
            let a = c.exchange("GET", "/v2/", &[], b"");
            assert_eq!(a.status, 200, "{engine}: newcomer {round} served");
            assert!(
                idle[round].closed(),
                "{engine}: idle connection {round} closed for it"
            );
            idle.push(c);
        }
        // The connection mid-request was kept: its request completes.
        busy.send(b"\r\n");
        assert_eq!(busy.answer(false).status, 200, "{engine}");
    }
}

// RFC 9110 §10.1.1: a request with `Expect: 100-continue` gets the interim 100, then its
// answer, which keeps the connection (the interim write is not the answer's start).
#[test]
fn an_expect_100_continue_push_keeps_its_connection() {
    let server = Server::start();
    let mut c = Conn::open(&server);
    let a = c.exchange("POST", "/v2/keep/expect/blobs/uploads/", &[], b"");
    assert_eq!(a.status, 202);
    let location = a.header("Location").unwrap().to_string();
    let body = common::random_bytes(50_000, 4);
    let sep = if location.contains('?') { '&' } else { '?' };
    c.send(
        format!(
            "PUT {location}{sep}digest={} HTTP/1.1\r\nHost: r\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            sha256(&body),
            body.len()
        )
        .as_bytes(),
    );
    let interim = c.answer(false);
    assert_eq!(interim.status, 100, "{}", interim.head);
    c.send(&body);
    let a = c.answer(false);
    assert_eq!(a.status, 201, "{}", a.head);
    assert!(!a.closes(), "{}", a.head);
    let a = c.exchange(
        "GET",
        &format!("/v2/keep/expect/blobs/{}", sha256(&body)),
        &[],
        b"",
    );
    assert_eq!(a.status, 200);
    assert_eq!(a.body, body);
}
