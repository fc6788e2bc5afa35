//! A set of byte ranges of a disk, kept merged: which parts of a disk a
//! set of undo records covers.

use std::collections::BTreeMap;

/// Disjoint, non-touching half-open ranges `[start, end)`.
#[derive(Debug, Default, Clone)]
pub struct Ranges {
    /// start → end.
    map: BTreeMap<u64, u64>,
}

impl Ranges {
    pub fn new() -> Ranges {
        Ranges::default()
    }

    /// Adds `[start, end)`, merging with what it overlaps or touches.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<(u64, u64)> =
            self.map.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in absorbed {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    /// Whether every byte of `[start, end)` is in the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .map
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        if let Some((_, &e)) = self.map.range(..=start).next_back() {
            at = at.max(e);
        }
        for (&s, &e) in self.map.range(start..end) {
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many separate ranges the set holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a bitmap of 256 bytes.
        #[test]
        fn matches_a_bitmap(
            inserts in prop::collection::vec((0u64..256, 0u64..64), 0..24),
            queries in prop::collection::vec((0u64..256, 0u64..64), 1..16),
        ) {
            let mut set = Ranges::new();
            let mut bits = [false; 320];
            for (s, n) in inserts {
                set.insert(s, s + n);
                bits[s as usize..(s + n) as usize].fill(true);
            }
            for (s, n) in queries {
                let e = s + n;
                let want_cover = bits[s as usize..e as usize].iter().all(|&b| b);
                prop_assert_eq!(set.covers(s, e), want_cover);
                let mut from_gaps = bits;
                for (a, b) in set.gaps(s, e) {
                    prop_assert!(a < b && s <= a && b <= e);
                    prop_assert!(from_gaps[a as usize..b as usize].iter().all(|&x| !x));
                    from_gaps[a as usize..b as usize].fill(true);
                }
                prop_assert!(from_gaps[s as usize..e as usize].iter().all(|&b| b));
            }
        }
    }
}
