//! Credentials in QEMU's `tls-creds-x509` layout, turned into rustls configurations, and the
//! receiver's allow-list of client certificate subjects (QEMU's `tls-authz`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TlsError;

/// The files of a credentials directory, as QEMU names them.
pub(crate) const CA_CERT: &str = "ca-cert.pem";
pub(crate) const CA_CRL: &str = "ca-crl.pem";
pub(crate) const SERVER_CERT: &str = "server-cert.pem";
pub(crate) const SERVER_KEY: &str = "server-key.pem";
pub(crate) const CLIENT_CERT: &str = "client-cert.pem";
pub(crate) const CLIENT_KEY: &str = "client-key.pem";

/// The crypto provider: aws-lc-rs (see the module docs of [`tls`](super) for why).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |problem: String| TlsError::File {
        path: path.to_owned(),
        problem,
    };
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(pem_problem(&e)))? {
        certs.push(cert.map_err(|e| bad(pem_problem(&e)))?);
    }
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        problem: pem_problem(&e),
    })
}

fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::Io(e) => format!("cannot be read: {e}"),
        Pem::NoItemsFound => "holds no PEM item of the kind needed".into(),
        other => format!("is not valid PEM: {other:?}"),
    }
}

fn roots(
    dir: &Path,
) -> Result<
    (
        Arc<RootCertStore>,
        Vec<CertificateRevocationListDer<'static>>,
    ),
    TlsError,
> {
    let path = file(dir, CA_CERT);
    let mut roots = RootCertStore::empty();
    for cert in certs(&path)? {
        roots.add(cert).map_err(|e| TlsError::File {
            path: path.clone(),
            problem: format!("holds a certificate that cannot be a CA: {e}"),
        })?;
    }
    let crl_path = file(dir, CA_CRL);
    let mut crls = Vec::new();
    if crl_path.exists() {
        let bad = |e: &rustls::pki_types::pem::Error| TlsError::File {
            path: crl_path.clone(),
            problem: pem_problem(e),
        };
        for crl in CertificateRevocationListDer::pem_file_iter(&crl_path).map_err(|e| bad(&e))? {
            crls.push(crl.map_err(|e| bad(&e))?);
        }
    }
    Ok((Arc::new(roots), crls))
}

fn config_error(dir: &Path, what: &str, e: impl fmt::Display) -> TlsError {
    TlsError::Config(format!("{}: {what}: {e}", dir.display()))
}

/// The sender's configuration from `dir`: it trusts receivers whose certificate `ca-cert.pem`
/// signed, and proves itself with `client-cert.pem` and `client-key.pem`.
pub(crate) fn client_config(dir: &Path) -> Result<ClientConfig, TlsError> {
    let (roots, crls) = roots(dir)?;
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .with_crls(crls)
        .build()
        .map_err(|e| config_error(dir, "the CA cannot verify receivers", e))?;
    let chain = certs(&file(dir, CLIENT_CERT))?;
    let key = key(&file(dir, CLIENT_KEY))?;
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(dir, "TLS 1.3", e))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            config_error(
                dir,
                &format!("{CLIENT_CERT} and {CLIENT_KEY} do not make a usable pair"),
                e,
            )
        })
}

/// The receiver's configuration from `dir`: it proves itself with `server-cert.pem` and
/// `server-key.pem`, and admits only senders with a certificate `ca-cert.pem` signed.
pub(crate) fn server_config(dir: &Path) -> Result<ServerConfig, TlsError> {
    let (roots, crls) = roots(dir)?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .with_crls(crls)
        .build()
        .map_err(|e| config_error(dir, "the CA cannot verify senders", e))?;
    let chain = certs(&file(dir, SERVER_CERT))?;
    let key = key(&file(dir, SERVER_KEY))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_error(dir, "TLS 1.3", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            config_error(
                dir,
                &format!("{SERVER_CERT} and {SERVER_KEY} do not make a usable pair"),
                e,
            )
        })?;
    // Every channel is a full handshake: no tickets to send or sessions to keep.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

/// One attribute of a distinguished name: its type's short name, upper case, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attribute {
    kind: String,
    value: String,
}

/// A distinguished name, as the list of its attributes in certificate order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subject(Vec<Attribute>);

/// The short name an attribute type is written with, normalised (upper case; e-mail spelt one
/// way).
fn kind(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    match upper.as_str() {
        "E" | "EMAILADDRESS" => "EMAIL".into(),
        _ => upper,
    }
}

impl Subject {
    /// Parses a subject as an operator writes it for QEMU's `tls-authz`: `CN=sender.example,O=Example`
    /// (attributes separated by commas, a literal comma in a value escaped as `\,`; spaces
    /// around the separators do not matter).
    pub(crate) fn parse(text: &str) -> Result<Subject, TlsError> {
        let bad = |why: &str| TlsError::Subject {
            subject: text.to_owned(),
            problem: why.to_owned(),
        };
        let mut attributes = Vec::new();
        let mut part = String::new();
        let mut parts = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(escaped) => part.push(escaped),
                    None => return Err(bad("it ends in a lone backslash")),
                },
                ',' => parts.push(std::mem::take(&mut part)),
                c => part.push(c),
            }
        }
        parts.push(part);
        for part in parts {
            let Some((name, value)) = part.split_once('=') else {
                return Err(bad(
                    "each attribute must be TYPE=value, e.g. CN=sender.example",
                ));
            };
            if name.trim().is_empty() {
                return Err(bad("an attribute has no type"));
            }
            attributes.push(Attribute {
                kind: kind(name),
                value: value.trim().to_owned(),
            });
        }
        Ok(Subject(attributes))
    }

    /// The subject of a certificate (DER), or why it has none that can be compared.
    pub(crate) fn of(cert: &[u8]) -> Result<Subject, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| format!("its certificate cannot be parsed: {e}"))?;
        let registry = x509_parser::objects::oid_registry();
        let mut attributes = Vec::new();
        for rdn in cert.subject().iter_rdn() {
            for attribute in rdn.iter() {
                let oid = attribute.attr_type();
                let name = x509_parser::objects::oid2abbrev(oid, registry)
                    .map_or_else(|_| oid.to_id_string(), str::to_owned);
                let value = attribute
                    .as_str()
                    .map_err(|_| format!("its subject's {name} is not a string"))?;
                attributes.push(Attribute {
                    kind: kind(&name),
                    value: value.to_owned(),
                });
            }
        }
        Ok(Subject(attributes))
    }

    /// Whether `self` (from an allow-list) names `cert`'s subject: the same attributes in
    /// certificate order (as GnuTLS, and so QEMU, prints a name) or in reverse (as RFC 4514
    /// and OpenSSL's `-nameopt RFC2253` print it).
    pub(crate) fn names(&self, cert: &Subject) -> bool {
        self.0 == cert.0 || self.0.iter().eq(cert.0.iter().rev())
    }
}

impl fmt::Display for Subject {
    /// In certificate order, as GnuTLS (and so QEMU's `tls-authz`) writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}=", a.kind)?;
            for c in a.value.chars() {
                if matches!(c, ',' | '\\') {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse_and_match_in_either_order() {
        let cert = Subject(vec![
            Attribute {
                kind: "C".into(),
                value: "GB".into(),
            },
            Attribute {
                kind: "O".into(),
                value: "Example, Ltd".into(),
            },
            Attribute {
                kind: "CN".into(),
                value: "sender".into(),
            },
        ]);
        for text in [
            r"C=GB,O=Example\, Ltd,CN=sender",
            r"c=GB, o=Example\, Ltd, cn=sender",
            r"CN=sender,O=Example\, Ltd,C=GB",
        ] {
            let subject = Subject::parse(text).unwrap();
            assert!(subject.names(&cert), "{text}");
        }
        for text in [
            r"CN=sender",
            r"C=GB,O=Example,CN=sender",
            r"C=GB,CN=sender,O=Example\, Ltd",
        ] {
            assert!(!Subject::parse(text).unwrap().names(&cert), "{text}");
        }
        assert_eq!(cert.to_string(), r"C=GB,O=Example\, Ltd,CN=sender");
        for bad in ["CN", "=x", r"CN=a\"] {
            assert!(Subject::parse(bad).is_err(), "{bad}");
        }
    }
}
