//! Disk data to wire pieces: one reader thread per run (io_uring, bounded
//! buffer pool) feeds a pool of compression threads through a crossbeam
//! channel; they split each buffer into zero runs and data runs, checksum
//! and compress the data, and hand the pieces to the transport.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tidemark_common::effort::Effort;
use tidemark_common::proto::messages::{Extent, PayloadError};
use tidemark_common::proto::{Message, SumKind, MAX_EXTENT_BYTES};
use tidemark_common::FAST_ZSTD_LEVEL;
use tokio::sync::mpsc;

use crate::compare::{differing, HashBoard, HASH_BLOCK_BYTES};
use crate::disks::Disk;
use crate::progress::Progress;
use crate::source::{BufPool, DeviceReader, Pages, ReadBuf, SourceError};
use crate::transport::Outgoing;

/// Bytes per read. One extent per read keeps checksums and compression
/// frames aligned with I/O.
pub const READ_BYTES: usize = 1 << 20;
/// Zero detection granularity: a 4 KiB block of zeros travels as a zero
/// record, never as data.
pub const ZERO_BLOCK_BYTES: usize = 4096;
const _: () = assert!(READ_BYTES <= MAX_EXTENT_BYTES as usize);

/// A unit of wire traffic before it gets its sequence number and handle.
#[derive(Debug, Clone)]
pub enum Piece {
    /// `disk` in the extent is the index of the disk in this run. Shared
    /// with the frame being written, so there is one copy, freed once
    /// written unless the shipper keeps it for a resend.
    Data(Arc<Extent>),
    Zero {
        disk: u32,
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// Checksum sync: ask for the receiver's hashes of a chunk.
    HashRequest {
        disk: u32,
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// Not sent: a pipeline's note that the chunk at `offset_bytes` is
    /// compared and every piece of it was handed out before this.
    ChunkDone { disk: u32, offset_bytes: u64 },
}

impl Piece {
    /// Bytes the piece occupies in memory and on the wire (approximately).
    pub fn wire_bytes(&self) -> u64 {
        match self {
            Piece::Data(e) => e.payload.len() as u64 + 64,
            Piece::Zero { .. } | Piece::HashRequest { .. } | Piece::ChunkDone { .. } => 32,
        }
    }

    /// Disk index and byte range this piece covers.
    pub fn range(&self) -> (usize, std::ops::Range<u64>) {
        match self {
            Piece::Data(e) => (
                e.disk as usize,
                e.offset_bytes..e.offset_bytes + u64::from(e.len_bytes),
            ),
            Piece::Zero {
                disk,
                offset_bytes,
                len_bytes,
            } => (*disk as usize, *offset_bytes..offset_bytes + len_bytes),
            Piece::HashRequest {
                disk,
                offset_bytes,
                len_bytes,
            } => (
                *disk as usize,
                *offset_bytes..offset_bytes + u64::from(*len_bytes),
            ),
            Piece::ChunkDone { disk, offset_bytes } => {
                (*disk as usize, *offset_bytes..*offset_bytes)
            }
        }
    }

    /// Disk bytes this piece covers.
    pub fn disk_bytes(&self) -> u64 {
        match self {
            Piece::Data(e) => u64::from(e.len_bytes),
            Piece::Zero { len_bytes, .. } => *len_bytes,
            Piece::HashRequest { .. } | Piece::ChunkDone { .. } => 0,
        }
    }

    /// The piece as a connection whose extents carry `sum` checksums takes
    /// it: pieces are packed for the connection of their time and resent
    /// on the next, which may be to a receiver of an older release.
    pub fn for_connection(self, sum: SumKind) -> Result<Piece, PayloadError> {
        match self {
            Piece::Data(e) if e.checksum.kind() != sum => {
                let mut d = zstd::bulk::Decompressor::new().map_err(|_| PayloadError::BadZstd {
                    expected: e.len_bytes,
                })?;
                Ok(Piece::Data(Arc::new(e.with_sum(sum, &mut d)?)))
            }
            p => Ok(p),
        }
    }

    /// The frame for a session in which disk index i has `handles[i]`;
    /// None for a note that never goes on the wire.
    pub fn to_outgoing(&self, seq: u64, handles: &[u32]) -> Option<Outgoing> {
        let msg = match self {
            Piece::Data(e) => return Some(Outgoing::extent(seq, handles[e.disk as usize], e)),
            Piece::Zero {
                disk,
                offset_bytes,
                len_bytes,
            } => Message::Zero {
                seq,
                disk: handles[*disk as usize],
                offset_bytes: *offset_bytes,
                len_bytes: *len_bytes,
            },
            Piece::HashRequest {
                disk,
                offset_bytes,
                len_bytes,
            } => Message::HashRequest {
                seq,
                disk: handles[*disk as usize],
                offset_bytes: *offset_bytes,
                len_bytes: *len_bytes,
                block_bytes: HASH_BLOCK_BYTES,
            },
            Piece::ChunkDone { .. } => return None,
        };
        Some(Outgoing::message(&msg))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading disk {device}")]
    Read {
        device: String,
        #[source]
        source: SourceError,
    },
    #[error("cannot start a pipeline thread")]
    Spawn(#[source] std::io::Error),
    /// A thread of the pipeline panicked: what it held was never handed
    /// over, so the pass is incomplete, however the others ended.
    #[error("the pipeline's {thread} thread failed ({message}); what it held was not sent")]
    Panicked { thread: String, message: String },
}

/// The message of a panic, from a joined thread's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "no message".to_owned()
    }
}

/// Joins a pipeline thread; a panic becomes [`PipelineError::Panicked`].
fn join<T>(h: JoinHandle<T>) -> Result<T, PipelineError> {
    let thread = h.thread().name().unwrap_or("unnamed").to_owned();
    h.join().map_err(|p| PipelineError::Panicked {
        thread,
        message: panic_message(p.as_ref()),
    })
}

/// Internal signal: the consumer went away, stop quietly.
#[derive(Debug)]
enum Stop {
    Source(SourceError),
    Closed,
}

impl From<SourceError> for Stop {
    fn from(e: SourceError) -> Self {
        Stop::Source(e)
    }
}

/// Pieces a compressor hands over together, at most: one wake-up of the
/// caller per batch instead of per piece. Random 4-64 KiB writes make
/// pieces of some 40 KiB, and per piece a compressor, the caller's loop
/// and the TLS writer each woke: 15,000 switches a second in the agent
/// at 200 MB/s of churn (docs/BENCHMARKS.md, "Pieces handed over in
/// batches").
const BATCH_PIECES: usize = 32;
/// Wire bytes a batch grows to, at most, before it is handed over.
const BATCH_BYTES: u64 = 1 << 20;

pub struct Pipeline {
    /// Batches from the compressors; [`Pipeline::next`] takes them apart.
    batches: mpsc::Receiver<Vec<Piece>>,
    /// The rest of the batch being taken apart.
    held: std::collections::VecDeque<Piece>,
    /// Where checksum-sync jobs wait for the receiver's hashes.
    pub board: Arc<HashBoard>,
    reader: Option<JoinHandle<Result<(), PipelineError>>>,
    workers: Vec<JoinHandle<()>>,
    /// The reader's buffers on their way to the workers, for
    /// [`Pipeline::finish`] to hand back to the pool when stopping early.
    work: crossbeam_channel::Receiver<(u32, u64, ReadBuf)>,
    /// Set when the pipeline stops: the reader hands nothing more over.
    stop: Arc<AtomicBool>,
}

pub struct Job {
    pub disk: Disk,
    pub ranges: Vec<Range<u64>>,
    /// Checksum sync: send only the blocks whose hashes differ from the
    /// receiver's (which the caller requests through the pipeline's
    /// [`HashBoard`] for every [`READ_BYTES`] chunk of `ranges`).
    pub compare: bool,
    /// A sync or resync: reads go at `throttle.sync_read_rate`.
    pub limit_reads: bool,
}

impl Job {
    /// Sends everything in `ranges`.
    pub fn full(disk: Disk, ranges: Vec<Range<u64>>) -> Job {
        Job {
            disk,
            ranges,
            compare: false,
            limit_reads: false,
        }
    }

    /// The chunks the reader delivers, in order: what to request hashes
    /// for, one request per chunk.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.ranges.iter().flat_map(|r| {
            (r.start..r.end)
                .step_by(READ_BYTES)
                .map(move |off| (off, (r.end - off).min(READ_BYTES as u64) as u32))
        })
    }
}

/// `zstd_level` that turns compression off: every piece goes as it is.
pub const COMPRESSION_OFF: i32 = 0;

pub struct Settings {
    pub queue_depth: usize,
    pub compress_threads: usize,
    /// 0: nothing is compressed (`zstd_level = 0`).
    pub zstd_level: i32,
    /// Read cap for jobs with `limit_reads`, shared by every pipeline of a
    /// run so that cycles cannot add up to more.
    pub read_limit: Option<crate::throttle::ReadLimit>,
    /// Read buffers, shared by every pipeline of a run so they are
    /// allocated once: see [`Settings::pool_for`].
    pub pool: BufPool,
}

impl Settings {
    /// Enough buffers for every read in flight plus one being compressed
    /// and one queued per worker: memory stays bounded however large the
    /// disks are.
    pub fn pool_for(queue_depth: usize, compress_threads: usize, pages: Pages) -> BufPool {
        BufPool::with_pages(queue_depth + 2 * compress_threads.max(1), READ_BYTES, pages)
    }
}

impl Pipeline {
    /// Starts reading `jobs` (disk index = position in `jobs`), packing
    /// extents with `sum` checksums.
    pub fn start(
        jobs: Vec<Job>,
        settings: &Settings,
        sum: SumKind,
        progress: Arc<Progress>,
    ) -> Result<Pipeline, PipelineError> {
        let workers_n = settings.compress_threads.max(1);
        let pool = settings.pool.clone();
        let board = Arc::new(HashBoard::default());
        let compare: Arc<Vec<bool>> = Arc::new(jobs.iter().map(|j| j.compare).collect());
        // Room for every buffer of the pool, which alone bounds the
        // memory: the reader hands a filled buffer over without waiting.
        // With room for one per worker, a compressor a moment late held
        // the reader in `send`, where it neither reaped reads nor issued
        // new ones, and the device's queue ran dry (docs/BENCHMARKS.md,
        // "Read buffers in huge pages").
        let (work_tx, work_rx) = crossbeam_channel::bounded::<(u32, u64, ReadBuf)>(pool.count());
        // Two batches per worker: enough to keep the sender busy, bounded
        // so compressed data never piles up in memory (at most 2 MiB a
        // batch: under BATCH_BYTES, then one more read buffer's pieces).
        let (piece_tx, piece_rx) = mpsc::channel::<Vec<Piece>>(2 * workers_n);

        let mut workers = Vec::new();
        for i in 0..workers_n {
            let rx = work_rx.clone();
            let tx = piece_tx.clone();
            let progress = progress.clone();
            let level = settings.zstd_level;
            let board = board.clone();
            let compare = compare.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("compress-{i}"))
                    .spawn(move || {
                        // `run` may have it give way to the machine's own work.
                        let _yields = crate::priority::Member::join();
                        let packing = Packing { level, sum };
                        compress_worker(rx, tx, packing, workers_n, &progress, &board, &compare)
                    })
                    .map_err(PipelineError::Spawn)?,
            );
        }
        drop(piece_tx);

        let qd = settings.queue_depth;
        let read_limit = settings.read_limit.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::Builder::new()
            .name("reader".into())
            .spawn(move || {
                let _yields = crate::priority::Member::join();
                for (idx, job) in jobs.iter().enumerate() {
                    if job.ranges.is_empty() {
                        // Nothing to read: a device that is gone or
                        // refused is not even opened.
                        continue;
                    }
                    let device = job.disk.device.display().to_string();
                    let read_err = |source| PipelineError::Read {
                        device: device.clone(),
                        source,
                    };
                    let mut reader =
                        DeviceReader::open(&job.disk.device, qd, false).map_err(read_err)?;
                    if job.limit_reads {
                        reader.set_read_limit(read_limit.clone());
                    }
                    let r = reader.read_ranges(&job.ranges, &pool, |off, buf| {
                        if stopped.load(Ordering::Relaxed) {
                            return Err(Stop::Closed);
                        }
                        Progress::add(&progress.read_bytes, buf.len() as u64);
                        work_tx
                            .send((idx as u32, off, buf))
                            .map_err(|_| Stop::Closed)
                    });
                    match r {
                        Ok(()) => {}
                        Err(Stop::Closed) => return Ok(()),
                        Err(Stop::Source(e)) => return Err(read_err(e)),
                    }
                }
                Ok(())
            })
            .map_err(PipelineError::Spawn)?;
        Ok(Pipeline {
            batches: piece_rx,
            held: std::collections::VecDeque::new(),
            board,
            reader: Some(reader),
            workers,
            work: work_rx,
            stop,
        })
    }

    /// The next piece, in the order its compressor handed it over; None
    /// once every piece is out (then call [`Pipeline::finish`]). Cancel
    /// safe: a piece is taken only when this returns it.
    pub async fn next(&mut self) -> Option<Piece> {
        while self.held.is_empty() {
            self.held.extend(self.batches.recv().await?);
        }
        self.held.pop_front()
    }

    /// Whether [`Pipeline::next`] has a piece at hand: a caller that
    /// queues frames flushes them only before it may wait.
    pub fn holds_pieces(&self) -> bool {
        !self.held.is_empty()
    }

    /// [`Pipeline::next`] for a caller outside the runtime.
    pub fn blocking_next(&mut self) -> Option<Piece> {
        while self.held.is_empty() {
            self.held.extend(self.batches.blocking_recv()?);
        }
        self.held.pop_front()
    }

    /// Waits for the threads and returns the reader's error, or that a
    /// thread panicked, if any. Call once [`Pipeline::next`] has returned
    /// `None` (everything was read), or to stop early: this makes every
    /// thread stop. Once the pieces have ended, only an `Ok` here means
    /// every range of the jobs was handed over: a compressor that panicked
    /// ends its share early while the others end normally.
    pub fn finish(&mut self) -> Result<(), PipelineError> {
        self.stop.store(true, Ordering::Relaxed);
        self.batches.close();
        self.held.clear();
        // Unblock workers waiting for hashes that will not come now.
        self.board.close();
        // Unblock workers waiting to hand over a batch.
        while self.batches.try_recv().is_ok() {}
        let r = match self.reader.take() {
            Some(h) => {
                // Stopped early, the workers may leave buffers queued for
                // them in the work channel, and a reader with every buffer
                // out waits for one to come back to the pool. An agent
                // whose sync the receiver refused was found hanging here,
                // the reader waiting with all 20 of the pool's buffers out
                // and no worker left, about one run in ten of
                // tests/tests/compat.rs with an agent that sent what the
                // receiver refuses; with this, none in 40. So: hand back
                // whatever is queued until the reader has stopped (it
                // stops at its next buffer, `stop`).
                while !h.is_finished() {
                    let _ = self.work.recv_timeout(Duration::from_millis(2));
                }
                join(h).and_then(|r| r)
            }
            None => Ok(()),
        };
        let mut workers = Ok(());
        for w in self.workers.drain(..) {
            if let Err(e) = join(w) {
                workers = workers.and(Err(e));
            }
        }
        r.and(workers)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// How a compressor packs extents: its configured zstd level, and the
/// checksum the connection takes.
struct Packing {
    level: i32,
    sum: SumKind,
}

/// Tests make a compressor panic on the chunk at this offset (`u64::MAX`:
/// never), as a bug in it would.
#[cfg(test)]
static PANIC_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX);

fn compress_worker(
    rx: crossbeam_channel::Receiver<(u32, u64, ReadBuf)>,
    tx: mpsc::Sender<Vec<Piece>>,
    Packing { level, sum }: Packing,
    workers: usize,
    progress: &Progress,
    board: &HashBoard,
    compare: &[bool],
) {
    let off = level == COMPRESSION_OFF;
    let mut compressor =
        zstd::bulk::Compressor::new(level).expect("zstd level validated by config");
    let mut fast: Option<zstd::bulk::Compressor<'static>> = None;
    let mut effort = Effort::new(level);
    let mut batch: Vec<Piece> = Vec::new();
    // Hands the batch over; false once the caller is gone.
    let hand_over = |batch: &mut Vec<Piece>| {
        batch.is_empty() || tx.blocking_send(std::mem::take(batch)).is_ok()
    };
    loop {
        let next = match rx.try_recv() {
            Ok(work) => Ok(work),
            Err(_) => {
                // Nothing more to compress now: what is done goes before
                // the wait.
                if !hand_over(&mut batch) {
                    return;
                }
                rx.recv()
            }
        };
        let Ok((disk, offset, buf)) = next else {
            break;
        };
        #[cfg(test)]
        if offset == PANIC_AT.load(Ordering::Relaxed) {
            panic!("a compressor fails at {offset} (test)");
        }
        // Reads waiting for a compressor (one per worker or more) while
        // the sender has room: compression is the slowest step, and a
        // faster level ships this chunk sooner than a smaller one would.
        // When the link (or the receiver) is what is slow, the sender is
        // full and the configured level keeps saving bytes, unless the
        // data barely compresses at it (`Effort`; None: it goes
        // uncompressed).
        let chunk_level = if off {
            None
        } else {
            effort.next_level(rx.len() >= workers && tx.capacity() > 0)
        };
        let mut compressor = match chunk_level {
            None => None,
            Some(l) if l == level => Some(&mut compressor),
            Some(_) => Some(fast.get_or_insert_with(|| {
                zstd::bulk::Compressor::new(FAST_ZSTD_LEVEL).expect("zstd fast level")
            })),
        };
        let send: Vec<Range<usize>> = if compare[disk as usize] {
            // The hashes may be a while: what is done goes first.
            if !hand_over(&mut batch) {
                return;
            }
            let Some(remote) = board.take(disk, offset) else {
                return;
            };
            let d = differing(&buf, &remote);
            Progress::add(
                &progress.differing_bytes,
                d.iter().map(|r| (r.end - r.start) as u64).sum(),
            );
            d
        } else {
            vec![0..buf.len()]
        };
        for part in send {
            for (run_off, run_len, zero) in runs(&buf[part.clone()]) {
                let run_off = part.start + run_off;
                let offset_bytes = offset + run_off as u64;
                let piece = if zero {
                    Progress::add(&progress.zero_bytes, run_len as u64);
                    Piece::Zero {
                        disk,
                        offset_bytes,
                        len_bytes: run_len as u64,
                    }
                } else {
                    let data = &buf[run_off..run_off + run_len];
                    let e =
                        Extent::pack(0, disk, offset_bytes, data, sum, compressor.as_deref_mut());
                    match chunk_level {
                        Some(l) if l == level => effort.observe(l, run_len, e.payload.len()),
                        Some(_) => crate::metrics::get().fast_compressed(run_len as u64),
                        None => crate::metrics::get().stored(run_len as u64),
                    }
                    Progress::add(&progress.data_bytes, run_len as u64);
                    Progress::add(&progress.payload_bytes, e.payload.len() as u64);
                    Piece::Data(Arc::new(e))
                };
                batch.push(piece);
            }
        }
        // Tells the caller every piece of this chunk is out, so it can
        // track how far a resync has durably got.
        batch.push(Piece::ChunkDone {
            disk,
            offset_bytes: offset,
        });
        // Back to the pool before a wait to hand over.
        drop(buf);
        // A batch grows only while the caller is busy with the last: one
        // that waits for pieces gets them at once (in a drain it feeds the
        // receiver, which is what the pair waits for).
        let idle = tx.capacity() == tx.max_capacity();
        let bytes: u64 = batch.iter().map(Piece::wire_bytes).sum();
        if (idle || batch.len() >= BATCH_PIECES || bytes >= BATCH_BYTES) && !hand_over(&mut batch) {
            return;
        }
    }
    hand_over(&mut batch);
}

/// Splits a buffer into maximal runs of all-zero and non-zero
/// [`ZERO_BLOCK_BYTES`] blocks: (offset, length, is_zero).
pub fn runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK_BYTES).enumerate() {
        let zero = is_zero(block);
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 += block.len(),
            _ => out.push((i * ZERO_BLOCK_BYTES, block.len(), zero)),
        }
    }
    out
}

/// Fast all-zero test: ORs 16-byte words (vectorized by the compiler),
/// after a cheap look at the first word, which settles most data blocks.
pub fn is_zero(block: &[u8]) -> bool {
    let word = |c: &[u8]| u128::from_ne_bytes(c.try_into().expect("chunks_exact yields 16 bytes"));
    let mut chunks = block.chunks_exact(16);
    if chunks.clone().next().is_some_and(|c| word(c) != 0) {
        return false;
    }
    let acc = chunks.by_ref().fold(0u128, |acc, c| acc | word(c));
    acc == 0 && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline reading all of the file at `path` with `threads`
    /// compressors, at most `read_limit` bytes a second, and its progress.
    fn file_pipeline(
        path: &std::path::Path,
        size: u64,
        threads: usize,
        read_limit: Option<u64>,
    ) -> (Pipeline, Arc<Progress>) {
        let settings = Settings {
            queue_depth: 2,
            compress_threads: threads,
            zstd_level: 1,
            read_limit: read_limit.map(crate::throttle::ReadLimit::new),
            pool: Settings::pool_for(2, threads, Pages::Small),
        };
        let disk = Disk {
            device: path.to_path_buf(),
            id: "disk".into(),
            size_bytes: size,
            logical_block_bytes: 512,
            sysfs: std::path::PathBuf::new(),
        };
        let progress = Arc::new(Progress::default());
        let mut job = Job::full(disk, vec![0..size]);
        job.limit_reads = read_limit.is_some();
        let p = Pipeline::start(vec![job], &settings, SumKind::Crc32c, progress.clone())
            .expect("pipeline starts");
        (p, progress)
    }

    /// A compressor hands over what it holds before it waits for the next
    /// read: batching pieces must not hold them back while reads are slow
    /// (a throttled resync, a busy device). Here a whole pass is one
    /// batch's worth of pieces, so a compressor that only handed over
    /// full batches would hand over nothing until the last read.
    #[test]
    fn pieces_come_out_while_reads_are_slow() {
        const SIZE: u64 = 8 << 20;
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let path = dir.path().join("disk.raw");
        // Compressible, so that no batch fills by its bytes either.
        let data: Vec<u8> = (0..SIZE).map(|i| b"tidemark "[(i % 9) as usize]).collect();
        std::fs::write(&path, &data).expect("disk file");
        let chunks = SIZE as usize / READ_BYTES;
        assert!(2 * chunks <= BATCH_PIECES, "the pass fits one batch");
        // Two seconds of reads.
        let (mut p, progress) = file_pipeline(&path, SIZE, 1, Some(SIZE / 2));
        let first = p.blocking_next().expect("a piece");
        let read = progress.read_bytes.load(Ordering::Relaxed);
        assert!(
            read <= SIZE / 2,
            "the first piece came out only after {read} of {SIZE} bytes were read"
        );
        let mut done = 0;
        let mut piece = Some(first);
        while let Some(pc) = piece {
            if let Piece::ChunkDone { .. } = pc {
                done += 1;
            }
            piece = p.blocking_next();
        }
        p.finish().expect("the pass completes");
        assert_eq!(done, chunks, "every chunk is reported done");
    }

    /// Dropping a pipeline part-way returns, whatever its threads were
    /// doing. (A guard: the hang `finish` now avoids came from `sync` with
    /// a refusing receiver; these rounds did not reproduce it.)
    #[test]
    fn a_pipeline_stopped_part_way_lets_its_threads_go() {
        const SIZE: u64 = 24 << 20;
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let path = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 7 + i / 4096) as u8 | 1).collect();
        std::fs::write(&path, &data).expect("disk file");
        for round in 0..40u64 {
            let (mut p, _) = file_pipeline(&path, SIZE, 2, None);
            for _ in 0..round % 4 {
                p.blocking_next();
            }
            // Every queue fills while nothing is taken.
            std::thread::sleep(Duration::from_millis(round % 7));
            let (done, stopped) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                drop(p);
                let _ = done.send(());
            });
            stopped
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("round {round}: the pipeline did not stop"));
        }
    }

    /// A compressor that panics ends its share of the pass early while the
    /// others finish theirs: the pieces end as if all was read, so
    /// `finish` must say otherwise, or the caller would count the chunk it
    /// held as sent.
    #[test]
    fn a_compressor_that_panics_fails_the_pass() {
        const SIZE: u64 = 32 << 20;
        const AT: u64 = 30 << 20;
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let path = dir.path().join("disk.raw");
        let data: Vec<u8> = (0..SIZE).map(|i| (i * 13 + i / 4096) as u8 | 1).collect();
        std::fs::write(&path, &data).expect("disk file");
        for threads in [1, 2] {
            PANIC_AT.store(AT, Ordering::Relaxed);
            let (mut p, _) = file_pipeline(&path, SIZE, threads, None);
            let mut chunks = Vec::new();
            while let Some(piece) = p.blocking_next() {
                if let Piece::ChunkDone { offset_bytes, .. } = piece {
                    chunks.push(offset_bytes);
                }
            }
            let r = p.finish();
            PANIC_AT.store(u64::MAX, Ordering::Relaxed);
            assert!(
                !chunks.contains(&AT),
                "{threads} thread(s): the chunk at {AT} was reported done"
            );
            match r {
                Err(PipelineError::Panicked { thread, message }) => {
                    assert!(thread.starts_with("compress-"), "{thread}");
                    assert!(message.contains("fails at"), "{message}");
                }
                other => panic!("{threads} thread(s): finish gave {other:?}"),
            }
            if threads == 2 {
                // The other compressor went on to the end.
                assert!(chunks.contains(&(SIZE - (1 << 20))), "{chunks:?}");
            }
        }
    }

    #[test]
    fn runs_split_zero_and_data() {
        let mut buf = vec![0u8; 5 * ZERO_BLOCK_BYTES + 100];
        buf[ZERO_BLOCK_BYTES + 5] = 1;
        buf[2 * ZERO_BLOCK_BYTES] = 1;
        buf[5 * ZERO_BLOCK_BYTES + 99] = 1;
        let r = runs(&buf);
        assert_eq!(
            r,
            vec![
                (0, ZERO_BLOCK_BYTES, true),
                (ZERO_BLOCK_BYTES, 2 * ZERO_BLOCK_BYTES, false),
                (3 * ZERO_BLOCK_BYTES, 2 * ZERO_BLOCK_BYTES, true),
                (5 * ZERO_BLOCK_BYTES, 100, false),
            ]
        );
        let covered: usize = r.iter().map(|x| x.1).sum();
        assert_eq!(covered, buf.len());
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 15, 16, 4095, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }
}
