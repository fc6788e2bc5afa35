//! The agent's side of a connection: TCP, TLS 1.3 with its certificate,
//! the preamble, hello, and disk registration. Decoded messages from the
//! receiver arrive on a channel so the caller can wait on them alongside
//! its own work without losing half-read frames.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use tidemark_common::proto::frame::{read_message, write_message, FrameError};
use tidemark_common::proto::handshake::{self, PREAMBLE_BYTES};
use tidemark_common::proto::messages::Extent;
use tidemark_common::proto::{ErrorCode, Message, SumKind};
use tidemark_common::tls::{client_config, server_name, TlsError};
use tidemark_common::SOFTWARE_VERSION;

use crate::config::AgentConfig;
use crate::disks::Disk;

/// Time allowed for TCP connect, TLS and the preamble together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Network trouble, receiver busy or restarting.
    #[error("{0}")]
    Retry(String),
    /// Configuration or trust problem: retrying cannot fix it.
    #[error("{0}")]
    Fatal(String),
}

/// The receiver refused for good (its trust, an authorization, a failed
/// over disk): retrying, or restarting the agent, cannot fix it. `main`
/// exits with [`REFUSED_EXIT_CODE`] so systemd stops restarting
/// (`RestartPreventExitStatus=`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Exit status of a command the receiver refused for good.
pub const REFUSED_EXIT_CODE: u8 = 3;

/// Receiver error codes worth retrying: they describe a passing state.
pub fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Busy | ErrorCode::Storage | ErrorCode::Internal
    )
}

pub struct Connector {
    addr: String,
    server_name: rustls_pki_types::ServerName<'static>,
    tls: TlsConnector,
    agent_name: String,
    /// A write that makes no progress for this long has lost its receiver.
    io_timeout: Duration,
}

pub struct Connection {
    /// Messages from the receiver; `Err` or `None` means the connection is gone.
    pub incoming: mpsc::Receiver<Result<Message, FrameError>>,
    /// Encoded frames for the writer task. Writing happens there so that a
    /// receiver that stops reading never blocks the caller, which must
    /// drain the tracer on time; the shipper's window bounds what waits.
    frames: mpsc::UnboundedSender<Vec<Outgoing>>,
    /// Frames queued here until [`Connection::flush`] or until they make a
    /// batch: the writer task wakes once per batch, not per frame.
    pending: Vec<Outgoing>,
    pending_bytes: usize,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
    pub receiver_name: String,
    /// The checksum the receiver's protocol version takes.
    pub sum: SumKind,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Disk handles the receiver assigned in one session, by disk index.
pub struct Registered {
    pub handles: Vec<u32>,
    pub image_existed: Vec<bool>,
}

impl Connector {
    pub fn new(cfg: &AgentConfig) -> Result<Connector, TlsError> {
        Ok(Connector {
            addr: cfg.receiver.clone(),
            server_name: server_name(&cfg.server_name)?,
            tls: TlsConnector::from(client_config(&cfg.tls_files())?),
            agent_name: cfg.name.clone(),
            io_timeout: Duration::from_secs(cfg.receiver_timeout_secs),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How long the receiver may leave us without an answer or progress.
    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    pub async fn connect(&self) -> Result<Connection, ConnectError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Retry(format!(
                "receiver {} did not complete the handshake within {CONNECT_TIMEOUT:?}",
                self.addr
            ))),
        }
    }

    async fn connect_inner(&self) -> Result<Connection, ConnectError> {
        let tcp = TcpStream::connect(&self.addr).await.map_err(|e| {
            ConnectError::Retry(format!("cannot connect to receiver {}: {e}", self.addr))
        })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.classify(e, "TLS handshake"))?;
        let (mut rd, mut wr) = tokio::io::split(tls);
        wr.write_all(&handshake::agent_preamble())
            .await
            .map_err(|e| self.classify(e, "sending preamble"))?;
        wr.flush()
            .await
            .map_err(|e| self.classify(e, "sending preamble"))?;
        // In TLS 1.3 the receiver checks our certificate after the client
        // side considers the handshake done: a rejection arrives here.
        let mut reply = [0u8; PREAMBLE_BYTES];
        rd.read_exact(&mut reply)
            .await
            .map_err(|e| self.classify(e, "reading preamble"))?;
        let version = handshake::agent_accept(&reply)
            .map_err(|e| ConnectError::Fatal(format!("receiver {}: {e}", self.addr)))?;

        let mut scratch = Vec::new();
        write_message(
            &mut wr,
            &Message::Hello {
                agent_name: self.agent_name.clone(),
                software_version: SOFTWARE_VERSION.to_owned(),
            },
            &mut scratch,
        )
        .await
        .map_err(|e| self.classify(e, "sending hello"))?;
        wr.flush()
            .await
            .map_err(|e| self.classify(e, "sending hello"))?;
        let mut buf = Vec::new();
        let receiver_name = match read_message(&mut rd, &mut buf).await {
            Ok(Some(Message::Welcome { receiver_name, .. })) => receiver_name,
            Ok(Some(Message::Error { code, message })) => {
                return Err(refusal(&self.addr, code, &message))
            }
            Ok(Some(other)) => {
                return Err(ConnectError::Fatal(format!(
                    "receiver {} answered hello with {}",
                    self.addr,
                    other.name()
                )))
            }
            Ok(None) => {
                return Err(ConnectError::Retry(format!(
                    "receiver {} closed the connection after hello",
                    self.addr
                )))
            }
            Err(FrameError::Io(e)) => return Err(self.classify(e, "reading welcome")),
            Err(e) => {
                return Err(ConnectError::Fatal(format!(
                    "receiver {} sent a malformed welcome: {e}",
                    self.addr
                )))
            }
        };

        let (tx, incoming) = mpsc::channel(64);
        let (frames, queued) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_frames(wr, queued, tx.clone(), self.io_timeout));
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                let r = read_message(&mut rd, &mut buf).await;
                let end = !matches!(r, Ok(Some(_)));
                let item = match r {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(FrameError::Truncated),
                    Err(e) => Err(e),
                };
                if tx.send(item).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Connection {
            incoming,
            frames,
            pending: Vec::new(),
            pending_bytes: 0,
            writer,
            reader,
            receiver_name,
            sum: SumKind::for_version(version),
        })
    }

    /// Tells trust problems (fatal) from network trouble (retry).
    fn classify(&self, e: std::io::Error, stage: &str) -> ConnectError {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(c)) => ConnectError::Fatal(format!(
                "receiver {} presented a certificate this agent does not trust ({c:?}); ca in agent.toml must be that receiver's CA (from its issue-cert)",
                self.addr
            )),
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRevoked)) => {
                ConnectError::Fatal(format!(
                    "receiver {} has revoked this agent's certificate; ask its operator for a new one (tidemark-receiver issue-cert) or to take this agent off revoked_agents / revoked_fingerprints",
                    self.addr
                ))
            }
            Some(rustls::Error::AlertReceived(a)) => ConnectError::Fatal(format!(
                "receiver {} rejected this agent's certificate ({a:?}); use a current certificate from that receiver's `tidemark-receiver issue-cert`",
                self.addr
            )),
            Some(other) => ConnectError::Fatal(format!(
                "TLS with receiver {} failed during {stage}: {other}",
                self.addr
            )),
            None => ConnectError::Retry(format!(
                "connection to receiver {} failed during {stage}: {e}",
                self.addr
            )),
        }
    }
}

fn refusal(addr: &str, code: ErrorCode, message: &str) -> ConnectError {
    let text = format!("receiver {addr} refused: {message}");
    if retryable(code) {
        ConnectError::Retry(text)
    } else {
        ConnectError::Fatal(text)
    }
}

impl Connection {
    /// Hands one message, and every frame queued before it, to the writer
    /// task. Fails once the writer has stopped (its reason arrives on
    /// `incoming`).
    pub async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.send_outgoing(Outgoing::message(msg))?;
        self.flush().await
    }

    /// Queues one frame; it goes to the writer task with the batch it
    /// fills or at the next [`Connection::flush`], which the caller owes
    /// before it waits for anything the frame may bring about. The writer
    /// task flushes TLS whenever it has nothing more queued.
    pub fn send_outgoing(&mut self, frame: Outgoing) -> std::io::Result<()> {
        self.pending_bytes += frame.len();
        self.pending.push(frame);
        if self.pending.len() >= BATCH_FRAMES || self.pending_bytes >= BATCH_BYTES {
            self.hand_over()?;
        }
        Ok(())
    }

    fn hand_over(&mut self) -> std::io::Result<()> {
        self.pending_bytes = 0;
        self.frames
            .send(std::mem::take(&mut self.pending))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Hands the queued frames to the writer task; fails once the writer
    /// has stopped.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            self.hand_over()?;
        }
        if self.frames.is_closed() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }

    /// Registers every disk, in order; handle i belongs to disks[i].
    pub async fn register(
        &mut self,
        addr: &str,
        disks: &[Disk],
    ) -> Result<Registered, ConnectError> {
        let lost = |e: &dyn std::fmt::Display| {
            ConnectError::Retry(format!(
                "connection to receiver {addr} lost during registration: {e}"
            ))
        };
        let mut out = Registered {
            handles: Vec::new(),
            image_existed: Vec::new(),
        };
        for d in disks {
            self.send(&Message::RegisterDisk {
                disk_id: d.id.clone(),
                size_bytes: d.size_bytes,
                logical_block_bytes: d.logical_block_bytes,
            })
            .await
            .map_err(|e| lost(&e))?;
            loop {
                match self.incoming.recv().await {
                    Some(Ok(Message::DiskRegistered {
                        disk_id,
                        handle,
                        image_existed,
                    })) if disk_id == d.id => {
                        out.handles.push(handle);
                        out.image_existed.push(image_existed);
                        break;
                    }
                    Some(Ok(Message::Heartbeat { .. })) => continue,
                    Some(Ok(Message::Error { code, message })) => {
                        return Err(refusal(addr, code, &message))
                    }
                    Some(Ok(other)) => {
                        return Err(ConnectError::Fatal(format!(
                            "receiver {addr} answered registration of disk {} with {}",
                            d.id,
                            other.name()
                        )))
                    }
                    Some(Err(e)) => return Err(lost(&e)),
                    None => return Err(lost(&"closed")),
                }
            }
        }
        Ok(out)
    }
}

/// A frame for the writer task.
pub enum Outgoing {
    Frame(Vec<u8>),
    /// An extent's frame up to its payload, then the payload itself, read
    /// from the extent the shipper may keep for a resend: a frame of its
    /// own would hold a second copy and cost a copy per byte sent.
    Extent {
        head: Vec<u8>,
        extent: Arc<Extent>,
    },
}

impl Outgoing {
    pub fn message(msg: &Message) -> Outgoing {
        let mut frame = Vec::new();
        msg.encode_frame(&mut frame);
        Outgoing::Frame(frame)
    }

    /// `extent` as sent with `seq` to the disk with `handle`.
    pub fn extent(seq: u64, handle: u32, extent: &Arc<Extent>) -> Outgoing {
        let mut head = Vec::with_capacity(64);
        extent.encode_frame_head(seq, handle, &mut head);
        Outgoing::Extent {
            head,
            extent: extent.clone(),
        }
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    /// The bytes to write, in order.
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            Outgoing::Frame(f) => [f, &[]],
            Outgoing::Extent { head, extent } => [head, &extent.payload],
        }
    }
}

/// Frames written in one call, at most: enough that a TLS write fills
/// several records and the socket gets them in one system call.
const BATCH_FRAMES: usize = 32;
/// Bytes a batch grows to, at most, from frames already queued.
const BATCH_BYTES: usize = 256 << 10;

/// Writes queued frames in order, flushing when the queue runs empty. A
/// receiver that stops reading (a frozen flow, a partition) fills the
/// socket buffer: a write that makes no progress for `io_timeout` ends the
/// connection, and why is reported where the shipper reads.
///
/// Frames already queued go to TLS together, as one vectored write:
/// written one part at a time, an extent's small head became a TLS record
/// and a socket write of its own, and at 175 MB/s of churn in random
/// 4-64 KiB writes that was some 3000 writes a second, each waking the
/// receiver (docs/BENCHMARKS.md, "Frames written together").
async fn write_frames(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut queued: mpsc::UnboundedReceiver<Vec<Outgoing>>,
    report: mpsc::Sender<Result<Message, FrameError>>,
    io_timeout: Duration,
) {
    let stalled = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} made no progress for {io_timeout:?} (receiver_timeout_secs): the receiver stopped reading"),
        )
    };
    let result: std::io::Result<()> = async {
        let mut batch = Batch::default();
        loop {
            if batch.is_empty() {
                match queued.recv().await {
                    Some(frames) => batch.extend(frames),
                    None => break,
                }
                if batch.is_empty() {
                    // Nothing to write: a write of nothing would read as
                    // a connection that takes no more.
                    continue;
                }
            }
            while batch.frames.len() < BATCH_FRAMES && batch.bytes < BATCH_BYTES {
                match queued.try_recv() {
                    Ok(frames) => batch.extend(frames),
                    Err(_) => break,
                }
            }
            let n = {
                let slices = batch.slices();
                tokio::time::timeout(io_timeout, wr.write_vectored(&slices))
                    .await
                    .map_err(|_| stalled("sending"))??
            };
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            batch.advance(n);
            if batch.is_empty() && queued.is_empty() {
                tokio::time::timeout(io_timeout, wr.flush())
                    .await
                    .map_err(|_| stalled("flushing"))??;
            }
        }
        Ok(())
    }
    .await;
    queued.close();
    if let Err(e) = result {
        let _ = report.send(Err(FrameError::Io(e))).await;
    }
}

/// Frames taken from the queue and not yet wholly written.
#[derive(Default)]
struct Batch {
    frames: std::collections::VecDeque<Outgoing>,
    /// Bytes of the first frame already written.
    written: usize,
    /// Bytes of all the frames, written or not.
    bytes: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push(&mut self, frame: Outgoing) {
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    fn extend(&mut self, frames: Vec<Outgoing>) {
        for f in frames {
            self.push(f);
        }
    }

    /// What is left to write, in order.
    fn slices(&self) -> Vec<std::io::IoSlice<'_>> {
        let mut skip = self.written;
        let mut out = Vec::with_capacity(self.frames.len() * 2);
        for frame in &self.frames {
            for part in frame.parts() {
                let from = skip.min(part.len());
                skip -= from;
                if from < part.len() {
                    out.push(std::io::IoSlice::new(&part[from..]));
                }
            }
        }
        out
    }

    /// Marks `n` more bytes written, dropping the frames written whole.
    fn advance(&mut self, n: usize) {
        self.written += n;
        while let Some(front) = self.frames.front() {
            let len = front.len();
            if self.written < len {
                break;
            }
            self.written -= len;
            self.bytes -= len;
            self.frames.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rest(b: &Batch) -> Vec<u8> {
        b.slices().iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn a_batch_writes_every_byte_once_in_order_however_the_writes_split() {
        let extent = Arc::new(Extent::pack(
            1,
            0,
            4096,
            &[7u8; 9000],
            SumKind::Crc32c,
            None,
        ));
        let frames = || {
            vec![
                Outgoing::Frame(vec![1, 2, 3]),
                Outgoing::extent(5, 2, &extent),
                Outgoing::Frame(vec![4; 10]),
            ]
        };
        let whole: Vec<u8> = frames().iter().flat_map(|f| f.parts().concat()).collect();
        for step in [1, 2, 3, 5, 64, 4096, 100_000] {
            let mut b = Batch::default();
            for f in frames() {
                b.push(f);
            }
            assert_eq!(b.bytes, whole.len());
            let mut sent = Vec::new();
            while !b.is_empty() {
                let left = rest(&b);
                assert_eq!(left[..], whole[sent.len()..], "step {step}");
                let n = step.min(left.len());
                sent.extend_from_slice(&left[..n]);
                b.advance(n);
            }
            assert_eq!(sent, whole, "step {step}");
            assert_eq!((b.bytes, b.written), (0, 0), "step {step}");
        }
    }
}
