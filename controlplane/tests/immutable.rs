//! Immutable tags (`[[immutable_tags]]`) against the real binary, with skopeo and the HTTP API.
//! Distribution spec, "Pushing Manifests" (a `PUT` by tag), "Deleting tags" and "Deleting
//! Manifests": a registry may refuse these, and does so here with the error code `DENIED`
//! (403, "Error Codes") and a message naming the rule, when the tag is covered by a rule and
//! would move to another digest or go; the same digest pushed again is accepted. Mirrored
//! repositories follow upstream.

mod common;
mod oci;

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::clients::{clients, ok, refused, Image, Tools};
use common::{sha256, Server, OCI_MANIFEST};
use oci::*;

/// The configuration users write, as the README gives it, plus a rule for every tag but
/// `latest` under `prod/`.
const RULES: &str = r#"
[[immutable_tags]]
prefix = "release/"
tags = ["v*"]

[[immutable_tags]]
prefix = "prod"
tags = ["*"]
except = ["latest"]
"#;

/// A server started with `config` as its TOML file (kept beside the data directory).
fn start_with(config: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("lighter.toml");
    std::fs::write(&path, config).unwrap();
    let p = path.display().to_string();
    let server = Server::launch_temp(|l| l.args(&["--config", &p]));
    (server, dir)
}

/// An image (config and one layer, both pushed) whose manifest differs by `seed`; its bytes.
fn image_manifest(server: &Server, repo: &str, seed: u64) -> Vec<u8> {
    let layer = common::random_bytes(2000, seed);
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    push_blob(server, repo, &layer);
    push_blob(server, repo, &config);
    to_bytes(&image_manifest_value(&config, &[&layer]))
}

fn put(server: &Server, repo: &str, reference: &str, manifest: &[u8]) -> Reply {
    send(req::put_manifest(
        server,
        repo,
        reference,
        OCI_MANIFEST,
        manifest.to_vec(),
    ))
}

fn tag_digest(server: &Server, repo: &str, tag: &str) -> String {
    let r = head_manifest(server, repo, tag, OCI_MANIFEST);
    r.assert_status(200);
    r.header("docker-content-digest").to_owned()
}

fn assert_denied(r: &Reply, needles: &[&str]) {
    r.assert_error(403, "DENIED");
    let body = String::from_utf8_lossy(&r.body).into_owned();
    for n in needles {
        assert!(body.contains(n), "the refusal does not say {n:?}: {body}");
    }
}

/// skopeo pushes `v1` under `release/`; pushing the same image again is accepted (an
/// idempotent push); pushing another image to `v1` is refused, naming the rule, and `v1` still
/// names the first image. `latest` moves freely, and `v1` outside the prefix (`team/`,
/// `releases/`) moves too.
#[test]
fn skopeo_cannot_move_an_immutable_tag_but_may_push_it_again() {
    if !clients(&["skopeo", "gzip"]) {
        return;
    }
    let (server, _config) = start_with(RULES);
    let tools = Tools::plain(server.host());
    let one = Image::build("amd64", 11, "immutable", None, |i| {
        (format!("one {i}\n"), Image::blob(11, i, 3000, 10))
    });
    let two = Image::build("amd64", 12, "immutable", None, |i| {
        (format!("two {i}\n"), Image::blob(12, i, 3000, 10))
    });
    let push = |img: &Image, reference: &str| {
        tools.copy(
            &["--dest-tls-verify=false"],
            &tools.layout(img),
            &tools.docker(reference),
        )
    };

    ok(&mut push(&one, "release/app:v1"));
    assert_eq!(tag_digest(&server, "release/app", "v1"), one.digest);
    ok(&mut push(&one, "release/app:v1"));
    let said = refused(
        &mut push(&two, "release/app:v1"),
        &["immutable", "immutable_tags[0]"],
    );
    assert!(said.contains("denied") || said.contains("DENIED"), "{said}");
    assert_eq!(
        tag_digest(&server, "release/app", "v1"),
        one.digest,
        "a refused push leaves the tag where it was"
    );

    for reference in ["release/app:latest", "team/app:v1", "releases/app:v1"] {
        ok(&mut push(&one, reference));
        ok(&mut push(&two, reference));
        let (repo, tag) = reference.split_once(':').unwrap();
        assert_eq!(tag_digest(&server, repo, tag), two.digest, "{reference}");
    }
}

/// Over the HTTP API: moving an immutable tag is 403 `DENIED`; deleting it, or deleting by
/// digest the manifest it names (even while a mutable tag names it too), is 403 `DENIED`;
/// deleting a mutable tag, and then a manifest no immutable tag names, is 202. `except`
/// exempts `latest` from `tags = ["*"]`, and `?tag=` pushes are checked tag by tag.
#[test]
fn deletes_and_moves_of_immutable_tags_are_denied_403() {
    let (server, _config) = start_with(RULES);
    let a = image_manifest(&server, "release/app", 1);
    let b = image_manifest(&server, "release/app", 2);
    put(&server, "release/app", "v1.0", &a).assert_status(201);
    put(&server, "release/app", "latest", &a).assert_status(201);

    assert_denied(
        &put(&server, "release/app", "v1.0", &b),
        &[
            "v1.0",
            "release/app",
            "immutable_tags[0]",
            "\\\"v*\\\"",
            &sha256(&a),
        ],
    );
    assert_denied(
        &delete(&server, "/v2/release/app/manifests/v1.0"),
        &["v1.0", "immutable_tags[0]", "cannot be deleted"],
    );
    assert_denied(
        &delete(
            &server,
            &format!("/v2/release/app/manifests/{}", sha256(&a)),
        ),
        &["immutable tag v1.0", "immutable_tags[0]"],
    );
    assert_eq!(tag_digest(&server, "release/app", "v1.0"), sha256(&a));
    assert_eq!(tag_digest(&server, "release/app", "latest"), sha256(&a));

    // A push by digest with ?tag=: refused as a whole if one tag would move.
    let r = send(req::put_manifest(
        &server,
        "release/app",
        &format!("{}?tag=rc&tag=v1.0", sha256(&b)),
        OCI_MANIFEST,
        b.clone(),
    ));
    assert_denied(&r, &["v1.0"]);
    head_manifest(&server, "release/app", "rc", OCI_MANIFEST).assert_status(404);

    // Mutable tags move and go; a manifest no immutable tag names can be deleted.
    put(&server, "release/app", "latest", &b).assert_status(201);
    delete(&server, "/v2/release/app/manifests/latest").assert_status(202);
    put(&server, "release/app", "candidate", &b).assert_status(201);
    delete(
        &server,
        &format!("/v2/release/app/manifests/{}", sha256(&b)),
    )
    .assert_status(202);
    head_manifest(&server, "release/app", "candidate", OCI_MANIFEST).assert_status(404);

    // Every tag but latest under prod (and prod itself), at a component boundary.
    let c = image_manifest(&server, "prod", 3);
    let d = image_manifest(&server, "prod", 4);
    for tag in ["1.0", "latest"] {
        put(&server, "prod", tag, &c).assert_status(201);
    }
    assert_denied(
        &put(&server, "prod", "1.0", &d),
        &["immutable_tags[1]", "except"],
    );
    put(&server, "prod", "latest", &d).assert_status(201);
    let e = image_manifest(&server, "production", 5);
    put(&server, "production", "1.0", &e).assert_status(201);
    delete(&server, "/v2/production/manifests/1.0").assert_status(202);
}

/// Distribution spec, "Deleting Blobs": a layer (or config) of an image an immutable tag names
/// cannot be deleted either, or the release would no longer pull; through an index too. A
/// blob only a mutable tag's image uses, or none, is deleted as usual.
#[test]
fn blobs_of_an_immutable_release_cannot_be_deleted() {
    let (server, _config) = start_with(RULES);
    let repo = "release/app";
    let layer = common::random_bytes(3000, 11);
    let config = br#"{"architecture":"amd64","os":"linux","seed":11}"#.to_vec();
    let other = common::random_bytes(3000, 12);
    let other_config = br#"{"architecture":"arm64","os":"linux","seed":12}"#.to_vec();
    for b in [&layer, &config, &other, &other_config] {
        push_blob(&server, repo, b);
    }
    let released = to_bytes(&image_manifest_value(&config, &[&layer]));
    let candidate = to_bytes(&image_manifest_value(&other_config, &[&other]));
    put(&server, repo, &sha256(&released), &released).assert_status(201);
    put(&server, repo, "candidate", &candidate).assert_status(201);
    // Released through an index (v2 names the index; the image is its child).
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": sha256(&released),
            "size": released.len(),
            "platform": {"architecture": "amd64", "os": "linux"}
        }]
    });
    let index = to_bytes(&index);
    let r = send(req::put_manifest(
        &server,
        repo,
        "v2",
        "application/vnd.oci.image.index.v1+json",
        index.clone(),
    ));
    r.assert_status(201);
    for b in [&layer, &config] {
        assert_denied(
            &delete(&server, &format!("/v2/{repo}/blobs/{}", sha256(b))),
            &["immutable tag v2", "immutable_tags[0]", "cannot be deleted"],
        );
    }
    assert_eq!(
        get(&server, &format!("/v2/{repo}/blobs/{}", sha256(&layer))).body,
        layer
    );
    // The candidate's blobs are not protected.
    delete(&server, &format!("/v2/{repo}/blobs/{}", sha256(&other))).assert_status(202);
    // Outside the rules' prefixes, blobs go as before.
    let free = common::random_bytes(100, 13);
    push_blob(&server, "team/app", &free);
    delete(&server, &format!("/v2/team/app/blobs/{}", sha256(&free))).assert_status(202);
}

/// Two pushes of the same new immutable tag with different manifests, at once, 20 times: each
/// time exactly one is 201 and the other 403 `DENIED`, and the tag names the winner's digest.
#[test]
fn two_pushes_of_a_new_immutable_tag_at_once_leave_one_winner() {
    let (server, _config) = start_with(RULES);
    let server = Arc::new(server);
    let manifests: Vec<Vec<u8>> = (0..2)
        .map(|i| image_manifest(&server, "release/race", 100 + i))
        .collect();
    for round in 0..20 {
        let tag = format!("v{round}");
        let barrier = Arc::new(Barrier::new(2));
        let pushes: Vec<_> = manifests
            .iter()
            .cloned()
            .map(|m| {
                let (server, barrier, tag) = (server.clone(), barrier.clone(), tag.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (put(&server, "release/race", &tag, &m), sha256(&m))
                })
            })
            .collect();
        let results: Vec<(Reply, String)> = pushes.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<&String> = results
            .iter()
            .filter(|(r, _)| r.status == 201)
            .map(|(_, d)| d)
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {:?}",
            results
                .iter()
                .map(|(r, _)| r.describe())
                .collect::<Vec<_>>()
        );
        let loser = results.iter().find(|(r, _)| r.status != 201).unwrap();
        assert_denied(&loser.0, &[&tag, "immutable_tags[0]"]);
        assert_eq!(tag_digest(&server, "release/race", &tag), *winners[0]);
    }
}

/// Bad patterns and prefixes stop the start, naming the rule.
#[test]
fn bad_rules_are_refused_at_start() {
    for (config, needle) in [
        (
            "[[immutable_tags]]\nprefix = \"release/\"\ntags = [\"v[0-9]*\"]\n",
            "immutable_tags[0].tags",
        ),
        (
            "[[immutable_tags]]\nprefix = \"Release\"\ntags = [\"v*\"]\n",
            "immutable_tags[0].prefix",
        ),
        (
            "[[immutable_tags]]\nprefix = \"release/\"\ntags = []\n",
            "immutable_tags[0].tags is empty",
        ),
        (
            "[[immutable_tags]]\nprefix = \"release/\"\ntags = [\"*\"]\nexcept = [\"la test\"]\n",
            "immutable_tags[0].except",
        ),
        (
            "[[immutable_tags]]\nprefix = \"release/\"\ntag = [\"v*\"]\n",
            "unknown field",
        ),
    ] {
        common::assert_config_refused(config, needle);
    }
}

/// A mirrored repository follows upstream even where every tag is immutable: a tag that moved
/// upstream moves in the mirror, and a delete there is accepted.
#[test]
fn mirrored_repositories_follow_upstream_and_are_exempt() {
    let upstream = Server::start();
    let one = image_manifest(&upstream, "release/app", 21);
    let two = image_manifest(&upstream, "release/app", 22);
    put(&upstream, "release/app", "v1", &one).assert_status(201);
    let config = format!(
        "{RULES}\n[[immutable_tags]]\nprefix = \"\"\ntags = [\"*\"]\n\n\
         [[upstreams]]\nname = \"upstream.test\"\nurl = \"http://{}\"\ntag_ttl_ms = 1\n",
        upstream.host()
    );
    let (mirror, _config) = start_with(&config);
    let local = "upstream.test/release/app";
    assert_eq!(tag_digest(&mirror, local, "v1"), sha256(&one));

    put(&upstream, "release/app", "v1", &two).assert_status(201);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tag_digest(&mirror, local, "v1") != sha256(&two) {
        assert!(
            Instant::now() < deadline,
            "the mirror never followed upstream"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    delete(&mirror, &format!("/v2/{local}/manifests/v1")).assert_status(202);

    // A local repository under the catch-all rule is covered.
    let local_one = image_manifest(&mirror, "team/app", 23);
    put(&mirror, "team/app", "x", &local_one).assert_status(201);
    assert_denied(
        &delete(&mirror, "/v2/team/app/manifests/x"),
        &["immutable_tags[2]"],
    );
}

/// Refused changes are in the event log (action `denied`, with who tried what and why), for
/// the audit trail platform teams keep.
#[test]
fn refused_moves_and_deletes_are_logged_as_denied() {
    let (server, _config) = start_with(RULES);
    let a = image_manifest(&server, "release/app", 1);
    let b = image_manifest(&server, "release/app", 2);
    put(&server, "release/app", "v1.0", &a).assert_status(201);
    assert_denied(&put(&server, "release/app", "v1.0", &b), &["v1.0"]);
    assert_denied(
        &delete(&server, "/v2/release/app/manifests/v1.0"),
        &["v1.0"],
    );
    let lines = common::events::events(&server, "action=denied", 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[0]["method"], "PUT");
    assert_eq!(lines[1]["method"], "DELETE");
    for l in &lines {
        assert_eq!(l["repository"], "release/app", "{l}");
        assert_eq!(l["path"], "/v2/release/app/manifests/v1.0", "{l}");
        assert_eq!(l["status"], 403, "{l}");
        assert_eq!(l["code"], "DENIED", "{l}");
        assert_eq!(l["client"], "127.0.0.1", "{l}");
        assert!(
            l["message"].as_str().unwrap().contains("immutable_tags[0]"),
            "{l}"
        );
    }
}
