//! The workload inventory and the out-of-date report, fed as a cluster feeds them: real
//! admission.k8s.io/v1 AdmissionReviews (`tests/fixtures/admission/reviews`, made by
//! `generate.sh`) POSTed over TLS to `lighter serve --webhook-listen`; images pushed and tags
//! moved over the registry port (and upstream, for a mirrored tag); the inventory read with
//! `GET /v2/_lighter/inventory` and with the built `lighter outdated`.
//!
//! Needs `openssl` on the PATH (the webhook's certificates).

mod common;
mod oci;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::tls::{https_client, make_ca, make_leaf};
use common::webhook::start_webhooks;
use common::{Launch, Server};
use serde_json::{json, Value};

/// Allow-all (no rules), with this registry known as `localhost:5000`, the host the fixtures'
/// own images name.
const ALLOW_ALL: &str = r#"
[admission]
registry_hosts = ["localhost:5000"]
"#;

/// The fixture pod (a Deployment's, through its ReplicaSet) and its names.
const POD: &str = "web-6b7f9c5d4-k8x2p";
const WEB: &str = "localhost:5000/app/web:1.0";
const MIGRATE: &str = "localhost:5000/app/migrate:1.0";

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission/reviews")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run generate.sh)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A registry with its webhook port, over a data directory and certificates that outlive it.
struct Webhook {
    server: Server,
    addr: SocketAddr,
    client: reqwest::blocking::Client,
}

impl Webhook {
    /// Starts `lighter serve` over `data_dir` with `config`, serving the certificate in `certs`
    /// (made there by [`certificates`]).
    fn start(data_dir: &Path, certs: &Path, config: &str) -> Webhook {
        let file = certs.join("lighter.toml");
        std::fs::write(&file, config).unwrap();
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let (cert, key, file) = (
            s(&certs.join("tls.crt")),
            s(&certs.join("tls.key")),
            s(&file),
        );
        let (server, addr) = start_webhooks(
            Launch::new(data_dir),
            Path::new(&cert),
            Path::new(&key),
            Path::new(&file),
        );
        Webhook {
            server,
            addr,
            client: https_client(&certs.join("ca.crt"), true),
        }
    }

    /// POSTs `review` to `/validate`; asserts the envelope; returns `response`.
    fn validate(&self, review: &Value) -> Value {
        let resp = self
            .client
            .post(format!("https://{}/validate", self.addr))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(review).unwrap())
            .send()
            .expect("POST /validate");
        assert_eq!(resp.status().as_u16(), 200);
        let text = resp.text().expect("body");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(body["kind"], "AdmissionReview", "{body}");
        assert_eq!(body["response"]["uid"], review["request"]["uid"], "{body}");
        body["response"].clone()
    }

    /// `GET /v2/_lighter/inventory?<query>`'s entries.
    fn inventory(&self, query: &str) -> Vec<Value> {
        let r = oci::get(&self.server, &format!("/v2/_lighter/inventory?{query}"));
        assert_eq!(r.status, 200, "{}", r.describe());
        assert!(r.header("content-type").starts_with("application/json"));
        r.json()["entries"].as_array().expect("entries").clone()
    }

    /// Runs the built `lighter outdated --registry <this> <args>`: (exit success, stdout).
    fn outdated_cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(common::BIN)
            .arg("outdated")
            .arg("--registry")
            .arg(self.server.url(""))
            .args(args)
            .output()
            .expect("run lighter outdated");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// A CA and the webhook's certificate in `dir`.
fn certificates(dir: &Path) {
    make_ca(dir);
    make_leaf(dir, "tls", "lighter-webhook", 1001);
}

fn entry<'a>(entries: &'a [Value], container: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["container"] == container)
        .unwrap_or_else(|| panic!("no entry for container {container}: {entries:#?}"))
}

fn short(digest: &str) -> String {
    digest[..("sha256:".len() + 12)].to_owned()
}

#[test]
fn a_moved_tag_makes_the_deployments_pod_out_of_date_and_a_pinned_container_never() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certificates(certs.path());
    let w = Webhook::start(data.path(), certs.path(), ALLOW_ALL);
    let web1 = oci::push_image(&w.server, "app/web", Some("1.0"), 1).digest;
    let migrate = oci::push_image(&w.server, "app/migrate", Some("1.0"), 2).digest;

    // The Deployment's pod, with a third container pinned by digest to what the tag is now.
    let mut review = fixture("pod-of-deployment");
    let pinned = format!("localhost:5000/app/web@{web1}");
    review["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "shipper", "image": pinned}));
    let t0 = now_ms();
    assert_eq!(w.validate(&review)["allowed"], true);
    // The Deployment itself (its template names images Lighter neither holds nor mirrors).
    assert_eq!(w.validate(&fixture("deployment"))["allowed"], true);
    let t1 = now_ms();

    let all = w.inventory("");
    assert_eq!(all.len(), 5, "{all:#?}");
    let pod: Vec<Value> = all.iter().filter(|e| e["kind"] == "Pod").cloned().collect();
    assert_eq!(pod.len(), 3, "{all:#?}");
    for e in &pod {
        assert_eq!(e["namespace"], "shop");
        assert_eq!(
            (&e["owner_kind"], &e["owner_name"]),
            (&json!("Deployment"), &json!("web"))
        );
        assert_eq!(e["name"], POD);
        assert!(e["outdated"].is_null(), "{e}");
        let (first, last) = (
            e["first_seen_ms"].as_u64().unwrap(),
            e["last_seen_ms"].as_u64().unwrap(),
        );
        assert!(t0 <= first && first == last && last <= t1, "{e}");
    }
    let web = entry(&pod, "web");
    assert_eq!(web["container_type"], "container");
    assert_eq!(web["image"], WEB);
    assert_eq!(web["repository"], "app/web");
    assert_eq!(web["tag"], "1.0");
    assert_eq!(web["digest"], web1.as_str());
    assert_eq!(web["pinned"], false);
    let init = entry(&pod, "migrate");
    assert_eq!(init["container_type"], "init");
    assert_eq!(init["image"], MIGRATE);
    assert_eq!(init["digest"], migrate.as_str());
    let shipper = entry(&pod, "shipper");
    assert_eq!(
        (&shipper["digest"], &shipper["pinned"]),
        (&json!(web1), &json!(true))
    );
    let nginx = all
        .iter()
        .find(|e| e["kind"] == "Deployment" && e["container"] == "nginx")
        .unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(
        (&nginx["owner_kind"], &nginx["owner_name"], &nginx["name"]),
        (&json!("Deployment"), &json!("web"), &json!("web"))
    );
    assert_eq!(
        (&nginx["image"], &nginx["repository"], &nginx["digest"]),
        (&json!("nginx:1.27"), &Value::Null, &Value::Null)
    );
    assert!(w.inventory("outdated=true").is_empty());

    // Pages: `limit` rows each, in the same order, `next` (and a Link header) to the rest.
    let mut paged = Vec::new();
    let mut url = "/v2/_lighter/inventory?limit=2".to_owned();
    for page in 0.. {
        assert!(page < 5, "more pages than rows");
        let r = oci::get(&w.server, &url);
        assert_eq!(r.status, 200, "{}", r.describe());
        let v = r.json();
        let rows = v["entries"].as_array().unwrap();
        assert!(!rows.is_empty() && rows.len() <= 2, "{v}");
        paged.extend(rows.iter().cloned());
        match v["next"].as_str() {
            Some(_) => {
                let link = r.header("link");
                let target = link
                    .strip_prefix('<')
                    .and_then(|l| l.split_once(">; rel=\"next\""))
                    .unwrap_or_else(|| panic!("Link: {link:?}"))
                    .0;
                url = target.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(paged, all, "the pages are the whole inventory, in order");
    for bad in ["limit=0", "limit=10001", "limit=two"] {
        oci::get(&w.server, &format!("/v2/_lighter/inventory?{bad}"))
            .assert_error(400, "UNSUPPORTED");
    }

    // The tag moves.
    let before = now_ms();
    let web2 = oci::push_image(&w.server, "app/web", Some("1.0"), 3).digest;
    let after = now_ms();
    assert_ne!(web1, web2);
    let out = w.inventory("outdated=true");
    assert_eq!(out.len(), 1, "only the tag-pinned web container: {out:#?}");
    let e = &out[0];
    assert_eq!(
        (&e["kind"], &e["name"], &e["container"]),
        (&json!("Pod"), &json!(POD), &json!("web"))
    );
    assert_eq!(e["digest"], web1.as_str(), "the digest it runs");
    let o = &e["outdated"];
    assert_eq!(o["current_digest"], web2.as_str());
    // File times come from a coarser clock than the test's: a second of slack.
    let moved = o["moved_at_ms"].as_u64().unwrap();
    assert!(
        before - 1000 <= moved && moved <= after,
        "moved at {moved}, pushed in {before}..{after}"
    );
    let ago = o["moved_ago_ms"].as_u64().unwrap();
    assert!(ago <= now_ms() - before + 1000, "{o}");

    // Filters.
    assert!(w.inventory("namespace=elsewhere").is_empty());
    assert_eq!(w.inventory("namespace=shop&outdated=true").len(), 1);
    let m = w.inventory("repository=app/migrate");
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["container"], "migrate");
    oci::get(&w.server, "/v2/_lighter/inventory?outdated=maybe").assert_error(400, "UNSUPPORTED");

    // The command line: a table, then the JSON.
    let (ok, text) = w.outdated_cli(&[]);
    assert!(ok, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let header: Vec<&str> = lines[0]
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "WORKLOAD",
            "OBJECT",
            "CONTAINER",
            "IMAGE",
            "RUNS",
            "TAG NOW",
            "TAG MOVED"
        ]
    );
    let row: Vec<&str> = lines[1]
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        row[..7],
        [
            "shop",
            "Deployment/web",
            &format!("Pod/{POD}"),
            "web",
            WEB,
            &short(&web1),
            &short(&web2)
        ],
        "{text}"
    );
    assert!(
        row[7].ends_with(" ago") && row[7].len() >= "0s ago".len(),
        "{text}"
    );
    // Columns line up: each starts at the same place in both lines.
    for cell in ["WORKLOAD", "IMAGE", "TAG NOW"] {
        let col = lines[0].find(cell).unwrap();
        assert!(
            lines[1][col..].starts_with(|c: char| !c.is_whitespace())
                && lines[1].as_bytes()[col - 1] == b' ',
            "{text}"
        );
    }
    let (ok, text) = w.outdated_cli(&["--json"]);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        (
            &entries[0]["digest"],
            &entries[0]["outdated"]["current_digest"]
        ),
        (&json!(web1), &json!(web2))
    );
    let (ok, text) = w.outdated_cli(&["--namespace", "elsewhere"]);
    assert!(ok, "{text}");
    assert_eq!(text, "no workload runs an image whose tag has moved\n");
    // Both pod containers' tags moved: the command follows the pages to the end.
    let migrate2 = oci::push_image(&w.server, "app/migrate", Some("1.0"), 4).digest;
    assert_ne!(migrate, migrate2);
    let (ok, text) = w.outdated_cli(&["--json", "--page-size", "1"]);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let containers: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["container"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["migrate", "web"], "{text}");
    let (ok, text) = w.outdated_cli(&["--credentials", "nocolon"]);
    assert!(!ok && text.contains("--credentials"), "{text}");
}

#[test]
fn refused_pods_are_recorded_deletes_remove_them_and_dry_runs_are_not_recorded() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certificates(certs.path());
    let w = Webhook::start(
        data.path(),
        certs.path(),
        r#"
[admission]
mode = "enforce"
default = "deny"
registry_hosts = ["localhost:5000"]
"#,
    );
    let resp = w.validate(&fixture("pod-of-deployment"));
    assert_eq!(resp["allowed"], false, "{resp}");
    let entries = w.inventory("");
    assert_eq!(entries.len(), 2, "{entries:#?}");
    // Lighter has no such tag yet: the digest is unknown...
    assert!(
        entries.iter().all(|e| e["digest"].is_null()),
        "{entries:#?}"
    );
    // ...until it has one: the first digest the tag has afterwards is the one recorded.
    let web = oci::push_image(&w.server, "app/web", Some("1.0"), 7).digest;
    let entries = w.inventory("");
    assert_eq!(entry(&entries, "web")["digest"], web.as_str());
    assert!(entry(&entries, "migrate")["digest"].is_null());
    assert!(w.inventory("outdated=true").is_empty());

    // A dry run (kubectl apply --dry-run=server) is not a pod that runs.
    let mut dry = fixture("pod");
    dry["request"]["dryRun"] = json!(true);
    w.validate(&dry);
    assert!(w.inventory("").iter().all(|e| e["name"] != "debug"));

    // The pod's deletion removes its entries.
    let resp = w.validate(&fixture("pod-of-deployment-delete"));
    assert_eq!(resp["allowed"], true, "a deletion is never refused: {resp}");
    assert_eq!(w.inventory(""), Vec::<Value>::new());
}

/// Waits until `data/inventory.json` mentions `needle`.
fn wait_published(data: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(data.join("inventory.json")).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "inventory.json never mentioned {needle}: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_inventory_survives_a_restart_and_a_crash() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certificates(certs.path());
    let mut w = Webhook::start(data.path(), certs.path(), ALLOW_ALL);
    oci::push_image(&w.server, "app/web", Some("1.0"), 1);
    w.validate(&fixture("pod-of-deployment"));
    let before = w.inventory("");
    assert_eq!(before.len(), 2);

    // SIGTERM right after the review: the control plane publishes on its way out.
    unsafe { libc::kill(w.server.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.server.alive() {
        assert!(Instant::now() < deadline, "lighter did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(w);
    let mut w = Webhook::start(data.path(), certs.path(), ALLOW_ALL);
    assert_eq!(w.inventory(""), before);

    // kill -9 once the batch is published: nothing published is lost.
    w.validate(&fixture("pod"));
    wait_published(data.path(), "\"debug\"");
    w.server.kill();
    drop(w);
    let w = Webhook::start(data.path(), certs.path(), ALLOW_ALL);
    let after = w.inventory("");
    assert_eq!(after.len(), 3, "{after:#?}");
    for e in &before {
        assert!(after.contains(e), "{e} is gone: {after:#?}");
    }
    assert_eq!(entry(&after, "debug")["image"], "busybox:1.36");
}

#[test]
fn an_upstream_tag_is_out_of_date_once_the_mirror_has_refreshed_it() {
    let upstream = Server::start();
    let u1 = oci::push_image(&upstream, "team/app", Some("v1"), 11).digest;
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certificates(certs.path());
    let w = Webhook::start(
        data.path(),
        certs.path(),
        &format!(
            r#"
[admission.mutate]
enabled = true
rewrite_to = "localhost:5000"

[[upstreams]]
name = "upstream.test"
url = "{}"
tag_ttl_ms = 200
"#,
            upstream.url("")
        ),
    );
    let pull = || {
        let r = oci::get_manifest(&w.server, "upstream.test/team/app", "v1", oci::OCI_MANIFEST);
        assert_eq!(r.status, 200, "{}", r.describe());
        r.header("docker-content-digest").to_owned()
    };
    assert_eq!(pull(), u1);
    // As written, and as the mutating webhook rewrote it: both stand for the mirrored tag.
    let mut review = fixture("pod");
    review["request"]["object"]["spec"]["containers"] = json!([
        {"name": "app", "image": "upstream.test/team/app:v1"},
        {"name": "rewritten", "image": "localhost:5000/upstream.test/team/app:v1"},
    ]);
    w.validate(&review);
    let entries = w.inventory("repository=upstream.test/team/app");
    assert_eq!(entries.len(), 2, "{entries:#?}");
    assert!(
        entries.iter().all(|e| e["digest"] == u1.as_str()),
        "{entries:#?}"
    );

    let u2 = oci::push_image(&upstream, "team/app", Some("v1"), 12).digest;
    // Queries do not ask upstream: until the mirror refreshes the tag, nothing moved.
    std::thread::sleep(Duration::from_millis(400));
    assert!(w.inventory("outdated=true").is_empty());
    let before = now_ms();
    assert_eq!(pull(), u2, "the mirror refreshes the tag past tag_ttl_ms");
    let after = now_ms();
    let out = w.inventory("outdated=true");
    assert_eq!(out.len(), 2, "{out:#?}");
    for e in &out {
        assert_eq!(e["digest"], u1.as_str());
        assert_eq!(e["outdated"]["current_digest"], u2.as_str());
        let moved = e["outdated"]["moved_at_ms"].as_u64().unwrap();
        assert!(
            before - 1000 <= moved && moved <= after,
            "moved at {moved}, refreshed in {before}..{after}"
        );
    }
}

/// Retention (issue 15) never removes what workloads use: with a rule that keeps nothing by
/// itself (`keep_newest = 0`), the tag the Deployment's pod names stays, and so does the
/// manifest a container runs pinned by digest (its tag goes); the rest goes.
#[test]
fn retention_keeps_the_tags_and_digests_workloads_use() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    certificates(certs.path());
    let config = format!("{ALLOW_ALL}\n[[retention]]\nprefix = \"app/\"\nkeep_newest = 0\n");
    let w = Webhook::start(data.path(), certs.path(), &config);
    let web1 = oci::push_image(&w.server, "app/web", Some("1.0"), 1).digest;
    let web2 = oci::push_image(&w.server, "app/web", Some("2.0"), 2).digest;
    let old = oci::push_image(&w.server, "app/web", Some("old"), 3).digest;
    let mut review = fixture("pod-of-deployment");
    review["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "shipper", "image": format!("localhost:5000/app/web@{web2}")}));
    assert_eq!(w.validate(&review)["allowed"], true);

    let r = oci::post(&w.server, "/v2/_lighter/retention");
    assert_eq!(r.status, 200, "{}", r.describe());
    let report = r.json();
    let removed: Vec<&str> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["repository"] == "app/web")
        .map(|e| e["tag"].as_str().unwrap())
        .collect();
    assert_eq!(removed, ["2.0", "old"], "{report}");
    let tags = oci::get(&w.server, "/v2/app/web/tags/list").json();
    assert_eq!(tags["tags"], json!(["1.0"]), "{tags}");
    for (digest, status) in [(&web1, 200), (&web2, 200), (&old, 404)] {
        let r = oci::head_manifest(&w.server, "app/web", digest, common::OCI_MANIFEST);
        assert_eq!(r.status, status, "{digest}: {}", r.describe());
    }
}
