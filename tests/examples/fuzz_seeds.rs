//! Writes the fuzz seed corpus, `fuzz/corpus/<target>/<name>`, from the
//! project's own writers (see `tidemark_tests::fuzzing::seeds`). Run after
//! a format changes: `cargo run -p tidemark-tests --example fuzz_seeds`.

fn main() -> std::io::Result<()> {
    let root = tidemark_tests::workspace_root().join("fuzz/corpus");
    for (target, name, bytes) in tidemark_tests::fuzzing::seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("seeds written to {}", root.display());
    Ok(())
}
