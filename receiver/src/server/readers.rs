//! Reads of one disk's image on threads beside its session.
//!
//! The session thread applies an agent's messages in order; a read it makes
//! itself waits for the disk under the image, one read at a time. Checksum
//! sync hashes the image ahead of the agent's requests and journals the
//! pre-image of every differing block, and both waited that way (measured
//! on a 4 GiB checksum sync: a third of the session's time in reads of 4 KiB
//! pre-images). Here a few threads, each with its own read-only handle on
//! the image ([`Image::reader`]), serve such reads in parallel while the
//! session goes on; it collects each answer when it needs it.
//!
//! Reads the session needs soon (pre-images, the hashes it was just asked
//! for) go before reads made on a guess (hashes ahead).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::image::{Image, ImageError};

/// Reads in flight at once: the disk under an image serves several in
/// parallel far faster than one after the other, and hashing one range
/// overlaps the reads of the others.
const WORKERS: usize = 4;

type Task = Box<dyn FnOnce(&mut dyn Image, &mut Vec<u8>) + Send>;

#[derive(Default)]
struct Queue {
    soon: VecDeque<Task>,
    later: VecDeque<Task>,
    stopped: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Tasks run outside the lock, so a poisoned one is consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How urgently the session needs a read.
#[derive(Clone, Copy)]
pub enum When {
    /// The session will wait for it shortly.
    Soon,
    /// Read ahead on a guess.
    Later,
}

/// Worker threads reading one image.
pub struct Readers {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Readers {
    /// Readers of `image`, or None where the image cannot be read from
    /// other threads (see [`Image::reader`]).
    pub fn new(image: &dyn Image) -> Option<Readers> {
        let handles = (0..WORKERS)
            .map(|_| image.reader())
            .collect::<Option<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
        });
        let workers = handles
            .into_iter()
            .enumerate()
            .filter_map(|(i, reader)| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("image-read-{i}"))
                    .spawn(move || work(reader, &shared))
                    .ok()
            })
            .collect::<Vec<_>>();
        if workers.is_empty() {
            return None;
        }
        Some(Readers { shared, workers })
    }

    /// Runs `read` on a worker with its reader and a scratch buffer of the
    /// worker's own. If the workers stop first (the session ends), the
    /// answer is an error naming `offset_bytes`.
    pub fn run<T, F>(&self, when: When, offset_bytes: u64, read: F) -> Pending<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn Image, &mut Vec<u8>) -> Result<T, ImageError> + Send + 'static,
    {
        let slot = Arc::new(Slot {
            answer: Mutex::new(None),
            ready: Condvar::new(),
        });
        let mut promise = Promise {
            slot: slot.clone(),
            offset_bytes,
        };
        let task: Task = Box::new(move |image, scratch| {
            let answer = read(image, scratch);
            promise.keep(answer);
        });
        let mut q = self.shared.lock();
        match when {
            When::Soon => q.soon.push_back(task),
            When::Later => q.later.push_back(task),
        }
        drop(q);
        self.shared.work.notify_one();
        Pending { slot }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        // Queued tasks are dropped unrun: their promises answer errors.
        let (soon, later) = {
            let mut q = self.shared.lock();
            q.stopped = true;
            (std::mem::take(&mut q.soon), std::mem::take(&mut q.later))
        };
        drop((soon, later));
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn work(mut reader: Box<dyn Image>, shared: &Shared) {
    let mut scratch = Vec::new();
    loop {
        let task = {
            let mut q = shared.lock();
            loop {
                if q.stopped {
                    return;
                }
                if let Some(t) = q.soon.pop_front().or_else(|| q.later.pop_front()) {
                    break t;
                }
                q = shared.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        // A task that panics has answered with an error (its promise was
        // dropped); the worker goes on with the next.
        let run = std::panic::AssertUnwindSafe(|| task(reader.as_mut(), &mut scratch));
        if std::panic::catch_unwind(run).is_err() {
            scratch = Vec::new();
        }
    }
}

struct Slot<T> {
    answer: Mutex<Option<Result<T, ImageError>>>,
    ready: Condvar,
}

/// The worker's side of an answer. Dropped unkept (a task dropped unrun,
/// or one that panicked), it answers with an error, so that the session
/// never waits for a read no one makes.
struct Promise<T> {
    slot: Arc<Slot<T>>,
    offset_bytes: u64,
}

impl<T> Promise<T> {
    fn keep(&mut self, answer: Result<T, ImageError>) {
        let mut g = self.slot.answer.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(answer);
        }
        drop(g);
        self.slot.ready.notify_all();
    }
}

impl<T> Drop for Promise<T> {
    fn drop(&mut self) {
        let stopped = ImageError::Read {
            path: "(image reader thread)".into(),
            offset_bytes: self.offset_bytes,
            source: std::io::Error::other("the reader stopped before making this read"),
        };
        self.keep(Err(stopped));
    }
}

/// The session's side of an answer.
pub struct Pending<T> {
    slot: Arc<Slot<T>>,
}

impl<T> Pending<T> {
    /// An answer already known (a read made on the session's thread).
    pub fn done(answer: Result<T, ImageError>) -> Pending<T> {
        Pending {
            slot: Arc::new(Slot {
                answer: Mutex::new(Some(answer)),
                ready: Condvar::new(),
            }),
        }
    }

    /// Waits for the answer.
    pub fn wait(self) -> Result<T, ImageError> {
        let mut g = self.slot.answer.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(a) = g.take() {
                return a;
            }
            g = self.slot.ready.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// True once [`Pending::wait`] would not wait.
    pub fn is_ready(&self) -> bool {
        self.slot
            .answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::raw::RawImage;

    #[test]
    fn reads_run_on_the_workers_and_stopped_ones_answer_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let mut image = RawImage::create(&path, 1 << 20).unwrap();
        image.write_at(4096, &[7; 4096]).unwrap();
        let readers = Readers::new(&image).expect("raw images read on other threads");
        let got = readers
            .run(When::Soon, 4096, |img, buf| {
                buf.resize(4096, 0);
                img.read_at(4096, buf)?;
                Ok(buf.clone())
            })
            .wait()
            .unwrap();
        assert_eq!(got, vec![7; 4096]);
        // Past the end: the worker's reader refuses, and says which image.
        let err = readers
            .run(When::Later, 1 << 20, |img, buf| {
                buf.resize(4096, 0);
                img.read_at(1 << 20, buf)
            })
            .wait()
            .unwrap_err();
        assert!(err.to_string().contains("disk.raw"), "{err}");
        // A read that panics is answered, not waited for forever.
        let err = readers
            .run(When::Soon, 777, |_, _| -> Result<(), ImageError> {
                panic!("a reader bug")
            })
            .wait()
            .unwrap_err();
        assert!(err.to_string().contains("777"), "{err}");
        // Tasks still queued when the readers stop are answered, not lost:
        // every worker is held busy until the stop has dropped the queue.
        let (busy, release) = (
            Arc::new(std::sync::Barrier::new(WORKERS + 1)),
            Arc::new(std::sync::Barrier::new(WORKERS + 1)),
        );
        let held: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (b, r) = (busy.clone(), release.clone());
                readers.run(When::Soon, 0, move |_, _| {
                    b.wait();
                    r.wait();
                    Ok(())
                })
            })
            .collect();
        busy.wait();
        let queued = readers.run(When::Later, 12345, |_, _| Ok(()));
        let stopping = std::thread::spawn(move || drop(readers));
        while !queued.is_ready() {
            std::thread::yield_now();
        }
        release.wait();
        stopping.join().unwrap();
        for h in held {
            h.wait().unwrap();
        }
        let err = queued.wait().unwrap_err();
        assert!(err.to_string().contains("12345"), "{err}");
    }
}
