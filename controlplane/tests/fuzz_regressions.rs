//! Every fuzz target's check (`fuzz/checks.rs`, shared with the targets) over every seed
//! (`fuzz/seeds/<target>/`) and every crash input kept (`fuzz/regressions/<target>/`), in
//! `cargo test`: a crash found once stays fixed, and the checks run on a stable compiler
//! without cargo-fuzz.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::Path;

#[test]
fn every_seed_and_kept_crash_input_passes_its_fuzz_check() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut ran = 0;
    let mut failed = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(targets) = std::fs::read_dir(fuzz.join(kind)) else {
            continue;
        };
        for target in targets.flatten().filter(|t| t.path().is_dir()) {
            let name = target.file_name().to_string_lossy().into_owned();
            let check = checks::by_name(&name)
                .unwrap_or_else(|| panic!("fuzz/{kind}/{name}: no fuzz target of that name"));
            for input in std::fs::read_dir(target.path()).unwrap().flatten() {
                let bytes = std::fs::read(input.path()).unwrap();
                ran += 1;
                if std::panic::catch_unwind(|| check(&bytes)).is_err() {
                    failed.push(input.path().display().to_string());
                }
            }
        }
    }
    assert!(
        ran >= 20,
        "only {ran} inputs found under {}",
        fuzz.display()
    );
    assert!(failed.is_empty(), "fuzz checks failed on {failed:?}");
}
