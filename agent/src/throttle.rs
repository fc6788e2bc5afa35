//! Bandwidth caps: what the agent may send to the receiver per second
//! (after compression, by local time of day and week), and what `sync` and
//! resyncs may read from the protected disks per second, so the machine's
//! own I/O and the site's uplink keep priority.
//!
//! Both are token buckets that may go into debt: a message or a read goes
//! as soon as the bucket is not negative, and the next one waits until the
//! debt is paid. A 1 MiB extent therefore never waits for a bucket larger
//! than the burst, and the long-run average is exactly the rate. Waiting is
//! always a timed sleep, never polling.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Lowest rate accepted: below it a single 1 MiB extent would hold the
/// connection for over a minute.
pub const MIN_RATE: u64 = 16 << 10;
/// A rate change from a window boundary is noticed within this long, even
/// by a sender waiting off a debt taken at the old rate.
pub const RECHECK_EVERY: Duration = Duration::from_secs(1);
const MINUTES_PER_DAY: usize = 24 * 60;
const MINUTES_PER_WEEK: usize = 7 * MINUTES_PER_DAY;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A rate as written in agent.toml: bytes per second, or a string with a
/// unit ("20 MiB/s", "100 Mbit/s") or "unlimited".
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RateValue {
    Bytes(i64),
    Text(String),
}

/// `[throttle]` in agent.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Send cap outside every window (absent: none).
    pub rate: Option<RateValue>,
    /// Read cap for `sync`, `resync` and resyncs in `run` (absent: none).
    pub sync_read_rate: Option<RateValue>,
    #[serde(default, rename = "window")]
    pub windows: Vec<WindowConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// Days the window starts on ("mon".."sun", ranges like "mon-fri");
    /// absent: every day.
    pub days: Option<Vec<String>>,
    /// Local start time, HH:MM.
    pub from: String,
    /// Local end time, HH:MM (24:00 allowed); before `from`: the window
    /// runs past midnight into the next day.
    pub to: String,
    pub rate: RateValue,
}

/// Parses a rate; None means unlimited. `key` names it in errors.
pub fn parse_rate(key: &str, v: &RateValue) -> Result<Option<u64>, String> {
    let help = "use bytes per second (a number) or a string such as \"20 MiB/s\", \"500 KiB/s\", \"100 Mbit/s\" or \"unlimited\"";
    let bytes = match v {
        RateValue::Bytes(n) if *n <= 0 => {
            return Err(format!(
                "{key} = {n} must be more than 0; remove the key for no cap, or {help}"
            ))
        }
        RateValue::Bytes(n) => *n as f64,
        RateValue::Text(s) => {
            let t = s.trim();
            if t.eq_ignore_ascii_case("unlimited") {
                return Ok(None);
            }
            let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
            let split = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            let (num, unit) = (t[..split].trim(), t[split..].trim());
            let scale = match unit {
                "" | "B" => 1.0,
                "KB" | "kB" => 1e3,
                "MB" => 1e6,
                "GB" => 1e9,
                "KiB" => 1024.0,
                "MiB" => 1024.0 * 1024.0,
                "GiB" => 1024.0 * 1024.0 * 1024.0,
                "kbit" | "Kbit" => 1e3 / 8.0,
                "Mbit" => 1e6 / 8.0,
                "Gbit" => 1e9 / 8.0,
                _ => return Err(format!("{key} = {s:?} is not a rate; {help}")),
            };
            let n: f64 = num
                .parse()
                .map_err(|_| format!("{key} = {s:?} is not a rate; {help}"))?;
            n * scale
        }
    };
    if !bytes.is_finite() || bytes < MIN_RATE as f64 {
        return Err(format!(
            "{key} = {} is below the lowest cap of 16 KiB/s; raise it, or remove the key for no cap",
            match v {
                RateValue::Bytes(n) => n.to_string(),
                RateValue::Text(s) => format!("{s:?}"),
            }
        ));
    }
    Ok(Some(bytes as u64))
}

/// "2.0 MiB/s" for logs and status.
pub fn show_rate(bytes_per_sec: u64) -> String {
    let b = bytes_per_sec as f64;
    if b >= (1 << 30) as f64 {
        format!("{:.1} GiB/s", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB/s", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB/s", b / 1024.0)
    }
}

/// "HH:MM" to minutes since midnight; 24:00 only where `allow_24`.
fn parse_time(key: &str, s: &str, allow_24: bool) -> Result<usize, String> {
    let bad = || {
        format!(
            "{key} = {s:?} is not a time; use local time as HH:MM, 00:00 to {}",
            if allow_24 { "24:00" } else { "23:59" }
        )
    };
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: usize = h.parse().map_err(|_| bad())?;
    let m: usize = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && (m != 0 || !allow_24)) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn parse_day(key: &str, s: &str) -> Result<usize, String> {
    let l = s.trim().to_ascii_lowercase();
    DAYS.iter()
        .position(|d| l.len() >= 3 && (l == *d || full_name(d).starts_with(&l)))
        .ok_or_else(|| {
            format!("{key} has {s:?}, which is not a day; use mon, tue, wed, thu, fri, sat, sun or a range such as \"mon-fri\"")
        })
}

fn full_name(d: &str) -> &'static str {
    match d {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

/// Days 0 (Monday) to 6 a window starts on.
fn parse_days(key: &str, days: &[String]) -> Result<Vec<usize>, String> {
    if days.is_empty() {
        return Err(format!(
            "{key} is empty; list days such as [\"mon-fri\"], or remove the key for every day"
        ));
    }
    let mut out = Vec::new();
    for d in days {
        match d.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_day(key, a)?, parse_day(key, b)?);
                let mut i = a;
                loop {
                    out.push(i);
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => out.push(parse_day(key, d)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// One validated window, for status and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub days: Vec<usize>,
    pub from: usize,
    pub to: usize,
    /// None: unlimited while the window is open.
    pub rate: Option<u64>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let days: Vec<&str> = self.days.iter().map(|&d| DAYS[d]).collect();
        let hm = |m: usize| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{} {}-{}", days.join(","), hm(self.from), hm(self.to))
    }
}

/// The send cap by minute of the local week.
#[derive(Debug, Clone)]
pub struct Schedule {
    default: Option<u64>,
    pub windows: Vec<Window>,
    /// Window index open at each minute of the week (Monday 00:00 first).
    by_minute: Vec<Option<u8>>,
}

impl Schedule {
    /// Validates `[throttle]`'s send settings; errors name the key.
    pub fn from_config(c: &ThrottleConfig) -> Result<Schedule, String> {
        let default = match &c.rate {
            Some(v) => parse_rate("throttle.rate", v)?,
            None => None,
        };
        if c.windows.len() > 64 {
            return Err(format!(
                "{} [[throttle.window]] tables; at most 64 are supported, merge some",
                c.windows.len()
            ));
        }
        let mut windows = Vec::new();
        let mut by_minute: Vec<Option<u8>> = vec![None; MINUTES_PER_WEEK];
        for (i, w) in c.windows.iter().enumerate() {
            let key = format!("[[throttle.window]] number {}", i + 1);
            let from = parse_time(&format!("{key}: from"), &w.from, false)?;
            let to = parse_time(&format!("{key}: to"), &w.to, true)?;
            if from == to {
                return Err(format!(
                    "{key}: from and to are both {:?}, an empty window; for a whole day use from = \"00:00\", to = \"24:00\"",
                    w.from
                ));
            }
            let days = match &w.days {
                Some(d) => parse_days(&format!("{key}: days"), d)?,
                None => (0..7).collect(),
            };
            let rate = parse_rate(&format!("{key}: rate"), &w.rate)?;
            let window = Window {
                days,
                from,
                to,
                rate,
            };
            // A window before midnight runs on into the next day.
            let len = if to > from {
                to - from
            } else {
                to + MINUTES_PER_DAY - from
            };
            for &d in &window.days {
                for m in 0..len {
                    let at = (d * MINUTES_PER_DAY + from + m) % MINUTES_PER_WEEK;
                    if let Some(j) = by_minute[at] {
                        let (day, min) = (at / MINUTES_PER_DAY, at % MINUTES_PER_DAY);
                        return Err(format!(
                            "{key} ({window}) overlaps number {} ({}) at {} {:02}:{:02}; windows must not overlap, change their days or times",
                            j + 1,
                            windows.get(j as usize).map_or(String::new(), ToString::to_string),
                            DAYS[day],
                            min / 60,
                            min % 60
                        ));
                    }
                    by_minute[at] = Some(i as u8);
                }
            }
            windows.push(window);
        }
        Ok(Schedule {
            default,
            windows,
            by_minute,
        })
    }

    /// The cap (None: unlimited) and the open window at a minute of the
    /// week (`day` 0 = Monday).
    pub fn at(&self, day: usize, minute: usize) -> (Option<u64>, Option<usize>) {
        match self.by_minute[(day % 7) * MINUTES_PER_DAY + minute % MINUTES_PER_DAY] {
            Some(i) => (self.windows[i as usize].rate, Some(i as usize)),
            None => (self.default, None),
        }
    }

    pub fn now(&self) -> (Option<u64>, Option<usize>) {
        let (day, minute) = local_now();
        self.at(day, minute)
    }

    /// Whether any cap can ever apply.
    pub fn is_unlimited(&self) -> bool {
        self.default.is_none() && self.windows.iter().all(|w| w.rate.is_none())
    }
}

/// Local day of the week (0 = Monday) and minute of the day, as the
/// machine's time zone (TZ, /etc/localtime) has them.
pub fn local_now() -> (usize, usize) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as nix::libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of a plain C struct.
    let mut tm: nix::libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals for the duration of the
    // call; localtime_r is the reentrant variant and keeps neither.
    let ok = unsafe { !nix::libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return (0, 0);
    }
    (
        ((tm.tm_wday + 6) % 7) as usize,
        (tm.tm_hour * 60 + tm.tm_min) as usize,
    )
}

/// The burst a bucket of `rate` allows: a tenth of a second's worth, so
/// short messages are not delayed one by one, yet the link never sees much
/// more than the cap.
fn burst_for(rate: u64) -> f64 {
    (rate as f64 / 10.0).max(4096.0)
}

/// A token bucket that may go into debt (see the module docs).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts full.
    pub fn new(rate: u64, now: Instant) -> TokenBucket {
        let burst = burst_for(rate);
        TokenBucket {
            rate: rate as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Keeps the debt (or credit up to the new burst) across a change.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate as f64;
        self.burst = burst_for(rate);
        self.tokens = self.tokens.min(self.burst);
    }

    /// When the next send or read may start; None: now.
    pub fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        (self.tokens < 0.0).then(|| now + Duration::from_secs_f64(-self.tokens / self.rate))
    }

    pub fn spend(&mut self, bytes: u64, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }
}

/// The send side: the schedule and a bucket at its current rate.
#[derive(Debug)]
pub struct SendThrottle {
    schedule: Schedule,
    bucket: Option<TokenBucket>,
    /// (cap, window) in force, rechecked at most every [`RECHECK_EVERY`].
    current: (Option<u64>, Option<usize>),
    checked: Option<Instant>,
}

impl SendThrottle {
    /// None when no cap can ever apply.
    pub fn new(schedule: Schedule) -> Option<SendThrottle> {
        (!schedule.is_unlimited()).then_some(SendThrottle {
            schedule,
            bucket: None,
            current: (None, None),
            checked: None,
        })
    }

    fn refresh(&mut self, now: Instant) {
        if self
            .checked
            .is_some_and(|at| now.saturating_duration_since(at) < RECHECK_EVERY)
        {
            return;
        }
        self.checked = Some(now);
        let next = self.schedule.now();
        if next.0 != self.current.0 {
            tracing::info!("send cap now {}", self.describe(next));
            self.bucket = match (next.0, self.bucket.take()) {
                (None, _) => None,
                (Some(r), Some(mut b)) => {
                    b.set_rate(r, now);
                    Some(b)
                }
                (Some(r), None) => Some(TokenBucket::new(r, now)),
            };
        }
        self.current = next;
    }

    /// When the next message may go; None: now.
    pub fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        self.refresh(now);
        self.bucket.as_mut()?.ready_at(now)
    }

    pub fn spend(&mut self, bytes: u64, now: Instant) {
        self.refresh(now);
        if let Some(b) = self.bucket.as_mut() {
            b.spend(bytes, now);
        }
    }

    /// The cap in force now, read from the clock (not the cache).
    pub fn cap_now(&self) -> (Option<u64>, Option<String>) {
        let (cap, w) = self.schedule.now();
        (
            cap,
            w.map(|i| format!("window {}: {}", i + 1, self.schedule.windows[i])),
        )
    }

    fn describe(&self, (cap, w): (Option<u64>, Option<usize>)) -> String {
        let rate = cap.map_or_else(|| "unlimited".to_owned(), show_rate);
        match w {
            Some(i) => format!(
                "{rate} ([[throttle.window]] number {}: {})",
                i + 1,
                self.schedule.windows[i]
            ),
            None => format!("{rate} (throttle.rate, outside every window)"),
        }
    }
}

/// The read side: one bucket shared by every reader of a run.
#[derive(Debug, Clone)]
pub struct ReadLimit {
    pub rate: u64,
    bucket: Arc<Mutex<TokenBucket>>,
}

impl ReadLimit {
    pub fn new(rate: u64) -> ReadLimit {
        ReadLimit {
            rate,
            bucket: Arc::new(Mutex::new(TokenBucket::new(rate, Instant::now()))),
        }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long before the next read may be issued; None: now.
    pub fn wait(&self) -> Option<Duration> {
        let now = Instant::now();
        self.bucket().ready_at(now).map(|at| at - now)
    }

    /// Accounts for a read about to be issued.
    pub fn spend(&self, bytes: u64) {
        self.bucket().spend(bytes, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> RateValue {
        RateValue::Text(s.into())
    }

    fn window(days: Option<&[&str]>, from: &str, to: &str, rate: &str) -> WindowConfig {
        WindowConfig {
            days: days.map(|d| d.iter().map(|s| s.to_string()).collect()),
            from: from.into(),
            to: to.into(),
            rate: text(rate),
        }
    }

    fn schedule(default: Option<&str>, w: Vec<WindowConfig>) -> Result<Schedule, String> {
        Schedule::from_config(&ThrottleConfig {
            rate: default.map(text),
            sync_read_rate: None,
            windows: w,
        })
    }

    #[test]
    fn rates_parse_with_units() {
        let p = |s| parse_rate("k", &text(s));
        assert_eq!(p("2 MiB/s"), Ok(Some(2 << 20)));
        assert_eq!(p("2MiB"), Ok(Some(2 << 20)));
        assert_eq!(p("500 KiB/s"), Ok(Some(500 << 10)));
        assert_eq!(p("100 Mbit/s"), Ok(Some(12_500_000)));
        assert_eq!(p("1.5 MB/s"), Ok(Some(1_500_000)));
        assert_eq!(p("1 GiB/s"), Ok(Some(1 << 30)));
        assert_eq!(p("Unlimited"), Ok(None));
        assert_eq!(
            parse_rate("k", &RateValue::Bytes(1 << 20)),
            Ok(Some(1 << 20))
        );
        for bad in ["", "fast", "10 mbps", "1..2 MiB", "MiB", "-3 MiB/s"] {
            let e = p(bad).expect_err(bad);
            assert!(e.starts_with("k = ") && e.contains("\"20 MiB/s\""), "{e}");
        }
        let zero = parse_rate("throttle.rate", &RateValue::Bytes(0)).expect_err("zero");
        assert!(
            zero.contains("throttle.rate = 0 must be more than 0"),
            "{zero}"
        );
        let low = p("1 KiB/s").expect_err("too low");
        assert!(low.contains("16 KiB/s"), "{low}");
        assert!(!p("0 MiB/s").expect_err("zero text").contains('\n'));
    }

    #[test]
    fn windows_pick_the_cap_by_local_week_minute() {
        let s = schedule(
            Some("10 MiB/s"),
            vec![
                window(Some(&["mon-fri"]), "08:00", "18:00", "2 MiB/s"),
                window(Some(&["fri"]), "22:00", "06:00", "unlimited"),
            ],
        )
        .expect("valid");
        let mib = |n: u64| Some(n << 20);
        assert_eq!(s.at(0, 8 * 60), (mib(2), Some(0)));
        assert_eq!(s.at(4, 18 * 60 - 1), (mib(2), Some(0)));
        assert_eq!(s.at(4, 18 * 60), (mib(10), None));
        assert_eq!(s.at(5, 8 * 60), (mib(10), None), "saturday");
        assert_eq!(s.at(4, 7 * 60 + 59), (mib(10), None));
        // Friday 22:00 runs into Saturday 06:00.
        assert_eq!(s.at(4, 22 * 60), (None, Some(1)));
        assert_eq!(s.at(5, 5 * 60 + 59), (None, Some(1)));
        assert_eq!(s.at(5, 6 * 60), (mib(10), None));
        assert!(!s.is_unlimited());
        assert_eq!(s.windows[1].to_string(), "fri 22:00-06:00");

        // Sunday night wraps into Monday, the start of the week.
        let s = schedule(
            None,
            vec![window(Some(&["sun"]), "23:00", "01:00", "1 MiB/s")],
        )
        .expect("valid");
        assert_eq!(s.at(6, 23 * 60 + 30), (mib(1), Some(0)));
        assert_eq!(s.at(0, 30), (mib(1), Some(0)));
        assert_eq!(s.at(0, 60), (None, None));

        let all_day = schedule(None, vec![window(None, "00:00", "24:00", "3 MiB/s")]).unwrap();
        for d in 0..7 {
            assert_eq!(all_day.at(d, 0), (mib(3), Some(0)));
            assert_eq!(all_day.at(d, 24 * 60 - 1), (mib(3), Some(0)));
        }
        assert!(schedule(None, vec![]).unwrap().is_unlimited());
        let (cap, _) = all_day.now();
        assert_eq!(cap, mib(3));
    }

    #[test]
    fn bad_windows_are_refused_by_key() {
        let one = |w| schedule(None, vec![w]).expect_err("invalid");
        let e = one(window(None, "25:00", "26:00", "1 MiB/s"));
        assert!(
            e.contains("[[throttle.window]] number 1: from = \"25:00\" is not a time; use local time as HH:MM"),
            "{e}"
        );
        let e = one(window(None, "8:00", "18:00", "1 MiB/s"));
        assert!(e.contains("from = \"8:00\""), "{e}");
        let e = one(window(None, "08:00", "24:01", "1 MiB/s"));
        assert!(e.contains("to = \"24:01\""), "{e}");
        let e = one(window(None, "24:00", "06:00", "1 MiB/s"));
        assert!(e.contains("from = \"24:00\""), "{e}");
        let e = one(window(None, "08:00", "08:00", "1 MiB/s"));
        assert!(e.contains("empty window"), "{e}");
        let e = one(window(
            Some(&["mon", "funday"]),
            "08:00",
            "09:00",
            "1 MiB/s",
        ));
        assert!(e.contains("days has \"funday\""), "{e}");
        let e = one(window(Some(&[]), "08:00", "09:00", "1 MiB/s"));
        assert!(e.contains("days is empty"), "{e}");
        let e = one(window(None, "08:00", "09:00", "0"));
        assert!(e.contains("number 1: rate = \"0\""), "{e}");

        let e = schedule(
            None,
            vec![
                window(Some(&["mon-fri"]), "08:00", "18:00", "1 MiB/s"),
                window(Some(&["thursday"]), "22:00", "09:00", "2 MiB/s"),
            ],
        )
        .expect_err("overlap");
        assert!(
            e.contains("number 2 (thu 22:00-09:00) overlaps number 1 (mon,tue,wed,thu,fri 08:00-18:00) at fri 08:00"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        // Touching windows do not overlap.
        schedule(
            None,
            vec![
                window(Some(&["sat-sun"]), "00:00", "12:00", "1 MiB/s"),
                window(Some(&["sat", "sun"]), "12:00", "24:00", "2 MiB/s"),
            ],
        )
        .expect("adjacent windows");
    }

    #[test]
    fn bucket_holds_the_average_and_allows_a_small_burst() {
        let t0 = Instant::now();
        let rate = 1 << 20;
        let mut b = TokenBucket::new(rate, t0);
        // The burst goes at once; then one 1 MiB extent puts it in debt.
        assert_eq!(b.ready_at(t0), None);
        b.spend(1 << 20, t0);
        let at = b.ready_at(t0).expect("in debt");
        let wait = at - t0;
        assert!(
            (0.89..0.91).contains(&wait.as_secs_f64()),
            "{wait:?}: 1 MiB less the 0.1 s burst"
        );
        // Sending every time it is ready: 20 MiB take 20 s (less the burst).
        let mut now = t0;
        let mut sent = 1u64 << 20;
        while sent < 20 << 20 {
            now = b.ready_at(now).unwrap_or(now);
            b.spend(64 << 10, now);
            sent += 64 << 10;
        }
        let secs = (now - t0).as_secs_f64();
        let avg = (sent - (64 << 10)) as f64 / secs;
        assert!(
            (avg / rate as f64 - 1.0).abs() < 0.01,
            "average {avg} over {secs} s"
        );
        // An idle bucket refills only up to the burst.
        let later = now + Duration::from_secs(60);
        b.spend(200 << 10, later);
        assert!(b.ready_at(later).is_some(), "the burst is 0.1 s worth");
    }

    #[test]
    fn a_rate_change_keeps_the_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        b.spend(2 << 20, t0);
        b.set_rate(4 << 20, t0);
        let wait = b.ready_at(t0).expect("debt") - t0;
        assert!((0.47..0.48).contains(&wait.as_secs_f64()), "{wait:?}");
    }

    #[test]
    fn read_limit_waits_once_in_debt() {
        let r = ReadLimit::new(1 << 20);
        assert!(r.wait().is_none());
        r.spend(1 << 20);
        let w = r.wait().expect("in debt");
        assert!(w > Duration::from_millis(800) && w <= Duration::from_millis(900));
    }
}
