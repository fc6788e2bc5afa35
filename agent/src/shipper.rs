//! Keeps one connection to the receiver and gets pieces and points to it
//! durably. Pieces given to [`Shipper::send`] (a point's data, a one-shot
//! sync's) stay in memory until the receiver acknowledges them; after a
//! reconnect the unacknowledged ones go again, in their original order and
//! before anything newer, so a point never overtakes its data. Data given
//! to [`Shipper::try_send`] (continuous shipping between points) is let go
//! once written: if its connection ends before the ack, its range comes
//! back from [`Shipper::take_lost`] for the caller to mark dirty and read
//! again, which yields the device's current bytes, never older ones.
//! The window bounds what is unacknowledged; while it is full (or the
//! receiver is away) sending waits and the caller's own backlog grows
//! instead.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use tidemark_common::proto::frame::FrameError;
use tidemark_common::proto::{ErrorCode, Message, PointKind, SumKind, PROTOCOL_MAX};
use tracing::{info, warn};

use crate::compare::HashBoard;
use crate::disks::Disk;
use crate::pipeline::Piece;
use crate::progress::Progress;
use crate::throttle::{SendThrottle, RECHECK_EVERY};
use crate::transport::{retryable, ConnectError, Connection, Connector, Refused, Registered};

/// Payload bytes sent but not yet acknowledged, unless configured
/// (`send_window_mib`). 8 MiB with the receiver acking every
/// 4 MiB drained a backlog as fast as 16 MiB with acks every 8 MiB, or
/// faster, for 9 MiB less peak RSS (docs/BENCHMARKS.md, 2026-12-05).
pub const WINDOW_BYTES: u64 = 8 << 20;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A piece written and not yet acknowledged.
enum InFlight {
    /// Sent again after a reconnect.
    Kept(Piece),
    /// Data whose payload was dropped once written: read again if lost.
    LetGo {
        disk: usize,
        range: std::ops::Range<u64>,
        wire_bytes: u64,
    },
}

impl InFlight {
    fn wire_bytes(&self) -> u64 {
        match self {
            InFlight::Kept(p) => p.wire_bytes(),
            InFlight::LetGo { wire_bytes, .. } => *wire_bytes,
        }
    }

    fn range(&self) -> (usize, std::ops::Range<u64>) {
        match self {
            InFlight::Kept(p) => p.range(),
            InFlight::LetGo { disk, range, .. } => (*disk, range.clone()),
        }
    }

    /// Data or zeros: what an ack makes durable on the disk.
    fn is_data(&self) -> bool {
        matches!(
            self,
            InFlight::Kept(Piece::Data(_) | Piece::Zero { .. }) | InFlight::LetGo { .. }
        )
    }
}

/// A connection attempt (TCP, TLS, hello, registration) under way.
type Attempt = tokio::task::JoinHandle<Result<(Connection, Registered), ConnectError>>;

/// A point not yet recorded by the receiver.
pub struct SentPoint {
    /// The connection it went on and its seq there, once sent.
    sent_on: Option<(u64, u64)>,
    /// Data let go before the point's cut was unacknowledged on this
    /// connection then: the point holds only if it is recorded on it.
    requires: Option<u64>,
    kind: PointKind,
    name: String,
}

/// A point's connection ended before it was recorded while data sent
/// before its cut was unacknowledged on it: the point is to be cut again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the connection ended with data sent before the point unacknowledged; the point is cut again"
)]
pub struct PointVoided;

/// A point in what was sent (see [`Shipper::send_mark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendMark {
    connection: u64,
    seq: u64,
}

impl SendMark {
    pub fn same_connection(self, other: SendMark) -> bool {
        self.connection == other.connection
    }
}

pub struct Shipper {
    connector: Arc<Connector>,
    /// Runs on a task of its own: against a partitioned network an attempt
    /// takes the whole connect timeout, and the caller must go on draining
    /// the tracer meanwhile.
    attempt: Option<Attempt>,
    disks: Vec<Disk>,
    /// Give up after this long without a connection (None: never).
    give_up_after: Option<Duration>,
    conn: Option<Connection>,
    /// Counts connections made: says whether a point went on this one.
    connections: u64,
    handles: Vec<u32>,
    /// From the first registration: whether each image already existed.
    pub image_existed: Vec<bool>,
    seq: u64,
    /// Highest seq the receiver acknowledged on this connection.
    acked_seq: u64,
    inflight: BTreeMap<u64, InFlight>,
    inflight_bytes: u64,
    /// Most payload bytes in flight.
    window_bytes: u64,
    resend: VecDeque<Piece>,
    /// Ranges of let-go data whose connection ended unacknowledged, by
    /// disk index: dirty again, once the caller takes them.
    lost: Vec<(usize, std::ops::Range<u64>)>,
    progress: Arc<Progress>,
    last_heartbeat: Instant,
    /// Since when something sent on this connection has had no answer at
    /// all (None: the receiver spoke after our last message).
    unanswered_since: Option<Instant>,
    next_attempt: Instant,
    backoff: Duration,
    /// Since when no connection has made progress (None: the current one
    /// has). A connection that registers and is then refused or cut
    /// before the receiver acknowledges anything does not stop this clock,
    /// so a receiver that accepts and fails every time (a full volume) is
    /// retried with backoff and given up on like an unreachable one.
    disconnected_since: Option<Instant>,
    /// Why the last connection ended before it made progress; reported on
    /// the next attempt (and in the give-up message).
    failed_because: Option<String>,
    /// The receiver's last refusal since anything was acknowledged: a
    /// later attempt can end in a reset before its refusal is read, and
    /// giving up must still say why the receiver refused.
    receiver_said: Option<String>,
    /// The receiver refused for good (found after a failed write).
    refused: Option<String>,
    /// Checksum sync: where the receiver's hashes go.
    hash_board: Option<Arc<HashBoard>>,
    /// When Some, (disk index, offset) of every data or zero piece the
    /// receiver acknowledged, for a caller tracking what is durable.
    pub acked_log: Option<Vec<(usize, u64)>>,
    /// The send cap, when one is configured.
    throttle: Option<SendThrottle>,
    /// The checksum extents carry on the last connection (before the
    /// first: the newest protocol's).
    sum: SumKind,
}

impl Drop for Shipper {
    fn drop(&mut self) {
        if let Some(a) = self.attempt.take() {
            a.abort();
        }
    }
}

impl Shipper {
    /// Connects (retrying) and registers the disks.
    pub async fn connect(
        connector: Connector,
        disks: Vec<Disk>,
        give_up_after: Option<Duration>,
        progress: Arc<Progress>,
    ) -> anyhow::Result<Shipper> {
        let mut s = Shipper::unconnected(connector, disks, give_up_after, progress);
        s.ensure_connected().await?;
        Ok(s)
    }

    /// A shipper that connects on first use ([`Shipper::idle`] and every
    /// send try): `run` starts before the network is up.
    pub fn unconnected(
        connector: Connector,
        disks: Vec<Disk>,
        give_up_after: Option<Duration>,
        progress: Arc<Progress>,
    ) -> Shipper {
        Shipper {
            connector: Arc::new(connector),
            attempt: None,
            disks,
            give_up_after,
            conn: None,
            handles: Vec::new(),
            image_existed: Vec::new(),
            connections: 0,
            seq: 0,
            acked_seq: 0,
            inflight: BTreeMap::new(),
            inflight_bytes: 0,
            window_bytes: WINDOW_BYTES,
            resend: VecDeque::new(),
            lost: Vec::new(),
            progress,
            last_heartbeat: Instant::now(),
            unanswered_since: None,
            next_attempt: Instant::now(),
            backoff: INITIAL_BACKOFF,
            disconnected_since: None,
            failed_because: None,
            receiver_said: None,
            refused: None,
            hash_board: None,
            acked_log: None,
            throttle: None,
            sum: SumKind::for_version(PROTOCOL_MAX),
        }
    }

    /// Most payload bytes (after compression) sent and not yet
    /// acknowledged; a piece is always sent when nothing is in flight, so
    /// a window smaller than a piece still makes progress.
    pub fn set_window(&mut self, bytes: u64) {
        self.window_bytes = bytes;
    }

    /// Caps what is sent from now on (wire bytes, after compression).
    pub fn set_throttle(&mut self, throttle: Option<SendThrottle>) {
        self.throttle = throttle;
    }

    /// The checksum to pack extents with: the last connection's, which is
    /// very likely the next one's too (a piece that meets another is
    /// converted when written).
    pub fn sum_kind(&self) -> SumKind {
        self.sum
    }

    /// The send cap in force now and the window that sets it; (None,
    /// None): unlimited.
    pub fn send_cap(&self) -> (Option<u64>, Option<String>) {
        self.throttle
            .as_ref()
            .map_or((None, None), SendThrottle::cap_now)
    }

    /// When the send cap lets the next message go (None: now), at most
    /// [`RECHECK_EVERY`] ahead so a window that opens is noticed.
    fn paced_until(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let at = self.throttle.as_mut()?.ready_at(now)?;
        Some(at.min(now + RECHECK_EVERY))
    }

    /// Waits until `until`, handling what the receiver sends meanwhile
    /// (acks, hashes, heartbeats), without reconnecting.
    async fn wait_until(&mut self, until: Instant) -> anyhow::Result<()> {
        self.flush().await;
        while Instant::now() < until {
            if self.conn.is_none() {
                tokio::time::sleep_until(until.into()).await;
                break;
            }
            self.wait_incoming(Some(until)).await?;
        }
        Ok(())
    }

    /// Waits until the send cap lets the next message go; Ok(false) if
    /// `until` came first.
    async fn pace(&mut self, until: Option<Instant>) -> anyhow::Result<bool> {
        while let Some(at) = self.paced_until() {
            match until {
                Some(u) if u <= at => {
                    self.wait_until(u).await?;
                    return Ok(self.paced_until().is_none());
                }
                _ => self.wait_until(at).await?,
            }
        }
        Ok(true)
    }

    /// Writes, at the send cap, what the last connection left
    /// unacknowledged: it goes before anything newer. Ok(false): the
    /// connection is gone, or `until` came, with some of it left.
    async fn push_resends(&mut self, until: Option<Instant>) -> anyhow::Result<bool> {
        while !self.resend.is_empty() {
            if self.conn.is_none() || !self.pace(until).await? || self.conn.is_none() {
                return Ok(false);
            }
            let p = self.resend.pop_front().expect("checked above");
            self.write_piece(p, false).await;
        }
        Ok(self.conn.is_some())
    }

    /// Until `until` at most: writes what waits for a resend and waits
    /// for the send cap. Ok(true) when the next piece may go now (or
    /// there is no connection to wait for). Lets a caller with other
    /// duties (draining the tracer) wait in slices.
    pub async fn ready(&mut self, until: Instant) -> anyhow::Result<bool> {
        if self.conn.is_none() {
            return Ok(true);
        }
        if !self.push_resends(Some(until)).await? {
            return Ok(self.conn.is_none());
        }
        self.pace(Some(until)).await
    }

    /// Delivers [`Message::Hashes`] to `board` (None: they are refused).
    pub fn set_hash_board(&mut self, board: Option<Arc<HashBoard>>) {
        self.hash_board = board;
    }

    pub fn addr(&self) -> &str {
        self.connector.addr()
    }

    /// Whether everything sent is durable at the receiver (nothing in
    /// flight, waiting for a resend, or lost).
    pub fn all_acked(&self) -> bool {
        self.inflight.is_empty() && self.resend.is_empty() && self.lost.is_empty()
    }

    /// Where sending stands now: everything handed over before this call
    /// is durable at the receiver once [`Shipper::acked_through`] says so.
    /// None while anything waits for a resend or is lost (it goes on a
    /// later connection, or back to the dirty maps) or there is no
    /// connection.
    pub fn send_mark(&self) -> Option<SendMark> {
        (self.conn.is_some() && self.resend.is_empty() && self.lost.is_empty()).then_some(
            SendMark {
                connection: self.connections,
                seq: self.seq,
            },
        )
    }

    /// Whether everything sent up to `mark` is acknowledged durable. Acks
    /// are in order on a connection; a mark of an earlier connection never
    /// is (what that connection left went again under new numbers, or
    /// back to the dirty maps).
    pub fn acked_through(&self, mark: SendMark) -> bool {
        mark.connection == self.connections
            && self.conn.is_some()
            && self.acked_seq >= mark.seq
            && self.lost.is_empty()
    }

    /// The byte ranges of disk `index` sent, waiting to be resent or lost
    /// (not yet taken) and not yet durable at the receiver, in order,
    /// overlaps merged.
    pub fn unacked_ranges(&self, index: usize) -> Vec<std::ops::Range<u64>> {
        let mut ranges: Vec<std::ops::Range<u64>> = self
            .inflight
            .values()
            .map(InFlight::range)
            .chain(self.resend.iter().map(Piece::range))
            .chain(self.lost.iter().cloned())
            .filter(|(d, r)| *d == index && !r.is_empty())
            .map(|(_, r)| r)
            .collect();
        ranges.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        merged
    }

    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// One connection attempt, if one is due. Ok(false): not connected
    /// yet, try again later; Err: retrying cannot help (trust, refusal).
    /// An attempt under way is waited for until `wait` (None: until it
    /// ends), then left running.
    async fn try_connect(&mut self, wait: Option<Instant>) -> anyhow::Result<bool> {
        if self.conn.is_some() {
            return Ok(true);
        }
        let attempt = match self.attempt.as_mut() {
            Some(a) => a,
            None => {
                if Instant::now() < self.next_attempt {
                    return Ok(false);
                }
                if let Some(m) = self.refused.take() {
                    return Err(Refused(m).into());
                }
                if let Some(why) = self.failed_because.take() {
                    self.retry_later(&why, "")?;
                    return Ok(false);
                }
                let connector = self.connector.clone();
                let disks = self.disks.clone();
                self.attempt.insert(tokio::spawn(async move {
                    let mut c = connector.connect().await?;
                    let r = c.register(connector.addr(), &disks).await?;
                    Ok((c, r))
                }))
            }
        };
        let joined = match wait {
            None => attempt.await,
            Some(until) => match tokio::time::timeout_at(until.into(), attempt).await {
                Ok(j) => j,
                Err(_) => return Ok(false),
            },
        };
        self.attempt = None;
        let result = joined.unwrap_or_else(|e| {
            Err(ConnectError::Retry(format!(
                "connection attempt to receiver {} failed: {e}",
                self.connector.addr()
            )))
        });
        match result {
            Ok((c, r)) => {
                info!(
                    "connected to receiver {} at {}",
                    c.receiver_name,
                    self.connector.addr()
                );
                if self.image_existed.is_empty() {
                    self.image_existed = r.image_existed;
                }
                self.handles = r.handles;
                self.sum = c.sum;
                self.conn = Some(c);
                self.connections += 1;
                self.unanswered_since = None;
                // Backoff and the give-up clock reset only when the
                // receiver acknowledges something (see `progressed`).
                self.disconnected_since.get_or_insert_with(Instant::now);
                // What the last connection left unacknowledged goes first,
                // at the send cap: every path that writes pushes it before
                // anything newer (`push_resends`).
                self.flush().await;
                Ok(self.conn.is_some())
            }
            Err(ConnectError::Fatal(m)) => Err(Refused(m).into()),
            Err(ConnectError::Retry(m)) => {
                let hint = format!(
                    " (check that tidemark-receiver serve is running and reachable at {})",
                    self.connector.addr()
                );
                self.retry_later(&m, &hint)?;
                Ok(false)
            }
        }
    }

    /// Schedules the next attempt after a failed one, or gives up when
    /// the next one would come after `give_up_after` without progress.
    fn retry_later(&mut self, why: &str, hint: &str) -> anyhow::Result<()> {
        let since = *self.disconnected_since.get_or_insert_with(Instant::now);
        if let Some(limit) = self.give_up_after {
            if since.elapsed() + self.backoff > limit {
                match &self.receiver_said {
                    Some(said) if !why.contains(said.as_str()) => bail!(
                        "{why} (earlier the receiver reported {said}); gave up after {:?}{hint}",
                        since.elapsed()
                    ),
                    _ => bail!("{why}; gave up after {:?}{hint}", since.elapsed()),
                }
            }
        }
        warn!("{why}; retrying in {:?}", self.backoff);
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Ok(())
    }

    /// The receiver answered on this connection: it works again.
    fn progressed(&mut self) {
        self.backoff = INITIAL_BACKOFF;
        self.disconnected_since = None;
        self.receiver_said = None;
    }

    /// Connects (retrying with backoff until connected or given up).
    async fn ensure_connected(&mut self) -> anyhow::Result<()> {
        while !self.try_connect(None).await? {
            tokio::time::sleep_until(self.next_attempt.into()).await;
        }
        Ok(())
    }

    /// The disk at `index` has a new size. RegisterDisk is once per
    /// session, so the connection is closed and the next one registers
    /// every disk again (at once, no backoff); what was not acknowledged
    /// goes again after it, as after any disconnect.
    pub fn resize(&mut self, index: usize, size_bytes: u64) {
        if let Some(d) = self.disks.get_mut(index) {
            d.size_bytes = size_bytes;
        }
        if self.conn.take().is_some() {
            info!(
                "reconnecting to receiver {} to register the new size",
                self.connector.addr()
            );
            self.requeue_inflight();
            self.next_attempt = Instant::now();
        }
        // An attempt under way would register the old size.
        if let Some(a) = self.attempt.take() {
            a.abort();
        }
    }

    /// When the receiver's silence ends the connection, if it is waited on.
    fn silence_deadline(&self) -> Option<Instant> {
        self.unanswered_since
            .map(|t| t + self.connector.io_timeout())
    }

    /// Drops a connection whose receiver has not answered in time: a
    /// frozen flow or a partition gives no error, only silence.
    fn check_silence(&mut self) {
        if self.conn.is_some() && self.silence_deadline().is_some_and(|d| Instant::now() >= d) {
            let waited = self
                .unanswered_since
                .map_or(Duration::ZERO, |t| t.elapsed());
            self.disconnected(&format!("no answer for {waited:?} (receiver_timeout_secs)"));
        }
    }

    /// Drops the connection; everything unacknowledged will go again.
    fn disconnected(&mut self, why: &str) {
        if self.conn.take().is_some() {
            if self.disconnected_since.is_some() {
                self.failed_because = Some(format!(
                    "connection to receiver {} lost: {why}",
                    self.connector.addr()
                ));
            } else {
                warn!(
                    "connection to receiver {} lost: {why}; reconnecting",
                    self.connector.addr()
                );
            }
        }
        self.requeue_inflight();
        self.unanswered_since = None;
    }

    /// The connection is gone: what it left unacknowledged goes again
    /// before anything newer, and what was let go is lost.
    fn requeue_inflight(&mut self) {
        let inflight = std::mem::take(&mut self.inflight);
        for (_, f) in inflight.into_iter().rev() {
            match f {
                InFlight::Kept(p) => self.resend.push_front(p),
                InFlight::LetGo { disk, range, .. } => self.lost.push((disk, range)),
            }
        }
        self.inflight_bytes = 0;
    }

    /// Ranges of data let go by [`Shipper::try_send`] whose connection
    /// ended before the receiver acknowledged them: the caller marks them
    /// dirty, to be read and sent again.
    pub fn take_lost(&mut self) -> Vec<(usize, std::ops::Range<u64>)> {
        std::mem::take(&mut self.lost)
    }

    /// Whether data let go is still unacknowledged (or lost and not yet
    /// taken). A point must not be sent then: a lost range read again
    /// after it would be missing from it.
    pub fn let_go_unacked(&self) -> bool {
        !self.lost.is_empty()
            || self
                .inflight
                .values()
                .any(|f| matches!(f, InFlight::LetGo { .. }))
    }

    /// Waits up to `dur` for data let go to be acknowledged (or lost).
    pub async fn wait_let_go(&mut self, dur: Duration) -> anyhow::Result<()> {
        self.wait_while(dur, Shipper::let_go_unacked).await
    }

    /// Handles what the receiver sends for up to `dur`, while connected
    /// and `pending` holds, without reconnecting.
    async fn wait_while(
        &mut self,
        dur: Duration,
        pending: fn(&Shipper) -> bool,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + dur;
        self.flush().await;
        while self.conn.is_some() && pending(self) && Instant::now() < until {
            self.wait_incoming(Some(until)).await?;
        }
        Ok(())
    }

    /// The receiver's Error that ended a connection, as the reason to
    /// report; a refusal for good is kept for the next attempt to raise.
    fn error_reason(&mut self, code: ErrorCode, message: &str) -> String {
        if !retryable(code) {
            self.refused = Some(format!(
                "receiver {} refused: {message}",
                self.connector.addr()
            ));
        }
        format!("receiver reported {code:?}: {message}")
    }

    /// A write failed: the receiver usually closed the connection after
    /// telling us why (a full volume, a refusal), and that reason, not the
    /// broken pipe, is what the operator needs to see.
    async fn write_failed(&mut self, e: std::io::Error) {
        let mut why = e.to_string();
        if let Some(c) = self.conn.as_mut() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, c.incoming.recv()).await {
                if let Ok(Message::Error { code, message }) = msg {
                    why = self.error_reason(code, &message);
                    break;
                }
            }
        }
        self.disconnected(&why);
    }

    /// Writes one piece (buffered); on failure the piece waits for resend.
    /// With `let_go`, a data piece's payload is dropped once written (see
    /// the module's comment): only its range is remembered.
    async fn write_piece(&mut self, piece: Piece, let_go: bool) {
        let Some(c) = self.conn.as_mut() else {
            self.resend.push_back(piece);
            return;
        };
        let range = piece.range();
        let piece = match piece.for_connection(c.sum) {
            Ok(p) => p,
            Err(e) => {
                // Its payload no longer matches its own checksum (a memory
                // fault): the data is read again instead, and until then
                // no point is taken (`point`).
                warn!("a piece held for sending is damaged ({e}); reading it again");
                self.lost.push(range);
                return;
            }
        };
        let Some(frame) = piece.to_outgoing(self.seq + 1, &self.handles) else {
            return;
        };
        self.seq += 1;
        self.inflight_bytes += piece.wire_bytes();
        if let Some(t) = self.throttle.as_mut() {
            t.spend(piece.wire_bytes(), Instant::now());
        }
        if let Some(d) = self.disks.get(piece.range().0) {
            crate::metrics::get().shipped(&d.id, piece.disk_bytes(), piece.wire_bytes());
        }
        let held = match piece {
            Piece::Data(_) if let_go => {
                let (disk, range) = piece.range();
                InFlight::LetGo {
                    disk,
                    range,
                    wire_bytes: piece.wire_bytes(),
                }
            }
            p => InFlight::Kept(p),
        };
        self.inflight.insert(self.seq, held);
        self.unanswered_since.get_or_insert_with(Instant::now);
        if let Err(e) = c.send_outgoing(frame) {
            self.write_failed(e).await;
        }
    }

    pub async fn flush(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.flush().await {
                self.write_failed(e).await;
            }
        }
    }

    /// Queues a piece, waiting while the window is full.
    pub async fn send(&mut self, piece: Piece) -> anyhow::Result<()> {
        loop {
            self.ensure_connected().await?;
            if !self.push_resends(None).await? {
                continue;
            }
            if self.inflight_bytes >= self.window_bytes {
                self.wait_incoming(None).await?;
                continue;
            }
            self.pace(None).await?;
            if self.conn.is_some() {
                break;
            }
        }
        self.write_piece(piece, false).await;
        Ok(())
    }

    /// Handles what the receiver sent for up to `dur` (acks, heartbeats),
    /// reconnecting if needed.
    pub async fn idle(&mut self, dur: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + dur;
        self.flush().await;
        while Instant::now() < until {
            if !self.try_connect(Some(until)).await? {
                if self.attempt.is_none() {
                    tokio::time::sleep_until(self.next_attempt.min(until).into()).await;
                }
                continue;
            }
            if !self.push_resends(Some(until)).await? {
                continue;
            }
            self.wait_incoming(Some(until)).await?;
        }
        Ok(())
    }

    /// Sends a piece if connected, waiting for acks while the window is
    /// full; hands the piece back if the connection is (or goes) away, so
    /// the caller can mark its range dirty instead of holding its data.
    /// A data piece is let go once written: up to a window of payloads
    /// held for a resend was a sixth of the agent's peak RSS. Its range
    /// comes back from [`Shipper::take_lost`] if the connection ends
    /// before the ack.
    pub async fn try_send(&mut self, piece: Piece) -> anyhow::Result<Option<Piece>> {
        self.try_send_as(piece, true).await
    }

    /// [`Shipper::try_send`] for a point's data, which must not be read
    /// again after its cut: held until acknowledged, and resent from
    /// memory on the next connection if this one ends first.
    pub async fn try_send_held(&mut self, piece: Piece) -> anyhow::Result<Option<Piece>> {
        self.try_send_as(piece, false).await
    }

    async fn try_send_as(&mut self, piece: Piece, let_go: bool) -> anyhow::Result<Option<Piece>> {
        loop {
            if self.conn.is_none() || !self.push_resends(None).await? {
                return Ok(Some(piece));
            }
            if self.inflight_bytes >= self.window_bytes {
                self.wait_incoming(None).await?;
                continue;
            }
            self.pace(None).await?;
            if self.conn.is_some() {
                break;
            }
        }
        self.write_piece(piece, let_go).await;
        Ok(None)
    }

    /// Whether a piece sent now would have to wait for acks.
    pub fn window_full(&self) -> bool {
        self.conn.is_some() && self.inflight_bytes >= self.window_bytes
    }

    /// Waits up to `dur` for acks that open the window (or for the
    /// connection to end), so the caller can drain the tracer between
    /// waits however slow the link is.
    pub async fn wait_window(&mut self, dur: Duration) -> anyhow::Result<()> {
        self.wait_while(dur, Shipper::window_full).await
    }

    /// Waits up to `dur` for outstanding acks without reconnecting.
    pub async fn await_acks(&mut self, dur: Duration) -> anyhow::Result<()> {
        self.wait_while(dur, Shipper::awaiting_acks).await
    }

    /// Whether acks are outstanding on a live connection.
    pub fn awaiting_acks(&self) -> bool {
        self.conn.is_some() && self.inflight_bytes > 0
    }

    /// Sends a point after everything queued so far and waits until the
    /// receiver has recorded it durably; returns its id.
    pub async fn point(&mut self, kind: PointKind, name: &str) -> anyhow::Result<u64> {
        let mut sent = self.new_point(kind, name, None)?;
        loop {
            if let Some(id) = self.point_recorded(&mut sent, None).await? {
                return Ok(id);
            }
        }
    }

    /// A point to go after everything queued so far: [`Shipper::point_recorded`]
    /// sends it and says when the receiver holds it.
    /// `requires`: what [`Shipper::let_go_connection`] said before the
    /// cut.
    pub fn new_point(
        &self,
        kind: PointKind,
        name: &str,
        requires: Option<u64>,
    ) -> anyhow::Result<SentPoint> {
        if self.let_go_unacked() && requires.is_none() {
            // The caller waits for them before it cuts the point
            // (`wait_let_go`), or names the connection they went on; a
            // lost range would be read after the cut.
            bail!("internal error: a point was asked for while data sent before it may still be lost; no point taken");
        }
        Ok(SentPoint {
            sent_on: None,
            requires,
            kind,
            name: name.to_owned(),
        })
    }

    /// For a point about to be cut without waiting for the acks of data
    /// let go before it: the connection that data is on (None: there is
    /// none unacknowledged). Ranges already lost must be marked dirty
    /// first (`take_lost`).
    pub fn let_go_connection(&self) -> Option<u64> {
        self.let_go_unacked().then_some(self.connections)
    }

    /// The id of a point, once the receiver has recorded it durably; None
    /// if it has not by `until` (None: the next message). Sends the point
    /// first, after its data, and again on the next connection (its data
    /// resent first) if the one it went on ends: each step, the
    /// connection too, only up to `until`, so that a caller with other
    /// duties (draining the tracer, a stop) waits in slices.
    pub async fn point_recorded(
        &mut self,
        sent: &mut SentPoint,
        until: Option<Instant>,
    ) -> anyhow::Result<Option<u64>> {
        if self.conn.is_none() {
            let connected = match until {
                None => {
                    self.ensure_connected().await?;
                    true
                }
                Some(until) => self.try_connect(Some(until)).await?,
            };
            if !connected {
                if let (None, Some(until)) = (&self.attempt, until) {
                    tokio::time::sleep_until(self.next_attempt.min(until).into()).await;
                }
                return Ok(None);
            }
        }
        if sent
            .requires
            .is_some_and(|c| c != self.connections || self.conn.is_none())
        {
            // Data sent before the cut was let go on a connection that
            // ended: what of it was not acknowledged is read again after
            // the cut, so this point would not hold it.
            return Err(PointVoided.into());
        }
        let seq = match sent.sent_on {
            Some((conn, seq)) if conn == self.connections => seq,
            _ => {
                self.try_send_point(sent, until).await?;
                return Ok(None);
            }
        };
        match self.wait_incoming(until).await? {
            Some(Message::PointRecorded { seq: s, point_id }) if s == seq => Ok(Some(point_id)),
            _ => Ok(None),
        }
    }

    /// Writes `sent` on the connection, after what waits for a resend and
    /// at the send cap, up to `until`; it stays unsent if that comes or
    /// the connection ends first.
    async fn try_send_point(
        &mut self,
        sent: &mut SentPoint,
        until: Option<Instant>,
    ) -> anyhow::Result<()> {
        // A point follows its data, and is sent at the cap like it: a
        // transfer ends when its point is out, not before.
        if !self.push_resends(until).await? || !self.pace(until).await? {
            return Ok(());
        }
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        self.seq += 1;
        let seq = self.seq;
        if let Some(t) = self.throttle.as_mut() {
            t.spend(64, Instant::now());
        }
        let msg = Message::Point {
            seq,
            kind: sent.kind,
            name: sent.name.clone(),
            agent_time_ms: now_ms(),
        };
        self.unanswered_since.get_or_insert_with(Instant::now);
        if let Err(e) = c.send(&msg).await {
            self.write_failed(e).await;
            return Ok(());
        }
        sent.sent_on = Some((self.connections, seq));
        Ok(())
    }

    /// Planned failover: after everything queued and the final point,
    /// tells the receiver to refuse this agent's disks from now on, and
    /// waits until it has durably done so.
    pub async fn failover(&mut self) -> anyhow::Result<()> {
        loop {
            self.ensure_connected().await?;
            if !self.push_resends(None).await? {
                continue;
            }
            let Some(c) = self.conn.as_mut() else {
                continue;
            };
            self.seq += 1;
            let seq = self.seq;
            self.unanswered_since.get_or_insert_with(Instant::now);
            if let Err(e) = c.send(&Message::Failover { seq }).await {
                self.write_failed(e).await;
                continue;
            }
            while self.conn.is_some() {
                self.wait_incoming(None).await?;
                if self.acked_seq >= seq {
                    return Ok(());
                }
            }
        }
    }

    /// Waits for one message (or the deadline, or a heartbeat to send) and
    /// handles acks and errors. Returns the message when it is one the
    /// caller may care about.
    async fn wait_incoming(&mut self, until: Option<Instant>) -> anyhow::Result<Option<Message>> {
        // What is queued goes before a wait that may be for its answer.
        self.flush().await;
        let hb_due = self.last_heartbeat + HEARTBEAT_EVERY;
        let mut wake = until.map_or(hb_due, |u| u.min(hb_due));
        if let Some(d) = self.silence_deadline() {
            wake = wake.min(d);
        }
        let Some(c) = self.conn.as_mut() else {
            return Ok(None);
        };
        let msg = tokio::select! {
            // An answer already here must count before the silence does.
            biased;
            m = c.incoming.recv() => m,
            _ = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= hb_due {
                    self.last_heartbeat = Instant::now();
                    self.unanswered_since.get_or_insert_with(Instant::now);
                    if let Err(e) = c.send(&Message::Heartbeat { time_ms: now_ms() }).await {
                        self.write_failed(e).await;
                    }
                }
                self.check_silence();
                return Ok(None);
            }
        };
        self.handle_incoming(msg)
    }

    /// Handles every message that has already arrived, without waiting;
    /// reconnects if a connection attempt is due.
    pub async fn pump_ready(&mut self) -> anyhow::Result<()> {
        if !self.try_connect(Some(Instant::now())).await? {
            return Ok(());
        }
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Ok(());
            };
            let msg = match c.incoming.try_recv() {
                Ok(m) => Some(m),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    self.check_silence();
                    return Ok(());
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
            };
            self.handle_incoming(msg)?;
        }
    }

    fn handle_incoming(
        &mut self,
        msg: Option<Result<Message, FrameError>>,
    ) -> anyhow::Result<Option<Message>> {
        if let Some(Ok(_)) = msg {
            self.unanswered_since = None;
        }
        match msg {
            Some(Ok(Message::Ack { seq })) => {
                self.acked_seq = self.acked_seq.max(seq);
                let rest = self.inflight.split_off(&(seq + 1));
                let retired = std::mem::replace(&mut self.inflight, rest);
                // Only data made durable is progress: acknowledged hash
                // requests alone are what a receiver that refuses every
                // point still gives, and must not reset the backoff.
                if retired.values().any(InFlight::is_data) {
                    self.progressed();
                }
                for f in retired.into_values() {
                    self.inflight_bytes -= f.wire_bytes();
                    let (disk, range) = f.range();
                    if f.is_data() {
                        Progress::add(&self.progress.acked_bytes, range.end - range.start);
                        if let Some(log) = self.acked_log.as_mut() {
                            log.push((disk, range.start));
                        }
                    }
                }
                Ok(None)
            }
            Some(Ok(Message::Hashes {
                disk,
                offset_bytes,
                hashes,
                ..
            })) => {
                // Without a board the answer is to a request an abandoned
                // compare left behind (resent after a reconnect): unneeded.
                let idx = self.handles.iter().position(|&h| h == disk);
                if let (Some(board), Some(idx)) = (&self.hash_board, idx) {
                    board.put(idx as u32, offset_bytes, hashes);
                }
                Ok(None)
            }
            Some(Ok(Message::Heartbeat { .. })) => {
                self.progressed();
                Ok(None)
            }
            Some(Ok(Message::Error { code, message })) => {
                if retryable(code) {
                    self.receiver_said = Some(format!("{code:?}: {message}"));
                    self.disconnected(&format!("receiver reported {code:?}: {message}"));
                    Ok(None)
                } else {
                    Err(Refused(format!(
                        "receiver {} refused: {message}",
                        self.connector.addr()
                    ))
                    .into())
                }
            }
            Some(Ok(m @ Message::PointRecorded { .. })) => Ok(Some(m)),
            Some(Ok(other)) => {
                self.disconnected(&format!("unexpected {} from receiver", other.name()));
                Ok(None)
            }
            Some(Err(e)) => {
                // The writer task reports a broken pipe on the same channel
                // as the reader, and can get there before the receiver's
                // Error (a full volume, a refusal) that caused it: that
                // reason is what the operator needs, so take it if queued.
                let mut why = e.to_string();
                if let Some(c) = self.conn.as_mut() {
                    while let Ok(m) = c.incoming.try_recv() {
                        if let Ok(Message::Error { code, message }) = m {
                            why = self.error_reason(code, &message);
                            break;
                        }
                    }
                }
                self.disconnected(&why);
                Ok(None)
            }
            None => {
                self.disconnected("closed");
                Ok(None)
            }
        }
    }
}
