//! Kubernetes ServiceAccount tokens (`auth.kubernetes_token_review`): a CI job in the cluster
//! pushes and pulls as `system:serviceaccount:<ns>:<name>`, its token checked with the
//! TokenReview API. The API server here is a stand-in that speaks the TokenReview protocol
//! (`POST /apis/authentication.k8s.io/v1/tokenreviews` over HTTPS, Lighter's own ServiceAccount
//! token as the Bearer), with a fixed table of tokens, and counts the reviews it answers.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::tls::{make_ca, make_leaf};
use common::{Launch, Server};

/// Tokens shaped like ServiceAccount JWTs (the API server decides; Lighter only sees the shape).
const BUILDER: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJidWlsZGVyIn0.c2lnLWJ1aWxkZXI";
const PROD_WEB: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ3ZWIifQ.c2lnLXdlYg";
const DEV_APP: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhcHAifQ.c2lnLWFwcA";
const REVOKED: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvbGQifQ.c2lnLW9sZA";
/// Lighter's own ServiceAccount token, which the API server requires on every review.
const LIGHTER_SA: &str = "lighter-own-serviceaccount-token";

const API_SERVER: &str = r#"
import json, ssl, sys
from http.server import HTTPServer, BaseHTTPRequestHandler
cert, key, own, count_file = sys.argv[1:5]
users = {
  sys.argv[5]: ("system:serviceaccount:build:builder", ["system:serviceaccounts", "system:serviceaccounts:build"]),
  sys.argv[6]: ("system:serviceaccount:prod:web", ["system:serviceaccounts", "system:serviceaccounts:prod"]),
  sys.argv[7]: ("system:serviceaccount:dev:app", ["system:serviceaccounts", "system:serviceaccounts:dev"]),
}
reviews = 0
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        global reviews
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
            self.send_response(404); self.end_headers(); return
        if self.headers.get("authorization") != "Bearer " + own:
            self.send_response(401); self.end_headers(); return
        req = json.loads(body)
        assert req["kind"] == "TokenReview" and req["apiVersion"] == "authentication.k8s.io/v1"
        reviews += 1
        open(count_file, "w").write(str(reviews))
        who = users.get(req["spec"]["token"])
        status = {"authenticated": True, "user": {"username": who[0], "groups": who[1]}} if who \
            else {"authenticated": False, "error": "token has been invalidated"}
        out = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                          "status": status}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
srv = HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

struct ApiServer {
    child: Child,
    port: u16,
    count: std::path::PathBuf,
}

impl ApiServer {
    fn start(dir: &Path) -> ApiServer {
        let (crt, key) = make_leaf(dir, "apiserver", "kubernetes", 9);
        let count = dir.join("reviews");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(API_SERVER)
            .args([crt.to_str().unwrap(), key.to_str().unwrap(), LIGHTER_SA])
            .arg(&count)
            .args([BUILDER, PROD_WEB, DEV_APP])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        ApiServer {
            port: line.trim().parse().expect("API server port"),
            child,
            count,
        }
    }

    fn reviews(&self) -> u32 {
        std::fs::read_to_string(&self.count)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, api: &ApiServer) -> Server {
    std::fs::write(dir.join("sa-token"), format!("{LIGHTER_SA}\n")).unwrap();
    let cfg = dir.join("lighter.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[auth]
kubernetes_token_review = true
kubernetes_api_url = "https://127.0.0.1:{port}"
kubernetes_token_file = "{dir}/sa-token"
kubernetes_ca_file = "{dir}/ca.crt"

[[auth.rules]]
prefix = ""
pull = ["anonymous"]
push = ["serviceaccount:build:builder"]

[[auth.rules]]
prefix = "private/"
pull = ["serviceaccount:build:builder", "namespace:prod"]
push = ["serviceaccount:build:builder"]
"#,
            port = api.port,
            dir = dir.display()
        ),
    )
    .unwrap();
    Server::launch_temp(|l: Launch| l.args(&["--config", cfg.to_str().unwrap()]))
}

fn push_manifest(server: &Server, repo: &str, auth: Option<&str>) -> reqwest::blocking::Response {
    // An empty image: the config blob, then the manifest.
    let c = Server::client();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let digest = common::sha256(config);
    let mut r = c.post(server.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")));
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    let r = r.body(config.to_vec()).send().unwrap();
    if r.status() != 201 {
        return r;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest, "size": config.len()},
        "layers": []
    });
    let mut r = c
        .put(server.url(&format!("/v2/{repo}/manifests/v1")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json");
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.body(serde_json::to_vec(&manifest).unwrap())
        .send()
        .unwrap()
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[test]
fn serviceaccount_tokens_push_and_pull_by_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path());
    let api = ApiServer::start(dir.path());
    let server = start(dir.path(), &api);
    let c = Server::client();

    // The builder's token as a Bearer token, and as the password of Basic credentials (what
    // `podman login -p "$(cat /var/run/secrets/.../token)"` sends).
    let r = push_manifest(&server, "private/app", Some(&format!("Bearer {BUILDER}")));
    assert_eq!(r.status(), 201, "{:?}", r.text());
    let r = push_manifest(&server, "team/app", Some(&basic("builder", BUILDER)));
    assert_eq!(r.status(), 201, "{:?}", r.text());

    let pull = |auth: Option<String>| {
        let mut r = c
            .get(server.url("/v2/private/app/manifests/v1"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().unwrap().status().as_u16()
    };
    // namespace:prod lets any ServiceAccount of prod pull; dev's may not (403: it is known).
    assert_eq!(pull(Some(format!("Bearer {PROD_WEB}"))), 200);
    assert_eq!(pull(Some(format!("Bearer {DEV_APP}"))), 403);
    assert_eq!(pull(None), 401);
    // A token the API server no longer vouches for: 401 invalid_token.
    let r = c
        .get(server.url("/v2/private/app/manifests/v1"))
        .header("authorization", format!("Bearer {REVOKED}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"invalid_token\""));
    // The web ServiceAccount may pull but not push.
    let r = push_manifest(&server, "private/app", Some(&format!("Bearer {PROD_WEB}")));
    assert_eq!(r.status(), 403);
    assert!(r.text().unwrap().contains("DENIED"));

    // The token flow with a ServiceAccount token as the password: the token it gets works at
    // the data plane for a pull of private/app.
    let r = c
        .get(
            server.url("/v2/_lighter/token?service=lighter&scope=repository:private/app:pull,push"),
        )
        .header("authorization", basic("x", PROD_WEB))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = serde_json::from_slice::<serde_json::Value>(&r.bytes().unwrap()).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(pull(Some(format!("Bearer {token}"))), 200);

    // Reviews are remembered (credentials_cache_ms): asking again with the same tokens does
    // not ask the API server again.
    let before = api.reviews();
    assert!(before >= 4, "{before} reviews");
    for _ in 0..5 {
        assert_eq!(pull(Some(format!("Bearer {PROD_WEB}"))), 200);
        assert_eq!(pull(Some(format!("Bearer {DEV_APP}"))), 403);
    }
    assert_eq!(api.reviews(), before);
}

#[test]
fn an_unreachable_api_server_refuses_serviceaccounts_and_keeps_serving_others() {
    let dir = tempfile::tempdir().unwrap();
    make_ca(dir.path());
    let api = ApiServer::start(dir.path());
    let server = start(dir.path(), &api);
    drop(api); // the API server goes away
    let c = Server::client();
    let r = c
        .get(server.url("/v2/private/app/manifests/v1"))
        .header("authorization", format!("Bearer {BUILDER}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // Anonymous pulls of public repositories do not need the API server.
    let r = c.get(server.url("/v2/team/app/tags/list")).send().unwrap();
    assert_eq!(r.status(), 404);
}
