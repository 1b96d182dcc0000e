//! Cosign signatures (pure): a public key from its PEM file, and a signature checked over the
//! simple-signing payload it signs, whose `critical.image.docker-manifest-digest` must be the
//! image's digest. Only ECDSA P-256 with SHA-256 (cosign's default key type) is supported.

use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

/// The artifact type of a cosign signature pushed as a referrer.
pub const COSIGN_SIGNATURE_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The media type of a layer holding the signed payload.
pub const SIMPLE_SIGNING_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature over the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The artifact type of a Notary Project (notation) signature.
pub const NOTATION_SIGNATURE_TYPE: &str = "application/vnd.cncf.notary.signature";

/// DER of a P-256 SubjectPublicKeyInfo up to the point: SEQUENCE { SEQUENCE { id-ecPublicKey,
/// prime256v1 }, BIT STRING (no unused bits) }; the 65-byte uncompressed point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A cosign public key: the uncompressed P-256 point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignKey {
    point: Vec<u8>,
}

impl CosignKey {
    /// Parses a PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as `cosign generate-key-pair` or
    /// `openssl pkey -pubout` write it.
    pub fn from_pem(pem: &str) -> Result<CosignKey, String> {
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        const END: &str = "-----END PUBLIC KEY-----";
        let start = pem
            .find(BEGIN)
            .ok_or("no -----BEGIN PUBLIC KEY----- block (an EC P-256 public key is needed)")?;
        let body = &pem[start + BEGIN.len()..];
        let end = body.find(END).ok_or("no -----END PUBLIC KEY----- line")?;
        let b64: String = body[..end]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("the PUBLIC KEY block is not base64: {e}"))?;
        match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) if point.len() == 65 && point[0] == 0x04 => Ok(CosignKey {
                point: point.to_vec(),
            }),
            _ => Err("not an ECDSA P-256 public key (cosign's key type)".into()),
        }
    }

    /// Checks `signature_b64` (base64 of an ASN.1 DER ECDSA signature) over `payload`, and that
    /// the payload is a cosign simple-signing payload for `digest`. Err says what failed.
    pub fn verify(&self, payload: &[u8], signature_b64: &str, digest: &str) -> Result<(), String> {
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature_b64.trim())
            .map_err(|e| format!("the signature annotation is not base64: {e}"))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(payload, &signature)
            .map_err(|_| "the signature does not verify with the key".to_string())?;
        let signed = payload_digest(payload)?;
        if signed != digest {
            return Err(format!(
                "the signed payload names {signed}, not the image's digest"
            ));
        }
        Ok(())
    }
}

/// The image digest a simple-signing payload names.
fn payload_digest(payload: &[u8]) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| format!("the signed payload is not JSON: {e}"))?;
    let kind = v.pointer("/critical/type").and_then(|t| t.as_str());
    if kind != Some("cosign container image signature") {
        return Err(format!(
            "the signed payload's critical.type is {kind:?}, not \"cosign container image signature\""
        ));
    }
    v.pointer("/critical/image/docker-manifest-digest")
        .and_then(|d| d.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "the signed payload has no critical.image.docker-manifest-digest".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 key (`openssl ecparam -name prime256v1 -genkey`), its public half as `openssl
    /// pkey -pubout` writes it, and a signature by it (`openssl dgst -sha256 -sign`) over
    /// `PAYLOAD`.
    const PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEMSU8fA5Hv9acrA14p/jw9aEWZ1gn
iACKRpZ4zbcsi/dR2yrR3obfZ4W00Hh2ZBac0Rc2tCn4xVPiYAX6F/UjpQ==
-----END PUBLIC KEY-----
";
    const ED25519_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAmltPeCprskIo6QUuGlwA1WzbaqDuSEqnrP/pmsmN4d0=
-----END PUBLIC KEY-----
";

    #[test]
    fn keys_other_than_p256_are_refused_with_a_reason() {
        assert!(CosignKey::from_pem(PEM).is_ok());
        let e = CosignKey::from_pem(ED25519_PEM).unwrap_err();
        assert!(e.contains("P-256"), "{e}");
        assert!(CosignKey::from_pem("hello").is_err());
        assert!(
            CosignKey::from_pem("-----BEGIN PUBLIC KEY-----\n%%%\n-----END PUBLIC KEY-----\n")
                .unwrap_err()
                .contains("base64")
        );
    }

    const PAYLOAD: &[u8] = br#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"sha256:ab"},"type":"cosign container image signature"},"optional":null}"#;
    const SIGNATURE: &str = "MEYCIQCYJkgmI+OSX8Wvc1DNhGq8ij9QgMdDXE+ThyQDEdLCcAIhANUBn0uP0hveOK+D50RXTnCVCtZ/yelRV83wlNwCKTN5";

    #[test]
    fn an_openssl_signature_verifies_for_its_digest_only() {
        let key = CosignKey::from_pem(PEM).unwrap();
        key.verify(PAYLOAD, SIGNATURE, "sha256:ab").unwrap();
        let e = key.verify(PAYLOAD, SIGNATURE, "sha256:cd").unwrap_err();
        assert!(e.contains("names sha256:ab"), "{e}");
        let mut tampered = PAYLOAD.to_vec();
        tampered[70] ^= 1;
        let e = key.verify(&tampered, SIGNATURE, "sha256:ab").unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
    }

    #[test]
    fn payload_digest_needs_the_cosign_type_and_a_digest() {
        let ok = PAYLOAD;
        assert_eq!(payload_digest(ok).unwrap(), "sha256:ab");
        let other = br#"{"critical":{"image":{"docker-manifest-digest":"sha256:ab"},"type":"x"}}"#;
        assert!(payload_digest(other).unwrap_err().contains("critical.type"));
        assert!(payload_digest(b"[").is_err());
        let key = CosignKey::from_pem(PEM).unwrap();
        let e = key.verify(ok, "AAAA", "sha256:ab").unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        assert!(key
            .verify(ok, "*", "sha256:ab")
            .unwrap_err()
            .contains("base64"));
    }
}
