//! A parsed digest prints back to the same text and its hex is a safe file name.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::digest(data));
