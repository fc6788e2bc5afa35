//! How hard to compress the next piece: the configured zstd level, the
//! fast one where the data barely compresses, or not at all where even the
//! configured level saves too little to be worth its CPU.
//!
//! On data that barely compresses (encrypted, already compressed, media;
//! fio's buffers) zstd's level 1 and its fast level −3 end within a few
//! per cent of each other (0.886 against 0.904 of the size on fio's
//! 64 KiB writes) while level 1 costs 2.4 times the CPU; on ordinary files
//! level 1 saves a seventh more (0.540 against 0.613). docs/BENCHMARKS.md
//! has the figures. So the configured level is kept while it pays and
//! probed now and then while it does not. Where it barely pays and
//! compression is also what the pipeline waits for, the piece is stored:
//! the fast level's tenth or so of bytes saved then costs more time than
//! the bytes do (on a link with room to spare; a full link is not a hurry).

use crate::FAST_ZSTD_LEVEL;

/// Above this share of the input left after compressing at the configured
/// level, the fast level is used instead: what the configured level saves
/// over it is then a few per cent of the bytes.
const BARELY: f64 = 0.85;
/// At or above this share, pieces are stored uncompressed: compressing
/// them saves less than an eighth of the bytes (the cut ZFS makes for the
/// same reason), and costs the sender its compression and the receiver its
/// decompression of every byte. On a link too slow for the extra eighth
/// the pipeline is not waiting on CPU, and `zstd_level` still decides what
/// data that does compress gets.
const HARDLY: f64 = 0.875;
/// While on the fast level or storing, one piece in this many is still
/// compressed at the configured level, so that data turning compressible
/// is noticed, and data that stopped compressing while pieces were
/// hurried.
const PROBE_EVERY: u32 = 16;
/// Weight of each new observation in the running ratio.
const WEIGHT: f64 = 0.125;

/// One compressor's running estimate of what its configured level achieves.
#[derive(Debug, Clone)]
pub struct Effort {
    level: i32,
    /// Output over input at `level`, smoothed; starts as "compresses".
    ratio: f64,
    since_probe: u32,
}

impl Effort {
    pub fn new(level: i32) -> Effort {
        Effort {
            level,
            ratio: 0.0,
            since_probe: 0,
        }
    }

    /// The zstd level for the next piece, or None to store it as it is.
    /// `hurry` (compression is what the pipeline waits for) means the fast
    /// level where the configured one would be used, and storing where
    /// the data barely compresses.
    pub fn next_level(&mut self, hurry: bool) -> Option<i32> {
        let barely = self.ratio >= BARELY;
        // Away from the configured level (storing, or the fast level when
        // it barely pays or when hurried), one piece in PROBE_EVERY still
        // goes at it: other pieces teach the estimate nothing, and under
        // a hurry that does not end, data that stopped compressing would
        // otherwise go at the fast level for good instead of being stored.
        if barely || (hurry && self.level > FAST_ZSTD_LEVEL) {
            self.since_probe += 1;
            if self.since_probe >= PROBE_EVERY {
                self.since_probe = 0;
                return Some(self.level);
            }
        }
        // Stored: the configured level saves less than an eighth; or it
        // barely pays and compression is what the pipeline waits for, where
        // the fast level's few bytes saved cost more time than they save.
        if barely && (self.ratio >= HARDLY || hurry) {
            return None;
        }
        if self.level <= FAST_ZSTD_LEVEL {
            return Some(self.level);
        }
        if barely || hurry {
            return Some(FAST_ZSTD_LEVEL);
        }
        Some(self.level)
    }

    /// What a piece of `input` bytes compressed to at `level` (`input`
    /// itself when it did not shrink).
    pub fn observe(&mut self, level: i32, input: usize, output: usize) {
        if level != self.level || input == 0 {
            return;
        }
        let r = (output as f64 / input as f64).min(1.0);
        self.ratio += WEIGHT * (r - self.ratio);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shares of pieces compressed at the fast level and stored, feeding
    /// pieces that compress to `ratio` at the configured level.
    fn run(e: &mut Effort, ratio: f64, pieces: usize) -> (f64, f64) {
        let (mut fast, mut stored) = (0, 0);
        for _ in 0..pieces {
            match e.next_level(false) {
                None => stored += 1,
                Some(level) => {
                    if level == FAST_ZSTD_LEVEL && e.level != FAST_ZSTD_LEVEL {
                        fast += 1;
                    }
                    e.observe(level, 1000, (ratio * 1000.0) as usize);
                }
            }
        }
        (fast as f64 / pieces as f64, stored as f64 / pieces as f64)
    }

    #[test]
    fn data_that_barely_compresses_goes_fast_and_compressible_data_comes_back() {
        let mut e = Effort::new(1);
        assert_eq!(run(&mut e, 0.5, 100), (0.0, 0.0), "level 1 throughout");
        let (fast, stored) = run(&mut e, 0.86, 2000);
        assert!(fast > 0.85 && stored == 0.0, "barely: mostly fast ({fast})");
        // The data turns compressible: a few probes later, level 1 again.
        run(&mut e, 0.3, 200);
        assert_eq!(run(&mut e, 0.3, 100), (0.0, 0.0));
    }

    #[test]
    fn data_that_compresses_by_less_than_an_eighth_is_stored() {
        let mut e = Effort::new(1);
        let (fast, stored) = run(&mut e, 0.9, 2000);
        assert!(
            stored > 0.85 && fast < 0.05,
            "stored ({stored}), fast ({fast})"
        );
        run(&mut e, 0.3, 200);
        assert_eq!(run(&mut e, 0.3, 100), (0.0, 0.0), "compressible again");
        // Nothing hurries a piece into compression that does not pay.
        run(&mut e, 0.99, 2000);
        let hurried = (0..160).filter(|_| e.next_level(true).is_none()).count();
        assert_eq!(hurried, 150, "all but the probes");
    }

    #[test]
    fn data_that_stops_compressing_while_hurried_is_still_stored() {
        let mut e = Effort::new(1);
        assert_eq!(run(&mut e, 0.3, 100), (0.0, 0.0));
        // Always hurried from here on: the probes still find out.
        let mut stored = 0;
        for _ in 0..2000 {
            match e.next_level(true) {
                None => stored += 1,
                Some(level) => e.observe(level, 1000, 900),
            }
        }
        assert!(stored > 1500, "stored {stored} of 2000");
    }

    #[test]
    fn data_that_barely_compresses_is_stored_while_hurried() {
        let mut e = Effort::new(1);
        run(&mut e, 0.86, 200);
        let stored = (0..160).filter(|_| e.next_level(true).is_none()).count();
        assert_eq!(stored, 150, "all but the probes");
        assert_eq!(e.next_level(false), Some(FAST_ZSTD_LEVEL), "not hurried");
    }

    #[test]
    fn hurry_goes_fast_even_where_the_level_pays() {
        let mut e = Effort::new(1);
        assert_eq!(run(&mut e, 0.5, 10), (0.0, 0.0));
        assert_eq!(e.next_level(true), Some(FAST_ZSTD_LEVEL));
        assert_eq!(e.next_level(false), Some(1));
    }

    #[test]
    fn a_configured_fast_level_is_kept_or_stores() {
        for level in [FAST_ZSTD_LEVEL, -5] {
            let mut e = Effort::new(level);
            for _ in 0..100 {
                assert_eq!(e.next_level(true), Some(level));
                e.observe(level, 1000, 700);
            }
            run(&mut e, 0.99, 200);
            let stored = (0..160).filter(|_| e.next_level(false).is_none()).count();
            assert_eq!(stored, 150, "{level}: all but the probes");
        }
    }
}
