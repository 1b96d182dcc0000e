//! Lighter's data plane: the pull path, thread-per-core.
//!
//! One thread per core (pinned when it can own its core), each with its own `SO_REUSEPORT`
//! listener on the public port, its own event loop (an io_uring ring, or epoll where io_uring
//! cannot be set up), its own connections and buffers; nothing is shared or locked between cores on the hot path. Each
//! connection is a [`conn::Conn`] state machine: requests are parsed with httparse from a fixed
//! buffer, `GET`/`HEAD` of `/v2/`, blobs and manifests are answered from the data directory
//! (read-only, through `lighter-layout`) with bodies sent by sendfile, and any other request
//! hands the connection itself to the control plane ([`handoff`]).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub mod access;
mod cache;
pub mod conn;
mod epoll;
pub mod handoff;
pub mod health;
mod sys;
pub mod tls;
mod uring;
mod worker;

/// Which event loop to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring if it can be set up, else epoll (said once in the log).
    Auto,
    IoUring,
    Epoll,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Engine, String> {
        match s {
            "auto" => Ok(Engine::Auto),
            "io_uring" => Ok(Engine::IoUring),
            "epoll" => Ok(Engine::Epoll),
            _ => Err(format!(
                "io_engine must be auto, io_uring or epoll, not {s:?}"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub control_socket_path: PathBuf,
    /// Threads (one per core); 0 means one per CPU this process may use (cgroup quota included).
    pub cores: usize,
    pub connections_per_core_max: usize,
    pub request_header_size_max_bytes: usize,
    pub request_header_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    pub io_engine: Engine,
    /// TCP_NOTSENT_LOWAT of every connection (set on the listeners, which pass it on); 0: the
    /// kernel's default.
    pub send_unsent_max_bytes: u32,
    /// Upstreams of the pull-through cache: their repositories' misses and stale tags go to the
    /// control plane instead of a 404.
    pub mirrors: Vec<Mirror>,
    /// With `[storage.s3]`, the bucket's tag TTL: repositories outside the mirrors are then
    /// caches of the bucket, whose misses and stale tags go to the control plane too.
    pub bucket_tag_ttl_ms: Option<u64>,
    /// Access control; None: anyone may pull.
    pub auth: Option<access::AuthSetup>,
    /// HTTPS on the registry port; None: plain HTTP.
    pub tls: Option<tls::TlsFiles>,
    /// `/readyz` fails while the data directory's file system has less free space than this.
    pub disk_free_min_bytes: u64,
    /// Records in each core's event ring (see `lighter_layout::events`, in KiB); 0: no event
    /// log (the ring then holds the core's counters alone).
    pub events_ring_records: u64,
}

/// What the data plane knows of a mirrored upstream.
#[derive(Clone, Debug)]
pub struct Mirror {
    /// The registry host clients name (`ghcr.io`, `registry.corp:8443`): the `ns=` value.
    pub name: String,
    /// The same with `:` percent-encoded, as containerd sends it in `ns=`.
    pub name_encoded: String,
    /// The first component of its local repositories (`lighter_layout::mirror_prefix`).
    pub prefix: String,
    pub tag_ttl_ms: u64,
}

impl Mirror {
    pub fn new(name: &str, tag_ttl_ms: u64) -> Mirror {
        Mirror {
            name: name.to_owned(),
            name_encoded: name.replace(':', "%3A"),
            prefix: lighter_layout::mirror_prefix(name),
            tag_ttl_ms,
        }
    }
}

/// Descriptors kept for everything but connections: listeners, rings, logs, the control socket.
const FILES_RESERVED: u64 = 64;
/// Descriptors each core keeps besides its connections: its cache of open blob files, its
/// event loop, a margin for TLS relays' socket pairs in flight.
const FILES_PER_CORE: u64 = cache::BLOB_SLOTS as u64 + 64;

/// The most connections a core may hold so that `cores` of them fit `nofile` descriptors (a
/// connection with the control plane holds one too: its handoff's Unix socket).
fn fitting_connections(nofile: u64, cores: usize) -> usize {
    let per_core = nofile.saturating_sub(FILES_RESERVED) / cores.max(1) as u64;
    per_core.saturating_sub(FILES_PER_CORE).max(16) as usize
}

/// Accept queue length of each core's listener.
const LISTEN_BACKLOG: i32 = 4096;

/// Runs until SIGTERM or SIGINT, then stops accepting, finishes in-flight responses (up to
/// `shutdown_grace_ms`) and returns.
pub fn run(mut config: Config) -> Result<(), String> {
    sys::raise_nofile_limit();
    let shutdown_signals = block_shutdown_signals();
    let cpus = sys::allowed_cpus();
    // By default one thread per CPU the process may really use: the standard library's count
    // honours the cgroup CPU quota (a pod's CPU limit), which the affinity mask does not.
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = if config.cores == 0 {
        usable.min(cpus.len()).max(1)
    } else {
        config.cores
    };
    // Pinned threads own their cores only if nothing else runs there: when this process was
    // given a cpuset of its own (fewer CPUs than the machine has, as Kubernetes' static CPU
    // manager does) or runs fewer threads than its CPUs. On cores shared with everything else
    // (the default on a node: kubelet, containerd, workloads) a pinned thread waits behind
    // whatever runs on its core while another core idles: the threads float there.
    let pin = cores < cpus.len() || cpus.len() < sys::online_cpus();
    // Connections must run out before descriptors do: a full core closes its longest-idle
    // connection to take a new one, but a core out of descriptors cannot even accept.
    let room = fitting_connections(sys::nofile_limit(), cores);
    if config.connections_per_core_max > room {
        tracing::warn!(
            "connections_per_core_max lowered from {} to {room}: {cores} cores of it would \
             not fit the open-file limit ({}; raise it with ulimit -n or LimitNOFILE)",
            config.connections_per_core_max,
            sys::nofile_limit()
        );
        config.connections_per_core_max = room;
    }

    // The first listener picks the port (when 0); the others join it.
    let first = sys::listener(config.listen, LISTEN_BACKLOG, config.send_unsent_max_bytes)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = sys::local_addr(first.as_raw_fd()).map_err(|e| e.to_string())?;
    let mut listeners = vec![first];
    for _ in 1..cores {
        listeners.push(
            sys::listener(addr, LISTEN_BACKLOG, config.send_unsent_max_bytes)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        );
    }

    let tls = match &config.tls {
        None => None,
        Some(files) => {
            let resolver = Arc::new(tls::ReloadingCert::load(files.clone())?);
            match tls::kernel_tls() {
                Ok(()) => tracing::info!(
                    "kernel TLS is available but not used yet: encrypting in user space"
                ),
                Err(e) => {
                    tracing::info!("kernel TLS is unavailable ({e}): encrypting in user space")
                }
            }
            let r = resolver.clone();
            std::thread::Builder::new()
                .name("lighter-dp-certs".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    r.reload_if_changed();
                })
                .map_err(|e| format!("cannot start the certificate watcher: {e}"))?;
            Some(tls::server_config(resolver))
        }
    };
    let engine = match config.io_engine {
        // User-space TLS runs in the epoll driver: its cost is the encryption, not the calls.
        _ if tls.is_some() => Engine::Epoll,
        Engine::Epoll => Engine::Epoll,
        Engine::IoUring => {
            uring::probe()
                .map_err(|e| format!("io_engine = io_uring, but io_uring cannot be set up: {e}"))?;
            Engine::IoUring
        }
        Engine::Auto => match uring::probe() {
            Ok(_) => Engine::IoUring,
            Err(e) => {
                tracing::warn!(
                    "io_uring is unavailable ({e}); serving with epoll, same zero-copy sends"
                );
                Engine::Epoll
            }
        },
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(cores, pinned = pin, engine = ?engine, data_dir = %config.data_dir.display(), "listening on {scheme}://{addr}");

    if let Some(a) = &config.auth {
        access::Access::new(a)?;
        tracing::info!("access control on: pulls need the rules' consent or a token");
    }
    let config = Arc::new(config);
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(cores);
    for (i, listener) in listeners.into_iter().enumerate() {
        let config = config.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let cpu = cpus.get(i % cpus.len().max(1)).copied().filter(|_| pin);
        let t = std::thread::Builder::new()
            .name(format!("lighter-dp-{i}"))
            .spawn(move || {
                let pinned = cpu.filter(|&cpu| match sys::pin_to_cpu(cpu) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!("cannot pin to CPU {cpu}: {e}");
                        false
                    }
                });
                let w = worker::Worker::new(config, shutdown, i);
                if let (Some(cpu), Some(r)) = (pinned, &w.ctx.events) {
                    r.set(lighter_layout::events::counter::PINNED_CPU, cpu as u64 + 1);
                }
                let result = match engine {
                    Engine::IoUring => {
                        uring::probe().and_then(|ring| uring::run(w, ring, listener))
                    }
                    _ => epoll::run(w, listener, tls),
                };
                if let Err(e) = &result {
                    tracing::error!("data plane core {i} failed: {e}");
                }
                result
            })
            .map_err(|e| format!("cannot start a data plane thread: {e}"))?;
        threads.push(t);
    }

    wait_for_shutdown(&shutdown_signals);
    shutdown.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: finishing in-flight responses");
    let mut failed = false;
    for t in threads {
        failed |= !matches!(t.join(), Ok(Ok(())));
    }
    if failed {
        return Err("a data plane core failed".into());
    }
    Ok(())
}

/// Blocks SIGTERM and SIGINT in this thread (and so in the threads it starts), so that only
/// [`wait_for_shutdown`] receives them.
fn block_shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_shutdown(set: &libc::sigset_t) {
    let mut sig = 0;
    // SAFETY: sigwait on a set blocked in this thread.
    unsafe { libc::sigwait(set, &mut sig) };
    tracing::info!(signal = sig, "shutdown signal received");
}

#[cfg(test)]
mod tests {
    #[test]
    fn connections_fit_the_open_file_limit() {
        // 20000 descriptors on 2 cores: 9968 each, less the cache and a margin.
        assert_eq!(super::fitting_connections(20_000, 2), 9_968 - 320);
        assert_eq!(super::fitting_connections(1_048_576, 4), 262_128 - 320);
        // A tiny limit still leaves a few.
        assert_eq!(super::fitting_connections(100, 8), 16);
    }
}
