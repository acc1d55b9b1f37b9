//! `enmesh-broker`: broker shards (store-and-forward addresses).
//!
//! Built so far: [`log`], the segmented, checksummed, group-committed log that a shard's Raft
//! log is stored in, with crash recovery. To come (issue 3): the openraft storage adapter, the
//! shard state machine (queues, topics, subscriptions), snapshots and the router integration.
#![forbid(unsafe_code)]

pub mod log;
pub mod queue;
pub mod raft;
