//! Recognizes the project's workload guest by its ELF note.
//!
//! The workload guest carries a PT_NOTE with name `VMM-WORKLOAD`, type 1 and a 4-byte version;
//! with it, every vCPU starts at the ELF entry point (rdi = vCPU index, rdx = vCPU count) instead of
//! only the BSP (see `guest-images/workload/README.md`).

use std::io::{self, Read, Seek, SeekFrom};

const NOTE_NAME: &[u8] = b"VMM-WORKLOAD\0";
const NOTE_TYPE: u32 = 1;
const PT_NOTE: u32 = 4;
/// Largest note segment we are willing to read.
const MAX_NOTE_SIZE: u64 = 64 * 1024;

/// True if the ELF file carries the workload note. Reads only headers and note segments.
pub fn has_workload_note<R: Read + Seek>(f: &mut R) -> io::Result<bool> {
    let mut ehdr = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut ehdr)?;
    if &ehdr[0..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(false); // not ELF64 little-endian: the ELF loader reports the error
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([ehdr[54], ehdr[55]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]) as u64;
    if phentsize < 56 {
        return Ok(false);
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        f.read_exact(&mut ph)?;
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default());
        if p_type != PT_NOTE {
            continue;
        }
        let off = u64::from_le_bytes(ph[8..16].try_into().unwrap_or_default());
        let size = u64::from_le_bytes(ph[32..40].try_into().unwrap_or_default());
        if size > MAX_NOTE_SIZE {
            continue;
        }
        let mut buf = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut buf)?;
        if notes_contain_workload(&buf) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn notes_contain_workload(mut buf: &[u8]) -> bool {
    let align4 = |n: usize| (n + 3) & !3;
    while buf.len() >= 12 {
        let namesz = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let descsz = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        let ntype = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        let name_end = 12 + namesz;
        let next = 12 + align4(namesz) + align4(descsz);
        if name_end > buf.len() {
            return false;
        }
        if ntype == NOTE_TYPE && &buf[12..name_end] == NOTE_NAME {
            return true;
        }
        if next > buf.len() {
            return false;
        }
        buf = &buf[next..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(name);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn finds_the_note_after_others() {
        let mut buf = note(b"Xen\0", 18, &[0; 8]);
        buf.extend(note(NOTE_NAME, NOTE_TYPE, &1u32.to_le_bytes()));
        assert!(notes_contain_workload(&buf));
    }

    #[test]
    fn rejects_other_and_truncated_notes() {
        assert!(!notes_contain_workload(&note(b"GNU\0", 1, &[0; 4])));
        let buf = note(NOTE_NAME, NOTE_TYPE, &1u32.to_le_bytes());
        assert!(!notes_contain_workload(&buf[..14]));
        assert!(!notes_contain_workload(&note(NOTE_NAME, 2, &[0; 4])));
    }
}
