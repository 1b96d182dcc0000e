//! Real registry clients against a `lighter serve` with HTTPS on the registry port and access
//! control on (issue 12): podman, skopeo, buildah, containerd's `ctr` and oras-py log in or pass
//! credentials, verify the server's certificate against a test CA (no insecure flags anywhere),
//! and each is both let through where the rules allow and refused where they do not. Digests and
//! bytes are checked end to end, and refusals against what the server answered and logged.
//!
//! Every test starts its own server with the same users and rules:
//! - htpasswd: `ci` (password `secret`), `bob` (password `pw`);
//! - `""`: pull by anyone (`anonymous`), push and delete by `ci`;
//! - `private/`: pull and push by `ci` only.
//!
//! The containers tools get a private home per test as in `clients.rs` (vfs storage, their own
//! auth file, a permissive signature policy), but no registry marked insecure: the CA reaches
//! them with `--cert-dir`; containerd through a hosts directory naming the CA; oras-py as the
//! CA bundle it verifies with.
//!
//! Needs the clients installed (`bash .ci/run` installs them on Debian), `htpasswd` and
//! `openssl`; a missing one fails the test naming the install command.
//! `LIGHTER_SKIP_CLIENT_TESTS=1` skips every test here.

#[path = "common/clients_auth_helpers.rs"]
mod clients_auth_helpers;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clients_auth_helpers::SecureServer;
use common::clients::{
    clients_with, gunzip, hex, layer_digests_of, ok, refused, text, Ctr, Image, Tools, ACCEPT_ALL,
};
use common::containerd::Containerd;
use common::sha256;
use serde_json::{json, Value};

const USERS: &[(&str, &str)] = &[("ci", "secret"), ("bob", "pw")];

const RULES: &str = r#"[[auth.rules]]
prefix = ""
pull = ["anonymous"]
push = ["user:ci"]
delete = ["user:ci"]

[[auth.rules]]
prefix = "private/"
pull = ["user:ci"]
push = ["user:ci"]
"#;

/// `common::clients::clients`, with what `SecureServer` runs (`htpasswd`, `openssl`) required
/// too.
fn clients(names: &[&str]) -> bool {
    clients_with(names, &["htpasswd", "openssl"])
}

// ---------------------------------------------------------------------------------------------
// Images built by the tests (smaller than clients.rs's, one platform)
// ---------------------------------------------------------------------------------------------

impl Image {
    /// A linux/amd64 image; every layer's blob is 24 KiB and more of random bytes then 200 lines
    /// of text.
    fn new(seed: u64) -> Image {
        Self::with_large_layer(seed, 0)
    }

    /// Layer 1 holds `extra` more random (incompressible) bytes: a body the data plane encrypts
    /// over many writes, and an upload the control plane receives through the TLS relay.
    fn with_large_layer(seed: u64, extra: usize) -> Image {
        Image::build("amd64", seed, "lighter-clients-auth", None, |i| {
            let size = 24 * 1024 + 1000 * i as usize + if i == 1 { extra } else { 0 };
            (
                format!("layer {i} of image {seed}\n"),
                Image::blob(seed, i, size, 200),
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The containers tools over HTTPS: no registry marked insecure, the CA by `--cert-dir`
// ---------------------------------------------------------------------------------------------

impl Tools {
    /// skopeo copies the image from an OCI layout to `HOST/<reference>` as `ci`.
    fn push_as_ci(&self, img: &Image, reference: &str) {
        let flags = ["--dest-cert-dir", self.certs(), "--dest-creds", "ci:secret"];
        self.push(img, reference, &flags);
    }

    /// The registries named in the auth file (`podman login`'s record).
    fn logged_in(&self) -> Value {
        let raw = std::fs::read(self.path().join("auth.json")).unwrap();
        serde_json::from_slice::<Value>(&raw).unwrap()["auths"].clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Direct HTTPS checks (certificate verified against the test CA)
// ---------------------------------------------------------------------------------------------

/// GET a manifest with every manifest type accepted, anonymously or as `(user, password)`:
/// (status, body).
fn get_manifest(
    server: &SecureServer,
    user: Option<(&str, &str)>,
    repo: &str,
    reference: &str,
) -> (u16, Vec<u8>) {
    let mut req = server
        .client()
        .get(server.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Accept", ACCEPT_ALL);
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    let r = req.send().expect("GET manifest over HTTPS");
    let status = r.status().as_u16();
    (status, r.bytes().unwrap().to_vec())
}

/// GET a blob as `ci`: its bytes (asserting 200).
fn get_blob_as_ci(server: &SecureServer, repo: &str, digest: &str) -> Vec<u8> {
    let r = server
        .client()
        .get(server.url(&format!("/v2/{repo}/blobs/{digest}")))
        .basic_auth("ci", Some("secret"))
        .send()
        .expect("GET blob over HTTPS");
    assert_eq!(r.status().as_u16(), 200, "GET blob {digest} of {repo}");
    r.bytes().unwrap().to_vec()
}

/// The tags of `repo` as `ci` (none if the repository does not exist).
fn tags_as_ci(server: &SecureServer, repo: &str) -> Vec<String> {
    let r = server
        .client()
        .get(server.url(&format!("/v2/{repo}/tags/list")))
        .basic_auth("ci", Some("secret"))
        .send()
        .expect("GET tags over HTTPS");
    let status = r.status().as_u16();
    let body: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    if status == 404 {
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{body}");
        return Vec::new();
    }
    assert_eq!(status, 200, "tags of {repo}: {body}");
    let mut tags: Vec<String> = body["tags"]
        .as_array()
        .map(|a| a.iter().map(|t| t.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    tags.sort();
    tags
}

/// Asserts the server logged that the rules refused `action` on `repository` to `user` (`""`
/// for an anonymous caller).
fn assert_refusal_logged(server: &SecureServer, user: &str, repository: &str, action: &str) {
    let user_field = if user.is_empty() {
        "user=\"\"".to_string()
    } else {
        format!("user=\"{user}\"")
    };
    let found = server.log_matching(
        &[
            "refused by the access rules",
            &user_field,
            &format!("repository=\"{repository}\""),
            &format!("action=\"{action}\""),
        ],
        1,
    );
    assert!(
        !found.is_empty(),
        "the server did not log refusing {action} of {repository} to {user:?}:\n{}",
        server.log_text()
    );
}

// ---------------------------------------------------------------------------------------------
// podman
// ---------------------------------------------------------------------------------------------

/// podman over HTTPS, the CA from `--cert-dir`: `/v2/` challenges anonymous clients with the
/// token realm; `podman login` with a wrong password fails (and records nothing), with the right
/// one succeeds; as `ci` podman pushes an image to a public and a private repository (the digests
/// it reports are the manifests served) and a podman with empty storage pulls the private one
/// back by digest; logged in as `bob` instead, podman pulls the public image but its push is
/// denied and nothing lands, and its pull of the private one is denied.
#[test]
fn podman_logs_in_pushes_and_pulls_over_https_and_bob_is_denied() {
    if !clients(&["podman", "gzip"]) {
        return;
    }
    let server = SecureServer::start(USERS, RULES);
    let tools = server.tools();
    let host = server.host();
    let certs = tools.certs().to_string();
    let img = Image::new(1);

    let r = server.client().get(server.url("/v2/")).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string()),
        Some(format!(
            "Bearer realm=\"https://{host}/v2/_lighter/token\",service=\"lighter\""
        ))
    );

    // A wrong password.
    refused(
        &mut tools.podman(
            "a",
            &[
                "login",
                "--cert-dir",
                &certs,
                "-u",
                "ci",
                "-p",
                "wrong",
                &host,
            ],
        ),
        &["invalid username/password"],
    );
    assert_eq!(tools.logged_in(), json!({}), "a failed login was recorded");
    assert!(
        !server
            .log_matching(&["authentication failed", "wrong password"], 1)
            .is_empty(),
        "no failed authentication in the log:\n{}",
        server.log_text()
    );

    // The right one.
    let out = ok(&mut tools.podman(
        "a",
        &[
            "login",
            "--cert-dir",
            &certs,
            "-u",
            "ci",
            "-p",
            "secret",
            &host,
        ],
    ));
    assert!(text(&out).contains("Login Succeeded"), "{}", text(&out));
    assert_eq!(
        tools.logged_in()[&host]["auth"],
        "Y2k6c2VjcmV0",
        "auth.json records ci:secret"
    );

    // An image in local storage, pushed as ci to a public and a private repository.
    // podman names an image pulled from an OCI layout after the layout's path, which must then
    // be lowercase: a relative one, from the home (the working directory).
    let layout = tools.layout(&img);
    let relative = layout.replace(&format!("{}/", tools.path().display()), "");
    let id = text(&ok(&mut tools.podman("a", &["pull", "--quiet", &relative])));
    let config_hex = hex(&img.config_digest()).to_string();
    assert_eq!(id, config_hex, "podman's image id is the config digest");
    let mut pushed = Vec::new();
    for repo in ["team/app", "private/app"] {
        let digest = tools.pushed_digest(
            tools.podman(
                "a",
                &["push", "--quiet", "--cert-dir", &certs, "--format", "oci"],
            ),
            &id,
            &format!("{host}/{repo}:v1"),
        );
        let (status, body) = get_manifest(&server, Some(("ci", "secret")), repo, "v1");
        assert_eq!(status, 200, "{repo}:v1 as ci");
        assert_eq!(sha256(&body), digest, "podman's digest vs {repo}:v1 served");
        let m: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(m["config"]["digest"], img.config_digest(), "{m}");
        assert_eq!(layer_digests_of(&body).len(), 3, "{m}");
        for layer in layer_digests_of(&body) {
            let bytes = get_blob_as_ci(&server, repo, &layer);
            assert_eq!(sha256(&bytes), layer);
        }
        pushed.push(digest);
    }
    // Anonymous: the public manifest yes, the private one no.
    assert_eq!(
        get_manifest(&server, None, "team/app", "v1").0,
        200,
        "anonymous pull of the public image"
    );
    assert_eq!(
        get_manifest(&server, None, "private/app", "v1").0,
        401,
        "anonymous pull of the private image"
    );

    // Fresh storage, still logged in as ci: the private image by digest.
    let private_ref = format!("{host}/private/app@{}", pushed[1]);
    ok(&mut tools.podman(
        "b",
        &["pull", "--quiet", "--cert-dir", &certs, &private_ref],
    ));
    let out = ok(&mut tools.podman("b", &["image", "inspect", &private_ref]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["Id"], config_hex, "{v}");
    assert_eq!(v[0]["Digest"], pushed[1], "{v}");

    // bob: may pull what anyone may, may not push, may not pull private/.
    ok(&mut tools.podman("a", &["logout", &host]));
    assert_eq!(tools.logged_in(), json!({}), "logged out");
    ok(&mut tools.podman(
        "a",
        &[
            "login",
            "--cert-dir",
            &certs,
            "-u",
            "bob",
            "-p",
            "pw",
            &host,
        ],
    ));
    let public_ref = format!("{host}/team/app:v1");
    ok(&mut tools.podman("c", &["pull", "--quiet", "--cert-dir", &certs, &public_ref]));
    let out = ok(&mut tools.podman("c", &["image", "inspect", &public_ref]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["Digest"], pushed[0], "{v}");

    refused(
        &mut tools.podman(
            "a",
            &[
                "push",
                "--cert-dir",
                &certs,
                &id,
                &format!("{host}/team/bob:v1"),
            ],
        ),
        &["denied", "may not push team/bob"],
    );
    assert_refusal_logged(&server, "bob", "team/bob", "push");
    assert!(
        tags_as_ci(&server, "team/bob").is_empty(),
        "bob's refused push left tags"
    );
    refused(
        &mut tools.podman(
            "d",
            &[
                "pull",
                "--cert-dir",
                &certs,
                &format!("{host}/private/app:v1"),
            ],
        ),
        &["denied", "may not pull private/app"],
    );
    assert_refusal_logged(&server, "bob", "private/app", "pull");
}

// ---------------------------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------------------------

/// skopeo over HTTPS: without the CA it refuses the server's certificate; `copy` without
/// credentials or as bob is refused, `--dest-creds ci:secret` pushes to a public and a private
/// repository (the private image with a 6 MiB layer); `inspect` anonymously of the public one
/// serves the pushed manifest bytes and digest; of the private one `inspect` and `list-tags`
/// anonymously are refused, with a wrong password too (even of the public one), with `--creds
/// ci:secret` they work and `copy` brings the private image out byte for byte; as bob refused;
/// copied registry to registry as ci into a public repository, anyone pulls it; `delete` as bob
/// is refused (DENIED, 403, the manifest stays), anonymously too, as ci it works (404 after).
#[test]
fn skopeo_pushes_inspects_and_deletes_with_credentials() {
    if !clients(&["skopeo", "gzip"]) {
        return;
    }
    let server = SecureServer::start(USERS, RULES);
    let tools = server.tools();
    let certs = tools.certs().to_string();
    let public = Image::new(10);
    let private = Image::with_large_layer(11, 6 << 20);

    // Certificate verification is on: without the CA, no connection.
    refused(
        &mut tools.skopeo(&["inspect", "--raw", &tools.docker("team/app:v1")]),
        &["certificate signed by unknown authority"],
    );

    // Pushes without credentials, and as bob, are refused.
    refused(
        &mut tools.copy(
            &["--dest-cert-dir", &certs],
            &tools.layout(&public),
            &tools.docker("team/app:v1"),
        ),
        &["team/app"],
    );
    assert_refusal_logged(&server, "", "team/app", "push");
    refused(
        &mut tools.copy(
            &["--dest-cert-dir", &certs, "--dest-creds", "bob:pw"],
            &tools.layout(&public),
            &tools.docker("team/app:v1"),
        ),
        &["denied", "may not push team/app"],
    );
    assert!(tags_as_ci(&server, "team/app").is_empty());

    tools.push_as_ci(&public, "team/app:v1");
    tools.push_as_ci(&private, "private/app:v1");

    // Anonymous inspect of the public repository.
    let raw = ok(&mut tools.skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        &certs,
        &tools.docker("team/app:v1"),
    ]))
    .stdout;
    assert!(
        raw == public.manifest,
        "inspect --raw: {}",
        String::from_utf8_lossy(&raw)
    );
    let v: Value = serde_json::from_slice(
        &ok(&mut tools.skopeo(&[
            "inspect",
            "--cert-dir",
            &certs,
            &tools.docker("team/app:v1"),
        ]))
        .stdout,
    )
    .unwrap();
    assert_eq!(v["Digest"], public.digest, "{v}");
    assert_eq!(v["Layers"], json!(public.layer_digests()), "{v}");

    // Anonymous inspect of the private repository: refused. (How it is worded:
    // `anonymous_clients_are_told_unauthorized_not_denied`.)
    refused(
        &mut tools.skopeo(&[
            "inspect",
            "--raw",
            "--cert-dir",
            &certs,
            &tools.docker("private/app:v1"),
        ]),
        &["private/app"],
    );
    assert_refusal_logged(&server, "", "private/app", "pull");
    refused(
        &mut tools.skopeo(&[
            "list-tags",
            "--cert-dir",
            &certs,
            &tools.docker("private/app"),
        ]),
        &[],
    );

    // A wrong password is refused even where anonymous callers may pull.
    let failures = server.log_matching(&["authentication failed"], 0).len();
    refused(
        &mut tools.skopeo(&[
            "inspect",
            "--raw",
            "--cert-dir",
            &certs,
            "--creds",
            "ci:wrong",
            &tools.docker("team/app:v1"),
        ]),
        &["unauthorized"],
    );
    assert!(
        server
            .log_matching(&["authentication failed"], failures + 1)
            .len()
            > failures,
        "no failed authentication logged:\n{}",
        server.log_text()
    );

    // As ci.
    let listed: Value = serde_json::from_slice(
        &ok(&mut tools.skopeo(&[
            "list-tags",
            "--cert-dir",
            &certs,
            "--creds",
            "ci:secret",
            &tools.docker("private/app"),
        ]))
        .stdout,
    )
    .unwrap();
    assert_eq!(listed["Tags"], json!(["v1"]), "{listed}");
    let raw = ok(&mut tools.skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        &certs,
        "--creds",
        "ci:secret",
        &tools.docker("private/app:v1"),
    ]))
    .stdout;
    assert!(
        raw == private.manifest,
        "inspect --raw of private/app as ci"
    );
    let v: Value = serde_json::from_slice(
        &ok(&mut tools.skopeo(&[
            "inspect",
            "--cert-dir",
            &certs,
            "--creds",
            "ci:secret",
            &tools.docker("private/app:v1"),
        ]))
        .stdout,
    )
    .unwrap();
    assert_eq!(v["Digest"], private.digest, "{v}");
    let out = tools.path().join("out");
    ok(&mut tools.copy(
        &[
            "--preserve-digests",
            "--src-cert-dir",
            &certs,
            "--src-creds",
            "ci:secret",
        ],
        &tools.docker("private/app:v1"),
        &format!("oci:{}:v1", out.display()),
    ));
    for blob in private.blobs() {
        let path = out.join("blobs/sha256").join(hex(&sha256(blob)));
        assert!(
            std::fs::read(&path).ok().as_deref() == Some(blob),
            "{path:?} differs from what was pushed"
        );
    }

    // bob may not read private/ either.
    refused(
        &mut tools.skopeo(&[
            "inspect",
            "--raw",
            "--cert-dir",
            &certs,
            "--creds",
            "bob:pw",
            &tools.docker("private/app:v1"),
        ]),
        &["denied", "may not pull private/app"],
    );

    // Registry to registry as ci, private to public (source and destination credentials both);
    // then anyone may pull the copy, its large layer included.
    ok(&mut tools.copy(
        &[
            "--preserve-digests",
            "--src-cert-dir",
            &certs,
            "--src-creds",
            "ci:secret",
            "--dest-cert-dir",
            &certs,
            "--dest-creds",
            "ci:secret",
        ],
        &tools.docker("private/app:v1"),
        &tools.docker("team/published:v1"),
    ));
    let (status, body) = get_manifest(&server, None, "team/published", "v1");
    assert_eq!(status, 200, "anonymous pull of the copy");
    assert!(body == private.manifest, "the copy changed the manifest");
    let r = server
        .client()
        .get(server.url(&format!(
            "/v2/team/published/blobs/{}",
            sha256(&private.layers[1])
        )))
        .send()
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "anonymous pull of the large layer"
    );
    assert!(r.bytes().unwrap() == private.layers[1], "large layer bytes");

    // Delete: bob and anonymous refused, ci allowed.
    let by_digest = tools.docker(&format!("team/app@{}", public.digest));
    refused(
        &mut tools.skopeo(&[
            "delete",
            "--cert-dir",
            &certs,
            "--creds",
            "bob:pw",
            &by_digest,
        ]),
        &["DENIED", "may not delete team/app", "403 Forbidden"],
    );
    assert_refusal_logged(&server, "bob", "team/app", "delete");
    refused(
        &mut tools.skopeo(&["delete", "--cert-dir", &certs, &by_digest]),
        &["team/app"],
    );
    assert_refusal_logged(&server, "", "team/app", "delete");
    let (status, body) = get_manifest(&server, None, "team/app", &public.digest);
    assert_eq!(status, 200, "refused deletes removed the manifest");
    assert!(body == public.manifest);

    ok(&mut tools.skopeo(&[
        "delete",
        "--cert-dir",
        &certs,
        "--creds",
        "ci:secret",
        &by_digest,
    ]));
    let (status, body) = get_manifest(&server, None, "team/app", &public.digest);
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(tags_as_ci(&server, "team/app").is_empty());
    // The private image is untouched.
    let (status, body) = get_manifest(&server, Some(("ci", "secret")), "private/app", "v1");
    assert_eq!(status, 200);
    assert!(body == private.manifest);
}

/// What a client without credentials is told when the rules refuse it. Every token-flow client
/// without credentials, on the 401 challenge, asks the realm for an anonymous token (Lighter
/// issues one, granting what anonymous callers may do, here nothing on private/ and only pull
/// elsewhere) and retries with it. Lighter then takes that token for an identified caller and
/// answers 403 DENIED ("an anonymous token may not pull private/app"), so skopeo says "denied"
/// where it should say "unauthorized": the contract for requests without credentials is 401
/// with the challenge naming the scope (as Distribution's token authentication answers a token
/// lacking the scope: 401, `error="insufficient_scope"`), which tells the user and the client
/// that logging in may help.
#[test]
fn anonymous_clients_are_told_unauthorized_not_denied() {
    if !clients(&["skopeo", "gzip"]) {
        return;
    }
    let server = SecureServer::start(USERS, RULES);
    let tools = server.tools();
    let host = server.host();
    let certs = tools.certs().to_string();
    let img = Image::new(12);
    tools.push_as_ci(&img, "private/app:v1");

    // The exchange as the clients make it: no credentials, the challenge, an anonymous token,
    // the request again with it.
    let c = server.client();
    let manifest = server.url("/v2/private/app/manifests/v1");
    let r = c
        .get(&manifest)
        .header("Accept", ACCEPT_ALL)
        .send()
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "anonymous GET of a private manifest"
    );
    let challenge = |r: &reqwest::blocking::Response| {
        r.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        challenge(&r),
        format!(
            "Bearer realm=\"https://{host}/v2/_lighter/token\",service=\"lighter\",\
             scope=\"repository:private/app:pull\""
        )
    );
    let r = c
        .get(server.url("/v2/_lighter/token?service=lighter&scope=repository:private/app:pull"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "anonymous token request");
    let token: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    let token = token["token"].as_str().expect("token").to_string();
    let r = c
        .get(&manifest)
        .header("Accept", ACCEPT_ALL)
        .bearer_auth(&token)
        .send()
        .unwrap();
    let (status, www) = (r.status().as_u16(), challenge(&r));
    let body = String::from_utf8_lossy(&r.bytes().unwrap()).into_owned();

    // What skopeo says, pulling and pushing.
    let pull = refused(
        &mut tools.skopeo(&[
            "inspect",
            "--raw",
            "--cert-dir",
            &certs,
            &tools.docker("private/app:v1"),
        ]),
        &[],
    );
    let push = refused(
        &mut tools.copy(
            &["--dest-cert-dir", &certs],
            &tools.layout(&img),
            &tools.docker("team/app:v1"),
        ),
        &[],
    );
    assert!(
        status == 401
            && www.contains("scope=\"repository:private/app:pull\"")
            && www.contains("error=\"insufficient_scope\"")
            && pull.contains("unauthorized")
            && push.contains("unauthorized"),
        "GET of a private manifest with the anonymous token: {status}, WWW-Authenticate {www:?}, \
         {body}\nskopeo inspect without credentials said:\n{pull}\n\
         skopeo copy (push) without credentials said:\n{push}"
    );
}

// ---------------------------------------------------------------------------------------------
// buildah
// ---------------------------------------------------------------------------------------------

/// buildah over HTTPS: `buildah from --creds ci:secret` builds on a base in private/ (without
/// credentials it is refused), adds a file, commits; `buildah push --creds ci:secret` pushes it
/// (the digest buildah reports is the manifest served, the base layers unchanged under the new
/// one, which holds the file); `buildah push` without credentials is refused and nothing lands.
#[test]
fn buildah_pushes_with_credentials_and_is_refused_without() {
    if !clients(&["buildah", "skopeo", "gzip"]) {
        return;
    }
    let server = SecureServer::start(USERS, RULES);
    let tools = server.tools();
    let host = server.host();
    let certs = tools.certs().to_string();
    let base = Image::new(20);
    tools.push_as_ci(&base, "private/base:v1");
    let base_ref = format!("{host}/private/base:v1");

    refused(
        &mut tools.buildah(&["from", "--quiet", "--cert-dir", &certs, &base_ref]),
        &["private/base"],
    );
    assert_refusal_logged(&server, "", "private/base", "pull");
    let container = text(&ok(&mut tools.buildah(&[
        "from",
        "--quiet",
        "--cert-dir",
        &certs,
        "--creds",
        "ci:secret",
        "--name",
        "work",
        &base_ref,
    ])));
    assert_eq!(container, "work");
    let hello = tools.path().join("hello.txt");
    std::fs::write(&hello, "hello from buildah over https\n").unwrap();
    ok(&mut tools.buildah(&[
        "copy",
        "work",
        hello.to_str().unwrap(),
        "/etc/lighter/hello.txt",
    ]));
    ok(&mut tools.buildah(&["commit", "--quiet", "work", "localhost/built:1"]));

    // Without credentials: refused, nothing lands.
    refused(
        &mut tools.buildah(&[
            "push",
            "--quiet",
            "--cert-dir",
            &certs,
            "localhost/built:1",
            &tools.docker("team/built:1"),
        ]),
        &["team/built"],
    );
    assert_refusal_logged(&server, "", "team/built", "push");
    assert!(tags_as_ci(&server, "team/built").is_empty());

    // As ci.
    let pushed = tools.pushed_digest(
        tools.buildah(&[
            "push",
            "--quiet",
            "--cert-dir",
            &certs,
            "--creds",
            "ci:secret",
        ]),
        "localhost/built:1",
        &tools.docker("team/built:1"),
    );
    let raw = ok(&mut tools.skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        &certs,
        &tools.docker("team/built:1"),
    ]))
    .stdout;
    assert_eq!(
        sha256(&raw),
        pushed,
        "buildah's digest vs the served manifest"
    );
    let layers = layer_digests_of(&raw);
    assert_eq!(layers.len(), 4, "three base layers and buildah's");
    assert_eq!(layers[..3], base.layer_digests()[..], "base layers");
    let layer = get_blob_as_ci(&server, "team/built", &layers[3]);
    assert_eq!(sha256(&layer), layers[3]);
    let needle = b"hello from buildah over https\n";
    assert!(
        gunzip(&layer).windows(needle.len()).any(|w| w == needle),
        "buildah's layer does not hold hello.txt"
    );
}

// ---------------------------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------------------------

/// containerd (its own daemon) over HTTPS with the CA named in a hosts directory's `hosts.toml`:
/// without it the certificate is refused; it pulls and unpacks a public image anonymously and a
/// private one (with a 6 MiB layer) with `--user ci:secret` (asking its token with the OAuth2
/// POST form), each resolving to the pushed digest with every blob byte for byte; the private one
/// without credentials, or as bob, is refused. `ctr images push` as bob to a public repository
/// is refused (403) and leaves no tag; as ci to another private repository it lands unchanged.
#[test]
fn containerd_pulls_public_anonymously_and_private_with_user() {
    if !clients(&["containerd", "ctr", "skopeo", "gzip"]) {
        return;
    }
    let server = SecureServer::start(USERS, RULES);
    let tools = server.tools();
    let host = server.host();
    let public = Image::new(30);
    let private = Image::with_large_layer(31, 6 << 20);
    tools.push_as_ci(&public, "team/app:v1");
    tools.push_as_ci(&private, "private/app:v1");

    // The registry over HTTPS (containerd would use plain HTTP for 127.0.0.1 without a hosts
    // file), with the CA and without.
    let hosts_dir = |name: &str, ca: Option<PathBuf>| -> String {
        let dir = tools.path().join(name);
        std::fs::create_dir_all(dir.join(&host)).unwrap();
        let ca = ca.map_or(String::new(), |ca| {
            format!("ca = {:?}\n", ca.display().to_string())
        });
        std::fs::write(
            dir.join(&host).join("hosts.toml"),
            // containerd 1.6 wants a `host` table; the server's entry is tried too, so both
            // name the CA.
            format!(
                "server = \"https://{host}\"\n{ca}\n[host.\"https://{host}\"]\n\
                 capabilities = [\"pull\", \"resolve\", \"push\"]\n{ca}"
            ),
        )
        .unwrap();
        dir.display().to_string()
    };
    let hosts = hosts_dir("hosts.d", Some(server.ca()));
    let no_ca = hosts_dir("hosts-without-ca.d", None);

    let ctd = Containerd::start();
    let public_ref = format!("{host}/team/app:v1");
    let private_ref = format!("{host}/private/app:v1");

    // No CA: the certificate is refused.
    let out = ctd.ctr_try(&["images", "pull", "--hosts-dir", &no_ca, &public_ref]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("certificate signed by unknown authority"),
        "ctr without the CA: {said}"
    );

    // Public, anonymously.
    ctd.pull(
        &["--hosts-dir", &hosts, "--platform", "linux/amd64"],
        &public_ref,
    );
    assert_eq!(ctd.image_digest(&public_ref), public.digest);
    ctd.assert_content(&public.blobs());
    let top = Image::release(public.seed, 2);
    assert!(
        ctd.snapshots().iter().any(|s| {
            std::fs::read_to_string(s.join(Image::release_path())).ok() == Some(top.clone())
        }),
        "no unpacked snapshot with all layers applied"
    );

    // Private, without credentials and as bob: refused, nothing fetched.
    let out = ctd.pull_try(&["--hosts-dir", &hosts], &private_ref);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "anonymous ctr pull of private/: {said}"
    );
    assert_refusal_logged(&server, "", "private/app", "pull");
    let out = ctd.pull_try(&["--hosts-dir", &hosts, "--user", "bob:pw"], &private_ref);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && said.contains("403 Forbidden"),
        "ctr pull of private/ as bob: {said}"
    );
    assert_refusal_logged(&server, "bob", "private/app", "pull");
    assert!(
        !ctd.ctr_try(&["content", "get", &private.digest])
            .status
            .success(),
        "the private manifest reached containerd without credentials"
    );

    // Private, as ci.
    let out = ctd.pull(
        &[
            "--hosts-dir",
            &hosts,
            "--user",
            "ci:secret",
            "--http-dump",
            "--platform",
            "linux/amd64",
        ],
        &private_ref,
    );
    let dump = String::from_utf8_lossy(&out.stderr);
    assert!(
        dump.contains("POST /v2/_lighter/token"),
        "containerd did not ask its token with the OAuth2 form:\n{dump}"
    );
    assert_eq!(ctd.image_digest(&private_ref), private.digest);
    ctd.assert_content(&private.blobs());

    // Pushed back as ci to another private repository (its blobs mounted from private/app, the
    // token asked for both repositories); as bob, to a public repository, refused.
    let copy = format!("{host}/private/copy:v1");
    let bob_copy = format!("{host}/team/bobcopy:v1");
    ctd.ctr(&["images", "tag", &private_ref, &copy]);
    ctd.ctr(&["images", "tag", &private_ref, &bob_copy]);
    let out = ctd.ctr_try(&[
        "images",
        "push",
        "--hosts-dir",
        &hosts,
        "--user",
        "bob:pw",
        &bob_copy,
    ]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && said.contains("403 Forbidden"),
        "ctr push as bob: {said}"
    );
    assert_refusal_logged(&server, "bob", "team/bobcopy", "push");
    assert!(tags_as_ci(&server, "team/bobcopy").is_empty());
    ctd.ctr(&[
        "images",
        "push",
        "--hosts-dir",
        &hosts,
        "--user",
        "ci:secret",
        &copy,
    ]);
    let (status, body) = get_manifest(&server, Some(("ci", "secret")), "private/copy", "v1");
    assert_eq!(status, 200);
    assert!(
        body == private.manifest,
        "containerd's push changed the manifest"
    );
    for layer in &private.layers {
        assert!(get_blob_as_ci(&server, "private/copy", &sha256(layer)) == *layer);
    }
}

// ---------------------------------------------------------------------------------------------
// oras (Python)
// ---------------------------------------------------------------------------------------------

/// One oras-py step: `login USER PASSWORD` (recorded in `$HOME/.docker/config.json`),
/// `push REF FILE [chunked]` (with the credentials recorded, if any; `chunked`: POST, a PATCH per
/// MiB, PUT), or `pull REF`. Verifies the server's certificate against the CA bundle given.
const ORAS_SCRIPT: &str = r#"
import json, os, sys
import oras.client

host, ca, step = sys.argv[1], sys.argv[2], sys.argv[3]
client = oras.client.OrasClient(hostname=host, tls_verify=ca)
if step == "login":
    print(json.dumps(client.login(username=sys.argv[4], password=sys.argv[5], hostname=host)))
elif step == "push":
    r = client.push(
        target=f"{host}/{sys.argv[4]}",
        files=[f"{sys.argv[5]}:application/vnd.example.data.v1"],
        quiet=True,
        do_chunked=len(sys.argv) > 6 and sys.argv[6] == "chunked",
        chunk_size=1 << 20,
    )
    print(json.dumps({"status": r.status_code, "digest": r.headers.get("Docker-Content-Digest")}))
elif step == "pull":
    files = client.pull(target=f"{host}/{sys.argv[4]}", outdir="pulled")
    print(json.dumps({"pulled": [os.path.relpath(p) for p in files]}))
"#;

/// oras-py over HTTPS with the test CA as its bundle: an anonymous push is refused (and nothing
/// lands); logged in as ci, it pushes a 3 MiB artifact to a public repository (monolithic upload)
/// and a private one (chunked: PATCH per MiB), the digests it reports being the manifests served;
/// an anonymous oras-py pulls the public one back byte for byte but not the private one; ci pulls
/// the private one byte for byte.
#[test]
fn oras_py_logs_in_pushes_and_pulls_an_artifact() {
    if !clients(&["oras"]) {
        return;
    }
    let server = SecureServer::start(USERS, RULES);
    let host = server.host();
    let ca = server.ca().display().to_string();
    let work = tempfile::tempdir().unwrap();
    // Two users of oras-py, each with a home (its docker config) and a working directory.
    let home = |who: &str| -> PathBuf {
        let dir = work.path().join(who);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let (anon, ci) = (home("anonymous"), home("ci"));
    // Large enough to take many TLS records each way.
    let artifact = common::random_bytes(3 << 20, 77);
    for dir in [&anon, &ci] {
        std::fs::write(dir.join("artifact.bin"), &artifact).unwrap();
    }
    let oras = |dir: &Path, args: &[&str]| -> Command {
        let mut cmd = Command::new("python3");
        cmd.env("HOME", dir)
            .env_remove("DOCKER_CONFIG")
            .env_remove("REQUESTS_CA_BUNDLE")
            .current_dir(dir)
            .args(["-c", ORAS_SCRIPT, &host, &ca])
            .args(args);
        cmd
    };
    let json_line = |out: &Output| -> Value {
        let t = text(out);
        serde_json::from_str(t.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("oras script output is not JSON ({e}): {t}"))
    };

    // Anonymous push: refused.
    refused(
        &mut oras(&anon, &["push", "team/art:v1", "artifact.bin"]),
        &["team/art"],
    );
    assert_refusal_logged(&server, "", "team/art", "push");
    assert!(tags_as_ci(&server, "team/art").is_empty());

    // Log in as ci, push to a public and a private repository.
    let login = json_line(&ok(&mut oras(&ci, &["login", "ci", "secret"])));
    assert_eq!(login["Status"], "Login Succeeded", "{login}");
    let mut pushed = Vec::new();
    for (repo, upload) in [("team/art", "monolithic"), ("private/art", "chunked")] {
        let reference = format!("{repo}:v1");
        let r = json_line(&ok(&mut oras(
            &ci,
            &["push", &reference, "artifact.bin", upload],
        )));
        assert_eq!(r["status"], 201, "{r}");
        let digest = r["digest"].as_str().expect("manifest digest").to_string();
        let (status, body) = get_manifest(&server, Some(("ci", "secret")), repo, "v1");
        assert_eq!(status, 200);
        assert_eq!(sha256(&body), digest, "oras's digest vs {repo}:v1 served");
        let m: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(m["layers"][0]["digest"], sha256(&artifact), "{m}");
        pushed.push(digest);
    }

    // Pulled back: the public one by anyone, the private one by ci only.
    let pulled = json_line(&ok(&mut oras(&anon, &["pull", "team/art:v1"])));
    assert_eq!(pulled["pulled"], json!(["pulled/artifact.bin"]), "{pulled}");
    assert!(std::fs::read(anon.join("pulled/artifact.bin")).unwrap() == artifact);
    std::fs::remove_dir_all(anon.join("pulled")).unwrap();
    refused(
        &mut oras(&anon, &["pull", "private/art:v1"]),
        &["private/art"],
    );
    assert_refusal_logged(&server, "", "private/art", "pull");
    assert!(!anon.join("pulled/artifact.bin").exists());
    let pulled = json_line(&ok(&mut oras(&ci, &["pull", "private/art:v1"])));
    assert_eq!(pulled["pulled"], json!(["pulled/artifact.bin"]), "{pulled}");
    assert!(std::fs::read(ci.join("pulled/artifact.bin")).unwrap() == artifact);
}
