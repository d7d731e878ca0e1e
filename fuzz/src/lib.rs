//! The checks the fuzz targets run. They live in plain files so the normal test suite can replay
//! the committed corpora through exactly the same code on stable Rust:
//! `migration/tests/fuzz_corpus.rs` includes [`wire_checks`], `vmm/tests/fuzz_state_corpus.rs`
//! includes [`state_check`] (with `#[path]`). See docs/fuzzing.md for the targets and how to run
//! them.

pub mod state_check;
pub mod wire_checks;
