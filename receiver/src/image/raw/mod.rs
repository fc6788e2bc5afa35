//! Raw images: the disk byte for byte in a sparse file. Zero ranges are
//! punched out, so unwritten and zeroed regions take no space.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::storage::{FileStorage, Storage};
use super::{Image, ImageError};

pub struct RawImage {
    path: PathBuf,
    storage: FileStorage,
    size_bytes: u64,
    poisoned: bool,
}

impl RawImage {
    /// Creates a sparse image of `size_bytes`; fails if the file exists.
    pub fn create(path: &Path, size_bytes: u64) -> Result<RawImage, ImageError> {
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
        file.set_len(size_bytes).map_err(create_err)?;
        file.sync_all().map_err(create_err)?;
        if let Some(dir) = path.parent() {
            tidemark_common::durable::sync_dir(dir).map_err(create_err)?;
        }
        Ok(RawImage {
            path: path.to_path_buf(),
            storage: FileStorage::new(file),
            size_bytes,
            poisoned: false,
        })
    }

    /// Opens an existing image for writing (`writable`) or reading.
    pub fn open(path: &Path, writable: bool) -> Result<RawImage, ImageError> {
        Self::open_prefix(path, writable, None)
    }

    /// Opens the first `size_bytes` of a file (the whole file if None) as
    /// the disk: a fixed VHD is the disk followed by its footer, which
    /// writes must never reach.
    pub fn open_prefix(
        path: &Path,
        writable: bool,
        size_bytes: Option<u64>,
    ) -> Result<RawImage, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(open_err)?;
        let file_bytes = file.metadata().map_err(open_err)?.len();
        let size_bytes = size_bytes.unwrap_or(file_bytes).min(file_bytes);
        Ok(RawImage {
            path: path.to_path_buf(),
            storage: FileStorage::new(file),
            size_bytes,
            poisoned: false,
        })
    }

    fn check(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned {
                path: self.path.clone(),
            });
        }
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ImageError::OutOfRange {
                path: self.path.clone(),
                offset_bytes,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    /// Writes `data` with `write` (through the page cache or past it)
    /// once its range is allocated exactly.
    fn write_with(
        &mut self,
        offset_bytes: u64,
        data: &[u8],
        write: fn(&mut FileStorage, &[u8], u64) -> std::io::Result<()>,
    ) -> Result<(), ImageError> {
        self.check(offset_bytes, data.len() as u64)?;
        self.storage
            .allocate_exact(offset_bytes, data.len() as u64)
            .and_then(|()| write(&mut self.storage, data, offset_bytes))
            .map_err(|e| self.write_err(offset_bytes, e))
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

impl Image for RawImage {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_with(offset_bytes, data, FileStorage::write_at)
    }

    fn write_direct(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_with(offset_bytes, data, FileStorage::write_direct)
    }

    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        self.check(offset_bytes, len_bytes)?;
        // Deallocates where the filesystem can, writes zeros where not.
        self.storage
            .punch_hole(offset_bytes, len_bytes)
            .map_err(|e| self.write_err(offset_bytes, e))
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, buf.len() as u64)?;
        // Within the file (checked above), so nothing reads as zeros.
        self.storage
            .read_at(buf, offset_bytes)
            .map_err(|source| ImageError::Read {
                path: self.path.clone(),
                offset_bytes,
                source,
            })
    }

    fn read_cached(&mut self, offset_bytes: u64, buf: &mut [u8]) -> bool {
        self.check(offset_bytes, buf.len() as u64).is_ok()
            && self.storage.read_cached(buf, offset_bytes)
    }

    fn is_hole(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.check(offset_bytes, len_bytes).is_ok() && self.storage.is_hole(offset_bytes, len_bytes)
    }

    fn prefetch(&self, offset_bytes: u64, len_bytes: u64) {
        let len = len_bytes.min(self.size_bytes.saturating_sub(offset_bytes));
        self.storage.prefetch(offset_bytes, len);
    }

    fn reader(&self) -> Option<Box<dyn Image>> {
        Some(Box::new(RawImage {
            path: self.path.clone(),
            storage: self.storage.reopen_read_only()?,
            size_bytes: self.size_bytes,
            poisoned: false,
        }))
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned {
                path: self.path.clone(),
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_zero_read_and_bounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.img");
        let mut img = RawImage::create(&p, 1 << 20).expect("create");
        img.write_at(4096, &[0xab; 8192]).expect("write");
        img.write_zeroes(8192, 4096).expect("zero");
        img.flush().expect("flush");
        let mut buf = vec![0u8; 12288];
        img.read_at(4096, &mut buf).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 0xab));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..].iter().all(|&b| b == 0));
        assert!(matches!(
            img.write_at((1 << 20) - 1, &[1, 2]),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(
            RawImage::create(&p, 1 << 20).is_err(),
            "create must not clobber"
        );
        assert_eq!(
            RawImage::open(&p, false).expect("open").size_bytes(),
            1 << 20
        );
    }

    #[test]
    fn holes_are_known_without_reading_and_data_never_looks_like_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("h.img");
        let mut img = RawImage::create(&p, 8 << 20).expect("create");
        assert!(img.is_hole(0, 8 << 20));
        img.write_at(3 << 20, &[1u8; 4096]).expect("write");
        assert!(!img.is_hole(0, 8 << 20));
        assert!(!img.is_hole((3 << 20) + 4095, 1));
        assert!(img.is_hole(4 << 20, 4 << 20));
        img.write_zeroes(3 << 20, 1 << 20).expect("punch");
        assert!(img.is_hole(0, 8 << 20));
        assert!(!img.is_hole(8 << 20, 1), "beyond the end is no hole");
    }
}
