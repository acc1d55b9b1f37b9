//! `enmesh-broker`: broker shards (store-and-forward addresses).
//!
//! Built so far: [`log`], the segmented, checksummed log with crash recovery; [`raft`], the only
//! module that sees openraft (type config, the durable log store with group commit, the
//! Raft-facing state machine shell); [`queue`], one queue as a deterministic state machine.
//! To come (issue 3): shard commands wiring queues behind the state machine, topics and
//! subscriptions, snapshots of real state, the router integration and `enmesh broker`.
#![forbid(unsafe_code)]

pub mod log;
pub mod node;
pub mod queue;
pub mod raft;
pub mod shard;
pub mod wire;
