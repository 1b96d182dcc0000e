//! The control plane's HTTP server: hyper HTTP/1.1 on a multi-threaded tokio runtime, with the
//! configured limits on connections, header size and header time, graceful shutdown on SIGTERM or
//! SIGINT, and a background sweep of idle upload sessions.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use lighter_layout::Layout;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::{self, App};
use crate::config::Config;
use crate::uploads::Uploads;

/// How often idle upload sessions are looked for.
const UPLOAD_SWEEP_INTERVAL_MS: u64 = 60_000;

pub fn run(config: Config) -> Result<(), String> {
    let layout = Layout::open_writer(&config.data_dir).map_err(|e| {
        format!(
            "cannot open data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lighter-cp")
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(config, layout))
}

async fn serve(config: Config, layout: Layout) -> Result<(), String> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(data_dir = %config.data_dir.display(), "listening on http://{addr}");

    let uploads = Uploads::new(
        layout.clone(),
        config.upload_sessions_max,
        Duration::from_millis(config.upload_session_idle_timeout_ms),
    );
    let app = Arc::new(App {
        layout,
        config,
        uploads,
    });
    let sweeper = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(UPLOAD_SWEEP_INTERVAL_MS));
            loop {
                tick.tick().await;
                let app = app.clone();
                let _ = tokio::task::spawn_blocking(move || app.uploads.purge_idle()).await;
            }
        })
    };

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.config.request_header_timeout_ms))
        .max_buf_size(app.config.request_header_size_max_bytes)
        .keep_alive(true);
    let connections = Arc::new(Semaphore::new(app.config.connections_max));
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |req| api::handle(app.clone(), req));
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended with an error: {e}");
            }
            drop(permit);
        });
    }

    drop(listener);
    sweeper.abort();
    let grace = Duration::from_millis(app.config.shutdown_grace_ms);
    tracing::info!(
        "shutting down: finishing in-flight requests (up to {} ms)",
        grace.as_millis()
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown_grace_ms passed; closing remaining connections"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
