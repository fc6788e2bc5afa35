//! Checksum sync: the receiver hashes its image in blocks, the agent
//! hashes the same blocks of the device as it reads them, and only blocks
//! whose hashes differ travel. Hashes flow receiver → agent, so the agent's
//! upload is the differing data alone; they are requested a bounded
//! distance ahead of the reader and dropped once compared, so neither side
//! ever holds a whole-disk hash list.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Condvar, Mutex};

use tidemark_common::checksum::{block_checksums, Checksum};

use crate::pipeline::{Job, READ_BYTES};

/// Hash block: the page and filesystem block size, so a scattered 4 KiB
/// change costs 4 KiB of upload, not a larger block's worth.
pub const HASH_BLOCK_BYTES: u32 = 4096;

/// The receiver's hashes of each requested chunk, handed from the network
/// task to the compression workers that wait for them.
#[derive(Default)]
pub struct HashBoard {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    /// Chunks requested and not yet compared, by (disk index, offset).
    wanted: HashSet<(u32, u64)>,
    arrived: HashMap<(u32, u64), Vec<Checksum>>,
    consumed: u64,
    closed: bool,
}

impl HashBoard {
    /// Notes that hashes for this chunk were asked for.
    pub fn want(&self, disk: u32, offset: u64) {
        self.lock().wanted.insert((disk, offset));
    }

    /// Delivers the receiver's answer. A duplicate (a request resent after
    /// a reconnect whose first answer did arrive) is dropped.
    pub fn put(&self, disk: u32, offset: u64, hashes: Vec<Checksum>) {
        let mut s = self.lock();
        if s.wanted.contains(&(disk, offset)) {
            s.arrived.insert((disk, offset), hashes);
            self.ready.notify_all();
        }
    }

    /// Blocks until the hashes for this chunk arrive; None once closed.
    pub fn take(&self, disk: u32, offset: u64) -> Option<Vec<Checksum>> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(h) = s.arrived.remove(&(disk, offset)) {
                s.wanted.remove(&(disk, offset));
                s.consumed += 1;
                return Some(h);
            }
            s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Chunks compared so far.
    pub fn consumed(&self) -> u64 {
        self.lock().consumed
    }

    /// Wakes every waiter with None: the run is over or abandoned.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A worker that panicked holding the lock cannot have left the maps
        // half-updated (every update is one call): keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Chunks whose hashes are requested ahead of the reader: enough to hide
/// the round trip at device speed, far more than the reader can have in
/// flight (queue depth plus pool), few enough to bound memory (8 KiB of
/// hashes per chunk).
pub const HASH_LOOKAHEAD: u64 = 64;

/// The chunks of every checksum job, in the order the reader reads them.
pub struct ChunkCursor {
    chunks: Vec<(u32, Range<u64>)>,
    next: usize,
    at: u64,
}

impl ChunkCursor {
    pub fn new(jobs: &[Job]) -> ChunkCursor {
        let chunks = jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.compare)
            .flat_map(|(i, j)| j.ranges.iter().map(move |r| (i as u32, r.clone())))
            .collect::<Vec<_>>();
        let at = chunks.first().map_or(0, |c| c.1.start);
        ChunkCursor {
            chunks,
            next: 0,
            at,
        }
    }
}

/// (disk index, offset, length) of each chunk.
impl Iterator for ChunkCursor {
    type Item = (u32, u64, u32);

    fn next(&mut self) -> Option<(u32, u64, u32)> {
        loop {
            let (disk, range) = self.chunks.get(self.next)?;
            if self.at < range.end {
                let len = (range.end - self.at).min(READ_BYTES as u64);
                let out = (*disk, self.at, len as u32);
                self.at += len;
                return Some(out);
            }
            self.next += 1;
            self.at = self.chunks.get(self.next).map_or(0, |c| c.1.start);
        }
    }
}

/// The byte ranges of `buf` whose [`HASH_BLOCK_BYTES`] blocks hash
/// differently from `remote`, merged. A hash list of the wrong length
/// (which a correct receiver never sends) makes the whole buffer differ:
/// sending too much is safe, skipping data is not.
pub fn differing(buf: &[u8], remote: &[Checksum]) -> Vec<Range<usize>> {
    let block = HASH_BLOCK_BYTES as usize;
    if remote.len() != buf.len().div_ceil(block) {
        return if buf.is_empty() {
            Vec::new()
        } else {
            vec![0..buf.len()]
        };
    }
    let mut local = Vec::with_capacity(remote.len());
    block_checksums(buf, block, &mut local);
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, (l, r)) in local.iter().zip(remote).enumerate() {
        if l == r {
            continue;
        }
        let start = i * block;
        let end = (start + block).min(buf.len());
        match out.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => out.push(start..end),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_common::checksum::checksum;

    #[test]
    fn only_changed_blocks_differ_and_neighbours_merge() {
        let mut buf = vec![7u8; 5 * 4096 + 512];
        let remote: Vec<Checksum> = buf.chunks(4096).map(checksum).collect();
        assert!(differing(&buf, &remote).is_empty());
        buf[4096] = 0;
        buf[2 * 4096 + 4095] = 0;
        buf[5 * 4096 + 1] = 0;
        assert_eq!(
            differing(&buf, &remote),
            vec![4096..3 * 4096, 5 * 4096..5 * 4096 + 512]
        );
        assert_eq!(differing(&buf, &remote[..2]), vec![0..buf.len()]);
    }

    #[test]
    fn waiters_get_their_chunk_or_none_after_close() {
        let board = std::sync::Arc::new(HashBoard::default());
        board.want(0, 4096);
        board.put(1, 0, vec![[1; 32]]);
        let b = board.clone();
        let waiter = std::thread::spawn(move || b.take(0, 4096));
        board.put(0, 4096, vec![[2; 32]]);
        assert_eq!(waiter.join().expect("join"), Some(vec![[2; 32]]));
        assert_eq!(board.consumed(), 1);
        // A late duplicate is not kept.
        board.put(0, 4096, vec![[2; 32]]);
        let b = board.clone();
        let waiter = std::thread::spawn(move || b.take(0, 8192));
        board.close();
        assert_eq!(waiter.join().expect("join"), None);
    }
}
