//! The Prometheus endpoints of both daemons, scraped with a plain HTTP GET
//! over TCP while an agent replicates a loop device: the text parses, the
//! documented names and labels are there, and counters only grow.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::Site;
use tidemark_tests::{free_port, LoopDev, SplitMix64};

/// `GET /metrics`, returning the body after checking status and type.
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no header end")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    ensure!(body.trim_end().ends_with("# EOF"), "no # EOF:\n{body}");
    Ok(body.to_owned())
}

/// Samples by `name{labels}` (labels as printed), checking every line is
/// a comment or `series value`.
fn parse(text: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .context(format!("bad line {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.insert(series.to_owned(), value);
    }
    Ok(out)
}

fn random(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()[..c.len()]));
    v
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> anyhow::Result<f64> {
    m.get(series)
        .copied()
        .with_context(|| format!("{series} missing; have {:#?}", m.keys().collect::<Vec<_>>()))
}

/// Every counter sample in `before` is present in `after` and not smaller.
fn monotonic(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> anyhow::Result<()> {
    for (series, v) in before.iter().filter(|(s, _)| s.contains("_total")) {
        let now = get(after, series)?;
        ensure!(now >= *v, "{series} went from {v} to {now}");
    }
    Ok(())
}

#[test]
fn both_metrics_endpoints_scrape_with_names_labels_and_monotonic_counters() -> anyhow::Result<()> {
    let rx_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let site = Site::start_with_config(&format!("metrics_listen = \"{rx_metrics}\""))?;
    let dev = LoopDev::create(&site.dir.path().join("m.img"), 16 << 20)?;
    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let cfg = run_config(
        &site,
        "metrics-a",
        &[(dev.path(), "disk-m")],
        &format!("metrics_listen = \"{agent_metrics}\""),
    )?;
    let running = RunningAgent::start(&cfg, "metrics-a")?;
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
    // 2 MiB of random data does not compress: it arrives about as large.
    ensure!(rx_disk >= (2 << 20) as f64, "received {rx_disk}");
    ensure!(
        rx_wire >= (2 << 20) as f64 * 0.99,
        "received on the wire {rx_wire}"
    );
    ensure!(ag_disk >= (2 << 20) as f64, "shipped {ag_disk}");
    Ok(())
}
