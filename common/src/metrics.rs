//! The Prometheus endpoint both daemons can open: `GET /metrics` answered
//! with the OpenMetrics text of a `prometheus-client` registry. Just
//! enough HTTP/1.x for a scraper: one request per connection, no keep-alive,
//! bounded request size and time, so a stray client cannot hold a task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The content type `prometheus-client`'s text encoder produces.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on metrics_listen {addr} ({source}); choose a free port or remove metrics_listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds `addr` and serves `registry` from a task of its own; returns the
/// bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> Result<SocketAddr, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!("metrics on http://{local}/metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &registry).await {
                    warn!("metrics request failed: {e}");
                }
            });
        }
    });
    Ok(local)
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let (status, body, kind) = match route(&head) {
        Route::Metrics => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => ("200 OK", text, CONTENT_TYPE),
                Err(e) => (
                    "500 Internal Server Error",
                    format!("encoding failed: {e}\n"),
                    "text/plain",
                ),
            }
        }
        Route::NotFound => ("404 Not Found", "try /metrics\n".to_owned(), "text/plain"),
        Route::BadMethod => (
            "405 Method Not Allowed",
            "only GET\n".to_owned(),
            "text/plain",
        ),
        Route::Bad => ("400 Bad Request", "bad request\n".to_owned(), "text/plain"),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line ending the request head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_BYTES {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    Bad,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Bad;
    };
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    match target.split('?').next() {
        Some("/metrics") | Some("/") => Route::Metrics,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /nope HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"\xff\xfe"), Route::Bad);
        assert_eq!(route(b""), Route::Bad);
        assert_eq!(route(b"GET /metrics SPDY\r\n\r\n"), Route::Bad);
    }
}
