//! The 512-byte hosted sparse extent header (`KDMV`), shared by
//! monolithicSparse and streamOptimized files (technote "Hosted Sparse
//! Extent Header", FORMATS.md §1.4). Packed, little-endian.

/// Sector size of every VMDK quantity (technote: "SectorType … in sector units").
pub const SECTOR_BYTES: u64 = 512;

/// `SPARSE_MAGICNUMBER` 0x564d444b ("VMDK"), on disk `4B 44 4D 56` (technote §"Hosted Sparse Extent Header").
pub const MAGIC: u32 = 0x564d_444b;

/// Flag bit 0: valid newline detection test (technote, flags).
pub const FLAG_NEWLINE_TEST: u32 = 1 << 0;
/// Flag bit 1: redundant grain table in use (technote, flags).
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
/// Flag bit 2: zeroed-grain GTE (value 1) in use, version 2 only (technote, flags).
pub const FLAG_ZEROED_GTE: u32 = 1 << 2;
/// Flag bit 16: grains are compressed (technote, flags).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag bit 17: markers precede grains and metadata (technote, flags).
pub const FLAG_MARKERS: u32 = 1 << 17;

/// `gdOffset` in a stream header whose real GD is given by the footer (technote `GD_AT_END`).
pub const GD_AT_END: u64 = 0xffff_ffff_ffff_ffff;

/// Grain size we write: 128 sectors = 64 KiB (qemu, VMware default; FORMATS.md §1.4).
pub const GRAIN_SECTORS: u64 = 128;

/// Entries per grain table; qemu rejects more, 7-Zip wants exactly this (technote, FORMATS.md §1.4).
pub const GTES_PER_GT: u64 = 512;

/// Embedded descriptor location; qemu hard-codes byte 0x200 (FORMATS.md §1.6).
pub const DESCRIPTOR_OFFSET_SECTORS: u64 = 1;

/// Embedded descriptor room; qemu rewrites exactly 20 sectors (FORMATS.md §1.6).
pub const DESCRIPTOR_SECTORS: u64 = 20;

/// `compressAlgorithm` for deflate (zlib in practice) (technote COMPRESSION_DEFLATE; FORMATS.md §1.8).
pub const COMPRESS_DEFLATE: u16 = 1;

/// Newline detection bytes `\n`, ` `, `\r`, `\n` at offset 73 (technote; 7-Zip checks them).
pub const NEWLINE_TEST: [u8; 4] = [0x0a, 0x20, 0x0d, 0x0a];

/// The largest descriptor we read back (VirtualBox allows 20480 sectors; FORMATS.md §1.4).
pub const MAX_DESCRIPTOR_SECTORS: u64 = 20480;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a hosted sparse extent (magic {0:#010x})")]
    CheckMagic(u32),
    #[error("unsupported sparse extent version {0}")]
    CheckVersion(u32),
    #[error("grain size {0} sectors is not a power of two of at least 8")]
    CheckGrainSize(u64),
    #[error("{0} grain table entries per table (only 512 is supported)")]
    CheckGtesPerGt(u32),
    #[error("capacity {0} sectors is out of range")]
    CheckCapacity(u64),
    #[error("newline detection bytes {0:02x?} are damaged (file transferred in text mode?)")]
    CheckNewlines([u8; 4]),
}

/// `SparseExtentHeader`, in host integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity_sectors: u64,
    pub grain_sectors: u64,
    pub descriptor_offset_sectors: u64,
    pub descriptor_sectors: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset_sectors: u64,
    pub gd_offset_sectors: u64,
    pub overhead_sectors: u64,
    pub unclean_shutdown: bool,
    pub newline_test: [u8; 4],
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8; 512], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8; 512], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl SparseHeader {
    /// The header of a new monolithicSparse extent laid out like qemu's
    /// (FORMATS.md §1.5): descriptor, RGD, RGTs, GD, GTs, grains.
    pub fn monolithic(capacity_sectors: u64) -> SparseHeader {
        let layout = Layout::new(capacity_sectors);
        SparseHeader {
            version: 1,
            flags: FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GT,
            capacity_sectors,
            grain_sectors: GRAIN_SECTORS,
            descriptor_offset_sectors: DESCRIPTOR_OFFSET_SECTORS,
            descriptor_sectors: DESCRIPTOR_SECTORS,
            gtes_per_gt: GTES_PER_GT as u32,
            rgd_offset_sectors: layout.rgd_sectors,
            gd_offset_sectors: layout.gd_sectors,
            overhead_sectors: layout.overhead_sectors,
            unclean_shutdown: false,
            newline_test: NEWLINE_TEST,
            compress_algorithm: 0,
        }
    }

    /// The header of a streamOptimized file (FORMATS.md §1.8): version 3,
    /// compressed grains with markers, GD at the end.
    pub fn stream(capacity_sectors: u64, overhead_sectors: u64) -> SparseHeader {
        SparseHeader {
            version: 3,
            flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity_sectors,
            grain_sectors: GRAIN_SECTORS,
            descriptor_offset_sectors: DESCRIPTOR_OFFSET_SECTORS,
            descriptor_sectors: DESCRIPTOR_SECTORS,
            gtes_per_gt: GTES_PER_GT as u32,
            rgd_offset_sectors: 0,
            gd_offset_sectors: GD_AT_END,
            overhead_sectors,
            unclean_shutdown: false,
            newline_test: NEWLINE_TEST,
            compress_algorithm: COMPRESS_DEFLATE,
        }
    }

    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_sectors.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset_sectors.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_sectors.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset_sectors.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset_sectors.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead_sectors.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(&self.newline_test);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Decodes and checks what every reader needs: magic, version 1–3,
    /// grain size, 512 GTEs per GT, a capacity GTEs can address, intact
    /// newline bytes. Layout offsets are checked by the users.
    pub fn decode(b: &[u8; 512]) -> Result<SparseHeader, HeaderError> {
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(HeaderError::CheckMagic(magic));
        }
        let mut newline_test = [0u8; 4];
        newline_test.copy_from_slice(&b[73..77]);
        let h = SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity_sectors: u64_at(b, 12),
            grain_sectors: u64_at(b, 20),
            descriptor_offset_sectors: u64_at(b, 28),
            descriptor_sectors: u64_at(b, 36),
            gtes_per_gt: u32_at(b, 44),
            rgd_offset_sectors: u64_at(b, 48),
            gd_offset_sectors: u64_at(b, 56),
            overhead_sectors: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            newline_test,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(HeaderError::CheckVersion(h.version));
        }
        if !h.grain_sectors.is_power_of_two() || !(8..=(1 << 16)).contains(&h.grain_sectors) {
            return Err(HeaderError::CheckGrainSize(h.grain_sectors));
        }
        if u64::from(h.gtes_per_gt) != GTES_PER_GT {
            return Err(HeaderError::CheckGtesPerGt(h.gtes_per_gt));
        }
        // Data past 2^32 sectors cannot be addressed by a 32-bit GTE; a
        // capacity beyond 2^40 sectors is garbage, not a disk.
        if h.capacity_sectors == 0 || h.capacity_sectors > 1 << 40 {
            return Err(HeaderError::CheckCapacity(h.capacity_sectors));
        }
        if h.flags & FLAG_NEWLINE_TEST != 0 && h.newline_test != NEWLINE_TEST {
            return Err(HeaderError::CheckNewlines(h.newline_test));
        }
        Ok(h)
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR_BYTES
    }

    /// Sectors one grain table covers.
    pub fn gt_coverage_sectors(&self) -> u64 {
        self.grain_sectors * u64::from(self.gtes_per_gt)
    }

    /// Number of grain tables (GD entries).
    pub fn gt_count(&self) -> u64 {
        self.capacity_sectors.div_ceil(self.gt_coverage_sectors())
    }

    /// Sectors of one grain table.
    pub fn gt_sectors(&self) -> u64 {
        (u64::from(self.gtes_per_gt) * 4).div_ceil(SECTOR_BYTES)
    }

    /// Sectors of the grain directory.
    pub fn gd_sectors(&self) -> u64 {
        (self.gt_count() * 4).div_ceil(SECTOR_BYTES)
    }
}

/// Where qemu puts the metadata of a monolithicSparse extent (FORMATS.md
/// §1.5), in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub gt_count: u64,
    pub gd_len_sectors: u64,
    pub rgd_sectors: u64,
    pub gd_sectors: u64,
    pub overhead_sectors: u64,
}

impl Layout {
    pub fn new(capacity_sectors: u64) -> Layout {
        let gt_count = capacity_sectors.div_ceil(GRAIN_SECTORS * GTES_PER_GT);
        let gd_len_sectors = (gt_count * 4).div_ceil(SECTOR_BYTES);
        let gt_sectors = GTES_PER_GT * 4 / SECTOR_BYTES;
        let rgd_sectors = DESCRIPTOR_OFFSET_SECTORS + DESCRIPTOR_SECTORS;
        let gd_sectors = rgd_sectors + gd_len_sectors + gt_sectors * gt_count;
        let end = gd_sectors + gd_len_sectors + gt_sectors * gt_count;
        Layout {
            gt_count,
            gd_len_sectors,
            rgd_sectors,
            gd_sectors,
            overhead_sectors: end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS,
        }
    }

    /// Sector of grain table `i` (primary, or redundant with `redundant`).
    pub fn gt_at(&self, i: u64, redundant: bool) -> u64 {
        let gd = if redundant {
            self.rgd_sectors
        } else {
            self.gd_sectors
        };
        gd + self.gd_len_sectors + i * (GTES_PER_GT * 4 / SECTOR_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu() {
        // qemu-img create -f vmdk x 100M: rgd 21, gd 38, overHead 128.
        let h = SparseHeader::monolithic(204800);
        assert_eq!(
            (
                h.rgd_offset_sectors,
                h.gd_offset_sectors,
                h.overhead_sectors
            ),
            (21, 38, 128)
        );
        // 100 GiB: nGT 3200, gdS 25, gd 12846, overHead 25728 (FORMATS.md §1.5).
        let l = Layout::new(100 << 21);
        assert_eq!((l.gt_count, l.gd_len_sectors), (3200, 25));
        assert_eq!((l.gd_sectors, l.overhead_sectors), (12846, 25728));
        assert_eq!(l.gt_at(0, false), 12846 + 25);
        assert_eq!(l.gt_at(1, true), 21 + 25 + 4);
    }

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = SparseHeader::monolithic(2048);
        let b = h.encode();
        assert_eq!(&b[0..4], b"KDMV");
        assert_eq!(&b[73..77], &[0x0a, 0x20, 0x0d, 0x0a]);
        assert_eq!(SparseHeader::decode(&b), Ok(h.clone()));
        let s = SparseHeader::stream(2048, 128);
        assert_eq!(s.flags, 0x30001);
        assert_eq!(SparseHeader::decode(&s.encode()), Ok(s));
        let mut bad = b;
        bad[4] = 9;
        assert_eq!(
            SparseHeader::decode(&bad),
            Err(HeaderError::CheckVersion(9))
        );
        let mut bad = b;
        bad[20] = 100;
        assert!(matches!(
            SparseHeader::decode(&bad),
            Err(HeaderError::CheckGrainSize(100))
        ));
        let mut bad = b;
        bad[75] = b'\n';
        assert!(matches!(
            SparseHeader::decode(&bad),
            Err(HeaderError::CheckNewlines(_))
        ));
        assert!(matches!(
            SparseHeader::decode(&[0u8; 512]),
            Err(HeaderError::CheckMagic(0))
        ));
    }
}
