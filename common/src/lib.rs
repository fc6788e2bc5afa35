//! Shared pieces of tidemark: the wire protocol spoken between agent and
//! receiver, TLS set-up, checksums and config loading.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod cli;
pub mod config;
pub mod durable;
pub mod metrics;
pub mod proto;
pub mod service;
pub mod tls;

/// Version string of this build, sent in the hello so a receiver can log it.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
