//! Seccomp filters for `vmm run` and `vmm receive`: the one place that lists the system calls
//! each kind of thread may make (see docs/security.md).
//!
//! A filter is a list of allowed system calls per thread [`Role`]; anything else stops the VMM
//! ([`Mode::Trap`], the default: a SIGSYS handler prints the role, thread and system call, and
//! the process exits with status [`VIOLATION_EXIT`]), or is let through and logged by the kernel
//! to the audit log ([`Mode::Log`], for finding what a new code path needs), or nothing is
//! filtered ([`Mode::Off`]).
//!
//! Filters stack: a thread keeps every filter of the thread that spawned it and can only add
//! narrower ones. So the main thread installs the widest filter ([`Role::Main`], every system
//! call any thread of the VMM makes) before it starts any thread, and each thread narrows it
//! with its own role as the first thing it does. A role whose threads start other threads
//! ([`Role::Api`], [`Role::Migration`], [`Role::FaultService`]) allows what those threads need
//! to start and, through inheritance, what they need to run. Callers do not build filters: they
//! call [`init`] once in the process and [`enter`] at the start of each thread (a no-op when
//! [`init`] was not called, as in tests that drive the VMM as a library).
//!
//! Also refused in every role: creating processes (`clone` without `CLONE_THREAD`, `fork`,
//! `vfork`, `execve`), and `clone3`, whose flags live in memory a filter cannot read: it fails
//! with ENOSYS, and the C library falls back to `clone`, whose flags are checked.

mod sigsys;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a VMM stopped for a forbidden system call (128 + SIGSYS, as if the signal had
/// killed it).
pub const VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

/// What a thread does, for the system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The main thread of `vmm run` / `vmm receive`: sets the VM up (files, KVM, memory,
    /// sockets), starts every other thread, and (on the destination) receives the VM. The
    /// union of every other role, plus opening files and sockets.
    Main,
    /// A vCPU thread: KVM_RUN and the devices it emulates (serial output), nothing else: no
    /// files, no sockets, no threads.
    Vcpu,
    /// The destination's postcopy fault service (userfaultfd reader, fault workers and the
    /// threads they start for huge pages) and the collapse thread: userfaultfd and KVM ioctls,
    /// I/O on sockets it was handed, memory management; no new files or sockets.
    FaultService,
    /// Migration channel threads (the source's urgent page server, the destination's
    /// urgent-reply reader, heartbeats): I/O on the channels they were handed, userfaultfd
    /// ioctls (a reply is placed into guest RAM); no new files, no KVM.
    Migration,
    /// The control API and what it runs: a migration is driven from the thread that received
    /// the request (it pauses vCPUs, reads KVM state, opens TLS files, connects to the
    /// destination and starts the channel threads), so this is [`Role::Main`]'s list. Enough
    /// for a tokio runtime on a Unix socket too (epoll, eventfd, accept4...): call
    /// [`enter`]`(Role::Api)` from the runtime's `on_thread_start`.
    Api,
}

impl Role {
    /// The role's name in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Vcpu => "vcpu",
            Role::FaultService => "fault-service",
            Role::Migration => "migration",
            Role::Api => "api",
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Main => 1,
            Role::Vcpu => 2,
            Role::FaultService => 3,
            Role::Migration => 4,
            Role::Api => 5,
        }
    }

    fn from_code(c: u8) -> Option<Role> {
        Some(match c {
            1 => Role::Main,
            2 => Role::Vcpu,
            3 => Role::FaultService,
            4 => Role::Migration,
            5 => Role::Api,
            _ => return None,
        })
    }
}

/// What a filter does with a system call its role does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filter.
    Off,
    /// Allowed, and logged by the kernel (SECCOMP_RET_LOG: the audit log / dmesg, "type=1326").
    Log,
    /// Refused: SIGSYS, whose handler prints what was called and stops the VMM.
    Trap,
}

impl std::str::FromStr for Mode {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Mode, SeccompError> {
        match s {
            "on" | "trap" => Ok(Mode::Trap),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(SeccompError::UnknownMode(other.to_string())),
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unknown seccomp mode {0:?} (on, log or off)")]
    UnknownMode(String),
    #[error("building the {role} seccomp filter: {source}")]
    Build {
        role: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("compiling the {role} seccomp filter: {source}")]
    Compile {
        role: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the {role} seccomp filter: {source}")]
    Install {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("setting malloc's {what} (so that malloc opens no file on a filtered thread) failed")]
    Malloc { what: &'static str },
    #[error("seccomp was already set up in this process")]
    AlreadyInitialized,
}

/// The mode [`init`] chose for this process (unset: [`enter`] does nothing).
static PROCESS_MODE: OnceLock<Mode> = OnceLock::new();

thread_local! {
    /// The role of the calling thread's newest filter, for the SIGSYS report.
    static THREAD_ROLE: Cell<u8> = const { Cell::new(0) };
}

/// Sets the process up for `mode`: the SIGSYS handler (for [`Mode::Trap`]), the calling
/// thread's [`Role::Main`] filter, and the migration crate's thread-start hook, so that its
/// threads narrow their filters too. Call it once, from the main thread, before any other
/// thread starts.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    PROCESS_MODE
        .set(mode)
        .map_err(|_| SeccompError::AlreadyInitialized)?;
    if mode == Mode::Off {
        return Ok(());
    }
    if mode == Mode::Trap {
        sigsys::install()?;
    }
    settle_malloc()?;
    migration::thread_hook::set(migration_thread_started);
    apply(Role::Main, mode)?;
    Ok(())
}

/// glibc's malloc reads two files lazily, on whichever thread first needs them, and a filtered
/// thread may not open files: both stopped migrated VMs now and then. This settles both in
/// the main thread before any filter is installed:
/// - `/proc/sys/vm/overcommit_memory`, read the first time it shrinks the heap of a thread's
///   arena (`shrink_heap` in malloc/arena.c): a vCPU thread ending after its VM migrated away,
///   about once in 60 migrations. A thread heap is at most 64 MiB (HEAP_MAX_SIZE), so with the
///   trim threshold at that size its top never reaches it and no heap shrinks; freed memory at
///   the main arena's top is trimmed past 64 MiB instead of 128 KiB, which guest RAM (mapped
///   apart from malloc) does not feel.
/// - `/sys/devices/system/cpu/online`, read to size the arena limit (8 per CPU) once more than
///   8 arenas exist (`arena_get2`): a heartbeat thread started after the vCPUs and fault
///   workers ran, before it narrowed its filter. With the limit set here, glibc never reads it.
fn settle_malloc() -> Result<(), SeccompError> {
    const THREAD_HEAP_MAX: libc::c_int = 64 << 20;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    for (param, value, what) in [
        (libc::M_TRIM_THRESHOLD, THREAD_HEAP_MAX, "trim threshold"),
        (libc::M_ARENA_MAX, arenas, "arena limit"),
    ] {
        // SAFETY: mallopt only sets a malloc parameter; both take any positive int.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(SeccompError::Malloc { what });
        }
    }
    Ok(())
}

/// Narrows the calling thread to `role` in the mode [`init`] chose (nothing when it was not
/// called, or chose [`Mode::Off`]). Call it first thing in a new thread.
pub fn enter(role: Role) -> Result<(), SeccompError> {
    match PROCESS_MODE.get() {
        Some(&mode) if mode != Mode::Off => apply(role, mode),
        _ => Ok(()),
    }
}

/// [`enter`] for a thread that cannot return the error: a thread that could not narrow its
/// filter stops the VMM rather than run with more rights than its role (installing a filter
/// fails only when the kernel is out of memory, or lacks seccomp, which [`init`] would have
/// found already).
pub fn enter_or_exit(role: Role) {
    if let Err(e) = enter(role) {
        eprintln!(
            "vmm: error: seccomp: the {} thread {:?}: {e}; stopping",
            role.as_str(),
            std::thread::current().name().unwrap_or("?")
        );
        std::process::exit(1);
    }
}

/// Installs `role`'s filter on the calling thread with `mode` (a no-op for [`Mode::Off`]).
pub fn apply(role: Role, mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Off {
        return Ok(());
    }
    let program = compile(role, mode)?;
    if role == Role::Main {
        // clone3 passes its flags in memory a filter cannot read: fail it with ENOSYS (the C
        // library then uses clone, whose flags the role filters check for CLONE_THREAD). One
        // filter for the whole process: every thread inherits it.
        let no_clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .map_err(|source| SeccompError::Build {
            role: "clone3",
            source,
        })?;
        let p: BpfProgram = no_clone3
            .try_into()
            .map_err(|source| SeccompError::Compile {
                role: "clone3",
                source,
            })?;
        seccompiler::apply_filter(&p).map_err(|source| SeccompError::Install {
            role: "clone3",
            source,
        })?;
    }
    seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
        role: role.as_str(),
        source,
    })?;
    THREAD_ROLE.with(|r| r.set(role.code()));
    Ok(())
}

/// The migration crate's threads, mapped onto roles.
fn migration_thread_started(kind: migration::thread_hook::ThreadKind) {
    use migration::thread_hook::ThreadKind;
    let role = match kind {
        ThreadKind::FaultService | ThreadKind::Collapse => Role::FaultService,
        ThreadKind::Channel => Role::Migration,
    };
    enter_or_exit(role);
}

/// The BPF program of `role` with `mode`.
pub fn compile(role: Role, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        Mode::Trap | Mode::Off => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let rules = rules(role).map_err(|source| SeccompError::Build {
        role: role.as_str(),
        source,
    })?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build {
            role: role.as_str(),
            source,
        })?;
    filter.try_into().map_err(|source| SeccompError::Compile {
        role: role.as_str(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// The allow lists.

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Every thread: memory, futexes, signals, time, thread exit, reading and writing descriptors it
/// holds, and what a panic needs to abort.
const BASE: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_close, "close"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_mincore, "mincore"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
];

/// Starting threads (what the new thread does before its own filter, too). `clone` itself is
/// allowed only with CLONE_THREAD (see [`rules`]).
/// `seccomp` itself: a new thread narrows its inherited filter with its own (filters only ever
/// take rights away).
const THREADS: &[(i64, &str)] = &[(libc::SYS_prctl, "prctl"), (libc::SYS_seccomp, "seccomp")];

/// Waiting on and moving data through descriptors the thread was handed (sockets, userfaultfd,
/// eventfds).
const CHANNEL_IO: &[(i64, &str)] = &[
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    // The fault workers wait on an epoll instance made for them before they start.
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_sched_getattr, "sched_getattr"),
    (libc::SYS_sched_setattr, "sched_setattr"),
    // A thread's role placement (`migration::cpu_placement`, `--migration-cpus`).
    (libc::SYS_sched_setaffinity, "sched_setaffinity"),
    (libc::SYS_setpriority, "setpriority"),
    (libc::SYS_getpriority, "getpriority"),
    (libc::SYS_sched_setscheduler, "sched_setscheduler"),
    (libc::SYS_sched_getscheduler, "sched_getscheduler"),
    (libc::SYS_sched_getparam, "sched_getparam"),
];

/// The rest of what the main thread (and the API, which drives migrations) does: files,
/// sockets, KVM and userfaultfd set-up, event loops, scheduling, identity.
const PROCESS: &[(i64, &str)] = &[
    (libc::SYS_openat, "openat"),
    (libc::SYS_open, "open"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_statfs, "statfs"),
    (libc::SYS_fstatfs, "fstatfs"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_access, "access"),
    (libc::SYS_faccessat, "faccessat"),
    (libc::SYS_faccessat2, "faccessat2"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_fchmodat, "fchmodat"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_memfd_create, "memfd_create"),
    // The shmem backing's private huge tmpfs (memory/shmem.rs): a detached mount.
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    (libc::SYS_select, "select"),
    (libc::SYS_pselect6, "pselect6"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_sendmmsg, "sendmmsg"),
    (libc::SYS_recvmmsg, "recvmmsg"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"),
    (libc::SYS_getegid, "getegid"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_clock_getres, "clock_getres"),
    (libc::SYS_gettimeofday, "gettimeofday"),
];

/// Names of system calls no role allows, for the SIGSYS report.
const NEVER: &[(i64, &str)] = &[
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_keyctl, "keyctl"),
];

/// ioctl request types (bits 8..16 of the request number).
const IOCTL_KVM: u64 = kernel_abi::ioctl::TYPE_KVM as u64;
const IOCTL_UFFD: u64 = kernel_abi::ioctl::TYPE_UFFD as u64;
/// Terminal and socket ioctls (TCGETS, TIOCGWINSZ, FIONBIO, FIONREAD: 0x54xx).
const IOCTL_TTY: u64 = kernel_abi::ioctl::TYPE_TTY as u64;

/// A list of system calls: (number, name).
type List = &'static [(i64, &'static str)];

/// What a role allows.
struct Allowed {
    /// System calls allowed with any arguments.
    lists: Vec<List>,
    /// The ioctl request types (bits 8..16) it may use; None: any.
    ioctl_types: Option<&'static [u64]>,
    /// Whether it may start threads (`clone` with CLONE_THREAD).
    threads: bool,
}

/// What `role` allows.
fn allowed(role: Role) -> Allowed {
    let (lists, ioctl_types, threads): (Vec<List>, Option<&'static [u64]>, bool) = match role {
        Role::Main | Role::Api => (vec![BASE, THREADS, CHANNEL_IO, PROCESS], None, true),
        Role::Vcpu => (vec![BASE], Some(&[IOCTL_KVM, IOCTL_TTY]), false),
        Role::FaultService => (
            vec![BASE, THREADS, CHANNEL_IO],
            Some(&[IOCTL_UFFD, IOCTL_KVM, IOCTL_TTY]),
            true,
        ),
        Role::Migration => (
            vec![BASE, THREADS, CHANNEL_IO],
            Some(&[IOCTL_UFFD, IOCTL_TTY]),
            true,
        ),
    };
    Allowed {
        lists,
        ioctl_types,
        threads,
    }
}

fn rules(role: Role) -> Result<Rules, seccompiler::BackendError> {
    let Allowed {
        lists,
        ioctl_types,
        threads,
    } = allowed(role);
    let mut rules: Rules = BTreeMap::new();
    for list in lists {
        for &(nr, _) in list {
            rules.insert(nr, Vec::new());
        }
    }
    match ioctl_types {
        None => {
            rules.insert(libc::SYS_ioctl, Vec::new());
        }
        Some(types) => {
            let mut r = Vec::new();
            for &t in types {
                r.push(SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(0xff00),
                    t << 8,
                )?])?);
            }
            rules.insert(libc::SYS_ioctl, r);
        }
    }
    if threads {
        let flag = libc::CLONE_THREAD as u64;
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])?],
        );
        // Allowed here so that the whole-process filter's ENOSYS (see [`apply`]) is what a
        // caller sees, not a trap.
        rules.insert(libc::SYS_clone3, Vec::new());
    }
    Ok(rules)
}

/// Whether `role` allows system call `nr` (any arguments: ioctl and clone are checked further).
pub fn allows(role: Role, nr: i64) -> bool {
    let Allowed { lists, threads, .. } = allowed(role);
    nr == libc::SYS_ioctl
        || (threads && (nr == libc::SYS_clone || nr == libc::SYS_clone3))
        || lists.iter().any(|l| l.iter().any(|&(n, _)| n == nr))
}

/// The name of system call `nr`, where this file knows it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    [BASE, THREADS, CHANNEL_IO, PROCESS, NEVER]
        .iter()
        .flat_map(|l| l.iter())
        .find(|&&(n, _)| n == nr)
        .map(|&(_, name)| name)
        .or(match nr {
            libc::SYS_ioctl => Some("ioctl"),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_narrower_roles_are_subsets_of_main() {
        for role in [
            Role::Main,
            Role::Vcpu,
            Role::FaultService,
            Role::Migration,
            Role::Api,
        ] {
            for mode in [Mode::Trap, Mode::Log] {
                assert!(!compile(role, mode).unwrap().is_empty());
            }
            // A thread inherits its spawner's filter: nothing a role allows may be missing
            // from the main thread's.
            for &(nr, name) in allowed(role).lists.iter().flat_map(|l| l.iter()) {
                assert!(
                    allows(Role::Main, nr),
                    "{role:?} allows {name}, main does not"
                );
            }
        }
        // The narrow roles refuse what they must not do.
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone,
        ] {
            assert!(!allows(Role::Vcpu, nr), "{:?}", syscall_name(nr));
        }
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
        ] {
            assert!(!allows(Role::FaultService, nr), "{:?}", syscall_name(nr));
            assert!(!allows(Role::Migration, nr), "{:?}", syscall_name(nr));
        }
        for nr in [
            libc::SYS_execve,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
        ] {
            assert!(!allows(Role::Main, nr), "{:?}", syscall_name(nr));
        }
        // A tokio runtime on a Unix socket.
        for nr in [
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_eventfd2,
            libc::SYS_accept4,
            libc::SYS_futex,
        ] {
            assert!(allows(Role::Api, nr), "{:?}", syscall_name(nr));
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>().unwrap(), Mode::Trap);
        assert_eq!("log".parse::<Mode>().unwrap(), Mode::Log);
        assert_eq!("off".parse::<Mode>().unwrap(), Mode::Off);
        assert!(matches!(
            "maybe".parse::<Mode>(),
            Err(SeccompError::UnknownMode(_))
        ));
    }
}
