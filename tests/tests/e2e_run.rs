//! Continuous replication end to end: `tidemark-agent run` tracking real
//! writes on loop devices through the kernel's block tracepoints, points on
//! demand, and the faults the tracker must notice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{path, run_ok, Site};
use tidemark_tests::{require_cmd, workspace_bin, Daemon, LoopDev, SplitMix64, ZramDev};

fn random_block(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]));
    v
}

/// Writes scattered random blocks straight to the device.
fn churn(dev: &LoopDev, rng: &mut SplitMix64, writes: usize) -> anyhow::Result<()> {
    let blocks = dev.size_bytes() / 4096;
    for _ in 0..writes {
        let at = (rng.next_u64() % blocks) * 4096;
        let len = 4096 * (1 + (rng.next_u64() % 16) as usize);
        let len = len.min((dev.size_bytes() - at) as usize);
        dev.write_at(at, &random_block(rng, len))?;
    }
    Ok(())
}

#[test]
fn raw_writes_replicate_and_points_export_exactly() -> anyhow::Result<()> {
    require_cmd("blkdiscard")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("raw.img"), 64 << 20)?;
    let cfg = run_config(&site, "run-raw", &[(dev.path(), "disk-raw")], "")?;
    let mut agent = RunningAgent::start(&cfg, "run-raw")?;
    let mut rng = SplitMix64::new(5);
    for round in 0..3u64 {
        churn(&dev, &mut rng, 200)?;
        // A discard (the loop device punches a hole: reads as zeroes) and
        // a write-zeroes (`N` in the tracer's rwbs), over 8 MiB just written.
        let at = (round * 20 + 3) << 20;
        dev.write_at(at, &random_block(&mut rng, 8 << 20))?;
        let device = path(dev.path());
        let (off, len) = (at.to_string(), (3u64 << 20).to_string());
        run_ok(Command::new("blkdiscard").args(["-o", &off, "-l", &len, device]))?;
        let (off, len) = ((at + (5 << 20)).to_string(), (2u64 << 20).to_string());
        run_ok(Command::new("blkdiscard").args(["-z", "-o", &off, "-l", &len, device]))?;
        let id = agent.bookmark(false)?;
        let exported = site.export("disk-raw", &id.to_string())?;
        ensure!(
            exported == dev.read_all()?,
            "round {round}: point {id} differs from the device"
        );
    }
    let status = agent.status_json()?;
    assert_eq!(status["disks"][0]["state"], "protected", "{status}");
    let log = agent.stop()?;
    assert!(log.contains("resync required: initial sync"), "{log}");
    Ok(())
}

/// Sets its flag when dropped.
struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `status` reports as backlog what is dirty plus what was sent and is
/// not yet durable at the receiver. Under writes that never pause there is
/// always something in flight when a round ends; the sent part once grew
/// by every round's ranges until a quiet moment (4.5 GiB for a 2 GiB disk
/// after 25 s of fio), and was saved with the map every round. Now it is
/// what the send window holds, so the backlog stays within the disk.
/// A stop under such writes is prompt and clean.
#[test]
fn backlog_under_writes_that_never_pause_stays_within_the_disk() -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let site = Site::start()?;
    let size = 32u64 << 20;
    let dev = LoopDev::create(&site.dir.path().join("steady.img"), size)?;
    let cfg = run_config(
        &site,
        "run-steady",
        &[(dev.path(), "disk-steady")],
        "send_window_mib = 1",
    )?;
    let mut agent = RunningAgent::start(&cfg, "run-steady")?;
    agent.bookmark(false)?;
    let done = std::sync::Arc::new(AtomicBool::new(false));
    // Stops the writer however this test ends, before the device goes.
    let _stop = StopOnDrop(done.clone());
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, done, written) = (dev.path().to_path_buf(), done.clone(), written.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            let mut rng = SplitMix64::new(11);
            while !done.load(Ordering::Relaxed) {
                let at = (rng.next_u64() % (size >> 20)) << 20;
                f.write_all_at(&random_block(&mut rng, 1 << 20), at)?;
                f.sync_data()?;
                written.fetch_add(1 << 20, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let mut most = 0u64;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        most = most.max(backlog(&agent)?);
    }
    // A stop under writes that never pause is clean and prompt: it once
    // waited for a round that left nothing dirty, and systemd's timeout
    // killed the agent first.
    let asked = std::time::Instant::now();
    agent.stop()?;
    let took = asked.elapsed();
    ensure!(
        took < Duration::from_secs(10),
        "a stop under steady writes took {:.1} s",
        took.as_secs_f64()
    );
    done.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread")?;
    let written = written.load(Ordering::Relaxed);
    eprintln!("{written} bytes written, largest backlog {most} bytes");
    ensure!(
        written >= 4 * size,
        "the writer wrote only {written} bytes: too few rounds to tell"
    );
    // Dirty at most the disk, in flight at most the 1 MiB window and the
    // piece that filled it.
    ensure!(
        most <= size + (2 << 20),
        "backlog {most} bytes for a {size}-byte disk: {}",
        agent.log()
    );
    // The clean stop's state spares the restart a resync, and the point
    // after it holds every write, before the stop and after.
    agent.resumes_without_resync(&site, &dev, "disk-steady", "under writes")
}

/// The backlog `status` reports for the one disk.
fn backlog(agent: &RunningAgent) -> anyhow::Result<u64> {
    let status = agent.status_json()?;
    status["disks"][0]["dirty_bytes"]
        .as_u64()
        .with_context(|| format!("no dirty_bytes in {status}"))
}

/// A cycle gathers sparse writes into one round, but a burst ships at
/// once: waiting out the cycle had a burst of 200 MB/s pile up a second's
/// worth before the first round, more than a point may read under a
/// freeze. With a cycle of a minute, a small write waits and a 16 MiB
/// burst does not. Nor does a point wait for the cycle once nothing
/// holds it: the first one, held for the initial sync, took two whole
/// cycles (the sync's end was noticed a round later, and the point a
/// cycle after that).
#[test]
fn a_burst_ships_without_waiting_out_the_cycle() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("burst.img"), 64 << 20)?;
    let cfg = run_config(
        &site,
        "run-burst",
        &[(dev.path(), "disk-burst")],
        "cycle_ms = 60000",
    )?;
    let agent = RunningAgent::start(&cfg, "run-burst")?;
    let asked = std::time::Instant::now();
    agent.bookmark(false)?;
    ensure!(
        asked.elapsed() < Duration::from_secs(30),
        "the first point took {:.0} s: it waited for the 60 s cycle",
        asked.elapsed().as_secs_f64()
    );
    // The point ended a round: the next wait is a whole minute.
    let mut rng = SplitMix64::new(12);
    dev.write_at(0, &random_block(&mut rng, 1 << 20))?;
    std::thread::sleep(Duration::from_secs(3));
    let small = backlog(&agent)?;
    ensure!(
        small >= 1 << 20,
        "a 1 MiB write did not wait for the cycle: backlog {small} bytes after 3 s"
    );
    dev.write_at(32 << 20, &random_block(&mut rng, 16 << 20))?;
    let written = std::time::Instant::now();
    while backlog(&agent)? > 0 {
        ensure!(
            written.elapsed() < Duration::from_secs(20),
            "a 16 MiB burst still waits after 20 s of a 60 s cycle: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "the burst was durable {:.1} s after it was written",
        written.elapsed().as_secs_f64()
    );
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-burst", &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    Ok(())
}

/// A second `run` of the same agent (a stale one beside the service, or
/// one started by hand) would share its trace instance and make both
/// resync without end: it is refused, and the first keeps replicating.
#[test]
fn a_second_agent_on_the_same_instance_is_refused() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("twice.img"), 16 << 20)?;
    let cfg = run_config(&site, "run-twice", &[(dev.path(), "disk-twice")], "")?;
    let mut agent = RunningAgent::start(&cfg, "run-twice")?;
    let pid = agent.pid()?;
    let mut cmd = Command::new(workspace_bin("tidemark-agent"));
    cmd.args(["run", "--config", path(&cfg)]);
    // Killed on drop if it is still running when the test fails.
    let second = Daemon::spawn(cmd)?;
    let status = second.wait_timeout(Duration::from_secs(30))?;
    let err = second.log();
    ensure!(!status.success(), "the second agent exited 0: {err}");
    ensure!(
        err.contains("in use by another tidemark-agent") && err.contains(&format!("pid {pid}")),
        "the refusal names the running agent: {err}"
    );
    churn(&dev, &mut SplitMix64::new(9), 50)?;
    let id = agent.bookmark(false)?;
    ensure!(site.export("disk-twice", &id.to_string())? == dev.read_all()?);
    let log = agent.stop()?;
    ensure!(
        log.matches("resync required").count() == 1,
        "only the initial sync: {log}"
    );
    Ok(())
}

#[test]
fn ext4_files_at_a_point_mount_and_check_clean() -> anyhow::Result<()> {
    require_cmd("fsck.ext4")?;
    require_cmd("fstrim")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("fs.img"), 128 << 20)?;
    dev.mkfs_ext4()?;
    let (mnt, _unmount) = mount_quiet(&site, &dev)?;
    let cfg = run_config(&site, "run-fs", &[(dev.path(), "disk-fs")], "")?;
    let agent = RunningAgent::start(&cfg, "run-fs")?;

    let mut rng = SplitMix64::new(9);
    let mut expected = Vec::new();
    for i in 0..20 {
        let data = random_block(&mut rng, 4096 * (1 + i % 7) + i * 13);
        std::fs::write(mnt.join(format!("f{i}")), &data)?;
        expected.push((format!("f{i}"), data));
    }
    // O_DIRECT writes, an overwrite, deletions and a trim.
    run_ok(Command::new("dd").args([
        "if=/dev/urandom",
        &format!("of={}", mnt.join("direct.bin").display()),
        "bs=64k",
        "count=32",
        "oflag=direct",
        "status=none",
    ]))?;
    expected.push(("direct.bin".into(), std::fs::read(mnt.join("direct.bin"))?));
    std::fs::write(mnt.join("f3"), b"overwritten")?;
    expected[3].1 = b"overwritten".to_vec();
    for i in [5, 7] {
        std::fs::remove_file(mnt.join(format!("f{i}")))?;
    }
    expected.retain(|(n, _)| n != "f5" && n != "f7");
    run_ok(Command::new("fstrim").arg(&mnt))?;

    let id = agent.bookmark(false)?;
    let image = site.dir.path().join("point.raw");
    run_ok(&mut crate_export(&site, "disk-fs", id, &image))?;
    run_ok(Command::new("fsck.ext4").args(["-n", "-f", path(&image)]))?;
    let check = site.dir.path().join("check");
    std::fs::create_dir_all(&check)?;
    run_ok(Command::new("mount").args(["-o", "ro,loop,noload", path(&image), path(&check)]))?;
    let _unmount_check = Unmount(check.clone());
    for (name, data) in &expected {
        let got = std::fs::read(check.join(name))
            .with_context(|| format!("{name} missing at point {id}"))?;
        ensure!(&got == data, "{name} differs at point {id}");
    }
    ensure!(
        !check.join("f5").exists() && !check.join("f7").exists(),
        "deleted files came back"
    );
    Ok(())
}

/// Unmounts a mount point when dropped, however a test ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts `dev`'s ext4 at `{site}/mnt` with a 300 s journal commit
/// interval: data is written back when the test says (a freeze), not by
/// a commit.
fn mount_quiet(site: &Site, dev: &LoopDev) -> anyhow::Result<(PathBuf, Unmount)> {
    mount_quiet_at(site, dev, "mnt")
}

fn mount_quiet_at(site: &Site, dev: &LoopDev, name: &str) -> anyhow::Result<(PathBuf, Unmount)> {
    let mnt = site.dir.path().join(name);
    std::fs::create_dir_all(&mnt)?;
    run_ok(Command::new("mount").args(["-o", "commit=300", path(dev.path()), path(&mnt)]))?;
    Ok((mnt.clone(), Unmount(mnt)))
}

/// FIFREEZE writes a filesystem's dirty data back before it returns,
/// every request an event: 40,000 scattered dirty pages were some 16,000
/// requests in a second here, more than a 256 KiB ring holds (about
/// 4,400 a CPU), though a 100 ms drain's worth fits. The tracer is
/// drained during the freeze: it was not, and the ring overran.
#[test]
fn a_freeze_that_writes_much_back_does_not_overrun_the_tracer() -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("wb.img"), 512 << 20)?;
    dev.mkfs_ext4()?;
    let (mnt, _unmount) = mount_quiet(&site, &dev)?;
    let big = mnt.join("big");
    run_ok(Command::new("fallocate").args(["-l", "256M", path(&big)]))?;
    run_ok(&mut Command::new("sync"))?;
    let cfg = run_config(
        &site,
        "run-wb",
        &[(dev.path(), "disk-wb")],
        "trace_buffer_kb = 256",
    )?;
    let agent = RunningAgent::start(&cfg, "run-wb")?;
    agent.bookmark(false)?;
    let f = std::fs::OpenOptions::new().write(true).open(&big)?;
    let mut rng = SplitMix64::new(53);
    for _ in 0..40_000 {
        let at = (rng.next_u64() % (256 << 8)) * 4096;
        f.write_all_at(&random_block(&mut rng, 4096), at)?;
    }
    drop(f);
    let before = disk_counters(&dev)?;
    agent.bookmark(false)?;
    let writes = disk_counters(&dev)? - before;
    eprintln!("{writes} write requests during the point");
    ensure!(
        writes >= 10_000,
        "only {writes} write requests during the point: too few to overrun the ring"
    );
    let log = agent.log();
    ensure!(
        !log.contains("write events were lost"),
        "the tracer overran during the freeze: {log}"
    );
    // Written back before the freeze, the 160 MB are shipped as a backlog
    // first; the point itself reads what is left under the freeze. It
    // read them all into memory under the freeze before (peak RSS over
    // 160 MiB; a few GiB for a machine with much RAM and buffered writes).
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()?))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in the agent's status")?;
    eprintln!("agent peak RSS {} MiB", peak_kib / 1024);
    ensure!(
        peak_kib < 96 << 10,
        "the agent's peak RSS was {} MiB: the point read the written-back data into memory",
        peak_kib / 1024
    );
    Ok(())
}

/// A write that holds a filesystem's write access without finishing: a
/// splice from an empty pipe into a file on it (the kernel takes the
/// filesystem's write access before it waits for the pipe). FIFREEZE
/// waits for such a write to end, so it does not return until the pipe
/// is fed or closed, which dropping this does.
struct StuckWrite {
    feed: Option<std::os::fd::OwnedFd>,
    splice: Option<std::thread::JoinHandle<std::io::Result<usize>>>,
}

impl StuckWrite {
    fn start(file: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd;
        let (from, feed) = nix::unistd::pipe()?;
        let to = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(file)?;
        let splice = std::thread::spawn(move || {
            let mut at: nix::libc::loff_t = 0;
            // SAFETY: both descriptors are open for the call (owned by this
            // closure) and `at` is a live offset.
            let n = unsafe {
                nix::libc::splice(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    to.as_raw_fd(),
                    &mut at,
                    4096,
                    0,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(n as usize)
        });
        // Long enough for the thread to be waiting in the kernel.
        std::thread::sleep(Duration::from_millis(300));
        ensure!(
            !splice.is_finished(),
            "the splice into {} did not wait",
            file.display()
        );
        Ok(Self {
            feed: Some(feed),
            splice: Some(splice),
        })
    }

    /// Feeds the pipe: the write ends, with `data` in the file.
    fn finish(mut self, data: &[u8]) -> anyhow::Result<()> {
        let feed = self.feed.take().context("fed twice")?;
        ensure!(
            nix::unistd::write(&feed, data)? == data.len(),
            "short write into the pipe"
        );
        let n = self
            .splice
            .take()
            .context("joined twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("splice thread panicked"))??;
        ensure!(n == data.len(), "splice moved {n} of {} bytes", data.len());
        Ok(())
    }
}

impl Drop for StuckWrite {
    fn drop(&mut self) {
        self.feed.take();
        if let Some(t) = self.splice.take() {
            let _ = t.join();
        }
    }
}

/// Thaws mount points when dropped, so a test that fails while a
/// filesystem is frozen can unmount it.
struct ThawOnDrop(Vec<PathBuf>);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(m)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Writes `file` on a thread; fails if that does not end within `within`
/// (a frozen filesystem holds the write back).
fn write_ends(file: &Path, data: &[u8], within: Duration) -> anyhow::Result<()> {
    let (file, data) = (file.to_path_buf(), data.to_vec());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(std::fs::write(&file, data)));
    match rx.recv_timeout(within) {
        Ok(r) => Ok(r?),
        Err(_) => {
            anyhow::bail!("a write did not end within {within:?}: is the filesystem still frozen?")
        }
    }
}

/// A freeze that does not return (a write on the filesystem that never
/// ends) is given up after `freeze_timeout_secs`: the point goes on as a
/// sync marker, the filesystem frozen before it is thawed at once, no
/// other freeze is tried while it hangs, and once it returns its
/// filesystem is thawed and points are consistent again.
#[test]
fn a_freeze_that_does_not_return_is_given_up_and_thawed() -> anyhow::Result<()> {
    require_cmd("fsfreeze")?;
    require_cmd("debugfs")?;
    let site = Site::start()?;
    let (dev_a, dev_b) = (
        LoopDev::create(&site.dir.path().join("a.img"), 64 << 20)?,
        LoopDev::create(&site.dir.path().join("b.img"), 64 << 20)?,
    );
    dev_a.mkfs_ext4()?;
    dev_b.mkfs_ext4()?;
    // The agent freezes in the order of the mount points: `a` first.
    let (mnt_a, _unmount_a) = mount_quiet_at(&site, &dev_a, "mnt-a")?;
    let (mnt_b, _unmount_b) = mount_quiet_at(&site, &dev_b, "mnt-b")?;
    let _thaw = ThawOnDrop(vec![mnt_a.clone(), mnt_b.clone()]);
    let cfg = run_config(
        &site,
        "run-stuck",
        &[(dev_a.path(), "disk-a"), (dev_b.path(), "disk-b")],
        "freeze_timeout_secs = 2",
    )?;
    let agent = RunningAgent::start(&cfg, "run-stuck")?;
    let id = agent.bookmark(false)?;
    ensure!(site.point_kind(id)?.as_deref() == Some("crash-consistent"));

    let stuck = StuckWrite::start(&mnt_b.join("stuck"))?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.point_kind(id)?.as_deref() == Some("sync-marker"),
        "a point without its freeze was recorded as {:?}",
        site.point_kind(id)?
    );
    let log = agent.log();
    ensure!(
        log.contains("FIFREEZE did not return within freeze_timeout_secs = 2 s"),
        "{log}"
    );
    // `a` was frozen before `b` hung: thawed when the freeze was given up.
    write_ends(
        &mnt_a.join("after"),
        b"written while b's freeze hangs",
        Duration::from_secs(10),
    )?;

    // While it hangs, no other freeze is tried (each would be another
    // thread blocked for good).
    let id = agent.bookmark(false)?;
    ensure!(site.point_kind(id)?.as_deref() == Some("sync-marker"));
    ensure!(
        agent.log().contains("none is tried until it does"),
        "{}",
        agent.log()
    );

    stuck.finish(&[7u8; 4096])?;
    agent.wait_for_log(
        "a freeze given up earlier returned after",
        Duration::from_secs(10),
    )?;
    write_ends(&mnt_b.join("after"), b"b thawed", Duration::from_secs(10))?;

    let id = agent.bookmark(false)?;
    ensure!(site.point_kind(id)?.as_deref() == Some("crash-consistent"));
    for (disk, files) in [
        (
            "disk-a",
            vec![("after", b"written while b's freeze hangs".to_vec())],
        ),
        (
            "disk-b",
            vec![("stuck", vec![7u8; 4096]), ("after", b"b thawed".to_vec())],
        ),
    ] {
        let image = site.dir.path().join(format!("{disk}.raw"));
        run_ok(&mut crate_export(&site, disk, id, &image))?;
        run_ok(Command::new("fsck.ext4").args(["-n", "-f", path(&image)]))?;
        for (name, want) in files {
            let out = Command::new("debugfs")
                .args(["-R", &format!("cat /{name}"), path(&image)])
                .output()?;
            ensure!(
                out.stdout == want,
                "{disk}: /{name} at point {id} is not what was written"
            );
        }
    }
    Ok(())
}

/// Write requests the block layer completed for `dev` (/sys/block/*/stat).
fn disk_counters(dev: &LoopDev) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(dev.sysfs()?.join("stat"))?;
    stat.split_whitespace()
        .nth(4)
        .context("write requests in stat")?
        .parse()
        .context("write requests in stat")
}

fn crate_export(site: &Site, disk: &str, id: u64, out: &Path) -> Command {
    let mut c = Command::new(workspace_bin("tidemark-receiver"));
    c.args(["export", "--config", path(&site.config()), "--disk", disk])
        .args([
            "--point",
            &id.to_string(),
            "--format",
            "raw",
            "--out",
            path(out),
        ]);
    c
}

#[test]
fn sigkill_and_restart_converge_without_resync() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("k.img"), 64 << 20)?;
    let cfg = run_config(&site, "run-kill", &[(dev.path(), "disk-k")], "")?;
    let mut agent = RunningAgent::start(&cfg, "run-kill")?;
    let mut rng = SplitMix64::new(13);
    churn(&dev, &mut rng, 100)?;
    agent.bookmark(false)?;
    churn(&dev, &mut rng, 100)?;
    std::thread::sleep(Duration::from_millis(500));
    agent.kill();
    // Writes while the agent is down stay in the trace instance.
    churn(&dev, &mut rng, 100)?;
    agent.restart()?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-k", &id.to_string())? == dev.read_all()?,
        "no convergence after SIGKILL"
    );
    let log = agent.log();
    ensure!(
        !log.contains("resync required"),
        "a restart without loss must not resync: {log}"
    );
    Ok(())
}

/// A crash while writes go on: what the agent had drained since its last
/// save is in its drain log, so the restart resumes without a resync
/// (without the log, the audit found those events missing in 4 of 4
/// runs; with the tests' 200 ms cycle the loop saves so often that a
/// kill seldom lands after an unsaved drain).
#[test]
fn sigkill_while_writes_go_on_resumes_without_resync() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("w.img"), 64 << 20)?;
    // The default cycle: sparse writes gather for a second, drained every
    // 100 ms meanwhile and saved only when the round is over.
    let cfg = run_config(
        &site,
        "run-killw",
        &[(dev.path(), "disk-w")],
        "cycle_ms = 1000",
    )?;
    let mut agent = RunningAgent::start(&cfg, "run-killw")?;
    agent.bookmark(false)?;
    let writes = SmallWrites::start(&dev, 83);
    // Several drains, and rounds, since the last save.
    std::thread::sleep(Duration::from_millis(1500));
    agent.kill();
    std::thread::sleep(Duration::from_millis(300));
    agent.restart()?;
    std::thread::sleep(Duration::from_secs(1));
    let written = writes.stop()?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-w", &id.to_string())? == dev.read_all()?,
        "no convergence after SIGKILL under {written} writes"
    );
    let log = agent.log();
    ensure!(
        log.contains("taken from its drain log"),
        "the restart did not use the drain log: {log}"
    );
    ensure!(
        !log.contains("resync required"),
        "a crash under writes, nothing lost, must not resync ({written} writes): {log}"
    );
    Ok(())
}

/// 4 KiB writes at random places of a device, each synced, a few hundred
/// a second until stopped: steady events for a small trace ring.
struct SmallWrites {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl SmallWrites {
    fn start(dev: &LoopDev, seed: u64) -> SmallWrites {
        SmallWrites::start_every(dev, seed, Duration::from_millis(2))
    }

    /// Writes with `pause` between one and the next.
    fn start_every(dev: &LoopDev, seed: u64, pause: Duration) -> SmallWrites {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (path, size) = (dev.path().to_path_buf(), dev.size_bytes());
        let thread = {
            let (done, written) = (done.clone(), written.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let f = std::fs::OpenOptions::new().write(true).open(path)?;
                let mut rng = SplitMix64::new(seed);
                while !done.load(Ordering::Relaxed) {
                    let at = (rng.next_u64() % (size / 4096)) * 4096;
                    f.write_all_at(&random_block(&mut rng, 4096), at)?;
                    f.sync_data()?;
                    written.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(pause);
                }
                Ok(())
            })
        };
        SmallWrites {
            done,
            written,
            thread: Some(thread),
        }
    }

    /// Stops the writes; returns how many there were.
    fn stop(mut self) -> anyhow::Result<u64> {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread")?;
        }
        Ok(self.written.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for SmallWrites {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Restarts the site's receiver with every sync `ms` slower (faultfs).
fn slow_syncs(site: &mut Site, ms: u64) -> anyhow::Result<()> {
    let lib = tidemark_tests::faultfs_library();
    site.restart_receiver_with_env(&[
        ("LD_PRELOAD", path(&lib)),
        ("TIDEMARK_FAULT_SLOW_SYNC", &format!("/:{ms}")),
    ])
}

/// A 16 MiB device `{name}.img`, replicated as `disk-{name}` by agent
/// `run-{name}` with a small trace ring, after the initial sync; `extra`
/// adds agent settings. Some 140 events a CPU: 100 ms of [`SmallWrites`]
/// fits several times over, a second does not.
fn small_ring_agent(
    site: &Site,
    name: &str,
    extra: &str,
) -> anyhow::Result<(LoopDev, PathBuf, RunningAgent)> {
    let dev = LoopDev::create(&site.dir.path().join(format!("{name}.img")), 16 << 20)?;
    let cfg = run_config(
        site,
        &format!("run-{name}"),
        &[(dev.path(), &format!("disk-{name}"))],
        &format!("trace_buffer_kb = 8\n{extra}"),
    )?;
    let agent = RunningAgent::start(&cfg, &format!("run-{name}"))?;
    agent.bookmark(false)?;
    Ok((dev, cfg, agent))
}

/// The tracer did not overrun (`during` says when it might have), and a
/// point taken now holds every write of the device.
fn no_overrun_and_converged(
    site: &Site,
    agent: &RunningAgent,
    dev: &LoopDev,
    disk: &str,
    during: &str,
) -> anyhow::Result<()> {
    let log = agent.log();
    ensure!(
        !log.contains("write events were lost"),
        "the tracer overran {during}: {log}"
    );
    let id = agent.bookmark(false)?;
    ensure!(
        site.export(disk, &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    Ok(())
}

/// The receiver records a point once its data is durable: a sync or two,
/// seconds on a busy disk. The agent drains its tracer while it waits:
/// it did not, and steady small writes overran a small ring in that
/// wait, a resync of every disk for no loss of the agent's making.
#[test]
fn a_point_slow_to_record_does_not_overrun_the_tracer() -> anyhow::Result<()> {
    const SLOW_SYNC_MS: u64 = 2000;
    let mut site = Site::start()?;
    let (dev, _, agent) = small_ring_agent(&site, "slowpoint", "")?;
    slow_syncs(&mut site, SLOW_SYNC_MS)?;
    // The agent reconnects; the writes start with the point, so that it
    // has little to send and waits mostly for the receiver's syncs.
    std::thread::sleep(Duration::from_secs(2));
    let writes = SmallWrites::start(&dev, 31);
    let asked = std::time::Instant::now();
    agent.bookmark(false)?;
    let took = asked.elapsed();
    let writes = writes.stop()?;
    eprintln!(
        "the point took {:.1} s, {writes} writes meanwhile",
        took.as_secs_f64()
    );
    ensure!(
        took >= Duration::from_millis(SLOW_SYNC_MS),
        "the point took only {took:?}: the receiver's syncs were not slowed"
    );
    ensure!(
        writes >= 400,
        "only {writes} writes during the point: too few to overrun the ring"
    );
    // At full speed again, the point that follows holds every write.
    site.restart_receiver()?;
    no_overrun_and_converged(
        &site,
        &agent,
        &dev,
        "disk-slowpoint",
        "while a point waited",
    )
}

/// A point reads what is dirty while its filesystems are frozen; a slow
/// disk makes that read long, and writes the freeze does not stop (raw
/// ones, as here) go on meanwhile. The agent drains its tracer during
/// that read: it did not, and a small ring overran.
#[test]
fn a_point_slow_to_read_does_not_overrun_the_tracer() -> anyhow::Result<()> {
    const DIRTY: usize = 4 << 20;
    const READ_CAP: u64 = 1 << 20;
    let site = Site::start()?;
    // No round between the writes and the point: they stay below the
    // 8 MiB that ships at once, and the cycle is long.
    let (dev, _, agent) = small_ring_agent(&site, "slowread", "cycle_ms = 60000")?;
    let mut rng = SplitMix64::new(61);
    dev.write_at(0, &random_block(&mut rng, DIRTY))?;
    let cap = tidemark_tests::ReadCap::start(agent.pid()?, &dev, READ_CAP)?;
    let writes = SmallWrites::start(&dev, 67);
    let asked = std::time::Instant::now();
    agent.bookmark(false)?;
    let took = asked.elapsed();
    let writes = writes.stop()?;
    drop(cap);
    eprintln!(
        "the point took {:.1} s, {writes} writes meanwhile",
        took.as_secs_f64()
    );
    ensure!(
        took.as_secs_f64() >= 0.75 * (DIRTY as u64 / READ_CAP) as f64,
        "the point took only {took:?}: its reads were not slowed"
    );
    ensure!(
        writes >= 400,
        "only {writes} writes during the point: too few to overrun the ring"
    );
    no_overrun_and_converged(&site, &agent, &dev, "disk-slowread", "while a point read")
}

/// A receiver that goes away while a point waits for it: the point is
/// sent again once it is back, and the tracer is drained meanwhile (the
/// wait for the connection drained nothing, and small writes overran
/// a small ring in a few seconds).
#[test]
fn a_point_across_a_receiver_restart_drains_the_tracer() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let (dev, _, agent) = small_ring_agent(&site, "gonepoint", "")?;
    // Slow syncs keep the point waiting for the receiver when it dies.
    slow_syncs(&mut site, 2000)?;
    std::thread::sleep(Duration::from_secs(2));
    let writes = SmallWrites::start(&dev, 37);
    let asked = std::time::Instant::now();
    let bookmark = agent.bookmark_in_background()?;
    std::thread::sleep(Duration::from_secs(1));
    site.receiver.kill();
    let gone = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let away = gone.elapsed();
    site.restart_receiver()?;
    let out = bookmark.wait_with_output()?;
    let took = asked.elapsed();
    let writes = writes.stop()?;
    eprintln!(
        "the point took {:.1} s, the receiver was away {:.1} s, {writes} writes",
        took.as_secs_f64(),
        away.as_secs_f64()
    );
    ensure!(
        out.status.success(),
        "the point across the restart failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    ensure!(
        took > away + Duration::from_secs(1),
        "the point was recorded before the receiver went away ({took:?})"
    );
    ensure!(
        writes >= 500,
        "only {writes} writes during the point: too few to overrun the ring"
    );
    no_overrun_and_converged(
        &site,
        &agent,
        &dev,
        "disk-gonepoint",
        "while a point waited for the receiver",
    )
}

/// A disk that grows under `run` is registered again once what is in
/// flight is acknowledged under its old size, up to 5 s. The tracer is
/// drained during that wait: it was not, and with a receiver slow to
/// acknowledge, small writes overran a small ring meanwhile.
#[test]
fn a_disk_growing_under_slow_acks_does_not_overrun_the_tracer() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let (mut dev, _, agent) = small_ring_agent(&site, "growslow", "")?;
    // Slow syncs keep what is in flight unacknowledged for seconds.
    slow_syncs(&mut site, 2000)?;
    std::thread::sleep(Duration::from_secs(2));
    let writes = SmallWrites::start(&dev, 59);
    std::thread::sleep(Duration::from_millis(1500));
    dev.resize(24 << 20)?;
    agent.wait_for_log("grew from", Duration::from_secs(20))?;
    // The wait for acks, and a round or two after it.
    std::thread::sleep(Duration::from_secs(3));
    let writes = writes.stop()?;
    eprintln!("{writes} writes around the growth");
    ensure!(
        writes >= 1000,
        "only {writes} writes around the growth: too few to overrun the ring"
    );
    site.restart_receiver()?;
    no_overrun_and_converged(
        &site,
        &agent,
        &dev,
        "disk-growslow",
        "while a grown disk waited for acks",
    )
}

/// A stop while a point waits for a receiver that went away: the point is
/// given up (its `bookmark` says why) and the stop is prompt and clean. It
/// waited for the receiver, and systemd's stop timeout killed the agent
/// first: an unclean stop, a resync of every disk at the next start.
#[test]
fn a_stop_while_a_point_waits_for_a_gone_receiver_is_prompt_and_clean() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let (dev, _, mut agent) = small_ring_agent(&site, "stoppoint", "")?;
    // Slow syncs keep the point waiting for the receiver when it dies.
    slow_syncs(&mut site, 2000)?;
    std::thread::sleep(Duration::from_secs(2));
    churn(&dev, &mut SplitMix64::new(47), 50)?;
    let bookmark = agent.bookmark_in_background()?;
    std::thread::sleep(Duration::from_secs(1));
    site.receiver.kill();
    std::thread::sleep(Duration::from_secs(1));
    let asked = std::time::Instant::now();
    agent.stop()?;
    let took = asked.elapsed();
    let out = bookmark.wait_with_output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("the stop during the point took {:.2} s", took.as_secs_f64());
    ensure!(
        took < Duration::from_secs(5),
        "a stop during a point took {:.1} s",
        took.as_secs_f64()
    );
    ensure!(
        !out.status.success() && said.contains("stopping"),
        "the bookmark given up for the stop: {}{said}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The clean stop's state spares the restart a resync, and the point
    // after it holds every write, the given-up point's too.
    site.restart_receiver()?;
    agent.resumes_without_resync(&site, &dev, "disk-stoppoint", "during a point")
}

/// An app-consistent point's pre script may take its time, and a
/// database flushing before a point writes the most then: the tracer is
/// drained while the script runs (it was not, and small writes overran a
/// small ring during a 3 s script).
#[test]
fn a_slow_pre_script_does_not_overrun_the_tracer() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::start()?;
    let (dev, cfg, agent) = small_ring_agent(&site, "slowscript", "script_timeout_secs = 20")?;
    // Scripts are looked for at each point: one added now runs at the next.
    let scripts = cfg.parent().context("agent dir")?.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    let pre = scripts.join("pre-10-flush");
    std::fs::write(&pre, "#!/bin/sh\nsleep 3\n")?;
    std::fs::set_permissions(&pre, std::fs::Permissions::from_mode(0o755))?;
    let writes = SmallWrites::start(&dev, 43);
    let asked = std::time::Instant::now();
    agent.bookmark(true)?;
    let took = asked.elapsed();
    let writes = writes.stop()?;
    eprintln!(
        "the point took {:.1} s, {writes} writes meanwhile",
        took.as_secs_f64()
    );
    ensure!(
        took >= Duration::from_secs(3),
        "the point took only {took:?}: the pre script did not run"
    );
    ensure!(
        writes >= 500,
        "only {writes} writes during the point: too few to overrun the ring"
    );
    let log = agent.log();
    ensure!(!log.contains("pre script failed"), "{log}");
    no_overrun_and_converged(
        &site,
        &agent,
        &dev,
        "disk-slowscript",
        "while a pre script ran",
    )
}

#[test]
fn ring_overrun_is_detected_and_resynced() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("o.img"), 64 << 20)?;
    let cfg = run_config(
        &site,
        "run-loss",
        &[(dev.path(), "disk-o")],
        "trace_buffer_kb = 4",
    )?;
    let mut agent = RunningAgent::start(&cfg, "run-loss")?;
    let mut rng = SplitMix64::new(17);
    // Let the initial sync finish so the resync we see is the overrun's.
    agent.bookmark(false)?;
    {
        // The agent drains every 100 ms, so on a slow machine a burst alone
        // may fit the ring; a stopped agent cannot keep up on any machine.
        let _paused = agent.paused()?;
        let f = std::fs::OpenOptions::new().write(true).open(dev.path())?;
        use std::os::unix::fs::FileExt;
        for i in 0..4000u64 {
            f.write_all_at(&random_block(&mut rng, 512), (i * 8 % 100_000) * 512)?;
            f.sync_data()?;
        }
    }
    let id = agent.bookmark(false)?;
    let log = agent.log();
    ensure!(
        log.contains("write events were lost"),
        "overrun not detected: {log}"
    );
    ensure!(
        log.contains("resync by checksum comparison"),
        "the resync after an overrun must compare, the image exists: {log}"
    );
    ensure!(
        site.export("disk-o", &id.to_string())? == dev.read_all()?,
        "no convergence after the overrun"
    );
    agent.stop()?;
    Ok(())
}

/// Events lost while writes go on are reported as lost: the resync's new
/// audit base was read after the drain's counters, and audited against
/// it, the writes completed in between made an "audit mismatch" the
/// disk's reason.
#[test]
fn events_lost_while_writes_go_on_are_reported_as_lost() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("l.img"), 64 << 20)?;
    let cfg = run_config(
        &site,
        "run-lost",
        &[(dev.path(), "disk-l")],
        "trace_buffer_kb = 4",
    )?;
    let agent = RunningAgent::start(&cfg, "run-lost")?;
    agent.bookmark(false)?;
    // Three writers without a pause: a write completes every few tens of
    // microseconds, within any drain.
    let writers: Vec<SmallWrites> = (0..3)
        .map(|i| SmallWrites::start_every(&dev, 71 + i, Duration::ZERO))
        .collect();
    {
        // Stopped, the agent cannot keep a 4 KiB ring from overrunning.
        let _paused = agent.paused()?;
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut written = 0;
    for w in writers {
        written += w.stop()?;
    }
    let id = agent.bookmark(false)?;
    let log = agent.log();
    ensure!(
        log.contains("write events were lost"),
        "the overrun went unnoticed ({written} writes): {log}"
    );
    ensure!(
        !log.contains("audit mismatch"),
        "lost events were reported as an audit mismatch ({written} writes): {log}"
    );
    ensure!(
        site.export("disk-l", &id.to_string())? == dev.read_all()?,
        "no convergence after the overrun"
    );
    Ok(())
}

#[test]
fn tracing_switched_off_behind_the_agents_back_requires_resync() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("t.img"), 32 << 20)?;
    let cfg = run_config(&site, "run-off", &[(dev.path(), "disk-t")], "")?;
    let agent = RunningAgent::start(&cfg, "run-off")?;
    agent.bookmark(false)?;
    std::fs::write(agent.instance.join("tracing_on"), "0")?;
    let mut rng = SplitMix64::new(23);
    churn(&dev, &mut rng, 50)?;
    let id = agent.bookmark(false)?;
    let log = agent.log();
    ensure!(
        log.contains("resync required"),
        "switching tracing off went unnoticed: {log}"
    );
    ensure!(
        site.export("disk-t", &id.to_string())? == dev.read_all()?,
        "no convergence"
    );
    Ok(())
}

#[test]
fn receiver_killed_mid_stream_loses_nothing() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("r.img"), 64 << 20)?;
    // The smallest window: most of the stream waits for acks when the
    // receiver goes away, with only a frame or two in flight.
    let cfg = run_config(
        &site,
        "run-rx",
        &[(dev.path(), "disk-r")],
        "send_window_mib = 1",
    )?;
    let agent = RunningAgent::start(&cfg, "run-rx")?;
    let mut rng = SplitMix64::new(29);
    agent.bookmark(false)?;
    let writer = {
        let path = dev.path().to_path_buf();
        let size = dev.size_bytes();
        std::thread::spawn(move || -> anyhow::Result<()> {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            let mut rng = SplitMix64::new(31);
            for _ in 0..300 {
                let at = (rng.next_u64() % (size / 65536)) * 65536;
                f.write_all_at(&random_block(&mut rng, 65536), at)?;
                f.sync_data()?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(400));
    site.restart_receiver()?;
    writer.join().expect("writer thread")?;
    churn(&dev, &mut rng, 50)?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-r", &id.to_string())? == dev.read_all()?,
        "data lost across a receiver crash"
    );
    ensure!(
        agent.log().contains("reconnecting"),
        "the agent never noticed: {}",
        agent.log()
    );
    Ok(())
}

#[test]
fn app_consistent_points_run_the_scripts_and_survive_their_failure() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("a.img"), 32 << 20)?;
    let cfg = run_config(
        &site,
        "run-app",
        &[(dev.path(), "disk-app")],
        "script_timeout_secs = 2",
    )?;
    let scripts = cfg.parent().context("agent dir")?.join("scripts");
    std::fs::create_dir_all(&scripts)?;
    let log = site.dir.path().join("scripts.log");
    let script = |name: &str, body: &str| -> anyhow::Result<()> {
        let p = scripts.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    script(
        "pre-10-flush",
        &format!("echo pre:$TIDEMARK_POINT_NAME >> {}", log.display()),
    )?;
    script("post-10-resume", &format!("echo post >> {}", log.display()))?;
    let agent = RunningAgent::start(&cfg, "run-app")?;
    let mut rng = SplitMix64::new(41);
    churn(&dev, &mut rng, 30)?;
    let id = agent.bookmark(true)?;
    assert_eq!(site.point_kind(id)?.as_deref(), Some("app-consistent"));
    let ran = std::fs::read_to_string(&log)?;
    assert!(ran.starts_with("pre:") && ran.ends_with("post\n"), "{ran}");
    ensure!(site.export("disk-app", "latest-app-consistent")? == dev.read_all()?);

    // A hanging pre script is killed; the point is then crash-consistent.
    script("pre-20-hang", "sleep 60")?;
    let id = agent.bookmark(true)?;
    assert_eq!(site.point_kind(id)?.as_deref(), Some("crash-consistent"));
    assert!(agent.log().contains("pre script failed"), "{}", agent.log());
    Ok(())
}

/// The stamp (a write sequence number) each 4 KiB block of `image` holds.
fn stamps(image: &[u8]) -> Vec<u64> {
    image
        .chunks(4096)
        .map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
        .collect()
}

#[test]
fn crash_consistent_points_are_consistent_cuts() -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let site = Site::start()?;
    let blocks = 4096u64;
    let dev = LoopDev::create(&site.dir.path().join("cut.img"), blocks * 4096)?;
    let cfg = run_config(&site, "run-cut", &[(dev.path(), "disk-cut")], "")?;
    let agent = RunningAgent::start(&cfg, "run-cut")?;
    agent.bookmark(false)?;

    // Bursts of stamped writes with pauses, so some points land in a pause
    // (crash-consistent) and some in a burst (sync markers).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let path = dev.path().to_path_buf();
        let done = done.clone();
        std::thread::spawn(move || -> anyhow::Result<Vec<(u64, u64)>> {
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            let mut rng = SplitMix64::new(47);
            let mut log = Vec::new();
            let mut seq = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..50 {
                    seq += 1;
                    let b = rng.next_u64() % blocks;
                    let block: Vec<u8> = seq.to_le_bytes().repeat(512);
                    f.write_all_at(&block, b * 4096)?;
                    f.sync_data()?;
                    log.push((b, seq));
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Ok(log)
        })
    };
    let mut ids = Vec::new();
    for _ in 0..16 {
        ids.push(agent.bookmark(false)?);
        std::thread::sleep(Duration::from_millis(120));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.join().expect("writer thread")?;

    let mut checked = 0;
    for id in ids {
        if site.point_kind(id)?.as_deref() != Some("crash-consistent") {
            continue;
        }
        let got = stamps(&site.export("disk-cut", &id.to_string())?);
        let k = got.iter().copied().max().unwrap_or(0);
        // Every block must hold its last write with a stamp ≤ k.
        let mut want = vec![0u64; blocks as usize];
        for &(b, seq) in log.iter().take_while(|(_, s)| *s <= k) {
            want[b as usize] = seq;
        }
        ensure!(
            got == want,
            "point {id} is not a consistent cut at stamp {k}"
        );
        checked += 1;
    }
    eprintln!(
        "{checked} crash-consistent points checked, log of {} writes",
        log.len()
    );
    ensure!(
        checked > 0,
        "no point landed between bursts: {}",
        agent.log()
    );
    Ok(())
}

/// Under systemd (`Type=notify`): READY once every disk is tracked, even
/// with the receiver unreachable (the unit starts before the network);
/// watchdog pings at half WATCHDOG_USEC from the drain loop; STATUS lines
/// for `systemctl status`.
#[test]
fn agent_notifies_ready_watchdog_and_status() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("notify.img"), 16 << 20)?;
    let cfg = run_config(&site, "run-notify", &[(dev.path(), "disk-notify")], "")?;
    // Point the agent at a port nobody listens on first.
    let text = std::fs::read_to_string(&cfg)?;
    let dead = format!("127.0.0.1:{}", tidemark_tests::free_port());
    std::fs::write(&cfg, text.replace(&site.addr.to_string(), &dead))?;
    let mut notify = tidemark_tests::NotifySocket::bind()?;
    let mut cmd = Command::new(workspace_bin("tidemark-agent"));
    cmd.args(["run", "--config", path(&cfg)])
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "1000000");
    let agent = RunningAgent {
        daemon: Some(Daemon::spawn(cmd)?),
        cfg: cfg.clone(),
        instance: PathBuf::from("/sys/kernel/tracing/instances/tidemark-run-notify"),
    };
    notify
        .wait_for("READY=1", 1, Duration::from_secs(30))
        .with_context(|| agent.log())?;
    let status = notify.last_status().context("no STATUS with READY")?;
    assert!(
        status.contains("1 resyncing") && status.contains("receiver unreachable"),
        "{status}"
    );
    notify
        .wait_for("WATCHDOG=1", 3, Duration::from_secs(10))
        .with_context(|| agent.log())?;
    assert!(agent
        .daemon
        .as_ref()
        .is_some_and(|d| d.try_wait().is_ok_and(|s| s.is_none())));
    Ok(())
}

/// A point asked for with a deadline: a point held back for good (a
/// resync that never ends) fails the test instead of hanging it.
fn bookmark_within(agent: &RunningAgent, limit: Duration) -> anyhow::Result<u64> {
    let mut child = agent.bookmark_in_background()?;
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("no point within {limit:?}: {}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "bookmark failed: {}", agent.log());
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

/// The default `state_dir` (/var/lib/tidemark-agent) is on the root disk,
/// which is protected too: the agent's own saves are writes it tracks.
#[test]
fn state_dir_on_the_protected_filesystem_still_gives_points() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("own.img"), 128 << 20)?;
    dev.mkfs_ext4()?;
    let (mnt, _unmount) = mount_quiet(&site, &dev)?;
    let cfg = run_config(&site, "run-own", &[(dev.path(), "disk-own")], "")?;
    let state = mnt.join("state");
    let text = std::fs::read_to_string(&cfg)?
        .lines()
        .map(|l| {
            if l.starts_with("state_dir") {
                format!("state_dir = \"{}\"", state.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&cfg, text)?;
    let agent = RunningAgent::start(&cfg, "run-own")?;
    std::fs::write(mnt.join("a"), b"before the point")?;
    let id = bookmark_within(&agent, Duration::from_secs(60))?;
    let log = agent.log();
    ensure!(log.contains("resync complete"), "{log}");
    let image = site.dir.path().join("point.raw");
    run_ok(&mut crate_export(&site, "disk-own", id, &image))?;
    run_ok(Command::new("fsck.ext4").args(["-n", "-f", path(&image)]))?;
    let check = site.dir.path().join("check");
    std::fs::create_dir_all(&check)?;
    run_ok(Command::new("mount").args(["-o", "ro,loop,noload", path(&image), path(&check)]))?;
    let _unmount_check = Unmount(check.clone());
    ensure!(
        std::fs::read(check.join("a"))? == b"before the point",
        "the file written before point {id} differs"
    );
    drop(_unmount_check);
    // Idle, the saves stop: each was writes to the disk, tracked, shipped
    // and saved again, every cycle (3.5 write requests a second).
    let saved = mnt.join("state").join("disk-own.state");
    let before = std::fs::metadata(&saved)?.modified()?;
    let writes = disk_counters(&dev)?;
    std::thread::sleep(Duration::from_secs(3));
    eprintln!(
        "idle for 3 s: {} write requests to the protected disk",
        disk_counters(&dev)? - writes
    );
    ensure!(
        std::fs::metadata(&saved)?.modified()? == before,
        "an idle agent saved its state again (a save every cycle replicates itself)"
    );
    // A clean stop saves (and syncs) the state on the disk it tracks,
    // after the stop's last drain; a crash leaves its drain log there.
    // Either way the trace instance holds those writes, and the restart
    // accounts for them without a resync.
    let mut agent = agent;
    for (n, how) in ["a clean stop", "SIGKILL"].into_iter().enumerate() {
        std::fs::write(mnt.join("b"), format!("before {how}"))?;
        if n == 0 {
            agent.stop()?;
        } else {
            std::thread::sleep(Duration::from_millis(300));
            agent.kill();
        }
        agent.restart()?;
        let id = agent.bookmark(false)?;
        let log = agent.log();
        ensure!(
            !log.contains("resync required"),
            "a restart after {how} with state_dir on the protected disk resynced: {log}"
        );
        run_ok(&mut crate_export(&site, "disk-own", id, &image))?;
        run_ok(Command::new("fsck.ext4").args(["-n", "-f", path(&image)]))?;
        run_ok(Command::new("mount").args(["-o", "ro,loop,noload", path(&image), path(&check)]))?;
        let _unmount_check = Unmount(check.clone());
        ensure!(
            std::fs::read(check.join("b"))? == format!("before {how}").as_bytes(),
            "the file written before {how} differs at point {id}"
        );
    }
    Ok(())
}

/// A disk that is never quiet (a database's log, a busy journal) ends
/// its initial sync once all of it has been sent once and acknowledged:
/// points do not wait for a moment without writes, which may never come.
#[test]
fn an_initial_sync_under_writes_that_never_pause_completes() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("busy.img"), 64 << 20)?;
    let writes = SmallWrites::start_every(&dev, 91, Duration::from_millis(5));
    let cfg = run_config(&site, "run-busy", &[(dev.path(), "disk-busy")], "")?;
    let agent = RunningAgent::start(&cfg, "run-busy")?;
    bookmark_within(&agent, Duration::from_secs(60))?;
    let written = writes.stop()?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-busy", &id.to_string())? == dev.read_all()?,
        "no convergence after {written} writes"
    );
    let log = agent.log();
    ensure!(
        log.contains("resync complete (") && log.matches("resync required").count() == 1,
        "one resync, ended while writes went on: {log}"
    );
    Ok(())
}

/// A bio-based disk (zram here; device-mapper and md alike) traces
/// `block_bio_complete`, not `block_rq_complete`: writes and discards on
/// it replicate, the audit against its counters holds, and a restart
/// resumes without a resync. zram does not count discards in its `stat`
/// (found here: 0 after a blkdiscard the tracer saw); the audit only asks
/// that the tracer saw at least what the block layer counted, so that
/// costs nothing, but a lost discard event on zram is not caught by it.
#[test]
fn a_bio_based_disk_replicates_and_resumes_without_resync() -> anyhow::Result<()> {
    require_cmd("blkdiscard")?;
    let site = Site::start()?;
    let dev = ZramDev::create(64 << 20)?;
    let cfg = run_config(&site, "run-zram", &[(dev.path(), "disk-zram")], "")?;
    let mut agent = RunningAgent::start(&cfg, "run-zram")?;
    let mut rng = SplitMix64::new(101);
    let blocks = dev.size_bytes() / 4096;
    let scatter = |rng: &mut SplitMix64, n: usize| -> anyhow::Result<()> {
        for _ in 0..n {
            let at = (rng.next_u64() % (blocks - 16)) * 4096;
            let len = 4096 * (1 + (rng.next_u64() % 16) as usize);
            dev.write_at(at, &random_block(rng, len))?;
        }
        Ok(())
    };
    scatter(&mut rng, 200)?;
    run_ok(Command::new("blkdiscard").args(["-o", "1048576", "-l", "2097152", path(dev.path())]))?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-zram", &id.to_string())? == dev.read_all()?,
        "point {id} of the zram disk differs from it"
    );
    scatter(&mut rng, 100)?;
    std::thread::sleep(Duration::from_millis(500));
    let log = agent.log();
    ensure!(
        log.matches("resync required").count() == 1,
        "only the initial sync on a bio-based disk: {log}"
    );
    agent.kill();
    // Written while the agent is down: kept by the trace instance.
    scatter(&mut rng, 100)?;
    agent.restart()?;
    let id = agent.bookmark(false)?;
    ensure!(
        site.export("disk-zram", &id.to_string())? == dev.read_all()?,
        "point {id} after a restart differs from the zram disk"
    );
    let log = agent.log();
    ensure!(
        !log.contains("resync required"),
        "a restart on a bio-based disk, nothing lost, must not resync: {log}"
    );
    Ok(())
}

/// A disk with a partition table and a filesystem on each of two
/// partitions: the partitions' writes are the disk's (the tracer reports
/// them against the whole disk), both filesystems are frozen for the
/// point, and the exported disk has the table and both filesystems, clean
/// and holding what was written before the point.
#[test]
fn partitions_of_a_disk_are_frozen_and_replicated_as_one_disk() -> anyhow::Result<()> {
    require_cmd("fsck.ext4")?;
    let site = Site::start()?;
    let dev = LoopDev::create_partitioned(
        &site.dir.path().join("parts.img"),
        160 << 20,
        "label: gpt\n,64MiB\n,\n",
    )?;
    let mut mounts = Vec::new();
    for n in [1, 2] {
        let part = dev.partition(n);
        run_ok(Command::new("mkfs.ext4").args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            path(&part),
        ]))?;
        let mnt = site.dir.path().join(format!("p{n}"));
        std::fs::create_dir_all(&mnt)?;
        // Written back only by the point's syncfs and freeze.
        run_ok(Command::new("mount").args(["-o", "commit=300", path(&part), path(&mnt)]))?;
        mounts.push((mnt.clone(), Unmount(mnt)));
    }
    let cfg = run_config(&site, "run-parts", &[(dev.path(), "disk-parts")], "")?;
    let agent = RunningAgent::start(&cfg, "run-parts")?;
    let mut rng = SplitMix64::new(57);
    let mut expected = Vec::new();
    for (n, (mnt, _)) in mounts.iter().enumerate() {
        for i in 0..5 {
            let name = format!("p{}-f{i}", n + 1);
            let data = random_block(&mut rng, 4096 * (1 + i) + 77);
            std::fs::write(mnt.join(&name), &data)?;
            expected.push((n, name, data));
        }
    }
    let id = agent.bookmark(false)?;
    let image = site.dir.path().join("parts-point.raw");
    run_ok(&mut crate_export(&site, "disk-parts", id, &image))?;
    let copy = LoopDev::attach_partitioned(&image)?;
    for n in [1, 2] {
        run_ok(Command::new("fsck.ext4").args(["-n", "-f", path(&copy.partition(n))]))?;
        let check = site.dir.path().join(format!("check{n}"));
        std::fs::create_dir_all(&check)?;
        run_ok(Command::new("mount").args([
            "-o",
            "ro,noload",
            path(&copy.partition(n)),
            path(&check),
        ]))?;
        let _unmount = Unmount(check.clone());
        for (_, name, data) in expected.iter().filter(|(p, _, _)| *p + 1 == n as usize) {
            let got = std::fs::read(check.join(name))
                .with_context(|| format!("{name} missing from partition {n} at point {id}"))?;
            ensure!(&got == data, "{name} differs at point {id}");
        }
    }
    Ok(())
}

/// Every disk of the machine in the same cut: a writer alternates synced
/// overwrites of one block of a file on each of two filesystems, on two
/// disks, stamping them 1, 2, 3, ... (odd on the first, even on the
/// second). A point freezes both before it drains, so at every point the
/// two stamps are consecutive: the newer disk's write is the last one
/// before the cut and the other's the one before it.
#[test]
fn a_point_cuts_every_disk_at_the_same_moment() -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let site = Site::start()?;
    let devs = [
        LoopDev::create(&site.dir.path().join("cut1.img"), 64 << 20)?,
        LoopDev::create(&site.dir.path().join("cut2.img"), 64 << 20)?,
    ];
    let mut mounts = Vec::new();
    for (i, dev) in devs.iter().enumerate() {
        dev.mkfs_ext4()?;
        mounts.push(mount_quiet_at(&site, dev, &format!("cut{i}"))?);
    }
    let files: Vec<PathBuf> = mounts.iter().map(|(m, _)| m.join("stamp")).collect();
    for f in &files {
        std::fs::write(f, vec![0u8; 4096])?;
    }
    let cfg = run_config(
        &site,
        "run-cuts",
        &[(devs[0].path(), "disk-c1"), (devs[1].path(), "disk-c2")],
        "",
    )?;
    let agent = RunningAgent::start(&cfg, "run-cuts")?;
    agent.bookmark(false)?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _stop = StopOnDrop(done.clone());
    let writer = {
        let files = files.clone();
        let done = done.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let handles = files
                .iter()
                .map(|f| std::fs::OpenOptions::new().write(true).open(f))
                .collect::<Result<Vec<_>, _>>()?;
            let mut seq = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let f = &handles[((seq + 1) % 2) as usize];
                f.write_all_at(&seq.to_le_bytes().repeat(512), 0)?;
                f.sync_data()?;
            }
            Ok(seq)
        })
    };
    let mut ids = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(150));
        ids.push(agent.bookmark(false)?);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().expect("writer thread")?;
    let mut cuts = Vec::new();
    for id in ids {
        ensure!(
            site.point_kind(id)?.as_deref() == Some("crash-consistent"),
            "point {id} is not crash-consistent though both disks' filesystems freeze"
        );
        let mut stamps = Vec::new();
        for (i, disk) in ["disk-c1", "disk-c2"].into_iter().enumerate() {
            let image = site.dir.path().join(format!("cut-{id}-{i}.raw"));
            run_ok(&mut crate_export(&site, disk, id, &image))?;
            let check = site.dir.path().join(format!("check-cut{i}"));
            std::fs::create_dir_all(&check)?;
            run_ok(Command::new("mount").args([
                "-o",
                "ro,loop,noload",
                path(&image),
                path(&check),
            ]))?;
            let _unmount = Unmount(check.clone());
            let block = std::fs::read(check.join("stamp"))?;
            stamps.push(u64::from_le_bytes(block[..8].try_into()?));
        }
        let (hi, lo) = (stamps[0].max(stamps[1]), stamps[0].min(stamps[1]));
        ensure!(
            hi == lo + 1 || hi == 0,
            "point {id} holds stamp {} on the first disk and {} on the second: not one cut",
            stamps[0],
            stamps[1]
        );
        cuts.push(hi);
    }
    eprintln!("points cut at stamps {cuts:?} of {written}");
    ensure!(
        cuts.windows(2).any(|w| w[0] != w[1]),
        "the writer did not move between points: {cuts:?}"
    );
    Ok(())
}

/// A write that fails still counts as dirty (CBT.md: the event carries
/// the whole request with its error): a loop device over a file on a
/// full tmpfs takes part of a request and fails it with ENOSPC, and the
/// device then holds what was taken. The point must hold it too.
#[test]
fn writes_that_fail_part_way_are_replicated_as_they_landed() -> anyhow::Result<()> {
    let site = Site::start()?;
    let small = site.dir.path().join("small");
    std::fs::create_dir_all(&small)?;
    run_ok(Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        "size=8m",
        "tidemark-test",
        path(&small),
    ]))?;
    let _unmount = Unmount(small.clone());
    let dev = LoopDev::create(&small.join("dev.img"), 32 << 20)?;
    let cfg = run_config(&site, "run-enospc", &[(dev.path(), "disk-enospc")], "")?;
    let agent = RunningAgent::start(&cfg, "run-enospc")?;
    agent.bookmark(false)?;
    // 12 MiB of random data into 8 MiB of room, 1 MiB requests: dd fails
    // once the room is gone.
    let out = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", dev.path().display()),
            "bs=1M",
            "count=12",
            "oflag=direct",
            "status=none",
        ])
        .output()?;
    ensure!(
        !out.status.success(),
        "12 MiB fitted into an 8 MiB tmpfs: the test's premise is wrong"
    );
    let id = agent.bookmark(false)?;
    let device = dev.read_all()?;
    ensure!(
        device.iter().any(|&b| b != 0),
        "nothing of the writes landed"
    );
    ensure!(
        site.export("disk-enospc", &id.to_string())? == device,
        "point {id} differs from the device after failed writes (dd: {})",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // Not by way of a resync: with failed writes left out of the trace,
    // the audit found them missing and the disk resynced.
    let log = agent.log();
    ensure!(
        log.matches("resync required").count() == 1,
        "only the initial sync: {log}"
    );
    Ok(())
}

/// Saved state the agent cannot trust: a damaged dirty map, a state file
/// that is not JSON, a state of another boot (as after a reboot). Each
/// restart names why in "resync required", resyncs by checksum (the
/// receiver has the image), and the next point is exact.
#[test]
fn saved_state_that_cannot_be_trusted_is_resynced_with_the_reason() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("st.img"), 64 << 20)?;
    let cfg = run_config(&site, "run-state", &[(dev.path(), "disk-st")], "")?;
    let state_dir = cfg.parent().context("agent dir")?.join("state");
    let mut agent = RunningAgent::start(&cfg, "run-state")?;
    let mut rng = SplitMix64::new(29);
    type Damage = fn(&Path) -> anyhow::Result<()>;
    let cases: [(&str, Damage, &str); 3] = [
        (
            "a damaged dirty map",
            |dir| Ok(std::fs::write(dir.join("disk-st.dirty"), b"not a map")?),
            "saved state unreadable",
        ),
        (
            "a state file that is not JSON",
            |dir| {
                Ok(std::fs::write(
                    dir.join("disk-st.state"),
                    b"{\"disk_id\": ",
                )?)
            },
            "saved state unreadable",
        ),
        (
            "a state of another boot",
            |dir| {
                let file = dir.join("disk-st.state");
                let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
                st["boot_id"] = "00000000-0000-0000-0000-000000000000".into();
                Ok(std::fs::write(&file, serde_json::to_vec(&st)?)?)
            },
            "the machine rebooted",
        ),
    ];
    for (what, damage, reason) in cases {
        churn(&dev, &mut rng, 50)?;
        agent.bookmark(false)?;
        agent.stop()?;
        damage(&state_dir)?;
        churn(&dev, &mut rng, 50)?;
        agent.restart()?;
        let id = agent.bookmark(false)?;
        let log = agent.log();
        ensure!(
            log.contains(&format!("resync required: {reason}"))
                && log.contains("resync by checksum comparison"),
            "after {what}: {log}"
        );
        ensure!(
            site.export("disk-st", &id.to_string())? == dev.read_all()?,
            "point {id} after {what} differs from the device"
        );
    }
    Ok(())
}

/// How often the agent's compression threads were seen under SCHED_IDLE
/// and under SCHED_OTHER (`/proc/PID/task/*/stat`, sampled every 2 ms)
/// while `during` ran.
fn compressor_policies<T>(
    pid: u32,
    during: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(u64, u64, T)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let (mut idle, mut other) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .flatten();
                for t in tasks {
                    let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    if !comm.starts_with("compress-") {
                        continue;
                    }
                    // Field 41, the 39th after the command's parenthesis.
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    let policy = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(38))
                        .and_then(|f| f.parse::<i32>().ok());
                    match policy {
                        Some(nix::libc::SCHED_IDLE) => idle += 1,
                        Some(nix::libc::SCHED_OTHER) => other += 1,
                        _ => {}
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (idle, other)
        }
    });
    let out = during();
    stop.store(true, Ordering::Relaxed);
    let (idle, other) = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    Ok((idle, other, out?))
}

/// `yield_cpu_lag_secs`: while replication keeps up, its compression
/// threads run under SCHED_IDLE; once what is being shipped was written
/// longer ago than the limit (a 24 MiB burst under a send cap of 2 MiB/s
/// here) they are back under SCHED_OTHER, and the point after it is
/// exact.
#[test]
fn replication_yields_the_cpu_while_it_keeps_up_and_competes_when_behind() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("yield.img"), 64 << 20)?;
    let cfg = run_config(
        &site,
        "run-yield",
        &[(dev.path(), "disk-yield")],
        "yield_cpu_lag_secs = 2",
    )?;
    let mut text = std::fs::read_to_string(&cfg)?;
    text.push_str("\n[throttle]\nrate = \"2 MiB/s\"\n");
    std::fs::write(&cfg, text)?;
    let agent = RunningAgent::start(&cfg, "run-yield")?;
    // Points wait for the initial sync: it is over once this returns.
    bookmark_within(&agent, Duration::from_secs(60))?;
    let pid = agent.pid()?;
    let mut rng = SplitMix64::new(77);
    // Half a MiB every half second: each round ships in about a quarter
    // of a second under the cap.
    let (idle, other, ()) = compressor_policies(pid, || {
        for _ in 0..8 {
            churn_bytes(&dev, &mut rng, 512 << 10)?;
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    })?;
    ensure!(
        idle > 0,
        "keeping up, the compressors never ran under SCHED_IDLE ({other} samples under SCHED_OTHER): {}",
        agent.log()
    );
    // 24 MiB at 2 MiB/s: about 12 s of shipping. From 4 s in, past the
    // limit and a piece or two later, the compressors compete.
    churn_bytes(&dev, &mut rng, 24 << 20)?;
    std::thread::sleep(Duration::from_secs(4));
    let (idle, other, ()) = compressor_policies(pid, || {
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    })?;
    ensure!(
        idle == 0 && other > 0,
        "behind, the compressors were seen {idle} times under SCHED_IDLE and {other} under SCHED_OTHER: {}",
        agent.log()
    );
    let id = bookmark_within(&agent, Duration::from_secs(60))?;
    ensure!(
        site.export("disk-yield", &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    Ok(())
}

/// Without CAP_SYS_NICE and with an RLIMIT_NICE of 0, a thread under
/// SCHED_IDLE could not come back: the agent says so once, naming the
/// fix, and its threads never yield (replication never starves).
#[test]
fn without_the_right_to_come_back_replication_does_not_yield_and_says_why() -> anyhow::Result<()> {
    require_cmd("setpriv")?;
    require_cmd("prlimit")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("noyield.img"), 64 << 20)?;
    let cfg = run_config(&site, "run-noyield", &[(dev.path(), "disk-noyield")], "")?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-sys_nice", "prlimit", "--nice=0:0"])
        .arg(workspace_bin("tidemark-agent"))
        .args(["run", "--config", path(&cfg)]);
    let agent = RunningAgent {
        daemon: Some(Daemon::spawn(cmd)?),
        cfg: cfg.clone(),
        instance: PathBuf::from("/sys/kernel/tracing/instances/tidemark-run-noyield"),
    };
    agent.wait_for_log("replicating", Duration::from_secs(30))?;
    let log = agent.log();
    ensure!(
        log.contains("yield_cpu_lag_secs = 5: cannot give a thread back its priority")
            && log.contains("LimitNICE=+5"),
        "no word on why replication does not yield: {log}"
    );
    bookmark_within(&agent, Duration::from_secs(60))?;
    let mut rng = SplitMix64::new(78);
    let (idle, other, id) = compressor_policies(agent.pid()?, || {
        for _ in 0..6 {
            churn_bytes(&dev, &mut rng, 1 << 20)?;
            std::thread::sleep(Duration::from_millis(300));
        }
        agent.bookmark(false)
    })?;
    ensure!(
        idle == 0 && other > 0,
        "compressors seen {idle} times under SCHED_IDLE, {other} under SCHED_OTHER"
    );
    ensure!(
        site.export("disk-noyield", &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    Ok(())
}

/// `bytes` of random data in 64 KiB writes at random places.
fn churn_bytes(dev: &LoopDev, rng: &mut SplitMix64, bytes: usize) -> anyhow::Result<()> {
    let slots = dev.size_bytes() / (64 << 10);
    for _ in 0..bytes / (64 << 10) {
        let at = (rng.next_u64() % slots) * (64 << 10);
        dev.write_at(at, &random_block(rng, 64 << 10))?;
    }
    Ok(())
}

/// A machine that keeps every CPU busy does not starve replication: its
/// threads yield only until what they ship is `yield_cpu_lag_secs`
/// behind, then compete, and the run loop, which drains the tracer,
/// never yields. Two busy loops per CPU at the agent's own priority,
/// 64 MiB of random writes: the point holding them comes within 40 s
/// (3-12 s here), with no event lost. Yielding for good took 10-19 s
/// here, not much longer: random data goes uncompressed, and most of
/// its CPU is the receiver's and the kernel's, which do not yield.
#[test]
fn busy_cpus_do_not_starve_replication() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("busy-cpus.img"), 128 << 20)?;
    let cfg = run_config(
        &site,
        "run-busy-cpus",
        &[(dev.path(), "disk-busy-cpus")],
        "",
    )?;
    let agent = RunningAgent::start(&cfg, "run-busy-cpus")?;
    bookmark_within(&agent, Duration::from_secs(60))?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // Stopped on the way out however the test ends.
    struct Stop(std::sync::Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = Stop(stop.clone());
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let loops: Vec<_> = (0..2 * cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let mut rng = SplitMix64::new(79);
    churn_bytes(&dev, &mut rng, 64 << 20)?;
    let begun = std::time::Instant::now();
    let id = bookmark_within(&agent, Duration::from_secs(40));
    let took = begun.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.join();
    }
    let id = id?;
    eprintln!("point after 64 MiB under busy CPUs: {took:?}");
    ensure!(
        site.export("disk-busy-cpus", &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    let log = agent.log();
    ensure!(
        log.matches("resync required").count() == 1,
        "events lost under busy CPUs: {log}"
    );
    Ok(())
}
