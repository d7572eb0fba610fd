//! The TLS 1.3 record layer ([RFC 8446 §5]), after rustls has done the handshake: what the
//! kernel's TLS would do, in userspace, so that each direction of a channel seals or opens on its
//! own thread, into buffers it owns, with no allocation per record.
//!
//! rustls hands over the traffic secrets and a [`KernelConnection`] (its kTLS API), which derives
//! the next secrets at a key update. The records are standard TLS 1.3: outer type
//! `application_data`, version `0x0303`, the length, then the AEAD of the content followed by its
//! inner content type, under the 5-byte header as additional data, with the nonce the IV XOR the
//! record's sequence number. A peer's records may carry padding, alerts, key updates and (to a
//! client) session tickets; each is handled. This end never pads, sends no session tickets, and
//! updates its keys before the cipher's confidentiality limit (for AES-GCM, 2^24 records: about
//! 256 GiB at 16 KiB each), sending a `KeyUpdate` and answering one that asks for it.
//!
//! Any record that fails to open (a flipped bit, a truncated, replayed or reordered record) ends
//! the connection with an error that says so, and nothing of it is ever handed out.
//!
//! [RFC 8446 §5]: https://www.rfc-editor.org/rfc/rfc8446#section-5
//! [`KernelConnection`]: rustls::kernel::KernelConnection

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

/// The most content one record carries (2^14 bytes).
pub(crate) const MAX_FRAGMENT: usize = 1 << 14;
/// A record's header: outer type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// The AEAD tag (every TLS 1.3 cipher suite's is 16 bytes).
const TAG: usize = 16;
/// The most a peer's record may hold after its header: content, type and padding up to
/// 2^14 + 1 bytes, plus at most 255 bytes of AEAD expansion.
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// The largest record, header included.
pub(crate) const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
/// The largest record this end seals: a full fragment, its type, the tag.
pub(crate) const MAX_SEALED: usize = HEADER + MAX_FRAGMENT + 1 + TAG;

/// TLS content types ([RFC 8446 §5.1](https://www.rfc-editor.org/rfc/rfc8446#section-5.1)).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;
/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// The alert that ends a connection cleanly.
const CLOSE_NOTIFY: u8 = 0;

/// Why the record layer ended a connection.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordError {
    /// A record did not open: its tag does not match (TLS's `bad_record_mac`), so it was
    /// corrupted or tampered with on the way, or is out of order.
    BadRecordMac,
    /// A record's header is not TLS 1.3 application data, or its length is out of bounds.
    BadHeader {
        /// The five header bytes.
        header: [u8; HEADER],
    },
    /// The peer closed the connection inside a record.
    Truncated,
    /// The peer sent an alert (RFC 8446's code).
    Alert(u8),
    /// A record opened but holds something TLS 1.3 forbids after the handshake.
    Unexpected(String),
    /// rustls refused a key update or a session ticket.
    Rustls(rustls::Error),
    /// The cipher suite's limit on records under one key was reached without a key update.
    Exhausted,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::BadRecordMac => f.write_str(
                "TLS: a record failed authentication (bad_record_mac): the stream was corrupted \
                 or tampered with on the way",
            ),
            RecordError::BadHeader { header } => {
                write!(f, "TLS: not a TLS 1.3 record header: {header:02x?}")
            }
            RecordError::Truncated => f.write_str("TLS: the peer closed inside a record"),
            RecordError::Alert(code) => write!(f, "TLS: the peer sent alert {}", alert_name(*code)),
            RecordError::Unexpected(what) => write!(f, "TLS: {what}"),
            RecordError::Rustls(e) => write!(f, "TLS: {e}"),
            RecordError::Exhausted => {
                f.write_str("TLS: the keys reached their record limit without a key update")
            }
        }
    }
}

impl std::error::Error for RecordError {}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> io::Error {
        let kind = match e {
            RecordError::Truncated => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// The name RFC 8446 §6 gives an alert code.
pub(crate) fn alert_name(code: u8) -> String {
    format!("{:?}", rustls::AlertDescription::from(code))
}

/// rustls's state after the handshake: what derives the next traffic secrets.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    /// The protocol version and cipher suite the handshake settled.
    pub(crate) fn negotiated(&self) -> (rustls::ProtocolVersion, rustls::SupportedCipherSuite) {
        match self {
            Kernel::Client(k) => (k.protocol_version(), k.negotiated_cipher_suite()),
            Kernel::Server(k) => (k.protocol_version(), k.negotiated_cipher_suite()),
        }
    }

    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn new_session_ticket(&mut self, payload: &[u8]) -> Result<(), RecordError> {
        match self {
            Kernel::Client(k) => k
                .handle_new_session_ticket(payload)
                .map_err(RecordError::Rustls),
            Kernel::Server(_) => Err(RecordError::Unexpected(
                "a client sent a session ticket".into(),
            )),
        }
    }
}

/// What the two directions of one connection share: rustls's key schedule, and whether the
/// peer asked this end to update its sending keys.
pub(crate) struct Shared {
    kernel: Mutex<Kernel>,
    update_requested: AtomicBool,
}

impl Shared {
    pub(crate) fn new(kernel: Kernel) -> Arc<Shared> {
        Arc::new(Shared {
            kernel: Mutex::new(kernel),
            update_requested: AtomicBool::new(false),
        })
    }

    fn kernel(&self) -> std::sync::MutexGuard<'_, Kernel> {
        // The key schedule is only replaced whole, so a holder that panicked left it usable.
        self.kernel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One direction's keys: the AEAD key, the IV and the next record's sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Keys {
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the secrets are used up: dropped (rustls zeroes them) once the key is made"
    )]
    fn new(secrets: ConnectionTrafficSecrets, seq: u64) -> Result<Keys, RecordError> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            #[allow(unreachable_patterns)]
            _ => {
                return Err(RecordError::Unexpected(
                    "the negotiated cipher suite has no record layer here".into(),
                ));
            }
        };
        let key = UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| RecordError::Unexpected("a traffic key of the wrong length".into()))?;
        let iv = <[u8; aead::NONCE_LEN]>::try_from(iv.as_ref())
            .map_err(|_| RecordError::Unexpected("a traffic IV of the wrong length".into()))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3), taking its sequence number.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *byte ^= seq;
        }
        // A sequence number never wraps (RFC 8446 §5.3): the keys are updated long before.
        self.seq = self.seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// Reads `len` bytes at a time from a list of buffers, in order.
#[derive(Debug)]
pub(crate) struct Cursor<'a, 'b> {
    bufs: &'a [&'b [u8]],
    /// The buffer being read and the offset in it.
    at: (usize, usize),
    left: usize,
}

impl<'a, 'b> Cursor<'a, 'b> {
    pub(crate) fn new(bufs: &'a [&'b [u8]]) -> Self {
        Cursor {
            bufs,
            at: (0, 0),
            left: bufs.iter().map(|b| b.len()).sum(),
        }
    }

    /// Bytes not yet read.
    pub(crate) fn left(&self) -> usize {
        self.left
    }

    /// Appends the next `len` bytes (at most what is left) to `out`.
    fn take_into(&mut self, mut len: usize, out: &mut Vec<u8>) {
        len = len.min(self.left);
        self.left -= len;
        while len > 0 {
            let (index, offset) = self.at;
            let Some(buf) = self.bufs.get(index) else {
                return;
            };
            let n = (buf.len() - offset).min(len);
            out.extend_from_slice(&buf[offset..offset + n]);
            len -= n;
            self.at = if offset + n == buf.len() {
                (index + 1, 0)
            } else {
                (index, offset + n)
            };
        }
    }
}

/// The sealing direction of a connection.
pub(crate) struct Sealer {
    keys: Keys,
    /// The sequence number at which the keys are updated.
    update_at: u64,
    /// Records per key before an update (the suite's confidentiality limit, or less).
    per_key: u64,
    shared: Arc<Shared>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("seq", &self.keys.seq)
            .field("update_at", &self.update_at)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Seals with `secrets` from sequence number `seq` on, updating the keys every `per_key`
    /// records.
    pub(crate) fn new(
        secrets: ConnectionTrafficSecrets,
        seq: u64,
        per_key: u64,
        shared: Arc<Shared>,
    ) -> Result<Sealer, RecordError> {
        let per_key = per_key.max(1);
        Ok(Sealer {
            keys: Keys::new(secrets, seq)?,
            update_at: seq.saturating_add(per_key),
            per_key,
            shared,
        })
    }

    /// Appends to `out` the next records of application data from `from`, at most
    /// `max_content` bytes of it (in full fragments but for the last), and a key update first
    /// if one is due. `out` grows only past its capacity: a caller that reserves
    /// `max_content / MAX_FRAGMENT + 2` times [`MAX_SEALED`] never has it allocate.
    pub(crate) fn seal(
        &mut self,
        from: &mut Cursor<'_, '_>,
        max_content: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let mut budget = max_content.min(from.left());
        while budget > 0 {
            if self.keys.seq >= self.update_at
                || self.shared.update_requested.swap(false, Ordering::AcqRel)
            {
                self.update_keys(out)?;
            }
            let len = budget.min(MAX_FRAGMENT);
            let start = self.begin(out);
            from.take_into(len, out);
            self.end(start, APPLICATION_DATA, out)?;
            budget -= len;
        }
        Ok(())
    }

    /// Seals one record of `content` of type `kind`.
    fn seal_one(&mut self, kind: u8, content: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let start = self.begin(out);
        out.extend_from_slice(content);
        self.end(start, kind, out)
    }

    /// Starts a record: its header, the length filled in by [`Sealer::end`].
    fn begin(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[APPLICATION_DATA, 0x03, 0x03, 0, 0]);
        start
    }

    /// Ends the record begun at `start`: appends its inner type, seals the content in place
    /// and appends the tag.
    fn end(&mut self, start: usize, kind: u8, out: &mut Vec<u8>) -> Result<(), RecordError> {
        out.push(kind);
        let sealed = out.len() - start - HEADER + TAG;
        let len = u16::try_from(sealed).map_err(|_| RecordError::Exhausted)?;
        out[start + 3..start + HEADER].copy_from_slice(&len.to_be_bytes());
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&out[start..start + HEADER]);
        let nonce = self.keys.next_nonce()?;
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| RecordError::Unexpected("sealing a record failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Sends a `KeyUpdate` (not asking the peer to update: it updates when it needs to) under
    /// the old keys and takes the next ones (RFC 8446 §4.6.3).
    fn update_keys(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_one(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
        let (seq, secrets) = self
            .shared
            .kernel()
            .update_tx()
            .map_err(RecordError::Rustls)?;
        self.keys = Keys::new(secrets, seq)?;
        self.update_at = seq.saturating_add(self.per_key);
        Ok(())
    }
}

/// How [`Opener::read`] gets more ciphertext: fills the start of the buffer it is given with at
/// least one byte (ideally `at_least`, and as many more as are already there), returning how
/// many; 0 at the end of the stream.
pub(crate) type Fill<'a> = dyn FnMut(&mut [u8], usize) -> io::Result<usize> + 'a;

/// The opening direction of a connection, with the ciphertext it has read ahead and the
/// plaintext of the last record opened, not yet read.
pub(crate) struct Opener {
    keys: Keys,
    shared: Arc<Shared>,
    /// Ciphertext read ahead, at `buf[start..end]`; opened records are decrypted in place.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The opened plaintext not yet handed out: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    /// Set once the connection failed or closed: every later read says so again.
    ended: Option<RecordError>,
    /// The peer sent `close_notify`.
    closed: bool,
    /// Plaintext rustls opened during the handshake, handed out first: `early[early_at..]`.
    early: Vec<u8>,
    early_at: usize,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("seq", &self.keys.seq)
            .field("buffered", &(self.end - self.start))
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Opens with `secrets` from sequence number `seq` on, reading ahead into a buffer of
    /// `capacity` bytes (at least one record's worth) that starts with `early`: ciphertext read
    /// during the handshake that is past its end.
    pub(crate) fn new(
        secrets: ConnectionTrafficSecrets,
        seq: u64,
        shared: Arc<Shared>,
        capacity: usize,
        early: &[u8],
    ) -> Result<Opener, RecordError> {
        let capacity = capacity.max(MAX_RECORD).max(early.len());
        let mut buf = vec![0u8; capacity].into_boxed_slice();
        buf[..early.len()].copy_from_slice(early);
        Ok(Opener {
            keys: Keys::new(secrets, seq)?,
            shared,
            buf,
            start: 0,
            end: early.len(),
            plain: (0, 0),
            ended: None,
            closed: false,
            early: Vec::new(),
            early_at: 0,
        })
    }

    /// Puts plaintext that rustls opened during the handshake before everything else.
    pub(crate) fn preload(&mut self, plaintext: &[u8]) {
        self.early.extend_from_slice(plaintext);
    }

    /// Copies opened plaintext into `out`, opening the next records (reading them with `fill`)
    /// when none is left; returns how many bytes, 0 only for an empty `out` or at the end of
    /// the stream (`close_notify`, or the peer closing between records).
    pub(crate) fn read(&mut self, out: &mut [u8], fill: &mut Fill<'_>) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.early_at < self.early.len() {
            let n = out.len().min(self.early.len() - self.early_at);
            out[..n].copy_from_slice(&self.early[self.early_at..self.early_at + n]);
            self.early_at += n;
            return Ok(n);
        }
        while self.plain.0 == self.plain.1 {
            if let Some(err) = &self.ended {
                return Err(err.clone().into());
            }
            if self.closed {
                return Ok(0);
            }
            match self.open_next(fill) {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    let io = e.into_io();
                    return Err(io);
                }
            }
        }
        let (from, to) = self.plain;
        let n = out.len().min(to - from);
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        self.plain.0 += n;
        Ok(n)
    }

    /// Reads and opens the next record; false at a clean end of the stream.
    fn open_next(&mut self, fill: &mut Fill<'_>) -> Result<bool, Failure> {
        if !self.buffer(HEADER, fill)? {
            return Ok(false);
        }
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[0] != APPLICATION_DATA
            || header[1..3] != [0x03, 0x03]
            || !(TAG + 1..=MAX_CIPHERTEXT).contains(&len)
        {
            return Err(self.fail(RecordError::BadHeader { header }));
        }
        if !self.buffer(HEADER + len, fill)? {
            return Err(self.fail(RecordError::Truncated));
        }
        let body = self.start + HEADER..self.start + HEADER + len;
        self.start = body.end;
        let nonce = self.keys.next_nonce().map_err(|e| self.fail(e))?;
        let opened =
            self.keys
                .key
                .open_in_place(nonce, Aad::from(header), &mut self.buf[body.clone()]);
        let Ok(inner) = opened else {
            return Err(self.fail(RecordError::BadRecordMac));
        };
        // The inner type is the last byte that is not zero padding.
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(self.fail(RecordError::Unexpected(
                "a record with no content type".into(),
            )));
        };
        let kind = inner[type_at];
        let content = body.start..body.start + type_at;
        match kind {
            APPLICATION_DATA => self.plain = (content.start, content.end),
            HANDSHAKE => self.handshake(content).map_err(|e| self.fail(e))?,
            ALERT => {
                let alert = &self.buf[content];
                return match alert {
                    [_, CLOSE_NOTIFY] => {
                        self.closed = true;
                        Ok(false)
                    }
                    [_, code] => Err(self.fail(RecordError::Alert(*code))),
                    _ => Err(self.fail(RecordError::Unexpected("a malformed alert".into()))),
                };
            }
            other => {
                return Err(self.fail(RecordError::Unexpected(format!(
                    "a record of content type {other} after the handshake"
                ))));
            }
        }
        Ok(true)
    }

    /// Handles the post-handshake messages of one record: key updates and session tickets.
    /// Each must be whole in its record (rustls never splits them).
    fn handshake(&mut self, content: std::ops::Range<usize>) -> Result<(), RecordError> {
        let mut rest = content;
        while !rest.is_empty() {
            let bytes = &self.buf[rest.clone()];
            let [kind, a, b, c, ..] = *bytes else {
                return Err(RecordError::Unexpected("a split handshake message".into()));
            };
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if bytes.len() < 4 + len {
                return Err(RecordError::Unexpected("a split handshake message".into()));
            }
            let body = rest.start + 4..rest.start + 4 + len;
            match (kind, &self.buf[body.clone()]) {
                (KEY_UPDATE, [requested @ (0 | 1)]) => {
                    if *requested == 1 {
                        self.shared.update_requested.store(true, Ordering::Release);
                    }
                    // The rest of the record is under the old keys: RFC 8446 §5.1 has a key
                    // change end its record, so anything after it is an error.
                    if body.end != rest.end {
                        return Err(RecordError::Unexpected(
                            "data after a key update in its record".into(),
                        ));
                    }
                    let (seq, secrets) = self
                        .shared
                        .kernel()
                        .update_rx()
                        .map_err(RecordError::Rustls)?;
                    self.keys = Keys::new(secrets, seq)?;
                }
                (KEY_UPDATE, _) => {
                    return Err(RecordError::Unexpected("a malformed key update".into()));
                }
                (NEW_SESSION_TICKET, payload) => {
                    let payload = payload.to_vec();
                    self.shared.kernel().new_session_ticket(&payload)?;
                }
                (other, _) => {
                    return Err(RecordError::Unexpected(format!(
                        "handshake message {other} after the handshake"
                    )));
                }
            }
            rest.start = body.end;
        }
        Ok(())
    }

    /// Makes sure `want` bytes of ciphertext are buffered from `start`, reading with `fill`;
    /// false if the stream ended first with nothing of them buffered.
    fn buffer(&mut self, want: usize, fill: &mut Fill<'_>) -> Result<bool, Failure> {
        while self.end - self.start < want {
            if self.buf.len() - self.start < want {
                // Move the partial record to the front (nothing before it is needed: the
                // plaintext before `start` was read).
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let missing = want - (self.end - self.start);
            let n = match fill(&mut self.buf[self.end..], missing) {
                Ok(n) => n,
                Err(e) => return Err(Failure::Io(e)),
            };
            if n == 0 {
                if self.end == self.start {
                    return Ok(false);
                }
                return Err(self.fail(RecordError::Truncated));
            }
            self.end += n;
        }
        Ok(true)
    }

    /// Records `err` as the end of the connection.
    fn fail(&mut self, err: RecordError) -> Failure {
        self.ended = Some(err.clone());
        Failure::Record(err)
    }
}

/// Why opening a record stopped: the record layer ended the connection, or reading more
/// ciphertext failed (a timeout, say: the caller may try again).
enum Failure {
    Record(RecordError),
    Io(io::Error),
}

impl Failure {
    fn into_io(self) -> io::Error {
        match self {
            Failure::Record(e) => e.into(),
            Failure::Io(e) => e,
        }
    }
}
