//! How hard to compress the next piece: the configured zstd level, or the
//! fast one where the data barely compresses at all.
//!
//! On data that barely compresses (encrypted, already compressed, media;
//! fio's buffers) zstd's level 1 and its fast level −3 end within a few
//! per cent of each other (0.886 against 0.904 of the size on fio's
//! 64 KiB writes) while level 1 costs 2.4 times the CPU; on ordinary files
//! level 1 saves a seventh more (0.540 against 0.613). docs/BENCHMARKS.md
//! has the figures. So the configured level is kept while it pays and
//! probed now and then while it does not.

use crate::FAST_ZSTD_LEVEL;

/// Above this share of the input left after compressing at the configured
/// level, the fast level is used instead: what the configured level saves
/// over it is then a few per cent of the bytes.
const BARELY: f64 = 0.85;
/// While on the fast level, one piece in this many is still compressed at
/// the configured level, so that data turning compressible is noticed.
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

    /// The level for the next piece; the fast one also with `hurry`
    /// (compression is what the pipeline waits for).
    pub fn next_level(&mut self, hurry: bool) -> i32 {
        if self.level <= FAST_ZSTD_LEVEL {
            return self.level;
        }
        if hurry {
            return FAST_ZSTD_LEVEL;
        }
        if self.ratio < BARELY {
            return self.level;
        }
        self.since_probe += 1;
        if self.since_probe >= PROBE_EVERY {
            self.since_probe = 0;
            self.level
        } else {
            FAST_ZSTD_LEVEL
        }
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

    /// Feeds pieces compressing to `ratio` at the configured level and to
    /// slightly more at the fast one; returns the share at the fast level.
    fn run(e: &mut Effort, ratio: f64, pieces: usize) -> f64 {
        let mut fast = 0;
        for _ in 0..pieces {
            let level = e.next_level(false);
            if level == FAST_ZSTD_LEVEL {
                fast += 1;
                e.observe(level, 1000, (ratio * 1100.0) as usize);
            } else {
                e.observe(level, 1000, (ratio * 1000.0) as usize);
            }
        }
        fast as f64 / pieces as f64
    }

    #[test]
    fn data_that_barely_compresses_goes_fast_and_compressible_data_comes_back() {
        let mut e = Effort::new(1);
        assert_eq!(
            run(&mut e, 0.5, 100),
            0.0,
            "compressible: level 1 throughout"
        );
        let fast = run(&mut e, 0.95, 2000);
        assert!(fast > 0.85, "barely compressible: mostly fast ({fast})");
        // The data turns compressible: a few probes later, level 1 again.
        run(&mut e, 0.3, 200);
        assert_eq!(run(&mut e, 0.3, 100), 0.0);
    }

    #[test]
    fn hurry_goes_fast_even_where_the_level_pays() {
        let mut e = Effort::new(1);
        assert_eq!(run(&mut e, 0.5, 10), 0.0);
        assert_eq!(e.next_level(true), FAST_ZSTD_LEVEL);
        assert_eq!(e.next_level(false), 1);
    }

    #[test]
    fn a_configured_fast_level_is_kept() {
        for level in [FAST_ZSTD_LEVEL, -5] {
            let mut e = Effort::new(level);
            for _ in 0..100 {
                assert_eq!(e.next_level(true), level);
                e.observe(level, 1000, 990);
            }
        }
    }
}
