//! The workload inventory: which workloads (namespace, owner, object, container) run which
//! image reference and digest, as the validating admission webhook sees them whatever the policy
//! decides; and which of them are out of date: their reference is a tag that now points, in
//! Lighter, to another digest than the one recorded (a local repository's tag, or the
//! pull-through cache's copy of an upstream tag, refreshed as the mirror refreshes tags).
//!
//! Recording is in memory under one lock; the only I/O on the admission path is reading the tag
//! files the images name (as `require_present` does). [`run`], in the background, publishes
//! `inventory.json` at most once every [`FLUSH_INTERVAL_MS`] when something changed, reads the
//! tags every [`TAG_CHECK_INTERVAL_MS`] (noting when each moved), and expires entries not seen
//! for `inventory_retention_ms`; at most `inventory_entries_max` entries are kept (the least
//! recently seen go first).
//!
//! When a tag moved: the modification time of its tag file when the inventory first sees the
//! new digest there. Every write of a tag sets that time, and the mirror rewrites its tags at
//! each refresh (same digest or not), so the time is taken once, at the first sight of a new
//! value, and kept (persisted); a tag is looked at when a review names it, every
//! [`TAG_CHECK_INTERVAL_MS`] and on every query, so the time is that of the write that moved it
//! unless the tag was written again (same digest) before the inventory looked.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube_core::admission::{AdmissionRequest, Operation};
use kube_core::DynamicObject;
use lighter_layout::{ImageRef, Layout, RepoName, Tag};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::{ms_of, now_ms};
use crate::config::Config;

/// Most time between a change and its publication in `inventory.json`.
pub const FLUSH_INTERVAL_MS: u64 = 1_000;
/// How often the tags the inventory refers to are read again, noting which moved.
pub const TAG_CHECK_INTERVAL_MS: u64 = 5_000;
/// `inventory.json` may hold this many bytes per entry allowed (with its tags) when read back.
const FILE_BYTES_PER_ENTRY_MAX: u64 = 8 << 10;
/// The version of `inventory.json`'s format.
const FORMAT_VERSION: u32 = 1;

/// Which list of the pod spec a container is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerType {
    /// `containers`
    Container,
    /// `initContainers`
    Init,
    /// `ephemeralContainers`
    Ephemeral,
}

impl ContainerType {
    const LISTS: [(&'static str, ContainerType); 3] = [
        ("containers", ContainerType::Container),
        ("initContainers", ContainerType::Init),
        ("ephemeralContainers", ContainerType::Ephemeral),
    ];
}

/// One container of one object (a Pod, or a workload's pod template), as last seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub namespace: String,
    /// The workload: the object's controller (`ownerReferences`; a ReplicaSet of a Deployment
    /// is named as that Deployment), else the object itself.
    pub owner_kind: String,
    pub owner_name: String,
    /// The object reviewed: `Pod`, or a workload kind for its pod template.
    pub kind: String,
    /// Its name (empty if the review had none).
    pub name: String,
    pub container: String,
    pub container_type: ContainerType,
    /// The image reference as written in the object.
    pub image: String,
    /// The repository in Lighter the reference stands for (a mirrored one for an upstream's
    /// image, through the mutating webhook's rewrite too); None: not an image Lighter serves.
    pub repository: Option<String>,
    /// The reference's tag (also kept when it has a digest).
    pub tag: Option<String>,
    /// The digest it runs: the reference's own, else what the tag pointed to in Lighter when
    /// the object was reviewed (or, if Lighter did not have it yet, the first digest the tag
    /// had there afterwards). None: unknown.
    pub digest: Option<String>,
    /// The reference names a digest: never out of date.
    pub pinned: bool,
    /// Unix milliseconds.
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// The tag of an entry now points to another digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outdated {
    /// What the tag points to now (the entry's `digest` is what it pointed to).
    pub current_digest: String,
    /// When the tag got that value (unix milliseconds; see the module's documentation).
    pub moved_at_ms: u64,
    /// How long ago that was, by the server's clock.
    pub moved_ago_ms: u64,
}

/// An entry as reported: out of date or not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub entry: Entry,
    /// Some: out of date.
    pub outdated: Option<Outdated>,
}

/// The order of rows: namespace, owner, object, container.
fn key_of(e: &Entry) -> [&str; 6] {
    [
        &e.namespace,
        &e.owner_kind,
        &e.owner_name,
        &e.kind,
        &e.name,
        &e.container,
    ]
}

impl Row {
    /// Where a page ending with this row stops (its key, tab-separated: a tab is in no
    /// Kubernetes name).
    pub fn cursor(&self) -> String {
        key_of(&self.entry).join("\t")
    }
}

/// Which rows [`Inventory::rows`] returns.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    /// Lighter's repository name (`team/app`, `docker.io/library/nginx` for a mirror's).
    pub repository: Option<String>,
    pub outdated_only: bool,
}

/// What a review says about the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The object's containers as they are now.
    Object {
        namespace: String,
        kind: String,
        name: String,
        owner_kind: String,
        owner_name: String,
        /// `(list, container name, image as written)`
        containers: Vec<(ContainerType, String, String)>,
    },
    /// The object is deleted.
    Deleted {
        namespace: String,
        kind: String,
        name: String,
    },
}

/// What a review tells the inventory (pure): None for dry runs, other kinds, CONNECT.
pub fn observe(req: &AdmissionRequest<DynamicObject>) -> Option<Observation> {
    let kind = req.kind.kind.clone();
    let spec_ptr = crate::admission::review::pod_spec_pointer(&kind)?;
    if req.dry_run {
        return None;
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let name = req.name.clone();
    match req.operation {
        Operation::Delete => Some(Observation::Deleted {
            namespace,
            kind,
            name,
        }),
        Operation::Create | Operation::Update => {
            let object = serde_json::to_value(req.object.as_ref()?).ok()?;
            let name = match object.pointer("/metadata/name").and_then(Value::as_str) {
                Some(n) if name.is_empty() => n.to_owned(),
                _ => name,
            };
            let (owner_kind, owner_name) = owner(&object).unwrap_or((kind.clone(), name.clone()));
            let mut containers = Vec::new();
            if let Some(spec) = object.pointer(spec_ptr) {
                for (list, ty) in ContainerType::LISTS {
                    for c in spec
                        .get(list)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let (Some(n), Some(image)) = (
                            c.get("name").and_then(Value::as_str),
                            c.get("image").and_then(Value::as_str),
                        ) else {
                            continue;
                        };
                        containers.push((ty, n.to_owned(), image.to_owned()));
                    }
                }
            }
            Some(Observation::Object {
                namespace,
                kind,
                name,
                owner_kind,
                owner_name,
                containers,
            })
        }
        Operation::Connect => None,
    }
}

/// The object's workload from its `ownerReferences`: the controller (else the first owner);
/// a ReplicaSet named `<deployment>-<pod-template-hash>` stands for its Deployment.
fn owner(object: &Value) -> Option<(String, String)> {
    let refs = object.pointer("/metadata/ownerReferences")?.as_array()?;
    let r = refs
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .or_else(|| refs.first())?;
    let kind = r.get("kind")?.as_str()?;
    let name = r.get("name")?.as_str()?;
    let hash = object
        .pointer("/metadata/labels/pod-template-hash")
        .and_then(Value::as_str);
    if kind == "ReplicaSet" {
        if let Some(deployment) = hash.and_then(|h| name.strip_suffix(h)?.strip_suffix('-')) {
            if !deployment.is_empty() {
                return Some(("Deployment".into(), deployment.into()));
            }
        }
    }
    Some((kind.into(), name.into()))
}

/// How an image reference maps to Lighter's repositories.
pub struct Hosts<'a> {
    /// `admission.registry_hosts`: names of this registry.
    pub registry_hosts: &'a [String],
    /// `admission.mutate.rewrite_to` when rewriting is on.
    pub rewrite_to: Option<&'a str>,
    /// The mirrored upstreams' names.
    pub upstreams: &'a [String],
}

/// An image reference resolved in Lighter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub repository: Option<RepoName>,
    pub tag: Option<Tag>,
    pub digest: Option<String>,
    pub pinned: bool,
    /// The tag's value in Lighter now, and its file's modification time.
    tag_now: Option<(String, u64)>,
}

impl Hosts<'_> {
    /// Resolves `image` (as written in a pod spec) in `layout`: one tag read at most.
    pub fn resolve(&self, layout: &Layout, image: &str) -> Resolved {
        let original =
            crate::admission::review::unrewritten(image, self.rewrite_to, self.upstreams);
        let Ok(r) = ImageRef::parse(&original) else {
            return Resolved::default();
        };
        let repository = if self.upstreams.contains(&r.registry) {
            RepoName::mirrored(&r.registry, &r.repository)
        } else if self.registry_hosts.contains(&r.registry)
            || self.rewrite_to.is_some_and(|h| h == r.registry)
        {
            Some(r.repository.clone())
        } else {
            None
        };
        let mut out = Resolved {
            pinned: r.digest.is_some(),
            digest: r.digest.as_ref().map(|d| d.to_string()),
            tag: r.tag.clone(),
            repository,
            tag_now: None,
        };
        if let (Some(repo), Some(tag)) = (&out.repository, &out.tag) {
            out.tag_now = read_tag(layout, repo, tag);
            if !out.pinned {
                out.digest = out.tag_now.as_ref().map(|(d, _)| d.clone());
            }
        }
        out
    }
}

/// A tag's digest and its file's modification time (unix ms); None if absent or unreadable.
fn read_tag(layout: &Layout, repo: &RepoName, tag: &Tag) -> Option<(String, u64)> {
    match layout.tag_with_time(repo, tag) {
        Ok(Some((entry, modified))) => Some((entry.digest.to_string(), ms_of(modified))),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!("inventory: reading tag {repo}:{tag}: {e}");
            None
        }
    }
}

/// An entry's identity: container names are unique within a pod spec, across its lists.
type Key = (String, String, String, String);

fn key(e: &Entry) -> Key {
    (
        e.namespace.clone(),
        e.kind.clone(),
        e.name.clone(),
        e.container.clone(),
    )
}

/// What a tag pointed to when last read, and since when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TagState {
    repository: String,
    tag: String,
    digest: String,
    /// When it got that digest (unix ms): see the module's documentation.
    since_ms: u64,
}

/// `inventory.json`.
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    entries: Vec<Entry>,
    tags: Vec<TagState>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// By `(repository, tag)`: the tags entries refer to.
    tags: HashMap<(String, String), TagState>,
    /// Changed since the last publication.
    dirty: bool,
    /// Entries dropped for `inventory_entries_max` since the last check (logged there).
    evicted: u64,
}

impl State {
    /// Notes a tag's current value, read with its file's modification time.
    fn saw_tag(&mut self, repository: &str, tag: &str, digest: &str, modified_ms: u64) {
        let k = (repository.to_owned(), tag.to_owned());
        if self.tags.get(&k).is_some_and(|s| s.digest == digest) {
            return;
        }
        self.tags.insert(
            k,
            TagState {
                repository: repository.to_owned(),
                tag: tag.to_owned(),
                digest: digest.to_owned(),
                since_ms: modified_ms,
            },
        );
        self.dirty = true;
    }

    /// Drops the least recently seen entries past `max`.
    fn bound(&mut self, max: usize) {
        while self.entries.len() > max {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_seen_ms)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
            self.evicted += 1;
            self.dirty = true;
        }
    }

    fn outdated(&self, e: &Entry, now: u64) -> Option<Outdated> {
        if e.pinned {
            return None;
        }
        let (repo, tag, digest) = (e.repository.as_ref()?, e.tag.as_ref()?, e.digest.as_ref()?);
        let s = self.tags.get(&(repo.clone(), tag.clone()))?;
        (&s.digest != digest).then(|| Outdated {
            current_digest: s.digest.clone(),
            moved_at_ms: s.since_ms,
            moved_ago_ms: now.saturating_sub(s.since_ms),
        })
    }
}

/// The inventory, shared by the webhook, the API and the background task.
pub struct Inventory {
    layout: Layout,
    retention_ms: u64,
    entries_max: usize,
    state: Mutex<State>,
    /// Held from snapshot to rename, so publications land in the order they were taken.
    publishing: Mutex<()>,
}

impl Inventory {
    /// The inventory as last published in the data directory (empty if there is none, or if it
    /// cannot be read: logged, and replaced at the next publication).
    pub fn open(layout: &Layout, config: &Config) -> Inventory {
        let inv = Inventory {
            layout: layout.clone(),
            retention_ms: config.inventory_retention_ms,
            entries_max: config.inventory_entries_max,
            state: Mutex::new(State::default()),
            publishing: Mutex::new(()),
        };
        let size_max =
            (config.inventory_entries_max as u64).saturating_mul(FILE_BYTES_PER_ENTRY_MAX);
        let saved = match layout.read_inventory(size_max) {
            Ok(None) => return inv,
            Ok(Some(bytes)) => serde_json::from_slice::<Saved>(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match saved {
            Ok(s) if s.version == FORMAT_VERSION => {
                let mut st = inv.lock();
                for e in s.entries {
                    st.entries.insert(key(&e), e);
                }
                for t in s.tags {
                    st.tags.insert((t.repository.clone(), t.tag.clone()), t);
                }
                st.bound(inv.entries_max);
                st.evicted = 0;
                tracing::info!(entries = st.entries.len(), "inventory loaded");
            }
            Ok(s) => tracing::warn!(
                "inventory.json has format version {}, this is {FORMAT_VERSION}: starting empty",
                s.version
            ),
            Err(e) => tracing::warn!("inventory.json cannot be read ({e}): starting empty"),
        }
        inv
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a review says: reads the tags the object's images name (in `hosts`), then
    /// updates memory only.
    pub fn record(&self, observation: Observation, hosts: &Hosts) {
        let now = now_ms();
        match observation {
            Observation::Deleted {
                namespace,
                kind,
                name,
            } => {
                let mut st = self.lock();
                let before = st.entries.len();
                st.entries
                    .retain(|(ns, k, n, _), _| !(*ns == namespace && *k == kind && *n == name));
                st.dirty |= st.entries.len() != before;
            }
            Observation::Object {
                namespace,
                kind,
                name,
                owner_kind,
                owner_name,
                containers,
            } => {
                let resolved: Vec<Resolved> = containers
                    .iter()
                    .map(|(_, _, image)| hosts.resolve(&self.layout, image))
                    .collect();
                let mut st = self.lock();
                // What the object no longer has goes.
                let names: HashSet<&str> = containers.iter().map(|(_, c, _)| c.as_str()).collect();
                st.entries.retain(|(ns, k, n, c), _| {
                    !(*ns == namespace && *k == kind && *n == name && !names.contains(c.as_str()))
                });
                for ((ty, container, image), r) in containers.iter().zip(resolved) {
                    let (repository, tag) = (
                        r.repository.as_ref().map(|n| n.as_str().to_owned()),
                        r.tag.as_ref().map(|t| t.as_str().to_owned()),
                    );
                    if let (false, Some(repo), Some(tag), Some((digest, modified))) =
                        (r.pinned, &repository, &tag, &r.tag_now)
                    {
                        st.saw_tag(repo, tag, digest, *modified);
                    }
                    let k = (
                        namespace.clone(),
                        kind.clone(),
                        name.clone(),
                        container.clone(),
                    );
                    let first_seen_ms = st.entries.get(&k).map_or(now, |e| e.first_seen_ms);
                    st.entries.insert(
                        k,
                        Entry {
                            namespace: namespace.clone(),
                            owner_kind: owner_kind.clone(),
                            owner_name: owner_name.clone(),
                            kind: kind.clone(),
                            name: name.clone(),
                            container: container.clone(),
                            container_type: *ty,
                            image: image.clone(),
                            repository,
                            tag,
                            digest: r.digest,
                            pinned: r.pinned,
                            first_seen_ms,
                            last_seen_ms: now,
                        },
                    );
                }
                st.dirty = true;
                st.bound(self.entries_max);
            }
        }
    }

    /// Reads every tag entries refer to, noting moves and filling in digests unknown at review
    /// time, forgets tags no entry refers to, and expires entries past the retention.
    pub fn check(&self) {
        let now = now_ms();
        let wanted: HashSet<(String, String)> = {
            let mut st = self.lock();
            let before = st.entries.len();
            let retention = self.retention_ms;
            st.entries
                .retain(|_, e| now.saturating_sub(e.last_seen_ms) < retention);
            st.dirty |= st.entries.len() != before;
            if st.evicted > 0 {
                tracing::warn!(
                    evicted = st.evicted,
                    "inventory over inventory_entries_max ({}): the least recently seen entries went",
                    self.entries_max
                );
                st.evicted = 0;
            }
            st.entries
                .values()
                .filter(|e| !e.pinned)
                .filter_map(|e| Some((e.repository.clone()?, e.tag.clone()?)))
                .collect()
        };
        let current: HashMap<(String, String), (String, u64)> = wanted
            .into_iter()
            .filter_map(|(repo, tag)| {
                let now = match (RepoName::parse(&repo), Tag::parse(&tag)) {
                    (Ok(r), Ok(t)) => read_tag(&self.layout, &r, &t)?,
                    _ => return None,
                };
                Some(((repo, tag), now))
            })
            .collect();
        let mut st = self.lock();
        for ((repo, tag), (digest, modified)) in &current {
            st.saw_tag(repo, tag, digest, *modified);
        }
        let mut filled = false;
        for e in st.entries.values_mut() {
            if e.digest.is_some() {
                continue;
            }
            let (Some(repo), Some(tag)) = (&e.repository, &e.tag) else {
                continue;
            };
            if let Some((digest, _)) = current.get(&(repo.clone(), tag.clone())) {
                e.digest = Some(digest.clone());
                filled = true;
            }
        }
        let before = st.tags.len();
        st.tags.retain(|k, _| current.contains_key(k));
        st.dirty |= filled || st.tags.len() != before;
    }

    /// The entries `filter` selects, out of date or not, after reading the tags again
    /// ([`Inventory::check`]); by namespace, owner, object and container. Blocking (file reads).
    pub fn rows(&self, filter: &Filter) -> Vec<Row> {
        self.select(filter, None, usize::MAX)
    }

    /// One page of [`Inventory::rows`]: at most `limit` rows after the row whose
    /// [`Row::cursor`] is `after`, and the cursor of the last one if more follow.
    pub fn page(
        &self,
        filter: &Filter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Row>, Option<String>) {
        let limit = limit.max(1);
        let mut page = self.select(filter, after, limit + 1);
        let next = (page.len() > limit).then(|| page[limit - 1].cursor());
        page.truncate(limit);
        (page, next)
    }

    /// The first `count` rows `filter` selects after the key `after` (tab-separated), in
    /// order. Only those are sorted in full and copied out: a page of a large inventory costs
    /// a pass over its entries, not a sort and a copy of all of them.
    fn select(&self, filter: &Filter, after: Option<&str>, count: usize) -> Vec<Row> {
        self.check();
        let now = now_ms();
        let after: Option<Vec<&str>> = after.map(|a| a.split('\t').collect());
        let st = self.lock();
        let mut chosen: Vec<(&Entry, Option<Outdated>)> = st
            .entries
            .values()
            .filter(|e| {
                filter
                    .namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == e.namespace)
            })
            .filter(|e| {
                filter
                    .repository
                    .as_ref()
                    .is_none_or(|r| e.repository.as_ref() == Some(r))
            })
            .filter(|e| {
                after
                    .as_ref()
                    .is_none_or(|a| key_of(e).as_slice() > a.as_slice())
            })
            .map(|e| (e, st.outdated(e, now)))
            .filter(|(_, o)| !filter.outdated_only || o.is_some())
            .collect();
        let order = |a: &(&Entry, Option<Outdated>), b: &(&Entry, Option<Outdated>)| {
            key_of(a.0).cmp(&key_of(b.0))
        };
        if chosen.len() > count {
            chosen.select_nth_unstable_by(count, order);
            chosen.truncate(count);
        }
        chosen.sort_by(order);
        chosen
            .into_iter()
            .map(|(e, outdated)| Row {
                entry: e.clone(),
                outdated,
            })
            .collect()
    }

    /// Publishes `inventory.json` if anything changed since the last time. Blocking.
    pub fn flush(&self) -> std::io::Result<()> {
        let _publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let saved = {
            let mut st = self.lock();
            if !st.dirty {
                return Ok(());
            }
            st.dirty = false;
            Saved {
                version: FORMAT_VERSION,
                entries: st.entries.values().cloned().collect(),
                tags: st.tags.values().cloned().collect(),
            }
        };
        let bytes = serde_json::to_vec(&saved).expect("JSON of the inventory");
        let result = self.layout.put_inventory(&bytes);
        if result.is_err() {
            self.lock().dirty = true;
        }
        result
    }
}

/// The background task: publishes changes, checks tags and expires entries, until aborted.
pub async fn run(inventory: Arc<Inventory>) {
    let checks_every = (TAG_CHECK_INTERVAL_MS / FLUSH_INTERVAL_MS).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(FLUSH_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        let inv = inventory.clone();
        let done = tokio::task::spawn_blocking(move || {
            if n % checks_every == 0 {
                inv.check();
            }
            inv.flush()
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!("inventory: cannot publish inventory.json: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lighter_layout::{Digest, ManifestEntry};
    use serde_json::json;

    fn request(operation: &str, object: Value, dry_run: bool) -> AdmissionRequest<DynamicObject> {
        let kind = object["kind"].as_str().unwrap().to_owned();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u", "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "x"},
                "name": name, "namespace": "shop", "operation": operation,
                "userInfo": {}, "dryRun": dry_run,
                "object": if operation == "DELETE" { Value::Null } else { object.clone() },
                "oldObject": if operation == "DELETE" { object } else { Value::Null },
            }
        });
        crate::admission::review::parse(&serde_json::to_vec(&review).unwrap()).unwrap()
    }

    fn pod(
        name: &str,
        owner: Option<(&str, &str)>,
        hash: Option<&str>,
        images: &[(&str, &str)],
    ) -> Value {
        let mut meta = json!({"name": name, "namespace": "shop", "labels": {}});
        if let Some((k, n)) = owner {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": k, "name": n, "uid": "x", "controller": true}]);
        }
        if let Some(h) = hash {
            meta["labels"]["pod-template-hash"] = json!(h);
        }
        let containers: Vec<Value> = images
            .iter()
            .map(|(n, i)| json!({"name": n, "image": i}))
            .collect();
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
               "spec": {"initContainers": [{"name": "init", "image": "busybox:1.36"}], "containers": containers}})
    }

    #[test]
    fn a_replicaset_owned_pod_is_named_by_its_deployment() {
        let obs = observe(&request(
            "CREATE",
            pod(
                "web-7d4b9c8f5-x2x9q",
                Some(("ReplicaSet", "web-7d4b9c8f5")),
                Some("7d4b9c8f5"),
                &[("web", "nginx:1.27")],
            ),
            false,
        ));
        let Some(Observation::Object {
            owner_kind,
            owner_name,
            containers,
            name,
            ..
        }) = obs
        else {
            panic!("{obs:?}")
        };
        assert_eq!(
            (owner_kind.as_str(), owner_name.as_str()),
            ("Deployment", "web")
        );
        assert_eq!(name, "web-7d4b9c8f5-x2x9q");
        assert_eq!(
            containers,
            vec![
                (ContainerType::Container, "web".into(), "nginx:1.27".into()),
                (ContainerType::Init, "init".into(), "busybox:1.36".into()),
            ]
        );
        // A ReplicaSet whose name does not end in the hash stays a ReplicaSet.
        let obs = observe(&request(
            "CREATE",
            pod("p", Some(("ReplicaSet", "other")), Some("abc"), &[]),
            false,
        ));
        assert!(
            matches!(obs, Some(Observation::Object { owner_kind, .. }) if owner_kind == "ReplicaSet")
        );
        // No owner: the pod itself.
        let obs = observe(&request("CREATE", pod("solo", None, None, &[]), false));
        assert!(
            matches!(obs, Some(Observation::Object { owner_kind, owner_name, .. }) if owner_kind == "Pod" && owner_name == "solo")
        );
    }

    #[test]
    fn dry_runs_and_other_kinds_are_not_observed_and_deletes_are() {
        assert_eq!(
            observe(&request("CREATE", pod("p", None, None, &[]), true)),
            None
        );
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert_eq!(observe(&request("CREATE", cm, false)), None);
        assert_eq!(
            observe(&request("DELETE", pod("p", None, None, &[]), false)),
            Some(Observation::Deleted {
                namespace: "shop".into(),
                kind: "Pod".into(),
                name: "p".into()
            })
        );
    }

    /// A pod of `containers` (name, image) created in `inv`, seen by a webhook with no
    /// registry hosts of its own.
    fn create(inv: &Inventory, name: &str, containers: &[(&str, &str)]) {
        let hosts = Hosts {
            registry_hosts: &[],
            rewrite_to: None,
            upstreams: &[],
        };
        let review = request("CREATE", pod(name, None, None, containers), false);
        inv.record(observe(&review).unwrap(), &hosts);
    }

    fn config(entries_max: usize) -> Config {
        Config {
            inventory_entries_max: entries_max,
            ..Config::default()
        }
    }

    fn put_tag(layout: &Layout, repo: &str, tag: &str, seed: &[u8]) -> String {
        let d = Digest::of(lighter_layout::Algorithm::Sha256, seed);
        let entry = ManifestEntry {
            digest: d.clone(),
            media_type: lighter_layout::inline::InlineStr::new(
                "application/vnd.oci.image.manifest.v1+json",
            )
            .unwrap(),
        };
        layout
            .put_tag(
                &RepoName::parse(repo).unwrap(),
                &Tag::parse(tag).unwrap(),
                &entry,
            )
            .unwrap();
        d.to_string()
    }

    #[test]
    fn a_moved_tag_makes_its_entries_out_of_date_and_a_pinned_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let inv = Inventory::open(&layout, &config(100));
        let hosts = Hosts {
            registry_hosts: &["reg.test:5000".into()],
            rewrite_to: None,
            upstreams: &[],
        };
        let old = put_tag(&layout, "team/app", "v1", b"one");
        let pinned = format!("reg.test:5000/team/app@{old}");
        let p = pod(
            "p",
            None,
            None,
            &[
                ("app", "reg.test:5000/team/app:v1"),
                ("pinned", &pinned),
                ("other", "quay.io/x/y:1"),
            ],
        );
        inv.record(observe(&request("CREATE", p, false)).unwrap(), &hosts);
        let rows = inv.rows(&Filter::default());
        assert_eq!(rows.len(), 4, "{rows:?}");
        assert!(rows.iter().all(|r| r.outdated.is_none()), "{rows:?}");
        let app = rows.iter().find(|r| r.entry.container == "app").unwrap();
        assert_eq!(app.entry.digest.as_deref(), Some(old.as_str()));
        assert_eq!(app.entry.repository.as_deref(), Some("team/app"));
        let other = rows.iter().find(|r| r.entry.container == "other").unwrap();
        assert_eq!(
            (
                other.entry.repository.as_deref(),
                other.entry.digest.as_deref()
            ),
            (None, None)
        );

        let new = put_tag(&layout, "team/app", "v1", b"two");
        let rows = inv.rows(&Filter {
            outdated_only: true,
            ..Default::default()
        });
        assert_eq!(rows.len(), 1, "{rows:?}");
        let o = rows[0].outdated.as_ref().unwrap();
        assert_eq!(
            (rows[0].entry.digest.as_deref(), o.current_digest.as_str()),
            (Some(old.as_str()), new.as_str())
        );
        assert!(o.moved_ago_ms < 60_000, "{o:?}");

        // Published and read back: the same rows.
        inv.flush().unwrap();
        let again = Inventory::open(&layout, &config(100));
        assert_eq!(again.rows(&Filter::default()).len(), 4);
        assert_eq!(
            again.rows(&Filter {
                outdated_only: true,
                ..Default::default()
            })[0]
                .outdated
                .as_ref()
                .unwrap()
                .current_digest,
            new
        );

        // Deleting the pod removes its entries.
        inv.record(
            observe(&request("DELETE", pod("p", None, None, &[]), false)).unwrap(),
            &hosts,
        );
        assert!(inv.rows(&Filter::default()).is_empty());
    }

    #[test]
    fn the_least_recently_seen_entries_go_past_the_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let inv = Inventory::open(&layout, &config(2));
        for name in ["a", "b"] {
            create(&inv, name, &[("c", "nginx")]);
            std::thread::sleep(Duration::from_millis(5));
        }
        let names: Vec<String> = inv
            .rows(&Filter::default())
            .iter()
            .map(|r| format!("{}/{}", r.entry.name, r.entry.container))
            .collect();
        assert_eq!(names, ["b/c", "b/init"], "a's two went for b's");
    }

    /// Pages of every size, followed by their cursors, are the rows in order, each once.
    #[test]
    fn pages_of_any_size_make_up_the_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_writer(dir.path()).unwrap();
        let inv = Inventory::open(&layout, &config(1000));
        // Names out of order, so the entries' map order is not the rows' order.
        for i in [7, 3, 11, 0, 5, 9, 1, 12, 4, 8, 2, 10, 6] {
            let name = format!("p{}", (i * 7919) % 97);
            create(&inv, &name, &[("c", "nginx"), ("d", "redis")]);
        }
        let all = inv.rows(&Filter::default());
        assert!(all.len() >= 26);
        let cursors: Vec<String> = all.iter().map(Row::cursor).collect();
        let mut sorted = cursors.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(cursors, sorted, "in key order, each once");
        for limit in [1, 2, 5, all.len() - 1, all.len(), all.len() + 3] {
            let (mut after, mut paged) = (None::<String>, Vec::new());
            for _ in 0..=all.len() {
                let (rows, next) = inv.page(&Filter::default(), after.as_deref(), limit);
                assert!(rows.len() <= limit);
                paged.extend(rows.iter().map(Row::cursor));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            assert_eq!(paged, cursors, "limit {limit}");
        }
    }
}
