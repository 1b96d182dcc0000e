//! A `lighter serve` with its admission webhooks on HTTPS (a CA and certificate made with the
//! `openssl` CLI), and a client that sends AdmissionReviews as the API server does.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::tls::{https_client, make_ca, make_leaf};
use super::Server;

/// Starts `launch` with its admission webhooks on an ephemeral loopback port, serving `cert`
/// and `key`, with `config` as its config file; the server and the webhooks' address.
pub fn start_webhooks(
    launch: super::Launch,
    cert: &Path,
    key: &Path,
    config: &Path,
) -> (Server, SocketAddr) {
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let server = launch
        .args(&[
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-tls-cert-path",
            &s(cert),
            "--webhook-tls-key-path",
            &s(key),
            "--config",
            &s(config),
            "--cores",
            "1",
        ])
        .start();
    let marker = "admission webhooks on https://";
    let line = server
        .wait_for_log(marker, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no {marker:?}:\n{}", server.log_lines().join("\n")));
    let rest = &line[line.find(marker).unwrap() + marker.len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    let addr = addr
        .parse()
        .unwrap_or_else(|e| panic!("webhook address in {line:?}: {e}"));
    (server, addr)
}

pub struct Webhook {
    pub server: Server,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    client: reqwest::blocking::Client,
}

impl Webhook {
    /// A server whose config file is `config`, with `{dir}` in it replaced by the directory
    /// that holds the certificates and the config (keys a test writes there before).
    pub fn start(dir: tempfile::TempDir, config: &str) -> Webhook {
        Webhook::start_with(dir, config, |l| l)
    }

    /// [`Webhook::start`], with more set on the launch (an environment, say).
    pub fn start_with(
        dir: tempfile::TempDir,
        config: &str,
        configure: impl FnOnce(super::Launch) -> super::Launch,
    ) -> Webhook {
        make_ca(dir.path());
        let (cert, key) = make_leaf(dir.path(), "tls", "lighter-webhook", 1001);
        let file = dir.path().join("lighter.toml");
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        std::fs::write(&file, config.replace("{dir}", &s(dir.path()))).unwrap();
        let (cert, key, file) = (s(&cert), s(&key), s(&file));
        let (server, addr) = start_webhooks(
            configure(super::Launch::new(&dir.path().join("data"))),
            Path::new(&cert),
            Path::new(&key),
            Path::new(&file),
        );
        let client = https_client(&dir.path().join("ca.crt"), true);
        Webhook {
            server,
            addr,
            dir,
            client,
        }
    }

    /// POSTs `review` to `path` (`/validate`, `/mutate`); asserts the envelope the API server
    /// needs (200, an AdmissionReview with the request's uid); returns `response`.
    pub fn review(&self, path: &str, review: &Value) -> Value {
        let resp = self
            .client
            .post(format!("https://{}{path}", self.addr))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(review).unwrap())
            .send()
            .unwrap_or_else(|e| panic!("POST {path}: {e:?}"));
        assert_eq!(resp.status().as_u16(), 200, "POST {path}");
        let text = resp.text().expect("body");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1", "{body}");
        assert_eq!(body["kind"], "AdmissionReview", "{body}");
        assert_eq!(body["response"]["uid"], review["request"]["uid"], "{body}");
        body["response"].clone()
    }
}
