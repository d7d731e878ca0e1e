//! What this host offers the VMM: the KVM flavour and capabilities, userfaultfd and its features,
//! the huge page pools, and two live checks of kernel behaviour that postcopy strategies depend on
//! (detected, never assumed). Every failure is recorded as a value in the report.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kernel_abi::uffd::{
    UFFD_FEATURE_MOVE, UFFD_FEATURE_POISON, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED,
};
use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::{Cap, Kvm};
use migration::postcopy::strategy::{self, UffdMode};
use serde::Serialize;
use userfaultfd_sys as uffd_sys;

use crate::memory::guest_memfd::{self, KVM_CAP_GUEST_MEMFD_FLAGS};
use crate::memory::hugepages::{self, PoolStatus};
use crate::memory::{hugetlb, shmem, Backing, GuestRam, Mapping, PAGE_SIZE_1G, PAGE_SIZE_2M};

/// userfaultfd feature bits and their names (without the `UFFD_FEATURE_` prefix).
const UFFD_FEATURE_NAMES: [(u64, &str); 17] = [
    (
        uffd_sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        "PAGEFAULT_FLAG_WP",
    ),
    (uffd_sys::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    (uffd_sys::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (uffd_sys::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (
        uffd_sys::UFFD_FEATURE_MISSING_HUGETLBFS,
        "MISSING_HUGETLBFS",
    ),
    (uffd_sys::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (uffd_sys::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (uffd_sys::UFFD_FEATURE_SIGBUS, "SIGBUS"),
    (uffd_sys::UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    (uffd_sys::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (uffd_sys::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (uffd_sys::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (
        uffd_sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "WP_HUGETLBFS_SHMEM",
    ),
    (UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    (UFFD_FEATURE_MOVE, "MOVE"),
];

/// Names of the userfaultfd feature bits set in `features`; unknown bits as `bit N`.
pub fn uffd_feature_names(features: u64) -> Vec<String> {
    (0..64)
        .map(|bit| 1u64 << bit)
        .filter(|flag| features & flag != 0)
        .map(|flag| {
            UFFD_FEATURE_NAMES
                .iter()
                .find(|(f, _)| *f == flag)
                .map(|(_, name)| (*name).to_string())
                .unwrap_or_else(|| format!("bit {}", flag.trailing_zeros()))
        })
        .collect()
}

/// A probed value, or why it could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Probed<T> {
    Value(T),
    Error(String),
}

impl<T, E: fmt::Display> From<Result<T, E>> for Probed<T> {
    fn from(r: Result<T, E>) -> Self {
        match r {
            Ok(v) => Probed::Value(v),
            Err(e) => Probed::Error(e.to_string()),
        }
    }
}

impl<T: fmt::Display> fmt::Display for Probed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probed::Value(v) => v.fmt(f),
            Probed::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Whether something could be opened or used, and the error if not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Availability {
    pub available: bool,
    pub error: Option<String>,
}

impl Availability {
    fn from_result<T, E: fmt::Display>(r: &Result<T, E>) -> Availability {
        Availability {
            available: r.is_ok(),
            error: r.as_ref().err().map(|e| e.to_string()),
        }
    }
}

impl fmt::Display for Availability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            None => f.write_str("available"),
            Some(e) => write!(f, "unavailable ({e})"),
        }
    }
}

/// How KVM does virtualization on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavour {
    /// The PVM module (`/sys/module/kvm_pvm`): no hardware virtualization, shadow paging.
    Pvm,
    /// Intel VMX (`kvm_intel`).
    Vmx,
    /// AMD SVM (`kvm_amd`).
    Svm,
    /// No KVM vendor module is loaded.
    None,
}

impl KvmFlavour {
    /// Detects the flavour from the loaded modules in `/sys/module`.
    pub fn detect() -> KvmFlavour {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            KvmFlavour::Pvm
        } else if loaded("kvm_intel") {
            KvmFlavour::Vmx
        } else if loaded("kvm_amd") {
            KvmFlavour::Svm
        } else {
            KvmFlavour::None
        }
    }
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavour::Pvm => "PVM (kvm_pvm)",
            KvmFlavour::Vmx => "VMX (kvm_intel)",
            KvmFlavour::Svm => "SVM (kvm_amd)",
            KvmFlavour::None => "none",
        })
    }
}

/// KVM capabilities relevant to the VMM, queried on a fresh VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvmCaps {
    pub irqchip: bool,
    pub pit2: bool,
    pub user_memory2: bool,
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`: the supported `KVM_CREATE_GUEST_MEMFD` flags.
    pub guest_memfd_flags: u64,
    pub guest_memfd_flag_names: Vec<String>,
    /// `KVM_CAP_DIRTY_LOG_RING`: maximum ring size in bytes, 0 if unsupported.
    pub dirty_log_ring_max_bytes: u64,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: maximum ring size in bytes, 0 if unsupported.
    pub dirty_log_ring_acq_rel_max_bytes: u64,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: supported flags.
    pub manual_dirty_log_protect2: u64,
    pub manual_dirty_log_protect2_names: Vec<String>,
    /// `KVM_CAP_NR_VCPUS`: recommended maximum vCPUs.
    pub nr_vcpus: u64,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: u64,
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub nr_memslots: u64,
    /// `KVM_GET_TSC_KHZ` on a fresh vCPU.
    pub tsc_khz: Probed<u32>,
}

/// What `/dev/kvm` offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvmReport {
    pub flavour: KvmFlavour,
    pub dev_kvm: Availability,
    pub api_version: Option<i32>,
    /// `None` if `/dev/kvm` could not be opened; an error if no VM could be created.
    pub caps: Option<Probed<KvmCaps>>,
}

/// What userfaultfd offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UffdReport {
    /// The `userfaultfd(2)` system call.
    pub syscall: Availability,
    /// `/dev/userfaultfd` with `USERFAULTFD_IOC_NEW`.
    pub dev_userfaultfd: Availability,
    /// Feature bits `UFFDIO_API` reports.
    pub features: Probed<u64>,
    pub feature_names: Vec<String>,
}

/// One huge page pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolReport {
    pub page_size: u64,
    pub status: Probed<PoolStatus>,
}

/// The outcome of a live check of kernel behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum Check {
    /// The kernel does it.
    Supported(String),
    /// The kernel refused it the way a kernel without the feature does.
    Unsupported(String),
    /// The check could not run here (e.g. no free huge page).
    Skipped(String),
    /// Something else failed; the result is unknown.
    Failed(String),
}

impl Check {
    /// What a report from a VMM that did not know the check says.
    fn not_probed() -> Check {
        Check::Skipped("not probed by this vmm".into())
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, detail) = match self {
            Check::Supported(d) => ("supported", d),
            Check::Unsupported(d) => ("unsupported", d),
            Check::Skipped(d) => ("skipped", d),
            Check::Failed(d) => ("check failed", d),
        };
        write!(f, "{word}: {detail}")
    }
}

/// The live checks (the harness reads them back from `vmm probe --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LiveChecks {
    /// "4 KiB UFFDIO_CONTINUE on hugetlb (HGM)".
    pub hugetlb_4k_continue: Check,
    /// "userfaultfd on guest_memfd".
    pub uffd_on_guest_memfd: Check,
    /// "shmem guest RAM on 2 MiB folios" (the VMM's private huge tmpfs).
    #[serde(default = "Check::not_probed")]
    pub shmem_huge_folios: Check,
}

/// Everything [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeReport {
    pub kernel_release: Probed<String>,
    pub kvm: KvmReport,
    pub userfaultfd: UffdReport,
    pub hugepages: Vec<PoolReport>,
    pub checks: LiveChecks,
}

/// Probes the host. Never panics on what the host lacks; the live checks take a free 2 MiB huge
/// page only if one is free, and give it back.
pub fn probe() -> ProbeReport {
    ProbeReport {
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .into(),
        kvm: probe_kvm(),
        userfaultfd: probe_uffd(),
        hugepages: [PAGE_SIZE_2M, PAGE_SIZE_1G]
            .into_iter()
            .map(|page_size| PoolReport {
                page_size,
                status: hugepages::pool_status(page_size).into(),
            })
            .collect(),
        checks: LiveChecks {
            hugetlb_4k_continue: check_hugetlb_4k_continue(),
            uffd_on_guest_memfd: check_uffd_on_guest_memfd(),
            shmem_huge_folios: check_shmem_huge_folios(),
        },
    }
}

fn probe_kvm() -> KvmReport {
    let kvm = Kvm::new();
    let mut report = KvmReport {
        flavour: KvmFlavour::detect(),
        dev_kvm: Availability::from_result(&kvm),
        api_version: None,
        caps: None,
    };
    let Ok(kvm) = kvm else {
        return report;
    };
    report.api_version = Some(kvm.get_api_version());
    report.caps = Some(match kvm.create_vm() {
        Err(e) => Probed::Error(format!("KVM_CREATE_VM: {e}")),
        Ok(vm) => {
            let raw = |cap: u32| u64::try_from(vm.check_extension_raw(u64::from(cap))).unwrap_or(0);
            let int = |cap: Cap| u64::try_from(vm.check_extension_int(cap)).unwrap_or(0);
            let guest_memfd_flags = raw(KVM_CAP_GUEST_MEMFD_FLAGS);
            let manual = raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
            let tsc_khz = match vm.create_vcpu(0) {
                Ok(vcpu) => vcpu.get_tsc_khz().into(),
                Err(e) => Probed::Error(format!("KVM_CREATE_VCPU: {e}")),
            };
            Probed::Value(KvmCaps {
                irqchip: vm.check_extension(Cap::Irqchip),
                pit2: vm.check_extension(Cap::Pit2),
                user_memory2: vm.check_extension(Cap::UserMemory2),
                guest_memfd: vm.check_extension(Cap::GuestMemfd),
                guest_memfd_flags,
                guest_memfd_flag_names: guest_memfd::flag_names(guest_memfd_flags),
                dirty_log_ring_max_bytes: int(Cap::DirtyLogRing),
                dirty_log_ring_acq_rel_max_bytes: raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
                manual_dirty_log_protect2: manual,
                manual_dirty_log_protect2_names: [
                    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, "MANUAL_PROTECT_ENABLE"),
                    (KVM_DIRTY_LOG_INITIALLY_SET, "INITIALLY_SET"),
                ]
                .into_iter()
                .filter(|(bit, _)| manual & u64::from(*bit) != 0)
                .map(|(_, name)| name.to_string())
                .collect(),
                nr_vcpus: int(Cap::NrVcpus),
                max_vcpus: int(Cap::MaxVcpus),
                nr_memslots: int(Cap::NrMemslots),
                tsc_khz,
            })
        }
    });
    report
}

/// A new userfaultfd from the system call, non-blocking and close-on-exec.
fn uffd_from_syscall() -> io::Result<OwnedFd> {
    kernel_abi::uffd::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)
}

/// A new userfaultfd from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`).
fn uffd_from_dev() -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")?;
    kernel_abi::uffd::userfaultfd_from_dev(&dev, libc::O_CLOEXEC | libc::O_NONBLOCK)
}

fn probe_uffd() -> UffdReport {
    let syscall = uffd_from_syscall();
    let dev = uffd_from_dev();
    // Ask whichever fd we got for the feature list (features 0: the kernel reports all).
    let features: Probed<u64> = match syscall.as_ref().or(dev.as_ref()) {
        Ok(fd) => kernel_abi::uffd::api(fd.as_fd(), 0)
            .map_err(|e| format!("UFFDIO_API: {e}"))
            .into(),
        Err(e) => Probed::Error(format!("no userfaultfd: {e}")),
    };
    let feature_names = match features {
        Probed::Value(f) => uffd_feature_names(f),
        Probed::Error(_) => Vec::new(),
    };
    UffdReport {
        syscall: Availability::from_result(&syscall),
        dev_userfaultfd: Availability::from_result(&dev),
        features,
        feature_names,
    }
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Why a live check could not run to an answer (the check is then `Failed` with this message).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |source| ProbeError::Io { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Kvm { what, source }
}

/// The text of a kernel probe error that stops a live check (`Failed`), in this report's words.
fn probe_failure(e: &strategy::ProbeError) -> String {
    use strategy::ProbeError as E;
    match e {
        E::Uffd(e) => format!("userfaultfd: {e}"),
        E::Api(e) => format!("UFFDIO_API: {e}"),
        E::Map(e) => format!("mmap of the primary: {e}"),
        E::Register(e) => format!("UFFDIO_REGISTER (MINOR) of a 2 MiB hugetlb mapping: {e}"),
        E::GuestMemfdRegister { mode, source } => {
            format!("UFFDIO_REGISTER ({mode}) of guest_memfd: {source}")
        }
        other => other.to_string(),
    }
}

/// Live check "4 KiB UFFDIO_CONTINUE on hugetlb (HGM)": puts a 2 MiB hugetlb memfd page in the
/// page cache through one mapping, and asks the migration crate's HGM probe
/// ([`strategy::probe_hugetlb_continue`]) to MINOR-register a second mapping and map only its
/// first 4 KiB. EINVAL means the kernel has no high-granularity hugetlb mapping. Needs one free
/// 2 MiB huge page (skipped otherwise); the page is given back at the end.
pub fn check_hugetlb_4k_continue() -> Check {
    let backing = Backing::Hugetlb2m;
    match hugepages::pool_status(PAGE_SIZE_2M) {
        Err(e) => return Check::Skipped(format!("cannot read the 2 MiB pool: {e}")),
        Ok(s) if s.available() == 0 => {
            return Check::Skipped(format!(
                "no free 2 MiB huge page; reserve one with: {}",
                hugepages::reserve_command(PAGE_SIZE_2M, s.total + 1)
            ))
        }
        Ok(_) => {}
    }
    let run = || -> Result<Check, ProbeError> {
        let size = PAGE_SIZE_2M as usize;
        let file = hugetlb::create_file(backing, size)?;
        let alias = Mapping::shared(file.as_fd(), 0, size).map_err(io_err("mmap of the alias"))?;
        // SAFETY: in bounds of the live alias mapping; this faults the huge page into the
        // page cache.
        unsafe { alias.as_ptr().write_volatile(0xa5) };
        let answer = match strategy::probe_hugetlb_continue(file.as_raw_fd(), 0, PAGE_SIZE_2M) {
            Ok(answer) => answer,
            Err(strategy::ProbeError::NoMinorHugetlbfs) => {
                return Ok(Check::Unsupported(
                    "UFFDIO_API refuses UFFD_FEATURE_MINOR_HUGETLBFS".into(),
                ))
            }
            Err(e) => return Ok(Check::Failed(probe_failure(&e))),
        };
        drop(alias);
        // The control (`whole`): continuing the whole huge page must work, or the test itself
        // is broken.
        Ok(match (answer.small, answer.whole) {
            (Ok(mapped), _) => Check::Supported(format!(
                "UFFDIO_CONTINUE of 4 KiB in a 2 MiB hugetlb page mapped {mapped} bytes \
                 (read back {:#x})",
                answer.read_back.unwrap_or_default()
            )),
            (Err(e), Some(Ok(_))) if is_einval(&e) => Check::Unsupported(
                "UFFDIO_CONTINUE of 4 KiB in a 2 MiB hugetlb page: EINVAL (no HGM); \
                 the whole 2 MiB page continues fine"
                    .into(),
            ),
            (Err(e), Some(Ok(_))) => {
                Check::Failed(format!("UFFDIO_CONTINUE of 4 KiB: {e} (2 MiB works)"))
            }
            (Err(e), whole) => Check::Failed(format!(
                "UFFDIO_CONTINUE of 4 KiB: {e}; of the whole 2 MiB page: {}",
                match whole {
                    Some(Err(w)) => w.to_string(),
                    _ => "not tried".into(),
                }
            )),
        })
    };
    run().unwrap_or_else(|e| Check::Failed(e.to_string()))
}

/// Live check "shmem guest RAM on 2 MiB folios": makes 4 MiB of shmem guest RAM the way a VM
/// does ([`GuestRam::new`]), prefaults it as a postcopy destination does ([`GuestRam::prefault`])
/// and reads how much of its alias smaps shows PMD-mapped. Unsupported: the file is a memfd (no
/// private huge tmpfs), or the kernel gave it small folios.
pub fn check_shmem_huge_folios() -> Check {
    let run = || -> Result<Check, ProbeError> {
        let size = 2 * PAGE_SIZE_2M;
        let vm = match Kvm::new().and_then(|kvm| kvm.create_vm()) {
            Ok(vm) => vm,
            Err(e) => return Ok(Check::Skipped(format!("no KVM VM for guest RAM: {e}"))),
        };
        let ram = GuestRam::new(Backing::Shmem, size, &vm)?;
        let region = &ram.regions()[0];
        let Some(alias) = region.alias.as_ref().filter(|_| region.huge_folios) else {
            return Ok(Check::Unsupported(
                "no private huge=always tmpfs (needs CAP_SYS_ADMIN and shmem THP): shmem guest \
                 RAM is a memfd of 4 KiB folios, and each collapse copies"
                    .into(),
            ));
        };
        ram.prefault()?;
        let kb = shmem::pmd_mapped_kb(alias.addr()).map_err(io_err("smaps"))?;
        Ok(if kb == size / 1024 {
            Check::Supported(format!(
                "a private huge=always tmpfs: {kb} kB of {} kB mapped by 2 MiB folios",
                size / 1024
            ))
        } else {
            Check::Unsupported(format!(
                "a private huge=always tmpfs, but only {kb} kB of {} kB mapped by 2 MiB folios \
                 (no free 2 MiB of memory?)",
                size / 1024
            ))
        })
    };
    run().unwrap_or_else(|e| Check::Failed(e.to_string()))
}

/// Live check "userfaultfd on guest_memfd": asks the migration crate's probe
/// ([`strategy::probe_uffd_register`]) to register a guest_memfd mapping with userfaultfd MINOR
/// (and MISSING). EINVAL means guest_memfd cannot be userfault-tracked.
pub fn check_uffd_on_guest_memfd() -> Check {
    let run = || -> Result<Check, ProbeError> {
        let kvm = Kvm::new().map_err(kvm_err("/dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let size = PAGE_SIZE_2M;
        let gmem = match guest_memfd::create(&vm, size) {
            Ok(fd) => fd,
            Err(e) => return Ok(Check::Skipped(format!("no mappable guest_memfd: {e}"))),
        };
        let map = Mapping::shared(gmem.as_fd(), 0, size as usize)
            .map_err(io_err("mmap of the guest_memfd"))?;
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for mode in [UffdMode::Minor, UffdMode::Missing] {
            match strategy::probe_uffd_register(map.addr() as usize, size as usize, mode) {
                Ok(()) => accepted.push(mode.name()),
                Err(strategy::ProbeError::GuestMemfdRegister { source, .. })
                    if is_einval(&source) =>
                {
                    refused.push(mode.name())
                }
                Err(e) => return Ok(Check::Failed(probe_failure(&e))),
            }
        }
        Ok(match (accepted.is_empty(), refused.is_empty()) {
            (true, _) => Check::Unsupported(format!(
                "UFFDIO_REGISTER of a guest_memfd mapping: EINVAL for {}",
                refused.join(", ")
            )),
            (false, true) => Check::Supported(format!(
                "UFFDIO_REGISTER of a guest_memfd mapping accepted for {}",
                accepted.join(", ")
            )),
            (false, false) => Check::Supported(format!(
                "UFFDIO_REGISTER of a guest_memfd mapping accepted for {}, EINVAL for {}",
                accepted.join(", "),
                refused.join(", ")
            )),
        })
    };
    run().unwrap_or_else(|e| Check::Failed(e.to_string()))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn names(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join("|")
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel release:  {}", self.kernel_release)?;
        writeln!(f, "KVM flavour:     {}", self.kvm.flavour)?;
        write!(f, "/dev/kvm:        {}", self.kvm.dev_kvm)?;
        if let Some(v) = self.kvm.api_version {
            write!(f, ", API version {v}")?;
        }
        writeln!(f)?;
        match &self.kvm.caps {
            None => {}
            Some(Probed::Error(e)) => writeln!(f, "  capabilities: error: {e}")?,
            Some(Probed::Value(c)) => {
                writeln!(
                    f,
                    "  IRQCHIP {}, PIT2 {}, USER_MEMORY2 {}, GUEST_MEMFD {}",
                    yes_no(c.irqchip),
                    yes_no(c.pit2),
                    yes_no(c.user_memory2),
                    yes_no(c.guest_memfd)
                )?;
                writeln!(
                    f,
                    "  GUEST_MEMFD_FLAGS {:#x} ({})",
                    c.guest_memfd_flags,
                    names(&c.guest_memfd_flag_names)
                )?;
                writeln!(
                    f,
                    "  DIRTY_LOG_RING max {} bytes, DIRTY_LOG_RING_ACQ_REL max {} bytes",
                    c.dirty_log_ring_max_bytes, c.dirty_log_ring_acq_rel_max_bytes
                )?;
                writeln!(
                    f,
                    "  MANUAL_DIRTY_LOG_PROTECT2 {:#x} ({})",
                    c.manual_dirty_log_protect2,
                    names(&c.manual_dirty_log_protect2_names)
                )?;
                writeln!(
                    f,
                    "  NR_VCPUS {}, MAX_VCPUS {}, NR_MEMSLOTS {}, TSC {} kHz",
                    c.nr_vcpus, c.max_vcpus, c.nr_memslots, c.tsc_khz
                )?;
            }
        }
        let u = &self.userfaultfd;
        writeln!(
            f,
            "userfaultfd:     syscall {}, /dev/userfaultfd {}",
            u.syscall, u.dev_userfaultfd
        )?;
        match &u.features {
            Probed::Value(v) => writeln!(f, "  features {v:#x}: {}", names(&u.feature_names))?,
            Probed::Error(e) => writeln!(f, "  features: error: {e}")?,
        }
        writeln!(f, "huge page pools:")?;
        for p in &self.hugepages {
            let label = match p.page_size {
                PAGE_SIZE_1G => "1 GiB".to_string(),
                PAGE_SIZE_2M => "2 MiB".to_string(),
                other => format!("{} kB", other / 1024),
            };
            match &p.status {
                Probed::Value(s) => writeln!(
                    f,
                    "  {label}: {} total, {} free ({} reserved, {} surplus)",
                    s.total, s.free, s.reserved, s.surplus
                )?,
                Probed::Error(e) => writeln!(f, "  {label}: error: {e}")?,
            }
        }
        writeln!(f, "live checks:")?;
        writeln!(
            f,
            "  4 KiB UFFDIO_CONTINUE on hugetlb (HGM): {}",
            self.checks.hugetlb_4k_continue
        )?;
        writeln!(
            f,
            "  userfaultfd on guest_memfd: {}",
            self.checks.uffd_on_guest_memfd
        )?;
        write!(
            f,
            "  shmem guest RAM on 2 MiB folios: {}",
            self.checks.shmem_huge_folios
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{lock_hugepages, PoolReservation};

    #[test]
    fn feature_names_decode() {
        assert_eq!(
            uffd_feature_names(
                uffd_sys::UFFD_FEATURE_MINOR_HUGETLBFS | UFFD_FEATURE_MOVE | 1 << 40
            ),
            vec!["MINOR_HUGETLBFS", "MOVE", "bit 40"]
        );
        assert!(uffd_feature_names(0).is_empty());
    }

    #[test]
    fn probe_reports_this_host() {
        let _lock = lock_hugepages().unwrap();
        let before = hugepages::pool_status(PAGE_SIZE_2M).unwrap();
        // Make sure the HGM check can run: one free 2 MiB page.
        let _pool = PoolReservation::ensure_available(PAGE_SIZE_2M, 1).unwrap();
        let report = probe();
        let text = report.to_string();
        println!("{text}");
        let json = serde_json::to_string_pretty(&report).unwrap();
        println!("{json}");

        assert!(report.kvm.dev_kvm.available, "{text}");
        assert_eq!(report.kvm.api_version, Some(12));
        let Some(Probed::Value(caps)) = &report.kvm.caps else {
            panic!("no caps: {text}");
        };
        assert!(caps.user_memory2 && caps.nr_memslots > 0, "{text}");
        assert!(
            matches!(report.userfaultfd.features, Probed::Value(f) if f != 0),
            "{text}"
        );
        assert!(report.userfaultfd.syscall.available, "{text}");
        assert_eq!(report.hugepages.len(), 2);
        // The live checks must reach a verdict on this host; the guest_memfd one only where
        // KVM has guest_memfd (some hosts of this kind have none: then it says so).
        let mut checks = vec![
            &report.checks.hugetlb_4k_continue,
            &report.checks.shmem_huge_folios,
        ];
        if caps.guest_memfd {
            checks.push(&report.checks.uffd_on_guest_memfd);
        } else {
            assert!(
                matches!(&report.checks.uffd_on_guest_memfd, Check::Skipped(why) if why.contains("has no guest_memfd")),
                "{text}"
            );
            assert!(text.contains("GUEST_MEMFD no"), "{text}");
        }
        for check in checks {
            assert!(
                matches!(check, Check::Supported(_) | Check::Unsupported(_)),
                "{text}"
            );
        }
        assert!(
            text.contains("4 KiB UFFDIO_CONTINUE on hugetlb (HGM): "),
            "{text}"
        );
        assert!(json.contains("\"hugetlb_4k_continue\""), "{json}");
        drop(_pool);
        assert_eq!(
            hugepages::pool_status(PAGE_SIZE_2M).unwrap().total,
            before.total
        );
    }
}
