//! Network namespaces joined by a veth pair, for tests that put the agent
//! and the receiver on two "machines" and then break the wire between them
//! (link down, `tc tbf` throttle). Everything is removed on drop, also when
//! the test panics; namespaces a killed test run left behind are swept at
//! the next creation.
//!
//! Processes enter a namespace with `nsenter --net`, not `ip netns exec`:
//! the latter also remounts /sys for the namespace, which hides
//! /sys/kernel/tracing from the agent.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context};

use crate::prereq::{require_cmd, require_root};

/// Prefix of every namespace and interface these tests create.
const PREFIX: &str = "tmn";
/// Where `ip netns add` bind-mounts namespaces.
const NETNS_DIR: &str = "/run/netns";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// One named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> anyhow::Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, for `setns` and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// `program` started inside this namespace (network only: mounts,
    /// /sys and tracefs stay the host's). The process keeps the pid
    /// `spawn` reports: nsenter execs it without forking.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs a command inside the namespace and checks it succeeded.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command(argv[0])
            .args(&argv[1..])
            .output()
            .with_context(|| format!("run {} in {}", argv.join(" "), self.name))?;
        ensure!(
            out.status.success(),
            "{} in netns {} failed: {}",
            argv.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Runs `f` on a thread of its own that has entered this namespace:
    /// sockets made there (listeners, outgoing connections) belong to it,
    /// and so do threads that thread spawns.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = std::fs::File::open(self.path())
            .with_context(|| format!("open {}", self.path().display()))?;
        std::thread::spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns into the test namespace")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// Enters this namespace on the calling thread, for threads that live
    /// in it for good (a proxy's accept loop).
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        let file = std::fs::File::open(self.path())
            .with_context(|| format!("open {}", self.path().display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the test namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace also deletes its veth end (and with it the
        // peer) and every qdisc on them.
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("tidemark-tests: {e:#}");
        }
    }
}

/// Two namespaces, "agent" and "receiver", joined by a veth pair:
/// agent 10.77.0.1/24, receiver 10.77.0.2/24. The addresses repeat from
/// test to test; each pair is a world of its own.
#[derive(Debug)]
pub struct NetPair {
    pub agent: Netns,
    pub receiver: Netns,
    agent_if: String,
    receiver_if: String,
}

pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Which end of the veth pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Receiver,
}

impl NetPair {
    /// Needs root, `ip`, `tc` and `nsenter`; fails, never skips, without.
    pub fn create() -> anyhow::Result<NetPair> {
        require_root().context("NetPair::create")?;
        for c in ["ip", "tc", "nsenter"] {
            require_cmd(c).context("NetPair::create")?;
        }
        sweep_stale();
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // Interface names have at most 15 bytes.
        let tag = format!("{PREFIX}{}x{n}", pid % 1_000_000);
        let agent = Netns::add(format!("{PREFIX}-{pid}-{n}-a"))?;
        let receiver = Netns::add(format!("{PREFIX}-{pid}-{n}-r"))?;
        let (agent_if, receiver_if) = (format!("{tag}a"), format!("{tag}r"));
        // Made in the agent's namespace with the peer placed in the
        // receiver's: nothing ever exists in the host's namespace.
        agent.exec(&[
            "ip",
            "link",
            "add",
            &agent_if,
            "type",
            "veth",
            "peer",
            "name",
            &receiver_if,
            "netns",
            receiver.name(),
        ])?;
        for (ns, dev, ip) in [
            (&agent, &agent_if, AGENT_IP),
            (&receiver, &receiver_if, RECEIVER_IP),
        ] {
            ns.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(NetPair {
            agent,
            receiver,
            agent_if,
            receiver_if,
        })
    }

    fn end(&self, side: Side) -> (&Netns, &str) {
        match side {
            Side::Agent => (&self.agent, &self.agent_if),
            Side::Receiver => (&self.receiver, &self.receiver_if),
        }
    }

    /// Takes one end down or up. Down on the receiver's end is a silent
    /// partition for the agent: its route stays, packets vanish, nobody
    /// sends a RST.
    pub fn set_link(&self, side: Side, up: bool) -> anyhow::Result<()> {
        let (ns, dev) = self.end(side);
        ns.exec(&["ip", "link", "set", dev, if up { "up" } else { "down" }])
    }

    /// A token bucket on both ends: `rate` like tc writes it ("1mbit").
    /// Deleted with the namespaces, or by [`NetPair::unthrottle`].
    pub fn throttle(&self, rate: &str) -> anyhow::Result<()> {
        for side in [Side::Agent, Side::Receiver] {
            let (ns, dev) = self.end(side);
            // A burst of 32 kbit and a queue of 400 ms keep the rate honest
            // at 1 Mbit/s without dropping a whole window.
            ns.exec(&[
                "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
                "32kbit", "latency", "400ms",
            ])?;
        }
        Ok(())
    }

    pub fn unthrottle(&self) -> anyhow::Result<()> {
        for side in [Side::Agent, Side::Receiver] {
            let (ns, dev) = self.end(side);
            ns.exec(&["tc", "qdisc", "del", "dev", dev, "root"])?;
        }
        Ok(())
    }

    /// Bytes the agent's end has sent so far.
    pub fn agent_tx_bytes(&self) -> anyhow::Result<u64> {
        let out = self
            .agent
            .command("ip")
            .args(["-s", "-j", "link", "show", &self.agent_if])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .context("tx bytes in ip -s -j link")
    }
}

/// Deletes namespaces left by test processes that no longer exist (a
/// SIGKILLed run cannot clean up after itself).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root: creates a pair, checks both ends talk, and that drop
    /// removes everything.
    #[test]
    fn pair_connects_and_is_removed_on_drop() {
        let pair = NetPair::create().expect("create netns pair");
        let names = (
            pair.agent.name().to_owned(),
            pair.receiver.name().to_owned(),
        );
        let listener = pair
            .receiver
            .run_in(|| std::net::TcpListener::bind((RECEIVER_IP, 9000)))
            .expect("thread in netns")
            .expect("bind in receiver netns");
        let connected = pair
            .agent
            .run_in(|| std::net::TcpStream::connect((RECEIVER_IP, 9000)).map(|_| ()))
            .expect("thread in netns");
        connected.expect("agent reaches receiver over the veth");
        drop(listener);
        pair.throttle("1mbit").expect("tbf");
        pair.unthrottle().expect("tbf removed");
        drop(pair);
        for n in [names.0, names.1] {
            assert!(
                !PathBuf::from(NETNS_DIR).join(&n).exists(),
                "{n} left behind"
            );
        }
    }
}
