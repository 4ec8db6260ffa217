//! TLS client configuration from `sslmode` and friends, shared by the replication client and
//! tokio-postgres so both verify certificates exactly as libpq would.
//!
//! | sslmode                     | root certificate | what is checked                         |
//! |-----------------------------|------------------|-----------------------------------------|
//! | disable                     | —                | no TLS                                  |
//! | allow / prefer / require    | none             | handshake signatures only (encryption)  |
//! | allow / prefer / require    | present          | chain against the root (like verify-ca) |
//! | verify-ca                   | required         | chain against the root                  |
//! | verify-full                 | required         | chain and host name                     |
//!
//! As in libpq, a root certificate that exists (given as `sslrootcert`, or the default
//! `~/.postgresql/root.crt`) is used to verify the chain in every mode that uses TLS.
//! Without one, the server certificate is accepted as is, but the handshake signatures are
//! still checked, so the session key is bound to the certificate the server presented.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::dsn::{Dsn, SslMode};

/// TLS could not be configured (unreadable certificate or key files).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        /// Which DSN option named the file (`sslrootcert`, `sslcert`, `sslkey`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },
    /// A file held no usable PEM content of the expected kind.
    #[error("{what} file {} {problem}", path.display())]
    BadFile {
        /// Which DSN option named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it, as a sentence fragment.
        problem: String,
    },
    /// `verify-ca` / `verify-full` without any root certificate to verify against.
    #[error(
        "sslmode={0} needs a root certificate to verify the server against, and none was found: \
         set sslrootcert to the CA file (or create ~/.postgresql/root.crt), or use \
         sslmode=require to encrypt without verification"
    )]
    MissingRootCert(SslMode),
    /// `sslcert` without `sslkey`.
    #[error(
        "client certificate {} is set but no private key: set sslkey (or create \
         ~/.postgresql/postgresql.key)", .0.display()
    )]
    MissingKey(PathBuf),
    /// The certificate and key were read but rustls refused them (for example, they do not
    /// belong together).
    #[error("client certificate {} and key {} cannot be used: {source}", cert.display(), key.display())]
    ClientAuth {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration itself.
    #[error("cannot set up TLS: {0}")]
    Setup(#[source] rustls::Error),
}

/// The rustls client configuration for this DSN, or `None` when `sslmode=disable`.
pub fn client_config(dsn: &Dsn) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    if dsn.sslmode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (&dsn.sslrootcert, dsn.sslmode) {
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => {
            return Err(TlsError::MissingRootCert(dsn.sslmode))
        }
        (None, _) => Arc::new(AcceptAnyCertificate {
            algorithms: provider.signature_verification_algorithms,
        }),
        (Some(root), mode) => {
            let roots = load_roots(root)?;
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| TlsError::BadFile {
                        what: "sslrootcert",
                        path: root.clone(),
                        problem: format!("cannot be used as a trust anchor: {e}"),
                    })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly { inner: webpki })
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&dsn.sslcert, &dsn.sslkey) {
        (None, _) => builder.with_no_client_auth(),
        (Some(cert), None) => return Err(TlsError::MissingKey(cert.clone())),
        (Some(cert), Some(key)) => {
            let chain = load_certs("sslcert", cert)?;
            let private = load_key(key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|source| TlsError::ClientAuth {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
    };
    // PostgreSQL 17+ expects this ALPN name; older servers ignore the extension.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadFile {
            what,
            path: path.to_path_buf(),
            problem: format!("is not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            what,
            path: path.to_path_buf(),
            problem: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("sslrootcert", path)? {
        roots.add(cert).map_err(|e| TlsError::BadFile {
            what: "sslrootcert",
            path: path.to_path_buf(),
            problem: format!("holds a certificate that cannot be a trust anchor: {e}"),
        })?;
    }
    Ok(roots)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("sslkey", path)?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(TlsError::BadFile {
            what: "sslkey",
            path: path.to_path_buf(),
            problem: "holds no private key (expected PEM PKCS#8, PKCS#1 RSA or SEC1 EC; an \
                      encrypted key must be decrypted first)"
                .into(),
        }),
        Err(e) => Err(TlsError::BadFile {
            what: "sslkey",
            path: path.to_path_buf(),
            problem: format!("is not valid PEM: {e}"),
        }),
    }
}

/// `sslmode=allow/prefer/require` without a root certificate: any server certificate is
/// accepted, but handshake signatures are verified against it.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead to the root,
/// the host name is not checked.
///
/// rustls's verifier checks the chain before the name, so a name-mismatch error means the
/// chain was already accepted; only that error is forgiven.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Finds the rustls error inside an error chain (tokio-rustls wraps it in an `io::Error`,
/// tokio-postgres wraps that in its own error).
pub fn find_rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        // `io::Error::source` skips the wrapped error itself, so look inside explicitly.
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
            if let Some(found) = find_rustls_error(inner) {
                return Some(found);
            }
        }
        cur = e.source();
    }
    None
}

/// Whether a TLS failure can never heal by retrying (certificate problems, refused
/// handshakes), as opposed to the connection breaking mid-handshake.
pub fn is_definite(err: &rustls::Error) -> bool {
    !matches!(
        err,
        rustls::Error::FailedToGetCurrentTime | rustls::Error::FailedToGetRandomBytes
    )
}

/// Puts a rustls failure into words an operator can act on. Certificate verification
/// failures read "certificate verification failed: `why`".
pub fn explain(err: &rustls::Error) -> String {
    TlsExplanation(err).to_string()
}

/// Display adapter behind [`explain`].
struct TlsExplanation<'a>(&'a rustls::Error);

impl fmt::Display for TlsExplanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use rustls::AlertDescription as A;
        match self.0 {
            rustls::Error::InvalidCertificate(c) => {
                f.write_str("certificate verification failed: ")?;
                match c {
                    CertificateError::UnknownIssuer => f.write_str(
                        "unknown issuer (the server's certificate is not signed by a CA in \
                         sslrootcert; check that sslrootcert is the CA that issued it)",
                    ),
                    CertificateError::NotValidForName => f.write_str(
                        "the server's certificate is not valid for the host name connected to \
                         (sslmode=verify-full checks it; connect by a name the certificate \
                         lists, or use verify-ca)",
                    ),
                    CertificateError::NotValidForNameContext {
                        expected,
                        presented,
                    } => {
                        write!(
                        f,
                        "the server's certificate is not valid for {} (it names {}); connect by \
                         a name the certificate lists, or use sslmode=verify-ca",
                        server_name_text(expected),
                        if presented.is_empty() {
                            "no names".to_string()
                        } else {
                            presented.iter().map(|n| bare_name(n)).collect::<Vec<_>>().join(", ")
                        }
                    )
                    }
                    CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                        f.write_str("the server's certificate has expired")
                    }
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                        f.write_str("the server's certificate is not valid yet (check the clocks)")
                    }
                    CertificateError::Revoked => {
                        f.write_str("the server's certificate has been revoked")
                    }
                    CertificateError::BadSignature => {
                        f.write_str("bad signature on the server's certificate")
                    }
                    CertificateError::BadEncoding => {
                        f.write_str("the server's certificate is malformed")
                    }
                    CertificateError::InvalidPurpose
                    | CertificateError::InvalidPurposeContext { .. } => {
                        f.write_str("the server's certificate is not meant for TLS servers")
                    }
                    other => write!(f, "{other:?}"),
                }
            }
            rustls::Error::AlertReceived(
                alert @ (A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::AccessDenied),
            ) => write!(
                f,
                "the server rejected our client certificate during certificate verification \
                 (TLS alert {alert:?}); check sslcert/sslkey and the server's ssl_ca_file"
            ),
            rustls::Error::AlertReceived(alert) => {
                write!(f, "TLS handshake failed: the server sent alert {alert:?}")
            }
            rustls::Error::NoCertificatesPresented => {
                f.write_str("certificate verification failed: the server presented no certificate")
            }
            other => write!(f, "TLS handshake failed: {other}"),
        }
    }
}

/// `DnsName("db.example")` → `db.example` (rustls lists presented names in Debug form).
fn bare_name(n: &str) -> &str {
    for prefix in ["DnsName(\"", "IpAddress(\""] {
        if let Some(inner) = n.strip_prefix(prefix).and_then(|r| r.strip_suffix("\")")) {
            return inner;
        }
    }
    n
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// The `tls-server-end-point` channel-binding data for a server certificate (RFC 5929): the
/// certificate's hash, with the hash function of its signature algorithm (MD5 and SHA-1
/// become SHA-256). `None` when the algorithm names no single hash (RSASSA-PSS, Ed25519,
/// unknown), in which case SCRAM runs without channel binding, as with libpq.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use const_oid::db::rfc5912::{
        ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, SHA_1_WITH_RSA_ENCRYPTION,
        SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
    };
    use x509_cert::der::Decode;

    let cert = x509_cert::Certificate::from_der(cert_der).ok()?;
    let oid = cert.signature_algorithm.oid;
    let algorithm = if [
        SHA_1_WITH_RSA_ENCRYPTION,
        SHA_256_WITH_RSA_ENCRYPTION,
        ECDSA_WITH_SHA_256,
    ]
    .contains(&oid)
    {
        &ring::digest::SHA256
    } else if [SHA_384_WITH_RSA_ENCRYPTION, ECDSA_WITH_SHA_384].contains(&oid) {
        &ring::digest::SHA384
    } else if [SHA_512_WITH_RSA_ENCRYPTION, ECDSA_WITH_SHA_512].contains(&oid) {
        &ring::digest::SHA512
    } else {
        return None;
    };
    Some(ring::digest::digest(algorithm, cert_der).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dsn(s: &str) -> Dsn {
        Dsn::parse(s).unwrap()
    }

    #[test]
    fn disable_means_no_tls() {
        assert!(client_config(&dsn("host=h sslmode=disable"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn require_without_root_builds() {
        for mode in ["allow", "prefer", "require"] {
            let mut d = dsn(&format!("host=h sslmode={mode}"));
            d.sslrootcert = None;
            assert!(client_config(&d).unwrap().is_some());
        }
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        let mut d = dsn("host=h sslmode=verify-full");
        d.sslrootcert = None;
        let e = client_config(&d).unwrap_err().to_string();
        assert!(e.contains("sslrootcert"), "{e}");
    }

    #[test]
    fn errors_name_the_file() {
        let d = dsn("host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem");
        let e = client_config(&d).unwrap_err().to_string();
        assert!(
            e.contains("/nonexistent/ca.pem") && e.contains("sslrootcert"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let d = dsn(&format!(
            "host=h sslmode=verify-ca sslrootcert={}",
            junk.display()
        ));
        let e = client_config(&d).unwrap_err().to_string();
        assert!(
            e.contains(&junk.display().to_string()) && e.contains("no PEM"),
            "{e}"
        );

        let mut d = dsn("host=h sslmode=require");
        d.sslrootcert = None;
        d.sslcert = Some("/nonexistent/client.crt".into());
        d.sslkey = None;
        let e = client_config(&d).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/client.crt"), "{e}");
        d.sslkey = Some("/nonexistent/client.key".into());
        let e = client_config(&d).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/client.crt"), "{e}");
    }

    #[test]
    fn explains_unknown_issuer_in_words() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let text = explain(&e);
        assert!(
            text.contains("certificate") && text.contains("verif"),
            "{text}"
        );
        // Found inside the wrappers tokio-rustls and tokio-postgres put around it.
        let io = io::Error::new(io::ErrorKind::InvalidData, e);
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(io);
        assert!(matches!(
            find_rustls_error(&*boxed),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
    }
}
