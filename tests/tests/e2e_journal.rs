//! The retention journal under faults, on real loop devices: a retention
//! volume that fills up, and the receiver killed at random moments while it
//! receives, journals and records points. Nothing acknowledged may be lost and
//! every listed point must export exactly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use tidemark_tests::site::{agent_sync, assert_fails_with, path, point_id, run_ok, Site};
use tidemark_tests::{fill_mixed, scatter_blocks, LoopDev, SplitMix64};

/// Unmounts on drop. Lazily: the guard drops before the site, whose
/// receiver still has files open there; the filesystem (and then its
/// auto-clearing loop device) goes once the receiver is killed.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Replaces the site's retention directory with a small ext4 filesystem
/// of its own (the receiver is restarted on it).
fn small_retention_volume(site: &mut Site, mib: u64) -> anyhow::Result<(LoopDev, Mounted)> {
    site.receiver.kill();
    let retention = site.dir.path().join("retention");
    let vol = LoopDev::create(&site.dir.path().join("retention.img"), mib << 20)?;
    vol.mkfs_ext4()?;
    for entry in std::fs::read_dir(&retention)? {
        let p = entry?.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    run_ok(Command::new("mount").args([path(vol.path()), path(&retention)]))?;
    let mounted = Mounted(retention);
    site.restart_receiver()?;
    Ok((vol, mounted))
}

#[test]
fn a_full_retention_volume_stops_acknowledging_and_recovers_when_space_returns(
) -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let (_vol, mounted) = small_retention_volume(&mut site, 16)?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 32 << 20)?;
    fill_mixed(&dev, 21)?;
    let cfg = site.agent("agent-full", site.addr, &[(dev.path(), "disk-full")])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p1 = dev.read_all()?;
    // Leave about 1 MiB free, then overwrite 12 MiB: the undo journal
    // needs the old 12 MiB (random, incompressible) and cannot have it.
    let filler = mounted.0.join("filler");
    let free = nix::sys::statvfs::statvfs(&mounted.0)?;
    let avail = free.blocks_available() as u64 * free.fragment_size() as u64;
    run_ok(Command::new("fallocate").args([
        "-l",
        &avail.saturating_sub(1 << 20).to_string(),
        path(&filler),
    ]))?;
    let mut rng = SplitMix64::new(8);
    let mut data = vec![0u8; 12 << 20];
    rng.fill_bytes(&mut data);
    dev.write_at(0, &data)?;
    let out = agent_sync(&cfg, &["--give-up-after", "3"]);
    assert_fails_with(&out, &["volume is full", "free space"]);
    ensure!(
        site.receiver.log().contains("volume is full"),
        "the receiver must report it: {}",
        site.receiver.log()
    );
    // What was acknowledged before is intact.
    ensure!(
        site.export("disk-full", &p1.to_string())? == at_p1,
        "point {p1} was damaged"
    );
    // Space returns: the same sync goes through and nothing is missing.
    std::fs::remove_file(&filler)?;
    let p2 = point_id(&agent_sync(&cfg, &[]))?;
    ensure!(
        site.export("disk-full", &p2.to_string())? == dev.read_all()?,
        "no convergence"
    );
    ensure!(
        site.export("disk-full", &p1.to_string())? == at_p1,
        "point {p1} lost"
    );
    Ok(())
}

/// Kills the receiver (SIGKILL) after a random delay while `work` runs,
/// then restarts it.
fn kill_during(
    site: &mut Site,
    rng: &mut SplitMix64,
    work: impl FnOnce() -> std::process::Output,
) -> anyhow::Result<std::process::Output> {
    let pid = site.receiver.pid();
    let delay = Duration::from_millis(rng.below(150));
    let killer = std::thread::spawn(move || {
        std::thread::sleep(delay);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let out = work();
    killer
        .join()
        .map_err(|_| anyhow::anyhow!("killer thread panicked"))?;
    site.restart_receiver()?;
    Ok(out)
}

#[test]
fn receiver_killed_at_random_moments_loses_nothing_acknowledged() -> anyhow::Result<()> {
    const TRIALS: usize = 30;
    let mut site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    fill_mixed(&dev, 5)?;
    let cfg = site.agent("agent-k", site.addr, &[(dev.path(), "disk-k")])?;
    point_id(&agent_sync(&cfg, &[]))?;
    let mut rng = SplitMix64::new(99);
    // Every point the receiver acknowledged, with the device as it was.
    let mut acknowledged: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut interrupted = 0;
    for trial in 0..TRIALS {
        scatter_blocks(&dev, &mut rng, 64)?;
        let at = dev.read_all()?;
        let out = kill_during(&mut site, &mut rng, || {
            agent_sync(&cfg, &["--give-up-after", "1"])
        })?;
        if out.status.success() {
            // Printed only once the point was durable: it must survive.
            let id: u64 = String::from_utf8(out.stdout.clone())?.trim().parse()?;
            acknowledged.push((id, at));
        } else {
            interrupted += 1;
        }
        // After the restart the replica converges to the device.
        let id = point_id(&agent_sync(&cfg, &[])).with_context(|| format!("trial {trial}"))?;
        acknowledged.push((id, dev.read_all()?));
    }
    // Every acknowledged point still exports exactly, and the image passes
    // qemu-img's check.
    for (id, want) in &acknowledged {
        ensure!(
            &site.export("disk-k", &id.to_string())? == want,
            "point {id} differs"
        );
    }
    let image: &Path = &site.image("disk-k");
    let descriptor = image.with_file_name("disk-k.vmdk");
    run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(&descriptor)]))?;
    eprintln!(
        "{TRIALS} trials, {interrupted} syncs cut by the kill, {} acknowledged points checked",
        acknowledged.len(),
    );
    Ok(())
}
