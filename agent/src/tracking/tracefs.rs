//! The agent's private trace instance and its per-CPU binary pipes.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info};

use super::format::{layout, EventLayout};
use super::page::decode;
use super::{Drained, TrackError, TrackedDisk};

/// Where tracefs is mounted on current kernels.
pub const TRACEFS_ROOT: &str = "/sys/kernel/tracing";
/// Request-based (blk-mq) disks report here.
const RQ_EVENT: &str = "events/block/block_rq_complete";
/// Bio-based disks (zram, dm, md) report here instead.
const BIO_EVENT: &str = "events/block/block_bio_complete";

/// Per-CPU loss counters from `per_cpu/cpuN/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LossCounters {
    overrun: u64,
    commit_overrun: u64,
    dropped: u64,
}

pub struct Tracker {
    dir: PathBuf,
    disks: Vec<TrackedDisk>,
    /// (event dir relative to the instance, filter) we keep enabled.
    wanted: Vec<(&'static str, String)>,
    layouts: Vec<EventLayout>,
    pipes: Vec<(PathBuf, File)>,
    stats: Vec<(PathBuf, LossCounters)>,
    page_bytes: usize,
    buf: Vec<u8>,
}

/// Reads a control file in one large read: tracefs files such as `filter`
/// regenerate their text per read, and std's small first probe read
/// would see only the first 32 bytes of it.
fn read_ctl(path: &Path) -> Result<String, TrackError> {
    let err = |source| TrackError::ReadControl {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read(&mut buf).map_err(err)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn write_ctl(path: &Path, value: &str) -> Result<(), TrackError> {
    std::fs::write(path, value).map_err(|source| TrackError::WriteControl {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// Writes only when the value differs: some writes (clock, size) clear
/// the buffer, and a reused instance must keep what it recorded.
fn ensure_ctl(path: &Path, value: &str) -> Result<bool, TrackError> {
    if read_ctl(path)? == value {
        return Ok(false);
    }
    write_ctl(path, value)?;
    Ok(true)
}

fn filter_for(devs: &[u32]) -> String {
    let devs: Vec<String> = devs.iter().map(|d| format!("dev == {d}")).collect();
    format!(
        "({}) && nr_sector != 0 && rwbs ~ \"*[WDN]*\"",
        devs.join(" || ")
    )
}

fn parse_stats(text: &str) -> LossCounters {
    let mut c = LossCounters::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v: u64 = v.trim().parse().unwrap_or(0);
        match k.trim() {
            "overrun" => c.overrun = v,
            "commit overrun" => c.commit_overrun = v,
            "dropped events" => c.dropped = v,
            _ => {}
        }
    }
    c
}

impl Tracker {
    /// Opens the instance `name`, creating it if needed. Returns whether an
    /// existing instance was found configured as wanted, in which case it
    /// holds every event since the previous agent stopped reading.
    pub fn open(
        name: &str,
        disks: Vec<TrackedDisk>,
        buffer_kb_per_cpu: u32,
    ) -> Result<(Tracker, bool), TrackError> {
        let root = Path::new(TRACEFS_ROOT);
        if !root.join("instances").is_dir() {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS_ROOT])
                .status();
            if !root.join("instances").is_dir() {
                return Err(TrackError::NoTracefs);
            }
        }
        let dir = root.join("instances").join(name);
        let created = !dir.exists();
        if created {
            std::fs::create_dir(&dir).map_err(|source| TrackError::CreateInstance {
                path: dir.clone(),
                source,
            })?;
            write_ctl(&dir.join("buffer_size_kb"), &buffer_kb_per_cpu.to_string())?;
            // Monotonic timestamps, comparable with the agent's own clock.
            write_ctl(&dir.join("trace_clock"), "mono")?;
            info!("created trace instance {}", dir.display());
        }

        let mut by_event: Vec<(&'static str, Vec<u32>)> = Vec::new();
        for d in &disks {
            let ev = if d.bio_based { BIO_EVENT } else { RQ_EVENT };
            match by_event.iter_mut().find(|(e, _)| *e == ev) {
                Some((_, devs)) => {
                    if !devs.contains(&d.kernel_dev()) {
                        devs.push(d.kernel_dev())
                    }
                }
                None => by_event.push((ev, vec![d.kernel_dev()])),
            }
        }
        let wanted: Vec<(&'static str, String)> = by_event
            .into_iter()
            .map(|(e, devs)| (e, filter_for(&devs)))
            .collect();

        let mut changed = false;
        changed |= ensure_ctl(&dir.join("buffer_percent"), "0")?;
        changed |= ensure_ctl(&dir.join("options/overwrite"), "1")?;
        for ev in [RQ_EVENT, BIO_EVENT] {
            let want = wanted.iter().find(|(e, _)| *e == ev);
            let ev_dir = dir.join(ev);
            match want {
                Some((_, filter)) => {
                    if read_ctl(&ev_dir.join("filter"))? != *filter {
                        write_ctl(&ev_dir.join("filter"), filter)?;
                        changed = true;
                    }
                    changed |= ensure_ctl(&ev_dir.join("enable"), "1")?;
                }
                None => {
                    ensure_ctl(&ev_dir.join("enable"), "0")?;
                }
            }
        }
        changed |= ensure_ctl(&dir.join("tracing_on"), "1")?;
        let reused = !created && !changed;
        if !created && changed {
            info!(
                "trace instance {} was not configured as expected; reconfigured it",
                dir.display()
            );
        }

        let mut layouts = Vec::new();
        for (ev, _) in &wanted {
            let ev_dir = dir.join(ev);
            let l = layout(
                &read_ctl(&ev_dir.join("id"))?,
                &read_ctl(&ev_dir.join("format"))?,
            )
            .map_err(|message| TrackError::BadFormat {
                path: ev_dir.join("format"),
                message,
            })?;
            layouts.push(l);
        }

        let page_bytes = read_ctl(&dir.join("buffer_subbuf_size_kb"))
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .map_or(4096, |kb| kb * 1024);
        let mut pipes = Vec::new();
        let mut stats = Vec::new();
        let per_cpu = dir.join("per_cpu");
        let mut cpus: Vec<PathBuf> = std::fs::read_dir(&per_cpu)
            .map_err(|source| TrackError::ReadControl {
                path: per_cpu.clone(),
                source,
            })?
            .flatten()
            .map(|e| e.path())
            .collect();
        cpus.sort();
        for cpu in cpus {
            let pipe = cpu.join("trace_pipe_raw");
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&pipe)
                .map_err(|source| TrackError::OpenPipe {
                    path: pipe.clone(),
                    source,
                })?;
            pipes.push((pipe, f));
            let stat_path = cpu.join("stats");
            let base = parse_stats(&read_ctl(&stat_path)?);
            stats.push((stat_path, base));
        }
        debug!(
            "tracking {} disk(s) on {} CPU buffers, page {} bytes",
            disks.len(),
            pipes.len(),
            page_bytes
        );
        Ok((
            Tracker {
                dir,
                disks,
                wanted,
                layouts,
                pipes,
                stats,
                page_bytes,
                buf: vec![0u8; page_bytes],
            },
            reused,
        ))
    }

    pub fn instance_dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every pending page of every CPU without blocking.
    pub fn drain(&mut self) -> Result<Drained, TrackError> {
        let n = self.disks.iter().map(|d| d.index + 1).max().unwrap_or(0);
        let mut out = Drained {
            ranges: vec![Vec::new(); n],
            sectors_seen: vec![0; n],
            lost: None,
            events: 0,
        };
        let mut lost = Vec::new();
        for (path, f) in &mut self.pipes {
            loop {
                let got = match f.read(&mut self.buf) {
                    // 0 means empty here, not end of file (CBT.md §2).
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(TrackError::ReadPipe {
                            path: path.clone(),
                            source,
                        })
                    }
                };
                let (disks, layouts) = (&self.disks, &self.layouts);
                let info = decode(&self.buf[..got.min(self.page_bytes)], |payload| {
                    for l in layouts {
                        let Some(e) = l.decode(payload) else { continue };
                        if !e.modifies || e.nr_sector == 0 {
                            continue;
                        }
                        for d in disks.iter().filter(|d| d.kernel_dev() == e.dev) {
                            out.sectors_seen[d.index] += u64::from(e.nr_sector);
                            if let Some(r) = d.byte_range(e.sector, e.nr_sector) {
                                out.ranges[d.index].push(r);
                            }
                        }
                    }
                });
                out.events += info.events;
                if let Some(count) = info.missed {
                    lost.push(match count {
                        Some(c) => format!("{} reports {c} events lost", path.display()),
                        None => format!("{} reports lost events", path.display()),
                    });
                }
            }
        }
        for (path, base) in &mut self.stats {
            let now = parse_stats(&read_ctl(path)?);
            if now.overrun > base.overrun
                || now.commit_overrun > base.commit_overrun
                || now.dropped > base.dropped
            {
                lost.push(format!(
                    "{}: overrun {} -> {}, dropped {} -> {}",
                    path.display(),
                    base.overrun,
                    now.overrun,
                    base.dropped,
                    now.dropped
                ));
            }
            *base = now;
        }
        if !lost.is_empty() {
            out.lost = Some(lost.join("; "));
        }
        Ok(out)
    }

    /// Checks that nobody switched tracing off or changed our filters.
    pub fn verify(&self) -> Result<(), String> {
        let on = read_ctl(&self.dir.join("tracing_on")).map_err(|e| e.to_string())?;
        if on != "1" {
            return Err(format!("{}/tracing_on is {on}", self.dir.display()));
        }
        for (ev, filter) in &self.wanted {
            let ev_dir = self.dir.join(ev);
            let enable = read_ctl(&ev_dir.join("enable")).map_err(|e| e.to_string())?;
            if enable != "1" {
                return Err(format!("{}/enable is {enable}", ev_dir.display()));
            }
            let now = read_ctl(&ev_dir.join("filter")).map_err(|e| e.to_string())?;
            if now != *filter {
                return Err(format!("{}/filter is {now:?}", ev_dir.display()));
            }
        }
        Ok(())
    }

    /// Removes the instance. Stopping the agent does not: the instance
    /// records writes until the next start.
    pub fn remove(self) -> Result<(), TrackError> {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir(&dir).map_err(|source| TrackError::RemoveInstance { path: dir, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_text_covers_every_disk() {
        assert_eq!(
            filter_for(&[7 << 20, (7 << 20) | 1]),
            "(dev == 7340032 || dev == 7340033) && nr_sector != 0 && rwbs ~ \"*[WDN]*\""
        );
    }

    #[test]
    fn stats_are_parsed() {
        let c = parse_stats(
            "entries: 1159\noverrun: 80568\ncommit overrun: 0\nbytes: 3\ndropped events: 7\n",
        );
        assert_eq!(
            c,
            LossCounters {
                overrun: 80568,
                commit_overrun: 0,
                dropped: 7
            }
        );
    }
}
