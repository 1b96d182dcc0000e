//! The owner's choice of who serves a blob to the next peer that asks. The owner remembers, per
//! blob, the nodes that hold or are receiving it (itself first, then every requester it has
//! answered) and how many peers it has sent to each. A new requester goes to the earliest node
//! with fewer than `fanout_max` of them, and becomes a source itself: with `fanout_max = 1` a
//! wave of N nodes asking at once forms a chain, each node streaming to the next while it
//! receives, so every uplink carries one copy and the last node finishes about when the first
//! does. With more, a tree. Sources that failed a requester are forgotten.
//!
//! Pure: no I/O, no clock (the caller passes `now`), table-tested below.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lighter_layout::Digest;

/// Blobs remembered at once; the oldest is forgotten past this.
pub const ENTRIES_MAX: usize = 4096;
/// A blob's sources are forgotten this long after its first request: by then the wave is over,
/// and the nodes may have dropped it.
pub const ENTRY_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// The owner sends the blob itself.
    Serve,
    /// The requester should ask this peer.
    Redirect(String),
}

#[derive(Default)]
pub struct Fanout {
    entries: HashMap<Digest, Entry>,
}

struct Entry {
    created: Instant,
    /// Peers holding or receiving the blob, in the order they got it; the owner first.
    sources: Vec<Source>,
}

struct Source {
    peer: String,
    /// The source this one was sent to (None: the owner, or a node that said it holds it).
    parent: Option<String>,
    children: u32,
    /// Known to hold the whole, verified blob (the owner with it stored, or a node that said so).
    complete: bool,
}

impl Fanout {
    /// Where `requester` (a known peer, or None for a node the owner does not know) should get
    /// `digest` from. `owner` is this node's own peer address.
    pub fn choose(
        &mut self,
        digest: &Digest,
        owner: &str,
        requester: Option<&str>,
        fanout_max: u32,
        now: Instant,
    ) -> Choice {
        self.expire(now);
        let entry = self.entry(digest, owner, now);
        // Never the requester, nor a node fed through it (a cycle).
        let candidates = || {
            entry
                .sources
                .iter()
                .enumerate()
                .filter(|(_, s)| requester.is_none_or(|r| !entry.fed_by(&s.peer, r)))
        };
        // The earliest source with room; else the least loaded (ties: the earliest).
        let pick = candidates()
            .find(|(_, s)| s.children < fanout_max)
            .or_else(|| candidates().min_by_key(|(_, s)| s.children))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let source = &mut entry.sources[pick];
        source.children += 1;
        let parent = source.peer.clone();
        let choice = if source.peer == owner {
            Choice::Serve
        } else {
            Choice::Redirect(source.peer.clone())
        };
        entry.add(owner, requester);
        if let Some(r) = requester.and_then(|r| entry.sources.iter_mut().find(|s| s.peer == r)) {
            r.parent = Some(parent);
        }
        choice
    }

    /// Nodes holding the whole blob that `requester` may fetch parts of it from at once (this
    /// owner among them when `owner_holds`), least loaded first, at most `max`; fewer than two
    /// is none (one source is the ordinary transfer). Each one chosen counts a transfer.
    pub fn parallel_sources(
        &mut self,
        digest: &Digest,
        owner: &str,
        owner_holds: bool,
        requester: &str,
        max: usize,
        now: Instant,
    ) -> Vec<String> {
        self.expire(now);
        let entry = self.entry(digest, owner, now);
        entry.sources[0].complete = owner_holds;
        let mut complete: Vec<&mut Source> = entry
            .sources
            .iter_mut()
            .filter(|s| s.complete && s.peer != requester)
            .collect();
        if complete.len() < 2 {
            return Vec::new();
        }
        // Stable: ties keep the earlier source first.
        complete.sort_by_key(|s| s.children);
        let chosen: Vec<String> = complete
            .into_iter()
            .take(max)
            .map(|s| {
                s.children += 1;
                s.peer.clone()
            })
            .collect();
        entry.add(owner, Some(requester));
        chosen
    }

    /// `peer` says it holds the whole, verified blob.
    pub fn held(&mut self, digest: &Digest, owner: &str, peer: &str, now: Instant) {
        self.expire(now);
        let entry = self.entry(digest, owner, now);
        entry.add(owner, Some(peer));
        if let Some(s) = entry.sources.iter_mut().find(|s| s.peer == peer) {
            s.complete = true;
        }
    }

    fn entry(&mut self, digest: &Digest, owner: &str, now: Instant) -> &mut Entry {
        if !self.entries.contains_key(digest) && self.entries.len() >= ENTRIES_MAX {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(d, _)| d.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.entry(digest.clone()).or_insert_with(|| Entry {
            created: now,
            sources: vec![Source {
                peer: owner.to_owned(),
                parent: None,
                children: 0,
                complete: false,
            }],
        })
    }

    /// `peer` failed a requester it was sent to: send nobody else there for this blob. The
    /// peer that was feeding it has room again, so the requester is sent there next: a chain
    /// with a dead link joins up again instead of piling onto the owner.
    pub fn failed(&mut self, digest: &Digest, peer: &str) {
        if let Some(e) = self.entries.get_mut(digest) {
            // The owner (first) stays: it is the one answering.
            let owner = e.sources[0].peer.clone();
            if peer == owner {
                return;
            }
            let Some(i) = e.sources.iter().position(|s| s.peer == peer) else {
                return;
            };
            let gone = e.sources.remove(i);
            if let Some(parent) = e
                .sources
                .iter_mut()
                .find(|s| Some(&s.peer) == gone.parent.as_ref())
            {
                parent.children = parent.children.saturating_sub(1);
            }
            // Its children are fed by nobody now: they will ask again.
            for s in e
                .sources
                .iter_mut()
                .filter(|s| s.parent.as_ref() == Some(&gone.peer))
            {
                s.parent = None;
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.created) < ENTRY_TTL);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

impl Entry {
    /// `requester` will hold the blob: a source for the next ones (unknown nodes never are).
    fn add(&mut self, owner: &str, requester: Option<&str>) {
        if let Some(r) = requester {
            if r != owner && !self.sources.iter().any(|s| s.peer == r) {
                self.sources.push(Source {
                    peer: r.to_owned(),
                    parent: None,
                    children: 0,
                    complete: false,
                });
            }
        }
    }

    /// Whether `peer` is `via` or receives the blob through it (walking up its parents).
    fn fed_by(&self, peer: &str, via: &str) -> bool {
        let mut at = Some(peer);
        // Bounded: a chain is at most as long as the list.
        for _ in 0..=self.sources.len() {
            match at {
                None => return false,
                Some(p) if p == via => return true,
                Some(p) => {
                    at = self
                        .sources
                        .iter()
                        .find(|s| s.peer == p)
                        .and_then(|s| s.parent.as_deref())
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> Digest {
        Digest::of(lighter_layout::Algorithm::Sha256, &i.to_be_bytes())
    }

    const O: &str = "http://198.18.0.2:5000";

    fn node(i: u32) -> String {
        format!("http://198.18.0.{}:5000", i + 10)
    }

    #[test]
    fn a_wave_with_fanout_one_forms_a_chain() {
        let mut f = Fanout::default();
        let now = Instant::now();
        assert_eq!(f.choose(&d(1), O, Some(&node(1)), 1, now), Choice::Serve);
        for i in 2..16 {
            assert_eq!(
                f.choose(&d(1), O, Some(&node(i)), 1, now),
                Choice::Redirect(node(i - 1)),
                "node {i} goes to the one before it"
            );
        }
    }

    #[test]
    fn fanout_two_forms_a_tree_breadth_first() {
        let mut f = Fanout::default();
        let now = Instant::now();
        let got: Vec<Choice> = (1..=6)
            .map(|i| f.choose(&d(1), O, Some(&node(i)), 2, now))
            .collect();
        assert_eq!(
            got,
            vec![
                Choice::Serve,
                Choice::Serve,
                Choice::Redirect(node(1)),
                Choice::Redirect(node(1)),
                Choice::Redirect(node(2)),
                Choice::Redirect(node(2)),
            ]
        );
    }

    #[test]
    fn a_requester_is_never_sent_to_itself_and_counts_once() {
        let mut f = Fanout::default();
        let now = Instant::now();
        assert_eq!(f.choose(&d(1), O, Some(&node(1)), 1, now), Choice::Serve);
        // node 1 asks again (it lost its source): not to itself; the owner is full, node 1 is
        // the only other source, so the least loaded: the owner.
        assert_eq!(f.choose(&d(1), O, Some(&node(1)), 1, now), Choice::Serve);
        assert_eq!(
            f.choose(&d(1), O, Some(&node(2)), 1, now),
            Choice::Redirect(node(1))
        );
    }

    #[test]
    fn unknown_requesters_are_served_but_never_become_sources() {
        let mut f = Fanout::default();
        let now = Instant::now();
        assert_eq!(f.choose(&d(1), O, None, 1, now), Choice::Serve);
        assert_eq!(f.choose(&d(1), O, None, 1, now), Choice::Serve);
    }

    #[test]
    fn a_failed_source_gets_nobody_else() {
        let mut f = Fanout::default();
        let now = Instant::now();
        f.choose(&d(1), O, Some(&node(1)), 1, now);
        assert_eq!(
            f.choose(&d(1), O, Some(&node(2)), 1, now),
            Choice::Redirect(node(1))
        );
        f.failed(&d(1), &node(1));
        // The owner fed node 1: it has room again, and it is the earliest.
        assert_eq!(f.choose(&d(1), O, Some(&node(3)), 1, now), Choice::Serve);
        f.failed(&d(1), O);
        assert_eq!(
            f.choose(&d(1), O, Some(&node(4)), 1, now),
            Choice::Redirect(node(2))
        );
    }

    #[test]
    fn a_chain_with_a_dead_link_joins_up_again_never_in_a_circle() {
        let mut f = Fanout::default();
        let now = Instant::now();
        // O → 1 → 2 → 3 → 4 → 5
        for i in 1..=5 {
            f.choose(&d(1), O, Some(&node(i)), 1, now);
        }
        // Node 2 dies; node 3 asks again, naming it: sent to node 1, which fed node 2. Not to
        // node 4 or 5 (they receive through node 3), nor to the owner (full).
        f.failed(&d(1), &node(2));
        assert_eq!(
            f.choose(&d(1), O, Some(&node(3)), 1, now),
            Choice::Redirect(node(1))
        );
        // Node 1 dies too: node 3 goes to the owner, never to its own descendants.
        f.failed(&d(1), &node(1));
        assert_eq!(f.choose(&d(1), O, Some(&node(3)), 1, now), Choice::Serve);
        // A new node goes to the tail.
        assert_eq!(
            f.choose(&d(1), O, Some(&node(6)), 1, now),
            Choice::Redirect(node(5))
        );
    }

    #[test]
    fn blobs_are_independent_and_forgotten_after_their_ttl() {
        let mut f = Fanout::default();
        let now = Instant::now();
        f.choose(&d(1), O, Some(&node(1)), 1, now);
        assert_eq!(f.choose(&d(2), O, Some(&node(2)), 1, now), Choice::Serve);
        let later = now + ENTRY_TTL + Duration::from_secs(1);
        assert_eq!(f.choose(&d(1), O, Some(&node(3)), 1, later), Choice::Serve);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn parts_come_from_complete_holders_only_least_loaded_first() {
        let mut f = Fanout::default();
        let now = Instant::now();
        // Only the owner holds it: no parallel fetch (one source).
        assert!(f
            .parallel_sources(&d(1), O, true, &node(1), 4, now)
            .is_empty());
        // node 1 was receiving it; once it says it holds it, two sources.
        f.held(&d(1), O, &node(1), now);
        assert_eq!(
            f.parallel_sources(&d(1), O, true, &node(2), 4, now),
            vec![O.to_owned(), node(1)]
        );
        // node 2 is receiving, not complete: not offered. The owner and node 1 have one
        // transfer each; node 3 held it all along.
        f.held(&d(1), O, &node(3), now);
        assert_eq!(
            f.parallel_sources(&d(1), O, true, &node(4), 2, now),
            vec![node(3), O.to_owned()]
        );
        // The requester is never its own source; the owner without the blob is not offered.
        assert!(f
            .parallel_sources(&d(1), O, false, &node(3), 4, now)
            .is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut f = Fanout::default();
        let now = Instant::now();
        for i in 0..(ENTRIES_MAX as u32 + 10) {
            f.choose(
                &d(i),
                O,
                Some(&node(1)),
                1,
                now + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(f.len(), ENTRIES_MAX);
    }
}
