//! Frames: a u32 big-endian body length, then the body (one type byte and
//! the message fields). The length is checked against [`MAX_FRAME_BYTES`]
//! before any buffer grows, so a peer cannot make us allocate more.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::messages::{Message, MAX_EXTENT_BYTES};
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

/// Reads one frame body into `buf`. Returns `Ok(false)` on a clean end of
/// stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len as u64));
    }
    buf.clear();
    buf.resize(len, 0);
    match r.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Message>, FrameError> {
    if !read_frame(r, buf).await? {
        return Ok(None);
    }
    Ok(Some(Message::decode(buf)?))
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
