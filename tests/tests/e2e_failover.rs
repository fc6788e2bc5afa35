//! Failover at the receiver on real loop devices: rollback of the live
//! image to a point while `serve` runs, undo of the rollback byte for
//! byte, commit dropping the journal, replication refused while failed
//! over and accepted again after reprotect.

use std::process::Output;

use anyhow::ensure;
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{
    agent_sync, assert_fails_with, path, point_id, receiver_cmd, run_ok, Site,
};
use tidemark_tests::{
    fill_mixed, free_port, scatter_blocks, CountingProxy, Daemon, LoopDev, SplitMix64,
};

fn churn(dev: &LoopDev, rng: &mut SplitMix64, writes: usize) -> anyhow::Result<()> {
    let blocks = dev.size_bytes() / 4096;
    for _ in 0..writes {
        let at = rng.below(blocks - 16) * 4096;
        let mut data = vec![0u8; 4096 * (1 + rng.below(16) as usize)];
        rng.fill_bytes(&mut data);
        dev.write_at(at, &data)?;
    }
    Ok(())
}

fn receiver(site: &Site, args: &[&str]) -> anyhow::Result<Output> {
    Ok(receiver_cmd()
        .args([args[0], "--config", path(&site.config())])
        .args(&args[1..])
        .output()?)
}

fn ok(out: Output) -> anyhow::Result<Output> {
    ensure!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

#[test]
fn rollback_undo_commit_and_reprotect_while_serve_runs() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 32 << 20)?;
    let cfg = site.agent("agent-f", site.addr, &[(dev.path(), "disk-f")])?;
    let mut rng = SplitMix64::new(41);
    fill_mixed(&dev, 4)?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p1 = dev.read_all()?;
    churn(&dev, &mut rng, 60)?;
    let p2 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p2 = dev.read_all()?;
    churn(&dev, &mut rng, 60)?;
    let p3 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p3 = dev.read_all()?;
    let live = site.image("disk-f");
    let before = std::fs::read(&live)?;
    ensure!(
        before == at_p3,
        "live image is not the device before the test"
    );

    // Roll back to the first point: the live image is that point.
    ok(receiver(
        &site,
        &["rollback", "--disk", "disk-f", "--point", &p1.to_string()],
    )?)?;
    ensure!(
        std::fs::read(&live)? == at_p1,
        "live image is not point {p1}"
    );
    ensure!(
        site.export("disk-f", "latest")? == at_p1,
        "latest is not the rollback point"
    );
    let out = receiver_cmd()
        .args([
            "export",
            "--config",
            path(&site.config()),
            "--disk",
            "disk-f",
        ])
        .args([
            "--point",
            &p3.to_string(),
            "--out",
            path(&site.dir.path().join("x.raw")),
        ])
        .output()?;
    assert_fails_with(&out, &["newer than point", "rollback --undo"]);
    // Replication of a failed-over disk is refused, with the reason.
    churn(&dev, &mut rng, 5)?;
    let refused = agent_sync(&cfg, &[]);
    assert_fails_with(&refused, &["disk-f", "failed over"]);
    // Refused for good: exit 3, which the unit's RestartPreventExitStatus
    // keeps systemd from restarting into.
    assert_eq!(refused.status.code(), Some(3));
    let log = site.receiver.log();
    ensure!(log.contains("failed over"), "{log}");
    ensure!(
        std::fs::read(&live)? == at_p1,
        "a refused agent changed the image"
    );

    // Undo: byte for byte the image before the rollback, every point back.
    ok(receiver(
        &site,
        &["rollback", "--disk", "disk-f", "--undo"],
    )?)?;
    ensure!(
        std::fs::read(&live)? == before,
        "undo did not restore the image byte for byte"
    );
    ensure!(
        site.export("disk-f", &p3.to_string())? == at_p3,
        "point {p3} lost"
    );
    ensure!(
        site.export("disk-f", &p2.to_string())? == at_p2,
        "point {p2} lost"
    );

    // Roll back to p2 and commit: the journal goes, p2 stays exportable.
    ok(receiver(
        &site,
        &["rollback", "--disk", "disk-f", "--point", &p2.to_string()],
    )?)?;
    let twice = receiver(
        &site,
        &["rollback", "--disk", "disk-f", "--point", &p1.to_string()],
    )?;
    assert_fails_with(&twice, &["already rolled back", "--undo"]);
    ok(receiver(&site, &["commit", "--disk", "disk-f"])?)?;
    let journal = site.dir.path().join("retention/undo/disk-f");
    ensure!(!journal.exists(), "commit must drop the journal");
    ensure!(
        site.export("disk-f", &p2.to_string())? == at_p2,
        "committed point lost"
    );
    let out = receiver_cmd()
        .args([
            "export",
            "--config",
            path(&site.config()),
            "--disk",
            "disk-f",
        ])
        .args([
            "--point",
            &p1.to_string(),
            "--out",
            path(&site.dir.path().join("y.raw")),
        ])
        .output()?;
    assert_fails_with(&out, &["committed"]);
    assert_fails_with(
        &receiver(&site, &["rollback", "--disk", "disk-f", "--undo"])?,
        &["committed", "cannot be undone"],
    );
    assert_fails_with(&agent_sync(&cfg, &[]), &["disk-f", "reprotect"]);

    // Reprotect: the agent compares with the committed image and the
    // replica converges to the device.
    ok(receiver(&site, &["reprotect", "--disk", "disk-f"])?)?;
    let p4 = point_id(&agent_sync(&cfg, &[]))?;
    ensure!(
        site.export("disk-f", &p4.to_string())? == dev.read_all()?,
        "no convergence after reprotect"
    );
    ensure!(
        site.export("disk-f", &p2.to_string())? == at_p2,
        "the committed point must survive new writes"
    );
    let listing = run_ok(receiver_cmd().args([
        "points",
        "--config",
        path(&site.config()),
        "--disk",
        "disk-f",
        "--json",
    ]))?;
    let v: serde_json::Value = serde_json::from_slice(&listing.stdout)?;
    let ids: Vec<u64> = v["points"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default();
    ensure!(
        ids == vec![p2, p4],
        "listed {ids:?}: only the committed point and later ones can be exported"
    );
    Ok(())
}

#[test]
fn failover_commands_name_what_is_wrong() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 8 << 20)?;
    let cfg = site.agent("agent-e", site.addr, &[(dev.path(), "disk-e")])?;
    fill_mixed(&dev, 2)?;
    point_id(&agent_sync(&cfg, &[]))?;
    for (args, needles) in [
        (
            vec!["rollback", "--disk", "nope", "--point", "latest"],
            vec!["unknown disk", "nope"],
        ),
        (
            vec!["rollback", "--disk", "disk-e", "--point", "999"],
            vec!["no recovery point", "999"],
        ),
        (
            vec![
                "rollback",
                "--disk",
                "disk-e",
                "--point",
                "2001-01-01T00:00:00Z",
            ],
            vec!["no point", "before"],
        ),
        (
            vec!["rollback", "--disk", "disk-e", "--undo"],
            vec!["not rolled back"],
        ),
        (
            vec!["commit", "--disk", "disk-e"],
            vec!["not failed over", "rollback"],
        ),
        (
            vec!["reprotect", "--disk", "disk-e"],
            vec!["not failed over"],
        ),
    ] {
        assert_fails_with(&receiver(&site, &args)?, &needles);
    }
    // None of that stopped replication.
    point_id(&agent_sync(&cfg, &[]))?;
    Ok(())
}

#[test]
fn rollback_stops_a_live_replication_session() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    fill_mixed(&dev, 6)?;
    let cfg = run_config(&site, "run-fo", &[(dev.path(), "disk-l")], "")?;
    let agent = RunningAgent::start(&cfg, "run-fo")?;
    let p = agent.bookmark(false)?;
    // The session holds the disk; the rollback waits for it to notice the
    // failover (at the agent's next heartbeat at the latest) and let go.
    let started = std::time::Instant::now();
    ok(receiver(
        &site,
        &["rollback", "--disk", "disk-l", "--point", &p.to_string()],
    )?)?;
    eprintln!(
        "rollback waited {:?} for the live session",
        started.elapsed()
    );
    let daemon = agent.daemon.as_ref().expect("running");
    let status = daemon.wait_timeout(std::time::Duration::from_secs(30))?;
    ensure!(!status.success(), "the agent must stop with an error");
    ensure!(
        agent.log().contains("failed over"),
        "the agent must say why: {}",
        agent.log()
    );
    ensure!(
        site.export("disk-l", "latest")? == dev.read_all()?,
        "the rollback point is not the device as bookmarked"
    );
    Ok(())
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn planned_failover_ships_everything_and_the_receiver_refuses_the_agent_after() -> anyhow::Result<()>
{
    tidemark_tests::require_cmd("fsck.ext4")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("fs.img"), 64 << 20)?;
    dev.mkfs_ext4()?;
    let mnt = site.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    // A long commit interval: the files below sit only in the page cache
    // until the failover's freeze flushes them.
    run_ok(std::process::Command::new("mount").args([
        "-o",
        "commit=300",
        path(dev.path()),
        path(&mnt),
    ]))?;
    let _unmount = Unmount(mnt.clone());
    let cfg = run_config(&site, "run-pf", &[(dev.path(), "disk-pf")], "")?;
    let agent = RunningAgent::start(&cfg, "run-pf")?;
    agent.bookmark(false)?;
    let mut rng = SplitMix64::new(77);
    let mut expected = Vec::new();
    for i in 0..12 {
        let mut data = vec![0u8; 3000 * (i + 1)];
        rng.fill_bytes(&mut data);
        std::fs::write(mnt.join(format!("late{i}")), &data)?;
        expected.push((format!("late{i}"), data));
    }
    let out = run_ok(
        std::process::Command::new(tidemark_tests::workspace_bin("tidemark-agent")).args([
            "failover",
            "--config",
            path(&cfg),
        ]),
    )?;
    let p: u64 = String::from_utf8(out.stdout)?.trim().parse()?;
    let status = agent
        .daemon
        .as_ref()
        .expect("running")
        .wait_timeout(std::time::Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "the agent must stop cleanly: {}",
        agent.log()
    );
    ensure!(
        agent.log().contains("planned failover complete"),
        "{}",
        agent.log()
    );
    // The final point holds every file written before the failover.
    let image = site.dir.path().join("final.raw");
    run_ok(receiver_cmd().args([
        "export",
        "--config",
        path(&site.config()),
        "--disk",
        "disk-pf",
        "--point",
        &p.to_string(),
        "--out",
        path(&image),
    ]))?;
    run_ok(std::process::Command::new("fsck.ext4").args(["-n", "-f", path(&image)]))?;
    let check = site.dir.path().join("check");
    std::fs::create_dir_all(&check)?;
    run_ok(std::process::Command::new("mount").args([
        "-o",
        "ro,loop,noload",
        path(&image),
        path(&check),
    ]))?;
    let _unmount_check = Unmount(check.clone());
    for (name, data) in &expected {
        let got = std::fs::read(check.join(name))?;
        ensure!(
            &got == data,
            "{name} differs or is missing at the final point {p}"
        );
    }
    let listing =
        run_ok(receiver_cmd().args(["points", "--config", path(&site.config()), "--json"]))?;
    let v: serde_json::Value = serde_json::from_slice(&listing.stdout)?;
    ensure!(v["disks"]["disk-pf"]["latest"] == p, "{v}");
    ensure!(
        v["disks"]["disk-pf"]["failover"]
            .as_str()
            .is_some_and(|s| s.contains("failed over")),
        "{v}"
    );
    // Later writes from that agent are refused with the reason.
    std::fs::write(mnt.join("after"), b"too late")?;
    assert_fails_with(&agent_sync(&cfg, &[]), &["disk-pf", "failed over"]);
    Ok(())
}

#[test]
fn planned_failover_can_leave_the_filesystems_frozen() -> anyhow::Result<()> {
    tidemark_tests::require_cmd("fsfreeze")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("fs.img"), 32 << 20)?;
    dev.mkfs_ext4()?;
    let mnt = site.dir.path().join("mnt");
    std::fs::create_dir_all(&mnt)?;
    run_ok(std::process::Command::new("mount").args([path(dev.path()), path(&mnt)]))?;
    // Thaw (harmless if not frozen) before unmounting, whatever happens.
    struct Thaw(std::path::PathBuf);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = std::process::Command::new("fsfreeze")
                .args(["-u"])
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let _thaw = Thaw(mnt.clone());
    let cfg = run_config(&site, "run-fz", &[(dev.path(), "disk-fz")], "")?;
    let agent = RunningAgent::start(&cfg, "run-fz")?;
    agent.bookmark(false)?;
    std::fs::write(mnt.join("last"), b"written just before the failover")?;
    run_ok(
        std::process::Command::new(tidemark_tests::workspace_bin("tidemark-agent")).args([
            "failover",
            "--config",
            path(&cfg),
            "--leave",
            "frozen",
        ]),
    )?;
    agent
        .daemon
        .as_ref()
        .expect("running")
        .wait_timeout(std::time::Duration::from_secs(30))?;
    // Thawing succeeds only on a frozen filesystem.
    run_ok(std::process::Command::new("fsfreeze").args(["-u", path(&mnt)]))?;
    Ok(())
}

#[test]
fn reverse_replication_after_failover_sends_only_the_changes() -> anyhow::Result<()> {
    let site = Site::start()?;
    // Machine A replicates to this receiver.
    let a = LoopDev::create(&site.dir.path().join("a.raw"), 32 << 20)?;
    fill_mixed(&a, 12)?;
    let cfg_a = site.agent("agent-a", site.addr, &[(a.path(), "disk-web")])?;
    let p = point_id(&agent_sync(&cfg_a, &[]))?;
    // Failover: roll back (nothing to undo: the image is at p) and commit.
    ok(receiver(
        &site,
        &["rollback", "--disk", "disk-web", "--point", &p.to_string()],
    )?)?;
    ok(receiver(&site, &["commit", "--disk", "disk-web"])?)?;
    // Machine B is the recovered image; it runs and changes 1 % of it.
    let b_img = site.dir.path().join("b.raw");
    run_ok(receiver_cmd().args([
        "export",
        "--config",
        path(&site.config()),
        "--disk",
        "disk-web",
        "--point",
        &p.to_string(),
        "--out",
        path(&b_img),
    ]))?;
    let b = LoopDev::create(&b_img, 32 << 20)?;
    let mut rng = SplitMix64::new(5);
    let changed = scatter_blocks(&b, &mut rng, (32 << 20) / 4096 / 100)?;

    // The original site: a receiver whose image directory holds A's old
    // disk (the same disk, so the same UUID: here the VMDK export of p).
    let orig = site.dir.path().join("orig");
    let port = free_port();
    run_ok(receiver_cmd().args([
        "init",
        "--dir",
        path(&orig),
        "--name",
        "original-site",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--image-dir",
        path(&orig.join("images")),
        "--retention-dir",
        path(&orig.join("retention")),
        "--retention-on-root-filesystem",
    ]))?;
    run_ok(receiver_cmd().args([
        "export",
        "--config",
        path(&site.config()),
        "--disk",
        "disk-web",
        "--point",
        &p.to_string(),
        "--format",
        "vmdk",
        "--out",
        path(&orig.join("images/web.vmdk")),
    ]))?;
    let mut serve = std::process::Command::new(tidemark_tests::workspace_bin("tidemark-receiver"));
    serve.args(["serve", "--config", path(&orig.join("receiver.toml"))]);
    let original = Daemon::spawn(serve)?;
    original.wait_for_log("listening on", std::time::Duration::from_secs(20))?;
    let proxy = CountingProxy::start(format!("127.0.0.1:{port}").parse()?)?;
    let agent_b = site.dir.path().join("agent-b");
    run_ok(receiver_cmd().args([
        "issue-cert",
        "--dir",
        path(&orig),
        "--name",
        "agent-b",
        "--receiver",
        &proxy.addr().to_string(),
        "--out",
        path(&agent_b),
    ]))?;
    let cfg_b = agent_b.join("agent.toml");
    let text = std::fs::read_to_string(&cfg_b)?;
    std::fs::write(
        &cfg_b,
        format!(
            "state_dir = \"{}\"\n{text}\n[[disk]]\ndevice = \"{}\"\nid = \"disk-web\"\n",
            agent_b.join("state").display(),
            b.path().display()
        ),
    )?;
    let back = point_id(&agent_sync(&cfg_b, &[]))?;
    ensure!(
        original.log().contains("found vmdk image") && original.log().contains("images/web"),
        "the original disk was not found by UUID: {}",
        original.log()
    );
    let sent = proxy.bytes_up();
    eprintln!("reverse replication: {sent} bytes sent for {changed} compressed bytes of changes");
    ensure!(
        sent as f64 <= changed as f64 * 1.10 + 16384.0,
        "{sent} bytes sent for {changed} bytes of changes"
    );
    let out = site.dir.path().join("back.raw");
    run_ok(receiver_cmd().args([
        "export",
        "--config",
        path(&orig.join("receiver.toml")),
        "--disk",
        "disk-web",
        "--point",
        &back.to_string(),
        "--out",
        path(&out),
    ]))?;
    ensure!(
        std::fs::read(&out)? == b.read_all()?,
        "the original site does not hold B's disk"
    );
    Ok(())
}
