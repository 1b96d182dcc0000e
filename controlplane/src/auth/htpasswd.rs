//! Users from an htpasswd file (bcrypt hashes only) and their groups from an AuthGroupFile,
//! both reloaded when they change (looked at no more than once a second).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

/// How often the files are looked at for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Loaded {
    /// user → bcrypt hash
    users: HashMap<String, String>,
    /// user → groups
    groups: HashMap<String, Vec<String>>,
    /// What the files looked like when read (mtime, size, inode).
    stamp: Vec<Option<(std::time::SystemTime, u64, u64)>>,
    /// Compared against when the user is unknown, so an unknown user costs a wrong password's
    /// time: a hash of the same cost as the file's.
    dummy_hash: String,
}

pub struct Htpasswd {
    files: [Option<PathBuf>; 2],
    loaded: RwLock<Loaded>,
    next_check: Mutex<Instant>,
}

impl Htpasswd {
    pub fn new(htpasswd: Option<PathBuf>, groups: Option<PathBuf>) -> Result<Htpasswd, String> {
        let h = Htpasswd {
            files: [htpasswd, groups],
            loaded: RwLock::default(),
            next_check: Mutex::new(Instant::now()),
        };
        let loaded = h.load()?;
        *h.loaded.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(h)
    }

    fn stamps(&self) -> Vec<Option<(std::time::SystemTime, u64, u64)>> {
        use std::os::unix::fs::MetadataExt;
        self.files
            .iter()
            .map(|f| {
                let m = std::fs::metadata(f.as_ref()?).ok()?;
                Some((m.modified().ok()?, m.len(), m.ino()))
            })
            .collect()
    }

    fn load(&self) -> Result<Loaded, String> {
        let stamp = self.stamps();
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut loaded = Loaded {
            stamp,
            ..Default::default()
        };
        if let Some(p) = &self.files[0] {
            for (i, line) in read(p)?.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (user, hash) = line
                    .split_once(':')
                    .ok_or_else(|| format!("{} line {}: expected user:hash", p.display(), i + 1))?;
                if !(hash.starts_with("$2y$")
                    || hash.starts_with("$2b$")
                    || hash.starts_with("$2a$"))
                {
                    return Err(format!(
                        "{} line {}: user {user:?} has no bcrypt hash: create it with htpasswd -B",
                        p.display(),
                        i + 1
                    ));
                }
                loaded.users.insert(user.to_owned(), hash.to_owned());
            }
        }
        let cost = loaded
            .users
            .values()
            .next()
            .and_then(|h| h.get(4..6)?.parse::<u32>().ok())
            .unwrap_or(10);
        loaded.dummy_hash =
            bcrypt::hash("lighter: not a user", cost).map_err(|e| format!("bcrypt: {e}"))?;
        if let Some(p) = &self.files[1] {
            for (i, line) in read(p)?.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (group, members) = line.split_once(':').ok_or_else(|| {
                    format!(
                        "{} line {}: expected group: user1 user2",
                        p.display(),
                        i + 1
                    )
                })?;
                for m in members.split_whitespace() {
                    loaded
                        .groups
                        .entry(m.to_owned())
                        .or_default()
                        .push(group.trim().to_owned());
                }
            }
        }
        Ok(loaded)
    }

    /// Reloads the files if they changed; a file that no longer parses keeps the previous users
    /// (and says so).
    fn refresh(&self) -> bool {
        {
            let mut next = self.next_check.lock().unwrap_or_else(|p| p.into_inner());
            if Instant::now() < *next {
                return false;
            }
            *next = Instant::now() + RELOAD_CHECK;
        }
        let now = self.stamps();
        if self.loaded.read().unwrap_or_else(|p| p.into_inner()).stamp == now {
            return false;
        }
        match self.load() {
            Ok(l) => {
                tracing::info!(users = l.users.len(), "htpasswd reloaded");
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = l;
                true
            }
            Err(e) => {
                tracing::warn!("keeping the previous users: {e}");
                false
            }
        }
    }

    /// Whether the files changed since the last call (credentials checked before are stale).
    pub fn changed(&self) -> bool {
        self.refresh()
    }

    /// Checks `user`'s password (bcrypt: slow by design; call from a blocking thread). The
    /// user's groups when it matches.
    pub fn check(&self, user: &str, password: &str) -> Option<Vec<String>> {
        let (hash, groups, dummy) = {
            let l = self.loaded.read().unwrap_or_else(|p| p.into_inner());
            (
                l.users.get(user).cloned(),
                l.groups.get(user).cloned().unwrap_or_default(),
                l.dummy_hash.clone(),
            )
        };
        match hash {
            Some(h) => bcrypt::verify(password, &h).ok()?.then_some(groups),
            None => {
                let _ = bcrypt::verify(password, &dummy);
                None
            }
        }
    }
}
