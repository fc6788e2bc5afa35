//! Thinning, as the peers do it: every point of the last `keep_all_hours`
//! stays; older ones are kept one per `keep_one_per_minutes` slot (the
//! newest app-consistent point of the slot, else its newest point), the
//! rest are forgotten. Forgetting point P folds P's undo segment into the
//! previous kept point's ([`undo::fold_into`]), so every other point
//! rebuilds exactly as before and pre-images the older segment already
//! holds are dropped, then records P in `thinned.json` so `points` and
//! `export` no longer offer it, then deletes P's segment. A crash between
//! the steps is repaired by running them again (see `fold_into`).
//!
//! Never thinned: a disk's newest point, its oldest recoverable point (the
//! window's edge, which pruning moves), and points of a disk with a
//! failover record.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_common::proto::PointKind;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::points::Point;
use super::undo::{self, UndoError};

/// `[thinning]` in receiver.toml.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thinning {
    /// Points younger than this are all kept.
    pub keep_all_hours: f64,
    /// Older points: one kept per slot of this many minutes.
    pub keep_one_per_minutes: f64,
}

impl Thinning {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.keep_all_hours >= 0.0 && self.keep_all_hours.is_finite()) {
            return Err(format!(
                "thinning.keep_all_hours = {} must be 0 or more hours",
                self.keep_all_hours
            ));
        }
        if !(self.keep_one_per_minutes > 0.0 && self.keep_one_per_minutes.is_finite()) {
            return Err(format!(
                "thinning.keep_one_per_minutes = {} must be above 0 (minutes between the older points kept)",
                self.keep_one_per_minutes
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ThinningError {
    #[error("cannot read {}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("cannot write {}", path.display())]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Undo(#[from] UndoError),
}

fn path(retention_dir: &Path) -> PathBuf {
    retention_dir.join("thinned.json")
}

/// Ids of the thinned points.
pub fn load(retention_dir: &Path) -> Result<BTreeSet<u64>, ThinningError> {
    let p = path(retention_dir);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| ThinningError::Load {
            path: p,
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(ThinningError::Load {
            path: p,
            message: e.to_string(),
        }),
    }
}

fn save(retention_dir: &Path, ids: &BTreeSet<u64>) -> Result<(), ThinningError> {
    let p = path(retention_dir);
    let text = serde_json::to_vec(ids).expect("ids serialize");
    tidemark_common::durable::write_atomic(&p, &text, 0o644)
        .map_err(|source| ThinningError::Save { path: p, source })
}

fn unix_secs(p: &Point) -> Option<i64> {
    OffsetDateTime::parse(&p.recorded_at, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Which points to forget now. `points` are every point; `disks` the disks
/// whose points may be thinned, each with its oldest recoverable point id;
/// a point is only a candidate if all its disks are among them.
pub fn choose(
    policy: &Thinning,
    points: &[Point],
    disks: &[(String, u64)],
    thinned: &BTreeSet<u64>,
    now: OffsetDateTime,
) -> Vec<u64> {
    let edge = (now - time::Duration::seconds_f64(policy.keep_all_hours * 3600.0)).unix_timestamp();
    let slot_secs = (policy.keep_one_per_minutes * 60.0).max(1.0);
    let from = |d: &str| disks.iter().find(|(id, _)| id == d).map(|(_, f)| *f);
    let visible = |p: &Point, d: &str| {
        p.disks.iter().any(|x| x == d)
            && !thinned.contains(&p.id)
            && from(d).is_some_and(|f| p.id >= f)
    };
    // A disk's oldest and newest visible points stay whatever the slots say.
    let mut pinned: BTreeSet<u64> = BTreeSet::new();
    for (d, _) in disks {
        let ids: Vec<u64> = points
            .iter()
            .filter(|p| visible(p, d))
            .map(|p| p.id)
            .collect();
        pinned.extend(ids.first());
        pinned.extend(ids.last());
    }
    let old: Vec<(&Point, i64)> = points
        .iter()
        .filter(|p| !thinned.contains(&p.id) && !p.disks.is_empty())
        .filter(|p| p.disks.iter().all(|d| visible(p, d)))
        .filter_map(|p| unix_secs(p).map(|t| (p, t)))
        .filter(|(_, t)| *t < edge)
        .collect();
    let slot = |t: i64| (t as f64 / slot_secs).floor() as i64;
    let mut out = Vec::new();
    for (p, t) in &old {
        let s = slot(*t);
        let in_slot = old.iter().filter(|(_, u)| slot(*u) == s);
        let app = in_slot
            .clone()
            .filter(|(q, _)| q.kind == PointKind::AppConsistent)
            .map(|(q, _)| q.id)
            .max();
        let keeper = app.or_else(|| in_slot.map(|(q, _)| q.id).max());
        if keeper != Some(p.id) && !pinned.contains(&p.id) {
            out.push(p.id);
        }
    }
    out.sort_unstable();
    out
}

/// Forgets `ids` (ascending, from [`choose`]) for the disks given with
/// their oldest recoverable point: folds each point's segment into the
/// previous visible point's, records it as thinned, then deletes its
/// segment. Returns the undo bytes freed.
pub fn thin(
    retention_dir: &Path,
    points: &[Point],
    disks: &[(String, u64)],
    ids: &[u64],
) -> Result<u64, ThinningError> {
    let mut thinned = load(retention_dir)?;
    let mut freed = 0u64;
    // Segments of points thinned before a crash cut the removal short.
    for (d, _) in disks {
        let dir = undo::disk_dir(retention_dir, d);
        for t in undo::segments(&dir)? {
            if thinned.contains(&t) {
                undo::remove(&dir, t)?;
            }
        }
    }
    for &id in ids {
        let Some(p) = points.iter().find(|p| p.id == id) else {
            continue;
        };
        let mut folded = Vec::new();
        for d in &p.disks {
            let Some(&(_, from)) = disks.iter().find(|(x, _)| x == d) else {
                continue;
            };
            let prev = points
                .iter()
                .filter(|q| q.id < id && q.id >= from && !thinned.contains(&q.id))
                .filter(|q| q.disks.iter().any(|x| x == d))
                .map(|q| q.id)
                .max();
            let Some(prev) = prev else {
                // The disk's oldest point: `choose` never picks it.
                continue;
            };
            let dir = undo::disk_dir(retention_dir, d);
            let size = |t: u64| {
                std::fs::metadata(dir.join(format!("{t:020}.undo"))).map_or(0, |m| m.len())
            };
            let before = size(id);
            let kept = undo::fold_into(&dir, prev, id)?;
            freed += before.saturating_sub(kept);
            folded.push(dir);
        }
        thinned.insert(id);
        save(retention_dir, &thinned)?;
        for dir in folded {
            undo::remove(&dir, id)?;
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: u64, mins_ago: i64, kind: PointKind, now: OffsetDateTime) -> Point {
        Point {
            id,
            machine: "m".into(),
            kind,
            name: String::new(),
            agent_time_ms: 0,
            recorded_at: (now - time::Duration::minutes(mins_ago))
                .format(&Rfc3339)
                .expect("format"),
            disks: vec!["d".into()],
        }
    }

    #[test]
    fn one_point_per_slot_survives_app_consistent_first() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time");
        let crash = PointKind::CrashConsistent;
        let app = PointKind::AppConsistent;
        // Minutes ago: 1-5 in the oldest hour slot(s), then recent ones.
        let points: Vec<Point> = [
            (1, 300, crash),
            (2, 290, crash),
            (3, 280, app),
            (4, 270, crash),
            (5, 200, crash),
            (6, 195, crash),
            (7, 30, crash),
            (8, 10, crash),
        ]
        .into_iter()
        .map(|(id, m, k)| point(id, m, k, now))
        .collect();
        let policy = Thinning {
            keep_all_hours: 1.0,
            keep_one_per_minutes: 60.0,
        };
        let disks = vec![("d".to_owned(), 1)];
        let chosen = choose(&policy, &points, &disks, &BTreeSet::new(), now);
        // 1 is the oldest (pinned); 3 is its slot's app-consistent keeper;
        // 5 and 6 share a slot and 6 is the newer; 7, 8 are recent.
        for keep in [1, 3, 6, 7, 8] {
            assert!(!chosen.contains(&keep), "{keep} thinned: {chosen:?}");
        }
        assert!(
            chosen.contains(&2) && chosen.contains(&4) && chosen.contains(&5),
            "{chosen:?}"
        );
        // Points of a disk not offered are never chosen.
        assert!(choose(&policy, &points, &[], &BTreeSet::new(), now).is_empty());
    }
}
