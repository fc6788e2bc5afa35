//! Replication that gives way to the machine's own work while it keeps up.
//!
//! `run`'s CPU goes to its reader and compressors and to the runtime's
//! worker, which encrypts and sends (about a quarter of a core per
//! 100 MB/s of churn in all). While replication is not behind, those
//! threads run under `SCHED_IDLE`: the scheduler lets any other task on
//! the CPU go first, so the protected machine's own threads wait less for
//! one. Figures: docs/BENCHMARKS.md, "Replication under SCHED_IDLE".
//!
//! A machine that keeps every CPU busy would starve them, so the agent
//! stops yielding once it falls `yield_cpu_lag_secs` behind (the round
//! under way ships data written longer ago than that), and while a disk
//! resyncs: its threads then compete at the process's own priority (the
//! unit's `Nice=5`) until it has caught up.
//!
//! The run loop (the main thread), which drains the tracer, audits and
//! takes points, never yields: a tracer left undrained overruns and costs
//! a resync. It does share locks with the yielding threads (the read
//! buffers' pool, the channels' queues), each held for a push or a pop; a
//! yielding thread preempted inside one holds the run loop up until it
//! runs again, which on a machine with a CPU to spare is at once, and at
//! worst, with every CPU busy, until the scheduler gives it its small
//! share. Should that ever overrun the tracer, the loss is detected and
//! resynced like any other, never silent.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Whether replication's threads should yield now: set by the run loop
/// only (other commands never yield), followed by each thread at its
/// next piece of work.
static YIELD: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread is under SCHED_IDLE as far as [`follow`] knows.
    static IDLE: Cell<bool> = const { Cell::new(false) };
}

/// Asks replication's threads to yield, or to stop yielding.
pub fn set(on: bool) {
    YIELD.store(on, Ordering::Relaxed);
}

/// Switches the calling thread's class if the flag changed since it last
/// looked. A switch the kernel refuses leaves the thread as it is (the
/// run loop checked at start that it is allowed both ways).
pub fn follow() {
    let want = YIELD.load(Ordering::Relaxed);
    IDLE.with(|idle| {
        if idle.get() != want && set_current_thread_idle(want).is_ok() {
            idle.set(want);
        }
    });
}

/// For a thread just started: threads inherit their creator's class, and
/// one created by a yielding thread (the runtime's blocking pool, which a
/// point's freeze later uses) must not stay idle without following.
pub fn thread_started() {
    // SAFETY: pid 0 is the calling thread; no memory is passed.
    if unsafe { nix::libc::sched_getscheduler(0) } == nix::libc::SCHED_IDLE {
        let _ = set_current_thread_idle(false);
    }
}

/// Puts the calling thread under `SCHED_IDLE`, or back under
/// `SCHED_OTHER` (its nice value is kept either way). Going back needs
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the thread's nice value
/// (the unit's `LimitNICE=+5`).
pub fn set_current_thread_idle(idle: bool) -> std::io::Result<()> {
    let policy = if idle {
        nix::libc::SCHED_IDLE
    } else {
        nix::libc::SCHED_OTHER
    };
    let param = nix::libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` lives across the call.
    if unsafe { nix::libc::sched_setscheduler(0, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a thread may go idle and come back: tried on a thread of its
/// own, so that the caller's class is untouched. The reason when not.
pub fn can_yield_and_return() -> Result<(), String> {
    std::thread::spawn(|| {
        set_current_thread_idle(true)
            .map_err(|e| format!("cannot put a thread under SCHED_IDLE: {e}"))?;
        set_current_thread_idle(false).map_err(|e| {
            format!("cannot give a thread back its priority after SCHED_IDLE: {e} (it needs CAP_SYS_NICE or LimitNICE=+5 in the unit)")
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the check's thread panicked".into()))
}

/// The run loop's rule: yield while no disk resyncs and replication is
/// less than `limit` behind: the round under way ships data written at
/// most `behind` ago (since the start of the last round that left
/// nothing dirty).
pub fn should_yield(limit: Option<Duration>, resyncing: bool, behind: Duration) -> bool {
    limit.is_some_and(|limit| !resyncing && behind < limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_only_while_caught_up_and_not_resyncing() {
        let s = Duration::from_secs;
        let limit = Some(s(5));
        assert!(should_yield(limit, false, s(0)));
        assert!(should_yield(limit, false, s(4)));
        assert!(!should_yield(None, false, s(0)), "0 turns it off");
        assert!(!should_yield(limit, true, s(0)), "a resync competes");
        assert!(!should_yield(limit, false, s(5)), "behind");
    }

    #[test]
    fn a_thread_goes_idle_and_comes_back() {
        // Root here, as the agent is: both switches are permitted.
        can_yield_and_return().expect("switch classes");
        // SAFETY: pid 0 is the calling thread; no memory is passed.
        let policy = || unsafe { nix::libc::sched_getscheduler(0) };
        let seen = std::thread::spawn(move || {
            let before = policy();
            set(true);
            follow();
            let idle = policy();
            // A thread made by a yielding one starts under SCHED_OTHER.
            let child = std::thread::spawn(move || {
                let inherited = policy();
                thread_started();
                (inherited, policy())
            })
            .join()
            .expect("child");
            set(false);
            follow();
            (before, idle, child, policy())
        })
        .join()
        .expect("thread");
        let (other, idle) = (nix::libc::SCHED_OTHER, nix::libc::SCHED_IDLE);
        assert_eq!(seen, (other, idle, (idle, other), other));
    }
}
