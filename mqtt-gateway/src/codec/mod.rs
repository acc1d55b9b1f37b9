//! Sans-IO MQTT 3.1.1 / 5.0 codec: [`decode`] takes the bytes received so far and returns the
//! next whole packet (or `None` until it has arrived); [`encode`] appends a packet's bytes.
//!
//! The decoder never trusts a length: the fixed header's remaining length is checked against
//! the caller's maximum packet size before anything is buffered for it, every field read is
//! bounds-checked, and a packet must be consumed exactly by its fields. Errors say which MQTT 5
//! reason code they deserve ([`DecodeError::reason`]): malformed packet (0x81), protocol error
//! (0x82), packet too large (0x95), unsupported protocol version (0x84).
//!
//! Bodies are `Bytes` slices of the input (no copy of a payload on decode).

mod packet;
mod props;
mod wire;

#[cfg(test)]
mod tests;

pub use packet::*;
pub use props::Properties;

use bytes::{Bytes, BytesMut};

/// Protocol level in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Version {
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 reason codes (also the 3.1.1 CONNACK return codes 0–5, which the encoder maps).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const GRANTED_QOS_2: u8 = 0x02;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    pub const RE_AUTHENTICATE: u8 = 0x19;
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const USE_ANOTHER_SERVER: u8 = 0x9C;
    pub const SERVER_MOVED: u8 = 0x9D;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

    /// The reason codes each packet may carry (MQTT 5 §3.x, one table per packet).
    pub const CONNACK: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
        0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ];
    /// PUBACK and PUBREC.
    pub const PUBACK: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    /// PUBREL and PUBCOMP.
    pub const PUBREL: &[u8] = &[0x00, 0x92];
    pub const SUBACK: &[u8] = &[
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
    ];
    pub const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    pub const DISCONNECT: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
        0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    pub const AUTH: &[u8] = &[0x00, 0x18, 0x19];

    /// Whether `code` is a reason code MQTT 5 defines at all.
    pub fn is_known(code: u8) -> bool {
        matches!(
            code,
            0x00..=0x02 | 0x04 | 0x10 | 0x11 | 0x18 | 0x19 | 0x80..=0xA2
        )
    }

    /// The MQTT 3.1.1 CONNACK return code closest to a CONNACK reason code.
    pub fn to_v311_connack(code: u8) -> u8 {
        match code {
            SUCCESS => 0,
            UNSUPPORTED_PROTOCOL_VERSION => 1,
            CLIENT_IDENTIFIER_NOT_VALID => 2,
            SERVER_UNAVAILABLE
            | SERVER_BUSY
            | SERVER_SHUTTING_DOWN
            | USE_ANOTHER_SERVER
            | SERVER_MOVED
            | CONNECTION_RATE_EXCEEDED => 3,
            BAD_USER_NAME_OR_PASSWORD | BAD_AUTHENTICATION_METHOD => 4,
            _ => 5,
        }
    }

    /// The CONNACK reason code for an MQTT 3.1.1 return code.
    pub fn from_v311_connack(code: u8) -> u8 {
        match code {
            0 => SUCCESS,
            1 => UNSUPPORTED_PROTOCOL_VERSION,
            2 => CLIENT_IDENTIFIER_NOT_VALID,
            3 => SERVER_UNAVAILABLE,
            4 => BAD_USER_NAME_OR_PASSWORD,
            _ => NOT_AUTHORIZED,
        }
    }
}

/// Why bytes are not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes break the packet's format (MQTT 5: 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed, but not allowed here (MQTT 5: 0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The remaining length exceeds the maximum packet size (MQTT 5: 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// CONNECT with a protocol name or level this server does not speak (CONNACK 0x84 /
    /// 3.1.1 return code 1).
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
}

impl DecodeError {
    /// The MQTT 5 reason code for a CONNACK or DISCONNECT reporting this error.
    pub fn reason(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

/// The most a remaining length can say (four bytes of variable byte integer).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Decodes the next packet from `buf`. `version` is the connection's protocol version, `None`
/// before CONNECT (then only CONNECT is accepted, and it sets the version). `max_size` bounds
/// the whole packet (fixed header included). Returns the packet and the bytes it used, or
/// `None` if more bytes are needed; the caller removes the used bytes from its buffer.
pub fn decode(
    buf: &BytesMut,
    version: Option<Version>,
    max_size: usize,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some((first, len, header)) = wire::fixed_header(buf)? else {
        return Ok(None);
    };
    let total = header + len;
    if total > max_size {
        return Err(DecodeError::TooLarge {
            size: total,
            max: max_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    // One cheap clone of the buffer's head: payloads are slices of it.
    let body = Bytes::copy_from_slice(&buf[header..total]);
    let packet = packet::decode_body(first, body, version)?;
    Ok(Some((packet, total)))
}

/// Like [`decode`] over an immutable slice (tests, fuzzing).
pub fn decode_slice(
    buf: &[u8],
    version: Option<Version>,
    max_size: usize,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    decode(&BytesMut::from(buf), version, max_size)
}

/// Appends `p`'s bytes for a connection speaking `version`. Fields the version lacks
/// (properties, reason codes under 3.1.1) are left out.
pub fn encode(p: &Packet, version: Version, out: &mut BytesMut) {
    packet::encode(p, version, out);
}
