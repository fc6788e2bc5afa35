//! The agent's Prometheus metrics. One process-wide set: the hooks in the
//! run loop and the shipper are single calls, and `sync` runs feed the
//! same counters harmlessly (nothing serves them there).

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::state::ResyncReason;

type Labels = Vec<(String, String)>;

fn disk_label(disk: &str) -> Labels {
    vec![("disk".to_owned(), disk.to_owned())]
}

/// Freeze buckets in seconds: a freeze is meant to last well under a
/// second; the top buckets show the ones that did not.
const FREEZE_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug)]
pub struct Metrics {
    backlog_bytes: Family<Labels, Gauge>,
    shipped_disk_bytes: Family<Labels, Counter>,
    shipped_wire_bytes: Family<Labels, Counter>,
    resync_progress: Family<Labels, Gauge<f64, AtomicU64>>,
    tracker_loss_events: Family<Labels, Counter>,
    freeze_seconds: Histogram,
    connected: Gauge,
    send_cap: Gauge,
    point_waiting: Gauge,
    yielding: Gauge,
    fast_compressed_bytes: Counter,
    stored_bytes: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    backlog_bytes: Family::default(),
    shipped_disk_bytes: Family::default(),
    shipped_wire_bytes: Family::default(),
    resync_progress: Family::default(),
    tracker_loss_events: Family::default(),
    freeze_seconds: Histogram::new(FREEZE_BUCKETS),
    connected: Gauge::default(),
    send_cap: Gauge::default(),
    point_waiting: Gauge::default(),
    yielding: Gauge::default(),
    fast_compressed_bytes: Counter::default(),
    stored_bytes: Counter::default(),
});

pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// A registry exposing these metrics (the metrics are shared).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("tidemark_agent");
        r.register(
            "backlog_bytes",
            "Dirty bytes not yet durable at the receiver",
            self.backlog_bytes.clone(),
        );
        r.register(
            "shipped_disk_bytes",
            "Disk bytes sent (data and zero records), before compression",
            self.shipped_disk_bytes.clone(),
        );
        r.register(
            "shipped_wire_bytes",
            "Bytes sent on the wire for the disk, after compression",
            self.shipped_wire_bytes.clone(),
        );
        r.register(
            "resync_progress_ratio",
            "Share of the disk in step with the receiver (1 when no resync runs)",
            self.resync_progress.clone(),
        );
        r.register(
            "tracker_loss_events",
            "Times the tracker lost writes (overrun, audit mismatch, tracing changed), each forcing a resync",
            self.tracker_loss_events.clone(),
        );
        r.register(
            "freeze_seconds",
            "Time filesystems were frozen for a point",
            self.freeze_seconds.clone(),
        );
        r.register(
            "connected",
            "1 while connected to the receiver",
            self.connected.clone(),
        );
        r.register(
            "send_cap_bytes_per_second",
            "Cap on bytes sent to the receiver per second now (0: unlimited)",
            self.send_cap.clone(),
        );
        r.register(
            "point_waiting_seconds",
            "How long a recovery point that is due or asked for has been held back (0: none is)",
            self.point_waiting.clone(),
        );
        r.register(
            "yielding_cpu",
            "1 while replication's threads yield the CPU to the machine's own work (it keeps up: yield_cpu_lag_secs), 0 while they compete",
            self.yielding.clone(),
        );
        r.register(
            "fast_compressed_bytes",
            "Disk bytes compressed at zstd's fast level because compression was what held shipping back or the data barely compressed at the configured level",
            self.fast_compressed_bytes.clone(),
        );
        r.register(
            "stored_bytes",
            "Disk bytes sent uncompressed: the configured level saved less than an eighth of them, or compression is off (zstd_level = 0)",
            self.stored_bytes.clone(),
        );
        r
    }

    pub fn fast_compressed(&self, bytes: u64) {
        self.fast_compressed_bytes.inc_by(bytes);
    }

    pub fn stored(&self, bytes: u64) {
        self.stored_bytes.inc_by(bytes);
    }

    pub fn shipped(&self, disk: &str, disk_bytes: u64, wire_bytes: u64) {
        let l = disk_label(disk);
        self.shipped_disk_bytes.get_or_create(&l).inc_by(disk_bytes);
        self.shipped_wire_bytes.get_or_create(&l).inc_by(wire_bytes);
    }

    /// A disk's backlog and, while it resyncs, how far the resync got.
    pub fn disk(&self, disk: &str, size_bytes: u64, backlog_bytes: u64, resyncing: bool) {
        let l = disk_label(disk);
        self.backlog_bytes
            .get_or_create(&l)
            .set(i64::try_from(backlog_bytes).unwrap_or(i64::MAX));
        let progress = if resyncing && size_bytes > 0 {
            1.0 - (backlog_bytes.min(size_bytes) as f64 / size_bytes as f64)
        } else {
            1.0
        };
        self.resync_progress.get_or_create(&l).set(progress);
        // A counter exists at 0 from the start, so that `increase()`
        // alerts see its first loss instead of a series appearing.
        let _ = self.tracker_loss_events.get_or_create(&l);
        let _ = self.shipped_disk_bytes.get_or_create(&l);
        let _ = self.shipped_wire_bytes.get_or_create(&l);
    }

    /// A resync became necessary; counted when the tracker lost writes.
    pub fn resync_required(&self, disk: &str, reason: &ResyncReason) {
        if matches!(
            reason,
            ResyncReason::EventsLost(_)
                | ResyncReason::AuditMismatch(_)
                | ResyncReason::TracingChanged(_)
        ) {
            self.tracker_loss_events
                .get_or_create(&disk_label(disk))
                .inc();
        }
    }

    pub fn frozen(&self, d: Duration) {
        self.freeze_seconds.observe(d.as_secs_f64());
    }

    pub fn set_send_cap(&self, cap: Option<u64>) {
        self.send_cap.set(cap.map_or(0, |c| c as i64));
    }

    pub fn set_point_waiting(&self, secs: Option<u64>) {
        self.point_waiting
            .set(secs.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)));
    }

    pub fn set_yielding(&self, yielding: bool) {
        self.yielding.set(yielding.into());
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.set(connected.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_names_and_labels() {
        let m = get();
        let reg = m.registry();
        m.shipped("disk-a", 4096, 64);
        m.disk("disk-a", 1000, 250, true);
        m.resync_required("disk-a", &ResyncReason::EventsLost("overrun".into()));
        m.resync_required("disk-a", &ResyncReason::Initial);
        m.frozen(Duration::from_millis(20));
        m.set_send_cap(Some(2 << 20));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encodes");
        for want in [
            "tidemark_agent_shipped_disk_bytes_total{disk=\"disk-a\"} 4096",
            "tidemark_agent_shipped_wire_bytes_total{disk=\"disk-a\"} 64",
            "tidemark_agent_backlog_bytes{disk=\"disk-a\"} 250",
            "tidemark_agent_resync_progress_ratio{disk=\"disk-a\"} 0.75",
            "tidemark_agent_tracker_loss_events_total{disk=\"disk-a\"} 1",
            "tidemark_agent_freeze_seconds_count 1",
            "tidemark_agent_send_cap_bytes_per_second 2097152",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
