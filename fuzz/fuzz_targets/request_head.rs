//! The data plane's connection state machine (`lighter_dataplane::conn`) fed arbitrary bytes in
//! arbitrary pieces, against an empty data directory with one mirrored upstream: it never
//! panics, every answer it writes starts with an HTTP/1.1 status line, and it only ever asks
//! to receive, send, hand over or close.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::request_head(data));
