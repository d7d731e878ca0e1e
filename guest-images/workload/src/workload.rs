//! The ring-3 workload: passes over the span, verification, timing and the report.
//!
//! Pass 1 writes every page of the vCPU's share (generation 1), timing the first access to
//! each page. Later passes visit pages in the chosen pattern, time the first access,
//! verify the whole page against its recorded generation, and rewrite `writes`% of the
//! visited pages with the next generation. After each pass all vCPUs meet at a barrier in
//! guest memory and vCPU 0 prints the pass line; after the last pass it prints the
//! histograms and the result and ends the VM (exit code 0 = ok, 1 = mismatches).

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::boot::{FREE_START, MAPPED_LIMIT, MAX_VCPUS, USED_1G_PAGES};
use crate::bootparams::BootParams;
use crate::cmdline::{self, Fault, Options};
use crate::console;
use crate::hist::{Hist, SUB_BUCKETS};
use crate::layout::{Layout, PAGE};
use crate::order::Order;
use crate::pattern::{self, mix64};
use crate::tsc::{self, Clock};

const MAX: usize = MAX_VCPUS as usize;
/// Most MISMATCH lines printed in total.
const MAX_MISMATCH_LINES: u64 = 16;
/// Exit code for an unusable command line or memory layout.
const SETUP_EXIT_CODE: u8 = 2;

/// Counter of barrier arrivals (cumulative over all barriers).
static BARRIER: AtomicU64 = AtomicU64::new(0);
/// MISMATCH lines printed so far (all vCPUs).
static MISMATCH_LINES: AtomicU64 = AtomicU64::new(0);
/// Per vCPU, per pass parity: cumulative (accesses, mismatches, slow accesses) at the end of
/// the pass. vCPU 0 reads slot pass%2 after the barrier; the owner cannot overwrite it before
/// vCPU 0 has reached the next barrier.
static SNAPSHOTS: [[[AtomicU64; 3]; 2]; MAX] =
    [const { [const { [const { AtomicU64::new(0) }; 3] }; 2] }; MAX];
/// First-touch latencies of pass 1, per vCPU.
static FIRST_TOUCH: [Hist; MAX] = [const { Hist::new() }; MAX];
/// Slow accesses (> 2000 ns) of later passes, per vCPU.
static ACCESS_SLOW: [Hist; MAX] = [const { Hist::new() }; MAX];
/// The same slow accesses per pass, per vCPU, by pass parity: a vCPU records pass K into
/// slot K%2; vCPU 0 prints and clears slot K%2 after barrier K+1, before it arrives at barrier
/// K+2, and no vCPU can start pass K+2 (the next user of the slot) before that barrier.
static PASS_SLOW: [[Hist; 2]; MAX] = [const { [const { Hist::new() }; 2] }; MAX];
/// Stalls: iterations of a pass's inner loop that took longer than the stall threshold
/// ([`Clock::stall_threshold`]), measured from the start of one iteration to the start of the
/// next, per vCPU, whole run. Whatever held the vCPU up counts: a fault on the timed page, on
/// the generation array, on code, stack or page-table pages, or the host not running it.
static STALL: [Hist; MAX] = [const { Hist::new() }; MAX];
/// The same stalls per pass, by pass parity (as [`PASS_SLOW`]).
static PASS_STALL: [[Hist; 2]; MAX] = [const { [const { Hist::new() }; 2] }; MAX];

/// Cumulative counters of one vCPU.
#[derive(Default, Clone, Copy)]
struct Counters {
    accesses: u64,
    mismatches: u64,
    slow: u64,
}

/// What one vCPU needs to run its passes.
struct Worker<'a> {
    vcpu: u64,
    layout: &'a Layout,
    opts: &'a Options,
    clock: Clock,
    first: u64,
    count: u64,
    counters: Counters,
}

/// Arrives at barrier number `k` (1-based) of `vcpus` and waits for everyone.
fn barrier(vcpus: u64, k: u64) {
    BARRIER.fetch_add(1, Ordering::AcqRel);
    while BARRIER.load(Ordering::Acquire) < vcpus * k {
        core::hint::spin_loop();
    }
}

/// Reports a setup failure (vCPU 0) and stops; other vCPUs just wait for the exit.
fn fail(vcpu: u64, what: &str, detail: &[u8]) -> ! {
    if vcpu == 0 {
        console::with(|w| {
            let _ = write!(w, "WORKLOAD ERROR {what}");
            if !detail.is_empty() {
                let _ = w.write_str(" '");
                for &b in detail.iter().take(64) {
                    let c = if b.is_ascii_graphic() { b as char } else { '?' };
                    let _ = w.write_char(c);
                }
                let _ = w.write_str("'");
            }
            let _ = w.write_str("\n");
        });
        console::exit(SETUP_EXIT_CODE)
    }
    park()
}

/// Raises the requested CPU exception (test hook for the stub's exception report).
fn raise(fault: Fault, mapped_limit: u64) {
    match fault {
        // SAFETY: deliberately faults; the stub's handler reports it and ends the VM.
        Fault::Page => unsafe {
            core::ptr::read_volatile((mapped_limit + 0x1000) as *const u64);
        },
        // SAFETY: as above (a non-canonical address).
        Fault::GeneralProtection => unsafe {
            core::ptr::read_volatile(0x8000_0000_0000_0000u64 as *const u64);
        },
        // SAFETY: as above.
        Fault::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
    }
}

/// Spins forever (ring 3 cannot halt).
fn park() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// Entry of every vCPU in ring 3.
pub fn run(vcpu: u64, boot_params: u64, vcpus: u64) -> ! {
    let vcpus = vcpus.clamp(1, MAX_VCPUS);
    let bp = BootParams::new(boot_params);
    let opts = match cmdline::parse(bp.cmdline()) {
        Ok(o) => o,
        Err(bad) => fail(vcpu, "bad option", bad.word),
    };
    let free_start = FREE_START.load(Ordering::Acquire);
    let mapped_limit = MAPPED_LIMIT.load(Ordering::Acquire);
    let layout = match Layout::new(&bp, free_start, mapped_limit, opts.span) {
        Ok(l) => l,
        Err(_) => fail(vcpu, "no usable RAM for the span", b""),
    };
    let clock = Clock::new(opts.tsc_khz);
    if vcpu == 0 {
        print_start(vcpus, &layout, &opts, &clock);
        if let Some(f) = opts.fault {
            raise(f, mapped_limit);
        }
    }
    let (first, count) = layout.share(vcpu, vcpus);
    let mut w = Worker {
        vcpu,
        layout: &layout,
        opts: &opts,
        clock,
        first,
        count,
        counters: Counters::default(),
    };

    barrier(vcpus, 1);
    let mut pass_start = tsc::now();
    let mut reported = Counters::default();
    let mut pass = 1;
    loop {
        if pass == 1 {
            w.first_pass();
        } else {
            w.later_pass(pass);
        }
        let slot = &SNAPSHOTS[vcpu as usize][(pass % 2) as usize];
        slot[0].store(w.counters.accesses, Ordering::Relaxed);
        slot[1].store(w.counters.mismatches, Ordering::Relaxed);
        slot[2].store(w.counters.slow, Ordering::Relaxed);
        barrier(vcpus, pass + 1);
        if vcpu == 0 {
            let now = tsc::now();
            let total = sum_snapshots(vcpus, pass);
            print_pass(pass, &total, &reported, clock.ms_of(now - pass_start));
            if total.slow > reported.slow {
                print_pass_hist(&PASS_SLOW, "access_slow", vcpus, pass, &clock);
            }
            print_pass_hist(&PASS_STALL, "stall", vcpus, pass, &clock);
            reported = total;
            pass_start = now;
        }
        if opts.passes != 0 && pass == opts.passes {
            break;
        }
        pass += 1;
    }
    if vcpu != 0 {
        park();
    }
    let total = sum_snapshots(vcpus, pass);
    let code = print_result(vcpus, &layout, &clock, pass, &total);
    console::exit(code)
}

/// Times the iterations of one pass's inner loop and records those over the stall threshold.
struct StallClock<'a> {
    clock: Clock,
    threshold: u64,
    run: &'a Hist,
    pass: &'a Hist,
    /// TSC at the start of the current iteration (None before the first).
    last: Option<u64>,
}

impl<'a> StallClock<'a> {
    fn new(vcpu: u64, pass: u64, clock: Clock) -> Self {
        StallClock {
            clock,
            threshold: clock.stall_threshold(),
            run: &STALL[vcpu as usize],
            pass: &PASS_STALL[vcpu as usize][(pass % 2) as usize],
            last: None,
        }
    }

    /// An iteration starts at TSC `now`: the previous one (if any) lasted `now - last`.
    #[inline(always)]
    fn tick(&mut self, now: u64) {
        if let Some(last) = self.last {
            // A TSC that went backwards (it should not: the VMM restores it) is no stall.
            let d = self.clock.unit_of(now.saturating_sub(last));
            if d > self.threshold {
                self.run.record(d);
                self.pass.record(d);
            }
        }
        self.last = Some(now);
    }
}

impl Worker<'_> {
    /// Pointer to the generation number of span page `index`.
    fn gen_ptr(&self, index: u64) -> *mut u32 {
        (self.layout.gen_base + 4 * index) as *mut u32
    }

    /// Writes every page of the share with generation 1, timing each first touch.
    fn first_pass(&mut self) {
        let order = Order::new(self.opts.pattern, self.count, self.opts.seed, self.vcpu, 1);
        let hist = &FIRST_TOUCH[self.vcpu as usize];
        let mut stalls = StallClock::new(self.vcpu, 1, self.clock);
        for i in 0..order.len() {
            let index = self.first + order.page(i);
            let gpa = self.layout.gpa(index);
            let base = pattern::page_base(gpa, 1, self.opts.seed);
            let t0 = tsc::now();
            stalls.tick(t0);
            // SAFETY: `gpa` is a span page of this vCPU's share (shares are disjoint), in
            // identity-mapped RAM outside the image, page tables and generation array.
            unsafe { pattern::write_first(gpa, base) };
            let t1 = tsc::now();
            hist.record(self.clock.unit_of(t1.wrapping_sub(t0)));
            // SAFETY: as above; the generation entry of a page of this share is only
            // touched by this vCPU and lies in RAM reserved for the array.
            unsafe {
                pattern::fill_rest(gpa, base);
                self.gen_ptr(index).write(1);
            }
            self.counters.accesses += 1;
        }
        stalls.tick(tsc::now());
    }

    /// Visits the share in the pass's order: time, verify, maybe rewrite.
    fn later_pass(&mut self, pass: u64) {
        let order = Order::new(
            self.opts.pattern,
            self.count,
            self.opts.seed,
            self.vcpu,
            pass,
        );
        let slow_hist = &ACCESS_SLOW[self.vcpu as usize];
        let pass_hist = &PASS_SLOW[self.vcpu as usize][(pass % 2) as usize];
        let threshold = self.clock.slow_threshold();
        let write_key = mix64(self.opts.seed ^ mix64(pass ^ 0x5752_4954_4553));
        let mut stalls = StallClock::new(self.vcpu, pass, self.clock);
        for i in 0..order.len() {
            let index = self.first + order.page(i);
            let gpa = self.layout.gpa(index);
            let t0 = tsc::now();
            stalls.tick(t0);
            // SAFETY: as in `first_pass`.
            let _ = unsafe { pattern::read_first(gpa) };
            let t1 = tsc::now();
            let d = self.clock.unit_of(t1.wrapping_sub(t0));
            if d > threshold {
                self.counters.slow += 1;
                slow_hist.record(d);
                pass_hist.record(d);
            }
            // SAFETY: as in `first_pass`.
            let gen = unsafe { self.gen_ptr(index).read() };
            let base = pattern::page_base(gpa, gen, self.opts.seed);
            // SAFETY: as in `first_pass`.
            let bad = unsafe { pattern::check(gpa, base) };
            let rewrite = mix64(write_key ^ index) % 100 < self.opts.writes;
            if let Some((at, expected, found)) = bad {
                self.counters.mismatches += 1;
                self.report_mismatch(at, expected, found);
            }
            if rewrite || bad.is_some() {
                // A bad page is repaired with its current generation, so it counts once.
                let gen = if rewrite {
                    gen.wrapping_add(1).max(1)
                } else {
                    gen
                };
                let base = pattern::page_base(gpa, gen, self.opts.seed);
                // SAFETY: as in `first_pass`.
                unsafe {
                    pattern::write_first(gpa, base);
                    pattern::fill_rest(gpa, base);
                    self.gen_ptr(index).write(gen);
                }
            }
            self.counters.accesses += 1;
        }
        stalls.tick(tsc::now());
    }

    fn report_mismatch(&self, gpa: u64, expected: u64, found: u64) {
        if MISMATCH_LINES.fetch_add(1, Ordering::Relaxed) < MAX_MISMATCH_LINES {
            console::with(|w| {
                let _ = writeln!(
                    w,
                    "WORKLOAD MISMATCH gpa={gpa:#x} expected={expected:#x} found={found:#x} vcpu={}",
                    self.vcpu
                );
            });
        }
    }
}

/// Sum of every vCPU's counters at the end of `pass`.
fn sum_snapshots(vcpus: u64, pass: u64) -> Counters {
    let mut c = Counters::default();
    for snap in SNAPSHOTS.iter().take(vcpus as usize) {
        let slot = &snap[(pass % 2) as usize];
        c.accesses += slot[0].load(Ordering::Relaxed);
        c.mismatches += slot[1].load(Ordering::Relaxed);
        c.slow += slot[2].load(Ordering::Relaxed);
    }
    c
}

fn print_start(vcpus: u64, layout: &Layout, o: &Options, clock: &Clock) {
    let pt = if USED_1G_PAGES.load(Ordering::Relaxed) == 1 {
        "1g"
    } else {
        "2m"
    };
    // Which VMM, from the boot path: the PVH entry is QEMU's, the 64-bit entry ours.
    let (vmm, boot) = if crate::boot::on_qemu() {
        ("qemu", "pvh")
    } else {
        ("vmm", "elf64")
    };
    console::with(|w| {
        let _ = writeln!(
            w,
            "WORKLOAD start vcpus={vcpus} span_bytes={} pages={} pattern={} writes={} passes={} seed={} tsc_khz={} pt={pt} usable_bytes={} stall_threshold_{}={} vmm={vmm} boot={boot}",
            layout.pages * PAGE,
            layout.pages,
            o.pattern.name(),
            o.writes,
            o.passes,
            o.seed,
            o.tsc_khz,
            layout.usable_pages * PAGE,
            clock.unit(),
            clock.stall_threshold(),
        );
    });
}

fn print_pass(pass: u64, total: &Counters, before: &Counters, elapsed_ms: u64) {
    console::with(|w| {
        let _ = writeln!(
            w,
            "WORKLOAD pass n={pass} pages={} mismatches={} elapsed_ms={elapsed_ms} slow_accesses={}",
            total.accesses - before.accesses,
            total.mismatches - before.mismatches,
            total.slow - before.slow,
        );
    });
}

/// Prints pass `pass`'s histogram `hists` of every vCPU as one line (`WORKLOAD HIST
/// name=NAME pass=K ...`), if it holds anything, and clears them for pass K+2.
fn print_pass_hist(hists: &[[Hist; 2]; MAX], name: &str, vcpus: u64, pass: u64, clock: &Clock) {
    let slot = (pass % 2) as usize;
    let sum = &hists[0][slot];
    for v in hists.iter().take(vcpus as usize).skip(1) {
        sum.add(&v[slot]);
        v[slot].clear();
    }
    if sum.count() != 0 {
        console::with(|w| {
            let _ = write!(w, "WORKLOAD HIST name={name} pass={pass} ");
            write_scheme(w, name, clock);
            write_buckets(w, sum);
        });
    }
    sum.clear();
}

/// Writes `unit=U sub=S [threshold=T] buckets=`: the unit, the bucket scheme (sub-buckets per
/// power of two) and, for the threshold histograms, the threshold they start at.
fn write_scheme(w: &mut console::Console, name: &str, clock: &Clock) {
    let _ = write!(w, "unit={} sub={SUB_BUCKETS} ", clock.unit());
    let threshold = match name {
        "access_slow" => Some(clock.slow_threshold()),
        "stall" => Some(clock.stall_threshold()),
        _ => None,
    };
    if let Some(t) = threshold {
        let _ = write!(w, "threshold={t} ");
    }
    let _ = w.write_str("buckets=");
}

/// Writes the non-empty buckets as `LO:COUNT,...` and ends the line.
fn write_buckets(w: &mut console::Console, h: &Hist) {
    for (i, (lo, count)) in h.nonempty().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(w, "{sep}{lo}:{count}");
    }
    let _ = w.write_str("\n");
}

fn print_hist(name: &str, clock: &Clock, h: &Hist) {
    console::with(|w| {
        let _ = write!(w, "WORKLOAD HIST name={name} ");
        write_scheme(w, name, clock);
        write_buckets(w, h);
    });
}

/// Prints the histograms and the result line; returns the exit code.
fn print_result(vcpus: u64, layout: &Layout, clock: &Clock, passes: u64, total: &Counters) -> u8 {
    // Sum into vCPU 0's histograms: every vCPU has finished recording (final barrier).
    let ft = &FIRST_TOUCH[0];
    let slow = &ACCESS_SLOW[0];
    let stall = &STALL[0];
    for v in 1..vcpus as usize {
        ft.add(&FIRST_TOUCH[v]);
        slow.add(&ACCESS_SLOW[v]);
        stall.add(&STALL[v]);
    }
    print_hist("first_touch", clock, ft);
    print_hist("access_slow", clock, slow);
    print_hist("stall", clock, stall);
    let ok = total.mismatches == 0;
    console::with(|w| {
        let _ = writeln!(
            w,
            "WORKLOAD RESULT status={} passes={passes} pages={} mismatches={} ft_count={} ft_p50_{u}={} ft_p99_{u}={} ft_max_{u}={} stall_count={} stall_max_{u}={}",
            if ok { "ok" } else { "fail" },
            layout.pages,
            total.mismatches,
            ft.count(),
            ft.percentile(500),
            ft.percentile(990),
            ft.max(),
            stall.count(),
            stall.max(),
            u = clock.unit(),
        );
    });
    if ok {
        0
    } else {
        1
    }
}
