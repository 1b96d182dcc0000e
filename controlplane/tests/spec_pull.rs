//! OCI Distribution Specification, "Pull": the base endpoint, blobs (whole, HEAD, ranges) and
//! manifests (by tag and digest, HEAD, content negotiation), over real sockets.

mod common;
mod oci;

use common::Server;
use oci::*;
use serde_json::json;

// spec: API / Determining Support
#[test]
fn base_endpoint_answers_200_with_api_version_header() {
    let server = Server::start();
    let r = get(&server, "/v2/");
    r.assert_status(200);
    assert_eq!(r.header("Docker-Distribution-API-Version"), "registry/2.0");
    assert_eq!(r.json(), json!({}));
}

// spec: Pull / Pulling blobs
#[test]
fn pull_blob_returns_exact_bytes_digest_and_length() {
    let server = Server::start();
    let bytes = common::random_bytes(100_003, 1);
    let digest = push_blob(&server, "pull/blob", &bytes);
    let r = get(&server, &format!("/v2/pull/blob/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body, bytes);
    assert_eq!(common::sha256(&r.body), digest);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(r.header("Content-Length"), "100003");
    assert_eq!(r.header("Content-Type"), "application/octet-stream");
    assert_eq!(r.header("Accept-Ranges"), "bytes");
}

// spec: Pull / Pulling blobs (a blob of several MiB streams whole)
#[test]
fn pull_large_blob_streams_every_byte() {
    let server = Server::start();
    let bytes = common::random_bytes(8 * 1024 * 1024 + 7, 2);
    let digest = push_blob(&server, "big", &bytes);
    let r = get(&server, &format!("/v2/big/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body.len(), bytes.len());
    assert_eq!(common::sha256(&r.body), digest);
}

// spec: Pull / Checking if content exists in the registry
#[test]
fn head_blob_has_digest_and_length_and_no_body() {
    let server = Server::start();
    let bytes = common::random_bytes(4321, 3);
    let digest = push_blob(&server, "headrepo", &bytes);
    let r = head(&server, &format!("/v2/headrepo/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(r.header("Content-Length"), "4321");
    assert!(r.body.is_empty());
}

// spec: Pull / Pulling blobs ("If the blob is not found in the repository ... 404")
#[test]
fn pull_unknown_blob_is_404_blob_unknown() {
    let server = Server::start();
    push_blob(&server, "known", b"something");
    let missing = common::sha256(b"never pushed");
    get(&server, &format!("/v2/known/blobs/{missing}")).assert_error(404, "BLOB_UNKNOWN");
    head(&server, &format!("/v2/known/blobs/{missing}")).assert_status(404);
    // Unknown repository too.
    get(&server, &format!("/v2/nowhere/blobs/{missing}")).assert_error(404, "BLOB_UNKNOWN");
}

// spec: Pull / Pulling blobs ("not found in the repository"): blobs are scoped to repositories
#[test]
fn pull_blob_pushed_to_another_repository_is_404() {
    let server = Server::start();
    let bytes = b"only in repo a".to_vec();
    let digest = push_blob(&server, "scope/a", &bytes);
    push_blob(&server, "scope/b", b"b has something else");
    get(&server, &format!("/v2/scope/a/blobs/{digest}")).assert_status(200);
    get(&server, &format!("/v2/scope/b/blobs/{digest}")).assert_error(404, "BLOB_UNKNOWN");
    head(&server, &format!("/v2/scope/b/blobs/{digest}")).assert_status(404);
    // A prefix of the name is another repository as well.
    get(&server, &format!("/v2/scope/blobs/{digest}")).assert_error(404, "BLOB_UNKNOWN");
}

// spec: Pull / Pulling blobs (empty blobs are blobs)
#[test]
fn pull_empty_blob_is_200_with_zero_length() {
    let server = Server::start();
    let digest = push_blob(&server, "empty", b"");
    assert_eq!(
        digest,
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let r = get(&server, &format!("/v2/empty/blobs/{digest}"));
    r.assert_status(200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("Content-Length"), "0");
    assert_eq!(r.header("Docker-Content-Digest"), digest);
}

fn blob_of_100(server: &Server) -> (Vec<u8>, String) {
    let bytes: Vec<u8> = (0u8..100).collect();
    let digest = push_blob(server, "ranges", &bytes);
    (bytes, format!("/v2/ranges/blobs/{digest}"))
}

// spec: Pull / Pulling blobs ("SHOULD support the Range request header", RFC 9110 section 14)
#[test]
fn pull_blob_closed_range_is_206_with_content_range() {
    let server = Server::start();
    let (bytes, path) = blob_of_100(&server);
    let r = get_with(&server, &path, &[("Range", "bytes=10-19")]);
    r.assert_status(206);
    assert_eq!(r.body, &bytes[10..20]);
    assert_eq!(r.header("Content-Range"), "bytes 10-19/100");
    assert_eq!(r.header("Content-Length"), "10");
}

// spec: Pull / Pulling blobs (Range `bytes=a-`, how a client resumes)
#[test]
fn pull_blob_open_ended_range_is_206_to_the_end() {
    let server = Server::start();
    let (bytes, path) = blob_of_100(&server);
    let r = get_with(&server, &path, &[("Range", "bytes=60-")]);
    r.assert_status(206);
    assert_eq!(r.body, &bytes[60..]);
    assert_eq!(r.header("Content-Range"), "bytes 60-99/100");
}

// spec: Pull / Pulling blobs (Range `bytes=-n`: the last n bytes)
#[test]
fn pull_blob_suffix_range_is_206_with_last_bytes() {
    let server = Server::start();
    let (bytes, path) = blob_of_100(&server);
    let r = get_with(&server, &path, &[("Range", "bytes=-7")]);
    r.assert_status(206);
    assert_eq!(r.body, &bytes[93..]);
    assert_eq!(r.header("Content-Range"), "bytes 93-99/100");
    // A suffix longer than the blob is the whole blob.
    let r = get_with(&server, &path, &[("Range", "bytes=-500")]);
    r.assert_status(206);
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("Content-Range"), "bytes 0-99/100");
}

// spec: Pull / Pulling blobs (RFC 9110 14.1.2: a last-pos past the end is clamped)
#[test]
fn pull_blob_range_past_the_end_is_clamped() {
    let server = Server::start();
    let (bytes, path) = blob_of_100(&server);
    let r = get_with(&server, &path, &[("Range", "bytes=90-1000")]);
    r.assert_status(206);
    assert_eq!(r.body, &bytes[90..]);
    assert_eq!(r.header("Content-Range"), "bytes 90-99/100");
    // The last byte alone.
    let r = get_with(&server, &path, &[("Range", "bytes=99-99")]);
    r.assert_status(206);
    assert_eq!(r.body, &bytes[99..]);
    assert_eq!(r.header("Content-Range"), "bytes 99-99/100");
}

// spec: Pull / Pulling blobs (RFC 9110 15.5.17: 416 with `Content-Range: bytes */len`)
#[test]
fn pull_blob_unsatisfiable_range_is_416_with_star_content_range() {
    let server = Server::start();
    let (_, path) = blob_of_100(&server);
    // An inverted range too: the OCI conformance suite expects 416 for `bytes=500-0`.
    for range in [
        "bytes=100-",
        "bytes=100-200",
        "bytes=5000-5001",
        "bytes=9-3",
        "bytes=50-0",
    ] {
        let r = get_with(&server, &path, &[("Range", range)]);
        assert_eq!(r.status, 416, "{range}: {}", r.describe());
        assert_eq!(r.header("Content-Range"), "bytes */100", "{range}");
    }
}

// spec: Pull / Pulling blobs (RFC 9110 14.2: a malformed Range is ignored, the whole blob is sent)
#[test]
fn pull_blob_malformed_range_is_ignored_with_200() {
    let server = Server::start();
    let (bytes, path) = blob_of_100(&server);
    for range in ["bytes=abc", "items=0-5", "bytes=3-x"] {
        let r = get_with(&server, &path, &[("Range", range)]);
        assert_eq!(r.status, 200, "{range}: {}", r.describe());
        assert_eq!(r.body, bytes, "{range}");
    }
}

// spec: Pull / Pulling manifests
#[test]
fn pull_manifest_by_tag_and_by_digest_returns_exact_bytes() {
    let server = Server::start();
    let img = push_image(&server, "library/app", Some("v1"), 10);
    for reference in ["v1", img.digest.as_str()] {
        let r = get(&server, &format!("/v2/library/app/manifests/{reference}"));
        r.assert_status(200);
        assert_eq!(r.body, img.manifest, "{reference}");
        assert_eq!(r.header("Content-Type"), OCI_MANIFEST);
        assert_eq!(r.header("Docker-Content-Digest"), img.digest);
        assert_eq!(r.header("Content-Length"), img.manifest.len().to_string());
    }
}

// spec: Pull / Pulling manifests ("MUST store the manifest in the exact byte representation")
#[test]
fn pull_manifest_keeps_whitespace_and_key_order_of_the_push() {
    let server = Server::start();
    let config = b"{}".to_vec();
    push_blob(&server, "exact", &config);
    let body = format!(
        "{{\n  \"schemaVersion\" : 2,\n\t\"config\": {{\"size\": 2, \"digest\": \"{}\", \"mediaType\": \"{OCI_CONFIG}\"}},\n  \"layers\": [],\n  \"mediaType\": \"{OCI_MANIFEST}\"\n}}\n\n",
        common::sha256(&config)
    )
    .into_bytes();
    let digest = push_manifest(&server, "exact", "pretty", OCI_MANIFEST, &body);
    let r = get(&server, "/v2/exact/manifests/pretty");
    r.assert_status(200);
    assert_eq!(r.body, body);
    assert_eq!(common::sha256(&r.body), digest);
}

// spec: Pull / Checking if content exists in the registry (what containerd resolves a tag with)
#[test]
fn head_manifest_has_digest_type_and_length_and_no_body() {
    let server = Server::start();
    let img = push_image(&server, "headm", Some("latest"), 11);
    for reference in ["latest", img.digest.as_str()] {
        let r = head(&server, &format!("/v2/headm/manifests/{reference}"));
        r.assert_status(200);
        assert_eq!(r.header("Docker-Content-Digest"), img.digest);
        assert_eq!(r.header("Content-Type"), OCI_MANIFEST);
        assert_eq!(r.header("Content-Length"), img.manifest.len().to_string());
        assert!(r.body.is_empty());
    }
}

// spec: Pull / Pulling manifests ("If the manifest is not found in the repository ... 404")
#[test]
fn pull_unknown_manifest_is_404_manifest_unknown() {
    let server = Server::start();
    let img = push_image(&server, "has", Some("v1"), 12);
    let missing = common::sha256(b"no such manifest");
    for path in [
        "/v2/has/manifests/v2".to_string(),
        format!("/v2/has/manifests/{missing}"),
        "/v2/nosuchrepo/manifests/v1".to_string(),
        format!("/v2/nosuchrepo/manifests/{}", img.digest),
        // A blob digest is not a manifest.
        format!("/v2/has/manifests/{}", common::sha256(&img.layers[0])),
    ] {
        get(&server, &path).assert_error(404, "MANIFEST_UNKNOWN");
        head(&server, &path).assert_status(404);
    }
}

// spec: Pull / Pulling manifests ("not found in the repository"): manifests are scoped too
#[test]
fn pull_manifest_pushed_to_another_repository_is_404() {
    let server = Server::start();
    let img = push_image(&server, "one", Some("v1"), 13);
    push_image(&server, "two", Some("other"), 14);
    get(&server, &format!("/v2/two/manifests/{}", img.digest))
        .assert_error(404, "MANIFEST_UNKNOWN");
    get(&server, "/v2/two/manifests/v1").assert_error(404, "MANIFEST_UNKNOWN");
}

// spec: Pull / Pulling manifests (Docker schema 2 types round-trip with their Content-Type)
#[test]
fn pull_docker_schema2_manifest_keeps_its_content_type() {
    let server = Server::start();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = common::random_bytes(2000, 15);
    push_blob(&server, "docker", &config);
    push_blob(&server, "docker", &layer);
    let manifest = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, &config),
        "layers": [descriptor(DOCKER_LAYER, &layer)],
    }));
    let digest = push_manifest(&server, "docker", "v1", DOCKER_MANIFEST, &manifest);
    for reference in ["v1", digest.as_str()] {
        let r = get_manifest(&server, "docker", reference, DOCKER_MANIFEST);
        r.assert_status(200);
        assert_eq!(r.header("Content-Type"), DOCKER_MANIFEST);
        assert_eq!(r.body, manifest);
    }
}

// spec: Pull / Pulling manifests (names may have many components and contain route words)
#[test]
fn pull_from_names_with_route_words_and_many_components() {
    let server = Server::start();
    for repo in [
        "a/b/c/d/e",
        "blobs/manifests",
        "v2/tags/list/x",
        "my-org/my_app.x__y",
    ] {
        let img = push_image(&server, repo, Some("t"), 16);
        let r = get(&server, &format!("/v2/{repo}/manifests/t"));
        r.assert_status(200);
        assert_eq!(r.body, img.manifest, "{repo}");
        let layer_digest = common::sha256(&img.layers[0]);
        let r = get(&server, &format!("/v2/{repo}/blobs/{layer_digest}"));
        r.assert_status(200);
        assert_eq!(r.body, img.layers[0], "{repo}");
    }
}

/// A multi-platform index over an amd64 and an arm64 image, pushed as `multi:<tag>`.
struct Multi {
    amd64: Image,
    arm64: Image,
    index: Vec<u8>,
    index_digest: String,
}

fn push_index(server: &Server, repo: &str, tag: &str, media_type: &str, with_amd64: bool) -> Multi {
    let amd64 = push_image(server, repo, None, 20);
    let arm64 = push_image(server, repo, None, 21);
    let platform = |img: &Image, arch: &str| {
        json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.digest,
            "size": img.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let mut manifests = vec![platform(&arm64, "arm64")];
    if with_amd64 {
        manifests.push(platform(&amd64, "amd64"));
    }
    let index = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    }));
    let index_digest = push_manifest(server, repo, tag, media_type, &index);
    Multi {
        amd64,
        arm64,
        index,
        index_digest,
    }
}

// spec: Pull / Pulling manifests (content negotiation, content-negotiation.md: a single-manifest
// client asking for a multi-platform image gets the linux/amd64 manifest)
#[test]
fn pull_index_accepting_only_image_manifests_serves_linux_amd64_child() {
    let server = Server::start();
    let m = push_index(&server, "multi", "v1", OCI_INDEX, true);
    let r = get_manifest(&server, "multi", "v1", OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.body, m.amd64.manifest);
    assert_eq!(r.header("Content-Type"), OCI_MANIFEST);
    assert_eq!(r.header("Docker-Content-Digest"), m.amd64.digest);
    assert_ne!(r.body, m.arm64.manifest);
    // By digest too.
    let r = get_manifest(&server, "multi", &m.index_digest, OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.body, m.amd64.manifest);
}

// spec: Pull / Pulling manifests (content negotiation: an Accept listing the index type gets it)
#[test]
fn pull_index_accepting_index_serves_the_index() {
    let server = Server::start();
    let m = push_index(&server, "multi", "v1", OCI_INDEX, true);
    for accept in [
        OCI_INDEX.to_string(),
        format!("{OCI_MANIFEST}, {OCI_INDEX}"),
        format!("{OCI_INDEX}, {OCI_MANIFEST}"),
    ] {
        let r = get_manifest(&server, "multi", "v1", &accept);
        r.assert_status(200);
        assert_eq!(r.body, m.index, "Accept: {accept}");
        assert_eq!(r.header("Content-Type"), OCI_INDEX);
        assert_eq!(r.header("Docker-Content-Digest"), m.index_digest);
    }
    // Several Accept header lines are one list.
    let r =
        send(req::get_manifest(&server, "multi", "v1", OCI_MANIFEST).header("Accept", OCI_INDEX));
    r.assert_status(200);
    assert_eq!(r.body, m.index);
}

// spec: Pull / Pulling manifests (content negotiation: no Accept or */* gets the stored type)
#[test]
fn pull_index_with_wildcard_or_without_accept_serves_the_index() {
    let server = Server::start();
    let m = push_index(&server, "multi", "v1", OCI_INDEX, true);
    for accept in ["*/*", "application/*"] {
        let r = get_manifest(&server, "multi", "v1", accept);
        r.assert_status(200);
        assert_eq!(r.body, m.index, "Accept: {accept}");
        assert_eq!(r.header("Content-Type"), OCI_INDEX);
    }
    // No Accept header at all, on a raw request (reqwest always sends one).
    let raw = server.raw(&raw_request("GET", "/v2/multi/manifests/v1"));
    assert_eq!(raw_status(&raw), Some(200), "{raw}");
    assert!(raw_body(&raw).as_bytes() == m.index.as_slice(), "{raw}");
}

// spec: Pull / Pulling manifests (content negotiation: no linux/amd64 child → 404)
#[test]
fn pull_index_without_amd64_child_accepting_only_manifests_is_404() {
    let server = Server::start();
    push_index(&server, "armonly", "v1", OCI_INDEX, false);
    get_manifest(&server, "armonly", "v1", OCI_MANIFEST).assert_error(404, "MANIFEST_UNKNOWN");
    // The index itself is still there for a client that accepts it.
    get_manifest(&server, "armonly", "v1", OCI_INDEX).assert_status(200);
}

// spec: Pull / Pulling manifests (content negotiation with Docker manifest lists)
#[test]
fn pull_docker_manifest_list_accepting_schema2_serves_amd64_child() {
    let server = Server::start();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = common::random_bytes(500, 22);
    push_blob(&server, "dlist", &config);
    push_blob(&server, "dlist", &layer);
    let child = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, &config),
        "layers": [descriptor(DOCKER_LAYER, &layer)],
    }));
    let child_digest = push_manifest(
        &server,
        "dlist",
        &common::sha256(&child),
        DOCKER_MANIFEST,
        &child,
    );
    let list = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [{
            "mediaType": DOCKER_MANIFEST,
            "digest": child_digest,
            "size": child.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }));
    push_manifest(&server, "dlist", "latest", DOCKER_LIST, &list);
    let r = get_manifest(&server, "dlist", "latest", DOCKER_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.body, child);
    assert_eq!(r.header("Content-Type"), DOCKER_MANIFEST);
    assert_eq!(r.header("Docker-Content-Digest"), child_digest);
    let r = get_manifest(
        &server,
        "dlist",
        "latest",
        &format!("{DOCKER_LIST}, {DOCKER_MANIFEST}"),
    );
    r.assert_status(200);
    assert_eq!(r.body, list);
    assert_eq!(r.header("Content-Type"), DOCKER_LIST);
}

// spec: Pull / Checking if content exists (containerd resolves a multi-platform tag with HEAD and
// an Accept of single-manifest types)
#[test]
fn head_index_accepting_only_image_manifests_describes_the_amd64_child() {
    let server = Server::start();
    let m = push_index(&server, "multi", "v1", OCI_INDEX, true);
    let r = head_manifest(&server, "multi", "v1", OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.header("Docker-Content-Digest"), m.amd64.digest);
    assert_eq!(r.header("Content-Type"), OCI_MANIFEST);
    assert_eq!(
        r.header("Content-Length"),
        m.amd64.manifest.len().to_string()
    );
    assert!(r.body.is_empty());
}

// spec: Pull / Pulling manifests (content negotiation picks linux/amd64, not any amd64)
#[test]
fn pull_index_picks_linux_amd64_over_other_os_and_arch() {
    let server = Server::start();
    let windows = push_image(&server, "plat", None, 23);
    let linux = push_image(&server, "plat", None, 24);
    let arm = push_image(&server, "plat", None, 25);
    let entry = |img: &Image, os: &str, arch: &str| {
        json!({"mediaType": OCI_MANIFEST, "digest": img.digest, "size": img.manifest.len(),
               "platform": {"architecture": arch, "os": os}})
    };
    let index = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry(&windows, "windows", "amd64"), entry(&arm, "linux", "arm64"),
                      entry(&linux, "linux", "amd64")],
    }));
    push_manifest(&server, "plat", "v1", OCI_INDEX, &index);
    let r = get_manifest(&server, "plat", "v1", OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.header("Docker-Content-Digest"), linux.digest);
    assert_eq!(r.body, linux.manifest);
}

// spec: Pull / Pulling blobs (field notes: clients send Accept-Encoding and expect the stored bytes)
#[test]
fn pull_blob_with_accept_encoding_returns_stored_bytes_unencoded() {
    let server = Server::start();
    let bytes = vec![b'a'; 100_000];
    let digest = push_blob(&server, "enc", &bytes);
    let r = get_with(
        &server,
        &format!("/v2/enc/blobs/{digest}"),
        &[("Accept-Encoding", "gzip, zstd, deflate")],
    );
    r.assert_status(200);
    assert!(
        r.header_opt("Content-Encoding").is_none(),
        "{}",
        r.describe()
    );
    assert_eq!(r.body, bytes);
}

// spec: Pull / Pulling blobs (field notes: large layers are fetched in parallel ranges)
#[test]
fn pull_blob_in_parallel_ranges_reassembles_exactly() {
    let server = Server::start();
    let bytes = common::random_bytes(8 * 1024 * 1024 + 3, 26);
    let digest = push_blob(&server, "parallel", &bytes);
    let parts = 8;
    let part = bytes.len().div_ceil(parts);
    let path = format!("/v2/parallel/blobs/{digest}");
    let mut assembled = vec![0u8; bytes.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..parts)
            .map(|i| {
                let (server, path) = (&server, &path);
                let start = i * part;
                let end = ((i + 1) * part).min(bytes.len()) - 1;
                scope.spawn(move || {
                    let r = get_with(server, path, &[("Range", &format!("bytes={start}-{end}"))]);
                    r.assert_status(206);
                    assert_eq!(
                        r.header("Content-Range"),
                        format!("bytes {start}-{end}/{}", 8 * 1024 * 1024 + 3)
                    );
                    (start, r.body)
                })
            })
            .collect();
        for h in handles {
            let (start, body) = h.join().unwrap();
            assembled[start..start + body.len()].copy_from_slice(&body);
        }
    });
    assert!(assembled == bytes, "ranges do not reassemble the blob");
}

/// Reads one HTTP/1.1 response per entry of `heads` (true: the answer to a HEAD, no body) from one
/// connection, fewer if it closes; returns (status, head, body) of each.
fn read_responses(stream: &mut std::net::TcpStream, heads: &[bool]) -> Vec<(u16, String, Vec<u8>)> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    for (i, &is_head) in heads.iter().enumerate() {
        let mut reads = 0;
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len = raw_content_length(&head);
                let body_len = if is_head { 0 } else { len };
                if buf.len() >= end + 4 + body_len {
                    let status = raw_status(&head).expect("status line");
                    let body = buf[end + 4..end + 4 + body_len].to_vec();
                    buf.drain(..end + 4 + body_len);
                    out.push((status, head, body));
                    break;
                }
            }
            reads += 1;
            assert!(reads < 10_000, "response {i} never completed");
            let n = stream.read(&mut chunk).expect("read response");
            if n == 0 {
                return out;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    out
}

// RFC 9112 section 9.3.2 (pipelining): responses come back in order on one connection, HEAD
// responses carry no body, and an error response does not desynchronise the connection
#[test]
fn pipelined_requests_on_one_connection_are_answered_in_order() {
    use std::io::Write;
    let server = Server::start();
    let img = push_image(&server, "pipe", Some("v1"), 27);
    let layer = &img.layers[0];
    let layer_digest = common::sha256(layer);
    let missing = common::sha256(b"missing");
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let requests = [
        ("GET", "/v2/".to_string()),
        ("HEAD", format!("/v2/pipe/blobs/{layer_digest}")),
        ("GET", format!("/v2/pipe/blobs/{missing}")),
        ("GET", format!("/v2/pipe/blobs/{layer_digest}")),
        ("HEAD", "/v2/pipe/manifests/v1".to_string()),
        ("GET", "/v2/pipe/manifests/v1".to_string()),
    ];
    let mut all = Vec::new();
    for (method, path) in &requests {
        all.extend_from_slice(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAccept: {OCI_MANIFEST}\r\n\r\n")
                .as_bytes(),
        );
    }
    stream.write_all(&all).unwrap();
    let heads: Vec<bool> = requests.iter().map(|(m, _)| *m == "HEAD").collect();
    let responses = read_responses(&mut stream, &heads);
    assert_eq!(
        responses.len(),
        requests.len(),
        "connection closed early: {responses:?}"
    );
    let statuses: Vec<u16> = responses.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [200, 200, 404, 200, 200, 200]);
    assert_eq!(responses[3].2, *layer);
    assert_eq!(responses[5].2, img.manifest);
}

// RFC 9112 section 9.6: a server that closes a connection after a response says so with
// `Connection: close`; otherwise the next request on the connection must be answered
#[test]
fn request_refused_before_its_body_is_read_does_not_desynchronise_the_connection() {
    use std::io::Write;
    let server = Server::start();
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // A request refused before its body is read (malformed digest): the server either reads past
    // the body and answers the next request, or says `Connection: close` and closes.
    let body = vec![b'z'; 100_000];
    let bad = format!(
        "POST /v2/pipe/blobs/uploads/?digest=sha256:xyz HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(bad.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let refused = read_responses(&mut stream, &[false]);
    assert_eq!(refused.len(), 1, "no answer to the refused request");
    assert_eq!(refused[0].0, 400, "{:?}", refused[0].1);
    let head = refused[0].1.to_ascii_lowercase();
    if !head.contains("connection: close") {
        let next = read_responses(&mut stream, &[false]);
        assert_eq!(
            next.len(),
            1,
            "the server closed the connection after its 400 without `Connection: close`: {head:?}"
        );
        assert_eq!(next[0].0, 200, "{:?}", next[0].1);
        assert_eq!(next[0].2, b"{}");
    }
}

// spec: Registry Proxying ("A registry MAY choose to ignore the ns query parameter"; one that uses
// it "SHOULD return the ns query parameter value in the OCI-Namespace header"). containerd appends
// `?ns=<registry>` to every request it sends to a mirror.
#[test]
fn pull_with_ns_query_parameter_is_served_or_scoped_with_oci_namespace() {
    let server = Server::start();
    let img = push_image(&server, "library/ns", Some("v1"), 28);
    let layer_digest = common::sha256(&img.layers[0]);
    for (path, body) in [
        (
            "/v2/library/ns/manifests/v1?ns=docker.io".to_string(),
            &img.manifest,
        ),
        (
            format!("/v2/library/ns/blobs/{layer_digest}?ns=docker.io"),
            &img.layers[0],
        ),
    ] {
        let r = get(&server, &path);
        match r.header_opt("OCI-Namespace") {
            // ns ignored: the local repository answers.
            None => {
                r.assert_status(200);
                assert_eq!(&r.body, body, "{path}");
            }
            Some(ns) => assert_eq!(ns, "docker.io", "{path}"),
        }
    }
}

/// Sends `request` on a fresh connection and returns the whole answer (the server closes).
fn raw_exchange(server: &Server, request: &str) -> String {
    server.raw(request.as_bytes())
}

// RFC 9112 section 2.3 / 9.3: an HTTP/1.0 request is answered (and the connection then closed)
#[test]
fn http_1_0_request_is_answered() {
    let server = Server::start();
    let raw = raw_exchange(&server, "GET /v2/ HTTP/1.0\r\n\r\n");
    assert_eq!(raw_status(&raw), Some(200), "{raw}");
    assert_eq!(raw_body(&raw), "{}");
}

// RFC 9110 section 5.1: header field names are case-insensitive, values are trimmed
#[test]
fn header_names_are_case_insensitive_and_values_trimmed() {
    let server = Server::start();
    let (bytes, path) = blob_of_100(&server);
    let raw = raw_exchange(
        &server,
        &format!(
            "GET {path} HTTP/1.1\r\nHOST: x\r\nrAnGe:   bytes=3-5  \r\nCONNECTION: close\r\n\r\n"
        ),
    );
    assert_eq!(raw_status(&raw), Some(206), "{raw}");
    assert_eq!(raw_body(&raw).as_bytes(), &bytes[3..6]);
    let img = push_image(&server, "case", Some("v1"), 29);
    let raw = raw_exchange(
        &server,
        &format!("HEAD /v2/case/manifests/v1 HTTP/1.1\r\nhost: x\r\nACCEPT: {OCI_MANIFEST}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(raw_status(&raw), Some(200), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains(&format!("docker-content-digest: {}", img.digest)),
        "{raw}"
    );
}

// spec: Pull (many clients at once: every one gets the exact bytes)
#[test]
fn many_concurrent_pulls_all_get_exact_bytes() {
    let server = Server::start();
    let img = push_image(&server, "busy", Some("v1"), 30);
    let big = common::random_bytes(2 * 1024 * 1024, 31);
    let big_digest = push_blob(&server, "busy", &big);
    std::thread::scope(|scope| {
        for t in 0..32 {
            let (server, img, big, big_digest) = (&server, &img, &big, &big_digest);
            scope.spawn(move || {
                for i in 0..10 {
                    if (t + i) % 3 == 0 {
                        let r = get(server, &format!("/v2/busy/blobs/{big_digest}"));
                        r.assert_status(200);
                        assert!(r.body == *big, "thread {t} request {i}: blob differs");
                    } else {
                        let r = get(server, "/v2/busy/manifests/v1");
                        r.assert_status(200);
                        assert_eq!(r.body, img.manifest, "thread {t} request {i}");
                    }
                }
            });
        }
    });
}

// spec: Pull / Pulling manifests (content negotiation with the Accept lists real clients send:
// containerd's list, Docker's one header per type, and q-values, which are parameters)
#[test]
fn pull_index_with_real_client_accept_lists_serves_the_index() {
    let server = Server::start();
    let m = push_index(&server, "multi", "v1", OCI_INDEX, true);
    let containerd = format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*");
    let with_q = format!("{OCI_MANIFEST};q=0.9, {OCI_INDEX};q=0.5");
    for accept in [containerd.as_str(), with_q.as_str()] {
        let r = get_manifest(&server, "multi", "v1", accept);
        r.assert_status(200);
        assert_eq!(r.body, m.index, "Accept: {accept}");
        assert_eq!(r.header("Content-Type"), OCI_INDEX);
    }
    let mut rb = request(&server, reqwest::Method::GET, "/v2/multi/manifests/v1");
    for t in [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX] {
        rb = rb.header("Accept", t);
    }
    let r = send(rb);
    r.assert_status(200);
    assert_eq!(r.body, m.index);
}
