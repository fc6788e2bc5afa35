//! The undo journal: before the receiver overwrites part of an image, it
//! saves what was there. Records live in one segment file per disk and per
//! point interval, `undo/<disk>/<tag>.undo`, where `tag` is the id of the
//! newest point the disk had when the overwrite happened. The disk as of
//! point P is then the live image with every record of segments tagged
//! ≥ P applied newest first (so for each byte the oldest pre-image wins).
//! Dropping a point's history is deleting whole segment files.
//!
//! Record layout, all integers big-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `TDUR` |
//! | 1 | codec: 0 raw, 1 zstd, 2 zeros (no payload) |
//! | 1 | checksum: 0 BLAKE3 (32 bytes), 1 CRC32C (4 bytes) |
//! | 2 | zero |
//! | 8 | offset in the disk, bytes |
//! | 4 | length in the disk, bytes |
//! | 4 | payload length |
//! | 4 or 32 | the checksum of the 24 bytes above and the payload |
//! | n | payload |
//!
//! A torn last record (crash mid-append) fails its checksum: readers stop
//! there and the writer cuts it off when it reopens the segment. Records
//! are written with CRC32C, which is what that takes (it is what ext4's
//! and XFS's journals use for the same job), at a hardware instruction's
//! speed: BLAKE3 over records of a few KiB, where it cannot use its SIMD
//! lanes, was 3 % of the whole machine under 175 MB/s of churn
//! (docs/BENCHMARKS.md). Records of older segments, with BLAKE3, are read
//! as they are; the checksum byte is itself covered by the checksum.
//! Segments
//! are appended past the page cache in whole blocks ([`super::append`]),
//! so one may also end in up to a block of zero padding, which readers stop
//! at the same way.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tidemark_common::checksum::checksum_parts;
use tidemark_common::effort::Effort;

use super::append::DirectAppend;
use crate::image::storage::DIRECT_ALIGN;

const MAGIC: [u8; 4] = *b"TDUR";
const HEADER_BYTES: usize = 24;
/// Header byte 5: which checksum follows the header.
const SUM_BLAKE3: u8 = 0;
const SUM_CRC32C: u8 = 1;
/// Longest record payload accepted when reading: bounds memory on a
/// damaged file. Writers never store more than one extent per record.
const MAX_RECORD_BYTES: u32 = 64 << 20;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_ZERO: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("cannot open undo segment {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write undo segment {}", path.display())]
    Append {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read undo segment {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("undo segment {} is damaged at byte {offset}: {message}", path.display())]
    Damaged {
        path: PathBuf,
        offset: u64,
        message: String,
    },
    #[error("cannot remove undo segment {}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One saved pre-image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// None: the range was all zeros.
    pub data: Option<Vec<u8>>,
}

/// The directory of a disk's undo segments.
pub fn disk_dir(retention_dir: &Path, disk_id: &str) -> PathBuf {
    retention_dir.join("undo").join(disk_id)
}

pub fn segment_path(dir: &Path, tag: u64) -> PathBuf {
    dir.join(format!("{tag:020}.undo"))
}

/// Segment tags present for a disk, ascending.
pub fn segments(dir: &Path) -> Result<Vec<u64>, UndoError> {
    let mut tags: Vec<u64> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".undo")?.parse().ok()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(UndoError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    tags.sort_unstable();
    Ok(tags)
}

/// Zstd level of pre-images: the fastest of the normal levels, since
/// every overwrite pays it.
const ZSTD_LEVEL: i32 = 1;

/// Encodes one pre-image; `zstd` and `zbuf` are the caller's, kept from
/// record to record (a fresh context and output buffer per 4 MiB record
/// cost more than the compression on mixed data).
fn encode(
    zstd: &mut Option<zstd::bulk::Compressor<'static>>,
    zbuf: &mut Vec<u8>,
    offset_bytes: u64,
    pre: &[u8],
    out: &mut Vec<u8>,
) {
    encode_at(zstd, Some(ZSTD_LEVEL), zbuf, offset_bytes, pre, out);
}

/// [`encode`] at `level`, or uncompressed with None; `zstd` is created at
/// the level on first use, so a caller keeps one context per level.
/// Returns the length of the payload stored (`pre`'s own when it did not
/// shrink; 0 for zeros).
fn encode_at(
    zstd: &mut Option<zstd::bulk::Compressor<'static>>,
    level: Option<i32>,
    zbuf: &mut Vec<u8>,
    offset_bytes: u64,
    pre: &[u8],
    out: &mut Vec<u8>,
) -> usize {
    let (head, stored) = encode_apart(zstd, level, zbuf, offset_bytes, pre);
    let payload = stored.of(zbuf, pre);
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    payload.len()
}

/// A record's header and checksum: the record is this, then its payload.
type Head = [u8; HEADER_BYTES + 4];

/// Where an encoded record's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stored {
    /// Zeros: no payload.
    Nothing,
    /// The compressed buffer.
    Compressed,
    /// The pre-image itself.
    Raw,
}

impl Stored {
    fn of<'a>(self, compressed: &'a [u8], pre: &'a [u8]) -> &'a [u8] {
        match self {
            Stored::Nothing => &[],
            Stored::Compressed => compressed,
            Stored::Raw => pre,
        }
    }
}

/// [`encode_at`] without copying the payload: compresses `pre` into
/// `zbuf` and returns the record's head and which of the two its payload
/// is. The journal's encoder hands both over as they are, and the record
/// is put together only where it is staged for the disk (copying the
/// pre-image into a record first cost a copy of every byte journaled).
fn encode_apart(
    zstd: &mut Option<zstd::bulk::Compressor<'static>>,
    level: Option<i32>,
    zbuf: &mut Vec<u8>,
    offset_bytes: u64,
    pre: &[u8],
) -> (Head, Stored) {
    if pre.iter().all(|&b| b == 0) {
        return (
            head(CODEC_ZERO, offset_bytes, pre.len() as u32, &[]),
            Stored::Nothing,
        );
    }
    let compressed = level.is_some_and(|level| {
        if zstd.is_none() {
            *zstd = zstd::bulk::Compressor::new(level).ok();
        }
        zbuf.clear();
        // Only a smaller result is kept, so the bound is the input's length.
        zbuf.reserve(pre.len());
        zstd.as_mut()
            .is_some_and(|z| z.compress_to_buffer(pre, zbuf).is_ok())
    });
    let (codec, stored) = if compressed && zbuf.len() < pre.len() {
        (CODEC_ZSTD, Stored::Compressed)
    } else {
        (CODEC_RAW, Stored::Raw)
    };
    let payload = stored.of(zbuf, pre);
    (head(codec, offset_bytes, pre.len() as u32, payload), stored)
}

fn encode_zeros(offset_bytes: u64, len_bytes: u32, out: &mut Vec<u8>) {
    encode_parts(CODEC_ZERO, offset_bytes, len_bytes, &[], out);
}

fn encode_parts(codec: u8, offset_bytes: u64, len_bytes: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&head(codec, offset_bytes, len_bytes, payload));
    out.extend_from_slice(payload);
}

/// The header and CRC32C of a record of `payload`.
fn head(codec: u8, offset_bytes: u64, len_bytes: u32, payload: &[u8]) -> Head {
    let mut h = [0u8; HEADER_BYTES + 4];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&[codec, SUM_CRC32C, 0, 0]);
    h[8..16].copy_from_slice(&offset_bytes.to_be_bytes());
    h[16..20].copy_from_slice(&len_bytes.to_be_bytes());
    h[20..24].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    let sum = crc(&h[..HEADER_BYTES], payload);
    h[HEADER_BYTES..].copy_from_slice(&sum);
    h
}

/// The CRC32C a record carries: over its header, then its payload.
fn crc(head: &[u8], payload: &[u8]) -> [u8; 4] {
    crc32c::crc32c_append(crc32c::crc32c(head), payload).to_be_bytes()
}

/// Length of the checksum a header announces (None: unknown kind).
fn sum_len(head: &[u8]) -> Option<usize> {
    match head[5] {
        SUM_BLAKE3 => Some(tidemark_common::checksum::CHECKSUM_BYTES),
        SUM_CRC32C => Some(4),
        _ => None,
    }
}

fn sum_matches(head: &[u8], payload: &[u8], sum: &[u8]) -> bool {
    if head[5] == SUM_CRC32C {
        crc(head, payload)[..] == *sum
    } else {
        checksum_parts(&[head, payload])[..] == *sum
    }
}

/// Decodes records from a segment's bytes; returns them and the length of
/// the valid prefix (a torn or damaged tail ends the list).
pub fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some((rec, len)) = decode_one(&bytes[pos..]) {
        out.push(rec);
        pos += len;
    }
    (out, pos)
}

fn decode_one(b: &[u8]) -> Option<(Record, usize)> {
    let (raw, len) = parse_one(b)?;
    Some((
        Record {
            offset_bytes: raw.offset_bytes,
            len_bytes: raw.len_bytes,
            data: raw.data()?,
        },
        len,
    ))
}

/// Whether what follows a segment's last record is the zero padding of its
/// last block ([`super::append`]) rather than a torn or damaged record.
pub fn is_padding(rest: &[u8]) -> bool {
    rest.len() < DIRECT_ALIGN && rest.iter().all(|&b| b == 0)
}

/// A record as stored: where it lands, and its payload still encoded.
pub struct RawRecord<'a> {
    pub offset_bytes: u64,
    pub len_bytes: u32,
    codec: u8,
    payload: &'a [u8],
}

impl RawRecord<'_> {
    /// The range was all zeros (no payload).
    pub fn is_zeros(&self) -> bool {
        self.codec == CODEC_ZERO
    }

    /// `Some(None)` for zeros, `Some(Some(bytes))` for data, None when
    /// the payload does not decode.
    fn data(&self) -> Option<Option<Vec<u8>>> {
        match self.codec {
            CODEC_ZERO => Some(None),
            CODEC_RAW if self.payload.len() == self.len_bytes as usize => {
                Some(Some(self.payload.to_vec()))
            }
            CODEC_ZSTD => {
                let d = zstd::bulk::decompress(self.payload, self.len_bytes as usize).ok()?;
                (d.len() == self.len_bytes as usize).then_some(Some(d))
            }
            _ => None,
        }
    }

    /// The pre-image's bytes (zeros for a zero record), or None when the
    /// payload does not decode.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        Some(
            self.data()?
                .unwrap_or_else(|| vec![0u8; self.len_bytes as usize]),
        )
    }
}

/// Checks one record's header and checksum without decoding its payload;
/// returns it and its stored length.
fn parse_one(b: &[u8]) -> Option<(RawRecord<'_>, usize)> {
    let head = b.get(..HEADER_BYTES)?;
    if head[..4] != MAGIC {
        return None;
    }
    let codec = head[4];
    let offset_bytes = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len_bytes = u32::from_be_bytes(head[16..20].try_into().ok()?);
    let payload_len = u32::from_be_bytes(head[20..24].try_into().ok()?);
    if len_bytes > MAX_RECORD_BYTES || payload_len > MAX_RECORD_BYTES {
        return None;
    }
    let payload_start = HEADER_BYTES + sum_len(head)?;
    let sum = b.get(HEADER_BYTES..payload_start)?;
    let payload = b.get(payload_start..payload_start + payload_len as usize)?;
    if !sum_matches(head, payload, sum) {
        return None;
    }
    Some((
        RawRecord {
            offset_bytes,
            len_bytes,
            codec,
            payload,
        },
        payload_start + payload_len as usize,
    ))
}

/// Calls `f` with every complete record of a segment in the order
/// written, reading the file as it goes rather than whole; stops at a torn
/// or damaged record as [`decode_all`] does.
pub fn scan_segment<E: From<UndoError>>(
    dir: &Path,
    tag: u64,
    mut f: impl FnMut(RawRecord<'_>) -> Result<(), E>,
) -> Result<(), E> {
    use std::io::Read;
    let path = segment_path(dir, tag);
    let read_err = |source| UndoError::Read {
        path: path.clone(),
        source,
    };
    let file = File::open(&path).map_err(read_err)?;
    let mut file = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        buf.extend_from_slice(&[0u8; HEADER_BYTES]);
        match file.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(read_err(e).into()),
        }
        let payload_len = u32::from_be_bytes(buf[20..24].try_into().expect("4 bytes"));
        if buf[..4] != MAGIC || payload_len > MAX_RECORD_BYTES {
            return Ok(());
        }
        let Some(sum_len) = sum_len(&buf) else {
            return Ok(());
        };
        let start = buf.len();
        buf.resize(start + sum_len + payload_len as usize, 0);
        match file.read_exact(&mut buf[start..]) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(read_err(e).into()),
        }
        let Some((record, _)) = parse_one(&buf) else {
            return Ok(());
        };
        f(record)?;
    }
}

/// Folds segment `from` into the older segment `into` of the same disk, so
/// that point `from` can be forgotten (thinning) while every other point
/// rebuilds as before: `into`'s records, then `from`'s, applied newest
/// first, leave the oldest pre-image of each byte, exactly what `into`
/// then `from` did as two segments. A record of `from` whose whole range
/// `into` already holds can never win, and is left out: that is what
/// thinning saves. The result replaces `into` atomically (written beside
/// it, synced, renamed, directory synced); `from` stays for the caller to
/// delete once the point is recorded as thinned. Running this again after
/// a crash is harmless: the copy of `from` in `into` now covers `from`.
/// Returns the bytes of `from` kept.
pub fn fold_into(dir: &Path, into: u64, from: u64) -> Result<u64, UndoError> {
    let read = |tag: u64| -> Result<Vec<u8>, UndoError> {
        let path = segment_path(dir, tag);
        match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(UndoError::Read { path, source }),
        }
    };
    let older = read(into)?;
    let newer = read(from)?;
    let (older_spans, older_valid) = spans(&older);
    let mut covered = super::ranges::Ranges::new();
    for s in &older_spans {
        covered.insert(s.0, s.0 + u64::from(s.1));
    }
    let mut out = older[..older_valid].to_vec();
    let mut kept = 0u64;
    for (offset, len, range) in spans(&newer).0 {
        if !covered.covers(offset, offset + u64::from(len)) {
            kept += range.len() as u64;
            out.extend_from_slice(&newer[range]);
        }
    }
    let path = segment_path(dir, into);
    let tmp = dir.join(format!("{into:020}.undo.fold"));
    let write_err = |source| UndoError::Append {
        path: path.clone(),
        source,
    };
    let mut f = File::create(&tmp).map_err(write_err)?;
    f.write_all(&out).map_err(write_err)?;
    f.sync_all().map_err(write_err)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(write_err)?;
    tidemark_common::durable::sync_dir(dir).map_err(write_err)?;
    Ok(kept)
}

/// `(offset, length, bytes of the record in the segment)` of every
/// complete record, and the valid prefix's length.
fn spans(bytes: &[u8]) -> (Vec<(u64, u32, std::ops::Range<usize>)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while let Some((rec, len)) = parse_one(&bytes[pos..]) {
        out.push((rec.offset_bytes, rec.len_bytes, pos..pos + len));
        pos += len;
    }
    (out, pos)
}

fn encoder_gone(path: PathBuf) -> UndoError {
    UndoError::Append {
        path,
        source: std::io::Error::other("the pre-image encoder thread stopped"),
    }
}

/// Removes one segment (a thinned point's, once folded).
pub fn remove(dir: &Path, tag: u64) -> Result<(), UndoError> {
    let path = segment_path(dir, tag);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(UndoError::Remove { path, source }),
    }
}

/// Reads every complete record of a segment, in the order written.
pub fn read_segment(dir: &Path, tag: u64) -> Result<Vec<Record>, UndoError> {
    let path = segment_path(dir, tag);
    let bytes = std::fs::read(&path).map_err(|source| UndoError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(decode_all(&bytes).0)
}

/// Deletes a disk's segments tagged below `tag` (another session, or a
/// prune racing this one, may have deleted some already); returns the
/// bytes freed. A session appending to a deleted segment cannot happen:
/// it appends under the disk's newest point, which is never below `tag`.
pub fn remove_before(dir: &Path, tag: u64) -> Result<u64, UndoError> {
    let mut freed = 0;
    for t in segments(dir)?.into_iter().filter(|&t| t < tag) {
        let path = segment_path(dir, t);
        freed += std::fs::metadata(&path).map_or(0, |m| m.len());
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(UndoError::Remove { path, source }),
        }
    }
    Ok(freed)
}

/// The appending side, one per disk, held by the receiver's session.
pub struct UndoLog {
    dir: PathBuf,
    current: Option<(u64, DirectAppend)>,
    buf: Vec<u8>,
    unsynced: bool,
    /// Length of the current segment as written, and as known durable
    /// (synced, or found on open).
    written_len: u64,
    durable_len: u64,
    /// A write or sync failed: the segment must be cut back to
    /// `durable_len` before anything else is appended (see [`UndoLog::cut`]).
    needs_cut: bool,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zbuf: Vec<u8>,
    /// Compresses the records of [`UndoLog::append_owned`] on a thread of
    /// its own; started by the first of them.
    encoder: Option<Encoder>,
    /// Tags of the records not yet written, oldest first (in `batch`, at
    /// the encoder, or in `ready`): they are written in the order
    /// appended, whatever thread encoded them.
    in_flight: std::collections::VecDeque<u64>,
    /// Records not yet handed to the encoder, which takes them a batch at
    /// a time (see [`BATCH_RECORDS`]).
    batch: Vec<EncodeJob>,
    /// Batches handed to the encoder and not yet back.
    at_encoder: usize,
    /// Records back from the encoder, not yet written.
    ready: std::collections::VecDeque<Encoded>,
    /// Pre-image buffers back from the encoder, for the next reads.
    spare: Vec<Vec<u8>>,
    /// A sync begun by [`UndoLog::sync_start`] and not yet known done.
    syncing: Option<Syncing>,
    /// Records of that sync were dropped by a failure: it fails.
    sync_lost: bool,
}

/// A sync in progress: first the records that were still encoding when it
/// began are written, then the segment is synced beside the caller.
struct Syncing {
    /// Records at the front of `in_flight` still to be written first.
    records: usize,
    /// Once the segment's sync is started: its length then, durable once
    /// the sync is done.
    issued: Option<u64>,
}

/// Batches handed to the encoder at most: one it encodes while the next
/// waits, and the caller fills a third. With every pre-image at most 4 MiB
/// and a batch handed over once it holds [`BATCH_BYTES`], that bounds the
/// pre-images held at about 15 MiB.
const ENCODER_DEPTH: usize = 2;
/// A batch goes to the encoder once it holds this many records or
/// [`BATCH_BYTES`] of pre-images, or when the caller would wait for any of
/// them. One at a time, the session and the encoder took turns on two busy
/// cores, each hand-over a wake-up (about 3,000 a second in a drain of
/// fio's 4-64 KiB writes; docs/BENCHMARKS.md).
const BATCH_RECORDS: usize = 16;
const BATCH_BYTES: usize = 1 << 20;
/// Spare pre-image buffers kept for the next reads, at most this many
/// bytes of them.
const SPARE_BYTES: usize = 8 << 20;

/// A pre-image to encode: `buf[window]` holds it; no buffer is zeros.
struct EncodeJob {
    offset_bytes: u64,
    len_bytes: u32,
    pre: Option<(Vec<u8>, std::ops::Range<usize>)>,
    /// The record goes here (a buffer of an earlier record, reused).
    out: Vec<u8>,
}

/// Records for the encoder, in order.
struct Batch {
    jobs: Vec<EncodeJob>,
    /// Records are piling up behind these: compress fast.
    hurry: bool,
}

/// A record as the encoder hands it back: its head, and its payload in
/// `out` (compressed) or in `pre`'s window (stored as it is).
struct Encoded {
    head: Head,
    stored: Stored,
    pre: Option<(Vec<u8>, std::ops::Range<usize>)>,
    /// Holds a compressed payload; back to the encoder once written.
    out: Vec<u8>,
}

/// The compression of pre-images, which otherwise takes a third of a busy
/// session thread, on a thread that runs beside it. Batches are encoded
/// one at a time in order, so records come back in the order they were
/// given, a batch at a time.
struct Encoder {
    jobs: Option<std::sync::mpsc::SyncSender<Batch>>,
    done: std::sync::mpsc::Receiver<Vec<Encoded>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Record buffers back from the log, for the next jobs.
    outs: Vec<Vec<u8>>,
}

impl Encoder {
    fn start() -> std::io::Result<Encoder> {
        // Room for every batch the log hands over: neither side ever
        // waits on a full channel while the other waits on it.
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Batch>(ENCODER_DEPTH);
        let (done_tx, done) = std::sync::mpsc::sync_channel::<Vec<Encoded>>(ENCODER_DEPTH);
        let thread = std::thread::Builder::new()
            .name("undo-encode".into())
            .spawn(move || {
                let mut zstd = None;
                let mut fast = None;
                let mut effort = Effort::new(ZSTD_LEVEL);
                while let Ok(Batch { jobs, hurry }) = job_rx.recv() {
                    let mut records = Vec::with_capacity(jobs.len());
                    for mut job in jobs {
                        job.out.clear();
                        let (head, stored) = match &job.pre {
                            Some((buf, window)) => {
                                let level = effort.next_level(hurry);
                                let ctx = if level == Some(ZSTD_LEVEL) {
                                    &mut zstd
                                } else {
                                    &mut fast
                                };
                                let pre = &buf[window.clone()];
                                let (head, stored) =
                                    encode_apart(ctx, level, &mut job.out, job.offset_bytes, pre);
                                let kept = stored.of(&job.out, pre).len();
                                if let Some(level) = level.filter(|_| kept > 0) {
                                    effort.observe(level, pre.len(), kept);
                                }
                                (head, stored)
                            }
                            None => (
                                head(CODEC_ZERO, job.offset_bytes, job.len_bytes, &[]),
                                Stored::Nothing,
                            ),
                        };
                        records.push(Encoded {
                            head,
                            stored,
                            pre: job.pre,
                            out: job.out,
                        });
                    }
                    if done_tx.send(records).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Encoder {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            outs: Vec::new(),
        })
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        self.jobs = None;
        // Unblock a thread waiting to hand back a record.
        while self.done.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl UndoLog {
    pub fn new(dir: PathBuf) -> UndoLog {
        UndoLog {
            dir,
            current: None,
            buf: Vec::new(),
            unsynced: false,
            written_len: 0,
            durable_len: 0,
            needs_cut: false,
            zstd: None,
            zbuf: Vec::new(),
            encoder: None,
            in_flight: std::collections::VecDeque::new(),
            batch: Vec::new(),
            at_encoder: 0,
            ready: std::collections::VecDeque::new(),
            spare: Vec::new(),
            syncing: None,
            sync_lost: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn segment(&mut self, tag: u64) -> Result<&mut DirectAppend, UndoError> {
        if self.current.as_ref().is_none_or(|(t, _)| *t != tag) {
            // Leaving a segment whose tail failed: cut it first. Records
            // still staged for the one we leave are written and synced:
            // a batch's records are all durable before its overwrites,
            // whichever segment they went to.
            self.issued_done(true)?;
            self.cut()?;
            self.sync_current()?;
            std::fs::create_dir_all(&self.dir).map_err(|source| UndoError::Open {
                path: self.dir.clone(),
                source,
            })?;
            let path = segment_path(&self.dir, tag);
            let open_err = |source| UndoError::Open {
                path: path.clone(),
                source,
            };
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(open_err)?;
            // Cut a torn tail left by a crash, or the padding of the last
            // block, before appending after it.
            let bytes = std::fs::read(&path).map_err(open_err)?;
            let (_, valid) = decode_all(&bytes);
            if valid != bytes.len() {
                let rest = &bytes[valid..];
                if !is_padding(rest) {
                    tracing::warn!(
                        "undo segment {} ends in {} damaged bytes; cutting them off",
                        path.display(),
                        rest.len()
                    );
                }
                f.set_len(valid as u64).map_err(open_err)?;
            }
            let f = DirectAppend::new(f, valid as u64).map_err(open_err)?;
            tidemark_common::durable::sync_dir(&self.dir).map_err(open_err)?;
            self.current = Some((tag, f));
            self.written_len = valid as u64;
            self.durable_len = valid as u64;
        }
        Ok(&mut self.current.as_mut().expect("set above").1)
    }

    /// Saves the bytes at `offset_bytes` before they are overwritten.
    pub fn append(&mut self, tag: u64, offset_bytes: u64, pre: &[u8]) -> Result<(), UndoError> {
        self.drain(0)?;
        self.buf.clear();
        encode(
            &mut self.zstd,
            &mut self.zbuf,
            offset_bytes,
            pre,
            &mut self.buf,
        );
        self.write_buf(tag)
    }

    fn write_buf(&mut self, tag: u64) -> Result<(), UndoError> {
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_parts(tag, &[&buf]);
        self.buf = buf;
        r
    }

    /// Appends one record, given in parts, to segment `tag`.
    fn write_parts(&mut self, tag: u64, parts: &[&[u8]]) -> Result<(), UndoError> {
        self.cut()?;
        let path = segment_path(&self.dir, tag);
        let segment = self.segment(tag)?;
        let r = parts.iter().try_for_each(|p| segment.append(p));
        if let Err(source) = r {
            self.failed();
            return Err(UndoError::Append { path, source });
        }
        self.written_len += parts.iter().map(|p| p.len() as u64).sum::<u64>();
        self.unsynced = true;
        Ok(())
    }

    /// After a failed write or sync, the kernel may have dropped some of
    /// the records written since the last good sync (after a failed
    /// writeback Linux marks the pages clean) while a later append would
    /// still become durable behind them, past a gap no reader crosses. So
    /// the segment is cut back to what is known durable first.
    fn failed(&mut self) {
        self.needs_cut = true;
        let _ = self.cut();
    }

    /// Cuts the current segment back to `durable_len` if a failure asked
    /// for it: truncate, sync, and append from there. Until that succeeds
    /// every append and sync fails.
    fn cut(&mut self) -> Result<(), UndoError> {
        if !self.needs_cut {
            return Ok(());
        }
        let Some((tag, f)) = &mut self.current else {
            self.needs_cut = false;
            return Ok(());
        };
        let len = self.durable_len;
        f.cut(len).map_err(|source| UndoError::Append {
            path: segment_path(&self.dir, *tag),
            source,
        })?;
        tracing::warn!(
            "undo segment {}: cut back to its last durable {len} bytes after a write error",
            segment_path(&self.dir, *tag).display()
        );
        self.written_len = len;
        self.unsynced = false;
        self.needs_cut = false;
        // A sync in progress was of what the cut dropped; it failed.
        if self.syncing.take().is_some() {
            self.sync_lost = true;
        }
        Ok(())
    }

    /// Saves that `len_bytes` at `offset_bytes` were zeros (a hole the
    /// image knows of), without a buffer of them.
    pub fn append_zeros(
        &mut self,
        tag: u64,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> Result<(), UndoError> {
        if !self.in_flight.is_empty() {
            // Behind records still encoding: in order, through the encoder.
            return self.submit(tag, offset_bytes, len_bytes, None);
        }
        self.buf.clear();
        encode_zeros(offset_bytes, len_bytes, &mut self.buf);
        self.write_buf(tag)
    }

    /// A buffer for the next pre-image, to fill and give to
    /// [`UndoLog::append_owned`]: one back from the encoder where there is
    /// one (a fresh 4 MiB buffer is fresh pages to fault in).
    pub fn pre_buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// [`UndoLog::append`] of `buf[window]`, compressed on the encoder's
    /// thread while the caller goes on; the record is written, in order,
    /// once encoded, and durable after the next [`UndoLog::sync`]. While
    /// records pile up behind the encoder it compresses at
    /// [`tidemark_common::FAST_ZSTD_LEVEL`] instead.
    pub fn append_owned(
        &mut self,
        tag: u64,
        offset_bytes: u64,
        buf: Vec<u8>,
        window: std::ops::Range<usize>,
    ) -> Result<(), UndoError> {
        let len = window.len() as u32;
        self.submit(tag, offset_bytes, len, Some((buf, window)))
    }

    fn submit(
        &mut self,
        tag: u64,
        offset_bytes: u64,
        len_bytes: u32,
        pre: Option<(Vec<u8>, std::ops::Range<usize>)>,
    ) -> Result<(), UndoError> {
        if self.encoder.is_none() {
            let e = Encoder::start().map_err(|source| UndoError::Append {
                path: segment_path(&self.dir, tag),
                source,
            })?;
            self.encoder = Some(e);
        }
        let encoder = self.encoder.as_mut().expect("started above");
        self.batch.push(EncodeJob {
            offset_bytes,
            len_bytes,
            pre,
            out: encoder.outs.pop().unwrap_or_default(),
        });
        self.in_flight.push_back(tag);
        let pre_bytes: usize = self
            .batch
            .iter()
            .filter_map(|j| j.pre.as_ref())
            .map(|(_, w)| w.len())
            .sum();
        if self.batch.len() >= BATCH_RECORDS || pre_bytes >= BATCH_BYTES {
            self.hand_over()?;
        }
        self.write_ready()
    }

    /// Hands the records appended since the last hand-over to the encoder
    /// now rather than once the batch is full: for a caller about to wait
    /// for something else (more input), so that the encoder is not left
    /// idle meanwhile.
    pub fn hand_over(&mut self) -> Result<(), UndoError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // Room for it: write what is encoded, waiting if all are busy.
        while self.at_encoder >= ENCODER_DEPTH {
            self.receive(true)?;
        }
        // A batch still ahead of this one: the encoder is what the session
        // waits for, so it trades some journal bytes for speed until it
        // catches up (FAST_ZSTD_LEVEL).
        let batch = Batch {
            jobs: std::mem::take(&mut self.batch),
            hurry: self.at_encoder > 0,
        };
        let sent = self
            .encoder
            .as_ref()
            .and_then(|e| e.jobs.as_ref())
            .map(|j| j.send(batch));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.gone());
        }
        self.at_encoder += 1;
        Ok(())
    }

    /// Takes the oldest batch back from the encoder into `ready`; false if
    /// it is not back and `wait` is false.
    fn receive(&mut self, wait: bool) -> Result<bool, UndoError> {
        let Some(encoder) = self.encoder.as_mut() else {
            return Err(self.gone());
        };
        let got = if wait {
            encoder.done.recv().ok()
        } else {
            match encoder.done.try_recv() {
                Ok(e) => Some(e),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(false),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            }
        };
        let Some(records) = got else {
            return Err(self.gone());
        };
        self.at_encoder -= 1;
        self.ready.extend(records);
        Ok(true)
    }

    /// The error of an encoder that stopped, naming the oldest record's
    /// segment.
    fn gone(&self) -> UndoError {
        let tag = self.in_flight.front().copied().unwrap_or_default();
        encoder_gone(segment_path(&self.dir, tag))
    }

    /// Writes encoded records until at most `keep` are still encoding.
    fn drain(&mut self, keep: usize) -> Result<(), UndoError> {
        while self.in_flight.len() > keep {
            self.collect_one(true)?;
        }
        Ok(())
    }

    /// Writes the records already encoded, without waiting.
    fn write_ready(&mut self) -> Result<(), UndoError> {
        while self.collect_one(false)? {}
        Ok(())
    }

    /// Writes the oldest record once encoded; false if it is not and
    /// `wait` is false. Waiting for it, hands over the batch that holds it.
    fn collect_one(&mut self, wait: bool) -> Result<bool, UndoError> {
        let Some(&tag) = self.in_flight.front() else {
            return Ok(false);
        };
        if self.ready.is_empty() {
            if self.at_encoder == 0 {
                // It is in the batch not yet handed over.
                if !wait {
                    return Ok(false);
                }
                self.hand_over()?;
            }
            if !self.receive(wait)? {
                return Ok(false);
            }
        }
        let Some(done) = self.ready.pop_front() else {
            return Err(self.gone());
        };
        self.in_flight.pop_front();
        if let Some(s) = self.syncing.as_mut() {
            s.records = s.records.saturating_sub(1);
        }
        let Encoded {
            head,
            stored,
            pre,
            out,
        } = done;
        let raw = pre.as_ref().map_or(&[][..], |(b, w)| &b[w.clone()]);
        let r = self.write_parts(tag, &[&head, stored.of(&out, raw)]);
        if let Some((b, _)) = pre {
            let kept: usize = self.spare.iter().map(Vec::capacity).sum();
            if kept + b.capacity() <= SPARE_BYTES {
                self.spare.push(b);
            }
        }
        if let Some(e) = self.encoder.as_mut() {
            e.outs.push(out);
        }
        if let Err(e) = r {
            // The batch fails; what is still encoding will not be written.
            self.encoder = None;
            self.in_flight.clear();
            self.batch.clear();
            self.at_encoder = 0;
            self.ready.clear();
            return Err(e);
        }
        Ok(true)
    }

    /// Makes every appended record durable; call before the overwrites.
    pub fn sync(&mut self) -> Result<(), UndoError> {
        self.sync_start()?;
        self.sync_done(true).map(|_| ())
    }

    /// Begins making every record appended so far durable, and returns
    /// without waiting for the records still encoding or for the disk:
    /// [`UndoLog::sync_done`] says when they are. Appends may go on
    /// meanwhile; they are not covered. A sync still in progress is
    /// finished first.
    pub fn sync_start(&mut self) -> Result<(), UndoError> {
        self.sync_done(true)?;
        self.syncing = Some(Syncing {
            records: self.in_flight.len(),
            issued: None,
        });
        self.sync_done(false).map(|_| ())
    }

    /// True once the records appended before [`UndoLog::sync_start`] are
    /// durable (or none was started); with `wait`, waits for them.
    pub fn sync_done(&mut self, wait: bool) -> Result<bool, UndoError> {
        if std::mem::take(&mut self.sync_lost) {
            return Err(self.lost());
        }
        let Some(s) = &self.syncing else {
            return Ok(true);
        };
        if s.issued.is_none() {
            while self.syncing.as_ref().is_some_and(|s| s.records > 0) {
                if self.in_flight.is_empty() {
                    // The encoder failed and its records were dropped.
                    self.syncing = None;
                    return Err(self.lost());
                }
                self.hand_over_for_sync()?;
                if !self.collect_one(wait)? {
                    return Ok(false);
                }
            }
            self.cut()?;
            if !self.unsynced {
                self.syncing = None;
                return Ok(true);
            }
            if let Some((tag, f)) = &mut self.current {
                if let Err(source) = f.sync_start() {
                    let path = segment_path(&self.dir, *tag);
                    self.failed();
                    return Err(UndoError::Append { path, source });
                }
            }
            self.unsynced = false;
            if let Some(s) = self.syncing.as_mut() {
                s.issued = Some(self.written_len);
            }
        }
        self.issued_done(wait)
    }

    /// Hands over the batch, if there is room for it at the encoder, when
    /// the sync in progress covers records in it: they are not held back
    /// for the batch to fill.
    fn hand_over_for_sync(&mut self) -> Result<(), UndoError> {
        let covered = self.syncing.as_ref().map_or(0, |s| s.records);
        let before_batch = self.in_flight.len() - self.batch.len();
        if covered > before_batch && self.at_encoder < ENCODER_DEPTH {
            self.hand_over()?;
        }
        Ok(())
    }

    /// The error of a sync whose records were dropped.
    fn lost(&self) -> UndoError {
        UndoError::Append {
            path: self.dir.clone(),
            source: std::io::Error::other("records to be synced were dropped after a write error"),
        }
    }

    /// True once a segment sync started by [`UndoLog::sync_done`] is done
    /// (or none is in progress), which makes its bytes the durable ones.
    fn issued_done(&mut self, wait: bool) -> Result<bool, UndoError> {
        let Some(len) = self.syncing.as_ref().and_then(|s| s.issued) else {
            return Ok(self.syncing.is_none());
        };
        if let Some((tag, f)) = &mut self.current {
            match f.synced(wait) {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(source) => {
                    let path = segment_path(&self.dir, *tag);
                    self.failed();
                    return Err(UndoError::Append { path, source });
                }
            }
        }
        self.durable_len = len;
        self.syncing = None;
        Ok(true)
    }

    /// Makes what was written to the current segment durable (records
    /// still encoding are not waited for).
    fn sync_current(&mut self) -> Result<(), UndoError> {
        if !self.unsynced {
            return Ok(());
        }
        if let Some((tag, f)) = &mut self.current {
            if let Err(source) = f.sync() {
                let path = segment_path(&self.dir, *tag);
                self.failed();
                return Err(UndoError::Append { path, source });
            }
        }
        self.durable_len = self.written_len;
        self.unsynced = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The disk as of point `p`: `live` with the segments tagged >= p
    /// applied newest first.
    fn rebuild(dir: &Path, live: &[u8], p: u64) -> Vec<u8> {
        let mut disk = live.to_vec();
        for t in segments(dir).expect("ls").into_iter().rev() {
            if t < p {
                break;
            }
            for r in read_segment(dir, t).expect("read").into_iter().rev() {
                let at = r.offset_bytes as usize;
                let n = r.len_bytes as usize;
                match r.data {
                    Some(d) => disk[at..at + n].copy_from_slice(&d),
                    None => disk[at..at + n].fill(0),
                }
            }
        }
        disk
    }

    /// [`UndoLog::append_owned`] of a copy of `pre`, in a buffer of the log's.
    fn append_copy(log: &mut UndoLog, tag: u64, at: u64, pre: &[u8]) {
        let mut buf = log.pre_buffer();
        let w = crate::image::storage::aligned_range(&mut buf, pre.len());
        buf[w.clone()].copy_from_slice(pre);
        log.append_owned(tag, at, buf, w).expect("append owned");
    }

    /// Polls [`UndoLog::sync_done`] without waiting until the sync is done.
    fn poll_until_synced(log: &mut UndoLog) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !log.sync_done(false).expect("sync") {
            assert!(
                std::time::Instant::now() < deadline,
                "the sync never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A record written as head and payload apart is byte for byte the
    /// record [`encode_at`] makes whole, for each place its payload is.
    #[test]
    fn a_record_in_parts_is_the_whole_record() {
        let text: Vec<u8> = b"pre-image ".iter().copied().cycle().take(8192).collect();
        let noise = noise(&mut 0x9e37_79b9_7f4a_7c15, 4096);
        let zeros = vec![0u8; 4096];
        let mut seen = Vec::new();
        for (pre, level) in [
            (&text, Some(1)),
            (&text, None),
            (&noise, Some(1)),
            (&zeros, Some(1)),
        ] {
            let (mut z1, mut z2) = (None, None);
            let (mut zbuf, mut whole, mut apart) = (Vec::new(), Vec::new(), Vec::new());
            encode_at(&mut z1, level, &mut zbuf, 12288, pre, &mut whole);
            let (head, stored) = encode_apart(&mut z2, level, &mut apart, 12288, pre);
            let mut parts = head.to_vec();
            parts.extend_from_slice(stored.of(&apart, pre));
            assert_eq!(parts, whole, "{stored:?}");
            let (records, used) = decode_all(&parts);
            assert_eq!((records.len(), used), (1, parts.len()));
            seen.push(stored);
        }
        assert_eq!(
            seen,
            [
                Stored::Compressed,
                Stored::Raw,
                Stored::Raw,
                Stored::Nothing
            ]
        );
    }

    #[test]
    fn a_pre_image_stored_uncompressed_reads_back_and_zeros_stay_a_header() {
        let pre: Vec<u8> = (0..8192u32).map(|k| (k / 64) as u8).collect();
        let (mut zstd, mut zbuf, mut out) = (None, Vec::new(), Vec::new());
        let stored = encode_at(&mut zstd, None, &mut zbuf, 4096, &pre, &mut out);
        assert_eq!(stored, pre.len(), "kept as it is, though it compresses");
        assert!(zstd.is_none(), "no context made for it");
        let zeros = vec![0u8; 4096];
        assert_eq!(
            encode_at(&mut zstd, None, &mut zbuf, 0, &zeros, &mut out),
            0
        );
        let (records, used) = decode_all(&out);
        assert_eq!(used, out.len());
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[0].offset_bytes, records[0].len_bytes),
            (4096, 8192)
        );
        assert_eq!(records[0].data.as_deref(), Some(&pre[..]));
        assert_eq!(
            (records[1].offset_bytes, records[1].data.as_ref()),
            (0, None)
        );
    }

    #[test]
    fn records_encoded_beside_the_caller_are_written_in_the_order_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut inline = UndoLog::new(a.clone());
        let mut owned = UndoLog::new(b.clone());
        let mut x = 11u64;
        for i in 0..40u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            // Segments change mid-stream, zeros come between data records.
            let tag = 1 + i / 15;
            let at = (x >> 30) % 1000 * 512;
            let n = 512 * (1 + (x >> 20) as usize % 300);
            if i % 4 == 3 {
                inline.append_zeros(tag, at, n as u32).expect("zeros");
                owned.append_zeros(tag, at, n as u32).expect("zeros");
                continue;
            }
            // Half compressible, half not.
            let pre: Vec<u8> = (0..n)
                .map(|k| {
                    if i % 2 == 0 {
                        (k / 64) as u8
                    } else {
                        (x >> (k % 50)) as u8 ^ k as u8
                    }
                })
                .collect();
            inline.append(tag, at, &pre).expect("append");
            append_copy(&mut owned, tag, at, &pre);
        }
        inline.sync().expect("sync");
        owned.sync().expect("sync");
        let tags = segments(&a).expect("ls");
        assert_eq!(tags, vec![1, 2, 3]);
        assert_eq!(segments(&b).expect("ls"), tags);
        for t in tags {
            // The same records in the same order; the bytes may differ,
            // since a busy encoder compresses at its fast level.
            let want = read_segment(&a, t).expect("read");
            let got = read_segment(&b, t).expect("read");
            assert!(!want.is_empty());
            assert_eq!(got.len(), want.len(), "segment {t}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "segment {t}, record {i} differs");
            }
        }
    }

    #[test]
    fn a_sync_begun_beside_the_caller_covers_what_came_before_and_later_records_follow() {
        // On the project's ext4, which takes the journal's direct writes.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let d = dir.path().join("disk");
        let mut log = UndoLog::new(d.clone());
        let mut want = Vec::new();
        let mut x = 5u64;
        let mut append = |log: &mut UndoLog, want: &mut Vec<Record>, i: u64| {
            // 200 KiB of barely compressible bytes: the staged records
            // cross the journal's 1 MiB writes.
            let n = 200 << 10;
            let pre: Vec<u8> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (x >> 40) as u8
                })
                .collect();
            append_copy(log, 1, i * n as u64, &pre);
            want.push(Record {
                offset_bytes: i * n as u64,
                len_bytes: n as u32,
                data: Some(pre),
            });
        };
        for i in 0..12 {
            append(&mut log, &mut want, i);
        }
        log.sync_start().expect("sync started");
        for i in 12..24 {
            append(&mut log, &mut want, i);
        }
        poll_until_synced(&mut log);
        let got = read_segment(&d, 1).expect("read");
        assert!(got.len() >= 12, "the records before the sync are all in");
        assert_eq!(got[..], want[..got.len()], "in order, as appended");
        log.sync().expect("sync");
        assert_eq!(read_segment(&d, 1).expect("read"), want);
        assert_eq!(log.durable_len, log.written_len);
    }

    /// Records go to the encoder a batch at a time; a sync of a batch not
    /// yet full hands it over itself, and polling alone finishes it.
    #[test]
    fn a_sync_of_a_batch_not_yet_full_finishes_without_more_appends() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let d = dir.path().join("disk");
        let mut log = UndoLog::new(d.clone());
        let mut want = Vec::new();
        for i in 0..3u64 {
            let pre: Vec<u8> = (0..4096u32).map(|k| (k as u64 * (i + 3)) as u8).collect();
            append_copy(&mut log, 1, i * 4096, &pre);
            want.push(Record {
                offset_bytes: i * 4096,
                len_bytes: 4096,
                data: Some(pre),
            });
        }
        assert_eq!(log.batch.len(), 3, "held back for a fuller batch");
        log.sync_start().expect("sync started");
        poll_until_synced(&mut log);
        assert_eq!(read_segment(&d, 1).expect("read"), want);
        assert_eq!(log.durable_len, log.written_len);
        // And one held back when the caller goes idle is handed over.
        append_copy(&mut log, 1, 1 << 20, &[9; 4096]);
        log.hand_over().expect("handed over");
        assert!(log.batch.is_empty());
        log.sync().expect("sync");
        assert_eq!(read_segment(&d, 1).expect("read").len(), 4);
    }

    #[test]
    fn folding_a_segment_forgets_its_point_and_keeps_every_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("disk");
        let mut log = UndoLog::new(d.clone());
        // Points 1..=4 with writes between them, overlapping on purpose.
        let mut disk = vec![0u8; 64 << 10];
        let mut states = vec![disk.clone()];
        let mut x = 7u64;
        for tag in 1..=4u64 {
            for _ in 0..12 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let at = (x >> 33) as usize % 60 * 1024;
                let n = 1024 * (1 + (x >> 20) as usize % 4);
                let n = n.min(disk.len() - at);
                log.append(tag, at as u64, &disk[at..at + n])
                    .expect("append");
                let v = (x >> 8) as u8;
                disk[at..at + n].fill(if tag == 3 { 0 } else { v });
            }
            states.push(disk.clone());
        }
        log.sync().expect("sync");
        // Writes tagged t come after point t: states[p - 1] is the disk at
        // point p.
        for p in 1..=4u64 {
            assert_eq!(rebuild(&d, &disk, p), states[p as usize - 1], "point {p}");
        }
        let before = std::fs::metadata(segment_path(&d, 2)).expect("2").len()
            + std::fs::metadata(segment_path(&d, 3)).expect("3").len();
        fold_into(&d, 2, 3).expect("fold");
        // Crash before the removal: folding again changes nothing.
        let once = std::fs::read(segment_path(&d, 2)).expect("read");
        fold_into(&d, 2, 3).expect("fold again");
        assert_eq!(std::fs::read(segment_path(&d, 2)).expect("read"), once);
        remove(&d, 3).expect("remove");
        assert!(once.len() as u64 <= before);
        for p in [1u64, 2, 4] {
            assert_eq!(rebuild(&d, &disk, p), states[p as usize - 1], "point {p}");
        }
    }

    #[test]
    fn records_round_trip_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("disk");
        let mut log = UndoLog::new(d.clone());
        log.append(3, 4096, &[7u8; 4096]).expect("append");
        log.append(3, 0, &[0u8; 512]).expect("append");
        let random: Vec<u8> = (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect();
        log.append(5, 100, &random).expect("append");
        log.sync().expect("sync");
        assert_eq!(segments(&d).expect("list"), vec![3, 5]);
        let r3 = read_segment(&d, 3).expect("read");
        assert_eq!(r3.len(), 2);
        assert_eq!(r3[0].data.as_deref(), Some(&[7u8; 4096][..]));
        assert_eq!(r3[1].data, None);
        assert_eq!(
            read_segment(&d, 5).expect("read")[0].data.as_deref(),
            Some(&random[..])
        );

        // A torn append is ignored by readers and cut by the next writer.
        let path = segment_path(&d, 5);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"TDUR\x01garbage").expect("torn");
        drop(f);
        assert_eq!(read_segment(&d, 5).expect("read").len(), 1);
        let mut log = UndoLog::new(d.clone());
        log.append(5, 0, &[1u8; 16])
            .expect("append after torn tail");
        log.sync().expect("sync");
        assert_eq!(read_segment(&d, 5).expect("read").len(), 2);

        assert!(remove_before(&d, 5).expect("prune") > 0);
        assert_eq!(segments(&d).expect("list"), vec![5]);
    }

    /// A record as segments held it before CRC32C: BLAKE3 over the
    /// header and the payload, checksum byte 0. Built by hand from the
    /// documented layout, not by the writer.
    fn blake3_record(codec: u8, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut head = b"TDUR".to_vec();
        head.extend_from_slice(&[codec, 0, 0, 0]);
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        let mut h = blake3::Hasher::new();
        h.update(&head);
        h.update(payload);
        let mut out = head;
        out.extend_from_slice(h.finalize().as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn segments_of_blake3_records_are_still_read_and_appended_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("disk");
        std::fs::create_dir_all(&d).expect("mkdir");
        let old: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        let mut bytes = blake3_record(CODEC_RAW, 8192, 4096, &old);
        bytes.extend(blake3_record(CODEC_ZERO, 0, 512, &[]));
        std::fs::write(segment_path(&d, 4), &bytes).expect("write");
        let mut log = UndoLog::new(d.clone());
        log.append(4, 100, &[9u8; 300]).expect("append");
        log.sync().expect("sync");
        let got = read_segment(&d, 4).expect("read");
        let want = [
            (8192, 4096, Some(old.clone())),
            (0, 512, None),
            (100, 300, Some(vec![9u8; 300])),
        ];
        assert_eq!(got.len(), want.len());
        for (r, (at, len, data)) in got.iter().zip(want) {
            assert_eq!((r.offset_bytes, r.len_bytes, &r.data), (at, len, &data));
        }
        let mut scanned = Vec::new();
        scan_segment::<UndoError>(&d, 4, |r| {
            scanned.push((r.offset_bytes, r.bytes().expect("decodes")));
            Ok(())
        })
        .expect("scan");
        assert_eq!(scanned.len(), 3);
        assert_eq!(scanned[0], (8192, old));
    }

    #[test]
    fn a_changed_checksum_kind_or_checksum_is_a_damaged_record() {
        let mut one = Vec::new();
        encode_parts(CODEC_RAW, 0, 8, &[5u8; 8], &mut one);
        assert_eq!(decode_all(&one).0.len(), 1);
        for (at, flip) in [
            (5, 1u8),
            (5, 2),
            (6, 1),
            (HEADER_BYTES, 0x80),
            (one.len() - 1, 1),
        ] {
            let mut bad = one.clone();
            bad[at] ^= flip;
            assert_eq!(decode_all(&bad), (Vec::new(), 0), "byte {at} ^ {flip}");
        }
        let mut old = blake3_record(CODEC_RAW, 0, 8, &[5u8; 8]);
        old[5] = SUM_CRC32C;
        assert_eq!(decode_all(&old), (Vec::new(), 0));
    }

    #[test]
    fn garbage_decodes_to_nothing() {
        let mut x = 0x9e3779b97f4a7c15u64;
        for len in [0usize, 10, 60, 61, 100, 4096] {
            assert_eq!(decode_all(&noise(&mut x, len)), (Vec::new(), 0));
        }
    }

    /// `len` bytes of xorshift64 from the state `x`, which goes on.
    fn noise(x: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x as u8
            })
            .collect()
    }
}
