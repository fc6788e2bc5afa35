//! `receiver.toml`: where the receiver listens, where images and the
//! retention journal live, its TLS identity and its limits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_common::config::{load_toml, resolve, ConfigError};
use tidemark_common::tls::TlsFiles;

pub use crate::image::live::ImageFormat;

/// Default listen address: all interfaces, HTTPS's port, so the agent's
/// traffic passes the firewalls that already let 443 out.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:443";
/// Default image directory (the master target's datastore).
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/tidemark/images";
/// Default retention volume, the seeds' `/mnt/Retention`.
pub const DEFAULT_RETENTION_DIR: &str = "/mnt/retention";
/// Disks one receiver protects, from the product documents.
pub const DEFAULT_MAX_DISKS: usize = 60;
/// Retention window, from the product documents' failback policy.
pub const DEFAULT_RETENTION_HOURS: f64 = 24.0;
/// Longest retention window accepted: a year.
pub const MAX_RETENTION_HOURS: f64 = 8760.0;
/// Where `serve` answers `status` and `reassign`: the unit's
/// `RuntimeDirectory=tidemark-receiver`, apart from the agent's
/// `/run/tidemark` so both services can run on one machine.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tidemark-receiver/receiver.sock";
/// RPO alarm threshold: the product documents' 15 minutes.
pub const DEFAULT_RPO_THRESHOLD_SECS: u64 = 900;
/// Heartbeat alarm: agents send a heartbeat every 10 s when idle and
/// retry a lost connection with a backoff of at most 30 s, so 120 s is
/// several missed heartbeats and several failed reconnects, not one
/// network hiccup; it also equals the session idle timeout, so a hung
/// connection and a stopped agent raise the alarm after the same time.
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 120;
/// Above the agents' 10 s heartbeat interval with room for a slow one.
pub const MIN_HEARTBEAT_TIMEOUT_SECS: u64 = 15;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Name this receiver gives itself in logs and to agents.
    pub name: String,
    /// Address and port to listen on for agents (TLS only).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory holding one image per protected disk.
    pub image_dir: PathBuf,
    /// Retention volume: the disk registry and recovery points. Must not be
    /// the image directory.
    pub retention_dir: PathBuf,
    /// CA certificate that signs agent certificates (PEM).
    pub ca: PathBuf,
    /// This receiver's certificate (PEM), signed by `ca`.
    pub cert: PathBuf,
    /// This receiver's private key (PEM).
    pub key: PathBuf,
    /// Most disks this receiver accepts; registration past it is refused.
    #[serde(default = "default_max_disks")]
    pub max_disks: usize,
    /// Hours of recovery points kept; older undo history is pruned (the
    /// newest point always stays). Fractions are allowed (0.5: 30 min).
    #[serde(default = "default_retention_hours")]
    pub retention_hours: f64,
    /// Cap on the undo journal (all disks together), in GiB: above it the
    /// oldest history is pruned first, with a warning, even inside the
    /// window; a disk's newest point always stays. None: only the window
    /// and the volume's size limit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_max_gib: Option<f64>,
    /// Accept a retention directory on the root filesystem, where a
    /// growing journal could fill the system's own disk (test set-ups).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retention_on_root_filesystem: bool,
    /// `[thinning]`: keep every recent point, fewer older ones. Off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinning: Option<crate::journal::thinning::Thinning>,
    /// Format of new replica images: `vmdk` (a flat VMDK for ESXi with a
    /// hosted descriptor beside it), `vmdk-sparse`, `vhd-fixed` or `raw`.
    /// An image found by UUID keeps its own format.
    #[serde(default)]
    pub image_format: ImageFormat,
    /// Per-disk settings, keyed by disk id: `[disks."<id>"]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub disks: BTreeMap<String, DiskSettings>,
    /// Agent names (certificate CNs) refused at the handshake; their live
    /// sessions are closed when `serve` rereads this file (SIGHUP).
    #[serde(default)]
    pub revoked_agents: Vec<String>,
    /// SHA-256 fingerprints of agent certificates refused at the handshake
    /// (hex, colons optional: `openssl x509 -noout -fingerprint -sha256`).
    /// Revokes one certificate without refusing the name's next one.
    #[serde(default)]
    pub revoked_fingerprints: Vec<String>,
    /// Unix socket (mode 0600) on which `serve` answers `status` and
    /// `reassign`.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// A disk whose newest consistent point is older than this many
    /// seconds raises an RPO alarm (log warning, `status`).
    #[serde(default = "default_rpo_threshold_secs")]
    pub rpo_threshold_secs: u64,
    /// An agent owning disks here that sends nothing for this many seconds
    /// raises a heartbeat alarm.
    #[serde(default = "default_heartbeat_timeout_secs")]
    pub heartbeat_timeout_secs: u64,
    /// Address of the Prometheus text endpoint (`GET /metrics`); off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on an address other than loopback (the
    /// endpoint has no authentication).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_allow_remote: bool,
}

/// Settings for one disk that override the receiver's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSettings {
    /// Format of this disk's image when a new one is made.
    pub image_format: Option<ImageFormat>,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("constant address parses")
}

fn default_max_disks() -> usize {
    DEFAULT_MAX_DISKS
}

fn default_retention_hours() -> f64 {
    DEFAULT_RETENTION_HOURS
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from(DEFAULT_ADMIN_SOCKET)
}

fn default_rpo_threshold_secs() -> u64 {
    DEFAULT_RPO_THRESHOLD_SECS
}

fn default_heartbeat_timeout_secs() -> u64 {
    DEFAULT_HEARTBEAT_TIMEOUT_SECS
}

/// A certificate fingerprint as the config may spell it, as lowercase hex
/// without separators; None if it is not 32 bytes of hex.
pub fn normalize_fingerprint(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

impl ReceiverConfig {
    /// Loads, resolves relative paths against the file, and validates.
    pub fn load(path: &Path) -> Result<ReceiverConfig, ConfigError> {
        let mut c: ReceiverConfig = load_toml(path)?;
        for p in [
            &mut c.image_dir,
            &mut c.retention_dir,
            &mut c.ca,
            &mut c.cert,
            &mut c.key,
            &mut c.admin_socket,
        ] {
            *p = resolve(path, p);
        }
        c.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        if !(self.retention_hours > 0.0 && self.retention_hours <= MAX_RETENTION_HOURS) {
            return Err(format!(
                "retention_hours = {} is out of range; give hours above 0 and at most {MAX_RETENTION_HOURS} (fractions allowed; the default is {DEFAULT_RETENTION_HOURS})",
                self.retention_hours
            ));
        }
        if let Some(t) = &self.thinning {
            t.validate()?;
        }
        if let Some(g) = self.retention_max_gib {
            if !(g > 0.0 && g.is_finite()) {
                return Err(format!(
                    "retention_max_gib = {g} must be a size in GiB above 0 (fractions allowed), or left out for no cap"
                ));
            }
        }
        if self.max_disks == 0 {
            return Err("max_disks must be at least 1".into());
        }
        if self.rpo_threshold_secs == 0 {
            return Err(
                "rpo_threshold_secs must be at least 1 (seconds; the default is 900)".into(),
            );
        }
        if self.heartbeat_timeout_secs < MIN_HEARTBEAT_TIMEOUT_SECS {
            return Err(format!(
                "heartbeat_timeout_secs = {} would raise alarms for healthy agents, which heartbeat every 10 s; use at least {MIN_HEARTBEAT_TIMEOUT_SECS} (the default is {DEFAULT_HEARTBEAT_TIMEOUT_SECS})",
                self.heartbeat_timeout_secs
            ));
        }
        for name in &self.revoked_agents {
            if name.trim().is_empty() {
                return Err(
                    "revoked_agents holds an empty name; list agent names (certificate CNs)".into(),
                );
            }
        }
        for f in &self.revoked_fingerprints {
            if normalize_fingerprint(f).is_none() {
                return Err(format!(
                    "revoked_fingerprints: {f:?} is not a SHA-256 fingerprint; give the 64 hex digits `openssl x509 -noout -fingerprint -sha256 -in agent.pem` prints"
                ));
            }
        }
        tidemark_common::config::check_metrics_listen(
            self.metrics_listen,
            self.metrics_allow_remote,
        )?;
        if same_dir(&self.image_dir, &self.retention_dir) {
            return Err(format!(
                "retention_dir and image_dir are both {}; the retention volume must be separate from the images",
                self.image_dir.display()
            ));
        }
        Ok(())
    }

    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// The format a new image of `disk_id` is made in.
    pub fn image_format_for(&self, disk_id: &str) -> ImageFormat {
        self.disks
            .get(disk_id)
            .and_then(|d| d.image_format)
            .unwrap_or(self.image_format)
    }

    /// The persistent disk table.
    pub fn registry_path(&self) -> PathBuf {
        self.retention_dir.join("registry.json")
    }

    /// The recovery point log.
    pub fn points_path(&self) -> PathBuf {
        self.retention_dir.join("points.jsonl")
    }
}

/// The product documents' rules for a retention volume, checked on the
/// directory as mounted: not FAT/FAT32 (no fsync or rename guarantees the
/// journal can rest on), not of zero capacity, and not the root
/// filesystem unless `allow_root` (a journal that fills `/` takes the
/// master target down with it; better not to start).
pub fn check_retention_volume(dir: &Path, allow_root: bool) -> Result<(), String> {
    use nix::sys::statfs::{statfs, MSDOS_SUPER_MAGIC};
    use std::os::unix::fs::MetadataExt;
    let st = statfs(dir)
        .map_err(|e| format!("cannot inspect retention directory {}: {e}", dir.display()))?;
    let on_root = match (std::fs::metadata(dir), std::fs::metadata("/")) {
        (Ok(d), Ok(r)) => d.dev() == r.dev(),
        _ => false,
    };
    if on_root && !allow_root {
        return Err(format!(
            "retention directory {} is on the root filesystem, which a growing journal would fill; mount the retention volume there, or set retention_on_root_filesystem = true in receiver.toml for a test set-up",
            dir.display()
        ));
    }
    if st.filesystem_type() == MSDOS_SUPER_MAGIC {
        return Err(format!(
            "retention directory {} is on a FAT filesystem; use ext4 or xfs for the retention volume",
            dir.display()
        ));
    }
    if st.blocks() == 0 {
        return Err(format!(
            "retention directory {} is on a volume of zero capacity; mount the retention volume there",
            dir.display()
        ));
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_volume_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_retention_volume(dir.path(), true).is_ok());
        let err = check_retention_volume(Path::new("/"), false).expect_err("root filesystem");
        assert!(
            err.contains("root filesystem") && err.contains("retention_on_root_filesystem"),
            "{err}"
        );
        let err = check_retention_volume(&dir.path().join("missing"), true).expect_err("missing");
        assert!(err.contains("missing"), "{err}");
        let c = ReceiverConfig {
            name: "r".into(),
            listen: default_listen(),
            image_dir: dir.path().into(),
            retention_dir: dir.path().into(),
            ca: "ca.pem".into(),
            cert: "c.pem".into(),
            key: "k.pem".into(),
            max_disks: 60,
            retention_hours: 24.0,
            retention_max_gib: None,
            retention_on_root_filesystem: false,
            thinning: None,
            image_format: ImageFormat::Vmdk,
            disks: BTreeMap::new(),
            revoked_agents: Vec::new(),
            revoked_fingerprints: vec!["AB:".repeat(31) + "AB"],
            admin_socket: default_admin_socket(),
            rpo_threshold_secs: DEFAULT_RPO_THRESHOLD_SECS,
            heartbeat_timeout_secs: DEFAULT_HEARTBEAT_TIMEOUT_SECS,
            metrics_listen: None,
            metrics_allow_remote: false,
        };
        assert!(c.validate().expect_err("same dir").contains("separate"));
        let mut bad = c.clone();
        bad.retention_dir = dir.path().join("r");
        assert!(bad.validate().is_ok());
        bad.revoked_fingerprints.push("abc".into());
        assert!(bad
            .validate()
            .expect_err("short fingerprint")
            .contains("\"abc\""));
    }

    /// The shipped example must stay loadable by the real loader.
    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/examples/receiver.toml");
        let c = ReceiverConfig::load(&path).expect("systemd/examples/receiver.toml loads");
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.admin_socket, default_admin_socket());
        assert_eq!(c.revoked_fingerprints.len(), 1);
        assert!(c.ca.ends_with("examples/ca.pem"));
    }

    #[test]
    fn fingerprints_normalize() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).expect("ascii").to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(normalize_fingerprint(&colons).as_deref(), Some(hex));
        assert_eq!(normalize_fingerprint(hex).as_deref(), Some(hex));
        assert_eq!(normalize_fingerprint("xyz"), None);
    }
}
