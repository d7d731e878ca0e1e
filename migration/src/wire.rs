//! The migration wire format: length-prefixed, versioned frames carrying plain little-endian
//! structs, and the checks every received frame passes before any field is used.
//!
//! A frame is a 16-byte [`FrameHeader`] (magic, version, kind, payload length, reserved = 0)
//! followed by `len` payload bytes. Each kind has a fixed body struct, optionally followed by
//! variable data whose size the body announces; see `docs/protocol.md`.

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::time::{Duration, Instant};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::types::{Backing, LayoutError, Mode, RamLayout, RegionLayout, PAGE_SIZE};
use crate::vocab::wire_codes;

/// "VMMG" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMMG");
/// Protocol version this code speaks. Peers must match exactly.
pub const VERSION: u16 = 3;
/// Most RAM regions a Config may announce.
pub const MAX_REGIONS: usize = 512;
/// Most vCPUs a Config may announce.
pub const MAX_VCPUS: u32 = 1024;
/// Most 4 KiB pages one Pages frame carries (1 MiB of data).
pub const MAX_PAGES_PER_FRAME: u32 = 256;
/// Most pages one ZeroPages or Discard run names (the run must also fit one region).
pub const MAX_RUN_PAGES: u32 = 1 << 20;
/// Largest device + vCPU state blob.
pub const MAX_STATE_BYTES: u32 = 64 << 20;
/// Longest error message text.
pub const MAX_ERROR_MESSAGE: u32 = 1024;
/// Size of an authentication nonce and of an HMAC-SHA256 proof.
pub const NONCE_LEN: usize = 32;

const PAGE: usize = PAGE_SIZE as usize;

/// Frame header. All integers little-endian.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: U32,
    pub version: U16,
    pub kind: U16,
    /// Payload length in bytes (excluding this header).
    pub len: U32,
    /// Must be zero.
    pub reserved: U32,
}
const _: () = assert!(size_of::<FrameHeader>() == 16);

wire_codes! {
    /// Which connection of a session a Hello opens.
    pub enum ChannelKind: u8 {
        /// Control and bulk pages.
        Main = 1,
        /// Page requests and replies.
        Urgent = 2,
    }
}

/// Body of Hello (source → destination, first frame on each connection).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct HelloBody {
    pub nonce: [u8; NONCE_LEN],
    /// 0 on the main channel; the session id from AuthOk on the urgent channel.
    pub session_id: U64,
    /// [`ChannelKind`] code.
    pub channel: u8,
    pub reserved: [u8; 7],
}
const _: () = assert!(size_of::<HelloBody>() == 48);

/// Body of Challenge (destination → source).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ChallengeBody {
    pub nonce: [u8; NONCE_LEN],
    /// HMAC proving the destination holds the secret (role label "destination").
    pub proof: [u8; NONCE_LEN],
    /// The session this connection belongs to (new on main, echoed on urgent).
    pub session_id: U64,
}
const _: () = assert!(size_of::<ChallengeBody>() == 72);

/// Body of Response (source → destination).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ResponseBody {
    /// HMAC proving the source holds the secret (role label "source").
    pub proof: [u8; NONCE_LEN],
}
const _: () = assert!(size_of::<ResponseBody>() == 32);

/// Body of AuthOk, Complete, and of Switchover, PostcopyStart and Started (the switchover
/// nonce), the frames carrying one u64.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct U64Body {
    pub value: U64,
}
const _: () = assert!(size_of::<U64Body>() == 8);

/// Fixed head of Config (source → destination); followed by `region_count` [`RegionEntry`].
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ConfigHead {
    pub ram_bytes: U64,
    pub vcpu_count: U32,
    pub region_count: U32,
    pub mode: u8,
    pub memory_kind: u8,
    pub reserved: [u8; 6],
}
const _: () = assert!(size_of::<ConfigHead>() == 24);

/// One RAM region in Config.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RegionEntry {
    pub gpa: U64,
    pub size: U64,
    pub slot: U32,
    pub reserved: U32,
}
const _: () = assert!(size_of::<RegionEntry>() == 24);

/// Head of Pages / ZeroPages / Discard: a run of `count` pages from `gpa`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RunHead {
    pub gpa: U64,
    pub count: U32,
    pub reserved: U32,
}
const _: () = assert!(size_of::<RunHead>() == 16);

/// Body of RoundEnd.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RoundEndBody {
    pub pages: U64,
    pub round: U32,
    pub reserved: U32,
}
const _: () = assert!(size_of::<RoundEndBody>() == 16);

/// Body of PageRequest.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PageHead {
    pub id: U64,
    pub gpa: U64,
}
const _: () = assert!(size_of::<PageHead>() == 16);

/// Head of PageReply (followed by 4096 bytes): the request's id and gpa, and the source's
/// time from reading the request to writing this reply, in nanoseconds (the destination
/// splits each remote fault's time into phases with it).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PageReplyHead {
    pub id: U64,
    pub gpa: U64,
    pub source_ns: U64,
}
const _: () = assert!(size_of::<PageReplyHead>() == 24);

/// Body of Done (destination → source): what the destination saw.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct DoneBody {
    pub pages_received: U64,
    pub bulk_pages: U64,
    pub urgent_pages: U64,
    pub zero_pages: U64,
    pub collapses: U64,
    pub faults: U64,
}
const _: () = assert!(size_of::<DoneBody>() == 48);

/// Body of RecoverState (destination → source, main channel of a recovery session): ends the
/// ReceivedMap runs and says whether the VM runs on the destination.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RecoverStateBody {
    /// Pages the ReceivedMap runs before this frame named, in all.
    pub held_pages: U64,
    /// 1 if the destination started the VM, 0 if it never did.
    pub started: u8,
    pub reserved: [u8; 7],
}
const _: () = assert!(size_of::<RecoverStateBody>() == 16);

/// Head of Error; followed by `len` bytes of UTF-8 text.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ErrorHead {
    pub code: U32,
    pub len: U32,
}
const _: () = assert!(size_of::<ErrorHead>() == 8);

wire_codes! {
    /// Message kinds and their codes on the wire.
    pub enum Kind: u16 {
        Hello = 1,
        Challenge = 2,
        Response = 3,
        AuthOk = 4,
        Config = 5,
        Ready = 6,
        Pages = 7,
        ZeroPages = 8,
        Discard = 9,
        RoundEnd = 10,
        State = 11,
        Switchover = 12,
        PostcopyStart = 13,
        Started = 14,
        PageRequest = 15,
        PageReply = 16,
        Complete = 17,
        Done = 18,
        Error = 19,
        Heartbeat = 20,
        ReceivedMap = 21,
        RecoverState = 22,
    }
}

impl Kind {
    /// Smallest and largest payload length allowed for this kind.
    pub fn len_bounds(self) -> (u32, u32) {
        const fn exact(n: usize) -> (u32, u32) {
            (n as u32, n as u32)
        }
        match self {
            Kind::Hello => exact(size_of::<HelloBody>()),
            Kind::Challenge => exact(size_of::<ChallengeBody>()),
            Kind::Response => exact(size_of::<ResponseBody>()),
            Kind::AuthOk
            | Kind::Started
            | Kind::Complete
            | Kind::Switchover
            | Kind::PostcopyStart => exact(size_of::<U64Body>()),
            Kind::Config => (
                (size_of::<ConfigHead>() + size_of::<RegionEntry>()) as u32,
                (size_of::<ConfigHead>() + MAX_REGIONS * size_of::<RegionEntry>()) as u32,
            ),
            Kind::Ready | Kind::Heartbeat => (0, 0),
            Kind::Pages => (
                (size_of::<RunHead>() + PAGE) as u32,
                size_of::<RunHead>() as u32 + MAX_PAGES_PER_FRAME * PAGE_SIZE as u32,
            ),
            Kind::ZeroPages | Kind::Discard | Kind::ReceivedMap => exact(size_of::<RunHead>()),
            Kind::RecoverState => exact(size_of::<RecoverStateBody>()),
            Kind::RoundEnd => exact(size_of::<RoundEndBody>()),
            Kind::State => (0, MAX_STATE_BYTES),
            Kind::PageRequest => exact(size_of::<PageHead>()),
            Kind::PageReply => exact(size_of::<PageReplyHead>() + PAGE),
            Kind::Done => exact(size_of::<DoneBody>()),
            Kind::Error => (
                size_of::<ErrorHead>() as u32,
                size_of::<ErrorHead>() as u32 + MAX_ERROR_MESSAGE,
            ),
        }
    }
}

/// Error codes carried by an Error frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer's proof did not verify.
    AuthFailed,
    /// A frame broke the protocol (bad field, unexpected message).
    Protocol,
    /// The peer cannot run this configuration (layout, memory, resources).
    Rejected,
    /// The sender hit a local failure and gives up.
    Internal,
    /// An unknown code (kept for the message text).
    Other(u32),
}

impl ErrorCode {
    /// The known codes, each written once (an unknown code is [`ErrorCode::Other`]).
    const KNOWN: [(ErrorCode, u32); 4] = [
        (ErrorCode::AuthFailed, 1),
        (ErrorCode::Protocol, 2),
        (ErrorCode::Rejected, 3),
        (ErrorCode::Internal, 4),
    ];

    pub fn to_wire(self) -> u32 {
        match self {
            ErrorCode::Other(c) => c,
            known => Self::KNOWN
                .iter()
                .find(|(k, _)| *k == known)
                .map_or(0, |&(_, c)| c),
        }
    }

    pub fn from_wire(code: u32) -> Self {
        Self::KNOWN
            .iter()
            .find(|&&(_, c)| c == code)
            .map_or(ErrorCode::Other(code), |&(k, _)| k)
    }
}

/// What the source announces about the VM (the Config message, validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationConfig {
    pub mode: Mode,
    /// How the source backs its RAM (informational; the destination chooses its own backing).
    pub memory_kind: Backing,
    pub vcpu_count: u32,
    pub layout: RamLayout,
}

/// Statistics the destination reports in Done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DoneStats {
    /// Pages the destination holds at the end (bulk + urgent + zero, de-duplicated).
    pub pages_received: u64,
    /// Pages that came as data on the main channel.
    pub bulk_pages: u64,
    /// Pages that came as urgent replies.
    pub urgent_pages: u64,
    /// Pages announced as zero runs.
    pub zero_pages: u64,
    /// Huge-page collapses the postcopy engine did.
    pub collapses: u64,
    /// Guest faults the postcopy engine served (local or remote).
    pub faults: u64,
}

/// A decoded message. Data-carrying variants borrow the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        channel: ChannelKind,
        session_id: u64,
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        session_id: u64,
        nonce: [u8; NONCE_LEN],
        proof: [u8; NONCE_LEN],
    },
    Response {
        proof: [u8; NONCE_LEN],
    },
    AuthOk {
        session_id: u64,
    },
    Config(MigrationConfig),
    Ready,
    /// `data.len()` is a non-zero multiple of 4096; pages are contiguous from `gpa`.
    Pages {
        gpa: u64,
        data: &'a [u8],
    },
    ZeroPages {
        gpa: u64,
        count: u32,
    },
    Discard {
        gpa: u64,
        count: u32,
    },
    RoundEnd {
        round: u32,
        pages: u64,
    },
    State(&'a [u8]),
    /// The precopy switchover; `nonce` (fresh, random, non-zero) must come back in Started.
    Switchover {
        nonce: u64,
    },
    /// The postcopy (or hybrid) switchover; `nonce` as in Switchover.
    PostcopyStart {
        nonce: u64,
    },
    /// The destination started the VM, in answer to the switchover frame whose nonce it
    /// echoes (a Started written before that frame arrived cannot name it).
    Started {
        nonce: u64,
    },
    PageRequest {
        id: u64,
        gpa: u64,
    },
    PageReply {
        id: u64,
        gpa: u64,
        /// The source's request-read → reply-written time, nanoseconds.
        source_ns: u64,
        data: &'a [u8],
    },
    Complete {
        pages: u64,
    },
    Done(DoneStats),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// "Still here": sent on an idle channel from the switchover on, so a silent link is
    /// detected within the liveness timeout. Readers skip it.
    Heartbeat,
    /// Recovery: `count` pages from `gpa` that the destination holds.
    ReceivedMap {
        gpa: u64,
        count: u32,
    },
    /// Recovery: the end of the ReceivedMap runs.
    RecoverState {
        started: bool,
        held_pages: u64,
    },
}

impl Message<'_> {
    /// The kind of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Challenge { .. } => Kind::Challenge,
            Message::Response { .. } => Kind::Response,
            Message::AuthOk { .. } => Kind::AuthOk,
            Message::Config(_) => Kind::Config,
            Message::Ready => Kind::Ready,
            Message::Pages { .. } => Kind::Pages,
            Message::ZeroPages { .. } => Kind::ZeroPages,
            Message::Discard { .. } => Kind::Discard,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::State(_) => Kind::State,
            Message::Switchover { .. } => Kind::Switchover,
            Message::PostcopyStart { .. } => Kind::PostcopyStart,
            Message::Started { .. } => Kind::Started,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::PageReply { .. } => Kind::PageReply,
            Message::Complete { .. } => Kind::Complete,
            Message::Done(_) => Kind::Done,
            Message::Error { .. } => Kind::Error,
            Message::Heartbeat => Kind::Heartbeat,
            Message::ReceivedMap { .. } => Kind::ReceivedMap,
            Message::RecoverState { .. } => Kind::RecoverState,
        }
    }
}

/// Why a frame could not be read, written or accepted.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{during}: I/O error: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{during}: peer closed the connection")]
    Closed { during: &'static str },
    #[error("{during}: truncated frame: connection ended after {got} of {expected} bytes")]
    Truncated {
        during: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{during}: peer stalled: no data for {waited_ms} ms (timeout)")]
    Timeout {
        during: &'static str,
        waited_ms: u64,
    },
    #[error("bad frame magic {got:#010x} (expected {MAGIC:#010x}): not a migration peer or garbage on the stream")]
    BadMagic { got: u32 },
    #[error("protocol version mismatch: peer speaks version {theirs}, we speak {ours}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("unknown message kind {kind}")]
    UnknownKind { kind: u16 },
    #[error("bad frame: {kind:?} with payload length {len} (allowed {min}..={max})")]
    BadLength {
        kind: Kind,
        len: u32,
        min: u32,
        max: u32,
    },
    #[error("bad {kind:?} frame: {what}")]
    BadField { kind: Kind, what: String },
    /// A reserved or padding field that must be zero is not.
    #[error("bad {kind:?} frame: reserved field {field} is {value:#x}, not 0")]
    Reserved {
        kind: Kind,
        field: &'static str,
        value: u64,
    },
    /// A switchover frame or Started without its nonce.
    #[error("bad {kind:?} frame: switchover nonce 0")]
    ZeroNonce { kind: Kind },
    #[error("bad Config frame: {0}")]
    BadLayout(#[from] LayoutError),
    #[error("{kind:?} names {count} page(s) at gpa {gpa:#x}, outside the announced RAM layout")]
    OutsideLayout { kind: Kind, gpa: u64, count: u64 },
    #[error("{during}: expected {expected}, got {got:?}")]
    Unexpected {
        during: &'static str,
        expected: &'static str,
        got: Kind,
    },
    #[error("peer reported an error ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
}

impl WireError {
    /// Whether the error says the link failed (reset, closed, silent, an I/O error) rather
    /// than that the peer broke the protocol or reported an error: a postcopy migration
    /// pauses and recovers from these.
    pub fn is_link_failure(&self) -> bool {
        matches!(
            self,
            WireError::Io { .. }
                | WireError::Closed { .. }
                | WireError::Truncated { .. }
                | WireError::Timeout { .. }
        )
    }
}

/// Fails unless the reserved field `field` of a `kind` frame is zero.
fn reserved_zero(kind: Kind, field: &'static str, value: u64) -> Result<(), WireError> {
    if value != 0 {
        return Err(WireError::Reserved { kind, field, value });
    }
    Ok(())
}

/// A byte array of reserved bytes as one number (little-endian), for [`reserved_zero`].
fn bytes_value(b: &[u8]) -> u64 {
    b.iter()
        .rev()
        .fold(0u64, |acc, &x| acc.wrapping_shl(8) | u64::from(x))
}

/// The nonce of a switchover frame or Started: any value but 0.
fn nonce(kind: Kind, payload: &[u8]) -> Result<u64, WireError> {
    let n = read_body::<U64Body>(kind, payload)?.0.value.get();
    if n == 0 {
        return Err(WireError::ZeroNonce { kind });
    }
    Ok(n)
}

fn bad(kind: Kind, what: impl Into<String>) -> WireError {
    WireError::BadField {
        kind,
        what: what.into(),
    }
}

/// Check a frame header; returns the kind and payload length.
pub fn check_header(h: &FrameHeader) -> Result<(Kind, u32), WireError> {
    if h.magic.get() != MAGIC {
        return Err(WireError::BadMagic { got: h.magic.get() });
    }
    if h.version.get() != VERSION {
        return Err(WireError::VersionMismatch {
            ours: VERSION,
            theirs: h.version.get(),
        });
    }
    let kind =
        Kind::from_wire(h.kind.get()).ok_or(WireError::UnknownKind { kind: h.kind.get() })?;
    let len = h.len.get();
    let (min, max) = kind.len_bounds();
    if len < min || len > max {
        return Err(WireError::BadLength {
            kind,
            len,
            min,
            max,
        });
    }
    if h.reserved.get() != 0 {
        return Err(bad(
            kind,
            format!("reserved header field is {:#x}, not 0", h.reserved.get()),
        ));
    }
    Ok((kind, len))
}

fn read_body<T: FromBytes + KnownLayout + Immutable>(
    kind: Kind,
    payload: &[u8],
) -> Result<(T, &[u8]), WireError> {
    T::read_from_prefix(payload).map_err(|_| {
        bad(
            kind,
            format!(
                "payload of {} bytes is shorter than its {}-byte body",
                payload.len(),
                size_of::<T>()
            ),
        )
    })
}

fn run_count(kind: Kind, count: u32, max: u32) -> Result<(), WireError> {
    if count == 0 || count > max {
        return Err(bad(kind, format!("page count {count} outside 1..={max}")));
    }
    Ok(())
}

fn aligned(kind: Kind, gpa: u64) -> Result<(), WireError> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(bad(kind, format!("gpa {gpa:#x} is not 4 KiB-aligned")));
    }
    Ok(())
}

/// Decode a payload whose header passed [`check_header`].
pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message<'_>, WireError> {
    Ok(match kind {
        Kind::Hello => {
            let (b, _) = read_body::<HelloBody>(kind, payload)?;
            let channel = ChannelKind::from_wire(b.channel)
                .ok_or_else(|| bad(kind, format!("unknown channel {}", b.channel)))?;
            reserved_zero(kind, "Hello.reserved", bytes_value(&b.reserved))?;
            Message::Hello {
                channel,
                session_id: b.session_id.get(),
                nonce: b.nonce,
            }
        }
        Kind::Challenge => {
            let (b, _) = read_body::<ChallengeBody>(kind, payload)?;
            if b.session_id.get() == 0 {
                return Err(bad(kind, "session id 0"));
            }
            Message::Challenge {
                session_id: b.session_id.get(),
                nonce: b.nonce,
                proof: b.proof,
            }
        }
        Kind::Response => Message::Response {
            proof: read_body::<ResponseBody>(kind, payload)?.0.proof,
        },
        Kind::AuthOk => {
            let session_id = read_body::<U64Body>(kind, payload)?.0.value.get();
            if session_id == 0 {
                return Err(bad(kind, "session id 0"));
            }
            Message::AuthOk { session_id }
        }
        Kind::Config => {
            let (head, rest) = read_body::<ConfigHead>(kind, payload)?;
            reserved_zero(kind, "ConfigHead.reserved", bytes_value(&head.reserved))?;
            let count = head.region_count.get() as usize;
            if count == 0 || count > MAX_REGIONS || rest.len() != count * size_of::<RegionEntry>() {
                return Err(bad(
                    kind,
                    format!("region count {count} (max {MAX_REGIONS}) does not match {} bytes of entries", rest.len()),
                ));
            }
            let mode = Mode::from_wire(head.mode)
                .ok_or_else(|| bad(kind, format!("unknown mode {}", head.mode)))?;
            let memory_kind = Backing::from_wire(head.memory_kind)
                .ok_or_else(|| bad(kind, format!("unknown memory kind {}", head.memory_kind)))?;
            let vcpu_count = head.vcpu_count.get();
            if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
                return Err(bad(
                    kind,
                    format!("vCPU count {vcpu_count} outside 1..={MAX_VCPUS}"),
                ));
            }
            let entries = <[RegionEntry]>::ref_from_bytes(rest)
                .map_err(|_| bad(kind, "region entries are malformed"))?;
            for e in entries {
                reserved_zero(kind, "RegionEntry.reserved", u64::from(e.reserved.get()))?;
            }
            let regions = entries
                .iter()
                .map(|e| RegionLayout {
                    slot: e.slot.get(),
                    gpa: e.gpa.get(),
                    size: e.size.get(),
                })
                .collect();
            let layout = RamLayout::new(regions)?;
            if layout.total_bytes() != head.ram_bytes.get() {
                return Err(bad(
                    kind,
                    format!(
                        "regions add up to {} bytes but the head says {}",
                        layout.total_bytes(),
                        head.ram_bytes.get()
                    ),
                ));
            }
            Message::Config(MigrationConfig {
                mode,
                memory_kind,
                vcpu_count,
                layout,
            })
        }
        Kind::Ready => Message::Ready,
        Kind::Pages => {
            let (head, data) = read_body::<RunHead>(kind, payload)?;
            reserved_zero(kind, "RunHead.reserved", u64::from(head.reserved.get()))?;
            let count = head.count.get();
            run_count(kind, count, MAX_PAGES_PER_FRAME)?;
            aligned(kind, head.gpa.get())?;
            if data.len() != count as usize * PAGE {
                return Err(bad(
                    kind,
                    format!(
                        "{count} pages announced but {} data bytes follow",
                        data.len()
                    ),
                ));
            }
            Message::Pages {
                gpa: head.gpa.get(),
                data,
            }
        }
        Kind::ZeroPages | Kind::Discard | Kind::ReceivedMap => {
            let (head, _) = read_body::<RunHead>(kind, payload)?;
            run_count(kind, head.count.get(), MAX_RUN_PAGES)?;
            aligned(kind, head.gpa.get())?;
            reserved_zero(kind, "RunHead.reserved", u64::from(head.reserved.get()))?;
            let (gpa, count) = (head.gpa.get(), head.count.get());
            match kind {
                Kind::ZeroPages => Message::ZeroPages { gpa, count },
                Kind::Discard => Message::Discard { gpa, count },
                _ => Message::ReceivedMap { gpa, count },
            }
        }
        Kind::Heartbeat => Message::Heartbeat,
        Kind::RecoverState => {
            let (b, _) = read_body::<RecoverStateBody>(kind, payload)?;
            if b.started > 1 {
                return Err(bad(
                    kind,
                    format!("started flag is {}, not 0 or 1", b.started),
                ));
            }
            reserved_zero(kind, "RecoverState.reserved", bytes_value(&b.reserved))?;
            Message::RecoverState {
                started: b.started == 1,
                held_pages: b.held_pages.get(),
            }
        }
        Kind::RoundEnd => {
            let (b, _) = read_body::<RoundEndBody>(kind, payload)?;
            reserved_zero(kind, "RoundEnd.reserved", u64::from(b.reserved.get()))?;
            Message::RoundEnd {
                round: b.round.get(),
                pages: b.pages.get(),
            }
        }
        Kind::State => Message::State(payload),
        Kind::Switchover => Message::Switchover {
            nonce: nonce(kind, payload)?,
        },
        Kind::PostcopyStart => Message::PostcopyStart {
            nonce: nonce(kind, payload)?,
        },
        Kind::Started => Message::Started {
            nonce: nonce(kind, payload)?,
        },
        Kind::PageRequest => {
            let (head, _) = read_body::<PageHead>(kind, payload)?;
            aligned(kind, head.gpa.get())?;
            Message::PageRequest {
                id: head.id.get(),
                gpa: head.gpa.get(),
            }
        }
        Kind::PageReply => {
            let (head, data) = read_body::<PageReplyHead>(kind, payload)?;
            aligned(kind, head.gpa.get())?;
            Message::PageReply {
                id: head.id.get(),
                gpa: head.gpa.get(),
                source_ns: head.source_ns.get(),
                data,
            }
        }
        Kind::Complete => Message::Complete {
            pages: read_body::<U64Body>(kind, payload)?.0.value.get(),
        },
        Kind::Done => {
            let (b, _) = read_body::<DoneBody>(kind, payload)?;
            Message::Done(DoneStats {
                pages_received: b.pages_received.get(),
                bulk_pages: b.bulk_pages.get(),
                urgent_pages: b.urgent_pages.get(),
                zero_pages: b.zero_pages.get(),
                collapses: b.collapses.get(),
                faults: b.faults.get(),
            })
        }
        Kind::Error => {
            let (head, text) = read_body::<ErrorHead>(kind, payload)?;
            if head.len.get() as usize != text.len() {
                return Err(bad(
                    kind,
                    format!(
                        "message length {} but {} bytes follow",
                        head.len.get(),
                        text.len()
                    ),
                ));
            }
            Message::Error {
                code: ErrorCode::from_wire(head.code.get()),
                message: String::from_utf8_lossy(text).into_owned(),
            }
        }
    })
}

fn header(kind: Kind, len: usize) -> FrameHeader {
    FrameHeader {
        magic: U32::new(MAGIC),
        version: U16::new(VERSION),
        kind: U16::new(kind as u16),
        len: U32::new(len as u32),
        reserved: U32::new(0),
    }
}

/// Append the encoded frame of `msg` to `out`.
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) {
    let tail = encode_parts(msg, out);
    out.extend_from_slice(tail);
}

/// Append the header and fixed part of `msg`'s frame to `out`; returns the variable data that
/// must follow (page data, state blob), which the header's length already counts.
pub fn encode_parts<'m>(msg: &'m Message<'_>, out: &mut Vec<u8>) -> &'m [u8] {
    let start = out.len();
    let mut tail: &'m [u8] = &[];
    out.extend_from_slice(header(msg.kind(), 0).as_bytes());
    match msg {
        Message::Hello {
            channel,
            session_id,
            nonce,
        } => out.extend_from_slice(
            HelloBody {
                nonce: *nonce,
                session_id: U64::new(*session_id),
                channel: *channel as u8,
                reserved: [0; 7],
            }
            .as_bytes(),
        ),
        Message::Challenge {
            session_id,
            nonce,
            proof,
        } => out.extend_from_slice(
            ChallengeBody {
                nonce: *nonce,
                proof: *proof,
                session_id: U64::new(*session_id),
            }
            .as_bytes(),
        ),
        Message::Response { proof } => {
            out.extend_from_slice(ResponseBody { proof: *proof }.as_bytes())
        }
        Message::AuthOk { session_id: v }
        | Message::Complete { pages: v }
        | Message::Switchover { nonce: v }
        | Message::PostcopyStart { nonce: v }
        | Message::Started { nonce: v } => out.extend_from_slice(
            U64Body {
                value: U64::new(*v),
            }
            .as_bytes(),
        ),
        Message::Config(c) => {
            let regions = c.layout.regions();
            out.extend_from_slice(
                ConfigHead {
                    ram_bytes: U64::new(c.layout.total_bytes()),
                    vcpu_count: U32::new(c.vcpu_count),
                    region_count: U32::new(regions.len() as u32),
                    mode: c.mode.to_wire(),
                    memory_kind: c.memory_kind.to_wire(),
                    reserved: [0; 6],
                }
                .as_bytes(),
            );
            for r in regions {
                out.extend_from_slice(
                    RegionEntry {
                        gpa: U64::new(r.gpa),
                        size: U64::new(r.size),
                        slot: U32::new(r.slot),
                        reserved: U32::new(0),
                    }
                    .as_bytes(),
                );
            }
        }
        Message::Ready | Message::Heartbeat => {}
        Message::RecoverState {
            started,
            held_pages,
        } => out.extend_from_slice(
            RecoverStateBody {
                held_pages: U64::new(*held_pages),
                started: u8::from(*started),
                reserved: [0; 7],
            }
            .as_bytes(),
        ),
        Message::Pages { gpa, data } => {
            out.extend_from_slice(
                RunHead {
                    gpa: U64::new(*gpa),
                    count: U32::new((data.len() / PAGE) as u32),
                    reserved: U32::new(0),
                }
                .as_bytes(),
            );
            tail = data;
        }
        Message::ZeroPages { gpa, count }
        | Message::Discard { gpa, count }
        | Message::ReceivedMap { gpa, count } => out.extend_from_slice(
            RunHead {
                gpa: U64::new(*gpa),
                count: U32::new(*count),
                reserved: U32::new(0),
            }
            .as_bytes(),
        ),
        Message::RoundEnd { round, pages } => out.extend_from_slice(
            RoundEndBody {
                pages: U64::new(*pages),
                round: U32::new(*round),
                reserved: U32::new(0),
            }
            .as_bytes(),
        ),
        Message::State(data) => tail = data,
        Message::PageRequest { id, gpa } => out.extend_from_slice(
            PageHead {
                id: U64::new(*id),
                gpa: U64::new(*gpa),
            }
            .as_bytes(),
        ),
        Message::PageReply {
            id,
            gpa,
            source_ns,
            data,
        } => {
            out.extend_from_slice(
                PageReplyHead {
                    id: U64::new(*id),
                    gpa: U64::new(*gpa),
                    source_ns: U64::new(*source_ns),
                }
                .as_bytes(),
            );
            tail = data;
        }
        Message::Done(s) => out.extend_from_slice(
            DoneBody {
                pages_received: U64::new(s.pages_received),
                bulk_pages: U64::new(s.bulk_pages),
                urgent_pages: U64::new(s.urgent_pages),
                zero_pages: U64::new(s.zero_pages),
                collapses: U64::new(s.collapses),
                faults: U64::new(s.faults),
            }
            .as_bytes(),
        ),
        Message::Error { code, message } => {
            let mut end = message.len().min(MAX_ERROR_MESSAGE as usize);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let text = &message.as_bytes()[..end];
            out.extend_from_slice(
                ErrorHead {
                    code: U32::new(code.to_wire()),
                    len: U32::new(text.len() as u32),
                }
                .as_bytes(),
            );
            out.extend_from_slice(text);
        }
    }
    let len = out.len() - start - size_of::<FrameHeader>() + tail.len();
    out[start..start + size_of::<FrameHeader>()]
        .copy_from_slice(header(msg.kind(), len).as_bytes());
    tail
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

enum Fill {
    Done,
    Idle,
}

/// Reads frames from a stream. The stream's own read timeout (if any) is the polling tick; the
/// reader fails with [`WireError::Timeout`] once no byte arrived for `stall_timeout`.
///
/// Heartbeat frames are read and skipped by every method. With a liveness bound set
/// ([`FrameReader::set_liveness`]), even the waits that may idle ([`FrameReader::poll`],
/// [`FrameReader::read_within`]) fail once no byte at all (a heartbeat included) arrived for
/// that long: the link is dead even if the peer may legitimately take long to say something.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    stall_timeout: Duration,
    liveness: Option<Duration>,
    last_byte: Instant,
    bytes: u64,
    /// Largest payload accepted now, below the kinds' own bounds (see
    /// [`FrameReader::set_max_payload`]).
    max_payload: u32,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, stall_timeout: Duration) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            stall_timeout,
            liveness: None,
            last_byte: Instant::now(),
            bytes: 0,
            max_payload: u32::MAX,
        }
    }

    /// Refuse frames whose payload is longer than `max` (on top of each kind's own bound)
    /// before anything is allocated for them: until a peer has authenticated, it must not make
    /// us allocate a 64 MiB State buffer. `u32::MAX` lifts the limit.
    pub fn set_max_payload(&mut self, max: u32) {
        self.max_payload = max;
    }

    /// Change how long the peer may stay silent.
    pub fn set_stall_timeout(&mut self, t: Duration) {
        self.stall_timeout = t;
    }

    /// From now on, fail every read once the peer sent no byte for `t` (the peer sends
    /// heartbeats); also bounds the stall timeout to `t`. Counting starts now.
    pub fn set_liveness(&mut self, t: Duration) {
        self.liveness = Some(t);
        self.stall_timeout = self.stall_timeout.min(t);
        self.last_byte = Instant::now();
    }

    /// How long the stream has been silent, if a liveness window is set and that silence
    /// reached it (a read would fail with a timeout).
    pub fn liveness_lapsed(&self) -> Option<Duration> {
        let live = self.liveness?;
        let silent = self.last_byte.elapsed();
        (silent >= live).then_some(silent)
    }

    /// Total bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn fill(
        &mut self,
        from: usize,
        to: usize,
        allow_idle: bool,
        during: &'static str,
    ) -> Result<Fill, WireError> {
        let mut got = from;
        let mut last_progress = Instant::now();
        while got < to {
            match self.inner.read(&mut self.buf[got..to]) {
                Ok(0) if got == 0 => return Err(WireError::Closed { during }),
                Ok(0) => {
                    return Err(WireError::Truncated {
                        during,
                        got,
                        expected: to,
                    })
                }
                Ok(n) => {
                    got += n;
                    self.bytes += n as u64;
                    last_progress = Instant::now();
                    self.last_byte = last_progress;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if allow_idle && got == 0 {
                        if let Some(silent) = self.liveness_lapsed() {
                            return Err(WireError::Timeout {
                                during,
                                waited_ms: silent.as_millis() as u64,
                            });
                        }
                        return Ok(Fill::Idle);
                    }
                    let waited = last_progress.elapsed();
                    if waited >= self.stall_timeout {
                        return Err(WireError::Timeout {
                            during,
                            waited_ms: waited.as_millis() as u64,
                        });
                    }
                }
                Err(source) => return Err(WireError::Io { during, source }),
            }
        }
        Ok(Fill::Done)
    }

    /// Read one whole frame other than a heartbeat into the buffer; returns its kind and
    /// payload length, or None if idling is allowed and nothing (or only heartbeats) arrived
    /// within one tick.
    fn next(
        &mut self,
        allow_idle: bool,
        during: &'static str,
    ) -> Result<Option<(Kind, usize)>, WireError> {
        loop {
            match self.next_frame(allow_idle, during)? {
                Some((Kind::Heartbeat, _)) if allow_idle => return Ok(None),
                Some((Kind::Heartbeat, _)) => {}
                other => return Ok(other),
            }
        }
    }

    fn next_frame(
        &mut self,
        allow_idle: bool,
        during: &'static str,
    ) -> Result<Option<(Kind, usize)>, WireError> {
        let hlen = size_of::<FrameHeader>();
        // The buffer only grows: zero-filling up to 1 MiB again for every Pages frame cost
        // as much as a copy of the data.
        if self.buf.len() < hlen {
            self.buf.resize(hlen, 0);
        }
        if let Fill::Idle = self.fill(0, hlen, allow_idle, during)? {
            return Ok(None);
        }
        let h = FrameHeader::read_from_bytes(&self.buf[..hlen])
            .map_err(|_| bad(Kind::Error, "header size"))?;
        let (kind, len) = check_header(&h)?;
        if len > self.max_payload {
            return Err(WireError::BadLength {
                kind,
                len,
                min: kind.len_bounds().0,
                max: self.max_payload,
            });
        }
        let total = hlen + len as usize;
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
        self.fill(hlen, total, false, during)?;
        Ok(Some((kind, len as usize)))
    }

    fn decode_buf(&self, kind: Kind, len: usize) -> Result<Message<'_>, WireError> {
        let hlen = size_of::<FrameHeader>();
        decode(kind, &self.buf[hlen..hlen + len])
    }

    /// Read the next frame, waiting at most the stall timeout for it to start and to complete.
    pub fn read(&mut self, during: &'static str) -> Result<Message<'_>, WireError> {
        match self.next(false, during)? {
            Some((kind, len)) => self.decode_buf(kind, len),
            // `next` returns None only when idling is allowed.
            None => Err(WireError::Timeout {
                during,
                waited_ms: self.stall_timeout.as_millis() as u64,
            }),
        }
    }

    /// Read the next frame if one starts within one tick of the stream's read timeout; once a
    /// frame started it is read to the end (or the stall timeout).
    pub fn poll(&mut self, during: &'static str) -> Result<Option<Message<'_>>, WireError> {
        match self.next(true, during)? {
            Some((kind, len)) => self.decode_buf(kind, len).map(Some),
            None => Ok(None),
        }
    }

    /// Read the next frame, waiting up to `wait` for it to start (longer than the stall timeout,
    /// e.g. while the peer sets up memory or runs a collapse).
    pub fn read_within(
        &mut self,
        wait: Duration,
        during: &'static str,
    ) -> Result<Message<'_>, WireError> {
        let start = Instant::now();
        loop {
            let idle = start.elapsed() < wait;
            if let Some((kind, len)) = self.next(idle, during)? {
                return self.decode_buf(kind, len);
            }
        }
    }
}

/// Writes frames to a stream. A stream write timeout surfaces as [`WireError::Timeout`].
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    bytes: u64,
    stall_timeout: Duration,
    last_write: Instant,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W, stall_timeout: Duration) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
            bytes: 0,
            stall_timeout,
            last_write: Instant::now(),
        }
    }

    /// How long ago the last frame was written in full (or the writer was made).
    pub fn idle_for(&self) -> Duration {
        self.last_write.elapsed()
    }

    /// Change how long a write may make no progress.
    pub fn set_stall_timeout(&mut self, t: Duration) {
        self.stall_timeout = t;
    }

    /// Total bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn write_parts(&mut self, tail: &[u8], during: &'static str) -> Result<(), WireError> {
        let head = std::mem::take(&mut self.buf);
        let total = head.len() + tail.len();
        let mut parts = [io::IoSlice::new(&head), io::IoSlice::new(tail)];
        let mut slices: &mut [io::IoSlice<'_>] = &mut parts;
        let mut done = 0;
        let mut last_progress = Instant::now();
        let mut result = Ok(());
        while done < total {
            match self.inner.write_vectored(slices) {
                Ok(0) => {
                    result = Err(WireError::Closed { during });
                    break;
                }
                Ok(n) => {
                    done += n;
                    io::IoSlice::advance_slices(&mut slices, n);
                    last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    let waited = last_progress.elapsed();
                    if waited >= self.stall_timeout {
                        result = Err(WireError::Timeout {
                            during,
                            waited_ms: waited.as_millis() as u64,
                        });
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    result = Err(WireError::Closed { during });
                    break;
                }
                Err(source) => {
                    result = Err(WireError::Io { during, source });
                    break;
                }
            }
        }
        self.bytes += done as u64;
        self.buf = head;
        if result.is_ok() {
            self.last_write = Instant::now();
        }
        result
    }

    /// Encode and send one message (page data and state are written straight from `msg`).
    pub fn send(&mut self, msg: &Message<'_>, during: &'static str) -> Result<(), WireError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let tail = encode_parts(msg, &mut buf);
        self.buf = buf;
        self.write_parts(tail, during)
    }
}

/// Turn a received message that is not the expected one into an error (a peer's Error frame
/// becomes [`WireError::Remote`]).
pub fn unexpected(msg: Message<'_>, during: &'static str, expected: &'static str) -> WireError {
    match msg {
        Message::Error { code, message } => WireError::Remote { code, message },
        other => WireError::Unexpected {
            during,
            expected,
            got: other.kind(),
        },
    }
}

/// Check that a run of `count` pages at `gpa` lies inside one region of `layout`; returns the
/// global index of its first page.
pub fn check_run(layout: &RamLayout, kind: Kind, gpa: u64, count: u64) -> Result<u64, WireError> {
    layout
        .run_index(gpa, count)
        .ok_or(WireError::OutsideLayout { kind, gpa, count })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RamLayout {
        RamLayout::new(vec![
            RegionLayout {
                slot: 0,
                gpa: 0,
                size: 1 << 20,
            },
            RegionLayout {
                slot: 1,
                gpa: 1 << 32,
                size: 2 << 20,
            },
        ])
        .unwrap()
    }

    fn roundtrip(msg: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out);
        let mut r = FrameReader::new(&out[..], Duration::from_secs(1));
        let got = r.read("test").unwrap();
        assert_eq!(&got, msg);
        out
    }

    #[test]
    fn every_message_round_trips() {
        let page = vec![0xabu8; 4096];
        let pages = vec![7u8; 3 * 4096];
        let msgs = vec![
            Message::Hello {
                channel: ChannelKind::Urgent,
                session_id: 9,
                nonce: [1; 32],
            },
            Message::Challenge {
                session_id: 5,
                nonce: [2; 32],
                proof: [3; 32],
            },
            Message::Response { proof: [4; 32] },
            Message::AuthOk { session_id: 77 },
            Message::Config(MigrationConfig {
                mode: Mode::Hybrid,
                memory_kind: Backing::Hugetlb1g,
                vcpu_count: 2,
                layout: layout(),
            }),
            Message::Ready,
            Message::Pages {
                gpa: 0x3000,
                data: &pages,
            },
            Message::ZeroPages {
                gpa: 0x1000,
                count: 10,
            },
            Message::Discard {
                gpa: 0x2000,
                count: 1,
            },
            Message::RoundEnd {
                round: 3,
                pages: 1000,
            },
            Message::State(b"state blob"),
            Message::State(b""),
            Message::Switchover { nonce: 0x1234 },
            Message::PostcopyStart { nonce: u64::MAX },
            Message::Started { nonce: 1 },
            Message::PageRequest { id: 1, gpa: 0x5000 },
            Message::PageReply {
                id: 1,
                gpa: 0x5000,
                source_ns: 12_345,
                data: &page,
            },
            Message::Complete { pages: 768 },
            Message::Done(DoneStats {
                pages_received: 1,
                bulk_pages: 2,
                urgent_pages: 3,
                zero_pages: 4,
                collapses: 5,
                faults: 6,
            }),
            Message::Error {
                code: ErrorCode::AuthFailed,
                message: "authentication failed".into(),
            },
            Message::ReceivedMap {
                gpa: 0x3000,
                count: 7,
            },
            Message::RecoverState {
                started: true,
                held_pages: 12345,
            },
        ];
        for m in &msgs {
            roundtrip(m);
        }
    }

    #[test]
    fn heartbeat_is_an_empty_frame() {
        let mut out = Vec::new();
        encode(&Message::Heartbeat, &mut out);
        assert_eq!(out.len(), size_of::<FrameHeader>());
        let h = FrameHeader::read_from_bytes(&out[..]).unwrap();
        assert_eq!(check_header(&h).unwrap(), (Kind::Heartbeat, 0));
        assert_eq!(decode(Kind::Heartbeat, &[]).unwrap(), Message::Heartbeat);
    }

    #[test]
    fn readers_skip_heartbeats() {
        let mut w = FrameWriter::new(Vec::new(), Duration::from_secs(1));
        w.send(&Message::Heartbeat, "t").unwrap();
        w.send(&Message::Heartbeat, "t").unwrap();
        w.send(&Message::Ready, "t").unwrap();
        let bytes = w.get_ref().clone();
        let mut r = FrameReader::new(&bytes[..], Duration::from_secs(1));
        assert_eq!(r.read("t").unwrap(), Message::Ready);
        let mut r = FrameReader::new(&bytes[..], Duration::from_secs(1));
        // poll reports a heartbeat as "nothing yet", never as a message.
        assert_eq!(r.poll("t").unwrap(), None);
        assert_eq!(r.poll("t").unwrap(), None);
        assert_eq!(r.poll("t").unwrap(), Some(Message::Ready));
    }

    #[test]
    fn recover_state_fields_are_checked() {
        let mut buf = Vec::new();
        encode(
            &Message::RecoverState {
                started: false,
                held_pages: 1,
            },
            &mut buf,
        );
        let hlen = size_of::<FrameHeader>();
        buf[hlen + 8] = 2; // started flag neither 0 nor 1
        let e = decode(Kind::RecoverState, &buf[hlen..]).unwrap_err();
        assert!(e.to_string().contains("started flag"), "{e}");
    }

    #[test]
    fn writer_sends_what_the_reader_reads() {
        let data: Vec<u8> = (0..2 * 4096).map(|i| i as u8).collect();
        let mut w = FrameWriter::new(Vec::new(), Duration::from_secs(1));
        w.send(
            &Message::Pages {
                gpa: 0x2000,
                data: &data,
            },
            "t",
        )
        .unwrap();
        w.send(&Message::State(b"abc"), "t").unwrap();
        assert_eq!(w.bytes_written() as usize, w.get_ref().len());
        let mut r = FrameReader::new(&w.get_ref()[..], Duration::from_secs(1));
        assert_eq!(
            r.read("t").unwrap(),
            Message::Pages {
                gpa: 0x2000,
                data: &data
            }
        );
        assert_eq!(r.read("t").unwrap(), Message::State(b"abc"));
    }

    #[test]
    fn frames_stream_back_to_back() {
        let mut out = Vec::new();
        encode(&Message::Ready, &mut out);
        encode(&Message::Complete { pages: 3 }, &mut out);
        let mut r = FrameReader::new(&out[..], Duration::from_secs(1));
        assert_eq!(r.read("a").unwrap(), Message::Ready);
        assert_eq!(r.read("b").unwrap(), Message::Complete { pages: 3 });
        assert!(matches!(
            r.read("c"),
            Err(WireError::Closed { during: "c" })
        ));
    }

    fn read_err(bytes: &[u8]) -> WireError {
        FrameReader::new(bytes, Duration::from_secs(1))
            .read("test")
            .unwrap_err()
    }

    #[test]
    fn reserved_fields_must_be_zero() {
        let page = vec![0u8; 4096];
        let config = || {
            Message::Config(MigrationConfig {
                mode: Mode::Postcopy,
                memory_kind: Backing::Anon,
                vcpu_count: 1,
                layout: layout(),
            })
        };
        // (message, offset of a reserved byte in the frame, kind, field)
        let cases: Vec<(Message<'_>, usize, Kind, &str)> = vec![
            (
                Message::Hello {
                    channel: ChannelKind::Main,
                    session_id: 0,
                    nonce: [1; 32],
                },
                16 + 47,
                Kind::Hello,
                "Hello.reserved",
            ),
            (config(), 16 + 18, Kind::Config, "ConfigHead.reserved"),
            (config(), 16 + 23, Kind::Config, "ConfigHead.reserved"),
            // The second region entry's reserved word.
            (
                config(),
                16 + 24 + 24 + 20,
                Kind::Config,
                "RegionEntry.reserved",
            ),
            (
                Message::Pages {
                    gpa: 0,
                    data: &page,
                },
                16 + 12,
                Kind::Pages,
                "RunHead.reserved",
            ),
            (
                Message::ZeroPages { gpa: 0, count: 1 },
                16 + 15,
                Kind::ZeroPages,
                "RunHead.reserved",
            ),
            (
                Message::Discard { gpa: 0, count: 1 },
                16 + 12,
                Kind::Discard,
                "RunHead.reserved",
            ),
            (
                Message::ReceivedMap { gpa: 0, count: 1 },
                16 + 12,
                Kind::ReceivedMap,
                "RunHead.reserved",
            ),
            (
                Message::RoundEnd { round: 1, pages: 2 },
                16 + 12,
                Kind::RoundEnd,
                "RoundEnd.reserved",
            ),
            (
                Message::RecoverState {
                    started: true,
                    held_pages: 3,
                },
                16 + 15,
                Kind::RecoverState,
                "RecoverState.reserved",
            ),
        ];
        for (msg, at, kind, field) in cases {
            let mut out = Vec::new();
            encode(&msg, &mut out);
            // The frame as sent is accepted...
            FrameReader::new(&out[..], Duration::from_secs(1))
                .read("test")
                .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            // ...and with one reserved byte set, refused naming the field.
            out[at] = 0x40;
            match read_err(&out) {
                WireError::Reserved {
                    kind: k,
                    field: f,
                    value,
                } => {
                    assert_eq!((k, f), (kind, field));
                    assert_ne!(value, 0);
                }
                e => panic!("{kind:?} with reserved byte {at} set: {e:?}"),
            }
            assert!(read_err(&out).to_string().contains(field));
        }
    }

    #[test]
    fn switchover_frames_and_started_carry_a_nonzero_nonce() {
        for msg in [
            Message::Switchover { nonce: 0 },
            Message::PostcopyStart { nonce: 0 },
            Message::Started { nonce: 0 },
        ] {
            let kind = msg.kind();
            let mut out = Vec::new();
            encode(&msg, &mut out);
            assert!(matches!(read_err(&out), WireError::ZeroNonce { kind: k } if k == kind));
        }
        // The nonce is part of the fixed length: a bare switchover frame is refused.
        let mut out = Vec::new();
        encode(&Message::Ready, &mut out);
        out[6..8].copy_from_slice(&(Kind::PostcopyStart as u16).to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadLength {
                kind: Kind::PostcopyStart,
                ..
            }
        ));
    }

    #[test]
    fn rejects_garbage_and_wrong_version() {
        assert!(matches!(
            read_err(b"GET / HTTP/1.1\r\n\r\n"),
            WireError::BadMagic { .. }
        ));
        let mut out = Vec::new();
        encode(&Message::Ready, &mut out);
        out[4] = 1; // version 1: before the switchover nonce
        assert!(matches!(
            read_err(&out),
            WireError::VersionMismatch { ours: 3, theirs: 1 }
        ));
        out[4] = 2; // version 2: page replies without the source's time
        assert!(matches!(
            read_err(&out),
            WireError::VersionMismatch { ours: 3, theirs: 2 }
        ));
        let mut out = Vec::new();
        encode(&Message::Ready, &mut out);
        out[6] = 99; // kind
        assert!(matches!(
            read_err(&out),
            WireError::UnknownKind { kind: 99 }
        ));
        let mut out = Vec::new();
        encode(&Message::Ready, &mut out);
        out[12] = 1; // reserved
        assert!(matches!(read_err(&out), WireError::BadField { .. }));
    }

    #[test]
    fn rejects_lengths_outside_the_kind_bound() {
        let mut out = Vec::new();
        encode(&Message::State(b""), &mut out);
        out[8..12].copy_from_slice(&(MAX_STATE_BYTES + 1).to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadLength {
                kind: Kind::State,
                ..
            }
        ));
        let mut out = Vec::new();
        encode(&Message::AuthOk { session_id: 1 }, &mut out);
        out[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            read_err(&out[..20]),
            WireError::BadLength {
                kind: Kind::AuthOk,
                ..
            }
        ));
    }

    #[test]
    fn detects_truncation() {
        let page = vec![1u8; 4096];
        let mut out = Vec::new();
        encode(
            &Message::PageReply {
                id: 1,
                gpa: 0,
                source_ns: 0,
                data: &page,
            },
            &mut out,
        );
        match read_err(&out[..100]) {
            WireError::Truncated {
                got: 100, expected, ..
            } => assert_eq!(expected, out.len()),
            e => panic!("{e}"),
        }
        assert!(matches!(
            read_err(&out[..7]),
            WireError::Truncated {
                got: 7,
                expected: 16,
                ..
            }
        ));
    }

    #[test]
    fn validates_fields() {
        // Pages: count disagrees with data, unaligned gpa.
        let pages = vec![0u8; 2 * 4096];
        let mut out = Vec::new();
        encode(
            &Message::Pages {
                gpa: 0,
                data: &pages,
            },
            &mut out,
        );
        out[24..28].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::Pages,
                ..
            }
        ));
        let mut out = Vec::new();
        encode(
            &Message::Pages {
                gpa: 0x1001,
                data: &pages,
            },
            &mut out,
        );
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::Pages,
                ..
            }
        ));
        // Zero run of zero pages.
        let mut out = Vec::new();
        encode(&Message::ZeroPages { gpa: 0, count: 0 }, &mut out);
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::ZeroPages,
                ..
            }
        ));
        // Session id 0.
        let mut out = Vec::new();
        encode(&Message::AuthOk { session_id: 0 }, &mut out);
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::AuthOk,
                ..
            }
        ));
    }

    #[test]
    fn validates_config() {
        let cfg = MigrationConfig {
            mode: Mode::Precopy,
            memory_kind: Backing::Anon,
            vcpu_count: 1,
            layout: layout(),
        };
        let mut good = Vec::new();
        encode(&Message::Config(cfg), &mut good);
        // Overlapping regions: move region 1 onto region 0.
        let mut out = good.clone();
        let r1 = 16 + 24 + 24;
        out[r1..r1 + 8].copy_from_slice(&0x1000u64.to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadLayout(LayoutError::Overlap { .. })
        ));
        // Unaligned region size.
        let mut out = good.clone();
        out[16 + 24 + 8..16 + 24 + 16].copy_from_slice(&0x1234u64.to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadLayout(LayoutError::BadRegion { .. })
        ));
        // ram_bytes disagrees.
        let mut out = good.clone();
        out[16..24].copy_from_slice(&1u64.to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::Config,
                ..
            }
        ));
        // vCPU count 0 and unknown mode.
        let mut out = good.clone();
        out[24..28].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::Config,
                ..
            }
        ));
        let mut out = good.clone();
        out[32] = 9;
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::Config,
                ..
            }
        ));
        // Region count disagrees with the entries.
        let mut out = good;
        out[28..32].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            read_err(&out),
            WireError::BadField {
                kind: Kind::Config,
                ..
            }
        ));
    }

    #[test]
    fn runs_are_checked_against_the_layout() {
        let l = layout();
        assert_eq!(check_run(&l, Kind::Pages, 0, 256).unwrap(), 0);
        assert!(
            check_run(&l, Kind::Pages, 0, 257).is_err(),
            "crosses the end of region 0"
        );
        assert_eq!(check_run(&l, Kind::Pages, 1 << 32, 1).unwrap(), 256);
        assert!(check_run(&l, Kind::Pages, 1 << 31, 1).is_err(), "hole");
        assert!(
            check_run(&l, Kind::Pages, (1 << 32) + (2 << 20), 1).is_err(),
            "past the end"
        );
        assert_eq!(l.page_gpa(256), Some(1 << 32));
        assert_eq!(l.page_gpa(768), None);
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "é".repeat(2000);
        let mut out = Vec::new();
        encode(
            &Message::Error {
                code: ErrorCode::Internal,
                message: long,
            },
            &mut out,
        );
        match FrameReader::new(&out[..], Duration::from_secs(1))
            .read("t")
            .unwrap()
        {
            Message::Error { message, .. } => assert!(message.len() <= MAX_ERROR_MESSAGE as usize),
            m => panic!("{m:?}"),
        }
    }
}
