//! The documentation is self-contained: every relative link in README.md and docs/*.md points
//! at a file of the repository, no document refers to notes outside it (`../shared`,
//! `PLATFORM.md`, `DESIGN.md`), and README.md lists every document in docs/.
//!
//! Plain file reads, no VM: fast.

use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `vmm/`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent directory")
        .to_path_buf()
}

/// README.md and every docs/*.md, sorted.
fn doc_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    let docs = root.join("docs");
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap_or_else(|e| panic!("reading {}: {e}", docs.display()))
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md") && p.is_file())
        .collect();
    in_docs.sort();
    assert!(!in_docs.is_empty(), "no docs/*.md found");
    files.extend(in_docs);
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// One line of a document with its code removed: fenced blocks (``` or ~~~) are dropped
/// whole, inline code spans are blanked. What is left is the prose a reader sees as text.
struct ProseLine {
    number: usize,
    text: String,
}

fn prose_lines(doc: &str) -> Vec<ProseLine> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(f) = fence {
            if trimmed.starts_with(f) {
                fence = None;
            }
            continue;
        }
        if trimmed.starts_with("```") {
            fence = Some("```");
            continue;
        }
        if trimmed.starts_with("~~~") {
            fence = Some("~~~");
            continue;
        }
        out.push(ProseLine {
            number: i + 1,
            text: blank_code_spans(line),
        });
    }
    out
}

/// Replace every inline code span (`...`, also with longer backtick runs) by spaces.
fn blank_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&c| c == '`').count();
        // Find the closing run of exactly the same length.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                if r == run {
                    close = Some(j);
                    break;
                }
                j += r;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                out.extend(std::iter::repeat_n(' ', j + run - i));
                i = j + run;
            }
            None => {
                // An unmatched backtick run is literal text.
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// The targets of the markdown links on one line of prose: inline links and images
/// `[text](target)` / `![alt](target)`, and reference definitions `[id]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let trimmed = line.trim_start();
    if let Some(rest) = trimmed.strip_prefix('[') {
        if let Some(end) = rest.find("]:") {
            if !rest[..end].contains(']') {
                if let Some(t) = rest[end + 2..].split_whitespace().next() {
                    targets.push(t.to_string());
                }
                return targets;
            }
        }
    }
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(pos) = line[from..].find("](") {
        let open = from + pos + 2;
        // The link text must start with '[' before the "](".
        if !line[..from + pos].contains('[') {
            from = open;
            continue;
        }
        // The target runs to the matching ')' (balanced parentheses inside are allowed).
        let mut depth = 1;
        let mut end = None;
        for (k, &b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        let raw = line[open..end].trim();
        // Drop an optional title: [text](target "title").
        let target = raw.split_whitespace().next().unwrap_or("");
        let target = target
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .unwrap_or(target);
        targets.push(target.to_string());
        from = end + 1;
    }
    targets
}

/// Whether `target` leaves the repository or stays inside its own page: a URL with a scheme
/// (`https:`, `http:`, `mailto:`, ...) or a pure `#anchor`.
fn is_external_or_anchor(target: &str) -> bool {
    if target.starts_with('#') {
        return true;
    }
    match target.find(':') {
        Some(colon) => {
            let scheme = &target[..colon];
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                && scheme
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic())
        }
        None => false,
    }
}

/// Every relative link target of `doc` (the text of `file`) that does not name an existing
/// file or directory, as "file:line: target".
fn broken_links(file: &Path, doc: &str) -> Vec<String> {
    let dir = file.parent().expect("a document has a directory");
    let mut broken = Vec::new();
    for line in prose_lines(doc) {
        for target in link_targets(&line.text) {
            if is_external_or_anchor(&target) {
                continue;
            }
            let path = target.split('#').next().unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            if path.is_empty() || !dir.join(path).exists() {
                broken.push(format!("{}:{}: {target}", rel(file), line.number));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in doc_files() {
        let doc = read(&file);
        checked += prose_lines(&doc)
            .iter()
            .map(|l| link_targets(&l.text).len())
            .sum::<usize>();
        broken.extend(broken_links(&file, &doc));
    }
    assert!(
        checked > 0,
        "no links found at all: the link parser is broken"
    );
    assert!(
        broken.is_empty(),
        "links to files that do not exist in the repository:\n  {}",
        broken.join("\n  ")
    );
}

/// Names of notes that live outside the repository; a clone does not have them.
const OUTSIDE_NOTES: [&str; 3] = ["../shared", "PLATFORM.md", "DESIGN.md"];

/// Every mention of a note outside the repository in `doc`, as "file:line: name".
fn outside_mentions(file: &Path, doc: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        for name in OUTSIDE_NOTES {
            if line.contains(name) {
                found.push(format!("{}:{}: {name}", rel(file), i + 1));
            }
        }
    }
    found
}

#[test]
fn no_document_refers_to_notes_outside_the_repository() {
    let mut found = Vec::new();
    for file in doc_files() {
        found.extend(outside_mentions(&file, &read(&file)));
    }
    assert!(
        found.is_empty(),
        "documents refer to notes outside the repository (link to docs/platform.md or \
         docs/design.md instead):\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn readme_lists_every_document() {
    let root = repo_root();
    let readme = read(&root.join("README.md"));
    let linked: Vec<String> = prose_lines(&readme)
        .iter()
        .flat_map(|l| link_targets(&l.text))
        .collect();
    let missing: Vec<String> = doc_files()
        .iter()
        .skip(1)
        .map(|p| rel(p))
        .filter(|name| !linked.iter().any(|t| t.split('#').next() == Some(name)))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not link these documents (add them to its \"Documentation\" list):\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_checks_catch_what_they_are_for() {
    let root = repo_root();
    let file = root.join("docs").join("example.md");
    let doc = "\
# Example
[fine](architecture.md) and [anchor](#top) and [web](https://example.com/x) and
[mail](mailto:a@example.com) and [up](../README.md#layout) and [dir](../vmm)
[gone](no-such-file.md) and ![img](missing.svg \"title\") and [anchored](nope.md#part)
`[in code](not-checked.md)` and:
```
[in a block](not-checked-either.md)
```
[ref]: also-missing.md
see ../shared/DESIGN.md and PLATFORM.md
";
    let broken = broken_links(&file, doc);
    assert_eq!(
        broken,
        [
            "docs/example.md:4: no-such-file.md",
            "docs/example.md:4: missing.svg",
            "docs/example.md:4: nope.md#part",
            "docs/example.md:9: also-missing.md",
        ],
        "{broken:?}"
    );
    let mentions = outside_mentions(&file, doc);
    assert_eq!(
        mentions,
        [
            "docs/example.md:10: ../shared",
            "docs/example.md:10: PLATFORM.md",
            "docs/example.md:10: DESIGN.md",
        ],
        "{mentions:?}"
    );
}
