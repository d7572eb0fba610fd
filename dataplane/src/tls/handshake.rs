//! The TLS handshake of one connection, both ends: rustls's unbuffered API driven over a
//! blocking socket, bounded by a deadline and a stop, then turned into the record layer's two
//! halves ([`Session`]).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{CertificateError, ProtocolVersion};

use super::record::{self, Kernel, Opener, Sealer, Shared};
use super::{Negotiated, TlsClient, TlsServer};
use crate::transport::{ReadStop, STEP, Stream, read_stepped};
use crate::wire::{HelloReply, MAGIC};

/// The most handshake bytes buffered at once: a certificate chain and more.
const MAX_HANDSHAKE: usize = 256 << 10;
/// The read-ahead of a receiver's record layer, which reads the guest's pages: large reads,
/// each woken once for many records.
const READ_AHEAD: usize = 512 << 10;
/// The read-ahead of a sender's record layer, which reads only the receiver's short replies.
const REPLY_READ_AHEAD: usize = 64 << 10;

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The peer closed the connection after `bytes` bytes.
    Closed {
        /// How much it sent.
        bytes: usize,
    },
    /// The deadline passed; the peer had sent `bytes` bytes.
    Stalled {
        /// How much it sent.
        bytes: usize,
    },
    /// The caller's stop said to give up.
    Stopped,
    /// The socket failed.
    Io(io::Error),
    /// The peer does not speak TLS: it answered with ramjet's plaintext protocol (`refusal`:
    /// the reason it gave, if it refused), or with something else.
    NotTls {
        /// It speaks plaintext ramjet.
        ramjet: bool,
        /// A plaintext ramjet peer's refusal, if it sent one whole.
        refusal: Option<String>,
    },
    /// rustls failed the handshake (a certificate, an alert from the peer, ...).
    Tls(rustls::Error),
    /// The handshake finished on terms the record layer cannot take (TLS 1.2, say).
    Unusable(String),
}

impl HandshakeError {
    /// Why a stepped read of the handshake read nothing, after `bytes` bytes of it.
    fn from_stop(stop: ReadStop, bytes: usize) -> Self {
        match stop {
            ReadStop::Closed => Self::Closed { bytes },
            ReadStop::Stalled => Self::Stalled { bytes },
            ReadStop::Stopped => Self::Stopped,
            ReadStop::Io(e) => Self::Io(e),
        }
    }

    /// Why, in words, with `peer` naming the other end ("the receiver", "it").
    pub(crate) fn reason(&self, peer: &str, limit: Duration) -> String {
        match self {
            HandshakeError::Closed { bytes: 0 } => {
                format!("{peer} closed the connection during the TLS handshake")
            }
            HandshakeError::Closed { bytes } => {
                format!(
                    "{peer} closed the connection during the TLS handshake, after {bytes} bytes"
                )
            }
            HandshakeError::Stalled { bytes } => {
                format!("{peer} did not finish the TLS handshake within {limit:?} ({bytes} bytes)")
            }
            HandshakeError::Stopped => "the TLS handshake was stopped".into(),
            HandshakeError::Io(e) => format!("the connection failed during the TLS handshake: {e}"),
            HandshakeError::NotTls {
                ramjet: true,
                refusal,
            } => {
                let mut why = format!("{peer} speaks plaintext ramjet: TLS is on at this end only");
                if let Some(refusal) = refusal {
                    why.push_str(&format!(" (it refused: {refusal})"));
                }
                why
            }
            HandshakeError::NotTls { ramjet: false, .. } => format!("{peer} does not speak TLS"),
            HandshakeError::Tls(e) => tls_reason(peer, e),
            HandshakeError::Unusable(why) => why.clone(),
        }
    }
}

/// A rustls error in the words an operator needs.
fn tls_reason(peer: &str, e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(cert) => {
            let why = match cert {
                CertificateError::UnknownIssuer => {
                    "is not signed by the CA this end trusts (ca-cert.pem)".to_owned()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "is not valid yet".to_owned()
                }
                CertificateError::NotValidForName => "is not valid for the expected name".into(),
                CertificateError::NotValidForNameContext {
                    expected,
                    presented,
                } => format!(
                    "is not valid for {} (it names {})",
                    server_name(expected),
                    if presented.is_empty() {
                        "nothing".to_owned()
                    } else {
                        presented
                            .iter()
                            .map(|name| presented_name(name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
                CertificateError::Revoked => "has been revoked (ca-crl.pem)".into(),
                CertificateError::BadSignature => {
                    "has a bad signature (is it from another CA of the same name?)".into()
                }
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => {
                    "is not for this purpose (its extended key usage)".into()
                }
                other => format!("was refused: {other:?}"),
            };
            format!("TLS: {peer}'s certificate {why}")
        }
        E::NoCertificatesPresented => format!("TLS: {peer} presented no certificate"),
        E::AlertReceived(alert) => format!(
            "TLS: {peer} refused the handshake with alert {alert:?} (it does not accept this \
             end's certificate, or TLS 1.3)"
        ),
        other => format!("TLS: the handshake failed: {other}"),
    }
}

/// A name a certificate presents, as rustls words it (`DnsName("localhost")`,
/// `IpAddress(0::1)`), the way an operator writes it (`localhost`, `::1`).
fn presented_name(name: &str) -> String {
    let inner = name
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        });
    match inner {
        Some(inner) => inner
            .parse::<std::net::IpAddr>()
            .map_or_else(|_| inner.to_owned(), |ip| ip.to_string()),
        None => name.to_owned(),
    }
}

fn server_name(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// A connection's record layer after its handshake: the two halves, a buffer for the sealed
/// records of blocking writes, and what was negotiated.
pub(crate) struct Session {
    pub(crate) sealer: Sealer,
    pub(crate) opener: Opener,
    /// Sealed records of a blocking write, reused.
    pub(crate) out: Vec<u8>,
    pub(crate) negotiated: Negotiated,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

/// What a handshake buffers.
struct Buffers {
    incoming: Vec<u8>,
    used: usize,
    outgoing: Vec<u8>,
    out_used: usize,
    /// Every byte the peer sent, for the error of a peer that does not speak TLS.
    received: usize,
    /// Plaintext application data rustls opened before the handshake ended (the peer's first
    /// words, right behind its last handshake message).
    early: Vec<u8>,
}

impl Buffers {
    fn new() -> Self {
        Buffers {
            incoming: vec![0; 16 << 10],
            used: 0,
            outgoing: vec![0; 16 << 10],
            out_used: 0,
            received: 0,
            early: Vec::new(),
        }
    }

    fn discard(&mut self, n: usize) {
        self.incoming.copy_within(n..self.used, 0);
        self.used -= n;
    }
}

/// One connection type's handshake steps (client and server differ only in type).
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
}

/// What one step of the handshake left to do, once rustls's state is released.
enum Step {
    /// Bytes were encoded or opened: process again.
    Again,
    /// Send what is encoded, then process again.
    Transmit,
    /// Send what is encoded, then read (or finish, if the handshake is over).
    Wait,
    /// The handshake failed (rustls may have queued an alert).
    Failed(rustls::Error),
    /// It ended otherwise.
    Ended(HandshakeError),
}

/// Drives `conn` through its handshake over `stream`, until `deadline` or `stopped`. Returns
/// once the handshake is complete with nothing left to send; a partial record read past it is
/// left in `bufs.incoming`, and application data rustls opened on the way in `bufs.early`.
fn drive<C: Unbuffered>(
    conn: &mut C,
    stream: &mut Stream,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
    bufs: &mut Buffers,
) -> Result<(), HandshakeError> {
    loop {
        let status = conn.process(&mut bufs.incoming[..bufs.used]);
        let discard = status.discard;
        let step = match status.state {
            Err(e) => Step::Failed(e),
            Ok(ConnectionState::EncodeTlsData(mut encode)) => loop {
                match encode.encode(&mut bufs.outgoing[bufs.out_used..]) {
                    Ok(n) => {
                        bufs.out_used += n;
                        break Step::Again;
                    }
                    Err(EncodeError::InsufficientSize(size)) => {
                        let len = bufs.out_used + size.required_size;
                        bufs.outgoing.resize(len, 0);
                    }
                    Err(e) => break Step::Ended(HandshakeError::Unusable(format!("TLS: {e}"))),
                }
            },
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                // Sent right below, before rustls is asked for anything else.
                transmit.done();
                Step::Transmit
            }
            Ok(ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_)) => Step::Wait,
            Ok(ConnectionState::ReadTraffic(mut read)) => {
                let mut step = Step::Again;
                while let Some(record) = read.next_record() {
                    match record {
                        Ok(record) if bufs.early.len() + record.payload.len() <= MAX_HANDSHAKE => {
                            bufs.early.extend_from_slice(record.payload);
                        }
                        Ok(_) => {
                            step = Step::Ended(HandshakeError::Unusable(
                                "TLS: the peer sent too much before the handshake ended".into(),
                            ));
                            break;
                        }
                        Err(e) => {
                            step = Step::Failed(e);
                            break;
                        }
                    }
                }
                step
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                Step::Ended(HandshakeError::Closed {
                    bytes: bufs.received,
                })
            }
            Ok(other) => Step::Ended(HandshakeError::Unusable(format!(
                "TLS: an unexpected state in the handshake: {other:?}"
            ))),
        };
        bufs.discard(discard);
        match step {
            Step::Again => {}
            Step::Transmit => write(stream, bufs, deadline)?,
            Step::Wait => {
                write(stream, bufs, deadline)?;
                // A server may write (0.5-RTT) before the client's last flight arrived: only
                // the end of the handshake is the end.
                if !conn.handshaking() {
                    return Ok(());
                }
                read(stream, bufs, deadline, stopped)?;
            }
            Step::Failed(e) => {
                send_alert(conn, stream, bufs);
                return Err(HandshakeError::Tls(e));
            }
            Step::Ended(e) => return Err(e),
        }
    }
}

/// Sends what the handshake queued (an alert after a failure, say), best effort.
fn send_alert<C: Unbuffered>(conn: &mut C, stream: &mut Stream, bufs: &mut Buffers) {
    // rustls must be given the same buffer as before (less what it said to discard): its
    // deframer remembers where in it a partial message lies.
    for _ in 0..8 {
        let UnbufferedStatus { state, discard } = conn.process(&mut bufs.incoming[..bufs.used]);
        let more = match state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                if let Ok(n) = encode.encode(&mut bufs.outgoing[bufs.out_used..]) {
                    bufs.out_used += n;
                }
                true
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                true
            }
            _ => false,
        };
        bufs.discard(discard);
        if !more {
            break;
        }
    }
    if bufs.out_used > 0 {
        let _ = stream.set_write_timeout(Some(STEP));
        let _ = stream.write_all(&bufs.outgoing[..bufs.out_used]);
        bufs.out_used = 0;
    }
}

fn write(stream: &mut Stream, bufs: &mut Buffers, deadline: Instant) -> Result<(), HandshakeError> {
    if bufs.out_used == 0 {
        return Ok(());
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HandshakeError::Stalled {
            bytes: bufs.received,
        });
    }
    stream
        .set_write_timeout(Some(left))
        .and_then(|()| stream.write_all(&bufs.outgoing[..bufs.out_used]))
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HandshakeError::Stalled {
                bytes: bufs.received,
            },
            _ => HandshakeError::Io(e),
        })?;
    bufs.out_used = 0;
    Ok(())
}

fn read(
    stream: &mut Stream,
    bufs: &mut Buffers,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(), HandshakeError> {
    if bufs.used == bufs.incoming.len() {
        if bufs.incoming.len() >= MAX_HANDSHAKE {
            return Err(HandshakeError::Unusable(
                "TLS: a handshake message larger than 256 KiB".into(),
            ));
        }
        let len = bufs.incoming.len() * 2;
        bufs.incoming.resize(len, 0);
    }
    let read = read_stepped(deadline, stopped, |step| {
        stream.set_read_timeout(Some(step))?;
        stream.read(&mut bufs.incoming[bufs.used..])
    });
    let n = match read {
        Ok(n) => n,
        Err(ReadStop::Closed) if bufs.received > 0 && !looks_like_tls(bufs) => {
            return Err(not_tls(bufs));
        }
        Err(stop) => return Err(HandshakeError::from_stop(stop, bufs.received)),
    };
    let first = bufs.received == 0;
    bufs.used += n;
    bufs.received += n;
    if first && !looks_like_tls(bufs) {
        // Give a plaintext ramjet peer a moment to finish its refusal, so its reason can be
        // shown.
        let wait = Instant::now() + STEP * 4;
        while bufs.used < bufs.incoming.len() && Instant::now() < wait {
            let _ = stream.set_read_timeout(Some(STEP));
            match stream.read(&mut bufs.incoming[bufs.used..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => bufs.used += n,
            }
            if refusal(bufs).is_some() {
                break;
            }
        }
        return Err(not_tls(bufs));
    }
    Ok(())
}

/// Whether the peer's first byte opens a TLS record: a handshake message or an alert.
fn looks_like_tls(bufs: &Buffers) -> bool {
    matches!(bufs.incoming.first(), Some(0x16 | 0x15)) || bufs.used == 0
}

fn not_tls(bufs: &Buffers) -> HandshakeError {
    let got = &bufs.incoming[..bufs.used];
    let n = got.len().min(MAGIC.len());
    HandshakeError::NotTls {
        ramjet: n > 0 && got[..n] == MAGIC[..n],
        refusal: refusal(bufs),
    }
}

/// A plaintext ramjet refusal, if one is buffered whole.
fn refusal(bufs: &Buffers) -> Option<String> {
    let got = &bufs.incoming[..bufs.used];
    let fixed: &[u8; HelloReply::FIXED_LEN] = got.get(..HelloReply::FIXED_LEN)?.try_into().ok()?;
    let len = HelloReply::reason_len(fixed).ok()?;
    let reason = got.get(HelloReply::FIXED_LEN..HelloReply::FIXED_LEN + len)?;
    match HelloReply::decode(fixed, reason).ok()?.verdict {
        crate::wire::Verdict::Refuse(reason) => Some(reason),
        crate::wire::Verdict::Accept
        | crate::wire::Verdict::Shared
        | crate::wire::Verdict::Copying(_) => None,
    }
}

/// Checks what was negotiated and builds the session's record layer.
fn session(
    secrets: rustls::ExtractedSecrets,
    (kernel, key_exchange): (Kernel, String),
    bufs: &Buffers,
    peer: Option<super::creds::Subject>,
    per_key: Option<u64>,
    read_ahead: usize,
) -> Result<Session, HandshakeError> {
    let (version, suite) = kernel.negotiated();
    if version != ProtocolVersion::TLSv1_3 {
        return Err(HandshakeError::Unusable(format!(
            "TLS: {version:?} was negotiated; ramjet's channels need TLS 1.3"
        )));
    }
    let limit = suite
        .tls13()
        .map_or(1 << 24, |s| s.common.confidentiality_limit);
    // Update well before the limit: rustls itself does at 2^24 - 2^16 for AES-GCM.
    let per_key = per_key
        .unwrap_or(limit.saturating_sub(limit / 256))
        .min(limit);
    let shared = Shared::new(kernel);
    let unusable = |e: record::RecordError| HandshakeError::Unusable(e.to_string());
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let sealer = Sealer::new(tx, tx_seq, per_key, Arc::clone(&shared)).map_err(unusable)?;
    let leftover = &bufs.incoming[..bufs.used];
    let mut opener = Opener::new(rx, rx_seq, shared, read_ahead, leftover).map_err(unusable)?;
    if !bufs.early.is_empty() {
        opener.preload(&bufs.early);
    }
    Ok(Session {
        sealer,
        opener,
        out: Vec::with_capacity(2 * record::MAX_SEALED),
        negotiated: Negotiated {
            suite: format!("{:?}", suite.suite()),
            key_exchange,
            peer_subject: peer.map(|s| s.to_string()),
        },
    })
}

/// The key exchange group's name, as TLS names it.
fn key_exchange(group: Option<&'static dyn rustls::crypto::SupportedKxGroup>) -> String {
    group.map_or_else(|| "no key exchange".into(), |g| format!("{:?}", g.name()))
}

/// The sender's end: a TLS client handshake on `stream` with `tls`, checking the receiver's
/// certificate against `name`, all within `timeout`.
pub(crate) fn connect(
    stream: &mut Stream,
    tls: &TlsClient,
    name: ServerName<'static>,
    timeout: Duration,
) -> Result<Session, HandshakeError> {
    let mut conn = UnbufferedClientConnection::new(Arc::clone(&tls.config), name)
        .map_err(HandshakeError::Tls)?;
    let mut bufs = Buffers::new();
    drive(
        &mut conn,
        stream,
        Instant::now() + timeout,
        &|| false,
        &mut bufs,
    )?;
    let key_exchange = key_exchange(conn.negotiated_key_exchange_group());
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(HandshakeError::Tls)?;
    session(
        secrets,
        (Kernel::Client(kernel), key_exchange),
        &bufs,
        None,
        tls.per_key,
        REPLY_READ_AHEAD,
    )
}

/// Why a sender's certificate is not admitted, once its handshake succeeded.
#[derive(Debug)]
pub(crate) struct NotAllowed {
    /// Its subject as a `tls-authz` entry would name it.
    pub(crate) subject: String,
}

/// The receiver's end: a TLS server handshake on `stream` with `tls` until `deadline` or
/// `stopped`, then the sender's subject checked against the allow-list. A sender that is not
/// on the list still gets its session, to be told why it is refused.
pub(crate) fn accept(
    stream: &mut Stream,
    tls: &TlsServer,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(Session, Option<NotAllowed>), HandshakeError> {
    let mut conn =
        UnbufferedServerConnection::new(Arc::clone(&tls.config)).map_err(HandshakeError::Tls)?;
    let mut bufs = Buffers::new();
    drive(&mut conn, stream, deadline, stopped, &mut bufs)?;
    let subject = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| super::creds::Subject::of(cert.as_ref()));
    let subject = match subject {
        Some(Ok(subject)) => Some(subject),
        Some(Err(why)) => return Err(HandshakeError::Unusable(why)),
        None => None,
    };
    let refused = match (&tls.authz, &subject) {
        (None, _) => None,
        (Some(allowed), Some(subject)) if allowed.iter().any(|a| a.names(subject)) => None,
        (Some(_), subject) => Some(NotAllowed {
            subject: subject
                .as_ref()
                .map_or_else(|| "(no certificate)".to_owned(), ToString::to_string),
        }),
    };
    let key_exchange = key_exchange(conn.negotiated_key_exchange_group());
    let (secrets, kernel) = conn
        .dangerous_into_kernel_connection()
        .map_err(HandshakeError::Tls)?;
    let session = session(
        secrets,
        (Kernel::Server(kernel), key_exchange),
        &bufs,
        subject,
        tls.per_key,
        READ_AHEAD,
    )?;
    Ok((session, refused))
}
