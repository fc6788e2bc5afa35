//! Faults a real kernel cannot produce on demand here (no device-mapper,
//! no `fail_make_request`), injected into a tidemark process with
//! `LD_PRELOAD`. The production binaries carry no fault code: this library
//! replaces a few libc entry points and, when its variables are unset,
//! only forwards them to the kernel.
//!
//! - `TIDEMARK_FAULT_STOP_AT_SYNC=N`: the Nth `fsync`/`fdatasync` of the
//!   process (counting from its start, across threads) completes, then the
//!   whole process stops (SIGSTOP) before the call returns; any later sync
//!   never returns either. A test then copies the storage (what a power
//!   cut at that instant leaves) and kills the process. Iterating N over a
//!   workload's syncs puts a power cut after every one of them.
//! - `TIDEMARK_FAULT_EIO_PATHS=S` with `TIDEMARK_FAULT_EIO_WHILE=FILE`:
//!   while FILE exists, writes and syncs on descriptors whose path contains
//!   S fail with EIO (as a failing disk's would); deleting FILE clears the
//!   fault. With `TIDEMARK_FAULT_EIO_OPS=sync` only the syncs fail and the
//!   writes land in the page cache: what a disk failing at writeback looks
//!   like (the data is readable, its durability unknown).
//! - `TIDEMARK_FAULT_SLOW_SYNC=S:MS`: syncs on descriptors whose path
//!   contains S take MS milliseconds longer, as on a slow or busy disk
//!   (this machine has no device-mapper delay target), so that what a
//!   process does while a sync is in flight can be tested.
//!
//! Each replacement issues the system call itself rather than looking up
//! the libc symbol it shadows: fewer moving parts inside a preload.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libc::{c_int, c_void, iovec, off64_t, size_t, ssize_t};

static SYNCS: AtomicU64 = AtomicU64::new(0);

struct Config {
    stop_at_sync: Option<u64>,
    eio: Option<(String, std::ffi::CString)>,
    /// Writes fail too, not only syncs.
    eio_writes: bool,
    /// Syncs on paths containing the string are delayed by this long.
    slow_sync: Option<(String, std::time::Duration)>,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let stop_at_sync = std::env::var("TIDEMARK_FAULT_STOP_AT_SYNC")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0);
        let eio = match (
            std::env::var("TIDEMARK_FAULT_EIO_PATHS"),
            std::env::var("TIDEMARK_FAULT_EIO_WHILE"),
        ) {
            (Ok(paths), Ok(flag)) if !paths.is_empty() => {
                std::ffi::CString::new(flag).ok().map(|flag| (paths, flag))
            }
            _ => None,
        };
        let eio_writes = std::env::var("TIDEMARK_FAULT_EIO_OPS").as_deref() != Ok("sync");
        let slow_sync = std::env::var("TIDEMARK_FAULT_SLOW_SYNC")
            .ok()
            .and_then(|v| {
                let (paths, ms) = v.rsplit_once(':')?;
                let ms = ms.parse().ok()?;
                (!paths.is_empty())
                    .then(|| (paths.to_string(), std::time::Duration::from_millis(ms)))
            });
        Config {
            stop_at_sync,
            eio,
            eio_writes,
            slow_sync,
        }
    })
}

/// Whether a write on `fd` must fail with EIO now.
fn write_failing(fd: c_int) -> bool {
    config().eio_writes && failing(fd)
}

/// Whether a sync (or, through [`write_failing`], a write) on `fd` must
/// fail with EIO now.
fn failing(fd: c_int) -> bool {
    let Some((paths, flag)) = &config().eio else {
        return false;
    };
    // SAFETY: `flag` is a valid NUL-terminated string; access only reads it.
    if unsafe { libc::access(flag.as_ptr(), libc::F_OK) } != 0 {
        return false;
    }
    path_contains(fd, paths)
}

/// Whether the path `fd` is open on contains `paths`.
fn path_contains(fd: c_int, paths: &str) -> bool {
    let link = format!("/proc/self/fd/{fd}\0");
    let link = CStr::from_bytes_with_nul(link.as_bytes()).expect("one trailing NUL");
    let mut target = [0u8; 4096];
    // SAFETY: `link` is NUL-terminated and `target` is writable for its length.
    let n = unsafe { libc::readlink(link.as_ptr(), target.as_mut_ptr().cast(), target.len()) };
    n > 0 && String::from_utf8_lossy(&target[..n as usize]).contains(paths)
}

fn eio<T: From<i8>>() -> T {
    // SAFETY: errno is thread-local; writing it is what a failing call does.
    unsafe { *libc::__errno_location() = libc::EIO };
    T::from(-1)
}

/// Counts a completed sync and, at the configured one, stops the process.
fn synced() {
    let Some(stop_at) = config().stop_at_sync else {
        return;
    };
    if SYNCS.fetch_add(1, Ordering::SeqCst) + 1 >= stop_at {
        loop {
            // SAFETY: plain system calls; SIGSTOP stops every thread of the
            // process, and a continued process stops again here.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::pause();
            }
        }
    }
}

fn sync_call(nr: libc::c_long, fd: c_int) -> c_int {
    if failing(fd) {
        return eio();
    }
    if let Some((paths, delay)) = &config().slow_sync {
        if path_contains(fd, paths) {
            std::thread::sleep(*delay);
        }
    }
    // SAFETY: forwards the caller's arguments to the system call it asked for.
    let r = unsafe { libc::syscall(nr, fd) } as c_int;
    if r == 0 {
        synced();
    }
    r
}

/// # Safety
/// As libc's `fsync`.
#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    sync_call(libc::SYS_fsync, fd)
}

/// # Safety
/// As libc's `fdatasync`.
#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    sync_call(libc::SYS_fdatasync, fd)
}

/// # Safety
/// As libc's `write`.
#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    if write_failing(fd) {
        return eio();
    }
    // SAFETY: the caller's contract is libc's `write`.
    unsafe { libc::syscall(libc::SYS_write, fd, buf, count) as ssize_t }
}

/// # Safety
/// As libc's `writev`.
#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    if write_failing(fd) {
        return eio();
    }
    // SAFETY: the caller's contract is libc's `writev`.
    unsafe { libc::syscall(libc::SYS_writev, fd, iov, iovcnt) as ssize_t }
}

/// # Safety
/// As libc's `pwrite64`.
#[no_mangle]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off64_t,
) -> ssize_t {
    if write_failing(fd) {
        return eio();
    }
    // SAFETY: the caller's contract is libc's `pwrite64`.
    unsafe { libc::syscall(libc::SYS_pwrite64, fd, buf, count, offset) as ssize_t }
}

/// # Safety
/// As libc's `pwrite` (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn pwrite(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off64_t,
) -> ssize_t {
    // SAFETY: same contract.
    unsafe { pwrite64(fd, buf, count, offset) }
}
