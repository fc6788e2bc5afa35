//! Checksum sync on the receiver's side: reading and hashing the image
//! ahead of the agent's requests, on the disk's reader threads
//! ([`super::readers`]).
//!
//! The agent asks for the hashes of its disk in order, one read-sized
//! range after the other, and only sends data once it has compared them.
//! Read one request at a time on the session thread, the image is read at
//! the latency of one read, never at the rate of the disk under it: read
//! that way past the page cache, a 4 GiB checksum sync got slower (9.5 s)
//! than with the page cache's read-ahead, which in turn cost the session
//! thread two-fifths of its time in copying and filling pages. So the
//! ranges after the one asked for are read and hashed in the background,
//! past the page cache and several at once, and a request finds its
//! answer ready.
//!
//! An answer must hash the image as every earlier message of the session
//! left it. The session writes the image while ranges ahead are in flight
//! (the differing blocks it is sent, and any replication going on); every
//! such write calls [`HashAhead::invalidate`], and a range it touched is
//! hashed again when asked for. A range read after the write sees it (the
//! kernel writes back cached pages before a read past the page cache).

use std::collections::VecDeque;

use tidemark_common::checksum::{block_checksums, zero_checksum, Checksum};

use super::readers::{Pending, Readers, When};
use crate::image::storage::aligned_range;
use crate::image::{Image, ImageError};

/// Ranges asked for ahead of the agent's latest request (of its read size,
/// 1 MiB): enough to keep every reader busy, few enough that answers thrown
/// away after an out-of-order request cost little.
const AHEAD: usize = 12;

type Answer = Result<Vec<Checksum>, ImageError>;

/// A range asked for.
struct Asked {
    offset_bytes: u64,
    len_bytes: u64,
    block_bytes: usize,
    answer: Pending<Vec<Checksum>>,
    /// False once the session wrote into the range after asking.
    valid: bool,
}

/// The read-ahead of one disk's image for one session.
#[derive(Default)]
pub struct HashAhead {
    asked: VecDeque<Asked>,
}

impl HashAhead {
    /// The hashes of `block_bytes` pieces of the range, as the image holds
    /// it after every write the session made so far; then asks `readers`
    /// for the ranges after it, as the agent will.
    pub fn hashes(
        &mut self,
        readers: &Readers,
        size_bytes: u64,
        offset_bytes: u64,
        len_bytes: u64,
        block_bytes: usize,
    ) -> Answer {
        // Answers for ranges before this one were not wanted after all.
        while self
            .asked
            .front()
            .is_some_and(|p| p.offset_bytes < offset_bytes)
        {
            self.asked.pop_front();
        }
        let usable = self.asked.front().is_some_and(|p| {
            p.offset_bytes == offset_bytes
                && p.len_bytes == len_bytes
                && p.block_bytes == block_bytes
                && p.valid
        });
        if !usable {
            // Out of the order guessed, or written since: start again here.
            self.asked.clear();
            self.ask(readers, When::Soon, offset_bytes, len_bytes, block_bytes);
        }
        let Some(this) = self.asked.pop_front() else {
            unreachable!("a range was just asked for");
        };
        let mut next = self
            .asked
            .back()
            .map_or(offset_bytes + len_bytes, |p| p.offset_bytes + p.len_bytes);
        while self.asked.len() < AHEAD && next < size_bytes {
            let len = len_bytes.min(size_bytes - next);
            self.ask(readers, When::Later, next, len, block_bytes);
            next += len;
        }
        this.answer.wait()
    }

    /// The session wrote `start..end`: answers for ranges overlapping it
    /// may predate the write.
    pub fn invalidate(&mut self, start: u64, end: u64) {
        for p in &mut self.asked {
            if p.offset_bytes < end && start < p.offset_bytes + p.len_bytes {
                p.valid = false;
            }
        }
    }

    /// Waits until every range asked for is answered (tests: so that a
    /// write lands after the read it must invalidate).
    #[cfg(test)]
    fn settle(&self) {
        for p in &self.asked {
            while !p.answer.is_ready() {
                std::thread::yield_now();
            }
        }
    }

    fn ask(&mut self, readers: &Readers, when: When, offset: u64, len: u64, block: usize) {
        let answer = readers.run(when, offset, move |image, buf| {
            hash_range(image, buf, offset, len, block)
        });
        self.asked.push_back(Asked {
            offset_bytes: offset,
            len_bytes: len,
            block_bytes: block,
            answer,
            valid: true,
        });
    }
}

/// The hashes of `len` bytes of an unallocated range: zeros, known without
/// reading or hashing.
pub fn zero_hashes(len: u64, block: usize) -> Vec<Checksum> {
    let (len, block) = (len as usize, block.max(1));
    (0..len)
        .step_by(block)
        .map(|at| zero_checksum(block.min(len - at)))
        .collect()
}

fn hash_range(
    image: &mut dyn Image,
    buf: &mut Vec<u8>,
    offset: u64,
    len: u64,
    block: usize,
) -> Answer {
    let block = block.max(1);
    if image.is_hole(offset, len) {
        return Ok(zero_hashes(len, block));
    }
    // Aligned, so that the read bypasses the page cache.
    let window = aligned_range(buf, len as usize);
    let data = &mut buf[window];
    image.read_at(offset, data)?;
    let mut out = Vec::with_capacity(data.len().div_ceil(block));
    block_checksums(data, block, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::raw::RawImage;

    fn expected(image: &mut RawImage, offset: u64, len: u64) -> Vec<Checksum> {
        let mut data = vec![0u8; len as usize];
        image.read_at(offset, &mut data).unwrap();
        data.chunks(4096)
            .map(tidemark_common::checksum::checksum)
            .collect()
    }

    #[test]
    fn answers_match_the_image_after_writes_into_ranges_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let size = 16u64 << 20;
        let mut image = RawImage::create(&path, size).unwrap();
        // Data in every other MiB, holes in between.
        for mib in (0..16u64).step_by(2) {
            let data: Vec<u8> = (0..1u32 << 20).map(|i| (i ^ mib as u32) as u8).collect();
            image.write_at(mib << 20, &data).unwrap();
        }
        let readers = Readers::new(&image).expect("raw images read on other threads");
        let mut ahead = HashAhead::default();
        let chunk = 1u64 << 20;
        for mib in 0..16u64 {
            let at = mib * chunk;
            // Write into a range asked for ahead (and, once, into the very
            // next one): its answer must see the write.
            if mib % 3 == 1 {
                ahead.settle();
                let target = (at + 5 * chunk / 2).min(size - 4096);
                image.write_at(target, &[0xa5; 4096]).unwrap();
                ahead.invalidate(target, target + 4096);
            }
            let got = ahead.hashes(&readers, size, at, chunk, 4096).unwrap();
            assert_eq!(got, expected(&mut image, at, chunk), "MiB {mib}");
        }
        // Out of order, and a different length: still the image's hashes.
        let got = ahead.hashes(&readers, size, 3 * chunk, 8192, 4096).unwrap();
        assert_eq!(got, expected(&mut image, 3 * chunk, 8192));
        let got = ahead
            .hashes(&readers, size, chunk / 2, chunk, 4096)
            .unwrap();
        assert_eq!(got, expected(&mut image, chunk / 2, chunk));
    }

    #[test]
    fn a_read_error_is_answered_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let image = RawImage::create(&path, 4 << 20).unwrap();
        let readers = Readers::new(&image).unwrap();
        let mut ahead = HashAhead::default();
        // Past the end: the reader refuses the range.
        let err = ahead
            .hashes(&readers, 8 << 20, 4 << 20, 1 << 20, 4096)
            .unwrap_err();
        assert!(err.to_string().contains("disk.raw"), "{err}");
    }
}
