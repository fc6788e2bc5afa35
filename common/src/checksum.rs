//! The checksum every extent carries: BLAKE3 over the uncompressed bytes.
//! Strong enough to detect any corruption between the agent's read and the
//! receiver's write, and faster than the disks it protects (several GB/s per
//! core), so it never is the bottleneck.

/// Length in bytes of an extent checksum.
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
