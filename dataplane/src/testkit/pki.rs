//! Throwaway x509 credentials in QEMU's `tls-creds-x509` layout, for `ramjet demo --tls`, the
//! tests and the stress tool: a CA, a receiver (server) certificate and a sender (client)
//! certificate, written as the five files [`TlsClient::from_dir`] and [`TlsServer::from_dir`]
//! read. Not for production: the keys are made on the spot and written unencrypted.
//!
//! [`TlsClient::from_dir`]: crate::TlsClient::from_dir
//! [`TlsServer::from_dir`]: crate::TlsServer::from_dir

use std::fs;
use std::io;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use rcgen::date_time_ymd;

/// The subject [`credentials`] gives the sender's certificate, as `tls-authz` names it.
pub const SENDER_SUBJECT: &str = "O=ramjet,CN=ramjet-sender";
/// The name [`credentials`] gives the receiver's certificate, besides `127.0.0.1` and `::1`.
pub const RECEIVER_NAME: &str = "localhost";

fn other(e: rcgen::Error) -> io::Error {
    io::Error::other(e)
}

/// A certificate authority that signs the certificates it issues.
#[derive(Debug)]
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a certificate is for, and for how long.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Its subject's common name.
    pub common_name: String,
    /// Its subject's organisation, if any (comes before the common name in the subject).
    pub organization: Option<String>,
    /// The DNS names and IP addresses it is valid for (a receiver's).
    pub names: Vec<String>,
    /// Valid from (year, month, day).
    pub not_before: (i32, u8, u8),
    /// Valid until (year, month, day).
    pub not_after: (i32, u8, u8),
    /// A sender's (client authentication) or a receiver's (server authentication).
    pub client: bool,
}

impl Leaf {
    /// A receiver's certificate for `names`, valid from 2020 to 2100.
    pub fn receiver(names: &[&str]) -> Leaf {
        Leaf {
            common_name: names.first().copied().unwrap_or(RECEIVER_NAME).to_owned(),
            organization: Some("ramjet".into()),
            names: names.iter().map(|&n| n.to_owned()).collect(),
            not_before: (2020, 1, 1),
            not_after: (2100, 1, 1),
            client: false,
        }
    }

    /// A sender's certificate with subject `O=ramjet,CN=<common_name>`, valid from 2020 to
    /// 2100.
    pub fn sender(common_name: &str) -> Leaf {
        Leaf {
            common_name: common_name.to_owned(),
            organization: Some("ramjet".into()),
            names: Vec::new(),
            not_before: (2020, 1, 1),
            not_after: (2100, 1, 1),
            client: true,
        }
    }
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> io::Result<Authority> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ramjet");
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().map_err(other)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(other)?;
        Ok(Authority { issuer })
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a certificate for `leaf`: its certificate and its private key, PEM.
    pub fn issue(&self, leaf: &Leaf) -> io::Result<(String, String)> {
        let mut params = CertificateParams::new(leaf.names.clone()).map_err(other)?;
        let mut dn = DistinguishedName::new();
        if let Some(org) = &leaf.organization {
            dn.push(DnType::OrganizationName, org.as_str());
        }
        dn.push(DnType::CommonName, leaf.common_name.as_str());
        params.distinguished_name = dn;
        let (y, m, d) = leaf.not_before;
        params.not_before = date_time_ymd(y, m, d);
        let (y, m, d) = leaf.not_after;
        params.not_after = date_time_ymd(y, m, d);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if leaf.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().map_err(other)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(other)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `ca-cert.pem` into `dir`.
    pub fn write_ca(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("ca-cert.pem"), self.cert_pem())
    }

    /// Issues `leaf` and writes it into `dir` under QEMU's names: `client-cert.pem` and
    /// `client-key.pem` for a sender's, `server-cert.pem` and `server-key.pem` for a
    /// receiver's.
    pub fn write_leaf(&self, dir: &Path, leaf: &Leaf) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let (cert, key) = self.issue(leaf)?;
        let end = if leaf.client { "client" } else { "server" };
        fs::write(dir.join(format!("{end}-cert.pem")), cert)?;
        write_private(&dir.join(format!("{end}-key.pem")), &key)
    }
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(pem.as_bytes())
}

/// Writes a complete credentials directory into `dir`, as libvirt keeps one for QEMU: a new CA
/// (`ca-cert.pem`), a receiver certificate for `localhost`, `127.0.0.1` and `::1`
/// (`server-cert.pem`, `server-key.pem`) and a sender certificate with subject
/// [`SENDER_SUBJECT`] (`client-cert.pem`, `client-key.pem`). Returns the CA.
pub fn credentials(dir: &Path) -> io::Result<Authority> {
    // A name of its own: two throwaway CAs are two CAs, not one with two keys.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let ca = Authority::new(&format!("ramjet throwaway CA {nonce:x}"))?;
    ca.write_ca(dir)?;
    ca.write_leaf(dir, &Leaf::receiver(&[RECEIVER_NAME, "127.0.0.1", "::1"]))?;
    ca.write_leaf(dir, &Leaf::sender("ramjet-sender"))?;
    Ok(ca)
}

/// A directory of its own under the system's temporary directory, removed (with what is in
/// it) when dropped: where throwaway credentials go.
#[derive(Debug)]
pub struct Scratch {
    path: std::path::PathBuf,
}

impl Scratch {
    /// A new empty directory whose name starts with `label`.
    pub fn new(label: &str) -> io::Result<Scratch> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(Scratch { path })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
