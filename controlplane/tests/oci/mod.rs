//! OCI helpers for the spec tests: one HTTP client, a `Reply` that keeps status, headers and body
//! together for assertions, pushes of blobs and manifests, and manifest builders.
//! Every helper that pushes asserts the push succeeded, so a test reads as the steps of the spec.
#![allow(dead_code)]

use std::sync::OnceLock;

use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{self, Server};

// The media types are `common`'s, here too for the tests that take them from `oci` (not every
// test binary uses every one).
#[allow(unused_imports)]
pub use crate::common::{
    DOCKER_CONFIG, DOCKER_LAYER, DOCKER_LIST, DOCKER_MANIFEST, OCI_CONFIG, OCI_EMPTY, OCI_INDEX,
    OCI_LAYER, OCI_MANIFEST,
};

/// One client for the whole test binary (keeps connections alive between requests).
pub fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(Server::client)
}

/// A finished HTTP exchange: status, headers and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of a header that must be present (panics naming the header otherwise).
    pub fn header(&self, name: &str) -> &str {
        self.header_opt(name)
            .unwrap_or_else(|| panic!("missing header {name}; reply: {}", self.describe()))
    }

    pub fn header_opt(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header value is ASCII"))
    }

    /// Every value of a header, each comma-separated list split into items.
    pub fn header_items(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.to_str().expect("header value is ASCII").split(','))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}); reply: {}", self.describe()))
    }

    /// The strings of the JSON body's array `key` (`tags` of a tag list, `repositories` of the
    /// catalog), asserting it is one.
    pub fn strings(&self, key: &str) -> Vec<String> {
        self.json()[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is not an array: {}", self.describe()))
            .iter()
            .map(|t| t.as_str().expect("a string").to_string())
            .collect()
    }

    /// The `code` of every error in an OCI error body (`{"errors":[{"code":..,"message":..}]}`),
    /// asserting the body has that shape.
    pub fn error_codes(&self) -> Vec<String> {
        let v = self.json();
        let errors = v["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("no errors array; reply: {}", self.describe()));
        assert!(
            !errors.is_empty(),
            "empty errors array: {}",
            self.describe()
        );
        errors
            .iter()
            .map(|e| {
                let code = e["code"]
                    .as_str()
                    .unwrap_or_else(|| panic!("error without code: {}", self.describe()));
                assert!(
                    !code.is_empty() && code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                    "error code must be uppercase letters and underscores: {code:?}"
                );
                if let Some(m) = e.get("message") {
                    assert!(
                        m.is_string(),
                        "message must be a string: {}",
                        self.describe()
                    );
                }
                code.to_string()
            })
            .collect()
    }

    /// Asserts status and that the first error code is `code`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status; reply: {}", self.describe());
        let codes = self.error_codes();
        assert_eq!(codes[0], code, "error code; reply: {}", self.describe());
    }

    pub fn assert_status(&self, status: u16) -> &Reply {
        assert_eq!(self.status, status, "status; reply: {}", self.describe());
        self
    }

    /// Status, headers and (up to 1 KiB of) body, for failure messages.
    pub fn describe(&self) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(1024)]).into_owned();
        format!("{} {:?} body={body:?}", self.status, self.headers)
    }
}

/// Sends and reads the whole reply.
pub fn send(rb: RequestBuilder) -> Reply {
    let resp = rb.send().expect("request failed at the transport level");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().expect("read body").to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

pub fn request(server: &Server, method: Method, path: &str) -> RequestBuilder {
    client().request(method, server.url(path))
}

pub fn get(server: &Server, path: &str) -> Reply {
    send(request(server, Method::GET, path))
}

pub fn head(server: &Server, path: &str) -> Reply {
    send(request(server, Method::HEAD, path))
}

pub fn delete(server: &Server, path: &str) -> Reply {
    send(request(server, Method::DELETE, path))
}

/// `POST` without a body.
pub fn post(server: &Server, path: &str) -> Reply {
    send(request(server, Method::POST, path))
}

/// GET with extra headers.
pub fn get_with(server: &Server, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut rb = request(server, Method::GET, path);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    send(rb)
}

/// A `Location` (relative or absolute) as a full URL on this server.
pub fn location_url(server: &Server, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else {
        assert!(location.starts_with('/'), "Location {location:?}");
        server.url(location)
    }
}

/// The path part of a `Location` (relative or absolute), without its query string.
pub fn location_path(location: &str) -> String {
    let without_scheme = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"));
    let path = match without_scheme {
        Some(rest) => &rest[rest.find('/').unwrap_or(rest.len())..],
        None => location,
    };
    path.split('?').next().unwrap().to_string()
}

/// `url` plus a query parameter, whether or not it already has a query string.
pub fn with_query(url: &str, query: &str) -> String {
    if url.contains('?') {
        format!("{url}&{query}")
    } else {
        format!("{url}?{query}")
    }
}

/// `sha512:<hex>` of bytes.
pub fn sha512(bytes: &[u8]) -> String {
    use sha2::Digest;
    let mut hex = String::with_capacity(135);
    hex.push_str("sha512:");
    for b in sha2::Sha512::digest(bytes) {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The requests of the spec's push and pull flows, built but not sent, so a test can add a
/// header, a credential (`Cred::apply`) or a streamed body before it sends one. The functions
/// of the same name in `oci` send them.
pub mod req {
    use reqwest::blocking::{Body, RequestBuilder};
    use reqwest::Method;

    use super::{client, location_url, with_query};
    use crate::common::Server;

    /// `POST /v2/<repo>/blobs/uploads/?<query>` without a body: opens an upload session, or
    /// mounts with `query` `mount=<digest>&from=<repo>` (`query` empty: no query string).
    pub fn open_upload(server: &Server, repo: &str, query: &str) -> RequestBuilder {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        client()
            .post(server.url(&format!("/v2/{repo}/blobs/uploads/{query}")))
            .header("Content-Length", "0")
    }

    /// `POST /v2/<repo>/blobs/uploads/?digest=<digest>` with the blob as its body: the
    /// single-POST push. `digest` is sent as given (a test may claim a wrong one).
    pub fn post_blob(
        server: &Server,
        repo: &str,
        digest: &str,
        body: impl Into<Body>,
    ) -> RequestBuilder {
        client()
            .post(server.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(body)
    }

    /// `PATCH <location>` with `body` appended at the session's end (no `Content-Range`).
    pub fn patch_upload(server: &Server, location: &str, body: impl Into<Body>) -> RequestBuilder {
        client()
            .patch(location_url(server, location))
            .header("Content-Type", "application/octet-stream")
            .body(body)
    }

    /// `PATCH <location>` with `Content-Range: <start>-<end>` for `bytes`.
    pub fn patch_chunk(
        server: &Server,
        location: &str,
        start: u64,
        bytes: &[u8],
    ) -> RequestBuilder {
        let end = start + bytes.len() as u64 - 1;
        patch_upload(server, location, bytes.to_vec())
            .header("Content-Range", format!("{start}-{end}"))
    }

    /// `PUT <location>?digest=<digest>` with `body` as the final chunk: closes the session.
    pub fn put_upload(
        server: &Server,
        location: &str,
        digest: &str,
        body: impl Into<Body>,
    ) -> RequestBuilder {
        client()
            .put(with_query(
                &location_url(server, location),
                &format!("digest={digest}"),
            ))
            .header("Content-Type", "application/octet-stream")
            .body(body)
    }

    /// `GET /v2/<repo>/manifests/<reference>` with `Accept: <accept>`.
    pub fn get_manifest(
        server: &Server,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> RequestBuilder {
        manifest(server, Method::GET, repo, reference).header("Accept", accept)
    }

    /// `HEAD /v2/<repo>/manifests/<reference>` with `Accept: <accept>`.
    pub fn head_manifest(
        server: &Server,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> RequestBuilder {
        manifest(server, Method::HEAD, repo, reference).header("Accept", accept)
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `Content-Type: <media_type>`.
    pub fn put_manifest(
        server: &Server,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: impl Into<Body>,
    ) -> RequestBuilder {
        manifest(server, Method::PUT, repo, reference)
            .header("Content-Type", media_type)
            .body(body)
    }

    fn manifest(server: &Server, method: Method, repo: &str, reference: &str) -> RequestBuilder {
        super::request(server, method, &format!("/v2/{repo}/manifests/{reference}"))
    }
}

/// [`req::open_upload`], sent.
pub fn open_upload(server: &Server, repo: &str, query: &str) -> Reply {
    send(req::open_upload(server, repo, query))
}

/// [`req::post_blob`], sent.
pub fn post_blob(server: &Server, repo: &str, digest: &str, bytes: &[u8]) -> Reply {
    send(req::post_blob(server, repo, digest, bytes.to_vec()))
}

/// Pushes a blob with a single `POST ?digest=` and asserts 201. Returns its sha256 digest.
pub fn push_blob(server: &Server, repo: &str, bytes: &[u8]) -> String {
    let digest = common::sha256(bytes);
    let r = post_blob(server, repo, &digest, bytes);
    assert_eq!(r.status, 201, "push blob to {repo}: {}", r.describe());
    digest
}

/// `POST /v2/<repo>/blobs/uploads/`, asserts 202, returns the `Location`.
pub fn start_upload(server: &Server, repo: &str) -> String {
    let r = open_upload(server, repo, "");
    assert_eq!(r.status, 202, "start upload in {repo}: {}", r.describe());
    r.header("Location").to_string()
}

/// [`req::patch_chunk`], sent.
pub fn patch_chunk(server: &Server, location: &str, start: u64, bytes: &[u8]) -> Reply {
    send(req::patch_chunk(server, location, start, bytes))
}

/// [`req::put_upload`], sent: `PUT <location>?digest=<digest>` with an optional final chunk (no
/// Content-Range).
pub fn put_upload(server: &Server, location: &str, digest: &str, body: &[u8]) -> Reply {
    send(req::put_upload(server, location, digest, body.to_vec()))
}

/// Pushes a blob in chunks of `chunk` bytes (PATCH with Content-Range, then an empty PUT).
pub fn push_blob_chunked(server: &Server, repo: &str, bytes: &[u8], chunk: usize) -> String {
    let digest = common::sha256(bytes);
    let mut location = start_upload(server, repo);
    let mut offset = 0u64;
    for part in bytes.chunks(chunk) {
        let r = patch_chunk(server, &location, offset, part);
        assert_eq!(r.status, 202, "PATCH at {offset}: {}", r.describe());
        offset += part.len() as u64;
        assert_eq!(r.header("Range"), format!("0-{}", offset - 1));
        location = r.header("Location").to_string();
    }
    let r = put_upload(server, &location, &digest, b"");
    assert_eq!(r.status, 201, "closing PUT: {}", r.describe());
    digest
}

/// [`req::get_manifest`], sent.
pub fn get_manifest(server: &Server, repo: &str, reference: &str, accept: &str) -> Reply {
    send(req::get_manifest(server, repo, reference, accept))
}

/// [`req::head_manifest`], sent.
pub fn head_manifest(server: &Server, repo: &str, reference: &str, accept: &str) -> Reply {
    send(req::head_manifest(server, repo, reference, accept))
}

/// [`req::put_manifest`], sent.
pub fn put_manifest(
    server: &Server,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Reply {
    send(req::put_manifest(
        server,
        repo,
        reference,
        media_type,
        body.to_vec(),
    ))
}

/// Pushes a manifest, asserts 201, returns its digest.
pub fn push_manifest(
    server: &Server,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let r = put_manifest(server, repo, reference, media_type, body);
    assert_eq!(
        r.status,
        201,
        "push manifest {repo}:{reference}: {}",
        r.describe()
    );
    let digest = common::sha256(body);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    digest
}

/// A descriptor object.
pub fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": common::sha256(bytes), "size": bytes.len()})
}

/// An OCI image manifest (as a JSON value) over a config and layers.
pub fn image_manifest_value(config: &[u8], layers: &[&[u8]]) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect::<Vec<_>>(),
    })
}

pub fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// An image pushed by [`push_image`]: its config, layers, manifest bytes and digest.
pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

/// Pushes a config, two layers and an OCI image manifest (tagged `tag` if given, else by digest).
/// `seed` makes the content distinct.
pub fn push_image(server: &Server, repo: &str, tag: Option<&str>, seed: u64) -> Image {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let layers = vec![
        common::random_bytes(1000 + seed as usize % 1000, seed),
        common::random_bytes(3000, seed ^ 0xABCD),
    ];
    push_blob(server, repo, &config);
    for l in &layers {
        push_blob(server, repo, l);
    }
    let layer_refs: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
    let manifest = to_bytes(&image_manifest_value(&config, &layer_refs));
    let digest = common::sha256(&manifest);
    push_manifest(
        server,
        repo,
        tag.unwrap_or(&digest),
        OCI_MANIFEST,
        &manifest,
    );
    Image {
        config,
        layers,
        manifest,
        digest,
    }
}

/// Parses `Link: <url>; rel="next"` and returns the URL (path and query).
pub fn next_link(reply: &Reply) -> Option<String> {
    let link = reply.header_opt("Link")?;
    let (target, params) = link.split_once(';').expect("Link has parameters");
    assert!(
        params.replace(' ', "").contains("rel=\"next\""),
        "Link without rel=\"next\": {link}"
    );
    let target = target.trim();
    assert!(
        target.starts_with('<') && target.ends_with('>'),
        "Link target not in <>: {link}"
    );
    Some(target[1..target.len() - 1].to_string())
}

/// The status code of a raw HTTP response (`HTTP/1.1 400 ...`), or None if there is none.
pub fn raw_status(raw: &str) -> Option<u16> {
    let line = raw.lines().next()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// The `Content-Length` of a raw response head (0 without one).
pub fn raw_content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().expect("a Content-Length number"))
        })
        .unwrap_or(0)
}

/// The body of a raw HTTP response (after the blank line).
pub fn raw_body(raw: &str) -> &str {
    raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

/// The `code` of the first error in a raw response's JSON body.
pub fn raw_error_code(raw: &str) -> Option<String> {
    let body = raw_body(raw);
    let v: Value = serde_json::from_str(body).ok()?;
    v["errors"][0]["code"].as_str().map(str::to_string)
}

/// A raw `Connection: close` request without a body.
pub fn raw_request(method: &str, target: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// Asserts the server still answers `GET /v2/` with 200.
pub fn assert_alive(server: &Server) {
    let r = get(server, "/v2/");
    assert_eq!(
        r.status,
        200,
        "server stopped answering /v2/: {}",
        r.describe()
    );
}

/// Every file under `<data>/blobs/` is a complete blob: it sits at `<alg>/<hex[0..2]>/<hex>` and
/// hashes to its own name. Returns how many blobs were checked.
pub fn assert_blobs_hash_to_their_names(data: &std::path::Path) -> usize {
    let blobs = data.join("blobs");
    if !blobs.exists() {
        return 0;
    }
    let mut checked = 0;
    for alg in std::fs::read_dir(&blobs).unwrap() {
        let alg = alg.unwrap();
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        let hex_len = match alg_name.as_str() {
            "sha256" => 64,
            "sha512" => 128,
            other => panic!("unexpected entry blobs/{other}"),
        };
        assert!(
            alg.file_type().unwrap().is_dir(),
            "blobs/{alg_name} is not a directory"
        );
        for prefix in std::fs::read_dir(alg.path()).unwrap() {
            let prefix = prefix.unwrap();
            let prefix_name = prefix.file_name().to_string_lossy().into_owned();
            assert!(
                prefix.file_type().unwrap().is_dir() && prefix_name.len() == 2,
                "unexpected entry blobs/{alg_name}/{prefix_name}"
            );
            for file in std::fs::read_dir(prefix.path()).unwrap() {
                let file = file.unwrap();
                let hex = file.file_name().to_string_lossy().into_owned();
                let path = file.path();
                assert!(
                    hex.len() == hex_len && hex.starts_with(&prefix_name),
                    "unexpected file {path:?} (a temporary or misplaced file under blobs/)"
                );
                let bytes = std::fs::read(&path).unwrap();
                let actual = if hex_len == 64 {
                    common::sha256(&bytes)
                } else {
                    sha512(&bytes)
                };
                assert_eq!(
                    actual,
                    format!("{alg_name}:{hex}"),
                    "{path:?} does not hash to its name: a partial blob is visible"
                );
                checked += 1;
            }
        }
    }
    checked
}

/// A crash: SIGKILL to the server and every process under it at once (no process gets a chance to
/// clean up). Returns once every one of them has exited. The same as [`Server::kill`], named for
/// what the tests that call it mean.
pub fn crash(server: &mut Server) {
    server.kill();
}

/// Peak resident set size (`VmHWM` in /proc/<pid>/status) of one process, in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kib * 1024
}
