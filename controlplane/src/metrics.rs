//! The control plane's counters, served at `GET /v2/_lighter/metrics` in the Prometheus text
//! exposition format (0.0.4). Counters are plain atomics bumped where the event happens; this
//! module only names and renders them. The data plane keeps no shared counters (nothing is
//! shared between its cores), so pulls served from the cache are not counted here.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Events of the pull-through cache and of garbage collection.
#[derive(Default)]
pub struct Counters {
    /// A cached tag served because upstream could not be asked (down, 5xx, timed out).
    pub stale_tags_served: AtomicU64,
    /// `[storage.s3]`: pushes the bucket took that this replica's cache could not (a full
    /// disk).
    pub bucket_cache_write_failures: AtomicU64,
    /// Manifests fetched from upstream, verified and stored.
    pub manifests_fetched: AtomicU64,
    /// Blob downloads that ended verified (and published, or at least served).
    pub blob_downloads_verified: AtomicU64,
    /// Blob downloads that ended otherwise: upstream errors, stalls, digest mismatches.
    pub blob_downloads_failed: AtomicU64,
    /// Of which: bytes that did not match their digest.
    pub blob_digest_mismatches: AtomicU64,
    /// Bytes received for blobs, from upstreams and peers.
    pub blob_download_bytes: AtomicU64,
    /// Of which from upstreams, from peers of the node tier, and from the bucket.
    pub blob_fetch_upstream_bytes: AtomicU64,
    pub blob_fetch_peer_bytes: AtomicU64,
    pub blob_fetch_bucket_bytes: AtomicU64,
    /// Node tier: bytes sent to peers; their requests by answer; peer sources that failed.
    pub peer_served_bytes: AtomicU64,
    pub peer_requests_served: AtomicU64,
    pub peer_requests_redirected: AtomicU64,
    pub peer_requests_not_found: AtomicU64,
    pub peer_requests_busy: AtomicU64,
    pub peer_fetch_failures: AtomicU64,
    /// Eviction under `cache_size_max_bytes`.
    pub evicted_blobs: AtomicU64,
    pub evicted_bytes: AtomicU64,
    /// Bytes held by mirrored repositories at the last cache sweep (0 before the first).
    pub cached_bytes: AtomicU64,
    /// Garbage collections run, and the content they removed.
    pub gc_runs: AtomicU64,
    pub gc_removed_blobs: AtomicU64,
    pub gc_removed_bytes: AtomicU64,
    /// Of `[storage.s3]`'s bucket.
    pub gc_bucket_removed_blobs: AtomicU64,
    pub gc_bucket_removed_bytes: AtomicU64,
    /// `[storage.s3]`'s journal of deletes: listings read whole and failed, entries applied
    /// to this replica's cache, and when it was last read whole (unix ms; 0: not yet).
    pub journal_reads: AtomicU64,
    pub journal_read_failures: AtomicU64,
    pub journal_entries_applied: AtomicU64,
    pub journal_last_read_unix_ms: AtomicU64,
    /// Access control: failed authentications, requests refused for them (429), requests of
    /// authenticated or anonymous callers the rules refused, tokens issued.
    pub auth_failures: AtomicU64,
    pub auth_throttled: AtomicU64,
    pub auth_denied: AtomicU64,
    pub tokens_issued: AtomicU64,
    /// Requests the data plane handed over, and of them the connections given back to it
    /// after the answer (kept alive).
    pub handoffs: AtomicU64,
    pub handoffs_returned: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed) + n
    }
}

/// Gauges read when rendering.
pub struct Gauges {
    pub blob_downloads_in_flight: u64,
    pub upload_sessions: u64,
    pub peers: u64,
}

/// The exposition text.
pub fn render(m: &Counters, g: &Gauges) -> String {
    let mut out = String::with_capacity(2048);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "lighter_auth_failures_total",
        "counter",
        "Failed authentications: unknown users, wrong passwords, bad or expired tokens.",
        &[("", get(&m.auth_failures))],
    );
    metric(
        "lighter_auth_throttled_total",
        "counter",
        "Requests answered 429 because their client failed to authenticate too often.",
        &[("", get(&m.auth_throttled))],
    );
    metric(
        "lighter_auth_denied_total",
        "counter",
        "Requests the access rules refused (401 without credentials, 403 with).",
        &[("", get(&m.auth_denied))],
    );
    metric(
        "lighter_auth_tokens_issued_total",
        "counter",
        "Tokens issued by the token endpoint.",
        &[("", get(&m.tokens_issued))],
    );
    metric(
        "lighter_handoffs_total",
        "counter",
        "Requests the data plane handed to the control plane (with their connection).",
        &[("", get(&m.handoffs))],
    );
    metric(
        "lighter_handoffs_returned_total",
        "counter",
        "Handed-over connections given back to the data plane after the answer (kept alive).",
        &[("", get(&m.handoffs_returned))],
    );
    metric(
        "lighter_mirror_stale_tags_served_total",
        "counter",
        "Cached tags served because upstream could not be asked (down, 5xx, timed out).",
        &[("", get(&m.stale_tags_served))],
    );
    metric(
        "lighter_mirror_manifests_fetched_total",
        "counter",
        "Manifests fetched from upstream, verified and stored.",
        &[("", get(&m.manifests_fetched))],
    );
    metric(
        "lighter_mirror_blob_downloads_total",
        "counter",
        "Blob downloads from upstream by result (one per blob however many clients asked).",
        &[
            ("{result=\"verified\"}", get(&m.blob_downloads_verified)),
            ("{result=\"failed\"}", get(&m.blob_downloads_failed)),
        ],
    );
    metric(
        "lighter_mirror_blob_digest_mismatches_total",
        "counter",
        "Blob downloads whose bytes did not match their digest (discarded, never served whole).",
        &[("", get(&m.blob_digest_mismatches))],
    );
    metric(
        "lighter_mirror_blob_download_bytes_total",
        "counter",
        "Bytes of blobs received, from upstreams and from peers.",
        &[("", get(&m.blob_download_bytes))],
    );
    metric(
        "lighter_blob_fetch_bytes_total",
        "counter",
        "Bytes of blobs this node fetched, by source: upstream registries, peers of the node tier, or the bucket of [storage.s3].",
        &[
            ("{source=\"upstream\"}", get(&m.blob_fetch_upstream_bytes)),
            ("{source=\"peer\"}", get(&m.blob_fetch_peer_bytes)),
            ("{source=\"bucket\"}", get(&m.blob_fetch_bucket_bytes)),
        ],
    );
    metric(
        "lighter_peer_served_bytes_total",
        "counter",
        "Bytes of blobs this node sent to peers.",
        &[("", get(&m.peer_served_bytes))],
    );
    metric(
        "lighter_peer_requests_total",
        "counter",
        "Blob requests from peers, by answer: served, redirected to another peer, not found, busy.",
        &[
            ("{answer=\"served\"}", get(&m.peer_requests_served)),
            ("{answer=\"redirected\"}", get(&m.peer_requests_redirected)),
            ("{answer=\"not_found\"}", get(&m.peer_requests_not_found)),
            ("{answer=\"busy\"}", get(&m.peer_requests_busy)),
        ],
    );
    metric(
        "lighter_peer_fetch_failures_total",
        "counter",
        "Transfers from peers that failed or stalled (resumed from another source).",
        &[("", get(&m.peer_fetch_failures))],
    );
    metric(
        "lighter_peers",
        "gauge",
        "Live peers of the node tier known now, this node included (0: no node tier).",
        &[("", g.peers)],
    );
    metric(
        "lighter_mirror_blob_downloads_in_flight",
        "gauge",
        "Blob downloads running now.",
        &[("", g.blob_downloads_in_flight)],
    );
    metric(
        "lighter_mirror_evicted_blobs_total",
        "counter",
        "Blobs removed to keep the cache under cache_size_max_bytes.",
        &[("", get(&m.evicted_blobs))],
    );
    metric(
        "lighter_mirror_evicted_bytes_total",
        "counter",
        "Bytes removed to keep the cache under cache_size_max_bytes.",
        &[("", get(&m.evicted_bytes))],
    );
    metric(
        "lighter_mirror_cached_bytes",
        "gauge",
        "Bytes held by mirrored repositories at the last cache sweep.",
        &[("", get(&m.cached_bytes))],
    );
    metric(
        "lighter_gc_runs_total",
        "counter",
        "Garbage collections run (dry runs included).",
        &[("", get(&m.gc_runs))],
    );
    metric(
        "lighter_gc_removed_blobs_total",
        "counter",
        "Content no repository held, removed by garbage collection.",
        &[("", get(&m.gc_removed_blobs))],
    );
    metric(
        "lighter_gc_removed_bytes_total",
        "counter",
        "Bytes removed by garbage collection.",
        &[("", get(&m.gc_removed_bytes))],
    );
    metric(
        "lighter_gc_bucket_removed_blobs_total",
        "counter",
        "Content no repository linked, removed from the bucket by garbage collection.",
        &[("", get(&m.gc_bucket_removed_blobs))],
    );
    metric(
        "lighter_gc_bucket_removed_bytes_total",
        "counter",
        "Bytes removed from the bucket by garbage collection.",
        &[("", get(&m.gc_bucket_removed_bytes))],
    );
    metric(
        "lighter_bucket_cache_write_failures_total",
        "counter",
        "Pushes the bucket holds (acknowledged) that this replica's cache could not write (a full disk): their tags are then read from the bucket.",
        &[("", get(&m.bucket_cache_write_failures))],
    );
    metric(
        "lighter_bucket_journal_reads_total",
        "counter",
        "Listings of the bucket's journal of deletes, read whole or failed.",
        &[
            ("{result=\"ok\"}", get(&m.journal_reads)),
            ("{result=\"failed\"}", get(&m.journal_read_failures)),
        ],
    );
    metric(
        "lighter_bucket_journal_entries_applied_total",
        "counter",
        "Deletes made through any replica, read from the journal and applied to this cache.",
        &[("", get(&m.journal_entries_applied))],
    );
    metric(
        "lighter_bucket_journal_last_read_timestamp_seconds",
        "gauge",
        "When the journal of deletes was last read whole (unix seconds; 0: not yet): a delete through another replica shows here within deletes_poll_ms of it.",
        &[("", get(&m.journal_last_read_unix_ms) / 1000)],
    );
    metric(
        "lighter_upload_sessions",
        "gauge",
        "Upload sessions open now.",
        &[("", g.upload_sessions)],
    );
    out
}

/// Appends the data plane's counters (summed over its cores, from their event rings) as
/// `lighter_dataplane_*`.
pub fn render_dataplane(out: &mut String, d: &crate::events::DataplaneCounters) {
    use lighter_layout::events::{counter, LATENCY_BOUNDS_US, ROUTES, STATUS_CLASSES};
    let c = &d.counters;
    let one = |v: u64| vec![(String::new(), v)];
    let mut requests = Vec::new();
    for (r, route) in ROUTES.iter().enumerate() {
        for (s, class) in STATUS_CLASSES.iter().enumerate() {
            requests.push((
                format!("{{route=\"{route}\",status=\"{class}\"}}"),
                c[counter::REQUESTS + r * 4 + s],
            ));
        }
    }
    metric(
        out,
        "lighter_dataplane_requests_total",
        "counter",
        "Requests the data plane answered itself, by route and status class.",
        &requests,
    );
    metric(
        out,
        "lighter_dataplane_sent_bytes_total",
        "counter",
        "Bytes of responses the data plane sent (heads and bodies).",
        &one(c[counter::BYTES_SENT]),
    );
    metric(
        out,
        "lighter_dataplane_handoffs_total",
        "counter",
        "Requests the data plane handed to the control plane.",
        &one(c[counter::HANDOFFS]),
    );
    metric(
        out,
        "lighter_dataplane_returns_total",
        "counter",
        "Connections the control plane gave back to the data plane.",
        &one(c[counter::RETURNS]),
    );
    metric(
        out,
        "lighter_dataplane_connections_accepted_total",
        "counter",
        "Connections the data plane accepted.",
        &one(c[counter::ACCEPTED]),
    );
    metric(
        out,
        "lighter_dataplane_connections_evicted_total",
        "counter",
        "Idle connections closed by a full core to take new ones.",
        &one(c[counter::EVICTED]),
    );
    metric(
        out,
        "lighter_dataplane_connections",
        "gauge",
        "Connections open now (those with the control plane included).",
        &one(c[counter::OPEN]),
    );
    metric(
        out,
        "lighter_dataplane_cores",
        "gauge",
        "Data plane cores whose counters are read.",
        &one(d.cores),
    );
    let engine = match c[counter::ENGINE] {
        1 => "io_uring",
        2 => "epoll",
        _ => "unknown",
    };
    metric(
        out,
        "lighter_dataplane_engine",
        "gauge",
        "The data plane's event loop (1 for the one in use).",
        &[(format!("{{engine=\"{engine}\"}}"), 1)],
    );
    let mut buckets = Vec::new();
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
        cumulative += c[counter::LATENCY + i];
        buckets.push((
            format!("_bucket{{le=\"{}\"}}", *bound as f64 / 1e6),
            cumulative,
        ));
    }
    cumulative += c[counter::LATENCY + LATENCY_BOUNDS_US.len()];
    buckets.push(("_bucket{le=\"+Inf\"}".to_owned(), cumulative));
    buckets.push(("_count".to_owned(), cumulative));
    let _ = writeln!(
        out,
        "# HELP lighter_dataplane_pull_duration_seconds Manifest and blob requests the data plane \
         answered, from request to last byte sent."
    );
    let _ = writeln!(
        out,
        "# TYPE lighter_dataplane_pull_duration_seconds histogram"
    );
    for (suffix, v) in &buckets {
        let _ = writeln!(out, "lighter_dataplane_pull_duration_seconds{suffix} {v}");
    }
    let _ = writeln!(
        out,
        "lighter_dataplane_pull_duration_seconds_sum {}",
        c[counter::LATENCY_SUM_US] as f64 / 1e6
    );
    metric(
        out,
        "lighter_events_dropped_total",
        "counter",
        "Events a data plane core dropped because its ring was full (not drained in time).",
        &one(d.dropped),
    );
    metric(
        out,
        "lighter_events_control_dropped_total",
        "counter",
        "The control plane's events dropped because its queue was full (events_queue_records).",
        &one(d.control_dropped),
    );
    metric(
        out,
        "lighter_events_logged_total",
        "counter",
        "Events written to the event log since the control plane started.",
        &one(d.logged),
    );
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_help_type_and_value() {
        let m = Counters::default();
        Counters::add(&m.stale_tags_served, 3);
        Counters::add(&m.blob_downloads_failed, 1);
        let text = render(
            &m,
            &Gauges {
                blob_downloads_in_flight: 2,
                upload_sessions: 5,
                peers: 3,
            },
        );
        assert!(text.contains("# TYPE lighter_mirror_stale_tags_served_total counter\nlighter_mirror_stale_tags_served_total 3\n"));
        assert!(text.contains("lighter_mirror_blob_downloads_total{result=\"failed\"} 1\n"));
        assert!(text.contains("lighter_mirror_blob_downloads_total{result=\"verified\"} 0\n"));
        assert!(text.contains("lighter_mirror_blob_downloads_in_flight 2\n"));
        assert!(text.contains("lighter_upload_sessions 5\n"));
        assert!(text.contains("lighter_peers 3\n"));
        assert!(text.contains("lighter_blob_fetch_bytes_total{source=\"peer\"} 0\n"));
        // Every sample line follows its HELP and TYPE lines.
        let names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect();
        for n in names {
            assert!(text.contains(&format!("# TYPE {n} ")), "{n}");
            assert!(text.contains(&format!("# HELP {n} ")), "{n}");
        }
    }
}
