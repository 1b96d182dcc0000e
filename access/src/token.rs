//! The JWTs of the Docker/OCI token flow. Lighter's own tokens are signed with Ed25519 by the
//! control plane's token endpoint; tokens of configured external issuers (RSA, ECDSA or Ed25519
//! keys) are accepted too. Either kind grants what its `access` claim lists, the
//! [token specification](https://distribution.github.io/distribution/spec/auth/jwt/)'s shape:
//! `[{"type":"repository","name":"team/app","actions":["pull","push"]}]`.
//!
//! Verification checks the signature with the algorithm the key's type allows (never `none`,
//! never a MAC keyed with a public key), the issuer, the audience, `exp` and `nbf`.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::policy::{Action, Actions};

/// The `iss` of Lighter's own tokens.
pub const OWN_ISSUER: &str = "lighter";

/// Seconds of clock difference tolerated on `exp` and `nbf` (external issuers' clocks).
const LEEWAY_SECS: u64 = 30;

/// One entry of the `access` claim.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ResourceActions {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Claims {
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub access: Vec<ResourceActions>,
    /// The subject's groups (Lighter's own tokens only), for the control plane's admin rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A token whose signature and times have been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub subject: String,
    pub groups: Vec<String>,
    /// Issued by this registry (its subject is one of its own identities).
    pub own: bool,
    /// Unix seconds after which it is no longer valid.
    pub expires_unix: u64,
    /// Repository names and what the token grants on each.
    pub grants: Vec<(String, Actions)>,
}

impl Verified {
    /// Whether the token grants `action` on repository `name`. Allocates nothing.
    pub fn allows(&self, name: &str, action: Action) -> bool {
        self.grants.iter().any(|(n, a)| n == name && a.has(action))
    }

    /// Whether it names `name` at all (a client that asked for another scope should be told
    /// which one it needs; one that was refused it should be told no).
    pub fn names(&self, name: &str) -> bool {
        self.grants.iter().any(|(n, _)| n == name)
    }

    pub fn fresh(&self, now_unix: u64) -> bool {
        now_unix <= self.expires_unix + LEEWAY_SECS
    }
}

/// Why a token was refused (said in the 401's `error_description`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenError(pub String);

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Key {
    issuer: String,
    audience: String,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    own: bool,
}

/// Checks tokens against Lighter's own key and the configured issuers' keys.
pub struct Verifier {
    keys: Vec<Key>,
    /// Where Lighter's own public key is read from, while it is not there yet (the data plane
    /// may start before the control plane has created it).
    own_key_path: Option<PathBuf>,
    service: String,
}

impl Verifier {
    /// Loads the issuers' keys and, if it exists, Lighter's own key (`own_key_path`: the private
    /// key file, configured or in the data directory).
    pub fn new(c: &AuthConfig, own_key_path: &Path) -> Result<Verifier, String> {
        let mut v = Verifier {
            keys: Vec::new(),
            own_key_path: Some(own_key_path.to_owned()),
            service: c.service.clone(),
        };
        for i in &c.issuers {
            let pem = std::fs::read(&i.public_key_file).map_err(|e| {
                format!(
                    "auth issuer {:?}: cannot read {}: {e}",
                    i.issuer,
                    i.public_key_file.display()
                )
            })?;
            let (key, algorithms) = public_key(&pem).map_err(|e| {
                format!(
                    "auth issuer {:?}: {}: {e}",
                    i.issuer,
                    i.public_key_file.display()
                )
            })?;
            v.keys.push(Key {
                issuer: i.issuer.clone(),
                audience: i.audience.clone().unwrap_or_else(|| c.service.clone()),
                key,
                algorithms,
                own: false,
            });
        }
        v.load_own_key();
        Ok(v)
    }

    /// Reads Lighter's own key if it is not loaded yet; whether it is loaded.
    pub fn load_own_key(&mut self) -> bool {
        let Some(path) = &self.own_key_path else {
            return true;
        };
        match std::fs::read(path) {
            Ok(pem) => match SigningKey::from_pem(&pem) {
                Ok(k) => {
                    self.keys.insert(
                        0,
                        Key {
                            issuer: OWN_ISSUER.into(),
                            audience: self.service.clone(),
                            key: k.decoding,
                            algorithms: vec![Algorithm::EdDSA],
                            own: true,
                        },
                    );
                    self.own_key_path = None;
                    true
                }
                Err(e) => {
                    tracing::warn!("token key {}: {e}", path.display());
                    false
                }
            },
            Err(_) => false,
        }
    }

    /// Checks `token`'s signature, issuer, audience and times.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Verified, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| TokenError("malformed token".into()))?;
        let mut last = TokenError("no key accepts this token's algorithm".into());
        for k in self
            .keys
            .iter()
            .filter(|k| k.algorithms.contains(&header.alg))
        {
            let mut v = Validation::new(header.alg);
            v.algorithms = k.algorithms.clone();
            v.set_issuer(&[&k.issuer]);
            v.set_audience(&[&k.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.validate_nbf = true;
            v.leeway = LEEWAY_SECS;
            match jsonwebtoken::decode::<Claims>(token, &k.key, &v) {
                Ok(data) => {
                    let c = data.claims;
                    if c.exp + LEEWAY_SECS < now_unix {
                        return Err(TokenError("token expired".into()));
                    }
                    let grants = c
                        .access
                        .iter()
                        .filter_map(|r| {
                            // Lighter's own endpoints are `registry` resources
                            // (`registry:catalog:*`, `registry:gc:admin`).
                            let name = match r.kind.as_str() {
                                "repository" => r.name.clone(),
                                "registry" => format!("_lighter/{}", r.name),
                                _ => return None,
                            };
                            let actions = r
                                .actions
                                .iter()
                                .filter_map(|a| match a.as_str() {
                                    "*" if r.kind == "registry" => Some(Action::Pull),
                                    a => Action::from_word(a),
                                })
                                .fold(Actions::NONE, Actions::with);
                            Some((name, actions))
                        })
                        .collect();
                    return Ok(Verified {
                        subject: c.sub,
                        groups: if k.own { c.groups } else { Vec::new() },
                        own: k.own,
                        expires_unix: c.exp,
                        grants,
                    });
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = TokenError(
                        match e.kind() {
                            K::ExpiredSignature => "token expired",
                            K::ImmatureSignature => "token not valid yet",
                            K::InvalidAudience => "token is for another service",
                            K::InvalidIssuer => "token from an unknown issuer",
                            K::InvalidSignature => "token signature does not verify",
                            _ => "malformed token",
                        }
                        .into(),
                    );
                }
            }
        }
        Err(last)
    }
}

/// A public key (or a certificate's) and the algorithms it may verify.
fn public_key(pem: &[u8]) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((
            k,
            vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
        ));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Ok((k, vec![Algorithm::ES256, Algorithm::ES384]));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Ok((k, vec![Algorithm::EdDSA]));
    }
    Err("not a PEM public key or certificate (RSA, ECDSA or Ed25519)".into())
}

/// Lighter's token signing key (Ed25519).
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl SigningKey {
    /// A new key, as PKCS#8 PEM.
    pub fn generate_pem() -> Result<String, String> {
        let rng = ring::rand::SystemRandom::new();
        let der = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "cannot generate an Ed25519 key".to_string())?;
        Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref())))
    }

    pub fn from_pem(pem: &[u8]) -> Result<SigningKey, String> {
        let der = pem::parse(pem)
            .ok()
            .filter(|p| p.tag() == "PRIVATE KEY")
            .map(|p| p.into_contents())
            .ok_or("not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----)")?;
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|_| "not an Ed25519 private key (openssl genpkey -algorithm ed25519)")?;
        use ring::signature::KeyPair;
        Ok(SigningKey {
            encoding: EncodingKey::from_ed_der(&der),
            decoding: DecodingKey::from_ed_der(pair.public_key().as_ref()),
        })
    }

    /// Signs `claims` (EdDSA).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.encoding)
            .expect("Ed25519 signing of serialisable claims")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: OWN_ISSUER.into(),
            sub: "ci".into(),
            aud: "lighter".into(),
            exp,
            nbf: now() - 1,
            iat: now(),
            jti: "1".into(),
            access: vec![ResourceActions {
                kind: "repository".into(),
                name: "team/app".into(),
                actions: vec!["pull".into(), "push".into()],
            }],
            groups: vec![],
        }
    }

    fn setup() -> (tempfile::TempDir, SigningKey, Verifier) {
        let dir = tempfile::tempdir().unwrap();
        let pem = SigningKey::generate_pem().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, &pem).unwrap();
        let key = SigningKey::from_pem(pem.as_bytes()).unwrap();
        let v = Verifier::new(&AuthConfig::default(), &path).unwrap();
        (dir, key, v)
    }

    #[test]
    fn own_tokens_verify_and_grant_what_they_list() {
        let (_d, key, v) = setup();
        let t = key.sign(&claims(now() + 60));
        let ok = v.verify(&t, now()).unwrap();
        assert!(ok.own);
        assert!(ok.allows("team/app", Action::Push));
        assert!(!ok.allows("team/app", Action::Delete));
        assert!(!ok.allows("team/other", Action::Pull));
        assert!(ok.names("team/app") && !ok.names("team"));
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_refused() {
        let (_d, key, v) = setup();
        let expired = key.sign(&claims(now() - 120));
        assert_eq!(v.verify(&expired, now()).unwrap_err().0, "token expired");
        let mut c = claims(now() + 60);
        c.nbf = now() + 600;
        assert_eq!(
            v.verify(&key.sign(&c), now()).unwrap_err().0,
            "token not valid yet"
        );
        let mut c = claims(now() + 60);
        c.aud = "elsewhere".into();
        assert_eq!(
            v.verify(&key.sign(&c), now()).unwrap_err().0,
            "token is for another service"
        );
        // Signed by another key.
        let other = SigningKey::from_pem(SigningKey::generate_pem().unwrap().as_bytes()).unwrap();
        let forged = other.sign(&claims(now() + 60));
        assert!(v.verify(&forged, now()).is_err());
        // A payload changed after signing.
        let t = key.sign(&claims(now() + 60));
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(now() + 60);
        c.access[0].actions.push("delete".into());
        let payload = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            payload.split('.').nth(1).unwrap(),
            parts[2]
        );
        assert!(v.verify(&tampered, now()).is_err());
        // alg none, and a MAC keyed with anything.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0",
            payload.split('.').nth(1).unwrap()
        );
        assert!(v.verify(&none, now()).is_err());
        assert!(v.verify(&payload, now()).is_err());
        for garbage in ["", "a.b.c", "....", "eyJ.eyJ.x"] {
            assert!(v.verify(garbage, now()).is_err(), "{garbage}");
        }
    }
}
