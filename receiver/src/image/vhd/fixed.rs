//! Fixed VHD written in place: the disk byte for byte, then the footer
//! (FORMATS.md §2.3). The footer is written once at create and never
//! moves, so the image is crash-safe by construction (§2.6): a flush is a
//! plain data sync. Zero ranges are punched out, so the file stays sparse
//! on the host (and uploads fast, §2.5).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::footer::{Footer, DISK_TYPE_FIXED, FIXED_DATA_OFFSET, FOOTER_BYTES};
use super::header::SECTOR_BYTES;
use crate::image::storage::{FileStorage, Storage};
use crate::image::{DiskUuid, Image, ImageError};

/// A fixed VHD open as a live image.
pub struct FixedVhd {
    path: PathBuf,
    storage: Box<dyn Storage>,
    footer: Footer,
    writable: bool,
    poisoned: bool,
}

impl FixedVhd {
    /// Creates `path` (which must not exist) as a fixed VHD of
    /// `size_bytes` (a multiple of 512; Azure wants whole MiB, see
    /// [`super::footer::fixed_size`]) carrying `uuid`.
    pub fn create_file(
        path: &Path,
        size_bytes: u64,
        uuid: DiskUuid,
    ) -> Result<FixedVhd, ImageError> {
        let create_err = |source| ImageError::Create {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(create_err)?;
        let img = match Self::create(Box::new(FileStorage::new(file)), path, size_bytes, uuid) {
            Ok(img) => img,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        tidemark_common::durable::sync_dir(dir).map_err(create_err)?;
        Ok(img)
    }

    pub fn open_file(path: &Path, writable: bool) -> Result<FixedVhd, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::open(Box::new(FileStorage::new(file)), path, writable)
    }

    /// Lays out a new image on empty `storage`.
    pub fn create(
        mut storage: Box<dyn Storage>,
        path: &Path,
        size_bytes: u64,
        uuid: DiskUuid,
    ) -> Result<FixedVhd, ImageError> {
        let create_err = |source| ImageError::Create {
            path: path.to_path_buf(),
            source,
        };
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(create_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "size must be a non-zero multiple of 512 bytes",
            )));
        }
        if storage.len().map_err(create_err)? != 0 {
            return Err(create_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file is not empty",
            )));
        }
        let footer = Footer::fixed(size_bytes, uuid);
        storage
            .write_at(&footer.encode(), size_bytes)
            .and_then(|()| storage.sync())
            .map_err(create_err)?;
        Ok(FixedVhd {
            path: path.to_path_buf(),
            storage,
            footer,
            writable: true,
            poisoned: false,
        })
    }

    /// Opens a fixed VHD: a valid fixed footer in the last 512 bytes whose
    /// Current Size is the rest of the file.
    pub fn open(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
    ) -> Result<FixedVhd, ImageError> {
        let fmt = |m: String| ImageError::Format {
            path: path.to_path_buf(),
            message: m,
        };
        let len = storage.len().map_err(|source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if len < FOOTER_BYTES as u64 {
            return Err(fmt(format!("{len} bytes is too short for a VHD")));
        }
        let at = len - FOOTER_BYTES as u64;
        let mut b = [0u8; FOOTER_BYTES];
        storage
            .read_at(&mut b, at)
            .map_err(|source| ImageError::Read {
                path: path.to_path_buf(),
                offset_bytes: at,
                source,
            })?;
        let footer = Footer::decode(&b).map_err(|e| fmt(format!("footer: {e}")))?;
        if footer.disk_type != DISK_TYPE_FIXED {
            return Err(fmt(format!("disk type {}, not fixed", footer.disk_type)));
        }
        if footer.current_size != at {
            return Err(fmt(format!(
                "footer says {} bytes but {at} bytes precede it",
                footer.current_size
            )));
        }
        if footer.data_offset != FIXED_DATA_OFFSET {
            tracing::warn!(
                "{}: fixed VHD with data offset {:#x} (cloud-hypervisor wants all ones)",
                path.display(),
                footer.data_offset
            );
        }
        Ok(FixedVhd {
            path: path.to_path_buf(),
            storage,
            footer,
            writable,
            poisoned: false,
        })
    }

    pub fn uuid(&self) -> DiskUuid {
        self.footer.uuid
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows the disk to `size_bytes` (a multiple of 512; nothing happens
    /// if it is not larger). The footer moves: the new one is written at
    /// the new end and made durable first, so a crash at any point leaves
    /// one valid footer as the file's last 512 bytes (the old size before,
    /// the new size after). Only then are the old footer's bytes, now
    /// inside the disk, zeroed. A crash before that leaves them in the
    /// grown range, where no data was accepted yet: [`clear_stale_footer`]
    /// finds them on the next registration.
    pub fn grow(&mut self, size_bytes: u64) -> Result<(), ImageError> {
        let old = self.footer.current_size;
        if size_bytes <= old {
            return Ok(());
        }
        if !size_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(self.write_err(
                size_bytes,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a fixed VHD grows to a multiple of 512 bytes",
                ),
            ));
        }
        let mut footer = self.footer.clone();
        footer.current_size = size_bytes;
        footer.original_size = footer.original_size.max(size_bytes);
        footer.geometry = super::footer::geometry(size_bytes);
        if let Err(e) = self
            .storage
            .write_at(&footer.encode(), size_bytes)
            .and_then(|()| self.storage.sync())
        {
            return Err(self.write_err(size_bytes, e));
        }
        self.footer = footer;
        self.clear_stale_footer(old)
    }

    /// Zeroes a footer left at `at` inside the disk by a grow that did not
    /// finish; anything else there is left alone.
    pub fn clear_stale_footer(&mut self, at: u64) -> Result<(), ImageError> {
        if at + FOOTER_BYTES as u64 > self.footer.current_size {
            return Ok(());
        }
        let mut b = [0u8; FOOTER_BYTES];
        self.storage
            .read_at(&mut b, at)
            .map_err(|source| ImageError::Read {
                path: self.path.clone(),
                offset_bytes: at,
                source,
            })?;
        if !Footer::has_cookie(&b) {
            return Ok(());
        }
        if let Err(e) = self
            .storage
            .punch_hole(at, FOOTER_BYTES as u64)
            .and_then(|()| self.storage.sync())
        {
            return Err(self.write_err(at, e));
        }
        Ok(())
    }

    /// Flushes; dropping does the same but can only log a failure.
    pub fn close(mut self) -> Result<(), ImageError> {
        let r = self.flush();
        self.writable = false;
        r
    }

    fn check(&self, offset_bytes: u64, len_bytes: u64, write: bool) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned {
                path: self.path.clone(),
            });
        }
        if write && !self.writable {
            return Err(ImageError::Write {
                path: self.path.clone(),
                offset_bytes,
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "image is open read-only",
                ),
            });
        }
        let size_bytes = self.size_bytes();
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(ImageError::OutOfRange {
                path: self.path.clone(),
                offset_bytes,
                len_bytes,
                size_bytes,
            }),
        }
    }

    fn write_err(&mut self, offset_bytes: u64, source: std::io::Error) -> ImageError {
        self.poisoned = true;
        ImageError::Write {
            path: self.path.clone(),
            offset_bytes,
            source,
        }
    }
}

impl Image for FixedVhd {
    fn size_bytes(&self) -> u64 {
        self.footer.current_size
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, data.len() as u64, true)?;
        self.storage
            .write_at(data, offset_bytes)
            .map_err(|e| self.write_err(offset_bytes, e))
    }

    fn write_direct(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, data.len() as u64, true)?;
        self.storage
            .write_direct(data, offset_bytes)
            .map_err(|e| self.write_err(offset_bytes, e))
    }

    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        self.check(offset_bytes, len_bytes, true)?;
        if len_bytes == 0 {
            return Ok(());
        }
        self.storage
            .punch_hole(offset_bytes, len_bytes)
            .map_err(|e| self.write_err(offset_bytes, e))
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, buf.len() as u64, false)?;
        self.storage
            .read_at(buf, offset_bytes)
            .map_err(|source| ImageError::Read {
                path: self.path.clone(),
                offset_bytes,
                source,
            })
    }

    // The disk is the file's first bytes, as in a raw image, where the
    // store is a file (not the fault-injecting store of the tests).
    fn read_cached(&mut self, offset_bytes: u64, buf: &mut [u8]) -> bool {
        self.check(offset_bytes, buf.len() as u64, false).is_ok()
            && self
                .storage
                .file_storage()
                .is_some_and(|f| f.read_cached(buf, offset_bytes))
    }

    fn is_hole(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.check(offset_bytes, len_bytes, false).is_ok()
            && self
                .storage
                .file_storage()
                .is_some_and(|f| f.is_hole(offset_bytes, len_bytes))
    }

    fn prefetch(&self, offset_bytes: u64, len_bytes: u64) {
        if let Some(f) = self.storage.file_storage() {
            let len = len_bytes.min(self.size_bytes().saturating_sub(offset_bytes));
            f.prefetch(offset_bytes, len);
        }
    }

    fn reader(&self) -> Option<Box<dyn Image>> {
        let storage = self.storage.file_storage()?.reopen_read_only()?;
        Some(Box::new(FixedVhd {
            path: self.path.clone(),
            storage: Box::new(storage),
            footer: self.footer.clone(),
            writable: false,
            poisoned: false,
        }))
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned {
                path: self.path.clone(),
            });
        }
        if !self.writable {
            return Ok(());
        }
        self.storage.sync().map_err(|source| {
            self.poisoned = true;
            ImageError::Sync {
                path: self.path.clone(),
                source,
            }
        })
    }
}

impl Drop for FixedVhd {
    fn drop(&mut self) {
        if self.writable && !self.poisoned {
            if let Err(e) = self.flush() {
                tracing::warn!("closing {} failed: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::storage::CrashStorage;

    #[test]
    fn a_grown_fixed_image_reopens_at_its_new_size_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("g.vhd");
        let mut img = FixedVhd::create_file(&p, 1 << 20, [3; 16]).expect("create");
        img.write_at(4096, &[9; 4096]).expect("write");
        img.grow(3 << 20).expect("grow");
        drop(img);
        let mut img = FixedVhd::open_file(&p, true).expect("reopen");
        assert_eq!(img.size_bytes(), 3 << 20);
        assert_eq!(img.uuid(), [3; 16]);
        let mut b = vec![0u8; 4096];
        img.read_at(4096, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 9));
        // The old footer's place is disk now, and reads as zeros.
        let mut b = vec![1u8; 512];
        img.read_at(1 << 20, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(std::fs::metadata(&p).expect("stat").len(), (3 << 20) + 512);
    }

    /// As raw images and flat VMDK: the session reads it beside its own
    /// thread, and skips holes.
    #[test]
    fn a_fixed_image_file_knows_holes_and_its_cache_and_reads_from_other_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.vhd");
        let mut img = FixedVhd::create_file(&p, 8 << 20, [4; 16]).expect("create");
        assert!(img.is_hole(0, 8 << 20));
        img.write_at(5 << 20, &[0x77; 8192]).expect("write");
        assert!(!img.is_hole(0, 8 << 20));
        assert!(img.is_hole(0, 4 << 20));
        assert!(
            !img.is_hole(8 << 20, 1),
            "the footer is no part of the disk"
        );
        let mut b = vec![0u8; 8192];
        assert!(img.read_cached(5 << 20, &mut b), "just written: cached");
        assert!(b.iter().all(|&x| x == 0x77));
        assert!(
            !img.read_cached((8 << 20) - 4096, &mut b),
            "the footer is no part of the disk"
        );
        let mut reader = img.reader().expect("a file reads from elsewhere");
        let (b, refused) = std::thread::spawn(move || {
            let mut b = vec![0u8; 8192];
            reader.read_at(5 << 20, &mut b).expect("read");
            (b, reader.write_at(0, &[1]).is_err())
        })
        .join()
        .expect("thread");
        assert!(b.iter().all(|&x| x == 0x77));
        assert!(refused, "the reader cannot write");
        let s = CrashStorage::new(Vec::new(), None);
        let mut img =
            FixedVhd::create(Box::new(s), Path::new("c.vhd"), 1 << 20, [3; 16]).expect("create");
        assert!(img.reader().is_none());
        assert!(!img.read_cached(0, &mut [0u8; 4096]), "nor read its cache");
        assert!(
            !img.is_hole(0, 1 << 20),
            "a store that is no file cannot tell"
        );
    }

    #[test]
    fn a_fixed_image_is_the_disk_then_the_footer() {
        let s = CrashStorage::new(Vec::new(), None);
        let mut img = FixedVhd::create(Box::new(s.clone()), Path::new("f.vhd"), 1 << 20, [3; 16])
            .expect("create");
        img.write_at(1000, &[4u8; 5000]).expect("write");
        img.write_zeroes(2000, 100).expect("zero");
        assert!(
            img.write_at((1 << 20) - 1, &[1, 2]).is_err(),
            "past the end"
        );
        img.close().expect("close");
        let live = s.live();
        assert_eq!(live.len(), (1 << 20) + 512);
        assert!(live[1000..2000].iter().all(|&x| x == 4));
        assert!(live[2000..2100].iter().all(|&x| x == 0));
        let img = FixedVhd::open(Box::new(s), Path::new("f.vhd"), false).expect("open");
        assert_eq!(img.uuid(), [3; 16]);
        assert_eq!(img.size_bytes(), 1 << 20);
    }
}
