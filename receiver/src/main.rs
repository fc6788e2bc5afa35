use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidemark_receiver::config::{
    ReceiverConfig, DEFAULT_IMAGE_DIR, DEFAULT_LISTEN, DEFAULT_RETENTION_DIR,
};
use tidemark_receiver::pki::DEFAULT_CERT_DAYS;
use tidemark_receiver::{admin, export, failover, listing, server, setup};

#[derive(Parser)]
#[command(
    name = "tidemark-receiver",
    version,
    about = "tidemark receiver (master target)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a CA, this receiver's certificate and receiver.toml.
    Init {
        /// Directory for the CA, certificates and receiver.toml.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Where disk images live.
        #[arg(long, default_value = DEFAULT_IMAGE_DIR)]
        image_dir: PathBuf,
        /// Retention volume (registry, recovery points).
        #[arg(long, default_value = DEFAULT_RETENTION_DIR)]
        retention_dir: PathBuf,
        /// Allow the retention directory on the root filesystem (test
        /// set-ups; a full journal would fill the system's disk).
        #[arg(long)]
        retention_on_root_filesystem: bool,
        /// Receiver name (certificate CN); defaults to the host name.
        #[arg(long)]
        name: Option<String>,
        /// Extra DNS name or IP for the receiver certificate (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: i64,
    },
    /// Create an agent's certificate, key, CA copy and agent.toml.
    IssueCert {
        /// Directory `init` wrote (holds the CA).
        #[arg(long)]
        dir: PathBuf,
        /// Agent name (usually the protected machine's host name).
        #[arg(long)]
        name: String,
        /// Receiver address the agent connects to, HOST:PORT.
        #[arg(long)]
        receiver: String,
        /// Directory to write the agent's files into.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: i64,
    },
    /// Accept agents and write their disks. SIGHUP rereads the revocation
    /// lists and the TLS files.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the running receiver's agents (last contact) and disks (state,
    /// RPO).
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Move a disk to another agent (e.g. after failover to a new machine).
    Reassign {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        disk: String,
        /// The new owner's name (its certificate CN).
        #[arg(long)]
        agent: String,
        /// Allow an agent that has never connected to this receiver.
        #[arg(long)]
        new_agent: bool,
    },
    /// List recovery points.
    Points {
        #[arg(long)]
        config: PathBuf,
        /// Only points covering this disk.
        #[arg(long)]
        disk: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a disk as of a recovery point to a file.
    Export {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        disk: String,
        /// `latest` or a point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Output format: raw, vhd-fixed (Azure), vmdk (flat: vmfs descriptor for ESXi plus a -hosted.vmdk for qemu and hosted products), vmdk-sparse, vmdk-stream (VMware import).
        #[arg(long, default_value = "raw")]
        format: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Failover in place: stop accepting the disk's replication and roll
    /// its live image back to a point. The overwritten data is kept until
    /// `commit`, so `--undo` restores the image as it was.
    Rollback {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        disk: String,
        /// The point to roll back to (latest, latest-app-consistent, an id, an RFC 3339 time).
        #[arg(long, required_unless_present = "undo", conflicts_with = "undo")]
        point: Option<String>,
        /// Undo the rollback: the image as it was before, replication allowed again.
        #[arg(long)]
        undo: bool,
    },
    /// After a rollback: make the image the disk of record and drop the
    /// disk's journal (older points are gone).
    Commit {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        disk: String,
    },
    /// After a commit: accept replication of the disk again (the agent's
    /// next connection compares checksums with the committed image).
    Reprotect {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        disk: String,
    },
}

fn small_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    tidemark_common::cli::init_logging();
    tidemark_common::cli::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            listen,
            image_dir,
            retention_dir,
            retention_on_root_filesystem,
            name,
            hosts,
            days,
        } => {
            let name = match name {
                Some(n) => n,
                None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
            };
            let path = setup::init(&setup::InitOptions {
                dir,
                name,
                listen,
                image_dir,
                retention_dir,
                retention_on_root_filesystem,
                hosts,
                days,
            })?;
            println!("{}", path.display());
        }
        Command::IssueCert {
            dir,
            name,
            receiver,
            out,
            days,
        } => {
            let path = setup::issue_cert(&setup::IssueOptions {
                dir,
                name,
                receiver,
                out,
                days,
            })?;
            println!("{}", path.display());
        }
        Command::Serve { config: path } => {
            let config = ReceiverConfig::load(&path)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(server::serve(config, &path))?;
        }
        Command::Status { config, json } => {
            let config = ReceiverConfig::load(&config)?;
            let s = small_runtime()?.block_on(admin::status(&config))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", admin::table(&s));
            }
        }
        Command::Reassign {
            config,
            disk,
            agent,
            new_agent,
        } => {
            let config = ReceiverConfig::load(&config)?;
            let r =
                small_runtime()?.block_on(admin::reassign(&config, &disk, &agent, new_agent))?;
            if r.from == r.to {
                println!("disk {} already belongs to agent {}", r.disk, r.to);
            } else {
                println!(
                    "disk {} moved from agent {} to agent {}; points before {} are no longer exportable for it{}",
                    r.disk,
                    r.from,
                    r.to,
                    r.history_from,
                    if r.closed_sessions.is_empty() {
                        String::new()
                    } else {
                        format!("; closed the live session of {}", r.closed_sessions.join(", "))
                    }
                );
            }
        }
        Command::Points { config, disk, json } => {
            let config = ReceiverConfig::load(&config)?;
            let listing = listing::points(&config, disk.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", listing::table(&listing));
            }
        }
        Command::Export {
            config,
            disk,
            point,
            format,
            out,
        } => {
            let config = ReceiverConfig::load(&config)?;
            let p = export::export(&config, &disk, &point, &format, &out)?;
            println!(
                "exported disk {disk} at point {} ({}) to {}",
                p.id,
                p.kind.as_str(),
                out.display()
            );
        }
        Command::Rollback {
            config,
            disk,
            point,
            undo,
        } => {
            let config = ReceiverConfig::load(&config)?;
            if undo {
                let p = failover::undo_rollback(&config, &disk)?;
                println!("disk {disk}: rollback to point {p} undone; replication may resume");
            } else {
                let spec = point.as_deref().unwrap_or("latest");
                let p = failover::rollback(&config, &disk, spec)?;
                println!(
                    "disk {disk} rolled back to point {} ({}, {}); replication refused until `rollback --undo` or `commit` and `reprotect`",
                    p.id,
                    p.kind.as_str(),
                    p.recorded_at
                );
            }
        }
        Command::Commit { config, disk } => {
            let config = ReceiverConfig::load(&config)?;
            let p = failover::commit(&config, &disk)?;
            println!("disk {disk} committed at point {p}; its journal is dropped");
        }
        Command::Reprotect { config, disk } => {
            let config = ReceiverConfig::load(&config)?;
            failover::reprotect(&config, &disk)?;
            println!("disk {disk}: replication accepted again");
        }
    }
    Ok(())
}
