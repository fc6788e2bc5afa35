//! Process kills at random moments, on real loop devices: the agent during
//! continuous replication, `sync` during an initial sync and `resync`
//! during a checksum resync, and `export` midway. After each, the replica
//! converges to the device and every point exports exactly. The receiver's
//! kills (receive, apply, prune) are in `e2e_journal.rs`.
//!
//! `TIDEMARK_TRIALS` sets the number of trials per test (the suite's
//! default is small; `scripts/soak.sh` runs 50 and more).

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{agent_sync, path, point_id, receiver_cmd, Site};
use tidemark_tests::{scatter_blocks, trials, workspace_bin, LoopDev, SplitMix64};

fn random_fill(dev: &LoopDev, rng: &mut SplitMix64) -> anyhow::Result<()> {
    let mut data = vec![0u8; dev.size_bytes() as usize];
    rng.fill_bytes(&mut data);
    dev.write_at(0, &data)?;
    Ok(())
}

/// Runs `cmd`, SIGKILLs it after `delay` if still running; true if it
/// finished on its own and succeeded.
fn run_killed_after(cmd: &mut Command, delay: Duration) -> anyhow::Result<bool> {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let until = std::time::Instant::now() + delay;
    while std::time::Instant::now() < until {
        if let Some(st) = child.try_wait()? {
            return Ok(st.success());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait()?;
    Ok(false)
}

#[test]
fn agent_killed_at_random_moments_of_replication_converges() -> anyhow::Result<()> {
    let n = trials(6);
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("k.img"), 64 << 20)?;
    let cfg = run_config(&site, "kill-run", &[(dev.path(), "disk-k")], "")?;
    let mut agent = RunningAgent::start(&cfg, "kill-run")?;
    let mut rng = SplitMix64::new(tidemark_tests::seed(31));
    agent.bookmark(false)?;
    let mut resynced = 0;
    for trial in 0..n {
        scatter_blocks(&dev, &mut rng, 200)?;
        std::thread::sleep(Duration::from_millis(rng.below(800)));
        agent.kill();
        // Writes while it is down are in the trace instance (or, if the
        // kill lost track, found by the audit and resynced).
        scatter_blocks(&dev, &mut rng, 50)?;
        agent.restart()?;
        let id = agent
            .bookmark(false)
            .with_context(|| format!("trial {trial}"))?;
        ensure!(
            site.export("disk-k", &id.to_string())? == dev.read_all()?,
            "trial {trial}: point {id} differs from the device"
        );
        // A figure, not a condition: a kill between a drain's read of the
        // trace and its append to the drain log still costs a resync.
        if agent.log().contains("resync required") {
            resynced += 1;
        }
    }
    eprintln!(
        "{n} agent kills during replication, each converged; {resynced} of the restarts resynced"
    );
    Ok(())
}

#[test]
fn sync_and_resync_killed_midway_converge_when_run_again() -> anyhow::Result<()> {
    let n = trials(4);
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("s.img"), 64 << 20)?;
    let mut rng = SplitMix64::new(tidemark_tests::seed(37));
    random_fill(&dev, &mut rng)?;
    let cfg = site.agent("kill-sync", site.addr, &[(dev.path(), "disk-s")])?;
    let agent = workspace_bin("tidemark-agent");
    let mut cut = 0;
    for trial in 0..n {
        // The first trial's sync is the initial (full) one; later ones
        // compare checksums.
        if trial > 0 {
            scatter_blocks(&dev, &mut rng, 400)?;
        }
        let mode = if trial % 2 == 0 { "sync" } else { "resync" };
        let mut cmd = Command::new(&agent);
        cmd.args([mode, "--config", path(&cfg)]);
        if mode == "resync" {
            cmd.args(["--disk", "disk-s", "--mode", "checksum"]);
        }
        let delay = Duration::from_millis(50 + rng.below(600));
        if !run_killed_after(&mut cmd, delay)? {
            cut += 1;
        }
        let id = point_id(&agent_sync(&cfg, &[])).with_context(|| format!("trial {trial}"))?;
        ensure!(
            site.export("disk-s", &id.to_string())? == dev.read_all()?,
            "trial {trial}: point {id} differs from the device"
        );
    }
    eprintln!("{n} sync/resync runs, {cut} cut by SIGKILL, each converged on the next run");
    Ok(())
}

#[test]
fn an_export_killed_midway_harms_nothing() -> anyhow::Result<()> {
    let n = trials(4);
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("e.img"), 64 << 20)?;
    let mut rng = SplitMix64::new(tidemark_tests::seed(41));
    random_fill(&dev, &mut rng)?;
    let cfg = site.agent("kill-export", site.addr, &[(dev.path(), "disk-e")])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p1 = dev.read_all()?;
    scatter_blocks(&dev, &mut rng, 500)?;
    let p2 = point_id(&agent_sync(&cfg, &[]))?;
    let out = site.dir.path().join("killed.vmdk");
    for trial in 0..n {
        let mut cmd = receiver_cmd();
        cmd.args([
            "export",
            "--config",
            path(&site.config()),
            "--disk",
            "disk-e",
        ])
        .args([
            "--point",
            &p1.to_string(),
            "--format",
            "vmdk-sparse",
            "--out",
        ])
        .arg(&out);
        run_killed_after(&mut cmd, Duration::from_millis(rng.below(300)))?;
        ensure!(
            site.export("disk-e", &p1.to_string())? == at_p1,
            "trial {trial}: point {p1} changed"
        );
        ensure!(
            site.export("disk-e", &p2.to_string())? == dev.read_all()?,
            "trial {trial}: point {p2} changed"
        );
        let _ = std::fs::remove_file(&out);
    }
    eprintln!("{n} exports killed midway; the replica and its points unchanged");
    Ok(())
}
