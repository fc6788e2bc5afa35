//! `run`: continuous replication. Every cycle the agent collects the write
//! events the kernel traced for its disks, marks them dirty, reads the
//! dirty data and ships it; on a schedule (or on `bookmark`) it freezes the
//! filesystems, collects the last events, reads the remaining dirty data,
//! thaws, and asks the receiver for a point after it.
//!
//! Nothing is lost silently: every cycle audits the traced sectors against
//! the block layer's own counters, and any gap, lost event, changed disk or
//! reboot marks the disk for a full resync, which starts by itself.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tidemark_common::proto::PointKind;
use tidemark_common::service::{self, Watchdog};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::admin::{self, DiskStatus, Pending, PointInfo, PointWaiting, Reply, Request, Status};
use crate::compare::{ChunkCursor, HASH_LOOKAHEAD};
use crate::config::{AgentConfig, FailoverLeave};
use crate::consistency::freeze::{disk_devices, mount_points, Attempt, Frozen};
use crate::consistency::held::{HeldPoint, Note};
use crate::consistency::scripts::{self, Phase};
use crate::disks::{open_disk, Disk};
use crate::pipeline::{Job, Piece, Pipeline, READ_BYTES};
use crate::progress::{mib, Progress};
use crate::shipper::{now_ms, PointVoided, SendMark, Shipper};
use crate::signals::{StopSignals, Stopping};
use crate::state::{self, DiskState, DrainLog, ResyncReason};
use crate::tracking::{disk_counters, granularity_for, DirtyMap, TrackedDisk, Tracker};
use crate::transport::Connector;

/// Dirty bytes shipped per round at most, so the audit and points come
/// round often even while a resync streams the whole disk.
const CYCLE_BUDGET_BYTES: u64 = 64 << 20;
/// How often the trace buffers are drained, whatever else is going on:
/// often enough that a burst cannot overrun the ring between drains.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// A backlog this large ships without waiting for the cycle's end: about
/// what one trace drain (100 ms) brings at 80 MB/s of writes. Below it,
/// sparse writes still gather for a cycle into one round (each round
/// costs new reader and compressor threads).
const SHIP_NOW_BYTES: u64 = 8 << 20;
/// How often the dirty maps are saved at most while rounds follow each
/// other without a wait; a loop about to wait saves at once (if a save is
/// due at all: `SAVE_TAKEN_BYTES`). A save after
/// every round was a sixth of the agent's CPU at 100 MB/s of churn (a
/// dozen rounds a second, each replacing two files: ext4 writes a file
/// replaced by rename back at once; docs/BENCHMARKS.md, "The dirty maps
/// saved once a second"). What is drained between saves goes into the
/// drain log (`state::DrainLog`), one append per drain.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A disk whose saved state plus its drain log still covers everything
/// dirty (only drains and takes since the save) is saved once this much
/// has been taken since, or this long after the last save, not at every
/// wait: without a save a crash re-ships what was taken since (the saved
/// map still has it), which below this is little. With `state_dir` on a
/// protected disk (the default on a protected root disk) each save is
/// writes the agent then tracks, ships and saved again: 3.5 write
/// requests a second on an idle machine, every cycle's save shipping the
/// last one's.
const SAVE_TAKEN_BYTES: u64 = 1 << 20;
const SAVE_IDLE_EVERY: Duration = Duration::from_secs(60);
/// How often the tracer is drained while a syncfs or FIFREEZE runs: they
/// write the filesystems' dirty pages back as fast as the device takes
/// them, the densest events the tracer sees. 16,000 requests of a
/// writeback came faster than a 256 KiB ring holds in 100 ms on a quiet
/// machine (`e2e_run::a_freeze_that_writes_much_back_does_not_overrun_the_tracer`
/// failed in about half of its runs there); they last a second or so.
const FS_DRAIN_EVERY: Duration = Duration::from_millis(20);
/// How often the trace instance's settings are read back at most while
/// the audit agrees (see `collect`).
const VERIFY_EVERY: Duration = Duration::from_secs(1);
/// A crash-consistent point not taken yet: more became dirty by the time
/// it was to freeze (the filesystems' pages written back, writes while it
/// waited) than it may read under the freeze. The loop ships first; the
/// point stays wanted and follows once the backlog is below the cap.
#[derive(Debug, thiserror::Error)]
#[error("more is dirty than a point reads under a freeze; shipping it first")]
struct Deferred;

/// How often the STATUS line for systemd is refreshed at most.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// One protected disk at run time.
struct DiskRun {
    disk: Disk,
    dirty: DirtyMap,
    /// Ranges taken and sent but not yet acknowledged durable. Saved with
    /// the dirty map, so a crash cannot lose them.
    pending: Vec<Range<u64>>,
    /// Audit base: write+discard sectors counted when the audit started.
    base_sectors: u64,
    /// Sectors of traced events since the audit base.
    seen_sectors: u64,
    resync: Option<ResyncReason>,
    /// The running resync compares checksums (logged once when it starts).
    comparing: bool,
    /// The resync's last dirty byte went to the shipper by this mark: once
    /// the receiver holds everything up to it, the resync is over, though
    /// writes since keep the map dirty. Waiting for a clean map instead
    /// held a disk that is never quiet (a database's log, the agent's own
    /// `state_dir` on the disk) in its resync, and its points with it, for
    /// good.
    swept: Option<SendMark>,
    changed: bool,
    /// The change since the last save is not in the drain log and not a
    /// mere take (a resync begun or ended, a size change, a refusal): the
    /// next save may not be put off (see `SAVE_TAKEN_BYTES`).
    must_save: bool,
    /// Bytes taken from the map since the last save, and when that was.
    taken_since_save: u64,
    saved_at: Instant,
    /// Generation of the last save, and the log of what was drained since
    /// (`state::DrainLog`); None until the first save.
    drained_gen: u64,
    drain_log: Option<DrainLog>,
    /// The diskseq this disk's tracking and dirty map belong to.
    diskseq: Option<u64>,
    /// The device is gone (size 0: a loop device detached, a medium
    /// removed); nothing is read from it until it is back.
    absent: bool,
    /// The device is smaller than its replica: it is not replicated (and
    /// no point is taken) until it has its size back. Why, for the log and
    /// `status`.
    refused: Option<String>,
}

impl DiskRun {
    /// Bytes not yet durable at the receiver: dirty, or sent and not yet
    /// acknowledged, each byte once (a range in flight can be written, and
    /// so be dirty, again; pending ranges of two rounds can overlap).
    fn backlog_bytes(&self) -> u64 {
        let mut pending = self.pending.clone();
        pending.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(pending.len());
        for r in pending {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let in_flight_only: u64 = merged
            .into_iter()
            .map(|r| (r.end - r.start) - self.dirty.dirty_bytes_in(r))
            .sum();
        self.dirty.dirty_bytes() + in_flight_only
    }

    fn counters(&self) -> u64 {
        disk_counters(&self.disk.sysfs).map_or(0, |(w, d)| w + d)
    }

    /// Puts the disk in "resync required": everything is dirty again, and
    /// the audit restarts from now.
    fn require_resync(&mut self, reason: ResyncReason) {
        warn!(
            "disk {} ({}): resync required: {reason}",
            self.disk.id,
            self.disk.device.display()
        );
        crate::metrics::get().resync_required(&self.disk.id, &reason);
        self.dirty.mark_all();
        self.resync = Some(reason);
        self.swept = None;
        self.base_sectors = self.counters();
        self.seen_sectors = 0;
        self.changed = true;
        self.must_save = true;
    }

    /// Takes in the device's current size. Returns true when the disk grew:
    /// the dirty map covers the new range, all of it dirty, and the
    /// receiver must be told the new size. A smaller device is refused,
    /// never replicated as it is: the receiver would have to cut the
    /// replica, and a shrink that is undone (an operator's mistake) would
    /// have lost that data.
    fn apply_size(&mut self, now: u64) -> bool {
        let was = self.disk.size_bytes;
        if now < was {
            if self.refused.is_none() {
                let why = format!(
                    "the disk shrank from {was} to {now} bytes and its replica is never truncated; give the disk back its size (replication resumes with a resync) or protect the smaller disk under a new id"
                );
                warn!(
                    "disk {} ({}): {why}",
                    self.disk.id,
                    self.disk.device.display()
                );
                self.refused = Some(why);
                self.changed = true;
                self.must_save = true;
            }
            return false;
        }
        if self.refused.take().is_some() {
            info!(
                "disk {} ({}): back to {now} bytes after it had shrunk",
                self.disk.id,
                self.disk.device.display()
            );
            self.require_resync(ResyncReason::Resized(format!(
                "it was smaller than its replica ({was} bytes) for a while"
            )));
        }
        if now == was {
            return false;
        }
        info!(
            "disk {} ({}): grew from {was} to {now} bytes: registering it again at the new size and sending the new {}",
            self.disk.id,
            self.disk.device.display(),
            mib(now - was)
        );
        self.dirty = self.dirty.grown(now);
        self.dirty.mark(was..now);
        self.disk.size_bytes = now;
        self.changed = true;
        self.must_save = true;
        true
    }

    fn save(&mut self, dir: &std::path::Path, clean_stop: bool) -> std::io::Result<()> {
        let gen = self.drained_gen + 1;
        state::save(
            dir,
            &DiskState {
                disk_id: self.disk.id.clone(),
                boot_id: state::boot_id(),
                diskseq: self.diskseq,
                base_sectors: self.base_sectors,
                seen_sectors: self.seen_sectors,
                clean_stop,
                resync: self.resync.clone(),
                drained_gen: gen,
            },
            &self.dirty,
            &self.pending,
            // Only the clean stop's save is synced: see `state::save`.
            clean_stop,
        )?;
        // Until the new log is begun, the old one goes on: a crash now
        // replays nothing (its generation is older), which is right, as
        // the map just saved holds all of it.
        self.drained_gen = gen;
        if self.drain_log.is_none() {
            match DrainLog::start(dir, &self.disk.id) {
                Ok(log) => self.drain_log = Some(log),
                Err(e) => warn!(
                    "disk {}: cannot start its drain log's writer: {e}; a crash of the agent under writes would cost a resync",
                    self.disk.id
                ),
            }
        }
        if let Some(log) = &mut self.drain_log {
            log.begin(gen);
        }
        Ok(())
    }

    /// Whether a save (short of a clean stop's) should not wait: see
    /// `SAVE_TAKEN_BYTES`. Without a working drain log every change is
    /// saved, as a crash would otherwise lose what was drained.
    fn save_due(&self) -> bool {
        let log_whole = self.drain_log.as_ref().is_some_and(|l| !l.dropped());
        self.changed
            && (self.must_save
                || !log_whole
                || self.taken_since_save >= SAVE_TAKEN_BYTES
                || self.saved_at.elapsed() >= SAVE_IDLE_EVERY)
    }

    /// Logs a drain's events of this disk (`state::DrainLog`).
    fn log_drain(&mut self, sectors: u64, ranges: &[Range<u64>]) {
        let Some(log) = &mut self.drain_log else {
            return;
        };
        let dropped = log.dropped();
        if !log.append(sectors, ranges) && !dropped {
            warn!(
                "disk {}: its drain log's writer is behind (state_dir on a filesystem frozen for long?); until the next save a crash of the agent under writes would cost a resync",
                self.disk.id
            );
        }
    }
}

/// Restores a disk from its saved state when that can be trusted.
fn restore(dir: &std::path::Path, disk: Disk) -> DiskRun {
    let mut run = DiskRun {
        diskseq: state::diskseq(&disk.sysfs),
        absent: false,
        refused: None,
        dirty: DirtyMap::new(disk.size_bytes, granularity_for(disk.size_bytes)),
        disk,
        pending: Vec::new(),
        base_sectors: 0,
        seen_sectors: 0,
        resync: None,
        comparing: false,
        swept: None,
        changed: true,
        must_save: true,
        taken_since_save: 0,
        saved_at: Instant::now(),
        drained_gen: 0,
        drain_log: None,
    };
    let reason = match state::load(dir, &run.disk.id) {
        Ok(None) => Some(ResyncReason::Initial),
        Err(e) => Some(ResyncReason::StateUnreadable(e)),
        Ok(Some((st, map))) => {
            if st.boot_id != state::boot_id() {
                Some(ResyncReason::Rebooted)
            } else if st.diskseq != state::diskseq(&run.disk.sysfs) {
                Some(ResyncReason::DiskReplaced)
            } else {
                match DirtyMap::from_bytes(&map) {
                    Ok(m) => {
                        info!(
                            "disk {}: resuming from saved state ({} stop, {} dirty); the audit decides whether anything was missed",
                            run.disk.id,
                            if st.clean_stop { "clean" } else { "unclean" },
                            mib(m.dirty_bytes())
                        );
                        run.dirty = m;
                        run.base_sectors = st.base_sectors;
                        run.seen_sectors = st.seen_sectors;
                        run.resync = st.resync;
                        run.drained_gen = st.drained_gen;
                        // What was drained after that save: without it, a
                        // crash under writes always cost a resync.
                        if let Some((sectors, ranges)) =
                            DrainLog::replay(dir, &run.disk.id, st.drained_gen)
                        {
                            if sectors > 0 || !ranges.is_empty() {
                                info!(
                                    "disk {}: {} drained after the last save taken from its drain log",
                                    run.disk.id,
                                    mib(ranges.iter().map(|r| r.end - r.start).sum())
                                );
                            }
                            for r in ranges {
                                run.dirty.mark(r);
                            }
                            run.seen_sectors += sectors;
                        }
                        None
                    }
                    Err(e) => Some(ResyncReason::StateUnreadable(e)),
                }
            }
        }
    };
    if let Some(r) = reason {
        run.require_resync(r);
    }
    // A saved map is of the size the disk had then: a disk resized while
    // the agent was down is handled as if it happened now.
    let device = run.disk.size_bytes;
    if run.dirty.size_bytes() != device {
        run.disk.size_bytes = run.dirty.size_bytes();
        run.apply_size(device);
    }
    run
}

/// The device's current size from sysfs (`size`, in 512-byte sectors, for
/// a disk and a partition alike): a read of a small file, cheap enough
/// for every cycle. None when it cannot be read.
fn device_size(sysfs: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(sysfs.join("size"))
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(512)
}

/// What the loop needs besides the disks.
struct Runner {
    cfg: AgentConfig,
    disks: Vec<DiskRun>,
    tracker: Tracker,
    tracked: Vec<TrackedDisk>,
    instance: String,
    shipper: Shipper,
    progress: Arc<Progress>,
    settings: crate::pipeline::Settings,
    last_point: Option<PointInfo>,
    /// A point that is wanted but cannot be taken yet.
    held: HeldPoint,
    /// A planned failover waiting for the backlog to shrink.
    failover: Option<(FailoverLeave, tokio::sync::oneshot::Sender<Reply>)>,
    /// Fed by every successful drain of the tracer: as long as writes are
    /// being collected the agent is doing its job.
    watchdog: Watchdog,
    last_status: Option<(Instant, String)>,
    /// What `status` answers: refreshed between rounds, and every second
    /// during one.
    status_tx: tokio::sync::watch::Sender<Option<Status>>,
    status_refreshed: Instant,
    /// Last drain of the tracer.
    drained_at: Instant,
    /// Last save of the dirty maps (`SAVE_EVERY`).
    saved_at: Instant,
    /// Last check of the trace instance's settings (`VERIFY_EVERY`).
    verified_at: Instant,
    signals: StopSignals,
    /// A freeze or syncfs given up (`freeze_timeout_secs`) that has not
    /// returned: no other is tried until it does, so that a filesystem
    /// that hangs them costs one blocked thread, not one per point.
    stuck_freeze: Option<(Attempt, Instant)>,
    /// `yield_cpu_lag_secs`, when replication's threads may yield at all.
    yield_limit: Option<Duration>,
    /// The start of the last round whose take left every map empty:
    /// whatever a round takes was written after it, so the round is that
    /// far behind the disks.
    clean_at: Instant,
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Certificates and key first: a configuration mistake is reported
    // before any device or trace instance is touched.
    let connector = Connector::new(&cfg)?;
    let disks: Vec<Disk> = cfg.disks.iter().map(open_disk).collect::<Result<_, _>>()?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state_dir {}", cfg.state_dir.display()))?;
    let tracked: Vec<TrackedDisk> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            TrackedDisk::from_sysfs(i, &d.sysfs, d.size_bytes)
                .with_context(|| format!("cannot inspect {} in sysfs", d.device.display()))
        })
        .collect::<Result<_, _>>()?;
    let instance = instance_name(&cfg.name);
    let _instance_lock = crate::tracking::InstanceLock::take(&instance)?;
    let (tracker, reused) = Tracker::open(&instance, tracked.clone(), cfg.trace_buffer_kb)?;
    if !reused {
        info!("trace instance {instance} (re)created: writes while the agent was down are only known from the audit");
    }
    let runs: Vec<DiskRun> = disks
        .into_iter()
        .map(|d| restore(&cfg.state_dir, d))
        .collect();
    let progress = Arc::new(Progress::default());
    // Connected later, from the loop: the unit starts before the network,
    // and the tracer must be drained while the receiver is unreachable.
    // Registered at the replica's size, which a shrunk disk keeps.
    let registered = runs.iter().map(|r| r.disk.clone()).collect();
    let mut shipper = Shipper::unconnected(connector, registered, None, progress.clone());
    shipper.set_throttle(cfg.send_throttle().map_err(anyhow::Error::msg)?);
    shipper.set_window(cfg.send_window_bytes());
    let (cap, window) = shipper.send_cap();
    if let Some(r) = cfg.read_limit().map_err(anyhow::Error::msg)? {
        info!(
            "resync reads capped at {} (throttle.sync_read_rate)",
            crate::throttle::show_rate(r.rate)
        );
    }
    if cap.is_some() || !cfg.throttle.windows.is_empty() {
        info!(
            "send cap now {}{}",
            cap.map_or_else(|| "unlimited".to_owned(), crate::throttle::show_rate),
            window.map_or_else(String::new, |w| format!(" ({w})"))
        );
    }
    let (admin_tx, mut admin_rx) = mpsc::channel::<Pending>(16);
    let (status_tx, status_rx) = tokio::sync::watch::channel(None);
    let answering = admin::serve(&cfg.admin_socket, admin_tx, status_rx)?;
    if let Some(addr) = cfg.metrics_listen {
        let registry = Arc::new(crate::metrics::get().registry());
        tidemark_common::metrics::serve(addr, registry).await?;
    }

    let yield_limit = match cfg.yield_cpu_lag_secs {
        0 => None,
        secs => match crate::priority::can_yield_and_return() {
            Ok(()) => Some(Duration::from_secs(secs)),
            Err(e) => {
                warn!("yield_cpu_lag_secs = {secs}: {e}; replication competes with the machine's own work at the agent's priority instead (set yield_cpu_lag_secs = 0 to silence this)");
                None
            }
        },
    };
    let mut r = Runner {
        settings: cfg.pipeline_settings(),
        cfg,
        disks: runs,
        tracker,
        tracked,
        instance,
        shipper,
        progress,
        last_point: None,
        held: HeldPoint::default(),
        failover: None,
        watchdog: Watchdog::from_env(),
        last_status: None,
        status_tx,
        status_refreshed: Instant::now(),
        drained_at: Instant::now(),
        saved_at: Instant::now(),
        verified_at: Instant::now(),
        signals: StopSignals::register()?,
        stuck_freeze: None,
        yield_limit,
        clean_at: Instant::now(),
    };
    // Saved at once, with what the drain log gave back: every drain from
    // here on goes into the new log.
    r.persist(false);
    let now = Instant::now();
    let every = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
    let crash_every = every(r.cfg.crash_consistent_interval_secs);
    let app_every = every(r.cfg.app_consistent_interval_secs);
    let mut next_crash = crash_every.map(|d| now + d);
    let mut next_app = app_every.map(|d| now + d);
    let mut bookmarks: Vec<(bool, Option<String>, tokio::sync::oneshot::Sender<Reply>)> =
        Vec::new();
    let cycle = Duration::from_millis(r.cfg.cycle_ms);
    info!("replicating {} disk(s) continuously", r.disks.len());
    // Every disk is tracked from here on; the receiver may come later.
    service::ready(&r.status_line());
    r.watchdog.alive();

    loop {
        let started = Instant::now();
        // Requests that came while the loop was busy shipping a backlog.
        while let Ok(p) = admin_rx.try_recv() {
            r.answer(p, &mut bookmarks);
        }
        let grown = r.check_host();
        if !grown.is_empty() {
            // What is in flight was sent under the old registration: let
            // it be acknowledged there rather than sent twice.
            r.await_acks(Duration::from_secs(5)).await?;
            r.settle();
            for (i, size) in grown {
                r.shipper.resize(i, size);
            }
        }
        // The end of the last iteration drained the tracer, as a rule
        // moments ago: drained again only if that was a drain interval
        // back (an admin request ended the wait, acks for a grown disk).
        r.collect_due()?;
        let now = Instant::now();
        let app_due = next_app.is_some_and(|t| now >= t);
        let crash_due = next_crash.is_some_and(|t| now >= t);
        let mut wanted = if !bookmarks.is_empty() {
            Some(bookmarks.iter().any(|b| b.0))
        } else if app_due || crash_due {
            Some(app_due)
        } else {
            None
        };
        let blocked = r.blocked();
        if let (Some(why), Some(_)) = (&blocked, wanted) {
            // A point claims every disk of the machine: none while one of
            // them is not being replicated.
            warn!("no recovery point: {why}");
            for (_, _, tx) in bookmarks.drain(..) {
                let _ = tx.send(Reply::Error(why.clone()));
            }
            if app_due {
                next_app = app_every.map(|d| now + d);
            }
            if crash_due {
                next_crash = crash_every.map(|d| now + d);
            }
            wanted = None;
        }
        let backlog = r.shippable_bytes();
        let resyncing = r.disks.iter().any(|d| d.resync.is_some());
        let held_because = r.point_held_because(backlog);
        let ready = held_because.is_none() && blocked.is_none();
        let held = if wanted.is_some() || r.failover.is_some() {
            held_because
        } else {
            None
        };
        let was_held = r.held.waiting(Instant::now()).is_some();
        let now_held = held.is_some();
        let note = r.held.update(Instant::now(), held);
        if was_held != now_held {
            // Even a short hold shows in `status`: the snapshot would
            // otherwise wait for the next second within a round.
            r.refresh_status();
        }
        match note {
            // A resync (an initial sync of a large disk above all) can
            // rightly hold points back for hours; it logs its own progress.
            Some(Note::Waiting { secs, why }) if resyncing => {
                info!("a recovery point has waited {secs} s: {why}")
            }
            Some(Note::Waiting { secs, why }) => {
                warn!("a recovery point has waited {secs} s: {why}")
            }
            Some(Note::Released { secs }) => {
                info!("the recovery point held back for {secs} s can be taken now")
            }
            None => {}
        }
        if r.failover.is_some() && ready {
            let (leave, reply) = r.failover.take().expect("checked");
            match r.planned_failover(leave).await {
                Ok(p) => {
                    let _ = reply.send(Reply::Point {
                        id: p.id,
                        kind: p.kind.clone(),
                    });
                    answering.drain(Duration::from_secs(5)).await;
                    return match leave {
                        FailoverLeave::Stopped => r.stop().await,
                        // Saving state would block on a frozen filesystem;
                        // this machine is not replicated from here on.
                        FailoverLeave::Frozen => Ok(()),
                    };
                }
                Err(e) => {
                    let _ = reply.send(Reply::Error(format!("{e:#}")));
                    if e.is::<Stopping>() {
                        return r.stop().await;
                    }
                    warn!("planned failover failed: {e:#}");
                }
            }
        }
        match wanted {
            Some(app) if ready => {
                let name = bookmarks
                    .iter()
                    .find_map(|b| b.1.clone())
                    .unwrap_or_else(|| if app { "app-consistent" } else { "scheduled" }.to_owned());
                match r.point(app, &name, None).await {
                    // The bookmarks and the schedule keep waiting for it,
                    // and the backlog holds it until shipped.
                    Err(e) if e.is::<Deferred>() => {}
                    result => {
                        if let Ok(p) = &result {
                            // A script's `status` right after its `bookmark`
                            // must show this point.
                            r.last_point = Some(p.clone());
                            r.refresh_status();
                        }
                        let reply = match &result {
                            Ok(p) => Reply::Point {
                                id: p.id,
                                kind: p.kind.clone(),
                            },
                            Err(e) => Reply::Error(format!("{e:#}")),
                        };
                        for (_, _, tx) in bookmarks.drain(..) {
                            let _ = tx.send(reply.clone());
                        }
                        if let Err(e) = result {
                            if e.is::<Stopping>() {
                                return r.stop().await;
                            }
                            return Err(e);
                        }
                        if app {
                            next_app = app_every.map(|d| Instant::now() + d);
                        }
                        next_crash = crash_every.map(|d| Instant::now() + d);
                    }
                }
            }
            _ => r.ship().await?,
        }
        r.publish_status();
        // Under writes that never pause, the wait below is skipped round
        // after round and its select never looks at the signals: a stop
        // waited for a round that left nothing dirty, and systemd's stop
        // timeout came first (an unclean stop, a resync at the start).
        if r.signals.asked() {
            return r.stop().await;
        }

        // Wait out the cycle (not at all while a backlog remains), draining
        // the tracer and answering the receiver and the admin socket.
        // What was written during the round decides: collected only at the
        // next drain, it left a round that had emptied the maps waiting
        // for that drain, 100 ms, two or three times a 15 s step of
        // steady churn (docs/BENCHMARKS.md, "A burst ships at once").
        r.collect()?;
        let next_round_now = r.shippable_bytes() > 0 && r.shipper.connected();
        // Saved after this drain: when the writes have stopped, what is
        // saved is exact (a crash during the wait re-ships nothing).
        if !next_round_now || r.saved_at.elapsed() >= SAVE_EVERY {
            r.persist(false);
        }
        let until = if next_round_now {
            Instant::now()
        } else {
            started + cycle
        };
        let point_held = r.held.waiting(Instant::now()).is_some();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                res = r.shipper.idle(left.min(DRAIN_EVERY)) => {
                    res?;
                    r.collect()?;
                    // Acks that came meanwhile: `status` shows what is
                    // still not durable, and a resync they complete is
                    // over now rather than at the next round.
                    r.settle();
                    // A point held back (a resync, the connection, the
                    // backlog) goes once nothing holds it, not a cycle
                    // later.
                    if point_held
                        && r.blocked().is_none()
                        && r.point_held_because(r.shippable_bytes()).is_none()
                    {
                        break;
                    }
                    // The cycle gathers sparse writes into one round. A
                    // burst after a quiet spell ships at once instead:
                    // waiting out the second let 200 MB pile up at
                    // 200 MB/s, far more than a point may read under a
                    // freeze, and under steady churn the backlog then
                    // never came down to it (docs/BENCHMARKS.md, "A
                    // burst ships at once").
                    if r.shipper.connected() && r.shippable_bytes() >= SHIP_NOW_BYTES {
                        break;
                    }
                }
                req = admin_rx.recv() => {
                    if let Some(p) = req {
                        if r.answer(p, &mut bookmarks) {
                            break;
                        }
                    }
                }
                _ = r.signals.recv() => return r.stop().await,
            }
        }
    }
}

/// A pending `bookmark`: app-consistent?, name, where to answer.
type Bookmark = (bool, Option<String>, tokio::sync::oneshot::Sender<Reply>);

/// Asks replication's threads to yield the CPU or to compete, and says
/// which in the metrics.
fn yield_cpu(on: bool) {
    crate::priority::set(on);
    crate::metrics::get().set_yielding(on);
}

/// One trace instance per agent, named after it.
fn instance_name(agent: &str) -> String {
    let clean: String = agent
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("tidemark-{clean}")
}

impl Runner {
    /// Answers a status request at once; queues a bookmark (returns true).
    fn answer(&mut self, p: Pending, bookmarks: &mut Vec<Bookmark>) -> bool {
        match p.request {
            Request::Failover { leave } => {
                if self.failover.is_some() {
                    let _ = p
                        .reply
                        .send(Reply::Error("a failover is already under way".into()));
                    return false;
                }
                let leave = leave.unwrap_or(self.cfg.failover_leave);
                info!("planned failover requested: final app-consistent point, then the receiver refuses this machine's disks (leaving them {leave:?})");
                self.failover = Some((leave, p.reply));
                true
            }
            Request::Bookmark {
                app_consistent,
                name,
            } => {
                bookmarks.push((app_consistent, name, p.reply));
                true
            }
            Request::Status => {
                let _ = p.reply.send(Reply::Status(self.status()));
                false
            }
        }
    }

    /// Looks at every disk's device: gone, back, re-attached (diskseq),
    /// grown or shrunk. Returns the disks that grew, with their new size,
    /// for the receiver to learn. Only from the top of the loop: a size
    /// must not change under a point or a compare.
    fn check_host(&mut self) -> Vec<(usize, u64)> {
        let mut grown = Vec::new();
        for (i, d) in self.disks.iter_mut().enumerate() {
            let size = device_size(&d.disk.sysfs).unwrap_or(0);
            if size == 0 {
                if !d.absent {
                    warn!(
                        "disk {} ({}): the device is gone (size 0: detached, or no medium); nothing of it is replicated until it is back, then a resync compares it with the replica",
                        d.disk.id,
                        d.disk.device.display()
                    );
                    d.absent = true;
                }
                continue;
            }
            let seq = state::diskseq(&d.disk.sysfs);
            let came_back = std::mem::take(&mut d.absent);
            if came_back {
                info!(
                    "disk {} ({}): the device is back ({} bytes)",
                    d.disk.id,
                    d.disk.device.display(),
                    size
                );
            }
            if seq != d.diskseq {
                d.diskseq = seq;
                d.require_resync(ResyncReason::DiskReplaced);
            } else if came_back {
                d.require_resync(ResyncReason::Resized(
                    "the device had no size for a while (no medium)".into(),
                ));
            }
            if d.apply_size(size) {
                match TrackedDisk::from_sysfs(i, &d.disk.sysfs, size) {
                    Ok(t) => {
                        self.tracker.update_disk(t.clone());
                        if let Some(slot) = self.tracked.get_mut(i) {
                            *slot = t;
                        }
                    }
                    // Events past the old end are dropped then; the whole
                    // new range is dirty anyway, and the audit counts them.
                    Err(e) => warn!(
                        "disk {}: cannot read {} after it grew: {e}",
                        d.disk.id,
                        d.disk.sysfs.display()
                    ),
                }
                grown.push((i, size));
            }
        }
        grown
    }

    /// Dirty bytes of the disks a round reads from: not those of a disk
    /// that is gone or refused, which wait for it to come back (counting
    /// them had the loop go round without pause, taking nothing).
    fn shippable_bytes(&self) -> u64 {
        self.disks
            .iter()
            .filter(|d| !d.absent && d.refused.is_none())
            .map(|d| d.dirty.dirty_bytes())
            .sum()
    }

    /// Why no point can be taken now, if a disk is not being replicated.
    fn blocked(&self) -> Option<String> {
        self.disks.iter().find_map(|d| {
            let (id, dev) = (&d.disk.id, d.disk.device.display());
            if let Some(why) = &d.refused {
                Some(format!("disk {id} ({dev}) is not replicated: {why}"))
            } else if d.absent {
                Some(format!(
                    "disk {id} ({dev}) is gone (detached); points resume once it is back and resynced"
                ))
            } else {
                None
            }
        })
    }

    /// Drains the tracer into the dirty maps and audits every disk.
    fn collect(&mut self) -> anyhow::Result<()> {
        // Counters first: every write they count has already been traced
        // (the tracepoint fires before the accounting), so after the drain
        // the events seen must cover at least this much.
        let counted: Vec<u64> = self.disks.iter().map(DiskRun::counters).collect();
        let drained = self.tracker.drain()?;
        self.drained_at = Instant::now();
        for (i, d) in self.disks.iter_mut().enumerate() {
            let ranges = drained.ranges.get(i).map_or(&[][..], Vec::as_slice);
            for range in ranges {
                d.dirty.mark(range.clone());
                d.changed = true;
            }
            let sectors = drained.sectors_seen.get(i).copied().unwrap_or(0);
            d.seen_sectors += sectors;
            if sectors > 0 || !ranges.is_empty() {
                d.log_drain(sectors, ranges);
            }
        }
        self.watchdog.alive();
        // A disk whose resync this drain requires has a new audit base,
        // read after `counted`: audited against it, writes completed in
        // between made a second "resync required", for an audit mismatch,
        // in place of the reason.
        let mut rebased = false;
        if let Some(lost) = &drained.lost {
            for d in &mut self.disks {
                d.require_resync(ResyncReason::EventsLost(lost.clone()));
            }
            rebased = true;
        }
        let mismatch = |d: &DiskRun, c: u64| {
            // A detached device's counters mean nothing; its return costs
            // a resync anyway.
            !d.absent && (c < d.base_sectors || d.seen_sectors < c - d.base_sectors)
        };
        // Reading the instance's settings back is a handful of files: once
        // a second, or at once when the audit fails (tracing switched off
        // is the likely cause then, and the reason to give).
        let audit_fails = self
            .disks
            .iter()
            .zip(&counted)
            .any(|(d, &c)| mismatch(d, c));
        if audit_fails || self.verified_at.elapsed() >= VERIFY_EVERY {
            self.verified_at = Instant::now();
            if let Err(what) = self.tracker.verify() {
                for d in &mut self.disks {
                    d.require_resync(ResyncReason::TracingChanged(what.clone()));
                }
                rebased = true;
                let (t, _) = Tracker::open(
                    &self.instance,
                    self.tracked.clone(),
                    self.cfg.trace_buffer_kb,
                )?;
                self.tracker = t;
            }
        }
        for (d, c) in self.disks.iter_mut().zip(counted) {
            if rebased || !mismatch(d, c) {
                continue;
            }
            let detail = format!(
                "the block layer counted {} written/discarded sectors since the audit base, the tracer reported {}",
                c.saturating_sub(d.base_sectors),
                d.seen_sectors
            );
            d.require_resync(ResyncReason::AuditMismatch(detail));
        }
        // Between rounds the loop refreshes it anyway; within a long one,
        // a second-old answer will do (the backlog takes some counting).
        if self.status_refreshed.elapsed() >= Duration::from_secs(1) {
            self.refresh_status();
        }
        Ok(())
    }

    /// Drains the tracer if it is due: however long a compare, a throttled
    /// read or the send cap takes, the trace buffers are drained on time.
    fn collect_due(&mut self) -> anyhow::Result<()> {
        if self.drained_at.elapsed() >= DRAIN_EVERY {
            self.collect()?;
        }
        Ok(())
    }

    /// Waits until the send cap lets the next piece go, draining the
    /// tracer meanwhile.
    async fn pace(&mut self) -> anyhow::Result<()> {
        while !self.shipper.ready(self.drained_at + DRAIN_EVERY).await? {
            self.collect_due()?;
        }
        self.collect_due()
    }

    /// Reads up to a cycle's budget of dirty data and hands it to the shipper.
    async fn ship(&mut self) -> anyhow::Result<()> {
        if !self.shipper.connected() {
            return Ok(());
        }
        // Lost ranges are dirty before the take: a map emptied by it then
        // holds nothing of a resync that is not in the shipper.
        self.mark_lost();
        let connection = self.shipper.send_mark();
        let mut emptied = vec![false; self.disks.len()];
        let mut left_dirty = false;
        let mut jobs = Vec::new();
        let mut taken = 0u64;
        for (i, d) in self.disks.iter_mut().enumerate() {
            // One job per disk, also an empty one: pieces name their disk
            // by job index.
            let ranges = if d.absent || d.refused.is_some() {
                Vec::new()
            } else {
                d.dirty.take(
                    CYCLE_BUDGET_BYTES.saturating_sub(taken),
                    READ_BYTES as u64 * 4,
                )
            };
            let bytes = ranges.iter().map(|r| r.end - r.start).sum::<u64>();
            taken += bytes;
            d.taken_since_save += bytes;
            emptied[i] = d.dirty.is_clean();
            left_dirty |= !emptied[i] && !d.absent && d.refused.is_none();
            d.pending.extend(ranges.iter().cloned());
            if !ranges.is_empty() {
                d.changed = true;
            }
            // A resync into an image the receiver already has compares
            // checksums: after a lost event or a reboot most of the disk
            // is usually still the same. Comparing is always correct; only
            // a new, empty image (the first sync) is not worth hashing.
            let compare = match &d.resync {
                None => false,
                Some(ResyncReason::Initial) => self.shipper.image_existed.get(i) == Some(&true),
                Some(_) => true,
            };
            if compare && !d.comparing {
                info!(
                    "disk {}: resync by checksum comparison: only blocks that differ from the receiver's image travel",
                    d.disk.id
                );
            }
            d.comparing = compare;
            jobs.push(Job {
                disk: d.disk.clone(),
                ranges,
                compare,
                limit_reads: d.resync.is_some(),
            });
        }
        let written_after = self.clean_at;
        if !left_dirty {
            self.clean_at = Instant::now();
        }
        let mut cut = false;
        if taken > 0 {
            let compared: Vec<(usize, Vec<Range<u64>>)> = jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| j.compare)
                .map(|(i, j)| (i, j.ranges.clone()))
                .collect();
            let taken_ranges: Vec<Vec<Range<u64>>> =
                jobs.iter().map(|j| j.ranges.clone()).collect();
            let mut requests = ChunkCursor::new(&jobs);
            let mut requested = 0u64;
            self.follow_lag(written_after);
            let mut pipeline = self.start_pipeline(jobs)?;
            self.shipper.set_hash_board(Some(pipeline.board.clone()));
            let mut stopping = false;
            loop {
                // Also while no piece comes: threads starved while they
                // yield are switched back from here.
                self.follow_lag(written_after);
                while !cut && requested < pipeline.board.consumed() + HASH_LOOKAHEAD {
                    let Some((disk, offset_bytes, len_bytes)) = requests.next() else {
                        break;
                    };
                    pipeline.board.want(disk, offset_bytes);
                    let request = Piece::HashRequest {
                        disk,
                        offset_bytes,
                        len_bytes,
                    };
                    // try_send waits for a full window without draining
                    // (up to a heartbeat interval per message).
                    while self.shipper.window_full() {
                        self.follow_lag(written_after);
                        self.shipper.wait_window(DRAIN_EVERY).await?;
                        self.collect_due()?;
                    }
                    self.pace().await?;
                    if self.shipper.try_send(request).await?.is_some() {
                        cut = true;
                    }
                    requested += 1;
                }
                if cut {
                    // The hashes will not come: workers waiting for them
                    // stop, and what they would have compared is dirty
                    // again (below).
                    pipeline.board.close();
                }
                if !pipeline.holds_pieces() {
                    // The next piece may be a wait: what is queued goes
                    // first (a batch's frames go together).
                    self.shipper.flush().await;
                }
                self.collect_due()?;
                if self.signals.asked() {
                    // A stop does not wait for the rest of the round: a
                    // resync's reads and the sends may be capped.
                    stopping = true;
                    break;
                }
                let piece = if requested > pipeline.board.consumed() {
                    // Workers may be waiting for hashes: keep taking them
                    // off the connection.
                    match tokio::time::timeout(Duration::from_millis(5), pipeline.next()).await {
                        Ok(p) => p,
                        Err(_) => {
                            self.shipper.pump_ready().await?;
                            continue;
                        }
                    }
                } else {
                    // Reads may be throttled: wake up to drain meanwhile.
                    match tokio::time::timeout(DRAIN_EVERY, pipeline.next()).await {
                        Ok(p) => p,
                        Err(_) => {
                            self.shipper.pump_ready().await?;
                            continue;
                        }
                    }
                };
                let Some(piece) = piece else { break };
                if let Piece::ChunkDone { .. } = piece {
                    continue;
                }
                // Once the receiver is away, what is left goes back to the
                // dirty maps: memory stays bounded however long it is away.
                // A full window can take long to open on a slow or dead
                // link; the tracer is drained meanwhile.
                while !cut && self.shipper.window_full() && !self.signals.asked() {
                    self.follow_lag(written_after);
                    self.shipper.wait_window(DRAIN_EVERY).await?;
                    self.collect_due()?;
                }
                if self.signals.asked() {
                    stopping = true;
                    break;
                }
                let back = if cut {
                    Some(piece)
                } else {
                    self.pace().await?;
                    self.shipper.try_send(piece).await?
                };
                if let Some(p) = back {
                    cut = true;
                    let (disk, range) = p.range();
                    self.disks[disk].dirty.mark(range);
                }
            }
            let read = pipeline.finish();
            self.shipper.set_hash_board(None);
            if let Err(e) = &read {
                // A device that went away mid-read (detached) must not
                // stop the agent: what this round took is dirty again, and
                // the next round's look at the devices says what happened.
                warn!("reading the disks failed: {e}; retrying what this round took");
            }
            if read.is_err() || stopping {
                // What was sent of it is in the shipper too: marked again,
                // it is read again, which costs little.
                for (i, ranges) in taken_ranges.into_iter().enumerate() {
                    for r in ranges {
                        self.disks[i].dirty.mark(r);
                    }
                }
                cut = true;
            }
            if cut {
                // Compared chunks whose pieces never came out are not known
                // to be at the receiver: what this cycle took for a
                // compared disk is dirty again (pieces already sent come
                // back from the shipper as lost or are resent; marking
                // them too costs a compare).
                for (i, ranges) in compared {
                    for r in ranges {
                        self.disks[i].dirty.mark(r);
                    }
                }
            }
            self.shipper.flush().await;
        }
        // Every range this round took is in the shipper, on the connection
        // it began with: a resyncing disk whose map the take emptied has
        // sent the last of its resync by now.
        let mark = self.shipper.send_mark();
        if let (false, Some(start), Some(end)) = (cut, connection, mark) {
            if start.same_connection(end) {
                for (d, emptied) in self.disks.iter_mut().zip(emptied) {
                    if emptied && d.resync.is_some() && d.swept.is_none() {
                        d.swept = Some(end);
                    }
                }
            }
        }
        self.settle();
        Ok(())
    }

    /// What is pending is what the receiver does not hold yet; once it
    /// holds everything sent, a finished resync is over. Called when every
    /// range taken from the maps is in the shipper, acknowledged, or dirty
    /// again: after a round and after a point. Rounds go on under steady
    /// writes with something always in flight, so pending is cut down to
    /// what is unacknowledged each time rather than cleared only when
    /// nothing is (it had grown by every round's ranges: 4.5 GiB of
    /// "backlog" for a 2 GiB disk after 25 s of 200 MB/s churn).
    fn settle(&mut self) {
        self.mark_lost();
        let all_acked = self.shipper.all_acked();
        for (i, d) in self.disks.iter_mut().enumerate() {
            let unacked = if all_acked {
                Vec::new()
            } else {
                self.shipper.unacked_ranges(i)
            };
            if d.pending != unacked {
                d.pending = unacked;
                d.changed = true;
            }
            let swept = d.swept.is_some_and(|m| self.shipper.acked_through(m));
            if d.resync.is_some() && (swept || all_acked && d.dirty.is_clean()) {
                if d.dirty.is_clean() {
                    info!("disk {}: resync complete", d.disk.id);
                } else {
                    info!(
                        "disk {}: resync complete ({} written since, shipped as usual)",
                        d.disk.id,
                        mib(d.dirty.dirty_bytes())
                    );
                }
                d.resync = None;
                d.swept = None;
                d.changed = true;
                d.must_save = true;
            }
        }
    }

    /// Data let go after it was written whose connection ended before
    /// the receiver acknowledged it is dirty again: read again, it ships
    /// the device's current bytes.
    fn mark_lost(&mut self) {
        for (i, range) in self.shipper.take_lost() {
            if let Some(d) = self.disks.get_mut(i) {
                d.dirty.mark(range);
                d.changed = true;
                // Part of the resync may be among it.
                d.swept = None;
            }
        }
    }

    fn persist(&mut self, clean_stop: bool) {
        self.saved_at = Instant::now();
        for d in &mut self.disks {
            if !clean_stop && !d.save_due() {
                continue;
            }
            match d.save(&self.cfg.state_dir, clean_stop) {
                Ok(()) => {
                    d.changed = false;
                    d.must_save = false;
                    d.taken_since_save = 0;
                    d.saved_at = Instant::now();
                }
                Err(e) => warn!(
                    "cannot save state of disk {} in {}: {e}",
                    d.disk.id,
                    self.cfg.state_dir.display()
                ),
            }
        }
    }

    /// Planned failover, phase 2: the final app-consistent point (its
    /// filesystems left frozen if asked, post scripts not run: the workload
    /// stays stopped), then the receiver marks the disks failed over.
    async fn planned_failover(&mut self, leave: FailoverLeave) -> anyhow::Result<PointInfo> {
        let p = self.point(true, "failover", Some(leave)).await?;
        if p.kind != PointKind::AppConsistent.as_str() {
            warn!(
                "the final point {} is {}, not app-consistent (see the warnings above); failing over at it anyway",
                p.id, p.kind
            );
        }
        self.shipper.failover().await?;
        info!(
            "planned failover complete: point {} is final, the receiver refuses this machine's disks until the operator allows them again",
            p.id
        );
        Ok(p)
    }

    /// Takes a point: freeze, collect, read what is dirty, thaw, ship, and
    /// wait until the receiver holds the point durably.
    async fn point(
        &mut self,
        app: bool,
        name: &str,
        failover: Option<FailoverLeave>,
    ) -> anyhow::Result<PointInfo> {
        let mut kind = if app {
            PointKind::AppConsistent
        } else {
            PointKind::CrashConsistent
        };
        self.signals.check()?;
        if app {
            if let Err(e) = self.scripts(Phase::Pre, name).await? {
                warn!("pre script failed ({e}); taking a crash-consistent point instead");
                kind = PointKind::CrashConsistent;
            }
        }
        let mut devices = std::collections::BTreeSet::new();
        let mut unmounted = Vec::new();
        for d in &self.disks {
            let devs = disk_devices(&d.disk.sysfs);
            let mounts = mount_points(&devs)?;
            if mounts.is_empty() {
                unmounted.push(d.disk.id.clone());
            }
            devices.extend(devs);
        }
        let mounts = mount_points(&devices)?;
        // Data shipped since the last point was let go once sent
        // (`Shipper::try_send`). What is lost with a connection is dirty
        // again, and must be in this cut. A crash-consistent point does
        // not wait for the acks: it is void if that connection ends
        // before the point is recorded, and cut again (`PointVoided`).
        // Waiting took 11-23 ms at 200 MB/s of churn, and 3-4 MiB more
        // was dirty by then, enough to put the point off in three of five
        // tries (docs/BENCHMARKS.md, nineteenth session). App-consistent
        // points (their scripts ran) and a failover's are not cut again:
        // they wait until the receiver holds it or it is known lost,
        // before the freeze so that the wait does not lengthen it.
        let cut_again_if_lost = !app && failover.is_none();
        self.mark_lost();
        let requires = if cut_again_if_lost {
            self.shipper.let_go_connection()
        } else {
            None
        };
        while !cut_again_if_lost && self.shipper.let_go_unacked() {
            self.shipper.wait_let_go(DRAIN_EVERY).await?;
            self.collect_due()?;
            self.mark_lost();
            if self.signals.asked() {
                // What a pre script began (a database in backup mode) its
                // post script ends, point or not.
                if app {
                    self.post_scripts(name).await?;
                }
                return Err(Stopping.into());
            }
        }
        // FIFREEZE writes every dirty page of the filesystems back under
        // the freeze, and all of it becomes the point's data, read into
        // memory: gigabytes on a machine with much RAM and buffered
        // writes. Written back first, unfrozen, it shows in the backlog,
        // and the point waits while that is shipped, as it waits for any
        // backlog above the cap; so does what was written while it waited
        // for acks above (unthrottled writes add 50 MB in 100 ms here).
        if !mounts.is_empty() {
            let to_sync = mounts.clone();
            if let Err(e) = self
                .fs_attempt("syncfs", "", move |a| a.sync(&to_sync))
                .await?
            {
                warn!("cannot write the filesystems' dirty pages back before the freeze ({e:#})");
            }
        }
        // An app-consistent point is not deferred: its pre scripts ran
        // (a database flushed, or put in backup mode), and running them
        // again at every retry under churn would be worse than the memory
        // for what they wrote; nor is a planned failover's final point.
        self.collect()?;
        let dirty = self.shippable_bytes();
        if dirty > self.cfg.point_max_backlog_bytes && !app && failover.is_none() {
            tracing::debug!(
                "{} dirty by the time of the freeze, more than point_max_backlog_bytes ({}): shipping first",
                mib(dirty),
                mib(self.cfg.point_max_backlog_bytes)
            );
            return Err(Deferred.into());
        }
        let frozen = match self.freeze(&mounts).await? {
            Ok(f) => Some(f),
            Err(e) => {
                warn!("cannot freeze the filesystems ({e:#}); this point will not be offered as consistent");
                None
            }
        };
        let freeze_time = frozen.as_ref().map_or(Duration::ZERO, |f| f.freeze_time);
        // A planned failover's final point is not given up for a stop once
        // the filesystems are frozen: it may leave them so, and saving the
        // agent's state on a frozen filesystem would hang.
        let stoppable = failover.is_none();
        // Everything written before the freeze returned is now traced.
        let collected = self.collect();
        let before: Vec<u64> = self.disks.iter().map(DiskRun::counters).collect();
        let pieces = match collected {
            Ok(()) => self.read_all_dirty().await,
            Err(e) => Err(e),
        };
        let after: Vec<u64> = self.disks.iter().map(DiskRun::counters).collect();
        let frozen_for = match (frozen, failover) {
            (Some(f), Some(FailoverLeave::Frozen)) => f.keep(),
            (f, _) => f.map_or(Duration::ZERO, |f| f.thaw()),
        };
        if !frozen_for.is_zero() {
            crate::metrics::get().frozen(frozen_for);
        }
        if app && failover.is_none() {
            self.post_scripts(name).await?;
        }
        let pieces = pieces?;
        // Raw writes are not stopped by a freeze, and a disk without a
        // mounted filesystem is not frozen at all: the cut is exact only if
        // no disk was written while its dirty data was read.
        let written = before != after;
        if written {
            warn!(
                "disks were written while the point's data was read{}; recording it as a sync marker, not a recovery point",
                if unmounted.is_empty() { String::new() } else { format!(" (no mounted filesystem to freeze on {})", unmounted.join(", ")) }
            );
            kind = PointKind::SyncMarker;
        } else if frozen_for.is_zero() && !mounts.is_empty() {
            warn!("the filesystems were not frozen for this point; recording it as a sync marker, not a recovery point");
            kind = PointKind::SyncMarker;
        }
        let mut pieces = std::collections::VecDeque::from(pieces);
        while let Some(p) = pieces.pop_front() {
            // A slow receiver keeps the window full for a while, a lost
            // one the connection away until it is back: the tracer is
            // drained meanwhile, as in a round, and a stop is not kept
            // waiting (what was not sent is dirty again, saved with the
            // map).
            while self.shipper.window_full() || !self.shipper.connected() {
                if self.shipper.connected() {
                    self.shipper.wait_window(DRAIN_EVERY).await?;
                } else {
                    self.shipper.idle(DRAIN_EVERY).await?;
                }
                self.collect_due()?;
                if stoppable && self.signals.asked() {
                    for p in std::iter::once(p).chain(pieces) {
                        let (disk, range) = p.range();
                        self.disks[disk].dirty.mark(range);
                    }
                    return Err(Stopping.into());
                }
            }
            self.pace().await?;
            // Handed back if the connection went meanwhile: it waits for
            // the next one above.
            if let Some(back) = self.shipper.try_send_held(p).await? {
                pieces.push_front(back);
            }
        }
        self.pace().await?;
        let agent_time_ms = now_ms();
        // The receiver records the point once its data is durable, which
        // takes a sync or two, seconds on a busy disk, and longer if it
        // restarts meanwhile: the tracer is drained all the while, or a
        // burst of small writes overran its ring (a resync of every
        // disk); and a stop gives the point up (its data, sent, is in
        // the shipper until acknowledged, saved as dirty if it is not).
        let mut sent = self.shipper.new_point(kind, name, requires)?;
        let id = loop {
            let until = self.drained_at + DRAIN_EVERY;
            match self.shipper.point_recorded(&mut sent, Some(until)).await {
                Ok(Some(id)) => break id,
                Ok(None) => {}
                Err(e) if e.is::<PointVoided>() => {
                    info!("{e}");
                    // Its data went on as any other: what it read is
                    // the shipper's to resend, or dirty again.
                    self.mark_lost();
                    return Err(Deferred.into());
                }
                Err(e) => return Err(e),
            }
            self.collect_due()?;
            if stoppable {
                self.signals.check()?;
            }
        };
        self.settle();
        info!(
            "recovery point {id} ({}) durable at the receiver; filesystems frozen for {} ms (freeze took {} ms)",
            kind.as_str(),
            frozen_for.as_millis(),
            freeze_time.as_millis()
        );
        Ok(PointInfo {
            id,
            kind: kind.as_str().to_owned(),
            agent_time_ms,
            freeze_ms: frozen_for.as_millis() as u64,
        })
    }

    /// Waits up to `dur` for the acks of what is in flight, draining the
    /// tracer meanwhile: 5 s of unthrottled writes is several times what
    /// the default ring holds (../shared/CBT.md: 60,000 events a second).
    async fn await_acks(&mut self, dur: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + dur;
        while self.shipper.awaiting_acks() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.shipper.await_acks(left.min(DRAIN_EVERY)).await?;
            self.collect_due()?;
        }
        Ok(())
    }

    /// Runs the operator's scripts of `phase` for the point `name`; the
    /// inner Err says which failed. The tracer is drained while they run:
    /// a database's flush before a point is when it writes the most, and
    /// each script may take up to `script_timeout_secs`.
    async fn scripts(&mut self, phase: Phase, name: &str) -> anyhow::Result<Result<(), String>> {
        let (dir, name) = (self.cfg.scripts_dir.clone(), name.to_owned());
        let timeout = Duration::from_secs(self.cfg.script_timeout_secs);
        let ran = self
            .drain_while(DRAIN_EVERY, move || {
                scripts::run(&dir, phase, &name, timeout)
            })
            .await?;
        Ok(ran.unwrap_or_else(|e| Err(e.to_string())))
    }

    /// Freezes `mounts`, draining the tracer meanwhile: FIFREEZE writes
    /// back what was dirtied since the syncfs before it (a second for
    /// 200 MB here, ../shared/CBT.md), and every request of it is an
    /// event. Waited for `freeze_timeout_secs` at most: a freeze that
    /// takes longer is a device that does not answer or a write that never
    /// ends, and the point goes on without it. The outer error is the
    /// drain's; the inner one why there is no freeze.
    async fn freeze(
        &mut self,
        mounts: &[std::path::PathBuf],
    ) -> anyhow::Result<anyhow::Result<Frozen>> {
        let mounts = mounts.to_vec();
        self.fs_attempt(
            "FIFREEZE",
            "; what it had frozen is thawed, and it thaws what it still freezes once it returns",
            move |a| a.run(&mounts),
        )
        .await
    }

    /// Runs `op`, a filesystem call that may block for good (FIFREEZE,
    /// syncfs), on a blocking thread while the tracer is drained; given up
    /// after `freeze_timeout_secs` (the log names it `what`, `given_up`
    /// says what that leaves). Until a call given up returns, none is
    /// tried: a filesystem that hangs them costs one blocked thread, not
    /// one per point. The outer error is the drain's.
    async fn fs_attempt<T: Send + 'static>(
        &mut self,
        what: &str,
        given_up: &str,
        op: impl FnOnce(&Attempt) -> Result<T, crate::consistency::freeze::FreezeError> + Send + 'static,
    ) -> anyhow::Result<anyhow::Result<T>> {
        if let Some((_, since)) = self.stuck_freeze.as_ref().filter(|(a, _)| !a.returned()) {
            return Ok(Err(anyhow::anyhow!(
                "a freeze or syncfs begun {} s ago has not returned yet (a write on the filesystem that does not end, or a device that does not answer); none is tried until it does",
                since.elapsed().as_secs()
            )));
        }
        self.stuck_freeze = None;
        let wait = Duration::from_secs(self.cfg.freeze_timeout_secs);
        let attempt = Attempt::new();
        let run = attempt.clone();
        let begun = Instant::now();
        let done =
            tokio::time::timeout(wait, self.drain_while(FS_DRAIN_EVERY, move || op(&run))).await;
        Ok(match done {
            Ok(done) => done?.map_err(anyhow::Error::from).and_then(|r| Ok(r?)),
            Err(_) => {
                attempt.give_up();
                self.stuck_freeze = Some((attempt, begun));
                Err(anyhow::anyhow!(
                    "{what} did not return within freeze_timeout_secs = {} s{given_up}",
                    wait.as_secs()
                ))
            }
        })
    }

    /// Runs `f` on a blocking thread and drains the tracer until it
    /// returns. Given up on an error of the drain, `f` runs to its end
    /// anyway, and what it returns is dropped then (a freeze thaws).
    async fn drain_while<T: Send + 'static>(
        &mut self,
        every: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<Result<T, tokio::task::JoinError>> {
        let mut task = tokio::task::spawn_blocking(f);
        loop {
            tokio::select! {
                done = &mut task => return Ok(done),
                _ = tokio::time::sleep_until((self.drained_at + every).into()) => {
                    self.collect()?;
                }
            }
        }
    }

    async fn post_scripts(&mut self, name: &str) -> anyhow::Result<()> {
        if let Err(e) = self.scripts(Phase::Post, name).await? {
            warn!("post script failed: {e}");
        }
        Ok(())
    }

    /// Whether replication's threads yield the CPU now, in a round
    /// shipping what was written after `written_after`
    /// ([`crate::priority::should_yield`]).
    fn follow_lag(&self, written_after: Instant) {
        yield_cpu(crate::priority::should_yield(
            self.yield_limit,
            self.disks.iter().any(|d| d.resync.is_some()),
            written_after.elapsed(),
        ));
    }

    /// Starts reading `jobs`, packed for the receiver's protocol.
    fn start_pipeline(&self, jobs: Vec<Job>) -> anyhow::Result<Pipeline> {
        Ok(Pipeline::start(
            jobs,
            &self.settings,
            self.shipper.sum_kind(),
            self.progress.clone(),
        )?)
    }

    /// Reads every dirty range of every disk into memory (bounded by
    /// `point_max_backlog_bytes`, checked by the caller).
    async fn read_all_dirty(&mut self) -> anyhow::Result<Vec<Piece>> {
        let mut jobs = Vec::new();
        for d in &mut self.disks {
            let ranges = d.dirty.take(u64::MAX, READ_BYTES as u64 * 4);
            d.taken_since_save += ranges.iter().map(|r| r.end - r.start).sum::<u64>();
            d.pending.extend(ranges.iter().cloned());
            d.changed = true;
            jobs.push(Job::full(d.disk.clone(), ranges));
        }
        // A point's read is short, and where it froze filesystems the
        // machine's writes wait for it: it does not give way.
        yield_cpu(false);
        let mut pipeline = self.start_pipeline(jobs)?;
        let mut out = Vec::new();
        // A slow device makes this read long, and raw writes on a disk
        // without a filesystem to freeze go on meanwhile: the tracer is
        // drained as in a round. What it collects now is after the cut
        // (`point` took its events and the dirty maps before this), so it
        // stays dirty for the next round and the point is unaffected.
        loop {
            let due = (self.drained_at + DRAIN_EVERY).into();
            match tokio::time::timeout_at(due, pipeline.next()).await {
                Ok(Some(Piece::ChunkDone { .. })) => {}
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(_) => self.collect_due()?,
            }
        }
        pipeline.finish()?;
        Ok(out)
    }

    /// "3 disk(s) protected, 1 resyncing, receiver connected, backlog
    /// 12 MiB, RPO 4 s" for `systemctl status`.
    fn status_line(&self) -> String {
        let stalled = self
            .disks
            .iter()
            .filter(|d| d.absent || d.refused.is_some())
            .count();
        let resyncing = self
            .disks
            .iter()
            .filter(|d| d.resync.is_some() && !d.absent && d.refused.is_none())
            .count();
        let backlog: u64 = self.disks.iter().map(DiskRun::backlog_bytes).sum();
        let mut rpo = self.last_point.as_ref().map_or_else(
            || "no point yet".to_owned(),
            |p| format!("RPO {} s", now_ms().saturating_sub(p.agent_time_ms) / 1000),
        );
        if let Some((secs, _)) = self.held.waiting(Instant::now()) {
            rpo.push_str(&format!(", next point held back {secs} s (see status)"));
        }
        format!(
            "{} disk(s) protected, {resyncing} resyncing,{} receiver {}, backlog {}, {rpo}",
            self.disks.len() - resyncing - stalled,
            if stalled > 0 {
                format!(" {stalled} not replicated (see status),")
            } else {
                String::new()
            },
            if self.shipper.connected() {
                "connected"
            } else {
                "unreachable"
            },
            mib(backlog)
        )
    }

    /// What `status` (and the held-point gauge) answers from now on.
    fn refresh_status(&mut self) {
        crate::metrics::get()
            .set_point_waiting(self.held.waiting(Instant::now()).map(|(secs, _)| secs));
        self.status_tx.send_replace(Some(self.status()));
        self.status_refreshed = Instant::now();
    }

    fn publish_status(&mut self) {
        self.refresh_status();
        let m = crate::metrics::get();
        m.set_connected(self.shipper.connected());
        m.set_send_cap(self.shipper.send_cap().0);
        for d in &self.disks {
            m.disk(
                &d.disk.id,
                d.disk.size_bytes,
                d.backlog_bytes(),
                d.resync.is_some(),
            );
        }
        let line = self.status_line();
        let due = self.last_status.as_ref().is_none_or(|(at, last)| {
            at.elapsed() >= STATUS_EVERY
                || (*last != line && at.elapsed() >= Duration::from_secs(1))
        });
        if due {
            service::status(&line);
            self.last_status = Some((Instant::now(), line));
        }
    }

    /// Why a point cannot be taken now (None: it can, unless `blocked()`,
    /// which refuses it outright). A point needs the receiver: waiting for
    /// it inside the point would stop draining the tracer.
    fn point_held_because(&self, backlog: u64) -> Option<String> {
        if let Some(d) = self.disks.iter().find(|d| d.resync.is_some()) {
            Some(format!(
                "disk {} is resyncing; the point follows once it is in step",
                d.disk.id
            ))
        } else if !self.shipper.connected() {
            Some(format!(
                "not connected to the receiver {}",
                self.cfg.receiver
            ))
        } else if backlog > self.cfg.point_max_backlog_bytes {
            Some(format!(
                "{} dirty, more than point_max_backlog_bytes ({}) lets a point read under a freeze; the point follows once shipping brings it below that",
                mib(backlog),
                mib(self.cfg.point_max_backlog_bytes)
            ))
        } else {
            None
        }
    }

    fn status(&self) -> Status {
        let (send_cap, send_window) = self.shipper.send_cap();
        Status {
            point_waiting: self
                .held
                .waiting(Instant::now())
                .map(|(secs, reason)| PointWaiting { secs, reason }),
            send_cap_bytes_per_sec: send_cap,
            send_cap_window: send_window,
            sync_read_cap_bytes_per_sec: self.settings.read_limit.as_ref().map(|l| l.rate),
            agent: self.cfg.name.clone(),
            receiver: self.cfg.receiver.clone(),
            connected: self.shipper.connected(),
            last_point: self.last_point.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskStatus {
                    id: d.disk.id.clone(),
                    device: d.disk.device.display().to_string(),
                    state: if d.refused.is_some() {
                        "size-refused".into()
                    } else if d.absent {
                        "detached".into()
                    } else if d.resync.is_some() {
                        "resync-required".into()
                    } else {
                        "protected".into()
                    },
                    resync_reason: d
                        .refused
                        .clone()
                        .or_else(|| d.resync.as_ref().map(ToString::to_string)),
                    dirty_bytes: d.backlog_bytes(),
                })
                .collect(),
        }
    }

    /// Clean stop: wait briefly for outstanding acks, then save every
    /// disk's map with the clean-stop mark. The trace instance stays, so the
    /// next start sees what was written in between.
    async fn stop(mut self) -> anyhow::Result<()> {
        service::stopping();
        info!("stopping: saving dirty state");
        self.await_acks(Duration::from_secs(5)).await?;
        self.settle();
        self.collect()?;
        self.persist(true);
        let _ = std::fs::remove_file(&self.cfg.admin_socket);
        Ok(())
    }
}
