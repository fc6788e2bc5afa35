//! The admin socket's server side: answers [`crate::admin::Request`]s
//! from the shared state of the running `serve`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use super::health::Alarm;
use super::Shared;
use crate::admin::{
    check_target, AgentStatus, DiskStatus, Reassignment, Reply, Request, Status, MAX_REQUEST_BYTES,
};

/// Binds the socket (replacing a stale one: the caller holds the retention
/// lock, so no other `serve` of this config owns it) and serves it.
pub fn serve(shared: Arc<Shared>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = shared.config.admin_socket.clone();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the directory of admin socket {}: {e}",
                path.display()
            )
        })?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on admin socket {} ({e}); set admin_socket in receiver.toml to a writable place",
            path.display()
        )
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, shared).await {
                    warn!("admin socket request failed: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn handle(stream: UnixStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd)
        .take(MAX_REQUEST_BYTES)
        .read_line(&mut line)
        .await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        // Both read files and take locks that a session may hold during an
        // fsync: keep them off the async workers.
        Ok(req) => tokio::task::spawn_blocking(move || answer(&shared, req))
            .await
            .unwrap_or_else(|e| Reply::Error(format!("request failed: {e}"))),
        Err(e) => Reply::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).expect("reply serializes");
    out.push(b'\n');
    wr.write_all(&out).await
}

fn answer(shared: &Shared, req: Request) -> Reply {
    match req {
        Request::Status => match status(shared) {
            Ok(s) => Reply::Status(s),
            Err(e) => Reply::Error(format!("{e:#}")),
        },
        Request::Reassign {
            disk,
            agent,
            new_agent,
        } => match reassign(shared, &disk, &agent, new_agent) {
            Ok(r) => Reply::Reassigned(r),
            Err(e) => Reply::Error(e),
        },
    }
}

fn reassign(
    shared: &Shared,
    disk: &str,
    agent: &str,
    new_agent: bool,
) -> Result<Reassignment, String> {
    let revoked = shared.deny().refuses_name(agent);
    let mut registry = shared.registry.lock().expect("registry lock");
    let known = registry.has_agent(agent) || shared.sessions.contacts().contains_key(agent);
    check_target(agent, revoked, known, new_agent)?;
    let done = crate::admin::apply(&shared.config, &mut registry, disk, agent)
        .map_err(|e| format!("{e:#}"))?;
    drop(registry);
    let mut closed = Vec::new();
    if done.from != agent {
        warn!(
            "disk {disk} reassigned by the operator from agent {} to agent {agent}; points before {} are no longer exportable for it",
            done.from, done.history_from
        );
        // The old owner must not keep writing a disk it no longer owns;
        // when it reconnects its registration of this disk is refused.
        let why = format!("disk {disk} was reassigned to agent {agent}");
        closed = shared
            .sessions
            .close_where(|a, _| a == done.from.as_str(), &why);
        if !closed.is_empty() {
            info!("closed the live session(s) of agent {}: {why}", done.from);
        }
    }
    Ok(Reassignment {
        disk: disk.to_owned(),
        from: done.from,
        to: agent.to_owned(),
        history_from: done.history_from,
        closed_sessions: closed,
    })
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn status(shared: &Shared) -> anyhow::Result<Status> {
    let listing = crate::listing::points(&shared.config, None)?;
    let in_use = shared.in_use.lock().expect("in_use lock").clone();
    let deny = shared.deny();
    let contacts = shared.sessions.contacts();
    let now = SystemTime::now();
    let health = shared.health.disks();
    let registry = shared.registry.lock().expect("registry lock");
    let disks: Vec<DiskStatus> = registry
        .iter()
        .map(|(id, e)| {
            let choices = listing.disks.get(id);
            let h = health.get(id).cloned().unwrap_or_default();
            DiskStatus {
                id: id.clone(),
                agent: e.agent.clone(),
                state: if in_use.contains(id) {
                    "replicating"
                } else {
                    "idle"
                }
                .into(),
                size_bytes: e.size_bytes,
                image: e.image.clone(),
                latest_point: choices.and_then(|c| c.latest),
                rpo_seconds: choices.and_then(|c| c.rpo_seconds),
                protection: h.protection,
                reason: h.reason,
                points: h.points,
                alarms: if shared.health.raised(&Alarm::Rpo(id.clone())) {
                    vec!["RPO alarm".into()]
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    let mut names: std::collections::BTreeSet<String> =
        registry.iter().map(|(_, e)| e.agent.clone()).collect();
    drop(registry);
    names.extend(contacts.keys().cloned());
    let agents = names
        .into_iter()
        .map(|name| {
            let c = contacts.get(&name);
            AgentStatus {
                sessions: c.map_or(0, |c| c.sessions),
                last_contact: c.map(|c| rfc3339(c.last)),
                last_contact_seconds_ago: c
                    .map(|c| now.duration_since(c.last).map_or(0, |d| d.as_secs())),
                revoked: deny.refuses_name(&name),
                disks: disks.iter().filter(|d| d.agent == name).count(),
                alarms: if shared.health.raised(&Alarm::Heartbeat(name.clone())) {
                    vec!["heartbeat lost".into()]
                } else {
                    Vec::new()
                },
                name,
            }
        })
        .collect();
    Ok(Status {
        receiver: shared.config.name.clone(),
        listen: shared.config.listen.to_string(),
        started_at: rfc3339(shared.started),
        max_disks: shared.config.max_disks,
        rpo_threshold_secs: shared.config.rpo_threshold_secs,
        heartbeat_timeout_secs: shared.config.heartbeat_timeout_secs,
        agents,
        disks,
    })
}
