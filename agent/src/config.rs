//! `agent.toml`: who this agent is, where its receiver is, which disks it
//! protects.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tidemark_common::config::{load_toml, resolve, ConfigError};
use tidemark_common::tls::{TlsFiles, RECEIVER_SERVER_NAME};

use crate::source::Pages;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name; must equal the CN of `cert`.
    pub name: String,
    /// Receiver address, HOST:PORT.
    pub receiver: String,
    /// Name verified in the receiver's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA certificate the receiver's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// This agent's certificate (PEM).
    pub cert: PathBuf,
    /// This agent's private key (PEM).
    pub key: PathBuf,
    /// Reads kept in flight per disk (io_uring queue depth) by `run`.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// The same for the one-shot `sync` and `resync` commands.
    #[serde(default = "default_sync_queue_depth")]
    pub sync_queue_depth: usize,
    /// Compressed bytes sent but not yet acknowledged durable, in MiB.
    /// `run` lets its data go once written between points (a lost
    /// connection's is read again); a point's and a `sync`'s are held for
    /// a resend.
    #[serde(default = "default_send_window_mib")]
    pub send_window_mib: u64,
    /// Compression threads; 0 means one per CPU.
    #[serde(default)]
    pub compress_threads: usize,
    /// zstd level: higher trades CPU for bandwidth; negative levels are
    /// zstd's fast ones (`zstd --fast=N` is level -N), for links that are
    /// faster than the CPU can compress; 0 sends everything uncompressed.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Where `run` keeps each disk's dirty map and fingerprint between runs.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Unix socket the running agent answers `bookmark` and `status` on.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// How often `run` ships dirty data while writes are sparse, in ms;
    /// a larger backlog ships at once (`run::SHIP_NOW_BYTES`).
    #[serde(default = "default_cycle_ms")]
    pub cycle_ms: u64,
    /// Crash-consistent point interval in seconds (0: only on bookmark).
    #[serde(default = "default_crash_interval")]
    pub crash_consistent_interval_secs: u64,
    /// App-consistent point interval in seconds (0: only on bookmark).
    #[serde(default = "default_app_interval")]
    pub app_consistent_interval_secs: u64,
    /// Directory of pre*/post* scripts run around app-consistent points.
    #[serde(default = "default_scripts_dir")]
    pub scripts_dir: PathBuf,
    /// Longest a pre or post script may run, in seconds.
    #[serde(default = "default_script_timeout")]
    pub script_timeout_secs: u64,
    /// Longest wait for a point's syncfs, and for its FIFREEZE, in
    /// seconds.
    #[serde(default = "default_freeze_timeout")]
    pub freeze_timeout_secs: u64,
    /// While replication is less than this many seconds behind, and no
    /// disk resyncs, `run`'s read, compression and sending threads run
    /// under SCHED_IDLE, giving way to the machine's own work; further
    /// behind, they compete at the agent's own priority until it has
    /// caught up. 0: they always compete (`priority` module).
    #[serde(default = "default_yield_cpu_lag_secs")]
    pub yield_cpu_lag_secs: u64,
    /// Trace ring buffer per CPU, in KiB.
    #[serde(default = "default_trace_buffer_kb")]
    pub trace_buffer_kb: u32,
    /// A point waits while more than this many bytes are dirty, so that the
    /// freeze only covers a short read and the memory it reads into stays
    /// small.
    #[serde(default = "default_point_max_backlog")]
    pub point_max_backlog_bytes: u64,
    /// What `failover` leaves behind after the final point: `stopped`
    /// (filesystems thawed, agent stopped; the workload stays stopped if a
    /// pre script stopped it, post scripts are not run) or `frozen`
    /// (filesystems stay frozen: nothing can change after the point).
    #[serde(default)]
    pub failover_leave: FailoverLeave,
    /// Address of the Prometheus text endpoint (`GET /metrics`); off when
    /// absent.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Allow `metrics_listen` on an address other than loopback (the
    /// endpoint has no authentication).
    #[serde(default)]
    pub metrics_allow_remote: bool,
    /// Send and read caps (`[throttle]`, `[[throttle.window]]`).
    #[serde(default)]
    pub throttle: crate::throttle::ThrottleConfig,
    /// A connection on which the receiver has not answered for this long
    /// (heartbeats go every 10 s), or on which a write has not moved for
    /// this long, is given up and made again. A link on which a 1 MiB
    /// frame takes longer than this to cross needs more (60 s covers
    /// 256 kbit/s).
    #[serde(default = "default_receiver_timeout")]
    pub receiver_timeout_secs: u64,
    /// Disks to protect.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverLeave {
    #[default]
    Stopped,
    Frozen,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Block device path, e.g. /dev/sdb or /dev/disk/by-id/...
    pub device: PathBuf,
    /// Stable id; defaults to the disk's WWID, serial or by-id name.
    pub id: Option<String>,
}

fn default_server_name() -> String {
    RECEIVER_SERVER_NAME.to_owned()
}
/// Eight 1 MiB reads in flight drained a backlog as fast as sixteen on the
/// benchmark machine, with 6–12 MiB less peak RSS and less added latency
/// for the guest (docs/BENCHMARKS.md, 2026-12-05).
fn default_queue_depth() -> usize {
    8
}
/// The one-shot commands read a whole disk, and nothing there is
/// targeted but their speed: on the benchmark machine a 4 GiB checksum
/// resync took 2.07 s at the median with sixteen reads in flight and
/// 2.36 s with eight, faster in three of four alternating pairs and level
/// in the fourth; a full sync took no longer beyond the noise
/// (docs/BENCHMARKS.md, 2026-12-05, fifth session). It costs 8 MiB more
/// read buffers while they run. `run`'s own resyncs keep `queue_depth`:
/// the daemon's memory is bounded by it.
fn default_sync_queue_depth() -> usize {
    16
}
fn default_send_window_mib() -> u64 {
    crate::shipper::WINDOW_BYTES >> 20
}
/// Below this, zstd's fast levels barely compress fio-like data at all
/// while still costing a pass over it.
const MIN_ZSTD_LEVEL: i32 = -7;
fn default_zstd_level() -> i32 {
    1
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tidemark-agent")
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/tidemark/agent.sock")
}
fn default_cycle_ms() -> u64 {
    1000
}
fn default_crash_interval() -> u64 {
    300
}
fn default_app_interval() -> u64 {
    3600
}
fn default_scripts_dir() -> PathBuf {
    PathBuf::from("/etc/tidemark/scripts")
}
fn default_script_timeout() -> u64 {
    60
}
fn default_freeze_timeout() -> u64 {
    60
}
/// The lag target: yielding never costs more than that.
fn default_yield_cpu_lag_secs() -> u64 {
    5
}
fn default_trace_buffer_kb() -> u32 {
    4096
}
/// Six heartbeats: a receiver busy with an fsync still answers well
/// within it, and a frame of 1 MiB crosses a 256 kbit/s link in about half.
pub const DEFAULT_RECEIVER_TIMEOUT_SECS: u64 = 60;
/// Above the 10 s heartbeat interval with room for one late answer.
pub const MIN_RECEIVER_TIMEOUT_SECS: u64 = 15;
fn default_receiver_timeout() -> u64 {
    DEFAULT_RECEIVER_TIMEOUT_SECS
}
/// 24 MiB: a point holds what it reads under the freeze in memory until
/// it is sent, and where points come often that is the agent's peak RSS
/// (32 MiB put it at 57–62 MiB with ext4 under 100–150 MB/s of churn,
/// 24 MiB at 51–59, points as often and freezes no longer:
/// docs/BENCHMARKS.md, 2026-12-05, fourth session). 16 MiB took another
/// 6–12 MiB off, but at 150 MB/s the backlog then never fell low enough
/// and no point came for the whole 15 s step (fifth session).
fn default_point_max_backlog() -> u64 {
    24 << 20
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut c: AgentConfig = load_toml(path)?;
        for p in [
            &mut c.ca,
            &mut c.cert,
            &mut c.key,
            &mut c.state_dir,
            &mut c.admin_socket,
            &mut c.scripts_dir,
        ] {
            *p = resolve(path, p);
        }
        c.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.disks.is_empty() {
            return Err(
                "no disks configured; add a [[disk]] table with device = \"/dev/...\"".into(),
            );
        }
        if self
            .receiver
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("receiver = {:?} must be HOST:PORT", self.receiver));
        }
        if !(1..=1024).contains(&self.queue_depth) {
            return Err("queue_depth must be between 1 and 1024".into());
        }
        if !(1..=1024).contains(&self.sync_queue_depth) {
            return Err("sync_queue_depth must be between 1 and 1024".into());
        }
        if !(1..=1024).contains(&self.send_window_mib) {
            return Err(format!(
                "send_window_mib = {} must be between 1 and 1024 (the default is {})",
                self.send_window_mib,
                default_send_window_mib()
            ));
        }
        if !(10..=60_000).contains(&self.cycle_ms) {
            return Err("cycle_ms must be between 10 and 60000".into());
        }
        if self.crash_consistent_interval_secs != 0 && self.crash_consistent_interval_secs < 5 {
            return Err("crash_consistent_interval_secs must be 0 (off) or at least 5".into());
        }
        if self.freeze_timeout_secs == 0 {
            return Err(format!(
                "freeze_timeout_secs must be at least 1 (the default is {})",
                default_freeze_timeout()
            ));
        }
        if self.trace_buffer_kb < 4 {
            return Err("trace_buffer_kb must be at least 4".into());
        }
        if self.receiver_timeout_secs < MIN_RECEIVER_TIMEOUT_SECS {
            return Err(format!(
                "receiver_timeout_secs = {} would drop healthy connections (heartbeats go every 10 s); use at least {MIN_RECEIVER_TIMEOUT_SECS} (the default is {DEFAULT_RECEIVER_TIMEOUT_SECS})",
                self.receiver_timeout_secs
            ));
        }
        if !(MIN_ZSTD_LEVEL..=19).contains(&self.zstd_level) {
            return Err(format!(
                "zstd_level = {} is not a level this agent uses: pick 1 to 19, {MIN_ZSTD_LEVEL} to -1 for zstd's fast levels, or 0 for no compression",
                self.zstd_level
            ));
        }
        tidemark_common::config::check_metrics_listen(
            self.metrics_listen,
            self.metrics_allow_remote,
        )?;
        self.send_throttle()?;
        self.read_limit()?;
        Ok(())
    }

    /// The send cap schedule; None when nothing is ever capped.
    pub fn send_throttle(&self) -> Result<Option<crate::throttle::SendThrottle>, String> {
        let schedule = crate::throttle::Schedule::from_config(&self.throttle)?;
        Ok(crate::throttle::SendThrottle::new(schedule))
    }

    /// The read cap of `sync`, `resync` and resyncs in `run`, if any.
    pub fn read_limit(&self) -> Result<Option<crate::throttle::ReadLimit>, String> {
        Ok(match &self.throttle.sync_read_rate {
            Some(v) => crate::throttle::parse_rate("throttle.sync_read_rate", v)?
                .map(crate::throttle::ReadLimit::new),
            None => None,
        })
    }

    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// `run`'s pipeline settings with a buffer pool of their own; build
    /// once per run and reuse. Its buffers are in base pages, resident
    /// only once read into: an idle agent stays small.
    pub fn pipeline_settings(&self) -> crate::pipeline::Settings {
        self.pipeline_settings_at(self.queue_depth, Pages::Small)
    }

    /// The same for the one-shot `sync` and `resync` commands, whose reads
    /// go into huge pages: whole-disk reads, every buffer in use at once.
    pub fn sync_pipeline_settings(&self) -> crate::pipeline::Settings {
        self.pipeline_settings_at(self.sync_queue_depth, Pages::Huge)
    }

    fn pipeline_settings_at(&self, queue_depth: usize, pages: Pages) -> crate::pipeline::Settings {
        crate::pipeline::Settings {
            queue_depth,
            compress_threads: self.compress_threads(),
            zstd_level: self.zstd_level,
            read_limit: self.read_limit().ok().flatten(),
            pool: crate::pipeline::Settings::pool_for(queue_depth, self.compress_threads(), pages),
        }
    }

    pub fn send_window_bytes(&self) -> u64 {
        self.send_window_mib << 20
    }

    pub fn compress_threads(&self) -> usize {
        if self.compress_threads > 0 {
            self.compress_threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example must stay loadable by the real loader.
    #[test]
    fn example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/examples/agent.toml");
        let c = AgentConfig::load(&path).expect("systemd/examples/agent.toml loads");
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.admin_socket, default_admin_socket());
        assert_eq!(c.state_dir, default_state_dir());
        assert_eq!(c.point_max_backlog_bytes, default_point_max_backlog());
        assert_eq!(c.queue_depth, default_queue_depth());
        assert_eq!(c.sync_queue_depth, default_sync_queue_depth());
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    const BASE: &str = "name = \"a\"\nreceiver = \"r:443\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"k.pem\"\n[[disk]]\ndevice = \"/dev/null\"\n";

    fn load(extra: &str) -> Result<AgentConfig, String> {
        load_with("", extra)
    }

    #[test]
    fn the_one_shot_commands_read_at_their_own_depth() {
        let c = load_with("queue_depth = 4\nsync_queue_depth = 32\n", "").expect("loads");
        assert_eq!(c.pipeline_settings().queue_depth, 4);
        assert_eq!(c.sync_pipeline_settings().queue_depth, 32);
        let err = load_with("sync_queue_depth = 0\n", "").expect_err("0 is refused");
        assert!(err.contains("sync_queue_depth"), "{err}");
    }

    /// `top` goes before every table, `extra` after BASE's.
    fn load_with(top: &str, extra: &str) -> Result<AgentConfig, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, format!("{top}{BASE}{extra}")).expect("write");
        AgentConfig::load(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn throttle_tables_load() {
        let c = load(
            "[throttle]\nrate = \"20 MiB/s\"\nsync_read_rate = 52428800\n\
             [[throttle.window]]\ndays = [\"mon-fri\"]\nfrom = \"08:00\"\nto = \"18:00\"\nrate = \"4 MiB/s\"\n\
             [[throttle.window]]\ndays = [\"sat\", \"sun\"]\nfrom = \"22:00\"\nto = \"06:00\"\nrate = \"unlimited\"\n",
        )
        .expect("valid");
        assert_eq!(c.read_limit().unwrap().map(|l| l.rate), Some(50 << 20));
        assert!(c.send_throttle().unwrap().is_some());
        let none = load("").expect("no throttle");
        assert!(none.send_throttle().unwrap().is_none());
        assert!(none.read_limit().unwrap().is_none());
    }

    #[test]
    fn zstd_levels_take_the_fast_ones_and_off_and_refuse_the_rest() {
        for ok in [-7, -1, 0, 1, 19] {
            let c = load_with(&format!("zstd_level = {ok}\n"), "").expect("valid level");
            assert_eq!(c.zstd_level, ok);
        }
        for bad in [-8, 20] {
            let e = load_with(&format!("zstd_level = {bad}\n"), "").expect_err("refused");
            assert!(
                e.contains(&format!("zstd_level = {bad} is not a level")),
                "{e}"
            );
        }
    }

    #[test]
    fn the_freeze_timeout_is_at_least_a_second() {
        assert_eq!(load("").expect("default").freeze_timeout_secs, 60);
        let c = load_with("freeze_timeout_secs = 5\n", "").expect("valid");
        assert_eq!(c.freeze_timeout_secs, 5);
        let e = load_with("freeze_timeout_secs = 0\n", "").expect_err("refused");
        assert!(e.contains("freeze_timeout_secs must be at least 1"), "{e}");
    }

    #[test]
    fn the_send_window_is_set_in_mib_within_bounds() {
        assert_eq!(load("").expect("default").send_window_bytes(), 8 << 20);
        let c = load_with("send_window_mib = 16\n", "").expect("valid");
        assert_eq!(c.send_window_bytes(), 16 << 20);
        for bad in [0, 1025] {
            let e = load_with(&format!("send_window_mib = {bad}\n"), "").expect_err("refused");
            assert!(
                e.contains(&format!(
                    "send_window_mib = {bad} must be between 1 and 1024"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_throttle_values_name_the_key() {
        for (extra, want) in [
            (
                "[throttle]\nrate = 0\n",
                "throttle.rate = 0 must be more than 0",
            ),
            (
                "[throttle]\nsync_read_rate = \"lots\"\n",
                "throttle.sync_read_rate = \"lots\" is not a rate",
            ),
            (
                "[[throttle.window]]\nfrom = \"8h\"\nto = \"18:00\"\nrate = \"1 MiB/s\"\n",
                "[[throttle.window]] number 1: from = \"8h\" is not a time",
            ),
            ("[throttle]\nburst = 3\n", "unknown field `burst`"),
        ] {
            let e = load(extra).expect_err(extra);
            assert!(e.contains(want), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
