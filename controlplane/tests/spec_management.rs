//! OCI Distribution Specification, "Content Management": deleting tags, manifests and blobs.

mod common;
mod oci;

use common::Server;
use oci::*;
use serde_json::json;

fn tags(server: &Server, repo: &str) -> Vec<String> {
    let r = get(server, &format!("/v2/{repo}/tags/list"));
    r.assert_status(200);
    r.strings("tags")
}

// spec: Content Management / Deleting tags
#[test]
fn delete_tag_is_202_and_only_the_tag_goes() {
    let server = Server::start();
    let img = push_image(&server, "deltag", Some("old"), 70);
    push_manifest(&server, "deltag", "keep", OCI_MANIFEST, &img.manifest);
    delete(&server, "/v2/deltag/manifests/old").assert_status(202);
    get(&server, "/v2/deltag/manifests/old").assert_error(404, "MANIFEST_UNKNOWN");
    head(&server, "/v2/deltag/manifests/old").assert_status(404);
    // The manifest and the other tag stay.
    let r = get(&server, &format!("/v2/deltag/manifests/{}", img.digest));
    r.assert_status(200);
    assert_eq!(r.body, img.manifest);
    assert_eq!(get(&server, "/v2/deltag/manifests/keep").body, img.manifest);
    assert_eq!(tags(&server, "deltag"), ["keep"]);
}

// spec: Content Management / Deleting Manifests ("any tag pointing to that digest will return a 404")
#[test]
fn delete_manifest_by_digest_is_202_and_its_tags_go_with_it() {
    let server = Server::start();
    let img = push_image(&server, "delman", Some("a"), 71);
    push_manifest(&server, "delman", "b", OCI_MANIFEST, &img.manifest);
    let other = push_image(&server, "delman", Some("other"), 72);
    delete(&server, &format!("/v2/delman/manifests/{}", img.digest)).assert_status(202);
    for reference in ["a", "b", img.digest.as_str()] {
        get(&server, &format!("/v2/delman/manifests/{reference}"))
            .assert_error(404, "MANIFEST_UNKNOWN");
        head(&server, &format!("/v2/delman/manifests/{reference}")).assert_status(404);
    }
    assert_eq!(tags(&server, "delman"), ["other"]);
    assert_eq!(
        get(&server, "/v2/delman/manifests/other").body,
        other.manifest
    );
    // A second delete finds nothing.
    delete(&server, &format!("/v2/delman/manifests/{}", img.digest))
        .assert_error(404, "MANIFEST_UNKNOWN");
}

// spec: Content Management / Deleting Manifests (the same manifest in another repository stays)
#[test]
fn delete_manifest_in_one_repository_keeps_it_in_another() {
    let server = Server::start();
    let a = push_image(&server, "shared/a", Some("t"), 73);
    let b = push_image(&server, "shared/b", Some("t"), 73);
    assert_eq!(a.digest, b.digest);
    delete(&server, &format!("/v2/shared/a/manifests/{}", a.digest)).assert_status(202);
    get(&server, "/v2/shared/a/manifests/t").assert_status(404);
    let r = get(&server, "/v2/shared/b/manifests/t");
    r.assert_status(200);
    assert_eq!(r.body, b.manifest);
    // Its blobs are still served in b.
    let layer = &b.layers[0];
    assert_eq!(
        get(
            &server,
            &format!("/v2/shared/b/blobs/{}", common::sha256(layer))
        )
        .body,
        *layer
    );
}

// spec: Content Management / Deleting Manifests (a deleted referrer leaves its subject's list)
#[test]
fn delete_referrer_removes_it_from_referrers_list() {
    let server = Server::start();
    let subject = push_image(&server, "delref", Some("v1"), 74);
    push_blob(&server, "delref", b"{}");
    let make = |note: &str| {
        to_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.note",
            "config": {"mediaType": OCI_EMPTY, "digest": common::sha256(b"{}"), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len()},
            "annotations": {"note": note},
        }))
    };
    let keep = make("keep");
    let gone = make("gone");
    let keep_digest = push_manifest(&server, "delref", "keep", OCI_MANIFEST, &keep);
    let gone_digest = push_manifest(&server, "delref", "gone", OCI_MANIFEST, &gone);
    let path = format!("/v2/delref/referrers/{}", subject.digest);
    assert_eq!(
        get(&server, &path).json()["manifests"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    delete(&server, &format!("/v2/delref/manifests/{gone_digest}")).assert_status(202);
    let r = get(&server, &path);
    r.assert_status(200);
    let list = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], keep_digest);
    get(&server, "/v2/delref/manifests/gone").assert_status(404);

    // Deleting only a tag of a referrer keeps it listed.
    delete(&server, "/v2/delref/manifests/keep").assert_status(202);
    assert_eq!(
        get(&server, &path).json()["manifests"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

// spec: Content Management / Deleting Blobs
#[test]
fn delete_blob_is_202_then_404() {
    let server = Server::start();
    let bytes = common::random_bytes(2048, 75);
    let digest = push_blob(&server, "delblob", &bytes);
    delete(&server, &format!("/v2/delblob/blobs/{digest}")).assert_status(202);
    get(&server, &format!("/v2/delblob/blobs/{digest}")).assert_error(404, "BLOB_UNKNOWN");
    head(&server, &format!("/v2/delblob/blobs/{digest}")).assert_status(404);
    delete(&server, &format!("/v2/delblob/blobs/{digest}")).assert_error(404, "BLOB_UNKNOWN");
    // It can be pushed again.
    push_blob(&server, "delblob", &bytes);
    assert_eq!(
        get(&server, &format!("/v2/delblob/blobs/{digest}")).body,
        bytes
    );
}

// spec: Content Management / Deleting Blobs (a blob deleted from one repository stays in another)
#[test]
fn delete_blob_in_one_repository_keeps_it_in_another() {
    let server = Server::start();
    let bytes = common::random_bytes(4096, 76);
    let digest = push_blob(&server, "blobs/a", &bytes);
    push_blob(&server, "blobs/b", &bytes);
    delete(&server, &format!("/v2/blobs/a/blobs/{digest}")).assert_status(202);
    get(&server, &format!("/v2/blobs/a/blobs/{digest}")).assert_status(404);
    let r = get(&server, &format!("/v2/blobs/b/blobs/{digest}"));
    r.assert_status(200);
    assert_eq!(r.body, bytes);
    // And it can be mounted back from b.
    let r = open_upload(&server, "blobs/a", &format!("mount={digest}&from=blobs/b"));
    r.assert_status(201);
    assert_eq!(
        get(&server, &format!("/v2/blobs/a/blobs/{digest}")).body,
        bytes
    );
}

// spec: Content Management (deleting what is not there is 404)
#[test]
fn delete_unknown_tag_manifest_or_blob_is_404() {
    let server = Server::start();
    push_image(&server, "delunknown", Some("t"), 77);
    let missing = common::sha256(b"missing");
    delete(&server, "/v2/delunknown/manifests/nope").assert_error(404, "MANIFEST_UNKNOWN");
    delete(&server, &format!("/v2/delunknown/manifests/{missing}"))
        .assert_error(404, "MANIFEST_UNKNOWN");
    delete(&server, &format!("/v2/delunknown/blobs/{missing}")).assert_error(404, "BLOB_UNKNOWN");
    // In a repository that does not exist.
    assert_eq!(delete(&server, "/v2/no/repo/manifests/t").status, 404);
    assert_eq!(
        delete(&server, &format!("/v2/no/repo/blobs/{missing}")).status,
        404
    );
    // The existing tag was not touched.
    get(&server, "/v2/delunknown/manifests/t").assert_status(200);
}

// spec: Content Management / Deleting tags (a deleted tag can be pushed again)
#[test]
fn deleted_tag_can_be_pushed_again() {
    let server = Server::start();
    let first = push_image(&server, "retag", Some("t"), 78);
    delete(&server, "/v2/retag/manifests/t").assert_status(202);
    let second = push_image(&server, "retag", Some("t"), 79);
    let r = get(&server, "/v2/retag/manifests/t");
    assert_eq!(r.body, second.manifest);
    assert_ne!(first.digest, second.digest);
}
