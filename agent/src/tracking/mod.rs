//! Change tracking from user space: a private tracefs instance records the
//! block layer's completion events for the protected disks; the agent
//! drains its per-CPU binary pipes into dirty maps. Facts this relies on
//! (filter syntax, page layout, loss signals, ordering) are in CBT.md.

mod bitmap;
mod format;
mod page;
mod tracefs;

use std::ops::Range;
use std::path::Path;

pub use bitmap::{granularity_for, DirtyMap};
pub use tracefs::{Tracker, TRACEFS_ROOT};

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("tracefs is not available at {TRACEFS_ROOT} (mount it with `mount -t tracefs nodev {TRACEFS_ROOT}`)")]
    NoTracefs,
    #[error("cannot create trace instance {}", path.display())]
    CreateInstance {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {}", path.display())]
    WriteControl {
        path: std::path::PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    ReadControl {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("event format {}: {message}", path.display())]
    BadFormat {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot open {}", path.display())]
    OpenPipe {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    ReadPipe {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove trace instance {}", path.display())]
    RemoveInstance {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A disk to track, as the block layer sees it.
#[derive(Debug, Clone)]
pub struct TrackedDisk {
    /// The caller's disk index.
    pub index: usize,
    /// The whole disk's device number (events carry it, even for partitions).
    pub major: u32,
    pub minor: u32,
    /// For a partition: its start and length in sectors on the whole disk.
    pub partition: Option<(u64, u64)>,
    pub size_bytes: u64,
    /// Bio-based devices (zram, dm, md) complete bios, not requests.
    pub bio_based: bool,
}

impl TrackedDisk {
    /// The kernel's dev_t (major << 20 | minor) that events carry.
    pub fn kernel_dev(&self) -> u32 {
        (self.major << 20) | self.minor
    }

    /// Reads `/sys/dev/block/MAJ:MIN` (a disk or a partition).
    pub fn from_sysfs(
        index: usize,
        sysfs_dev_dir: &Path,
        size_bytes: u64,
    ) -> std::io::Result<TrackedDisk> {
        let dir = sysfs_dev_dir.canonicalize()?;
        let read = |p: &Path, f: &str| -> std::io::Result<String> {
            Ok(std::fs::read_to_string(p.join(f))?.trim().to_owned())
        };
        let (whole, partition) = if dir.join("partition").exists() {
            let start: u64 = read(&dir, "start")?
                .parse()
                .map_err(|e| invalid(format!("partition start: {e}")))?;
            let len: u64 = read(&dir, "size")?
                .parse()
                .map_err(|e| invalid(format!("partition size: {e}")))?;
            let parent = dir
                .parent()
                .ok_or_else(|| invalid("partition without a parent disk"))?
                .to_path_buf();
            (parent, Some((start, len)))
        } else {
            (dir, None)
        };
        let dev = read(&whole, "dev")?;
        let (major, minor) = dev
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| invalid(format!("bad dev {dev:?}")))?;
        Ok(TrackedDisk {
            index,
            major,
            minor,
            partition,
            size_bytes,
            // blk-mq disks have an `mq` directory; bio-based ones do not.
            bio_based: !whole.join("mq").exists(),
        })
    }

    /// Maps an event's sector range on the whole disk to a byte range of
    /// this disk (clipped to a partition), if it touches it.
    fn byte_range(&self, sector: u64, nr_sector: u32) -> Option<Range<u64>> {
        let (start, end) = (sector, sector.saturating_add(u64::from(nr_sector)));
        let (start, end) = match self.partition {
            Some((p_start, p_len)) => {
                let s = start.max(p_start);
                let e = end.min(p_start + p_len);
                if s >= e {
                    return None;
                }
                (s - p_start, e - p_start)
            }
            None => (start, end),
        };
        let r = start.saturating_mul(512)..end.saturating_mul(512).min(self.size_bytes);
        (r.start < r.end).then_some(r)
    }
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// What one drain saw.
#[derive(Debug, Default)]
pub struct Drained {
    /// Per disk index: byte ranges written, discarded or zeroed.
    pub ranges: Vec<Vec<Range<u64>>>,
    /// Per disk index: sectors of all events on its whole disk, to audit
    /// against the block layer's write + discard counters.
    pub sectors_seen: Vec<u64>,
    /// Events were lost since the previous drain, and how we know.
    pub lost: Option<String>,
    pub events: u64,
}

/// The block layer's (write sectors, discard sectors) for a disk or, for a
/// partition, its whole disk: fields 7 and 14 of `stat`.
pub fn disk_counters(sysfs_dev_dir: &Path) -> std::io::Result<(u64, u64)> {
    let dir = sysfs_dev_dir.canonicalize()?;
    let dir = if dir.join("partition").exists() {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    };
    let text = std::fs::read_to_string(dir.join("stat"))?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| f.get(i).copied().unwrap_or(0);
    Ok((field(6), field(13)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_events_are_clipped_and_shifted() {
        let d = TrackedDisk {
            index: 0,
            major: 7,
            minor: 1,
            partition: Some((2048, 4096)),
            size_bytes: 4096 * 512,
            bio_based: false,
        };
        assert_eq!(d.kernel_dev(), (7 << 20) | 1);
        assert_eq!(d.byte_range(2056, 8), Some(8 * 512..16 * 512));
        assert_eq!(d.byte_range(0, 2048), None);
        assert_eq!(d.byte_range(2040, 16), Some(0..8 * 512));
        assert_eq!(d.byte_range(6140, 100), Some(4092 * 512..4096 * 512));
    }
}
