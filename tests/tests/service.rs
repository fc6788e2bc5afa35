//! Running as systemd services: the unit files pass `systemd-analyze
//! verify` without a warning, the tmpfiles/sysusers entries make the
//! layout the units expect, and the receiver speaks the notify protocol
//! (READY, WATCHDOG at half WATCHDOG_USEC, STATUS, RELOADING on SIGHUP).
//! None of this needs root; the agent's notifications are checked in
//! e2e_run.rs, where loop devices are.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use tidemark_tests::site::Site;
use tidemark_tests::{require_cmd, workspace_bin, workspace_root, NotifySocket};

const UNITS: [(&str, &str); 2] = [
    ("tidemark-agent.service", "tidemark-agent"),
    ("tidemark-receiver.service", "tidemark-receiver"),
];

/// The units as shipped, except that ExecStart runs the freshly built
/// binaries (verify insists that ExecStart exists, and nothing is
/// installed in /usr/local/bin here).
#[test]
fn units_pass_systemd_analyze_verify_without_warnings() -> anyhow::Result<()> {
    require_cmd("systemd-analyze")?;
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    for (unit, bin) in UNITS {
        let text = std::fs::read_to_string(workspace_root().join("systemd").join(unit))?;
        let installed = format!("/usr/local/bin/{bin} ");
        ensure!(
            text.contains(&format!("ExecStart={installed}")),
            "{unit} does not start {installed}"
        );
        let built = format!("{} ", workspace_bin(bin).display());
        let out = dir.path().join(unit);
        std::fs::write(&out, text.replace(&installed, &built))?;
        files.push(out);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .context("running systemd-analyze")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    Ok(())
}

fn mode_owner(p: &Path) -> anyhow::Result<(u32, u32, u32)> {
    let m = std::fs::metadata(p).with_context(|| format!("{} was not created", p.display()))?;
    Ok((m.mode() & 0o7777, m.uid(), m.gid()))
}

#[test]
fn tmpfiles_and_sysusers_make_the_layout_the_units_use() -> anyhow::Result<()> {
    require_cmd("systemd-sysusers")?;
    require_cmd("systemd-tmpfiles")?;
    let root = tempfile::tempdir()?;
    std::fs::create_dir(root.path().join("etc"))?;
    let sd = workspace_root().join("systemd");
    for (tool, file) in [
        ("systemd-sysusers", "tidemark-sysusers.conf"),
        ("systemd-tmpfiles", "tidemark.conf"),
    ] {
        let mut cmd = Command::new(tool);
        if tool == "systemd-tmpfiles" {
            cmd.arg("--create");
        }
        let out = cmd
            .arg(format!("--root={}", root.path().display()))
            .arg(sd.join(file))
            .output()?;
        ensure!(
            out.status.success(),
            "{tool} {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd"))?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("tidemark:"))
        .context("no tidemark user")?;
    let fields: Vec<&str> = line.split(':').collect();
    let (uid, gid): (u32, u32) = (fields[2].parse()?, fields[3].parse()?);
    for (p, want) in [
        ("etc/tidemark", (0o750, 0, gid)),
        ("etc/tidemark/scripts", (0o700, 0, 0)),
        ("var/lib/tidemark/images", (0o750, uid, gid)),
        ("mnt/retention", (0o750, uid, gid)),
        ("var/lib/tidemark-agent", (0o700, 0, 0)),
        ("run/tidemark", (0o700, 0, 0)),
        ("run/tidemark-receiver", (0o750, uid, gid)),
    ] {
        assert_eq!(mode_owner(&root.path().join(p))?, want, "{p}");
    }
    Ok(())
}

#[test]
fn receiver_notifies_ready_watchdog_status_and_reload() -> anyhow::Result<()> {
    let mut notify = NotifySocket::bind()?;
    let site = Site::start_network_only(&[
        ("NOTIFY_SOCKET", notify.path()),
        // 1 s: pings every 0.5 s.
        ("WATCHDOG_USEC", "1000000"),
    ])?;
    notify.wait_for("READY=1", 1, Duration::from_secs(10))?;
    let status = notify.last_status().context("no STATUS with READY")?;
    assert!(status.contains("disk(s)"), "{status}");
    notify.wait_for("WATCHDOG=1", 3, Duration::from_secs(10))?;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(site.receiver.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    notify.wait_for("RELOADING=1", 1, Duration::from_secs(10))?;
    notify.wait_for("READY=1", 2, Duration::from_secs(10))?;
    let reload = notify
        .lines
        .iter()
        .position(|l| l == "RELOADING=1")
        .expect("seen");
    assert!(
        notify.lines[reload + 1].starts_with("MONOTONIC_USEC="),
        "RELOADING=1 without MONOTONIC_USEC: {:?}",
        notify.lines
    );
    site.receiver
        .wait_for_log("reloaded", Duration::from_secs(10))?;
    // Still serving and pinging after the reload.
    let pings = notify.count("WATCHDOG=1");
    notify.wait_for("WATCHDOG=1", pings + 2, Duration::from_secs(10))?;
    assert!(
        site.receiver.try_wait()?.is_none(),
        "{}",
        site.receiver.log()
    );
    Ok(())
}

/// Without NOTIFY_SOCKET nothing is sent and nothing fails.
#[test]
fn receiver_runs_without_systemd() -> anyhow::Result<()> {
    let site = Site::start_network_only(&[("WATCHDOG_USEC", "1000000")])?;
    std::thread::sleep(Duration::from_secs(2));
    assert!(site.receiver.try_wait()?.is_none());
    assert!(!site.receiver.log().contains("NOTIFY_SOCKET"));
    Ok(())
}
