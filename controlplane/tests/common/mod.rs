//! Test harness: starts the real `lighter` binary on a free loopback port with its own data
//! directory, and stops it (SIGKILL) when dropped. Tests talk to it over real sockets.
#![allow(dead_code)]

pub mod clients;
pub mod containerd;
pub mod events;
pub mod garage;
pub mod netns;
pub mod replicated;
pub mod smallfs;
pub mod tls;
pub mod webhook;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_lighter");

// Media types, as the OCI image spec and Docker's schema 2 name them.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A replica's `--config` file (its bucket) and the environment with its credentials.
type Replica = (PathBuf, Vec<(String, String)>);

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    log: Arc<Mutex<Vec<String>>>,
    /// With `LIGHTER_TEST_STORAGE=s3`: the config file and environment of its bucket, for the
    /// fresh replica that checks, as it stops, that the bucket serves what it served.
    replica: Option<Replica>,
}

/// How to start a server: data directory, extra flags and environment, and optionally a seccomp
/// filter that refuses io_uring, as container runtimes' default profiles do.
pub struct Launch {
    data_dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    block_io_uring: bool,
    nofile_max: Option<u64>,
    replica: Option<Replica>,
}

impl Launch {
    pub fn new(data_dir: &Path) -> Launch {
        Launch {
            data_dir: data_dir.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            block_io_uring: false,
            nofile_max: None,
            replica: None,
        }
    }

    pub fn args(mut self, extra: &[&str]) -> Launch {
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    pub fn env(mut self, env: &[(&str, &str)]) -> Launch {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// io_uring_setup fails with EPERM in the server and its children.
    pub fn block_io_uring(mut self) -> Launch {
        self.block_io_uring = true;
        self
    }

    /// RLIMIT_NOFILE (soft and hard) of the server and its children: how many descriptors the
    /// data plane can have.
    pub fn nofile_max(mut self, max: u64) -> Launch {
        self.nofile_max = Some(max);
        self
    }

    pub fn start(mut self) -> Server {
        self.replicated_if_asked();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.block_io_uring {
            use std::os::unix::process::CommandExt;
            // SAFETY: only prctl calls between fork and exec.
            unsafe { cmd.pre_exec(seccomp_block_io_uring) };
        }
        if let Some(max) = self.nofile_max {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: max,
                rlim_max: max,
            };
            // SAFETY: only setrlimit between fork and exec, on a struct copied into the closure.
            unsafe {
                cmd.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                })
            };
        }
        let mut child = cmd.spawn().expect("spawn lighter");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[lighter] {line}");
                lines.lock().unwrap().push(line.clone());
                // http:// or, with tls_cert_path, https://
                let found = ["listening on http://", "listening on https://"]
                    .iter()
                    .find_map(|n| line.find(n).map(|pos| pos + n.len()));
                if let Some(start) = found {
                    let rest = &line[start..];
                    // Text lines end the address with a space, JSON lines with a quote.
                    let addr = rest
                        .split(|c: char| c.is_whitespace() || c == '"')
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(Duration::from_secs(30)) else {
            kill_tree(child.id());
            let _ = child.wait();
            panic!(
                "lighter did not report its listening address within 30 s:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        Server {
            child,
            addr: addr.parse().expect("listening address"),
            data_dir: self.data_dir,
            _tmp: None,
            log,
            replica: self.replica,
        }
    }
}

impl Launch {
    /// With `LIGHTER_TEST_STORAGE=s3` (see [`garage::test_storage_is_s3`]), a server the test
    /// did not give a config file of its own becomes a replica over a bucket of its own (the
    /// same bucket again when started over the same data directory).
    fn replicated_if_asked(&mut self) {
        let own_config = self
            .args
            .iter()
            .any(|a| a == "--config" || a.starts_with("--config="))
            || self.env.iter().any(|(k, _)| k == "LIGHTER_CONFIG");
        if own_config || !garage::test_storage_is_s3() {
            return;
        }
        static BY_DATA_DIR: Mutex<Vec<(PathBuf, Replica)>> = Mutex::new(Vec::new());
        let mut known = BY_DATA_DIR.lock().unwrap();
        let (config, env) = match known.iter().find(|(d, _)| *d == self.data_dir) {
            Some((_, replica)) => replica.clone(),
            None => {
                let (config, env) = garage::fresh_replica_config();
                known.push((self.data_dir.clone(), (config.clone(), env.clone())));
                (config, env)
            }
        };
        self.args.push("--config".into());
        self.args.push(config.display().to_string());
        self.env.extend(env.clone());
        self.replica = Some((config, env));
    }
}

/// A seccomp filter refusing io_uring_setup with EPERM (what Docker's and containerd's default
/// profiles do), everything else allowed.
fn seccomp_block_io_uring() -> std::io::Result<()> {
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let nr = libc::SYS_io_uring_setup as u32;
    let filter = [
        // A = syscall number
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: nr,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a filter program that outlives the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const _,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Server {
    /// A server over a fresh temporary data directory.
    pub fn start() -> Server {
        Self::start_args(&[])
    }

    /// A server over a fresh temporary data directory, with extra `serve` flags.
    pub fn start_args(extra: &[&str]) -> Server {
        Self::launch_temp(|l| l.args(extra))
    }

    /// A server over a fresh temporary data directory, started as `configure` says.
    pub fn launch_temp(configure: impl FnOnce(Launch) -> Launch) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut server = configure(Launch::new(tmp.path())).start();
        server._tmp = Some(tmp);
        server
    }

    /// Lines the server has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Pids of the server's child processes (the control plane and the data plane).
    pub fn children(&self) -> Vec<u32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// A server over `data_dir` (kept after the server stops, for restart tests).
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Server {
        Launch::new(data_dir).args(extra).start()
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `https://127.0.0.1:PORT` + path (a server started with `tls_cert_path`).
    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{}", self.addr, path)
    }

    /// `127.0.0.1:PORT`, as clients like skopeo want it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL to `lighter serve` and both planes under it at once, no chance to clean up:
    /// what a crash looks like. (Killing only the supervisor would let its children stop
    /// gracefully.) Returns once all have exited.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            kill_tree(self.child.id());
        }
        let _ = self.child.wait();
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends raw bytes on a new connection, returns everything read until the server closes
    /// the connection or 5 s pass. For requests a well-behaved HTTP client will not send.
    pub fn raw(&self, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request).expect("write raw request");
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn client() -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some((config, env)) = self.replica.take() {
            // Not over a failed test's panic (a second panic aborts), nor a server it killed.
            if !std::thread::panicking() && self.alive() {
                replicated::assert_a_fresh_replica_agrees(self, &config, &env);
            }
        }
        self.kill();
    }
}

/// `sha256:<hex>` of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    let mut hex = String::with_capacity(71);
    hex.push_str("sha256:");
    for b in sha2::Sha256::digest(bytes) {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

impl Server {
    /// `GET /v2/_lighter/metrics` (asserted 200, Prometheus text): value by name with labels,
    /// as [`prometheus_values`].
    pub fn metrics(&self) -> std::collections::HashMap<String, u64> {
        let r = Server::client()
            .get(self.url("/v2/_lighter/metrics"))
            .send()
            .expect("metrics");
        assert_eq!(r.status(), 200);
        let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        prometheus_values(&r.text().expect("UTF-8 metrics"))
    }
}

/// The Prometheus text format (`GET /v2/_lighter/metrics`): value by name with labels, for
/// the samples that are integers (counters, gauges, histogram counts; a histogram's `_sum` in
/// seconds is not).
pub fn prometheus_values(text: &str) -> std::collections::HashMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("name value");
            let parsed = value.parse().ok();
            assert!(
                parsed.is_some() || value.parse::<f64>().is_ok(),
                "not a number: {l}"
            );
            Some((name.to_owned(), parsed?))
        })
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A server over a fresh temporary data directory, with extra `serve` flags and extra environment
/// variables (e.g. `LIGHTER_MANIFEST_SIZE_MAX_BYTES`) set for the server process only.
pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
    Server::launch_temp(|l| l.args(extra).env(env))
}

impl Server {
    /// The first log line containing `needle`, waiting up to `within` for it to appear (lines a
    /// plane logs after the data plane's listening line may arrive a little later).
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
                return Some(line);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A ustar archive holding one regular file.
pub fn tar_file(name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", content.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// gzip with stored (uncompressed) deflate blocks: valid for every gunzip, no crate needed.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    if chunks.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The parent pid of a process, from `/proc/<pid>/stat` (None if it is gone).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and all its descendants (`lighter serve` runs the control plane and the data plane as
/// child processes).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(parent) = parent_of(p) {
            all.push((p, parent));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// SIGKILL to `pid` and its descendants at once; returns once all have exited.
pub fn kill_tree(pid: u32) {
    let tree = process_tree(pid);
    let mut pidfds = Vec::new();
    for &pid in &tree {
        // SAFETY: pidfd_open(2) and kill(2) on processes this test started.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd >= 0 {
            pidfds.push(fd as libc::c_int);
        }
    }
    // Freeze them all first, so none sees another die and reacts (the supervisor would stop the
    // other plane gracefully), then kill them all.
    for signal in [libc::SIGSTOP, libc::SIGKILL] {
        for &pid in &tree {
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }
    for fd in pidfds {
        // A pidfd becomes readable when its process exits.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one valid pollfd, then close(2) of our own fd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
        unsafe { libc::close(fd) };
        assert_eq!(
            ready, 1,
            "a server process did not exit within 30 s of SIGKILL"
        );
    }
}

/// A loopback port free now (bound, then released for a server the test starts to take).
///
/// Chosen outside the kernel's ephemeral range, where every outgoing connection of the tests
/// running beside this one takes its local port: a port from `bind(":0")` could be taken by one
/// of them before the server binds it (Garage then died with "Address already in use"). Within
/// this test process no port is handed out twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (first, last) = if low > 12_000 {
        (10_000, low - 1)
    } else {
        (high + 1, 65_535)
    };
    let span = last.saturating_sub(first) + 1;
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span.min(4096) {
        let port = first + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Asserts that a control plane with `config` as its file refuses to start (exit code 2) with
/// `needle` in what it says.
pub fn assert_config_refused(config: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lighter.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .args(["control-plane", "--config"])
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{config}: {err}");
    assert!(err.contains(needle), "{config}: {err}");
}
