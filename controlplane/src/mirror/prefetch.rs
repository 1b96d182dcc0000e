//! Pre-warming: pulls whole images (every platform of an index, every layer) into the cache
//! before nodes ask for them. `POST /v2/_lighter/prefetch?image=<ref>&image=…` and the CLI's
//! `lighter prefetch`, which calls it.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use lighter_layout::media::{self, ManifestKind};
use lighter_layout::{ImageRef, Reference, RepoName};

use super::{ensure_blob, ensure_manifest};
use crate::api::{json, query, Response, Result};
use crate::app::{block, App};
use crate::error::{ApiError, Code};

/// Most images in one prefetch request, and most manifests walked per image.
const IMAGES_PER_REQUEST_MAX: usize = 64;
const MANIFESTS_PER_IMAGE_MAX: usize = 256;

pub async fn handle(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response> {
    let images: Vec<String> = query(req)
        .into_iter()
        .filter(|(k, _)| k == "image")
        .map(|(_, v)| v)
        .collect();
    if images.is_empty() || images.len() > IMAGES_PER_REQUEST_MAX {
        return Err(ApiError::bad_request(
            Code::Unsupported,
            format!("give 1 to {IMAGES_PER_REQUEST_MAX} ?image=<reference> parameters"),
        ));
    }
    let mut report = Vec::with_capacity(images.len());
    for image in &images {
        report.push(prefetch(app, image).await?);
    }
    Ok(json(
        StatusCode::OK,
        serde_json::to_vec(&serde_json::json!({ "images": report })).expect("JSON"),
    ))
}

pub(crate) async fn prefetch(app: &Arc<App>, image: &str) -> Result<serde_json::Value> {
    let r = ImageRef::parse(image).map_err(|e| ApiError::bad_request(Code::NameInvalid, e))?;
    let local = RepoName::parse(&format!(
        "{}/{}",
        lighter_layout::mirror_prefix(&r.registry),
        r.repository
    ))
    .map_err(|e| ApiError::bad_request(Code::NameInvalid, e.to_string()))?;
    let target = app.mirrors.target(&local, None).ok_or_else(|| {
        ApiError::bad_request(
            Code::NameInvalid,
            format!(
                "{image}: registry {} is not a configured upstream",
                r.registry
            ),
        )
    })?;
    let reference = match (&r.digest, &r.tag) {
        (Some(d), _) => Reference::Digest(d.clone()),
        (None, Some(t)) => Reference::Tag(t.clone()),
        (None, None) => unreachable!("ImageRef always has a tag or a digest"),
    };
    let root = ensure_manifest(app, &target, &reference).await?;
    let mut pending = vec![root.clone()];
    let (mut manifests, mut blobs, mut bytes) = (0usize, 0usize, 0u64);
    while let Some(digest) = pending.pop() {
        manifests += 1;
        if manifests > MANIFESTS_PER_IMAGE_MAX {
            return Err(ApiError::bad_request(
                Code::ManifestInvalid,
                format!("{image}: more than {MANIFESTS_PER_IMAGE_MAX} manifests"),
            ));
        }
        let entry = ensure_manifest(app, &target, &Reference::Digest(digest.clone())).await?;
        let content = block(|| app.layout.read_content(&entry))?.unwrap_or_default();
        let stored = block(|| app.layout.manifest(&target.name, &entry))?;
        let media_type = stored.map(|e| e.media_type.to_string()).unwrap_or_default();
        let inspected = lighter_layout::manifest::inspect(&content, Some(&media_type))
            .map_err(|m| ApiError::bad_request(Code::ManifestInvalid, format!("{image}: {m}")))?;
        match media::manifest_kind(&inspected.media_type) {
            Some(ManifestKind::Index) => pending.extend(inspected.references),
            _ => {
                for blob in &inspected.references {
                    bytes += ensure_blob(app, &target, blob).await?;
                    blobs += 1;
                }
            }
        }
    }
    tracing::info!(image, digest = %root, manifests, blobs, bytes, "prefetched");
    let e = crate::events::Event::new("prefetch")
        .with("repository", target.name.as_str())
        .with("reference", reference.to_string())
        .with("digest", root.to_string())
        .with("bytes", bytes)
        .with("blobs", blobs as u64)
        .with("manifests", manifests as u64);
    crate::events::record(app, e);
    Ok(serde_json::json!({
        "image": r.to_string(),
        "digest": root.to_string(),
        "manifests": manifests,
        "blobs": blobs,
        "bytes": bytes,
    }))
}
