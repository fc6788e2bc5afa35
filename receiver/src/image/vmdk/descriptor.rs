//! The text descriptor of a VMDK (VMware Virtual Disk Format 5.0,
//! FORMATS.md §1.1–1.3). Spelling and order follow the traps listed there:
//! the exact first line, `version=1` and `createType="…"` without spaces,
//! `CID` before `parentCID`, an offset on FLAT extents, none on VMFS ones.
//!
//! Writing produces one canonical template; reading is lenient (keys are
//! case-insensitive, spaces around `=` are trimmed) and never panics.

use crate::image::DiskUuid;

/// Which product the descriptor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlatKind {
    /// Hosted products and qemu.
    MonolithicFlat,
    /// ESXi datastores.
    Vmfs,
}

/// First line of every descriptor; libvmdk rejects any other spelling
/// (FORMATS.md §1.2).
pub const SIGNATURE: &str = "# Disk DescriptorFile";

/// `parentCID` of a disk without a parent (technote "Header": CID_NOPARENT).
pub const CID_NO_PARENT: u32 = 0xffff_ffff;

/// CID values readers treat specially and writers avoid (FORMATS.md §1.1:
/// open-vmdk re-rolls ffffffff and fffffffe).
const CID_RESERVED: [u32; 2] = [0xffff_ffff, 0xffff_fffe];

/// Lines a descriptor may have; anything longer is not one.
const MAX_LINES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("descriptor is not UTF-8 text")]
    DecodeText,
    #[error("descriptor has no createType")]
    FindCreateType,
    #[error("descriptor has no extent line")]
    FindExtent,
    #[error("descriptor line {line} is not a valid extent: {text:?}")]
    ParseExtent { line: usize, text: String },
    #[error("descriptor has more than {MAX_LINES} lines")]
    CountLines,
}

/// One extent line: `ACCESS SECTORS TYPE "FILE" [OFFSET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// `RW`, `RDONLY` or `NOACCESS` (upper-cased).
    pub access: String,
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `VMFS`, `ZERO`, … (upper-cased).
    pub kind: String,
    /// Relative to the descriptor's directory.
    pub file: String,
    pub offset_sectors: Option<u64>,
}

/// What a reader needs from a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub create_type: String,
    pub cid: Option<u32>,
    pub extents: Vec<Extent>,
    pub uuid: Option<DiskUuid>,
}

impl Descriptor {
    /// Sum of the extents' sizes.
    pub fn size_bytes(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |acc, e| acc.checked_add(e.sectors.checked_mul(512)?))
    }
}

/// Splits `key = value` (spaces trimmed, quotes removed from the value).
fn key_value(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once('=')?;
    let k = k.trim();
    if k.is_empty() || k.contains(char::is_whitespace) {
        return None;
    }
    Some((k, v.trim().trim_matches('"')))
}

/// Parses an extent line; None if the line is not one.
fn parse_extent(line: &str) -> Option<Result<Extent, ()>> {
    let mut words = line.split_whitespace();
    let access = words.next()?.to_ascii_uppercase();
    if !matches!(access.as_str(), "RW" | "RDONLY" | "NOACCESS") {
        return None;
    }
    let parse = || -> Option<Extent> {
        let (head, rest) = line.split_once('"')?;
        let (file, tail) = rest.split_once('"')?;
        let fields: Vec<&str> = head.split_whitespace().collect();
        let [_, sectors, kind] = fields[..] else {
            return None;
        };
        let tail: Vec<&str> = tail.split_whitespace().collect();
        let offset_sectors = match tail[..] {
            [] => None,
            [o] => Some(o.parse().ok()?),
            _ => return None,
        };
        Some(Extent {
            access: access.clone(),
            sectors: sectors.parse().ok()?,
            kind: kind.to_ascii_uppercase(),
            file: file.to_owned(),
            offset_sectors,
        })
    };
    Some(parse().ok_or(()))
}

/// Parses descriptor text (trailing NULs of an embedded descriptor are
/// ignored). Fails for text without a createType or an extent.
pub fn parse(text: &str) -> Result<Descriptor, DescriptorError> {
    let text = text.trim_end_matches('\0');
    let mut create_type = None;
    let mut cid = None;
    let mut extents = Vec::new();
    let mut uuid = None;
    for (i, raw) in text.lines().enumerate() {
        if i >= MAX_LINES {
            return Err(DescriptorError::CountLines);
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(extent) = parse_extent(line) {
            let extent = extent.map_err(|()| DescriptorError::ParseExtent {
                line: i + 1,
                text: line.chars().take(200).collect(),
            })?;
            extents.push(extent);
            continue;
        }
        let Some((k, v)) = key_value(line) else {
            continue;
        };
        if k.eq_ignore_ascii_case("createType") {
            create_type = Some(v.to_owned());
        } else if k.eq_ignore_ascii_case("CID") {
            cid = u32::from_str_radix(v, 16).ok();
        } else if k.eq_ignore_ascii_case("ddb.uuid") {
            uuid = parse_uuid(v);
        }
    }
    Ok(Descriptor {
        create_type: create_type.ok_or(DescriptorError::FindCreateType)?,
        cid,
        extents: match extents.is_empty() {
            true => return Err(DescriptorError::FindExtent),
            false => extents,
        },
        uuid,
    })
}

/// Decodes descriptor bytes (up to the first NUL) and parses them.
pub fn parse_bytes(bytes: &[u8]) -> Result<(String, Descriptor), DescriptorError> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).map_err(|_| DescriptorError::DecodeText)?;
    let d = parse(text)?;
    Ok((text.to_owned(), d))
}

/// `ddb.uuid` text: 16 hex bytes, a dash between the halves (FORMATS.md
/// §1.3), lower case like qemu and open-vmdk; readers parse either case.
pub fn uuid_text(u: &DiskUuid) -> String {
    let hex: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// Parses a `ddb.uuid` value back into bytes.
pub fn parse_uuid(text: &str) -> Option<DiskUuid> {
    let digits: Vec<u8> = text.bytes().filter(|c| !matches!(c, b' ' | b'-')).collect();
    if digits.len() != 32 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&digits[2 * i..2 * i + 2]).ok()?;
        *b = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// The `ddb.uuid` of a descriptor, if it has one.
pub fn find_uuid(descriptor: &str) -> Option<DiskUuid> {
    descriptor.lines().find_map(|l| {
        let (k, v) = key_value(l.trim())?;
        k.eq_ignore_ascii_case("ddb.uuid").then(|| parse_uuid(v))?
    })
}

/// The content ID a new image of this disk starts with: derived from the
/// UUID so one disk's exports agree, never a reserved value.
pub fn initial_cid(uuid: &DiskUuid) -> u32 {
    u32::from_be_bytes([uuid[12], uuid[13], uuid[14], uuid[15]]) & 0x7fff_ffff
}

/// A fresh content ID, different from `old` and from the reserved values.
pub fn next_cid(old: Option<u32>) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!("{nanos}:{}:{old:?}", std::process::id());
    let sum = tidemark_common::checksum::checksum(seed.as_bytes());
    let mut cid = u32::from_le_bytes([sum[0], sum[1], sum[2], sum[3]]);
    while CID_RESERVED.contains(&cid) || Some(cid) == old {
        cid = cid.wrapping_add(1);
    }
    cid
}

/// The descriptor with its CID (and the tail of `ddb.longContentID`, which
/// ESXi and open-vmdk keep equal to it) set to `cid`; every other byte is
/// kept. None if it has no `CID=` line.
pub fn replace_cid(text: &str, cid: u32) -> Option<String> {
    let mut found = false;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let ending = &line[body.len()..];
        match key_value(body.trim()) {
            Some((k, _)) if k.eq_ignore_ascii_case("CID") && !found => {
                found = true;
                out.push_str(&format!("CID={cid:08x}{ending}"));
            }
            Some((k, v))
                if k.eq_ignore_ascii_case("ddb.longContentID")
                    && v.len() == 32
                    && v.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                out.push_str(&format!(
                    "ddb.longContentID = \"{}{cid:08x}\"{ending}",
                    &v[..24]
                ));
            }
            _ => out.push_str(line),
        }
    }
    found.then_some(out)
}

/// Rewrites the header lines qemu misreads (FORMATS.md §1.2): spaces
/// around `=` in `version`, `CID`, `parentCID` and `createType`, and
/// `parentCID` before `CID`. Returns the fixed text and what was fixed, or
/// None if nothing needed fixing.
pub fn fix_header_traps(text: &str) -> Option<(String, Vec<&'static str>)> {
    let mut fixed = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    let mut cid_at = None;
    let mut parent_at = None;
    for line in text.lines() {
        let canonical = key_value(line.trim()).and_then(|(k, v)| {
            let (name, quoted) = match k.to_ascii_lowercase().as_str() {
                "version" => ("version", false),
                "cid" => ("CID", false),
                "parentcid" => ("parentCID", false),
                "createtype" => ("createType", true),
                _ => return None,
            };
            Some(match quoted {
                true => format!("{name}=\"{v}\""),
                false => format!("{name}={v}"),
            })
        });
        match canonical {
            Some(c) => {
                if c != line {
                    fixed.push("spaces around '=' in a header key");
                }
                if c.starts_with("CID=") && cid_at.is_none() {
                    cid_at = Some(lines.len());
                }
                if c.starts_with("parentCID=") && parent_at.is_none() {
                    parent_at = Some(lines.len());
                }
                lines.push(c);
            }
            None => lines.push(line.to_owned()),
        }
    }
    if let (Some(c), Some(p)) = (cid_at, parent_at) {
        if p < c {
            let cid_line = lines.remove(c);
            lines.insert(p, cid_line);
            fixed.push("parentCID before CID");
        }
    }
    fixed.dedup();
    if fixed.is_empty() {
        return None;
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    Some((out, fixed))
}

/// The canonical descriptor for one extent line.
pub fn render(
    create_type: &str,
    extent: &str,
    size_bytes: u64,
    uuid: &DiskUuid,
    cid: u32,
) -> String {
    let sectors = size_bytes / 512;
    let long_cid: String = uuid[..12].iter().map(|b| format!("{b:02x}")).collect();
    // SCSI geometry: 255 heads, 63 sectors, cylinders uncapped.
    let cylinders = sectors / (255 * 63);
    format!(
        "{SIGNATURE}\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID={CID_NO_PARENT:08x}\n\
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

/// A descriptor for `extent_file` (a name relative to the descriptor)
/// holding `size_bytes` (a multiple of 512).
pub fn flat(kind: FlatKind, size_bytes: u64, extent_file: &str, uuid: &DiskUuid) -> String {
    let sectors = size_bytes / 512;
    let (create_type, extent) = match kind {
        FlatKind::MonolithicFlat => (
            "monolithicFlat",
            format!("RW {sectors} FLAT \"{extent_file}\" 0"),
        ),
        FlatKind::Vmfs => ("vmfs", format!("RW {sectors} VMFS \"{extent_file}\"")),
    };
    render(create_type, &extent, size_bytes, uuid, initial_cid(uuid))
}

/// The descriptor of a hosted sparse extent (`monolithicSparse` or
/// `streamOptimized`) named `file`.
pub fn sparse(create_type: &str, size_bytes: u64, file: &str, uuid: &DiskUuid) -> String {
    let extent = format!("RW {} SPARSE \"{file}\"", size_bytes / 512);
    render(create_type, &extent, size_bytes, uuid, initial_cid(uuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: DiskUuid = [
        0x60, 0x00, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ];

    #[test]
    fn uuid_text_round_trips() {
        let t = uuid_text(&U);
        assert_eq!(t, "60 00 c2 9a 01 02 03 04-05 06 07 08 09 0a 0b 0c");
        assert_eq!(parse_uuid(&t), Some(U));
        assert_eq!(
            parse_uuid("60 00 C2 9A 01 02 03 04-05 06 07 08 09 0A 0B 0C"),
            Some(U)
        );
        let d = flat(FlatKind::MonolithicFlat, 1 << 20, "x-flat.vmdk", &U);
        assert_eq!(find_uuid(&d), Some(U));
        assert!(d.starts_with("# Disk DescriptorFile\nversion=1\n"));
        assert!(d.contains("RW 2048 FLAT \"x-flat.vmdk\" 0\n"));
        assert!(flat(FlatKind::Vmfs, 1 << 20, "x-flat.vmdk", &U)
            .contains("RW 2048 VMFS \"x-flat.vmdk\"\n"));
        assert_eq!(parse_uuid("60 00"), None);
        assert_eq!(
            parse_uuid("zz 00 c2 9a 01 02 03 04-05 06 07 08 09 0a 0b 0c"),
            None
        );
    }

    #[test]
    fn parses_what_it_writes_and_what_qemu_writes() {
        let d = parse(&sparse("monolithicSparse", 1 << 20, "a b.vmdk", &U)).expect("parse");
        assert_eq!(d.create_type, "monolithicSparse");
        assert_eq!(d.uuid, Some(U));
        assert_eq!(d.cid, Some(initial_cid(&U)));
        assert_eq!(
            d.extents,
            vec![Extent {
                access: "RW".into(),
                sectors: 2048,
                kind: "SPARSE".into(),
                file: "a b.vmdk".into(),
                offset_sectors: None
            }]
        );
        let qemu = "# Disk DescriptorFile\nversion=1\nCID=3ea0234f\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 20480 FLAT \"mf-flat.vmdk\" 0\n\n#DDB\nddb.adapterType = \"ide\"\n";
        let d = parse(qemu).expect("parse");
        assert_eq!(d.size_bytes(), Some(20480 * 512));
        assert_eq!(d.extents[0].offset_sectors, Some(0));
        assert_eq!(d.uuid, None);
        assert_eq!(parse("hello"), Err(DescriptorError::FindCreateType));
        assert!(matches!(
            parse("createType=\"x\"\nRW 12 FLAT nofile 0\n"),
            Err(DescriptorError::ParseExtent { line: 2, .. })
        ));
    }

    #[test]
    fn cid_replacement_keeps_everything_else() {
        let text = flat(FlatKind::Vmfs, 1 << 20, "x-flat.vmdk", &U);
        let new = replace_cid(&text, 0xdeadbeef).expect("has a CID");
        assert_eq!(new.len(), text.len());
        assert!(new.contains("CID=deadbeef\nparentCID=ffffffff\n"));
        assert!(new.contains("ddb.longContentID = \"6000c29a0102030405060708deadbeef\""));
        assert_eq!(parse(&new).expect("parse").cid, Some(0xdeadbeef));
        assert_eq!(replace_cid("createType=\"x\"", 1), None);
        let c = next_cid(Some(5));
        assert!(c != 5 && !CID_RESERVED.contains(&c));
    }

    #[test]
    fn header_traps_are_fixed() {
        let bad = "# Disk DescriptorFile\nversion = 1\nparentCID=ffffffff\nCID=12\ncreateType = \"monolithicFlat\"\nRW 8 FLAT \"f\" 0\n";
        let (good, what) = fix_header_traps(bad).expect("needs fixing");
        assert_eq!(
            good,
            "# Disk DescriptorFile\nversion=1\nCID=12\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"f\" 0\n"
        );
        assert_eq!(what.len(), 2);
        assert_eq!(fix_header_traps(&good), None);
    }

    #[test]
    fn parsing_arbitrary_bytes_never_panics() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let base = sparse("monolithicSparse", 1 << 20, "d.vmdk", &U).into_bytes();
        for _ in 0..2000 {
            let mut b = base.clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
            }
            let _ = parse_bytes(&b);
            let _ = parse_bytes(&b[..(x as usize) % b.len()]);
        }
    }
}
