//! Image references as users write them (`nginx`, `ghcr.io/org/app:1.2`,
//! `localhost:5000/app@sha256:…`), normalised the way Docker and containerd do: a first
//! component with a `.` or `:`, or `localhost`, is the registry; otherwise the registry is
//! `docker.io`, and one-component Docker Hub names get `library/`; no tag and no digest means
//! `latest`.

use std::fmt;

use crate::digest::Digest;
use crate::name::{RepoName, Tag};

/// A normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host, with its port if any (`docker.io`, `localhost:5000`).
    pub registry: String,
    pub repository: RepoName,
    /// Kept when a digest is given too (`app:1.2@sha256:…`); the digest wins for pulling.
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

/// Longest image reference accepted.
pub const IMAGE_REF_LENGTH_MAX: usize = 512;

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        if s.is_empty() || s.len() > IMAGE_REF_LENGTH_MAX {
            return Err(format!(
                "image reference must be 1 to {IMAGE_REF_LENGTH_MAX} characters"
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).map_err(|e| format!("{s:?}: {e}"))?),
            ),
            None => (s, None),
        };
        // A ':' after the last '/' separates the tag (a ':' before it is a registry port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (p, t) = rest.split_at(last_slash + i);
                (
                    p,
                    Some(Tag::parse(&t[1..]).map_err(|e| format!("{s:?}: {e}"))?),
                )
            }
            None => (rest, None),
        };
        let (registry, repo) = match path.split_once('/') {
            Some((first, r)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), r.to_owned())
            }
            _ => ("docker.io".to_owned(), path.to_owned()),
        };
        if !valid_host(&registry) {
            return Err(format!("{s:?}: invalid registry host {registry:?}"));
        }
        let registry = registry.to_ascii_lowercase();
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
            _ => registry,
        };
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        let repository = RepoName::parse(&repo).map_err(|e| format!("{s:?}: {e}"))?;
        let tag = match (&tag, &digest) {
            (None, None) => Some(Tag::parse("latest").expect("valid tag")),
            _ => tag,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// `host[:port]`: DNS labels (letters, digits, inner `-`) joined by `.`, or a bracketed IPv6
/// address; the port is 1 to 5 digits.
fn valid_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') && (!h.starts_with('[') || h.ends_with(']')) => {
            (h, Some(p))
        }
        _ => (s, None),
    };
    if port.is_some_and(|p| p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return !v6.is_empty()
            && v6
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, &str)] = &[
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            (
                "index.docker.io/library/nginx",
                "docker.io/library/nginx:latest",
            ),
            ("ghcr.io/org/app:1.2", "ghcr.io/org/app:1.2"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            (
                "registry.example.com:5000/team/app:v1",
                "registry.example.com:5000/team/app:v1",
            ),
            ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"),
            ("[::1]:5000/a", "[::1]:5000/a:latest"),
            ("Registry.Example.COM/a", "registry.example.com/a:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(
                ImageRef::parse(input).unwrap().to_string(),
                *want,
                "{input}"
            );
        }
        let with_digest = ImageRef::parse(&format!("nginx@{D}")).unwrap();
        assert_eq!(with_digest.tag, None);
        assert_eq!(with_digest.digest.unwrap().to_string(), D);
        let both = ImageRef::parse(&format!("ghcr.io/a/b:1@{D}")).unwrap();
        assert_eq!(both.to_string(), format!("ghcr.io/a/b:1@{D}"));
    }

    #[test]
    fn invalid_references_table() {
        for s in [
            "",
            "UPPER/case",
            "a//b",
            "nginx:",
            "nginx@sha256:zz",
            "nginx:.bad",
            "reg!.io/a",
            "a/../b",
            "z:z7docker.io[[/a",
            "host.io:99999999/a",
            "-bad.io/a",
        ] {
            assert!(ImageRef::parse(s).is_err(), "{s:?}");
        }
    }
}
