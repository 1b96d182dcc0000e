//! The node tier: every node's Lighter is its containerd's mirror and a peer of the others, so a
//! cluster fetches each blob from upstream once and the nodes serve each other.
//!
//! - **Membership** comes from the cluster, not from a protocol of ours: a static list
//!   (`peers`) and the addresses of a DNS name (`peers_dns`, a headless Service), resolved
//!   again every `peers_refresh_ms`. A peer that failed a transfer is skipped for
//!   [`SUSPECT_FOR`] (a dead node leaves DNS only once Kubernetes notices).
//! - **Ownership**: each digest's owner is the first of the live peers in [`rendezvous`] order.
//!   A node whose client misses a mirrored blob asks the owner ([`fetch`]); only the owner
//!   goes upstream, with the mirror's single flight, so N nodes asking at once cause one
//!   upstream GET. A node asked as owner fetches from upstream itself even if its own view of
//!   the peers names another owner: requests never travel from peer to peer, so they cannot
//!   loop.
//! - **Spreading**: the owner sends new requesters to nodes that already hold or receive the
//!   blob ([`fanout`]), so a wave becomes a chain or a tree instead of N copies on one uplink.
//! - **Trust**: peers are asked for blobs by digest only, never for tags or manifests, and what
//!   they send is verified against the digest before it is published or its last byte reaches
//!   a client (the mirror's rule).
//! - **Serving** peers ([`serve`]) from the node's store, containerd's content store, or a
//!   download in flight, with sendfile, within `peer_upload_max_bytes_per_sec`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use lighter_layout::Digest;

pub mod fanout;
pub mod fetch;
pub mod rendezvous;
pub mod serve;

/// A peer that failed a transfer is not asked again for this long (unless it is all there is).
pub const SUSPECT_FOR: Duration = Duration::from_secs(15);

/// The header naming the asking node (its peer address), so the owner can send others to it.
pub const PEER_HEADER: &str = "lighter-peer";
/// On an owner's 307: the nodes to fetch byte ranges from at once (comma-separated peers)...
pub const SOURCES_HEADER: &str = "lighter-sources";
/// ... and the blob's size, to split it by.
pub const SIZE_HEADER: &str = "lighter-blob-size";
/// Most sources of one parallel fetch.
pub const PARALLEL_SOURCES_MAX: usize = 4;

/// A peer's base URL, normalised: `http://HOST:PORT`, no path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerUrl(String);

impl PeerUrl {
    pub fn parse(s: &str) -> Result<PeerUrl, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            format!(
                "{s:?}: a peer is http://HOST:PORT (peers speak plain HTTP on the registry port)"
            )
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '@', '?', '#', ' ']) {
            return Err(format!("{s:?}: expected http://HOST:PORT with no path"));
        }
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(format!("{s:?}: the port is missing (http://HOST:PORT)"));
        }
        Ok(PeerUrl(format!(
            "http://{}",
            authority.to_ascii_lowercase()
        )))
    }

    fn from_addr(addr: SocketAddr) -> PeerUrl {
        PeerUrl(format!("http://{addr}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The socket address, when the host is an IP literal.
    fn socket_addr(&self) -> Option<SocketAddr> {
        self.0["http://".len()..].parse().ok()
    }
}

impl std::fmt::Display for PeerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `NAME` or `NAME:PORT` → (name, port).
pub fn dns_target(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) => (
            n,
            p.parse::<u16>()
                .map_err(|_| format!("{s:?}: the port after ':' is not a number"))?,
        ),
        None => (s, default_port),
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(format!("{s:?} is not a DNS name"));
    }
    Ok((name.to_owned(), port))
}

/// The node tier as this node sees it.
pub struct Peers {
    /// This node's own address, if known: it owns digests too.
    me: std::sync::OnceLock<PeerUrl>,
    /// The registry port: a peer with a local address and this port is this node.
    port: u16,
    statics: Vec<PeerUrl>,
    dns: Option<(String, u16)>,
    refresh: Duration,
    /// Everyone, this node included, sorted.
    members: RwLock<Arc<Vec<PeerUrl>>>,
    suspects: Mutex<HashMap<PeerUrl, Instant>>,
    /// The owner's memory of who has what.
    pub fanout: Mutex<fanout::Fanout>,
    /// Transfers to peers running now, per blob.
    pub active: serve::Active,
    pub fanout_max: u32,
    pub parallel_min_bytes: u64,
    pub stall: Duration,
    pub upload: Limiter,
    /// For transfers from peers: no redirects followed (the owner's 307s are ours to read).
    pub http: reqwest::Client,
}

impl Peers {
    /// From the configuration; None without peers. Resolves nothing yet ([`Peers::refresh`]).
    pub fn new(config: &crate::config::Config) -> Result<Option<Arc<Peers>>, String> {
        if !config.has_peers() {
            return Ok(None);
        }
        let statics = config
            .peers
            .iter()
            .map(|p| PeerUrl::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let me = std::sync::OnceLock::new();
        if let Some(a) = &config.peer_address {
            let _ = me.set(PeerUrl::parse(a)?);
        }
        let dns = config
            .peers_dns
            .as_deref()
            .map(|d| dns_target(d, config.listen.port()))
            .transpose()?;
        let stall = Duration::from_millis(config.peer_stall_timeout_ms);
        let http = reqwest::Client::builder()
            // A peer on the cluster network that has not accepted within a second is not
            // there (the first SYN retransmit is at one second).
            .connect_timeout(stall.min(Duration::from_secs(1)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("lighter/", env!("CARGO_PKG_VERSION"), " peer"))
            // Peers are on the cluster network: plain HTTP, no proxy from the environment.
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the peer HTTP client: {e}"))?;
        let peers = Peers {
            me,
            port: config.listen.port(),
            statics,
            dns,
            refresh: Duration::from_millis(config.peers_refresh_ms),
            members: RwLock::new(Arc::new(Vec::new())),
            suspects: Mutex::new(HashMap::new()),
            fanout: Mutex::new(fanout::Fanout::default()),
            active: Mutex::new(HashMap::new()),
            fanout_max: config.peer_fanout_max,
            parallel_min_bytes: config.peer_range_parallel_min_bytes,
            stall,
            upload: Limiter::new(config.peer_upload_max_bytes_per_sec),
            http,
        };
        peers.set_members(Vec::new());
        if let (Some(me), true) = (peers.me(), config.peer_address.is_some()) {
            tracing::info!(%me, "node tier: this node is a peer (peer_address)");
        }
        if peers.dns.is_none() && peers.me().is_none() {
            tracing::warn!(
                "node tier: none of the peers is this host (set peer_address): this node asks the others but owns no blob"
            );
        }
        Ok(Some(Arc::new(peers)))
    }

    /// This node's address, as peers know it.
    pub fn me(&self) -> Option<&PeerUrl> {
        self.me.get()
    }

    /// Live peers known now (this node included).
    pub fn members(&self) -> Arc<Vec<PeerUrl>> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Peers not skipped as failed now (this node included).
    pub fn live(&self) -> usize {
        let members = self.members();
        let now = Instant::now();
        let suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        members
            .iter()
            .filter(|m| {
                suspects
                    .get(*m)
                    .is_none_or(|since| now.saturating_duration_since(*since) >= SUSPECT_FOR)
            })
            .count()
    }

    pub fn is_member(&self, url: &str) -> bool {
        self.members().iter().any(|m| m.as_str() == url)
    }

    /// Whether `ip` is the address of a peer (with access control on, only peers may ask for
    /// blobs by digest).
    pub fn is_member_ip(&self, ip: std::net::IpAddr) -> bool {
        self.members().iter().any(|m| {
            m.as_str()
                .strip_prefix("http://")
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .is_some_and(|a| a.ip() == ip)
        })
    }

    fn set_members(&self, resolved: Vec<PeerUrl>) {
        let mut all: Vec<PeerUrl> = self.statics.iter().cloned().chain(resolved).collect();
        if self.me().is_none() {
            // This node among them, by its addresses (found once: addresses of a node
            // do not move while it runs).
            if let Some(me) = local_peer(&all, self.port) {
                tracing::info!(%me, "node tier: this node is a peer");
                let _ = self.me.set(me);
            }
        }
        all.extend(self.me().cloned());
        all.sort();
        all.dedup();
        let mut members = self.members.write().unwrap_or_else(|p| p.into_inner());
        if **members != all {
            tracing::info!(peers = all.len(), "node tier: peers {}", list(&all));
            *members = Arc::new(all);
        }
    }

    /// Resolves `peers_dns` again (if set). A failed lookup keeps the last answer.
    pub async fn refresh(&self) {
        let Some((name, port)) = &self.dns else {
            return;
        };
        match tokio::net::lookup_host((name.as_str(), *port)).await {
            Ok(addrs) => {
                let resolved: Vec<PeerUrl> = addrs.map(PeerUrl::from_addr).collect();
                if resolved.is_empty() {
                    tracing::warn!(
                        peers_dns = name,
                        "node tier: no addresses; keeping the last peers"
                    );
                    return;
                }
                self.set_members(resolved);
            }
            Err(e) => {
                tracing::warn!(
                    peers_dns = name,
                    "node tier: cannot resolve ({e}); keeping the last peers"
                )
            }
        }
        let now = Instant::now();
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, since| now.saturating_duration_since(*since) < SUSPECT_FOR);
    }

    /// Runs [`Peers::refresh`] every `peers_refresh_ms`, for ever.
    pub async fn keep_fresh(self: Arc<Peers>) {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh().await;
        }
    }

    /// The live peers in `digest`'s rendezvous order, the owner first; suspects are left out
    /// (but for this node itself, which is never suspect).
    pub fn ranked(&self, digest: &Digest) -> Vec<PeerUrl> {
        let members = self.members();
        let now = Instant::now();
        let suspects = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        let live = members.iter().filter(|m| {
            Some(*m) == self.me()
                || suspects
                    .get(*m)
                    .is_none_or(|since| now.saturating_duration_since(*since) >= SUSPECT_FOR)
        });
        let key = digest.to_string();
        rendezvous::ranked(&key, live.map(PeerUrl::as_str))
            .into_iter()
            .map(|p| PeerUrl(p.to_owned()))
            .collect()
    }

    /// A requester says `peer`, to which the owner sent it, failed: send nobody else there.
    pub fn fanout_failed(&self, digest: &Digest, peer: &str) {
        self.fanout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed(digest, peer);
    }

    /// `peer` failed a transfer (refused, reset, stalled): skip it for a while.
    pub fn suspect(&self, peer: &PeerUrl) {
        if Some(peer) == self.me() {
            return;
        }
        tracing::warn!(%peer, "node tier: peer failed; skipped for {} s", SUSPECT_FOR.as_secs());
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.clone(), Instant::now());
    }
}

fn list(peers: &[PeerUrl]) -> String {
    peers
        .iter()
        .map(PeerUrl::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The peer among `peers` that is this host: its IP is one of this host's addresses and its
/// port is the registry port.
fn local_peer(peers: &[PeerUrl], port: u16) -> Option<PeerUrl> {
    let local = local_addresses();
    peers
        .iter()
        .find(|p| {
            p.socket_addr()
                .is_some_and(|a| a.port() == port && local.contains(&a.ip()))
        })
        .cloned()
}

/// This host's interface addresses (loopback left out: a peer list never means it).
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|a| !a.is_loopback());
    out
}

/// A token bucket over bytes: `take` waits until the rate allows more. Rate 0: no limit.
pub struct Limiter {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    pub fn new(bytes_per_sec: u64) -> Limiter {
        Limiter {
            rate: bytes_per_sec,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Returns bytes taken but not sent.
    pub fn give_back(&self, n: u64) {
        if self.rate == 0 || n == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += n as f64;
    }

    /// Waits until up to `want` bytes may be sent; returns how many (at least 1).
    pub async fn take(&self, want: u64) -> u64 {
        if self.rate == 0 || want == 0 {
            return want;
        }
        // A tenth of a second of burst, so sends stay large but the rate holds over any second.
        let burst = (self.rate / 10).max(16 << 10) as f64;
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let (tokens, last) = &mut *s;
                *tokens = (*tokens
                    + now.saturating_duration_since(*last).as_secs_f64() * self.rate as f64)
                    .min(burst);
                *last = now;
                if *tokens >= 1.0 {
                    let n = (want as f64).min(tokens.floor());
                    *tokens -= n;
                    return n as u64;
                }
                Duration::from_secs_f64((1.0 - *tokens) / self.rate as f64)
                    .max(Duration::from_millis(1))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_urls_are_http_host_port() {
        assert_eq!(
            PeerUrl::parse("http://198.18.0.2:5000/").unwrap().as_str(),
            "http://198.18.0.2:5000"
        );
        assert_eq!(
            PeerUrl::parse("http://Node-A.example:5000")
                .unwrap()
                .as_str(),
            "http://node-a.example:5000"
        );
        for bad in [
            "198.18.0.2:5000",
            "https://198.18.0.2:5000",
            "http://198.18.0.2",
            "http://198.18.0.2:0",
            "http://198.18.0.2:5000/v2",
            "http://u:p@198.18.0.2:5000",
            "http://:5000",
        ] {
            assert!(PeerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_targets_take_the_registry_port_by_default() {
        assert_eq!(
            dns_target("lighter-peers.lighter.svc.cluster.local", 5000).unwrap(),
            ("lighter-peers.lighter.svc.cluster.local".to_owned(), 5000)
        );
        assert_eq!(
            dns_target("peers:6000", 5000).unwrap(),
            ("peers".to_owned(), 6000)
        );
        for bad in ["", "a..b", "peers:x", "bad name", "http://peers"] {
            assert!(dns_target(bad, 5000).is_err(), "{bad}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_limiter_holds_its_rate() {
        let l = Limiter::new(4 << 20);
        let start = Instant::now();
        let mut sent = 0;
        while sent < 2 << 20 {
            let n = l.take(256 << 10).await;
            assert!((1..=256 << 10).contains(&n));
            sent += n;
        }
        // 2 MiB at 4 MiB/s from an empty bucket: half a second at least.
        assert!(
            start.elapsed() >= Duration::from_millis(480),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(Limiter::new(0).take(1 << 30).await, 1 << 30);
    }
}
