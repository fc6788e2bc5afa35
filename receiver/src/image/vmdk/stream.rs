//! streamOptimized export (OVA/OVF, vCenter, cloud import): a sequential
//! writer, not a live image. The layout is the spec's full-marker one that
//! every reader accepts (FORMATS.md §1.8):
//!
//! ```text
//! sector 0      header: version 3, flags 0x30001, gdOffset GD_AT_END
//! 1..21         embedded descriptor (createType="streamOptimized")
//! 128..         per non-zero grain, in ascending LBA: grain marker + zlib data
//!               after the grains of each grain table: GT marker + GT
//!               GD marker + GD, footer marker + footer, EOS marker
//! ```
//!
//! Grains are compressed on `threads` threads and written in LBA order:
//! the reader (the caller's thread) cuts the disk into jobs of
//! [`GRAINS_PER_JOB`] grains, compression threads take jobs from a bounded
//! channel, and a writer thread puts finished jobs back in sequence.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use crossbeam_channel::bounded;
use flate2::{Compress, Compression, FlushCompress, Status};

use super::descriptor;
use super::sparse::is_zero;
use super::sparse_header::{SparseHeader, SECTOR_BYTES};
use crate::image::{DiskUuid, Image, ImageError};

/// Metadata marker type of the end-of-stream marker (technote `MARKER_EOS`).
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type of a grain table (technote `MARKER_GT`).
pub const MARKER_GT: u32 = 1;
/// Metadata marker type of the grain directory (technote `MARKER_GD`).
pub const MARKER_GD: u32 = 2;
/// Metadata marker type of the footer (technote `MARKER_FOOTER`).
pub const MARKER_FOOTER: u32 = 3;

/// Bytes of a grain marker before the compressed data: lba u64, size u32 (technote `GrainMarker`).
pub const GRAIN_MARKER_BYTES: usize = 12;

/// First grain sector: the header area rounded to a grain (FORMATS.md §1.8, "overHead … e.g. 128").
const OVERHEAD_SECTORS: u64 = 128;

/// Grains per compression job (2 MiB of disk).
const GRAINS_PER_JOB: u64 = 32;

/// zlib level 1. Measured with miniz_oxide on the bench's mixed disk
/// (examples/vmdk_bench.rs): level 1 is 4.9x faster than level 6 (qemu's,
/// zlib's default) for output 3 % larger.
const ZLIB_LEVEL: u32 = 1;

/// Output buffer of the writer thread.
const WRITE_BUFFER_BYTES: usize = 4 << 20;

/// The 512-byte marker of a metadata block of `sectors` sectors.
fn metadata_marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Compresses one grain into a sector-padded grain marker record.
fn grain_record(z: &mut Compress, lba: u64, grain: &[u8]) -> Result<Vec<u8>, String> {
    // zlib's deflateBound for 64 KiB is 65 585 bytes; 1 KiB of slack covers it.
    let mut out = Vec::with_capacity(GRAIN_MARKER_BYTES + grain.len() + 1024);
    out.extend_from_slice(&lba.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    z.reset();
    let status = z
        .compress_vec(grain, &mut out, FlushCompress::Finish)
        .map_err(|e| format!("zlib: {e}"))?;
    if status != Status::StreamEnd || z.total_in() != grain.len() as u64 {
        return Err(format!("zlib did not finish a grain ({status:?})"));
    }
    let size = (out.len() - GRAIN_MARKER_BYTES) as u32;
    out[8..12].copy_from_slice(&size.to_le_bytes());
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(out)
}

struct Job {
    seq: u64,
    first_grain: u64,
    data: Vec<u8>,
}

/// A compressed job: (grain index, record) for each non-zero grain.
struct Done {
    seq: u64,
    records: Result<Vec<(u64, Vec<u8>)>, String>,
}

fn compress_job(z: &mut Compress, job: Job, grain_bytes: usize, grain_sectors: u64) -> Done {
    let records = job
        .data
        .chunks(grain_bytes)
        .enumerate()
        .filter(|(_, g)| !is_zero(g))
        .map(|(i, g)| {
            let gi = job.first_grain + i as u64;
            grain_record(z, gi * grain_sectors, g).map(|r| (gi, r))
        })
        .collect();
    Done {
        seq: job.seq,
        records,
    }
}

/// Sequential output with the grain table being filled.
struct StreamWriter<'a> {
    path: &'a Path,
    out: BufWriter<File>,
    /// Sector the next write lands on.
    sector: u64,
    gtes_per_gt: u64,
    gt: Option<(u64, Vec<u32>)>,
    gd: Vec<u32>,
}

impl StreamWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        debug_assert_eq!(bytes.len() % 512, 0);
        let at = self.sector * SECTOR_BYTES;
        self.out
            .write_all(bytes)
            .map_err(|source| ImageError::Write {
                path: self.path.to_path_buf(),
                offset_bytes: at,
                source,
            })?;
        self.sector += bytes.len() as u64 / SECTOR_BYTES;
        Ok(())
    }

    /// The current sector as a 32-bit GTE/GDE.
    fn sector_u32(&self) -> Result<u32, ImageError> {
        u32::try_from(self.sector).map_err(|_| ImageError::Write {
            path: self.path.to_path_buf(),
            offset_bytes: self.sector * SECTOR_BYTES,
            source: std::io::Error::other(
                "stream passes 2^32 sectors, beyond what 32-bit grain table entries address",
            ),
        })
    }

    fn grain(&mut self, gi: u64, record: &[u8]) -> Result<(), ImageError> {
        let g = gi / self.gtes_per_gt;
        if self.gt.as_ref().is_some_and(|(cur, _)| *cur != g) {
            self.end_gt()?;
        }
        let sector = self.sector_u32()?;
        let n = self.gtes_per_gt as usize;
        let (_, table) = self.gt.get_or_insert_with(|| (g, vec![0; n]));
        table[(gi % self.gtes_per_gt) as usize] = sector;
        self.write(record)
    }

    /// GT marker and table for the grains just written.
    fn end_gt(&mut self) -> Result<(), ImageError> {
        let Some((g, table)) = self.gt.take() else {
            return Ok(());
        };
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        self.write(&metadata_marker(
            bytes.len() as u64 / SECTOR_BYTES,
            MARKER_GT,
        ))?;
        self.gd[g as usize] = self.sector_u32()?;
        self.write(&bytes)
    }

    /// Last GT, GD, footer and end-of-stream; syncs the file.
    fn finish(mut self, mut header: SparseHeader) -> Result<(), ImageError> {
        self.end_gt()?;
        let mut gd: Vec<u8> = self.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        gd.resize(gd.len().div_ceil(512) * 512, 0);
        self.write(&metadata_marker(gd.len() as u64 / SECTOR_BYTES, MARKER_GD))?;
        header.gd_offset_sectors = self.sector;
        self.write(&gd)?;
        self.write(&metadata_marker(1, MARKER_FOOTER))?;
        self.write(&header.encode())?;
        self.write(&[0u8; 512])?;
        let path = self.path;
        let file = self.out.into_inner().map_err(|e| ImageError::Write {
            path: path.to_path_buf(),
            offset_bytes: 0,
            source: e.into_error(),
        })?;
        file.sync_all().map_err(|source| ImageError::Sync {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Reads `size_bytes` of `src` from the start and writes them to `out`
/// (which must not exist) as a streamOptimized VMDK with `uuid` as its
/// `ddb.uuid`, compressing on `threads` threads (0: one per core).
/// All-zero grains are left out. On failure `out` is removed.
pub fn export_stream(
    src: &mut dyn Image,
    size_bytes: u64,
    uuid: DiskUuid,
    out: &Path,
    threads: usize,
) -> Result<(), ImageError> {
    let create_err = |source| ImageError::Create {
        path: out.to_path_buf(),
        source,
    };
    if size_bytes == 0 {
        return Err(create_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an empty disk cannot be exported",
        )));
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(create_err)?;
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let result = write_stream(src, size_bytes, &uuid, out, file, threads);
    match result {
        Ok(()) => {
            let dir = out.parent().unwrap_or(Path::new("."));
            tidemark_common::durable::sync_dir(dir).map_err(|source| ImageError::Sync {
                path: out.to_path_buf(),
                source,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

fn write_stream(
    src: &mut dyn Image,
    size_bytes: u64,
    uuid: &DiskUuid,
    out: &Path,
    file: File,
    threads: usize,
) -> Result<(), ImageError> {
    let capacity = size_bytes.div_ceil(SECTOR_BYTES);
    let header = SparseHeader::stream(capacity, OVERHEAD_SECTORS);
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("disk.vmdk");
    let text = descriptor::sparse("streamOptimized", capacity * SECTOR_BYTES, name, uuid);
    let room = (header.descriptor_sectors * SECTOR_BYTES) as usize;
    if text.len() >= room || name.contains('"') {
        return Err(ImageError::Create {
            path: out.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the file name does not fit the embedded descriptor",
            ),
        });
    }
    let mut head = vec![0u8; (OVERHEAD_SECTORS * SECTOR_BYTES) as usize];
    head[..512].copy_from_slice(&header.encode());
    head[512..512 + text.len()].copy_from_slice(text.as_bytes());

    let grain_bytes = header.grain_bytes() as usize;
    let grain_sectors = header.grain_sectors;
    let total_grains = capacity.div_ceil(grain_sectors);
    let jobs = total_grains.div_ceil(GRAINS_PER_JOB);
    let mut w = StreamWriter {
        path: out,
        out: BufWriter::with_capacity(WRITE_BUFFER_BYTES, file),
        sector: 0,
        gtes_per_gt: u64::from(header.gtes_per_gt),
        gt: None,
        gd: vec![0; header.gt_count() as usize],
    };
    w.write(&head)?;

    let (job_tx, job_rx) = bounded::<Job>(threads * 2);
    let (done_tx, done_rx) = bounded::<Done>(threads * 2);
    let compress_failed = |m: String| ImageError::Write {
        path: out.to_path_buf(),
        offset_bytes: 0,
        source: std::io::Error::other(m),
    };
    std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            s.spawn(move || {
                let mut z = Compress::new(Compression::new(ZLIB_LEVEL), true);
                for job in rx {
                    if tx
                        .send(compress_job(&mut z, job, grain_bytes, grain_sectors))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(done_tx);
        let writer = s.spawn(move || -> Result<(StreamWriter, u64), ImageError> {
            let mut pending = BTreeMap::new();
            let mut next = 0u64;
            for done in done_rx {
                pending.insert(done.seq, done.records);
                while let Some(records) = pending.remove(&next) {
                    for (gi, record) in records.map_err(compress_failed)? {
                        w.grain(gi, &record)?;
                    }
                    next += 1;
                }
            }
            Ok((w, next))
        });
        let mut read_result = Ok(());
        for seq in 0..jobs {
            let first_grain = seq * GRAINS_PER_JOB;
            let grains = GRAINS_PER_JOB.min(total_grains - first_grain);
            let start = first_grain * grain_bytes as u64;
            let mut data = vec![0u8; grains as usize * grain_bytes];
            let len = (size_bytes - start).min(data.len() as u64) as usize;
            if let Err(e) = src.read_at(start, &mut data[..len]) {
                read_result = Err(e);
                break;
            }
            let job = Job {
                seq,
                first_grain,
                data,
            };
            if job_tx.send(job).is_err() {
                break; // the writer stopped; its error is reported below
            }
        }
        drop(job_tx);
        let written = writer
            .join()
            .map_err(|_| compress_failed("the stream writer thread panicked".into()))?;
        read_result?;
        let (w, done) = written?;
        if done != jobs {
            return Err(compress_failed(format!(
                "only {done} of {jobs} jobs came back from the compression threads"
            )));
        }
        w.finish(header)
    })
}
