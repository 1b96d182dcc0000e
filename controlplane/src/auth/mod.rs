//! Access control in the control plane: who the caller of a request is ([`Auth::identify`]:
//! Basic credentials against htpasswd or a ServiceAccount token, a Bearer token of Lighter's
//! own or of an external issuer, or nobody), whether the rules let them do what the request does
//! ([`Auth::permits`], through `lighter_access`, the same decision the data plane makes), and
//! the answer when they may not: 401 with the token flow's challenge, 403, or 429 for a client
//! that keeps failing. `endpoint` is the token endpoint (`/v2/_lighter/token`); `review` asks
//! the Kubernetes API about ServiceAccount tokens.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use lighter_access::token::SigningKey;
use lighter_access::{Action, AuthConfig, Identity, Policy, Verified, Verifier, Who};
use sha2::Digest as _;

use crate::error::{ApiError, Code};
use crate::metrics::Counters;

pub mod endpoint;
mod htpasswd;
pub mod review;

/// Most client addresses whose failures are remembered at once.
const FAILURE_CLIENTS_MAX: usize = 65_536;

/// The caller of a request.
#[derive(Clone, Debug)]
pub enum Caller {
    Anonymous,
    /// Basic credentials or a ServiceAccount token that checked out.
    User(Identity),
    /// A verified Bearer token.
    Token(Verified),
}

impl Caller {
    /// The identity behind the caller, where the rules can judge it: Lighter's own tokens carry
    /// the identity they were issued to; external issuers' tokens grant only what they list.
    fn who(&self) -> Option<Who<'_>> {
        match self {
            Caller::Anonymous => Some(Who::Anonymous),
            Caller::User(id) => Some(Who::User(id)),
            Caller::Token(_) => None,
        }
    }

    pub fn is_anonymous(&self) -> bool {
        matches!(self, Caller::Anonymous)
    }

    /// For the log and the token's subject.
    pub fn name(&self) -> &str {
        match self {
            Caller::Anonymous => "",
            Caller::User(id) => &id.user,
            Caller::Token(v) => &v.subject,
        }
    }
}

pub struct Auth {
    pub config: AuthConfig,
    pub policy: Policy,
    verifier: Verifier,
    signer: SigningKey,
    users: htpasswd::Htpasswd,
    review: Option<review::TokenReview>,
    /// sha256(user, password) → who it is and until when that is believed.
    remembered: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    /// Client address → failed authentications in the current window, and when it started.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// The scheme clients reach the registry with (the realm's).
    scheme: &'static str,
}

impl Auth {
    /// None when access control is off (no rules); that is said once in the log.
    pub fn new(config: &crate::config::Config) -> Result<Option<Auth>, String> {
        let Some(policy) = Policy::new(&config.auth)? else {
            tracing::warn!(
                "access control is off: anyone who reaches the registry may pull, push and delete (add [[auth.rules]])"
            );
            return Ok(None);
        };
        let a = &config.auth;
        let key_path = config.token_key_path();
        let pem = match &a.token_key_file {
            Some(p) => {
                std::fs::read(p).map_err(|e| format!("auth.token_key_file {}: {e}", p.display()))?
            }
            None => {
                let layout = lighter_layout::Layout::open(&config.data_dir);
                layout
                    .create_token_key(SigningKey::generate_pem()?.as_bytes())
                    .map_err(|e| format!("cannot keep the token key {}: {e}", key_path.display()))?
            }
        };
        let signer = SigningKey::from_pem(&pem)
            .map_err(|e| format!("token key {}: {e}", key_path.display()))?;
        let verifier = Verifier::new(a, &key_path)?;
        let users = htpasswd::Htpasswd::new(a.htpasswd_file.clone(), a.groups_file.clone())?;
        let review = if a.kubernetes_token_review {
            Some(review::TokenReview::new(a)?)
        } else {
            None
        };
        tracing::info!(
            rules = a.rules.len(),
            issuers = a.issuers.len(),
            htpasswd = a.htpasswd_file.is_some(),
            kubernetes_token_review = a.kubernetes_token_review,
            "access control on"
        );
        Ok(Some(Auth {
            config: a.clone(),
            policy,
            verifier,
            signer,
            users,
            review,
            remembered: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            scheme: if config.tls_enabled() {
                "https"
            } else {
                "http"
            },
        }))
    }

    /// Who sent a request with this `Authorization` header (if any) from `ip`. Bad or unknown
    /// credentials are a 401 and count as a failure of that client; a client past
    /// `failures_max` gets 429 before its credentials are even looked at.
    pub async fn identify(
        &self,
        authorization: Option<&str>,
        ip: Option<IpAddr>,
        host: &str,
        counters: &Counters,
    ) -> Result<Caller, ApiError> {
        let Some(value) = authorization else {
            return Ok(Caller::Anonymous);
        };
        self.not_throttled(ip, counters)?;
        let result = self.check(value).await;
        result.map_err(|why| {
            self.failed(ip, counters, &why);
            self.unauthorized(host, None, Some(("invalid_token", why)))
        })
    }

    async fn check(&self, value: &str) -> Result<Caller, String> {
        if value.len() > self.config.authorization_size_max_bytes {
            return Err(
                "Authorization header longer than auth.authorization_size_max_bytes".into(),
            );
        }
        if value == UNREADABLE_AUTHORIZATION {
            return Err("the Authorization header is not text".into());
        }
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let (user, password) = decode_basic(rest).ok_or("malformed Basic credentials")?;
            return self
                .check_password(&user, &password)
                .await
                .map(Caller::User);
        }
        if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            let now = unix_now();
            return match self.verifier.verify(rest, now) {
                Ok(v) => Ok(Caller::Token(v)),
                Err(e) => match &self.review {
                    // Not a registry token: perhaps a ServiceAccount's.
                    Some(r) if e.0 != "token expired" => self
                        .remembered_or(rest, "", || r.review(rest))
                        .await
                        .map(Caller::User)
                        .map_err(|_| e.0),
                    _ => Err(e.0),
                },
            };
        }
        Err("unsupported authorization scheme: use Basic or Bearer".into())
    }

    /// A user name and password (or a ServiceAccount token as the password) → who it is.
    pub async fn check_password(&self, user: &str, password: &str) -> Result<Identity, String> {
        if let (Some(r), true) = (&self.review, looks_like_jwt(password)) {
            return self
                .remembered_or(password, "", || r.review(password))
                .await
                .map_err(|e| format!("ServiceAccount token refused: {e}"));
        }
        let users = &self.users;
        self.remembered_or(password, user, || async move {
            let (u, p) = (user.to_owned(), password.to_owned());
            let groups = tokio::task::block_in_place(|| users.check(&u, &p));
            groups
                .map(|groups| Identity { user: u, groups })
                .ok_or_else(|| "unknown user or wrong password".to_string())
        })
        .await
    }

    /// The identity remembered for `(user, secret)`, or `check`'s verdict (remembered when
    /// positive).
    async fn remembered_or<F, Fut>(
        &self,
        secret: &str,
        user: &str,
        check: F,
    ) -> Result<Identity, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Identity, String>>,
    {
        let key: [u8; 32] = {
            let mut h = sha2::Sha256::new();
            h.update(user.as_bytes());
            h.update([0]);
            h.update(secret.as_bytes());
            h.finalize().into()
        };
        if self.users.changed() {
            self.remembered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        let now = Instant::now();
        if let Some((id, until)) = self
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if *until > now {
                return Ok(id.clone());
            }
        }
        let id = check().await?;
        let mut m = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= self.config.credentials_cache_entries_max {
            m.retain(|_, (_, until)| *until > now);
            if m.len() >= self.config.credentials_cache_entries_max {
                m.clear();
            }
        }
        if self.config.credentials_cache_ms > 0 {
            let until = now + Duration::from_millis(self.config.credentials_cache_ms);
            m.insert(key, (id.clone(), until));
        }
        Ok(id)
    }

    /// Whether `caller` (from `ip`) may do `action` on `name` (a local repository name, or
    /// `_lighter/<endpoint>` for `admin`). A token grants what it lists (what the rules allowed
    /// of the scopes asked when it was issued), and, as to anyone, what `anonymous` may do.
    pub fn permits(&self, caller: &Caller, ip: Option<IpAddr>, name: &str, action: Action) -> bool {
        match caller {
            Caller::Token(v) => {
                v.allows(name, action) || self.policy.allows(Who::Anonymous, ip, name, action)
            }
            c => c
                .who()
                .is_some_and(|who| self.policy.allows(who, ip, name, action)),
        }
    }

    /// Whether the catalog shows `caller` repository `name`: what it may pull; for a token of
    /// Lighter's own granted `registry:catalog:*`, what its holder may pull.
    pub fn lists(&self, caller: &Caller, ip: Option<IpAddr>, name: &str) -> bool {
        match caller {
            Caller::Token(v) if v.own && v.allows("_lighter/catalog", Action::Pull) => {
                let id = token_identity(v);
                self.policy.allows(who_of(&id), ip, name, Action::Pull)
            }
            c => self.permits(c, ip, name, Action::Pull),
        }
    }

    /// Whether a pull of `name` with this `Authorization` (if any) from `ip` is allowed without
    /// anything slow (no bcrypt, no TokenReview): anonymously, or by a token. False means
    /// "take the long way" (hyper, which identifies the caller and words a refusal), not no.
    /// Allowed: the caller's identity (empty for anonymous), for the event log.
    pub fn may_pull_now(
        &self,
        authorization: Option<&[u8]>,
        ip: Option<IpAddr>,
        name: &str,
    ) -> Option<String> {
        let Some(value) = authorization else {
            return self
                .policy
                .allows(Who::Anonymous, ip, name, Action::Pull)
                .then(String::new);
        };
        let token =
            lighter_access::token::bearer(value).and_then(|t| std::str::from_utf8(t).ok())?;
        let caller = Caller::Token(self.verifier.verify(token, unix_now()).ok()?);
        self.permits(&caller, ip, name, Action::Pull)
            .then(|| caller.name().to_owned())
    }

    /// The answer to a request `caller` may not make: 401 with a challenge naming the scope when
    /// credentials (or another token) could help: no credentials, an anonymous token, an
    /// external token that does not name the repository; 403 `DENIED` when the caller is known
    /// and may not, with the challenge too when a token of Lighter's own lacks a scope its
    /// holder may have.
    pub fn refuse(
        &self,
        caller: &Caller,
        ip: Option<IpAddr>,
        host: &str,
        name: &str,
        action: Action,
    ) -> ApiError {
        let scope = scope_of(name, action);
        let what = format!("{} {name}", action.word());
        let ask = |why: &str| {
            let mut e = self.unauthorized(
                host,
                Some(&scope),
                Some(("insufficient_scope", why.to_string())),
            );
            e.message = format!("authentication required to {what}: {why}");
            e
        };
        match caller {
            Caller::Anonymous => {
                let mut e = self.unauthorized(host, Some(&scope), None);
                e.message = format!("authentication required to {what}");
                e
            }
            Caller::Token(v) if v.own && v.subject.is_empty() => {
                ask("an anonymous token: log in for more")
            }
            // Its holder may, the token does not say so: 403 with the challenge naming the
            // scope. Clients that ask for the scopes they need never see this; those that reuse
            // one token across actions (oras-py asks for pull, then pushes) take a new token on
            // a 403 but retry a 401 with the same one.
            Caller::Token(v) if v.own => {
                let id = token_identity(v);
                let mut e = self.denied(caller, name, action);
                if self.policy.allows(who_of(&id), ip, name, action) {
                    let challenge = ask("").headers.remove(0);
                    e.headers.push(challenge);
                    e.message = format!(
                        "the token does not grant {what}: ask the token endpoint for {scope}"
                    );
                }
                e
            }
            Caller::Token(v) if !v.names(name) => ask("the token does not grant this scope"),
            _ => self.denied(caller, name, action),
        }
    }

    fn denied(&self, caller: &Caller, name: &str, action: Action) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            Code::Denied,
            format!("{} may not {} {name}", describe(caller), action.word()),
        )
    }

    /// 401 with `WWW-Authenticate: Bearer realm=…,service=…[,scope=…][,error=…]`.
    pub fn unauthorized(
        &self,
        host: &str,
        scope: Option<&str>,
        error: Option<(&str, String)>,
    ) -> ApiError {
        let realm = match &self.config.token_realm {
            Some(r) => r.clone(),
            None => format!("{}://{}/v2/_lighter/token", self.scheme, host),
        };
        let mut challenge = format!(
            "Bearer realm=\"{realm}\",service=\"{}\"",
            self.config.service
        );
        if let Some(s) = scope {
            challenge.push_str(&format!(",scope=\"{s}\""));
        }
        let message = match &error {
            Some((code, why)) => {
                challenge.push_str(&format!(",error=\"{code}\""));
                format!("authentication required: {why}")
            }
            None => "authentication required".to_string(),
        };
        ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, message)
            .with_header("www-authenticate", challenge)
    }

    /// Signs a token for `caller` granting `access`.
    pub fn sign(
        &self,
        caller: &Caller,
        access: Vec<lighter_access::token::ResourceActions>,
    ) -> (String, u64) {
        let now = unix_now();
        let lifetime = self.config.token_lifetime_ms.div_ceil(1000).max(1);
        let groups = match caller {
            Caller::User(id) => id.groups.clone(),
            Caller::Token(v) if v.own => v.groups.clone(),
            _ => Vec::new(),
        };
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
            .expect("system randomness");
        let claims = lighter_access::token::Claims {
            iss: lighter_access::token::OWN_ISSUER.into(),
            sub: caller.name().to_owned(),
            aud: self.config.service.clone(),
            exp: now + lifetime,
            nbf: now.saturating_sub(1),
            iat: now,
            jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
            access,
            groups,
        };
        (self.signer.sign(&claims), lifetime)
    }

    /// 429 with `Retry-After` for a client address that failed too often.
    pub fn not_throttled(&self, ip: Option<IpAddr>, counters: &Counters) -> Result<(), ApiError> {
        let Some(retry_after) = self.throttled(ip) else {
            return Ok(());
        };
        Counters::add(&counters.auth_throttled, 1);
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyRequests,
            "too many failed authentications from this address: wait and retry",
        )
        .with_header("retry-after", retry_after.to_string()))
    }

    /// Seconds `ip` must wait, if it failed too often.
    fn throttled(&self, ip: Option<IpAddr>) -> Option<u64> {
        let ip = ip?;
        let window = Duration::from_millis(self.config.failures_window_ms);
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (count, since) = f.get(&ip)?;
        let left = window.checked_sub(since.elapsed())?;
        // Rounded up: a client that waits as told is not throttled any more.
        (*count >= self.config.failures_max).then(|| left.as_millis().div_ceil(1000).max(1) as u64)
    }

    /// Counts a failed authentication of `ip` (see [`Auth::identify`]), and says why in the log.
    pub fn failed(&self, ip: Option<IpAddr>, counters: &Counters, why: &str) {
        Counters::add(&counters.auth_failures, 1);
        tracing::info!(client = ?ip, "authentication failed: {why}");
        let Some(ip) = ip else { return };
        let window = Duration::from_millis(self.config.failures_window_ms);
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= FAILURE_CLIENTS_MAX {
            f.retain(|_, (_, since)| since.elapsed() < window);
            if f.len() >= FAILURE_CLIENTS_MAX {
                f.clear();
            }
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        if e.0 == self.config.failures_max {
            tracing::warn!(client = %ip, "too many failed authentications: throttled");
        }
    }
}

/// The identity a token of Lighter's own was issued to.
fn token_identity(v: &Verified) -> Identity {
    Identity {
        user: v.subject.clone(),
        groups: v.groups.clone(),
    }
}

/// An empty user is the anonymous caller.
fn who_of(id: &Identity) -> Who<'_> {
    if id.user.is_empty() {
        Who::Anonymous
    } else {
        Who::User(id)
    }
}

/// `repository:<name>:<actions>`, the actions a client should ask for to do `action`.
pub fn scope_of(name: &str, action: Action) -> String {
    let actions = match action {
        Action::Push => "pull,push",
        a => a.word(),
    };
    if let Some(endpoint) = name.strip_prefix("_lighter/") {
        return format!("registry:{endpoint}:{actions}");
    }
    format!("repository:{name}:{actions}")
}

fn describe(caller: &Caller) -> String {
    match caller {
        Caller::Anonymous => "an anonymous client".into(),
        Caller::User(id) => format!("user {:?}", id.user),
        Caller::Token(v) if v.subject.is_empty() => "an anonymous token".into(),
        Caller::Token(v) => format!("the token of {:?}", v.subject),
    }
}

fn decode_basic(b64: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    (!u.is_empty() && !u.contains(|c: char| c.is_control())).then(|| (u.to_owned(), p.to_owned()))
}

/// Three base64url segments: a JWT (a ServiceAccount token given as a password).
fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ")
        && s.split('.').count() == 3
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What [`authorization`] gives for a header that is not text: a 401, never no credentials.
const UNREADABLE_AUTHORIZATION: &str = "\0unreadable";

/// A request's `Authorization` header.
pub fn authorization<B>(req: &hyper::Request<B>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(UNREADABLE_AUTHORIZATION))
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `Host` of a request, if it is a plain host name or address (it goes into the realm).
pub fn host_of(value: Option<&str>, fallback: std::net::SocketAddr) -> String {
    value
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                })
        })
        .map_or_else(|| fallback.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_and_jwt_shapes() {
        assert_eq!(
            decode_basic("Y2k6cGE6c3M="),
            Some(("ci".into(), "pa:ss".into()))
        );
        for bad in ["", "!!!", "Y2k=", "OnB3"] {
            assert_eq!(decode_basic(bad), None, "{bad}");
        }
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJrIn0.c2ln"));
        assert!(!looks_like_jwt("hunter2"));
        assert_eq!(scope_of("a/b", Action::Push), "repository:a/b:pull,push");
        assert_eq!(
            scope_of("_lighter/metrics", Action::Admin),
            "registry:metrics:admin"
        );
        let fallback = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            host_of(Some("reg.example:443"), fallback),
            "reg.example:443"
        );
        assert_eq!(host_of(Some("a\"b"), fallback), "127.0.0.1:5000");
    }
}
