//! The Prometheus endpoints of both daemons, scraped with a plain HTTP GET
//! over TCP while an agent replicates a loop device: the text parses, the
//! documented names and labels are there, and counters only grow.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::ensure;
use tidemark_tests::metrics::{get, parse, scrape};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::Site;
use tidemark_tests::{free_port, LoopDev, SplitMix64};

fn random(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]));
    v
}

/// Every counter sample in `before` is present in `after` and not smaller.
fn monotonic(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> anyhow::Result<()> {
    for (series, v) in before.iter().filter(|(s, _)| s.contains("_total")) {
        let now = get(after, series)?;
        ensure!(now >= *v, "{series} went from {v} to {now}");
    }
    Ok(())
}

/// Agent `name` replicating a new 16 MiB loop device as `disk`, with its
/// metrics endpoint on a free port; `extra` adds settings.
fn metered_agent(
    site: &Site,
    name: &str,
    disk: &str,
    extra: &str,
) -> anyhow::Result<(LoopDev, SocketAddr, RunningAgent)> {
    let dev = LoopDev::create(&site.dir.path().join(format!("{disk}.img")), 16 << 20)?;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let cfg = run_config(
        site,
        name,
        &[(dev.path(), disk)],
        &format!("metrics_listen = \"{metrics}\"\n{extra}"),
    )?;
    let agent = RunningAgent::start(&cfg, name)?;
    Ok((dev, metrics, agent))
}

#[test]
fn both_metrics_endpoints_scrape_with_names_labels_and_monotonic_counters() -> anyhow::Result<()> {
    let rx_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let site = Site::start_with_config(&format!("metrics_listen = \"{rx_metrics}\""))?;
    let (dev, agent_metrics, running) = metered_agent(&site, "metrics-a", "disk-m", "")?;
    let mut rng = SplitMix64::new(77);
    dev.write_at(0, &random(&mut rng, 1 << 20))?;
    running.bookmark(false)?;

    // The receiver's gauges follow its alarm evaluation (every 2 s).
    let wait_points = |n: f64| -> anyhow::Result<BTreeMap<String, f64>> {
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let m = parse(&scrape(rx_metrics)?)?;
            if m.get("tidemark_receiver_points{disk=\"disk-m\"}") == Some(&n) {
                return Ok(m);
            }
            ensure!(Instant::now() < until, "points never reached {n}: {m:#?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let rx1 = wait_points(1.0)?;
    let ag1 = parse(&scrape(agent_metrics)?)?;
    for series in [
        "tidemark_receiver_received_disk_bytes_total{disk=\"disk-m\"}",
        "tidemark_receiver_received_wire_bytes_total{disk=\"disk-m\"}",
        "tidemark_receiver_rpo_seconds{disk=\"disk-m\"}",
        "tidemark_receiver_journal_bytes{disk=\"disk-m\"}",
        "tidemark_receiver_alarm{kind=\"rpo\",disk=\"disk-m\"}",
        "tidemark_receiver_disks",
    ] {
        get(&rx1, series)?;
    }
    for series in [
        "tidemark_agent_backlog_bytes{disk=\"disk-m\"}",
        "tidemark_agent_shipped_disk_bytes_total{disk=\"disk-m\"}",
        "tidemark_agent_shipped_wire_bytes_total{disk=\"disk-m\"}",
        "tidemark_agent_resync_progress_ratio{disk=\"disk-m\"}",
        "tidemark_agent_freeze_seconds_count",
        "tidemark_agent_connected",
        "tidemark_agent_point_waiting_seconds",
        "tidemark_agent_yielding_cpu",
        "tidemark_agent_fast_compressed_bytes_total",
        "tidemark_agent_stored_bytes_total",
    ] {
        get(&ag1, series)?;
    }
    let text = scrape(agent_metrics)?;
    ensure!(
        text.contains("# TYPE tidemark_agent_tracker_loss_events counter"),
        "{text}"
    );
    ensure!(get(&ag1, "tidemark_agent_connected")? == 1.0);
    // The point just taken waited for nothing.
    ensure!(get(&ag1, "tidemark_agent_point_waiting_seconds")? == 0.0);
    // The initial sync shipped the whole 16 MiB disk, mostly as zeros.
    ensure!(
        get(
            &ag1,
            "tidemark_agent_shipped_disk_bytes_total{disk=\"disk-m\"}"
        )? >= (16 << 20) as f64
    );

    // Random data in between: every counter grows or stays.
    dev.write_at(4 << 20, &random(&mut rng, 2 << 20))?;
    running.bookmark(false)?;
    let rx2 = wait_points(2.0)?;
    let ag2 = parse(&scrape(agent_metrics)?)?;
    monotonic(&rx1, &rx2)?;
    monotonic(&ag1, &ag2)?;
    let grew = |a: &BTreeMap<String, f64>,
                b: &BTreeMap<String, f64>,
                s: &str|
     -> anyhow::Result<f64> { Ok(get(b, s)? - get(a, s)?) };
    let rx_wire = grew(
        &rx1,
        &rx2,
        "tidemark_receiver_received_wire_bytes_total{disk=\"disk-m\"}",
    )?;
    let rx_disk = grew(
        &rx1,
        &rx2,
        "tidemark_receiver_received_disk_bytes_total{disk=\"disk-m\"}",
    )?;
    let ag_disk = grew(
        &ag1,
        &ag2,
        "tidemark_agent_shipped_disk_bytes_total{disk=\"disk-m\"}",
    )?;
    // Written over the image behind the first point: journaled first.
    let overwritten = get(
        &rx2,
        "tidemark_receiver_overwritten_bytes_total{disk=\"disk-m\"}",
    )?;
    let journaled = get(
        &rx2,
        "tidemark_receiver_journaled_bytes_total{disk=\"disk-m\"}",
    )?;
    ensure!(
        journaled >= (2 << 20) as f64 && journaled <= overwritten,
        "journaled {journaled} of {overwritten} bytes overwritten"
    );
    // 2 MiB of random data does not compress: it arrives about as large.
    ensure!(rx_disk >= (2 << 20) as f64, "received {rx_disk}");
    ensure!(
        rx_wire >= (2 << 20) as f64 * 0.99,
        "received on the wire {rx_wire}"
    );
    ensure!(ag_disk >= (2 << 20) as f64, "shipped {ag_disk}");
    Ok(())
}

/// `zstd_level = 0` (a LAN with room to spare, where the agent's CPU is
/// worth more than bytes): data that compresses well still travels as it
/// is, counted as stored, and arrives whole.
#[test]
fn zstd_level_0_ships_compressible_data_uncompressed() -> anyhow::Result<()> {
    const LEN: usize = 2 << 20;
    let site = Site::start()?;
    let (dev, agent_metrics, running) =
        metered_agent(&site, "metrics-off", "disk-off", "zstd_level = 0")?;
    running.bookmark(false)?;
    let before = parse(&scrape(agent_metrics)?)?;

    let mut text = Vec::with_capacity(LEN);
    let mut rng = SplitMix64::new(5);
    while text.len() < LEN {
        text.extend_from_slice(
            format!(
                "request {} served in {} us\n",
                rng.next_u64() % 1000,
                rng.next_u64() % 90
            )
            .as_bytes(),
        );
    }
    text.truncate(LEN);
    let compressed = zstd::bulk::compress(&text, 1)?.len();
    ensure!(
        compressed < LEN / 4,
        "the test's data compresses to only {compressed} of {LEN} bytes"
    );
    dev.write_at(1 << 20, &text)?;
    let id = running.bookmark(false)?;
    let after = parse(&scrape(agent_metrics)?)?;
    let grew = |s: &str| -> anyhow::Result<f64> { Ok(get(&after, s)? - get(&before, s)?) };
    let disk = grew("tidemark_agent_shipped_disk_bytes_total{disk=\"disk-off\"}")?;
    let wire = grew("tidemark_agent_shipped_wire_bytes_total{disk=\"disk-off\"}")?;
    let stored = grew("tidemark_agent_stored_bytes_total")?;
    ensure!(disk >= LEN as f64, "shipped {disk} disk bytes");
    ensure!(
        wire >= disk,
        "{disk} disk bytes went as {wire} on the wire: compressed"
    );
    ensure!(
        stored >= LEN as f64,
        "only {stored} bytes counted as stored"
    );
    ensure!(grew("tidemark_agent_fast_compressed_bytes_total")? == 0.0);
    ensure!(
        site.export("disk-off", &id.to_string())? == dev.read_all()?,
        "the point differs from the device"
    );
    Ok(())
}
