//! (Re)writes the fuzz seed corpus `host/fuzz/corpus/<target>/seed-*` from the
//! current encoders (docs/fuzzing.md). Run after a format change:
//!
//! ```sh
//! cargo run -p vp-host --example fuzz_seeds
//! ```

use std::path::Path;

use vp_host::fuzzing;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for t in fuzzing::TARGETS {
        let dir = corpus.join(t.name);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("seed-") {
                std::fs::remove_file(entry.path())?;
            }
        }
        let seeds = fuzzing::seeds(t.name);
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{}: {} seeds", t.name, seeds.len());
    }
    Ok(())
}
