//! A download's peer sources: the blob's owner, or the peer the owner sends this node to, with
//! a resume (Range from the byte the ingest holds) from the next source whenever one fails or
//! stalls for `peer_stall_timeout_ms`. What peers send is checked only as a whole, against the
//! digest, by the download that called this (a peer is never trusted).

use std::collections::HashSet;

use lighter_layout::{Digest, Ingest, RepoName};
use reqwest::StatusCode;
use tokio::sync::watch;

use super::{PeerUrl, Peers, PEER_HEADER};
use crate::api::App;
use crate::metrics::Counters;
use crate::mirror::{blob_total, range_start, receive, Progress};

/// Owners asked for one download before it goes upstream.
const OWNERS_MAX: usize = 3;

/// How one request to a peer ended.
enum Transfer {
    /// The ingest holds the whole blob.
    Complete,
    /// The owner sends this node to another peer.
    Redirect(PeerUrl),
    /// The peer has nothing (404) or serves enough peers already (503).
    Declined,
    /// Refused, reset, stalled or wrong: the peer is at fault.
    Failed(String),
}

/// Fetches as much of `digest` as the peers can give into `ingest` (the ingest may end
/// complete, partial, or as it was); returns the peers that sent bytes, for blame if the
/// digest does not match. The caller goes upstream for the rest.
pub async fn blob(
    app: &App,
    peers: &Peers,
    repo: &RepoName,
    digest: &Digest,
    ingest: &mut Ingest,
    tx: &watch::Sender<Progress>,
) -> Vec<PeerUrl> {
    let mut contributors = Vec::new();
    let mut asked = HashSet::new();
    for _ in 0..OWNERS_MAX {
        let Some(owner) = peers.ranked(digest).into_iter().next() else {
            break;
        };
        // This node owns it (or the owner failed already): upstream.
        if Some(&owner) == peers.me() || !asked.insert(owner.clone()) {
            break;
        }
        match from_owner(
            app,
            peers,
            &owner,
            repo,
            digest,
            ingest,
            tx,
            &mut contributors,
        )
        .await
        {
            Ok(()) => return contributors,
            // The owner is fine but cannot have it (upstream said no): upstream decides.
            Err(None) => break,
            Err(Some(why)) => {
                Counters::add(&app.counters.peer_fetch_failures, 1);
                tracing::warn!(%digest, %owner, "owner could not supply the blob: {why}");
                peers.suspect(&owner);
            }
        }
    }
    contributors
}

/// Asks the owner; follows one redirect; if the peer it was sent to fails, asks the owner
/// again to serve the rest itself. Err(Some(why)): the owner failed; Err(None): it declined.
#[allow(clippy::too_many_arguments)]
async fn from_owner(
    app: &App,
    peers: &Peers,
    owner: &PeerUrl,
    repo: &RepoName,
    digest: &Digest,
    ingest: &mut Ingest,
    tx: &watch::Sender<Progress>,
    contributors: &mut Vec<PeerUrl>,
) -> Result<(), Option<String>> {
    let mut failed: Option<PeerUrl> = None;
    let mut redirect: Option<PeerUrl> = None;
    // Owner, maybe a peer it names, then the owner directly: three requests at most.
    for _ in 0..3 {
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
                if let Some(f) = &failed {
                    url.push_str("&direct=1&failed=");
                    url.extend(form_urlencoded::byte_serialize(f.as_str().as_bytes()));
                }
                (owner.clone(), url)
            }
        };
        let by_owner = peer == *owner;
        let before = ingest.len();
        let outcome = transfer(app, peers, &url, ingest, tx).await;
        if ingest.len() > before && !contributors.contains(&peer) {
            contributors.push(peer.clone());
        }
        match outcome {
            Transfer::Complete => return Ok(()),
            Transfer::Redirect(to) if by_owner && failed.is_none() => redirect = Some(to),
            Transfer::Redirect(to) => return Err(Some(format!("redirected again, to {to}"))),
            Transfer::Declined if by_owner => return Err(None),
            Transfer::Failed(why) if by_owner => return Err(Some(why)),
            Transfer::Declined => failed = Some(peer),
            Transfer::Failed(why) => {
                Counters::add(&app.counters.peer_fetch_failures, 1);
                tracing::warn!(%digest, %peer, "peer failed mid-transfer ({why}); asking the owner for the rest");
                peers.suspect(&peer);
                failed = Some(peer);
            }
        }
    }
    Err(Some("no peer could supply it".into()))
}

/// One request to a peer for the rest of the blob (from the ingest's length on).
async fn transfer(
    app: &App,
    peers: &Peers,
    url: &str,
    ingest: &mut Ingest,
    tx: &watch::Sender<Progress>,
) -> Transfer {
    let offset = ingest.len();
    let mut rb = peers.http.get(url);
    if let Some(me) = peers.me() {
        rb = rb.header(PEER_HEADER, me.as_str());
    }
    if offset > 0 {
        rb = rb.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let resp = match tokio::time::timeout(peers.stall, rb.send()).await {
        Err(_) => {
            return Transfer::Failed(format!("no answer within {} ms", peers.stall.as_millis()))
        }
        Ok(Err(e)) => return Transfer::Failed(format!("request failed: {e}")),
        Ok(Ok(r)) => r,
    };
    match resp.status() {
        StatusCode::TEMPORARY_REDIRECT => {
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
        StatusCode::OK => {}
        StatusCode::PARTIAL_CONTENT if range_start(&resp) == Some(offset) => {}
        s => return Transfer::Failed(format!("answered {s}")),
    }
    let skip = if resp.status() == StatusCode::OK {
        offset
    } else {
        0
    };
    let Some(total) = blob_total(&resp, offset, skip) else {
        return Transfer::Failed("no length".into());
    };
    let known = tx.borrow().total;
    if known.is_some_and(|k| k != total) {
        return Transfer::Failed(format!(
            "size {total} differs from the {} known",
            known.unwrap_or(0)
        ));
    }
    tx.send_modify(|p| p.total = Some(total));
    let c = &app.counters;
    match receive(
        resp,
        ingest,
        tx,
        peers.stall,
        skip,
        &c.blob_fetch_peer_bytes,
        c,
    )
    .await
    {
        Ok(()) => Transfer::Complete,
        Err(why) => Transfer::Failed(why),
    }
}
