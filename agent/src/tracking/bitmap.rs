//! The dirty map: one bit per granule of a disk. The granule is as small
//! as a 4 KiB page while the map stays within 8 MiB ([`granularity_for`]):
//! 4 KiB up to 256 GiB disks, 64 KiB for a 4 TiB disk. Small granules
//! matter: a random 4 KiB write costs one granule of reading and shipping.

use std::ops::Range;

/// Most bitmap memory per disk.
pub const MAX_MAP_BYTES: u64 = 8 << 20;

/// The smallest power-of-two granule, at least 4 KiB, whose map fits
/// [`MAX_MAP_BYTES`].
pub fn granularity_for(size_bytes: u64) -> u64 {
    let granules_max = MAX_MAP_BYTES * 8;
    size_bytes
        .div_ceil(granules_max)
        .next_power_of_two()
        .max(4096)
}
const MAGIC: &[u8; 8] = b"TDMKDMAP";
const VERSION: u32 = 1;
/// Serialized header: magic, version, granularity, size, count of set bits.
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    size_bytes: u64,
    granularity_bytes: u64,
    words: Vec<u64>,
    set: u64,
}

impl DirtyMap {
    pub fn new(size_bytes: u64, granularity_bytes: u64) -> DirtyMap {
        assert!(
            granularity_bytes.is_power_of_two() && granularity_bytes >= 4096,
            "granularity must be a power of two of at least 4096"
        );
        let granules = size_bytes.div_ceil(granularity_bytes);
        DirtyMap {
            size_bytes,
            granularity_bytes,
            words: vec![0; granules.div_ceil(64) as usize],
            set: 0,
        }
    }

    fn granules(&self) -> u64 {
        self.size_bytes.div_ceil(self.granularity_bytes)
    }

    fn set_bit(&mut self, g: u64) {
        let (w, b) = ((g / 64) as usize, g % 64);
        if self.words[w] & (1 << b) == 0 {
            self.words[w] |= 1 << b;
            self.set += 1;
        }
    }

    fn bit(&self, g: u64) -> bool {
        self.words[(g / 64) as usize] & (1 << (g % 64)) != 0
    }

    /// Marks a byte range, rounded out to whole granules, clipped to the disk.
    pub fn mark(&mut self, range: Range<u64>) {
        let end = range.end.min(self.size_bytes);
        if range.start >= end {
            return;
        }
        let first = range.start / self.granularity_bytes;
        let last = end.div_ceil(self.granularity_bytes);
        let mut g = first;
        while g < last {
            // Whole words at a time where possible: a resync marks terabytes.
            if g.is_multiple_of(64) && g + 64 <= last {
                let w = (g / 64) as usize;
                self.set += u64::from((!self.words[w]).count_ones());
                self.words[w] = u64::MAX;
                g += 64;
            } else {
                self.set_bit(g);
                g += 1;
            }
        }
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
        if self.bit(last) {
            full - (self.granules() * self.granularity_bytes - self.size_bytes)
        } else {
            full
        }
    }

    /// Takes up to about `max_bytes` of dirty data as coalesced ranges of at
    /// most `max_range_bytes` each (a multiple of the granularity), and
    /// clears them.
    pub fn take(&mut self, max_bytes: u64, max_range_bytes: u64) -> Vec<Range<u64>> {
        let per_range = (max_range_bytes / self.granularity_bytes).max(1);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut taken = 0u64;
        let granules = self.granules();
        let mut w = 0usize;
        while w < self.words.len() && taken < max_bytes && self.set > 0 {
            if self.words[w] == 0 {
                w += 1;
                continue;
            }
            let b = u64::from(self.words[w].trailing_zeros());
            let g = w as u64 * 64 + b;
            if g >= granules {
                break;
            }
            self.words[w] &= !(1 << b);
            self.set -= 1;
            let start = g * self.granularity_bytes;
            let end = (start + self.granularity_bytes).min(self.size_bytes);
            taken += end - start;
            match out.last_mut() {
                Some(last)
                    if last.end == start
                        && (last.end - last.start) / self.granularity_bytes < per_range =>
                {
                    last.end = end
                }
                _ => out.push(start..end),
            }
        }
        out
    }

    /// Versioned, checksummed bytes for the state file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.words.len() * 8 + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.granularity_bytes.to_le_bytes());
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.set.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = tidemark_common::checksum::checksum(&out);
        out.extend_from_slice(&sum);
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<DirtyMap, String> {
        if b.len() < HEADER_BYTES + 32 {
            return Err("dirty map is truncated".into());
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if tidemark_common::checksum::checksum(body)[..] != *sum {
            return Err("dirty map checksum mismatch".into());
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        if &body[..8] != MAGIC {
            return Err("not a dirty map".into());
        }
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(format!("dirty map version {version} is not supported"));
        }
        let (gran, size, set) = (u64_at(12), u64_at(20), u64_at(28));
        if !gran.is_power_of_two() || gran < 4096 {
            return Err(format!("dirty map granularity {gran} is invalid"));
        }
        let mut map = DirtyMap::new(size, gran);
        let words = &body[HEADER_BYTES..];
        if words.len() != map.words.len() * 8 {
            return Err("dirty map length does not match its disk size".into());
        }
        for (w, chunk) in map.words.iter_mut().zip(words.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        map.set = map.words.iter().map(|w| u64::from(w.count_ones())).sum();
        if map.set != set {
            return Err("dirty map count does not match its bits".into());
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const G: u64 = 4096;

    proptest! {
        #[test]
        fn matches_a_set_model(
            size in 1u64..(300 * G),
            marks in proptest::collection::vec((0u64..(320 * G), 1u64..(40 * G)), 0..30),
            budget in 1u64..(400 * G),
        ) {
            let mut m = DirtyMap::new(size, G);
            let mut model = BTreeSet::new();
            let granules = size.div_ceil(G);
            for (start, len) in marks {
                m.mark(start..start + len);
                let end = (start + len).min(size);
                if start < end {
                    for g in start / G..end.div_ceil(G) {
                        model.insert(g);
                    }
                }
            }
            prop_assert_eq!(m.set, model.len() as u64);
            let expect_bytes: u64 = model.iter().map(|&g| ((g + 1) * G).min(size) - g * G).sum();
            prop_assert_eq!(m.dirty_bytes(), expect_bytes);
            let back = DirtyMap::from_bytes(&m.to_bytes()).expect("round trip");
            prop_assert_eq!(&back, &m);
            let mut got = BTreeSet::new();
            loop {
                let ranges = m.take(budget, 8 * G);
                if ranges.is_empty() { break; }
                for r in ranges {
                    prop_assert!(r.end - r.start <= 8 * G);
                    prop_assert!(r.end <= size);
                    for g in r.start / G..r.end.div_ceil(G) {
                        prop_assert!(got.insert(g), "granule {} taken twice", g);
                    }
                }
            }
            prop_assert_eq!(got, model);
            prop_assert!(m.is_clean());
            prop_assert!(granules > 0);
        }
    }

    #[test]
    fn take_coalesces_and_respects_the_budget() {
        let mut m = DirtyMap::new(1 << 20, G);
        m.mark(0..3 * G);
        m.mark(10 * G..11 * G);
        assert_eq!(m.take(u64::MAX, 1 << 20), vec![0..3 * G, 10 * G..11 * G]);
        m.mark_all();
        assert_eq!(m.dirty_bytes(), 1 << 20);
        let first = m.take(2 * G, 1 << 20);
        assert_eq!(first, vec![0..2 * G]);
    }

    #[test]
    fn corrupt_bytes_are_rejected() {
        let mut m = DirtyMap::new(1 << 20, G);
        m.mark(5..6);
        let mut b = m.to_bytes();
        b[HEADER_BYTES] ^= 1;
        assert!(DirtyMap::from_bytes(&b).is_err());
        assert!(DirtyMap::from_bytes(&b[..10]).is_err());
        assert!(DirtyMap::from_bytes(&[]).is_err());
    }

    #[test]
    fn granules_stay_small_and_maps_fit_the_budget() {
        assert_eq!(granularity_for(2 << 30), 4096);
        assert_eq!(granularity_for(256 << 30), 4096);
        assert_eq!(granularity_for(4 << 40), 64 << 10);
        let m = DirtyMap::new(4 << 40, granularity_for(4 << 40));
        assert_eq!(m.words.len() as u64 * 8, MAX_MAP_BYTES);
    }
}
