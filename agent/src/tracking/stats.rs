//! The ring buffer's per-CPU counters (`per_cpu/cpuN/stats`), as far as
//! they tell whether events were lost (CBT.md §3).

/// Loss-related counters of one CPU's ring buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Events overwritten before they were read (overwrite mode).
    pub overrun: u64,
    /// Events lost to nested writers wrapping the buffer.
    pub commit_overrun: u64,
    /// Events refused because the buffer was full (overwrite off).
    pub dropped: u64,
    /// Events consumed by readers; only a reset makes it go down.
    pub read: u64,
}

/// Parses `key: value` lines; unknown keys and non-integer values (the
/// `oldest event ts: 123.456` lines) are ignored, missing keys read as 0.
pub fn parse(text: &str) -> CpuStats {
    let mut c = CpuStats::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            continue;
        };
        match key.trim() {
            "overrun" => c.overrun = value,
            "commit overrun" => c.commit_overrun = value,
            "dropped events" => c.dropped = value,
            "read events" => c.read = value,
            _ => {}
        }
    }
    c
}

/// Why the counters say events were lost between `before` and `now`, if
/// they do: a loss counter grew; a counter went down (the buffer was
/// cleared or resized, which discards what was unread); or more events were
/// consumed than the `decoded_events` we read ourselves in between (another
/// reader took them from our instance).
pub fn loss(before: &CpuStats, now: &CpuStats, decoded_events: u64) -> Option<String> {
    let pairs = [
        ("overrun", before.overrun, now.overrun),
        ("commit overrun", before.commit_overrun, now.commit_overrun),
        ("dropped events", before.dropped, now.dropped),
        ("read events", before.read, now.read),
    ];
    let went_down: Vec<String> = pairs
        .iter()
        .filter(|&&(_, b, n)| n < b)
        .map(|(k, b, n)| format!("{k} {b} -> {n}"))
        .collect();
    if !went_down.is_empty() {
        return Some(format!(
            "counters went down, the buffer was reset ({})",
            went_down.join(", ")
        ));
    }
    let mut what: Vec<String> = pairs[..3]
        .iter()
        .filter(|&&(_, b, n)| n > b)
        .map(|(k, b, n)| format!("{k} {b} -> {n}"))
        .collect();
    let consumed = now.read - before.read;
    if consumed > decoded_events {
        what.push(format!(
            "{consumed} events were consumed but only {decoded_events} reached us (another reader)"
        ));
    }
    (!what.is_empty()).then(|| what.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per_cpu/cpu1/stats` after an overrun (CBT.md §3).
    const SAMPLE: &str = "entries: 1159
overrun: 80568
commit overrun: 2
bytes: 64904
oldest event ts:   332.128235
now ts:   340.331982
dropped events: 7
read events: 311
";

    #[test]
    fn parses_the_kernel_text() {
        assert_eq!(
            parse(SAMPLE),
            CpuStats {
                overrun: 80568,
                commit_overrun: 2,
                dropped: 7,
                read: 311
            }
        );
        assert_eq!(parse(""), CpuStats::default());
        assert_eq!(parse("overrun: x\n:\n::::\n"), CpuStats::default());
    }

    #[test]
    fn growth_and_resets_are_losses() {
        let base = parse(SAMPLE);
        assert_eq!(loss(&base, &base, 0), None);
        let read_more = CpuStats {
            read: base.read + 100,
            ..base
        };
        assert_eq!(loss(&base, &read_more, 100), None);
        let stolen = loss(&base, &read_more, 60).expect("another reader");
        assert!(
            stolen.contains("100 events were consumed but only 60"),
            "{stolen}"
        );
        let overrun = CpuStats {
            overrun: base.overrun + 1,
            ..base
        };
        assert_eq!(
            loss(&base, &overrun, 0).as_deref(),
            Some("overrun 80568 -> 80569")
        );
        let dropped = CpuStats {
            dropped: 8,
            commit_overrun: 3,
            ..base
        };
        let msg = loss(&base, &dropped, 0).expect("loss");
        assert!(msg.contains("dropped events 7 -> 8") && msg.contains("commit overrun 2 -> 3"));
        let reset = CpuStats::default();
        assert!(loss(&base, &reset, 0).expect("reset").contains("reset"));
    }
}
