//! A file system on a loop device, mounted for as long as the guard lives.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};

use crate::LoopDev;

/// Mounted at `dir`; unmounted on drop, then its loop device detached.
/// When the unmount fails (a process still has files open there) it is
/// done lazily and the device clears itself once the last user goes.
#[derive(Debug)]
pub struct Volume {
    dir: PathBuf,
    dev: Option<LoopDev>,
}

impl Volume {
    /// Mounts `dev` (holding a file system) at `dir`.
    pub fn mount(dev: LoopDev, dir: &Path) -> anyhow::Result<Volume> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let out = Command::new("mount")
            .arg(dev.path())
            .arg(dir)
            .output()
            .context("run mount")?;
        ensure!(
            out.status.success(),
            "mount {} {} failed: {}",
            dev.path().display(),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Volume {
            dir: dir.to_path_buf(),
            dev: Some(dev),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loop device's backing file.
    pub fn backing(&self) -> &Path {
        self.dev.as_ref().expect("present until drop").backing()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let clean = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        drop(self.dev.take());
    }
}
