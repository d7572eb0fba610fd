//! `ramjet stress --tls`: the pass's throwaway credentials, made once in a scratch directory
//! (which the pass removes when it ends) and loaded once: the receiver's and the sender's, in
//! QEMU's layout, and those of two intruders the receiver must refuse.

use std::path::Path;

use ramjet_dataplane::testkit::pki::{self, Authority, Leaf, SENDER_SUBJECT};
use ramjet_dataplane::{TlsClient, TlsServer};

use super::plan::{Net, Stray};

/// The TLS ends of every run of a pass.
pub(super) struct Credentials {
    /// The receiver: it admits only [`SENDER_SUBJECT`] (`tls-authz`).
    server: TlsServer,
    /// The sender, and the same with the name a Unix socket needs.
    client: TlsClient,
    client_unix: TlsClient,
    /// A sender whose certificate another CA signed (its subject is the real sender's).
    untrusted: TlsClient,
    /// A sender whose certificate the receiver's CA signed, for a subject not on the
    /// allow-list.
    unlisted: TlsClient,
}

impl Credentials {
    /// Writes a pass's credentials into `dir` and loads them: once loaded, they need the
    /// files no more.
    pub(super) fn new(dir: &Path) -> anyhow::Result<Credentials> {
        let ca = pki::credentials(dir)?;
        // The intruders trust the receiver (so that they get as far as presenting their
        // certificate): they keep the real CA's certificate.
        let untrusted = dir.join("untrusted");
        ca.write_ca(&untrusted)?;
        Authority::new("ramjet intruder CA")?
            .write_leaf(&untrusted, &Leaf::sender("ramjet-sender"))?;
        let unlisted = dir.join("unlisted");
        ca.write_ca(&unlisted)?;
        ca.write_leaf(&unlisted, &Leaf::sender("ramjet-intruder"))?;
        let server = TlsServer::from_dir(dir)?.allow_subjects([SENDER_SUBJECT])?;
        let client = TlsClient::from_dir(dir)?;
        Ok(Credentials {
            server,
            client_unix: client.clone().with_hostname(pki::RECEIVER_NAME)?,
            client,
            untrusted: TlsClient::from_dir(&untrusted)?.with_hostname(pki::RECEIVER_NAME)?,
            unlisted: TlsClient::from_dir(&unlisted)?.with_hostname(pki::RECEIVER_NAME)?,
        })
    }

    /// The receiver's TLS.
    pub(super) fn server(&self) -> TlsServer {
        self.server.clone()
    }

    /// The sender's TLS over `net`: over TCP the receiver's certificate must name 127.0.0.1,
    /// over a Unix socket `localhost`.
    pub(super) fn client(&self, net: Net) -> TlsClient {
        match net {
            Net::Tcp => self.client.clone(),
            Net::Unix => self.client_unix.clone(),
        }
    }

    /// An intruder's TLS, for the strays that are TLS peers.
    pub(super) fn intruder(&self, kind: Stray) -> Option<TlsClient> {
        match kind {
            Stray::Untrusted => Some(self.untrusted.clone()),
            Stray::Unlisted => Some(self.unlisted.clone()),
            Stray::Close | Stray::Garbage | Stray::Http | Stray::Layout => None,
        }
    }
}
