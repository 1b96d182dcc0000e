//! The data plane's per-core cache of verified tokens: direct-mapped, sized at start. A hit
//! compares the whole token (a hash collision can never pass another token off as verified),
//! checks its expiry and returns the verified claims: no signature check and no allocation.
//! A miss verifies and replaces the slot (allocating then, reusing the slot's buffer).

use std::hash::Hasher;

use crate::token::{TokenError, Verified, Verifier};

struct Slot {
    token: Vec<u8>,
    verified: Option<Verified>,
}

pub struct TokenCache {
    slots: Box<[Slot]>,
    mask: usize,
}

/// What the cache knows of a token.
pub enum Lookup<'a> {
    Valid(&'a Verified),
    Invalid(TokenError),
}

impl TokenCache {
    /// `entries` rounded up to a power of two (at least 1).
    pub fn new(entries: usize) -> TokenCache {
        let n = entries.max(1).next_power_of_two();
        TokenCache {
            slots: (0..n)
                .map(|_| Slot {
                    token: Vec::new(),
                    verified: None,
                })
                .collect(),
            mask: n - 1,
        }
    }

    /// The verified claims of `token`, from the cache or by `verifier`. Invalid tokens are not
    /// remembered (they are rare, and a client retrying one goes to the control plane anyway).
    pub fn get(&mut self, verifier: &Verifier, token: &[u8], now_unix: u64) -> Lookup<'_> {
        // The tail of a JWT is its signature, as good as random: enough to pick a slot (a
        // collision costs a verification, never a wrong answer: the whole token is compared).
        let mut h = std::hash::DefaultHasher::new();
        h.write(&token[token.len().saturating_sub(16)..]);
        let i = h.finish() as usize & self.mask;
        let slot = &mut self.slots[i];
        let hit = slot.token == token && slot.verified.as_ref().is_some_and(|v| v.fresh(now_unix));
        if !hit {
            let Ok(text) = std::str::from_utf8(token) else {
                return Lookup::Invalid(TokenError("malformed token".into()));
            };
            match verifier.verify(text, now_unix) {
                Ok(v) => {
                    slot.token.clear();
                    slot.token.extend_from_slice(token);
                    slot.verified = Some(v);
                }
                Err(e) => return Lookup::Invalid(e),
            }
        }
        Lookup::Valid(slot.verified.as_ref().expect("filled above"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, ResourceActions, SigningKey, OWN_ISSUER};
    use crate::Action;

    #[test]
    fn hits_are_the_same_token_and_expiry_is_checked_on_every_hit() {
        let dir = tempfile::tempdir().unwrap();
        let pem = SigningKey::generate_pem().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, &pem).unwrap();
        let key = SigningKey::from_pem(pem.as_bytes()).unwrap();
        let v = Verifier::new(&crate::AuthConfig::default(), &path).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |name: &str, exp: u64| {
            key.sign(&Claims {
                iss: OWN_ISSUER.into(),
                sub: "u".into(),
                aud: "lighter".into(),
                exp,
                nbf: 0,
                iat: now,
                jti: String::new(),
                access: vec![ResourceActions {
                    kind: "repository".into(),
                    name: name.into(),
                    actions: vec!["pull".into()],
                }],
                groups: vec![],
            })
        };
        // One slot: every token collides.
        let mut c = TokenCache::new(1);
        let a = token("a", now + 60);
        let b = token("b", now + 60);
        for _ in 0..3 {
            for (t, name) in [(&a, "a"), (&b, "b")] {
                match c.get(&v, t.as_bytes(), now) {
                    Lookup::Valid(ok) => {
                        assert!(ok.allows(name, Action::Pull));
                        assert!(!ok.allows(if name == "a" { "b" } else { "a" }, Action::Pull));
                    }
                    Lookup::Invalid(e) => panic!("{e}"),
                }
            }
        }
        // Cached, then past its expiry: refused although the slot holds it.
        assert!(matches!(c.get(&v, b.as_bytes(), now), Lookup::Valid(_)));
        assert!(matches!(
            c.get(&v, b.as_bytes(), now + 3600),
            Lookup::Invalid(_)
        ));
        let mut forged = b.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] ^= 1;
        assert!(matches!(c.get(&v, &forged, now), Lookup::Invalid(_)));
    }
}
