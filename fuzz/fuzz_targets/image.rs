//! Any string either is refused or normalises to a reference that parses back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::image(data));
