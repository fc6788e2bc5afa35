//! SIGTERM (systemd's stop) and SIGINT, asked about anywhere in `run`.
//!
//! A stop must be prompt wherever the agent is waiting: systemd kills an
//! agent that has not stopped by its stop timeout, and a killed agent has
//! not saved its dirty map with the clean-stop mark, so every disk is
//! resynced at the next start. The loop's own waits select on
//! [`StopSignals::recv`]; the waits inside a round or a point, which can
//! last as long as a receiver is away or the send cap allows, look with
//! [`StopSignals::asked`] at each of their drains of the tracer.

use std::task::{Context, Poll, Waker};

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The run was asked to stop: returned as an error from a round or a
/// point that gave up for it, for the loop to stop cleanly.
#[derive(Debug, thiserror::Error)]
#[error("the agent is stopping (SIGTERM or SIGINT): no point was taken; ask again once it runs")]
pub struct Stopping;

pub struct StopSignals {
    term: Signal,
    int: Signal,
    /// A signal came: it stays asked, whoever looked first.
    asked: bool,
}

impl StopSignals {
    /// Registered once for the run: a listener made at each wait missed a
    /// signal that came while the loop was busy.
    pub fn register() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            asked: false,
        })
    }

    /// Whether a stop was asked for, without waiting.
    pub fn asked(&mut self) -> bool {
        if !self.asked {
            let mut cx = Context::from_waker(Waker::noop());
            self.asked = matches!(self.term.poll_recv(&mut cx), Poll::Ready(_))
                || matches!(self.int.poll_recv(&mut cx), Poll::Ready(_));
        }
        self.asked
    }

    /// [`StopSignals::asked`] as an error to return with `?`.
    pub fn check(&mut self) -> Result<(), Stopping> {
        if self.asked() {
            Err(Stopping)
        } else {
            Ok(())
        }
    }

    /// Waits until a stop is asked for. Cancel safe.
    pub async fn recv(&mut self) {
        if !self.asked {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
            self.asked = true;
        }
    }
}
