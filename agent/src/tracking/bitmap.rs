//! The dirty map: one bit per granule of a disk.
//!
//! Memory is `size / granularity / 8` bytes: at [`DEFAULT_GRANULARITY_BYTES`]
//! (64 KiB) a 4 TiB disk has 2^26 granules, an 8 MiB map. Small granules
//! matter (a random 4 KiB write costs one granule of reading and shipping),
//! so [`granularity_for`] picks the smallest power of two ≥ 4 KiB whose map
//! stays within [`MAX_MAP_BYTES`]: 4 KiB up to 256 GiB disks, 64 KiB at
//! 4 TiB, 256 KiB at 16 TiB.

use std::io::Write;
use std::ops::Range;

/// The granule for a 4 TiB disk, where the map reaches [`MAX_MAP_BYTES`]:
/// 4 TiB / 64 KiB = 2^26 bits = 8 MiB. Smaller disks get smaller granules
/// from [`granularity_for`].
pub const DEFAULT_GRANULARITY_BYTES: u64 = 64 << 10;
/// The smallest granule: a page, the unit of buffered writeback.
pub const MIN_GRANULARITY_BYTES: u64 = 4096;
/// Most bitmap memory per disk that [`granularity_for`] allows.
pub const MAX_MAP_BYTES: u64 = 8 << 20;

/// The smallest power-of-two granule, at least 4 KiB, whose map fits
/// [`MAX_MAP_BYTES`].
pub fn granularity_for(size_bytes: u64) -> u64 {
    let granules_max = MAX_MAP_BYTES * 8;
    size_bytes
        .div_ceil(granules_max)
        .next_power_of_two()
        .max(MIN_GRANULARITY_BYTES)
}

/// Start of the persisted form.
const MAGIC: &[u8; 8] = b"TDMKDMAP";
/// Persisted form version; v1: header, little-endian u64 words, BLAKE3.
const VERSION: u32 = 1;
/// Header: magic, u32 version, u64 granularity, u64 size, u64 count of set
/// bits; all little-endian.
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 8;
/// BLAKE3 over header and words, at the end.
const CHECKSUM_BYTES: usize = 32;
/// Words serialized at a time when saving (64 KiB).
const WRITE_CHUNK_WORDS: usize = 8192;

#[derive(Debug, Clone)]
pub struct DirtyMap {
    size_bytes: u64,
    granularity_bytes: u64,
    words: Vec<u64>,
    /// Number of set bits.
    set: u64,
    /// Every word below this index is zero (a scan start for `take`).
    low_word: usize,
}

/// Maps are equal when they describe the same disk and dirty granules.
impl PartialEq for DirtyMap {
    fn eq(&self, other: &DirtyMap) -> bool {
        self.size_bytes == other.size_bytes
            && self.granularity_bytes == other.granularity_bytes
            && self.words == other.words
    }
}

impl Eq for DirtyMap {}

impl DirtyMap {
    /// A clean map of a disk of `size_bytes`.
    ///
    /// # Panics
    /// If `granularity_bytes` is not a power of two of at least 4096, or
    /// the map would not fit in memory on this machine.
    pub fn new(size_bytes: u64, granularity_bytes: u64) -> DirtyMap {
        assert!(
            granularity_bytes.is_power_of_two() && granularity_bytes >= MIN_GRANULARITY_BYTES,
            "granularity must be a power of two of at least 4096"
        );
        let words = word_count(size_bytes, granularity_bytes);
        let words = usize::try_from(words).expect("dirty map fits in memory");
        DirtyMap {
            size_bytes,
            granularity_bytes,
            words: vec![0; words],
            set: 0,
            low_word: words,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    fn granules(&self) -> u64 {
        self.size_bytes.div_ceil(self.granularity_bytes)
    }

    /// Marks a byte range, rounded out to whole granules, clipped to the disk.
    pub fn mark(&mut self, range: Range<u64>) {
        let end = range.end.min(self.size_bytes);
        if range.start >= end {
            return;
        }
        self.low_word = self
            .low_word
            .min((range.start / self.granularity_bytes / 64) as usize);
        for (w, mask) in word_masks(range.start..end, self.granularity_bytes) {
            self.set += u64::from((mask & !self.words[w]).count_ones());
            self.words[w] |= mask;
        }
    }

    /// The same dirty granules on a disk grown to `size_bytes` (the new
    /// range clean: the caller decides what it holds). The granule
    /// coarsens if the grown disk's map would pass [`MAX_MAP_BYTES`]; a
    /// coarser granule only ever widens what is dirty.
    pub fn grown(&self, size_bytes: u64) -> DirtyMap {
        let gran = self.granularity_bytes.max(granularity_for(size_bytes));
        let mut out = DirtyMap::new(size_bytes.max(self.size_bytes), gran);
        if gran == self.granularity_bytes {
            out.words[..self.words.len()].copy_from_slice(&self.words);
            out.set = self.set;
            out.low_word = if self.set == 0 {
                out.words.len()
            } else {
                self.low_word
            };
        } else {
            let mut copy = self.clone();
            for r in copy.take(u64::MAX, u64::MAX) {
                out.mark(r);
            }
        }
        out
    }

    pub fn mark_all(&mut self) {
        self.mark(0..self.size_bytes);
    }

    pub fn is_clean(&self) -> bool {
        self.set == 0
    }

    /// Bytes the dirty granules cover (the last granule may be partial).
    pub fn dirty_bytes(&self) -> u64 {
        if self.set == 0 {
            return 0;
        }
        let last = self.granules() - 1;
        let full = self.set * self.granularity_bytes;
        let last_set = self.words[(last / 64) as usize] & (1 << (last % 64)) != 0;
        if last_set {
            full - (self.granules() * self.granularity_bytes - self.size_bytes)
        } else {
            full
        }
    }

    /// Takes dirty data as ranges in disk order and clears it: adjacent
    /// granules are merged into ranges of at most `max_range_bytes`
    /// (rounded down to whole granules, at least one), the total stays
    /// within `max_bytes` except that one granule is always taken when
    /// `max_bytes > 0` (so a small budget still makes progress). Ranges end
    /// at the disk size: the last granule may be partial.
    pub fn take(&mut self, max_bytes: u64, max_range_bytes: u64) -> Vec<Range<u64>> {
        let gran = self.granularity_bytes;
        let per_range = (max_range_bytes / gran).max(1);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut taken = 0u64;
        let mut w = self.low_word;
        'words: while w < self.words.len() && self.set > 0 {
            while self.words[w] != 0 {
                let b = u64::from(self.words[w].trailing_zeros());
                let start = (w as u64 * 64 + b) * gran;
                let end = (start + gran).min(self.size_bytes);
                if taken > 0 && taken + (end - start) > max_bytes {
                    break 'words;
                }
                if max_bytes == 0 {
                    break 'words;
                }
                self.words[w] &= !(1 << b);
                self.set -= 1;
                taken += end - start;
                match out.last_mut() {
                    Some(last)
                        if last.end == start && (last.end - last.start) / gran < per_range =>
                    {
                        last.end = end
                    }
                    _ => out.push(start..end),
                }
            }
            w += 1;
        }
        // Everything below `w` is clear now (and the word at `w` if the
        // loop ran off the end).
        self.low_word = if self.set == 0 { self.words.len() } else { w };
        out
    }

    /// Versioned, checksummed bytes for the state file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.words.len() * 8 + CHECKSUM_BYTES);
        self.write_to(&[], &mut out)
            .expect("writing to a Vec succeeds");
        out
    }

    /// Writes [`DirtyMap::to_bytes`] of this map with `also` marked,
    /// without a copy of the map or of its bytes: at 4 TiB the map is
    /// 8 MiB, and it is saved every cycle with the extents in flight marked.
    pub fn write_to(&self, also: &[Range<u64>], out: &mut dyn Write) -> std::io::Result<()> {
        let mut extra = std::collections::BTreeMap::<usize, u64>::new();
        for r in also {
            let end = r.end.min(self.size_bytes);
            if r.start < end {
                for (w, mask) in word_masks(r.start..end, self.granularity_bytes) {
                    *extra.entry(w).or_default() |= mask;
                }
            }
        }
        let added: u64 = extra
            .iter()
            .map(|(&w, &m)| u64::from((m & !self.words[w]).count_ones()))
            .sum();
        let mut sum = blake3::Hasher::new();
        let mut put = |bytes: &[u8]| {
            sum.update(bytes);
            out.write_all(bytes)
        };
        let mut head = Vec::with_capacity(HEADER_BYTES);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&self.granularity_bytes.to_le_bytes());
        head.extend_from_slice(&self.size_bytes.to_le_bytes());
        head.extend_from_slice(&(self.set + added).to_le_bytes());
        put(&head)?;
        let mut extra = extra.into_iter().peekable();
        let mut chunk = Vec::with_capacity(WRITE_CHUNK_WORDS * 8);
        for (c, words) in self.words.chunks(WRITE_CHUNK_WORDS).enumerate() {
            chunk.clear();
            for (j, &w) in words.iter().enumerate() {
                let i = c * WRITE_CHUNK_WORDS + j;
                let w = match extra.next_if(|&(at, _)| at == i) {
                    Some((_, mask)) => w | mask,
                    None => w,
                };
                chunk.extend_from_slice(&w.to_le_bytes());
            }
            put(&chunk)?;
        }
        let sum = sum.finalize();
        out.write_all(sum.as_bytes())
    }

    /// Reads what [`DirtyMap::to_bytes`] wrote. Never panics; allocates
    /// only after the input's length has been checked against its header.
    pub fn from_bytes(b: &[u8]) -> Result<DirtyMap, String> {
        if b.len() < HEADER_BYTES + CHECKSUM_BYTES {
            return Err(format!("dirty map is truncated ({} bytes)", b.len()));
        }
        let (body, sum) = b.split_at(b.len() - CHECKSUM_BYTES);
        if blake3::hash(body).as_bytes()[..] != *sum {
            return Err("dirty map checksum mismatch".into());
        }
        if &body[..8] != MAGIC {
            return Err("not a dirty map".into());
        }
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let mut v = [0u8; 4];
        v.copy_from_slice(&body[8..12]);
        let version = u32::from_le_bytes(v);
        if version != VERSION {
            return Err(format!("dirty map version {version} is not supported"));
        }
        let (gran, size, set) = (u64_at(12), u64_at(20), u64_at(28));
        if !gran.is_power_of_two() || gran < MIN_GRANULARITY_BYTES {
            return Err(format!("dirty map granularity {gran} is invalid"));
        }
        let words = &body[HEADER_BYTES..];
        if words.len() as u64 != word_count(size, gran).saturating_mul(8) {
            return Err(format!(
                "dirty map has {} bytes of bits, its disk of {size} bytes at {gran} needs {}",
                words.len(),
                word_count(size, gran).saturating_mul(8)
            ));
        }
        let mut map = DirtyMap::new(size, gran);
        for (w, chunk) in map.words.iter_mut().zip(words.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(chunk);
            *w = u64::from_le_bytes(a);
        }
        let granules = map.granules();
        if !granules.is_multiple_of(64) {
            if let Some(&last) = map.words.last() {
                if last >> (granules % 64) != 0 {
                    return Err("dirty map has bits past the end of its disk".into());
                }
            }
        }
        map.set = map.words.iter().map(|w| u64::from(w.count_ones())).sum();
        if map.set != set {
            return Err(format!(
                "dirty map says {set} dirty granules, its bits say {}",
                map.set
            ));
        }
        map.low_word = map
            .words
            .iter()
            .position(|&w| w != 0)
            .unwrap_or(map.words.len());
        Ok(map)
    }
}

/// The words a byte range (non-empty, within the disk) covers, each with
/// the bits of its granules in the range: up to a whole word at a time,
/// since a resync marks terabytes.
fn word_masks(range: Range<u64>, granularity_bytes: u64) -> impl Iterator<Item = (usize, u64)> {
    let last = range.end.div_ceil(granularity_bytes); // exclusive
    let mut g = range.start / granularity_bytes;
    std::iter::from_fn(move || {
        if g >= last {
            return None;
        }
        let (w, b) = ((g / 64) as usize, g % 64);
        let n = (64 - b).min(last - g);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        g += n;
        Some((w, mask))
    })
}

/// u64 words for the granules of a disk.
fn word_count(size_bytes: u64, granularity_bytes: u64) -> u64 {
    size_bytes.div_ceil(granularity_bytes).div_ceil(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const G: u64 = 4096;

    #[test]
    fn a_grown_map_keeps_its_dirt_and_the_new_range_is_clean() {
        let mut m = DirtyMap::new(10 * G + 100, G);
        m.mark(G..3 * G);
        m.mark(10 * G..10 * G + 1);
        let mut g = m.grown(200 * G);
        assert_eq!(g.granularity_bytes(), G);
        assert_eq!(g.dirty_bytes(), 3 * G);
        g.mark(150 * G..151 * G);
        assert_eq!(
            g.take(u64::MAX, u64::MAX),
            vec![G..3 * G, 10 * G..11 * G, 150 * G..151 * G]
        );
        // Past 256 GiB the granule coarsens and dirt widens, never shrinks.
        let mut m = DirtyMap::new(1 << 30, G);
        m.mark(5 * G..6 * G);
        let mut g = m.grown(1 << 40);
        assert_eq!(g.granularity_bytes(), granularity_for(1 << 40));
        let r = g.take(u64::MAX, u64::MAX);
        assert_eq!(r.len(), 1);
        assert!(r[0].start <= 5 * G && r[0].end >= 6 * G);
    }

    /// Granules of a model set as coalesced byte ranges of at most
    /// `per_range` granules, clipped to `size`.
    fn model_ranges(model: &BTreeSet<u64>, size: u64, per_range: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for &g in model {
            let (s, e) = (g * G, ((g + 1) * G).min(size));
            match out.last_mut() {
                Some(l) if l.end == s && (l.end - l.start) / G < per_range => l.end = e,
                _ => out.push(s..e),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_a_set_model(
            size in 1u64..(300 * G),
            ops in proptest::collection::vec(
                prop_oneof![
                    4 => (0u64..(320 * G), 1u64..(70 * G)).prop_map(|(s, l)| (0u8, s, l)),
                    1 => (1u64..(50 * G), 1u64..(9 * G)).prop_map(|(b, r)| (1u8, b, r)),
                    1 => Just((2u8, 0, 0)),
                ],
                0..40,
            ),
        ) {
            let mut m = DirtyMap::new(size, G);
            let mut model = BTreeSet::new();
            let granules = size.div_ceil(G);
            for (op, a, b) in ops {
                match op {
                    0 => {
                        let (start, len) = (a, b);
                        m.mark(start..start + len);
                        let end = (start + len).min(size);
                        if start < end {
                            model.extend(start / G..end.div_ceil(G));
                        }
                    }
                    1 => {
                        let (budget, max_range) = (a, b);
                        let got = m.take(budget, max_range);
                        // The model: the lowest granules within the budget.
                        let mut taken = BTreeSet::new();
                        let mut bytes = 0;
                        for &g in &model {
                            let len = ((g + 1) * G).min(size) - g * G;
                            if bytes > 0 && bytes + len > budget { break; }
                            taken.insert(g);
                            bytes += len;
                        }
                        for g in &taken { model.remove(g); }
                        let want = model_ranges(&taken, size, (max_range / G).max(1));
                        prop_assert_eq!(got, want);
                    }
                    _ => {
                        m.mark_all();
                        model.extend(0..granules);
                    }
                }
                prop_assert_eq!(m.set, model.len() as u64);
                let expect_bytes: u64 =
                    model.iter().map(|&g| ((g + 1) * G).min(size) - g * G).sum();
                prop_assert_eq!(m.dirty_bytes(), expect_bytes);
                prop_assert_eq!(m.is_clean(), model.is_empty());
                let back = DirtyMap::from_bytes(&m.to_bytes()).expect("round trip");
                prop_assert_eq!(&back.words, &m.words);
                prop_assert_eq!(back.set, m.set);
            }
            // Drain whatever is left in pieces: every granule once, in order.
            let mut got = Vec::new();
            loop {
                let ranges = m.take(5 * G, 3 * G);
                if ranges.is_empty() { break; }
                for r in ranges {
                    prop_assert!(r.end - r.start <= 3 * G && r.end <= size);
                    got.extend(r.start / G..r.end.div_ceil(G));
                }
            }
            prop_assert_eq!(got, model.into_iter().collect::<Vec<_>>());
            prop_assert!(m.is_clean());
        }

        #[test]
        fn saving_with_ranges_marked_is_saving_a_marked_copy(
            size in 1u64..(300 * G),
            dirty in proptest::collection::vec((0u64..(320 * G), 0u64..(70 * G)), 0..6),
            also in proptest::collection::vec((0u64..(320 * G), 0u64..(70 * G)), 0..6),
        ) {
            let mut m = DirtyMap::new(size, G);
            for &(at, len) in &dirty {
                m.mark(at..at + len);
            }
            let also: Vec<Range<u64>> = also.iter().map(|&(at, len)| at..at + len).collect();
            let mut copy = m.clone();
            for r in &also {
                copy.mark(r.clone());
            }
            let mut saved = Vec::new();
            m.write_to(&also, &mut saved).expect("write");
            prop_assert_eq!(&saved, &copy.to_bytes());
            prop_assert_eq!(DirtyMap::from_bytes(&saved).expect("reads back"), copy);
        }

        #[test]
        fn from_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DirtyMap::from_bytes(&bytes);
        }
    }

    #[test]
    fn take_coalesces_and_respects_the_budget() {
        let mut m = DirtyMap::new(1 << 20, G);
        m.mark(0..3 * G);
        m.mark(10 * G..11 * G);
        assert_eq!(m.take(u64::MAX, 1 << 20), vec![0..3 * G, 10 * G..11 * G]);
        assert!(m.is_clean());
        m.mark_all();
        assert_eq!(m.dirty_bytes(), 1 << 20);
        assert_eq!(m.take(2 * G, 1 << 20), vec![0..2 * G]);
        // Ranges are split at max_range_bytes.
        assert_eq!(
            m.take(7 * G, 3 * G),
            vec![2 * G..5 * G, 5 * G..8 * G, 8 * G..9 * G]
        );
        // A budget below one granule still takes one; zero takes none.
        assert_eq!(m.take(1, 1), vec![9 * G..10 * G]);
        assert_eq!(m.take(0, 1 << 20), vec![]);
        assert_eq!(m.dirty_bytes(), (1 << 20) - 10 * G);
    }

    #[test]
    fn a_partial_last_granule_ends_at_the_disk_size() {
        let size = 10 * G + 512;
        let mut m = DirtyMap::new(size, G);
        m.mark(size - 1..size + 100);
        assert_eq!(m.dirty_bytes(), 512);
        m.mark(9 * G..9 * G + 1);
        assert_eq!(m.take(u64::MAX, u64::MAX), vec![9 * G..size]);
        m.mark(u64::MAX - 5..u64::MAX);
        m.mark(5..5);
        assert!(m.is_clean());
    }

    #[test]
    fn persistence_round_trips() {
        let mut m = DirtyMap::new((1 << 30) + 4096 * 3, 64 << 10);
        m.mark(12345..99999);
        m.mark((1 << 30)..(1 << 30) + 1);
        let b = m.to_bytes();
        let mut back = DirtyMap::from_bytes(&b).expect("round trip");
        assert_eq!(back, m);
        assert_eq!(back.take(u64::MAX, u64::MAX), m.take(u64::MAX, u64::MAX));
        let empty = DirtyMap::new(0, G);
        assert_eq!(
            DirtyMap::from_bytes(&empty.to_bytes()).expect("empty"),
            empty
        );
    }

    /// `body` with a fresh checksum, as a careless writer would produce it.
    fn resealed(mut body: Vec<u8>) -> Vec<u8> {
        body.truncate(body.len() - CHECKSUM_BYTES);
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        body
    }

    #[test]
    fn corrupt_bytes_are_rejected() {
        let mut m = DirtyMap::new(1 << 20, G);
        m.mark(5..6);
        let good = m.to_bytes();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(DirtyMap::from_bytes(&b).is_err(), "flip at byte {i}");
        }
        for len in 0..good.len() {
            assert!(
                DirtyMap::from_bytes(&good[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(DirtyMap::from_bytes(&long).is_err());

        // Consistent checksums over inconsistent content.
        let mut b = good.clone();
        b[8] = 2; // version
        assert!(DirtyMap::from_bytes(&resealed(b))
            .unwrap_err()
            .contains("version"));
        let mut b = good.clone();
        b[12..20].copy_from_slice(&4095u64.to_le_bytes());
        assert!(DirtyMap::from_bytes(&resealed(b))
            .unwrap_err()
            .contains("granularity"));
        let mut b = good.clone();
        b[28..36].copy_from_slice(&2u64.to_le_bytes());
        assert!(DirtyMap::from_bytes(&resealed(b)).is_err());
        // A huge disk size must not allocate.
        let mut b = good.clone();
        b[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(DirtyMap::from_bytes(&resealed(b)).is_err());
        // A bit past the end of a disk of 100 granules.
        let mut small = DirtyMap::new(100 * G, G);
        small.mark(0..1);
        let mut b = small.to_bytes();
        b[HEADER_BYTES + 8 + 7] |= 0x80; // bit 127 of word 1
        b[28..36].copy_from_slice(&2u64.to_le_bytes());
        assert!(DirtyMap::from_bytes(&resealed(b))
            .unwrap_err()
            .contains("past the end"));
    }

    #[test]
    fn granules_stay_small_and_maps_fit_the_budget() {
        assert_eq!(granularity_for(2 << 30), 4096);
        assert_eq!(granularity_for(256 << 30), 4096);
        assert_eq!(granularity_for(4 << 40), DEFAULT_GRANULARITY_BYTES);
        assert_eq!(granularity_for(16 << 40), 256 << 10);
        let m = DirtyMap::new(4 << 40, DEFAULT_GRANULARITY_BYTES);
        assert_eq!(m.words.len() as u64 * 8, MAX_MAP_BYTES);
    }
}
