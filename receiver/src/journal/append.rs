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
//! bytes through ordinary writes, without padding.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
    window: std::ops::Range<usize>,
    staged: usize,
    /// Where in the file the first staged byte goes (aligned while direct).
    at: u64,
}

fn align_down(n: u64) -> u64 {
    n - n % DIRECT_ALIGN as u64
}

fn round_up(n: usize) -> usize {
    n.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
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
        };
        a.reload(len)?;
        Ok(a)
    }

    /// Bytes in the file once everything staged is written.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.at + self.staged as u64
    }

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
        self.write_out(true)?;
        self.file.sync_data()
    }

    /// Cuts the file back to `len` bytes, durably, and appends from there;
    /// whatever was staged past it is dropped.
    pub fn cut(&mut self, len: u64) -> io::Result<()> {
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

    /// Writes the staged whole blocks, and with `pad` the partial last one
    /// too (zero-padded, and kept staged for the next write to extend).
    fn write_out(&mut self, pad: bool) -> io::Result<()> {
        if self.staged == 0 {
            return Ok(());
        }
        let Some(direct) = &self.direct else {
            let w = self.window.start..self.window.start + self.staged;
            self.file.write_all_at(&self.stage[w], self.at)?;
            self.at += self.staged as u64;
            self.staged = 0;
            return Ok(());
        };
        let whole = align_down(self.staged as u64) as usize;
        let len = if pad { round_up(self.staged) } else { whole };
        if len == 0 {
            return Ok(());
        }
        let start = self.window.start;
        if len > self.staged {
            self.stage[start + self.staged..start + len].fill(0);
        }
        match direct.write_all_at(&self.stage[start..start + len], self.at) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                // This filesystem takes O_DIRECT at open but not these
                // writes: the same bytes go through the page cache, from
                // the same offset, from now on.
                tracing::debug!("direct journal writes refused ({e}); writing through the cache");
                self.direct = None;
                return self.write_out(pad);
            }
            Err(e) => return Err(e),
        }
        self.stage
            .copy_within(start + whole..start + self.staged, start);
        self.at += whole as u64;
        self.staged -= whole;
        Ok(())
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
