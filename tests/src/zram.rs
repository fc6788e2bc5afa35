//! A zram device: the bio-based block device this machine can make on
//! demand (device-mapper, md and brd are not here). Its writes show as
//! `block_bio_complete`, never `block_rq_complete` (CBT.md §1).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};

use crate::prereq::require_root;

const CONTROL: &str = "/sys/class/zram-control";

/// A zram device of a given size, reset and removed on drop.
///
/// Tests that create one should hold [`crate::kernel_lock`].
#[derive(Debug)]
pub struct ZramDev {
    index: u32,
    device: PathBuf,
    size_bytes: u64,
}

impl ZramDev {
    /// Adds a zram device (`hot_add`) of `size_bytes`, zero-filled.
    pub fn create(size_bytes: u64) -> anyhow::Result<ZramDev> {
        require_root().context("ZramDev::create")?;
        if !Path::new(CONTROL).is_dir() {
            // The module may be built but not loaded.
            let _ = std::process::Command::new("modprobe").arg("zram").status();
        }
        let added =
            std::fs::read_to_string(Path::new(CONTROL).join("hot_add")).with_context(|| {
                format!("{CONTROL}/hot_add: this test needs the zram module (modprobe zram)")
            })?;
        let index: u32 = added
            .trim()
            .parse()
            .with_context(|| format!("{CONTROL}/hot_add printed {added:?}"))?;
        let dev = ZramDev {
            index,
            device: PathBuf::from(format!("/dev/zram{index}")),
            size_bytes,
        };
        // From here on the guard removes the device if a step fails.
        std::fs::write(dev.sysfs().join("disksize"), size_bytes.to_string())
            .with_context(|| format!("size {}", dev.device.display()))?;
        let sectors: u64 = std::fs::read_to_string(dev.sysfs().join("size"))?
            .trim()
            .parse()?;
        ensure!(
            sectors * 512 == size_bytes,
            "{} has {sectors} sectors, expected {size_bytes} bytes",
            dev.device.display()
        );
        Ok(dev)
    }

    /// The device node, `/dev/zramN`.
    pub fn path(&self) -> &Path {
        &self.device
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn sysfs(&self) -> PathBuf {
        Path::new("/sys/block").join(format!("zram{}", self.index))
    }

    /// Writes `data` at `offset` through the block device, then fsyncs it.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.device)
            .with_context(|| format!("open {} for writing", self.device.display()))?;
        file.write_all_at(data, offset)
            .with_context(|| format!("write at {offset} to {}", self.device.display()))?;
        file.sync_all()
            .with_context(|| format!("fsync {}", self.device.display()))
    }

    /// Reads the whole device.
    pub fn read_all(&self) -> anyhow::Result<Vec<u8>> {
        std::fs::read(&self.device).with_context(|| format!("read {}", self.device.display()))
    }
}

impl Drop for ZramDev {
    fn drop(&mut self) {
        // reset frees its memory; hot_remove then takes the node away.
        let reset = std::fs::write(self.sysfs().join("reset"), "1");
        let removed = std::fs::write(
            Path::new(CONTROL).join("hot_remove"),
            self.index.to_string(),
        );
        if let Err(e) = reset.and(removed) {
            eprintln!(
                "tidemark-tests: cannot remove {}: {e}",
                self.device.display()
            );
        }
    }
}
