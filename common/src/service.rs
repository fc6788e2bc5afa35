//! What both daemons tell systemd (`Type=notify`): READY once they serve,
//! STATUS lines for `systemctl status`, RELOADING around a reload, and
//! watchdog pings. Outside systemd (no `NOTIFY_SOCKET`) every call does
//! nothing, so `serve` and `run` behave the same from a shell.
//!
//! The watchdog is pinged only from each daemon's main loop, never from a
//! timer of its own: a loop that is stuck must stop the pings so that
//! systemd restarts the daemon.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Set after the first failed notification, so that a broken notify socket
/// is reported once, not on every watchdog ping.
static SEND_FAILED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        if !SEND_FAILED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot notify systemd through NOTIFY_SOCKET: {e}");
        }
    }
}

/// The daemon is up and doing its job.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload starts; systemd keeps the unit in "reloading" until [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The daemon is shutting down on purpose.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Watchdog pings from a main loop, at half the interval systemd asked for
/// (`WATCHDOG_USEC`), as sd_watchdog_enabled(3) recommends: one late loop
/// turn then does not cost a restart.
#[derive(Debug)]
pub struct Watchdog {
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC` (and `WATCHDOG_PID`, which must be ours).
    pub fn from_env() -> Watchdog {
        Watchdog {
            every: sd_notify::watchdog_enabled().map(|d| d / 2),
            last: None,
        }
    }

    /// How often the loop must call [`Watchdog::alive`]; None: no watchdog.
    pub fn period(&self) -> Option<Duration> {
        self.every
    }

    /// The loop has just done a turn of real work. Pings systemd when half
    /// the watchdog interval has passed since the last ping.
    pub fn alive(&mut self) {
        let Some(every) = self.every else { return };
        if self.last.is_none_or(|t| t.elapsed() >= every) {
            send(&[NotifyState::Watchdog]);
            self.last = Some(Instant::now());
        }
    }
}
