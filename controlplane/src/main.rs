//! `lighter`: the registry's command line. `lighter serve` runs the registry: a data plane process
//! that owns the public port and serves pulls, and a control plane process that takes everything
//! else. `lighter control-plane` and `lighter data-plane` run one of them (as the two containers of
//! a pod do).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod admission;
mod api;
mod app;
mod auth;
mod bucket;
mod cli;
mod clock;
mod config;
mod error;
mod events;
mod gc;
mod handoff;
mod immutable;
mod inventory;
mod metrics;
mod mirror;
mod notify;
mod peers;
mod retention;
mod sending;
mod server;
mod supervisor;
mod ui;
mod uploads;
mod usage;

use config::Config;

#[derive(Parser)]
#[command(
    name = "lighter",
    version,
    about = "An OCI registry that gets images onto nodes fast"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry: starts the control plane and the data plane, stops both on SIGTERM.
    Serve(ServeArgs),
    /// Run the control plane alone (pushes, deletes, discovery; connections from the data plane).
    ControlPlane(ServeArgs),
    /// Run the data plane alone (the public port, the pull path).
    DataPlane(ServeArgs),
    /// Pull images into the pull-through cache of a running registry.
    Prefetch(PrefetchArgs),
    /// Remove content no repository holds from a running registry (garbage collection).
    Gc(GcArgs),
    /// List the workloads running an image whose tag has moved since (the inventory the
    /// admission webhook keeps).
    Outdated(cli::outdated::OutdatedArgs),
    /// Print a running registry's event log (pulls, …), oldest first.
    Events(cli::events::EventsArgs),
    /// Print a running registry's usage: pulls, bytes and clients per repository, tag or digest.
    Usage(cli::usage::UsageArgs),
    /// Apply the retention rules in a running registry (remove the tags they do not keep).
    Retention(cli::retention::RetentionArgs),
    /// Copy the repositories of a data directory into the bucket of `[storage.s3]` (switching an
    /// existing registry to replicas; run before the replicas start). Prints a JSON report.
    BucketImport(BucketImportArgs),
}

/// `lighter bucket-import`: the registry's own flags (`--config`, `--data-dir`, …), and
/// `--dry-run`.
#[derive(Args)]
struct BucketImportArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Only report what would be copied.
    #[arg(long)]
    dry_run: bool,
}

/// Flags override the environment (`LIGHTER_*`), which overrides the config file.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file; fields as in the README's configuration table.
    #[arg(long, env = "LIGHTER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "LIGHTER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "LIGHTER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "LIGHTER_MANIFEST_SIZE_MAX_BYTES")]
    manifest_size_max_bytes: Option<u64>,
    #[arg(long, env = "LIGHTER_UPLOAD_SESSIONS_MAX")]
    upload_sessions_max: Option<usize>,
    #[arg(long, env = "LIGHTER_UPLOAD_SESSION_IDLE_TIMEOUT_MS")]
    upload_session_idle_timeout_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_REQUEST_HEADER_SIZE_MAX_BYTES")]
    request_header_size_max_bytes: Option<usize>,
    #[arg(long, env = "LIGHTER_REQUEST_HEADER_TIMEOUT_MS")]
    request_header_timeout_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_REQUEST_BODY_IDLE_TIMEOUT_MS")]
    request_body_idle_timeout_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_REQUEST_BODY_RATE_MIN_BYTES_PER_SEC")]
    request_body_rate_min_bytes_per_sec: Option<u64>,
    #[arg(long, env = "LIGHTER_RESPONSE_IDLE_TIMEOUT_MS")]
    response_idle_timeout_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_LINGERING_CLOSE_MS")]
    lingering_close_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_CONNECTIONS_MAX")]
    connections_max: Option<usize>,
    #[arg(long, env = "LIGHTER_LIST_PAGE_SIZE_MAX")]
    list_page_size_max: Option<usize>,
    #[arg(long, env = "LIGHTER_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_CONTROL_SOCKET_PATH")]
    control_socket_path: Option<PathBuf>,
    #[arg(long, env = "LIGHTER_CONTROL_LISTEN")]
    control_listen: Option<SocketAddr>,
    #[arg(long, env = "LIGHTER_CORES")]
    cores: Option<usize>,
    #[arg(long, env = "LIGHTER_CONNECTIONS_PER_CORE_MAX")]
    connections_per_core_max: Option<usize>,
    #[arg(long, env = "LIGHTER_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: Option<u64>,
    /// auto, io_uring or epoll.
    #[arg(long, env = "LIGHTER_IO_ENGINE")]
    io_engine: Option<String>,
    /// Mirror an upstream registry: NAME=URL (repeatable), e.g.
    /// docker.io=https://registry-1.docker.io. Credentials and timeouts: the config file.
    #[arg(long = "upstream", value_name = "NAME=URL")]
    upstreams: Vec<String>,
    #[arg(long, env = "LIGHTER_CACHE_SIZE_MAX_BYTES")]
    cache_size_max_bytes: Option<u64>,
    #[arg(long, env = "LIGHTER_GC_INTERVAL_MS")]
    gc_interval_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_RETENTION_INTERVAL_MS")]
    retention_interval_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    #[arg(long, env = "LIGHTER_WEBHOOK_TLS_CERT_PATH")]
    webhook_tls_cert_path: Option<PathBuf>,
    #[arg(long, env = "LIGHTER_WEBHOOK_TLS_KEY_PATH")]
    webhook_tls_key_path: Option<PathBuf>,
    /// A mirrored repository (or prefix) never evicted (repeatable).
    #[arg(long = "cache-pinned-repository", value_name = "REPOSITORY")]
    cache_pinned_repositories: Vec<String>,
    /// Another node of the node tier, http://HOST:PORT (repeatable; this node may be listed).
    #[arg(long = "peer", value_name = "URL")]
    peers: Vec<String>,
    /// A DNS name (NAME or NAME:PORT) whose addresses are peers, e.g. a headless Service.
    #[arg(long, env = "LIGHTER_PEERS_DNS")]
    peers_dns: Option<String>,
    #[arg(long, env = "LIGHTER_PEERS_REFRESH_MS")]
    peers_refresh_ms: Option<u64>,
    /// This node as peers reach it, http://IP:PORT (default: the peer with a local address).
    #[arg(long, env = "LIGHTER_PEER_ADDRESS")]
    peer_address: Option<String>,
    #[arg(long, env = "LIGHTER_PEER_STALL_TIMEOUT_MS")]
    peer_stall_timeout_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_PEER_UPLOAD_MAX_BYTES_PER_SEC")]
    peer_upload_max_bytes_per_sec: Option<u64>,
    #[arg(long, env = "LIGHTER_PEER_FANOUT_MAX")]
    peer_fanout_max: Option<u32>,
    #[arg(long, env = "LIGHTER_PEER_RANGE_PARALLEL_MIN_BYTES")]
    peer_range_parallel_min_bytes: Option<u64>,
    /// containerd's content store (read-only), e.g.
    /// /var/lib/containerd/io.containerd.content.v1.content.
    #[arg(long, env = "LIGHTER_CONTAINERD_CONTENT_DIR")]
    containerd_content_dir: Option<PathBuf>,
    #[arg(long, env = "LIGHTER_DISK_FREE_MIN_BYTES")]
    disk_free_min_bytes: Option<u64>,
    /// Log lines as `text` (default) or `json` (one object per line).
    #[arg(long, env = "LIGHTER_LOG_FORMAT")]
    log_format: Option<String>,
    #[arg(long, env = "LIGHTER_SEND_UNSENT_MAX_BYTES")]
    send_unsent_max_bytes: Option<u64>,
    /// Most lines of the event log one page of the web page reads to count pulls.
    #[arg(long, env = "LIGHTER_UI_EVENTS_SCAN_MAX")]
    ui_events_scan_max: Option<u64>,
    #[arg(long, env = "LIGHTER_EVENTS_RING_RECORDS")]
    events_ring_records: Option<u64>,
    #[arg(long, env = "LIGHTER_EVENTS_RETENTION_BYTES")]
    events_retention_bytes: Option<u64>,
    #[arg(long, env = "LIGHTER_EVENTS_RETENTION_MS")]
    events_retention_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_EVENTS_FILE_MAX_BYTES")]
    events_file_max_bytes: Option<u64>,
    #[arg(long, env = "LIGHTER_INVENTORY_RETENTION_MS")]
    inventory_retention_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_INVENTORY_ENTRIES_MAX")]
    inventory_entries_max: Option<usize>,
    #[arg(long, env = "LIGHTER_EVENTS_QUEUE_RECORDS")]
    events_queue_records: Option<u64>,
    #[arg(long, env = "LIGHTER_USAGE_ENTRIES_MAX")]
    usage_entries_max: Option<usize>,
    #[arg(long, env = "LIGHTER_USAGE_SAVE_INTERVAL_MS")]
    usage_save_interval_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_NOTIFICATIONS_QUEUE_MAX_BYTES")]
    notifications_queue_max_bytes: Option<u64>,
    #[arg(long, env = "LIGHTER_NOTIFICATIONS_RETRY_INITIAL_MS")]
    notifications_retry_initial_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_NOTIFICATIONS_RETRY_MAX_MS")]
    notifications_retry_max_ms: Option<u64>,
    #[arg(long, env = "LIGHTER_NOTIFICATIONS_REQUEST_TIMEOUT_MS")]
    notifications_request_timeout_ms: Option<u64>,
    /// The CloudEvents source of notifications (endpoints: the config file).
    #[arg(long, env = "LIGHTER_NOTIFICATIONS_SOURCE")]
    notifications_source: Option<String>,
    /// PEM certificate chain of the registry port (with --tls-key-path: HTTPS only).
    #[arg(long, env = "LIGHTER_TLS_CERT_PATH")]
    tls_cert_path: Option<PathBuf>,
    #[arg(long, env = "LIGHTER_TLS_KEY_PATH")]
    tls_key_path: Option<PathBuf>,
}

/// How `lighter prefetch`, `gc`, `events` and `usage` reach a registry.
#[derive(Args)]
struct RegistryArgs {
    /// The registry's URL (its public port).
    #[arg(
        long,
        env = "LIGHTER_REGISTRY",
        default_value = "http://127.0.0.1:5000"
    )]
    registry: String,
    /// USER:PASSWORD with the admin right, when access control is on.
    #[arg(
        long,
        env = "LIGHTER_REGISTRY_CREDENTIALS",
        value_name = "USER:PASSWORD"
    )]
    credentials: Option<String>,
    /// PEM CA certificates to trust for an https:// registry.
    #[arg(long, env = "LIGHTER_REGISTRY_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// `lighter prefetch`: pulls images into a running registry's cache.
#[derive(Args)]
struct PrefetchArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Images, e.g. docker.io/library/alpine:3.20 or ghcr.io/org/app@sha256:…
    #[arg(required = true)]
    images: Vec<String>,
}

impl ServeArgs {
    fn into_config(mut self) -> Result<Config, String> {
        let mut c = Config::load(self.config.as_deref())?;
        macro_rules! overlay {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        let upstreams = std::mem::take(&mut self.upstreams);
        overlay!(
            listen,
            data_dir,
            manifest_size_max_bytes,
            upload_sessions_max,
            upload_session_idle_timeout_ms,
            request_header_size_max_bytes,
            request_header_timeout_ms,
            request_body_idle_timeout_ms,
            request_body_rate_min_bytes_per_sec,
            response_idle_timeout_ms,
            lingering_close_ms,
            connections_max,
            list_page_size_max,
            ui_events_scan_max,
            shutdown_grace_ms,
            control_socket_path,
            cores,
            connections_per_core_max,
            idle_timeout_ms,
            io_engine,
            cache_size_max_bytes,
            gc_interval_ms,
            retention_interval_ms,
            webhook_tls_cert_path,
            webhook_tls_key_path,
            peers_refresh_ms,
            peer_stall_timeout_ms,
            peer_upload_max_bytes_per_sec,
            peer_fanout_max,
            peer_range_parallel_min_bytes,
            disk_free_min_bytes,
            log_format,
            send_unsent_max_bytes,
            events_ring_records,
            events_retention_bytes,
            events_retention_ms,
            events_file_max_bytes,
            inventory_retention_ms,
            inventory_entries_max,
            events_queue_records,
            usage_entries_max,
            usage_save_interval_ms,
            notifications_queue_max_bytes,
            notifications_retry_initial_ms,
            notifications_retry_max_ms,
            notifications_request_timeout_ms,
            notifications_source
        );
        for (flag, field) in [
            (self.peers_dns.take(), &mut c.peers_dns),
            (self.peer_address.take(), &mut c.peer_address),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
        for (flag, field) in [
            (self.tls_cert_path.take(), &mut c.tls_cert_path),
            (self.tls_key_path.take(), &mut c.tls_key_path),
        ] {
            if flag.is_some() {
                *field = flag;
            }
        }
        if self.containerd_content_dir.is_some() {
            c.containerd_content_dir = self.containerd_content_dir.take();
        }
        c.peers.extend(std::mem::take(&mut self.peers));
        if self.webhook_listen.is_some() {
            c.webhook_listen = self.webhook_listen;
        }
        c.cache_pinned_repositories
            .extend(std::mem::take(&mut self.cache_pinned_repositories));
        for u in &upstreams {
            c.upstreams.push(config::Upstream::parse_flag(u)?);
        }
        if self.control_listen.is_some() {
            c.control_listen = self.control_listen;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `lighter gc`: garbage collection in a running registry.
#[derive(Args)]
struct GcArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Only report what would be removed.
    #[arg(long)]
    dry_run: bool,
}

/// Calls the registry's prefetch API; returns its JSON report.
fn prefetch(args: PrefetchArgs) -> Result<String, String> {
    let query: Vec<(&str, &str)> = args.images.iter().map(|i| ("image", i.as_str())).collect();
    call(&args.registry, "prefetch", &query)
}

/// Calls the registry's garbage collection API; returns its JSON report.
fn gc(args: GcArgs) -> Result<String, String> {
    let dry_run = if args.dry_run { "true" } else { "false" };
    call(&args.registry, "gc", &[("dry_run", dry_run)])
}

/// `POST <registry>/v2/_lighter/<api>?<query>`; the answer's body on success.
fn call(r: &RegistryArgs, api: &str, query: &[(&str, &str)]) -> Result<String, String> {
    cli::run(async {
        let url = cli::api_url(r, api);
        let client = cli::client(r)?;
        cli::answer(
            &url,
            cli::with_credentials(client.post(&url).query(&query), r)?,
        )
        .await
    })
}

/// Prints an API call's JSON report, or its error.
fn report(what: &str, result: Result<String, String>) -> std::process::ExitCode {
    match result {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lighter {what}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A subcommand that printed its answer, or its error.
fn done(what: &str, result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lighter {what}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What a subcommand runs once its configuration is known.
type Runner = fn(Config) -> Result<(), String>;

/// Logs to standard error at `RUST_LOG`'s levels (default `info`), as text or JSON lines.
fn init_logging(json: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (args, run): (ServeArgs, Runner) = match cli.command {
        Command::Serve(args) => (args, supervisor::run),
        Command::ControlPlane(args) => (args, server::run),
        Command::DataPlane(args) => (args, |c: Config| lighter_dataplane::run(c.dataplane())),
        Command::Prefetch(args) => {
            init_logging(false);
            return report("prefetch", prefetch(args));
        }
        Command::Gc(args) => {
            init_logging(false);
            return report("gc", gc(args));
        }
        Command::Outdated(args) => {
            init_logging(false);
            return cli::outdated::run(args);
        }
        Command::Events(args) => return done("events", cli::events::run(args)),
        Command::Usage(args) => return done("usage", cli::usage::run(args)),
        Command::Retention(args) => return done("retention", cli::retention::run(args)),
        Command::BucketImport(args) => {
            let config = match args.serve.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lighter: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_logging(false);
            let imported = cli::bucket_import::run(&config, args.dry_run).map(|r| {
                println!("{}", serde_json::to_string_pretty(&r).expect("JSON"));
            });
            return done("bucket-import", imported);
        }
    };
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lighter: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(config.log_format == "json");
    match run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
