//! How much the tracker costs under load: fio random 4 KiB writes on a
//! loop device while a thread drains the trace instance every 100 ms and
//! marks a dirty map, as the run loop does. Prints events handled, the
//! drain thread's CPU time and the audit against the block layer.
//!
//! Needs root and `fio` (apt-get install -y fio):
//!
//! ```text
//! cargo run --release -p tidemark-agent --example tracking_bench -- \
//!     --seconds 10 --jobs 1 --backing-dir /dev/shm
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tidemark_agent::tracking::{
    disk_counters, granularity_for, DirtyMap, TrackedDisk, Tracker, TRACEFS_ROOT,
};

#[derive(Parser, Debug)]
struct Args {
    /// fio run time.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// fio jobs, each at --iodepth.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    #[arg(long, default_value_t = 64)]
    iodepth: u32,
    /// Loop device size.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Where the loop device's backing file goes (/dev/shm: the CPU is the
    /// limit, not the disk).
    #[arg(long, default_value = "/dev/shm")]
    backing_dir: PathBuf,
    /// Ring buffer per CPU.
    #[arg(long, default_value_t = 4096)]
    buffer_kb: u32,
    /// Drain interval.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
}

/// Detaches the loop device and deletes its file on drop.
struct Loop {
    dev: PathBuf,
    backing: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Removes the trace instance on drop (after the Tracker closed its pipes).
struct Instance(PathBuf);

impl Drop for Instance {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// CPU time of the calling thread, in ns (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct DrainStats {
    drains: u64,
    events: u64,
    ranges: u64,
    sectors: u64,
    lost: Vec<String>,
    cpu_ns: u64,
    wall_max: Duration,
    wall_total: Duration,
    dirty_bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop devices, tracefs)");
    }
    let backing = args
        .backing_dir
        .join(format!("tidemark-bench-{}.img", std::process::id()));
    let size = args.size_mib << 20;
    std::fs::File::create(&backing)
        .and_then(|f| f.set_len(size))
        .with_context(|| format!("create {}", backing.display()))?;
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .context("run losetup")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&backing);
        bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let lo = Loop {
        dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        backing,
    };
    let name = lo
        .dev
        .file_name()
        .and_then(|n| n.to_str())
        .context("device name")?
        .to_owned();
    let dev_no = std::fs::read_to_string(Path::new("/sys/block").join(&name).join("dev"))?;
    let sysfs = PathBuf::from(format!("/sys/dev/block/{}", dev_no.trim()));
    let disk = TrackedDisk::from_sysfs(0, &sysfs, size)?;

    let inst_name = format!("tidemark-bench-{}", std::process::id());
    let _inst = Instance(Path::new(TRACEFS_ROOT).join("instances").join(&inst_name));
    let (tracker, _) = Tracker::open(&inst_name, vec![disk], args.buffer_kb)?;
    let (w0, d0) = disk_counters(&sysfs)?;

    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_millis(args.interval_ms);
    let drainer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<DrainStats> {
            let mut t = tracker;
            let mut map = DirtyMap::new(size, granularity_for(size));
            let mut s = DrainStats::default();
            let cpu0 = thread_cpu_ns();
            loop {
                let last = stop.load(Ordering::Acquire);
                let started = Instant::now();
                let d = t.drain()?;
                for r in d.ranges.iter().flatten() {
                    map.mark(r.clone());
                }
                let wall = started.elapsed();
                s.drains += 1;
                s.events += d.events;
                s.ranges += d.ranges.iter().map(Vec::len).sum::<usize>() as u64;
                s.sectors += d.sectors_seen.iter().sum::<u64>();
                s.wall_total += wall;
                s.wall_max = s.wall_max.max(wall);
                if let Some(l) = d.lost {
                    s.lost.push(l);
                }
                if last {
                    break;
                }
                std::thread::sleep(interval.saturating_sub(wall));
            }
            s.cpu_ns = thread_cpu_ns() - cpu0;
            s.dirty_bytes = map.dirty_bytes();
            t.remove()?;
            Ok(s)
        })
    };

    let fio_started = Instant::now();
    let fio = Command::new("fio")
        .args([
            "--name=tidemark-bench",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--time_based",
            "--group_reporting",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", lo.dev.display()))
        .arg(format!("--iodepth={}", args.iodepth))
        .arg(format!("--numjobs={}", args.jobs))
        .arg(format!("--runtime={}", args.seconds))
        .output()
        .context("run fio (apt-get install -y fio)")?;
    let fio_wall = fio_started.elapsed();
    // Let the last completions land, then one final drain.
    std::thread::sleep(Duration::from_millis(200));
    let (w1, d1) = disk_counters(&sysfs)?;
    stop.store(true, Ordering::Release);
    let s = drainer.join().expect("drain thread")?;
    if !fio.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&fio.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&fio.stdout).context("fio JSON output")?;
    let write = &json["jobs"][0]["write"];
    let total_ios = write["total_ios"].as_u64().unwrap_or(0);
    let iops = write["iops"].as_f64().unwrap_or(0.0);
    let counted = (w1 - w0) + (d1 - d0);
    let secs = fio_wall.as_secs_f64();

    println!(
        "fio randwrite 4k, {} job(s) x iodepth {}, {} s, loop on {}",
        args.jobs,
        args.iodepth,
        args.seconds,
        args.backing_dir.display()
    );
    println!("  fio: {total_ios} I/Os, {iops:.0} IOPS");
    println!(
        "  tracker: {} events in {} drains ({:.0} events/s), {} ranges, dirty {} MiB of {} MiB",
        s.events,
        s.drains,
        s.events as f64 / secs,
        s.ranges,
        s.dirty_bytes >> 20,
        size >> 20
    );
    println!(
        "  audit: traced {} sectors, block layer counted {counted} -> {}",
        s.sectors,
        if s.sectors == counted {
            "equal"
        } else {
            "MISMATCH"
        }
    );
    println!(
        "  drain thread CPU: {:.3} s over {secs:.1} s ({:.2}% of one CPU), {:.0} ns per event",
        s.cpu_ns as f64 / 1e9,
        s.cpu_ns as f64 / 1e9 / secs * 100.0,
        s.cpu_ns as f64 / s.events.max(1) as f64
    );
    println!(
        "  drain wall time: mean {:.2} ms, max {:.2} ms",
        s.wall_total.as_secs_f64() * 1e3 / s.drains.max(1) as f64,
        s.wall_max.as_secs_f64() * 1e3
    );
    match s.lost.first() {
        None => println!("  lost: none"),
        Some(l) => println!("  lost: {} drain(s), first: {l}", s.lost.len()),
    }
    Ok(())
}
