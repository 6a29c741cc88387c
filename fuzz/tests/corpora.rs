//! Every committed input of every fuzz target (`fuzz/corpus/TARGET/`, and
//! the crashes found and fixed, `fuzz/regressions/TARGET/`), replayed on
//! stable as part of `cargo test`: the CI's fuzz smoke, and the regression
//! tests of what the fuzzers once found.

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for (name, target) in evrhost_fuzz::TARGETS {
        let mut seen = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else { continue };
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                let data = std::fs::read(&path).expect("a corpus file");
                target(&data);
                seen += 1;
            }
        }
        assert!(seen > 0, "target `{name}` has no committed corpus");
        replayed += seen;
    }
    println!("{replayed} inputs replayed");
}
