//! What a drain took from the rings and the queue, formatted at once: lines in one arena,
//! each with its time and, for a pull that counts, where the usage summary's text is.
//!
//! A record is read once (copied from its ring slot) and formatted once; the drain then sorts
//! small items by time, writes the lines that are old enough in that order, hands their pulls
//! to the usage summary without reading anything back, and keeps the rest (formatted, a few
//! hundred bytes each) for the next drain. Nothing grows with the log; the arenas keep their
//! capacity from one drain to the next.

use lighter_layout::events::Record;
use serde_json::Value;

use super::format::{self, Span};
use super::Event;
use crate::usage::{hash, Kind, Pull};

/// Lines taken but not yet written.
#[derive(Default)]
pub(super) struct Taken {
    bytes: Vec<u8>,
    /// Bytes of `bytes` whose items were written (reclaimed by [`Taken::retire_ready`]).
    dead: usize,
    items: Vec<Item>,
    /// Items (from the start of `items`, once sorted) old enough to write.
    ready: usize,
}

struct Item {
    time_unix_us: u64,
    /// Where the item's bytes start in the arena: its line, then any text its pull needed
    /// copied out (escaped in the line).
    start: u32,
    line_len: u32,
    extent: u32,
    pull: Option<PullAt>,
}

/// A pull that counts, with its text as spans from the item's start.
struct PullAt {
    kind: Kind,
    bytes: u64,
    repository: Span,
    reference: Span,
    /// Empty: none.
    digest: Span,
    client: Option<u64>,
    identity: Option<u64>,
}

impl Taken {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Formats a data plane record.
    pub fn push_record(&mut self, r: &Record, core: Option<u64>) {
        let start = self.bytes.len();
        let spans = format::line(&mut self.bytes, r, core);
        let line_len = self.bytes.len() - start;
        let kind = r.action().and_then(|a| Kind::of(a.name()));
        let pull = match kind {
            Some(kind) if (200..300).contains(&r.status) && r.repository_len > 0 => {
                let client = (spans.client.len > 0).then(|| hash(self.at(start, spans.client)));
                let identity = (r.identity_len > 0)
                    .then(|| hash(String::from_utf8_lossy(r.identity_bytes()).as_bytes()));
                let (repository, reference, digest) = match spans.verbatim {
                    true => (spans.repository, spans.reference, spans.digest),
                    false => (
                        self.copy_out(start, r.repository_bytes()),
                        self.copy_out(start, r.reference_bytes()),
                        self.copy_out(start, r.digest_bytes()),
                    ),
                };
                Some(PullAt {
                    kind,
                    bytes: r.bytes_sent,
                    repository,
                    reference,
                    digest,
                    client,
                    identity,
                })
            }
            _ => None,
        };
        self.push_item(r.time_unix_us, start, line_len, pull);
    }

    /// Formats one of the control plane's events (a pull it answered counts like a record).
    pub fn push_event(&mut self, e: &Event) {
        let start = self.bytes.len();
        format::event_line(&mut self.bytes, e);
        let line_len = self.bytes.len() - start;
        let text = |k: &str| e.fields.get(k).and_then(Value::as_str).unwrap_or("");
        let status = e.fields.get("status").and_then(Value::as_u64).unwrap_or(0);
        let pull = match Kind::of(e.action) {
            Some(kind) if (200..300).contains(&status) && !text("repository").is_empty() => {
                let h = |k: &str| {
                    Some(text(k))
                        .filter(|s| !s.is_empty())
                        .map(|s| hash(s.as_bytes()))
                };
                Some(PullAt {
                    kind,
                    bytes: e.fields.get("bytes").and_then(Value::as_u64).unwrap_or(0),
                    repository: self.copy_out(start, text("repository").as_bytes()),
                    reference: self.copy_out(start, text("reference").as_bytes()),
                    digest: self.copy_out(start, text("digest").as_bytes()),
                    client: h("client"),
                    identity: h("identity"),
                })
            }
            _ => None,
        };
        self.push_item(e.time_unix_us, start, line_len, pull);
    }

    fn push_item(
        &mut self,
        time_unix_us: u64,
        start: usize,
        line_len: usize,
        pull: Option<PullAt>,
    ) {
        self.items.push(Item {
            time_unix_us,
            start: start as u32,
            line_len: line_len as u32,
            extent: (self.bytes.len() - start) as u32,
            pull,
        });
    }

    fn at(&self, start: usize, s: Span) -> &[u8] {
        let from = start + s.start as usize;
        &self.bytes[from..from + s.len as usize]
    }

    /// Appends `raw` (as UTF-8, lossy) after the item that starts at `start`; its span.
    fn copy_out(&mut self, start: usize, raw: &[u8]) -> Span {
        let text = String::from_utf8_lossy(raw);
        let from = self.bytes.len();
        self.bytes.extend_from_slice(text.as_bytes());
        Span {
            start: (from - start) as u32,
            len: text.len() as u32,
        }
    }

    /// Orders the items by time (stable: each ring's and the queue's order is kept among equal
    /// times) and marks those older than `cutoff` ready; how many are.
    pub fn sort(&mut self, cutoff: u64) -> usize {
        // Each ring's records and the queue's events are nearly in order already: the stable
        // sort merges those runs.
        self.items.sort_by_key(|i| i.time_unix_us);
        self.ready = self.items.partition_point(|i| i.time_unix_us < cutoff);
        self.ready
    }

    /// The ready lines, in order, appended to `out`.
    pub fn write_ready(&self, out: &mut Vec<u8>) {
        for i in &self.items[..self.ready] {
            let s = i.start as usize;
            out.extend_from_slice(&self.bytes[s..s + i.line_len as usize]);
        }
    }

    /// The pulls of the ready lines.
    pub fn ready_pulls(&self) -> impl Iterator<Item = Pull<'_>> {
        self.items[..self.ready].iter().filter_map(|i| {
            let p = i.pull.as_ref()?;
            let start = i.start as usize;
            // SAFETY: a pull's spans are UTF-8: printable ASCII the line took verbatim, or
            // text copied out through `from_utf8_lossy` (`push_record`, `push_event`).
            let text = |s: Span| unsafe { std::str::from_utf8_unchecked(self.at(start, s)) };
            let (repository, reference, digest) =
                (text(p.repository), text(p.reference), text(p.digest));
            Some(Pull {
                time_unix_us: i.time_unix_us,
                kind: p.kind,
                repository,
                reference,
                digest: Some(digest).filter(|d| !d.is_empty()),
                bytes: p.bytes,
                client: p.client,
                identity: p.identity,
            })
        })
    }

    /// Forgets the ready items (written), keeping the rest for the next drain. Their bytes
    /// stay where they are until the written ones are half the arena; then the rest moves
    /// into `spare` (which becomes the arena). A line waiting out `ORDER_SLACK_US` over many
    /// busy drains is so moved about once, not at every drain.
    pub fn retire_ready(&mut self, spare: &mut Vec<u8>) {
        for i in self.items.drain(..self.ready) {
            self.dead += i.extent as usize;
        }
        self.ready = 0;
        if self.items.is_empty() {
            self.bytes.clear();
            self.dead = 0;
        } else if self.dead * 2 >= self.bytes.len() {
            spare.clear();
            for i in &mut self.items {
                let s = i.start as usize;
                let start = spare.len();
                spare.extend_from_slice(&self.bytes[s..s + i.extent as usize]);
                i.start = start as u32;
            }
            std::mem::swap(&mut self.bytes, spare);
            self.dead = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lighter_layout::events::Action;

    fn record(t: u64, action: Action, repo: &str, status: u16, agent: &[u8]) -> Record {
        let mut r = Record::empty();
        r.start(action, repo, &["v1"]);
        r.set_digest(&["sha256:", "ab"]);
        r.set_agent(agent);
        r.set_client(Some("10.1.2.3".parse().unwrap()));
        r.set_identity(b"ci-bot");
        r.status = status;
        r.bytes_sent = 100;
        r.time_unix_us = t;
        r
    }

    #[test]
    fn lines_come_out_in_time_order_and_the_rest_is_kept_whole() {
        let mut t = Taken::default();
        t.push_record(&record(30, Action::ManifestGet, "b", 200, b"x"), Some(0));
        t.push_record(
            &record(10, Action::ManifestGet, "a", 200, b"\"quoted\""),
            Some(1),
        );
        t.push_record(&record(20, Action::BlobGet, "c", 404, b"x"), Some(1));
        assert_eq!(t.sort(25), 2);
        let mut out = Vec::new();
        t.write_ready(&mut out);
        let lines: Vec<Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["repository"], "a");
        assert_eq!(lines[0]["user_agent"], "\"quoted\"");
        assert_eq!(lines[1]["status"], 404);
        // Only the 2xx pull counts, with its text and hashes.
        let pulls: Vec<_> = t.ready_pulls().collect();
        assert_eq!(pulls.len(), 1);
        assert_eq!((pulls[0].repository, pulls[0].reference), ("a", "v1"));
        assert_eq!(pulls[0].digest, Some("sha256:ab"));
        assert_eq!(pulls[0].client, Some(hash(b"10.1.2.3")));
        assert_eq!(pulls[0].identity, Some(hash(b"ci-bot")));
        drop(pulls);
        let mut spare = Vec::new();
        t.retire_ready(&mut spare);
        assert_eq!(t.items.len(), 1);
        assert_eq!(t.sort(u64::MAX), 1);
        let pulls: Vec<_> = t.ready_pulls().collect();
        assert_eq!(pulls[0].repository, "b");
        let mut out = Vec::new();
        t.write_ready(&mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time_unix_us"], 30);
        t.retire_ready(&mut spare);
        assert!(t.is_empty());
        assert!(t.bytes.is_empty(), "nothing left: the arena starts over");
    }

    #[test]
    fn held_lines_move_only_when_written_ones_are_half_the_arena() {
        let mut t = Taken::default();
        let mut spare = Vec::new();
        let mut written = Vec::new();
        // Each round (a busy drain) takes 10 lines and writes the 10 oldest; 50 wait (the
        // order slack is five drains long). They used to move at every drain; now only when
        // the written bytes are half the arena: each byte moves at most once on average.
        let (mut moves, mut moved, mut retired) = (0, 0, 0);
        for round in 0..40u64 {
            for k in 0..10 {
                let time = round * 10 + k;
                let repo = format!("r{time}");
                t.push_record(&record(time, Action::BlobGet, &repo, 200, b"x"), None);
            }
            let ready = t.sort((round * 10).saturating_sub(40));
            assert_eq!(ready, if round < 5 { 0 } else { 10 }, "round {round}");
            let mut out = Vec::new();
            t.write_ready(&mut out);
            written.extend(
                out.split(|&b| b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|l| serde_json::from_slice::<Value>(l).unwrap()),
            );
            retired += t.items[..ready]
                .iter()
                .map(|i| i.extent as usize)
                .sum::<usize>();
            let before = t.bytes.as_ptr();
            t.retire_ready(&mut spare);
            if t.bytes.as_ptr() != before {
                moves += 1;
                moved += t.bytes.len();
            }
            assert!(t.dead * 2 < t.bytes.len().max(1), "round {round}");
        }
        assert!(
            (4..=10).contains(&moves),
            "moved {moves} times in 40 rounds"
        );
        assert!(
            moved <= retired,
            "moved {moved} bytes for {retired} written"
        );
        // Every line written once, in time order, whole.
        let times: Vec<u64> = written
            .iter()
            .map(|v| v["time_unix_us"].as_u64().unwrap())
            .collect();
        assert_eq!(times, (0..350).collect::<Vec<_>>());
        assert!(written
            .iter()
            .all(|v| v["repository"] == format!("r{}", v["time_unix_us"])));
    }

    #[test]
    fn escaped_text_is_counted_unescaped() {
        let mut t = Taken::default();
        let mut r = record(5, Action::ManifestGet, "odd\"repo", 200, b"x");
        r.set_identity("bot\n".as_bytes());
        t.push_record(&r, None);
        t.sort(u64::MAX);
        let p: Vec<_> = t.ready_pulls().collect();
        assert_eq!(p[0].repository, "odd\"repo");
        assert_eq!(p[0].identity, Some(hash(b"bot\n")));
    }
}
