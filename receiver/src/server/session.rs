//! One agent connection: preamble, hello, then a stream of registrations,
//! extents and points. The reader task decodes frames and hands them, in
//! order, to a [`Worker`] thread that verifies, writes, fsyncs and
//! acknowledges.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use tidemark_common::proto::frame::{read_message, write_message, FrameError};
use tidemark_common::proto::handshake::{self, PREAMBLE_BYTES};
use tidemark_common::proto::messages::{Codec, Extent, PayloadError};
use tidemark_common::proto::{ErrorCode, Message, PointKind, SumKind, MAX_FRAME_BYTES};

use super::hash_ahead::{zero_hashes, HashAhead};
use super::readers::{Pending, Readers, When};
use super::{Shared, IDLE_TIMEOUT};
use crate::config::ImageFormat;
use crate::failover;
use crate::image::disk_uuid;
use crate::image::storage::aligned_range;
use crate::image::{live, Image, ImageError};
use crate::journal::points::read_all;
use crate::journal::ranges::Ranges;
use crate::journal::undo::{self, UndoLog};
use crate::registry::{validate_disk_id, DiskEntry, Registry, SizeBefore};

/// Payload bytes received between fsyncs while the agent keeps the input
/// full: half the agent's default window (8 MiB of payload), so an ack
/// is on its way before the agent runs out of window and the link never
/// stands still for a sync. At 64 MiB, batches ended only on their age
/// (SYNC_DELAY_MAX) and a steady 200 MB/s of churn waited on the window:
/// about 13 MiB acked per 50 ms plus an 11 ms sync (docs/BENCHMARKS.md).
/// An agent configured with a larger window gets more acks than it needs,
/// not fewer.
const SYNC_EVERY_BYTES: u64 = 4 << 20;
/// With the input drained, how long to wait for the agent's next message
/// before syncing what is written (see `pump`).
const SYNC_GRACE: Duration = Duration::from_millis(2);
/// The longest a write waits for its sync while messages keep coming
/// slower than SYNC_EVERY_BYTES per this time (168 MB/s).
const SYNC_DELAY_MAX: Duration = Duration::from_millis(50);
/// Pre-images are read and journaled in pieces of at most this size.
const UNDO_CHUNK_BYTES: u64 = 4 << 20;
/// Separate ranges a disk remembers as journaled since its newest point
/// (`OpenDisk::journaled`) at most: about 10 MiB of B-tree at worst. Past
/// it, overwrites outside those ranges are journaled every time, as
/// before the set existed: more journal, never less history.
const JOURNALED_RANGES_MAX: usize = 1 << 18;
/// How far ahead of a hash request the image is read in the background.
const HASH_PREFETCH_BYTES: u64 = 16 << 20;
/// Hash requests at least this large are hashed on two threads.
const PARALLEL_HASH_BYTES: usize = 256 << 10;
/// Extent buffers kept for reuse.
const SPARE_BUFFERS: usize = 4;
/// Messages queued between the reader and the worker.
const WORK_QUEUE: usize = 16;
/// Frame bytes queued between the reader and the worker: an agent's window
/// up to 16 MiB of payload (twice the default) and one more frame, so an
/// agent that ignores acks cannot make a session hold more; a larger
/// window waits here for the worker.
const QUEUE_BYTES: usize = (16 << 20) + MAX_FRAME_BYTES;
/// Overwrites held back for their undo records at most: a well-behaved
/// agent's window stays below it, while SYNC_EVERY_BYTES of payload can
/// be many times that once decompressed.
const QUEUED_MAX_BYTES: u64 = 32 << 20;
/// Pre-images being read at most before the session waits for the oldest
/// (their bytes are bounded by QUEUED_MAX_BYTES too).
const PRE_READS_MAX: usize = 64;
/// Replies queued for the agent. A Hashes reply is up to 1 MiB, so this
/// bounds what an agent that stops reading can make us hold to 16 MiB.
const OUT_QUEUE: usize = 16;
/// A session whose agent takes nothing we send for this long is closed:
/// it stopped reading, and its replies would pile up.
const WRITE_TIMEOUT: Duration = IDLE_TIMEOUT;

/// How long a refused agent gets to read our Error and close.
const LINGER: Duration = Duration::from_secs(2);

/// A message for the worker and its share of [`QUEUE_BYTES`].
type Work = (Message, OwnedSemaphorePermit);
/// An agent's earlier session that has been silent this long (two missed
/// heartbeats) gives way when the same agent connects again.
const SUPERSEDE_SILENT: std::time::Duration = std::time::Duration::from_secs(20);

/// Why a session stopped, as sent to the agent.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

fn storage(e: impl std::error::Error) -> Refusal {
    let mut msg = e.to_string();
    let (mut full, mut eio) = (false, false);
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            full |= io.kind() == std::io::ErrorKind::StorageFull;
            eio |= io.raw_os_error() == Some(nix::errno::Errno::EIO as i32);
        }
        src = s.source();
    }
    // The agent keeps retrying (Storage is retryable) and resends
    // everything unacknowledged once the storage works again.
    if full {
        msg.push_str("; the volume is full: free space on it (or grow it); replication resumes by itself, nothing acknowledged was lost");
    } else if eio {
        msg.push_str("; I/O error: check the disk holding that file (dmesg, SMART); nothing of this batch was acknowledged, replication resumes by itself once it can be written again");
    }
    Refusal::new(ErrorCode::Storage, msg)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A connection past preamble and hello.
pub struct Greeted {
    rd: ReadHalf<TlsStream<TcpStream>>,
    wr: WriteHalf<TlsStream<TcpStream>>,
    pub agent: String,
    /// The protocol version agreed in the preamble.
    protocol: u16,
}

/// Preamble and hello; the caller bounds the time they take.
pub async fn greet(
    shared: &Shared,
    tls: TlsStream<TcpStream>,
    cert_name: &str,
    session_id: u64,
) -> anyhow::Result<Greeted> {
    let (mut rd, mut wr) = tokio::io::split(tls);

    let mut pre = [0u8; PREAMBLE_BYTES];
    rd.read_exact(&mut pre).await.context("reading preamble")?;
    let protocol = match handshake::receiver_choose(&pre) {
        Ok(v) => {
            wr.write_all(&handshake::receiver_reply(v)).await?;
            v
        }
        Err(e) => {
            if e != handshake::HandshakeError::BadMagic {
                wr.write_all(&handshake::receiver_reply(0)).await?;
                let _ = wr.shutdown().await;
            }
            return Err(e.into());
        }
    };

    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    let hello = match read_message(&mut rd, &mut buf).await {
        Ok(m) => m,
        Err(e) => {
            let text = describe(&e);
            if !matches!(e, FrameError::Io(_)) {
                let err = Message::Error {
                    code: ErrorCode::Protocol,
                    message: text.clone(),
                };
                let _ = write_message(&mut wr, &err, &mut scratch).await;
                let _ = wr.shutdown().await;
            }
            anyhow::bail!("protocol error before hello: {text}");
        }
    };
    let agent = match hello {
        Some(Message::Hello {
            agent_name,
            software_version,
        }) => {
            if agent_name != cert_name {
                let msg = format!(
                    "agent says it is {agent_name:?} but its certificate is for {cert_name:?}; use the certificate issued for this agent"
                );
                let err = Message::Error {
                    code: ErrorCode::Unauthorized,
                    message: msg.clone(),
                };
                write_message(&mut wr, &err, &mut scratch).await?;
                let _ = wr.shutdown().await;
                anyhow::bail!(msg);
            }
            info!(
                "agent {agent_name} connected (tidemark {software_version}, protocol {protocol})"
            );
            agent_name
        }
        Some(other) => anyhow::bail!("expected hello, got {}", other.name()),
        None => anyhow::bail!("closed before hello"),
    };
    write_message(
        &mut wr,
        &Message::Welcome {
            receiver_name: shared.config.name.clone(),
            session_id,
        },
        &mut scratch,
    )
    .await?;
    wr.flush().await?;
    Ok(Greeted {
        rd,
        wr,
        agent,
        protocol,
    })
}

/// How the task writing to the agent ended.
enum WriterEnd {
    /// Everything queued was sent.
    Done,
    /// An Error was sent and our side shut: the session ends.
    Refused,
    Failed(std::io::Error),
    /// The agent took nothing for [`WRITE_TIMEOUT`].
    Stalled,
}

pub async fn run(shared: Arc<Shared>, greeted: Greeted, session_id: u64) -> anyhow::Result<()> {
    let Greeted {
        mut rd,
        mut wr,
        agent,
        protocol,
    } = greeted;
    let mut buf = Vec::new();

    let (out_tx, mut out_rx) = mpsc::channel::<Message>(OUT_QUEUE);
    let mut writer = tokio::spawn(async move {
        let mut scratch = Vec::new();
        while let Some(msg) = out_rx.recv().await {
            let is_error = matches!(msg, Message::Error { .. });
            // Batch what is queued, then flush once.
            let flush = out_rx.is_empty() || is_error;
            let wrote = tokio::time::timeout(WRITE_TIMEOUT, async {
                write_message(&mut wr, &msg, &mut scratch).await?;
                if flush {
                    wr.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            match wrote {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return WriterEnd::Failed(e),
                Err(_) => return WriterEnd::Stalled,
            }
            if is_error {
                let _ = wr.shutdown().await;
                return WriterEnd::Refused;
            }
        }
        WriterEnd::Done
    });

    let budget = Arc::new(Semaphore::new(QUEUE_BYTES));
    let (in_tx, in_rx) = mpsc::channel::<Work>(WORK_QUEUE);
    let worker = {
        let shared = shared.clone();
        let out = out_tx.clone();
        let agent = agent.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("session-{session_id}"))
            .spawn(move || Worker::new(shared, agent, protocol, session_id, out, rt).run(in_rx))
            .context("cannot start session thread")?
    };

    let mut writer_end = None;
    let result = loop {
        let read = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read_message(&mut rd, &mut buf)) => r,
            // The worker stopped: after a refusal it has told the agent why
            // (the writer ends next); after a panic, closing the connection
            // is what makes the agent reconnect and resend what is
            // unacknowledged, where heartbeats would keep it waiting.
            () = in_tx.closed() => break Ok(()),
            end = &mut writer => {
                let refused = matches!(end, Ok(WriterEnd::Refused));
                writer_end = Some(refused);
                break match end {
                    // It sent the worker's refusal, which the worker logged.
                    Ok(WriterEnd::Done | WriterEnd::Refused) => Ok(()),
                    Ok(WriterEnd::Failed(e)) => Err(anyhow::Error::new(e).context("writing")),
                    Ok(WriterEnd::Stalled) => Err(anyhow::anyhow!(
                        "the agent accepted nothing we sent for {WRITE_TIMEOUT:?}; it stopped reading"
                    )),
                    Err(e) => Err(anyhow::anyhow!("writer task failed: {e}")),
                };
            }
        };
        let msg = match read {
            Err(_) => break Err(anyhow::anyhow!("no message for {IDLE_TIMEOUT:?}")),
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(m))) => {
                shared.sessions.heard(session_id);
                m
            }
            Ok(Err(FrameError::Io(e))) => break Err(anyhow::Error::new(e).context("reading")),
            Ok(Err(e)) => {
                let text = describe(&e);
                say(
                    &out_tx,
                    Message::Error {
                        code: ErrorCode::Protocol,
                        message: text.clone(),
                    },
                )
                .await;
                break Err(anyhow::anyhow!("protocol error: {text}"));
            }
        };
        // What the message holds until the worker is done with it.
        let cost = buf.len().min(QUEUE_BYTES) as u32;
        match msg {
            Message::Heartbeat { .. } => {
                // A full queue means the agent is not reading what we send:
                // one more answer would only wait there too.
                let _ = out_tx.try_send(Message::Heartbeat { time_ms: now_ms() });
                // Wakes an idle worker to look for a failover of its disks;
                // a busy one looks at its next sync anyway.
                if let Ok(permit) = budget.clone().try_acquire_many_owned(cost) {
                    let _ = in_tx.try_send((msg, permit));
                }
            }
            Message::RegisterDisk { .. }
            | Message::Extent(_)
            | Message::Zero { .. }
            | Message::HashRequest { .. }
            | Message::Failover { .. }
            | Message::Point { .. } => {
                let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                    break Ok(());
                };
                if in_tx.send((msg, permit)).await.is_err() {
                    // The worker stopped and has told the agent why.
                    break Ok(());
                }
            }
            Message::Error { code, message } => {
                break Err(anyhow::anyhow!("agent reported {code:?}: {message}"));
            }
            other => {
                let text = format!("unexpected {} message from an agent", other.name());
                say(
                    &out_tx,
                    Message::Error {
                        code: ErrorCode::Protocol,
                        message: text.clone(),
                    },
                )
                .await;
                break Err(anyhow::anyhow!(text));
            }
        }
    };
    drop(in_tx);
    drop(out_tx);
    // The worker may wait on a full reply queue; the writer empties it or
    // gives up within WRITE_TIMEOUT, which releases the worker.
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    let refused = match writer_end {
        Some(refused) => refused,
        None => match tokio::time::timeout(WRITE_TIMEOUT, &mut writer).await {
            Ok(end) => matches!(end, Ok(WriterEnd::Refused)),
            Err(_) => {
                writer.abort();
                false
            }
        },
    };
    if refused {
        linger(&mut rd).await;
    }
    result
}

/// After a refusal, reads and drops what the agent still sends until it
/// closes (or for [`LINGER`]): closing a socket with unread input makes
/// the kernel send a reset, which can discard our Error frame before the
/// agent has read it, leaving it with "connection reset" instead of why.
async fn linger(rd: &mut ReadHalf<TlsStream<TcpStream>>) {
    let _ = tokio::time::timeout(LINGER, tokio::io::copy(rd, &mut tokio::io::sink())).await;
}

/// Queues an error for the agent, waiting a little if the queue is full.
async fn say(out: &mpsc::Sender<Message>, msg: Message) {
    let _ = tokio::time::timeout(Duration::from_secs(5), out.send(msg)).await;
}

/// The error and its causes on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}

struct OpenDisk {
    /// Pre-images being read for the undo journal, oldest first: they are
    /// journaled in this order, before the batch's overwrites.
    pre: VecDeque<PreImage>,
    /// Checksum sync's hashes of the image, read ahead of the agent.
    ahead: HashAhead,
    /// Threads reading the image beside the session, started by the first
    /// read that can use them; None inside where the image cannot be read
    /// from other threads. Before the lock: stopped before it goes.
    readers: std::cell::OnceCell<Option<Readers>>,
    /// Held while the session may write the disk.
    _lock: failover::DiskLock,
    id: String,
    image: Box<dyn Image>,
    size_bytes: u64,
    undo: UndoLog,
    /// The newest point covering this disk: overwrites are journaled under
    /// it. None before the first point, when there is nothing to go back to.
    tag: Option<u64>,
    /// What this session has journaled under `tag`. The segment holds the
    /// bytes' pre-images as they were at the point; export and thinning
    /// take the oldest record of each byte, so a second record of the
    /// same bytes under the same tag would never be read. Overwrites
    /// there skip the pre-image read, its compression and its journal
    /// bytes: under churn that rewrites its working set within a point
    /// interval, most of them. A record is durable before any later
    /// overwrite of its bytes reaches the image (its batch's journal is
    /// synced before the batch is written, and batches are written in
    /// order), and a session that fails ends with its set, so nothing
    /// here outlives a record that did not reach the disk. Cleared when a
    /// point changes `tag`; a new session starts empty and journals
    /// again, which is only redundant.
    journaled: Ranges,
    /// Ranges with an overwrite queued in this batch (start → end).
    queued: BTreeMap<u64, u64>,
    /// Ranges with an overwrite in the batch being committed beside the
    /// session ([`Commit`]), not yet written to the image.
    committing: BTreeMap<u64, u64>,
}

/// A pre-image for the undo journal.
enum PreImage {
    /// A hole of the image: zeros, nothing to read.
    Zeros { tag: u64, at: u64, len: u64 },
    Read {
        tag: u64,
        at: u64,
        /// The buffer, and where in it the pre-image is.
        read: Pending<(Vec<u8>, std::ops::Range<usize>)>,
    },
}

/// The disk's reader threads, started on first use; takes the fields
/// rather than the disk so that the caller may borrow others beside it.
fn readers<'a>(
    cell: &'a std::cell::OnceCell<Option<Readers>>,
    image: &dyn Image,
) -> Option<&'a Readers> {
    cell.get_or_init(|| Readers::new(image)).as_ref()
}

impl OpenDisk {
    /// Starts reading the pre-image of `at..at + len` on a reader thread
    /// (on this one where it is cached or there are none);
    /// [`OpenDisk::journal_pre`] journals it once read.
    fn read_pre(&mut self, tag: u64, at: u64, len: u64) -> Result<(), Refusal> {
        if self.image.is_hole(at, len) {
            self.pre.push_back(PreImage::Zeros { tag, at, len });
            return Ok(());
        }
        // Aligned, so that the image can read it past the page cache.
        let mut buf = self.undo.pre_buffer();
        let window = aligned_range(&mut buf, len as usize);
        // What the page cache holds (an image being churned, mostly) is
        // copied here at once: a reader thread would cost more in wake-ups
        // than the copy.
        if self.image.read_cached(at, &mut buf[window.clone()]) {
            let read = Pending::done(Ok((buf, window)));
            self.pre.push_back(PreImage::Read { tag, at, read });
            return Ok(());
        }
        let read = if let Some(r) = readers(&self.readers, self.image.as_ref()) {
            r.run(When::Soon, at, move |image, _| {
                image.read_at(at, &mut buf[window.clone()])?;
                Ok((buf, window))
            })
        } else {
            self.image
                .read_at(at, &mut buf[window.clone()])
                .map_err(storage)?;
            Pending::done(Ok((buf, window)))
        };
        self.pre.push_back(PreImage::Read { tag, at, read });
        Ok(())
    }

    /// Journals the pre-images read so far, in order, and waits for more
    /// while over `keep` are still being read. The journal compresses and
    /// appends them on its encoder thread.
    fn journal_pre(&mut self, keep: usize) -> Result<(), Refusal> {
        while let Some(front) = self.pre.front() {
            let ready = match front {
                PreImage::Zeros { .. } => true,
                PreImage::Read { read, .. } => read.is_ready(),
            };
            if !ready && self.pre.len() <= keep {
                break;
            }
            match self.pre.pop_front() {
                Some(PreImage::Zeros { tag, at, len }) => {
                    self.undo
                        .append_zeros(tag, at, len as u32)
                        .map_err(storage)?;
                }
                Some(PreImage::Read { tag, at, read }) => {
                    let (buf, window) = read.wait().map_err(storage)?;
                    self.undo
                        .append_owned(tag, at, buf, window)
                        .map_err(storage)?;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Writes `data` (None: zeros) into the image, past the page cache
    /// with `direct` (see [`Image::write_direct`]); every write of the
    /// session goes through here, so that hashes read ahead never predate
    /// one.
    fn write(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        data: Option<&[u8]>,
        direct: bool,
    ) -> Result<(), ImageError> {
        self.ahead
            .invalidate(offset_bytes, offset_bytes + len_bytes);
        match data {
            Some(bytes) if direct => self.image.write_direct(offset_bytes, bytes),
            Some(bytes) => self.image.write_at(offset_bytes, bytes),
            None => self.image.write_zeroes(offset_bytes, len_bytes),
        }
    }
}

/// An overwrite whose pre-image is journaled but not yet durable: it may
/// reach the image only after the undo journal is synced.
struct Queued {
    disk: usize,
    offset_bytes: u64,
    /// None: zeros.
    data: Option<Vec<u8>>,
    len_bytes: u64,
}

/// A batch being committed while the session goes on with the next
/// messages: its undo records are made durable beside the session
/// ([`UndoLog::sync_start`]); then its overwrites go to the images, the
/// images are synced and the agent gets its ack ([`Worker::finish_commit`]).
/// The session waited for each step in turn at every batch end: the
/// journal's encoder, its writes, the image's sync (docs/BENCHMARKS.md).
/// Later messages that touch its ranges wait for it (see
/// [`Worker::settle`]); one batch is committed at a time.
struct Commit {
    writes: Vec<Queued>,
    /// Images written, to sync before the ack.
    dirty: BTreeSet<usize>,
    /// The highest seq the batch holds: acknowledged once it is durable.
    seq: u64,
}

/// Applies one session's messages to disk, in order, on its own thread.
struct Worker {
    shared: Arc<Shared>,
    agent: String,
    /// The session's protocol version.
    protocol: u16,
    session_id: u64,
    out: mpsc::Sender<Message>,
    disks: Vec<OpenDisk>,
    /// Handles written since the last fsync.
    dirty: BTreeSet<usize>,
    /// Highest seq applied (written, maybe not yet durable).
    applied_seq: u64,
    /// Highest seq acknowledged durable.
    acked_seq: u64,
    /// Payload bytes (as received, compressed) since the last fsync.
    bytes_since_sync: u64,
    /// When the oldest write not yet synced was applied.
    unsynced_since: Option<Instant>,
    /// The runtime, for waiting on the input with a deadline.
    rt: tokio::runtime::Handle,
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    /// Buffers of written extents, for the next ones (see `recycle`).
    spare: Vec<Vec<u8>>,
    queued: Vec<Queued>,
    /// Data bytes held in `queued`.
    queued_bytes: u64,
    /// The batch before, being committed; None once done.
    commit: Option<Commit>,
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        agent: String,
        protocol: u16,
        session_id: u64,
        out: mpsc::Sender<Message>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Worker {
            shared,
            agent,
            protocol,
            session_id,
            out,
            disks: Vec::new(),
            dirty: BTreeSet::new(),
            applied_seq: 0,
            acked_seq: 0,
            bytes_since_sync: 0,
            unsynced_since: None,
            rt,
            decompressor: zstd::bulk::Decompressor::new().expect("zstd context allocates"),
            scratch: Vec::new(),
            spare: Vec::new(),
            queued: Vec::new(),
            queued_bytes: 0,
            commit: None,
        }
    }

    /// Queues a message for the agent; waits while the queue is full (the
    /// agent is slow to read), and drops it once the writer is gone.
    fn reply(&self, msg: Message) -> Result<(), mpsc::error::SendError<Message>> {
        self.out.blocking_send(msg)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Work>) {
        let result = self.pump(&mut rx);
        if let Err(r) = &result {
            warn!("refusing agent {}: {:?}: {}", self.agent, r.code, r.message);
            let _ = self.reply(Message::Error {
                code: r.code,
                message: r.message.clone(),
            });
        } else if let Err(r) = self.sync_and_ack() {
            warn!("final sync for agent {} failed: {}", self.agent, r.message);
        }
        let mut in_use = self.shared.in_use.lock().expect("in_use lock");
        for d in &self.disks {
            in_use.remove(&d.id);
        }
    }

    fn pump(&mut self, rx: &mut mpsc::Receiver<Work>) -> Result<(), Refusal> {
        loop {
            if self.out.is_closed() {
                // The agent is gone or stopped reading: nothing more can be
                // acknowledged, so work queued behind it is wasted.
                return Ok(());
            }
            let (msg, _held) = match rx.try_recv() {
                Ok(m) => m,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Input drained. An agent still busy sends its next
                    // message within moments; one waiting for an ack sends
                    // nothing until it gets one. So writes are made durable
                    // once no message came for a moment, never at every gap
                    // between two (a checksum sync's come a millisecond
                    // apart: measured, syncing at each gap was 1200 fsyncs
                    // and 45% of the session's time in a 4 GiB resync).
                    // The agent is never left waiting on an ack for data
                    // that sits in our page cache longer than that moment.
                    // A batch being committed is finished first: there is
                    // nothing else to do meanwhile. Pre-images the journal
                    // holds back to hand its encoder in batches go now, so
                    // that it encodes them while we wait.
                    for d in &mut self.disks {
                        d.undo.hand_over().map_err(storage)?;
                    }
                    self.finish_commit(true)?;
                    let next = self.unsynced_since.and_then(|t| {
                        let until = (t + SYNC_DELAY_MAX).min(Instant::now() + SYNC_GRACE);
                        // The timer is made inside the runtime it needs.
                        self.rt
                            .block_on(async {
                                tokio::time::timeout_at(until.into(), rx.recv()).await
                            })
                            .ok()
                    });
                    match next {
                        Some(Some(m)) => m,
                        Some(None) => return Ok(()),
                        None => {
                            self.sync_and_ack()?;
                            match rx.blocking_recv() {
                                Some(m) => m,
                                None => return Ok(()),
                            }
                        }
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            };
            self.handle(msg)?;
            self.finish_commit(false)?;
            if self.bytes_since_sync >= SYNC_EVERY_BYTES
                || self
                    .unsynced_since
                    .is_some_and(|t| t.elapsed() >= SYNC_DELAY_MAX)
            {
                self.start_commit()?;
            }
        }
    }

    fn handle(&mut self, msg: Message) -> Result<(), Refusal> {
        match msg {
            Message::RegisterDisk {
                disk_id,
                size_bytes,
                logical_block_bytes,
            } => {
                let reply = self.register(disk_id, size_bytes, logical_block_bytes)?;
                let _ = self.reply(reply);
                Ok(())
            }
            Message::Extent(e) => self.extent(e),
            Message::Zero {
                seq,
                disk,
                offset_bytes,
                len_bytes,
            } => {
                self.next_seq(seq)?;
                let d = self.disk_for_write(disk, offset_bytes, len_bytes)?;
                self.overwrite(d, offset_bytes, len_bytes, None)?;
                self.written(d, seq, 0);
                Ok(())
            }
            Message::Point {
                seq,
                kind,
                name,
                agent_time_ms,
            } => self.point(seq, kind, &name, agent_time_ms),
            Message::HashRequest {
                seq,
                disk,
                offset_bytes,
                len_bytes,
                block_bytes,
            } => self.hashes(seq, disk, offset_bytes, len_bytes, block_bytes),
            Message::Heartbeat { .. } => self.check_failover(),
            Message::Failover { seq } => self.planned_failover(seq),
            other => Err(Refusal::new(
                ErrorCode::Protocol,
                format!("unexpected {} message", other.name()),
            )),
        }
    }

    fn next_seq(&self, seq: u64) -> Result<(), Refusal> {
        if seq <= self.applied_seq {
            return Err(Refusal::new(
                ErrorCode::Protocol,
                format!("sequence number {seq} does not follow {}", self.applied_seq),
            ));
        }
        Ok(())
    }

    fn extent(&mut self, e: Extent) -> Result<(), Refusal> {
        if SumKind::for_version(self.protocol) == SumKind::Blake3
            && e.checksum.kind() != SumKind::Blake3
        {
            // As a receiver of that release would: it has no such message.
            return Err(Refusal::new(
                ErrorCode::Protocol,
                format!("an extent with a CRC32C checksum (message type 15) on a protocol version {} connection; the agent must send BLAKE3 extents (type 5) at that version", self.protocol),
            ));
        }
        self.next_seq(e.seq)?;
        let d = self.disk_for_write(e.disk, e.offset_bytes, u64::from(e.len_bytes))?;
        e.unpack(&mut self.decompressor, &mut self.scratch)
            .map_err(|err| {
                let code = match err {
                    PayloadError::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
                    PayloadError::BadZstd { .. } => ErrorCode::Protocol,
                };
                Refusal::new(
                    code,
                    format!(
                        "extent at byte {} of disk {} rejected, nothing written: {err}",
                        e.offset_bytes, self.disks[d].id
                    ),
                )
            })?;
        let wire_bytes = e.payload.len() as u64;
        self.shared
            .metrics
            .received(&self.disks[d].id, u64::from(e.len_bytes), wire_bytes);
        // The verified bytes change hands instead of being copied: a
        // decompressed extent leaves in `scratch`, which a spare replaces.
        let data = match e.codec {
            Codec::Zstd => {
                let spare = self.spare.pop().unwrap_or_default();
                std::mem::replace(&mut self.scratch, spare)
            }
            Codec::None => e.payload,
        };
        self.overwrite(d, e.offset_bytes, u64::from(e.len_bytes), Some(data))?;
        self.written(d, e.seq, wire_bytes);
        Ok(())
    }

    /// Checksum sync: hashes a range of the image as every earlier message
    /// left it. Nothing is written, so the request counts as done once the
    /// answer is queued; the next ack covers it.
    fn hashes(
        &mut self,
        seq: u64,
        handle: u32,
        offset_bytes: u64,
        len_bytes: u32,
        block_bytes: u32,
    ) -> Result<(), Refusal> {
        self.next_seq(seq)?;
        let len = u64::from(len_bytes);
        let d = self.disk_for_write(handle, offset_bytes, len)?;
        self.settle(d, offset_bytes, offset_bytes + len)?;
        let block = (block_bytes as usize).max(1);
        let disk = &mut self.disks[d];
        let hashes = if let Some(r) = readers(&disk.readers, disk.image.as_ref()) {
            disk.ahead
                .hashes(r, disk.size_bytes, offset_bytes, len, block)
                .map_err(storage)?
        } else if disk.image.is_hole(offset_bytes, len) {
            zero_hashes(len, block)
        } else {
            // Requests come in disk order: have the kernel read ahead.
            disk.image.prefetch(offset_bytes + len, HASH_PREFETCH_BYTES);
            self.scratch.resize(len_bytes as usize, 0);
            disk.image
                .read_at(offset_bytes, &mut self.scratch)
                .map_err(storage)?;
            hash_blocks(&self.scratch, block)
        };
        let _ = self.reply(Message::Hashes {
            seq,
            disk: handle,
            offset_bytes,
            block_bytes,
            hashes,
        });
        self.applied_seq = seq;
        Ok(())
    }

    /// Makes every earlier overwrite of `start..end` reach the image, so that
    /// what is read there next is what those writes left: the commit in
    /// progress is finished if it has one, and this batch is applied if it
    /// has one.
    fn settle(&mut self, d: usize, start: u64, end: u64) -> Result<(), Refusal> {
        let overlaps = |ranges: &BTreeMap<u64, u64>| {
            ranges
                .range(..end)
                .next_back()
                .is_some_and(|(_, &e)| e > start)
        };
        if overlaps(&self.disks[d].committing) {
            self.finish_commit(true)?;
        }
        if overlaps(&self.disks[d].queued) {
            self.apply_queued()?;
        }
        Ok(())
    }

    /// Writes into a disk's image, first saving what it overwrites when
    /// the disk has a point to go back to. The write is then queued until
    /// the batch's undo records are durable (write-ahead: a crash can leave
    /// an undo record without its overwrite, never the reverse).
    fn overwrite(
        &mut self,
        d: usize,
        offset_bytes: u64,
        len_bytes: u64,
        data: Option<Vec<u8>>,
    ) -> Result<(), Refusal> {
        let Some(tag) = self.disks[d].tag else {
            // Nothing journaled (a first copy): the session's work per
            // write is small, and the page cache's copy and writeback cost
            // more CPU than waiting for a direct write (initial sync of a
            // 2 GiB disk 236 -> 360 MB/s). Writes behind a journal stay
            // cached: there the session is the serial path (pre-images,
            // their sync, the overwrites), and waiting for each overwrite
            // made a sustained 150 MB/s of churn fall behind that was
            // kept up with before (docs/BENCHMARKS.md).
            let r = self.disks[d].write(offset_bytes, len_bytes, data.as_deref(), true);
            self.recycle(data);
            return r.map_err(storage);
        };
        let end = offset_bytes + len_bytes;
        // What is read of the image here (the pre-image, whether it is a
        // hole) must include the earlier writes: they are applied first.
        // An overwrite of data over bytes all journaled since the point
        // reads nothing, and writes reach the image in the order they
        // came, so it need not wait: rewrites of a hot range no longer
        // end a batch each.
        if data.is_none() || !self.disks[d].journaled.covers(offset_bytes, end) {
            self.settle(d, offset_bytes, end)?;
        }
        let disk = &mut self.disks[d];
        if data.is_none() && disk.image.is_hole(offset_bytes, len_bytes) {
            // Zeros over a hole change nothing: no history, no write.
            return Ok(());
        }
        // The pre-images are read beside this thread, which goes on with
        // the next messages; they are journaled before any overwrite of
        // the batch reaches the image (apply_queued).
        let mut journaled = 0;
        for (from, to) in disk.journaled.gaps(offset_bytes, end) {
            let mut at = from;
            while at < to {
                let n = (to - at).min(UNDO_CHUNK_BYTES);
                disk.read_pre(tag, at, n)?;
                at += n;
            }
            journaled += to - from;
        }
        if disk.journaled.len() < JOURNALED_RANGES_MAX {
            disk.journaled.insert(offset_bytes, end);
        }
        self.shared
            .metrics
            .overwritten(&disk.id, len_bytes, journaled);
        disk.journal_pre(PRE_READS_MAX)?;
        disk.queued.insert(offset_bytes, end);
        self.queued_bytes += data.as_ref().map_or(0, |b| b.len() as u64);
        self.queued.push(Queued {
            disk: d,
            offset_bytes,
            data,
            len_bytes,
        });
        if self.queued_bytes >= QUEUED_MAX_BYTES {
            self.apply_queued()?;
        }
        Ok(())
    }

    /// Makes the batch's undo records durable, then performs its writes,
    /// after those of the batch before.
    fn apply_queued(&mut self) -> Result<(), Refusal> {
        self.finish_commit(true)?;
        if self.queued.is_empty() {
            return Ok(());
        }
        for d in &mut self.disks {
            d.journal_pre(0)?;
            d.undo.sync().map_err(storage)?;
            d.queued.clear();
        }
        self.queued_bytes = 0;
        for q in std::mem::take(&mut self.queued) {
            self.disks[q.disk]
                .write(q.offset_bytes, q.len_bytes, q.data.as_deref(), false)
                .map_err(storage)?;
            self.recycle(q.data);
        }
        Ok(())
    }

    /// Keeps a written extent's buffer for the next one: a fresh 4 MiB
    /// allocation is fresh pages, each faulted in and cleared.
    fn recycle(&mut self, data: Option<Vec<u8>>) {
        if let Some(mut b) = data {
            if self.spare.len() < SPARE_BUFFERS {
                b.clear();
                self.spare.push(b);
            }
        }
    }

    /// Checks the handle and range.
    fn disk_for_write(&mut self, handle: u32, offset: u64, len: u64) -> Result<usize, Refusal> {
        let d = handle as usize;
        let Some(disk) = self.disks.get(d) else {
            return Err(Refusal::new(
                ErrorCode::UnknownDisk,
                format!("disk handle {handle} was never registered in this session"),
            ));
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > disk.size_bytes)
        {
            return Err(Refusal::new(
                ErrorCode::OutOfRange,
                format!(
                    "range {offset}+{len} lies beyond the end of disk {} ({} bytes)",
                    disk.id, disk.size_bytes
                ),
            ));
        }
        Ok(d)
    }

    fn written(&mut self, d: usize, seq: u64, bytes: u64) {
        self.dirty.insert(d);
        self.unsynced_since.get_or_insert_with(Instant::now);
        self.applied_seq = seq;
        self.bytes_since_sync += bytes;
    }

    /// Planned failover: everything before is durable, then every disk of
    /// the session is marked failed over at its newest point, then the
    /// agent gets its ack. Later writes are refused.
    fn planned_failover(&mut self, seq: u64) -> Result<(), Refusal> {
        self.next_seq(seq)?;
        self.sync_and_ack()?;
        for d in &self.disks {
            let Some(point) = self.newest_point(&d.id)? else {
                return Err(Refusal::new(
                    ErrorCode::Protocol,
                    format!(
                        "disk {} has no recovery point to fail over at; take one first",
                        d.id
                    ),
                ));
            };
            failover::mark_failed_over(&self.shared.config, &d.id, &self.agent, point)
                .map_err(|e| Refusal::new(ErrorCode::Storage, format!("disk {}: {e:#}", d.id)))?;
            info!(
                "disk {}: planned failover by agent {} at point {point}; replication refused from now on",
                d.id, self.agent
            );
        }
        self.applied_seq = seq;
        self.acked_seq = seq;
        let _ = self.reply(Message::Ack { seq });
        Ok(())
    }

    /// Ends the session if an operator failed over one of its disks: the
    /// failover command waits for the disk's lock, which goes with it.
    fn check_failover(&self) -> Result<(), Refusal> {
        for d in &self.disks {
            if !failover::record_path(&self.shared.config, &d.id).exists() {
                continue;
            }
            let rec = failover::load(&self.shared.config, &d.id)
                .map_err(|e| Refusal::new(ErrorCode::Internal, format!("disk {}: {e:#}", d.id)))?;
            if let Some(rec) = rec.filter(failover::Record::blocks_replication) {
                return Err(Refusal::new(ErrorCode::FailedOver, rec.describe(&d.id)));
            }
        }
        Ok(())
    }

    /// Makes everything applied durable and acknowledges it.
    fn sync_and_ack(&mut self) -> Result<(), Refusal> {
        self.start_commit()?;
        self.finish_commit(true)?;
        Ok(())
    }

    /// Ends the batch: its undo records start to be made durable beside
    /// the session, which can go on with the next messages; see [`Commit`].
    fn start_commit(&mut self) -> Result<(), Refusal> {
        self.finish_commit(true)?;
        self.check_failover()?;
        for d in &mut self.disks {
            if d.queued.is_empty() {
                continue;
            }
            d.journal_pre(0)?;
            d.undo.sync_start().map_err(storage)?;
            d.committing = std::mem::take(&mut d.queued);
        }
        self.queued_bytes = 0;
        self.commit = Some(Commit {
            writes: std::mem::take(&mut self.queued),
            dirty: std::mem::take(&mut self.dirty),
            seq: self.applied_seq,
        });
        self.bytes_since_sync = 0;
        self.unsynced_since = None;
        self.finish_commit(false).map(|_| ())
    }

    /// Finishes the commit in progress once its undo records are durable
    /// (with `wait`, waits for them): writes its overwrites, syncs the
    /// images and acknowledges. True if none is left in progress.
    fn finish_commit(&mut self, wait: bool) -> Result<bool, Refusal> {
        if self.commit.is_none() {
            return Ok(true);
        }
        for d in &mut self.disks {
            if !d.undo.sync_done(wait).map_err(storage)? {
                return Ok(false);
            }
        }
        let Some(c) = self.commit.take() else {
            return Ok(true);
        };
        for q in c.writes {
            self.disks[q.disk]
                .write(q.offset_bytes, q.len_bytes, q.data.as_deref(), false)
                .map_err(storage)?;
            self.recycle(q.data);
        }
        for d in &mut self.disks {
            d.committing.clear();
        }
        for &d in &c.dirty {
            self.disks[d].image.flush().map_err(storage)?;
        }
        if c.seq > self.acked_seq {
            self.acked_seq = c.seq;
            let _ = self.reply(Message::Ack { seq: c.seq });
        }
        Ok(true)
    }

    fn point(
        &mut self,
        seq: u64,
        kind: PointKind,
        name: &str,
        agent_time_ms: u64,
    ) -> Result<(), Refusal> {
        self.next_seq(seq)?;
        if self.disks.is_empty() {
            return Err(Refusal::new(
                ErrorCode::Protocol,
                "a recovery point needs at least one registered disk",
            ));
        }
        self.applied_seq = seq;
        self.sync_and_ack()?;
        let disk_ids: Vec<String> = self.disks.iter().map(|d| d.id.clone()).collect();
        let point = self
            .shared
            .points
            .lock()
            .expect("points lock")
            .append(&self.agent, kind, name, agent_time_ms, disk_ids)
            .map_err(storage)?;
        for d in &mut self.disks {
            d.tag = Some(point.id);
            d.journaled = Ranges::new();
        }
        self.prune(&point)?;
        info!(
            "recovery point {} ({}) recorded for agent {} covering {} disk(s)",
            point.id,
            kind.as_str(),
            self.agent,
            self.disks.len()
        );
        let _ = self.reply(Message::PointRecorded {
            seq,
            point_id: point.id,
        });
        Ok(())
    }

    /// Drops undo history no point inside the retention window needs (the
    /// newest point always stays), then holds the journal to its size cap.
    fn prune(&mut self, newest: &crate::journal::points::Point) -> Result<(), Refusal> {
        use crate::journal::retention;
        let config = &self.shared.config;
        let points = read_all(&config.points_path()).map_err(storage)?;
        let cutoff = retention::cutoff(config.retention_hours);
        for d in &self.disks {
            let keep_from = retention::window_start(&points, &d.id, cutoff)
                .unwrap_or(newest.id)
                .min(newest.id);
            let freed = retention::prune_disk(
                &config.retention_dir,
                &self.shared.registry,
                &d.id,
                keep_from,
            )
            .map_err(storage)?;
            if freed > 0 {
                info!(
                    "disk {}: pruned {} bytes of undo history before point {keep_from}",
                    d.id, freed
                );
            }
        }
        if let Some(policy) = &config.thinning {
            self.thin(policy, &points)?;
        }
        let Some(cap_gib) = config.retention_max_gib else {
            return Ok(());
        };
        let cap = (cap_gib * f64::from(1u32 << 30)) as u64;
        // A disk being failed over needs its whole journal.
        let skip = |disk: &str| failover::record_path(config, disk).exists();
        let _one_at_a_time = self.shared.cap_lock.lock().expect("cap lock");
        let (pruned, met) = retention::enforce_cap(
            &config.retention_dir,
            &self.shared.registry,
            &points,
            cap,
            skip,
        )
        .map_err(storage)?;
        for p in &pruned {
            warn!(
                "retention_max_gib = {cap_gib} reached: disk {} lost {} bytes of history, its points before {} can no longer be recovered; raise retention_max_gib or shorten retention_hours",
                p.disk, p.freed_bytes, p.keep_from
            );
        }
        if !met {
            warn!(
                "retention_max_gib = {cap_gib} cannot be met: what is left is each disk's newest history (or a disk being failed over); raise retention_max_gib"
            );
        }
        Ok(())
    }

    /// Forgets old points of this session's disks that thinning does not
    /// keep.
    fn thin(
        &self,
        policy: &crate::journal::thinning::Thinning,
        points: &[crate::journal::points::Point],
    ) -> Result<(), Refusal> {
        use crate::journal::thinning;
        let config = &self.shared.config;
        let disks: Vec<(String, u64)> = {
            let reg = self.shared.registry.lock().expect("registry lock");
            self.disks
                .iter()
                .filter(|d| !failover::record_path(config, &d.id).exists())
                .filter_map(|d| reg.get(&d.id).map(|e| (d.id.clone(), e.history_from)))
                .collect()
        };
        let thinned = thinning::load(&config.retention_dir).map_err(storage)?;
        let ids = thinning::choose(
            policy,
            points,
            &disks,
            &thinned,
            time::OffsetDateTime::now_utc(),
        );
        if ids.is_empty() {
            return Ok(());
        }
        let freed = thinning::thin(&config.retention_dir, points, &disks, &ids).map_err(storage)?;
        info!(
            "thinning: forgot {} point(s) older than {} h ({:?}), {freed} bytes of undo history freed",
            ids.len(),
            policy.keep_all_hours,
            ids
        );
        Ok(())
    }

    fn register(
        &mut self,
        disk_id: String,
        size_bytes: u64,
        logical_block_bytes: u32,
    ) -> Result<Message, Refusal> {
        validate_disk_id(&disk_id).map_err(|m| Refusal::new(ErrorCode::Protocol, m))?;
        if !(512..=65536).contains(&logical_block_bytes)
            || !logical_block_bytes.is_power_of_two()
            || size_bytes == 0
            || !size_bytes.is_multiple_of(u64::from(logical_block_bytes))
        {
            return Err(Refusal::new(
                ErrorCode::Protocol,
                format!("disk {disk_id}: size {size_bytes} is not a positive multiple of its logical block size {logical_block_bytes}"),
            ));
        }
        if self.disks.iter().any(|d| d.id == disk_id) {
            return Err(Refusal::new(
                ErrorCode::Protocol,
                format!("disk {disk_id} registered twice in one session"),
            ));
        }
        // Ownership before "busy": another agent claiming this disk must be
        // told it is not its disk, not to retry later.
        let (owner, registered) = {
            let reg = self.shared.registry.lock().expect("registry lock");
            (reg.get(&disk_id).map(|e| e.agent.clone()), reg.len())
        };
        // Before the disk's lock is taken, which creates its directory on
        // the retention volume: a refused disk leaves nothing behind.
        // open_or_create checks again under the registry lock.
        if owner.is_none() && registered >= self.shared.config.max_disks {
            return Err(self.too_many_disks(registered));
        }
        if let Some(owner) = owner.filter(|o| *o != self.agent) {
            warn!(
                "agent {} tried to register disk {disk_id}, which belongs to agent {owner}",
                self.agent
            );
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!("disk {disk_id} belongs to agent {owner}; give this disk another id, or have the operator reassign it"),
            ));
        }
        if !self
            .shared
            .in_use
            .lock()
            .expect("in_use lock")
            .insert(disk_id.clone())
        {
            // The agent is back on a new connection while its old one is
            // still open here: a partition or a frozen flow tells this end
            // nothing, and the old session would hold the disk until the
            // idle timeout. Once it has missed two heartbeats it is dead.
            let closed = self.shared.sessions.close_silent(
                &self.agent,
                self.session_id,
                SUPERSEDE_SILENT,
                "superseded by a new connection of the same agent",
            );
            if closed > 0 {
                info!(
                    "agent {} reconnected while its earlier session was silent for over {SUPERSEDE_SILENT:?}: closed that session; disk {disk_id} is free once it has finished",
                    self.agent
                );
            }
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!("disk {disk_id} is being replicated by another connection right now; retry when it ends"),
            ));
        }
        let lock = match self.hold(&disk_id) {
            Ok(l) => l,
            Err(r) => {
                self.shared
                    .in_use
                    .lock()
                    .expect("in_use lock")
                    .remove(&disk_id);
                return Err(r);
            }
        };
        match self.open_or_create(&disk_id, size_bytes, logical_block_bytes) {
            Ok((image, existed)) => {
                let handle = self.disks.len() as u32;
                let tag = self.newest_point(&disk_id)?;
                self.disks.push(OpenDisk {
                    _lock: lock,
                    id: disk_id.clone(),
                    image,
                    size_bytes,
                    undo: UndoLog::new(undo::disk_dir(&self.shared.config.retention_dir, &disk_id)),
                    tag,
                    journaled: Ranges::new(),
                    queued: BTreeMap::new(),
                    committing: BTreeMap::new(),
                    pre: VecDeque::new(),
                    ahead: HashAhead::default(),
                    readers: std::cell::OnceCell::new(),
                });
                Ok(Message::DiskRegistered {
                    disk_id,
                    handle,
                    image_existed: existed,
                })
            }
            Err(r) => {
                self.shared
                    .in_use
                    .lock()
                    .expect("in_use lock")
                    .remove(&disk_id);
                Err(r)
            }
        }
    }

    fn too_many_disks(&self, registered: usize) -> Refusal {
        let config = &self.shared.config;
        Refusal::new(
            ErrorCode::Limit,
            format!(
                "receiver {} already protects {registered} disks (max_disks = {}); raise max_disks or use another receiver",
                config.name, config.max_disks
            ),
        )
    }

    /// Takes the disk's lock against failover commands and refuses a disk
    /// that is failed over.
    fn hold(&self, disk_id: &str) -> Result<failover::DiskLock, Refusal> {
        let lock = failover::try_lock(&self.shared.config.retention_dir, disk_id)
            .map_err(storage)?
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::Busy,
                    format!("disk {disk_id} is held by a failover command (rollback, commit) right now; retry when it ends"),
                )
            })?;
        match failover::load(&self.shared.config, disk_id) {
            Ok(Some(rec)) if rec.blocks_replication() => {
                warn!("agent {}: {}", self.agent, rec.describe(disk_id));
                Err(Refusal::new(ErrorCode::FailedOver, rec.describe(disk_id)))
            }
            Ok(_) => Ok(lock),
            Err(e) => Err(Refusal::new(
                ErrorCode::Internal,
                format!("disk {disk_id}: {e:#}"),
            )),
        }
    }

    /// The newest point covering `disk_id`, if any.
    fn newest_point(&self, disk_id: &str) -> Result<Option<u64>, Refusal> {
        points_newest(&self.shared.config.points_path(), disk_id)
    }

    fn open_or_create(
        &mut self,
        disk_id: &str,
        size_bytes: u64,
        logical_block_bytes: u32,
    ) -> Result<(Box<dyn Image>, bool), Refusal> {
        let config = &self.shared.config;
        let mut reg = self.shared.registry.lock().expect("registry lock");
        let existing = reg.get(disk_id).cloned();
        if let Some(entry) = &existing {
            if entry.agent != self.agent {
                warn!(
                    "agent {} tried to register disk {disk_id}, which belongs to agent {}",
                    self.agent, entry.agent
                );
                return Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    format!(
                        "disk {disk_id} belongs to agent {}; give this disk another id, or have the operator reassign it",
                        entry.agent
                    ),
                ));
            }
        } else if reg.len() >= config.max_disks {
            return Err(self.too_many_disks(reg.len()));
        }
        // An unregistered disk may still have its image here, made by
        // someone else (qemu-img, a copy from a datastore): match it by UUID.
        let found = match &existing {
            Some(_) => None,
            None => find_by_uuid(&config.image_dir, disk_id, &reg)?,
        };
        let new_format = config.image_format_for(disk_id);
        let (mut file_name, format) = match (&existing, &found) {
            (Some(e), _) => (e.image.clone(), e.format()),
            (None, Some(f)) => f.clone(),
            (None, None) => (new_format.file_name(disk_id), new_format),
        };
        let path = config.image_dir.join(&file_name);
        let (image, existed, format) = match live::open(format, &path, true) {
            Ok(img) => (img, true, format),
            Err(ImageError::Open { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                if existing.is_some() {
                    warn!(
                        "image {} of disk {disk_id} is missing; creating a new one (full copy)",
                        path.display()
                    );
                }
                // A missing image is recreated under this disk's own name,
                // in the format configured now.
                file_name = new_format.file_name(disk_id);
                let img = live::create(
                    new_format,
                    &config.image_dir,
                    disk_id,
                    size_bytes,
                    disk_uuid(disk_id),
                )
                .map_err(|e| match e {
                    ImageError::TooLarge { .. } => Refusal::new(
                        ErrorCode::DiskTooLarge,
                        format!(
                            "disk {disk_id}: {e}; choose another image_format for it in [disks.\"{disk_id}\"] of receiver.toml"
                        ),
                    ),
                    e => storage(e),
                })?;
                (img, false, new_format)
            }
            Err(e) => return Err(storage(e)),
        };
        let path = config.image_dir.join(&file_name);
        // The size the disk was registered at, if its image is the one
        // registered (a recreated image starts afresh).
        let registered = existing.as_ref().filter(|_| existed).map(|e| e.size_bytes);
        if let Some(was) = registered.filter(|&was| size_bytes < was) {
            warn!(
                "agent {}: disk {disk_id} shrank from {was} to {size_bytes} bytes; refused",
                self.agent
            );
            return Err(Refusal::new(
                ErrorCode::DiskTooLarge,
                format!(
                    "disk {disk_id} is {size_bytes} bytes, smaller than the {was} bytes its replica {} holds, and a replica is never truncated; give the disk back its size, or protect the smaller disk under a new id",
                    path.display()
                ),
            ));
        }
        let mut image = image;
        let grows =
            size_bytes > image.size_bytes() || registered.is_some_and(|was| size_bytes > was);
        if existed && grows {
            let was = image.size_bytes();
            // The image's files change under it: not through this handle.
            drop(image);
            live::grow(format, &path, size_bytes, registered).map_err(|e| match e {
                ImageError::CannotGrow { .. } => Refusal::new(
                    ErrorCode::DiskTooLarge,
                    format!(
                        "disk {disk_id} grew to {size_bytes} bytes but {e}; give it image_format = \"vmdk\" in [disks.\"{disk_id}\"] of receiver.toml and move the image out of {} (the next registration makes a new image at the new size and copies the disk; older points do not export from it)",
                        config.image_dir.display()
                    ),
                ),
                ImageError::TooLarge { .. } => Refusal::new(
                    ErrorCode::DiskTooLarge,
                    format!("disk {disk_id} grew to {size_bytes} bytes: {e}"),
                ),
                e => storage(e),
            })?;
            image = live::open(format, &path, true).map_err(storage)?;
            if image.size_bytes() > was {
                info!(
                    "disk {disk_id}: grew, image {} grown from {was} to {} bytes",
                    path.display(),
                    image.size_bytes()
                );
            }
        }
        if size_bytes > image.size_bytes() {
            return Err(Refusal::new(
                ErrorCode::DiskTooLarge,
                format!(
                    "disk {disk_id} is {size_bytes} bytes but its image {} is only {} bytes; grow the image (e.g. truncate -s {size_bytes}) or register the disk under a new id",
                    path.display(),
                    image.size_bytes()
                ),
            ));
        }
        if existed {
            info!("disk {disk_id}: writing into existing image {} (original location: only changes travel)", path.display());
        } else {
            warn!("disk {disk_id}: no image found, created {} (alternate location: an additional disk was created, full copy follows)", path.display());
        }
        let entry = DiskEntry {
            agent: self.agent.clone(),
            image: file_name,
            format: Some(format),
            size_bytes,
            logical_block_bytes,
            history_from: match &existing {
                // A recreated image has lost its history: only points
                // taken from now on can be reconstructed.
                Some(_) if !existed => {
                    let newest = points_newest(&config.points_path(), disk_id)?;
                    newest.map_or(0, |p| p + 1)
                }
                Some(e) => e.history_from,
                None => 0,
            },
            sizes_before: match (&existing, registered) {
                (Some(e), Some(was)) => {
                    let mut sizes = e.sizes_before.clone();
                    if size_bytes > was {
                        // Points up to the newest one were taken at the
                        // old size; one already recorded for the same
                        // point holds the smaller, older size.
                        let newest = points_newest(&config.points_path(), disk_id)?;
                        if let Some(p) =
                            newest.filter(|&p| sizes.last().is_none_or(|l| l.through_point < p))
                        {
                            sizes.push(SizeBefore {
                                through_point: p,
                                size_bytes: was,
                            });
                        }
                    }
                    sizes
                }
                _ => Vec::new(),
            },
        };
        if reg.get(disk_id) != Some(&entry) {
            reg.put(disk_id, entry).map_err(storage)?;
        }
        Ok((image, existed))
    }
}

/// The image in `dir` whose UUID is this disk's, as (registry file name,
/// format). Two such images, or one that another disk already uses, is an
/// error for the operator to resolve, never a guess.
fn find_by_uuid(
    dir: &Path,
    disk_id: &str,
    reg: &Registry,
) -> Result<Option<(String, ImageFormat)>, Refusal> {
    let uuid = disk_uuid(disk_id);
    let matches: Vec<live::Found> = live::scan(dir)
        .map_err(storage)?
        .into_iter()
        .filter(|v| v.uuid == uuid)
        .collect();
    let names: Vec<String> = matches
        .iter()
        .map(|v| v.shown.display().to_string())
        .collect();
    let [found] = &matches[..] else {
        if matches.is_empty() {
            return Ok(None);
        }
        return Err(Refusal::new(
            ErrorCode::Internal,
            format!(
                "images {} all carry the UUID of disk {disk_id}; remove or re-UUID all but one, then the agent's next retry registers it",
                names.join(", ")
            ),
        ));
    };
    let name = found
        .file
        .strip_prefix(dir)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| found.file.display().to_string());
    if let Some((other, _)) = reg.iter().find(|(_, e)| e.image == name) {
        return Err(Refusal::new(
            ErrorCode::Internal,
            format!(
                "image {} carries the UUID of disk {disk_id} but is already the image of disk {other}; give it another UUID",
                found.shown.display()
            ),
        ));
    }
    info!(
        "disk {disk_id}: found {} image {} by its UUID (original location: only changes travel)",
        found.format.name(),
        found.shown.display()
    );
    Ok(Some((name, found.format)))
}

/// BLAKE3 of each `block`-byte piece of `data` (the last may be shorter),
/// in halves on two threads when there is enough to share.
fn hash_blocks(data: &[u8], block: usize) -> Vec<tidemark_common::checksum::Checksum> {
    let hash = |d: &[u8]| -> Vec<_> {
        let mut out = Vec::with_capacity(d.len().div_ceil(block));
        tidemark_common::checksum::block_checksums(d, block, &mut out);
        out
    };
    let blocks = data.len().div_ceil(block);
    if data.len() < PARALLEL_HASH_BYTES || blocks < 2 {
        return hash(data);
    }
    let (a, b) = data.split_at(blocks / 2 * block);
    std::thread::scope(|s| {
        let second = s.spawn(|| hash(b));
        let mut out = hash(a);
        out.extend(second.join().unwrap_or_else(|_| hash(b)));
        out
    })
}

/// The newest point covering `disk_id`, if any.
fn points_newest(points: &Path, disk_id: &str) -> Result<Option<u64>, Refusal> {
    Ok(read_all(points)
        .map_err(storage)?
        .iter()
        // Any machine's: after a reassign the disk's history goes on under
        // the new owner, and overwrites must be tagged after its newest point.
        .filter(|p| p.disks.iter().any(|d| d == disk_id))
        .map(|p| p.id)
        .max())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_in_halves_equals_hashing_in_order() {
        let data: Vec<u8> = (0..(PARALLEL_HASH_BYTES * 2 + 1000))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for len in [100, 4096, PARALLEL_HASH_BYTES + 512, data.len()] {
            let want: Vec<_> = data[..len]
                .chunks(4096)
                .map(tidemark_common::checksum::checksum)
                .collect();
            assert_eq!(hash_blocks(&data[..len], 4096), want, "len {len}");
        }
    }
}
