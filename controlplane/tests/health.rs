//! `/healthz` and `/readyz` on the registry port (the probes of deploy/): answered by the data
//! plane without credentials, over HTTP or HTTPS; readiness also says when the control plane is
//! not taking connections or the disk is too full, with the reason.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::Server;

fn get(url: &str) -> (u16, String) {
    let r = Server::client().get(url).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

#[test]
fn health_is_answered_without_credentials_when_access_control_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lighter.toml");
    std::fs::write(
        &cfg,
        "[auth]\n[[auth.rules]]\nprefix = \"\"\npush = [\"authenticated\"]\n",
    )
    .unwrap();
    let server = Server::launch_temp(|l| l.args(&["--config", cfg.to_str().unwrap()]));
    assert_eq!(
        get(&server.url("/healthz")),
        (200, r#"{"status":"ok"}"#.to_string())
    );
    assert_eq!(
        get(&server.url("/readyz")),
        (200, r#"{"status":"ready"}"#.to_string())
    );
    let r = Server::client().head(server.url("/readyz")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    // The registry API itself still wants credentials.
    assert_eq!(get(&server.url("/v2/")).0, 401);
    // Nothing else outside /v2/.
    assert_eq!(get(&server.url("/healthzz")).0, 404);
}

#[test]
fn readyz_says_when_the_disk_is_below_its_minimum() {
    let server = Server::start_args(&["--disk-free-min-bytes", "1000000000000000000"]);
    let (status, body) = get(&server.url("/readyz"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("below disk_free_min_bytes"), "{body}");
    assert_eq!(get(&server.url("/healthz")).0, 200);
}

#[test]
fn readyz_says_when_the_control_plane_is_not_there() {
    // The data plane alone (its control plane not started): alive, not ready.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lighter"))
        .args(["data-plane", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("data plane exited before listening")
            .unwrap();
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let (status, body) = get(&format!("http://{addr}/readyz"));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("control plane"), "{body}");
}
