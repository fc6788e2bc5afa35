//! The tidemark receiver ("master target"): terminates mutual TLS from
//! agents, writes their disks into images, and keeps recovery points.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod export;
pub mod failover;
pub mod image;
pub mod journal;
pub mod listing;
pub mod pki;
pub mod registry;
pub mod server;
pub mod setup;
