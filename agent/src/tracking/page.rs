//! Decoding one ring-buffer page from `trace_pipe_raw` (layout from the
//! instance's `events/header_page` and `header_event`, measured in CBT.md
//! §2): a u64 timestamp, a u64 commit word, then events. Pure and
//! bounds-checked: any bytes decode without panicking.

/// Bytes of data in the page (bits 0-19 of commit, `RB_WRITE_MASK`).
const COMMIT_SIZE_MASK: u64 = 0xf_ffff;
/// The ring lost events before this page (`RB_MISSED_EVENTS`).
const MISSED_EVENTS: u64 = 1 << 31;
/// A u64 count of the missed events follows the data (`RB_MISSED_STORED`).
const MISSED_STORED: u64 = 1 << 30;
/// Page header: u64 timestamp + u64 commit.
pub const PAGE_HEADER_BYTES: usize = 16;
/// Largest type_len that is a data event (`RINGBUF_TYPE_DATA_TYPE_LEN_MAX`).
const TYPE_DATA_MAX: u32 = 28;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;

/// What a page said besides its events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PageInfo {
    /// Events were lost before this page; the count when the kernel stored it.
    pub missed: Option<Option<u64>>,
    pub events: u64,
    /// The page ended in something that did not parse.
    pub malformed: bool,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Calls `on_event` with each data event's payload.
pub fn decode(page: &[u8], mut on_event: impl FnMut(&[u8])) -> PageInfo {
    let mut info = PageInfo::default();
    let Some(commit) = u64_at(page, 8) else {
        info.malformed = true;
        return info;
    };
    let data = &page[PAGE_HEADER_BYTES.min(page.len())..];
    let size = ((commit & COMMIT_SIZE_MASK) as usize).min(data.len());
    if commit & MISSED_EVENTS != 0 {
        let count = (commit & MISSED_STORED != 0)
            .then(|| u64_at(data, size))
            .flatten();
        info.missed = Some(count);
    }
    let data = &data[..size];
    let mut pos = 0usize;
    while pos + 4 <= data.len() {
        let Some(h) = u32_at(data, pos) else { break };
        let type_len = h & 31;
        let delta = h >> 5;
        let advance = match type_len {
            0 => {
                // array[0] counts the payload plus itself.
                let Some(len) = u32_at(data, pos + 4) else {
                    info.malformed = true;
                    break;
                };
                let len = len as usize;
                if len < 4 || pos + 4 + len > data.len() {
                    info.malformed = true;
                    break;
                }
                on_event(&data[pos + 8..pos + 4 + len]);
                info.events += 1;
                4 + len
            }
            1..=TYPE_DATA_MAX => {
                let len = type_len as usize * 4;
                if pos + 4 + len > data.len() {
                    info.malformed = true;
                    break;
                }
                on_event(&data[pos + 4..pos + 4 + len]);
                info.events += 1;
                4 + len
            }
            TYPE_PADDING => {
                if delta == 0 {
                    break; // the rest of the page is padding
                }
                match u32_at(data, pos + 4) {
                    Some(skip) => 4 + skip as usize,
                    None => break,
                }
            }
            TYPE_TIME_EXTEND | TYPE_TIME_STAMP => 8,
            _ => unreachable!("type_len is five bits"),
        };
        pos = pos.saturating_add(advance);
    }
    info
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a page from raw event bytes.
    pub(crate) fn page(events: &[u8], flags: u64, stored: Option<u64>) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[..8].copy_from_slice(&12345u64.to_le_bytes());
        let commit = events.len() as u64 | flags;
        p[8..16].copy_from_slice(&commit.to_le_bytes());
        p[16..16 + events.len()].copy_from_slice(events);
        if let Some(n) = stored {
            p[16 + events.len()..24 + events.len()].copy_from_slice(&n.to_le_bytes());
        }
        p
    }

    pub(crate) fn small_event(payload: &[u8]) -> Vec<u8> {
        assert_eq!(payload.len() % 4, 0);
        let h = (payload.len() / 4) as u32 | (7 << 5);
        let mut v = h.to_le_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_every_record_kind() {
        let mut ev = small_event(&[1u8; 52]);
        // time extend
        ev.extend_from_slice(&(TYPE_TIME_EXTEND | (3 << 5)).to_le_bytes());
        ev.extend_from_slice(&9u32.to_le_bytes());
        // long event: type_len 0, array[0] = payload + 4
        ev.extend_from_slice(&0u32.to_le_bytes());
        ev.extend_from_slice(&(120u32 + 4).to_le_bytes());
        ev.extend_from_slice(&[2u8; 120]);
        // absolute timestamp
        ev.extend_from_slice(&TYPE_TIME_STAMP.to_le_bytes());
        ev.extend_from_slice(&0u32.to_le_bytes());
        // padding with a length (array[0] counts itself), then an event
        ev.extend_from_slice(&(TYPE_PADDING | (1 << 5)).to_le_bytes());
        ev.extend_from_slice(&8u32.to_le_bytes());
        ev.extend_from_slice(&[0u8; 4]);
        ev.extend(small_event(&[3u8; 8]));
        // padding to the end of the page
        ev.extend_from_slice(&TYPE_PADDING.to_le_bytes());
        ev.extend(small_event(&[4u8; 8]));
        let mut seen = Vec::new();
        let info = decode(&page(&ev, 0, None), |p| seen.push((p.len(), p[0])));
        assert_eq!(seen, vec![(52, 1), (120, 2), (8, 3)]);
        assert_eq!(info.events, 3);
        assert_eq!(info.missed, None);
        assert!(!info.malformed);
    }

    #[test]
    fn missed_events_with_and_without_a_count() {
        let ev = small_event(&[0u8; 8]);
        let info = decode(
            &page(&ev, MISSED_EVENTS | MISSED_STORED, Some(80568)),
            |_| {},
        );
        assert_eq!(info.missed, Some(Some(80568)));
        let info = decode(&page(&ev, MISSED_EVENTS, None), |_| {});
        assert_eq!(info.missed, Some(None));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x243f6a8885a308d3u64;
        for len in [0usize, 3, 15, 16, 17, 100, 4096, 8192] {
            for _ in 0..200 {
                let page: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = decode(&page, |p| assert!(p.len() <= page.len()));
            }
        }
    }
}
