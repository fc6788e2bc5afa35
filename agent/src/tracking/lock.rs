//! One agent per trace instance. Two agents reading one instance each see
//! part of its events, so both find their audits failing and resync
//! without end — a stale agent left running beside a new one, or a second
//! `run` started by hand while the service runs. The second one is refused
//! at start instead, before it touches the instance or the admin socket.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::TrackError;

/// Where the locks live: cleared at boot, as trace instances are.
const LOCK_DIR: &str = "/run/lock";

/// Held for as long as the agent runs; the kernel releases it when the
/// process ends, however it ends.
#[derive(Debug)]
pub struct InstanceLock {
    _flock: Flock<File>,
}

impl InstanceLock {
    pub fn take(instance: &str) -> Result<InstanceLock, TrackError> {
        Self::take_in(Path::new(LOCK_DIR), instance)
    }

    fn take_in(dir: &Path, instance: &str) -> Result<InstanceLock, TrackError> {
        let path = dir.join(format!("tidemark-agent-{instance}.lock"));
        let io = |source| TrackError::Lock {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(TrackError::InUse {
                    instance: instance.to_owned(),
                    pid: pid.trim().to_owned(),
                    path: path.clone(),
                });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        // The holder's pid, for the message the next one gets.
        flock.set_len(0).map_err(io)?;
        flock.rewind().map_err(io)?;
        writeln!(flock, "{}", std::process::id()).map_err(io)?;
        Ok(InstanceLock { _flock: flock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = InstanceLock::take_in(dir.path(), "tidemark-x").expect("first");
        let err = InstanceLock::take_in(dir.path(), "tidemark-x").expect_err("second");
        let msg = err.to_string();
        assert!(
            msg.contains(&std::process::id().to_string()) && msg.contains("tidemark-x"),
            "{msg}"
        );
        InstanceLock::take_in(dir.path(), "tidemark-y").expect("another instance");
        drop(first);
        InstanceLock::take_in(dir.path(), "tidemark-x").expect("free again");
    }
}
