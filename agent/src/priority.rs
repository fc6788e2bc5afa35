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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Whether replication's threads yield now: set by the run loop only
/// (other commands never yield).
static YIELD: AtomicBool = AtomicBool::new(false);

/// The threads that yield (kernel thread ids), each registered by a
/// [`Member`] for as long as it lives.
static MEMBERS: Mutex<Vec<nix::libc::pid_t>> = Mutex::new(Vec::new());

/// Asks replication's threads to yield, or to stop yielding. Applied to
/// each of them at once from the caller's thread: a thread starved while
/// yielding need not get a CPU to stop.
pub fn set(on: bool) {
    let members = MEMBERS.lock().unwrap_or_else(|e| e.into_inner());
    if YIELD.swap(on, Ordering::Relaxed) != on {
        for &tid in members.iter() {
            let _ = set_thread_idle(tid, on);
        }
    }
}

/// The calling thread, registered as one that yields while [`set`] says
/// so, until this is dropped (before the thread ends: a thread id is
/// reused once its thread is gone).
pub struct Member(nix::libc::pid_t);

impl Member {
    pub fn join() -> Member {
        let tid = nix::unistd::gettid().as_raw();
        let mut members = MEMBERS.lock().unwrap_or_else(|e| e.into_inner());
        if YIELD.load(Ordering::Relaxed) {
            let _ = set_thread_idle(tid, true);
        }
        members.push(tid);
        Member(tid)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut members = MEMBERS.lock().unwrap_or_else(|e| e.into_inner());
        members.retain(|&t| t != self.0);
    }
}

/// For the runtime's worker threads (called at each unpark): registers
/// the calling thread once, for its lifetime.
pub fn join_worker() {
    thread_local! {
        static WORKER: Member = Member::join();
    }
    WORKER.with(|_| ());
}

/// For a thread just started: threads inherit their creator's class, and
/// one created by a yielding thread (the runtime's blocking pool, which a
/// point's freeze later uses) must not stay idle.
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
    set_thread_idle(0, idle)
}

/// The same for thread `tid` of this process (0: the calling thread).
fn set_thread_idle(tid: nix::libc::pid_t, idle: bool) -> std::io::Result<()> {
    let policy = if idle {
        nix::libc::SCHED_IDLE
    } else {
        nix::libc::SCHED_OTHER
    };
    let param = nix::libc::sched_param { sched_priority: 0 };
    // SAFETY: `tid` is a thread id (or 0); `param` lives across the call.
    if unsafe { nix::libc::sched_setscheduler(tid, policy, &param) } != 0 {
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
        let (asked, answered) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let (ask, wait) = asked;
        let (answer, got) = answered;
        let member = std::thread::spawn(move || {
            let _m = Member::join();
            // Reports its class each time it is asked, until told to end.
            while wait.recv() == Ok(true) {
                let child = std::thread::spawn(move || {
                    let inherited = policy();
                    thread_started();
                    (inherited, policy())
                })
                .join()
                .expect("child");
                answer.send((policy(), child)).expect("answer");
            }
        });
        let (other, idle) = (nix::libc::SCHED_OTHER, nix::libc::SCHED_IDLE);
        let class = || {
            ask.send(true).expect("ask");
            got.recv().expect("answer")
        };
        assert_eq!(class(), (other, (other, other)));
        // Switched from this thread, not by the member itself.
        set(true);
        assert_eq!(class(), (idle, (idle, other)), "a child starts normal");
        set(false);
        assert_eq!(class(), (other, (other, other)));
        ask.send(false).expect("end");
        member.join().expect("member");
    }
}
