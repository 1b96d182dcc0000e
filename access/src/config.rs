//! The `[auth]` section of Lighter's configuration. With no `[[auth.rules]]` access control is
//! off: anyone who reaches the port may do anything (the control plane says so once at start).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Users and their bcrypt password hashes (`htpasswd -B`), reloaded when the file changes.
    pub htpasswd_file: Option<PathBuf>,
    /// Groups of htpasswd users, one per line: `group: user1 user2` (Apache's AuthGroupFile),
    /// reloaded when the file changes. Rules name them `group:<name>`.
    pub groups_file: Option<PathBuf>,
    /// Who may do what, per repository prefix; the longest matching prefix wins. Empty: access
    /// control is off.
    pub rules: Vec<RuleConfig>,
    /// Requests without credentials count as `anonymous` only from these networks (CIDRs, e.g.
    /// the node network); from elsewhere they are refused. Empty: from anywhere.
    pub anonymous_cidrs: Vec<String>,
    /// The `service` of the token flow: the audience of Lighter's tokens.
    pub service: String,
    /// Where clients get tokens (the challenge's `realm`). Unset: this registry's own token
    /// endpoint, `<scheme>://<Host of the request>/v2/_lighter/token`.
    pub token_realm: Option<String>,
    /// Lifetime of the tokens Lighter issues.
    pub token_lifetime_ms: u64,
    /// Ed25519 private key (PKCS#8 PEM) that signs Lighter's tokens. Unset: a key generated once
    /// and kept in the data directory (`auth/token-key.pem`).
    pub token_key_file: Option<PathBuf>,
    /// External token issuers (Harbor's, Distribution's token server) whose tokens are accepted.
    pub issuers: Vec<IssuerConfig>,
    /// Kubernetes ServiceAccount tokens (as a Bearer token, or as the password of Basic
    /// credentials) are checked with the TokenReview API of the cluster Lighter runs in.
    pub kubernetes_token_review: bool,
    /// The Kubernetes API asked by TokenReview (in a pod: the `kubernetes.default.svc` Service).
    pub kubernetes_api_url: String,
    /// Lighter's own ServiceAccount token, sent with each TokenReview (re-read each time: it is
    /// rotated). Needs the `system:auth-delegator` ClusterRole.
    pub kubernetes_token_file: PathBuf,
    /// CA certificates of the Kubernetes API.
    pub kubernetes_ca_file: PathBuf,
    /// How long a checked password or ServiceAccount token is remembered (bcrypt and
    /// TokenReview are slow by design).
    pub credentials_cache_ms: u64,
    /// Most credentials remembered at once.
    pub credentials_cache_entries_max: usize,
    /// Failed authentications one client address may make within `failures_window_ms`; past
    /// it, that client gets 429 with `Retry-After` until the window ends.
    pub failures_max: u32,
    pub failures_window_ms: u64,
    /// Longest `Authorization` header accepted; longer gets 401.
    pub authorization_size_max_bytes: usize,
    /// Verified tokens each data plane core remembers.
    pub token_cache_entries: usize,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            htpasswd_file: None,
            groups_file: None,
            rules: Vec::new(),
            anonymous_cidrs: Vec::new(),
            service: "lighter".into(),
            token_realm: None,
            token_lifetime_ms: 300_000,
            token_key_file: None,
            issuers: Vec::new(),
            kubernetes_token_review: false,
            kubernetes_api_url: "https://kubernetes.default.svc".into(),
            kubernetes_token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            kubernetes_ca_file: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
            credentials_cache_ms: 60_000,
            credentials_cache_entries_max: 4096,
            failures_max: 10,
            failures_window_ms: 60_000,
            authorization_size_max_bytes: 8192,
            token_cache_entries: 1024,
        }
    }
}

impl AuthConfig {
    /// Whether access control is on.
    pub fn enabled(&self) -> bool {
        !self.rules.is_empty()
    }
}

/// One `[[auth.rules]]` entry. Each list names principals: `anonymous`, `authenticated`,
/// `user:<name>`, `group:<name>`, `serviceaccount:<namespace>:<name>`, `namespace:<namespace>`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuleConfig {
    /// Repository prefix at a component boundary (`team/` and `team` both match `team/app`,
    /// neither matches `teamwork`); `""` matches everything. Lighter's own endpoints are
    /// `_lighter/gc`, `_lighter/prefetch` and `_lighter/metrics`.
    pub prefix: String,
    pub pull: Vec<String>,
    pub push: Vec<String>,
    pub delete: Vec<String>,
    /// Lighter's own endpoints (garbage collection, prefetch, metrics).
    pub admin: Vec<String>,
}

/// An external token issuer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The tokens' `iss` claim.
    pub issuer: String,
    /// PEM public key or certificate whose key signs its tokens (RSA, ECDSA P-256/P-384 or
    /// Ed25519).
    pub public_key_file: PathBuf,
    /// The `aud` its tokens carry; unset: this registry's `service`.
    #[serde(default)]
    pub audience: Option<String>,
}
