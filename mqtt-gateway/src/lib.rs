//! The MQTT gateway (issue 5): MQTT 3.1.1 and 5.0 devices on Enmesh addresses.
//!
//! This crate owns the MQTT side of Enmesh: [`codec`], a sans-IO encoder and decoder for every
//! packet, property and reason code of MQTT 3.1.1 and 5.0; [`topic`], filters and the topic ↔
//! address mapping; [`bridge`], PUBLISH ↔ AMQP message; [`server`], the devices' connections
//! and sessions; [`mux`], the AMQP connections to the router that devices share; [`mgmt`], the
//! router's management API (persistent sessions and retained messages live in broker shards,
//! not here); [`ws`], MQTT over WebSocket.
#![forbid(unsafe_code)]

pub mod bridge;
pub mod codec;
pub mod mgmt;
pub mod mux;
pub mod server;
pub mod topic;
pub mod ws;
