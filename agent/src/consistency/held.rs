//! A recovery point that is due, or asked for, but cannot be taken yet.
//!
//! A point reads everything dirty while the filesystems are frozen, so it
//! waits until the backlog is at most `point_max_backlog_bytes`, no disk is
//! resyncing and the receiver is connected. Under churn the pair only just
//! keeps up with, the backlog can stay above that for as long as the churn
//! lasts, and no point comes at all (docs/BENCHMARKS.md has a 20 s step at
//! 175 MB/s where it did). The operator sees it in `status` from the
//! start, and in the log once the wait is long enough to matter.

use std::time::{Duration, Instant};

/// A point held back this long is logged as a warning...
pub const WARN_AFTER: Duration = Duration::from_secs(60);
/// ...and again at this interval while it stays held back.
pub const WARN_EVERY: Duration = Duration::from_secs(300);

/// What holds a point back, for as long as one is held.
#[derive(Debug, Default)]
pub struct HeldPoint {
    held: Option<Held>,
}

#[derive(Debug)]
struct Held {
    since: Instant,
    why: String,
    warned_at: Option<Instant>,
}

/// What [`HeldPoint::update`] wants logged.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// Still held back after [`WARN_AFTER`] (repeated every [`WARN_EVERY`]).
    Waiting { secs: u64, why: String },
    /// No longer held back, after a wait that was warned about.
    Released { secs: u64 },
}

impl HeldPoint {
    /// Records, once per loop, why a wanted point cannot be taken now
    /// (None: no point is wanted, or it can be taken).
    pub fn update(&mut self, now: Instant, why: Option<String>) -> Option<Note> {
        match (why, self.held.as_mut()) {
            (None, None) => None,
            (None, Some(h)) => {
                let note = h.warned_at.map(|_| Note::Released {
                    secs: now.saturating_duration_since(h.since).as_secs(),
                });
                self.held = None;
                note
            }
            (Some(why), None) => {
                self.held = Some(Held {
                    since: now,
                    why,
                    warned_at: None,
                });
                None
            }
            (Some(why), Some(h)) => {
                h.why = why;
                let waited = now.saturating_duration_since(h.since);
                let due = match h.warned_at {
                    None => waited >= WARN_AFTER,
                    Some(at) => now.saturating_duration_since(at) >= WARN_EVERY,
                };
                due.then(|| {
                    h.warned_at = Some(now);
                    Note::Waiting {
                        secs: waited.as_secs(),
                        why: h.why.clone(),
                    }
                })
            }
        }
    }

    /// Seconds held back so far and why, for `status`.
    pub fn waiting(&self, now: Instant) -> Option<(u64, String)> {
        self.held.as_ref().map(|h| {
            (
                now.saturating_duration_since(h.since).as_secs(),
                h.why.clone(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_wait_is_warned_about_then_repeated_then_released() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let why = |s: &str| Some(s.to_owned());
        let mut h = HeldPoint::default();
        assert_eq!(h.update(t0, None), None);
        assert_eq!(h.waiting(t0), None);

        assert_eq!(h.update(at(0), why("a")), None);
        assert_eq!(h.update(at(59), why("b")), None);
        assert_eq!(h.waiting(at(59)), Some((59, "b".into())));
        assert_eq!(
            h.update(at(60), why("c")),
            Some(Note::Waiting {
                secs: 60,
                why: "c".into()
            })
        );
        assert_eq!(h.update(at(61), why("c")), None);
        assert_eq!(h.update(at(359), why("c")), None);
        assert_eq!(
            h.update(at(360), why("d")),
            Some(Note::Waiting {
                secs: 360,
                why: "d".into()
            })
        );
        assert_eq!(h.update(at(400), None), Some(Note::Released { secs: 400 }));
        assert_eq!(h.waiting(at(400)), None);
    }

    #[test]
    fn a_short_wait_is_not_logged_and_a_new_one_starts_from_zero() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = HeldPoint::default();
        assert_eq!(h.update(at(0), Some("x".into())), None);
        assert_eq!(h.update(at(30), None), None, "released unwarned: quiet");
        assert_eq!(h.update(at(40), Some("y".into())), None);
        assert_eq!(h.waiting(at(95)), Some((55, "y".into())));
        assert_eq!(h.update(at(95), Some("y".into())), None);
    }
}
