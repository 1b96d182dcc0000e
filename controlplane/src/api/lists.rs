//! Content discovery: tag list and catalog with `n`/`last` pagination and `Link` headers, and the
//! referrers API with `artifactType` filtering, paginated by `Link` when a subject has more than
//! `list_page_size_max` referrers. Spec: "Listing Tags", "Listing Referrers".

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use lighter_layout::{Digest, RepoName};

use super::{json, param, query, set, Response, Result};
use crate::app::{block, App};
use crate::error::{ApiError, Code};

pub async fn tags(app: &App, req: &Request<Incoming>, name: &RepoName) -> Result<Response> {
    let all = match &app.bucket {
        // Every replica's pushes, not only what this one has cached (a mirror's: its cache).
        Some(bucket) if app.mirrors.target(name, None).is_none() => {
            let tags = bucket.tag_names(name).await?;
            match tags.is_empty() && !bucket.holds_repository(name).await? {
                true => None,
                false => Some(tags),
            }
        }
        _ => block(|| app.layout.tags(name))?,
    };
    let Some(all) = all else {
        return Err(ApiError::not_found(
            Code::NameUnknown,
            format!("repository {name} is not known"),
        ));
    };
    let (page, next) = paginate(app, req, all)?;
    let body = serde_json::json!({ "name": name.as_str(), "tags": page });
    let mut r = json(StatusCode::OK, serde_json::to_vec(&body).expect("JSON"));
    if let Some((n, last)) = next {
        set(
            &mut r,
            "link",
            &format!("</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\""),
        );
    }
    Ok(r)
}

/// `may_pull` filters the list to what the caller may pull. With a bucket, its repositories
/// (every replica's pushes) and the mirrors' this replica has cached.
pub async fn catalog(
    app: &App,
    req: &Request<Incoming>,
    may_pull: impl Fn(&str) -> bool,
) -> Result<Response> {
    let mut all = block(|| app.layout.repositories())?;
    if let Some(bucket) = &app.bucket {
        all.retain(|r| RepoName::parse(r).is_ok_and(|n| app.mirrors.target(&n, None).is_some()));
        let q = query(req);
        all.extend(bucket.repositories(param(&q, "last")).await?);
        all.sort();
        all.dedup();
    }
    all.retain(|r| may_pull(r));
    let (page, next) = paginate(app, req, all)?;
    let body = serde_json::json!({ "repositories": page });
    let mut r = json(StatusCode::OK, serde_json::to_vec(&body).expect("JSON"));
    if let Some((n, last)) = next {
        set(
            &mut r,
            "link",
            &format!("</v2/_catalog?n={n}&last={last}>; rel=\"next\""),
        );
    }
    Ok(r)
}

pub async fn referrers(
    app: &App,
    req: &Request<Incoming>,
    name: &RepoName,
    subject: &Digest,
) -> Result<Response> {
    let q = query(req);
    let filter = param(&q, "artifactType");
    // Records come sorted by referrer digest, which is the pagination order; `last` is the
    // digest the previous page ended with.
    let last = param(&q, "last");
    let page_max = app.config.list_page_size_max;
    let mut manifests = Vec::new();
    let mut more = false;
    // With a bucket, its records: referrers pushed through any replica. A mirror's are local.
    let records = match &app.bucket {
        Some(bucket) if app.mirrors.target(name, None).is_none() => {
            bucket.referrers(name, subject, last).await?
        }
        _ => block(|| app.layout.referrers(name, subject))?,
    };
    for raw in records {
        let Ok(d) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            tracing::warn!(repository = %name, %subject, "skipping an unreadable referrer record");
            continue;
        };
        if filter.is_some_and(|f| d["artifactType"].as_str() != Some(f)) {
            continue;
        }
        if last.is_some_and(|l| d["digest"].as_str().is_none_or(|digest| digest <= l)) {
            continue;
        }
        if manifests.len() == page_max {
            more = true;
            break;
        }
        manifests.push(d);
    }
    let next = more.then(|| {
        manifests
            .last()
            .and_then(|d| d["digest"].as_str())
            .unwrap_or("")
            .to_owned()
    });
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": lighter_layout::media::OCI_INDEX,
        "manifests": manifests,
    });
    let mut r = json(StatusCode::OK, serde_json::to_vec(&body).expect("JSON"));
    set(&mut r, "content-type", lighter_layout::media::OCI_INDEX);
    if filter.is_some() {
        set(&mut r, "oci-filters-applied", "artifactType");
    }
    if let Some(last) = next {
        let mut target = form_urlencoded::Serializer::new(String::new());
        target.append_pair("last", &last);
        if let Some(f) = filter {
            target.append_pair("artifactType", f);
        }
        set(
            &mut r,
            "link",
            &format!(
                "</v2/{name}/referrers/{subject}?{}>; rel=\"next\"",
                target.finish()
            ),
        );
    }
    Ok(r)
}

/// One page of a sorted list: entries after `last`, at most `n` (capped at
/// `list_page_size_max`), and the `(n, last)` of the next page if entries remain.
#[allow(clippy::type_complexity)]
fn paginate(
    app: &App,
    req: &Request<Incoming>,
    all: Vec<String>,
) -> Result<(Vec<String>, Option<(usize, String)>)> {
    let q = query(req);
    let n = match param(&q, "n") {
        None => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::bad_request(
                Code::Unsupported,
                format!("n={v:?}: must be a non-negative integer"),
            )
        })?),
    };
    let start = match param(&q, "last") {
        Some(last) => all.partition_point(|x| x.as_str() <= last),
        None => 0,
    };
    let size = n.unwrap_or(usize::MAX).min(app.config.list_page_size_max);
    let end = start.saturating_add(size).min(all.len());
    let page = all[start.min(end)..end].to_vec();
    let next =
        (end < all.len() && size > 0).then(|| (size, page.last().cloned().unwrap_or_default()));
    Ok((page, next))
}
