//! Decoding one ring-buffer page ("sub-buffer") read from `trace_pipe_raw`.
//!
//! Layout (the instance's `events/header_page` and `events/header_event`,
//! measured in CBT.md §2, and `kernel/trace/ring_buffer.c`):
//! a u64 page timestamp, a u64 commit word, then records. Every record
//! starts with a u32 header: `type_len` in bits 0–4, `time_delta` in bits
//! 5–31. Integers are in the machine's byte order; they are read as
//! little-endian, which is what the agent's targets (x86_64, aarch64) use.
//!
//! Pure and bounds-checked: any bytes decode without panicking and
//! without allocating.

/// Bytes of data in the page: bits 0–19 of commit (`RB_WRITE_MASK`).
const COMMIT_SIZE_MASK: u64 = 0xf_ffff;
/// The ring lost events before this page (`RB_MISSED_EVENTS`, ring_buffer.c).
const MISSED_EVENTS: u64 = 1 << 31;
/// A u64 count of the missed events follows the data (`RB_MISSED_STORED`).
const MISSED_STORED: u64 = 1 << 30;
/// Page header: u64 timestamp + u64 commit (`events/header_page`).
pub const PAGE_HEADER_BYTES: usize = 16;
/// Record header: type_len:5, time_delta:27 (`events/header_event`).
const RECORD_HEADER_BYTES: usize = 4;
/// Largest type_len that is a data record (`RINGBUF_TYPE_DATA_TYPE_LEN_MAX`).
const TYPE_DATA_MAX: u32 = 28;
/// Padding: `RINGBUF_TYPE_PADDING`.
const TYPE_PADDING: u32 = 29;
/// Time extend: `RINGBUF_TYPE_TIME_EXTEND`.
const TYPE_TIME_EXTEND: u32 = 30;
/// Absolute time stamp: `RINGBUF_TYPE_TIME_STAMP`.
const TYPE_TIME_STAMP: u32 = 31;
/// Bits of time held by a record header's delta (`TS_SHIFT`).
const TS_SHIFT: u32 = 27;
/// Bits of an absolute time stamp the record cannot hold and takes from
/// the page time stamp (`TS_MSB` in ring_buffer.c: the top five bits).
const TS_MSB: u64 = 0xf8 << 56;

/// Whether the kernel reported lost events before a page.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// Nothing was lost.
    #[default]
    No,
    /// Events were lost; the page had no room for their count.
    Unknown,
    /// This many events were lost.
    Count(u64),
}

/// What a page said besides its events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PageInfo {
    /// The page time stamp, in `trace_clock` units.
    pub page_ts: u64,
    pub missed: Missed,
    /// Data records handed to the callback.
    pub events: u64,
    /// Something did not parse (a short page, a record running past the
    /// data); the rest of the page was skipped.
    pub malformed: bool,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The time of an absolute time stamp record, whose top bits come from the
/// page time stamp (`rb_fix_abs_ts`).
fn fix_abs_ts(abs: u64, page_ts: u64) -> u64 {
    if page_ts & TS_MSB == 0 {
        return abs;
    }
    let fixed = abs | (page_ts & TS_MSB);
    if fixed < page_ts {
        fixed.wrapping_add(1 << 59)
    } else {
        fixed
    }
}

/// Calls `on_event(timestamp, payload)` for each data record of `page`, in
/// order. Timestamps accumulate from the page time stamp.
pub fn decode(page: &[u8], mut on_event: impl FnMut(u64, &[u8])) -> PageInfo {
    let mut info = PageInfo::default();
    let (Some(page_ts), Some(commit)) = (u64_at(page, 0), u64_at(page, 8)) else {
        info.malformed = true;
        return info;
    };
    info.page_ts = page_ts;
    let data = &page[PAGE_HEADER_BYTES..];
    let size = (commit & COMMIT_SIZE_MASK) as usize;
    if size > data.len() {
        info.malformed = true;
    }
    let size = size.min(data.len());
    if commit & MISSED_EVENTS != 0 {
        info.missed = match (commit & MISSED_STORED != 0)
            .then(|| u64_at(data, size))
            .flatten()
        {
            Some(count) => Missed::Count(count),
            None => Missed::Unknown,
        };
    }
    let data = &data[..size];
    let mut ts = page_ts;
    let mut pos = 0usize;
    while pos < data.len() {
        let Some(h) = u32_at(data, pos) else {
            info.malformed = true;
            break;
        };
        let type_len = h & 31;
        let delta = u64::from(h >> 5);
        let body = pos + RECORD_HEADER_BYTES;
        let record_bytes = match type_len {
            0 => {
                // array[0] holds the payload length plus its own 4 bytes;
                // the record is padded to 4 bytes (libtraceevent kbuffer).
                let Some(len) = u32_at(data, body) else {
                    info.malformed = true;
                    break;
                };
                let len = len as usize;
                let payload_end = body + len;
                if len < 4 || payload_end > data.len() {
                    info.malformed = true;
                    break;
                }
                ts = ts.wrapping_add(delta);
                on_event(ts, &data[body + 4..payload_end]);
                info.events += 1;
                RECORD_HEADER_BYTES + len.next_multiple_of(4)
            }
            1..=TYPE_DATA_MAX => {
                let len = type_len as usize * 4;
                if body + len > data.len() {
                    info.malformed = true;
                    break;
                }
                ts = ts.wrapping_add(delta);
                on_event(ts, &data[body..body + len]);
                info.events += 1;
                RECORD_HEADER_BYTES + len
            }
            TYPE_PADDING => {
                if delta == 0 {
                    // A null record: the rest of the page is padding.
                    break;
                }
                // A discarded record: array[0] is its length after the header.
                match u32_at(data, body) {
                    Some(skip) => RECORD_HEADER_BYTES + skip as usize,
                    None => {
                        info.malformed = true;
                        break;
                    }
                }
            }
            TYPE_TIME_EXTEND | TYPE_TIME_STAMP => {
                let Some(high) = u32_at(data, body) else {
                    info.malformed = true;
                    break;
                };
                let value = (u64::from(high) << TS_SHIFT) | delta;
                ts = if type_len == TYPE_TIME_EXTEND {
                    ts.wrapping_add(value)
                } else {
                    fix_abs_ts(value, page_ts)
                };
                8
            }
            32.. => unreachable!("type_len is five bits"),
        };
        pos = pos.saturating_add(record_bytes);
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE_TS: u64 = 1_000_000;

    /// A page of `page_bytes` with the given records, commit flags and an
    /// optional stored missed count.
    fn page_sized(page_bytes: usize, records: &[u8], flags: u64, stored: Option<u64>) -> Vec<u8> {
        let mut p = vec![0xeeu8; page_bytes];
        p[..8].copy_from_slice(&PAGE_TS.to_le_bytes());
        let commit = records.len() as u64 | flags;
        p[8..16].copy_from_slice(&commit.to_le_bytes());
        p[16..16 + records.len()].copy_from_slice(records);
        if let Some(n) = stored {
            p[16 + records.len()..24 + records.len()].copy_from_slice(&n.to_le_bytes());
        }
        p
    }

    fn page(records: &[u8], flags: u64, stored: Option<u64>) -> Vec<u8> {
        page_sized(4096, records, flags, stored)
    }

    fn header(type_len: u32, delta: u32) -> [u8; 4] {
        (type_len | (delta << 5)).to_le_bytes()
    }

    /// A small data record (type_len = payload / 4).
    fn small(delta: u32, payload: &[u8]) -> Vec<u8> {
        assert_eq!(payload.len() % 4, 0);
        let mut v = header(payload.len() as u32 / 4, delta).to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// A long data record: type_len 0, array[0] = payload length + 4.
    fn long(delta: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = header(0, delta).to_vec();
        v.extend_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        v.extend_from_slice(payload);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    fn two_words(type_len: u32, delta: u32, high: u32) -> Vec<u8> {
        let mut v = header(type_len, delta).to_vec();
        v.extend_from_slice(&high.to_le_bytes());
        v
    }

    fn collect(p: &[u8]) -> (Vec<(u64, usize, u8)>, PageInfo) {
        let mut seen = Vec::new();
        let info = decode(p, |ts, payload| seen.push((ts, payload.len(), payload[0])));
        (seen, info)
    }

    #[test]
    fn normal_events_accumulate_deltas() {
        // Two block_rq_complete-sized records (type_len 13, 52 bytes).
        let mut r = small(0, &[1; 52]);
        r.extend(small(500, &[2; 52]));
        let (seen, info) = collect(&page(&r, 0, None));
        assert_eq!(seen, vec![(PAGE_TS, 52, 1), (PAGE_TS + 500, 52, 2)]);
        assert_eq!(info.events, 2);
        assert_eq!(info.page_ts, PAGE_TS);
        assert_eq!(info.missed, Missed::No);
        assert!(!info.malformed);
    }

    #[test]
    fn long_events() {
        // 120 bytes is more than type_len can say (28 * 4 = 112).
        let mut r = long(7, &[3; 120]);
        // An odd payload length is padded to 4 bytes.
        r.extend(long(1, &[4; 5]));
        r.extend(small(1, &[5; 4]));
        let (seen, info) = collect(&page(&r, 0, None));
        assert_eq!(
            seen,
            vec![
                (PAGE_TS + 7, 120, 3),
                (PAGE_TS + 8, 5, 4),
                (PAGE_TS + 9, 4, 5)
            ]
        );
        assert!(!info.malformed);
    }

    #[test]
    fn padding_with_and_without_length() {
        // A discarded record of 12 bytes after its header, then an event.
        let mut r = two_words(TYPE_PADDING, 1, 12);
        r.extend_from_slice(&[0xaa; 8]);
        r.extend(small(10, &[6; 8]));
        // A null record: the rest of the page is padding.
        r.extend_from_slice(&header(TYPE_PADDING, 0));
        r.extend(small(10, &[7; 8]));
        let (seen, info) = collect(&page(&r, 0, None));
        assert_eq!(seen, vec![(PAGE_TS + 10, 8, 6)]);
        assert!(!info.malformed);
    }

    #[test]
    fn time_extend_and_absolute_time_stamps() {
        // Extend by (3 << 27) + 9, as after a gap of ~400 ms.
        let mut r = two_words(TYPE_TIME_EXTEND, 9, 3);
        r.extend(small(1, &[1; 4]));
        // An absolute time stamp resets the running time.
        r.extend(two_words(TYPE_TIME_STAMP, 5, 2));
        r.extend(small(2, &[2; 4]));
        let (seen, _) = collect(&page(&r, 0, None));
        let extended = PAGE_TS + (3 << 27) + 9 + 1;
        assert_eq!(seen, vec![(extended, 4, 1), ((2 << 27 | 5) + 2, 4, 2)]);
        // The top bits of an absolute stamp come from the page stamp.
        assert_eq!(fix_abs_ts(5, 1 << 60), (1 << 60) + 5);
        assert_eq!(fix_abs_ts(5, (1 << 60) + 10), (1 << 60) + (1 << 59) + 5);
        assert_eq!(fix_abs_ts(5 + (1 << 58), 0), 5 + (1 << 58));
    }

    #[test]
    fn missed_events_with_and_without_a_count() {
        let r = small(0, &[0; 8]);
        let info = decode(
            &page(&r, MISSED_EVENTS | MISSED_STORED, Some(80568)),
            |_, _| {},
        );
        assert_eq!(info.missed, Missed::Count(80568));
        assert_eq!(info.events, 1);
        let info = decode(&page(&r, MISSED_EVENTS, None), |_, _| {});
        assert_eq!(info.missed, Missed::Unknown);
        // A stored flag whose count does not fit in the page.
        let full = vec![0u8; 4096 - 16];
        let info = decode(&page(&full, MISSED_EVENTS | MISSED_STORED, None), |_, _| {});
        assert_eq!(info.missed, Missed::Unknown);
    }

    #[test]
    fn larger_sub_buffers_decode() {
        let mut r = Vec::new();
        for i in 0..100u8 {
            r.extend(small(1, &[i; 52]));
        }
        assert!(r.len() > 4096);
        let (seen, info) = collect(&page_sized(8192, &r, 0, None));
        assert_eq!(seen.len(), 100);
        assert_eq!(info.events, 100);
        assert!(!info.malformed);
    }

    #[test]
    fn truncated_pages_are_malformed_not_panics() {
        assert!(decode(&[], |_, _| {}).malformed);
        assert!(decode(&[0; 15], |_, _| {}).malformed);
        // Empty page: nothing, not malformed.
        let info = decode(&page(&[], 0, None), |_, _| {});
        assert_eq!((info.events, info.malformed), (0, false));
        // Commit says more data than the page holds.
        let mut p = page(&small(0, &[1; 8]), 0, None);
        p.truncate(24);
        let (seen, info) = collect(&p);
        assert!(info.malformed);
        assert!(seen.is_empty());
        // A record running past commit.
        let r = small(0, &[1; 52]);
        let mut p = page(&r, 0, None);
        p[8..16].copy_from_slice(&40u64.to_le_bytes());
        assert!(decode(&p, |_, _| panic!("no event fits")).malformed);
        // A long record whose length is below its own 4 bytes.
        let mut r = header(0, 0).to_vec();
        r.extend_from_slice(&2u32.to_le_bytes());
        assert!(decode(&page(&r, 0, None), |_, _| {}).malformed);
        // A time extend cut short by commit.
        let r = header(TYPE_TIME_EXTEND, 0);
        assert!(decode(&page(&r, 0, None), |_, _| {}).malformed);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x243f_6a88_85a3_08d3u64;
        for len in [0usize, 3, 15, 16, 17, 24, 100, 4096, 8192] {
            for _ in 0..300 {
                let p: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = decode(&p, |_, payload| assert!(payload.len() <= p.len()));
            }
        }
    }

    proptest! {
        /// Valid headers with random record streams (small commit values so
        /// the records are actually walked) never panic, and every payload
        /// lies inside the page.
        #[test]
        fn arbitrary_records_never_panic(
            records in proptest::collection::vec(any::<u8>(), 0..600),
            commit in 0u64..700,
            flags in prop_oneof![Just(0u64), Just(MISSED_EVENTS), Just(MISSED_EVENTS | MISSED_STORED)],
            page_bytes in 16usize..700,
        ) {
            let mut p = vec![0u8; page_bytes.max(16)];
            let n = records.len().min(p.len() - 16);
            p[16..16 + n].copy_from_slice(&records[..n]);
            p[8..16].copy_from_slice(&(commit | flags).to_le_bytes());
            let base = p.as_ptr() as usize;
            let info = decode(&p, |_, payload| {
                let at = payload.as_ptr() as usize;
                assert!(at >= base + 16 && at + payload.len() <= base + p.len());
            });
            prop_assert!(info.events <= (p.len() as u64) / 4);
        }
    }
}
