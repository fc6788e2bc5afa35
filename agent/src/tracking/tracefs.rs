//! The agent's private trace instance and its per-CPU binary pipes.
//!
//! The instance outlives the agent on purpose: it keeps recording while
//! the agent is down (a restart, an upgrade), and the next agent reads what
//! it recorded, provided the configuration was not changed in between.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::format::{layout, EventLayout};
use super::page::{decode, Missed};
use super::stats::{self, CpuStats};
use super::{Drained, TrackError, TrackedDisk};

/// Where tracefs is mounted on current kernels.
pub const TRACEFS_ROOT: &str = "/sys/kernel/tracing";
/// Request-based (blk-mq) disks report completions here.
const RQ_EVENT: &str = "events/block/block_rq_complete";
/// Bio-based disks (zram, dm, md, brd) report here instead (CBT.md §1).
const BIO_EVENT: &str = "events/block/block_bio_complete";
/// Largest control file text we read (a filter over many disks, the
/// stats); tracefs refuses filters of a page or more anyway.
const CONTROL_READ_BYTES: usize = 64 * 1024;

/// How a control file's text compares with what we want.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// The trimmed text equals the value.
    Plain,
    /// The value is the `[selected]` word of a list (`trace_clock`).
    Selected,
    /// Both are CPU masks (`tracing_cpumask`): hex words, commas between.
    CpuMask,
}

/// A control file we set and, if `watched`, keep checking.
#[derive(Debug, Clone)]
struct Setting {
    /// Relative to the instance directory.
    file: PathBuf,
    value: String,
    compare: Compare,
    /// Changing it makes events go missing or clears the buffer, so a
    /// difference found on an existing instance breaks continuity, and
    /// [`Tracker::verify`] reports it.
    watched: bool,
}

impl Setting {
    fn new(
        file: impl Into<PathBuf>,
        value: impl Into<String>,
        compare: Compare,
        watched: bool,
    ) -> Setting {
        Setting {
            file: file.into(),
            value: value.into(),
            compare,
            watched,
        }
    }

    fn matches(&self, text: &str) -> bool {
        match self.compare {
            Compare::Plain => text.trim() == self.value,
            Compare::Selected => selected(text) == Some(self.value.as_str()),
            Compare::CpuMask => {
                parse_cpumask(text).is_some() && parse_cpumask(text) == parse_cpumask(&self.value)
            }
        }
    }
}

/// One CPU's pipe and loss counters.
#[derive(Debug)]
struct CpuBuffer {
    pipe_path: PathBuf,
    pipe: File,
    stats_path: PathBuf,
    stats: CpuStats,
}

/// The open trace instance. Dropping it closes the pipes and leaves the
/// instance recording; [`Tracker::remove`] deletes it.
#[derive(Debug)]
pub struct Tracker {
    dir: PathBuf,
    disks: Vec<TrackedDisk>,
    /// Everything `open` set, in the order it is written.
    settings: Vec<Setting>,
    layouts: Vec<EventLayout>,
    cpus: Vec<CpuBuffer>,
    /// `buffer_subbuf_size_kb` at open: one read returns one such page.
    page_bytes: usize,
    buf: Vec<u8>,
}

/// Reads a control file with one large read: tracefs files such as
/// `filter` regenerate their text per read, and a small first read would
/// see only the start of it.
fn read_ctl(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; CONTROL_READ_BYTES];
    let n = f.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn read_control(path: &Path) -> Result<String, TrackError> {
    read_ctl(path).map_err(|source| TrackError::ReadControl {
        path: path.to_path_buf(),
        source,
    })
}

fn write_control(path: &Path, value: &str) -> Result<(), TrackError> {
    std::fs::write(path, value).map_err(|source| TrackError::WriteControl {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

/// The `[selected]` word of a list such as `trace_clock`.
fn selected(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

/// The CPUs of a mask such as `3` or `ff,ffffffff` (32-bit hex groups,
/// most significant first).
fn parse_cpumask(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    let groups: Vec<&str> = text.trim().split(',').collect();
    for (i, group) in groups.iter().rev().enumerate() {
        let bits = u32::from_str_radix(group, 16).ok()?;
        for b in 0..32 {
            if bits & (1 << b) != 0 {
                cpus.push(u32::try_from(i).ok()? * 32 + b);
            }
        }
    }
    Some(cpus)
}

/// The mask text of a set of CPUs, as the kernel prints it.
fn format_cpumask(cpus: &[u32]) -> String {
    let groups = cpus.iter().map(|c| c / 32 + 1).max().unwrap_or(1);
    let mut words = vec![0u32; groups as usize];
    for c in cpus {
        words[(c / 32) as usize] |= 1 << (c % 32);
    }
    words
        .iter()
        .rev()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                format!("{w:x}")
            } else {
                format!("{w:08x}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The filter for one event: any of the devices, data-changing ops only.
/// `N` is needed for write-zeroes, zero-length flush completions are
/// dropped (CBT.md §1).
fn filter_for(devs: &[u32]) -> String {
    let devs: Vec<String> = devs.iter().map(|d| format!("dev == {d}")).collect();
    format!(
        "({}) && nr_sector != 0 && rwbs ~ \"*[WDN]*\"",
        devs.join(" || ")
    )
}

/// The CPUs that have a `per_cpu/cpuN` directory (every possible CPU), in
/// order.
fn list_cpus(dir: &Path) -> Result<Vec<u32>, TrackError> {
    let per_cpu = dir.join("per_cpu");
    let err = |source| TrackError::ReadControl {
        path: per_cpu.clone(),
        source,
    };
    let mut cpus: Vec<u32> = std::fs::read_dir(&per_cpu)
        .map_err(err)?
        .map(|e| e.map_err(err))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("cpu")?.parse().ok())
        .collect();
    cpus.sort_unstable();
    Ok(cpus)
}

/// Mounts tracefs where it belongs if it is not there.
fn ensure_tracefs() -> Result<(), TrackError> {
    let root = Path::new(TRACEFS_ROOT);
    if root.join("instances").is_dir() {
        return Ok(());
    }
    nix::mount::mount(
        Some("nodev"),
        root,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| TrackError::NoTracefs(e.into()))?;
    if !root.join("instances").is_dir() {
        return Err(TrackError::NoTracefs(std::io::Error::new(
            ErrorKind::NotFound,
            "no instances directory after mounting",
        )));
    }
    Ok(())
}

impl Tracker {
    /// Opens the instance `TRACEFS_ROOT/instances/<name>`, creating it if
    /// missing (with `buffer_kb_per_cpu` of ring per CPU), or reusing it.
    ///
    /// Sets: `buffer_percent` 0, `options/overwrite` 1, `trace_clock` mono,
    /// all CPUs in `tracing_cpumask`, no pid filters, the filter of
    /// [`filter_for`] on `block_rq_complete` (blk-mq disks) and/or
    /// `block_bio_complete` (bio-based disks) and their `enable`, then
    /// `tracing_on`. An existing instance is never resized (that clears
    /// it). The kernel refuses a filter text of a page or more, about 190
    /// distinct whole disks per event.
    ///
    /// Returns whether the instance existed and was configured exactly so:
    /// then it holds every event since the previous agent stopped reading
    /// (up to its size; an overflow shows up as `lost` in the first
    /// drain). Otherwise whatever differed was corrected and the flag is
    /// false.
    pub fn open(
        name: &str,
        disks: Vec<TrackedDisk>,
        buffer_kb_per_cpu: u32,
    ) -> Result<(Tracker, bool), TrackError> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(TrackError::BadInstanceName {
                name: name.to_owned(),
            });
        }
        ensure_tracefs()?;
        let dir = Path::new(TRACEFS_ROOT).join("instances").join(name);
        let created = match std::fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
            Err(source) => return Err(TrackError::CreateInstance { path: dir, source }),
        };
        match Tracker::configure(&dir, disks, buffer_kb_per_cpu, created) {
            Ok(opened) => Ok(opened),
            Err(e) => {
                if created {
                    // A half-configured instance must not look reusable.
                    if let Err(rm) = std::fs::remove_dir(&dir) {
                        warn!(
                            "cannot remove half-created trace instance {}: {rm}",
                            dir.display()
                        );
                    }
                }
                Err(e)
            }
        }
    }

    fn configure(
        dir: &Path,
        disks: Vec<TrackedDisk>,
        buffer_kb_per_cpu: u32,
        created: bool,
    ) -> Result<(Tracker, bool), TrackError> {
        let cpus = list_cpus(dir)?;
        let settings = wanted_settings(&disks, &cpus);
        let mut changed = Vec::new();
        if created {
            // Size first: resizing clears the buffer, and the clock too.
            write_control(&dir.join("buffer_size_kb"), &buffer_kb_per_cpu.to_string())?;
            for s in &settings {
                write_control(&dir.join(&s.file), &s.value)?;
            }
            info!("created trace instance {}", dir.display());
        } else {
            for s in &settings {
                let path = dir.join(&s.file);
                let now = read_control(&path)?;
                if s.matches(&now) {
                    continue;
                }
                write_control(&path, &s.value)?;
                if s.watched {
                    changed.push(format!("{} was {:?}", s.file.display(), now.trim()));
                }
            }
            let size = read_control(&dir.join("buffer_size_kb"))?;
            if size.trim().parse::<u32>().ok() != Some(buffer_kb_per_cpu) {
                debug!(
                    "trace instance {} keeps its buffer of {} KiB per CPU ({buffer_kb_per_cpu} asked): resizing would clear it",
                    dir.display(),
                    size.trim()
                );
            }
            if changed.is_empty() {
                info!("reusing trace instance {} as it was left", dir.display());
            } else {
                warn!(
                    "trace instance {} was not configured as expected ({}); reconfigured it, events may be missing",
                    dir.display(),
                    changed.join(", ")
                );
            }
        }
        let reused = !created && changed.is_empty();

        let mut layouts = Vec::new();
        for ev in [RQ_EVENT, BIO_EVENT] {
            if !settings
                .iter()
                .any(|s| s.file == Path::new(ev).join("filter"))
            {
                continue;
            }
            let ev_dir = dir.join(ev);
            let read = |f: &str| {
                let path = ev_dir.join(f);
                read_ctl(&path).map_err(|source| TrackError::ReadFormat { path, source })
            };
            let l = layout(&read("id")?, &read("format")?).map_err(|message| {
                TrackError::BadFormat {
                    path: ev_dir.join("format"),
                    message,
                }
            })?;
            layouts.push(l);
        }

        let subbuf = dir.join("buffer_subbuf_size_kb");
        // Kernels before 6.8 have no such file: pages are 4 KiB there.
        let page_bytes = match read_ctl(&subbuf) {
            Ok(text) => {
                text.trim()
                    .parse::<usize>()
                    .map_err(|_| TrackError::BadFormat {
                        path: subbuf.clone(),
                        message: format!("not a size: {:?}", text.trim()),
                    })?
                    * 1024
            }
            Err(e) if e.kind() == ErrorKind::NotFound => 4096,
            Err(source) => {
                return Err(TrackError::ReadControl {
                    path: subbuf,
                    source,
                })
            }
        };

        let mut buffers = Vec::new();
        for cpu in cpus {
            let cpu_dir = dir.join("per_cpu").join(format!("cpu{cpu}"));
            let pipe_path = cpu_dir.join("trace_pipe_raw");
            let pipe = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&pipe_path)
                .map_err(|source| TrackError::OpenPipe {
                    path: pipe_path.clone(),
                    source,
                })?;
            let stats_path = cpu_dir.join("stats");
            let stats = stats::parse(&read_control(&stats_path)?);
            buffers.push(CpuBuffer {
                pipe_path,
                pipe,
                stats_path,
                stats,
            });
        }
        debug!(
            "tracking {} disk(s) in {} on {} CPU buffers of {page_bytes}-byte pages",
            disks.len(),
            dir.display(),
            buffers.len(),
        );
        Ok((
            Tracker {
                dir: dir.to_path_buf(),
                disks,
                settings,
                layouts,
                cpus: buffers,
                page_bytes,
                buf: vec![0u8; page_bytes],
            },
            reused,
        ))
    }

    /// Replaces what is known of disk `disk.index` (its size after it
    /// grew). The filter names only the device number, so the instance is
    /// left as it is.
    pub fn update_disk(&mut self, disk: TrackedDisk) {
        for d in self.disks.iter_mut().filter(|d| d.index == disk.index) {
            *d = disk.clone();
        }
    }

    pub fn instance_dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every CPU's pipe until it is empty, without blocking, and
    /// maps the events onto the disks.
    pub fn drain(&mut self) -> Result<Drained, TrackError> {
        let slots = self.disks.iter().map(|d| d.index + 1).max().unwrap_or(0);
        let mut out = Drained {
            ranges: vec![Vec::new(); slots],
            sectors_seen: vec![0; slots],
            lost: None,
            events: 0,
        };
        // (timestamp, disk index, range), merged over the CPUs below.
        let mut hits: Vec<(u64, usize, Range<u64>)> = Vec::new();
        let mut lost = Vec::new();
        for (cpu, b) in self.cpus.iter_mut().enumerate() {
            let mut records = 0u64;
            let mut pages = 0u64;
            let (mut missed_pages, mut missed_count, mut malformed) = (0u64, 0u64, 0u64);
            loop {
                let got = match b.pipe.read(&mut self.buf) {
                    // With O_NONBLOCK an empty buffer reads as 0 or EAGAIN;
                    // 0 is not end of file here (CBT.md §2).
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(TrackError::ReadPipe {
                            path: b.pipe_path.clone(),
                            source,
                        })
                    }
                };
                pages += 1;
                let (disks, layouts) = (&self.disks, &self.layouts);
                let events = &mut out.events;
                let seen = &mut out.sectors_seen;
                let info = decode(&self.buf[..got], |ts, payload| {
                    let Some(e) = layouts.iter().find_map(|l| l.decode(payload)) else {
                        return;
                    };
                    *events += 1;
                    if !e.modifies || e.nr_sector == 0 {
                        return;
                    }
                    for d in disks.iter().filter(|d| d.kernel_dev() == e.dev) {
                        seen[d.index] += u64::from(e.nr_sector);
                        if let Some(r) = d.byte_range(e.sector, e.nr_sector) {
                            hits.push((ts, d.index, r));
                        }
                    }
                });
                records += info.events;
                match info.missed {
                    Missed::No => {}
                    Missed::Unknown => missed_pages += 1,
                    Missed::Count(n) => {
                        missed_pages += 1;
                        missed_count += n;
                    }
                }
                if info.malformed {
                    malformed += 1;
                }
            }
            if missed_pages > 0 {
                lost.push(format!(
                    "cpu{cpu}: {missed_pages} page(s) flagged events missed before them ({missed_count} counted)"
                ));
            }
            if malformed > 0 {
                lost.push(format!(
                    "cpu{cpu}: {malformed} of {pages} page(s) did not decode"
                ));
            }
            let now = stats::parse(&read_control(&b.stats_path)?);
            if let Some(why) = stats::loss(&b.stats, &now, records) {
                lost.push(format!("{}: {why}", b.stats_path.display()));
            }
            b.stats = now;
        }
        // Each CPU's events are in order; the monotonic clock orders them
        // across CPUs. The sort is stable, so equal stamps keep CPU order.
        hits.sort_by_key(|h| h.0);
        for (_, index, r) in hits {
            out.ranges[index].push(r);
        }
        if !lost.is_empty() {
            out.lost = Some(lost.join("; "));
        }
        Ok(out)
    }

    /// Checks that the instance is still configured as `open` left it:
    /// `tracing_on`, the events' `enable` and `filter`, overwrite mode, the
    /// clock, the CPU mask, no pid filters, the page size. Someone may have
    /// switched tracing off behind our back; the error says what changed.
    pub fn verify(&self) -> Result<(), String> {
        let mut what = Vec::new();
        for s in self.settings.iter().filter(|s| s.watched) {
            let path = self.dir.join(&s.file);
            match read_ctl(&path) {
                Ok(now) if s.matches(&now) => {}
                Ok(now) => what.push(format!(
                    "{} is {:?}, expected {:?}",
                    path.display(),
                    now.trim(),
                    s.value
                )),
                Err(e) => what.push(format!("cannot read {}: {e}", path.display())),
            }
        }
        let subbuf = self.dir.join("buffer_subbuf_size_kb");
        if let Ok(now) = read_ctl(&subbuf) {
            if now.trim().parse::<usize>().ok() != Some(self.page_bytes / 1024) {
                what.push(format!(
                    "{} is {:?}, was {}",
                    subbuf.display(),
                    now.trim(),
                    self.page_bytes / 1024
                ));
            }
        }
        if what.is_empty() {
            Ok(())
        } else {
            Err(what.join("; "))
        }
    }

    /// Removes the instance (closing our pipes first: rmdir fails with
    /// EBUSY while any of its files is open). Stopping the agent does not
    /// do this: the instance records writes until the next start.
    pub fn remove(self) -> Result<(), TrackError> {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir(&dir).map_err(|source| TrackError::RemoveInstance { path: dir, source })
    }
}

/// What `open` writes, in order: filters before enables, `tracing_on`
/// last, so that nothing unfiltered is ever recorded.
fn wanted_settings(disks: &[TrackedDisk], cpus: &[u32]) -> Vec<Setting> {
    let mut rq_devs: Vec<u32> = Vec::new();
    let mut bio_devs: Vec<u32> = Vec::new();
    for d in disks {
        let devs = if d.bio_based {
            &mut bio_devs
        } else {
            &mut rq_devs
        };
        if !devs.contains(&d.kernel_dev()) {
            devs.push(d.kernel_dev());
        }
    }
    let mut s = vec![
        Setting::new("buffer_percent", "0", Compare::Plain, false),
        Setting::new("options/overwrite", "1", Compare::Plain, true),
        Setting::new("trace_clock", "mono", Compare::Selected, true),
        Setting::new(
            "tracing_cpumask",
            format_cpumask(cpus),
            Compare::CpuMask,
            true,
        ),
        Setting::new("set_event_pid", "", Compare::Plain, true),
        Setting::new("set_event_notrace_pid", "", Compare::Plain, true),
    ];
    for (ev, devs) in [(RQ_EVENT, &rq_devs), (BIO_EVENT, &bio_devs)] {
        let ev = Path::new(ev);
        if devs.is_empty() {
            s.push(Setting::new(ev.join("enable"), "0", Compare::Plain, false));
        } else {
            s.push(Setting::new(
                ev.join("filter"),
                filter_for(devs),
                Compare::Plain,
                true,
            ));
            s.push(Setting::new(ev.join("enable"), "1", Compare::Plain, true));
        }
    }
    s.push(Setting::new("tracing_on", "1", Compare::Plain, true));
    s
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
    fn selected_word() {
        let clocks = "local global counter uptime perf [mono] mono_raw boot tai x86-tsc\n";
        assert_eq!(selected(clocks), Some("mono"));
        assert_eq!(selected("local global"), None);
        let s = Setting::new("trace_clock", "mono", Compare::Selected, true);
        assert!(s.matches(clocks));
        assert!(!s.matches("[local] global counter uptime perf mono\n"));
    }

    #[test]
    fn cpu_masks() {
        assert_eq!(parse_cpumask("3\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpumask("2"), Some(vec![1]));
        assert_eq!(parse_cpumask("1,00000001"), Some(vec![0, 32]));
        assert_eq!(parse_cpumask("x"), None);
        assert_eq!(format_cpumask(&[0, 1]), "3");
        assert_eq!(format_cpumask(&[0, 33]), "2,00000001");
        assert_eq!(format_cpumask(&(0..40).collect::<Vec<_>>()), "ff,ffffffff");
        assert_eq!(format_cpumask(&[]), "0");
        let s = Setting::new("tracing_cpumask", "3", Compare::CpuMask, true);
        assert!(s.matches("00000003\n"));
        assert!(!s.matches("2\n"));
        assert!(!s.matches("zz"));
    }

    #[test]
    fn settings_follow_the_disks() {
        let disk = |index, minor, bio_based| TrackedDisk {
            index,
            major: 7,
            minor,
            partition: None,
            size_bytes: 1 << 20,
            bio_based,
        };
        let s = wanted_settings(&[disk(0, 0, false), disk(1, 0, false)], &[0, 1]);
        let files: Vec<String> = s.iter().map(|s| s.file.display().to_string()).collect();
        let filter = files
            .iter()
            .position(|f| f.ends_with("block_rq_complete/filter"));
        let enable = files
            .iter()
            .position(|f| f.ends_with("block_rq_complete/enable"));
        assert!(filter < enable && enable < files.iter().position(|f| f == "tracing_on"));
        assert_eq!(s[filter.expect("filter")].value, filter_for(&[7 << 20]));
        let bio = s
            .iter()
            .find(|s| s.file.ends_with("block_bio_complete/enable"));
        assert_eq!(
            bio.map(|s| (s.value.as_str(), s.watched)),
            Some(("0", false))
        );

        let s = wanted_settings(&[disk(0, 0, false), disk(1, 3, true)], &[0, 1]);
        let bio = s
            .iter()
            .find(|s| s.file.ends_with("block_bio_complete/filter"));
        assert_eq!(
            bio.map(|s| s.value.clone()),
            Some(filter_for(&[(7 << 20) | 3]))
        );
    }
}
