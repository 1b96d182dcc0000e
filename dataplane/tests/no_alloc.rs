//! The data plane's hot path allocates nothing per request in the steady state: parsing, routing,
//! resolving names, tags and digests to files, and writing response heads all reuse buffers.
//! Counted with a global allocator that counts, over the real state machine and a real data
//! directory; no I/O driver is involved (bytes are fed and "sent" by hand).

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use lighter_dataplane::conn::{Conn, Ctx, Step};
use lighter_layout::{media, Algorithm, Digest, Layout, ManifestEntry, RepoName, Tag, UploadId};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is global: tests that count run one at a time.
static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Feeds one request and drains the answer as a driver would; returns the status line.
fn exchange(conn: &mut Conn, ctx: &Ctx, request: &[u8]) -> [u8; 12] {
    conn.recv_space()[..request.len()].copy_from_slice(request);
    conn.on_recv(request.len(), ctx);
    let mut status = [0u8; 12];
    status.copy_from_slice(&conn.head_pending()[..12]);
    loop {
        match conn.step() {
            Step::SendHead => {
                let n = conn.head_pending().len();
                conn.on_head_sent(n, ctx);
            }
            Step::SendBody => {
                let b = conn.body().unwrap();
                let n = (b.end - b.offset) as usize;
                conn.on_body_sent(n, ctx);
            }
            Step::Recv => return status,
            other => panic!("unexpected step {other:?}"),
        }
    }
}

/// Sends `requests` on one connection (each answered with the status line in `want`) to warm
/// its buffers up, then 200 times more, counting allocations: none.
fn assert_steady_state_allocates_nothing(ctx: &Ctx, requests: &[String], want: &[&[u8]]) {
    let mut conn = Conn::new(16 << 10, None, ctx);
    for (r, w) in requests.iter().zip(want) {
        assert_eq!(&exchange(&mut conn, ctx, r.as_bytes()), w, "{r}");
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..200 {
        for r in requests {
            exchange(&mut conn, ctx, r.as_bytes());
        }
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(
        allocations,
        0,
        "{allocations} allocations over {} requests",
        200 * requests.len()
    );
}

/// A data directory with `library/app`: a 100 kB blob and a manifest tagged `v1`.
fn populated(dir: &std::path::Path) -> (Digest, Digest) {
    let layout = Layout::open_writer(dir).unwrap();
    let name = RepoName::parse("library/app").unwrap();
    let blob = vec![7u8; 100_000];
    let mut ingest = layout
        .create_ingest(&name, &UploadId::random().unwrap(), Algorithm::Sha256)
        .unwrap();
    ingest.write(&blob).unwrap();
    let blob_digest = Digest::of(Algorithm::Sha256, &blob);
    layout.commit(ingest, &blob_digest).unwrap();
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let manifest_digest = Digest::of(Algorithm::Sha256, manifest);
    layout.put_content(&manifest_digest, manifest).unwrap();
    layout
        .link_manifest(&name, &manifest_digest, media::OCI_MANIFEST)
        .unwrap();
    let entry = layout.manifest(&name, &manifest_digest).unwrap().unwrap();
    layout
        .put_tag(
            &name,
            &Tag::parse("v1").unwrap(),
            &ManifestEntry { ..entry },
        )
        .unwrap();
    (blob_digest, manifest_digest)
}

/// A core's context over the data directory `dir`, with the event log on (recording a pull
/// allocates nothing either).
fn ctx_over(dir: &std::path::Path) -> Ctx {
    Ctx {
        layout: Layout::open(dir),
        cache: Default::default(),
        mirrors: Vec::new(),
        bucket_tag_ttl_ms: None,
        now: Instant::now(),
        idle_timeout_ms: 60_000,
        request_header_timeout_ms: 10_000,
        access: None,
        health: None,
        events: Some(
            lighter_layout::events::RingWriter::create(&dir.join("core-0.ring"), 64, 0).unwrap(),
        ),
    }
}

#[test]
fn steady_state_pull_requests_allocate_nothing() {
    let _one_at_a_time = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (blob_digest, manifest_digest) = populated(dir.path());

    let ctx = ctx_over(dir.path());
    let requests = [
        format!("GET /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"),
        format!("HEAD /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=65536-\r\n\r\n"),
        "GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAccept: application/vnd.oci.image.manifest.v1+json, */*\r\n\r\n".to_string(),
        format!("HEAD /v2/library/app/manifests/{manifest_digest} HTTP/1.1\r\nHost: x\r\n\r\n"),
        "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        "GET /v2/library/app/manifests/missing HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
    ];
    let want: [&[u8]; 7] = [
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 206",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 404",
    ];
    assert_steady_state_allocates_nothing(&ctx, &requests, &want);
}

/// With `[storage.s3]` (and likewise a mirror's repositories), every repository is a cache
/// whose pulls are recorded on the blob link for eviction: cached pulls still allocate nothing
/// (each core records a link's pull at most once a second, from its own cache).
#[test]
fn cached_pulls_of_a_bucket_s_repositories_allocate_nothing() {
    let _one_at_a_time = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (blob_digest, manifest_digest) = populated(dir.path());
    // No event log here: only the cache's record of pulls is under test.
    let ctx = Ctx {
        bucket_tag_ttl_ms: Some(600_000),
        events: None,
        ..ctx_over(dir.path())
    };
    let requests = [
        format!("GET /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("HEAD /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\nRange: bytes=65536-\r\n\r\n"),
        "GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".to_string(),
        format!("GET /v2/library/app/manifests/{manifest_digest} HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"),
    ];
    let want: [&[u8]; 5] = [
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 206",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
    ];
    assert_steady_state_allocates_nothing(&ctx, &requests, &want);
}

/// With access control on, an authorised pull (by a token the core has verified before, or
/// anonymously where the rules allow it) is a cache lookup: still no allocation.
#[test]
fn authorised_pulls_allocate_nothing() {
    let _one_at_a_time = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    use lighter_access::token::{Claims, ResourceActions, SigningKey, OWN_ISSUER};
    let dir = tempfile::tempdir().unwrap();
    let (blob_digest, _) = populated(dir.path());
    let key_path = dir.path().join("key.pem");
    let pem = SigningKey::generate_pem().unwrap();
    std::fs::write(&key_path, &pem).unwrap();
    let config: lighter_access::AuthConfig = toml_rules();
    let setup = lighter_dataplane::access::AuthSetup {
        config,
        own_key_path: key_path,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = SigningKey::from_pem(pem.as_bytes()).unwrap().sign(&Claims {
        iss: OWN_ISSUER.into(),
        sub: "ci".into(),
        aud: "lighter".into(),
        exp: now + 600,
        nbf: 0,
        iat: now,
        jti: "x".into(),
        access: vec![ResourceActions {
            kind: "repository".into(),
            name: "library/app".into(),
            actions: vec!["pull".into()],
        }],
        groups: vec![],
    });
    let ctx = Ctx {
        access: Some(lighter_dataplane::access::Access::new(&setup).unwrap()),
        ..ctx_over(dir.path())
    };
    let requests = [
        format!("GET /v2/library/app/blobs/{blob_digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        format!("GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
        "GET /v2/public/app/manifests/missing HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
    ];
    let want: [&[u8]; 4] = [
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 404",
    ];
    assert_steady_state_allocates_nothing(&ctx, &requests, &want);

    // And what is not allowed here goes to the control plane: no token for a private
    // repository, a token for another one, a forged token.
    let forged = format!("{}x", &token[..token.len() - 1]);
    for r in [
        "GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        "GET /v2/public/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Y2k6eA==\r\n\r\n".to_string(),
        format!("GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {forged}\r\n\r\n"),
        "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
    ] {
        let mut c = Conn::new(16 << 10, None, &ctx);
        c.recv_space()[..r.len()].copy_from_slice(r.as_bytes());
        c.on_recv(r.len(), &ctx);
        assert_eq!(c.step(), Step::Handoff, "{r}");
    }
}

/// `library/` needs a token; `public/` may be pulled by anyone.
fn toml_rules() -> lighter_access::AuthConfig {
    lighter_access::AuthConfig {
        rules: vec![
            lighter_access::config::RuleConfig {
                prefix: "library/".into(),
                pull: vec!["user:ci".into()],
                ..Default::default()
            },
            lighter_access::config::RuleConfig {
                prefix: "public/".into(),
                pull: vec!["anonymous".into()],
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}
