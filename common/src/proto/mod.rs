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
pub use messages::{ErrorCode, Message, PointKind, MAX_EXTENT_BYTES};

/// Protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 1;
