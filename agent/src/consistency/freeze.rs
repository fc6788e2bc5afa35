//! FIFREEZE/FITHAW on every filesystem mounted from the protected disks.
//! A [`Frozen`] guard thaws on drop, so no error path leaves a machine's
//! filesystems frozen.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

// FIFREEZE and FITHAW are _IOWR('X', 119, int) and _IOWR('X', 120, int)
// (include/uapi/linux/fs.h).
nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot read {}", path.display())]
    ReadMounts {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open mount point {} to write it back or freeze it", path.display())]
    OpenMount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("freezing {} failed", path.display())]
    Freeze { path: PathBuf, source: nix::Error },
    #[error("writing back the dirty pages of {} failed", path.display())]
    Sync { path: PathBuf, source: nix::Error },
    #[error("the freeze was given up")]
    GivenUp,
}

/// Devices as "major:minor": a disk and its partitions.
pub fn disk_devices(sysfs_dev_dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let dev = |p: &Path| {
        std::fs::read_to_string(p.join("dev"))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    if let Some(d) = dev(sysfs_dev_dir) {
        out.insert(d);
    }
    if let Ok(entries) = std::fs::read_dir(sysfs_dev_dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("partition").exists() {
                if let Some(d) = dev(&p) {
                    out.insert(d);
                }
            }
        }
    }
    out
}

/// Mount points of filesystems on any of `devices`, from mountinfo.
pub fn mount_points(devices: &BTreeSet<String>) -> Result<Vec<PathBuf>, FreezeError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| FreezeError::ReadMounts {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        // id parent major:minor root mountpoint ...
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 4 && devices.contains(f[2]) {
            out.insert(PathBuf::from(unescape(f[4])));
        }
    }
    Ok(out.into_iter().collect())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Frozen filesystems; thawed when dropped.
pub struct Frozen {
    mounts: Vec<(PathBuf, File)>,
    pub frozen_at: Instant,
    /// How long freezing took (FIFREEZE flushes dirty data first).
    pub freeze_time: Duration,
}

impl Frozen {
    pub fn mount_points(&self) -> impl Iterator<Item = &Path> {
        self.mounts.iter().map(|(p, _)| p.as_path())
    }

    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    /// Thaws now; returns how long the filesystems were frozen.
    pub fn thaw(mut self) -> Duration {
        self.thaw_all();
        self.frozen_at.elapsed()
    }

    /// Leaves the filesystems frozen (planned failover with `leave =
    /// "frozen"`): nothing may change on this machine after its final
    /// point. Returns how long they have been frozen so far.
    pub fn keep(mut self) -> Duration {
        // Dropping the files keeps the freeze: it belongs to the
        // filesystem, not to the descriptor that asked for it.
        self.mounts.clear();
        self.frozen_at.elapsed()
    }

    fn thaw_all(&mut self) {
        for (path, f) in self.mounts.drain(..).rev() {
            thaw_one(&path, &f);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw_all();
    }
}

/// A freeze (or the syncfs before it, [`Attempt::sync`]) that can be
/// given up while the call blocks. FIFREEZE waits for every write under
/// way on the filesystem to finish (a writer stuck in the kernel holds it
/// forever) and cannot be cancelled; meanwhile new writers on that
/// filesystem wait too. Giving up thaws at once the filesystems frozen so
/// far, which would otherwise stay frozen behind the one that hangs, and
/// the call that hangs thaws its own filesystem when it returns.
#[derive(Clone)]
pub struct Attempt {
    shared: Arc<Mutex<Progress>>,
}

#[derive(Default)]
struct Progress {
    frozen: Vec<(PathBuf, File)>,
    given_up: bool,
    returned: bool,
}

impl Attempt {
    pub fn new() -> Self {
        Self {
            shared: Arc::default(),
        }
    }

    /// Freezes every mount point, in order (blocking); on any failure, or
    /// if the attempt is given up meanwhile, thaws those already frozen
    /// and returns the error. An empty list freezes nothing.
    pub fn run(&self, mounts: &[PathBuf]) -> Result<Frozen, FreezeError> {
        let started = Instant::now();
        let outcome = self.freeze_each(mounts);
        let mut p = self.lock();
        p.returned = true;
        if p.given_up {
            // Whatever it froze is thawed already (`give_up`, or
            // `freeze_each` on seeing it given up).
            let how = match outcome {
                Err(FreezeError::GivenUp) | Ok(()) => "it is thawed".to_owned(),
                Err(e) => format!("{:#}", anyhow::Error::from(e)),
            };
            warn!(
                "a freeze given up earlier returned after {:.1} s: {how}",
                started.elapsed().as_secs_f64()
            );
            return Err(FreezeError::GivenUp);
        }
        let frozen = std::mem::take(&mut p.frozen);
        drop(p);
        let mut frozen = Frozen {
            mounts: frozen,
            frozen_at: Instant::now(),
            freeze_time: started.elapsed(),
        };
        match outcome {
            Ok(()) => Ok(frozen),
            Err(e) => {
                frozen.thaw_all();
                Err(e)
            }
        }
    }

    /// Writes the dirty pages of every filesystem in `mounts` back
    /// (syncfs), without freezing them; may block as long as a freeze
    /// would, so it is an attempt that can be given up too.
    pub fn sync(&self, mounts: &[PathBuf]) -> Result<(), FreezeError> {
        let started = Instant::now();
        let outcome = mounts.iter().try_for_each(|m| {
            nix::unistd::syncfs(open_mount(m)?).map_err(|source| FreezeError::Sync {
                path: m.clone(),
                source,
            })
        });
        let mut p = self.lock();
        p.returned = true;
        if p.given_up {
            warn!(
                "a syncfs given up earlier returned after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        outcome
    }

    fn freeze_each(&self, mounts: &[PathBuf]) -> Result<(), FreezeError> {
        for m in mounts {
            let f = open_mount(m)?;
            let mut arg: nix::libc::c_int = 0;
            // SAFETY: FIFREEZE reads no memory through its argument; `arg`
            // is a live c_int for the call and `f` is an open directory fd.
            unsafe { fifreeze(f.as_raw_fd(), &mut arg) }.map_err(|source| FreezeError::Freeze {
                path: m.clone(),
                source,
            })?;
            let mut p = self.lock();
            if p.given_up {
                drop(p);
                thaw_one(m, &f);
                return Err(FreezeError::GivenUp);
            }
            p.frozen.push((m.clone(), f));
        }
        Ok(())
    }

    /// Gives the attempt up: what it froze so far is thawed now, and what
    /// it freezes later as soon as its FIFREEZE returns.
    pub fn give_up(&self) {
        let mut p = self.lock();
        p.given_up = true;
        for (path, f) in p.frozen.drain(..).rev() {
            thaw_one(&path, &f);
        }
    }

    /// Whether the blocking part has returned (a given-up attempt may still
    /// hang in FIFREEZE).
    pub fn returned(&self) -> bool {
        self.lock().returned
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        // A panic while holding the lock cannot leave `Progress` half
        // updated: each update is a single push, drain or assignment.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Attempt {
    fn default() -> Self {
        Self::new()
    }
}

fn open_mount(m: &Path) -> Result<File, FreezeError> {
    File::open(m).map_err(|source| FreezeError::OpenMount {
        path: m.to_path_buf(),
        source,
    })
}

fn thaw_one(path: &Path, f: &File) {
    let mut arg: nix::libc::c_int = 0;
    // SAFETY: FITHAW reads no memory through its argument on any kernel we
    // support; `arg` is a live c_int for the call and the fd is open for
    // its duration.
    if let Err(e) = unsafe { fithaw(f.as_raw_fd(), &mut arg) } {
        warn!("thawing {} failed: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn nothing_to_freeze_is_fine() {
        let f = Attempt::new().run(&[]).expect("empty freeze");
        assert!(f.is_empty());
        f.thaw();
    }
}
