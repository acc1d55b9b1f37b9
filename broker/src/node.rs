//! A shard as a running one-voter Raft group: opens the durable store, replays the log into
//! the shard state, elects itself, and offers `propose` (a command is applied once it is
//! committed, i.e. durable) and body reads. Effects of applied commands arrive on
//! [`ShardNode::effects`]. Replication to more voters is issue 4; a one-voter group already
//! runs the same code path.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{EntryPayload, OptionalSend, ServerState, SnapshotPolicy};
use tokio::sync::mpsc;

use crate::raft::{Applied, C, Command, LogStore, NodeAddr, SnapshotData, StateMachine};
use crate::shard::Cmd;

/// Storage options of a shard.
#[derive(Debug, Clone, Copy)]
pub struct NodeOptions {
    /// Log segments roll over at this size; compaction deletes whole segments.
    pub segment_bytes: u64,
    /// Log entries between snapshots: a restart replays at most this many.
    pub snapshot_every: u64,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            segment_bytes: 64 * 1024 * 1024,
            snapshot_every: 100_000,
        }
    }
}

/// Network of a one-voter group: there is nobody to talk to.
pub struct NoPeers;

fn alone() -> Unreachable<C> {
    Unreachable::from_string("one-voter shard has no peers")
}

impl RaftNetworkFactory<C> for NoPeers {
    type Network = NoPeers;
    async fn new_client(&mut self, _target: u64, _node: &NodeAddr) -> Self::Network {
        NoPeers
    }
}

impl RaftNetworkV2<C> for NoPeers {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(alone()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(alone()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<C>,
        _snapshot: SnapshotOf<C, SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        Err(StreamingError::Unreachable(alone()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage: {0}")]
    Io(#[from] io::Error),
    #[error("raft: {0}")]
    Raft(String),
    /// This replica is not (or no longer) the leader, or it stopped: the proposal did not
    /// commit here, and may or may not commit under another leader.
    #[error("not the shard's leader")]
    NotLeader,
}

fn raft_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Raft(e.to_string())
}

/// What can propose to and read from a shard; cheap to clone, so many proposals can be in
/// flight at once (openraft batches them into one append: group commit).
#[derive(Clone)]
pub struct ShardHandle {
    raft: openraft::Raft<C, StateMachine>,
    store: LogStore,
    sm: StateMachine,
    /// Held while any handle lives: one process per data directory.
    _lock: Arc<std::fs::File>,
}

pub struct ShardNode {
    handle: ShardHandle,
    sm: StateMachine,
    /// Effects (and carried bodies) of committed commands, in log order.
    pub effects: mpsc::UnboundedReceiver<Applied>,
}

impl ShardNode {
    /// Opens the shard stored in `dir` (creating it), as node `id` and the only voter.
    pub async fn open(dir: &Path, id: u64, now_ms: u64) -> Result<ShardNode, NodeError> {
        ShardNode::open_with(dir, id, now_ms, NodeOptions::default()).await
    }

    /// [`ShardNode::open`] with explicit storage options.
    pub async fn open_with(
        dir: &Path,
        id: u64,
        now_ms: u64,
        opts: NodeOptions,
    ) -> Result<ShardNode, NodeError> {
        let node = ShardNode::start(dir, id, opts, NoPeers).await?;
        let raft = &node.handle.raft;
        if !raft.is_initialized().await.map_err(raft_err)? {
            let members = BTreeMap::from([(id, NodeAddr::default())]);
            raft.initialize(members).await.map_err(raft_err)?;
        }
        raft.wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "shard leader")
            .await
            .map_err(raft_err)?;
        // Wait until the replayed log is applied, then detach the consumers of the previous
        // run: their connections are gone, their messages go back with one more attempt.
        node.propose(&Cmd::Tick { now: now_ms }).await?;
        let stale = node.sm.with_shard(|s| s.consumer_ids())?;
        for consumer in stale {
            node.propose(&Cmd::Detach {
                consumer,
                now: now_ms,
            })
            .await?;
        }
        // Effects of the replay belong to the previous run (its consumers are gone); the new
        // run's consumer ids start again and must not receive them.
        let mut node = node;
        while node.effects.try_recv().is_ok() {}
        Ok(node)
    }

    /// Opens one replica of a replicated shard: node `id` of the group `members` (node id →
    /// address of its broker), reaching its peers through `net`. The member with the lowest id
    /// initializes a new group; the others learn the membership from the leader. Returns at
    /// once: register [`ShardHandle::raft`] with the network server, then
    /// [`ShardHandle::wait_leader`].
    pub async fn open_replica<N>(
        dir: &Path,
        id: u64,
        members: BTreeMap<u64, NodeAddr>,
        net: N,
        opts: NodeOptions,
    ) -> Result<ShardNode, NodeError>
    where
        N: RaftNetworkFactory<C>,
        N::Network: openraft::network::NetSnapshot<C, SnapshotData = SnapshotData>,
    {
        let node = ShardNode::start(dir, id, opts, net).await?;
        let raft = &node.handle.raft;
        let first = members.keys().next().copied();
        if first == Some(id) && !raft.is_initialized().await.map_err(raft_err)? {
            raft.initialize(members).await.map_err(raft_err)?;
        }
        Ok(node)
    }

    /// Opens storage and starts the Raft node (not yet initialized or elected).
    async fn start<N>(
        dir: &Path,
        id: u64,
        opts: NodeOptions,
        net: N,
    ) -> Result<ShardNode, NodeError>
    where
        N: RaftNetworkFactory<C>,
        N::Network: openraft::network::NetSnapshot<C, SnapshotData = SnapshotData>,
    {
        std::fs::create_dir_all(dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "data directory {} is in use by another process",
                    dir.display()
                ),
            )
        })?;
        let store = LogStore::open(dir, opts.segment_bytes)?;
        let (tx, effects) = mpsc::unbounded_channel();
        let sm = StateMachine::open(dir, Some(tx), store.retention())?;
        sm.attach_log(store.clone());
        let config = openraft::Config {
            cluster_name: "enmesh-shard".into(),
            // A restart loads the latest snapshot and replays at most this many entries; the
            // log before it is compacted down to the oldest live message.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(opts.snapshot_every),
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        }
        .validate()
        .map_err(raft_err)?;
        let raft = openraft::Raft::new(id, Arc::new(config), net, store.clone(), sm.clone())
            .await
            .map_err(raft_err)?;
        Ok(ShardNode {
            handle: ShardHandle {
                raft,
                store,
                sm: sm.clone(),
                _lock: Arc::new(lock),
            },
            sm,
            effects,
        })
    }

    /// A handle for proposing and reading concurrently.
    pub fn handle(&self) -> ShardHandle {
        self.handle.clone()
    }

    /// See [`ShardHandle::propose`].
    pub async fn propose(&self, cmd: &Cmd) -> Result<u64, NodeError> {
        self.handle.propose(cmd).await
    }

    /// See [`ShardHandle::body`].
    pub async fn body(&self, seq: u64) -> Result<Vec<u8>, NodeError> {
        self.handle.body(seq).await
    }

    /// Reads the shard state.
    pub fn with_shard<T>(&self, f: impl FnOnce(&crate::shard::Shard) -> T) -> io::Result<T> {
        self.sm.with_shard(f)
    }

    pub async fn shutdown(self) -> Result<(), NodeError> {
        self.handle.raft.shutdown().await.map_err(raft_err)
    }
}

impl ShardHandle {
    /// The Raft node (to register with the network server, read metrics, change membership).
    pub fn raft(&self) -> openraft::Raft<C, StateMachine> {
        self.raft.clone()
    }

    /// Waits until the group has a leader and returns its node id.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64, NodeError> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a shard leader")
            .await
            .map_err(raft_err)?;
        m.current_leader
            .ok_or_else(|| NodeError::Raft("no leader".into()))
    }

    /// Whether this replica has applied every entry of its log.
    pub fn caught_up(&self) -> bool {
        use openraft::rt::WatchReceiver;
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.last_applied.map(|l| l.index) >= m.last_log_index
    }

    /// Whether a message published on `topic` now would reach a subscription of the applied
    /// state (true if the state cannot be read: then the log decides).
    pub fn publishes_to(&self, topic: &str) -> bool {
        self.sm
            .with_shard(|s| s.publishes_to(topic))
            .unwrap_or(true)
    }

    /// Whether subscription `name` exists in the applied state (true if unreadable).
    pub fn has_subscription(&self, name: &str) -> bool {
        self.sm
            .with_shard(|s| s.has_subscription(name))
            .unwrap_or(true)
    }

    /// Consumers attached in the replicated state.
    pub fn consumer_ids(&self) -> Vec<u64> {
        self.sm.with_shard(|s| s.consumer_ids()).unwrap_or_default()
    }

    /// Index of the last log entry this replica applied.
    pub fn raft_applied(&self) -> u64 {
        self.sm.last_applied_index().ok().flatten().unwrap_or(0)
    }

    /// Whether this node is the leader now (its own state, not a rumour).
    pub async fn is_leader(&self) -> bool {
        self.raft
            .wait(Some(Duration::from_millis(1)))
            .state(ServerState::Leader, "leader")
            .await
            .is_ok()
    }

    /// The current leader's node id, if one is known.
    pub async fn leader(&self) -> Option<u64> {
        self.raft.current_leader().await
    }

    /// Counters of the queues (subscriptions included) whose address starts with `prefix`, as
    /// applied so far.
    pub fn queues(&self, prefix: &str) -> Vec<crate::shard::QueueInfo> {
        self.sm.with_shard(|s| s.info(prefix)).unwrap_or_default()
    }

    /// Appends `cmd` to the log and returns its log index once it is committed (durable) and
    /// applied.
    pub async fn propose(&self, cmd: &Cmd) -> Result<u64, NodeError> {
        let r = self
            .raft
            .client_write(Command(cmd.encode()))
            .await
            .map_err(raft_err)?;
        Ok(r.log_id.index)
    }

    /// Appends `cmds` in this order as one batch and returns, once they are all submitted, a
    /// stream of their outcomes in the same order (each resolves when committed and applied).
    /// Submitting the next batch before this one completes keeps the log order.
    pub async fn propose_many(
        &self,
        cmds: impl IntoIterator<Item = Cmd>,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<u64, NodeError>>, NodeError> {
        use futures_util::StreamExt;
        use openraft::errors::ClientWriteError as E;
        let stream = self
            .raft
            .client_write_many(cmds.into_iter().map(|c| Command(c.encode())))
            .await
            .map_err(|_| NodeError::NotLeader)?;
        Ok(stream
            .map(|r| match r {
                Ok(Ok(w)) => Ok(w.log_id.index),
                Ok(Err(E::ForwardToLeader(_) | E::LogEntryDiscarded(_))) | Err(_) => {
                    Err(NodeError::NotLeader)
                }
                Ok(Err(e)) => Err(raft_err(e)),
            })
            .boxed())
    }

    /// Asks for a snapshot without waiting for it.
    pub async fn trigger_snapshot(&self) {
        if let Err(e) = self.raft.trigger().snapshot().await {
            tracing::warn!("snapshot not triggered: {e}");
        }
    }

    /// Takes a snapshot now and waits for it (and the log compaction after it).
    pub async fn snapshot(&self) -> Result<(), NodeError> {
        let target = self.sm.last_applied_index()?;
        self.raft.trigger().snapshot().await.map_err(raft_err)?;
        self.raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.snapshot.is_some_and(|l| Some(l.index) >= target),
                "snapshot taken",
            )
            .await
            .map_err(raft_err)?;
        Ok(())
    }

    /// Log segments on disk.
    pub fn segments(&self) -> usize {
        self.store.segment_count()
    }

    /// The body of message `seq` (from its enqueue or publish entry in the log, which is kept
    /// for as long as the message lives, snapshots or not).
    pub async fn body(&self, seq: u64) -> Result<Vec<u8>, NodeError> {
        let e = match self.store.read_retained(seq) {
            Ok(e) => e,
            // Not in this replica's log: it may have come with an installed snapshot.
            Err(e) => return self.sm.snapshot_body(seq)?.ok_or(NodeError::Io(e)),
        };
        match e.payload {
            EntryPayload::Normal(c) => match Cmd::decode(&c.0)?.into_body() {
                Some(body) => Ok(body),
                None => Err(NodeError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("entry {seq} is not a message"),
                ))),
            },
            _ => Err(NodeError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("entry {seq} is not a message"),
            ))),
        }
    }
}
