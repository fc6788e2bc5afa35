//! `export`: writes a disk as of a recovery point to a file while
//! replication goes on. The live image is copied, then the undo records
//! of every overwrite since the point are laid over the copy; of the
//! records for a byte the oldest holds its value at the point, so records
//! are read oldest first and each byte is written once.
//!
//! No lock is needed against the running receiver: it makes each undo
//! record durable before the overwrite it describes, and the export reads
//! the undo journal in full only after its copy of the image is complete,
//! so any overwrite that reached the copy has its record in what is read.
//!
//! Before the copy, the journal's ranges are read (headers only, nothing
//! decoded): bytes they cover take their value from the journal whatever
//! the image holds, so the copy skips them. The range list costs memory
//! in the number of disjoint ranges, not in their size.

use std::fs::OpenOptions;

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::ReceiverConfig;
use crate::image::raw::RawImage;
use crate::image::vhd::export_dynamic;
use crate::image::vhd::footer::{fixed_size, Footer};
use crate::image::vmdk::descriptor::{self, FlatKind};
use crate::image::vmdk::{export_stream, VmdkImage, VmdkKind};
use crate::image::{disk_uuid, live, DiskUuid, Image};
use crate::journal::points::{read_all, Point};
use crate::journal::ranges::Ranges;
use crate::journal::undo;
use crate::registry::Registry;
use tidemark_common::proto::PointKind;

/// Bytes read per step; all-zero steps are skipped so the output is sparse.
const COPY_CHUNK_BYTES: usize = 4 << 20;

/// Export formats this receiver writes.
pub const FORMATS: &[&str] = &[
    "raw",
    "vhd",
    "vhd-fixed",
    "vmdk",
    "vmdk-sparse",
    "vmdk-stream",
];

/// How an operator names a point.
pub const SPEC_HELP: &str =
    "latest, latest-processed, latest-app-consistent, a point id, or an RFC 3339 time";

/// Finds the point `spec` names among the exportable points of `disk`
/// (those with id ≥ `history_from`). Sync markers are never chosen by
/// the `latest*` and time forms, only by their id.
pub fn resolve_point(
    points: &[Point],
    disk: &str,
    history_from: u64,
    spec: &str,
) -> anyhow::Result<Point> {
    let usable: Vec<&Point> = points
        .iter()
        .filter(|p| p.id >= history_from && p.disks.iter().any(|d| d == disk))
        .collect();
    let consistent = || usable.iter().filter(|p| p.kind != PointKind::SyncMarker);
    let found = match spec {
        // Every point the receiver acknowledged is already in the image, so
        // the newest received and the newest processed point are the same.
        "latest" | "latest-processed" => consistent().max_by_key(|p| p.id),
        "latest-app-consistent" => consistent()
            .filter(|p| p.kind == PointKind::AppConsistent)
            .max_by_key(|p| p.id),
        _ => {
            if let Ok(id) = spec.parse::<u64>() {
                if id < history_from && points.iter().any(|p| p.id == id) {
                    bail!("point {id} of disk {disk} can no longer be reconstructed: its history was pruned (retention window) or its image was recreated");
                }
                usable.iter().find(|p| p.id == id)
            } else if let Ok(at) = OffsetDateTime::parse(spec, &Rfc3339) {
                let oldest = consistent().min_by_key(|p| p.id);
                let found = consistent()
                    .filter(|p| recorded(p).is_some_and(|t| t <= at))
                    .max_by_key(|p| p.id);
                if found.is_none() {
                    if let Some(o) = oldest {
                        bail!(
                            "no point of disk {disk} at or before {spec}; the oldest is point {} at {}",
                            o.id,
                            o.recorded_at
                        );
                    }
                }
                found
            } else {
                bail!("point {spec:?} is not one of: {SPEC_HELP}");
            }
        }
    };
    found.map(|p| (*p).clone()).ok_or_else(|| {
        anyhow::anyhow!("no recovery point {spec:?} for disk {disk}; list them with `tidemark-receiver points --disk {disk}`")
    })
}

fn recorded(p: &Point) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&p.recorded_at, &Rfc3339).ok()
}

pub fn export(
    config: &ReceiverConfig,
    disk: &str,
    spec: &str,
    format: &str,
    out: &Path,
) -> anyhow::Result<Point> {
    if !FORMATS.contains(&format) {
        bail!(
            "unknown export format {format:?}; supported: {}",
            FORMATS.join(", ")
        );
    }
    let registry = Registry::open(&config.registry_path())?;
    let Some(entry) = registry.get(disk).cloned() else {
        bail!("unknown disk {disk:?}; list disks with `tidemark-receiver points`");
    };
    let all = read_all(&config.points_path())?;
    let (history_from, points, failover) =
        crate::failover::visible_points(config, disk, &entry, &all)?;
    if let Ok(id) = spec.parse::<u64>() {
        let listed = all
            .iter()
            .any(|p| p.id == id && p.disks.iter().any(|d| d == disk));
        if listed && !points.iter().any(|p| p.id == id) {
            use crate::failover::State;
            if crate::journal::thinning::load(&config.retention_dir)?.contains(&id) {
                bail!("point {id} of disk {disk} was thinned ([thinning] keeps one older point per slot); pick a listed point (`tidemark-receiver points --disk {disk}`)");
            }
            match &failover {
                Some(r) if matches!(r.state, State::RollingBack | State::RolledBack) && id > r.point => bail!(
                    "point {id} is newer than point {} that disk {disk} is rolled back to; `tidemark-receiver rollback --undo --disk {disk}` brings it back",
                    r.point
                ),
                Some(r) if matches!(r.state, State::Committed | State::Reprotected) => bail!(
                    "point {id} of disk {disk} went with its journal when the disk was committed at point {}",
                    r.point
                ),
                _ => bail!("point {id} of disk {disk} can no longer be reconstructed: its history was pruned (retention window) or its image was recreated"),
            }
        }
    }
    let point = resolve_point(&points, disk, history_from, spec)?;
    // As large as the disk was at the point (it may have grown since).
    let size = entry.size_at(point.id);

    // A disk the format cannot hold is refused before minutes of copying.
    let limit = match format {
        "vhd" => Some(live::ImageFormat::Vhd),
        "vhd-fixed" => Some(live::ImageFormat::VhdFixed),
        _ => None,
    };
    if let Some(f) = limit {
        live::check_size(f, out, size)?;
    }

    let image_path = config.image_dir.join(&entry.image);
    let mut image = live::open(entry.format(), &image_path, false)?;
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = Path::new(&partial).to_path_buf();
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .with_context(|| format!("cannot create export file {}", partial.display()))?;
        let dir = undo::disk_dir(&config.retention_dir, disk);
        let since = |tags: Vec<u64>| tags.into_iter().filter(|&t| t >= point.id);
        let clip = |r: &undo::RawRecord| {
            let end = r.offset_bytes.saturating_add(u64::from(r.len_bytes));
            (r.offset_bytes.min(size), end.min(size))
        };
        let mut from_journal = Ranges::new();
        for tag in since(undo::segments(&dir)?) {
            undo::scan_segment::<anyhow::Error>(&dir, tag, |r| {
                let (start, end) = clip(&r);
                from_journal.insert(start, end);
                Ok(())
            })?;
        }
        copy_data(image.as_mut(), &file, size, &from_journal)
            .with_context(|| format!("cannot write export file {}", partial.display()))?;
        file.set_len(size)?;
        // Only now read the undo journal in full (see the module comment).
        // Segments made since the first pass are included; bytes of
        // records appended since may have been copied from the image, so
        // only those are written when a record is zeros.
        let zeros = vec![0u8; COPY_CHUNK_BYTES];
        let mut written = Ranges::new();
        for tag in since(undo::segments(&dir)?) {
            undo::scan_segment::<anyhow::Error>(&dir, tag, |r| {
                let (start, end) = clip(&r);
                let gaps = written.gaps(start, end);
                if gaps.is_empty() {
                    return Ok(());
                }
                if r.is_zeros() {
                    for (a, b) in gaps.iter().flat_map(|&(a, b)| from_journal.gaps(a, b)) {
                        let mut at = a;
                        while at < b {
                            let n = (b - at).min(COPY_CHUNK_BYTES as u64) as usize;
                            file.write_all_at(&zeros[..n], at)?;
                            at += n as u64;
                        }
                    }
                } else {
                    let data = r.bytes().with_context(|| {
                        format!("undo record at byte {start} of segment {tag} of disk {disk} does not decode: the journal is damaged")
                    })?;
                    for (a, b) in gaps {
                        file.write_all_at(&data[(a - start) as usize..(b - start) as usize], a)?;
                    }
                }
                written.insert(start, end);
                Ok(())
            })?;
        }
        // Retention may have pruned this point's history while we read:
        // then the segments we saw were not all of it.
        let now = Registry::open(&config.registry_path())?;
        if now.get(disk).is_some_and(|e| e.history_from > point.id) {
            bail!(
                "point {} of disk {disk} was pruned by retention while it was being exported; pick a newer point (`tidemark-receiver points --disk {disk}`)",
                point.id
            );
        }
        file.sync_all()
            .with_context(|| format!("cannot fsync export file {}", partial.display()))?;
        Ok::<_, anyhow::Error>(())
    })();
    let result = result.and_then(|()| finish(format, &partial, out, size, &disk_uuid(disk)));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(point)
}

/// Copies the data of `image` into `file` at the same offsets, leaving
/// holes, zeros and the ranges in `skip` unwritten (the file is sparse).
/// One thread reads ahead while this one writes, so the disk always has a
/// read in flight, as qemu-img keeps several requests going; holes and
/// skipped ranges are not read.
fn copy_data(
    image: &mut dyn Image,
    file: &std::fs::File,
    size: u64,
    skip: &Ranges,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 1 << 20;
    const IN_FLIGHT: usize = 8;
    const READ_AHEAD: u64 = 16 << 20;
    // Full buffers wait in a bounded channel (the reader blocks when it is
    // full, which bounds memory); written ones come back for reuse. The
    // reader never waits for a free one: it allocates if none is back yet,
    // so a writer that stops cannot leave it blocked.
    // Each full buffer holds [start, start + len) of the image; of it only
    // `gaps` (not in `skip`) are written.
    type Piece = (u64, Vec<u8>, Vec<(u64, u64)>);
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Piece>(IN_FLIGHT);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let recycle = free_tx.clone();
        let reader = s.spawn(move || -> Result<(), crate::image::ImageError> {
            image.prefetch(0, READ_AHEAD);
            let mut at = 0u64;
            while at < size {
                let n = (size - at).min(PIECE);
                if at.is_multiple_of(4 * PIECE) {
                    image.prefetch(at + READ_AHEAD, 4 * PIECE);
                }
                let gaps = skip.gaps(at, at + n);
                if let (Some(first), Some(last)) = (gaps.first(), gaps.last()) {
                    let (start, end) = (first.0, last.1);
                    if !image.is_hole(start, end - start) {
                        let mut buf = free_rx
                            .try_recv()
                            .unwrap_or_else(|_| Vec::with_capacity(PIECE as usize));
                        buf.resize((end - start) as usize, 0);
                        image.read_at(start, &mut buf)?;
                        if buf.iter().any(|&b| b != 0) {
                            if full_tx.send((start, buf, gaps)).is_err() {
                                // The writer stopped; it reports why.
                                return Ok(());
                            }
                        } else {
                            let _ = recycle.send(buf);
                        }
                    }
                }
                at += n;
            }
            Ok(())
        });
        let mut written = Ok(());
        'pieces: for (start, buf, gaps) in full_rx {
            for (a, b) in gaps {
                let part = &buf[(a - start) as usize..(b - start) as usize];
                if part.iter().all(|&b| b == 0) {
                    continue;
                }
                if let Err(e) = file.write_all_at(part, a) {
                    written = Err(e);
                    break 'pieces;
                }
            }
            let _ = free_tx.send(buf);
        }
        let read = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the export's reader thread panicked"))?;
        read?;
        written?;
        Ok(())
    })
}

/// Turns the reconstructed raw disk at `partial` into `format` at `out`.
fn finish(
    format: &str,
    partial: &Path,
    out: &Path,
    size: u64,
    uuid: &DiskUuid,
) -> anyhow::Result<()> {
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))
    };
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match format {
        "raw" => rename(partial, out)?,
        "vhd-fixed" => {
            // Raw data, then the footer at a whole number of MiB (Azure).
            let virtual_size = fixed_size(size);
            let f = OpenOptions::new().write(true).open(partial)?;
            f.set_len(virtual_size)?;
            f.write_all_at(&Footer::fixed(virtual_size, *uuid).encode(), virtual_size)?;
            f.sync_all()?;
            rename(partial, out)?;
        }
        "vmdk" => {
            // One flat extent, two descriptors: `vmfs` for ESXi at `out`,
            // `monolithicFlat` for hosted products and qemu beside it.
            let stem = out
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| anyhow::anyhow!("--out {} needs a file name", out.display()))?;
            let flat_name = format!("{stem}-flat.vmdk");
            rename(partial, &dir.join(&flat_name))?;
            let hosted = dir.join(format!("{stem}-hosted.vmdk"));
            for (kind, path) in [
                (FlatKind::MonolithicFlat, hosted.as_path()),
                (FlatKind::Vmfs, out),
            ] {
                let text = descriptor::flat(kind, size, &flat_name, uuid);
                tidemark_common::durable::write_atomic(path, text.as_bytes(), 0o644)
                    .with_context(|| format!("cannot write descriptor {}", path.display()))?;
            }
        }
        "vmdk-sparse" => {
            let tmp = sibling(out, ".sparse-partial");
            let _ = std::fs::remove_file(&tmp);
            let made = (|| {
                let mut src = RawImage::open(partial, false)?;
                let mut dst =
                    VmdkImage::create_file(&tmp, size, *uuid, VmdkKind::MonolithicSparse)?;
                copy_nonzero(&mut src, &mut dst, size)?;
                dst.close()?;
                Ok::<_, anyhow::Error>(())
            })();
            let _ = std::fs::remove_file(partial);
            if let Err(e) = made {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            rename(&tmp, out)?;
        }
        "vhd" => {
            let tmp = sibling(out, ".vhd-partial");
            let _ = std::fs::remove_file(&tmp);
            let made = RawImage::open(partial, false)
                .and_then(|mut src| export_dynamic(&mut src, size, *uuid, &tmp));
            let _ = std::fs::remove_file(partial);
            made?;
            rename(&tmp, out)?;
        }
        "vmdk-stream" => {
            // Compresses on every core (zlib grains in ascending order, the
            // layout VMware's import tools accept).
            let tmp = sibling(out, ".stream-partial");
            let _ = std::fs::remove_file(&tmp);
            let made = RawImage::open(partial, false)
                .and_then(|mut src| export_stream(&mut src, size, *uuid, &tmp, 0));
            let _ = std::fs::remove_file(partial);
            made?;
            rename(&tmp, out)?;
        }
        other => bail!(
            "unknown export format {other:?}; supported: {}",
            FORMATS.join(", ")
        ),
    }
    tidemark_common::durable::sync_dir(dir)?;
    Ok(())
}

/// `path` with `suffix` added to its name.
fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

/// Copies the first `size` bytes of `src` into `dst`, leaving out all-zero
/// pieces (a fresh `dst` reads them as zeros and stores nothing).
fn copy_nonzero(src: &mut dyn Image, dst: &mut dyn Image, size: u64) -> anyhow::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(COPY_CHUNK_BYTES as u64) as usize;
        if src.is_hole(offset, n as u64) {
            offset += n as u64;
            continue;
        }
        src.read_at(offset, &mut buf[..n])?;
        // Per 64 KiB, a sparse VMDK grain, so zero grains stay unallocated.
        for (i, piece) in buf[..n].chunks(64 << 10).enumerate() {
            if piece.iter().any(|&b| b != 0) {
                dst.write_at(offset + (i as u64) * (64 << 10), piece)?;
            }
        }
        offset += n as u64;
    }
    dst.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: u64, kind: PointKind, disks: &[&str], at: &str) -> Point {
        Point {
            id,
            machine: "m".into(),
            kind,
            name: String::new(),
            agent_time_ms: 0,
            recorded_at: at.into(),
            disks: disks.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn every_spec_form_resolves() {
        let pts = vec![
            point(
                1,
                PointKind::CrashConsistent,
                &["a"],
                "2026-01-01T10:00:00Z",
            ),
            point(
                2,
                PointKind::AppConsistent,
                &["a", "b"],
                "2026-01-01T11:00:00Z",
            ),
            point(
                3,
                PointKind::CrashConsistent,
                &["b"],
                "2026-01-01T12:00:00Z",
            ),
            point(4, PointKind::SyncMarker, &["a"], "2026-01-01T13:00:00Z"),
        ];
        let id = |disk, spec| resolve_point(&pts, disk, 0, spec).map(|p| p.id);
        assert_eq!(id("a", "latest").expect("found"), 2);
        assert_eq!(id("a", "latest-processed").expect("found"), 2);
        assert_eq!(id("b", "latest").expect("found"), 3);
        assert_eq!(id("b", "latest-app-consistent").expect("found"), 2);
        assert_eq!(id("a", "1").expect("found"), 1);
        assert_eq!(id("a", "4").expect("by id"), 4);
        assert_eq!(id("a", "2026-01-01T10:30:00Z").expect("found"), 1);
        assert_eq!(id("a", "2026-01-01T11:00:00Z").expect("found"), 2);
        let early = id("a", "2026-01-01T09:00:00Z")
            .expect_err("too early")
            .to_string();
        assert!(early.contains("oldest is point 1"), "{early}");
        assert!(id("a", "3").is_err());
        assert!(id("a", "yesterday").is_err());
        assert!(id("c", "latest").is_err());
        let pruned = resolve_point(&pts, "a", 2, "1")
            .expect_err("pruned")
            .to_string();
        assert!(pruned.contains("retention"), "{pruned}");
    }
}
