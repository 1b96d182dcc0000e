//! Any path either routes to validated values or is refused; a routed name, tag or digest never
//! contains anything that could escape the data directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::route(data));
