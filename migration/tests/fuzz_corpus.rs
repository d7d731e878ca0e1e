//! Replays the committed fuzz corpora of the wire-format targets (`fuzz/corpus/frame_reader`,
//! `decode`, `config_layout`) and the generated seeds through the very checks the fuzz targets
//! run (`fuzz/src/wire_checks.rs`), on stable Rust: an input the fuzzer once found interesting
//! keeps passing. See docs/fuzzing.md.
//!
//! `cargo test -p migration --test fuzz_corpus -- --ignored write_seeds` (re)writes the seed
//! files into the corpus directories.

#[allow(dead_code)]
#[path = "../../fuzz/src/wire_checks.rs"]
mod wire_checks;

#[path = "../../fuzz/src/corpus.rs"]
mod corpus;

use std::path::PathBuf;

#[global_allocator]
static ALLOC: wire_checks::TrackingAlloc = wire_checks::TrackingAlloc;

fn corpus_dir(target: &str) -> PathBuf {
    corpus::dir(env!("CARGO_MANIFEST_DIR"), target)
}

/// Every file of the target's corpus (sorted), with its name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    corpus::files(&corpus_dir(target))
}

/// Run `check` on every corpus file and seed of `target`; fails naming every input that panics.
fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    assert!(!files.is_empty(), "the {target} corpus is empty");
    let inputs = files
        .into_iter()
        .map(|(name, data)| (format!("fuzz/corpus/{target}/{name}"), data))
        .chain(
            wire_checks::seeds(target)
                .into_iter()
                .map(|(n, d)| (format!("seed {n}"), d)),
        );
    let mut failed = Vec::new();
    let mut count = 0;
    for (name, data) in inputs {
        count += 1;
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {count} {target} inputs fail (reproduce with `cargo +nightly fuzz run {target} FILE` in fuzz/):\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
}

#[test]
fn frame_reader_corpus_replays() {
    replay("frame_reader", wire_checks::check_frame_reader);
}

#[test]
fn decode_corpus_replays() {
    replay("decode", wire_checks::check_decode);
}

#[test]
fn config_layout_corpus_replays() {
    replay("config_layout", wire_checks::check_config_layout);
}

/// The seeds are what they claim: every sample frame reads back as itself.
#[test]
fn seeds_are_valid_frames() {
    let msgs = wire_checks::sample_messages();
    let seeds = wire_checks::seeds("frame_reader");
    for (msg, (name, frame)) in msgs.iter().zip(&seeds) {
        let mut reader = migration::wire::FrameReader::new(&frame[..], std::time::Duration::ZERO);
        if msg.kind() == migration::wire::Kind::Heartbeat {
            continue; // read skips heartbeats
        }
        let got = reader
            .read("seed")
            .unwrap_or_else(|e| panic!("seed {name}: {e}"));
        assert_eq!(&got, msg, "seed {name}");
    }
    let layout = wire_checks::small_layout();
    assert_eq!(layout.regions().len(), 5);
}

/// A reader that allocated for a header it should have refused is caught: the allocation probe
/// works in this binary.
#[test]
fn allocation_probe_sees_allocations() {
    let (v, largest) = wire_checks::largest_allocation_during(|| vec![0u8; 1 << 20]);
    assert_eq!(v.len(), 1 << 20);
    assert!(largest >= 1 << 20, "the probe saw {largest} bytes");
}

#[test]
#[ignore = "writes the seed files into fuzz/corpus"]
fn write_seeds() {
    for target in ["frame_reader", "decode", "config_layout"] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (name, data) in wire_checks::seeds(target) {
            std::fs::write(dir.join(name), data).expect("write a seed");
        }
    }
}
