//! The io_uring engine: up to `queue_depth` reads in flight, each owning a
//! pooled buffer until its completion is reaped.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::{BufPool, ReadBuf, SourceError};

/// One read in flight.
struct Slot {
    buf: ReadBuf,
    offset: u64,
    len: usize,
    done: usize,
}

pub(super) fn read_pieces<E: From<SourceError>>(
    ring: &mut IoUring,
    file: &File,
    queue_depth: usize,
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
            slots[idx] = Some(Slot {
                buf,
                offset,
                len,
                done: 0,
            });
            if let Err(e) = submit(ring, fd, &mut slots, idx) {
                return Err(abandon(&mut slots, e));
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
        for (user_data, res) in completions {
            let idx = user_data as usize;
            let Some(slot) = slots[idx].as_mut() else {
                continue;
            };
            if res == -nix::libc::EINTR || res == -nix::libc::EAGAIN {
                if let Err(e) = submit(ring, fd, &mut slots, idx) {
                    return Err(abandon(&mut slots, e));
                }
                continue;
            }
            if res < 0 || (res == 0 && slot.done < slot.len) {
                let err = if res < 0 {
                    SourceError::ReadDevice {
                        offset_bytes: slot.offset + slot.done as u64,
                        source: std::io::Error::from_raw_os_error(-res),
                    }
                } else {
                    SourceError::ShortRead {
                        offset_bytes: slot.offset,
                        expected: slot.len,
                        got: slot.done,
                    }
                };
                slots[idx] = None;
                in_flight -= 1;
                failed.get_or_insert(E::from(err));
                continue;
            }
            slot.done += res as usize;
            if slot.done < slot.len {
                // Short read: ask for the rest.
                if let Err(e) = submit(ring, fd, &mut slots, idx) {
                    return Err(abandon(&mut slots, e));
                }
                continue;
            }
            let done = slots[idx].take().expect("slot checked above");
            in_flight -= 1;
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

/// Queues the (remaining) read of slot `idx`.
fn submit(
    ring: &mut IoUring,
    fd: types::Fd,
    slots: &mut [Option<Slot>],
    idx: usize,
) -> Result<(), SourceError> {
    let slot = slots[idx].as_mut().expect("submitting an occupied slot");
    let remaining = (slot.len - slot.done) as u32;
    let offset = slot.offset + slot.done as u64;
    // SAFETY: `done < len <= capacity`, so the pointer stays inside the
    // slot's buffer for `remaining` bytes.
    let ptr = unsafe { slot.buf.as_mut_ptr().add(slot.done) };
    let entry = opcode::Read::new(fd, ptr, remaining)
        .offset(offset)
        .build()
        .user_data(idx as u64);
    // SAFETY: the buffer stays owned by `slots[idx]` until this entry's
    // completion is reaped: slots are cleared only in the completion loop,
    // and every early return with reads in flight goes through `abandon`,
    // which leaks their buffers instead of freeing them. The fd belongs to
    // `file`, which the caller keeps open for the whole call.
    unsafe {
        while ring.submission().push(&entry).is_err() {
            ring.submit().map_err(SourceError::SubmitRead)?;
        }
    }
    // Submitted in a batch by the caller's submit_and_wait.
    Ok(())
}
