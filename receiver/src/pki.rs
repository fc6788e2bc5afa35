//! The receiver's own small CA: `init` makes the CA and the receiver's
//! certificate, `issue-cert` makes an agent's. Keys are ECDSA P-256 and are
//! written 0600; nothing here ever logs a key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tidemark_common::durable::write_atomic;
use tidemark_common::tls::RECEIVER_SERVER_NAME;
use time::{Duration, OffsetDateTime};

/// CA lifetime: long enough to outlive the machines it protects.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Default lifetime of receiver and agent certificates.
pub const DEFAULT_CERT_DAYS: i64 = 825;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}; run `tidemark-receiver init` first or pass the directory it wrote", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite a CA (use another --dir, or remove it deliberately)", path.display())]
    Exists { path: PathBuf },
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("invalid name {0:?}: use letters, digits, '.', '-', '_' (at most 64)")]
    BadName(String),
}

/// A certificate and key in PEM.
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Agent and receiver names end up in certificates, file names and logs.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

fn params(cn: &str, sans: Vec<SanType>, days: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "tidemark");
    p.distinguished_name = dn;
    p.subject_alt_names = sans;
    // Back-date a little: clocks on freshly booted machines drift.
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
    p
}

/// A new self-signed CA.
pub fn make_ca(receiver_name: &str) -> Result<Pair, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = params(
        &format!("tidemark CA for {receiver_name}"),
        vec![],
        CA_VALIDITY_DAYS,
    );
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Signs a leaf certificate with the CA. `server` picks the extended key
/// usage (server auth for the receiver, client auth for agents).
pub fn sign_leaf(
    ca: &Pair,
    cn: &str,
    extra_names: &[String],
    server: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Pair, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut sans = Vec::new();
    if server {
        sans.push(SanType::DnsName(RECEIVER_SERVER_NAME.try_into()?));
    }
    for n in extra_names {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(n.as_str().try_into()?)),
        }
    }
    let mut p = params(cn, sans, 1);
    p.not_before = not_before;
    p.not_after = not_after;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Validity window for a new certificate of `days` days.
pub fn validity(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::hours(1), now + Duration::days(days))
}

pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    write_atomic(path, text.as_bytes(), mode).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_file(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the CA written by `init` from `dir`.
pub fn load_ca(dir: &Path) -> Result<Pair, PkiError> {
    Ok(Pair {
        cert_pem: read_file(&dir.join(CA_CERT_FILE))?,
        key_pem: read_file(&dir.join(CA_KEY_FILE))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_restricted() {
        assert!(validate_name("web-01.example").is_ok());
        for bad in ["", "a b", "../x", "x/y", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leaf_carries_names_and_cn() {
        let ca = make_ca("r1").expect("ca");
        let (nb, na) = validity(1);
        let leaf = sign_leaf(&ca, "r1", &["127.0.0.1".into()], true, nb, na).expect("leaf");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes())
            .expect("pem");
        assert_eq!(
            tidemark_common::tls::common_name(&der).as_deref(),
            Some("r1")
        );
    }
    use rustls_pki_types::pem::PemObject;
}
