//! The destination's end of the urgent channel: the [`PageFetcher`] the postcopy fault service
//! fetches pages with.
//!
//! Many fault workers fetch at once; each writes its `PageRequest` and waits for the reply with
//! its request id. There is no reader thread in between: the replies are read by the fetches
//! themselves (leader/follower). Whoever holds the channel's reader ([`UrgentClient::rx`]) reads
//! frames and puts each reply straight into the buffer of the fetch that asked for it; a fetch
//! that finds the reader free takes it, so a lone fault (the common case) reads its own reply
//! and costs no thread hand-off between the socket and the page's store. A fetch that finds it
//! taken sleeps on its slot until the holder fills it or hands the reader on
//! ([`UrgentClient::hand_on`]). While no fetch waits, a watcher thread per connected stretch
//! checks the channel now and then without blocking, so heartbeats are consumed and a reset or
//! a silent (black-holed) link is noticed even when no fault is in flight.
//!
//! While the link is down (between [`UrgentClient::detach`] and [`UrgentClient::attach`])
//! fetches fail with `Disconnected` at once and the fault service retries them, so a faulting
//! vCPU waits and its request is issued again after a recovery.

use crate::sync::{CondvarExt, MutexExt};
use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::liveness::SharedWriter;
use crate::thread_priority::{self, ThreadRole};
use crate::transport::{LiveChannel, ReadHalf};
use crate::types::{
    AtomicPageSet, ChannelDown, FetchError, FetchTimes, PageFetcher, RamLayout, PAGE_SIZE,
};
use crate::wire::{self, FrameReader, Message, WireError};

const PAGE: usize = PAGE_SIZE as usize;

/// How often the watcher looks at an idle channel.
const WATCH_EVERY: Duration = Duration::from_millis(50);
/// The longest a waiting fetch sleeps before it looks again whether the reader is free (a
/// safety net: the holder hands the reader on when it lets go).
const FOLLOWER_RECHECK: Duration = Duration::from_millis(10);

enum SlotState {
    /// The fetch waits; the reader's holder may write the reply into its buffer.
    Waiting,
    /// The reply is in the fetch's buffer: when it was read, and the source's time.
    Filled { read_at: Instant, source_ns: u64 },
    /// The channel failed under the fetch.
    Failed(ChannelDown),
    /// The fetch gave up (timeout, send failure): its buffer is gone, never write it.
    Abandoned,
}

/// One outstanding page request.
struct Slot {
    gpa: u64,
    /// The waiting fetch's page buffer: the reader's holder copies the reply straight into it
    /// (no allocation, no copy in between). Written only under `state`'s lock while the state
    /// is `Waiting`; the fetch leaves `Waiting` (under the same lock) before it returns.
    buf: SlotBuf,
    state: Mutex<SlotState>,
    cv: Condvar,
}

/// Pointer to a fetch's 4 KiB buffer (see [`Slot::buf`]).
struct SlotBuf(*mut u8);

// SAFETY: the pointer is dereferenced only under the slot's state lock while the state is
// `Waiting`, which the owning fetch (blocked on that slot) guarantees means its buffer is alive
// and not otherwise accessed.
unsafe impl Send for SlotBuf {}
// SAFETY: as for Send.
unsafe impl Sync for SlotBuf {}

struct Pending {
    map: HashMap<u64, Arc<Slot>>,
    /// Why the channel is down, while it is.
    down: Option<ChannelDown>,
}

/// The urgent channel of one connected stretch of the session (its write side).
struct UrgentLink {
    writer: SharedWriter,
    stream: TcpStream,
    /// The main channel of the same stretch: shut down when the urgent one fails, so the
    /// receive loop notices at once.
    main: Option<TcpStream>,
    epoch: u64,
}

/// The read side of one connected stretch: whoever holds it reads replies for everyone.
struct Rx {
    reader: FrameReader<ReadHalf>,
    epoch: u64,
}

/// Why a holder of the reader stopped reading.
enum ReadEnd {
    /// The slot it waits for left `Waiting` (filled, failed or abandoned).
    SlotDone,
    /// Its deadline passed.
    Deadline,
    /// The channel failed or is gone (the failure is reported; every fetch was failed).
    Channel,
}

/// A stretch attached by [`UrgentClient::attach_unwatched`] whose watcher thread has not
/// started yet.
#[must_use = "without its watcher, a channel no fetch reads is not watched for failure"]
pub struct Unwatched {
    client: Arc<UrgentClient>,
    epoch: u64,
}

impl Unwatched {
    /// Starts the stretch's watcher thread (none once the client was closed or attached anew).
    pub fn watch(self) -> std::io::Result<()> {
        let Unwatched { client, epoch } = self;
        if !client.current(epoch) {
            return Ok(());
        }
        let watcher = Arc::clone(&client);
        let handle = std::thread::Builder::new()
            .name("mig-urgent-rx".into())
            .spawn(move || {
                crate::thread_hook::started(crate::thread_hook::ThreadKind::Channel);
                let _priority = thread_priority::enter(ThreadRole::Urgent);
                watcher.watch(epoch)
            })?;
        client.watchers.lock_unpoisoned().push(handle);
        Ok(())
    }
}

/// The destination's end of the urgent channel (see the module docs).
pub struct UrgentClient {
    link: Mutex<Option<UrgentLink>>,
    /// The current stretch's reader; None while no channel is attached or after it failed.
    rx: Mutex<Option<Rx>>,
    watchers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pending: Mutex<Pending>,
    /// Signalled when a channel is attached (`pending.down` cleared) or closed for good.
    up: Condvar,
    next_id: AtomicU64,
    epoch: AtomicU64,
    layout: RamLayout,
    timeout: Duration,
    closed: AtomicBool,
    /// Pages that arrived as replies.
    pub(crate) received: AtomicPageSet,
    pub(crate) replies: AtomicU64,
    /// Replies read by the fetch that asked for them (no hand-off).
    own_replies: AtomicU64,
}

impl UrgentClient {
    /// A client with no channel yet ([`UrgentClient::attach`] one). `timeout` bounds each fetch.
    pub fn new(layout: RamLayout, timeout: Duration) -> Arc<Self> {
        let received = AtomicPageSet::new(layout.total_pages());
        Arc::new(UrgentClient {
            link: Mutex::new(None),
            rx: Mutex::new(None),
            watchers: Mutex::new(Vec::new()),
            pending: Mutex::new(Pending {
                map: HashMap::new(),
                down: Some(ChannelDown::NotConnected),
            }),
            up: Condvar::new(),
            next_id: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            layout,
            timeout,
            closed: AtomicBool::new(false),
            received,
            replies: AtomicU64::new(0),
            own_replies: AtomicU64::new(0),
        })
    }

    /// Serve fetches over `channel` (a new connected stretch), watched by a thread of its own
    /// while no fetch reads it; `main` is shut down if this channel fails.
    pub fn attach(
        self: &Arc<Self>,
        channel: LiveChannel,
        main: Option<TcpStream>,
    ) -> std::io::Result<()> {
        self.attach_unwatched(channel, main)?.watch()
    }

    /// [`UrgentClient::attach`] without the watcher thread yet: fetches work at once, each
    /// reading its own reply, and [`Unwatched::watch`] starts the thread that reads the
    /// channel while no fetch does. The switchover uses it so that the blackout does not wait
    /// for a thread to start.
    pub fn attach_unwatched(
        self: &Arc<Self>,
        channel: LiveChannel,
        main: Option<TcpStream>,
    ) -> std::io::Result<Unwatched> {
        let stream = channel.stream_handle().map_err(std::io::Error::other)?;
        let LiveChannel { reader, writer, .. } = channel;
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        *self.rx.lock_unpoisoned() = Some(Rx { reader, epoch });
        *self.link.lock_unpoisoned() = Some(UrgentLink {
            writer,
            stream,
            main,
            epoch,
        });
        if !self.closed.load(Ordering::Acquire) {
            self.pending.lock_unpoisoned().down = None;
            self.up.notify_all();
        }
        Ok(Unwatched {
            client: Arc::clone(self),
            epoch,
        })
    }

    /// The link failed: fail every outstanding fetch (the fault service retries them) and
    /// refuse new ones until the next [`UrgentClient::attach`].
    pub fn detach(&self, reason: ChannelDown) {
        if let Some(link) = self.link.lock_unpoisoned().take() {
            let _ = link.stream.shutdown(std::net::Shutdown::Both);
        }
        self.fail_all(reason);
    }

    /// Why the channel is down, if it is.
    pub fn down_reason(&self) -> Option<ChannelDown> {
        self.pending.lock_unpoisoned().down.clone()
    }

    /// Number of replies received so far.
    pub fn replies(&self) -> u64 {
        self.replies.load(Ordering::Relaxed)
    }

    /// Number of replies read by the very fetch that asked for them.
    pub fn own_replies(&self) -> u64 {
        self.own_replies.load(Ordering::Relaxed)
    }

    /// [`UrgentClient::fail_all`] if stretch `epoch` is still the current one (a failure seen
    /// on an old stretch's channel says nothing about the new one).
    fn fail_epoch(&self, epoch: u64, reason: ChannelDown) {
        let p = self.pending.lock_unpoisoned();
        if self.epoch.load(Ordering::Acquire) == epoch {
            self.fail_locked(p, reason);
        }
    }

    fn fail_all(&self, reason: ChannelDown) {
        self.fail_locked(self.pending.lock_unpoisoned(), reason);
    }

    fn fail_locked(&self, mut p: MutexGuard<'_, Pending>, reason: ChannelDown) {
        if p.down.is_none() {
            p.down = Some(reason.clone());
        }
        for (_, slot) in p.map.drain() {
            *slot.state.lock_unpoisoned() = SlotState::Failed(reason.clone());
            slot.cv.notify_all();
        }
    }

    /// Shut the channel down for good; blocked and later fetches fail with `Disconnected`.
    pub fn close(&self, reason: ChannelDown) {
        self.closed.store(true, Ordering::Release);
        self.detach(reason);
        self.up.notify_all();
        for h in self.watchers.lock_unpoisoned().drain(..) {
            let _ = h.join();
        }
    }

    fn current(&self, epoch: u64) -> bool {
        !self.closed.load(Ordering::Acquire) && self.epoch.load(Ordering::Acquire) == epoch
    }

    /// Put one frame read off the channel where it belongs: a reply into the buffer of the
    /// fetch that asked for it. Err: the channel is no longer usable.
    fn dispatch(&self, msg: Message<'_>) -> Result<(), ChannelDown> {
        let Message::PageReply {
            id,
            gpa,
            source_ns,
            data,
        } = msg
        else {
            return Err(ChannelDown::Wire(Arc::new(wire::unexpected(
                msg,
                "waiting for page replies",
                "PageReply",
            ))));
        };
        let read_at = Instant::now();
        let slot = self.pending.lock_unpoisoned().map.remove(&id);
        let Some(slot) = slot else {
            // A reply to a request that timed out or failed already.
            tracing::debug!(id, gpa, "late page reply dropped");
            return Ok(());
        };
        let bad = if slot.gpa != gpa {
            Some(ChannelDown::WrongGpa {
                id,
                got: gpa,
                requested: slot.gpa,
            })
        } else if data.len() != PAGE {
            Some(ChannelDown::WrongLength {
                id,
                len: data.len(),
            })
        } else {
            None
        };
        if let Some(e) = bad {
            *slot.state.lock_unpoisoned() = SlotState::Failed(e.clone());
            slot.cv.notify_all();
            return Err(e);
        }
        if let Some(i) = self.layout.page_index(gpa) {
            self.received.insert(i);
        }
        self.replies.fetch_add(1, Ordering::Relaxed);
        let mut state = slot.state.lock_unpoisoned();
        if matches!(*state, SlotState::Waiting) {
            // SAFETY: state Waiting under its lock: the fetch's buffer is alive and untouched
            // until it sees the new state (see `Slot::buf`); `data` is one page (checked
            // above), the buffer 4096 bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), slot.buf.0, PAGE) };
            *state = SlotState::Filled { read_at, source_ns };
        }
        drop(state);
        slot.cv.notify_all();
        Ok(())
    }

    /// The channel of stretch `epoch` failed with `reason` (seen by whoever held its reader,
    /// which is dropped so nobody reads it again): fail every fetch, and on anything but a clean
    /// close shut both channels of the stretch down so the receive loop notices at once.
    fn channel_failed(&self, rx: &mut Option<Rx>, epoch: u64, reason: ChannelDown) {
        if rx.as_ref().is_some_and(|r| r.epoch == epoch) {
            *rx = None;
        }
        if !self.current(epoch) {
            return;
        }
        let clean_close = matches!(reason, ChannelDown::ClosedBySource { .. });
        if clean_close {
            // The source ending the session; the main channel says why.
            tracing::debug!("urgent channel closed: {reason}");
        } else {
            tracing::warn!("urgent channel failed: {reason}");
            let link = self.link.lock_unpoisoned();
            if let Some(l) = link.as_ref().filter(|l| l.epoch == epoch) {
                let _ = l.stream.shutdown(std::net::Shutdown::Both);
                if let Some(m) = &l.main {
                    let _ = m.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        self.fail_epoch(epoch, reason);
    }

    /// Read frames (the caller holds the reader) until `slot` leaves `Waiting`, `deadline`
    /// passes or the channel fails.
    fn read_for(&self, rx: &mut Option<Rx>, slot: &Slot, deadline: Instant) -> ReadEnd {
        loop {
            if !matches!(*slot.state.lock_unpoisoned(), SlotState::Waiting) {
                return ReadEnd::SlotDone;
            }
            if Instant::now() >= deadline {
                return ReadEnd::Deadline;
            }
            let Some(r) = rx.as_mut() else {
                return ReadEnd::Channel;
            };
            let epoch = r.epoch;
            if !self.current(epoch) {
                return ReadEnd::Channel;
            }
            let failed = match r.reader.poll("waiting for page replies") {
                Ok(None) => None,
                Ok(Some(msg)) => self.dispatch(msg).err(),
                Err(e) => Some(read_error(e)),
            };
            if let Some(reason) = failed {
                self.channel_failed(rx, epoch, reason);
                return ReadEnd::Channel;
            }
        }
    }

    /// The reader was let go: wake one fetch still waiting (it takes the reader over), unless
    /// someone holds it already.
    fn hand_on(&self, except: u64) {
        let p = self.pending.lock_unpoisoned();
        for (id, slot) in p.map.iter() {
            if *id == except {
                continue;
            }
            let state = slot.state.lock_unpoisoned();
            if matches!(*state, SlotState::Waiting) {
                drop(state);
                slot.cv.notify_all();
                return;
            }
        }
    }

    /// Wait for the reply to request `id` in `slot`: read the channel while nobody else does,
    /// else sleep until the reader's holder fills the slot or hands the reader on.
    fn await_reply(&self, id: u64, slot: &Slot, deadline: Instant) -> SlotState {
        let mut state = slot.state.lock_unpoisoned();
        loop {
            if !matches!(*state, SlotState::Waiting) {
                return std::mem::replace(&mut *state, SlotState::Abandoned);
            }
            let now = Instant::now();
            if now >= deadline {
                // Leave `Waiting` under the lock before the buffer can go away.
                *state = SlotState::Abandoned;
                drop(state);
                self.pending.lock_unpoisoned().map.remove(&id);
                // This fetch may have been the one the reader was handed on to.
                if let Some(rx) = self.rx.try_lock_unpoisoned() {
                    drop(rx);
                    self.hand_on(id);
                }
                return SlotState::Abandoned;
            }
            // Tried under the slot's lock: a holder that lets go of the reader after this
            // attempt takes the slot's lock to hand it on, so that wake-up cannot be missed.
            // An empty reader (no channel attached, or it failed) is nothing to hold: wait
            // for the failure to reach this slot, or for the next stretch.
            let leader = self.rx.try_lock_unpoisoned().filter(|rx| rx.is_some());
            if let Some(mut rx) = leader {
                drop(state);
                let end = self.read_for(&mut rx, slot, deadline);
                let readable = rx.is_some();
                drop(rx);
                if readable {
                    self.hand_on(id);
                }
                let mut state_now = slot.state.lock_unpoisoned();
                if matches!(end, ReadEnd::SlotDone) {
                    if let SlotState::Filled { .. } = &*state_now {
                        self.own_replies.fetch_add(1, Ordering::Relaxed);
                    }
                    return std::mem::replace(&mut *state_now, SlotState::Abandoned);
                }
                state = state_now;
                if !matches!(end, ReadEnd::Channel) {
                    continue;
                }
            }
            state = slot
                .cv
                .wait_timeout_unpoisoned(state, FOLLOWER_RECHECK.min(deadline - now))
                .0;
        }
    }

    /// The watcher of stretch `epoch`: while no fetch waits, look at the channel without
    /// blocking: consume what arrived (heartbeats, late replies) and notice a reset, a close
    /// or a link that has been silent for its liveness window.
    fn watch(&self, epoch: u64) {
        while self.current(epoch) {
            std::thread::sleep(WATCH_EVERY);
            if !self.pending.lock_unpoisoned().map.is_empty() {
                continue; // the fetches read
            }
            let Some(mut rx) = self.rx.try_lock_unpoisoned() else {
                continue;
            };
            let failed = match rx.as_mut() {
                Some(r) if r.epoch == epoch => self.drain_ready(r),
                _ => None,
            };
            if let Some(reason) = failed {
                self.channel_failed(&mut rx, epoch, reason);
            }
            drop(rx);
            self.hand_on(0);
        }
    }

    /// Read the frames that are there now (never waiting for one to start); the reason the
    /// channel is unusable, if it is.
    fn drain_ready(&self, r: &mut Rx) -> Option<ChannelDown> {
        loop {
            if !readable_now(r.reader.get_ref()) {
                return r.reader.liveness_lapsed().map(|silent| {
                    ChannelDown::Wire(Arc::new(WireError::Timeout {
                        during: "waiting for page replies",
                        waited_ms: silent.as_millis() as u64,
                    }))
                });
            }
            match r.reader.poll("waiting for page replies") {
                Ok(None) => {}
                Ok(Some(msg)) => {
                    if let Err(reason) = self.dispatch(msg) {
                        return Some(reason);
                    }
                }
                Err(e) => return Some(read_error(e)),
            }
        }
    }
}

/// What a read error on the urgent channel means for it.
fn read_error(e: WireError) -> ChannelDown {
    match e {
        WireError::Closed { during } => ChannelDown::ClosedBySource { during },
        e => ChannelDown::Wire(Arc::new(e)),
    }
}

/// Whether a read of `half` would return at once: bytes (or an error, or the end) wait on the
/// socket, or TLS holds bytes a poll on the socket cannot see.
fn readable_now(half: &ReadHalf) -> bool {
    if half.buffered() {
        return true;
    }
    let mut fds = [nix::poll::PollFd::new(
        half.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    !matches!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
        Ok(0) | Err(_)
    )
}

impl PageFetcher for UrgentClient {
    fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.pending.lock_unpoisoned();
        while p.down.is_some() && !self.closed.load(Ordering::Acquire) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            p = self.up.wait_timeout_unpoisoned(p, left).0;
        }
        p.down.is_none()
    }

    fn fetch(&self, gpa: u64, buf: &mut [u8; 4096]) -> Result<(), FetchError> {
        self.fetch_timed(gpa, buf, &mut FetchTimes::default())
    }

    fn fetch_timed(
        &self,
        gpa: u64,
        buf: &mut [u8; 4096],
        times: &mut FetchTimes,
    ) -> Result<(), FetchError> {
        if self.layout.page_index(gpa).is_none() {
            return Err(FetchError::BadAddress { gpa });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            gpa,
            buf: SlotBuf(buf.as_mut_ptr()),
            state: Mutex::new(SlotState::Waiting),
            cv: Condvar::new(),
        });
        {
            let mut p = self.pending.lock_unpoisoned();
            if let Some(reason) = &p.down {
                return Err(FetchError::Disconnected {
                    gpa,
                    reason: reason.clone(),
                });
            }
            p.map.insert(id, Arc::clone(&slot));
        }
        let link = self
            .link
            .lock_unpoisoned()
            .as_ref()
            .map(|l| (l.writer.clone(), l.epoch));
        let sent = match &link {
            Some((w, epoch)) => w
                .lock_unpoisoned()
                .send(&Message::PageRequest { id, gpa }, "sending a page request")
                .map_err(|e| (ChannelDown::Wire(Arc::new(e)), Some(*epoch))),
            None => Err((ChannelDown::NoLink, None)),
        };
        if let Err((reason, epoch)) = sent {
            self.pending.lock_unpoisoned().map.remove(&id);
            // Leave `Waiting` before returning (nobody may write `buf` after that).
            *slot.state.lock_unpoisoned() = SlotState::Abandoned;
            if let Some(epoch) = epoch {
                // The channel failed under this write: fetches wait for the next one.
                self.fail_epoch(epoch, reason.clone());
            }
            return Err(FetchError::Disconnected { gpa, reason });
        }
        let started = Instant::now();
        times.request_written = Some(started);
        match self.await_reply(id, &slot, started + self.timeout) {
            SlotState::Filled { read_at, source_ns } => {
                times.reply_read = Some(read_at);
                times.source_ns = source_ns;
                Ok(())
            }
            SlotState::Failed(reason) => Err(FetchError::Disconnected { gpa, reason }),
            SlotState::Abandoned if started.elapsed() >= self.timeout => Err(FetchError::Timeout {
                gpa,
                waited_ms: started.elapsed().as_millis() as u64,
            }),
            SlotState::Abandoned | SlotState::Waiting => Err(FetchError::Disconnected {
                gpa,
                reason: ChannelDown::Abandoned,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    use super::*;
    use crate::transport::{Channel, Timeouts};
    use crate::types::RegionLayout;

    const PAGES: u64 = 256;

    /// The byte page `gpa` of the fake source holds.
    fn fill_of(gpa: u64) -> u8 {
        (gpa / PAGE_SIZE) as u8 ^ 0x5a
    }

    /// A connected pair: the destination's urgent channel (live, with `liveness`) and the
    /// source's end.
    fn pair(liveness: Duration) -> (LiveChannel, Channel) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let dst = TcpStream::connect(addr).unwrap();
        let (src, _) = listener.accept().unwrap();
        let t = Timeouts::default();
        let dst = Channel::new(dst, &t, true, None)
            .unwrap()
            .into_live(liveness);
        let mut src = Channel::new(src, &t, true, None).unwrap();
        src.lift_size_limit();
        (dst, src)
    }

    fn client(timeout: Duration) -> Arc<UrgentClient> {
        let layout = RamLayout::new(vec![RegionLayout {
            slot: 0,
            gpa: 0,
            size: PAGES * PAGE_SIZE,
        }])
        .unwrap();
        UrgentClient::new(layout, timeout)
    }

    /// A fake source's urgent server: answers requests in batches of `batch`, the last one
    /// first, after `delay`; stops at the end of the stream.
    fn serve(mut src: Channel, batch: usize, delay: Duration) -> thread::JoinHandle<u64> {
        thread::spawn(move || {
            let mut answered = 0u64;
            let mut held: Vec<(u64, u64)> = Vec::new();
            loop {
                match src.reader.poll("test source") {
                    Ok(Some(Message::PageRequest { id, gpa })) => held.push((id, gpa)),
                    Ok(Some(other)) => panic!("unexpected {other:?}"),
                    Ok(None) => {}
                    Err(_) => return answered,
                }
                if held.len() >= batch || (!held.is_empty() && src.reader.get_ref().buffered()) {
                    thread::sleep(delay);
                    for (id, gpa) in held.drain(..).rev() {
                        let data = [fill_of(gpa); PAGE];
                        let reply = Message::PageReply {
                            id,
                            gpa,
                            source_ns: 1,
                            data: &data,
                        };
                        if src.send(&reply, "test reply").is_err() {
                            return answered;
                        }
                        answered += 1;
                    }
                }
            }
        })
    }

    #[test]
    fn concurrent_fetches_each_get_their_own_page_and_a_lone_fetch_reads_its_own_reply() {
        let c = client(Duration::from_secs(10));
        let (dst, src) = pair(Duration::from_secs(5));
        let server = serve(src, 1, Duration::ZERO);
        c.attach(dst, None).unwrap();
        // One fetch at a time: each reads its own reply (nobody else is waiting).
        let mut buf = [0u8; PAGE];
        for p in 0..32u64 {
            c.fetch(p * PAGE_SIZE, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == fill_of(p * PAGE_SIZE)), "page {p}");
        }
        // (The watcher, every 50 ms, may catch one reply if it looks at the channel in the
        // instant between a fetch's request and its read: at most once in these few ms.)
        assert!(
            c.own_replies() >= 31,
            "a lone fetch reads its own reply: {} of 32",
            c.own_replies()
        );
        // Four fetching threads at once: replies land in the right buffers whoever reads them.
        thread::scope(|s| {
            for t in 0..4u64 {
                let c = &c;
                s.spawn(move || {
                    let mut buf = [0u8; PAGE];
                    for i in 0..200u64 {
                        let gpa = ((t * 64 + i) % PAGES) * PAGE_SIZE;
                        let mut times = FetchTimes::default();
                        c.fetch_timed(gpa, &mut buf, &mut times).unwrap();
                        assert!(buf.iter().all(|&b| b == fill_of(gpa)), "gpa {gpa:#x}");
                        assert!(times.request_written.is_some() && times.reply_read.is_some());
                    }
                });
            }
        });
        assert_eq!(c.replies(), 32 + 800);
        c.close(ChannelDown::Ended);
        assert_eq!(server.join().unwrap(), 32 + 800);
    }

    #[test]
    fn replies_out_of_order_reach_the_fetches_that_asked() {
        let c = client(Duration::from_secs(10));
        let (dst, src) = pair(Duration::from_secs(5));
        // Answers pairs of requests the second one first: each reply read by the fetch that
        // holds the reader is for the other one at least half the time.
        let server = serve(src, 2, Duration::from_millis(1));
        c.attach(dst, None).unwrap();
        thread::scope(|s| {
            for t in 0..2u64 {
                let c = &c;
                s.spawn(move || {
                    let mut buf = [0u8; PAGE];
                    for i in 0..100u64 {
                        let gpa = ((t * 100 + i) % PAGES) * PAGE_SIZE;
                        c.fetch(gpa, &mut buf).unwrap();
                        assert!(buf.iter().all(|&b| b == fill_of(gpa)), "gpa {gpa:#x}");
                    }
                });
            }
        });
        assert_eq!(c.replies(), 200);
        assert!(
            c.own_replies() < 200,
            "some replies were read by the other fetch"
        );
        c.close(ChannelDown::Ended);
        server.join().unwrap();
    }

    #[test]
    fn a_silent_source_fails_a_waiting_fetch_by_liveness_and_an_idle_one_is_noticed() {
        // A source that reads requests and never answers, nor sends heartbeats.
        let c = client(Duration::from_secs(30));
        let (dst, mut src) = pair(Duration::from_millis(300));
        let silent = thread::spawn(move || while src.reader.poll("silent source").is_ok() {});
        c.attach(dst, None).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; PAGE];
        let err = c.fetch(0, &mut buf).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "failed by the liveness window, not the 30 s fetch timeout: {err}"
        );
        assert!(
            matches!(&err, FetchError::Disconnected { reason: ChannelDown::Wire(w), .. }
                if matches!(**w, WireError::Timeout { .. })),
            "{err}"
        );
        c.close(ChannelDown::Ended);
        silent.join().unwrap();

        // No fetch in flight: the watcher notices a source that closed the channel.
        let c = client(Duration::from_secs(30));
        let (dst, src) = pair(Duration::from_secs(30));
        c.attach(dst, None).unwrap();
        assert!(c.down_reason().is_none());
        drop(src);
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.down_reason().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(
            matches!(c.down_reason(), Some(ChannelDown::ClosedBySource { .. })),
            "{:?}",
            c.down_reason()
        );
        c.close(ChannelDown::Ended);
    }
}
