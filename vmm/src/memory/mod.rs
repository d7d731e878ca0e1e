//! Guest RAM: layout, backends and the alias mapping.
//!
//! Guest RAM is split around the 32-bit PCI hole ([`layout`]) into regions, one KVM memslot each.
//! Every region is backed by one of the [`Backing`] kinds; each backend maps the memory twice:
//! the *primary* mapping, whose address KVM is given as the memslot's `userspace_addr` and on which
//! vCPUs fault, and an *alias* mapping of the same pages that nothing faults on (postcopy writes
//! received pages through it). Anonymous private memory cannot be aliased; its alias is `None` and
//! postcopy fills it with `UFFDIO_COPY` instead.

pub mod anon;
pub mod guest_memfd;
pub mod hugepages;
pub mod hugetlb;
pub mod layout;
pub mod mapping;
pub mod shmem;
pub mod smaps;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    kvm_userspace_memory_region, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

pub use hugepages::{lock_hugepages, HugepageError, HugepageLock, PoolReservation, PoolStatus};
pub use layout::{MMIO_HOLE_END, MMIO_HOLE_SIZE, MMIO_HOLE_START};
pub use mapping::Mapping;

/// The backings: one definition, shared with the migration crate (its Config frame code) and
/// the harness.
pub use migration::types::Backing;

/// 4 KiB, the base page size.
pub const PAGE_SIZE_4K: u64 = migration::types::PAGE_SIZE;
/// 2 MiB huge page.
pub const PAGE_SIZE_2M: u64 = migration::types::HUGE_PAGE_2M;
/// 1 GiB huge page.
pub const PAGE_SIZE_1G: u64 = migration::types::HUGE_PAGE_1G;

/// Largest guest RAM accepted: 2^46 bytes (64 TiB), well inside x86-64 guest physical space.
pub const MAX_RAM_SIZE: u64 = 1 << 46;

/// Errors of guest memory set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be greater than zero")]
    ZeroSize,
    #[error(
        "guest memory size {size} bytes is not a multiple of the {backing} page size \
         ({page_size} bytes)"
    )]
    Unaligned {
        size: u64,
        backing: Backing,
        page_size: u64,
    },
    #[error("guest memory size {size} bytes is larger than the maximum {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error(
        "the {page_kib} kB huge page pool is too small for {backing} guest memory: {needed} pages \
         needed, {free} free ({total} in the pool); reserve them with: {command}"
    )]
    PoolTooSmall {
        backing: Backing,
        page_kib: u64,
        needed: u64,
        free: u64,
        total: u64,
        /// The shell command that grows the pool enough, e.g.
        /// `echo 4 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages`.
        command: String,
    },
    #[error("huge page pool: {0}")]
    Hugepages(#[from] HugepageError),
    #[error("memfd_create for {backing} guest memory failed: {source}")]
    Memfd { backing: Backing, source: io::Error },
    #[error("creating the shmem guest memory file on the VMM's huge tmpfs failed: {source}")]
    HugeTmpfsFile { source: io::Error },
    #[error("sizing the {backing} guest memory file to {size} bytes failed: {source}")]
    Truncate {
        backing: Backing,
        size: u64,
        source: io::Error,
    },
    #[error(
        "mmap of the {what} mapping of {size} bytes of {backing} guest memory failed: {source}"
    )]
    Mmap {
        backing: Backing,
        what: &'static str,
        size: u64,
        source: io::Error,
    },
    #[error(
        "this host's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0): use another backing \
         (anon, shmem, hugetlb-2m or hugetlb-1g); `vmm probe` shows what this host offers"
    )]
    GuestMemfdUnsupported,
    #[error("cannot open /dev/kvm and a VM to check for guest_memfd: {0}")]
    HostKvm(#[source] kvm_ioctls::Error),
    #[error(
        "this KVM cannot create guest_memfds with flags {wanted:#x} (MMAP|INIT_SHARED): \
         KVM_CAP_GUEST_MEMFD_FLAGS is {supported:#x}"
    )]
    GuestMemfdFlagsUnsupported { wanted: u64, supported: u64 },
    #[error("KVM_CREATE_GUEST_MEMFD of {size} bytes with flags {flags:#x} failed: {source}")]
    CreateGuestMemfd {
        size: u64,
        flags: u64,
        source: kvm_ioctls::Error,
    },
    #[error(
        "setting KVM memslot {slot} (guest {guest_addr:#x}+{size:#x}, flags {flags:#x}) failed: \
         {source}"
    )]
    SetMemslot {
        slot: u32,
        guest_addr: u64,
        size: u64,
        flags: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM cannot log dirty pages of {backing} memslots (guest_memfd slots are immutable)")]
    DirtyLogUnsupported { backing: Backing },
    #[error("guest physical range {addr:#x}+{len:#x} is not in guest RAM")]
    OutOfRange { addr: u64, len: u64 },
    #[error(
        "building the vm-memory view of guest RAM failed: region at {guest_addr:#x}: {source}"
    )]
    ViewRegion {
        guest_addr: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error(
        "building the vm-memory view of guest RAM failed: region at {guest_addr:#x} overflows"
    )]
    ViewOverflow { guest_addr: u64 },
    #[error("building the vm-memory view of guest RAM failed: {0}")]
    View(#[source] vm_memory::GuestRegionCollectionError),
    #[error("guest RAM region {index} cannot be described as a memslot")]
    NoMemslot { index: usize },
    #[error(
        "faulting in the huge pages of {backing} guest memory (region at {guest_addr:#x}, \
         {size} bytes) failed: {source}"
    )]
    Prefault {
        backing: Backing,
        guest_addr: u64,
        size: u64,
        source: io::Error,
    },
}

impl MemoryError {
    /// True if the error is an `mmap` that failed with ENOMEM.
    fn is_mmap_enomem(&self) -> bool {
        matches!(self, MemoryError::Mmap { source, .. } if source.raw_os_error() == Some(libc::ENOMEM))
    }
}

/// One contiguous range of guest RAM: one KVM memslot (slot number = index in
/// [`GuestRam::regions`]).
#[derive(Debug)]
pub struct Region {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of the backing's page size).
    pub size: u64,
    /// The mapping KVM's memslot points at; vCPUs fault here.
    pub primary: Mapping,
    /// A second mapping of the same pages that nothing faults on (`None` for anon).
    pub alias: Option<Mapping>,
    /// The file behind the region (memfd or guest_memfd), `None` for anon. One file per region.
    pub fd: Option<OwnedFd>,
    /// Offset of the region in `fd` (always 0: one file per region).
    pub fd_offset: u64,
    /// shmem on the VMM's huge tmpfs (see [`shmem`]): the page cache takes 2 MiB folios, so a
    /// range of it may be one folio that 4 KiB mappings share. false for every other backing.
    pub huge_folios: bool,
}

impl Region {
    /// True if `gpa..gpa+len` lies inside this region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.guest_addr && len <= self.size && gpa - self.guest_addr <= self.size - len
    }

    /// Raw fd behind the region, if any.
    pub fn raw_fd(&self) -> Option<i32> {
        self.fd.as_ref().map(|f| f.as_raw_fd())
    }

    /// Guest physical address one past the last byte.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// Sizes `fd` to `size` bytes.
fn truncate(backing: Backing, fd: &OwnedFd, size: usize) -> Result<(), MemoryError> {
    let len = libc::off_t::try_from(size).map_err(|_| MemoryError::TooLarge {
        size: size as u64,
        max: MAX_RAM_SIZE,
    })?;
    nix::unistd::ftruncate(fd, len).map_err(|e| MemoryError::Truncate {
        backing,
        size: size as u64,
        source: e.into(),
    })
}

/// Maps `fd` (offset 0, `size` bytes) twice, shared: the primary mapping and the alias.
fn map_file_region(
    backing: Backing,
    guest_addr: u64,
    size: usize,
    fd: OwnedFd,
) -> Result<Region, MemoryError> {
    let map = |what| {
        Mapping::shared(fd.as_fd(), 0, size).map_err(|source| MemoryError::Mmap {
            backing,
            what,
            size: size as u64,
            source,
        })
    };
    let primary = map("primary")?;
    let alias = map("alias")?;
    Ok(Region {
        guest_addr,
        size: size as u64,
        primary,
        alias: Some(alias),
        fd: Some(fd),
        fd_offset: 0,
        huge_folios: false,
    })
}

/// All of guest RAM: its regions (one memslot each), their mappings and files.
///
/// # Lifetime contract
/// `GuestRam` owns the mappings that KVM memslots and [`GuestRam::guest_memory`] views point at.
/// It must outlive every memslot registered from it (drop the VM, or delete the slots with
/// [`GuestRam::unregister`], first) and every `GuestMemoryMmap` view and raw pointer taken from
/// it: dropping it unmaps the memory (and gives huge pages back to the pool) while they would
/// still point at the old addresses.
#[derive(Debug)]
pub struct GuestRam {
    backing: Backing,
    size: u64,
    /// Non-owning vm-memory view over the primary mappings (cloned out by `guest_memory`).
    view: GuestMemoryMmap<()>,
    regions: Vec<Region>,
    /// Per region: whether its memslot is set bound to the guest_memfd (`KVM_MEM_GUEST_MEMFD`).
    /// A postcopy destination runs a guest_memfd region from a plain slot for good, so a
    /// dirty-log toggle must keep whichever binding the slot has
    /// (see [`GuestRam::set_slot_dirty_log`]).
    bound: Vec<AtomicBool>,
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM backed by `backing`, split around the 32-bit MMIO hole
    /// (see [`layout`]). `vm` is needed by the guest_memfd backing to create its files. Nothing is
    /// registered with KVM yet: call [`GuestRam::register`].
    ///
    /// Fails without leaving anything behind (mappings, files, huge page reservations) if `size`
    /// is zero, not a multiple of the backing's page size, or if a huge page pool is too small.
    pub fn new(backing: Backing, size: u64, vm: &VmFd) -> Result<GuestRam, MemoryError> {
        Self::validate(backing, size)?;
        if backing.is_hugetlb() {
            hugetlb::check_pool(backing, size)?;
        }
        let regions = match Self::map_regions(backing, size, vm) {
            Ok(regions) => regions,
            // The regions made so far are dropped (unmapped, closed) by now, so the pool state
            // read here is what a retry would see.
            Err(e) if backing.is_hugetlb() && e.is_mmap_enomem() => {
                hugetlb::check_pool(backing, size)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let view = Self::build_view(backing, &regions)?;
        let bound = regions.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(GuestRam {
            backing,
            size,
            view,
            regions,
            bound,
        })
    }

    /// Checks `size` for `backing` without allocating anything.
    pub fn validate(backing: Backing, size: u64) -> Result<(), MemoryError> {
        if size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if size > MAX_RAM_SIZE {
            return Err(MemoryError::TooLarge {
                size,
                max: MAX_RAM_SIZE,
            });
        }
        let page_size = backing.page_size();
        if !size.is_multiple_of(page_size) {
            return Err(MemoryError::Unaligned {
                size,
                backing,
                page_size,
            });
        }
        Ok(())
    }

    fn map_regions(backing: Backing, size: u64, vm: &VmFd) -> Result<Vec<Region>, MemoryError> {
        layout::ram_ranges(size)
            .into_iter()
            .map(|(guest_addr, len)| {
                let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge {
                    size,
                    max: MAX_RAM_SIZE,
                })?;
                match backing {
                    Backing::Anon => anon::region(guest_addr, len),
                    Backing::Shmem => shmem::region(guest_addr, len),
                    Backing::Hugetlb2m | Backing::Hugetlb1g => {
                        hugetlb::region(backing, guest_addr, len)
                    }
                    Backing::GuestMemfd => guest_memfd::region(vm, guest_addr, len),
                }
            })
            .collect()
    }

    fn build_view(
        backing: Backing,
        regions: &[Region],
    ) -> Result<GuestMemoryMmap<()>, MemoryError> {
        let flags = match backing {
            Backing::Anon => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            _ => libc::MAP_SHARED,
        };
        let mut view_regions = Vec::with_capacity(regions.len());
        for r in regions {
            // SAFETY: the primary mapping is a live read/write mapping of exactly this length,
            // owned by the `GuestRam` that the view must not outlive (see the type's contract).
            // `build_raw` makes a non-owning region: dropping the view does not unmap.
            let mmap = unsafe {
                MmapRegion::<()>::build_raw(
                    r.primary.as_ptr(),
                    r.primary.len(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                )
            }
            .map_err(|source| MemoryError::ViewRegion {
                guest_addr: r.guest_addr,
                source,
            })?;
            let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_addr)).ok_or(
                MemoryError::ViewOverflow {
                    guest_addr: r.guest_addr,
                },
            )?;
            view_regions.push(region);
        }
        GuestMemoryMmap::from_regions(view_regions).map_err(MemoryError::View)
    }

    /// The backing kind.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Total RAM size in bytes (without the hole).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The regions, in guest address order; region `i` is memslot `i`.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The index (= memslot) and region holding guest physical address `gpa`.
    pub fn region_of(&self, gpa: u64) -> Option<(usize, &Region)> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(gpa, 1))
    }

    /// The memslot description of region `index`, with `KVM_MEM_LOG_DIRTY_PAGES` if `dirty_log`
    /// (and `KVM_MEM_GUEST_MEMFD` plus the guest_memfd for that backing). `None` if no such
    /// region.
    pub fn memslot(&self, index: usize, dirty_log: bool) -> Option<kvm_userspace_memory_region2> {
        let r = self.regions.get(index)?;
        let slot = u32::try_from(index).ok()?;
        let mut flags = if dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        let (guest_memfd, guest_memfd_offset) = if self.backing == Backing::GuestMemfd {
            flags |= KVM_MEM_GUEST_MEMFD;
            let fd = r.raw_fd().and_then(|fd| u32::try_from(fd).ok())?;
            (fd, r.fd_offset)
        } else {
            (0, 0)
        };
        Some(kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.primary.addr(),
            guest_memfd_offset,
            guest_memfd,
            ..Default::default()
        })
    }

    fn set_memslot(
        &self,
        vm: &VmFd,
        slot: kvm_userspace_memory_region2,
    ) -> Result<(), MemoryError> {
        let result = if slot.flags & KVM_MEM_GUEST_MEMFD != 0 {
            // SAFETY: userspace_addr/memory_size describe a live mapping owned by `self`, which
            // must outlive the memslot (type contract); guest_memfd is this region's guest_memfd,
            // created on this VM; regions do not overlap.
            unsafe { vm.set_user_memory_region2(slot) }
        } else {
            // SAFETY: as above, without a guest_memfd.
            unsafe {
                vm.set_user_memory_region(kvm_userspace_memory_region {
                    slot: slot.slot,
                    flags: slot.flags,
                    guest_phys_addr: slot.guest_phys_addr,
                    memory_size: slot.memory_size,
                    userspace_addr: slot.userspace_addr,
                })
            }
        };
        result.map_err(|source| MemoryError::SetMemslot {
            slot: slot.slot,
            guest_addr: slot.guest_phys_addr,
            size: slot.memory_size,
            flags: slot.flags,
            source,
        })?;
        if let Some(b) = self.bound.get(slot.slot as usize) {
            let bound = slot.memory_size != 0 && slot.flags & KVM_MEM_GUEST_MEMFD != 0;
            b.store(bound, Ordering::Release);
        }
        Ok(())
    }

    fn set_all(&self, vm: &VmFd, dirty_log: bool) -> Result<(), MemoryError> {
        for index in 0..self.regions.len() {
            let slot = self
                .memslot(index, dirty_log)
                .ok_or(MemoryError::NoMemslot { index })?;
            self.set_memslot(vm, slot)?;
        }
        Ok(())
    }

    /// Registers every region as a KVM memslot (slot = region index), without flags (plus
    /// `KVM_MEM_GUEST_MEMFD` for guest_memfd). guest_memfd slots are immutable in KVM: register
    /// them once.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_all(vm, false)
    }

    /// Re-sets every memslot with (`enable`) or without `KVM_MEM_LOG_DIRTY_PAGES`. Enabling
    /// starts an empty dirty log. guest_memfd slots cannot log dirty pages.
    pub fn set_dirty_logging(&self, vm: &VmFd, enable: bool) -> Result<(), MemoryError> {
        if self.backing == Backing::GuestMemfd {
            return Err(MemoryError::DirtyLogUnsupported {
                backing: self.backing,
            });
        }
        self.set_all(vm, enable)
    }

    /// Sets memslot `index` alone. With `bind_guest_memfd` false a guest_memfd region is
    /// registered as a plain slot over its primary mapping (the postcopy destination stages it
    /// there; its collapse maps the guest_memfd over that mapping, and the slot stays plain).
    pub fn set_slot(
        &self,
        vm: &VmFd,
        index: usize,
        dirty_log: bool,
        bind_guest_memfd: bool,
    ) -> Result<(), MemoryError> {
        let r = self.regions.get(index).ok_or(MemoryError::OutOfRange {
            addr: index as u64,
            len: 0,
        })?;
        let mut slot = self
            .memslot(index, dirty_log)
            .ok_or(MemoryError::OutOfRange {
                addr: r.guest_addr,
                len: r.size,
            })?;
        if !bind_guest_memfd {
            slot.flags &= !KVM_MEM_GUEST_MEMFD;
            slot.guest_memfd = 0;
            slot.guest_memfd_offset = 0;
        }
        self.set_memslot(vm, slot)
    }

    /// Re-sets memslot `index` with (`dirty_log`) or without `KVM_MEM_LOG_DIRTY_PAGES`, bound to
    /// its guest_memfd exactly if it is bound now (KVM cannot change that binding in place).
    pub fn set_slot_dirty_log(
        &self,
        vm: &VmFd,
        index: usize,
        dirty_log: bool,
    ) -> Result<(), MemoryError> {
        self.set_slot(vm, index, dirty_log, self.slot_bound(index))
    }

    /// Whether memslot `index` is set bound to its guest_memfd.
    pub fn slot_bound(&self, index: usize) -> bool {
        self.bound
            .get(index)
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    /// Deletes every memslot of this RAM from `vm` (memory_size 0), after which `self` may be
    /// dropped while the VM lives on.
    pub fn unregister(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for index in 0..self.regions.len() {
            if let Some(mut slot) = self.memslot(index, false) {
                slot.memory_size = 0;
                self.set_memslot(vm, slot)?;
            }
        }
        Ok(())
    }

    /// A non-owning vm-memory view of the primary mappings, for linux-loader and device access.
    /// It must not outlive `self` (see the type's contract).
    pub fn guest_memory(&self) -> GuestMemoryMmap<()> {
        self.view.clone()
    }

    fn locate(&self, gpa: u64, len: u64) -> Result<(&Region, usize), MemoryError> {
        self.regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .map(|r| (r, (gpa - r.guest_addr) as usize))
            .ok_or(MemoryError::OutOfRange { addr: gpa, len })
    }

    /// Host pointer to `gpa` in the primary mapping; `gpa..gpa+len` must lie in one region.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, MemoryError> {
        let (r, offset) = self.locate(gpa, len)?;
        r.primary
            .ptr_at(offset, len as usize)
            .ok_or(MemoryError::OutOfRange { addr: gpa, len })
    }

    /// Host pointer to `gpa` in the alias mapping (`None` for anon, which has no alias);
    /// `gpa..gpa+len` must lie in one region.
    pub fn alias_ptr(&self, gpa: u64, len: u64) -> Result<Option<*mut u8>, MemoryError> {
        let (r, offset) = self.locate(gpa, len)?;
        match &r.alias {
            None => Ok(None),
            Some(alias) => alias
                .ptr_at(offset, len as usize)
                .map(Some)
                .ok_or(MemoryError::OutOfRange { addr: gpa, len }),
        }
    }

    /// True if [`GuestRam::prefault`] allocates region `r` up front: hugetlb, shmem on 2 MiB
    /// folios ([`Region::huge_folios`]), and guest_memfd.
    fn prefaulted(&self, r: &Region) -> bool {
        self.backing.is_hugetlb() || r.huge_folios || self.backing == Backing::GuestMemfd
    }

    /// True if [`GuestRam::prefault`] has anything to do.
    pub fn prefaults(&self) -> bool {
        self.regions
            .iter()
            .any(|r| r.alias.is_some() && self.prefaulted(r))
    }

    /// Allocate and zero guest RAM now, through the alias mapping (MADV_POPULATE_WRITE),
    /// instead of at the first write: hugetlb, shmem on 2 MiB folios, and guest_memfd (a no-op
    /// for the others).
    ///
    /// A migration destination calls this before it tells the source it is ready, so the
    /// cost (zeroing all of guest RAM; on this host the outer hypervisor also backs each page
    /// lazily) is paid while the source still runs, not while vCPUs wait on postcopy faults
    /// (a 4 KiB fault that allocated a 2 MiB folio would zero all of it first) or by the
    /// postcopy push (a guest_memfd folio per 4 KiB written).
    /// It also keeps slow huge-page faults, which hold the mmap lock for their whole duration,
    /// from delaying the `mmap(MAP_FIXED)` of a collapse. hugetlb pages are reserved at mmap
    /// time anyway, so this costs no memory; shmem's and guest_memfd's take the memory the
    /// guest will use. anon and shmem on 4 KiB folios are left to fill as pages arrive: their
    /// never-sent pages stay unallocated.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        for r in &self.regions {
            let Some(alias) = &r.alias else { continue };
            if !self.prefaulted(r) {
                continue;
            }
            // SAFETY: the alias mapping is owned by this region and covers exactly its `len`
            // bytes; MADV_POPULATE_WRITE only faults pages in (zero-filled pages of the shared
            // file) and does not change their contents; the result is checked.
            let rc = unsafe {
                libc::madvise(
                    alias.as_ptr() as *mut libc::c_void,
                    alias.len(),
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                return Err(MemoryError::Prefault {
                    backing: self.backing,
                    guest_addr: r.guest_addr,
                    size: r.size,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// `(start, len)` of every RAM range, for the e820 map.
    pub fn e820_ram(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect()
    }
}

#[cfg(test)]
mod tests;
