//! `export`: writes a disk as of a recovery point to a file, without
//! disturbing replication.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context};

use crate::config::ReceiverConfig;
use crate::image::raw::RawImage;
use crate::image::Image;
use crate::journal::points::{read_all, Point};
use crate::registry::Registry;
use tidemark_common::proto::PointKind;

/// Bytes read per step; all-zero steps are skipped so the output is sparse.
const COPY_CHUNK_BYTES: usize = 4 << 20;

/// Export formats this receiver writes.
pub const FORMATS: &[&str] = &["raw"];

/// Finds the point `spec` names for `disk`: `latest`, or a point id.
pub fn resolve_point(points: &[Point], disk: &str, spec: &str) -> anyhow::Result<Point> {
    let covering = points.iter().filter(|p| p.disks.iter().any(|d| d == disk));
    let found = match spec {
        "latest" => covering
            .filter(|p| p.kind != PointKind::SyncMarker)
            .max_by_key(|p| p.id),
        id => {
            let id: u64 = id.parse().map_err(|_| {
                anyhow::anyhow!("point {spec:?} is neither `latest` nor a point id; list them with `tidemark-receiver points`")
            })?;
            covering.filter(|p| p.id == id).max_by_key(|p| p.id)
        }
    };
    found.cloned().ok_or_else(|| {
        anyhow::anyhow!("no recovery point {spec:?} for disk {disk}; list them with `tidemark-receiver points --disk {disk}`")
    })
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
    let points = read_all(&config.points_path())?;
    let point = resolve_point(&points, disk, spec)?;
    check_image_holds(&entry.image_point, &point, disk)?;

    let image_path = config.image_dir.join(&entry.image);
    let mut image = RawImage::open(&image_path, false)?;
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = Path::new(&partial).to_path_buf();
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .with_context(|| format!("cannot create export file {}", partial.display()))?;
    let size = entry.size_bytes;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(COPY_CHUNK_BYTES as u64) as usize;
        image.read_at(offset, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            file.seek(SeekFrom::Start(offset))?;
            file.write_all(&buf[..n])
                .with_context(|| format!("cannot write export file {}", partial.display()))?;
        }
        offset += n as u64;
    }
    file.set_len(size)?;
    file.sync_all()
        .with_context(|| format!("cannot fsync export file {}", partial.display()))?;

    // The registry is cleared durably before any write after a point, so if
    // it still names this point, nothing was written while we copied.
    let after = Registry::open(&config.registry_path())?;
    let still = after.get(disk).and_then(|e| e.image_point);
    if still != Some(point.id) {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "disk {disk} received new data while being exported, so the copy is not point {}; export again after the next point",
            point.id
        );
    }
    std::fs::rename(&partial, out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
    if let Some(dir) = out.parent() {
        tidemark_common::durable::sync_dir(dir)?;
    }
    Ok(point)
}

fn check_image_holds(image_point: &Option<u64>, point: &Point, disk: &str) -> anyhow::Result<()> {
    match image_point {
        Some(p) if *p == point.id => Ok(()),
        Some(p) if *p > point.id => bail!(
            "disk {disk}'s image holds point {p}, newer than point {}; older points need the retention journal, which this receiver does not keep yet",
            point.id
        ),
        _ => bail!(
            "disk {disk} is receiving data newer than point {}; export again once the next recovery point is recorded",
            point.id
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: u64, kind: PointKind, disks: &[&str]) -> Point {
        Point {
            id,
            machine: "m".into(),
            kind,
            name: String::new(),
            agent_time_ms: 0,
            recorded_at: String::new(),
            disks: disks.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn latest_skips_sync_markers_and_other_disks() {
        let pts = vec![
            point(1, PointKind::CrashConsistent, &["a"]),
            point(2, PointKind::CrashConsistent, &["b"]),
            point(3, PointKind::SyncMarker, &["a"]),
        ];
        assert_eq!(resolve_point(&pts, "a", "latest").expect("found").id, 1);
        assert_eq!(resolve_point(&pts, "b", "2").expect("found").id, 2);
        assert!(resolve_point(&pts, "a", "2").is_err());
        assert!(resolve_point(&pts, "a", "yesterday").is_err());
        assert!(resolve_point(&pts, "c", "latest").is_err());
    }
}
