//! A download's peer sources: the blob's owner, or the peer the owner sends this node to, with
//! a resume (Range from the byte the ingest holds) from the next source whenever one fails or
//! stalls for `peer_stall_timeout_ms`. What peers send is checked only as a whole, against the
//! digest, by the download that called this (a peer is never trusted).

use std::collections::HashSet;

use lighter_layout::{Digest, Ingest, RepoName};
use reqwest::StatusCode;
use tokio::sync::watch;

use super::{PeerUrl, Peers, PEER_HEADER};
use crate::app::{block, App};
use crate::metrics::Counters;
use crate::mirror::{range_start, receive, record_total, resume, Fault, Progress};

/// Owners asked for one download before it goes upstream.
const OWNERS_MAX: usize = 3;

/// Why the owner could not supply a blob.
enum OwnerFailure {
    /// It answered that it cannot have it (upstream said no): upstream decides.
    Declined,
    /// It failed: refused, reset, silent. `feeding`: while sending this node the blob.
    Failed { why: String, feeding: bool },
    /// This node could not keep what it sent (a full disk): nobody is to blame.
    Local(String),
}

/// One download's fetch from peers: what every step needs.
#[derive(Clone, Copy)]
struct Fetch<'a> {
    app: &'a App,
    peers: &'a Peers,
    repo: &'a RepoName,
    digest: &'a Digest,
    tx: &'a watch::Sender<Progress>,
}

/// How one request to a peer ended.
enum Transfer {
    /// The ingest holds the whole blob.
    Complete,
    /// The owner sends this node to another peer.
    Redirect(PeerUrl),
    /// The owner sends this node to several peers holding the whole blob, a range from each.
    Parallel(Vec<PeerUrl>, u64),
    /// The peer has nothing (404) or serves enough peers already (503).
    Declined,
    /// Refused, reset, stalled or wrong: the peer is at fault.
    Failed(String),
    /// This node cannot keep the bytes (its data directory is full or failing): the peer is
    /// not at fault, and no other source would do better.
    Local(String),
}

/// Fetches as much of `digest` as the peers can give into `ingest` (the ingest may end
/// complete, partial, or as it was), adding the peers that sent bytes to `contributors`, for
/// blame if the digest does not match. The caller goes upstream for the rest, unless this
/// node cannot keep the bytes (Err: why; no peer is blamed for it). Cancel-safe at its awaits,
/// but for bytes a parallel fetch wrote past the prefix: `Ingest::cut` them.
pub async fn blob(
    app: &App,
    peers: &Peers,
    repo: &RepoName,
    digest: &Digest,
    ingest: &mut Ingest,
    tx: &watch::Sender<Progress>,
    contributors: &mut Vec<PeerUrl>,
) -> Result<(), String> {
    let f = Fetch {
        app,
        peers,
        repo,
        digest,
        tx,
    };
    let mut asked = HashSet::new();
    for _ in 0..OWNERS_MAX {
        let ranked = peers.ranked(digest);
        let Some(owner) = ranked.first().cloned() else {
            break;
        };
        if Some(&owner) == peers.me() {
            // This node owns it. The peer next in line owned it before this node joined (or
            // came back): if it holds the blob whole, no upstream GET is needed.
            if let Some(previous) = ranked.get(1) {
                let url = format!(
                    "{previous}/v2/_lighter/peer/blobs/{digest}?repo={}&held_only=1",
                    repo.as_str()
                );
                let before = ingest.len();
                let outcome = f.transfer(&url, ingest, peers.stall).await;
                if ingest.len() > before && !contributors.contains(previous) {
                    contributors.push(previous.clone());
                }
                match outcome {
                    Transfer::Failed(why) => {
                        tracing::warn!(%digest, peer = %previous, "previous owner failed ({why})");
                        peers.suspect(previous);
                    }
                    Transfer::Local(why) => return Err(why),
                    _ => {}
                }
            }
            break;
        }
        // The owner failed already: upstream.
        if !asked.insert(owner.clone()) {
            break;
        }
        match f.ask_owner(&owner, ingest, contributors).await {
            Ok(()) => return Ok(()),
            Err(OwnerFailure::Declined) => break,
            Err(OwnerFailure::Local(why)) => return Err(why),
            Err(OwnerFailure::Failed { why, feeding }) => {
                Counters::add(&app.counters.peer_fetch_failures, 1);
                tracing::warn!(%digest, %owner, "owner could not supply the blob: {why}");
                peers.suspect(&owner);
                // It died feeding this node: the nodes fed through this one are, if anything,
                // behind it, so nobody is better placed to fetch the rest from upstream. Else
                // (this node's feeder stalled, then the owner did not answer) the next owner
                // in line takes over, one upstream download for all who ask it.
                if feeding {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Asks the owner; follows one redirect; if the peer it was sent to fails, asks the owner
/// again to serve the rest itself. Err(Some(why)): the owner failed; Err(None): it declined.
impl Fetch<'_> {
    async fn ask_owner(
        &self,
        owner: &PeerUrl,
        ingest: &mut Ingest,
        contributors: &mut Vec<PeerUrl>,
    ) -> Result<(), OwnerFailure> {
        let Fetch {
            app,
            peers,
            repo,
            digest,
            ..
        } = *self;
        /// Peers the owner sent this node to that failed before the owner is asked to serve the
        /// rest itself (`direct=1`).
        const REDIRECTS_FAILED_MAX: usize = 2;
        let mut failed: Option<PeerUrl> = None;
        let mut failures = 0;
        let mut redirect: Option<PeerUrl> = None;
        // Owner, a peer it names, the owner again (naming the failed peer) ...: bounded.
        for _ in 0..2 * REDIRECTS_FAILED_MAX + 2 {
            let direct = failures >= REDIRECTS_FAILED_MAX;
            let (peer, url) = match redirect.take() {
                Some(to) => {
                    let url = format!(
                        "{to}/v2/_lighter/peer/blobs/{digest}?repo={}&sent_by_owner=1",
                        repo.as_str()
                    );
                    (to, url)
                }
                None => {
                    let mut url = format!(
                        "{owner}/v2/_lighter/peer/blobs/{digest}?repo={}",
                        repo.as_str()
                    );
                    if direct {
                        url.push_str("&direct=1");
                    }
                    if let Some(f) = &failed {
                        // The owner sends this node to whoever fed the failed peer, if it can.
                        url.push_str("&failed=");
                        url.extend(form_urlencoded::byte_serialize(f.as_str().as_bytes()));
                    }
                    (owner.clone(), url)
                }
            };
            let by_owner = peer == *owner;
            let before = ingest.len();
            // A peer the owner sent this node to may be starved by its own feeder, which
            // repairs that within one stall timeout: give it two.
            let idle = if by_owner {
                peers.stall
            } else {
                2 * peers.stall
            };
            let outcome = self.transfer(&url, ingest, idle).await;
            if ingest.len() > before && !contributors.contains(&peer) {
                contributors.push(peer.clone());
            }
            match outcome {
                Transfer::Complete => return Ok(()),
                Transfer::Parallel(sources, total) if by_owner && !direct => {
                    match self.parallel(owner, ingest, &sources, total).await {
                        Ok(()) => {
                            add_all(contributors, sources);
                            return Ok(());
                        }
                        Err(Fault::Local(why)) => {
                            add_all(contributors, sources);
                            return Err(OwnerFailure::Local(why));
                        }
                        Err(Fault::Source(why)) => {
                            // Parts from several peers: blame none of them; the owner serves the rest.
                            add_all(contributors, sources);
                            tracing::warn!(%digest, "parallel fetch given up ({why}); asking the owner for the rest");
                            failures = REDIRECTS_FAILED_MAX;
                        }
                    }
                }
                Transfer::Redirect(to) if by_owner && !direct => redirect = Some(to),
                Transfer::Redirect(_) | Transfer::Parallel(..) => {
                    return Err(OwnerFailure::Failed {
                        why: "redirected when asked to serve".into(),
                        feeding: false,
                    })
                }
                Transfer::Local(why) => return Err(OwnerFailure::Local(why)),
                Transfer::Declined if by_owner => return Err(OwnerFailure::Declined),
                Transfer::Failed(why) if by_owner => {
                    let feeding = ingest.len() > before;
                    return Err(OwnerFailure::Failed { why, feeding });
                }
                Transfer::Declined => {
                    failures += 1;
                    failed = Some(peer);
                }
                Transfer::Failed(why) => {
                    Counters::add(&app.counters.peer_fetch_failures, 1);
                    tracing::warn!(%digest, %peer, "peer failed mid-transfer ({why}); asking the owner for the rest");
                    peers.suspect(&peer);
                    failures += 1;
                    failed = Some(peer);
                }
            }
        }
        Err(OwnerFailure::Failed {
            why: "no peer could supply it".into(),
            feeding: false,
        })
    }

    /// One request to a peer for the rest of the blob (from the ingest's length on).
    /// `idle`: the longest pause in the body.
    async fn transfer(
        &self,
        url: &str,
        ingest: &mut Ingest,
        idle: std::time::Duration,
    ) -> Transfer {
        let Fetch {
            app,
            peers,
            repo,
            tx,
            ..
        } = *self;
        // The head comes once the peer knows the blob's size: an owner starting the download
        // waits for upstream's answer first (a token, a CDN redirect), so the head may take up
        // to upstream's response_timeout_ms. A dead or silent peer is caught sooner, by the
        // one-second connect timeout.
        let head_wait = app
            .mirrors
            .target(repo, None)
            .map(|t| std::time::Duration::from_millis(t.upstream.config.response_timeout_ms))
            .unwrap_or_default()
            .max(idle);
        let offset = ingest.len();
        let mut rb = peers.http.get(url);
        if let Some(me) = peers.me() {
            rb = rb.header(PEER_HEADER, me.as_str());
        }
        if offset > 0 {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = match tokio::time::timeout(head_wait, rb.send()).await {
            Err(_) => {
                return Transfer::Failed(format!("no answer within {} ms", head_wait.as_millis()))
            }
            Ok(Err(e)) => return Transfer::Failed(format!("request failed: {e}")),
            Ok(Ok(r)) => r,
        };
        match resp.status() {
            StatusCode::TEMPORARY_REDIRECT => {
                let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
                if let (Some(list), Some(size)) =
                    (header(super::SOURCES_HEADER), header(super::SIZE_HEADER))
                {
                    let sources: Option<Vec<PeerUrl>> = list
                        .split(',')
                        .map(|p| {
                            PeerUrl::parse(p.trim())
                                .ok()
                                .filter(|p| peers.is_member(p.as_str()))
                        })
                        .collect();
                    return match (sources, size.parse::<u64>()) {
                        (Some(s), Ok(size))
                            if !s.is_empty() && s.len() <= super::PARALLEL_SOURCES_MAX =>
                        {
                            Transfer::Parallel(s, size)
                        }
                        _ => Transfer::Failed(
                            "sent to sources that are not known peers, or without a size".into(),
                        ),
                    };
                }
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once("/v2/"))
                    .and_then(|(base, _)| PeerUrl::parse(base).ok());
                // Only to a peer this node knows: a peer cannot send it anywhere else.
                return match to {
                    Some(to) if peers.is_member(to.as_str()) && Some(&to) != peers.me() => {
                        Transfer::Redirect(to)
                    }
                    _ => Transfer::Failed("redirected to an unknown peer".into()),
                };
            }
            StatusCode::NOT_FOUND | StatusCode::SERVICE_UNAVAILABLE => return Transfer::Declined,
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {}
            s => return Transfer::Failed(format!("answered {s}")),
        }
        let skip = match resume(&resp, offset, tx) {
            Ok(skip) => skip,
            Err(why) => return Transfer::Failed(why),
        };
        if tx.borrow().total.is_none() {
            return Transfer::Failed("gave no length".into());
        }
        let c = &app.counters;
        match receive(
            resp.bytes_stream(),
            ingest,
            tx,
            idle,
            skip,
            &c.blob_fetch_peer_bytes,
            c,
        )
        .await
        {
            Ok(()) => Transfer::Complete,
            Err(Fault::Source(why)) => Transfer::Failed(why),
            Err(Fault::Local(why)) => Transfer::Local(why),
        }
    }

    /// Fetches the rest of the blob (from the ingest's length on) as byte ranges from `sources` at
    /// once, written at their offsets; the ingest takes in (hashes) the prefix as it fills, so
    /// followers stream it. A part whose source fails is asked of the owner directly. On an error,
    /// what was written past the prefix is cut: the caller goes on from the ingest's length.
    async fn parallel(
        &self,
        owner: &PeerUrl,
        ingest: &mut Ingest,
        sources: &[PeerUrl],
        total: u64,
    ) -> Result<(), Fault> {
        let Fetch {
            app,
            peers,
            digest,
            tx,
            ..
        } = *self;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        /// Parts start on MiB boundaries.
        const ALIGN_BYTES: u64 = 1 << 20;
        if total < ingest.len() {
            return Err(Fault::Source(format!(
                "the owner gave the size {total}, below the bytes held"
            )));
        }
        record_total(tx, total).map_err(|why| Fault::Source(format!("the owner {why}")))?;
        let start = ingest.len();
        let span = total - start;
        let per = span.div_ceil(sources.len() as u64).div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        let parts: Vec<(u64, u64)> = (0..sources.len() as u64)
            .map(|i| (start + i * per, (start + (i + 1) * per).min(total)))
            .filter(|(a, b)| a < b)
            .collect();
        let local = |e: std::io::Error| Fault::Local(format!("cannot be written here: {e}"));
        let writer = block(|| app.layout.ingest_parts(ingest)).map_err(local)?;
        let written: Vec<AtomicU64> = parts.iter().map(|_| AtomicU64::new(0)).collect();
        let finished = AtomicUsize::new(0);
        let wake = tokio::sync::Notify::new();
        let fetches = parts.iter().enumerate().map(|(i, &(a, b))| {
        let (writer, written, finished, wake) = (&writer, &written[i], &finished, &wake);
        let source = &sources[i];
        async move {
            let mut result = self.part(source, owner, (a, b), writer, written, wake).await;
            if let Err(Fault::Source(why)) = &result {
                Counters::add(&app.counters.peer_fetch_failures, 1);
                tracing::warn!(%digest, peer = %source, "part {a}-{b} failed ({why}); asking the owner");
                if source != owner {
                    peers.suspect(source);
                    result = self.part(owner, owner, (a, b), writer, written, wake).await;
                }
            }
            finished.fetch_add(1, Ordering::Release);
            wake.notify_one();
            result
        }
    });
        let absorb = async {
            loop {
                // The prefix: whole parts, then what the first unfinished one has.
                let mut to = start;
                for (i, &(a, b)) in parts.iter().enumerate() {
                    let w = written[i].load(Ordering::Acquire);
                    to = a + w;
                    if a + w < b {
                        break;
                    }
                }
                if to > ingest.len() {
                    block(|| ingest.absorb(to)).map_err(local)?;
                    tx.send_modify(|p| p.written = to);
                }
                if to == total || finished.load(Ordering::Acquire) == parts.len() {
                    return Ok::<(), Fault>(());
                }
                wake.notified().await;
            }
        };
        let (results, absorbed) =
            futures_util::future::join(futures_util::future::join_all(fetches), absorb).await;
        // This node's failure first: it is the one no other source would mend.
        let mut failures: Vec<Fault> = results.into_iter().filter_map(|r| r.err()).collect();
        failures.extend(absorbed.err());
        failures.sort_by_key(|f| !matches!(f, Fault::Local(_)));
        let failure = failures
            .into_iter()
            .next()
            .or_else(|| (ingest.len() < total).then(|| Fault::Source("parts missing".into())));
        match failure {
            None => Ok(()),
            Some(why) => {
                block(|| ingest.cut()).map_err(local)?;
                Err(why)
            }
        }
    }

    /// One byte range `a..b` from `source`, written at its offset (resuming after `written`).
    async fn part(
        &self,
        source: &PeerUrl,
        owner: &PeerUrl,
        (a, b): (u64, u64),
        writer: &lighter_layout::PartWriter,
        written: &std::sync::atomic::AtomicU64,
        wake: &tokio::sync::Notify,
    ) -> Result<(), Fault> {
        let Fetch {
            app,
            peers,
            repo,
            digest,
            ..
        } = *self;
        let source_fault = |why: String| Fault::Source(why);
        use futures_util::StreamExt;
        use std::sync::atomic::Ordering;
        let from = a + written.load(Ordering::Acquire);
        if from >= b {
            return Ok(());
        }
        let mode = if source == owner {
            "direct=1"
        } else {
            "sent_by_owner=1"
        };
        let url = format!(
            "{source}/v2/_lighter/peer/blobs/{digest}?{mode}&repo={}",
            repo.as_str()
        );
        let mut rb = peers
            .http
            .get(&url)
            .header(reqwest::header::RANGE, format!("bytes={from}-{}", b - 1));
        if let Some(me) = peers.me() {
            rb = rb.header(PEER_HEADER, me.as_str());
        }
        let resp = match tokio::time::timeout(peers.stall, rb.send()).await {
            Err(_) => {
                return Err(source_fault(format!(
                    "no answer within {} ms",
                    peers.stall.as_millis()
                )))
            }
            Ok(Err(e)) => return Err(source_fault(format!("request failed: {e}"))),
            Ok(Ok(r)) => r,
        };
        if resp.status() != StatusCode::PARTIAL_CONTENT || range_start(&resp) != Some(from) {
            return Err(source_fault(format!(
                "answered {} for bytes {from}-{}",
                resp.status(),
                b - 1
            )));
        }
        let mut stream = resp.bytes_stream();
        let c = &app.counters;
        loop {
            let chunk = match tokio::time::timeout(peers.stall, stream.next()).await {
                Err(_) => {
                    return Err(source_fault(format!(
                        "stalled for {} ms",
                        peers.stall.as_millis()
                    )))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(source_fault(format!("body broke: {e}"))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            let at = a + written.load(Ordering::Acquire);
            if at + chunk.len() as u64 > b {
                return Err(source_fault("sent more than the range".into()));
            }
            block(|| writer.write_at(at, &chunk))
                .map_err(|e| Fault::Local(format!("cannot be written here: {e}")))?;
            Counters::add(&c.blob_download_bytes, chunk.len() as u64);
            Counters::add(&c.blob_fetch_peer_bytes, chunk.len() as u64);
            written.fetch_add(chunk.len() as u64, Ordering::Release);
            wake.notify_one();
        }
        if a + written.load(Ordering::Acquire) < b {
            return Err(source_fault("ended early".into()));
        }
        Ok(())
    }
}

/// Tells the blob's owner that this node now holds the whole, verified blob, so it can be a
/// source of parts for the next nodes. Best effort, bounded by the stall timeout.
pub async fn report_held(peers: &Peers, digest: &Digest) {
    let (Some(me), Some(owner)) = (peers.me(), peers.ranked(digest).into_iter().next()) else {
        return;
    };
    if Some(&owner) == peers.me() {
        return;
    }
    let url = format!("{owner}/v2/_lighter/peer/blobs/{digest}?held=1");
    let rb = peers.http.post(&url).header(PEER_HEADER, me.as_str());
    if let Ok(Ok(r)) = tokio::time::timeout(peers.stall, rb.send()).await {
        tracing::debug!(%digest, %owner, status = r.status().as_u16(), "told the owner this node holds the blob");
    }
}

fn add_all(to: &mut Vec<PeerUrl>, more: Vec<PeerUrl>) {
    for p in more {
        if !to.contains(&p) {
            to.push(p);
        }
    }
}
