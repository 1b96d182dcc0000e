//! Tokens at the data plane: whatever bytes arrive as a Bearer token, the per-core cache and
//! the verifier answer without panicking, and nothing but the genuine token is ever accepted:
//! the input either is the token (raw bytes) or flips bits of a genuine one (a mask), and any
//! token that verifies must be byte for byte the one that was signed.
#![no_main]
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use lighter_access::cache::{Lookup, TokenCache};
use lighter_access::token::{Claims, ResourceActions, SigningKey, OWN_ISSUER};
use lighter_access::{Action, AuthConfig, Verifier};

struct Setup {
    genuine: String,
    verifier: Verifier,
    cache: Mutex<TokenCache>,
    now: u64,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
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
        Setup {
            genuine,
            verifier: Verifier::new(&AuthConfig::default(), &path).unwrap(),
            cache: Mutex::new(TokenCache::new(4)),
            now,
        }
    })
}

fuzz_target!(|input: (bool, Vec<u8>)| {
    let s = setup();
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
        assert_eq!(token, s.genuine.as_bytes(), "a token that was never signed verified");
        assert!(v.allows("team/app", Action::Pull) && !v.allows("team/app", Action::Push));
    }
});
