//! The text descriptor of a flat VMDK (VMware Virtual Disk Format 5.0,
//! FORMATS.md §1.1–1.3). Spelling and order follow the traps listed there:
//! the exact first line, `version=1` and `createType="…"` without spaces,
//! `CID` before `parentCID`, an offset on FLAT extents, none on VMFS ones.

use crate::image::DiskUuid;

/// Which product the descriptor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlatKind {
    /// Hosted products and qemu.
    MonolithicFlat,
    /// ESXi datastores.
    Vmfs,
}

/// `ddb.uuid` text: 16 hex bytes, a dash between the halves.
pub fn uuid_text(u: &DiskUuid) -> String {
    let hex: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// Parses a `ddb.uuid` value back into bytes.
pub fn parse_uuid(text: &str) -> Option<DiskUuid> {
    let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The `ddb.uuid` of a descriptor, if it has one.
pub fn find_uuid(descriptor: &str) -> Option<DiskUuid> {
    descriptor.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "ddb.uuid").then(|| parse_uuid(v.trim().trim_matches('"')))?
    })
}

/// A descriptor for `extent_file` (a name relative to the descriptor)
/// holding `size_bytes` (a multiple of 512).
pub fn flat(kind: FlatKind, size_bytes: u64, extent_file: &str, uuid: &DiskUuid) -> String {
    let sectors = size_bytes / 512;
    // Content ID: any value but the ffffffff/fffffffe sentinels; derived
    // from the UUID so one disk's exports agree. longContentID ends in it.
    let cid = u32::from_be_bytes([uuid[12], uuid[13], uuid[14], uuid[15]]) & 0x7fff_ffff;
    let long_cid: String = uuid[..12].iter().map(|b| format!("{b:02x}")).collect();
    let (create_type, extent) = match kind {
        FlatKind::MonolithicFlat => (
            "monolithicFlat",
            format!("RW {sectors} FLAT \"{extent_file}\" 0"),
        ),
        FlatKind::Vmfs => ("vmfs", format!("RW {sectors} VMFS \"{extent_file}\"")),
    };
    // SCSI geometry: 255 heads, 63 sectors, cylinders uncapped.
    let cylinders = sectors / (255 * 63);
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"{create_type}\"\n\
         \n\
         # Extent description\n\
         {extent}\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.adapterType = \"lsilogic\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.longContentID = \"{long_cid}{cid:08x}\"\n\
         ddb.uuid = \"{}\"\n\
         ddb.virtualHWVersion = \"4\"\n",
        uuid_text(uuid)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text_round_trips() {
        let u = [
            0x60, 0x00, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        let t = uuid_text(&u);
        assert_eq!(t, "60 00 c2 9a 01 02 03 04-05 06 07 08 09 0a 0b 0c");
        assert_eq!(parse_uuid(&t), Some(u));
        let d = flat(FlatKind::MonolithicFlat, 1 << 20, "x-flat.vmdk", &u);
        assert_eq!(find_uuid(&d), Some(u));
        assert!(d.starts_with("# Disk DescriptorFile\nversion=1\n"));
        assert!(d.contains("RW 2048 FLAT \"x-flat.vmdk\" 0\n"));
        assert!(flat(FlatKind::Vmfs, 1 << 20, "x-flat.vmdk", &u)
            .contains("RW 2048 VMFS \"x-flat.vmdk\"\n"));
        assert_eq!(parse_uuid("60 00"), None);
    }
}
