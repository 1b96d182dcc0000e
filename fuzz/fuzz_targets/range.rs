//! A partial answer always lies inside the body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lighter_layout::range::{answer, RangeAnswer};

fuzz_target!(|input: (Vec<u8>, u64)| {
    let (header, len) = input;
    if let RangeAnswer::Partial { start, end } = answer(Some(&header), len) {
        assert!(start <= end && end < len);
    }
});
