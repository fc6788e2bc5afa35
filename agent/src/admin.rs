//! The running agent's local admin socket: one JSON request per line, one
//! JSON reply per line. `bookmark` asks for a point now; `status` reports
//! each disk's state. Root only (the socket is 0600).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Bookmark {
        app_consistent: bool,
        name: Option<String>,
    },
    Status,
    /// Planned failover: final app-consistent point, then the receiver
    /// refuses this agent's disks and the agent stops.
    Failover {
        leave: Option<crate::config::FailoverLeave>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Point { id: u64, kind: String },
    Status(Status),
    Error(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub agent: String,
    pub receiver: String,
    pub connected: bool,
    pub last_point: Option<PointInfo>,
    pub disks: Vec<DiskStatus>,
    /// Cap on bytes sent to the receiver now (None: unlimited).
    #[serde(default)]
    pub send_cap_bytes_per_sec: Option<u64>,
    /// The `[[throttle.window]]` that sets it (None: `throttle.rate`).
    #[serde(default)]
    pub send_cap_window: Option<String>,
    /// Cap on reads of sync and resync (None: unlimited).
    #[serde(default)]
    pub sync_read_cap_bytes_per_sec: Option<u64>,
    /// A point that is due or asked for but held back: for how long, and why.
    #[serde(default)]
    pub point_waiting: Option<PointWaiting>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointWaiting {
    pub secs: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointInfo {
    pub id: u64,
    pub kind: String,
    pub agent_time_ms: u64,
    pub freeze_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskStatus {
    pub id: String,
    pub device: String,
    pub state: String,
    pub resync_reason: Option<String>,
    pub dirty_bytes: u64,
}

/// A request for the run loop, with where to send its answer.
pub struct Pending {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// Admin connections still being answered: the run loop waits for them
/// before the process exits, or a reply sent just before stopping (the
/// failover's final point) would be lost with the runtime.
#[derive(Clone, Default)]
pub struct Answering(Arc<(AtomicUsize, Notify)>);

impl Answering {
    fn enter(&self) -> AnsweringGuard {
        self.0 .0.fetch_add(1, Ordering::SeqCst);
        AnsweringGuard(self.clone())
    }

    /// Waits until every connection has its reply written, at most `max`.
    pub async fn drain(&self, max: std::time::Duration) {
        let _ = tokio::time::timeout(max, async {
            loop {
                let notified = self.0 .1.notified();
                if self.0 .0.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        })
        .await;
    }
}

struct AnsweringGuard(Answering);

impl Drop for AnsweringGuard {
    fn drop(&mut self) {
        self.0 .0 .0.fetch_sub(1, Ordering::SeqCst);
        self.0 .0 .1.notify_waiters();
    }
}

/// Listens on `path` (replacing a stale socket) and forwards requests.
/// `status` is answered from the run loop's latest snapshot once it has
/// one: the loop only takes requests between rounds, and a round under a
/// low send cap can take a minute, too long for a monitoring script.
pub fn serve(
    path: &Path,
    tx: mpsc::Sender<Pending>,
    status: watch::Receiver<Option<Status>>,
) -> anyhow::Result<Answering> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a crashed agent; a live agent would hold the
    // trace instance and the state files too, which the caller checks.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot listen on admin socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let answering = Answering::default();
    let counted = answering.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            let status = status.clone();
            let guard = counted.enter();
            tokio::spawn(async move {
                let _ = handle(stream, tx, status).await;
                drop(guard);
            });
        }
    });
    Ok(answering)
}

async fn handle(
    stream: UnixStream,
    tx: mpsc::Sender<Pending>,
    status: watch::Receiver<Option<Status>>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    // The socket is local, but a stuck client must not make us buffer
    // without limit.
    tokio::io::AsyncReadExt::take(BufReader::new(rd), 64 * 1024)
        .read_line(&mut line)
        .await?;
    let snapshot = status.borrow().clone();
    let reply = match (serde_json::from_str::<Request>(&line), snapshot) {
        (Ok(Request::Status), Some(now)) => Reply::Status(now),
        (Ok(request), _) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx
                .send(Pending {
                    request,
                    reply: reply_tx,
                })
                .await
                .is_err()
            {
                Reply::Error("agent is stopping".into())
            } else {
                reply_rx
                    .await
                    .unwrap_or_else(|_| Reply::Error("agent is stopping".into()))
            }
        }
        (Err(e), _) => Reply::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).expect("reply serializes");
    out.push(b'\n');
    wr.write_all(&out).await
}

/// Sends one request to a running agent and returns its reply.
pub async fn request(path: &Path, req: &Request) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the running agent at {} ({e}); is `tidemark-agent run` running with this config?",
            path.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    let mut out = serde_json::to_vec(req).expect("request serializes");
    out.push(b'\n');
    wr.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    serde_json::from_str(&line)
        .map_err(|e| anyhow::anyhow!("the agent's reply was not understood ({e}): {line:?}"))
}
