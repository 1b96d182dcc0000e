//! HTTPS on the registry port (`tls_cert_path`, `tls_key_path`): pulls answered by the data
//! plane through its TLS sessions, requests for the control plane relayed through a socket pair
//! (with the client's address), certificates reloaded when their files change, plaintext and
//! garbage refused without harm. Real sockets, a real client (reqwest + rustls) trusting only
//! the test CA: no insecure flags.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::tls::{https_client, make_ca, make_leaf};
use common::{random_bytes, sha256, Launch, Server};

/// A server with `leaf.crt`/`leaf.key` (made in `dir`) and `extra` TOML appended.
fn start_https(dir: &Path, extra: &str) -> Server {
    let (crt, key) = make_leaf(dir, "leaf", "registry", 1);
    let cfg = dir.join("lighter.toml");
    std::fs::write(
        &cfg,
        format!(
            "tls_cert_path = {:?}\ntls_key_path = {:?}\n{extra}",
            crt.display().to_string(),
            key.display().to_string()
        ),
    )
    .unwrap();
    Server::launch_temp(|l: Launch| l.args(&["--config", cfg.to_str().unwrap()]))
}

fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path());
    dir
}

#[test]
fn https_pulls_and_relayed_pushes_keep_every_byte() {
    let pki = pki();
    let server = start_https(pki.path(), "");
    let c = https_client(&pki.path().join("ca.crt"), true);
    assert!(server
        .log_lines()
        .iter()
        .any(|l| l.contains("encrypting in user space")));

    // A chunked push (OCI distribution spec, "Pushing a blob in chunks") through the relay:
    // POST, two PATCHes, PUT.
    let blob = random_bytes(20 << 20, 7);
    let digest = sha256(&blob);
    let r = c
        .post(server.https_url("/v2/tls/app/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut location = r.headers()["location"].to_str().unwrap().to_owned();
    let half = blob.len() / 2;
    for (start, part) in [(0, &blob[..half]), (half, &blob[half..])] {
        let url = if location.starts_with('/') {
            server.https_url(&location)
        } else {
            location.clone()
        };
        let r = c
            .patch(url)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{start}-{}", start + part.len() - 1),
            )
            .body(part.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text());
        location = r.headers()["location"].to_str().unwrap().to_owned();
    }
    let url = if location.starts_with('/') {
        server.https_url(&location)
    } else {
        location.clone()
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = c.put(format!("{url}{sep}digest={digest}")).send().unwrap();
    assert_eq!(r.status(), 201);

    // Pulled back by the data plane over TLS: whole, a range, HEAD; many on one connection.
    for _ in 0..3 {
        let r = c
            .get(server.https_url(&format!("/v2/tls/app/blobs/{digest}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
        let body = r.bytes().unwrap();
        assert_eq!(body.len(), blob.len());
        assert_eq!(sha256(&body), digest);
    }
    let r = c
        .get(server.https_url(&format!("/v2/tls/app/blobs/{digest}")))
        .header("range", "bytes=1000000-1999999")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1000000-1999999/{}", blob.len()).as_str()
    );
    assert_eq!(&r.bytes().unwrap()[..], &blob[1_000_000..2_000_000]);
    let r = c
        .head(server.https_url(&format!("/v2/tls/app/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        blob.len().to_string().as_str()
    );
}

#[test]
fn relayed_connections_carry_the_client_address() {
    // anonymous_cidrs decides on the client's address; a request relayed to the control plane
    // (the tag list) must be judged on 127.0.0.1, not on the socket pair's nothing.
    let rules = |cidr: &str| {
        format!(
            "[auth]\nanonymous_cidrs = [\"{cidr}\"]\n[[auth.rules]]\nprefix = \"\"\npull = [\"anonymous\"]\n"
        )
    };
    let pki = pki();
    let inside = start_https(pki.path(), &rules("127.0.0.0/8"));
    let c = https_client(&pki.path().join("ca.crt"), false);
    let r = c
        .get(inside.https_url("/v2/some/repo/tags/list"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "allowed, and there is no such repository");
    assert!(r.text().unwrap().contains("NAME_UNKNOWN"));
    drop(inside);

    let outside = start_https(pki.path(), &rules("198.18.0.0/15"));
    let r = c
        .get(outside.https_url("/v2/some/repo/tags/list"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.starts_with(&format!(
            "Bearer realm=\"https://{}/v2/_lighter/token\"",
            outside.host()
        )),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"repository:some/repo:pull\""));
}

#[test]
fn the_certificate_is_reloaded_when_its_files_change() {
    let pki = pki();
    let server = start_https(pki.path(), "");
    let served = |c: &reqwest::blocking::Client| {
        let r = c.get(server.https_url("/v2/")).send().unwrap();
        assert_eq!(r.status(), 200);
        r.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
            .expect("peer certificate")
    };
    let der = |pem_path: &Path| {
        let pem = std::fs::read_to_string(pem_path).unwrap();
        let b64: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .join("");
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
    };
    let ca = pki.path().join("ca.crt");
    assert_eq!(
        served(&https_client(&ca, false)),
        der(&pki.path().join("leaf.crt"))
    );

    // A new pair, renamed over the old files (as a Secret update or cert-manager does).
    let (crt, key) = make_leaf(pki.path(), "next", "registry-next", 2);
    std::fs::rename(&key, pki.path().join("leaf.key")).unwrap();
    std::fs::rename(&crt, pki.path().join("leaf.crt")).unwrap();
    let want = der(&pki.path().join("leaf.crt"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served(&https_client(&ca, false)) == want {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate not served");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(server
        .wait_for_log("TLS certificate reloaded", Duration::from_secs(10))
        .is_some());
}

#[test]
fn plaintext_and_garbage_on_the_https_port_are_refused_and_serving_goes_on() {
    let pki = pki();
    let server = start_https(pki.path(), "");
    // Plain HTTP: no HTTP answer, the connection is closed (with a TLS alert at most).
    let got = server.raw(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!got.contains("HTTP/1.1 200"), "{got:?}");
    // A ClientHello cut short, then silence: the connection is dropped, not kept forever.
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    s.write_all(&random_bytes(64, 3)).unwrap();
    drop(s);
    // Random bytes as a handshake.
    for seed in 0..20 {
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&random_bytes(512, seed));
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }
    let c = https_client(&pki.path().join("ca.crt"), false);
    for _ in 0..5 {
        assert_eq!(
            c.get(server.https_url("/v2/")).send().unwrap().status(),
            200
        );
    }
}

#[test]
fn tls_needs_both_files_and_says_which_is_wrong() {
    let pki = pki();
    let (crt, _key) = make_leaf(pki.path(), "leaf", "registry", 1);
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lighter"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--tls-cert-path")
        .arg(&crt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls_cert_path and tls_key_path go together"),
        "{err}"
    );

    // A key that is not the certificate's.
    let (_, other_key) = make_leaf(pki.path(), "other", "other", 2);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lighter"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--tls-cert-path")
        .arg(&crt)
        .arg("--tls-key-path")
        .arg(&other_key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not belong together"), "{err}");
}

#[test]
fn lighter_gc_reaches_an_https_registry_with_credentials() {
    let pki = pki();
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", "ops", "hunter22"])
        .output()
        .expect("htpasswd (apache2-utils)");
    std::fs::write(pki.path().join("htpasswd"), &out.stdout).unwrap();
    let server = start_https(
        pki.path(),
        &format!(
            "[auth]\nhtpasswd_file = {:?}\n[[auth.rules]]\nprefix = \"\"\npull = [\"anonymous\"]\nadmin = [\"user:ops\"]\n",
            pki.path().join("htpasswd").display().to_string()
        ),
    );
    let gc = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lighter"))
            .args(["gc", "--dry-run", "--registry"])
            .arg(server.https_url(""))
            .arg("--ca-file")
            .arg(pki.path().join("ca.crt"))
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = gc(&["--credentials", "ops:hunter22"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["dry_run"], true, "{report}");
    let refused = gc(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn a_stalled_handshake_is_dropped_after_the_header_timeout() {
    let pki = pki();
    let server = start_https(pki.path(), "request_header_timeout_ms = 1000\n");
    let started = Instant::now();
    // Half a ClientHello, then silence (slowloris on the handshake).
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
        "closed after {waited:?}, request_header_timeout_ms is 1000 (idle_timeout_ms 60000)"
    );
    let c = https_client(&pki.path().join("ca.crt"), false);
    assert_eq!(
        c.get(server.https_url("/v2/")).send().unwrap().status(),
        200
    );
}
