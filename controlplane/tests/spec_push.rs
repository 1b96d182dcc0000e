//! OCI Distribution Specification, "Push": blob uploads (monolithic, single POST, chunked,
//! cancelled, mounted, sha512) and manifest pushes (by tag, by digest, with tags, with subject,
//! and the checks a registry makes before accepting one).

mod common;
mod oci;

use std::io::Read;

use common::Server;
use oci::*;
use serde_json::json;

fn assert_upload_location(location: &str, repo: &str) -> String {
    let path = location_path(location);
    let prefix = format!("/v2/{repo}/blobs/uploads/");
    assert!(
        path.starts_with(&prefix) && path.len() > prefix.len(),
        "upload Location {location:?} is not under {prefix}"
    );
    path[prefix.len()..].to_string()
}

// spec: Push / Pushing a blob monolithically / POST then PUT
#[test]
fn push_post_then_put_is_201_and_blob_is_pullable() {
    let server = Server::start();
    let r = open_upload(&server, "push/mono", "");
    r.assert_status(202);
    let location = r.header("Location").to_string();
    assert!(
        location.starts_with("/v2/"),
        "Location is relative: {location}"
    );
    let id = assert_upload_location(&location, "push/mono");
    assert_eq!(r.header("Docker-Upload-UUID"), id);
    assert_eq!(r.header("Range"), "0-0");

    let bytes = common::random_bytes(70_000, 30);
    let digest = common::sha256(&bytes);
    let r = send(
        req::put_upload(&server, &location, &digest, bytes.clone())
            .header("Content-Length", bytes.len().to_string()),
    );
    r.assert_status(201);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/push/mono/blobs/{digest}")
    );
    assert_eq!(r.header("Docker-Content-Digest"), digest);

    let got = get(&server, &location_path(r.header("Location")));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
    // The session is closed by the PUT.
    get(&server, &location_path(&location)).assert_error(404, "BLOB_UPLOAD_UNKNOWN");
}

// spec: Push / Pushing a blob monolithically / Single POST
#[test]
fn push_single_post_with_digest_is_201_with_location() {
    let server = Server::start();
    let bytes = common::random_bytes(12_345, 31);
    let digest = common::sha256(&bytes);
    let r = post_blob(&server, "single", &digest, &bytes);
    r.assert_status(201);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/single/blobs/{digest}")
    );
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    let got = get(&server, &format!("/v2/single/blobs/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
}

// spec: Push / Pushing a blob monolithically / Single POST ("the <digest> MUST match")
#[test]
fn push_single_post_with_wrong_digest_is_400_digest_invalid_and_not_visible() {
    let server = Server::start();
    let bytes = common::random_bytes(5000, 32);
    let claimed = common::sha256(b"something else");
    let r = post_blob(&server, "wrong", &claimed, &bytes);
    r.assert_error(400, "DIGEST_INVALID");
    get(&server, &format!("/v2/wrong/blobs/{claimed}")).assert_status(404);
    get(
        &server,
        &format!("/v2/wrong/blobs/{}", common::sha256(&bytes)),
    )
    .assert_status(404);
}

// spec: Push / Pushing a blob monolithically / POST then PUT (digest mismatch)
#[test]
fn push_put_with_wrong_digest_is_400_digest_invalid_and_not_visible() {
    let server = Server::start();
    let bytes = common::random_bytes(5000, 33);
    let claimed = common::sha256(b"not these bytes");
    let location = start_upload(&server, "wrongput");
    put_upload(&server, &location, &claimed, &bytes).assert_error(400, "DIGEST_INVALID");
    get(&server, &format!("/v2/wrongput/blobs/{claimed}")).assert_error(404, "BLOB_UNKNOWN");
    get(
        &server,
        &format!("/v2/wrongput/blobs/{}", common::sha256(&bytes)),
    )
    .assert_error(404, "BLOB_UNKNOWN");
}

// spec: Push / Pushing a blob in chunks
#[test]
fn push_chunked_in_order_reports_ranges_and_commits() {
    let server = Server::start();
    let bytes = common::random_bytes(250, 34);
    let digest = common::sha256(&bytes);
    let mut location = start_upload(&server, "chunked");
    for (start, end) in [(0usize, 100usize), (100, 200)] {
        let r = patch_chunk(&server, &location, start as u64, &bytes[start..end]);
        r.assert_status(202);
        assert_eq!(r.header("Range"), format!("0-{}", end - 1));
        location = r.header("Location").to_string();
        assert_upload_location(&location, "chunked");
        // GET reports the same progress.
        let status = get(&server, &location_path(&location));
        status.assert_status(204);
        assert_eq!(status.header("Range"), format!("0-{}", end - 1));
        assert_upload_location(status.header("Location"), "chunked");
    }
    // Final chunk in the closing PUT, with its Content-Range.
    let r = send(
        req::put_upload(&server, &location, &digest, bytes[200..].to_vec())
            .header("Content-Range", "200-249"),
    );
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/chunked/blobs/{digest}")
    );
    let got = get(&server, &format!("/v2/chunked/blobs/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
}

// spec: Push / Pushing a blob in chunks ("Chunks MUST be uploaded in order ... 416")
#[test]
fn push_chunked_out_of_order_is_rejected_416_and_session_survives() {
    let server = Server::start();
    let bytes = common::random_bytes(300, 35);
    let digest = common::sha256(&bytes);
    let location = start_upload(&server, "ooo");
    let r = patch_chunk(&server, &location, 0, &bytes[..100]);
    r.assert_status(202);
    let location = r.header("Location").to_string();

    // A gap, an overlap, and a restart from zero are all out of order.
    for (start, end) in [(200usize, 300usize), (50, 150), (0, 100), (101, 200)] {
        let r = patch_chunk(&server, &location, start as u64, &bytes[start..end]);
        assert_eq!(r.status, 416, "chunk {start}-{}: {}", end - 1, r.describe());
        assert_eq!(r.error_codes()[0], "BLOB_UPLOAD_INVALID");
        // "A GET request may be used to retrieve the current valid offset".
        let status = get(&server, &location_path(&location));
        status.assert_status(204);
        assert_eq!(
            status.header("Range"),
            "0-99",
            "after rejected chunk {start}-{end}"
        );
    }
    let r = patch_chunk(&server, &location, 100, &bytes[100..]);
    r.assert_status(202);
    assert_eq!(r.header("Range"), "0-299");
    put_upload(&server, r.header("Location"), &digest, b"").assert_status(201);
    let got = get(&server, &format!("/v2/ooo/blobs/{digest}"));
    assert_eq!(got.body, bytes);
}

// spec: Push / Pushing a blob in chunks ("The first chunk's range MUST begin with 0")
#[test]
fn push_first_chunk_not_at_zero_is_rejected_416() {
    let server = Server::start();
    let location = start_upload(&server, "notzero");
    let r = patch_chunk(&server, &location, 1, b"abc");
    r.assert_error(416, "BLOB_UPLOAD_INVALID");
    let status = get(&server, &location_path(&location));
    status.assert_status(204);
    assert_eq!(status.header("Range"), "0-0");
}

// spec: Push / Pushing a blob in chunks ("If the final chunk is uploaded out of order ... 416")
#[test]
fn push_final_chunk_out_of_order_in_put_is_rejected_416() {
    let server = Server::start();
    let bytes = common::random_bytes(200, 36);
    let digest = common::sha256(&bytes);
    let location = start_upload(&server, "finalooo");
    let r = patch_chunk(&server, &location, 0, &bytes[..100]);
    r.assert_status(202);
    let location = r.header("Location").to_string();
    let r = send(
        req::put_upload(&server, &location, &digest, bytes[100..].to_vec())
            .header("Content-Range", "150-249"),
    );
    r.assert_error(416, "BLOB_UPLOAD_INVALID");
    get(&server, &format!("/v2/finalooo/blobs/{digest}")).assert_status(404);
    // The session continues from where it was.
    let status = get(&server, &location_path(&location));
    status.assert_status(204);
    assert_eq!(status.header("Range"), "0-99");
    let r = send(
        req::put_upload(&server, &location, &digest, bytes[100..].to_vec())
            .header("Content-Range", "100-199"),
    );
    r.assert_status(201);
    assert_eq!(
        get(&server, &format!("/v2/finalooo/blobs/{digest}")).body,
        bytes
    );
}

/// A reader that yields its bytes a few at a time, so the request body is streamed
/// (chunked transfer encoding, no Content-Length).
struct Trickle {
    bytes: Vec<u8>,
    pos: usize,
}

impl Trickle {
    fn body(bytes: &[u8]) -> reqwest::blocking::Body {
        reqwest::blocking::Body::new(Trickle {
            bytes: bytes.to_vec(),
            pos: 0,
        })
    }
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(777).min(self.bytes.len() - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

// spec: Push / Pushing a blob in chunks (a PATCH without Content-Range appends a streamed body)
#[test]
fn push_patch_without_content_range_appends_streamed_body() {
    let server = Server::start();
    let bytes = common::random_bytes(300_000, 37);
    let digest = common::sha256(&bytes);
    let mut location = start_upload(&server, "stream");
    for (start, end) in [(0usize, 100_000usize), (100_000, 300_000)] {
        let r = send(req::patch_upload(
            &server,
            &location,
            Trickle::body(&bytes[start..end]),
        ));
        r.assert_status(202);
        assert_eq!(r.header("Range"), format!("0-{}", end - 1));
        location = r.header("Location").to_string();
    }
    put_upload(&server, &location, &digest, b"").assert_status(201);
    let got = get(&server, &format!("/v2/stream/blobs/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
}

// spec: Push / Pushing a blob in chunks (a fresh session is at 0-0)
#[test]
fn upload_status_of_fresh_session_is_204_with_location() {
    let server = Server::start();
    let location = start_upload(&server, "fresh");
    let r = get(&server, &location_path(&location));
    r.assert_status(204);
    assert_eq!(r.header("Range"), "0-0");
    assert_eq!(
        assert_upload_location(r.header("Location"), "fresh"),
        assert_upload_location(&location, "fresh")
    );
}

// spec: Push / Cancel a blob upload
#[test]
fn cancel_upload_is_204_then_session_is_404_blob_upload_unknown() {
    let server = Server::start();
    let bytes = common::random_bytes(100, 38);
    let location = start_upload(&server, "cancel");
    patch_chunk(&server, &location, 0, &bytes).assert_status(202);
    delete(&server, &location_path(&location)).assert_status(204);
    get(&server, &location_path(&location)).assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    patch_chunk(&server, &location, 100, b"more").assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    put_upload(&server, &location, &common::sha256(&bytes), b"")
        .assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    delete(&server, &location_path(&location)).assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    get(
        &server,
        &format!("/v2/cancel/blobs/{}", common::sha256(&bytes)),
    )
    .assert_status(404);
}

// spec: API / Endpoints end-13 (unknown upload session → 404)
#[test]
fn unknown_upload_session_is_404_blob_upload_unknown() {
    let server = Server::start();
    let path = "/v2/nosession/blobs/uploads/0123456789abcdef0123456789abcdef";
    get(&server, path).assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    send(client().patch(server.url(path)).body(b"x".to_vec()))
        .assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    let d = common::sha256(b"x");
    put_upload(&server, path, &d, b"x").assert_error(404, "BLOB_UPLOAD_UNKNOWN");
}

// spec: Push / Pushing a blob monolithically (a session belongs to the repository that opened it)
#[test]
fn upload_session_used_under_another_repository_is_404() {
    let server = Server::start();
    let location = start_upload(&server, "owner");
    let id = assert_upload_location(&location, "owner");
    let other = format!("/v2/intruder/blobs/uploads/{id}");
    get(&server, &other).assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    let d = common::sha256(b"payload");
    put_upload(&server, &other, &d, b"payload").assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    get(&server, &format!("/v2/intruder/blobs/{d}")).assert_status(404);
    // The owner's session is untouched.
    get(&server, &location_path(&location)).assert_status(204);
}

// spec: Use Cases / Layer Upload De-duplication (two sessions pushing the same bytes both win)
#[test]
fn two_sessions_pushing_the_same_blob_both_succeed() {
    let server = Server::start();
    let bytes = common::random_bytes(50_000, 39);
    let digest = common::sha256(&bytes);
    let a = start_upload(&server, "dedup");
    let b = start_upload(&server, "dedup");
    assert_ne!(
        location_path(&a),
        location_path(&b),
        "sessions must have distinct ids"
    );
    put_upload(&server, &a, &digest, &bytes).assert_status(201);
    put_upload(&server, &b, &digest, &bytes).assert_status(201);
    // Pushing existing content again by single POST is fine too.
    push_blob(&server, "dedup", &bytes);
    assert_eq!(
        get(&server, &format!("/v2/dedup/blobs/{digest}")).body,
        bytes
    );
}

// spec: Push / Pushing a blob in chunks (`?digest-algorithm=sha512`), Pull with sha512 digests
#[test]
fn push_chunked_with_sha512_algorithm_is_pullable_by_sha512_digest() {
    let server = Server::start();
    let bytes = common::random_bytes(10_000, 40);
    let digest = sha512(&bytes);
    let r = open_upload(&server, "sha512", "digest-algorithm=sha512");
    r.assert_status(202);
    let location = r.header("Location").to_string();
    let r = patch_chunk(&server, &location, 0, &bytes[..4000]);
    r.assert_status(202);
    let r = put_upload(&server, r.header("Location"), &digest, &bytes[4000..]);
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/sha512/blobs/{digest}")
    );
    let got = get(&server, &format!("/v2/sha512/blobs/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
    assert_eq!(got.header("Docker-Content-Digest"), digest);
    let h = head(&server, &format!("/v2/sha512/blobs/{digest}"));
    h.assert_status(200);
    assert_eq!(h.header("Content-Length"), "10000");
}

// spec: Push / Pushing a blob monolithically / Single POST, with a sha512 digest
#[test]
fn push_single_post_with_sha512_digest_is_201() {
    let server = Server::start();
    let bytes = common::random_bytes(3333, 41);
    let digest = sha512(&bytes);
    let r = post_blob(&server, "sha512post", &digest, &bytes);
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(
        get(&server, &format!("/v2/sha512post/blobs/{digest}")).body,
        bytes
    );
    // A wrong sha512 is refused like a wrong sha256.
    let wrong = sha512(b"other");
    post_blob(&server, "sha512post", &wrong, &bytes).assert_error(400, "DIGEST_INVALID");
}

// spec: Push / Mounting a blob from another repository
#[test]
fn mount_from_repository_holding_the_blob_is_201() {
    let server = Server::start();
    let bytes = common::random_bytes(9000, 42);
    let digest = push_blob(&server, "mount/src", &bytes);
    get(&server, &format!("/v2/mount/dst/blobs/{digest}")).assert_status(404);
    let r = open_upload(
        &server,
        "mount/dst",
        &format!("mount={digest}&from=mount/src"),
    );
    r.assert_status(201);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/mount/dst/blobs/{digest}")
    );
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    let got = get(&server, &format!("/v2/mount/dst/blobs/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, bytes);
}

// spec: Push / Mounting a blob ("MAY treat the from parameter as optional")
#[test]
fn mount_without_from_is_201_when_blob_exists_anywhere() {
    let server = Server::start();
    let bytes = common::random_bytes(900, 43);
    let digest = push_blob(&server, "elsewhere", &bytes);
    let r = open_upload(&server, "automount", &format!("mount={digest}"));
    r.assert_status(201);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/automount/blobs/{digest}")
    );
    assert_eq!(
        get(&server, &format!("/v2/automount/blobs/{digest}")).body,
        bytes
    );
}

// spec: Push / Mounting a blob ("unable to mount the requested blob, it SHOULD return a 202")
#[test]
fn mount_of_unknown_blob_is_202_with_a_usable_session() {
    let server = Server::start();
    let bytes = common::random_bytes(800, 44);
    let digest = common::sha256(&bytes);
    let r = open_upload(
        &server,
        "nomount",
        &format!("mount={digest}&from=nomount/src"),
    );
    r.assert_status(202);
    let location = r.header("Location").to_string();
    assert_upload_location(&location, "nomount");
    put_upload(&server, &location, &digest, &bytes).assert_status(201);
    assert_eq!(
        get(&server, &format!("/v2/nomount/blobs/{digest}")).body,
        bytes
    );
}

// spec: Push / Mounting a blob (the `from` repository must hold the blob)
#[test]
fn mount_from_repository_without_the_blob_is_202() {
    let server = Server::start();
    let bytes = common::random_bytes(700, 45);
    let digest = push_blob(&server, "holder", &bytes);
    push_blob(&server, "notholder", b"unrelated");
    let r = open_upload(&server, "target", &format!("mount={digest}&from=notholder"));
    r.assert_status(202);
    assert_upload_location(r.header("Location"), "target");
    get(&server, &format!("/v2/target/blobs/{digest}")).assert_error(404, "BLOB_UNKNOWN");
}

// spec: Push / Pushing Manifests (by tag)
#[test]
fn push_manifest_by_tag_is_201_with_location_and_digest() {
    let server = Server::start();
    let config = b"{}".to_vec();
    let layer = common::random_bytes(1000, 50);
    push_blob(&server, "mpush", &config);
    push_blob(&server, "mpush", &layer);
    let manifest = to_bytes(&image_manifest_value(&config, &[&layer]));
    let digest = common::sha256(&manifest);
    let r = put_manifest(&server, "mpush", "v1.0", OCI_MANIFEST, &manifest);
    r.assert_status(201);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/mpush/manifests/{digest}")
    );
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    let got = get(&server, "/v2/mpush/manifests/v1.0");
    got.assert_status(200);
    assert_eq!(got.body, manifest);
    let got = get(&server, &location_path(r.header("Location")));
    assert_eq!(got.body, manifest);
}

// spec: Push / Pushing Manifests (by digest)
#[test]
fn push_manifest_by_digest_is_201_and_creates_no_tag() {
    let server = Server::start();
    push_image(&server, "bydigest", Some("keep"), 51);
    let config = b"{\"a\":1}".to_vec();
    push_blob(&server, "bydigest", &config);
    let manifest = to_bytes(&image_manifest_value(&config, &[]));
    let digest = common::sha256(&manifest);
    let r = put_manifest(&server, "bydigest", &digest, OCI_MANIFEST, &manifest);
    r.assert_status(201);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/bydigest/manifests/{digest}")
    );
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(
        get(&server, &format!("/v2/bydigest/manifests/{digest}")).body,
        manifest
    );
    let tags = get(&server, "/v2/bydigest/tags/list");
    assert_eq!(tags.json()["tags"], json!(["keep"]));
}

// spec: Push / Pushing Manifests ("MUST be equal to the client provided digest")
#[test]
fn push_manifest_by_wrong_digest_is_400_digest_invalid() {
    let server = Server::start();
    let config = b"{}".to_vec();
    push_blob(&server, "wrongm", &config);
    let manifest = to_bytes(&image_manifest_value(&config, &[]));
    let wrong = common::sha256(b"not the manifest");
    put_manifest(&server, "wrongm", &wrong, OCI_MANIFEST, &manifest)
        .assert_error(400, "DIGEST_INVALID");
    get(&server, &format!("/v2/wrongm/manifests/{wrong}")).assert_status(404);
    get(
        &server,
        &format!("/v2/wrongm/manifests/{}", common::sha256(&manifest)),
    )
    .assert_status(404);
}

// spec: Push ("it MUST result in one or more MANIFEST_BLOB_UNKNOWN errors")
#[test]
fn push_manifest_with_missing_layer_or_config_is_400_manifest_blob_unknown() {
    let server = Server::start();
    let config = b"{}".to_vec();
    let layer = common::random_bytes(100, 52);
    push_blob(&server, "missing", &config);
    // Layer never pushed.
    let m = to_bytes(&image_manifest_value(&config, &[&layer]));
    put_manifest(&server, "missing", "t", OCI_MANIFEST, &m)
        .assert_error(400, "MANIFEST_BLOB_UNKNOWN");
    // Config never pushed.
    push_blob(&server, "missing", &layer);
    let m = to_bytes(&image_manifest_value(b"{\"other\":true}", &[&layer]));
    put_manifest(&server, "missing", "t", OCI_MANIFEST, &m)
        .assert_error(400, "MANIFEST_BLOB_UNKNOWN");
    // Nothing was tagged by the refused pushes.
    get(&server, "/v2/missing/manifests/t").assert_error(404, "MANIFEST_UNKNOWN");
}

// spec: Push (references are checked in the manifest's own repository)
#[test]
fn push_manifest_referencing_blob_of_another_repository_is_400() {
    let server = Server::start();
    let config = b"{}".to_vec();
    let layer = common::random_bytes(100, 53);
    push_blob(&server, "other/place", &layer);
    push_blob(&server, "this/place", &config);
    let m = to_bytes(&image_manifest_value(&config, &[&layer]));
    put_manifest(&server, "this/place", "t", OCI_MANIFEST, &m)
        .assert_error(400, "MANIFEST_BLOB_UNKNOWN");
}

// spec: Push (an index's children are manifests that must be in the repository)
#[test]
fn push_index_with_missing_child_is_400_manifest_blob_unknown() {
    let server = Server::start();
    let img = push_image(&server, "idx", None, 54);
    let missing = common::sha256(b"no such child");
    let index = |digest: &str, size: usize| {
        to_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": img.digest, "size": img.manifest.len()},
                {"mediaType": OCI_MANIFEST, "digest": digest, "size": size},
            ],
        }))
    };
    put_manifest(&server, "idx", "t", OCI_INDEX, &index(&missing, 10))
        .assert_error(400, "MANIFEST_BLOB_UNKNOWN");
    // A layer blob is in the repository but is not a manifest.
    let layer = &img.layers[0];
    put_manifest(
        &server,
        "idx",
        "t",
        OCI_INDEX,
        &index(&common::sha256(layer), layer.len()),
    )
    .assert_error(400, "MANIFEST_BLOB_UNKNOWN");
    // With only existing children it is accepted.
    let ok = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": img.digest, "size": img.manifest.len()}],
    }));
    push_manifest(&server, "idx", "t", OCI_INDEX, &ok);
    assert_eq!(get(&server, "/v2/idx/manifests/t").body, ok);
}

// spec: Push / Pushing Manifests ("clients MUST set the Content-Type header to ... mediaType")
#[test]
fn push_manifest_with_media_type_field_unlike_content_type_is_400_manifest_invalid() {
    let server = Server::start();
    let config = b"{}".to_vec();
    push_blob(&server, "mismatch", &config);
    let m = to_bytes(&image_manifest_value(&config, &[]));
    put_manifest(&server, "mismatch", "t", DOCKER_MANIFEST, &m)
        .assert_error(400, "MANIFEST_INVALID");
    put_manifest(&server, "mismatch", "t", OCI_INDEX, &m).assert_error(400, "MANIFEST_INVALID");
    get(&server, "/v2/mismatch/manifests/t").assert_status(404);
}

// spec: Push / Pushing Manifests (a manifest must be a JSON document)
#[test]
fn push_manifest_that_is_not_json_is_400_manifest_invalid() {
    let server = Server::start();
    for body in [
        b"not json at all".to_vec(),
        b"{\"schemaVersion\": 2, ".to_vec(),
        b"".to_vec(),
        b"[1,2,3]".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x7b],
    ] {
        let r = put_manifest(&server, "badjson", "t", OCI_MANIFEST, &body);
        assert_eq!(r.status, 400, "{body:?}: {}", r.describe());
        assert_eq!(r.error_codes()[0], "MANIFEST_INVALID", "{body:?}");
    }
    get(&server, "/v2/badjson/manifests/t").assert_status(404);
}

// spec: Push / Pushing Manifests ("The registry SHOULD ignore parameters on the Content-Type")
#[test]
fn push_manifest_content_type_parameters_are_ignored() {
    let server = Server::start();
    let config = b"{}".to_vec();
    push_blob(&server, "params", &config);
    let m = to_bytes(&image_manifest_value(&config, &[]));
    push_manifest(
        &server,
        "params",
        "t",
        &format!("{OCI_MANIFEST}; charset=utf-8"),
        &m,
    );
    let r = get(&server, "/v2/params/manifests/t");
    assert_eq!(r.header("Content-Type"), OCI_MANIFEST);
    assert_eq!(r.body, m);
}

// spec: Push / Pushing Manifests (pushing to an existing tag moves it)
#[test]
fn push_manifest_to_existing_tag_moves_the_tag() {
    let server = Server::start();
    let first = push_image(&server, "moving", Some("latest"), 55);
    let second = push_image(&server, "moving", Some("latest"), 56);
    assert_ne!(first.digest, second.digest);
    let r = get(&server, "/v2/moving/manifests/latest");
    assert_eq!(r.body, second.manifest);
    assert_eq!(r.header("Docker-Content-Digest"), second.digest);
    // The first manifest is still there by digest.
    assert_eq!(
        get(&server, &format!("/v2/moving/manifests/{}", first.digest)).body,
        first.manifest
    );
}

// spec: Push / Pushing Manifests ("pushing of tags specified by addition of tag query parameters")
#[test]
fn push_manifest_by_digest_with_tag_parameters_creates_tags_and_oci_tag_header() {
    let server = Server::start();
    let config = b"{}".to_vec();
    push_blob(&server, "multitag", &config);
    let m = to_bytes(&image_manifest_value(&config, &[]));
    let digest = common::sha256(&m);
    let tags: Vec<String> = ["1.2.3", "1.2", "1", "latest"]
        .iter()
        .map(|s| s.to_string())
        .chain((0..8).map(|i| format!("extra-{i}")))
        .collect();
    let query: Vec<String> = tags.iter().map(|t| format!("tag={t}")).collect();
    let r = put_manifest(
        &server,
        "multitag",
        &format!("{digest}?{}", query.join("&")),
        OCI_MANIFEST,
        &m,
    );
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    let mut announced = r.header_items("OCI-Tag");
    announced.sort();
    let mut expected = tags.clone();
    expected.sort();
    assert_eq!(announced, expected, "OCI-Tag headers");
    for t in &tags {
        let got = get(&server, &format!("/v2/multitag/manifests/{t}"));
        got.assert_status(200);
        assert_eq!(got.body, m, "tag {t}");
    }
    let listed = get(&server, "/v2/multitag/tags/list").json();
    assert_eq!(listed["tags"].as_array().unwrap().len(), tags.len());
}

// spec: Push / Pushing Manifests with Subject ("MUST respond with the response header OCI-Subject")
#[test]
fn push_manifest_with_subject_returns_oci_subject_even_if_subject_is_missing() {
    let server = Server::start();
    let missing_subject = common::sha256(b"subject pushed later");
    push_blob(&server, "subj", b"{}");
    let artifact = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": {"mediaType": OCI_EMPTY, "digest": common::sha256(b"{}"), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": missing_subject, "size": 123},
    }));
    let r = put_manifest(
        &server,
        "subj",
        &common::sha256(&artifact),
        OCI_MANIFEST,
        &artifact,
    );
    r.assert_status(201);
    assert_eq!(r.header("OCI-Subject"), missing_subject);
    // A manifest without subject gets no OCI-Subject header.
    let plain = to_bytes(&image_manifest_value(b"{}", &[]));
    let r = put_manifest(&server, "subj", "plain", OCI_MANIFEST, &plain);
    r.assert_status(201);
    assert!(r.header_opt("OCI-Subject").is_none(), "{}", r.describe());
}

// spec: Push / Pushing Manifests (Docker schema 2 manifest and manifest list)
#[test]
fn push_docker_manifest_and_manifest_list_are_201() {
    let server = Server::start();
    let config = br#"{"os":"linux"}"#.to_vec();
    let layer = common::random_bytes(321, 57);
    push_blob(&server, "dock", &config);
    push_blob(&server, "dock", &layer);
    let m = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, &config),
        "layers": [descriptor(DOCKER_LAYER, &layer)],
    }));
    let md = push_manifest(&server, "dock", "img", DOCKER_MANIFEST, &m);
    let list = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": md, "size": m.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }));
    push_manifest(&server, "dock", "list", DOCKER_LIST, &list);
    let r = get_with(
        &server,
        "/v2/dock/manifests/list",
        &[("Accept", DOCKER_LIST)],
    );
    assert_eq!(r.header("Content-Type"), DOCKER_LIST);
    assert_eq!(r.body, list);
}

// spec: Push / Pushing Manifests ("SHOULD expect to be able to support manifest pushes of at least
// 4 megabytes"; "over this limit ... 413"); the default limit is 4 MiB
#[test]
fn push_manifest_of_4_mib_is_accepted_and_one_byte_more_is_413() {
    let server = Server::start();
    let config = b"{}".to_vec();
    push_blob(&server, "big/manifest", &config);
    let limit = 4 * 1024 * 1024;
    let at_limit = padded_manifest(&config, limit);
    push_manifest(&server, "big/manifest", "at-limit", OCI_MANIFEST, &at_limit);
    assert_eq!(
        get(&server, "/v2/big/manifest/manifests/at-limit").body,
        at_limit
    );
    let over = padded_manifest(&config, limit + 1);
    let r = put_manifest(&server, "big/manifest", "over", OCI_MANIFEST, &over);
    r.assert_error(413, "MANIFEST_INVALID");
    get(&server, "/v2/big/manifest/manifests/over").assert_status(404);
}

/// An OCI manifest of exactly `size` bytes (padded with an annotation).
pub fn padded_manifest(config: &[u8], size: usize) -> Vec<u8> {
    let mut v = image_manifest_value(config, &[]);
    v["annotations"] = json!({"pad": ""});
    let base = to_bytes(&v).len();
    assert!(size >= base, "{size} < {base}");
    v["annotations"]["pad"] = json!("x".repeat(size - base));
    let out = to_bytes(&v);
    assert_eq!(out.len(), size);
    out
}

// spec: Push / Pushing Manifests (413 with a configured `--manifest-size-max-bytes`)
#[test]
fn push_manifest_over_configured_limit_is_413() {
    let server = Server::start_args(&["--manifest-size-max-bytes", "1024"]);
    let config = b"{}".to_vec();
    push_blob(&server, "small", &config);
    push_manifest(
        &server,
        "small",
        "ok",
        OCI_MANIFEST,
        &padded_manifest(&config, 1024),
    );
    put_manifest(
        &server,
        "small",
        "big",
        OCI_MANIFEST,
        &padded_manifest(&config, 1025),
    )
    .assert_error(413, "MANIFEST_INVALID");
    put_manifest(
        &server,
        "small",
        "huge",
        OCI_MANIFEST,
        &padded_manifest(&config, 1 << 20),
    )
    .assert_error(413, "MANIFEST_INVALID");
    get(&server, "/v2/small/manifests/big").assert_status(404);
    assert_alive(&server);
}

// spec: Push / Pushing a blob monolithically, as Go clients (containerd, docker) send it: query
// values percent-encoded (`digest=sha256%3A...`, `from=a%2Fb`)
#[test]
fn push_and_mount_with_percent_encoded_query_values() {
    let server = Server::start();
    let bytes = common::random_bytes(4000, 60);
    let digest = common::sha256(&bytes);
    let encoded = digest.replace(':', "%3A");
    let r = post_blob(&server, "enc/src", &encoded, &bytes);
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);

    let r = open_upload(
        &server,
        "enc/dst",
        &format!("mount={encoded}&from=enc%2Fsrc"),
    );
    r.assert_status(201);
    assert_eq!(
        get(&server, &format!("/v2/enc/dst/blobs/{digest}")).body,
        bytes
    );

    let other = common::random_bytes(5000, 61);
    let other_digest = common::sha256(&other);
    let location = start_upload(&server, "enc/put");
    let r = put_upload(
        &server,
        &location,
        &other_digest.replace(':', "%3a"),
        &other,
    );
    r.assert_status(201);
    assert_eq!(
        get(&server, &format!("/v2/enc/put/blobs/{other_digest}")).body,
        other
    );
}

// spec: Push / Pushing Manifests (by a sha512 digest; "sha512 digests work everywhere")
#[test]
fn push_manifest_by_sha512_digest_and_over_sha512_blobs() {
    let server = Server::start();
    let config = b"{\"os\":\"linux\"}".to_vec();
    let layer = common::random_bytes(1500, 62);
    let config_digest = sha512(&config);
    let layer_digest = sha512(&layer);
    for (bytes, digest) in [(&config, &config_digest), (&layer, &layer_digest)] {
        post_blob(&server, "s512", digest, bytes).assert_status(201);
    }
    let manifest = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len()}],
    }));
    let digest = sha512(&manifest);
    let r = put_manifest(&server, "s512", &digest, OCI_MANIFEST, &manifest);
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    assert_eq!(
        location_path(r.header("Location")),
        format!("/v2/s512/manifests/{digest}")
    );
    let got = get(&server, &format!("/v2/s512/manifests/{digest}"));
    got.assert_status(200);
    assert_eq!(got.body, manifest);
    assert_eq!(got.header("Docker-Content-Digest"), digest);
    // A wrong sha512 is refused.
    put_manifest(&server, "s512", &sha512(b"other"), OCI_MANIFEST, &manifest)
        .assert_error(400, "DIGEST_INVALID");
    // A sha512 layer that is not there is an unknown blob.
    let missing = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": sha512(b"absent"), "size": 6}],
    }));
    put_manifest(&server, "s512", "missing", OCI_MANIFEST, &missing)
        .assert_error(400, "MANIFEST_BLOB_UNKNOWN");
}

// spec: Push / Pushing a blob in chunks (`digest-algorithm` names an algorithm the registry knows)
#[test]
fn push_with_unsupported_digest_algorithm_is_400_digest_invalid() {
    let server = Server::start();
    for alg in ["md5", "sha1", "SHA256", ""] {
        let r = open_upload(&server, "alg", &format!("digest-algorithm={alg}"));
        assert_eq!(r.status, 400, "digest-algorithm={alg}: {}", r.describe());
        assert_eq!(
            r.error_codes()[0],
            "DIGEST_INVALID",
            "digest-algorithm={alg}"
        );
    }
}

// spec: Push / Pushing a blob in chunks (a sha512 session closed with a sha256 digest: the
// registry either verifies the sha256 too, or refuses; it never stores unverified bytes)
#[test]
fn sha512_session_closed_with_sha256_digest_is_verified_or_refused() {
    let server = Server::start();
    let bytes = common::random_bytes(2000, 63);
    let r = open_upload(&server, "mixalg", "digest-algorithm=sha512");
    r.assert_status(202);
    let location = r.header("Location").to_string();
    // A wrong sha256 must never be accepted.
    let wrong = common::sha256(b"not it");
    let r = put_upload(&server, &location, &wrong, &bytes);
    assert_eq!(r.status, 400, "{}", r.describe());
    get(&server, &format!("/v2/mixalg/blobs/{wrong}")).assert_status(404);
    // The right sha256 is either verified and stored, or refused.
    let r2 = open_upload(&server, "mixalg", "digest-algorithm=sha512");
    r2.assert_status(202);
    let right = common::sha256(&bytes);
    let r = put_upload(&server, r2.header("Location"), &right, &bytes);
    match r.status {
        201 => assert_eq!(
            get(&server, &format!("/v2/mixalg/blobs/{right}")).body,
            bytes
        ),
        400 => {
            assert_eq!(r.error_codes()[0], "DIGEST_INVALID");
            get(&server, &format!("/v2/mixalg/blobs/{right}")).assert_status(404);
        }
        _ => panic!("{}", r.describe()),
    }
}

// spec: Push / Pushing a blob in chunks ("MUST include the <digest> of the whole blob")
#[test]
fn closing_put_without_digest_is_400() {
    let server = Server::start();
    let location = start_upload(&server, "nodigest");
    let r = send(
        client()
            .put(location_url(&server, &location))
            .body(b"abc".to_vec()),
    );
    assert_eq!(r.status, 400, "{}", r.describe());
    let code = &r.error_codes()[0];
    assert!(
        ["DIGEST_INVALID", "BLOB_UPLOAD_INVALID"].contains(&code.as_str()),
        "{code}"
    );
    get(
        &server,
        &format!("/v2/nodigest/blobs/{}", common::sha256(b"abc")),
    )
    .assert_status(404);
}

// spec: Use Cases / Layer Upload De-duplication ("If process A and B upload the same layer at the
// same time, both operations will proceed")
#[test]
fn concurrent_pushes_of_the_same_blob_all_succeed() {
    let server = Server::start();
    let bytes = common::random_bytes(3 * 1024 * 1024 + 1, 64);
    let digest = common::sha256(&bytes);
    std::thread::scope(|scope| {
        for i in 0..8 {
            let (server, bytes) = (&server, &bytes);
            scope.spawn(move || {
                let repo = if i % 2 == 0 { "same/a" } else { "same/b" };
                if i % 4 < 2 {
                    push_blob(server, repo, bytes);
                } else {
                    push_blob_chunked(server, repo, bytes, 512 * 1024);
                }
            });
        }
    });
    for repo in ["same/a", "same/b"] {
        let r = get(&server, &format!("/v2/{repo}/blobs/{digest}"));
        r.assert_status(200);
        assert!(r.body == bytes, "blob in {repo} is not the pushed bytes");
    }
    assert_blobs_hash_to_their_names(&server.data_dir);
}

// spec: Push / Pushing Manifests (concurrent pushes to one tag: the tag ends on one of them)
#[test]
fn concurrent_manifest_pushes_to_one_tag_leave_one_of_them() {
    let server = Server::start();
    push_blob(&server, "race", b"{}");
    let manifests: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            let mut v = image_manifest_value(b"{}", &[]);
            v["annotations"] = json!({"i": i.to_string()});
            to_bytes(&v)
        })
        .collect();
    std::thread::scope(|scope| {
        for m in &manifests {
            let server = &server;
            scope.spawn(move || {
                for _ in 0..5 {
                    push_manifest(server, "race", "latest", OCI_MANIFEST, m);
                }
            });
        }
    });
    let r = get(&server, "/v2/race/manifests/latest");
    r.assert_status(200);
    assert!(
        manifests.contains(&r.body),
        "the tag names none of the pushed manifests"
    );
    assert_eq!(r.header("Docker-Content-Digest"), common::sha256(&r.body));
    let tags = get(&server, "/v2/race/tags/list").json();
    assert_eq!(tags["tags"], json!(["latest"]));
    // Every manifest is still there by digest.
    for m in &manifests {
        assert_eq!(
            get(
                &server,
                &format!("/v2/race/manifests/{}", common::sha256(m))
            )
            .body,
            *m
        );
    }
}

/// Reads from `stream` until `needle` has been seen (or the connection ends); returns all read.
fn read_until(stream: &mut std::net::TcpStream, needle: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        if String::from_utf8_lossy(&out).contains(needle) {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// RFC 9110 section 10.1.1 (`Expect: 100-continue`, what curl sends before a large body): the
// server answers 100 Continue, then takes the body
#[test]
fn push_with_expect_100_continue_gets_continue_then_201() {
    use std::io::Write;
    let server = Server::start();
    let bytes = common::random_bytes(200_000, 65);
    let digest = common::sha256(&bytes);
    let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let head = format!(
        "POST /v2/expect/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        bytes.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let interim = read_until(&mut stream, "\r\n\r\n");
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "expected 100 Continue, got {interim:?}"
    );
    stream.write_all(&bytes).unwrap();
    let rest = read_until(&mut stream, "\r\n\r\n");
    let final_head = rest.trim_start_matches(|c| c != 'H');
    assert_eq!(
        raw_status(final_head),
        Some(201),
        "{interim:?} then {rest:?}"
    );
    assert_eq!(
        get(&server, &format!("/v2/expect/blobs/{digest}")).body,
        bytes
    );
}

// RFC 9112 section 7.1: a body sent with `Transfer-Encoding: chunked` (no Content-Length), as Go
// clients do for bodies of unknown length
#[test]
fn push_single_post_with_chunked_transfer_encoding_is_201() {
    let server = Server::start();
    let bytes = common::random_bytes(150_000, 66);
    let digest = common::sha256(&bytes);
    let r = send(req::post_blob(
        &server,
        "te",
        &digest,
        Trickle::body(&bytes),
    ));
    r.assert_status(201);
    assert_eq!(get(&server, &format!("/v2/te/blobs/{digest}")).body, bytes);
    // And a manifest.
    push_blob(&server, "te", b"{}");
    let m = to_bytes(&image_manifest_value(b"{}", &[]));
    let r = send(req::put_manifest(
        &server,
        "te",
        "chunked",
        OCI_MANIFEST,
        Trickle::body(&m),
    ));
    r.assert_status(201);
    assert_eq!(get(&server, "/v2/te/manifests/chunked").body, m);
}

// spec: Push / Pushing Manifests (413), with a keep-alive client: every refused push gets its 413
// and the client's next request on the same connection pool is answered
#[test]
fn oversized_manifest_pushes_get_413_every_time_on_a_keep_alive_client() {
    let server = Server::start_args(&["--manifest-size-max-bytes", "1024"]);
    push_blob(&server, "small", b"{}");
    let over = padded_manifest(b"{}", 64 * 1024);
    for i in 0..50 {
        let resp = req::put_manifest(&server, "small", "over", OCI_MANIFEST, over.clone()).send();
        let resp = resp.unwrap_or_else(|e| panic!("push {i}: no answer: {e:?}"));
        assert_eq!(resp.status().as_u16(), 413, "push {i}");
        let next = client().get(server.url("/v2/")).send();
        let next = next.unwrap_or_else(|e| panic!("request after push {i}: no answer: {e:?}"));
        assert_eq!(next.status().as_u16(), 200, "request after push {i}");
    }
}

// spec: Push (a repository name may end in route words: `x/blobs/uploads`, `a/tags`)
#[test]
fn push_chunked_and_manifest_to_names_made_of_route_words() {
    let server = Server::start();
    for repo in ["x/blobs/uploads", "a/tags", "m/manifests", "r/referrers"] {
        let bytes = common::random_bytes(3000, 67);
        let digest = push_blob_chunked(&server, repo, &bytes, 1000);
        assert_eq!(
            get(&server, &format!("/v2/{repo}/blobs/{digest}")).body,
            bytes,
            "{repo}"
        );
        let img = push_image(&server, repo, Some("list"), 68);
        assert_eq!(
            get(&server, &format!("/v2/{repo}/manifests/list")).body,
            img.manifest,
            "{repo}"
        );
        let tags = get(&server, &format!("/v2/{repo}/tags/list"));
        tags.assert_status(200);
        assert_eq!(tags.json()["name"], repo);
        assert_eq!(tags.json()["tags"], json!(["list"]), "{repo}");
    }
}
