//! Any string either is refused or normalises to a reference that parses back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lighter_layout::ImageRef;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = ImageRef::parse(s) {
        let normal = r.to_string();
        // Normalising adds at most `docker.io/library/` and `:latest`.
        assert!(normal.len() <= s.len() + 32, "{normal}");
        if normal.len() <= lighter_layout::image::IMAGE_REF_LENGTH_MAX {
            let again = ImageRef::parse(&normal).expect("a normalised reference parses");
            assert_eq!(again, r);
        }
    }
});
