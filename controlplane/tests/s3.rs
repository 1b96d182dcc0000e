//! The replicated mode (`[storage.s3]`): three replicas, each with its own data directory, over
//! one bucket of a real Garage started by the test. Pushes through one replica are pulled from
//! the others byte for byte; a tag moved through one is served by the others once their
//! `tag_ttl_ms` has passed; a replica killed with SIGKILL loses no acknowledged push and
//! exposes nothing partial; with the object store gone, cached pulls still work and pushes fail
//! with a 503 `UNAVAILABLE`.

#[path = "common/auth.rs"]
mod auth_common;
mod common;
mod oci;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::clients::{clients, ok, Ctr, Image, Tools};
use common::containerd::Containerd;
use common::garage::{self, Garage};
use common::{sha256, Server};
use oci::{get, head, push_blob, push_image, push_manifest, OCI_MANIFEST};

/// How long a tag pushed through another replica may be served stale, in these tests.
const TAG_TTL_MS: u64 = 1000;

/// A replica over the bucket, with the `[storage.s3]` section exactly as the issue writes it.
fn replica(g: &Garage) -> Server {
    replica_with(g, "")
}

/// [`replica`] with more fields of `[storage.s3]`.
fn replica_with(g: &Garage, s3_fields: &str) -> Server {
    let config = replica_config(g, s3_fields);
    Server::launch_temp(|l| l.args(&["--config", &config]).env(&g.env()))
}

/// A new config file with the `[storage.s3]` section for `g`, and `s3_fields`.
fn replica_config(g: &Garage, s3_fields: &str) -> String {
    static REPLICAS: AtomicU32 = AtomicU32::new(0);
    let n = REPLICAS.fetch_add(1, Ordering::Relaxed);
    let config = g.dir().join(format!("lighter-{n}.toml"));
    std::fs::write(&config, g.storage_toml(TAG_TTL_MS) + s3_fields).unwrap();
    config.display().to_string()
}

fn manifest_digest(server: &Server, repo: &str, reference: &str) -> (u16, String) {
    let r = oci::get_manifest(server, repo, reference, OCI_MANIFEST);
    let digest = r
        .header_opt("Docker-Content-Digest")
        .unwrap_or_default()
        .to_owned();
    (r.status, digest)
}

/// Every blob and the manifest of `img` as `server` serves them: same bytes.
fn assert_serves(server: &Server, repo: &str, reference: &str, img: &oci::Image) {
    let m = oci::get_manifest(server, repo, reference, OCI_MANIFEST);
    assert_eq!(m.status, 200, "{}", m.describe());
    assert!(m.body == img.manifest, "manifest bytes differ");
    assert_eq!(m.header("Docker-Content-Digest"), img.digest);
    let blobs = std::iter::once(&img.config).chain(img.layers.iter());
    for blob in blobs {
        let d = sha256(blob);
        let r = get(server, &format!("/v2/{repo}/blobs/{d}"));
        assert_eq!(r.status, 200, "blob {d}: {}", r.describe());
        assert!(r.body == *blob, "blob {d}: other bytes");
    }
}

/// skopeo pushes a three-layer image to replica A; replica B (which never saw it) serves it to
/// skopeo byte for byte; containerd pulls it from replica C; all three serve each blob and the
/// manifest over plain HTTP and agree on the digest.
#[test]
fn a_push_to_one_replica_is_pulled_from_the_others_byte_for_byte() {
    if !garage::installed() || !clients(&["skopeo", "gzip", "containerd", "ctr"]) {
        return;
    }
    let g = Garage::start();
    let (a, b, c) = (replica(&g), replica(&g), replica(&g));
    let img = Image::build("amd64", 61, "lighter-s3", None, |i| {
        let blob = Image::blob(61, i, 64 * 1024 + 1000 * i as usize, 300);
        (format!("layer {i} of the replicated image\n"), blob)
    });
    let tools_a = Tools::plain(a.host());
    tools_a.push(&img, "team/app:v1", &["--dest-tls-verify=false"]);

    let tools_b = Tools::plain(b.host());
    let out = tools_b.path().join("out");
    ok(&mut tools_b.copy(
        &["--preserve-digests", "--src-tls-verify=false"],
        &tools_b.docker("team/app:v1"),
        &format!("oci:{}:v1", out.display()),
    ));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], img.digest, "{index}");
    for blob in img.blobs() {
        let d = sha256(blob);
        let got = std::fs::read(out.join("blobs/sha256").join(&d["sha256:".len()..])).unwrap();
        assert!(got == blob, "replica B served other bytes for {d}");
    }

    let ctd = Containerd::start();
    let tagged = format!("{}/team/app:v1", c.host());
    ctd.pull(&["--plain-http", "--platform", "linux/amd64"], &tagged);
    assert_eq!(ctd.image_digest(&tagged), img.digest);
    ctd.assert_content(&img.blobs());

    for (server, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        let (status, digest) = manifest_digest(server, "team/app", "v1");
        assert_eq!(
            (status, digest.as_str()),
            (200, img.digest.as_str()),
            "replica {name}"
        );
        // Config and layers (img.blobs() has the manifest too, served as a manifest above).
        for blob in std::iter::once(&img.config).chain(&img.layers) {
            let d = sha256(blob);
            let r = get(server, &format!("/v2/team/app/blobs/{d}"));
            assert_eq!(r.status, 200, "replica {name}, blob {d}: {}", r.describe());
            assert!(r.body == *blob, "replica {name}, blob {d}: other bytes");
        }
    }
    // Repository isolation holds across replicas: the blobs are not another repository's.
    let d = sha256(img.blobs()[0]);
    assert_eq!(head(&c, &format!("/v2/other/repo/blobs/{d}")).status, 404);
}

/// A tag moved through replica A is served by A at once, and by replica B (which had cached
/// the old value) once `tag_ttl_ms` has passed since B last checked it.
#[test]
fn a_tag_moved_on_one_replica_is_seen_by_another_within_the_ttl() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let (a, b) = (replica(&g), replica(&g));
    let first = push_image(&a, "team/moving", Some("latest"), 71);
    assert_serves(&b, "team/moving", "latest", &first);

    let second = push_image(&a, "team/moving", Some("latest"), 72);
    assert_ne!(first.digest, second.digest);
    assert_eq!(
        manifest_digest(&a, "team/moving", "latest"),
        (200, second.digest.clone()),
        "the replica that took the push serves the new tag at once"
    );
    std::thread::sleep(Duration::from_millis(TAG_TTL_MS + 500));
    assert_serves(&b, "team/moving", "latest", &second);
    // The old manifest stays pullable by digest everywhere.
    assert_serves(&b, "team/moving", &first.digest, &first);
}

/// Stale while revalidating: once a cached tag's TTL has passed, the one request that finds it
/// stale has the control plane read the bucket, and the pulls arriving meanwhile are served the
/// cached value at once by the data plane (here the bucket is paused, so that read hangs);
/// when the read completes, the moved tag is served.
#[test]
fn a_stale_tag_is_served_while_the_bucket_is_read_again() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let (a, b) = (replica(&g), replica(&g));
    let first = push_image(&a, "team/swr", Some("latest"), 75);
    assert_serves(&b, "team/swr", "latest", &first);
    let second = push_image(&a, "team/swr", Some("latest"), 76);
    std::thread::sleep(Duration::from_millis(TAG_TTL_MS + 300));

    g.pause(true);
    let b_url = b.url("/v2/team/swr/manifests/latest");
    let revalidating = std::thread::spawn(move || {
        Server::client()
            .get(&b_url)
            .header("Accept", OCI_MANIFEST)
            .timeout(Duration::from_secs(120))
            .send()
            .map(|r| {
                r.headers()["docker-content-digest"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
    });
    // The request above is with the control plane, waiting for the paused bucket; these are
    // answered meanwhile, with the cached value, in well under the bucket's timeouts.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..20 {
        let started = std::time::Instant::now();
        assert_eq!(
            manifest_digest(&b, "team/swr", "latest"),
            (200, first.digest.clone()),
            "served stale while the bucket is read"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a pull waited for the bucket"
        );
    }
    assert!(
        !revalidating.is_finished(),
        "the bucket's read did not hang"
    );
    g.pause(false);
    let got = revalidating.join().unwrap().expect("the revalidating pull");
    assert_eq!(got, second.digest);
    assert_eq!(
        manifest_digest(&b, "team/swr", "latest"),
        (200, second.digest.clone())
    );
}

/// kill -9 of a replica: a blob it acknowledged (12 MiB: a multipart upload of three parts) is
/// served by another replica; a blob whose upload it was receiving (half sent) is nowhere, not
/// even in part.
#[test]
fn a_replica_killed_mid_push_loses_no_acknowledged_push_and_serves_nothing_partial() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let parts = "part_size_bytes = 5242880\n";
    let (mut a, b) = (replica_with(&g, parts), replica_with(&g, parts));
    let acknowledged = common::random_bytes(12 << 20, 81);
    let d_ack = push_blob(&a, "team/crash", &acknowledged);

    let partial = common::random_bytes(4 << 20, 82);
    let d_partial = sha256(&partial);
    let location = oci::start_upload(&a, "team/crash");
    let r = oci::patch_chunk(&a, &location, 0, &partial[..2 << 20]);
    assert_eq!(r.status, 202, "{}", r.describe());
    a.kill();

    let r = get(&b, &format!("/v2/team/crash/blobs/{d_ack}"));
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(
        r.body == acknowledged,
        "the acknowledged blob came back other"
    );
    for path in [
        format!("/v2/team/crash/blobs/{d_partial}"),
        format!("/v2/other/crash/blobs/{d_partial}"),
    ] {
        assert_eq!(head(&b, &path).status, 404, "{path}");
        let r = get(&b, &path);
        r.assert_error(404, "BLOB_UNKNOWN");
    }
    // The push, retried on the surviving replica, completes and is served by a fresh one.
    assert_eq!(push_blob(&b, "team/crash", &partial), d_partial);
    let c = replica(&g);
    let r = get(&c, &format!("/v2/team/crash/blobs/{d_partial}"));
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == partial);
}

/// The object store stopped: what a replica has cached is still served (by digest, and by tag
/// past its TTL: the cached value, stale); a push fails with 503 `UNAVAILABLE` and a message
/// naming the object store; content never cached, the catalog, tag lists and referrers are 503
/// too; the replica keeps serving.
#[test]
fn with_the_object_store_down_cached_pulls_work_and_pushes_fail_503() {
    if !garage::installed() {
        return;
    }
    let mut g = Garage::start();
    let (a, b) = (replica(&g), replica(&g));
    let img = push_image(&a, "team/down", Some("v1"), 91);
    let never_pulled = push_image(&a, "team/other", Some("v1"), 92);
    assert_serves(&b, "team/down", "v1", &img);

    g.stop();
    std::thread::sleep(Duration::from_millis(TAG_TTL_MS + 500));
    assert_serves(&b, "team/down", "v1", &img);
    assert_serves(&b, "team/down", &img.digest, &img);
    assert_serves(&a, "team/down", "v1", &img);

    let blob = common::random_bytes(10_000, 93);
    let r = oci::post_blob(&a, "team/down", &sha256(&blob), &blob);
    r.assert_error(503, "UNAVAILABLE");
    assert!(
        String::from_utf8_lossy(&r.body).contains("object store"),
        "{}",
        r.describe()
    );
    let manifest = oci::to_bytes(&oci::image_manifest_value(&img.config, &[&img.layers[0]]));
    let r = oci::put_manifest(&a, "team/down", "v2", OCI_MANIFEST, &manifest);
    r.assert_error(503, "UNAVAILABLE");

    let r = oci::get_manifest(&b, "team/other", "v1", OCI_MANIFEST);
    r.assert_error(503, "UNAVAILABLE");
    // Lists are the bucket's: unavailable too, rather than this replica's partial view.
    for path in [
        "/v2/_catalog".to_owned(),
        "/v2/team/down/tags/list".to_owned(),
        format!("/v2/team/down/referrers/{}", img.digest),
    ] {
        let r = get(&b, &path);
        r.assert_error(503, "UNAVAILABLE");
        assert_eq!(r.header("Retry-After"), "5", "{path}");
    }
    let d = sha256(&never_pulled.layers[0]);
    assert_eq!(get(&b, &format!("/v2/team/other/blobs/{d}")).status, 503);
    // Nothing that failed is half there: neither the blob nor the tag was published here.
    assert!(!a.data_dir.join("repos/team/down/_tags/v2").exists());
    assert_eq!(
        head(&a, &format!("/v2/team/down/blobs/{}", sha256(&blob))).status,
        503
    );
    oci::assert_alive(&a);
    oci::assert_alive(&b);
}

/// Two replicas push different manifests to one tag at the same moment, several times over:
/// each push is acknowledged, and once `tag_ttl_ms` has passed both replicas and a third one
/// serve the same digest, one of the two pushed (the bucket's tag object is written whole).
#[test]
fn two_replicas_pushing_one_tag_at_once_converge_on_one_winner() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let (a, b) = (replica(&g), replica(&g));
    let first = push_image(&a, "team/race", None, 101);
    let second = push_image(&b, "team/race", None, 102);
    for round in 0..3 {
        let tag = format!("r{round}");
        std::thread::scope(|s| {
            for (server, img) in [(&a, &first), (&b, &second)] {
                let tag = tag.as_str();
                s.spawn(move || {
                    oci::push_manifest(server, "team/race", tag, OCI_MANIFEST, &img.manifest)
                });
            }
        });
        std::thread::sleep(Duration::from_millis(TAG_TTL_MS + 500));
        let c = replica(&g);
        let seen: Vec<(u16, String)> = [&a, &b, &c]
            .iter()
            .map(|r| manifest_digest(r, "team/race", &tag))
            .collect();
        assert!(
            seen.iter().all(|s| s == &seen[0]),
            "round {round}: the replicas disagree: {seen:?}"
        );
        assert_eq!(seen[0].0, 200);
        assert!(
            seen[0].1 == first.digest || seen[0].1 == second.digest,
            "round {round}: {seen:?}"
        );
    }
}

/// The rest of the API across replicas: a chunked push through A is pulled from B; B mounts
/// into another repository a blob pushed through A (the bucket says A's repository has it);
/// B's tag list shows the tags pushed through A; a tag deleted through B is gone from A once
/// `tag_ttl_ms` has passed (the bucket's tag went first), while the manifest stays pullable by
/// digest; a blob deleted through B is unknown to a fresh replica.
#[test]
fn chunked_pushes_mounts_tag_lists_and_deletes_work_across_replicas() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let (a, b) = (replica(&g), replica(&g));
    let chunked = common::random_bytes(3 << 20, 111);
    let d = oci::push_blob_chunked(&a, "team/api", &chunked, 1 << 20);
    let r = get(&b, &format!("/v2/team/api/blobs/{d}"));
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == chunked);

    let r = oci::open_upload(&b, "team/mounted", &format!("mount={d}&from=team/api"));
    assert_eq!(r.status, 201, "{}", r.describe());
    let c = replica(&g);
    assert_eq!(
        get(&c, &format!("/v2/team/mounted/blobs/{d}")).body,
        chunked
    );

    let img = push_image(&a, "team/api", Some("keep"), 112);
    push_manifest(&a, "team/api", "gone", OCI_MANIFEST, &img.manifest);
    let listed = get(&b, "/v2/team/api/tags/list");
    assert_eq!(
        listed.strings("tags"),
        ["gone", "keep"],
        "{}",
        listed.describe()
    );
    assert_eq!(manifest_digest(&a, "team/api", "gone").0, 200);

    assert_eq!(oci::delete(&b, "/v2/team/api/manifests/gone").status, 202);
    std::thread::sleep(Duration::from_millis(TAG_TTL_MS + 500));
    oci::get_manifest(&a, "team/api", "gone", OCI_MANIFEST).assert_error(404, "MANIFEST_UNKNOWN");
    assert_serves(&a, "team/api", "keep", &img);
    assert_eq!(get(&b, "/v2/team/api/tags/list").strings("tags"), ["keep"]);

    assert_eq!(
        oci::delete(&b, &format!("/v2/team/mounted/blobs/{d}")).status,
        202
    );
    let fresh = replica(&g);
    get(&fresh, &format!("/v2/team/mounted/blobs/{d}")).assert_error(404, "BLOB_UNKNOWN");
    assert_eq!(get(&fresh, &format!("/v2/team/api/blobs/{d}")).status, 200);
}

/// `lighter bucket-import`: a registry that ran without a bucket is switched to replicas. A dry
/// run reports what it would copy and copies nothing; the import copies blobs (one larger than a
/// part, so multipart), manifests, an index after its images, and tags, skipping a mirrored
/// repository; a tag pushed through a replica meanwhile is kept as the bucket has it and
/// reported; a fresh replica then serves every image byte for byte; a second run copies
/// nothing.
#[test]
fn bucket_import_moves_an_existing_registry_into_the_bucket() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let data = tempfile::tempdir().unwrap();
    let old = Server::start_in(data.path(), &["--upstream", "docker.io=http://127.0.0.1:9"]);
    let app = push_image(&old, "team/app", Some("v1"), 111);
    let tool = push_image(&old, "tools/cli", Some("v2"), 112);
    let big = common::random_bytes(6 << 20, 113);
    push_blob(&old, "tools/cli", &big);
    let index = oci::to_bytes(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [oci::descriptor(OCI_MANIFEST, &app.manifest)],
    }));
    oci::push_manifest(
        &old,
        "team/app",
        "multi",
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
    let stale = push_image(&old, "team/app", Some("latest"), 114);
    // A referrer of app (an SBOM, say): its record is copied with it.
    push_blob(&old, "team/app", b"{}");
    let sbom = artifact(&app, "application/spdx+json", "imported");
    oci::push_manifest(&old, "team/app", &sha256(&sbom), OCI_MANIFEST, &sbom);
    drop(old);
    // A mirrored repository's cache in the data directory: left out of the bucket.
    std::fs::create_dir_all(data.path().join("repos/docker.io/library/x/_tags")).unwrap();

    // Meanwhile a replica took a push of team/app:latest: the bucket's value stays.
    let r = replica(&g);
    let newer = push_image(&r, "team/app", Some("latest"), 115);

    let config = g.dir().join("import.toml");
    std::fs::write(
        &config,
        g.storage_toml(TAG_TTL_MS) + "part_size_bytes = 5242880\n",
    )
    .unwrap();
    let import = |extra: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(common::BIN)
            .arg("bucket-import")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--upstream", "docker.io=http://127.0.0.1:9"])
            .args(extra)
            .envs(g.env())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&said).unwrap_or_else(|e| panic!("{e}: {said}"))
    };

    let dry = import(&["--dry-run"]);
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["repositories"], 2, "{dry}");
    assert_eq!(dry["skipped_mirrored"], 1, "{dry}");
    assert_eq!(dry["tags_written"], 3, "{dry}"); // v1, multi, v2
    assert_eq!(dry["tags_kept"][0]["tag"], "latest", "{dry}");
    assert_eq!(dry["tags_kept"][0]["local"], stale.digest.as_str(), "{dry}");
    assert_eq!(
        dry["tags_kept"][0]["bucket"],
        newer.digest.as_str(),
        "{dry}"
    );
    let fresh = replica(&g);
    let (status, _) = manifest_digest(&fresh, "team/app", "v1");
    assert_eq!(status, 404, "a dry run copied something");

    let done = import(&[]);
    assert_eq!(done["dry_run"], false, "{done}");
    for field in [
        "content_uploaded",
        "bytes_uploaded",
        "tags_written",
        "blob_links",
    ] {
        assert_eq!(done[field], dry[field], "{field}: {done} vs {dry}");
    }
    assert!(
        done["bytes_uploaded"].as_u64().unwrap() > big.len() as u64,
        "{done}"
    );

    let c = replica(&g);
    assert_serves(&c, "team/app", "v1", &app);
    assert_serves(&c, "tools/cli", "v2", &tool);
    assert_serves(&c, "team/app", "latest", &newer);
    let r = oci::get_manifest(
        &c,
        "team/app",
        "multi",
        "application/vnd.oci.image.index.v1+json",
    );
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == index);
    let r = get(&c, &format!("/v2/tools/cli/blobs/{}", sha256(&big)));
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == big, "the multipart blob came back other");
    assert_eq!(done["referrers"], 1, "{done}");
    assert_eq!(
        referrer_digests(&c, &format!("/v2/team/app/referrers/{}", app.digest)),
        vec![sha256(&sbom)]
    );

    let again = import(&[]);
    assert_eq!(again["content_uploaded"], 0, "{again}");
    assert_eq!(again["tags_written"], 0, "{again}");
    assert_eq!(again["blob_links"], 0, "{again}");
    assert_eq!(again["tags_present"], 3, "{again}");
}

/// A blob a replica has not cached is answered from its download from the bucket on the
/// handed-over connection with sendfile (the mirror's follow path: the answer closes the
/// connection, which hyper's path would give back to the data plane), with the headers of a
/// cached blob: whole (200), ranged (206 and `Content-Range`), a range past the end (416 and
/// the OCI error). Each case asks for a blob of its own, so each is a miss; once the downloads
/// are published, the same requests are answered by the data plane from the cache, the same.
#[test]
fn cold_blobs_from_the_bucket_are_sent_with_sendfile_and_answer_like_cached_ones() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let a = replica(&g);
    let cases: [(&str, Option<&str>); 4] = [
        ("whole", None),
        ("middle", Some("bytes=10-99")),
        ("suffix", Some("bytes=-1000")),
        ("past the end", Some("bytes=4000000-")),
    ];
    let blobs: Vec<Vec<u8>> = (0..cases.len())
        .map(|i| common::random_bytes((3 << 20) + 1000 * i, 121 + i as u64))
        .collect();
    let digests: Vec<String> = blobs
        .iter()
        .map(|b| push_blob(&a, "team/cold", b))
        .collect();
    let b = replica(&g);
    let ask = |i: usize| {
        let path = format!("/v2/team/cold/blobs/{}", digests[i]);
        match cases[i].1 {
            Some(range) => oci::get_with(&b, &path, &[("Range", range)]),
            None => get(&b, &path),
        }
    };
    let cold: Vec<oci::Reply> = (0..cases.len()).map(ask).collect();
    for (i, d) in digests.iter().enumerate() {
        let hex = &d["sha256:".len()..];
        let file = b.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !file.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: blob {d} not cached after 60 s",
                cases[i].0
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let cached: Vec<oci::Reply> = (0..cases.len()).map(ask).collect();

    for (i, ((what, _), (c, s))) in cases.iter().zip(cold.iter().zip(&cached)).enumerate() {
        assert_eq!(
            c.status,
            s.status,
            "{what}: cold {} / cached {}",
            c.describe(),
            s.describe()
        );
        assert_eq!(
            c.header_opt("connection"),
            Some("close"),
            "{what}: the cold answer did not come from the follow path: {}",
            c.describe()
        );
        assert_eq!(s.header_opt("connection"), None, "{what}: {}", s.describe());
        for h in ["content-type", "docker-content-digest", "content-range"] {
            assert_eq!(c.header_opt(h), s.header_opt(h), "{what}: header {h}");
        }
        if c.status == 416 {
            assert_eq!(c.error_codes(), s.error_codes(), "{what}");
            continue;
        }
        assert_eq!(c.header("content-length"), s.header("content-length"));
        assert_eq!(c.header("docker-content-digest"), digests[i], "{what}");
        assert_eq!(c.header("content-type"), "application/octet-stream");
        assert_eq!(c.header("accept-ranges"), "bytes", "{what}");
        assert!(c.body == s.body, "{what}: bodies differ");
    }
    let size = |i: usize| blobs[i].len();
    assert_eq!(cold[0].status, 200);
    assert!(cold[0].body == blobs[0], "whole: other bytes");
    assert_eq!(cold[1].status, 206);
    assert_eq!(
        cold[1].header("content-range"),
        format!("bytes 10-99/{}", size(1))
    );
    assert!(cold[1].body == blobs[1][10..100]);
    assert_eq!(cold[2].status, 206);
    assert!(cold[2].body == blobs[2][size(2) - 1000..]);
    cold[3].assert_error(416, "SIZE_INVALID");
    assert_eq!(
        cold[3].header("content-range"),
        format!("bytes */{}", size(3))
    );
}

/// With access control, a cold blob is sent from the bucket's download outside hyper only to a
/// caller the rules or a token let pull: anonymous in a public repository, a Bearer token for
/// the private one (both with sendfile: `Connection: close`); anonymous in the private
/// repository gets the 401 challenge, a user the rules refuse 403, Basic credentials the blob
/// through hyper; none of the refusals carries the blob.
#[test]
fn cold_blobs_from_the_bucket_go_only_to_callers_the_rules_allow() {
    use auth_common::{get_as, push_image_as, token, Cred, Fixture, Opts, BOB, CI};
    if !garage::installed() || !clients(&["htpasswd"]) {
        return;
    }
    let g = Garage::start();
    let fx = Fixture::new();
    let opts = Opts {
        top: g.storage_toml(TAG_TTL_MS),
        ..Opts::default()
    };
    let config = fx.write_config(&fx.config(&opts));
    let launch = || Server::launch_temp(|l| l.args(&["--config", &config]).env(&g.env()));
    let a = launch();
    let ci = Cred::basic(CI);
    let public = push_image_as(&a, "team/open", "v1", 131, &ci);
    let private = push_image_as(&a, "private/app", "v1", 132, &ci);
    let b = launch();
    let blob_path = |repo: &str, blob: &[u8]| format!("/v2/{repo}/blobs/{}", sha256(blob));
    let followed = |r: &oci::Reply, blob: &[u8], who: &str| {
        assert_eq!(r.status, 200, "{who}: {}", r.describe());
        assert!(r.body == blob, "{who}: other bytes");
        assert_eq!(
            r.header_opt("connection"),
            Some("close"),
            "{who}: not sent from the download: {}",
            r.describe()
        );
    };

    let r = get_as(&b, &blob_path("team/open", &public.layers[0]), &Cred::None);
    followed(&r, &public.layers[0], "anonymous, public repository");

    let refused = [
        (Cred::None, 401, "UNAUTHORIZED"),
        (Cred::basic(BOB), 403, "DENIED"),
    ];
    for (cred, status, code) in &refused {
        let r = get_as(&b, &blob_path("private/app", &private.layers[0]), cred);
        r.assert_error(*status, code);
        assert!(r.header_opt("docker-content-digest").is_none());
    }
    let bearer = Cred::bearer(&token(&b, &ci, &["repository:private/app:pull"]));
    let r = get_as(&b, &blob_path("private/app", &private.layers[0]), &bearer);
    followed(&r, &private.layers[0], "Bearer token, private repository");
    let r = get_as(&b, &blob_path("private/app", &private.layers[1]), &ci);
    assert_eq!(r.status, 200, "Basic: {}", r.describe());
    assert!(r.body == private.layers[1], "Basic: other bytes");
}

/// `GET /v2/_catalog` on `server`, following its `Link` headers from `first`: every page's
/// repositories in order, and how many pages there were.
fn catalog_pages(server: &Server, first: &str) -> (Vec<String>, usize) {
    let (mut all, mut pages) = (Vec::new(), 0);
    let mut next = Some(first.to_owned());
    while let Some(path) = next.take() {
        let r = get(server, &path);
        assert_eq!(r.status, 200, "{path}: {}", r.describe());
        all.extend(r.strings("repositories"));
        pages += 1;
        assert!(pages < 50, "the catalog's pages do not end");
        next = oci::next_link(&r);
    }
    (all, pages)
}

/// An artifact manifest whose subject is `subject`.
fn artifact(subject: &oci::Image, artifact_type: &str, note: &str) -> Vec<u8> {
    oci::to_bytes(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": common::OCI_EMPTY, "digest": sha256(b"{}"), "size": 2},
        "layers": [],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.digest, "size": subject.manifest.len()},
        "annotations": {"org.example.note": note},
    }))
}

/// The digests a referrers answer lists.
fn referrer_digests(server: &Server, path: &str) -> Vec<String> {
    let r = get(server, path);
    assert_eq!(r.status, 200, "{path}: {}", r.describe());
    assert_eq!(r.header("Content-Type"), common::OCI_INDEX);
    let v = r.json();
    v["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: {}", r.describe()))
        .iter()
        .map(|d| d["digest"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The catalog is the bucket's: replica B lists repositories pushed through A, which it never
/// served, in order ('-' sorts before '/'), paged by `n` and `last` with `Link` headers as the
/// spec says; a repository's tag list on B is the bucket's too. Referrers are the bucket's: an
/// SBOM and a signature whose subject was pushed through A are listed by B (filtered by
/// `artifactType`), and one deleted through B is gone from A's list.
#[test]
fn the_catalog_tag_lists_and_referrers_are_the_bucket_s_on_every_replica() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let (a, b) = (replica(&g), replica(&g));
    let repos = ["zeta/one", "team/app", "team-x", "alpha", "team/app/sub"];
    let mut images = Vec::new();
    for (i, repo) in repos.iter().enumerate() {
        images.push(push_image(&a, repo, Some("v1"), 121 + i as u64));
    }
    let mut sorted: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    sorted.sort();
    assert_eq!(
        sorted,
        ["alpha", "team-x", "team/app", "team/app/sub", "zeta/one"]
    );

    let (all, pages) = catalog_pages(&b, "/v2/_catalog");
    assert_eq!((all.as_slice(), pages), (sorted.as_slice(), 1));
    let (paged, pages) = catalog_pages(&b, "/v2/_catalog?n=2");
    assert_eq!((paged.as_slice(), pages), (sorted.as_slice(), 3));
    let r = get(&b, "/v2/_catalog?n=2&last=team-x");
    assert_eq!(r.strings("repositories"), ["team/app", "team/app/sub"]);
    assert_eq!(
        oci::next_link(&r).as_deref(),
        Some("/v2/_catalog?n=2&last=team/app/sub")
    );
    let r = get(&b, "/v2/_catalog?last=team/app/sub");
    assert_eq!(r.strings("repositories"), ["zeta/one"]);
    assert!(r.header_opt("Link").is_none(), "{}", r.describe());
    // B had cached none of them: the list came from the bucket, not its data directory.
    assert!(!b.data_dir.join("repos/team-x").exists());

    push_manifest(&a, "team-x", "v2", OCI_MANIFEST, &images[2].manifest);
    let r = get(&b, "/v2/team-x/tags/list?n=1");
    assert_eq!(r.strings("tags"), ["v1"]);
    assert_eq!(
        oci::next_link(&r).as_deref(),
        Some("/v2/team-x/tags/list?n=1&last=v1")
    );
    assert_eq!(
        get(&b, "/v2/team-x/tags/list?n=1&last=v1").strings("tags"),
        ["v2"]
    );

    let subject = &images[1];
    push_blob(&a, "team/app", b"{}");
    let sbom = artifact(subject, "application/vnd.example.sbom.v1", "sbom");
    let sig = artifact(subject, "application/vnd.example.signature.v1", "sig");
    let d_sbom = push_manifest(&a, "team/app", &sha256(&sbom), OCI_MANIFEST, &sbom);
    let d_sig = push_manifest(&a, "team/app", "sig", OCI_MANIFEST, &sig);
    let mut both = vec![d_sbom.clone(), d_sig.clone()];
    both.sort();
    let path = format!("/v2/team/app/referrers/{}", subject.digest);
    assert_eq!(referrer_digests(&b, &path), both);
    assert_eq!(
        referrer_digests(
            &b,
            &format!("{path}?artifactType=application/vnd.example.sbom.v1")
        ),
        [d_sbom.as_str()]
    );
    // Another repository's subject of the same digest has no referrers.
    let other = format!("/v2/alpha/referrers/{}", subject.digest);
    assert!(referrer_digests(&b, &other).is_empty());
    // Listed by B, pulled from B: the record names a manifest B can fill from the bucket.
    let m = oci::get_manifest(&b, "team/app", &d_sig, OCI_MANIFEST);
    assert_eq!(m.status, 200, "{}", m.describe());
    assert!(m.body == sig);

    assert_eq!(
        oci::delete(&b, &format!("/v2/team/app/manifests/{d_sbom}")).status,
        202
    );
    assert_eq!(referrer_digests(&a, &path), [d_sig.as_str()]);
    assert_eq!(referrer_digests(&b, &path), [d_sig.as_str()]);
}

/// One HTTP/1.1 GET on a raw socket whose body is read only as far as the test asks: a client
/// in the middle of a pull.
struct SlowPull {
    stream: std::net::TcpStream,
    length: usize,
    body: Vec<u8>,
}

impl SlowPull {
    /// Sends the request, reads the head (200 with a `Content-Length`) and `at_least` bytes of
    /// the body.
    fn start(server: &Server, path: &str, at_least: usize) -> SlowPull {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: lighter\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let head_end = loop {
            let n = stream.read(&mut buf).expect("read the answer's head");
            assert!(
                n > 0,
                "closed before the head: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
        assert_eq!(oci::raw_status(&head), Some(200), "{head}");
        let length = oci::raw_content_length(&head);
        let mut pull = SlowPull {
            stream,
            length,
            body: got[head_end..].to_vec(),
        };
        while pull.body.len() < at_least {
            let n = pull.stream.read(&mut buf).expect("read the body");
            assert!(n > 0, "the body ended at {} bytes", pull.body.len());
            pull.body.extend_from_slice(&buf[..n]);
        }
        pull
    }

    /// Reads on until the connection ends (or errs: a reset), returning the bytes of the body
    /// received in all.
    fn finish(mut self) -> Vec<u8> {
        use std::io::Read;
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = self.stream.read(&mut buf) {
            if n == 0 || self.body.len() >= self.length {
                break;
            }
            self.body.extend_from_slice(&buf[..n]);
        }
        self.body
    }
}

/// A replica over the data directory `dir`, configured as [`replica`], with `extra` flags.
fn replica_in(g: &Garage, dir: &std::path::Path, extra: &[&str]) -> Server {
    common::Launch::new(dir)
        .args(&["--config", &replica_config(g, "")])
        .args(extra)
        .env(&g.env())
        .start()
}

/// The replica over `dead`'s data directory again (after a kill), as [`replica`] configures it.
fn restart(g: &Garage, dead: &Server) -> Server {
    replica_in(g, &dead.data_dir, &[])
}

/// kill -9 of a replica's whole process tree (`lighter serve` and both planes) while a client
/// pulls a 128 MiB blob from it, twice: while the replica fills it from the bucket (Garage
/// paused mid-transfer, so the fill is cut for certain), and once it is cached (the data
/// plane's sendfile cut). Each time the client's body ends short, the pull retried on another
/// replica returns the pushed bytes, and the killed replica, restarted over its data directory,
/// has published nothing partial (the cut fill's ingest never becomes a blob) and serves the
/// whole blob.
#[test]
fn a_replica_killed_mid_pull_publishes_nothing_partial_and_the_retry_elsewhere_succeeds() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let (a, mut b, c) = (replica(&g), replica(&g), replica(&g));
    let blob = common::random_bytes(128 << 20, 131);
    let d = push_blob(&a, "team/big", &blob);
    let path = format!("/v2/team/big/blobs/{d}");
    let hex = &d["sha256:".len()..];
    let published = |s: &Server| s.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex);

    // Cold: B fills from the bucket while it streams to the client.
    let pull = SlowPull::start(&b, &path, 1 << 20);
    assert_eq!(pull.length, blob.len());
    g.pause(true);
    b.kill();
    g.pause(false);
    assert!(
        !published(&b).exists(),
        "a fill cut by the kill was published"
    );
    let got = pull.finish();
    assert!(got.len() < blob.len(), "the cut pull got the whole body");
    assert!(got == blob[..got.len()], "the cut pull got other bytes");
    let r = get(&c, &path);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == blob, "the retried pull got other bytes");

    let mut b2 = restart(&g, &b);
    assert!(
        !published(&b2).exists(),
        "the restart published the cut fill"
    );
    let r = get(&b2, &path);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == blob, "the restarted replica served other bytes");
    // Published once verified: the last byte goes out first, the fsync and rename after.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !published(&b2).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sha256(&std::fs::read(published(&b2)).unwrap()), d);

    // Warm: B2 serves it from its cache with sendfile.
    let pull = SlowPull::start(&b2, &path, 1 << 20);
    b2.kill();
    let got = pull.finish();
    assert!(got.len() < blob.len(), "the cut pull got the whole body");
    assert!(got == blob[..got.len()], "the cut pull got other bytes");
    let r = get(&c, &path);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == blob);
    let b3 = restart(&g, &b);
    let r = get(&b3, &path);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == blob);
    assert_eq!(sha256(&std::fs::read(published(&b3)).unwrap()), d);
    oci::assert_blobs_hash_to_their_names(&b3.data_dir);
}

/// Immutable tags hold across replicas: `team/` tags `v*` are immutable on both; `v1` pushed
/// through A, which B never served. Through B, moving `v1` to another image, deleting it,
/// deleting its manifest and deleting one of its layers are each 403 `DENIED`; pushing the same
/// image to `v1` again is accepted; every replica still serves `v1` as A pushed it.
#[test]
fn immutable_tags_pushed_through_one_replica_hold_on_another() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let rule = "\n[[immutable_tags]]\nprefix = \"team/\"\ntags = [\"v*\"]\n";
    let (a, b) = (replica_with(&g, rule), replica_with(&g, rule));
    let release = push_image(&a, "team/rel", Some("v1"), 141);
    let other = push_image(&b, "team/rel", None, 142);

    let r = oci::put_manifest(&b, "team/rel", "v1", OCI_MANIFEST, &other.manifest);
    r.assert_error(403, "DENIED");
    assert!(
        String::from_utf8_lossy(&r.body).contains("immutable"),
        "{}",
        r.describe()
    );
    for path in [
        "/v2/team/rel/manifests/v1".to_owned(),
        format!("/v2/team/rel/manifests/{}", release.digest),
        format!("/v2/team/rel/blobs/{}", sha256(&release.layers[0])),
    ] {
        oci::delete(&b, &path).assert_error(403, "DENIED");
    }
    push_manifest(&b, "team/rel", "v1", OCI_MANIFEST, &release.manifest);
    std::thread::sleep(Duration::from_millis(TAG_TTL_MS + 500));
    let c = replica_with(&g, rule);
    for server in [&a, &b, &c] {
        assert_serves(server, "team/rel", "v1", &release);
    }
}

/// A replica whose data directory is on `fs` (no event log: its files would take the space
/// the tests measure).
fn replica_on(fs: &common::smallfs::SmallFs, g: &Garage) -> Server {
    replica_in(g, &fs.path(), &["--events-ring-records", "0"])
}

/// A push's 201 with its digest: the bucket holds it, whatever the replica's cache could take.
fn assert_acknowledged(r: &oci::Reply, digest: &str) {
    assert_eq!(
        r.status,
        201,
        "in the bucket, so acknowledged: {}",
        r.describe()
    );
    assert_eq!(r.header("Docker-Content-Digest"), digest);
}

/// A full disk on one replica (its data directory on a small tmpfs) never makes the push's
/// answer disagree with the bucket, which is the durable store:
/// - a manifest whose content does not fit is refused (507) before the bucket is written: no
///   replica sees it, and the tag keeps naming what it did;
/// - a manifest whose content fits but whose link and tag do not is in the bucket, so it is
///   acknowledged (201); the full replica stops serving what the tag named before (it asks the
///   bucket: 507 while it cannot cache the answer, the new manifest once there is room), and a
///   replica with room serves the new one at once.
#[test]
fn a_full_disk_on_a_replica_answers_a_push_as_the_bucket_holds_it() {
    if !garage::installed() {
        return;
    }
    let Some(fs) = common::smallfs::SmallFs::mount(8) else {
        return;
    };
    let g = Garage::start();
    let a = replica_on(&fs, &g);
    let first = push_image(&a, "full/app", Some("v1"), 81);
    let layers: Vec<&[u8]> = first.layers.iter().map(Vec::as_slice).collect();
    let padded = |pad: usize| {
        let mut m = oci::image_manifest_value(&first.config, &layers);
        m["annotations"] = serde_json::json!({"pad": "x".repeat(pad)});
        serde_json::to_vec(&m).unwrap()
    };
    let digest_at = |server: &Server| manifest_digest(server, "full/app", "v1");

    // Too big for what is left: refused, and the bucket does not have it.
    let filler = fs.root().join("filler");
    std::fs::write(&filler, vec![0u8; (fs.free() - (64 << 10)) as usize]).unwrap();
    let big = padded(256 << 10);
    let r = oci::put_manifest(&a, "full/app", "v1", OCI_MANIFEST, &big);
    assert_eq!(r.status, 507, "{}", r.describe());
    let b = replica(&g);
    assert_eq!(digest_at(&b), (200, first.digest.clone()));
    assert_eq!(digest_at(&a), (200, first.digest.clone()));
    let r = oci::get_manifest(&b, "full/app", &sha256(&big), OCI_MANIFEST);
    assert_eq!(r.status, 404, "{}", r.describe());
    std::fs::remove_file(&filler).unwrap();

    // Room for the content (two pages), none for the link and the tag after it.
    let small = padded(5000);
    assert!(small.len() > 4096 && small.len() <= 8192);
    let new = sha256(&small);
    let left = 2 * 4096;
    std::fs::write(&filler, vec![0u8; (fs.free() - left) as usize]).unwrap();
    assert_eq!(fs.free(), left);
    let r = oci::put_manifest(&a, "full/app", "v1", OCI_MANIFEST, &small);
    assert_acknowledged(&r, &new);
    let c = replica(&g);
    assert_eq!(
        digest_at(&c),
        (200, new.clone()),
        "another replica serves it"
    );
    let (status, digest) = digest_at(&a);
    assert_ne!(
        digest, first.digest,
        "the full replica serves the old tag no more"
    );
    assert_eq!(status, 507, "it cannot cache the bucket's answer yet");
    assert_eq!(a.metrics()["lighter_bucket_cache_write_failures_total"], 1);

    // Room again: the replica caches the bucket's tag and serves the new manifest.
    std::fs::remove_file(&filler).unwrap();
    let r = oci::get_manifest(&a, "full/app", "v1", OCI_MANIFEST);
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == small);
    assert_eq!(r.header("Docker-Content-Digest"), new);
}

/// A blob upload whose bytes are in but whose publication finds no inode left on the replica
/// (its data directory a tmpfs of few inodes): the bucket takes it, so the push is acknowledged
/// (201); another replica serves it at once, and the full one serves it from the bucket once it
/// has room to cache it.
#[test]
fn a_blob_the_bucket_took_is_acknowledged_though_the_replica_cannot_cache_it() {
    if !garage::installed() {
        return;
    }
    let Some(fs) = common::smallfs::SmallFs::mount_with_inodes(32, 4000) else {
        return;
    };
    let g = Garage::start();
    let a = replica_on(&fs, &g);
    let blob = common::random_bytes(200_000, 91);
    let digest = sha256(&blob);
    let location = oci::start_upload(&a, "inodes/app");
    let r = oci::patch_chunk(&a, &location, 0, &blob);
    assert_eq!(r.status, 202, "{}", r.describe());
    let location = r.header("Location").to_string();

    // Every inode taken: the upload's bytes are in, its publication cannot make a file.
    let filler = fs.root().join("filler");
    std::fs::create_dir(&filler).unwrap();
    let full = (0..5000).find_map(|i| std::fs::File::create(filler.join(i.to_string())).err());
    let full = full.expect("the inodes run out");
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");

    let r = oci::put_upload(&a, &location, &digest, b"");
    assert_acknowledged(&r, &digest);
    let b = replica(&g);
    let r = get(&b, &format!("/v2/inodes/app/blobs/{digest}"));
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == blob, "another replica serves the bytes");
    assert_eq!(a.metrics()["lighter_bucket_cache_write_failures_total"], 1);
    // The full replica serves it from what it has (the content, if its rename got through,
    // linked by the bucket) or says it has no room: never other or partial bytes.
    let r = get(&a, &format!("/v2/inodes/app/blobs/{digest}"));
    assert!(
        r.status == 507 || (r.status == 200 && r.body == blob),
        "{}",
        r.describe()
    );

    std::fs::remove_dir_all(&filler).unwrap();
    let r = get(&a, &format!("/v2/inodes/app/blobs/{digest}"));
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.body == blob);
}
