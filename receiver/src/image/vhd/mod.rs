//! VHD images ("vpc" in qemu). So far: the 512-byte hard disk footer and
//! fixed VHDs for export (the raw disk followed by the footer), the form
//! Azure accepts.

pub mod footer;
