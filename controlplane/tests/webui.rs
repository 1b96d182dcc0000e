//! The web page (issue 14), `GET /v2/_lighter/ui/`, over real sockets against `lighter serve`:
//! repositories with their tags, sizes (each blob once) and pull counts taken from the event
//! log after real pulls; the event stream newest first and paged; hostile user agents and
//! filters escaped; `admin` needed when access control is on, with a Basic challenge a browser
//! answers; and the pages as headless Chromium renders them (skipped, saying so, when
//! `chromium` is not installed).

#[path = "common/auth.rs"]
mod auth_common;
mod common;
mod oci;

use std::time::{Duration, Instant};

use auth_common::{Cred, Fixture, Opts, BOB, CI};
use common::{sha256, Server};
use oci::Image;
use serde_json::Value;

const UI: &str = "/v2/_lighter/ui";

/// A page: asserts 200 and the HTML content type; its text.
fn page(server: &Server, path: &str) -> String {
    let r = Server::client().get(server.url(path)).send().unwrap();
    assert_eq!(r.status(), 200, "{path}");
    assert_eq!(
        r.headers()["content-type"],
        "text/html; charset=utf-8",
        "{path}"
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    let text = r.text().unwrap();
    assert!(text.starts_with("<!DOCTYPE html>"), "{text}");
    assert!(text.trim_end().ends_with("</html>"), "{text}");
    text
}

/// The table row of `html` that contains `needle`, as the text of its cells (tags removed,
/// entities kept).
fn row(html: &str, needle: &str) -> Vec<String> {
    let tr = html
        .split("<tr>")
        .find(|r| r.contains(needle))
        .unwrap_or_else(|| panic!("no row with {needle} in {html}"));
    let tr = tr.split("</tr>").next().unwrap();
    tr.split("<td")
        .skip(1)
        .map(|cell| {
            let inner = &cell[cell.find('>').unwrap() + 1..];
            let inner = inner.split("</td>").next().unwrap();
            strip_tags(inner)
        })
        .collect()
}

fn strip_tags(s: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// The exact size a cell shows in its title (`<span title="1234 bytes">`).
fn exact_bytes(html: &str, needle: &str) -> Vec<u64> {
    let tr = html.split("<tr>").find(|r| r.contains(needle)).unwrap();
    let tr = tr.split("</tr>").next().unwrap();
    tr.split("title=\"")
        .skip(1)
        .filter_map(|s| s.split(" bytes\"").next()?.parse().ok())
        .collect()
}

/// The manifest GETs of `repository` in the event log, once there are at least `want`.
fn wait_events(server: &Server, repository: &str, want: usize) -> Vec<Value> {
    let query = format!("repository={repository}&action=pull_manifest");
    let lines = common::events::events(server, &query, want);
    assert!(
        lines.len() >= want,
        "{} events of {repository}",
        lines.len()
    );
    lines
}

fn get_manifest(server: &Server, repo: &str, reference: &str, agent: &str) {
    let r = Server::client()
        .get(server.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Accept", common::OCI_MANIFEST)
        .header("User-Agent", agent)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "GET {repo}:{reference}");
}

fn push(server: &Server, repo: &str, tag: &str, seed: u64) -> Image {
    auth_common::push_image_as(server, repo, tag, seed, &Cred::None)
}

/// Pushes one more tag of `image`'s config and first layer and a new layer: two images
/// sharing two blobs. Returns (manifest digest, manifest bytes, the new layer).
fn push_sibling(
    server: &Server,
    repo: &str,
    tag: &str,
    image: &Image,
) -> (String, Vec<u8>, Vec<u8>) {
    let layer = common::random_bytes(5000, 77);
    let r = auth_common::post_blob_as(server, repo, &layer, &Cred::None);
    assert_eq!(r.status, 201);
    let manifest = oci::to_bytes(&oci::image_manifest_value(
        &image.config,
        &[&image.layers[0], &layer],
    ));
    let r = auth_common::put_manifest_as(server, repo, tag, &manifest, &Cred::None);
    assert_eq!(r.status, 201, "{}", r.describe());
    (sha256(&manifest), manifest, layer)
}

// The overview and a repository's page show what was pushed (tags, digests, sizes with each
// blob once) and what the event log says was pulled (manifest GETs answered 200; HEADs are
// not pulls).
#[test]
fn pages_show_repositories_tags_sizes_and_pull_counts() {
    let server = Server::start();
    let image = push(&server, "web/app", "v1", 1);
    let (v2_digest, v2_manifest, v2_layer) = push_sibling(&server, "web/app", "v2", &image);
    let other = push(&server, "web/other", "latest", 2);

    for _ in 0..3 {
        get_manifest(&server, "web/app", "v1", "webui-test/1.0");
    }
    get_manifest(&server, "web/app", &v2_digest, "webui-test/1.0");
    let r = Server::client()
        .head(server.url("/v2/web/app/manifests/v2"))
        .header("Accept", common::OCI_MANIFEST)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let missing = Server::client()
        .get(server.url("/v2/web/app/manifests/nope"))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    wait_events(&server, "web/app", 5);

    // Sizes: each image is its manifest, config and layers; the repository holds the shared
    // config and first layer once.
    let v1_size = (image.manifest.len()
        + image.config.len()
        + image.layers.iter().map(Vec::len).sum::<usize>()) as u64;
    let v2_size =
        (v2_manifest.len() + image.config.len() + image.layers[0].len() + v2_layer.len()) as u64;
    let stored = v1_size + (v2_manifest.len() + v2_layer.len()) as u64;

    // Repository, tags, stored, pulls 24 h, pulls 30 d, pulls (all time, from the usage
    // summary, which follows the log every second), clients, last pulled.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (overview, cells) = loop {
        let overview = page(&server, &format!("{UI}/"));
        let cells = row(&overview, ">web/app<");
        if cells[6] == "1" || Instant::now() > deadline {
            break (overview, cells);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(cells[0], "web/app");
    assert_eq!(cells[1], "2");
    assert_eq!(exact_bytes(&overview, ">web/app<"), vec![stored]);
    assert_eq!(cells[3], "4", "three GETs by tag, one by digest: {cells:?}");
    assert_eq!(cells[4], "4");
    assert_eq!(cells[5], "4");
    assert_eq!(cells[6], "1", "one client: {cells:?}");
    assert!(
        cells[7].contains("ago") || cells[7] == "just now",
        "{cells:?}"
    );
    let cells = row(&overview, ">web/other<");
    assert_eq!(cells[1], "1");
    let other_size = (other.manifest.len()
        + other.config.len()
        + other.layers.iter().map(Vec::len).sum::<usize>()) as u64;
    assert_eq!(exact_bytes(&overview, ">web/other<"), vec![other_size]);
    assert_eq!(&cells[3..7], ["0", "0", "0", "0"]);
    assert_eq!(cells[7], "—", "never pulled");
    // The overview's n= pages.
    let first = page(&server, &format!("{UI}/?n=1"));
    assert!(first.contains(">web/app<") && !first.contains(">web/other<"));
    assert!(first.contains("last=web/app"), "a next page link");

    let repo = page(&server, &format!("{UI}/repository?name=web/app"));
    assert!(repo.contains("<h1>web/app</h1>"));
    // Tag, digest, kind, size, pushed, pulls 24 h, pulls 30 d, last pulled.
    let v1 = row(&repo, ">v1<");
    assert_eq!(v1[0], "v1");
    assert!(
        repo.contains(&format!("title=\"{}\"", image.digest)),
        "full digest"
    );
    assert_eq!(v1[1], format!("sha256:{}", &image.digest[7..19]));
    assert_eq!(v1[2], "image");
    assert_eq!(exact_bytes(&repo, ">v1<"), vec![v1_size]);
    assert_eq!(&v1[5..7], ["3", "3"]);
    let v2 = row(&repo, ">v2<");
    assert_eq!(exact_bytes(&repo, ">v2<"), vec![v2_size]);
    assert_eq!(
        &v2[5..7],
        ["1", "1"],
        "pulled by digest once, HEAD not counted"
    );
    // The charts: four pulls in this hour and today.
    assert_eq!(repo.matches("<svg").count(), 2);
    assert!(repo.contains("<title>4</title>"), "a bar of 4 pulls");
    assert!(repo.contains(&format!("{UI}/events?repository=web/app")));

    // Unknown and invalid repositories are the API's errors.
    let r = Server::client()
        .get(server.url(&format!("{UI}/repository?name=web/none")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("NAME_UNKNOWN"));
    let r = Server::client()
        .get(server.url(&format!("{UI}/repository?name=..%2Fetc")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("NAME_INVALID"));
    let r = Server::client()
        .get(server.url(&format!("{UI}/nope")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = Server::client()
        .post(server.url(&format!("{UI}/")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    // Not a page of ours: the data plane's 404 as before.
    let r = Server::client()
        .get(server.url("/v2/_lighter/uix"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
}

// The event stream: newest first, filtered by repository, paged with an "Older" link that
// continues exactly where the page ended.
#[test]
fn the_event_stream_is_newest_first_filtered_and_paged() {
    let server = Server::start();
    push(&server, "web/stream", "v1", 3);
    push(&server, "web/quiet", "v1", 4);
    for i in 0..7 {
        get_manifest(&server, "web/stream", "v1", &format!("agent-{i}"));
    }
    get_manifest(&server, "web/quiet", "v1", "agent-quiet");
    wait_events(&server, "web/stream", 7);
    wait_events(&server, "web/quiet", 1);

    let mut agents = Vec::new();
    let mut path = format!("{UI}/events?repository=web/stream&n=3");
    for _ in 0..10 {
        let html = page(&server, &path);
        assert!(!html.contains("agent-quiet"), "filtered by repository");
        // In the order the page shows them.
        let mut on_page: Vec<(usize, u32)> = (0..7)
            .filter_map(|i| html.find(&format!(">agent-{i}<")).map(|at| (at, i)))
            .collect();
        on_page.sort();
        agents.extend(on_page.into_iter().map(|(_, i)| i));
        match html.split("href=\"").find_map(|s| {
            let link = s.split('"').next()?;
            link.contains("before=").then(|| link.replace("&amp;", "&"))
        }) {
            Some(next) => path = next,
            None => break,
        }
    }
    // The log's order, newest first (lines are in time order but for a record that reached its
    // ring late, on a busy machine: the page follows the log).
    let mut logged: Vec<u32> = wait_events(&server, "web/stream", 7)
        .iter()
        .filter_map(|e| {
            e["user_agent"]
                .as_str()?
                .strip_prefix("agent-")?
                .parse()
                .ok()
        })
        .collect();
    logged.reverse();
    assert_eq!(agents, logged, "the log's lines newest first, each once");
    agents.sort();
    assert_eq!(agents, [0, 1, 2, 3, 4, 5, 6]);
    let all = page(&server, &format!("{UI}/events"));
    assert!(all.contains(">agent-quiet<") && all.contains(">agent-6<"));
    let bad = Server::client()
        .get(server.url(&format!("{UI}/events?before=yesterday")))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
}

// A page reads at most `ui_events_scan_max` lines of the log, and says when that cut its
// counts short.
#[test]
fn pull_counts_stop_at_ui_events_scan_max_and_say_so() {
    let server = Server::start_args(&["--ui-events-scan-max", "3"]);
    push(&server, "web/capped", "v1", 7);
    for _ in 0..5 {
        get_manifest(&server, "web/capped", "v1", "capped");
    }
    wait_events(&server, "web/capped", 5);
    let overview = page(&server, &format!("{UI}/"));
    assert_eq!(&row(&overview, ">web/capped<")[3..5], ["3", "3"]);
    assert!(
        overview.contains("newest 3 lines of the event log"),
        "{overview}"
    );
    let repo = page(&server, &format!("{UI}/repository?name=web/capped"));
    assert_eq!(&row(&repo, ">v1<")[5..7], ["3", "3"]);
    assert!(repo.contains("newest 3 lines of the event log"));
    // A filter nothing matches reads 3 lines, not the whole log, and offers to go on.
    let events = page(&server, &format!("{UI}/events?repository=web/none"));
    assert!(events.contains("No events match."));
    assert!(events.contains("Read 3 lines of the event log"), "{events}");
    assert!(events.contains("before="), "an Older link");
}

// The out-of-date list: a Deployment's pod admitted by the webhook (a real AdmissionReview
// fixture), then its tag moved by a push: the page lists the container with the digest it runs
// and the one its tag points to now; the overview says how many are out of date.
#[test]
fn the_out_of_date_page_lists_workloads_whose_tag_moved() {
    let (data, certs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    common::tls::make_ca(certs.path());
    common::tls::make_leaf(certs.path(), "tls", "lighter-webhook", 1001);
    let config = certs.path().join("lighter.toml");
    std::fs::write(
        &config,
        "[admission]\nregistry_hosts = [\"localhost:5000\"]\n",
    )
    .unwrap();
    let path = |name: &str| certs.path().join(name).to_str().unwrap().to_owned();
    let server = common::Launch::new(data.path())
        .args(&[
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-tls-cert-path",
            &path("tls.crt"),
            "--webhook-tls-key-path",
            &path("tls.key"),
            "--config",
            &path("lighter.toml"),
        ])
        .start();
    let marker = "admission webhooks on https://";
    let line = server
        .wait_for_log(marker, Duration::from_secs(30))
        .expect("the webhook's address");
    let addr: String = line[line.find(marker).unwrap() + marker.len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':'))
        .collect();
    let web1 = oci::push_image(&server, "app/web", Some("1.0"), 1).digest;
    oci::push_image(&server, "app/migrate", Some("1.0"), 2);

    let review: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/admission/reviews/pod-of-deployment.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let r = common::tls::https_client(&certs.path().join("ca.crt"), true)
        .post(format!("https://{addr}/validate"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&review).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(page(&server, &format!("{UI}/outdated")).contains("No workload runs an image"));

    let web2 = oci::push_image(&server, "app/web", Some("1.0"), 3).digest;
    let html = page(&server, &format!("{UI}/outdated"));
    // Namespace, workload, object, container, image, runs, tag now, tag moved.
    let cells = row(&html, "localhost:5000/app/web:1.0");
    assert_eq!(cells[0], "shop");
    assert_eq!(cells[1], "Deployment/web");
    assert_eq!(cells[2], "Pod/web-6b7f9c5d4-k8x2p");
    assert_eq!(cells[3], "web");
    assert_eq!(cells[5], web1[..19]);
    assert_eq!(cells[6], web2[..19]);
    assert!(
        cells[7].ends_with("ago") || cells[7] == "just now",
        "{cells:?}"
    );
    assert!(html.contains(&format!("{UI}/repository?name=app/web")));
    assert!(!html.contains("app/migrate"), "only what is out of date");
    let all = page(&server, &format!("{UI}/outdated?all=1"));
    let migrate = row(&all, "localhost:5000/app/migrate:1.0");
    assert_eq!(migrate[3], "migrate (init)");
    assert_eq!(migrate[6], "same");
    let overview = page(&server, &format!("{UI}/"));
    assert!(overview.contains("1 containers</span> run an image whose tag has moved"));
    if let Some(chromium) = chromium() {
        screenshot(
            chromium,
            &server.url(&format!("{UI}/outdated?all=1")),
            "outdated",
        );
    }
}

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| common::clients::on_path(c))
}

/// A screenshot of `url` as `<target tmp>/webui/<name>.png`, for people to look at.
fn screenshot(chromium: &str, url: &str, name: &str) {
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("webui");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join(format!("{name}.png"));
    chromium_run(
        chromium,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,900",
            url,
        ],
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "{name}: a PNG");
    eprintln!("screenshot: {}", png.display());
}

// Whatever a client sends ends up as text on the page, never as markup: a user agent and a
// filter value made to break out of their element or attribute.
#[test]
fn hostile_user_agents_and_filters_are_escaped() {
    let server = Server::start();
    push(&server, "web/hostile", "v1", 5);
    let agent = "<script>alert('ua')</script><img src=x onerror=alert(1)>\"'&";
    get_manifest(&server, "web/hostile", "v1", agent);
    wait_events(&server, "web/hostile", 1);

    let html = page(&server, &format!("{UI}/events?repository=web/hostile"));
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<img"), "{html}");
    assert!(html.contains(
        "&lt;script&gt;alert(&#39;ua&#39;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;"
    ));
    // A filter value is echoed into the form's input: it stays inside its attribute.
    let filter = "\"><script>alert(2)</script>";
    let html = page(
        &server,
        &format!("{UI}/events?client={}", urlencode(filter)),
    );
    assert!(!html.contains("<script"), "{html}");
    assert!(html.contains("value=\"&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;\""));
    assert!(html.contains("client=%22%3E%3Cscript%3Ealert%282%29%3C/script%3E"));
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// With access control on, the page needs `admin` of `_lighter/ui`; a caller without
// credentials is challenged with Basic, which a browser answers by asking for a password.
#[test]
fn the_page_needs_admin_and_challenges_browsers_with_basic() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        tables: "[[auth.rules]]\nprefix = \"_lighter/ui\"\nadmin = [\"user:ci\"]\n".into(),
        ..Opts::default()
    });
    let get = |cred: &Cred| {
        cred.apply(Server::client().get(server.url(&format!("{UI}/"))))
            .send()
            .unwrap()
    };
    let r = get(&Cred::None);
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"Lighter\", charset=\"UTF-8\""
    );
    assert!(r.text().unwrap().contains("UNAUTHORIZED"));
    let r = get(&Cred::basic(BOB));
    assert_eq!(r.status(), 403);
    assert!(r.text().unwrap().contains("DENIED"));
    let r = get(&Cred::basic(("ci", "wrong")));
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    let r = get(&Cred::basic(CI));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    // The registry API's challenge is still Bearer.
    let r = Server::client()
        .get(server.url("/v2/_lighter/events"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer "));
}

// Headless Chromium loads each page as a browser does: the DOM it builds has the repository,
// its tag and the hostile user agent as text (no element made of it), and a screenshot of each
// page is written to the target directory for people to look at.
#[test]
fn chromium_renders_the_pages() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let server = Server::start();
    push(&server, "web/browser", "v1", 6);
    get_manifest(&server, "web/browser", "v1", "<b id=\"injected\">ua</b>");
    wait_events(&server, "web/browser", 1);
    for (name, path, wants) in [
        (
            "overview",
            format!("{UI}/"),
            vec!["web/browser", "Pulls 24 h"],
        ),
        (
            "repository",
            format!("{UI}/repository?name=web/browser"),
            vec!["web/browser", ">v1<", "<svg"],
        ),
        (
            "events",
            format!("{UI}/events?repository=web/browser"),
            vec!["pull_manifest", "&lt;b id=\"injected\"&gt;ua&lt;/b&gt;"],
        ),
    ] {
        let url = server.url(&path);
        let dom = chromium_run(chromium, &["--dump-dom", &url]);
        for w in wants {
            assert!(dom.contains(w), "{name}: {w} not in the DOM: {dom}");
        }
        assert!(!dom.contains("id=\"injected\">"), "{name}: {dom}");
        screenshot(chromium, &url, name);
    }
}

/// Runs headless Chromium (in a profile of its own) with `args`, bounded in time; its stdout.
fn chromium_run(chromium: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start chromium");
    // Read while it runs: a DOM larger than a pipe's buffer would block it otherwise.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).map(|_| out)
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium {args:?}: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap().unwrap()
}
