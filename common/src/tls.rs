//! TLS set-up for both sides: TLS 1.3 only, mutual authentication against a
//! private CA. Both configs are built from PEM files named in the configs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// The DNS name every receiver certificate carries, whatever host names it
/// also has. Agents verify this name by default: trust comes from the
/// receiver's private CA, which signs nothing but this receiver and its
/// agents, so the name need not track IP addresses or DNS changes.
pub const RECEIVER_SERVER_NAME: &str = "tidemark-receiver";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {}: {source}", path.display())]
    ReadCert {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate file {} holds no certificate", path.display())]
    NoCert { path: PathBuf },
    #[error("cannot read private key {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("private key {} is readable by {who} (mode {mode:04o}); run chmod 600 {}", path.display(), path.display())]
    KeyExposed {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error("CA certificate {} is not usable: {message}", path.display())]
    BadCa { path: PathBuf, message: String },
    #[error("certificate {} and key {} do not form a usable identity: {message}", cert.display(), key.display())]
    BadIdentity {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("server name {0:?} is not a valid DNS name or IP address")]
    BadServerName(String),
}

/// PEM files that make one side's identity and its trust anchor.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCert {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Refuses a private key other users can read: whoever can read it can
/// pose as this side. Like PostgreSQL's rule, a key owned by root may be
/// group-readable (0640) for a service user of that group who is not its
/// owner: the receiver's documented install.
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    // A missing file is reported by the read, with the path.
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.mode() & 0o7777;
    let exposed = |who| {
        Err(TlsError::KeyExposed {
            path: path.to_path_buf(),
            mode,
            who,
        })
    };
    if mode & 0o007 != 0 {
        return exposed("others");
    }
    let root_owned_for_group =
        meta.uid() == 0 && nix::unistd::geteuid().as_raw() != 0 && mode & 0o030 == 0;
    if mode & 0o070 != 0 && !root_owned_for_group {
        return exposed("its group");
    }
    Ok(())
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_key_mode(path)?;
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::ReadKey {
        path: path.to_path_buf(),
        source,
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A second opinion on a client certificate the CA has already vouched
/// for: the receiver's deny list. Consulted during the handshake, so a
/// refused agent never gets as far as the protocol.
pub trait ClientPolicy: std::fmt::Debug + Send + Sync {
    /// Ok, or why this certificate is refused (the implementor logs it).
    fn admit(&self, end_entity: &CertificateDer<'_>) -> Result<(), String>;
}

/// The receiver's config: only clients with a certificate from `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_policy(files, None)
}

/// [`server_config`] that also refuses what `policy` refuses, with the TLS
/// alert `certificate_revoked`, so the agent can say why it was turned away.
pub fn server_config_with_policy(
    files: &TlsFiles,
    policy: Option<Arc<dyn ClientPolicy>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let ca_verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::BadCa {
            path: files.ca.clone(),
            message: e.to_string(),
        })?;
    let verifier: Arc<dyn ClientCertVerifier> = match policy {
        Some(policy) => Arc::new(PolicyVerifier {
            inner: ca_verifier,
            policy,
        }),
        None => ca_verifier,
    };
    let bad_identity = |e: rustls::Error| TlsError::BadIdentity {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad_identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(bad_identity)?;
    Ok(Arc::new(config))
}

/// The agent's config: only a receiver whose certificate chains to `files.ca`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca)?;
    let bad_identity = |e: rustls::Error| TlsError::BadIdentity {
        cert: files.cert.clone(),
        key: files.key.clone(),
        message: e.to_string(),
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(bad_identity)?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(bad_identity)?;
    Ok(Arc::new(config))
}

/// Parses the name the agent verifies in the receiver's certificate.
pub fn server_name(name: &str) -> Result<rustls_pki_types::ServerName<'static>, TlsError> {
    rustls_pki_types::ServerName::try_from(name.to_owned())
        .map_err(|_| TlsError::BadServerName(name.to_owned()))
}

/// The subject common name of a DER certificate: an agent's name is the CN
/// of its certificate, so a certificate cannot speak for another agent.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// SHA-256 of a DER certificate as lowercase hex: what
/// `openssl x509 -noout -fingerprint -sha256` prints, without the colons.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The CA's verdict first, then the policy's.
#[derive(Debug)]
struct PolicyVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: Arc<dyn ClientPolicy>,
}

impl ClientCertVerifier for PolicyVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.policy
            .admit(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposed_keys_are_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tdm-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = dir.join("key.pem");
        std::fs::write(&key, "not a key").expect("write");
        let set = |mode| {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        set(0o644);
        let e = check_key_mode(&key)
            .expect_err("world-readable")
            .to_string();
        assert!(
            e.contains("key.pem") && e.contains("others") && e.contains("chmod 600"),
            "{e}"
        );
        set(0o600);
        assert!(check_key_mode(&key).is_ok());
        assert!(check_key_mode(&dir.join("missing.pem")).is_ok());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        // SHA-256 of the empty string, from FIPS 180-2 test vectors.
        assert_eq!(
            fingerprint_sha256(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
