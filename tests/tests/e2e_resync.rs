//! Checksum sync and resync on real loop devices: only differing blocks
//! travel to an image the receiver already has, and an interrupted resync
//! resumes where it durably got to.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use tidemark_tests::site::{agent_sync, assert_fails_with, path, point_id, run_ok, Site};
use tidemark_tests::{
    fill_mixed, scatter_blocks, workspace_bin, CountingProxy, Daemon, LoopDev, SplitMix64,
};

fn agent_cmd() -> Command {
    Command::new(workspace_bin("tidemark-agent"))
}

#[test]
fn checksum_sync_sends_only_the_differing_blocks() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 64 << 20)?;
    fill_mixed(&dev, 3)?;
    let proxy = CountingProxy::start(site.addr)?;
    let cfg = site.agent("agent-c", proxy.addr(), &[(dev.path(), "disk-c")])?;
    point_id(&agent_sync(&cfg, &[]))?;
    let full_upload = proxy.bytes_up();

    // 1 % of the blocks, scattered.
    let mut rng = SplitMix64::new(11);
    let blocks = dev.size_bytes() / 4096;
    let compressed = scatter_blocks(&dev, &mut rng, blocks / 100)?;
    proxy.reset_counts();
    let out = run_ok(
        agent_cmd()
            .args(["resync", "--config", path(&cfg), "--disk", "disk-c"])
            .args(["--mode", "checksum"]),
    )?;
    let p = point_id(&out)?;
    let sent = proxy.bytes_up();
    eprintln!(
        "checksum resync: {sent} bytes sent for {compressed} compressed bytes of differing blocks (full sync sent {full_upload}); {} bytes of hashes came back",
        proxy.bytes_down()
    );
    ensure!(
        site.export("disk-c", &p.to_string())? == dev.read_all()?,
        "image differs from the device after the checksum sync"
    );
    ensure!(
        sent as f64 <= compressed as f64 * 1.10,
        "{sent} bytes sent, more than 110 % of the {compressed} compressed bytes that differ"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(log.contains("differed from the receiver"), "{log}");

    // `sync` compares by default when the image exists: nothing changed,
    // so only requests and a point travel.
    proxy.reset_counts();
    point_id(&agent_sync(&cfg, &[]))?;
    ensure!(
        proxy.bytes_up() < 64 << 10,
        "an unchanged disk sent {} bytes",
        proxy.bytes_up()
    );
    Ok(())
}

/// Starts a rate-limited `resync --mode full`, waits for `first_log` in
/// its log, and kills it once at least `at_least` bytes are recorded as
/// durable; returns that figure.
fn interrupted_resync(
    proxy: &CountingProxy,
    cfg: &std::path::Path,
    disk: &str,
    first_log: &str,
    at_least: u64,
) -> anyhow::Result<u64> {
    proxy.set_rate_up(24 << 20);
    let mut agent = Daemon::spawn({
        let mut c = agent_cmd();
        c.args(["resync", "--config", path(cfg), "--disk", disk])
            .args(["--mode", "full"]);
        c
    })?;
    // Until the agent has judged the old resume state, it is not this
    // run's progress.
    agent.wait_for_log(first_log, Duration::from_secs(30))?;
    let resume = cfg
        .parent()
        .expect("agent dir")
        .join(format!("state/{disk}.sync-resume"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let durable_to = loop {
        ensure!(
            Instant::now() < deadline,
            "no resume state appeared: {}",
            agent.log()
        );
        if let Ok(bytes) = std::fs::read(&resume) {
            let v: serde_json::Value = serde_json::from_slice(&bytes)?;
            let d = v["durable_to"].as_u64().unwrap_or(0);
            if d >= at_least {
                break d;
            }
        }
        ensure!(
            agent.try_wait()?.is_none(),
            "resync ended before it could be interrupted: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    agent.kill();
    // What the killed agent left in socket buffers must not flow on and be
    // counted as the next run's: its connection goes with it.
    proxy.cut_all();
    proxy.set_rate_up(0);
    proxy.reset_counts();
    Ok(durable_to)
}

#[test]
fn an_interrupted_resync_resumes_where_it_durably_got_to() -> anyhow::Result<()> {
    let site = Site::start()?;
    let size = 96u64 << 20;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), size)?;
    let mut rng = SplitMix64::new(23);
    let mut before = vec![0u8; size as usize];
    rng.fill_bytes(&mut before);
    dev.write_at(0, &before)?;
    let proxy = CountingProxy::start(site.addr)?;
    let cfg = site.agent("agent-r", proxy.addr(), &[(dev.path(), "disk-r")])?;
    let p0 = point_id(&agent_sync(&cfg, &[]))?.to_string();
    // Everything changes (random data: nothing compresses).
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    dev.write_at(0, &data)?;

    // Interrupted, then the disk is written: nothing sent before can be
    // trusted, the next run starts over.
    interrupted_resync(&proxy, &cfg, "disk-r", "full sync", 16 << 20)?;
    // A cancelled resync never costs the last good point.
    ensure!(
        site.export("disk-r", &p0)? == before,
        "point {p0} changed under an interrupted resync"
    );
    dev.write_at(0, &[0x42; 4096])?;
    let durable_to = interrupted_resync(
        &proxy,
        &cfg,
        "disk-r",
        "written or replaced since the interrupted sync",
        32 << 20,
    )?;
    // Interrupted with the disk untouched: the next run picks up.
    let out = run_ok(
        agent_cmd()
            .args(["resync", "--config", path(&cfg), "--disk", "disk-r"])
            .args(["--mode", "full"]),
    )?;
    let p = point_id(&out)?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(log.contains("resuming an interrupted sync"), "{log}");
    // Random data does not compress: what travels is what was left.
    let left = size - durable_to;
    ensure!(
        proxy.bytes_up() < left + (8 << 20),
        "{} bytes sent after resuming at {durable_to}; only {left} were left",
        proxy.bytes_up()
    );
    let resume = cfg
        .parent()
        .expect("agent dir")
        .join("state/disk-r.sync-resume");
    ensure!(
        !resume.exists(),
        "a finished resync must remove its resume state"
    );
    ensure!(
        site.export("disk-r", &p.to_string())? == dev.read_all()?,
        "image differs from the device after the resumed resync"
    );
    ensure!(site.export("disk-r", &p0)? == before, "point {p0} was lost");
    Ok(())
}

#[test]
fn resync_of_an_unknown_disk_is_refused_by_name() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 8 << 20)?;
    let cfg = site.agent("agent-u", site.addr, &[(dev.path(), "disk-u")])?;
    let out = agent_cmd()
        .args(["resync", "--config", path(&cfg), "--disk", "nope"])
        .output()?;
    assert_fails_with(&out, &["nope", "not in the agent's configuration"]);
    Ok(())
}
