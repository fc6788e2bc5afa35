//! `points`: the recovery points still in the retention window, the four
//! recovery choices resolved for each disk, and the RPO now — a table for
//! people, JSON for scripts.

use std::collections::BTreeMap;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::ReceiverConfig;
use crate::export::resolve_point;
use crate::journal::points::{read_all, Point};
use crate::registry::Registry;

/// The recovery choices of one disk, as point ids.
#[derive(Debug, Serialize)]
pub struct Choices {
    pub latest: Option<u64>,
    pub latest_processed: Option<u64>,
    pub latest_app_consistent: Option<u64>,
    /// Age of the newest consistent point, in seconds.
    pub rpo_seconds: Option<i64>,
    /// Set while the disk is failed over at this receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub points: Vec<Point>,
    pub disks: BTreeMap<String, Choices>,
}

pub fn points(config: &ReceiverConfig, disk: Option<&str>) -> anyhow::Result<Listing> {
    let all = read_all(&config.points_path())?;
    let registry = Registry::open(&config.registry_path())?;
    if let Some(d) = disk {
        if registry.get(d).is_none() {
            anyhow::bail!(
                "unknown disk {d:?}; `tidemark-receiver points` without --disk lists all"
            );
        }
    }
    // A point is listed while some disk it covers can still be exported
    // at it (history kept, not beyond a rollback).
    let mut visible: BTreeMap<String, (u64, Vec<Point>, Option<crate::failover::Record>)> =
        BTreeMap::new();
    for (id, entry) in registry.iter() {
        visible.insert(
            id.clone(),
            crate::failover::visible_points(config, id, entry, &all)?,
        );
    }
    let kept = |p: &Point, d: &str| {
        p.disks.iter().any(|x| x == d)
            && visible
                .get(d)
                .is_none_or(|(_, v, _)| v.iter().any(|q| q.id == p.id))
    };
    let points: Vec<Point> = all
        .iter()
        .filter(|p| match disk {
            Some(d) => kept(p, d),
            None => p.disks.iter().any(|d| kept(p, d)),
        })
        .cloned()
        .collect();
    let now = OffsetDateTime::now_utc();
    let mut disks = BTreeMap::new();
    for (id, _) in registry.iter() {
        if disk.is_some_and(|d| d != id) {
            continue;
        }
        let (history_from, usable, failover) = &visible[id.as_str()];
        let pick = |spec| resolve_point(usable, id, *history_from, spec).ok();
        let latest = pick("latest");
        let rpo_seconds = latest.as_ref().and_then(|p| {
            OffsetDateTime::parse(&p.recorded_at, &Rfc3339)
                .ok()
                .map(|t| (now - t).whole_seconds())
        });
        disks.insert(
            id.clone(),
            Choices {
                latest: latest.map(|p| p.id),
                latest_processed: pick("latest-processed").map(|p| p.id),
                latest_app_consistent: pick("latest-app-consistent").map(|p| p.id),
                rpo_seconds,
                failover: failover.as_ref().map(|r| r.describe(id)),
            },
        );
    }
    Ok(Listing { points, disks })
}

fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..n)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub fn table(l: &Listing) -> String {
    let mut rows = vec![["ID", "RECORDED (UTC)", "KIND", "MACHINE", "NAME", "DISKS"]
        .map(str::to_owned)
        .to_vec()];
    for p in &l.points {
        rows.push(vec![
            p.id.to_string(),
            p.recorded_at.clone(),
            p.kind.as_str().to_owned(),
            p.machine.clone(),
            p.name.clone(),
            p.disks.join(","),
        ]);
    }
    let mut out = columns(&rows);
    if l.points.is_empty() {
        out.push_str("(no recovery points yet)\n");
    }
    out.push('\n');
    let id = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let mut rows = vec![[
        "DISK",
        "LATEST",
        "LATEST-PROCESSED",
        "LATEST-APP-CONSISTENT",
        "RPO NOW",
    ]
    .map(str::to_owned)
    .to_vec()];
    for (disk, c) in &l.disks {
        rows.push(vec![
            disk.clone(),
            id(c.latest),
            id(c.latest_processed),
            id(c.latest_app_consistent),
            c.rpo_seconds.map_or("-".to_owned(), |s| format!("{s}s")),
        ]);
    }
    out.push_str(&columns(&rows));
    for c in l.disks.values() {
        if let Some(f) = &c.failover {
            out.push_str(f);
            out.push('\n');
        }
    }
    out
}
