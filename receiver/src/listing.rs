//! `points`: the recovery points, for people (a table) and scripts (JSON).

use crate::config::ReceiverConfig;
use crate::journal::points::{read_all, Point};

pub fn points(config: &ReceiverConfig, disk: Option<&str>) -> anyhow::Result<Vec<Point>> {
    let all = read_all(&config.points_path())?;
    if let Some(d) = disk {
        let registry = crate::registry::Registry::open(&config.registry_path())?;
        if registry.get(d).is_none() {
            anyhow::bail!(
                "unknown disk {d:?}; `tidemark-receiver points` without --disk lists all"
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|p| disk.is_none_or(|d| p.disks.iter().any(|x| x == d)))
        .collect())
}

pub fn table(points: &[Point]) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "RECORDED (UTC)".to_owned(),
        "KIND".to_owned(),
        "MACHINE".to_owned(),
        "NAME".to_owned(),
        "DISKS".to_owned(),
    ]];
    for p in points {
        rows.push([
            p.id.to_string(),
            p.recorded_at.clone(),
            p.kind.as_str().to_owned(),
            p.machine.clone(),
            p.name.clone(),
            p.disks.join(","),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if points.is_empty() {
        out.push_str("(no recovery points yet)\n");
    }
    out
}
