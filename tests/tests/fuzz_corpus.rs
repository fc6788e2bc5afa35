//! Replays the fuzz seed corpus (`fuzz/corpus/<target>/*`, including any
//! crash reproducers saved there) through the fuzz targets' code: no input
//! may panic, and the seeds made by the project's own writers must parse.

use tidemark_tests::fuzzing::{run, seeds, TARGETS};
use tidemark_tests::workspace_root;

#[test]
fn the_project_writers_output_is_accepted_by_every_parser() {
    let seeds = seeds();
    for target in TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| t == target),
            "no seed for fuzz target {target}"
        );
    }
    for (target, name, bytes) in &seeds {
        assert!(run(target, bytes), "{target}: seed {name} was rejected");
    }
}

#[test]
fn every_corpus_file_replays_without_panic() {
    let root = workspace_root().join("fuzz/corpus");
    let mut replayed = 0;
    for target in TARGETS {
        let dir = root.join(target);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run `cargo run -p tidemark-tests --example fuzz_seeds`",
                    dir.display()
                )
            })
            .flatten()
            .collect();
        assert!(!entries.is_empty(), "{} is empty", dir.display());
        for entry in entries {
            let bytes = std::fs::read(entry.path()).expect("corpus file");
            run(target, &bytes);
            // Every truncation too: torn writes and short reads.
            for cut in [0, 1, bytes.len() / 2, bytes.len().saturating_sub(1)] {
                run(target, &bytes[..cut.min(bytes.len())]);
            }
            replayed += 1;
        }
    }
    assert!(replayed >= TARGETS.len());
}
