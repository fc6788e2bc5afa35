//! What a round of `run` costs beyond its reads: `run` starts a pipeline
//! (a reader thread with its own io_uring, the compression threads) for
//! every round, a dozen a second under steady churn. This times many
//! rounds of one small read each against the same reads in one round;
//! the difference per round is the set-up a long-lived pipeline would
//! save.
//!
//! Needs read access to the device (root for a block device):
//!
//! ```text
//! cargo run --release -p tidemark-agent --example round_cost -- \
//!     --config agent.toml --disk ID [--rounds 2000]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tidemark_agent::config::AgentConfig;
use tidemark_agent::disks::{open_configured, Disk};
use tidemark_agent::pipeline::{Job, Pipeline, Settings};
use tidemark_agent::progress::Progress;
use tidemark_common::proto::SumKind;

#[derive(Parser, Debug)]
struct Args {
    /// The agent's configuration: the disk, `queue_depth` and compression
    /// threads are taken from it.
    #[arg(long)]
    config: PathBuf,
    /// The disk's id in the configuration.
    #[arg(long)]
    disk: String,
    /// Rounds to time, each reading 4 KiB at a different place.
    #[arg(long, default_value_t = 2000)]
    rounds: u64,
}

const READ: u64 = 4096;

/// Reads `ranges` through one pipeline, to its end.
fn one_round(
    disk: &Disk,
    ranges: Vec<std::ops::Range<u64>>,
    settings: &Settings,
) -> anyhow::Result<()> {
    let progress = Arc::new(Progress::default());
    let mut p = Pipeline::start(
        vec![Job::full(disk.clone(), ranges)],
        settings,
        SumKind::Crc32c,
        progress,
    )?;
    while p.blocking_next().is_some() {}
    Ok(p.finish()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = AgentConfig::load(&args.config)?;
    let disk = open_configured(&cfg.disks, Some(&args.disk))?.remove(0);
    let settings = cfg.pipeline_settings();
    // Spread over the disk, 1 MiB apart, so that no two reads merge.
    let places = (disk.size_bytes / (1 << 20)).max(1);
    let range = |i: u64| {
        let at = (i % places) << 20;
        at..(at + READ).min(disk.size_bytes)
    };
    one_round(&disk, vec![range(0)], &settings)?; // warm up

    let begun = Instant::now();
    for i in 0..args.rounds {
        one_round(&disk, vec![range(i)], &settings)?;
    }
    let many = begun.elapsed();
    let begun = Instant::now();
    one_round(&disk, (0..args.rounds).map(range).collect(), &settings)?;
    let once = begun.elapsed();

    let per = |d: Duration| d.as_secs_f64() * 1e6 / args.rounds as f64;
    println!(
        "{} reads of 4 KiB: {:.0} us a read as rounds of one, {:.0} us in one round: {:.0} us of set-up a round ({} reader queue depth, {} compression threads)",
        args.rounds,
        per(many),
        per(once),
        per(many) - per(once),
        settings.queue_depth,
        settings.compress_threads,
    );
    Ok(())
}
