//! `serve`: accepts agents over mutual TLS and runs one session per
//! connection. The network side is async (tokio); each session's disk
//! writes run on a thread of their own ([`session::Worker`]), so a slow
//! fsync never stalls other agents' connections.

mod session;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn, Instrument};

use crate::config::ReceiverConfig;
use crate::journal::points::PointLog;
use crate::registry::Registry;

/// Time a client gets to complete TLS and the preamble: a peer that
/// connects and says nothing must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A session with no message at all for this long is closed. Agents send
/// heartbeats far more often.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// State every session shares.
pub struct Shared {
    pub config: ReceiverConfig,
    pub registry: Mutex<Registry>,
    pub points: Mutex<PointLog>,
    /// Disk ids some live session has registered.
    pub in_use: Mutex<HashSet<String>>,
    next_session: AtomicU64,
}

/// Runs the receiver until SIGINT or SIGTERM.
pub async fn serve(config: ReceiverConfig) -> anyhow::Result<()> {
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
    crate::config::check_retention_volume(&config.retention_dir).map_err(|m| anyhow::anyhow!(m))?;
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

    let tls = tidemark_common::tls::server_config(&config.tls_files())?;
    let acceptor = TlsAcceptor::from(tls);
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
        next_session: AtomicU64::new(1),
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    // Sessions never acknowledge before fsync, so stopping here loses
    // nothing an agent was told is durable.
    info!("receiver {} stopping", shared.config.name);
    drop(lock);
    Ok(())
}

async fn handle_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    session_id: u64,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!("rejected connection from {peer}: TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!("rejected connection from {peer}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let cert_name = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| tidemark_common::tls::common_name(c));
    let Some(cert_name) = cert_name else {
        warn!("rejected connection from {peer}: client certificate has no common name");
        return;
    };
    match session::run(shared, tls, cert_name.clone(), session_id).await {
        Ok(()) => info!("agent {cert_name} disconnected"),
        Err(e) => warn!("session with agent {cert_name} ended: {e:#}"),
    }
}
