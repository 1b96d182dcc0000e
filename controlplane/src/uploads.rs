//! The registry of open upload sessions: at most `upload_sessions_max`, each behind its own lock so
//! chunks of one session are applied in order, dropped after `upload_session_idle_timeout_ms`
//! without bytes. Sessions survive a restart: the ingest on disk is reopened on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::StatusCode;
use lighter_layout::{Algorithm, Ingest, Layout, RepoName, UploadId};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::error::{ApiError, Code};

pub struct Slot {
    /// None once committed or cancelled (a waiter then sees the session as gone).
    pub ingest: Option<Ingest>,
    pub last_active: Instant,
}

pub type Session = OwnedMutexGuard<Slot>;

pub struct Uploads {
    layout: Layout,
    sessions: Mutex<HashMap<UploadId, Arc<AsyncMutex<Slot>>>>,
    sessions_max: usize,
    idle_timeout: Duration,
}

impl Uploads {
    pub fn new(layout: Layout, sessions_max: usize, idle_timeout: Duration) -> Uploads {
        Uploads {
            layout,
            sessions: Mutex::new(HashMap::new()),
            sessions_max,
            idle_timeout,
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().expect("sessions lock").len()
    }

    /// Opens a new session for `name`.
    pub fn create(&self, name: &RepoName, algorithm: Algorithm) -> Result<Session, ApiError> {
        let mut sessions = self.sessions.lock().expect("uploads lock");
        if sessions.len() >= self.sessions_max {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                Code::TooManyRequests,
                format!(
                    "{} upload sessions are open (upload_sessions_max); finish or cancel some, or retry later",
                    sessions.len()
                ),
            )
            .with_header("retry-after", "1".into()));
        }
        let id = UploadId::random()?;
        let ingest =
            tokio::task::block_in_place(|| self.layout.create_ingest(name, &id, algorithm))?;
        let slot = Arc::new(AsyncMutex::new(Slot {
            ingest: Some(ingest),
            last_active: Instant::now(),
        }));
        let guard = slot
            .clone()
            .try_lock_owned()
            .expect("a new session is unlocked");
        sessions.insert(id, slot);
        Ok(guard)
    }

    /// The session `id` of repository `name`, locked for this request.
    pub async fn get(&self, name: &RepoName, id: &UploadId) -> Result<Session, ApiError> {
        let unknown = || {
            ApiError::not_found(
                Code::BlobUploadUnknown,
                format!("no upload session {} in repository {name}", id.as_str()),
            )
        };
        let slot = {
            let existing = self.sessions.lock().expect("uploads lock").get(id).cloned();
            match existing {
                Some(slot) => slot,
                None => {
                    // Left on disk by an earlier run of the process?
                    let ingest = tokio::task::block_in_place(|| self.layout.reopen_ingest(id))?;
                    let Some(ingest) = ingest else {
                        return Err(unknown());
                    };
                    let slot = Arc::new(AsyncMutex::new(Slot {
                        ingest: Some(ingest),
                        last_active: Instant::now(),
                    }));
                    self.sessions
                        .lock()
                        .expect("uploads lock")
                        .entry(id.clone())
                        .or_insert(slot)
                        .clone()
                }
            }
        };
        let guard = slot.lock_owned().await;
        match &guard.ingest {
            Some(ingest) if ingest.name() == name => Ok(guard),
            _ => Err(unknown()),
        }
    }

    /// Forgets a session whose ingest was committed or removed.
    pub fn forget(&self, id: &UploadId) {
        self.sessions.lock().expect("uploads lock").remove(id);
    }

    /// Drops sessions idle for longer than the timeout, in memory and on disk.
    pub fn purge_idle(&self) {
        let now = Instant::now();
        let mut stale = Vec::new();
        {
            let mut sessions = self.sessions.lock().expect("uploads lock");
            sessions.retain(|id, slot| {
                // A locked session is in use, so not idle.
                let Ok(guard) = slot.try_lock() else {
                    return true;
                };
                let idle = now.duration_since(guard.last_active) > self.idle_timeout;
                if idle {
                    stale.push(id.clone());
                }
                !idle
            });
        }
        let known: Vec<UploadId> = self
            .sessions
            .lock()
            .expect("uploads lock")
            .keys()
            .cloned()
            .collect();
        if let Ok(on_disk) = self.layout.ingests() {
            for (id, modified) in on_disk {
                let age = SystemTime::now()
                    .duration_since(modified)
                    .unwrap_or_default();
                if !known.contains(&id) && age > self.idle_timeout {
                    stale.push(id);
                }
            }
        }
        for id in stale {
            tracing::info!(upload = id.as_str(), "dropping idle upload session");
            if let Err(e) = self.layout.remove_ingest(&id) {
                tracing::warn!(
                    upload = id.as_str(),
                    "cannot remove idle upload session: {e}"
                );
            }
        }
    }
}
