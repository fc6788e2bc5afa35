//! Appending to a journal file past the page cache.
//!
//! Each byte of pre-image the receiver journals is written once and read
//! back only by an export or a rollback, so caching it buys nothing, and a
//! buffered append is the costliest write there is: every 4 KiB takes a
//! fresh page-cache page that is allocated, zeroed in part, filled and
//! written back by a kernel worker. On the project's VMs that was 14 % of
//! all CPU during a backlog drain, more than the session's decompression,
//! verification and image writes together (docs/BENCHMARKS.md). Direct
//! writes of whole blocks from one reused buffer cost a fraction of it.
//!
//! So appends are staged in an aligned buffer that starts at the last
//! [`DIRECT_ALIGN`] boundary at or before the end of the file. Whole blocks
//! go to the file with O_DIRECT once a megabyte of them is staged; a sync
//! writes the partial last block too, padded with zeros, and keeps it
//! staged: the next write starts at that block again and overwrites the
//! padding. Its bytes that were durable are written again unchanged, which
//! is what writeback of a buffered append does with a partial page too.
//! The file can therefore end in fewer than [`DIRECT_ALIGN`] zeros after its
//! last record; readers stop at the first thing that is not a record, and
//! a writer reopening the file cuts them off.
//!
//! A filesystem that refuses O_DIRECT (or these alignments) gets the same
//! bytes through ordinary writes, without padding from then on (the
//! refused write itself, if padded, leaves its padding, which readers stop
//! at like any other).
//!
//! The staged megabyte is written on a thread beside the caller while the
//! caller stages the next one into a second buffer: waiting for these
//! writes was a sixth of the receiver session's time in a backlog drain
//! (docs/BENCHMARKS.md). A sync can be left to that thread too
//! ([`DirectAppend::sync_start`]): it writes the padded last block and
//! syncs the file while the caller goes on. One write or sync is in flight
//! at most. An error of one is returned by the next call that waits for it
//! (the next flush, sync or [`DirectAppend::synced`]), and every write and
//! sync fails after it until a cut, so nothing is ever reported durable
//! behind a write that failed.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use crate::image::storage::{aligned_range, open_direct, DIRECT_ALIGN};

/// Staged whole blocks are written once there are this many bytes of them.
const FLUSH_BYTES: usize = 1 << 20;

pub struct DirectAppend {
    /// For syncs, truncation, the tail's reload, and writes where direct
    /// I/O is refused.
    file: File,
    /// The same file opened with O_DIRECT; None once refused.
    direct: Option<File>,
    /// `stage[window]` holds the staged bytes and the room after them; its
    /// start is aligned.
    stage: Vec<u8>,
    window: Range<usize>,
    staged: usize,
    /// Where in the file the first staged byte goes (aligned while direct).
    at: u64,
    /// Writes and syncs beside the caller; started by the first.
    writer: Option<Writer>,
    /// A job is with the writer; its buffer comes back with its result.
    pending: bool,
    /// Syncs started, and those of them that succeeded.
    syncs_started: u64,
    syncs_done: u64,
    /// A stage buffer back from the writer, for the next hand-over.
    spare: Option<(Vec<u8>, Range<usize>)>,
    /// A write beside the caller failed: its bytes are no longer staged,
    /// so nothing may be written after them until [`DirectAppend::cut`].
    broken: bool,
}

/// For the writer: `buf[window.start..][..len]` goes to the file at `at`
/// past the page cache, then the file is synced if `sync`.
struct Job {
    buf: Vec<u8>,
    window: Range<usize>,
    len: usize,
    at: u64,
    sync: bool,
}

struct Done {
    buf: Vec<u8>,
    window: Range<usize>,
    result: io::Result<()>,
    sync: bool,
    /// The direct write was refused (EINVAL) and the bytes went through
    /// the page cache instead; the caller stops writing directly.
    refused: bool,
}

struct Writer {
    jobs: Option<mpsc::SyncSender<Job>>,
    done: mpsc::Receiver<Done>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(file: &File, direct: &File) -> io::Result<Writer> {
        let file = file.try_clone()?;
        let direct = direct.try_clone()?;
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = mpsc::sync_channel::<Done>(1);
        let thread = std::thread::Builder::new()
            .name("undo-write".into())
            .spawn(move || {
                while let Ok(job) = job_rx.recv() {
                    let bytes = &job.buf[job.window.start..job.window.start + job.len];
                    let (mut result, refused) = write_blocks(&direct, &file, bytes, job.at);
                    if job.sync && result.is_ok() {
                        result = file.sync_data();
                    }
                    let done = Done {
                        buf: job.buf,
                        window: job.window,
                        result,
                        sync: job.sync,
                        refused,
                    };
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Writer {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `bytes` at `at` past the page cache. Where the filesystem takes
/// O_DIRECT at open but not these writes (EINVAL), the same bytes go
/// through the page cache from the same offset instead, and the second
/// value is true: the caller writes through the cache from then on.
fn write_blocks(direct: &File, file: &File, bytes: &[u8], at: u64) -> (io::Result<()>, bool) {
    match direct.write_all_at(bytes, at) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
            tracing::debug!("direct journal writes refused ({e}); writing through the cache");
            (file.write_all_at(bytes, at), true)
        }
        r => (r, false),
    }
}

fn align_down(n: u64) -> u64 {
    n - n % DIRECT_ALIGN as u64
}

fn round_up(n: usize) -> usize {
    n.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

fn broken() -> io::Error {
    io::Error::other("an earlier write of this journal failed; it must be cut back first")
}

impl DirectAppend {
    /// Appends to `file` after its first `len` bytes, which are kept; what
    /// lies past them is overwritten (callers cut it off first).
    pub fn new(file: File, len: u64) -> io::Result<DirectAppend> {
        let direct = open_direct(&file, true);
        let mut a = DirectAppend {
            file,
            direct,
            stage: Vec::new(),
            window: 0..0,
            staged: 0,
            at: len,
            writer: None,
            pending: false,
            syncs_started: 0,
            syncs_done: 0,
            spare: None,
            broken: false,
        };
        a.reload(len)?;
        Ok(a)
    }

    /// Bytes in the file once everything staged is written.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.at + self.staged as u64
    }

    /// Stages `data`; may return the error of an earlier write.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.reserve(data.len());
        let start = self.window.start + self.staged;
        self.stage[start..start + data.len()].copy_from_slice(data);
        self.staged += data.len();
        if self.staged >= FLUSH_BYTES {
            self.write_out(false)?;
        }
        Ok(())
    }

    /// Everything appended is durable when this returns Ok.
    pub fn sync(&mut self) -> io::Result<()> {
        self.sync_start()?;
        self.synced(true).map(|_| ())
    }

    /// Starts making everything appended so far durable, beside the
    /// caller where it can; [`DirectAppend::synced`] says when it is.
    /// Appends may go on meanwhile; they are not covered by this sync.
    pub fn sync_start(&mut self) -> io::Result<()> {
        self.collect(true)?;
        if self.broken {
            return Err(broken());
        }
        self.syncs_started += 1;
        if self.direct.is_some() {
            let whole = align_down(self.staged as u64) as usize;
            if self.hand_over(whole, round_up(self.staged), true) {
                return Ok(());
            }
        }
        self.write_out(true)?;
        self.file.sync_data()?;
        self.syncs_done += 1;
        Ok(())
    }

    /// True once the last [`DirectAppend::sync_start`] has made its bytes
    /// durable; with `wait`, waits for it. Its error, if it failed.
    pub fn synced(&mut self, wait: bool) -> io::Result<bool> {
        if self.syncs_done < self.syncs_started {
            self.collect(wait)?;
        }
        if self.broken {
            return Err(broken());
        }
        Ok(self.syncs_done == self.syncs_started)
    }

    /// Cuts the file back to `len` bytes, durably, and appends from there;
    /// whatever was staged past it is dropped.
    pub fn cut(&mut self, len: u64) -> io::Result<()> {
        // A write still in flight lands before the truncate, not after it;
        // its error is what the cut is for.
        let _ = self.collect(true);
        self.broken = false;
        self.syncs_started = self.syncs_done;
        // Dropped first: if the truncate or its sync fails, nothing staged
        // past `len` may be written by a later call.
        self.staged = 0;
        self.file.set_len(len)?;
        self.file.sync_data()?;
        self.reload(len)
    }

    /// Stages the file's bytes from the last aligned boundary to `len`,
    /// which the next direct write rewrites.
    fn reload(&mut self, len: u64) -> io::Result<()> {
        self.staged = 0;
        self.at = len;
        if self.direct.is_none() {
            return Ok(());
        }
        let from = align_down(len);
        let tail = (len - from) as usize;
        self.reserve(tail);
        let w = self.window.start..self.window.start + tail;
        self.file.read_exact_at(&mut self.stage[w], from)?;
        self.at = from;
        self.staged = tail;
        Ok(())
    }

    /// Room for `more` bytes after the staged ones, and for the padding of
    /// the block they end in; a larger window keeps what is staged.
    fn reserve(&mut self, more: usize) {
        let need = round_up(self.staged + more);
        if need <= self.window.len() {
            return;
        }
        let mut stage = Vec::new();
        let window = aligned_range(&mut stage, need.max(FLUSH_BYTES + DIRECT_ALIGN));
        let old = self.window.start..self.window.start + self.staged;
        stage[window.start..window.start + self.staged].copy_from_slice(&self.stage[old]);
        self.stage = stage;
        self.window = window;
    }

    /// Takes the result of the job beside the caller, if one is in flight;
    /// with `wait` waits for it, without leaves it if unfinished.
    fn collect(&mut self, wait: bool) -> io::Result<()> {
        if !self.pending {
            return Ok(());
        }
        let Some(w) = &self.writer else {
            self.pending = false;
            self.broken = true;
            return Err(io::Error::other("the journal's writer thread is gone"));
        };
        let done = if wait {
            w.done.recv().ok()
        } else {
            match w.done.try_recv() {
                Ok(d) => Some(d),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        self.pending = false;
        let Some(done) = done else {
            self.writer = None;
            self.broken = true;
            return Err(io::Error::other("the journal's writer thread is gone"));
        };
        self.spare = Some((done.buf, done.window));
        if done.refused {
            self.direct = None;
        }
        if done.result.is_err() {
            self.broken = true;
        } else if done.sync {
            self.syncs_done += 1;
        }
        done.result
    }

    /// Writes the staged whole blocks, and with `pad` the partial last one
    /// too (zero-padded, and kept staged for the next write to extend).
    /// Whole blocks alone go to the writer thread.
    fn write_out(&mut self, pad: bool) -> io::Result<()> {
        self.collect(true)?;
        if self.broken {
            return Err(broken());
        }
        if self.staged == 0 {
            return Ok(());
        }
        let whole = align_down(self.staged as u64) as usize;
        if !pad && whole > 0 && self.direct.is_some() && self.hand_over(whole, whole, false) {
            return Ok(());
        }
        let Some(direct) = &self.direct else {
            let w = self.window.start..self.window.start + self.staged;
            self.file.write_all_at(&self.stage[w], self.at)?;
            self.at += self.staged as u64;
            self.staged = 0;
            return Ok(());
        };
        let len = if pad { round_up(self.staged) } else { whole };
        if len == 0 {
            return Ok(());
        }
        let start = self.window.start;
        if len > self.staged {
            self.stage[start + self.staged..start + len].fill(0);
        }
        let (result, refused) =
            write_blocks(direct, &self.file, &self.stage[start..start + len], self.at);
        if refused {
            self.direct = None;
        }
        result?;
        self.stage
            .copy_within(start + whole..start + self.staged, start);
        self.at += whole as u64;
        self.staged -= whole;
        Ok(())
    }

    /// Gives the writer thread the first `len` staged bytes (zero-padded
    /// past the staged ones), then a sync if `sync`, and keeps staging
    /// from byte `whole` on in another buffer: a partial last block stays
    /// staged for the next write to extend. False (nothing done) where the
    /// thread cannot be had; the caller then writes them itself. The caller
    /// has collected the job before.
    fn hand_over(&mut self, whole: usize, len: usize, sync: bool) -> bool {
        if self.writer.is_none() {
            let Some(direct) = &self.direct else {
                return false;
            };
            match Writer::start(&self.file, direct) {
                Ok(w) => self.writer = Some(w),
                Err(e) => {
                    tracing::debug!("journal writes stay on the session thread: {e}");
                    return false;
                }
            }
        }
        let Some(jobs) = self.writer.as_ref().and_then(|w| w.jobs.clone()) else {
            return false;
        };
        let (mut buf, mut window) = self.spare.take().unwrap_or_default();
        if window.len() < self.window.len() {
            window = aligned_range(&mut buf, self.window.len());
        }
        let start = self.window.start;
        let tail = self.staged - whole;
        buf[window.start..window.start + tail]
            .copy_from_slice(&self.stage[start + whole..start + self.staged]);
        if len > self.staged {
            self.stage[start + self.staged..start + len].fill(0);
        }
        let job = Job {
            buf: std::mem::replace(&mut self.stage, buf),
            window: std::mem::replace(&mut self.window, window),
            len,
            at: self.at,
            sync,
        };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            // The thread is gone: take the staged bytes back, write here.
            self.writer = None;
            let other = std::mem::replace(&mut self.stage, job.buf);
            let other_window = std::mem::replace(&mut self.window, job.window);
            self.spare = Some((other, other_window));
            return false;
        }
        self.pending = true;
        self.at += whole as u64;
        self.staged = tail;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// On the project's own filesystem (ext4), which takes O_DIRECT.
    fn file() -> (tempfile::TempDir, File, std::path::PathBuf) {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let path = dir.path().join("seg");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        (dir, f, path)
    }

    #[test]
    fn appends_read_back_in_order_with_at_most_a_block_of_zeros_after_a_sync() {
        let (_dir, f, path) = file();
        let mut a = DirectAppend::new(f, 0).expect("new");
        assert!(a.direct.is_some(), "ext4 takes O_DIRECT");
        let mut want = Vec::new();
        // Odd sizes across block and flush boundaries, synced in between.
        for (i, n) in [100, 5000, 3 << 20, 1, 4096, 70_001]
            .into_iter()
            .enumerate()
        {
            let b = bytes(n, i as u8);
            a.append(&b).expect("append");
            want.extend_from_slice(&b);
            if i % 2 == 1 {
                a.sync().expect("sync");
                let got = std::fs::read(&path).expect("read");
                assert_eq!(&got[..want.len()], &want[..]);
                assert!(got.len() - want.len() < DIRECT_ALIGN);
                assert!(got[want.len()..].iter().all(|&b| b == 0));
            }
        }
        assert_eq!(a.len(), want.len() as u64);
        a.sync().expect("sync");
        let got = std::fs::read(&path).expect("read");
        assert_eq!(&got[..want.len()], &want[..]);
    }

    #[test]
    fn reopening_keeps_the_first_len_bytes_and_a_cut_drops_what_follows() {
        let (_dir, f, path) = file();
        let first = bytes(10_000, 1);
        let mut a = DirectAppend::new(f, 0).expect("new");
        a.append(&first).expect("append");
        a.sync().expect("sync");
        drop(a);
        // As a writer does after a restart: cut what is past the records.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("reopen");
        f.set_len(first.len() as u64).expect("cut padding");
        let mut a = DirectAppend::new(f, first.len() as u64).expect("new");
        let second = bytes(6000, 2);
        a.append(&second).expect("append");
        a.sync().expect("sync");
        let got = std::fs::read(&path).expect("read");
        assert_eq!(&got[..10_000], &first[..]);
        assert_eq!(&got[10_000..16_000], &second[..]);
        // A cut back to the first append, then more after it.
        a.append(&bytes(9000, 3)).expect("append");
        a.cut(first.len() as u64).expect("cut");
        let third = bytes(300, 4);
        a.append(&third).expect("append");
        a.sync().expect("sync");
        let got = std::fs::read(&path).expect("read");
        assert_eq!(&got[..10_000], &first[..]);
        assert_eq!(&got[10_000..10_300], &third[..]);
        assert!(got[10_300..].iter().all(|&b| b == 0));
        assert!(got.len() < 10_300 + DIRECT_ALIGN);
    }

    #[test]
    fn a_failed_write_beside_the_caller_fails_the_next_sync_until_a_cut() {
        let (_dir, f, path) = file();
        let mut a = DirectAppend::new(f, 0).expect("new");
        let first = bytes(10_000, 1);
        a.append(&first).expect("append");
        a.sync().expect("sync");
        // The writer thread gets a handle that cannot write: EBADF, as a
        // failing device would give EIO.
        a.direct = Some(open_direct(&a.file, false).expect("read-only O_DIRECT handle"));
        a.writer = None;
        a.append(&bytes(3 << 20, 2))
            .expect("staged and handed over");
        assert!(a.pending, "whole blocks went to the writer thread");
        assert!(
            a.sync().is_err(),
            "the failed write is reported by the sync"
        );
        assert!(a.sync().is_err(), "and by every sync until a cut");
        assert!(a.append(&bytes(2 << 20, 3)).is_err());
        assert_eq!(
            std::fs::read(&path).expect("read")[..first.len()],
            first[..],
            "what was durable is untouched"
        );
        // After the cut, appends are written again (here through the page
        // cache: the writer keeps the handle it was started with).
        a.cut(first.len() as u64).expect("cut");
        a.writer = None;
        a.direct = None;
        let second = bytes(5000, 4);
        a.append(&second).expect("append");
        a.sync().expect("sync");
        let got = std::fs::read(&path).expect("read");
        assert_eq!(got.len(), first.len() + second.len());
        assert_eq!(&got[first.len()..], &second[..]);
    }

    #[test]
    fn where_direct_io_is_refused_the_same_bytes_are_written_without_padding() {
        let (_dir, f, path) = file();
        let mut a = DirectAppend::new(f, 0).expect("new");
        a.direct = None;
        let b = bytes(5000, 7);
        a.append(&b).expect("append");
        a.sync().expect("sync");
        assert_eq!(std::fs::read(&path).expect("read"), b);
    }
}
