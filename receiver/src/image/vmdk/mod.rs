//! VMDK images (VMware Virtual Disk Format 5.0; FORMATS.md §1).
//!
//! Live images, written in place through [`crate::image::Image`]:
//! - [`VmdkKind::FlatVmfs`] (the default): `<name>.vmdk`, a descriptor with
//!   `createType="vmfs"` that ESXi runs directly, and `<name>-flat.vmdk`,
//!   the disk byte for byte in a sparse file (zero writes punch holes);
//! - [`VmdkKind::MonolithicFlat`]: the same with a descriptor for hosted
//!   products, qemu and cloud-hypervisor;
//! - [`VmdkKind::MonolithicSparse`]: one hosted sparse file, crash-safe by
//!   write ordering (see [`sparse`]), up to [`max_size_bytes`].
//!
//! Export only: [`export_stream`] writes streamOptimized (OVA, vCenter).
//!
//! Every image we create carries the disk's UUID as `ddb.uuid` (16 hex
//! bytes, `"60 00 c2 9a …-…"`, FORMATS.md §1.3): ESXi shows it to a guest
//! with `disk.EnableUUID` as the disk's serial, and [`probe`] finds it
//! again to match a disk to the very VMDK its guest saw.

pub mod descriptor;
pub mod flat;
pub mod sparse;
pub mod sparse_header;
pub mod stream;
pub mod validate;

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use stream::export_stream;
pub use validate::{validate_sparse, validate_stream};

use self::descriptor::{DescriptorError, FlatKind};
use self::flat::{FlatImage, MAX_DESCRIPTOR_BYTES};
use self::sparse::SparseImage;
use self::sparse_header::{
    SparseHeader, FLAG_COMPRESSED, MAGIC, MAX_DESCRIPTOR_SECTORS, SECTOR_BYTES,
};
use super::storage::{FileStorage, Storage};
use super::{DiskUuid, Image, ImageError};

/// The live VMDK variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmdkKind {
    /// ESXi: `createType="vmfs"` descriptor plus a `-flat.vmdk` data file.
    FlatVmfs,
    /// Hosted products and qemu: `createType="monolithicFlat"` plus a
    /// `-flat.vmdk` data file.
    MonolithicFlat,
    /// Hosted sparse: one file, embedded descriptor, 64 KiB grains.
    MonolithicSparse,
}

impl VmdkKind {
    /// The descriptor's `createType`.
    pub fn create_type(self) -> &'static str {
        match self {
            VmdkKind::FlatVmfs => "vmfs",
            VmdkKind::MonolithicFlat => "monolithicFlat",
            VmdkKind::MonolithicSparse => "monolithicSparse",
        }
    }

    fn from_create_type(t: &str) -> Option<VmdkKind> {
        [
            VmdkKind::FlatVmfs,
            VmdkKind::MonolithicFlat,
            VmdkKind::MonolithicSparse,
        ]
        .into_iter()
        .find(|k| k.create_type().eq_ignore_ascii_case(t))
    }

    fn flat(self) -> Option<FlatKind> {
        match self {
            VmdkKind::FlatVmfs => Some(FlatKind::Vmfs),
            VmdkKind::MonolithicFlat => Some(FlatKind::MonolithicFlat),
            VmdkKind::MonolithicSparse => None,
        }
    }
}

/// vSphere's largest virtual disk, 62 TB (vSphere configuration maximums,
/// "Virtual disk size", VMFS-5/6).
const VMFS_MAX_BYTES: u64 = 62 << 40;

/// A FLAT extent is bounded only by file offsets (`off_t`); hosted
/// products have lower limits of their own.
const FLAT_MAX_BYTES: u64 = (i64::MAX as u64) & !(SECTOR_BYTES - 1);

/// The largest disk each kind can hold.
pub fn max_size_bytes(kind: VmdkKind) -> u64 {
    match kind {
        VmdkKind::FlatVmfs => VMFS_MAX_BYTES,
        VmdkKind::MonolithicFlat => FLAT_MAX_BYTES,
        VmdkKind::MonolithicSparse => sparse::max_size_bytes(),
    }
}

enum Inner {
    Flat(FlatImage),
    Sparse(SparseImage),
}

/// A VMDK open as a live image.
pub struct VmdkImage {
    kind: VmdkKind,
    inner: Inner,
}

fn format_err(path: &Path, message: impl Into<String>) -> ImageError {
    ImageError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// What the first bytes of a file say it is.
enum Probed {
    /// A hosted sparse extent (`KDMV`) with its header.
    Sparse(SparseHeader),
    /// A small text file that parses as a descriptor.
    Descriptor(String, descriptor::Descriptor),
    NotVmdk,
}

fn probe_file(path: &Path) -> Result<Probed, ImageError> {
    let open_err = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Ok(Probed::NotVmdk);
    }
    let storage = FileStorage::new(file);
    let len = meta.len();
    let mut head = [0u8; 512];
    storage.read_at(&mut head, 0).map_err(open_err)?;
    if len >= 512 && head[0..4] == MAGIC.to_le_bytes() {
        return SparseHeader::decode(&head)
            .map(Probed::Sparse)
            .map_err(|e| format_err(path, format!("hosted sparse header: {e}")));
    }
    if len > MAX_DESCRIPTOR_BYTES || len == 0 {
        return Ok(Probed::NotVmdk);
    }
    let mut bytes = vec![0u8; len as usize];
    storage.read_at(&mut bytes, 0).map_err(open_err)?;
    // qemu-img convert pads descriptor files with NULs to a sector.
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    if bytes[end..].iter().any(|&b| b != 0) {
        return Ok(Probed::NotVmdk);
    }
    bytes.truncate(end);
    let Ok(text) = String::from_utf8(bytes) else {
        return Ok(Probed::NotVmdk);
    };
    match descriptor::parse(&text) {
        Ok(d) => Ok(Probed::Descriptor(text, d)),
        Err(e @ DescriptorError::ParseExtent { .. }) if text.starts_with(descriptor::SIGNATURE) => {
            Err(format_err(path, e.to_string()))
        }
        Err(_) => Ok(Probed::NotVmdk),
    }
}

/// The descriptor embedded in a sparse extent.
fn embedded_descriptor(
    storage: &dyn Storage,
    path: &Path,
    h: &SparseHeader,
) -> Result<descriptor::Descriptor, ImageError> {
    if h.flags & FLAG_COMPRESSED != 0 {
        return Err(format_err(
            path,
            "a streamOptimized (compressed) VMDK: export-only, not a live image",
        ));
    }
    let len = storage.len().map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let end = h
        .descriptor_offset_sectors
        .checked_add(h.descriptor_sectors)
        .and_then(|e| e.checked_mul(SECTOR_BYTES));
    if h.descriptor_offset_sectors == 0
        || h.descriptor_sectors > MAX_DESCRIPTOR_SECTORS
        || end.is_none_or(|e| e > len)
    {
        return Err(format_err(
            path,
            "no embedded descriptor (an extent of a split image, or damaged)",
        ));
    }
    let mut b = vec![0u8; (h.descriptor_sectors * SECTOR_BYTES) as usize];
    storage
        .read_at(&mut b, h.descriptor_offset_sectors * SECTOR_BYTES)
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            offset_bytes: h.descriptor_offset_sectors * SECTOR_BYTES,
            source,
        })?;
    descriptor::parse_bytes(&b)
        .map(|(_, d)| d)
        .map_err(|e| format_err(path, format!("embedded descriptor: {e}")))
}

/// Reads only the descriptor of `path`: `Some((ddb.uuid if present, kind,
/// virtual size))` for a live-image VMDK (a descriptor file, or a sparse
/// file with its embedded descriptor), None for anything that is not a
/// VMDK. A VMDK of another kind (streamOptimized, split, delta) or a
/// damaged one is an error. Never panics, whatever the bytes.
pub fn probe(path: &Path) -> Result<Option<(Option<DiskUuid>, VmdkKind, u64)>, ImageError> {
    let desc = match probe_file(path)? {
        Probed::NotVmdk => return Ok(None),
        Probed::Descriptor(_, d) => d,
        Probed::Sparse(h) => {
            let file = std::fs::File::open(path).map_err(|source| ImageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
            let d = embedded_descriptor(&FileStorage::new(file), path, &h)?;
            let ok = VmdkKind::from_create_type(&d.create_type) == Some(VmdkKind::MonolithicSparse);
            if !ok {
                return Err(format_err(
                    path,
                    format!("sparse extent with createType {:?}", d.create_type),
                ));
            }
            return Ok(Some((
                d.uuid,
                VmdkKind::MonolithicSparse,
                h.capacity_sectors * SECTOR_BYTES,
            )));
        }
    };
    let kind = match VmdkKind::from_create_type(&desc.create_type) {
        Some(k @ (VmdkKind::FlatVmfs | VmdkKind::MonolithicFlat)) => k,
        _ => {
            return Err(format_err(
                path,
                format!(
                "descriptor of createType {:?} (supported: vmfs, monolithicFlat, monolithicSparse)",
                desc.create_type
            ),
            ))
        }
    };
    let size = desc
        .size_bytes()
        .ok_or_else(|| format_err(path, "extent sizes overflow"))?;
    Ok(Some((desc.uuid, kind, size)))
}

/// True if `path` is a data file of a VMDK rather than an image of its own:
/// an extent named by a descriptor in the same directory, or, with no
/// descriptor left, a file named like one (`*-flat.vmdk`, `*-f001.vmdk`,
/// `*-s001.vmdk`) that is not itself a VMDK. Descriptors and monolithic
/// sparse files are images (false).
pub fn is_extent_file(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let same = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let p = entry.path();
            let small = entry
                .metadata()
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_DESCRIPTOR_BYTES);
            if !small || same(&p) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            if let Ok(d) = descriptor::parse(&text) {
                if d.extents.iter().any(|e| same(&dir.join(&e.file))) {
                    return true;
                }
            }
        }
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let numbered = |tag: char| {
        name.strip_suffix(".vmdk")
            .and_then(|s| s.get(s.len().saturating_sub(5)..))
            .is_some_and(|t| {
                let b = t.as_bytes();
                b.len() == 5
                    && b[0] == b'-'
                    && b[1] == tag as u8
                    && b[2..].iter().all(u8::is_ascii_digit)
            })
    };
    let conventional = name.ends_with("-flat.vmdk") || numbered('f') || numbered('s');
    conventional && !matches!(probe(path), Ok(Some(_)))
}

impl VmdkImage {
    /// Creates a new image at `path` (the descriptor for flat kinds, with
    /// the data file `<name>-flat.vmdk` beside it; the one file for
    /// sparse), sized `size_bytes` (a multiple of 512), carrying `uuid`.
    /// Fails if a file exists, or if the kind cannot hold the size.
    pub fn create_file(
        path: &Path,
        size_bytes: u64,
        uuid: DiskUuid,
        kind: VmdkKind,
    ) -> Result<VmdkImage, ImageError> {
        let max_bytes = max_size_bytes(kind);
        if size_bytes > max_bytes {
            return Err(ImageError::TooLarge {
                path: path.to_path_buf(),
                size_bytes,
                max_bytes,
                format: match kind {
                    VmdkKind::FlatVmfs => "an ESXi (vmfs) VMDK",
                    VmdkKind::MonolithicFlat => "a monolithicFlat VMDK",
                    VmdkKind::MonolithicSparse => {
                        "a monolithicSparse VMDK (use the flat vmdk format)"
                    }
                },
            });
        }
        let inner = match kind.flat() {
            Some(f) => Inner::Flat(FlatImage::create(path, size_bytes, &uuid, f)?),
            None => {
                let create_err = |source| ImageError::Create {
                    path: path.to_path_buf(),
                    source,
                };
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(create_err)?;
                let img =
                    SparseImage::create(Box::new(FileStorage::new(file)), path, size_bytes, &uuid);
                let img = match img {
                    Ok(img) => img,
                    Err(e) => {
                        let _ = std::fs::remove_file(path);
                        return Err(e);
                    }
                };
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                tidemark_common::durable::sync_dir(dir).map_err(create_err)?;
                Inner::Sparse(img)
            }
        };
        Ok(VmdkImage { kind, inner })
    }

    /// Opens a VMDK: ours, or one made by qemu-img or VMware
    /// (monolithicFlat, vmfs, monolithicSparse). When `writable`, repairs
    /// what it can (logged as warnings): a crash-interrupted sparse extent,
    /// a data file shorter than the disk, descriptor lines qemu misreads.
    pub fn open_file(path: &Path, writable: bool) -> Result<VmdkImage, ImageError> {
        match probe_file(path)? {
            Probed::NotVmdk => Err(format_err(path, "not a VMDK")),
            Probed::Descriptor(text, d) => {
                let img = FlatImage::open(path, text, &d, writable)?;
                let kind = match img.kind() {
                    FlatKind::Vmfs => VmdkKind::FlatVmfs,
                    FlatKind::MonolithicFlat => VmdkKind::MonolithicFlat,
                };
                Ok(VmdkImage {
                    kind,
                    inner: Inner::Flat(img),
                })
            }
            Probed::Sparse(_) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(path)
                    .map_err(|source| ImageError::Open {
                        path: path.to_path_buf(),
                        source,
                    })?;
                Self::open_sparse(Box::new(FileStorage::new(file)), path, writable)
            }
        }
    }

    /// Creates a monolithicSparse image on empty `storage` (tests use
    /// [`crate::image::storage::CrashStorage`]).
    pub fn create_sparse(
        storage: Box<dyn Storage>,
        path_for_errors: &Path,
        size_bytes: u64,
        uuid: DiskUuid,
    ) -> Result<VmdkImage, ImageError> {
        Ok(VmdkImage {
            kind: VmdkKind::MonolithicSparse,
            inner: Inner::Sparse(SparseImage::create(
                storage,
                path_for_errors,
                size_bytes,
                &uuid,
            )?),
        })
    }

    /// Opens a monolithicSparse image on `storage`.
    pub fn open_sparse(
        storage: Box<dyn Storage>,
        path_for_errors: &Path,
        writable: bool,
    ) -> Result<VmdkImage, ImageError> {
        Ok(VmdkImage {
            kind: VmdkKind::MonolithicSparse,
            inner: Inner::Sparse(SparseImage::open(storage, path_for_errors, writable)?),
        })
    }

    /// The `ddb.uuid`, if the descriptor has one.
    pub fn uuid(&self) -> Option<DiskUuid> {
        match &self.inner {
            Inner::Flat(f) => f.uuid(),
            Inner::Sparse(s) => s.uuid(),
        }
    }

    pub fn kind(&self) -> VmdkKind {
        self.kind
    }

    /// The files of the image: descriptor and data file, or the one file
    /// (for [`VmdkImage::create_sparse`], the path given for errors).
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.inner {
            Inner::Flat(f) => vec![
                f.descriptor_path().to_path_buf(),
                f.extent_path().to_path_buf(),
            ],
            Inner::Sparse(s) => vec![s.path().to_path_buf()],
        }
    }

    /// Flushes and, for sparse images, marks the extent closed cleanly
    /// (dropping does the same but can only log a failure).
    pub fn close(self) -> Result<(), ImageError> {
        match self.inner {
            Inner::Flat(mut f) => f.flush(),
            Inner::Sparse(s) => s.close(),
        }
    }

    fn image(&mut self) -> &mut dyn Image {
        match &mut self.inner {
            Inner::Flat(f) => f,
            Inner::Sparse(s) => s,
        }
    }
}

impl Image for VmdkImage {
    fn size_bytes(&self) -> u64 {
        match &self.inner {
            Inner::Flat(f) => f.size_bytes(),
            Inner::Sparse(s) => s.size_bytes(),
        }
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.image().write_at(offset_bytes, data)
    }

    fn write_direct(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), ImageError> {
        self.image().write_direct(offset_bytes, data)
    }

    fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), ImageError> {
        self.image().write_zeroes(offset_bytes, len_bytes)
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.image().read_at(offset_bytes, buf)
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        self.image().flush()
    }

    // A sparse VMDK maps ranges through grain tables that only its own
    // handle keeps current, so it keeps the trait's defaults.
    fn read_cached(&mut self, offset_bytes: u64, buf: &mut [u8]) -> bool {
        match &mut self.inner {
            Inner::Flat(f) => f.read_cached(offset_bytes, buf),
            Inner::Sparse(_) => false,
        }
    }

    fn is_hole(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        match &self.inner {
            Inner::Flat(f) => f.is_hole(offset_bytes, len_bytes),
            Inner::Sparse(_) => false,
        }
    }

    fn prefetch(&self, offset_bytes: u64, len_bytes: u64) {
        if let Inner::Flat(f) = &self.inner {
            f.prefetch(offset_bytes, len_bytes);
        }
    }

    fn reader(&self) -> Option<Box<dyn Image>> {
        match &self.inner {
            Inner::Flat(f) => f.reader(),
            Inner::Sparse(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: DiskUuid = [0x60, 0, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn every_kind_round_trips_through_files_and_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        for kind in [
            VmdkKind::FlatVmfs,
            VmdkKind::MonolithicFlat,
            VmdkKind::MonolithicSparse,
        ] {
            let p = dir.path().join(format!("{kind:?}.vmdk"));
            let mut img = VmdkImage::create_file(&p, 3 << 20, U, kind).expect("create");
            assert!(
                VmdkImage::create_file(&p, 3 << 20, U, kind).is_err(),
                "no clobbering"
            );
            img.write_at(12345, &[0xa5; 100000]).expect("write");
            img.close().expect("close");
            assert_eq!(probe(&p).expect("probe"), Some((Some(U), kind, 3 << 20)));
            let mut img = VmdkImage::open_file(&p, false).expect("open");
            assert_eq!((img.kind(), img.uuid()), (kind, Some(U)));
            let mut b = vec![0u8; 100002];
            img.read_at(12344, &mut b).expect("read");
            assert_eq!(b[0], 0);
            assert!(b[1..100001].iter().all(|&x| x == 0xa5));
            assert_eq!(b[100001], 0);
            assert!(img.write_at(0, &[1]).is_err(), "read-only");
            assert!(!is_extent_file(&p));
        }
        let extent = dir.path().join("FlatVmfs-flat.vmdk");
        assert!(is_extent_file(&extent));
        assert_eq!(probe(&extent).expect("probe"), None);
    }

    /// The session reads pre-images and hashes beside its writes through
    /// these (or from the page cache at once), and skips holes; the
    /// default live format must offer them.
    #[test]
    fn flat_kinds_know_holes_and_read_on_other_threads_sparse_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        for kind in [VmdkKind::FlatVmfs, VmdkKind::MonolithicFlat] {
            let p = dir.path().join(format!("{kind:?}.vmdk"));
            let mut img = VmdkImage::create_file(&p, 8 << 20, U, kind).expect("create");
            assert!(img.is_hole(0, 8 << 20), "{kind:?}: a new image is a hole");
            img.write_at(3 << 20, &[0x5a; 4096]).expect("write");
            assert!(!img.is_hole(0, 8 << 20));
            assert!(!img.is_hole((3 << 20) + 4095, 1));
            assert!(img.is_hole(4 << 20, 4 << 20));
            assert!(!img.is_hole(8 << 20, 1), "beyond the end is no hole");
            let mut b = vec![0u8; 4096];
            assert!(img.read_cached(3 << 20, &mut b), "{kind:?}: just written");
            assert!(b.iter().all(|&x| x == 0x5a), "{kind:?}: its own bytes");
            assert!(!img.read_cached((8 << 20) - 2048, &mut b), "past the end");
            let mut reader = img.reader().expect("flat images read on other threads");
            let seen = std::thread::spawn(move || {
                let mut b = vec![0u8; 4098];
                reader.read_at((3 << 20) - 1, &mut b).expect("read");
                let refused = reader.write_at(0, &[1]).is_err();
                (b, refused)
            })
            .join()
            .expect("reader thread");
            assert_eq!(seen.0[0], 0);
            assert!(seen.0[1..4097].iter().all(|&x| x == 0x5a), "{kind:?}");
            assert_eq!(seen.0[4097], 0);
            assert!(seen.1, "{kind:?}: the reader cannot write");
            img.write_zeroes(3 << 20, 1 << 20).expect("punch");
            assert!(img.is_hole(0, 8 << 20));
        }
        let p = dir.path().join("sparse.vmdk");
        let mut img =
            VmdkImage::create_file(&p, 8 << 20, U, VmdkKind::MonolithicSparse).expect("create");
        assert!(!img.is_hole(0, 8 << 20), "a sparse VMDK cannot tell");
        img.write_at(0, &[0x5a; 4096]).expect("write");
        assert!(
            !img.read_cached(0, &mut [0u8; 4096]),
            "nor read past its tables"
        );
        assert!(img.reader().is_none());
    }

    #[test]
    fn probe_says_none_for_other_files_and_never_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x");
        for bytes in [
            &b""[..],
            b"hello world\n",
            b"createType=\"vmfs\"\n",
            b"\x00\x01\x02garbage",
            &[0x4b; 4096],
        ] {
            std::fs::write(&p, bytes).expect("write");
            assert_eq!(probe(&p).expect("probe"), None, "{bytes:?}");
        }
        let mut x = 88172645463325252u64;
        for i in 0..500 {
            let mut b = Vec::new();
            for _ in 0..(i * 7 % 2000) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(x as u8);
            }
            if i % 3 == 0 {
                b.splice(0..0, *b"KDMV");
            }
            std::fs::write(&p, &b).expect("write");
            let _ = probe(&p);
            let _ = VmdkImage::open_file(&p, false);
        }
        assert!(!is_extent_file(&p));
    }

    #[test]
    fn other_vmdk_kinds_are_errors_not_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("d.raw");
        let mut src = crate::image::raw::RawImage::create(&raw, 1 << 20).expect("raw");
        src.write_at(0, &[1u8; 4096]).expect("write");
        let stream = dir.path().join("s.vmdk");
        export_stream(&mut src, 1 << 20, U, &stream, 1).expect("export");
        let e = probe(&stream).expect_err("a stream is not a live image");
        assert!(e.to_string().contains("streamOptimized"), "{e}");
        assert!(VmdkImage::open_file(&stream, false).is_err());
        let split = dir.path().join("split.vmdk");
        std::fs::write(
            &split,
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\nRW 2048 FLAT \"split-f001.vmdk\" 0\n",
        )
        .expect("descriptor");
        std::fs::write(dir.path().join("split-f001.vmdk"), vec![0u8; 1 << 20]).expect("extent");
        assert!(probe(&split).is_err());
        assert!(is_extent_file(&dir.path().join("split-f001.vmdk")));
        assert!(!is_extent_file(&raw));
    }

    #[test]
    fn the_sparse_limit_is_refused_in_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = VmdkImage::create_file(
            &dir.path().join("s.vmdk"),
            2 << 40,
            U,
            VmdkKind::MonolithicSparse,
        )
        .err()
        .expect("too large");
        let msg = e.to_string();
        assert!(
            msg.contains("monolithicSparse") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(!dir.path().join("s.vmdk").exists());
    }
}
