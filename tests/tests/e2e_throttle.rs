//! Bandwidth throttling end to end on loop devices: the send cap holds the
//! average rate through a real TLS connection (measured by the proxy in
//! front of the receiver), the read cap holds the rate the block layer
//! counts for the device, and time-of-day windows pick the cap in `run`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{agent_sync, point_id, Site};
use tidemark_tests::{CountingProxy, LoopDev, SplitMix64};

const MIB: u64 = 1 << 20;

/// Samples a byte counter every few ms until dropped, so a rate can be
/// measured over a whole transfer.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Instant, u64)>>>,
}

impl Sampler {
    fn start(read: impl Fn() -> u64 + Send + 'static) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    out.push((Instant::now(), read()));
                    std::thread::sleep(Duration::from_millis(5));
                }
                out.push((Instant::now(), read()));
                out
            }
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("sampler thread")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The average rate of a transfer: every byte counted after `base`,
/// from the last sample before the first of them to the first sample
/// holding the last. Returns (bytes, seconds).
fn transfer(samples: &[(Instant, u64)], base: u64, end: u64) -> anyhow::Result<(u64, f64)> {
    let start = samples
        .iter()
        .rev()
        .find(|(_, b)| *b <= base)
        .context("no sample before the transfer")?
        .0;
    let done = samples
        .iter()
        .find(|(_, b)| *b >= end)
        .context("no sample after the transfer")?
        .0;
    Ok((end - base, (done - start).as_secs_f64()))
}

fn assert_within_10_percent(what: &str, bytes: u64, secs: f64, cap: u64) {
    let rate = bytes as f64 / secs;
    let ratio = rate / cap as f64;
    eprintln!(
        "{what}: {bytes} bytes in {secs:.2} s = {:.3} MiB/s against a cap of {:.3} MiB/s ({:+.1} %)",
        rate / MIB as f64,
        cap as f64 / MIB as f64,
        (ratio - 1.0) * 100.0
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: {rate:.0} B/s is not within 10 % of the cap {cap} B/s"
    );
}

fn random_fill(dev: &LoopDev, seed: u64, len: u64) -> anyhow::Result<()> {
    let mut rng = SplitMix64::new(seed);
    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    dev.write_at(0, &data)
}

fn append(cfg: &Path, text: &str) -> anyhow::Result<()> {
    let mut s = std::fs::read_to_string(cfg)?;
    s.push_str(text);
    std::fs::write(cfg, s)?;
    Ok(())
}

/// Local (hour, minute) as the agent sees it (same machine, same zone).
fn local_hour_minute() -> anyhow::Result<(u32, u32)> {
    let out = Command::new("date").arg("+%H %M").output()?;
    let text = String::from_utf8(out.stdout)?;
    let mut it = text.split_whitespace().map(str::parse::<u32>);
    match (it.next(), it.next()) {
        (Some(Ok(h)), Some(Ok(m))) => Ok((h, m)),
        _ => anyhow::bail!("date printed {text:?}"),
    }
}

/// A window every day from `from_h` hours after now to `to_h` hours after
/// now (negative: before), wrapping midnight as needed.
fn window(from_h: i32, to_h: i32, rate: &str) -> anyhow::Result<String> {
    let (h, m) = local_hour_minute()?;
    let at = |d: i32| format!("{:02}:{m:02}", (h as i32 + d).rem_euclid(24));
    Ok(format!(
        "\n[[throttle.window]]\nfrom = \"{}\"\nto = \"{}\"\nrate = \"{rate}\"\n",
        at(from_h),
        at(to_h)
    ))
}

#[test]
fn throttle_holds_the_average_send_rate_within_10_percent_of_the_cap() -> anyhow::Result<()> {
    let site = Site::start()?;
    let size = 16 * MIB;
    let dev = LoopDev::create(&site.dir.path().join("thr.img"), size)?;
    random_fill(&dev, 7, size)?;
    let proxy = CountingProxy::start(site.addr)?;
    let cfg = site.agent("agent-thr", proxy.addr(), &[(dev.path(), "disk-thr")])?;
    let cap = 2 * MIB;
    append(&cfg, "\n[throttle]\nrate = \"2 MiB/s\"\n")?;

    let proxy = Arc::new(proxy);
    let sampler = Sampler::start({
        let p = proxy.clone();
        move || p.bytes_up()
    });
    let out = agent_sync(&cfg, &[]);
    let samples = sampler.finish();
    let id = point_id(&out)?;
    let end = proxy.bytes_up();
    ensure!(
        end >= size,
        "only {end} bytes went up for {size} bytes of random data"
    );
    let (bytes, secs) = transfer(&samples, 0, end)?;
    assert_within_10_percent("sync", bytes, secs, cap);
    ensure!(
        site.export("disk-thr", &id.to_string())? == dev.read_all()?,
        "the throttled copy differs from the device"
    );
    Ok(())
}

/// Sectors read from a block device, as the block layer counts them.
fn sectors_read(dev: &Path) -> u64 {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or("");
    std::fs::read_to_string(format!("/sys/block/{name}/stat"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|f| f.parse().ok()))
        .unwrap_or(0)
}

#[test]
fn sync_read_rate_caps_what_sync_reads_from_the_disk() -> anyhow::Result<()> {
    let site = Site::start()?;
    // Zeros: they travel as zero records, so only the reads are limited.
    let size = 64 * MIB;
    let dev = LoopDev::create(&site.dir.path().join("rd.img"), size)?;
    let cfg = site.agent("agent-rd", site.addr, &[(dev.path(), "disk-rd")])?;
    let cap = 16 * MIB;
    append(&cfg, "\n[throttle]\nsync_read_rate = \"16 MiB/s\"\n")?;

    let base = sectors_read(dev.path()) * 512;
    let sampler = Sampler::start({
        let d = dev.path().to_path_buf();
        move || sectors_read(&d) * 512
    });
    let out = agent_sync(&cfg, &[]);
    let samples = sampler.finish();
    point_id(&out)?;
    let end = sectors_read(dev.path()) * 512;
    ensure!(
        end - base >= size,
        "the block layer counted {} bytes read, the disk has {size}",
        end - base
    );
    let (bytes, secs) = transfer(&samples, base, end)?;
    assert_within_10_percent("sync reads", bytes, secs, cap);
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !log.contains("WARN"),
        "a throttled sync warned about something: {log}"
    );
    Ok(())
}

#[test]
fn a_window_covering_now_sets_the_cap_in_run_and_one_that_does_not_leaves_it() -> anyhow::Result<()>
{
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("win.img"), 16 * MIB)?;
    let proxy = CountingProxy::start(site.addr)?;
    let cfg = run_config(&site, "run-win", &[(dev.path(), "disk-win")], "")?;
    let text: String = std::fs::read_to_string(&cfg)?
        .lines()
        .map(|l| {
            if l.starts_with("receiver = ") {
                format!("receiver = \"{}\"\n", proxy.addr())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&cfg, text)?;
    let cap = 2 * MIB;
    append(
        &cfg,
        &format!(
            "\n[throttle]\nrate = \"8 MiB/s\"\n{}{}",
            window(-2, 2, "2 MiB/s")?,
            window(4, 6, "1 MiB/s")?
        ),
    )?;

    let mut agent = RunningAgent::start(&cfg, "run-win")?;
    let status = agent.status_json()?;
    assert_eq!(status["send_cap_bytes_per_sec"], cap, "{status}");
    let w = status["send_cap_window"].as_str().unwrap_or_default();
    assert!(w.starts_with("window 1: "), "{status}");
    assert!(status["sync_read_cap_bytes_per_sec"].is_null(), "{status}");
    let table = agent.status_table()?;
    assert!(
        table.contains("send cap 2.0 MiB/s (window 1: "),
        "status table: {table}"
    );

    // The initial resync of the (empty) disk first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.status_json()?["disks"][0]["state"] != "protected" {
        ensure!(
            Instant::now() < deadline,
            "no initial sync: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.bookmark(false)?;

    // Continuous replication of 12 MiB of fresh random data, then a point:
    // the point goes after the data, at the cap too.
    let proxy = Arc::new(proxy);
    let base = proxy.bytes_up();
    let sampler = Sampler::start({
        let p = proxy.clone();
        move || p.bytes_up()
    });
    random_fill(&dev, 11, 12 * MIB)?;
    let id = agent.bookmark(false)?;
    let end = proxy.bytes_up();
    std::thread::sleep(Duration::from_millis(20));
    let samples = sampler.finish();
    ensure!(end - base >= 12 * MIB, "{} bytes went up", end - base);
    // Heartbeats are a few dozen bytes: the transfer starts where more
    // than that has gone up.
    let (bytes, secs) = transfer(&samples, base + 1024, end)?;
    assert_within_10_percent("run", bytes + 1024, secs, cap);
    ensure!(
        site.export("disk-win", &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    agent.stop()?;

    // Windows that do not cover now and no default: no cap.
    let text = std::fs::read_to_string(&cfg)?;
    let cut = text.find("\n[throttle]").context("throttle table")?;
    std::fs::write(
        &cfg,
        format!(
            "{}\n[throttle]\n{}{}",
            &text[..cut],
            window(4, 6, "1 MiB/s")?,
            window(8, 9, "unlimited")?
        ),
    )?;
    agent.restart()?;
    let status = agent.status_json()?;
    assert!(status["send_cap_bytes_per_sec"].is_null(), "{status}");
    assert!(status["send_cap_window"].is_null(), "{status}");
    agent.stop()?;
    Ok(())
}

/// A point waits while more is dirty than a freeze should cover; under a
/// send cap that makes the backlog outlast the request, `status` says so
/// and why while it waits, and the point comes once the backlog is read.
#[test]
fn a_point_held_back_by_the_backlog_says_why_in_status() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("held.img"), 128 * MIB)?;
    let cfg = run_config(
        &site,
        "run-held",
        &[(dev.path(), "disk-held")],
        "point_max_backlog_bytes = 1048576",
    )?;
    append(&cfg, "\n[throttle]\nrate = \"32 MiB/s\"\n")?;
    let mut agent = RunningAgent::start(&cfg, "run-held")?;
    agent.bookmark(false)?;
    let status = agent.status_json()?;
    assert!(status["point_waiting"].is_null(), "{status}");

    // The writes and the request land while the agent is stopped. A round
    // takes at most 64 MiB, so however late the agent sees the request
    // (after its first round at the latest), 56 MiB are still dirty then:
    // the point is held back for seconds at the cap.
    let paused = agent.paused()?;
    random_fill(&dev, 12, 120 * MIB)?;
    let bookmark = agent.bookmark_in_background()?;
    std::thread::sleep(Duration::from_millis(200));
    drop(paused);
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let status = agent.status_json()?;
        if !status["point_waiting"].is_null() {
            break status["point_waiting"].clone();
        }
        ensure!(
            Instant::now() < deadline,
            "no point_waiting in status while a point waits: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let reason = waiting["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("dirty, more than point_max_backlog_bytes (1.0 MiB)"),
        "{waiting}"
    );
    let table = agent.status_table()?;
    assert!(
        table.contains("next point waiting for "),
        "status table: {table}"
    );
    assert!(table.contains(" s ago\n"), "the last point's age: {table}");

    // 120 MiB at 32 MiB/s: the point comes after a few seconds, not never.
    let out = bookmark.wait_with_output()?;
    ensure!(out.status.success(), "bookmark failed: {}", agent.log());
    let id: u64 = String::from_utf8(out.stdout)?.trim().parse()?;
    let status = agent.status_json()?;
    assert!(status["point_waiting"].is_null(), "{status}");
    assert_eq!(
        status["last_point"]["id"], id,
        "status after bookmark: {status}"
    );
    ensure!(
        site.export("disk-held", &id.to_string())? == dev.read_all()?,
        "point {id} differs from the device"
    );
    agent.stop()?;
    Ok(())
}

/// A stop in the middle of a round under the send cap does not wait for
/// the round: what it took is dirty again, saved with the clean stop, and
/// nothing is resynced at the next start. It waited for the whole round
/// (up to 64 MiB, half a minute at 2 MiB/s), and systemd's stop timeout
/// may come first at lower caps.
#[test]
fn a_stop_under_the_send_cap_does_not_wait_for_the_round() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("capstop.img"), 32 * MIB)?;
    let cfg = run_config(&site, "run-capstop", &[(dev.path(), "disk-capstop")], "")?;
    append(&cfg, "\n[throttle]\nrate = \"2 MiB/s\"\n")?;
    let mut agent = RunningAgent::start(&cfg, "run-capstop")?;
    agent.bookmark(false)?;
    random_fill(&dev, 21, 24 * MIB)?;
    // Some 4 MiB of it go out at the cap, 20 MiB are still to go.
    std::thread::sleep(Duration::from_secs(2));
    let backlog = agent.status_json()?["disks"][0]["dirty_bytes"]
        .as_u64()
        .context("dirty_bytes in status")?;
    ensure!(
        backlog >= 8 * MIB,
        "only {backlog} bytes left to send: the round is nearly over"
    );
    let asked = Instant::now();
    agent.stop()?;
    let took = asked.elapsed();
    eprintln!(
        "the stop took {:.2} s with {backlog} bytes not yet durable",
        took.as_secs_f64()
    );
    ensure!(
        took < Duration::from_secs(5),
        "a stop under the send cap took {:.1} s with {backlog} bytes not yet durable",
        took.as_secs_f64()
    );
    // Without the cap, the next start ships it all, and no resync.
    let text = std::fs::read_to_string(&cfg)?;
    let cut = text.find("\n[throttle]").context("throttle table")?;
    std::fs::write(&cfg, &text[..cut])?;
    agent.resumes_without_resync(&site, &dev, "disk-capstop", "under the send cap")
}
