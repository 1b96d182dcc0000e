//! Manifests: pull by tag or digest with `Accept` negotiation, push (by tag, by digest, with
//! `?tag=`), with references checked and `subject` recorded for the referrers API, and delete.
//! Spec: "Pulling manifests", "Pushing Manifests", "Pushing Manifests with Subject",
//! "Deleting tags", "Deleting Manifests"; content-negotiation.md.

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use lighter_layout::inline::InlineStr;
use lighter_layout::manifest::{self, Inspected};
use lighter_layout::media::{self, ManifestKind};
use lighter_layout::{Algorithm, Digest, ManifestEntry, Reference, RepoName, Tag};

use super::{content_length, empty, full, header, query, set, Response, Result};
use crate::app::{block, App};
use crate::error::{ApiError, Code};

/// Most `?tag=` parameters accepted on one manifest push (the spec asks for at least 10).
const TAGS_PER_PUSH_MAX: usize = 100;

pub fn get(
    app: &App,
    req: &Request<Incoming>,
    name: &RepoName,
    reference: &Reference,
) -> Result<Response> {
    let entry = resolve(app, name, reference)?;
    let entry = negotiate(app, req, name, entry)?;
    let Some(bytes) = block(|| app.layout.read_content(&entry.digest))? else {
        return Err(manifest_unknown(name, reference));
    };
    let len = bytes.len();
    let mut r = if req.method() == Method::HEAD {
        empty()
    } else {
        full(bytes)
    };
    set(&mut r, "content-type", &entry.media_type);
    set(&mut r, "content-length", &len.to_string());
    set(&mut r, "docker-content-digest", &entry.digest.to_string());
    set(&mut r, "etag", &format!("\"{}\"", entry.digest));
    Ok(r)
}

pub async fn put(
    app: &App,
    req: Request<Incoming>,
    name: &RepoName,
    reference: &Reference,
) -> Result<Response> {
    let max = app.config.manifest_size_max_bytes;
    let too_large = |n: String| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::ManifestInvalid,
            format!("manifest is {n} bytes, over manifest_size_max_bytes ({max})"),
        )
    };
    if let Some(l) = content_length(&req)? {
        if l > max {
            // Read what the client is sending (within reason) so it sees the 413 rather than a
            // connection reset while it is still writing.
            if l <= max.saturating_mul(2) {
                let body = super::pace::Paced::new(req.into_body(), &app.config);
                let _ = Limited::new(body, l as usize).collect().await;
            }
            return Err(too_large(l.to_string()));
        }
    }
    let q = query(&req);
    let mut tags: Vec<Tag> = Vec::new();
    for (k, v) in &q {
        if k == "tag" {
            tags.push(Tag::parse(v).map_err(|e| {
                ApiError::bad_request(Code::ManifestInvalid, format!("tag {v:?}: {e}"))
            })?);
        }
    }
    if tags.len() > TAGS_PER_PUSH_MAX {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            Code::ManifestInvalid,
            format!("at most {TAGS_PER_PUSH_MAX} tag parameters per push"),
        ));
    }
    let query_tags = tags.len();
    let content_type =
        header(&req, "content-type").map(|ct| media::strip_parameters(ct).to_owned());
    let body = super::pace::Paced::new(req.into_body(), &app.config);
    let bytes = Limited::new(body, max as usize)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large(format!("more than {max}"))
            } else {
                super::body_error(Code::ManifestInvalid, e)
            }
        })?
        .to_bytes();

    let digest = match reference {
        Reference::Digest(d) => {
            let computed = Digest::of(d.algorithm(), &bytes);
            if &computed != d {
                return Err(ApiError::bad_request(
                    Code::DigestInvalid,
                    format!("the manifest's digest is {computed}, not {d}"),
                ));
            }
            computed
        }
        Reference::Tag(t) => {
            if query_tags > 0 {
                return Err(ApiError::bad_request(
                    Code::ManifestInvalid,
                    "?tag= is only for pushes by digest",
                ));
            }
            tags.push(t.clone());
            Digest::of(Algorithm::Sha256, &bytes)
        }
    };
    let inspected = manifest::inspect(&bytes, content_type.as_deref())
        .map_err(|m| ApiError::bad_request(Code::ManifestInvalid, m))?;
    // With a bucket, references pushed through another replica are adopted from it first.
    check_references(app, name, &inspected).await?;
    if let Some(bucket) = &app.bucket {
        crate::bucket::sync_immutable_tags(app, bucket, name, Some(&tags)).await?;
        // Refused before the bucket is written (checked again with the local write below).
        block(|| -> Result<()> {
            let _tags = app.tag_writes(name);
            for tag in &tags {
                crate::immutable::check_tag(app, name, tag, Some(&digest))?;
            }
            Ok(())
        })?;
    }

    let entry = ManifestEntry {
        digest: digest.clone(),
        media_type: InlineStr::new(&inspected.media_type)
            .expect("stored media types are short ASCII"),
    };
    // The record the referrers API lists under the subject.
    let referrer = inspected.subject.as_ref().map(|subject| {
        let descriptor = inspected.referrer_descriptor(&digest, bytes.len() as u64);
        let descriptor = serde_json::to_vec(&descriptor).expect("JSON of JSON values");
        (subject, descriptor)
    });
    if let Some(bucket) = &app.bucket {
        // The content in this cache first: a full disk refuses the push (507) while nothing is
        // in the bucket yet. (Unlinked content a collection may take: written again below.)
        block(|| app.layout.put_content(&digest, &bytes))?;
        // Acknowledged only once the bucket holds it: content and link (confirmed against a
        // collection), then the referrer record and the tags.
        let since = std::time::Instant::now();
        bucket
            .put_manifest(name, &digest, &entry.media_type, bytes.clone())
            .await?;
        let link = lighter_layout::bucket::manifest_link_key(name, &digest);
        bucket.confirm_linked(&digest, &link, since).await?;
        if let Some((subject, descriptor)) = &referrer {
            bucket
                .put_referrer(name, subject, &digest, descriptor.clone().into())
                .await?;
        }
        for tag in &tags {
            bucket.put_tag(name, tag, &entry).await?;
        }
    }
    // What each tag named before: a tag that moves is logged with both digests.
    let mut moved: Vec<(&Tag, Option<Digest>)> = Vec::with_capacity(tags.len());
    let cached = block(|| -> Result<std::io::Result<()>> {
        let _publishing = app.publishing();
        // The immutable-tag checks, the reference checks (retention unlinks blobs under this
        // lock) and the tag writes, atomic with respect to other tag writes and removals.
        let _tags = app.tag_writes(name);
        for tag in &tags {
            crate::immutable::check_tag(app, name, tag, Some(&digest))?;
        }
        references_linked(app, name, &inspected)?;
        for tag in &tags {
            moved.push((tag, app.layout.tag(name, tag)?.map(|e| e.digest)));
        }
        Ok((|| {
            app.layout.put_content(&digest, &bytes)?;
            app.layout.link_manifest(name, &digest, &entry.media_type)?;
            if let Some((subject, descriptor)) = &referrer {
                app.layout
                    .put_referrer(name, subject, &digest, descriptor)?;
            }
            for tag in &tags {
                app.layout.put_tag(name, tag, &entry)?;
            }
            Ok(())
        })())
    })?;
    if let Err(e) = cached {
        if app.bucket.is_none() {
            return Err(e.into());
        }
        // The bucket holds the push, so it is acknowledged: another replica serves it now, and
        // a client told it failed would see its tag moved. This cache could not take it (a full
        // disk): it must not go on serving what the tags named before, so they go from here,
        // and pulls of them ask the bucket (and cache it once there is room).
        let dropped = block(|| -> std::io::Result<()> {
            let _publishing = app.publishing();
            let _tags = app.tag_writes(name);
            for tag in &tags {
                app.layout.delete_tag(name, tag)?;
            }
            Ok(())
        });
        let n = crate::metrics::Counters::add(&app.counters.bucket_cache_write_failures, 1);
        tracing::warn!(repository = %name, %digest, bucket_cache_write_failures = n, "manifest pushed to the bucket, not cached here: {e}; its tags are read from the bucket");
        if let Err(e) = dropped {
            tracing::error!(repository = %name, %digest, "cannot drop the tags this cache holds: {e}; they may name what they named before until tag_ttl_ms passes");
        }
    }
    tracing::info!(repository = %name, %digest, media_type = %entry.media_type, tags = tags.len(), "manifest pushed");
    use crate::events::{record, Event};
    let pushed = Event::new("push_manifest")
        .with("repository", name.as_str())
        .with("reference", reference.to_string())
        .with("digest", digest.to_string())
        .with("bytes", bytes.len() as u64)
        .with("media_type", entry.media_type.as_str())
        .with("status", 201)
        .with_text("subject", inspected.subject.as_ref());
    record(app, pushed);
    for (tag, old) in moved {
        if old.as_ref() == Some(&digest) {
            continue;
        }
        let e = Event::new("move_tag")
            .with("repository", name.as_str())
            .with("reference", tag.as_str())
            .with("digest", digest.to_string())
            .with_text("old_digest", old);
        record(app, e);
    }

    let mut r = empty();
    *r.status_mut() = StatusCode::CREATED;
    set(
        &mut r,
        "location",
        &format!("/v2/{name}/manifests/{digest}"),
    );
    set(&mut r, "docker-content-digest", &digest.to_string());
    set(&mut r, "content-length", "0");
    if let Some(subject) = &inspected.subject {
        set(&mut r, "oci-subject", &subject.to_string());
    }
    if query_tags > 0 {
        let list: Vec<&str> = tags.iter().map(Tag::as_str).collect();
        set(&mut r, "oci-tag", &list.join(", "));
    }
    Ok(r)
}

pub async fn delete(app: &App, name: &RepoName, reference: &Reference) -> Result<Response> {
    if let Some(bucket) = &app.bucket {
        let tag = match reference {
            Reference::Tag(t) => Some(std::slice::from_ref(t)),
            Reference::Digest(_) => None,
        };
        crate::bucket::sync_immutable_tags(app, bucket, name, tag).await?;
        // Immutable tags first: the bucket's delete is final (checked again with the local one).
        block(|| -> Result<()> {
            let _tags = app.tag_writes(name);
            match reference {
                Reference::Tag(t) => crate::immutable::check_tag(app, name, t, None),
                Reference::Digest(d) => crate::immutable::check_manifest_delete(app, name, d),
            }
        })?;
    }
    // The bucket before this cache: another replica re-reading a tag finds it gone.
    let in_bucket = match (&app.bucket, reference) {
        (Some(bucket), reference) => {
            // The journal of deletes first (as for blobs): a kill after the bucket's delete
            // leaves no replica's cache, this one's included, serving what the bucket lost.
            use lighter_layout::bucket::Deletion;
            let deletion = match reference {
                Reference::Tag(t) => Deletion::Tag(name.clone(), t.clone()),
                Reference::Digest(d) => Deletion::Manifest(name.clone(), d.clone()),
            };
            bucket.journal_delete(&deletion).await?;
            match reference {
                Reference::Tag(t) => bucket.delete_tag(name, t).await?,
                Reference::Digest(d) => {
                    // Its referrer record first: none names a manifest the repository lacks.
                    if let Some(subject) = subject_here_or_in(app, bucket, name, d).await? {
                        bucket.delete_referrer(name, &subject, d).await?;
                    }
                    bucket.unlink_manifest(name, d).await?
                }
            }
        }
        (None, _) => false,
    };
    let (found, event) = match reference {
        Reference::Tag(t) => {
            let (old, found) = block(|| -> Result<_> {
                let _tags = app.tag_writes(name);
                crate::immutable::check_tag(app, name, t, None)?;
                let old = app.layout.tag(name, t)?.map(|e| e.digest);
                Ok((old, app.layout.delete_tag(name, t)?))
            })?;
            let found = found || in_bucket;
            (
                found,
                crate::events::Event::new("delete_tag").with_text("digest", old),
            )
        }
        Reference::Digest(d) => {
            let subject = block(|| subject_of(app, d));
            let found = block(|| -> Result<bool> {
                let _tags = app.tag_writes(name);
                crate::immutable::check_manifest_delete(app, name, d)?;
                Ok(app.layout.delete_manifest(name, d)?)
            })?;
            if let (true, Some(subject)) = (found, subject) {
                block(|| app.layout.delete_referrer(name, &subject, d))?;
            }
            let found = found || in_bucket;
            (
                found,
                crate::events::Event::new("delete_manifest").with("digest", d.to_string()),
            )
        }
    };
    if !found {
        return Err(manifest_unknown(name, reference));
    }
    let event = event
        .with("repository", name.as_str())
        .with("reference", reference.to_string())
        .with("status", 202);
    crate::events::record(app, event);
    let mut r = empty();
    *r.status_mut() = StatusCode::ACCEPTED;
    set(&mut r, "content-length", "0");
    Ok(r)
}

// ---- helpers --------------------------------------------------------------------------------

fn resolve(app: &App, name: &RepoName, reference: &Reference) -> Result<ManifestEntry> {
    let entry = match reference {
        Reference::Tag(t) => block(|| app.layout.tag(name, t))?,
        Reference::Digest(d) => block(|| app.layout.manifest(name, d))?,
    };
    entry.ok_or_else(|| manifest_unknown(name, reference))
}

/// Content negotiation: the stored type if the client accepts it (or accepts anything). An index
/// or manifest list asked for by a client that only takes single manifests is answered with its
/// linux/amd64 child, as the content-negotiation table says; otherwise 404, so a mirror-aware
/// client moves on.
fn negotiate(
    app: &App,
    req: &Request<Incoming>,
    name: &RepoName,
    entry: ManifestEntry,
) -> Result<ManifestEntry> {
    let accepted: Vec<&str> = req
        .headers()
        .get_all("accept")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(media::strip_parameters)
        .filter(|t| !t.is_empty())
        .collect();
    let takes = |t: &str| accepted.contains(&t);
    if accepted.is_empty()
        || takes(&entry.media_type)
        || accepted
            .iter()
            .any(|a| matches!(*a, "*/*" | "application/*" | "application/json"))
    {
        return Ok(entry);
    }
    let refuse = || {
        ApiError::not_found(
            Code::ManifestUnknown,
            format!(
                "the manifest is {}, which the Accept header does not list",
                entry.media_type
            ),
        )
    };
    if media::manifest_kind(&entry.media_type) != Some(ManifestKind::Index) {
        return Err(refuse());
    }
    let Some(bytes) = block(|| app.layout.read_content(&entry.digest))? else {
        return Err(refuse());
    };
    let index: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let children = index["manifests"].as_array().cloned().unwrap_or_default();
    for child in children {
        let platform = &child["platform"];
        let (Some(child_type), Some(digest)) =
            (child["mediaType"].as_str(), child["digest"].as_str())
        else {
            continue;
        };
        if platform["os"] == "linux" && platform["architecture"] == "amd64" && takes(child_type) {
            let Ok(digest) = Digest::parse(digest) else {
                continue;
            };
            if let Some(e) = block(|| app.layout.manifest(name, &digest))? {
                return Ok(e);
            }
        }
    }
    Err(refuse())
}

/// Every blob (image manifest) or child manifest (index) must be in the repository already
/// (with a bucket, references pushed through another replica are adopted from it).
async fn check_references(app: &App, name: &RepoName, m: &Inspected) -> Result<()> {
    let mut missing = Vec::new();
    for d in &m.references {
        let present = block(|| reference_linked(app, name, m.kind, d))?;
        if !present {
            missing.push(d.clone());
        }
    }
    if let (Some(bucket), false) = (&app.bucket, missing.is_empty()) {
        // Pushed through another replica.
        let index = m.kind == ManifestKind::Index;
        missing = crate::bucket::adopt_references(app, bucket, name, index, missing).await?;
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(missing_references(name, m.kind, &missing))
}

/// Whether reference `d` of a manifest of `kind` is linked in the repository (blocking). With a
/// bucket, a blob link whose content this replica's cache evicted counts: the bucket holds it.
fn reference_linked(app: &App, name: &RepoName, kind: ManifestKind, d: &Digest) -> Result<bool> {
    Ok(match (kind, &app.bucket) {
        (ManifestKind::Image, Some(_)) => app.layout.blob_linked(name, d)?,
        (ManifestKind::Image, None) => app.layout.blob_size(name, d)?.is_some(),
        (ManifestKind::Index, _) => app.layout.manifest(name, d)?.is_some(),
    })
}

/// [`check_references`] again, blocking, under `App::tag_writes`: retention unlinks under that
/// lock, so what was checked before it was taken may be gone.
fn references_linked(app: &App, name: &RepoName, m: &Inspected) -> Result<()> {
    let mut missing = Vec::new();
    for d in &m.references {
        if !reference_linked(app, name, m.kind, d)? {
            missing.push(d.clone());
        }
    }
    match missing.is_empty() {
        true => Ok(()),
        false => Err(missing_references(name, m.kind, &missing)),
    }
}

/// The 400 of a manifest whose references are not in the repository.
fn missing_references(name: &RepoName, kind: ManifestKind, missing: &[Digest]) -> ApiError {
    let missing: Vec<String> = missing.iter().map(Digest::to_string).collect();
    let what = match kind {
        ManifestKind::Image => "blob",
        ManifestKind::Index => "manifest",
    };
    ApiError::bad_request(
        Code::ManifestBlobUnknown,
        format!(
            "the manifest references {what} {} that is not in repository {name}: push it first",
            missing[0]
        ),
    )
    .with_detail(serde_json::json!({ "missing": missing }))
}

/// The subject of a stored manifest, if it has one.
pub(crate) fn subject_of(app: &App, digest: &Digest) -> Option<Digest> {
    let bytes = app.layout.read_content(digest).ok()??;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Digest::parse(v["subject"]["digest"].as_str()?).ok()
}

/// The subject of a manifest of the repository, read from the cache or else the bucket.
async fn subject_here_or_in(
    app: &App,
    bucket: &crate::bucket::Bucket,
    name: &RepoName,
    digest: &Digest,
) -> Result<Option<Digest>> {
    if let Some(subject) = block(|| subject_of(app, digest)) {
        return Ok(Some(subject));
    }
    let max = app.config.manifest_size_max_bytes;
    let Some((_, bytes)) = bucket.manifest(name, digest, max).await? else {
        return Ok(None);
    };
    let v: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    Ok(v.and_then(|v| Digest::parse(v["subject"]["digest"].as_str()?).ok()))
}

fn manifest_unknown(name: &RepoName, reference: &Reference) -> ApiError {
    ApiError::not_found(
        Code::ManifestUnknown,
        format!("manifest {reference} is not in repository {name}"),
    )
}
