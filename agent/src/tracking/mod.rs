//! Change tracking from user space, without a kernel module: a private
//! tracefs instance records the block layer's completion events for the
//! protected disks, and the agent drains its per-CPU binary pipes into
//! dirty maps. The facts this relies on (filter syntax, page layout, loss
//! signals, event-before-visibility ordering) were measured on the target
//! kernel and are written down in CBT.md.
//!
//! - [`tracefs`]: the instance (creation, reuse across agent restarts,
//!   verification) and the drain.
//! - [`format`]: event ids and field offsets from the `format` files.
//! - [`page`]: the pure decoder of one ring-buffer page.
//! - [`stats`]: the per-CPU loss counters.
//! - [`bitmap`]: the dirty map and its persisted form.

mod bitmap;
pub mod format;
mod lock;
pub mod page;
mod stats;
mod tracefs;

use std::ops::Range;
use std::path::{Path, PathBuf};

pub use bitmap::{
    granularity_for, DirtyMap, DEFAULT_GRANULARITY_BYTES, MAX_MAP_BYTES, MIN_GRANULARITY_BYTES,
};
pub use lock::InstanceLock;
pub use tracefs::{Tracker, TRACEFS_ROOT};

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("tracefs is not mounted at {TRACEFS_ROOT} and mounting it failed (mount -t tracefs nodev {TRACEFS_ROOT})")]
    NoTracefs(#[source] std::io::Error),
    #[error("trace instance name {name:?} is not a single path component")]
    BadInstanceName { name: String },
    #[error("cannot create trace instance {}", path.display())]
    CreateInstance {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {}", path.display())]
    WriteControl {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot read trace control file {}", path.display())]
    ReadControl {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read event description {}", path.display())]
    ReadFormat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event description {}: {message}", path.display())]
    BadFormat { path: PathBuf, message: String },
    #[error("cannot open {}", path.display())]
    OpenPipe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read trace pipe {}", path.display())]
    ReadPipe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove trace instance {}", path.display())]
    RemoveInstance {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace instance {instance} is in use by another tidemark-agent (pid {pid}, lock {}): stop that agent first (two agents on one instance each see part of the writes and resync without end)", path.display())]
    InUse {
        instance: String,
        pid: String,
        path: PathBuf,
    },
    #[error("cannot take the agent's lock {}", path.display())]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A disk to track, as the block layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDisk {
    /// The caller's disk index: where this disk's results go in [`Drained`].
    pub index: usize,
    /// The whole disk's device number. Events carry it, also for writes
    /// through a partition, so the filter is on it.
    pub major: u32,
    pub minor: u32,
    /// For a partition: its start and length in 512-byte sectors on the
    /// whole disk. Events are clipped to it and shifted so that offsets are
    /// relative to the partition. `None` for a whole disk.
    pub partition: Option<(u64, u64)>,
    /// Size of what the caller tracks (the partition or the disk); ranges
    /// are clipped to it.
    pub size_bytes: u64,
    /// Bio-based devices (zram, device-mapper, md, brd) trace
    /// `block_bio_complete`; blk-mq devices `block_rq_complete` (CBT.md §1).
    pub bio_based: bool,
}

impl TrackedDisk {
    /// The dev_t the kernel's tracepoints carry: `MKDEV` is
    /// `major << 20 | minor`, not glibc's `makedev`.
    pub fn kernel_dev(&self) -> u32 {
        (self.major << 20) | self.minor
    }

    /// Reads `/sys/dev/block/MAJ:MIN` of a disk or a partition.
    ///
    /// A partition is recognised by its `partition` file; its `start` and
    /// `size` (sectors) are read, and the whole disk is its parent
    /// directory. The disk is blk-mq when `/sys/block/<disk>/mq` exists (the
    /// block layer creates it for every request-based queue:
    /// `blk_mq_sysfs_register`); bio-based drivers have none — zram, dm,
    /// md and brd, none of which emit `block_rq_complete`.
    pub fn from_sysfs(
        index: usize,
        sysfs_dev_dir: &Path,
        size_bytes: u64,
    ) -> std::io::Result<TrackedDisk> {
        let dir = sysfs_dev_dir.canonicalize()?;
        let (whole, partition) = if dir.join("partition").exists() {
            let start = read_u64(&dir.join("start"))?;
            let len = read_u64(&dir.join("size"))?;
            let parent = dir
                .parent()
                .ok_or_else(|| invalid(format!("partition {} has no parent disk", dir.display())))?
                .to_path_buf();
            (parent, Some((start, len)))
        } else {
            (dir, None)
        };
        let dev_file = whole.join("dev");
        let dev = std::fs::read_to_string(&dev_file)?;
        let (major, minor) = dev
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| invalid(format!("{}: bad device number {dev:?}", dev_file.display())))?;
        Ok(TrackedDisk {
            index,
            major,
            minor,
            partition,
            size_bytes,
            bio_based: !whole.join("mq").is_dir(),
        })
    }

    /// Maps an event's sector range on the whole disk to a byte range of
    /// what is tracked (shifted into and clipped to a partition, clipped to
    /// the size), if it touches it.
    fn byte_range(&self, sector: u64, nr_sector: u32) -> Option<Range<u64>> {
        let (start, end) = (sector, sector.saturating_add(u64::from(nr_sector)));
        let (start, end) = match self.partition {
            Some((p_start, p_len)) => {
                let s = start.max(p_start);
                let e = end.min(p_start.saturating_add(p_len));
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

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn read_u64(path: &Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    text.trim()
        .parse()
        .map_err(|e| invalid(format!("{}: {text:?}: {e}", path.display())))
}

/// What one drain saw.
#[derive(Debug, Default)]
pub struct Drained {
    /// Per disk index: byte ranges written, discarded or zeroed, relative
    /// to the disk or partition and clipped to its size, in event
    /// (timestamp) order across all CPUs.
    pub ranges: Vec<Vec<Range<u64>>>,
    /// Per disk index: total sectors of the events on its whole disk's
    /// devt (before partition clipping), to audit against
    /// [`disk_counters`].
    pub sectors_seen: Vec<u64>,
    /// Events were lost since the previous drain (or, on a reused
    /// instance, while the agent was down), and how we know.
    pub lost: Option<String>,
    /// Block completion events decoded (for every disk).
    pub events: u64,
}

/// The block layer's (write sectors, discard sectors) counters: fields 7
/// and 14 of `stat` (Documentation/block/stat.rst). For a partition these
/// are its whole disk's, the scope [`Drained::sectors_seen`] counts in.
/// Write-zeroes counts as a write (CBT.md §8).
pub fn disk_counters(sysfs_dev_dir: &Path) -> std::io::Result<(u64, u64)> {
    let dir = sysfs_dev_dir.canonicalize()?;
    let dir = match dir.parent() {
        Some(parent) if dir.join("partition").exists() => parent.to_path_buf(),
        _ => dir,
    };
    let path = dir.join("stat");
    let text = std::fs::read_to_string(&path)?;
    parse_stat(&text)
        .ok_or_else(|| invalid(format!("{}: unexpected content {text:?}", path.display())))
}

/// Fields 7 and 14 of a `stat` line.
fn parse_stat(text: &str) -> Option<(u64, u64)> {
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((*fields.get(6)?, *fields.get(13)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(partition: Option<(u64, u64)>, size_bytes: u64) -> TrackedDisk {
        TrackedDisk {
            index: 0,
            major: 7,
            minor: 1,
            partition,
            size_bytes,
            bio_based: false,
        }
    }

    #[test]
    fn partition_events_are_clipped_and_shifted() {
        let d = disk(Some((2048, 4096)), 4096 * 512);
        assert_eq!(d.kernel_dev(), (7 << 20) | 1);
        assert_eq!(d.byte_range(2056, 8), Some(8 * 512..16 * 512));
        assert_eq!(d.byte_range(0, 2048), None);
        assert_eq!(d.byte_range(2040, 16), Some(0..8 * 512));
        assert_eq!(d.byte_range(6140, 100), Some(4092 * 512..4096 * 512));
        assert_eq!(d.byte_range(6144, 8), None);
    }

    #[test]
    fn whole_disk_events_are_clipped_to_the_size() {
        let d = disk(None, 1 << 20);
        assert_eq!(d.byte_range(80, 8), Some(40960..45056));
        assert_eq!(d.byte_range(2047, 8), Some(2047 * 512..1 << 20));
        assert_eq!(d.byte_range(2048, 8), None);
        assert_eq!(d.byte_range(u64::MAX, 8), None);
    }

    #[test]
    fn stat_fields() {
        let line = "     313        0    16026      101      313        0   526576      233        0      392      335       12        0   131072        1        7        3\n";
        assert_eq!(parse_stat(line), Some((526576, 131072)));
        assert_eq!(parse_stat("1 2 3"), None);
        assert_eq!(parse_stat("1 2 3 4 5 6 x 8 9 10 11 12 13 14"), None);
    }
}
