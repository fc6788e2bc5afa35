//! Structural checks of fixed and dynamic VHDs. `qemu-img check` does not
//! support VHD at all (FORMATS.md §4.1), so these are the checks we have
//! besides reading the data back. They report every problem found, as
//! text, and never panic on any bytes.

use super::footer::{
    Footer, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED, FEATURES, FIXED_DATA_OFFSET, FOOTER_BYTES,
    FORMAT_VERSION, QEMU_MAX_BYTES,
};
use super::header::{
    bit, blocks_for, decode_bat, DynamicHeader, BAT_UNUSED, HEADER_BYTES, HEADER_VERSION,
    NO_NEXT_OFFSET, SECTOR_BYTES,
};
use crate::image::storage::Storage;
use crate::image::vmdk::sparse::is_zero;
use crate::image::vmdk::validate::Problems;

fn read(s: &dyn Storage, len: usize, offset: u64) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    s.read_at(&mut b, offset)
        .map_err(|e| format!("read at {offset}: {e}"))?;
    Ok(b)
}

/// Checks the fields every footer must have right.
fn check_footer(f: &Footer, disk_type: u32, what: &str, p: &mut Problems) {
    if f.features & FEATURES == 0 {
        p.add(format!("{what}: reserved feature bit 1 is clear"));
    }
    if f.format_version != FORMAT_VERSION {
        p.add(format!("{what}: format version {:#x}", f.format_version));
    }
    if f.disk_type != disk_type {
        p.add(format!(
            "{what}: disk type {}, expected {disk_type}",
            f.disk_type
        ));
    }
    if f.current_size == 0 || !f.current_size.is_multiple_of(SECTOR_BYTES) {
        p.add(format!(
            "{what}: current size {} is not whole sectors",
            f.current_size
        ));
    }
    // Above qemu's limit it does not open the file at all, so a size it
    // would compute differently matters only below it.
    if f.current_size <= QEMU_MAX_BYTES && f.qemu_size_bytes() != f.current_size {
        p.add(format!(
            "{what}: qemu sizes the disk at {} bytes, not {} (creator {:?}, CHS {:?}; FORMATS.md §2.4)",
            f.qemu_size_bytes(),
            f.current_size,
            String::from_utf8_lossy(&f.creator_app),
            f.geometry
        ));
    }
}

/// Checks a fixed VHD: a footer in the last 512 bytes (valid checksum,
/// fixed type, data offset all ones, Current Size = the bytes before it,
/// a size qemu computes the same way).
pub fn validate_fixed(storage: &dyn Storage) -> Result<(), String> {
    let mut p = Problems::default();
    let len = storage.len().map_err(|e| format!("length: {e}"))?;
    if len < FOOTER_BYTES as u64 + SECTOR_BYTES {
        return Err(format!("file of {len} bytes holds no disk and footer"));
    }
    if !len.is_multiple_of(SECTOR_BYTES) {
        p.add(format!("file length {len} is not whole sectors"));
    }
    let at = len - FOOTER_BYTES as u64;
    let f = Footer::decode(&read(storage, FOOTER_BYTES, at)?)
        .map_err(|e| format!("footer at {at}: {e}"))?;
    check_footer(&f, DISK_TYPE_FIXED, "footer", &mut p);
    if f.data_offset != FIXED_DATA_OFFSET {
        p.add(format!(
            "footer: data offset {:#x}, expected all ones",
            f.data_offset
        ));
    }
    if f.current_size != at {
        p.add(format!(
            "footer: current size {} but {at} bytes precede the footer",
            f.current_size
        ));
    }
    p.result()
}

/// Checks a dynamic VHD: head footer copy and header (checksums, fields,
/// a size qemu can open), the tail footer byte-identical to the head and
/// the very last bytes of the file, the BAT inside the file, every entry
/// of a block inside the disk, its block (bitmap and data) past the
/// metadata, inside the file and overlapping no other block, nothing but
/// the footer after the last block, and every sector its bitmap marks
/// unwritten holding zeros (qemu reads those sectors, Hyper-V and libvhdi
/// do not: non-zero bytes there mean the readers disagree).
pub fn validate_dynamic(storage: &dyn Storage) -> Result<(), String> {
    let mut p = Problems::default();
    let len = storage.len().map_err(|e| format!("length: {e}"))?;
    if len < (2 * FOOTER_BYTES + HEADER_BYTES) as u64 {
        return Err(format!(
            "file of {len} bytes is too short for a dynamic VHD"
        ));
    }
    if !len.is_multiple_of(SECTOR_BYTES) {
        p.add(format!("file length {len} is not whole sectors"));
    }
    let head_bytes = read(storage, FOOTER_BYTES, 0)?;
    let f = Footer::decode(&head_bytes).map_err(|e| format!("footer copy at 0: {e}"))?;
    check_footer(&f, DISK_TYPE_DYNAMIC, "footer", &mut p);
    if f.current_size > QEMU_MAX_BYTES {
        p.add(format!(
            "current size {} is past qemu's 2040 GiB limit",
            f.current_size
        ));
    }
    let tail_at = len - FOOTER_BYTES as u64;
    let tail_bytes = read(storage, FOOTER_BYTES, tail_at)?;
    if tail_bytes != head_bytes {
        match Footer::decode(&tail_bytes) {
            Ok(_) => p.add("the footer at the end differs from the copy at offset 0".into()),
            Err(e) => p.add(format!("no footer at the end of the file: {e}")),
        }
    }
    let h_at = f.data_offset;
    if h_at < FOOTER_BYTES as u64
        || !h_at.is_multiple_of(SECTOR_BYTES)
        || h_at.saturating_add(HEADER_BYTES as u64) > tail_at
    {
        return Err(format!("footer: dynamic header offset {h_at}"));
    }
    let h = DynamicHeader::decode(&read(storage, HEADER_BYTES, h_at)?)
        .map_err(|e| format!("dynamic header at {h_at}: {e}"))?;
    if h.version != HEADER_VERSION {
        p.add(format!("header version {:#x}", h.version));
    }
    if h.data_offset != NO_NEXT_OFFSET && h.data_offset != u64::from(u32::MAX) {
        p.add(format!(
            "header: data offset {:#x}, expected all ones",
            h.data_offset
        ));
    }
    h.check(f.current_size, tail_at)
        .map_err(|m| format!("dynamic header: {m}"))?;
    let bat_end = h.table_offset + h.bat_bytes();
    let h_end = h_at + HEADER_BYTES as u64;
    // (start, end, what), checked for overlaps below.
    let mut regions: Vec<(u64, u64, String)> = vec![
        (0, FOOTER_BYTES as u64, "footer copy".into()),
        (h_at, h_end, "header".into()),
        (h.table_offset, bat_end, "BAT".into()),
    ];
    let bat = decode_bat(&read(storage, h.bat_bytes() as usize, h.table_offset)?);
    let blocks = blocks_for(f.current_size, h.block_bytes);
    let bitmap_bytes = h.bitmap_bytes();
    let block_bytes = u64::from(h.block_bytes);
    let span = bitmap_bytes + block_bytes;
    let mut end = bat_end.max(h_end);
    let mut allocated = Vec::new();
    for (i, &e) in bat.iter().take(h.max_table_entries as usize).enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let i = i as u64;
        let at = u64::from(e) * SECTOR_BYTES;
        if i >= blocks {
            p.add(format!(
                "BAT entry {i} maps a block past the end of the disk"
            ));
        }
        if at + span > tail_at {
            p.add(format!(
                "block {i} at byte {at} passes the tail footer at {tail_at}"
            ));
            continue;
        }
        end = end.max(at + span);
        regions.push((at, at + span, format!("block {i}")));
        if i < blocks {
            allocated.push((i, at));
        }
    }
    regions.sort();
    for w in regions.windows(2) {
        if w[1].0 < w[0].1 {
            p.add(format!("{} and {} overlap", w[0].2, w[1].2));
        }
    }
    if end < tail_at {
        p.add(format!(
            "{} bytes after the last block, before the tail footer (unreferenced blocks)",
            tail_at - end
        ));
    }
    // Bitmaps: sectors marked unwritten must read as zeros in every reader.
    for (i, at) in allocated {
        let bits = read(storage, bitmap_bytes as usize, at)?;
        let sectors = (f.current_size - i * block_bytes).min(block_bytes) / SECTOR_BYTES;
        if (0..sectors).all(|s| bit(&bits, s)) {
            continue;
        }
        let data = read(
            storage,
            (sectors * SECTOR_BYTES) as usize,
            at + bitmap_bytes,
        )?;
        let dirty = (0..sectors)
            .filter(|&s| !bit(&bits, s))
            .find(|&s| !is_zero(&data[(s * SECTOR_BYTES) as usize..][..SECTOR_BYTES as usize]));
        if let Some(s) = dirty {
            p.add(format!(
                "block {i} sector {s} is marked unwritten but holds data (qemu reads it, libvhdi and Hyper-V read zeros)"
            ));
        }
    }
    p.result()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::image::storage::CrashStorage;
    use crate::image::vhd::{DynamicVhd, FixedVhd};
    use crate::image::Image;

    #[test]
    fn our_images_validate_and_damage_is_named() {
        let s = CrashStorage::new(Vec::new(), None);
        let mut img = DynamicVhd::create(
            Box::new(s.clone()),
            Path::new("d.vhd"),
            (6 << 20) + 512,
            [1; 16],
        )
        .expect("create");
        img.write_at(3 << 20, &[1u8; 70000]).expect("write");
        img.write_at((6 << 20) - 100, &[2u8; 612])
            .expect("write the end");
        img.close().expect("close");
        let good = s.durable();
        validate_dynamic(&CrashStorage::new(good.clone(), None)).expect("valid");

        let mut b = good.clone();
        let n = b.len();
        b[n - 100] ^= 1;
        let e = validate_dynamic(&CrashStorage::new(b, None)).expect_err("tail");
        assert!(e.contains("no footer at the end"), "{e}");

        let mut b = good.clone();
        b.extend_from_slice(&[0u8; 4096]);
        let e = validate_dynamic(&CrashStorage::new(b, None)).expect_err("orphan");
        assert!(e.contains("no footer at the end"), "{e}");

        let mut b = good.clone();
        b[1536..1540].copy_from_slice(&[0, 0, 0, 8]);
        let e = validate_dynamic(&CrashStorage::new(b, None)).expect_err("bat");
        assert!(e.contains("overlap"), "{e}");

        let mut b = good.clone();
        b[4096 - 512] = 0x7f;
        b[4096 + 10] = 1;
        let e = validate_dynamic(&CrashStorage::new(b, None)).expect_err("bitmap");
        assert!(e.contains("sector 0 is marked unwritten"), "{e}");

        let s = CrashStorage::new(Vec::new(), None);
        FixedVhd::create(Box::new(s.clone()), Path::new("f.vhd"), 1 << 20, [1; 16])
            .expect("fixed")
            .close()
            .expect("close");
        let mut b = s.durable();
        validate_fixed(&CrashStorage::new(b.clone(), None)).expect("valid fixed");
        b.insert(0, 0);
        assert!(validate_fixed(&CrashStorage::new(b, None)).is_err());
    }
}
