//! The retention journal under faults, on real loop devices: a retention
//! volume that fills up, and the receiver killed at random moments while it
//! receives, journals and records points. Nothing acknowledged may be lost and
//! every listed point must export exactly. Also what it keeps: retention,
//! thinning, and each byte's pre-image journaled once per point.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use tidemark_common::proto::messages::Extent;
use tidemark_common::proto::{Message, PointKind, SumKind};
use tidemark_tests::metrics::{get, parse, scrape};
use tidemark_tests::raw;
use tidemark_tests::site::{
    agent_sync, assert_fails_with, error_line, path, point_id, receiver_cmd, run_ok, Site,
};
use tidemark_tests::{fill_mixed, free_port, scatter_blocks, LoopDev, SplitMix64};

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

#[test]
fn a_full_image_volume_stops_acknowledging_and_recovers_when_space_returns() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    // The image directory on a small ext4 volume of its own.
    site.receiver.kill();
    let images = site.dir.path().join("images");
    let vol = LoopDev::create(&site.dir.path().join("images.img"), 48 << 20)?;
    vol.mkfs_ext4()?;
    run_ok(Command::new("mount").args([path(vol.path()), path(&images)]))?;
    let mounted = Mounted(images.clone());
    site.restart_receiver()?;
    let filler = mounted.0.join("filler");
    let free = nix::sys::statvfs::statvfs(&mounted.0)?;
    let avail = free.blocks_available() as u64 * free.fragment_size() as u64;
    run_ok(Command::new("fallocate").args([
        "-l",
        &avail.saturating_sub(6 << 20).to_string(),
        path(&filler),
    ]))?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    let mut rng = SplitMix64::new(14);
    random_write(&dev, &mut rng, 0, 16 << 20)?;
    let cfg = site.agent("agent-img", site.addr, &[(dev.path(), "disk-img")])?;
    let out = agent_sync(&cfg, &["--give-up-after", "3"]);
    assert_fails_with(&out, &["volume is full", "free space"]);
    std::fs::remove_file(&filler)?;
    let p = point_id(&agent_sync(&cfg, &[]))?;
    ensure!(
        site.export("disk-img", &p.to_string())? == dev.read_all()?,
        "no convergence once space returned"
    );
    Ok(())
}

/// A storage fault, injected with `tests/faultfs`: while the flag file
/// exists, syncs (and with [`Ops::All`] writes) of the receiver's files
/// whose path contains a given part fail with EIO, as a failing disk's
/// would.
struct Eio {
    flag: PathBuf,
}

#[derive(Clone, Copy)]
enum Ops {
    /// Writes and syncs fail: nothing reaches the file.
    All,
    /// Only syncs fail: the writes land in the page cache, and whether
    /// they reach the disk is unknown (a disk failing at writeback).
    Sync,
}

impl Eio {
    /// Restarts the receiver with the fault armed (not yet active).
    fn arm(site: &mut Site, path_part: &str, ops: Ops) -> anyhow::Result<Eio> {
        let flag = site.dir.path().join("eio-now");
        let lib = tidemark_tests::faultfs_library();
        site.restart_receiver_with_env(&[
            ("LD_PRELOAD", path(&lib)),
            ("TIDEMARK_FAULT_EIO_PATHS", path_part),
            ("TIDEMARK_FAULT_EIO_WHILE", path(&flag)),
            (
                "TIDEMARK_FAULT_EIO_OPS",
                match ops {
                    Ops::All => "all",
                    Ops::Sync => "sync",
                },
            ),
        ])?;
        Ok(Eio { flag })
    }

    fn start(&self) -> anyhow::Result<()> {
        std::fs::write(&self.flag, b"")?;
        Ok(())
    }

    fn clear(&self) -> anyhow::Result<()> {
        std::fs::remove_file(&self.flag)?;
        Ok(())
    }
}

/// What an EIO trial checks while the fault is on, and after it cleared.
struct EioCase<'a> {
    disk: &'a str,
    /// Part of the failing files' paths.
    path_part: String,
    ops: Ops,
    /// The file (or directory of files) the receiver's log must name.
    file: PathBuf,
    /// Words the agent's error line must hold.
    words: Vec<String>,
}

/// One EIO trial: a point, then the files of `case` fail while new data
/// arrives. The agent gives up with a one-line error holding the case's
/// words, the receiver logs it naming the file, keeps running and keeps
/// the earlier point; once the fault clears the same sync converges and
/// the earlier point still exports exactly. `during` runs while the
/// fault is on, after the agent gave up. Returns the two points.
fn eio_trial(
    site: &mut Site,
    case: &EioCase,
    during: impl FnOnce(&Site) -> anyhow::Result<()>,
) -> anyhow::Result<(u64, u64)> {
    let disk = case.disk;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    fill_mixed(&dev, 31)?;
    let cfg = site.agent("agent-eio", site.addr, &[(dev.path(), disk)])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p1 = dev.read_all()?;
    let eio = Eio::arm(site, &case.path_part, case.ops)?;
    eio.start()?;
    // Overwrites (they need pre-images) and writes into zeros.
    let mut rng = SplitMix64::new(32);
    random_write(&dev, &mut rng, 2 << 20, 3 << 20)?;
    scatter_blocks(&dev, &mut rng, 64)?;
    let out = agent_sync(&cfg, &["--give-up-after", "3"]);
    let words: Vec<&str> = case.words.iter().map(String::as_str).collect();
    assert_fails_with(&out, &words);
    let log = site.receiver.log();
    let file = path(&case.file);
    ensure!(
        log.contains("I/O error") && log.contains(file),
        "the receiver must report the I/O error naming {file}: {log}"
    );
    ensure!(
        site.receiver.try_wait()?.is_none() && !log.contains("panicked"),
        "the receiver must keep running: {log}"
    );
    ensure!(
        site.export(disk, &p1.to_string())? == at_p1,
        "point {p1} was damaged while the file failed"
    );
    during(site)?;
    eio.clear()?;
    let p2 = point_id(&agent_sync(&cfg, &[]))?;
    ensure!(
        site.export(disk, &p2.to_string())? == dev.read_all()?,
        "no convergence once the fault cleared"
    );
    ensure!(
        site.export(disk, &p1.to_string())? == at_p1,
        "point {p1} lost"
    );
    eprintln!("agent, while the fault was on: {}", error_line(&out));
    Ok((p1, p2))
}

/// An EIO trial on the image file of a disk replicated as `format`, whose
/// file is `file`; `qemu_format` checks the image after recovery.
fn eio_from_the_image(
    format: &str,
    file: &str,
    ops: Ops,
    qemu_format: Option<&str>,
) -> anyhow::Result<()> {
    let mut site = Site::start_with_config(&format!("image_format = \"{format}\""))?;
    let disk = "disk-eio";
    let image = site.dir.path().join("images").join(file);
    let case = EioCase {
        disk,
        path_part: format!("/images/{file}"),
        ops,
        file: image.clone(),
        words: vec![
            "I/O error".into(),
            format!("image {}", image.display()),
            "check the disk".into(),
        ],
    };
    eio_trial(&mut site, &case, |_| Ok(()))?;
    if let Some(fmt) = qemu_format {
        // A flat VMDK is checked through its descriptor.
        let shown = match file.strip_suffix("-flat.vmdk") {
            Some(stem) => image.with_file_name(format!("{stem}.vmdk")),
            None => image,
        };
        run_ok(Command::new("qemu-img").args(["check", "-f", fmt, path(&shown)]))?;
    }
    Ok(())
}

#[test]
fn eio_from_a_flat_vmdk_image_stops_acknowledging_and_recovers_when_it_clears() -> anyhow::Result<()>
{
    eio_from_the_image("vmdk", "disk-eio-flat.vmdk", Ops::All, Some("vmdk"))
}

#[test]
fn eio_from_flat_vmdk_image_syncs_only_stops_acknowledging_and_recovers() -> anyhow::Result<()> {
    eio_from_the_image("vmdk", "disk-eio-flat.vmdk", Ops::Sync, Some("vmdk"))
}

#[test]
fn eio_from_a_sparse_vmdk_image_stops_acknowledging_and_recovers_when_it_clears(
) -> anyhow::Result<()> {
    eio_from_the_image("vmdk-sparse", "disk-eio.vmdk", Ops::All, Some("vmdk"))
}

#[test]
fn eio_from_a_dynamic_vhd_image_stops_acknowledging_and_recovers_when_it_clears(
) -> anyhow::Result<()> {
    // qemu-img has no check for VHD ("vpc"); the exports compare it.
    eio_from_the_image("vhd", "disk-eio.vhd", Ops::All, None)
}

fn undo_case(site: &Site, disk: &'static str, ops: Ops) -> EioCase<'static> {
    let dir = site.dir.path().join("retention/undo").join(disk);
    EioCase {
        disk,
        path_part: format!("/undo/{disk}/"),
        ops,
        words: vec![
            "I/O error".into(),
            format!("undo segment {}", dir.display()),
            "check the disk".into(),
        ],
        file: dir,
    }
}

#[test]
fn eio_from_the_undo_journal_stops_acknowledging_and_recovers_when_it_clears() -> anyhow::Result<()>
{
    let mut site = Site::start()?;
    let case = undo_case(&site, "disk-eio-undo", Ops::All);
    eio_trial(&mut site, &case, |_| Ok(()))?;
    let descriptor = site
        .image(case.disk)
        .with_file_name(format!("{}.vmdk", case.disk));
    run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(&descriptor)]))?;
    Ok(())
}

#[test]
fn eio_from_undo_journal_syncs_cuts_the_segment_back_to_what_was_durable() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let case = undo_case(&site, "disk-eio-usync", Ops::Sync);
    let dir = case.file.clone();
    eio_trial(&mut site, &case, |_| {
        // The records appended since the last good sync landed in the page
        // cache, but a kernel that failed their writeback may drop them:
        // nothing may be appended behind them. None was ever durable here
        // (the segment is the new point's), so the segment must be empty.
        let mut sizes = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            sizes.push((e.file_name(), e.metadata()?.len()));
        }
        ensure!(
            sizes.iter().all(|(_, len)| *len == 0),
            "undo records of unknown durability were kept: {sizes:?}"
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn eio_from_point_log_syncs_records_each_point_once() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let case = EioCase {
        disk: "disk-eio-points",
        path_part: "/retention/points.jsonl".into(),
        ops: Ops::Sync,
        file: site.dir.path().join("retention/points.jsonl"),
        words: vec![
            "I/O error".into(),
            "point log".into(),
            "check the disk".into(),
        ],
    };
    let (p1, p2) = eio_trial(&mut site, &case, |site| {
        // A point whose line could not be made durable is not one.
        let listed = site.listed_point_ids()?;
        ensure!(listed.len() == 1, "points listed while failing: {listed:?}");
        Ok(())
    })?;
    let listed = site.listed_point_ids()?;
    ensure!(listed == vec![p1, p2], "points listed: {listed:?}");
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

/// SIGKILLs the receiver at random moments of `trials` syncs, restarting it
/// each time, and checks every point it acknowledged: each exports exactly
/// the device as it was, or (only when `pruning`) is refused as pruned.
/// Returns how many were refused.
fn kill_trials(extra_config: &str, trials: usize, pruning: bool) -> anyhow::Result<usize> {
    let mut site = Site::start_with_config(extra_config)?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    fill_mixed(&dev, 5)?;
    let cfg = site.agent("agent-k", site.addr, &[(dev.path(), "disk-k")])?;
    point_id(&agent_sync(&cfg, &[]))?;
    let mut rng = SplitMix64::new(tidemark_tests::seed(99));
    // Every point the receiver acknowledged, with the device as it was.
    let mut acknowledged: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut interrupted = 0;
    for trial in 0..trials {
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
        let now = dev.read_all()?;
        if pruning {
            // The window is shorter than a trial: check while it is in it.
            ensure!(
                site.export("disk-k", &id.to_string())? == now,
                "trial {trial}: point {id} differs"
            );
        }
        acknowledged.push((id, now));
    }
    let mut refused = 0;
    let newest = acknowledged.iter().map(|(id, _)| *id).max().unwrap_or(0);
    for (id, want) in &acknowledged {
        match site.export("disk-k", &id.to_string()) {
            Ok(got) => ensure!(&got == want, "point {id} differs"),
            Err(e) if pruning && *id != newest && format!("{e:#}").contains("pruned") => {
                refused += 1
            }
            Err(e) => return Err(e.context(format!("point {id}"))),
        }
    }
    let image: &Path = &site.image("disk-k");
    let descriptor = image.with_file_name("disk-k.vmdk");
    run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(&descriptor)]))?;
    eprintln!(
        "{trials} trials, {interrupted} syncs cut by the kill, {} acknowledged points checked, {refused} refused as pruned",
        acknowledged.len(),
    );
    Ok(refused)
}

#[test]
fn receiver_killed_at_random_moments_loses_nothing_acknowledged() -> anyhow::Result<()> {
    kill_trials("", tidemark_tests::trials(30), false)?;
    Ok(())
}

#[test]
fn receiver_killed_while_it_prunes_keeps_every_point_in_the_window() -> anyhow::Result<()> {
    // 0.0002 h = 0.72 s: nearly every point prunes the history before it,
    // so kills land in pruning too.
    let refused = kill_trials("retention_hours = 0.0002", tidemark_tests::trials(20), true)?;
    ensure!(refused > 0, "nothing was pruned: the test did not prune");
    Ok(())
}

/// Bytes the disk's undo segments take on the retention volume.
fn undo_bytes(site: &Site, disk: &str) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = site.dir.path().join("retention/undo").join(disk);
    let mut total = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        total += e?.metadata()?.blocks() * 512;
    }
    Ok(total)
}

fn random_write(dev: &LoopDev, rng: &mut SplitMix64, at: u64, len: usize) -> anyhow::Result<()> {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    dev.write_at(at, &data)?;
    Ok(())
}

fn export_fails(site: &Site, disk: &str, point: u64) -> std::process::Output {
    receiver_cmd()
        .args(["export", "--config", path(&site.config()), "--disk", disk])
        .args(["--point", &point.to_string(), "--format", "raw", "--out"])
        .arg(site.dir.path().join("refused.raw"))
        .output()
        .expect("run tidemark-receiver export")
}

#[test]
fn a_short_window_prunes_old_points_and_reclaims_their_space() -> anyhow::Result<()> {
    // 0.0005 h = 1.8 s.
    let site = Site::start_with_config("retention_hours = 0.0005")?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    let mut rng = SplitMix64::new(4);
    random_write(&dev, &mut rng, 0, 16 << 20)?;
    let cfg = site.agent("agent-w", site.addr, &[(dev.path(), "disk-w")])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    // Random over random: 6 MiB of incompressible pre-images.
    random_write(&dev, &mut rng, 1 << 20, 6 << 20)?;
    let p2 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p2 = dev.read_all()?;
    let before = undo_bytes(&site, "disk-w")?;
    ensure!(before >= 6 << 20, "journal holds {before} bytes");
    ensure!(site.export("disk-w", &p1.to_string())? != at_p2);

    std::thread::sleep(Duration::from_millis(2500));
    random_write(&dev, &mut rng, 12 << 20, 64 << 10)?;
    let p3 = point_id(&agent_sync(&cfg, &[]))?;
    let after = undo_bytes(&site, "disk-w")?;
    ensure!(
        after < 1 << 20,
        "space not reclaimed: {before} bytes before, {after} after"
    );
    let listed = site.listed_point_ids()?;
    ensure!(
        !listed.contains(&p1) && !listed.contains(&p2) && listed.contains(&p3),
        "listed {listed:?}"
    );
    assert_fails_with(&export_fails(&site, "disk-w", p1), &["pruned"]);
    ensure!(site.export("disk-w", &p3.to_string())? == dev.read_all()?);
    ensure!(site.receiver.log().contains("pruned"));
    Ok(())
}

#[test]
fn the_size_cap_prunes_the_oldest_history_first_with_a_warning() -> anyhow::Result<()> {
    // 5 MiB: two 3 MiB generations of history do not fit.
    let site = Site::start_with_config("retention_max_gib = 0.0048828125")?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    let mut rng = SplitMix64::new(6);
    random_write(&dev, &mut rng, 0, 16 << 20)?;
    let cfg = site.agent("agent-c", site.addr, &[(dev.path(), "disk-c")])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    random_write(&dev, &mut rng, 0, 3 << 20)?;
    let p2 = point_id(&agent_sync(&cfg, &[]))?;
    let at_p2 = dev.read_all()?;
    ensure!(
        !site.receiver.log().contains("retention_max_gib"),
        "3 MiB of history is under the cap"
    );
    random_write(&dev, &mut rng, 8 << 20, 3 << 20)?;
    let p3 = point_id(&agent_sync(&cfg, &[]))?;
    let log = site.receiver.log();
    ensure!(
        log.contains("retention_max_gib") && log.contains(&format!("before {p2}")),
        "no warning naming the cap: {log}"
    );
    let bytes = undo_bytes(&site, "disk-c")?;
    ensure!(bytes <= 5 << 20, "journal at {bytes} bytes");
    assert_fails_with(&export_fails(&site, "disk-c", p1), &["pruned"]);
    ensure!(site.export("disk-c", &p2.to_string())? == at_p2);
    ensure!(site.export("disk-c", &p3.to_string())? == dev.read_all()?);
    Ok(())
}

#[test]
fn retention_volumes_that_break_the_rules_are_refused_at_start() -> anyhow::Result<()> {
    let site = Site::start()?;
    let serve = |extra: &str| -> anyhow::Result<std::process::Output> {
        let cfg = site.dir.path().join("rules.toml");
        let text = std::fs::read_to_string(site.config())?;
        let kept: String = text
            .lines()
            .filter(|l| {
                !l.starts_with("retention_dir")
                    && !l.starts_with("retention_on_root_filesystem")
                    && !l.starts_with("listen")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let port = tidemark_tests::free_port();
        std::fs::write(
            &cfg,
            format!("{extra}\nlisten = \"127.0.0.1:{port}\"\n{kept}"),
        )?;
        let mut child = receiver_cmd()
            .args(["serve", "--config", path(&cfg)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > until {
                let _ = child.kill();
                anyhow::bail!("serve started with {extra:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child.wait_with_output()?)
    };
    // The root filesystem: a directory right under /.
    let on_root = PathBuf::from(format!("/tidemark-retention-test-{}", std::process::id()));
    std::fs::create_dir_all(&on_root)?;
    let out = serve(&format!("retention_dir = \"{}\"", on_root.display()));
    let _ = std::fs::remove_dir_all(&on_root);
    assert_fails_with(&out?, &["root filesystem", "retention_on_root_filesystem"]);

    // Zero capacity: ramfs reports no blocks at all. (FAT, also refused,
    // cannot be mounted here: this kernel has no vfat.)
    let mnt = site.dir.path().join("ramfs");
    std::fs::create_dir_all(&mnt)?;
    run_ok(Command::new("mount").args(["-t", "ramfs", "none", path(&mnt)]))?;
    let _m = Mounted(mnt.clone());
    assert_fails_with(
        &serve(&format!(
            "retention_dir = \"{}\"\nretention_on_root_filesystem = true",
            mnt.display()
        ))?,
        &["zero capacity"],
    );

    // The image directory itself.
    let images = site.dir.path().join("images");
    assert_fails_with(
        &serve(&format!(
            "retention_dir = \"{}\"\nretention_on_root_filesystem = true",
            images.display()
        ))?,
        &["retention_dir", "image_dir"],
    );
    Ok(())
}

#[test]
fn thinning_keeps_one_older_point_per_slot_and_every_kept_point_exports() -> anyhow::Result<()> {
    // Every point is "older" at once; one kept per 2 s slot.
    let site = Site::start_with_config(
        "thinning = { keep_all_hours = 0, keep_one_per_minutes = 0.0333333 }",
    )?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    let mut rng = SplitMix64::new(12);
    random_write(&dev, &mut rng, 0, 16 << 20)?;
    let cfg = site.agent("agent-t", site.addr, &[(dev.path(), "disk-t")])?;
    let mut states = vec![(point_id(&agent_sync(&cfg, &[]))?, dev.read_all()?)];
    const ROUNDS: usize = 10;
    for _ in 0..ROUNDS {
        // The same 2 MiB again and again: folded segments overlap.
        random_write(&dev, &mut rng, 4 << 20, 2 << 20)?;
        std::thread::sleep(Duration::from_millis(400));
        states.push((point_id(&agent_sync(&cfg, &[]))?, dev.read_all()?));
    }
    let listed = site.listed_point_ids()?;
    let (first, last) = (states[0].0, states[ROUNDS].0);
    ensure!(
        listed.contains(&first) && listed.contains(&last),
        "oldest and newest must stay: {listed:?}"
    );
    let mut thinned = 0;
    for (id, want) in &states {
        if listed.contains(id) {
            ensure!(
                &site.export("disk-t", &id.to_string())? == want,
                "point {id} differs"
            );
        } else {
            assert_fails_with(&export_fails(&site, "disk-t", *id), &["thinned"]);
            thinned += 1;
        }
    }
    ensure!(
        thinned >= 3,
        "only {thinned} of {} points thinned",
        ROUNDS + 1
    );
    // Without thinning every round would keep its 2 MiB of pre-images.
    let bytes = undo_bytes(&site, "disk-t")?;
    let unthinned = (ROUNDS as u64) * (2 << 20);
    ensure!(
        bytes < unthinned * 3 / 4,
        "journal {bytes} bytes, {unthinned} without thinning"
    );
    ensure!(site.receiver.log().contains("thinning: forgot"));
    eprintln!(
        "{} points, {thinned} thinned, journal {bytes} bytes ({unthinned} without thinning)",
        ROUNDS + 1
    );
    Ok(())
}

/// Sends `msgs` without waiting for answers, then reads until the last
/// one is answered; returns the point id when the last is a point.
async fn send_all(s: &mut raw::Stream, msgs: &[Message]) -> anyhow::Result<Option<u64>> {
    for m in msgs {
        raw::send(s, m).await?;
    }
    let (last_seq, is_point) = match msgs.last() {
        Some(Message::Point { seq, .. }) => (*seq, true),
        Some(Message::Extent(e)) => (e.seq, false),
        Some(Message::Zero { seq, .. }) => (*seq, false),
        other => anyhow::bail!("send_all cannot wait for {other:?}"),
    };
    loop {
        match raw::recv(s).await? {
            Some(Message::PointRecorded { seq, point_id }) if is_point && seq == last_seq => {
                return Ok(Some(point_id))
            }
            Some(Message::Ack { seq }) if !is_point && seq >= last_seq => return Ok(None),
            Some(Message::Ack { .. } | Message::Heartbeat { .. }) => {}
            other => anyhow::bail!("waiting for seq {last_seq}: {other:?}"),
        }
    }
}

/// Sends `msgs` and then a point with sequence number `seq`; returns the
/// point's id once it is recorded.
async fn send_with_point(
    s: &mut raw::Stream,
    mut msgs: Vec<Message>,
    seq: u64,
) -> anyhow::Result<u64> {
    msgs.push(Message::Point {
        seq,
        kind: PointKind::CrashConsistent,
        name: String::new(),
        agent_time_ms: 1,
    });
    send_all(s, &msgs).await?.context("no point id")
}

/// Every point in `states` exports exactly the bytes kept with it.
fn exports_match(site: &Site, disk: &str, states: &[(u64, Vec<u8>)]) -> anyhow::Result<()> {
    for (id, want) in states {
        let got = site.export(disk, &id.to_string())?;
        ensure!(
            got.len() == want.len(),
            "point {id} exports {} bytes",
            got.len()
        );
        if let Some(at) = got.iter().zip(want).position(|(g, w)| g != w) {
            anyhow::bail!("point {id} exports other bytes, first at byte {at}");
        }
    }
    Ok(())
}

#[test]
fn rewrites_between_two_points_journal_each_byte_once_and_every_point_exports() -> anyhow::Result<()>
{
    const MIB: u64 = 1 << 20;
    const DISK: &str = "disk-once";
    let rx_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let site = Site::start_with_config(&format!("metrics_listen = \"{rx_metrics}\""))?;
    let agent_dir = site.agent_dir("agent-once")?;
    let mut rng = SplitMix64::new(21);
    let mut random = |len: u64| {
        let mut v = vec![0u8; len as usize];
        rng.fill_bytes(&mut v);
        v
    };
    let mut disk = random(16 * MIB);
    // (offset, data or None for zeros), as the scripted agent sends them.
    let rounds: Vec<Vec<(u64, Option<Vec<u8>>)>> = vec![
        // Before the first point: nothing to journal.
        (0..4)
            .map(|i| {
                (
                    i * 4 * MIB,
                    Some(disk[(i * 4 * MIB) as usize..][..(4 * MIB) as usize].to_vec()),
                )
            })
            .collect(),
        // Between points 1 and 2: 4 MiB, then 4 MiB of which 2 are new,
        // then the first 4 MiB again, a piece inside them and zeros over
        // part of them: 6 MiB of pre-images, not 12.
        vec![
            (4 * MIB, Some(random(4 * MIB))),
            (6 * MIB, Some(random(4 * MIB))),
            (4 * MIB, Some(random(4 * MIB))),
            (5 * MIB + 4096, Some(random(8192))),
            (7 * MIB, None),
        ],
        // After point 2 the same bytes have a new pre-image to keep.
        vec![(4 * MIB, Some(random(4 * MIB)))],
    ];
    let zeros_len = 64 << 10;
    let mut states = Vec::new();
    raw::block_on(async {
        let mut s = raw::hello(site.addr, &agent_dir, "agent-once").await?;
        let handle = raw::register(&mut s, DISK, 16 * MIB).await?;
        let mut seq = 0;
        for round in &rounds {
            let mut msgs = Vec::new();
            for (offset, data) in round {
                seq += 1;
                msgs.push(match data {
                    Some(d) => {
                        disk[*offset as usize..][..d.len()].copy_from_slice(d);
                        Message::Extent(Extent::pack(
                            seq,
                            handle,
                            *offset,
                            d,
                            SumKind::Crc32c,
                            None,
                        ))
                    }
                    None => {
                        disk[*offset as usize..][..zeros_len].fill(0);
                        Message::Zero {
                            seq,
                            disk: handle,
                            offset_bytes: *offset,
                            len_bytes: zeros_len as u64,
                        }
                    }
                });
            }
            seq += 1;
            let id = send_with_point(&mut s, msgs, seq).await?;
            states.push((id, disk.clone()));
        }
        anyhow::Ok(())
    })?;

    exports_match(&site, DISK, &states)?;
    let m = parse(&scrape(rx_metrics)?)?;
    let series = |name: &str| format!("tidemark_receiver_{name}_total{{disk=\"{DISK}\"}}");
    let overwritten = get(&m, &series("overwritten_bytes"))? as u64;
    let journaled = get(&m, &series("journaled_bytes"))? as u64;
    ensure!(
        overwritten == 16 * MIB + 8192 + zeros_len as u64 && journaled == 10 * MIB,
        "overwritten {overwritten}, journaled {journaled}"
    );
    // Random data does not compress: the journal is about its 10 MiB of
    // pre-images (less the zeros that the last one holds), where
    // journaling every overwrite would take 16 MiB.
    let bytes = undo_bytes(&site, DISK)?;
    ensure!(
        (10 * MIB - zeros_len as u64..11 * MIB).contains(&bytes),
        "journal {bytes} bytes"
    );
    Ok(())
}

/// The receiver commits a batch (journal sync, image writes, image sync,
/// ack) while it reads the next one. Writes here land on bytes of a batch
/// still being committed (their pre-images must hold that batch's data),
/// put zeros over bytes just written (no longer a hole), rewrite bytes
/// already journaled since the point (which do not wait for the commit)
/// or go elsewhere, in extents large enough that batches end mid-stream.
/// The journal's syncs are slowed down (40 ms each, as on a busy disk) so
/// that the next messages do arrive while a batch is being committed.
/// Every point must export exactly, the newest being the live image.
#[test]
fn overwrites_of_a_batch_still_being_committed_keep_every_point_exact() -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    const BLOCK: u64 = 4096;
    const SIZE: u64 = 24 * MIB;
    const DISK: &str = "disk-overlap";
    let mut site = Site::start()?;
    let lib = tidemark_tests::faultfs_library();
    site.restart_receiver_with_env(&[
        ("LD_PRELOAD", path(&lib)),
        ("TIDEMARK_FAULT_SLOW_SYNC", "/undo/:40"),
    ])?;
    let agent_dir = site.agent_dir("agent-overlap")?;
    let mut rng = SplitMix64::new(tidemark_tests::seed(77));
    let mut disk = vec![0u8; SIZE as usize];
    let mut states = Vec::new();
    raw::block_on(async {
        let mut s = raw::hello(site.addr, &agent_dir, "agent-overlap").await?;
        let handle = raw::register(&mut s, DISK, SIZE).await?;
        let mut seq = 0;
        // (offset, len) of every write so far, newest last.
        let mut history: Vec<(u64, u64)> = Vec::new();
        // The first round comes before any point (nothing journaled);
        // each later one writes about 24 MiB, some six batches.
        for _round in 0..5 {
            let mut msgs = Vec::new();
            for _ in 0..48 {
                seq += 1;
                let len = BLOCK * (1 + rng.below(256));
                let near = |back: usize, rng: &mut SplitMix64| {
                    let (at, n) = history[history.len() - back];
                    (at + rng.below(n / BLOCK) * BLOCK).min(SIZE - len)
                };
                let offset = match rng.below(8) {
                    // Inside or across the last write: the same batch, or
                    // the one being committed when it just ended.
                    0 | 1 if !history.is_empty() => near(1, &mut rng),
                    // A few writes back: likely the batch before.
                    2 | 3 if history.len() >= 8 => near(2 + rng.below(6) as usize, &mut rng),
                    _ => rng.below((SIZE - len) / BLOCK + 1) * BLOCK,
                };
                history.push((offset, len));
                let range = offset as usize..(offset + len) as usize;
                msgs.push(if rng.below(6) == 0 {
                    disk[range].fill(0);
                    Message::Zero {
                        seq,
                        disk: handle,
                        offset_bytes: offset,
                        len_bytes: len,
                    }
                } else {
                    rng.fill_bytes(&mut disk[range.clone()]);
                    Message::Extent(Extent::pack(
                        seq,
                        handle,
                        offset,
                        &disk[range],
                        SumKind::Crc32c,
                        None,
                    ))
                });
            }
            seq += 1;
            let id = send_with_point(&mut s, msgs, seq).await?;
            states.push((id, disk.clone()));
        }
        anyhow::Ok(())
    })?;
    exports_match(&site, DISK, &states)
}
