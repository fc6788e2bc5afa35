//! Scraping a daemon's Prometheus endpoint with a plain HTTP GET.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context};

/// `GET /metrics`, returning the body after checking status and type.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no header end")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    ensure!(body.trim_end().ends_with("# EOF"), "no # EOF:\n{body}");
    Ok(body.to_owned())
}

/// Samples by `name{labels}` (labels as printed), checking every line is
/// a comment or `series value`.
pub fn parse(text: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .context(format!("bad line {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.insert(series.to_owned(), value);
    }
    Ok(out)
}

/// The sample of `series`, failing with the series present if it is missing.
pub fn get(m: &BTreeMap<String, f64>, series: &str) -> anyhow::Result<f64> {
    m.get(series)
        .copied()
        .with_context(|| format!("{series} missing; have {:#?}", m.keys().collect::<Vec<_>>()))
}
