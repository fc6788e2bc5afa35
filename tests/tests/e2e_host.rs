//! The protected host's disks changing under a running agent: grown,
//! shrunk, detached and re-attached (issue 8). Real loop devices over
//! sparse files: `truncate` + `losetup -c` resizes one, `losetup -d` and
//! `losetup DEV FILE` re-attach it under the same name with a new diskseq.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{path, run_ok, Site};
use tidemark_tests::{LoopDev, SplitMix64};

fn random_block(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]));
    v
}

/// `/sys/block/loopN`.
fn sysfs(dev: &Path) -> anyhow::Result<std::path::PathBuf> {
    let name = dev.file_name().context("device name")?;
    Ok(Path::new("/sys/block").join(name))
}

fn diskseq(dev: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::read_to_string(sysfs(dev)?.join("diskseq"))?
        .trim()
        .parse()?)
}

/// Grows the disk under `run` and checks the grown replica byte for byte,
/// and that the point before the growth still exports at its old size.
fn grow_while_running(format: &str) -> anyhow::Result<()> {
    let site = Site::start_with_config(&format!("image_format = \"{format}\""))?;
    let old = 24u64 << 20;
    let new = 40u64 << 20;
    let mut dev = LoopDev::create(&site.dir.path().join("grow.img"), old)?;
    let mut rng = SplitMix64::new(81);
    dev.write_at(0, &random_block(&mut rng, 1 << 20))?;
    dev.write_at(old - (1 << 20), &random_block(&mut rng, 1 << 20))?;
    let name = format!("grow-{format}");
    let cfg = run_config(&site, &name, &[(dev.path(), "disk-grow")], "")?;
    let agent = RunningAgent::start(&cfg, &name)?;
    let p1 = agent.bookmark(false)?;
    let before = dev.read_all()?;
    ensure!(site.export("disk-grow", &p1.to_string())? == before);

    dev.resize(new)?;
    // Straddling the old end and in the new range only.
    dev.write_at(old - (64 << 10), &random_block(&mut rng, 128 << 10))?;
    dev.write_at(new - (3 << 20), &random_block(&mut rng, 2 << 20))?;
    agent.wait_for_log("grew from", Duration::from_secs(20))?;
    let p2 = agent.bookmark(false)?;
    let after = dev.read_all()?;
    ensure!(after.len() as u64 == new, "read {} bytes", after.len());
    let exported = site.export("disk-grow", &p2.to_string())?;
    ensure!(
        exported.len() == after.len(),
        "{format}: point {p2} exports {} bytes, the grown disk has {}",
        exported.len(),
        after.len()
    );
    ensure!(
        exported == after,
        "{format}: point {p2} differs from the grown disk"
    );
    ensure!(
        site.export("disk-grow", &p1.to_string())? == before,
        "{format}: point {p1} from before the growth no longer exports as it was"
    );
    let log = agent.log();
    ensure!(
        log.matches("grew from").count() == 1,
        "growth logged more than once: {log}"
    );
    Ok(())
}

#[test]
fn a_disk_grown_under_run_replicates_at_its_new_size_flat_vmdk() -> anyhow::Result<()> {
    grow_while_running("vmdk")
}

#[test]
fn a_disk_grown_under_run_replicates_at_its_new_size_fixed_vhd() -> anyhow::Result<()> {
    grow_while_running("vhd-fixed")
}

#[test]
fn a_disk_grown_under_run_replicates_at_its_new_size_raw() -> anyhow::Result<()> {
    grow_while_running("raw")
}

#[test]
fn a_disk_reattached_under_run_is_resynced_and_converges() -> anyhow::Result<()> {
    let site = Site::start()?;
    let size = 32u64 << 20;
    let dev = LoopDev::create(&site.dir.path().join("reattach.img"), size)?;
    let mut rng = SplitMix64::new(82);
    dev.write_at(0, &random_block(&mut rng, 2 << 20))?;
    let cfg = run_config(&site, "reattach", &[(dev.path(), "disk-re")], "")?;
    let agent = RunningAgent::start(&cfg, "reattach")?;
    agent.bookmark(false)?;
    let seq_before = diskseq(dev.path())?;

    run_ok(Command::new("losetup").args(["-d", path(dev.path())]))?;
    // Written while detached: no tracepoint sees this, only a resync can.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev.backing())?;
    std::os::unix::fs::FileExt::write_all_at(&f, &random_block(&mut rng, 1 << 20), 8 << 20)?;
    f.sync_all()?;
    drop(f);
    // Long enough for the agent to see the device gone.
    std::thread::sleep(Duration::from_millis(600));
    run_ok(Command::new("losetup").args([
        "--direct-io=off",
        path(dev.path()),
        path(dev.backing()),
    ]))?;
    ensure!(diskseq(dev.path())? != seq_before, "diskseq did not change");
    dev.write_at(20 << 20, &random_block(&mut rng, 64 << 10))?;

    agent.wait_for_log("diskseq changed", Duration::from_secs(20))?;
    agent.wait_for_log("resync complete", Duration::from_secs(40))?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-re", &id.to_string())? == dev.read_all()?,
        "point {id} after the re-attach differs from the device: {}",
        agent.log()
    );
    let status = agent.status_json()?;
    ensure!(status["disks"][0]["state"] == "protected", "{status}");
    Ok(())
}

#[test]
fn a_shrunk_disk_is_refused_and_its_replica_kept() -> anyhow::Result<()> {
    let site = Site::start()?;
    let old = 32u64 << 20;
    let mut dev = LoopDev::create(&site.dir.path().join("shrink.img"), old)?;
    let mut rng = SplitMix64::new(83);
    dev.write_at(old - (2 << 20), &random_block(&mut rng, 2 << 20))?;
    let cfg = run_config(&site, "shrink", &[(dev.path(), "disk-sh")], "")?;
    let agent = RunningAgent::start(&cfg, "shrink")?;
    let p1 = agent.bookmark(false)?;
    let before = dev.read_all()?;

    dev.resize(16 << 20)?;
    agent.wait_for_log("shrank from", Duration::from_secs(20))?;
    let status = agent.status_json()?;
    let disk = &status["disks"][0];
    ensure!(disk["state"] == "size-refused", "{status}");
    let reason = disk["resync_reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("shrank") && reason.contains("never truncated"),
        "{status}"
    );
    // No point can cover a disk that is not replicated.
    let out = Command::new(tidemark_tests::workspace_bin("tidemark-agent"))
        .args(["bookmark", "--config", path(&cfg)])
        .output()?;
    ensure!(
        !out.status.success(),
        "a bookmark succeeded on a refused disk"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("disk-sh"),
        "bookmark error does not name the disk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        site.export("disk-sh", &p1.to_string())? == before,
        "the replica changed after the disk shrank"
    );
    ensure!(
        site.export("disk-sh", "latest")?.len() as u64 == old,
        "the replica was truncated"
    );
    // Writes to the refused disk are tracked for the resync to come, not
    // shipped. Their backlog must not keep the loop going round without a
    // pause: it did, at a whole core, until the backlog counted only
    // disks a round reads from.
    dev.write_at(0, &random_block(&mut rng, 1 << 20))?;
    std::thread::sleep(Duration::from_millis(1500));
    let pid = agent.pid()?;
    let (cpu_before, wall) = (cpu_secs(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_secs(pid)? - cpu_before;
    ensure!(
        used < 0.5 * wall.elapsed().as_secs_f64(),
        "the agent used {used:.2} s of CPU in {:.1} s with only a refused disk dirty: {}",
        wall.elapsed().as_secs_f64(),
        agent.log()
    );
    ensure!(
        agent.status_json()?["disks"][0]["state"] == "size-refused",
        "the disk left size-refused"
    );
    Ok(())
}

/// CPU time (user + system) a process has used so far, from /proc.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("no CLK_TCK")?;
    Ok(ticks as f64 / hz as f64)
}
