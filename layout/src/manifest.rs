//! Manifest inspection (pure): what a manifest must be for Lighter to store it (JSON, schema 2, a
//! media type it stores, descriptors with valid digests and sizes), which media type it has, what
//! it references, its subject, and the descriptor the referrers API lists for it. OCI image
//! manifest and index, Docker schema 2 manifest and manifest list (image spec: manifest.md,
//! image-index.md, descriptor.md). Whether the references are present, and how large a manifest
//! may be (`manifest_size_max_bytes`), the control plane decides: both are questions about the
//! repository and the configuration, not the bytes.
//!
//! Fuzzed by `fuzz/`'s `manifest` target, which holds [`inspect`] to what [`Inspected`] promises.

use serde_json::{Map, Value};

use crate::digest::Digest;
use crate::media::{self, ManifestKind};

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, PartialEq, Eq)]
pub struct Inspected {
    /// One of the four types [`media::manifest_kind`] knows, so always short ASCII.
    pub media_type: String,
    /// `media::manifest_kind(&media_type)`.
    pub kind: ManifestKind,
    /// Blobs (image manifests) or child manifests (indexes) that must already be in the repository.
    pub references: Vec<Digest>,
    pub subject: Option<Digest>,
    /// `artifactType` as the referrers API reports it.
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
}

impl Inspected {
    /// The descriptor of this manifest in a referrers list.
    pub fn referrer_descriptor(&self, digest: &Digest, size: u64) -> Value {
        let mut d = serde_json::json!({
            "mediaType": self.media_type,
            "digest": digest.to_string(),
            "size": size,
        });
        if let Some(t) = &self.artifact_type {
            d["artifactType"] = Value::String(t.clone());
        }
        if let Some(a) = &self.annotations {
            d["annotations"] = Value::Object(a.clone());
        }
        d
    }
}

/// Inspects `bytes` as a manifest. `content_type` is the request's `Content-Type` without
/// parameters, if any; a generic one (`application/json`, `application/octet-stream`, empty)
/// counts as none. The same bytes and content type always give the same answer, and an accepted
/// manifest inspected again with its own `media_type` gives the same [`Inspected`].
pub fn inspect(bytes: &[u8], content_type: Option<&str>) -> Result<Inspected, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    let obj = value.as_object().ok_or("manifest must be a JSON object")?;
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err("manifest must have \"schemaVersion\": 2".into());
    }
    let field_type = match obj.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err("\"mediaType\" must be a string".into()),
    };
    let generic = |t: &str| matches!(t, "" | "application/json" | "application/octet-stream");
    let media_type = match (content_type.filter(|t| !generic(t)), field_type) {
        (Some(ct), Some(ft)) if ct != ft => {
            return Err(format!(
                "the manifest's mediaType {ft:?} does not match the Content-Type {ct:?}"
            ))
        }
        (Some(ct), _) => ct.to_owned(),
        (None, Some(ft)) => ft.to_owned(),
        (None, None) if obj.contains_key("manifests") => media::OCI_INDEX.to_owned(),
        (None, None) => media::OCI_MANIFEST.to_owned(),
    };
    let kind = media::manifest_kind(&media_type).ok_or_else(|| {
        format!(
            "unsupported manifest media type {media_type:?}: Lighter stores {}, {}, {} and {}",
            media::OCI_MANIFEST,
            media::OCI_INDEX,
            media::DOCKER_MANIFEST,
            media::DOCKER_MANIFEST_LIST
        )
    })?;

    let mut references = Vec::new();
    let mut config_media_type = None;
    match kind {
        ManifestKind::Image => {
            let config = obj
                .get("config")
                .ok_or("image manifest has no \"config\"")?;
            let (digest, config_type) = descriptor(config, "config")?;
            references.push(digest);
            config_media_type = Some(config_type);
            let layers = match obj.get("layers") {
                Some(Value::Array(a)) => a.as_slice(),
                None => &[],
                Some(_) => return Err("\"layers\" must be an array".into()),
            };
            for (i, layer) in layers.iter().enumerate() {
                let (digest, layer_type) = descriptor(layer, &format!("layers[{i}]"))?;
                let foreign = media::NON_DISTRIBUTABLE_LAYERS.contains(&layer_type.as_str())
                    || layer.get("urls").is_some();
                if !foreign {
                    references.push(digest);
                }
            }
        }
        ManifestKind::Index => {
            let manifests = match obj.get("manifests") {
                Some(Value::Array(a)) => a.as_slice(),
                _ => return Err("index has no \"manifests\" array".into()),
            };
            for (i, m) in manifests.iter().enumerate() {
                references.push(descriptor(m, &format!("manifests[{i}]"))?.0);
            }
        }
    }
    let subject = match obj.get("subject") {
        None | Some(Value::Null) => None,
        Some(s) => Some(descriptor(s, "subject")?.0),
    };
    let artifact_type = match obj.get("artifactType") {
        Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
        Some(Value::String(_)) | None => config_media_type,
        Some(_) => return Err("\"artifactType\" must be a string".into()),
    };
    let annotations = match obj.get("annotations") {
        Some(Value::Object(a)) => Some(a.clone()),
        None | Some(Value::Null) => None,
        Some(_) => return Err("\"annotations\" must be an object".into()),
    };
    Ok(Inspected {
        media_type,
        kind,
        references,
        subject,
        artifact_type,
        annotations,
    })
}

/// A descriptor's digest and media type; `where_` names it in errors.
fn descriptor(v: &Value, where_: &str) -> Result<(Digest, String), String> {
    let o = v
        .as_object()
        .ok_or_else(|| format!("{where_} must be a descriptor object"))?;
    let media_type = o
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{where_} has no string \"mediaType\""))?;
    let digest = o
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{where_} has no string \"digest\""))?;
    let digest = Digest::parse(digest).map_err(|e| format!("{where_}: {e}"))?;
    if o.get("size").and_then(Value::as_u64).is_none() {
        return Err(format!("{where_} has no non-negative integer \"size\""));
    }
    Ok((digest, media_type.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{D2}","size":3}}]{extra}}}"#,
            media::OCI_MANIFEST
        )
    }

    #[test]
    fn image_manifest_references_config_and_layers() {
        let m = inspect(image("").as_bytes(), Some(media::OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(
            m.references,
            [Digest::parse(D1).unwrap(), Digest::parse(D2).unwrap()]
        );
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        assert!(m.subject.is_none());
    }

    #[test]
    fn subject_and_artifact_type_are_read() {
        let extra = format!(
            r#","artifactType":"application/x.sbom","subject":{{"mediaType":"{}","digest":"{D1}","size":9}},"annotations":{{"a":"b"}}"#,
            media::OCI_MANIFEST
        );
        let m = inspect(image(&extra).as_bytes(), None).unwrap();
        assert_eq!(m.subject, Some(Digest::parse(D1).unwrap()));
        assert_eq!(m.artifact_type.as_deref(), Some("application/x.sbom"));
        let d = m.referrer_descriptor(&Digest::parse(D2).unwrap(), 10);
        assert_eq!(d["annotations"]["a"], "b");
        assert_eq!(d["size"], 10);
    }

    #[test]
    fn invalid_manifests_table() {
        let cases = [
            ("not json", Some(media::OCI_MANIFEST), "valid JSON"),
            ("[]", None, "object"),
            (r#"{"schemaVersion":1}"#, None, "schemaVersion"),
            (
                r#"{"schemaVersion":2,"mediaType":"a/b"}"#,
                Some(media::OCI_MANIFEST),
                "does not match",
            ),
            (
                r#"{"schemaVersion":2}"#,
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                "unsupported",
            ),
            (
                r#"{"schemaVersion":2,"config":{"mediaType":"x/y","digest":"sha256:zz","size":1}}"#,
                None,
                "config",
            ),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
                None,
                "manifests",
            ),
        ];
        for (body, ct, want) in cases {
            let err = inspect(body.as_bytes(), ct).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let m = image("").replace(
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
        );
        assert_eq!(inspect(m.as_bytes(), None).unwrap().references.len(), 1);
    }
}
