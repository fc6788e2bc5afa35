//! The tidemark wire protocol, spoken inside mutual TLS. `docs/PROTOCOL.md`
//! describes every byte; this module is its only implementation.
//!
//! - [`handshake`]: the 12-byte preamble each side sends first.
//! - [`frame`]: length-prefixed frames with a hard size limit.
//! - [`messages`]: the typed messages carried by frames.
//! - [`codec`]: the bounds-checked byte reader/writer they are built on.

pub mod codec;
pub mod frame;
pub mod handshake;
pub mod messages;

pub use codec::DecodeError;
pub use frame::{FrameError, MAX_FRAME_BYTES};
pub use messages::{ErrorCode, ExtentSum, Message, PointKind, SumKind, MAX_EXTENT_BYTES};

/// Oldest protocol version this build speaks: agents and receivers are
/// upgraded one machine at a time, so each side keeps speaking the
/// versions the other may still have.
pub const PROTOCOL_MIN: u16 = 1;
/// Newest protocol version this build speaks; a connection uses the newest
/// both sides speak. Version 2 added CRC32C extent checksums.
pub const PROTOCOL_MAX: u16 = 2;
