//! A `lighter serve` with HTTPS on the registry port and access control on, for the client
//! suites: a test CA and a leaf certificate for 127.0.0.1 and localhost (`common::tls`), an
//! htpasswd file made with `htpasswd -B` (bcrypt, as the control plane wants), and a TOML
//! configuration with the rules given, started by `common::Server` (which takes the address from
//! `listening on https://`). Killed (the whole process tree) on drop.
//!
//! Include it next to `common` with
//! `#[path = "common/clients_auth_helpers.rs"] mod clients_auth_helpers;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::clients::Tools;
use crate::common::{tls, Server};

pub struct SecureServer {
    /// Declared first, so the server stops before its certificates and configuration go.
    server: Server,
    dir: tempfile::TempDir,
}

impl SecureServer {
    /// A server whose htpasswd file holds `users` (name, password) and whose configuration ends
    /// with `rules` (TOML: `[[auth.rules]]` tables).
    pub fn start(users: &[(&str, &str)], rules: &str) -> SecureServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path();
        let pki = p.join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        tls::make_ca(&pki);
        let (crt, key) = tls::make_leaf(&pki, "registry", "127.0.0.1", 2);
        // What the containers tools take as `--cert-dir`: every `*.crt` there is a CA to trust
        // (and a `*.key` would be taken for a client certificate's), so the CA alone.
        std::fs::create_dir_all(p.join("certs")).unwrap();
        std::fs::copy(pki.join("ca.crt"), p.join("certs/ca.crt")).unwrap();

        let htpasswd = p.join("htpasswd");
        for (i, (user, password)) in users.iter().enumerate() {
            let mut cmd = Command::new("htpasswd");
            cmd.arg(if i == 0 { "-Bbc" } else { "-Bb" })
                .arg(&htpasswd)
                .args([user, password]);
            let out = cmd
                .output()
                .expect("run htpasswd (apt-get install apache2-utils)");
            assert!(out.status.success(), "htpasswd: {out:?}");
        }

        let config = p.join("lighter.toml");
        std::fs::write(
            &config,
            format!(
                "tls_cert_path = {crt:?}\ntls_key_path = {key:?}\n\n[auth]\nhtpasswd_file = {htpasswd:?}\n\n{rules}\n",
            ),
        )
        .unwrap();
        let server = Server::launch_temp(|l| l.args(&["--config", config.to_str().unwrap()]));
        SecureServer { server, dir }
    }

    /// `127.0.0.1:PORT`, as clients want it.
    pub fn host(&self) -> String {
        self.server.host()
    }

    /// `https://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        self.server.https_url(path)
    }

    /// The test CA's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// A directory holding only `ca.crt`: `--cert-dir` of skopeo, podman and buildah.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// A home for skopeo, podman and buildah that trusts the test CA for this server.
    pub fn tools(&self) -> Tools {
        Tools::https(self.host(), &self.cert_dir())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An HTTPS client trusting only the test CA.
    pub fn client(&self) -> reqwest::blocking::Client {
        tls::https_client(&self.ca(), true)
    }

    /// Lines the server has logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.server.log_lines()
    }

    /// Lines logged that contain every one of `needles`, once there are at least `at_least` of
    /// them (the log is read by another thread: a line the server wrote a moment ago may not be
    /// in yet), or after 10 s, what there is.
    pub fn log_matching(&self, needles: &[&str], at_least: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let found: Vec<String> = self
                .log_lines()
                .into_iter()
                .filter(|l| needles.iter().all(|n| l.contains(n)))
                .collect();
            if found.len() >= at_least || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The log so far, for messages.
    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }
}
