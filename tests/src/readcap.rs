//! A cap on how fast a process reads a device: the kernel's block-I/O
//! throttle (cgroup v1 `blkio`), so that a read the agent makes lasts as
//! long as a slow disk's would. This machine has no device-mapper delay
//! target; the throttle delays real bios on the real device.

use std::path::PathBuf;

use anyhow::Context;

use crate::LoopDev;

const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// A blkio cgroup capping reads of one device at a rate, with a process in
/// it; the process goes back to the root group and the group is removed
/// on drop.
pub struct ReadCap {
    dir: PathBuf,
    pid: u32,
}

impl ReadCap {
    /// Caps `pid`'s reads of `dev` at `bytes_per_sec`.
    pub fn start(pid: u32, dev: &LoopDev, bytes_per_sec: u64) -> anyhow::Result<ReadCap> {
        let root = PathBuf::from(BLKIO);
        anyhow::ensure!(
            root.join("blkio.throttle.read_bps_device").exists(),
            "{BLKIO} has no blkio.throttle.read_bps_device: this test needs the cgroup v1 blkio controller mounted there"
        );
        let dir = root.join(format!("tidemark-test-{}-{pid}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let cap = ReadCap { dir, pid };
        let number = std::fs::read_to_string(dev.sysfs()?.join("dev"))?;
        std::fs::write(
            cap.dir.join("blkio.throttle.read_bps_device"),
            format!("{} {bytes_per_sec}", number.trim()),
        )?;
        // cgroup.procs moves every thread of the process, io_uring's
        // workers included.
        std::fs::write(cap.dir.join("cgroup.procs"), pid.to_string())?;
        Ok(cap)
    }
}

impl Drop for ReadCap {
    fn drop(&mut self) {
        let _ = std::fs::write(
            PathBuf::from(BLKIO).join("cgroup.procs"),
            self.pid.to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}
