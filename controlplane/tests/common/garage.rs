//! A single-node Garage (an S3-compatible object store, its own process) on loopback with its
//! own temporary directory, for the replicated mode's tests: config file, `garage server`, a
//! layout assigned and applied, one bucket, one key allowed on it. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bucket every test uses.
pub const BUCKET: &str = "lighter";
/// The region Garage answers for (`s3_region`).
pub const REGION: &str = "garage";

pub struct Garage {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:<port>`: the S3 API.
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

/// True if Garage is installed; otherwise it says how to install it and the test fails, unless
/// `LIGHTER_SKIP_CLIENT_TESTS=1` (then false: skipped).
pub fn installed() -> bool {
    if super::clients::on_path("garage") {
        return true;
    }
    if std::env::var("LIGHTER_SKIP_CLIENT_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: garage is not installed and LIGHTER_SKIP_CLIENT_TESTS=1");
        return false;
    }
    panic!("garage is not installed: `cargo install garage --locked` (`bash .ci/run` does it)");
}

impl Garage {
    /// Starts Garage and prepares the bucket and a key allowed to read and write it.
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let (s3, rpc, admin) = (super::free_port(), super::free_port(), super::free_port());
        let config = format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "lighter-test-admin-token"
"#,
            d = p.display(),
            secret = "5f".repeat(32),
        );
        std::fs::write(p.join("config.toml"), config).unwrap();
        let mut g = Garage {
            child: None,
            dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
        };
        g.spawn();
        let node = g.wait_for_node();
        g.ok(&[
            "layout",
            "assign",
            "-z",
            "dc1",
            "-c",
            "1G",
            &node[..node.len().min(64)],
        ]);
        g.ok(&["layout", "apply", "--version", "1"]);
        g.ok(&["bucket", "create", BUCKET]);
        let key = g.ok(&["json-api", "CreateKey", r#"{"name":"lighter-test"}"#]);
        let key: serde_json::Value = serde_json::from_slice(&key.stdout)
            .unwrap_or_else(|e| panic!("garage json-api CreateKey printed no JSON: {e}"));
        g.key_id = key["accessKeyId"].as_str().expect("accessKeyId").to_owned();
        g.secret = key["secretAccessKey"]
            .as_str()
            .expect("secretAccessKey")
            .to_owned();
        let key_id = g.key_id.clone();
        g.ok(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", &key_id,
        ]);
        g.wait_for_s3();
        g
    }

    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(self.dir.path().join("garage.log")).unwrap();
        let mut cmd = self.command();
        cmd.arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SIGKILL when the thread that started it ends (the test, or the shared Garage's
        // thread, which lives as long as the test process): no Garage outlives its tests.
        // SAFETY: only prctl between fork and exec.
        unsafe {
            cmd.pre_exec(
                || match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                },
            )
        };
        self.child = Some(cmd.spawn().expect("start garage server"));
    }

    /// SIGSTOP (true) or SIGCONT (false) to the Garage process: an object store that stops
    /// answering mid-transfer, and comes back.
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("garage runs").id();
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on the Garage process this harness started.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
    }

    /// A new empty bucket that the key may read and write.
    pub fn create_bucket(&self, name: &str) {
        self.ok(&["bucket", "create", name]);
        self.ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            &self.key_id,
        ]);
    }

    /// `garage -c <config>`.
    fn command(&self) -> Command {
        let mut cmd = Command::new("garage");
        cmd.arg("-c").arg(self.config_path());
        cmd
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.command().args(args).output().expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}\n{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        out
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// The node's id, once the server answers its CLI (`garage status` reaches it over RPC;
    /// `node id` alone reads the key from disk and answers before the server listens).
    fn wait_for_node(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.command().arg("status").output().unwrap();
            if status.status.success() {
                let out = self.ok(&["node", "id", "-q"]);
                let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                return id.split('@').next().unwrap_or_default().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "garage did not start within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Until the S3 port answers (any HTTP answer: the layout is live).
    fn wait_for_s3(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::blocking::Client::new();
        loop {
            let r = client.get(format!("{}/{BUCKET}", self.endpoint)).send();
            if r.is_ok_and(|r| r.status().as_u16() != 503) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "garage's S3 API did not come up within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The `[storage.s3]` section for this Garage, as the issue writes it.
    pub fn storage_toml(&self, tag_ttl_ms: u64) -> String {
        self.storage_toml_for(BUCKET, tag_ttl_ms)
    }

    /// [`Garage::storage_toml`] naming another bucket of this Garage.
    pub fn storage_toml_for(&self, bucket: &str, tag_ttl_ms: u64) -> String {
        format!(
            "[storage.s3]\nbucket = \"{bucket}\"\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
             path_style = true\ntag_ttl_ms = {tag_ttl_ms}\n",
            self.endpoint
        )
    }

    /// The environment a replica takes its credentials from.
    pub fn env(&self) -> [(&str, &str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", self.key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.as_str()),
        ]
    }

    /// kill -9: the object store is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `tag_ttl_ms` of the replicas `LIGHTER_TEST_STORAGE=s3` starts.
pub const SHARED_TAG_TTL_MS: u64 = 1000;

/// `LIGHTER_TEST_STORAGE=s3`: every server the harness starts (`Server::start` and the
/// rest) is a replica in the replicated mode over a bucket of its own in one Garage shared by
/// the test process, so a suite written for the data directory runs against the bucket.
pub fn test_storage_is_s3() -> bool {
    match std::env::var("LIGHTER_TEST_STORAGE").as_deref() {
        Ok("s3") => true,
        Ok("") | Ok("local") | Err(_) => false,
        Ok(other) => panic!("LIGHTER_TEST_STORAGE={other:?}: expected s3 or local"),
    }
}

/// The Garage of this test process, started at first use by a thread that lives as long as
/// the process (its death signal then comes with the process's end).
pub fn shared() -> &'static Garage {
    static SHARED: std::sync::OnceLock<Garage> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        assert!(installed(), "LIGHTER_TEST_STORAGE=s3 needs garage");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tx.send(Garage::start()).unwrap();
            loop {
                std::thread::park();
            }
        });
        let g = rx.recv().expect("garage started");
        // Its temporary directory goes when the test process exits.
        extern "C" fn remove_dir() {
            if let Some(g) = SHARED.get() {
                if let Some(c) = &g.child {
                    // SAFETY: kill(2) on the Garage process this harness started.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
                }
                let _ = std::fs::remove_dir_all(g.dir());
            }
        }
        // SAFETY: registering a function without arguments that touches only the static.
        unsafe { libc::atexit(remove_dir) };
        g
    })
}

/// A `--config` file for one more replica over a new bucket of the shared Garage: its path
/// and the credentials' environment.
pub fn fresh_replica_config() -> (std::path::PathBuf, Vec<(String, String)>) {
    static BUCKETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let g = shared();
    let n = BUCKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let bucket = format!("test-{n}");
    g.create_bucket(&bucket);
    let path = g.dir().join(format!("{bucket}.toml"));
    std::fs::write(&path, g.storage_toml_for(&bucket, SHARED_TAG_TTL_MS)).unwrap();
    let env = g
        .env()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (path, env)
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}
