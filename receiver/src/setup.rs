//! `init` and `issue-cert`: everything an operator needs to get from
//! nothing to a receiver and agents that trust each other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::{ReceiverConfig, DEFAULT_MAX_DISKS, DEFAULT_RETENTION_HOURS};
use crate::pki::{self, load_ca, make_ca, sign_leaf, validate_name, validity, write_file};
use tidemark_common::tls::RECEIVER_SERVER_NAME;

pub struct InitOptions {
    pub dir: PathBuf,
    pub name: String,
    pub listen: SocketAddr,
    pub image_dir: PathBuf,
    pub retention_dir: PathBuf,
    /// Write `retention_on_root_filesystem = true` (test set-ups).
    pub retention_on_root_filesystem: bool,
    /// Extra host names / IPs for the receiver certificate.
    pub hosts: Vec<String>,
    pub days: i64,
}

/// Creates the CA, the receiver's certificate and `receiver.toml` in
/// `dir`, and the image and retention directories.
pub fn init(o: &InitOptions) -> anyhow::Result<PathBuf> {
    validate_name(&o.name)?;
    std::fs::create_dir_all(&o.dir)
        .with_context(|| format!("cannot create {}", o.dir.display()))?;
    for f in [pki::CA_CERT_FILE, pki::CA_KEY_FILE, "receiver.toml"] {
        let p = o.dir.join(f);
        if p.exists() {
            return Err(pki::PkiError::Exists { path: p }.into());
        }
    }
    let config = ReceiverConfig {
        name: o.name.clone(),
        listen: o.listen,
        image_dir: absolute(&o.image_dir)?,
        retention_dir: absolute(&o.retention_dir)?,
        ca: pki::CA_CERT_FILE.into(),
        cert: "receiver.pem".into(),
        key: "receiver-key.pem".into(),
        max_disks: DEFAULT_MAX_DISKS,
        retention_hours: DEFAULT_RETENTION_HOURS,
        retention_max_gib: None,
        retention_on_root_filesystem: o.retention_on_root_filesystem,
        thinning: None,
        image_format: Default::default(),
        disks: Default::default(),
        revoked_agents: Vec::new(),
        revoked_fingerprints: Vec::new(),
        admin_socket: crate::config::DEFAULT_ADMIN_SOCKET.into(),
        rpo_threshold_secs: crate::config::DEFAULT_RPO_THRESHOLD_SECS,
        heartbeat_timeout_secs: crate::config::DEFAULT_HEARTBEAT_TIMEOUT_SECS,
        metrics_listen: None,
        metrics_allow_remote: false,
    };
    config.validate().map_err(|m| anyhow::anyhow!("{m}"))?;
    for d in [&config.image_dir, &config.retention_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }

    let ca = make_ca(&o.name)?;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str() {
            names.push(h.to_owned());
        }
    }
    names.extend(o.hosts.iter().cloned());
    names.dedup();
    let (nb, na) = validity(o.days);
    let leaf = sign_leaf(&ca, &o.name, &names, true, nb, na)?;
    write_file(&o.dir.join(pki::CA_KEY_FILE), &ca.key_pem, 0o600)?;
    write_file(&o.dir.join(pki::CA_CERT_FILE), &ca.cert_pem, 0o644)?;
    write_file(&o.dir.join("receiver-key.pem"), &leaf.key_pem, 0o600)?;
    write_file(&o.dir.join("receiver.pem"), &leaf.cert_pem, 0o644)?;
    let toml_text = format!(
        "# tidemark receiver configuration, written by `tidemark-receiver init`.\n\
         # Relative paths are relative to this file.\n\n{}",
        toml::to_string(&config).expect("config serializes")
    );
    let path = o.dir.join("receiver.toml");
    write_file(&path, &toml_text, 0o644)?;
    Ok(path)
}

pub struct IssueOptions {
    pub dir: PathBuf,
    pub name: String,
    pub receiver: String,
    pub out: PathBuf,
    pub days: i64,
}

/// Creates an agent's certificate and key, copies the CA certificate and
/// writes a ready `agent.toml` into `out`.
pub fn issue_cert(o: &IssueOptions) -> anyhow::Result<PathBuf> {
    validate_name(&o.name)?;
    if o.receiver
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        bail!(
            "--receiver {:?} must be HOST:PORT (for example master-target.example:443)",
            o.receiver
        );
    }
    let ca = load_ca(&o.dir)?;
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("cannot create {}", o.out.display()))?;
    let (nb, na) = validity(o.days);
    let leaf = sign_leaf(&ca, &o.name, &[], false, nb, na)?;
    write_file(&o.out.join("agent-key.pem"), &leaf.key_pem, 0o600)?;
    write_file(&o.out.join("agent.pem"), &leaf.cert_pem, 0o644)?;
    write_file(&o.out.join("ca.pem"), &ca.cert_pem, 0o644)?;
    let agent_toml = format!(
        r#"# tidemark agent configuration for {name}, written by `tidemark-receiver issue-cert`.
# Relative paths are relative to this file.

# Must match the certificate's name.
name = "{name}"
# Receiver (master target) address.
receiver = "{receiver}"
# Name verified in the receiver's certificate; every receiver certificate carries it.
server_name = "{server_name}"
ca = "ca.pem"
cert = "agent.pem"
key = "agent-key.pem"

# One [[disk]] table per disk to protect, for example:
# [[disk]]
# device = "/dev/sdb"
# id = "web-01-data"   # optional: defaults to the disk's WWID / serial
"#,
        name = o.name,
        receiver = o.receiver,
        server_name = RECEIVER_SERVER_NAME,
    );
    let path = o.out.join("agent.toml");
    write_file(&path, &agent_toml, 0o644)?;
    Ok(path)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
}
