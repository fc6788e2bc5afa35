//! Fixed VHDs as live images: the disk byte for byte, then the footer
//! (FORMATS.md §2.2). The footer is written once, when the image is made,
//! and replication writes only ever touch the data before it, so a crash
//! can never leave a footer that disagrees with the data: there is no
//! metadata to keep in step.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::footer::{fixed_size, Footer, DISK_TYPE_FIXED, FOOTER_BYTES};
use crate::image::raw::RawImage;
use crate::image::{DiskUuid, ImageError};

/// Creates `path` as a fixed VHD holding a disk of `disk_bytes` (rounded
/// up to whole MiB, which Azure requires), carrying `uuid`. The file is
/// complete (footer and all) under a temporary name before it appears
/// under its own, so a crash leaves either no image or a whole one.
pub fn create(path: &Path, disk_bytes: u64, uuid: DiskUuid) -> Result<RawImage, ImageError> {
    let create_err = |source| ImageError::Create {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        return Err(create_err(std::io::Error::from(
            std::io::ErrorKind::AlreadyExists,
        )));
    }
    let virtual_size = fixed_size(disk_bytes);
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = Path::new(&partial);
    let made = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(partial)?;
        file.set_len(virtual_size + FOOTER_BYTES as u64)?;
        file.write_all_at(&Footer::fixed(virtual_size, uuid).encode(), virtual_size)?;
        file.sync_all()?;
        std::fs::rename(partial, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        tidemark_common::durable::sync_dir(dir)
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(partial);
        return Err(create_err(e));
    }
    RawImage::open_prefix(path, true, Some(virtual_size))
}

/// Reads the footer at the end of `path`: Some for a fixed VHD, None for a
/// file that does not end in a valid fixed-disk footer.
pub fn footer(path: &Path) -> Result<Option<Footer>, ImageError> {
    let open_err = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    if len < FOOTER_BYTES as u64 {
        return Ok(None);
    }
    let mut b = [0u8; FOOTER_BYTES];
    file.read_exact_at(&mut b, len - FOOTER_BYTES as u64)
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            offset_bytes: len - FOOTER_BYTES as u64,
            source,
        })?;
    Ok(Footer::decode(&b)
        .filter(|f| f.disk_type == DISK_TYPE_FIXED && f.current_size == len - FOOTER_BYTES as u64))
}

/// Opens a fixed VHD (ours, or one made by qemu-img or Hyper-V): the disk
/// is everything before the footer.
pub fn open(path: &Path, writable: bool) -> Result<RawImage, ImageError> {
    let Some(f) = footer(path)? else {
        return Err(ImageError::Format {
            path: path.to_path_buf(),
            message: "no fixed-disk VHD footer at the end of the file".into(),
        });
    };
    RawImage::open_prefix(path, writable, Some(f.current_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;

    #[test]
    fn writes_never_reach_the_footer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("d.vhd");
        let mut img = create(&p, (3 << 20) + 512, [9; 16]).expect("create");
        assert_eq!(img.size_bytes(), 4 << 20);
        img.write_at((4 << 20) - 4096, &[0xee; 4096]).expect("last");
        assert!(img.write_at(4 << 20, &[1]).is_err());
        img.flush().expect("flush");
        let f = footer(&p).expect("read").expect("footer");
        assert_eq!((f.current_size, f.uuid), (4 << 20, [9; 16]));
        assert_eq!(open(&p, false).expect("open").size_bytes(), 4 << 20);
        assert!(create(&p, 1 << 20, [1; 16]).is_err(), "must not clobber");
        std::fs::write(dir.path().join("junk"), [0u8; 4096]).expect("junk");
        assert!(footer(&dir.path().join("junk")).expect("read").is_none());
    }
}
