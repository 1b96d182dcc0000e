//! The control plane's HTTP server: hyper HTTP/1.1 on a multi-threaded tokio runtime, serving
//! connections handed over by the data plane on the control socket (and, if `control_listen` is
//! set, TCP connections directly), with the configured limits on connections, header size and
//! header time, graceful shutdown on SIGTERM or SIGINT, and a background sweep of idle uploads.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::sending::SendDeadline;
use hyper_util::server::graceful::GracefulShutdown;
use lighter_layout::Layout;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;

use crate::api;
use crate::app::App;
use crate::config::Config;
use crate::handoff;
use crate::uploads::Uploads;

/// How often idle upload sessions are looked for.
const UPLOAD_SWEEP_INTERVAL_MS: u64 = 60_000;
/// How often the cache size is checked (also after each completed download).
const CACHE_SWEEP_INTERVAL_MS: u64 = 10_000;

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
    let log_on = config.events_ring_records > 0;
    let rings = Arc::new(crate::events::Rings::new(layout.event_rings_dir(), log_on));
    let events = log_on.then(|| {
        Arc::new(crate::events::EventLog::new(
            &layout,
            &config,
            rings.clone(),
        ))
    });
    if let Some(e) = &events {
        // What the rings of a data plane that stopped (or crashed) still hold goes into the
        // log before a new data plane (started once the control socket exists) replaces them.
        if let Err(err) = e.drain() {
            tracing::warn!("event log: {err}");
        }
        crate::events::start_draining(e.clone());
    }
    let usage = events.as_ref().map(|e| {
        let u = Arc::new(crate::usage::Summary::load(&layout, &config));
        crate::usage::start_following(u.clone(), e.clone());
        u
    });
    let uploads = Uploads::new(
        layout.clone(),
        config.upload_sessions_max,
        Duration::from_millis(config.upload_session_idle_timeout_ms),
    );
    let mut upstreams = Vec::with_capacity(config.upstreams.len());
    for u in &config.upstreams {
        upstreams.push(crate::mirror::upstream::UpstreamClient::new(u.clone())?);
        tracing::info!(upstream = u.name, url = u.url, "mirroring");
    }
    let mirrors = crate::mirror::Mirrors::new(upstreams);
    let peers = crate::peers::Peers::new(&config)?;
    let containerd = config
        .containerd_content_dir
        .as_ref()
        .map(lighter_layout::ContainerdContent::new);
    if let Some(c) = &containerd {
        tracing::info!(containerd_content_dir = %c.root().display(), "serving blobs containerd holds from its content store");
    }
    let refresher = peers.clone().map(|p| {
        tokio::spawn(async move {
            p.refresh().await;
            p.keep_fresh().await
        })
    });
    let auth = crate::auth::Auth::new(&config)?;
    let bucket = match &config.storage.s3 {
        Some(s3) => {
            let b = crate::bucket::Bucket::new(s3)?;
            tracing::info!(bucket = s3.bucket, endpoint = ?s3.endpoint, "content is kept in the bucket; the data directory caches it");
            Some(b)
        }
        None => None,
    };
    let inventory = Arc::new(crate::inventory::Inventory::open(&layout, &config));
    let notify = crate::notify::Notifier::start(&layout, &config)?;
    let app = Arc::new(App {
        layout,
        config,
        uploads,
        mirrors,
        publishing: std::sync::RwLock::new(()),
        tag_writes: std::array::from_fn(|_| std::sync::Mutex::new(())),
        gc: tokio::sync::Mutex::new(()),
        counters: Default::default(),
        bucket,
        peers,
        containerd,
        auth,
        rings,
        events,
        inventory,
        usage,
        notify,
    });
    crate::notify::watch::start(&app);
    // Deletes made through other replicas (or through this one before a crash), dropped from
    // this one's cache before the control socket exists, so before the data plane (started once
    // it answers) serves anything from the cache; then followed.
    let journal = match app.bucket.is_some() {
        true => {
            let read = crate::bucket::journal::catch_up(&app).await;
            Some(tokio::spawn(crate::bucket::journal::follow(
                app.clone(),
                read,
            )))
        }
        false => None,
    };
    let socket_path = app.config.control_socket();
    // A socket file left by a previous run that died.
    let _ = std::fs::remove_file(&socket_path);
    let unix = UnixListener::bind(&socket_path).map_err(|e| {
        format!(
            "cannot listen on the control socket {}: {e}",
            socket_path.display()
        )
    })?;
    tracing::info!(data_dir = %app.config.data_dir.display(), "control plane taking handoffs on unix:{}", socket_path.display());
    let tcp = match app.config.control_listen {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (control_listen): {e}"))?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            tracing::info!("control plane serving the whole API directly on tcp {addr}");
            Some(l)
        }
    };

    let inventory_task = tokio::spawn(crate::inventory::run(app.inventory.clone()));
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

    let evictor = ((app.config.cache_size_max_bytes > 0 || app.containerd.is_some())
        && (!app.config.upstreams.is_empty() || app.bucket.is_some()))
    .then(|| {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(
                    Duration::from_millis(CACHE_SWEEP_INTERVAL_MS),
                    app.mirrors.downloaded.notified(),
                )
                .await;
                let app2 = app.clone();
                let swept = tokio::task::spawn_blocking(move || {
                    let app = app2;
                    let upstreams: Vec<String> = app
                        .mirrors
                        .upstreams
                        .iter()
                        .map(|u| u.prefix.clone())
                        .collect();
                    crate::mirror::evict::sweep(
                        &app.layout,
                        &upstreams,
                        app.bucket.is_some(),
                        &app.config.cache_pinned_repositories,
                        app.config.cache_size_max_bytes,
                        &app.publishing,
                        app.containerd.as_ref(),
                    )
                })
                .await;
                if let Ok(Ok(s)) = &swept {
                    let c = &app.counters;
                    let now = s.cached_bytes - s.evicted_bytes;
                    c.cached_bytes
                        .store(now, std::sync::atomic::Ordering::Relaxed);
                    crate::metrics::Counters::add(&c.evicted_blobs, s.evicted_blobs as u64);
                    crate::metrics::Counters::add(&c.evicted_bytes, s.evicted_bytes);
                    for r in &s.removed {
                        let reason = if r.containerd {
                            "containerd"
                        } else {
                            "cache_size"
                        };
                        let repository = r.repositories.first().map(|n| n.as_str().to_owned());
                        let e = crate::events::Event::new("evict")
                            .with("digest", r.digest.to_string())
                            .with("bytes", r.size)
                            .with("reason", reason)
                            .with_text("repository", repository);
                        crate::events::record(&app, e);
                    }
                }
                match swept {
                    Ok(Ok(s)) if s.evicted_blobs > 0 => tracing::info!(
                        cached_bytes = s.cached_bytes - s.evicted_bytes,
                        evicted_blobs = s.evicted_blobs,
                        evicted_bytes = s.evicted_bytes,
                        "cache over cache_size_max_bytes: evicted"
                    ),
                    Ok(Err(e)) => tracing::warn!("cache sweep failed: {e}"),
                    _ => {}
                }
            }
        })
    });

    let collector = (app.config.gc_interval_ms > 0).then(|| {
        let app = app.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis(app.config.gc_interval_ms);
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = crate::gc::run(&app, false).await {
                    tracing::warn!("garbage collection failed: {e}");
                }
            }
        })
    });

    let retention = (app.config.retention_interval_ms > 0 && !app.config.retention.is_empty())
        .then(|| {
            let app = app.clone();
            tokio::spawn(async move {
                let every = Duration::from_millis(app.config.retention_interval_ms);
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = crate::retention::run(&app, false).await {
                        tracing::warn!("retention failed: {e}");
                    }
                }
            })
        });

    let webhooks = match app.config.webhook_listen {
        None => None,
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (webhook_listen): {e}"))?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            tracing::info!("admission webhooks on https://{addr}");
            let (cert, key) = (
                app.config.webhook_tls_cert_path.clone(),
                app.config.webhook_tls_key_path.clone(),
            );
            Some(tokio::spawn(crate::admission::serve(
                app.clone(),
                l,
                cert,
                key,
            )))
        }
    };

    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.config.request_header_timeout_ms))
        .max_buf_size(app.config.request_header_size_max_bytes)
        .keep_alive(true);
    let connections = Arc::new(Semaphore::new(app.config.connections_max));
    let send_idle = Duration::from_millis(app.config.response_idle_timeout_ms);
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Bytes a handoff may carry: a request head and what was pipelined after it.
    let prefix_max_bytes = app.config.request_header_size_max_bytes;
    // Handed-over connections kept for a return to the data plane watch this instead of
    // hyper-util's graceful shutdown (which cannot give a connection back).
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);

    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let app2 = app.clone();
        let service = move |client: Option<std::net::IpAddr>| {
            let app2 = app2.clone();
            service_fn(move |req| api::handle(app2.clone(), req, client))
        };
        tokio::select! {
            r = unix.accept() => match r {
                Ok((stream, _)) => {
                    let watcher = graceful.watcher();
                    let (app3, http, stopping) = (app.clone(), http.clone(), stopping_rx.clone());
                    tokio::spawn(async move {
                        match handoff::receive(stream, prefix_max_bytes).await {
                            Ok(h) => serve_handoff(app3, h, http, watcher, stopping).await,
                            // A connect without data is a liveness probe (the supervisor's).
                            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                            Err(e) => tracing::warn!("bad handoff on the control socket: {e}"),
                        }
                        drop(permit);
                    });
                }
                Err(e) => accept_failed(e).await,
            },
            r = accept_tcp(tcp.as_ref()) => match r {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let client = stream.peer_addr().ok().map(|a| a.ip());
                    let stream = SendDeadline::new(stream, send_idle);
                    let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service(client)));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!("connection ended with an error: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => accept_failed(e).await,
            },
            _ = &mut shutdown => break,
        }
    }

    drop(unix);
    let _ = std::fs::remove_file(&socket_path);
    sweeper.abort();
    for task in [evictor, journal, collector, retention, webhooks, refresher]
        .into_iter()
        .flatten()
        .chain([inventory_task])
    {
        task.abort();
    }
    let grace = Duration::from_millis(app.config.shutdown_grace_ms);
    tracing::info!(
        "shutting down: finishing in-flight requests (up to {} ms)",
        grace.as_millis()
    );
    // hyper's connections are told to finish; every connection (those followed outside hyper
    // too, see mirror::follow) holds a permit until it is done.
    let _ = stopping_tx.send(true);
    let all_done = async {
        graceful.shutdown().await;
        let _ = connections
            .acquire_many(app.config.connections_max as u32)
            .await;
    };
    tokio::select! {
        _ = all_done => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown_grace_ms passed; closing remaining connections"),
    }
    let inventory = app.inventory.clone();
    match tokio::task::spawn_blocking(move || inventory.flush()).await {
        Ok(Err(e)) => tracing::warn!("inventory: cannot publish inventory.json: {e}"),
        Err(e) => tracing::warn!("inventory: {e}"),
        Ok(Ok(())) => {}
    }
    // What the last requests queued for notification goes to disk (delivered after a restart).
    if let Some(n) = app.notify.clone() {
        let _ = tokio::task::spawn_blocking(move || n.flush()).await;
    }
    // The data plane stopped first: what its rings hold goes into the log now.
    if let Some(e) = &app.events {
        if let Err(err) = e.drain().and_then(|_| e.sync()) {
            tracing::warn!("event log: {err}");
        }
    }
    // Saved up to the end of the log, so the next start reads nothing again.
    if let Some(u) = &app.usage {
        if let Err(err) = u.follow().and_then(|_| u.save()) {
            tracing::warn!("usage summary: {err}");
        }
    }
    Ok(())
}

/// Serves the one request of a handed-over connection, then gives the connection back to the
/// data plane if it waits for it and the exchange left the connection reusable (see
/// `handoff`), or closes it, lingering.
async fn serve_handoff(
    app: Arc<App>,
    h: handoff::Handoff,
    mut http: http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    stopping: tokio::sync::watch::Receiver<bool>,
) {
    use std::future::Future;
    use std::task::Poll;

    crate::metrics::Counters::add(&app.counters.handoffs, 1);
    let handoff::Handoff { io, back } = h;
    // Peers' requests and cold blobs are streamed with sendfile, outside hyper.
    let Some(io) = crate::peers::serve::try_serve(&app, io).await else {
        return;
    };
    let Some(mut io) = crate::mirror::follow::try_serve(&app, io).await else {
        return;
    };
    // A second descriptor of the socket keeps it open for a lingering close once hyper is
    // done with its own.
    let dup = io.socket_dup();
    let client = io.peer_ip();
    let linger = Duration::from_millis(app.config.lingering_close_ms);
    let send_idle = Duration::from_millis(app.config.response_idle_timeout_ms);
    let pending_max = app.config.request_header_size_max_bytes;
    // Given back only with a request of known length (not chunked) and while not stopping.
    let exchange = match back {
        Some(back) if !*stopping.borrow() => io.keep_open().map(|x| (back, x)),
        _ => None,
    };
    let Some((back, exchange)) = exchange else {
        // Nothing to give it back to: one request, answered with `Connection: close`.
        http.keep_alive(false);
        let service = service_fn(move |req| api::handle(app.clone(), req, client));
        let io = SendDeadline::new(io, send_idle);
        let conn = watcher.watch(http.serve_connection(TokioIo::new(io), service));
        if let Err(e) = conn.await {
            tracing::debug!("connection ended with an error: {e}");
        }
        if let Ok(dup) = dup {
            handoff::linger(dup, linger).await;
        }
        return;
    };
    drop(watcher);

    let service = {
        let (app, x) = (app.clone(), exchange.clone());
        service_fn(move |req| {
            x.request(&req);
            let answer = api::handle(app.clone(), req, client);
            let x = x.clone();
            async move {
                let mut res = answer.await;
                if let Ok(r) = &mut res {
                    x.answer(r);
                }
                res
            }
        })
    };
    let mut conn = http.serve_connection(TokioIo::new(SendDeadline::new(io, send_idle)), service);
    // Keep-alive is switched off once the answer's head is out (so it does not say `close`):
    // hyper then ends the connection after this one exchange, flushing its answer, and hands
    // the socket back instead of shutting it down (`Prefixed::keep_open`).
    let mut ending = false;
    let mut watching = stopping.clone();
    let mut stop = std::pin::pin!(async move {
        let _ = watching.wait_for(|s| *s).await;
    });
    let result = std::future::poll_fn(|cx| loop {
        if !ending && (exchange.answering() || stop.as_mut().poll(cx).is_ready()) {
            ending = true;
            std::pin::Pin::new(&mut conn).graceful_shutdown();
        }
        match std::pin::Pin::new(&mut conn).poll(cx) {
            Poll::Ready(r) => return Poll::Ready(r),
            Poll::Pending if !ending && exchange.answering() => continue,
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    let stopping_now = *stopping.borrow();
    match result {
        Ok(()) => {
            let parts = conn.into_parts();
            let io = parts.io.into_inner().into_inner();
            let returned = match handoff::reusable(&io, &parts.read_buf, pending_max) {
                Some(pending) if !stopping_now => handoff::give_back(back, io, &pending).await,
                _ => {
                    // Not coming back: the data plane learns it now (a TLS relay then goes on
                    // relaying what the client still sends, for the lingering close).
                    drop(back);
                    Err(std::io::Error::other(handoff::why_not(
                        &io,
                        &parts.read_buf,
                    )))
                }
            };
            match returned {
                Ok(()) => {
                    crate::metrics::Counters::add(&app.counters.handoffs_returned, 1);
                    return;
                }
                Err(e) => tracing::debug!("handed-over connection closed, not given back: {e}"),
            }
        }
        Err(e) => {
            tracing::debug!("connection ended with an error: {e}");
            drop(conn);
            drop(back);
        }
    }
    if let Ok(dup) = dup {
        handoff::shut_write(&dup);
        handoff::linger(dup, linger).await;
    }
}

async fn accept_tcp(l: Option<&TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Out of file descriptors and the like: back off instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
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
