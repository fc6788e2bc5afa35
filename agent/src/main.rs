use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidemark_agent::config::AgentConfig;
use tidemark_agent::progress::mib;

#[derive(Parser)]
#[command(
    name = "tidemark-agent",
    version,
    about = "tidemark agent: replicates this machine's disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy every configured disk to the receiver and take a recovery point.
    /// Prints the point id on stdout.
    Sync {
        #[arg(long)]
        config: PathBuf,
        /// Stop retrying an unreachable receiver after this many seconds.
        #[arg(long, default_value_t = 300)]
        give_up_after: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sync {
            config,
            give_up_after,
        } => {
            let cfg = AgentConfig::load(&config)?;
            let out = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(tidemark_agent::sync::sync(
                    &cfg,
                    Duration::from_secs(give_up_after),
                ))?;
            let s = out.stats;
            let secs = out.elapsed.as_secs_f64().max(1e-3);
            tracing::info!(
                "sync done in {secs:.1}s: read {} ({:.0} MB/s), {} data sent as {} ({:.2}x), {} zero sent as records; recovery point {} ({})",
                mib(s.read_bytes),
                s.read_bytes as f64 / secs / 1e6,
                mib(s.data_bytes),
                mib(s.payload_bytes),
                s.data_bytes as f64 / (s.payload_bytes.max(1)) as f64,
                mib(s.zero_bytes),
                out.point_id,
                out.kind.as_str()
            );
            println!("{}", out.point_id);
        }
    }
    Ok(())
}
