//! What image formats write through: a file, or in tests a layer that
//! injects faults. Formats get their crash safety from the order of their
//! writes and syncs; [`CrashStorage`] checks that order by dropping every
//! write after a chosen sync, as a power cut would.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use nix::fcntl::{fallocate, FallocateFlags};

/// A byte-addressed, growable backing store.
// `len` mirrors File::metadata().len(); an `is_empty` would only be noise.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// [`Storage::write_at`] of data that will not be read back soon: past
    /// the page cache where the store can.
    fn write_direct(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(data, offset)
    }
    /// Everything written before is durable when this returns Ok.
    fn sync(&mut self) -> io::Result<()>;
    /// The plain file this store is, if it is one: what formats whose
    /// bytes are the file's offer other threads (see [`crate::image::Image::reader`]).
    fn file_storage(&self) -> Option<&FileStorage> {
        None
    }
    /// Deallocates a range, which then reads as zeros. Stores that cannot
    /// write zeros instead.
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// A regular file.
pub struct FileStorage {
    file: File,
    /// The same file opened with O_DIRECT, once a read could use it; None
    /// where the filesystem refuses O_DIRECT.
    direct: std::cell::OnceCell<Option<File>>,
    /// Likewise for writing, once a write could use it; None also where
    /// the file is not writable or a direct write was refused.
    direct_write: Option<Option<File>>,
    /// Aligned copy of data to be written directly whose buffer is not
    /// aligned itself; kept from write to write.
    bounce: Vec<u8>,
    /// False once the filesystem refused `fallocate`: see
    /// [`FileStorage::allocate_exact`].
    can_allocate: bool,
    /// False once the kernel refused a read that must not wait
    /// (`RWF_NOWAIT`): see [`FileStorage::read_cached`].
    can_read_cached: std::cell::Cell<bool>,
}

/// Address, length and offset alignment for reads that bypass the page
/// cache: the largest logical block size in use (4 KiB sectors).
pub const DIRECT_ALIGN: usize = 4096;

/// Where in `buf` a `len`-byte window starts on a [`DIRECT_ALIGN`]
/// boundary, so that reads into it can bypass the page cache. `buf` keeps
/// its allocation from call to call; the range goes with it when it is
/// handed on.
pub fn aligned_range(buf: &mut Vec<u8>, len: usize) -> std::ops::Range<usize> {
    buf.resize(len + DIRECT_ALIGN, 0);
    let skew = buf.as_ptr().align_offset(DIRECT_ALIGN);
    skew..skew + len
}

impl FileStorage {
    pub fn new(file: File) -> Self {
        FileStorage {
            file,
            direct: std::cell::OnceCell::new(),
            direct_write: None,
            bounce: Vec::new(),
            can_allocate: true,
            can_read_cached: std::cell::Cell::new(true),
        }
    }

    /// Gives the holes in `offset..offset + len` exactly the blocks the
    /// range needs, before data is written there. Without it, ext4 sizes
    /// each delayed allocation for a file of the image's size: a write of
    /// a few blocks into a hole asks for up to 8 MiB and keeps the rest as
    /// the inode's preallocation. With random writes spread over a large
    /// sparse image (new data on a replica of a mostly empty disk), every
    /// write wants its own 8 MiB, free space fragments, and the allocator
    /// falls back to scanning the groups one by one inside the fdatasync
    /// that makes a batch durable: nearly three times the receiver's CPU
    /// per byte, measured (docs/BENCHMARKS.md, issue 4). It also holds
    /// 8 MiB of free space per write for as long as the image is open.
    /// `fallocate` of the range itself asks for no more than it covers,
    /// as unwritten blocks that read as zeros until the data is written
    /// back. Ranges already allocated cost a lookup, at most a few µs per
    /// write on ext4 and XFS (`scripts/bench-alloc.sh`); asking first
    /// whether the range is a hole costs more (SEEK_HOLE walks to the next
    /// hole, the end of a full image). Filesystems without `fallocate`
    /// are left to allocate as they write.
    pub fn allocate_exact(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_allocate || len == 0 {
            return Ok(());
        }
        let (start, count) = file_range("allocate", offset, len)?;
        match fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            start,
            count,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                self.can_allocate = false;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes what it can of `data` past the page cache, if it is large
    /// and aligned enough; returns how much (the caller writes the rest
    /// through the cache). A direct write first writes back and then drops
    /// the cached pages of its range, so an earlier buffered write of a few
    /// blocks there is neither lost nor read stale later.
    fn try_direct(&mut self, data: &[u8], offset: u64) -> usize {
        if !direct_sized(data, offset) {
            return 0;
        }
        let Some(f) = direct_writer(&self.file, &mut self.direct_write) else {
            return 0;
        };
        let (done, refused) = pwrite_direct(f, &mut self.bounce, data, offset);
        if refused {
            self.direct_write = Some(None);
        }
        done
    }

    fn direct(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| open_direct(&self.file, false))
            .as_ref()
    }

    /// Reads what it can of `buf` past the page cache, returning how much;
    /// 0 where that is not possible. A read larger than a few pages costs
    /// less this way: no page-cache pages are allocated and filled (nor
    /// read-ahead zero-filled over holes) only to be copied once, and the
    /// kernel first writes back any dirty cached pages of the range, so it
    /// reads what a buffered read would.
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> usize {
        let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
        if !(aligned(buf.as_ptr() as usize) && aligned(buf.len()) && aligned(offset as usize)) {
            return 0;
        }
        let Some(f) = self.direct() else {
            return 0;
        };
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                // A short read ends at the end of the file, possibly
                // unaligned: the buffered path finishes from there.
                Ok(n) if n > 0 && aligned(n) => done += n,
                Ok(n) => return done + n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EINVAL for an alignment this file's filesystem refuses,
                // or a real error the buffered read will report again.
                Err(_) => return done,
            }
        }
        done
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// True only when `offset..offset + len` of the file is known to be a
    /// hole: SEEK_DATA may call a hole data (then the caller reads it),
    /// never the reverse.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        use nix::unistd::{lseek, Whence};
        let Ok(at) = i64::try_from(offset) else {
            return false;
        };
        match lseek(&self.file, at, Whence::SeekData) {
            Ok(next_data) => next_data as u64 >= offset.saturating_add(len),
            Err(nix::errno::Errno::ENXIO) => true,
            Err(_) => false,
        }
    }

    /// Fills `buf` from `offset` only if the page cache holds all of it,
    /// without waiting for the disk (`RWF_NOWAIT`); false, and `buf` to be
    /// read again, otherwise. Such a read costs a copy, where handing it to
    /// a reader thread costs two wake-ups more than the copy itself.
    /// Reads that [`Storage::read_at`] makes past the cache are not tried.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if !self.can_read_cached.get() || buf.len() >= DIRECT_MIN_BYTES {
            return false;
        }
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::preadv2(
                &self.file,
                &mut [io::IoSliceMut::new(&mut buf[done..])],
                offset + done as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(n) if n > 0 => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
                    self.can_read_cached.set(false);
                    return false;
                }
                // EAGAIN: not all cached; 0: the end of the file, which
                // the caller's read fills with zeros; anything else the
                // caller's read reports.
                _ => return false,
            }
        }
        true
    }

    /// Starts reading a range into the page cache in the background;
    /// errors only lose the hint.
    pub fn prefetch(&self, offset: u64, len: u64) {
        // A range past what off_t holds cannot be in the file: no hint.
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        let _ = nix::fcntl::posix_fadvise(
            &self.file,
            offset,
            len,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
    }

    /// The same file through a descriptor of its own, opened read-only:
    /// reopened through /proc rather than dup'ed, so that it cannot write.
    pub fn reopen_read_only(&self) -> Option<FileStorage> {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        File::open(format!("/proc/self/fd/{fd}"))
            .ok()
            .map(FileStorage::new)
    }
}

/// The O_DIRECT handle for writing `file`, opened on first use.
fn direct_writer<'a>(file: &File, slot: &'a mut Option<Option<File>>) -> Option<&'a File> {
    slot.get_or_insert_with(|| open_direct(file, true)).as_ref()
}

/// Whether a write of `data` at `offset` may bypass the page cache.
fn direct_sized(data: &[u8], offset: u64) -> bool {
    let aligned = |n: u64| n.is_multiple_of(DIRECT_ALIGN as u64);
    data.len() >= DIRECT_MIN_BYTES && aligned(data.len() as u64) && aligned(offset)
}

/// Writes what it can of `data` at `offset` through the O_DIRECT handle
/// `f`, through an aligned copy in `bounce` if `data` is not aligned
/// itself; returns how much, and whether the filesystem refused it
/// (EINVAL before anything was written). The rest is for a buffered write,
/// which reports a real error (ENOSPC, EIO) again.
fn pwrite_direct(f: &File, bounce: &mut Vec<u8>, data: &[u8], offset: u64) -> (usize, bool) {
    let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
    let data = if aligned(data.as_ptr() as usize) {
        data
    } else {
        let r = aligned_range(bounce, data.len());
        bounce[r.clone()].copy_from_slice(data);
        &bounce[r]
    };
    let mut done = 0;
    while done < data.len() {
        match f.write_at(&data[done..], offset + done as u64) {
            Ok(n) if n > 0 && aligned(n) => done += n,
            Ok(n) => return (done + n, false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return (
                    done,
                    done == 0 && e.raw_os_error() == Some(nix::libc::EINVAL),
                )
            }
        }
    }
    (done, false)
}

/// Aligned reads and writes at least this large bypass the page cache.
/// Smaller ones are cheap enough cached, and a direct write would make the
/// session wait for the disk on each.
const DIRECT_MIN_BYTES: usize = 64 << 10;

/// `file` opened again with O_DIRECT, read-only or write-only; None where
/// that is refused (a filesystem without direct I/O, a read-only file).
pub fn open_direct(file: &File, write: bool) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

/// `offset` and `len` as `fallocate` takes them; an error naming `what`
/// for a range past the largest file offset.
fn file_range(what: &str, offset: u64, len: u64) -> io::Result<(i64, i64)> {
    match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(start), Ok(count)) => Ok((start, count)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot {what} {len} bytes at {offset}: past the largest file offset"),
        )),
    }
}

/// Zeros written when the filesystem cannot punch holes.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = if buf.len() >= DIRECT_MIN_BYTES {
            self.read_direct(buf, offset)
        } else {
            0
        };
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// The copy into cache pages and their writeback cost several times
    /// the CPU of a direct write (on the project's VMs, 4 GiB of 1 MiB
    /// random overwrites: 2.5-5.2 CPU s buffered, 0.5 direct; much of
    /// that is the VM's cost of touching pages freed to its host, which a
    /// master target whose memory is full of cache does not pay:
    /// docs/BENCHMARKS.md, issue 5), but the caller then waits for the
    /// disk on each write.
    fn write_direct(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let done = self.try_direct(data, offset);
        if done == data.len() {
            return Ok(());
        }
        self.file.write_all_at(&data[done..], offset + done as u64)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn file_storage(&self) -> Option<&FileStorage> {
        Some(self)
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let (start, count) = file_range("punch", offset, len)?;
        let r = fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            start,
            count,
        );
        match r {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = vec![0u8; ZERO_CHUNK_BYTES];
                let end = offset + len;
                let mut at = offset;
                while at < end {
                    let n = (end - at).min(ZERO_CHUNK_BYTES as u64) as usize;
                    self.file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// In-memory storage that simulates power loss: after `syncs_before_crash`
/// successful syncs, every later write and sync is silently dropped (or
/// fails, with `fail_after_crash`), so the durable state is exactly what
/// the format had synced. [`CrashStorage::durable`] hands it back.
#[derive(Clone)]
pub struct CrashStorage {
    inner: Arc<Mutex<CrashState>>,
}

struct CrashState {
    /// What a reader sees now (includes unsynced writes).
    live: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    syncs_left: Option<u64>,
    crashed: bool,
    fail_after_crash: bool,
}

impl CrashStorage {
    /// Starts from `initial` contents (already durable). `None` never crashes.
    pub fn new(initial: Vec<u8>, syncs_before_crash: Option<u64>) -> Self {
        CrashStorage {
            inner: Arc::new(Mutex::new(CrashState {
                live: initial.clone(),
                durable: initial,
                syncs_left: syncs_before_crash,
                crashed: false,
                fail_after_crash: false,
            })),
        }
    }

    /// Makes writes after the crash return EIO instead of vanishing.
    pub fn fail_after_crash(&self) {
        self.state().fail_after_crash = true;
    }

    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// The bytes that survived: what a machine would find after the cut.
    pub fn durable(&self) -> Vec<u8> {
        self.state().durable.clone()
    }

    /// The bytes a reader sees now.
    pub fn live(&self) -> Vec<u8> {
        self.state().live.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CrashState> {
        self.inner.lock().expect("crash storage lock")
    }
}

impl CrashState {
    fn dropped(&self) -> io::Result<bool> {
        if self.crashed {
            if self.fail_after_crash {
                return Err(io::Error::from_raw_os_error(nix::libc::EIO));
            }
            return Ok(true);
        }
        Ok(false)
    }
}

fn resize(v: &mut Vec<u8>, end: u64) {
    if v.len() < end as usize {
        v.resize(end as usize, 0);
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state();
        let start = (offset as usize).min(s.live.len());
        let end = (offset as usize + buf.len()).min(s.live.len());
        buf.fill(0);
        buf[..end - start].copy_from_slice(&s.live[start..end]);
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state();
        if s.dropped()? {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        resize(&mut s.live, end);
        s.live[offset as usize..end as usize].copy_from_slice(data);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state().live.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut s = self.state();
        if s.dropped()? {
            return Ok(());
        }
        s.live.resize(len as usize, 0);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let mut s = self.state();
        if s.dropped()? {
            return Ok(());
        }
        match s.syncs_left {
            Some(0) => {
                s.crashed = true;
                return s.dropped().map(|_| ());
            }
            Some(n) => s.syncs_left = Some(n - 1),
            None => {}
        }
        s.durable = s.live.clone();
        Ok(())
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = self.state();
        if s.dropped()? {
            return Ok(());
        }
        let end = (offset + len).min(s.live.len() as u64);
        if offset < end {
            s.live[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_writes_survive_the_cut() {
        let mut s = CrashStorage::new(vec![0; 16], Some(1));
        s.write_at(&[1; 4], 0).expect("write");
        s.sync().expect("sync 1 is kept");
        s.write_at(&[2; 4], 4).expect("write");
        s.sync().expect("the crash is silent");
        assert!(s.crashed());
        s.write_at(&[3; 4], 8).expect("dropped");
        let d = s.durable();
        assert_eq!(&d[..8], &[1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(&d[8..12], &[0; 4]);
    }

    #[test]
    fn file_reads_past_end_are_zero() {
        let f = tempfile::tempfile().expect("tempfile");
        let mut s = FileStorage::new(f);
        s.write_at(&[9; 4], 0).expect("write");
        let mut buf = [7u8; 8];
        s.read_at(&mut buf, 2).expect("read");
        assert_eq!(buf, [9, 9, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn ranges_past_the_largest_offset_are_refused_not_wrapped() {
        let f = tempfile::tempfile().expect("tempfile");
        let mut s = FileStorage::new(f);
        s.write_at(&[9; 4], 0).expect("write");
        // Cast to off_t these would be negative: an error, not a hole
        // punched somewhere else.
        let e = s.punch_hole(1 << 63, 4096).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("past the largest file offset"),
            "{e}"
        );
        s.prefetch(u64::MAX - 4096, 4096);
        let mut buf = [0u8; 4];
        s.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [9; 4]);
    }

    #[test]
    fn large_aligned_writes_bypass_the_cache_and_mix_with_cached_ones() {
        // On the project's own filesystem (ext4), which takes O_DIRECT.
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).expect("tempfile");
        let mut s = FileStorage::new(f);
        let data: Vec<u8> = (0..(1 << 20) + 1).map(|i| (i * 13 % 251) as u8).collect();
        // From an unaligned buffer (through the bounce copy) and an
        // aligned one; too small or unaligned in the file: cached.
        let unaligned = &data[1..];
        assert_ne!(unaligned.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(s.try_direct(unaligned, 1 << 20), 1 << 20);
        let mut buf = Vec::new();
        let r = aligned_range(&mut buf, 1 << 20);
        buf[r.clone()].copy_from_slice(unaligned);
        assert_eq!(s.try_direct(&buf[r.clone()], 0), 1 << 20);
        assert_eq!(s.try_direct(&unaligned[..4096], 0), 0);
        assert_eq!(s.try_direct(&unaligned[..1 << 16], 512), 0);
        // A cached write of a few blocks, then a direct write over them,
        // then a cached write inside that: each read sees the newest.
        s.write_at(&[1; 8192], (1 << 20) + 4096)
            .expect("cached write");
        s.write_direct(&unaligned[..1 << 16], 1 << 20)
            .expect("direct write");
        s.write_at(&[2; 100], (1 << 20) + 10).expect("cached write");
        let mut want = unaligned.to_vec();
        want.extend_from_slice(unaligned);
        want[(1 << 20) + 10..(1 << 20) + 110].fill(2);
        let mut got = vec![0u8; 2 << 20];
        s.read_at(&mut got, 0).expect("cached read");
        assert!(got == want, "buffered read sees every write");
        let r = aligned_range(&mut buf, 2 << 20);
        assert_eq!(s.read_direct(&mut buf[r.clone()], 0), 2 << 20);
        assert!(buf[r] == want[..], "direct read sees every write");
    }

    #[test]
    fn cached_reads_take_only_what_the_page_cache_holds() {
        // On the project's own filesystem (ext4), whose clean pages
        // POSIX_FADV_DONTNEED drops.
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).expect("tempfile");
        let mut s = FileStorage::new(f);
        let data: Vec<u8> = (0..1 << 17).map(|i| (i * 11 % 251) as u8).collect();
        s.write_at(&data, 0).expect("write");
        let mut buf = vec![0u8; 16384];
        assert!(s.read_cached(&mut buf, 4096), "just written: cached");
        assert_eq!(buf[..], data[4096..4096 + 16384]);
        // Past the end of the file: for the caller's read, which fills zeros.
        assert!(!s.read_cached(&mut buf, (1 << 17) - 4096));
        // The size that read_at reads past the cache is not tried.
        let mut big = vec![0u8; DIRECT_MIN_BYTES];
        assert!(!s.read_cached(&mut big, 0));

        s.sync().expect("sync");
        nix::fcntl::posix_fadvise(
            &s.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("drop the cached pages");
        buf.fill(7);
        assert!(!s.read_cached(&mut buf, 4096), "dropped: not cached");
        s.read_at(&mut buf, 4096).expect("read from the disk");
        buf.fill(7);
        assert!(s.read_cached(&mut buf, 4096), "read back in: cached");
        assert_eq!(buf[..], data[4096..4096 + 16384]);
    }

    #[test]
    fn direct_reads_see_unsynced_writes_and_zeros_past_an_unaligned_end() {
        // On the project's own filesystem (ext4), which takes O_DIRECT.
        let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).expect("tempfile");
        let mut s = FileStorage::new(f);
        let data: Vec<u8> = (0..(1 << 20) + 100).map(|i| (i * 7 % 251) as u8).collect();
        // Not synced: the pages are dirty in the cache when we read.
        s.write_at(&data, 0).expect("write");
        let mut buf = Vec::new();
        let r = aligned_range(&mut buf, 2 << 20);
        let window = &mut buf[r];
        assert!(s.read_direct(window, 0) >= 1 << 20, "ext4 takes O_DIRECT");
        window.fill(1);
        s.read_at(window, 0).expect("read");
        assert_eq!(&window[..data.len()], &data[..]);
        assert!(window[data.len()..].iter().all(|&b| b == 0));
        // An overwrite just written is what the next read sees.
        s.write_at(&[5; 8192], 1 << 16).expect("overwrite");
        let r = aligned_range(&mut buf, 1 << 17);
        let window = &mut buf[r];
        s.read_at(window, 0).expect("read");
        assert_eq!(&window[..1 << 16], &data[..1 << 16]);
        assert!(window[1 << 16..(1 << 16) + 8192].iter().all(|&b| b == 5));
        // Unaligned reads take the buffered path and agree.
        let mut odd = vec![0u8; 70_000];
        s.read_at(&mut odd, (1 << 17) + 3).expect("read");
        assert_eq!(&odd[..], &data[(1 << 17) + 3..(1 << 17) + 70_003]);
    }
}
