//! Reading a disk: io_uring with many O_DIRECT reads in flight, or plain
//! pread when io_uring is unavailable (old kernel, seccomp, or
//! `TIDEMARK_NO_URING=1`). The engine is probed once per open and logged.

mod buf;
mod pread;
mod uring;

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use buf::{BufPool, Pages, ReadBuf, ALIGN_BYTES};

/// Which engine reads the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    Pread,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open {}", path.display())]
    OpenDevice {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("io_uring submission failed")]
    SubmitRead(#[source] std::io::Error),
    #[error("read at byte {offset_bytes} failed")]
    ReadDevice {
        offset_bytes: u64,
        source: std::io::Error,
    },
    #[error("read at byte {offset_bytes} ended early: {got} of {expected} bytes (device shrank?)")]
    ShortRead {
        offset_bytes: u64,
        expected: usize,
        got: usize,
    },
    #[error("range {start}..{end} is not aligned to {ALIGN_BYTES}-byte O_DIRECT blocks")]
    Unaligned { start: u64, end: u64 },
}

pub struct DeviceReader {
    file: File,
    path: PathBuf,
    engine: Engine,
    ring: Option<io_uring::IoUring>,
    queue_depth: usize,
    /// The device's queue limits; None for a file, whose reads the block
    /// layer does not split.
    limits: Option<QueueLimits>,
    /// Reads never go in parts larger than this ([`MAX_PART_BYTES`];
    /// tests lower it to exercise parts).
    max_part: usize,
    direct: bool,
    limit: Option<crate::throttle::ReadLimit>,
}

/// Reads larger than this are never split into parts: the size of the
/// agent's read buffers (`pipeline::READ_BYTES`).
const MAX_PART_BYTES: usize = 1 << 20;

/// What a block device's queue takes in one request.
#[derive(Debug, Clone, Copy)]
struct QueueLimits {
    max_sectors_kb: usize,
    max_segments: usize,
    max_segment_size: usize,
}

impl QueueLimits {
    /// The limits of `file`; None for a file that is not a block device
    /// or whose limits cannot be read.
    fn of(file: &File) -> Option<QueueLimits> {
        use crate::disks::{queue_attr, sysfs_dir};
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata().ok()?;
        if !meta.file_type().is_block_device() {
            return None;
        }
        let sysfs = sysfs_dir(&meta);
        let limit = |name| queue_attr(&sysfs, name).and_then(|n| usize::try_from(n).ok());
        Some(QueueLimits {
            max_sectors_kb: limit("max_sectors_kb")?,
            max_segments: limit("max_segments")?,
            max_segment_size: limit("max_segment_size")?,
        })
    }

    /// The largest read the block layer takes in one request into a
    /// buffer whose physically contiguous runs are `contiguous` bytes
    /// (a page, or more in huge pages): `max_sectors_kb`, and
    /// `max_segments` segments of at most such a run each (or of
    /// `max_segment_size` if smaller). A read it would split, io_uring
    /// issues again from a worker thread of its own (docs/BENCHMARKS.md,
    /// "reads the device takes whole"). At least one O_DIRECT block, at
    /// most [`MAX_PART_BYTES`], a multiple of [`ALIGN_BYTES`].
    fn unsplit_bytes(&self, contiguous: usize) -> usize {
        let by_segments = self
            .max_segments
            .saturating_mul(self.max_segment_size.min(contiguous.max(ALIGN_BYTES)));
        let bytes = self
            .max_sectors_kb
            .saturating_mul(1024)
            .min(by_segments)
            .min(MAX_PART_BYTES);
        (bytes / ALIGN_BYTES * ALIGN_BYTES).max(ALIGN_BYTES)
    }
}

/// Whether this process has not logged `line` yet. How a device is read
/// is said once: `run` opens its disks again every round, twice a second
/// or more under steady writes, and the same line filled the journal.
fn first_time(line: &str) -> bool {
    static SAID: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    SAID.lock()
        .map_or(true, |mut said| said.insert(line.to_owned()))
}

impl DeviceReader {
    /// Opens `path` read-only with O_DIRECT (buffered if the filesystem
    /// refuses O_DIRECT) and picks the engine.
    pub fn open(path: &Path, queue_depth: usize, force_pread: bool) -> Result<Self, SourceError> {
        let open = |flags: i32| OpenOptions::new().read(true).custom_flags(flags).open(path);
        let (file, direct) = match open(nix::libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                let line = format!(
                    "{} refuses O_DIRECT; reading through the page cache",
                    path.display()
                );
                if first_time(&line) {
                    tracing::warn!("{line}");
                }
                let f = open(0).map_err(|source| SourceError::OpenDevice {
                    path: path.to_path_buf(),
                    source,
                })?;
                (f, false)
            }
            Err(source) => {
                return Err(SourceError::OpenDevice {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let queue_depth = queue_depth.clamp(1, 4096);
        let limits = QueueLimits::of(&file);
        // Room in the rings for every part of every read in flight, in
        // parts as small as reads into base pages need.
        let smallest_part = limits.map_or(MAX_PART_BYTES, |l| l.unsplit_bytes(ALIGN_BYTES));
        let entries = (queue_depth * MAX_PART_BYTES.div_ceil(smallest_part)).min(4096);
        let no_uring_env = std::env::var("TIDEMARK_NO_URING").is_ok_and(|v| v == "1");
        let ring = if force_pread || no_uring_env {
            let line = format!("reading {} with pread (io_uring disabled)", path.display());
            if first_time(&line) {
                tracing::info!("{line}");
            }
            None
        } else {
            match io_uring::IoUring::new(entries.next_power_of_two() as u32) {
                Ok(r) => {
                    let line = format!(
                        "reading {} with io_uring, queue depth {queue_depth}, reads of up to {} KiB per request ({} KiB into huge pages){}",
                        path.display(),
                        smallest_part >> 10,
                        limits.map_or(MAX_PART_BYTES, |l| l.unsplit_bytes(usize::MAX)) >> 10,
                        if direct { ", O_DIRECT" } else { "" }
                    );
                    if first_time(&line) {
                        tracing::info!("{line}");
                    }
                    Some(r)
                }
                Err(e) => {
                    let line = format!(
                        "io_uring unavailable ({e}); reading {} with pread",
                        path.display()
                    );
                    if first_time(&line) {
                        tracing::warn!("{line}");
                    }
                    None
                }
            }
        };
        Ok(DeviceReader {
            file,
            path: path.to_path_buf(),
            engine: if ring.is_some() {
                Engine::IoUring
            } else {
                Engine::Pread
            },
            ring,
            queue_depth,
            limits,
            max_part: MAX_PART_BYTES,
            direct,
            limit: None,
        })
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The largest request a read into `pool`'s buffers is issued as
    /// (see [`QueueLimits::unsplit_bytes`]).
    pub fn request_bytes(&self, pool: &BufPool) -> usize {
        self.limits
            .map_or(MAX_PART_BYTES, |l| l.unsplit_bytes(pool.contiguous_bytes()))
            .min(self.max_part)
    }

    /// Issues reads no faster than `limit` allows (None: as fast as the
    /// device goes).
    pub fn set_read_limit(&mut self, limit: Option<crate::throttle::ReadLimit>) {
        self.limit = limit;
    }

    /// Reads every byte of `ranges` in pieces of at most the pool's buffer
    /// size and hands each to `deliver(offset_bytes, buf)` in completion
    /// order. If `deliver` fails, reads still in flight are reaped before
    /// its error is returned, so no buffer is freed while the kernel
    /// writes into it.
    pub fn read_ranges<E: From<SourceError>>(
        &mut self,
        ranges: &[Range<u64>],
        pool: &BufPool,
        deliver: impl FnMut(u64, ReadBuf) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.direct {
            for r in ranges {
                // The device end may be a 512-byte multiple; everything else
                // must sit on 4 KiB boundaries for O_DIRECT.
                if r.start % ALIGN_BYTES as u64 != 0 || r.end % 512 != 0 {
                    return Err(SourceError::Unaligned {
                        start: r.start,
                        end: r.end,
                    }
                    .into());
                }
            }
        }
        let piece = pool.buf_bytes() as u64;
        let pieces = ranges.iter().flat_map(move |r| {
            (r.start..r.end)
                .step_by(piece as usize)
                .map(move |off| (off, (r.end - off).min(piece) as usize))
        });
        let max_part = self.request_bytes(pool);
        match self.ring.as_mut() {
            Some(ring) => uring::read_pieces(
                ring,
                &self.file,
                uring::Depth {
                    reads: self.queue_depth,
                    max_part,
                },
                pieces,
                pool,
                self.limit.as_ref(),
                deliver,
            ),
            None => pread::read_pieces(&self.file, pieces, pool, self.limit.as_ref(), deliver),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x9e3779b97f4a7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn reassemble(
        engine_pread: bool,
        file: &Path,
        ranges: &[Range<u64>],
        pool: &BufPool,
    ) -> Vec<u8> {
        let mut r = DeviceReader::open(file, 8, engine_pread).expect("open");
        assert_eq!(r.engine() == Engine::Pread, engine_pread);
        let len = ranges.iter().map(|r| r.end).max().unwrap_or(0) as usize;
        let mut out = vec![0xeeu8; len];
        r.read_ranges::<SourceError>(ranges, pool, |off, buf| {
            out[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
            Ok(())
        })
        .expect("read");
        out
    }

    #[test]
    fn both_engines_read_exactly_the_ranges() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("disk");
        let data = pattern((9 << 20) + 4096);
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(&data))
            .expect("write");
        let pool = BufPool::new(3, 1 << 20);
        let ranges = [0..(1 << 20) + 8192, (3 << 20) + 4096..data.len() as u64];
        for pread in [false, true] {
            let got = reassemble(pread, &p, &ranges, &pool);
            for r in &ranges {
                let (s, e) = (r.start as usize, r.end as usize);
                assert!(got[s..e] == data[s..e], "engine pread={pread} range {r:?}");
            }
            assert!(got[(1 << 20) + 8192..(3 << 20) + 4096]
                .iter()
                .all(|&b| b == 0xee));
        }
    }

    #[test]
    fn reads_in_parts_reassemble_exactly() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("disk");
        let data = pattern((5 << 20) + 4096);
        std::fs::write(&p, &data).expect("write");
        let pool = BufPool::new(3, 1 << 20);
        let ranges = [4096..(2 << 20) + 12288, (3 << 20)..data.len() as u64];
        // Parts that do not divide a read evenly, and one block each.
        for max_part in [12 << 10, 4096] {
            let mut r = DeviceReader::open(&p, 2, false).expect("open");
            assert_eq!(r.engine(), Engine::IoUring);
            r.max_part = max_part;
            let mut got = vec![0xeeu8; data.len()];
            r.read_ranges::<SourceError>(&ranges, &pool, |off, buf| {
                got[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
                Ok(())
            })
            .expect("read");
            for r in &ranges {
                let (s, e) = (r.start as usize, r.end as usize);
                assert!(got[s..e] == data[s..e], "parts of {max_part}: range {r:?}");
            }
            assert!(got[..4096].iter().all(|&b| b == 0xee));
        }
        // A file is no block device: its reads are not split.
        let f = File::open(&p).expect("open");
        assert!(QueueLimits::of(&f).is_none());
    }

    #[test]
    fn unsplit_size_follows_the_queue_limits() {
        let unsplit = |max_sectors_kb, max_segments, max_segment_size, contiguous| {
            QueueLimits {
                max_sectors_kb,
                max_segments,
                max_segment_size,
            }
            .unsplit_bytes(contiguous)
        };
        let page = 4096;
        // A loop device: 128 segments of one page bound it below
        // max_sectors_kb; in huge pages a segment is 64 KiB, and the
        // whole buffer goes in one request.
        assert_eq!(unsplit(1280, 128, 65536, page), 512 << 10);
        assert_eq!(unsplit(1280, 128, 65536, 2 << 20), MAX_PART_BYTES);
        // virtio-blk here: 254 pages.
        assert_eq!(unsplit(4096, 254, u32::MAX as usize, page), 254 * 4096);
        // Segments smaller than a page, whatever the buffer.
        assert_eq!(unsplit(1024, 128, 512, page), 64 << 10);
        assert_eq!(unsplit(1024, 128, 512, 2 << 20), 64 << 10);
        // Limited by max_sectors_kb, never above the read buffers.
        assert_eq!(unsplit(128, 1024, 65536, page), 128 << 10);
        assert_eq!(unsplit(128, 1024, 65536, 2 << 20), 128 << 10);
        assert_eq!(unsplit(32768, 4096, 1 << 20, page), MAX_PART_BYTES);
        // Nonsense limits still give one O_DIRECT block.
        assert_eq!(unsplit(0, 0, 0, page), ALIGN_BYTES);
        assert_eq!(unsplit(1280, 128, 65536, 0), 512 << 10);
    }

    #[test]
    fn deliver_error_stops_cleanly() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("disk");
        std::fs::write(&p, pattern(4 << 20)).expect("write");
        let pool = BufPool::new(4, 256 << 10);
        for pread in [false, true] {
            let mut r = DeviceReader::open(&p, 4, pread).expect("open");
            let mut calls = 0;
            let res: Result<(), SourceError> = r.read_ranges(&[0..4 << 20], &pool, |_, _| {
                calls += 1;
                if calls == 2 {
                    Err(SourceError::ShortRead {
                        offset_bytes: 0,
                        expected: 1,
                        got: 0,
                    })
                } else {
                    Ok(())
                }
            });
            assert!(matches!(res, Err(SourceError::ShortRead { .. })));
            assert_eq!(calls, 2);
            // Every buffer is back in the pool.
            let all: Vec<_> = (0..4).map(|_| pool.try_get().expect("returned")).collect();
            drop(all);
        }
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let p = dir.path().join("disk");
        std::fs::write(&p, pattern(1 << 20)).expect("write");
        let pool = BufPool::new(2, 1 << 20);
        // io_uring reading whole buffers and in parts (some of which then
        // read nothing at all), and pread.
        for (pread, max_part) in [(false, MAX_PART_BYTES), (false, 12 << 10), (true, 0)] {
            let mut r = DeviceReader::open(&p, 2, pread).expect("open");
            r.max_part = max_part;
            let res = r.read_ranges::<SourceError>(&[0..2 << 20], &pool, |_, _| Ok(()));
            assert!(
                matches!(res, Err(SourceError::ShortRead { .. })),
                "pread={pread} parts of {max_part}: {res:?}"
            );
            // Every buffer is back in the pool.
            let all: Vec<_> = (0..2).map(|_| pool.try_get().expect("returned")).collect();
            drop(all);
        }
    }

    #[test]
    fn missing_device_is_named() {
        let err = DeviceReader::open(Path::new("/nonexistent/disk"), 4, false)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("/nonexistent/disk"));
    }
}
