//! The event log, second part (issue 14): the control plane's own events join the data plane's
//! pulls in the same files and the same query: pushes, tag moves (old and new digest), deletes,
//! mounts, garbage collections, mirror fetches and stale serves, pulls the control plane
//! answers; and who made each request (`identity`) once access control is on, for pulls the data
//! plane answers with a token as for pushes. Real servers over real sockets: the upstream of
//! the mirror is a second Lighter.

#[path = "common/auth.rs"]
mod auth_common;
mod common;
mod oci;

use std::time::Duration;

use auth_common::{push_image_as, token, Cred, Fixture, Opts, CI, RITA};
use common::events::{events, events_until};
use common::{sha256, Server};
use reqwest::Method;
use serde_json::Value;

fn one<'a>(events: &'a [Value], what: &str, f: impl Fn(&Value) -> bool) -> &'a Value {
    let found: Vec<&Value> = events.iter().filter(|e| f(e)).collect();
    assert_eq!(found.len(), 1, "{what} in {events:#?}");
    found[0]
}

fn control(e: &Value) {
    assert_eq!(e["source"], "controlplane", "{e}");
    assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    assert!(e["time_unix_us"].as_u64().unwrap() > 0, "{e}");
}

#[test]
fn pushes_tag_moves_mounts_deletes_and_a_gc_are_logged_with_their_fields() {
    let server = Server::start();
    let first = oci::push_image(&server, "cp/app", Some("v1"), 1);
    // v1 moves to a second image; v2 is new.
    let second = oci::push_image(&server, "cp/app", Some("v1"), 2);
    let r = oci::put_manifest(&server, "cp/app", "v2", oci::OCI_MANIFEST, &second.manifest);
    r.assert_status(201);

    let pushes = events(&server, "repository=cp/app&action=push_manifest", 3);
    assert_eq!(pushes.len(), 3, "{pushes:#?}");
    let p = &pushes[0];
    control(p);
    assert_eq!(p["reference"], "v1");
    assert_eq!(p["digest"], first.digest.as_str());
    assert_eq!(p["bytes"], first.manifest.len() as u64);
    assert_eq!(p["media_type"], oci::OCI_MANIFEST);
    assert_eq!(p["status"], 201);
    assert_eq!(p["client"], "127.0.0.1");
    assert!(p.get("identity").is_none(), "anonymous: no identity: {p}");

    let layer = &first.layers[1];
    let blobs = events(
        &server,
        &format!("action=push_blob&digest={}", sha256(layer)),
        1,
    );
    assert_eq!(blobs.len(), 1, "{blobs:#?}");
    control(&blobs[0]);
    assert_eq!(blobs[0]["repository"], "cp/app");
    assert_eq!(blobs[0]["bytes"], layer.len() as u64);

    let moves = events(&server, "repository=cp/app&action=move_tag", 3);
    assert_eq!(moves.len(), 3, "{moves:#?}");
    let new_v1 = &moves[0];
    assert_eq!(new_v1["reference"], "v1");
    assert_eq!(new_v1["digest"], first.digest.as_str());
    assert!(new_v1.get("old_digest").is_none(), "a new tag: {new_v1}");
    let moved = &moves[1];
    assert_eq!(moved["reference"], "v1");
    assert_eq!(moved["old_digest"], first.digest.as_str());
    assert_eq!(moved["digest"], second.digest.as_str());
    assert_eq!(moves[2]["reference"], "v2");
    assert!(moves[2].get("old_digest").is_none());
    // Pushing a tag again where it already points moves nothing.
    oci::put_manifest(&server, "cp/app", "v2", oci::OCI_MANIFEST, &second.manifest)
        .assert_status(201);

    // A mount from cp/app into cp/other.
    let config = sha256(&first.config);
    let r = oci::post(
        &server,
        &format!("/v2/cp/other/blobs/uploads/?mount={config}&from=cp/app"),
    );
    r.assert_status(201);
    let mounts = events(&server, "action=mount_blob", 1);
    let m = one(&mounts, "the mount", |_| true);
    control(m);
    assert_eq!(m["repository"], "cp/other");
    assert_eq!(m["from"], "cp/app");
    assert_eq!(m["digest"], config.as_str());
    assert_eq!(m["bytes"], first.config.len() as u64);

    // Deletes: a tag, a manifest, a blob.
    oci::delete(&server, "/v2/cp/app/manifests/v2").assert_status(202);
    oci::delete(&server, &format!("/v2/cp/app/manifests/{}", first.digest)).assert_status(202);
    let gone = sha256(&first.layers[0]);
    oci::delete(&server, &format!("/v2/cp/app/blobs/{gone}")).assert_status(202);
    let tag = events(&server, "action=delete_tag", 1);
    let t = one(&tag, "the tag delete", |_| true);
    control(t);
    assert_eq!(
        (&t["repository"], &t["reference"], &t["digest"]),
        (
            &Value::from("cp/app"),
            &Value::from("v2"),
            &Value::from(second.digest.as_str())
        )
    );
    let m = events(&server, "action=delete_manifest", 1);
    assert_eq!(m[0]["digest"], first.digest.as_str());
    assert_eq!(m[0]["status"], 202);
    let b = events(&server, "action=delete_blob", 1);
    assert_eq!(b[0]["digest"], gone.as_str());
    assert_eq!(b[0]["repository"], "cp/app");

    // The first image's manifest and first layer are held by no repository now.
    let r = oci::post(&server, "/v2/_lighter/gc");
    r.assert_status(200);
    let report = r.json();
    assert!(report["removed_blobs"].as_u64().unwrap() >= 2, "{report}");
    let gc = events(&server, "action=gc", 1);
    let g = one(&gc, "the collection", |_| true);
    control(g);
    assert_eq!(g["removed_blobs"], report["removed_blobs"]);
    assert_eq!(g["bytes"], report["removed_bytes"]);
    let removed: Vec<&str> = g["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(removed.contains(&first.digest.as_str()), "{g}");
    assert!(removed.contains(&gone.as_str()), "{g}");
    assert_eq!(g["client"], "127.0.0.1");
}

#[test]
fn both_planes_events_come_out_in_time_order() {
    let server = Server::start();
    let digest = oci::push_blob(&server, "cp/order", b"ordered");
    // Pushes (the control plane) and pulls (the data plane) interleaved.
    for i in 0..10u8 {
        oci::push_blob(&server, "cp/order", &[b'x', i]);
        oci::get(&server, &format!("/v2/cp/order/blobs/{digest}")).assert_status(200);
    }
    let all = events(&server, "repository=cp/order", 21);
    assert_eq!(all.len(), 21, "{all:#?}");
    let sources: Vec<&str> = all.iter().map(|e| e["source"].as_str().unwrap()).collect();
    assert_eq!(sources.iter().filter(|s| **s == "dataplane").count(), 10);
    let times: Vec<u64> = all
        .iter()
        .map(|e| e["time_unix_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    // Each pull follows the push before it.
    assert_eq!(sources[0], "controlplane");
    for pair in sources[1..].chunks(2) {
        assert_eq!(pair, ["controlplane", "dataplane"], "{sources:?}");
    }
}

/// A mirror whose upstream is another Lighter: a cold pull is a manifest fetch and a blob
/// fetch (with the control plane's own pull answers), and once upstream is gone the cached tag
/// is served stale, each logged.
#[test]
fn mirror_fetches_and_a_stale_serve_are_logged() {
    let mut upstream = Server::start();
    let image = oci::push_image(&upstream, "library/app", Some("1.0"), 7);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lighter.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ntag_ttl_ms = 1\n",
            upstream.url("")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let server = Server::launch_temp(|l| l.args(&["--config", &config]));
    let repo = "docker.io/library/app";

    let r = oci::get_manifest(&server, repo, "1.0", oci::OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.body, image.manifest);
    let layer = &image.layers[1];
    let r = oci::get(&server, &format!("/v2/{repo}/blobs/{}", sha256(layer)));
    r.assert_status(200);
    assert_eq!(&r.body, layer);

    let fetched = events(&server, "action=mirror_fetch", 2);
    let m = one(&fetched, "the manifest fetch", |e| e["kind"] == "manifest");
    control(m);
    assert_eq!(m["upstream"], "docker.io");
    assert_eq!(m["repository"], repo);
    assert_eq!(m["digest"], image.digest.as_str());
    assert_eq!(m["bytes"], image.manifest.len() as u64);
    assert_eq!(m["outcome"], "cached");
    let b = one(&fetched, "the blob fetch", |e| e["kind"] == "blob");
    assert_eq!(b["digest"], sha256(layer).as_str());
    assert_eq!(b["bytes"], layer.len() as u64);
    assert_eq!(b["outcome"], "cached");
    assert_eq!(b["repository"], repo);

    // The control plane answered both pulls (the data plane had neither).
    let pulls = events(
        &server,
        &format!("repository={repo}&source=controlplane&action=pull_manifest"),
        1,
    );
    assert_eq!(pulls[0]["digest"], image.digest.as_str());
    assert_eq!(pulls[0]["status"], 200);
    assert_eq!(pulls[0]["bytes"], image.manifest.len() as u64);
    let pulls = events(
        &server,
        &format!(
            "source=controlplane&action=pull_blob&digest={}",
            sha256(layer)
        ),
        1,
    );
    assert_eq!(pulls[0]["status"], 200);
    assert_eq!(pulls[0]["bytes"], layer.len() as u64);
    assert_eq!(pulls[0]["client"], "127.0.0.1");

    // The tag moved upstream: seen (after its 1 ms TTL) as a move with both digests.
    let newer = oci::push_image(&upstream, "library/app", Some("1.0"), 8);
    std::thread::sleep(Duration::from_millis(5));
    let r = oci::get_manifest(&server, repo, "1.0", oci::OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.body, newer.manifest);
    let moves = events_until(
        &server,
        &format!("repository={repo}&action=move_tag"),
        |l| l.iter().any(|e| e.get("old_digest").is_some()),
    );
    let moved = one(&moves, "the upstream move", |e| {
        e.get("old_digest").is_some()
    });
    assert_eq!(moved["old_digest"], image.digest.as_str());
    assert_eq!(moved["digest"], newer.digest.as_str());
    assert_eq!(moved["upstream"], "docker.io");

    // Upstream gone: the cached tag is served, and the log says it was stale.
    upstream.kill();
    std::thread::sleep(Duration::from_millis(5));
    let r = oci::get_manifest(&server, repo, "1.0", oci::OCI_MANIFEST);
    r.assert_status(200);
    assert_eq!(r.body, newer.manifest);
    let stale = events(&server, "action=mirror_stale", 1);
    let s = one(&stale, "the stale serve", |_| true);
    control(s);
    assert_eq!(s["repository"], repo);
    assert_eq!(s["reference"], "1.0");
    assert_eq!(s["digest"], newer.digest.as_str());
    assert_eq!(s["upstream"], "docker.io");
    assert!(s["error"].as_str().is_some_and(|e| !e.is_empty()), "{s}");
}

/// With access control on, records carry who made the request: the user of Basic credentials
/// (pushes, at the control plane), a token's subject (pulls the data plane answers), nothing
/// for anonymous pulls; `identity=` filters.
/// Prefetches are logged (image, digest, bytes), and so is each blob the cache's size cap
/// evicts (digest, bytes, repository, reason): the least recently pulled image's blobs go when
/// the next one passes `cache_size_max_bytes`.
#[test]
fn prefetches_and_evictions_are_logged() {
    let upstream = Server::start();
    let a = oci::push_image(&upstream, "library/a", Some("1.0"), 21);
    let b = oci::push_image(&upstream, "library/b", Some("1.0"), 22);
    let bytes =
        |i: &oci::Image| (i.config.len() + i.layers.iter().map(Vec::len).sum::<usize>()) as u64;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lighter.toml");
    std::fs::write(
        &config,
        format!(
            "cache_size_max_bytes = {}\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\n",
            bytes(&b) + 100,
            upstream.url("")
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let server = Server::launch_temp(|l| l.args(&["--config", &config]));

    oci::post(
        &server,
        "/v2/_lighter/prefetch?image=docker.io/library/a:1.0",
    )
    .assert_status(200);
    // Pull times are recorded to the second.
    std::thread::sleep(Duration::from_millis(1100));
    oci::post(
        &server,
        "/v2/_lighter/prefetch?image=docker.io/library/b:1.0",
    )
    .assert_status(200);

    let prefetched = events(&server, "action=prefetch", 2);
    for (image, repo) in [(&a, "docker.io/library/a"), (&b, "docker.io/library/b")] {
        let e = one(&prefetched, repo, |e| e["repository"] == repo);
        control(e);
        assert_eq!(e["digest"], image.digest.as_str(), "{e}");
        assert_eq!(e["reference"], "1.0", "{e}");
        assert_eq!(e["bytes"], bytes(image), "{e}");
        assert_eq!(e["blobs"], 3, "{e}");
    }
    let evicted = events(&server, "action=evict", 3);
    let a_blobs: Vec<String> = std::iter::once(&a.config)
        .chain(&a.layers)
        .map(|blob| sha256(blob))
        .collect();
    for e in &evicted {
        control(e);
        assert_eq!(e["reason"], "cache_size", "{e}");
        assert_eq!(e["repository"], "docker.io/library/a", "{e}");
        let d = e["digest"].as_str().unwrap().to_owned();
        assert!(a_blobs.contains(&d), "evicted a blob not a's: {e}");
    }
    let sum: u64 = evicted.iter().map(|e| e["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sum, bytes(&a));
}

#[test]
fn identities_are_logged_for_authenticated_pushes_and_pulls() {
    let fx = Fixture::new();
    let opts = Opts {
        tables: "[[auth.rules]]\nprefix = \"_lighter/events\"\nadmin = [\"anonymous\"]\n".into(),
        ..Opts::default()
    };
    let server = fx.start_with(&opts);
    let ci = Cred::basic(CI);
    let public = push_image_as(&server, "team/app", "v1", 3, &ci);
    let secret = push_image_as(&server, "private/secret", "v1", 4, &ci);

    let pushed = events(&server, "identity=ci&action=push_manifest", 2);
    assert_eq!(pushed.len(), 2, "{pushed:#?}");
    for e in &pushed {
        control(e);
        assert_eq!(e["identity"], "ci");
    }
    assert_eq!(pushed[1]["repository"], "private/secret");
    let blobs = events(&server, "identity=ci&action=push_blob", 6);
    assert_eq!(blobs.len(), 6, "{blobs:#?}");

    // rita pulls with a token, at the data plane; then anonymously, a public blob.
    let rita = token(
        &server,
        &Cred::basic(RITA),
        &["repository:private/secret:pull"],
    );
    let layer = sha256(&secret.layers[0]);
    let r = oci::send(Cred::bearer(&rita).apply(oci::request(
        &server,
        Method::GET,
        &format!("/v2/private/secret/blobs/{layer}"),
    )));
    r.assert_status(200);
    assert_eq!(r.body, secret.layers[0]);
    let public_layer = sha256(&public.layers[0]);
    oci::get(&server, &format!("/v2/team/app/blobs/{public_layer}")).assert_status(200);

    let pulls = events(&server, "identity=rita", 1);
    let p = one(&pulls, "rita's pull", |_| true);
    assert_eq!(p["source"], "dataplane");
    assert_eq!(p["action"], "pull_blob");
    assert_eq!(p["digest"], layer.as_str());
    assert_eq!(p["repository"], "private/secret");
    assert_eq!(p["status"], 200);
    let anon = events(
        &server,
        &format!("digest={public_layer}&action=pull_blob"),
        1,
    );
    let a = one(&anon, "the anonymous pull", |_| true);
    assert_eq!(a["source"], "dataplane");
    assert!(a.get("identity").is_none(), "anonymous: {a}");

    // Basic credentials on a pull: the data plane hands it over, the control plane answers
    // and logs it with the user.
    let r = oci::send(ci.apply(oci::request(
        &server,
        Method::GET,
        &format!("/v2/private/secret/manifests/{}", secret.digest),
    )));
    r.assert_status(200);
    let cp = events(&server, "identity=ci&action=pull_manifest", 1);
    let c = one(&cp, "ci's pull", |_| true);
    control(c);
    assert_eq!(c["digest"], secret.digest.as_str());
    assert_eq!(c["bytes"], secret.manifest.len() as u64);
    assert!(events(&server, "identity=nobody", 0).is_empty());
}
