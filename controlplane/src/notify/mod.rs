//! Notifications: what the control plane records as events (`events::record`: pushes, tag
//! moves, deletes, mirror fetches, tag watches) becomes a CloudEvents 1.0 JSON event (structured
//! mode) for each `[[notifications]]` endpoint whose filters match.
//!
//! The push path only turns the event into a line and appends it to a bounded queue in memory
//! ([`Notifier::offer`]); a writer thread appends those lines to the durable queue under
//! `<data-dir>/notifications/` and one task per endpoint delivers them in order, at least once,
//! with retries and exponential backoff ([`queue`]). `watch.rs`: tag watches.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::now_us;
use crate::events::Event;

pub mod queue;
pub mod watch;

/// The actions an endpoint may ask for (`actions = [...]`).
pub const ACTIONS: [&str; 5] = ["push", "move", "delete", "mirror", "watch"];

/// The header carrying the body's HMAC-SHA256 (`sha256=<hex>`), when the endpoint has a secret.
pub const SIGNATURE_HEADER: &str = "x-lighter-signature";

/// One `[[notifications]]` endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Where events are POSTed (`http://` or `https://`).
    pub url: String,
    /// Which actions it hears about (`push`, `move`, `delete`, `mirror`, `watch`); empty or
    /// left out: all of them.
    #[serde(default)]
    pub actions: Vec<String>,
    /// Repository prefixes (at a component boundary: `team/` and `team` match `team/app`);
    /// empty or left out: every repository.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// File holding the HMAC-SHA256 secret (trailing newlines ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding the secret, if not in a file.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// PEM file with extra CA certificates to trust for an `https://` endpoint.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Endpoint {
    /// Whether this endpoint wants an event of `action` in `repository`.
    pub fn wants(&self, action: &str, repository: &str) -> bool {
        (self.actions.is_empty() || self.actions.iter().any(|a| a == action))
            && (self.repositories.is_empty()
                || self
                    .repositories
                    .iter()
                    .any(|p| under_prefix(repository, p)))
    }

    /// The URL without its query (which may carry a token), for logs and metrics.
    pub fn label(&self) -> &str {
        self.url.split(['?', '#']).next().unwrap_or_default()
    }

    /// The name of its cursor file: a hash of its URL, so reordering the endpoints keeps each
    /// one's place in the queue.
    pub fn key(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, self.url.as_bytes());
        hex(&d.as_ref()[..8])
    }

    fn secret(&self) -> Result<Option<ring::hmac::Key>, String> {
        let secret = match (&self.secret_file, &self.secret_env) {
            (Some(f), _) => std::fs::read_to_string(f)
                .map_err(|e| {
                    format!(
                        "notifications {}: cannot read secret_file {}: {e}",
                        self.label(),
                        f.display()
                    )
                })?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                format!(
                    "notifications {}: secret_env {var} is not set",
                    self.label()
                )
            })?,
            (None, None) => return Ok(None),
        };
        if secret.is_empty() {
            return Err(format!(
                "notifications {}: the secret is empty",
                self.label()
            ));
        }
        Ok(Some(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            secret.as_bytes(),
        )))
    }
}

/// `repository` is `prefix` or under it, at a component boundary.
fn under_prefix(repository: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty()
        || repository == p
        || (repository.starts_with(p) && repository.as_bytes().get(p.len()) == Some(&b'/'))
}

/// Rejects endpoints that cannot work, naming the field.
pub fn validate(endpoints: &[Endpoint]) -> Result<(), String> {
    for (i, e) in endpoints.iter().enumerate() {
        if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
            return Err(format!(
                "notifications[{i}].url {:?} must start with http:// or https://",
                e.url
            ));
        }
        if endpoints[..i].iter().any(|o| o.url == e.url) {
            return Err(format!(
                "notifications[{i}].url {:?} is configured twice",
                e.url
            ));
        }
        if let Some(a) = e.actions.iter().find(|a| !ACTIONS.contains(&a.as_str())) {
            return Err(format!(
                "notifications[{i}].actions: {a:?} is not one of {}",
                ACTIONS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The notification action of a recorded event, its repository and its data; None: not one
/// endpoints hear about (pulls, admission, a fetch that failed, a tag pushed the first time,
/// which its push already tells).
pub fn classify(event: &Event) -> Option<(&'static str, String, Map<String, Value>)> {
    let f = event.fields();
    let text = |k: &str| f.get(k).and_then(Value::as_str);
    let action = match event.action() {
        "push_manifest" => "push",
        "move_tag" if f.contains_key("old_digest") => "move",
        "delete_tag" | "delete_manifest" | "delete_blob" => "delete",
        "mirror_fetch" if text("outcome") == Some("cached") => "mirror",
        "watch_tag" => "watch",
        _ => return None,
    };
    let repository = text("repository")?.to_owned();
    let mut data = Map::new();
    data.insert("action".into(), event.action().into());
    data.insert("repository".into(), repository.clone().into());
    // A reference that is a digest is not a tag (tags cannot hold ':').
    let tag = text("reference").filter(|r| !r.contains(':'));
    data.insert("tag".into(), tag.into());
    // Always there (null when unknown: anonymous, a delete that knows no media type).
    for (from, to) in [
        ("digest", "digest"),
        ("old_digest", "old_digest"),
        ("media_type", "media_type"),
        ("bytes", "size"),
        ("identity", "identity"),
    ] {
        data.insert(to.into(), f.get(from).cloned().unwrap_or(Value::Null));
    }
    // There when the event has them.
    for key in [
        "client",
        "user_agent",
        "upstream",
        "kind",
        "subject",
        "prefetched_bytes",
    ] {
        if let Some(v) = f.get(key) {
            data.insert(key.into(), v.clone());
        }
    }
    Some((action, repository, data))
}

/// The CloudEvents 1.0 JSON of a classified event.
pub fn cloud_event(
    action: &str,
    data: Map<String, Value>,
    id: &str,
    time_unix_us: u64,
    source: &str,
) -> Value {
    let repository = data["repository"].as_str().unwrap_or_default();
    let subject = match (data["tag"].as_str(), data["digest"].as_str()) {
        (Some(tag), _) => format!("{repository}:{tag}"),
        (None, Some(digest)) => format!("{repository}@{digest}"),
        (None, None) => repository.to_owned(),
    };
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": format!("io.lighter.{action}"),
        "time": crate::events::rfc3339(time_unix_us),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    })
}

/// `sha256=<hex>` of `body` under `key`.
pub fn signature(key: &ring::hmac::Key, body: &[u8]) -> String {
    format!("sha256={}", hex(ring::hmac::sign(key, body).as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The configured endpoints and their queue.
pub struct Notifier {
    queue: Arc<queue::Queue>,
    source: String,
    /// With the start time, makes event ids unique across restarts.
    next_id: AtomicU64,
    started_us: u64,
}

impl Notifier {
    /// Opens the queue, starts its writer and one delivery task per endpoint (on the current
    /// tokio runtime); None without endpoints.
    pub fn start(
        layout: &lighter_layout::Layout,
        config: &crate::config::Config,
    ) -> Result<Option<Arc<Notifier>>, String> {
        if config.notifications.is_empty() {
            return Ok(None);
        }
        let mut targets = Vec::with_capacity(config.notifications.len());
        for e in &config.notifications {
            let mut builder = reqwest::Client::builder()
                .timeout(std::time::Duration::from_millis(
                    config.notifications_request_timeout_ms,
                ))
                .user_agent(concat!("lighter/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none());
            if let Some(ca) = &e.ca_file {
                let pem = std::fs::read(ca).map_err(|err| {
                    format!(
                        "notifications {}: cannot read ca_file {}: {err}",
                        e.label(),
                        ca.display()
                    )
                })?;
                for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|err| {
                    format!(
                        "notifications {}: ca_file {}: {err}",
                        e.label(),
                        ca.display()
                    )
                })? {
                    builder = builder.add_root_certificate(cert);
                }
            }
            let http = builder.build().map_err(|err| {
                format!(
                    "notifications {}: cannot build the HTTP client: {err}",
                    e.label()
                )
            })?;
            targets.push(queue::Target {
                endpoint: e.clone(),
                secret: e.secret()?,
                http,
            });
        }
        let queue = queue::Queue::open(
            layout.notifications_dir(),
            config.notifications_queue_max_bytes,
            targets,
        )
        .map_err(|e| {
            format!(
                "cannot open the notification queue in {}: {e}",
                layout.notifications_dir().display()
            )
        })?;
        queue::start(
            &queue,
            std::time::Duration::from_millis(config.notifications_retry_initial_ms),
            std::time::Duration::from_millis(config.notifications_retry_max_ms),
        );
        for e in &config.notifications {
            tracing::info!(endpoint = e.label(), actions = ?e.actions, repositories = ?e.repositories, "notifying");
        }
        Ok(Some(Arc::new(Notifier {
            queue,
            source: config.notifications_source.clone(),
            next_id: AtomicU64::new(0),
            started_us: now_us(),
        })))
    }

    /// Queues `event` for the endpoints if it is one they may hear about. Never waits for the
    /// disk or the network: a line goes to memory, the writer thread does the rest.
    pub fn offer(&self, event: &Event) {
        let Some((action, repository, data)) = classify(event) else {
            return;
        };
        if !self.queue.wanted(action, &repository) {
            return;
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}-{n}", self.started_us);
        let ce = cloud_event(action, data, &id, now_us(), &self.source);
        self.queue
            .push(serde_json::to_vec(&ce).expect("JSON of JSON values"));
    }

    /// Waits (a little) for the writer to put what memory holds on disk: at shutdown.
    pub fn flush(&self) {
        self.queue.flush(std::time::Duration::from_secs(2));
    }

    /// The queue's metrics, appended in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        self.queue.render_metrics(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(actions: &[&str], repositories: &[&str]) -> Endpoint {
        Endpoint {
            url: "http://127.0.0.1:1/hook".into(),
            actions: actions.iter().map(|s| s.to_string()).collect(),
            repositories: repositories.iter().map(|s| s.to_string()).collect(),
            secret_file: None,
            secret_env: None,
            ca_file: None,
        }
    }

    #[test]
    fn filters_by_action_and_prefix_at_a_component_boundary() {
        let all = endpoint(&[], &[]);
        assert!(all.wants("push", "a/b") && all.wants("mirror", "x"));
        let e = endpoint(&["push", "delete"], &["release/", "team"]);
        for (action, repo, wanted) in [
            ("push", "release/app", true),
            ("delete", "release", true),
            ("push", "team/x/y", true),
            ("push", "teamx/app", false),
            ("push", "releases/app", false),
            ("move", "release/app", false),
            ("mirror", "team/app", false),
        ] {
            assert_eq!(e.wants(action, repo), wanted, "{action} {repo}");
        }
    }

    #[test]
    fn classifies_what_endpoints_hear_about() {
        let push = Event::new("push_manifest")
            .with("repository", "team/app")
            .with("reference", "v1")
            .with("digest", "sha256:aa")
            .with("bytes", 12u64)
            .with("media_type", "application/vnd.oci.image.manifest.v1+json");
        let (action, repo, data) = classify(&push).unwrap();
        assert_eq!((action, repo.as_str()), ("push", "team/app"));
        assert_eq!(data["tag"], "v1");
        assert_eq!(data["size"], 12);
        assert_eq!(data["old_digest"], Value::Null);
        let ce = cloud_event(action, data, "id-1", 1_700_000_000_000_000, "lighter");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "io.lighter.push");
        assert_eq!(ce["subject"], "team/app:v1");
        assert_eq!(ce["time"], "2023-11-14T22:13:20.000000Z");

        let by_digest = Event::new("push_manifest")
            .with("repository", "team/app")
            .with("reference", "sha256:aa")
            .with("digest", "sha256:aa");
        let (_, _, data) = classify(&by_digest).unwrap();
        assert_eq!(data["tag"], Value::Null);
        let ce = cloud_event("push", data, "id", 0, "lighter");
        assert_eq!(ce["subject"], "team/app@sha256:aa");

        let created = Event::new("move_tag")
            .with("repository", "a")
            .with("reference", "v1")
            .with("digest", "sha256:aa");
        assert!(classify(&created).is_none(), "a new tag is its push's news");
        let moved = created.with("old_digest", "sha256:bb");
        assert_eq!(classify(&moved).unwrap().0, "move");
        let failed = Event::new("mirror_fetch")
            .with("repository", "a")
            .with("outcome", "failed");
        assert!(classify(&failed).is_none());
        assert!(classify(&Event::new("pull_blob").with("repository", "a")).is_none());
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_issues_configuration_works_as_written() {
        let text = r#"
[[notifications]]
url = "https://hooks.example/lighter"
actions = ["push", "delete"]
"#;
        let c: crate::config::Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        let e = &c.notifications[0];
        assert!(e.wants("push", "any/repo") && e.wants("delete", "x"));
        assert!(!e.wants("move", "x") && !e.wants("mirror", "x"));
        assert_eq!(e.label(), "https://hooks.example/lighter");
    }

    #[test]
    fn validate_names_the_field() {
        let mut e = endpoint(&["push", "pull"], &[]);
        assert!(validate(std::slice::from_ref(&e))
            .unwrap_err()
            .contains("notifications[0].actions"));
        e.actions = vec!["push".into()];
        assert!(validate(&[e.clone(), e.clone()])
            .unwrap_err()
            .contains("configured twice"));
        e.url = "ftp://x".into();
        assert!(validate(&[e]).unwrap_err().contains("notifications[0].url"));
    }
}
