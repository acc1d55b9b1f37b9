//! The MQTT gateway (issue 5): MQTT 3.1.1 and 5.0 devices on Enmesh addresses.
//!
//! This crate owns the MQTT side of Enmesh. Built so far: [`codec`], a sans-IO encoder and
//! decoder for every packet, property and reason code of MQTT 3.1.1 and 5.0 (bytes in,
//! packets out, and back). The server, the topic ↔ address mapping and the session state kept
//! in broker shards build on it.
#![forbid(unsafe_code)]

pub mod bridge;
pub mod codec;
pub mod mux;
pub mod server;
pub mod topic;
pub mod ws;
