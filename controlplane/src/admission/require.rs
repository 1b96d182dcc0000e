//! Supply-chain requirements (`[[admission.require]]`): per repository prefix, what the image's
//! digest must have among its referrers in Lighter (a signature, verified when a cosign key is
//! given; an SBOM; a vulnerability report without findings at a given severity; any artifact
//! type). The image is resolved in Lighter first (a tag to the digest it names now); the
//! evidence is what Lighter holds: the referrers of that digest in the same repository, and
//! cosign's classic `sha256-<hex>.sig` tag there (for a mirrored image, `mod.rs` fetches the
//! manifest and that tag through the mirror first). Reads are bounded (`artifact_size_max_bytes`,
//! `referrers_checked_max`).

use std::path::PathBuf;

use lighter_layout::{Digest, Layout, RepoName, Tag};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::policy::Mode;
use super::scan::{self, Severity};
use super::verify::{self, CosignKey};

/// `[[admission.require]]` in the config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RequireRule {
    /// Repository prefix in Lighter, matched at a component boundary (`prod/`, `team/app`,
    /// `docker.io/library/` for a mirror); the longest matching rule applies.
    pub prefix: String,
    /// A signature referrer: cosign's (or its `.sig` tag) or notation's; with
    /// `cosign_key_file`, a cosign signature that verifies with that key.
    pub signature: bool,
    /// PEM public key (ECDSA P-256) cosign signatures must verify with.
    pub cosign_key_file: Option<PathBuf>,
    /// An SBOM referrer (`admission.sbom_artifact_types`).
    pub sbom: bool,
    /// A vulnerability report referrer (`admission.report_artifact_types`) that can be read.
    pub vulnerability_report: bool,
    /// Refuse when a vulnerability report has findings at this severity or above (`critical`,
    /// `high`, `medium`, `low`).
    pub refuse_severity: Option<Severity>,
    /// Further artifact types that must each be among the referrers.
    pub artifact_types: Vec<String>,
    /// `enforce` or `audit`; unset: `admission.mode`.
    pub mode: Option<Mode>,
}

/// Artifact types of SBOMs.
pub fn default_sbom_types() -> Vec<String> {
    [
        "application/spdx+json",
        "text/spdx",
        "application/vnd.cyclonedx+json",
        "application/vnd.cyclonedx+xml",
        "application/vnd.syft+json",
    ]
    .map(String::from)
    .to_vec()
}

/// Artifact types of vulnerability reports (their format is told from their content).
pub fn default_report_types() -> Vec<String> {
    [
        "application/sarif+json",
        "application/vnd.aquasec.trivy.report+json",
        "application/trivy+json",
    ]
    .map(String::from)
    .to_vec()
}

struct Rule {
    config: RequireRule,
    key: Option<CosignKey>,
}

/// The compiled rules, keys loaded.
pub struct Requirements {
    rules: Vec<Rule>,
    mode: Mode,
    sbom_types: Vec<String>,
    report_types: Vec<String>,
    artifact_size_max_bytes: u64,
    referrers_checked_max: usize,
}

/// Failures for one image, with the mode of the rule that found them.
pub struct Finding {
    pub mode: Mode,
    pub reason: String,
}

impl Requirements {
    pub fn new(c: &super::policy::AdmissionConfig) -> Result<Requirements, String> {
        let mut rules = Vec::new();
        for (i, r) in c.require.iter().enumerate() {
            let at = format!("admission.require[{i}] (prefix {:?})", r.prefix);
            let prefix = r.prefix.trim_end_matches('/');
            if !prefix.is_empty() && RepoName::parse(prefix).is_err() {
                return Err(format!("{at}: the prefix is not a repository name prefix"));
            }
            let key = match &r.cosign_key_file {
                None => None,
                Some(path) => {
                    let pem = std::fs::read_to_string(path)
                        .map_err(|e| format!("{at}: cosign_key_file {}: {e}", path.display()))?;
                    Some(
                        CosignKey::from_pem(&pem).map_err(|e| {
                            format!("{at}: cosign_key_file {}: {e}", path.display())
                        })?,
                    )
                }
            };
            if key.is_some() && !r.signature {
                return Err(format!("{at}: cosign_key_file needs signature = true"));
            }
            rules.push(Rule {
                config: r.clone(),
                key,
            });
        }
        Ok(Requirements {
            rules,
            mode: c.mode,
            sbom_types: c.sbom_artifact_types.clone(),
            report_types: c.report_artifact_types.clone(),
            artifact_size_max_bytes: c.artifact_size_max_bytes,
            referrers_checked_max: c.referrers_checked_max,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a rule applies to `repository`, and if so whether it asks for a signature.
    pub fn applies(&self, repository: &str) -> Option<bool> {
        self.rule(repository).map(|r| r.config.signature)
    }

    /// The digests of the cosign payloads of signature manifest `m` within
    /// `artifact_size_max_bytes` (for fetching them through a mirror).
    pub fn payloads(&self, layout: &Layout, repository: &RepoName, m: &Digest) -> Vec<Digest> {
        self.layers(layout, repository, m)
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.media_type == verify::SIMPLE_SIGNING_TYPE)
            .filter(|l| l.size <= self.artifact_size_max_bytes)
            .map(|l| l.digest)
            .collect()
    }

    /// The rule for a repository: the longest prefix at a component boundary.
    fn rule(&self, repository: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| under(repository, &r.config.prefix))
            .max_by_key(|r| r.config.prefix.trim_end_matches('/').len())
    }

    /// Checks `image` (as written, for messages), in `repository`, at `digest` (None: Lighter
    /// holds no such tag). Nothing when no rule applies or every requirement is met.
    pub fn check(
        &self,
        layout: &Layout,
        image: &str,
        repository: &RepoName,
        digest: Option<&str>,
    ) -> Option<Finding> {
        let rule = self.rule(repository.as_str())?;
        let mode = rule.config.mode.unwrap_or(self.mode);
        let refuse = |why: String| {
            Some(Finding {
                mode,
                reason: format!(
                    "image {image} is refused by require rule {:?}: {why}",
                    rule.config.prefix
                ),
            })
        };
        let Some(digest) = digest.and_then(|d| Digest::parse(d).ok()) else {
            return refuse(format!(
                "Lighter does not hold it in {repository}, so its referrers cannot be checked"
            ));
        };
        match layout.manifest(repository, &digest) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return refuse(format!(
                    "Lighter does not hold {digest} in {repository}, so its referrers cannot be checked"
                ))
            }
            Err(e) => return refuse(format!("cannot read {digest} in {repository}: {e}")),
        }
        let referrers = match layout.referrers(repository, &digest) {
            Ok(r) => r,
            Err(e) => return refuse(format!("cannot read the referrers of {digest}: {e}")),
        };
        let referrers: Vec<(Digest, String)> = referrers
            .iter()
            .filter_map(|raw| {
                let d: Value = serde_json::from_slice(raw).ok()?;
                let digest = Digest::parse(d["digest"].as_str()?).ok()?;
                Some((digest, d["artifactType"].as_str().unwrap_or("").to_owned()))
            })
            .take(self.referrers_checked_max)
            .collect();
        let of_type = |types: &[&str]| -> Vec<&Digest> {
            referrers
                .iter()
                .filter(|(_, t)| types.contains(&t.as_str()))
                .map(|(d, _)| d)
                .collect()
        };
        let mut problems = Vec::new();
        let c = &rule.config;
        if c.signature {
            let mut cosign: Vec<Digest> = of_type(&[verify::COSIGN_SIGNATURE_TYPE])
                .into_iter()
                .cloned()
                .collect();
            if let Ok(Some(e)) = layout.tag(repository, &classic_sig_tag(&digest)) {
                cosign.push(e.digest);
            }
            let notation = of_type(&[verify::NOTATION_SIGNATURE_TYPE]);
            match &rule.key {
                None if cosign.is_empty() && notation.is_empty() => {
                    problems.push("it has no signature (cosign or notation)".to_owned())
                }
                None => {}
                Some(key) => {
                    if let Err(why) =
                        self.cosign_verified(layout, repository, &digest, &cosign, key)
                    {
                        let file = c.cosign_key_file.as_ref().expect("a key has its file");
                        problems.push(format!(
                            "no cosign signature verifies with {}: {why}",
                            file.display()
                        ));
                    }
                }
            }
        }
        if c.sbom {
            let types: Vec<&str> = self.sbom_types.iter().map(String::as_str).collect();
            if of_type(&types).is_empty() {
                problems.push(format!("it has no SBOM ({})", self.sbom_types.join(", ")));
            }
        }
        for t in &c.artifact_types {
            if of_type(&[t.as_str()]).is_empty() {
                problems.push(format!("it has no referrer of artifact type {t}"));
            }
        }
        if c.vulnerability_report || c.refuse_severity.is_some() {
            let types: Vec<&str> = self.report_types.iter().map(String::as_str).collect();
            let reports = of_type(&types);
            if let Err(why) = self.reports_clear(layout, repository, &reports, c) {
                problems.push(why);
            }
        }
        if problems.is_empty() {
            return None;
        }
        refuse(format!("{digest}: {}", problems.join("; ")))
    }

    /// Ok if one of the cosign signature manifests holds a payload for `digest` signed by `key`;
    /// Err says why each failed.
    fn cosign_verified(
        &self,
        layout: &Layout,
        repository: &RepoName,
        digest: &Digest,
        manifests: &[Digest],
        key: &CosignKey,
    ) -> Result<(), String> {
        if manifests.is_empty() {
            return Err("it has no cosign signature".into());
        }
        let mut why = Vec::new();
        for m in manifests {
            let layers = match self.layers(layout, repository, m) {
                Ok(l) => l,
                Err(e) => {
                    why.push(format!("{m}: {e}"));
                    continue;
                }
            };
            for layer in layers
                .iter()
                .filter(|l| l.media_type == verify::SIMPLE_SIGNING_TYPE)
            {
                let Some(sig) = layer
                    .annotations
                    .get(verify::SIGNATURE_ANNOTATION)
                    .and_then(Value::as_str)
                else {
                    why.push(format!(
                        "{m}: a payload without the {} annotation",
                        verify::SIGNATURE_ANNOTATION
                    ));
                    continue;
                };
                let checked = self
                    .blob(layout, repository, &layer.digest)
                    .and_then(|payload| key.verify(&payload, sig, &digest.to_string()));
                match checked {
                    Ok(()) => return Ok(()),
                    Err(e) => why.push(format!("{m}: {e}")),
                }
            }
        }
        if why.is_empty() {
            why.push(format!("no layer of type {}", verify::SIMPLE_SIGNING_TYPE));
        }
        Err(why.join(", "))
    }

    /// Ok if at least one report was read (when one is required) and none has findings at or
    /// above `refuse_severity`.
    fn reports_clear(
        &self,
        layout: &Layout,
        repository: &RepoName,
        reports: &[&Digest],
        c: &RequireRule,
    ) -> Result<(), String> {
        let mut read = 0;
        let mut unreadable = Vec::new();
        let mut over = Vec::new();
        for m in reports {
            match self.report(layout, repository, m) {
                Ok(counts) => {
                    read += 1;
                    if let Some(s) = c.refuse_severity {
                        if counts.at_or_above(s) > 0 {
                            over.push(format!(
                                "vulnerability report {m} has {} findings at {} or above ({})",
                                counts.at_or_above(s),
                                s.word(),
                                counts.summary()
                            ));
                        }
                    }
                }
                Err(e) => unreadable.push(format!("{m}: {e}")),
            }
        }
        if !over.is_empty() {
            return Err(over.join("; "));
        }
        if c.vulnerability_report && read == 0 {
            return Err(if unreadable.is_empty() {
                format!(
                    "it has no vulnerability report ({})",
                    self.report_types.join(", ")
                )
            } else {
                format!(
                    "no vulnerability report can be read ({})",
                    unreadable.join(", ")
                )
            });
        }
        Ok(())
    }

    /// The counts of the first layer of report manifest `m` in a known format.
    fn report(
        &self,
        layout: &Layout,
        repository: &RepoName,
        m: &Digest,
    ) -> Result<scan::Counts, String> {
        let mut why = Vec::new();
        for layer in self.layers(layout, repository, m)? {
            match self
                .blob(layout, repository, &layer.digest)
                .and_then(|b| scan::read(&b))
            {
                Ok((_, counts)) => return Ok(counts),
                Err(e) => why.push(format!("layer {}: {e}", layer.digest)),
            }
        }
        Err(if why.is_empty() {
            "no layers".into()
        } else {
            why.join(", ")
        })
    }

    /// The layers of a manifest of the repository.
    fn layers(
        &self,
        layout: &Layout,
        repository: &RepoName,
        m: &Digest,
    ) -> Result<Vec<Layer>, String> {
        if !matches!(layout.manifest(repository, m), Ok(Some(_))) {
            return Err("not in the repository".into());
        }
        let bytes = match layout.read_content(m) {
            Ok(Some(b)) => b,
            Ok(None) => return Err("its content is gone".into()),
            Err(e) => return Err(e.to_string()),
        };
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
        Ok(v.get("layers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|l| {
                Some(Layer {
                    media_type: l.get("mediaType")?.as_str()?.to_owned(),
                    size: l.get("size")?.as_u64()?,
                    digest: Digest::parse(l.get("digest")?.as_str()?).ok()?,
                    annotations: l
                        .get("annotations")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                })
            })
            .collect())
    }

    /// A blob of the repository, whole, if within `artifact_size_max_bytes`.
    fn blob(&self, layout: &Layout, repository: &RepoName, d: &Digest) -> Result<Vec<u8>, String> {
        use std::io::Read;
        let (file, len) = match layout.open_blob(repository, d) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(format!("blob {d} is not in the repository")),
            Err(e) => return Err(format!("blob {d}: {e}")),
        };
        if len > self.artifact_size_max_bytes {
            return Err(format!(
                "blob {d} is {len} bytes, over admission.artifact_size_max_bytes ({})",
                self.artifact_size_max_bytes
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(len)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("blob {d}: {e}"))?;
        Ok(bytes)
    }
}

struct Layer {
    media_type: String,
    size: u64,
    digest: Digest,
    annotations: serde_json::Map<String, Value>,
}

/// Cosign's tag for the signatures of `digest`: `sha256-<hex>.sig`.
pub fn classic_sig_tag(digest: &Digest) -> Tag {
    let name = format!("{}.sig", digest.to_string().replacen(':', "-", 1));
    Tag::parse(&name).expect("sha256-<hex>.sig is a valid tag")
}

/// Whether `repository` is `prefix` or under it (component boundary); an empty prefix is all.
fn under(repository: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty()
        || repository == p
        || (repository.starts_with(p) && repository.as_bytes().get(p.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_component_boundaries() {
        assert!(under("prod/app", "prod/"));
        assert!(under("prod/app", "prod"));
        assert!(under("prod", "prod/"));
        assert!(!under("production/app", "prod/"));
        assert!(!under("production/app", "prod"));
        assert!(under("anything", ""));
        assert!(under("docker.io/library/nginx", "docker.io/library/"));
    }

    #[test]
    fn classic_signature_tags_are_cosigns() {
        let d = Digest::parse(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .unwrap();
        assert_eq!(
            classic_sig_tag(&d).as_str(),
            "sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.sig"
        );
    }
}
