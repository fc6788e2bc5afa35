//! The VHD hard disk footer (Microsoft VHD specification 1.0, FORMATS.md
//! §2.1), big-endian, 512 bytes at the end of every VHD.

use crate::image::DiskUuid;

/// Footer length.
pub const FOOTER_BYTES: usize = 512;
/// "conectix": every footer starts with it (spec, Cookie).
const COOKIE: &[u8; 8] = b"conectix";
/// Bit 1 is reserved and must always be set (spec, Features).
pub const FEATURES: u32 = 0x0000_0002;
/// Format version 1.0 (spec, File Format Version).
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// A fixed disk has no dynamic header (spec, Data Offset).
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;
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
/// Disk type 4: differencing (a child of another VHD; not supported).
pub const DISK_TYPE_DIFFERENCING: u32 = 4;
/// VHD time stamps count seconds from 2000-01-01 00:00:00 UTC.
const VHD_EPOCH_UNIX: i64 = 946_684_800;
/// Largest virtual size qemu opens (`VHD_MAX_SECTORS` 0xff000000 × 512).
pub const QEMU_MAX_BYTES: u64 = 0xff00_0000 * 512;

/// Creators whose footers qemu sizes by Current Size rather than by the
/// CHS product (qemu `vpc_open`, FORMATS.md §2.4).
const CURRENT_SIZE_CREATORS: [&[u8; 4]; 5] = [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"];
/// The CHS product qemu also reads as "use Current Size" (65535/16/255).
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

/// Why 512 bytes are not a footer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FooterError {
    #[error("{0} bytes are too short for a footer")]
    Short(usize),
    #[error("no \"conectix\" cookie")]
    Cookie,
    #[error("checksum {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
}

/// A decoded footer. Every field is kept, so a footer read from another
/// tool's image encodes back to the same bytes (reserved bytes aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    /// Byte offset of the dynamic header; all ones for a fixed disk.
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host: [u8; 4],
    pub original_size: u64,
    /// The virtual size in bytes (FORMATS.md §2.4: authoritative for
    /// Hyper-V, Azure, libvhdi; for qemu only with some creators).
    pub current_size: u64,
    /// (cylinders, heads, sectors per track).
    pub geometry: (u16, u8, u8),
    pub disk_type: u32,
    pub uuid: DiskUuid,
    pub saved_state: u8,
}

/// CHS geometry from the spec's appendix (identical to qemu's
/// `calculate_geometry`): (cylinders, heads, sectors per track).
pub fn geometry(size_bytes: u64) -> (u16, u8, u8) {
    let total = (size_bytes / 512).min(MAX_CHS_SECTORS);
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

fn vhd_now() -> u32 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    (now - VHD_EPOCH_UNIX).clamp(0, i64::from(u32::MAX)) as u32
}

impl Footer {
    /// Our footer for a disk of `current_size` bytes: creator `"win "` so
    /// that qemu, Hyper-V, Azure and libvhdi all read Current Size, and
    /// the spec's CHS geometry for it, as Hyper-V writes (FORMATS.md §2.4).
    fn ours(current_size: u64, uuid: DiskUuid, disk_type: u32, data_offset: u64) -> Footer {
        Footer {
            features: FEATURES,
            format_version: FORMAT_VERSION,
            data_offset,
            timestamp: vhd_now(),
            creator_app: *CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_host: *CREATOR_HOST,
            original_size: current_size,
            current_size,
            geometry: geometry(current_size),
            disk_type,
            uuid,
            saved_state: 0,
        }
    }

    pub fn fixed(current_size: u64, uuid: DiskUuid) -> Footer {
        Self::ours(current_size, uuid, DISK_TYPE_FIXED, FIXED_DATA_OFFSET)
    }

    /// A dynamic disk's footer; its header is at `header_offset`.
    pub fn dynamic(current_size: u64, uuid: DiskUuid, header_offset: u64) -> Footer {
        Self::ours(current_size, uuid, DISK_TYPE_DYNAMIC, header_offset)
    }

    pub fn encode(&self) -> [u8; FOOTER_BYTES] {
        let mut b = [0u8; FOOTER_BYTES];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.format_version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        let (c, h, s) = self.geometry;
        b[56..58].copy_from_slice(&c.to_be_bytes());
        b[58] = h;
        b[59] = s;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        let sum = checksum(&b);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parses the first 512 bytes of `b` as a footer (cookie and checksum
    /// checked; field values are the caller's to judge).
    pub fn decode(b: &[u8]) -> Result<Footer, FooterError> {
        let b: &[u8; FOOTER_BYTES] = b
            .get(..FOOTER_BYTES)
            .and_then(|s| s.try_into().ok())
            .ok_or(FooterError::Short(b.len()))?;
        if &b[0..8] != COOKIE {
            return Err(FooterError::Cookie);
        }
        let be32 =
            |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().expect("4 bytes"));
        let be64 =
            |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().expect("8 bytes"));
        let four = |r: std::ops::Range<usize>| -> [u8; 4] { b[r].try_into().expect("4 bytes") };
        let (stored, computed) = (be32(64..68), checksum(b));
        if stored != computed {
            return Err(FooterError::Checksum { stored, computed });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        Ok(Footer {
            features: be32(8..12),
            format_version: be32(12..16),
            data_offset: be64(16..24),
            timestamp: be32(24..28),
            creator_app: four(28..32),
            creator_version: be32(32..36),
            creator_host: four(36..40),
            original_size: be64(40..48),
            current_size: be64(48..56),
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            disk_type: be32(60..64),
            uuid,
            saved_state: b[84],
        })
    }

    /// True if `b` starts with the footer cookie (probing: a cookie with a
    /// bad checksum is a damaged VHD, not some other file).
    pub fn has_cookie(b: &[u8]) -> bool {
        b.get(..8) == Some(&COOKIE[..])
    }

    /// The virtual size qemu computes for this footer: the CHS product
    /// unless the creator is one it trusts for Current Size or the
    /// geometry is the 65535/16/255 maximum (FORMATS.md §2.4).
    pub fn qemu_size_bytes(&self) -> u64 {
        let (c, h, s) = self.geometry;
        let chs = u64::from(c) * u64::from(h) * u64::from(s);
        if CURRENT_SIZE_CREATORS.contains(&&self.creator_app) || chs == MAX_CHS_SECTORS {
            self.current_size
        } else {
            chs * 512
        }
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
        assert_eq!(Footer::decode(&b), Ok(f));
        b[100] ^= 1;
        assert!(matches!(
            Footer::decode(&b),
            Err(FooterError::Checksum { .. })
        ));
        assert_eq!(Footer::decode(&[0u8; 10]), Err(FooterError::Short(10)));
        assert_eq!(Footer::decode(&[0u8; 512]), Err(FooterError::Cookie));
        assert_eq!(fixed_size((1 << 20) + 1), 2 << 20);
    }

    #[test]
    fn qemu_size_depends_on_the_creator() {
        // FORMATS.md §2.4: a 1 GiB disk by "vpc " is CHS-sized in qemu.
        let mut f = Footer::dynamic(1 << 30, [1u8; 16], 512);
        assert_eq!(f.qemu_size_bytes(), 1 << 30);
        f.creator_app = *b"vpc ";
        assert_eq!(f.qemu_size_bytes(), 1_073_479_680);
        f.geometry = (65535, 16, 255);
        assert_eq!(f.qemu_size_bytes(), 1 << 30);
        let b = f.encode();
        assert_eq!(
            Footer::decode(&b),
            Ok(f),
            "foreign fields survive a round trip"
        );
    }
}
