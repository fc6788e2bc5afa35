//! Agents and receivers of neighbouring releases work together: operators
//! upgrade one machine at a time, so each side still speaks the protocol
//! versions the other may have (docs/PROTOCOL.md, "Versions").

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use tidemark_common::proto::messages::Extent;
use tidemark_common::proto::{ErrorCode, Message, SumKind, PROTOCOL_MAX};
use tidemark_tests::raw;
use tidemark_tests::site::{path, Site};
use tidemark_tests::{fill_mixed, workspace_bin, Daemon, LoopDev, SplitMix64, VersionRelay};

/// An agent of the first release offers only version 1 and sends BLAKE3
/// extents: today's receiver chooses version 1 and stores them.
#[test]
fn a_receiver_takes_an_agent_of_the_first_protocol() -> anyhow::Result<()> {
    const SIZE: u64 = 1 << 20;
    let site = Site::start_network_only(&[])?;
    let dir = site.agent_dir("agent-old")?;
    let mut data = vec![0u8; 200 << 10];
    let mut rng = SplitMix64::new(11);
    data.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()));
    raw::block_on(async {
        let (mut s, version) = raw::hello_offering(site.addr, &dir, "agent-old", 1..=1).await?;
        ensure!(version == 1, "the receiver chose version {version}");
        let handle = raw::register(&mut s, "disk-old", SIZE).await?;
        let mut z = zstd::bulk::Compressor::new(1)?;
        let (first, second) = data.split_at(64 << 10);
        for (seq, offset, part, compressor) in [
            (1, 4096, first, Some(&mut z)),
            (2, 4096 + first.len() as u64, second, None),
        ] {
            let e = Extent::pack(seq, handle, offset, part, SumKind::Blake3, compressor);
            raw::send(&mut s, &Message::Extent(e)).await?;
        }
        raw::point(&mut s, 3, "old agent")
            .await
            .context("the first protocol's extents were refused")?;
        Ok::<_, anyhow::Error>(())
    })?;
    let mut want = vec![0u8; SIZE as usize];
    want[4096..4096 + data.len()].copy_from_slice(&data);
    ensure!(
        site.export("disk-old", "latest")? == want,
        "the export differs from what the old agent sent"
    );
    // Version 2's extent has no place in a version 1 session, as in a
    // receiver of that release.
    raw::block_on(async {
        let (mut s, _) = raw::hello_offering(site.addr, &dir, "agent-old", 1..=1).await?;
        let handle = raw::register(&mut s, "disk-old", SIZE).await?;
        let e = Extent::pack(1, handle, 0, &data[..4096], SumKind::Crc32c, None);
        raw::send(&mut s, &Message::Extent(e)).await?;
        match raw::recv(&mut s).await? {
            Some(Message::Error {
                code: ErrorCode::Protocol,
                message,
            }) if message.contains("version 1") => Ok(()),
            other => bail!("a CRC32C extent at version 1 was not refused: {other:?}"),
        }
    })?;
    ensure!(
        site.export("disk-old", "latest")? == want,
        "the refused extent changed the replica"
    );
    // An agent that speaks only versions this receiver does not is told
    // so, and the receiver says which it got.
    let newer = PROTOCOL_MAX + 1..=PROTOCOL_MAX + 2;
    let refused = raw::block_on(raw::connect_offering(site.addr, &dir, newer.clone()));
    match refused {
        Err(e) if e.to_string().contains("upgrade the older side") => {}
        Err(e) => bail!("unexpected refusal of versions {newer:?}: {e:#}"),
        Ok((_, v)) => bail!("the receiver chose version {v} among {newer:?}"),
    }
    site.receiver.wait_for_log(
        &format!("peer speaks {}..={}", PROTOCOL_MAX + 1, PROTOCOL_MAX + 2),
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// Today's agent against a receiver that speaks only version 1 (as seen
/// through a relay that lowers the version the agent offers), downgraded
/// in the middle of a sync: what it packed for version 2 and had not had
/// acknowledged is sent again with BLAKE3 checksums, and the replica is
/// exact.
#[test]
fn an_agent_syncs_through_a_receiver_downgraded_to_the_first_protocol() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 64 << 20)?;
    fill_mixed(&dev, 7)?;
    // The relay needs the agent's certificate, which `agent` issues with
    // the address the agent is to use: issued for the receiver, then
    // pointed at the relay.
    let cfg = site.agent("agent-c", site.addr, &[(dev.path(), "disk-c")])?;
    let agent_dir = cfg.parent().expect("config in its agent's directory");
    let relay = VersionRelay::start(
        site.addr,
        &site.dir.path().join("rx"),
        agent_dir,
        PROTOCOL_MAX,
    )?;
    let text = std::fs::read_to_string(&cfg)?;
    ensure!(text.contains(&site.addr.to_string()), "{text}");
    std::fs::write(
        &cfg,
        text.replace(&site.addr.to_string(), &relay.addr().to_string()),
    )?;
    const BEFORE_DOWNGRADE: u64 = 6;
    relay.downgrade_after(BEFORE_DOWNGRADE, 1);

    // Bounded, so that an agent that hangs fails the test with both logs
    // instead of holding the suite (one did: agent/src/pipeline.rs,
    // `finish`).
    let sync = Daemon::spawn({
        let mut c = Command::new(workspace_bin("tidemark-agent"));
        c.args(["sync", "--config", path(&cfg)]);
        c
    })?;
    let status = sync
        .wait_timeout(Duration::from_secs(120))
        .with_context(|| format!("receiver's log:\n{}", site.receiver.log()))?;
    ensure!(
        status.success(),
        "sync failed: {}\nreceiver's log:\n{}",
        sync.log(),
        site.receiver.log()
    );
    ensure!(relay.downgraded(), "the sync ended before the downgrade");
    ensure!(
        relay.crc32c_extents() == BEFORE_DOWNGRADE,
        "{} CRC32C extents relayed, not {BEFORE_DOWNGRADE}: version 2 was not used before the downgrade, or after it",
        relay.crc32c_extents()
    );
    ensure!(
        relay.blake3_extents() > 0,
        "no BLAKE3 extent after the downgrade"
    );
    ensure!(
        site.export("disk-c", "latest")? == dev.read_all()?,
        "the export differs from the device"
    );
    Ok(())
}
