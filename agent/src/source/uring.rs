//! The io_uring engine: up to `queue_depth` reads in flight, each owning a
//! pooled buffer until its completion is reaped.
//!
//! A read larger than the device takes in one request is submitted as
//! several parts into the same buffer. io_uring first tries a read
//! without blocking; the block layer refuses a request it would have to
//! split that way (EAGAIN), and io_uring then hands it to a worker thread
//! of its own to be issued blocking. A 1 MiB read of pages that are not
//! physically contiguous needs 256 segments, more than a loop device's
//! 128, so every read went through that worker (docs/BENCHMARKS.md).

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::{BufPool, ReadBuf, SourceError, ALIGN_BYTES};

/// One part of a read: `len` bytes at `start` in the slot's buffer.
struct Part {
    start: usize,
    len: usize,
    done: usize,
}

/// One read in flight.
struct Slot {
    buf: ReadBuf,
    offset: u64,
    len: usize,
    parts: Vec<Part>,
    /// Parts submitted and not yet finished.
    outstanding: usize,
    /// The first failure of a part; the slot is let go once no part of it
    /// is in flight any more.
    failed: Option<SourceError>,
}

/// `len` bytes in parts of at most `max_part`, as even as O_DIRECT's
/// alignment allows: 1 MiB under a 1016 KiB limit is two reads of 512 KiB,
/// not 1016 KiB and 8 KiB.
fn split(len: usize, max_part: usize) -> Vec<Part> {
    let n = len.div_ceil(max_part.max(ALIGN_BYTES)).max(1);
    let size = len
        .div_ceil(n)
        .next_multiple_of(ALIGN_BYTES)
        .max(ALIGN_BYTES);
    (0..len)
        .step_by(size)
        .map(|start| Part {
            start,
            len: (len - start).min(size),
            done: 0,
        })
        .collect()
}

/// user_data of a part: the slot's index in the high half.
fn user_data(idx: usize, part: usize) -> u64 {
    ((idx as u64) << 32) | part as u64
}

/// How many reads go in flight at most, and the largest part of one.
pub(super) struct Depth {
    pub reads: usize,
    pub max_part: usize,
}

pub(super) fn read_pieces<E: From<SourceError>>(
    ring: &mut IoUring,
    file: &File,
    Depth {
        reads: queue_depth,
        max_part,
    }: Depth,
    mut pieces: impl Iterator<Item = (u64, usize)>,
    pool: &BufPool,
    limit: Option<&crate::throttle::ReadLimit>,
    mut deliver: impl FnMut(u64, ReadBuf) -> Result<(), E>,
) -> Result<(), E> {
    let fd = types::Fd(file.as_raw_fd());
    let mut slots: Vec<Option<Slot>> = (0..queue_depth).map(|_| None).collect();
    let mut in_flight = 0usize;
    let mut failed: Option<E> = None;
    let mut next = pieces.next();

    loop {
        // Fill the queue while there is work, a free slot and a buffer.
        while failed.is_none() && in_flight < queue_depth {
            let Some((offset, len)) = next else { break };
            if let Some(wait) = limit.and_then(|l| l.wait()) {
                // Completions are delivered meanwhile; only with nothing
                // in flight is there nothing to do but sleep.
                if in_flight > 0 {
                    break;
                }
                std::thread::sleep(wait);
                continue;
            }
            let buf = match pool.try_get() {
                Some(b) => b,
                // All buffers are out: reap first if we can, else wait for
                // a consumer to hand one back.
                None if in_flight > 0 => break,
                None => pool.get(),
            };
            let idx = slots
                .iter()
                .position(Option::is_none)
                .expect("a slot is free below queue depth");
            let parts = split(len, max_part);
            let n_parts = parts.len();
            slots[idx] = Some(Slot {
                buf,
                offset,
                len,
                outstanding: parts.len(),
                parts,
                failed: None,
            });
            for part in 0..n_parts {
                if let Err(e) = submit(ring, fd, &mut slots, idx, part) {
                    return Err(abandon(&mut slots, e));
                }
            }
            if let Some(l) = limit {
                l.spend(len as u64);
            }
            in_flight += 1;
            next = pieces.next();
        }
        if in_flight == 0 {
            return match failed {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
        if let Err(e) = ring.submit_and_wait(1) {
            return Err(abandon(&mut slots, SourceError::SubmitRead(e)));
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (data, res) in completions {
            let (idx, part) = ((data >> 32) as usize, (data & 0xffff_ffff) as usize);
            let Some(slot) = slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            if res == -nix::libc::EINTR || res == -nix::libc::EAGAIN {
                if let Err(e) = submit(ring, fd, &mut slots, idx, part) {
                    return Err(abandon(&mut slots, e));
                }
                continue;
            }
            let p = &mut slot.parts[part];
            if res < 0 || (res == 0 && p.done < p.len) {
                let err = if res < 0 {
                    SourceError::ReadDevice {
                        offset_bytes: slot.offset + (p.start + p.done) as u64,
                        source: std::io::Error::from_raw_os_error(-res),
                    }
                } else {
                    SourceError::ShortRead {
                        offset_bytes: slot.offset,
                        expected: slot.len,
                        got: p.start + p.done,
                    }
                };
                slot.failed.get_or_insert(err);
                slot.outstanding -= 1;
            } else {
                p.done += res as usize;
                if p.done < p.len {
                    // Short read: ask for the rest.
                    if let Err(e) = submit(ring, fd, &mut slots, idx, part) {
                        return Err(abandon(&mut slots, e));
                    }
                    continue;
                }
                slot.outstanding -= 1;
            }
            if slot.outstanding > 0 {
                continue;
            }
            let done = slots[idx].take().expect("slot checked above");
            in_flight -= 1;
            if let Some(err) = done.failed {
                failed.get_or_insert(E::from(err));
                continue;
            }
            if failed.is_none() {
                let mut buf = done.buf;
                buf.set_len(done.len);
                if let Err(e) = deliver(done.offset, buf) {
                    failed = Some(e);
                }
            }
        }
    }
}

/// The ring failed with reads possibly still in flight: their buffers are
/// leaked rather than returned to the pool, because the kernel may still
/// write into them.
fn abandon<E: From<SourceError>>(slots: &mut [Option<Slot>], err: SourceError) -> E {
    for slot in slots.iter_mut().filter_map(Option::take) {
        std::mem::forget(slot.buf);
    }
    E::from(err)
}

/// Queues the (remaining) read of part `part` of slot `idx`.
fn submit(
    ring: &mut IoUring,
    fd: types::Fd,
    slots: &mut [Option<Slot>],
    idx: usize,
    part: usize,
) -> Result<(), SourceError> {
    let slot = slots[idx].as_mut().expect("submitting an occupied slot");
    let p = &slot.parts[part];
    let at = p.start + p.done;
    let remaining = (p.len - p.done) as u32;
    let offset = slot.offset + at as u64;
    // SAFETY: `start + done < start + len <= slot.len <= capacity`, so the
    // pointer stays inside the slot's buffer for `remaining` bytes, and
    // the parts of a slot never overlap.
    let ptr = unsafe { slot.buf.as_mut_ptr().add(at) };
    let entry = opcode::Read::new(fd, ptr, remaining)
        .offset(offset)
        .build()
        .user_data(user_data(idx, part));
    // SAFETY: the buffer stays owned by `slots[idx]` until every part's
    // completion is reaped: a slot is cleared only in the completion loop
    // once none of its parts is outstanding, and every early return with
    // reads in flight goes through `abandon`, which leaks their buffers
    // instead of freeing them. The fd belongs to `file`, which the caller
    // keeps open for the whole call.
    unsafe {
        while ring.submission().push(&entry).is_err() {
            ring.submit().map_err(SourceError::SubmitRead)?;
        }
    }
    // Submitted in a batch by the caller's submit_and_wait.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_read_evenly_and_aligned() {
        for (len, max_part, want) in [
            (1 << 20, 1 << 20, vec![1 << 20]),
            (1 << 20, 512 << 10, vec![512 << 10; 2]),
            (1 << 20, 1016 << 10, vec![512 << 10; 2]),
            (1 << 20, 384 << 10, vec![352256, 352256, 344064]),
            // A device end that is a 512-byte multiple: only the last part
            // is odd.
            (
                (1 << 20) - 512,
                512 << 10,
                vec![512 << 10, (512 << 10) - 512],
            ),
            (4096, 4096, vec![4096]),
            (8192, 0, vec![4096, 4096]),
            (0, 4096, vec![]),
        ] {
            let parts = split(len, max_part);
            let lens: Vec<usize> = parts.iter().map(|p| p.len).collect();
            assert_eq!(lens, want, "len {len} max {max_part}");
            let mut at = 0;
            for p in &parts {
                assert_eq!(p.start, at);
                assert_eq!(p.start % ALIGN_BYTES, 0);
                at += p.len;
            }
            assert_eq!(at, len);
        }
    }
}
