//! Read buffers aligned for O_DIRECT, from a fixed pool: the agent's read
//! memory is `count × size` however large its disks are.

use std::alloc::Layout;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};

/// O_DIRECT needs buffers aligned to the logical block size; 4096 covers
/// every disk the agent supports (512 and 4096-byte sectors).
pub const ALIGN_BYTES: usize = 4096;

/// One aligned allocation.
struct Aligned {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: `Aligned` owns its allocation exclusively (no aliasing pointer is
// kept anywhere else), so moving it to another thread is sound.
unsafe impl Send for Aligned {}

impl Aligned {
    /// A private anonymous mapping: page-aligned (which covers
    /// [`ALIGN_BYTES`]), zero-filled by the kernel, and resident only
    /// where something has been read into it. The allocator's aligned
    /// zeroed allocation writes every byte instead, which made the whole
    /// pool (12 MiB by default) resident from the start, on an idle disk
    /// too. The pool hands out the most recently returned buffer first,
    /// so under light load the same few stay in use.
    fn new(cap: usize) -> Aligned {
        use nix::libc;
        // SAFETY: asks for new memory and touches none that exists; cap is
        // non-zero (BufPool rounds sizes up to at least ALIGN_BYTES).
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let layout = Layout::from_size_align(cap, ALIGN_BYTES).expect("buffer size is valid");
        if raw == libc::MAP_FAILED {
            std::alloc::handle_alloc_error(layout);
        }
        // Huge pages would make a 4 KiB read resident as 2 MiB where the
        // kernel merges neighbouring buffers into one mapping. Advice only:
        // a kernel without THP refuses it, and nothing depends on it.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(raw, cap, libc::MADV_NOHUGEPAGE) };
        let ptr = NonNull::new(raw.cast::<u8>())
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Aligned { ptr, cap }
    }

    fn slice(&self, len: usize) -> &[u8] {
        // SAFETY: ptr points to `cap` initialised (zeroed) bytes owned by
        // self; len <= cap is kept by ReadBuf::set_len.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `slice`, and `&mut self` guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with this length, unmapped once; no
        // slice of it outlives self.
        unsafe { nix::libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
    }
}

struct PoolInner {
    free: Mutex<Vec<Aligned>>,
    returned: Condvar,
    size_bytes: usize,
}

/// A fixed set of aligned buffers; cloning shares the set.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl BufPool {
    /// `count` buffers of `size_bytes` (rounded up to [`ALIGN_BYTES`]).
    pub fn new(count: usize, size_bytes: usize) -> BufPool {
        let size_bytes = size_bytes.max(1).div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
        let free = (0..count.max(1))
            .map(|_| Aligned::new(size_bytes))
            .collect();
        BufPool {
            inner: Arc::new(PoolInner {
                free: Mutex::new(free),
                returned: Condvar::new(),
                size_bytes,
            }),
        }
    }

    pub fn buf_bytes(&self) -> usize {
        self.inner.size_bytes
    }

    /// Blocks until a buffer is free.
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
