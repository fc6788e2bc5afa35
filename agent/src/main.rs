use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidemark_agent::admin::{self, Reply, Request};
use tidemark_agent::config::{AgentConfig, FailoverLeave};
use tidemark_agent::progress::mib;
use tidemark_agent::sync::Mode;
use tidemark_agent::throttle::show_rate;

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
        /// auto: compare checksums with an image the receiver already has
        /// (only differing blocks travel), full copy for a new image.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
    },
    /// Bring one disk's image at the receiver level with the device and
    /// take a recovery point: checksum (only differing blocks travel) or
    /// full. An interrupted resync resumes where it durably got to if the
    /// disk was not written since. Prints the point id.
    Resync {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        disk: String,
        #[arg(long, value_enum, default_value_t = Mode::Checksum)]
        mode: Mode,
        /// Stop retrying an unreachable receiver after this many seconds.
        #[arg(long, default_value_t = 300)]
        give_up_after: u64,
    },
    /// Replicate continuously and take recovery points on schedule (the
    /// systemd service).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask the running agent for a recovery point now; prints its id once
    /// the receiver holds it durably.
    Bookmark {
        #[arg(long)]
        config: PathBuf,
        /// Run the pre/post scripts around the freeze.
        #[arg(long)]
        app_consistent: bool,
        /// A name to find the point by later.
        #[arg(long)]
        name: Option<String>,
    },
    /// Planned failover (phase 2): ask the running agent for a final
    /// app-consistent point; the receiver then refuses this machine's
    /// disks, and the agent stops (filesystems thawed or left frozen).
    /// Prints the final point's id.
    Failover {
        #[arg(long)]
        config: PathBuf,
        /// Overrides `failover_leave` from the config.
        #[arg(long, value_enum)]
        leave: Option<FailoverLeave>,
    },
    /// Show the running agent's disks, backlog and last point.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    one_malloc_arena();
    tidemark_common::cli::init_logging();
    let result = run(Cli::parse());
    let refused = result.as_ref().err().is_some_and(|e| {
        e.chain().any(|c| {
            c.downcast_ref::<tidemark_agent::transport::Refused>()
                .is_some()
        })
    });
    let code = tidemark_common::cli::exit_code(result);
    if refused {
        ExitCode::from(tidemark_agent::transport::REFUSED_EXIT_CODE)
    } else {
        code
    }
}

/// glibc gives each thread that allocates an arena of its own (up to
/// 8 per core), and an arena keeps the pages of its own peak. A payload
/// is allocated on a compression thread and freed on the sender's, so
/// each compressor's arena peaked on its own, and at a point (up to
/// `point_max_backlog_bytes` held at once) their sum set the agent's peak
/// RSS. One arena for the whole process took 8-10 MiB off that peak with
/// no change in CPU or drain rate (docs/BENCHMARKS.md, "One malloc
/// arena"); the agent allocates in blocks of up to 1 MiB a few thousand
/// times a second, too seldom for the shared lock to matter. An operator's
/// own `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` wins.
fn one_malloc_arena() {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() || tunables.contains("arena_max") {
        return;
    }
    // SAFETY: mallopt only sets an allocator parameter; it is called
    // before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sync {
            config,
            give_up_after,
            mode,
        } => one_shot(&config, give_up_after, mode, None)?,
        Command::Resync {
            config,
            disk,
            mode,
            give_up_after,
        } => one_shot(&config, give_up_after, mode, Some(&disk))?,
        Command::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            runtime()?.block_on(tidemark_agent::run::run(cfg))?;
        }
        Command::Bookmark {
            config,
            app_consistent,
            name,
        } => {
            let cfg = AgentConfig::load(&config)?;
            let req = Request::Bookmark {
                app_consistent,
                name,
            };
            match runtime()?.block_on(admin::request(&cfg.admin_socket, &req))? {
                Reply::Point { id, kind } => {
                    tracing::info!("recovery point {id} ({kind})");
                    println!("{id}");
                }
                Reply::Error(e) => anyhow::bail!("the agent could not take the point: {e}"),
                Reply::Status(_) => anyhow::bail!("the agent answered a bookmark with a status"),
            }
        }
        Command::Failover { config, leave } => {
            let cfg = AgentConfig::load(&config)?;
            match runtime()?.block_on(admin::request(
                &cfg.admin_socket,
                &Request::Failover { leave },
            ))? {
                Reply::Point { id, kind } => {
                    tracing::info!("failed over at recovery point {id} ({kind})");
                    println!("{id}");
                }
                Reply::Error(e) => anyhow::bail!("the failover did not complete: {e}"),
                Reply::Status(_) => anyhow::bail!("the agent answered a failover with a status"),
            }
        }
        Command::Status { config, json } => {
            let cfg = AgentConfig::load(&config)?;
            match runtime()?.block_on(admin::request(&cfg.admin_socket, &Request::Status))? {
                Reply::Status(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Reply::Status(s) => print!("{}", status_table(&s)),
                Reply::Error(e) => anyhow::bail!("the agent could not report status: {e}"),
                Reply::Point { .. } => anyhow::bail!("the agent answered status with a point"),
            }
        }
    }
    Ok(())
}

/// `sync` and `resync`: copy, take a point, print its id.
fn one_shot(
    config: &Path,
    give_up_after: u64,
    mode: Mode,
    only: Option<&str>,
) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(config)?;
    let out = runtime()?.block_on(tidemark_agent::sync::sync(
        &cfg,
        Duration::from_secs(give_up_after),
        mode,
        only,
    ))?;
    let s = out.stats;
    let secs = out.elapsed.as_secs_f64().max(1e-3);
    let compared = if out.compared.iter().any(|&c| c) {
        format!(
            ", {} differed from the receiver's image",
            mib(s.differing_bytes)
        )
    } else {
        String::new()
    };
    tracing::info!(
        "sync done in {secs:.1}s: read {} ({:.0} MB/s){compared}, {} data sent as {} ({:.2}x), {} zero sent as records; recovery point {} ({})",
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
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // The worker runs the connection's tasks (TLS, the socket's sends):
    // in `run`, part of what yields to the machine's own work. The run
    // loop, which drains the tracer, is the main thread and never yields.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(tidemark_agent::priority::thread_started)
        .on_thread_unpark(tidemark_agent::priority::join_worker)
        .enable_all()
        .build()
}

fn status_table(s: &admin::Status) -> String {
    let mut out = format!(
        "agent {} -> receiver {} ({})\n",
        s.agent,
        s.receiver,
        if s.connected {
            "connected"
        } else {
            "disconnected"
        }
    );
    match &s.last_point {
        Some(p) => out.push_str(&format!(
            "last point {} ({}), frozen {} ms, {} s ago\n",
            p.id,
            p.kind,
            p.freeze_ms,
            tidemark_agent::shipper::now_ms().saturating_sub(p.agent_time_ms) / 1000
        )),
        None => out.push_str("no point taken by this run yet\n"),
    }
    if let Some(w) = &s.point_waiting {
        out.push_str(&format!(
            "next point waiting for {} s: {}\n",
            w.secs, w.reason
        ));
    }
    let rate = |r: Option<u64>| r.map_or_else(|| "unlimited".to_owned(), show_rate);
    out.push_str(&format!(
        "send cap {}{}, sync/resync reads {}\n",
        rate(s.send_cap_bytes_per_sec),
        s.send_cap_window
            .as_ref()
            .map_or_else(String::new, |w| format!(" ({w})")),
        rate(s.sync_read_cap_bytes_per_sec)
    ));
    out.push_str(&format!(
        "{:<24} {:<16} {:<16} {:>12}  REASON\n",
        "DISK", "DEVICE", "STATE", "BACKLOG"
    ));
    for d in &s.disks {
        out.push_str(&format!(
            "{:<24} {:<16} {:<16} {:>12}  {}\n",
            d.id,
            d.device,
            d.state,
            mib(d.dirty_bytes),
            d.resync_reason.as_deref().unwrap_or("-")
        ));
    }
    out
}
