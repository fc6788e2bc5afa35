//! A TLS relay between an agent and the receiver that makes the receiver
//! look like one of an older release: it lowers the newest protocol
//! version the agent offers before passing its preamble on, so the
//! receiver chooses at most `max_version`. It counts the extent frames the
//! agent sends by their checksum, and can cut every connection once it
//! has relayed a given number, offering a lower version from then on (a
//! receiver downgraded in the middle of a transfer).
//!
//! It terminates TLS on both sides with the site's own files: towards the
//! agent the receiver's certificate, towards the receiver the agent's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tidemark_common::proto::handshake::PREAMBLE_BYTES;
use tidemark_common::tls::{client_config, server_config, server_name, TlsFiles};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Type bytes of the two extent frames (docs/PROTOCOL.md).
const EXTENT_BLAKE3: u8 = 5;
const EXTENT_CRC32C: u8 = 15;

#[derive(Default)]
struct Shared {
    max_version: AtomicU16,
    blake3: AtomicU64,
    crc32c: AtomicU64,
    /// (extent frames relayed in all, version): at that count, cut every
    /// connection and offer at most that version from then on.
    downgrade: Mutex<Option<(u64, u16)>>,
    /// Bumped by a cut; a connection of an older generation ends.
    generation: AtomicU64,
}

pub struct VersionRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl VersionRelay {
    /// Relays to the receiver at `receiver` (its files in `receiver_dir`),
    /// speaking to it as the agent whose files are in `agent_dir`.
    pub fn start(
        receiver: SocketAddr,
        receiver_dir: &Path,
        agent_dir: &Path,
        max_version: u16,
    ) -> anyhow::Result<VersionRelay> {
        let towards_agent = tokio_rustls::TlsAcceptor::from(server_config(&TlsFiles {
            ca: receiver_dir.join("ca.pem"),
            cert: receiver_dir.join("receiver.pem"),
            key: receiver_dir.join("receiver-key.pem"),
        })?);
        let towards_receiver = tokio_rustls::TlsConnector::from(client_config(&TlsFiles {
            ca: agent_dir.join("ca.pem"),
            cert: agent_dir.join("agent.pem"),
            key: agent_dir.join("agent-key.pem"),
        })?);
        let shared = Arc::new(Shared::default());
        shared.max_version.store(max_version, Ordering::SeqCst);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("version-relay".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("relay listener");
                    let accept = async {
                        while let Ok((tcp, _)) = listener.accept().await {
                            let (a, c, s) =
                                (towards_agent.clone(), towards_receiver.clone(), s.clone());
                            tokio::spawn(async move {
                                // A connection's end, whatever its cause,
                                // is the agent's to notice and report.
                                let _ = relay(tcp, a, c, receiver, &s).await;
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })
            .context("starting the relay thread")?;
        Ok(VersionRelay {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Once `frames` extent frames have been relayed in all, the next one
    /// is not: every connection is cut, and later ones offer at most
    /// `version`.
    pub fn downgrade_after(&self, frames: u64, version: u16) {
        *self.shared.downgrade.lock().expect("relay lock") = Some((frames, version));
    }

    /// Extent frames relayed with a BLAKE3 checksum (protocol 1).
    pub fn blake3_extents(&self) -> u64 {
        self.shared.blake3.load(Ordering::SeqCst)
    }

    /// Extent frames relayed with a CRC32C checksum (protocol 2).
    pub fn crc32c_extents(&self) -> u64 {
        self.shared.crc32c.load(Ordering::SeqCst)
    }

    /// Whether the cut of [`VersionRelay::downgrade_after`] happened.
    pub fn downgraded(&self) -> bool {
        self.shared.generation.load(Ordering::SeqCst) > 0
    }
}

impl Drop for VersionRelay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn relay(
    tcp: TcpStream,
    towards_agent: tokio_rustls::TlsAcceptor,
    towards_receiver: tokio_rustls::TlsConnector,
    receiver: SocketAddr,
    shared: &Shared,
) -> anyhow::Result<()> {
    let generation = shared.generation.load(Ordering::SeqCst);
    let mut agent = towards_agent.accept(tcp).await?;
    let mut preamble = [0u8; PREAMBLE_BYTES];
    agent.read_exact(&mut preamble).await?;
    let offered = u16::from_be_bytes([preamble[10], preamble[11]]);
    let max = offered.min(shared.max_version.load(Ordering::SeqCst));
    preamble[10..12].copy_from_slice(&max.to_be_bytes());
    let tcp = TcpStream::connect(receiver).await?;
    let mut rx = towards_receiver
        .connect(server_name("tidemark-receiver")?, tcp)
        .await?;
    rx.write_all(&preamble).await?;
    let (mut agent_rd, mut agent_wr) = tokio::io::split(agent);
    let (mut rx_rd, rx_wr) = tokio::io::split(rx);
    let cut = async {
        while shared.generation.load(Ordering::SeqCst) == generation {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        _ = tokio::io::copy(&mut rx_rd, &mut agent_wr) => {}
        _ = frames_up(&mut agent_rd, rx_wr, shared) => {}
        _ = cut => {}
    }
    Ok(())
}

/// Passes the agent's frames on one by one, counting extents; returns
/// when either side ends or at the downgrade's cut.
async fn frames_up(
    from: &mut (impl AsyncRead + Unpin),
    mut to: impl AsyncWrite + Unpin,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        from.read_exact(&mut len).await?;
        frame.clear();
        frame.extend_from_slice(&len);
        frame.resize(4 + u32::from_be_bytes(len) as usize, 0);
        from.read_exact(&mut frame[4..]).await?;
        let counter = match frame.get(4) {
            Some(&EXTENT_BLAKE3) => Some(&shared.blake3),
            Some(&EXTENT_CRC32C) => Some(&shared.crc32c),
            _ => None,
        };
        if let Some(counter) = counter {
            let relayed =
                shared.blake3.load(Ordering::SeqCst) + shared.crc32c.load(Ordering::SeqCst);
            let mut downgrade = shared.downgrade.lock().expect("relay lock");
            if let Some((at, version)) = *downgrade {
                if relayed >= at {
                    *downgrade = None;
                    shared.max_version.store(version, Ordering::SeqCst);
                    shared.generation.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
        to.write_all(&frame).await?;
        to.flush().await?;
    }
}
