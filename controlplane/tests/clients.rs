//! Real registry clients against the real server, offline: skopeo, podman, buildah, containerd's
//! `ctr` (against a private containerd daemon) and oras-py. Each test starts its own `lighter`,
//! builds its images itself (an OCI image layout with gzip'd tar layers, a config with diff ids,
//! a manifest, and a two-platform index), drives the clients as subprocesses with a timeout, and
//! checks digests and bytes end to end.
//!
//! The containers tools (skopeo, podman, buildah) get a private home per test: registries.conf
//! marking the server insecure, a permissive signature policy, and vfs storage in a temporary
//! directory (no overlay mounts, no systemd, no journald needed), plus the plain-HTTP flags a user
//! would type (`--tls-verify=false`, `--src-tls-verify=false`, `--dest-tls-verify=false`);
//! containerd gets a daemon of its own and `ctr --plain-http`; oras-py `insecure=True`.
//!
//! Needs the clients installed (`bash .ci/run` installs them on Debian); a missing one fails the
//! test naming the install command. `LIGHTER_SKIP_CLIENT_TESTS=1` skips every test here.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::clients::{
    clients, gunzip, hex, layer_digests_of, ok, run, text, write_layout, Ctr, Image, Tools,
    ACCEPT_ALL,
};
use common::containerd::Containerd;
use common::{sha256, Server, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Images built by the tests: one per platform, and a two-platform index
// ---------------------------------------------------------------------------------------------

impl Image {
    /// Every layer's blob is 48 KiB and more of random bytes then 400 lines of text, its
    /// `layer-<i>.txt` names the architecture, and the manifest has a title.
    fn new(arch: &'static str, seed: u64) -> Image {
        let title = json!({"org.opencontainers.image.title": format!("lighter test {seed}")});
        Image::build(arch, seed, "lighter-clients", Some(title), |i| {
            let blob = Image::blob(seed, i, 48 * 1024 + 1000 * i as usize, 400);
            (format!("layer {i} of image {seed} ({arch})\n"), blob)
        })
    }
}

/// A two-platform OCI index: linux/amd64 and linux/arm64.
struct MultiPlatform {
    images: Vec<Image>,
    index: Vec<u8>,
    digest: String,
}

impl MultiPlatform {
    fn new(seed: u64) -> MultiPlatform {
        let images = vec![Image::new("amd64", seed), Image::new("arm64", seed + 1)];
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|img| json!({
                "mediaType": OCI_MANIFEST,
                "digest": img.digest,
                "size": img.manifest.len(),
                "platform": {"architecture": img.arch, "os": "linux"},
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let digest = sha256(&index);
        MultiPlatform {
            images,
            index,
            digest,
        }
    }

    fn blobs(&self) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = vec![&self.index];
        for img in &self.images {
            v.extend(img.blobs());
        }
        v
    }
}

/// Asserts the OCI layout a client wrote at `dir` names `top` (of `media_type`) as `tag` and holds
/// exactly `blobs`, byte for byte, and nothing else.
fn assert_layout(dir: &Path, tag: &str, media_type: &str, top: &[u8], blobs: &[&[u8]]) {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in the copied layout's index.json: {index}"));
    assert_eq!(
        entry["digest"],
        sha256(top),
        "copied manifest digest for {tag}: {index}"
    );
    assert_eq!(entry["size"], top.len(), "{index}");
    assert_eq!(entry["mediaType"], media_type, "{index}");
    let expected: BTreeSet<String> = blobs.iter().map(|b| hex(&sha256(b)).to_string()).collect();
    let found: BTreeSet<String> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(found, expected, "blobs in the copied layout");
    for blob in blobs {
        let path = dir.join("blobs/sha256").join(hex(&sha256(blob)));
        assert!(
            std::fs::read(&path).unwrap() == *blob,
            "{path:?} differs from what was pushed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The containers tools over plain HTTP: the registry marked insecure in their home, and the
// plain-HTTP flags a user would type
// ---------------------------------------------------------------------------------------------

impl Tools {
    /// skopeo copies a single-platform image from an OCI layout to `HOST/<reference>`.
    fn push_image(&self, img: &Image, reference: &str) {
        self.push(img, reference, &["--dest-tls-verify=false"]);
    }

    /// `skopeo inspect --raw` of `HOST/<reference>`: the manifest bytes the registry serves.
    fn raw_manifest(&self, reference: &str) -> Vec<u8> {
        ok(&mut self.skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &self.docker(reference),
        ]))
        .stdout
    }

    /// `skopeo --override-arch <arch> inspect` of `HOST/<reference>`.
    fn inspect_for_arch(&self, reference: &str, arch: &str) -> Value {
        let out = ok(&mut self.skopeo(&[
            "--override-arch",
            arch,
            "--override-os",
            "linux",
            "inspect",
            "--tls-verify=false",
            &self.docker(reference),
        ]));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `skopeo inspect` (the image's digest, architecture, env, labels...) of `HOST/<reference>`.
    fn inspect(&self, reference: &str) -> Value {
        let out = ok(&mut self.skopeo(&["inspect", "--tls-verify=false", &self.docker(reference)]));
        serde_json::from_slice(&out.stdout).expect("skopeo inspect prints JSON")
    }
}

/// GET a manifest with every manifest type accepted: (status, content type, body).
fn get_manifest(server: &Server, repo: &str, reference: &str) -> (u16, String, Vec<u8>) {
    let r = Server::client()
        .get(server.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Accept", ACCEPT_ALL)
        .send()
        .expect("GET manifest");
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.bytes().unwrap().to_vec())
}

fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let r = Server::client()
        .get(server.url(path))
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    let body = r.bytes().unwrap();
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "GET {path} ({status}): body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, value)
}

fn tags(server: &Server, repo: &str) -> Vec<String> {
    let (status, v) = get_json(server, &format!("/v2/{repo}/tags/list"));
    assert_eq!(status, 200, "tags of {repo}: {v}");
    let mut tags: Vec<String> = v["tags"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    tags.sort();
    tags
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// skopeo copies a three-layer image from an OCI layout into the registry and back out to a new
/// layout: same manifest digest, every blob byte for byte; `inspect --raw` serves the exact
/// manifest bytes pushed; `list-tags` sees the tag; a registry-to-registry copy into another
/// repository (a cross-repository mount for skopeo) keeps the digest.
#[test]
fn skopeo_copies_a_multi_layer_image_in_and_out_byte_for_byte() {
    if !clients(&["skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let img = Image::new("amd64", 1);

    tools.push_image(&img, "team/app:v1");

    let raw = tools.raw_manifest("team/app:v1");
    assert!(
        raw == img.manifest,
        "skopeo inspect --raw returned other bytes than were pushed: {}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(sha256(&raw), img.digest);
    let inspected = tools.inspect("team/app:v1");
    assert_eq!(inspected["Digest"], img.digest, "{inspected}");
    assert_eq!(inspected["Architecture"], "amd64", "{inspected}");
    assert_eq!(
        inspected["Layers"],
        json!(img.layer_digests()),
        "{inspected}"
    );
    let by_digest = tools.raw_manifest(&format!("team/app@{}", img.digest));
    assert!(by_digest == img.manifest, "inspect --raw by digest");

    let listed: Value = serde_json::from_slice(
        &ok(&mut tools.skopeo(&["list-tags", "--tls-verify=false", &tools.docker("team/app")]))
            .stdout,
    )
    .unwrap();
    assert_eq!(listed["Tags"], json!(["v1"]), "{listed}");

    let out = tools.path().join("out");
    ok(&mut tools.copy(
        &["--preserve-digests", "--src-tls-verify=false"],
        &tools.docker("team/app:v1"),
        &format!("oci:{}:v1", out.display()),
    ));
    assert_layout(&out, "v1", OCI_MANIFEST, &img.manifest, &img.blobs());

    // Registry to registry, same server: skopeo mounts or reuses the blobs of team/app.
    ok(&mut tools.copy(
        &[
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ],
        &tools.docker("team/app:v1"),
        &tools.docker("other/copy:v1"),
    ));
    let (status, ct, body) = get_manifest(&server, "other/copy", "v1");
    assert_eq!((status, ct.as_str()), (200, OCI_MANIFEST));
    assert!(
        body == img.manifest,
        "registry-to-registry copy changed the manifest"
    );
    for layer in &img.layers {
        let r = Server::client()
            .get(server.url(&format!("/v2/other/copy/blobs/{}", sha256(layer))))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.bytes().unwrap() == *layer, "layer bytes in other/copy");
    }
}

/// `skopeo copy --all` of a two-platform index (amd64 + arm64) into the registry and back: the
/// index and both manifests keep their digests, all eleven blobs come back byte for byte, and the
/// registry serves the index as an OCI index; copied again with `--format v2s2`, it is served as
/// a Docker manifest list of Docker manifests over the same blobs.
#[test]
fn skopeo_copies_a_multi_platform_index_with_all() {
    if !clients(&["skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let multi = MultiPlatform::new(10);
    let layout = tools.path().join("multi-src");
    write_layout(
        &layout,
        &multi.blobs(),
        &[("multi", OCI_INDEX, &multi.index)],
    );

    ok(&mut tools.copy(
        &["--all", "--preserve-digests", "--dest-tls-verify=false"],
        &format!("oci:{}:multi", layout.display()),
        &tools.docker("team/multi:1.0"),
    ));

    let (status, ct, body) = get_manifest(&server, "team/multi", "1.0");
    assert_eq!((status, ct.as_str()), (200, OCI_INDEX));
    assert!(
        body == multi.index,
        "served index differs from the pushed one"
    );
    assert!(tools.raw_manifest("team/multi:1.0") == multi.index);
    for img in &multi.images {
        let raw = tools.raw_manifest(&format!("team/multi@{}", img.digest));
        assert!(raw == img.manifest, "{} manifest by digest", img.arch);
        // skopeo picks the platform's image out of the index (its "Digest" is the index's).
        let picked = tools.inspect_for_arch("team/multi:1.0", img.arch);
        assert_eq!(picked["Digest"], multi.digest, "{picked}");
        assert_eq!(picked["Architecture"], img.arch, "{picked}");
        assert_eq!(picked["Layers"], json!(img.layer_digests()), "{picked}");
    }

    let out = tools.path().join("multi-out");
    ok(&mut tools.copy(
        &["--all", "--preserve-digests", "--src-tls-verify=false"],
        &tools.docker("team/multi:1.0"),
        &format!("oci:{}:1.0", out.display()),
    ));
    assert_layout(&out, "1.0", OCI_INDEX, &multi.index, &multi.blobs());

    // Converted on the way to a Docker manifest list of Docker schema 2 manifests: same configs
    // and layers, new manifests, each served under its own media type.
    ok(&mut tools.copy(
        &[
            "--all",
            "--format",
            "v2s2",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ],
        &tools.docker("team/multi:1.0"),
        &tools.docker("team/multi-docker:1.0"),
    ));
    let (status, ct, body) = get_manifest(&server, "team/multi-docker", "1.0");
    assert_eq!((status, ct.as_str()), (200, DOCKER_LIST));
    let list: Value = serde_json::from_slice(&body).unwrap();
    let entries = list["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{list}");
    for (entry, img) in entries.iter().zip(&multi.images) {
        assert_eq!(entry["mediaType"], DOCKER_MANIFEST, "{list}");
        assert_eq!(entry["platform"]["architecture"], img.arch, "{list}");
        let digest = entry["digest"].as_str().unwrap();
        let (status, ct, body) = get_manifest(&server, "team/multi-docker", digest);
        assert_eq!((status, ct.as_str()), (200, DOCKER_MANIFEST));
        assert_eq!(sha256(&body), digest);
        assert_eq!(entry["size"], body.len());
        assert_eq!(layer_digests_of(&body), img.layer_digests());
        let m: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(m["config"]["digest"], img.config_digest(), "{m}");
    }
}

/// skopeo deletes a manifest by digest: GET of that digest and of its tag then answer 404
/// MANIFEST_UNKNOWN, the tag leaves the tag list, another tag of the repository stays; deleting by
/// tag (skopeo resolves it to the digest) empties the repository's tag list.
#[test]
fn skopeo_delete_by_digest_makes_the_manifest_404() {
    if !clients(&["skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let gone = Image::new("amd64", 30);
    let kept = Image::new("amd64", 31);
    tools.push_image(&gone, "team/del:v1");
    tools.push_image(&kept, "team/del:keep");
    assert_eq!(tags(&server, "team/del"), ["keep", "v1"]);

    ok(&mut tools.skopeo(&[
        "delete",
        "--tls-verify=false",
        &tools.docker(&format!("team/del@{}", gone.digest)),
    ]));

    let (status, _, body) = get_manifest(&server, "team/del", &gone.digest);
    assert_eq!(
        status,
        404,
        "GET of a deleted manifest: {}",
        String::from_utf8_lossy(&body)
    );
    let err: Value = serde_json::from_slice(&body).expect("error body is JSON");
    assert_eq!(err["errors"][0]["code"], "MANIFEST_UNKNOWN", "{err}");
    let (status, _, _) = get_manifest(&server, "team/del", "v1");
    assert_eq!(status, 404, "the deleted manifest's tag still resolves");
    assert_eq!(tags(&server, "team/del"), ["keep"]);
    let failed = run(&mut tools.skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &tools.docker(&format!("team/del@{}", gone.digest)),
    ]));
    assert!(
        !failed.status.success(),
        "skopeo still inspects the deleted manifest"
    );
    let (status, _, body) = get_manifest(&server, "team/del", "keep");
    assert_eq!(status, 200);
    assert!(body == kept.manifest);

    ok(&mut tools.skopeo(&[
        "delete",
        "--tls-verify=false",
        &tools.docker("team/del:keep"),
    ]));
    let (status, _, _) = get_manifest(&server, "team/del", &kept.digest);
    assert_eq!(status, 404);
    assert!(tags(&server, "team/del").is_empty());

    // The repository takes pushes again.
    tools.push_image(&gone, "team/del:again");
    assert!(tools.raw_manifest("team/del:again") == gone.manifest);
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

/// podman pulls the image skopeo pushed (by tag), pushes it to a new repository (as OCI and as
/// Docker schema 2), and a podman with empty storage pulls each back by digest: the digests podman
/// reports are the registry's, the image id is the config digest, and the layers are the ones
/// pushed.
#[test]
fn podman_pulls_and_pushes_by_tag_and_by_digest() {
    if !clients(&["podman", "skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let host = server.host();
    let img = Image::new("amd64", 40);
    tools.push_image(&img, "team/app:v1");
    let config_hex = hex(&img.config_digest()).to_string();

    let inspect = |store: &str, reference: &str| -> Value {
        let out = ok(&mut tools.podman(store, &["image", "inspect", reference]));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0].clone()
    };

    // Pull by tag.
    let tagged = format!("{host}/team/app:v1");
    ok(&mut tools.podman("a", &["pull", "--quiet", "--tls-verify=false", &tagged]));
    let v = inspect("a", &tagged);
    assert_eq!(v["Digest"], img.digest, "{v}");
    assert_eq!(v["Id"], config_hex, "{v}");
    assert_eq!(v["Architecture"], "amd64", "{v}");
    assert!(
        v["RepoDigests"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("{host}/team/app@{}", img.digest))),
        "{v}"
    );

    // Push to a new repository, OCI manifest.
    let pushed = tools.pushed_digest(
        tools.podman(
            "a",
            &["push", "--quiet", "--tls-verify=false", "--format", "oci"],
        ),
        &tagged,
        &format!("{host}/team/copy:v1"),
    );
    let (status, ct, body) = get_manifest(&server, "team/copy", "v1");
    assert_eq!((status, ct.as_str()), (200, OCI_MANIFEST));
    assert_eq!(
        sha256(&body),
        pushed,
        "podman's digest file vs the served manifest"
    );
    assert_eq!(layer_digests_of(&body), img.layer_digests());
    assert_eq!(
        tools.inspect("team/copy:v1")["Digest"],
        pushed,
        "skopeo inspect"
    );

    // Push to a new repository, Docker schema 2 manifest.
    let docker_pushed = tools.pushed_digest(
        tools.podman(
            "a",
            &["push", "--quiet", "--tls-verify=false", "--format", "v2s2"],
        ),
        &tagged,
        &format!("{host}/team/docker:v1"),
    );
    let (status, ct, body) = get_manifest(&server, "team/docker", "v1");
    assert_eq!((status, ct.as_str()), (200, DOCKER_MANIFEST));
    assert_eq!(sha256(&body), docker_pushed);
    assert_eq!(layer_digests_of(&body), img.layer_digests());

    // Fresh storage: pull each back by digest, and the original by digest too.
    for (repo, digest) in [
        ("team/copy", pushed.as_str()),
        ("team/docker", docker_pushed.as_str()),
        ("team/app", img.digest.as_str()),
    ] {
        let reference = format!("{host}/{repo}@{digest}");
        ok(&mut tools.podman("b", &["pull", "--quiet", "--tls-verify=false", &reference]));
        let v = inspect("b", &reference);
        assert_eq!(v["Id"], config_hex, "{reference}: {v}");
        assert!(
            v["RepoDigests"]
                .as_array()
                .unwrap()
                .contains(&json!(reference)),
            "{reference}: {v}"
        );
    }
    let out = ok(&mut tools.podman("b", &["images", "--quiet", "--no-trunc"]));
    assert_eq!(text(&out), format!("sha256:{config_hex}"), "one image in b");
}

// ---------------------------------------------------------------------------------------------
// buildah
// ---------------------------------------------------------------------------------------------

/// buildah builds on a base image pulled from the registry (`buildah from`), adds a file, commits
/// and pushes to a new repository: skopeo sees buildah's digest, the base's three layers unchanged
/// under the new one, the new config, and the new layer holds the file.
#[test]
fn buildah_pushes_an_image_built_on_a_pulled_base() {
    if !clients(&["buildah", "skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let host = server.host();
    let base = Image::new("amd64", 50);
    tools.push_image(&base, "team/base:v1");

    let container = text(&ok(&mut tools.buildah(&[
        "from",
        "--quiet",
        "--tls-verify=false",
        "--name",
        "work",
        &format!("{host}/team/base:v1"),
    ])));
    assert_eq!(container, "work");
    let hello = tools.path().join("hello.txt");
    std::fs::write(&hello, "hello from buildah\n").unwrap();
    ok(&mut tools.buildah(&[
        "copy",
        "work",
        hello.to_str().unwrap(),
        "/etc/lighter/hello.txt",
    ]));
    ok(&mut tools.buildah(&[
        "config",
        "--env",
        "HELLO=world",
        "--label",
        "org.example.built-by=buildah",
        "work",
    ]));
    ok(&mut tools.buildah(&["commit", "--quiet", "work", "localhost/built:1"]));
    let pushed = tools.pushed_digest(
        tools.buildah(&["push", "--quiet", "--tls-verify=false"]),
        "localhost/built:1",
        &tools.docker("team/built:1"),
    );

    let raw = tools.raw_manifest("team/built:1");
    assert_eq!(
        sha256(&raw),
        pushed,
        "buildah's digest file vs skopeo inspect --raw"
    );
    let layers = layer_digests_of(&raw);
    assert_eq!(layers.len(), 4, "three base layers and buildah's");
    assert_eq!(layers[..3], base.layer_digests()[..], "base layers");
    let v = tools.inspect("team/built:1");
    assert_eq!(v["Digest"], pushed, "{v}");
    assert_eq!(v["Labels"]["org.example.built-by"], "buildah", "{v}");
    assert!(
        v["Env"].as_array().unwrap().contains(&json!("HELLO=world")),
        "{v}"
    );

    let r = Server::client()
        .get(server.url(&format!("/v2/team/built/blobs/{}", layers[3])))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let layer = r.bytes().unwrap().to_vec();
    assert_eq!(sha256(&layer), layers[3]);
    let tar = gunzip(&layer);
    let needle = b"hello from buildah\n";
    assert!(
        tar.windows(needle.len()).any(|w| w == needle),
        "buildah's layer does not hold hello.txt"
    );
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// containerd pulls the image skopeo pushed (`ctr images pull --plain-http`, by tag and by
/// digest) and unpacks it: the resolved digest is the pushed one, content holds every blob byte for
/// byte, and the unpacked root filesystem has all three layers applied in order. It pulls the
/// arm64 image out of the two-platform index, and pushes the image back to a new repository:
/// every blob is mounted from the first repository (containerd asks, the registry answers 201),
/// and the registry serves the same manifest.
#[test]
fn containerd_pulls_unpacks_and_pushes_back() {
    if !clients(&["containerd", "ctr", "skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let host = server.host();
    let img = Image::new("amd64", 60);
    tools.push_image(&img, "team/app:v1");
    let multi = MultiPlatform::new(62);
    let layout = tools.path().join("multi");
    write_layout(
        &layout,
        &multi.blobs(),
        &[("multi", OCI_INDEX, &multi.index)],
    );
    ok(&mut tools.copy(
        &["--all", "--preserve-digests", "--dest-tls-verify=false"],
        &format!("oci:{}:multi", layout.display()),
        &tools.docker("team/multi:1.0"),
    ));

    let ctd = Containerd::start();

    // By tag, unpacked.
    let tagged = format!("{host}/team/app:v1");
    ctd.pull(&["--plain-http", "--platform", "linux/amd64"], &tagged);
    assert_eq!(ctd.image_digest(&tagged), img.digest);
    ctd.assert_content(&img.blobs());
    let top = Image::release(img.seed, 2);
    let unpacked = ctd
        .snapshots()
        .into_iter()
        .find(|s| std::fs::read_to_string(s.join(Image::release_path())).ok() == Some(top.clone()))
        .unwrap_or_else(|| panic!("no unpacked snapshot with all layers applied"));
    for i in 0..3 {
        let file = unpacked.join(format!("etc/lighter/layer-{i}.txt"));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("layer {i} of image {} (amd64)\n", img.seed),
        );
    }

    // By digest.
    let by_digest = format!("{host}/team/app@{}", img.digest);
    ctd.pull(&["--plain-http"], &by_digest);
    assert_eq!(ctd.image_digest(&by_digest), img.digest);

    // One platform out of the index.
    let multi_ref = format!("{host}/team/multi:1.0");
    ctd.pull(&["--plain-http", "--platform", "linux/arm64"], &multi_ref);
    assert_eq!(ctd.image_digest(&multi_ref), multi.digest);
    let arm = &multi.images[1];
    ctd.assert_content(&arm.blobs());

    // Push back to a new repository.
    let copy = format!("{host}/other/fromctr:v1");
    ctd.ctr(&["images", "tag", &tagged, &copy]);
    let pushed = ctd.ctr(&["images", "push", "--plain-http", "--http-dump", &copy]);
    // The dump (requests interleaved) shows a mount asked from team/app for every blob, answered
    // with the blob's own Location (a refused mount would answer an upload session's), and no
    // blob uploaded.
    let dump = String::from_utf8_lossy(&pushed.stderr).into_owned();
    let asked: BTreeSet<String> = dump
        .lines()
        .filter_map(|l| {
            l.split("POST /v2/other/fromctr/blobs/uploads/?mount=")
                .nth(1)
        })
        .map(|q| {
            assert!(q.contains("&from=team/app "), "mount from where? {q}");
            q.split('&').next().unwrap().to_string()
        })
        .collect();
    let expected: BTreeSet<String> = std::iter::once(img.config_digest())
        .chain(img.layer_digests())
        .collect();
    assert_eq!(asked, expected, "mounts containerd asked for:\n{dump}");
    for digest in &expected {
        assert!(
            dump.contains(&format!("Location: /v2/other/fromctr/blobs/{digest}\"")),
            "mount of {digest} did not answer the blob's Location:\n{dump}"
        );
    }
    assert!(
        !dump.contains("PUT /v2/other/fromctr/blobs/uploads") && !dump.contains("PATCH /v2/"),
        "containerd uploaded blobs the registry could have mounted:\n{dump}"
    );
    let (status, ct, body) = get_manifest(&server, "other/fromctr", "v1");
    assert_eq!((status, ct.as_str()), (200, OCI_MANIFEST));
    assert!(
        body == img.manifest,
        "containerd's push changed the manifest"
    );
    assert_eq!(tags(&server, "other/fromctr"), ["v1"]);
    for layer in &img.layers {
        let r = Server::client()
            .head(server.url(&format!("/v2/other/fromctr/blobs/{}", sha256(layer))))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "layer in other/fromctr");
    }
}

// ---------------------------------------------------------------------------------------------
// oras (Python)
// ---------------------------------------------------------------------------------------------

/// oras-py pushes two artifacts whose `subject` is the image: one with `Registry.push` (chunked
/// blob upload; oras-py 0.2 has no artifactType option, so the type is the config's media type),
/// and one built by hand with `artifactType` and the empty config, uploaded with
/// `upload_blob` + `upload_manifest`. Then it pulls the first back.
const ORAS_SCRIPT: &str = r#"
import hashlib, json, os, sys
from dataclasses import asdict
import oras.oci, oras.provider

host, repo, subject = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
reg = oras.provider.Registry(hostname=host, insecure=True)
subj = oras.oci.Subject(mediaType=subject["mediaType"], digest=subject["digest"], size=subject["size"])

def check(response):
    if response.status_code not in (200, 201, 202):
        sys.exit(f"{response.request.method} {response.url}: {response.status_code} {response.text}")
    return response

with open("sbom-config.json", "w") as f:
    f.write("{}")
sbom = reg.push(
    target=f"{host}/{repo}:sbom",
    files=["sbom.spdx.json:application/spdx+json"],
    manifest_config="sbom-config.json:application/vnd.example.sbom.v1+json",
    manifest_annotations={"org.example.kind": "sbom"},
    subject=subj,
    do_chunked=True,
    chunk_size=1000,
    quiet=True,
)

container = reg.get_container(f"{host}/{repo}:signature")
layer = oras.oci.NewLayer("signature.bin", media_type="application/vnd.example.signature.v1")
layer["annotations"] = {"org.opencontainers.image.title": "signature.bin"}
check(reg.upload_blob("signature.bin", container, layer))
with open("empty.json", "w") as f:
    f.write("{}")
empty = {
    "mediaType": "application/vnd.oci.empty.v1+json",
    "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
    "size": 2,
}
check(reg.upload_blob("empty.json", container, empty))
manifest = oras.oci.NewManifest()
manifest["artifactType"] = "application/vnd.example.signature.v1"
manifest["config"] = empty
manifest["layers"] = [layer]
manifest["annotations"] = {"org.example.kind": "signature"}
manifest["subject"] = asdict(subj)
sig = check(reg.upload_manifest(manifest, container))

pulled = reg.pull(target=f"{host}/{repo}:sbom", outdir="pulled")
print(json.dumps({
    "sbom": sbom.headers.get("Docker-Content-Digest"),
    "sbom_subject": sbom.headers.get("OCI-Subject"),
    "signature": sig.headers.get("Docker-Content-Digest"),
    "signature_subject": sig.headers.get("OCI-Subject"),
    "pulled": [os.path.relpath(p) for p in pulled],
}))
"#;

/// oras-py pushes two artifacts with `subject` = an image skopeo pushed; GET
/// /v2/<repo>/referrers/<digest> lists both with their artifactType, size and annotations, the
/// artifactType filter keeps one (and says so in OCI-Filters-Applied), and oras-py pulls the
/// artifact's file back unchanged.
#[test]
fn oras_artifacts_with_a_subject_are_listed_as_referrers() {
    if !clients(&["oras", "skopeo", "gzip"]) {
        return;
    }
    let server = Server::start();
    let tools = Tools::plain(server.host());
    let img = Image::new("amd64", 70);
    tools.push_image(&img, "team/app:v1");

    let work = tools.path().join("oras");
    std::fs::create_dir_all(&work).unwrap();
    let sbom = format!(
        "{{\"spdxVersion\":\"SPDX-2.3\",\"name\":\"lighter test\",\"padding\":\"{}\"}}\n",
        "x".repeat(3000)
    );
    std::fs::write(work.join("sbom.spdx.json"), &sbom).unwrap();
    std::fs::write(work.join("signature.bin"), common::random_bytes(700, 71)).unwrap();
    let subject =
        json!({"mediaType": OCI_MANIFEST, "digest": img.digest, "size": img.manifest.len()});
    let out = ok(tools
        .command("python3")
        .current_dir(&work)
        .args(["-c", ORAS_SCRIPT, &server.host(), "team/app"])
        .arg(subject.to_string()));
    let line = text(&out);
    let pushed: Value = serde_json::from_str(line.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("oras script output is not JSON ({e}): {line}"));
    let sbom_digest = pushed["sbom"].as_str().expect("sbom digest").to_string();
    let sig_digest = pushed["signature"]
        .as_str()
        .expect("signature digest")
        .to_string();
    assert_eq!(
        pushed["sbom_subject"], img.digest,
        "OCI-Subject header: {pushed}"
    );
    assert_eq!(pushed["signature_subject"], img.digest, "{pushed}");
    assert_eq!(
        pushed["pulled"],
        json!(["pulled/sbom.spdx.json"]),
        "{pushed}"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("pulled/sbom.spdx.json")).unwrap(),
        sbom
    );

    let (status, sbom_manifest_ct, sbom_manifest) = get_manifest(&server, "team/app", "sbom");
    assert_eq!((status, sbom_manifest_ct.as_str()), (200, OCI_MANIFEST));
    assert_eq!(sha256(&sbom_manifest), sbom_digest);
    let (_, _, sig_manifest) = get_manifest(&server, "team/app", &sig_digest);
    assert_eq!(sha256(&sig_manifest), sig_digest);

    let r = Server::client()
        .get(server.url(&format!("/v2/team/app/referrers/{}", img.digest)))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers().get("content-type").unwrap().to_str().unwrap(),
        OCI_INDEX
    );
    let index: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2, "{index}");
    assert_eq!(index["mediaType"], OCI_INDEX, "{index}");
    let listed = index["manifests"].as_array().expect("manifests");
    assert_eq!(listed.len(), 2, "{index}");
    let find = |digest: &str| -> &Value {
        listed
            .iter()
            .find(|m| m["digest"] == digest)
            .unwrap_or_else(|| panic!("referrers lack {digest}: {index}"))
    };
    let s = find(&sbom_digest);
    assert_eq!(
        s["artifactType"], "application/vnd.example.sbom.v1+json",
        "{index}"
    );
    assert_eq!(s["mediaType"], OCI_MANIFEST, "{index}");
    assert_eq!(s["size"], sbom_manifest.len(), "{index}");
    assert_eq!(s["annotations"]["org.example.kind"], "sbom", "{index}");
    let g = find(&sig_digest);
    assert_eq!(
        g["artifactType"], "application/vnd.example.signature.v1",
        "{index}"
    );
    assert_eq!(g["size"], sig_manifest.len(), "{index}");
    assert_eq!(g["annotations"]["org.example.kind"], "signature", "{index}");

    let r = Server::client()
        .get(server.url(&format!(
            "/v2/team/app/referrers/{}?artifactType=application/vnd.example.signature.v1",
            img.digest
        )))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("oci-filters-applied")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("artifactType".to_string())
    );
    let filtered: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    let digests: Vec<&str> = filtered["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [sig_digest.as_str()], "{filtered}");
}
