//! The tidemark agent: finds the protected machine's disks, reads them with
//! io_uring, compresses on a worker pool and ships the data over mutual TLS
//! to a receiver.

pub mod admin;
pub mod compare;
pub mod config;
pub mod consistency;
pub mod disks;
pub mod metrics;
pub mod pipeline;
pub mod priority;
pub mod progress;
pub mod run;
pub mod shipper;
pub mod signals;
pub mod source;
pub mod state;
pub mod sync;
pub mod throttle;
pub mod tracking;
pub mod transport;
