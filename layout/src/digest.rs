//! Content digests (`<algorithm>:<encoded>`), as the OCI image spec's descriptor section defines
//! them, restricted to the algorithms Lighter stores: sha256 and sha512.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::inline::InlineStr;

/// The digest algorithms Lighter accepts and stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    pub fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// Why a digest string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DigestError {
    /// Not `<algorithm>:<encoded>` with a known algorithm's lowercase hex encoding.
    Malformed,
    /// Well-formed per the grammar, but an algorithm Lighter does not store.
    Unsupported,
}

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestError::Malformed => f.write_str(
                "malformed digest: expected sha256:<64 lowercase hex> or sha512:<128 lowercase hex>",
            ),
            DigestError::Unsupported => {
                f.write_str("unsupported digest algorithm: Lighter accepts sha256 and sha512")
            }
        }
    }
}

impl std::error::Error for DigestError {}

/// A validated digest. The hex is always lowercase and of the algorithm's length, so it is safe to
/// use as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: InlineStr<128>,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        // The common case first: `sha256:` and 64 lowercase hex digits, checked without a
        // branch per byte (every blob GET parses one).
        if let Some(hex) = s.strip_prefix("sha256:") {
            if hex.len() == Algorithm::Sha256.hex_len() && is_lower_hex(hex.as_bytes()) {
                return Ok(Digest {
                    algorithm: Algorithm::Sha256,
                    hex: InlineStr::new(hex).expect("checked: ASCII hex of the algorithm's length"),
                });
            }
        }
        let (alg, hex) = s.split_once(':').ok_or(DigestError::Malformed)?;
        // Grammar of the image spec: algorithm-component [a-z0-9]+ joined by [+._-].
        let alg_ok = !alg.is_empty()
            && alg.len() <= 32
            && alg.split(['+', '.', '_', '-']).all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            });
        if !alg_ok {
            return Err(DigestError::Malformed);
        }
        let algorithm = Algorithm::from_name(alg).ok_or_else(|| {
            // Only call it unsupported when the encoded part is at least plausible.
            if !hex.is_empty()
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b))
            {
                DigestError::Unsupported
            } else {
                DigestError::Malformed
            }
        })?;
        if hex.len() != algorithm.hex_len() || !is_lower_hex(hex.as_bytes()) {
            return Err(DigestError::Malformed);
        }
        Ok(Digest {
            algorithm,
            hex: InlineStr::new(hex).expect("checked: ASCII hex of the algorithm's length"),
        })
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = algorithm.hasher();
        h.update(bytes);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex encoding.
    pub fn hex(&self) -> &str {
        self.hex.as_str()
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An incremental hash of one algorithm. `Clone` so a caller can checkpoint before a chunk and
/// roll back if the chunk fails half-way.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Hasher::Sha256(_) => Algorithm::Sha256,
            Hasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        let algorithm = self.algorithm();
        let raw: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        Digest {
            algorithm,
            hex: InlineStr::new(&to_hex(&raw)).expect("hex of a digest fits"),
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Every byte is `0-9` or `a-f`. One pass without early exit, so the compiler makes it a few
/// vector instructions for a digest's 64 bytes instead of a branch per byte.
pub(crate) fn is_lower_hex(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |ok, &b| {
        ok & ((b.wrapping_sub(b'0') < 10) | (b.wrapping_sub(b'a') < 6))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// The branch-free hex check and the fast `sha256:` path agree with the plain definition
    /// for every byte at every position.
    #[test]
    fn the_hex_check_takes_exactly_lowercase_hex_at_any_position() {
        let plain = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        let hex = &EMPTY_SHA256[7..];
        for at in [0, 1, 31, 32, 63] {
            for b in 0..=255u8 {
                let mut bytes = hex.as_bytes().to_vec();
                bytes[at] = b;
                assert_eq!(is_lower_hex(&bytes), plain(b), "byte {b} at {at}");
                if let Ok(s) = std::str::from_utf8(&bytes) {
                    let parsed = Digest::parse(&format!("sha256:{s}"));
                    assert_eq!(parsed.is_ok(), plain(b), "byte {b} at {at}");
                }
            }
        }
        assert!(is_lower_hex(b""));
        assert!(Digest::parse("sha256:").is_err());
        assert!(Digest::parse(&EMPTY_SHA256[..70]).is_err());
        assert!(Digest::parse(&format!("{EMPTY_SHA256}0")).is_err());
        assert_eq!(
            Digest::parse(EMPTY_SHA256).unwrap().to_string(),
            EMPTY_SHA256
        );
    }

    #[test]
    fn digest_of_empty_input_is_the_well_known_value() {
        assert_eq!(Digest::of(Algorithm::Sha256, b"").to_string(), EMPTY_SHA256);
        assert_eq!(Digest::parse(EMPTY_SHA256).unwrap().hex().len(), 64);
    }

    #[test]
    fn digest_grammar_table() {
        let sha512 = format!("sha512:{}", "a".repeat(128));
        let ok = [EMPTY_SHA256, sha512.as_str()];
        for s in ok {
            assert_eq!(Digest::parse(s).unwrap().to_string(), s);
        }
        let malformed = [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:xyz",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:../../../../etc/passwd",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85\0",
        ];
        for s in malformed {
            assert_eq!(Digest::parse(s), Err(DigestError::Malformed), "{s:?}");
        }
        assert_eq!(
            Digest::parse("md5:d41d8cd98f00b204e9800998ecf8427e"),
            Err(DigestError::Unsupported)
        );
        assert_eq!(Digest::parse("sha384:abc"), Err(DigestError::Unsupported));
    }

    #[test]
    fn hasher_clone_is_a_checkpoint() {
        let mut a = Algorithm::Sha256.hasher();
        a.update(b"hello ");
        let checkpoint = a.clone();
        a.update(b"garbage");
        let mut b = checkpoint;
        b.update(b"world");
        assert_eq!(b.finish(), Digest::of(Algorithm::Sha256, b"hello world"));
    }
}
