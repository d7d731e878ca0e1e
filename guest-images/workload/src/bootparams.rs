//! Reading the Linux "zero page" (boot_params) the VMM passes in rsi.

/// Offset of hdr.cmd_line_ptr (u32).
const CMD_LINE_PTR: u64 = 0x228;
/// Offset of hdr.cmdline_size (u32).
const CMDLINE_SIZE: u64 = 0x238;
/// Offset of e820_entries (u8).
const E820_ENTRIES: u64 = 0x1e8;
/// Offset of e820_table (20-byte entries).
const E820_TABLE: u64 = 0x2d0;
/// Entries boot_params can hold.
const E820_MAX: usize = 128;
/// Longest command line we read.
const CMDLINE_MAX: usize = 4096;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;

/// One usable RAM range from the e820 table.
#[derive(Clone, Copy, Default)]
pub struct RamRange {
    pub start: u64,
    pub end: u64,
}

/// The boot_params page at a guest physical (= virtual) address.
pub struct BootParams {
    base: u64,
}

impl BootParams {
    pub fn new(base: u64) -> Self {
        BootParams { base }
    }

    fn read<T: Copy>(&self, offset: u64) -> T {
        // SAFETY: boot_params is a 4 KiB page of RAM identity-mapped with U/S=1 and every
        // offset used here lies inside it; read_unaligned copes with the packed layout.
        unsafe { core::ptr::read_unaligned((self.base + offset) as *const T) }
    }

    /// The NUL-terminated command line (empty if there is none).
    pub fn cmdline(&self) -> &'static [u8] {
        let ptr = u64::from(self.read::<u32>(CMD_LINE_PTR));
        if ptr == 0 {
            return &[];
        }
        let size = self.read::<u32>(CMDLINE_SIZE) as usize;
        let max = if size == 0 {
            CMDLINE_MAX
        } else {
            size.min(CMDLINE_MAX)
        };
        // SAFETY: the VMM put the command line in identity-mapped RAM; `max` bytes (at most
        // cmdline_size) are readable, and nothing writes them while the guest runs.
        let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, max) };
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(max);
        &bytes[..len]
    }

    /// Calls `f` for each usable RAM range of the e820 table.
    pub fn for_each_ram(&self, mut f: impl FnMut(RamRange)) {
        let n = usize::from(self.read::<u8>(E820_ENTRIES)).min(E820_MAX);
        for i in 0..n {
            let entry = E820_TABLE + 20 * i as u64;
            let addr: u64 = self.read(entry);
            let size: u64 = self.read(entry + 8);
            let kind: u32 = self.read(entry + 16);
            if kind == E820_RAM && size != 0 {
                f(RamRange {
                    start: addr,
                    end: addr.saturating_add(size),
                });
            }
        }
    }
}
