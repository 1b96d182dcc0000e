//! The node tier on one machine: several Lighter nodes, each in a network namespace of its own
//! with its own address ([`common::netns`]), peers of each other (`--peer`, every node listing
//! all of them, itself included), all mirroring `docker.io` from one CNCF Distribution (Debian's
//! `docker-registry`) in another namespace. Clients: reqwest from the test process (on the
//! bridge, `198.19.S.1`), an in-process fake peer, and real containerd (`ctr`) in the nodes'
//! namespaces. tc slows links where a transfer must last long enough to interrupt.
//!
//! Behaviour covered (the node tier, docs/ARCHITECTURE.md and the interface it implements):
//! one upstream GET per blob however many nodes miss it at once; bytes served between peers
//! (metrics say from where); containerd pulling through its node's Lighter, and around it when
//! that Lighter is down; a peer killed mid-transfer; a node joining mid-rollout; a peer serving
//! wrong bytes; the cap on bytes sent to peers; a large blob several nodes hold fetched as byte
//! ranges from them at once (one of them killed mid-part); containerd's content store served to
//! peers while Lighter drops its own copy.
//!
//! Blob ownership is rendezvous hashing ([`owner`], the same function as
//! `controlplane/src/peers/rendezvous.rs`): tests that need a given node to own a blob search
//! for bytes whose digest it wins ([`blob_owned_by`]).
//!
//! Needs root, iproute2 (`ip netns`, tc), `docker-registry` and `containerd`/`ctr`. Not root or no
//! network namespaces: skipped with a line saying why; `LIGHTER_SKIP_CLIENT_TESTS=1` skips too.
//! The tests share the machine's two cores and time transfers, so they run one at a time.

mod common;
mod oci;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::netns::{Host, Net, Proc};
use common::{gzip_stored, random_bytes, sha256, tar_file};
use oci::{assert_blobs_hash_to_their_names, image_manifest_value, to_bytes, OCI_MANIFEST};
use serde_json::json;
use sha2::Digest as _;

/// The registry port of every node (and Distribution's).
const PORT: u16 = 5000;
/// What the nodes mirror Distribution as.
const UPSTREAM: &str = "docker.io";
/// The repository in Distribution; the nodes' copy is `docker.io/library/app`.
const REPO: &str = "library/app";
const TAG: &str = "1.0";
/// Longest wait for anything a test polls for.
const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Skipping, one test at a time
// ---------------------------------------------------------------------------------------------

/// The lock that runs cluster tests one at a time, or None (with a line saying why) if they
/// cannot run here. A missing tool fails the test, naming the package, as in mirror.rs.
fn cluster(tools: &[&str]) -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    if std::env::var("LIGHTER_SKIP_CLIENT_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: LIGHTER_SKIP_CLIENT_TESTS=1 (needs {tools:?} and network namespaces)");
        return None;
    }
    if let Some(why) = common::netns::unavailable() {
        eprintln!("skipped: cluster tests need network namespaces: {why}");
        return None;
    }
    for name in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
        assert!(
            found,
            "{name} is not installed (Debian: docker-registry, containerd); install it or set \
             LIGHTER_SKIP_CLIENT_TESTS=1"
        );
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Polls `f` every 20 ms until it is true or `WAIT` passes.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test process's HTTP client (never a proxy from the environment).
fn http() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap()
    })
}

// ---------------------------------------------------------------------------------------------
// Ownership: rendezvous hashing, as the nodes compute it
// ---------------------------------------------------------------------------------------------

/// The first 8 bytes (big-endian) of sha256(digest NUL peer).
fn weight(digest: &str, peer: &str) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update(digest.as_bytes());
    h.update([0u8]);
    h.update(peer.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

/// The peer with the highest weight for `digest`.
fn owner<'p>(digest: &str, peers: &'p [String]) -> &'p str {
    peers
        .iter()
        .max_by_key(|p| weight(digest, p))
        .expect("peers")
}

/// `size` pseudo-random bytes whose digest `wanted` owns among `peers` (the last 8 bytes are a
/// counter, tried until it wins).
fn blob_owned_by(size: usize, seed: u64, wanted: &str, peers: &[String]) -> Vec<u8> {
    let mut bytes = random_bytes(size, seed);
    let body = size - 8;
    let mut prefix = sha2::Sha256::new();
    prefix.update(&bytes[..body]);
    for n in 0u64..10_000 {
        let mut h = prefix.clone();
        h.update(n.to_le_bytes());
        let digest = format!("sha256:{:x}", h.finalize());
        if owner(&digest, peers) == wanted {
            bytes[body..].copy_from_slice(&n.to_le_bytes());
            debug_assert_eq!(sha256(&bytes), digest);
            return bytes;
        }
    }
    panic!("no blob owned by {wanted} among {peers:?} in 10000 tries");
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// An image: config, layers, its OCI manifest and digest.
struct Image {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    manifest: Vec<u8>,
    digest: String,
}

impl Image {
    /// An image over `layers`, whose uncompressed forms have the digests `diff_ids`.
    fn new(seed: u64, layers: Vec<Vec<u8>>, diff_ids: Vec<String>) -> Image {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = to_bytes(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": [format!("SEED={seed}")]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }));
        let refs: Vec<&[u8]> = layers.iter().map(Vec::as_slice).collect();
        let manifest = to_bytes(&image_manifest_value(&config, &refs));
        let digest = sha256(&manifest);
        Image {
            config,
            layers,
            manifest,
            digest,
        }
    }

    /// Layers that are plain bytes (for HTTP clients; containerd could not unpack them).
    fn of_blobs(seed: u64, layers: Vec<Vec<u8>>) -> Image {
        let ids = layers.iter().map(|l| sha256(l)).collect();
        Image::new(seed, layers, ids)
    }

    /// Layers that are gzip'd tars of one file each, of these sizes (containerd unpacks them).
    fn unpackable(seed: u64, file_sizes: &[usize]) -> Image {
        let tars: Vec<Vec<u8>> = file_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let content = random_bytes(size, seed * 100 + i as u64);
                tar_file(&format!("file-{seed}-{i}.bin"), &content)
            })
            .collect();
        let ids = tars.iter().map(|t| sha256(t)).collect();
        Image::new(seed, tars.iter().map(|t| gzip_stored(t)).collect(), ids)
    }

    /// Config first, then the layers.
    fn blobs(&self) -> Vec<&[u8]> {
        std::iter::once(&self.config)
            .chain(&self.layers)
            .map(Vec::as_slice)
            .collect()
    }

    fn blob_bytes(&self) -> u64 {
        self.blobs().iter().map(|b| b.len() as u64).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream: CNCF Distribution in its own namespace
// ---------------------------------------------------------------------------------------------

struct Upstream {
    proc: Proc,
    host: Host,
    _dir: tempfile::TempDir,
}

impl Upstream {
    fn start(host: Host) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: {}:{PORT}\n  secret: lighter-cluster-tests\n",
                dir.path().join("storage").display(),
                host.ip
            ),
        )
        .unwrap();
        let mut cmd = host.command("docker-registry");
        cmd.arg("serve").arg(&config);
        let proc = host.spawn(cmd, "upstream");
        let up = Upstream {
            proc,
            host,
            _dir: dir,
        };
        wait_until("Distribution to answer /v2/", || {
            http()
                .get(format!("{}/v2/", up.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .is_ok_and(|r| r.status() == 200)
        });
        up
    }

    fn url(&self) -> String {
        self.host.url(PORT)
    }

    /// Access-log lines of requests for `method` + `path` (with any query: containerd adds
    /// `?ns=docker.io` when it falls back to upstream).
    fn access_lines(&self, method: &str, path: &str) -> Vec<String> {
        let request = format!("\"{method} {path}");
        self.proc
            .log_lines()
            .into_iter()
            .filter(|l| {
                l.split_once(&request)
                    .is_some_and(|(_, rest)| rest.starts_with(' ') || rest.starts_with('?'))
            })
            .collect()
    }

    /// GETs of a blob of `REPO` in the access log.
    fn blob_gets(&self, digest: &str) -> Vec<String> {
        self.access_lines("GET", &format!("/v2/{REPO}/blobs/{digest}"))
    }

    /// Asserts every blob of `img` was fetched from upstream exactly `n` times (waiting for
    /// the log lines, which Distribution writes when a response ends).
    fn assert_blob_gets(&self, img: &Image, n: usize) {
        for blob in img.blobs() {
            let digest = sha256(blob);
            wait_until("Distribution to log the blob GETs", || {
                self.blob_gets(&digest).len() >= n
            });
        }
        // Any extra GET would have been logged by now too.
        std::thread::sleep(Duration::from_millis(300));
        for blob in img.blobs() {
            let digest = sha256(blob);
            let gets = self.blob_gets(&digest);
            assert_eq!(
                gets.len(),
                n,
                "upstream GETs of blob {digest} ({} bytes):\n{}",
                blob.len(),
                gets.join("\n")
            );
        }
    }

    fn push_blob(&self, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let r = http()
            .post(format!("{}/v2/{REPO}/blobs/uploads/", self.url()))
            .header("Content-Length", "0")
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "upstream upload start");
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.url())
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = http()
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "upstream blob PUT");
        digest
    }

    /// Pushes the blobs and the manifest as `REPO:TAG`.
    fn push_image(&self, img: &Image) {
        for blob in img.blobs() {
            self.push_blob(blob);
        }
        let r = http()
            .put(format!("{}/v2/{REPO}/manifests/{TAG}", self.url()))
            .header("Content-Type", OCI_MANIFEST)
            .body(img.manifest.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "upstream manifest PUT");
    }
}

// ---------------------------------------------------------------------------------------------
// Lighter nodes
// ---------------------------------------------------------------------------------------------

/// One node: a namespace and the data directory of its Lighter, which runs or not.
struct Node {
    host: Host,
    data: tempfile::TempDir,
    lighter: Option<Proc>,
}

impl Node {
    /// `http://<ip>:5000`, as peers know it.
    fn peer(&self) -> String {
        self.host.url(PORT)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.peer())
    }

    /// `lighter serve` in the node's namespace with `args` after the listen address and data
    /// directory; returns once it listens.
    fn start(&mut self, args: &[String]) {
        assert!(self.lighter.is_none(), "{} runs already", self.peer());
        let mut cmd = self.host.command(common::BIN);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{}:{PORT}", self.host.ip))
            .arg("--data-dir")
            .arg(self.data.path())
            .args(args)
            .env("RUST_LOG", "info");
        let tag = format!("node {}", self.host.ip);
        let mut proc = self.host.spawn(cmd, &tag);
        let listening = proc.wait_for_log("listening on http://", WAIT);
        assert!(
            listening.is_some(),
            "{tag}: lighter did not report listening within {WAIT:?}:\n{}",
            proc.log_lines().join("\n")
        );
        self.lighter = Some(proc);
    }

    /// What its Lighter has logged so far (nothing if it is not running).
    fn log_lines(&self) -> Vec<String> {
        self.lighter
            .as_ref()
            .map(Proc::log_lines)
            .unwrap_or_default()
    }

    /// SIGKILL to `lighter serve` and both its planes at once (a crashed node).
    fn kill(&mut self) {
        if let Some(mut p) = self.lighter.take() {
            p.kill();
        }
    }

    /// `GET /v2/_lighter/metrics`, by name with labels.
    fn metrics(&self) -> HashMap<String, u64> {
        let r = http().get(self.url("/v2/_lighter/metrics")).send().unwrap();
        assert_eq!(r.status(), 200, "metrics of {}", self.peer());
        common::prometheus_values(&r.text().unwrap())
    }

    fn metric(&self, name: &str) -> u64 {
        let m = self.metrics();
        *m.get(name)
            .unwrap_or_else(|| panic!("{} has no metric {name}: {m:?}", self.peer()))
    }

    fn fetched_from_peers(&self) -> u64 {
        self.metric("lighter_blob_fetch_bytes_total{source=\"peer\"}")
    }

    fn fetched_from_upstream(&self) -> u64 {
        self.metric("lighter_blob_fetch_bytes_total{source=\"upstream\"}")
    }

    /// Where the node's store keeps a blob.
    fn stored(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    }
}

/// Nodes `198.19.S.10`, `.11`, … and Distribution at `.2`, on one bridge. Nodes start when a
/// test says, each with every node in its `--peer` list (and `peers`, which a test may extend
/// first).
struct Cluster {
    // Dropped in this order: the nodes, upstream, then the namespaces and the bridge.
    nodes: Vec<Node>,
    upstream: Upstream,
    peers: Vec<String>,
    net: Net,
}

impl Cluster {
    fn new(nodes: usize) -> Cluster {
        let net = Net::new();
        let upstream = Upstream::start(net.host(2));
        let nodes: Vec<Node> = (0..nodes)
            .map(|i| Node {
                host: net.host(10 + i as u8),
                data: tempfile::tempdir().unwrap(),
                lighter: None,
            })
            .collect();
        let peers = nodes.iter().map(Node::peer).collect();
        Cluster {
            nodes,
            upstream,
            peers,
            net,
        }
    }

    /// Starts node `i` with the cluster's flags and `extra`.
    fn start(&mut self, i: usize, extra: &[&str]) {
        let mut args = vec![
            "--upstream".to_owned(),
            format!("{UPSTREAM}={}", self.upstream.url()),
            "--peer-stall-timeout-ms".to_owned(),
            "1000".to_owned(),
            "--cores".to_owned(),
            "1".to_owned(),
        ];
        for p in &self.peers {
            args.push("--peer".to_owned());
            args.push(p.clone());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.nodes[i].start(&args);
    }

    fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i, &[]);
        }
    }

    /// The node owning `digest` (by the cluster's full peer list).
    fn owner_of(&self, digest: &str) -> usize {
        let o = owner(digest, &self.peers);
        self.nodes
            .iter()
            .position(|n| n.peer() == o)
            .unwrap_or_else(|| panic!("{o} owns {digest} and is not a node"))
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A GET read to its end or its failure.
#[derive(Debug, Default)]
struct Got {
    status: u16,
    digest_header: Option<String>,
    content_length: Option<u64>,
    body: Vec<u8>,
    /// Transport error before the head or while reading the body.
    error: Option<String>,
}

impl Got {
    /// Panics unless this is a 200 with exactly `want`'s bytes and its digest in the header.
    fn assert_blob(&self, want: &[u8], who: &str) {
        let digest = sha256(want);
        assert!(
            self.status == 200 && self.error.is_none(),
            "{who}: GET of blob {digest}: status {}, error {:?}, {} of {} bytes",
            self.status,
            self.error,
            self.body.len(),
            want.len()
        );
        assert_eq!(
            self.body.len(),
            want.len(),
            "{who}: length of blob {digest}"
        );
        assert!(
            sha256(&self.body) == digest,
            "{who}: blob {digest}: the body hashes to {}",
            sha256(&self.body)
        );
        assert_eq!(
            self.digest_header.as_deref(),
            Some(digest.as_str()),
            "{who}: Docker-Content-Digest"
        );
    }
}

/// GETs `url`, adding the bytes read to `progress` as they arrive.
fn get(url: &str, progress: Option<&AtomicU64>) -> Got {
    let mut got = Got::default();
    let mut resp = match http().get(url).send() {
        Ok(r) => r,
        Err(e) => {
            got.error = Some(format!("{e:?}"));
            return got;
        }
    };
    got.status = resp.status().as_u16();
    got.content_length = resp.content_length();
    got.digest_header = resp
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.body.extend_from_slice(&buf[..n]);
                if let Some(p) = progress {
                    p.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            Err(e) => {
                got.error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    got
}

/// The mirror URL of a blob of the image at the node `peer` (`http://IP:PORT`).
fn blob_url(peer: &str, digest: &str) -> String {
    format!("{peer}/v2/{UPSTREAM}/{REPO}/blobs/{digest}")
}

/// Pulls `img` through `node` as a client would: the manifest by tag, then every blob;
/// asserts bytes, digests and statuses.
fn pull(node: &Node, img: &Image) {
    let who = node.peer();
    let r = http()
        .get(node.url(&format!("/v2/{UPSTREAM}/{REPO}/manifests/{TAG}")))
        .header("Accept", OCI_MANIFEST)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{who}: manifest by tag");
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        img.digest,
        "{who}: manifest digest"
    );
    assert!(r.bytes().unwrap() == img.manifest, "{who}: manifest bytes");
    for blob in img.blobs() {
        get(&blob_url(&who, &sha256(blob)), None).assert_blob(blob, &who);
    }
}

/// Runs `f(i)` for every `i` in `which` on its own thread, all released at once; returns
/// their results in order.
fn at_once<T: Send + 'static>(
    which: &[usize],
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(which.len()));
    let f = Arc::new(f);
    let handles: Vec<JoinHandle<T>> = which
        .iter()
        .map(|&i| {
            let (barrier, f) = (barrier.clone(), f.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------------
// Many nodes, one upstream GET
// ---------------------------------------------------------------------------------------------

/// Four nodes miss the same image at the same instant: every node gets upstream's bytes, and
/// upstream sees exactly one GET per blob. Each blob comes from upstream to its owner only; the
/// other nodes get it from peers, and their metrics say so, byte for byte.
#[test]
fn n_nodes_missing_at_once_cause_one_upstream_get_per_blob() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    let mut c = Cluster::new(4);
    // Upstream's link slowed so the nodes' requests all arrive while the owner downloads.
    c.upstream.host.limit_mbit(400);
    let img = Arc::new(Image::of_blobs(
        1,
        vec![random_bytes(24 * MIB, 11), random_bytes(MIB, 12)],
    ));
    c.upstream.push_image(&img);
    c.start_all();
    let c = Arc::new(c);
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    let (c2, img2) = (c.clone(), img.clone());
    at_once(&all, move |i| pull(&c2.nodes[i], &img2));

    c.upstream.assert_blob_gets(&img, 1);
    for (i, node) in c.nodes.iter().enumerate() {
        let (mut owned, mut not_owned) = (0, 0);
        for blob in img.blobs() {
            match c.owner_of(&sha256(blob)) == i {
                true => owned += blob.len() as u64,
                false => not_owned += blob.len() as u64,
            }
        }
        let m = node.metrics();
        assert_eq!(
            (node.fetched_from_upstream(), node.fetched_from_peers()),
            (owned, not_owned),
            "node {} (bytes from upstream, from peers): it owns {owned} bytes of the image's \
             {}; metrics {m:?}",
            node.peer(),
            img.blob_bytes()
        );
        assert_eq!(m["lighter_peer_fetch_failures_total"], 0, "{m:?}");
        assert_eq!(m["lighter_peers"], 4, "{m:?}");
        for blob in img.blobs() {
            let stored = node.stored(&sha256(blob));
            wait_until("the blob to be published", || stored.exists());
        }
        assert_eq!(
            assert_blobs_hash_to_their_names(node.data.path()),
            img.blobs().len() + 1, // and the manifest
        );
    }
    // Fan-out (peer_fanout_max 1): the big layer's owner sends it to one peer, and sends the
    // other requesters down a chain, instead of uploading three copies itself.
    let big = &img.layers[0];
    let big_owner = &c.nodes[c.owner_of(&sha256(big))];
    let owner_sent = big_owner.metric("lighter_peer_served_bytes_total");
    assert!(
        owner_sent < 2 * big.len() as u64,
        "the owner of the {} byte layer sent {owner_sent} bytes to peers: more than one copy",
        big.len()
    );
    let redirected: u64 = c
        .nodes
        .iter()
        .map(|n| n.metric("lighter_peer_requests_total{answer=\"redirected\"}"))
        .sum();
    assert!(redirected >= 1, "no requester was sent to another peer");
    let served: u64 = c
        .nodes
        .iter()
        .map(|n| n.metric("lighter_peer_served_bytes_total"))
        .sum();
    let fetched: u64 = c.nodes.iter().map(Node::fetched_from_peers).sum();
    assert_eq!(
        served, fetched,
        "bytes sent to peers = bytes received from them"
    );
}

// ---------------------------------------------------------------------------------------------
// Parallel byte ranges
// ---------------------------------------------------------------------------------------------

/// Each node's `lighter_peer_served_bytes_total`, in node order (0 for a node that is down).
fn served_by_each(c: &Cluster) -> Vec<u64> {
    c.nodes
        .iter()
        .map(|n| match n.lighter {
            Some(_) => n.metric("lighter_peer_served_bytes_total"),
            None => 0,
        })
        .collect()
}

/// How much more each node has served than in `before`.
fn served_since(c: &Cluster, before: &[u64]) -> Vec<u64> {
    served_by_each(c)
        .iter()
        .zip(before)
        .map(|(now, then)| now.saturating_sub(*then))
        .collect()
}

/// A 16 MiB blob (`peer_range_parallel_min_bytes` 1 MiB, every node's uploads capped at 4 MiB/s)
/// owned by node 0. Nodes 1 and 2 pull it one after the other, and each tells the owner it holds
/// it. Node 3 then gets a redirect to several holders at once and fetches a range from each:
/// its bytes are upstream's, every holder it was given sent part of them (they add up to the
/// blob, all counted as from peers), and upstream saw one GET. A fifth node pulls it last, from
/// four holders, one of which (node 1) is killed once its part flows: the part is finished by
/// the owner and the client still gets exactly upstream's bytes.
#[test]
fn a_large_blob_several_nodes_hold_is_fetched_as_ranges_from_them_at_once() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    const SIZE: usize = 16 * MIB;
    const CAP: usize = 4 * MIB;
    let mut c = Cluster::new(5);
    let blob = blob_owned_by(SIZE, 80, &c.peers[0], &c.peers);
    let digest = c.upstream.push_blob(&blob);
    let (min, cap) = (MIB.to_string(), CAP.to_string());
    for i in 0..c.nodes.len() {
        c.start(
            i,
            &[
                "--peer-range-parallel-min-bytes",
                &min,
                "--peer-upload-max-bytes-per-sec",
                &cap,
            ],
        );
    }
    let redirected =
        |c: &Cluster| c.nodes[0].metric("lighter_peer_requests_total{answer=\"redirected\"}");

    // Node 1 from the owner (downloading it from upstream), then node 2 from the owner and
    // node 1 (both hold it whole once node 1 has told the owner). Each tells the owner it holds
    // the blob right after publishing it, off the download's path: a second is plenty.
    for i in [1, 2] {
        let before = served_by_each(&c);
        get(&blob_url(&c.peers[i], &digest), None).assert_blob(&blob, &format!("node {i}"));
        let sent = served_since(&c, &before);
        assert_eq!(
            sent.iter().sum::<u64>(),
            SIZE as u64,
            "node {i}: bytes its peers sent ({sent:?})"
        );
        if i == 2 {
            // Node 1's report reached the owner: node 2 got ranges from both.
            assert!(
                sent[0] > 0 && sent[1] > 0,
                "node 2 was not given both holders (bytes each sent: {sent:?})"
            );
        }
        wait_until("the blob to be published", || {
            c.nodes[i].stored(&digest).exists()
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(c.upstream.blob_gets(&digest).len(), 1);

    let before = served_by_each(&c);
    let redirected_before = redirected(&c);
    get(&blob_url(&c.peers[3], &digest), None).assert_blob(&blob, "node 3");
    let sent = served_since(&c, &before);
    let sources = sent[..3].iter().filter(|&&n| n > 0).count();
    assert!(
        sources >= 2,
        "node 3 got the blob from {sources} of the nodes holding it (bytes each sent: {sent:?})"
    );
    assert_eq!(
        sent.iter().sum::<u64>(),
        SIZE as u64,
        "bytes the holders sent node 3 ({sent:?})"
    );
    assert_eq!(
        redirected(&c) - redirected_before,
        1,
        "the owner answers node 3 with one redirect (to its sources)"
    );
    let m = c.nodes[3].metrics();
    assert_eq!(c.nodes[3].fetched_from_peers(), SIZE as u64, "{m:?}");
    assert_eq!(c.nodes[3].fetched_from_upstream(), 0, "{m:?}");
    assert_eq!(m["lighter_peer_fetch_failures_total"], 0, "{m:?}");
    wait_until("the blob to be published", || {
        c.nodes[3].stored(&digest).exists()
    });
    assert_blobs_hash_to_their_names(c.nodes[3].data.path());
    std::thread::sleep(Duration::from_secs(1));

    // Node 4: four holders, node 1 among them, a 4 MiB part each; node 4's link slowed to
    // 16 Mbit/s so the parts take seconds. Node 1 is killed once its part flows.
    c.nodes[4].host.limit_mbit(16);
    let before = served_by_each(&c);
    let client = {
        let url = blob_url(&c.peers[4], &digest);
        std::thread::spawn(move || get(&url, None))
    };
    let node1_sent = |c: &Cluster| c.nodes[1].metric("lighter_peer_served_bytes_total") - before[1];
    wait_until("node 1 to send node 4 a part", || {
        node1_sent(&c) >= 256 << 10
    });
    let at_kill = node1_sent(&c);
    c.nodes[1].kill();
    eprintln!("killed node 1 once it had sent node 4 {at_kill} bytes");
    assert!(
        at_kill < (SIZE / 4) as u64,
        "node 1 had sent its whole part ({at_kill} bytes) before the kill: the test proves nothing"
    );
    client
        .join()
        .unwrap()
        .assert_blob(&blob, "node 4, after a source died");
    let m = c.nodes[4].metrics();
    assert_eq!(c.nodes[4].fetched_from_peers(), SIZE as u64, "{m:?}");
    assert_eq!(c.nodes[4].fetched_from_upstream(), 0, "{m:?}");
    assert!(m["lighter_peer_fetch_failures_total"] >= 1, "{m:?}");
    wait_until("the blob to be published", || {
        c.nodes[4].stored(&digest).exists()
    });
    assert_blobs_hash_to_their_names(c.nodes[4].data.path());
    assert_eq!(
        c.upstream.blob_gets(&digest).len(),
        1,
        "upstream GETs: {:?}",
        c.upstream.blob_gets(&digest)
    );
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// A containerd in `node`'s namespace whose hosts.toml for docker.io lists `host` first and
/// upstream as the server. Returns it and its hosts directory.
fn containerd_for(node: &Node, host: &str, server: &str) -> (Containerd, String) {
    let ctd = Containerd::start_in(Some(&node.host.ns));
    let dir = ctd.dir().join("certs.d");
    std::fs::create_dir_all(dir.join(UPSTREAM)).unwrap();
    std::fs::write(
        dir.join(UPSTREAM).join("hosts.toml"),
        format!(
            "server = \"{server}\"\n\n[host.\"{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    (ctd, dir.to_str().unwrap().to_owned())
}

/// `ctr images pull` of the image in containerd's namespace; asserts it succeeded and that
/// containerd holds the image at its digest and every blob.
fn ctr_pull(ctd: &Containerd, hosts_dir: &str, img: &Image, who: &str) {
    let reference = format!("{UPSTREAM}/{REPO}:{TAG}");
    let out = ctd.output(&[
        "images",
        "pull",
        "--hosts-dir",
        hosts_dir,
        "--snapshotter",
        "native",
        &reference,
    ]);
    assert!(
        out.status.success(),
        "{who}: ctr pull {reference} failed: {}{}\ncontainerd: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    let list = ctd.output(&["images", "ls"]);
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with(&reference) && l.contains(&img.digest)),
        "{who}: ctr images ls has no {reference} at {}:\n{list}",
        img.digest
    );
    let content = ctd.output(&["content", "ls", "-q"]);
    let content = String::from_utf8_lossy(&content.stdout).into_owned();
    for blob in img.blobs() {
        assert!(content.contains(&sha256(blob)), "{who}: {content}");
    }
}

/// containerd on two nodes, each with its own node's Lighter first in hosts.toml and upstream as
/// the server, pull the same image at once: both succeed (layers unpacked), every blob request
/// upstream sees comes from a Lighter (none from containerd), one GET per blob.
#[test]
fn containerd_on_two_nodes_pulls_through_its_own_lighter_with_one_upstream_get_per_blob() {
    let Some(_one) = cluster(&["docker-registry", "containerd", "ctr"]) else {
        return;
    };
    let mut c = Cluster::new(3);
    let img = Arc::new(Image::unpackable(2, &[6 * MIB, 300_000]));
    c.upstream.push_image(&img);
    c.start_all();
    let server = c.upstream.url();
    let ctds: Vec<(Containerd, String)> = c.nodes[..2]
        .iter()
        .map(|n| containerd_for(n, &n.peer(), &server))
        .collect();
    let ctds = Arc::new(ctds);
    let (ctds2, img2) = (ctds.clone(), img.clone());
    at_once(&[0, 1], move |i| {
        let (ctd, hosts) = &ctds2[i];
        ctr_pull(ctd, hosts, &img2, &format!("containerd on node {i}"));
    });

    c.upstream.assert_blob_gets(&img, 1);
    for blob in img.blobs() {
        for line in c.upstream.blob_gets(&sha256(blob)) {
            assert!(
                line.contains("\"lighter/"),
                "containerd went around its Lighter: {line}"
            );
        }
    }
    for node in &c.nodes[..2] {
        let tag = node
            .data
            .path()
            .join(format!("repos/{UPSTREAM}/{REPO}/_tags/{TAG}"));
        assert!(
            tag.exists(),
            "{}: containerd's pull did not go through this Lighter",
            node.peer()
        );
        assert_eq!(
            node.fetched_from_upstream() + node.fetched_from_peers(),
            img.blob_bytes(),
            "{}: every blob fetched once, from upstream or a peer",
            node.peer()
        );
    }
}

/// A node whose Lighter is down: its containerd moves on to the next host in hosts.toml
/// (upstream) and the pull succeeds; the blobs come straight from upstream to containerd.
#[test]
fn containerd_pulls_from_upstream_while_its_nodes_lighter_is_down() {
    let Some(_one) = cluster(&["docker-registry", "containerd", "ctr"]) else {
        return;
    };
    let mut c = Cluster::new(2);
    let img = Image::unpackable(3, &[MIB, 100_000]);
    c.upstream.push_image(&img);
    // Node 1 runs, with node 0 in its peer list; node 0's Lighter never starts.
    c.start(1, &[]);
    let node = &c.nodes[0];
    let (ctd, hosts) = containerd_for(node, &node.peer(), &c.upstream.url());
    ctr_pull(
        &ctd,
        &hosts,
        &img,
        "containerd on the node whose Lighter is down",
    );
    c.upstream.assert_blob_gets(&img, 1);
    for blob in img.blobs() {
        for line in c.upstream.blob_gets(&sha256(blob)) {
            assert!(
                line.contains("\"containerd/") && line.starts_with(&format!("{} ", node.host.ip)),
                "expected containerd on {} to fetch the blob itself: {line}",
                node.host.ip
            );
        }
    }
}

/// A node whose Lighter mounts its containerd's content store (`--containerd-content-dir`), and
/// owns the image's 6 MiB layer. containerd there pulls the image through it; then, within a
/// sweep or two, Lighter's data directory no longer holds the layer while containerd's store
/// does (nothing stored twice). A second node's client asks its own Lighter for the layer: it
/// gets upstream's bytes from the first node, which sends them from containerd's file, and
/// upstream sees no second GET. The first node's own clients are served from there too.
#[test]
fn containerd_content_store_is_served_to_peers_and_lighter_drops_its_own_copy() {
    let Some(_one) = cluster(&["docker-registry", "containerd", "ctr"]) else {
        return;
    };
    let mut c = Cluster::new(2);
    // An unpackable image whose layer node 0 owns (about one seed in two).
    let img = (300..)
        .map(|seed| Image::unpackable(seed, &[6 * MIB]))
        .find(|img| owner(&sha256(&img.layers[0]), &c.peers) == c.peers[0])
        .unwrap();
    let layer = &img.layers[0];
    let digest = sha256(layer);
    c.upstream.push_image(&img);
    let server = c.upstream.url();
    let (ctd, hosts) = containerd_for(&c.nodes[0], &c.nodes[0].peer(), &server);
    let content = ctd.dir().join("root/io.containerd.content.v1.content");
    let content_arg = content.to_str().unwrap().to_owned();
    c.start(0, &["--containerd-content-dir", &content_arg]);
    c.start(1, &[]);

    ctr_pull(&ctd, &hosts, &img, "containerd on node 0");
    assert_eq!(c.upstream.blob_gets(&digest).len(), 1);
    let in_containerd = content
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap());
    let lighters = c.nodes[0].stored(&digest);
    wait_until(
        "node 0's Lighter to drop the layer containerd holds",
        || !lighters.exists(),
    );
    let held = std::fs::read(&in_containerd)
        .unwrap_or_else(|e| panic!("containerd's store has no {}: {e}", in_containerd.display()));
    assert_eq!(sha256(&held), digest, "containerd's copy of the layer");
    assert!(
        c.nodes[0].metric("lighter_mirror_evicted_blobs_total") >= 1,
        "node 0 counted no eviction"
    );

    // A peer asks its own Lighter: the owner sends the layer from containerd's file.
    let served_before = c.nodes[0].metric("lighter_peer_served_bytes_total");
    let fetched_before = c.nodes[1].fetched_from_peers();
    get(&blob_url(&c.peers[1], &digest), None).assert_blob(layer, "client of node 1");
    assert_eq!(
        c.nodes[0].metric("lighter_peer_served_bytes_total") - served_before,
        layer.len() as u64,
        "bytes node 0 sent its peer from containerd's store"
    );
    assert_eq!(
        c.nodes[1].fetched_from_peers() - fetched_before,
        layer.len() as u64
    );
    wait_until("node 1 to publish the layer", || {
        c.nodes[1].stored(&digest).exists()
    });
    assert_blobs_hash_to_their_names(c.nodes[1].data.path());

    // Node 0's own clients get it from containerd's file as well, with no download.
    get(&blob_url(&c.peers[0], &digest), None).assert_blob(layer, "client of node 0");
    assert!(
        !lighters.exists(),
        "node 0's Lighter stored the layer again"
    );
    let gets = c.upstream.blob_gets(&digest);
    assert_eq!(
        gets.len(),
        1,
        "upstream GETs of the layer:\n{}",
        gets.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

/// Three nodes download a 24 MiB blob over slow links (80 Mbit/s) while its owner, the node the
/// bytes come from, is killed (SIGKILL to its supervisor and both planes) part-way: every client
/// still gets a complete body with exactly upstream's bytes.
#[test]
fn a_peer_killed_mid_transfer_does_not_fail_the_others() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    const SIZE: usize = 24 * MIB;
    let mut c = Cluster::new(4);
    for n in &c.nodes {
        n.host.limit_mbit(80);
    }
    let victim = c.peers[0].clone();
    let blob = blob_owned_by(SIZE, 31, &victim, &c.peers);
    let digest = c.upstream.push_blob(&blob);
    c.start_all();
    let urls: Vec<String> = c
        .nodes
        .iter()
        .map(|n| blob_url(&n.peer(), &digest))
        .collect();
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let clients = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            at_once(&[1, 2, 3], move |i| (i, get(&urls[i], Some(&progress[i]))))
        })
    };
    // Once bytes flow (but long before they are all in), the owner dies.
    wait_until("the clients to receive 2 MiB", || {
        progress[1..]
            .iter()
            .any(|p| p.load(Ordering::Relaxed) >= 2 * MIB as u64)
    });
    let at_kill: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    c.nodes[0].kill();
    eprintln!("killed the owner {victim}; clients had {at_kill:?} bytes");
    assert!(
        at_kill.iter().all(|&n| n < SIZE as u64),
        "a client was done before the kill ({at_kill:?}): the test proves nothing"
    );
    for (i, got) in clients.join().unwrap() {
        got.assert_blob(&blob, &format!("client of node {i} after its source died"));
    }
    // Only the dead peer failed: no survivor gave up on another (a survivor that stalls is
    // waiting on a cycle of downloads that feed each other).
    let survivors: Vec<String> = c.peers[1..].to_vec();
    let blamed: Vec<String> = c.nodes[1..]
        .iter()
        .flat_map(Node::log_lines)
        .filter(|l| {
            l.contains("peer failed;") && survivors.iter().any(|s| l.contains(&format!("peer={s}")))
        })
        .collect();
    assert!(
        blamed.is_empty(),
        "after {victim} died, survivors gave up on each other:\n{}",
        blamed.join("\n")
    );
    let gets = c.upstream.blob_gets(&digest);
    assert!(
        (1..=2).contains(&gets.len()),
        "{} upstream GETs; expected the dead owner's and at most one resume (Range) by the \
         blob's next owner, the same node in every survivor's view:\n{}",
        gets.len(),
        gets.join("\n")
    );
    let failures: u64 = c.nodes[1..]
        .iter()
        .map(|n| n.metric("lighter_peer_fetch_failures_total"))
        .sum();
    assert!(failures >= 1, "no node counted the dead peer's failure");
    for n in &c.nodes[1..] {
        wait_until("the blob to be published", || n.stored(&digest).exists());
        assert_blobs_hash_to_their_names(n.data.path());
    }
}

/// Four nodes in every peer list, one not started yet. The three pull an image (each blob once
/// from upstream: the dead peer's blobs go to the next owner, the same one for every node); then
/// the fourth starts and pulls: it completes with every blob from peers, and upstream still
/// sends each blob once. (The blobs it now owns, it gets from the peer next in line, which
/// owned them while it was away.)
#[test]
fn a_node_joining_mid_rollout_pulls_everything_from_peers() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    let mut c = Cluster::new(4);
    // One 4 MiB layer owned by each node, the late one included: its fair share.
    let layers: Vec<Vec<u8>> = (0..4)
        .map(|i| blob_owned_by(4 * MIB, 40 + i as u64, &c.peers[i], &c.peers))
        .collect();
    let img = Arc::new(Image::of_blobs(4, layers));
    c.upstream.push_image(&img);
    for i in 0..3 {
        c.start(i, &[]);
    }
    let peers = c.peers.clone();
    let img2 = img.clone();
    at_once(&[0, 1, 2], move |i| {
        for blob in img2.blobs() {
            get(&blob_url(&peers[i], &sha256(blob)), None).assert_blob(blob, &peers[i]);
        }
    });
    c.upstream.assert_blob_gets(&img, 1);

    c.start(3, &[]);
    pull(&c.nodes[3], &img);
    let late = &c.nodes[3];
    let mut own = 0;
    for blob in img.blobs() {
        let digest = sha256(blob);
        if c.owner_of(&digest) == 3 {
            own += blob.len() as u64;
        }
        assert_eq!(
            c.upstream.blob_gets(&digest).len(),
            1,
            "{digest}: the late node went upstream for a blob peers held"
        );
    }
    assert!(
        own > 0,
        "the late node owns none of the image: the test proves nothing"
    );
    let m = late.metrics();
    assert_eq!(late.fetched_from_peers(), img.blob_bytes(), "{m:?}");
    assert_eq!(late.fetched_from_upstream(), 0, "{m:?}");
}

/// A fake peer that answers every `/v2/_lighter/peer/blobs/<digest>` with the blob's length but
/// wrong bytes (at ~20 MiB/s, so clients follow the download to its end), and owns every blob.
/// Each of three nodes asks it first for a different blob, so each lie is told once: a flipped
/// byte mid-body, a wrong last byte, all garbage. No node ever lets a client complete a body
/// with wrong bytes (it gets an error or a cut body, then the right bytes on a later try), and
/// every node's store holds only blobs that hash to their names.
#[test]
fn a_peer_serving_wrong_bytes_never_gets_them_completed_or_published() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    let mut c = Cluster::new(3);
    let fake_host = c.net.host(50);
    let fake_url = fake_host.url(PORT);
    c.peers.push(fake_url.clone());
    let blobs: Vec<Vec<u8>> = (0..3)
        .map(|i| blob_owned_by(3 * MIB, 50 + i, &fake_url, &c.peers))
        .collect();
    let mut lies = HashMap::new();
    for (i, blob) in blobs.iter().enumerate() {
        let mut bad = blob.clone();
        match i {
            0 => bad[blob.len() / 2] ^= 1,
            1 => *bad.last_mut().unwrap() ^= 0xff,
            _ => bad = random_bytes(blob.len(), 999),
        }
        lies.insert(sha256(blob), bad);
    }
    let fake = FakePeer::start(&fake_host, lies);
    for blob in &blobs {
        c.upstream.push_blob(blob);
    }
    c.start_all();

    const TRIES: usize = 4;
    let peers = c.peers.clone();
    let blobs = Arc::new(blobs);
    let blobs2 = blobs.clone();
    let reports = at_once(&[0, 1, 2], move |i| {
        let mut wrong = Vec::new();
        // Node i asks for blob i first.
        for k in 0..blobs2.len() {
            let blob = &blobs2[(i + k) % blobs2.len()];
            let digest = sha256(blob);
            let mut ok = false;
            for attempt in 0..TRIES {
                let got = get(&blob_url(&peers[i], &digest), None);
                let complete = got.status == 200
                    && got.error.is_none()
                    && got.body.len() as u64 == got.content_length.unwrap_or(0);
                eprintln!(
                    "node {i} {digest} try {attempt}: status {}, {} bytes, error {:?}",
                    got.status,
                    got.body.len(),
                    got.error
                );
                if complete && got.body != *blob {
                    wrong.push(format!(
                        "node {i}: {digest} try {attempt}: a complete 200 body hashing to {}",
                        sha256(&got.body)
                    ));
                }
                if complete && got.body == *blob {
                    ok = true;
                    break;
                }
            }
            if !ok {
                wrong.push(format!(
                    "node {i}: {digest}: no right body in {TRIES} tries"
                ));
            }
        }
        wrong
    });
    let wrong: Vec<String> = reports.into_iter().flatten().collect();
    assert!(
        wrong.is_empty(),
        "clients must get the right bytes or an aborted body, never wrong bytes:\n{}",
        wrong.join("\n")
    );
    let asked = fake.asked();
    for blob in blobs.iter() {
        let digest = sha256(blob);
        assert!(
            asked.iter().any(|a| a.contains(&digest)),
            "nobody asked the fake owner for {digest}: that lie was never told ({asked:?})"
        );
    }
    for n in &c.nodes {
        assert!(
            n.metric("lighter_mirror_blob_digest_mismatches_total") >= 1,
            "{} never saw the wrong bytes",
            n.peer()
        );
        for blob in blobs.iter() {
            let stored = n.stored(&sha256(blob));
            wait_until("the right blob to be published", || stored.exists());
        }
        assert_blobs_hash_to_their_names(n.data.path());
    }
    drop(fake);
}

/// An HTTP server in its own namespace that answers peers' blob requests with wrong bytes
/// (honouring `Range: bytes=N-`), and 404 to anything else. Stops on drop.
struct FakePeer {
    /// Request lines, as they came.
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakePeer {
    fn start(host: &Host, lies: HashMap<String, Vec<u8>>) -> FakePeer {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addr = format!("{}:{PORT}", host.ip);
        let (asked2, stop2) = (asked.clone(), stop.clone());
        let lies = Arc::new(lies);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = host.thread(move || {
            let listener = TcpListener::bind(&addr).expect("fake peer: bind");
            listener.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let mut conns = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (lies, asked) = (lies.clone(), asked2.clone());
                        conns.push(std::thread::spawn(move || {
                            let _ = fake_answer(conn, &lies, &asked);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for t in conns {
                let _ = t.join();
            }
        });
        rx.recv_timeout(WAIT).expect("fake peer listening");
        FakePeer {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request, one answer (64 KiB every 3 ms), then close.
fn fake_answer(
    mut conn: TcpStream,
    lies: &HashMap<String, Vec<u8>>,
    asked: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    eprintln!("[fake peer] {request_line}");
    asked.lock().unwrap().push(request_line.clone());
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    let lie = path
        .strip_prefix("/v2/_lighter/peer/blobs/")
        .and_then(|d| lies.get(d));
    let Some(bytes) = lie else {
        return conn.write_all(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
    };
    let from: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("range").then(|| v.trim().to_owned())
        })
        .and_then(|v| v.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or(0)
        .min(bytes.len());
    let status = if from > 0 {
        format!(
            "206 Partial Content\r\ncontent-range: bytes {from}-{}/{}",
            bytes.len() - 1,
            bytes.len()
        )
    } else {
        "200 OK".to_owned()
    };
    conn.write_all(
        format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\n\
             connection: close\r\n\r\n",
            bytes.len() - from
        )
        .as_bytes(),
    )?;
    for chunk in bytes[from..].chunks(64 << 10) {
        conn.write_all(chunk)?;
        std::thread::sleep(Duration::from_millis(3));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

/// `peer_upload_max_bytes_per_sec`: the owner of a 16 MiB blob, capped at 4 MiB/s, takes at
/// least ~4 s to send it to a peer (asserted: more than 3 s), and the peer gets exactly
/// upstream's bytes, all of them from the owner.
#[test]
fn peer_uploads_are_capped_at_peer_upload_max_bytes_per_sec() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    const SIZE: usize = 16 * MIB;
    const CAP: usize = 4 * MIB;
    let mut c = Cluster::new(2);
    let blob = blob_owned_by(SIZE, 70, &c.peers[0], &c.peers);
    let digest = c.upstream.push_blob(&blob);
    c.start(0, &["--peer-upload-max-bytes-per-sec", &CAP.to_string()]);
    c.start(1, &[]);
    let started = Instant::now();
    let got = get(&blob_url(&c.peers[1], &digest), None);
    let took = started.elapsed();
    got.assert_blob(&blob, "client of the capped owner's peer");
    // At the cap, SIZE/CAP = 4 s; a tenth of a second of burst and timer slack aside.
    let floor = Duration::from_secs_f64(0.75 * SIZE as f64 / CAP as f64);
    assert!(
        took >= floor,
        "{SIZE} bytes through a peer capped at {CAP} B/s took {took:?} (at least {floor:?} \
         expected)"
    );
    assert_eq!(c.nodes[1].fetched_from_peers(), SIZE as u64);
    assert_eq!(c.nodes[1].fetched_from_upstream(), 0);
    assert_eq!(
        c.nodes[0].metric("lighter_peer_served_bytes_total"),
        SIZE as u64
    );
    assert_eq!(
        c.nodes[0].metric("lighter_peer_requests_total{answer=\"served\"}"),
        1
    );
    assert_eq!(c.upstream.blob_gets(&digest).len(), 1);
}

/// Each node's own view of `peers.test`: a hosts file that `ip netns exec` mounts over
/// `/etc/hosts` in the node's namespace (with `multi on`, so every address of the name is
/// returned), as a headless Service's A records would be. Written in place: the mount shows
/// the new contents.
fn set_dns(node: &Node, members: &[&Node]) {
    let dir = PathBuf::from("/etc/netns").join(&node.host.ns);
    std::fs::create_dir_all(&dir).unwrap();
    let mut hosts = String::from("127.0.0.1 localhost\n");
    for m in members {
        hosts.push_str(&format!("{} peers.test\n", m.host.ip));
    }
    std::fs::write(dir.join("hosts"), hosts).unwrap();
    std::fs::write(dir.join("host.conf"), "multi on\n").unwrap();
}

/// Removes what [`set_dns`] wrote, also when the test fails.
struct DnsFiles(Vec<PathBuf>);

impl Drop for DnsFiles {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Membership from DNS (`peers_dns`, a headless Service's records in a cluster), re-resolved
/// every `peers_refresh_ms`: a node added to the name while the others run is picked up
/// without a restart (it owns blobs and is asked for them), and one removed is no longer
/// asked. No `--peer` and no `--peer-address`: each node finds itself among the addresses.
#[test]
fn peers_from_dns_are_picked_up_and_dropped_without_a_restart() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    let mut c = Cluster::new(3);
    let _files = DnsFiles(
        c.nodes
            .iter()
            .map(|n| PathBuf::from("/etc/netns").join(&n.host.ns))
            .collect(),
    );
    let all: Vec<String> = c.peers.clone();
    let two: Vec<String> = all[..2].to_vec();
    // A blob nodes 0 and 1 alone would give to node 0, and the three of them to node 2.
    let mut seed = 0;
    let blob = loop {
        seed += 1;
        let b = blob_owned_by(2 * MIB, 700 + seed, &all[2], &all);
        if owner(&sha256(&b), &two) == all[0] {
            break b;
        }
    };
    let digest = sha256(&blob);
    c.upstream.push_blob(&blob);
    {
        let [n0, n1, n2] = &c.nodes[..] else {
            unreachable!()
        };
        set_dns(n0, &[n0, n1]);
        set_dns(n1, &[n0, n1]);
        set_dns(n2, &[n0, n1, n2]);
    }
    let args = |c: &Cluster| {
        vec![
            "--upstream".to_owned(),
            format!("{UPSTREAM}={}", c.upstream.url()),
            "--peers-dns".to_owned(),
            "peers.test".to_owned(),
            "--peers-refresh-ms".to_owned(),
            "300".to_owned(),
            "--peer-stall-timeout-ms".to_owned(),
            "1000".to_owned(),
            "--cores".to_owned(),
            "1".to_owned(),
        ]
    };
    for i in 0..3 {
        let a = args(&c);
        c.nodes[i].start(&a);
    }
    for n in &c.nodes[..2] {
        wait_until("nodes 0 and 1 to see each other", || {
            n.metric("lighter_peers") == 2
        });
    }
    // Node 2 joins the name: picked up without a restart.
    {
        let [n0, n1, n2] = &c.nodes[..] else {
            unreachable!()
        };
        set_dns(n0, &[n0, n1, n2]);
        set_dns(n1, &[n0, n1, n2]);
    }
    for n in &c.nodes[..2] {
        wait_until("nodes 0 and 1 to see node 2", || {
            n.metric("lighter_peers") == 3
        });
    }
    let url = format!("{}/v2/{UPSTREAM}/{REPO}/blobs/{digest}", c.nodes[1].peer());
    get(&url, None).assert_blob(&blob, "node 1");
    assert_eq!(
        c.nodes[2].fetched_from_upstream(),
        blob.len() as u64,
        "node 2, the owner once it joined, fetched the blob from upstream"
    );
    assert_eq!(c.nodes[1].fetched_from_peers(), blob.len() as u64);
    assert_eq!(c.nodes[0].fetched_from_upstream(), 0);
    assert_eq!(c.upstream.blob_gets(&digest).len(), 1);

    // Node 2 leaves the name: nodes 0 and 1 stop asking it.
    {
        let [n0, n1, _] = &c.nodes[..] else {
            unreachable!()
        };
        set_dns(n0, &[n0, n1]);
        set_dns(n1, &[n0, n1]);
    }
    for n in &c.nodes[..2] {
        wait_until("nodes 0 and 1 to drop node 2", || {
            n.metric("lighter_peers") == 2
        });
    }
    let other = loop {
        seed += 1;
        let b = blob_owned_by(MIB, 700 + seed, &all[2], &all);
        if owner(&sha256(&b), &two) == all[0] {
            break b;
        }
    };
    let other_digest = sha256(&other);
    c.upstream.push_blob(&other);
    let served_before = c.nodes[2].metric("lighter_peer_served_bytes_total");
    let url = format!(
        "{}/v2/{UPSTREAM}/{REPO}/blobs/{other_digest}",
        c.nodes[1].peer()
    );
    get(&url, None).assert_blob(&other, "node 1");
    assert_eq!(
        c.nodes[0].fetched_from_upstream(),
        other.len() as u64,
        "node 0 owns it among the two left"
    );
    assert_eq!(
        c.nodes[2].metric("lighter_peer_served_bytes_total"),
        served_before,
        "node 2 was asked after it left the name"
    );
    assert_eq!(
        c.nodes[2].metric("lighter_peer_requests_total{answer=\"served\"}"),
        1
    );
}

/// A relay in front of upstream that holds every answer back for `delay` before its first
/// byte (a registry behind a slow token service or CDN redirect), on the test's own address on
/// the bridge. Runs until the test ends (its threads die with the process).
fn slow_upstream(gateway: std::net::Ipv4Addr, upstream: &str, delay: Duration) -> String {
    let listener = TcpListener::bind((gateway, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let target = upstream.trim_start_matches("http://").to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let target = target.clone();
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(&target) else {
                    return;
                };
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_in, mut c_out) = (server, client);
                let mut buf = vec![0u8; 64 << 10];
                let mut first = true;
                loop {
                    let n = match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if first {
                        std::thread::sleep(delay);
                        first = false;
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    format!("http://{addr}")
}

/// An upstream that takes longer than `peer_stall_timeout_ms` to start each answer (2.5 s
/// against 1 s): the owner's head waits for it, and the nodes asking the owner wait too
/// (upstream's response_timeout_ms, not the stall timeout), so nobody gives up on a healthy
/// owner and upstream still sends the blob once.
#[test]
fn a_slow_upstream_does_not_make_nodes_give_up_on_the_owner() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    let mut c = Cluster::new(3);
    let blob = blob_owned_by(2 * MIB, 900, &c.peers[0], &c.peers);
    let digest = sha256(&blob);
    c.upstream.push_blob(&blob);
    let slow = slow_upstream(
        c.net.gateway(),
        &c.upstream.url(),
        Duration::from_millis(2500),
    );
    for i in 0..3 {
        let mut args = vec![
            "--upstream".to_owned(),
            format!("{UPSTREAM}={slow}"),
            "--peer-stall-timeout-ms".to_owned(),
            "1000".to_owned(),
            "--cores".to_owned(),
            "1".to_owned(),
        ];
        for p in &c.peers {
            args.push("--peer".to_owned());
            args.push(p.clone());
        }
        c.nodes[i].start(&args);
    }
    let peers = c.peers.clone();
    let blob2 = Arc::new(blob.clone());
    let d2 = digest.clone();
    at_once(&[1, 2], move |i| {
        let url = format!("{}/v2/{UPSTREAM}/{REPO}/blobs/{d2}", peers[i]);
        get(&url, None).assert_blob(&blob2, &peers[i]);
    });
    assert_eq!(
        c.upstream.blob_gets(&digest).len(),
        1,
        "upstream GETs of the blob"
    );
    for n in &c.nodes[1..] {
        assert_eq!(n.fetched_from_peers(), blob.len() as u64, "{}", n.peer());
        assert_eq!(
            n.metric("lighter_peer_fetch_failures_total"),
            0,
            "{}",
            n.peer()
        );
    }
}

/// A node whose data directory fills up while a peer sends it a blob blames its own disk, not
/// the peer: its client gets no whole blob, it counts no peer failure and suspects nobody, it
/// does not ask upstream for what it could not keep, and the same peer serves it the next blob.
#[test]
fn a_node_whose_disk_fills_during_a_peer_transfer_blames_its_disk_not_the_peer() {
    let Some(_one) = cluster(&["docker-registry"]) else {
        return;
    };
    let mut c = Cluster::new(2);
    let owner = c.peers[0].clone();
    let big = blob_owned_by(40 * MIB, 51, &owner, &c.peers);
    let small = blob_owned_by(2 * MIB, 52, &owner, &c.peers);
    let big_digest = c.upstream.push_blob(&big);
    let small_digest = c.upstream.push_blob(&small);
    // Node 1's data directory: 24 MiB, room for the small blob, not for the big one.
    let Some(_fs) = common::smallfs::SmallFs::mount_on(c.nodes[1].data.path(), 24) else {
        return;
    };
    c.start_all();
    // The owner holds both (pulled from upstream, once each).
    for (blob, digest) in [(&big, &big_digest), (&small, &small_digest)] {
        get(&blob_url(&owner, digest), None).assert_blob(blob, "the owner");
    }
    let upstream_gets = c.upstream.blob_gets(&big_digest).len();
    let got = get(&blob_url(&c.peers[1], &big_digest), None);
    assert!(
        got.error.is_some() || got.status != 200 || got.body.len() < big.len(),
        "a 40 MiB blob was served whole by a node with 24 MiB of disk: the test proves nothing"
    );
    let n1 = &c.nodes[1];
    wait_until("node 1 to log the failed download", || {
        n1.log_lines()
            .iter()
            .any(|l| l.contains("download failed, nothing cached") && l.contains(&big_digest))
    });
    let failed: Vec<String> = n1
        .log_lines()
        .into_iter()
        .filter(|l| {
            l.contains("download failed")
                || l.contains("peer failed")
                || l.contains("could not supply")
        })
        .collect();
    assert!(
        failed
            .iter()
            .all(|l| !l.contains("peer failed") && !l.contains("could not supply")),
        "node 1 blamed its peer for its own full disk:\n{}",
        failed.join("\n")
    );
    assert!(
        failed.iter().any(|l| l.contains("data directory")),
        "node 1 did not say its data directory was the cause:\n{}",
        failed.join("\n")
    );
    assert_eq!(n1.metric("lighter_peer_fetch_failures_total"), 0);
    assert_eq!(
        c.upstream.blob_gets(&big_digest).len(),
        upstream_gets,
        "node 1 went upstream for a blob it had no room for"
    );
    // The peer is still trusted: the next blob comes from it.
    let before = n1.fetched_from_peers();
    get(&blob_url(&c.peers[1], &small_digest), None).assert_blob(&small, "node 1, after");
    assert!(
        n1.fetched_from_peers() >= before + small.len() as u64,
        "the small blob did not come from the peer"
    );
    assert_eq!(c.upstream.blob_gets(&small_digest).len(), 1);
    c.nodes[1].kill();
}
