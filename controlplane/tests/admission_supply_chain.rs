//! Signature and scan requirements in admission (`[[admission.require]]`) and pinning to
//! digests (`admission.mutate.pin_digest`), through real AdmissionReviews over HTTPS to `lighter
//! serve --webhook-listen`.
//!
//! Keys are made in the test with the `openssl` CLI (`ecparam` P-256, `pkey -pubout`); cosign
//! simple-signing payloads are signed with `openssl dgst -sha256 -sign` and pushed as referrers
//! of the image (cosign's artifact type, the payload as a layer with the signature annotation)
//! with oras-py or over HTTP, or under cosign's classic `sha256-<hex>.sig` tag. Vulnerability
//! reports (Trivy JSON, SARIF) are pushed as referrers with oras-py.
//!
//! Needs `openssl`; the oras-py tests also need oras-py (`LIGHTER_SKIP_CLIENT_TESTS=1` skips
//! them).

mod common;
mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use common::clients::{clients, ok, text};
use common::tls::openssl;
use common::webhook::Webhook;
use common::{Server, OCI_EMPTY, OCI_MANIFEST};
use serde_json::{json, Value};

const HOST: &str = "lighter.test:5000";
const COSIGN_SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const TRIVY_TYPE: &str = "application/vnd.aquasec.trivy.report+json";

/// `prod/` needs a cosign signature by `cosign.pub`, `scanned/` a vulnerability report without
/// critical findings, `audited/` a signature but only warns, `attested/` any signature (no key),
/// an SBOM and a provenance artifact; everything else is allowed.
const CONFIG: &str = r#"
[admission]
default = "allow"
registry_hosts = ["lighter.test:5000"]

[[admission.require]]
prefix = "prod/"
signature = true
cosign_key_file = "{dir}/cosign.pub"

[[admission.require]]
prefix = "scanned/"
vulnerability_report = true
refuse_severity = "critical"

[[admission.require]]
prefix = "audited/"
signature = true
cosign_key_file = "{dir}/cosign.pub"
mode = "audit"

[[admission.require]]
prefix = "attested/"
signature = true
sbom = true
artifact_types = ["application/vnd.example.provenance+json"]

[admission.mutate]
pin_digest = true
"#;

// ---------------------------------------------------------------------------------------------
// Keys and signatures (openssl CLI)

/// A P-256 key pair `<name>.key`, `<name>.pub` in `dir`.
fn make_key(dir: &Path, name: &str) -> PathBuf {
    let key = format!("{name}.key");
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    );
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            &key,
            "-pubout",
            "-out",
            &format!("{name}.pub"),
        ],
    );
    dir.join(key)
}

/// Base64 of `openssl dgst -sha256 -sign <key>` over `payload`.
fn sign(dir: &Path, key: &Path, payload: &[u8]) -> String {
    let (input, output) = (dir.join("payload.json"), dir.join("payload.sig"));
    std::fs::write(&input, payload).unwrap();
    openssl(
        dir,
        &[
            "dgst",
            "-sha256",
            "-sign",
            key.to_str().unwrap(),
            "-out",
            output.to_str().unwrap(),
            input.to_str().unwrap(),
        ],
    );
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(&output).unwrap())
}

/// Cosign's simple-signing payload for `digest` of `repository`.
fn payload(repository: &str, digest: &str) -> Vec<u8> {
    oci::to_bytes(&json!({
        "critical": {
            "identity": {"docker-reference": format!("{HOST}/{repository}")},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
}

/// A cosign signature manifest holding `payload` signed as `signature`; with `subject`, a
/// referrer of that image.
fn signature_manifest(
    server: &Server,
    repo: &str,
    payload: &[u8],
    signature: &str,
    subject: Option<&oci::Image>,
) -> Vec<u8> {
    oci::push_blob(server, repo, payload);
    oci::push_blob(server, repo, b"{}");
    let mut layer = oci::descriptor(SIMPLE_SIGNING, payload);
    layer["annotations"] = json!({ "dev.cosignproject.cosign/signature": signature });
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": COSIGN_SIG,
        "config": oci::descriptor(OCI_EMPTY, b"{}"),
        "layers": [layer],
    });
    if let Some(image) = subject {
        m["subject"] = oci::descriptor(OCI_MANIFEST, &image.manifest);
    }
    oci::to_bytes(&m)
}

/// Pushes a signature as a referrer of `image` over HTTP.
fn attach_signature(server: &Server, repo: &str, image: &oci::Image, payload: &[u8], sig: &str) {
    let m = signature_manifest(server, repo, payload, sig, Some(image));
    let digest = common::sha256(&m);
    oci::push_manifest(server, repo, &digest, OCI_MANIFEST, &m);
}

/// Pushes `content` as a one-layer artifact of `artifact_type` referring to `image`, over HTTP.
fn attach(server: &Server, repo: &str, image: &oci::Image, artifact_type: &str, content: &[u8]) {
    oci::push_blob(server, repo, content);
    oci::push_blob(server, repo, b"{}");
    let m = oci::to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": oci::descriptor(OCI_EMPTY, b"{}"),
        "layers": [oci::descriptor("application/octet-stream", content)],
        "subject": oci::descriptor(OCI_MANIFEST, &image.manifest),
    }));
    oci::push_manifest(server, repo, &common::sha256(&m), OCI_MANIFEST, &m);
}

// ---------------------------------------------------------------------------------------------
// oras-py

/// Pushes `file` (written with `content`) as an artifact of `artifact_type` whose subject is
/// `image`, with oras-py: `Registry.push` for a report (the artifact type is its config's media
/// type), or by hand (`upload_blob` + `upload_manifest`) for a cosign signature, whose payload
/// layer carries the signature annotation. Prints the artifact's digest.
const ORAS_SCRIPT: &str = r#"
import hashlib, json, sys
from dataclasses import asdict
import oras.oci, oras.provider

host, repo, subject, kind, file, media_type, artifact_type, signature = sys.argv[1:9]
subject = json.loads(subject)
reg = oras.provider.Registry(hostname=host, insecure=True)
subj = oras.oci.Subject(mediaType=subject["mediaType"], digest=subject["digest"], size=subject["size"])

def check(response):
    if response.status_code not in (200, 201, 202):
        sys.exit(f"{response.request.method} {response.url}: {response.status_code} {response.text}")
    return response

if kind == "report":
    with open("config.json", "w") as f:
        f.write("{}")
    r = reg.push(target=f"{host}/{repo}:report", files=[f"{file}:{media_type}"],
                 manifest_config=f"config.json:{artifact_type}", subject=subj, quiet=True)
else:
    container = reg.get_container(f"{host}/{repo}:signature")
    layer = oras.oci.NewLayer(file, media_type=media_type)
    layer["annotations"] = {"dev.cosignproject.cosign/signature": signature}
    check(reg.upload_blob(file, container, layer))
    with open("empty.json", "w") as f:
        f.write("{}")
    empty = {"mediaType": "application/vnd.oci.empty.v1+json",
             "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(), "size": 2}
    check(reg.upload_blob("empty.json", container, empty))
    manifest = oras.oci.NewManifest()
    manifest["artifactType"] = artifact_type
    manifest["config"] = empty
    manifest["layers"] = [layer]
    manifest["subject"] = asdict(subj)
    r = check(reg.upload_manifest(manifest, container))
print(r.headers.get("Docker-Content-Digest"))
"#;

#[allow(clippy::too_many_arguments)]
fn oras_push(
    w: &Webhook,
    repo: &str,
    image: &oci::Image,
    kind: &str,
    name: &str,
    content: &[u8],
    media_type: &str,
    artifact_type: &str,
    signature: &str,
) -> String {
    let work = w
        .dir
        .path()
        .join(format!("oras-{}", repo.replace('/', "-")));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join(name), content).unwrap();
    let subject = oci::descriptor(OCI_MANIFEST, &image.manifest);
    let out = ok(Command::new("python3")
        .current_dir(&work)
        .args(["-c", ORAS_SCRIPT, &w.server.host(), repo])
        .arg(subject.to_string())
        .args([kind, name, media_type, artifact_type, signature]));
    let digest = text(&out)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert!(digest.starts_with("sha256:"), "oras-py printed {digest:?}");
    digest
}

/// Pushes a vulnerability report as a referrer of `image` with oras-py; returns its digest.
fn oras_report(
    w: &Webhook,
    repo: &str,
    image: &oci::Image,
    name: &str,
    report: &[u8],
    artifact_type: &str,
) -> String {
    let json = "application/json";
    oras_push(
        w,
        repo,
        image,
        "report",
        name,
        report,
        json,
        artifact_type,
        "",
    )
}

// ---------------------------------------------------------------------------------------------
// Reviews

fn pod(uid: &str, images: &[&str]) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": uid,
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "kubernetes-admin"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": uid, "namespace": "shop"},
                "spec": {"containers": containers},
            },
        },
    })
}

/// Validates a pod of `images`: None if allowed (asserting no warnings), else the message.
fn refusal(w: &Webhook, uid: &str, images: &[&str]) -> Option<String> {
    let r = w.review("/validate", &pod(uid, images));
    if r["allowed"] == true {
        assert!(r.get("warnings").is_none(), "{uid}: {r}");
        return None;
    }
    Some(
        r["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn image(repo: &str, reference: &str) -> String {
    let sep = if reference.starts_with("sha256:") {
        '@'
    } else {
        ':'
    };
    format!("{HOST}/{repo}{sep}{reference}")
}

fn start() -> (Webhook, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "cosign");
    (Webhook::start(dir, CONFIG), key)
}

// ---------------------------------------------------------------------------------------------
// Signatures

/// The rule's refusal for an image of `prod/`, given what failed.
fn prod_refusal(w: &Webhook, repo: &str, digest: &str, why: &str) -> String {
    format!(
        "image {} is refused by require rule \"prod/\": {digest}: no cosign signature verifies with {}: {why}",
        image(repo, "v1"),
        w.dir.path().join("cosign.pub").display()
    )
}

#[test]
fn a_signature_by_the_key_admits_and_missing_wrong_key_tampered_or_replayed_ones_refuse() {
    let (w, key) = start();
    let s = &w.server;
    let dir = w.dir.path();
    let other = make_key(dir, "other");

    // Signed, the signature attached as a referrer over HTTP.
    let app = oci::push_image(s, "prod/app", Some("v1"), 1);
    let app_payload = payload("prod/app", &app.digest);
    attach_signature(
        s,
        "prod/app",
        &app,
        &app_payload,
        &sign(dir, &key, &app_payload),
    );
    // Signed, under cosign's classic tag and no subject.
    let classic = oci::push_image(s, "prod/classic", Some("v1"), 2);
    let p = payload("prod/classic", &classic.digest);
    let m = signature_manifest(s, "prod/classic", &p, &sign(dir, &key, &p), None);
    let tag = format!("{}.sig", classic.digest.replace(':', "-"));
    oci::push_manifest(s, "prod/classic", &tag, OCI_MANIFEST, &m);
    // Not signed at all.
    let unsigned = oci::push_image(s, "prod/unsigned", Some("v1"), 3);
    // Signed by another key.
    let wrong = oci::push_image(s, "prod/wrong", Some("v1"), 4);
    let p = payload("prod/wrong", &wrong.digest);
    attach_signature(s, "prod/wrong", &wrong, &p, &sign(dir, &other, &p));
    // Signed, then the payload changed (its identity) before the push.
    let tampered = oci::push_image(s, "prod/tampered", Some("v1"), 5);
    let p = payload("prod/tampered", &tampered.digest);
    let sig = sign(dir, &key, &p);
    let changed = payload("prod/elsewhere", &tampered.digest);
    attach_signature(s, "prod/tampered", &tampered, &changed, &sig);
    // A valid signature of prod/app's digest, attached to another image.
    let replayed = oci::push_image(s, "prod/replayed", Some("v1"), 6);
    attach_signature(
        s,
        "prod/replayed",
        &replayed,
        &app_payload,
        &sign(dir, &key, &app_payload),
    );
    // Outside prod/: nothing required.
    oci::push_image(s, "team/tool", Some("v1"), 7);

    assert_eq!(refusal(&w, "app-tag", &[&image("prod/app", "v1")]), None);
    assert_eq!(
        refusal(&w, "app-digest", &[&image("prod/app", &app.digest)]),
        None
    );
    assert_eq!(
        refusal(&w, "classic", &[&image("prod/classic", "v1")]),
        None
    );
    assert_eq!(refusal(&w, "tool", &[&image("team/tool", "v1")]), None);

    let cases = [
        (
            "unsigned",
            &unsigned.digest,
            "it has no cosign signature".to_owned(),
        ),
        (
            "wrong",
            &wrong.digest,
            "the signature does not verify with the key".into(),
        ),
        (
            "tampered",
            &tampered.digest,
            "the signature does not verify with the key".into(),
        ),
        (
            "replayed",
            &replayed.digest,
            format!(
                "the signed payload names {}, not the image's digest",
                app.digest
            ),
        ),
    ];
    for (name, digest, why) in cases {
        let repo = format!("prod/{name}");
        let got =
            refusal(&w, name, &[&image(&repo, "v1")]).unwrap_or_else(|| panic!("{name} admitted"));
        let sig_digest = match name {
            "unsigned" => String::new(),
            _ => {
                let r = oci::get(s, &format!("/v2/{repo}/referrers/{digest}"));
                format!("{}: ", r.json()["manifests"][0]["digest"].as_str().unwrap())
            }
        };
        assert_eq!(
            got,
            prod_refusal(&w, &repo, digest, &format!("{sig_digest}{why}")),
            "{name}"
        );
    }

    // A tag Lighter does not hold cannot be checked: refused.
    let got = refusal(&w, "absent", &[&image("prod/app", "v9")]).unwrap();
    assert!(
        got.contains("Lighter does not hold it in prod/app"),
        "{got}"
    );
    // One refused container refuses the pod, naming only it.
    let got = refusal(
        &w,
        "mixed",
        &[&image("prod/app", "v1"), &image("prod/unsigned", "v1")],
    )
    .unwrap();
    assert!(
        got.contains("prod/unsigned") && !got.contains("prod/app:"),
        "{got}"
    );
}

#[test]
fn a_cosign_signature_pushed_with_oras_admits_the_image() {
    if !clients(&["oras"]) {
        return;
    }
    let (w, key) = start();
    let app = oci::push_image(&w.server, "prod/app", Some("v1"), 11);
    assert!(refusal(&w, "before", &[&image("prod/app", "v1")]).is_some());
    let p = payload("prod/app", &app.digest);
    let sig = sign(w.dir.path(), &key, &p);
    oras_push(
        &w,
        "prod/app",
        &app,
        "signature",
        "payload.json",
        &p,
        SIMPLE_SIGNING,
        COSIGN_SIG,
        &sig,
    );
    assert_eq!(refusal(&w, "after", &[&image("prod/app", "v1")]), None);
}

#[test]
fn audit_rules_admit_with_a_warning_naming_the_rule() {
    let (w, _) = start();
    let app = oci::push_image(&w.server, "audited/app", Some("v1"), 21);
    let r = w.review("/validate", &pod("audit", &[&image("audited/app", "v1")]));
    assert_eq!(r["allowed"], true, "{r}");
    let want = format!(
        "audit: image {} is refused by require rule \"audited/\": {}: no cosign signature verifies with {}: it has no cosign signature",
        image("audited/app", "v1"),
        app.digest,
        w.dir.path().join("cosign.pub").display()
    );
    assert_eq!(r["warnings"], json!([want]), "{r}");
}

#[test]
fn a_notation_signature_an_sbom_and_a_named_artifact_type_are_each_required() {
    let (w, _) = start();
    let s = &w.server;
    let app = oci::push_image(s, "attested/app", Some("v1"), 51);
    let want = format!(
        "image {} is refused by require rule \"attested/\": {}: it has no signature (cosign or notation); \
         it has no SBOM (application/spdx+json, text/spdx, application/vnd.cyclonedx+json, application/vnd.cyclonedx+xml, application/vnd.syft+json); \
         it has no referrer of artifact type application/vnd.example.provenance+json",
        image("attested/app", "v1"),
        app.digest
    );
    assert_eq!(
        refusal(&w, "none", &[&image("attested/app", "v1")]),
        Some(want)
    );
    attach(
        s,
        "attested/app",
        &app,
        "application/vnd.cncf.notary.signature",
        b"jws",
    );
    attach(
        s,
        "attested/app",
        &app,
        "application/spdx+json",
        br#"{"spdxVersion":"SPDX-2.3"}"#,
    );
    let got = refusal(&w, "two", &[&image("attested/app", "v1")]).unwrap();
    assert!(
        got.ends_with(
            ": it has no referrer of artifact type application/vnd.example.provenance+json"
        ),
        "{got}"
    );
    attach(
        s,
        "attested/app",
        &app,
        "application/vnd.example.provenance+json",
        b"{}",
    );
    assert_eq!(refusal(&w, "all", &[&image("attested/app", "v1")]), None);
}

// ---------------------------------------------------------------------------------------------
// Vulnerability reports

fn trivy_report(severities: &[&str]) -> Vec<u8> {
    let vulns: Vec<Value> = severities
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"VulnerabilityID": format!("CVE-2026-{i}"), "PkgName": "openssl", "Severity": s}))
        .collect();
    oci::to_bytes(&json!({
        "SchemaVersion": 2,
        "ArtifactName": "app",
        "ArtifactType": "container_image",
        "Results": [{"Target": "app (debian 12)", "Class": "os-pkgs", "Type": "debian", "Vulnerabilities": vulns}],
    }))
}

#[test]
fn a_critical_finding_in_a_trivy_report_refuses_the_pod_with_the_counts() {
    if !clients(&["oras"]) {
        return;
    }
    let (w, _) = start();
    let s = &w.server;
    let bad = oci::push_image(s, "scanned/bad", Some("v1"), 31);
    let report = trivy_report(&["CRITICAL", "HIGH", "HIGH", "LOW"]);
    let report_digest = oras_report(&w, "scanned/bad", &bad, "trivy.json", &report, TRIVY_TYPE);
    let good = oci::push_image(s, "scanned/good", Some("v1"), 32);
    let report = trivy_report(&["HIGH", "MEDIUM"]);
    oras_report(&w, "scanned/good", &good, "trivy.json", &report, TRIVY_TYPE);
    let none = oci::push_image(s, "scanned/none", Some("v1"), 33);
    // A SARIF report (as `trivy --format sarif` writes it: the score on the rule).
    let sarif_image = oci::push_image(s, "scanned/sarif", Some("v1"), 34);
    let sarif = oci::to_bytes(&json!({
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "Trivy", "rules": [
                {"id": "CVE-2026-1", "properties": {"security-severity": "9.8", "tags": ["vulnerability", "CRITICAL"]}},
            ]}},
            "results": [{"ruleId": "CVE-2026-1", "ruleIndex": 0, "level": "error", "message": {"text": "x"}}],
        }],
    }));
    oras_report(
        &w,
        "scanned/sarif",
        &sarif_image,
        "report.sarif",
        &sarif,
        "application/sarif+json",
    );

    let got =
        refusal(&w, "bad", &[&image("scanned/bad", "v1")]).expect("a critical finding refuses");
    let want = format!(
        "image {} is refused by require rule \"scanned/\": {}: vulnerability report {report_digest} has 1 findings at critical or above (1 critical, 2 high, 0 medium, 1 low, 0 unknown)",
        image("scanned/bad", "v1"),
        bad.digest
    );
    assert_eq!(got, want);
    assert_eq!(refusal(&w, "good", &[&image("scanned/good", "v1")]), None);
    let got = refusal(&w, "none", &[&image("scanned/none", "v1")]).unwrap();
    assert!(
        got.starts_with(&format!("image {} is refused by require rule \"scanned/\": {}: it has no vulnerability report (", image("scanned/none", "v1"), none.digest)),
        "{got}"
    );
    let got = refusal(&w, "sarif", &[&image("scanned/sarif", "v1")]).unwrap();
    assert!(
        got.contains("(1 critical, 0 high, 0 medium, 0 low, 0 unknown)"),
        "{got}"
    );

    // The decision is in the event log with its reason.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = oci::get(s, "/v2/_lighter/events?action=admission");
        let events: Vec<Value> = String::from_utf8_lossy(&r.body)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if let Some(e) = events.iter().find(|e| e["uid"] == "bad") {
            assert_eq!(e["allowed"], false, "{e}");
            assert_eq!(e["reason"], want.as_str(), "{e}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event for uid bad: {events:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Pinning

/// The patch of a mutating response, decoded: `(path, value)` of each operation.
fn patch(response: &Value) -> Vec<(String, String)> {
    let Some(p) = response["patch"].as_str() else {
        return Vec::new();
    };
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let ops: Vec<Value> =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap())
            .unwrap();
    ops.iter()
        .map(|o| {
            assert_eq!(o["op"], "replace", "{o}");
            (
                o["path"].as_str().unwrap().to_owned(),
                o["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn pin_digest_rewrites_a_tag_to_the_digest_that_was_checked() {
    let (w, key) = start();
    let s = &w.server;
    let dir = w.dir.path();
    let app = oci::push_image(s, "prod/app", Some("v1"), 41);
    let p = payload("prod/app", &app.digest);
    attach_signature(s, "prod/app", &app, &p, &sign(dir, &key, &p));
    let tool = oci::push_image(s, "team/tool", Some("v1"), 42);

    let images = [
        image("prod/app", "v1"),
        image("team/tool", &tool.digest),          // already pinned
        image("team/absent", "v1"),                // not in Lighter
        "docker.io/library/nginx:1.27".to_owned(), // not Lighter's
    ];
    let refs: Vec<&str> = images.iter().map(String::as_str).collect();
    let r = w.review("/mutate", &pod("pin", &refs));
    assert_eq!(r["allowed"], true, "{r}");
    let pinned = format!("{}@{}", image("prod/app", "v1"), app.digest);
    assert_eq!(
        patch(&r),
        vec![("/spec/containers/0/image".to_owned(), pinned.clone())]
    );

    // The tag moves to an unsigned image: the pinned pod is still what was checked and is
    // admitted; the tag itself is now refused.
    let unsigned = oci::push_image(s, "prod/app", Some("v1"), 43);
    assert_eq!(refusal(&w, "pinned", &[&pinned]), None);
    let got = refusal(&w, "moved", &[&image("prod/app", "v1")]).unwrap();
    assert!(got.contains(&unsigned.digest), "{got}");
    let r = w.review("/mutate", &pod("pin-again", &[&image("prod/app", "v1")]));
    assert_eq!(
        patch(&r),
        vec![(
            "/spec/containers/0/image".to_owned(),
            format!("{}@{}", image("prod/app", "v1"), unsigned.digest)
        )]
    );
}

// ---------------------------------------------------------------------------------------------
// Replicas over a bucket

/// With `[storage.s3]`, the webhook of replica B checks images pushed through replica A, which
/// B never served: a signed one (cosign's classic tag) is admitted by tag and by digest and
/// pinned to its digest; an unsigned one is refused for having no signature, not for being
/// absent; a tag the bucket does not have is refused as absent.
#[test]
fn a_replica_checks_images_pushed_through_another_replica() {
    if !common::garage::installed() {
        return;
    }
    let g = common::garage::Garage::start();
    let storage = g.storage_toml(1000);
    let a_config = g.dir().join("replica-a.toml");
    std::fs::write(&a_config, &storage).unwrap();
    let a_config = a_config.display().to_string();
    let a = Server::launch_temp(|l| l.args(&["--config", &a_config]).env(&g.env()));
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "cosign");
    let config = format!("{CONFIG}\n{storage}");
    let w = Webhook::start_with(dir, &config, |l| l.env(&g.env()));
    let signed_dir = w.dir.path();

    let signed = oci::push_image(&a, "prod/signed", Some("v1"), 51);
    let p = payload("prod/signed", &signed.digest);
    let m = signature_manifest(&a, "prod/signed", &p, &sign(signed_dir, &key, &p), None);
    let tag = format!("{}.sig", signed.digest.replace(':', "-"));
    oci::push_manifest(&a, "prod/signed", &tag, OCI_MANIFEST, &m);
    let unsigned = oci::push_image(&a, "prod/unsigned", Some("v1"), 52);
    assert!(!w.server.data_dir.join("repos/prod").exists());

    assert_eq!(refusal(&w, "signed", &[&image("prod/signed", "v1")]), None);
    assert_eq!(
        refusal(
            &w,
            "signed-digest",
            &[&image("prod/signed", &signed.digest)]
        ),
        None
    );
    let r = w.review("/mutate", &pod("pin", &[&image("prod/signed", "v1")]));
    assert_eq!(
        patch(&r),
        vec![(
            "/spec/containers/0/image".to_owned(),
            format!("{}@{}", image("prod/signed", "v1"), signed.digest)
        )]
    );
    let got = refusal(&w, "unsigned", &[&image("prod/unsigned", "v1")]).unwrap();
    assert!(
        got.contains(&format!("{}: no cosign signature", unsigned.digest))
            && got.contains("it has no cosign signature"),
        "{got}"
    );
    let got = refusal(&w, "absent", &[&image("prod/signed", "v9")]).unwrap();
    assert!(
        got.contains("Lighter does not hold it in prod/signed"),
        "{got}"
    );
}

/// With `[storage.s3]`, the webhook of replica B checks images pushed through replica A, which
/// B never served: the tag, the manifest, the signature's referrer record and its payload come
/// from the bucket (a classic `.sig` tag too). Unsigned, refused; signed through A, admitted (by
/// tag and by digest); the signature deleted through A, refused again (B's index of referrers
/// follows the bucket's).
#[test]
fn a_replica_checks_signatures_pushed_through_another_replica() {
    if !common::garage::installed() {
        return;
    }
    let g = common::garage::Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "cosign");
    std::fs::write(dir.path().join("key-id"), &g.key_id).unwrap();
    std::fs::write(dir.path().join("secret"), &g.secret).unwrap();
    let storage = g.storage_toml(1000)
        + "access_key_id_file = \"{dir}/key-id\"\nsecret_access_key_file = \"{dir}/secret\"\n";
    let a_config = dir.path().join("a.toml");
    std::fs::write(&a_config, g.storage_toml(1000)).unwrap();
    let a = Server::launch_temp(|l| {
        l.args(&["--config", a_config.to_str().unwrap()])
            .env(&g.env())
    });
    let w = Webhook::start(dir, &format!("{CONFIG}\n{storage}"));
    let dir = w.dir.path();

    let app = oci::push_image(&a, "prod/app", Some("v1"), 11);
    let got = refusal(&w, "unsigned", &[&image("prod/app", "v1")]).expect("refused");
    assert!(got.contains("it has no cosign signature"), "{got}");

    let p = payload("prod/app", &app.digest);
    let m = signature_manifest(&a, "prod/app", &p, &sign(dir, &key, &p), Some(&app));
    let sig = oci::push_manifest(&a, "prod/app", &common::sha256(&m), OCI_MANIFEST, &m);
    assert_eq!(refusal(&w, "signed", &[&image("prod/app", "v1")]), None);
    assert_eq!(
        refusal(&w, "pinned", &[&image("prod/app", &app.digest)]),
        None
    );
    let classic = oci::push_image(&a, "prod/classic", Some("v1"), 12);
    let p = payload("prod/classic", &classic.digest);
    let m = signature_manifest(&a, "prod/classic", &p, &sign(dir, &key, &p), None);
    let tag = format!("{}.sig", classic.digest.replace(':', "-"));
    oci::push_manifest(&a, "prod/classic", &tag, OCI_MANIFEST, &m);
    assert_eq!(
        refusal(&w, "classic", &[&image("prod/classic", "v1")]),
        None
    );

    let r = oci::delete(&a, &format!("/v2/prod/app/manifests/{sig}"));
    assert_eq!(r.status, 202, "{}", r.describe());
    let got = refusal(&w, "deleted", &[&image("prod/app", "v1")]).expect("refused");
    assert!(got.contains("it has no cosign signature"), "{got}");
}

// ---------------------------------------------------------------------------------------------
// Mirrored images

/// An image signed in an upstream registry (another Lighter) under cosign's classic tag is
/// admitted by tag through the mirror while nothing is cached yet: the webhook fetches the
/// manifest and the `.sig` tag with its payload; an unsigned one is refused.
#[test]
fn a_mirrored_image_signed_upstream_is_fetched_checked_and_admitted_cold() {
    let upstream = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let key = make_key(dir.path(), "cosign");
    let app = oci::push_image(&upstream, "team/app", Some("v1"), 61);
    let p = payload("team/app", &app.digest);
    let m = signature_manifest(&upstream, "team/app", &p, &sign(dir.path(), &key, &p), None);
    let tag = format!("{}.sig", app.digest.replace(':', "-"));
    oci::push_manifest(&upstream, "team/app", &tag, OCI_MANIFEST, &m);
    let unsigned = oci::push_image(&upstream, "team/unsigned", Some("v1"), 62);
    let config = format!(
        r#"
[admission]
default = "allow"

[[admission.require]]
prefix = "docker.io/team/"
signature = true
cosign_key_file = "{{dir}}/cosign.pub"

[[upstreams]]
name = "docker.io"
url = "{}"
"#,
        upstream.url("")
    );
    let w = Webhook::start(dir, &config);
    assert_eq!(refusal(&w, "app", &["docker.io/team/app:v1"]), None);
    let got = refusal(&w, "unsigned", &["docker.io/team/unsigned:v1"]).unwrap();
    assert_eq!(
        got,
        format!(
            "image docker.io/team/unsigned:v1 is refused by require rule \"docker.io/team/\": {}: no cosign signature verifies with {}: it has no cosign signature",
            unsigned.digest,
            w.dir.path().join("cosign.pub").display()
        )
    );
    // What was checked is now in the mirror.
    let r = oci::get(
        &w.server,
        &format!("/v2/docker.io/team/app/manifests/{tag}"),
    );
    assert_eq!(r.status, 200, "{}", r.describe());
}

/// `pin_digest` pins a mirrored image by tag that the mirror has never fetched (no rule
/// applies to it): the webhook resolves the tag through the mirror first.
#[test]
fn pin_digest_pins_a_cold_mirrored_image() {
    let upstream = Server::start();
    let tool = oci::push_image(&upstream, "team/tool", Some("v3"), 63);
    let config = format!(
        "[admission]\ndefault = \"allow\"\n[admission.mutate]\npin_digest = true\n\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\n",
        upstream.url("")
    );
    let w = Webhook::start(tempfile::tempdir().unwrap(), &config);
    assert!(!w.server.data_dir.join("repos/docker.io/team/tool").exists());
    let r = w.review("/mutate", &pod("cold", &["docker.io/team/tool:v3"]));
    assert_eq!(r["allowed"], true, "{r}");
    assert_eq!(
        patch(&r),
        vec![(
            "/spec/containers/0/image".to_owned(),
            format!("docker.io/team/tool:v3@{}", tool.digest)
        )]
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// `lighter serve` with `config` must refuse to start; returns its standard error.
fn serve_fails(dir: &Path, config: &str) -> String {
    let file = dir.join("bad.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with {config}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_missing_or_unsupported_cosign_key_stops_the_start_naming_rule_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(d, &["genpkey", "-algorithm", "ed25519", "-out", "ed.key"]);
    openssl(d, &["pkey", "-in", "ed.key", "-pubout", "-out", "ed.pub"]);
    let rule = |key: &str| {
        format!(
            "[[admission.require]]\nprefix = \"prod/\"\nsignature = true\ncosign_key_file = \"{}\"\n",
            d.join(key).display()
        )
    };
    let err = serve_fails(d, &rule("absent.pub"));
    assert!(
        err.contains("admission.require[0] (prefix \"prod/\")") && err.contains("absent.pub"),
        "{err}"
    );
    let err = serve_fails(d, &rule("ed.pub"));
    assert!(
        err.contains("ed.pub") && err.contains("not an ECDSA P-256 public key"),
        "{err}"
    );
    let err = serve_fails(
        d,
        "[[admission.require]]\nprefix = \"prod/\"\nrefuse_severity = \"dire\"\n",
    );
    assert!(err.contains("dire"), "{err}");
}
