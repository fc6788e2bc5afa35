//! Who may connect, and who is connected: the deny list from
//! receiver.toml (agent names and certificate fingerprints), consulted
//! during the TLS handshake, and the table of live sessions, so that a
//! revocation or a reassignment can close the sessions it concerns; and
//! the connections still in their handshake, of which only so many are
//! kept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use tokio::sync::oneshot;
use tracing::warn;

use crate::config::{normalize_fingerprint, ReceiverConfig};

/// Agents this receiver refuses, whatever their CA says.
#[derive(Debug, Default)]
pub struct DenyList {
    names: BTreeSet<String>,
    /// Lowercase hex SHA-256 of the DER certificate.
    fingerprints: BTreeSet<String>,
}

impl DenyList {
    /// From a validated config (fingerprints already checked).
    pub fn from_config(c: &ReceiverConfig) -> DenyList {
        DenyList {
            names: c
                .revoked_agents
                .iter()
                .map(|n| n.trim().to_owned())
                .collect(),
            fingerprints: c
                .revoked_fingerprints
                .iter()
                .filter_map(|f| normalize_fingerprint(f))
                .collect(),
        }
    }

    /// Why this agent is refused, if it is.
    pub fn refuses(&self, name: Option<&str>, fingerprint: &str) -> Option<String> {
        if let Some(n) = name.filter(|n| self.names.contains(*n)) {
            return Some(format!("agent {n} is listed in revoked_agents"));
        }
        self.fingerprints.contains(fingerprint).then(|| {
            format!(
                "certificate sha256 {fingerprint} of agent {} is listed in revoked_fingerprints",
                name.unwrap_or("(no name)")
            )
        })
    }

    pub fn refuses_name(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.names.len(), self.fingerprints.len())
    }
}

impl tidemark_common::tls::ClientPolicy for DenyList {
    fn admit(&self, end_entity: &CertificateDer<'_>) -> Result<(), String> {
        let name = tidemark_common::tls::common_name(end_entity);
        let fingerprint = tidemark_common::tls::fingerprint_sha256(end_entity);
        match self.refuses(name.as_deref(), &fingerprint) {
            Some(why) => {
                warn!(
                    "refused agent {} at the TLS handshake: {why}",
                    name.as_deref().unwrap_or("(no name)")
                );
                Err(why)
            }
            None => Ok(()),
        }
    }
}

/// One connection past the handshake.
#[derive(Debug)]
struct Live {
    agent: String,
    fingerprint: String,
    /// When its last message came.
    heard: SystemTime,
    /// Closes the session, saying why.
    close: Option<oneshot::Sender<String>>,
}

/// What is known of one agent's contact with this receiver since `serve`
/// started.
#[derive(Debug, Clone)]
pub struct Contact {
    /// Sessions open now.
    pub sessions: usize,
    /// Its last message while connected; else when its last session ended.
    pub last: SystemTime,
}

/// Live sessions and every agent's last contact.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<u64, Live>>,
    last_seen: Mutex<BTreeMap<String, SystemTime>>,
}

/// Removes its session from the table when the connection task ends,
/// whichever way it ends.
pub struct SessionGuard<'a> {
    sessions: &'a Sessions,
    id: u64,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.sessions.ended(self.id);
    }
}

impl Sessions {
    /// Records a session; the receiver fires when it must be closed.
    pub fn open(
        &self,
        id: u64,
        agent: &str,
        fingerprint: &str,
    ) -> (SessionGuard<'_>, oneshot::Receiver<String>) {
        let (tx, rx) = oneshot::channel();
        self.live.lock().expect("sessions lock").insert(
            id,
            Live {
                agent: agent.to_owned(),
                fingerprint: fingerprint.to_owned(),
                heard: SystemTime::now(),
                close: Some(tx),
            },
        );
        self.touch(agent);
        (SessionGuard { sessions: self, id }, rx)
    }

    fn touch(&self, agent: &str) {
        self.last_seen
            .lock()
            .expect("last_seen lock")
            .insert(agent.to_owned(), SystemTime::now());
    }

    /// A message came on session `id`: the agent is alive.
    pub fn heard(&self, id: u64) {
        if let Some(s) = self.live.lock().expect("sessions lock").get_mut(&id) {
            s.heard = SystemTime::now();
        }
    }

    fn ended(&self, id: u64) {
        let gone = self.live.lock().expect("sessions lock").remove(&id);
        if let Some(s) = gone {
            self.touch(&s.agent);
        }
    }

    /// Closes every session `doomed` picks; returns their agents' names.
    pub fn close_where(&self, doomed: impl Fn(&str, &str) -> bool, why: &str) -> Vec<String> {
        let mut closed = Vec::new();
        for s in self.live.lock().expect("sessions lock").values_mut() {
            if doomed(&s.agent, &s.fingerprint) {
                if let Some(tx) = s.close.take() {
                    let _ = tx.send(why.to_owned());
                    closed.push(s.agent.clone());
                }
            }
        }
        closed
    }

    /// Closes `agent`'s sessions other than `except` not heard from for
    /// `silent_for`; returns how many.
    pub fn close_silent(
        &self,
        agent: &str,
        except: u64,
        silent_for: std::time::Duration,
        why: &str,
    ) -> usize {
        let now = SystemTime::now();
        let mut closed = 0;
        for (id, s) in self.live.lock().expect("sessions lock").iter_mut() {
            let silent = now.duration_since(s.heard).unwrap_or_default();
            if *id != except && s.agent == agent && silent >= silent_for {
                if let Some(tx) = s.close.take() {
                    let _ = tx.send(why.to_owned());
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Number of sessions open now.
    pub fn count(&self) -> usize {
        self.live.lock().expect("sessions lock").len()
    }

    /// Every agent seen since `serve` started.
    pub fn contacts(&self) -> BTreeMap<String, Contact> {
        let mut out: BTreeMap<String, Contact> = self
            .last_seen
            .lock()
            .expect("last_seen lock")
            .iter()
            .map(|(a, t)| {
                (
                    a.clone(),
                    Contact {
                        sessions: 0,
                        last: *t,
                    },
                )
            })
            .collect();
        for s in self.live.lock().expect("sessions lock").values() {
            let c = out.entry(s.agent.clone()).or_insert(Contact {
                sessions: 0,
                last: s.heard,
            });
            // A session that stays open says nothing about whether the
            // agent still talks: its last message does.
            c.last = c.last.max(s.heard);
            c.sessions += 1;
        }
        out
    }
}

/// Connections not yet past TLS, preamble and hello. Anyone who can reach
/// the port can open them, so only [`Handshaking::MAX`] are kept: a new one
/// pushes out the oldest, which has had the most time to finish. An agent
/// finishes in milliseconds, so a flood of idle or trickling connections
/// cannot keep it out, and holds no more than this many sockets and tasks.
#[derive(Debug, Default)]
pub struct Handshaking {
    /// By connection id, which grows with time: the first is the oldest.
    waiting: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

/// A connection's place among the handshaking ones, given up on drop.
pub struct HandshakeSlot<'a> {
    table: &'a Handshaking,
    id: u64,
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl Handshaking {
    /// Most connections kept in their handshake at once.
    pub const MAX: usize = 128;

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place for connection `id`; the receiver fires if it is
    /// pushed out by newer ones.
    pub fn enter(&self, id: u64) -> (HandshakeSlot<'_>, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.lock();
        waiting.insert(id, tx);
        while waiting.len() > Self::MAX {
            if let Some((_, oldest)) = waiting.pop_first() {
                let _ = oldest.send(());
            }
        }
        (HandshakeSlot { table: self, id }, rx)
    }

    /// Connections in their handshake now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_by_name_and_fingerprint() {
        let fp = "ab".repeat(32);
        let d = DenyList {
            names: ["web-01".to_owned()].into(),
            fingerprints: [fp.clone()].into(),
        };
        assert!(d.refuses(Some("web-01"), "00").is_some());
        assert!(d
            .refuses(Some("db-01"), &fp)
            .is_some_and(|w| w.contains("db-01")));
        assert!(d.refuses(Some("db-01"), "00").is_none());
    }

    #[test]
    fn closing_reaches_the_session_and_contact_stays() {
        let s = Sessions::default();
        let (guard, mut rx) = s.open(1, "web-01", "ff");
        let (_g2, _rx2) = s.open(2, "db-01", "ee");
        assert_eq!(
            s.close_where(|a, _| a == "web-01", "revoked"),
            vec!["web-01".to_owned()]
        );
        assert_eq!(rx.try_recv().as_deref(), Ok("revoked"));
        drop(guard);
        let c = s.contacts();
        assert_eq!(c["web-01"].sessions, 0);
        assert_eq!(c["db-01"].sessions, 1);
        assert_eq!(s.count(), 1);
    }

    #[test]
    fn the_oldest_handshake_makes_room() {
        let h = Handshaking::default();
        let mut kept: Vec<_> = (0..Handshaking::MAX as u64).map(|i| h.enter(i)).collect();
        assert!(kept.iter_mut().all(|(_, rx)| rx.try_recv().is_err()));
        let (_newest, mut rx) = h.enter(1000);
        assert!(rx.try_recv().is_err(), "the newest stays");
        assert!(kept[0].1.try_recv().is_ok(), "the oldest was pushed out");
        assert!(kept[1].1.try_recv().is_err());
        assert_eq!(h.count(), Handshaking::MAX);
        kept.truncate(10);
        assert_eq!(h.count(), 10);
    }

    #[test]
    fn only_silent_sessions_of_the_same_agent_are_superseded() {
        let s = Sessions::default();
        let (_g1, mut old) = s.open(1, "web-01", "ff");
        let (_g2, mut other) = s.open(2, "db-01", "ee");
        let (_g3, mut new) = s.open(3, "web-01", "ff");
        let hour = std::time::Duration::from_secs(3600);
        // Nobody has been silent for an hour yet.
        assert_eq!(s.close_silent("web-01", 3, hour, "superseded"), 0);
        let past = SystemTime::now() - 2 * hour;
        for st in s.live.lock().expect("lock").values_mut() {
            st.heard = past;
        }
        assert_eq!(s.close_silent("web-01", 3, hour, "superseded"), 1);
        assert_eq!(old.try_recv().as_deref(), Ok("superseded"));
        assert!(other.try_recv().is_err(), "another agent's session stays");
        assert!(new.try_recv().is_err(), "the new session stays");
    }
}
