//! The messages of protocol versions 1 and 2. Type codes and field layouts
//! are listed in `docs/PROTOCOL.md`; all integers are big-endian.

use std::borrow::Cow;

use super::codec::{DecodeError, Reader, Writer};
use crate::checksum::{checksum, to_hex, Checksum, CHECKSUM_BYTES};

/// Largest extent (uncompressed bytes) one frame carries. Large enough to
/// amortise per-frame costs, small enough that a receiver holding a few in
/// flight per connection stays in tens of MiB.
pub const MAX_EXTENT_BYTES: u32 = 4 << 20;
/// Longest agent name, disk id, point name or error text, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest error message text, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;
/// Largest range one hash request may cover.
pub const MAX_HASH_RANGE_BYTES: u32 = 16 << 20;
/// Smallest and largest hash block: a logical block, a large grain.
pub const MIN_HASH_BLOCK_BYTES: u32 = 512;
pub const MAX_HASH_BLOCK_BYTES: u32 = 1 << 20;
/// Most hashes one message carries: a whole range in the smallest blocks.
pub const MAX_HASHES: u32 = MAX_HASH_RANGE_BYTES / MIN_HASH_BLOCK_BYTES;

/// How an extent's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// The payload is the data itself.
    None = 0,
    /// The payload is one zstd frame that decodes to exactly `len_bytes`.
    Zstd = 1,
}

/// What a recovery point promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum PointKind {
    /// The disks as they were at one instant (filesystems frozen, or
    /// nothing written while they were read).
    CrashConsistent = 1,
    /// Crash-consistent, with the applications' pre/post scripts run around it.
    AppConsistent = 2,
    /// Convergence only: the data was written while it was read, so the
    /// image may not be a state the disk was ever in. Never offered for recovery.
    SyncMarker = 3,
}

impl PointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::CrashConsistent => "crash-consistent",
            PointKind::AppConsistent => "app-consistent",
            PointKind::SyncMarker => "sync-marker",
        }
    }
}

/// Why the receiver refused something. Stable numbers: scripts match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame or message did not follow the protocol.
    Protocol = 1,
    /// The certificate's name does not match, or it may not touch this disk.
    Unauthorized = 2,
    /// An extent named a disk handle this session never registered.
    UnknownDisk = 3,
    /// The payload's checksum did not match: nothing was written.
    ChecksumMismatch = 4,
    /// The extent lies beyond the disk's registered size.
    OutOfRange = 5,
    /// The disk is larger than its existing image.
    DiskTooLarge = 6,
    /// The receiver could not store the data (disk full, I/O error); nothing
    /// from this message on was acknowledged.
    Storage = 7,
    /// A limit was reached (number of disks).
    Limit = 8,
    /// Anything else on the receiver's side.
    Internal = 9,
    /// The disk is being replicated by another connection right now.
    Busy = 10,
    /// The disk was failed over at the receiver (rolled back or committed):
    /// replication is refused until the operator allows it again.
    FailedOver = 11,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Unauthorized,
            3 => ErrorCode::UnknownDisk,
            4 => ErrorCode::ChecksumMismatch,
            5 => ErrorCode::OutOfRange,
            6 => ErrorCode::DiskTooLarge,
            7 => ErrorCode::Storage,
            8 => ErrorCode::Limit,
            9 => ErrorCode::Internal,
            10 => ErrorCode::Busy,
            11 => ErrorCode::FailedOver,
            _ => {
                return Err(DecodeError::BadValue {
                    what: "error code",
                    value: u64::from(v),
                })
            }
        })
    }
}

/// A run of a disk's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Position in the session's stream of data-bearing messages.
    pub seq: u64,
    /// Handle the receiver gave the disk at registration.
    pub disk: u32,
    pub offset_bytes: u64,
    /// Uncompressed length, 1..=[`MAX_EXTENT_BYTES`].
    pub len_bytes: u32,
    pub codec: Codec,
    /// Of the uncompressed data.
    pub checksum: ExtentSum,
    pub payload: Vec<u8>,
}

/// An extent frame's fields up to its payload: decoded apart from the
/// payload, so a frame reader can take the payload off the connection
/// straight into the buffer the extent keeps (see
/// [`super::frame::read_message`]).
pub(crate) struct ExtentHead {
    seq: u64,
    disk: u32,
    offset_bytes: u64,
    len_bytes: u32,
    codec: Codec,
    checksum: ExtentSum,
}

impl ExtentHead {
    /// The head's length with its type byte, if `t` is an extent's type.
    pub(crate) fn bytes(t: u8) -> Option<usize> {
        let sum = match t {
            code::EXTENT => CHECKSUM_BYTES,
            code::EXTENT_CRC32C => 4,
            _ => return None,
        };
        Some(1 + 8 + 4 + 8 + 4 + 1 + sum)
    }

    /// The fields after the type byte `t`, checked.
    pub(crate) fn decode(t: u8, r: &mut Reader<'_>) -> Result<ExtentHead, DecodeError> {
        let seq = r.u64("seq")?;
        let disk = r.u32("disk handle")?;
        let offset_bytes = r.u64("extent offset")?;
        let len_bytes = r.u32("extent length")?;
        if len_bytes == 0 || len_bytes > MAX_EXTENT_BYTES {
            return Err(DecodeError::BadValue {
                what: "extent length",
                value: u64::from(len_bytes),
            });
        }
        let codec = match r.u8("codec")? {
            0 => Codec::None,
            1 => Codec::Zstd,
            v => {
                return Err(DecodeError::BadValue {
                    what: "codec",
                    value: u64::from(v),
                })
            }
        };
        let checksum = if t == code::EXTENT {
            ExtentSum::Blake3(r.checksum("checksum")?)
        } else {
            ExtentSum::Crc32c(r.u32("checksum")?)
        };
        offset_bytes
            .checked_add(u64::from(len_bytes))
            .ok_or(DecodeError::BadValue {
                what: "extent offset",
                value: offset_bytes,
            })?;
        Ok(ExtentHead {
            seq,
            disk,
            offset_bytes,
            len_bytes,
            codec,
            checksum,
        })
    }

    /// Whether a payload of `len` bytes fits the head: checked before the
    /// payload is read.
    pub(crate) fn check_payload(&self, len: usize) -> Result<(), DecodeError> {
        let ok = match self.codec {
            Codec::None => len == self.len_bytes as usize,
            Codec::Zstd => len > 0 && len < self.len_bytes as usize,
        };
        if ok {
            Ok(())
        } else {
            Err(DecodeError::BadValue {
                what: "payload length",
                value: len as u64,
            })
        }
    }

    /// The extent, with a payload [`ExtentHead::check_payload`] passed.
    pub(crate) fn with_payload(self, payload: Vec<u8>) -> Extent {
        Extent {
            seq: self.seq,
            disk: self.disk,
            offset_bytes: self.offset_bytes,
            len_bytes: self.len_bytes,
            codec: self.codec,
            checksum: self.checksum,
            payload,
        }
    }
}

/// Which checksum an extent carries. Version 1 of the protocol has only
/// BLAKE3; version 2 adds CRC32C, five to seven times faster here (4 KiB
/// to 256 KiB: 19–22 against 2.7–4.2 GB/s on one core), which was 6 % of
/// both cores in a catch-up drain. What the checksum guards against is
/// accidental corruption between the agent's read and the receiver's write
/// (a compressor or memory fault): TLS already authenticates every byte in
/// between, and CRC32C detects any burst up to 32 bits and misses other
/// damage once in 2^32, as it does for the journal's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumKind {
    Blake3,
    Crc32c,
}

impl SumKind {
    /// What extents carry on a connection of protocol `version`.
    pub fn for_version(version: u16) -> SumKind {
        if version >= 2 {
            SumKind::Crc32c
        } else {
            SumKind::Blake3
        }
    }
}

/// An extent's checksum, of either [`SumKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentSum {
    Blake3(Checksum),
    Crc32c(u32),
}

impl ExtentSum {
    /// The `kind` checksum of `data`.
    pub fn of(kind: SumKind, data: &[u8]) -> ExtentSum {
        match kind {
            SumKind::Blake3 => ExtentSum::Blake3(checksum(data)),
            SumKind::Crc32c => ExtentSum::Crc32c(crc32c::crc32c(data)),
        }
    }

    pub fn kind(&self) -> SumKind {
        match self {
            ExtentSum::Blake3(_) => SumKind::Blake3,
            ExtentSum::Crc32c(_) => SumKind::Crc32c,
        }
    }

    fn to_hex(self) -> String {
        match self {
            ExtentSum::Blake3(sum) => to_hex(&sum),
            ExtentSum::Crc32c(sum) => format!("{sum:08x}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("zstd payload does not decode to exactly {expected} bytes")]
    BadZstd { expected: u32 },
    #[error("checksum mismatch: extent says {expected}, data hashes to {actual}")]
    ChecksumMismatch { expected: String, actual: String },
}

impl Extent {
    /// Builds an extent from data with a `sum` checksum, compressing with
    /// `compressor` when that makes it smaller.
    pub fn pack(
        seq: u64,
        disk: u32,
        offset_bytes: u64,
        data: &[u8],
        sum: SumKind,
        compressor: Option<&mut zstd::bulk::Compressor<'_>>,
    ) -> Extent {
        debug_assert!(!data.is_empty() && data.len() <= MAX_EXTENT_BYTES as usize);
        let sum = ExtentSum::of(sum, data);
        let compressed = compressor
            .and_then(|c| c.compress(data).ok())
            .filter(|z| z.len() < data.len());
        let (codec, payload) = match compressed {
            // Sized for the worst case (a little over `data`): senders keep
            // payloads until acknowledged, so return the unused part.
            Some(mut z) => {
                z.shrink_to_fit();
                (Codec::Zstd, z)
            }
            None => (Codec::None, data.to_vec()),
        };
        Extent {
            seq,
            disk,
            offset_bytes,
            len_bytes: data.len() as u32,
            codec,
            checksum: sum,
            payload,
        }
    }

    /// Appends this extent's frame as sent with `seq` and `disk`, all but
    /// the payload, which is to follow it on the wire: a sender keeps one
    /// copy of the payload (the one it may hold for a resend) instead of a
    /// second inside the frame.
    pub fn encode_frame_head(&self, seq: u64, disk: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        self.encode_fields(seq, disk, &mut Writer::new(out));
        let len = (out.len() - start - 4 + self.payload.len()) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Type byte and fields up to the payload. The checksum's kind sets
    /// the type, so a frame decodes without knowing the version.
    fn encode_fields(&self, seq: u64, disk: u32, w: &mut Writer<'_>) {
        w.u8(match self.checksum {
            ExtentSum::Blake3(_) => code::EXTENT,
            ExtentSum::Crc32c(_) => code::EXTENT_CRC32C,
        });
        w.u64(seq);
        w.u32(disk);
        w.u64(self.offset_bytes);
        w.u32(self.len_bytes);
        w.u8(self.codec as u8);
        match &self.checksum {
            ExtentSum::Blake3(sum) => w.bytes(sum),
            ExtentSum::Crc32c(sum) => w.u32(*sum),
        }
    }

    /// The same extent with a `kind` checksum: for a piece packed for one
    /// connection and sent on the next, which speaks an older version.
    pub fn with_sum(
        &self,
        kind: SumKind,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
    ) -> Result<Extent, PayloadError> {
        let mut scratch = Vec::new();
        let checksum = ExtentSum::of(kind, self.unpack(decompressor, &mut scratch)?);
        Ok(Extent {
            checksum,
            ..self.clone()
        })
    }

    /// The uncompressed data, verified against the checksum. Decompression
    /// is bounded by `len_bytes`, so a decompression bomb fails here.
    pub fn unpack<'a>(
        &'a self,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], PayloadError> {
        let data: Cow<'a, [u8]> = match self.codec {
            Codec::None => Cow::Borrowed(&self.payload),
            Codec::Zstd => {
                scratch.clear();
                scratch.reserve(self.len_bytes as usize);
                let n = decompressor
                    .decompress_to_buffer(&self.payload, scratch)
                    .map_err(|_| PayloadError::BadZstd {
                        expected: self.len_bytes,
                    })?;
                if n != self.len_bytes as usize {
                    return Err(PayloadError::BadZstd {
                        expected: self.len_bytes,
                    });
                }
                Cow::Borrowed(&scratch[..])
            }
        };
        let actual = ExtentSum::of(self.checksum.kind(), &data);
        if actual != self.checksum {
            return Err(PayloadError::ChecksumMismatch {
                expected: self.checksum.to_hex(),
                actual: actual.to_hex(),
            });
        }
        match data {
            Cow::Borrowed(d) => Ok(d),
            Cow::Owned(_) => unreachable!("only borrowed data is produced above"),
        }
    }
}

fn check_hash_block(block_bytes: u32) -> Result<(), DecodeError> {
    if !(MIN_HASH_BLOCK_BYTES..=MAX_HASH_BLOCK_BYTES).contains(&block_bytes)
        || !block_bytes.is_power_of_two()
    {
        return Err(DecodeError::BadValue {
            what: "hash block size",
            value: u64::from(block_bytes),
        });
    }
    Ok(())
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Agent → receiver, first message.
    Hello {
        agent_name: String,
        software_version: String,
    },
    /// Receiver → agent: hello accepted.
    Welcome {
        receiver_name: String,
        session_id: u64,
    },
    /// Agent → receiver: a disk this session will send data for.
    RegisterDisk {
        disk_id: String,
        size_bytes: u64,
        logical_block_bytes: u32,
    },
    /// Receiver → agent: registration accepted; `handle` names the disk in
    /// later messages. `image_existed` is false when a new image was created
    /// (alternate-location recovery: everything must travel).
    DiskRegistered {
        disk_id: String,
        handle: u32,
        image_existed: bool,
    },
    Extent(Extent),
    /// A run of zeros: no payload travels.
    Zero {
        seq: u64,
        disk: u32,
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// Agent → receiver: everything before this in the stream forms a
    /// recovery point for all disks registered in this session.
    Point {
        seq: u64,
        kind: PointKind,
        name: String,
        agent_time_ms: u64,
    },
    /// Receiver → agent: every message up to and including `seq` is durable.
    Ack {
        seq: u64,
    },
    /// Receiver → agent: the point at `seq` is durable and has this id.
    PointRecorded {
        seq: u64,
        point_id: u64,
    },
    /// Agent → receiver (checksum sync): hash the image's bytes
    /// `offset_bytes..offset_bytes + len_bytes` of this disk in blocks of
    /// `block_bytes` (the last one may be shorter) as they stand after
    /// every earlier message, and answer with [`Message::Hashes`]. Takes a
    /// sequence number like data, so it is resent after a reconnect.
    HashRequest {
        seq: u64,
        disk: u32,
        offset_bytes: u64,
        len_bytes: u32,
        block_bytes: u32,
    },
    /// Receiver → agent: the BLAKE3 of each block of the request `seq`.
    Hashes {
        seq: u64,
        disk: u32,
        offset_bytes: u64,
        block_bytes: u32,
        hashes: Vec<Checksum>,
    },
    /// Agent → receiver (planned failover): the last point before this is
    /// final; mark every disk of the session failed over at it and refuse
    /// further replication. Answered with an Ack of `seq`.
    Failover {
        seq: u64,
    },
    /// Either way; the receiver answers each with its own.
    Heartbeat {
        time_ms: u64,
    },
    /// Either way; the sender closes the connection after it.
    Error {
        code: ErrorCode,
        message: String,
    },
}

mod code {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REGISTER_DISK: u8 = 3;
    pub const DISK_REGISTERED: u8 = 4;
    pub const EXTENT: u8 = 5;
    pub const ZERO: u8 = 6;
    pub const POINT: u8 = 7;
    pub const ACK: u8 = 8;
    pub const POINT_RECORDED: u8 = 9;
    pub const HEARTBEAT: u8 = 10;
    pub const ERROR: u8 = 11;
    pub const HASH_REQUEST: u8 = 12;
    pub const HASHES: u8 = 13;
    pub const FAILOVER: u8 = 14;
    /// Version 2: an extent whose checksum is CRC32C.
    pub const EXTENT_CRC32C: u8 = 15;
}

impl Message {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::RegisterDisk { .. } => "register-disk",
            Message::DiskRegistered { .. } => "disk-registered",
            Message::Extent(_) => "extent",
            Message::Zero { .. } => "zero",
            Message::Point { .. } => "point",
            Message::Ack { .. } => "ack",
            Message::PointRecorded { .. } => "point-recorded",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Error { .. } => "error",
            Message::HashRequest { .. } => "hash-request",
            Message::Hashes { .. } => "hashes",
            Message::Failover { .. } => "failover",
        }
    }

    /// Appends the whole frame: u32 length, type byte, fields.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        self.encode_body(out);
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends the body: type byte and fields.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        match self {
            Message::Hello {
                agent_name,
                software_version,
            } => {
                w.u8(code::HELLO);
                w.string(agent_name, MAX_NAME_BYTES);
                w.string(software_version, MAX_NAME_BYTES);
            }
            Message::Welcome {
                receiver_name,
                session_id,
            } => {
                w.u8(code::WELCOME);
                w.string(receiver_name, MAX_NAME_BYTES);
                w.u64(*session_id);
            }
            Message::RegisterDisk {
                disk_id,
                size_bytes,
                logical_block_bytes,
            } => {
                w.u8(code::REGISTER_DISK);
                w.string(disk_id, MAX_NAME_BYTES);
                w.u64(*size_bytes);
                w.u32(*logical_block_bytes);
            }
            Message::DiskRegistered {
                disk_id,
                handle,
                image_existed,
            } => {
                w.u8(code::DISK_REGISTERED);
                w.string(disk_id, MAX_NAME_BYTES);
                w.u32(*handle);
                w.bool(*image_existed);
            }
            Message::Extent(e) => {
                e.encode_fields(e.seq, e.disk, &mut w);
                w.bytes(&e.payload);
            }
            Message::Zero {
                seq,
                disk,
                offset_bytes,
                len_bytes,
            } => {
                w.u8(code::ZERO);
                w.u64(*seq);
                w.u32(*disk);
                w.u64(*offset_bytes);
                w.u64(*len_bytes);
            }
            Message::Point {
                seq,
                kind,
                name,
                agent_time_ms,
            } => {
                w.u8(code::POINT);
                w.u64(*seq);
                w.u8(*kind as u8);
                w.string(name, MAX_NAME_BYTES);
                w.u64(*agent_time_ms);
            }
            Message::Ack { seq } => {
                w.u8(code::ACK);
                w.u64(*seq);
            }
            Message::Failover { seq } => {
                w.u8(code::FAILOVER);
                w.u64(*seq);
            }
            Message::PointRecorded { seq, point_id } => {
                w.u8(code::POINT_RECORDED);
                w.u64(*seq);
                w.u64(*point_id);
            }
            Message::Heartbeat { time_ms } => {
                w.u8(code::HEARTBEAT);
                w.u64(*time_ms);
            }
            Message::Error { code: c, message } => {
                w.u8(code::ERROR);
                w.u16(*c as u16);
                w.string(message, MAX_ERROR_BYTES);
            }
            Message::HashRequest {
                seq,
                disk,
                offset_bytes,
                len_bytes,
                block_bytes,
            } => {
                w.u8(code::HASH_REQUEST);
                w.u64(*seq);
                w.u32(*disk);
                w.u64(*offset_bytes);
                w.u32(*len_bytes);
                w.u32(*block_bytes);
            }
            Message::Hashes {
                seq,
                disk,
                offset_bytes,
                block_bytes,
                hashes,
            } => {
                w.u8(code::HASHES);
                w.u64(*seq);
                w.u32(*disk);
                w.u64(*offset_bytes);
                w.u32(*block_bytes);
                w.u32(hashes.len() as u32);
                for h in hashes {
                    w.bytes(h);
                }
            }
        }
    }

    /// Decodes one frame body. Never panics; rejects trailing bytes and
    /// out-of-range fields.
    pub fn decode(body: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(body);
        let msg = match r.u8("message type")? {
            code::HELLO => Message::Hello {
                agent_name: r.string("agent name", MAX_NAME_BYTES)?,
                software_version: r.string("software version", MAX_NAME_BYTES)?,
            },
            code::WELCOME => Message::Welcome {
                receiver_name: r.string("receiver name", MAX_NAME_BYTES)?,
                session_id: r.u64("session id")?,
            },
            code::REGISTER_DISK => Message::RegisterDisk {
                disk_id: r.string("disk id", MAX_NAME_BYTES)?,
                size_bytes: r.u64("disk size")?,
                logical_block_bytes: r.u32("logical block size")?,
            },
            code::DISK_REGISTERED => Message::DiskRegistered {
                disk_id: r.string("disk id", MAX_NAME_BYTES)?,
                handle: r.u32("disk handle")?,
                image_existed: r.bool("image existed")?,
            },
            t @ (code::EXTENT | code::EXTENT_CRC32C) => {
                let head = ExtentHead::decode(t, &mut r)?;
                let payload = r.rest();
                head.check_payload(payload.len())?;
                Message::Extent(head.with_payload(payload.to_vec()))
            }
            code::ZERO => {
                let m = Message::Zero {
                    seq: r.u64("seq")?,
                    disk: r.u32("disk handle")?,
                    offset_bytes: r.u64("zero offset")?,
                    len_bytes: r.u64("zero length")?,
                };
                if let Message::Zero {
                    offset_bytes,
                    len_bytes,
                    ..
                } = m
                {
                    if len_bytes == 0 || offset_bytes.checked_add(len_bytes).is_none() {
                        return Err(DecodeError::BadValue {
                            what: "zero length",
                            value: len_bytes,
                        });
                    }
                }
                m
            }
            code::POINT => Message::Point {
                seq: r.u64("seq")?,
                kind: match r.u8("point kind")? {
                    1 => PointKind::CrashConsistent,
                    2 => PointKind::AppConsistent,
                    3 => PointKind::SyncMarker,
                    v => {
                        return Err(DecodeError::BadValue {
                            what: "point kind",
                            value: u64::from(v),
                        })
                    }
                },
                name: r.string("point name", MAX_NAME_BYTES)?,
                agent_time_ms: r.u64("agent time")?,
            },
            code::ACK => Message::Ack { seq: r.u64("seq")? },
            code::FAILOVER => Message::Failover { seq: r.u64("seq")? },
            code::POINT_RECORDED => Message::PointRecorded {
                seq: r.u64("seq")?,
                point_id: r.u64("point id")?,
            },
            code::HEARTBEAT => Message::Heartbeat {
                time_ms: r.u64("time")?,
            },
            code::ERROR => Message::Error {
                code: ErrorCode::from_u16(r.u16("error code")?)?,
                message: r.string("error message", MAX_ERROR_BYTES)?,
            },
            code::HASH_REQUEST => {
                let seq = r.u64("seq")?;
                let disk = r.u32("disk handle")?;
                let offset_bytes = r.u64("hash range offset")?;
                let len_bytes = r.u32("hash range length")?;
                let block_bytes = r.u32("hash block size")?;
                if len_bytes == 0
                    || len_bytes > MAX_HASH_RANGE_BYTES
                    || offset_bytes.checked_add(u64::from(len_bytes)).is_none()
                {
                    return Err(DecodeError::BadValue {
                        what: "hash range length",
                        value: u64::from(len_bytes),
                    });
                }
                check_hash_block(block_bytes)?;
                Message::HashRequest {
                    seq,
                    disk,
                    offset_bytes,
                    len_bytes,
                    block_bytes,
                }
            }
            code::HASHES => {
                let seq = r.u64("seq")?;
                let disk = r.u32("disk handle")?;
                let offset_bytes = r.u64("hash range offset")?;
                let block_bytes = r.u32("hash block size")?;
                check_hash_block(block_bytes)?;
                let n = r.u32("hash count")?;
                if n > MAX_HASHES {
                    return Err(DecodeError::BadValue {
                        what: "hash count",
                        value: u64::from(n),
                    });
                }
                let hashes = (0..n)
                    .map(|_| r.checksum("hash"))
                    .collect::<Result<Vec<_>, _>>()?;
                Message::Hashes {
                    seq,
                    disk,
                    offset_bytes,
                    block_bytes,
                    hashes,
                }
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._:-]{0,64}"
    }

    fn arb_extent() -> impl Strategy<Value = Extent> {
        (
            any::<u64>(),
            any::<u32>(),
            0u64..(1 << 50),
            proptest::collection::vec(any::<u8>(), 1..2048),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(seq, disk, off, data, compress, crc)| {
                let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
                let sum = if crc {
                    SumKind::Crc32c
                } else {
                    SumKind::Blake3
                };
                Extent::pack(seq, disk, off, &data, sum, compress.then_some(&mut c))
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (arb_name(), arb_name()).prop_map(|(a, b)| Message::Hello {
                agent_name: a,
                software_version: b
            }),
            (arb_name(), any::<u64>()).prop_map(|(a, s)| Message::Welcome {
                receiver_name: a,
                session_id: s
            }),
            (arb_name(), any::<u64>(), any::<u32>()).prop_map(|(d, s, b)| {
                Message::RegisterDisk {
                    disk_id: d,
                    size_bytes: s,
                    logical_block_bytes: b,
                }
            }),
            (arb_name(), any::<u32>(), any::<bool>()).prop_map(|(d, h, e)| {
                Message::DiskRegistered {
                    disk_id: d,
                    handle: h,
                    image_existed: e,
                }
            }),
            arb_extent().prop_map(Message::Extent),
            (any::<u64>(), any::<u32>(), 0u64..(1 << 50), 1u64..(1 << 40)).prop_map(
                |(seq, disk, o, l)| Message::Zero {
                    seq,
                    disk,
                    offset_bytes: o,
                    len_bytes: l
                }
            ),
            (any::<u64>(), 1u8..=3, arb_name(), any::<u64>()).prop_map(|(seq, k, n, t)| {
                Message::Point {
                    seq,
                    kind: match k {
                        1 => PointKind::CrashConsistent,
                        2 => PointKind::AppConsistent,
                        _ => PointKind::SyncMarker,
                    },
                    name: n,
                    agent_time_ms: t,
                }
            }),
            any::<u64>().prop_map(|seq| Message::Ack { seq }),
            any::<u64>().prop_map(|seq| Message::Failover { seq }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(seq, p)| Message::PointRecorded { seq, point_id: p }),
            any::<u64>().prop_map(|t| Message::Heartbeat { time_ms: t }),
            ("[ -~]{0,200}").prop_map(|m| Message::Error {
                code: ErrorCode::ChecksumMismatch,
                message: m
            }),
            (
                any::<u64>(),
                any::<u32>(),
                0u64..(1 << 50),
                1..=MAX_HASH_RANGE_BYTES,
                9u32..=20
            )
                .prop_map(|(seq, disk, o, l, b)| Message::HashRequest {
                    seq,
                    disk,
                    offset_bytes: o,
                    len_bytes: l,
                    block_bytes: 1 << b,
                }),
            (
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                9u32..=20,
                proptest::collection::vec(any::<[u8; 32]>(), 0..40)
            )
                .prop_map(|(seq, disk, o, b, hashes)| Message::Hashes {
                    seq,
                    disk,
                    offset_bytes: o,
                    block_bytes: 1 << b,
                    hashes,
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in arb_message()) {
            let mut body = Vec::new();
            msg.encode_body(&mut body);
            prop_assert_eq!(Message::decode(&body), Ok(msg));
        }

        #[test]
        fn every_truncation_is_an_error(msg in arb_message()) {
            let mut body = Vec::new();
            msg.encode_body(&mut body);
            for cut in 0..body.len() {
                // Extents end in a payload, so a cut there changes the payload
                // length, which must also be rejected.
                prop_assert!(Message::decode(&body[..cut]).is_err(), "cut at {} decoded", cut);
            }
        }

        #[test]
        fn trailing_bytes_rejected(msg in arb_message(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
            let mut body = Vec::new();
            msg.encode_body(&mut body);
            body.extend_from_slice(&extra);
            prop_assert!(Message::decode(&body).is_err());
        }

        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&body);
        }

        #[test]
        fn extents_unpack_to_their_data(data in proptest::collection::vec(0u8..4, 1..8192)) {
            let mut c = zstd::bulk::Compressor::new(3).expect("zstd");
            let mut d = zstd::bulk::Decompressor::new().expect("zstd");
            let mut scratch = Vec::new();
            for sum in [SumKind::Blake3, SumKind::Crc32c] {
                let e = Extent::pack(1, 0, 0, &data, sum, Some(&mut c));
                prop_assert_eq!(e.unpack(&mut d, &mut scratch).expect("unpack"), &data[..]);
            }
        }
    }

    /// A frame sent as head then payload is byte for byte the frame of the
    /// message, with the seq and disk handle the head was given.
    #[test]
    fn extent_head_and_payload_make_the_frame() {
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 7) as u8).collect();
        let held = Extent::pack(0, 0, 4096, &data, SumKind::Crc32c, Some(&mut c));
        let mut sent = Vec::new();
        held.encode_frame_head(41, 3, &mut sent);
        sent.extend_from_slice(&held.payload);
        let mut whole = Vec::new();
        Message::Extent(Extent {
            seq: 41,
            disk: 3,
            ..held.clone()
        })
        .encode_frame(&mut whole);
        assert_eq!(sent, whole);
        assert!(held.payload.len() < data.len() / 10, "compressed");
    }

    /// The worked examples in docs/PROTOCOL.md.
    #[test]
    fn documented_frames() {
        let mut out = Vec::new();
        Message::Heartbeat { time_ms: 1 }.encode_frame(&mut out);
        assert_eq!(out, [0, 0, 0, 9, 10, 0, 0, 0, 0, 0, 0, 0, 1]);
        out.clear();
        Message::Zero {
            seq: 7,
            disk: 0,
            offset_bytes: 4096,
            len_bytes: 8192,
        }
        .encode_frame(&mut out);
        let mut want = vec![0, 0, 0, 0x1d, 6, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0]);
        assert_eq!(out, want);
    }

    /// Version 2's extent, as docs/PROTOCOL.md spells it out.
    #[test]
    fn documented_crc32c_extent() {
        let e = Extent::pack(2, 1, 512, b"123456789", SumKind::Crc32c, None);
        let mut out = Vec::new();
        Message::Extent(e).encode_frame(&mut out);
        let mut want = vec![0, 0, 0, 0x27, 15, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 9, 0]);
        // CRC32C's check value, the checksum of "123456789".
        want.extend_from_slice(&[0xe3, 0x06, 0x92, 0x83]);
        want.extend_from_slice(b"123456789");
        assert_eq!(out, want);
    }

    #[test]
    fn corrupted_payload_fails_the_checksum() {
        let data = vec![7u8; 4096];
        for sum in [SumKind::Blake3, SumKind::Crc32c] {
            let mut e = Extent::pack(1, 0, 0, &data, sum, None);
            e.payload[100] ^= 1;
            let mut d = zstd::bulk::Decompressor::new().expect("zstd");
            let mut scratch = Vec::new();
            assert!(matches!(
                e.unpack(&mut d, &mut scratch),
                Err(PayloadError::ChecksumMismatch { .. })
            ));
            // Nor does a damaged piece get a fresh checksum of the damage.
            assert!(e.with_sum(SumKind::Blake3, &mut d).is_err());
        }
    }

    /// A piece packed for a version 2 connection and sent on a version 1
    /// one: the same payload, with the BLAKE3 of the same data.
    #[test]
    fn a_piece_changes_its_checksum_for_an_older_connection() {
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        let mut d = zstd::bulk::Decompressor::new().expect("zstd");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 7) as u8).collect();
        for compressor in [Some(&mut c), None] {
            let held = Extent::pack(3, 1, 8192, &data, SumKind::Crc32c, compressor);
            let old = held.with_sum(SumKind::Blake3, &mut d).expect("converts");
            assert_eq!(old.checksum, ExtentSum::Blake3(checksum(&data)));
            assert_eq!(
                (old.payload.as_slice(), old.codec),
                (held.payload.as_slice(), held.codec)
            );
            let mut scratch = Vec::new();
            assert_eq!(old.unpack(&mut d, &mut scratch).expect("unpack"), &data[..]);
        }
    }

    #[test]
    fn decompression_bomb_hits_the_bound() {
        // 64 MiB of zeros compresses to a few KiB; claim it is 4 KiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).expect("zstd");
        let e = Extent {
            seq: 1,
            disk: 0,
            offset_bytes: 0,
            len_bytes: 4096,
            codec: Codec::Zstd,
            checksum: ExtentSum::Blake3(checksum(&[0u8; 4096])),
            payload: bomb,
        };
        let mut d = zstd::bulk::Decompressor::new().expect("zstd");
        let mut scratch = Vec::new();
        assert!(matches!(
            e.unpack(&mut d, &mut scratch),
            Err(PayloadError::BadZstd { expected: 4096 })
        ));
        assert!(scratch.capacity() < 1 << 20);
    }

    #[test]
    fn oversized_extent_length_rejected() {
        let mut body = Vec::new();
        Message::Extent(Extent::pack(1, 0, 0, &[1, 2, 3], SumKind::Blake3, None))
            .encode_body(&mut body);
        // len_bytes sits after type(1) seq(8) disk(4) offset(8).
        body[21..25].copy_from_slice(&(MAX_EXTENT_BYTES + 1).to_be_bytes());
        assert!(matches!(
            Message::decode(&body),
            Err(DecodeError::BadValue {
                what: "extent length",
                ..
            })
        ));
    }
}
