//! Wire-format checks shared by the fuzz targets `frame_reader`, `decode` and `config_layout`
//! and by the corpus replay test `migration/tests/fuzz_corpus.rs` (which includes this file with
//! `#[path]`, so it may use only `migration`, `zerocopy` and `std`).
//!
//! Each `check_*` function takes the raw fuzz input and panics if the code under test misbehaves:
//! a panic inside the code, a result that contradicts an independent model of the rules in
//! `docs/protocol.md`, a message that does not survive re-encoding, or an allocation larger than
//! the frame headers that passed [`check_header`] allow.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::mem::size_of;
use std::time::Duration;

use migration::types::{Backing, Mode, RamLayout, RegionLayout};
use migration::wire::{
    check_header, check_run, decode, encode, ChannelKind, DoneStats, ErrorCode, FrameHeader,
    FrameReader, Kind, Message, MigrationConfig, WireError, MAGIC, MAX_ERROR_MESSAGE,
    MAX_PAGES_PER_FRAME, MAX_REGIONS, MAX_RUN_PAGES, MAX_STATE_BYTES, MAX_VCPUS, VERSION,
};
use migration::PAGE_SIZE;
use zerocopy::little_endian::{U16, U32};
use zerocopy::FromBytes;

const PAGE: usize = PAGE_SIZE as usize;
const HEADER: usize = size_of::<FrameHeader>();

// ---------------------------------------------------------------------------------------------
// Allocation probe

thread_local! {
    /// Largest single allocation (or reallocation target) this thread asked for since the last
    /// [`largest_allocation_during`] started.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// A global allocator that records the largest allocation of the current thread; install it
/// with `#[global_allocator]` in the binary that runs [`check_frame_reader`].
pub struct TrackingAlloc;

fn note(size: usize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Run `f`; returns its result and the largest allocation this thread made meanwhile (0 if
/// [`TrackingAlloc`] is not the global allocator).
pub fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let outer = LARGEST.with(|l| l.replace(0));
    let out = f();
    let largest = LARGEST.with(|l| l.get());
    LARGEST.with(|l| l.set(outer.max(largest)));
    (out, largest)
}

// ---------------------------------------------------------------------------------------------
// Models of the rules, independent of the code under test

/// Whether `regions` form a valid layout: non-empty, each region non-empty, 4 KiB-aligned and not
/// wrapping, no two overlapping, no slot used twice (docs/protocol.md, Config).
pub fn model_layout_valid(regions: &[RegionLayout]) -> bool {
    let page = PAGE_SIZE;
    if regions.is_empty() {
        return false;
    }
    let region_ok = |r: &RegionLayout| {
        r.size != 0
            && r.gpa.is_multiple_of(page)
            && r.size.is_multiple_of(page)
            && r.gpa.checked_add(r.size).is_some()
    };
    if !regions.iter().all(region_ok) {
        return false;
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.slot == b.slot || (a.gpa < b.gpa + b.size && b.gpa < a.gpa + a.size) {
                return false;
            }
        }
    }
    true
}

/// The global index of the first page of a run of `count` pages at `gpa` if the run is aligned,
/// non-empty and inside one region of `regions` (sorted by gpa, as `RamLayout::regions`).
pub fn model_run_index(regions: &[RegionLayout], gpa: u64, count: u64) -> Option<u64> {
    if count == 0 || !gpa.is_multiple_of(PAGE_SIZE) {
        return None;
    }
    let end = gpa.checked_add(count.checked_mul(PAGE_SIZE)?)?;
    let mut first = 0u64;
    for r in regions {
        if r.gpa <= gpa && end <= r.gpa + r.size {
            return Some(first + (gpa - r.gpa) / PAGE_SIZE);
        }
        first += r.size / PAGE_SIZE;
    }
    None
}

/// Internal consistency of a layout `RamLayout::new` accepted.
pub fn check_layout(layout: &RamLayout) {
    let regions = layout.regions();
    assert!(
        model_layout_valid(regions),
        "accepted an invalid layout: {regions:?}"
    );
    assert!(
        regions.windows(2).all(|p| p[0].gpa + p[0].size <= p[1].gpa),
        "regions not sorted: {regions:?}"
    );
    let mut first = 0u64;
    for (i, r) in regions.iter().enumerate() {
        assert_eq!(
            layout.region_first_page(i),
            first,
            "first page of region {i}"
        );
        assert_eq!(layout.region_of(r.gpa), Some(i));
        assert_eq!(layout.region_of(r.gpa + r.size - 1), Some(i));
        assert_eq!(layout.page_index(r.gpa), Some(first));
        assert_eq!(layout.page_gpa(first), Some(r.gpa));
        first += r.size / PAGE_SIZE;
    }
    assert_eq!(layout.total_pages(), first);
    assert_eq!(layout.total_bytes(), first * PAGE_SIZE);
    assert_eq!(layout.page_gpa(first), None);
}

/// `RamLayout::run_index` (and `check_run`) against the model, plus the page-address helpers for
/// the same gpa.
pub fn check_query(layout: &RamLayout, gpa: u64, count: u64) {
    let regions = layout.regions();
    let got = layout.run_index(gpa, count);
    let want = model_run_index(regions, gpa, count);
    assert_eq!(got, want, "run_index({gpa:#x}, {count}) in {regions:?}");
    match check_run(layout, Kind::ZeroPages, gpa, count) {
        Ok(first) => assert_eq!(Some(first), want),
        Err(WireError::OutsideLayout {
            gpa: g, count: c, ..
        }) => {
            assert_eq!((g, c, want), (gpa, count, None))
        }
        Err(e) => panic!("check_run failed with {e:?}"),
    }
    if let Some(first) = got {
        // The run lies inside one region: its first and last page are in the same one.
        let last_gpa = gpa + (count - 1) * PAGE_SIZE;
        let region = layout.region_of(gpa);
        assert!(region.is_some());
        assert_eq!(layout.region_of(last_gpa), region);
        assert_eq!(layout.page_gpa(first), Some(gpa));
        assert_eq!(layout.page_index(last_gpa), Some(first + count - 1));
        assert_eq!(layout.page_gpa(first + count - 1), Some(last_gpa));
    }
    let containing = regions
        .iter()
        .position(|r| r.gpa <= gpa && gpa - r.gpa < r.size);
    assert_eq!(layout.region_of(gpa), containing, "region_of({gpa:#x})");
    let index = layout.page_index(gpa);
    assert_eq!(
        index,
        model_run_index(regions, gpa, 1),
        "page_index({gpa:#x})"
    );
    if let Some(i) = index {
        assert_eq!(layout.page_gpa(i), Some(gpa));
    }
    let _ = layout.page_gpa(count);
}

// ---------------------------------------------------------------------------------------------
// Messages

/// Field-level invariants of a decoded message, then: re-encoding it gives a frame whose header
/// passes and which decodes to the same message.
pub fn check_message(msg: &Message<'_>) {
    match msg {
        Message::Pages { gpa, data } => {
            assert_eq!(gpa % PAGE_SIZE, 0);
            assert!(!data.is_empty() && data.len() % PAGE == 0);
            assert!(data.len() <= MAX_PAGES_PER_FRAME as usize * PAGE);
        }
        Message::ZeroPages { gpa, count }
        | Message::Discard { gpa, count }
        | Message::ReceivedMap { gpa, count } => {
            assert_eq!(gpa % PAGE_SIZE, 0);
            assert!((1..=MAX_RUN_PAGES).contains(count));
        }
        Message::PageRequest { gpa, .. } => assert_eq!(gpa % PAGE_SIZE, 0),
        Message::PageReply { gpa, data, .. } => {
            assert_eq!(gpa % PAGE_SIZE, 0);
            assert_eq!(data.len(), PAGE);
        }
        Message::State(data) => assert!(data.len() <= MAX_STATE_BYTES as usize),
        Message::Config(c) => {
            assert!((1..=MAX_VCPUS).contains(&c.vcpu_count));
            assert!(!c.layout.regions().is_empty() && c.layout.regions().len() <= MAX_REGIONS);
            check_layout(&c.layout);
        }
        Message::Switchover { nonce }
        | Message::PostcopyStart { nonce }
        | Message::Started { nonce } => assert_ne!(*nonce, 0),
        Message::Hello { .. }
        | Message::Challenge { .. }
        | Message::Response { .. }
        | Message::AuthOk { .. }
        | Message::Ready
        | Message::RoundEnd { .. }
        | Message::Complete { .. }
        | Message::Done(_)
        | Message::Error { .. }
        | Message::Heartbeat
        | Message::RecoverState { .. } => {}
    }
    let mut frame = Vec::new();
    encode(msg, &mut frame);
    let header = FrameHeader::read_from_bytes(&frame[..HEADER]).expect("16-byte header");
    let (kind, len) = check_header(&header).expect("a re-encoded frame has a valid header");
    assert_eq!(kind, msg.kind());
    assert_eq!(len as usize, frame.len() - HEADER);
    let again = decode(kind, &frame[HEADER..]).expect("a re-encoded frame decodes");
    match (msg, &again) {
        // Lossy UTF-8 decoding may make the text longer than an Error frame carries; encode
        // cuts it at a character boundary.
        (
            Message::Error { code, message },
            Message::Error {
                code: c2,
                message: m2,
            },
        ) if message.len() > MAX_ERROR_MESSAGE as usize => {
            assert_eq!(code, c2);
            assert!(message.starts_with(m2.as_str()));
            assert!(m2.len() <= MAX_ERROR_MESSAGE as usize);
        }
        _ => assert_eq!(&again, msg, "re-encoded message differs"),
    }
}

/// The layout `check_decode` checks runs against: two adjacent regions (a run must not cross
/// from one into the other), a gap, a region above 4 GiB and one at the top of the address space.
pub fn small_layout() -> RamLayout {
    let r = |slot, gpa, size| RegionLayout { slot, gpa, size };
    let layout = RamLayout::new(vec![
        r(0, 0, 0xa_0000),
        r(1, 0x10_0000, 0x20_0000),
        r(2, 0x30_0000, 0x1_0000),
        r(3, 0x1_0000_0000, 0x10_0000),
        r(4, 0xffff_ffff_ffff_c000, 0x2000),
    ]);
    match layout {
        Ok(l) => l,
        Err(e) => panic!("the fixed fuzzing layout is invalid: {e}"),
    }
}

fn header_for(code: u16, len: u32) -> FrameHeader {
    FrameHeader {
        magic: U32::new(MAGIC),
        version: U16::new(VERSION),
        kind: U16::new(code),
        len: U32::new(len),
        reserved: U32::new(0),
    }
}

/// Fuzz input: a little-endian u16 kind code, then the payload. A valid header for that kind
/// and length goes through `check_header`, the payload through `decode`; a run a decoded message
/// names through `check_run` against [`small_layout`].
pub fn check_decode(data: &[u8]) {
    let Some((code, payload)) = data.split_first_chunk::<2>() else {
        return;
    };
    let code = u16::from_le_bytes(*code);
    let Ok(len) = u32::try_from(payload.len()) else {
        return;
    };
    let kind = match check_header(&header_for(code, len)) {
        Ok((kind, l)) => {
            assert_eq!((kind as u16, l), (code, len));
            let (min, max) = kind.len_bounds();
            assert!((min..=max).contains(&len));
            kind
        }
        Err(WireError::UnknownKind { kind }) => {
            assert_eq!(kind, code);
            assert!(Kind::from_wire(code).is_none());
            return;
        }
        Err(WireError::BadLength {
            kind,
            len: l,
            min,
            max,
        }) => {
            assert_eq!((kind as u16, l), (code, len));
            assert_eq!(kind.len_bounds(), (min, max));
            assert!(len < min || len > max);
            return;
        }
        Err(e) => panic!("check_header of a well-formed header failed with {e:?}"),
    };
    let msg = match decode(kind, payload) {
        Ok(msg) => msg,
        Err(WireError::BadField { kind: k, .. }) => {
            assert_eq!(k, kind);
            return;
        }
        Err(WireError::BadLayout(_)) => {
            assert_eq!(kind, Kind::Config);
            return;
        }
        Err(WireError::Reserved { kind: k, value, .. }) => {
            assert_eq!(k, kind);
            assert_ne!(value, 0);
            return;
        }
        Err(WireError::ZeroNonce { kind: k }) => {
            assert_eq!(k, kind);
            assert!(matches!(
                kind,
                Kind::Switchover | Kind::PostcopyStart | Kind::Started
            ));
            return;
        }
        Err(e) => panic!("decode failed with an unexpected error: {e:?}"),
    };
    assert_eq!(msg.kind(), kind);
    check_message(&msg);
    let run = match msg {
        Message::Pages { gpa, data } => Some((gpa, (data.len() / PAGE) as u64)),
        Message::ZeroPages { gpa, count }
        | Message::Discard { gpa, count }
        | Message::ReceivedMap { gpa, count } => Some((gpa, u64::from(count))),
        Message::PageRequest { gpa, .. } | Message::PageReply { gpa, .. } => Some((gpa, 1)),
        _ => None,
    };
    if let Some((gpa, count)) = run {
        check_query(&small_layout(), gpa, count);
    }
}

/// Walk the frames in `stream` from `at` as the protocol defines them, up to the first bad
/// header or the first frame starting at or after `limit`; returns each frame whose header
/// passes as (kind, start, end). The last frame may end past the stream.
fn model_frames(stream: &[u8], mut at: usize, limit: usize) -> Vec<(Kind, usize, usize)> {
    let mut frames = Vec::new();
    while at < limit {
        let Some(bytes) = stream.get(at..at + HEADER) else {
            break;
        };
        let Ok(header) = FrameHeader::read_from_bytes(bytes) else {
            break;
        };
        let Ok((kind, len)) = check_header(&header) else {
            break;
        };
        let end = at + HEADER + len as usize;
        frames.push((kind, at, end));
        at = end;
    }
    frames
}

/// Fuzz input: a byte stream, read frame by frame with `FrameReader::read` until it fails. Each
/// frame read must be what the stream holds there (skipping heartbeats), each failure must be a
/// stream or protocol error at the right place (never a timeout or I/O error: a slice never
/// blocks), and no read may allocate more than twice the largest frame whose header passed
/// `check_header` so far (the reader's buffer grows amortized): a header announcing more than
/// its kind allows must fail before any buffer is sized for it.
pub fn check_frame_reader(data: &[u8]) {
    let mut reader = FrameReader::new(data, Duration::from_secs(1));
    // Small allocations (error texts, the header buffer) are always fine.
    let mut allowed = 4096usize;
    loop {
        let start = reader.bytes_read() as usize;
        let r = &mut reader;
        let (result, largest) = largest_allocation_during(move || {
            let r = r;
            r.read("fuzzing the frame reader")
        });
        let result = match result {
            Ok(msg) => {
                check_message(&msg);
                Ok(msg.kind())
            }
            Err(e) => Err(e),
        };
        let end = reader.bytes_read() as usize;
        assert_eq!(end, data.len() - reader.get_ref().len());
        assert!(start < end || end == data.len(), "a read consumed nothing");
        let frames = model_frames(data, start, end);
        for &(_, frame_start, frame_end) in &frames {
            allowed = allowed.max(frame_end - frame_start);
        }
        assert!(
            largest <= 2 * allowed,
            "a read allocated {largest} bytes; the valid headers so far allow {allowed}"
        );
        match result {
            Ok(kind) => {
                assert_ne!(kind, Kind::Heartbeat, "read returned a heartbeat");
                let (last, heartbeats) = frames.split_last().expect("a frame was read");
                assert_eq!(
                    (last.0, last.2),
                    (kind, end),
                    "read another frame than the stream has"
                );
                assert!(heartbeats.iter().all(|f| f.0 == Kind::Heartbeat));
            }
            Err(WireError::Closed { .. }) => {
                assert_eq!(end, data.len(), "Closed before the end of the stream");
                assert!(frames.iter().all(|f| f.0 == Kind::Heartbeat && f.2 <= end));
                return;
            }
            Err(WireError::Truncated { .. }) => {
                assert_eq!(end, data.len(), "Truncated before the end of the stream");
                assert!(frames
                    .last()
                    .is_none_or(|f| f.2 > end || f.0 == Kind::Heartbeat));
                return;
            }
            Err(
                WireError::BadMagic { .. }
                | WireError::VersionMismatch { .. }
                | WireError::UnknownKind { .. }
                | WireError::BadLength { .. },
            ) => {
                // The header after the heartbeats failed.
                let bad_at = frames.last().map_or(start, |f| f.2);
                assert!(frames.iter().all(|f| f.0 == Kind::Heartbeat));
                assert_eq!(bad_at + HEADER, end, "header error not at a frame boundary");
                return;
            }
            Err(
                WireError::BadField { .. }
                | WireError::BadLayout(_)
                | WireError::Reserved { .. }
                | WireError::ZeroNonce { .. },
            ) => return,
            Err(e) => panic!("reading a byte slice failed with {e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layouts

fn take<const N: usize>(data: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = data.split_first_chunk::<N>()?;
    *data = rest;
    Some(*head)
}

fn u64_at(data: &mut &[u8]) -> Option<u64> {
    take::<8>(data).map(u64::from_le_bytes)
}

/// Fuzz input: a region count byte, that many 21-byte regions (flags u8, gpa u64, size u64,
/// slot u32; flags bit 0: gpa in pages, bit 1: size is a page count below 2^32, bit 2: slot
/// mod 8, bit 3: gpa right after the previous region), then up to 256 17-byte `run_index`
/// queries (flags u8, a u64, b u64; flags bit 0: gpa inside region `a % n` at page `(a >> 16) &
/// 0xffff`, bit 1: count `b & 0x3ff`, bit 2: one page lower). All little-endian.
pub fn check_config_layout(data: &[u8]) {
    let mut data = data;
    let Some([n]) = take::<1>(&mut data) else {
        return;
    };
    let mut regions = Vec::with_capacity(usize::from(n));
    let mut prev_end = 0u64;
    for _ in 0..n {
        let (Some([flags]), Some(gpa), Some(size), Some(slot)) = (
            take::<1>(&mut data),
            u64_at(&mut data),
            u64_at(&mut data),
            take::<4>(&mut data).map(u32::from_le_bytes),
        ) else {
            break;
        };
        let mut r = RegionLayout { slot, gpa, size };
        if flags & 1 != 0 {
            r.gpa = r.gpa.wrapping_mul(PAGE_SIZE);
        }
        if flags & 2 != 0 {
            r.size = (r.size & 0xffff_ffff) * PAGE_SIZE;
        }
        if flags & 4 != 0 {
            r.slot %= 8;
        }
        if flags & 8 != 0 {
            r.gpa = prev_end;
        }
        prev_end = r.gpa.wrapping_add(r.size);
        regions.push(r);
    }
    let valid = model_layout_valid(&regions);
    let layout = match RamLayout::new(regions.clone()) {
        Ok(layout) => {
            assert!(valid, "accepted an invalid layout: {regions:?}");
            layout
        }
        Err(e) => {
            assert!(!valid, "rejected a valid layout ({e}): {regions:?}");
            return;
        }
    };
    check_layout(&layout);
    let mut sorted = regions;
    sorted.sort_by_key(|r| r.gpa);
    assert_eq!(
        layout.regions(),
        &sorted[..],
        "the layout is not the regions given"
    );
    for _ in 0..256 {
        let (Some([flags]), Some(a), Some(b)) =
            (take::<1>(&mut data), u64_at(&mut data), u64_at(&mut data))
        else {
            break;
        };
        let mut gpa = a;
        if flags & 1 != 0 {
            let rs = layout.regions();
            let r = rs[(a % rs.len() as u64) as usize];
            gpa = r.gpa.wrapping_add(((a >> 16) & 0xffff) * PAGE_SIZE);
        }
        if flags & 4 != 0 {
            gpa = gpa.wrapping_sub(PAGE_SIZE);
        }
        let count = if flags & 2 != 0 { b & 0x3ff } else { b };
        check_query(&layout, gpa, count);
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds

const DATA: [u8; 2 * PAGE] = [0x5a; 2 * PAGE];

/// One message of every kind, valid against [`small_layout`] where they name pages.
pub fn sample_messages() -> Vec<Message<'static>> {
    let layout = small_layout();
    vec![
        Message::Hello {
            channel: ChannelKind::Main,
            session_id: 0,
            nonce: [1; 32],
        },
        Message::Challenge {
            session_id: 7,
            nonce: [2; 32],
            proof: [3; 32],
        },
        Message::Response { proof: [4; 32] },
        Message::AuthOk { session_id: 7 },
        Message::Hello {
            channel: ChannelKind::Urgent,
            session_id: 7,
            nonce: [5; 32],
        },
        Message::Config(MigrationConfig {
            mode: Mode::Hybrid,
            memory_kind: Backing::Hugetlb2m,
            vcpu_count: 2,
            layout,
        }),
        Message::Ready,
        Message::Pages {
            gpa: 0x10_0000,
            data: &DATA,
        },
        Message::ZeroPages {
            gpa: 0x1_0000_0000,
            count: 256,
        },
        Message::Discard {
            gpa: 0x30_0000,
            count: 16,
        },
        Message::RoundEnd {
            round: 1,
            pages: 300,
        },
        Message::Switchover { nonce: 0x5eed },
        Message::State(br#"{"serial":{}}"#),
        Message::PostcopyStart { nonce: 0x5eed },
        Message::Started { nonce: 0x5eed },
        Message::PageRequest {
            id: 1,
            gpa: 0x9_f000,
        },
        Message::PageReply {
            id: 1,
            gpa: 0x9_f000,
            source_ns: 41_000,
            data: &DATA[..PAGE],
        },
        Message::Heartbeat,
        Message::Complete { pages: 1000 },
        Message::Done(DoneStats {
            pages_received: 1000,
            bulk_pages: 900,
            urgent_pages: 50,
            zero_pages: 50,
            collapses: 2,
            faults: 60,
        }),
        Message::ReceivedMap {
            gpa: 0xffff_ffff_ffff_c000,
            count: 2,
        },
        Message::RecoverState {
            started: true,
            held_pages: 2,
        },
        Message::Error {
            code: ErrorCode::Rejected,
            message: "no huge pages left".into(),
        },
    ]
}

fn name_of(msg: &Message<'_>, i: usize) -> String {
    format!("seed-{i:02}-{:?}", msg.kind()).to_lowercase()
}

/// Seed inputs per target (`frame_reader`, `decode`, `config_layout`): name and bytes.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let msgs = sample_messages();
    let frame = |m: &Message<'_>| {
        let mut out = Vec::new();
        encode(m, &mut out);
        out
    };
    match target {
        "frame_reader" => {
            let mut seeds: Vec<_> = msgs
                .iter()
                .enumerate()
                .map(|(i, m)| (name_of(m, i), frame(m)))
                .collect();
            let session: Vec<u8> = msgs.iter().flat_map(frame).collect();
            // A session cut inside its last frame.
            let truncated = session[..session.len() - 3].to_vec();
            seeds.push(("seed-session".into(), session));
            seeds.push(("seed-truncated".into(), truncated));
            seeds
        }
        "decode" => msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let f = frame(m);
                let mut input = (m.kind() as u16).to_le_bytes().to_vec();
                input.extend_from_slice(&f[HEADER..]);
                (name_of(m, i), input)
            })
            .collect(),
        "config_layout" => {
            let region = |flags: u8, gpa: u64, size: u64, slot: u32| {
                let mut v = vec![flags];
                v.extend_from_slice(&gpa.to_le_bytes());
                v.extend_from_slice(&size.to_le_bytes());
                v.extend_from_slice(&slot.to_le_bytes());
                v
            };
            let query = |flags: u8, a: u64, b: u64| {
                let mut v = vec![flags];
                v.extend_from_slice(&a.to_le_bytes());
                v.extend_from_slice(&b.to_le_bytes());
                v
            };
            let mut layout = vec![3u8];
            layout.extend(region(0, 0, 0xa_0000, 0));
            layout.extend(region(8 | 2, 0, 0x200, 1)); // right after the first one, 0x200 pages
            layout.extend(region(0, 0xffff_ffff_ffff_c000, 0x2000, 2));
            layout.extend(query(0, 0x9_f000, 1));
            layout.extend(query(1 | 2, 1 << 16 | 1, 5));
            layout.extend(query(1 | 4, 1, 2));
            layout.extend(query(0, 0xffff_ffff_ffff_e000, 1));
            let mut overlap = vec![2u8];
            overlap.extend(region(0, 0x1000, 0x2000, 0));
            overlap.extend(region(0, 0x2000, 0x1000, 1));
            vec![
                ("seed-layout".into(), layout),
                ("seed-overlap".into(), overlap),
            ]
        }
        _ => Vec::new(),
    }
}
