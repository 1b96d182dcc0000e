//! A containerd daemon of a test's own: root, state and sockets in a temporary directory, the CRI
//! plugin off, the native snapshotter (plain copies, no overlay mounts). Killed on drop.
//! [`Containerd::start_in`] runs it, and the `ctr` commands made for it, in a network namespace
//! (`ip netns exec`), for cluster tests where each node has its own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The network namespace it and its `ctr` commands run in (None: the test's own).
    netns: Option<String>,
}

impl Containerd {
    pub fn start() -> Containerd {
        Self::start_in(None)
    }

    /// Started with `ip netns exec <netns>` when a namespace is given.
    pub fn start_in(netns: Option<&str>) -> Containerd {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                d = dir.path().display(),
                s = socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let mut cmd = in_netns(netns, "containerd");
        let child = cmd
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start containerd (apt-get install containerd)");
        let mut c = Containerd {
            child,
            dir,
            socket,
            netns: netns.map(str::to_owned),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!("containerd exited ({status}): {}", c.log());
            }
            if c.socket.exists() && c.output(&["version"]).status.success() {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on its socket within 30 s: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What the daemon logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Its root, state and sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ctr --address <socket> <args>`, not started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = in_netns(self.netns.as_deref(), "ctr");
        cmd.arg("--address").arg(&self.socket).args(args);
        cmd
    }

    /// `ctr <args>`, run to completion, whatever its status.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ctr")
    }

    /// Directories of the native snapshotter's snapshots.
    pub fn snapshots(&self) -> Vec<PathBuf> {
        let dir = self
            .dir()
            .join("root/io.containerd.snapshotter.v1.native/snapshots");
        std::fs::read_dir(&dir)
            .map(|rd| rd.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }
}

/// `program`, or `ip netns exec <netns> program`.
fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, program]);
            cmd
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
