//! A raw protocol client speaking mutual TLS with an agent's files, for
//! tests that script the wire protocol message by message.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tidemark_common::proto::frame::{read_message, write_message};
use tidemark_common::proto::handshake;
use tidemark_common::proto::{Message, PointKind, PROTOCOL_MAX, PROTOCOL_MIN};
use tidemark_common::tls::{client_config, server_name, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

pub async fn connect(addr: SocketAddr, agent_dir: &Path) -> anyhow::Result<Stream> {
    Ok(
        connect_offering(addr, agent_dir, PROTOCOL_MIN..=PROTOCOL_MAX)
            .await?
            .0,
    )
}

/// [`connect`] for an agent speaking only `versions` (an agent of another
/// release); also returns the version the receiver chose.
pub async fn connect_offering(
    addr: SocketAddr,
    agent_dir: &Path,
    versions: std::ops::RangeInclusive<u16>,
) -> anyhow::Result<(Stream, u16)> {
    let files = TlsFiles {
        ca: agent_dir.join("ca.pem"),
        cert: agent_dir.join("agent.pem"),
        key: agent_dir.join("agent-key.pem"),
    };
    let connector = tokio_rustls::TlsConnector::from(client_config(&files)?);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(server_name("tidemark-receiver")?, tcp)
        .await?;
    tls.write_all(&handshake::preamble_offering(
        *versions.start(),
        *versions.end(),
    ))
    .await?;
    let mut reply = [0u8; handshake::PREAMBLE_BYTES];
    tls.read_exact(&mut reply).await?;
    let chosen = handshake::agent_accept(&reply)?;
    anyhow::ensure!(
        versions.contains(&chosen),
        "the receiver chose version {chosen}, not one of {versions:?}"
    );
    Ok((tls, chosen))
}

/// Connects as agent `name` (certificates in `agent_dir`) and says hello;
/// fails unless the receiver welcomes it.
pub async fn hello(addr: SocketAddr, agent_dir: &Path, name: &str) -> anyhow::Result<Stream> {
    Ok(
        hello_offering(addr, agent_dir, name, PROTOCOL_MIN..=PROTOCOL_MAX)
            .await?
            .0,
    )
}

/// [`hello`] for an agent speaking only `versions`; also returns the
/// version the receiver chose.
pub async fn hello_offering(
    addr: SocketAddr,
    agent_dir: &Path,
    name: &str,
    versions: std::ops::RangeInclusive<u16>,
) -> anyhow::Result<(Stream, u16)> {
    let (mut s, version) = connect_offering(addr, agent_dir, versions).await?;
    send(
        &mut s,
        &Message::Hello {
            agent_name: name.into(),
            software_version: "test".into(),
        },
    )
    .await?;
    match recv(&mut s).await? {
        Some(Message::Welcome { .. }) => Ok((s, version)),
        other => anyhow::bail!("expected welcome, got {other:?}"),
    }
}

/// Sends a crash-consistent point `name` with `seq` and waits for it to be
/// recorded, passing over acks; returns its id.
pub async fn point(s: &mut Stream, seq: u64, name: &str) -> anyhow::Result<u64> {
    send(
        s,
        &Message::Point {
            seq,
            kind: PointKind::CrashConsistent,
            name: name.into(),
            agent_time_ms: 1,
        },
    )
    .await?;
    loop {
        match recv(s).await? {
            Some(Message::PointRecorded { point_id, .. }) => return Ok(point_id),
            Some(Message::Ack { .. }) => continue,
            other => anyhow::bail!("point {name:?} was not recorded: {other:?}"),
        }
    }
}

/// `RegisterDisk` for `disk` of `size` bytes with 512-byte blocks.
pub fn register_msg(disk: &str, size: u64) -> Message {
    Message::RegisterDisk {
        disk_id: disk.into(),
        size_bytes: size,
        logical_block_bytes: 512,
    }
}

/// Registers `disk`; returns the handle the receiver gave it.
pub async fn register(s: &mut Stream, disk: &str, size: u64) -> anyhow::Result<u32> {
    send(s, &register_msg(disk, size)).await?;
    match recv(s).await? {
        Some(Message::DiskRegistered { handle, .. }) => Ok(handle),
        other => anyhow::bail!("registering {disk}: {other:?}"),
    }
}

pub async fn send(s: &mut Stream, m: &Message) -> anyhow::Result<()> {
    write_message(s, m, &mut Vec::new()).await?;
    s.flush().await?;
    Ok(())
}

pub async fn recv(s: &mut Stream) -> anyhow::Result<Option<Message>> {
    let mut buf = Vec::new();
    Ok(tokio::time::timeout(Duration::from_secs(20), read_message(s, &mut buf)).await??)
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
