//! Booting a guest: loading the kernel (bzImage or ELF), the initrd and the command line, and
//! writing what the 64-bit Linux boot protocol expects in guest memory (zero page, e820 map,
//! GDT, identity page tables, MP table).
//!
//! Low guest memory layout:
//! | address    | what                                   |
//! |------------|----------------------------------------|
//! | 0x500      | boot GDT                               |
//! | 0x520      | boot IDT (empty)                       |
//! | 0x7000     | zero page (`boot_params`)              |
//! | 0x8ff0     | boot stack top (BSP)                   |
//! | 0x9000     | PML4, 0xa000 PDPT, 0xb000 PD           |
//! | 0x20000    | kernel command line                    |
//! | 0x9fc00    | MP floating pointer and table          |
//! | 0x100000   | kernel (or the workload guest)         |

pub mod long_mode;
pub mod mptable;
pub mod workload_note;
pub mod zero_page;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::GuestRam;

/// Where the zero page lives.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the BSP's boot stack.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Where the command line lives.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Offset of the 64-bit entry point inside a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY_OFFSET: u64 = 0x200;
/// Default Linux command line when the user gives none.
pub const DEFAULT_LINUX_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 nomodules";

/// Errors while loading and preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF (vmlinux) nor a bzImage kernel (first bytes {magic:02x?})")]
    UnknownKernelFormat { path: PathBuf, magic: [u8; 4] },
    #[error("loading ELF kernel {path} failed: {source}")]
    LoadElf {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("loading bzImage kernel {path} failed: {source}")]
    LoadBzImage {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("writing initrd into guest memory failed: {0}")]
    WriteInitrd(#[source] vm_memory::GuestMemoryError),
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("invalid kernel command line: {source} (command line: {user:?})")]
    UserCmdline {
        user: String,
        #[source]
        source: linux_loader::cmdline::Error,
    },
    #[error("writing the kernel command line into guest memory failed: {0}")]
    LoadCmdline(#[source] loader::Error),
    #[error("writing boot structures into guest memory failed: {what}: {source}")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("writing boot structures into guest memory failed: at {addr:#x}: {source}")]
    GuestWriteAt {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("writing boot structures into guest memory failed: {count} e820 entries do not fit the zero page")]
    E820Overflow { count: usize },
    #[error(
        "guest memory of {0} bytes is too small to boot (need at least 2 MiB plus the kernel)"
    )]
    MemoryTooSmall(u64),
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyVcpus(u8),
}

/// What kind of guest was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// A Linux kernel: only the BSP starts; APs wait for INIT/SIPI.
    Linux,
    /// The project's workload guest (carries the `VMM-WORKLOAD` ELF note): every vCPU starts at
    /// the entry point.
    Workload,
}

/// Everything the vCPUs need to start.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub entry: u64,
    pub kind: GuestKind,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: u8,
    /// TSC frequency, appended to the workload guest's command line.
    pub tsc_khz: Option<u32>,
}

/// Loads the kernel, initrd and command line into `ram` and writes the boot structures.
pub fn load(ram: &GuestRam, cfg: &BootConfig) -> Result<BootInfo, BootError> {
    let mem = ram.guest_memory();
    if ram.size() < HIMEM_START + (1 << 20) {
        return Err(BootError::MemoryTooSmall(ram.size()));
    }
    let mut kernel = File::open(&cfg.kernel).map_err(|source| BootError::OpenKernel {
        path: cfg.kernel.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .map_err(|source| BootError::ReadKernel {
            path: cfg.kernel.clone(),
            source,
        })?;
    let (entry, kind, setup_hdr) = if &magic == b"\x7fELF" {
        let kind = if workload_note::has_workload_note(&mut kernel).map_err(|source| {
            BootError::ReadKernel {
                path: cfg.kernel.clone(),
                source,
            }
        })? {
            GuestKind::Workload
        } else {
            GuestKind::Linux
        };
        let res = Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(
            |source| BootError::LoadElf {
                path: cfg.kernel.clone(),
                source,
            },
        )?;
        // The ELF loader reports where it loaded; the entry point is in the ELF header.
        let entry = elf_entry(&mut kernel).map_err(|source| BootError::ReadKernel {
            path: cfg.kernel.clone(),
            source,
        })?;
        (entry, kind, res.setup_header)
    } else if is_bzimage(&mut kernel).unwrap_or(false) {
        let res = BzImage::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(
            |source| BootError::LoadBzImage {
                path: cfg.kernel.clone(),
                source,
            },
        )?;
        (
            res.kernel_load.0 + BZIMAGE_ENTRY_OFFSET,
            GuestKind::Linux,
            res.setup_header,
        )
    } else {
        return Err(BootError::UnknownKernelFormat {
            path: cfg.kernel.clone(),
            magic,
        });
    };
    let cmdline = build_cmdline(cfg, kind)?;
    loader::load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();

    let initrd = match &cfg.initrd {
        Some(path) => Some(load_initrd(&mem, ram, path, setup_hdr.as_ref())?),
        None => None,
    };

    long_mode::write_boot_tables(&mem).map_err(|source| BootError::GuestWrite {
        what: "the GDT and the identity page tables",
        source,
    })?;
    if kind == GuestKind::Linux {
        mptable::write(&mem, cfg.vcpus)?;
    }
    zero_page::write(&mem, ram, setup_hdr, CMDLINE_START, cmdline_len, initrd)?;
    Ok(BootInfo { entry, kind })
}

fn build_cmdline(cfg: &BootConfig, kind: GuestKind) -> Result<Cmdline, BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let user = match (&cfg.cmdline, kind) {
        (Some(s), _) => s.clone(),
        (None, GuestKind::Linux) => DEFAULT_LINUX_CMDLINE.to_string(),
        (None, GuestKind::Workload) => String::new(),
    };
    if !user.trim().is_empty() {
        cl.insert_str(user.trim())
            .map_err(|source| BootError::UserCmdline {
                user: user.clone(),
                source,
            })?;
    }
    if kind == GuestKind::Workload {
        if let Some(khz) = cfg.tsc_khz {
            cl.insert("tsc_khz", &khz.to_string())
                .map_err(BootError::Cmdline)?;
        }
    }
    Ok(cl)
}

fn is_bzimage(f: &mut File) -> std::io::Result<bool> {
    // "HdrS" at offset 0x202 marks a Linux boot-protocol image.
    let mut sig = [0u8; 4];
    f.seek(SeekFrom::Start(0x202))?;
    f.read_exact(&mut sig)?;
    Ok(&sig == b"HdrS")
}

fn elf_entry(f: &mut File) -> std::io::Result<u64> {
    let mut e = [0u8; 8];
    f.seek(SeekFrom::Start(0x18))?;
    f.read_exact(&mut e)?;
    Ok(u64::from_le_bytes(e))
}

/// Loads the initrd at the highest page-aligned address that fits below the kernel's limit and
/// the end of the first RAM region. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram: &GuestRam,
    path: &Path,
    hdr: Option<&setup_header>,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    let size = f
        .seek(SeekFrom::End(0))
        .and_then(|s| f.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(|source| BootError::OpenInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    let max = hdr
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let low_end = ram
        .regions()
        .first()
        .map(|r| r.guest_addr + r.size)
        .unwrap_or(0);
    let limit = low_end.min(max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START + (16 << 20))
        .ok_or_else(|| BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(BootError::WriteInitrd)?;
    Ok((addr, size))
}

/// Writes a plain value into guest memory, mapping the error to a boot error.
pub(crate) fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    val: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| BootError::GuestWriteAt { addr, source })
}
