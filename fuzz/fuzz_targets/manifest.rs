//! Any bytes pushed as a manifest are refused or inspected to what `Inspected` promises.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::manifest(data));
