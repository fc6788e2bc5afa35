//! Read buffers aligned for O_DIRECT, from a fixed pool: the agent's read
//! memory is `count × size` however large its disks are.

use std::alloc::Layout;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

/// O_DIRECT needs buffers aligned to the logical block size; 4096 covers
/// every disk the agent supports (512 and 4096-byte sectors).
pub const ALIGN_BYTES: usize = 4096;

/// How a pool's memory is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    /// Base pages, resident only where a read lands. For `run`, which
    /// spends most of its life reading a few small extents now and then:
    /// an idle agent then holds only the pages it has read into.
    Small,
    /// Transparent huge pages where the kernel grants them. An O_DIRECT
    /// read into scattered 4 KiB pages is split by the block layer: a
    /// loop device takes at most 128 segments of 64 KiB, so a 1 MiB read
    /// went to it as two requests of 512 KiB, and the agent's reader got
    /// about 0.6 of what fio got from the same device whenever fio's
    /// buffers happened to be contiguous. Reading into huge pages
    /// keeps each read one request, and pins one folio instead of 256
    /// pages. For `sync` and `resync`, which use every buffer within
    /// moments of starting anyway (docs/BENCHMARKS.md, "Read buffers in
    /// huge pages").
    Huge,
}

/// The size of a transparent huge page on x86-64 and of a PMD mapping
/// generally; the arena of a [`Pages::Huge`] pool is aligned to it, since
/// the kernel backs only whole, aligned ones.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// One private anonymous mapping holding every buffer of a pool:
/// page-aligned (which covers [`ALIGN_BYTES`]), zero-filled by the kernel,
/// and resident only where something has been written into it. The
/// allocator's aligned zeroed allocation writes every byte instead, which
/// made the whole pool (12 MiB by default) resident from the start, on an
/// idle disk too.
struct Arena {
    ptr: NonNull<u8>,
    len: usize,
    /// Whether the kernel took the advice to back it with huge pages
    /// (it may still fall back to base pages where it has none free).
    huge: bool,
}

// SAFETY: the arena is only unmapped on drop, and its bytes are reached
// only through the `Aligned` slices carved from it, each owned by one
// holder at a time.
unsafe impl Send for Arena {}
// SAFETY: a shared `Arena` gives access to nothing but its address and
// length; the bytes go through the `Aligned` slices, as above.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(len: usize, pages: Pages) -> Arena {
        use nix::libc;
        let align = match pages {
            Pages::Small => ALIGN_BYTES,
            Pages::Huge => HUGE_PAGE_BYTES,
        };
        let len = len.max(1).div_ceil(align) * align;
        // Room to slide the start to an aligned address; the slack is
        // unmapped again below.
        let map_len = len + (align - ALIGN_BYTES);
        let layout = Layout::from_size_align(len, align).expect("arena size is valid");
        // SAFETY: asks for new memory and touches none that exists;
        // map_len is non-zero.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout);
        }
        let raw_addr = raw as usize;
        let start = raw_addr.next_multiple_of(align);
        let head = start - raw_addr;
        let tail = map_len - head - len;
        // SAFETY: both ranges lie inside the mapping just made and outside
        // [start, start + len), which is all this arena keeps.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        // Advice only: a kernel without THP refuses it, and nothing
        // depends on it. Small pools turn huge pages off: where THP is
        // `always`, a 4 KiB read into the arena could make 2 MiB
        // resident.
        let advice = match pages {
            Pages::Small => libc::MADV_NOHUGEPAGE,
            Pages::Huge => libc::MADV_HUGEPAGE,
        };
        // SAFETY: the range is the part of the mapping kept.
        let advised = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) } == 0;
        let ptr = NonNull::new(start as *mut u8)
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arena {
            ptr,
            len,
            huge: pages == Pages::Huge && advised && huge_pages_enabled(),
        }
    }
}

/// False where the administrator turned transparent huge pages off, and
/// the advice above is ignored.
fn huge_pages_enabled() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this start and length, unmapped
        // once; every `Aligned` carved from it is gone, since they live in
        // the pool that owns the arena or in `ReadBuf`s that keep that
        // pool alive.
        unsafe { nix::libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One buffer: a disjoint slice of its pool's arena.
struct Aligned {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: an `Aligned` is the only handle to its slice of the arena (no
// two overlap), so moving it to another thread is sound.
unsafe impl Send for Aligned {}

impl Aligned {
    fn slice(&self, len: usize) -> &[u8] {
        // SAFETY: ptr points to `cap` initialised (zeroed) bytes of the
        // arena, kept mapped while self exists; len <= cap is kept by
        // ReadBuf::set_len.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `slice`, and `&mut self` guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

struct PoolInner {
    free: Mutex<Vec<Aligned>>,
    returned: Condvar,
    size_bytes: usize,
    count: usize,
    /// Dropped after every buffer: those still out hold this pool.
    arena: Arena,
}

/// A fixed set of aligned buffers; cloning shares the set.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    /// `count` buffers of `size_bytes` (rounded up to [`ALIGN_BYTES`]),
    /// in base pages.
    pub fn new(count: usize, size_bytes: usize) -> BufPool {
        BufPool::with_pages(count, size_bytes, Pages::Small)
    }

    /// The same, backed as `pages` says.
    pub fn with_pages(count: usize, size_bytes: usize, pages: Pages) -> BufPool {
        let size_bytes = size_bytes.max(1).div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        let count = count.max(1);
        let arena = Arena::new(count * size_bytes, pages);
        let free = (0..count)
            .map(|i| Aligned {
                // SAFETY: i * size_bytes + size_bytes <= count * size_bytes
                // <= arena.len: inside the arena.
                ptr: unsafe { arena.ptr.add(i * size_bytes) },
                cap: size_bytes,
            })
            .collect();
        BufPool {
            inner: Arc::new(PoolInner {
                free: Mutex::new(free),
                returned: Condvar::new(),
                size_bytes,
                count,
                arena,
            }),
        }
    }

    pub fn buf_bytes(&self) -> usize {
        self.inner.size_bytes
    }

    /// How many buffers the pool has.
    pub fn count(&self) -> usize {
        self.inner.count
    }

    /// The bytes of a buffer that are physically contiguous at least,
    /// which decide how large a read the block layer takes whole: a page,
    /// or the whole buffer where huge pages back the pool and each buffer
    /// lies within one (a 1 MiB buffer in a 2 MiB page), or a huge page
    /// where a buffer spans whole ones.
    pub fn contiguous_bytes(&self) -> usize {
        let size = self.inner.size_bytes;
        if !self.inner.arena.huge {
            ALIGN_BYTES
        } else if HUGE_PAGE_BYTES.is_multiple_of(size) {
            size
        } else if size.is_multiple_of(HUGE_PAGE_BYTES) {
            HUGE_PAGE_BYTES
        } else {
            ALIGN_BYTES
        }
    }

    /// Blocks until a buffer is free. The most recently returned comes
    /// first, so under light load the same few buffers, and pages, stay in
    /// use.
    pub fn get(&self) -> ReadBuf {
        let mut free = self.inner.free.lock().expect("pool lock");
        loop {
            if let Some(mem) = free.pop() {
                return self.wrap(mem);
            }
            free = self.inner.returned.wait(free).expect("pool lock");
        }
    }

    /// A buffer if one is free now.
    pub fn try_get(&self) -> Option<ReadBuf> {
        let mem = self.inner.free.lock().expect("pool lock").pop()?;
        Some(self.wrap(mem))
    }

    fn wrap(&self, mem: Aligned) -> ReadBuf {
        ReadBuf {
            mem: Some(mem),
            len: 0,
            pool: self.inner.clone(),
        }
    }
}

/// A pooled buffer holding `len` valid bytes; returns to its pool on drop,
/// on whichever thread drops it.
pub struct ReadBuf {
    mem: Option<Aligned>,
    len: usize,
    pool: Arc<PoolInner>,
}

impl ReadBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.pool.size_bytes
    }

    /// The whole buffer, for filling.
    pub(super) fn full_mut(&mut self) -> &mut [u8] {
        self.mem.as_mut().expect("present until drop").slice_mut()
    }

    /// Raw pointer to the start, for a kernel read into it.
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.mem.as_mut().expect("present until drop").ptr.as_ptr()
    }

    pub(super) fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "length beyond the buffer");
        self.len = len;
    }
}

impl Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.mem
            .as_ref()
            .expect("present until drop")
            .slice(self.len)
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            self.pool.free.lock().expect("pool lock").push(mem);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_come_back() {
        let pool = BufPool::new(2, 5000);
        assert_eq!(pool.buf_bytes(), 8192);
        let mut a = pool.get();
        let b = pool.get();
        assert!(pool.try_get().is_none());
        assert_eq!(a.as_mut_ptr() as usize % ALIGN_BYTES, 0);
        a.full_mut()[..3].copy_from_slice(&[1, 2, 3]);
        a.set_len(3);
        assert_eq!(&a[..], &[1, 2, 3]);
        std::thread::spawn(move || drop(b)).join().expect("thread");
        assert!(pool.try_get().is_some());
    }

    #[test]
    fn buffers_are_disjoint_slices_of_one_arena() {
        for pages in [Pages::Small, Pages::Huge] {
            let pool = BufPool::with_pages(5, 1 << 20, pages);
            assert_eq!(pool.count(), 5);
            let mut bufs: Vec<ReadBuf> = (0..5).map(|_| pool.get()).collect();
            let mut starts: Vec<usize> = bufs.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
            starts.sort_unstable();
            for w in starts.windows(2) {
                assert_eq!(w[1] - w[0], 1 << 20, "{pages:?}: buffers side by side");
            }
            if pages == Pages::Huge {
                // Huge pages back only whole, aligned ones.
                assert_eq!(starts[0] % HUGE_PAGE_BYTES, 0);
            }
            for (i, b) in bufs.iter_mut().enumerate() {
                b.full_mut().fill(i as u8);
                b.set_len(1 << 20);
            }
            for (i, b) in bufs.iter().enumerate() {
                assert!(
                    b.iter().all(|&x| x == i as u8),
                    "{pages:?}: buffer {i} kept"
                );
            }
            // Buffers outlive the pool handle: the arena goes with the last.
            drop(pool);
            assert!(bufs[4].iter().all(|&x| x == 4));
        }
    }

    #[test]
    fn only_huge_page_pools_promise_contiguous_buffers() {
        assert_eq!(BufPool::new(2, 1 << 20).contiguous_bytes(), ALIGN_BYTES);
        let thp = huge_pages_enabled();
        let expect = |bytes| if thp { bytes } else { ALIGN_BYTES };
        // A buffer inside one huge page is contiguous as a whole; one
        // spanning several, per huge page; one that straddles them, only
        // per page.
        assert_eq!(
            BufPool::with_pages(3, 1 << 20, Pages::Huge).contiguous_bytes(),
            expect(1 << 20)
        );
        assert_eq!(
            BufPool::with_pages(2, 4 << 20, Pages::Huge).contiguous_bytes(),
            expect(2 << 20)
        );
        assert_eq!(
            BufPool::with_pages(2, 3 << 20, Pages::Huge).contiguous_bytes(),
            ALIGN_BYTES
        );
    }

    /// Where the kernel has huge pages, a huge-page pool's filled buffers
    /// are physically contiguous, which is what the reader's request size
    /// counts on: the page frames behind its 2 MiB follow one another from
    /// a huge page's boundary (`/proc/self/pagemap`; frame numbers need
    /// root, as the agent's other device tests do). Per page, from
    /// pagemap: smaps counts huge pages per mapping, and the kernel may
    /// merge this pool's mapping with another test's.
    #[test]
    fn a_huge_page_pool_is_physically_contiguous_where_the_kernel_has_huge_pages() {
        use std::os::unix::fs::FileExt;
        let pool = BufPool::with_pages(2, 1 << 20, Pages::Huge);
        let mut a = pool.get();
        let mut b = pool.get();
        a.full_mut().fill(1);
        b.full_mut().fill(2);
        if !huge_pages_enabled() {
            assert_eq!(pool.contiguous_bytes(), ALIGN_BYTES, "nothing promised");
            return;
        }
        let start = (a.as_mut_ptr() as usize).min(b.as_mut_ptr() as usize);
        let pages = HUGE_PAGE_BYTES / 4096;
        let mut entries = vec![0u8; pages * 8];
        std::fs::File::open("/proc/self/pagemap")
            .and_then(|f| f.read_exact_at(&mut entries, (start / 4096 * 8) as u64))
            .expect("pagemap");
        let frames: Vec<u64> = entries
            .chunks_exact(8)
            .map(|e| {
                let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                assert!(e >> 63 == 1, "page present");
                e & ((1 << 55) - 1)
            })
            .collect();
        assert_ne!(frames[0], 0, "page frame numbers need root");
        assert_eq!(
            frames[0] % pages as u64,
            0,
            "starts at a huge page's boundary"
        );
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(*f, frames[0] + i as u64, "page {i} follows the first");
        }
    }

    /// Pages of `buf` the kernel has resident.
    fn resident_pages(buf: &mut ReadBuf) -> usize {
        let len = buf.capacity();
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: the range is the buffer's own mapping; vec has a byte per page.
        let rc = unsafe { nix::libc::mincore(buf.as_mut_ptr().cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// An idle pool costs no memory: only what is read into a buffer is.
    #[test]
    fn buffers_become_resident_only_where_written() {
        let pool = BufPool::new(3, 1 << 20);
        let mut a = pool.get();
        assert_eq!(resident_pages(&mut a), 0);
        a.full_mut()[..5000].fill(7);
        assert_eq!(resident_pages(&mut a), 2);
        drop(a);
        // The buffer just returned comes back first: the same pages.
        let mut again = pool.get();
        assert_eq!(resident_pages(&mut again), 2);
        let mut other = pool.get();
        assert_eq!(resident_pages(&mut other), 0);
        // (Reading maps the kernel's zero page, which mincore counts.)
        assert!(other.full_mut().iter().all(|&b| b == 0), "zero-filled");
    }
}
