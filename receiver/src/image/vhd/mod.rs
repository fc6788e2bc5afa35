//! VHD images ("vpc" in qemu). The 512-byte hard disk footer, and fixed
//! VHDs (the raw disk followed by the footer, the form Azure accepts) as
//! live images and exports.

pub mod fixed;
pub mod footer;
