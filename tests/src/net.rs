//! Sockets on 127.0.0.1: a free port, and a byte-counting TCP proxy with
//! fault hooks (cut every connection, cut mid-stream after a byte count,
//! pause forwarding, limit the rate, add latency), also inside a network
//! namespace.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::netns::Netns;

/// How long the accept loop and a paused pump sleep between checks.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long the proxy waits for the target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes moved per read/write in one direction of one connection.
const PUMP_BUF_BYTES: usize = 64 * 1024;
/// Chunks read ahead of the writer in one direction (the delay line that
/// carries latency): at most 16 MiB held per direction.
const PUMP_QUEUE_CHUNKS: usize = 256;

/// A port on 127.0.0.1 that was free a moment ago (bind to port 0, read the
/// port, release it). Another process may take it before the caller binds.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// A TCP proxy on 127.0.0.1 that forwards every accepted connection to a
/// target and counts the bytes it forwarded in each direction.
///
/// Counts are of bytes handed to the other side, counted just before the
/// write: once a peer has received bytes, they are in the counters.
pub struct CountingProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    connections: AtomicU64,
    paused: AtomicBool,
    /// Upstream bytes per second (0: unlimited).
    rate_up: AtomicU64,
    /// Added one-way delay, in microseconds, each direction.
    latency_us: AtomicU64,
    /// Upstream bytes still to forward before every connection is cut
    /// (None: not armed).
    cut_up_after: Mutex<Option<u64>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Live connections: (client side, server side), for `cut_all`.
    live: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    /// Per live connection: set, it forwards nothing ever again.
    frozen: Mutex<HashMap<u64, Arc<AtomicBool>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, (TcpStream, TcpStream)>> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cut_all(&self) {
        for (_, (client, server)) in self.live().drain() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

impl CountingProxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind proxy on 127.0.0.1:0")?;
        CountingProxy::serve(listener, target, None)
    }

    /// Listens on `bind` inside `ns` and forwards each connection to
    /// `target`, reached from inside `ns` too: the proxy is a box on the
    /// receiver's side of the wire.
    pub fn start_in(
        ns: &Netns,
        bind: SocketAddr,
        target: SocketAddr,
    ) -> anyhow::Result<CountingProxy> {
        let listener = ns
            .run_in(move || TcpListener::bind(bind))?
            .with_context(|| format!("bind proxy on {bind} in netns {}", ns.name()))?;
        let ns_file = std::fs::File::open(ns.path())
            .with_context(|| format!("open {}", ns.path().display()))?;
        CountingProxy::serve(listener, target, Some(ns_file))
    }

    fn serve(
        listener: TcpListener,
        target: SocketAddr,
        netns: Option<std::fs::File>,
    ) -> anyhow::Result<CountingProxy> {
        let addr = listener.local_addr().context("proxy local address")?;
        listener
            .set_nonblocking(true)
            .context("make proxy listener nonblocking")?;
        let shared = Arc::new(Shared::default());
        let accept_thread = std::thread::Builder::new()
            .name(format!("proxy-accept-{}", addr.port()))
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    // Connections to the target are made from this thread:
                    // it must live where the target is.
                    if let Some(f) = netns {
                        if let Err(e) = nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        {
                            eprintln!("tidemark-tests: proxy cannot enter its netns: {e}");
                            return;
                        }
                    }
                    accept_loop(listener, target, shared)
                }
            })
            .context("spawn proxy accept thread")?;
        Ok(CountingProxy {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes forwarded from clients to the target.
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the target to clients.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Sets both byte counters back to zero (e.g. between two passes).
    pub fn reset_counts(&self) {
        self.shared.bytes_up.store(0, Ordering::SeqCst);
        self.shared.bytes_down.store(0, Ordering::SeqCst);
    }

    /// Closes every live connection (both sockets, both directions). New
    /// connections are still accepted and forwarded.
    pub fn cut_all(&self) {
        self.shared.cut_all();
    }

    /// Limits client → target forwarding to about `bytes_per_sec` (0:
    /// unlimited), like a slow uplink.
    pub fn set_rate_up(&self, bytes_per_sec: u64) {
        self.shared.rate_up.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// While paused, no bytes are forwarded in either direction (bytes read
    /// already are held back, then the kernel buffers fill and senders
    /// block); connections are still accepted. Unpausing resumes forwarding.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }

    /// Holds every chunk this long before forwarding it, in both
    /// directions, without limiting throughput (a long, fat pipe).
    pub fn set_latency(&self, one_way: Duration) {
        self.shared
            .latency_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    /// Cuts every live connection once `bytes` more client → target bytes
    /// have been forwarded, in the middle of a write: the target gets a
    /// frame (and a TLS record) with its tail missing.
    pub fn cut_up_after(&self, bytes: u64) {
        *lock(&self.shared.cut_up_after) = Some(bytes);
    }

    /// Freezes every live connection for good: no byte moves either way and
    /// nobody is told (a middlebox that lost the flow's state). New
    /// connections are forwarded normally.
    pub fn freeze_live(&self) {
        for f in lock(&self.shared.frozen).values() {
            f.store(true, Ordering::SeqCst);
        }
    }

    /// Whether an armed [`CountingProxy::cut_up_after`] has fired.
    pub fn cut_fired(&self) -> bool {
        lock(&self.shared.cut_up_after).is_none()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.cut_all();
        if let Some(thread) = self.accept_thread.take() {
            if thread.join().is_err() {
                eprintln!("tidemark-tests: proxy accept thread panicked");
            }
        }
        // A connection accepted while stopping is cut by the accept loop
        // itself; pump threads end once their sockets are shut down.
        self.shared.cut_all();
    }
}

impl std::fmt::Debug for CountingProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingProxy")
            .field("addr", &self.addr)
            .field("bytes_up", &self.bytes_up())
            .field("bytes_down", &self.bytes_down())
            .finish_non_exhaustive()
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(err) = start_connection(client, target, &shared) {
                    eprintln!("tidemark-tests: proxy to {target}: {err:#}");
                }
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL_INTERVAL),
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => {
                eprintln!("tidemark-tests: proxy accept: {err}");
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

fn start_connection(
    client: TcpStream,
    target: SocketAddr,
    shared: &Arc<Shared>,
) -> anyhow::Result<()> {
    shared.connections.fetch_add(1, Ordering::SeqCst);
    // The accepted socket may inherit O_NONBLOCK from the listener on some
    // platforms; the pumps want blocking sockets.
    client
        .set_nonblocking(false)
        .context("make client socket blocking")?;
    let server = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .with_context(|| format!("connect to target {target}"))?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    shared.live().insert(
        id,
        (
            client.try_clone().context("clone client socket")?,
            server.try_clone().context("clone server socket")?,
        ),
    );
    if shared.stopping.load(Ordering::SeqCst) {
        shared.cut_all();
        return Ok(());
    }

    let frozen = Arc::new(AtomicBool::new(false));
    lock(&shared.frozen).insert(id, Arc::clone(&frozen));
    let halves_done = Arc::new(AtomicU64::new(0));
    let directions = [
        (
            client.try_clone().context("clone client socket")?,
            server.try_clone().context("clone server socket")?,
            true,
        ),
        (server, client, false),
    ];
    for (from, to, up) in directions {
        let shared = Arc::clone(shared);
        let halves_done = Arc::clone(&halves_done);
        let frozen = Arc::clone(&frozen);
        std::thread::Builder::new()
            .name(format!("proxy-{id}-{}", if up { "up" } else { "down" }))
            .spawn(move || {
                pump(from, to, up, &shared, &frozen);
                if halves_done.fetch_add(1, Ordering::SeqCst) == 1 {
                    shared.live().remove(&id);
                    lock(&shared.frozen).remove(&id);
                }
            })
            .context("spawn proxy pump thread")?;
    }
    Ok(())
}

/// Copies `from` to `to` until EOF or an error, counting forwarded bytes,
/// then half-closes `to` so the peer sees the EOF. A reader thread feeds
/// a delay line; this thread writes each chunk once it is due.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    up: bool,
    shared: &Arc<Shared>,
    frozen: &AtomicBool,
) {
    let counter = if up {
        &shared.bytes_up
    } else {
        &shared.bytes_down
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(PUMP_QUEUE_CHUNKS);
    let source = from.try_clone();
    let reader = std::thread::spawn({
        let shared = Arc::clone(shared);
        move || {
            let mut buf = vec![0u8; PUMP_BUF_BYTES];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let delay = Duration::from_micros(shared.latency_us.load(Ordering::SeqCst));
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    'chunks: for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        while (shared.paused.load(Ordering::SeqCst) || frozen.load(Ordering::SeqCst))
            && !shared.stopping.load(Ordering::SeqCst)
        {
            std::thread::sleep(POLL_INTERVAL);
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let mut chunk = &chunk[..];
        let mut cut_now = false;
        if up {
            let mut armed = lock(&shared.cut_up_after);
            if let Some(left) = *armed {
                if (chunk.len() as u64) >= left {
                    // Forward only the head of this chunk, then cut.
                    chunk = &chunk[..left as usize];
                    cut_now = true;
                    *armed = None;
                } else {
                    *armed = Some(left - chunk.len() as u64);
                }
            }
        }
        // Counted before the write: once the peer has the bytes, so do the
        // counters (a failed write on a cut connection may count a little).
        counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if to.write_all(chunk).is_err() {
            break;
        }
        if cut_now {
            shared.cut_all();
            break 'chunks;
        }
        let rate = shared.rate_up.load(Ordering::SeqCst);
        if up && rate > 0 {
            std::thread::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64));
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    // The reader ends on EOF or on the shutdown of a cut; if the writer
    // stopped first (the other side went away), its blocked read must end
    // too, or the connection would linger in the live table.
    if let Ok(s) = source {
        let _ = s.shutdown(Shutdown::Read);
    }
    let _ = reader.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An echo server on 127.0.0.1 answering any number of connections.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = listener.local_addr().expect("echo address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().expect("clone echo socket");
                    let _ = std::io::copy(&mut reader, &mut stream);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    }

    #[test]
    fn counts_bytes_both_ways() {
        let proxy = CountingProxy::start(echo_server()).expect("start proxy");
        const N: usize = 1_000_003;
        let sent = pattern(N);
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect to proxy");
        let writer = {
            let mut stream = stream.try_clone().expect("clone");
            let sent = sent.clone();
            std::thread::spawn(move || {
                stream.write_all(&sent).expect("send");
                stream.shutdown(Shutdown::Write).expect("half-close");
            })
        };
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("read echo");
        writer.join().expect("writer");
        assert_eq!(got, sent);
        assert_eq!(proxy.bytes_up(), N as u64);
        assert_eq!(proxy.bytes_down(), N as u64);
        assert_eq!(proxy.connections(), 1);

        // A second connection adds to the same counters.
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect again");
        stream.write_all(b"hello").expect("send");
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).expect("echo");
        assert_eq!(&reply, b"hello");
        assert_eq!(proxy.bytes_up(), N as u64 + 5);
        assert_eq!(proxy.bytes_down(), N as u64 + 5);
        proxy.reset_counts();
        assert_eq!((proxy.bytes_up(), proxy.bytes_down()), (0, 0));
    }

    #[test]
    fn cut_all_closes_live_connections() {
        let proxy = CountingProxy::start(echo_server()).expect("start proxy");
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect");
        stream.write_all(b"ping").expect("send");
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).expect("echo");
        proxy.cut_all();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        // EOF or reset, but no hang and no more data.
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());

        // The proxy still accepts new connections.
        let mut stream = TcpStream::connect(proxy.addr()).expect("reconnect");
        stream.write_all(b"again").expect("send");
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).expect("echo after cut");
        assert_eq!(&reply, b"again");
    }

    #[test]
    fn pause_holds_bytes_until_resumed() {
        let proxy = CountingProxy::start(echo_server()).expect("start proxy");
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        proxy.set_paused(true);
        stream.write_all(b"held").expect("send");
        let mut reply = [0u8; 4];
        let err = stream
            .read_exact(&mut reply)
            .expect_err("nothing forwarded while paused");
        assert!(matches!(
            err.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
        assert_eq!(proxy.bytes_up(), 0);

        proxy.set_paused(false);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .read_exact(&mut reply)
            .expect("forwarded after resume");
        assert_eq!(&reply, b"held");
        assert_eq!(proxy.bytes_up(), 4);
    }

    #[test]
    fn drop_stops_listener_and_connections() {
        let proxy = CountingProxy::start(echo_server()).expect("start proxy");
        let addr = proxy.addr();
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.write_all(b"x").expect("send");
        let mut reply = [0u8; 1];
        stream.read_exact(&mut reply).expect("echo");
        let started = Instant::now();
        drop(proxy);
        assert!(started.elapsed() < Duration::from_secs(2), "drop is prompt");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());
        assert!(TcpStream::connect(addr).is_err(), "listener is closed");
    }

    #[test]
    fn latency_delays_each_direction() {
        let proxy = CountingProxy::start(echo_server()).expect("start proxy");
        proxy.set_latency(Duration::from_millis(150));
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect");
        let started = Instant::now();
        stream.write_all(b"ping").expect("send");
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).expect("echo");
        let rtt = started.elapsed();
        assert!(rtt >= Duration::from_millis(300), "round trip {rtt:?}");
        assert!(rtt < Duration::from_secs(3), "round trip {rtt:?}");
    }

    #[test]
    fn cut_up_after_forwards_exactly_that_much_then_cuts() {
        let proxy = CountingProxy::start(echo_server()).expect("start proxy");
        proxy.cut_up_after(100_003);
        let mut stream = TcpStream::connect(proxy.addr()).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // The write may fail once the cut lands: that is the point.
        let _ = stream.write_all(&pattern(300_000));
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        assert!(proxy.cut_fired());
        assert_eq!(proxy.bytes_up(), 100_003);
        assert!(got.len() <= 100_003, "{} bytes echoed", got.len());
        assert_eq!(got[..], pattern(300_000)[..got.len()]);
    }
}
