//! The SIGSYS report: what a thread that broke its filter was doing, printed from the signal
//! handler without allocating or taking locks.
//!
//! The first line names the role, the thread, the system call and (for an ioctl or clone) the
//! argument the filter checks; that line is written before anything else is read. A second line
//! then says what the call was about and where it came from:
//! - the path, for the system calls that take one (`openat`, `newfstatat`, ...);
//! - the code address after the `syscall` instruction, and the code addresses found on the
//!   thread's stack (innermost first), each as `object+offset`. Offsets are relative to the
//!   object's load address, so `addr2line -f -C -e target/release/vmm OFFSET` names the
//!   function (and `addr2line -e /lib/x86_64-linux-gnu/libc.so.6 OFFSET` in the C library). The stack scan is a heuristic (any word that points into code is shown), good
//!   enough to see which library call opened a file.
//!
//! The code ranges of the loaded objects are recorded once, by [`record_objects`], before any
//! filter is installed (walking them in the handler would take the loader's lock).

use std::ffi::CStr;
use std::sync::OnceLock;

use super::{syscall_name, Role, SeccompError, THREAD_ROLE, VIOLATION_EXIT};

/// Installs the handler (SA_SIGINFO) and records the code ranges it reports against.
pub(super) fn install() -> Result<(), SeccompError> {
    record_objects();
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn of the SA_SIGINFO
    // signature that only calls async-signal-safe functions (write, gettid, _exit) and reads
    // memory the interrupted thread was using (see the handler).
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The executable code of one loaded object.
struct CodeRange {
    start: usize,
    end: usize,
    /// The object's load address (what `addr2line` offsets are relative to).
    base: usize,
    /// The file's name without its directory ("vmm" for the executable).
    name: [u8; 32],
    name_len: usize,
}

static OBJECTS: OnceLock<Vec<CodeRange>> = OnceLock::new();

/// Records the executable segments of every object loaded now (the executable and the shared
/// libraries it links; the VMM loads nothing later).
fn record_objects() {
    unsafe extern "C" fn one(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of the call and `data`
        // is the Vec handed to it below, used by this thread only.
        let (info, out) = unsafe { (&*info, &mut *data.cast::<Vec<CodeRange>>()) };
        let full: &[u8] = if info.dlpi_name.is_null() {
            b""
        } else {
            // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the loader.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        let base_name = full.rsplit(|&b| b == b'/').next().unwrap_or(b"");
        let exe_name;
        let base_name: &[u8] = if out.is_empty() && base_name.is_empty() {
            // The executable comes first, nameless.
            exe_name = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.as_encoded_bytes().to_vec()))
                .unwrap_or_else(|| b"vmm".to_vec());
            &exe_name
        } else {
            base_name
        };
        if base_name.is_empty() {
            return 0; // the vDSO has a name; nameless others have no file to look up
        }
        let mut name = [0u8; 32];
        let name_len = base_name.len().min(name.len());
        name[..name_len].copy_from_slice(&base_name[..name_len]);
        for i in 0..usize::from(info.dlpi_phnum) {
            // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
                let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
                out.push(CodeRange {
                    start,
                    end: start + ph.p_memsz as usize,
                    base: info.dlpi_addr as usize,
                    name,
                    name_len,
                });
            }
        }
        0
    }
    let mut ranges: Vec<CodeRange> = Vec::new();
    // SAFETY: the callback matches dl_iterate_phdr's signature and only touches `ranges`.
    unsafe { libc::dl_iterate_phdr(Some(one), (&mut ranges as *mut Vec<CodeRange>).cast()) };
    let _ = OBJECTS.set(ranges);
}

fn code_range(addr: usize) -> Option<&'static CodeRange> {
    OBJECTS
        .get()?
        .iter()
        .find(|r| (r.start..r.end).contains(&addr))
}

/// A fixed buffer a signal handler can format into without allocating.
pub(super) struct Line {
    buf: [u8; 640],
    len: usize,
}

impl Line {
    pub(super) const fn new() -> Line {
        Line {
            buf: [0; 640],
            len: 0,
        }
    }

    pub(super) fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    pub(super) fn num(&mut self, mut v: u64, base: u64) {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b"0123456789abcdef"[(v % base) as usize];
            n += 1;
            v /= base;
            if v == 0 || n == digits.len() {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.push(&[digits[n]]);
        }
    }

    /// `object+0xoffset`, or `0xaddr` outside every recorded object.
    fn code_addr(&mut self, addr: usize) {
        match code_range(addr) {
            Some(r) => {
                self.push(&r.name[..r.name_len]);
                self.push(b"+0x");
                self.num((addr - r.base) as u64, 16);
            }
            None => {
                self.push(b"0x");
                self.num(addr as u64, 16);
            }
        }
    }

    #[cfg(test)]
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn write_stderr(&self) {
        // SAFETY: write is async-signal-safe and allowed in every role; the buffer lives on
        // this stack.
        unsafe { libc::write(2, self.buf.as_ptr().cast(), self.len) };
    }
}

/// Offsets in a SIGSYS siginfo on x86_64: signo, errno, code, padding, then
/// `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }` (include/uapi/asm-generic/siginfo.h).
const SI_CALL_ADDR_OFFSET: usize = 16;
const SI_SYSCALL_OFFSET: usize = 24;

/// Which argument of `nr` is a path, for the system calls the VMM's code might make on files.
fn path_arg(nr: i64) -> Option<usize> {
    match nr {
        libc::SYS_open | libc::SYS_stat | libc::SYS_lstat | libc::SYS_access => Some(0),
        libc::SYS_readlink | libc::SYS_mkdir | libc::SYS_unlink => Some(0),
        libc::SYS_openat | libc::SYS_newfstatat | libc::SYS_statx => Some(1),
        libc::SYS_faccessat | libc::SYS_faccessat2 | libc::SYS_readlinkat => Some(1),
        libc::SYS_mkdirat | libc::SYS_unlinkat => Some(1),
        _ => None,
    }
}

/// How far up the stack the scan looks for code addresses.
const STACK_SCAN_BYTES: usize = 8 << 10;
/// How many code addresses the report shows.
const STACK_SCAN_HITS: usize = 12;

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo of a SIGSYS (SA_SIGINFO), whose `_call_addr`
    // pointer and `si_syscall` int lie at these offsets inside the 128-byte siginfo.
    let (call_addr, nr) = unsafe {
        let p = info as *const u8;
        (
            p.add(SI_CALL_ADDR_OFFSET).cast::<usize>().read_unaligned(),
            p.add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned(),
        )
    };
    let nr = i64::from(nr);
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext; the
    // first two syscall arguments are in rdi and rsi, its stack pointer in rsp.
    let (args, rsp) = unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        (
            [
                g[libc::REG_RDI as usize] as u64,
                g[libc::REG_RSI as usize] as u64,
            ],
            g[libc::REG_RSP as usize] as usize,
        )
    };
    let role = Role::from_code(THREAD_ROLE.with(|r| r.get()));
    let mut l = Line::new();
    l.push(b"vmm: error: seccomp: the ");
    // A thread that has not narrowed its filter yet runs under its spawner's.
    l.push(role.map_or("new", |r| r.as_str()).as_bytes());
    l.push(b" thread (tid ");
    // gettid is async-signal-safe (a bare system call) and every role allows it.
    l.num(nix::unistd::gettid().as_raw() as u64, 10);
    l.push(b") made system call ");
    l.num(nr as u64, 10);
    if let Some(name) = syscall_name(nr) {
        l.push(b" (");
        l.push(name.as_bytes());
        l.push(b")");
    }
    if nr == libc::SYS_ioctl {
        l.push(b" request 0x");
        l.num(args[1] & 0xffff_ffff, 16);
    } else if nr == libc::SYS_clone {
        l.push(b" flags 0x");
        l.num(args[0], 16);
    }
    l.push(b", which its filter forbids; stopping the VMM (`--seccomp log` lets it through and the kernel logs it)\n");
    l.write_stderr();

    // The details read the thread's memory: a wild pointer would fault here, after the line
    // above is out.
    let mut d = Line::new();
    d.push(b"vmm: error: seccomp: ");
    if let Some(i) = path_arg(nr) {
        let p = args[i] as *const u8;
        if !p.is_null() {
            d.push(b"path \"");
            for k in 0..160 {
                // SAFETY: the thread passed this pointer as a path to the kernel, so it points
                // at a NUL-terminated string it built; the loop stops at the NUL (or 160 bytes).
                let b = unsafe { p.add(k).read() };
                if b == 0 {
                    break;
                }
                let shown = if b.is_ascii_graphic() || b == b' ' {
                    b
                } else {
                    b'?'
                };
                d.push(&[shown]);
            }
            d.push(b"\", ");
        }
    }
    d.push(b"called at ");
    d.code_addr(call_addr);
    d.push(b"; code addresses on its stack:");
    // The scan stays below the thread's control block, which glibc puts at the top of each
    // thread's stack mapping (pthread_self() is its address); for the main thread, whose
    // control block lies elsewhere, 1 KiB above rsp (the arguments and environment are above).
    // SAFETY: pthread_self only reads the thread pointer.
    let tcb = unsafe { libc::pthread_self() } as usize;
    let limit = if tcb > rsp && tcb - rsp <= 8 << 20 {
        tcb.min(rsp + STACK_SCAN_BYTES)
    } else {
        rsp + 1024
    };
    let mut hits = 0;
    let mut at = rsp;
    while at + 8 <= limit && hits < STACK_SCAN_HITS {
        // SAFETY: [rsp, limit) is the interrupted thread's stack (see above): mapped, and
        // read-only use here.
        let word = unsafe { (at as *const usize).read() };
        if code_range(word).is_some() {
            d.push(b" ");
            d.code_addr(word);
            hits += 1;
        }
        at += 8;
    }
    if hits == 0 {
        d.push(b" none found");
    }
    d.push(b"\n");
    d.write_stderr();
    // SAFETY: _exit is async-signal-safe and allowed in every role.
    unsafe { libc::_exit(VIOLATION_EXIT) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_formats_numbers() {
        let mut l = Line::new();
        l.num(41, 10);
        l.push(b" ");
        l.num(0xae80, 16);
        l.push(b" ");
        l.num(0, 10);
        assert_eq!(l.as_bytes(), b"41 ae80 0");
    }

    #[test]
    fn code_addresses_name_their_object() {
        record_objects();
        let here = code_addresses_name_their_object as *const () as usize;
        let mut l = Line::new();
        l.code_addr(here);
        let text = String::from_utf8_lossy(l.as_bytes()).into_owned();
        assert!(text.contains("+0x"), "{text}");
        let libc_fn = libc::write as *const () as usize;
        let mut l = Line::new();
        l.code_addr(libc_fn);
        let text = String::from_utf8_lossy(l.as_bytes()).into_owned();
        assert!(text.starts_with("libc.so"), "{text}");
        assert_eq!(path_arg(libc::SYS_openat), Some(1));
        assert_eq!(path_arg(libc::SYS_read), None);
    }
}
