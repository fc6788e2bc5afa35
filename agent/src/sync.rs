//! `sync` and `resync`: copy disks to the receiver once and finish with a
//! recovery point. A disk whose image the receiver already has is compared
//! by checksums and only differing blocks travel; a new image gets every
//! non-zero block. A dropped connection costs a retry, not a restart: the
//! shipper resends what the receiver had not yet made durable. An
//! interrupted run resumes where it durably got to, as long as nothing
//! wrote to the disk since.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tidemark_common::proto::PointKind;
use tracing::{info, warn};

use crate::compare::{ChunkCursor, HASH_LOOKAHEAD};
use crate::config::AgentConfig;
use crate::disks::{open_configured, Disk};
use crate::pipeline::{Job, Piece, Pipeline, READ_BYTES};
use crate::progress::{mib, Progress, Reporter, Snapshot};
use crate::shipper::Shipper;
use crate::transport::Connector;

/// How often the resume cursor is saved.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// How the data of a disk is compared with the receiver's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Checksum sync where the receiver already has an image, full sync
    /// where it made a new one.
    Auto,
    /// Hash both sides, send only differing blocks (full sync for a new
    /// image, where there is nothing to compare with).
    Checksum,
    /// Send every non-zero block without comparing.
    Full,
}

pub struct SyncOutcome {
    pub point_id: u64,
    pub kind: PointKind,
    pub stats: Snapshot,
    pub elapsed: Duration,
    /// Per disk: whether the receiver already had an image (original location).
    pub image_existed: Vec<bool>,
    /// Per disk: whether it was compared by checksums.
    pub compared: Vec<bool>,
}

/// Syncs every configured disk, or only `only` (a disk id).
pub async fn sync(
    cfg: &AgentConfig,
    give_up_after: Duration,
    mode: Mode,
    only: Option<&str>,
) -> anyhow::Result<SyncOutcome> {
    let started = Instant::now();
    // Certificates and key first: a configuration mistake is reported
    // before any device is opened.
    let connector = Connector::new(cfg)?;
    let disks = open_configured(&cfg.disks, only)?;
    let progress = Arc::new(Progress::default());
    let mut shipper = Shipper::connect(
        connector,
        disks.clone(),
        Some(give_up_after),
        progress.clone(),
    )
    .await?;
    shipper.set_throttle(cfg.send_throttle().map_err(anyhow::Error::msg)?);
    shipper.set_window(cfg.send_window_bytes());
    let existed = shipper.image_existed.clone();
    let mut jobs = Vec::new();
    let mut resumes = Vec::new();
    for (d, &existed) in disks.iter().zip(&existed) {
        let compare = existed && mode != Mode::Full;
        info!(
            "disk {} ({}, {}): {}",
            d.id,
            d.device.display(),
            mib(d.size_bytes),
            match (existed, compare) {
                (true, true) => "receiver has an image (original location): checksum sync, only differing blocks travel",
                (true, false) => "receiver has an image (original location): full sync requested",
                (false, _) => "receiver created a new image (alternate location): full sync",
            }
        );
        let resume = Resume::new(&cfg.state_dir, d);
        // Only an image that survived can hold what an earlier run sent.
        let from = if existed { resume.load() } else { 0 };
        if from > 0 {
            info!(
                "disk {}: resuming an interrupted sync at {} of {}",
                d.id,
                mib(from),
                mib(d.size_bytes)
            );
        }
        jobs.push(Job {
            disk: d.clone(),
            ranges: if from < d.size_bytes {
                vec![from..d.size_bytes]
            } else {
                Vec::new()
            },
            compare,
            limit_reads: true,
        });
        resumes.push(resume.starting_at(from));
    }
    let compared: Vec<bool> = jobs.iter().map(|j| j.compare).collect();
    Progress::add(
        &progress.total_bytes,
        jobs.iter()
            .flat_map(|j| &j.ranges)
            .map(|r| r.end - r.start)
            .sum(),
    );
    let counters_before: Vec<_> = disks.iter().map(Disk::write_counters).collect();
    let mut requests = ChunkCursor::new(&jobs);
    let mut pipeline = Pipeline::start(
        jobs,
        &cfg.sync_pipeline_settings(),
        shipper.sum_kind(),
        progress.clone(),
    )?;
    shipper.set_hash_board(Some(pipeline.board.clone()));
    shipper.acked_log = Some(Vec::new());
    let reporter = Reporter::start(progress.clone(), "sync".into());
    let mut requested = 0u64;
    let mut saved_at = Instant::now();
    loop {
        while requested < pipeline.board.consumed() + HASH_LOOKAHEAD {
            let Some((disk, offset_bytes, len_bytes)) = requests.next() else {
                break;
            };
            pipeline.board.want(disk, offset_bytes);
            shipper
                .send(Piece::HashRequest {
                    disk,
                    offset_bytes,
                    len_bytes,
                })
                .await?;
            requested += 1;
        }
        if !pipeline.holds_pieces() {
            shipper.flush().await;
        }
        // Short waits: while the workers wait for hashes no piece comes,
        // and the hashes must be taken off the connection meanwhile.
        match tokio::time::timeout(Duration::from_millis(5), pipeline.next()).await {
            Ok(Some(Piece::ChunkDone { disk, offset_bytes })) => {
                resumes[disk as usize].chunk_done(offset_bytes);
            }
            Ok(Some(p)) => {
                let (disk, range) = p.range();
                resumes[disk].sent(range.start);
                shipper.send(p).await?;
            }
            Ok(None) => break,
            Err(_) => {}
        }
        shipper.pump_ready().await?;
        for (disk, offset) in shipper
            .acked_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
        {
            resumes[disk].acked(offset);
        }
        if saved_at.elapsed() >= SAVE_EVERY {
            saved_at = Instant::now();
            for r in &resumes {
                r.save();
            }
        }
    }
    pipeline
        .finish()
        .context("reading the disks failed; no recovery point was taken")?;
    let after: Vec<_> = disks.iter().map(Disk::write_counters).collect();
    let kind = consistency(&disks, &counters_before, &after);
    // The point follows every piece, so it is durable only after them.
    let point_id = shipper.point(kind, "sync").await?;
    for r in &resumes {
        r.finished();
    }
    drop(reporter);
    Ok(SyncOutcome {
        point_id,
        kind,
        stats: progress.snapshot(),
        elapsed: started.elapsed(),
        image_existed: existed,
        compared,
    })
}

/// What a resumed run needs to trust what an interrupted one sent: the
/// disk is the same and nothing wrote to it since.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ResumeFile {
    size_bytes: u64,
    boot_id: String,
    diskseq: Option<u64>,
    write_counters: Option<(u64, u64)>,
    /// Everything below this offset is durable at the receiver.
    durable_to: u64,
}

/// Tracks, per disk, how far a sync has durably got: a chunk is done once
/// all its pieces are out and acknowledged; the cursor is the end of the
/// done prefix.
struct Resume {
    path: PathBuf,
    disk: Disk,
    durable_to: u64,
    /// Chunks with pieces sent and not all acknowledged: (pieces
    /// outstanding, whether the last piece is out).
    open: HashMap<u64, (u64, bool)>,
    /// Done chunks beyond the prefix.
    done: BTreeSet<u64>,
}

fn chunk_of(offset: u64) -> u64 {
    offset - offset % READ_BYTES as u64
}

impl Resume {
    fn new(state_dir: &Path, disk: &Disk) -> Resume {
        Resume {
            path: state_dir.join(format!("{}.sync-resume", disk.id)),
            disk: disk.clone(),
            durable_to: 0,
            open: HashMap::new(),
            done: BTreeSet::new(),
        }
    }

    fn starting_at(mut self, from: u64) -> Resume {
        self.durable_to = from;
        self
    }

    fn current(&self) -> ResumeFile {
        ResumeFile {
            size_bytes: self.disk.size_bytes,
            boot_id: crate::state::boot_id(),
            diskseq: crate::state::diskseq(&self.disk.sysfs),
            write_counters: self.disk.write_counters(),
            durable_to: self.durable_to,
        }
    }

    /// Where to start: the saved cursor if the disk is provably unchanged
    /// since it was saved, else 0.
    fn load(&self) -> u64 {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return 0;
        };
        let Ok(saved) = serde_json::from_slice::<ResumeFile>(&bytes) else {
            warn!(
                "{} is unreadable; syncing from the start",
                self.path.display()
            );
            return 0;
        };
        let now = self.current();
        let same = saved.size_bytes == now.size_bytes
            && saved.boot_id == now.boot_id
            && saved.diskseq == now.diskseq
            && saved.write_counters.is_some()
            && saved.write_counters == now.write_counters;
        if !same {
            info!(
                "disk {}: written or replaced since the interrupted sync (then: {saved:?}; now: {now:?}); syncing from the start",
                self.disk.id
            );
            // Stale: must not be mistaken for this run's progress.
            let _ = std::fs::remove_file(&self.path);
            return 0;
        }
        chunk_of(saved.durable_to.min(now.size_bytes))
    }

    fn sent(&mut self, offset: u64) {
        self.open.entry(chunk_of(offset)).or_default().0 += 1;
    }

    fn acked(&mut self, offset: u64) {
        let c = chunk_of(offset);
        if let Some(e) = self.open.get_mut(&c) {
            e.0 = e.0.saturating_sub(1);
        }
        self.settle(c);
    }

    fn chunk_done(&mut self, offset: u64) {
        let c = chunk_of(offset);
        self.open.entry(c).or_default().1 = true;
        self.settle(c);
    }

    fn settle(&mut self, c: u64) {
        if self.open.get(&c) != Some(&(0, true)) {
            return;
        }
        self.open.remove(&c);
        self.done.insert(c);
        while self.done.remove(&self.durable_to) {
            self.durable_to = (self.durable_to + READ_BYTES as u64).min(self.disk.size_bytes);
        }
    }

    fn save(&self) {
        if self.durable_to == 0 {
            return;
        }
        let json = serde_json::to_vec(&self.current()).expect("resume state serializes");
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = tidemark_common::durable::write_atomic(&self.path, &json, 0o600) {
            warn!(
                "cannot save sync progress in {}: {e}; an interruption will restart this disk",
                self.path.display()
            );
        }
    }

    fn finished(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A copy is crash-consistent only if nothing wrote to the disks while it
/// was read; the block layer's own counters tell.
fn consistency(
    disks: &[Disk],
    before: &[Option<(u64, u64)>],
    after: &[Option<(u64, u64)>],
) -> PointKind {
    let mut kind = PointKind::CrashConsistent;
    for ((d, b), a) in disks.iter().zip(before).zip(after) {
        if b.is_none() || b != a {
            warn!(
                "disk {} ({}) was written while it was copied; this point is a sync marker, not a recovery point (unmount or freeze the disk for a consistent copy, or use continuous replication)",
                d.id,
                d.device.display()
            );
            kind = PointKind::SyncMarker;
        }
    }
    kind
}
