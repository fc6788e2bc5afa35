//! The running receiver's local admin socket: one JSON request per line,
//! one JSON reply per line (like the agent's). `status` reports agents and
//! disks; `reassign` moves a disk to another agent. The socket is 0600:
//! only the service user and root may use it.
//!
//! `reassign` goes through the socket because `serve` holds the registry
//! in memory and rewrites it whole: an edit behind its back would be lost.
//! With no `serve` running, the registry file is edited directly, under
//! the retention directory's lock so that a `serve` cannot start meanwhile.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::ReceiverConfig;
use crate::journal::points::read_all;
use crate::registry::Registry;

/// Longest request line the server reads.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reassign {
        disk: String,
        agent: String,
        /// The agent has never connected (a freshly issued certificate).
        new_agent: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Status(Status),
    Reassigned(Reassignment),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reassignment {
    pub disk: String,
    pub from: String,
    pub to: String,
    /// Oldest point id still exportable for the disk.
    pub history_from: u64,
    /// Agents whose live sessions were closed (the old owner's).
    pub closed_sessions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub receiver: String,
    pub listen: String,
    /// When this `serve` started (RFC 3339).
    pub started_at: String,
    pub max_disks: usize,
    #[serde(default)]
    pub rpo_threshold_secs: u64,
    #[serde(default)]
    pub heartbeat_timeout_secs: u64,
    pub agents: Vec<AgentStatus>,
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: String,
    /// Sessions open now.
    pub sessions: usize,
    /// Now while connected, else when its last session ended (RFC 3339);
    /// None: not seen since `serve` started.
    pub last_contact: Option<String>,
    pub last_contact_seconds_ago: Option<u64>,
    /// Listed in `revoked_agents`.
    pub revoked: bool,
    /// Disks registered under this agent.
    pub disks: usize,
    /// `heartbeat lost` while the alarm is raised.
    #[serde(default)]
    pub alarms: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: String,
    pub agent: String,
    /// `replicating` (a session has it open) or `idle`.
    pub state: String,
    pub size_bytes: u64,
    pub image: String,
    /// Newest consistent point (the `latest` choice).
    pub latest_point: Option<u64>,
    /// Age of that point in seconds: the recovery point objective now.
    pub rpo_seconds: Option<i64>,
    /// `initial-sync` (no point yet), `protected` or `failed-over`, as of
    /// the last alarm evaluation (every few seconds).
    #[serde(default)]
    pub protection: String,
    /// Why, when failed over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Recovery points listed for this disk.
    #[serde(default)]
    pub points: u64,
    /// `RPO alarm` while the alarm is raised.
    #[serde(default)]
    pub alarms: Vec<String>,
}

/// Sends one request to the running receiver and returns its reply.
pub async fn request(path: &Path, req: &Request) -> Result<Reply, std::io::Error> {
    let stream = UnixStream::connect(path).await?;
    let (rd, mut wr) = stream.into_split();
    let mut out = serde_json::to_vec(req).expect("request serializes");
    out.push(b'\n');
    wr.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("reply not understood ({e}): {line:?}"),
        )
    })
}

fn unreachable(config: &ReceiverConfig, e: &std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach the running receiver at {} ({e}); is `tidemark-receiver serve` running with this config (admin_socket)?",
        config.admin_socket.display()
    )
}

/// `tidemark-receiver status`: asks the running `serve`.
pub async fn status(config: &ReceiverConfig) -> anyhow::Result<Status> {
    match request(&config.admin_socket, &Request::Status).await {
        Ok(Reply::Status(s)) => Ok(s),
        Ok(Reply::Error(e)) => anyhow::bail!("the receiver could not report status: {e}"),
        Ok(other) => anyhow::bail!("the receiver answered status with {other:?}"),
        Err(e) => Err(unreachable(config, &e)),
    }
}

/// `tidemark-receiver reassign`: through the running `serve` if there is
/// one, else on the registry file directly.
pub async fn reassign(
    config: &ReceiverConfig,
    disk: &str,
    agent: &str,
    new_agent: bool,
) -> anyhow::Result<Reassignment> {
    let req = Request::Reassign {
        disk: disk.to_owned(),
        agent: agent.to_owned(),
        new_agent,
    };
    match request(&config.admin_socket, &req).await {
        Ok(Reply::Reassigned(r)) => Ok(r),
        Ok(Reply::Error(e)) => Err(anyhow::anyhow!(e)),
        Ok(other) => anyhow::bail!("the receiver answered reassign with {other:?}"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            reassign_offline(config, disk, agent, new_agent)
        }
        Err(e) => Err(unreachable(config, &e)),
    }
}

fn reassign_offline(
    config: &ReceiverConfig,
    disk: &str,
    agent: &str,
    new_agent: bool,
) -> anyhow::Result<Reassignment> {
    let lock_path = config.retention_dir.join("receiver.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| anyhow::anyhow!("cannot open lock file {}: {e}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "a tidemark-receiver serve holds {} but does not answer on {}; set admin_socket in its config to this path, or stop it",
            lock_path.display(),
            config.admin_socket.display()
        );
    }
    let mut registry = Registry::open(&config.registry_path())?;
    let denied = config.revoked_agents.iter().any(|n| n.trim() == agent);
    let known = registry.has_agent(agent);
    check_target(agent, denied, known, new_agent).map_err(|e| anyhow::anyhow!(e))?;
    let done = apply(config, &mut registry, disk, agent)?;
    drop(lock);
    Ok(Reassignment {
        disk: disk.to_owned(),
        from: done.from,
        to: agent.to_owned(),
        history_from: done.history_from,
        closed_sessions: Vec::new(),
    })
}

/// The checks on the new owner, online and offline alike.
pub fn check_target(
    agent: &str,
    revoked: bool,
    known: bool,
    new_agent: bool,
) -> Result<(), String> {
    crate::pki::validate_name(agent).map_err(|e| e.to_string())?;
    if revoked {
        return Err(format!(
            "agent {agent} is listed in revoked_agents; take it off the list (and reload) before giving it disks"
        ));
    }
    if !known && !new_agent {
        return Err(format!(
            "agent {agent} is not known to this receiver (it owns no disk and has not connected since serve started); check the name, or pass --new-agent if its certificate is issued and it has not connected yet"
        ));
    }
    Ok(())
}

/// Reassigns in `registry`, cutting the disk's history at its newest point.
pub fn apply(
    config: &ReceiverConfig,
    registry: &mut Registry,
    disk: &str,
    agent: &str,
) -> anyhow::Result<crate::registry::Reassigned> {
    let newest = read_all(&config.points_path())?
        .iter()
        .filter(|p| p.disks.iter().any(|d| d == disk))
        .map(|p| p.id)
        .max();
    Ok(registry.reassign(disk, agent, newest)?)
}

/// The status as a table for people.
pub fn table(s: &Status) -> String {
    let mut out = format!(
        "receiver {} on {} since {}; {} of {} disks registered\n",
        s.receiver,
        s.listen,
        s.started_at,
        s.disks.len(),
        s.max_disks
    );
    let alarms = s.agents.iter().map(|a| a.alarms.len()).sum::<usize>()
        + s.disks.iter().map(|d| d.alarms.len()).sum::<usize>();
    out.push_str(&match alarms {
        0 => "no alarms\n\n".to_owned(),
        n => format!(
            "{n} ALARM(S) (RPO over {} s, or no heartbeat for {} s)\n\n",
            s.rpo_threshold_secs, s.heartbeat_timeout_secs
        ),
    });
    out.push_str(&format!(
        "{:<24} {:>8} {:>6}  {:<22} NOTE\n",
        "AGENT", "SESSIONS", "DISKS", "LAST CONTACT"
    ));
    for a in &s.agents {
        let contact = match (&a.last_contact, a.last_contact_seconds_ago) {
            (_, Some(0)) if a.sessions > 0 => "now".to_owned(),
            (Some(_), Some(ago)) => format!("{} ago", secs(ago)),
            _ => "not since start".to_owned(),
        };
        let mut notes: Vec<&str> = a.alarms.iter().map(String::as_str).collect();
        if a.revoked {
            notes.push("revoked");
        }
        out.push_str(&format!(
            "{:<24} {:>8} {:>6}  {:<22} {}\n",
            a.name,
            a.sessions,
            a.disks,
            contact,
            if notes.is_empty() {
                "-".to_owned()
            } else {
                notes.join(", ")
            }
        ));
    }
    out.push_str(&format!(
        "\n{:<32} {:<20} {:<12} {:<13} {:>10} {:>8}  {:<10} IMAGE\n",
        "DISK", "AGENT", "STATE", "PROTECTION", "LATEST", "RPO", "ALARM"
    ));
    for d in &s.disks {
        out.push_str(&format!(
            "{:<32} {:<20} {:<12} {:<13} {:>10} {:>8}  {:<10} {}\n",
            d.id,
            d.agent,
            d.state,
            if d.protection.is_empty() {
                "-"
            } else {
                &d.protection
            },
            d.latest_point.map_or("-".into(), |p| p.to_string()),
            d.rpo_seconds
                .map_or("-".into(), |r| secs(u64::try_from(r).unwrap_or(0))),
            if d.alarms.is_empty() {
                "-".to_owned()
            } else {
                d.alarms.join(", ")
            },
            d.image
        ));
    }
    for d in s.disks.iter().filter(|d| d.reason.is_some()) {
        out.push_str(&format!("{}\n", d.reason.as_deref().unwrap_or_default()));
    }
    out
}

fn secs(s: u64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_checks_are_one_line_and_name_the_agent() {
        assert!(check_target("web-02", false, true, false).is_ok());
        assert!(check_target("web-02", false, false, true).is_ok());
        for (revoked, known, new, needle) in [
            (true, true, false, "revoked_agents"),
            (false, false, false, "--new-agent"),
        ] {
            let e = check_target("web-02", revoked, known, new).expect_err("refused");
            assert!(e.contains("web-02") && e.contains(needle), "{e}");
            assert!(!e.contains('\n'));
        }
        assert!(check_target("bad name", false, true, false).is_err());
    }

    #[test]
    fn table_reads_at_a_glance() {
        let s = Status {
            receiver: "rx".into(),
            listen: "0.0.0.0:443".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            max_disks: 60,
            rpo_threshold_secs: 900,
            heartbeat_timeout_secs: 120,
            agents: vec![AgentStatus {
                name: "web-01".into(),
                sessions: 1,
                last_contact: Some("2026-01-01T00:00:00Z".into()),
                last_contact_seconds_ago: Some(0),
                revoked: false,
                disks: 1,
                alarms: vec!["heartbeat lost".into()],
            }],
            disks: vec![DiskStatus {
                id: "disk-a".into(),
                agent: "web-01".into(),
                state: "replicating".into(),
                size_bytes: 1 << 30,
                image: "disk-a-flat.vmdk".into(),
                latest_point: Some(7),
                rpo_seconds: Some(1000),
                protection: "protected".into(),
                reason: None,
                points: 3,
                alarms: vec!["RPO alarm".into()],
            }],
        };
        let t = table(&s);
        assert!(
            t.contains("2 ALARM(S)") && t.contains("RPO alarm") && t.contains("heartbeat lost"),
            "{t}"
        );
        assert!(t.contains("1 of 60 disks"), "{t}");
        assert!(
            t.contains("now") && t.contains("16m") && t.contains("replicating"),
            "{t}"
        );
    }
}
