//! Hostile and malformed input: bad repository names (traversal, encodings, lengths), bad tags,
//! malformed digests, oversized headers, garbage on the socket and truncated uploads. After each,
//! the server must still answer and what was stored before must be byte-identical.
//! Requests that reqwest would normalise or refuse to send are written by hand (`raw_send`).

mod common;
mod oci;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::Server;
use oci::*;
use serde_json::json;

/// Every file under `dir` (except the `tmp/` scratch area) with the sha256 of its content.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut visited = 0;
    while let Some(d) = stack.pop() {
        visited += 1;
        assert!(visited < 100_000, "directory walk does not end");
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            // Temp files, and what serving itself writes (the event rings and log), are not
            // stored data.
            if matches!(rel.as_str(), "tmp" | "run" | "events") {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.insert(rel, common::sha256(&std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// Sends raw bytes on a new connection and returns what comes back until the server closes the
/// connection (or 5 s pass). Unlike `Server::raw`, a server that answers and closes before reading
/// everything (a reset while writing or reading) is not an error: what was received is returned.
fn raw_send(server: &Server, bytes: &[u8]) -> String {
    use std::io::Read;
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw request with `Connection: close` and extra header lines.
fn raw_with(server: &Server, method: &str, target: &str, headers: &[String]) -> String {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw_send(server, req.as_bytes())
}

/// Asserts a raw response is `status` with the OCI error `code`.
fn assert_raw_error(raw: &str, status: u16, code: &str, what: &str) {
    assert_eq!(raw_status(raw), Some(status), "{what}: {raw}");
    assert_eq!(raw_error_code(raw).as_deref(), Some(code), "{what}: {raw}");
}

/// A stored image whose blobs and manifest are checked after hostile input.
fn stored(server: &Server) -> Image {
    push_image(server, "safe/repo", Some("v1"), 90)
}

fn assert_intact(server: &Server, img: &Image) {
    assert_alive(server);
    let r = get(server, "/v2/safe/repo/manifests/v1");
    r.assert_status(200);
    assert_eq!(r.body, img.manifest);
    for blob in img.layers.iter().chain([&img.config]) {
        let r = get(
            server,
            &format!("/v2/safe/repo/blobs/{}", common::sha256(blob)),
        );
        r.assert_status(200);
        assert_eq!(&r.body, blob);
    }
}

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn bad_names() -> Vec<String> {
    vec![
        "Upper".into(),
        "a/B".into(),
        "..".into(),
        "a/../b".into(),
        "../../etc".into(),
        "a/./b".into(),
        "%2e%2e".into(),
        "a/%2e%2e/b".into(),
        "a%2fb".into(),
        "a%00b".into(),
        "a//b".into(),
        "/a".into(),
        "a/".into(),
        "_a".into(),
        "a/_manifests".into(),
        "a..b".into(),
        "a-".into(),
        "a%20b".into(),
        "a".repeat(256),
        format!("{}/{}", "a".repeat(128), "b".repeat(127)),
    ]
}

// spec: Pull / Pulling manifests (`<name>` MUST match the name grammar) on every route
#[test]
fn invalid_repository_names_are_400_name_invalid_on_every_route() {
    let server = Server::start();
    let img = stored(&server);
    for name in bad_names() {
        let routes = [
            ("GET", format!("/v2/{name}/manifests/latest")),
            ("HEAD", format!("/v2/{name}/manifests/{D}")),
            ("DELETE", format!("/v2/{name}/manifests/latest")),
            ("GET", format!("/v2/{name}/blobs/{D}")),
            ("DELETE", format!("/v2/{name}/blobs/{D}")),
            ("GET", format!("/v2/{name}/tags/list")),
            ("GET", format!("/v2/{name}/referrers/{D}")),
            ("POST", format!("/v2/{name}/blobs/uploads/")),
            (
                "GET",
                format!("/v2/{name}/blobs/uploads/0123456789abcdef0123456789abcdef"),
            ),
        ];
        for (method, target) in routes {
            let headers = ["Content-Length: 0".to_string()];
            let raw = raw_with(&server, method, &target, &headers);
            if method == "HEAD" {
                assert_eq!(raw_status(&raw), Some(400), "{method} {target}: {raw}");
            } else {
                assert_raw_error(&raw, 400, "NAME_INVALID", &format!("{method} {target}"));
            }
        }
    }
    // Pushes under bad names are refused the same way.
    let body = to_bytes(&image_manifest_value(b"{}", &[]));
    for name in bad_names() {
        let mut req = format!(
            "PUT /v2/{name}/manifests/latest HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: {OCI_MANIFEST}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        assert_raw_error(
            &raw_send(&server, &req),
            400,
            "NAME_INVALID",
            &format!("PUT manifest {name}"),
        );
    }
    assert_intact(&server, &img);
}

// spec: Pull / Pulling manifests (paths that are not registry routes at all: 400 or 404)
#[test]
fn traversal_outside_v2_is_400_or_404() {
    let server = Server::start();
    let img = stored(&server);
    for target in [
        "/v2/..",
        "/v2/../",
        "/../v2/safe/repo/manifests/v1",
        "/v2/%2e%2e/%2e%2e/etc/passwd",
        "/v2/safe/repo/manifests/v1/..",
        "/v2/safe/repo/blobs/uploads/..%2f..%2f..%2fetc",
        "/etc/passwd",
        "/v2/safe/repo/unknown/x",
    ] {
        let raw = raw_with(&server, "GET", target, &[]);
        let status = raw_status(&raw);
        assert!(matches!(status, Some(400 | 404)), "GET {target}: {raw}");
        assert!(!raw.contains("root:"), "GET {target} leaked a file: {raw}");
    }
    assert_intact(&server, &img);
}

// spec: Pull / Pulling manifests (the name may be long: 255 characters is the most clients allow)
#[test]
fn repository_name_of_255_characters_works_and_256_is_400() {
    let server = Server::start();
    let name255 = format!("{}/{}", "a".repeat(127), "b".repeat(127));
    assert_eq!(name255.len(), 255);
    let long = "c".repeat(255);
    for name in [name255.as_str(), long.as_str()] {
        let img = push_image(&server, name, Some("t"), 91);
        assert_eq!(
            get(&server, &format!("/v2/{name}/manifests/t")).body,
            img.manifest
        );
        let tags = get(&server, &format!("/v2/{name}/tags/list"));
        tags.assert_status(200);
        assert_eq!(tags.json()["name"], name);
    }
    get(&server, &format!("/v2/{}/tags/list", "c".repeat(256))).assert_error(400, "NAME_INVALID");
}

// spec: Push / Pushing Manifests: nothing escapes the data directory, whatever the name
#[test]
fn traversal_attempts_write_nothing_outside_the_data_directory() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let server = Server::start_in(&data, &[]);
    let body = to_bytes(&image_manifest_value(b"{}", &[]));
    let blob = b"escape attempt";
    let blob_digest = common::sha256(blob);
    let evil = [
        "..",
        "../..",
        "../outside",
        "%2e%2e/outside",
        "%2e%2e%2foutside",
        "a/../../outside",
        "a/%2e%2e/%2e%2e/outside",
        "/outside",
        "outside%00",
    ];
    for name in evil {
        let mut req = format!(
            "PUT /v2/{name}/manifests/t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: {OCI_MANIFEST}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let raw = raw_send(&server, &req);
        assert!(
            matches!(raw_status(&raw), Some(400 | 404)),
            "PUT manifest under {name}: {raw}"
        );
        let mut req = format!(
            "POST /v2/{name}/blobs/uploads/?digest={blob_digest} HTTP/1.1\r\nHost: x\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n",
            blob.len()
        )
        .into_bytes();
        req.extend_from_slice(blob);
        let raw = raw_send(&server, &req);
        assert!(
            matches!(raw_status(&raw), Some(400 | 404)),
            "POST blob under {name}: {raw}"
        );
    }
    // Tags and upload ids that try to climb out.
    push_blob(&server, "ok", b"{}");
    for target in [
        "/v2/ok/manifests/..".to_string(),
        "/v2/ok/manifests/..%2f..%2foutside".to_string(),
        "/v2/ok/manifests/%2e%2e".to_string(),
        "/v2/ok/blobs/uploads/..%2f..%2f..%2foutside".to_string(),
        "/v2/ok/blobs/uploads/../../../outside".to_string(),
    ] {
        let mut req = format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {OCI_MANIFEST}\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let raw = raw_send(&server, &req);
        assert!(
            matches!(raw_status(&raw), Some(400 | 404)),
            "PUT {target}: {raw}"
        );
    }
    assert_alive(&server);
    let mut entries: Vec<String> = std::fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["data"],
        "something was written next to the data directory"
    );
}

// spec: Pull / Pulling manifests (a tag is `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`)
#[test]
fn invalid_tags_are_400_manifest_invalid() {
    let server = Server::start();
    let img = stored(&server);
    let too_long = "t".repeat(129);
    for tag in [too_long.as_str(), ".hidden", "-dash", "a+b", "a%21"] {
        let path = format!("/v2/safe/repo/manifests/{tag}");
        get(&server, &path).assert_error(400, "MANIFEST_INVALID");
        put_manifest(&server, "safe/repo", tag, OCI_MANIFEST, &img.manifest)
            .assert_error(400, "MANIFEST_INVALID");
        delete(&server, &path).assert_error(400, "MANIFEST_INVALID");
    }
    // 128 characters is fine.
    let longest = "t".repeat(128);
    push_manifest(&server, "safe/repo", &longest, OCI_MANIFEST, &img.manifest);
    assert_eq!(
        get(&server, &format!("/v2/safe/repo/manifests/{longest}")).body,
        img.manifest
    );
    // A bad tag among `?tag=` parameters of a push by digest.
    let r = put_manifest(
        &server,
        "safe/repo",
        &format!("{}?tag=good&tag=.bad", img.digest),
        OCI_MANIFEST,
        &img.manifest,
    );
    r.assert_error(400, "MANIFEST_INVALID");
    assert_intact(&server, &img);
}

fn bad_digests() -> Vec<String> {
    let hex64 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    vec![
        "sha256:xyz".into(),
        format!("sha256:{}", &hex64[..63]),
        format!("sha256:{hex64}0"),
        format!("sha256:{}", hex64.to_uppercase()),
        "sha256:".into(),
        ":abc".into(),
        format!("sha512:{hex64}"),
        format!("SHA256:{hex64}"),
        format!("sha256:{}", "g".repeat(64)),
    ]
}

// spec: Push / Pushing blobs ("if the client provided digest is invalid ... 400"); descriptor.md
#[test]
fn malformed_digests_are_400_digest_invalid() {
    let server = Server::start();
    let img = stored(&server);
    for d in bad_digests() {
        get(&server, &format!("/v2/safe/repo/blobs/{d}")).assert_error(400, "DIGEST_INVALID");
        assert_eq!(
            head(&server, &format!("/v2/safe/repo/blobs/{d}")).status,
            400,
            "HEAD {d}"
        );
        delete(&server, &format!("/v2/safe/repo/blobs/{d}")).assert_error(400, "DIGEST_INVALID");
        if d.contains(':') {
            // With a ':' the reference is a digest, not a tag.
            get(&server, &format!("/v2/safe/repo/manifests/{d}"))
                .assert_error(400, "DIGEST_INVALID");
        }
        // As the digest of an upload.
        post_blob(&server, "safe/repo", &d, b"x").assert_error(400, "DIGEST_INVALID");
        let location = start_upload(&server, "safe/repo");
        put_upload(&server, &location, &d, b"x").assert_error(400, "DIGEST_INVALID");
    }
    assert_intact(&server, &img);
}

// spec: Push / Pushing blobs ("uses an unsupported algorithm ... 400")
#[test]
fn unsupported_digest_algorithm_is_400_digest_invalid() {
    let server = Server::start();
    let img = stored(&server);
    let md5 = "md5:d41d8cd98f00b204e9800998ecf8427e";
    let blake = format!("blake3:{}", "a".repeat(64));
    for d in [md5, blake.as_str()] {
        get(&server, &format!("/v2/safe/repo/blobs/{d}")).assert_error(400, "DIGEST_INVALID");
        get(&server, &format!("/v2/safe/repo/manifests/{d}")).assert_error(400, "DIGEST_INVALID");
        post_blob(&server, "safe/repo", d, b"").assert_error(400, "DIGEST_INVALID");
    }
    assert_intact(&server, &img);
}

// spec: Push / Pushing Manifests (a manifest's descriptors must be valid)
#[test]
fn manifest_with_malformed_structure_is_400() {
    let server = Server::start();
    let img = stored(&server);
    let config = descriptor(OCI_CONFIG, &img.config);
    let cases = [
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": "nope"}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": "nope", "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
               "layers": [{"mediaType": OCI_LAYER, "digest": "sha256:xyz", "size": 1}]}),
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": OCI_CONFIG, "digest": "md5:d41d8cd98f00b204e9800998ecf8427e", "size": 0},
               "layers": []}),
        json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {"a": 1}}),
    ];
    for (i, v) in cases.iter().enumerate() {
        let media_type = v["mediaType"].as_str().unwrap();
        let r = put_manifest(
            &server,
            "safe/repo",
            &format!("bad{i}"),
            media_type,
            &to_bytes(v),
        );
        assert_eq!(r.status, 400, "case {i}: {}", r.describe());
        let code = &r.error_codes()[0];
        assert!(
            [
                "MANIFEST_INVALID",
                "DIGEST_INVALID",
                "MANIFEST_BLOB_UNKNOWN"
            ]
            .contains(&code.as_str()),
            "case {i}: {code}"
        );
        get(&server, &format!("/v2/safe/repo/manifests/bad{i}")).assert_status(404);
    }
    assert_intact(&server, &img);
}

// spec: API / Endpoints end-13 (an upload id the server never issued is unknown)
#[test]
fn malformed_upload_ids_are_404_blob_upload_unknown() {
    let server = Server::start();
    let img = stored(&server);
    for id in [
        "zz",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcdef0",
        "%2e%2e",
    ] {
        let raw = raw_with(
            &server,
            "GET",
            &format!("/v2/safe/repo/blobs/uploads/{id}"),
            &[],
        );
        assert_raw_error(&raw, 404, "BLOB_UPLOAD_UNKNOWN", id);
    }
    assert_intact(&server, &img);
}

// spec: Push / Pushing a blob in chunks (a chunk whose Content-Range disagrees with its length)
#[test]
fn patch_with_content_range_unlike_body_length_is_refused_and_session_intact() {
    let server = Server::start();
    let location = start_upload(&server, "mismatch");
    patch_chunk(&server, &location, 0, b"0123456789").assert_status(202);
    for range in ["10-19", "10-10", "10-8", "abc", "10-", "-5"] {
        let r = send(
            req::patch_upload(&server, &location, b"abcde".to_vec()).header("Content-Range", range),
        );
        assert!(
            matches!(r.status, 400 | 416),
            "Content-Range {range}: {}",
            r.describe()
        );
        let status = get(&server, &location_path(&location));
        status.assert_status(204);
        assert_eq!(status.header("Range"), "0-9", "after Content-Range {range}");
    }
    let r = patch_chunk(&server, &location, 10, b"abcde");
    r.assert_status(202);
    let bytes = b"0123456789abcde";
    put_upload(&server, r.header("Location"), &common::sha256(bytes), b"").assert_status(201);
    assert_eq!(
        get(
            &server,
            &format!("/v2/mismatch/blobs/{}", common::sha256(bytes))
        )
        .body,
        bytes
    );
}

/// Distribution spec, "Pushing a blob in chunks": an out-of-order chunk is answered 416 with the
/// session's `Range`, so the client can resume. The answer comes before the chunk's body is
/// read; a client still sending a large chunk must get that answer, not a connection reset
/// (the server reads and discards the rest of the body for a while before closing, as nginx's
/// lingering close does).
#[test]
fn an_out_of_order_large_chunk_gets_its_416_not_a_reset() {
    let server = Server::start();
    let location = start_upload(&server, "resume");
    patch_chunk(&server, &location, 0, b"0123456789").assert_status(202);
    let chunk = common::random_bytes(32 << 20, 7);
    for attempt in 0..5 {
        let resp = req::patch_chunk(&server, &location, 100, &chunk)
            .header("Content-Length", chunk.len().to_string())
            .send();
        let resp = match resp {
            Ok(r) => r,
            Err(e) => panic!("attempt {attempt}: the client got no answer: {e:?}"),
        };
        assert_eq!(resp.status().as_u16(), 416, "attempt {attempt}");
        assert_eq!(
            resp.headers().get("range").and_then(|v| v.to_str().ok()),
            Some("0-9"),
            "attempt {attempt}: the 416 says where to resume"
        );
    }
    // The session is intact and the client resumes where it was told.
    let r = patch_chunk(&server, &location, 10, b"abcde");
    r.assert_status(202);
    let bytes = b"0123456789abcde";
    put_upload(&server, r.header("Location"), &common::sha256(bytes), b"").assert_status(201);
    assert_alive(&server);
}

/// The same over a bare socket, the client reading while it writes (as Go's HTTP client does):
/// the 416 arrives whole, then the end of the connection, never a reset instead of it.
#[test]
fn an_early_answer_reaches_a_client_still_writing_its_body() {
    let server = Server::start();
    for attempt in 0..5 {
        let location = start_upload(&server, "early");
        let body = common::random_bytes(32 << 20, attempt);
        let mut conn = TcpStream::connect(server.addr).unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let head = format!(
            "PATCH {} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
             Content-Range: 100-{}\r\nContent-Length: {}\r\n\r\n",
            location_path(&location),
            100 + body.len() - 1,
            body.len()
        );
        let mut writer = conn.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            // Errors are fine here (the server may close after its answer); what matters is
            // what the reader got.
            let _ = writer.write_all(head.as_bytes());
            let _ = writer.write_all(&body);
        });
        let mut got = Vec::new();
        let read = conn.read_to_end(&mut got);
        sending.join().unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(
            read.is_ok(),
            "attempt {attempt}: {read:?} after {} bytes: {text}",
            got.len()
        );
        assert_eq!(raw_status(&text), Some(416), "attempt {attempt}: {text}");
        assert_eq!(
            raw_error_code(&text).as_deref(),
            Some("BLOB_UPLOAD_INVALID")
        );
        assert!(text.to_lowercase().contains("\r\nrange: 0-0\r\n"), "{text}");
    }
    assert_alive(&server);
}

// RFC 9110 / convention: request headers over `request_header_size_max_bytes` (16 KiB) → 431
#[test]
fn oversized_headers_are_431_and_server_keeps_serving() {
    let server = Server::start();
    let img = stored(&server);
    // One huge header.
    let raw = raw_with(
        &server,
        "GET",
        "/v2/",
        &[format!("X-Big: {}", "a".repeat(20_000))],
    );
    assert_eq!(raw_status(&raw), Some(431), "{raw}");
    // Many headers adding up past the limit.
    let many: Vec<String> = (0..60)
        .map(|i| format!("X-H{i}: {}", "b".repeat(400)))
        .collect();
    let raw = raw_with(&server, "GET", "/v2/", &many);
    assert_eq!(raw_status(&raw), Some(431), "{raw}");
    // Just over 16 KiB.
    let raw = raw_with(
        &server,
        "GET",
        "/v2/",
        &[format!("X-Big: {}", "a".repeat(17_000))],
    );
    assert_eq!(raw_status(&raw), Some(431), "{raw}");
    // Just under.
    let raw = raw_with(
        &server,
        "GET",
        "/v2/",
        &[format!("X-Ok: {}", "c".repeat(15_500))],
    );
    assert_eq!(raw_status(&raw), Some(200), "{raw}");
    // Well under the limit is fine.
    let raw = raw_with(
        &server,
        "GET",
        "/v2/",
        &[format!("X-Ok: {}", "c".repeat(8_000))],
    );
    assert_eq!(raw_status(&raw), Some(200), "{raw}");
    assert_intact(&server, &img);
}

// RFC 9112 / convention: garbage is answered 400 or the connection is closed
#[test]
fn garbage_on_the_socket_is_400_or_closed_and_server_keeps_serving() {
    let server = Server::start();
    let img = stored(&server);
    let before = snapshot(&server.data_dir);
    let mut inputs: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost x\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
        format!(
            "POST /v2/a/blobs/uploads/?digest={D} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"
        )
        .into_bytes(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        b"GET /v2/\x00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n".to_vec(),
        common::random_bytes(64 * 1024, 92),
    ];
    // A request line far beyond any limit.
    let mut long = b"GET /v2/".to_vec();
    long.extend(std::iter::repeat_n(b'a', 200_000));
    long.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    inputs.push(long);
    for (i, input) in inputs.iter().enumerate() {
        let raw = raw_send(&server, input);
        // An error status, or the connection closed without an answer.
        match raw_status(&raw) {
            Some(400 | 414 | 431 | 501 | 505) => {}
            None if raw.is_empty() => {}
            _ => panic!("input {i}: expected 400 or a closed connection, got {raw:?}"),
        }
        assert_alive(&server);
    }
    assert_intact(&server, &img);
    assert_eq!(snapshot(&server.data_dir), before, "stored data changed");
}

/// Sends a request whose Content-Length promises more than is sent, then closes the socket.
fn send_truncated(server: &Server, head: &str, promised: usize, sent: &[u8]) {
    let mut s = TcpStream::connect(server.addr).unwrap();
    let req = format!(
        "{head}Content-Length: {promised}\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    drop(s);
}

// spec: Push / Pushing a blob monolithically ("The Content-Length header MUST match"): a body cut
// short by a dropped connection publishes nothing
#[test]
fn truncated_uploads_leave_nothing_visible() {
    let server = Server::start();
    let img = stored(&server);
    let full = common::random_bytes(1 << 20, 93);
    let digest = common::sha256(&full);
    let cut = &full[..100_000];

    // Single POST.
    send_truncated(
        &server,
        &format!("POST /v2/trunc/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n"),
        full.len(),
        cut,
    );
    assert_alive(&server);
    get(&server, &format!("/v2/trunc/blobs/{digest}")).assert_status(404);

    // POST then a truncated PUT.
    let location = start_upload(&server, "trunc");
    send_truncated(
        &server,
        &format!(
            "PUT {}?digest={digest} HTTP/1.1\r\nHost: x\r\n",
            location_path(&location)
        ),
        full.len(),
        cut,
    );
    assert_alive(&server);
    get(&server, &format!("/v2/trunc/blobs/{digest}")).assert_status(404);

    // A truncated PATCH, then a closing PUT: the digest cannot match.
    let location = start_upload(&server, "trunc");
    send_truncated(
        &server,
        &format!("PATCH {} HTTP/1.1\r\nHost: x\r\n", location_path(&location)),
        full.len(),
        cut,
    );
    assert_alive(&server);
    let r = put_upload(&server, &location, &digest, b"");
    assert!(
        (400..500).contains(&r.status),
        "closing a truncated session must fail: {}",
        r.describe()
    );
    get(&server, &format!("/v2/trunc/blobs/{digest}")).assert_status(404);

    // A manifest cut short.
    let m = to_bytes(&image_manifest_value(&img.config, &[]));
    send_truncated(
        &server,
        &format!("PUT /v2/safe/repo/manifests/cut HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\n"),
        m.len() + 1000,
        &m,
    );
    assert_alive(&server);
    get(&server, "/v2/safe/repo/manifests/cut").assert_status(404);

    assert_blobs_hash_to_their_names(&server.data_dir);
    assert_intact(&server, &img);
    // The full blob can still be pushed afterwards.
    push_blob(&server, "trunc", &full);
    assert_eq!(
        get(&server, &format!("/v2/trunc/blobs/{digest}")).body,
        full
    );
}

/// Eight fresh connections at once (so every core of the data plane gets some), each must be
/// answered 200 with the manifest within the raw read timeout.
fn assert_everyone_else_is_served(server: &Server, img: &Image) {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| raw_with(server, "GET", "/v2/safe/repo/manifests/v1", &[])))
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let raw = h.join().unwrap();
            assert_eq!(
                raw_status(&raw),
                Some(200),
                "connection {i} was not answered within 5 s while slow clients were connected: {raw:?}"
            );
            assert_eq!(raw_body(&raw).as_bytes(), img.manifest.as_slice());
        }
    });
}

// Limits ("header time"): clients that send their request head slowly do not hold up others
#[test]
fn slow_request_heads_do_not_block_other_clients() {
    let server = Server::start();
    let img = stored(&server);
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        slow.push(s);
    }
    assert_everyone_else_is_served(&server, &img);
    drop(slow);
    assert_intact(&server, &img);
}

// spec: Pull / Pulling blobs, with a client that asks for a large blob and does not read it (a
// stalled or slow network): other clients are still served
#[test]
fn clients_that_do_not_read_their_answer_do_not_block_other_clients() {
    let server = Server::start();
    let img = stored(&server);
    let big = common::random_bytes(16 * 1024 * 1024, 94);
    let big_digest = push_blob(&server, "safe/repo", &big);
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(
            format!("GET /v2/safe/repo/blobs/{big_digest} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .unwrap();
        slow.push(s);
    }
    assert_everyone_else_is_served(&server, &img);
    drop(slow);
    assert_intact(&server, &img);
}
