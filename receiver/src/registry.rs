//! The persistent table of protected disks: which agent owns each disk id,
//! where its image is, and which recovery point the image currently equals.
//! Stored as one JSON file on the retention volume, replaced atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_common::durable::write_atomic;

use crate::image::live::ImageFormat;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read disk registry {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk registry {} is damaged ({message}); restore it from backup or move it aside to re-register all disks", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("cannot write disk registry {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ReassignError {
    #[error(
        "disk {0:?} is not registered on this receiver; `tidemark-receiver status` lists its disks"
    )]
    UnknownDisk(String),
    #[error(transparent)]
    Registry(RegistryError),
}

/// A done reassignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassigned {
    /// The previous owner.
    pub from: String,
    /// Oldest point id still exportable for the disk.
    pub history_from: u64,
}

/// One protected disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Name of the agent (certificate CN) that owns the disk.
    pub agent: String,
    /// Image file name, relative to the image directory (for a flat VMDK
    /// its data file).
    pub image: String,
    /// The image's format; absent in registries written before formats
    /// were recorded (see [`DiskEntry::format`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// Size the agent registered, in bytes.
    pub size_bytes: u64,
    pub logical_block_bytes: u32,
    /// Points older than this id can no longer be reconstructed: their
    /// undo history was pruned.
    #[serde(default)]
    pub history_from: u64,
    /// The sizes the disk had before it grew, oldest first: points up to
    /// `through_point` export at `size_bytes` of the first entry that
    /// covers them, later points at the entry's own `size_bytes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sizes_before: Vec<SizeBefore>,
}

/// The size a disk had up to a point, before it grew.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SizeBefore {
    pub through_point: u64,
    pub size_bytes: u64,
}

impl DiskEntry {
    /// The disk's size at point `id`: a point is exported as large as the
    /// disk was when it was taken, so a machine recovered to it sees the
    /// disk it had (its partition table and filesystems agree with it).
    pub fn size_at(&self, id: u64) -> u64 {
        self.sizes_before
            .iter()
            .find(|s| id <= s.through_point)
            .map_or(self.size_bytes, |s| s.size_bytes)
    }

    pub fn format(&self) -> ImageFormat {
        self.format
            .unwrap_or_else(|| ImageFormat::infer(&self.image))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    disks: BTreeMap<String, DiskEntry>,
}

pub struct Registry {
    path: PathBuf,
    file: RegistryFile,
}

impl Registry {
    /// Opens the registry; a missing file is an empty registry.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RegistryError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryFile::default(),
            Err(source) => {
                return Err(RegistryError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Registry {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn get(&self, disk_id: &str) -> Option<&DiskEntry> {
        self.file.disks.get(disk_id)
    }

    pub fn len(&self) -> usize {
        self.file.disks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.file.disks.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &DiskEntry)> {
        self.file.disks.iter()
    }

    /// Inserts or replaces an entry and makes it durable. On error the
    /// in-memory table is left as it was on disk.
    pub fn put(&mut self, disk_id: &str, entry: DiskEntry) -> Result<(), RegistryError> {
        let old = self.file.disks.insert(disk_id.to_owned(), entry);
        if let Err(e) = self.save() {
            match old {
                Some(o) => self.file.disks.insert(disk_id.to_owned(), o),
                None => self.file.disks.remove(disk_id),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Moves a disk to another agent (`tidemark-receiver reassign`). Points
    /// taken before now stop being exportable for this disk: the new owner's
    /// writes are journaled under its own points, not under the old owner's
    /// (`newest_point` is the newest of the writing agent), so the older
    /// points could not be reconstructed exactly any more.
    pub fn reassign(
        &mut self,
        disk_id: &str,
        agent: &str,
        newest_point: Option<u64>,
    ) -> Result<Reassigned, ReassignError> {
        let Some(mut entry) = self.get(disk_id).cloned() else {
            return Err(ReassignError::UnknownDisk(disk_id.to_owned()));
        };
        let from = std::mem::replace(&mut entry.agent, agent.to_owned());
        if from == agent {
            return Ok(Reassigned {
                from,
                history_from: entry.history_from,
            });
        }
        if let Some(p) = newest_point {
            entry.history_from = entry.history_from.max(p + 1);
        }
        let history_from = entry.history_from;
        self.put(disk_id, entry).map_err(ReassignError::Registry)?;
        Ok(Reassigned { from, history_from })
    }

    /// Whether some registered disk belongs to `agent`.
    pub fn has_agent(&self, agent: &str) -> bool {
        self.file.disks.values().any(|e| e.agent == agent)
    }

    fn save(&self) -> Result<(), RegistryError> {
        let mut bytes = serde_json::to_vec_pretty(&self.file).expect("registry serializes");
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes, 0o644).map_err(|source| RegistryError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Disk ids become file names: keep them to a safe alphabet.
pub fn validate_disk_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk id {id:?} is not valid: use 1-128 letters, digits, '.', '_', ':', '-' (not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(agent: &str) -> DiskEntry {
        DiskEntry {
            agent: agent.into(),
            image: "d.img".into(),
            format: None,
            size_bytes: 1 << 20,
            logical_block_bytes: 512,
            history_from: 0,
            sizes_before: Vec::new(),
        }
    }

    #[test]
    fn points_before_a_growth_keep_their_size() {
        let mut e = entry("web");
        e.size_bytes = 8 << 20;
        e.sizes_before = vec![
            SizeBefore {
                through_point: 3,
                size_bytes: 1 << 20,
            },
            SizeBefore {
                through_point: 9,
                size_bytes: 4 << 20,
            },
        ];
        assert_eq!(e.size_at(1), 1 << 20);
        assert_eq!(e.size_at(3), 1 << 20);
        assert_eq!(e.size_at(4), 4 << 20);
        assert_eq!(e.size_at(9), 4 << 20);
        assert_eq!(e.size_at(10), 8 << 20);
        let json = serde_json::to_string(&entry("web")).expect("json");
        assert!(!json.contains("sizes_before"), "{json}");
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("registry.json");
        let mut r = Registry::open(&p).expect("open");
        let mut e = entry("web");
        e.history_from = 7;
        r.put("disk-a", e).expect("put");
        let r = Registry::open(&p).expect("reopen");
        assert_eq!(r.get("disk-a").map(|e| e.history_from), Some(7));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn failed_save_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Registry::open(&dir.path().join("missing-dir/registry.json")).expect("open");
        assert!(r.put("disk-a", entry("web")).is_err());
        assert!(r.get("disk-a").is_none());
    }

    #[test]
    fn reassign_moves_the_disk_and_cuts_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("registry.json");
        let mut r = Registry::open(&p).expect("open");
        r.put("disk-a", entry("web")).expect("put");
        assert!(matches!(
            r.reassign("disk-x", "db", None),
            Err(ReassignError::UnknownDisk(_))
        ));
        let done = r.reassign("disk-a", "db", Some(41)).expect("reassign");
        assert_eq!(done.from, "web");
        assert_eq!(done.history_from, 42);
        let r = Registry::open(&p).expect("reopen");
        assert_eq!(r.get("disk-a").map(|e| e.agent.as_str()), Some("db"));
        assert!(r.has_agent("db") && !r.has_agent("web"));
    }

    #[test]
    fn disk_ids_are_restricted() {
        assert!(validate_disk_id("6000c2912345678abcdef").is_ok());
        assert!(validate_disk_id("scsi-0QEMU_disk:1").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "sp ace"] {
            assert!(validate_disk_id(bad).is_err(), "{bad:?}");
        }
    }
}
