//! A stand-in for systemd's notification socket: a unix datagram socket
//! the test binds and hands to a daemon as `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Collects every `KEY=value` line daemons send to it.
pub struct NotifySocket {
    sock: UnixDatagram,
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Every line received so far, in order.
    pub lines: Vec<String>,
}

impl NotifySocket {
    pub fn bind() -> anyhow::Result<NotifySocket> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(NotifySocket {
            sock,
            _dir: dir,
            path,
            lines: Vec::new(),
        })
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }

    /// Receives until `want` (a whole line, e.g. `READY=1`) has arrived
    /// `times` times in total, or errors after `timeout` quoting what came.
    pub fn wait_for(&mut self, want: &str, times: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            if self.count(want) >= times {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{want:?} received {} times, not {times}, within {timeout:?}; got {:?}",
                    self.count(want),
                    self.lines
                );
            }
            match self.sock.recv(&mut buf) {
                Ok(n) => self.lines.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_owned),
                ),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn count(&self, line: &str) -> usize {
        self.lines.iter().filter(|l| *l == line).count()
    }

    /// The last `STATUS=` text received.
    pub fn last_status(&self) -> Option<&str> {
        self.lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("STATUS="))
    }
}
