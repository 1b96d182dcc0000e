//! AdmissionReview handling (pure): find every image of the object under review, decide, and build
//! the response (validating: allowed, message, warnings; mutating: a JSON Patch).

use json_patch::{Patch, PatchOperation, ReplaceOperation};
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube_core::DynamicObject;
use serde_json::Value;

use super::policy::{rewrite, Mode, Policy};
use super::require::Finding;
use lighter_layout::ImageRef;

/// Where a kind keeps its pod spec.
pub fn pod_spec_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some("/spec"),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template/spec"),
        "CronJob" => Some("/spec/jobTemplate/spec/template/spec"),
        _ => None,
    }
}

/// Every `(JSON pointer of the image field, image)` of the object's pod spec: containers, init
/// containers and ephemeral containers.
pub fn images(kind: &str, object: &Value) -> Vec<(String, String)> {
    let Some(spec_ptr) = pod_spec_pointer(kind) else {
        return Vec::new();
    };
    let Some(spec) = object.pointer(spec_ptr) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        let Some(containers) = spec.get(list).and_then(Value::as_array) else {
            continue;
        };
        for (i, c) in containers.iter().enumerate() {
            if let Some(image) = c.get("image").and_then(Value::as_str) {
                out.push((format!("{spec_ptr}/{list}/{i}/image"), image.to_owned()));
            }
        }
    }
    out
}

/// What the validating webhook needs besides the policy.
pub struct Context<'a> {
    pub policy: &'a Policy,
    pub mode: Mode,
    pub exempt_namespaces: &'a [String],
    pub present: &'a dyn Fn(&ImageRef) -> bool,
    /// `rewrite_to` when mutation is on: the API server validates after mutating, so an image
    /// `<rewrite_to>/<upstream>/<rest>` is judged as the `<upstream>/<rest>` it stands for.
    pub rewritten_prefix: Option<&'a str>,
    pub upstreams: &'a [String],
    /// The supply-chain requirements' finding for an image as written, if any.
    pub require: &'a dyn Fn(&str) -> Option<Finding>,
}

/// The image a rewritten reference stands for, or the reference itself.
fn original<'i>(image: &'i str, ctx: &Context) -> std::borrow::Cow<'i, str> {
    unrewritten(image, ctx.rewritten_prefix, ctx.upstreams)
}

/// The image `<rewritten_prefix>/<mirror prefix>/<rest>` stands for (`<upstream>/<rest>`), or
/// the reference itself.
pub fn unrewritten<'i>(
    image: &'i str,
    rewritten_prefix: Option<&str>,
    upstreams: &[String],
) -> std::borrow::Cow<'i, str> {
    use std::borrow::Cow;
    let Some(prefix) = rewritten_prefix.filter(|p| !p.is_empty()) else {
        return Cow::Borrowed(image);
    };
    let Some(rest) = image
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return Cow::Borrowed(image);
    };
    let first = rest.split('/').next().unwrap_or("");
    // `<rewrite_to>/<mirror prefix>/<repo>`: the upstream's name is the registry again
    // (`registry.corp_8443` stands for `registry.corp:8443`).
    match upstreams
        .iter()
        .find(|u| lighter_layout::mirror_prefix(u) == first)
    {
        Some(u) if u == first => Cow::Borrowed(rest),
        Some(u) => Cow::Owned(format!("{u}{}", &rest[first.len()..])),
        None => Cow::Borrowed(image),
    }
}

/// Parses an AdmissionReview body; Err is a message for a 400.
pub fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("body is not an AdmissionReview: {e}"))?;
    if review.types.kind != "AdmissionReview" || review.types.api_version != "admission.k8s.io/v1" {
        return Err(format!(
            "body is a {} {}, not an admission.k8s.io/v1 AdmissionReview",
            review.types.api_version, review.types.kind
        ));
    }
    review
        .try_into()
        .map_err(|_| "AdmissionReview has no request".to_string())
}

fn object_json(req: &AdmissionRequest<DynamicObject>) -> Value {
    req.object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .unwrap_or(Value::Null)
}

pub fn validate(req: &AdmissionRequest<DynamicObject>, ctx: &Context) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    if req
        .namespace
        .as_ref()
        .is_some_and(|ns| ctx.exempt_namespaces.contains(ns))
    {
        return response;
    }
    let object = object_json(req);
    let (mut refused, mut warned) = (Vec::new(), Vec::new());
    for (_, image) in images(&req.kind.kind, &object) {
        let d = ctx.policy.decide(&original(&image, ctx), ctx.present);
        let finding = if d.allowed {
            (ctx.require)(&image)
        } else {
            Some(Finding {
                mode: ctx.mode,
                reason: d.reason,
            })
        };
        match finding {
            Some(Finding {
                mode: Mode::Enforce,
                reason,
            }) => refused.push(reason),
            Some(Finding {
                mode: Mode::Audit,
                reason,
            }) => warned.push(format!("audit: {reason}")),
            None => {}
        }
    }
    if refused.is_empty() && warned.is_empty() {
        return response;
    }
    let subject = format!(
        "{} {}/{}",
        req.kind.kind,
        req.namespace.as_deref().unwrap_or(""),
        if req.name.is_empty() {
            "(generated name)"
        } else {
            &req.name
        }
    );
    if !warned.is_empty() {
        tracing::info!(
            object = subject,
            "admission audit (allowed): {}",
            warned.join("; ")
        );
    }
    let mut r = if refused.is_empty() {
        response
    } else {
        tracing::info!(
            object = subject,
            "admission refused: {}",
            refused.join("; ")
        );
        response.deny(refused.join("; "))
    };
    if !warned.is_empty() {
        r.warnings = Some(warned);
    }
    r
}

/// The mutating webhook: rewrites mirrored images to pull through `rewrite_to` (when set),
/// then pins each image to the digest `pin` gives for it (`name:tag@digest`).
pub fn mutate(
    req: &AdmissionRequest<DynamicObject>,
    rewrite_to: Option<&str>,
    upstreams: &[String],
    excluded: &[String],
    pin: &dyn Fn(&str) -> Option<String>,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(req);
    if req
        .namespace
        .as_ref()
        .is_some_and(|ns| excluded.contains(ns))
    {
        return response;
    }
    let object = object_json(req);
    let mut ops = Vec::new();
    for (pointer, image) in images(&req.kind.kind, &object) {
        let rewritten = rewrite_to.and_then(|to| rewrite(&image, to, upstreams));
        let current = rewritten.as_deref().unwrap_or(&image);
        let new = match pin(current) {
            Some(digest) => Some(pinned(current, &digest)),
            None => rewritten,
        };
        if let Some(new) = new.filter(|n| *n != image) {
            ops.push(PatchOperation::Replace(ReplaceOperation {
                path: pointer.parse().expect("pointers we build are valid"),
                value: Value::String(new),
            }));
        }
    }
    if ops.is_empty() {
        return response;
    }
    match response.clone().with_patch(Patch(ops)) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot serialise a patch: {e}");
            response
        }
    }
}

/// `image` with `@digest` (any digest it had replaced); the tag is kept for people.
fn pinned(image: &str, digest: &str) -> String {
    let name = image.split_once('@').map_or(image, |(n, _)| n);
    format!("{name}@{digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_in_every_kind() {
        let spec = serde_json::json!({
            "containers": [{"name": "a", "image": "nginx"}],
            "initContainers": [{"name": "i", "image": "busybox"}],
            "ephemeralContainers": [{"name": "e", "image": "debug"}],
        });
        let pod = serde_json::json!({ "spec": spec });
        let templated = serde_json::json!({ "spec": { "template": { "spec": spec } } });
        let cron = serde_json::json!({ "spec": { "jobTemplate": { "spec": { "template": { "spec": spec } } } } });
        assert_eq!(images("Pod", &pod).len(), 3);
        for kind in [
            "Deployment",
            "StatefulSet",
            "DaemonSet",
            "ReplicaSet",
            "Job",
        ] {
            let found = images(kind, &templated);
            assert_eq!(found.len(), 3, "{kind}");
            assert_eq!(found[0].0, "/spec/template/spec/containers/0/image");
        }
        assert_eq!(
            images("CronJob", &cron)[2],
            (
                "/spec/jobTemplate/spec/template/spec/ephemeralContainers/0/image".into(),
                "debug".into()
            )
        );
        assert!(images("ConfigMap", &pod).is_empty());
    }
}
