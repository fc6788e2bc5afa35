//! VHD images ("vpc" in qemu; FORMATS.md §2).
//!
//! Live images, written in place through [`crate::image::Image`]:
//! - [`FixedVhd`]: the disk then a 512-byte footer, the form Azure takes;
//! - [`DynamicVhd`]: sparse, 2 MiB blocks, crash-safe by write ordering
//!   (see [`dynamic`]), up to [`dynamic::MAX_SIZE_BYTES`] (2040 GiB,
//!   qemu's limit).
//!
//! Export: [`export_dynamic`] writes a dynamic VHD from a raw disk.
//! Checks: [`validate_dynamic`], [`validate_fixed`]. [`probe`] says whether
//! a file is a VHD and which disk (UUID) it holds.
//!
//! Every image we create says creator `"win "` with Current Size the exact
//! virtual size, so qemu, Hyper-V, Azure and libvhdi agree on the size
//! (FORMATS.md §2.4), and carries the disk's UUID as its unique id.

pub mod dynamic;
pub mod export;
pub mod fixed;
pub mod footer;
pub mod header;
pub mod validate;

use std::path::Path;

pub use dynamic::DynamicVhd;
pub use export::export_dynamic;
pub use fixed::FixedVhd;
pub use validate::{validate_dynamic, validate_fixed};

use self::footer::{
    Footer, DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, FOOTER_BYTES,
};
use self::header::{DynamicHeader, HEADER_BYTES};
use super::storage::{FileStorage, Storage};
use super::{DiskUuid, ImageError};

/// The VHD variants we read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdKind {
    Fixed,
    Dynamic,
}

fn format_err(path: &Path, message: impl Into<String>) -> ImageError {
    ImageError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads only the footers (and a dynamic disk's header cookie) of `path`:
/// `Some((unique id, kind, virtual size))` for a fixed VHD (footer in the
/// last 512 bytes, Current Size = the rest of the file) or a dynamic one
/// (valid footer copy at offset 0 and a header where it points; the tail
/// may be missing after a crash, which a writable open repairs), None for
/// a file that is no VHD. A damaged VHD (bad checksum), a differencing
/// one, or a fixed footer that does not match the file's length is an
/// error. The size is Current Size, what Hyper-V, Azure and libvhdi use
/// (FORMATS.md §2.4). Never panics, whatever the bytes.
pub fn probe(path: &Path) -> Result<Option<(DiskUuid, VhdKind, u64)>, ImageError> {
    let open_err = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    if !file.metadata().map_err(open_err)?.is_file() {
        return Ok(None);
    }
    probe_storage(&FileStorage::new(file), path)
}

/// [`probe`] on any storage.
pub fn probe_storage(
    storage: &dyn Storage,
    path: &Path,
) -> Result<Option<(DiskUuid, VhdKind, u64)>, ImageError> {
    let len = storage.len().map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if len < FOOTER_BYTES as u64 {
        return Ok(None);
    }
    let read = |at: u64| -> Result<[u8; FOOTER_BYTES], ImageError> {
        let mut b = [0u8; FOOTER_BYTES];
        storage
            .read_at(&mut b, at)
            .map_err(|source| ImageError::Read {
                path: path.to_path_buf(),
                offset_bytes: at,
                source,
            })?;
        Ok(b)
    };
    let head = read(0)?;
    let tail_at = len - FOOTER_BYTES as u64;
    let tail = read(tail_at)?;

    // A dynamic disk: the head copy decides (qemu reads it, we write it
    // first and never again).
    if Footer::has_cookie(&head) {
        match Footer::decode(&head) {
            Ok(f) if f.disk_type == DISK_TYPE_DYNAMIC => {
                let h_at = f.data_offset;
                let mut hb = [0u8; HEADER_BYTES];
                let in_file = h_at
                    .checked_add(HEADER_BYTES as u64)
                    .is_some_and(|e| e <= len);
                if in_file {
                    storage
                        .read_at(&mut hb, h_at)
                        .map_err(|source| ImageError::Read {
                            path: path.to_path_buf(),
                            offset_bytes: h_at,
                            source,
                        })?;
                }
                DynamicHeader::decode(&hb)
                    .map_err(|e| format_err(path, format!("dynamic VHD header at {h_at}: {e}")))?;
                return Ok(Some((f.uuid, VhdKind::Dynamic, f.current_size)));
            }
            Ok(f) if f.disk_type == DISK_TYPE_DIFFERENCING => {
                return Err(format_err(
                    path,
                    "a differencing VHD (needs its parent): not supported",
                ));
            }
            // A fixed disk whose data happens to start like a footer, or
            // a damaged head: the tail decides.
            Ok(_) => {}
            Err(e) if !Footer::has_cookie(&tail) => {
                return Err(format_err(path, format!("footer copy at offset 0: {e}")));
            }
            Err(_) => {}
        }
    }
    if !Footer::has_cookie(&tail) {
        return Ok(None);
    }
    let f = Footer::decode(&tail).map_err(|e| format_err(path, format!("footer: {e}")))?;
    match f.disk_type {
        DISK_TYPE_FIXED if f.current_size == tail_at => {
            Ok(Some((f.uuid, VhdKind::Fixed, f.current_size)))
        }
        DISK_TYPE_FIXED => Err(format_err(
            path,
            format!(
                "fixed VHD footer says {} bytes but {tail_at} bytes precede it",
                f.current_size
            ),
        )),
        DISK_TYPE_DYNAMIC => Err(format_err(
            path,
            "dynamic VHD footer at the end but no valid copy at offset 0",
        )),
        DISK_TYPE_DIFFERENCING => Err(format_err(
            path,
            "a differencing VHD (needs its parent): not supported",
        )),
        t => Err(format_err(path, format!("VHD of disk type {t}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::storage::CrashStorage;
    use crate::image::Image;

    const U: DiskUuid = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    #[test]
    fn probe_finds_both_kinds_and_never_panics() {
        let p = Path::new("x.vhd");
        let s = CrashStorage::new(Vec::new(), None);
        let mut img = DynamicVhd::create(Box::new(s.clone()), p, 5 << 20, U).expect("dynamic");
        img.write_at(0, &[1u8; 512]).expect("write");
        img.close().expect("close");
        assert_eq!(
            probe_storage(&s, p).expect("probe"),
            Some((U, VhdKind::Dynamic, 5 << 20))
        );
        let dynamic = s.durable();
        let s = CrashStorage::new(Vec::new(), None);
        FixedVhd::create(Box::new(s.clone()), p, 1 << 20, U)
            .expect("fixed")
            .close()
            .expect("close");
        assert_eq!(
            probe_storage(&s, p).expect("probe"),
            Some((U, VhdKind::Fixed, 1 << 20))
        );
        let fixed = s.durable();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..4000usize {
            let mut b = match i % 3 {
                0 => dynamic.clone(),
                1 => fixed.clone(),
                _ => vec![0u8; i % 3000],
            };
            if i % 7 == 0 {
                b.truncate(i % (b.len() + 1));
            }
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if b.is_empty() {
                    break;
                }
                let n = b.len();
                // Near either end: that is where footers live.
                let at = if x & 1 == 0 {
                    (x as usize >> 8) % n.min(2560)
                } else {
                    n - 1 - (x as usize >> 8) % n.min(512)
                };
                b[at] = (x >> 40) as u8;
            }
            let _ = probe_storage(&CrashStorage::new(b, None), p);
        }
        for junk in [&b""[..], b"conectix", &[0u8; 512], &[0xffu8; 2048]] {
            let s = CrashStorage::new(junk.to_vec(), None);
            assert_eq!(probe_storage(&s, p).expect("probe"), None);
        }
    }
}
