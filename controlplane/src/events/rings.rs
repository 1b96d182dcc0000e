//! The data plane's rings as the control plane reads them (`lighter_layout::events`): mapped as
//! the cores make them (a restarted data plane makes new ones, renamed over the old), their
//! counters summed for the metrics, their records taken by the event log's drain.
//!
//! The counters are there whether the event log is on or off: with it off, each core's ring is
//! its header alone, and a ring a restart replaced is retired (its counters added to the sums)
//! as soon as the new one is seen. With the log on, the drain retires it once it has taken what
//! it held.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use lighter_layout::events::{counter, RingReader, COUNTERS};

/// The data plane's counters summed over its cores, for the metrics.
pub struct DataplaneCounters {
    pub counters: [u64; COUNTERS],
    pub dropped: u64,
    /// The control plane's events dropped (its queue was full).
    pub control_dropped: u64,
    pub logged: u64,
    pub cores: u64,
}

/// Every core's ring under `run/events/`.
pub struct Rings {
    dir: PathBuf,
    /// The event log drains them: a replaced ring is kept until the drain has taken it.
    drained: bool,
    state: Mutex<Mapped>,
}

/// The rings mapped now.
pub(super) struct Mapped {
    /// Rings by path: the current mapping, and one replaced by a new data plane until it is
    /// drained.
    pub(super) by_path: HashMap<PathBuf, Vec<RingReader>>,
    /// Counters of rings replaced since start (a data plane restarted), so the sums stay
    /// monotonic.
    retired: [u64; COUNTERS],
    retired_dropped: u64,
}

impl Rings {
    /// The rings in `dir`; `drained`: the event log takes their records (and retires replaced
    /// rings once it has).
    pub fn new(dir: PathBuf, drained: bool) -> Rings {
        Rings {
            dir,
            drained,
            state: Mutex::new(Mapped {
                by_path: HashMap::new(),
                retired: [0; COUNTERS],
                retired_dropped: 0,
            }),
        }
    }

    /// The rings, with those made since the last look mapped.
    pub(super) fn lock(&self) -> MutexGuard<'_, Mapped> {
        let mut m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        m.find(&self.dir);
        if !self.drained {
            let replaced: Vec<PathBuf> = m
                .by_path
                .iter()
                .filter(|(_, v)| v.len() > 1)
                .map(|(p, _)| p.clone())
                .collect();
            for path in replaced {
                m.retire_replaced(&path);
            }
        }
        m
    }

    /// The data plane's counters, summed over its cores (those of rings a restart replaced
    /// included); `logged` and `control_dropped` are the event log's to fill in.
    pub fn counters(&self) -> DataplaneCounters {
        let m = self.lock();
        let mut sum = m.retired;
        let mut dropped = m.retired_dropped;
        let mut cores = 0;
        for readers in m.by_path.values() {
            for (i, r) in readers.iter().enumerate() {
                let c = r.counters();
                for (s, v) in sum.iter_mut().zip(c) {
                    *s += v;
                }
                dropped += r.dropped();
                if i + 1 == readers.len() {
                    cores += 1;
                }
            }
        }
        // Gauges are not sums over time: those of the live rings only.
        for g in [counter::OPEN, counter::ENGINE] {
            sum[g] = m
                .by_path
                .values()
                .filter_map(|v| v.last())
                .map(|r| r.counters()[g])
                .fold(0, |a, v| {
                    if g == counter::ENGINE {
                        a.max(v)
                    } else {
                        a + v
                    }
                });
        }
        DataplaneCounters {
            counters: sum,
            dropped,
            control_dropped: 0,
            logged: 0,
            cores,
        }
    }

    /// The CPUs the data plane's live cores are pinned to (none when they float), from the
    /// rings mapped so far (the drain calls this before every pass, and maps new rings in it).
    pub fn pinned_cpus(&self) -> Vec<usize> {
        let m = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut cpus: Vec<usize> = m
            .by_path
            .values()
            .filter_map(|v| v.last())
            .filter_map(|r| r.counters()[counter::PINNED_CPU].checked_sub(1))
            .map(|c| c as usize)
            .collect();
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    }
}

impl Mapped {
    /// Maps rings not seen yet, and rings a restarted data plane made anew.
    fn find(&mut self, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("ring") {
                continue;
            }
            let Ok(ino) = std::fs::metadata(&path).map(|m| m.ino()) else {
                continue;
            };
            let known = self.by_path.get(&path);
            if known.is_some_and(|v| v.last().is_some_and(|r| r.inode == ino)) {
                continue;
            }
            match RingReader::open(&path) {
                Ok(r) => self.by_path.entry(path).or_default().push(r),
                Err(e) => tracing::debug!("event ring {} not read: {e}", path.display()),
            }
        }
    }

    /// Drops the mappings at `path` a new ring replaced, keeping their counts in the sums.
    pub(super) fn retire_replaced(&mut self, path: &Path) {
        let Some(readers) = self.by_path.get_mut(path) else {
            return;
        };
        while readers.len() > 1 {
            let old = readers.remove(0);
            for (t, c) in self.retired.iter_mut().zip(old.counters()) {
                *t += c;
            }
            self.retired_dropped += old.dropped();
        }
    }
}
