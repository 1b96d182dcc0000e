//! Configuration: embedded defaults, then a TOML file (`--config`), then environment variables
//! (`LIGHTER_<FIELD>`), then command-line flags; later wins. Every limit is a named field with a
//! unit in its name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the registry port.
    pub listen: SocketAddr,
    /// Where blobs, manifests, tags and upload sessions live.
    pub data_dir: PathBuf,
    /// Largest manifest accepted on push (the spec asks for at least 4 MiB).
    pub manifest_size_max_bytes: u64,
    /// Upload sessions open at once; more get 429 TOOMANYREQUESTS.
    pub upload_sessions_max: usize,
    /// An upload session that receives nothing for this long is dropped with its bytes.
    pub upload_session_idle_timeout_ms: u64,
    /// Largest request head (request line and headers); larger gets 431. At least 8192.
    pub request_header_size_max_bytes: usize,
    /// Time a client has to send a whole request head.
    pub request_header_timeout_ms: u64,
    /// Longest pause while receiving a request body before the request is failed.
    pub request_body_idle_timeout_ms: u64,
    /// Slowest average pace of a request body, counted once `request_body_idle_timeout_ms` has
    /// passed since its start; a slower body fails (408), so a byte now and then cannot hold a
    /// connection forever. 0: no minimum (only the idle timeout).
    pub request_body_rate_min_bytes_per_sec: u64,
    /// Longest pause while sending an answer: a client that takes no byte of it for this long
    /// has its connection closed (nginx's `send_timeout`), so one that stops reading cannot
    /// hold a connection and its answer's buffers forever.
    pub response_idle_timeout_ms: u64,
    /// After answering a request whose body it did not read to the end (an early error), the
    /// control plane reads and discards what the client still sends for up to this long
    /// before closing, so the client sees the answer instead of a connection reset (nginx's
    /// lingering close). 0: close at once.
    pub lingering_close_ms: u64,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub connections_max: usize,
    /// Most entries in one page of the tag list, the catalog or the referrers list.
    pub list_page_size_max: usize,
    /// Most lines of the event log one page of the web page reads (newest first) to count
    /// pulls; older pulls go uncounted, and the page says so.
    pub ui_events_scan_max: u64,
    /// On SIGTERM, time given to in-flight requests before the process exits.
    pub shutdown_grace_ms: u64,
    /// Unix socket on which the control plane takes connections handed over by the data plane.
    /// Empty: `<data_dir>/control.sock`.
    pub control_socket_path: PathBuf,
    /// Optional TCP address where the control plane also serves the whole API directly
    /// (debugging, or running without the data plane).
    pub control_listen: Option<SocketAddr>,
    /// Data plane threads, one per core; 0: one per CPU the process may use.
    pub cores: usize,
    /// Connections each data plane core serves at once; more are closed at accept.
    pub connections_per_core_max: usize,
    /// A connection with no request in progress, or whose client stops reading a response, is
    /// closed after this long.
    pub idle_timeout_ms: u64,
    /// Data plane event loop: `auto` (io_uring, else epoll), `io_uring` or `epoll`.
    pub io_engine: String,
    /// Most bytes a connection's socket holds queued but not yet sent (TCP_NOTSENT_LOWAT):
    /// the data plane sends more only as the network takes it, so the kernel's transmit work
    /// runs on the data plane's core rather than in the receiver's acknowledgements, and a slow
    /// client cannot pin megabytes of socket buffer. 0: the kernel's default (no limit).
    pub send_unsent_max_bytes: u64,
    /// `text` (one human-readable line per event) or `json` (one JSON object per line, for log
    /// collectors), both on standard error.
    pub log_format: String,
    /// Records each data plane core's event ring holds until the control plane drains it (every
    /// 250 ms; a full ring drops and counts). 0: no event log, no data plane counters.
    pub events_ring_records: u64,
    /// The event log's size on disk: the oldest files go past it.
    pub events_retention_bytes: u64,
    /// The event log's age: files last written longer ago go.
    pub events_retention_ms: u64,
    /// One file of the event log grows to this size, then the next starts.
    pub events_file_max_bytes: u64,
    /// An inventory entry (a container of a pod or workload the admission webhook saw) goes
    /// this long after it was last seen, if no deletion of its object removed it before.
    pub inventory_retention_ms: u64,
    /// Most entries the inventory holds; past it, the least recently seen go.
    pub inventory_entries_max: usize,
    /// The control plane's own events (pushes, deletes, mirror fetches, ...) held until the
    /// next drain writes them; a full queue drops and counts (a request never waits for the
    /// log).
    pub events_queue_records: u64,
    /// Most entries (repositories, tags and digests) the usage summary keeps; the least
    /// recently pulled tenth goes when full.
    pub usage_entries_max: usize,
    /// The usage summary is saved to `events/usage.json` this often (while it changes).
    pub usage_save_interval_ms: u64,
    /// Run a garbage collection (removing content no repository holds) this often; also on
    /// demand with `POST /v2/_lighter/gc` or `lighter gc`. 0: only on demand.
    pub gc_interval_ms: u64,
    /// Where pushed content is kept durably (`[storage.s3]`); unset: the data directory alone.
    pub storage: Storage,
    /// Registries mirrored by the pull-through cache.
    pub upstreams: Vec<Upstream>,
    /// Most bytes of content the mirrors (and, with `[storage.s3]`, the cache of the bucket)
    /// may hold; the least recently pulled blobs are evicted past it. 0: no cap.
    pub cache_size_max_bytes: u64,
    /// Mirrored repositories (or prefixes of them) whose content is never evicted.
    pub cache_pinned_repositories: Vec<String>,
    /// HTTPS address of the admission webhooks (`/validate`, `/mutate`); unset: no webhooks.
    pub webhook_listen: Option<SocketAddr>,
    /// PEM certificate chain of the webhook server (reloaded when the file changes).
    pub webhook_tls_cert_path: PathBuf,
    /// PEM private key of the webhook server (reloaded when the file changes).
    pub webhook_tls_key_path: PathBuf,
    /// The admission policy and image rewriting.
    pub admission: crate::admission::policy::AdmissionConfig,
    /// The node tier: other nodes' Lighters (`http://HOST:PORT`, this node's own address may be
    /// among them). Mirrored blobs are fetched through their owner among the peers, so a
    /// cluster fetches each blob from upstream once. Empty (and no `peers_dns`): no peers.
    pub peers: Vec<String>,
    /// A DNS name (`NAME` or `NAME:PORT`, e.g. a headless Service) whose A and AAAA records
    /// are peers too, re-resolved every `peers_refresh_ms`. The port defaults to `listen`'s.
    pub peers_dns: Option<String>,
    /// How often `peers_dns` is resolved again (nodes joining and leaving).
    pub peers_refresh_ms: u64,
    /// This node as its peers reach it (`http://IP:PORT`). Unset: the peer whose address is
    /// one of this host's.
    pub peer_address: Option<String>,
    /// A transfer from a peer with no progress for this long is abandoned and resumed from
    /// another source (Range from the byte already received).
    pub peer_stall_timeout_ms: u64,
    /// Most bytes per second this node sends to peers, all transfers together. 0: no cap.
    pub peer_upload_max_bytes_per_sec: u64,
    /// Peers a blob's owner sends to one node holding (or receiving) that blob before sending
    /// to another: 1 makes a wave of nodes a pipelined chain, each node's uplink carrying one
    /// copy.
    pub peer_fanout_max: u32,
    /// A blob at least this large that several nodes already hold whole is fetched from up to
    /// four of them at once, a byte range from each, and verified as a whole. 0: never.
    pub peer_range_parallel_min_bytes: u64,
    /// containerd's content store (`.../io.containerd.content.v1.content`), mounted read-only:
    /// blobs it holds are served from there (to peers and clients), and Lighter's own copy of
    /// them is dropped. Unset: Lighter keeps its own cache only.
    pub containerd_content_dir: Option<PathBuf>,
    /// `/readyz` fails while the data directory's file system has less free space than this.
    pub disk_free_min_bytes: u64,
    /// PEM certificate chain of the registry port: set with `tls_key_path`, the port speaks
    /// HTTPS only (both files reloaded when they change).
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key of the registry port.
    pub tls_key_path: Option<PathBuf>,
    /// Endpoints that receive a CloudEvent for each push, tag move, delete, mirror fetch and
    /// tag watch move their filters match (`[[notifications]]`, see `notify::Endpoint`).
    pub notifications: Vec<crate::notify::Endpoint>,
    /// The notification queue's size on disk; past it the oldest events are dropped (and
    /// counted per endpoint).
    pub notifications_queue_max_bytes: u64,
    /// First wait before a failed delivery is tried again; it doubles up to
    /// `notifications_retry_max_ms`.
    pub notifications_retry_initial_ms: u64,
    pub notifications_retry_max_ms: u64,
    /// Time an endpoint has to answer one delivery.
    pub notifications_request_timeout_ms: u64,
    /// The CloudEvents `source` of every notification (a URI reference naming this registry).
    pub notifications_source: String,
    /// Mirrored tags resolved upstream on a period, prefetched and announced when they move
    /// (`[[tag_watches]]`, see `notify::watch::TagWatch`).
    pub tag_watches: Vec<crate::notify::watch::TagWatch>,
    /// Access control: identities, tokens and rules (see `lighter_access::AuthConfig`). No
    /// rules: anyone may do anything.
    pub auth: lighter_access::AuthConfig,
    /// Tags that cannot be moved or deleted once written (`[[immutable_tags]]`).
    pub immutable_tags: Vec<crate::immutable::ImmutableRule>,
    /// Which tags are removed by rule (`[[retention]]`), and how often.
    pub retention: Vec<crate::retention::RetentionRule>,
    /// Apply the retention rules this often; also on demand with `POST
    /// /v2/_lighter/retention` or `lighter retention`. 0: only on demand.
    pub retention_interval_ms: u64,
}

/// The durable store of pushed content.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// An S3-compatible bucket: every repository outside the mirrors is kept there, and the
    /// data directory becomes a bounded cache of it (replicas over one bucket).
    pub s3: Option<S3>,
}

/// `[storage.s3]`: the bucket and how to reach it. Credentials come from `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), or from the files named here.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3 {
    pub bucket: String,
    /// Base URL of an S3-compatible server (`http://127.0.0.1:3900`); unset: AWS for `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// `http://endpoint/bucket/key` rather than `http://bucket.endpoint/key`.
    #[serde(default)]
    pub path_style: bool,
    /// A tag pushed to another replica is served here at most this long after (the replica
    /// that took the push serves it at once).
    #[serde(default = "default_s3_tag_ttl_ms")]
    pub tag_ttl_ms: u64,
    /// File holding the access key id (trailing newlines ignored), instead of the environment.
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    /// File holding the secret access key, instead of the environment.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// PEM file with extra CA certificates to trust for `endpoint`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest a request to the bucket may take (a part of a multipart upload included;
    /// blob downloads are bounded by `body_idle_timeout_ms` instead).
    #[serde(default = "default_response_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest pause in a blob download from the bucket before it is abandoned.
    #[serde(default = "default_response_timeout_ms")]
    pub body_idle_timeout_ms: u64,
    /// Blobs larger than this are uploaded in parts of this size (S3's minimum is 5 MiB); at
    /// most `S3_PARTS_IN_FLIGHT` parts are held in memory at once.
    #[serde(default = "default_s3_part_size_bytes")]
    pub part_size_bytes: u64,
    /// A failed request to the bucket is tried again this many times (with backoff) before a
    /// push fails with 503.
    #[serde(default = "default_s3_retries_max")]
    pub retries_max: usize,
    /// Garbage collection of the bucket removes unlinked content only once it is older (by the
    /// store's last-modified) than this; a replica linking content already in the bucket must
    /// finish within half of it after refreshing the content's time, or the push fails.
    #[serde(default = "default_s3_gc_grace_ms")]
    pub gc_grace_ms: u64,
    /// How often a replica reads the journal of deletes made through other replicas (and
    /// drops what they deleted from its cache): the bound on serving a deleted manifest,
    /// blob or tag after its delete was acknowledged elsewhere.
    #[serde(default = "default_s3_deletes_poll_ms")]
    pub deletes_poll_ms: u64,
    /// Entries of the journal of deletes older than this are removed; a replica stopped
    /// longer than this may keep serving what was deleted meanwhile (until evicted).
    #[serde(default = "default_s3_deletes_retention_ms")]
    pub deletes_retention_ms: u64,
}

fn default_s3_gc_grace_ms() -> u64 {
    3_600_000
}

fn default_s3_deletes_poll_ms() -> u64 {
    1_000
}

fn default_s3_deletes_retention_ms() -> u64 {
    86_400_000
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

fn default_s3_tag_ttl_ms() -> u64 {
    5_000
}

fn default_s3_part_size_bytes() -> u64 {
    16 << 20
}

fn default_s3_retries_max() -> usize {
    2
}

/// An upstream registry mirrored under `/v2/<name>/...` and for `?ns=<name>` requests.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The host name clients use for it (`docker.io`, `ghcr.io`): the `ns=` value and the first
    /// component of the mirrored repositories' names.
    pub name: String,
    /// Base URL of its API (`https://registry-1.docker.io`).
    pub url: String,
    /// User for basic auth and for token requests.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (or token); trailing newlines are ignored.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password, if not in a file.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file with extra CA certificates to trust for this upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time for upstream to start answering a request.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Longest pause in an upstream body before the download is abandoned.
    #[serde(default = "default_response_timeout_ms")]
    pub body_idle_timeout_ms: u64,
    /// How long a tag resolved upstream is served without asking upstream again.
    #[serde(default = "default_tag_ttl_ms")]
    pub tag_ttl_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_response_timeout_ms() -> u64 {
    30_000
}

fn default_tag_ttl_ms() -> u64 {
    60_000
}

impl Upstream {
    /// From the command line's `NAME=URL`.
    pub fn parse_flag(s: &str) -> Result<Upstream, String> {
        let (name, url) = s.split_once('=').ok_or_else(|| {
            format!(
                "--upstream {s:?}: expected NAME=URL, e.g. docker.io=https://registry-1.docker.io"
            )
        })?;
        Ok(Upstream {
            name: name.to_owned(),
            url: url.to_owned(),
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            response_timeout_ms: default_response_timeout_ms(),
            body_idle_timeout_ms: default_response_timeout_ms(),
            tag_ttl_ms: default_tag_ttl_ms(),
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data_dir: PathBuf::from("./data"),
            manifest_size_max_bytes: 4 << 20,
            upload_sessions_max: 1024,
            upload_session_idle_timeout_ms: 60 * 60 * 1000,
            request_header_size_max_bytes: 16 << 10,
            request_header_timeout_ms: 10_000,
            request_body_idle_timeout_ms: 30_000,
            response_idle_timeout_ms: 60_000,
            request_body_rate_min_bytes_per_sec: 1024,
            lingering_close_ms: 5_000,
            connections_max: 4096,
            list_page_size_max: 10_000,
            ui_events_scan_max: 200_000,
            shutdown_grace_ms: 30_000,
            control_socket_path: PathBuf::new(),
            control_listen: None,
            cores: 0,
            connections_per_core_max: 4096,
            idle_timeout_ms: 60_000,
            io_engine: "auto".into(),
            send_unsent_max_bytes: 64 << 10,
            log_format: "text".into(),
            events_ring_records: 1024,
            events_retention_bytes: 1 << 30,
            events_retention_ms: 30 * 24 * 3600 * 1000,
            events_file_max_bytes: 64 << 20,
            inventory_retention_ms: 90 * 24 * 3600 * 1000,
            inventory_entries_max: 20_000,
            events_queue_records: 16_384,
            usage_entries_max: 50_000,
            usage_save_interval_ms: 60_000,
            storage: Storage::default(),
            upstreams: Vec::new(),
            cache_size_max_bytes: 0,
            gc_interval_ms: 0,
            cache_pinned_repositories: Vec::new(),
            webhook_listen: None,
            webhook_tls_cert_path: PathBuf::from("/etc/lighter/tls/tls.crt"),
            webhook_tls_key_path: PathBuf::from("/etc/lighter/tls/tls.key"),
            admission: Default::default(),
            peers: Vec::new(),
            peers_dns: None,
            peers_refresh_ms: 5_000,
            peer_address: None,
            peer_stall_timeout_ms: 3_000,
            peer_upload_max_bytes_per_sec: 0,
            peer_fanout_max: 1,
            peer_range_parallel_min_bytes: 32 << 20,
            containerd_content_dir: None,
            disk_free_min_bytes: 64 << 20,
            tls_cert_path: None,
            tls_key_path: None,
            auth: Default::default(),
            notifications: Vec::new(),
            notifications_queue_max_bytes: 256 << 20,
            notifications_retry_initial_ms: 1_000,
            notifications_retry_max_ms: 300_000,
            notifications_request_timeout_ms: 10_000,
            notifications_source: "lighter".into(),
            tag_watches: Vec::new(),
            immutable_tags: Vec::new(),
            retention: Vec::new(),
            retention_interval_ms: 0,
        }
    }
}

/// Largest `inventory_entries_max`: the inventory is kept in memory and published whole.
pub const INVENTORY_ENTRIES_MAX: usize = 1_000_000;

/// Smallest header limit hyper accepts.
pub const REQUEST_HEADER_SIZE_MIN_BYTES: usize = 8192;

impl Config {
    /// Defaults, overlaid with the TOML file if one is given.
    pub fn load(file: Option<&Path>) -> Result<Config, String> {
        let Some(path) = file else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Rejects values that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_header_size_max_bytes < REQUEST_HEADER_SIZE_MIN_BYTES {
            return Err(format!(
                "request_header_size_max_bytes must be at least {REQUEST_HEADER_SIZE_MIN_BYTES}"
            ));
        }
        let positive = [
            ("manifest_size_max_bytes", self.manifest_size_max_bytes),
            ("upload_sessions_max", self.upload_sessions_max as u64),
            ("connections_max", self.connections_max as u64),
            ("list_page_size_max", self.list_page_size_max as u64),
            ("request_header_timeout_ms", self.request_header_timeout_ms),
            (
                "request_body_idle_timeout_ms",
                self.request_body_idle_timeout_ms,
            ),
            ("response_idle_timeout_ms", self.response_idle_timeout_ms),
            (
                "upload_session_idle_timeout_ms",
                self.upload_session_idle_timeout_ms,
            ),
            ("peers_refresh_ms", self.peers_refresh_ms),
            ("peer_stall_timeout_ms", self.peer_stall_timeout_ms),
            ("peer_fanout_max", u64::from(self.peer_fanout_max)),
            ("inventory_retention_ms", self.inventory_retention_ms),
            ("inventory_entries_max", self.inventory_entries_max as u64),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(format!("{field} must be greater than 0"));
            }
        }
        self.io_engine.parse::<lighter_dataplane::Engine>()?;
        if self.events_file_max_bytes == 0
            || self.events_file_max_bytes > self.events_retention_bytes
        {
            return Err(format!(
                "events_file_max_bytes ({}) must be above 0 and at most events_retention_bytes ({})",
                self.events_file_max_bytes, self.events_retention_bytes
            ));
        }
        if self.inventory_entries_max > INVENTORY_ENTRIES_MAX {
            return Err(format!(
                "inventory_entries_max must be at most {INVENTORY_ENTRIES_MAX}"
            ));
        }
        if self.usage_entries_max < 16 {
            return Err("usage_entries_max must be at least 16".into());
        }
        if self.usage_save_interval_ms == 0 {
            return Err("usage_save_interval_ms must be greater than 0".into());
        }
        if self.send_unsent_max_bytes > i32::MAX as u64 {
            return Err(format!(
                "send_unsent_max_bytes must be at most {}",
                i32::MAX
            ));
        }
        if self.events_ring_records > 1 << 20 {
            return Err("events_ring_records must be at most 1048576".into());
        }
        if self.events_queue_records == 0 || self.events_queue_records > 1 << 20 {
            return Err("events_queue_records must be 1 to 1048576".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!(
                "log_format must be text or json, not {:?}",
                self.log_format
            ));
        }
        crate::admission::policy::Policy::new(&self.admission)?;
        crate::admission::require::Requirements::new(&self.admission)?;
        if self.admission.artifact_size_max_bytes == 0 || self.admission.referrers_checked_max == 0
        {
            return Err("admission.artifact_size_max_bytes and admission.referrers_checked_max must be greater than 0".into());
        }
        if self.admission.mutate.enabled && self.admission.mutate.rewrite_to.is_empty() {
            return Err("admission.mutate.enabled needs admission.mutate.rewrite_to (the registry host nodes pull from)".into());
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let (host, port) = match u.name.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (u.name.as_str(), None),
            };
            let host_ok = !host.contains('/') && lighter_layout::RepoName::parse(host).is_ok();
            let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
            let prefix = lighter_layout::mirror_prefix(&u.name);
            if !host_ok || !port_ok || lighter_layout::RepoName::parse(&prefix).is_err() {
                return Err(format!(
                    "upstreams[{i}].name {:?} must be a registry host name as clients write it, such as docker.io or registry.corp:8443 (lowercase)",
                    u.name
                ));
            }
            if self.upstreams[..i]
                .iter()
                .any(|o| lighter_layout::mirror_prefix(&o.name) == prefix)
            {
                return Err(format!(
                    "upstreams[{i}].name {:?} mirrors under {prefix}/, as another upstream does",
                    u.name
                ));
            }
            let authority = u.url.split("://").nth(1).unwrap_or("").split('/').next();
            if authority.is_some_and(|a| a.contains('@')) {
                return Err(format!(
                    "upstreams[{i}].url must not carry credentials: use username and password_file or password_env"
                ));
            }
            if !(u.url.starts_with("http://") || u.url.starts_with("https://")) {
                return Err(format!(
                    "upstreams[{i}].url {:?} must start with http:// or https://",
                    u.url
                ));
            }
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(format!(
                    "upstreams[{i}].name {:?} is configured twice",
                    u.name
                ));
            }
        }
        if let Some(s3) = &self.storage.s3 {
            if s3.bucket.is_empty() {
                return Err("storage.s3.bucket must name a bucket".into());
            }
            if s3.part_size_bytes < 5 << 20 || s3.part_size_bytes > 1 << 30 {
                return Err("storage.s3.part_size_bytes must be 5 MiB to 1 GiB".into());
            }
            if s3
                .endpoint
                .as_deref()
                .is_some_and(|e| !(e.starts_with("http://") || e.starts_with("https://")))
            {
                return Err("storage.s3.endpoint must start with http:// or https://".into());
            }
            let positive = [
                ("storage.s3.tag_ttl_ms", s3.tag_ttl_ms),
                ("storage.s3.connect_timeout_ms", s3.connect_timeout_ms),
                ("storage.s3.request_timeout_ms", s3.request_timeout_ms),
                ("storage.s3.body_idle_timeout_ms", s3.body_idle_timeout_ms),
            ];
            if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
                return Err(format!("{field} must be greater than 0"));
            }
            if s3.gc_grace_ms < 2_000 {
                return Err("storage.s3.gc_grace_ms must be at least 2000 (the store's times are to the second)".into());
            }
            if s3.deletes_poll_ms == 0 || s3.deletes_retention_ms < 10 * s3.deletes_poll_ms {
                return Err("storage.s3.deletes_poll_ms must be greater than 0, and storage.s3.deletes_retention_ms at least ten times it".into());
            }
        }
        self.validate_auth()?;
        crate::notify::validate(&self.notifications)?;
        if self.notifications_queue_max_bytes < 4096 {
            return Err("notifications_queue_max_bytes must be at least 4096".into());
        }
        if self.notifications_retry_initial_ms == 0
            || self.notifications_retry_max_ms < self.notifications_retry_initial_ms
        {
            return Err("notifications_retry_initial_ms must be at least 1 and at most notifications_retry_max_ms".into());
        }
        if self.notifications_request_timeout_ms == 0 {
            return Err("notifications_request_timeout_ms must be at least 1".into());
        }
        crate::notify::watch::validate(&self.tag_watches, &self.upstreams)?;
        crate::immutable::validate(&self.immutable_tags)?;
        crate::retention::validate(self)?;
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            return Err(
                "tls_cert_path and tls_key_path go together: set both for HTTPS, or neither".into(),
            );
        }
        if self.tls_enabled() && self.has_peers() {
            return Err("the node tier (peers, peers_dns) talks plain HTTP to its peers' registry port: it cannot be combined with tls_cert_path yet".into());
        }
        for (i, p) in self.peers.iter().enumerate() {
            crate::peers::PeerUrl::parse(p).map_err(|e| format!("peers[{i}]: {e}"))?;
        }
        if let Some(p) = &self.peer_address {
            crate::peers::PeerUrl::parse(p).map_err(|e| format!("peer_address: {e}"))?;
        }
        if let Some(name) = &self.peers_dns {
            crate::peers::dns_target(name, self.listen.port())
                .map_err(|e| format!("peers_dns: {e}"))?;
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), String> {
        let a = &self.auth;
        lighter_access::Policy::new(a)?;
        if !a.enabled() {
            let set = [
                ("htpasswd_file", a.htpasswd_file.is_some()),
                ("groups_file", a.groups_file.is_some()),
                ("issuers", !a.issuers.is_empty()),
                ("kubernetes_token_review", a.kubernetes_token_review),
                ("anonymous_cidrs", !a.anonymous_cidrs.is_empty()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, on)| *on) {
                return Err(format!(
                    "auth.{field} is set but there are no [[auth.rules]]: without rules access control is off and anyone may do anything; add rules (see the README's \"Access control\")"
                ));
            }
            return Ok(());
        }
        for (field, value) in [
            ("auth.token_lifetime_ms", a.token_lifetime_ms),
            ("auth.failures_window_ms", a.failures_window_ms),
            ("auth.token_cache_entries", a.token_cache_entries as u64),
            (
                "auth.authorization_size_max_bytes",
                a.authorization_size_max_bytes as u64,
            ),
        ] {
            if value == 0 {
                return Err(format!("{field} must be greater than 0"));
            }
        }
        if a.service.is_empty() || a.service.contains(['"', '\\']) {
            return Err("auth.service must be a non-empty name without quotes".into());
        }
        if let Some(realm) = &a.token_realm {
            if !(realm.starts_with("http://") || realm.starts_with("https://"))
                || realm.contains('"')
            {
                return Err(format!(
                    "auth.token_realm {realm:?} must be an http:// or https:// URL"
                ));
            }
        }
        Ok(())
    }

    /// Whether the registry port speaks HTTPS.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_path.is_some() && self.tls_key_path.is_some()
    }

    /// The key signing Lighter's tokens: `auth.token_key_file`, or the data directory's.
    pub fn token_key_path(&self) -> PathBuf {
        self.auth
            .token_key_file
            .clone()
            .unwrap_or_else(|| lighter_layout::Layout::open(&self.data_dir).token_key_path())
    }

    /// Whether this node is part of a node tier.
    pub fn has_peers(&self) -> bool {
        !self.peers.is_empty() || self.peers_dns.is_some()
    }

    /// The control socket's path, defaulted beside the data.
    pub fn control_socket(&self) -> PathBuf {
        if self.control_socket_path.as_os_str().is_empty() {
            self.data_dir.join("control.sock")
        } else {
            self.control_socket_path.clone()
        }
    }

    /// The data plane's part of the configuration.
    pub fn dataplane(&self) -> lighter_dataplane::Config {
        lighter_dataplane::Config {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            control_socket_path: self.control_socket(),
            cores: self.cores,
            connections_per_core_max: self.connections_per_core_max,
            request_header_size_max_bytes: self.request_header_size_max_bytes,
            request_header_timeout_ms: self.request_header_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            shutdown_grace_ms: self.shutdown_grace_ms,
            io_engine: self.io_engine.parse().expect("validated"),
            send_unsent_max_bytes: self.send_unsent_max_bytes as u32,
            mirrors: self
                .upstreams
                .iter()
                .map(|u| lighter_dataplane::Mirror::new(&u.name, u.tag_ttl_ms))
                .collect(),
            bucket_tag_ttl_ms: self.storage.s3.as_ref().map(|s3| s3.tag_ttl_ms),
            tls: self
                .tls_cert_path
                .clone()
                .zip(self.tls_key_path.clone())
                .map(|(cert, key)| lighter_dataplane::tls::TlsFiles {
                    name: "TLS",
                    cert,
                    key,
                    cert_field: "tls_cert_path",
                    key_field: "tls_key_path",
                }),
            disk_free_min_bytes: self.disk_free_min_bytes,
            events_ring_records: self.events_ring_records,
            auth: self
                .auth
                .enabled()
                .then(|| lighter_dataplane::access::AuthSetup {
                    config: self.auth.clone(),
                    own_key_path: self.token_key_path(),
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "manifest_size_max_bytes = 1024\nlisten = \"0.0.0.0:6000\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.manifest_size_max_bytes, 1024);
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.connections_max, Config::default().connections_max);
        std::fs::write(&p, "manifest_size_max = 1\n").unwrap();
        let err = Config::load(Some(&p)).unwrap_err();
        assert!(err.contains("manifest_size_max"), "{err}");
    }

    #[test]
    fn the_issue_s_storage_s3_section_loads_as_written_and_bad_values_are_named() {
        let text = r#"
[storage.s3]
bucket = "lighter"
endpoint = "http://127.0.0.1:3900"
region = "garage"
path_style = true
tag_ttl_ms = 1000
"#;
        let c: Config = toml::from_str(text).unwrap();
        let s3 = c.storage.s3.as_ref().unwrap();
        assert_eq!(s3.bucket, "lighter");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!((s3.region.as_str(), s3.path_style), ("garage", true));
        assert_eq!(s3.tag_ttl_ms, 1000);
        assert_eq!(s3.part_size_bytes, 16 << 20);
        c.validate().unwrap();
        assert_eq!(c.dataplane().bucket_tag_ttl_ms, Some(1000));
        assert_eq!(Config::default().dataplane().bucket_tag_ttl_ms, None);
        let bad = |edit: &dyn Fn(&mut S3), field: &str| {
            let mut c = c.clone();
            edit(c.storage.s3.as_mut().unwrap());
            let e = c.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        };
        bad(
            &|s| s.part_size_bytes = 1 << 20,
            "storage.s3.part_size_bytes",
        );
        bad(&|s| s.tag_ttl_ms = 0, "storage.s3.tag_ttl_ms");
        bad(&|s| s.gc_grace_ms = 10, "storage.s3.gc_grace_ms");
        bad(&|s| s.deletes_poll_ms = 0, "storage.s3.deletes_poll_ms");
        bad(
            &|s| s.deletes_retention_ms = s.deletes_poll_ms,
            "storage.s3.deletes_retention_ms",
        );
        assert_eq!(
            (s3.gc_grace_ms, s3.deletes_poll_ms, s3.deletes_retention_ms),
            (3_600_000, 1_000, 86_400_000)
        );
        bad(&|s| s.bucket.clear(), "storage.s3.bucket");
        bad(
            &|s| s.endpoint = Some("127.0.0.1:3900".into()),
            "storage.s3.endpoint",
        );
        assert!(toml::from_str::<Config>("[storage.s3]\nbucket = \"b\"\nbukcet = 1\n").is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let c = Config {
            request_header_size_max_bytes: 100,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .contains("request_header_size_max_bytes"));
    }

    #[test]
    fn upstream_names_are_hosts_with_an_optional_port() {
        let with = |names: &[&str]| Config {
            upstreams: names
                .iter()
                .map(|n| Upstream::parse_flag(&format!("{n}=https://r.example")).unwrap())
                .collect(),
            ..Config::default()
        };
        for ok in ["docker.io", "registry.corp:8443", "127.0.0.1:5000"] {
            assert!(with(&[ok]).validate().is_ok(), "{ok}");
        }
        for bad in [
            "registry.corp:",
            "registry.corp:0",
            "registry.corp:x",
            "a/b",
            "Reg.io",
            ":80",
        ] {
            let err = with(&[bad]).validate().unwrap_err();
            assert!(err.contains("upstreams[0].name"), "{bad}: {err}");
        }
        // Both would mirror under registry.corp_8443/.
        let err = with(&["registry.corp:8443", "registry.corp_8443"])
            .validate()
            .unwrap_err();
        assert!(err.contains("registry.corp_8443/"), "{err}");
    }

    #[test]
    fn upstream_urls_with_credentials_are_refused_without_echoing_them() {
        for url in [
            "https://me:secret@registry.example",
            "http://token@registry.example/v2",
        ] {
            let mut u = Upstream::parse_flag(&format!("docker.io={url}")).unwrap();
            u.url = url.to_owned();
            let c = Config {
                upstreams: vec![u],
                ..Config::default()
            };
            let err = c.validate().unwrap_err();
            assert!(err.contains("must not carry credentials"), "{err}");
            assert!(!err.contains("secret") && !err.contains("token@"), "{err}");
        }
        // An @ in the path is not userinfo.
        let u = Upstream::parse_flag("docker.io=https://registry.example/a@b").unwrap();
        let c = Config {
            upstreams: vec![u],
            ..Config::default()
        };
        assert!(c.validate().is_ok());
    }
}
