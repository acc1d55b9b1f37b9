//! `enmesh-amqp`: the sans-IO AMQP 1.0 engine shared by the router, the CLI and the bench tool.
//!
//! It owns the wire format (type system, frames, performatives, SASL) and the connection state
//! machine (sessions, links, credit, settlement bookkeeping, multi-frame deliveries, idle
//! timeout). It does no I/O and reads no clock: callers feed bytes and the current time, and
//! write out what it produces. Message bodies are carried as `Bytes` slices of what was read,
//! never re-encoded.
#![forbid(unsafe_code)]

#[cfg(feature = "client")]
pub mod client;
pub mod codec;
pub mod connection;
pub mod error;
pub mod frames;
pub mod message;
#[cfg(feature = "client")]
pub mod pipe;
pub mod sasl;

pub use codec::Value;
pub use connection::{
    AttachReply, AttachRequest, Config, Connection, Delivery, Event, Fatal, LinkId,
};
pub use error::{ConnectionError, DecodeError, condition};
pub use frames::{DeliveryState, ErrorCondition, Role, Terminus};
