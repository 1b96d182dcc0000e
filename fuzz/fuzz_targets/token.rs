//! Tokens at the data plane: whatever bytes arrive as a Bearer token, the per-core cache and
//! the verifier answer without panicking, and nothing but the genuine token is ever accepted:
//! the input either is the token (raw bytes) or flips bits of a genuine one (a mask), and any
//! token that verifies must be byte for byte the one that was signed.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::token(data));
