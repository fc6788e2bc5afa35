//! The recovery point log: one JSON object per line, appended and fsync'd
//! before a point is acknowledged. A crash mid-append leaves a torn last
//! line without its newline; readers ignore it and the next writer cuts it
//! off, so a point is either fully recorded or not at all.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_common::proto::PointKind;

#[derive(Debug, thiserror::Error)]
pub enum PointsError {
    #[error("cannot open point log {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("point log {} line {line} is damaged ({message}); restore it from backup", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("cannot append to point log {}", path.display())]
    Append {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One recovery point: all listed disks of one machine at one moment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub id: u64,
    /// Agent (machine) name.
    pub machine: String,
    pub kind: PointKind,
    pub name: String,
    /// Agent's clock when it asked for the point, ms since the Unix epoch.
    pub agent_time_ms: u64,
    /// Receiver's clock when the point became durable, RFC 3339 UTC.
    pub recorded_at: String,
    /// Disk ids the point covers.
    pub disks: Vec<String>,
}

/// Reads every complete point, oldest first. A missing log has no points.
pub fn read_all(path: &Path) -> Result<Vec<Point>, PointsError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PointsError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    decode(&bytes).map_err(|(line, message)| PointsError::Parse {
        path: path.to_path_buf(),
        line,
        message,
    })
}

/// Parses the complete lines of a point log (a torn last line, from a
/// crash mid-append, is not one); a bad line is (its number, why).
pub fn decode(bytes: &[u8]) -> Result<Vec<Point>, (usize, String)> {
    let complete = complete_len(bytes);
    let mut out = Vec::new();
    for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let p: Point = serde_json::from_slice(line).map_err(|e| (i + 1, e.to_string()))?;
        out.push(p);
    }
    Ok(out)
}

/// Bytes up to and including the last newline.
fn complete_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// The appending side, held by `serve`.
pub struct PointLog {
    path: PathBuf,
    file: File,
    next_id: u64,
    /// A failed append left bytes after this length (see `append`).
    cut_to: Option<u64>,
}

impl PointLog {
    pub fn open(path: &Path) -> Result<PointLog, PointsError> {
        let points = read_all(path)?;
        let open_err = |source| PointsError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        let bytes = std::fs::read(path).map_err(open_err)?;
        let complete = complete_len(&bytes) as u64;
        if complete != bytes.len() as u64 {
            tracing::warn!(
                "point log {} ends in a torn record ({} bytes); cutting it off",
                path.display(),
                bytes.len() as u64 - complete
            );
            file.set_len(complete).map_err(open_err)?;
            file.sync_all().map_err(open_err)?;
        }
        file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(PointLog {
            path: path.to_path_buf(),
            file,
            next_id: points.iter().map(|p| p.id).max().unwrap_or(0) + 1,
            cut_to: None,
        })
    }

    /// Appends a point durably and returns it with its new id.
    pub fn append(
        &mut self,
        machine: &str,
        kind: PointKind,
        name: &str,
        agent_time_ms: u64,
        disks: Vec<String>,
    ) -> Result<Point, PointsError> {
        let point = Point {
            id: self.next_id,
            machine: machine.to_owned(),
            kind,
            name: name.to_owned(),
            agent_time_ms,
            recorded_at: now_rfc3339(),
            disks,
        };
        let mut line = serde_json::to_vec(&point).expect("point serializes");
        line.push(b'\n');
        let path = self.path.clone();
        let append_err = |source| PointsError::Append { path, source };
        if let Err(e) = self.cut() {
            return Err(append_err(e));
        }
        let before = match self.file.stream_position() {
            Ok(p) => p,
            Err(e) => return Err(append_err(e)),
        };
        // The id is used up even if the line fails: it may yet surface.
        self.next_id += 1;
        if let Err(e) = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
        {
            // A point whose line is not durable is not one, and `points`
            // must not list it from the page cache; nor may a later line
            // become durable behind one a failed writeback dropped.
            self.cut_to = Some(before);
            let _ = self.cut();
            return Err(append_err(e));
        }
        Ok(point)
    }

    /// Cuts the log back to where a failed append began, durably.
    fn cut(&mut self) -> std::io::Result<()> {
        if let Some(len) = self.cut_to {
            self.file.set_len(len)?;
            self.file.sync_data()?;
            self.file.seek(SeekFrom::Start(len))?;
            self.cut_to = None;
        }
        Ok(())
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("current time formats as RFC 3339")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_continue_after_reopen_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("points.jsonl");
        let mut log = PointLog::open(&p).expect("open");
        let a = log
            .append("web", PointKind::CrashConsistent, "a", 1, vec!["d1".into()])
            .expect("append");
        drop(log);
        // Simulate a crash in the middle of the next append.
        let mut f = OpenOptions::new().append(true).open(&p).expect("open");
        f.write_all(b"{\"id\":2,\"mach").expect("torn");
        drop(f);
        assert_eq!(read_all(&p).expect("read"), vec![a.clone()]);
        let mut log = PointLog::open(&p).expect("reopen");
        let b = log
            .append("web", PointKind::AppConsistent, "b", 2, vec!["d1".into()])
            .expect("append");
        assert_eq!(b.id, 2);
        assert_eq!(read_all(&p).expect("read"), vec![a, b]);
    }
}
