//! monolithicSparse written in place: one file holding the header, the
//! embedded descriptor, the grain directory and tables (each twice: the
//! redundant copies VMware checks after a crash) and 64 KiB grains appended
//! in allocation order. The layout is qemu's (FORMATS.md §1.5), so qemu and
//! VMware's hosted products open what we write and we open what they write.
//!
//! Commit protocol (FORMATS.md §1.7; data first, then pointer):
//! - `write_at` into an allocated grain overwrites it in place; into an
//!   unallocated one it appends a full grain at the grain-aligned end of
//!   the file (the rest zero) and changes the GTE in memory only.
//! - `flush` writes any grain table made for this batch (it is not yet
//!   referenced), syncs (data barrier), then writes the changed GT sectors
//!   to the GT and the redundant GT and any changed GD sector to the GD and
//!   the redundant GD, and syncs again. GTs are preallocated at create, so
//!   for our images the GD never changes.
//! - A crash before the second sync leaves grains no GTE points at yet:
//!   orphans at the end of the file, a leak and never a broken pointer. The
//!   header's uncleanShutdown byte is set while the image is open for
//!   writing; the next writable open then checks the metadata, copies the
//!   GD/GTs over torn redundant copies and truncates the orphans away.
//! - All-zero data never allocates a grain. `write_zeroes` leaves
//!   unallocated grains alone and punches the allocated ones out of the
//!   host file: they stay allocated (no metadata changes) and read as zeros.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::descriptor;
use super::sparse_header::{
    HeaderError, Layout, SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_REDUNDANT_GT,
    FLAG_ZEROED_GTE, GD_AT_END, GRAIN_SECTORS, MAX_DESCRIPTOR_SECTORS, SECTOR_BYTES,
};
use crate::image::storage::Storage;
use crate::image::{DiskUuid, Image, ImageError};

/// GTE value of an unallocated grain (technote "Grain Table Entry": 0).
const GTE_UNALLOCATED: u32 = 0;
/// GTE value of a zeroed grain when flag bit 2 is set (technote "Version 2 Hosted Sparse Extents").
const GTE_ZEROED: u32 = 1;

/// Grain starts are 32-bit sector numbers, so no byte of grain data may
/// start at or past 2^32 sectors (FORMATS.md §1.5, qemu VMDK_EXTENT_MAX_SECTORS).
const ADDRESSABLE_SECTORS: u64 = 1 << 32;

/// The largest disk a monolithicSparse extent can hold with every grain
/// allocated: capacity plus the preallocated metadata must fit below 2^32
/// sectors (2 TiB minus about 257 MiB of metadata).
pub fn max_size_bytes() -> u64 {
    let mut cap = ADDRESSABLE_SECTORS - GRAIN_SECTORS;
    while Layout::new(cap).overhead_sectors + cap > ADDRESSABLE_SECTORS {
        cap -= GRAIN_SECTORS;
    }
    cap * SECTOR_BYTES
}

/// What went wrong while reading or checking sparse metadata.
#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    #[error("header: {0}")]
    DecodeHeader(#[from] HeaderError),
    #[error("embedded descriptor: {0}")]
    ParseDescriptor(#[from] descriptor::DescriptorError),
    #[error("{0}")]
    CheckLayout(String),
    #[error("grain table {gt} entry {entry} points at sector {sector}, inside the metadata")]
    CheckGte { gt: u64, entry: u64, sector: u64 },
    #[error("compressed (streamOptimized) extents are export-only, not live images")]
    OpenCompressed,
    #[error("no room for another grain: the extent would pass 2^32 sectors")]
    AllocateGrain,
}

pub struct SparseImage {
    path: PathBuf,
    storage: Box<dyn Storage>,
    header: SparseHeader,
    /// The embedded descriptor text (without its NUL padding).
    descriptor: String,
    uuid: Option<DiskUuid>,
    writable: bool,
    poisoned: bool,
    /// The CID has been changed in this session (on the first write).
    cid_bumped: bool,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    /// Grain tables read so far (or made), by GD index.
    gts: Vec<Option<Box<[u32]>>>,
    /// GT sectors changed since the last flush: (GT index, sector in GT).
    dirty_gt_sectors: BTreeSet<(u64, u64)>,
    /// GTs made since the last flush (not yet referenced on disk).
    new_gts: BTreeSet<u64>,
    /// GD sectors changed since the last flush.
    dirty_gd_sectors: BTreeSet<u64>,
    /// Sector where the next grain goes (grain-aligned end of file).
    next_free_sector: u64,
}

/// True if every byte is zero.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    let mut acc = 0u128;
    for c in &mut chunks {
        let mut x = [0u8; 16];
        x.copy_from_slice(c);
        acc |= u128::from_ne_bytes(x);
        if acc != 0 {
            return false;
        }
    }
    acc == 0 && chunks.remainder().iter().all(|&b| b == 0)
}

fn le_u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn le_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A contiguous piece of caller data going to one place in the file.
struct Run {
    file_offset: u64,
    data_lo: usize,
    data_hi: usize,
}

impl SparseImage {
    /// Lays out a new, empty extent of `size_bytes` on empty `storage`.
    pub fn create(
        mut storage: Box<dyn Storage>,
        path: &Path,
        size_bytes: u64,
        uuid: &DiskUuid,
    ) -> Result<SparseImage, ImageError> {
        let create_err = |source| ImageError::Create {
            path: path.to_path_buf(),
            source,
        };
        let invalid =
            |m: &str| create_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, m));
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(invalid("size must be a non-zero multiple of 512 bytes"));
        }
        let max_bytes = max_size_bytes();
        if size_bytes > max_bytes {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                size_bytes,
                max_bytes,
                format: "a monolithicSparse VMDK (use the flat vmdk format)",
            });
        }
        if storage.len().map_err(create_err)? != 0 {
            return Err(create_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the file is not empty",
            )));
        }
        let capacity = size_bytes / SECTOR_BYTES;
        let mut header = SparseHeader::monolithic(capacity);
        let layout = Layout::new(capacity);
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("disk.vmdk");
        let text = descriptor::sparse("monolithicSparse", size_bytes, file_name, uuid);
        let room = (header.descriptor_sectors * SECTOR_BYTES) as usize;
        if text.len() >= room {
            return Err(invalid(
                "the file name is too long for the embedded descriptor",
            ));
        }
        let mut desc = text.clone().into_bytes();
        desc.resize(room, 0);
        let gd: Vec<u32> = (0..layout.gt_count)
            .map(|i| layout.gt_at(i, false) as u32)
            .collect();
        let rgd: Vec<u32> = (0..layout.gt_count)
            .map(|i| layout.gt_at(i, true) as u32)
            .collect();
        // Everything but the header first: a create cut short leaves a
        // file without the magic, which nothing takes for an image.
        let mut steps = || -> std::io::Result<()> {
            storage.set_len(header.overhead_sectors * SECTOR_BYTES)?;
            storage.write_at(&desc, header.descriptor_offset_sectors * SECTOR_BYTES)?;
            storage.write_at(&le_bytes(&rgd), header.rgd_offset_sectors * SECTOR_BYTES)?;
            storage.write_at(&le_bytes(&gd), header.gd_offset_sectors * SECTOR_BYTES)?;
            storage.sync()?;
            header.unclean_shutdown = true;
            storage.write_at(&header.encode(), 0)?;
            storage.sync()
        };
        steps().map_err(create_err)?;
        Ok(SparseImage {
            path: path.to_path_buf(),
            storage,
            uuid: Some(*uuid),
            writable: true,
            poisoned: false,
            cid_bumped: true,
            gts: (0..layout.gt_count).map(|_| None).collect(),
            gd,
            rgd: Some(rgd),
            dirty_gt_sectors: BTreeSet::new(),
            new_gts: BTreeSet::new(),
            dirty_gd_sectors: BTreeSet::new(),
            next_free_sector: header.overhead_sectors,
            header,
            descriptor: text,
        })
    }

    /// Opens an extent; when `writable`, repairs what a crash can leave
    /// (see the module doc) and marks it open (uncleanShutdown).
    pub fn open(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
    ) -> Result<SparseImage, ImageError> {
        let mut img = Self::read_metadata(storage, path, writable)?;
        if writable {
            if img.header.unclean_shutdown {
                img.repair()?;
            }
            if img.storage_len()? < img.header.overhead_sectors * SECTOR_BYTES {
                tracing::warn!(
                    "{}: file shorter than its metadata area; extending it",
                    path.display()
                );
                let len = img.header.overhead_sectors * SECTOR_BYTES;
                img.storage
                    .set_len(len)
                    .map_err(|e| img.write_err(len, e))?;
                img.next_free_sector = img.header.overhead_sectors;
            }
            img.header.unclean_shutdown = true;
            let h = img.header.encode();
            img.storage
                .write_at(&h, 0)
                .map_err(|e| img.write_err(0, e))?;
            img.sync()?;
        }
        Ok(img)
    }

    fn format_err(path: &Path, e: impl std::fmt::Display) -> ImageError {
        ImageError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    fn read_metadata(
        storage: Box<dyn Storage>,
        path: &Path,
        writable: bool,
    ) -> Result<SparseImage, ImageError> {
        let read = |storage: &dyn Storage, buf: &mut [u8], sector: u64| {
            storage
                .read_at(buf, sector * SECTOR_BYTES)
                .map_err(|source| ImageError::Read {
                    path: path.to_path_buf(),
                    offset_bytes: sector * SECTOR_BYTES,
                    source,
                })
        };
        let fmt = |e: SparseError| Self::format_err(path, e);
        let layout_err = |m: String| fmt(SparseError::CheckLayout(m));
        let file_len = storage.len().map_err(|source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let file_sectors = file_len / SECTOR_BYTES;
        let mut hb = [0u8; 512];
        read(storage.as_ref(), &mut hb, 0)?;
        let header = SparseHeader::decode(&hb).map_err(|e| fmt(e.into()))?;
        if header.flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0 {
            return Err(fmt(SparseError::OpenCompressed));
        }
        let within = |what: &str, start: u64, sectors: u64| -> Result<(), ImageError> {
            match start.checked_add(sectors) {
                Some(end) if start > 0 && end <= file_sectors => Ok(()),
                _ => Err(layout_err(format!(
                    "{what} at sector {start} (+{sectors}) lies outside the file ({file_sectors} sectors)"
                ))),
            }
        };
        if header.overhead_sectors > ADDRESSABLE_SECTORS {
            return Err(layout_err(format!(
                "metadata of {} sectors passes 2^32 sectors",
                header.overhead_sectors
            )));
        }
        if header.descriptor_offset_sectors == 0 {
            return Err(layout_err(
                "no embedded descriptor (an extent of a split image)".into(),
            ));
        }
        if header.descriptor_sectors == 0 || header.descriptor_sectors > MAX_DESCRIPTOR_SECTORS {
            return Err(layout_err(format!(
                "descriptor size {} sectors",
                header.descriptor_sectors
            )));
        }
        within(
            "descriptor",
            header.descriptor_offset_sectors,
            header.descriptor_sectors,
        )?;
        let mut db = vec![0u8; (header.descriptor_sectors * SECTOR_BYTES) as usize];
        read(storage.as_ref(), &mut db, header.descriptor_offset_sectors)?;
        let (text, desc) = descriptor::parse_bytes(&db).map_err(|e| fmt(e.into()))?;
        if !desc.create_type.eq_ignore_ascii_case("monolithicSparse") {
            return Err(layout_err(format!(
                "createType {:?} is not monolithicSparse",
                desc.create_type
            )));
        }
        if header.gd_offset_sectors == GD_AT_END {
            return Err(layout_err("grain directory at the end (a stream)".into()));
        }
        let gd_len = header.gd_sectors();
        within("grain directory", header.gd_offset_sectors, gd_len)?;
        let gt_count = header.gt_count() as usize;
        let mut b = vec![0u8; (gd_len * SECTOR_BYTES) as usize];
        read(storage.as_ref(), &mut b, header.gd_offset_sectors)?;
        let mut gd = le_u32s(&b);
        gd.truncate(gt_count);
        let rgd = if header.flags & FLAG_REDUNDANT_GT != 0 {
            within(
                "redundant grain directory",
                header.rgd_offset_sectors,
                gd_len,
            )?;
            read(storage.as_ref(), &mut b, header.rgd_offset_sectors)?;
            let mut rgd = le_u32s(&b);
            rgd.truncate(gt_count);
            Some(rgd)
        } else {
            None
        };
        let gt_sectors = header.gt_sectors();
        for (i, &e) in gd.iter().chain(rgd.iter().flatten()).enumerate() {
            if e != 0 {
                within(
                    &format!("grain table {}", i % gt_count),
                    e.into(),
                    gt_sectors,
                )?;
                if u64::from(e) + gt_sectors > header.overhead_sectors
                    && u64::from(e) < header.overhead_sectors
                {
                    return Err(layout_err(format!(
                        "grain table {} straddles the end of the metadata",
                        i % gt_count
                    )));
                }
            }
        }
        let grain = header.grain_sectors;
        Ok(SparseImage {
            path: path.to_path_buf(),
            uuid: desc.uuid,
            writable,
            poisoned: false,
            cid_bumped: false,
            gts: (0..gt_count).map(|_| None).collect(),
            gd,
            rgd,
            dirty_gt_sectors: BTreeSet::new(),
            new_gts: BTreeSet::new(),
            dirty_gd_sectors: BTreeSet::new(),
            next_free_sector: file_sectors
                .div_ceil(grain)
                .max(header.overhead_sectors.div_ceil(grain))
                * grain,
            storage,
            header,
            descriptor: text,
        })
    }

    pub fn uuid(&self) -> Option<DiskUuid> {
        self.uuid
    }

    pub fn descriptor_text(&self) -> &str {
        &self.descriptor
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes, marks the extent closed cleanly and syncs.
    pub fn close(mut self) -> Result<(), ImageError> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<(), ImageError> {
        if !self.writable {
            return Ok(());
        }
        self.flush()?;
        self.header.unclean_shutdown = false;
        let h = self.header.encode();
        self.storage
            .write_at(&h, 0)
            .map_err(|e| self.write_err(0, e))?;
        self.sync()?;
        self.writable = false;
        Ok(())
    }

    fn storage_len(&self) -> Result<u64, ImageError> {
        self.storage.len().map_err(|source| ImageError::Open {
            path: self.path.clone(),
            source,
        })
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

    /// Reads grain table `g` into the cache if needed and checks its entries.
    fn load_gt(&mut self, g: usize) -> Result<(), ImageError> {
        if self.gts[g].is_some() {
            return Ok(());
        }
        let n = self.header.gtes_per_gt as usize;
        let gde = u64::from(self.gd[g]);
        let table: Vec<u32> = if gde == 0 {
            vec![GTE_UNALLOCATED; n]
        } else {
            let mut b = vec![0u8; n * 4];
            self.storage
                .read_at(&mut b, gde * SECTOR_BYTES)
                .map_err(|e| self.read_err(gde * SECTOR_BYTES, e))?;
            le_u32s(&b)
        };
        let zeroed_ok = self.zeroed_gte_allowed();
        for (i, &e) in table.iter().enumerate() {
            let bad = e != GTE_UNALLOCATED
                && !(e == GTE_ZEROED && zeroed_ok)
                && u64::from(e) < self.header.overhead_sectors;
            if bad {
                return Err(Self::format_err(
                    &self.path,
                    SparseError::CheckGte {
                        gt: g as u64,
                        entry: i as u64,
                        sector: e.into(),
                    },
                ));
            }
        }
        self.gts[g] = Some(table.into_boxed_slice());
        Ok(())
    }

    fn zeroed_gte_allowed(&self) -> bool {
        self.header.version >= 2 && self.header.flags & FLAG_ZEROED_GTE != 0
    }

    /// The GTE of grain `gi`.
    fn gte(&mut self, gi: u64) -> Result<u32, ImageError> {
        let per = u64::from(self.header.gtes_per_gt);
        let g = (gi / per) as usize;
        self.load_gt(g)?;
        Ok(self.gts[g].as_ref().map_or(0, |t| t[(gi % per) as usize]))
    }

    /// The sector of grain `gi`'s data, if it has any.
    fn data_sector(&mut self, gi: u64) -> Result<Option<u64>, ImageError> {
        let e = self.gte(gi)?;
        let zeroed = e == GTE_ZEROED && self.zeroed_gte_allowed();
        Ok((e != GTE_UNALLOCATED && !zeroed).then_some(u64::from(e)))
    }

    /// Takes the next grain-aligned slot at the end of the file.
    fn take_slot(&mut self) -> Result<u64, ImageError> {
        let sector = self.next_free_sector;
        if sector + self.header.grain_sectors > ADDRESSABLE_SECTORS {
            let e = std::io::Error::other(SparseError::AllocateGrain.to_string());
            return Err(self.write_err(sector * SECTOR_BYTES, e));
        }
        self.next_free_sector += self.header.grain_sectors;
        Ok(sector)
    }

    /// Makes grain table `g` (GD entry 0: foreign images only; ours are
    /// preallocated). Its tables go to disk at the next flush, before the GD.
    fn allocate_gt(&mut self, g: usize) -> Result<(), ImageError> {
        let slot = self.take_slot()?;
        self.gd[g] = slot as u32;
        if let Some(rgd) = &mut self.rgd {
            rgd[g] = (slot + self.header.gt_sectors()) as u32;
        }
        self.gts[g] = Some(vec![GTE_UNALLOCATED; self.header.gtes_per_gt as usize].into());
        self.new_gts.insert(g as u64);
        self.dirty_gd_sectors.insert(g as u64 * 4 / SECTOR_BYTES);
        Ok(())
    }

    /// Gives grain `gi` a new slot; the GTE changes in memory only.
    fn allocate_grain(&mut self, gi: u64) -> Result<u64, ImageError> {
        let per = u64::from(self.header.gtes_per_gt);
        let g = (gi / per) as usize;
        let i = (gi % per) as usize;
        self.load_gt(g)?;
        if self.gd[g] == 0 {
            self.allocate_gt(g)?;
        }
        let sector = self.take_slot()?;
        if let Some(t) = self.gts[g].as_mut() {
            t[i] = sector as u32;
        }
        self.dirty_gt_sectors
            .insert((g as u64, i as u64 * 4 / SECTOR_BYTES));
        Ok(sector)
    }

    fn flush_run(&mut self, run: &mut Option<Run>, data: &[u8]) -> Result<(), ImageError> {
        if let Some(r) = run.take() {
            self.storage
                .write_at(&data[r.data_lo..r.data_hi], r.file_offset)
                .map_err(|e| self.write_err(r.file_offset, e))?;
        }
        Ok(())
    }

    fn push_run(
        &mut self,
        run: &mut Option<Run>,
        data: &[u8],
        file_offset: u64,
        lo: usize,
        hi: usize,
    ) -> Result<(), ImageError> {
        if let Some(r) = run.as_mut() {
            if r.data_hi == lo && r.file_offset + (r.data_hi - r.data_lo) as u64 == file_offset {
                r.data_hi = hi;
                return Ok(());
            }
        }
        self.flush_run(run, data)?;
        *run = Some(Run {
            file_offset,
            data_lo: lo,
            data_hi: hi,
        });
        Ok(())
    }

    /// Changes the CID on the first modification of a session (FORMATS.md
    /// §1.6), in place: same-length text, so only sector 1 changes.
    fn bump_cid(&mut self) -> Result<(), ImageError> {
        if self.cid_bumped {
            return Ok(());
        }
        self.cid_bumped = true;
        let old = descriptor::parse(&self.descriptor).ok().and_then(|d| d.cid);
        let Some(text) = descriptor::replace_cid(&self.descriptor, descriptor::next_cid(old))
        else {
            return Ok(());
        };
        let room = (self.header.descriptor_sectors * SECTOR_BYTES) as usize;
        if text.len() >= room {
            return Ok(());
        }
        let mut b = text.clone().into_bytes();
        let len = b.len().max(self.descriptor.len()).div_ceil(512) * 512;
        b.resize(len.min(room), 0);
        let at = self.header.descriptor_offset_sectors * SECTOR_BYTES;
        self.storage
            .write_at(&b, at)
            .map_err(|e| self.write_err(at, e))?;
        self.descriptor = text;
        Ok(())
    }

    /// Writes the GD sectors in `sectors` (of the GD and the RGD).
    fn write_gd_sectors(&mut self, sectors: &BTreeSet<u64>) -> Result<(), ImageError> {
        for &s in sectors {
            let per = (SECTOR_BYTES / 4) as usize;
            let lo = s as usize * per;
            let hi = (lo + per).min(self.gd.len());
            let mut targets = vec![(self.header.gd_offset_sectors, le_bytes(&self.gd[lo..hi]))];
            if let Some(rgd) = &self.rgd {
                targets.push((self.header.rgd_offset_sectors, le_bytes(&rgd[lo..hi])));
            }
            for (base, bytes) in targets {
                let at = (base + s) * SECTOR_BYTES;
                self.storage
                    .write_at(&bytes, at)
                    .map_err(|e| self.write_err(at, e))?;
            }
        }
        Ok(())
    }

    /// Writes GT `g` sectors `lo..hi` to the GT and the redundant GT.
    fn write_gt_sectors(&mut self, g: u64, lo: u64, hi: u64) -> Result<(), ImageError> {
        let per = (SECTOR_BYTES / 4) as usize;
        let bytes = match &self.gts[g as usize] {
            Some(t) => le_bytes(&t[lo as usize * per..(hi as usize * per).min(t.len())]),
            None => return Ok(()),
        };
        let mut bases = vec![u64::from(self.gd[g as usize])];
        if let Some(rgd) = &self.rgd {
            bases.push(u64::from(rgd[g as usize]));
        }
        for base in bases {
            if base == 0 {
                continue;
            }
            let at = (base + lo) * SECTOR_BYTES;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.write_err(at, e))?;
        }
        Ok(())
    }

    /// After a crash (uncleanShutdown set): loads every GT, makes the
    /// redundant GD and GTs equal to the primary ones and truncates grains
    /// no GTE points at from the end of the file.
    fn repair(&mut self) -> Result<(), ImageError> {
        let path = self.path.display().to_string();
        let gt_sectors = self.header.gt_sectors();
        let grain = self.header.grain_sectors;
        let mut end = self.header.overhead_sectors;
        let mut rgd_fixed = BTreeSet::new();
        let mut rgt_fixed = 0u64;
        for g in 0..self.gd.len() {
            self.load_gt(g)?;
            let gde = u64::from(self.gd[g]);
            end = end.max(gde + gt_sectors);
            if let Some(t) = &self.gts[g] {
                for &e in t.iter() {
                    if u64::from(e) >= self.header.overhead_sectors {
                        end = end.max(u64::from(e) + grain);
                    }
                }
            }
            let Some(rgd) = &self.rgd else { continue };
            let r = u64::from(rgd[g]);
            end = end.max(r + gt_sectors);
            if gde == 0 {
                if r != 0 {
                    if let Some(rgd) = &mut self.rgd {
                        rgd[g] = 0;
                    }
                    rgd_fixed.insert(g as u64 * 4 / SECTOR_BYTES);
                }
                continue;
            }
            if r == 0 {
                // Filled in below, once the end of the file is known.
                rgd_fixed.insert(g as u64 * 4 / SECTOR_BYTES);
                continue;
            }
            let mut b = vec![0u8; (gt_sectors * SECTOR_BYTES) as usize];
            self.storage
                .read_at(&mut b, r * SECTOR_BYTES)
                .map_err(|e| self.read_err(r * SECTOR_BYTES, e))?;
            if self.gts[g].as_deref().is_some_and(|t| le_u32s(&b) != t) {
                self.write_gt_sectors(g as u64, 0, gt_sectors)?;
                rgt_fixed += 1;
            }
        }
        let len = self.storage_len()?;
        let end_bytes = end * SECTOR_BYTES;
        if len > end_bytes {
            tracing::warn!(
                "{path}: dropping {} bytes of orphan grains left by an interrupted write",
                len - end_bytes
            );
            self.storage
                .set_len(end_bytes)
                .map_err(|e| self.write_err(end_bytes, e))?;
        }
        self.next_free_sector = end.div_ceil(grain) * grain;
        // Redundant GTs the RGD lost: new copies at the end, data first.
        let missing: Vec<usize> = match &self.rgd {
            Some(rgd) => (0..self.gd.len())
                .filter(|&g| self.gd[g] != 0 && rgd[g] == 0)
                .collect(),
            None => Vec::new(),
        };
        for g in missing {
            let slot = self.take_slot()?;
            let bytes = le_bytes(self.gts[g].as_deref().unwrap_or(&[]));
            self.storage
                .write_at(&bytes, slot * SECTOR_BYTES)
                .map_err(|e| self.write_err(slot * SECTOR_BYTES, e))?;
            if let Some(rgd) = &mut self.rgd {
                rgd[g] = slot as u32;
            }
        }
        if !rgd_fixed.is_empty() {
            self.sync()?;
            // The primary GD is the truth; rewrite both copies of each
            // affected sector (the primary one unchanged).
            self.write_gd_sectors(&rgd_fixed)?;
        }
        if !rgd_fixed.is_empty() || rgt_fixed > 0 {
            tracing::warn!(
                "{path}: repaired {} redundant grain directory sectors and {rgt_fixed} redundant grain tables",
                rgd_fixed.len()
            );
        }
        self.sync()
    }
}

impl Image for SparseImage {
    fn size_bytes(&self) -> u64 {
        self.header.capacity_sectors * SECTOR_BYTES
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, data.len() as u64, true)?;
        if data.is_empty() {
            return Ok(());
        }
        self.bump_cid()?;
        let gb = self.header.grain_bytes();
        let mut run: Option<Run> = None;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset_bytes + pos as u64;
            let gi = at / gb;
            let within = at % gb;
            let n = (gb - within).min((data.len() - pos) as u64) as usize;
            let piece = &data[pos..pos + n];
            if let Some(sector) = self.data_sector(gi)? {
                self.push_run(&mut run, data, sector * SECTOR_BYTES + within, pos, pos + n)?;
            } else if !is_zero(piece) {
                let sector = self.allocate_grain(gi)?;
                if n as u64 == gb {
                    self.push_run(&mut run, data, sector * SECTOR_BYTES, pos, pos + n)?;
                } else {
                    self.flush_run(&mut run, data)?;
                    let mut grain = vec![0u8; gb as usize];
                    grain[within as usize..within as usize + n].copy_from_slice(piece);
                    let at = sector * SECTOR_BYTES;
                    self.storage
                        .write_at(&grain, at)
                        .map_err(|e| self.write_err(at, e))?;
                }
            }
            pos += n;
        }
        self.flush_run(&mut run, data)
    }

    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        self.check(offset_bytes, len_bytes, true)?;
        if len_bytes == 0 {
            return Ok(());
        }
        self.bump_cid()?;
        let gb = self.header.grain_bytes();
        let per = u64::from(self.header.gtes_per_gt);
        let end = offset_bytes + len_bytes;
        let mut at = offset_bytes;
        // Punched ranges, coalesced: (file offset, length).
        let mut punch: Option<(u64, u64)> = None;
        while at < end {
            let gi = at / gb;
            if self.gd[(gi / per) as usize] == 0 {
                at = ((gi / per + 1) * per * gb).min(end);
                continue;
            }
            let within = at % gb;
            let n = (gb - within).min(end - at);
            if let Some(sector) = self.data_sector(gi)? {
                let off = sector * SECTOR_BYTES + within;
                match &mut punch {
                    Some((o, l)) if *o + *l == off => *l += n,
                    _ => {
                        if let Some((o, l)) = punch.replace((off, n)) {
                            self.storage
                                .punch_hole(o, l)
                                .map_err(|e| self.write_err(o, e))?;
                        }
                    }
                }
            }
            at += n;
        }
        if let Some((o, l)) = punch {
            self.storage
                .punch_hole(o, l)
                .map_err(|e| self.write_err(o, e))?;
        }
        Ok(())
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, buf.len() as u64, false)?;
        let gb = self.header.grain_bytes();
        // Contiguous allocated pieces are read in one call: (file offset, buf lo, buf hi).
        let mut run: Option<(u64, usize, usize)> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset_bytes + pos as u64;
            let gi = at / gb;
            let within = at % gb;
            let n = (gb - within).min((buf.len() - pos) as u64) as usize;
            match self.data_sector(gi)? {
                Some(sector) => {
                    let off = sector * SECTOR_BYTES + within;
                    match &mut run {
                        Some((o, lo, hi)) if *hi == pos && *o + (*hi - *lo) as u64 == off => {
                            *hi = pos + n;
                        }
                        _ => {
                            if let Some((o, lo, hi)) = run.replace((off, pos, pos + n)) {
                                self.storage
                                    .read_at(&mut buf[lo..hi], o)
                                    .map_err(|e| self.read_err(o, e))?;
                            }
                        }
                    }
                }
                None => buf[pos..pos + n].fill(0),
            }
            pos += n;
        }
        if let Some((o, lo, hi)) = run {
            self.storage
                .read_at(&mut buf[lo..hi], o)
                .map_err(|e| self.read_err(o, e))?;
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
        if self.dirty_gt_sectors.is_empty() && self.new_gts.is_empty() {
            return self.sync();
        }
        let gt_sectors = self.header.gt_sectors();
        // 1. Tables made in this batch: nothing points at them yet.
        let new_gts = std::mem::take(&mut self.new_gts);
        for &g in &new_gts {
            self.write_gt_sectors(g, 0, gt_sectors)?;
        }
        // 2. Barrier: grain data and new tables are durable before any
        //    pointer to them.
        self.sync()?;
        // 3. Pointers: GTEs (GT and redundant GT), then GDEs.
        let dirty = std::mem::take(&mut self.dirty_gt_sectors);
        for &(g, s) in dirty.iter().filter(|(g, _)| !new_gts.contains(g)) {
            self.write_gt_sectors(g, s, s + 1)?;
        }
        let gd_sectors = std::mem::take(&mut self.dirty_gd_sectors);
        self.write_gd_sectors(&gd_sectors)?;
        self.sync()
    }
}

impl Drop for SparseImage {
    fn drop(&mut self) {
        if self.writable && !self.poisoned {
            if let Err(e) = self.close_inner() {
                tracing::warn!("closing {} failed: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::storage::CrashStorage;

    const U: DiskUuid = [0x60, 0, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn fresh(size: u64) -> (CrashStorage, SparseImage) {
        let s = CrashStorage::new(Vec::new(), None);
        let img = SparseImage::create(Box::new(s.clone()), Path::new("t.vmdk"), size, &U)
            .expect("create");
        (s, img)
    }

    #[test]
    fn limit_is_just_under_two_tib() {
        let max = max_size_bytes();
        assert!(max < 2 << 40 && max > (2 << 40) - (300 << 20), "{max}");
        let s = CrashStorage::new(Vec::new(), None);
        let e = SparseImage::create(Box::new(s), Path::new("big.vmdk"), 2 << 40, &U)
            .err()
            .expect("too large");
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn writes_read_back_and_zero_grains_are_not_allocated() {
        let (s, mut img) = fresh(10 << 20);
        img.write_at(100, &[7u8; 70000]).expect("write");
        img.write_at(1 << 20, &vec![0u8; 1 << 20])
            .expect("zero data");
        img.flush().expect("flush");
        let len = s.live().len() as u64;
        assert_eq!(len, (128 + 2 * 128) * 512, "two grains after the metadata");
        let mut b = vec![1u8; 200000];
        img.read_at(0, &mut b).expect("read");
        assert!(b[..100].iter().all(|&x| x == 0));
        assert!(b[100..70100].iter().all(|&x| x == 7));
        assert!(b[70100..].iter().all(|&x| x == 0));
        img.write_zeroes(1000, 1000).expect("zero");
        img.read_at(0, &mut b).expect("read");
        assert!(b[1000..2000].iter().all(|&x| x == 0));
        assert!(b[2000..70100].iter().all(|&x| x == 7));
        drop(img);
        let img =
            SparseImage::open(Box::new(s.clone()), Path::new("t.vmdk"), false).expect("reopen");
        assert!(!img.header.unclean_shutdown, "closed cleanly");
        assert_eq!(img.uuid(), Some(U));
    }

    #[test]
    fn orphan_grains_of_a_cut_flush_are_truncated_on_reopen() {
        // Syncs: 2 at create, 2 per flush; the 6th (second batch's
        // pointers) is cut, so its grains are durable but unreferenced.
        let s = CrashStorage::new(Vec::new(), Some(5));
        let mut img = SparseImage::create(Box::new(s.clone()), Path::new("o.vmdk"), 4 << 20, &U)
            .expect("create");
        img.write_at(0, &[1u8; 65536]).expect("write");
        img.flush().expect("flush");
        img.write_at(1 << 20, &[2u8; 3 * 65536]).expect("write");
        img.flush().expect("flush (the cut is silent)");
        assert!(s.crashed());
        drop(img);
        let durable = s.durable();
        assert_eq!(durable.len(), (128 + 4 * 128) * 512, "three orphans");
        let s = CrashStorage::new(durable, None);
        let mut img =
            SparseImage::open(Box::new(s.clone()), Path::new("o.vmdk"), true).expect("open");
        assert_eq!(s.live().len(), (128 + 128) * 512, "orphans truncated");
        let mut b = vec![0u8; 4 << 20];
        img.read_at(0, &mut b).expect("read");
        assert!(b[..65536].iter().all(|&x| x == 1));
        assert!(b[65536..].iter().all(|&x| x == 0));
        img.write_at(2 << 20, &[3u8; 65536]).expect("write");
        img.flush().expect("flush");
        assert_eq!(
            img.gte(32).expect("gte"),
            256,
            "the next grain reuses the space"
        );
    }

    #[test]
    fn missing_grain_tables_are_made_at_the_end() {
        let (s, img) = fresh(100 << 20);
        drop(img);
        // GT 1 (32..64 MiB) unallocated in both directories.
        let mut bytes = s.durable();
        let h = SparseHeader::monolithic(100 << 11);
        for base in [h.gd_offset_sectors, h.rgd_offset_sectors] {
            let at = (base * 512 + 4) as usize;
            bytes[at..at + 4].fill(0);
        }
        let s = CrashStorage::new(bytes, None);
        let mut img =
            SparseImage::open(Box::new(s.clone()), Path::new("t.vmdk"), true).expect("open");
        img.write_at(40 << 20, &[9u8; 4096]).expect("write");
        img.flush().expect("flush");
        drop(img);
        let mut img =
            SparseImage::open(Box::new(s.clone()), Path::new("t.vmdk"), false).expect("reopen");
        assert_ne!(img.gd[1], 0);
        assert_eq!(Some(img.gd[1] + 4), img.rgd.as_ref().map(|r| r[1]));
        let mut b = vec![0u8; 4096];
        img.read_at(40 << 20, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 9));
    }

    #[test]
    fn garbage_headers_are_errors_not_panics() {
        let (s, img) = fresh(1 << 20);
        drop(img);
        let good = s.durable();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % 16384;
                b[i] = (x >> 40) as u8;
            }
            let s = CrashStorage::new(b, None);
            if let Ok(mut img) = SparseImage::open(Box::new(s), Path::new("f.vmdk"), false) {
                let mut buf = vec![0u8; 1 << 20];
                let _ = img.read_at(0, &mut buf);
            }
        }
    }
}
