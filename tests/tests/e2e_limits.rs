//! The receiver's disk limit end to end: with `max_disks` (60 by default)
//! disks replicating from one agent, a 61st disk from another agent is
//! refused by name and limit, and the 60 keep replicating and export
//! exactly.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{agent_sync, assert_fails_with, Site};
use tidemark_tests::{LoopDev, SplitMix64};

const DISKS: usize = 60;
const DISK_BYTES: u64 = 4 << 20;

fn stamp(dev: &LoopDev, seed: u64) -> anyhow::Result<()> {
    let mut rng = SplitMix64::new(seed);
    let mut data = vec![0u8; 256 << 10];
    rng.fill_bytes(&mut data);
    let at = (seed % 12) * (256 << 10);
    dev.write_at(at, &data)
}

#[test]
fn the_61st_disk_is_refused_while_the_other_60_keep_replicating() -> anyhow::Result<()> {
    let started = Instant::now();
    // The receiver's default max_disks.
    let site = Site::start()?;
    let dir = site.dir.path();
    // max_loop is usually 8: losetup --find makes the rest through
    // /dev/loop-control. Every guard detaches its device on drop, also
    // when an assertion fails below.
    let mut devs = Vec::new();
    for i in 0..=DISKS {
        let d = LoopDev::create(&dir.join(format!("m{i}.img")), DISK_BYTES)
            .with_context(|| format!("loop device {} of {}", i + 1, DISKS + 1))?;
        stamp(&d, i as u64)?;
        devs.push(d);
    }
    let ids: Vec<String> = (0..=DISKS).map(|i| format!("many-{i:02}")).collect();

    let disks: Vec<(&Path, &str)> = devs[..DISKS]
        .iter()
        .zip(&ids)
        .map(|(d, id)| (d.path(), id.as_str()))
        .collect();
    let cfg = run_config(&site, "agent-many", &disks, "")?;
    let agent = RunningAgent::start(&cfg, "agent-many")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = agent.status_json()?;
        let disks = status["disks"].as_array().context("disks")?;
        ensure!(disks.len() == DISKS, "{status}");
        if disks.iter().all(|d| d["state"] == "protected") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "initial sync of {DISKS} disks not done: {status}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // New data on every protected disk, then the 61st disk asks in.
    for (i, d) in devs[..DISKS].iter().enumerate() {
        stamp(d, 1000 + i as u64)?;
    }
    let extra = site.agent(
        "agent-extra",
        site.addr,
        &[(devs[DISKS].path(), &ids[DISKS])],
    )?;
    let out = agent_sync(&extra, &[]);
    assert_fails_with(
        &out,
        &[
            "refused",
            "already protects 60 disks",
            "max_disks = 60",
            "raise max_disks",
        ],
    );
    let log = site.receiver.log();
    ensure!(
        log.contains("max_disks"),
        "the receiver did not log the refusal: {log}"
    );

    // The 60 go on: a point after the new data exports every disk exactly.
    let id = agent.bookmark(false)?;
    for (d, disk) in devs[..DISKS].iter().zip(&ids) {
        ensure!(
            site.export(disk, &id.to_string())? == d.read_all()?,
            "disk {disk} at point {id} differs from {}",
            d.path().display()
        );
    }
    let status = site.status_json()?;
    let listed = status["disks"].as_array().context("receiver disks")?;
    ensure!(listed.len() == DISKS, "receiver lists {}", listed.len());
    ensure!(
        !listed.iter().any(|d| d["id"] == ids[DISKS].as_str()),
        "the refused disk was registered: {status}"
    );
    let agent_status = agent.status_json()?;
    ensure!(
        agent_status["disks"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["state"] == "protected")),
        "{agent_status}"
    );
    eprintln!(
        "61 loop devices, 60 disks replicated and exported, the 61st refused, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
