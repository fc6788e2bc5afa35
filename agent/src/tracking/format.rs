//! Reading an event's id and field offsets from its tracefs `format` file,
//! so nothing about the kernel's layout is hard-coded.

use std::collections::HashMap;

/// Offset and size of one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// The fields the tracker reads from a block completion event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLayout {
    pub id: u16,
    pub common_type: Field,
    pub dev: Field,
    pub sector: Field,
    pub nr_sector: Field,
    pub rwbs: Field,
}

/// Parses `field:TYPE NAME;\toffset:N;\tsize:N;` lines.
pub fn parse_fields(text: &str) -> HashMap<String, Field> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let Some(decl) = parts.next() else { continue };
        // "unsigned int dev" or "char rwbs[10]": the name is the last word,
        // without any array suffix.
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        let name = name.split('[').next().unwrap_or(name).to_owned();
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        if let (Some(offset), Some(size)) = (offset, size) {
            out.insert(name, Field { offset, size });
        }
    }
    out
}

/// Builds the layout from an event's `id` and `format` file contents.
pub fn layout(id_text: &str, format_text: &str) -> Result<EventLayout, String> {
    let id = id_text
        .trim()
        .parse::<u16>()
        .map_err(|_| format!("event id {:?} is not a number", id_text.trim()))?;
    let fields = parse_fields(format_text);
    let get = |name: &str, sizes: &[usize]| -> Result<Field, String> {
        let f = fields
            .get(name)
            .copied()
            .ok_or_else(|| format!("field {name} is missing from the event format"))?;
        if sizes.contains(&f.size) {
            Ok(f)
        } else {
            Err(format!("field {name} has unexpected size {}", f.size))
        }
    };
    Ok(EventLayout {
        id,
        common_type: get("common_type", &[2])?,
        dev: get("dev", &[4])?,
        sector: get("sector", &[8])?,
        nr_sector: get("nr_sector", &[4])?,
        rwbs: get("rwbs", &[6, 8, 10, 16])?,
    })
}

/// A decoded block event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEvent {
    /// The kernel's dev_t: major << 20 | minor.
    pub dev: u32,
    pub sector: u64,
    pub nr_sector: u32,
    /// Write, discard or write-zeroes (`W`, `D`, `N` in rwbs).
    pub modifies: bool,
}

impl EventLayout {
    /// Decodes `payload` if it is this event.
    pub fn decode(&self, payload: &[u8]) -> Option<BlockEvent> {
        let bytes = |f: Field| payload.get(f.offset..f.offset.checked_add(f.size)?);
        let ty = u16::from_le_bytes(bytes(self.common_type)?.try_into().ok()?);
        if ty != self.id {
            return None;
        }
        let rwbs = bytes(self.rwbs)?;
        let rwbs = &rwbs[..rwbs.iter().position(|&b| b == 0).unwrap_or(rwbs.len())];
        Some(BlockEvent {
            dev: u32::from_le_bytes(bytes(self.dev)?.try_into().ok()?),
            sector: u64::from_le_bytes(bytes(self.sector)?.try_into().ok()?),
            nr_sector: u32::from_le_bytes(bytes(self.nr_sector)?.try_into().ok()?),
            modifies: rwbs.iter().any(|b| matches!(b, b'W' | b'D' | b'N')),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// block_rq_complete's format on kernel 6.18 (CBT.md §2).
    pub(crate) const RQ_COMPLETE: &str = "name: block_rq_complete
ID: 2107
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;
";

    #[test]
    fn parses_the_kernel_format() {
        let l = layout("2107\n", RQ_COMPLETE).expect("layout");
        assert_eq!(l.id, 2107);
        assert_eq!(
            l.sector,
            Field {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            l.rwbs,
            Field {
                offset: 34,
                size: 10
            }
        );
        let mut p = vec![0u8; 52];
        p[..2].copy_from_slice(&2107u16.to_le_bytes());
        p[8..12].copy_from_slice(&(7u32 << 20).to_le_bytes());
        p[16..24].copy_from_slice(&80u64.to_le_bytes());
        p[24..28].copy_from_slice(&8u32.to_le_bytes());
        p[34..36].copy_from_slice(b"WS");
        let e = l.decode(&p).expect("decodes");
        assert_eq!(
            (e.dev, e.sector, e.nr_sector, e.modifies),
            (7 << 20, 80, 8, true)
        );
        p[34..36].copy_from_slice(b"RS");
        assert!(!l.decode(&p).expect("decodes").modifies);
        p[..2].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(l.decode(&p), None);
        assert_eq!(l.decode(&p[..10]), None);
    }

    /// block_bio_complete's format on kernel 6.18: rwbs at 32, no ioprio.
    const BIO_COMPLETE: &str = "name: block_bio_complete
ID: 2100
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:char rwbs[10];\toffset:32;\tsize:10;\tsigned:0;
";

    #[test]
    fn parses_the_bio_format_and_write_zeroes() {
        let l = layout("2100", BIO_COMPLETE).expect("layout");
        assert_eq!(l.rwbs.offset, 32);
        let mut p = vec![0u8; 44];
        p[..2].copy_from_slice(&2100u16.to_le_bytes());
        p[8..12].copy_from_slice(&((253u32 << 20) | 1).to_le_bytes());
        p[16..24].copy_from_slice(&4096u64.to_le_bytes());
        p[24..28].copy_from_slice(&128u32.to_le_bytes());
        // Write-zeroes prints as N, discard as D, secure erase as DE.
        for (rwbs, modifies) in [
            (&b"NS"[..], true),
            (b"DS", true),
            (b"DE", true),
            (b"FWFS", true),
            (b"FF", false),
            (b"RA", false),
            (b"RSM", false),
        ] {
            p[32..42].fill(0);
            p[32..32 + rwbs.len()].copy_from_slice(rwbs);
            let e = l.decode(&p).expect("decodes");
            assert_eq!(e.modifies, modifies, "{}", String::from_utf8_lossy(rwbs));
            assert_eq!((e.dev, e.sector, e.nr_sector), ((253 << 20) | 1, 4096, 128));
        }
        // rwbs without a terminating NUL is still read.
        p[32..42].copy_from_slice(b"WSSSSSSSSS");
        assert!(l.decode(&p).expect("decodes").modifies);
    }

    #[test]
    fn absurd_offsets_do_not_panic() {
        let text = "field:unsigned short common_type;\toffset:18446744073709551615;\tsize:2;";
        let fields = parse_fields(text);
        let l = EventLayout {
            id: 1,
            common_type: fields["common_type"],
            dev: Field { offset: 8, size: 4 },
            sector: Field {
                offset: 16,
                size: 8,
            },
            nr_sector: Field {
                offset: 24,
                size: 4,
            },
            rwbs: Field {
                offset: 34,
                size: 10,
            },
        };
        assert_eq!(l.decode(&[0u8; 64]), None);
    }

    #[test]
    fn missing_fields_are_reported() {
        assert!(layout("1", "field:int x;\toffset:0;\tsize:4;").is_err());
        assert!(layout("x", RQ_COMPLETE).is_err());
    }
}
