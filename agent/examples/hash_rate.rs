//! The agent's side of a checksum resync on its own: the resync's reader,
//! compression workers and comparison (`Pipeline` with a checksum job, the
//! configuration's `sync_queue_depth`, threads and read cap), fed hashes that are
//! already in hand instead of waiting for a receiver's. Prints how fast
//! the agent hashes the device when the receiver keeps up, which is the
//! rate issue 6 compares with fio's read of the device.
//!
//! On the benchmark VM the receiver runs on the same two cores and hashes
//! its image too, so a whole resync there measures both sides sharing
//! them; on two machines each side hashes on cores of its own. This
//! separates the agent's share. The receiver's hashes are computed first,
//! from a copy of its image, and are not timed.
//!
//! Needs read access to the device (root for a block device):
//!
//! ```text
//! cargo run --release -p tidemark-agent --example hash_rate -- \
//!     --config agent.toml --disk ID --image receiver-copy.img --drop-caches
//! ```
//!
//! `scripts/bench-resync.sh` runs it after each resync, against the
//! image the resync started from.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use tidemark_agent::compare::HASH_BLOCK_BYTES;
use tidemark_agent::config::AgentConfig;
use tidemark_agent::disks::open_configured;
use tidemark_agent::pipeline::{Job, Piece, Pipeline, READ_BYTES};
use tidemark_agent::progress::Progress;
use tidemark_common::checksum::block_checksums;
use tidemark_common::proto::{SumKind, PROTOCOL_MAX};

#[derive(Parser, Debug)]
struct Args {
    /// The agent's configuration: the disk, `sync_queue_depth`,
    /// compression threads and read cap are taken from it.
    #[arg(long)]
    config: PathBuf,
    /// The disk's id in the configuration.
    #[arg(long)]
    disk: String,
    /// The receiver's image as raw bytes (the same size as the disk): the
    /// hashes the receiver would send are computed from it.
    #[arg(long)]
    image: PathBuf,
    /// Write back and drop the page cache after hashing `image`, before
    /// the timed part (root), as the benchmark does before each resync.
    #[arg(long)]
    drop_caches: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = AgentConfig::load(&args.config)?;
    let disk = open_configured(&cfg.disks, Some(&args.disk))?.remove(0);

    // The receiver's answers, one hash list per chunk the reader delivers.
    let image = File::open(&args.image)
        .with_context(|| format!("opening the receiver's image {}", args.image.display()))?;
    let mut buf = vec![0u8; READ_BYTES];
    let mut remote = Vec::new();
    for offset in (0..disk.size_bytes).step_by(READ_BYTES) {
        let len = (disk.size_bytes - offset).min(READ_BYTES as u64) as usize;
        image
            .read_exact_at(&mut buf[..len], offset)
            .with_context(|| {
                format!(
                    "reading {} at {offset}: is it as large as the disk ({} bytes)?",
                    args.image.display(),
                    disk.size_bytes
                )
            })?;
        let mut hashes = Vec::new();
        block_checksums(&buf[..len], HASH_BLOCK_BYTES as usize, &mut hashes);
        remote.push((offset, hashes));
    }
    drop(buf);
    if args.drop_caches {
        nix::unistd::sync();
        std::fs::write("/proc/sys/vm/drop_caches", "3")
            .context("dropping the page cache (needs root)")?;
    }

    let progress = Arc::new(Progress::default());
    let job = Job {
        disk: disk.clone(),
        ranges: vec![0..disk.size_bytes],
        compare: true,
        limit_reads: true,
    };
    let started = Instant::now();
    let mut pipeline = Pipeline::start(
        vec![job],
        &cfg.sync_pipeline_settings(),
        SumKind::for_version(PROTOCOL_MAX),
        progress.clone(),
    )?;
    // All at once: a receiver that keeps up has each chunk's hashes there
    // before the reader gets to it.
    for (offset, hashes) in remote {
        pipeline.board.want(0, offset);
        pipeline.board.put(0, offset, hashes);
    }
    let mut pieces = 0u64;
    while let Some(piece) = pipeline.blocking_next() {
        if !matches!(piece, Piece::ChunkDone { .. }) {
            pieces += 1;
        }
    }
    pipeline
        .finish()
        .with_context(|| format!("reading {}", disk.device.display()))?;
    let secs = started.elapsed().as_secs_f64();
    let s = progress.snapshot();
    println!(
        "agent alone: hashed {} MiB of {} in {:.2} s ({:.0} MB/s); {} MiB differed, compressed into {} pieces of {} MiB for sending",
        s.read_bytes >> 20,
        disk.device.display(),
        secs,
        s.read_bytes as f64 / secs / 1e6,
        s.differing_bytes >> 20,
        pieces,
        s.payload_bytes >> 20,
    );
    Ok(())
}
