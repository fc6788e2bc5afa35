//! What writes into the holes of an image whose bytes are the disk's (raw,
//! flat VMDK, fixed VHD) take from the filesystem under it, on a real ext4.

use std::path::Path;

use anyhow::{ensure, Context};
use tidemark_receiver::image::raw::RawImage;
use tidemark_receiver::image::Image;
use tidemark_tests::{kernel_lock, LoopDev, Volume};

/// Free blocks of every group of the ext4 on `dev`, as its allocator
/// counts them: blocks an inode holds as preallocation count as used
/// here, unlike in `statfs`.
fn allocator_free_blocks(dev: &Path) -> anyhow::Result<u64> {
    let name = dev.file_name().context("loop device name")?;
    let path = Path::new("/proc/fs/ext4").join(name).join("mb_groups");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut free = 0;
    let mut groups = 0;
    // "#0    : 24281 1     8487  [ ... ]": group, free blocks, fragments.
    for line in text.lines().filter(|l| !l.starts_with("#group")) {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let (_, counts) = rest.split_once(':').context("mb_groups line")?;
        let blocks = counts.split_whitespace().next().context("free blocks")?;
        free += blocks.parse::<u64>().with_context(|| format!("{line:?}"))?;
        groups += 1;
    }
    ensure!(groups > 0, "{} lists no groups", path.display());
    Ok(free)
}

/// ext4 gives a delayed allocation into a hole of a large file up to
/// 8 MiB and keeps what the write does not use as the inode's
/// preallocation while the file is open: for random writes over a sparse
/// image, 8 MiB per write, and an allocator that then hunts for free space
/// (docs/BENCHMARKS.md, issue 4). The receiver keeps its images open for
/// as long as it runs, so what they hold must be what they store.
#[test]
fn writes_into_holes_of_a_raw_image_hold_only_their_own_blocks() -> anyhow::Result<()> {
    let _lock = kernel_lock();
    let dir = tempfile::tempdir()?;
    let dev = LoopDev::create(&dir.path().join("ext4.img"), 2 << 30)?;
    dev.mkfs_ext4()?;
    let dev_path = dev.path().to_path_buf();
    let volume = Volume::mount(dev, &dir.path().join("mnt"))?;

    const WRITES: u64 = 48;
    const SMALL: usize = 4096;
    const LARGE: usize = 256 << 10;
    let mut image = RawImage::create(&volume.dir().join("disk.raw"), 256 << 30)?;
    let before = allocator_free_blocks(&dev_path)?;
    // Far apart, as random writes over a large disk are: each into a hole
    // of its own. The large ones, which go past the page cache, land
    // 64 MiB from the small ones, outside the 8 MiB that a small write's
    // preallocation would cover, so that each path shows on its own.
    let at = |i: u64| i * (5 << 30) + 12345 * 4096;
    const LARGE_AFTER: u64 = 64 << 20;
    for i in 0..WRITES {
        image.write_at(at(i), &[i as u8 + 1; SMALL])?;
        image.write_direct(at(i) + LARGE_AFTER, &vec![i as u8 + 101; LARGE])?;
    }
    image.flush()?;
    let held = before.saturating_sub(allocator_free_blocks(&dev_path)?);

    let written = WRITES * ((SMALL + LARGE) / 4096) as u64;
    // A few blocks more for the extent tree of a file of 96 extents.
    ensure!(
        held <= written + 16,
        "{WRITES} writes of {SMALL} and {LARGE} bytes into holes hold {held} blocks of 4 KiB \
         while the image is open, not the {written} they wrote"
    );
    for i in 0..WRITES {
        let mut small = vec![0u8; SMALL];
        let mut large = vec![0u8; LARGE];
        image.read_at(at(i), &mut small)?;
        image.read_at(at(i) + LARGE_AFTER, &mut large)?;
        ensure!(
            small.iter().all(|&b| b == i as u8 + 1) && large.iter().all(|&b| b == i as u8 + 101),
            "write {i} did not read back"
        );
    }
    let stored = std::fs::metadata(volume.dir().join("disk.raw"))?;
    use std::os::unix::fs::MetadataExt;
    ensure!(
        stored.blocks() * 512 <= written * 4096 + (16 << 12),
        "the image stores {} bytes for {} written",
        stored.blocks() * 512,
        written * 4096
    );
    drop(image);
    Ok(())
}
