//! A running `tidemark-agent run` for end-to-end tests, and its config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::site::{path, run_ok, Site};
use crate::{workspace_bin, Daemon};

/// A running `tidemark-agent run` and the trace instance it leaves behind.
pub struct RunningAgent {
    pub daemon: Option<Daemon>,
    pub cfg: PathBuf,
    pub instance: PathBuf,
}

impl RunningAgent {
    pub fn start(cfg: &Path, name: &str) -> anyhow::Result<RunningAgent> {
        let mut a = RunningAgent {
            daemon: None,
            cfg: cfg.to_path_buf(),
            instance: PathBuf::from(format!("/sys/kernel/tracing/instances/tidemark-{name}")),
        };
        a.restart()?;
        Ok(a)
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(workspace_bin("tidemark-agent"));
        cmd.args(["run", "--config", path(&self.cfg)]);
        let d = Daemon::spawn(cmd)?;
        d.wait_for_log("replicating", Duration::from_secs(30))?;
        self.daemon = Some(d);
        Ok(())
    }

    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// [`Daemon::wait_for_log`] of the running agent.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        self.daemon
            .as_ref()
            .context("not running")?
            .wait_for_log(needle, timeout)
    }

    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.daemon.as_ref().context("not running")?.pid())
    }

    /// Stops every thread of the agent (SIGSTOP) until the guard drops:
    /// an agent starved of CPU, which is the only way to make a burst
    /// outrun its 100 ms drains whatever the speed of the machine.
    pub fn paused(&self) -> anyhow::Result<Paused> {
        let pid = nix::unistd::Pid::from_raw(self.pid()? as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
        Ok(Paused(pid))
    }

    /// SIGTERM and wait: the clean-stop path.
    pub fn stop(&mut self) -> anyhow::Result<String> {
        let d = self.daemon.take().context("not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = d.wait_timeout(Duration::from_secs(30))?;
        ensure!(status.success(), "clean stop failed: {}", d.log());
        Ok(d.log())
    }

    /// Starts the agent again after a clean stop: it must resume from the
    /// stop's saved state (no resync), and a point taken then must hold
    /// every write of `dev`, replicated as `disk`. `after` names what the
    /// stop came in, for the messages.
    pub fn resumes_without_resync(
        &mut self,
        site: &Site,
        dev: &crate::LoopDev,
        disk: &str,
        after: &str,
    ) -> anyhow::Result<()> {
        self.restart()?;
        let id = self.bookmark(false)?;
        let log = self.log();
        ensure!(
            log.contains("clean stop") && !log.contains("resync required"),
            "the restart after a stop {after}: {log}"
        );
        ensure!(
            site.export(disk, &id.to_string())? == dev.read_all()?,
            "point {id} after a stop {after} differs from the device"
        );
        Ok(())
    }

    /// `tidemark-agent bookmark` started in the background, its output
    /// piped: for a point that is to meet a fault on its way.
    pub fn bookmark_in_background(&self) -> anyhow::Result<std::process::Child> {
        Ok(Command::new(workspace_bin("tidemark-agent"))
            .args(["bookmark", "--config", path(&self.cfg)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    }

    /// Asks for a point and returns its id.
    pub fn bookmark(&self, app: bool) -> anyhow::Result<u64> {
        let mut cmd = Command::new(workspace_bin("tidemark-agent"));
        cmd.args(["bookmark", "--config", path(&self.cfg)]);
        if app {
            cmd.arg("--app-consistent");
        }
        let out = run_ok(&mut cmd).with_context(|| self.log())?;
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    }

    pub fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        let out = run_ok(Command::new(workspace_bin("tidemark-agent")).args([
            "status",
            "--config",
            path(&self.cfg),
            "--json",
        ]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `status` as an operator reads it.
    pub fn status_table(&self) -> anyhow::Result<String> {
        let out = run_ok(Command::new(workspace_bin("tidemark-agent")).args([
            "status",
            "--config",
            path(&self.cfg),
        ]))?;
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.kill();
        // The instance outlives the agent by design; tests must not leak it.
        if self.instance.exists() {
            if let Err(e) = std::fs::remove_dir(&self.instance) {
                eprintln!("cannot remove {}: {e}", self.instance.display());
            }
        }
    }
}

/// An agent config for `run`: fast cycles, points only on demand.
pub fn run_config(
    site: &Site,
    name: &str,
    disks: &[(&Path, &str)],
    extra: &str,
) -> anyhow::Result<PathBuf> {
    let cfg = site.agent(name, site.addr, disks)?;
    let dir = cfg.parent().context("agent dir")?;
    let text = std::fs::read_to_string(&cfg)?;
    // `site.agent` already put state_dir and admin_socket in `dir`.
    // Short cycles keep tests quick, unless a test sets its own.
    let cycle = if extra.contains("cycle_ms") {
        ""
    } else {
        "cycle_ms = 200\n"
    };
    let top = format!(
        "{cycle}crash_consistent_interval_secs = 0\napp_consistent_interval_secs = 0\nscripts_dir = \"{}\"\n{extra}\n",
        dir.join("scripts").display(),
    );
    std::fs::write(&cfg, top + &text)?;
    Ok(cfg)
}

/// An agent stopped by [`RunningAgent::paused`]; continues on drop, also
/// when the test fails meanwhile.
pub struct Paused(nix::unistd::Pid);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}
