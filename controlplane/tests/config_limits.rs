//! Configured limits (`manifest_size_max_bytes`, `request_header_size_max_bytes`,
//! `upload_sessions_max`, `connections_max`): each settable by flag, TOML file (`--config`) and
//! environment (`LIGHTER_<NAME>`), each enforced, and each slot released when its holder is done.

mod common;
mod oci;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;
use oci::*;
use serde_json::json;

/// An OCI manifest of exactly `size` bytes over the `{}` config.
fn manifest_of_size(size: usize) -> Vec<u8> {
    let mut v = image_manifest_value(b"{}", &[]);
    v["annotations"] = json!({"pad": ""});
    let base = to_bytes(&v).len();
    v["annotations"]["pad"] = json!("x".repeat(size - base));
    let out = to_bytes(&v);
    assert_eq!(out.len(), size);
    out
}

/// Asserts the manifest limit is `limit`: a manifest of `limit` bytes is accepted, one more is 413.
fn assert_manifest_limit(server: &Server, limit: usize) {
    push_blob(server, "limits", b"{}");
    push_manifest(
        server,
        "limits",
        "at",
        OCI_MANIFEST,
        &manifest_of_size(limit),
    );
    put_manifest(
        server,
        "limits",
        "over",
        OCI_MANIFEST,
        &manifest_of_size(limit + 1),
    )
    .assert_error(413, "MANIFEST_INVALID");
}

/// A GET /v2/ with one padding header of `size` bytes, on a raw connection; returns the status.
fn status_with_header_of(server: &Server, size: usize) -> Option<u16> {
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let req = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(size)
    );
    let _ = stream.write_all(req.as_bytes());
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    raw_status(&String::from_utf8_lossy(&out))
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("lighter.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

// Convention: limits in a TOML file given by `--config`, snake_case names
#[test]
fn limits_from_config_file_apply() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "manifest_size_max_bytes = 2000\n\
         request_header_size_max_bytes = 10000\n\
         upload_sessions_max = 3\n\
         connections_max = 64\n",
    );
    let server = Server::start_args(&["--config", &config]);
    assert_manifest_limit(&server, 2000);
    assert_eq!(status_with_header_of(&server, 6_000), Some(200));
    assert_eq!(status_with_header_of(&server, 12_000), Some(431));
    for _ in 0..3 {
        start_upload(&server, "sessions");
    }
    assert_ne!(
        post_upload_status(&server),
        202,
        "a 4th session beyond upload_sessions_max = 3"
    );
}

// Convention: limits from `LIGHTER_<NAME>` environment variables
#[test]
fn limits_from_environment_apply() {
    let server = common::start_with_env(
        &[],
        &[
            ("LIGHTER_MANIFEST_SIZE_MAX_BYTES", "3000"),
            ("LIGHTER_REQUEST_HEADER_SIZE_MAX_BYTES", "10000"),
            ("LIGHTER_UPLOAD_SESSIONS_MAX", "2"),
            ("LIGHTER_CONNECTIONS_MAX", "64"),
        ],
    );
    assert_manifest_limit(&server, 3000);
    assert_eq!(status_with_header_of(&server, 6_000), Some(200));
    assert_eq!(status_with_header_of(&server, 12_000), Some(431));
    start_upload(&server, "sessions");
    start_upload(&server, "sessions");
    assert_ne!(
        post_upload_status(&server),
        202,
        "a 3rd session beyond upload_sessions_max = 2"
    );
}

// Convention: `--request-header-size-max-bytes`; RFC 6585 section 5 (431)
#[test]
fn request_header_limit_from_flag_is_431_above_and_200_below() {
    let server = Server::start_args(&["--request-header-size-max-bytes", "10000"]);
    assert_eq!(status_with_header_of(&server, 6_000), Some(200));
    assert_eq!(status_with_header_of(&server, 12_000), Some(431));
    assert_eq!(status_with_header_of(&server, 50_000), Some(431));
    assert_alive(&server);
}

fn post_upload_status(server: &Server) -> u16 {
    let r = open_upload(server, "sessions", "");
    if r.status != 202 {
        assert!(
            matches!(r.status, 429 | 503),
            "a session refused for the limit should be 429 or 503: {}",
            r.describe()
        );
        if r.status == 429 {
            assert_eq!(r.error_codes()[0], "TOOMANYREQUESTS");
        }
    }
    r.status
}

// Convention: `--upload-sessions-max`; a finished or cancelled session frees its slot
#[test]
fn upload_sessions_max_refuses_extra_sessions_until_one_ends() {
    let server = Server::start_args(&["--upload-sessions-max", "2"]);
    let a = start_upload(&server, "sessions");
    let b = start_upload(&server, "sessions");
    assert_ne!(
        post_upload_status(&server),
        202,
        "a 3rd session beyond the limit of 2"
    );
    // Cancelling one frees a slot.
    delete(&server, &location_path(&a)).assert_status(204);
    let c = start_upload(&server, "sessions");
    assert_ne!(post_upload_status(&server), 202);
    // Completing one frees a slot.
    put_upload(&server, &b, &common::sha256(b"done"), b"done").assert_status(201);
    let d = start_upload(&server, "sessions");
    assert_ne!(post_upload_status(&server), 202);
    // The open sessions still work.
    for loc in [c, d] {
        put_upload(&server, &loc, &common::sha256(b"x"), b"x").assert_status(201);
    }
    start_upload(&server, "sessions");
}

// Convention: `--connections-max`; a closed connection frees its slot
#[test]
fn connections_max_releases_slots_when_connections_close() {
    let server = Server::start_args(&["--connections-max", "2"]);
    // Many more connections than the limit, one after the other.
    for i in 0..20 {
        let raw = server.raw(&raw_request("GET", "/v2/"));
        assert_eq!(raw_status(&raw), Some(200), "connection {i}: {raw}");
    }
    // Hold the limit with idle keep-alive connections, each already served once.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(raw_status(&String::from_utf8_lossy(&buf[..n])), Some(200));
        idle.push(s);
    }
    // One more connection: it is refused or waits, but the server does not fall over.
    let extra = std::thread::spawn({
        let addr = server.addr;
        move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return None;
            };
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let _ = s.write_all(&raw_request("GET", "/v2/"));
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            raw_status(&String::from_utf8_lossy(&out))
        }
    });
    drop(idle);
    let status = extra.join().unwrap();
    assert!(matches!(status, None | Some(200 | 503)), "{status:?}");
    // With the idle connections gone, new connections are served.
    for i in 0..5 {
        let raw = server.raw(&raw_request("GET", "/v2/"));
        assert_eq!(
            raw_status(&raw),
            Some(200),
            "connection {i} after the idle ones closed: {raw}"
        );
    }
}

/// Runs `lighter serve` with `args` and expects it to exit with an error; returns its stderr.
fn serve_fails(args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(common::BIN)
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data.path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "lighter serve {args:?} should refuse to start"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// Style: "CLI errors name the flag or file at fault"
#[test]
fn invalid_limit_values_are_refused_at_startup_naming_the_culprit() {
    let stderr = serve_fails(&["--manifest-size-max-bytes", "lots"]);
    assert!(stderr.contains("manifest-size-max-bytes"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "connections_max = \"many\"\n");
    let stderr = serve_fails(&["--config", &config]);
    assert!(
        stderr.contains("connections_max") || stderr.contains(&config),
        "{stderr}"
    );
}
