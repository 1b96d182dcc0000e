//! OCI Distribution Specification, "Content Discovery": listing tags (with `n`/`last`
//! pagination and `Link`), the catalog, and the referrers API (with `artifactType` filtering).

mod common;
mod oci;

use common::Server;
use oci::*;
use serde_json::{json, Value};

/// Pushes one small manifest and tags it with every tag in `tags`.
fn tag_all(server: &Server, repo: &str, tags: &[&str]) -> String {
    push_blob(server, repo, b"{}");
    let m = to_bytes(&image_manifest_value(b"{}", &[]));
    let mut digest = String::new();
    for t in tags {
        digest = push_manifest(server, repo, t, OCI_MANIFEST, &m);
    }
    digest
}

// spec: Content Discovery / Listing Tags ("lexical or ASCIIbetical order")
#[test]
fn tags_list_returns_name_and_tags_in_asciibetical_order() {
    let server = Server::start();
    tag_all(
        &server,
        "org/tagged",
        &["v2", "latest", "A", "_x", "1.0", "Z9", "a-b"],
    );
    let r = get(&server, "/v2/org/tagged/tags/list");
    r.assert_status(200);
    let v = r.json();
    assert_eq!(v["name"], "org/tagged");
    assert_eq!(
        r.strings("tags"),
        ["1.0", "A", "Z9", "_x", "a-b", "latest", "v2"]
    );
    assert!(
        r.header_opt("Link").is_none(),
        "no Link without n: {}",
        r.describe()
    );
}

// spec: Content Discovery / Listing Tags ("The list of tags MAY be empty")
#[test]
fn tags_list_of_repository_without_tags_is_200_empty() {
    let server = Server::start();
    push_blob(&server, "untagged", b"{}");
    let m = to_bytes(&image_manifest_value(b"{}", &[]));
    push_manifest(&server, "untagged", &common::sha256(&m), OCI_MANIFEST, &m);
    let r = get(&server, "/v2/untagged/tags/list");
    r.assert_status(200);
    assert_eq!(r.json()["name"], "untagged");
    assert_eq!(r.strings("tags"), Vec::<String>::new());
}

// spec: Content Discovery / Listing Tags (an unknown repository is 404 NAME_UNKNOWN)
#[test]
fn tags_list_of_unknown_repository_is_404_name_unknown() {
    let server = Server::start();
    tag_all(&server, "known/repo", &["t"]);
    get(&server, "/v2/unknown/repo/tags/list").assert_error(404, "NAME_UNKNOWN");
    get(&server, "/v2/known/tags/list").assert_error(404, "NAME_UNKNOWN");
}

// spec: Content Discovery / Listing Tags (`n`, `last` and the `Link` header, followed to the end)
#[test]
fn tags_list_paginates_with_n_and_link_header() {
    let server = Server::start();
    let all = ["a", "b", "c", "d", "e"];
    tag_all(&server, "paged", &all);

    let r = get(&server, "/v2/paged/tags/list?n=2");
    r.assert_status(200);
    assert_eq!(r.strings("tags"), ["a", "b"]);
    assert_eq!(
        r.header("Link"),
        "</v2/paged/tags/list?n=2&last=b>; rel=\"next\""
    );

    // Following Link to the end visits every tag once, in order.
    let mut seen = Vec::new();
    let mut next = Some("/v2/paged/tags/list?n=2".to_string());
    let mut pages = 0;
    while let Some(path) = next {
        pages += 1;
        assert!(pages <= 10, "pagination does not end");
        let r = get(&server, &path);
        r.assert_status(200);
        let page = r.strings("tags");
        assert!(page.len() <= 2, "page longer than n: {page:?}");
        seen.extend(page);
        next = next_link(&r);
    }
    assert_eq!(seen, all);
    assert_eq!(pages, 3);
}

// spec: Content Discovery / Listing Tags (a last page of exactly n has no Link: nothing remains)
#[test]
fn tags_list_last_full_page_has_no_link() {
    let server = Server::start();
    tag_all(&server, "exact", &["a", "b", "c", "d"]);
    let r = get(&server, "/v2/exact/tags/list?n=4");
    assert_eq!(r.strings("tags"), ["a", "b", "c", "d"]);
    assert!(r.header_opt("Link").is_none(), "{}", r.describe());
    let r = get(&server, "/v2/exact/tags/list?n=2&last=b");
    assert_eq!(r.strings("tags"), ["c", "d"]);
    assert!(r.header_opt("Link").is_none(), "{}", r.describe());
    // n larger than the list.
    let r = get(&server, "/v2/exact/tags/list?n=100");
    assert_eq!(r.strings("tags"), ["a", "b", "c", "d"]);
    assert!(r.header_opt("Link").is_none(), "{}", r.describe());
}

// spec: Content Discovery / Listing Tags ("When n is zero ... empty list, and MUST NOT include a Link")
#[test]
fn tags_list_with_n_zero_is_empty_without_link() {
    let server = Server::start();
    tag_all(&server, "zero", &["a", "b"]);
    let r = get(&server, "/v2/zero/tags/list?n=0");
    r.assert_status(200);
    assert_eq!(r.strings("tags"), Vec::<String>::new());
    assert!(r.header_opt("Link").is_none(), "{}", r.describe());
}

// spec: Content Discovery / Listing Tags ("beginning non-inclusively with <tagname>"; n OPTIONAL)
#[test]
fn tags_list_with_last_starts_after_it() {
    let server = Server::start();
    tag_all(&server, "after", &["a", "b", "c", "d"]);
    assert_eq!(
        get(&server, "/v2/after/tags/list?last=b").strings("tags"),
        ["c", "d"]
    );
    assert_eq!(
        get(&server, "/v2/after/tags/list?n=1&last=a").strings("tags"),
        ["b"]
    );
    // `last` need not be an existing tag: it is a position in the order.
    assert_eq!(
        get(&server, "/v2/after/tags/list?last=bb").strings("tags"),
        ["c", "d"]
    );
    assert_eq!(
        get(&server, "/v2/after/tags/list?last=d").strings("tags"),
        Vec::<String>::new()
    );
}

// spec: Content Discovery (catalog, `/v2/_catalog`, from the Docker Registry HTTP API V2)
#[test]
fn catalog_lists_repositories_sorted_including_nested_names() {
    let server = Server::start();
    for repo in ["zeta", "alpha/beta", "alpha", "library/nginx", "a/b/c/d"] {
        push_image(&server, repo, Some("t"), 60);
    }
    let r = get(&server, "/v2/_catalog");
    r.assert_status(200);
    assert_eq!(
        r.strings("repositories"),
        ["a/b/c/d", "alpha", "alpha/beta", "library/nginx", "zeta"]
    );
}

// spec: Content Discovery (catalog pagination uses the same n/last/Link scheme as tags)
#[test]
fn catalog_paginates_with_n_last_and_link() {
    let server = Server::start();
    let repos = ["r1", "r2", "r3", "r4", "r5"];
    for repo in repos {
        push_blob(&server, repo, repo.as_bytes());
    }
    let r = get(&server, "/v2/_catalog?n=2");
    assert_eq!(r.strings("repositories"), ["r1", "r2"]);
    assert_eq!(r.header("Link"), "</v2/_catalog?n=2&last=r2>; rel=\"next\"");

    let mut seen = Vec::new();
    let mut next = Some("/v2/_catalog?n=2".to_string());
    let mut pages = 0;
    while let Some(path) = next {
        pages += 1;
        assert!(pages <= 10, "pagination does not end");
        let r = get(&server, &path);
        r.assert_status(200);
        seen.extend(r.strings("repositories"));
        next = next_link(&r);
    }
    assert_eq!(seen, repos);

    let r = get(&server, "/v2/_catalog?n=0");
    r.assert_status(200);
    assert_eq!(r.strings("repositories"), Vec::<String>::new());
    assert!(r.header_opt("Link").is_none());
    assert_eq!(
        get(&server, "/v2/_catalog?last=r3").strings("repositories"),
        ["r4", "r5"]
    );
}

// spec: Content Discovery (an empty registry has an empty catalog)
#[test]
fn catalog_of_empty_registry_is_empty() {
    let server = Server::start();
    let r = get(&server, "/v2/_catalog");
    r.assert_status(200);
    assert_eq!(r.strings("repositories"), Vec::<String>::new());
}

/// An artifact manifest with a subject: artifactType set or not, annotations.
fn artifact(
    subject: &Image,
    artifact_type: Option<&str>,
    config_type: &str,
    note: &str,
) -> Vec<u8> {
    let mut v = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": common::sha256(b"{}"), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len()},
        "annotations": {"org.example.note": note},
    });
    if let Some(t) = artifact_type {
        v["artifactType"] = json!(t);
    }
    to_bytes(&v)
}

fn referrers(reply: &Reply) -> Vec<Value> {
    reply.assert_status(200);
    assert_eq!(reply.header("Content-Type"), OCI_INDEX);
    let v = reply.json();
    assert_eq!(v["schemaVersion"], 2, "{}", reply.describe());
    assert_eq!(v["mediaType"], OCI_INDEX, "{}", reply.describe());
    v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("manifests is not an array: {}", reply.describe()))
        .clone()
}

fn find<'a>(list: &'a [Value], digest: &str) -> &'a Value {
    list.iter()
        .find(|d| d["digest"] == digest)
        .unwrap_or_else(|| panic!("{digest} not in {list:?}"))
}

// spec: Content Discovery / Listing Referrers
#[test]
fn referrers_lists_descriptors_with_artifact_type_and_annotations() {
    let server = Server::start();
    let subject = push_image(&server, "refs", Some("v1"), 61);
    push_blob(&server, "refs", b"{}");
    let sbom = artifact(
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "sbom",
    );
    let sig = artifact(
        &subject,
        None,
        "application/vnd.example.signature.config.v1+json",
        "sig",
    );
    let sbom_digest = push_manifest(&server, "refs", &common::sha256(&sbom), OCI_MANIFEST, &sbom);
    let sig_digest = push_manifest(&server, "refs", "sig-tag", OCI_MANIFEST, &sig);

    let list = referrers(&get(
        &server,
        &format!("/v2/refs/referrers/{}", subject.digest),
    ));
    assert_eq!(list.len(), 2, "{list:?}");
    let d = find(&list, &sbom_digest);
    assert_eq!(d["mediaType"], OCI_MANIFEST);
    assert_eq!(d["size"], sbom.len());
    assert_eq!(d["artifactType"], "application/vnd.example.sbom.v1");
    assert_eq!(d["annotations"], json!({"org.example.note": "sbom"}));
    // Without artifactType, the config's mediaType is the artifactType.
    let d = find(&list, &sig_digest);
    assert_eq!(d["size"], sig.len());
    assert_eq!(
        d["artifactType"],
        "application/vnd.example.signature.config.v1+json"
    );
    assert_eq!(d["annotations"], json!({"org.example.note": "sig"}));
}

// spec: Content Discovery / Listing Referrers ("If the artifactType is empty or missing in an
// index, the artifactType MUST be omitted")
#[test]
fn referrers_include_indexes_and_omit_missing_artifact_type() {
    let server = Server::start();
    let subject = push_image(&server, "refidx", None, 62);
    let child = push_image(&server, "refidx", None, 63);
    let index = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": child.digest, "size": child.manifest.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len()},
        "annotations": {"k": "v"},
    }));
    let r = put_manifest(&server, "refidx", "idx", OCI_INDEX, &index);
    r.assert_status(201);
    assert_eq!(r.header("OCI-Subject"), subject.digest);
    let list = referrers(&get(
        &server,
        &format!("/v2/refidx/referrers/{}", subject.digest),
    ));
    assert_eq!(list.len(), 1, "{list:?}");
    let d = &list[0];
    assert_eq!(d["digest"], common::sha256(&index));
    assert_eq!(d["mediaType"], OCI_INDEX);
    assert_eq!(d["size"], index.len());
    assert!(d.get("artifactType").is_none(), "{d}");
    assert_eq!(d["annotations"], json!({"k": "v"}));
}

// spec: Content Discovery / Listing Referrers ("SHOULD support filtering on artifactType")
#[test]
fn referrers_filtered_by_artifact_type_sets_oci_filters_applied() {
    let server = Server::start();
    let subject = push_image(&server, "filter", Some("v1"), 64);
    push_blob(&server, "filter", b"{}");
    let sbom = artifact(
        &subject,
        Some("application/vnd.example.sbom.v1"),
        OCI_EMPTY,
        "1",
    );
    let sig = artifact(
        &subject,
        Some("application/vnd.example.sig.v1"),
        OCI_EMPTY,
        "2",
    );
    let sbom_digest = push_manifest(&server, "filter", "a", OCI_MANIFEST, &sbom);
    push_manifest(&server, "filter", "b", OCI_MANIFEST, &sig);

    let r = get(
        &server,
        &format!(
            "/v2/filter/referrers/{}?artifactType=application/vnd.example.sbom.v1",
            subject.digest
        ),
    );
    let list = referrers(&r);
    assert_eq!(r.header_items("OCI-Filters-Applied"), ["artifactType"]);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["digest"], sbom_digest);

    let r = get(
        &server,
        &format!(
            "/v2/filter/referrers/{}?artifactType=application/vnd.none",
            subject.digest
        ),
    );
    assert!(referrers(&r).is_empty());
    assert_eq!(r.header_items("OCI-Filters-Applied"), ["artifactType"]);

    // Unfiltered: both, and no filter header.
    let r = get(&server, &format!("/v2/filter/referrers/{}", subject.digest));
    assert_eq!(referrers(&r).len(), 2);
    assert!(r.header_opt("OCI-Filters-Applied").is_none());
}

// spec: Content Discovery / Listing Referrers ("MUST NOT return a 404"; "an empty manifest list")
#[test]
fn referrers_of_unknown_subject_or_repository_is_200_empty() {
    let server = Server::start();
    let img = push_image(&server, "lonely", Some("v1"), 65);
    let unknown = common::sha256(b"nobody refers to this");
    for path in [
        format!("/v2/lonely/referrers/{unknown}"),
        format!("/v2/lonely/referrers/{}", img.digest),
        format!("/v2/never/pushed/referrers/{unknown}"),
    ] {
        assert!(referrers(&get(&server, &path)).is_empty(), "{path}");
    }
}

// spec: Content Discovery / Listing Referrers ("a <digest> with an invalid syntax, a 400")
#[test]
fn referrers_with_invalid_digest_is_400() {
    let server = Server::start();
    for bad in [
        "sha256:xyz",
        "latest",
        "sha256:ABCDEF",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
    ] {
        get(&server, &format!("/v2/r/referrers/{bad}")).assert_error(400, "DIGEST_INVALID");
    }
}

// spec: Content Discovery / Listing Referrers ("in the same <name> namespace"); Push ("allowing
// clients to push a manifest and referrers to that manifest in either order")
#[test]
fn referrers_are_per_repository_and_may_precede_their_subject() {
    let server = Server::start();
    // The subject's bytes are known before it is pushed.
    push_blob(&server, "early", b"{}");
    let subject_bytes = to_bytes(&image_manifest_value(b"{}", &[]));
    let subject = Image {
        config: b"{}".to_vec(),
        layers: vec![],
        digest: common::sha256(&subject_bytes),
        manifest: subject_bytes.clone(),
    };
    let a = artifact(
        &subject,
        Some("application/vnd.example.early"),
        OCI_EMPTY,
        "e",
    );
    let a_digest = push_manifest(&server, "early", "art", OCI_MANIFEST, &a);
    let list = referrers(&get(
        &server,
        &format!("/v2/early/referrers/{}", subject.digest),
    ));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], a_digest);
    // Push the subject afterwards: the referrer stays listed.
    push_manifest(&server, "early", "subject", OCI_MANIFEST, &subject_bytes);
    let list = referrers(&get(
        &server,
        &format!("/v2/early/referrers/{}", subject.digest),
    ));
    assert_eq!(list.len(), 1);
    // Another repository does not see it.
    push_blob(&server, "other", b"{}");
    push_manifest(&server, "other", "subject", OCI_MANIFEST, &subject_bytes);
    assert!(referrers(&get(
        &server,
        &format!("/v2/other/referrers/{}", subject.digest)
    ))
    .is_empty());
}

// spec: Content Discovery (catalog pagination across nested names: `last` holds a '/')
#[test]
fn catalog_pagination_follows_links_through_nested_names() {
    let server = Server::start();
    let repos = ["a", "a/b", "a/b/c", "a-b", "b/x", "library/nginx", "z"];
    for repo in repos {
        push_blob(&server, repo, repo.as_bytes());
    }
    let mut sorted: Vec<&str> = repos.to_vec();
    sorted.sort();
    for n in 1..=3 {
        let mut seen = Vec::new();
        let mut next = Some(format!("/v2/_catalog?n={n}"));
        let mut pages = 0;
        while let Some(path) = next {
            pages += 1;
            assert!(pages <= 20, "pagination does not end");
            let r = get(&server, &path);
            r.assert_status(200);
            let page = r.strings("repositories");
            assert!(page.len() <= n, "page longer than n={n}: {page:?}");
            seen.extend(page);
            next = next_link(&r);
        }
        assert_eq!(seen, sorted, "n={n}");
    }
}

// spec: Content Discovery / Listing Tags (the Link of a nested repository names that repository)
#[test]
fn tags_list_link_of_nested_repository_names_it() {
    let server = Server::start();
    tag_all(&server, "org/team/app", &["1", "2", "3"]);
    let r = get(&server, "/v2/org/team/app/tags/list?n=1");
    assert_eq!(r.strings("tags"), ["1"]);
    assert_eq!(
        r.header("Link"),
        "</v2/org/team/app/tags/list?n=1&last=1>; rel=\"next\""
    );
    let r = get(&server, &next_link(&r).unwrap());
    assert_eq!(r.strings("tags"), ["2"]);
}

// spec: Content Discovery / Listing Referrers (a sha512 subject)
#[test]
fn referrers_of_a_sha512_subject() {
    let server = Server::start();
    push_blob(&server, "r512", b"{}");
    let subject_digest = sha512(b"some sha512 subject");
    let a = to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.x",
        "config": {"mediaType": OCI_EMPTY, "digest": common::sha256(b"{}"), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": 10},
    }));
    let r = put_manifest(&server, "r512", "a", OCI_MANIFEST, &a);
    r.assert_status(201);
    assert_eq!(r.header("OCI-Subject"), subject_digest);
    let list = referrers(&get(
        &server,
        &format!("/v2/r512/referrers/{subject_digest}"),
    ));
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["digest"], common::sha256(&a));
    assert_eq!(list[0]["artifactType"], "application/vnd.example.x");
}

// spec: Content Discovery / Listing Referrers ("A Link header MUST be included in the response
// when the descriptor list cannot be returned in a single manifest")
#[test]
fn referrers_beyond_one_page_are_reached_through_link_headers() {
    let server = Server::start_args(&["--list-page-size-max", "2"]);
    let subject = push_image(&server, "many-refs", Some("v1"), 62);
    push_blob(&server, "many-refs", b"{}");
    let mut pushed = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 {
            "application/x.even"
        } else {
            "application/x.odd"
        };
        let m = artifact(&subject, Some(kind), OCI_EMPTY, &format!("n{i}"));
        pushed.push(push_manifest(
            &server,
            "many-refs",
            &common::sha256(&m),
            OCI_MANIFEST,
            &m,
        ));
    }
    pushed.sort();
    // Every page holds at most 2, pages come in digest order, the last page has no Link.
    let mut seen = Vec::new();
    let mut path = format!("/v2/many-refs/referrers/{}", subject.digest);
    for page in 0.. {
        assert!(page < 10, "pagination does not end");
        let reply = get(&server, &path);
        let list = referrers(&reply);
        assert!(list.len() <= 2, "{list:?}");
        seen.extend(
            list.iter()
                .map(|d| d["digest"].as_str().unwrap().to_owned()),
        );
        match next_link(&reply) {
            Some(next) => path = next,
            None => break,
        }
    }
    assert_eq!(seen, pushed);
    // Filtering and paginating together: the filter is kept in the Link.
    let mut even = Vec::new();
    let mut path = format!(
        "/v2/many-refs/referrers/{}?artifactType=application/x.even",
        subject.digest
    );
    loop {
        let reply = get(&server, &path);
        assert_eq!(reply.header("OCI-Filters-Applied"), "artifactType");
        let list = referrers(&reply);
        assert!(
            list.iter()
                .all(|d| d["artifactType"] == "application/x.even"),
            "{list:?}"
        );
        even.extend(
            list.iter()
                .map(|d| d["digest"].as_str().unwrap().to_owned()),
        );
        match next_link(&reply) {
            Some(next) => path = next,
            None => break,
        }
    }
    assert_eq!(even.len(), 3);
}
