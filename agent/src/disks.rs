//! Finding a configured disk: checking it is a block device, its size and
//! block size, and the stable id the receiver knows it by.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::DiskConfig;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {}: {source}; check device = in agent.toml", path.display())]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {} is not a block device; device = must name a disk such as /dev/sdb", path.display())]
    NotBlockDevice { path: PathBuf },
    #[error("cannot open disk {}: {source} (the agent needs root)", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {} has no WWID or serial to identify it; set id = \"...\" in its [[disk]] table", path.display())]
    NoId { path: PathBuf },
    #[error("disk {} has id {id:?}, which is not valid: use 1-128 letters, digits, '.', '_', ':', '-'", path.display())]
    BadId { path: PathBuf, id: String },
}

/// A disk ready to be read.
#[derive(Debug, Clone)]
pub struct Disk {
    pub device: PathBuf,
    pub id: String,
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    /// `/sys/dev/block/MAJ:MIN`, for counters and identity.
    pub sysfs: PathBuf,
}

impl Disk {
    /// Sectors written plus sectors discarded since boot, from the block
    /// layer's own counters (fields 7 and 14 of `stat`); they change if
    /// anything writes to the disk.
    pub fn write_counters(&self) -> Option<(u64, u64)> {
        let text = std::fs::read_to_string(self.sysfs.join("stat")).ok()?;
        let f: Vec<u64> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        Some((*f.get(6)?, f.get(13).copied().unwrap_or(0)))
    }
}

/// Opens every configured disk, or only the one whose id is `only`.
pub fn open_configured(configs: &[DiskConfig], only: Option<&str>) -> anyhow::Result<Vec<Disk>> {
    let mut disks = Vec::new();
    for c in configs {
        // A disk without an explicit id gets one from its device, so it has
        // to be opened to be matched.
        if let (Some(want), Some(id)) = (only, &c.id) {
            if want != id {
                continue;
            }
        }
        let d = open_disk(c)?;
        if only.is_none_or(|want| d.id == want) {
            disks.push(d);
        }
    }
    if let (Some(want), true) = (only, disks.is_empty()) {
        anyhow::bail!(
            "disk {want:?} is not in the agent's configuration; run `tidemark-agent status` or see the [[disk]] entries of the config"
        );
    }
    Ok(disks)
}

pub fn open_disk(cfg: &DiskConfig) -> Result<Disk, DiskError> {
    let path = &cfg.device;
    let meta = std::fs::metadata(path).map_err(|source| DiskError::Stat {
        path: path.clone(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(DiskError::NotBlockDevice { path: path.clone() });
    }
    let sysfs = sysfs_dir(&meta);
    // A block device's size is where seeking to its end lands.
    let size_bytes = File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
        })?;
    let logical_block_bytes = queue_attr(&sysfs, "logical_block_size")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(512);
    let id = match &cfg.id {
        Some(id) => id.clone(),
        None => discover_id(path, &sysfs).ok_or_else(|| DiskError::NoId { path: path.clone() })?,
    };
    if !valid_id(&id) {
        return Err(DiskError::BadId {
            path: path.clone(),
            id,
        });
    }
    Ok(Disk {
        device: path.clone(),
        id,
        size_bytes,
        logical_block_bytes,
        sysfs,
    })
}

/// `/sys/dev/block/MAJ:MIN` of the block device `meta` describes.
pub fn sysfs_dir(meta: &std::fs::Metadata) -> PathBuf {
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
}

/// A number from the request queue of the disk at `sysfs`: a partition has
/// no queue of its own, so its disk's, one level up, answers for it.
pub fn queue_attr(sysfs: &Path, name: &str) -> Option<u64> {
    ["queue", "../queue"]
        .iter()
        .find_map(|q| read_sysfs(&sysfs.join(q).join(name)))
        .and_then(|s| s.parse().ok())
}

fn read_sysfs(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// The identity the hypervisor gives the disk: WWID (on vSphere with
/// `disk.EnableUUID=TRUE`, `naa.6000c29…`: the VMDK's UUID), else the
/// serial, else the `/dev/disk/by-id` name.
fn discover_id(device: &Path, sysfs: &Path) -> Option<String> {
    for f in ["device/wwid", "wwid", "device/serial", "serial"] {
        if let Some(v) = read_sysfs(&sysfs.join(f)) {
            return Some(sanitize(&v));
        }
    }
    let target = device.canonicalize().ok()?;
    let mut names: Vec<String> = std::fs::read_dir("/dev/disk/by-id")
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().canonicalize().ok().as_ref() == Some(&target))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    // wwn- names are the most stable; then the longest (most specific).
    names.sort_by_key(|n| (!n.starts_with("wwn-"), std::cmp::Reverse(n.len())));
    names.first().map(|n| sanitize(n))
}

/// Maps characters outside the id alphabet to '_'.
fn sanitize(raw: &str) -> String {
    let s: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.chars().take(128).collect()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("disk.img");
        std::fs::write(&p, [0u8; 512]).expect("write");
        let err = open_disk(&DiskConfig {
            device: p.clone(),
            id: None,
        })
        .expect_err("not a block device");
        assert!(matches!(err, DiskError::NotBlockDevice { .. }));
        assert!(err.to_string().contains("disk.img"));
        let err = open_disk(&DiskConfig {
            device: dir.path().join("nope"),
            id: None,
        })
        .expect_err("missing");
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn ids_are_sanitized() {
        assert_eq!(sanitize("naa.6000c29 abc/1\n"), "naa.6000c29_abc_1");
        assert!(valid_id("naa.6000c29_abc_1"));
        assert!(!valid_id("../x"));
    }
}
