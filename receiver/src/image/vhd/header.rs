//! The dynamic disk header, the block allocation table (BAT) and the
//! per-block sector bitmap (Microsoft VHD specification 1.0; FORMATS.md
//! §2.2–2.3). Big-endian throughout.

/// Header length.
pub const HEADER_BYTES: usize = 1024;
/// "cxsparse" (spec, Dynamic Disk Header Cookie).
const COOKIE: &[u8; 8] = b"cxsparse";
/// Unused "next structure" offset: all 64 bits set, as MS tools expect
/// (FORMATS.md §2.2, qemu's note on Data Offset).
pub const NO_NEXT_OFFSET: u64 = u64::MAX;
/// Header version 1.0 (spec, Header Version).
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Where our header goes: right after the head footer copy (qemu's layout).
pub const HEADER_OFFSET: u64 = 512;
/// Where our BAT goes: right after the header (qemu: 1536).
pub const BAT_OFFSET: u64 = 1536;
/// Block size we create: 2 MiB, the spec's default and qemu's.
pub const BLOCK_BYTES: u32 = 2 << 20;
/// Largest block size we open; the spec only asks for a power of two.
/// Bounds the bitmap buffers a foreign header can make us allocate.
pub const MAX_BLOCK_BYTES: u32 = 1 << 28;
/// BAT value of a block with no data (spec, "unused entries 0xFFFFFFFF").
pub const BAT_UNUSED: u32 = u32::MAX;
/// Sector size of every VHD offset.
pub const SECTOR_BYTES: u64 = 512;
/// We start each block's data on a 4 KiB boundary (bitmap in the sector
/// before it, the gap left as a hole): page-aligned data keeps host page
/// cache and hole punching whole, and the padding shares the bitmap's
/// filesystem block, so it costs no space. Readers follow the BAT and do
/// not care (qemu's own blocks are only 512-aligned; FORMATS.md §2.3).
pub const DATA_ALIGN_BYTES: u64 = 4096;

/// Why bytes are not a dynamic header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} bytes are too short for a dynamic header")]
    Short(usize),
    #[error("no \"cxsparse\" cookie")]
    Cookie,
    #[error("checksum {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

/// The header fields a dynamic (not differencing) disk uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub data_offset: u64,
    /// Absolute byte offset of the BAT.
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_bytes: u32,
}

fn checksum(b: &[u8; HEADER_BYTES]) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(36..40).contains(i))
        .fold(0u32, |acc, (_, &x)| acc.wrapping_add(u32::from(x)));
    !sum
}

/// Blocks needed for `size_bytes` (FORMATS.md §2.2: max table entries
/// must be ceil(current_size / block_size)).
pub fn blocks_for(size_bytes: u64, block_bytes: u32) -> u64 {
    size_bytes.div_ceil(u64::from(block_bytes))
}

impl DynamicHeader {
    /// Our header for a disk of `size_bytes`.
    pub fn new(size_bytes: u64) -> DynamicHeader {
        DynamicHeader {
            data_offset: NO_NEXT_OFFSET,
            table_offset: BAT_OFFSET,
            version: HEADER_VERSION,
            max_table_entries: blocks_for(size_bytes, BLOCK_BYTES) as u32,
            block_bytes: BLOCK_BYTES,
        }
    }

    /// Bytes of a block's sector bitmap: one bit per sector, padded to a
    /// sector (spec; qemu's `bitmap_size`).
    pub fn bitmap_bytes(&self) -> u64 {
        (u64::from(self.block_bytes) / SECTOR_BYTES)
            .div_ceil(8)
            .div_ceil(SECTOR_BYTES)
            * SECTOR_BYTES
    }

    /// Bytes of the BAT on disk, padded to a sector.
    pub fn bat_bytes(&self) -> u64 {
        (u64::from(self.max_table_entries) * 4).div_ceil(SECTOR_BYTES) * SECTOR_BYTES
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_bytes.to_be_bytes());
        let sum = checksum(&b);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parses a header: cookie and checksum checked (qemu and libvhdi skip
    /// the checksum, FORMATS.md §2.4; we do not write into a header that
    /// fails it), field values left to the caller.
    pub fn decode(b: &[u8]) -> Result<DynamicHeader, HeaderError> {
        let b: &[u8; HEADER_BYTES] = b
            .get(..HEADER_BYTES)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::Short(b.len()))?;
        if &b[0..8] != COOKIE {
            return Err(HeaderError::Cookie);
        }
        let be32 =
            |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().expect("4 bytes"));
        let be64 =
            |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().expect("8 bytes"));
        let (stored, computed) = (be32(36..40), checksum(b));
        if stored != computed {
            return Err(HeaderError::Checksum { stored, computed });
        }
        Ok(DynamicHeader {
            data_offset: be64(8..16),
            table_offset: be64(16..24),
            version: be32(24..28),
            max_table_entries: be32(28..32),
            block_bytes: be32(32..36),
        })
    }

    /// What is wrong with the field values for a disk of `size_bytes` in
    /// a file of `file_len` bytes, if anything (the checks qemu makes on
    /// open, plus bounds that keep our allocations tied to the file size).
    pub fn check(&self, size_bytes: u64, file_len: u64) -> Result<(), String> {
        if !self.block_bytes.is_power_of_two()
            || u64::from(self.block_bytes) < SECTOR_BYTES
            || self.block_bytes > MAX_BLOCK_BYTES
        {
            return Err(format!("block size {}", self.block_bytes));
        }
        let needed = blocks_for(size_bytes, self.block_bytes);
        if u64::from(self.max_table_entries) < needed {
            return Err(format!(
                "{} BAT entries cannot map {size_bytes} bytes (qemu: \"Page table too small\")",
                self.max_table_entries
            ));
        }
        if !self.table_offset.is_multiple_of(SECTOR_BYTES) {
            return Err(format!(
                "BAT offset {} is not sector-aligned",
                self.table_offset
            ));
        }
        match self.table_offset.checked_add(self.bat_bytes()) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(format!(
                "BAT at {} (+{}) passes the end of the file ({file_len} bytes)",
                self.table_offset,
                self.bat_bytes()
            )),
        }
    }
}

/// BAT entries from their on-disk bytes.
pub fn decode_bat(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// On-disk bytes of BAT entries.
pub fn encode_bat(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// Whether sector `i` of a block has data: MSB-first bits (FORMATS.md §2.3).
pub fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap
        .get((i / 8) as usize)
        .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

pub fn set_bit(bitmap: &mut [u8], i: u64) {
    if let Some(b) = bitmap.get_mut((i / 8) as usize) {
        *b |= 0x80 >> (i % 8);
    }
}

/// Where a new block goes when the blocks so far end at `end_bytes`:
/// the byte offset of its bitmap (data follows, [`DATA_ALIGN_BYTES`]-aligned).
pub fn place_block(end_bytes: u64, bitmap_bytes: u64) -> u64 {
    (end_bytes + bitmap_bytes).next_multiple_of(DATA_ALIGN_BYTES) - bitmap_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_sizes_follow_the_spec() {
        // FORMATS.md §2.3: 100 GiB has 51200 entries, 204800 BAT bytes.
        let h = DynamicHeader::new(100 << 30);
        assert_eq!(h.max_table_entries, 51200);
        assert_eq!(h.bat_bytes(), 204800);
        assert_eq!(h.bitmap_bytes(), 512);
        let mut b = h.encode();
        assert_eq!(DynamicHeader::decode(&b), Ok(h.clone()));
        assert!(h.check(100 << 30, 1536 + 204800).is_ok());
        assert!(
            h.check((100 << 30) + 1, 1 << 40).is_err(),
            "table too small"
        );
        assert!(h.check(100 << 30, 1536 + 204799).is_err(), "BAT past EOF");
        b[900] = 1;
        assert!(matches!(
            DynamicHeader::decode(&b),
            Err(HeaderError::Checksum { .. })
        ));
        assert_eq!(DynamicHeader::decode(&b[..10]), Err(HeaderError::Short(10)));
    }

    #[test]
    fn bitmaps_are_msb_first_and_blocks_page_aligned() {
        let mut m = [0u8; 2];
        set_bit(&mut m, 0);
        set_bit(&mut m, 9);
        assert_eq!(m, [0x80, 0x40]);
        assert!(bit(&m, 9) && !bit(&m, 8) && !bit(&m, 100));
        let at = place_block(1536 + 512, 512);
        assert_eq!((at + 512) % DATA_ALIGN_BYTES, 0);
        assert!(at >= 2048);
        assert_eq!(place_block(4096 * 3, 512), 4096 * 4 - 512);
        // Big blocks have bitmaps of several sectors.
        let h = DynamicHeader {
            block_bytes: 32 << 20,
            ..DynamicHeader::new(1 << 30)
        };
        assert_eq!(h.bitmap_bytes(), 8192);
    }
}
