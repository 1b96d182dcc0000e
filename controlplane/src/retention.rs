//! Retention (`[[retention]]`): per repository prefix (the longest matching rule), which tags
//! stay and which go. A tag stays when `keep` names it, when an immutable rule covers it, when
//! a workload in the inventory (what the admission webhook saw) names it, when it is among the
//! `keep_newest` most recently written of the others, or when it was pulled within
//! `keep_pulled_within_ms` (the last pull per tag from the usage summary, which the event log
//! feeds: such rules need it). The rest are removed, and with them what only they kept in the
//! repository: manifests no remaining tag reaches (through an index, or as a referrer of a
//! manifest that stays) and no workload of the inventory runs, and the blob links only those
//! manifests used. The bytes are left to garbage collection, which removes content no
//! repository links.
//!
//! Runs on a timer (`retention_interval_ms`), on demand (`POST /v2/_lighter/retention
//! [?dry_run=true]`, `lighter retention [--dry-run]`), one run at a time. Each repository is
//! decided and changed under `App::tag_writes`, so a push meanwhile either lands before (and is
//! seen) or after (and is kept); a dry run reports exactly what a run would remove. Mirrored
//! repositories are left to the cache's eviction.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use lighter_layout::{manifest, Digest, Layout, RepoName, Tag};
use serde::{Deserialize, Serialize};

use crate::api::{json, Response, Result as ApiResult};
use crate::app::App;
use crate::clock::now_us;
use crate::config::Config;
use crate::error::{ApiError, Code};
use crate::immutable::{check_pattern, check_prefix, glob, prefix_matches};

/// One `[[retention]]` rule.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Repository prefix at a component boundary; `""`: every repository. The longest
    /// matching rule applies to a repository.
    pub prefix: String,
    /// Keep this many of the most recently written tags (among those `keep` and the
    /// immutable rules do not already keep).
    #[serde(default)]
    pub keep_newest: Option<u64>,
    /// Keep the tags pulled within this long (needs the event log).
    #[serde(default)]
    pub keep_pulled_within_ms: Option<u64>,
    /// Tag patterns always kept (`*` any run, `?` one character), e.g. `["latest", "stable"]`.
    #[serde(default)]
    pub keep: Vec<String>,
}

/// Rejects rules that cannot work, naming the rule.
pub fn validate(c: &Config) -> Result<(), String> {
    if !c.retention.is_empty() && c.storage.s3.is_some() {
        // It would remove tags from this replica's cache only: they come back from the bucket.
        return Err("[[retention]] does not work with [storage.s3] yet: a replica's retention would remove tags from its own cache only, and they would come back from the bucket; remove the [[retention]] rules (or [storage.s3])".into());
    }
    for (i, r) in c.retention.iter().enumerate() {
        check_prefix(&r.prefix).map_err(|e| format!("retention[{i}].prefix: {e}"))?;
        for p in &r.keep {
            check_pattern(p).map_err(|e| format!("retention[{i}].keep: {e}"))?;
        }
        match (r.keep_newest, r.keep_pulled_within_ms) {
            (None, None) => {
                return Err(format!(
                    "retention[{i}] has neither keep_newest nor keep_pulled_within_ms: it would remove every tag `keep` does not name; set one (keep_newest = 0 to mean it)"
                ))
            }
            (_, Some(0)) => {
                return Err(format!(
                    "retention[{i}].keep_pulled_within_ms must be greater than 0"
                ))
            }
            (_, Some(_)) if c.events_ring_records == 0 => {
                return Err(format!(
                    "retention[{i}].keep_pulled_within_ms needs the event log's pull times, and the event log is off (events_ring_records = 0)"
                ))
            }
            _ => {}
        }
        let norm = |p: &str| p.trim_end_matches('/').to_owned();
        if c.retention[..i]
            .iter()
            .any(|o| norm(&o.prefix) == norm(&r.prefix))
        {
            return Err(format!(
                "retention[{i}].prefix {:?} has a rule already",
                r.prefix
            ));
        }
    }
    Ok(())
}

/// The rule for `repo`: the longest matching prefix.
pub fn rule_for<'a>(rules: &'a [RetentionRule], repo: &str) -> Option<(usize, &'a RetentionRule)> {
    rules
        .iter()
        .enumerate()
        .filter(|(_, r)| prefix_matches(repo, &r.prefix))
        .max_by_key(|(i, r)| (r.prefix.trim_end_matches('/').len(), usize::MAX - i))
}

/// A tag as retention sees it.
#[derive(Clone, Debug)]
pub struct TagInfo {
    pub tag: String,
    pub digest: Digest,
    /// When the tag was last written (unix ms).
    pub written_ms: u64,
    /// Its last pull (unix µs), if the usage summary knows one.
    pub last_pull_us: Option<u64>,
}

/// The indexes of the tags `rule` removes (pure). `held` says whether a tag must stay
/// whatever the rule says (immutable, or named by a running workload).
pub fn decide(
    rule: &RetentionRule,
    tags: &[TagInfo],
    held: impl Fn(&str) -> bool,
    now_us: u64,
) -> Vec<usize> {
    let mut others: Vec<usize> = (0..tags.len())
        .filter(|&i| {
            let t = tags[i].tag.as_str();
            !rule.keep.iter().any(|p| glob(p, t)) && !held(t)
        })
        .collect();
    // Newest first; the name breaks a tie of times.
    others.sort_by(|&a, &b| {
        (tags[b].written_ms, &tags[b].tag).cmp(&(tags[a].written_ms, &tags[a].tag))
    });
    let newest = rule.keep_newest.unwrap_or(0) as usize;
    let pulled_since = rule
        .keep_pulled_within_ms
        .map(|ms| now_us.saturating_sub(ms.saturating_mul(1000)));
    let mut remove: Vec<usize> = others
        .into_iter()
        .skip(newest)
        .filter(|&i| match (pulled_since, tags[i].last_pull_us) {
            (Some(since), Some(last)) => last < since,
            _ => true,
        })
        .collect();
    remove.sort_by(|&a, &b| tags[a].tag.cmp(&tags[b].tag));
    remove
}

/// What a run found and did (or, dry, would do).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dry_run: bool,
    /// Repositories a rule covers, and their tags.
    pub repositories: u64,
    pub tags: u64,
    /// Tags removed (or that a run would remove).
    pub removed_tags: u64,
    pub removed: Vec<Removed>,
    /// Manifests and blob links that only the removed tags kept in their repository.
    pub unlinked_manifests: u64,
    pub unlinked_blobs: u64,
    /// Repositories left alone this time, and why.
    pub skipped: Vec<String>,
}

/// One tag removed.
#[derive(Debug, Serialize)]
pub struct Removed {
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// `retention[<i>]`.
    pub rule: String,
    /// When the tag was last written.
    pub written: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_pull: Option<String>,
}

/// `POST /v2/_lighter/retention[?dry_run=true]`: one run; its report.
pub async fn handle(app: &Arc<App>, req: &Request<Incoming>) -> ApiResult<Response> {
    let dry_run = crate::api::dry_run(req)?;
    if app.config.retention.is_empty() {
        return Err(ApiError::not_found(
            Code::Unsupported,
            "no [[retention]] rules are configured",
        ));
    }
    let report = run(app, dry_run).await?;
    Ok(json(
        StatusCode::OK,
        serde_json::to_vec(&report).expect("JSON of a report"),
    ))
}

/// One run at a time.
static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One run for the API or the timer, off the async threads; logs what it removed.
pub async fn run(app: &Arc<App>, dry_run: bool) -> io::Result<Report> {
    let worker = app.clone();
    // Who asked (none for the timer), for the events of the blocking thread.
    let origin = crate::events::Event::new("retention");
    let report = tokio::task::spawn_blocking(move || {
        let _one = ONE_RUN.lock().unwrap_or_else(|p| p.into_inner());
        apply(&worker, dry_run, &origin)
    })
    .await
    .map_err(io::Error::other)??;
    tracing::info!(
        dry_run,
        repositories = report.repositories,
        tags = report.tags,
        removed_tags = report.removed_tags,
        unlinked_manifests = report.unlinked_manifests,
        unlinked_blobs = report.unlinked_blobs,
        "retention done"
    );
    Ok(report)
}

fn apply(app: &App, dry_run: bool, origin: &crate::events::Event) -> io::Result<Report> {
    let layout = &app.layout;
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    // What workloads run (the admission webhook's inventory): by repository, the tags they
    // name and the digests they run. Never removed.
    let mut in_use: HashMap<String, (HashSet<String>, HashSet<Digest>)> = HashMap::new();
    for row in app.inventory.rows(&crate::inventory::Filter::default()) {
        let e = row.entry;
        let Some(repository) = e.repository else {
            continue;
        };
        let (tags, digests) = in_use.entry(repository).or_default();
        tags.extend(e.tag);
        digests.extend(e.digest.and_then(|d| Digest::parse(&d).ok()));
    }
    let nothing = (HashSet::new(), HashSet::new());
    for repo in layout.repositories()? {
        let Ok(name) = RepoName::parse(&repo) else {
            continue;
        };
        if app.mirrors.target(&name, None).is_some() {
            continue;
        }
        let Some((index, rule)) = rule_for(&app.config.retention, &repo) else {
            continue;
        };
        report.repositories += 1;
        let pulls = match (rule.keep_pulled_within_ms, &app.usage) {
            (None, _) => HashMap::new(),
            (Some(_), Some(usage)) if usage.ready() => tag_pulls(usage, &repo)?,
            (Some(_), _) => {
                report.skipped.push(format!(
                    "{repo}: retention[{index}] keeps recently pulled tags, and the usage summary has not read the whole event log yet"
                ));
                continue;
            }
        };
        let rule_name = format!("retention[{index}]");
        // Decided and changed with tag writes held: what is read is what is removed.
        let _tags = app.tag_writes(&name);
        let mut tags = Vec::new();
        for t in layout.tags(&name)?.unwrap_or_default() {
            let Ok(tag) = Tag::parse(&t) else { continue };
            let Some((entry, written)) = layout.tag_with_time(&name, &tag)? else {
                continue;
            };
            let written_ms = crate::clock::ms_of(written);
            tags.push(TagInfo {
                last_pull_us: pulls.get(&t).copied(),
                tag: t,
                digest: entry.digest,
                written_ms,
            });
        }
        report.tags += tags.len() as u64;
        let (running_tags, running_digests) = in_use.get(&repo).unwrap_or(&nothing);
        let held = |t: &str| {
            running_tags.contains(t) || crate::immutable::is_immutable(app, &name, t).is_some()
        };
        let remove = decide(rule, &tags, held, now_us());
        if remove.is_empty() {
            continue;
        }
        let gone: HashSet<usize> = remove.iter().copied().collect();
        let kept_roots: Vec<Digest> = (0..tags.len())
            .filter(|i| !gone.contains(i))
            .map(|i| tags[i].digest.clone())
            .chain(running_digests.iter().cloned())
            .collect();
        let removed_roots: Vec<Digest> = remove.iter().map(|&i| tags[i].digest.clone()).collect();
        let plan = plan(layout, &name, &removed_roots, &kept_roots)?;
        report.unlinked_manifests += plan.manifests.len() as u64;
        report.unlinked_blobs += plan.blobs.len() as u64;
        for &i in &remove {
            let t = &tags[i];
            report.removed_tags += 1;
            report.removed.push(Removed {
                repository: repo.clone(),
                tag: t.tag.clone(),
                digest: t.digest.to_string(),
                rule: rule_name.clone(),
                written: crate::events::rfc3339(t.written_ms * 1000),
                last_pull: t.last_pull_us.map(crate::events::rfc3339),
            });
        }
        if dry_run {
            continue;
        }
        for &i in &remove {
            let t = &tags[i];
            let tag = Tag::parse(&t.tag).expect("listed tags are valid");
            if layout.delete_tag(&name, &tag)? {
                tracing::info!(repository = repo.as_str(), tag = t.tag.as_str(), digest = %t.digest, rule = rule_name.as_str(), "retention: tag removed");
                let e = crate::events::Event::new_like("retention_delete_tag", origin)
                    .with("repository", repo.as_str())
                    .with("reference", t.tag.as_str())
                    .with("digest", t.digest.to_string())
                    .with("rule", rule_name.as_str());
                crate::events::record(app, e);
            }
        }
        for (digest, subject) in &plan.manifests {
            if let Some(subject) = subject {
                layout.delete_referrer(&name, subject, digest)?;
            }
            if layout.delete_manifest(&name, digest)? {
                let e = crate::events::Event::new_like("retention_delete_manifest", origin)
                    .with("repository", repo.as_str())
                    .with("reference", digest.to_string())
                    .with("digest", digest.to_string())
                    .with("rule", rule_name.as_str());
                crate::events::record(app, e);
            }
        }
        for digest in &plan.blobs {
            layout.delete_blob(&name, digest)?;
        }
    }
    Ok(report)
}

/// The last pull of each tag of `repo` the usage summary knows (unix µs).
fn tag_pulls(usage: &crate::usage::Summary, repo: &str) -> io::Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    let mut after = None;
    loop {
        let page = usage.query(&crate::usage::UsageQuery {
            by: crate::usage::By::Tag,
            repository: Some(repo.to_owned()),
            since_us: None,
            until_us: None,
            after: after.take(),
            limit: 10_000,
        })?;
        for row in page.rows {
            if let (Some(tag), Some(last)) = (row.tag, row.last_pull_unix_us) {
                out.insert(tag, last);
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// What removing some tags leaves unreachable in a repository.
#[derive(Debug, Default)]
struct Plan {
    /// Manifests (with their subject, for the referrers record).
    manifests: Vec<(Digest, Option<Digest>)>,
    blobs: Vec<Digest>,
}

/// A manifest of the repository: its child manifests (an index), its blobs (an image), its
/// subject.
#[derive(Default)]
struct Node {
    children: Vec<Digest>,
    blobs: Vec<Digest>,
    subject: Option<Digest>,
}

/// The manifests reachable from `removed` (through indexes and referrers) that nothing else
/// keeps: not reachable from `kept` nor from the repository's other manifests (pushed by
/// digest, say); and the blobs only those manifests use.
fn plan(layout: &Layout, name: &RepoName, removed: &[Digest], kept: &[Digest]) -> io::Result<Plan> {
    let mut nodes: HashMap<Digest, Node> = HashMap::new();
    for d in layout.manifest_links(name)? {
        let node = match layout.read_content(&d)? {
            Some(bytes) => match manifest::inspect(&bytes, None) {
                Ok(m) => match m.kind {
                    lighter_layout::media::ManifestKind::Index => Node {
                        children: m.references,
                        blobs: Vec::new(),
                        subject: m.subject,
                    },
                    lighter_layout::media::ManifestKind::Image => Node {
                        children: Vec::new(),
                        blobs: m.references,
                        subject: m.subject,
                    },
                },
                Err(_) => Node::default(),
            },
            None => Node::default(),
        };
        nodes.insert(d, node);
    }
    let mut referrers: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
    for (d, n) in &nodes {
        if let Some(s) = &n.subject {
            referrers.entry(s).or_default().push(d);
        }
    }
    let from_removed = reach(&nodes, &referrers, removed.iter());
    let others: Vec<&Digest> = nodes.keys().filter(|d| !from_removed.contains(d)).collect();
    let kept = reach(&nodes, &referrers, kept.iter().chain(others));
    let mut doomed: Vec<&Digest> = from_removed
        .iter()
        .copied()
        .filter(|d| !kept.contains(d))
        .collect();
    doomed.sort();
    let doomed_set: HashSet<&Digest> = doomed.iter().copied().collect();
    let still_used: HashSet<&Digest> = nodes
        .iter()
        .filter(|(d, _)| !doomed_set.contains(d))
        .flat_map(|(_, n)| n.blobs.iter())
        .collect();
    let mut blobs: Vec<Digest> = doomed
        .iter()
        .flat_map(|d| nodes[*d].blobs.iter())
        .filter(|b| !still_used.contains(b))
        .cloned()
        .collect();
    blobs.sort();
    blobs.dedup();
    Ok(Plan {
        manifests: doomed
            .into_iter()
            .map(|d| (d.clone(), nodes[d].subject.clone()))
            .collect(),
        blobs,
    })
}

/// The manifests of the repository reachable from `roots`: index children and referrers,
/// transitively.
fn reach<'a>(
    nodes: &'a HashMap<Digest, Node>,
    referrers: &HashMap<&'a Digest, Vec<&'a Digest>>,
    roots: impl Iterator<Item = &'a Digest>,
) -> HashSet<&'a Digest> {
    let mut seen: HashSet<&'a Digest> = HashSet::new();
    let mut stack: Vec<&'a Digest> = roots
        .filter_map(|d| nodes.get_key_value(d).map(|(k, _)| k))
        .collect();
    while let Some(d) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        let node = &nodes[d];
        stack.extend(
            node.children
                .iter()
                .filter_map(|c| nodes.get_key_value(c).map(|(k, _)| k)),
        );
        stack.extend(referrers.get(d).into_iter().flatten().copied());
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;
    use lighter_layout::Algorithm;

    fn info(tag: &str, written_ms: u64, last_pull_us: Option<u64>) -> TagInfo {
        TagInfo {
            tag: tag.into(),
            digest: Digest::of(Algorithm::Sha256, tag.as_bytes()),
            written_ms,
            last_pull_us,
        }
    }

    fn rule(newest: Option<u64>, pulled_ms: Option<u64>, keep: &[&str]) -> RetentionRule {
        RetentionRule {
            prefix: "ci/".into(),
            keep_newest: newest,
            keep_pulled_within_ms: pulled_ms,
            keep: keep.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn removed(r: &RetentionRule, tags: &[TagInfo], now_us: u64) -> Vec<String> {
        decide(r, tags, |t| t.starts_with('v'), now_us)
            .into_iter()
            .map(|i| tags[i].tag.clone())
            .collect()
    }

    #[test]
    fn keeps_the_newest_the_pulled_the_named_and_the_immutable() {
        let tags = vec![
            info("a", 1, None),
            info("b", 2, Some(9_000_000)), // pulled at 9 s
            info("c", 3, Some(1_000_000)), // pulled at 1 s, long ago
            info("d", 4, None),
            info("latest", 0, None),
            info("v1", 0, None),
            info("e", 5, None),
        ];
        let now = 10_000_000;
        assert_eq!(
            removed(&rule(Some(2), None, &["latest"]), &tags, now),
            ["a", "b", "c"]
        );
        assert_eq!(
            removed(&rule(Some(2), Some(5_000), &["latest"]), &tags, now),
            ["a", "c"]
        );
        assert_eq!(
            removed(&rule(Some(0), Some(5_000), &["lat*"]), &tags, now),
            ["a", "c", "d", "e"]
        );
        assert_eq!(
            removed(&rule(Some(10), None, &[]), &tags, now),
            Vec::<String>::new()
        );
        // Equal times: the name decides, newest = greatest.
        let same = vec![
            info("x1", 7, None),
            info("x2", 7, None),
            info("x3", 7, None),
        ];
        assert_eq!(removed(&rule(Some(1), None, &[]), &same, now), ["x1", "x2"]);
    }

    #[test]
    fn the_longest_prefix_applies() {
        let rules = vec![rule(Some(1), None, &[]), {
            let mut r = rule(Some(5), None, &[]);
            r.prefix = "ci/special".into();
            r
        }];
        assert_eq!(rule_for(&rules, "ci/app").map(|r| r.0), Some(0));
        assert_eq!(rule_for(&rules, "ci/special/x").map(|r| r.0), Some(1));
        assert!(rule_for(&rules, "cid/app").is_none());
    }

    #[test]
    fn validation_names_the_rule() {
        let with = |rules: Vec<RetentionRule>, events: u64| Config {
            retention: rules,
            events_ring_records: events,
            ..Config::default()
        };
        assert!(validate(&with(vec![rule(Some(3), Some(1000), &["latest"])], 1024)).is_ok());
        let err = validate(&with(vec![rule(None, None, &[])], 1024)).unwrap_err();
        assert!(err.contains("retention[0] has neither"), "{err}");
        let err = validate(&with(vec![rule(None, Some(1000), &[])], 0)).unwrap_err();
        assert!(err.contains("events_ring_records = 0"), "{err}");
        let err = validate(&with(vec![rule(Some(1), None, &["a b"])], 1024)).unwrap_err();
        assert!(err.contains("retention[0].keep"), "{err}");
        let err = validate(&with(
            vec![rule(Some(1), None, &[]), rule(Some(2), None, &[])],
            1024,
        ))
        .unwrap_err();
        assert!(err.contains("retention[1].prefix"), "{err}");
    }

    #[test]
    fn a_plan_spares_what_kept_tags_and_other_manifests_still_use() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let repo = RepoName::parse("ci/app").unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::of(Algorithm::Sha256, bytes);
            layout.put_content(&d, bytes).unwrap();
            d
        };
        let blob = |b: &[u8]| {
            let d = put(b);
            layout.link_blob(&repo, &d).unwrap();
            d
        };
        let (base, only_old, only_new, config) = (
            blob(b"base"),
            blob(b"old"),
            blob(b"new"),
            blob(b"{\"c\":1}"),
        );
        let image = |layers: &[&Digest], extra: &str| {
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": 7},
                "layers": layers.iter().map(|d| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": 3})).collect::<Vec<_>>(),
                "annotations": {"x": extra},
            });
            let bytes = serde_json::to_vec(&m).unwrap();
            let d = put(&bytes);
            layout
                .link_manifest(&repo, &d, "application/vnd.oci.image.manifest.v1+json")
                .unwrap();
            d
        };
        let old = image(&[&base, &only_old], "old");
        let new = image(&[&base, &only_new], "new");
        // A signature of the old image: goes with it.
        let sig = {
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.to_string(), "size": 7},
                "layers": [],
                "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": old.to_string(), "size": 1},
            });
            let bytes = serde_json::to_vec(&m).unwrap();
            let d = put(&bytes);
            layout
                .link_manifest(&repo, &d, "application/vnd.oci.image.manifest.v1+json")
                .unwrap();
            d
        };
        let p = plan(
            &layout,
            &repo,
            std::slice::from_ref(&old),
            std::slice::from_ref(&new),
        )
        .unwrap();
        let mut want = vec![(old.clone(), None), (sig.clone(), Some(old.clone()))];
        want.sort();
        assert_eq!(p.manifests, want);
        assert_eq!(p.blobs, vec![only_old.clone()]);
        // Kept by another tag: nothing goes.
        let p = plan(
            &layout,
            &repo,
            std::slice::from_ref(&old),
            &[old.clone(), new.clone()],
        )
        .unwrap();
        assert!(p.manifests.is_empty() && p.blobs.is_empty());
    }
}
