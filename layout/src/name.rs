//! Repository names, tags and references, validated by the grammars of the OCI Distribution
//! Specification ("Pulling manifests"). A validated value is safe to use as a relative path:
//! no `..`, no empty or absolute components, no NUL, no `%`, no leading `_` (reserved for the
//! layout's own directories).

use std::fmt;

use crate::digest::{Digest, DigestError};
use crate::inline::InlineStr;

/// Longest repository name accepted. Clients limit `host/name` to 255 characters.
pub const NAME_LENGTH_MAX: usize = 255;
/// Longest tag, per the spec.
pub const TAG_LENGTH_MAX: usize = 128;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(InlineStr<NAME_LENGTH_MAX>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameError(pub &'static str);

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for NameError {}

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, NameError> {
        if s.is_empty() {
            return Err(NameError("repository name is empty"));
        }
        if s.len() > NAME_LENGTH_MAX {
            return Err(NameError("repository name is longer than 255 characters"));
        }
        for component in s.split('/') {
            if !valid_component(component.as_bytes()) {
                return Err(NameError(
                    "invalid repository name: each /-separated component must be lowercase \
                     letters and digits, joined by '.', '_', '__' or '-'",
                ));
            }
        }
        Ok(RepoName(
            InlineStr::new(s).expect("checked: ASCII, at most NAME_LENGTH_MAX"),
        ))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The local repository that mirrors `name` of the upstream called `upstream`:
    /// `<upstream>/<name>`, with Docker Hub's `library/` for one-component names
    /// (`docker.io` + `nginx` = `docker.io/library/nginx`). None if the result is not a valid name.
    pub fn mirrored(upstream: &str, name: &RepoName) -> Option<RepoName> {
        let upstream = &mirror_prefix(upstream);
        let s = if upstream == "docker.io" && !name.as_str().contains('/') {
            format!("{upstream}/library/{name}")
        } else {
            format!("{upstream}/{name}")
        };
        RepoName::parse(&s).ok()
    }

    /// The first `/`-separated component.
    pub fn first_component(&self) -> &str {
        let s = self.as_str();
        s.split('/').next().unwrap_or(s)
    }

    /// Everything after the first component, if there is more than one.
    pub fn rest(&self) -> Option<&str> {
        self.as_str().split_once('/').map(|(_, r)| r)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &[u8]) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut first = true;
    while i < c.len() {
        if !first {
            // A separator: '.', '_', '__' or one or more '-'.
            match c[i] {
                b'.' => i += 1,
                b'_' => {
                    i += 1;
                    if i < c.len() && c[i] == b'_' {
                        i += 1;
                    }
                }
                b'-' => {
                    while i < c.len() && c[i] == b'-' {
                        i += 1;
                    }
                }
                _ => return false,
            }
        }
        let start = i;
        while i < c.len() && alnum(c[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        first = false;
    }
    !first
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(InlineStr<TAG_LENGTH_MAX>);

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, NameError> {
        let b = s.as_bytes();
        let head_ok = b
            .first()
            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_');
        let tail_ok = b[1.min(b.len())..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !head_ok || !tail_ok || b.len() > TAG_LENGTH_MAX {
            return Err(NameError(
                "invalid tag: up to 128 of [a-zA-Z0-9._-], not starting with '.' or '-'",
            ));
        }
        Ok(Tag(
            InlineStr::new(s).expect("checked: ASCII, at most TAG_LENGTH_MAX")
        ))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

/// The `<tag-or-digest>` of a manifest URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReferenceError {
    Tag(NameError),
    Digest(DigestError),
}

impl fmt::Display for ReferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReferenceError::Tag(e) => e.fmt(f),
            ReferenceError::Digest(e) => e.fmt(f),
        }
    }
}

impl Reference {
    /// A reference containing ':' is a digest (tags cannot contain ':').
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Digest::parse(s)
                .map(Reference::Digest)
                .map_err(ReferenceError::Digest)
        } else {
            Tag::parse(s)
                .map(Reference::Tag)
                .map_err(ReferenceError::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// The first component of the local repositories that mirror `upstream`, a registry host as
/// clients write it (`docker.io`, `registry.corp:8443`): the host, with a port joined by `_`
/// (`registry.corp_8443`), since a repository name cannot hold `:`. Clients that address a
/// mirror by path prefix (`/v2/registry.corp_8443/team/app/...`) use this form; containerd's
/// `?ns=registry.corp:8443` maps to it.
pub fn mirror_prefix(upstream: &str) -> String {
    upstream.replace(':', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_name_grammar_table() {
        let ok = [
            "a",
            "library/nginx",
            "a.b/c_d/e__f/g-h/i---j",
            "0/1/2",
            "ghcr.io/org/app",
        ];
        for s in ok {
            assert!(RepoName::parse(s).is_ok(), "{s:?} should be valid");
        }
        let long = "a".repeat(256);
        let bad = [
            "",
            "A",
            "a//b",
            "/a",
            "a/",
            "..",
            "a/../b",
            "a/./b",
            ".a",
            "a.",
            "a..b",
            "a___b",
            "_a",
            "a/_manifests",
            "a-",
            "a\0b",
            "a%2fb",
            "a b",
            "a:b",
            long.as_str(),
        ];
        for s in bad {
            assert!(RepoName::parse(s).is_err(), "{s:?} should be invalid");
        }
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn upstreams_on_a_port_mirror_under_host_underscore_port() {
        let n = |s: &str| RepoName::parse(s).unwrap();
        assert_eq!(mirror_prefix("registry.corp:8443"), "registry.corp_8443");
        assert_eq!(mirror_prefix("ghcr.io"), "ghcr.io");
        assert_eq!(
            RepoName::mirrored("registry.corp:8443", &n("team/app"))
                .unwrap()
                .as_str(),
            "registry.corp_8443/team/app"
        );
    }

    #[test]
    fn mirrored_names_get_docker_hub_library_prefix() {
        let n = |s: &str| RepoName::parse(s).unwrap();
        assert_eq!(
            RepoName::mirrored("docker.io", &n("nginx"))
                .unwrap()
                .as_str(),
            "docker.io/library/nginx"
        );
        assert_eq!(
            RepoName::mirrored("docker.io", &n("bitnami/redis"))
                .unwrap()
                .as_str(),
            "docker.io/bitnami/redis"
        );
        assert_eq!(
            RepoName::mirrored("ghcr.io", &n("app")).unwrap().as_str(),
            "ghcr.io/app"
        );
        let long = "a".repeat(250);
        assert!(RepoName::mirrored("docker.io", &n(&long)).is_none());
        assert_eq!(n("docker.io/library/nginx").first_component(), "docker.io");
        assert_eq!(n("docker.io/library/nginx").rest(), Some("library/nginx"));
    }

    #[test]
    fn tag_grammar_table() {
        for s in ["latest", "v1.2.3", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(Tag::parse(s).is_ok(), "{s:?}");
        }
        for s in ["", ".a", "-a", "a/b", "a:b", "..", "a\0", &"a".repeat(129)] {
            assert!(Tag::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn reference_is_digest_when_it_has_a_colon() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse("sha256:abc"),
            Err(ReferenceError::Digest(DigestError::Malformed))
        ));
    }
}
