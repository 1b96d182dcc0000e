//! Kubernetes admission webhooks, served by the control plane over HTTPS on their own port
//! (`webhook_listen`): `POST /validate` decides which images may run (see [`policy`]), `POST
//! /mutate` rewrites mirrored images to pull through Lighter. The certificate and key are
//! reloaded when their files change (cert-manager rotates them).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lighter_layout::{ImageRef, Reference, RepoName};

use crate::api;
use crate::app::{block, App};

pub mod policy;
pub mod require;
pub mod review;
pub mod scan;
pub mod verify;

/// Largest AdmissionReview accepted (Kubernetes objects are at most ~1.5 MiB).
const REVIEW_SIZE_MAX_BYTES: usize = 3 << 20;
/// How often the certificate files are checked for changes.
const TLS_RELOAD_CHECK_MS: u64 = 1_000;

/// Runs the webhook server until the task is aborted.
pub async fn serve(app: Arc<App>, listener: tokio::net::TcpListener, cert: PathBuf, key: PathBuf) {
    let files = lighter_dataplane::tls::TlsFiles {
        name: "webhook",
        cert,
        key,
        cert_field: "webhook_tls_cert_path",
        key_field: "webhook_tls_key_path",
    };
    let resolver = match lighter_dataplane::tls::ReloadingCert::load(files) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!("admission webhooks disabled: {e}");
            return;
        }
    };
    let acceptor =
        tokio_rustls::TlsAcceptor::from(lighter_dataplane::tls::server_config(resolver.clone()));
    let policy = match policy::Policy::new(&app.config.admission)
        .and_then(|p| Ok((p, require::Requirements::new(&app.config.admission)?)))
    {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::error!("admission webhooks disabled: {e}");
            return;
        }
    };
    {
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(TLS_RELOAD_CHECK_MS));
            loop {
                tick.tick().await;
                let r = resolver.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload_if_changed()).await;
            }
        });
    }
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.config.request_header_timeout_ms))
        .max_buf_size(app.config.request_header_size_max_bytes);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("webhook accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, app, policy, http) =
            (acceptor.clone(), app.clone(), policy.clone(), http.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(
                Duration::from_millis(app.config.request_header_timeout_ms),
                acceptor.accept(stream),
            );
            let tls = match handshake.await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return tracing::debug!("webhook TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!("webhook TLS handshake timed out"),
            };
            let service = service_fn(move |req| {
                let (app, policy) = (app.clone(), policy.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(&app, &policy, req).await) }
            });
            if let Err(e) = http.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!("webhook connection ended with an error: {e}");
            }
        });
    }
}

async fn handle(
    app: &Arc<App>,
    (policy, requirements): &(policy::Policy, require::Requirements),
    req: Request<Incoming>,
) -> api::Response {
    let path = req.uri().path().to_owned();
    if req.method() != Method::POST || !matches!(path.as_str(), "/validate" | "/mutate") {
        return plain(
            StatusCode::NOT_FOUND,
            "the admission webhooks are POST /validate and POST /mutate",
        );
    }
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&l| l > REVIEW_SIZE_MAX_BYTES as u64) {
        // Read what the client is sending (within reason), so it sees the 400 rather than a
        // reset while it is still writing; the connection is closed after the answer.
        if len <= 2 * REVIEW_SIZE_MAX_BYTES as u64 {
            let body = api::pace::Paced::new(req.into_body(), &app.config);
            let _ = Limited::new(body, len as usize).collect().await;
        }
        let mut r = plain(
            StatusCode::BAD_REQUEST,
            &format!("the AdmissionReview is {len} bytes, over {REVIEW_SIZE_MAX_BYTES}"),
        );
        r.headers_mut().insert(
            "connection",
            hyper::header::HeaderValue::from_static("close"),
        );
        return r;
    }
    let body = api::pace::Paced::new(req.into_body(), &app.config);
    let body = match Limited::new(body, REVIEW_SIZE_MAX_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            // The rest of the body is unread: the connection cannot carry another request.
            let mut r = plain(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the AdmissionReview: {e}"),
            );
            r.headers_mut().insert(
                "connection",
                hyper::header::HeaderValue::from_static("close"),
            );
            return r;
        }
    };
    let review = match review::parse(&body) {
        Ok(r) => r,
        Err(m) => return plain(StatusCode::BAD_REQUEST, &m),
    };
    let upstreams: Vec<String> = app
        .config
        .upstreams
        .iter()
        .map(|u| u.name.clone())
        .collect();
    let c = &app.config.admission;
    let hosts = crate::inventory::Hosts {
        registry_hosts: &c.registry_hosts,
        rewrite_to: c.mutate.enabled.then_some(c.mutate.rewrite_to.as_str()),
        upstreams: &upstreams,
    };
    let exempt = review
        .namespace
        .as_ref()
        .is_some_and(|ns| c.exempt_namespaces.contains(ns));
    let images: Vec<String> = review
        .object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .map(|o| review::images(&review.kind.kind, &o))
        .unwrap_or_default()
        .into_iter()
        .map(|(_, image)| image)
        .collect();
    if app.bucket.is_some() && c.mirror_fetch_timeout_ms > 0 {
        // Replicas: what the inventory and the checks below read from disk is made local from
        // the bucket first (an image pushed through another replica, its tag as the bucket
        // says).
        let warm = warm_backed(app, requirements, &hosts, &images);
        let limit = Duration::from_millis(c.mirror_fetch_timeout_ms);
        if tokio::time::timeout(limit, warm).await.is_err() {
            tracing::info!(
                "admission: reading images from the bucket took over mirror_fetch_timeout_ms"
            );
        }
    }
    if path == "/validate" {
        record_inventory(app, &review, &upstreams);
    }
    // Pinning needs the digest a mirrored tag names: fetched for every mirrored image then.
    let pin_all = path == "/mutate" && c.mutate.pin_digest;
    let checks = path == "/validate" && !exempt && !requirements.is_empty();
    if (checks || pin_all) && c.mirror_fetch_timeout_ms > 0 {
        let warm = warm_mirrored(app, requirements, &hosts, &images, pin_all);
        let limit = Duration::from_millis(c.mirror_fetch_timeout_ms);
        if tokio::time::timeout(limit, warm).await.is_err() {
            tracing::info!(
                "admission: fetching mirrored images' signatures took over mirror_fetch_timeout_ms"
            );
        }
    }
    let response = if path == "/validate" {
        let present = |r: &ImageRef| is_present(app, &upstreams, r);
        let require = |image: &str| {
            if requirements.is_empty() {
                return None;
            }
            block(|| {
                let resolved = hosts.resolve(&app.layout, image);
                let repository = resolved.repository.as_ref()?;
                requirements.check(&app.layout, image, repository, resolved.digest.as_deref())
            })
        };
        let ctx = review::Context {
            policy,
            mode: c.mode,
            exempt_namespaces: &c.exempt_namespaces,
            present: &present,
            rewritten_prefix: hosts.rewrite_to,
            upstreams: &upstreams,
            require: &require,
        };
        review::validate(&review, &ctx)
    } else if c.mutate.enabled || c.mutate.pin_digest {
        // The digest a tag names in Lighter now; nothing for an image already pinned.
        let pin = |image: &str| {
            if !c.mutate.pin_digest {
                return None;
            }
            let resolved = block(|| hosts.resolve(&app.layout, image));
            resolved.digest.filter(|_| !resolved.pinned)
        };
        review::mutate(
            &review,
            hosts.rewrite_to,
            &upstreams,
            &c.mutate.exclude_namespaces,
            &pin,
        )
    } else {
        kube_core::admission::AdmissionResponse::from(&review)
    };
    log_decision(app, &path, &review, &response);
    let mut review =
        serde_json::to_value(response.into_review()).expect("an AdmissionReview serialises");
    // admission.k8s.io/v1 carries the patch as base64 (Go's []byte); kube-core writes the bytes
    // as a JSON array of numbers, which the API server would reject.
    if let Some(patch) = review.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(patch.take()).unwrap_or_default();
        *patch = serde_json::Value::String(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            bytes,
        ));
    }
    api::json(StatusCode::OK, serde_json::to_vec(&review).expect("JSON"))
}

/// Fetches through the mirror what a requirement needs of each mirrored image under a rule
/// (its manifest, which resolves the tag, and cosign's classic `.sig` tag with its payloads),
/// so that [`require::Requirements::check`] finds it on disk; with `every`, the manifest of
/// every mirrored image too (pinning to the digest a tag names). Failures leave it absent
/// (the check then says so; the pin is not made).
async fn warm_mirrored(
    app: &Arc<App>,
    requirements: &require::Requirements,
    hosts: &crate::inventory::Hosts<'_>,
    images: &[String],
    every: bool,
) {
    for image in images {
        let original = review::unrewritten(image, hosts.rewrite_to, hosts.upstreams);
        let Ok(r) = ImageRef::parse(&original) else {
            continue;
        };
        if !hosts.upstreams.contains(&r.registry) {
            continue;
        }
        let Some(name) = RepoName::mirrored(&r.registry, &r.repository) else {
            continue;
        };
        let signature = match requirements.applies(name.as_str()) {
            Some(signature) => signature,
            None if every => false,
            None => continue,
        };
        let Some(t) = app.mirrors.target(&name, None) else {
            continue;
        };
        let reference = match (&r.digest, &r.tag) {
            (Some(d), _) => Reference::Digest(d.clone()),
            (None, Some(tag)) => Reference::Tag(tag.clone()),
            (None, None) => continue,
        };
        let digest = match crate::mirror::ensure_manifest(app, &t, &reference).await {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(%name, "admission: cannot fetch {original} through the mirror: {e:?}");
                continue;
            }
        };
        if !signature {
            continue;
        }
        let sig = Reference::Tag(require::classic_sig_tag(&digest));
        let Ok(sig) = crate::mirror::ensure_manifest(app, &t, &sig).await else {
            continue;
        };
        let payloads = block(|| requirements.payloads(&app.layout, &name, &sig));
        for payload in payloads {
            if let Err(e) = crate::mirror::ensure_blob(app, &t, &payload).await {
                tracing::info!(%name, "admission: cannot fetch signature payload {payload}: {e:?}");
            }
        }
    }
}

/// With `[storage.s3]`: each image stored under Lighter's own host names, its tag and manifest
/// (and, under a signature rule or any other requirement, its referrers and their payloads)
/// made local from the bucket, so that the presence and requirement checks, which read this
/// replica's cache, see what was pushed through any replica. Failures leave it absent.
async fn warm_backed(
    app: &Arc<App>,
    requirements: &require::Requirements,
    hosts: &crate::inventory::Hosts<'_>,
    images: &[String],
) {
    let Some(bucket) = &app.bucket else {
        return;
    };
    for image in images {
        // As `Hosts::resolve` names the repository the checks read.
        let original = review::unrewritten(image, hosts.rewrite_to, hosts.upstreams);
        let Ok(r) = ImageRef::parse(&original) else {
            continue;
        };
        let own = !hosts.upstreams.contains(&r.registry)
            && hosts.registry_hosts.contains(&r.registry)
            || hosts.rewrite_to.is_some_and(|h| h == r.registry);
        if !own {
            continue;
        }
        let name: &RepoName = &r.repository;
        if app.mirrors.target(name, None).is_some() {
            continue;
        }
        let reference = match (&r.digest, &r.tag) {
            (Some(d), _) => Reference::Digest(d.clone()),
            (None, Some(tag)) => Reference::Tag(tag.clone()),
            (None, None) => continue,
        };
        let referrers = requirements.applies(name.as_str()).is_some();
        let max = app.config.admission.artifact_size_max_bytes;
        if let Err(e) =
            crate::bucket::warm_for_admission(app, bucket, name, &reference, referrers, max).await
        {
            tracing::info!(%name, "admission: cannot read {image} from the bucket: {}", e.message);
        }
    }
}

/// Adds what a validating review shows to the inventory, whatever the policy decides (the
/// validating webhook sees every pod with its generated name, and every workload, after the
/// mutating webhook: so only it records). Memory only, after reading the tags the images name.
fn record_inventory(
    app: &App,
    review: &kube_core::admission::AdmissionRequest<kube_core::DynamicObject>,
    upstreams: &[String],
) {
    let Some(observation) = crate::inventory::observe(review) else {
        return;
    };
    let c = &app.config.admission;
    let hosts = crate::inventory::Hosts {
        registry_hosts: &c.registry_hosts,
        rewrite_to: c.mutate.enabled.then_some(c.mutate.rewrite_to.as_str()),
        upstreams,
    };
    block(|| app.inventory.record(observation, &hosts));
}

/// Whether Lighter can serve the image: from a mirrored upstream, or stored under one of its own
/// host names.
fn is_present(app: &App, upstreams: &[String], r: &ImageRef) -> bool {
    if upstreams.contains(&r.registry) {
        return true;
    }
    if !app.config.admission.registry_hosts.contains(&r.registry) {
        return false;
    }
    let name: &RepoName = &r.repository;
    let reference = match (&r.digest, &r.tag) {
        (Some(d), _) => Reference::Digest(d.clone()),
        (None, Some(t)) => Reference::Tag(t.clone()),
        (None, None) => return false,
    };
    block(|| match reference {
        Reference::Digest(d) => app.layout.manifest(name, &d),
        Reference::Tag(t) => app.layout.tag(name, &t),
    })
    .is_ok_and(|e| e.is_some())
}

/// Logs a webhook's decision: the object (namespace, kind, name, its owner), its images, who
/// asked for it (the Kubernetes user, as `identity`), allowed or not and why.
fn log_decision(
    app: &App,
    path: &str,
    req: &kube_core::admission::AdmissionRequest<kube_core::DynamicObject>,
    response: &kube_core::admission::AdmissionResponse,
) {
    let object = req
        .object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .unwrap_or_default();
    let owner = object
        .pointer("/metadata/ownerReferences/0")
        .and_then(|o| Some(format!("{}/{}", o["kind"].as_str()?, o["name"].as_str()?)));
    let images: Vec<String> = review::images(&req.kind.kind, &object)
        .into_iter()
        .map(|(_, image)| image)
        .collect();
    let name = match req.name.as_str() {
        "" => object.pointer("/metadata/generateName").cloned(),
        n => Some(n.into()),
    };
    let reason = match (&response.warnings, response.allowed) {
        (_, false) => Some(response.result.message.clone()),
        (Some(w), true) if !w.is_empty() => Some(w.join("; ")),
        _ => None,
    };
    let e = crate::events::Event::new("admission")
        .with("webhook", path.trim_start_matches('/'))
        .with("operation", format!("{:?}", req.operation).to_uppercase())
        .with("namespace", req.namespace.clone())
        .with("kind", req.kind.kind.as_str())
        .with("name", name)
        .with("owner", owner)
        .with("images", images)
        .with("allowed", response.allowed)
        .with("reason", reason)
        .with("patched", response.patch.is_some())
        .with("identity", req.user_info.username.clone())
        .with("uid", req.uid.as_str());
    crate::events::record(app, e);
}

fn plain(status: StatusCode, message: &str) -> api::Response {
    tracing::debug!(status = status.as_u16(), "webhook: {message}");
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).expect("JSON");
    api::json(status, body)
}
