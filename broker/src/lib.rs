//! `enmesh-broker`: broker shards (store-and-forward addresses).
//!
//! Built so far: [`log`], the segmented, checksummed log with crash recovery; [`raft`], the only
//! module that sees openraft (type config, the durable log store with group commit, the state
//! machine that applies committed [`shard::Cmd`]s and snapshots the shard state); [`shard`],
//! [`queue`] and [`seqset`], the deterministic shard state and its compact backlog
//! representation; [`node`], a shard as a running one-voter Raft group; [`service`], the task
//! the router talks to; [`remote`], that interface over TCP for `enmesh broker`; [`net`], the
//! Raft transport between brokers; [`cluster`], a broker process hosting replicated shards.
//! To come (issue 4): links that survive a leader change, membership changes.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod log;
pub mod net;
pub mod node;
pub mod queue;
pub mod raft;
pub mod remote;
pub mod seqset;
pub mod service;
pub mod shard;
pub mod topic;
pub mod volatile;
pub mod wire;
