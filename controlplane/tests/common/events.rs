//! Reading the event log as a client does (`GET /v2/_lighter/events`), waiting for the drain:
//! it runs on CPU time nothing else wants, so a line may take a while on a busy machine.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::Server;

/// Longest wait for lines to reach the log.
const WAIT: Duration = Duration::from_secs(30);

/// The events matching `query` (asserting a 200 of JSON lines), waiting until `done` says they
/// are all there; the last answer once `WAIT` has passed.
pub fn events_until(server: &Server, query: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = Server::client()
            .get(server.url(&format!("/v2/_lighter/events?{query}")))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{query}");
        assert_eq!(r.headers()["content-type"], "application/x-ndjson");
        let lines: Vec<Value> = r
            .text()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        if done(&lines) || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The events matching `query`, once there are at least `want` (or `WAIT` has passed).
pub fn events(server: &Server, query: &str, want: usize) -> Vec<Value> {
    events_until(server, query, |l| l.len() >= want)
}
