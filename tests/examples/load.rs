//! Load: eight `tidemark-agent run` on sparse-file loop devices replicating
//! into one receiver at once, with mixed churn. Prints the receiver's
//! throughput, CPU and memory, each agent's memory, per-disk RPO (p50,
//! p99, max, sampled every second from `status --json`), and checks that
//! every disk's final point exports exactly what the device holds.
//!
//! As root: `cargo run -p tidemark-tests --example load` (env
//! `LOAD_SECS`, default 60; `LOAD_DISK_MIB`, default 128). Not a test:
//! the figures are for docs/RELIABILITY.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::Site;
use tidemark_tests::{LoopDev, SplitMix64};

const AGENTS: usize = 8;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (utime + stime in clock ticks, VmRSS bytes, VmHWM bytes).
fn proc_figures(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks, kib("VmRSS:") << 10, kib("VmHWM:") << 10))
}

/// Bytes the process read (sockets included) and wrote, from /proc/pid/io.
fn proc_io(pid: u32) -> anyhow::Result<(u64, u64)> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let get = |k: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((get("rchar:"), get("wchar:")))
}

/// Churn profile of disk i: heavy sequential, medium random, light random.
fn churn(
    dev_path: std::path::PathBuf,
    size: u64,
    i: usize,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dev_path)?;
    let mut rng = SplitMix64::new(1000 + i as u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut seq_at = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let (len, at, pause) = match i % 4 {
            // Heavy: 1 MiB sequential, about 10 MiB/s.
            0 => {
                let at = seq_at;
                seq_at = (seq_at + (1 << 20)) % size;
                (1 << 20, at, Duration::from_millis(100))
            }
            // Medium: 4–64 KiB random, about 2 MiB/s.
            1 | 2 => {
                let len = 4096 * (1 + rng.below(16)) as usize;
                (
                    len,
                    rng.below((size - len as u64) / 4096) * 4096,
                    Duration::from_millis(15),
                )
            }
            // Light: 4 KiB now and then.
            _ => (
                4096,
                rng.below(size / 4096) * 4096,
                Duration::from_millis(50),
            ),
        };
        rng.fill_bytes(&mut buf[..len]);
        f.write_all_at(&buf[..len], at)?;
        f.sync_data()?;
        written.fetch_add(len as u64, Ordering::SeqCst);
        std::thread::sleep(pause);
    }
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let secs = env_u64("LOAD_SECS", 60);
    let disk_bytes = env_u64("LOAD_DISK_MIB", 128) << 20;
    let site = Site::start()?;
    let rx_pid = site.receiver.pid();
    let mut devs = Vec::new();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let dev = LoopDev::create(&site.dir.path().join(format!("load{i}.img")), disk_bytes)?;
        let cfg = run_config(
            &site,
            &format!("load-{i}"),
            &[(dev.path(), &format!("disk-{i}"))],
            "",
        )?;
        // A crash-consistent point every 5 s: the RPO sampled below.
        let text = std::fs::read_to_string(&cfg)?;
        std::fs::write(
            &cfg,
            text.replace(
                "crash_consistent_interval_secs = 0",
                "crash_consistent_interval_secs = 5",
            ),
        )?;
        devs.push(dev);
        agents.push(RunningAgent::start(&cfg, &format!("load-{i}"))?);
    }
    // The initial syncs (sparse devices: zeros only) end in a point each.
    for a in &agents {
        a.bookmark(false)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let written: Vec<Arc<AtomicU64>> = (0..AGENTS).map(|_| Arc::default()).collect();
    let threads: Vec<_> = (0..AGENTS)
        .map(|i| {
            let (p, s, w) = (
                devs[i].path().to_path_buf(),
                stop.clone(),
                written[i].clone(),
            );
            std::thread::spawn(move || churn(p, disk_bytes, i, s, w))
        })
        .collect();
    let (ticks0, _, _) = proc_figures(rx_pid)?;
    let (rchar0, wchar0) = proc_io(rx_pid)?;
    let started = Instant::now();
    let mut rpo: Vec<Vec<f64>> = vec![Vec::new(); AGENTS];
    let mut rx_rss_peak = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        let st = site.status_json()?;
        for d in st["disks"].as_array().into_iter().flatten() {
            let id = d["id"].as_str().unwrap_or("");
            if let (Some(i), Some(r)) = (
                id.strip_prefix("disk-")
                    .and_then(|n| n.parse::<usize>().ok()),
                d["rpo_seconds"].as_f64(),
            ) {
                rpo[i].push(r);
            }
        }
        rx_rss_peak = rx_rss_peak.max(proc_figures(rx_pid)?.1);
    }
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("churn panicked"))??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (ticks1, _, rx_hwm) = proc_figures(rx_pid)?;
    let (rchar1, wchar1) = proc_io(rx_pid)?;
    let tick_hz = 100.0;
    let total_written: u64 = written.iter().map(|w| w.load(Ordering::SeqCst)).sum();
    println!(
        "{AGENTS} agents, {} MiB disks, {secs} s of churn, {} MiB written to the devices",
        disk_bytes >> 20,
        total_written >> 20
    );
    println!(
        "receiver: read {:.1} MiB/s (sockets and image reads), wrote {:.1} MiB/s (images and undo journal), CPU {:.0} % of one core, RSS peak {} MiB, HWM {} MiB",
        (rchar1 - rchar0) as f64 / elapsed / 1048576.0,
        (wchar1 - wchar0) as f64 / elapsed / 1048576.0,
        (ticks1 - ticks0) as f64 / tick_hz / elapsed * 100.0,
        rx_rss_peak >> 20,
        rx_hwm >> 20
    );
    let mut worst_p99: f64 = 0.0;
    for (i, a) in agents.iter().enumerate() {
        let pid = a.daemon.as_ref().context("agent")?.pid();
        let (ticks, rss, hwm) = proc_figures(pid)?;
        let p50 = percentile(&mut rpo[i], 0.5);
        let p99 = percentile(&mut rpo[i], 0.99);
        let max = rpo[i].iter().copied().fold(0.0, f64::max);
        worst_p99 = worst_p99.max(p99);
        println!(
            "disk-{i} ({}): churned {} MiB, RPO p50 {p50:.0} s p99 {p99:.0} s max {max:.0} s; agent CPU {:.1} s, RSS {} MiB, HWM {} MiB",
            ["heavy", "medium", "medium", "light"][i % 4],
            written[i].load(Ordering::SeqCst) >> 20,
            ticks as f64 / tick_hz,
            rss >> 20,
            hwm >> 20
        );
    }
    // Nothing lost: every disk's final point is the device byte for byte.
    let t = Instant::now();
    for (i, (a, dev)) in agents.iter().zip(&devs).enumerate() {
        let id = a.bookmark(false)?;
        let exported = site.export(&format!("disk-{i}"), &id.to_string())?;
        ensure!(exported == dev.read_all()?, "disk-{i}: point {id} differs");
    }
    println!(
        "final points of all {AGENTS} disks taken and export-compared in {:.1} s: identical",
        t.elapsed().as_secs_f64()
    );
    // Starved: a disk whose points stopped coming (points every 5 s).
    ensure!(worst_p99 < 60.0, "an agent starved: RPO p99 {worst_p99} s");
    Ok(())
}
