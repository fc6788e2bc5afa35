//! One-at-a-time access to shared kernel resources (loop devices, tracefs),
//! across the threads of one test binary and across test binaries.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};

/// The file whose exclusive `flock` serialises tests across processes.
pub const KERNEL_LOCK_PATH: &str = "/run/lock/tidemark-tests.lock";

static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Held while a test uses a shared kernel resource; released on drop.
///
/// Holds the in-process mutex and an exclusive `flock` on
/// [`KERNEL_LOCK_PATH`] (or a file of the same name in the temp dir when
/// `/run/lock` cannot be used).
pub struct KernelLock {
    // Field order is drop order: the cross-process lock goes first, then the
    // in-process mutex, the reverse of the order they were taken in.
    _flock: Flock<File>,
    _guard: MutexGuard<'static, ()>,
}

impl std::fmt::Debug for KernelLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelLock")
    }
}

/// Takes the process-wide and machine-wide test lock, waiting as long as it
/// takes. A poisoned mutex (an earlier test panicked while holding it) is
/// recovered: the kernel resources were released by that test's guards.
///
/// # Panics
/// If no lock file can be opened or locked at all.
pub fn kernel_lock() -> KernelLock {
    let guard = IN_PROCESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (path, file) = open_lock_file();
    let flock = match Flock::lock(file, FlockArg::LockExclusive) {
        Ok(flock) => flock,
        Err((_, errno)) => panic!("flock {}: {errno}", path.display()),
    };
    KernelLock {
        _flock: flock,
        _guard: guard,
    }
}

fn open_lock_file() -> (PathBuf, File) {
    let primary = PathBuf::from(KERNEL_LOCK_PATH);
    let fallback = std::env::temp_dir().join("tidemark-tests.lock");
    let mut errors = Vec::new();
    for path in [primary, fallback] {
        match open_one(&path) {
            Ok(file) => return (path, file),
            Err(err) => errors.push(format!("{}: {err}", path.display())),
        }
    }
    panic!("cannot open a test lock file: {}", errors.join("; "));
}

fn open_one(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        // /run/lock exists on Debian; create it where it does not.
        let _ = std::fs::create_dir_all(dir);
    }
    // flock works on read-only descriptors, so a lock file created by another
    // user (mode 0644) is still usable.
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .or_else(|_| File::open(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn excludes_threads_and_survives_poison() {
        let inside = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let inside = Arc::clone(&inside);
                std::thread::spawn(move || {
                    let _lock = kernel_lock();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    std::thread::sleep(Duration::from_millis(10));
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .expect("no thread saw another inside the lock");
        }

        let poisoner = std::thread::spawn(|| {
            let _lock = kernel_lock();
            panic!("poison the lock on purpose");
        });
        assert!(poisoner.join().is_err());
        drop(kernel_lock());
    }
}
