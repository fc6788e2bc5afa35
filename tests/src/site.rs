//! A receiver site for end-to-end tests: PKI in a temp dir, `serve` on
//! 127.0.0.1, agents issued against it, and the commands tests script.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::{free_port, kernel_lock, require_cmd, require_root, workspace_bin, Daemon, KernelLock};

/// `receiver.toml`'s default admin socket, as `init` writes it.
const DEFAULT_ADMIN_SOCKET: &str = "/run/tidemark-receiver/receiver.sock";

/// A receiver with its PKI in a temp dir, serving on 127.0.0.1.
/// Fields drop in order: the receiver stops before its directory goes,
/// and the kernel lock is released last.
pub struct Site {
    pub receiver: Daemon,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    /// The network namespace `serve` runs in (None: the host's).
    netns: Option<std::path::PathBuf>,
    /// None for sites that use no kernel resource.
    _lock: Option<KernelLock>,
}

impl Site {
    /// A site for tests with loop devices: root, `losetup` and the kernel
    /// lock.
    pub fn start() -> anyhow::Result<Site> {
        Site::start_with_config("")
    }

    /// [`Site::start`] with `extra` appended to receiver.toml (top-level
    /// keys) before `serve` starts.
    pub fn start_with_config(extra: &str) -> anyhow::Result<Site> {
        let lock = kernel_lock();
        require_root()?;
        require_cmd("losetup")?;
        Site::start_inner(Some(lock), &[], extra, None)
    }

    /// [`Site::start`] with `serve` inside `ns`, listening on `listen` (an
    /// address of that namespace). The commands tests script (export,
    /// points, status) run on the host: they use files and unix sockets.
    pub fn start_in_netns(
        ns: &crate::netns::Netns,
        listen: SocketAddr,
        extra: &str,
    ) -> anyhow::Result<Site> {
        let lock = kernel_lock();
        require_root()?;
        require_cmd("losetup")?;
        Site::start_inner(Some(lock), &[], extra, Some((ns.path(), listen)))
    }

    /// A site for tests that only speak TLS on 127.0.0.1 (raw protocol
    /// clients): no root, no kernel lock. `env` is added to `serve`'s
    /// environment.
    pub fn start_network_only(env: &[(&str, &str)]) -> anyhow::Result<Site> {
        Site::start_inner(None, env, "", None)
    }

    /// [`Site::start_network_only`] with `extra` added to receiver.toml.
    pub fn start_network_only_with_config(extra: &str) -> anyhow::Result<Site> {
        Site::start_inner(None, &[], extra, None)
    }

    fn start_inner(
        lock: Option<KernelLock>,
        env: &[(&str, &str)],
        extra: &str,
        netns: Option<(std::path::PathBuf, SocketAddr)>,
    ) -> anyhow::Result<Site> {
        let dir = tempfile::tempdir()?;
        let addr: SocketAddr = match &netns {
            Some((_, listen)) => *listen,
            None => format!("127.0.0.1:{}", free_port()).parse()?,
        };
        let netns = netns.map(|(p, _)| p);
        run_ok(receiver_cmd().args([
            "init",
            "--dir",
            path(&dir.path().join("rx")),
            "--name",
            "test-receiver",
            "--listen",
            &addr.to_string(),
            "--image-dir",
            path(&dir.path().join("images")),
            "--retention-dir",
            path(&dir.path().join("retention")),
            "--retention-on-root-filesystem",
        ]))?;
        // Each site's own admin socket, not the system default in /run.
        let cfg = dir.path().join("rx/receiver.toml");
        let text = std::fs::read_to_string(&cfg)?;
        let default = format!("admin_socket = \"{DEFAULT_ADMIN_SOCKET}\"");
        ensure!(text.contains(&default), "init wrote no {default}: {text}");
        let socket = dir.path().join("rx/receiver.sock");
        // `extra` replaces what init wrote for its keys; top-level keys
        // must come before the first table.
        let keys: Vec<String> = extra
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| format!("{} =", k.trim()))
            .collect();
        let kept: String = text
            .replace(
                &default,
                &format!("admin_socket = \"{}\"", socket.display()),
            )
            .lines()
            .filter(|l| !keys.iter().any(|k| l.starts_with(k.as_str())))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&cfg, format!("{extra}\n{kept}"))?;
        let mut cmd = serve_cmd(netns.as_deref());
        cmd.args(["serve", "--config", path(&cfg)]);
        cmd.envs(env.iter().copied());
        let receiver = Daemon::spawn(cmd)?;
        receiver.wait_for_log("listening on", Duration::from_secs(20))?;
        Ok(Site {
            dir,
            addr,
            receiver,
            netns,
            _lock: lock,
        })
    }

    /// Kills the receiver (SIGKILL: no clean shutdown) and starts it again
    /// on the same address and state.
    pub fn restart_receiver(&mut self) -> anyhow::Result<()> {
        self.restart_receiver_with_env(&[])
    }

    /// [`Site::restart_receiver`] with `env` added to `serve`'s environment
    /// (e.g. [`crate::faultfs_library`] as `LD_PRELOAD`).
    pub fn restart_receiver_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.receiver.kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let d = Daemon::spawn({
                let mut c = self.serve_command();
                c.envs(env.iter().copied());
                c
            })?;
            match d.wait_for_log("listening on", Duration::from_secs(10)) {
                Ok(()) => {
                    self.receiver = d;
                    return Ok(());
                }
                // The killed process may still hold the port for a moment.
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("receiver restart: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The command that runs this site's `serve` (for tests that start it
    /// themselves).
    pub fn serve_command(&self) -> Command {
        let mut c = serve_cmd(self.netns.as_deref());
        c.args(["serve", "--config", path(&self.config())]);
        c
    }

    /// `init` of a second, unrelated receiver (another CA) in this site's
    /// directory; returns its directory.
    pub fn unrelated_receiver(&self) -> anyhow::Result<PathBuf> {
        let other = self.dir.path().join("other");
        run_ok(receiver_cmd().args([
            "init",
            "--dir",
            path(&other),
            "--name",
            "other",
            "--image-dir",
            path(&other.join("i")),
            "--retention-dir",
            path(&other.join("r")),
            "--retention-on-root-filesystem",
        ]))?;
        Ok(other)
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("rx/receiver.toml")
    }

    /// Issues an agent's files into `<tmp>/<name>` pointing at `target`,
    /// with the given disks appended to its agent.toml.
    pub fn agent(
        &self,
        name: &str,
        target: SocketAddr,
        disks: &[(&Path, &str)],
    ) -> anyhow::Result<PathBuf> {
        let out = self.dir.path().join(name);
        run_ok(receiver_cmd().args([
            "issue-cert",
            "--dir",
            path(&self.dir.path().join("rx")),
            "--name",
            name,
            "--receiver",
            &target.to_string(),
            "--out",
            path(&out),
        ]))?;
        let cfg = out.join("agent.toml");
        // State and socket in the test's own directory, never the host's.
        let mut text = format!(
            "state_dir = \"{}\"\nadmin_socket = \"{}\"\n{}",
            out.join("state").display(),
            out.join("agent.sock").display(),
            std::fs::read_to_string(&cfg)?
        );
        for (dev, id) in disks {
            text.push_str(&format!(
                "\n[[disk]]\ndevice = \"{}\"\nid = \"{id}\"\n",
                dev.display()
            ));
        }
        std::fs::write(&cfg, text)?;
        Ok(cfg)
    }

    /// The data file of a disk's replica: the flat extent of the default
    /// live format, a flat VMDK.
    pub fn image(&self, disk_id: &str) -> PathBuf {
        self.dir
            .path()
            .join("images")
            .join(format!("{disk_id}-flat.vmdk"))
    }

    /// A certificate directory for agent `name` with no disks (for a raw
    /// protocol client that registers its own).
    pub fn agent_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let cfg = self.agent(name, self.addr, &[])?;
        Ok(cfg
            .parent()
            .ok_or_else(|| anyhow::anyhow!("agent config {} has no directory", cfg.display()))?
            .to_path_buf())
    }

    /// Ids of the points `points --json` lists.
    pub fn listed_point_ids(&self) -> anyhow::Result<Vec<u64>> {
        Ok(self.points_json()?["points"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("points --json has no points array"))?
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect())
    }

    pub fn export(&self, disk: &str, point: &str) -> anyhow::Result<Vec<u8>> {
        let out = self.dir.path().join(format!("export-{disk}-{point}.raw"));
        run_ok(receiver_cmd().args([
            "export",
            "--config",
            path(&self.config()),
            "--disk",
            disk,
            "--point",
            point,
            "--format",
            "raw",
            "--out",
            path(&out),
        ]))?;
        let bytes = std::fs::read(&out)?;
        std::fs::remove_file(&out)?;
        Ok(bytes)
    }

    /// The kind of a listed point, if it is listed.
    pub fn point_kind(&self, id: u64) -> anyhow::Result<Option<String>> {
        let points = self.points_json()?;
        Ok(points["points"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["id"] == id))
            .and_then(|p| p["kind"].as_str())
            .map(str::to_owned))
    }

    /// `tidemark-receiver status --json` of the running receiver.
    pub fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        let out =
            run_ok(receiver_cmd().args(["status", "--config", path(&self.config()), "--json"]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn points_json(&self) -> anyhow::Result<serde_json::Value> {
        let out =
            run_ok(receiver_cmd().args(["points", "--config", path(&self.config()), "--json"]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// The receiver binary, entered into a network namespace when given one.
fn serve_cmd(netns: Option<&Path>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .arg("--")
                .arg(workspace_bin("tidemark-receiver"));
            c
        }
        None => receiver_cmd(),
    }
}

pub fn receiver_cmd() -> Command {
    Command::new(workspace_bin("tidemark-receiver"))
}

pub fn agent_sync(cfg: &Path, extra: &[&str]) -> Output {
    Command::new(workspace_bin("tidemark-agent"))
        .args(["sync", "--config", path(cfg)])
        .args(extra)
        .env("TIDEMARK_LOG", "info")
        .output()
        .expect("agent binary runs")
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

pub fn run_ok(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// The point id the agent printed.
pub fn point_id(out: &Output) -> anyhow::Result<u64> {
    ensure!(
        out.status.success(),
        "sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone())?;
    text.trim()
        .parse()
        .with_context(|| format!("stdout {text:?} is not a point id"))
}

/// The last line of stderr, which is the error line on failure.
pub fn error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines().last().unwrap_or("").to_owned()
}

pub fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure, got success");
    let line = error_line(out);
    assert!(
        line.starts_with("error: "),
        "last line is not the error: {line:?}"
    );
    for n in needles {
        assert!(line.contains(n), "error line {line:?} lacks {n:?}");
    }
}
