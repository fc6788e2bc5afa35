//! The operator's pre/post scripts for app-consistent points: every
//! executable file in the configured directory whose name starts with
//! `pre` (before the freeze) or `post` (after the thaw), in name order,
//! each with a timeout. A script that fails or hangs never blocks the
//! point: the point is taken crash-consistent and the failure is reported.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pre,
    Post,
}

impl Phase {
    fn prefix(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        }
    }
}

/// Scripts of a phase, in name order.
pub fn scripts(dir: &Path, phase: Phase) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(phase.prefix()))
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Runs a phase's scripts; Err names the first that failed or timed out.
/// The environment tells scripts which point they serve.
pub fn run(dir: &Path, phase: Phase, point_name: &str, timeout: Duration) -> Result<(), String> {
    for script in scripts(dir, phase) {
        let mut child = Command::new(&script)
            .env("TIDEMARK_PHASE", phase.prefix())
            .env("TIDEMARK_POINT_NAME", point_name)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => {
                    return Err(format!("{} exited with {status}", script.display()))
                }
                Ok(None) if started.elapsed() > timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} did not finish within {timeout:?} and was killed",
                        script.display()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for {}: {e}", script.display())),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn runs_in_order_and_reports_failures_and_hangs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        script(
            dir.path(),
            "pre-10-a",
            &format!("echo a >> {}", log.display()),
        );
        script(
            dir.path(),
            "pre-20-b",
            &format!("echo b:$TIDEMARK_POINT_NAME >> {}", log.display()),
        );
        script(dir.path(), "post-10", "exit 3");
        std::fs::write(dir.path().join("pre-30-not-executable"), "exit 1").expect("write");
        run(dir.path(), Phase::Pre, "p1", Duration::from_secs(5)).expect("pre scripts pass");
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "a\nb:p1\n");
        let err = run(dir.path(), Phase::Post, "p1", Duration::from_secs(5)).expect_err("fails");
        assert!(err.contains("post-10"), "{err}");
        script(dir.path(), "pre-40-hang", "sleep 30");
        let started = Instant::now();
        let err = run(dir.path(), Phase::Pre, "p2", Duration::from_millis(300)).expect_err("hangs");
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
