//! Alarms: `serve` looks at every disk's RPO and every agent's last
//! contact every few seconds. A disk whose newest consistent point is older
//! than `rpo_threshold_secs`, or an agent owning disks that has sent
//! nothing for `heartbeat_timeout_secs`, raises an alarm: one warning in
//! the log when it crosses, shown in `status` while it lasts, and one info
//! line when it clears. Only crossings are logged, so a long outage does
//! not flood the journal.
//!
//! A disk without any point yet (initial sync) and a failed-over disk
//! raise no RPO alarm: the first has no RPO, the second is not replicated
//! on purpose. Their state says so instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::Shared;

/// How often alarms are evaluated: small against any sensible threshold,
/// and reading the point log this often costs little.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(2);

/// What an alarm is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Alarm {
    /// The disk's RPO is over the threshold.
    Rpo(String),
    /// The agent has not been heard from for the timeout.
    Heartbeat(String),
}

/// The receiver's view of one disk at the last evaluation.
#[derive(Debug, Clone, Default)]
pub struct DiskHealth {
    /// `initial-sync`, `protected` or `failed-over`.
    pub protection: String,
    /// Why the disk is not replicated, when failed over.
    pub reason: Option<String>,
    pub rpo_seconds: Option<i64>,
    /// Recovery points covering the disk still listed.
    pub points: u64,
    /// Bytes of undo history on the retention volume.
    pub journal_bytes: u64,
}

/// Alarms in force and the last evaluation.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    raised: BTreeSet<Alarm>,
    disks: BTreeMap<String, DiskHealth>,
}

impl Health {
    pub fn raised(&self, alarm: &Alarm) -> bool {
        self.state
            .lock()
            .expect("health lock")
            .raised
            .contains(alarm)
    }

    pub fn disks(&self) -> BTreeMap<String, DiskHealth> {
        self.state.lock().expect("health lock").disks.clone()
    }

    pub fn alarms(&self) -> Vec<Alarm> {
        self.state
            .lock()
            .expect("health lock")
            .raised
            .iter()
            .cloned()
            .collect()
    }

    /// Replaces the alarm set, logging every alarm that is new or gone;
    /// returns those gone.
    fn update(
        &self,
        now: BTreeMap<Alarm, String>,
        disks: BTreeMap<String, DiskHealth>,
    ) -> Vec<Alarm> {
        let mut st = self.state.lock().expect("health lock");
        for (alarm, why) in &now {
            if !st.raised.contains(alarm) {
                warn!("{why}");
            }
        }
        let cleared: Vec<Alarm> = st
            .raised
            .iter()
            .filter(|a| !now.contains_key(*a))
            .cloned()
            .collect();
        for alarm in &cleared {
            match alarm {
                Alarm::Rpo(d) => info!("RPO alarm cleared: disk {d} is back under the threshold"),
                Alarm::Heartbeat(a) => {
                    info!("heartbeat alarm cleared: agent {a} is heard from again")
                }
            }
        }
        st.raised = now.into_keys().collect();
        st.disks = disks;
        cleared
    }
}

/// Looks at every disk and agent once (blocking: reads the point log).
pub fn evaluate(shared: &Shared) -> anyhow::Result<()> {
    let config = &shared.config;
    let listing = crate::listing::points(config, None)?;
    let owners: BTreeMap<String, String> = shared
        .registry
        .lock()
        .expect("registry lock")
        .iter()
        .map(|(id, e)| (id.clone(), e.agent.clone()))
        .collect();
    let threshold = i64::try_from(config.rpo_threshold_secs).unwrap_or(i64::MAX);
    let mut alarms = BTreeMap::new();
    let mut disks = BTreeMap::new();
    for id in owners.keys() {
        let choices = listing.disks.get(id);
        let rpo_seconds = choices.and_then(|c| c.rpo_seconds);
        let failed_over = crate::failover::load(config, id)
            .ok()
            .flatten()
            .filter(crate::failover::Record::blocks_replication);
        let protection = if failed_over.is_some() {
            "failed-over"
        } else if choices.and_then(|c| c.latest).is_none() {
            "initial-sync"
        } else {
            "protected"
        };
        if failed_over.is_none() {
            if let Some(rpo) = rpo_seconds.filter(|&r| r > threshold) {
                alarms.insert(
                    Alarm::Rpo(id.clone()),
                    format!(
                        "RPO alarm: disk {id} (agent {}) has no recovery point newer than {rpo} s (rpo_threshold_secs = {threshold}); check that the agent is running and reaches this receiver",
                        owners[id]
                    ),
                );
            }
        }
        disks.insert(
            id.clone(),
            DiskHealth {
                protection: protection.to_owned(),
                reason: failed_over.map(|r| r.describe(id)),
                rpo_seconds,
                points: listing
                    .points
                    .iter()
                    .filter(|p| p.disks.iter().any(|d| d == id))
                    .count() as u64,
                journal_bytes: dir_bytes(&crate::journal::undo::disk_dir(
                    &config.retention_dir,
                    id,
                )),
            },
        );
    }
    let contacts = shared.sessions.contacts();
    let timeout = Duration::from_secs(config.heartbeat_timeout_secs);
    let now = SystemTime::now();
    let agents: BTreeSet<&String> = owners.values().collect();
    for agent in agents {
        // Not heard from since `serve` started counts from the start.
        let last = contacts.get(agent).map_or(shared.started, |c| c.last);
        let silent = now.duration_since(last).unwrap_or_default();
        if silent > timeout {
            alarms.insert(
                Alarm::Heartbeat(agent.clone()),
                format!(
                    "heartbeat alarm: agent {agent} has not been heard from for {} s (heartbeat_timeout_secs = {}); its disks are not being replicated",
                    silent.as_secs(),
                    config.heartbeat_timeout_secs
                ),
            );
        }
    }
    let cleared = shared.health.update(alarms, disks.clone());
    for a in &cleared {
        shared.metrics.cleared(a);
    }
    shared.metrics.refresh(&disks, &shared.health.alarms());
    Ok(())
}

/// Bytes of the files under `dir` (0 if it is missing).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_crossings_change_the_set() {
        let h = Health::default();
        let a = Alarm::Rpo("d".into());
        h.update([(a.clone(), "RPO alarm".into())].into(), BTreeMap::new());
        assert!(h.raised(&a));
        h.update([(a.clone(), "RPO alarm".into())].into(), BTreeMap::new());
        assert_eq!(h.alarms(), vec![a.clone()]);
        h.update(BTreeMap::new(), BTreeMap::new());
        assert!(!h.raised(&a));
    }
}
