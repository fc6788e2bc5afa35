//! Flat VMDKs as live replica images: the disk's bytes in a sparse
//! `-flat.vmdk` extent, described by a `vmfs` descriptor for ESXi and a
//! `monolithicFlat` one for hosted products and qemu. Finding them again by
//! `ddb.uuid` is how a disk is matched to the very VMDK its guest saw.
//!
//! [`FlatImage`] is one such VMDK open as an [`Image`]: writes go to the
//! data file as they are (zero writes punch holes), so it is crash-safe
//! like a raw file; the descriptor is written once at create and replaced
//! atomically when its CID changes on the first write of a session.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::descriptor::{self, find_uuid, flat, Descriptor, FlatKind};
use crate::image::raw::RawImage;
use crate::image::storage::{FileStorage, Storage};
use crate::image::{DiskUuid, Image, ImageError};

/// Descriptors are small text files; anything larger is not one.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 << 10;

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

/// Grows the flat VMDK whose data file is `extent` to `size_bytes`: the
/// data file first (made durable), then every descriptor in its directory
/// that names it, each replaced atomically. A crash in between leaves a
/// data file longer than its descriptors say, which readers accept (they
/// read what the descriptor describes); calling this again finishes it.
pub fn grow(extent: &Path, size_bytes: u64) -> Result<(), ImageError> {
    let err = |path: &Path, source| ImageError::Write {
        path: path.to_path_buf(),
        offset_bytes: size_bytes,
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .open(extent)
        .map_err(|source| ImageError::Open {
            path: extent.to_path_buf(),
            source,
        })?;
    let len = file.metadata().map_err(|e| err(extent, e))?.len();
    if len < size_bytes {
        file.set_len(size_bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| err(extent, e))?;
    }
    let size_bytes = size_bytes.max(len);
    let dir = extent.parent().unwrap_or(Path::new("."));
    let target = extent.canonicalize().map_err(|e| err(extent, e))?;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "vmdk"))
        .collect();
    paths.sort();
    for p in paths {
        let small =
            std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.len() <= MAX_DESCRIPTOR_BYTES);
        let Some(text) = small.then(|| std::fs::read_to_string(&p).ok()).flatten() else {
            continue;
        };
        let Some(v) = parse(&p, &text) else {
            continue;
        };
        if v.extent.canonicalize().ok().as_ref() != Some(&target) || v.size_bytes == size_bytes {
            continue;
        }
        let resized = resize_descriptor(&text, size_bytes / 512);
        tidemark_common::durable::write_atomic(&p, resized.as_bytes(), 0o644)
            .map_err(|e| err(&p, e))?;
    }
    Ok(())
}

/// `text` with its one extent line and its cylinder count saying
/// `sectors`; every other line (CID, UUID, adapter) as it was.
fn resize_descriptor(text: &str, sectors: u64) -> String {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').parse::<u64>().ok())?
        })
    };
    let heads = field("ddb.geometry.heads")
        .filter(|&h| h > 0)
        .unwrap_or(255);
    let per_track = field("ddb.geometry.sectors")
        .filter(|&s| s > 0)
        .unwrap_or(63);
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        let trimmed = body.trim_start();
        let is_extent = ["RW ", "RDONLY ", "NOACCESS "]
            .iter()
            .any(|p| trimmed.starts_with(p));
        if is_extent {
            let mut parts = trimmed.splitn(3, ' ');
            let (access, _, rest) = (parts.next(), parts.next(), parts.next());
            out.push_str(&format!(
                "{} {sectors} {}{ending}",
                access.unwrap_or("RW"),
                rest.unwrap_or("")
            ));
        } else if body
            .split_once('=')
            .is_some_and(|(k, _)| k.trim() == "ddb.geometry.cylinders")
        {
            out.push_str(&format!(
                "ddb.geometry.cylinders = \"{}\"{ending}",
                sectors / (heads * per_track)
            ));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The data file name for descriptor `<name>.vmdk`: `<name>-flat.vmdk`.
pub fn extent_name(descriptor: &Path) -> Option<String> {
    let name = descriptor.file_name()?.to_str()?;
    let stem = name.strip_suffix(".vmdk").unwrap_or(name);
    Some(format!("{stem}-flat.vmdk"))
}

/// Writes `text` to a new file `path` durably, failing if it exists:
/// temp file, fsync, hard link (which never replaces), fsync the directory.
fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    tidemark_common::durable::sync_dir(dir)
}

/// A flat VMDK open as a live image: descriptor plus one data file.
pub struct FlatImage {
    descriptor_path: PathBuf,
    extent_path: PathBuf,
    storage: FileStorage,
    /// Where the disk starts in the data file (FLAT extent offset).
    offset_bytes: u64,
    size_bytes: u64,
    text: String,
    uuid: Option<DiskUuid>,
    kind: FlatKind,
    writable: bool,
    poisoned: bool,
    /// The CID has been changed in this session (on the first write).
    cid_bumped: bool,
}

impl FlatImage {
    /// Creates `<name>-flat.vmdk` (sparse, `size_bytes`) and the descriptor
    /// at `descriptor_path`; fails if either exists.
    pub fn create(
        descriptor_path: &Path,
        size_bytes: u64,
        uuid: &DiskUuid,
        kind: FlatKind,
    ) -> Result<FlatImage, ImageError> {
        let create_err = |path: &Path, source| ImageError::Create {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |m: &str| {
            create_err(
                descriptor_path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, m),
            )
        };
        if size_bytes == 0 || !size_bytes.is_multiple_of(512) {
            return Err(invalid("size must be a non-zero multiple of 512 bytes"));
        }
        let extent_file = extent_name(descriptor_path)
            .ok_or_else(|| invalid("the descriptor path needs a UTF-8 file name"))?;
        if extent_file.contains('"') {
            return Err(invalid("file names may not contain '\"'"));
        }
        if descriptor_path.exists() {
            return Err(create_err(
                descriptor_path,
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        let dir = descriptor_path.parent().unwrap_or(Path::new("."));
        let extent_path = dir.join(&extent_file);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&extent_path)
            .map_err(|e| create_err(&extent_path, e))?;
        let text = flat(kind, size_bytes, &extent_file, uuid);
        let rest = (|| {
            file.set_len(size_bytes)?;
            file.sync_all()?;
            write_new(descriptor_path, &text)
        })();
        if let Err(e) = rest {
            let _ = std::fs::remove_file(&extent_path);
            return Err(create_err(descriptor_path, e));
        }
        Ok(FlatImage {
            descriptor_path: descriptor_path.to_path_buf(),
            extent_path,
            storage: FileStorage::new(file),
            offset_bytes: 0,
            size_bytes,
            text,
            uuid: Some(*uuid),
            kind,
            writable: true,
            poisoned: false,
            cid_bumped: true,
        })
    }

    /// Opens the flat VMDK described by `text` (read from
    /// `descriptor_path`). When `writable`, fixes the descriptor header
    /// lines qemu misreads and extends a data file shorter than the disk.
    pub fn open(
        descriptor_path: &Path,
        mut text: String,
        desc: &Descriptor,
        writable: bool,
    ) -> Result<FlatImage, ImageError> {
        let fmt = |message: String| ImageError::Format {
            path: descriptor_path.to_path_buf(),
            message,
        };
        let kind = match desc.create_type.to_ascii_lowercase().as_str() {
            "vmfs" => FlatKind::Vmfs,
            "monolithicflat" => FlatKind::MonolithicFlat,
            other => return Err(fmt(format!("createType {other:?} is not a flat VMDK"))),
        };
        let [extent] = &desc.extents[..] else {
            return Err(fmt(format!(
                "{} extents (only single-extent flat VMDKs are supported)",
                desc.extents.len()
            )));
        };
        if !matches!(extent.kind.as_str(), "FLAT" | "VMFS") {
            return Err(fmt(format!("extent type {} is not flat", extent.kind)));
        }
        if extent.access != "RW" && writable {
            return Err(fmt(format!("extent is {}, not RW", extent.access)));
        }
        let offset_bytes = extent
            .offset_sectors
            .unwrap_or(0)
            .checked_mul(512)
            .ok_or_else(|| fmt("extent offset out of range".into()))?;
        let size_bytes = extent
            .sectors
            .checked_mul(512)
            .filter(|s| s.checked_add(offset_bytes).is_some())
            .ok_or_else(|| fmt("extent size out of range".into()))?;
        let dir = descriptor_path.parent().unwrap_or(Path::new("."));
        let extent_path = dir.join(&extent.file);
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&extent_path)
            .map_err(|source| ImageError::Open {
                path: extent_path.clone(),
                source,
            })?;
        let mut storage = FileStorage::new(file);
        let open_err = |source| ImageError::Open {
            path: extent_path.clone(),
            source,
        };
        let need = offset_bytes + size_bytes;
        let len = storage.len().map_err(open_err)?;
        if len < need {
            if writable {
                tracing::warn!(
                    "{}: data file is {len} bytes, the descriptor says {need}; extending it",
                    extent_path.display()
                );
                storage.set_len(need).map_err(open_err)?;
                storage.sync().map_err(open_err)?;
            } else {
                tracing::warn!(
                    "{}: data file is {len} bytes, the descriptor says {need}; the rest reads as zeros",
                    extent_path.display()
                );
            }
        }
        if writable {
            if let Some((fixed, what)) = descriptor::fix_header_traps(&text) {
                tracing::warn!(
                    "{}: rewriting the descriptor header qemu misreads ({})",
                    descriptor_path.display(),
                    what.join(", ")
                );
                tidemark_common::durable::write_atomic(descriptor_path, fixed.as_bytes(), 0o644)
                    .map_err(|source| ImageError::Write {
                        path: descriptor_path.to_path_buf(),
                        offset_bytes: 0,
                        source,
                    })?;
                text = fixed;
            }
        }
        Ok(FlatImage {
            descriptor_path: descriptor_path.to_path_buf(),
            extent_path,
            storage,
            offset_bytes,
            size_bytes,
            uuid: desc.uuid,
            text,
            kind,
            writable,
            poisoned: false,
            cid_bumped: false,
        })
    }

    pub fn kind(&self) -> FlatKind {
        self.kind
    }

    pub fn uuid(&self) -> Option<DiskUuid> {
        self.uuid
    }

    pub fn descriptor_path(&self) -> &Path {
        &self.descriptor_path
    }

    pub fn extent_path(&self) -> &Path {
        &self.extent_path
    }

    pub fn descriptor_text(&self) -> &str {
        &self.text
    }

    fn check(&self, offset_bytes: u64, len_bytes: u64, write: bool) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned {
                path: self.extent_path.clone(),
            });
        }
        if write && !self.writable {
            return Err(ImageError::Write {
                path: self.extent_path.clone(),
                offset_bytes,
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "image is open read-only",
                ),
            });
        }
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ImageError::OutOfRange {
                path: self.extent_path.clone(),
                offset_bytes,
                len_bytes,
                size_bytes: self.size_bytes,
            }),
        }
    }

    /// `write_at`, or with `direct` `write_direct`.
    fn write_data(
        &mut self,
        offset_bytes: u64,
        data: &[u8],
        direct: bool,
    ) -> Result<(), ImageError> {
        self.check(offset_bytes, data.len() as u64, true)?;
        self.bump_cid()?;
        let at = self.offset_bytes + offset_bytes;
        let r = if direct {
            self.storage.write_direct(data, at)
        } else {
            self.storage.write_at(data, at)
        };
        r.map_err(|e| self.write_err(offset_bytes, e))
    }

    fn write_err(&mut self, offset_bytes: u64, source: std::io::Error) -> ImageError {
        self.poisoned = true;
        ImageError::Write {
            path: self.extent_path.clone(),
            offset_bytes,
            source,
        }
    }

    /// A new CID on the first modification of a session (FORMATS.md §1.6),
    /// written with an atomic replace of the descriptor.
    fn bump_cid(&mut self) -> Result<(), ImageError> {
        if self.cid_bumped {
            return Ok(());
        }
        self.cid_bumped = true;
        let old = descriptor::parse(&self.text).ok().and_then(|d| d.cid);
        let Some(text) = descriptor::replace_cid(&self.text, descriptor::next_cid(old)) else {
            return Ok(());
        };
        tidemark_common::durable::write_atomic(&self.descriptor_path, text.as_bytes(), 0o644)
            .map_err(|source| {
                self.poisoned = true;
                ImageError::Write {
                    path: self.descriptor_path.clone(),
                    offset_bytes: 0,
                    source,
                }
            })?;
        self.text = text;
        Ok(())
    }
}

impl Image for FlatImage {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_data(offset_bytes, data, false)
    }

    fn write_direct(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.write_data(offset_bytes, data, true)
    }

    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        self.check(offset_bytes, len_bytes, true)?;
        self.bump_cid()?;
        // Deallocates where the filesystem can, writes zeros where not.
        let at = self.offset_bytes + offset_bytes;
        self.storage
            .punch_hole(at, len_bytes)
            .map_err(|e| self.write_err(offset_bytes, e))
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check(offset_bytes, buf.len() as u64, false)?;
        self.storage
            .read_at(buf, self.offset_bytes + offset_bytes)
            .map_err(|source| ImageError::Read {
                path: self.extent_path.clone(),
                offset_bytes,
                source,
            })
    }

    fn read_cached(&mut self, offset_bytes: u64, buf: &mut [u8]) -> bool {
        self.check(offset_bytes, buf.len() as u64, false).is_ok()
            && self
                .storage
                .read_cached(buf, self.offset_bytes + offset_bytes)
    }

    fn is_hole(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        self.check(offset_bytes, len_bytes, false).is_ok()
            && self
                .storage
                .is_hole(self.offset_bytes + offset_bytes, len_bytes)
    }

    fn prefetch(&self, offset_bytes: u64, len_bytes: u64) {
        let len = len_bytes.min(self.size_bytes.saturating_sub(offset_bytes));
        self.storage.prefetch(self.offset_bytes + offset_bytes, len);
    }

    fn reader(&self) -> Option<Box<dyn Image>> {
        Some(Box::new(FlatImage {
            descriptor_path: self.descriptor_path.clone(),
            extent_path: self.extent_path.clone(),
            storage: self.storage.reopen_read_only()?,
            offset_bytes: self.offset_bytes,
            size_bytes: self.size_bytes,
            text: self.text.clone(),
            uuid: self.uuid,
            kind: self.kind,
            writable: false,
            poisoned: false,
            cid_bumped: self.cid_bumped,
        }))
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.poisoned {
            return Err(ImageError::Poisoned {
                path: self.extent_path.clone(),
            });
        }
        if !self.writable {
            return Ok(());
        }
        self.storage.sync().map_err(|source| {
            self.poisoned = true;
            ImageError::Sync {
                path: self.extent_path.clone(),
                source,
            }
        })
    }
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
    fn a_grown_flat_vmdk_has_its_descriptors_say_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuid = [4u8; 16];
        let (v, mut img) = create(dir.path(), "g", 1 << 20, &uuid).expect("create");
        img.write_at(0, &[5; 512]).expect("write");
        drop(img);
        grow(&v.extent, 3 << 20).expect("grow");
        let found = scan(dir.path()).expect("scan");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].size_bytes, 3 << 20);
        assert_eq!(found[0].uuid, Some(uuid));
        for name in ["g.vmdk", "g-hosted.vmdk"] {
            let text = std::fs::read_to_string(dir.path().join(name)).expect("read");
            let v = parse(&dir.path().join(name), &text).expect("parses");
            assert_eq!(v.size_bytes, 3 << 20, "{name}");
            assert!(text.contains(&format!(
                "ddb.geometry.cylinders = \"{}\"",
                6144 / (255 * 63)
            )));
        }
        assert_eq!(std::fs::metadata(&v.extent).expect("stat").len(), 3 << 20);
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

    #[test]
    fn flat_images_write_read_and_bump_the_cid_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let u = [0x60, 0, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let p = dir.path().join("d.vmdk");
        let mut img = FlatImage::create(&p, 1 << 20, &u, FlatKind::Vmfs).expect("create");
        assert!(FlatImage::create(&p, 1 << 20, &u, FlatKind::Vmfs).is_err());
        img.write_at(4096, &[5u8; 8192]).expect("write");
        img.write_zeroes(8192, 512).expect("zero");
        img.flush().expect("flush");
        drop(img);
        assert_eq!(
            std::fs::metadata(dir.path().join("d-flat.vmdk"))
                .expect("extent")
                .len(),
            1 << 20
        );
        let text = std::fs::read_to_string(&p).expect("descriptor");
        let desc = descriptor::parse(&text).expect("parse");
        let mut img = FlatImage::open(&p, text.clone(), &desc, true).expect("open");
        assert_eq!(img.uuid(), Some(u));
        assert_eq!(img.kind(), FlatKind::Vmfs);
        let mut b = vec![0u8; 8192];
        img.read_at(4096, &mut b).expect("read");
        assert!(b[..4096].iter().all(|&x| x == 5));
        assert!(b[4096..4608].iter().all(|&x| x == 0));
        assert!(b[4608..].iter().all(|&x| x == 5));
        img.write_at(0, &[1]).expect("write");
        img.write_at(1, &[1]).expect("write");
        let after = std::fs::read_to_string(&p).expect("descriptor");
        assert_ne!(descriptor::parse(&after).expect("parse").cid, desc.cid);
        assert_eq!(after.len(), text.len(), "only the CID changed");
        assert!(matches!(
            img.write_at(1 << 20, &[1]),
            Err(ImageError::OutOfRange { .. })
        ));
    }
}
