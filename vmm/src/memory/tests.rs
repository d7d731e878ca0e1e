//! Tests of guest RAM against the real KVM and real huge page pools.

use super::*;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn vm() -> VmFd {
    Kvm::new().unwrap().create_vm().unwrap()
}

/// Creates RAM, registers it, writes through the primary mapping and the vm-memory view, and
/// reads the bytes back through the alias (or the primary mapping for anon).
fn round_trip(backing: Backing, size: u64) -> GuestRam {
    let vm = vm();
    let ram = GuestRam::new(backing, size, &vm).unwrap();
    assert_eq!(ram.backing(), backing);
    assert_eq!(ram.size(), size);
    assert_eq!(ram.regions().len(), 1);
    ram.register(&vm).unwrap();

    let last = size - 8;
    for (gpa, value) in [
        (0u64, 0x1122_3344_5566_7788u64),
        (last, 0xdead_beef_0bad_f00d),
    ] {
        let p = ram.host_ptr(gpa, 8).unwrap().cast::<u64>();
        // SAFETY: 8 bytes inside the live primary mapping.
        unsafe { p.write_volatile(value) };
        let seen = match ram.alias_ptr(gpa, 8).unwrap() {
            // SAFETY: 8 bytes inside the live alias mapping.
            Some(a) => unsafe { a.cast::<u64>().read_volatile() },
            None => {
                assert_eq!(backing, Backing::Anon);
                // SAFETY: as above, primary mapping.
                unsafe { p.read_volatile() }
            }
        };
        assert_eq!(seen, value, "{backing} at {gpa:#x}");
    }

    // Device-style access through the vm-memory view lands in the same pages.
    let mem = ram.guest_memory();
    mem.write_obj(0xabcd_u32, GuestAddress(4096)).unwrap();
    let p = ram.host_ptr(4096, 4).unwrap().cast::<u32>();
    // SAFETY: 4 bytes inside the live primary mapping.
    assert_eq!(unsafe { p.read_volatile() }, 0xabcd);
    if let Some(a) = ram.alias_ptr(4096, 4).unwrap() {
        // SAFETY: 4 bytes inside the live alias mapping.
        assert_eq!(unsafe { a.cast::<u32>().read_volatile() }, 0xabcd);
    }
    assert!(mem.read_obj::<u8>(GuestAddress(size)).is_err());
    ram
}

#[test]
fn backing_names_round_trip() {
    for b in Backing::ALL {
        assert_eq!(b.name().parse::<Backing>().unwrap(), b);
        assert_eq!(b.to_string(), b.name());
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, format!("\"{}\"", b.name()));
        assert_eq!(serde_json::from_str::<Backing>(&json).unwrap(), b);
    }
    // The spellings the docs, the API schema and the harness use.
    assert_eq!(
        Backing::ALL.map(Backing::name),
        ["anon", "shmem", "hugetlb-2m", "hugetlb-1g", "guest-memfd"]
    );
    let err = "huge".parse::<Backing>().unwrap_err().to_string();
    assert!(err.contains("unknown backing 'huge'"), "{err}");
}

#[test]
fn anon_round_trip_has_no_alias() {
    let ram = round_trip(Backing::Anon, 4 * MIB);
    let r = &ram.regions()[0];
    assert!(r.alias.is_none() && r.fd.is_none());
}

#[test]
fn shmem_round_trip() {
    let ram = round_trip(Backing::Shmem, 4 * MIB);
    let r = &ram.regions()[0];
    assert!(r.alias.is_some() && r.fd.is_some());
    assert_ne!(r.primary.addr(), r.alias.as_ref().unwrap().addr());
}

/// As root, shmem guest RAM lives on the VMM's private huge tmpfs: prefaulting it (what a
/// postcopy destination does before Ready) allocates 2 MiB folios, which the alias maps whole.
/// Nothing is left mounted: the instance is detached.
#[test]
fn shmem_ram_is_on_2m_folios_as_root_and_prefaults_whole() {
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ram = round_trip(Backing::Shmem, 4 * MIB);
    let r = &ram.regions()[0];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!r.huge_folios && !ram.prefaults());
        return;
    }
    assert!(r.huge_folios && ram.prefaults());
    ram.prefault().unwrap();
    let alias = r.alias.as_ref().unwrap();
    assert_eq!(alias.addr() % PAGE_SIZE_2M, 0, "alias not 2 MiB aligned");
    // What was written before the prefault is still there.
    let p = ram.alias_ptr(4096, 4).unwrap().unwrap();
    // SAFETY: 4 bytes inside the live alias mapping.
    assert_eq!(unsafe { p.cast::<u32>().read_volatile() }, 0xabcd);
    assert_eq!(
        shmem::pmd_mapped_kb(alias.addr()).unwrap(),
        4 * 1024,
        "the prefaulted alias is not mapped by 2 MiB folios"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        mounts_before,
        "the huge tmpfs showed up in the mount table"
    );
}

/// Whether this host's KVM has guest_memfd. Where it has none, checks instead that guest_memfd
/// RAM is refused with the error that says so, and returns false (the caller then ends).
fn guest_memfd_or_refusal() -> bool {
    let vm = vm();
    if vm.check_extension(kvm_ioctls::Cap::GuestMemfd) {
        return true;
    }
    let err = GuestRam::new(Backing::GuestMemfd, 4 * MIB, &vm).unwrap_err();
    assert!(matches!(err, MemoryError::GuestMemfdUnsupported), "{err}");
    assert!(err.to_string().contains("has no guest_memfd"), "{err}");
    assert!(matches!(
        guest_memfd::check_host(),
        Err(MemoryError::GuestMemfdUnsupported)
    ));
    false
}

#[test]
fn guest_memfd_round_trip() {
    if !guest_memfd_or_refusal() {
        return;
    }
    let ram = round_trip(Backing::GuestMemfd, 4 * MIB);
    let slot = ram.memslot(0, false).unwrap();
    assert_eq!(slot.flags, KVM_MEM_GUEST_MEMFD);
    assert_eq!(slot.guest_memfd as i32, ram.regions()[0].raw_fd().unwrap());
}

/// Runs `f` holding the huge page lock, with `pages` pages of `page_size` available, and checks
/// that the pool size (`nr_hugepages`) is as before afterwards. (Free counts are not compared:
/// a VM started by hand under `ci/hugepages.sh with` uses the pool without holding the lock.)
fn with_pool(page_size: u64, pages: u64, f: impl FnOnce()) {
    let _lock = lock_hugepages().unwrap();
    let before = hugepages::pool_status(page_size).unwrap();
    {
        let _r = PoolReservation::ensure_available(page_size, pages).unwrap();
        f();
    }
    assert_eq!(
        hugepages::pool_status(page_size).unwrap().total,
        before.total
    );
}

#[test]
fn hugetlb_2m_round_trip_gives_pages_back() {
    with_pool(PAGE_SIZE_2M, 2, || {
        let avail = hugepages::pool_status(PAGE_SIZE_2M).unwrap().available();
        let ram = round_trip(Backing::Hugetlb2m, 4 * MIB);
        let s = hugepages::pool_status(PAGE_SIZE_2M).unwrap();
        assert_eq!(
            s.available(),
            avail - 2,
            "the mapping reserves its pages: {s:?}"
        );
        drop(ram);
        let s = hugepages::pool_status(PAGE_SIZE_2M).unwrap();
        assert_eq!(s.available(), avail, "drop gives the pages back: {s:?}");
    });
}

#[test]
fn hugetlb_1g_round_trip_gives_pages_back() {
    with_pool(PAGE_SIZE_1G, 1, || {
        let avail = hugepages::pool_status(PAGE_SIZE_1G).unwrap().available();
        let ram = round_trip(Backing::Hugetlb1g, GIB);
        assert_eq!(ram.regions()[0].primary.addr() % GIB, 0);
        assert_eq!(
            hugepages::pool_status(PAGE_SIZE_1G).unwrap().available(),
            avail - 1
        );
        drop(ram);
        assert_eq!(
            hugepages::pool_status(PAGE_SIZE_1G).unwrap().available(),
            avail
        );
    });
}

#[test]
fn ram_above_3g_is_split_around_the_hole() {
    let vm = vm();
    let ram = GuestRam::new(Backing::Anon, 4 * GIB, &vm).unwrap();
    ram.register(&vm).unwrap();
    let regions = ram.regions();
    assert_eq!(regions.len(), 2);
    assert_eq!((regions[0].guest_addr, regions[0].size), (0, 3 * GIB));
    assert_eq!((regions[1].guest_addr, regions[1].size), (4 * GIB, GIB));
    assert_eq!(ram.e820_ram(), vec![(0, 3 * GIB), (4 * GIB, GIB)]);
    assert_eq!(ram.region_of(4 * GIB).unwrap().0, 1);
    assert!(ram.region_of(3 * GIB).is_none());

    // The hole is not RAM; a range may not straddle regions.
    for (gpa, len) in [(3 * GIB, 4096), (3 * GIB - 4096, 8192), (5 * GIB, 1)] {
        let err = ram.host_ptr(gpa, len).unwrap_err();
        assert!(matches!(err, MemoryError::OutOfRange { .. }), "{err}");
    }
    let p = ram.host_ptr(4 * GIB, 8).unwrap();
    assert_eq!(p, regions[1].primary.as_ptr());
    // SAFETY: 8 bytes inside the live primary mapping.
    unsafe { p.cast::<u64>().write_volatile(7) };
    let mem = ram.guest_memory();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(4 * GIB)).unwrap(), 7);
    assert!(mem.read_obj::<u8>(GuestAddress(3 * GIB)).is_err());
}

#[test]
fn dirty_logging_toggles_and_the_log_can_be_read() {
    let vm = vm();
    let ram = GuestRam::new(Backing::Shmem, 4 * MIB, &vm).unwrap();
    ram.register(&vm).unwrap();
    // Without KVM_MEM_LOG_DIRTY_PAGES KVM refuses to hand out a log.
    assert!(vm.get_dirty_log(0, 4 * MIB as usize).is_err());
    ram.set_dirty_logging(&vm, true).unwrap();
    let log = vm.get_dirty_log(0, 4 * MIB as usize).unwrap();
    assert_eq!(log.len(), 1024 / 64);
    ram.set_dirty_logging(&vm, false).unwrap();
    assert!(vm.get_dirty_log(0, 4 * MIB as usize).is_err());
    ram.unregister(&vm).unwrap();
}

#[test]
fn guest_memfd_refuses_dirty_logging() {
    if !guest_memfd_or_refusal() {
        return;
    }
    let vm = vm();
    let ram = GuestRam::new(Backing::GuestMemfd, 4 * MIB, &vm).unwrap();
    ram.register(&vm).unwrap();
    let err = ram.set_dirty_logging(&vm, true).unwrap_err();
    assert!(
        matches!(err, MemoryError::DirtyLogUnsupported { .. }),
        "{err}"
    );
}

#[test]
fn bad_sizes_are_refused_with_clear_messages() {
    let vm = vm();
    for b in Backing::ALL {
        let err = GuestRam::new(b, 0, &vm).unwrap_err();
        assert!(matches!(err, MemoryError::ZeroSize), "{b}: {err}");
        assert_eq!(
            err.to_string(),
            "guest memory size must be greater than zero"
        );
    }
    let err = GuestRam::new(Backing::Shmem, 4096 + 1, &vm).unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest memory size 4097 bytes is not a multiple of the shmem page size (4096 bytes)"
    );
    let err = GuestRam::new(Backing::Hugetlb2m, 3 * MIB, &vm).unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest memory size 3145728 bytes is not a multiple of the hugetlb-2m page size \
         (2097152 bytes)"
    );
    let err = GuestRam::new(Backing::Hugetlb1g, 3 * GIB / 2, &vm).unwrap_err();
    assert!(
        matches!(
            err,
            MemoryError::Unaligned {
                page_size: PAGE_SIZE_1G,
                ..
            }
        ),
        "{err}"
    );
    let err = GuestRam::new(Backing::Anon, 1 << 60, &vm).unwrap_err();
    assert!(matches!(err, MemoryError::TooLarge { .. }), "{err}");
}

#[test]
fn too_small_pool_says_what_to_reserve_and_leaves_nothing() {
    let _lock = lock_hugepages().unwrap();
    let vm = vm();
    let before = hugepages::pool_status(PAGE_SIZE_1G).unwrap();
    // More 1 GiB pages than the pool has: 64 GiB, split 3 + 61 around the hole.
    let needed = before.available() + 64;
    let err = GuestRam::new(Backing::Hugetlb1g, needed * GIB, &vm).unwrap_err();
    let msg = err.to_string();
    match err {
        MemoryError::PoolTooSmall {
            needed: n,
            free,
            total,
            ..
        } => {
            assert_eq!(n, needed);
            assert_eq!(free, before.available());
            assert_eq!(total, before.total);
        }
        other => panic!("expected PoolTooSmall, got {other}"),
    }
    let want_total = before.total + 64;
    assert!(
        msg.contains(&format!(
            "{needed} pages needed, {} free",
            before.available()
        )),
        "{msg}"
    );
    assert!(
        msg.ends_with(&format!(
            "echo {want_total} > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
        )),
        "{msg}"
    );
    assert_eq!(
        hugepages::pool_status(PAGE_SIZE_1G).unwrap().total,
        before.total
    );
}

/// Runs a real-mode guest that stores a word at guest 0x2000 and halts; returns what the VMM
/// then reads through the alias (or the primary mapping for anon).
fn guest_store_seen_by_vmm(backing: Backing, size: u64) -> u16 {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let ram = GuestRam::new(backing, size, &vm).unwrap();
    ram.register(&vm).unwrap();
    // mov ax, 0x5a17; mov [0x2000], ax; hlt
    let code = [0xb8, 0x17, 0x5a, 0xa3, 0x00, 0x20, 0xf4];
    ram.guest_memory()
        .write_slice(&code, GuestAddress(0x1000))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    loop {
        match vcpu.run() {
            Ok(kvm_ioctls::VcpuExit::Hlt) => break,
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => continue,
            other => panic!("{backing}: unexpected exit {other:?}"),
        }
    }
    let p = ram
        .alias_ptr(0x2000, 2)
        .unwrap()
        .unwrap_or(ram.host_ptr(0x2000, 2).unwrap());
    // SAFETY: 2 bytes inside a live mapping of guest RAM.
    unsafe { p.cast::<u16>().read_volatile() }
}

#[test]
fn a_guest_store_is_seen_through_the_alias() {
    let mut backings = vec![Backing::Anon, Backing::Shmem];
    if guest_memfd_or_refusal() {
        backings.push(Backing::GuestMemfd);
    }
    for backing in backings {
        assert_eq!(
            guest_store_seen_by_vmm(backing, 4 * MIB),
            0x5a17,
            "{backing}"
        );
    }
    with_pool(PAGE_SIZE_2M, 2, || {
        assert_eq!(guest_store_seen_by_vmm(Backing::Hugetlb2m, 4 * MIB), 0x5a17);
    });
}

#[test]
fn guest_ram_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GuestRam>();
    assert_send_sync::<Region>();
    assert_send_sync::<Mapping>();
}
