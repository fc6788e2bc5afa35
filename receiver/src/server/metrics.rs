//! The receiver's Prometheus metrics. Counters are fed by sessions as
//! data arrives; the per-disk gauges are refreshed by each alarm
//! evaluation (every few seconds), which already reads what they need.

use std::collections::BTreeMap;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::health::{Alarm, DiskHealth};

type Labels = Vec<(String, String)>;

fn disk_label(disk: &str) -> Labels {
    vec![("disk".to_owned(), disk.to_owned())]
}

#[derive(Debug, Default)]
pub struct Metrics {
    received_disk_bytes: Family<Labels, Counter>,
    received_wire_bytes: Family<Labels, Counter>,
    overwritten_bytes: Family<Labels, Counter>,
    journaled_bytes: Family<Labels, Counter>,
    rpo_seconds: Family<Labels, Gauge>,
    points: Family<Labels, Gauge>,
    journal_bytes: Family<Labels, Gauge>,
    alarm: Family<Labels, Gauge>,
    disks: Gauge,
}

impl Metrics {
    /// A registry exposing these metrics (the families are shared).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("tidemark_receiver");
        r.register(
            "received_disk_bytes",
            "Disk bytes received in extents, after decompression",
            self.received_disk_bytes.clone(),
        );
        r.register(
            "received_wire_bytes",
            "Extent payload bytes received as they travelled (compressed)",
            self.received_wire_bytes.clone(),
        );
        r.register(
            "overwritten_bytes",
            "Bytes written over the image behind a recovery point, each a candidate for the undo journal",
            self.overwritten_bytes.clone(),
        );
        r.register(
            "journaled_bytes",
            "Of the overwritten bytes, those whose pre-image was journaled; the rest had been overwritten before since the newest point, and their pre-image at that point was already journaled",
            self.journaled_bytes.clone(),
        );
        r.register(
            "rpo_seconds",
            "Age of the disk's newest consistent recovery point",
            self.rpo_seconds.clone(),
        );
        r.register(
            "points",
            "Recovery points covering the disk still in the retention window",
            self.points.clone(),
        );
        r.register(
            "journal_bytes",
            "Bytes of undo journal kept for the disk on the retention volume",
            self.journal_bytes.clone(),
        );
        r.register(
            "alarm",
            "1 while an alarm is raised (kind rpo: per disk; kind heartbeat: per agent)",
            self.alarm.clone(),
        );
        r.register("disks", "Disks registered", self.disks.clone());
        r
    }

    /// An extent of `disk_bytes` arrived as `wire_bytes` of payload.
    pub fn received(&self, disk: &str, disk_bytes: u64, wire_bytes: u64) {
        let l = disk_label(disk);
        self.received_disk_bytes
            .get_or_create(&l)
            .inc_by(disk_bytes);
        self.received_wire_bytes
            .get_or_create(&l)
            .inc_by(wire_bytes);
    }

    /// `bytes` were written over the image behind a point, and the
    /// pre-image of `journaled` of them was journaled.
    pub fn overwritten(&self, disk: &str, bytes: u64, journaled: u64) {
        let l = disk_label(disk);
        self.overwritten_bytes.get_or_create(&l).inc_by(bytes);
        self.journaled_bytes.get_or_create(&l).inc_by(journaled);
    }

    /// After an alarm evaluation. Alarms that cleared stay at 0 rather
    /// than vanish, so a dashboard sees the fall.
    pub fn refresh(&self, disks: &BTreeMap<String, DiskHealth>, raised: &[Alarm]) {
        self.disks.set(disks.len() as i64);
        for (id, h) in disks {
            let l = disk_label(id);
            match h.rpo_seconds {
                Some(r) => {
                    self.rpo_seconds.get_or_create(&l).set(r);
                }
                None => {
                    self.rpo_seconds.remove(&l);
                }
            }
            self.points.get_or_create(&l).set(h.points as i64);
            self.journal_bytes
                .get_or_create(&l)
                .set(i64::try_from(h.journal_bytes).unwrap_or(i64::MAX));
            self.alarm
                .get_or_create(&alarm_labels(&Alarm::Rpo(id.clone())))
                .set(raised.contains(&Alarm::Rpo(id.clone())).into());
        }
        for a in raised {
            self.alarm.get_or_create(&alarm_labels(a)).set(1);
        }
    }

    /// Agents whose heartbeat alarm cleared: back to 0.
    pub fn cleared(&self, alarm: &Alarm) {
        self.alarm.get_or_create(&alarm_labels(alarm)).set(0);
    }
}

fn alarm_labels(a: &Alarm) -> Labels {
    match a {
        Alarm::Rpo(d) => vec![
            ("kind".to_owned(), "rpo".to_owned()),
            ("disk".to_owned(), d.clone()),
        ],
        Alarm::Heartbeat(n) => vec![
            ("kind".to_owned(), "heartbeat".to_owned()),
            ("agent".to_owned(), n.clone()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_names_and_labels() {
        let m = Metrics::default();
        let reg = m.registry();
        m.received("disk-a", 4096, 100);
        let disks = [(
            "disk-a".to_owned(),
            DiskHealth {
                protection: "protected".into(),
                rpo_seconds: Some(3),
                points: 2,
                journal_bytes: 10,
                ..Default::default()
            },
        )]
        .into();
        m.refresh(&disks, &[Alarm::Heartbeat("web-01".into())]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encodes");
        for want in [
            "tidemark_receiver_received_disk_bytes_total{disk=\"disk-a\"} 4096",
            "tidemark_receiver_received_wire_bytes_total{disk=\"disk-a\"} 100",
            "tidemark_receiver_rpo_seconds{disk=\"disk-a\"} 3",
            "tidemark_receiver_points{disk=\"disk-a\"} 2",
            "tidemark_receiver_alarm{kind=\"heartbeat\",agent=\"web-01\"} 1",
            "tidemark_receiver_alarm{kind=\"rpo\",disk=\"disk-a\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
