//! What each fuzz target checks, as plain functions over the input bytes: the fuzz targets
//! (`fuzz_targets/*.rs`) call them, and so does `controlplane/tests/fuzz_regressions.rs`, which
//! runs every seed (`seeds/<target>/`) and every crash input kept (`regressions/<target>/`)
//! in `cargo test`. Typed inputs are decoded as libFuzzer's `fuzz_target!` does
//! (`Arbitrary::arbitrary_take_rest`), so a crash file reproduces the same way in both.
#![allow(dead_code)] // each fuzz target uses one of these

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};

/// The check of `target` (a name of `cargo fuzz list`), or None.
pub fn by_name(target: &str) -> Option<fn(&[u8])> {
    Some(match target {
        "route" => route,
        "digest" => digest,
        "range" => range,
        "image" => image,
        "manifest" => manifest,
        "request_head" => request_head,
        "token" => token,
        "event_ring" => event_ring,
        _ => return None,
    })
}

fn typed<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(data)).ok()
}

/// Any path either routes to validated values or is refused; a routed name, tag or digest
/// never contains anything that could escape the data directory.
pub fn route(data: &[u8]) {
    use lighter_layout::{route, Reference, Route};
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = route::parse(path) {
        let name = match &r {
            Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Manifest { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. } => name.as_str(),
            // A peer's blob: only the digest becomes a path (and containerd's store's path).
            Route::PeerBlob { digest } => {
                assert!(digest
                    .hex()
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
                return;
            }
            Route::Base
            | Route::Catalog
            | Route::Prefetch
            | Route::Metrics
            | Route::Gc
            | Route::Retention
            | Route::Events
            | Route::Inventory
            | Route::Usage
            | Route::Ui
            | Route::Token => return,
        };
        assert!(!name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('_')));
        assert!(!name.contains(['\0', '%', '\\']));
        if let Route::Manifest {
            reference: Reference::Tag(t),
            ..
        } = &r
        {
            assert!(!t.as_str().contains(['/', '\0']) && !t.as_str().starts_with('.'));
        }
    }
}

/// A parsed digest prints back to the same text and its hex is a safe file name.
pub fn digest(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = lighter_layout::Digest::parse(s) {
        assert_eq!(d.to_string(), s);
        assert!(d
            .hex()
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}

/// A partial answer always lies inside the body.
pub fn range(data: &[u8]) {
    use lighter_layout::range::{answer, RangeAnswer};
    let Some((header, len)) = typed::<(Vec<u8>, u64)>(data) else {
        return;
    };
    if let RangeAnswer::Partial { start, end } = answer(Some(&header), len) {
        assert!(start <= end && end < len);
    }
}

/// Any string either is refused or normalises to a reference that parses back to itself.
pub fn image(data: &[u8]) {
    use lighter_layout::ImageRef;
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = ImageRef::parse(s) {
        let normal = r.to_string();
        // Normalising adds at most `docker.io/library/` and `:latest`.
        assert!(normal.len() <= s.len() + 32, "{normal}");
        if normal.len() <= lighter_layout::image::IMAGE_REF_LENGTH_MAX {
            let again = ImageRef::parse(&normal).expect("a normalised reference parses");
            assert_eq!(again, r);
        }
    }
}

/// Any bytes, pushed with any of the content types that matter (none, generic, each stored
/// type, one Lighter does not store), are refused or inspected to what `Inspected` promises:
/// a media type Lighter stores, whose kind is the one reported, that a generic content type
/// does not change and that inspecting again with it confirms; references and subject that
/// are valid digests, each from a descriptor of its own (so their number is bounded by the
/// size); a referrer descriptor that is JSON the referrers API can list.
pub fn manifest(data: &[u8]) {
    use lighter_layout::inline::InlineStr;
    use lighter_layout::manifest::inspect;
    use lighter_layout::media::{self, manifest_kind};
    use lighter_layout::store::MEDIA_TYPE_LENGTH_MAX;
    use lighter_layout::{Algorithm, Digest};
    const CONTENT_TYPES: [Option<&str>; 9] = [
        None,
        Some(""),
        Some("application/json"),
        Some(media::OCTET_STREAM),
        Some(media::OCI_MANIFEST),
        Some(media::OCI_INDEX),
        Some(media::DOCKER_MANIFEST),
        Some(media::DOCKER_MANIFEST_LIST),
        Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
    ];
    // The shortest descriptor's digest: `"sha256:` and 64 hex digits and `"`.
    let digest_text_min_bytes = "\"sha256:\"".len() + 64;
    let plain = inspect(data, None);
    for content_type in CONTENT_TYPES {
        let result = inspect(data, content_type);
        assert_eq!(result, inspect(data, content_type), "not deterministic");
        let generic = matches!(
            content_type,
            None | Some("" | "application/json" | media::OCTET_STREAM)
        );
        if generic {
            assert_eq!(result, plain, "a generic content type changed the answer");
        }
        let Ok(m) = result else {
            continue;
        };
        if let Some(ct) = content_type.filter(|_| !generic) {
            assert_eq!(m.media_type, ct, "the content type is the media type");
        }
        assert_eq!(manifest_kind(&m.media_type), Some(m.kind));
        assert!(InlineStr::<MEDIA_TYPE_LENGTH_MAX>::new(&m.media_type).is_some());
        assert_eq!(
            inspect(data, Some(&m.media_type)).as_ref(),
            Ok(&m),
            "inspecting again with the stored media type disagrees"
        );
        let descriptors = m.references.len() + usize::from(m.subject.is_some());
        assert!(descriptors * digest_text_min_bytes <= data.len());
        for d in m.references.iter().chain(&m.subject) {
            assert_eq!(Digest::parse(&d.to_string()).as_ref(), Ok(d));
        }
        let subject = Digest::of(Algorithm::Sha256, data);
        let descriptor = m.referrer_descriptor(&subject, data.len() as u64);
        let text = serde_json::to_vec(&descriptor).expect("JSON of JSON values");
        let back: serde_json::Value = serde_json::from_slice(&text).expect("it parses back");
        assert_eq!(back["mediaType"], m.media_type.as_str());
        assert_eq!(back["digest"], subject.to_string().as_str());
        assert_eq!(back["size"], data.len() as u64);
    }
}

/// The data plane's connection state machine (`lighter_dataplane::conn`) fed arbitrary bytes in
/// arbitrary pieces, against an empty data directory with two mirrored upstreams: it never
/// panics, every answer it writes starts with an HTTP/1.1 status line, and it only ever asks
/// to receive, send, hand over or close.
pub fn request_head(data: &[u8]) {
    use lighter_dataplane::conn::{Conn, Ctx, Step};
    use lighter_dataplane::Mirror;
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join("lighter-fuzz-empty-data-dir");
    let _ = std::fs::create_dir_all(&dir);
    let ctx = Ctx {
        layout: lighter_layout::Layout::open(&dir),
        cache: Default::default(),
        mirrors: vec![
            Mirror::new("docker.io", 1000),
            Mirror::new("registry.corp:8443", 1000),
        ],
        bucket_tag_ttl_ms: None,
        now: Instant::now(),
        idle_timeout_ms: 1000,
        request_header_timeout_ms: 1000,
        access: None,
        health: None,
        events: None,
    };
    let mut c = Conn::new(8192, None, &ctx);
    let piece = usize::from(cut % 64) + 1;
    let mut pieces = bytes.chunks(piece);
    // Bounded: each round either consumes a piece or ends.
    for _ in 0..=bytes.len() + 1 {
        match c.step() {
            Step::SendHead => {
                let head = c.head_pending();
                assert!(
                    head.starts_with(b"HTTP/1.1 "),
                    "{:?}",
                    String::from_utf8_lossy(head)
                );
                let n = head.len();
                c.on_head_sent(n, &ctx);
            }
            // An empty data directory: nothing to send a body from, but stay safe if so.
            Step::SendBody => c.on_body_eof(),
            // No control plane here: as when the control socket refuses.
            Step::Handoff => c.handoff_failed(),
            Step::Close => return,
            Step::Recv => {
                let Some(p) = pieces.next() else { return };
                let space = c.recv_space();
                if space.len() < p.len() {
                    return;
                }
                space[..p.len()].copy_from_slice(p);
                c.on_recv(p.len(), &ctx);
            }
        }
    }
}

/// Tokens at the data plane: whatever bytes arrive as a Bearer token, the per-core cache and
/// the verifier answer without panicking, and nothing but the genuine token is ever accepted:
/// the input either is the token (raw bytes) or flips bits of a genuine one (a mask), and any
/// token that verifies must be byte for byte the one that was signed.
pub fn token(data: &[u8]) {
    use lighter_access::cache::Lookup;
    use lighter_access::Action;
    let Some(input) = typed::<(bool, Vec<u8>)>(data) else {
        return;
    };

    let s = token_setup();
    let (raw, bytes) = input;
    let token: Vec<u8> = if raw {
        bytes
    } else if bytes.is_empty() {
        s.genuine.as_bytes().to_vec()
    } else {
        s.genuine
            .bytes()
            .enumerate()
            .map(|(i, b)| b ^ bytes[i % bytes.len()])
            .collect()
    };
    let mut cache = s.cache.lock().unwrap();
    if let Lookup::Valid(v) = cache.get(&s.verifier, &token, s.now) {
        assert_eq!(
            token,
            s.genuine.as_bytes(),
            "a token that was never signed verified"
        );
        assert!(v.allows("team/app", Action::Pull) && !v.allows("team/app", Action::Push));
    }
}

struct TokenSetup {
    genuine: String,
    verifier: lighter_access::Verifier,
    cache: Mutex<lighter_access::cache::TokenCache>,
    now: u64,
}

fn token_setup() -> &'static TokenSetup {
    static S: OnceLock<TokenSetup> = OnceLock::new();
    use lighter_access::cache::TokenCache;
    use lighter_access::token::{Claims, ResourceActions, SigningKey, OWN_ISSUER};
    use lighter_access::{AuthConfig, Verifier};
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lighter-fuzz-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pem = SigningKey::generate_pem().unwrap();
        let path = dir.join("key.pem");
        std::fs::write(&path, &pem).unwrap();
        let now = 2_000_000_000;
        let genuine = SigningKey::from_pem(pem.as_bytes()).unwrap().sign(&Claims {
            iss: OWN_ISSUER.into(),
            sub: "ci".into(),
            aud: "lighter".into(),
            exp: now + 600,
            nbf: now - 1,
            iat: now,
            jti: "0".into(),
            access: vec![ResourceActions {
                kind: "repository".into(),
                name: "team/app".into(),
                actions: vec!["pull".into()],
            }],
            groups: vec![],
        });
        TokenSetup {
            genuine,
            verifier: Verifier::new(&AuthConfig::default(), &path).unwrap(),
            cache: Mutex::new(TokenCache::new(4)),
            now,
        }
    })
}

/// An event ring is shared memory another process writes: whatever its words and records
/// hold, the control plane's reader takes at most what it was asked for, never reads outside
/// the ring (a record's lengths are cut to its fields, a record running past the writer stops
/// the reader there), and leaves the ring drained or stops at a record too recent to take.
/// The input: a kind (packed, slots of 1 KiB, slots of 768 bytes), `head`, `tail`, the
/// records' bytes. The file is laid out as `lighter_layout::events` documents it.
pub fn event_ring(data: &[u8]) {
    use lighter_layout::events::{self as ev, RingReader};
    use std::sync::atomic::{AtomicU64, Ordering};
    const HEADER_BYTES: usize = 4096;
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let (head, tail, records) = match rest.len() {
        n if n >= 16 => (word(&rest[..8]), word(&rest[8..16]), &rest[16..]),
        _ => return,
    };
    let (magic, size, capacity, body) = match kind % 3 {
        0 => {
            let capacity: u64 = 4096;
            (
                ev::MAGIC,
                ev::PACKED_ALIGN,
                capacity,
                capacity as usize + ev::PACKED_MAX_BYTES,
            )
        }
        1 => (ev::MAGIC_SLOTS, ev::RECORD_BYTES, 4, 4 * ev::RECORD_BYTES),
        _ => (
            ev::MAGIC_SLOTS,
            ev::RECORD_BYTES_V1,
            4,
            4 * ev::RECORD_BYTES_V1,
        ),
    };
    let mut file = vec![0u8; HEADER_BYTES + body];
    file[..8].copy_from_slice(&magic.to_le_bytes());
    file[8..16].copy_from_slice(&(size as u64).to_le_bytes());
    file[16..24].copy_from_slice(&capacity.to_le_bytes());
    file[64..72].copy_from_slice(&head.to_le_bytes());
    file[128..136].copy_from_slice(&tail.to_le_bytes());
    let n = records.len().min(body);
    file[HEADER_BYTES..HEADER_BYTES + n].copy_from_slice(&records[..n]);

    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "lighter-fuzz-ring-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, &file).expect("temporary ring file");
    let reader = RingReader::open(&path).expect("a ring of the documented layout opens");
    let _ = std::fs::remove_file(&path);
    let _ = (reader.is_empty(), reader.half_full());
    let mut taken = 0;
    let n = reader.drain_each(16, u64::MAX, |r| {
        taken += 1;
        assert!(r.repository_bytes().len() <= 255 && r.reference_bytes().len() <= 128);
        assert!(r.digest_bytes().len() <= 136 && r.agent_bytes().len() <= 128);
        assert!(r.identity_bytes().len() <= 255);
        let _ = (
            r.repository(),
            r.reference(),
            r.digest(),
            r.agent(),
            r.identity(),
        );
        let _ = (r.action(), r.client());
    });
    assert_eq!(n, taken);
    assert!(n <= 16);
    // Drained to the end, but for a record timed u64::MAX (too recent for any cutoff).
    reader.drain_each(usize::MAX, u64::MAX, |_| ());
    assert!(
        reader.is_empty() || reader.drain_each(1, u64::MAX, |_| ()) == 0,
        "a reader that took nothing more left records it could take"
    );
}
