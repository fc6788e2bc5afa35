//! Dynamic VHD written in place (FORMATS.md §2.3, §2.6):
//!
//! ```text
//! 0          footer copy (the "head"; qemu reads this one)
//! 512        dynamic header
//! 1536       BAT, 0xFFFFFFFF = unallocated
//! …          blocks in allocation order: [hole][bitmap][2 MiB data], data
//!            4 KiB-aligned (header::DATA_ALIGN_BYTES)
//! end        footer (the "tail"; libvhdi and Hyper-V read this one),
//!            byte-identical to the head
//! ```
//!
//! Commit protocol. A batch is everything written since the last flush.
//! - A write into an allocated block overwrites it in place. A non-zero
//!   write into an unallocated block appends a block: first the footer at
//!   the new end of the file, then the hole and an all-ones bitmap over the
//!   old tail footer, then the data (the rest of the block is a hole and
//!   reads as zero, which is what all-ones means for a dynamic disk, as
//!   qemu does). The BAT entry changes in memory only.
//! - `flush`: sync; write the changed bitmap sectors (foreign blocks only)
//!   and BAT sectors; sync.
//!
//! Why these two syncs and no others:
//! - The first is the barrier that makes every BAT entry and bitmap bit
//!   point at durable data: without it the device may persist the BAT
//!   sector before the block, and the disk would read old file bytes (or
//!   a hole past a shorter file, which qemu calls a truncated image).
//! - The second is the flush contract: the new BAT entries are the only
//!   way to reach this batch's new blocks.
//! - The tail footer needs no sync of its own. Writing it before the block
//!   means that at every syscall boundary the file ends with a valid
//!   footer, so a killed process (page cache intact) leaves an image every
//!   reader opens as it is. It also extends the file over the whole new
//!   block, so a block only partly written still lies inside the file
//!   (qemu refuses a BAT entry whose block passes the end of the file). After a power cut the unsynced tail may be
//!   missing or followed by orphan block bytes; that is all a cut can
//!   leave, because the head copy, the header and, for referenced blocks,
//!   the data never depend on unsynced writes. The next writable open
//!   repairs it (see below); qemu, which reads the head, needs nothing.
//! - In-place overwrites are ordered by nothing: a cut gives each sector
//!   its old or its new bytes, as on a disk. A BAT sector is assumed to be
//!   written atomically (512-byte sector atomicity).
//!
//! Recovery on a writable open: the blocks end at `end = max(end of the
//! metadata, end of every BAT-referenced block)`; unless the file is
//! exactly `end` plus a tail equal to the head copy, the head copy is
//! written at `end` and the file cut to `end + 512`, dropping blocks no
//! BAT entry points at (FORMATS.md §2.6, "Recovery").
//!
//! VHD has no zero state and no free-space map (FORMATS.md §2.6), so
//! `write_zeroes` leaves unallocated blocks alone and punches holes in the
//! data of allocated ones, which stay allocated and read as zeros.

use std::collections::{BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use super::footer::{
    Footer, DISK_TYPE_DIFFERENCING, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, FOOTER_BYTES,
    QEMU_MAX_BYTES,
};
use super::header::{
    bit, decode_bat, encode_bat, place_block, set_bit, DynamicHeader, BAT_OFFSET, BAT_UNUSED,
    HEADER_BYTES, HEADER_OFFSET, SECTOR_BYTES,
};
use crate::image::storage::{FileStorage, Storage};
use crate::image::vmdk::sparse::is_zero;
use crate::image::{DiskUuid, Image, ImageError};

/// The largest dynamic VHD we create: qemu refuses to open anything
/// bigger ("File too large", `VHD_MAX_SECTORS`; FORMATS.md §2.4).
pub const MAX_SIZE_BYTES: u64 = QEMU_MAX_BYTES;

/// A dynamic VHD open as a live image.
pub struct DynamicVhd {
    path: PathBuf,
    storage: Box<dyn Storage>,
    footer: Footer,
    /// The head copy's bytes: every tail footer we write is this, so the
    /// two stay byte-identical (FORMATS.md §2.3) even for foreign images.
    footer_bytes: [u8; FOOTER_BYTES],
    header: DynamicHeader,
    /// Every entry of the table (also those past the disk's end), as on disk
    /// plus this batch's allocations.
    bat: Vec<u32>,
    /// Bitmaps of allocated blocks read so far: None = every sector has
    /// data (all ours, all qemu's); Some = a foreign block with sectors
    /// marked unwritten, which read as zeros.
    bitmaps: HashMap<u64, Option<Box<[u8]>>>,
    dirty_bat_sectors: BTreeSet<u64>,
    dirty_bitmaps: BTreeSet<u64>,
    /// Where the blocks end and the tail footer starts.
    end_bytes: u64,
    writable: bool,
    poisoned: bool,
}

fn format_err(path: &Path, message: impl Into<String>) -> ImageError {
    ImageError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Refuses sizes a dynamic VHD cannot hold; checked before any file exists.
pub(crate) fn check_create_size(path: &Path, size_bytes: u64) -> Result<(), ImageError> {
    if size_bytes > MAX_SIZE_BYTES {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            size_bytes,
            max_bytes: MAX_SIZE_BYTES,
            format: "a dynamic VHD (qemu opens at most 2040 GiB; use vhd-fixed or vmdk)",
        });
    }
    if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(ImageError::Create {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "size must be a non-zero multiple of 512 bytes",
            ),
        });
    }
    Ok(())
}

impl DynamicVhd {
    /// Creates `path` (which must not exist) as an empty dynamic VHD of
    /// `size_bytes` (a multiple of 512, at most [`MAX_SIZE_BYTES`])
    /// carrying `uuid` as its unique id. A size too large is refused
    /// before the file is made.
    pub fn create_file(
        path: &Path,
        size_bytes: u64,
        uuid: DiskUuid,
    ) -> Result<DynamicVhd, ImageError> {
        check_create_size(path, size_bytes)?;
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

    /// Opens a dynamic VHD (ours, qemu's, Hyper-V's); when `writable`,
    /// repairs what a crash can leave (module doc).
    pub fn open_file(path: &Path, writable: bool) -> Result<DynamicVhd, ImageError> {
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

    /// Lays out a new image on empty `storage` (tests use
    /// [`crate::image::storage::CrashStorage`]).
    pub fn create(
        mut storage: Box<dyn Storage>,
        path: &Path,
        size_bytes: u64,
        uuid: DiskUuid,
    ) -> Result<DynamicVhd, ImageError> {
        check_create_size(path, size_bytes)?;
        let create_err = |source| ImageError::Create {
            path: path.to_path_buf(),
            source,
        };
        if storage.len().map_err(create_err)? != 0 {
            return Err(create_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file is not empty",
            )));
        }
        let footer = Footer::dynamic(size_bytes, uuid, HEADER_OFFSET);
        let footer_bytes = footer.encode();
        let header = DynamicHeader::new(size_bytes);
        let bat = vec![BAT_UNUSED; header.max_table_entries as usize];
        let end_bytes = BAT_OFFSET + header.bat_bytes();
        let mut bat_bytes = encode_bat(&bat);
        bat_bytes.resize(header.bat_bytes() as usize, 0xff);
        // The head copy last: it is what makes the file a dynamic VHD for
        // qemu and `probe`, so a create cut short leaves no image.
        let mut steps = || -> std::io::Result<()> {
            storage.write_at(&header.encode(), HEADER_OFFSET)?;
            storage.write_at(&bat_bytes, BAT_OFFSET)?;
            storage.write_at(&footer_bytes, end_bytes)?;
            storage.sync()?;
            storage.write_at(&footer_bytes, 0)?;
            storage.sync()
        };
        steps().map_err(create_err)?;
        Ok(DynamicVhd {
            path: path.to_path_buf(),
            storage,
            footer,
            footer_bytes,
            header,
            bat,
            bitmaps: HashMap::new(),
            dirty_bat_sectors: BTreeSet::new(),
            dirty_bitmaps: BTreeSet::new(),
            end_bytes,
            writable: true,
            poisoned: false,
        })
    }

    /// Opens the image on `storage`; when `writable`, repairs the tail.
    pub fn open(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
    ) -> Result<DynamicVhd, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let read = |storage: &dyn Storage, buf: &mut [u8], at: u64| {
            storage.read_at(buf, at).map_err(|source| ImageError::Read {
                path: path.to_path_buf(),
                offset_bytes: at,
                source,
            })
        };
        let fmt = |m: String| format_err(path, m);
        let len = storage.len().map_err(open_err)?;
        if len < (FOOTER_BYTES + HEADER_BYTES) as u64 {
            return Err(fmt(format!("{len} bytes is too short for a dynamic VHD")));
        }
        let mut footer_bytes = [0u8; FOOTER_BYTES];
        read(storage.as_ref(), &mut footer_bytes, 0)?;
        let footer = Footer::decode(&footer_bytes)
            .map_err(|e| fmt(format!("footer copy at offset 0: {e}")))?;
        match footer.disk_type {
            DISK_TYPE_DYNAMIC => {}
            DISK_TYPE_DIFFERENCING => {
                return Err(fmt(
                    "a differencing VHD (needs its parent): not supported".into()
                ))
            }
            DISK_TYPE_FIXED => return Err(fmt("a fixed VHD, not a dynamic one".into())),
            t => return Err(fmt(format!("disk type {t}"))),
        }
        let size = footer.current_size;
        if size == 0 || !size.is_multiple_of(SECTOR_BYTES) {
            return Err(fmt(format!("virtual size {size} is not whole sectors")));
        }
        let h_at = footer.data_offset;
        let h_end = h_at.checked_add(HEADER_BYTES as u64);
        if h_at < FOOTER_BYTES as u64
            || !h_at.is_multiple_of(SECTOR_BYTES)
            || h_end.is_none_or(|e| e > len)
        {
            return Err(fmt(format!("dynamic header offset {h_at}")));
        }
        let mut hb = [0u8; HEADER_BYTES];
        read(storage.as_ref(), &mut hb, h_at)?;
        let header = DynamicHeader::decode(&hb).map_err(|e| fmt(format!("dynamic header: {e}")))?;
        header
            .check(size, len)
            .map_err(|m| fmt(format!("dynamic header: {m}")))?;
        let bat_end = header.table_offset + header.bat_bytes();
        let h_end = h_at + HEADER_BYTES as u64;
        if header.table_offset < FOOTER_BYTES as u64
            || (header.table_offset < h_end && h_at < bat_end)
        {
            return Err(fmt(format!(
                "BAT at {} overlaps the header or the footer copy",
                header.table_offset
            )));
        }
        // Bounded: check() put the table inside the file.
        let mut b = vec![0u8; header.bat_bytes() as usize];
        read(storage.as_ref(), &mut b, header.table_offset)?;
        let mut bat = decode_bat(&b);
        bat.truncate(header.max_table_entries as usize);
        let meta_end = bat_end.max(h_end);
        let block_span = header.bitmap_bytes() + u64::from(header.block_bytes);
        let mut end_bytes = meta_end;
        for (i, &e) in bat.iter().enumerate() {
            if e == BAT_UNUSED {
                continue;
            }
            let at = u64::from(e) * SECTOR_BYTES;
            if at < meta_end {
                return Err(fmt(format!(
                    "BAT entry {i} points at byte {at}, inside the metadata"
                )));
            }
            if at + block_span > len {
                return Err(fmt(format!(
                    "block {i} at byte {at} passes the end of the file ({len} bytes): a truncated image"
                )));
            }
            end_bytes = end_bytes.max(at + block_span);
        }
        let mut img = DynamicVhd {
            path: path.to_path_buf(),
            storage,
            footer,
            footer_bytes,
            header,
            bat,
            bitmaps: HashMap::new(),
            dirty_bat_sectors: BTreeSet::new(),
            dirty_bitmaps: BTreeSet::new(),
            end_bytes,
            writable,
            poisoned: false,
        };
        let mut tail = [0u8; FOOTER_BYTES];
        img.storage
            .read_at(&mut tail, len - FOOTER_BYTES as u64)
            .map_err(|e| img.read_err(len - FOOTER_BYTES as u64, e))?;
        let sound = len == end_bytes + FOOTER_BYTES as u64 && tail == img.footer_bytes;
        if !sound && writable {
            tracing::warn!(
                "{}: the footer is not where the blocks end ({} bytes after them); \
                 restoring it from the head copy and dropping unreferenced blocks",
                path.display(),
                len as i128 - end_bytes as i128
            );
            let fb = img.footer_bytes;
            img.storage
                .write_at(&fb, end_bytes)
                .map_err(|e| img.write_err(end_bytes, e))?;
            let new_len = end_bytes + FOOTER_BYTES as u64;
            img.storage
                .set_len(new_len)
                .map_err(|e| img.write_err(new_len, e))?;
            img.sync()?;
        }
        Ok(img)
    }

    /// The footer's unique id.
    pub fn uuid(&self) -> DiskUuid {
        self.footer.uuid
    }

    /// The head footer as read or written.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes; dropping does the same but can only log a failure.
    pub fn close(mut self) -> Result<(), ImageError> {
        let r = self.flush();
        self.writable = false;
        r
    }

    fn block_bytes(&self) -> u64 {
        u64::from(self.header.block_bytes)
    }

    fn write_err(&mut self, offset_bytes: u64, source: std::io::Error) -> ImageError {
        self.poisoned = true;
        ImageError::Write {
            path: self.path.clone(),
            offset_bytes,
            source,
        }
    }

    fn read_err(&self, offset_bytes: u64, source: std::io::Error) -> ImageError {
        ImageError::Read {
            path: self.path.clone(),
            offset_bytes,
            source,
        }
    }

    fn sync(&mut self) -> Result<(), ImageError> {
        self.storage.sync().map_err(|source| {
            self.poisoned = true;
            ImageError::Sync {
                path: self.path.clone(),
                source,
            }
        })
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

    /// Byte offset of block `b`'s data, if it is allocated.
    fn data_offset(&self, b: u64) -> Option<u64> {
        match self.bat[b as usize] {
            BAT_UNUSED => None,
            e => Some(u64::from(e) * SECTOR_BYTES + self.header.bitmap_bytes()),
        }
    }

    /// Reads block `b`'s bitmap into the cache (allocated blocks only).
    fn load_bitmap(&mut self, b: u64) -> Result<(), ImageError> {
        if self.bitmaps.contains_key(&b) {
            return Ok(());
        }
        let at = u64::from(self.bat[b as usize]) * SECTOR_BYTES;
        let mut bits = vec![0u8; self.header.bitmap_bytes() as usize];
        self.storage
            .read_at(&mut bits, at)
            .map_err(|e| self.read_err(at, e))?;
        let sectors = self.block_bytes() / SECTOR_BYTES;
        let full = (0..sectors).all(|s| bit(&bits, s));
        self.bitmaps
            .insert(b, (!full).then(|| bits.into_boxed_slice()));
        Ok(())
    }

    /// Appends block `b` (module doc) and returns its data offset.
    fn allocate(&mut self, b: u64) -> Result<u64, ImageError> {
        let bitmap_bytes = self.header.bitmap_bytes();
        let bitmap_at = place_block(self.end_bytes, bitmap_bytes);
        let sector = bitmap_at / SECTOR_BYTES;
        if sector >= u64::from(BAT_UNUSED) {
            let e =
                std::io::Error::other("no room for another block: BAT entries are 32-bit sectors");
            return Err(self.write_err(bitmap_at, e));
        }
        let data_at = bitmap_at + bitmap_bytes;
        let new_end = data_at + self.block_bytes();
        // FORMATS.md §2.6 step 2: the footer moves first, so the file ends
        // with one whatever happens next.
        let fb = self.footer_bytes;
        self.storage
            .write_at(&fb, new_end)
            .map_err(|e| self.write_err(new_end, e))?;
        let mut head = vec![0u8; (data_at - self.end_bytes) as usize];
        head[(bitmap_at - self.end_bytes) as usize..].fill(0xff);
        let at = self.end_bytes;
        self.storage
            .write_at(&head, at)
            .map_err(|e| self.write_err(at, e))?;
        self.end_bytes = new_end;
        self.bat[b as usize] = sector as u32;
        self.dirty_bat_sectors.insert(b * 4 / SECTOR_BYTES);
        self.bitmaps.insert(b, None);
        Ok(data_at)
    }

    /// Writes `piece` at `within` of allocated block `b`.
    fn write_allocated(
        &mut self,
        b: u64,
        data_at: u64,
        within: u64,
        piece: &[u8],
    ) -> Result<(), ImageError> {
        self.load_bitmap(b)?;
        let s0 = within / SECTOR_BYTES;
        let s1 = (within + piece.len() as u64).div_ceil(SECTOR_BYTES);
        let partial = match self.bitmaps.get(&b) {
            Some(Some(bits)) => !(s0..s1).all(|s| bit(bits, s)),
            _ => false,
        };
        if !partial {
            let at = data_at + within;
            return self
                .storage
                .write_at(piece, at)
                .map_err(|e| self.write_err(at, e));
        }
        // A foreign block with unwritten sectors: they read as zeros, and
        // may hold anything on disk, so the sectors this write marks as
        // written get zeros wherever the write does not cover them.
        let lo = s0 * SECTOR_BYTES;
        let mut buf = vec![0u8; ((s1 - s0) * SECTOR_BYTES) as usize];
        self.storage
            .read_at(&mut buf, data_at + lo)
            .map_err(|e| self.read_err(data_at + lo, e))?;
        if let Some(Some(bits)) = self.bitmaps.get_mut(&b) {
            for s in s0..s1 {
                if !bit(bits, s) {
                    let i = ((s - s0) * SECTOR_BYTES) as usize;
                    buf[i..i + SECTOR_BYTES as usize].fill(0);
                    set_bit(bits, s);
                }
            }
        }
        let i = (within - lo) as usize;
        buf[i..i + piece.len()].copy_from_slice(piece);
        self.storage
            .write_at(&buf, data_at + lo)
            .map_err(|e| self.write_err(data_at + lo, e))?;
        // Bits go to disk at the next flush, after the data (module doc).
        self.dirty_bitmaps.insert(b);
        Ok(())
    }
}

impl Image for DynamicVhd {
    fn size_bytes(&self) -> u64 {
        self.footer.current_size
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, data.len() as u64, true)?;
        let bb = self.block_bytes();
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset_bytes + pos as u64;
            let b = at / bb;
            let within = at % bb;
            let n = (bb - within).min((data.len() - pos) as u64) as usize;
            let piece = &data[pos..pos + n];
            match self.data_offset(b) {
                Some(data_at) => self.write_allocated(b, data_at, within, piece)?,
                None if is_zero(piece) => {}
                None => {
                    let data_at = self.allocate(b)?;
                    let at = data_at + within;
                    self.storage
                        .write_at(piece, at)
                        .map_err(|e| self.write_err(at, e))?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        self.check(offset_bytes, len_bytes, true)?;
        let bb = self.block_bytes();
        let end = offset_bytes + len_bytes;
        let mut at = offset_bytes;
        while at < end {
            let b = at / bb;
            let within = at % bb;
            let n = (bb - within).min(end - at);
            if let Some(data_at) = self.data_offset(b) {
                let o = data_at + within;
                self.storage
                    .punch_hole(o, n)
                    .map_err(|e| self.write_err(o, e))?;
            }
            at += n;
        }
        Ok(())
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, buf.len() as u64, false)?;
        let bb = self.block_bytes();
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset_bytes + pos as u64;
            let b = at / bb;
            let within = at % bb;
            let n = (bb - within).min((buf.len() - pos) as u64) as usize;
            let piece = &mut buf[pos..pos + n];
            match self.data_offset(b) {
                None => piece.fill(0),
                Some(data_at) => {
                    self.storage
                        .read_at(piece, data_at + within)
                        .map_err(|e| self.read_err(data_at + within, e))?;
                    self.load_bitmap(b)?;
                    if let Some(Some(bits)) = self.bitmaps.get(&b) {
                        let s0 = within / SECTOR_BYTES;
                        let s1 = (within + n as u64).div_ceil(SECTOR_BYTES);
                        for s in (s0..s1).filter(|&s| !bit(bits, s)) {
                            let lo = (s * SECTOR_BYTES).max(within) - within;
                            let hi = ((s + 1) * SECTOR_BYTES).min(within + n as u64) - within;
                            piece[lo as usize..hi as usize].fill(0);
                        }
                    }
                }
            }
            pos += n;
        }
        Ok(())
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
        // Barrier: blocks, bitmaps and data before the pointers to them.
        self.sync()?;
        if self.dirty_bat_sectors.is_empty() && self.dirty_bitmaps.is_empty() {
            return Ok(());
        }
        for b in std::mem::take(&mut self.dirty_bitmaps) {
            let bytes = match self.bitmaps.get(&b) {
                Some(Some(bits)) => bits.to_vec(),
                _ => continue,
            };
            let at = u64::from(self.bat[b as usize]) * SECTOR_BYTES;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.write_err(at, e))?;
        }
        let per = (SECTOR_BYTES / 4) as usize;
        for s in std::mem::take(&mut self.dirty_bat_sectors) {
            let lo = s as usize * per;
            let hi = (lo + per).min(self.bat.len());
            let bytes = encode_bat(&self.bat[lo..hi]);
            let at = self.header.table_offset + s * SECTOR_BYTES;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.write_err(at, e))?;
        }
        self.sync()
    }
}

impl Drop for DynamicVhd {
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

    const U: DiskUuid = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6];

    fn fresh(size: u64) -> (CrashStorage, DynamicVhd) {
        let s = CrashStorage::new(Vec::new(), None);
        let img =
            DynamicVhd::create(Box::new(s.clone()), Path::new("t.vhd"), size, U).expect("create");
        (s, img)
    }

    #[test]
    fn writes_read_back_and_zero_blocks_stay_unallocated() {
        let (s, mut img) = fresh(10 << 20);
        assert_eq!(s.live().len(), 1536 + 512 + 512);
        img.write_at(100, &[7u8; 70000]).expect("write");
        img.write_at(4 << 20, &vec![0u8; 2 << 20])
            .expect("zero data");
        img.write_zeroes(6 << 20, 2 << 20).expect("zero range");
        img.flush().expect("flush");
        let live = s.live();
        let data_at = 4096u64;
        assert_eq!(live.len() as u64, data_at + (2 << 20) + 512, "one block");
        assert_eq!(&live[..512], &live[live.len() - 512..], "tail = head");
        let mut b = vec![1u8; 200000];
        img.read_at(0, &mut b).expect("read");
        assert!(b[..100].iter().all(|&x| x == 0));
        assert!(b[100..70100].iter().all(|&x| x == 7));
        assert!(b[70100..].iter().all(|&x| x == 0));
        img.write_zeroes(1000, 1000).expect("zero");
        img.read_at(0, &mut b).expect("read");
        assert!(b[1000..2000].iter().all(|&x| x == 0));
        assert!(b[2000..70100].iter().all(|&x| x == 7));
        img.close().expect("close");
        let img = DynamicVhd::open(Box::new(s.clone()), Path::new("t.vhd"), false).expect("reopen");
        assert_eq!(img.uuid(), U);
        assert_eq!(img.size_bytes(), 10 << 20);
    }

    #[test]
    fn a_lost_tail_and_orphans_are_repaired_on_a_writable_open() {
        // Syncs: 2 at create, 2 per flush; the 4th (first batch's BAT) is
        // cut, so the block is durable but unreferenced.
        let s = CrashStorage::new(Vec::new(), Some(3));
        let mut img = DynamicVhd::create(Box::new(s.clone()), Path::new("o.vhd"), 8 << 20, U)
            .expect("create");
        img.write_at(0, &[1u8; 4096]).expect("write");
        img.flush().expect("flush (the cut is silent)");
        assert!(s.crashed());
        drop(img);
        let durable = s.durable();
        let meta_end = 1536 + 512;
        assert!(durable.len() > meta_end + 512, "an orphan block");
        let s = CrashStorage::new(durable, None);
        let mut img =
            DynamicVhd::open(Box::new(s.clone()), Path::new("o.vhd"), true).expect("open");
        let live = s.live();
        assert_eq!(live.len(), meta_end + 512, "orphan dropped");
        assert_eq!(&live[..512], &live[meta_end..]);
        let mut b = vec![1u8; 8192];
        img.read_at(0, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn foreign_partial_bitmaps_are_honoured_and_kept_consistent() {
        let (s, mut img) = fresh(4 << 20);
        img.write_at(0, &[5u8; 2 << 20]).expect("write");
        img.close().expect("close");
        // As Hyper-V writes it: only sectors 0..8 marked, garbage after.
        let mut bytes = s.durable();
        let bitmap_at = 4096 - 512;
        bytes[bitmap_at..bitmap_at + 512].fill(0);
        bytes[bitmap_at] = 0xff;
        let s = CrashStorage::new(bytes, None);
        let mut img =
            DynamicVhd::open(Box::new(s.clone()), Path::new("f.vhd"), true).expect("open");
        let mut b = vec![0u8; 8192];
        img.read_at(0, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 5));
        assert!(
            b[4096..].iter().all(|&x| x == 0),
            "unmarked sectors read zero"
        );
        img.write_at(4096 + 100, &[6u8; 10])
            .expect("write into an unmarked sector");
        img.close().expect("close");
        let mut img =
            DynamicVhd::open(Box::new(s.clone()), Path::new("f.vhd"), false).expect("reopen");
        img.read_at(0, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 5));
        assert!(
            b[4096..4196].iter().all(|&x| x == 0),
            "zeros, not the garbage"
        );
        assert!(b[4196..4206].iter().all(|&x| x == 6));
        assert!(b[4206..].iter().all(|&x| x == 0));
        let live = s.live();
        assert_eq!(live[bitmap_at + 1], 0x80, "sector 8 marked on disk");
    }

    #[test]
    fn too_large_is_refused_and_garbage_never_panics() {
        let s = CrashStorage::new(Vec::new(), None);
        let e = DynamicVhd::create(
            Box::new(s.clone()),
            Path::new("b.vhd"),
            MAX_SIZE_BYTES + 512,
            U,
        )
        .err()
        .expect("too large");
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        assert!(s.live().is_empty());
        let (s, img) = fresh(3 << 20);
        drop(img);
        let good = s.durable();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len().min(4096);
                b[i] = (x >> 40) as u8;
            }
            let s = CrashStorage::new(b, None);
            if let Ok(mut img) = DynamicVhd::open(Box::new(s), Path::new("f.vhd"), true) {
                let mut buf = vec![0u8; 3 << 20];
                let _ = img.read_at(0, &mut buf);
                let _ = img.write_at(1 << 20, &[1u8; 4096]);
            }
        }
    }
}
