//! Deletes and garbage collection in the replicated mode (`[storage.s3]`), against a real
//! Garage: a delete made through one replica is served by none of the others (their data
//! planes included) once they have read the journal of deletes; garbage collection removes
//! from the bucket exactly the content no repository links and that is older than
//! `gc_grace_ms`, and never content a replica is linking meanwhile.

mod common;
mod oci;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::garage::{self, Garage, BUCKET, REGION};
use common::{sha256, Server};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use oci::{get, head, push_blob, push_image, push_manifest, OCI_MANIFEST};

/// Short enough for a test, long enough for the store's one-second times.
const GC_GRACE_MS: u64 = 3000;
const DELETES_POLL_MS: u64 = 200;

/// A replica with `tag_ttl_ms` and more fields of `[storage.s3]`.
fn replica(g: &Garage, tag_ttl_ms: u64, s3_fields: &str) -> Server {
    static REPLICAS: AtomicU32 = AtomicU32::new(0);
    let n = REPLICAS.fetch_add(1, Ordering::Relaxed);
    let config = g.dir().join(format!("lighter-gc-{n}.toml"));
    std::fs::write(&config, g.storage_toml(tag_ttl_ms) + s3_fields).unwrap();
    let config = config.display().to_string();
    Server::launch_temp(|l| l.args(&["--config", &config]).env(&g.env()))
}

/// The test's own client of the bucket (the same crate as the replicas', its own requests).
struct Store {
    store: object_store::aws::AmazonS3,
    rt: tokio::runtime::Runtime,
}

impl Store {
    fn new(g: &Garage) -> Store {
        let store = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region(REGION)
            .with_endpoint(&g.endpoint)
            .with_access_key_id(&g.key_id)
            .with_secret_access_key(&g.secret)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(true)
            .build()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Store { store, rt }
    }

    /// Every key under `prefix`.
    fn keys(&self, prefix: &str) -> BTreeSet<String> {
        self.rt.block_on(async {
            let mut out = BTreeSet::new();
            let mut listed = self.store.list(Some(&Path::from(prefix)));
            while let Some(meta) = futures_util::StreamExt::next(&mut listed).await {
                out.insert(meta.unwrap().location.to_string());
            }
            out
        })
    }

    fn delete(&self, key: &str) {
        self.rt
            .block_on(self.store.delete(&Path::from(key)))
            .unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt.block_on(async {
            match self.store.get(&Path::from(key)).await {
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("get {key}: {e}"),
            }
        })
    }

    /// The content keys (`blobs/sha256/<hex>`) as digests.
    fn contents(&self) -> BTreeSet<String> {
        self.keys("blobs")
            .into_iter()
            .map(|k| format!("sha256:{}", k.trim_start_matches("blobs/sha256/")))
            .collect()
    }
}

/// Polls `done` until it holds, for at most `secs` seconds.
fn eventually(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn gc(server: &Server, dry_run: bool) -> serde_json::Value {
    let r = oci::post(server, &format!("/v2/_lighter/gc?dry_run={dry_run}"));
    assert_eq!(r.status, 200, "{}", r.describe());
    r.json()
}

/// Every blob and the manifest of `img`, served by `server` with the same bytes.
fn assert_serves(server: &Server, repo: &str, reference: &str, img: &oci::Image) {
    let m = oci::get_manifest(server, repo, reference, OCI_MANIFEST);
    assert_eq!(m.status, 200, "{}", m.describe());
    assert!(m.body == img.manifest, "manifest bytes differ");
    for blob in std::iter::once(&img.config).chain(img.layers.iter()) {
        let d = sha256(blob);
        let r = get(server, &format!("/v2/{repo}/blobs/{d}"));
        assert_eq!(r.status, 200, "blob {d}: {}", r.describe());
        assert!(r.body == *blob, "blob {d}: other bytes");
    }
}

/// A manifest deleted by digest, a tag and a blob deleted through replica A: replicas B and C,
/// which had cached all three (their data planes answer them from disk), answer 404 once
/// they have read the journal of deletes, though their `tag_ttl_ms` is ten minutes, so only
/// the journal can have told them. What was not deleted is still served; the manifest pushed
/// again is served again; the journal is pruned after `deletes_retention_ms`.
#[test]
fn deletes_through_one_replica_reach_every_other_within_the_poll() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let store = Store::new(&g);
    let fields = format!("deletes_poll_ms = {DELETES_POLL_MS}\ndeletes_retention_ms = 3000\n");
    let ttl = 600_000;
    let (a, b, c) = (
        replica(&g, ttl, &fields),
        replica(&g, ttl, &fields),
        replica(&g, ttl, &fields),
    );
    let doomed = push_image(&a, "team/del", Some("v1"), 301);
    let kept = push_image(&a, "team/del", Some("keep"), 302);
    push_manifest(&a, "team/del", "also", OCI_MANIFEST, &kept.manifest);
    let loose = common::random_bytes(5000, 303);
    let d_loose = push_blob(&a, "team/del", &loose);
    for r in [&b, &c] {
        assert_serves(r, "team/del", "v1", &doomed);
        assert_serves(r, "team/del", "keep", &kept);
        assert_serves(r, "team/del", "also", &kept);
        assert_eq!(get(r, &format!("/v2/team/del/blobs/{d_loose}")).body, loose);
        // Cached: the data plane answers these from the replica's disk from now on.
        assert!(r.data_dir.join("repos/team/del/_tags/v1").exists());
    }

    let by_digest = format!("/v2/team/del/manifests/{}", doomed.digest);
    assert_eq!(oci::delete(&a, &by_digest).status, 202);
    assert_eq!(oci::delete(&a, "/v2/team/del/manifests/also").status, 202);
    assert_eq!(
        oci::delete(&a, &format!("/v2/team/del/blobs/{d_loose}")).status,
        202
    );
    // One entry per delete (pruned only after deletes_retention_ms).
    let journal = store.keys("deleted");
    assert!(journal.len() <= 3, "{journal:?}");
    for (r, name) in [(&b, "B"), (&c, "C")] {
        eventually(
            20,
            &format!("replica {name} answers 404 for what A deleted"),
            || {
                oci::get_manifest(r, "team/del", &doomed.digest, OCI_MANIFEST).status == 404
                    && oci::head_manifest(r, "team/del", &doomed.digest, OCI_MANIFEST).status == 404
                    && oci::get_manifest(r, "team/del", "v1", OCI_MANIFEST).status == 404
                    && oci::get_manifest(r, "team/del", "also", OCI_MANIFEST).status == 404
                    && get(r, &format!("/v2/team/del/blobs/{d_loose}")).status == 404
                    && head(r, &format!("/v2/team/del/blobs/{d_loose}")).status == 404
            },
        );
        oci::get_manifest(r, "team/del", &doomed.digest, OCI_MANIFEST)
            .assert_error(404, "MANIFEST_UNKNOWN");
        get(r, &format!("/v2/team/del/blobs/{d_loose}")).assert_error(404, "BLOB_UNKNOWN");
        // The rest stays, and the deleted manifest's blobs (still linked) too.
        assert_serves(r, "team/del", "keep", &kept);
        let layer = sha256(&doomed.layers[0]);
        assert_eq!(get(r, &format!("/v2/team/del/blobs/{layer}")).status, 200);
    }
    assert!(!b.data_dir.join("repos/team/del/_tags/v1").exists());
    // The journal's reader is observable: B applied the three deletes (whether its cache held
    // each or not) and read the journal within the last few polls.
    let text = String::from_utf8_lossy(&get(&b, "/v2/_lighter/metrics").body).into_owned();
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {text}"))
    };
    assert!(
        value("lighter_bucket_journal_entries_applied_total") >= 3,
        "{text}"
    );
    assert!(
        value("lighter_bucket_journal_reads_total{result=\"ok\"}") >= 1,
        "{text}"
    );
    let last = value("lighter_bucket_journal_last_read_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.saturating_sub(last) <= 10,
        "last read at {last}, now {now}"
    );

    // Pushed again through A: every replica serves it again (the journal only drops caches).
    push_manifest(&a, "team/del", "v1", OCI_MANIFEST, &doomed.manifest);
    for r in [&a, &b, &c] {
        eventually(20, "the manifest pushed again is served", || {
            oci::get_manifest(r, "team/del", &doomed.digest, OCI_MANIFEST).status == 200
        });
        assert_serves(r, "team/del", &doomed.digest, &doomed);
    }

    // The journal is pruned once its entries are older than deletes_retention_ms.
    eventually(30, "the journal of deletes is pruned", || {
        store.keys("deleted").is_empty()
    });
}

/// A collection removes from the bucket the content no repository links once it is older
/// than `gc_grace_ms`, and nothing else: a deleted blob's content and a manifest deleted by
/// digest go, a blob still linked from another repository stays, as do the deleted
/// manifest's blobs (still linked) and everything tags name. A dry run removes nothing. A
/// fresh replica then pulls every image whole.
#[test]
fn garbage_collection_frees_exactly_the_unlinked_content_of_the_bucket() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let store = Store::new(&g);
    let fields = format!("gc_grace_ms = {GC_GRACE_MS}\n");
    let (a, b) = (replica(&g, 1000, &fields), replica(&g, 1000, &fields));
    let kept = push_image(&a, "team/gc", Some("v1"), 401);
    let pushed = Instant::now();
    let unlinked_manifest = push_image(&a, "team/gc", None, 402);
    let orphan = common::random_bytes(7000, 403);
    let d_orphan = push_blob(&a, "team/gc", &orphan);
    let shared = common::random_bytes(8000, 404);
    let d_shared = push_blob(&a, "team/gc", &shared);
    let r = oci::open_upload(&b, "team/other", &format!("mount={d_shared}&from=team/gc"));
    assert_eq!(r.status, 201, "{}", r.describe());

    let by_digest = format!("/v2/team/gc/manifests/{}", unlinked_manifest.digest);
    assert_eq!(oci::delete(&b, &by_digest).status, 202);
    assert_eq!(
        oci::delete(&a, &format!("/v2/team/gc/blobs/{d_orphan}")).status,
        202
    );
    assert_eq!(
        oci::delete(&a, &format!("/v2/team/gc/blobs/{d_shared}")).status,
        202
    );
    let before = store.contents();
    let garbage: BTreeSet<String> = [unlinked_manifest.digest.clone(), d_orphan.clone()].into();
    assert!(garbage.is_subset(&before), "{before:?}");

    // Young: found unreferenced, spared (unless this slow machine took the whole grace).
    let report = gc(&b, false);
    if pushed.elapsed() < Duration::from_millis(GC_GRACE_MS - 1000) {
        assert_eq!(report["bucket"]["unreferenced_blobs"], 2, "{report}");
        assert_eq!(report["bucket"]["removed_blobs"], 0, "{report}");
        assert_eq!(store.contents(), before);
    }

    std::thread::sleep(Duration::from_millis(GC_GRACE_MS + 1500));
    if report["bucket"]["removed_blobs"] == 0 {
        // The clock a collection writes is gone; a dry run does not write it again.
        store.delete("gc/clock");
        let dry = gc(&a, true);
        assert_eq!(store.get("gc/clock"), None, "a dry run writes nothing");
        assert_eq!(dry["bucket"]["unreferenced_blobs"], 2, "{dry}");
        assert_eq!(dry["bucket"]["young_blobs"], 0, "{dry}");
        assert_eq!(dry["bucket"]["removed_blobs"], 0, "{dry}");
        assert_eq!(store.contents(), before);

        let done = gc(&a, false);
        assert_eq!(done["bucket"]["removed_blobs"], 2, "{done}");
        assert_eq!(
            done["bucket"]["removed_bytes"],
            (unlinked_manifest.manifest.len() + orphan.len()) as u64,
            "{done}"
        );
    }
    // The `gc` event of the replica that removed them names what left the bucket.
    let remover = if report["bucket"]["removed_blobs"] == 0 {
        &a
    } else {
        &b
    };
    let events = common::events::events_until(remover, "action=gc", |lines| {
        lines.iter().any(|e| e["bucket_removed_blobs"] == 2)
    });
    let e = events
        .iter()
        .find(|e| e["bucket_removed_blobs"] == 2)
        .unwrap_or_else(|| panic!("no gc event removed 2 blobs from the bucket: {events:?}"));
    let named: BTreeSet<String> = e["bucket_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(named, garbage, "{e}");
    let metrics = get(remover, "/v2/_lighter/metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l == "lighter_gc_bucket_removed_blobs_total 2"),
        "{text}"
    );
    let after = store.contents();
    assert_eq!(
        after,
        before
            .difference(&garbage)
            .cloned()
            .collect::<BTreeSet<_>>()
    );
    // Exactly what the links and tags name is left.
    let mut named = BTreeSet::new();
    for key in store.keys("repos") {
        if let Some((_, rest)) = key
            .split_once("/_blobs/")
            .or(key.split_once("/_manifests/"))
        {
            named.insert(rest.replace('/', ":"));
        }
    }
    assert_eq!(after, named);
    assert_eq!(gc(&b, false)["bucket"]["removed_blobs"], 0);

    let fresh = replica(&g, 1000, &fields);
    assert_serves(&fresh, "team/gc", "v1", &kept);
    assert_eq!(
        get(&fresh, &format!("/v2/team/other/blobs/{d_shared}")).body,
        shared
    );
    get(&fresh, &format!("/v2/team/gc/blobs/{d_orphan}")).assert_error(404, "BLOB_UNKNOWN");
    // Pushed again after its collection, the content comes back whole.
    assert_eq!(push_blob(&a, "team/gc", &orphan), d_orphan);
    assert_eq!(
        store.get(&format!("blobs/sha256/{}", &d_orphan[7..])),
        Some(orphan)
    );
}

/// Rounds of links of old, unlinked content (mounts without `from`, and pushes of the same
/// bytes again) through replica A, while replica B collects back to back: each link either
/// succeeds, or fails clearly (a mount that finds the content gone opens an upload, which
/// then uploads it; a push gets 503 and is tried again). At the end every blob link in the
/// bucket names content that is there and hashes to its name, and every blob is served whole.
#[test]
fn links_racing_back_to_back_collections_never_lose_linked_content() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let store = Store::new(&g);
    let fields = format!("gc_grace_ms = {GC_GRACE_MS}\n");
    let (a, b) = (replica(&g, 1000, &fields), replica(&g, 1000, &fields));
    let (mut collected, mut mounted, mut reopened, mut retried) = (0u64, 0u32, 0u32, 0u32);
    for round in 0..6u64 {
        let repo = format!("team/race{round}");
        let blobs: Vec<Vec<u8>> = (0..8)
            .map(|i| common::random_bytes(4000 + i * 100, 1000 * round + i as u64))
            .collect();
        let digests: Vec<String> = blobs.iter().map(|b| sha256(b)).collect();
        // Two more that nothing links again: the collector has something to remove.
        let decoys: Vec<Vec<u8>> = (0..2)
            .map(|i| common::random_bytes(3000, 1000 * round + 900 + i))
            .collect();
        // Linked once, then unlinked: old, unlinked content once the grace has passed.
        for blob in blobs.iter().chain(&decoys) {
            let d = push_blob(&a, "team/seed", blob);
            assert_eq!(
                oci::delete(&a, &format!("/v2/team/seed/blobs/{d}")).status,
                202
            );
        }
        std::thread::sleep(Duration::from_millis(GC_GRACE_MS + 1200));
        let stop = AtomicBool::new(false);
        let (mounted_n, reopened_n, retried_n) =
            (AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0));
        // The collector and every linker start at once; the linkers are staggered a little
        // differently each round so that touches fall before, among and after the deletes.
        let start = std::sync::Barrier::new(blobs.len() + 1);
        std::thread::scope(|s| {
            let collector = s.spawn(|| {
                start.wait();
                let mut removed = 0;
                while !stop.load(Ordering::Relaxed) {
                    removed += gc(&b, false)["bucket"]["removed_blobs"].as_u64().unwrap();
                }
                removed
            });
            let linkers: Vec<_> = blobs
                .iter()
                .zip(&digests)
                .enumerate()
                .map(|(i, (blob, d))| {
                    let (repo, start) = (&repo, &start);
                    let (mounted_n, reopened_n, retried_n) = (&mounted_n, &reopened_n, &retried_n);
                    let (a, round) = (&a, round as usize);
                    s.spawn(move || {
                        start.wait();
                        std::thread::sleep(Duration::from_millis(
                            ((i * 7 + round * 13) % 40) as u64,
                        ));
                        // Until acknowledged; a 503 (the link took over half the grace, or the
                        // content went while it was being linked) is tried again.
                        loop {
                            let r = if (i + round) % 2 == 0 {
                                // A mount: linked if the content is still there, else an upload.
                                let r = oci::open_upload(a, repo, &format!("mount={d}"));
                                match r.status {
                                    201 => {
                                        mounted_n.fetch_add(1, Ordering::Relaxed);
                                        r
                                    }
                                    202 => {
                                        reopened_n.fetch_add(1, Ordering::Relaxed);
                                        let location = r.header("Location").to_owned();
                                        oci::put_upload(a, &location, d, blob)
                                    }
                                    _ => r,
                                }
                            } else {
                                // A push of bytes the bucket may still hold: touched, or uploaded.
                                oci::post_blob(a, repo, d, blob)
                            };
                            if r.status == 201 {
                                break;
                            }
                            assert_eq!(r.status, 503, "{d}: {}", r.describe());
                            retried_n.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for l in linkers {
                l.join().unwrap();
            }
            stop.store(true, Ordering::Relaxed);
            collected += collector.join().unwrap();
        });
        mounted += mounted_n.into_inner();
        reopened += reopened_n.into_inner();
        retried += retried_n.into_inner();
        // Every link names content that is there, with the right bytes.
        for key in store.keys("repos") {
            let Some((_, rest)) = key.split_once("/_blobs/") else {
                continue;
            };
            let content = format!("blobs/{rest}");
            let bytes = store
                .get(&content)
                .unwrap_or_else(|| panic!("round {round}: {key} names missing content"));
            assert_eq!(sha256(&bytes), rest.replace('/', ":"), "round {round}");
        }
        let fresh = replica(&g, 1000, &fields);
        for (blob, d) in blobs.iter().zip(&digests) {
            let r = get(&fresh, &format!("/v2/{repo}/blobs/{d}"));
            assert_eq!(r.status, 200, "round {round}: {}", r.describe());
            assert!(r.body == *blob, "round {round}: {d} other bytes");
        }
    }
    eprintln!(
        "collected {collected}, mounted {mounted}, mounts that uploaded again {reopened}, pushes retried {retried}"
    );
    // The collections were real: the decoys, at least, went.
    assert!(collected >= 8, "the collector removed only {collected}");
}

/// A replica stopped (kill -9) while a manifest it had cached is deleted through another, for
/// longer than its window of late journal entries: restarted over the same data directory, it
/// reads the whole retained journal first and stops serving the manifest, though its
/// `tag_ttl_ms` is ten minutes and its data plane has the files.
#[test]
fn a_replica_restarted_after_a_delete_elsewhere_drops_what_was_deleted_meanwhile() {
    if !garage::installed() {
        return;
    }
    let g = Garage::start();
    let fields = format!("deletes_poll_ms = {DELETES_POLL_MS}\n");
    let a = replica(&g, 600_000, &fields);
    // B's window of late entries: 2 s of request, no retry, plus 10 s of clock difference.
    let b_fields = format!("{fields}request_timeout_ms = 2000\nretries_max = 0\n");
    let config = g.dir().join("lighter-gc-restarted.toml");
    std::fs::write(&config, g.storage_toml(600_000) + &b_fields).unwrap();
    let config = config.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        common::Launch::new(dir.path())
            .args(&["--config", &config])
            .env(&g.env())
            .start()
    };
    let mut b = start();
    let img = push_image(&a, "team/away", Some("v1"), 601);
    assert_serves(&b, "team/away", "v1", &img);
    b.kill();

    let by_digest = format!("/v2/team/away/manifests/{}", img.digest);
    assert_eq!(oci::delete(&a, &by_digest).status, 202);
    assert!(dir.path().join("repos/team/away/_tags/v1").exists());
    // Down for longer than that window: only the journal's retained entries can tell it.
    std::thread::sleep(Duration::from_millis(13_000));
    let b = start();
    eventually(20, "the restarted replica answers 404", || {
        oci::get_manifest(&b, "team/away", &img.digest, OCI_MANIFEST).status == 404
            && oci::get_manifest(&b, "team/away", "v1", OCI_MANIFEST).status == 404
    });
    oci::get_manifest(&b, "team/away", "v1", OCI_MANIFEST).assert_error(404, "MANIFEST_UNKNOWN");
    let layer = sha256(&img.layers[0]);
    assert_eq!(
        get(&b, &format!("/v2/team/away/blobs/{layer}")).body,
        img.layers[0]
    );
}
