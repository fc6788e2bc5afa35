//! Power cuts on the master target, after every sync of a workload.
//!
//! The receiver's retention journal and images live on two ext4 volumes
//! (loop devices) whose backing files sit on XFS. A reflink copy of those
//! files is what the volumes would hold if the power went at that instant:
//! everything fsync'd, and of the rest only what writeback happened to
//! flush (in a test this short, almost nothing). `serve` runs with
//! faultfs, which stops the whole process right after its Nth fsync; the
//! test copies the volumes then, kills the receiver, and starts a new one
//! on the copies. N goes over every sync the workload makes, from the
//! receiver's start to the agent's point, until a run finishes without
//! reaching N.
//!
//! The workload is scripted on the wire (a raw protocol client): writes,
//! a write-zeroes and a point, three times, each message acknowledged
//! before the next is sent, so at any instant at most one is in flight.
//! After each cut: the image holds every acknowledged write (and of the
//! one in flight, all or some or none); the point taken before the
//! workload and every point the client was told about export exactly,
//! and a point listed that the client was not told about is the one in
//! flight and exports what it should; the image passes `qemu-img check`;
//! and the real agent's next sync converges.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use std::sync::{Arc, Mutex};

use tidemark_common::proto::messages::Extent;
use tidemark_common::proto::{Message, PointKind, SumKind};
use tidemark_tests::raw;
use tidemark_tests::site::{agent_sync, path, point_id, run_ok, Site};
use tidemark_tests::{
    faultfs_library, fill_mixed, require_cmd, Daemon, LoopDev, SplitMix64, Volume,
};

/// The receiver's two data directories, each an ext4 volume whose backing
/// file is on the XFS volume.
struct Storage {
    site_dir: PathBuf,
    xfs: Volume,
}

const VOLUMES: [&str; 2] = ["retention", "images"];

impl Storage {
    fn backing(&self, volume: &str, copy: &str) -> PathBuf {
        self.xfs.dir().join(format!("{volume}.{copy}.img"))
    }

    /// Mounts copy `copy` of both volumes at the site's directories.
    fn mount(&self, copy: &str) -> anyhow::Result<Vec<Volume>> {
        VOLUMES
            .iter()
            .map(|v| {
                let dev = LoopDev::attach(&self.backing(v, copy))?;
                Volume::mount(dev, &self.site_dir.join(v))
            })
            .collect()
    }

    /// Copies `from` to `to` for both volumes, each copy atomic.
    fn copy(&self, from: &str, to: &str) -> anyhow::Result<()> {
        for v in VOLUMES {
            run_ok(Command::new("cp").args([
                "--reflink=always",
                path(&self.backing(v, from)),
                path(&self.backing(v, to)),
            ]))?;
        }
        Ok(())
    }

    fn remove(&self, copy: &str) -> anyhow::Result<()> {
        for v in VOLUMES {
            std::fs::remove_file(self.backing(v, copy))?;
        }
        Ok(())
    }
}

/// The process state letter from /proc (`T`: stopped).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// One message of the scripted workload.
enum Step {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Point,
}

const DISK_BYTES: u64 = 16 << 20;

/// Three rounds of four writes (random and compressible data, up to
/// 64 KiB, overlapping earlier ones at times), a fifth over half of the
/// round's first and past it (the receiver journals only the half not yet
/// journaled since the point: cut anywhere, the point must still export),
/// a write-zeroes and a point.
fn script(seed: u64) -> Vec<Step> {
    let mut rng = SplitMix64::new(seed);
    let mut steps = Vec::new();
    let place = |rng: &mut SplitMix64, max_blocks: u64| {
        let len = (1 + rng.below(max_blocks)) * 4096;
        (rng.below((DISK_BYTES - len) / 4096) * 4096, len)
    };
    for _ in 0..3 {
        let mut first = None;
        for i in 0..4 {
            let (offset, len) = place(&mut rng, 16);
            first.get_or_insert((offset, len));
            let mut data = vec![0u8; len as usize];
            if i % 2 == 0 {
                rng.fill_bytes(&mut data);
            } else {
                data.fill(rng.next_u64() as u8 | 1);
            }
            steps.push(Step::Write { offset, data });
        }
        let (at, len) = first.expect("four writes");
        let offset = (at + len / 2 / 4096 * 4096).min(DISK_BYTES - len);
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        steps.push(Step::Write { offset, data });
        let (offset, len) = place(&mut rng, 8);
        steps.push(Step::Zero { offset, len });
        steps.push(Step::Point);
    }
    steps
}

/// The disk after `steps`, from `base`.
fn after(base: &[u8], steps: &[Step]) -> Vec<u8> {
    let mut disk = base.to_vec();
    for step in steps {
        match step {
            Step::Write { offset, data } => {
                disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
            }
            Step::Zero { offset, len } => disk[*offset as usize..(*offset + *len) as usize].fill(0),
            Step::Point => {}
        }
    }
    disk
}

/// How far the client got: steps acknowledged (a prefix), and the points
/// it was told about, by step index.
#[derive(Default)]
struct Progress {
    acked: usize,
    points: Vec<(usize, u64)>,
}

/// Sends the script on one connection, each step after the previous one's
/// answer, recording progress as answers come. Ends at the first error
/// (the receiver stopped or killed).
async fn run_script(
    addr: std::net::SocketAddr,
    agent_dir: &Path,
    steps: &[Step],
    progress: &Mutex<Progress>,
) -> anyhow::Result<()> {
    let mut s = raw::hello(addr, agent_dir, AGENT).await?;
    let disk = raw::register(&mut s, DISK, DISK_BYTES).await?;
    for (i, step) in steps.iter().enumerate() {
        let seq = i as u64 + 1;
        let message = match step {
            Step::Write { offset, data } => Message::Extent(Extent::pack(
                seq,
                disk,
                *offset,
                data,
                SumKind::Crc32c,
                None,
            )),
            Step::Zero { offset, len } => Message::Zero {
                seq,
                disk,
                offset_bytes: *offset,
                len_bytes: *len,
            },
            Step::Point => Message::Point {
                seq,
                kind: PointKind::CrashConsistent,
                name: String::new(),
                agent_time_ms: 1,
            },
        };
        raw::send(&mut s, &message).await?;
        loop {
            match raw::recv(&mut s).await? {
                Some(Message::Ack { seq: a }) if a >= seq && !matches!(step, Step::Point) => break,
                Some(Message::PointRecorded { point_id, .. }) => {
                    progress
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .points
                        .push((i, point_id));
                    break;
                }
                Some(Message::Ack { .. } | Message::Heartbeat { .. }) => {}
                other => bail!("step {i}: {other:?}"),
            }
        }
        progress
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .acked = i + 1;
    }
    Ok(())
}

const AGENT: &str = "agent-pc";
const DISK: &str = "disk-pc";

/// Starts `serve` stopping after its sync `n` and runs the script against
/// it. Returns whether the receiver stopped (the cut) and the client's
/// thread, if it started.
fn run_until_sync(
    site: &mut Site,
    agent_dir: &Path,
    steps: &Arc<Vec<Step>>,
    progress: &Arc<Mutex<Progress>>,
    n: u64,
) -> anyhow::Result<(bool, Option<std::thread::JoinHandle<()>>)> {
    let mut cmd = site.serve_command();
    cmd.env("LD_PRELOAD", faultfs_library())
        .env("TIDEMARK_FAULT_STOP_AT_SYNC", n.to_string());
    site.receiver = Daemon::spawn(cmd)?;
    let pid = site.receiver.pid();
    let stopped = || process_state(pid) == Some('T');
    let deadline = Instant::now() + Duration::from_secs(60);
    while !site.receiver.log().contains("listening on") {
        if stopped() {
            return Ok((true, None));
        }
        if let Some(status) = site.receiver.try_wait()? {
            bail!("serve exited ({status}): {}", site.receiver.log());
        }
        ensure!(
            Instant::now() < deadline,
            "serve did not start: {}",
            site.receiver.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let client = {
        let (addr, dir) = (site.addr, agent_dir.to_path_buf());
        let (steps, progress) = (Arc::clone(steps), Arc::clone(progress));
        std::thread::spawn(move || {
            if let Err(e) = raw::block_on(run_script(addr, &dir, &steps, &progress)) {
                eprintln!("client: {e:#}");
            }
        })
    };
    loop {
        if stopped() {
            return Ok((true, Some(client)));
        }
        if client.is_finished() {
            // The session's end may sync once more.
            std::thread::sleep(Duration::from_millis(300));
            return Ok((stopped(), Some(client)));
        }
        ensure!(
            Instant::now() < deadline,
            "the receiver neither stopped nor let the client finish"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Checks what a receiver restarted after a cut holds, given how far the
/// client got; `base` is the disk at `base_point`.
fn check_after_cut(
    site: &Site,
    steps: &[Step],
    progress: &Progress,
    base: &[u8],
    base_point: u64,
) -> anyhow::Result<()> {
    let acked = after(base, &steps[..progress.acked]);
    let in_flight = after(base, &steps[..(progress.acked + 1).min(steps.len())]);
    let image = std::fs::read(site.image(DISK))?;
    ensure!(
        image.len() == acked.len(),
        "the image is {} bytes",
        image.len()
    );
    if let Some(i) = (0..image.len()).find(|&i| image[i] != acked[i] && image[i] != in_flight[i]) {
        bail!(
            "byte {i} of the image is {:#x}: acknowledged {:#x} (after {} steps)",
            image[i],
            acked[i],
            progress.acked
        );
    }
    ensure!(
        site.export(DISK, &base_point.to_string())? == base,
        "the base point {base_point} changed"
    );
    for p in site.listed_point_ids()? {
        if p == base_point {
            continue;
        }
        let step = match progress.points.iter().find(|(_, id)| *id == p) {
            Some((step, _)) => *step,
            // Recorded, but the answer never left: the step in flight.
            None if matches!(steps.get(progress.acked), Some(Step::Point)) => progress.acked,
            None => bail!("point {p} is listed but was never taken"),
        };
        ensure!(
            site.export(DISK, &p.to_string())? == after(base, &steps[..step]),
            "point {p} (step {step}) differs"
        );
    }
    let listed = site.listed_point_ids()?;
    if let Some((_, p)) = progress.points.iter().find(|(_, p)| !listed.contains(p)) {
        bail!("point {p}, reported durable, is gone");
    }
    let descriptor = site.dir.path().join(format!("images/{DISK}.vmdk"));
    run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(&descriptor)]))?;
    Ok(())
}

#[test]
fn a_power_cut_after_any_sync_loses_nothing_acknowledged() -> anyhow::Result<()> {
    require_cmd("mkfs.xfs")?;
    let mut site = Site::start()?;
    site.receiver.kill();
    let xfs_dev = LoopDev::create(&site.dir.path().join("xfs.img"), 1 << 30)?;
    xfs_dev.mkfs_xfs()?;
    let storage = Storage {
        site_dir: site.dir.path().to_path_buf(),
        xfs: Volume::mount(xfs_dev, &site.dir.path().join("xfs"))?,
    };
    for v in VOLUMES {
        std::fs::remove_dir_all(site.dir.path().join(v))?;
        LoopDev::create(&storage.backing(v, "base"), 64 << 20)?.mkfs_ext4()?;
    }

    // The base: a first full copy and point by the real agent, on volumes
    // then set aside.
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), DISK_BYTES)?;
    fill_mixed(&dev, 31)?;
    let cfg = site.agent(AGENT, site.addr, &[(dev.path(), DISK)])?;
    let agent_dir = cfg.parent().context("agent dir")?.to_path_buf();
    let base_point = {
        let _mounted = storage.mount("base")?;
        site.restart_receiver()?;
        let p = point_id(&agent_sync(&cfg, &[]))?;
        site.receiver.kill();
        p
    };
    let base = dev.read_all()?;
    let steps = Arc::new(script(tidemark_tests::seed(31)));
    let end = after(&base, &steps);

    let mut cuts = 0u64;
    let mut told = 0;
    for n in 1.. {
        ensure!(n < 2000, "the workload never finished");
        storage.copy("base", "run")?;
        let progress = Arc::new(Mutex::new(Progress::default()));
        let cut = {
            let _mounted = storage.mount("run")?;
            let (cut, client) = run_until_sync(&mut site, &agent_dir, &steps, &progress, n)?;
            if cut {
                // The power goes now.
                storage.copy("run", "cut")?;
            }
            site.receiver.kill();
            if let Some(client) = client {
                client
                    .join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
            }
            cut
        };
        storage.remove("run")?;
        let progress = progress.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if !cut {
            ensure!(
                progress.acked == steps.len(),
                "the uncut run stopped after {} of {} steps",
                progress.acked,
                steps.len()
            );
            break;
        }
        cuts += 1;
        told += progress.points.len();

        // The power is back: a receiver on what the volumes held.
        let mounted = storage.mount("cut")?;
        site.restart_receiver()
            .with_context(|| format!("restart after the cut at sync {n}"))?;
        check_after_cut(&site, &steps, &progress, &base, base_point)
            .with_context(|| format!("cut after sync {n}"))?;
        dev.write_at(0, &end)?;
        let p = point_id(&agent_sync(&cfg, &[]))
            .with_context(|| format!("sync after the cut at sync {n}"))?;
        ensure!(
            site.export(DISK, &p.to_string())? == end,
            "cut after sync {n}: the sync after it did not converge"
        );
        site.receiver.kill();
        drop(mounted);
        storage.remove("cut")?;
    }
    eprintln!(
        "{cuts} power cuts, one after each sync of the workload; {told} points had been reported durable before them (all trials together), each checked"
    );
    ensure!(
        cuts as usize > steps.len(),
        "only {cuts} syncs for {} steps: the cuts missed the workload",
        steps.len()
    );
    Ok(())
}
