//! `App`: the control plane's shared state, which every handler, background task and
//! connection served outside hyper reaches (the layout, the configuration, upload sessions, the
//! mirror, the node tier, access control, the counters, the event log, the inventory, the notification queue), and the
//! lock that orders publishing against deleting. Built once by `server::run`.

use std::io;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use lighter_layout::{ContainerdContent, Digest, Layout, RepoName};

use crate::auth::Auth;
use crate::config::Config;
use crate::metrics::Counters;
use crate::mirror::Mirrors;
use crate::peers::Peers;
use crate::uploads::Uploads;

/// Locks `App::tag_writes` is split into.
pub const TAG_WRITE_SHARDS: usize = 64;

/// What every handler can reach.
pub struct App {
    pub layout: Layout,
    pub config: Config,
    pub uploads: Uploads,
    pub mirrors: Mirrors,
    /// Held shared by every step that publishes content and links it, or links content it
    /// found published; held exclusively by the steps that delete content (garbage collection,
    /// eviction), which look again under it for links to what they delete. So nothing is
    /// ever linked to content that is being removed.
    pub publishing: RwLock<()>,
    /// Held by every tag write and removal of a local repository (pushes, deletes, retention)
    /// around the checks that decide it (`immutable`), so a check and its write are atomic with
    /// respect to each other. One lock per shard of repository names (see
    /// [`App::tag_writes`]), so pushes to different repositories seldom wait for each other.
    pub tag_writes: [std::sync::Mutex<()>; TAG_WRITE_SHARDS],
    /// One garbage collection at a time.
    pub gc: tokio::sync::Mutex<()>,
    /// What happened, for `GET /v2/_lighter/metrics`.
    pub counters: Counters,
    /// The bucket of `[storage.s3]`: the durable store of every repository outside the
    /// mirrors, the data directory its cache. None: the data directory alone.
    pub bucket: Option<crate::bucket::Bucket>,
    /// The node tier, when peers are configured.
    pub peers: Option<Arc<Peers>>,
    /// containerd's content store, when mounted (`containerd_content_dir`).
    pub containerd: Option<ContainerdContent>,
    /// Access control; None: anyone may do anything.
    pub auth: Option<Auth>,
    /// The data plane's rings: its counters, and its pulls when the event log is on.
    pub rings: Arc<crate::events::Rings>,
    /// The event log (None: `events_ring_records = 0`).
    pub events: Option<Arc<crate::events::EventLog>>,
    /// Which workloads run which images, as the admission webhook saw them.
    pub inventory: Arc<crate::inventory::Inventory>,
    /// The usage summary kept from the event log (with it).
    pub usage: Option<Arc<crate::usage::Summary>>,
    /// The notification queue, when `[[notifications]]` endpoints are configured.
    pub notify: Option<Arc<crate::notify::Notifier>>,
}

impl App {
    /// The shared side of [`App::publishing`].
    pub fn publishing(&self) -> RwLockReadGuard<'_, ()> {
        self.publishing.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The tag-write lock of repository `name`, held.
    pub fn tag_writes(&self, name: &RepoName) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.as_str().hash(&mut h);
        let shard = (h.finish() % TAG_WRITE_SHARDS as u64) as usize;
        self.tag_writes[shard]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Links published content into a repository; its size, or None if it is not published.
    pub fn link_if_present(&self, name: &RepoName, digest: &Digest) -> io::Result<Option<u64>> {
        let _publishing = self.publishing();
        let Some(size) = self.layout.content_size(digest)? else {
            return Ok(None);
        };
        self.layout.link_blob(name, digest)?;
        Ok(Some(size))
    }
}

/// Runs blocking file-system work from a handler without stalling the runtime's other tasks.
pub fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}
