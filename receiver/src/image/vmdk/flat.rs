//! Flat VMDKs as live replica images: the disk's bytes in a sparse
//! `-flat.vmdk` extent, described by a `vmfs` descriptor for ESXi and a
//! `monolithicFlat` one for hosted products and qemu. Finding them again by
//! `ddb.uuid` is how a disk is matched to the very VMDK its guest saw.

use std::path::{Path, PathBuf};

use super::descriptor::{find_uuid, flat, FlatKind};
use crate::image::raw::RawImage;
use crate::image::{DiskUuid, ImageError};

/// Descriptors are small text files; anything larger is not one.
const MAX_DESCRIPTOR_BYTES: u64 = 64 << 10;

/// A flat VMDK in the image directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatVmdk {
    pub descriptor: PathBuf,
    /// The data file, resolved against the descriptor's directory.
    pub extent: PathBuf,
    pub uuid: Option<DiskUuid>,
    pub size_bytes: u64,
}

/// Parses a descriptor with exactly one flat extent (FLAT at offset 0, or
/// VMFS); None for anything else.
pub fn parse(descriptor: &Path, text: &str) -> Option<FlatVmdk> {
    if !text.starts_with("# Disk DescriptorFile") {
        return None;
    }
    let mut extents = text.lines().filter(|l| {
        let l = l.trim_start();
        l.starts_with("RW ") || l.starts_with("RDONLY ") || l.starts_with("NOACCESS ")
    });
    let line = extents.next()?;
    if extents.next().is_some() {
        return None;
    }
    let (head, rest) = line.split_once('"')?;
    let (file, tail) = rest.split_once('"')?;
    let fields: Vec<&str> = head.split_whitespace().collect();
    let [_, sectors, kind] = fields[..] else {
        return None;
    };
    let ok = match kind {
        "FLAT" => tail.trim() == "0",
        "VMFS" => tail.trim().is_empty(),
        _ => false,
    };
    if !ok || file.is_empty() {
        return None;
    }
    let dir = descriptor.parent().unwrap_or(Path::new("."));
    Some(FlatVmdk {
        descriptor: descriptor.to_path_buf(),
        extent: dir.join(file),
        uuid: find_uuid(text),
        size_bytes: sectors.parse::<u64>().ok()?.checked_mul(512)?,
    })
}

/// Every flat VMDK directly in `dir`, one per data file (several
/// descriptors of one extent are one image).
pub fn scan(dir: &Path) -> std::io::Result<Vec<FlatVmdk>> {
    let mut found: Vec<FlatVmdk> = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "vmdk"))
        .collect();
    paths.sort();
    for p in paths {
        let small =
            std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.len() <= MAX_DESCRIPTOR_BYTES);
        if !small {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        if let Some(v) = parse(&p, &text) {
            let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => a == b,
            };
            if !found.iter().any(|f| same(&f.extent, &v.extent)) {
                found.push(v);
            }
        }
    }
    Ok(found)
}

/// Creates `<name>-flat.vmdk` (sparse) with its two descriptors,
/// `<name>.vmdk` (vmfs, ESXi) and `<name>-hosted.vmdk` (monolithicFlat).
pub fn create(
    dir: &Path,
    name: &str,
    size_bytes: u64,
    uuid: &DiskUuid,
) -> Result<(FlatVmdk, RawImage), ImageError> {
    let extent_name = format!("{name}-flat.vmdk");
    let extent = dir.join(&extent_name);
    let image = RawImage::create(&extent, size_bytes)?;
    let descriptor = dir.join(format!("{name}.vmdk"));
    for (kind, path) in [
        (FlatKind::Vmfs, descriptor.clone()),
        (
            FlatKind::MonolithicFlat,
            dir.join(format!("{name}-hosted.vmdk")),
        ),
    ] {
        let text = flat(kind, size_bytes, &extent_name, uuid);
        tidemark_common::durable::write_atomic(&path, text.as_bytes(), 0o644)
            .map_err(|source| ImageError::Create { path, source })?;
    }
    Ok((
        FlatVmdk {
            descriptor,
            extent,
            uuid: Some(*uuid),
            size_bytes,
        },
        image,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_images_are_found_once_by_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let u = [0x60, 0, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let (v, _img) = create(dir.path(), "d1", 1 << 20, &u).expect("create");
        let found = scan(dir.path()).expect("scan");
        assert_eq!(
            found.len(),
            1,
            "two descriptors of one extent are one image"
        );
        assert_eq!(found[0].uuid, Some(u));
        assert_eq!(found[0].extent, v.extent);
        assert_eq!(found[0].size_bytes, 1 << 20);
    }

    #[test]
    fn only_single_flat_extents_parse() {
        let p = Path::new("/x/d.vmdk");
        let ok = "# Disk DescriptorFile\nversion=1\nRW 2048 FLAT \"d-flat.vmdk\" 0\nddb.uuid = \"60 00 c2 9a 00 00 00 00-00 00 00 00 00 00 00 01\"\n";
        let v = parse(p, ok).expect("parses");
        assert_eq!(v.extent, Path::new("/x/d-flat.vmdk"));
        assert_eq!(v.size_bytes, 2048 * 512);
        assert!(
            parse(p, &ok.replace("\" 0", "\" 9")).is_none(),
            "offset extents are not ours"
        );
        assert!(parse(p, &ok.replace("FLAT", "SPARSE")).is_none());
        assert!(parse(p, &format!("{ok}RW 2048 FLAT \"e\" 0\n")).is_none());
        assert!(parse(p, "KDMV binary").is_none());
    }
}
