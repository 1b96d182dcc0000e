//! `lighter`: the registry's command line. `lighter serve` runs the control plane, which serves
//! the whole OCI Distribution API over the data directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod api;
mod config;
mod error;
mod manifest;
mod server;
mod uploads;

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
    /// Serve the registry.
    Serve(ServeArgs),
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
    #[arg(long, env = "LIGHTER_CONNECTIONS_MAX")]
    connections_max: Option<usize>,
    #[arg(long, env = "LIGHTER_LIST_PAGE_SIZE_MAX")]
    list_page_size_max: Option<usize>,
    #[arg(long, env = "LIGHTER_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
}

impl ServeArgs {
    fn into_config(self) -> Result<Config, String> {
        let mut c = Config::load(self.config.as_deref())?;
        macro_rules! overlay {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        overlay!(
            listen,
            data_dir,
            manifest_size_max_bytes,
            upload_sessions_max,
            upload_session_idle_timeout_ms,
            request_header_size_max_bytes,
            request_header_timeout_ms,
            request_body_idle_timeout_ms,
            connections_max,
            list_page_size_max,
            shutdown_grace_ms
        );
        c.validate()?;
        Ok(c)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("lighter: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            match server::run(config) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
