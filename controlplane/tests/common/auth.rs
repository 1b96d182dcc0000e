//! Helpers for the access-control suite (`tests/auth.rs`): htpasswd and groups files made with
//! Apache's `htpasswd -B`, the `[auth]` configuration of issue 12, requests with credentials,
//! the token endpoint, reading a token's claims and a challenge's parameters, and tokens
//! signed in the test (with the server's own key or an external issuer's RSA key).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{self, Server};
use crate::oci::{self, Image, Reply};

/// The users every fixture has, with their passwords. `rita` is in group `readers`.
pub const CI: (&str, &str) = ("ci", "ci-secret");
pub const BOB: (&str, &str) = ("bob", "bob-secret");
pub const RITA: (&str, &str) = ("rita", "rita-secret");

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum Cred {
    None,
    Basic(String, String),
    Bearer(String),
    /// An `Authorization` header sent as is.
    Raw(String),
}

impl Cred {
    pub fn basic((user, password): (&str, &str)) -> Cred {
        Cred::Basic(user.into(), password.into())
    }

    pub fn bearer(token: &str) -> Cred {
        Cred::Bearer(token.into())
    }

    /// The `Authorization` header's value, if any.
    pub fn header(&self) -> Option<String> {
        match self {
            Cred::None => None,
            Cred::Basic(u, p) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )),
            Cred::Bearer(t) => Some(format!("Bearer {t}")),
            Cred::Raw(v) => Some(v.clone()),
        }
    }

    pub fn apply(&self, rb: RequestBuilder) -> RequestBuilder {
        match self.header() {
            Some(v) => rb.header("Authorization", v),
            None => rb,
        }
    }
}

/// A directory for one test's auth files (htpasswd, groups, configuration, keys).
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Default for Fixture {
    fn default() -> Fixture {
        Fixture::new()
    }
}

impl Fixture {
    /// An htpasswd file with ci, bob and rita, and a groups file with `readers: rita`.
    pub fn new() -> Fixture {
        let fx = Fixture {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for u in [CI, BOB, RITA] {
            fx.add_user(u);
        }
        fx.write_groups("# groups of htpasswd users\nreaders: rita\n");
        fx
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn htpasswd(&self) -> PathBuf {
        self.path("htpasswd")
    }

    pub fn groups(&self) -> PathBuf {
        self.path("groups")
    }

    /// `htpasswd -B -b` (bcrypt at htpasswd's default cost, 5), creating the file if needed.
    pub fn add_user(&self, (user, password): (&str, &str)) {
        self.add_user_cost((user, password), 5);
    }

    pub fn add_user_cost(&self, (user, password): (&str, &str), cost: u32) {
        let file = self.htpasswd();
        let mut cmd = Command::new("htpasswd");
        cmd.arg("-B").arg("-C").arg(cost.to_string());
        if !file.exists() {
            cmd.arg("-c");
        }
        run(cmd.arg("-b").arg(&file).arg(user).arg(password));
    }

    /// `htpasswd -D`.
    pub fn remove_user(&self, user: &str) {
        run(Command::new("htpasswd")
            .arg("-D")
            .arg(self.htpasswd())
            .arg(user));
    }

    pub fn write_groups(&self, text: &str) {
        std::fs::write(self.groups(), text).expect("write groups file");
    }

    /// Writes `text` as the configuration file; its path.
    pub fn write_config(&self, text: &str) -> String {
        let path = self.path("lighter.toml");
        std::fs::write(&path, text).expect("write config");
        path.to_string_lossy().into_owned()
    }

    /// A server over a fresh data directory with `text` as its configuration file.
    pub fn start(&self, text: &str) -> Server {
        let config = self.write_config(text);
        Server::launch_temp(|l| l.args(&["--config", &config]))
    }

    /// A server with the documented configuration and `opts`.
    pub fn start_with(&self, opts: &Opts) -> Server {
        self.start(&self.config(opts))
    }

    /// The configuration of issue 12 (the `[auth]` section and its three rules) over this
    /// fixture's files, changed as `opts` says.
    pub fn config(&self, opts: &Opts) -> String {
        let cidrs = opts
            .anonymous_cidrs
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"{top}
[auth]
htpasswd_file = {htpasswd:?}
groups_file = {groups:?}
anonymous_cidrs = [{cidrs}]
token_lifetime_ms = 300000
failures_max = {failures_max}
failures_window_ms = {failures_window_ms}
authorization_size_max_bytes = 8192
{auth}
[[auth.rules]]
prefix = ""
pull = ["anonymous"]
push = ["user:ci"]
delete = ["user:ci"]

[[auth.rules]]
prefix = "private/"
pull = ["user:ci", "serviceaccount:build:builder", "namespace:prod", "group:readers"]
push = ["user:ci"]

[[auth.rules]]
prefix = "_lighter/metrics"
admin = ["anonymous"]

{tables}
"#,
            top = opts.top,
            htpasswd = self.htpasswd().to_string_lossy(),
            groups = self.groups().to_string_lossy(),
            failures_max = opts.failures_max,
            failures_window_ms = opts.failures_window_ms,
            auth = opts.auth,
            tables = opts.tables,
        )
    }

    /// An RSA key pair made with openssl: (private key PEM path, public key PEM path).
    pub fn rsa_key(&self, name: &str) -> (PathBuf, PathBuf) {
        let private = self.path(&format!("{name}.key.pem"));
        let public = self.path(&format!("{name}.pub.pem"));
        run(Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .arg("-out")
            .arg(&private));
        run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public));
        (private, public)
    }
}

/// What a test changes of the documented configuration.
pub struct Opts {
    /// `anonymous_cidrs`. The documentation's `198.18.0.0/15` would refuse anonymous requests
    /// from 127.0.0.1, so [`Opts::default`] has none (anonymous from anywhere).
    pub anonymous_cidrs: Vec<String>,
    pub failures_max: u32,
    pub failures_window_ms: u64,
    /// Top-level lines, before `[auth]`.
    pub top: String,
    /// More lines of `[auth]`.
    pub auth: String,
    /// More tables after the rules (`[[auth.rules]]`, `[[auth.issuers]]`).
    pub tables: String,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            anonymous_cidrs: Vec::new(),
            failures_max: 1000,
            failures_window_ms: 60_000,
            top: String::new(),
            auth: String::new(),
            tables: String::new(),
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- requests ---------------------------------------------------------------------------------

/// A client whose connections come from `ip` (a local address).
pub fn client_from(ip: IpAddr) -> Client {
    reqwest::blocking::Client::builder()
        .local_address(ip)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn call(server: &Server, method: Method, path: &str, cred: &Cred) -> Reply {
    oci::send(cred.apply(oci::client().request(method, server.url(path))))
}

pub fn get_as(server: &Server, path: &str, cred: &Cred) -> Reply {
    call(server, Method::GET, path, cred)
}

pub fn head_as(server: &Server, path: &str, cred: &Cred) -> Reply {
    call(server, Method::HEAD, path, cred)
}

pub fn delete_as(server: &Server, path: &str, cred: &Cred) -> Reply {
    call(server, Method::DELETE, path, cred)
}

/// `GET` of a manifest, accepting OCI image manifests.
pub fn get_manifest_as(server: &Server, repo: &str, reference: &str, cred: &Cred) -> Reply {
    oci::send(cred.apply(oci::req::get_manifest(
        server,
        repo,
        reference,
        oci::OCI_MANIFEST,
    )))
}

/// A single-POST blob push.
pub fn post_blob_as(server: &Server, repo: &str, bytes: &[u8], cred: &Cred) -> Reply {
    let digest = common::sha256(bytes);
    oci::send(cred.apply(oci::req::post_blob(server, repo, &digest, bytes.to_vec())))
}

/// `POST /v2/<repo>/blobs/uploads/?<query>` without a body (a session, or a mount).
pub fn open_upload_as(server: &Server, repo: &str, query: &str, cred: &Cred) -> Reply {
    oci::send(cred.apply(oci::req::open_upload(server, repo, query)))
}

pub fn put_manifest_as(
    server: &Server,
    repo: &str,
    reference: &str,
    body: &[u8],
    cred: &Cred,
) -> Reply {
    oci::send(cred.apply(oci::req::put_manifest(
        server,
        repo,
        reference,
        oci::OCI_MANIFEST,
        body.to_vec(),
    )))
}

/// Pushes a config, two layers and a manifest tagged `tag` as `cred`, asserting each push.
pub fn push_image_as(server: &Server, repo: &str, tag: &str, seed: u64, cred: &Cred) -> Image {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let layers = vec![
        common::random_bytes(1000 + seed as usize % 1000, seed),
        common::random_bytes(3000, seed ^ 0xABCD),
    ];
    for blob in std::iter::once(&config).chain(&layers) {
        let r = post_blob_as(server, repo, blob, cred);
        assert_eq!(r.status, 201, "push a blob to {repo}: {}", r.describe());
    }
    let layer_refs: Vec<&[u8]> = layers.iter().map(|l| l.as_slice()).collect();
    let manifest = oci::to_bytes(&oci::image_manifest_value(&config, &layer_refs));
    let r = put_manifest_as(server, repo, tag, &manifest, cred);
    assert_eq!(r.status, 201, "push {repo}:{tag}: {}", r.describe());
    let digest = common::sha256(&manifest);
    assert_eq!(r.header("Docker-Content-Digest"), digest);
    Image {
        config,
        layers,
        manifest,
        digest,
    }
}

/// Asserts that `cred` pulls `image` from `repo` whole: the manifest by tag (GET and HEAD) and
/// every blob (GET and HEAD), bytes and `Docker-Content-Digest` as pushed.
pub fn assert_pulls(server: &Server, repo: &str, tag: &str, image: &Image, cred: &Cred) {
    let r = get_manifest_as(server, repo, tag, cred);
    assert_eq!(
        r.status,
        200,
        "GET {repo}:{tag} as {cred:?}: {}",
        r.describe()
    );
    assert_eq!(r.body, image.manifest, "manifest bytes of {repo}:{tag}");
    assert_eq!(r.header("Docker-Content-Digest"), image.digest);
    let r = oci::send(cred.apply(oci::req::head_manifest(
        server,
        repo,
        tag,
        oci::OCI_MANIFEST,
    )));
    assert_eq!(r.status, 200, "HEAD {repo}:{tag}: {}", r.describe());
    assert_eq!(r.header("Docker-Content-Digest"), image.digest);
    assert_eq!(r.header("Content-Length"), image.manifest.len().to_string());
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let digest = common::sha256(blob);
        let path = format!("/v2/{repo}/blobs/{digest}");
        let r = get_as(server, &path, cred);
        assert_eq!(r.status, 200, "GET {path} as {cred:?}: {}", r.describe());
        assert_eq!(&r.body, blob, "bytes of {path}");
        assert_eq!(r.header("Docker-Content-Digest"), digest);
        let r = head_as(server, &path, cred);
        assert_eq!(r.status, 200, "HEAD {path}: {}", r.describe());
        assert_eq!(r.header("Content-Length"), blob.len().to_string());
        assert_eq!(r.header("Docker-Content-Digest"), digest);
    }
}

/// Whether the data plane answered: the control plane's answers (hyper's) carry `Date`, the
/// data plane's do not (it keeps no clock per request).
pub fn from_data_plane(r: &Reply) -> bool {
    r.header_opt("Date").is_none()
}

/// [`assert_pulls`], and the data plane answered the manifest and blob `GET`s itself (the
/// rules or the token allowed them there, no handoff).
pub fn assert_pulls_from_data_plane(
    server: &Server,
    repo: &str,
    tag: &str,
    image: &Image,
    cred: &Cred,
) {
    assert_pulls(server, repo, tag, image, cred);
    let r = get_manifest_as(server, repo, tag, cred);
    assert!(
        from_data_plane(&r),
        "GET {repo}:{tag} handed over: {}",
        r.describe()
    );
    let path = format!("/v2/{repo}/blobs/{}", common::sha256(&image.layers[0]));
    let r = get_as(server, &path, cred);
    r.assert_status(200);
    assert!(
        from_data_plane(&r),
        "GET {path} handed over: {}",
        r.describe()
    );
}

/// Asserts that `cred` gets none of `image` from `repo`, each answer being `status` with the
/// OCI error `code` (HEAD: the status, no body), and returns the GET manifest reply.
pub fn assert_no_content(
    server: &Server,
    repo: &str,
    tag: &str,
    image: &Image,
    cred: &Cred,
    status: u16,
    code: &str,
) -> Reply {
    let manifest = get_manifest_as(server, repo, tag, cred);
    manifest.assert_error(status, code);
    let by_digest = get_manifest_as(server, repo, &image.digest, cred);
    by_digest.assert_error(status, code);
    let r = head_as(server, &format!("/v2/{repo}/manifests/{tag}"), cred);
    assert_eq!(r.status, status, "HEAD manifest: {}", r.describe());
    assert!(r.body.is_empty());
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let path = format!("/v2/{repo}/blobs/{}", common::sha256(blob));
        let r = get_as(server, &path, cred);
        // An OCI error body, so not the blob.
        r.assert_error(status, code);
        let r = head_as(server, &path, cred);
        assert_eq!(r.status, status, "HEAD {path}: {}", r.describe());
        assert!(r.header_opt("Docker-Content-Digest").is_none(), "{path}");
    }
    manifest
}

// ---- challenges and tokens ------------------------------------------------------------------

/// The parameters of a `WWW-Authenticate: Bearer k="v",...` challenge.
pub fn challenge(reply: &Reply) -> BTreeMap<String, String> {
    let value = reply.header("WWW-Authenticate");
    let rest = value
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("not a Bearer challenge: {value}"));
    let mut out = BTreeMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=').expect("key=value in the challenge");
        let after = after
            .strip_prefix('"')
            .expect("quoted value in the challenge");
        let (val, after) = after
            .split_once('"')
            .expect("closing quote in the challenge");
        out.insert(key.trim().to_string(), val.to_string());
        s = after.trim_start_matches(',').trim();
    }
    out
}

/// Asserts a 401 UNAUTHORIZED with a Bearer challenge whose realm is this server's token
/// endpoint, with `scope` and `error` as given (None: absent). HEAD replies have no body.
pub fn assert_401(server: &Server, r: &Reply, scope: Option<&str>, error: Option<&str>) {
    assert_eq!(r.status, 401, "status; reply: {}", r.describe());
    if !r.body.is_empty() {
        r.assert_error(401, "UNAUTHORIZED");
    }
    let c = challenge(r);
    assert_eq!(
        c.get("realm").map(String::as_str),
        Some(server.url("/v2/_lighter/token").as_str()),
        "realm: {}",
        r.describe()
    );
    assert_eq!(c.get("service").map(String::as_str), Some("lighter"));
    assert_eq!(
        c.get("scope").map(String::as_str),
        scope,
        "scope: {}",
        r.describe()
    );
    assert_eq!(
        c.get("error").map(String::as_str),
        error,
        "error: {}",
        r.describe()
    );
}

/// `GET /v2/_lighter/token?service=lighter&scope=...` as `cred`.
pub fn token_get(server: &Server, cred: &Cred, scopes: &[&str]) -> Reply {
    let mut query: Vec<(&str, &str)> = vec![("service", "lighter")];
    query.extend(scopes.iter().map(|s| ("scope", *s)));
    oci::send(
        cred.apply(
            oci::client()
                .get(server.url("/v2/_lighter/token"))
                .query(&query),
        ),
    )
}

/// `POST /v2/_lighter/token` with `form` (the OAuth2 password or refresh-token grant).
pub fn token_post(server: &Server, form: &[(&str, &str)]) -> Reply {
    oci::send(
        oci::client()
            .post(server.url("/v2/_lighter/token"))
            .form(form),
    )
}

/// The token of a successful `GET` of the token endpoint, asserting the answer's shape.
pub fn token(server: &Server, cred: &Cred, scopes: &[&str]) -> String {
    let r = token_get(server, cred, scopes);
    assert_eq!(r.status, 200, "token for {scopes:?}: {}", r.describe());
    let v = r.json();
    let t = v["token"].as_str().expect("token").to_string();
    assert_eq!(v["access_token"].as_str(), Some(t.as_str()));
    assert!(v["expires_in"].as_u64().is_some_and(|s| s > 0), "{v}");
    assert!(v["issued_at"].as_str().is_some(), "{v}");
    t
}

/// The claims of a JWT (not verified).
pub fn claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {token}");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).expect("base64url header"))
        .expect("JSON header");
    assert_eq!(header["alg"], "EdDSA", "{header}");
    serde_json::from_slice(&b64.decode(parts[1]).expect("base64url payload")).expect("JSON payload")
}

/// The `access` claim as `name → sorted actions`.
pub fn access(token: &str) -> BTreeMap<String, Vec<String>> {
    let c = claims(token);
    let mut out = BTreeMap::new();
    for a in c["access"].as_array().expect("access claim") {
        // Lighter's own endpoints (`registry:catalog:*`) are another resource type.
        if a["type"] == "registry" {
            continue;
        }
        assert_eq!(a["type"], "repository", "{a}");
        let mut actions: Vec<String> = a["actions"]
            .as_array()
            .expect("actions")
            .iter()
            .map(|x| x.as_str().expect("action").to_string())
            .collect();
        actions.sort();
        out.insert(a["name"].as_str().expect("name").to_string(), actions);
    }
    out
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of the token spec's shape: `pull` on each of `repos`, valid for a minute.
pub fn claims_for(iss: &str, sub: &str, aud: &str, repos: &[(&str, &[&str])]) -> Value {
    let now = unix_now();
    json!({
        "iss": iss,
        "sub": sub,
        "aud": aud,
        "exp": now + 60,
        "nbf": now - 1,
        "iat": now,
        "access": repos.iter().map(|(name, actions)| json!({
            "type": "repository",
            "name": name,
            "actions": actions,
        })).collect::<Vec<_>>(),
    })
}

/// `claims` signed with the server's own Ed25519 key (kept in its data directory).
pub fn sign_own(server: &Server, claims: &Value) -> String {
    let pem = std::fs::read(server.data_dir.join("auth").join("token-key.pem"))
        .expect("the server's token key");
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).expect("Ed25519 PEM");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &key,
    )
    .unwrap()
}

/// `claims` signed RS256 with an RSA private key file.
pub fn sign_rsa(private_key: &Path, claims: &Value) -> String {
    let pem = std::fs::read(private_key).expect("RSA key");
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).expect("RSA PEM");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        &key,
    )
    .unwrap()
}

/// `claims` under `{"alg":"none"}` with an empty signature.
pub fn unsigned(claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(serde_json::to_vec(claims).unwrap())
    )
}

/// The server's counters.
pub fn metrics(server: &Server, cred: &Cred) -> std::collections::HashMap<String, u64> {
    let r = get_as(server, "/v2/_lighter/metrics", cred);
    assert_eq!(r.status, 200, "metrics: {}", r.describe());
    common::prometheus_values(&String::from_utf8_lossy(&r.body))
}
