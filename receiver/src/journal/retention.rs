//! Which undo history stays: the retention window (`retention_hours`) and
//! the size cap (`retention_max_gib`). Both drop whole segments, oldest
//! first, and raise the disk's `history_from` in the registry so `points`
//! and `export` stop offering what can no longer be rebuilt. A disk's
//! newest point always stays: its segment is the one being written.
//!
//! Order on disk: segments are deleted before `history_from` is raised. A
//! crash in between leaves points listed whose history is gone; export
//! notices (it rechecks `history_from` and the segments it read, see
//! `export.rs`) and the next prune raises the boundary.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::points::Point;
use super::undo::{self, UndoError};
use crate::registry::{Registry, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Undo(#[from] UndoError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// History dropped from one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub disk: String,
    /// Oldest point still recoverable.
    pub keep_from: u64,
    pub freed_bytes: u64,
}

/// Ids of the points covering `disk`, ascending.
fn disk_points(points: &[Point], disk: &str) -> Vec<u64> {
    let mut ids: Vec<u64> = points
        .iter()
        .filter(|p| p.disks.iter().any(|d| d == disk))
        .map(|p| p.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// The oldest point of `disk` recorded at or after `cutoff`; the newest
/// point when all are older (it always stays).
pub fn window_start(points: &[Point], disk: &str, cutoff: OffsetDateTime) -> Option<u64> {
    let newest = disk_points(points, disk).last().copied()?;
    let oldest_inside = points
        .iter()
        .filter(|p| p.disks.iter().any(|d| d == disk))
        .filter(|p| OffsetDateTime::parse(&p.recorded_at, &Rfc3339).is_ok_and(|t| t >= cutoff))
        .map(|p| p.id)
        .min();
    Some(oldest_inside.unwrap_or(newest).min(newest))
}

/// The start of the retention window `hours` long, now.
pub fn cutoff(hours: f64) -> OffsetDateTime {
    OffsetDateTime::now_utc() - time::Duration::seconds_f64(hours * 3600.0)
}

/// Deletes `disk`'s segments tagged below `keep_from`, then raises its
/// `history_from`. Returns the bytes freed.
pub fn prune_disk(
    retention_dir: &Path,
    registry: &Mutex<Registry>,
    disk: &str,
    keep_from: u64,
) -> Result<u64, RetentionError> {
    let freed = undo::remove_before(&undo::disk_dir(retention_dir, disk), keep_from)?;
    let mut reg = registry.lock().expect("registry lock");
    if let Some(mut e) = reg.get(disk).cloned() {
        if e.history_from < keep_from {
            e.history_from = keep_from;
            reg.put(disk, e)?;
        }
    }
    Ok(freed)
}

/// A disk's undo segments as `(tag, bytes)`, tags ascending.
type Segments = Vec<(u64, u64)>;

/// Every disk's undo segments. Only the disks in the registry count (their
/// directories are the journal).
fn journal(
    retention_dir: &Path,
    registry: &Mutex<Registry>,
) -> Result<Vec<(String, Segments)>, RetentionError> {
    let disks: Vec<String> = registry
        .lock()
        .expect("registry lock")
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    let mut out = Vec::new();
    for disk in disks {
        let dir = undo::disk_dir(retention_dir, &disk);
        let segs = undo::segments(&dir)?
            .into_iter()
            .map(|t| {
                // Allocated, not apparent, size: what the volume loses.
                let bytes =
                    std::fs::metadata(undo::segment_path(&dir, t)).map_or(0, |m| m.blocks() * 512);
                (t, bytes)
            })
            .collect();
        out.push((disk, segs));
    }
    Ok(out)
}

/// Total bytes of undo history on the retention volume.
pub fn journal_bytes(
    retention_dir: &Path,
    registry: &Mutex<Registry>,
) -> Result<u64, RetentionError> {
    Ok(journal(retention_dir, registry)?
        .iter()
        .flat_map(|(_, s)| s.iter().map(|(_, b)| b))
        .sum())
}

/// Brings the journal under `cap_bytes` by dropping the oldest segments of
/// any disk (segment tags are point ids, so the smallest tag is the oldest
/// history on the volume), never a disk's newest point, never a disk
/// `skip` names (one whose failover needs its journal). Returns what was
/// dropped, and whether the cap is met.
pub fn enforce_cap(
    retention_dir: &Path,
    registry: &Mutex<Registry>,
    points: &[Point],
    cap_bytes: u64,
    skip: impl Fn(&str) -> bool,
) -> Result<(Vec<Pruned>, bool), RetentionError> {
    let mut journal = journal(retention_dir, registry)?;
    let mut total: u64 = journal
        .iter()
        .flat_map(|(_, s)| s.iter().map(|(_, b)| b))
        .sum();
    let mut pruned: Vec<Pruned> = Vec::new();
    while total > cap_bytes {
        // The oldest segment that is not a disk's newest point's.
        let mut best: Option<(u64, usize, u64)> = None;
        for (i, (disk, segs)) in journal.iter().enumerate() {
            if skip(disk) {
                continue;
            }
            let ids = disk_points(points, disk);
            let Some(&(tag, _)) = segs.first() else {
                continue;
            };
            let Some(&next) = ids.iter().find(|&&id| id > tag) else {
                continue;
            };
            if best.is_none_or(|(t, _, _)| tag < t) {
                best = Some((tag, i, next));
            }
        }
        let Some((_, i, keep_from)) = best else {
            return Ok((pruned, false));
        };
        let disk = journal[i].0.clone();
        let freed = prune_disk(retention_dir, registry, &disk, keep_from)?;
        let gone: u64 = journal[i]
            .1
            .iter()
            .filter(|(t, _)| *t < keep_from)
            .map(|(_, b)| b)
            .sum();
        journal[i].1.retain(|(t, _)| *t >= keep_from);
        total = total.saturating_sub(gone);
        match pruned.iter_mut().find(|p| p.disk == disk) {
            Some(p) => {
                p.keep_from = keep_from;
                p.freed_bytes += freed;
            }
            None => pruned.push(Pruned {
                disk,
                keep_from,
                freed_bytes: freed,
            }),
        }
    }
    Ok((pruned, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::points::PointLog;
    use crate::registry::DiskEntry;
    use tidemark_common::proto::PointKind;

    fn entry(agent: &str) -> DiskEntry {
        DiskEntry {
            agent: agent.into(),
            image: "x.img".into(),
            format: None,
            size_bytes: 1 << 20,
            logical_block_bytes: 512,
            history_from: 0,
            sizes_before: Vec::new(),
        }
    }

    #[test]
    fn the_cap_drops_the_oldest_history_first_and_keeps_each_newest_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let retention = dir.path();
        let registry =
            Mutex::new(Registry::open(&retention.join("registry.json")).expect("registry"));
        for d in ["a", "b"] {
            registry
                .lock()
                .expect("lock")
                .put(d, entry("agent"))
                .expect("put");
        }
        let points_path = retention.join("points.jsonl");
        let mut log = PointLog::open(&points_path).expect("points");
        // Points 1..=4 cover a; 2 and 4 also b.
        for (i, disks) in [vec!["a"], vec!["a", "b"], vec!["a"], vec!["a", "b"]]
            .into_iter()
            .enumerate()
        {
            let p = log
                .append(
                    "agent",
                    PointKind::CrashConsistent,
                    "",
                    i as u64,
                    disks.into_iter().map(String::from).collect(),
                )
                .expect("append");
            assert_eq!(p.id, i as u64 + 1);
        }
        let points = super::super::points::read_all(&points_path).expect("read");
        let random: Vec<u8> = (0..1u32 << 16)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for (disk, tags) in [("a", vec![1u64, 2, 3, 4]), ("b", vec![2, 4])] {
            let mut u = undo::UndoLog::new(undo::disk_dir(retention, disk));
            for t in tags {
                u.append(t, 0, &random).expect("append");
            }
            u.sync().expect("sync");
        }
        let total = journal_bytes(retention, &registry).expect("size");
        let one = total / 6;
        // Room for four segments: a's 1 and b's 2 go (oldest tags first;
        // a's 2 ties b's 2 and a's goes first as a's 1 went).
        let (pruned, met) =
            enforce_cap(retention, &registry, &points, one * 4, |_| false).expect("cap");
        assert!(met);
        let left = |d: &str| undo::segments(&undo::disk_dir(retention, d)).expect("ls");
        assert_eq!(left("a"), vec![3, 4], "{pruned:?}");
        assert_eq!(left("b"), vec![2, 4], "{pruned:?}");
        assert_eq!(
            registry
                .lock()
                .expect("lock")
                .get("a")
                .expect("a")
                .history_from,
            3
        );
        // Nothing below each disk's newest point can satisfy a tiny cap:
        // it stops there and says so; a skipped disk keeps everything.
        let (_, met) = enforce_cap(retention, &registry, &points, 1, |d| d == "b").expect("cap");
        assert!(!met);
        assert_eq!(left("a"), vec![4]);
        assert_eq!(left("b"), vec![2, 4]);
    }
}
