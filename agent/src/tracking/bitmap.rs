//! The dirty map: one bit per granule of a disk, kept sparse.
//!
//! The granule: [`granularity_for`] picks the smallest power of two ≥ 4 KiB
//! whose dense bitmap stays within [`MAX_MAP_BYTES`] (4 KiB up to 256 GiB
//! disks, 64 KiB at 4 TiB, 256 KiB at 16 TiB). Small granules matter: a
//! random 4 KiB write costs one granule of reading and shipping.
//!
//! Storage: granules are grouped in chunks of [`CHUNK_GRANULES`]; a chunk
//! is clean, full, or a 512-byte bitmap, so memory follows what is dirty
//! rather than the disk's size. A 4 TiB disk costs its 256 KiB chunk index
//! when clean or wholly dirty (an initial sync), and at most the dense
//! 8 MiB when writes are scattered over all of it. The saved form is sparse
//! the same way: the map is saved every cycle with changes, and a 4 TiB map
//! is 68 bytes to write and fsync when clean and 80 KiB when wholly dirty,
//! instead of 8 MiB either way.

use std::io::Write;
use std::ops::Range;

/// The granule for a 4 TiB disk, where the dense map reaches
/// [`MAX_MAP_BYTES`]: 4 TiB / 64 KiB = 2^26 bits = 8 MiB. Smaller disks get
/// smaller granules from [`granularity_for`].
pub const DEFAULT_GRANULARITY_BYTES: u64 = 64 << 10;
/// The smallest granule: a page, the unit of buffered writeback.
pub const MIN_GRANULARITY_BYTES: u64 = 4096;
/// Most bitmap memory per disk that [`granularity_for`] allows (were every
/// chunk scattered-dirty at once).
pub const MAX_MAP_BYTES: u64 = 8 << 20;

/// Granules per chunk: 64 words, a 512-byte bitmap, 16 MiB of disk at
/// 4 KiB granules. Small enough that a scattered write costs little, large
/// enough that the index stays small (16 bytes per chunk: 256 KiB at 4 TiB).
pub const CHUNK_GRANULES: u64 = 4096;
const CHUNK_WORDS: usize = (CHUNK_GRANULES / 64) as usize;

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
/// v1: header, every word (dense), BLAKE3; still read, so that an upgraded
/// agent resumes from its predecessor's state without a resync.
const VERSION_DENSE: u32 = 1;
/// v2: header, then one record per chunk that is not clean, in ascending
/// order — u32 chunk index, u8 kind ([`RECORD_FULL`] or [`RECORD_BITS`],
/// the latter followed by the chunk's 64 words) — then BLAKE3.
const VERSION: u32 = 2;
const RECORD_FULL: u8 = 1;
const RECORD_BITS: u8 = 2;
/// Header: magic, u32 version, u64 granularity, u64 size, u64 count of set
/// bits; all little-endian.
const HEADER_BYTES: usize = 8 + 4 + 8 + 8 + 8;
/// BLAKE3 over header and body, at the end.
const CHECKSUM_BYTES: usize = 32;
/// Bytes buffered at a time when saving.
const WRITE_CHUNK_BYTES: usize = 64 << 10;

/// A chunk's granules. Canonical: `Bits` holds at least one and fewer than
/// all of the chunk's granules, so equal maps have equal chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Clean,
    Full,
    Bits(Box<Bits>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits {
    words: [u64; CHUNK_WORDS],
    set: u32,
}

impl Bits {
    fn zero() -> Box<Bits> {
        Box::new(Bits {
            words: [0; CHUNK_WORDS],
            set: 0,
        })
    }

    /// The first `granules` bits set.
    fn ones(granules: u64) -> Box<Bits> {
        let mut b = Bits::zero();
        for (w, mask) in word_masks(0..granules) {
            b.words[w] = mask;
        }
        b.set = granules as u32;
        b
    }

    /// Sets the bits of `mask` in word `w`; returns how many were new.
    fn or(&mut self, w: usize, mask: u64) -> u32 {
        let new = (mask & !self.words[w]).count_ones();
        self.words[w] |= mask;
        self.set += new;
        new
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    size_bytes: u64,
    granularity_bytes: u64,
    chunks: Vec<Chunk>,
    /// Number of set bits.
    set: u64,
    /// Every chunk below this index is clean (a scan start for `take`).
    low_chunk: usize,
}

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
        let chunks = chunk_count(size_bytes, granularity_bytes);
        let chunks = usize::try_from(chunks).expect("dirty map fits in memory");
        DirtyMap {
            size_bytes,
            granularity_bytes,
            chunks: vec![Chunk::Clean; chunks],
            set: 0,
            low_chunk: chunks,
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

    /// Granules in chunk `c` (the last one may hold fewer).
    fn capacity(&self, c: usize) -> u64 {
        (self.granules() - c as u64 * CHUNK_GRANULES).min(CHUNK_GRANULES)
    }

    /// Bytes of memory the chunks hold beyond the index (what scattered
    /// writes cost).
    #[cfg(test)]
    fn bitmap_bytes(&self) -> usize {
        self.chunks
            .iter()
            .filter(|c| matches!(c, Chunk::Bits(_)))
            .count()
            * std::mem::size_of::<Bits>()
    }

    /// Marks a byte range, rounded out to whole granules, clipped to the disk.
    pub fn mark(&mut self, range: Range<u64>) {
        let mut spans = chunk_spans(range, self.size_bytes, self.granularity_bytes).peekable();
        if let Some(&(c0, _)) = spans.peek() {
            self.low_chunk = self.low_chunk.min(c0);
        }
        for (c, Range { start: lo, end: hi }) in spans {
            let cap = self.capacity(c);
            let chunk = &mut self.chunks[c];
            if lo == 0 && hi == cap {
                // A whole chunk: no bit work, however large the range.
                let had = match chunk {
                    Chunk::Clean => 0,
                    Chunk::Full => cap,
                    Chunk::Bits(b) => u64::from(b.set),
                };
                self.set += cap - had;
                *chunk = Chunk::Full;
                continue;
            }
            let bits = match chunk {
                Chunk::Full => continue,
                Chunk::Clean => {
                    *chunk = Chunk::Bits(Bits::zero());
                    let Chunk::Bits(b) = chunk else {
                        unreachable!()
                    };
                    b
                }
                Chunk::Bits(b) => b,
            };
            for (w, mask) in word_masks(lo..hi) {
                self.set += u64::from(bits.or(w, mask));
            }
            if u64::from(bits.set) == cap {
                *chunk = Chunk::Full;
            }
        }
    }

    /// The same dirty granules on a disk grown to `size_bytes` (the new
    /// range clean: the caller decides what it holds). The granule
    /// coarsens if the grown disk's map would pass [`MAX_MAP_BYTES`]; a
    /// coarser granule only ever widens what is dirty.
    pub fn grown(&self, size_bytes: u64) -> DirtyMap {
        let gran = self.granularity_bytes.max(granularity_for(size_bytes));
        let mut out = DirtyMap::new(size_bytes.max(self.size_bytes), gran);
        let mut copy = self.clone();
        if gran == self.granularity_bytes && self.granules().is_multiple_of(CHUNK_GRANULES) {
            // Chunk boundaries stay where they were: move the chunks.
            let n = copy.chunks.len();
            for (to, from) in out.chunks[..n].iter_mut().zip(copy.chunks) {
                *to = from;
            }
            out.set = self.set;
            out.low_chunk = if self.set == 0 {
                out.chunks.len()
            } else {
                self.low_chunk
            };
        } else {
            // The old last chunk was short (it is not in the grown map) or
            // the granule changed: mark range by range.
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
        let last_set = match &self.chunks[(last / CHUNK_GRANULES) as usize] {
            Chunk::Clean => false,
            Chunk::Full => true,
            Chunk::Bits(b) => {
                let i = last % CHUNK_GRANULES;
                b.words[(i / 64) as usize] & (1 << (i % 64)) != 0
            }
        };
        if last_set {
            full - (self.granules() * self.granularity_bytes - self.size_bytes)
        } else {
            full
        }
    }

    /// Bytes of `range` that are dirty, counted by whole granules and at
    /// most the range's own length (clipped to the disk).
    pub fn dirty_bytes_in(&self, range: Range<u64>) -> u64 {
        let len = range.end.min(self.size_bytes).saturating_sub(range.start);
        let granules: u64 = chunk_spans(range, self.size_bytes, self.granularity_bytes)
            .map(|(c, span)| match &self.chunks[c] {
                Chunk::Clean => 0,
                Chunk::Full => span.end - span.start,
                Chunk::Bits(b) => word_masks(span)
                    .map(|(w, mask)| u64::from((b.words[w] & mask).count_ones()))
                    .sum(),
            })
            .sum();
        (granules * self.granularity_bytes).min(len)
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
        let mut c = self.low_chunk;
        'chunks: while c < self.chunks.len() && self.set > 0 && max_bytes > 0 {
            let base = c as u64 * CHUNK_GRANULES;
            let cap = self.capacity(c);
            match &mut self.chunks[c] {
                Chunk::Clean => {
                    c += 1;
                    continue;
                }
                Chunk::Full => {
                    let bytes = ((base + cap) * gran).min(self.size_bytes) - base * gran;
                    if taken + bytes <= max_bytes {
                        push_granules(&mut out, base..base + cap, gran, self.size_bytes, per_range);
                        taken += bytes;
                        self.set -= cap;
                        self.chunks[c] = Chunk::Clean;
                        c += 1;
                        continue;
                    }
                    // The budget ends inside this chunk: granule by granule.
                    self.chunks[c] = Chunk::Bits(Bits::ones(cap));
                }
                Chunk::Bits(_) => {}
            }
            let Chunk::Bits(bits) = &mut self.chunks[c] else {
                unreachable!("a full chunk was just made bits")
            };
            for w in 0..CHUNK_WORDS {
                while bits.words[w] != 0 {
                    let b = u64::from(bits.words[w].trailing_zeros());
                    let g = base + w as u64 * 64 + b;
                    let len = ((g + 1) * gran).min(self.size_bytes) - g * gran;
                    if taken > 0 && taken + len > max_bytes {
                        break 'chunks;
                    }
                    bits.words[w] &= !(1 << b);
                    bits.set -= 1;
                    self.set -= 1;
                    taken += len;
                    push_granules(&mut out, g..g + 1, gran, self.size_bytes, per_range);
                }
            }
            self.chunks[c] = Chunk::Clean;
            c += 1;
        }
        // The chunk the budget ran out in stays canonical (a full chunk made
        // bits may have had nothing taken from it).
        if let Some(Chunk::Bits(b)) = self.chunks.get(c) {
            if b.set == 0 {
                self.chunks[c] = Chunk::Clean;
            } else if u64::from(b.set) == self.capacity(c) {
                self.chunks[c] = Chunk::Full;
            }
        }
        self.low_chunk = if self.set == 0 { self.chunks.len() } else { c };
        out
    }

    /// Versioned, checksummed bytes for the state file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&[], &mut out)
            .expect("writing to a Vec succeeds");
        out
    }

    /// Writes [`DirtyMap::to_bytes`] of this map with `also` marked (the
    /// extents in flight, saved every cycle), without copying the map:
    /// only the chunks `also` touches are merged into a temporary copy.
    pub fn write_to(&self, also: &[Range<u64>], out: &mut dyn Write) -> std::io::Result<()> {
        let mut extra = std::collections::BTreeMap::<usize, Box<Bits>>::new();
        for r in also {
            for (c, local) in chunk_spans(r.clone(), self.size_bytes, self.granularity_bytes) {
                if self.chunks[c] == Chunk::Full {
                    continue;
                }
                let m = extra.entry(c).or_insert_with(|| match &self.chunks[c] {
                    Chunk::Bits(b) => b.clone(),
                    _ => Bits::zero(),
                });
                for (w, mask) in word_masks(local) {
                    m.or(w, mask);
                }
            }
        }
        let added: u64 = extra
            .iter()
            .map(|(&c, m)| {
                let had = match &self.chunks[c] {
                    Chunk::Bits(b) => b.set,
                    _ => 0,
                };
                u64::from(m.set - had)
            })
            .sum();
        let mut sum = blake3::Hasher::new();
        let mut buf = Vec::with_capacity(WRITE_CHUNK_BYTES + 8 * CHUNK_WORDS + 5);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&self.granularity_bytes.to_le_bytes());
        buf.extend_from_slice(&self.size_bytes.to_le_bytes());
        buf.extend_from_slice(&(self.set + added).to_le_bytes());
        let mut extra = extra.into_iter().peekable();
        for (c, chunk) in self.chunks.iter().enumerate() {
            let merged = extra.next_if(|(at, _)| *at == c).map(|(_, m)| m);
            let bits = match (chunk, &merged) {
                (Chunk::Full, _) => None,
                (_, Some(m)) if u64::from(m.set) == self.capacity(c) => None,
                (_, Some(m)) => Some(&**m),
                (Chunk::Bits(b), None) => Some(&**b),
                (Chunk::Clean, None) => continue,
            };
            buf.extend_from_slice(&(c as u32).to_le_bytes());
            match bits {
                None => buf.push(RECORD_FULL),
                Some(b) => {
                    buf.push(RECORD_BITS);
                    for w in b.words {
                        buf.extend_from_slice(&w.to_le_bytes());
                    }
                }
            }
            if buf.len() >= WRITE_CHUNK_BYTES {
                sum.update(&buf);
                out.write_all(&buf)?;
                buf.clear();
            }
        }
        sum.update(&buf);
        out.write_all(&buf)?;
        out.write_all(sum.finalize().as_bytes())
    }

    /// Reads what [`DirtyMap::to_bytes`] wrote (or the dense v1 form of
    /// earlier agents). Never panics; allocates only for a map whose dense
    /// form would fit [`MAX_MAP_BYTES`] (v2) or whose length matches its
    /// header (v1).
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
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        let (gran, size, set) = (u64_at(body, 12), u64_at(body, 20), u64_at(body, 28));
        if !gran.is_power_of_two() || gran < MIN_GRANULARITY_BYTES {
            return Err(format!("dirty map granularity {gran} is invalid"));
        }
        let records = &body[HEADER_BYTES..];
        let map = match version {
            VERSION => {
                if word_count(size, gran).saturating_mul(8) > MAX_MAP_BYTES {
                    return Err(format!(
                        "dirty map granularity {gran} is too fine for a disk of {size} bytes"
                    ));
                }
                DirtyMap::from_records(size, gran, records)?
            }
            VERSION_DENSE => DirtyMap::from_dense(size, gran, records)?,
            _ => return Err(format!("dirty map version {version} is not supported")),
        };
        if map.set != set {
            return Err(format!(
                "dirty map says {set} dirty granules, its bits say {}",
                map.set
            ));
        }
        Ok(map)
    }

    fn from_records(size: u64, gran: u64, mut rec: &[u8]) -> Result<DirtyMap, String> {
        let mut map = DirtyMap::new(size, gran);
        let mut next = 0usize; // records are ascending and unique
        while !rec.is_empty() {
            if rec.len() < 5 {
                return Err("dirty map ends inside a chunk record".into());
            }
            let c = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")) as usize;
            if c < next || c >= map.chunks.len() {
                return Err(format!(
                    "dirty map chunk {c} is out of order or past the end of its disk"
                ));
            }
            next = c + 1;
            let cap = map.capacity(c);
            match rec[4] {
                RECORD_FULL => {
                    map.chunks[c] = Chunk::Full;
                    map.set += cap;
                    rec = &rec[5..];
                }
                RECORD_BITS if rec.len() >= 5 + 8 * CHUNK_WORDS => {
                    let mut bits = Bits::zero();
                    for (w, word) in rec[5..5 + 8 * CHUNK_WORDS].chunks_exact(8).enumerate() {
                        bits.or(w, u64_at(word, 0));
                    }
                    rec = &rec[5 + 8 * CHUNK_WORDS..];
                    if bits.set == 0 || u64::from(bits.set) >= cap {
                        return Err(format!("dirty map chunk {c} is not in canonical form"));
                    }
                    map.set += u64::from(bits.set);
                    map.chunks[c] = Chunk::Bits(bits);
                    check_no_bits_past(&map, c)?;
                }
                RECORD_BITS => return Err("dirty map ends inside a chunk record".into()),
                k => return Err(format!("dirty map chunk {c} has unknown kind {k}")),
            }
            map.low_chunk = map.low_chunk.min(c);
        }
        Ok(map)
    }

    /// The v1 form: every word of a dense bitmap.
    fn from_dense(size: u64, gran: u64, words: &[u8]) -> Result<DirtyMap, String> {
        let want = word_count(size, gran).saturating_mul(8);
        if words.len() as u64 != want {
            return Err(format!(
                "dirty map has {} bytes of bits, its disk of {size} bytes at {gran} needs {want}",
                words.len(),
            ));
        }
        let granules = size.div_ceil(gran);
        if !granules.is_multiple_of(64) && words.len() >= 8 {
            let last = u64_at(words, words.len() - 8);
            if last >> (granules % 64) != 0 {
                return Err("dirty map has bits past the end of its disk".into());
            }
        }
        let mut map = DirtyMap::new(size, gran);
        for (c, chunk_words) in words.chunks(8 * CHUNK_WORDS).enumerate() {
            let mut bits = Bits::zero();
            for (w, word) in chunk_words.chunks_exact(8).enumerate() {
                bits.or(w, u64_at(word, 0));
            }
            map.set += u64::from(bits.set);
            map.chunks[c] = match u64::from(bits.set) {
                0 => Chunk::Clean,
                n if n == map.capacity(c) => Chunk::Full,
                _ => Chunk::Bits(bits),
            };
            if map.chunks[c] != Chunk::Clean {
                map.low_chunk = map.low_chunk.min(c);
            }
        }
        Ok(map)
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A saved last chunk may not hold bits past the disk's last granule.
fn check_no_bits_past(map: &DirtyMap, c: usize) -> Result<(), String> {
    let cap = map.capacity(c);
    let Chunk::Bits(b) = &map.chunks[c] else {
        return Ok(());
    };
    let past = b.words.iter().enumerate().any(|(w, &word)| {
        let first = w as u64 * 64;
        if first >= cap {
            word != 0
        } else if first + 64 > cap {
            word >> (cap - first) != 0
        } else {
            false
        }
    });
    if past {
        return Err("dirty map has bits past the end of its disk".into());
    }
    Ok(())
}

/// The chunks a byte range touches (clipped to a disk of `size` bytes,
/// rounded out to whole granules), each with the range of its own
/// granules it covers.
fn chunk_spans(
    range: Range<u64>,
    size: u64,
    gran: u64,
) -> impl Iterator<Item = (usize, Range<u64>)> {
    let end = range.end.min(size);
    let (g0, g1) = if range.start < end {
        (range.start / gran, end.div_ceil(gran))
    } else {
        (0, 0)
    };
    let chunks = if g0 < g1 {
        g0 / CHUNK_GRANULES..(g1 - 1) / CHUNK_GRANULES + 1
    } else {
        0..0
    };
    chunks.map(move |c| {
        let base = c * CHUNK_GRANULES;
        (
            c as usize,
            g0.max(base) - base..(g1 - base).min(CHUNK_GRANULES),
        )
    })
}

/// Appends granules `g` to `out` as byte ranges (clipped to the disk),
/// extending the last range when adjacent, each at most `per_range`
/// granules long.
fn push_granules(
    out: &mut Vec<Range<u64>>,
    mut g: Range<u64>,
    gran: u64,
    size: u64,
    per_range: u64,
) {
    while g.start < g.end {
        let start = g.start * gran;
        let room = match out.last() {
            Some(last) if last.end == start && (last.end - last.start) / gran < per_range => {
                per_range - (last.end - last.start) / gran
            }
            _ => {
                out.push(start..start);
                per_range
            }
        };
        let n = room.min(g.end - g.start);
        g.start += n;
        out.last_mut().expect("pushed above").end = (g.start * gran).min(size);
    }
}

/// The words a granule range within one chunk (non-empty) covers, each
/// with the bits of its granules in the range: a whole word at a time.
fn word_masks(range: Range<u64>) -> impl Iterator<Item = (usize, u64)> {
    let last = range.end; // exclusive
    let mut g = range.start;
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

/// u64 words of the dense bitmap of a disk.
fn word_count(size_bytes: u64, granularity_bytes: u64) -> u64 {
    size_bytes.div_ceil(granularity_bytes).div_ceil(64)
}

/// Chunks of a disk's map.
fn chunk_count(size_bytes: u64, granularity_bytes: u64) -> u64 {
    size_bytes
        .div_ceil(granularity_bytes)
        .div_ceil(CHUNK_GRANULES)
}
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dirty_bytes_in_counts_whole_granules_within_the_range() {
        const G: u64 = 4096;
        let size = (2 * CHUNK_GRANULES + 10) * G;
        let mut m = DirtyMap::new(size, G);
        assert_eq!(m.dirty_bytes_in(0..size), 0, "clean");
        m.mark(3 * G..5 * G); // bits in chunk 0
        m.mark(CHUNK_GRANULES * G..2 * CHUNK_GRANULES * G); // chunk 1 full
        m.mark(size - 100..size); // the last granule, in chunk 2
        assert_eq!(m.dirty_bytes_in(0..size), m.dirty_bytes());
        assert_eq!(m.dirty_bytes(), (2 + CHUNK_GRANULES + 1) * G);
        assert_eq!(m.dirty_bytes_in(0..4 * G), G);
        assert_eq!(
            m.dirty_bytes_in(4 * G + 1..4 * G + 2),
            1,
            "at most the range"
        );
        assert_eq!(m.dirty_bytes_in(5 * G..CHUNK_GRANULES * G), 0);
        assert_eq!(
            m.dirty_bytes_in(CHUNK_GRANULES * G - G..CHUNK_GRANULES * G + 3 * G),
            3 * G,
            "across a chunk boundary into a full chunk"
        );
        assert_eq!(
            m.dirty_bytes_in(size - G..size + G),
            G,
            "clipped to the disk"
        );
        assert_eq!(m.dirty_bytes_in(size..size + G), 0);
    }

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

    /// Granules (ascending) as coalesced byte ranges of at most
    /// `per_range` granules, clipped to `size`.
    fn model_ranges(granules: &[u64], size: u64, per_range: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for &g in granules {
            let (s, e) = (g * G, ((g + 1) * G).min(size));
            match out.last_mut() {
                Some(l) if l.end == s && (l.end - l.start) / G < per_range => l.end = e,
                _ => out.push(s..e),
            }
        }
        out
    }

    /// Disks of up to three and a bit chunks, so that marks and takes
    /// cross chunk boundaries, fill chunks and end inside them.
    const SPAN: u64 = (3 * CHUNK_GRANULES + 300) * G;

    /// A mark, a take or a mark-all, as (op, a, b).
    fn op() -> impl Strategy<Value = (u8, u64, u64)> {
        prop_oneof![
            3 => (0u64..SPAN + 20 * G, 1u64..(70 * G)).prop_map(|(s, l)| (0u8, s, l)),
            1 => (0u64..SPAN + 20 * G, 1u64..(CHUNK_GRANULES + 100) * G)
                .prop_map(|(s, l)| (0u8, s, l)),
            2 => (1u64..(CHUNK_GRANULES + 50) * G, 1u64..(300 * G)).prop_map(|(b, r)| (1u8, b, r)),
            1 => Just((2u8, 0, 0)),
        ]
    }

    /// Runs [`op`]s on a map, without a model.
    fn apply(m: &mut DirtyMap, ops: &[(u8, u64, u64)]) {
        for &(op, a, b) in ops {
            match op {
                0 => m.mark(a..a + b),
                1 => drop(m.take(a, b)),
                _ => m.mark_all(),
            }
        }
    }

    proptest! {
        #[test]
        fn matches_a_set_model(
            size in 1u64..SPAN,
            ops in proptest::collection::vec(op(), 0..30),
        ) {
            let mut m = DirtyMap::new(size, G);
            let granules = size.div_ceil(G);
            let mut model = vec![false; granules as usize];
            let len_of = |g: u64| ((g + 1) * G).min(size) - g * G;
            for (op, a, b) in ops {
                match op {
                    0 => {
                        let (start, len) = (a, b);
                        m.mark(start..start + len);
                        let end = (start + len).min(size);
                        if start < end {
                            for g in start / G..end.div_ceil(G) {
                                model[g as usize] = true;
                            }
                        }
                    }
                    1 => {
                        let (budget, max_range) = (a, b);
                        let got = m.take(budget, max_range);
                        // The model: the lowest granules within the budget.
                        let mut taken = Vec::new();
                        let mut bytes = 0;
                        for g in 0..granules {
                            if !model[g as usize] { continue; }
                            if bytes > 0 && bytes + len_of(g) > budget { break; }
                            model[g as usize] = false;
                            taken.push(g);
                            bytes += len_of(g);
                        }
                        let want = model_ranges(&taken, size, (max_range / G).max(1));
                        prop_assert_eq!(got, want);
                    }
                    _ => {
                        m.mark_all();
                        model.iter_mut().for_each(|b| *b = true);
                    }
                }
                let dirty: Vec<u64> = (0..granules).filter(|&g| model[g as usize]).collect();
                prop_assert_eq!(m.set, dirty.len() as u64);
                prop_assert_eq!(m.dirty_bytes(), dirty.iter().map(|&g| len_of(g)).sum::<u64>());
                prop_assert_eq!(m.is_clean(), dirty.is_empty());
                // Every chunk canonical: the saved form refuses anything else.
                let back = DirtyMap::from_bytes(&m.to_bytes()).expect("round trip");
                prop_assert_eq!(&back, &m);
                prop_assert_eq!(back.set, m.set);
            }
            // Drain whatever is left in pieces: every granule once, in order.
            let mut got = Vec::new();
            loop {
                let ranges = m.take(50 * G, 30 * G);
                if ranges.is_empty() { break; }
                for r in ranges {
                    prop_assert!(r.end - r.start <= 30 * G && r.end <= size);
                    got.extend(r.start / G..r.end.div_ceil(G));
                }
            }
            prop_assert_eq!(got, (0..granules).filter(|&g| model[g as usize]).collect::<Vec<_>>());
            prop_assert!(m.is_clean());
            prop_assert_eq!(m.bitmap_bytes(), 0);
        }

        #[test]
        fn saving_with_ranges_marked_is_saving_a_marked_copy(
            size in 1u64..SPAN,
            dirty in proptest::collection::vec(op(), 0..8),
            also in proptest::collection::vec((0u64..SPAN + 20 * G, 0u64..(CHUNK_GRANULES + 100) * G), 0..6),
        ) {
            let mut m = DirtyMap::new(size, G);
            apply(&mut m, &dirty);
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
        fn a_grown_map_holds_the_same_granules(
            size in 1u64..SPAN,
            more in 0u64..SPAN,
            dirty in proptest::collection::vec(op(), 0..8),
        ) {
            let mut m = DirtyMap::new(size, G);
            apply(&mut m, &dirty);
            let grown = m.grown(size + more);
            let mut want = DirtyMap::new(size + more, G);
            for r in m.clone().take(u64::MAX, u64::MAX) {
                want.mark(r);
            }
            prop_assert_eq!(&grown, &want);
            prop_assert_eq!(DirtyMap::from_bytes(&grown.to_bytes()).expect("loads"), want);
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
        b[8] = 3; // version
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
        b[HEADER_BYTES + 5 + 8 + 7] |= 0x80; // chunk 0's bit 127 (word 1)
        b[28..36].copy_from_slice(&2u64.to_le_bytes());
        assert!(DirtyMap::from_bytes(&resealed(b))
            .unwrap_err()
            .contains("past the end"));
    }

    #[test]
    fn malformed_chunk_records_are_rejected() {
        let size = 3 * CHUNK_GRANULES * G;
        let mut m = DirtyMap::new(size, G);
        m.mark(0..G);
        m.mark(CHUNK_GRANULES * G..2 * CHUNK_GRANULES * G);
        let good = m.to_bytes();
        let rec0 = HEADER_BYTES; // chunk 0: bits
        let rec1 = rec0 + 5 + 8 * CHUNK_WORDS; // chunk 1: full
        assert_eq!(good.len(), rec1 + 5 + CHECKSUM_BYTES);
        assert_eq!(good[rec1 + 4], RECORD_FULL);
        let err = |b: Vec<u8>| DirtyMap::from_bytes(&resealed(b)).unwrap_err();
        let mut b = good.clone();
        b[rec1..rec1 + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(err(b).contains("out of order"), "a repeated chunk");
        let mut b = good.clone();
        b[rec1..rec1 + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(err(b).contains("past the end"));
        let mut b = good.clone();
        b[rec1 + 4] = 7;
        assert!(err(b).contains("unknown kind"));
        // A bits record holding every granule must have been saved as full.
        let mut b = good.clone();
        b[rec0 + 5..rec1].fill(0xff);
        b[28..36].copy_from_slice(&(2 * CHUNK_GRANULES).to_le_bytes());
        assert!(err(b).contains("canonical"));
        let mut b = good.clone();
        b.truncate(rec1 + 2);
        b.extend_from_slice(&[0; CHECKSUM_BYTES]);
        assert!(err(b).contains("inside a chunk record"));
        // A granule so fine that the dense map would pass the budget.
        let mut b = DirtyMap::new(1 << 40, G).to_bytes();
        b[20..28].copy_from_slice(&(1u64 << 50).to_le_bytes());
        assert!(err(b).contains("too fine"));
    }

    /// The v1 (dense) bytes an earlier agent saved for `m`.
    fn dense_v1(m: &DirtyMap) -> Vec<u8> {
        let mut words = vec![0u64; word_count(m.size_bytes, m.granularity_bytes) as usize];
        for r in m.clone().take(u64::MAX, u64::MAX) {
            for g in r.start / G..r.end.div_ceil(G) {
                words[(g / 64) as usize] |= 1 << (g % 64);
            }
        }
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION_DENSE.to_le_bytes());
        b.extend_from_slice(&m.granularity_bytes.to_le_bytes());
        b.extend_from_slice(&m.size_bytes.to_le_bytes());
        b.extend_from_slice(&m.set.to_le_bytes());
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let sum = blake3::hash(&b);
        b.extend_from_slice(sum.as_bytes());
        b
    }

    #[test]
    fn maps_saved_by_an_earlier_agent_still_load() {
        let size = (2 * CHUNK_GRANULES + 77) * G + 512;
        let mut m = DirtyMap::new(size, G);
        m.mark(3 * G..5 * G);
        m.mark(CHUNK_GRANULES * G..2 * CHUNK_GRANULES * G);
        m.mark(size - 1..size);
        let back = DirtyMap::from_bytes(&dense_v1(&m)).expect("v1 loads");
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), m.to_bytes());
        let clean = DirtyMap::new(size, G);
        assert_eq!(DirtyMap::from_bytes(&dense_v1(&clean)).expect("v1"), clean);
        let mut b = dense_v1(&m);
        b.truncate(b.len() - CHECKSUM_BYTES - 8);
        let b = {
            let sum = blake3::hash(&b);
            [b, sum.as_bytes().to_vec()].concat()
        };
        assert!(DirtyMap::from_bytes(&b).unwrap_err().contains("needs"));
    }

    /// Bytes the v1 writer itself produced (the fuzz seed it wrote before
    /// the format changed), not a re-implementation of it.
    #[test]
    fn a_map_saved_by_the_v1_writer_loads() {
        let saved = include_bytes!("../../../fuzz/corpus/dirty_map/valid-v1-two-ranges");
        let mut want = DirtyMap::new(1 << 30, 4096);
        want.mark(4096..65536);
        want.mark((1 << 29)..(1 << 29) + 512);
        assert_eq!(DirtyMap::from_bytes(saved).expect("v1 loads"), want);
        assert_eq!(&dense_v1(&want)[..], &saved[..]);
    }

    /// What the budget is about: a 4 TiB disk's map costs its
    /// index unless writes are scattered, and saving it is cheap.
    #[test]
    fn a_4_tib_map_costs_what_is_dirty() {
        let size = 4u64 << 40;
        let gran = granularity_for(size);
        let mut m = DirtyMap::new(size, gran);
        assert!(std::mem::size_of::<Chunk>() <= 16);
        assert_eq!(m.chunks.len(), 16384);
        assert_eq!(m.bitmap_bytes(), 0);
        assert_eq!(m.to_bytes().len(), HEADER_BYTES + CHECKSUM_BYTES);
        // An initial sync: all of it dirty, then taken 64 MiB at a time.
        m.mark_all();
        assert_eq!(m.dirty_bytes(), size);
        assert_eq!(m.bitmap_bytes(), 0);
        assert_eq!(
            m.to_bytes().len(),
            HEADER_BYTES + 16384 * 5 + CHECKSUM_BYTES
        );
        let first = m.take(64 << 20, 4 << 20);
        assert_eq!(first.first(), Some(&(0..4 << 20)));
        assert_eq!(first.len(), 16);
        assert_eq!(m.bitmap_bytes(), std::mem::size_of::<Bits>());
        // Scattered writes: one chunk's bitmap each, at most.
        let mut m = DirtyMap::new(size, gran);
        for i in 0..1000u64 {
            // Page-aligned 4 KiB writes about 4 GiB apart: a chunk each.
            let at = i * 4_398_046_511 / 4096 * 4096;
            m.mark(at..at + 4096);
        }
        assert_eq!(m.bitmap_bytes(), 1000 * std::mem::size_of::<Bits>());
        assert_eq!(
            m.to_bytes().len(),
            HEADER_BYTES + 1000 * (5 + 8 * CHUNK_WORDS) + CHECKSUM_BYTES
        );
        m.take(u64::MAX, u64::MAX);
        assert_eq!(m.bitmap_bytes(), 0);
    }

    #[test]
    fn granules_stay_small_and_maps_fit_the_budget() {
        assert_eq!(granularity_for(2 << 30), 4096);
        assert_eq!(granularity_for(256 << 30), 4096);
        assert_eq!(granularity_for(4 << 40), DEFAULT_GRANULARITY_BYTES);
        assert_eq!(granularity_for(16 << 40), 256 << 10);
        assert_eq!(
            word_count(4 << 40, DEFAULT_GRANULARITY_BYTES) * 8,
            MAX_MAP_BYTES
        );
    }
}
