//! Shared pieces of tidemark: the wire protocol spoken between agent and
//! receiver, TLS set-up, checksums and config loading.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod cli;
pub mod config;
pub mod durable;
pub mod effort;
pub mod metrics;
pub mod proto;
pub mod service;
pub mod tls;

/// Version string of this build, sent in the hello so a receiver can log it.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// zstd's fast level 3, which the agent's compressors and the receiver's
/// journal encoder drop to while compression is what the pipeline waits
/// for: on fio's buffers it compresses 648 MB/s to a 1.34x ratio where
/// level 1 does 257 MB/s to 1.47x (`zstd -b`, one core of the project's
/// VM).
pub const FAST_ZSTD_LEVEL: i32 = -3;
