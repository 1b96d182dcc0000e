//! Who owns a blob: rendezvous (highest random weight) hashing. Each peer's weight for a digest
//! is a hash of the two; the owner is the peer with the highest weight. Every node computes the
//! same order from the same peer list with no coordination, and a peer joining or leaving moves
//! only the digests it wins or held (about 1/N of them), never the others.
//!
//! The hash is SHA-256 (its first 8 bytes), not `std`'s hasher: nodes running different builds
//! during a rolling update must agree.

use sha2::{Digest as _, Sha256};

/// The weight of `peer` for `key`.
pub fn weight(key: &str, peer: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0u8]);
    h.update(peer.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
}

/// `peers` ordered by weight for `key`, highest (the owner) first; ties (never in practice)
/// broken by name so the order is total.
pub fn ranked<'p>(key: &str, peers: impl IntoIterator<Item = &'p str>) -> Vec<&'p str> {
    let mut scored: Vec<(u64, &str)> = peers.into_iter().map(|p| (weight(key, p), p)).collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("http://198.18.0.{}:5000", i + 2))
            .collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("sha256:{i:064x}")).collect()
    }

    #[test]
    fn the_order_does_not_depend_on_the_list_order() {
        let mut p = peers(5);
        let a: Vec<String> = ranked("sha256:00", p.iter().map(String::as_str))
            .into_iter()
            .map(str::to_owned)
            .collect();
        p.reverse();
        let b: Vec<String> = ranked("sha256:00", p.iter().map(String::as_str))
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 5);
    }

    #[test]
    fn duplicates_count_once() {
        let r = ranked("k", ["http://a:1", "http://b:1", "http://a:1"]);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn ownership_is_spread_evenly() {
        let p = peers(8);
        let mut owned = [0usize; 8];
        for k in keys(8000) {
            let owner = ranked(&k, p.iter().map(String::as_str))[0];
            owned[p.iter().position(|x| x == owner).unwrap()] += 1;
        }
        // 1000 each on average; a fair hash stays well within ±20 %.
        for n in owned {
            assert!((800..1200).contains(&n), "{owned:?}");
        }
    }

    #[test]
    fn a_peer_leaving_moves_only_its_own_digests() {
        let all = peers(6);
        let fewer: Vec<&str> = all
            .iter()
            .map(String::as_str)
            .filter(|p| *p != all[3])
            .collect();
        for k in keys(2000) {
            let before = ranked(&k, all.iter().map(String::as_str))[0];
            let after = ranked(&k, fewer.iter().copied())[0];
            if before != all[3] {
                assert_eq!(before, after, "{k} moved although its owner stayed");
            } else {
                // The new owner is the one that came second before.
                assert_eq!(after, ranked(&k, all.iter().map(String::as_str))[1]);
            }
        }
    }

    #[test]
    fn a_peer_joining_takes_only_digests_it_wins() {
        let all = peers(7);
        let before: Vec<&str> = all[..6].iter().map(String::as_str).collect();
        let mut taken = 0;
        for k in keys(7000) {
            let old = ranked(&k, before.iter().copied())[0];
            let new = ranked(&k, all.iter().map(String::as_str))[0];
            if new != old {
                assert_eq!(new, all[6]);
                taken += 1;
            }
        }
        // About 1/7 of the keys.
        assert!((700..1300).contains(&taken), "{taken}");
    }

    #[test]
    fn weights_are_stable_across_builds() {
        // Pinned: every node of a cluster, whatever its version, must compute this (the first
        // 8 bytes, big-endian, of sha256("sha256:00" NUL "http://198.18.0.2:5000")).
        assert_eq!(
            weight("sha256:00", "http://198.18.0.2:5000"),
            1_097_567_414_043_869_472
        );
    }
}
