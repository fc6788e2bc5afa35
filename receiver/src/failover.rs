//! Failover at the receiver: roll a disk's live image back to a point (and
//! undo that), commit the result as the disk of record, and let the disk
//! be protected again. Each runs as its own command while `serve` runs.
//!
//! State lives on the retention volume:
//! - `failover/<disk>.json`: the disk's failover record. While it says
//!   rolled back or committed, `serve` refuses replication of the disk.
//! - `locks/<disk>.lock`: flock'd by a session while it replicates the
//!   disk and by these commands while they change the image, so the two
//!   never write at once.
//! - `undo/<disk>/rollback/`: what a rollback overwrote (undo-journal
//!   records of the pre-rollback image), complete before the image is
//!   touched, so the rollback itself can be undone until `commit`.
//!
//! Crash safety: the record says "rolling back" before anything changes;
//! the saved pre-rollback data is written under `rollback.partial/` and
//! renamed to `rollback/` once synced. A rerun after a crash rebuilds an
//! incomplete save (the image was not touched yet) or re-applies the
//! rollback from the complete one (applying undo records is idempotent).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::ReceiverConfig;
use crate::export::resolve_point;
use crate::image::{live, Image};
use crate::journal::points::{now_rfc3339, read_all, Point};
use crate::journal::undo::{self, UndoLog};
use crate::registry::{DiskEntry, Registry};

/// How long a command waits for a live session to notice the failover
/// and let go of the disk: agents heartbeat every 10 s, and every
/// heartbeat makes the session look.
const LOCK_WAIT: Duration = Duration::from_secs(45);
/// Undo records are read back and applied one at a time; this bounds a
/// saved pre-rollback piece.
const PIECE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// A rollback started and may not have finished: rerun it.
    RollingBack,
    /// The live image equals `point`; the newer data is kept until commit.
    RolledBack,
    /// The image is the disk of record; its history before `history_from`
    /// is gone. Replication stays refused until `reprotect`.
    Committed,
    /// Protected again after a commit; only `history_from` still matters.
    Reprotected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub state: State,
    /// The agent whose replication was stopped.
    pub agent: String,
    pub point: u64,
    /// Points before this id cannot be exported any more (after commit).
    #[serde(default)]
    pub history_from: u64,
    pub at: String,
}

impl Record {
    /// True while the disk must not be written by replication.
    pub fn blocks_replication(&self) -> bool {
        matches!(
            self.state,
            State::RollingBack | State::RolledBack | State::Committed
        )
    }

    /// One line for logs and refusals.
    pub fn describe(&self, disk: &str) -> String {
        match self.state {
            State::RollingBack => format!("disk {disk} is being failed over at this receiver (rolled back to point {}); replication stays refused until `tidemark-receiver rollback --undo`, or `commit` and then `reprotect`", self.point),
            State::RolledBack => format!("disk {disk} was failed over at this receiver (rolled back to point {} at {}); replication stays refused until `tidemark-receiver rollback --undo`, or `commit` and then `reprotect`", self.point, self.at),
            State::Committed => format!("disk {disk} was failed over and committed at point {} ({}); replication stays refused until `tidemark-receiver reprotect`", self.point, self.at),
            State::Reprotected => format!("disk {disk} was committed at point {} and is protected again", self.point),
        }
    }
}

pub fn record_path(config: &ReceiverConfig, disk: &str) -> PathBuf {
    config
        .retention_dir
        .join("failover")
        .join(format!("{disk}.json"))
}

/// The disk's failover record, if it has one.
pub fn load(config: &ReceiverConfig, disk: &str) -> anyhow::Result<Option<Record>> {
    let path = record_path(config, disk);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
            format!(
                "failover record {} is damaged; restore it or remove it if the disk is not failed over",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save(config: &ReceiverConfig, disk: &str, rec: &Record) -> anyhow::Result<()> {
    let path = record_path(config, disk);
    let dir = path.parent().expect("record path has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut json = serde_json::to_vec_pretty(rec).expect("record serializes");
    json.push(b'\n');
    tidemark_common::durable::write_atomic(&path, &json, 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn remove_record(config: &ReceiverConfig, disk: &str) -> anyhow::Result<()> {
    let path = record_path(config, disk);
    match std::fs::remove_file(&path) {
        Ok(()) => tidemark_common::durable::sync_dir(path.parent().expect("has a directory"))
            .with_context(|| format!("cannot sync {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// An exclusive hold on one disk: replication or a failover command. The
/// flock goes with the open file, so a crashed holder holds nothing.
pub struct DiskLock {
    _guard: nix::fcntl::Flock<File>,
}

fn lock_path(retention_dir: &Path, disk: &str) -> PathBuf {
    retention_dir.join("locks").join(format!("{disk}.lock"))
}

/// Takes the disk's lock if nobody holds it (Ok(None) if someone does).
pub fn try_lock(retention_dir: &Path, disk: &str) -> std::io::Result<Option<DiskLock>> {
    let path = lock_path(retention_dir, disk);
    std::fs::create_dir_all(path.parent().expect("lock path has a directory"))?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(guard) => Ok(Some(DiskLock { _guard: guard })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Waits until live sessions let go of the disk.
fn lock_waiting(config: &ReceiverConfig, disk: &str) -> anyhow::Result<DiskLock> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut said = false;
    loop {
        if let Some(l) = try_lock(&config.retention_dir, disk)
            .with_context(|| format!("cannot lock disk {disk} on the retention volume"))?
        {
            return Ok(l);
        }
        if Instant::now() >= deadline {
            bail!("disk {disk} is still held by a replication session after {LOCK_WAIT:?}; stop the agent on the protected machine (systemctl stop tidemark-agent) and retry");
        }
        if !said {
            info!("waiting for the live replication session of disk {disk} to stop");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn entry(config: &ReceiverConfig, disk: &str) -> anyhow::Result<DiskEntry> {
    let registry = Registry::open(&config.registry_path())?;
    registry.get(disk).cloned().ok_or_else(|| {
        anyhow::anyhow!("unknown disk {disk:?}; list disks with `tidemark-receiver points`")
    })
}

fn rollback_dir(config: &ReceiverConfig, disk: &str, partial: bool) -> PathBuf {
    undo::disk_dir(&config.retention_dir, disk).join(if partial {
        "rollback.partial"
    } else {
        "rollback"
    })
}

/// Every undo record newer than `point`, newest first: applying them in
/// this order leaves each byte as it was at the point.
fn records_since(
    config: &ReceiverConfig,
    disk: &str,
    point: u64,
) -> anyhow::Result<Vec<undo::Record>> {
    let dir = undo::disk_dir(&config.retention_dir, disk);
    let mut out = Vec::new();
    for tag in undo::segments(&dir)?.into_iter().rev() {
        if tag < point {
            break;
        }
        out.extend(undo::read_segment(&dir, tag)?.into_iter().rev());
    }
    Ok(out)
}

fn apply(image: &mut dyn Image, rec: &undo::Record, size: u64) -> anyhow::Result<()> {
    let end = rec.offset_bytes + u64::from(rec.len_bytes);
    if end > size {
        return Ok(());
    }
    match &rec.data {
        Some(d) => image.write_at(rec.offset_bytes, d)?,
        None => image.write_zeroes(rec.offset_bytes, u64::from(rec.len_bytes))?,
    }
    Ok(())
}

/// `rollback`: stops replication of the disk and makes its live image
/// equal `spec`'s point, keeping what it overwrote for `rollback --undo`.
pub fn rollback(config: &ReceiverConfig, disk: &str, spec: &str) -> anyhow::Result<Point> {
    let entry = entry(config, disk)?;
    let existing = load(config, disk)?;
    let points = read_all(&config.points_path())?;
    let history_from = entry
        .history_from
        .max(existing.as_ref().map_or(0, |r| r.history_from));
    let point = match &existing {
        Some(r) if r.state == State::RollingBack => {
            // Finish the interrupted one, whatever was asked now.
            points
                .iter()
                .find(|p| p.id == r.point)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("point {} of the interrupted rollback is no longer listed", r.point))?
        }
        Some(r) if r.state == State::RolledBack => bail!(
            "disk {disk} is already rolled back to point {}; undo that first with `tidemark-receiver rollback --undo --disk {disk}`",
            r.point
        ),
        Some(r) if r.state == State::Committed => bail!("{}", r.describe(disk)),
        _ => resolve_point(&points, disk, history_from, spec)?,
    };
    let mut rec = Record {
        state: State::RollingBack,
        agent: entry.agent.clone(),
        point: point.id,
        history_from,
        at: now_rfc3339(),
    };
    // First the record: from now on serve refuses the disk.
    save(config, disk, &rec)?;
    let _lock = lock_waiting(config, disk)?;
    let records = records_since(config, disk, point.id)?;
    let path = config.image_dir.join(&entry.image);
    let mut image = live::open(entry.format(), &path, true)?;
    let done = rollback_dir(config, disk, false);
    if !done.exists() {
        // Save what the rollback overwrites, completely, before touching
        // the image.
        let partial = rollback_dir(config, disk, true);
        let _ = std::fs::remove_dir_all(&partial);
        let mut log = UndoLog::new(partial.clone());
        let mut buf = Vec::new();
        for r in &records {
            let end = r.offset_bytes + u64::from(r.len_bytes);
            if end > entry.size_bytes {
                continue;
            }
            let mut at = r.offset_bytes;
            while at < end {
                let n = (end - at).min(PIECE_BYTES) as usize;
                buf.resize(n, 0);
                image.read_at(at, &mut buf)?;
                log.append(point.id, at, &buf)?;
                at += n as u64;
            }
        }
        log.sync()?;
        std::fs::create_dir_all(&partial)?;
        std::fs::rename(&partial, &done).with_context(|| {
            format!("cannot rename {} to {}", partial.display(), done.display())
        })?;
        tidemark_common::durable::sync_dir(done.parent().expect("has a parent"))?;
    }
    for r in &records {
        apply(image.as_mut(), r, entry.size_bytes)?;
    }
    image.flush()?;
    rec.state = State::RolledBack;
    save(config, disk, &rec)?;
    info!(
        "disk {disk}: rolled back to point {} ({}, {}); {} later overwrites kept for `rollback --undo` until `commit`",
        point.id,
        point.kind.as_str(),
        point.recorded_at,
        records.len()
    );
    Ok(point)
}

/// Planned failover (the agent's `failover`): the image already equals
/// `point`, the final point the agent took; from now on the disk is failed
/// over as after a rollback to it, with nothing to undo.
pub fn mark_failed_over(
    config: &ReceiverConfig,
    disk: &str,
    agent: &str,
    point: u64,
) -> anyhow::Result<()> {
    let history_from = load(config, disk)?.map_or(0, |r| r.history_from);
    save(
        config,
        disk,
        &Record {
            state: State::RolledBack,
            agent: agent.to_owned(),
            point,
            history_from,
            at: now_rfc3339(),
        },
    )
}

/// `rollback --undo`: puts back what the rollback overwrote, byte for
/// byte, and lets replication continue where it was.
pub fn undo_rollback(config: &ReceiverConfig, disk: &str) -> anyhow::Result<u64> {
    let entry = entry(config, disk)?;
    let Some(rec) = load(config, disk)? else {
        bail!("disk {disk} is not rolled back; nothing to undo");
    };
    if rec.state == State::Committed || rec.state == State::Reprotected {
        bail!(
            "disk {disk} was committed at point {}: a commit cannot be undone",
            rec.point
        );
    }
    let _lock = lock_waiting(config, disk)?;
    let done = rollback_dir(config, disk, false);
    if done.exists() {
        let path = config.image_dir.join(&entry.image);
        let mut image = live::open(entry.format(), &path, true)?;
        for tag in undo::segments(&done)? {
            for r in undo::read_segment(&done, tag)? {
                apply(image.as_mut(), &r, entry.size_bytes)?;
            }
        }
        image.flush()?;
    }
    // Image first, then the record: a crash in between leaves a rollback
    // to undo again (idempotent), never a lost one.
    remove_record(config, disk)?;
    let _ = std::fs::remove_dir_all(rollback_dir(config, disk, true));
    if done.exists() {
        std::fs::remove_dir_all(&done)
            .with_context(|| format!("cannot remove {}", done.display()))?;
    }
    info!(
        "disk {disk}: rollback to point {} undone; replication may continue",
        rec.point
    );
    Ok(rec.point)
}

/// `commit`: the rolled-back image becomes the disk of record; the journal
/// of the disk is dropped and older points are gone.
pub fn commit(config: &ReceiverConfig, disk: &str) -> anyhow::Result<u64> {
    entry(config, disk)?;
    let Some(mut rec) = load(config, disk)? else {
        bail!("disk {disk} is not failed over; first `tidemark-receiver rollback --disk {disk} --point SPEC` (use `latest` to keep the newest point)");
    };
    match rec.state {
        State::RolledBack => {}
        State::RollingBack => bail!("{}", rec.describe(disk)),
        State::Committed | State::Reprotected => {
            bail!("disk {disk} is already committed at point {}", rec.point)
        }
    }
    let _lock = lock_waiting(config, disk)?;
    let points = read_all(&config.points_path())?;
    // No point before the commit can be reconstructed once the journal
    // is gone; the next point starts the new history.
    rec.history_from = points.iter().map(|p| p.id + 1).max().unwrap_or(0);
    rec.state = State::Committed;
    rec.at = now_rfc3339();
    save(config, disk, &rec)?;
    let dir = undo::disk_dir(&config.retention_dir, disk);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(
                "cannot remove the journal {} of committed disk {disk}: {e}; remove it by hand",
                dir.display()
            );
        }
    }
    info!(
        "disk {disk}: committed at point {}; its image is the disk of record",
        rec.point
    );
    Ok(rec.point)
}

/// `reprotect`: replication of a committed disk may start again (a
/// checksum sync into the committed image).
pub fn reprotect(config: &ReceiverConfig, disk: &str) -> anyhow::Result<()> {
    entry(config, disk)?;
    let Some(mut rec) = load(config, disk)? else {
        bail!("disk {disk} is not failed over; it is protected already");
    };
    if rec.state != State::Committed {
        bail!("{}; reprotect follows a commit", rec.describe(disk));
    }
    rec.state = State::Reprotected;
    rec.at = now_rfc3339();
    save(config, disk, &rec)?;
    info!("disk {disk}: replication accepted again; the agent's next connection compares checksums with the committed image");
    Ok(())
}

/// What of `disk`'s history can be exported now: the points of `all`
/// covering it whose history is kept. While rolled back, nothing after the
/// rollback point; after a commit, the committed point and those taken
/// after the commit (the journal of the points between went with it).
pub fn visible_points(
    config: &ReceiverConfig,
    disk: &str,
    entry: &DiskEntry,
    all: &[Point],
) -> anyhow::Result<(u64, Vec<Point>, Option<Record>)> {
    let rec = load(config, disk)?;
    let thinned = crate::journal::thinning::load(&config.retention_dir)?;
    let keep = |id: u64| {
        id >= entry.history_from
            && !thinned.contains(&id)
            && rec.as_ref().is_none_or(|r| match r.state {
                State::RollingBack | State::RolledBack => id >= r.history_from && id <= r.point,
                State::Committed | State::Reprotected => id == r.point || id >= r.history_from,
            })
    };
    let points: Vec<Point> = all.iter().filter(|p| keep(p.id)).cloned().collect();
    let history_from = points
        .iter()
        .filter(|p| p.disks.iter().any(|d| d == disk))
        .map(|p| p.id)
        .min()
        .unwrap_or(entry.history_from);
    Ok((history_from, points, rec))
}
