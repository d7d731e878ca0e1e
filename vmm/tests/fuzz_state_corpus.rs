//! Replays the committed corpus of the `state` fuzz target (`fuzz/corpus/state`) and the
//! generated seeds through the check the target runs (`fuzz/src/state_check.rs`), on stable
//! Rust. See docs/fuzzing.md.
//!
//! `cargo test -p vmm --test fuzz_state_corpus -- --ignored write_seeds` (re)writes the seed
//! files into the corpus directory.

#[allow(dead_code)]
#[path = "../../fuzz/src/state_check.rs"]
mod state_check;

#[path = "../../fuzz/src/corpus.rs"]
mod corpus;

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    corpus::dir(env!("CARGO_MANIFEST_DIR"), "state")
}

#[test]
fn state_corpus_replays() {
    let dir = corpus_dir();
    let files = corpus::files(&dir);
    assert!(!files.is_empty(), "the state corpus is empty");
    let mut inputs: Vec<_> = files
        .into_iter()
        .map(|(name, data)| (dir.join(name).display().to_string(), data))
        .collect();
    inputs.extend(
        state_check::seeds()
            .into_iter()
            .map(|(n, d)| (format!("seed {n}"), d)),
    );
    let count = inputs.len();
    let failed: Vec<_> = inputs
        .into_iter()
        .filter(|(_, data)| std::panic::catch_unwind(|| state_check::check_state(data)).is_err())
        .map(|(name, _)| name)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {count} state inputs fail (reproduce with `cargo +nightly fuzz run state FILE` in fuzz/):\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
}

/// The seeds decode: the corpus starts from real VM states.
#[test]
fn seeds_decode() {
    for (name, data) in state_check::seeds() {
        let state: vmm::vm::VmState =
            serde_json::from_slice(&data).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        assert!(state.vcpus.len() <= 2, "seed {name}");
    }
}

#[test]
#[ignore = "writes the seed files into fuzz/corpus/state"]
fn write_seeds() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    for (name, data) in state_check::seeds() {
        std::fs::write(dir.join(name), data).expect("write a seed");
    }
}
