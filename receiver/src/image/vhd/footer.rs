//! The VHD hard disk footer (Microsoft VHD specification 1.0, FORMATS.md
//! §2.1), big-endian, 512 bytes at the end of every VHD.

use crate::image::DiskUuid;

/// Footer length.
pub const FOOTER_BYTES: usize = 512;
/// "conectix": every footer starts with it (spec, Cookie).
const COOKIE: &[u8; 8] = b"conectix";
/// Bit 1 is reserved and must always be set (spec, Features).
const FEATURES: u32 = 0x0000_0002;
/// Format version 1.0 (spec, File Format Version).
const FORMAT_VERSION: u32 = 0x0001_0000;
/// A fixed disk has no dynamic header (spec, Data Offset).
const FIXED_DATA_OFFSET: u64 = u64::MAX;
/// "win ": qemu then takes the size from Current Size instead of the CHS
/// product, as Hyper-V and Azure do (FORMATS.md §2.4).
const CREATOR_APP: &[u8; 4] = b"win ";
/// Creator version 10.0, what Windows writes.
const CREATOR_VERSION: u32 = 0x000a_0000;
/// "Wi2k" (spec, Creator Host OS).
const CREATOR_HOST: &[u8; 4] = b"Wi2k";
/// Disk type 2: fixed (spec, Disk Type).
pub const DISK_TYPE_FIXED: u32 = 2;
/// Disk type 3: dynamic.
pub const DISK_TYPE_DYNAMIC: u32 = 3;
/// VHD time stamps count seconds from 2000-01-01 00:00:00 UTC.
const VHD_EPOCH_UNIX: i64 = 946_684_800;
/// Largest virtual size qemu opens (`VHD_MAX_SECTORS` 0xff000000 × 512).
pub const QEMU_MAX_BYTES: u64 = 0xff00_0000 * 512;

/// The fields a footer carries that we set or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub current_size: u64,
    pub disk_type: u32,
    pub uuid: DiskUuid,
    pub timestamp: u32,
    pub data_offset: u64,
}

/// CHS geometry from the spec's appendix (identical to qemu's
/// `calculate_geometry`): (cylinders, heads, sectors per track).
pub fn geometry(size_bytes: u64) -> (u16, u8, u8) {
    let total = (size_bytes / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// One's complement of the byte sum with the checksum field as zero.
fn checksum(b: &[u8; FOOTER_BYTES]) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, &x)| acc.wrapping_add(u32::from(x)));
    !sum
}

impl Footer {
    pub fn fixed(current_size: u64, uuid: DiskUuid) -> Footer {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Footer {
            current_size,
            disk_type: DISK_TYPE_FIXED,
            uuid,
            timestamp: (now - VHD_EPOCH_UNIX).clamp(0, i64::from(u32::MAX)) as u32,
            data_offset: FIXED_DATA_OFFSET,
        }
    }

    pub fn encode(&self) -> [u8; FOOTER_BYTES] {
        let mut b = [0u8; FOOTER_BYTES];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&FEATURES.to_be_bytes());
        b[12..16].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(CREATOR_APP);
        b[32..36].copy_from_slice(&CREATOR_VERSION.to_be_bytes());
        b[36..40].copy_from_slice(CREATOR_HOST);
        b[40..48].copy_from_slice(&self.current_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        let (c, h, s) = geometry(self.current_size);
        b[56..58].copy_from_slice(&c.to_be_bytes());
        b[58] = h;
        b[59] = s;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        let sum = checksum(&b);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parses a footer; None if these bytes are not a valid one.
    pub fn decode(b: &[u8]) -> Option<Footer> {
        let b: &[u8; FOOTER_BYTES] = b.get(..FOOTER_BYTES)?.try_into().ok()?;
        if &b[0..8] != COOKIE {
            return None;
        }
        let be32 =
            |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().expect("4 bytes"));
        let be64 =
            |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().expect("8 bytes"));
        if be32(64..68) != checksum(b) {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Some(Footer {
            current_size: be64(48..56),
            disk_type: be32(60..64),
            uuid,
            timestamp: be32(24..28),
            data_offset: be64(16..24),
        })
    }
}

/// Virtual size of a fixed VHD for a disk: rounded up to whole MiB, which
/// Azure requires.
pub fn fixed_size(disk_bytes: u64) -> u64 {
    disk_bytes.div_ceil(1 << 20) * (1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_spec_examples() {
        // FORMATS.md §2.4.
        assert_eq!(geometry(1 << 30), (2080, 16, 63));
        assert_eq!(geometry(10 << 30), (20805, 16, 63));
        assert_eq!(geometry(64 << 30), (32896, 16, 255));
        assert_eq!(geometry(4 << 40), (65535, 16, 255));
    }

    #[test]
    fn footer_round_trips_and_checksum_protects_it() {
        let f = Footer::fixed(fixed_size(100 << 20), [7u8; 16]);
        let mut b = f.encode();
        assert_eq!(Footer::decode(&b), Some(f));
        b[100] ^= 1;
        assert_eq!(Footer::decode(&b), None);
        assert_eq!(Footer::decode(&[0u8; 10]), None);
        assert_eq!(fixed_size((1 << 20) + 1), 2 << 20);
    }
}
