//! Typed errors of the engine and the AMQP error conditions it speaks.

use thiserror::Error;

/// A byte sequence that is not valid AMQP.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated input")]
    Truncated,
    #[error("unknown format code 0x{0:02x}")]
    UnknownFormatCode(u8),
    #[error("nesting too deep")]
    TooDeep,
    #[error("invalid encoding: {0}")]
    Invalid(&'static str),
    #[error("missing mandatory field {0}")]
    Missing(&'static str),
    #[error("unknown descriptor {0:#x}")]
    UnknownDescriptor(u64),
}

/// AMQP error condition symbols (spec §2.8.15, §2.8.16, §2.8.17, §2.8.18).
pub mod condition {
    pub const INTERNAL_ERROR: &str = "amqp:internal-error";
    pub const NOT_FOUND: &str = "amqp:not-found";
    pub const UNAUTHORIZED_ACCESS: &str = "amqp:unauthorized-access";
    pub const DECODE_ERROR: &str = "amqp:decode-error";
    pub const RESOURCE_LIMIT_EXCEEDED: &str = "amqp:resource-limit-exceeded";
    pub const NOT_ALLOWED: &str = "amqp:not-allowed";
    pub const INVALID_FIELD: &str = "amqp:invalid-field";
    pub const NOT_IMPLEMENTED: &str = "amqp:not-implemented";
    pub const PRECONDITION_FAILED: &str = "amqp:precondition-failed";
    pub const CONNECTION_FORCED: &str = "amqp:connection:forced";
    pub const FRAMING_ERROR: &str = "amqp:connection:framing-error";
    pub const UNATTACHED_HANDLE: &str = "amqp:session:unattached-handle";
    pub const HANDLE_IN_USE: &str = "amqp:session:handle-in-use";
    pub const WINDOW_VIOLATION: &str = "amqp:session:window-violation";
    pub const ERRANT_LINK: &str = "amqp:session:errant-link";
    pub const DETACH_FORCED: &str = "amqp:link:detach-forced";
    pub const TRANSFER_LIMIT_EXCEEDED: &str = "amqp:link:transfer-limit-exceeded";
    pub const MESSAGE_SIZE_EXCEEDED: &str = "amqp:link:message-size-exceeded";
    pub const REDIRECT: &str = "amqp:link:redirect";
    pub const STOLEN: &str = "amqp:link:stolen";
}

/// A protocol violation by the peer that ends the connection with `condition`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{condition}: {description}")]
pub struct ConnectionError {
    pub condition: &'static str,
    pub description: String,
}

impl ConnectionError {
    pub fn new(condition: &'static str, description: impl Into<String>) -> Self {
        ConnectionError {
            condition,
            description: description.into(),
        }
    }
}

impl From<DecodeError> for ConnectionError {
    fn from(e: DecodeError) -> Self {
        ConnectionError::new(condition::DECODE_ERROR, e.to_string())
    }
}
