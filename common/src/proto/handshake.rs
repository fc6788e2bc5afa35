//! The preamble each side sends once, before any frame. The two sides agree
//! on the newest protocol version both speak, so agents and receivers of
//! neighbouring releases work together during an upgrade; a receiver
//! refuses an agent with no version in common with a clear message instead
//! of misreading its frames.
//!
//! Agent → receiver, 12 bytes: magic `TIDEMARK`, u16 lowest and u16 highest
//! version it speaks. Receiver → agent, 12 bytes: magic, u16 chosen version
//! (0: none in common, and the receiver closes), u16 zero.

use super::{PROTOCOL_MAX, PROTOCOL_MIN};

/// Opens every tidemark connection, in both directions.
pub const MAGIC: [u8; 8] = *b"TIDEMARK";
/// Length of the preamble in each direction.
pub const PREAMBLE_BYTES: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer is not speaking the tidemark protocol (bad preamble)")]
    BadMagic,
    #[error("no protocol version in common: we speak {}..={}, peer speaks {min}..={max}; upgrade the older side", PROTOCOL_MIN, PROTOCOL_MAX)]
    NoCommonVersion { min: u16, max: u16 },
    #[error(
        "receiver refused protocol versions {}..={}; upgrade the older side",
        PROTOCOL_MIN,
        PROTOCOL_MAX
    )]
    Refused,
    #[error("receiver chose protocol version {chosen}, which we do not speak ({}..={}); upgrade the older side", PROTOCOL_MIN, PROTOCOL_MAX)]
    BadChoice { chosen: u16 },
}

/// What the agent sends.
pub fn agent_preamble() -> [u8; PREAMBLE_BYTES] {
    preamble_offering(PROTOCOL_MIN, PROTOCOL_MAX)
}

/// The preamble of an agent speaking versions `min..=max`: this build's
/// through [`agent_preamble`]; others' in tests of other releases.
pub fn preamble_offering(min: u16, max: u16) -> [u8; PREAMBLE_BYTES] {
    let mut out = [0u8; PREAMBLE_BYTES];
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&min.to_be_bytes());
    out[10..12].copy_from_slice(&max.to_be_bytes());
    out
}

/// The receiver's view: the version to use, or why there is none. On
/// `NoCommonVersion` it still sends [`receiver_reply`]`(0)` so the agent can
/// tell the operator.
pub fn receiver_choose(preamble: &[u8; PREAMBLE_BYTES]) -> Result<u16, HandshakeError> {
    if preamble[..8] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let min = u16::from_be_bytes([preamble[8], preamble[9]]);
    let max = u16::from_be_bytes([preamble[10], preamble[11]]);
    let newest = max.min(PROTOCOL_MAX);
    if newest >= min.max(PROTOCOL_MIN) {
        Ok(newest)
    } else {
        Err(HandshakeError::NoCommonVersion { min, max })
    }
}

/// What the receiver answers; `version` 0 means refused.
pub fn receiver_reply(version: u16) -> [u8; PREAMBLE_BYTES] {
    let mut out = [0u8; PREAMBLE_BYTES];
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&version.to_be_bytes());
    out
}

/// The agent's view of the receiver's answer.
pub fn agent_accept(reply: &[u8; PREAMBLE_BYTES]) -> Result<u16, HandshakeError> {
    if reply[..8] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    match u16::from_be_bytes([reply[8], reply[9]]) {
        0 => Err(HandshakeError::Refused),
        v if (PROTOCOL_MIN..=PROTOCOL_MAX).contains(&v) => Ok(v),
        chosen => Err(HandshakeError::BadChoice { chosen }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_on_the_newest_version_both_speak() {
        let v = receiver_choose(&agent_preamble()).expect("same build agrees");
        assert_eq!(agent_accept(&receiver_reply(v)), Ok(PROTOCOL_MAX));
        // An agent of the first release speaks only version 1.
        assert_eq!(receiver_choose(&preamble_offering(1, 1)), Ok(1));
        // A newer agent that still speaks ours.
        assert_eq!(
            receiver_choose(&preamble_offering(1, PROTOCOL_MAX + 3)),
            Ok(PROTOCOL_MAX)
        );
        // A receiver of the first release answers 1, which we still speak.
        assert_eq!(agent_accept(&receiver_reply(1)), Ok(1));
    }

    #[test]
    fn refuse_other_versions_and_garbage() {
        assert_eq!(
            receiver_choose(&preamble_offering(PROTOCOL_MAX + 1, PROTOCOL_MAX + 4)),
            Err(HandshakeError::NoCommonVersion {
                min: PROTOCOL_MAX + 1,
                max: PROTOCOL_MAX + 4
            })
        );
        assert!(receiver_choose(&preamble_offering(0, 0)).is_err());
        assert_eq!(
            agent_accept(&receiver_reply(PROTOCOL_MAX + 1)),
            Err(HandshakeError::BadChoice {
                chosen: PROTOCOL_MAX + 1
            })
        );
        assert_eq!(
            receiver_choose(b"GET / HTTP/1"),
            Err(HandshakeError::BadMagic)
        );
        assert!(agent_accept(&receiver_reply(0)).is_err());
    }
}
