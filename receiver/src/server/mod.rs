//! `serve`: accepts agents over mutual TLS and runs one session per
//! connection. The network side is async (tokio); each session's disk
//! writes run on a thread of their own ([`session::Worker`]), so a slow
//! fsync never stalls other agents' connections.
//!
//! SIGHUP rereads receiver.toml: the deny list and the TLS identity (CA,
//! certificate, key) take effect for new connections at once, sessions of
//! agents now revoked are closed, all others go on. A file that does not
//! load is logged and the previous configuration stays.

mod access;
mod admin;
mod hash_ahead;
mod health;
mod metrics;
mod readers;
mod session;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tidemark_common::service::{self, Watchdog};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn, Instrument};

use crate::config::ReceiverConfig;
use crate::journal::points::PointLog;
use crate::registry::Registry;

/// Time a client gets to complete TLS, the preamble and hello: a peer that
/// connects and says nothing must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session with no message at all for this long is closed. Agents send
/// heartbeats far more often.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the STATUS line for systemd is refreshed (and the watchdog
/// pinged, when systemd does not ask for more often).
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// State every session shares.
pub struct Shared {
    pub config: ReceiverConfig,
    pub registry: Mutex<Registry>,
    pub points: Mutex<PointLog>,
    /// Disk ids some live session has registered.
    pub in_use: Mutex<HashSet<String>>,
    /// Taken while the journal is held to `retention_max_gib`: two
    /// sessions pruning at once would each count what the other frees.
    pub cap_lock: Mutex<()>,
    next_session: AtomicU64,
    /// The deny list in force (replaced on reload).
    deny: Mutex<Arc<access::DenyList>>,
    sessions: access::Sessions,
    handshaking: access::Handshaking,
    started: SystemTime,
    health: health::Health,
    metrics: metrics::Metrics,
}

impl Shared {
    fn deny(&self) -> Arc<access::DenyList> {
        self.deny.lock().expect("deny lock").clone()
    }

    /// Whether the state sessions need is usable: the locks every
    /// registration and point takes can be taken. A session stuck while
    /// holding one stalls the others; then the watchdog must not be fed.
    fn usable(&self) -> bool {
        let registry = self.registry.lock().is_ok();
        let points = self.points.lock().is_ok();
        registry && points
    }

    fn status_line(&self) -> String {
        let disks = self.registry.lock().map_or(0, |r| r.len());
        let replicating = self.in_use.lock().map_or(0, |u| u.len());
        let handshaking = self.handshaking.count();
        let mut line = format!(
            "{} agent session(s), {replicating} of {disks} disk(s) replicating",
            self.sessions.count()
        );
        // Only worth a mention when it is more than agents reconnecting.
        if handshaking > 8 {
            line.push_str(&format!(", {handshaking} connection(s) in their handshake"));
        }
        line
    }
}

fn tls_acceptor(
    config: &ReceiverConfig,
    deny: Arc<access::DenyList>,
) -> Result<TlsAcceptor, tidemark_common::tls::TlsError> {
    let tls = tidemark_common::tls::server_config_with_policy(&config.tls_files(), Some(deny))?;
    Ok(TlsAcceptor::from(tls))
}

/// Runs the receiver until SIGINT or SIGTERM; `config_path` is reread on
/// SIGHUP.
pub async fn serve(config: ReceiverConfig, config_path: &Path) -> anyhow::Result<()> {
    // Before anything slow: SIGHUP's default action would kill us.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    for (what, dir) in [
        ("image directory", &config.image_dir),
        ("retention directory", &config.retention_dir),
    ] {
        if !dir.is_dir() {
            anyhow::bail!(
                "{what} {} does not exist; create or mount it (tidemark-receiver init creates both)",
                dir.display()
            );
        }
    }
    crate::config::check_retention_volume(
        &config.retention_dir,
        config.retention_on_root_filesystem,
    )
    .map_err(|m| anyhow::anyhow!(m))?;
    if config.retention_on_root_filesystem {
        warn!(
            "retention directory {} may be on the root filesystem (retention_on_root_filesystem = true): a growing journal can fill it",
            config.retention_dir.display()
        );
    }
    // One serve per retention volume: two would interleave point ids.
    let lock_path = config.retention_dir.join("receiver.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open lock file {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another tidemark-receiver is already serving retention directory {}; stop it first",
            config.retention_dir.display()
        );
    }

    let deny = Arc::new(access::DenyList::from_config(&config));
    let mut acceptor = tls_acceptor(&config, deny.clone())?;
    let registry = Registry::open(&config.registry_path())?;
    let points = PointLog::open(&config.points_path())?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is another process using it, or (for ports below 1024) does this user lack CAP_NET_BIND_SERVICE?", config.listen))?;
    let local = listener.local_addr()?;
    info!(
        "receiver {} listening on {local} ({} disks registered)",
        config.name,
        registry.len()
    );
    let shared = Arc::new(Shared {
        config,
        registry: Mutex::new(registry),
        points: Mutex::new(points),
        in_use: Mutex::new(HashSet::new()),
        cap_lock: Mutex::new(()),
        next_session: AtomicU64::new(1),
        deny: Mutex::new(deny),
        sessions: access::Sessions::default(),
        handshaking: access::Handshaking::default(),
        started: SystemTime::now(),
        health: health::Health::default(),
        metrics: metrics::Metrics::default(),
    });
    admin::serve(shared.clone())?;
    if let Some(addr) = shared.config.metrics_listen {
        let registry = Arc::new(shared.metrics.registry());
        tidemark_common::metrics::serve(addr, registry).await?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Registered once, like `term`: a `ctrl_c()` made at each turn of the
    // loop missed an interrupt that came while the loop was busy (a
    // reload, a slow accept).
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut watchdog = Watchdog::from_env();
    let mut tick = tokio::time::interval(
        watchdog
            .period()
            .map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health_tick = tokio::time::interval(health::EVALUATE_EVERY);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut evaluating: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_status = shared.status_line();
    service::ready(&last_status);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                let acceptor = acceptor.clone();
                let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!("conn", id, %peer);
                tokio::spawn(handle_connection(shared, acceptor, tcp, peer, id).instrument(span));
            }
            _ = tick.tick() => {
                if shared.usable() {
                    watchdog.alive();
                }
                let line = shared.status_line();
                if line != last_status {
                    service::status(&line);
                    last_status = line;
                }
            }
            _ = health_tick.tick() => {
                // One evaluation at a time: a slow retention volume must
                // not pile them up.
                if evaluating.as_ref().is_none_or(|h| h.is_finished()) {
                    let shared = shared.clone();
                    evaluating = Some(tokio::task::spawn_blocking(move || {
                        if let Err(e) = health::evaluate(&shared) {
                            warn!("cannot evaluate RPO and heartbeat alarms: {e:#}");
                        }
                    }));
                }
            }
            _ = hup.recv() => {
                service::reloading();
                match reload(&shared, config_path) {
                    Ok(a) => acceptor = a,
                    Err(e) => error!("reload of {} failed, keeping the previous configuration: {e}", config_path.display()),
                }
                service::ready(&shared.status_line());
            }
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    // Sessions never acknowledge before fsync, so stopping here loses
    // nothing an agent was told is durable.
    service::stopping();
    info!("receiver {} stopping", shared.config.name);
    let _ = std::fs::remove_file(&shared.config.admin_socket);
    drop(lock);
    Ok(())
}

/// Settings that only a restart applies.
const RESTART_ONLY: &[&str] = &[
    "name",
    "listen",
    "image_dir",
    "retention_dir",
    "max_disks",
    "retention_hours",
    "retention_max_gib",
    "retention_on_root_filesystem",
    "thinning",
    "image_format",
    "admin_socket",
    "rpo_threshold_secs",
    "heartbeat_timeout_secs",
    "metrics_listen",
    "metrics_allow_remote",
];

/// Rereads the config: a new deny list and TLS identity for new
/// connections, and revoked agents' sessions closed.
fn reload(shared: &Shared, path: &Path) -> anyhow::Result<TlsAcceptor> {
    let new = ReceiverConfig::load(path)?;
    let deny = Arc::new(access::DenyList::from_config(&new));
    let acceptor = tls_acceptor(&new, deny.clone())?;
    let (old, fresh) = (
        serde_json::to_value(&shared.config)?,
        serde_json::to_value(&new)?,
    );
    for key in RESTART_ONLY {
        if old.get(key) != fresh.get(key) {
            warn!(
                "{key} changed in {}; restart the receiver to apply it (reload applies the revocation lists, ca, cert and key)",
                path.display()
            );
        }
    }
    *shared.deny.lock().expect("deny lock") = deny.clone();
    let closed = shared.sessions.close_where(
        |agent, fingerprint| deny.refuses(Some(agent), fingerprint).is_some(),
        "its certificate was revoked",
    );
    for agent in &closed {
        warn!("closed the live session of agent {agent}: revoked by the reloaded configuration");
    }
    let (names, prints) = deny.counts();
    info!(
        "reloaded {}: certificate {}, {names} agent(s) and {prints} fingerprint(s) revoked, {} session(s) closed",
        path.display(),
        new.cert.display(),
        closed.len()
    );
    Ok(acceptor)
}

async fn handle_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    session_id: u64,
) {
    let _ = tcp.set_nodelay(true);
    let (slot, pushed_out) = shared.handshaking.enter(session_id);
    // One deadline for TLS, preamble and hello together: a peer trickling
    // each part just inside its own limit would otherwise hold the
    // connection three times as long.
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let admitted = tokio::select! {
        r = tokio::time::timeout_at(deadline, admit(&shared, acceptor, tcp, peer, session_id)) => r,
        _ = pushed_out => {
            warn!(
                "dropped connection from {peer} before its handshake finished: {} newer connections were handshaking (the oldest go first)",
                access::Handshaking::MAX
            );
            return;
        }
    };
    drop(slot);
    let (greeted, fingerprint) = match admitted {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            warn!("rejected connection from {peer}: {e:#}");
            return;
        }
        Err(_) => {
            warn!("rejected connection from {peer}: TLS handshake, preamble and hello not done within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let agent = greeted.agent.clone();
    let (_guard, closing) = shared.sessions.open(session_id, &agent, &fingerprint);
    tokio::select! {
        result = session::run(shared.clone(), greeted, session_id) => match result {
            Ok(()) => info!("agent {agent} disconnected"),
            Err(e) => warn!("session with agent {agent} ended: {e:#}"),
        },
        // Dropping the session closes the connection; its worker thread
        // still finishes (and acknowledges) what it had received.
        Ok(why) = closing => warn!("closed the session of agent {agent}: {why}"),
    }
}

/// TLS, the certificate's name and the deny list, then preamble and hello.
/// None: refused, and already logged.
async fn admit(
    shared: &Shared,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    session_id: u64,
) -> anyhow::Result<Option<(session::Greeted, String)>> {
    let tls = acceptor.accept(tcp).await.context("TLS handshake failed")?;
    let end_entity = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let fingerprint =
        end_entity.map_or_else(String::new, |c| tidemark_common::tls::fingerprint_sha256(c));
    let cert_name = end_entity.and_then(|c| tidemark_common::tls::common_name(c));
    let Some(cert_name) = cert_name else {
        warn!("rejected connection from {peer}: client certificate has no common name");
        return Ok(None);
    };
    // A handshake begun under the old deny list may finish after a reload.
    if let Some(why) = shared.deny().refuses(Some(&cert_name), &fingerprint) {
        warn!("refused agent {cert_name} from {peer}: {why}");
        return Ok(None);
    }
    let greeted = session::greet(shared, tls, &cert_name, session_id)
        .await
        .with_context(|| format!("agent {cert_name}"))?;
    Ok(Some((greeted, fingerprint)))
}
