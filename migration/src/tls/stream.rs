//! The read and write halves of a TLS connection after the handshake.
//!
//! Like the two clones of a plain `TcpStream`, [`TlsReader`] and [`TlsWriter`] are used by two
//! threads at once, and each owns its direction's key: the reader opens records in its own
//! buffer, the writer seals them in its outbox. Nothing is shared on the data path; the reader
//! takes the outbox's lock only to send an alert when the stream fails.
//!
//! The socket's SO_RCVTIMEO/SO_SNDTIMEO stay the polling tick: a read that got no whole record
//! within one tick returns `WouldBlock` as a plain socket would, and a write that could not
//! send its records within one tick returns `WouldBlock` too (the records stay queued and go
//! out first on the next call, which then reports the plaintext as written). A TLS failure (a
//! record that fails authentication, an alert) is an `io::Error` of kind `InvalidData`, so the
//! frame layer reports it as an I/O error: a link failure, which postcopy recovers from over a
//! fresh TLS session.

use crate::sync::MutexExt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use rustls::AlertDescription;

use super::record::{self, Content, Opener, RecordError, Sealer, MAX_PLAINTEXT, MAX_RECORD};
use super::{describe, is_tick, TlsStreamError};

/// The alert description of close_notify.
const CLOSE_NOTIFY: u8 = 0;
/// Alert level of a fatal alert.
const FATAL: u8 = 2;

/// The reader's buffer: socket reads of up to this size, records opened in place.
const READ_BUF: usize = 256 << 10;

/// Reads at least this large take the ciphertext from the socket straight into the caller's
/// buffer ([`TlsReader::read_direct`]): room for a few whole records, so that the record cut
/// at its end, which goes back to our buffer, is a small part.
const DIRECT_MIN: usize = 4 * MAX_RECORD;

/// Most plaintext sealed by one write call (sixteen records). The outbox keeps its capacity
/// between calls, so no record costs an allocation.
const WRITE_CHUNK: usize = 256 << 10;

fn stream_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsStreamError(text))
}

/// Sealed records not yet (fully) on the socket, and the key that seals them.
struct Outbox {
    sock: TcpStream,
    seal: Sealer,
    buf: Vec<u8>,
    sent: usize,
    /// Plaintext bytes whose records are in `buf`, not yet reported as written.
    accepted: usize,
    /// Set once the connection failed (an alert went out, or the key ran out): every later
    /// write returns it.
    failed: Option<String>,
}

impl Outbox {
    /// Write queued records until done or one tick passes without progress.
    fn drain(&mut self) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match self.sock.write(&self.buf[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(())
    }

    /// Seal up to [`WRITE_CHUNK`] bytes of `bufs` into records; returns how many.
    fn seal(&mut self, bufs: &[io::IoSlice<'_>]) -> Result<usize, RecordError> {
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = &[];
        let mut taken = 0;
        while taken < WRITE_CHUNK {
            let start = self.seal.begin(&mut self.buf);
            let mut in_record = 0;
            while in_record < MAX_PLAINTEXT && taken + in_record < WRITE_CHUNK {
                if cur.is_empty() {
                    match slices.next() {
                        Some(s) => cur = s,
                        None => break,
                    }
                }
                let k = cur
                    .len()
                    .min(MAX_PLAINTEXT - in_record)
                    .min(WRITE_CHUNK - taken - in_record);
                self.buf.extend_from_slice(&cur[..k]);
                cur = &cur[k..];
                in_record += k;
            }
            if in_record == 0 {
                self.buf.truncate(start);
                break;
            }
            self.seal.finish(&mut self.buf, start)?;
            taken += in_record;
        }
        Ok(taken)
    }
}

struct Shared {
    out: Mutex<Outbox>,
    /// Whether this end is the client (the source): error texts name the other side.
    client: bool,
}

impl Shared {
    /// Tell the peer why the connection ends (a fatal alert, best effort: at most one tick),
    /// and refuse further writes with `why`.
    fn fail(&self, description: u8, why: &str) {
        let mut out = self.out.lock_unpoisoned();
        if out.failed.is_some() {
            return;
        }
        let Outbox { seal, buf, .. } = &mut *out;
        if seal.alert(buf, FATAL, description).is_ok() {
            let _ = out.drain();
        }
        out.failed = Some(why.to_owned());
    }
}

/// Build the two halves. `leftover` is what the handshake read past its last record: the
/// first records of the peer's data.
pub(super) fn split(
    sock_read: TcpStream,
    sock_write: TcpStream,
    leftover: &[u8],
    seal: Sealer,
    open: Opener,
    client: bool,
) -> (TlsReader, TlsWriter) {
    let shared = Arc::new(Shared {
        out: Mutex::new(Outbox {
            sock: sock_write,
            seal,
            buf: Vec::new(),
            sent: 0,
            accepted: 0,
            failed: None,
        }),
        client,
    });
    let mut buf = vec![0u8; READ_BUF.max(leftover.len() + MAX_RECORD)];
    buf[..leftover.len()].copy_from_slice(leftover);
    (
        TlsReader {
            shared: Arc::clone(&shared),
            sock: sock_read,
            open: Box::new(open),
            buf,
            start: 0,
            end: leftover.len(),
            plain: 0..0,
            eof: false,
            closed: false,
            broken: None,
        },
        TlsWriter { shared },
    )
}

/// The read half of a TLS connection.
pub struct TlsReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    /// Boxed: ring's key schedule is most of its size, and the read half is moved around.
    open: Box<Opener>,
    buf: Vec<u8>,
    /// Bytes read from the socket and not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext of the last opened record not yet taken (in `buf`, before `start`).
    plain: Range<usize>,
    /// The socket reached end of file.
    eof: bool,
    /// The peer sent close_notify.
    closed: bool,
    /// Why the stream failed: every later read returns it.
    broken: Option<String>,
}

impl TlsReader {
    /// The socket it reads from.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Whether a read would return at once without the socket: plaintext not yet taken, a
    /// whole record not yet opened, or an error or end to report.
    pub fn buffered(&self) -> bool {
        !self.plain.is_empty()
            || self.broken.is_some()
            || self.closed
            || match record::record_len(&self.buf[self.start..self.end]) {
                Some(Ok(len)) => len <= self.end - self.start,
                Some(Err(_)) => true,
                None => false,
            }
    }

    /// The stream failed with `e`: tell the peer, and keep the error for every later read.
    fn failed(&mut self, e: RecordError) -> io::Error {
        let text = e.to_string();
        self.shared.fail(e.alert(), &text);
        self.broken = Some(text.clone());
        stream_error(text)
    }

    /// Open the next whole record in the buffer, if there is one. Returns false when more
    /// bytes must come from the socket first.
    fn open_next(&mut self) -> io::Result<bool> {
        let avail = &self.buf[self.start..self.end];
        let len = match record::record_len(avail) {
            None => return Ok(false),
            Some(Err(e)) => return Err(self.failed(e)),
            Some(Ok(len)) if len > avail.len() => return Ok(false),
            Some(Ok(len)) => len,
        };
        let at = self.start;
        let opened = self.open.open(&mut self.buf[at..at + len], 0);
        self.start += len;
        match opened {
            Ok((Content::Data, n)) => {
                self.plain = at..at + n;
                Ok(true)
            }
            Ok((alert, _)) => self.alert(alert).map(|()| true),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// A close_notify ends the stream; any other alert fails it.
    fn alert(&mut self, alert: Content) -> io::Result<()> {
        match alert {
            Content::Data => Ok(()),
            Content::Alert { description, .. } if description == CLOSE_NOTIFY => {
                self.closed = true;
                Ok(())
            }
            Content::Alert { description, .. } => {
                let text = describe(
                    &rustls::Error::AlertReceived(AlertDescription::from(description)),
                    self.shared.client,
                );
                self.broken = Some(text.clone());
                self.shared.out.lock_unpoisoned().failed = Some(text.clone());
                Err(stream_error(text))
            }
        }
    }

    /// Read ciphertext from the socket straight into `out` (after the bytes of a record
    /// already begun) and open each whole record there, its plaintext moved ahead to follow
    /// the previous one's, in the same pass as the decryption: the plaintext needs no copy
    /// out of a buffer of ours. A record cut at the end of `out` goes back to the buffer.
    /// Returns the plaintext bytes now at the start of `out`.
    fn read_direct(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let have = self.end - self.start;
        out[..have].copy_from_slice(&self.buf[self.start..self.end]);
        self.start = 0;
        self.end = 0;
        let filled = match self.sock.read(&mut out[have..]) {
            Ok(0) => {
                self.eof = true;
                have
            }
            Ok(got) => have + got,
            Err(e) => {
                self.buf[..have].copy_from_slice(&out[..have]);
                self.end = have;
                return Err(e);
            }
        };
        let (mut at, mut plain) = (0, 0);
        let mut failure = None;
        while !self.closed {
            let len = match record::record_len(&out[at..filled]) {
                Some(Ok(len)) if len <= filled - at => len,
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                _ => break,
            };
            match self.open.open(&mut out[plain..at + len], at - plain) {
                Ok((Content::Data, n)) => plain += n,
                Ok((alert, _)) => {
                    if let Err(e) = self.alert(alert) {
                        return if plain > 0 { Ok(plain) } else { Err(e) };
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            at += len;
        }
        if let Some(e) = failure {
            let e = self.failed(e);
            return if plain > 0 { Ok(plain) } else { Err(e) };
        }
        let tail = filled - at;
        self.buf[..tail].copy_from_slice(&out[at..filled]);
        self.end = tail;
        Ok(plain)
    }

    /// Read more from the socket (one tick at most), making room for a whole record first.
    fn fill(&mut self) -> io::Result<()> {
        debug_assert!(self.plain.is_empty());
        if self.buf.len() - self.end < MAX_RECORD {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match self.sock.read(&mut self.buf[self.end..]) {
            Ok(0) => self.eof = true,
            Ok(n) => self.end += n,
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        loop {
            if !self.plain.is_empty() {
                let k = self.plain.len().min(out.len() - n);
                let from = self.plain.start;
                out[n..n + k].copy_from_slice(&self.buf[from..from + k]);
                self.plain.start += k;
                n += k;
            }
            if n == out.len() {
                return Ok(n);
            }
            if let Some(text) = &self.broken {
                return if n > 0 {
                    Ok(n)
                } else {
                    Err(stream_error(text.clone()))
                };
            }
            // close_notify, or end of file (without close_notify: the frame layer tells a
            // clean end from a truncated frame itself).
            if self.closed {
                return Ok(n);
            }
            if self.open_next()? {
                continue;
            }
            if n > 0 || self.eof {
                return Ok(n);
            }
            if out.len() >= DIRECT_MIN {
                let got = self.read_direct(out)?;
                if got > 0 || self.eof || self.closed || self.broken.is_some() {
                    return Ok(got);
                }
                continue;
            }
            self.fill()?;
        }
    }
}

/// The write half of a TLS connection.
pub struct TlsWriter {
    shared: Arc<Shared>,
}

impl TlsWriter {
    /// Another handle on the socket it writes to.
    pub fn socket_handle(&self) -> io::Result<TcpStream> {
        self.shared.out.lock_unpoisoned().sock.try_clone()
    }

    fn write_slices(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut out = self.shared.out.lock_unpoisoned();
        if let Some(text) = &out.failed {
            return Err(stream_error(text.clone()));
        }
        if out.accepted > 0 || out.sent < out.buf.len() {
            // Records of an earlier call that timed out: send them first; the plaintext they
            // carry is the start of what the caller retries with.
            out.drain()?;
            let n = std::mem::take(&mut out.accepted);
            if n > 0 {
                return Ok(n);
            }
        }
        let taken = match out.seal(bufs) {
            Ok(n) => n,
            Err(e) => {
                let text = e.to_string();
                drop(out);
                self.shared.fail(e.alert(), &text);
                return Err(stream_error(text));
            }
        };
        match out.drain() {
            Ok(()) => Ok(taken),
            Err(e) if is_tick(&e) => {
                out.accepted = taken;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

impl Write for &TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_slices(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.write_slices(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut out = self.shared.out.lock_unpoisoned();
        out.drain()?;
        out.accepted = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{handshake, test_configs, Side};
    use std::net::TcpListener;
    use std::time::Duration;

    const TICK: Duration = Duration::from_millis(20);

    fn ticked(s: &TcpStream) {
        s.set_read_timeout(Some(TICK)).unwrap();
        s.set_write_timeout(Some(TICK)).unwrap();
    }

    /// A TLS connection over loopback: (client halves, server halves).
    fn connected() -> ((TlsReader, TlsWriter), (TlsReader, TlsWriter)) {
        let (client, server) = test_configs();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (s, peer) = l.accept().unwrap();
            ticked(&s);
            handshake(Side::Server(&server), &s, peer, Duration::from_secs(10)).unwrap()
        });
        let c = TcpStream::connect(addr).unwrap();
        ticked(&c);
        let halves = handshake(Side::Client(&client), &c, addr, Duration::from_secs(10)).unwrap();
        (halves, srv.join().unwrap())
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 13 + i / 4099) as u8).collect()
    }

    #[test]
    fn every_byte_arrives_whatever_the_sizes_of_writes_and_reads() {
        let ((_, writer), (mut reader, _)) = connected();
        let data = pattern(24 << 20);
        let sent = data.clone();
        let w = std::thread::spawn(move || {
            let sizes = [1, 100, 5000, 16384, 16385, 70000, 300_000, 1 << 20, 3];
            let (mut at, mut i) = (0, 0);
            while at < sent.len() {
                let end = (at + sizes[i % sizes.len()]).min(sent.len());
                // Two slices per call, as a frame's header and payload.
                let mid = at + (end - at) / 3;
                let bufs = [
                    io::IoSlice::new(&sent[at..mid]),
                    io::IoSlice::new(&sent[mid..end]),
                ];
                match (&writer).write_vectored(&bufs) {
                    Ok(n) => {
                        at += n;
                        i += 1;
                    }
                    Err(e) if is_tick(&e) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            (&writer).flush().unwrap();
            writer
        });
        let sizes = [
            7,
            4096,
            65536,
            DIRECT_MIN,
            1 << 20,
            3,
            DIRECT_MIN + 1,
            200_000,
        ];
        let mut got = vec![0u8; data.len()];
        let (mut at, mut i) = (0, 0);
        while at < got.len() {
            let end = (at + sizes[i % sizes.len()]).min(got.len());
            match reader.read(&mut got[at..end]) {
                Ok(0) => panic!("end of stream at {at}"),
                Ok(n) => {
                    at += n;
                    i += 1;
                }
                Err(e) if is_tick(&e) => {}
                Err(e) => panic!("read at {at}: {e}"),
            }
        }
        let _writer = w.join().unwrap();
        assert!(got == data, "the bytes differ");
        assert!(!reader.buffered());
    }
}
