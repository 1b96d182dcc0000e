//! Machines on one machine, for cluster tests: a [`Net`] is a Linux bridge with the test process
//! on it (`198.19.S.1/24`); each [`Host`] is a network namespace joined to the bridge by a veth
//! pair, with its own address (`198.19.S.N`) and its loopback up. Processes run inside a host
//! with `ip netns exec` ([`Host::command`], [`Host::spawn`]); [`Host::limit_mbit`] models a
//! slower NIC with tc on both ends of its link.
//!
//! Addresses come from 198.18.0.0/15 (the benchmarking range) only, and IPv6 is off on every
//! interface made here, so nothing else is ever configured. Names are `ltc<pid>x<n>` plus a
//! suffix (at most 15 characters), so runs in parallel do not meet; dropping the `Net` (also
//! when a test panics) kills what runs in its namespaces and removes them, their links and the
//! bridge. Leftovers of runs that crashed (their pid is gone) are removed when a `Net` is made.
//! Needs root and iproute2.

use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What every name made here starts with.
const PREFIX: &str = "ltc";

/// Why cluster tests cannot run here (not root, no `ip netns`, no tc), or None if they can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces need CAP_NET_ADMIN)".into());
    }
    for (what, args) in [
        ("ip netns", &["ip", "netns", "list"][..]),
        ("tc", &["tc", "-V"]),
    ] {
        match Command::new(args[0]).args(&args[1..]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Some(format!(
                    "`{}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
            Err(e) => return Some(format!("{what} is not available ({e}); install iproute2")),
        }
    }
    None
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command, ignoring how it ends (for cleanup).
fn run_quietly(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A bridge, the test process's address on it, and the namespaces joined to it.
pub struct Net {
    tag: String,
    bridge: String,
    /// 198.19.S.0/24: the three first octets.
    subnet: [u8; 3],
    namespaces: Mutex<Vec<String>>,
}

impl Net {
    /// A new bridge with `198.19.S.1/24` on it, in a /24 no interface uses yet.
    pub fn new() -> Net {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        remove_leftovers();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) % 256;
        let pid = std::process::id();
        let tag = format!("{PREFIX}{pid:x}x{n:x}");
        let third = free_subnet(pid.wrapping_mul(8).wrapping_add(n));
        let net = Net {
            bridge: format!("{tag}b"),
            tag,
            subnet: [198, 19, third],
            namespaces: Mutex::new(Vec::new()),
        };
        run(&["ip", "link", "add", "name", &net.bridge, "type", "bridge"]);
        no_ipv6(&net.bridge);
        let cidr = format!("{}/24", net.ip(1));
        run(&["ip", "addr", "add", &cidr, "dev", &net.bridge]);
        run(&["ip", "link", "set", &net.bridge, "up"]);
        net
    }

    /// `198.19.S.last`.
    pub fn ip(&self, last: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, last)
    }

    /// The test process's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.ip(1)
    }

    /// A new namespace with address `198.19.S.last` on its `eth0`, joined to the bridge, and
    /// its loopback up. `last` is 2..=254 and names the host (one host per address).
    pub fn host(&self, last: u8) -> Host {
        assert!((2..=254).contains(&last), "host address .{last}");
        let ns = format!("{}n{last:x}", self.tag);
        let outer = format!("{}v{last:x}", self.tag);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.lock().unwrap().push(ns.clone());
        for conf in ["all", "default", "lo"] {
            let key = format!("net.ipv6.conf.{conf}.disable_ipv6=1");
            run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", &key]);
        }
        run(&[
            "ip", "link", "add", "name", &outer, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        no_ipv6(&outer);
        run(&["ip", "link", "set", &outer, "master", &self.bridge, "up"]);
        let ip = self.ip(last);
        let cidr = format!("{ip}/24");
        run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        Host {
            ns,
            outer,
            ip,
            gateway: self.gateway(),
        }
    }
}

impl Default for Net {
    fn default() -> Net {
        Net::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.lock().unwrap().iter() {
            remove_namespace(ns);
        }
        run_quietly(&["ip", "link", "del", &self.bridge]);
    }
}

/// The third octet of a `198.19.S.0/24` no interface has an address in, tried from `start`.
/// Only 198.19.64.0 to 198.19.255.0: clear of 198.18.x.y, which benches/cluster.py uses.
fn free_subnet(start: u32) -> u8 {
    for k in 0..192 {
        let third = 64 + (start.wrapping_add(k) % 192) as u8;
        let prefix = format!("198.19.{third}.0/24");
        let used = run(&["ip", "-o", "-4", "addr", "show", "to", &prefix]);
        if used.stdout.is_empty() {
            return third;
        }
    }
    panic!("every 198.19.S.0/24 (S = 64..255) is in use: leftovers of other runs?");
}

/// Kills every process in the namespace, then deletes it (its veth pair goes with it).
fn remove_namespace(ns: &str) {
    for _ in 0..50 {
        let pids = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    run_quietly(&["ip", "netns", "del", ns]);
}

fn no_ipv6(interface: &str) {
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6"),
        "1",
    );
}

/// Namespaces and links named by this module for a process that is gone.
fn remove_leftovers() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            return false;
        };
        match u32::from_str_radix(pid, 16) {
            Ok(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            Err(_) => false,
        }
    };
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if dead(name) {
            eprintln!("netns: removing {name}, left by a run that crashed");
            remove_namespace(name);
        }
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in links.lines() {
        // "12: ltc1a2bx0b: <BROADCAST,...": the name, without "@peer".
        let name = line.split(": ").nth(1).unwrap_or("");
        let name = name.split('@').next().unwrap_or("");
        if dead(name) {
            eprintln!("netns: removing link {name}, left by a run that crashed");
            run_quietly(&["ip", "link", "del", name]);
        }
    }
}

/// One namespace on the bridge: a machine with one NIC.
#[derive(Clone, Debug)]
pub struct Host {
    pub ns: String,
    /// The veth end on the bridge (outside the namespace).
    outer: String,
    pub ip: Ipv4Addr,
    gateway: Ipv4Addr,
}

impl Host {
    /// `ip netns exec <ns> <program>`, not started.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// Runs `args` in the namespace to completion; panics with its output if it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", &self.ns];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Starts `cmd` (made by [`Host::command`]) in a process group of its own, its output
    /// echoed with `tag` and kept; the whole group is killed when the [`Proc`] is dropped.
    pub fn spawn(&self, cmd: Command, tag: &str) -> Proc {
        Proc::spawn(cmd, tag)
    }

    /// Both directions of this host's link limited to `mbit` (tc tbf on the veth ends): a
    /// slower NIC.
    pub fn limit_mbit(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", "64kb", "latency", "100ms",
        ];
        let mut outer = vec!["tc", "qdisc", "replace", "dev", &self.outer];
        outer.extend_from_slice(&tbf);
        run(&outer);
        let mut inner = vec!["tc", "-n", &self.ns, "qdisc", "replace", "dev", "eth0"];
        inner.extend_from_slice(&tbf);
        run(&inner);
    }

    /// `http://<ip>:<port>`.
    pub fn url(&self, port: u16) -> String {
        format!("http://{}:{port}", self.ip)
    }

    /// The test process's address, as this host reaches it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Runs `f` on a new thread that has entered this namespace (sockets it opens, listeners
    /// included, live in the namespace; threads it spawns are in it too).
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a namespace file this thread holds open; it changes only this
            // thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

/// A process started in a host, killed with its whole process group on drop.
pub struct Proc {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(mut cmd: Command, tag: &str) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        drain(child.stdout.take().unwrap(), tag, log.clone());
        drain(child.stderr.take().unwrap(), tag, log.clone());
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What it has printed so far (stdout and stderr, by line).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The first line holding `needle`, waiting up to `within`; None if it has not come (or
    /// the process exited first).
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log_lines().into_iter().find(|l| l.contains(needle)) {
                return Some(l);
            }
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited || Instant::now() >= deadline {
                // The last lines may still be on their way from the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return self.log_lines().into_iter().find(|l| l.contains(needle));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the whole process group (the program and everything it started), then reaped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory preconditions; the group is the child's own.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads lines from a child's pipe into `log`, echoing them (shown when a test fails).
fn drain(pipe: impl Read + Send + 'static, tag: &str, log: Arc<Mutex<Vec<String>>>) {
    let tag = tag.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{tag}] {line}");
            log.lock().unwrap().push(line);
        }
    });
}
