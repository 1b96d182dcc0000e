//! `LIGHTER_TEST_STORAGE=s3`: as a replica the harness started stops, a fresh replica over its
//! bucket (an empty data directory: everything it serves comes from the bucket) must serve what
//! the replica served: the same catalog, tag lists, manifests by tag and by digest (bytes and
//! digest), and blobs (status, size; bytes for the small ones). So every test of a suite run in
//! this mode also checks that what it left was pushed to the bucket, not only to one cache.

use super::{Launch, Server};
use std::path::Path;

/// Blobs up to this size are compared byte for byte; larger ones by `HEAD` (size, digest).
const COMPARED_BYTES_MAX: u64 = 1 << 20;
/// Most references (manifests and blobs) compared per stopping replica.
const REFERENCES_MAX: usize = 2000;
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

struct Answer {
    status: u16,
    digest: Option<String>,
    length: Option<String>,
    body: Vec<u8>,
}

fn ask(server: &Server, method: reqwest::Method, path: &str) -> Answer {
    let r = Server::client()
        .request(method, server.url(path))
        .header("accept", ACCEPT)
        .send()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (digest, length) = (header("docker-content-digest"), header("content-length"));
    let status = r.status().as_u16();
    let body = r.bytes().map(|b| b.to_vec()).unwrap_or_default();
    Answer {
        status,
        digest,
        length,
        body,
    }
}

/// A list (`repositories`, `tags`, or the digests of referrers' `manifests`) with every page
/// its `Link` headers lead to; the first page's status.
fn listing(server: &Server, first: &str, key: &str) -> (u16, Vec<String>) {
    let mut next = Some(first.to_owned());
    let (mut status, mut all) = (0, Vec::new());
    let mut pages = 0;
    while let Some(path) = next.take() {
        let r = Server::client()
            .get(server.url(&path))
            .send()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        if pages == 0 {
            status = r.status().as_u16();
        }
        next = r
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .and_then(|l| Some(l.split_once('<')?.1.split_once('>')?.0.to_owned()));
        let body = r.bytes().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        all.extend(
            v[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().or(s["digest"].as_str()).map(str::to_owned)),
        );
        pages += 1;
        assert!(pages <= 10_000, "{first}: the pages do not end");
    }
    (status, all)
}

/// The digests a manifest names: config, layers, an index's manifests, a subject.
fn references(manifest: &[u8]) -> (Vec<String>, Vec<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(manifest) else {
        return (Vec::new(), Vec::new());
    };
    let digest = |d: &serde_json::Value| d["digest"].as_str().map(str::to_owned);
    let blobs = v["config"]
        .as_object()
        .map(|_| &v["config"])
        .into_iter()
        .chain(v["layers"].as_array().into_iter().flatten())
        .filter_map(digest)
        .collect();
    let manifests = v["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(digest)
        .collect();
    (blobs, manifests)
}

/// The digests of a repository's links of one kind (`_blobs`, `_manifests`) in a data
/// directory (`repos/<name>/<kind>/<alg>/<hex>`).
fn linked(data_dir: &Path, repo: &str, kind: &str) -> Vec<String> {
    let dir = data_dir.join("repos").join(repo).join(kind);
    let mut out = Vec::new();
    for alg in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for link in std::fs::read_dir(alg.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let hex = link.file_name().to_string_lossy().into_owned();
            if !hex.starts_with('.') {
                out.push(format!("{alg_name}:{hex}"));
            }
        }
    }
    out.sort();
    out
}

/// Panics unless a fresh replica over `config`'s bucket serves what `server` serves, at once or
/// once the tag TTL has passed (a replica's concurrent pushes to one tag may leave its cache on
/// one of them and the bucket on the other until it reads the tag again).
pub fn assert_a_fresh_replica_agrees(server: &Server, config: &Path, env: &[(String, String)]) {
    let tmp = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let fresh = Launch::new(tmp.path())
        .args(&["--config", &config.display().to_string()])
        .env(&env)
        .start();
    if compare(server, &fresh).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(
            super::garage::SHARED_TAG_TTL_MS + 500,
        ));
        if let Err(why) = compare(server, &fresh) {
            panic!("{why}");
        }
    }
}

/// Checks that `fresh` answers as `server` does, else says where not.
macro_rules! agree {
    ($theirs:expr, $mine:expr, $($what:tt)+) => {{
        let (theirs, mine) = ($theirs, $mine);
        if theirs != mine {
            return Err(format!(
                "{}: a fresh replica over the bucket answers {theirs:?}, this one {mine:?}",
                format!($($what)+)
            ));
        }
    }};
}

fn compare(server: &Server, fresh: &Server) -> Result<(), String> {
    let (status, repositories) = listing(server, "/v2/_catalog", "repositories");
    assert_eq!(status, 200, "the catalog");
    agree!(
        listing(fresh, "/v2/_catalog", "repositories"),
        (status, repositories.clone()),
        "the catalog"
    );
    let mut checked = 0;
    for repo in &repositories {
        let tags_path = format!("/v2/{repo}/tags/list");
        let (status, tags) = listing(server, &tags_path, "tags");
        agree!(
            listing(fresh, &tags_path, "tags"),
            (status, tags.clone()),
            "{tags_path}"
        );
        // What the tags reach, and every link the replica's cache holds (untagged manifests,
        // blobs no manifest names).
        let mut manifests: Vec<String> = tags;
        manifests.extend(linked(&server.data_dir, repo, "_manifests"));
        let mut blobs: Vec<String> = linked(&server.data_dir, repo, "_blobs");
        while let Some(reference) = manifests.pop() {
            checked += 1;
            if checked > REFERENCES_MAX {
                return Ok(());
            }
            let path = format!("/v2/{repo}/manifests/{reference}");
            let (mine, theirs) = (
                ask(server, reqwest::Method::GET, &path),
                ask(fresh, reqwest::Method::GET, &path),
            );
            agree!(
                (theirs.status, &theirs.digest),
                (mine.status, &mine.digest),
                "{path}"
            );
            agree!(theirs.body == mine.body, true, "{path}: the same bytes");
            if let (200, Some(digest)) = (mine.status, &mine.digest) {
                let path = format!("/v2/{repo}/referrers/{digest}");
                agree!(
                    listing(fresh, &path, "manifests"),
                    listing(server, &path, "manifests"),
                    "{path}"
                );
                let (b, m) = references(&mine.body);
                blobs.extend(b);
                manifests.extend(m);
            }
        }
        blobs.sort();
        blobs.dedup();
        for d in blobs {
            checked += 1;
            if checked > REFERENCES_MAX {
                return Ok(());
            }
            let path = format!("/v2/{repo}/blobs/{d}");
            let (mine, theirs) = (
                ask(server, reqwest::Method::HEAD, &path),
                ask(fresh, reqwest::Method::HEAD, &path),
            );
            agree!(
                (theirs.status, &theirs.length, &theirs.digest),
                (mine.status, &mine.length, &mine.digest),
                "HEAD {path}"
            );
            let small = mine
                .length
                .as_deref()
                .and_then(|l| l.parse::<u64>().ok())
                .is_some_and(|l| l <= COMPARED_BYTES_MAX);
            if mine.status == 200 && small {
                let (mine, theirs) = (
                    ask(server, reqwest::Method::GET, &path),
                    ask(fresh, reqwest::Method::GET, &path),
                );
                agree!(theirs.status, mine.status, "{path}");
                agree!(theirs.body == mine.body, true, "{path}: the same bytes");
            }
        }
    }
    Ok(())
}
