//! Structural checks of sparse and stream VMDKs, stricter than `qemu-img
//! check` (which only looks for GTEs past the end of the file; FORMATS.md
//! §4.1). Used by tests and by anyone who wants a second opinion on a file.
//! They report problems as text and never panic on any bytes.

use std::collections::{BTreeMap, HashMap, HashSet};

use flate2::{Decompress, FlushDecompress, Status};

use super::descriptor;
use super::sparse_header::{
    SparseHeader, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_TEST, FLAG_REDUNDANT_GT,
    FLAG_ZEROED_GTE, GD_AT_END, SECTOR_BYTES,
};
use super::stream::{GRAIN_MARKER_BYTES, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT};
use crate::image::storage::Storage;

/// Problems listed before the rest are summarised.
const MAX_PROBLEMS: usize = 20;

/// Collected problems (shared with the VHD validators).
#[derive(Default)]
pub(crate) struct Problems(Vec<String>);

impl Problems {
    pub(crate) fn add(&mut self, p: String) {
        self.0.push(p);
    }

    /// Ok, or the problems joined with "; ", the first first.
    pub(crate) fn result(self) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let n = self.0.len();
        let mut shown: Vec<String> = self.0.into_iter().take(MAX_PROBLEMS).collect();
        if n > MAX_PROBLEMS {
            shown.push(format!("… and {} more", n - MAX_PROBLEMS));
        }
        Err(shown.join("; "))
    }
}

fn read(s: &dyn Storage, len: usize, offset: u64) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    s.read_at(&mut b, offset)
        .map_err(|e| format!("read at {offset}: {e}"))?;
    Ok(b)
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_header(s: &dyn Storage, at: u64) -> Result<SparseHeader, String> {
    let b = read(s, 512, at)?;
    let mut h = [0u8; 512];
    h.copy_from_slice(&b);
    SparseHeader::decode(&h).map_err(|e| format!("header at byte {at}: {e}"))
}

/// Reads and checks the embedded descriptor: `create_type`, one RW SPARSE
/// extent of the header's capacity.
fn check_descriptor(
    s: &dyn Storage,
    h: &SparseHeader,
    file_sectors: u64,
    create_type: &str,
    p: &mut Problems,
) -> Result<(), String> {
    if h.descriptor_offset_sectors != 1 {
        p.add(format!(
            "descriptor at sector {} (qemu reads it only at sector 1)",
            h.descriptor_offset_sectors
        ));
    }
    let end = h
        .descriptor_offset_sectors
        .checked_add(h.descriptor_sectors)
        .filter(|&e| e <= file_sectors && h.descriptor_sectors <= 20480 && e <= h.overhead_sectors);
    if end.is_none() || h.descriptor_sectors == 0 {
        return Err(format!(
            "descriptor {}+{} sectors lies outside the header area",
            h.descriptor_offset_sectors, h.descriptor_sectors
        ));
    }
    let b = read(
        s,
        (h.descriptor_sectors * SECTOR_BYTES) as usize,
        h.descriptor_offset_sectors * SECTOR_BYTES,
    )?;
    let (text, d) = descriptor::parse_bytes(&b).map_err(|e| format!("descriptor: {e}"))?;
    if !text.starts_with(descriptor::SIGNATURE) {
        p.add(format!(
            "descriptor does not start with {:?} (libvmdk rejects it)",
            descriptor::SIGNATURE
        ));
    }
    if !text.lines().any(|l| l == "version=1") {
        p.add("descriptor lacks a literal `version=1` line".into());
    }
    if let Some((_, what)) = descriptor::fix_header_traps(&text) {
        p.add(format!("descriptor header traps: {}", what.join(", ")));
    }
    if d.create_type != create_type {
        p.add(format!(
            "createType {:?}, expected {create_type:?}",
            d.create_type
        ));
    }
    match &d.extents[..] {
        [e] if e.access == "RW" && e.kind == "SPARSE" && e.sectors == h.capacity_sectors => {}
        other => p.add(format!(
            "expected one RW SPARSE extent of {} sectors, found {other:?}",
            h.capacity_sectors
        )),
    }
    Ok(())
}

/// Checks a monolithicSparse extent: header magic, version, flags and
/// newline bytes; the embedded descriptor; GD, RGD and every GT inside the
/// metadata area without overlaps; each GT equal to its redundant copy;
/// every GTE unallocated, zeroed (only where allowed) or a grain-aligned
/// sector past the metadata whose grain ends inside the file, no grain
/// shared, no entry beyond the capacity.
pub fn validate_sparse(storage: &dyn Storage) -> Result<(), String> {
    let mut p = Problems::default();
    let len = storage.len().map_err(|e| format!("length: {e}"))?;
    if len < 512 {
        return Err(format!("file of {len} bytes has no header"));
    }
    let file_sectors = len / SECTOR_BYTES;
    let h = read_header(storage, 0)?;
    if h.flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0 {
        return Err("compressed/marker flags set: a stream, not monolithicSparse".into());
    }
    if !(1..=2).contains(&h.version) {
        p.add(format!(
            "version {} (qemu opens an uncompressed version 3 read-only)",
            h.version
        ));
    }
    if h.flags & FLAG_NEWLINE_TEST == 0 {
        p.add("newline detection flag not set".into());
    }
    if h.flags & FLAG_ZEROED_GTE != 0 && h.version < 2 {
        p.add("zeroed-grain flag needs version 2".into());
    }
    if h.compress_algorithm != 0 {
        p.add(format!("compressAlgorithm {}", h.compress_algorithm));
    }
    if h.overhead_sectors % h.grain_sectors != 0 {
        p.add(format!(
            "overHead {} is not grain-aligned",
            h.overhead_sectors
        ));
    }
    if h.overhead_sectors > file_sectors {
        return Err(format!(
            "file of {file_sectors} sectors is shorter than its metadata ({} sectors)",
            h.overhead_sectors
        ));
    }
    check_descriptor(storage, &h, file_sectors, "monolithicSparse", &mut p)?;

    // Metadata regions, checked for overlaps below: (start, end, what).
    let mut regions: Vec<(u64, u64, String)> = vec![
        (0, 1, "header".into()),
        (
            h.descriptor_offset_sectors,
            h.descriptor_offset_sectors + h.descriptor_sectors,
            "descriptor".into(),
        ),
    ];
    let gt_count = h.gt_count() as usize;
    let gd_sectors = h.gd_sectors();
    let in_meta = |start: u64, n: u64| start >= 1 && start.saturating_add(n) <= h.overhead_sectors;
    let read_gd = |at: u64, what: &str| -> Result<Vec<u32>, String> {
        if !in_meta(at, gd_sectors) {
            return Err(format!(
                "{what} at sector {at} lies outside the metadata area"
            ));
        }
        let mut v = u32s(&read(
            storage,
            (gd_sectors * SECTOR_BYTES) as usize,
            at * SECTOR_BYTES,
        )?);
        v.truncate(gt_count);
        Ok(v)
    };
    let gd = read_gd(h.gd_offset_sectors, "grain directory")?;
    regions.push((
        h.gd_offset_sectors,
        h.gd_offset_sectors + gd_sectors,
        "GD".into(),
    ));
    let rgd = if h.flags & FLAG_REDUNDANT_GT != 0 {
        let r = read_gd(h.rgd_offset_sectors, "redundant grain directory")?;
        regions.push((
            h.rgd_offset_sectors,
            h.rgd_offset_sectors + gd_sectors,
            "RGD".into(),
        ));
        Some(r)
    } else {
        None
    };
    let gt_sectors = h.gt_sectors();
    let gt_bytes = (gt_sectors * SECTOR_BYTES) as usize;
    let per = u64::from(h.gtes_per_gt);
    let zeroed_ok = h.version >= 2 && h.flags & FLAG_ZEROED_GTE != 0;
    let mut grains_seen: HashMap<u32, u64> = HashMap::new();
    for g in 0..gt_count {
        let gde = u64::from(gd[g]);
        let rgde = rgd.as_ref().map(|r| u64::from(r[g]));
        if let Some(r) = rgde {
            if (gde == 0) != (r == 0) {
                p.add(format!("GD entry {g} is {gde} but the RGD entry is {r}"));
                continue;
            }
        }
        if gde == 0 {
            continue;
        }
        // Tables allocated later (qemu never does; we do for foreign
        // images whose GD had holes) may sit among the grains.
        let check_region = |at: u64, what: String, p: &mut Problems| {
            if at.saturating_add(gt_sectors) > file_sectors {
                p.add(format!("{what} at sector {at} passes the end of the file"));
            }
        };
        check_region(gde, format!("GT {g}"), &mut p);
        regions.push((gde, gde + gt_sectors, format!("GT {g}")));
        let table = u32s(&read(storage, gt_bytes, gde * SECTOR_BYTES)?);
        if let Some(r) = rgde {
            check_region(r, format!("redundant GT {g}"), &mut p);
            regions.push((r, r + gt_sectors, format!("RGT {g}")));
            let copy = u32s(&read(storage, gt_bytes, r * SECTOR_BYTES)?);
            if copy != table {
                p.add(format!("GT {g} and its redundant copy differ"));
            }
        }
        for (i, &e) in table.iter().take(h.gtes_per_gt as usize).enumerate() {
            let gi = g as u64 * per + i as u64;
            let lba = gi * h.grain_sectors;
            if e == 0 {
                continue;
            }
            if lba >= h.capacity_sectors {
                p.add(format!(
                    "GT {g} entry {i} maps grain {gi}, beyond the capacity"
                ));
                continue;
            }
            if e == 1 && zeroed_ok {
                continue;
            }
            let e64 = u64::from(e);
            if e64 < h.overhead_sectors {
                p.add(format!(
                    "GT {g} entry {i} points at sector {e}, inside the metadata"
                ));
            } else if e64 % h.grain_sectors != 0 {
                p.add(format!(
                    "GT {g} entry {i} points at sector {e}, not grain-aligned"
                ));
            } else if e64 + h.grain_sectors > file_sectors {
                p.add(format!(
                    "GT {g} entry {i} points at sector {e}, past the end of the file"
                ));
            }
            if let Some(other) = grains_seen.insert(e, gi) {
                p.add(format!("grains {other} and {gi} share sector {e}"));
            }
        }
    }
    regions.sort();
    for w in regions.windows(2) {
        if w[1].0 < w[0].1 {
            p.add(format!("{} and {} overlap", w[0].2, w[1].2));
        }
    }
    // Grains must not overlap tables allocated among them either.
    for (&e, gi) in &grains_seen {
        let (s, end) = (u64::from(e), u64::from(e) + h.grain_sectors);
        let hit = regions
            .iter()
            .find(|(a, b, _)| *a < end && s < *b && *b > h.overhead_sectors);
        if let Some((_, _, what)) = hit {
            p.add(format!("grain {gi} at sector {e} overlaps {what}"));
        }
    }
    p.result()
}

/// Inflates one zlib grain; it must give exactly `grain_bytes` bytes.
fn inflate(data: &[u8], grain_bytes: usize) -> Result<(), String> {
    let mut z = Decompress::new(true);
    let mut out = Vec::with_capacity(grain_bytes + 1);
    let status = z
        .decompress_vec(data, &mut out, FlushDecompress::Finish)
        .map_err(|e| format!("zlib: {e}"))?;
    if status != Status::StreamEnd {
        return Err(format!(
            "zlib data does not end within one grain ({status:?})"
        ));
    }
    if out.len() != grain_bytes {
        return Err(format!(
            "inflates to {} bytes, not {grain_bytes}",
            out.len()
        ));
    }
    if z.total_in() != data.len() as u64 {
        return Err(format!(
            "{} bytes after the end of the zlib stream",
            data.len() as u64 - z.total_in()
        ));
    }
    Ok(())
}

/// Checks a streamOptimized file in the full-marker layout: header
/// (version 3, compressed with markers, deflate), descriptor, a marker
/// chain from overHead to the end: grains in strictly ascending,
/// grain-aligned LBA order that each inflate to one grain, GT and GD
/// markers, the footer equal to the header but for gdOffset, then EOS as
/// the very last sector; the GD points at GT blocks behind GT markers and
/// the GTs at exactly the grains found.
pub fn validate_stream(storage: &dyn Storage) -> Result<(), String> {
    let mut p = Problems::default();
    let len = storage.len().map_err(|e| format!("length: {e}"))?;
    if len % SECTOR_BYTES != 0 {
        return Err(format!("file length {len} is not a multiple of 512"));
    }
    let file_sectors = len / SECTOR_BYTES;
    if file_sectors < 4 {
        return Err(format!("file of {len} bytes is too short for a stream"));
    }
    let h = read_header(storage, 0)?;
    let want_flags = FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS;
    if h.version != 3 {
        p.add(format!("version {} (ESXi wants 3)", h.version));
    }
    if h.flags != want_flags {
        p.add(format!("flags {:#x}, expected {want_flags:#x}", h.flags));
    }
    if h.compress_algorithm != 1 {
        p.add(format!("compressAlgorithm {}", h.compress_algorithm));
    }
    if h.gd_offset_sectors != GD_AT_END {
        p.add(format!(
            "header gdOffset {} is not GD_AT_END",
            h.gd_offset_sectors
        ));
    }
    if h.overhead_sectors >= file_sectors {
        return Err(format!("overHead {} is past the end", h.overhead_sectors));
    }
    check_descriptor(storage, &h, file_sectors, "streamOptimized", &mut p)?;

    // The tail: footer marker, footer, EOS.
    let tail = read(storage, 1536, len - 1536)?;
    let num = |b: &[u8]| u64::from_le_bytes(b[0..8].try_into().unwrap_or([0xff; 8]));
    let size = |b: &[u8]| u32::from_le_bytes(b[8..12].try_into().unwrap_or([0xff; 4]));
    let kind = |b: &[u8]| u32::from_le_bytes(b[12..16].try_into().unwrap_or([0xff; 4]));
    if (num(&tail[..512]), size(&tail[..512]), kind(&tail[..512])) != (1, 0, MARKER_FOOTER) {
        p.add("the third-last sector is not a footer marker of one sector".into());
    }
    if tail[1024..].iter().any(|&b| b != 0) {
        p.add("the last sector is not an end-of-stream marker".into());
    }
    let footer = read_header(storage, len - 1024)?;
    let mut expect = h.clone();
    expect.gd_offset_sectors = footer.gd_offset_sectors;
    if footer != expect {
        p.add(format!("footer {footer:?} differs from the header {h:?}"));
    }

    // Walk the marker chain.
    let gb = h.grain_bytes() as usize;
    let per = u64::from(h.gtes_per_gt);
    let mut grains: HashMap<u64, u64> = HashMap::new(); // marker sector -> lba
    let mut gts: BTreeMap<u64, Vec<u32>> = BTreeMap::new(); // data sector -> table
    let mut gd_at: Option<(u64, u64)> = None; // (data sector, sectors)
    let mut last_lba: Option<u64> = None;
    let mut sector = h.overhead_sectors;
    let mut saw_eos = false;
    while sector < file_sectors {
        let m = read(storage, 512, sector * SECTOR_BYTES)?;
        let (val, sz) = (num(&m), size(&m));
        if sz != 0 {
            let lba = val;
            if lba % h.grain_sectors != 0 || lba >= h.capacity_sectors {
                p.add(format!("grain marker at sector {sector}: bad LBA {lba}"));
            }
            if last_lba.is_some_and(|l| lba <= l) {
                p.add(format!(
                    "grain marker at sector {sector}: LBA {lba} is not ascending"
                ));
            }
            last_lba = Some(lba);
            let bytes = GRAIN_MARKER_BYTES as u64 + u64::from(sz);
            let sectors = bytes.div_ceil(SECTOR_BYTES);
            if sector + sectors > file_sectors || u64::from(sz) > 2 * gb as u64 {
                return Err(format!(
                    "grain marker at sector {sector}: {sz} bytes run past the end or the grain bound"
                ));
            }
            let rec = read(storage, bytes as usize, sector * SECTOR_BYTES)?;
            if let Err(e) = inflate(&rec[GRAIN_MARKER_BYTES..], gb) {
                p.add(format!("grain at LBA {lba} (sector {sector}): {e}"));
            }
            grains.insert(sector, lba);
            sector += sectors;
            continue;
        }
        let t = kind(&m);
        if m[16..].iter().any(|&b| b != 0) {
            p.add(format!("marker at sector {sector}: padding not zero"));
        }
        match t {
            MARKER_EOS => {
                if val != 0 || sector != file_sectors - 1 {
                    p.add(format!(
                        "end-of-stream marker at sector {sector} is not the last sector"
                    ));
                }
                saw_eos = true;
                break;
            }
            MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                if sector.saturating_add(1).saturating_add(val) > file_sectors {
                    return Err(format!(
                        "marker at sector {sector}: {val} sectors run past the end"
                    ));
                }
                match t {
                    MARKER_GT => {
                        if val != h.gt_sectors() {
                            p.add(format!("GT marker at sector {sector}: {val} sectors"));
                        }
                        let b = read(
                            storage,
                            (h.gt_sectors() * SECTOR_BYTES) as usize,
                            (sector + 1) * SECTOR_BYTES,
                        )?;
                        gts.insert(sector + 1, u32s(&b));
                    }
                    MARKER_GD => {
                        if gd_at.is_some() {
                            p.add(format!("second GD marker at sector {sector}"));
                        }
                        gd_at = Some((sector + 1, val));
                    }
                    _ => {
                        if sector != file_sectors - 3 || val != 1 {
                            p.add(format!(
                                "footer marker at sector {sector} is not third-last"
                            ));
                        }
                    }
                }
                sector += 1 + val;
            }
            _ => sector = sector.saturating_add(1).saturating_add(val), // unknown: skip
        }
    }
    if !saw_eos {
        p.add("no end-of-stream marker".into());
    }
    // The GD the footer names, and what it points at.
    match gd_at {
        Some((at, n)) if at == footer.gd_offset_sectors => {
            if n != h.gd_sectors() || at + h.gd_sectors() > file_sectors {
                return Err(format!("GD of {n} sectors, expected {}", h.gd_sectors()));
            }
            let mut gd = u32s(&read(
                storage,
                (h.gd_sectors() * SECTOR_BYTES) as usize,
                at * SECTOR_BYTES,
            )?);
            gd.truncate(h.gt_count() as usize);
            let mut referenced = HashSet::new();
            for (g, &gde) in gd.iter().enumerate() {
                if gde == 0 {
                    continue;
                }
                let Some(table) = gts.get(&u64::from(gde)) else {
                    p.add(format!("GD entry {g} = {gde} is not behind a GT marker"));
                    continue;
                };
                for (i, &e) in table.iter().take(per as usize).enumerate() {
                    if e == 0 {
                        continue;
                    }
                    let lba = (g as u64 * per + i as u64) * h.grain_sectors;
                    match grains.get(&u64::from(e)) {
                        Some(&l) if l == lba => {
                            referenced.insert(u64::from(e));
                        }
                        Some(&l) => p.add(format!(
                            "GT {g} entry {i} (LBA {lba}) points at the grain of LBA {l}"
                        )),
                        None => p.add(format!(
                            "GT {g} entry {i} points at sector {e}, not a grain marker"
                        )),
                    }
                }
            }
            if referenced.len() != grains.len() {
                p.add(format!(
                    "{} grains are not referenced by any grain table",
                    grains.len() - referenced.len()
                ));
            }
        }
        Some((at, _)) => p.add(format!(
            "footer gdOffset {} but the GD marker is before sector {at}",
            footer.gd_offset_sectors
        )),
        None => p.add("no GD marker".into()),
    }
    p.result()
}
