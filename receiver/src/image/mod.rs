//! Disk images the receiver writes into: one trait, one folder per format.

pub mod live;
pub mod raw;
pub mod storage;
pub mod vhd;
pub mod vmdk;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open image {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create image {}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write to image {} at byte {offset_bytes} failed", path.display())]
    Write {
        path: PathBuf,
        offset_bytes: u64,
        source: std::io::Error,
    },
    #[error("read from image {} at byte {offset_bytes} failed", path.display())]
    Read {
        path: PathBuf,
        offset_bytes: u64,
        source: std::io::Error,
    },
    #[error("fsync of image {} failed", path.display())]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("range {offset_bytes}+{len_bytes} lies beyond the end of image {} ({size_bytes} bytes)", path.display())]
    OutOfRange {
        path: PathBuf,
        offset_bytes: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
    /// After a failed write or fsync the kernel may have dropped dirty pages
    /// and cleared the error; writing on would acknowledge lost data.
    #[error("image {} had an I/O error earlier; reopen it before writing again", path.display())]
    Poisoned { path: PathBuf },
    /// The file is not a valid image of its format, or uses a part of the
    /// format this receiver does not support.
    #[error("image {} is corrupt or unsupported: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// The disk grew and its image's format cannot follow in place.
    #[error("image {} is {format}, which cannot grow in place to {size_bytes} bytes", path.display())]
    CannotGrow {
        path: PathBuf,
        size_bytes: u64,
        format: &'static str,
    },
    /// The format cannot hold a disk this large.
    #[error("image {} cannot be {format}: {size_bytes} bytes exceeds its limit of {max_bytes} bytes", path.display())]
    TooLarge {
        path: PathBuf,
        size_bytes: u64,
        max_bytes: u64,
        format: &'static str,
    },
}

/// A disk image open for replication.
pub trait Image: Send {
    /// Virtual disk size.
    fn size_bytes(&self) -> u64;
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError>;
    /// `write_at` of data that will not be read back soon, past the page
    /// cache where the format's bytes are a file's and the write is large
    /// and aligned; it then waits for the disk.
    fn write_direct(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_at(offset_bytes, data)
    }
    /// Makes a range read as zeros, deallocating it where the format can.
    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError>;
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// [`Image::read_at`] done only if it needs no wait for the disk (the
    /// bytes are in the page cache); false, with `buf` to be read again,
    /// otherwise, and always where the format cannot tell.
    fn read_cached(&mut self, _offset_bytes: u64, _buf: &mut [u8]) -> bool {
        false
    }
    /// Everything written so far is durable when this returns Ok.
    fn flush(&mut self) -> Result<(), ImageError>;
    /// True only when the whole range is known to read as zeros without
    /// reading it (unallocated in the file or the format); false when it
    /// holds data or the image cannot tell. Saves reading pre-images of
    /// holes.
    fn is_hole(&self, _offset_bytes: u64, _len_bytes: u64) -> bool {
        false
    }
    /// A hint that this range will be read soon (a checksum sync reads the
    /// image in order); formats that map ranges elsewhere may ignore it.
    fn prefetch(&self, _offset_bytes: u64, _len_bytes: u64) {}
    /// A second, read-only handle on the same bytes, for reading on another
    /// thread while this one goes on writing (a checksum sync hashes ahead
    /// with it). None where reads go through state only this handle keeps
    /// up to date (a format's mapping tables).
    fn reader(&self) -> Option<Box<dyn Image>> {
        None
    }
}

/// The 16-byte identity an image carries (VMDK `ddb.uuid`, VHD unique id).
pub type DiskUuid = [u8; 16];

/// The UUID for a disk id. A VMware NAA WWID (`6000c29…`, optionally with
/// an `naa.` prefix: what a guest sees with `disk.EnableUUID=TRUE`) is the
/// VMDK's own UUID, so its 16 bytes are used as they are. Any other id is
/// hashed into a version-8 (custom) UUID, stable for that id.
pub fn disk_uuid(disk_id: &str) -> DiskUuid {
    let hex = disk_id
        .strip_prefix("naa.")
        .unwrap_or(disk_id)
        .to_ascii_lowercase();
    if hex.len() == 32 && hex.starts_with("6000c29") && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex digits");
        }
        return out;
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&tidemark_common::checksum::checksum(disk_id.as_bytes())[..16]);
    out[6] = (out[6] & 0x0f) | 0x80; // version 8
    out[8] = (out[8] & 0x3f) | 0x80; // RFC 4122 variant
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naa_wwids_are_used_verbatim() {
        let u = disk_uuid("naa.6000C29a1b2c3d4e5f60718293a4b5c6");
        assert_eq!(u[..4], [0x60, 0x00, 0xc2, 0x9a]);
        assert_eq!(u[15], 0xc6);
        assert_eq!(disk_uuid("6000c29a1b2c3d4e5f60718293a4b5c6"), u);
    }

    #[test]
    fn other_ids_hash_to_stable_v8_uuids() {
        let a = disk_uuid("web-01-data");
        assert_eq!(a, disk_uuid("web-01-data"));
        assert_ne!(a, disk_uuid("web-01-logs"));
        assert_eq!(a[6] >> 4, 8);
    }
}
