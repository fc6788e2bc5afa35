//! A file-backed loop device that is detached when the guard drops, also when
//! the test that made it panics.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};

use crate::prereq::{require_cmd, require_root};

/// A loop device attached to a sparse backing file; `losetup -d` on drop.
///
/// Tests that create loop devices should hold [`crate::kernel_lock`].
#[derive(Debug)]
pub struct LoopDev {
    device: PathBuf,
    backing: PathBuf,
    size_bytes: u64,
}

impl LoopDev {
    /// Creates (or truncates) `backing` as a sparse file of `size_bytes` and
    /// attaches it with `losetup --find --show --direct-io=off`.
    ///
    /// Errors, with a message naming the cause, when not root or when
    /// `losetup` is missing: the calling test fails rather than skips.
    pub fn create(backing: &Path, size_bytes: u64) -> anyhow::Result<LoopDev> {
        make_backing(backing, size_bytes)?;
        LoopDev::attach(backing)
    }

    /// Like [`LoopDev::create`], with a partition table written by
    /// `sfdisk` from `layout` (its input script) and the partitions scanned
    /// (`losetup -P`): they are `{device}p1`, `{device}p2`, ...
    pub fn create_partitioned(
        backing: &Path,
        size_bytes: u64,
        layout: &str,
    ) -> anyhow::Result<LoopDev> {
        require_cmd("sfdisk").context("LoopDev::create_partitioned")?;
        make_backing(backing, size_bytes)?;
        let mut sfdisk = Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel"])
            .arg(backing)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("run sfdisk")?;
        std::io::Write::write_all(
            &mut sfdisk.stdin.take().context("sfdisk's stdin")?,
            layout.as_bytes(),
        )?;
        let out = sfdisk.wait_with_output()?;
        ensure!(
            out.status.success(),
            "sfdisk {} failed ({}): {}",
            backing.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        LoopDev::attach_partitioned(backing)
    }

    /// Attaches `backing` with its partitions scanned (`losetup -P`), and
    /// waits (up to 5 s) for the first partition's node. A kernel built
    /// without partition table parsers (this machine's: neither
    /// CONFIG_MSDOS_PARTITION nor CONFIG_EFI_PARTITION) finds none: then
    /// `partx -a` reads the table and adds them.
    pub fn attach_partitioned(backing: &Path) -> anyhow::Result<LoopDev> {
        require_cmd("partx").context("LoopDev::attach_partitioned")?;
        let dev = LoopDev::attach_with(backing, &["--partscan"])?;
        let first = dev.partition(1);
        if !first.exists() {
            crate::site::run_ok(Command::new("partx").arg("-a").arg(&dev.device))?;
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !first.exists() {
            ensure!(
                std::time::Instant::now() < until,
                "{} did not appear after losetup -P {}",
                first.display(),
                backing.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(dev)
    }

    /// The node of partition `n` (from 1), `/dev/loopNpn`.
    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.device.display()))
    }

    /// Attaches an existing `backing` file with
    /// `losetup --find --show --direct-io=off`.
    pub fn attach(backing: &Path) -> anyhow::Result<LoopDev> {
        LoopDev::attach_with(backing, &[])
    }

    fn attach_with(backing: &Path, extra: &[&str]) -> anyhow::Result<LoopDev> {
        require_root().context("LoopDev::attach")?;
        require_cmd("losetup").context("LoopDev::attach")?;
        let size_bytes = std::fs::metadata(backing)
            .with_context(|| format!("backing file {}", backing.display()))?
            .len();
        let output = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off"])
            .args(extra)
            .arg(backing)
            .output()
            .context("run losetup --find --show")?;
        if !output.status.success() {
            bail!(
                "losetup --find --show --direct-io=off {} failed ({}): {}",
                backing.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let device = stdout.trim();
        if !device.starts_with("/dev/loop") || device.contains(char::is_whitespace) {
            bail!("losetup printed {stdout:?}, expected one /dev/loopN path");
        }
        let dev = LoopDev {
            device: PathBuf::from(device),
            backing: backing.to_path_buf(),
            size_bytes,
        };

        // From here on the guard detaches the device if a check fails.
        let seen = File::open(&dev.device)
            .and_then(|mut f| f.seek(SeekFrom::End(0)))
            .with_context(|| format!("open {}", dev.device.display()))?;
        ensure!(
            seen == size_bytes,
            "{} has {seen} bytes, expected {size_bytes}",
            dev.device.display()
        );
        Ok(dev)
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.device
    }

    /// The backing file.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The device size asked for at creation or by [`LoopDev::resize`].
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The device's directory in sysfs, `/sys/block/loopN`.
    pub fn sysfs(&self) -> anyhow::Result<PathBuf> {
        let name = self.device.file_name().context("device name")?;
        Ok(Path::new("/sys/block").join(name))
    }

    /// Resizes the backing file and tells the loop driver (`losetup -c`),
    /// as a disk grown or shrunk under a running system.
    pub fn resize(&mut self, size_bytes: u64) -> anyhow::Result<()> {
        OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .with_context(|| format!("open {}", self.backing.display()))?
            .set_len(size_bytes)?;
        crate::site::run_ok(Command::new("losetup").arg("-c").arg(&self.device))?;
        let seen = std::fs::read_to_string(self.sysfs()?.join("size"))?;
        ensure!(
            seen.trim().parse::<u64>()? * 512 == size_bytes,
            "{} reports {} sectors after losetup -c, expected {size_bytes} bytes",
            self.device.display(),
            seen.trim()
        );
        self.size_bytes = size_bytes;
        Ok(())
    }

    /// Writes `data` at `offset` through the block device, then fsyncs it.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let file = self.open_write()?;
        file.write_all_at(data, offset).with_context(|| {
            format!(
                "write {} bytes at {offset} to {}",
                data.len(),
                self.device.display()
            )
        })?;
        file.sync_all()
            .with_context(|| format!("fsync {}", self.device.display()))
    }

    /// Reads `len` bytes at `offset` from the block device.
    pub fn read_at(&self, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        let file =
            File::open(&self.device).with_context(|| format!("open {}", self.device.display()))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).with_context(|| {
            format!(
                "read {len} bytes at {offset} from {}",
                self.device.display()
            )
        })?;
        Ok(buf)
    }

    /// Reads the whole device.
    pub fn read_all(&self) -> anyhow::Result<Vec<u8>> {
        let mut file =
            File::open(&self.device).with_context(|| format!("open {}", self.device.display()))?;
        let capacity = usize::try_from(self.size_bytes).context("device size fits usize")?;
        let mut buf = Vec::with_capacity(capacity);
        file.read_to_end(&mut buf)
            .with_context(|| format!("read {}", self.device.display()))?;
        Ok(buf)
    }

    /// Makes an ext4 file system on the device: `mkfs.ext4 -q -F`, with the
    /// inode tables and journal initialised now rather than by the kernel's
    /// lazy-init thread after the first mount (which would keep writing to
    /// the device in the background and disturb change-tracking tests).
    pub fn mkfs_ext4(&self) -> anyhow::Result<()> {
        require_cmd("mkfs.ext4").context("LoopDev::mkfs_ext4")?;
        let output = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&self.device)
            .output()
            .context("run mkfs.ext4")?;
        if !output.status.success() {
            bail!(
                "mkfs.ext4 {} failed ({}): {}{}",
                self.device.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Makes an XFS file system on the device (`mkfs.xfs -q -f`); XFS
    /// shares blocks between files (reflink), so `cp --reflink=always` of a
    /// file on it is an instant, atomic copy.
    pub fn mkfs_xfs(&self) -> anyhow::Result<()> {
        require_cmd("mkfs.xfs").context("LoopDev::mkfs_xfs")?;
        let output = Command::new("mkfs.xfs")
            .args(["-q", "-f"])
            .arg(&self.device)
            .output()
            .context("run mkfs.xfs")?;
        ensure!(
            output.status.success(),
            "mkfs.xfs {} failed ({}): {}",
            self.device.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    pub(crate) fn open_write(&self) -> anyhow::Result<File> {
        OpenOptions::new()
            .write(true)
            .open(&self.device)
            .with_context(|| format!("open {} for writing", self.device.display()))
    }
}

/// Creates (or truncates) `backing` as a sparse file of `size_bytes`.
fn make_backing(backing: &Path, size_bytes: u64) -> anyhow::Result<()> {
    ensure!(
        size_bytes > 0 && size_bytes.is_multiple_of(512),
        "loop device size {size_bytes} is not a positive multiple of 512 bytes"
    );
    require_root().context("LoopDev::create")?;
    require_cmd("losetup").context("LoopDev::create")?;

    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(backing)
        .with_context(|| format!("create backing file {}", backing.display()))?;
    file.set_len(size_bytes)
        .with_context(|| format!("size backing file {}", backing.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync backing file {}", backing.display()))?;
    drop(file);
    Ok(())
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.device).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "tidemark-tests: losetup -d {} failed ({}): {}",
                self.device.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => eprintln!(
                "tidemark-tests: cannot run losetup -d {}: {err}",
                self.device.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! These need root and loop devices; they fail (not skip) without them.
    use super::*;
    use crate::fill::{fill_mixed, plan_fill, region_bytes, FillKind};
    use crate::lock::kernel_lock;
    use std::time::{Duration, Instant};

    const MIB: u64 = 1024 * 1024;

    /// Whether `losetup -a` still lists `dev` backed by `backing`.
    fn listed(dev: &Path, backing: &Path) -> bool {
        let output = Command::new("losetup")
            .arg("-a")
            .output()
            .expect("run losetup -a");
        let text = String::from_utf8_lossy(&output.stdout);
        let dev = format!("{}:", dev.display());
        let backing = backing.display().to_string();
        text.lines()
            .any(|l| l.starts_with(&dev) && l.contains(&backing))
    }

    fn wait_unlisted(dev: &Path, backing: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while listed(dev, backing) {
            assert!(
                Instant::now() < deadline,
                "{} still attached",
                dev.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn fill_mixed_round_trips_and_drop_detaches() {
        let _lock = kernel_lock();
        let dir = tempfile::tempdir().expect("temp dir");
        let backing = dir.path().join("disk.img");
        let size = 64 * MIB;
        let seed = 0x5eed;
        let dev = LoopDev::create(&backing, size).expect("create loop device");
        assert!(dev.path().starts_with("/dev"), "{}", dev.path().display());
        assert_eq!(dev.backing(), backing);
        assert!(listed(dev.path(), &backing));

        // Garbage where zero regions will be: fill_mixed must overwrite it.
        let plan = plan_fill(size, seed).expect("plan");
        for r in plan.iter().filter(|r| r.kind == FillKind::Zero).take(6) {
            dev.write_at(r.offset_bytes, &vec![0xa5; 4096])
                .expect("write garbage");
        }
        assert_eq!(
            dev.read_at(plan[1].offset_bytes, 4096).expect("read"),
            vec![0xa5; 4096]
        );

        let report = fill_mixed(&dev, seed).expect("fill");
        assert_eq!(report.regions, plan);
        assert_eq!(
            report.random_bytes + report.compressible_bytes + report.zero_bytes,
            size
        );
        assert!(report.zero_bytes * 100 >= size * 40);

        let data = dev.read_all().expect("read device");
        assert_eq!(data.len() as u64, size);
        let mut expected = vec![0u8; 4 * MIB as usize];
        for r in &report.regions {
            let got = &data[r.offset_bytes as usize..(r.offset_bytes + r.len_bytes) as usize];
            match r.kind {
                FillKind::Zero => assert!(got.iter().all(|&b| b == 0), "zero region {r:?}"),
                kind => {
                    for (i, piece) in got.chunks(expected.len()).enumerate() {
                        let offset = r.offset_bytes + (i * expected.len()) as u64;
                        let want = &mut expected[..piece.len()];
                        region_bytes(kind, seed, offset, want);
                        assert!(piece == &want[..], "content of {r:?} at {offset}");
                    }
                }
            }
        }

        // The data reached the backing file (fsync through the device).
        let on_file = std::fs::read(&backing).expect("read backing file");
        assert!(on_file == data, "backing file matches the device");

        let path = dev.path().to_path_buf();
        drop(dev);
        wait_unlisted(&path, &backing);
    }

    #[test]
    fn mkfs_ext4_writes_a_superblock_and_guard_detaches_on_panic() {
        let _lock = kernel_lock();
        let dir = tempfile::tempdir().expect("temp dir");
        let backing = dir.path().join("fs.img");
        let dev = LoopDev::create(&backing, 64 * MIB).expect("create loop device");
        dev.mkfs_ext4().expect("mkfs.ext4");
        // ext4 superblock at byte 1024, s_magic (0xEF53, little endian) at +56.
        assert_eq!(dev.read_at(1024 + 56, 2).expect("read magic"), [0x53, 0xef]);

        let path = dev.path().to_path_buf();
        let panicked = std::thread::spawn(move || {
            let _dev = dev;
            panic!("test failure while a loop device is attached");
        })
        .join();
        assert!(panicked.is_err());
        wait_unlisted(&path, &backing);
    }

    #[test]
    fn create_rejects_odd_sizes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = LoopDev::create(&dir.path().join("odd.img"), 1000).expect_err("odd size");
        assert!(format!("{err:#}").contains("512"), "{err:#}");
    }
}
