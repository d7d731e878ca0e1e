//! The zero page (`boot_params`) and the e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::GuestMemoryMmap;

use super::{mptable, write_obj, BootError, HIMEM_START, ZERO_PAGE_START};
use crate::memory::GuestRam;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// "HdrS": marks a filled-in setup header.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Loader type "undefined" (0xff): we are not a registered boot loader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment Linux expects when it relocates itself.
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Start of the legacy EBDA/VGA/BIOS hole below 1 MiB.
const EBDA_START: u64 = mptable::MPTABLE_START;

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write(
    mem: &GuestMemoryMmap,
    ram: &GuestRam,
    hdr_from_kernel: Option<setup_header>,
    cmdline_addr: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = hdr_from_kernel {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = cmdline_addr as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram.e820_ram() {
        // Low memory below 1 MiB is described above; RAM from 1 MiB on is usable.
        let s = start.max(HIMEM_START);
        let end = start + len;
        if end > s {
            entries.push((s, end - s, E820_RAM));
        }
    }
    if entries.len() > params.e820_table.len() {
        return Err(BootError::E820Overflow {
            count: entries.len(),
        });
    }
    for (i, (addr, size, ty)) in entries.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = entries.len() as u8;
    write_obj(mem, params, ZERO_PAGE_START)
}
