//! Deterministic test data for a device: a seeded mix of incompressible,
//! compressible and all-zero regions, in sizes from 4 KiB to several MiB.
//!
//! The plan ([`plan_fill`]) and the bytes ([`region_bytes`]) are pure
//! functions of the device size and a seed, so a test can recompute what a
//! device should hold without reading it back.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use anyhow::{ensure, Context};

use crate::loopdev::LoopDev;

/// Granularity of every region and of the generated content.
const BLOCK_BYTES: u64 = 4096;
const MIB: u64 = 1024 * 1024;
/// Smallest device [`fill_mixed`] accepts (multi-MiB regions need >= 16 MiB).
const MIN_DEVICE_BYTES: u64 = MIB;
/// Largest buffer written or compared in one call.
const CHUNK_BYTES: u64 = MIB;

/// SplitMix64 (Steele, Lea, Flood 2014; constants from Vigna's reference
/// implementation): tiny, fast, and good enough for incompressible data.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "SplitMix64::below(0)");
        self.next_u64() % bound
    }

    /// Fills `buf` with random bytes.
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// What a region of a filled device holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FillKind {
    /// PRNG output: zstd cannot shrink it.
    Random,
    /// Repeated text or a 4-letter alphabet: compresses well, never zero.
    Compressible,
    /// All zero bytes.
    Zero,
}

/// One region of a fill plan; offsets and lengths are multiples of 4096.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillRegion {
    /// Where the region starts on the device.
    pub offset_bytes: u64,
    /// How long it is.
    pub len_bytes: u64,
    /// What it holds.
    pub kind: FillKind,
}

/// What [`fill_mixed`] wrote; the three totals add up to the device size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FillReport {
    /// Bytes of incompressible random data.
    pub random_bytes: u64,
    /// Bytes of compressible, non-zero data.
    pub compressible_bytes: u64,
    /// Bytes of explicit zeros (at least 40% of the device).
    pub zero_bytes: u64,
    /// The regions, in device order, adjacent regions of one kind merged.
    pub regions: Vec<FillRegion>,
}

impl FillReport {
    fn from_regions(regions: Vec<FillRegion>) -> Self {
        let mut report = FillReport::default();
        for region in &regions {
            match region.kind {
                FillKind::Random => report.random_bytes += region.len_bytes,
                FillKind::Compressible => report.compressible_bytes += region.len_bytes,
                FillKind::Zero => report.zero_bytes += region.len_bytes,
            }
        }
        report.regions = regions;
        report
    }

    /// Total bytes covered.
    pub fn total_bytes(&self) -> u64 {
        self.random_bytes + self.compressible_bytes + self.zero_bytes
    }
}

/// Fills `dev` (a whole number of MiB; 64 MiB or more gives the full mix of
/// region sizes, 16 MiB still has multi-MiB regions) with the plan of
/// [`plan_fill`] for `seed`, then fsyncs. Zero regions are verified to read
/// as zero and written with zeros where they do not.
pub fn fill_mixed(dev: &LoopDev, seed: u64) -> anyhow::Result<FillReport> {
    let size_bytes = dev.size_bytes();
    let regions = plan_fill(size_bytes, seed)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.path())
        .with_context(|| format!("open {} for read/write", dev.path().display()))?;

    let mut buf = vec![0u8; usize::try_from(CHUNK_BYTES).expect("1 MiB fits usize")];
    let zeros = vec![0u8; buf.len()];
    for region in &regions {
        let end = region.offset_bytes + region.len_bytes;
        let mut offset = region.offset_bytes;
        while offset < end {
            let len = usize::try_from((end - offset).min(CHUNK_BYTES)).expect("chunk fits usize");
            let chunk = &mut buf[..len];
            let what = || format!("{len} bytes at {offset} of {}", dev.path().display());
            if region.kind == FillKind::Zero {
                file.read_exact_at(chunk, offset)
                    .with_context(|| format!("read {}", what()))?;
                if chunk.iter().any(|&b| b != 0) {
                    file.write_all_at(&zeros[..len], offset)
                        .with_context(|| format!("zero {}", what()))?;
                }
            } else {
                region_bytes(region.kind, seed, offset, chunk);
                file.write_all_at(chunk, offset)
                    .with_context(|| format!("write {}", what()))?;
            }
            offset += len as u64;
        }
    }
    file.sync_all()
        .with_context(|| format!("fsync {}", dev.path().display()))?;
    Ok(FillReport::from_regions(regions))
}

/// The region layout [`fill_mixed`] writes for a device of `size_bytes`.
///
/// Shares: 45% zero, 30% random, the rest (25%) compressible, each rounded
/// to 4 KiB. The first 64 KiB alternate kinds block by block, then come one
/// large region of each kind (2-4 MiB, at most half of that kind's share),
/// then seeded regions of 4 KiB to 5 MiB until every share is used up.
///
/// Errors unless `size_bytes` is a positive multiple of 1 MiB.
pub fn plan_fill(size_bytes: u64, seed: u64) -> anyhow::Result<Vec<FillRegion>> {
    ensure!(
        size_bytes.is_multiple_of(MIB) && size_bytes >= MIN_DEVICE_BYTES,
        "fill_mixed needs a device of whole MiB, got {size_bytes} bytes"
    );
    let round = |bytes: u64| bytes / BLOCK_BYTES * BLOCK_BYTES;
    let zero = round(size_bytes * 45 / 100);
    let random = round(size_bytes * 30 / 100);
    // Remaining budget per kind, indexed by kind_index().
    let mut budget = [random, size_bytes - zero - random, zero];

    const PRELUDE: [FillKind; 16] = {
        use FillKind::{Compressible as C, Random as R, Zero as Z};
        [R, Z, C, Z, R, C, Z, Z, R, C, C, Z, R, Z, C, R]
    };
    let mut steps: Vec<(FillKind, u64)> = PRELUDE.iter().map(|&k| (k, BLOCK_BYTES)).collect();
    for (kind, len) in [
        (FillKind::Random, 2 * MIB),
        (FillKind::Zero, 4 * MIB + BLOCK_BYTES),
        (FillKind::Compressible, 2 * MIB + 3 * BLOCK_BYTES),
    ] {
        steps.push((kind, len.min(round(budget[kind_index(kind)] / 2))));
    }

    let mut regions: Vec<FillRegion> = Vec::new();
    let mut offset_bytes = 0;
    let mut push = |kind: FillKind, len_bytes: u64, budget: &mut [u64; 3]| {
        if len_bytes == 0 {
            return;
        }
        budget[kind_index(kind)] -= len_bytes;
        match regions.last_mut() {
            Some(last) if last.kind == kind => last.len_bytes += len_bytes,
            _ => regions.push(FillRegion {
                offset_bytes,
                len_bytes,
                kind,
            }),
        }
        offset_bytes += len_bytes;
    };
    for (kind, len) in steps {
        push(kind, len, &mut budget);
    }

    /// Region lengths the seeded part picks from, in 4 KiB blocks.
    const LEN_BLOCKS: [u64; 10] = [1, 2, 3, 16, 33, 256, 257, 768, 1027, 1280];
    let mut rng = SplitMix64::new(seed ^ 0x7469_6465_6d61_726b); // "tidemark"
    loop {
        let remaining: u64 = budget.iter().sum();
        if remaining == 0 {
            break;
        }
        // Pick a kind weighted by its remaining budget, so that all three
        // run out at about the same time and the tail stays mixed.
        let mut pick = rng.below(remaining);
        let kind = [FillKind::Random, FillKind::Compressible, FillKind::Zero]
            .into_iter()
            .find(|&kind| {
                let left = budget[kind_index(kind)];
                if pick < left {
                    true
                } else {
                    pick -= left;
                    false
                }
            })
            .expect("pick < sum of budgets");
        let wanted = LEN_BLOCKS[rng.below(LEN_BLOCKS.len() as u64) as usize] * BLOCK_BYTES;
        let len = wanted.min(budget[kind_index(kind)]);
        push(kind, len, &mut budget);
    }
    debug_assert_eq!(offset_bytes, size_bytes);
    Ok(regions)
}

fn kind_index(kind: FillKind) -> usize {
    match kind {
        FillKind::Random => 0,
        FillKind::Compressible => 1,
        FillKind::Zero => 2,
    }
}

/// Writes into `out` the content of `kind` for the device bytes starting at
/// `offset_bytes`. Content is generated per 4 KiB block from
/// (`seed`, block offset), so any block-aligned piece of a region can be
/// produced on its own.
///
/// # Panics
/// If `offset_bytes` or `out.len()` is not a multiple of 4096.
pub fn region_bytes(kind: FillKind, seed: u64, offset_bytes: u64, out: &mut [u8]) {
    assert!(
        offset_bytes.is_multiple_of(BLOCK_BYTES) && (out.len() as u64).is_multiple_of(BLOCK_BYTES),
        "region_bytes needs 4 KiB alignment: offset {offset_bytes}, len {}",
        out.len()
    );
    for (idx, block) in out.chunks_exact_mut(BLOCK_BYTES as usize).enumerate() {
        let block_offset = offset_bytes + idx as u64 * BLOCK_BYTES;
        let mut rng = SplitMix64::new(seed.rotate_left(17) ^ block_offset);
        // Decorrelate neighbouring seeds / offsets before use.
        rng.next_u64();
        match kind {
            FillKind::Zero => block.fill(0),
            FillKind::Random => rng.fill_bytes(block),
            FillKind::Compressible => {
                if rng.next_u64() & 1 == 0 {
                    text_block(block, block_offset);
                } else {
                    // Four letters: 2 bits of entropy per byte.
                    let mut bits = 0u64;
                    for (i, byte) in block.iter_mut().enumerate() {
                        if i % 32 == 0 {
                            bits = rng.next_u64();
                        }
                        *byte = b"ACGT"[(bits & 3) as usize];
                        bits >>= 2;
                    }
                }
            }
        }
    }
}

fn text_block(block: &mut [u8], block_offset: u64) {
    let line = format!(
        "tidemark compressible block at {block_offset:#012x}: \
         the quick brown fox jumps over the lazy dog.\n"
    );
    for (dst, src) in block.iter_mut().zip(line.bytes().cycle()) {
        *dst = src;
    }
}

/// Overwrites `count` distinct 4 KiB blocks chosen at random with random
/// data; returns the blocks' zstd-1 compressed size, the least any tool
/// must send for them.
pub fn scatter_blocks(dev: &LoopDev, rng: &mut SplitMix64, count: u64) -> anyhow::Result<u64> {
    let blocks = dev.size_bytes() / 4096;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.below(blocks));
    }
    let mut compressed = 0u64;
    for b in chosen {
        let mut data = vec![0u8; 4096];
        rng.fill_bytes(&mut data);
        compressed += zstd::bulk::compress(&data, 1)?.len() as u64;
        dev.write_at(b * 4096, &data)?;
    }
    Ok(compressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(plan: &[FillRegion], seed: u64) -> Vec<u8> {
        let size = plan.last().map_or(0, |r| r.offset_bytes + r.len_bytes);
        let mut out = vec![0u8; size as usize];
        for r in plan {
            let range = r.offset_bytes as usize..(r.offset_bytes + r.len_bytes) as usize;
            region_bytes(r.kind, seed, r.offset_bytes, &mut out[range]);
        }
        out
    }

    #[test]
    fn splitmix_matches_reference() {
        // First outputs of Vigna's splitmix64.c seeded with 1234567.
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        let mut buf = [0u8; 13];
        rng.fill_bytes(&mut buf);
        assert_ne!(buf, [0u8; 13]);
    }

    #[test]
    fn plan_covers_device_with_required_mix() {
        for (size, seed) in [
            (MIB, 1),
            (16 * MIB, 3),
            (64 * MIB, 0),
            (64 * MIB, 42),
            (100 * MIB, 7),
            (257 * MIB, 99),
        ] {
            let plan = plan_fill(size, seed).expect("valid size");
            let report = FillReport::from_regions(plan.clone());
            assert_eq!(report.total_bytes(), size);
            assert!(
                report.zero_bytes * 100 >= size * 40,
                "zero share {report:?}"
            );
            assert!(report.random_bytes > 0 && report.compressible_bytes > 0);
            let mut next = 0;
            for (i, r) in plan.iter().enumerate() {
                assert_eq!(r.offset_bytes, next, "regions are contiguous");
                assert!(r.len_bytes > 0 && r.len_bytes % BLOCK_BYTES == 0);
                if i > 0 {
                    assert_ne!(plan[i - 1].kind, r.kind, "adjacent kinds are merged");
                }
                next += r.len_bytes;
            }
            assert!(plan.iter().any(|r| r.len_bytes == BLOCK_BYTES));
            if size >= 16 * MIB {
                assert!(plan.iter().any(|r| r.len_bytes >= 3 * MIB));
            }
            for kind in [FillKind::Random, FillKind::Compressible, FillKind::Zero] {
                assert!(plan.iter().filter(|r| r.kind == kind).count() >= 3);
            }
        }
    }

    #[test]
    fn plan_rejects_bad_sizes() {
        assert!(plan_fill(0, 1).is_err());
        assert!(plan_fill(64 * MIB + 4096, 1).is_err());
        assert!(plan_fill(MIB / 2, 1).is_err());
    }

    #[test]
    fn fill_is_deterministic_per_seed() {
        let size = 64 * MIB;
        let a = plan_fill(size, 5).expect("valid size");
        assert_eq!(a, plan_fill(size, 5).expect("valid size"));
        assert_ne!(a, plan_fill(size, 6).expect("valid size"));

        let bytes = bytes_of(&a, 5);
        assert_eq!(bytes, bytes_of(&a, 5));
        assert_ne!(bytes, bytes_of(&a, 6));

        // Generated piecewise (as fill_mixed does, in chunks) or whole: same bytes.
        let r = a
            .iter()
            .find(|r| r.len_bytes >= 2 * MIB)
            .expect("a large region");
        let mut whole = vec![0u8; r.len_bytes as usize];
        region_bytes(r.kind, 5, r.offset_bytes, &mut whole);
        let mut tail = vec![0u8; (r.len_bytes - MIB) as usize];
        region_bytes(r.kind, 5, r.offset_bytes + MIB, &mut tail);
        assert_eq!(&whole[MIB as usize..], &tail[..]);
    }

    #[test]
    fn kinds_have_the_promised_content() {
        let mut block = vec![0u8; BLOCK_BYTES as usize];
        for offset in (0..64).map(|i| i * BLOCK_BYTES) {
            region_bytes(FillKind::Compressible, 3, offset, &mut block);
            assert!(block.iter().all(|&b| b != 0), "compressible is never zero");
            let packed = zstd::bulk::compress(&block, 3).expect("compress");
            assert!(
                packed.len() * 2 < block.len(),
                "compressible compresses: {} -> {}",
                block.len(),
                packed.len()
            );

            region_bytes(FillKind::Random, 3, offset, &mut block);
            let packed = zstd::bulk::compress(&block, 3).expect("compress");
            assert!(packed.len() >= block.len(), "random does not compress");

            region_bytes(FillKind::Zero, 3, offset, &mut block);
            assert!(block.iter().all(|&b| b == 0));
        }
    }
}
