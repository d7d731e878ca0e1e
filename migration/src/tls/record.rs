//! The TLS 1.3 record layer (RFC 8446 §5.2-5.3) for the traffic after the handshake.
//!
//! rustls runs the handshake and derives the traffic keys; the connection then hands its
//! application-traffic secrets over (`dangerous_extract_secrets`, the interface rustls offers
//! for kTLS) and these two types protect the records, as the kernel's TLS layer would. The
//! reason is copies: rustls' record layer moves every record through buffers of its own (a
//! deframer buffer and a plaintext buffer per record on the way in, a fresh buffer per record
//! on the way out), while here a record is sealed and opened in place in the connection's own
//! buffers, which are reused. The bytes on the wire are standard TLS 1.3 (the tests check it
//! against rustls' own record layer in both directions).
//!
//! What this layer does not do: key updates (a KeyUpdate from the peer is refused, and this
//! side never sends one; instead the sealer stops before the cipher suite's confidentiality
//! limit, see [`Sealer::limit`]), post-handshake authentication and session tickets (the
//! configurations disable tickets, and a ticket is refused like any other handshake message).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use zeroize::Zeroizing;

/// `TLSCiphertext` header: opaque type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The AEAD tag of every TLS 1.3 suite.
pub const TAG_LEN: usize = 16;
/// Most application data in one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest `TLSCiphertext.length` a peer may send (RFC 8446 §5.2: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A whole record at its largest.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHERTEXT;
/// The largest record this side writes: header, a full record of data, the inner type, the tag.
pub const MAX_SEALED: usize = HEADER_LEN + MAX_PLAINTEXT + 1 + TAG_LEN;

/// The outer type of every protected record, and the inner type of application data.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
/// `legacy_record_version` of every TLS 1.3 record.
const LEGACY_VERSION: [u8; 2] = [0x03, 0x03];
/// The handshake message type of a KeyUpdate.
const KEY_UPDATE: u8 = 24;

/// What a record carried, once opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Application data: the plaintext is the returned range.
    Data,
    /// An alert: level and description.
    Alert { level: u8, description: u8 },
}

/// Why a record could not be sealed or opened. Each becomes a TLS alert to the peer and an
/// error of the stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("the negotiated TLS cipher suite is not one this record layer supports")]
    UnsupportedSuite,
    #[error("a TLS record of {len} bytes is longer than TLS allows ({MAX_CIPHERTEXT})")]
    TooLong { len: usize },
    #[error(
        "a TLS record of outer type {ty} arrived after the handshake (only application data may)"
    )]
    NotProtected { ty: u8 },
    #[error("a TLS record failed authentication (bad record MAC): the stream was corrupted or tampered with")]
    Decrypt,
    #[error("a TLS record had no content type (all padding)")]
    NoContentType,
    #[error("a TLS alert record of {len} bytes (an alert is 2)")]
    BadAlert { len: usize },
    #[error("the peer updated its TLS keys (KeyUpdate), which this side does not support")]
    KeyUpdate,
    #[error("the peer sent a TLS handshake message of type {ty} after the handshake")]
    PostHandshake { ty: u8 },
    #[error("a TLS record of inner content type {ty}")]
    UnknownContent { ty: u8 },
    #[error("this TLS connection sent {records} records, the limit of its key (about {} GiB); a fresh connection has fresh keys", (records * MAX_PLAINTEXT as u64) >> 30)]
    KeyExhausted { records: u64 },
}

impl RecordError {
    /// The alert description this side sends the peer for it (RFC 8446 §6.2).
    pub fn alert(&self) -> u8 {
        match self {
            RecordError::TooLong { .. } => 22, // record_overflow
            RecordError::Decrypt => 20,        // bad_record_mac
            RecordError::UnsupportedSuite | RecordError::KeyExhausted { .. } => 80, // internal_error
            RecordError::KeyUpdate | RecordError::PostHandshake { .. } => 10, // unexpected_message
            _ => 10,
        }
    }
}

/// One direction's key, IV and record sequence number.
struct Direction {
    key: LessSafeKey,
    iv: Zeroizing<[u8; aead::NONCE_LEN]>,
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::UnsupportedSuite)?;
        let iv: [u8; aead::NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv: Zeroizing::new(iv),
            seq,
        })
    }

    /// The per-record nonce (RFC 8446 §5.3): the IV with the sequence number XORed into its
    /// low 8 bytes. Each sequence number is used once: the caller advances it.
    fn nonce(&self) -> Nonce {
        let mut n = *self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

fn header(len: usize) -> [u8; HEADER_LEN] {
    let l = (len as u16).to_be_bytes();
    [
        APPLICATION_DATA,
        LEGACY_VERSION[0],
        LEGACY_VERSION[1],
        l[0],
        l[1],
    ]
}

/// Seals records for the peer.
pub struct Sealer {
    dir: Direction,
    limit: u64,
}

impl Sealer {
    /// From the transmit half of the extracted secrets. `limit` is the number of records the
    /// suite's key may protect (`CipherSuiteCommon::confidentiality_limit`).
    pub fn new(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        limit: u64,
    ) -> Result<Self, RecordError> {
        Ok(Sealer {
            dir: Direction::new(seq, secrets)?,
            limit,
        })
    }

    /// The number of records this key may still seal before [`RecordError::KeyExhausted`].
    /// rustls would send a KeyUpdate there; this layer ends the connection instead (2^24
    /// records of AES-GCM are 256 GiB; a migration reconnects with fresh keys).
    pub fn limit(&self) -> u64 {
        self.limit.saturating_sub(self.dir.seq)
    }

    /// Start a record at the end of `out`: returns where it starts. Append at most
    /// [`MAX_PLAINTEXT`] bytes of application data to `out`, then call [`Sealer::finish`].
    pub fn begin(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        start
    }

    /// Seal the application data appended since [`Sealer::begin`] returned `start`.
    pub fn finish(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), RecordError> {
        self.finish_as(out, start, APPLICATION_DATA)
    }

    /// Append a sealed alert record (RFC 8446 §6: level 1 warning, 2 fatal).
    pub fn alert(
        &mut self,
        out: &mut Vec<u8>,
        level: u8,
        description: u8,
    ) -> Result<(), RecordError> {
        let start = self.begin(out);
        out.extend_from_slice(&[level, description]);
        self.finish_as(out, start, ALERT)
    }

    fn finish_as(&mut self, out: &mut Vec<u8>, start: usize, ty: u8) -> Result<(), RecordError> {
        let plain = out.len() - start - HEADER_LEN;
        debug_assert!(plain <= MAX_PLAINTEXT, "record of {plain} bytes");
        if self.dir.seq >= self.limit {
            out.truncate(start);
            return Err(RecordError::KeyExhausted {
                records: self.dir.seq,
            });
        }
        out.push(ty);
        let hdr = header(plain + 1 + TAG_LEN);
        out[start..start + HEADER_LEN].copy_from_slice(&hdr);
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(
                self.dir.nonce(),
                Aad::from(hdr),
                &mut out[start + HEADER_LEN..],
            )
            .map_err(|_| RecordError::Decrypt)?;
        self.dir.seq += 1;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The length of the whole record at the start of `buf` (header included), once its header is
/// there: `None` for fewer than [`HEADER_LEN`] bytes.
pub fn record_len(buf: &[u8]) -> Option<Result<usize, RecordError>> {
    let h = buf.get(..HEADER_LEN)?;
    if h[0] != APPLICATION_DATA {
        return Some(Err(RecordError::NotProtected { ty: h[0] }));
    }
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if len > MAX_CIPHERTEXT {
        return Some(Err(RecordError::TooLong { len }));
    }
    Some(Ok(HEADER_LEN + len))
}

/// Opens the peer's records.
pub struct Opener {
    dir: Direction,
}

impl Opener {
    /// From the receive half of the extracted secrets.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        Ok(Opener {
            dir: Direction::new(seq, secrets)?,
        })
    }

    /// Decrypt the whole record at `buf[at..]` (header included, as [`record_len`] measured
    /// it), moving its plaintext to the start of `buf` as it goes (in the same pass: `at` may
    /// be 0, or the record may sit past where its plaintext belongs). Returns what it carried
    /// and the length of its content, which is then `buf[..len]`.
    pub fn open(&mut self, buf: &mut [u8], at: usize) -> Result<(Content, usize), RecordError> {
        let record = &buf[at..];
        let total = match record_len(record) {
            Some(r) => r?,
            None => return Err(RecordError::TooLong { len: record.len() }),
        };
        debug_assert_eq!(total, record.len());
        let aad: [u8; HEADER_LEN] = [record[0], record[1], record[2], record[3], record[4]];
        let plain = self
            .dir
            .key
            .open_within(self.dir.nonce(), Aad::from(aad), buf, at + HEADER_LEN..)
            .map_err(|_| RecordError::Decrypt)?;
        self.dir.seq += 1;
        // TLSInnerPlaintext: content, the content type, then zero padding.
        let Some(len) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        match plain[len] {
            APPLICATION_DATA => Ok((Content::Data, len)),
            ALERT => match plain[..len] {
                [level, description] => Ok((Content::Alert { level, description }, len)),
                _ => Err(RecordError::BadAlert { len }),
            },
            HANDSHAKE => match plain.first() {
                Some(&KEY_UPDATE) => Err(RecordError::KeyUpdate),
                Some(&t) => Err(RecordError::PostHandshake { ty: t }),
                None => Err(RecordError::PostHandshake { ty: 0 }),
            },
            ty => Err(RecordError::UnknownContent { ty }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The record layer against rustls' own: records this layer seals are read by a rustls
    //! connection, and records rustls writes are opened here, in both roles.
    use super::*;
    use crate::tls;
    use rustls::{ClientConnection, Connection, ServerConnection};
    use std::io::{Read, Write};

    fn pair() -> (Connection, Connection) {
        let (client, server) = tls::test_configs();
        let addr = "127.0.0.1:1".parse().unwrap();
        let mut c: Connection =
            ClientConnection::new(Arc::clone(&client.config), client.name_for(addr))
                .unwrap()
                .into();
        let mut s: Connection = ServerConnection::new(Arc::clone(&server.config))
            .unwrap()
            .into();
        while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
            move_records(&mut c, &mut s);
            move_records(&mut s, &mut c);
        }
        (c, s)
    }
    use std::sync::Arc;

    fn move_records(from: &mut Connection, to: &mut Connection) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut data = &buf[..];
        while !data.is_empty() {
            to.read_tls(&mut data).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    fn keys(conn: Connection) -> (Sealer, Opener) {
        let limit = conn
            .negotiated_cipher_suite()
            .unwrap()
            .tls13()
            .unwrap()
            .common
            .confidentiality_limit;
        let s = conn.dangerous_extract_secrets().unwrap();
        (
            Sealer::new(s.tx.0, s.tx.1, limit).unwrap(),
            Opener::new(s.rx.0, s.rx.1).unwrap(),
        )
    }

    fn records_of(conn: &mut Connection, data: &[u8]) -> Vec<u8> {
        conn.writer().write_all(data).unwrap();
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
        wire
    }

    fn open_all(open: &mut Opener, mut wire: Vec<u8>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = record_len(&wire[at..]).unwrap().unwrap();
            let (content, n) = open.open(&mut wire[at..at + len], 0).unwrap();
            assert_eq!(content, Content::Data);
            got.extend_from_slice(&wire[at..at + n]);
            at += len;
        }
        got
    }

    fn read_plain(conn: &mut Connection, wire: &[u8]) -> Vec<u8> {
        let mut data = wire;
        let mut got = Vec::new();
        while !data.is_empty() {
            conn.read_tls(&mut data).unwrap();
            conn.process_new_packets().unwrap();
            let _ = conn.reader().read_to_end(&mut got);
        }
        got
    }

    fn seal_all(seal: &mut Sealer, data: &[u8]) -> Vec<u8> {
        let mut wire = Vec::new();
        for chunk in data.chunks(MAX_PLAINTEXT) {
            let start = seal.begin(&mut wire);
            wire.extend_from_slice(chunk);
            seal.finish(&mut wire, start).unwrap();
        }
        wire
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn records_interoperate_with_rustls_in_both_roles() {
        for ours_is_server in [true, false] {
            let (c, s) = pair();
            let (ours, mut theirs) = if ours_is_server { (s, c) } else { (c, s) };
            let (mut seal, mut open) = keys(ours);
            // Theirs to ours: several records, the last one short.
            let data = pattern(3 * MAX_PLAINTEXT + 123);
            let wire = records_of(&mut theirs, &data);
            assert_eq!(open_all(&mut open, wire), data);
            // Ours to theirs, twice (the sequence number advances).
            for n in [5 * MAX_PLAINTEXT, 1] {
                let data = pattern(n);
                let wire = seal_all(&mut seal, &data);
                assert_eq!(read_plain(&mut theirs, &wire), data);
            }
            // A fatal alert of ours is rustls' AlertReceived.
            let mut wire = Vec::new();
            seal.alert(&mut wire, 2, 20).unwrap();
            let mut data = &wire[..];
            theirs.read_tls(&mut data).unwrap();
            let e = theirs.process_new_packets().unwrap_err();
            assert_eq!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
            );
        }
    }

    #[test]
    fn records_open_into_the_place_ahead_of_them() {
        let (mut c, s) = pair();
        let (_, mut open) = keys(s);
        let data = pattern(3 * MAX_PLAINTEXT + 77);
        let mut wire = records_of(&mut c, &data);
        let (mut at, mut plain) = (0, 0);
        while at < wire.len() {
            let len = record_len(&wire[at..]).unwrap().unwrap();
            let (content, n) = open.open(&mut wire[plain..at + len], at - plain).unwrap();
            assert_eq!(content, Content::Data);
            plain += n;
            at += len;
        }
        assert_eq!(&wire[..plain], &data[..]);
    }

    #[test]
    fn a_flipped_bit_anywhere_in_a_record_fails_authentication() {
        let (mut c, s) = pair();
        let (_, mut open) = keys(s);
        let wire = records_of(&mut c, &pattern(300));
        for at in [1, 4, HEADER_LEN, HEADER_LEN + 100, wire.len() - 1] {
            let (mut c2, s2) = pair();
            let (_, mut open2) = keys(s2);
            let mut w = records_of(&mut c2, &pattern(300));
            w[at] ^= 0x20;
            let r = match record_len(&w) {
                Some(Ok(len)) if len == w.len() => open2.open(&mut w, 0),
                Some(Ok(len)) => Err(RecordError::TooLong { len }),
                Some(Err(e)) => Err(e),
                None => unreachable!(),
            };
            assert!(r.is_err(), "flip at {at} was not caught");
        }
        // The untouched record still opens (the keys were right).
        assert_eq!(open_all(&mut open, wire), pattern(300));
    }

    #[test]
    fn a_replayed_record_fails_authentication() {
        let (mut c, s) = pair();
        let (_, mut open) = keys(s);
        let wire = records_of(&mut c, b"once");
        assert_eq!(open_all(&mut open, wire.clone()), b"once");
        let mut again = wire;
        assert_eq!(open.open(&mut again, 0), Err(RecordError::Decrypt));
    }

    #[test]
    fn a_key_update_from_the_peer_is_refused() {
        let (mut c, s) = pair();
        let (_, mut open) = keys(s);
        c.refresh_traffic_keys().unwrap();
        let mut wire = records_of(&mut c, b"after");
        let len = record_len(&wire).unwrap().unwrap();
        assert_eq!(open.open(&mut wire[..len], 0), Err(RecordError::KeyUpdate));
    }

    #[test]
    fn headers_that_tls_forbids_are_refused_before_decryption() {
        assert_eq!(record_len(&[23, 3, 3]), None);
        assert_eq!(
            record_len(&[22, 3, 3, 0, 10]),
            Some(Err(RecordError::NotProtected { ty: 22 }))
        );
        let too_long = (MAX_CIPHERTEXT + 1) as u16;
        let [hi, lo] = too_long.to_be_bytes();
        assert_eq!(
            record_len(&[23, 3, 3, hi, lo]),
            Some(Err(RecordError::TooLong {
                len: MAX_CIPHERTEXT + 1
            }))
        );
        assert_eq!(record_len(&[23, 3, 3, 0, 17]), Some(Ok(22)));
    }

    #[test]
    fn the_sealer_stops_at_its_key_limit() {
        let (c, _s) = pair();
        let s = c.dangerous_extract_secrets().unwrap();
        let mut seal = Sealer::new(s.tx.0, s.tx.1, 2).unwrap();
        let mut wire = Vec::new();
        for _ in 0..2 {
            let start = seal.begin(&mut wire);
            wire.push(1);
            seal.finish(&mut wire, start).unwrap();
        }
        let len = wire.len();
        let start = seal.begin(&mut wire);
        wire.push(1);
        assert_eq!(
            seal.finish(&mut wire, start),
            Err(RecordError::KeyExhausted { records: 2 })
        );
        assert_eq!(
            wire.len(),
            len,
            "the refused record is not left half-written"
        );
        assert_eq!(seal.limit(), 0);
    }
}
