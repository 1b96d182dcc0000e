//! The admission policy (pure): which images may run, and how an image is rewritten to pull
//! through Lighter. Image references and rule prefixes are normalised first (`nginx` =
//! `docker.io/library/nginx:latest`); the longest matching prefix wins, deny wins a tie, and the
//! default decides when nothing matches. Prefixes match at component boundaries: `docker.io/library/nginx`
//! matches `docker.io/library/nginx:1.27` but not `docker.io/library/nginx-unprivileged`.

use lighter_layout::ImageRef;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refuse what the policy refuses.
    #[default]
    Enforce,
    /// Allow everything, but warn and log what would be refused.
    Audit,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

/// `[admission]` in the config file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    pub mode: Mode,
    /// Image prefixes allowed (`docker.io/library/`, `ghcr.io/org/app`, `nginx`).
    pub allow: Vec<String>,
    /// Image prefixes refused.
    pub deny: Vec<String>,
    /// The verdict for an image no prefix matches.
    pub default: Verdict,
    /// Refuse images not pinned by digest.
    pub require_digest: bool,
    /// Refuse images Lighter cannot serve: not stored here and not from a mirrored upstream.
    pub require_present: bool,
    /// Namespaces whose pods are not checked.
    pub exempt_namespaces: Vec<String>,
    /// Host names (with port) by which clients reach this registry, e.g. `lighter.lighter.svc:5000`:
    /// images under them are looked up locally.
    pub registry_hosts: Vec<String>,
    pub mutate: MutateConfig,
    /// Supply-chain requirements per repository prefix (signatures, SBOMs, scans).
    pub require: Vec<super::require::RequireRule>,
    /// Artifact types that count as an SBOM for `require.sbom`.
    pub sbom_artifact_types: Vec<String>,
    /// Artifact types that count as a vulnerability report (Trivy JSON or SARIF inside).
    pub report_artifact_types: Vec<String>,
    /// Largest signature payload or vulnerability report read for a decision.
    pub artifact_size_max_bytes: u64,
    /// Most referrers of one image looked at for a decision.
    pub referrers_checked_max: usize,
    /// How long a validating review may wait for the mirror to fetch what a requirement needs
    /// of mirrored images (their manifests, cosign's `.sig` tags); then it decides on what is
    /// there. 0: nothing is fetched, only what the mirror already holds is checked.
    pub mirror_fetch_timeout_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> AdmissionConfig {
        AdmissionConfig {
            mode: Mode::default(),
            allow: Vec::new(),
            deny: Vec::new(),
            default: Verdict::default(),
            require_digest: false,
            require_present: false,
            exempt_namespaces: Vec::new(),
            registry_hosts: Vec::new(),
            mutate: MutateConfig::default(),
            require: Vec::new(),
            sbom_artifact_types: super::require::default_sbom_types(),
            report_artifact_types: super::require::default_report_types(),
            artifact_size_max_bytes: 4 << 20,
            referrers_checked_max: 256,
            mirror_fetch_timeout_ms: 5_000,
        }
    }
}

/// `[admission.mutate]`: rewriting images to pull through Lighter.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MutateConfig {
    pub enabled: bool,
    /// The registry host nodes pull Lighter from (`localhost:5000` for the node-mirror DaemonSet).
    pub rewrite_to: String,
    /// Namespaces whose pods are never rewritten.
    pub exclude_namespaces: Vec<String>,
    /// Pin every image Lighter holds by tag to the digest the tag names now
    /// (`name:tag@sha256:…`), so that what admission checked is what runs.
    pub pin_digest: bool,
}

/// The outcome for one image, with the rule that decided it (for people).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// A compiled policy.
pub struct Policy {
    rules: Vec<(String, Verdict, String)>,
    default: Verdict,
    require_digest: bool,
    require_present: bool,
}

impl Policy {
    pub fn new(c: &AdmissionConfig) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for (list, verdict) in [(&c.allow, Verdict::Allow), (&c.deny, Verdict::Deny)] {
            for p in list {
                let normal =
                    normalise_prefix(p).map_err(|e| format!("admission prefix {p:?}: {e}"))?;
                rules.push((normal, verdict, p.clone()));
            }
        }
        Ok(Policy {
            rules,
            default: c.default,
            require_digest: c.require_digest,
            require_present: c.require_present,
        })
    }

    /// Decides for `image` as written in a pod spec; `present` says whether Lighter can serve it.
    pub fn decide(&self, image: &str, present: impl Fn(&ImageRef) -> bool) -> Decision {
        let r = match ImageRef::parse(image) {
            Ok(r) => r,
            Err(e) => return deny(format!("image {image:?} is not a valid reference: {e}")),
        };
        let full = r.to_string();
        let mut best: Option<&(String, Verdict, String)> = None;
        for rule in &self.rules {
            if !matches_prefix(&full, &rule.0) {
                continue;
            }
            best = match best {
                Some(b) if b.0.len() > rule.0.len() => Some(b),
                Some(b) if b.0.len() == rule.0.len() && b.1 == Verdict::Deny => Some(b),
                _ => Some(rule),
            };
        }
        let (verdict, why) = match best {
            Some((_, v, written)) => (*v, format!("{} rule {written:?}", verdict_word(*v))),
            None => (
                self.default,
                format!("no rule matches, default is {}", verdict_word(self.default)),
            ),
        };
        if verdict == Verdict::Deny {
            return deny(format!("image {image} ({full}) is refused: {why}"));
        }
        if self.require_digest && r.digest.is_none() {
            return deny(format!("image {image} ({full}) is refused: require_digest is set and it has no @sha256: digest"));
        }
        if self.require_present && !present(&r) {
            return deny(format!(
                "image {image} ({full}) is refused: require_present is set and Lighter neither holds nor mirrors it"
            ));
        }
        Decision {
            allowed: true,
            reason: format!("image {image} ({full}) is allowed: {why}"),
        }
    }
}

fn deny(reason: String) -> Decision {
    Decision {
        allowed: false,
        reason,
    }
}

fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

/// Whether `full` (a normalised reference) starts with `prefix` at a component boundary.
fn matches_prefix(full: &str, prefix: &str) -> bool {
    full == prefix
        || (full.starts_with(prefix)
            && (prefix.ends_with('/')
                || matches!(full.as_bytes().get(prefix.len()), Some(b'/' | b':' | b'@'))))
}

/// A rule prefix in normalised form: `nginx` → `docker.io/library/nginx`, `ghcr.io` →
/// `ghcr.io/`, `docker.io/library/` stays, a tag or digest is kept if written.
fn normalise_prefix(p: &str) -> Result<String, String> {
    let p = p.trim();
    if p.is_empty() {
        return Err("empty prefix".into());
    }
    if p.ends_with('/') {
        // A namespace: `ghcr.io/org/`, or on Docker Hub `bitnami/` (no `library/` added).
        let lower = p.to_ascii_lowercase();
        let first = lower.split('/').next().unwrap_or("");
        let registry_like = first.contains(['.', ':']) || first == "localhost";
        return Ok(if registry_like {
            lower
        } else {
            format!("docker.io/{lower}")
        });
    }
    // A lone `host`, `host.tld` or `host:port` (not `name:tag`) is a registry.
    let registry_only = !p.contains(['/', '@']) && {
        let (host, port) = p.split_once(':').unwrap_or((p, ""));
        (host.contains('.') || host == "localhost") && port.bytes().all(|b| b.is_ascii_digit())
    };
    if registry_only {
        return Ok(format!("{}/", p.to_ascii_lowercase()));
    }
    let r = ImageRef::parse(p)?;
    let last = p.rsplit('/').next().unwrap_or(p);
    let mut s = r.name();
    if last.contains(':') && !last.contains('@') {
        if let Some(t) = &r.tag {
            s = format!("{s}:{t}");
        }
    }
    if let Some(d) = &r.digest {
        s = format!("{s}@{d}");
    }
    Ok(s)
}

/// The reference to pull `image` through Lighter at `rewrite_to`, or None to leave it: already
/// rewritten, not from a mirrored upstream, or not a valid reference. Tags and digests are kept.
pub fn rewrite(image: &str, rewrite_to: &str, upstreams: &[String]) -> Option<String> {
    let r = ImageRef::parse(image).ok()?;
    if r.registry == rewrite_to || !upstreams.contains(&r.registry) {
        return None;
    }
    let prefix = lighter_layout::mirror_prefix(&r.registry);
    let mut s = format!("{rewrite_to}/{prefix}/{}", r.repository);
    if let Some(t) = &r.tag {
        // `nginx` alone means latest; keep what was written otherwise.
        s = format!("{s}:{t}");
    }
    if let Some(d) = &r.digest {
        s = format!("{s}@{d}");
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn policy(allow: &[&str], deny: &[&str], default: Verdict) -> Policy {
        Policy::new(&AdmissionConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            default,
            ..AdmissionConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_deny_wins_a_tie() {
        let p = policy(
            &["docker.io/library/", "ghcr.io/org/app"],
            &["docker.io/", "docker.io/library/"],
            Verdict::Deny,
        );
        let cases: &[(&str, bool)] = &[
            ("nginx", false),                        // tie on docker.io/library/: deny
            ("docker.io/bitnami/redis", false),      // docker.io/ deny
            ("ghcr.io/org/app:1.2", true),           // allow rule
            ("ghcr.io/org/app-other:1", false),      // boundary: not ghcr.io/org/app, default deny
            ("ghcr.io/org/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", true),
            ("quay.io/x/y", false),                  // default
        ];
        for (image, want) in cases {
            assert_eq!(
                p.decide(image, |_| true).allowed,
                *want,
                "{image}: {:?}",
                p.decide(image, |_| true)
            );
        }
        let p = policy(
            &["docker.io/library/nginx"],
            &["docker.io/library/"],
            Verdict::Deny,
        );
        assert!(
            p.decide("nginx:1.27", |_| true).allowed,
            "longer allow beats shorter deny"
        );
        assert!(!p.decide("redis", |_| true).allowed);
        let d = p.decide("redis", |_| true);
        assert!(
            d.reason.contains("redis") && d.reason.contains("docker.io/library/"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn normalisation_edge_cases() {
        let cases: &[(&str, &str)] = &[
            ("nginx", "docker.io/library/nginx"),
            ("library/nginx", "docker.io/library/nginx"),
            ("docker.io/library/", "docker.io/library/"),
            ("library/", "docker.io/library/"),
            ("bitnami/", "docker.io/bitnami/"),
            ("ghcr.io", "ghcr.io/"),
            ("localhost:5000", "localhost:5000/"),
            ("localhost:5000/app", "localhost:5000/app"),
            (
                "registry.example.com:5000/team/",
                "registry.example.com:5000/team/",
            ),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
        ];
        for (p, want) in cases {
            assert_eq!(normalise_prefix(p).unwrap(), *want, "{p}");
        }
        let p = policy(&["localhost:5000/"], &[], Verdict::Deny);
        assert!(p.decide("localhost:5000/team/app:v1", |_| true).allowed);
        assert!(!p.decide("localhost/team/app", |_| true).allowed);
        let p = policy(&["nginx:1.27"], &[], Verdict::Deny);
        assert!(p.decide("docker.io/library/nginx:1.27", |_| true).allowed);
        assert!(p.decide(&format!("nginx:1.27@{D}"), |_| true).allowed);
        assert!(!p.decide("nginx:1.28", |_| true).allowed);
        assert!(
            !p.decide("nginx", |_| true).allowed,
            "nginx is nginx:latest"
        );
    }

    #[test]
    fn digest_and_presence_requirements() {
        let mut c = AdmissionConfig {
            require_digest: true,
            ..AdmissionConfig::default()
        };
        let p = Policy::new(&c).unwrap();
        assert!(!p.decide("nginx:1.27", |_| true).allowed);
        assert!(p.decide(&format!("nginx@{D}"), |_| true).allowed);
        c.require_digest = false;
        c.require_present = true;
        let p = Policy::new(&c).unwrap();
        assert!(!p.decide("nginx", |_| false).reason.is_empty());
        assert!(!p.decide("nginx", |_| false).allowed);
        assert!(p.decide("nginx", |r| r.registry == "docker.io").allowed);
        assert!(!p.decide("Not A Ref", |_| true).allowed);
    }

    #[test]
    fn rewrite_keeps_tags_and_digests_and_is_idempotent() {
        let ups = ["docker.io".to_string(), "ghcr.io".to_string()];
        assert_eq!(
            rewrite("nginx", "localhost:5000", &ups).unwrap(),
            "localhost:5000/docker.io/library/nginx:latest"
        );
        assert_eq!(
            rewrite(&format!("ghcr.io/a/b:1@{D}"), "localhost:5000", &ups).unwrap(),
            format!("localhost:5000/ghcr.io/a/b:1@{D}")
        );
        let once = rewrite("redis:7", "localhost:5000", &ups).unwrap();
        assert_eq!(rewrite(&once, "localhost:5000", &ups), None);
        assert_eq!(
            rewrite("quay.io/a/b", "localhost:5000", &ups),
            None,
            "not mirrored: left alone"
        );
        // An upstream on a port: its repositories live under host_port.
        let ups = ["registry.corp:8443".to_string()];
        assert_eq!(
            rewrite("registry.corp:8443/team/app:1.0", "localhost:5000", &ups).unwrap(),
            "localhost:5000/registry.corp_8443/team/app:1.0"
        );
    }
}
