//! Any path either routes to validated values or is refused; a routed name, tag or digest never
//! contains anything that could escape the data directory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lighter_layout::{route, Reference, Route};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Ok(r) = route::parse(path) {
        let name = match &r {
            Route::Blob { name, .. }
            | Route::UploadStart { name }
            | Route::Upload { name, .. }
            | Route::Manifest { name, .. }
            | Route::Tags { name }
            | Route::Referrers { name, .. } => name.as_str(),
            // A peer's blob: only the digest becomes a path (and containerd's store's path).
            Route::PeerBlob { digest } => {
                assert!(digest.hex().bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
                return;
            }
            Route::Base
            | Route::Catalog
            | Route::Prefetch
            | Route::Metrics
            | Route::Gc
            | Route::Token => return,
        };
        assert!(!name.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('_')));
        assert!(!name.contains(['\0', '%', '\\']));
        if let Route::Manifest { reference: Reference::Tag(t), .. } = &r {
            assert!(!t.as_str().contains(['/', '\0']) && !t.as_str().starts_with('.'));
        }
    }
});
