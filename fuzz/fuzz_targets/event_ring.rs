//! Event rings as the control plane reads them: whatever bytes another process left in a ring
//! (its words and its records), the reader neither reads outside it nor takes more than asked,
//! and it never stops short of the writer but at a record too recent to take.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::event_ring(data));
