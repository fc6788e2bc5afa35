//! Counters the pipeline and transport update, and how they are shown: a
//! progress bar on a terminal, a log line every few seconds otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default, Debug)]
pub struct Progress {
    /// Bytes to read in this run.
    pub total_bytes: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Bytes found all-zero (sent as zero records).
    pub zero_bytes: AtomicU64,
    /// Uncompressed bytes of data extents.
    pub data_bytes: AtomicU64,
    /// Payload bytes after compression.
    pub payload_bytes: AtomicU64,
    /// Disk bytes the receiver acknowledged durable.
    pub acked_bytes: AtomicU64,
    /// Checksum sync: bytes whose hashes differed from the receiver's.
    pub differing_bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub total_bytes: u64,
    pub read_bytes: u64,
    pub zero_bytes: u64,
    pub data_bytes: u64,
    pub payload_bytes: u64,
    pub acked_bytes: u64,
    pub differing_bytes: u64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            total_bytes: g(&self.total_bytes),
            read_bytes: g(&self.read_bytes),
            zero_bytes: g(&self.zero_bytes),
            data_bytes: g(&self.data_bytes),
            payload_bytes: g(&self.payload_bytes),
            acked_bytes: g(&self.acked_bytes),
            differing_bytes: g(&self.differing_bytes),
        }
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Shows progress until the returned guard is dropped.
pub struct Reporter {
    /// Dropped to stop the thread: it waits on the other end between
    /// updates, so it ends at once rather than after its current wait
    /// (a sleep there held every `sync` and `resync` up to 200 ms at the
    /// end, half the time of a small one).
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the bar is redrawn, and the log line's clock is looked at.
const TICK: Duration = Duration::from_millis(200);

impl Reporter {
    pub fn start(progress: Arc<Progress>, what: String) -> Reporter {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                // True while the reporter lives: waits one tick, or less
                // if it is dropped meanwhile.
                let tick = || {
                    matches!(
                        stopped.recv_timeout(TICK),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    )
                };
                if std::io::stderr().is_terminal() {
                    bar(&progress, tick, &what)
                } else {
                    lines(&progress, tick, &what)
                }
            })
            .ok();
        Reporter {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bar(p: &Progress, tick: impl Fn() -> bool, what: &str) {
    let pb = indicatif::ProgressBar::new(p.total_bytes.load(Ordering::Relaxed));
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("template is valid")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    loop {
        let s = p.snapshot();
        pb.set_length(s.total_bytes);
        pb.set_position(s.acked_bytes.min(s.total_bytes));
        if !tick() {
            break;
        }
    }
    pb.finish_and_clear();
}

fn lines(p: &Progress, tick: impl Fn() -> bool, what: &str) {
    let mut last = Instant::now();
    while tick() {
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            let s = p.snapshot();
            tracing::info!(
                "{what}: read {} of {}, durable {}, sent {} ({} zero)",
                mib(s.read_bytes),
                mib(s.total_bytes),
                mib(s.acked_bytes),
                mib(s.payload_bytes),
                mib(s.zero_bytes)
            );
        }
    }
}
