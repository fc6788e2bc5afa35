//! A child process (agent, receiver) whose output goes to a log file, killed
//! when the guard drops; the log is printed if the test is failing.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::NamedTempFile;

/// How often [`Daemon::wait_for_log`] and [`Daemon::wait_timeout`] poll.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A running child process; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Daemon {
    /// Behind a mutex so that the waiting methods can take `&self`.
    state: Mutex<State>,
    pid: u32,
    /// What was started, for messages.
    name: String,
    log: NamedTempFile,
}

#[derive(Debug)]
struct State {
    child: Child,
    /// Set once the child has been reaped.
    exit: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `cmd` with stdin from /dev/null and stdout and stderr appended
    /// to one temporary log file.
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Daemon> {
        let name = Path::new(cmd.get_program())
            .file_name()
            .map_or_else(
                || cmd.get_program().to_string_lossy(),
                |n| n.to_string_lossy(),
            )
            .into_owned();
        let log = tempfile::Builder::new()
            .prefix(&format!("tidemark-{name}-"))
            .suffix(".log")
            .tempfile()
            .context("create daemon log file")?;
        // O_APPEND on both so stdout and stderr interleave without clobbering.
        let stdout = OpenOptions::new()
            .append(true)
            .open(log.path())
            .context("open daemon log for appending")?;
        let stderr = stdout.try_clone().context("clone daemon log handle")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Daemon {
            pid: child.id(),
            state: Mutex::new(State { child, exit: None }),
            name,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where the output is logged (deleted when the guard drops).
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// Everything the process printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        match std::fs::read(self.log.path()) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(err) => format!("<cannot read log {}: {err}>", self.log.path().display()),
        }
    }

    /// Waits until the log contains `needle`. Errors, quoting the log, on
    /// timeout or when the process exits first.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                // It may have printed the needle just before exiting.
                let log = self.log();
                if log.contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} (pid {}) exited ({status}) before logging {needle:?}; log:\n{log}",
                    self.name,
                    self.pid()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.name,
                    self.pid(),
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&self) -> anyhow::Result<Option<ExitStatus>> {
        let mut state = self.state();
        if state.exit.is_none() {
            state.exit = state
                .child
                .try_wait()
                .with_context(|| format!("wait for {}", self.name))?;
        }
        Ok(state.exit)
    }

    /// Waits up to `timeout` for the process to exit on its own. Errors,
    /// quoting the log, if it is still running then (it is left running).
    pub fn wait_timeout(&self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} (pid {}) still running after {timeout:?}; log:\n{}",
                    self.name,
                    self.pid(),
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// SIGKILLs the process (if still running) and reaps it.
    pub fn kill(&mut self) {
        let (name, pid) = (&self.name, self.pid);
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.exit.is_some() {
            return;
        }
        if let Err(err) = state.child.kill() {
            eprintln!("tidemark-tests: kill {name} (pid {pid}): {err}");
        }
        match state.child.wait() {
            Ok(status) => state.exit = Some(status),
            Err(err) => eprintln!("tidemark-tests: wait {name} (pid {pid}): {err}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} (pid {}, {}) -----\n{}\n----- end of log of {} -----",
                self.name,
                self.pid(),
                self.state()
                    .exit
                    .map_or_else(|| "not reaped".to_owned(), |s| s.to_string()),
                self.log(),
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn captures_both_streams_and_waits() {
        let mut daemon = Daemon::spawn(sh(
            "echo out; echo err >&2; sleep 0.1; echo ready; sleep 30",
        ))
        .expect("spawn sh");
        daemon
            .wait_for_log("ready", Duration::from_secs(10))
            .expect("ready is logged");
        let log = daemon.log();
        assert!(log.contains("out") && log.contains("err"), "{log}");
        assert!(daemon.try_wait().expect("try_wait").is_none());
        daemon.kill();
        assert!(daemon.try_wait().expect("try_wait").is_some());
    }

    #[test]
    fn wait_for_log_reports_timeout_and_early_exit() {
        let daemon = Daemon::spawn(sh("echo started; sleep 30")).expect("spawn sh");
        let err = daemon
            .wait_for_log("never", Duration::from_millis(200))
            .expect_err("times out");
        assert!(
            format!("{err:#}").contains("started"),
            "log is quoted: {err:#}"
        );

        let daemon = Daemon::spawn(sh("echo bye; exit 3")).expect("spawn sh");
        let err = daemon
            .wait_for_log("never", Duration::from_secs(30))
            .expect_err("exits first");
        let msg = format!("{err:#}");
        assert!(msg.contains("exited") && msg.contains("bye"), "{msg}");
        assert_eq!(
            daemon
                .wait_timeout(Duration::from_secs(1))
                .expect("exited")
                .code(),
            Some(3)
        );
    }

    #[test]
    fn drop_kills() {
        let daemon = Daemon::spawn(sh("sleep 30")).expect("spawn sh");
        let pid = daemon.pid();
        drop(daemon);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} is gone"
        );
    }
}
