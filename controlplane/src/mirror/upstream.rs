//! A client for one upstream registry: timeouts, TLS roots, and the registry auth flows: basic,
//! and bearer tokens from the realm named in `WWW-Authenticate` (what Docker Hub and most
//! registries use), cached per scope until they expire. Credentials never appear in logs or in
//! answers to clients.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use crate::config::Upstream;

/// Every manifest type Lighter stores, so upstream answers with what the image really is (an
/// index stays an index; per-client negotiation happens locally).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Most cached tokens per upstream (one per repository scope).
const TOKENS_MAX: usize = 1024;

/// Why an upstream request failed.
#[derive(Debug)]
pub enum UpstreamError {
    /// Unreachable, timed out, or answered 5xx: a stale cached answer may be served.
    Unavailable(String),
    /// Answered with this status (404, 401, 403, …).
    Status(StatusCode),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Unavailable(m) => write!(f, "upstream unavailable: {m}"),
            UpstreamError::Status(s) => write!(f, "upstream answered {s}"),
        }
    }
}

enum Auth {
    Basic,
    Bearer(HeaderValue),
}

pub struct UpstreamClient {
    pub config: Upstream,
    /// The first component of its local repositories (`lighter_layout::mirror_prefix`).
    pub prefix: String,
    http: reqwest::Client,
    password: Option<String>,
    tokens: Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl UpstreamClient {
    pub fn new(config: Upstream) -> Result<UpstreamClient, String> {
        let name = &config.name;
        let password = match (&config.password_file, &config.password_env) {
            (Some(f), _) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| {
                        format!(
                            "upstream {name}: cannot read password_file {}: {e}",
                            f.display()
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, Some(var)) => Some(
                std::env::var(var)
                    .map_err(|_| format!("upstream {name}: password_env {var} is not set"))?,
            ),
            (None, None) => None,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .user_agent(concat!("lighter/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                format!("upstream {name}: cannot read ca_file {}: {e}", ca.display())
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("upstream {name}: ca_file {}: {e}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("upstream {name}: cannot build the HTTP client: {e}"))?;
        Ok(UpstreamClient {
            prefix: lighter_layout::mirror_prefix(&config.name),
            config,
            http,
            password,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `method` to `path` (`/v2/...`) of the upstream, authenticating as it asks.
    /// Success is a 2xx response whose body the caller reads.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        repo: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_from(method, path, repo, accept, 0).await
    }

    /// `GET` of a blob from byte `offset` on (`Range` when past 0).
    pub async fn get_blob(
        &self,
        path: &str,
        repo: &str,
        offset: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_from(Method::GET, path, repo, None, offset).await
    }

    async fn send_from(
        &self,
        method: Method,
        path: &str,
        repo: &str,
        accept: Option<&str>,
        offset: u64,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let mut auth = self.cached_token(&scope).map(Auth::Bearer);
        for attempt in 0..2 {
            let url = format!("{}{path}", self.config.url.trim_end_matches('/'));
            let mut rb = self.http.request(method.clone(), &url);
            if let Some(a) = accept {
                rb = rb.header(ACCEPT, a);
            }
            if offset > 0 {
                rb = rb.header(reqwest::header::RANGE, format!("bytes={offset}-"));
            }
            rb = match &auth {
                Some(Auth::Bearer(token)) => rb.header(AUTHORIZATION, token.clone()),
                Some(Auth::Basic) => self.with_basic(rb),
                None => rb,
            };
            let resp = self.timed(rb).await?;
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                auth = Some(self.authenticate(&challenge, &scope).await?);
                continue;
            }
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(UpstreamError::Unavailable(format!(
                    "{} answered {status}",
                    self.config.name
                )));
            }
            return Err(UpstreamError::Status(status));
        }
        Err(UpstreamError::Status(StatusCode::UNAUTHORIZED))
    }

    async fn timed(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, UpstreamError> {
        let limit = Duration::from_millis(self.config.response_timeout_ms);
        match tokio::time::timeout(limit, rb.send()).await {
            Err(_) => Err(UpstreamError::Unavailable(format!(
                "{} did not answer within {} ms (response_timeout_ms)",
                self.config.name,
                limit.as_millis()
            ))),
            // reqwest errors name the URL (never with credentials: config refuses them there),
            // never headers: safe to show. Their causes say what went wrong (refused, TLS
            // certificate, reset), so they are shown too.
            Ok(Err(e)) => {
                let why = format!("{}: {}", self.config.name, error_chain(&e));
                tracing::warn!(
                    upstream = self.config.name,
                    "upstream request failed: {why}"
                );
                Err(UpstreamError::Unavailable(why))
            }
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Adds basic credentials, if configured.
    fn with_basic(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.config.username.as_deref() {
            Some(user) => rb.basic_auth(user, self.password.as_deref()),
            None => rb,
        }
    }

    fn cached_token(&self, scope: &str) -> Option<HeaderValue> {
        let tokens = self.tokens.lock().expect("token cache lock");
        tokens
            .get(scope)
            .filter(|(_, expires)| Instant::now() < *expires)
            .map(|(t, _)| t.clone())
    }

    /// Answers a 401 challenge: basic credentials, or a bearer token from the realm.
    async fn authenticate(&self, challenge: &str, scope: &str) -> Result<Auth, UpstreamError> {
        let denied = || UpstreamError::Status(StatusCode::UNAUTHORIZED);
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return self
                .config
                .username
                .as_ref()
                .map(|_| Auth::Basic)
                .ok_or_else(denied);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(denied());
        }
        let params = parse_challenge(params);
        let realm = params.get("realm").ok_or_else(denied)?;
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = params.get("service") {
            query.push(("service", service));
        }
        query.push((
            "scope",
            params.get("scope").map(String::as_str).unwrap_or(scope),
        ));
        let rb = self.with_basic(self.http.get(realm).query(&query));
        let resp = self.timed(rb).await?;
        if !resp.status().is_success() {
            tracing::warn!(
                upstream = self.config.name,
                status = resp.status().as_u16(),
                "token request refused"
            );
            return Err(if resp.status().is_server_error() {
                UpstreamError::Unavailable(format!(
                    "{} token service answered {}",
                    self.config.name,
                    resp.status()
                ))
            } else {
                denied()
            });
        }
        let body: serde_json::Value = resp.json_body().await.map_err(|e| {
            UpstreamError::Unavailable(format!("{} token response: {e}", self.config.name))
        })?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .ok_or_else(denied)?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| denied())?;
        value.set_sensitive(true);
        // Renew a little early; the spec's default lifetime is 60 s.
        let lifetime = body["expires_in"]
            .as_u64()
            .unwrap_or(60)
            .saturating_sub(5)
            .max(1);
        let mut tokens = self.tokens.lock().expect("token cache lock");
        if tokens.len() >= TOKENS_MAX {
            tokens.retain(|_, (_, expires)| Instant::now() < *expires);
            if tokens.len() >= TOKENS_MAX {
                tokens.clear();
            }
        }
        tokens.insert(
            scope.to_owned(),
            (
                value.clone(),
                Instant::now() + Duration::from_secs(lifetime),
            ),
        );
        Ok(Auth::Bearer(value))
    }
}

/// JSON bodies without reqwest's `json` feature.
trait JsonBody {
    async fn json_body(self) -> Result<serde_json::Value, String>;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> Result<serde_json::Value, String> {
        /// Largest token response read.
        const TOKEN_RESPONSE_MAX_BYTES: usize = 64 << 10;
        let bytes = self.bytes().await.map_err(|e| e.to_string())?;
        if bytes.len() > TOKEN_RESPONSE_MAX_BYTES {
            return Err("token response too large".into());
        }
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }
}

/// `realm="https://auth",service="registry",scope="repository:a:pull"` → map.
fn parse_challenge(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start_matches([',', ' ']);
    }
    out
}

/// An error and its causes, `outer: cause: root cause`, without repeats (some errors print
/// their cause in their own message).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_parameters_are_parsed() {
        let p = parse_challenge(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/nginx:pull");
    }
}
