//! Frames: a u32 big-endian body length, then the body (one type byte and
//! the message fields). The length is checked against [`MAX_FRAME_BYTES`]
//! before any buffer grows, so a peer cannot make us allocate more.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::Reader;
use super::messages::{ExtentHead, Message, MAX_EXTENT_BYTES};
use super::DecodeError;

/// Largest frame body accepted: one uncompressed extent plus room for its
/// header fields. A zstd payload larger than its input is sent uncompressed
/// instead, so no valid extent frame is bigger.
pub const MAX_FRAME_BYTES: usize = MAX_EXTENT_BYTES as usize + 4096;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("empty frame")]
    Empty,
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed message")]
    Decode(#[from] DecodeError),
}

/// Reads a frame's length; `Ok(None)` on a clean end of stream between
/// frames.
async fn read_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len as u64));
    }
    Ok(Some(len))
}

/// Reads exactly `buf.len()` bytes of a frame.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads one frame body into `buf`. Returns `Ok(false)` on a clean end of
/// stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let Some(len) = read_len(r).await? else {
        return Ok(false);
    };
    buf.clear();
    buf.resize(len, 0);
    read_body(r, buf).await?;
    Ok(true)
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream.
///
/// An extent's payload is read straight into a buffer of its own, which
/// the extent keeps: taken out of a frame buffer it was copied once more,
/// and the frame buffer zeroed before each read as well (1.4 % of the
/// receiver's CPU together at 150 MB/s; docs/BENCHMARKS.md, "Fewer
/// copies in the receiver").
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Message>, FrameError> {
    let Some(len) = read_len(r).await? else {
        return Ok(None);
    };
    let mut t = [0u8];
    read_body(r, &mut t).await?;
    let head_bytes = ExtentHead::bytes(t[0]).filter(|&h| h <= len);
    buf.clear();
    buf.push(t[0]);
    buf.resize(head_bytes.unwrap_or(len), 0);
    read_body(r, &mut buf[1..]).await?;
    let Some(head_bytes) = head_bytes else {
        return Ok(Some(Message::decode(buf)?));
    };
    let mut fields = Reader::new(&buf[1..]);
    let head = ExtentHead::decode(t[0], &mut fields)?;
    // `ExtentHead::bytes` and the decode agree on the layout.
    fields.finish()?;
    let payload_bytes = len - head_bytes;
    head.check_payload(payload_bytes)?;
    let mut payload = Vec::with_capacity(payload_bytes);
    while payload.len() < payload_bytes {
        // Into the spare capacity, not zeroed first; never past it.
        let want = (payload_bytes - payload.len()) as u64;
        match (&mut *r).take(want).read_buf(&mut payload).await {
            Ok(0) => return Err(FrameError::Truncated),
            Ok(_) => {}
            // As in `read_body`: TLS reports a peer gone mid-record so.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Truncated)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(Message::Extent(head.with_payload(payload))))
}

/// Encodes and writes one message (not flushed: callers batch).
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    scratch.clear();
    msg.encode_frame(scratch);
    w.write_all(scratch).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn oversized_length_rejected_before_allocating() {
        let bytes = u32::MAX.to_be_bytes();
        let mut buf = Vec::new();
        let r = block_on(read_frame(&mut &bytes[..], &mut buf));
        assert!(matches!(r, Err(FrameError::TooLarge(_))));
        assert_eq!(buf.capacity(), 0);
    }

    #[test]
    fn eof_between_and_inside_frames() {
        let mut buf = Vec::new();
        assert!(!block_on(read_frame(&mut &[][..], &mut buf)).expect("clean eof"));
        let partial = [0u8, 0, 0, 10, 1, 2];
        assert!(matches!(
            block_on(read_frame(&mut &partial[..], &mut buf)),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            block_on(read_frame(&mut &[0u8, 0, 0, 0][..], &mut buf)),
            Err(FrameError::Empty)
        ));
    }

    /// Hands out at most `step` bytes a read, as a TLS stream may.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.bytes.len()).min(buf.remaining());
            buf.put_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn extent_frames() -> Vec<(Message, Vec<u8>)> {
        use crate::proto::messages::{Extent, SumKind};
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
        let text: Vec<u8> = b"tidemark ".iter().copied().cycle().take(20_000).collect();
        let noise: Vec<u8> = (0..5_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut out = Vec::new();
        for sum in [SumKind::Crc32c, SumKind::Blake3] {
            for (data, zstd) in [(&text, true), (&noise, false), (&vec![7u8; 1], false)] {
                let e = Extent::pack(9, 2, 4096, data, sum, zstd.then_some(&mut c));
                let msg = Message::Extent(e);
                let mut wire = Vec::new();
                msg.encode_frame(&mut wire);
                out.push((msg, wire));
            }
        }
        out
    }

    /// An extent read with its payload apart is the extent
    /// `Message::decode` makes of the whole frame, however the stream
    /// splits it; so is a message after it.
    #[test]
    fn extents_read_apart_decode_as_whole_frames() {
        for (msg, wire) in extent_frames() {
            for step in [1, 7, 4096, usize::MAX] {
                let mut stream = wire.clone();
                let hb = Message::Heartbeat { time_ms: 5 };
                hb.encode_frame(&mut stream);
                let mut r = Trickle {
                    bytes: &stream,
                    step,
                };
                let mut buf = Vec::new();
                let got = block_on(read_message(&mut r, &mut buf)).expect("read");
                assert_eq!(got.as_ref(), Some(&msg), "step {step}");
                assert_eq!(Message::decode(&wire[4..]).expect("decode"), msg);
                let next = block_on(read_message(&mut r, &mut buf)).expect("read");
                assert_eq!(next, Some(hb), "step {step}");
            }
        }
    }

    /// Every cut of an extent frame after its length is an error, never
    /// a message or a panic.
    #[test]
    fn cut_extent_frames_are_truncated() {
        for (_, wire) in extent_frames() {
            for cut in 4..wire.len() {
                let mut buf = Vec::new();
                let r = block_on(read_message(&mut &wire[..cut], &mut buf));
                assert!(
                    matches!(r, Err(FrameError::Truncated)),
                    "cut at {cut} of {}: {r:?}",
                    wire.len()
                );
            }
        }
    }

    /// A payload that does not fit its head is refused before it is
    /// read, and so is a frame too short for an extent's head.
    #[test]
    fn an_extent_whose_length_lies_is_refused() {
        let (_, wire) = extent_frames().remove(1);
        // One byte more payload than the uncompressed length says.
        let mut long = wire.clone();
        long.push(0);
        let len = (long.len() - 4) as u32;
        long[..4].copy_from_slice(&len.to_be_bytes());
        let r = block_on(read_message(&mut &long[..], &mut Vec::new()));
        assert!(
            matches!(
                r,
                Err(FrameError::Decode(DecodeError::BadValue {
                    what: "payload length",
                    ..
                }))
            ),
            "{r:?}"
        );
        // Only the type byte and half the head.
        let mut short = 13u32.to_be_bytes().to_vec();
        short.extend_from_slice(&wire[4..17]);
        let r = block_on(read_message(&mut &short[..], &mut Vec::new()));
        assert!(
            matches!(r, Err(FrameError::Decode(DecodeError::Truncated { .. }))),
            "{r:?}"
        );
    }

    #[test]
    fn message_round_trip_through_a_stream() {
        let msg = Message::Heartbeat { time_ms: 42 };
        let mut wire = Vec::new();
        let mut scratch = Vec::new();
        block_on(write_message(&mut wire, &msg, &mut scratch)).expect("write");
        let mut buf = Vec::new();
        let got = block_on(read_message(&mut &wire[..], &mut buf)).expect("read");
        assert_eq!(got, Some(msg));
    }
}
