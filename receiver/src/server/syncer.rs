//! Image syncs and their acks, on a thread beside the session.
//!
//! A batch ends with its undo records synced, its overwrites written into
//! the page cache, the image synced and the agent's ack. The image sync
//! writes back the batch's scattered overwrites and is the longest of
//! those steps; done on the session thread, it left the next batch's
//! messages waiting behind it. Here it runs beside the next batch.
//!
//! That keeps every promise the session makes:
//! - An ack still follows the sync of everything it covers, and acks leave
//!   in order: one thread sends them, after the syncs of their batches.
//! - Write-ahead still holds: the next batch's overwrites reach the image
//!   only after their own undo records are durable (the session syncs the
//!   journal first, as before). A crash can leave writes of two batches in
//!   the image, each with its pre-image journaled, which a rollback undoes
//!   newest first like any other.
//! - Whatever needs the data durable at once (a point, a failover, the
//!   session's end) waits for the syncs queued here first
//!   ([`Syncer::drain`]) and then syncs on its own thread.
//! - After a failed sync nothing more is acknowledged: a later sync that
//!   succeeds says nothing of pages the failed one lost. The session learns
//!   of the failure at its next message and ends with the error; the agent
//!   resends what was not acknowledged.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tidemark_common::proto::Message;
use tokio::sync::mpsc;

use super::session::storage_message;
use crate::image::SyncHandle;

/// Images to sync and the seq to acknowledge once they are durable.
struct Job {
    images: Vec<Arc<SyncHandle>>,
    ack: u64,
}

#[derive(Default)]
struct State {
    /// Queued and not started; later batches merge into it, so that one
    /// sync covers all of them.
    next: Option<Job>,
    running: bool,
    failed: Option<String>,
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is only ever updated whole under the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Syncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread; acks go to `out`, the session's writer.
    pub fn start(name: String, out: mpsc::Sender<Message>) -> std::io::Result<Syncer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || work(&shared, &out))?
        };
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues a sync of `images` followed by `Ack { seq: ack }`. Err if an
    /// earlier sync failed: the session must end.
    pub fn submit(&self, images: Vec<Arc<SyncHandle>>, ack: u64) -> Result<(), String> {
        let mut s = self.shared.lock();
        if let Some(e) = &s.failed {
            return Err(e.clone());
        }
        match &mut s.next {
            Some(job) => {
                for image in images {
                    if !job.images.iter().any(|i| Arc::ptr_eq(i, &image)) {
                        job.images.push(image);
                    }
                }
                job.ack = job.ack.max(ack);
            }
            None => s.next = Some(Job { images, ack }),
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Err once a sync has failed.
    pub fn check(&self) -> Result<(), String> {
        match &self.shared.lock().failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Waits until every queued sync is done and its ack sent.
    pub fn drain(&self) -> Result<(), String> {
        let mut s = self.shared.lock();
        while s.failed.is_none() && (s.next.is_some() || s.running) {
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(|p| p.into_inner());
        }
        match &s.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn work(shared: &Shared, out: &mpsc::Sender<Message>) {
    loop {
        let job = {
            let mut s = shared.lock();
            loop {
                if s.stopped {
                    return;
                }
                if let Some(job) = s.next.take() {
                    s.running = true;
                    break job;
                }
                s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let synced = job.images.iter().try_for_each(|i| i.sync());
        // `running` is cleared only once the ack is queued, so that drain
        // never returns before it.
        let failed = match synced {
            Ok(()) => {
                // A closed writer means the session is ending: nothing
                // more can be acknowledged.
                let _ = out.blocking_send(Message::Ack { seq: job.ack });
                None
            }
            Err(e) => Some(storage_message(&e)),
        };
        let mut s = shared.lock();
        s.running = false;
        let stop = failed.is_some();
        s.failed = failed;
        shared.changed.notify_all();
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(rx: &mut mpsc::Receiver<Message>) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                Message::Ack { seq } => seqs.push(seq),
                other => panic!("unexpected {}", other.name()),
            }
        }
        seqs
    }

    #[test]
    fn acks_follow_their_syncs_in_order_and_drain_waits_for_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let file = std::fs::File::create(&path).expect("create");
        let image = Arc::new(SyncHandle::new(file, path));
        let (tx, mut rx) = mpsc::channel(64);
        let syncer = Syncer::start("test-sync".into(), tx).expect("start");
        for seq in 1..=20 {
            syncer.submit(vec![image.clone()], seq).expect("submit");
        }
        syncer.drain().expect("drain");
        let seqs = acks(&mut rx);
        // Queued batches merge into one sync: fewer acks, never out of
        // order, the last covering everything.
        assert!(!seqs.is_empty() && seqs.len() <= 20, "{seqs:?}");
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(seqs.last(), Some(&20));
        syncer
            .submit(Vec::new(), 21)
            .expect("an ack with nothing to sync");
        syncer.drain().expect("drain");
        assert_eq!(acks(&mut rx), vec![21]);
    }

    #[test]
    fn after_a_failed_sync_nothing_more_is_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good_path = dir.path().join("img");
        let good = Arc::new(SyncHandle::new(
            std::fs::File::create(&good_path).expect("create"),
            good_path,
        ));
        // fsync of a pipe fails (EINVAL), as a failing disk's would.
        let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
        let bad = Arc::new(SyncHandle::new(
            std::fs::File::from(read_end),
            "/failing/image-flat.vmdk".into(),
        ));
        let (tx, mut rx) = mpsc::channel(64);
        let syncer = Syncer::start("test-sync".into(), tx).expect("start");
        syncer.submit(vec![good.clone()], 1).expect("submit");
        syncer.drain().expect("drain");
        syncer.submit(vec![good.clone(), bad], 2).expect("submit");
        let err = syncer.drain().expect_err("the sync failed");
        assert!(err.contains("/failing/image-flat.vmdk"), "{err}");
        assert!(syncer.check().is_err());
        assert!(syncer.submit(vec![good], 3).is_err(), "refused from now on");
        assert_eq!(acks(&mut rx), vec![1]);
    }
}
