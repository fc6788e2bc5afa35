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
