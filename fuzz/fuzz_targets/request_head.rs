//! The data plane's connection state machine (`lighter_dataplane::conn`) fed arbitrary bytes in
//! arbitrary pieces, against an empty data directory with one mirrored upstream: it never
//! panics, every answer it writes starts with an HTTP/1.1 status line, and it only ever asks
//! to receive, send, hand over or close.
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use lighter_dataplane::conn::{Conn, Ctx, Step};
use lighter_dataplane::Mirror;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let dir = std::env::temp_dir().join("lighter-fuzz-empty-data-dir");
    let _ = std::fs::create_dir_all(&dir);
    let ctx = Ctx {
        layout: lighter_layout::Layout::open(&dir),
        cache: Default::default(),
        mirrors: vec![Mirror::new("docker.io", 1000), Mirror::new("registry.corp:8443", 1000)],
        now: Instant::now(),
        idle_timeout_ms: 1000,
        request_header_timeout_ms: 1000,
        access: None,
    };
    let mut c = Conn::new(8192, None, &ctx);
    let piece = usize::from(cut % 64) + 1;
    let mut pieces = bytes.chunks(piece);
    // Bounded: each round either consumes a piece or ends.
    for _ in 0..=bytes.len() + 1 {
        match c.step() {
            Step::SendHead => {
                let head = c.head_pending();
                assert!(head.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(head));
                let n = head.len();
                c.on_head_sent(n, &ctx);
            }
            // An empty data directory: nothing to send a body from, but stay safe if so.
            Step::SendBody => c.on_body_eof(),
            // No control plane here: as when the control socket refuses.
            Step::Handoff => c.handoff_failed(),
            Step::Close => return,
            Step::Recv => {
                let Some(p) = pieces.next() else { return };
                let space = c.recv_space();
                if space.len() < p.len() {
                    return;
                }
                space[..p.len()].copy_from_slice(p);
                c.on_recv(p.len(), &ctx);
            }
        }
    }
});
