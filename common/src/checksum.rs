//! BLAKE3 over a block's bytes: what the checksum sync compares, where a
//! collision would leave a block unsent, and what extents carry on protocol
//! version 1 connections (version 2's CRC32C: `proto::messages::SumKind`).

/// Length in bytes of a BLAKE3 checksum.
pub const CHECKSUM_BYTES: usize = 32;

/// An extent checksum.
pub type Checksum = [u8; CHECKSUM_BYTES];

/// Checksum of `data`.
pub fn checksum(data: &[u8]) -> Checksum {
    *blake3::hash(data).as_bytes()
}

/// Longest block [`block_checksum`] recognises as zeros without hashing.
const ZERO_BLOCK_MAX: usize = 64 << 10;
static ZEROS: [u8; ZERO_BLOCK_MAX] = [0; ZERO_BLOCK_MAX];

/// The checksum of `len` zero bytes; the common 4 KiB block's is computed
/// once.
pub fn zero_checksum(len: usize) -> Checksum {
    static FOUR_KIB: std::sync::OnceLock<Checksum> = std::sync::OnceLock::new();
    if len == 4096 {
        *FOUR_KIB.get_or_init(|| checksum(&ZEROS[..4096]))
    } else if len <= ZERO_BLOCK_MAX {
        checksum(&ZEROS[..len])
    } else {
        checksum(&vec![0u8; len])
    }
}

/// [`checksum`] of one block, where an all-zero block (a disk's unused
/// space: compared far faster than hashed) costs no hashing.
pub fn block_checksum(block: &[u8]) -> Checksum {
    if block.len() <= ZERO_BLOCK_MAX && block == &ZEROS[..block.len()] {
        zero_checksum(block.len())
    } else {
        checksum(block)
    }
}

/// [`block_checksum`] of each `block`-byte piece of `data` (the last may be
/// shorter), appended to `out`.
///
/// Hashing one 4 KiB block fills only 4 of the 16 lanes BLAKE3's AVX-512
/// code hashes side by side (its lanes are 1 KiB chunks), so a checksum
/// sync hashed at about half the speed BLAKE3 reaches on large inputs. Here
/// the chunks of many blocks go through the lanes together, then their
/// parents, level by level: the same tree, the same digests, all lanes
/// busy. That needs `blake3::platform`, which the crate marks unstable; the
/// workspace pins blake3's exact version for it, and the tests hold every
/// digest to `blake3::hash`.
pub fn block_checksums(data: &[u8], block: usize, out: &mut Vec<Checksum>) {
    let chunks = block / blake3::CHUNK_LEN;
    // From 16 KiB on a block fills the lanes by itself (and a large one
    // would make the scratch space large).
    let batched = block.is_multiple_of(blake3::CHUNK_LEN)
        && (2..=8).contains(&chunks)
        && chunks.is_power_of_two();
    if !batched {
        out.extend(data.chunks(block).map(block_checksum));
        return;
    }
    let platform = blake3::platform::Platform::detect();
    // Indices (into `out`) and bytes of the full, non-zero blocks of one
    // batch; a batch bounds the scratch memory, not the parallelism.
    const BATCH: usize = 256;
    let mut pending: Vec<(usize, &[u8])> = Vec::with_capacity(BATCH);
    let mut tree = Tree::default();
    for piece in data.chunks(block) {
        if piece.len() < block {
            out.push(block_checksum(piece));
            continue;
        }
        if piece == &ZEROS[..block] {
            out.push(zero_checksum(block));
            continue;
        }
        pending.push((out.len(), piece));
        out.push([0; CHECKSUM_BYTES]);
        if pending.len() == BATCH {
            tree.hash(&platform, &pending, chunks, out);
            pending.clear();
        }
    }
    tree.hash(&platform, &pending, chunks, out);
}

// Domain flags of the BLAKE3 specification, section 2.1.
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;
// The initialisation vector, which is also the key of the plain hash mode.
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];

/// Scratch space of [`block_checksums`], reused from batch to batch.
#[derive(Default)]
struct Tree {
    /// Chaining values of one level: node `j` of block `i` at
    /// `(j * blocks + i) * 32`.
    level: Vec<u8>,
    next: Vec<u8>,
    parents: Vec<[u8; 64]>,
}

impl Tree {
    fn hash(
        &mut self,
        platform: &blake3::platform::Platform,
        blocks: &[(usize, &[u8])],
        chunks: usize,
        out: &mut [Checksum],
    ) {
        let n = blocks.len();
        if n == 0 {
            return;
        }
        const CV: usize = blake3::OUT_LEN;
        // Leaves: chunk j of every block, with the chunk counter j.
        self.level.resize(chunks * n * CV, 0);
        let mut inputs: Vec<&[u8; blake3::CHUNK_LEN]> = Vec::with_capacity(n);
        for j in 0..chunks {
            inputs.clear();
            inputs.extend(blocks.iter().map(|(_, b)| {
                let c = &b[j * blake3::CHUNK_LEN..(j + 1) * blake3::CHUNK_LEN];
                <&[u8; blake3::CHUNK_LEN]>::try_from(c).expect("chunk is CHUNK_LEN bytes")
            }));
            platform.hash_many(
                &inputs,
                &IV,
                j as u64,
                blake3::IncrementCounter::No,
                0,
                CHUNK_START,
                CHUNK_END,
                &mut self.level[j * n * CV..(j + 1) * n * CV],
            );
        }
        // Parents, a level at a time, up to the root.
        let mut width = chunks;
        while width > 1 {
            width /= 2;
            let flags = if width == 1 { PARENT | ROOT } else { PARENT };
            self.next.resize(width * n * CV, 0);
            for q in 0..width {
                self.parents.clear();
                self.parents.extend((0..n).map(|i| {
                    let mut p = [0u8; 64];
                    let left = (2 * q * n + i) * CV;
                    let right = ((2 * q + 1) * n + i) * CV;
                    p[..CV].copy_from_slice(&self.level[left..left + CV]);
                    p[CV..].copy_from_slice(&self.level[right..right + CV]);
                    p
                }));
                let inputs: Vec<&[u8; 64]> = self.parents.iter().collect();
                platform.hash_many(
                    &inputs,
                    &IV,
                    0,
                    blake3::IncrementCounter::No,
                    flags,
                    0,
                    0,
                    &mut self.next[q * n * CV..(q + 1) * n * CV],
                );
            }
            std::mem::swap(&mut self.level, &mut self.next);
        }
        for (i, (at, _)) in blocks.iter().enumerate() {
            out[*at].copy_from_slice(&self.level[i * CV..(i + 1) * CV]);
        }
    }
}

/// The checksum of `parts` concatenated, without concatenating them.
pub fn checksum_parts(parts: &[&[u8]]) -> Checksum {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

/// Lower-case hex, for logs and error messages.
pub fn to_hex(sum: &Checksum) -> String {
    sum.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_skip_hashing_but_not_correctness() {
        for len in [1usize, 512, 4095, 4096, 65536, 65537] {
            let zero = vec![0u8; len];
            assert_eq!(block_checksum(&zero), checksum(&zero), "{len}");
            assert_eq!(zero_checksum(len), checksum(&zero), "{len}");
            let mut one = zero.clone();
            one[len - 1] = 1;
            assert_eq!(block_checksum(&one), checksum(&one), "{len}");
        }
    }

    #[test]
    fn batched_block_checksums_equal_blake3_of_each_block() {
        // Random-looking data with zero blocks, a short tail, and more
        // blocks than one batch; every block size the batching takes and
        // some it leaves to the plain path.
        let mut data: Vec<u8> = (0..(300 * 4096 + 1000) as u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        data[4096..3 * 4096].fill(0);
        data[299 * 4096..300 * 4096].fill(0);
        for block in [512usize, 1024, 2048, 3072, 4096, 8192, 65536, 131072] {
            let mut got = Vec::new();
            block_checksums(&data, block, &mut got);
            let want: Vec<Checksum> = data.chunks(block).map(checksum).collect();
            assert_eq!(got, want, "block {block}");
        }
        let mut none = Vec::new();
        block_checksums(&[], 4096, &mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn known_vector() {
        // BLAKE3 of the empty input, from the BLAKE3 reference test vectors.
        assert_eq!(
            to_hex(&checksum(b"")),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn differs_on_one_bit() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[4095] = 1;
        assert_ne!(checksum(&a), checksum(&b));
    }
}
