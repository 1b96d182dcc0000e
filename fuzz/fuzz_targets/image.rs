//! Any string either is refused or normalises to a reference that parses back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lighter_layout::ImageRef;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = ImageRef::parse(s) {
        let again = ImageRef::parse(&r.to_string()).expect("a normalised reference parses");
        assert_eq!(again, r);
    }
});
