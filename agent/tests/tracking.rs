//! Change tracking against the real kernel: loop devices (and a zram
//! device for the bio-based path), real block tracepoints in a private
//! tracefs instance.
//!
//! These need root, `losetup`, `blkdiscard` and `partx`; they fail (never
//! skip) when a prerequisite is missing. Every loop device, zram device and
//! trace instance is released by a guard, also when an assertion fails.
//! They take the machine-wide test lock, because other tests use loop
//! devices and tracefs at the same time.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tidemark_agent::source::{BufPool, DeviceReader, Pages};
use tidemark_agent::tracking::{disk_counters, DirtyMap, TrackedDisk, Tracker, TRACEFS_ROOT};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The lock file every test touching loop devices or tracefs takes.
const KERNEL_LOCK_PATH: &str = "/run/lock/tidemark-tests.lock";

static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Held while a test uses loop devices and tracefs. Field order is drop
/// order: the machine-wide lock goes first.
struct KernelLock {
    _flock: Flock<File>,
    _guard: MutexGuard<'static, ()>,
}

fn kernel_lock() -> KernelLock {
    let guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let _ = std::fs::create_dir_all("/run/lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(KERNEL_LOCK_PATH)
        .unwrap_or_else(|e| panic!("open {KERNEL_LOCK_PATH}: {e}"));
    let flock = Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {KERNEL_LOCK_PATH}: {e}"));
    KernelLock {
        _flock: flock,
        _guard: guard,
    }
}

/// Root, tracefs and the tools; panics naming what is missing.
fn prerequisites() -> KernelLock {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the tracking tests need root (loop devices, tracefs); run them as root"
    );
    for tool in ["losetup", "blkdiscard", "partx"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "the tracking tests need `{tool}` (util-linux) on PATH"
        );
    }
    let lock = kernel_lock();
    // Tracker::open mounts tracefs itself if needed; this only checks the
    // kernel has it.
    let fs = std::fs::read_to_string("/proc/filesystems").expect("read /proc/filesystems");
    assert!(fs.contains("tracefs"), "the kernel has no tracefs");
    lock
}

/// Runs a command, panicking with its stderr when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/sys/dev/block/MAJ:MIN` of a `dev` file's content.
fn sysfs_of(dev_file: &Path) -> PathBuf {
    let dev = std::fs::read_to_string(dev_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", dev_file.display()));
    PathBuf::from(format!("/sys/dev/block/{}", dev.trim()))
}

/// A loop device over a sparse file in /var/tmp; detached on drop.
struct LoopDev {
    path: PathBuf,
    name: String,
    size_bytes: u64,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    /// `mbr`: a partition table to put in the first sector before
    /// attaching (the device is then scanned for partitions).
    fn create(size_bytes: u64, mbr: Option<[u8; 512]>) -> LoopDev {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-tracking-")
            .tempdir_in("/var/tmp")
            .expect("temp dir in /var/tmp");
        let backing = dir.path().join("disk.img");
        let f = File::create(&backing).expect("create backing file");
        f.set_len(size_bytes).expect("size backing file");
        if let Some(mbr) = mbr {
            f.write_all_at(&mbr, 0).expect("write partition table");
        }
        f.sync_all().expect("fsync backing file");
        drop(f);
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if mbr.is_some() {
            cmd.arg("--partscan");
        }
        let out = run(cmd.arg(&backing));
        let name = out
            .trim()
            .strip_prefix("/dev/")
            .unwrap_or_default()
            .to_owned();
        assert!(
            name.starts_with("loop") && !name.contains(['/', ' ']),
            "losetup printed {out:?}"
        );
        LoopDev {
            path: PathBuf::from(out.trim()),
            name,
            size_bytes,
            _dir: dir,
        }
    }

    fn sysfs(&self) -> PathBuf {
        sysfs_of(&Path::new("/sys/block").join(&self.name).join("dev"))
    }

    fn tracked(&self, index: usize) -> TrackedDisk {
        TrackedDisk::from_sysfs(index, &self.sysfs(), self.size_bytes).expect("inspect in sysfs")
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.path).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "losetup -d {}: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("cannot run losetup -d {}: {e}", self.path.display()),
        }
    }
}

/// A zram device made with `hot_add`; removed on drop.
struct Zram {
    id: u32,
    size_bytes: u64,
}

impl Zram {
    fn create(size_bytes: u64) -> Zram {
        let control = Path::new("/sys/class/zram-control/hot_add");
        if !control.exists() {
            let _ = Command::new("modprobe").arg("zram").status();
        }
        let id = std::fs::read_to_string(control).unwrap_or_else(|e| {
            panic!(
                "zram is needed for the bio-based test: read {}: {e}",
                control.display()
            )
        });
        let zram = Zram {
            id: id.trim().parse().expect("zram id"),
            size_bytes,
        };
        let disksize = zram.block_dir().join("disksize");
        std::fs::write(&disksize, size_bytes.to_string())
            .unwrap_or_else(|e| panic!("write {}: {e}", disksize.display()));
        zram
    }

    fn block_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/zram{}", self.id))
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/zram{}", self.id))
    }

    fn sysfs(&self) -> PathBuf {
        sysfs_of(&self.block_dir().join("dev"))
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = std::fs::write(self.block_dir().join("reset"), "1");
        if let Err(e) = std::fs::write("/sys/class/zram-control/hot_remove", self.id.to_string()) {
            eprintln!("cannot remove zram{}: {e}", self.id);
        }
    }
}

/// Removes the trace instance on drop, whatever the test left behind.
/// Declare it before the Tracker, so that the Tracker (and its open
/// pipes) drops first.
struct Instance {
    name: String,
}

impl Instance {
    fn new(tag: &str) -> Instance {
        let inst = Instance {
            name: format!("tidemark-test-{}-{tag}", std::process::id()),
        };
        // A leftover from a killed run of this test would be reused.
        let _ = std::fs::remove_dir(inst.dir());
        inst
    }

    fn dir(&self) -> PathBuf {
        Path::new(TRACEFS_ROOT).join("instances").join(&self.name)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let dir = self.dir();
        for _ in 0..50 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("cannot remove trace instance {}", dir.display());
    }
}

/// Writes `len` bytes of `byte` at `offset` with O_DIRECT.
fn direct_write(dev: &Path, offset: u64, len: usize, byte: u8) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()));
    let mut v = vec![byte; len + 4096];
    let skip = (4096 - v.as_ptr() as usize % 4096) % 4096;
    let buf = &mut v[skip..skip + len];
    f.write_all_at(buf, offset).unwrap_or_else(|e| {
        panic!(
            "O_DIRECT write of {len} at {offset} to {}: {e}",
            dev.display()
        )
    });
}

/// Reads `len` bytes at `offset` with O_DIRECT (reads must not be tracked).
fn direct_read(dev: &Path, offset: u64, len: usize) {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()));
    let mut v = vec![0u8; len + 4096];
    let skip = (4096 - v.as_ptr() as usize % 4096) % 4096;
    f.read_exact_at(&mut v[skip..skip + len], offset)
        .unwrap_or_else(|e| panic!("O_DIRECT read at {offset}: {e}"));
}

/// Buffered writes of 4 KiB pieces at `offset`, then fsync.
fn buffered_write(dev: &Path, offset: u64, pieces: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(dev)
        .expect("open for writing");
    for i in 0..pieces {
        f.write_all_at(&[0x5a; 4096], offset + i * 4096)
            .expect("buffered write");
    }
    f.sync_all().expect("fsync");
}

fn blkdiscard(dev: &Path, offset: u64, len: u64, zero: bool) {
    let mut cmd = Command::new("blkdiscard");
    if zero {
        cmd.arg("-z");
    }
    run(cmd
        .args(["-o", &offset.to_string(), "-l", &len.to_string()])
        .arg(dev));
}

fn counters(sysfs: &Path) -> u64 {
    let (w, d) = disk_counters(sysfs).expect("read stat");
    w + d
}

/// The union of ranges, sorted and merged.
fn union(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v = ranges.to_vec();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Drains until nothing new arrives for a moment (completions of the
/// last request may still be on their way to the ring).
fn drain_all(t: &mut Tracker) -> tidemark_agent::tracking::Drained {
    let mut all = t.drain().expect("drain");
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let more = t.drain().expect("drain");
        all.events += more.events;
        for (a, b) in all.ranges.iter_mut().zip(more.ranges) {
            a.extend(b);
        }
        for (a, b) in all.sectors_seen.iter_mut().zip(more.sectors_seen) {
            *a += b;
        }
        if let Some(l) = more.lost {
            all.lost = Some(format!("{}; {l}", all.lost.unwrap_or_default()));
        }
    }
    all
}

fn ctl_write(dir: &Path, file: &str, value: &str) {
    std::fs::write(dir.join(file), value)
        .unwrap_or_else(|e| panic!("write {value:?} to {file}: {e}"));
}

#[test]
fn every_kind_of_write_is_tracked_exactly() {
    let _lock = prerequisites();
    let dev = LoopDev::create(64 * MIB, None);
    let disk = dev.tracked(0);
    assert_eq!((disk.partition, disk.bio_based), (None, false), "{disk:?}");
    assert_eq!(disk.major, 7);
    let inst = Instance::new("kinds");
    let (mut t, reused) = Tracker::open(&inst.name, vec![disk], 1024).expect("open tracker");
    assert!(!reused, "a new instance has no history");
    assert_eq!(t.instance_dir(), inst.dir());
    let first = t.drain().expect("drain");
    assert!(first.lost.is_none(), "{:?}", first.lost);
    assert_eq!(first.ranges, vec![Vec::<Range<u64>>::new()]);

    let before = counters(&dev.sysfs());
    let p = &dev.path;
    let mut expected: Vec<Range<u64>> = Vec::new();
    // O_DIRECT writes, each one request.
    direct_write(p, 40960, 4096, 1);
    expected.push(40960..45056);
    direct_write(p, 5 * MIB, 64 * KIB as usize, 2);
    expected.push(5 * MIB..5 * MIB + 64 * KIB);
    direct_write(p, MIB + 8192, 4096, 3);
    expected.push(MIB + 8192..MIB + 12288);
    // Reads and flushes are not changes.
    direct_read(p, 0, MIB as usize);
    File::open(p).expect("open").sync_all().expect("flush");
    // Buffered writes reach the device at fsync.
    buffered_write(p, 8 * MIB, 3);
    expected.push(8 * MIB..8 * MIB + 12 * KIB);
    // Discard (D) and write-zeroes (N).
    blkdiscard(p, 16 * MIB, 64 * KIB, false);
    expected.push(16 * MIB..16 * MIB + 64 * KIB);
    blkdiscard(p, 20 * MIB, 128 * KIB, true);
    expected.push(20 * MIB..20 * MIB + 128 * KIB);
    // The last block of the device.
    direct_write(p, 64 * MIB - 4096, 4096, 4);
    expected.push(64 * MIB - 4096..64 * MIB);

    let d = drain_all(&mut t);
    let after = counters(&dev.sysfs());
    assert!(d.lost.is_none(), "{:?}", d.lost);
    assert_eq!(d.ranges.len(), 1);
    // In event order: every operation completed before the next started.
    assert_eq!(union(&d.ranges[0]), union(&expected), "{:?}", d.ranges[0]);
    let mut order: Vec<Range<u64>> = Vec::new();
    for r in &d.ranges[0] {
        match order.last_mut() {
            Some(l) if l.end == r.start => l.end = r.end,
            _ => order.push(r.clone()),
        }
    }
    assert_eq!(order, expected, "ranges in event order");
    assert_eq!(
        d.sectors_seen,
        vec![after - before],
        "traced sectors vs the block layer's counters"
    );
    assert!(d.events >= expected.len() as u64);

    let mut map = DirtyMap::new(64 * MIB, 4096);
    for r in &d.ranges[0] {
        map.mark(r.clone());
    }
    let want: u64 = expected.iter().map(|r| r.end - r.start).sum();
    assert_eq!(map.dirty_bytes(), want);
    assert_eq!(map.take(u64::MAX, u64::MAX), union(&expected));

    assert_eq!(t.verify(), Ok(()));
    t.remove().expect("remove instance");
    assert!(!inst.dir().exists(), "remove() deletes the instance");
}

/// An MBR with one Linux partition of `len` sectors at `start`.
fn mbr(start: u32, len: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    let e = &mut b[446..462];
    e[4] = 0x83; // Linux
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&len.to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

#[test]
fn partition_writes_are_clipped_and_shifted() {
    let _lock = prerequisites();
    let (p_start, p_len) = (2048u64, 65536u64); // 1 MiB .. 33 MiB
    let dev = LoopDev::create(64 * MIB, Some(mbr(p_start as u32, p_len as u32)));
    let part_name = format!("{}p1", dev.name);
    let part_sys = Path::new("/sys/block").join(&dev.name).join(&part_name);
    if !part_sys.exists() {
        // losetup -P did not scan (seen on this kernel); ask explicitly.
        run(Command::new("partx").arg("-a").arg(&dev.path));
    }
    assert!(part_sys.exists(), "{} did not appear", part_sys.display());
    let part_sysfs = sysfs_of(&part_sys.join("dev"));
    let mut part_node = PathBuf::from("/dev").join(&part_name);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !part_node.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _node_dir;
    if !part_node.exists() {
        // No devtmpfs node (no udev either): make one.
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let dev_no = std::fs::read_to_string(part_sys.join("dev")).expect("dev");
        let (ma, mi) = dev_no.trim().split_once(':').expect("MAJ:MIN");
        let node = dir.path().join(&part_name);
        run(Command::new("mknod").arg(&node).args(["b", ma, mi]));
        part_node = node;
        _node_dir = dir;
    }

    let whole = dev.tracked(0);
    let part = TrackedDisk::from_sysfs(1, &part_sysfs, p_len * 512).expect("partition in sysfs");
    assert_eq!(part.partition, Some((p_start, p_len)));
    assert_eq!(
        (part.major, part.minor),
        (whole.major, whole.minor),
        "events carry the whole disk"
    );
    assert!(!part.bio_based);
    assert_eq!(
        disk_counters(&part_sysfs).expect("stat"),
        disk_counters(&dev.sysfs()).expect("stat")
    );
    // A partition has no request queue of its own: its reads are cut to
    // its disk's limits, not left whole for the block layer to split.
    let small = BufPool::new(1, MIB as usize);
    let huge = BufPool::with_pages(1, MIB as usize, Pages::Huge);
    let request_bytes = |p: &Path, pool: &BufPool| {
        DeviceReader::open(p, 1, false)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
            .request_bytes(pool)
    };
    let whole_request = request_bytes(&dev.path, &small);
    assert!(
        whole_request < MIB as usize,
        "a loop device's queue (max_segments 128) takes {whole_request} bytes whole"
    );
    assert_eq!(
        request_bytes(&part_node, &small),
        whole_request,
        "partition's reads"
    );
    // Into huge pages its 128 segments are 64 KiB each: a buffer whole.
    let expect = if huge.contiguous_bytes() > 4096 {
        MIB as usize
    } else {
        whole_request
    };
    assert_eq!(
        request_bytes(&dev.path, &huge),
        expect,
        "reads into huge pages"
    );
    assert_eq!(
        request_bytes(&part_node, &huge),
        expect,
        "partition's, into huge pages"
    );

    let inst = Instance::new("part");
    let (mut t, _) = Tracker::open(&inst.name, vec![whole, part], 1024).expect("open tracker");
    let _ = t.drain().expect("drain");
    let before = counters(&dev.sysfs());
    let p_off = p_start * 512;
    let p_end = (p_start + p_len) * 512;
    // Through the partition node.
    direct_write(&part_node, 4096, 4096, 1);
    // Through the whole disk, before the partition.
    direct_write(&dev.path, 512 * KIB, 4096, 2);
    // Straddling the partition's end.
    direct_write(&dev.path, p_end - 4096, 8192, 3);
    // A discard through the partition.
    blkdiscard(&part_node, MIB, 64 * KIB, false);
    // After the partition.
    direct_write(&dev.path, 40 * MIB, 4096, 4);

    let d = drain_all(&mut t);
    let after = counters(&dev.sysfs());
    assert!(d.lost.is_none(), "{:?}", d.lost);
    assert_eq!(
        union(&d.ranges[0]),
        union(&[
            p_off + 4096..p_off + 8192,
            512 * KIB..516 * KIB,
            p_end - 4096..p_end + 4096,
            p_off + MIB..p_off + MIB + 64 * KIB,
            40 * MIB..40 * MIB + 4096,
        ]),
        "whole disk: absolute offsets"
    );
    assert_eq!(
        d.ranges[1],
        vec![
            4096..8192,
            p_len * 512 - 4096..p_len * 512,
            MIB..MIB + 64 * KIB
        ],
        "partition: relative offsets, clipped"
    );
    assert_eq!(d.sectors_seen, vec![after - before, after - before]);
}

#[test]
fn a_burst_into_a_tiny_buffer_is_reported_lost() {
    let _lock = prerequisites();
    let dev = LoopDev::create(64 * MIB, None);
    let inst = Instance::new("loss");
    // 8 KiB per CPU: two pages, about 140 events.
    let (mut t, _) = Tracker::open(&inst.name, vec![dev.tracked(0)], 8).expect("open tracker");
    assert!(t.drain().expect("drain").lost.is_none());
    burst(&dev, 4000);
    let d = t.drain().expect("drain");
    let lost = d
        .lost
        .expect("a burst of 4000 events into 8 KiB per CPU is reported lost");
    eprintln!("reported: {lost}");
    assert!(d.events < 4000, "{} events survived", d.events);
    // The next drain starts from the new counters: no loss, no stale flag.
    direct_write(&dev.path, 0, 4096, 1);
    let d = drain_all(&mut t);
    assert!(d.lost.is_none(), "{:?}", d.lost);
    assert_eq!(d.ranges, vec![vec![0..4096]]);
}

/// `n` 4 KiB O_DIRECT writes at distinct offsets, on one fd.
fn burst(dev: &LoopDev, n: u64) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(&dev.path)
        .expect("open O_DIRECT");
    let mut v = vec![7u8; 8192];
    let skip = (4096 - v.as_ptr() as usize % 4096) % 4096;
    let buf = &mut v[skip..skip + 4096];
    for i in 0..n {
        f.write_all_at(buf, (i * 4096) % dev.size_bytes)
            .expect("write");
    }
}

#[test]
fn a_restart_keeps_the_writes_made_while_down() {
    let _lock = prerequisites();
    let dev = LoopDev::create(64 * MIB, None);
    let inst = Instance::new("restart");
    let (mut t, reused) = Tracker::open(&inst.name, vec![dev.tracked(0)], 1024).expect("open");
    assert!(!reused);
    direct_write(&dev.path, 4096, 4096, 1);
    assert_eq!(drain_all(&mut t).ranges, vec![vec![4096..8192]]);
    // The agent stops without removing the instance...
    drop(t);
    let before = counters(&dev.sysfs());
    direct_write(&dev.path, 10 * MIB, 4096, 2);
    blkdiscard(&dev.path, 30 * MIB, 64 * KIB, false);
    direct_write(&dev.path, 2 * MIB, 8192, 3);
    let after = counters(&dev.sysfs());
    // ...and the next one finds what happened meanwhile.
    let (mut t, reused) = Tracker::open(&inst.name, vec![dev.tracked(0)], 1024).expect("reopen");
    assert!(reused, "the instance was left as configured");
    let d = drain_all(&mut t);
    assert!(d.lost.is_none(), "{:?}", d.lost);
    assert_eq!(
        d.ranges,
        vec![vec![
            10 * MIB..10 * MIB + 4096,
            30 * MIB..30 * MIB + 64 * KIB,
            2 * MIB..2 * MIB + 8192
        ]]
    );
    assert_eq!(d.sectors_seen, vec![after - before]);
    drop(t);

    // Another disk set means another filter: no continuity.
    let mut other = dev.tracked(0);
    other.minor += 1000;
    let (t, reused) = Tracker::open(&inst.name, vec![dev.tracked(0), other], 1024).expect("reopen");
    assert!(!reused, "a changed filter breaks continuity");
    assert_eq!(t.verify(), Ok(()));
}

#[test]
fn an_overflow_while_down_is_reported_after_a_restart() {
    let _lock = prerequisites();
    let dev = LoopDev::create(64 * MIB, None);
    let inst = Instance::new("downloss");
    let (mut t, _) = Tracker::open(&inst.name, vec![dev.tracked(0)], 8).expect("open");
    assert!(t.drain().expect("drain").lost.is_none());
    drop(t);
    burst(&dev, 3000);
    // The reopened tracker's counters already include the overrun: only
    // the page flag can tell.
    let (mut t, reused) = Tracker::open(&inst.name, vec![dev.tracked(0)], 8).expect("reopen");
    assert!(reused);
    let d = t.drain().expect("drain");
    let lost = d
        .lost
        .expect("an overflow while the agent was down is reported");
    assert!(lost.contains("missed"), "{lost}");
    eprintln!("reported: {lost}");
}

#[test]
fn verify_notices_changes_behind_its_back() {
    let _lock = prerequisites();
    let dev = LoopDev::create(16 * MIB, None);
    let inst = Instance::new("verify");
    let (t, _) = Tracker::open(&inst.name, vec![dev.tracked(0)], 64).expect("open");
    let dir = t.instance_dir().to_path_buf();
    assert_eq!(t.verify(), Ok(()));

    ctl_write(&dir, "tracing_on", "0");
    let err = t.verify().expect_err("tracing_on 0 is noticed");
    assert!(err.contains("tracing_on"), "{err}");
    ctl_write(&dir, "tracing_on", "1");
    assert_eq!(t.verify(), Ok(()));

    let ev = "events/block/block_rq_complete";
    ctl_write(&dir, &format!("{ev}/enable"), "0");
    let err = t.verify().expect_err("a disabled event is noticed");
    assert!(err.contains("enable"), "{err}");
    ctl_write(&dir, &format!("{ev}/enable"), "1");

    ctl_write(&dir, &format!("{ev}/filter"), "dev == 1");
    let err = t.verify().expect_err("a changed filter is noticed");
    assert!(err.contains("filter"), "{err}");

    ctl_write(&dir, "trace_clock", "local");
    ctl_write(&dir, "options/overwrite", "0");
    let err = t.verify().expect_err("clock and overwrite are noticed");
    assert!(
        err.contains("trace_clock") && err.contains("overwrite"),
        "{err}"
    );

    // Opening again repairs everything, and says continuity is gone.
    ctl_write(&dir, "tracing_on", "0");
    let (t2, reused) = Tracker::open(&inst.name, vec![dev.tracked(0)], 64).expect("reopen");
    assert!(!reused, "a reconfigured instance has no continuity");
    assert_eq!(t2.verify(), Ok(()));
    assert_eq!(t.verify(), Ok(()));
    drop(t);
    drop(t2);
    let (_t3, reused) = Tracker::open(&inst.name, vec![dev.tracked(0)], 64).expect("reopen");
    assert!(reused);
}

#[test]
fn bio_based_disks_use_block_bio_complete() {
    let _lock = prerequisites();
    let zram = Zram::create(32 * MIB);
    let dev = LoopDev::create(16 * MIB, None);
    let z = TrackedDisk::from_sysfs(1, &zram.sysfs(), zram.size_bytes).expect("zram in sysfs");
    assert!(z.bio_based, "zram has no mq directory: {z:?}");
    let inst = Instance::new("bio");
    let (mut t, _) = Tracker::open(&inst.name, vec![dev.tracked(0), z], 1024).expect("open");
    let _ = t.drain().expect("drain");
    let before = counters(&zram.sysfs());
    let zp = zram.path();
    direct_write(&zp, 40960, 4096, 1);
    direct_write(&dev.path, 8192, 4096, 1);
    direct_write(&zp, 4 * MIB, 64 * KIB as usize, 2);
    blkdiscard(&zp, 8 * MIB, MIB, false);
    let d = drain_all(&mut t);
    let after = counters(&zram.sysfs());
    assert!(d.lost.is_none(), "{:?}", d.lost);
    assert_eq!(d.ranges[0], vec![8192..12288], "the loop device, beside it");
    assert_eq!(
        union(&d.ranges[1]),
        vec![40960..45056, 4 * MIB..4 * MIB + 64 * KIB, 8 * MIB..9 * MIB]
    );
    // zram does no I/O accounting for discards (zram_bio_discard), so its
    // stat misses the 1 MiB: the audit can only be one-sided (seen >=
    // counted), which is how the run loop uses it.
    assert_eq!(d.sectors_seen[1], after - before + MIB / 512);
}
