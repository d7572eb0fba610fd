//! TLS 1.3 on every channel, with mutual x509 authentication: the receiver proves itself to the
//! sender (its certificate names the host the sender dialled), the sender proves itself to the
//! receiver (a client certificate signed by the receiver's CA, whose subject may have to be on
//! an allow-list, QEMU's `tls-authz`).
//!
//! **Credentials** come as QEMU keeps them for its `tls-creds-x509` objects, so the PKI that
//! libvirt sets up for QEMU migration serves ramjet unchanged: a directory with `ca-cert.pem`
//! (and optionally `ca-crl.pem`) and, for the receiver, `server-cert.pem` and `server-key.pem`,
//! for the sender `client-cert.pem` and `client-key.pem`. One directory may hold all five (as
//! libvirt keeps `/etc/pki/qemu`), or each end its own. [`TlsClient::from_dir`] and
//! [`TlsServer::from_dir`] read them; [`TlsClient::from_config`] and [`TlsServer::from_config`]
//! take rustls configurations built any other way.
//!
//! **What is protected.** Every connection to a TLS receiver is a full TLS 1.3 handshake
//! before anything else: no hello is read, no guest memory touched and no decision taken from a
//! peer that has not proved itself (and is not on the allow-list, if there is one). That holds
//! for every channel, for a sender's later connection delivering its handover decision, and for
//! a newcomer the receiver turns away during a session. A peer refused at that point is a
//! *stray* (see `recv/accept.rs`): named in a log line, dropped, and the receiver waits on for
//! its real sender. A plaintext peer at a TLS end, or the reverse, fails with an error saying
//! that TLS is on at one end only.
//!
//! **How the bytes move.** rustls does the handshake; after it the channel's two directions
//! seal and open standard TLS 1.3 records themselves (`record.rs`), each on its own thread, with
//! the traffic secrets and key updates from rustls's kTLS API (`KernelConnection`): the same
//! split the kernel's TLS makes, so the step to kernel TLS, where a kernel has it, changes where
//! records are sealed, not the protocol. The sending direction gathers each batch of frames into
//! full 16 KiB records in one buffer of its own, seals them in place and sends the batch in one
//! write; the receiving direction reads ahead into a buffer of its own, opens each record in
//! place there and copies the plaintext out (into guest pages, say): nothing of a record reaches
//! guest memory before its tag has been checked. Neither allocates per record. A channel's frames
//! keep their crc32 under TLS: it covers the frames as ramjet built them, TLS the bytes on the
//! wire.
//!
//! **What TLS turns off.** No socket ever reads guest memory or the frame buffers directly:
//! zero-copy sends ([`ZeroCopy`](crate::ZeroCopy)) are off (asking for them with
//! `ZeroCopy::On` is an error), as in QEMU; the final round, which otherwise sends paused guest
//! memory in place, is sealed from it into the channel's buffer. [`Stats::zero_copy_bytes`]
//! shows 0.
//!
//! **Crypto provider**: aws-lc-rs, chosen by measurement. On this project's 2-core machines
//! (AES-NI, VAES, VPCLMULQDQ), one thread sealing 16 KiB records in cache: AES-256-GCM 14.3 GB/s
//! with aws-lc-rs against 8.4 with ring, opening 15.5 against 7.3; AES-128-GCM 18.0 and 16.3
//! against 9.2 and 9.6 (medians of 5). The record layer's cost is the cipher's, so that halves
//! it. aws-lc-rs builds with a C compiler alone (its `cc` build; no cmake), about 15 s more than
//! ring from scratch. The cipher suite is rustls's first choice both ends offer:
//! TLS13_AES_256_GCM_SHA384, then TLS13_AES_128_GCM_SHA256, then TLS13_CHACHA20_POLY1305_SHA256;
//! the key exchange is the post-quantum hybrid X25519MLKEM768 (guest memory recorded today must
//! not be readable by a quantum computer later), else X25519.
//!
//! [`Stats::zero_copy_bytes`]: crate::Stats::zero_copy_bytes

mod creds;
mod handshake;
mod link;
mod record;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};

pub(crate) use handshake::{HandshakeError, Session, accept, connect};
pub(crate) use link::{TlsReader, TlsWriter};
pub use record::RecordError;
pub(crate) use record::{Cursor, MAX_FRAGMENT, alert_name};

use creds::Subject;

/// Why TLS credentials or options cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A credentials file is missing, unreadable or not what it should be.
    #[error("{}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the configuration (a key that does not match its certificate, say).
    #[error("invalid TLS configuration: {0}")]
    Config(String),
    /// An allow-list entry is not a distinguished name.
    #[error("tls-authz subject {subject:?}: {problem}")]
    Subject {
        /// The entry.
        subject: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A TLS hostname is neither a DNS name nor an IP address.
    #[error("TLS hostname {name:?} is neither a DNS name nor an IP address")]
    Hostname {
        /// The name.
        name: String,
    },
}

/// A sender's TLS: its configuration and the name the receiver's certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    hostname: Option<ServerName<'static>>,
    per_key: Option<u64>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// From a directory in QEMU's `tls-creds-x509` layout: `ca-cert.pem` (the CA that signed
    /// the receiver's certificate; `ca-crl.pem` too, if present), `client-cert.pem` (this
    /// sender's certificate, with any intermediates) and `client-key.pem`. TLS 1.3 only.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<TlsClient, TlsError> {
        let config = creds::client_config(dir.as_ref())?;
        Ok(Self::from_config(Arc::new(config)))
    }

    /// From a rustls configuration built elsewhere. It must offer TLS 1.3 (a handshake that
    /// settles on anything else fails) and should authenticate with a client certificate;
    /// secret extraction, which the record layer needs, is turned on in a copy.
    pub fn from_config(config: Arc<ClientConfig>) -> TlsClient {
        let mut config = Arc::unwrap_or_clone(config);
        config.enable_secret_extraction = true;
        TlsClient {
            config: Arc::new(config),
            hostname: None,
            per_key: None,
        }
    }

    /// The name (DNS name or IP address) the receiver's certificate must be valid for. Without
    /// one, a TCP receiver's certificate must name its IP address; over a Unix socket a name
    /// is needed (QEMU's `tls-hostname`).
    pub fn with_hostname(mut self, name: &str) -> Result<TlsClient, TlsError> {
        let parsed = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::Hostname {
            name: name.to_owned(),
        })?;
        self.hostname = Some(parsed);
        Ok(self)
    }

    /// Updates the sending keys every `records` records instead of near the cipher's limit,
    /// to exercise key updates.
    #[cfg(feature = "internals")]
    pub fn update_keys_every(mut self, records: u64) -> TlsClient {
        self.per_key = Some(records);
        self
    }

    /// The name to check the receiver at `endpoint` against.
    pub(crate) fn server_name(
        &self,
        endpoint: &crate::Endpoint,
    ) -> Result<ServerName<'static>, crate::Error> {
        match (&self.hostname, endpoint) {
            (Some(name), _) => Ok(name.clone()),
            (None, crate::Endpoint::Tcp(addr)) => Ok(ServerName::IpAddress(addr.ip().into())),
            (None, crate::Endpoint::Unix(_)) => Err(crate::Error::Config(
                "TLS over a Unix socket needs the name the receiver's certificate is for \
                 (tls-hostname)"
                    .into(),
            )),
        }
    }
}

/// A receiver's TLS: its configuration and, optionally, the client certificate subjects it
/// admits.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    authz: Option<Vec<Subject>>,
    per_key: Option<u64>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("authz", &self.authz.as_ref().map(Vec::len))
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// From a directory in QEMU's `tls-creds-x509` layout: `ca-cert.pem` (the CA that signs
    /// the senders' client certificates; `ca-crl.pem` too, if present), `server-cert.pem`
    /// (this receiver's certificate, with any intermediates) and `server-key.pem`. Every
    /// sender must present a certificate that CA signed. TLS 1.3 only.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<TlsServer, TlsError> {
        let config = creds::server_config(dir.as_ref())?;
        Ok(Self::from_config(Arc::new(config)))
    }

    /// From a rustls configuration built elsewhere. It must offer TLS 1.3, and should require
    /// client certificates (a [`WebPkiClientVerifier`](rustls::server::WebPkiClientVerifier));
    /// secret extraction, which the record layer needs, is turned on in a copy.
    pub fn from_config(config: Arc<ServerConfig>) -> TlsServer {
        let mut config = Arc::unwrap_or_clone(config);
        config.enable_secret_extraction = true;
        TlsServer {
            config: Arc::new(config),
            authz: None,
            per_key: None,
        }
    }

    /// Admits only senders whose certificate subject is one of `subjects` (QEMU's `tls-authz`),
    /// each a distinguished name such as `CN=sender.example.com,O=Example`: attributes in
    /// certificate order as GnuTLS prints them, or in the reverse order of RFC 4514, separated
    /// by commas (a comma inside a value escaped as `\,`). Calling it again adds to the list.
    pub fn allow_subjects<I, S>(mut self, subjects: I) -> Result<TlsServer, TlsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let list = self.authz.get_or_insert_with(Vec::new);
        for subject in subjects {
            list.push(Subject::parse(subject.as_ref())?);
        }
        Ok(self)
    }

    /// Updates the sending keys every `records` records instead of near the cipher's limit,
    /// to exercise key updates.
    #[cfg(feature = "internals")]
    pub fn update_keys_every(mut self, records: u64) -> TlsServer {
        self.per_key = Some(records);
        self
    }
}

/// What a channel's TLS handshake settled, as a summary reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The cipher suite, e.g. `TLS13_AES_256_GCM_SHA384` (the protocol is always TLS 1.3).
    pub suite: String,
    /// The key exchange, e.g. `X25519MLKEM768`.
    pub key_exchange: String,
    /// On a receiver, the sender's certificate subject as `tls-authz` would name it.
    pub peer_subject: Option<String>,
}

impl fmt::Display for Negotiated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TLS 1.3, {} with {}, mutually authenticated",
            self.suite, self.key_exchange
        )?;
        if let Some(subject) = &self.peer_subject {
            write!(f, " (sender {subject})")?;
        }
        Ok(())
    }
}
