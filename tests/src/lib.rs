//! Shared helpers for tidemark's end-to-end tests (`tests/tests/*.rs`).
//!
//! Everything here is test support: it talks to the real kernel (loop
//! devices, `flock`), real processes and real sockets on 127.0.0.1. A missing
//! prerequisite (not root, no `losetup`) is reported as an error so that the
//! test calling it fails; nothing here skips a test silently.
//!
//! - [`LoopDev`]: a file-backed loop device, detached on drop.
//! - [`ZramDev`]: a zram device, the bio-based disk at hand; removed on drop.
//! - [`Volume`]: a file system on a loop device, unmounted on drop.
//! - [`fill_mixed`]: a deterministic mix of random, compressible and zero data.
//! - [`CountingProxy`]: a TCP proxy counting wire bytes, with fault hooks.
//! - [`netns::NetPair`]: agent and receiver namespaces joined by a veth pair.
//! - [`Daemon`]: a child process with its output captured, killed on drop.
//! - [`workspace_bin`]: the path of a freshly built workspace binary.
//! - [`faultfs_library`]: an `LD_PRELOAD` library injecting storage faults.
//! - [`NotifySocket`]: systemd's notification socket, for READY/WATCHDOG.
//! - [`metrics`]: a daemon's Prometheus endpoint, scraped and parsed.
//! - [`raw`]: a protocol client scripting messages over real TLS.
//! - [`VersionRelay`]: a TLS relay that makes the receiver look like one of
//!   an older protocol version.
//! - [`ReadCap`]: a process's reads of a device throttled (cgroup blkio).
//! - [`kernel_lock`]: run tests that share kernel resources one at a time.
//! - [`free_port`], [`require_root`], [`require_cmd`].

mod bins;
mod daemon;
mod fill;
pub mod fuzzing;
mod lock;
mod loopdev;
pub mod metrics;
mod net;
pub mod netns;
mod notify;
mod prereq;
pub mod raw;
mod readcap;
mod relay;
pub mod running;
pub mod site;
mod volume;
mod zram;

pub use bins::{faultfs_library, workspace_bin, workspace_root};
pub use daemon::Daemon;
pub use fill::{
    fill_mixed, plan_fill, region_bytes, scatter_blocks, FillKind, FillRegion, FillReport,
    SplitMix64,
};
pub use lock::{kernel_lock, KernelLock, KERNEL_LOCK_PATH};
pub use loopdev::LoopDev;
pub use net::{free_port, CountingProxy};
pub use notify::NotifySocket;
pub use prereq::{require_cmd, require_root};
pub use readcap::ReadCap;
pub use relay::VersionRelay;
pub use volume::Volume;
pub use zram::ZramDev;

/// Trials a randomized fault test runs: `TIDEMARK_TRIALS` when set (the
/// soak script's 50 and more), else the suite's `default`.
pub fn trials(default: usize) -> usize {
    std::env::var("TIDEMARK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A randomized fault test's seed: `base`, varied by `TIDEMARK_SEED` when
/// set (the soak script's rounds), so a failure is reproduced by setting
/// the same value.
pub fn seed(base: u64) -> u64 {
    let extra: u64 = std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    base ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
