//! Dynamic VHD export: a sequential writer into a fresh file, not a live
//! image. The layout is the live one ([`super::dynamic`]): blocks in
//! ascending disk order, all-zero blocks left out, and within a block only
//! the non-zero pages written (the rest stays a hole, which reads as
//! zeros). Nothing references the file until this returns, so there is
//! no write ordering to keep: one sync at the end.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::dynamic::check_create_size;
use super::footer::Footer;
use super::header::{
    encode_bat, place_block, DynamicHeader, BAT_OFFSET, BAT_UNUSED, DATA_ALIGN_BYTES,
    HEADER_OFFSET, SECTOR_BYTES,
};
use crate::image::vmdk::sparse::is_zero;
use crate::image::{DiskUuid, Image, ImageError};

/// Writes `src` (a disk of `size_bytes`, rounded up to a sector) as a new
/// dynamic VHD at `out`, which must not exist; on failure `out` is removed.
/// More than [`super::dynamic::MAX_SIZE_BYTES`] is refused with
/// [`ImageError::TooLarge`] before anything is written.
pub fn export_dynamic(
    src: &mut dyn Image,
    size_bytes: u64,
    uuid: DiskUuid,
    out: &Path,
) -> Result<(), ImageError> {
    let vhd_size = size_bytes.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
    check_create_size(out, vhd_size)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|source| ImageError::Create {
            path: out.to_path_buf(),
            source,
        })?;
    match write_dynamic(src, size_bytes, vhd_size, &uuid, out, &file) {
        Ok(()) => {
            let dir = match out.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            tidemark_common::durable::sync_dir(dir).map_err(|source| ImageError::Sync {
                path: out.to_path_buf(),
                source,
            })
        }
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

fn write_dynamic(
    src: &mut dyn Image,
    src_bytes: u64,
    vhd_size: u64,
    uuid: &DiskUuid,
    out: &Path,
    file: &File,
) -> Result<(), ImageError> {
    let write = |data: &[u8], at: u64| {
        file.write_all_at(data, at)
            .map_err(|source| ImageError::Write {
                path: out.to_path_buf(),
                offset_bytes: at,
                source,
            })
    };
    let footer = Footer::dynamic(vhd_size, *uuid, HEADER_OFFSET).encode();
    let header = DynamicHeader::new(vhd_size);
    let block_bytes = u64::from(header.block_bytes);
    let bitmap_bytes = header.bitmap_bytes();
    let mut bat = vec![BAT_UNUSED; header.max_table_entries as usize];
    let mut end = BAT_OFFSET + header.bat_bytes();
    // One buffer per block: the padding and bitmap before the data, so a
    // dense block is a single write.
    let pad = DATA_ALIGN_BYTES as usize;
    let mut buf = vec![0u8; pad + block_bytes as usize];
    for (b, entry) in bat.iter_mut().enumerate() {
        let at = b as u64 * block_bytes;
        let n = block_bytes.min(src_bytes.saturating_sub(at)) as usize;
        let data = &mut buf[pad..];
        src.read_at(at, &mut data[..n])?;
        data[n..].fill(0);
        if is_zero(data) {
            continue;
        }
        let bitmap_at = place_block(end, bitmap_bytes);
        let data_at = bitmap_at + bitmap_bytes;
        *entry = (bitmap_at / SECTOR_BYTES) as u32;
        buf[pad - bitmap_bytes as usize..pad].fill(0xff);
        // Runs of non-zero pages; the first starts at the bitmap.
        let page = DATA_ALIGN_BYTES as usize;
        let pages = block_bytes as usize / page;
        let mut run: Option<usize> = Some(pad - bitmap_bytes as usize);
        for p in 0..=pages {
            let lo = pad + p * page;
            let nonzero = p < pages && !is_zero(&buf[lo..lo + page]);
            match (run, nonzero) {
                (None, true) => run = Some(lo),
                (Some(start), false) => {
                    write(&buf[start..lo], data_at - pad as u64 + start as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        end = data_at + block_bytes;
    }
    let mut bat_bytes = encode_bat(&bat);
    bat_bytes.resize(header.bat_bytes() as usize, 0xff);
    write(&footer, 0)?;
    write(&header.encode(), HEADER_OFFSET)?;
    write(&bat_bytes, BAT_OFFSET)?;
    write(&footer, end)?;
    file.sync_all().map_err(|source| ImageError::Sync {
        path: out.to_path_buf(),
        source,
    })
}
