//! Tag watches (`[[tag_watches]]`): a mirrored tag resolved upstream every `interval_ms`
//! (whatever its `tag_ttl_ms`), through the mirror's own resolution (`mirror::refresh_tag`,
//! which logs a `move_tag` when it moves). Each new digest is prefetched whole
//! (`mirror::prefetch`), and once it is here a `watch_tag` event (and its notification) says
//! the tag moved and the new content is warm, so the nodes' next rollout finds it local.

use std::sync::Arc;
use std::time::Duration;

use lighter_layout::{Digest, ImageRef, RepoName, Tag};
use serde::{Deserialize, Serialize};

use crate::app::{block, App};

/// One `[[tag_watches]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TagWatch {
    /// A tag of a configured upstream, as clients write it: `docker.io/library/nginx:1.27`.
    pub image: String,
    /// How often the tag is resolved upstream.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
}

fn default_interval_ms() -> u64 {
    60_000
}

/// Shortest `interval_ms`.
pub const INTERVAL_MIN_MS: u64 = 100;

/// What a watch resolves: the local repository and the tag.
fn parse(w: &TagWatch) -> Result<(ImageRef, RepoName, Tag), String> {
    let r = ImageRef::parse(&w.image)?;
    if r.digest.is_some() {
        return Err("a digest never moves: give a tag".into());
    }
    let tag = r.tag.clone().ok_or("no tag")?;
    let local = RepoName::parse(&format!(
        "{}/{}",
        lighter_layout::mirror_prefix(&r.registry),
        r.repository
    ))
    .map_err(|e| e.to_string())?;
    Ok((r, local, tag))
}

/// Rejects watches that cannot work, naming the field.
pub fn validate(watches: &[TagWatch], upstreams: &[crate::config::Upstream]) -> Result<(), String> {
    for (i, w) in watches.iter().enumerate() {
        let (r, _, _) =
            parse(w).map_err(|e| format!("tag_watches[{i}].image {:?}: {e}", w.image))?;
        if !upstreams.iter().any(|u| u.name == r.registry) {
            return Err(format!(
                "tag_watches[{i}].image {:?}: registry {} is not a configured upstream",
                w.image, r.registry
            ));
        }
        if w.interval_ms < INTERVAL_MIN_MS {
            return Err(format!(
                "tag_watches[{i}].interval_ms must be at least {INTERVAL_MIN_MS}"
            ));
        }
    }
    Ok(())
}

/// Starts one task per watch.
pub fn start(app: &Arc<App>) {
    for w in &app.config.tag_watches {
        let Ok((r, local, tag)) = parse(w) else {
            continue; // validated at start
        };
        tracing::info!(image = w.image, interval_ms = w.interval_ms, "watching tag");
        tokio::spawn(run(app.clone(), w.clone(), r, local, tag));
    }
}

async fn run(app: Arc<App>, w: TagWatch, r: ImageRef, local: RepoName, tag: Tag) {
    let mut tick = tokio::time::interval(Duration::from_millis(w.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The digest last prefetched (and announced).
    let mut warmed: Option<Digest> = None;
    loop {
        tick.tick().await;
        let Some(target) = app.mirrors.target(&local, None) else {
            return;
        };
        let before = block(|| app.layout.tag(&local, &tag))
            .ok()
            .flatten()
            .map(|e| e.digest);
        if let Err(e) = crate::mirror::refresh_tag(&app, &target, &tag, true).await {
            tracing::warn!(
                image = w.image,
                "tag watch: cannot resolve upstream: {}",
                e.message
            );
            continue;
        }
        let now = match block(|| app.layout.tag(&local, &tag)) {
            Ok(Some(e)) => e.digest,
            _ => continue,
        };
        if warmed.as_ref() == Some(&now) {
            continue;
        }
        let image = format!("{}/{}@{now}", r.registry, r.repository);
        match crate::mirror::prefetch::prefetch(&app, &image).await {
            Ok(report) => {
                let old = warmed.take().or(before).filter(|o| o != &now);
                tracing::info!(image = w.image, digest = %now, old_digest = ?old.as_ref().map(|d| d.to_string()), "tag watch: prefetched");
                if let Some(old) = old {
                    let e = crate::events::Event::new("watch_tag")
                        .with("repository", local.as_str())
                        .with("reference", tag.as_str())
                        .with("digest", now.to_string())
                        .with("old_digest", old.to_string())
                        .with("upstream", target.upstream.config.name.as_str())
                        .with("prefetched_bytes", report["bytes"].clone())
                        .with("image", w.image.as_str());
                    crate::events::record(&app, e);
                }
                warmed = Some(now);
            }
            Err(e) => {
                tracing::warn!(image = w.image, digest = %now, "tag watch: prefetch failed: {}", e.message)
            }
        }
    }
}
