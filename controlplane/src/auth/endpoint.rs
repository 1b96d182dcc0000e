//! The token endpoint, `/v2/_lighter/token` (the realm of Lighter's challenges): the Docker
//! token authentication flow's `GET` (Basic credentials or none, `scope` repeated, `service`)
//! and the OAuth2 `POST` form containerd sends first (`grant_type=password`, `username`,
//! `password`, space-separated `scope`). The token grants, of each scope asked, the actions
//! the rules allow the caller; nothing the rules refuse (the registry then answers 403).

use std::net::IpAddr;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use lighter_access::token::ResourceActions;
use lighter_access::{Action, Actions};

use super::{Auth, Caller};
use crate::api::{json, param, query, Response, Result};
use crate::error::{ApiError, Code};
use crate::metrics::Counters;

/// Largest `POST` form read.
const FORM_MAX_BYTES: usize = 64 << 10;
/// Most scopes in one token request.
const SCOPES_MAX: usize = 64;

pub async fn handle(
    auth: &Auth,
    req: Request<Incoming>,
    ip: Option<IpAddr>,
    host: &str,
    config: &crate::config::Config,
    counters: &Counters,
) -> Result<Response> {
    let (caller, scopes, oauth) = match *req.method() {
        Method::GET => {
            let q = query(&req);
            let caller = auth
                .identify(super::authorization(&req), ip, host, counters)
                .await?;
            // Credentials, not tokens, buy tokens: a token renewing itself would outlive its
            // holder's removal, and an external issuer's would become a local identity.
            if let Caller::Token(_) = caller {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    Code::Unauthorized,
                    "the token endpoint takes Basic credentials (or none), not a token",
                ));
            }
            let scopes: Vec<String> = q
                .iter()
                .filter(|(k, _)| k == "scope")
                .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
                .collect();
            let _ = param(&q, "service");
            (caller, scopes, false)
        }
        Method::POST => {
            let form = read_form(req, config).await?;
            let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            match get("grant_type") {
                Some("password") => {}
                Some(other) => {
                    return Err(oauth_error(
                        "unsupported_grant_type",
                        &format!("grant_type {other:?}: only password is supported"),
                    ))
                }
                None => return Err(oauth_error("invalid_request", "grant_type is missing")),
            }
            let (Some(user), Some(password)) = (get("username"), get("password")) else {
                return Err(oauth_error(
                    "invalid_request",
                    "username and password are required",
                ));
            };
            auth.not_throttled(ip, counters)?;
            let caller = match auth.check_password(user, password).await {
                Ok(id) => Caller::User(id),
                Err(why) => {
                    auth.failed(ip, counters, &why);
                    return Err(ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        Code::Unauthorized,
                        "unknown user or wrong password",
                    ));
                }
            };
            let scopes = get("scope")
                .unwrap_or("")
                .split(' ')
                .map(str::to_owned)
                .collect();
            (caller, scopes, true)
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unsupported,
                "the token endpoint takes GET and POST",
            ))
        }
    };
    let scopes: Vec<&String> = scopes.iter().filter(|s| !s.is_empty()).collect();
    if scopes.len() > SCOPES_MAX {
        return Err(ApiError::bad_request(
            Code::Unsupported,
            format!("more than {SCOPES_MAX} scopes in one token request"),
        ));
    }
    let mut access = Vec::new();
    for scope in scopes {
        let Some(asked) = parse_scope(scope) else {
            continue;
        };
        let words = |granted: Actions| -> Vec<String> {
            granted.words().into_iter().map(str::to_owned).collect()
        };
        let (kind, resource, actions) = match asked {
            Scope::Repository(name, wanted) => {
                let granted = wanted
                    .iter()
                    .filter(|a| auth.permits(&caller, ip, name, *a))
                    .fold(Actions::NONE, Actions::with);
                ("repository", name, words(granted))
            }
            // Listing is filtered per repository anyway: anyone may ask.
            Scope::Catalog => ("registry", "catalog", vec!["*".to_owned()]),
            Scope::Admin(endpoint) => {
                let name = format!("_lighter/{endpoint}");
                let admin = Actions::NONE.with(Action::Admin);
                let ok = auth.permits(&caller, ip, &name, Action::Admin);
                (
                    "registry",
                    endpoint,
                    if ok { words(admin) } else { Vec::new() },
                )
            }
        };
        if actions.is_empty() {
            continue;
        }
        access.push(ResourceActions {
            kind: kind.into(),
            name: resource.to_owned(),
            actions,
        });
    }
    let (token, expires_in) = auth.sign(&caller, access);
    Counters::add(&counters.tokens_issued, 1);
    let issued_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let body = if oauth {
        serde_json::json!({
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": issued_at,
        })
    } else {
        serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": expires_in,
            "issued_at": issued_at,
        })
    };
    Ok(json(
        StatusCode::OK,
        serde_json::to_vec(&body).expect("JSON"),
    ))
}

/// A scope a client asks for.
#[derive(Debug, PartialEq)]
enum Scope<'a> {
    /// `repository:<name>:<actions>` (`*`: all of a repository's actions).
    Repository(&'a str, Actions),
    /// `registry:catalog:*`
    Catalog,
    /// `registry:<gc|prefetch|metrics|events|inventory>:admin`: Lighter's own endpoints.
    Admin(&'a str),
}

fn parse_scope(scope: &str) -> Option<Scope<'_>> {
    if let Some(rest) = scope.strip_prefix("registry:") {
        return match rest {
            "catalog:*" => Some(Scope::Catalog),
            "gc:admin" => Some(Scope::Admin("gc")),
            "prefetch:admin" => Some(Scope::Admin("prefetch")),
            "metrics:admin" => Some(Scope::Admin("metrics")),
            "events:admin" => Some(Scope::Admin("events")),
            "inventory:admin" => Some(Scope::Admin("inventory")),
            "ui:admin" => Some(Scope::Admin("ui")),
            _ => None,
        };
    }
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    lighter_layout::RepoName::parse(name).ok()?;
    let mut set = Actions::NONE;
    for a in actions.split(',') {
        set = match a {
            "*" => set
                .with(Action::Pull)
                .with(Action::Push)
                .with(Action::Delete),
            a => match Action::from_word(a) {
                Some(Action::Admin) | None => set,
                Some(a) => set.with(a),
            },
        };
    }
    Some(Scope::Repository(name, set))
}

async fn read_form(
    req: Request<Incoming>,
    config: &crate::config::Config,
) -> Result<Vec<(String, String)>> {
    let declared = crate::api::content_length(&req)?;
    if declared.is_some_and(|n| n > FORM_MAX_BYTES as u64) {
        return Err(oauth_error("invalid_request", "form too large"));
    }
    let body = crate::api::pace::Paced::new(req.into_body(), config);
    let limited = http_body_util::Limited::new(body, FORM_MAX_BYTES);
    let bytes = limited
        .collect()
        .await
        .map_err(|_| oauth_error("invalid_request", "form unreadable or too large"))?
        .to_bytes();
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// OAuth2's error answer (RFC 6749 5.2): containerd falls back to `GET` on a 400.
fn oauth_error(error: &str, description: &str) -> ApiError {
    ApiError::bad_request(Code::Unsupported, format!("{error}: {description}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_as_clients_send_them() {
        let Some(Scope::Repository(n, a)) = parse_scope("repository:team/app:pull,push") else {
            panic!()
        };
        assert_eq!(n, "team/app");
        assert!(a.has(Action::Pull) && a.has(Action::Push) && !a.has(Action::Delete));
        let Some(Scope::Repository(n, a)) = parse_scope("repository:docker.io/library/nginx:*")
        else {
            panic!()
        };
        assert_eq!(n, "docker.io/library/nginx");
        assert!(a.has(Action::Delete) && !a.has(Action::Admin));
        assert_eq!(parse_scope("registry:catalog:*"), Some(Scope::Catalog));
        assert_eq!(parse_scope("registry:gc:admin"), Some(Scope::Admin("gc")));
        assert_eq!(
            parse_scope("registry:inventory:admin"),
            Some(Scope::Admin("inventory"))
        );
        assert_eq!(parse_scope("registry:other:admin"), None);
        assert!(parse_scope("repository:../x:pull").is_none());
        assert!(matches!(
            parse_scope("repository:x:admin"),
            Some(Scope::Repository(_, a)) if a.is_empty()
        ));
        assert!(parse_scope("repository:x").is_none());
    }
}
