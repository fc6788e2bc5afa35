//! Health alarms end to end: a running agent on a loop device, a receiver
//! with short thresholds, and the RPO and heartbeat alarms raised and
//! cleared in the log and in `status`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use tidemark_tests::running::{run_config, RunningAgent};
use tidemark_tests::site::{path, receiver_cmd, run_ok, Site};
use tidemark_tests::LoopDev;

/// Polls `status --json` until `pred` holds.
fn wait_status(
    site: &Site,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let until = Instant::now() + timeout;
    loop {
        let s = site.status_json()?;
        if pred(&s) {
            return Ok(s);
        }
        ensure!(
            Instant::now() < until,
            "{what} not seen within {timeout:?}: {s:#}\n{}",
            site.receiver.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn disk<'a>(s: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    s["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == id))
        .unwrap_or(&serde_json::Value::Null)
}

fn agent<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

fn has_alarm(v: &serde_json::Value, alarm: &str) -> bool {
    v["alarms"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == alarm))
}

#[test]
fn rpo_alarm_raised_and_cleared_heartbeat_alarm_when_agent_stops() -> anyhow::Result<()> {
    // The agent heartbeats every 10 s while idle: the timeout must be
    // above that, or a healthy idle agent would raise it.
    let site = Site::start_with_config("rpo_threshold_secs = 6\nheartbeat_timeout_secs = 16")?;
    let dev = LoopDev::create(&site.dir.path().join("h.img"), 16 << 20)?;
    let cfg = run_config(&site, "health-a", &[(dev.path(), "disk-h")], "")?;
    let mut running = RunningAgent::start(&cfg, "health-a")?;

    // Before the first point there is no RPO to alarm about.
    let s = wait_status(&site, "initial-sync", Duration::from_secs(20), |s| {
        disk(s, "disk-h")["protection"] == "initial-sync"
    })?;
    ensure!(!has_alarm(disk(&s, "disk-h"), "RPO alarm"), "{s:#}");

    let first = running.bookmark(false)?;
    let s = wait_status(&site, "protected", Duration::from_secs(10), |s| {
        disk(s, "disk-h")["protection"] == "protected"
    })?;
    ensure!(disk(&s, "disk-h")["latest_point"] == first, "{s:#}");
    ensure!(!has_alarm(disk(&s, "disk-h"), "RPO alarm"), "{s:#}");

    // No point for longer than the threshold.
    site.receiver
        .wait_for_log("RPO alarm: disk disk-h", Duration::from_secs(20))?;
    let s = wait_status(&site, "RPO alarm in status", Duration::from_secs(5), |s| {
        has_alarm(disk(s, "disk-h"), "RPO alarm")
    })?;
    ensure!(s["rpo_threshold_secs"] == 6, "{s:#}");
    // The idle agent is still heard from (heartbeats).
    ensure!(!has_alarm(agent(&s, "health-a"), "heartbeat lost"), "{s:#}");
    let table = run_ok(receiver_cmd().args(["status", "--config", path(&site.config())]))?;
    let table = String::from_utf8(table.stdout)?;
    ensure!(
        table.contains("RPO alarm") && table.contains("ALARM(S)"),
        "{table}"
    );

    // A new point clears it, once.
    running.bookmark(false)?;
    site.receiver
        .wait_for_log("RPO alarm cleared: disk disk-h", Duration::from_secs(10))?;
    wait_status(&site, "RPO alarm cleared", Duration::from_secs(5), |s| {
        !has_alarm(disk(s, "disk-h"), "RPO alarm")
    })?;
    let log = site.receiver.log();
    ensure!(
        log.matches("RPO alarm: disk disk-h").count() == 1,
        "the alarm was logged more than once per crossing:\n{log}"
    );

    // The agent stops: no message for the timeout raises the heartbeat
    // alarm.
    let stopped = Instant::now();
    running.stop().context("clean stop")?;
    site.receiver
        .wait_for_log("heartbeat alarm: agent health-a", Duration::from_secs(30))?;
    ensure!(
        stopped.elapsed() >= Duration::from_secs(15),
        "heartbeat alarm after only {:?}",
        stopped.elapsed()
    );
    let s = wait_status(
        &site,
        "heartbeat lost in status",
        Duration::from_secs(5),
        |s| has_alarm(agent(s, "health-a"), "heartbeat lost"),
    )?;
    ensure!(agent(&s, "health-a")["sessions"] == 0, "{s:#}");

    // And it clears when the agent is back.
    running.restart()?;
    site.receiver.wait_for_log(
        "heartbeat alarm cleared: agent health-a",
        Duration::from_secs(20),
    )?;
    Ok(())
}
