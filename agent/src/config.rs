//! `agent.toml`: who this agent is, where its receiver is, which disks it
//! protects.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tidemark_common::config::{load_toml, resolve, ConfigError};
use tidemark_common::tls::{TlsFiles, RECEIVER_SERVER_NAME};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name; must equal the CN of `cert`.
    pub name: String,
    /// Receiver address, HOST:PORT.
    pub receiver: String,
    /// Name verified in the receiver's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA certificate the receiver's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// This agent's certificate (PEM).
    pub cert: PathBuf,
    /// This agent's private key (PEM).
    pub key: PathBuf,
    /// Reads kept in flight per disk (io_uring queue depth).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Compression threads; 0 means one per CPU.
    #[serde(default)]
    pub compress_threads: usize,
    /// zstd level: 1 is fastest; higher trades CPU for bandwidth.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Disks to protect.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Block device path, e.g. /dev/sdb or /dev/disk/by-id/...
    pub device: PathBuf,
    /// Stable id; defaults to the disk's WWID, serial or by-id name.
    pub id: Option<String>,
}

fn default_server_name() -> String {
    RECEIVER_SERVER_NAME.to_owned()
}
fn default_queue_depth() -> usize {
    32
}
fn default_zstd_level() -> i32 {
    1
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut c: AgentConfig = load_toml(path)?;
        for p in [&mut c.ca, &mut c.cert, &mut c.key] {
            *p = resolve(path, p);
        }
        c.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.disks.is_empty() {
            return Err(
                "no disks configured; add a [[disk]] table with device = \"/dev/...\"".into(),
            );
        }
        if self
            .receiver
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("receiver = {:?} must be HOST:PORT", self.receiver));
        }
        if !(1..=1024).contains(&self.queue_depth) {
            return Err("queue_depth must be between 1 and 1024".into());
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err("zstd_level must be between 1 and 19".into());
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

    pub fn pipeline_settings(&self) -> crate::pipeline::Settings {
        crate::pipeline::Settings {
            queue_depth: self.queue_depth,
            compress_threads: self.compress_threads(),
            zstd_level: self.zstd_level,
        }
    }

    pub fn compress_threads(&self) -> usize {
        if self.compress_threads > 0 {
            self.compress_threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}
