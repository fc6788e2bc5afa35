//! The preamble each side sends once, before any frame. It lets a receiver
//! refuse an agent speaking another protocol version with a clear message
//! instead of misreading its frames.
//!
//! Agent → receiver, 12 bytes: magic `TIDEMARK`, u16 lowest and u16 highest
//! version it speaks. Receiver → agent, 12 bytes: magic, u16 chosen version
//! (0: none in common, and the receiver closes), u16 zero.

use super::PROTOCOL_VERSION;

/// Opens every tidemark connection, in both directions.
pub const MAGIC: [u8; 8] = *b"TIDEMARK";
/// Length of the preamble in each direction.
pub const PREAMBLE_BYTES: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer is not speaking the tidemark protocol (bad preamble)")]
    BadMagic,
    #[error("no protocol version in common: we speak {ours}, peer speaks {min}..={max}; upgrade the older side")]
    NoCommonVersion { ours: u16, min: u16, max: u16 },
    #[error("receiver refused protocol version {ours}; upgrade the older side")]
    Refused { ours: u16 },
}

/// What the agent sends.
pub fn agent_preamble() -> [u8; PREAMBLE_BYTES] {
    let mut out = [0u8; PREAMBLE_BYTES];
    out[..8].copy_from_slice(&MAGIC);
    out[8..10].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out[10..12].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
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
    if (min..=max).contains(&PROTOCOL_VERSION) {
        Ok(PROTOCOL_VERSION)
    } else {
        Err(HandshakeError::NoCommonVersion {
            ours: PROTOCOL_VERSION,
            min,
            max,
        })
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
        0 => Err(HandshakeError::Refused {
            ours: PROTOCOL_VERSION,
        }),
        v if v == PROTOCOL_VERSION => Ok(v),
        _ => Err(HandshakeError::Refused {
            ours: PROTOCOL_VERSION,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_on_our_version() {
        let v = receiver_choose(&agent_preamble()).expect("same build agrees");
        assert_eq!(agent_accept(&receiver_reply(v)), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn refuse_other_versions_and_garbage() {
        let mut p = agent_preamble();
        p[8..12].copy_from_slice(&[0, 7, 0, 9]);
        assert!(matches!(
            receiver_choose(&p),
            Err(HandshakeError::NoCommonVersion { min: 7, max: 9, .. })
        ));
        assert_eq!(
            receiver_choose(b"GET / HTTP/1"),
            Err(HandshakeError::BadMagic)
        );
        assert!(agent_accept(&receiver_reply(0)).is_err());
    }
}
