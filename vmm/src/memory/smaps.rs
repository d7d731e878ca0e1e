//! This process's `/proc/self/smaps`, read for how guest RAM is mapped (huge pages, PMD-mapped
//! folios).

use std::collections::HashMap;
use std::io;

/// One mapping of smaps: its start address and its `Key: N kB` fields (in kB).
#[derive(Debug, Default)]
pub struct SmapsEntry {
    pub start: u64,
    pub kb: HashMap<String, u64>,
}

impl SmapsEntry {
    /// Field `key` (without the colon), 0 if the kernel did not print it.
    pub fn field(&self, key: &str) -> u64 {
        self.kb.get(key).copied().unwrap_or(0)
    }
}

/// Every mapping of this process, in smaps order.
pub fn read() -> io::Result<Vec<SmapsEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/smaps")?))
}

/// Parses smaps text: a header line `start-end perms ...` opens an entry, and each
/// `Key: N kB` line after it is one of its fields.
fn parse(text: &str) -> Vec<SmapsEntry> {
    let mut entries: Vec<SmapsEntry> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some(key) = first.strip_suffix(':') {
            if let (Some(entry), Some(Ok(v))) = (entries.last_mut(), words.next().map(str::parse)) {
                entry.kb.insert(key.to_string(), v);
            }
        } else if let Some((start, _)) = first.split_once('-') {
            if let Ok(start) = u64::from_str_radix(start, 16) {
                entries.push(SmapsEntry {
                    start,
                    ..SmapsEntry::default()
                });
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_their_fields_are_parsed() {
        let text = "7f0000000000-7f0000400000 rw-s 00000000 00:01 5 /memfd:x (deleted)\n\
                    Size:               4096 kB\n\
                    ShmemPmdMapped:     2048 kB\n\
                    VmFlags: rd wr sh mr mw me ms sd\n\
                    7f0000400000-7f0000401000 r--p 00000000 00:00 0\n\
                    Private_Hugetlb:       0 kB\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].start, 0x7f00_0000_0000);
        assert_eq!(e[0].field("ShmemPmdMapped"), 2048);
        assert_eq!(e[0].field("Size"), 4096);
        assert_eq!(e[1].field("ShmemPmdMapped"), 0);
        assert_eq!(e[1].start, 0x7f00_0040_0000);
    }

    #[test]
    fn this_process_has_mappings() {
        assert!(!read().unwrap().is_empty());
    }
}
