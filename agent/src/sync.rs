//! `sync`: copy every configured disk to the receiver once and finish with a
//! recovery point. A dropped connection costs a retry, not a restart: the
//! shipper resends what the receiver had not yet made durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidemark_common::proto::PointKind;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::disks::{open_disk, Disk};
use crate::pipeline::{Job, Pipeline};
use crate::progress::{mib, Progress, Reporter, Snapshot};
use crate::shipper::Shipper;
use crate::transport::Connector;

pub struct SyncOutcome {
    pub point_id: u64,
    pub kind: PointKind,
    pub stats: Snapshot,
    pub elapsed: Duration,
    /// Per disk: whether the receiver already had an image (original location).
    pub image_existed: Vec<bool>,
}

pub async fn sync(cfg: &AgentConfig, give_up_after: Duration) -> anyhow::Result<SyncOutcome> {
    let started = Instant::now();
    let disks: Vec<Disk> = cfg.disks.iter().map(open_disk).collect::<Result<_, _>>()?;
    let progress = Arc::new(Progress::default());
    let mut shipper = Shipper::connect(
        Connector::new(cfg)?,
        disks.clone(),
        Some(give_up_after),
        progress.clone(),
    )
    .await?;
    for (d, existed) in disks.iter().zip(&shipper.image_existed) {
        info!(
            "disk {} ({}, {}): {}",
            d.id,
            d.device.display(),
            mib(d.size_bytes),
            if *existed {
                "receiver has an image (original location)"
            } else {
                "receiver created a new image (alternate location)"
            }
        );
    }

    Progress::add(
        &progress.total_bytes,
        disks.iter().map(|d| d.size_bytes).sum(),
    );
    let counters_before: Vec<_> = disks.iter().map(Disk::write_counters).collect();
    let jobs = disks
        .iter()
        .map(|d| Job {
            disk: d.clone(),
            ranges: vec![0..d.size_bytes],
        })
        .collect();
    let mut pipeline = Pipeline::start(jobs, &cfg.pipeline_settings(), progress.clone())?;
    let reporter = Reporter::start(progress.clone(), "sync".into());
    while let Some(piece) = pipeline.pieces.recv().await {
        shipper.send(piece).await?;
    }
    pipeline
        .finish()
        .context("reading the disks failed; no recovery point was taken")?;
    let after: Vec<_> = disks.iter().map(Disk::write_counters).collect();
    let kind = consistency(&disks, &counters_before, &after);
    let point_id = shipper.point(kind, "sync").await?;
    drop(reporter);
    Ok(SyncOutcome {
        point_id,
        kind,
        stats: progress.snapshot(),
        elapsed: started.elapsed(),
        image_existed: shipper.image_existed.clone(),
    })
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
