//! Reading a committed corpus directory (`fuzz/corpus/TARGET`), for the stable-Rust replay tests
//! of the migration and vmm crates (migration/tests/fuzz_corpus.rs,
//! vmm/tests/fuzz_state_corpus.rs), which include this file with `#[path]`.

use std::path::{Path, PathBuf};

/// The corpus directory of `target`, from a crate directory next to fuzz/.
pub fn dir(manifest_dir: &str, target: &str) -> PathBuf {
    Path::new(manifest_dir).join("../fuzz/corpus").join(target)
}

/// Every file of the corpus in `dir` (sorted by path), with its file name and contents; panics
/// naming what could not be read.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", dir.display()));
    let mut files: Vec<_> = entries
        .map(|e| e.expect("corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, data)
        })
        .collect()
}
