//! `sync`: copy every configured disk to the receiver once and finish with a
//! recovery point. Data the receiver has not acknowledged as durable is
//! kept and sent again after a reconnect, so a dropped connection costs a
//! retry, not a restart.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tidemark_common::proto::{Message, PointKind};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::disks::{open_disk, Disk};
use crate::pipeline::{Job, Piece, Pipeline, Settings};
use crate::progress::{mib, Progress, Reporter, Snapshot};
use crate::transport::{retryable, ConnectError, Connection, Connector};

/// Payload bytes sent but not yet acknowledged; bounds the agent's memory
/// and how much travels again after a reconnect.
const WINDOW_BYTES: u64 = 96 << 20;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct SyncOutcome {
    pub point_id: u64,
    pub kind: PointKind,
    pub stats: Snapshot,
    pub elapsed: Duration,
    /// Per disk: whether the receiver already had an image (original location).
    pub image_existed: Vec<bool>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Connects and registers, retrying with exponential backoff until
/// `give_up_after` has passed without success.
async fn connect_with_retry(
    connector: &Connector,
    disks: &[Disk],
    give_up_after: Duration,
) -> anyhow::Result<(Connection, Vec<u32>, Vec<bool>)> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(500);
    loop {
        let attempt = async {
            let mut c = connector.connect().await?;
            let r = c.register(connector.addr(), disks).await?;
            Ok::<_, ConnectError>((c, r))
        };
        match attempt.await {
            Ok((c, r)) => {
                info!(
                    "connected to receiver {} at {}",
                    c.receiver_name,
                    connector.addr()
                );
                return Ok((c, r.handles, r.image_existed));
            }
            Err(ConnectError::Fatal(m)) => bail!(m),
            Err(ConnectError::Retry(m)) => {
                if started.elapsed() + backoff > give_up_after {
                    bail!("{m}; gave up after {:?} (check that tidemark-receiver serve is running and reachable at {})", started.elapsed(), connector.addr());
                }
                warn!("{m}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

pub async fn sync(cfg: &AgentConfig, give_up_after: Duration) -> anyhow::Result<SyncOutcome> {
    let started = Instant::now();
    let disks: Vec<Disk> = cfg.disks.iter().map(open_disk).collect::<Result<_, _>>()?;
    let connector = Connector::new(cfg)?;
    let (mut conn, mut handles, image_existed) =
        connect_with_retry(&connector, &disks, give_up_after).await?;
    for (d, existed) in disks.iter().zip(&image_existed) {
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

    let progress = Arc::new(Progress::default());
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
    let mut pipeline = Pipeline::start(
        jobs,
        &Settings {
            queue_depth: cfg.queue_depth,
            compress_threads: cfg.compress_threads(),
            zstd_level: cfg.zstd_level,
        },
        progress.clone(),
    )?;
    let _reporter = Reporter::start(progress.clone(), "sync".into());

    let mut conn_opt = Some(conn);
    let mut seq = 0u64;
    let mut inflight: BTreeMap<u64, Piece> = BTreeMap::new();
    let mut inflight_bytes = 0u64;
    let mut resend: VecDeque<Piece> = VecDeque::new();
    let mut source_done = false;
    let mut point_kind: Option<PointKind> = None;
    let mut point_seq: Option<u64> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);

    loop {
        let Some(c) = conn_opt.as_mut() else {
            // Everything unacknowledged goes again, in the original order.
            for (_, p) in std::mem::take(&mut inflight).into_iter().rev() {
                resend.push_front(p);
            }
            inflight_bytes = 0;
            point_seq = None;
            let (c, h, _) = connect_with_retry(&connector, &disks, give_up_after).await?;
            conn = c;
            handles = h;
            conn_opt = Some(conn);
            continue;
        };

        if source_done && resend.is_empty() && point_seq.is_none() {
            let kind = *point_kind.get_or_insert_with(|| {
                let after: Vec<_> = disks.iter().map(Disk::write_counters).collect();
                consistency(&disks, &counters_before, &after)
            });
            seq += 1;
            let point = Message::Point {
                seq,
                kind,
                name: "sync".into(),
                agent_time_ms: now_ms(),
            };
            if let Err(e) = c.send(&point).await {
                warn!("connection lost sending the recovery point: {e}");
                conn_opt = None;
                continue;
            }
            point_seq = Some(seq);
        }

        let can_send = point_seq.is_none()
            && inflight_bytes < WINDOW_BYTES
            && !(source_done && resend.is_empty());
        tokio::select! {
            m = c.incoming.recv() => match m {
                Some(Ok(Message::Ack { seq: acked })) => {
                    let rest = inflight.split_off(&(acked + 1));
                    for p in std::mem::replace(&mut inflight, rest).into_values() {
                        inflight_bytes -= p.wire_bytes();
                        Progress::add(&progress.acked_bytes, p.disk_bytes());
                    }
                }
                Some(Ok(Message::PointRecorded { seq: s, point_id })) if Some(s) == point_seq => {
                    drop(_reporter);
                    return Ok(SyncOutcome {
                        point_id,
                        kind: point_kind.expect("a point was sent"),
                        stats: progress.snapshot(),
                        elapsed: started.elapsed(),
                        image_existed,
                    });
                }
                Some(Ok(Message::Heartbeat { .. })) => {}
                Some(Ok(Message::Error { code, message })) => {
                    if retryable(code) {
                        warn!("receiver reported {code:?}: {message}; reconnecting");
                        conn_opt = None;
                    } else {
                        bail!("receiver {} refused: {message}", connector.addr());
                    }
                }
                Some(Ok(other)) => {
                    warn!("unexpected {} from receiver; reconnecting", other.name());
                    conn_opt = None;
                }
                Some(Err(e)) => {
                    warn!("connection to receiver {} lost: {e}; reconnecting", connector.addr());
                    conn_opt = None;
                }
                None => {
                    warn!("connection to receiver {} lost; reconnecting", connector.addr());
                    conn_opt = None;
                }
            },
            p = next_piece(&mut resend, &mut pipeline), if can_send => match p {
                Some(piece) => {
                    seq += 1;
                    let msg = piece.to_message(seq, &handles);
                    inflight_bytes += piece.wire_bytes();
                    inflight.insert(seq, piece);
                    let buffered = c.send_buffered(&msg).await;
                    // Flush when nothing else is ready, so frames go out in
                    // large TLS records without delaying the last one.
                    let sent = match buffered {
                        Ok(()) if resend.is_empty() && pipeline.pieces.is_empty() => c.flush().await,
                        other => other,
                    };
                    if let Err(e) = sent {
                        warn!("connection to receiver {} lost: {e}; reconnecting", connector.addr());
                        conn_opt = None;
                    }
                }
                None => {
                    pipeline.finish().context("reading the disks failed; no recovery point was taken")?;
                    source_done = true;
                    if let Some(c) = conn_opt.as_mut() {
                        if let Err(e) = c.flush().await {
                            warn!("connection lost: {e}; reconnecting");
                            conn_opt = None;
                        }
                    }
                }
            },
            _ = heartbeat.tick() => {
                if let Err(e) = c.send(&Message::Heartbeat { time_ms: now_ms() }).await {
                    warn!("connection to receiver {} lost: {e}; reconnecting", connector.addr());
                    conn_opt = None;
                }
            }
        }
    }
}

/// The next piece: first anything to resend, then fresh data.
async fn next_piece(resend: &mut VecDeque<Piece>, pipeline: &mut Pipeline) -> Option<Piece> {
    if let Some(p) = resend.pop_front() {
        return Some(p);
    }
    pipeline.pieces.recv().await
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
