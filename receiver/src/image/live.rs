//! The formats a replica can live in, and the one place that knows which
//! files make up an image of each: what to create for a new disk, how to
//! open a registered one, and how to recognise an existing image by UUID.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::raw::RawImage;
use super::vmdk::{flat, VmdkImage, VmdkKind};
use super::{vhd, DiskUuid, Image, ImageError};

/// Largest disk a fixed VHD is made for: Azure's managed-disk upload limit
/// of 32 TiB (FORMATS.md §2.4; qemu itself reads only up to 2040 GiB).
pub const VHD_FIXED_MAX_BYTES: u64 = 32 << 40;

/// Live replica image formats (`image_format` in receiver.toml).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// Flat VMDK: `<id>-flat.vmdk` data file with an ESXi (`vmfs`)
    /// descriptor `<id>.vmdk` and a hosted one `<id>-hosted.vmdk`.
    #[default]
    Vmdk,
    /// monolithicSparse VMDK `<id>.vmdk`: one file, grows as data arrives.
    VmdkSparse,
    /// Dynamic VHD `<id>.vhd`: sparse, grows in 2 MiB blocks (Hyper-V,
    /// qemu; at most 2040 GiB, qemu's limit).
    Vhd,
    /// Fixed VHD `<id>.vhd`: the disk then a footer (Hyper-V, Azure).
    VhdFixed,
    /// The disk byte for byte, `<id>.img`.
    Raw,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::VmdkSparse => "vmdk-sparse",
            ImageFormat::Vhd => "vhd",
            ImageFormat::VhdFixed => "vhd-fixed",
            ImageFormat::Raw => "raw",
        }
    }

    /// The largest disk an image of this format can hold.
    pub fn max_size_bytes(self) -> u64 {
        match self {
            ImageFormat::Vmdk => super::vmdk::max_size_bytes(VmdkKind::FlatVmfs),
            ImageFormat::VmdkSparse => super::vmdk::max_size_bytes(VmdkKind::MonolithicSparse),
            ImageFormat::Vhd => vhd::dynamic::MAX_SIZE_BYTES,
            ImageFormat::VhdFixed => VHD_FIXED_MAX_BYTES,
            ImageFormat::Raw => i64::MAX as u64,
        }
    }

    /// The registry's name for a new image of disk `disk_id`: the file
    /// [`open`] takes, relative to the image directory.
    pub fn file_name(self, disk_id: &str) -> String {
        match self {
            ImageFormat::Vmdk => format!("{disk_id}-flat.vmdk"),
            ImageFormat::VmdkSparse => format!("{disk_id}.vmdk"),
            ImageFormat::Vhd | ImageFormat::VhdFixed => format!("{disk_id}.vhd"),
            ImageFormat::Raw => format!("{disk_id}.img"),
        }
    }

    /// The format of a registry entry written before formats were
    /// recorded: only flat VMDKs and raw images existed then.
    pub fn infer(file_name: &str) -> ImageFormat {
        if file_name.ends_with("-flat.vmdk") {
            ImageFormat::Vmdk
        } else {
            ImageFormat::Raw
        }
    }
}

/// Refuses a disk the format cannot hold, before any file is made (a
/// registration must fail at once, not in the middle of a sync).
pub fn check_size(format: ImageFormat, path: &Path, size_bytes: u64) -> Result<(), ImageError> {
    let max_bytes = format.max_size_bytes();
    if size_bytes > max_bytes {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            size_bytes,
            max_bytes,
            format: match format {
                ImageFormat::Vmdk => "an ESXi (vmfs) VMDK",
                ImageFormat::VmdkSparse => "a monolithicSparse VMDK (use image_format = \"vmdk\")",
                ImageFormat::Vhd => {
                    "a dynamic VHD (qemu reads no more; use image_format = \"vhd-fixed\" or \"vmdk\")"
                }
                ImageFormat::VhdFixed => "a fixed VHD (Azure's limit)",
                ImageFormat::Raw => "a raw image",
            },
        });
    }
    Ok(())
}

/// Creates a new image of `format` for disk `disk_id` in `dir`.
pub fn create(
    format: ImageFormat,
    dir: &Path,
    disk_id: &str,
    size_bytes: u64,
    uuid: DiskUuid,
) -> Result<Box<dyn Image>, ImageError> {
    let path = dir.join(format.file_name(disk_id));
    check_size(format, &path, size_bytes)?;
    Ok(match format {
        ImageFormat::Vmdk => Box::new(flat::create(dir, disk_id, size_bytes, &uuid)?.1),
        ImageFormat::VmdkSparse => Box::new(VmdkImage::create_file(
            &path,
            size_bytes,
            uuid,
            VmdkKind::MonolithicSparse,
        )?),
        ImageFormat::Vhd => Box::new(vhd::DynamicVhd::create_file(
            &path,
            size_bytes.div_ceil(512) * 512,
            uuid,
        )?),
        // Whole MiB: Azure refuses anything else.
        ImageFormat::VhdFixed => Box::new(vhd::FixedVhd::create_file(
            &path,
            vhd::footer::fixed_size(size_bytes),
            uuid,
        )?),
        ImageFormat::Raw => Box::new(RawImage::create(&path, size_bytes)?),
    })
}

/// Grows the registered image `path` of `format` so that it holds a disk
/// of `size_bytes`, where the format allows it in place: raw (a longer
/// sparse file), flat VMDK (the data file, then its descriptors) and fixed
/// VHD (the footer moves). Sparse VMDKs and dynamic VHDs are refused:
/// their grain directory or BAT was sized for the old disk. Safe to call
/// again after a crash half-way; `was_bytes` is the size the disk was
/// registered at before, where an unfinished fixed-VHD grow left its old
/// footer.
pub fn grow(
    format: ImageFormat,
    path: &Path,
    size_bytes: u64,
    was_bytes: Option<u64>,
) -> Result<(), ImageError> {
    check_size(format, path, size_bytes)?;
    match format {
        ImageFormat::Raw => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| ImageError::Open {
                    path: path.to_path_buf(),
                    source,
                })?;
            let grow = || -> std::io::Result<()> {
                if file.metadata()?.len() < size_bytes {
                    file.set_len(size_bytes)?;
                    file.sync_all()?;
                }
                Ok(())
            };
            grow().map_err(|source| ImageError::Write {
                path: path.to_path_buf(),
                offset_bytes: size_bytes,
                source,
            })
        }
        ImageFormat::Vmdk => flat::grow(path, size_bytes),
        ImageFormat::VhdFixed => {
            let mut img = vhd::FixedVhd::open_file(path, true)?;
            img.grow(vhd::footer::fixed_size(size_bytes))?;
            if let Some(was) = was_bytes {
                img.clear_stale_footer(vhd::footer::fixed_size(was))?;
            }
            img.close()
        }
        ImageFormat::VmdkSparse | ImageFormat::Vhd => Err(ImageError::CannotGrow {
            path: path.to_path_buf(),
            size_bytes,
            format: if format == ImageFormat::Vhd {
                "a dynamic VHD"
            } else {
                "a monolithicSparse VMDK"
            },
        }),
    }
}

/// Opens the registered image file `path` of `format`.
pub fn open(
    format: ImageFormat,
    path: &Path,
    writable: bool,
) -> Result<Box<dyn Image>, ImageError> {
    Ok(match format {
        // The registry names the flat data file: the descriptors never
        // change after creation, so the data is all that is written.
        ImageFormat::Vmdk | ImageFormat::Raw => Box::new(RawImage::open(path, writable)?),
        ImageFormat::VmdkSparse => Box::new(VmdkImage::open_file(path, writable)?),
        ImageFormat::Vhd => Box::new(vhd::DynamicVhd::open_file(path, writable)?),
        ImageFormat::VhdFixed => Box::new(vhd::FixedVhd::open_file(path, writable)?),
    })
}

/// An image found in the image directory that carries a UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// What an operator recognises: the descriptor of a flat VMDK, else
    /// the image file.
    pub shown: PathBuf,
    /// The file [`open`] takes.
    pub file: PathBuf,
    pub format: ImageFormat,
    pub uuid: DiskUuid,
    pub size_bytes: u64,
}

/// Every image directly in `dir` that carries a UUID, made by us or not:
/// flat and sparse VMDKs (`ddb.uuid`) and VHDs (footer unique id).
/// Files that are not images, or are damaged, are skipped: only a match
/// matters, and a damaged match would be refused when opened.
pub fn scan(dir: &Path) -> std::io::Result<Vec<Found>> {
    let mut found: Vec<Found> = flat::scan(dir)?
        .into_iter()
        .filter_map(|v| {
            Some(Found {
                shown: v.descriptor,
                file: v.extent,
                format: ImageFormat::Vmdk,
                uuid: v.uuid?,
                size_bytes: v.size_bytes,
            })
        })
        .collect();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    for p in paths {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("vmdk") => {
                if let Ok(Some((Some(uuid), VmdkKind::MonolithicSparse, size_bytes))) =
                    super::vmdk::probe(&p)
                {
                    found.push(Found {
                        shown: p.clone(),
                        file: p,
                        format: ImageFormat::VmdkSparse,
                        uuid,
                        size_bytes,
                    });
                }
            }
            Some("vhd") => {
                if let Ok(Some((uuid, kind, size_bytes))) = vhd::probe(&p) {
                    found.push(Found {
                        shown: p.clone(),
                        file: p,
                        format: match kind {
                            vhd::VhdKind::Fixed => ImageFormat::VhdFixed,
                            vhd::VhdKind::Dynamic => ImageFormat::Vhd,
                        },
                        uuid,
                        size_bytes,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ImageFormat; 5] = [
        ImageFormat::Vmdk,
        ImageFormat::VmdkSparse,
        ImageFormat::Vhd,
        ImageFormat::VhdFixed,
        ImageFormat::Raw,
    ];

    #[test]
    fn every_format_is_created_opened_and_found_by_uuid() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, format) in ALL.into_iter().enumerate() {
            let id = format!("disk{i}");
            let mut img = create(format, dir.path(), &id, 3 << 20, [i as u8 + 1; 16])
                .unwrap_or_else(|e| panic!("create {}: {e}", format.name()));
            img.write_at(1 << 20, &[0x5a; 65536]).expect("write");
            img.flush().expect("flush");
            drop(img);
            let mut img = open(format, &dir.path().join(format.file_name(&id)), false)
                .unwrap_or_else(|e| panic!("open {}: {e}", format.name()));
            assert!(img.size_bytes() >= 3 << 20, "{}", format.name());
            let mut b = vec![0u8; 65536];
            img.read_at(1 << 20, &mut b).expect("read");
            assert!(b.iter().all(|&x| x == 0x5a), "{}", format.name());
        }
        let found = scan(dir.path()).expect("scan");
        let mut formats: Vec<&str> = found.iter().map(|f| f.format.name()).collect();
        formats.sort();
        // A raw image has no UUID to be found by.
        assert_eq!(formats, ["vhd", "vhd-fixed", "vmdk", "vmdk-sparse"]);
        for f in &found {
            let i = f.uuid[0] - 1;
            assert_eq!(
                f.file.file_name().and_then(|n| n.to_str()),
                Some(f.format.file_name(&format!("disk{i}")).as_str())
            );
        }
    }

    #[test]
    fn growable_formats_grow_and_sparse_ones_refuse() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, format) in ALL.into_iter().enumerate() {
            let id = format!("g{i}");
            let mut img = create(format, dir.path(), &id, 2 << 20, [i as u8 + 1; 16])
                .unwrap_or_else(|e| panic!("create {}: {e}", format.name()));
            img.write_at(1 << 20, &[0x33; 4096]).expect("write");
            img.flush().expect("flush");
            drop(img);
            let path = dir.path().join(format.file_name(&id));
            let r = grow(format, &path, 5 << 20, Some(2 << 20));
            if matches!(format, ImageFormat::VmdkSparse | ImageFormat::Vhd) {
                assert!(
                    matches!(r, Err(ImageError::CannotGrow { .. })),
                    "{}",
                    format.name()
                );
                continue;
            }
            r.unwrap_or_else(|e| panic!("grow {}: {e}", format.name()));
            // Twice is harmless (a crash may have cut the first short).
            grow(format, &path, 5 << 20, Some(2 << 20)).expect("again");
            let mut img = open(format, &path, false).expect("open");
            assert_eq!(img.size_bytes(), 5 << 20, "{}", format.name());
            let mut b = vec![0u8; 4096];
            img.read_at(1 << 20, &mut b).expect("read");
            assert!(b.iter().all(|&x| x == 0x33), "{}", format.name());
            img.read_at((5 << 20) - 4096, &mut b).expect("read the end");
            assert!(b.iter().all(|&x| x == 0), "{}", format.name());
        }
    }

    #[test]
    fn a_disk_too_large_for_its_format_is_refused_before_any_file_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let four_tib = 4u64 << 40;
        let e = create(
            ImageFormat::VmdkSparse,
            dir.path(),
            "big",
            four_tib,
            [1; 16],
        );
        assert!(matches!(e, Err(ImageError::TooLarge { .. })));
        let e = create(ImageFormat::Vhd, dir.path(), "big", four_tib, [1; 16]);
        assert!(matches!(e, Err(ImageError::TooLarge { .. })));
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
        // The formats the issue requires for 4 TiB take it (sparse files).
        for format in [ImageFormat::Vmdk, ImageFormat::VhdFixed] {
            let mut img = create(format, dir.path(), format.name(), four_tib, [2; 16])
                .unwrap_or_else(|e| panic!("{}: {e}", format.name()));
            img.write_at(four_tib - 4096, &[7; 4096])
                .expect("last block");
            img.flush().expect("flush");
        }
    }
}
