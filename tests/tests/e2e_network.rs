//! Replication across a bad network: the agent and the receiver each in a
//! network namespace of their own, joined by a veth pair, with a fault
//! proxy on the receiver's side of the wire (cuts mid-frame, frozen flows,
//! flapping, latency) and `tc tbf` on the veth. After every fault the
//! replica must converge: a point taken afterwards exports exactly what
//! the device holds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::metrics::{get, parse, scrape};
use tidemark_tests::netns::{NetPair, Side, RECEIVER_IP};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{path, Site};
use tidemark_tests::{workspace_bin, CountingProxy, Daemon, LoopDev, SplitMix64};

const RECEIVER_PORT: u16 = 7443;
const PROXY_PORT: u16 = 7444;
/// Longest a point may take once the network is whole again.
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);

/// Fields drop in order: the agent first, the namespaces last, the loop
/// device before the site releases the kernel lock.
struct World {
    agent: RunningAgent,
    proxy: CountingProxy,
    dev: LoopDev,
    site: Site,
    pair: NetPair,
}

/// A receiver in one namespace, a proxy in front of it, a loop device of
/// `disk_mib` and `tidemark-agent run` in the other namespace replicating
/// it through the proxy; returns once the initial sync is a point.
fn world(name: &str, disk_mib: u64, agent_extra: &str) -> anyhow::Result<World> {
    let pair = NetPair::create()?;
    let listen = SocketAddr::new(RECEIVER_IP.into(), RECEIVER_PORT);
    let site = Site::start_in_netns(&pair.receiver, listen, "")?;
    let proxy = CountingProxy::start_in(
        &pair.receiver,
        SocketAddr::new(RECEIVER_IP.into(), PROXY_PORT),
        listen,
    )?;
    let dev = LoopDev::create(&site.dir.path().join(format!("{name}.img")), disk_mib << 20)?;
    let cfg = run_config(&site, name, &[(dev.path(), "disk")], agent_extra)?;
    let text = std::fs::read_to_string(&cfg)?;
    std::fs::write(
        &cfg,
        text.replace(&listen.to_string(), &proxy.addr().to_string()),
    )?;
    let mut cmd = pair.agent.command(workspace_bin("tidemark-agent"));
    cmd.args(["run", "--config", path(&cfg)])
        .env("TIDEMARK_LOG", "info");
    let daemon = Daemon::spawn(cmd)?;
    let agent = RunningAgent {
        instance: PathBuf::from(format!("/sys/kernel/tracing/instances/tidemark-{name}")),
        cfg,
        daemon: Some(daemon),
    };
    agent
        .daemon
        .as_ref()
        .context("just spawned")?
        .wait_for_log("replicating", Duration::from_secs(30))?;
    let w = World {
        agent,
        proxy,
        dev,
        site,
        pair,
    };
    w.converged("initial sync")?;
    Ok(w)
}

impl World {
    /// A point within [`CONVERGE_WITHIN`], exported and compared with the
    /// device; returns its id.
    fn converged(&self, what: &str) -> anyhow::Result<u64> {
        let started = Instant::now();
        let id = bookmark_within(&self.agent, CONVERGE_WITHIN)
            .with_context(|| format!("no point after {what}"))?;
        eprintln!("{what}: point {id} after {:?}", started.elapsed());
        let exported = self.site.export("disk", &id.to_string())?;
        ensure!(
            exported == self.dev.read_all()?,
            "{what}: point {id} differs from the device; agent log:\n{}",
            self.agent.log()
        );
        Ok(id)
    }

    fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.agent.daemon.as_ref().context("agent stopped")?.pid())
    }
}

/// `tidemark-agent bookmark`, failing (with the agent's log) instead of
/// hanging when the agent cannot take a point in time.
fn bookmark_within(agent: &RunningAgent, limit: Duration) -> anyhow::Result<u64> {
    bookmark(&agent.cfg, limit).map_err(|e| anyhow::anyhow!("{e:#}\nagent log:\n{}", agent.log()))
}

/// `tidemark-agent bookmark` with the agent config `cfg`, killed after
/// `limit`; returns the point's id.
fn bookmark(cfg: &std::path::Path, limit: Duration) -> anyhow::Result<u64> {
    let mut cmd = std::process::Command::new(workspace_bin("tidemark-agent"));
    cmd.args(["bookmark", "--config", path(cfg)]);
    let mut d = Daemon::spawn(cmd)?;
    let status = match d.wait_timeout(limit) {
        Ok(s) => s,
        Err(e) => {
            d.kill();
            return Err(e);
        }
    };
    let out = d.log();
    ensure!(status.success(), "bookmark failed: {out}");
    let id = out
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .with_context(|| format!("no point id in {out:?}"))?;
    Ok(id)
}

fn random_bytes(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Writes random 4–64 KiB pieces at random places of the device until
/// stopped, fsyncing every 16 writes; returns the bytes written.
struct Churn {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Churn {
    fn start(dev: &LoopDev, seed: u64, pause: Duration) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let path = dev.path().to_path_buf();
        let size = dev.size_bytes();
        let thread = std::thread::spawn({
            let (stop, written) = (stop.clone(), written.clone());
            move || -> anyhow::Result<()> {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new().write(true).open(path)?;
                let mut rng = SplitMix64::new(seed);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let len = 4096 * (1 + rng.below(16)) as usize;
                    let at = rng.below((size - len as u64) / 4096) * 4096;
                    f.write_all_at(&random_bytes(&mut rng, len), at)?;
                    written.fetch_add(len as u64, Ordering::SeqCst);
                    n += 1;
                    if n.is_multiple_of(16) {
                        f.sync_data()?;
                        std::thread::sleep(pause);
                    }
                }
                f.sync_data()?;
                Ok(())
            }
        });
        Churn {
            stop,
            written,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().context("finished twice")?;
        t.join().map_err(|_| anyhow::anyhow!("churn panicked"))??;
        Ok(self.written.load(Ordering::SeqCst))
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for `cond`, failing after `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        ensure!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// (VmRSS, VmHWM) of a process, bytes.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line.split_whitespace().nth(1).context("value")?.parse()?;
        Ok(kib << 10)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// How many malloc arenas of its threads' own a process has: glibc maps
/// each such arena as a heap of its own, reserved as 64 MiB aligned to
/// 64 MiB, the part in use read-write and the rest inaccessible. The main
/// arena lives in the program break and is not counted.
fn thread_arenas(pid: u32) -> anyhow::Result<usize> {
    const HEAP: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut rows = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().context("range")?, f.next().context("perms")?);
        let anonymous = f.nth(3).is_none();
        let (a, b) = range.split_once('-').context("range")?;
        rows.push((
            u64::from_str_radix(a, 16)?,
            u64::from_str_radix(b, 16)?,
            perms.to_owned(),
            anonymous,
        ));
    }
    let heaps = rows
        .iter()
        .zip(rows.iter().skip(1))
        .filter(|(used, rest)| {
            used.3
                && rest.3
                && used.0.is_multiple_of(HEAP)
                && used.2.starts_with("rw")
                && rest.2.starts_with("---")
                && rest.0 == used.1
                && rest.1 - used.0 == HEAP
        })
        .count();
    Ok(heaps)
}

#[test]
fn cut_mid_frame_resumes_and_converges() -> anyhow::Result<()> {
    let w = world("net-cut", 64, "")?;
    let churn = Churn::start(&w.dev, 101, Duration::from_millis(20));
    for round in 0..4 {
        // An odd count lands inside a frame and inside a TLS record.
        let before = w.proxy.connections();
        w.proxy.cut_up_after(150_001 + round * 77_777);
        wait_until(Duration::from_secs(30), "the cut", || w.proxy.cut_fired())?;
        wait_until(Duration::from_secs(30), "a reconnect", || {
            w.proxy.connections() > before
        })?;
    }
    let written = churn.finish()?;
    eprintln!("{} MiB churned during 4 cuts", written >> 20);
    w.converged("4 cuts mid-frame")?;
    let log = w.agent.log();
    ensure!(
        log.contains("connection to receiver"),
        "no cut noticed: {log}"
    );
    ensure!(
        !log.contains("resync required: ") || log.matches("resync required").count() == 1,
        "a cut must not cost a resync: {log}"
    );
    Ok(())
}

#[test]
fn frozen_flow_beyond_the_receiver_timeout_is_abandoned() -> anyhow::Result<()> {
    let w = world("net-stall", 64, "receiver_timeout_secs = 15")?;
    let churn = Churn::start(&w.dev, 103, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    let before = w.proxy.connections();
    // Neither side hears from the other again on this connection, and
    // nobody sends a RST: only a timeout can tell.
    let frozen_at = Instant::now();
    w.proxy.freeze_live();
    wait_until(Duration::from_secs(40), "a new connection", || {
        w.proxy.connections() > before
    })?;
    eprintln!("new connection {:?} after the freeze", frozen_at.elapsed());
    let written = churn.finish()?;
    eprintln!("{} MiB churned", written >> 20);
    w.converged("a frozen flow")?;
    let log = w.agent.log();
    ensure!(log.contains("connection to receiver"), "{log}");
    Ok(())
}

/// Data shipped between points is let go once sent, and read again if its
/// connection ends before the ack. A crash-consistent point asked for
/// while such data is unacknowledged is cut without waiting for it, and
/// must be cut again if that connection ends before the point is
/// recorded: else the lost data would be read again only after the point
/// and be missing from it.
#[test]
fn data_lost_with_the_connection_while_a_point_is_asked_for_is_in_the_point() -> anyhow::Result<()>
{
    let metrics: SocketAddr = "127.0.0.1:9475".parse()?;
    let w = world(
        "net-lost",
        64,
        &format!("receiver_timeout_secs = 15\nmetrics_listen = \"{metrics}\""),
    )?;
    // The agent's endpoint listens in the agent's namespace.
    let shipped = || -> anyhow::Result<f64> {
        let text = w.pair.agent.run_in(move || scrape(metrics))??;
        get(
            &parse(&text)?,
            "tidemark_agent_shipped_disk_bytes_total{disk=\"disk\"}",
        )
    };
    // Nothing moves either way from here: the agent sends what follows
    // and hears no ack for it.
    w.proxy.set_paused(true);
    let before_writes = shipped()?;
    let mut rng = SplitMix64::new(131);
    for i in 0..8u64 {
        w.dev
            .write_at((3 + i * 5) << 20, &random_bytes(&mut rng, 256 << 10))?;
    }
    // A cycle (1 s) takes the writes and ships them into the pause; the
    // test is only worth something if it did.
    wait_until(
        Duration::from_secs(20),
        "2 MiB shipped into the stall",
        || shipped().is_ok_and(|b| b - before_writes >= f64::from(2u32 << 20)),
    )?;
    let before = w.proxy.connections();
    let asked = std::thread::spawn({
        let cfg = w.agent.cfg.clone();
        move || bookmark(&cfg, CONVERGE_WITHIN)
    });
    // The point is asked for, cut, and waits to be recorded behind those
    // acks; then the connection goes, and with it everything it carried.
    std::thread::sleep(Duration::from_secs(2));
    w.proxy.cut_all();
    w.proxy.set_paused(false);
    let cut_at = Instant::now();
    let id = asked
        .join()
        .map_err(|_| anyhow::anyhow!("bookmark thread panicked"))?
        .map_err(|e| anyhow::anyhow!("{e:#}\nagent log:\n{}", w.agent.log()))?;
    ensure!(
        w.proxy.connections() > before,
        "the point {id} came without a new connection: the test did not cut what it meant to"
    );
    eprintln!("point {id} {:?} after the cut", cut_at.elapsed());
    let exported = w.site.export("disk", &id.to_string())?;
    ensure!(
        exported == w.dev.read_all()?,
        "point {id} lacks data sent before it and lost with its connection; agent log:\n{}",
        w.agent.log()
    );
    let log = w.agent.log();
    ensure!(
        log.contains("the point is cut again"),
        "the point was not cut before the connection went: {log}"
    );
    Ok(())
}

#[test]
fn stall_of_everything_beyond_the_timeout_resumes() -> anyhow::Result<()> {
    let w = world("net-pause", 64, "receiver_timeout_secs = 15")?;
    let churn = Churn::start(&w.dev, 107, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    w.proxy.set_paused(true);
    std::thread::sleep(Duration::from_secs(25));
    w.proxy.set_paused(false);
    churn.finish()?;
    w.converged("a 25 s stall")?;
    Ok(())
}

#[test]
fn flapping_link_converges() -> anyhow::Result<()> {
    let w = world("net-flap", 64, "receiver_timeout_secs = 15")?;
    let churn = Churn::start(&w.dev, 109, Duration::from_millis(20));
    let mut rng = SplitMix64::new(7);
    for i in 0..12 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        if i % 4 == 3 {
            // The wire itself: a short partition without any RST.
            w.pair.set_link(Side::Receiver, false)?;
            std::thread::sleep(Duration::from_secs(2));
            w.pair.set_link(Side::Receiver, true)?;
        } else {
            w.proxy.cut_all();
        }
    }
    let written = churn.finish()?;
    eprintln!(
        "{} MiB churned, {} connections",
        written >> 20,
        w.proxy.connections()
    );
    w.converged("12 flaps")?;
    Ok(())
}

#[test]
fn one_megabit_with_latency_converges() -> anyhow::Result<()> {
    let w = world("net-slow", 32, "")?;
    w.pair.throttle("1mbit")?;
    w.proxy.set_latency(Duration::from_millis(40));
    // 3 MiB of random data over 6 s: about 25 s of this wire.
    let mut rng = SplitMix64::new(113);
    let mut written = 0u64;
    for _ in 0..48 {
        let at = rng.below(w.dev.size_bytes() / 65536) * 65536;
        w.dev.write_at(at, &random_bytes(&mut rng, 65536))?;
        written += 65536;
        std::thread::sleep(Duration::from_millis(125));
    }
    let (tx0, t0) = (w.pair.agent_tx_bytes()?, Instant::now());
    w.converged("1 Mbit/s, 80 ms round trip")?;
    let secs = t0.elapsed().as_secs_f64();
    let rate = (w.pair.agent_tx_bytes()? - tx0) as f64 * 8.0 / secs;
    eprintln!(
        "{} KiB churned; converged in {secs:.1} s at {:.2} Mbit/s on the wire",
        written >> 10,
        rate / 1e6
    );
    ensure!(rate < 1.2e6, "the throttle did not hold: {rate} bit/s");
    Ok(())
}

#[test]
fn memory_stays_bounded_while_the_receiver_is_unreachable() -> anyhow::Result<()> {
    // A small ring: it overruns if anything keeps the agent from draining
    // it for long, such as a connection attempt into the partition.
    let w = world(
        "net-mem",
        64,
        "receiver_timeout_secs = 15\ntrace_buffer_kb = 256",
    )?;
    let pid = w.pid()?;
    let (rss0, _) = memory(pid)?;
    w.pair.set_link(Side::Receiver, false)?;
    let started = Instant::now();
    // Sequential passes of 1 MiB writes over the whole device, 4 times
    // its size, while the receiver is away.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(w.dev.path())?;
    let mut rng = SplitMix64::new(127);
    let mut peak = (0u64, 0u64);
    let mut written = 0u64;
    let block = 1 << 20;
    while written < 4 * w.dev.size_bytes() || started.elapsed() < Duration::from_secs(45) {
        let at = written % w.dev.size_bytes();
        f.write_all_at(&random_bytes(&mut rng, block), at)?;
        written += block as u64;
        if written.is_multiple_of(16 << 20) {
            // And a burst of small writes, many events each.
            for _ in 0..500 {
                let at = rng.below(w.dev.size_bytes() / 4096) * 4096;
                f.write_all_at(&random_bytes(&mut rng, 4096), at)?;
            }
            f.sync_data()?;
            let (rss, hwm) = memory(pid)?;
            peak = (peak.0.max(rss), peak.1.max(hwm));
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    f.sync_data()?;
    drop(f);
    let (rss, hwm) = memory(pid)?;
    peak = (peak.0.max(rss), peak.1.max(hwm));
    eprintln!(
        "{} MiB written in {:?} while unreachable; agent RSS {} MiB before, peak {} MiB, HWM {} MiB",
        written >> 20,
        started.elapsed(),
        rss0 >> 20,
        peak.0 >> 20,
        peak.1 >> 20
    );
    // Nothing grows: what the dropped connection left unacknowledged is
    // dirty again, to be read again, not held.
    ensure!(
        peak.0 < rss0 + (48 << 20),
        "agent memory grew from {} to {} MiB while disconnected",
        rss0 >> 20,
        peak.0 >> 20
    );
    w.pair.set_link(Side::Receiver, true)?;
    w.converged("a long partition under churn")?;
    // Payloads are made on the compression threads and freed on the
    // sender's; per-thread arenas would each keep their own peak.
    let arenas = thread_arenas(pid)?;
    ensure!(
        arenas == 0,
        "the agent has {arenas} malloc arenas of its threads' own; it should allocate from one"
    );
    let log = w.agent.log();
    ensure!(
        !log.contains("write events were lost"),
        "the tracer overran while the receiver was away: {log}"
    );
    Ok(())
}
