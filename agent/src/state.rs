//! What the agent keeps on disk between runs, per disk: the dirty map (data
//! not yet durable at the receiver) and the fingerprint that decides on
//! start whether that map can be trusted (same boot, same disk, and the
//! block layer's counters agree with the events still in the tracer).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_common::durable::replace_with;

use crate::tracking::DirtyMap;

/// Why a disk needs a full resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason", content = "detail")]
pub enum ResyncReason {
    /// Never replicated by this agent (or its state was removed).
    Initial,
    /// The tracer lost events (ring buffer overrun, dropped events).
    EventsLost(String),
    /// The block layer counted writes the tracer did not report.
    AuditMismatch(String),
    /// The machine rebooted since the state was written.
    Rebooted,
    /// The device was detached and attached again (diskseq changed).
    DiskReplaced,
    /// The disk came back to (at least) its replicated size after it had
    /// shrunk: what it holds now is unknown.
    Resized(String),
    /// Someone changed or switched off the trace instance.
    TracingChanged(String),
    /// The saved state could not be read.
    StateUnreadable(String),
}

impl std::fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResyncReason::Initial => write!(f, "initial sync"),
            ResyncReason::EventsLost(d) => write!(f, "write events were lost: {d}"),
            ResyncReason::AuditMismatch(d) => write!(f, "audit mismatch: {d}"),
            ResyncReason::Rebooted => write!(f, "the machine rebooted since the last run"),
            ResyncReason::DiskReplaced => {
                write!(f, "the disk was detached and re-attached (diskseq changed)")
            }
            ResyncReason::Resized(d) => write!(f, "the disk was resized: {d}"),
            ResyncReason::TracingChanged(d) => {
                write!(f, "tracing was changed behind the agent's back: {d}")
            }
            ResyncReason::StateUnreadable(d) => write!(f, "saved state unreadable: {d}"),
        }
    }
}

/// The fingerprint and audit position saved with a disk's dirty map.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    pub disk_id: String,
    pub boot_id: String,
    pub diskseq: Option<u64>,
    /// Write + discard sectors the block layer had counted at the audit base.
    pub base_sectors: u64,
    /// Sectors of events seen since the audit base.
    pub seen_sectors: u64,
    /// True only when written by a clean stop.
    pub clean_stop: bool,
    /// A resync that was required and not yet finished.
    pub resync: Option<ResyncReason>,
    /// The drain log begun with this save ([`DrainLog`]); a log of
    /// another generation is older than the map and ignored.
    #[serde(default)]
    pub drained_gen: u64,
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn diskseq(sysfs_dev_dir: &Path) -> Option<u64> {
    // Partitions carry no diskseq of their own: use the whole disk's.
    let read = |p: PathBuf| std::fs::read_to_string(p).ok()?.trim().parse().ok();
    read(sysfs_dev_dir.join("diskseq")).or_else(|| read(sysfs_dev_dir.join("../diskseq")))
}

fn file_name(disk_id: &str, ext: &str) -> String {
    format!("{disk_id}.{ext}")
}

/// Saves a disk's state and dirty map (map first: a state file never
/// describes a map older than itself), fsynced only if `sync`.
///
/// A saved state is trusted only within the boot that wrote it (another
/// boot id means a resync), and within a boot the page cache outlives
/// any crash of the agent: a save then needs no fsync to be found. `run`
/// saves before each wait and once a second between rounds that follow
/// each other: with its four fsyncs a save took 4-5 ms on average under
/// steady writes (2 ms without), time in which nothing shipped
/// (docs/BENCHMARKS.md, "A burst ships at once"). The clean stop's save,
/// made once, still syncs.
pub fn save(
    dir: &Path,
    state: &DiskState,
    dirty: &DirtyMap,
    also_dirty: &[Range<u64>],
    sync: bool,
) -> std::io::Result<()> {
    replace_with(
        &dir.join(file_name(&state.disk_id, "dirty")),
        0o600,
        sync,
        |w| dirty.write_to(also_dirty, w),
    )?;
    let mut json = serde_json::to_vec_pretty(state).expect("state serializes");
    json.push(b'\n');
    replace_with(
        &dir.join(file_name(&state.disk_id, "state")),
        0o600,
        sync,
        |w| w.write_all(&json),
    )
}

/// Loads a disk's state and dirty map; Ok(None) when there is none.
pub fn load(dir: &Path, disk_id: &str) -> Result<Option<(DiskState, Vec<u8>)>, String> {
    let state_path = dir.join(file_name(disk_id, "state"));
    let text = match std::fs::read(&state_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", state_path.display())),
    };
    let state: DiskState =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let dirty_path = dir.join(file_name(disk_id, "dirty"));
    let dirty = std::fs::read(&dirty_path).map_err(|e| format!("{}: {e}", dirty_path.display()))?;
    Ok(Some((state, dirty)))
}

/// What the agent drained from the tracer since its last save, appended
/// at every drain that brought something, so that a crash while writes go
/// on loses none of it: events are gone from the trace instance once
/// read, and saving the whole map at every drain costs far more (see
/// `run`'s `SAVE_EVERY`). Not synced, like the save: the page cache
/// outlives a crash of the agent, and a reboot resyncs anyway.
///
/// Written by a thread of its own: `state_dir` may be on a filesystem a
/// point freezes (the root filesystem, as a rule), where a write waits
/// for the thaw, and the run loop drains the tracer under the freeze and
/// is the one to thaw. Records wait in a bounded queue meanwhile; one
/// that finds it full is dropped with every one after it until the next
/// save, and a crash then costs a resync, as it did before there was a
/// log.
///
/// Each save begins a new log with the save's generation. A crash between
/// the two leaves an older log, whose drains the map already holds: it
/// is ignored. A record cut short by the crash ends the replay there;
/// what it held is then missing from the sectors seen, and the audit asks
/// for a resync.
pub struct DrainLog {
    tx: std::sync::mpsc::SyncSender<LogOp>,
    /// A record was dropped since the last `begin`.
    dropped: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum LogOp {
    Begin(u64),
    Append(Vec<u8>),
}

const DRAIN_LOG_MAGIC: &[u8; 8] = b"TMDRAIN1";

/// Records queued for the writer: at 10 drains a second, well over a
/// minute of a freeze.
const DRAIN_LOG_QUEUE: usize = 1024;

impl DrainLog {
    pub fn path(dir: &Path, disk_id: &str) -> PathBuf {
        dir.join(file_name(disk_id, "drained"))
    }

    /// The writer of `disk_id`'s log; nothing is written before [`begin`].
    ///
    /// [`begin`]: DrainLog::begin
    pub fn start(dir: &Path, disk_id: &str) -> std::io::Result<DrainLog> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<LogOp>(DRAIN_LOG_QUEUE);
        let path = Self::path(dir, disk_id);
        let id = disk_id.to_owned();
        let thread = std::thread::Builder::new()
            .name("drain-log".into())
            .spawn(move || write_drain_log(&path, &id, rx))?;
        Ok(DrainLog {
            tx,
            dropped: false,
            thread: Some(thread),
        })
    }

    /// Begins the log of generation `gen`, empty: the drains after the
    /// save of that generation go into it.
    pub fn begin(&mut self, gen: u64) {
        self.dropped = self.tx.try_send(LogOp::Begin(gen)).is_err();
    }

    /// Appends one drain: the sectors its events covered and the ranges
    /// they made dirty, in one write. False when it was dropped (the
    /// queue is full, or was since the last `begin`).
    pub fn append(&mut self, sectors: u64, ranges: &[Range<u64>]) -> bool {
        if self.dropped {
            return false;
        }
        let mut body = Vec::with_capacity(12 + 16 * ranges.len());
        body.extend_from_slice(&sectors.to_le_bytes());
        body.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        for r in ranges {
            body.extend_from_slice(&r.start.to_le_bytes());
            body.extend_from_slice(&r.end.to_le_bytes());
        }
        let mut rec = Vec::with_capacity(8 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        self.dropped = self.tx.try_send(LogOp::Append(rec)).is_err();
        !self.dropped
    }

    /// Whether a record was dropped since the last `begin`.
    pub fn dropped(&self) -> bool {
        self.dropped
    }

    /// Waits until everything queued is written. Not on drop: a writer
    /// waiting for a thaw that never comes (a freeze kept for a failover)
    /// must not keep the agent from ending.
    pub fn close(mut self) {
        let (tx, thread) = (self.tx, self.thread.take());
        drop(tx);
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// The drains logged after the save of generation `gen`: sectors seen
    /// in all and the ranges they made dirty. None when there is no log
    /// of that generation.
    pub fn replay(dir: &Path, disk_id: &str, gen: u64) -> Option<(u64, Vec<Range<u64>>)> {
        let bytes = std::fs::read(Self::path(dir, disk_id)).ok()?;
        let (head, mut rest) = bytes.split_at_checked(16)?;
        if &head[..8] != DRAIN_LOG_MAGIC || head[8..16] != gen.to_le_bytes() {
            return None;
        }
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let (mut sectors, mut ranges) = (0u64, Vec::new());
        while rest.len() >= 8 {
            let len = u32_at(rest, 0) as usize;
            let Some(body) = rest.get(8..8 + len) else {
                break;
            };
            if len < 12 || crc32c::crc32c(body) != u32_at(rest, 4) {
                break;
            }
            let n = u32_at(body, 8) as usize;
            if len != 12 + 16 * n {
                break;
            }
            sectors += u64_at(body, 0);
            ranges.extend((0..n).map(|i| u64_at(body, 12 + 16 * i)..u64_at(body, 20 + 16 * i)));
            rest = &rest[8 + len..];
        }
        Some((sectors, ranges))
    }
}

/// The drain log's writer thread: a log that cannot be begun or written
/// takes no records until the next `Begin` (said once in the log).
fn write_drain_log(path: &Path, disk_id: &str, rx: std::sync::mpsc::Receiver<LogOp>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file: Option<std::fs::File> = None;
    for op in rx {
        let written = match op {
            LogOp::Begin(gen) => std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| {
                    let mut head = DRAIN_LOG_MAGIC.to_vec();
                    head.extend_from_slice(&gen.to_le_bytes());
                    f.write_all(&head)?;
                    file = Some(f);
                    Ok(())
                }),
            LogOp::Append(rec) => match &mut file {
                Some(f) => f.write_all(&rec),
                None => Ok(()),
            },
        };
        if let Err(e) = written {
            if file.take().is_some() {
                tracing::warn!(
                    "disk {disk_id}: cannot write its drain log {}: {e}; until the next save a crash of the agent under writes costs a resync",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_log_replays_its_own_generation_up_to_a_cut_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(DrainLog::replay(dir.path(), "d", 3), None);
        let mut log = DrainLog::start(dir.path(), "d").expect("start");
        log.begin(3);
        assert!(log.append(16, &[0..4096, 8192..12288]));
        assert!(log.append(8, &[1 << 20..(1 << 20) + 4096]));
        log.close();
        let all = (24, vec![0..4096, 8192..12288, 1 << 20..(1 << 20) + 4096]);
        assert_eq!(DrainLog::replay(dir.path(), "d", 3), Some(all));
        // Another generation's log is older than the map: ignored.
        assert_eq!(DrainLog::replay(dir.path(), "d", 4), None);
        // A record cut short ends the replay before it.
        let path = DrainLog::path(dir.path(), "d");
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("cut");
        assert_eq!(
            DrainLog::replay(dir.path(), "d", 3),
            Some((16, vec![0..4096, 8192..12288]))
        );
        // So does a damaged one.
        let mut bad = bytes.clone();
        bad[16 + 8 + 2] ^= 1;
        std::fs::write(&path, &bad).expect("damage");
        assert_eq!(DrainLog::replay(dir.path(), "d", 3), Some((0, vec![])));
        // A new save's log starts empty.
        let mut log = DrainLog::start(dir.path(), "d").expect("start");
        log.begin(4);
        log.close();
        assert_eq!(DrainLog::replay(dir.path(), "d", 4), Some((0, vec![])));
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path(), "d").expect("load"), None);
        let s = DiskState {
            disk_id: "d".into(),
            boot_id: boot_id(),
            diskseq: Some(4),
            base_sectors: 10,
            seen_sectors: 2,
            clean_stop: true,
            resync: Some(ResyncReason::EventsLost("cpu1 overrun 5".into())),
            drained_gen: 7,
        };
        let mut map = DirtyMap::new(1 << 30, 4096);
        map.mark(8192..12288);
        save(dir.path(), &s, &map, &[1 << 20..(1 << 20) + 1], false).expect("save");
        let (state, bytes) = load(dir.path(), "d").expect("load").expect("saved");
        assert_eq!(state, s);
        let mut want = map.clone();
        want.mark(1 << 20..(1 << 20) + 1);
        assert_eq!(DirtyMap::from_bytes(&bytes).expect("map"), want);
        std::fs::write(dir.path().join("d.state"), "{").expect("write");
        assert!(load(dir.path(), "d").is_err());
    }
}
