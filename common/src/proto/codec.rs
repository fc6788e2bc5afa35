//! Bounds-checked big-endian reading and writing. Every read checks the
//! remaining length first, so a decoder built on [`Reader`] cannot panic or
//! allocate more than the input it was handed.

use crate::checksum::{Checksum, CHECKSUM_BYTES};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated: {what} needs {needed} bytes, {left} left")]
    Truncated {
        what: &'static str,
        needed: usize,
        left: usize,
    },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what} has invalid value {value}")]
    BadValue { what: &'static str, value: u64 },
    #[error("unknown message type {0}")]
    UnknownType(u8),
}

/// A cursor over one message body.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                left: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadValue {
                what,
                value: u64::from(v),
            }),
        }
    }

    pub fn checksum(&mut self, what: &'static str) -> Result<Checksum, DecodeError> {
        self.array::<CHECKSUM_BYTES>(what)
    }

    /// A string with a u16 length prefix, at most `max` bytes.
    pub fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(DecodeError::BadValue {
                what,
                value: len as u64,
            });
        }
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8 { what })
    }

    /// Everything left: the payload at the end of a message.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Ends decoding: leftover bytes mean the peer and we disagree on the layout.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Appends big-endian fields to a message body.
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }
    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }
    /// A string with a u16 length prefix. Callers keep strings under the
    /// message's limit (validated where they enter the system); a longer one
    /// is cut at a character boundary rather than producing a frame the peer
    /// would reject.
    pub fn string(&mut self, v: &str, max: usize) {
        let mut end = v.len().min(max).min(usize::from(u16::MAX));
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        self.u16(end as u16);
        self.out.extend_from_slice(&v.as_bytes()[..end]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_reads_fail_without_panicking() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert!(matches!(r.u32("x"), Err(DecodeError::Truncated { .. })));
        // A failed read consumes nothing.
        assert_eq!(r.u16("y"), Ok(1));
        assert_eq!(r.finish(), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn string_length_is_checked_before_reading() {
        // Claims 65535 bytes with only 2 present.
        let mut r = Reader::new(&[0xff, 0xff, b'a', b'b']);
        assert!(r.string("s", 1000).is_err());
        let mut r = Reader::new(&[0, 2, 0xff, 0xfe]);
        assert_eq!(r.string("s", 10), Err(DecodeError::BadUtf8 { what: "s" }));
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let mut out = Vec::new();
        Writer::new(&mut out).string("aé", 2);
        assert_eq!(out, vec![0, 1, b'a']);
    }
}
