//! The pull-through cache against a real upstream registry: CNCF Distribution 2.8 (Debian's
//! `docker-registry`), started per test on a loopback port with its own storage directory, seeded
//! over its OCI API, and, where a test needs to count, slow down, fail or authenticate upstream
//! requests, put behind a small in-process HTTP proxy ([`Proxy`]). Clients: reqwest, skopeo, and
//! containerd's `ctr` against a private containerd daemon.
//!
//! Issue items covered (the pull-through cache): path-prefix and `?ns=` addressing; tags resolved
//! with HEAD and cached for `tag_ttl_ms`; stale tags served when upstream is down, answers 5xx or
//! times out; single-flight blob downloads streamed to clients before they complete and verified
//! before publication; cache hits served without upstream; pushes to mirrors denied; basic and
//! bearer-token upstream auth with credentials kept out of logs; HTTPS upstreams trusted through
//! `ca_file`; skopeo and containerd (hosts.toml mirror) pulls.
//!
//! Needs `docker-registry` (and `htpasswd`, `openssl`, `skopeo`, `containerd`/`ctr` for the tests
//! that use them); `LIGHTER_SKIP_CLIENT_TESTS=1` skips them all.

mod common;
mod oci;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::{gzip_stored, sha256, tar_file, Server};
use oci::*;
use reqwest::Method;
use serde_json::{json, Value};

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Longest wait for anything a test polls for.
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Tools and skipping
// ---------------------------------------------------------------------------------------------

/// True if the test should run: every tool is on PATH. With `LIGHTER_SKIP_CLIENT_TESTS=1` the
/// test is skipped; otherwise a missing tool fails the test, naming the package to install.
fn tools(names: &[&str]) -> bool {
    if std::env::var("LIGHTER_SKIP_CLIENT_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: LIGHTER_SKIP_CLIENT_TESTS=1 (needs {names:?})");
        return false;
    }
    for name in names {
        assert!(
            on_path(name),
            "{name} is not installed (Debian: docker-registry, apache2-utils, openssl, skopeo, \
             containerd); install it or set LIGHTER_SKIP_CLIENT_TESTS=1"
        );
    }
    true
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Polls `f` every 20 ms until it is true or `WAIT` passes.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads lines from a child's pipe into `log`, echoing them (shown when a test fails).
fn drain(pipe: impl Read + Send + 'static, tag: &'static str, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{tag}] {line}");
            log.lock().unwrap().push(line);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Upstream: CNCF Distribution
// ---------------------------------------------------------------------------------------------

/// A `docker-registry serve` of its own on a loopback port, killed on drop.
struct Distribution {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    auth: Option<(String, String)>,
    /// `http`, or `https` when started with a certificate.
    scheme: &'static str,
    /// What the helpers seed and query upstream with (trusting the test CA over HTTPS).
    client: reqwest::blocking::Client,
}

/// A server certificate and key for Distribution, and the CA (PEM) that signed them.
struct TlsFiles<'a> {
    ca: &'a Path,
    cert: &'a Path,
    key: &'a Path,
}

impl Distribution {
    fn start() -> Distribution {
        Self::launch(None, None)
    }

    /// Behind `auth: htpasswd` with one user (bcrypt, as Distribution requires).
    fn start_with_htpasswd(user: &str, password: &str) -> Distribution {
        Self::launch(Some((user, password)), None)
    }

    /// Serving HTTPS only (`http: tls:`) with `tls.cert` and `tls.key`; the helpers trust only
    /// `tls.ca`.
    fn start_tls(tls: TlsFiles) -> Distribution {
        Self::launch(None, Some(tls))
    }

    fn launch(auth: Option<(&str, &str)>, tls: Option<TlsFiles>) -> Distribution {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let mut auth_yaml = String::new();
        if let Some((user, password)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("run htpasswd");
            assert!(out.status.success(), "htpasswd: {out:?}");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: lighter-test\n    path: {}\n",
                file.display()
            );
        }
        let (scheme, http, tls_yaml) = match &tls {
            None => ("http", client().clone(), String::new()),
            Some(t) => (
                "https",
                common::tls::https_client(t.ca, true),
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    t.cert.display(),
                    t.key.display()
                ),
            ),
        };
        for _attempt in 0..5 {
            let port = common::free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                     maintenance:\n    uploadpurging:\n      enabled: false\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: lighter-mirror-tests\n{tls_yaml}\
                     {auth_yaml}",
                    storage.display()
                ),
            )
            .unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn docker-registry");
            let log = Arc::new(Mutex::new(Vec::new()));
            drain(child.stdout.take().unwrap(), "registry", log.clone());
            drain(child.stderr.take().unwrap(), "registry", log.clone());
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let deadline = Instant::now() + WAIT;
            let up = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false; // e.g. the port was taken meanwhile: try another
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("docker-registry did not answer on {addr} within {WAIT:?}");
                }
                let answered = http
                    .get(format!("{scheme}://{addr}/v2/"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .is_ok_and(|r| [200, 401].contains(&r.status().as_u16()));
                if answered {
                    break true;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if up {
                return Distribution {
                    child: Some(child),
                    addr,
                    dir,
                    log,
                    auth: auth.map(|(u, p)| (u.to_owned(), p.to_owned())),
                    scheme,
                    client: http,
                };
            }
        }
        panic!("docker-registry did not start in 5 attempts");
    }

    fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// SIGKILL: upstream is gone (connections refused from now on).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where Distribution's filesystem driver keeps a blob's bytes.
    fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Access-log lines (`"GET /v2/... HTTP/1.1" 200 ...`) of requests for `method` + `path`.
    fn access_count(&self, method: &str, path: &str) -> usize {
        let needle = format!("\"{method} {path} HTTP/1.1\"");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&needle))
            .count()
    }

    fn request(&self, method: Method, path_or_url: &str) -> reqwest::blocking::RequestBuilder {
        let url = if path_or_url.starts_with("http") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.url())
        };
        let rb = self.client.request(method, url);
        match &self.auth {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    fn get(&self, path: &str) -> Reply {
        send(self.request(Method::GET, path).header("Accept", ACCEPT_ALL))
    }

    /// Uploads a blob (POST, then PUT with the bytes), asserting 201; returns its digest.
    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let r = send(
            self.request(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
                .header("Content-Length", "0"),
        );
        assert_eq!(r.status, 202, "upstream upload start: {}", r.describe());
        let location = r.header("Location").to_owned();
        let r = send(
            self.request(
                Method::PUT,
                &with_query(&location, &format!("digest={digest}")),
            )
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec()),
        );
        assert_eq!(r.status, 201, "upstream blob PUT: {}", r.describe());
        digest
    }

    fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let r = send(
            self.request(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
                .header("Content-Type", media_type)
                .body(body.to_vec()),
        );
        assert_eq!(r.status, 201, "upstream manifest PUT: {}", r.describe());
        sha256(body)
    }

    fn push_image(&self, repo: &str, tag: &str, img: &TestImage) {
        self.push_blob(repo, &img.config);
        for l in &img.layers {
            self.push_blob(repo, l);
        }
        self.push_manifest(repo, tag, OCI_MANIFEST, &img.manifest);
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Images with real layers (containerd unpacks them)
// ---------------------------------------------------------------------------------------------

/// An image: config, gzip'd tar layers, its OCI manifest and digest.
struct TestImage {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
    digest: String,
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn test_image(seed: u64) -> TestImage {
    let tars: Vec<Vec<u8>> = (0..2u64)
        .map(|i| {
            tar_file(
                &format!("layer-{seed}-{i}.bin"),
                &common::random_bytes(40_000 + 1000 * i as usize, seed * 10 + i),
            )
        })
        .collect();
    let layers: Vec<Vec<u8>> = tars.iter().map(|t| gzip_stored(t)).collect();
    let config = to_bytes(&json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Env": [format!("SEED={seed}")]},
        "rootfs": {"type": "layers", "diff_ids": tars.iter().map(|t| sha256(t)).collect::<Vec<_>>()},
    }));
    let manifest = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
    }));
    let digest = sha256(&manifest);
    TestImage {
        config,
        layers,
        manifest,
        digest,
    }
}

/// An OCI index with one entry: `img` for this host's platform.
fn index_of(img: &TestImage) -> Vec<u8> {
    to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": img.digest,
            "size": img.manifest.len(),
            "platform": {"architecture": host_arch(), "os": "linux"},
        }],
    }))
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Ok(v) = u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or(""), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// A proxy in front of upstream: counts, throttles, fails, or plays a bearer-token registry
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Relay to Distribution.
    Forward,
    /// Answer every request with this status (an upstream in trouble).
    Status(u16),
    /// Accept, read the request, never answer (an upstream that hangs).
    Hang,
}

/// A request the proxy received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    authorization: Option<String>,
}

/// Token server state: the credentials it accepts and the tokens it issued (token → scope).
struct Bearer {
    user: String,
    password: String,
    tokens: Mutex<HashMap<String, String>>,
    token_requests: Mutex<Vec<Seen>>,
    next: AtomicU64,
}

struct ProxyShared {
    upstream: SocketAddr,
    addr: SocketAddr,
    mode: Mutex<Mode>,
    bytes_per_sec: Mutex<Option<u64>>,
    seen: Mutex<Vec<Seen>>,
    /// (method, target, when the last response bytes were written to Lighter).
    finished: Mutex<Vec<(String, String, Instant)>>,
    /// Response bytes relayed so far, summed over every request (for timing tests).
    relayed: AtomicU64,
    bearer: Option<Bearer>,
    stop: AtomicBool,
}

struct Proxy {
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        Self::launch(upstream, None)
    }

    /// A registry that wants bearer tokens: without a token it issued for the repository it
    /// answers 401 `WWW-Authenticate: Bearer realm="http://<proxy>/token",service="lighter-test",
    /// scope="repository:<repo>:pull"`; `/token` issues tokens to `user`/`password` (basic).
    fn start_bearer(upstream: SocketAddr, user: &str, password: &str) -> Proxy {
        Self::launch(
            upstream,
            Some(Bearer {
                user: user.to_owned(),
                password: password.to_owned(),
                tokens: Mutex::new(HashMap::new()),
                token_requests: Mutex::new(Vec::new()),
                next: AtomicU64::new(1),
            }),
        )
    }

    fn launch(upstream: SocketAddr, bearer: Option<Bearer>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let shared = Arc::new(ProxyShared {
            upstream,
            addr: listener.local_addr().unwrap(),
            mode: Mutex::new(Mode::Forward),
            bytes_per_sec: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            finished: Mutex::new(Vec::new()),
            relayed: AtomicU64::new(0),
            bearer,
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || {
                    let _ = proxy_connection(&sh, conn);
                });
            }
        });
        Proxy {
            shared,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Relays response bytes at most this fast (None: as fast as possible).
    fn throttle(&self, bytes_per_sec: Option<u64>) {
        *self.shared.bytes_per_sec.lock().unwrap() = bytes_per_sec;
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Requests with this method whose target contains `path`.
    fn count(&self, method: &str, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.target.contains(path))
            .count()
    }

    fn finished_at(&self, method: &str, path: &str) -> Option<Instant> {
        self.shared
            .finished
            .lock()
            .unwrap()
            .iter()
            .find(|(m, t, _)| m == method && t.contains(path))
            .map(|(_, _, at)| *at)
    }

    fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::SeqCst)
    }

    fn token_requests(&self) -> Vec<Seen> {
        self.shared
            .bearer
            .as_ref()
            .expect("bearer proxy")
            .token_requests
            .lock()
            .unwrap()
            .clone()
    }

    fn issued_tokens(&self) -> Vec<String> {
        self.shared
            .bearer
            .as_ref()
            .expect("bearer proxy")
            .tokens
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.shared.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// `/v2/<repo>/(manifests|blobs)/...` → `<repo>`.
fn repo_of(target: &str) -> Option<String> {
    let path = target.split('?').next()?.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"]
        .iter()
        .filter_map(|m| path.rfind(m).map(|i| path[..i].to_owned()))
        .next()
}

fn respond(conn: &mut TcpStream, status: u16, extra: &str, body: &str, head_only: bool) {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    if !head_only {
        let _ = conn.write_all(body.as_bytes());
    }
    let _ = conn.shutdown(Shutdown::Write);
}

/// One request per connection (answers carry `Connection: close`).
fn proxy_connection(sh: &ProxyShared, mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 << 10 {
            return Ok(());
        }
        let n = conn.read(&mut byte)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&byte[..n]);
    };
    if sh.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let rest = buf[head_end..].to_vec();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let method = request_line.next().unwrap_or("").to_owned();
    let target = request_line.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let seen = Seen {
        method: method.clone(),
        target: target.clone(),
        authorization: header("authorization"),
    };
    let head_only = method == "HEAD";

    if let Some(b) = &sh.bearer {
        if target.starts_with("/token") {
            b.token_requests.lock().unwrap().push(seen.clone());
            let query: HashMap<String, String> = target
                .split_once('?')
                .map(|(_, q)| q)
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), percent_decode(v)))
                .collect();
            let want = format!(
                "Basic {}",
                base64(format!("{}:{}", b.user, b.password).as_bytes())
            );
            let scope = query.get("scope").cloned().unwrap_or_default();
            let good = seen.authorization.as_deref() == Some(want.as_str())
                && query.get("service").map(String::as_str) == Some("lighter-test")
                && scope.starts_with("repository:")
                && scope.ends_with(":pull");
            if !good {
                respond(
                    &mut conn,
                    401,
                    "",
                    r#"{"details":"bad credentials"}"#,
                    false,
                );
                return Ok(());
            }
            let n = b.next.fetch_add(1, Ordering::SeqCst);
            let token: String = common::random_bytes(12, n)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let token = format!("tok{n}-{token}");
            b.tokens.lock().unwrap().insert(token.clone(), scope);
            let body = json!({"token": token, "access_token": token, "expires_in": 300});
            respond(&mut conn, 200, "", &body.to_string(), false);
            return Ok(());
        }
        sh.seen.lock().unwrap().push(seen.clone());
        let repo = repo_of(&target);
        let granted = seen
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .and_then(|t| b.tokens.lock().unwrap().get(t).cloned());
        let ok = match (&granted, &repo) {
            (Some(scope), Some(repo)) => *scope == format!("repository:{repo}:pull"),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !ok {
            let scope = repo
                .map(|r| format!(",scope=\"repository:{r}:pull\""))
                .unwrap_or_default();
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://{}/token\",service=\"lighter-test\"{scope}\r\n",
                sh.addr
            );
            let body =
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            respond(&mut conn, 401, &challenge, body, head_only);
            return Ok(());
        }
    } else {
        sh.seen.lock().unwrap().push(seen.clone());
    }

    let mode = *sh.mode.lock().unwrap();
    match mode {
        Mode::Status(code) => {
            let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"upstream trouble"}]}"#;
            respond(&mut conn, code, "", body, head_only);
            Ok(())
        }
        Mode::Hang => {
            let until = Instant::now() + Duration::from_secs(120);
            while Instant::now() < until && !sh.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        }
        Mode::Forward => {
            let mut up = TcpStream::connect_timeout(&sh.upstream, Duration::from_secs(5))?;
            up.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut out = format!("{method} {target} HTTP/1.1\r\n");
            for (k, v) in &headers {
                let skip = ["connection", "keep-alive", "proxy-connection"]
                    .iter()
                    .any(|h| k.eq_ignore_ascii_case(h))
                    || (sh.bearer.is_some() && k.eq_ignore_ascii_case("authorization"));
                if !skip {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
            }
            out.push_str("Connection: close\r\n\r\n");
            up.write_all(out.as_bytes())?;
            up.write_all(&rest)?;
            let length: u64 = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if length > rest.len() as u64 {
                std::io::copy(&mut (&mut conn).take(length - rest.len() as u64), &mut up)?;
            }
            let rate = *sh.bytes_per_sec.lock().unwrap();
            let start = Instant::now();
            let mut sent = 0u64;
            let mut last_write = start;
            let mut chunk = vec![0u8; 16 << 10];
            loop {
                let n = up.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                if sh.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                conn.write_all(&chunk[..n])?;
                sent += n as u64;
                sh.relayed.fetch_add(n as u64, Ordering::SeqCst);
                last_write = Instant::now();
            }
            sh.finished
                .lock()
                .unwrap()
                .push((method, target, last_write));
            let _ = conn.shutdown(Shutdown::Write);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lighter with upstreams
// ---------------------------------------------------------------------------------------------

/// A running Lighter and the directory holding its config file (and password files).
struct Lighter {
    server: Server,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Lighter {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// One `[[upstreams]]` table; `extra` holds more `key = value` lines.
fn upstream_toml(name: &str, url: &str, extra: &str) -> String {
    format!("[[upstreams]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
}

/// Lighter started with `--config` holding `toml` and extra environment variables.
fn lighter_env(toml: &str, env: &[(&str, &str)]) -> Lighter {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lighter.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let server = Server::launch_temp(|l| l.args(&["--config", &path]).env(env));
    Lighter { server, _dir: dir }
}

fn lighter(toml: &str) -> Lighter {
    lighter_env(toml, &[])
}

/// Lighter mirroring `docker.io` from `url` with extra upstream settings.
fn lighter_for(url: &str, extra: &str) -> Lighter {
    lighter(&upstream_toml("docker.io", url, extra))
}

/// Whether the server logs a line containing `needle` within a few seconds (its output is
/// read by another thread, so a line written just now may not be here yet).
fn log_has(server: &Server, needle: &str) -> bool {
    server
        .wait_for_log(needle, Duration::from_secs(5))
        .is_some()
}

/// The first error's message in an OCI error body.
fn error_message(r: &Reply) -> String {
    r.json()["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Every path under `dir` (recursively) whose text contains `needle`.
fn paths_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.to_string_lossy().contains(needle) {
                out.push(p.clone());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// Pulls `img` through `server` as a client would: manifest by tag (GET and HEAD), by digest,
/// config and layers; each answer compared with what upstream holds. `repo` and `query` address
/// the mirror (`docker.io/library/app` + "" or `app` + `?ns=docker.io`).
fn pull_and_check(server: &Server, repo: &str, query: &str, tag: &str, img: &TestImage) {
    let accept = [("Accept", ACCEPT_ALL)];
    let r = get_with(
        server,
        &format!("/v2/{repo}/manifests/{tag}{query}"),
        &accept,
    );
    r.assert_status(200);
    assert_eq!(r.body, img.manifest, "manifest bytes by tag");
    assert_eq!(r.header("Docker-Content-Digest"), img.digest);
    assert_eq!(r.header("Content-Type"), OCI_MANIFEST);
    let h = send(
        request(
            server,
            Method::HEAD,
            &format!("/v2/{repo}/manifests/{tag}{query}"),
        )
        .header("Accept", ACCEPT_ALL),
    );
    h.assert_status(200);
    assert_eq!(h.header("Docker-Content-Digest"), img.digest);
    assert_eq!(
        h.header("Content-Length"),
        img.manifest.len().to_string(),
        "HEAD length"
    );
    let r = get_with(
        server,
        &format!("/v2/{repo}/manifests/{}{query}", img.digest),
        &accept,
    );
    r.assert_status(200);
    assert_eq!(r.body, img.manifest, "manifest bytes by digest");
    for blob in std::iter::once(&img.config).chain(&img.layers) {
        let digest = sha256(blob);
        let r = get(server, &format!("/v2/{repo}/blobs/{digest}{query}"));
        r.assert_status(200);
        assert!(
            r.body == *blob,
            "blob {digest} bytes differ from upstream's"
        );
        assert_eq!(r.header("Docker-Content-Digest"), digest);
    }
}

/// A GET read to its end or its failure.
struct Fetch {
    status: u16,
    content_length: Option<u64>,
    body: Vec<u8>,
    /// Transport error before the head, or while reading the body.
    error: Option<String>,
    first_byte: Option<Instant>,
    done: Instant,
}

fn fetch(url: &str, headers: &[(&str, &str)]) -> Fetch {
    let mut rb = client().get(url);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let mut f = Fetch {
        status: 0,
        content_length: None,
        body: Vec::new(),
        error: None,
        first_byte: None,
        done: Instant::now(),
    };
    let mut resp = match rb.send() {
        Ok(r) => r,
        Err(e) => {
            f.error = Some(format!("{e:?}"));
            f.done = Instant::now();
            return f;
        }
    };
    f.status = resp.status().as_u16();
    f.content_length = resp.content_length();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                f.first_byte.get_or_insert_with(Instant::now);
                f.body.extend_from_slice(&buf[..n]);
            }
            Err(e) => {
                f.error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    f.done = Instant::now();
    f
}

// ---------------------------------------------------------------------------------------------
// Addressing and clients
// ---------------------------------------------------------------------------------------------

/// Issue: path-prefix addressing (`/v2/<upstream>/<path>/...`) and containerd's `?ns=<upstream>`
/// convention (with `library/` added to one-component docker.io names) both mirror upstream's
/// bytes and digests, for two upstreams, into the same local repository.
#[test]
fn path_prefix_and_ns_pulls_return_upstream_bytes_and_digests() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let app1 = test_image(1);
    let app2 = test_image(2);
    let tool = test_image(3);
    reg.push_image("library/app", "1.0", &app1);
    reg.push_image("library/app", "2.0", &app2);
    let index = index_of(&app1);
    let index_digest = reg.push_manifest("library/app", "multi", OCI_INDEX, &index);
    reg.push_image("team/tool", "v1", &tool);
    // What upstream itself answers: the reference the mirror must reproduce.
    let up = reg.get("/v2/library/app/manifests/1.0");
    up.assert_status(200);
    assert_eq!(up.header("Docker-Content-Digest"), app1.digest);

    let server = lighter(
        &(upstream_toml("docker.io", &reg.url(), "") + &upstream_toml("ghcr.io", &reg.url(), "")),
    );

    // docker.io by path prefix (miss, then everything again as hits).
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &app1);
    // A tag first asked with ?ns= on a one-component name: library/ is added.
    pull_and_check(&server, "app", "?ns=docker.io", "2.0", &app2);
    // Both land in the same local repository and answer either way.
    pull_and_check(&server, "library/app", "?ns=docker.io", "1.0", &app1);
    pull_and_check(&server, "docker.io/library/app", "", "2.0", &app2);
    for tag in ["1.0", "2.0"] {
        assert!(
            server
                .data_dir
                .join(format!("repos/docker.io/library/app/_tags/{tag}"))
                .exists(),
            "tag {tag} is not cached under repos/docker.io/library/app"
        );
    }

    // An index keeps its media type and bytes, and its child resolves by digest.
    let r = get_with(
        &server,
        "/v2/app/manifests/multi?ns=docker.io",
        &[("Accept", ACCEPT_ALL)],
    );
    r.assert_status(200);
    assert_eq!(r.body, index);
    assert_eq!(r.header("Content-Type"), OCI_INDEX);
    assert_eq!(r.header("Docker-Content-Digest"), index_digest);
    assert_eq!(r.body, reg.get("/v2/library/app/manifests/multi").body);

    // A second upstream, no library/ for it: ?ns= first (miss), then the path prefix (hit).
    pull_and_check(&server, "team/tool", "?ns=ghcr.io", "v1", &tool);
    pull_and_check(&server, "ghcr.io/team/tool", "", "v1", &tool);
    assert!(server
        .data_dir
        .join("repos/ghcr.io/team/tool/_tags/v1")
        .exists());

    // What upstream does not have is a clear 404, by either addressing.
    let r = get_with(
        &server,
        "/v2/docker.io/library/app/manifests/nope",
        &[("Accept", ACCEPT_ALL)],
    );
    r.assert_error(404, "MANIFEST_UNKNOWN");
    let r = get(
        &server,
        &format!(
            "/v2/app/blobs/{}?ns=docker.io",
            sha256(b"not in upstream at all")
        ),
    );
    r.assert_error(404, "BLOB_UNKNOWN");
}

/// Issue: skopeo pulls through the mirror, by path prefix and as a registries.conf mirror of
/// docker.io; the copied image has upstream's manifest digest and blob bytes.
#[test]
fn skopeo_copies_through_the_mirror() {
    if !tools(&["docker-registry", "skopeo"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(11);
    reg.push_image("library/app", "1.0", &img);
    reg.push_manifest("library/app", "multi", OCI_INDEX, &index_of(&img));
    let server = lighter_for(&reg.url(), "");
    let work = tempfile::tempdir().unwrap();
    let skopeo = |args: &[&str]| -> Output {
        let out = Command::new("skopeo")
            .arg("--insecure-policy")
            .args(args)
            .env("REGISTRY_AUTH_FILE", work.path().join("auth.json"))
            .env("HOME", work.path())
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let check_layout = |dir: &Path| {
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["manifests"][0]["digest"], img.digest,
            "copied manifest digest differs from upstream's: {index}"
        );
        for blob in std::iter::once(&img.config).chain(&img.layers) {
            let path = dir.join("blobs/sha256").join(hex(&sha256(blob)));
            assert!(std::fs::read(&path).unwrap() == *blob, "{path:?}");
        }
    };

    // By path prefix.
    let src = format!("docker://{}/docker.io/library/app:1.0", server.host());
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &src]);
    assert_eq!(raw.stdout, img.manifest, "skopeo inspect --raw");
    let out1 = work.path().join("by-prefix");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!("oci:{}:1.0", out1.display()),
    ]);
    check_layout(&out1);

    // As a mirror of docker.io in registries.conf: skopeo asks 127.0.0.1:PORT/docker.io/...
    // first; docker.io itself is not reachable from the tests, so success means the mirror.
    let conf = work.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\
             [[registry.mirror]]\nlocation = \"{}/docker.io\"\ninsecure = true\n",
            server.host()
        ),
    )
    .unwrap();
    let out2 = work.path().join("by-mirror");
    skopeo(&[
        "--registries-conf",
        conf.to_str().unwrap(),
        "copy",
        "docker://docker.io/library/app:multi",
        &format!("oci:{}:multi", out2.display()),
    ]);
    check_layout(&out2);
    assert!(server
        .data_dir
        .join("repos/docker.io/library/app/_tags/multi")
        .exists());
}

/// Issue: containerd pulls through Lighter configured as a docker.io mirror in hosts.toml
/// (`ctr --hosts-dir`); its mirror requests carry `?ns=docker.io`. docker.io's own server is set
/// to an unreachable address, so only the mirror can have served the pull, and the image is
/// unpacked (layers, diff ids and config all check out).
#[test]
fn ctr_pulls_through_the_mirror_with_hosts_toml() {
    if !tools(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(21);
    reg.push_image("library/app", "1.0", &img);
    let index = index_of(&img);
    let index_digest = reg.push_manifest("library/app", "multi", OCI_INDEX, &index);
    let server = lighter_for(&reg.url(), "");
    let ctd = Containerd::start();
    let hosts = ctd.dir().join("certs.d");
    std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
    std::fs::write(
        hosts.join("docker.io/hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:9\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            server.host()
        ),
    )
    .unwrap();
    let hosts_dir = hosts.to_str().unwrap().to_owned();
    for (reference, top) in [
        ("docker.io/library/app:multi", &index_digest),
        ("docker.io/library/app:1.0", &img.digest),
    ] {
        let out = ctd.output(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            "--snapshotter",
            "native",
            reference,
        ]);
        assert!(
            out.status.success(),
            "ctr pull {reference} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let list = ctd.output(&["images", "ls"]);
        let list = String::from_utf8_lossy(&list.stdout).into_owned();
        assert!(
            list.lines()
                .any(|l| l.starts_with(reference) && l.contains(top.as_str())),
            "ctr images ls has no {reference} at {top}:\n{list}"
        );
    }
    let content = ctd.output(&["content", "ls", "-q"]);
    let content = String::from_utf8_lossy(&content.stdout).into_owned();
    for blob in std::iter::once(&img.config).chain(&img.layers) {
        assert!(content.contains(&sha256(blob)), "{content}");
    }
    for tag in ["multi", "1.0"] {
        assert!(
            server
                .data_dir
                .join(format!("repos/docker.io/library/app/_tags/{tag}"))
                .exists(),
            "containerd's ?ns=docker.io requests did not reach the docker.io mirror"
        );
    }
}

/// Issue 13: an upstream on a port. Its name is `host:port` (`127.0.0.1:<port>` here, the
/// Distribution's own address); containerd sends `?ns=127.0.0.1:<port>` (percent-encoded) and
/// pulls through Lighter; clients that use the path prefix address it as `127.0.0.1_<port>/…`
/// (a repository name cannot hold `:`), and both planes answer there.
#[test]
fn an_upstream_on_a_port_is_mirrored_for_ns_and_path_prefix_clients() {
    if !tools(&["docker-registry", "containerd", "ctr"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(23);
    reg.push_image("team/app", "1.0", &img);
    let name = reg.addr.to_string();
    let prefix = name.replace(':', "_");
    let server = lighter(&upstream_toml(&name, &reg.url(), ""));
    let ctd = Containerd::start();
    let hosts = ctd.dir().join("certs.d");
    std::fs::create_dir_all(hosts.join(&name)).unwrap();
    std::fs::write(
        hosts.join(&name).join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:9\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            server.host()
        ),
    )
    .unwrap();
    let hosts_dir = hosts.to_str().unwrap().to_owned();
    let reference = format!("{name}/team/app:1.0");
    // Twice: the first pull misses (control plane), the second hits (data plane, which matches
    // the percent-encoded ns= itself).
    for round in 0..2 {
        if round == 1 {
            let _ = ctd.output(&["images", "rm", &reference]);
            let _ = ctd.output(&["content", "prune", "references"]);
        }
        let out = ctd.output(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            "--snapshotter",
            "native",
            &reference,
        ]);
        assert!(
            out.status.success(),
            "ctr pull {reference} (round {round}) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        server
            .data_dir
            .join(format!("repos/{prefix}/team/app/_tags/1.0"))
            .exists(),
        "containerd's ?ns={name} requests did not reach the mirror of {name}"
    );
    let manifest_path = format!("/v2/{prefix}/team/app/manifests/1.0");
    let r = get_with(&server, &manifest_path, &[("Accept", OCI_MANIFEST)]);
    r.assert_status(200);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    let layer = sha256(&img.layers[0]);
    let encoded = name.replace(':', "%3A");
    for path in [
        format!("/v2/{prefix}/team/app/blobs/{layer}"),
        format!("/v2/team/app/blobs/{layer}?ns={encoded}"),
        format!("/v2/team/app/blobs/{layer}?ns={name}"),
    ] {
        let r = get(&server, &path);
        r.assert_status(200);
        assert!(r.body == img.layers[0], "{path}");
    }
}

// ---------------------------------------------------------------------------------------------
// Blob downloads: single flight, streaming, verification
// ---------------------------------------------------------------------------------------------

/// Issue: single flight. 64 clients GET the same 32 MiB blob at once while it is missing: one
/// upstream GET, and every client gets exactly upstream's bytes.
#[test]
fn concurrent_misses_of_one_blob_make_one_upstream_get() {
    if !tools(&["docker-registry"]) {
        return;
    }
    const CLIENTS: usize = 64;
    let reg = Distribution::start();
    let blob = Arc::new(common::random_bytes(32 << 20, 0xB16));
    let digest = reg.push_blob("library/big", &blob);
    let proxy = Proxy::start(reg.addr);
    // ~2 s of download, so every client arrives while it is in flight.
    proxy.throttle(Some(16 << 20));
    let server = lighter_for(&proxy.url(), "");
    let url = server.url(&format!("/v2/docker.io/library/big/blobs/{digest}"));
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, blob, barrier) = (url.clone(), blob.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<(), String> {
                barrier.wait();
                let mut resp = client()
                    .get(&url)
                    .send()
                    .map_err(|e| format!("client {i}: {e}"))?;
                if resp.status() != 200 {
                    return Err(format!("client {i}: status {}", resp.status()));
                }
                let mut pos = 0usize;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    let n = resp
                        .read(&mut buf)
                        .map_err(|e| format!("client {i}: body failed at {pos}: {e}"))?;
                    if n == 0 {
                        break;
                    }
                    if pos + n > blob.len() || buf[..n] != blob[pos..pos + n] {
                        return Err(format!("client {i}: wrong bytes at {pos}..{}", pos + n));
                    }
                    pos += n;
                }
                if pos != blob.len() {
                    return Err(format!("client {i}: {pos} of {} bytes", blob.len()));
                }
                Ok(())
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap().err())
        .collect();
    assert!(failures.is_empty(), "clients failed: {failures:#?}");
    let blob_path = format!("/v2/library/big/blobs/{digest}");
    assert_eq!(
        proxy.count("GET", &blob_path),
        1,
        "upstream GETs of the blob (single flight): {:#?}",
        proxy.seen()
    );
    // Distribution's own access log agrees.
    wait_until("Distribution to log the blob GET", || {
        reg.access_count("GET", &blob_path) >= 1
    });
    assert_eq!(reg.access_count("GET", &blob_path), 1);
    let stored = server
        .data_dir
        .join("blobs/sha256")
        .join(&hex(&digest)[..2])
        .join(hex(&digest));
    wait_until("the verified blob to be published", || stored.exists());
    assert_eq!(sha256(&std::fs::read(stored).unwrap()), digest);
    // Counted once, at the control plane's metrics endpoint.
    let m = server.metrics();
    assert_eq!(
        m["lighter_mirror_blob_downloads_total{result=\"verified\"}"], 1,
        "{m:?}"
    );
    assert_eq!(
        m["lighter_mirror_blob_downloads_total{result=\"failed\"}"],
        0
    );
    assert_eq!(
        m["lighter_mirror_blob_download_bytes_total"],
        blob.len() as u64
    );
    assert_eq!(m["lighter_mirror_blob_downloads_in_flight"], 0);
}

/// Issue: single flight, around publication. GETs keep arriving (one every 2 ms) from shortly
/// before the download ends until after the blob is published: every one is answered with the
/// right bytes, and upstream still sees one GET (a request that found the blob missing just
/// before it was published must join or read the published blob, not start a second download).
#[test]
fn gets_arriving_while_a_download_is_published_do_not_fetch_again() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let blob = Arc::new(common::random_bytes(4 << 20, 0x7ac));
    let digest = reg.push_blob("library/race", &blob);
    let proxy = Proxy::start(reg.addr);
    proxy.throttle(Some(4 << 20));
    let server = lighter_for(&proxy.url(), "");
    let url = server.url(&format!("/v2/docker.io/library/race/blobs/{digest}"));
    let blob_path = format!("/v2/library/race/blobs/{digest}");
    let get_range = |url: String, blob: Arc<Vec<u8>>| {
        std::thread::spawn(move || -> Result<(), String> {
            let f = fetch(&url, &[("Range", "bytes=1000-1999")]);
            match (f.status, &f.error) {
                (206, None) if f.body == blob[1000..2000] => Ok(()),
                _ => Err(format!(
                    "status {}, {} bytes, error {:?}",
                    f.status,
                    f.body.len(),
                    f.error
                )),
            }
        })
    };
    let mut clients = vec![get_range(url.clone(), blob.clone())];
    wait_until("the download to be 70% through", || {
        proxy.relayed() >= blob.len() as u64 * 7 / 10
    });
    let mut after: Option<Instant> = None;
    while after.is_none_or(|t| t.elapsed() < Duration::from_millis(300)) {
        clients.push(get_range(url.clone(), blob.clone()));
        std::thread::sleep(Duration::from_millis(2));
        if after.is_none() && proxy.finished_at("GET", &blob_path).is_some() {
            after = Some(Instant::now());
        }
        assert!(clients.len() < 5000, "the download never finished");
    }
    let n = clients.len();
    let failures: Vec<String> = clients
        .into_iter()
        .filter_map(|h| h.join().unwrap().err())
        .collect();
    assert!(failures.is_empty(), "of {n} clients: {failures:#?}");
    assert_eq!(
        proxy.count("GET", &blob_path),
        1,
        "upstream GETs of the blob with {n} clients arriving around its publication"
    );
}

/// Issue: streamed to clients while downloading. With upstream sending slowly (1 MiB/s for
/// 4 MiB), a client has its first bytes seconds before upstream has finished sending; a client
/// joining mid-download with a Range gets the right slice; both bodies are exact.
#[test]
fn first_bytes_arrive_before_the_upstream_download_completes() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let blob = common::random_bytes(4 << 20, 0x51);
    let digest = reg.push_blob("library/slow", &blob);
    let proxy = Proxy::start(reg.addr);
    proxy.throttle(Some(1 << 20));
    let server = lighter_for(&proxy.url(), "");
    let url = server.url(&format!("/v2/docker.io/library/slow/blobs/{digest}"));
    let started = Instant::now();
    let ranged = {
        let url = url.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            fetch(&url, &[("Range", "bytes=1048576-")])
        })
    };
    let f = fetch(&url, &[]);
    assert_eq!(f.status, 200, "{:?}", f.error);
    assert!(f.error.is_none(), "body failed: {:?}", f.error);
    assert!(f.body == blob, "body differs from upstream's blob");
    let blob_path = format!("/blobs/{digest}");
    wait_until("the proxy to finish relaying the blob", || {
        proxy.finished_at("GET", &blob_path).is_some()
    });
    let upstream_done = proxy.finished_at("GET", &blob_path).unwrap();
    let first = f.first_byte.expect("some bytes");
    eprintln!(
        "first byte after {:?}, upstream finished after {:?}, client finished after {:?}",
        first - started,
        upstream_done - started,
        f.done - started
    );
    assert!(
        first + Duration::from_millis(2000) < upstream_done,
        "first bytes reached the client {:?} after the request, only {:?} before upstream \
         finished sending: the body is not streamed while downloading",
        first - started,
        upstream_done.saturating_duration_since(first)
    );
    let r = ranged.join().unwrap();
    assert_eq!(r.status, 206, "{:?}", r.error);
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(r.body == blob[1 << 20..], "ranged body differs");
    assert_eq!(
        proxy.count("GET", &format!("/blobs/{digest}")),
        1,
        "the ranged client joined the download"
    );
}

/// Distribution spec, "Pulling blobs" and "Range requests": a blob still downloading is
/// answered with the same headers as a stored one (streamed from the growing file with
/// sendfile): Content-Length, Content-Type, Docker-Content-Digest, Accept-Ranges, and for a Range
/// 206 with Content-Range; a range past the end or inverted is 416 with the OCI error JSON and
/// `Content-Range: bytes */<size>`. The answers are compared with those of the stored blob
/// (the data plane's).
#[test]
fn downloading_blob_answers_like_a_stored_one() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let blob = common::random_bytes(3 << 20, 0x77);
    let size = blob.len();
    let digest = reg.push_blob("library/heads", &blob);
    let proxy = Proxy::start(reg.addr);
    // ~3 s of download: every request below arrives while it runs.
    proxy.throttle(Some(1 << 20));
    let server = lighter_for(&proxy.url(), "");
    let path = format!("/v2/docker.io/library/heads/blobs/{digest}");
    let cases: [(&str, Option<&str>); 5] = [
        ("whole", None),
        ("middle", Some("bytes=10-99")),
        ("suffix", Some("bytes=-1000")),
        ("past the end", Some("bytes=4000000-")),
        // The OCI conformance suite's inverted range: 416 from both planes.
        ("inverted", Some("bytes=500-0")),
    ];
    let ask = |range: Option<&str>| match range {
        Some(r) => get_with(&server, &path, &[("Range", r)]),
        None => get(&server, &path),
    };
    let started = Instant::now();
    let downloading: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(_, r)| s.spawn(move || ask(*r)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(proxy.count("GET", &format!("/blobs/{digest}")), 1);
    eprintln!("answers while downloading took {:?}", started.elapsed());
    wait_until("the blob to be published", || cached(&server, &digest));
    let stored: Vec<Reply> = cases.iter().map(|(_, r)| ask(*r)).collect();
    for (((what, _), d), s) in cases.iter().zip(&downloading).zip(&stored) {
        assert_eq!(
            d.status,
            s.status,
            "{what}: downloading {} / stored {}",
            d.describe(),
            s.describe()
        );
        for h in [
            "content-length",
            "content-type",
            "docker-content-digest",
            "content-range",
        ] {
            if d.status == 416 && h == "content-length" {
                continue; // error messages are worded by whichever plane answers
            }
            assert_eq!(d.header_opt(h), s.header_opt(h), "{what}: header {h}");
        }
        if d.status == 416 {
            assert_eq!(d.error_codes(), s.error_codes(), "{what}");
        } else {
            assert_eq!(d.header("accept-ranges"), "bytes", "{what}");
            assert_eq!(d.header("docker-content-digest"), digest, "{what}");
            assert_eq!(
                d.header("content-type"),
                "application/octet-stream",
                "{what}"
            );
            assert!(d.body == s.body, "{what}: bodies differ");
        }
    }
    assert_eq!(downloading[0].status, 200);
    assert!(downloading[0].body == blob);
    assert_eq!(downloading[1].status, 206);
    assert_eq!(
        downloading[1].header("content-range"),
        format!("bytes 10-99/{size}")
    );
    assert!(downloading[1].body == blob[10..100]);
    assert_eq!(downloading[2].status, 206);
    assert_eq!(
        downloading[2].header("content-range"),
        format!("bytes {}-{}/{size}", size - 1000, size - 1)
    );
    assert!(downloading[2].body == blob[size - 1000..]);
    for d in &downloading[3..] {
        d.assert_error(416, "SIZE_INVALID");
        assert_eq!(d.header("content-range"), format!("bytes */{size}"));
    }
    assert_eq!(
        proxy.count("GET", &format!("/blobs/{digest}")),
        1,
        "stored answers stay local"
    );
}

/// A client that stops reading a blob that is still downloading holds neither the download nor
/// the other clients following it: they finish at upstream's pace, and the stalled client, once
/// it reads again, gets every byte.
#[test]
fn a_stalled_follower_does_not_hold_up_the_others() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let blob = common::random_bytes(24 << 20, 0x5107);
    let digest = reg.push_blob("library/stall", &blob);
    let proxy = Proxy::start(reg.addr);
    proxy.throttle(Some(16 << 20));
    let server = lighter_for(&proxy.url(), "");
    let path = format!("/v2/docker.io/library/stall/blobs/{digest}");
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    // 24 MiB do not fit in the socket buffers: the server's sends to it block.
    stalled.write_all(&raw_request("GET", &path)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let f = fetch(&server.url(&path), &[]);
    assert_eq!(f.status, 200, "{:?}", f.error);
    assert!(f.error.is_none(), "{:?}", f.error);
    assert!(f.body == blob, "the reading client got the blob");
    wait_until("the blob to be published", || cached(&server, &digest));
    // Now read the stalled one: head, then exactly the blob.
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    stalled.read_to_end(&mut got).unwrap();
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", blob.len())),
        "{head}"
    );
    assert!(
        got[head_end..] == blob[..],
        "the stalled client's body differs from the blob"
    );
    assert_eq!(proxy.count("GET", &format!("/blobs/{digest}")), 1);
}

/// A blob still downloading when Lighter is asked to stop (SIGTERM): the client following it
/// gets every byte (shutdown waits up to `shutdown_grace_ms` for every connection, those served
/// outside hyper too), then Lighter exits.
#[test]
fn sigterm_lets_a_followed_download_finish() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let blob = common::random_bytes(6 << 20, 0x7e);
    let digest = reg.push_blob("library/term", &blob);
    let proxy = Proxy::start(reg.addr);
    proxy.throttle(Some(3 << 20)); // ~2 s of download
    let mut server = lighter_for(&proxy.url(), "");
    let url = server.url(&format!("/v2/docker.io/library/term/blobs/{digest}"));
    let fetching = std::thread::spawn(move || fetch(&url, &[]));
    let blob_path = format!("/blobs/{digest}");
    wait_until("the upstream download to start", || {
        proxy.count("GET", &blob_path) == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling the server process we started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let f = fetching.join().unwrap();
    assert_eq!(f.status, 200, "{:?}", f.error);
    assert!(
        f.error.is_none(),
        "the body was cut by the shutdown: {:?}",
        f.error
    );
    assert!(f.body == blob, "the whole blob arrived despite SIGTERM");
    wait_until("Lighter to exit after the download", || {
        !server.server.alive()
    });
}

/// Issue: "for the simple case a repeatable flag `lighter serve --upstream
/// docker.io=https://registry-1.docker.io`": two upstreams from two flags, each pulled by path
/// prefix and by `?ns=`; a malformed flag stops Lighter at start with a message naming it.
#[test]
fn repeatable_upstream_flag_mirrors_each_upstream() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let (reg1, reg2) = (Distribution::start(), Distribution::start());
    let (img1, img2) = (test_image(71), test_image(72));
    reg1.push_image("library/one", "1.0", &img1);
    reg2.push_image("team/two", "2.0", &img2);
    let server = Server::start_args(&[
        "--upstream",
        &format!("docker.io={}", reg1.url()),
        "--upstream",
        &format!("quay.io={}", reg2.url()),
    ]);
    pull_and_check(&server, "docker.io/library/one", "", "1.0", &img1);
    pull_and_check(&server, "one", "?ns=docker.io", "1.0", &img1);
    pull_and_check(&server, "quay.io/team/two", "", "2.0", &img2);
    pull_and_check(&server, "team/two", "?ns=quay.io", "2.0", &img2);
    // Not crossed: each upstream only serves its own repositories.
    get_with(
        &server,
        "/v2/quay.io/library/one/manifests/1.0",
        &[("Accept", ACCEPT_ALL)],
    )
    .assert_error(404, "MANIFEST_UNKNOWN");

    let data = tempfile::tempdir().unwrap();
    for (flag, says) in [
        ("docker.io", "NAME=URL"),
        ("Docker.IO=http://127.0.0.1:9", "registry host name"),
        ("docker.io=ftp://127.0.0.1:9", "http:// or https://"),
        (
            "docker.io=https://me:secret@127.0.0.1:9",
            "must not carry credentials",
        ),
    ] {
        let out = Command::new(common::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(["--upstream", flag])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--upstream {flag} was accepted");
        assert!(stderr.contains(says), "--upstream {flag}: {stderr}");
        assert!(
            !stderr.contains("secret"),
            "a credential was echoed: {stderr}"
        );
    }
}

/// Issue: verified before publication. Distribution serves bytes that do not match the digest
/// (its `data` file overwritten, same length): clients never complete a body (error or short
/// body), nothing is published, a later GET fetches again, and after upstream is fixed the
/// blob arrives and is published.
#[test]
fn corrupt_upstream_blob_fails_clients_and_is_not_published() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let blob = common::random_bytes(3 << 20, 0xBAD);
    let digest = reg.push_blob("library/corrupt", &blob);
    let data = reg.blob_data_path(&digest);
    assert_eq!(std::fs::read(&data).unwrap(), blob, "storage layout");
    let mut bad = blob.clone();
    for b in &mut bad[(1 << 20)..(1 << 20) + 4096] {
        *b ^= 0x5a;
    }
    std::fs::write(&data, &bad).unwrap();
    let proxy = Proxy::start(reg.addr);
    let server = lighter_for(&proxy.url(), "");
    let url = server.url(&format!("/v2/docker.io/library/corrupt/blobs/{digest}"));
    let nothing_published = |when: &str| {
        let found = paths_containing(&server.data_dir, hex(&digest));
        assert!(
            found.is_empty(),
            "{when}: a blob that failed verification is in the data directory: {found:?}"
        );
    };
    let blob_path = format!("/v2/library/corrupt/blobs/{digest}");

    // Whether a client sees the verdict before its last bytes is a race inside the server, so
    // each way is tried a few times. Slow upstream: the client follows the download and sees
    // every byte go by; fast: the verdict may come before the client reads.
    const ATTEMPTS: usize = 3;
    let mut complete_bad_bodies = Vec::new();
    for (how, rate) in [("slow", Some(2 << 20)), ("fast", None)] {
        proxy.throttle(rate);
        for attempt in 0..ATTEMPTS {
            let f = fetch(&url, &[]);
            let what = format!("{how} corrupt download #{attempt}");
            if let Some(problem) = completed_wrong(&f, &blob) {
                complete_bad_bodies.push(format!("{what}: {problem}"));
            }
            nothing_published(&what);
        }
    }
    assert!(
        complete_bad_bodies.is_empty(),
        "GET /v2/docker.io/library/corrupt/blobs/{digest} while upstream serves corrupt bytes: \
         clients must get an error or an incomplete body, never a complete one:\n{}",
        complete_bad_bodies.join("\n")
    );
    assert_eq!(
        proxy.count("GET", &blob_path),
        2 * ATTEMPTS,
        "a failed download is not remembered: each GET fetches again"
    );
    let m = server.metrics();
    assert_eq!(
        m["lighter_mirror_blob_digest_mismatches_total"],
        2 * ATTEMPTS as u64,
        "{m:?}"
    );
    assert_eq!(
        m["lighter_mirror_blob_downloads_total{result=\"failed\"}"],
        2 * ATTEMPTS as u64
    );
    assert_eq!(
        m["lighter_mirror_blob_downloads_total{result=\"verified\"}"],
        0
    );
    wait_until("failed downloads' ingests to be removed", || {
        std::fs::read_dir(server.data_dir.join("uploads"))
            .map(|d| d.count() == 0)
            .unwrap_or(true)
    });

    // Upstream fixed: the next GET fetches, verifies, publishes.
    std::fs::write(&data, &blob).unwrap();
    let f = fetch(&url, &[]);
    assert_eq!(f.status, 200);
    assert!(f.error.is_none(), "{:?}", f.error);
    assert!(f.body == blob);
    assert_eq!(proxy.count("GET", &blob_path), 2 * ATTEMPTS + 1);
    let stored = server
        .data_dir
        .join("blobs/sha256")
        .join(&hex(&digest)[..2])
        .join(hex(&digest));
    wait_until("the verified blob to be published", || stored.exists());
    assert_eq!(sha256(&std::fs::read(stored).unwrap()), digest);
}

/// A corrupt download must never look complete: an error before the head (a 404 or a transport
/// error), or a failed or short body are all fine. Returns what was wrong otherwise.
fn completed_wrong(f: &Fetch, good: &[u8]) -> Option<String> {
    eprintln!(
        "status {}, {} of {} bytes, error {:?}",
        f.status,
        f.body.len(),
        good.len(),
        f.error
    );
    if f.status == 0 || f.status >= 400 {
        return None;
    }
    if f.status != 200 {
        return Some(format!("status {}", f.status));
    }
    if f.error.is_some() || f.body.len() < good.len() {
        return None;
    }
    Some(format!(
        "200 with Content-Length {:?} and all {} bytes delivered, hashing to {} (upstream's \
         corrupt bytes), and the connection closed only after the body was complete",
        f.content_length,
        f.body.len(),
        sha256(&f.body)
    ))
}

/// Issue: manifests are verified against their digest too. Upstream's manifest file replaced
/// with another (valid) manifest: the pull is refused with MANIFEST_UNKNOWN and nothing is
/// cached under the tag.
#[test]
fn corrupt_upstream_manifest_is_refused_and_not_cached() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(31);
    let other = test_image(32);
    reg.push_image("library/app", "1.0", &img);
    std::fs::write(reg.blob_data_path(&img.digest), &other.manifest).unwrap();
    let server = lighter_for(&reg.url(), "");
    let r = get_with(
        &server,
        "/v2/docker.io/library/app/manifests/1.0",
        &[("Accept", ACCEPT_ALL)],
    );
    r.assert_error(404, "MANIFEST_UNKNOWN");
    let r = get_with(
        &server,
        &format!("/v2/docker.io/library/app/manifests/{}", img.digest),
        &[("Accept", ACCEPT_ALL)],
    );
    r.assert_error(404, "MANIFEST_UNKNOWN");
    assert!(!server
        .data_dir
        .join("repos/docker.io/library/app/_tags/1.0")
        .exists());
    for d in [&img.digest, &other.digest] {
        let found = paths_containing(&server.data_dir, hex(d));
        assert!(found.is_empty(), "{found:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tags: TTL, hits, stale answers
// ---------------------------------------------------------------------------------------------

/// Issue: cache hits are served from disk and never touch upstream: after one pull, repeated
/// pulls (tag, digest, HEADs, blobs, ranges; path prefix and ?ns=) make no upstream request.
#[test]
fn cache_hits_never_touch_upstream() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(41);
    reg.push_image("library/app", "1.0", &img);
    let proxy = Proxy::start(reg.addr);
    let server = lighter_for(&proxy.url(), "tag_ttl_ms = 600000");
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
    let after_first = proxy.seen();
    assert!(
        !after_first.is_empty(),
        "the first pull went through the proxy"
    );
    let layer = sha256(&img.layers[0]);
    for _ in 0..3 {
        pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
        pull_and_check(&server, "app", "?ns=docker.io", "1.0", &img);
        let r = get_with(
            &server,
            &format!("/v2/docker.io/library/app/blobs/{layer}"),
            &[("Range", "bytes=10-99")],
        );
        r.assert_status(206);
        assert_eq!(r.body, img.layers[0][10..100]);
        head(&server, &format!("/v2/docker.io/library/app/blobs/{layer}")).assert_status(200);
    }
    let after = proxy.seen();
    assert_eq!(
        after.len(),
        after_first.len(),
        "hits reached upstream: {:#?}",
        &after[after_first.len()..]
    );
}

/// Issue: tags are resolved upstream and cached for tag_ttl_ms: a tag moved upstream is not seen
/// (and upstream not asked) within the TTL, and is seen after it.
#[test]
fn moved_upstream_tag_is_seen_after_the_ttl() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let v1 = test_image(51);
    let v2 = test_image(52);
    reg.push_image("library/app", "latest", &v1);
    let proxy = Proxy::start(reg.addr);
    let server = lighter_for(&proxy.url(), "tag_ttl_ms = 5000");
    let path = "/v2/docker.io/library/app/manifests/latest";
    let accept = [("Accept", ACCEPT_ALL)];
    let first = Instant::now();
    let r = get_with(&server, path, &accept);
    r.assert_status(200);
    assert_eq!(r.header("Docker-Content-Digest"), v1.digest);
    let asked = proxy.seen().len();
    reg.push_image("library/app", "latest", &v2);
    let r = get_with(&server, path, &accept);
    assert_eq!(r.header("Docker-Content-Digest"), v1.digest, "within TTL");
    assert!(
        first.elapsed() < Duration::from_millis(5000),
        "test too slow"
    );
    assert_eq!(
        proxy.seen().len(),
        asked,
        "within the TTL upstream is not asked"
    );
    std::thread::sleep(Duration::from_millis(5200).saturating_sub(first.elapsed()));
    let r = get_with(&server, path, &accept);
    r.assert_status(200);
    assert_eq!(r.header("Docker-Content-Digest"), v2.digest, "after TTL");
    assert_eq!(r.body, v2.manifest);
    assert!(proxy.count("HEAD", "/v2/library/app/manifests/latest") >= 2);
}

/// Issue: upstream down → cached tags (after their TTL) and blobs still pull, logged as "serving
/// the cached tag"; a never-cached tag or blob gets a clear 404. Upstream really stopped
/// (Distribution killed: connections refused).
#[test]
fn stopped_upstream_serves_cached_tags_and_blobs() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let mut reg = Distribution::start();
    let img = test_image(61);
    reg.push_image("library/app", "1.0", &img);
    let server = lighter_for(&reg.url(), "tag_ttl_ms = 300\nconnect_timeout_ms = 2000");
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
    reg.stop();
    std::thread::sleep(Duration::from_millis(600));

    let t = Instant::now();
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
    pull_and_check(&server, "app", "?ns=docker.io", "1.0", &img);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(
        log_has(&server, "serving the cached tag"),
        "no log line says the cached tag was served"
    );
    // "Logged and counted": each refresh answered stale counts. The data plane hands one pull
    // of the stale tag over and answers the others from its cache for the TTL (300 ms); the
    // next pull after that is another refresh, answered stale again.
    let stale = server.metrics()["lighter_mirror_stale_tags_served_total"];
    assert!(stale >= 1, "{stale}");
    std::thread::sleep(Duration::from_millis(400));
    get_with(
        &server,
        "/v2/docker.io/library/app/manifests/1.0",
        &[("Accept", ACCEPT_ALL)],
    )
    .assert_status(200);
    assert_eq!(
        server.metrics()["lighter_mirror_stale_tags_served_total"],
        stale + 1
    );

    let r = get_with(
        &server,
        "/v2/docker.io/library/app/manifests/never-cached",
        &[("Accept", ACCEPT_ALL)],
    );
    r.assert_error(404, "MANIFEST_UNKNOWN");
    let message = error_message(&r);
    assert!(
        message.contains("never-cached") && message.len() > 20,
        "the 404 should say which tag and why: {message:?}"
    );
    let r = get(
        &server,
        &format!(
            "/v2/docker.io/library/app/blobs/{}",
            sha256(b"never cached")
        ),
    );
    r.assert_error(404, "BLOB_UNKNOWN");
    assert!(!error_message(&r).is_empty());
}

/// Issue: upstream answering 5xx or timing out counts as down: cached tags are served stale
/// (logged); never-cached content gets 404 within a bounded time (response_timeout_ms).
#[test]
fn upstream_5xx_or_timeout_serves_cached_tags() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(71);
    reg.push_image("library/app", "1.0", &img);
    let proxy = Proxy::start(reg.addr);
    let server = lighter_for(
        &proxy.url(),
        "tag_ttl_ms = 300\nresponse_timeout_ms = 1000\nbody_idle_timeout_ms = 1000",
    );
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
    let tag_head = "/v2/library/app/manifests/1.0";

    for mode in [Mode::Status(503), Mode::Status(500), Mode::Hang] {
        proxy.set_mode(mode);
        std::thread::sleep(Duration::from_millis(500));
        let asked = proxy.count("HEAD", tag_head);
        let stale_logs = server
            .log_lines()
            .iter()
            .filter(|l| l.contains("serving the cached tag"))
            .count();
        let t = Instant::now();
        pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{mode:?}: stale tag took {:?}",
            t.elapsed()
        );
        assert!(
            proxy.count("HEAD", tag_head) > asked,
            "{mode:?}: the expired tag was not checked upstream"
        );
        let now = server
            .log_lines()
            .iter()
            .filter(|l| l.contains("serving the cached tag"))
            .count();
        assert!(now > stale_logs, "{mode:?}: not logged as stale");

        let t = Instant::now();
        let r = get_with(
            &server,
            "/v2/docker.io/library/app/manifests/never-cached",
            &[("Accept", ACCEPT_ALL)],
        );
        r.assert_error(404, "MANIFEST_UNKNOWN");
        let r = get(
            &server,
            &format!("/v2/docker.io/library/app/blobs/{}", sha256(b"nope")),
        );
        r.assert_error(404, "BLOB_UNKNOWN");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{mode:?}: misses took {:?}",
            t.elapsed()
        );
    }
}

/// A mirrored tag past its TTL is refreshed by one pull a core: the data plane hands the first
/// to the control plane (which asks upstream) and answers the pulls arriving meanwhile from its
/// cache, for at most the TTL, instead of handing each over to wait for upstream. Before, with
/// upstream hanging, every pull of the tag waited for `response_timeout_ms`.
#[test]
fn a_stale_tag_costs_one_handoff_a_core_while_upstream_answers() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(72);
    reg.push_image("library/app", "1.0", &img);
    let proxy = Proxy::start(reg.addr);
    let server = lighter(&format!(
        "cores = 1\n{}",
        upstream_toml(
            "docker.io",
            &proxy.url(),
            "tag_ttl_ms = 1500\nresponse_timeout_ms = 4000"
        )
    ));
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
    let tag_head = "/v2/library/app/manifests/1.0";
    let path = "/v2/docker.io/library/app/manifests/1.0";
    proxy.set_mode(Mode::Hang);
    std::thread::sleep(Duration::from_millis(1700));
    let asked = proxy.count("HEAD", tag_head);
    // The first pull of the stale tag goes to the control plane and waits for upstream.
    let url = server.url(path);
    let first = std::thread::spawn(move || {
        let t = Instant::now();
        let r = Server::client()
            .get(url)
            .header("Accept", ACCEPT_ALL)
            .send()
            .unwrap();
        (r.status().as_u16(), t.elapsed())
    });
    wait_until("the first pull reached upstream", || {
        proxy.count("HEAD", tag_head) > asked
    });
    let handed_over = Instant::now();
    // The others, within the TTL of that handoff, come from the data plane's cache at once.
    let mut served = 0;
    while handed_over.elapsed() < Duration::from_millis(700) && served < 50 {
        let t = Instant::now();
        let r = get_with(&server, path, &[("Accept", ACCEPT_ALL)]);
        r.assert_status(200);
        assert_eq!(r.body, img.manifest);
        assert_eq!(r.header("Docker-Content-Digest"), img.digest);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "pull {served} of the stale tag waited {:?} for upstream",
            t.elapsed()
        );
        served += 1;
    }
    assert!(served >= 5, "only {served} pulls in 700 ms");
    assert_eq!(
        proxy.count("HEAD", tag_head),
        asked + 1,
        "one refresh asked upstream"
    );
    // The first is answered stale once upstream times out.
    let (status, took) = first.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        took >= Duration::from_secs(3),
        "the refresh did wait: {took:?}"
    );
    proxy.set_mode(Mode::Forward);
}

// ---------------------------------------------------------------------------------------------
// Pushes, auth
// ---------------------------------------------------------------------------------------------

/// Issue: mirrors are read-only: pushes to a mirror repository get 403 DENIED and never reach
/// upstream; local repositories still take pushes.
#[test]
fn pushes_to_mirror_repositories_are_denied() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let proxy = Proxy::start(reg.addr);
    let server = lighter_for(&proxy.url(), "");
    let blob = b"pushed to a mirror".to_vec();
    let digest = sha256(&blob);
    let r = send(
        client()
            .post(server.url("/v2/docker.io/library/app/blobs/uploads/"))
            .header("Content-Length", "0"),
    );
    r.assert_error(403, "DENIED");
    let r = send(
        client()
            .post(server.url(&format!(
                "/v2/docker.io/library/app/blobs/uploads/?digest={digest}"
            )))
            .header("Content-Type", "application/octet-stream")
            .body(blob.clone()),
    );
    r.assert_error(403, "DENIED");
    let img = test_image(81);
    let r = put_manifest(
        &server,
        "docker.io/library/app",
        "1.0",
        OCI_MANIFEST,
        &img.manifest,
    );
    r.assert_error(403, "DENIED");
    assert!(proxy.seen().is_empty(), "{:#?}", proxy.seen());
    push_blob(&server, "local/app", &blob);
}

/// Issue: upstream behind basic auth (Distribution `auth: htpasswd`); Lighter configured with
/// username + password_file pulls; the password never appears in Lighter's log. Wrong or missing
/// credentials: a 404 (never a 200), nothing cached.
#[test]
fn basic_auth_upstream_with_password_file() {
    if !tools(&["docker-registry", "htpasswd"]) {
        return;
    }
    const USER: &str = "mirror-user";
    const PASSWORD: &str = "pw-basic-7Qx2vL9d";
    let reg = Distribution::start_with_htpasswd(USER, PASSWORD);
    // Upstream really wants credentials.
    let anonymous = send(client().get(format!("{}/v2/", reg.url())));
    assert_eq!(anonymous.status, 401);
    let img = test_image(91);
    reg.push_image("library/app", "1.0", &img);

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, format!("{PASSWORD}\n")).unwrap();
    // At debug level, so that whatever the HTTP stack logs is checked too.
    let server = lighter_env(
        &upstream_toml(
            "docker.io",
            &reg.url(),
            &format!(
                "username = \"{USER}\"\npassword_file = \"{}\"",
                good.display()
            ),
        ),
        &[("RUST_LOG", "debug")],
    );
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &img);
    let basic = base64(format!("{USER}:{PASSWORD}").as_bytes());
    for line in server.log_lines() {
        assert!(
            !line.contains(PASSWORD) && !line.contains(&basic),
            "credentials in the log: {line}"
        );
    }

    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong-password\n").unwrap();
    for extra in [
        format!(
            "username = \"{USER}\"\npassword_file = \"{}\"",
            bad.display()
        ),
        String::new(),
    ] {
        let server = lighter_for(&reg.url(), &extra);
        let r = get_with(
            &server,
            "/v2/docker.io/library/app/manifests/1.0",
            &[("Accept", ACCEPT_ALL)],
        );
        r.assert_error(404, "MANIFEST_UNKNOWN");
        let r = get(
            &server,
            &format!("/v2/docker.io/library/app/blobs/{}", sha256(&img.config)),
        );
        r.assert_error(404, "BLOB_UNKNOWN");
        assert!(paths_containing(&server.data_dir, hex(&img.digest)).is_empty());
    }
}

/// Issue: bearer tokens. Upstream answers 401 with `WWW-Authenticate: Bearer realm=...,
/// service=...,scope=repository:<repo>:pull`; Lighter gets a token from the realm (basic
/// credentials from username + password_env, the challenge's service and scope), retries with
/// it, caches it per scope; pulls of two repositories work; neither the password nor a token
/// appears in Lighter's log.
#[test]
fn bearer_token_flow_pulls_with_scoped_tokens() {
    if !tools(&["docker-registry"]) {
        return;
    }
    const USER: &str = "token-user";
    const PASSWORD: &str = "pw-bearer-K3mZ8rT1";
    let reg = Distribution::start();
    let app = test_image(101);
    let tool = test_image(102);
    reg.push_image("library/app", "1.0", &app);
    reg.push_image("team/tool", "v1", &tool);
    let proxy = Proxy::start_bearer(reg.addr, USER, PASSWORD);
    // The token server really gates upstream.
    let r = send(client().get(format!("{}/v2/library/app/manifests/1.0", proxy.url())));
    assert_eq!(r.status, 401);
    let before = proxy.seen().len();

    let server = lighter_env(
        &upstream_toml(
            "docker.io",
            &proxy.url(),
            &format!("username = \"{USER}\"\npassword_env = \"LIGHTER_TEST_UPSTREAM_PASSWORD\""),
        ),
        &[
            ("LIGHTER_TEST_UPSTREAM_PASSWORD", PASSWORD),
            ("RUST_LOG", "debug"),
        ],
    );
    pull_and_check(&server, "docker.io/library/app", "", "1.0", &app);
    pull_and_check(&server, "team/tool", "?ns=docker.io", "v1", &tool);

    let token_requests = proxy.token_requests();
    assert!(
        !token_requests.is_empty(),
        "the token endpoint was not called"
    );
    let basic = format!("Basic {}", base64(format!("{USER}:{PASSWORD}").as_bytes()));
    for t in &token_requests {
        assert_eq!(
            t.authorization.as_deref(),
            Some(basic.as_str()),
            "token request without the configured credentials: {t:?}"
        );
        assert!(t.target.contains("service=lighter-test"), "{t:?}");
    }
    for repo in ["library/app", "team/tool"] {
        let scope = format!(
            "scope={}",
            "repository%3A".to_owned() + &repo.replace('/', "%2F")
        );
        let n = token_requests
            .iter()
            .filter(|t| {
                percent_decode(&t.target).contains(&format!("scope=repository:{repo}:pull"))
                    || t.target.contains(&scope)
            })
            .count();
        assert_eq!(
            n, 1,
            "token requests for {repo} (one per scope, then cached): {token_requests:#?}"
        );
    }
    // Everything after the first 401 of each repository carried a valid token.
    let seen = proxy.seen();
    let unauthorized = seen[before..]
        .iter()
        .filter(|s| s.authorization.is_none())
        .count();
    assert!(
        unauthorized <= 2,
        "requests without a token beyond the first per repository: {:#?}",
        &seen[before..]
    );
    let tokens = proxy.issued_tokens();
    for line in server.log_lines() {
        assert!(!line.contains(PASSWORD), "password in the log: {line}");
        for token in &tokens {
            assert!(!line.contains(token.as_str()), "token in the log: {line}");
        }
    }

    // Wrong credentials: the token server refuses, the pull is a 404, nothing leaks.
    let server = lighter_env(
        &upstream_toml(
            "docker.io",
            &proxy.url(),
            &format!("username = \"{USER}\"\npassword_env = \"LIGHTER_TEST_UPSTREAM_PASSWORD\""),
        ),
        &[("LIGHTER_TEST_UPSTREAM_PASSWORD", "not-the-password")],
    );
    let r = get_with(
        &server,
        "/v2/docker.io/library/app/manifests/1.0",
        &[("Accept", ACCEPT_ALL)],
    );
    r.assert_error(404, "MANIFEST_UNKNOWN");
    for line in server.log_lines() {
        assert!(
            !line.contains("not-the-password"),
            "password in the log: {line}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream over HTTPS
// ---------------------------------------------------------------------------------------------

/// Issue: upstreams over HTTPS, TLS roots: `ca_file` adds a private CA's roots. Distribution
/// serves HTTPS only, with a certificate for 127.0.0.1 from a CA no default root store holds.
/// With the CA in `ca_file` Lighter pulls upstream's bytes and digests; without it the pull fails
/// at once (the handshake is refused, nothing waits for a timeout) with a 404 saying the tag is
/// not cached and the upstream unavailable, nothing is cached, and nothing panics.
#[test]
fn https_upstream_with_a_private_ca_in_ca_file() {
    if !tools(&["docker-registry", "openssl"]) {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    common::tls::make_ca(pki.path());
    let (cert, key) = common::tls::make_leaf(pki.path(), "registry", "lighter-test-upstream", 1101);
    let ca = pki.path().join("ca.crt");
    let reg = Distribution::start_tls(TlsFiles {
        ca: &ca,
        cert: &cert,
        key: &key,
    });
    assert!(reg.url().starts_with("https://127.0.0.1:"), "{}", reg.url());
    // The CA really is private: a client with only the built-in roots is refused.
    let refused = client().get(format!("{}/v2/", reg.url())).send();
    assert!(refused.is_err(), "{refused:?}");
    let img = test_image(111);
    reg.push_image("library/app", "1.0", &img);

    let trusting = lighter_for(&reg.url(), &format!("ca_file = \"{}\"", ca.display()));
    pull_and_check(&trusting, "docker.io/library/app", "", "1.0", &img);
    assert!(cached(&trusting, &img.digest));

    // The same upstream without ca_file: only the built-in roots, which do not hold the CA.
    let untrusting = lighter_for(&reg.url(), "");
    let t = Instant::now();
    let r = get_with(
        &untrusting,
        "/v2/docker.io/library/app/manifests/1.0",
        &[("Accept", ACCEPT_ALL)],
    );
    let took = t.elapsed();
    r.assert_error(404, "MANIFEST_UNKNOWN");
    assert!(
        took < Duration::from_secs(4),
        "a refused handshake is answered at once, not after connect_timeout_ms (5 s): {took:?}"
    );
    let message = error_message(&r);
    assert!(
        message.contains("tag 1.0 of docker.io/library/app is not cached")
            && message.contains("upstream unavailable")
            && message.contains(&reg.url())
            && message.to_lowercase().contains("certificate"),
        "the 404 should name the tag, the upstream that could not be reached, and why (its \
         certificate): {message:?}"
    );
    assert!(
        log_has(&untrusting, "upstream request failed"),
        "the failure is logged for the operator"
    );
    let r = get(
        &untrusting,
        &format!("/v2/docker.io/library/app/blobs/{}", sha256(&img.layers[0])),
    );
    r.assert_error(404, "BLOB_UNKNOWN");
    assert!(!error_message(&r).is_empty(), "{}", r.describe());
    assert!(!untrusting
        .data_dir
        .join("repos/docker.io/library/app/_tags/1.0")
        .exists());
    let blobs: Vec<PathBuf> = paths_containing(&untrusting.data_dir.join("blobs"), "")
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(
        blobs.is_empty(),
        "cached without a trusted upstream: {blobs:?}"
    );
    for blob in [&img.manifest, &img.config, &img.layers[0], &img.layers[1]] {
        let found = paths_containing(&untrusting.data_dir, hex(&sha256(blob)));
        assert!(found.is_empty(), "{found:?}");
    }
    // Still serving, and nothing panicked on the way.
    get(&untrusting, "/v2/").assert_status(200);
    for line in untrusting.log_lines() {
        assert!(!line.contains("panicked"), "{line}");
    }
}

/// Bytes of an image's blobs (what the cache cap counts).
fn blob_bytes(img: &TestImage) -> u64 {
    (img.config.len() + img.layers.iter().map(Vec::len).sum::<usize>()) as u64
}

/// Whether the content of `digest` is in Lighter's data directory.
fn cached(server: &Server, digest: &str) -> bool {
    let hex = hex(digest);
    server
        .data_dir
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

/// Issue: cache size cap (`cache_size_max_bytes`) with least-recently-pulled eviction; pinned
/// repositories are never evicted. Four images pulled in a known order into a cap that holds
/// three: the one pulled least recently (not the pinned one, pulled first) goes, and pulling it
/// again fetches it again.
#[test]
fn cache_cap_evicts_the_least_recently_pulled_and_keeps_pinned() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let names = ["pinned", "a", "b", "c"];
    let imgs: Vec<TestImage> = (0..4).map(|i| test_image(60 + i)).collect();
    for (name, img) in names.iter().zip(&imgs) {
        reg.push_image(&format!("library/{name}"), "1.0", img);
    }
    let proxy = Proxy::start(reg.addr);
    let [pinned, a, b, c] = [&imgs[0], &imgs[1], &imgs[2], &imgs[3]];
    let cap = blob_bytes(pinned) + blob_bytes(a) + blob_bytes(c) + 512;
    assert!(
        cap < imgs.iter().map(blob_bytes).sum::<u64>(),
        "the four do not fit"
    );
    let toml = format!(
        "cache_size_max_bytes = {cap}\ncache_pinned_repositories = [\"docker.io/library/pinned\"]\n{}",
        upstream_toml("docker.io", &proxy.url(), "tag_ttl_ms = 600000")
    );
    let server = lighter(&toml);
    // Pull times are recorded to the second: space the pulls out.
    let pause = || std::thread::sleep(Duration::from_millis(1100));
    pull_and_check(&server, "docker.io/library/pinned", "", "1.0", pinned);
    pause();
    pull_and_check(&server, "docker.io/library/a", "", "1.0", a);
    pause();
    pull_and_check(&server, "docker.io/library/b", "", "1.0", b);
    // Again: now hits, so the data plane holds b's blob files open.
    pull_and_check(&server, "docker.io/library/b", "", "1.0", b);
    pause();
    pull_and_check(&server, "docker.io/library/a", "", "1.0", a); // a is now more recent than b
    pause();
    pull_and_check(&server, "docker.io/library/c", "", "1.0", c);
    let b_layer = sha256(&b.layers[0]);
    // Sweeps run after each completed download, so b may go one blob at a time.
    wait_until("b evicted", || {
        b.layers
            .iter()
            .chain([&b.config])
            .all(|blob| !cached(&server, &sha256(blob)))
    });
    for (what, img) in [("pinned", pinned), ("a", a), ("c", c)] {
        for blob in img.layers.iter().chain([&img.config]) {
            assert!(cached(&server, &sha256(blob)), "{what}'s blob was evicted");
        }
    }
    for blob in b.layers.iter().chain([&b.config]) {
        assert!(!cached(&server, &sha256(blob)), "b's blob is still cached");
    }
    assert!(log_has(&server, "evicted"), "eviction is logged");
    // The disk space of evicted blobs comes back: no Lighter process keeps them open for long
    // (the data plane checks its open files every few seconds).
    let blobs_dir = server.data_dir.join("blobs");
    let held_removed = || -> Vec<String> {
        let mut held = Vec::new();
        for pid in std::iter::once(server.pid()).chain(server.children()) {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let t = target.to_string_lossy().into_owned();
                if t.starts_with(&*blobs_dir.to_string_lossy()) && t.ends_with(" (deleted)") {
                    held.push(format!("pid {pid}: {t}"));
                }
            }
        }
        held
    };
    wait_until("evicted blob files to be closed", || {
        held_removed().is_empty()
    });
    let m = server.metrics();
    let b_bytes = blob_bytes(b);
    assert!(
        m["lighter_mirror_evicted_blobs_total"] >= b.layers.len() as u64
            && m["lighter_mirror_evicted_bytes_total"] >= b_bytes,
        "eviction is counted: {m:?}"
    );
    assert!(
        m["lighter_mirror_cached_bytes"] <= cap,
        "the cache gauge is under the cap: {m:?}"
    );
    // Evicted content is fetched again on the next pull.
    let before = proxy.count("GET", &format!("/blobs/{b_layer}"));
    pull_and_check(&server, "docker.io/library/b", "", "1.0", b);
    assert_eq!(proxy.count("GET", &format!("/blobs/{b_layer}")), before + 1);
}

/// Issue: pre-warm: `lighter prefetch <image>…` (and the API behind it) pulls whole images into
/// the cache before nodes ask; the pulls that follow never touch upstream.
#[test]
fn prefetch_warms_the_cache_so_pulls_never_touch_upstream() {
    if !tools(&["docker-registry"]) {
        return;
    }
    let reg = Distribution::start();
    let img = test_image(70);
    reg.push_image("library/warm", "1.0", &img);
    let proxy = Proxy::start(reg.addr);
    let server = lighter_for(&proxy.url(), "tag_ttl_ms = 600000");
    let out = std::process::Command::new(common::BIN)
        .args(["prefetch", "--registry", &server.url(""), "warm:1.0"])
        .output()
        .expect("run lighter prefetch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let warm = &report["images"][0];
    assert_eq!(warm["image"], "docker.io/library/warm:1.0");
    assert_eq!(warm["digest"], img.digest.as_str());
    assert_eq!(warm["blobs"], 1 + img.layers.len());
    assert_eq!(warm["bytes"], blob_bytes(&img));
    for blob in img.layers.iter().chain([&img.config]) {
        assert!(cached(&server, &sha256(blob)));
    }
    let seen = proxy.seen().len();
    pull_and_check(&server, "docker.io/library/warm", "", "1.0", &img);
    pull_and_check(&server, "warm", "?ns=docker.io", "1.0", &img);
    assert_eq!(
        proxy.seen().len(),
        seen,
        "pulls after prefetch reached upstream"
    );
    // Bad requests name what is wrong.
    let r = send(request(
        &server,
        Method::POST,
        "/v2/_lighter/prefetch?image=quay.io/x/y",
    ));
    r.assert_status(400);
    assert!(
        error_message(&r).contains("not a configured upstream"),
        "{}",
        r.describe()
    );
    let out = std::process::Command::new(common::BIN)
        .args([
            "prefetch",
            "--registry",
            &server.url(""),
            "docker.io/library/missing:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Issue 12: mirrored prefixes are access rules like any other, by their local name. Content
/// of a private upstream repository is served (and fetched upstream) only for those the rules
/// allow, whether the client names it by path prefix or containerd's `?ns=`; the challenge
/// names the local repository, so the token a client gets for it works at the data plane.
#[test]
fn private_upstream_content_is_served_only_to_those_the_rules_allow() {
    if !tools(&["docker-registry", "htpasswd"]) {
        return;
    }
    let reg = Distribution::start();
    let secret = test_image(41);
    let open = test_image(42);
    reg.push_image("team/secret", "1.0", &secret);
    reg.push_image("library/open", "1.0", &open);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("htpasswd")
        .args(["-Bbn", "ci", "s3cret"])
        .output()
        .unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let server = lighter(&format!(
        "{}[auth]\nhtpasswd_file = {:?}\n\
         [[auth.rules]]\nprefix = \"\"\npull = [\"anonymous\"]\n\
         [[auth.rules]]\nprefix = \"docker.io/team\"\npull = [\"user:ci\"]\n",
        upstream_toml("docker.io", &reg.url(), ""),
        htpasswd.display().to_string()
    ));
    let layer = sha256(&secret.layers[0]);
    for path in [
        "/v2/docker.io/team/secret/manifests/1.0".to_string(),
        "/v2/team/secret/manifests/1.0?ns=docker.io".to_string(),
        format!("/v2/docker.io/team/secret/blobs/{layer}"),
        format!("/v2/team/secret/blobs/{layer}?ns=docker.io"),
    ] {
        let r = get_with(&server, &path, &[("Accept", ACCEPT_ALL)]);
        r.assert_error(401, "UNAUTHORIZED");
        assert!(
            r.header("WWW-Authenticate")
                .contains("scope=\"repository:docker.io/team/secret:pull\""),
            "{path}: {}",
            r.header("WWW-Authenticate")
        );
    }
    // Nothing was fetched upstream for the refused requests.
    assert_eq!(reg.access_count("GET", "/v2/team/secret/manifests/1.0"), 0);
    assert_eq!(
        reg.access_count("GET", &format!("/v2/team/secret/blobs/{layer}")),
        0
    );

    // Other mirrored repositories stay open to anyone.
    pull_and_check(&server, "docker.io/library/open", "", "1.0", &open);

    // ci gets a token for the scope the challenge named (and the one containerd adds from the
    // path, which grants nothing here) and pulls by both addressings.
    let c = Server::client();
    let r = c
        .get(server.url(
            "/v2/_lighter/token?service=lighter&scope=repository:docker.io/team/secret:pull&scope=repository:team/secret:pull",
        ))
        .basic_auth("ci", Some("s3cret"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    let bearer = format!("Bearer {}", body["token"].as_str().unwrap());
    for path in [
        "/v2/docker.io/team/secret/manifests/1.0",
        "/v2/team/secret/manifests/1.0?ns=docker.io",
    ] {
        let r = get_with(
            &server,
            path,
            &[("Accept", ACCEPT_ALL), ("Authorization", bearer.as_str())],
        );
        r.assert_status(200);
        assert_eq!(r.body, secret.manifest);
    }
    for path in [
        format!("/v2/docker.io/team/secret/blobs/{layer}"),
        format!("/v2/team/secret/blobs/{layer}?ns=docker.io"),
    ] {
        let r = get_with(&server, &path, &[("Authorization", bearer.as_str())]);
        r.assert_status(200);
        assert_eq!(r.body, secret.layers[0]);
    }
    // An anonymous token (what a client without credentials gets) grants nothing there: 401,
    // logging in may help.
    let r = c
        .get(
            server.url(
                "/v2/_lighter/token?service=lighter&scope=repository:docker.io/team/secret:pull",
            ),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    let anonymous = format!("Bearer {}", body["token"].as_str().unwrap());
    let r = get_with(
        &server,
        "/v2/docker.io/team/secret/manifests/1.0",
        &[
            ("Accept", ACCEPT_ALL),
            ("Authorization", anonymous.as_str()),
        ],
    );
    r.assert_error(401, "UNAUTHORIZED");
}
