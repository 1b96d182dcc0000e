//! Access control (issue 12), over real sockets against `lighter serve`: the documented
//! configuration as written, the Docker/OCI token flow (`GET` and the OAuth2 `POST` form) with
//! tokens used at the registry port (the data plane's pull path), tokens that must not work
//! (forged, expired, `alg: none`, another audience, external issuers' keys misused), bad
//! `Authorization` headers, throttling of failing clients, admin endpoints, mounts across
//! repositories, htpasswd and groups reloads, access control off by default, and configuration
//! errors.
//!
//! References: the token authentication spec (distribution.github.io/distribution/spec/auth/
//! token, .../oauth, .../jwt), RFC 6750 3 (the `WWW-Authenticate: Bearer` challenge and its
//! `error="invalid_token"`), RFC 6585 4 (429 and `Retry-After`), and the OCI Distribution
//! Specification's error codes (UNAUTHORIZED, DENIED, TOOMANYREQUESTS).

#[path = "common/auth.rs"]
mod auth_common;
mod common;
mod oci;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use auth_common::*;
use common::Server;
use oci::Reply;
use reqwest::Method;
use serde_json::json;

fn basic(user: (&str, &str)) -> Cred {
    Cred::basic(user)
}

fn catalog(server: &Server, cred: &Cred) -> BTreeSet<String> {
    let r = get_as(server, "/v2/_catalog", cred);
    assert_eq!(r.status, 200, "catalog as {cred:?}: {}", r.describe());
    r.json()["repositories"]
        .as_array()
        .expect("repositories")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Asserts a 403 DENIED (the caller is known, the rules say no): no challenge, since other
/// credentials of the same client would not help.
fn assert_denied(r: &Reply) {
    r.assert_error(403, "DENIED");
}

/// Retries `f` every 100 ms until it returns true or `within` passes; whether it did.
fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- the documented configuration -------------------------------------------------------------

// issue 12: rule "" pulls for anonymous, pushes for user:ci
#[test]
fn documented_config_anonymous_pulls_a_public_repository_ci_pushed() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let image = push_image_as(&server, "team/app", "v1", 1, &basic(CI));
    assert_pulls_from_data_plane(&server, "team/app", "v1", &image, &Cred::None);
    // "anonymous" is everyone: a user the rules do not name pulls too.
    assert_pulls(&server, "team/app", "v1", &image, &basic(BOB));
    // Tags are a pull.
    let r = get_as(&server, "/v2/team/app/tags/list", &Cred::None);
    r.assert_status(200);
    assert_eq!(r.json()["tags"], json!(["v1"]));
}

// issue 12 + token spec "How to authenticate": 401 with the scope the client must ask for
#[test]
fn documented_config_anonymous_push_is_401_with_the_push_scope_and_stores_nothing() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let image = push_image_as(&server, "team/app", "v1", 2, &basic(CI));
    let scope = Some("repository:team/app:pull,push");

    let blob = common::random_bytes(500, 20);
    let r = post_blob_as(&server, "team/app", &blob, &Cred::None);
    assert_401(&server, &r, scope, None);
    let r = open_upload_as(&server, "team/app", "", &Cred::None);
    assert_401(&server, &r, scope, None);
    let r = put_manifest_as(&server, "team/app", "v2", &image.manifest, &Cred::None);
    assert_401(&server, &r, scope, None);
    let r = delete_as(
        &server,
        &format!("/v2/team/app/manifests/{}", image.digest),
        &Cred::None,
    );
    assert_401(&server, &r, Some("repository:team/app:delete"), None);

    // Nothing of it happened.
    let path = format!("/v2/team/app/blobs/{}", common::sha256(&blob));
    get_as(&server, &path, &basic(CI)).assert_error(404, "BLOB_UNKNOWN");
    get_manifest_as(&server, "team/app", "v2", &basic(CI)).assert_error(404, "MANIFEST_UNKNOWN");
    assert_pulls(&server, "team/app", "v1", &image, &Cred::None);
}

// issue 12: push and delete = ["user:ci"]
#[test]
fn documented_config_ci_pushes_and_deletes() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    let image = push_image_as(&server, "team/app", "v1", 3, &ci);
    assert_pulls(&server, "team/app", "v1", &image, &ci);
    // Basic credentials are the control plane's to check: the data plane hands them over.
    let r = get_manifest_as(&server, "team/app", "v1", &ci);
    assert!(!from_data_plane(&r), "{}", r.describe());
    let layer = common::sha256(&image.layers[0]);
    delete_as(&server, &format!("/v2/team/app/blobs/{layer}"), &ci).assert_status(202);
    get_as(&server, &format!("/v2/team/app/blobs/{layer}"), &ci).assert_error(404, "BLOB_UNKNOWN");
    delete_as(
        &server,
        &format!("/v2/team/app/manifests/{}", image.digest),
        &ci,
    )
    .assert_status(202);
    get_manifest_as(&server, "team/app", "v1", &Cred::None).assert_error(404, "MANIFEST_UNKNOWN");
}

// issue 12: a valid user the rules do not grant push or delete gets 403 DENIED
#[test]
fn documented_config_bob_may_pull_but_his_push_and_delete_are_403_denied() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let image = push_image_as(&server, "team/app", "v1", 4, &basic(CI));
    let bob = basic(BOB);
    assert_pulls(&server, "team/app", "v1", &image, &bob);

    let r = post_blob_as(&server, "team/app", b"bob's layer", &bob);
    assert_denied(&r);
    assert!(
        r.header_opt("WWW-Authenticate").is_none(),
        "{}",
        r.describe()
    );
    assert_denied(&put_manifest_as(
        &server,
        "team/app",
        "bob",
        &image.manifest,
        &bob,
    ));
    assert_denied(&post_blob_as(&server, "bob/own", b"anywhere", &bob));
    assert_denied(&delete_as(
        &server,
        &format!("/v2/team/app/manifests/{}", image.digest),
        &bob,
    ));
    assert_denied(&delete_as(
        &server,
        &format!("/v2/team/app/blobs/{}", common::sha256(&image.config)),
        &bob,
    ));
    assert_pulls(&server, "team/app", "v1", &image, &Cred::None);
    get_manifest_as(&server, "team/app", "bob", &bob).assert_error(404, "MANIFEST_UNKNOWN");
}

// issue 12: the longest prefix wins: private/ is not for anonymous nor bob; ci and group
// readers pull it; `privateer/` is not under `private/` (component boundary)
#[test]
fn documented_config_private_is_401_for_anonymous_403_for_bob_and_pulled_by_ci_and_readers() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    let secret = push_image_as(&server, "private/secret", "v1", 5, &ci);
    let near = push_image_as(&server, "privateer/app", "v1", 6, &ci);

    let r = assert_no_content(
        &server,
        "private/secret",
        "v1",
        &secret,
        &Cred::None,
        401,
        "UNAUTHORIZED",
    );
    assert_401(&server, &r, Some("repository:private/secret:pull"), None);
    let r = head_as(&server, "/v2/private/secret/manifests/v1", &Cred::None);
    assert_401(&server, &r, Some("repository:private/secret:pull"), None);
    assert_no_content(
        &server,
        "private/secret",
        "v1",
        &secret,
        &basic(BOB),
        403,
        "DENIED",
    );
    // Tags and referrers are pulls too.
    let r = get_as(&server, "/v2/private/secret/tags/list", &Cred::None);
    assert_401(&server, &r, Some("repository:private/secret:pull"), None);
    assert_denied(&get_as(
        &server,
        "/v2/private/secret/tags/list",
        &basic(BOB),
    ));
    assert_denied(&get_as(
        &server,
        &format!("/v2/private/secret/referrers/{}", secret.digest),
        &basic(BOB),
    ));

    assert_pulls(&server, "private/secret", "v1", &secret, &ci);
    assert_pulls(&server, "private/secret", "v1", &secret, &basic(RITA));
    get_as(&server, "/v2/private/secret/tags/list", &basic(RITA)).assert_status(200);
    // Readers pull, but push is ci's alone.
    assert_denied(&post_blob_as(&server, "private/secret", b"x", &basic(RITA)));

    assert_pulls(&server, "privateer/app", "v1", &near, &Cred::None);
}

// issue 12: the catalog lists only the repositories the caller may pull
#[test]
fn documented_config_catalog_lists_only_what_the_caller_may_pull() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    for (i, repo) in ["team/app", "private/secret", "privateer/app", "private/x/y"]
        .iter()
        .enumerate()
    {
        push_image_as(&server, repo, "v1", 10 + i as u64, &ci);
    }
    let public = set(&["privateer/app", "team/app"]);
    let all = set(&["private/secret", "private/x/y", "privateer/app", "team/app"]);
    assert_eq!(catalog(&server, &Cred::None), public);
    assert_eq!(catalog(&server, &basic(BOB)), public);
    assert_eq!(catalog(&server, &ci), all);
    assert_eq!(catalog(&server, &basic(RITA)), all);
    // Bad credentials are refused, not treated as anonymous.
    let r = get_as(
        &server,
        "/v2/_catalog",
        &Cred::Basic("ci".into(), "wrong".into()),
    );
    assert_401(&server, &r, None, Some("invalid_token"));
    // Pages count only what the caller sees.
    let r = get_as(&server, "/v2/_catalog?n=1", &Cred::None);
    r.assert_status(200);
    assert_eq!(r.json()["repositories"], json!(["privateer/app"]));
}

// issue 12: the configuration exactly as documented, anonymous_cidrs = ["198.18.0.0/15"]:
// without credentials, 127.0.0.1 is not anonymous; from 198.18.0.0/15 it is
#[test]
fn documented_config_as_written_admits_anonymous_only_from_its_cidrs() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        anonymous_cidrs: vec!["198.18.0.0/15".into()],
        failures_max: 10,
        ..Opts::default()
    });
    let image = push_image_as(&server, "team/app", "v1", 20, &basic(CI));
    let r = assert_no_content(
        &server,
        "team/app",
        "v1",
        &image,
        &Cred::None,
        401,
        "UNAUTHORIZED",
    );
    assert_401(&server, &r, Some("repository:team/app:pull"), None);
    // Users are not limited by anonymous_cidrs: "anonymous" covers them from anywhere.
    assert_pulls(&server, "team/app", "v1", &image, &basic(BOB));
    assert!(catalog(&server, &Cred::None).is_empty());
    let r = get_as(&server, "/v2/_lighter/metrics", &Cred::None);
    assert_401(&server, &r, Some("registry:metrics:admin"), None);
    metrics(&server, &basic(BOB));
    // An anonymous token asked from outside the networks grants nothing.
    let t = token(&server, &Cred::None, &["repository:team/app:pull"]);
    assert!(access(&t).is_empty(), "{:?}", access(&t));

    // From inside 198.18.0.0/15 (a bridge address of this machine; needs root).
    if let Some(why) = common::netns::unavailable() {
        eprintln!("skipping the in-network half: {why}");
        return;
    }
    let net = common::netns::Net::new();
    let inside = client_from(IpAddr::V4(net.gateway()));
    let send = |rb: reqwest::blocking::RequestBuilder| oci::send(rb);
    let r = send(
        inside
            .get(server.url("/v2/team/app/manifests/v1"))
            .header("Accept", oci::OCI_MANIFEST),
    );
    r.assert_status(200);
    assert_eq!(r.body, image.manifest);
    assert_eq!(r.header("Docker-Content-Digest"), image.digest);
    assert!(from_data_plane(&r), "{}", r.describe());
    let layer = &image.layers[1];
    let r = send(inside.get(server.url(&format!("/v2/team/app/blobs/{}", common::sha256(layer)))));
    r.assert_status(200);
    assert_eq!(&r.body, layer);
    let r = send(inside.get(server.url("/v2/_lighter/metrics")));
    r.assert_status(200);
    let r = send(
        inside
            .post(server.url("/v2/team/app/blobs/uploads/"))
            .header("Content-Length", "0"),
    );
    assert_401(&server, &r, Some("repository:team/app:pull,push"), None);
    let r = send(inside.get(server.url("/v2/_catalog")));
    assert_eq!(r.json()["repositories"], json!(["team/app"]));
}

// issue 12: anonymous_cidrs, checked by the data plane too (no root needed: 127.0.0.2)
#[test]
fn anonymous_cidrs_admit_anonymous_pulls_only_from_their_networks() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        anonymous_cidrs: vec!["127.0.0.2/32".into()],
        ..Opts::default()
    });
    let image = push_image_as(&server, "team/app", "v1", 21, &basic(CI));
    let inside = client_from("127.0.0.2".parse().unwrap());
    for _ in 0..3 {
        let r = oci::send(
            inside
                .get(server.url("/v2/team/app/manifests/v1"))
                .header("Accept", oci::OCI_MANIFEST),
        );
        r.assert_status(200);
        assert_eq!(r.body, image.manifest);
        assert!(from_data_plane(&r), "{}", r.describe());
        let digest = common::sha256(&image.layers[0]);
        let r = oci::send(inside.get(server.url(&format!("/v2/team/app/blobs/{digest}"))));
        r.assert_status(200);
        assert_eq!(r.body, image.layers[0]);

        let r = get_manifest_as(&server, "team/app", "v1", &Cred::None);
        assert_401(&server, &r, Some("repository:team/app:pull"), None);
    }
}

// ---- /v2/ ------------------------------------------------------------------------------------

// token spec "How to authenticate": /v2/ says whether the client's credentials work
#[test]
fn base_endpoint_is_401_without_credentials_and_200_with_credentials_that_check_out() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let r = get_as(&server, "/v2/", &Cred::None);
    assert_401(&server, &r, None, None);
    assert_eq!(
        r.header("WWW-Authenticate"),
        format!(
            "Bearer realm=\"http://{}/v2/_lighter/token\",service=\"lighter\"",
            server.host()
        )
    );
    assert_401(&server, &head_as(&server, "/v2/", &Cred::None), None, None);

    for ok in [basic(CI), basic(BOB), basic(RITA)] {
        let r = get_as(&server, "/v2/", &ok);
        r.assert_status(200);
        head_as(&server, "/v2/", &ok).assert_status(200);
    }
    // A token (even an anonymous one) is a credential that checks out; the data plane answers.
    for t in [
        token(&server, &Cred::None, &[]),
        token(&server, &basic(CI), &["repository:team/app:pull"]),
    ] {
        get_as(&server, "/v2/", &Cred::bearer(&t)).assert_status(200);
        head_as(&server, "/v2/", &Cred::bearer(&t)).assert_status(200);
    }
    let r = get_as(&server, "/v2/", &Cred::Basic("ci".into(), "nope".into()));
    assert_401(&server, &r, None, Some("invalid_token"));
    // The realm follows the Host the client used.
    let raw = server
        .raw(b"GET /v2/ HTTP/1.1\r\nHost: registry.example:5000\r\nConnection: close\r\n\r\n");
    assert_eq!(oci::raw_status(&raw), Some(401), "{raw}");
    assert!(
        raw.contains("realm=\"http://registry.example:5000/v2/_lighter/token\""),
        "{raw}"
    );
}

// ---- the token flow ----------------------------------------------------------------------------

// token spec "Requesting a Token": the token grants, of each scope asked, what the rules allow
#[test]
fn token_grants_of_each_scope_only_what_the_rules_allow() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let r = token_get(&server, &Cred::None, &["repository:team/app:pull,push"]);
    r.assert_status(200);
    let v = r.json();
    assert_eq!(v["token"], v["access_token"]);
    assert_eq!(v["expires_in"], 300);
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'), "{v}");
    let t = v["token"].as_str().unwrap();
    let c = claims(t);
    assert_eq!(c["iss"], "lighter");
    assert_eq!(c["aud"], "lighter");
    assert_eq!(c["sub"], "");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 300);
    let now = unix_now();
    assert!(c["exp"].as_u64().unwrap().abs_diff(now + 300) <= 5, "{c}");
    let grants = |cred: &Cred, scopes: &[&str]| access(&token(&server, cred, scopes));
    let pull = vec!["pull".to_string()];
    let all = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        access(t).into_iter().collect::<Vec<_>>(),
        vec![("team/app".to_string(), pull.clone())]
    );

    assert!(grants(&Cred::None, &["repository:private/secret:pull"]).is_empty());
    let ci = grants(
        &basic(CI),
        &[
            "repository:team/app:*",
            "repository:private/secret:pull,push,delete",
        ],
    );
    assert_eq!(ci["team/app"], all(&["delete", "pull", "push"]));
    assert_eq!(ci["private/secret"], all(&["pull", "push"]));
    assert_eq!(claims(&token(&server, &basic(CI), &[]))["sub"], "ci");
    let bob = grants(
        &basic(BOB),
        &[
            "repository:team/app:pull,push",
            "repository:private/secret:pull",
        ],
    );
    assert_eq!(bob.len(), 1, "{bob:?}");
    assert_eq!(bob["team/app"], pull);
    let rita = grants(&basic(RITA), &["repository:private/secret:*"]);
    assert_eq!(rita["private/secret"], pull);
    // Scopes space-separated in one parameter count as several, as containerd sends them.
    let both = grants(&basic(CI), &["repository:a/b:pull repository:c:push"]);
    assert_eq!(both["a/b"], pull);
    assert_eq!(both["c"], all(&["push"]));
    // The catalog scope is a `registry` resource (the listing is filtered anyway).
    let t = token(&server, &Cred::None, &["registry:catalog:*"]);
    assert_eq!(
        claims(&t)["access"],
        serde_json::json!([{"type": "registry", "name": "catalog", "actions": ["*"]}])
    );
    // Bad scopes and other resource types grant nothing, and are no error.
    assert!(grants(
        &basic(CI),
        &[
            "registry:other:*",
            "repository:../x:pull",
            "repository:x:admin",
            "nonsense"
        ]
    )
    .is_empty());
    // Wrong credentials are no token.
    let r = token_get(
        &server,
        &Cred::Basic("ci".into(), "wrong".into()),
        &["repository:team/app:pull"],
    );
    assert_401(&server, &r, None, Some("invalid_token"));
}

// token spec "Using the Bearer token": a token pulls manifests and blobs at the registry port
#[test]
fn tokens_pull_manifests_and_blobs_at_the_registry_port() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    let public = push_image_as(&server, "team/app", "v1", 30, &ci);
    let secret = push_image_as(&server, "private/secret", "v1", 31, &ci);

    // Anonymously, then as rita (a reader of private/).
    let anon = token(&server, &Cred::None, &["repository:team/app:pull"]);
    for _ in 0..2 {
        // Twice: the second time from the data plane's cache of verified tokens.
        assert_pulls_from_data_plane(&server, "team/app", "v1", &public, &Cred::bearer(&anon));
    }
    let rita = token(&server, &basic(RITA), &["repository:private/secret:pull"]);
    assert_eq!(access(&rita)["private/secret"], vec!["pull".to_string()]);
    for _ in 0..2 {
        assert_pulls_from_data_plane(
            &server,
            "private/secret",
            "v1",
            &secret,
            &Cred::bearer(&rita),
        );
    }
    // Ranges work with a token too.
    let layer = &secret.layers[1];
    let r = oci::send(
        Cred::bearer(&rita).apply(
            oci::request(
                &server,
                Method::GET,
                &format!("/v2/private/secret/blobs/{}", common::sha256(layer)),
            )
            .header("Range", "bytes=10-19"),
        ),
    );
    r.assert_status(206);
    assert_eq!(r.body, &layer[10..20]);
    // "bearer" in any case.
    let r = get_manifest_as(
        &server,
        "private/secret",
        "v1",
        &Cred::Raw(format!("bEaReR {rita}")),
    );
    r.assert_status(200);
    assert_eq!(r.body, secret.manifest);
}

// token spec: a token is for the scopes it lists: one for repository A does not pull B
#[test]
fn a_token_for_one_repository_does_not_pull_another() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    let public = push_image_as(&server, "team/app", "v1", 32, &ci);
    let secret = push_image_as(&server, "private/secret", "v1", 33, &ci);
    for cred in [Cred::None, basic(BOB)] {
        let t = token(
            &server,
            &cred,
            &["repository:team/app:pull", "repository:private/secret:pull"],
        );
        assert_eq!(access(&t).keys().collect::<Vec<_>>(), vec!["team/app"]);
        let t = Cred::bearer(&t);
        assert_pulls(&server, "team/app", "v1", &public, &t);
        // Without credentials a client is told to log in (401); bob is known and refused.
        let (status, code) = match cred {
            Cred::None => (401, "UNAUTHORIZED"),
            _ => (403, "DENIED"),
        };
        assert_no_content(&server, "private/secret", "v1", &secret, &t, status, code);
        let r = post_blob_as(&server, "team/app", b"more", &t);
        assert!(matches!(r.status, 401 | 403), "{}", r.describe());
    }
}

// token spec "OAuth2 Token" (the POST form containerd sends first)
#[test]
fn token_post_form_flow_gives_an_access_token_that_pulls() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let secret = push_image_as(&server, "private/secret", "v1", 34, &basic(CI));
    let post = |form: &[(&str, &str)]| token_post(&server, form);
    let r = post(&[
        ("grant_type", "password"),
        ("username", RITA.0),
        ("password", RITA.1),
        (
            "scope",
            "repository:private/secret:pull repository:team/app:pull,push",
        ),
        ("service", "lighter"),
        ("client_id", "containerd-test"),
    ]);
    r.assert_status(200);
    let v = r.json();
    assert!(v.get("token").is_none(), "{v}");
    assert_eq!(v["expires_in"], 300);
    assert!(v["issued_at"].is_string(), "{v}");
    let t = v["access_token"].as_str().unwrap().to_string();
    let a = access(&t);
    assert_eq!(a["private/secret"], vec!["pull".to_string()]);
    assert_eq!(a["team/app"], vec!["pull".to_string()]);
    assert_eq!(claims(&t)["sub"], "rita");
    assert_pulls_from_data_plane(&server, "private/secret", "v1", &secret, &Cred::bearer(&t));

    let r = post(&[
        ("grant_type", "password"),
        ("username", RITA.0),
        ("password", "wrong"),
        ("scope", "repository:private/secret:pull"),
    ]);
    r.assert_error(401, "UNAUTHORIZED");
    let r = post(&[
        ("grant_type", "password"),
        ("username", "nobody"),
        ("password", "x"),
    ]);
    r.assert_error(401, "UNAUTHORIZED");
    for form in [
        &[("grant_type", "refresh_token"), ("refresh_token", "x")][..],
        &[("grant_type", "client_credentials")],
        &[("username", RITA.0), ("password", RITA.1)],
        &[("grant_type", "password"), ("username", RITA.0)],
    ] {
        let r = post(form);
        assert_eq!(r.status, 400, "{form:?}: {}", r.describe());
        r.error_codes();
    }
    // Other methods are not the token endpoint's.
    let r = call(&server, Method::DELETE, "/v2/_lighter/token", &Cred::None);
    r.assert_error(405, "UNSUPPORTED");
}

// RFC 6750 3.1 invalid_token; issue 12: a forged or expired token at the registry port must not
// get content
#[test]
fn forged_expired_alg_none_and_wrong_audience_tokens_get_401_and_no_content() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    let secret = push_image_as(&server, "private/secret", "v1", 40, &ci);
    let public = push_image_as(&server, "team/app", "v1", 41, &ci);
    let grant: &[(&str, &[&str])] = &[
        ("private/secret", &["pull", "push"]),
        ("team/app", &["pull"]),
    ];
    // A genuine token first, so the data plane's cache holds one.
    let good = token(&server, &basic(RITA), &["repository:private/secret:pull"]);
    assert_pulls_from_data_plane(
        &server,
        "private/secret",
        "v1",
        &secret,
        &Cred::bearer(&good),
    );

    let now = unix_now();
    let mut expired = claims_for("lighter", "ci", "lighter", grant);
    expired["exp"] = json!(now - 120);
    expired["iat"] = json!(now - 420);
    expired["nbf"] = json!(now - 420);
    let mut future = claims_for("lighter", "ci", "lighter", grant);
    future["nbf"] = json!(now + 600);
    let other_key = {
        let path = fx.path("other-ed25519.pem");
        let out = Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519", "-out"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let pem = std::fs::read(&path).unwrap();
        jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap()
    };
    let sign_other = |c: &serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            c,
            &other_key,
        )
        .unwrap()
    };
    let genuine = claims_for("lighter", "ci", "lighter", grant);
    // The genuine token's signature over claims granting more.
    let spliced = {
        let forged = sign_other(&genuine);
        let g: Vec<&str> = good.split('.').collect();
        let f: Vec<&str> = forged.split('.').collect();
        format!("{}.{}.{}", g[0], f[1], g[2])
    };
    let tampered = {
        let mut t = good.clone().into_bytes();
        let i = t.len() - 5;
        t[i] = if t[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).unwrap()
    };
    let bad = [
        ("expired", sign_own(&server, &expired)),
        ("not valid yet", sign_own(&server, &future)),
        (
            "another audience",
            sign_own(&server, &claims_for("lighter", "ci", "elsewhere", grant)),
        ),
        (
            "another issuer",
            sign_own(&server, &claims_for("harbor", "ci", "lighter", grant)),
        ),
        ("another key", sign_other(&genuine)),
        ("alg none", unsigned(&genuine)),
        (
            "alg none, no dot",
            unsigned(&genuine).trim_end_matches('.').to_string(),
        ),
        ("spliced payload", spliced),
        ("tampered signature", tampered),
        (
            "HS256 keyed with nothing secret",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &genuine,
                &jsonwebtoken::EncodingKey::from_secret(b""),
            )
            .unwrap(),
        ),
    ];
    for (what, t) in &bad {
        let cred = Cred::bearer(t);
        for (repo, image) in [("private/secret", &secret), ("team/app", &public)] {
            // Even where anonymous may pull, bad credentials are refused (and counted).
            let r = assert_no_content(&server, repo, "v1", image, &cred, 401, "UNAUTHORIZED");
            assert_401(&server, &r, None, Some("invalid_token"));
        }
        let r = get_as(&server, "/v2/", &cred);
        assert_eq!(r.status, 401, "{what}: /v2/: {}", r.describe());
        let r = post_blob_as(&server, "private/secret", b"forged push", &cred);
        assert_eq!(r.status, 401, "{what}: push: {}", r.describe());
        // Nor can it be exchanged for a genuine token.
        let r = token_get(&server, &cred, &["repository:private/secret:pull"]);
        assert_eq!(r.status, 401, "{what}: token endpoint: {}", r.describe());
    }
    // The genuine token still works.
    assert_pulls(
        &server,
        "private/secret",
        "v1",
        &secret,
        &Cred::bearer(&good),
    );
}

// ---- bad Authorization headers -----------------------------------------------------------------

// RFC 7617 (Basic) + RFC 6750: malformed credentials are 401 invalid_token, never a 500
#[test]
fn garbage_authorization_headers_are_401_and_the_server_keeps_serving() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let image = push_image_as(&server, "team/app", "v1", 50, &basic(CI));
    use base64::Engine as _;
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let headers = [
        "Basic".to_string(),
        "Basic ".to_string(),
        "Basic !!!!".to_string(),
        "Basic ====".to_string(),
        format!("Basic {}", b64(b"no-colon")),
        format!("Basic {}", b64(b":password-without-user")),
        format!("Basic {}", b64(b"ci:")),
        format!("Basic {}", b64(b"ci:ci-secret\n")),
        format!("Basic {}", b64(b"\xff\xfe:\xfd")),
        format!("Basic {}", b64(b"c\ti:ci-secret")),
        format!("Basic {}", b64(b"nobody:nothing")),
        format!("Basic {} trailing", b64(b"ci:ci-secret")),
        "Bearer".to_string(),
        "Bearer ".to_string(),
        "Bearer a.b.c".to_string(),
        "Bearer ....".to_string(),
        "Bearer eyJ.eyJ.x".to_string(),
        "Bearer eyJhbGciOiJFZERTQSJ9.e30.AAAA".to_string(),
        "Digest username=\"ci\"".to_string(),
        "Negotiate YIIB".to_string(),
        "ci:ci-secret".to_string(),
        "x".repeat(8000),
    ];
    for h in &headers {
        let cred = Cred::Raw(h.clone());
        let short = &h[..h.len().min(60)];
        for path in ["/v2/", "/v2/team/app/manifests/v1", "/v2/_catalog"] {
            let r = get_as(&server, path, &cred);
            assert_eq!(r.status, 401, "{short:?} on {path}: {}", r.describe());
            assert_401(&server, &r, None, Some("invalid_token"));
        }
        let r = post_blob_as(&server, "team/app", b"x", &cred);
        assert_eq!(r.status, 401, "{short:?} push: {}", r.describe());
    }
    // Bytes no HTTP client library would send (raw): not ASCII text.
    for value in [
        &b"Basic \xff\xfe\xfd"[..],
        b"Bearer \x80\x81.\x82.\x83",
        b"\xc3\x28",
    ] {
        let mut req =
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: ".to_vec();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        let raw = server.raw(&req);
        let status = oci::raw_status(&raw);
        assert!(matches!(status, Some(400 | 401)), "{value:?}: {raw}");
    }
    // Still serving, to everyone.
    assert_pulls(&server, "team/app", "v1", &image, &Cred::None);
    assert_pulls(&server, "team/app", "v1", &image, &basic(CI));
    get_as(&server, "/v2/", &basic(CI)).assert_status(200);
    assert!(server.log_lines().iter().all(|l| !l.contains("panicked")));
}

// issue 12: authorization_size_max_bytes; an oversized header is a 401, not a 500
#[test]
fn oversized_authorization_header_is_401_and_the_server_keeps_serving() {
    let fx = Fixture::new();
    // The request head limit (default 16 KiB, 431 past it) raised so the header reaches the
    // credential check.
    let server = fx.start_with(&Opts {
        top: "request_header_size_max_bytes = 65536".into(),
        ..Opts::default()
    });
    let image = push_image_as(&server, "team/app", "v1", 51, &basic(CI));
    let big = "A".repeat(20 * 1024);
    for cred in [
        Cred::Raw(format!("Basic {big}")),
        Cred::Raw(format!("Bearer {big}")),
        Cred::Basic("ci".into(), big.clone()),
        // Just over authorization_size_max_bytes (8192).
        Cred::Raw(format!("Bearer {}", "B".repeat(8200))),
    ] {
        for path in ["/v2/", "/v2/team/app/manifests/v1"] {
            let r = get_as(&server, path, &cred);
            assert_401(&server, &r, None, Some("invalid_token"));
        }
        let r = token_get(&server, &cred, &["repository:team/app:pull"]);
        assert_401(&server, &r, None, Some("invalid_token"));
    }
    assert_pulls(&server, "team/app", "v1", &image, &Cred::None);
    get_as(&server, "/v2/", &basic(CI)).assert_status(200);

    // With the default head limit, 20 KB is a 431 before any credential check (not a 500).
    let server = fx.start_with(&Opts::default());
    let raw = server.raw(
        format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {big}\r\n\r\n").as_bytes(),
    );
    assert_eq!(
        oci::raw_status(&raw),
        Some(431),
        "{}",
        &raw[..raw.len().min(300)]
    );
    get_as(&server, "/v2/", &basic(CI)).assert_status(200);
}

// issue 12: an unknown user is a 401 like a wrong password, and costs about the same time
#[test]
fn unknown_user_is_401_and_takes_about_as_long_as_a_wrong_password() {
    let fx = Fixture {
        dir: tempfile::tempdir().unwrap(),
    };
    // Cost 10: a bcrypt check long enough to measure over loopback noise.
    fx.add_user_cost(("slow", "slow-secret"), 10);
    fx.write_groups("");
    let server = fx.start_with(&Opts::default());
    let timed = |user: &str| {
        let start = Instant::now();
        let r = get_as(&server, "/v2/", &Cred::Basic(user.into(), "wrong".into()));
        assert_401(&server, &r, None, Some("invalid_token"));
        start.elapsed()
    };
    let (mut wrong, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..6 {
        wrong.push(timed("slow"));
        unknown.push(timed(&format!("nobody{i}")));
    }
    wrong.sort();
    unknown.sort();
    let (w, u) = (wrong[3], unknown[3]);
    eprintln!("median wrong password {w:?}, unknown user {u:?}");
    assert!(
        u * 2 >= w && w * 2 >= u,
        "an unknown user ({u:?}) must cost about what a wrong password ({w:?}) costs"
    );
    get_as(
        &server,
        "/v2/",
        &Cred::Basic("slow".into(), "slow-secret".into()),
    )
    .assert_status(200);
}

// ---- throttling ----------------------------------------------------------------------------------

// RFC 6585 4: past failures_max failed authentications within the window, 429 + Retry-After
#[test]
fn repeated_failures_get_429_with_retry_after_and_are_counted() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        failures_max: 3,
        ..Opts::default()
    });
    let image = push_image_as(&server, "team/app", "v1", 60, &basic(CI));
    let before = metrics(&server, &Cred::None);
    let wrong = Cred::Basic("ci".into(), "wrong".into());
    for _ in 0..3 {
        let r = get_as(&server, "/v2/", &wrong);
        assert_401(&server, &r, None, Some("invalid_token"));
    }
    let assert_429 = |r: &Reply| {
        r.assert_error(429, "TOOMANYREQUESTS");
        let secs: u64 = r
            .header("Retry-After")
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
    };
    assert_429(&get_as(&server, "/v2/", &wrong));
    // Right credentials too: the client is not heard until the window ends.
    assert_429(&get_as(&server, "/v2/", &basic(CI)));
    assert_429(&get_manifest_as(&server, "team/app", "v1", &basic(CI)));
    assert_429(&post_blob_as(&server, "team/app", b"x", &basic(CI)));
    assert_429(&token_get(
        &server,
        &basic(CI),
        &["repository:team/app:pull"],
    ));
    assert_429(&token_post(
        &server,
        &[
            ("grant_type", "password"),
            ("username", CI.0),
            ("password", CI.1),
        ],
    ));
    let r = head_as(&server, "/v2/", &wrong);
    assert_eq!(r.status, 429);
    assert!(r.header_opt("Retry-After").is_some());
    // Requests without credentials are not throttled: they do not authenticate.
    assert_pulls(&server, "team/app", "v1", &image, &Cred::None);

    let after = metrics(&server, &Cred::None);
    let grew = |name: &str| after[name] - before.get(name).copied().unwrap_or(0);
    assert_eq!(grew("lighter_auth_failures_total"), 3);
    assert!(grew("lighter_auth_throttled_total") >= 7, "{after:?}");
}

// issue 12: failures_window_ms: the throttle ends with the window; POST failures count too
#[test]
fn throttling_ends_with_its_window_and_token_posts_count_as_failures() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        failures_max: 2,
        failures_window_ms: 1500,
        ..Opts::default()
    });
    let post = |password: &str| {
        token_post(
            &server,
            &[
                ("grant_type", "password"),
                ("username", CI.0),
                ("password", password),
            ],
        )
    };
    post("wrong").assert_error(401, "UNAUTHORIZED");
    post("wrong").assert_error(401, "UNAUTHORIZED");
    let r = post(CI.1);
    r.assert_error(429, "TOOMANYREQUESTS");
    let secs: u64 = r.header("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    get_as(&server, "/v2/", &basic(CI)).assert_error(429, "TOOMANYREQUESTS");
    assert!(
        eventually(Duration::from_secs(4), || get_as(
            &server,
            "/v2/",
            &basic(CI)
        )
        .status
            == 200),
        "still throttled after the window"
    );
    post(CI.1).assert_status(200);
}

// ---- admin endpoints -----------------------------------------------------------------------------

// issue 12: _lighter/gc, _lighter/prefetch and _lighter/metrics need `admin` (and issue 15's
// _lighter/retention)
#[test]
fn admin_endpoints_need_admin_and_metrics_are_opened_by_their_rule() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let r = call(&server, Method::POST, "/v2/_lighter/gc", &Cred::None);
    assert_401(&server, &r, Some("registry:gc:admin"), None);
    assert_denied(&call(&server, Method::POST, "/v2/_lighter/gc", &basic(CI)));
    let r = call(&server, Method::POST, "/v2/_lighter/retention", &Cred::None);
    assert_401(&server, &r, Some("registry:retention:admin"), None);
    assert_denied(&call(
        &server,
        Method::POST,
        "/v2/_lighter/retention?dry_run=true",
        &basic(CI),
    ));
    assert_denied(&call(
        &server,
        Method::POST,
        "/v2/_lighter/prefetch?image=docker.io/library/busybox:latest",
        &basic(CI),
    ));
    let r = call(
        &server,
        Method::POST,
        "/v2/_lighter/prefetch?image=docker.io/library/busybox:latest",
        &Cred::None,
    );
    assert_401(&server, &r, Some("registry:prefetch:admin"), None);
    // A token never grants admin, whatever it asks for.
    let t = token(
        &server,
        &basic(CI),
        &["registry:gc:admin", "repository:_lighter/gc:admin"],
    );
    assert!(access(&t).is_empty());
    // Metrics: the rule opens them to everyone.
    let m = metrics(&server, &Cred::None);
    for name in [
        "lighter_auth_failures_total",
        "lighter_auth_throttled_total",
        "lighter_auth_denied_total",
        "lighter_auth_tokens_issued_total",
    ] {
        assert!(m.contains_key(name), "{name} missing: {m:?}");
    }
    assert!(m["lighter_auth_denied_total"] >= 4, "{m:?}");
    assert!(m["lighter_auth_tokens_issued_total"] >= 1, "{m:?}");
    metrics(&server, &basic(BOB));

    // With a rule making ci admin of gc.
    let server = fx.start_with(&Opts {
        tables: "[[auth.rules]]\nprefix = \"_lighter/gc\"\nadmin = [\"user:ci\"]\n".into(),
        ..Opts::default()
    });
    let r = call(&server, Method::POST, "/v2/_lighter/gc", &basic(CI));
    assert!(
        (200..300).contains(&r.status),
        "gc as its admin: {}",
        r.describe()
    );
    assert_denied(&call(&server, Method::POST, "/v2/_lighter/gc", &basic(BOB)));
    // gc is not prefetch.
    assert_denied(&call(
        &server,
        Method::POST,
        "/v2/_lighter/prefetch?image=docker.io/library/busybox:latest",
        &basic(CI),
    ));
}

// ---- mounts ----------------------------------------------------------------------------------------

// spec: Push / Mounting a blob from another repository, "If the registry does not support
// cross-repository mounting or is unable to mount the requested blob, it SHOULD return a 202";
// issue 12: only from a repository the caller may pull
#[test]
fn mount_from_a_repository_the_caller_may_not_pull_starts_an_upload_instead() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        tables: "[[auth.rules]]\nprefix = \"bob\"\npull = [\"anonymous\"]\npush = [\"user:bob\"]\n"
            .into(),
        ..Opts::default()
    });
    let ci = basic(CI);
    let secret = push_image_as(&server, "private/secret", "v1", 70, &ci);
    let public = push_image_as(&server, "team/app", "v1", 71, &ci);
    let hidden = common::sha256(&secret.layers[0]);
    let open = common::sha256(&public.layers[0]);
    let mount = |digest: &str, from: Option<&str>| {
        let q = match from {
            Some(f) => format!("mount={digest}&from={f}"),
            None => format!("mount={digest}"),
        };
        open_upload_as(&server, "bob/app", &q, &basic(BOB))
    };
    for from in [Some("private/secret"), None, Some("private")] {
        let r = mount(&hidden, from);
        assert_eq!(r.status, 202, "mount from {from:?}: {}", r.describe());
        assert!(
            r.header("Location").contains("/v2/bob/app/blobs/uploads/"),
            "{}",
            r.describe()
        );
        assert!(r.header_opt("Docker-Content-Digest").is_none());
    }
    let path = format!("/v2/bob/app/blobs/{hidden}");
    get_as(&server, &path, &basic(BOB)).assert_error(404, "BLOB_UNKNOWN");
    get_as(&server, &path, &ci).assert_error(404, "BLOB_UNKNOWN");
    get_as(&server, &path, &Cred::None).assert_error(404, "BLOB_UNKNOWN");

    // From a repository bob may pull: mounted.
    let r = mount(&open, Some("team/app"));
    r.assert_status(201);
    assert_eq!(r.header("Docker-Content-Digest"), open);
    let got = get_as(&server, &format!("/v2/bob/app/blobs/{open}"), &Cred::None);
    got.assert_status(200);
    assert_eq!(got.body, public.layers[0]);
    // And ci, who may pull private/, mounts from it.
    let r = open_upload_as(
        &server,
        "team/copy",
        &format!("mount={hidden}&from=private/secret"),
        &ci,
    );
    r.assert_status(201);
}

// ---- reloads ----------------------------------------------------------------------------------------

// issue 12: htpasswd is reloaded when it changes (checked at most once a second)
#[test]
fn htpasswd_changes_take_effect_within_seconds() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let dave = Cred::Basic("dave".into(), "dave-secret".into());
    assert_401(
        &server,
        &get_as(&server, "/v2/", &dave),
        None,
        Some("invalid_token"),
    );
    fx.add_user(("dave", "dave-secret"));
    assert!(
        eventually(Duration::from_secs(3), || get_as(&server, "/v2/", &dave)
            .status
            == 200),
        "a user added to htpasswd is not accepted within 3 s"
    );
    // Removed: refused again, although the server remembered the checked password.
    fx.remove_user("dave");
    assert!(
        eventually(Duration::from_secs(3), || get_as(&server, "/v2/", &dave)
            .status
            == 401),
        "a user removed from htpasswd is still accepted after 3 s"
    );
    // A changed password: the old one stops working, the new one works.
    get_as(&server, "/v2/", &basic(BOB)).assert_status(200);
    fx.add_user(("bob", "new-bob-secret"));
    assert!(
        eventually(Duration::from_secs(3), || get_as(
            &server,
            "/v2/",
            &basic(BOB)
        )
        .status
            == 401),
        "bob's old password still works 3 s after it changed"
    );
    get_as(
        &server,
        "/v2/",
        &Cred::Basic("bob".into(), "new-bob-secret".into()),
    )
    .assert_status(200);
}

// issue 12: the groups file is reloaded when it changes
#[test]
fn groups_file_changes_take_effect_within_seconds() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let secret = push_image_as(&server, "private/secret", "v1", 80, &basic(CI));
    assert_denied(&get_manifest_as(
        &server,
        "private/secret",
        "v1",
        &basic(BOB),
    ));
    fx.write_groups("readers: rita bob\n");
    assert!(
        eventually(Duration::from_secs(3), || {
            get_manifest_as(&server, "private/secret", "v1", &basic(BOB)).status == 200
        }),
        "bob, added to readers, cannot pull private/ after 3 s"
    );
    assert_pulls(&server, "private/secret", "v1", &secret, &basic(BOB));
    fx.write_groups("readers: bob\n");
    assert!(
        eventually(Duration::from_secs(3), || {
            get_manifest_as(&server, "private/secret", "v1", &basic(RITA)).status == 403
        }),
        "rita, removed from readers, still pulls private/ after 3 s"
    );
}

// ---- access control off ------------------------------------------------------------------------

// issue 12: without [[auth.rules]] everything is allowed, as before, and the log says so once
#[test]
fn access_control_is_off_without_rules_and_the_log_says_so_once() {
    let server = Server::start();
    let image = push_image_as(&server, "team/app", "v1", 90, &Cred::None);
    assert_pulls(&server, "team/app", "v1", &image, &Cred::None);
    get_as(&server, "/v2/", &Cred::None).assert_status(200);
    // Credentials are not looked at.
    get_as(&server, "/v2/", &Cred::Basic("x".into(), "y".into())).assert_status(200);
    assert_pulls(
        &server,
        "team/app",
        "v1",
        &image,
        &Cred::bearer("not.a.token"),
    );
    assert_eq!(catalog(&server, &Cred::None), set(&["team/app"]));
    get_as(&server, "/v2/_lighter/metrics", &Cred::None).assert_status(200);
    delete_as(
        &server,
        &format!("/v2/team/app/manifests/{}", image.digest),
        &Cred::None,
    )
    .assert_status(202);
    get_as(&server, "/v2/_lighter/token", &Cred::None).assert_error(404, "UNSUPPORTED");

    assert!(server
        .wait_for_log("access control is off", Duration::from_secs(5))
        .is_some());
    std::thread::sleep(Duration::from_millis(300));
    let said = server
        .log_lines()
        .iter()
        .filter(|l| l.contains("access control is off"))
        .count();
    assert_eq!(said, 1, "{:?}", server.log_lines());
    assert!(server
        .log_lines()
        .iter()
        .all(|l| !l.contains("access control on")));
}

// issue 12: and with rules, both planes say it is on
#[test]
fn access_control_on_is_logged_by_both_planes() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let cp = server.wait_for_log("access control on", Duration::from_secs(5));
    assert!(cp.is_some(), "{:?}", server.log_lines());
    assert!(server
        .wait_for_log(
            "pulls need the rules' consent or a token",
            Duration::from_secs(5)
        )
        .is_some());
    assert!(server
        .log_lines()
        .iter()
        .all(|l| !l.contains("access control is off")));
}

// ---- configuration errors -------------------------------------------------------------------------

/// Runs `lighter serve --config <text>`, expects it to fail; its stderr.
fn serve_fails(fx: &Fixture, text: &str) -> String {
    let config = fx.write_config(text);
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::BIN)
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data.path())
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(!status.success(), "lighter serve accepted:\n{text}\n{err}");
            return err;
        }
        if Instant::now() >= deadline {
            common::kill_tree(child.id());
            let _ = child.wait();
            panic!("lighter serve is still running 10 s after starting with:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// issue 12: htpasswd_file without rules is a config error naming the field
#[test]
fn htpasswd_file_without_rules_is_a_config_error_naming_the_field() {
    let fx = Fixture::new();
    let text = format!(
        "[auth]\nhtpasswd_file = {:?}\n",
        fx.htpasswd().to_string_lossy()
    );
    let err = serve_fails(&fx, &text);
    assert!(err.contains("auth.htpasswd_file"), "{err}");
    assert!(err.contains("[[auth.rules]]"), "{err}");
    let err = serve_fails(&fx, "[auth]\nanonymous_cidrs = [\"10.0.0.0/8\"]\n");
    assert!(err.contains("auth.anonymous_cidrs"), "{err}");
}

// issue 12: bad rules, principals and files stop `lighter serve` with the culprit named
#[test]
fn bad_auth_configurations_stop_lighter_serve_naming_the_culprit() {
    let fx = Fixture::new();
    let with_rule = |pull: &str| {
        format!(
            "[auth]\nhtpasswd_file = {:?}\n[[auth.rules]]\nprefix = \"\"\npull = [{pull}]\n",
            fx.htpasswd().to_string_lossy()
        )
    };
    for (pull, needle) in [
        ("\"everyone\"", "everyone"),
        ("\"serviceaccount:build\"", "serviceaccount:build"),
        ("\"user:\"", "user"),
        ("\"group:a b\"", "group:a b"),
    ] {
        let err = serve_fails(&fx, &with_rule(pull));
        assert!(err.contains(needle), "{pull}: {err}");
    }
    let cases = [
        (
            "[auth]\n[[auth.rules]]\nprefix = \"../x\"\npull = [\"anonymous\"]\n".to_string(),
            "prefix",
        ),
        (
            "[auth]\nanonymous_cidrs = [\"10.0.0.0/33\"]\n[[auth.rules]]\nprefix = \"\"\n"
                .to_string(),
            "10.0.0.0/33",
        ),
        (
            "[auth]\nfailures_mx = 3\n[[auth.rules]]\nprefix = \"\"\n".to_string(),
            "failures_mx",
        ),
        (
            "[auth]\n[[auth.rules]]\nprefix = \"\"\n[[auth.issuers]]\nissuer = \"harbor\"\npublic_key_file = \"/nonexistent/key.pem\"\n".to_string(),
            "harbor",
        ),
        (
            "[auth]\nhtpasswd_file = \"/nonexistent/htpasswd\"\n[[auth.rules]]\nprefix = \"\"\n"
                .to_string(),
            "/nonexistent/htpasswd",
        ),
    ];
    for (text, needle) in cases {
        let err = serve_fails(&fx, &text);
        assert!(err.contains(needle), "{text}\n{err}");
    }
    // A non-bcrypt htpasswd entry (MD5, htpasswd's old default) is refused, naming the user.
    run_htpasswd(&["-m", "-b"], &fx, ("md5user", "pw"));
    let err = serve_fails(&fx, &with_rule("\"anonymous\""));
    assert!(err.contains("md5user") && err.contains("bcrypt"), "{err}");
}

fn run_htpasswd(flags: &[&str], fx: &Fixture, (user, password): (&str, &str)) {
    let out = Command::new("htpasswd")
        .args(flags)
        .arg(fx.htpasswd())
        .arg(user)
        .arg(password)
        .output()
        .unwrap();
    assert!(out.status.success());
}

// ---- external issuers -------------------------------------------------------------------------------

/// A server trusting the RSA key `harbor` (issuer "harbor", audience "lighter") with the
/// documented rules. Returns the server and the issuer's private key path.
fn with_harbor(fx: &Fixture) -> (Server, std::path::PathBuf) {
    let (private, public) = fx.rsa_key("harbor");
    let tables = format!(
        "[[auth.issuers]]\nissuer = \"harbor\"\npublic_key_file = {:?}\naudience = \"lighter\"\n",
        public.to_string_lossy()
    );
    let server = fx.start_with(&Opts {
        tables,
        ..Opts::default()
    });
    (server, private)
}

// token spec "JWT": tokens of a configured issuer grant what their access claim lists
#[test]
fn external_issuer_tokens_pull_and_push_what_they_grant_and_nothing_else() {
    let fx = Fixture::new();
    let (server, harbor) = with_harbor(&fx);
    let secret = push_image_as(&server, "private/secret", "v1", 100, &basic(CI));
    let grant: &[(&str, &[&str])] = &[
        ("harbor/app", &["pull", "push"]),
        ("private/secret", &["pull"]),
    ];
    let t = sign_rsa(
        &harbor,
        &claims_for("harbor", "robot$builder", "lighter", grant),
    );
    let cred = Cred::bearer(&t);
    let image = push_image_as(&server, "harbor/app", "v1", 101, &cred);
    for _ in 0..2 {
        assert_pulls_from_data_plane(&server, "harbor/app", "v1", &image, &cred);
        assert_pulls_from_data_plane(&server, "private/secret", "v1", &secret, &cred);
    }
    get_as(&server, "/v2/", &cred).assert_status(200);
    // Not granted: delete, and push to private/secret (named: 403).
    assert_denied(&delete_as(
        &server,
        &format!("/v2/harbor/app/manifests/{}", image.digest),
        &cred,
    ));
    assert_denied(&post_blob_as(&server, "private/secret", b"x", &cred));
    // Not named at all: 401 with the scope to ask for.
    let r = post_blob_as(&server, "private/other", b"x", &cred);
    assert_401(
        &server,
        &r,
        Some("repository:private/other:pull,push"),
        Some("insufficient_scope"),
    );
    let pull_only = sign_rsa(
        &harbor,
        &claims_for(
            "harbor",
            "robot$reader",
            "lighter",
            &[("harbor/app", &["pull"])],
        ),
    );
    let r = get_manifest_as(&server, "private/secret", "v1", &Cred::bearer(&pull_only));
    assert_401(
        &server,
        &r,
        Some("repository:private/secret:pull"),
        Some("insufficient_scope"),
    );
    assert_pulls(
        &server,
        "harbor/app",
        "v1",
        &image,
        &Cred::bearer(&pull_only),
    );
}

// RFC 8725 2.1, 3.1: the algorithm the key allows, never a MAC keyed with the public key; the
// audience, expiry, issuer and signature are checked
#[test]
fn external_issuer_tokens_with_wrong_audience_expiry_key_or_algorithm_are_refused() {
    let fx = Fixture::new();
    let (server, harbor) = with_harbor(&fx);
    let secret = push_image_as(&server, "private/secret", "v1", 110, &basic(CI));
    let grant: &[(&str, &[&str])] = &[("private/secret", &["pull", "push"])];
    let good = claims_for("harbor", "robot", "lighter", grant);
    // The right token works, so what follows is refused for what it changes.
    assert_pulls(
        &server,
        "private/secret",
        "v1",
        &secret,
        &Cred::bearer(&sign_rsa(&harbor, &good)),
    );
    let (other, _) = fx.rsa_key("other");
    let public_pem = std::fs::read(fx.path("harbor.pub.pem")).unwrap();
    let hs256 = |secret: &[u8]| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &good,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    };
    let mut expired = good.clone();
    expired["exp"] = json!(unix_now() - 120);
    let ps256 = {
        // RSA-PSS with the right key is fine (the key type allows it): a control.
        let pem = std::fs::read(&harbor).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256),
            &good,
            &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        )
        .unwrap()
    };
    assert_pulls(
        &server,
        "private/secret",
        "v1",
        &secret,
        &Cred::bearer(&ps256),
    );
    let trimmed_pem = String::from_utf8_lossy(&public_pem).trim().to_string();
    let bad = [
        (
            "wrong audience",
            sign_rsa(&harbor, &claims_for("harbor", "robot", "elsewhere", grant)),
        ),
        ("expired", sign_rsa(&harbor, &expired)),
        ("another key", sign_rsa(&other, &good)),
        (
            "unknown issuer",
            sign_rsa(&harbor, &claims_for("evil", "robot", "lighter", grant)),
        ),
        ("HS256 keyed with the public key PEM", hs256(&public_pem)),
        (
            "HS256 keyed with the trimmed PEM",
            hs256(trimmed_pem.as_bytes()),
        ),
        ("alg none", unsigned(&good)),
    ];
    for (what, t) in &bad {
        let r = assert_no_content(
            &server,
            "private/secret",
            "v1",
            &secret,
            &Cred::bearer(t),
            401,
            "UNAUTHORIZED",
        );
        assert_401(&server, &r, None, Some("invalid_token"));
        let r = post_blob_as(&server, "private/secret", b"x", &Cred::bearer(t));
        assert_eq!(r.status, 401, "{what}: push: {}", r.describe());
    }
}

// issue 12: "external issuers' tokens grant only what they list": exchanging one at Lighter's
// token endpoint must not turn its subject into a Lighter user
#[test]
fn external_token_exchanged_at_the_token_endpoint_does_not_act_as_its_subject() {
    let fx = Fixture::new();
    let (server, harbor) = with_harbor(&fx);
    let secret = push_image_as(&server, "private/secret", "v1", 120, &basic(CI));
    // Harbor grants this robot nothing here; its subject happens to be "ci".
    let external = sign_rsa(&harbor, &claims_for("harbor", "ci", "lighter", &[]));
    let r = get_manifest_as(&server, "private/secret", "v1", &Cred::bearer(&external));
    assert_eq!(r.status, 401, "{}", r.describe());
    // Exchanged for a token of Lighter's own...
    let r = token_get(
        &server,
        &Cred::bearer(&external),
        &["repository:private/secret:pull"],
    );
    if r.status == 200 {
        let own = r.json()["token"].as_str().unwrap().to_string();
        assert!(access(&own).is_empty(), "{:?}", access(&own));
        // ... it must grant no more than the external token did.
        let own = Cred::bearer(&own);
        assert_no_content(
            &server,
            "private/secret",
            "v1",
            &secret,
            &own,
            403,
            "DENIED",
        );
        assert_denied(&post_blob_as(&server, "team/app", b"x", &own));
    }
}

// issue 12: htpasswd reloads revoke a user; a token outlives the user only by its lifetime, so
// Lighter's own token must not buy a fresh one
#[test]
fn a_removed_user_cannot_renew_tokens_with_a_token() {
    let fx = Fixture::new();
    fx.add_user(("dave", "dave-secret"));
    fx.write_groups("readers: rita dave\n");
    let server = fx.start_with(&Opts::default());
    let dave = Cred::Basic("dave".into(), "dave-secret".into());
    let t = token(&server, &dave, &["repository:private/secret:pull"]);
    fx.remove_user("dave");
    fx.write_groups("readers: rita\n");
    assert!(eventually(Duration::from_secs(3), || get_as(
        &server, "/v2/", &dave
    )
    .status
        == 401));
    // The old token still works until it expires (expected); it must not buy a new one.
    let r = token_get(
        &server,
        &Cred::bearer(&t),
        &["repository:private/secret:pull"],
    );
    assert_eq!(
        r.status,
        401,
        "a removed user's token was renewed: {}",
        r.describe()
    );
}

// RFC 6750 3.1: credentials that cannot be read are bad credentials (401 invalid_token), not
// no credentials
#[test]
fn unreadable_authorization_header_is_401_not_anonymous() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    push_image_as(&server, "team/app", "v1", 140, &basic(CI));
    let raw = server.raw(
        b"GET /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\nAuthorization: Basic \xff\xfe\xfd\r\n\r\n",
    );
    assert_eq!(oci::raw_status(&raw), Some(401), "{raw}");
    assert!(raw.contains("error=\"invalid_token\""), "{raw}");
}

// issue 12 + ARCHITECTURE "Repository isolation": a blob is served only from repositories that
// link it; a mirror's repository must not pick up another repository's blob by digest for a
// caller who may not pull that repository (it would be a mount without the `from` check)
#[test]
fn a_mirror_repository_does_not_serve_another_repositorys_blob_by_digest() {
    let fx = Fixture::new();
    // An upstream that is never reached: the leak needs no download.
    let server = fx.start_with(&Opts {
        top: "[[upstreams]]\nname = \"mirror.example\"\nurl = \"http://127.0.0.1:9\"\nconnect_timeout_ms = 200\n"
            .into(),
        ..Opts::default()
    });
    let secret = push_image_as(&server, "private/secret", "v1", 150, &basic(CI));
    let layer = &secret.layers[1];
    let digest = common::sha256(layer);
    let cases = [
        (
            format!("/v2/mirror.example/library/x/manifests/{}", secret.digest),
            &secret.manifest,
        ),
        (
            format!("/v2/mirror.example/library/x/blobs/{digest}"),
            layer,
        ),
        (
            format!("/v2/library/y/blobs/{digest}?ns=mirror.example"),
            layer,
        ),
    ];
    for (path, content) in &cases {
        for cred in [Cred::None, basic(BOB)] {
            let r = get_as(&server, path, &cred);
            assert!(
                r.status != 200 && r.body != **content,
                "{path} as {cred:?} served private/secret's content: {} {:?}",
                r.status,
                r.headers
            );
        }
    }
}

// token spec "Requesting a Token" (the token is for the scopes asked) and issue 12 ("the token
// grants only what the rules allow of each scope asked"): a pull token for one repository is
// not the user's password
#[test]
fn a_token_does_only_what_its_scopes_grant() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let ci = basic(CI);
    let secret = push_image_as(&server, "private/secret", "v1", 160, &ci);
    let public = push_image_as(&server, "team/app", "v1", 161, &ci);
    let t = token(&server, &ci, &["repository:team/app:pull"]);
    assert_eq!(access(&t).len(), 1);
    let t = Cred::bearer(&t);
    assert_pulls(&server, "team/app", "v1", &public, &t);
    // ci may do all of this, but not with this token: 403, and the challenge names the scope
    // to ask for (token spec, "insufficient_scope"; a 403 because clients that reuse one
    // token, like oras-py, ask for a new one only after a 403).
    assert_no_content(&server, "private/secret", "v1", &secret, &t, 403, "DENIED");
    let needs_scope = |r: &Reply, scope: &str| {
        r.assert_error(403, "DENIED");
        let c = r.header("WWW-Authenticate");
        assert!(c.contains("error=\"insufficient_scope\""), "{c}");
        assert!(c.contains(&format!("scope=\"{scope}\"")), "{c}");
    };
    needs_scope(
        &post_blob_as(&server, "team/app", b"not granted", &t),
        "repository:team/app:pull,push",
    );
    needs_scope(
        &delete_as(
            &server,
            &format!("/v2/team/app/manifests/{}", public.digest),
            &t,
        ),
        "repository:team/app:delete",
    );
    // Nothing was deleted.
    let r = get_manifest_as(&server, "team/app", &public.digest, &Cred::None);
    r.assert_status(200);
}

// issue 12: names are checked after the same parsing on both planes: no path spelling reaches
// a private repository's content without credentials
#[test]
fn path_spellings_do_not_reach_private_content() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts::default());
    let secret = push_image_as(&server, "private/secret", "v1", 170, &basic(CI));
    let layer = common::sha256(&secret.layers[0]);
    let targets = [
        "/v2/private//secret/manifests/v1".to_string(),
        "/v2/private/./secret/manifests/v1".into(),
        "/v2/./private/secret/manifests/v1".into(),
        "/v2/team/../private/secret/manifests/v1".into(),
        "/v2/private/%73ecret/manifests/v1".into(),
        "/v2/private%2Fsecret/manifests/v1".into(),
        "/v2/%70rivate/secret/manifests/v1".into(),
        "/v2/Private/secret/manifests/v1".into(),
        "/v2/private/secret/manifests/v1?ns=".into(),
        "/v2/private/secret/manifests/v1;x".into(),
        "/v2/private/secret/manifests/v1#x".into(),
        "/v2/private/secret/manifests/v1/".into(),
        "//v2/private/secret/manifests/v1".into(),
        "http://127.0.0.1/v2/private/secret/manifests/v1".into(),
        format!("/v2/private/secret/manifests/{}", secret.digest),
        format!("/v2/private/secret/blobs/{layer}"),
        format!("/v2/private/secret/blobs/{layer}?ns=private"),
        format!("/v2/private/secret/blobs/{}", layer.to_uppercase()),
        format!("/v2/private/secret/blobs/%73ha256:{}", &layer[7..]),
        format!("/v2/private//secret/blobs/{layer}"),
        format!("/v2/_lighter/peer/blobs/{layer}?repo=private/secret"),
    ];
    for target in &targets {
        for method in ["GET", "HEAD"] {
            let raw = server.raw(
                format!(
                    "{method} {target} HTTP/1.1\r\nHost: x\r\nAccept: {}\r\nConnection: close\r\n\r\n",
                    oci::OCI_MANIFEST
                )
                .as_bytes(),
            );
            let status = oci::raw_status(&raw);
            assert!(
                status.is_some_and(|s| s >= 400),
                "{method} {target}: {}",
                &raw[..raw.len().min(400)]
            );
            assert!(!raw.contains("schemaVersion"), "{method} {target}: {raw}");
        }
    }
}

// issue 12: an upload session is reachable only through its repository (push there needed)
#[test]
fn another_users_upload_session_is_unknown_through_a_repository_one_may_push() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        tables: "[[auth.rules]]\nprefix = \"bob\"\npull = [\"anonymous\"]\npush = [\"user:bob\"]\n"
            .into(),
        ..Opts::default()
    });
    let ci = basic(CI);
    let r = open_upload_as(&server, "private/secret", "", &ci);
    r.assert_status(202);
    let location = oci::location_path(r.header("Location"));
    let id = location.rsplit('/').next().unwrap().to_string();
    let body = common::random_bytes(100, 171);
    let r = oci::send(ci.apply(oci::req::patch_upload(&server, &location, body.clone())));
    r.assert_status(202);

    let bob = basic(BOB);
    let theirs = format!("/v2/private/secret/blobs/uploads/{id}");
    let mine = format!("/v2/bob/app/blobs/uploads/{id}");
    assert_denied(&get_as(&server, &theirs, &bob));
    assert_401(
        &server,
        &get_as(&server, &theirs, &Cred::None),
        Some("repository:private/secret:pull,push"),
        None,
    );
    get_as(&server, &mine, &bob).assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    let digest = common::sha256(&body);
    let r = oci::send(bob.apply(oci::req::put_upload(&server, &mine, &digest, Vec::new())));
    r.assert_error(404, "BLOB_UPLOAD_UNKNOWN");
    get_as(&server, &format!("/v2/bob/app/blobs/{digest}"), &bob).assert_error(404, "BLOB_UNKNOWN");
    // The session is still ci's, whole.
    let r = get_as(&server, &location, &ci);
    r.assert_status(204);
    assert_eq!(r.header("Range"), "0-99");
}

// issue 12: principals `authenticated` (any user, not anonymous) and the longest prefix winning
// even when it grants more than a shorter one
#[test]
fn authenticated_means_any_user_and_a_longer_prefix_may_open_what_a_shorter_one_closes() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        tables: "[[auth.rules]]\nprefix = \"internal\"\npull = [\"authenticated\"]\npush = [\"user:ci\"]\n\n\
                 [[auth.rules]]\nprefix = \"private/open\"\npull = [\"anonymous\"]\npush = [\"user:ci\"]\n"
            .into(),
        ..Opts::default()
    });
    let ci = basic(CI);
    let internal = push_image_as(&server, "internal/tool", "v1", 180, &ci);
    let r = assert_no_content(
        &server,
        "internal/tool",
        "v1",
        &internal,
        &Cred::None,
        401,
        "UNAUTHORIZED",
    );
    assert_401(&server, &r, Some("repository:internal/tool:pull"), None);
    assert_pulls(&server, "internal/tool", "v1", &internal, &basic(BOB));
    let t = token(&server, &basic(BOB), &["repository:internal/tool:pull"]);
    assert_pulls_from_data_plane(&server, "internal/tool", "v1", &internal, &Cred::bearer(&t));
    assert!(access(&token(
        &server,
        &Cred::None,
        &["repository:internal/tool:pull"]
    ))
    .is_empty());

    let opened = push_image_as(&server, "private/open/app", "v1", 182, &ci);
    assert_pulls_from_data_plane(&server, "private/open/app", "v1", &opened, &Cred::None);
    let open = push_image_as(&server, "private/openness", "v1", 181, &ci);
    // private/openness is not under private/open (component boundary): private/ rules it.
    assert_no_content(
        &server,
        "private/openness",
        "v1",
        &open,
        &basic(BOB),
        403,
        "DENIED",
    );
}

// ---- the registry's own reports ---------------------------------------------------------------

/// The event log, usage and the inventory tell who pulled what and what runs where: each needs
/// `admin` of its `_lighter/<name>` prefix. Anonymous gets the Bearer challenge, a user the rules
/// do not name gets 403, the admin gets the report.
#[test]
fn events_usage_and_inventory_need_admin() {
    let fx = Fixture::new();
    let server = fx.start_with(&Opts {
        tables: ["_lighter/events", "_lighter/usage", "_lighter/inventory"]
            .iter()
            .map(|p| format!("[[auth.rules]]\nprefix = \"{p}\"\nadmin = [\"user:ci\"]\n"))
            .collect(),
        ..Opts::default()
    });
    for path in [
        "/v2/_lighter/events",
        "/v2/_lighter/usage",
        "/v2/_lighter/inventory",
    ] {
        let r = get_as(&server, path, &Cred::None);
        r.assert_error(401, "UNAUTHORIZED");
        let challenge = r.header_opt("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer "), "{path}: {challenge}");
        assert_denied(&get_as(&server, path, &basic(BOB)));
        let r = get_as(&server, path, &basic(CI));
        assert_eq!(r.status, 200, "{path} as ci: {}", r.describe());
    }
    let r = get_as(&server, "/v2/_lighter/inventory", &basic(CI));
    assert!(r.json()["entries"].is_array(), "{}", r.describe());
    let r = get_as(&server, "/v2/_lighter/usage", &basic(CI));
    assert!(r.json()["rows"].is_array(), "{}", r.describe());
}
