//! Fault-injecting simulation of a three-replica shard, many seeds: the replicas talk through a
//! network that drops requests and answers, delays and so reorders them, and partitions nodes
//! away; nodes are stopped and restarted from their disks. A client proposes enqueues and
//! acknowledgements throughout. Checked (design.md §4):
//! - invariant 1: every enqueue the shard committed (the producer's `accepted`) is, after the
//!   heal, held by every replica unless it was acknowledged;
//! - invariant 2: no acknowledged message is held anywhere after the heal (it cannot be
//!   delivered again);
//! - invariant 6: a node cut off in a minority never commits a write;
//! - and all replicas converge to the same queue state.
//!
//! `ENMESH_SIM_SEEDS` (default 4) sets how many seeds run; a failure names its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::node::{NodeOptions, ShardNode};
use broker::queue::Outcome;
use broker::raft::{C, NodeAddr, SnapshotData, StateMachine};
use broker::shard::Cmd;
use openraft::OptionalSend;
use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};

mod common;
use common::TempDir;

type Raft = openraft::Raft<C, StateMachine>;

/// xorshift64*: a seeded, dependency-free generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct World {
    rafts: HashMap<u64, Raft>,
    /// Nodes cut off from everyone else.
    isolated: HashSet<u64>,
    drop_percent: u64,
    rng: Option<Rng>,
}

#[derive(Clone)]
struct SimNet {
    me: u64,
    world: Arc<Mutex<World>>,
}

struct SimClient {
    me: u64,
    target: u64,
    world: Arc<Mutex<World>>,
}

impl RaftNetworkFactory<C> for SimNet {
    type Network = SimClient;
    async fn new_client(&mut self, target: u64, _node: &NodeAddr) -> SimClient {
        SimClient {
            me: self.me,
            target,
            world: self.world.clone(),
        }
    }
}

fn lost() -> Unreachable<C> {
    Unreachable::from_string("dropped by the simulated network")
}

impl SimClient {
    /// Decides this message's fate: `None` = dropped; else the delay before delivery and the
    /// target's Raft.
    fn route(&self) -> Option<(Duration, Raft)> {
        let mut w = self.world.lock().ok()?;
        if w.isolated.contains(&self.me) || w.isolated.contains(&self.target) {
            return None;
        }
        let drop = w.drop_percent;
        let rng = w.rng.as_mut()?;
        if rng.chance(drop) {
            return None;
        }
        let delay = Duration::from_micros(rng.below(4000));
        let raft = w.rafts.get(&self.target)?.clone();
        Some((delay, raft))
    }

    /// Whether the answer is lost on the way back (the request took effect).
    fn answer_lost(&self) -> bool {
        let Ok(mut w) = self.world.lock() else {
            return true;
        };
        let drop = w.drop_percent;
        let isolated = w.isolated.contains(&self.me) || w.isolated.contains(&self.target);
        isolated || w.rng.as_mut().is_none_or(|r| r.chance(drop))
    }

    async fn call<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
        &self,
        f: impl FnOnce(Raft) -> F,
    ) -> Result<T, Unreachable<C>> {
        let Some((delay, raft)) = self.route() else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            return Err(lost());
        };
        tokio::time::sleep(delay).await;
        let r = f(raft).await.map_err(|e| Unreachable::from_string(e))?;
        if self.answer_lost() {
            return Err(lost());
        }
        Ok(r)
    }
}

impl RaftNetworkV2<C> for SimClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.call(|r| async move { r.append_entries(rpc).await })
            .await
            .map_err(RPCError::Unreachable)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(|r| async move { r.vote(rpc).await })
            .await
            .map_err(RPCError::Unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        self.call(|r| async move { r.install_full_snapshot(vote, snapshot).await })
            .await
            .map_err(StreamingError::Unreachable)
    }
}

struct Cluster {
    dirs: Vec<TempDir>,
    nodes: Vec<Option<ShardNode>>,
    world: Arc<Mutex<World>>,
    members: BTreeMap<u64, NodeAddr>,
}

impl Cluster {
    async fn start(&mut self, i: usize) {
        let id = i as u64 + 1;
        let net = SimNet {
            me: id,
            world: self.world.clone(),
        };
        let opts = NodeOptions {
            segment_bytes: 8192,
            snapshot_every: 40,
        };
        let node = ShardNode::open_replica(&self.dirs[i].0, id, self.members.clone(), net, opts)
            .await
            .expect("open replica");
        if let Ok(mut w) = self.world.lock() {
            w.rafts.insert(id, node.handle().raft());
        }
        self.nodes[i] = Some(node);
    }

    async fn stop(&mut self, i: usize) {
        if let Ok(mut w) = self.world.lock() {
            w.rafts.remove(&(i as u64 + 1));
        }
        if let Some(n) = self.nodes[i].take() {
            let _ = n.shutdown().await;
        }
    }

    /// A node that is leader by its own account, if any.
    async fn leader(&self) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            if n.handle().leader().await == Some(i as u64 + 1) && n.handle().is_leader().await {
                return Some(i);
            }
        }
        None
    }

    fn live(&self, i: usize) -> Option<BTreeSet<u64>> {
        self.nodes[i]
            .as_ref()
            .map(|n| n.with_shard(|s| s.live_seqs()).unwrap_or_default())
    }

    fn applied(&self, i: usize) -> Option<u64> {
        self.nodes[i].as_ref().map(|n| n.handle().raft_applied())
    }
}

async fn propose(node: &ShardNode, cmd: &Cmd) -> Option<u64> {
    tokio::time::timeout(Duration::from_millis(300), node.propose(cmd))
        .await
        .ok()
        .and_then(Result::ok)
}

fn enqueue(i: u64) -> Cmd {
    Cmd::Enqueue {
        address: "q".into(),
        now: 1,
        ttl_ms: None,
        absolute_expiry: None,
        body: i.to_be_bytes().to_vec(),
    }
}

async fn run_seed(seed: u64) {
    let world = Arc::new(Mutex::new(World {
        drop_percent: 10,
        rng: Some(Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)),
        ..Default::default()
    }));
    let members: BTreeMap<u64, NodeAddr> = (1..=3u64).map(|id| (id, NodeAddr::default())).collect();
    let mut c = Cluster {
        dirs: vec![TempDir::new(), TempDir::new(), TempDir::new()],
        nodes: vec![None, None, None],
        world: world.clone(),
        members,
    };
    for i in 0..3 {
        c.start(i).await;
    }
    let mut rng = Rng(seed ^ 0x5555_5555 | 1);
    let mut accepted: BTreeSet<u64> = BTreeSet::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut maybe_acked: BTreeSet<u64> = BTreeSet::new();
    let mut attached = false;
    let mut n = 0u64;
    for step in 0..160 {
        // Faults.
        match rng.below(40) {
            0 => {
                let i = rng.below(3) as usize;
                if c.nodes[i].is_some() && c.nodes.iter().filter(|x| x.is_some()).count() == 3 {
                    c.stop(i).await;
                }
            }
            1 | 2 => {
                for i in 0..3 {
                    if c.nodes[i].is_none() {
                        c.start(i).await;
                    }
                }
            }
            3 => {
                // Cut the current leader off: the minority must not commit (invariant 6).
                if let Some(l) = c.leader().await {
                    if let Ok(mut w) = world.lock() {
                        w.isolated.insert(l as u64 + 1);
                    }
                    let cut = c.nodes[l].as_ref().unwrap();
                    n += 1;
                    let r =
                        tokio::time::timeout(Duration::from_millis(400), cut.propose(&enqueue(n)))
                            .await;
                    assert!(
                        !matches!(r, Ok(Ok(_))),
                        "seed {seed} step {step}: node {} committed a write while cut off",
                        l + 1
                    );
                }
            }
            4 | 5 => {
                if let Ok(mut w) = world.lock() {
                    w.isolated.clear();
                }
            }
            _ => {}
        }
        // Work, on whichever node leads (none: try again next step).
        let Some(l) = c.leader().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let node = c.nodes[l].as_ref().unwrap();
        if !attached {
            // One consumer with plenty of credit: every message is held by it until acked.
            let cmd = Cmd::Attach {
                consumer: 1,
                address: "q".into(),
                credit: 1_000_000,
                now: 1,
            };
            attached = propose(node, &cmd).await.is_some();
            continue;
        }
        n += 1;
        if let Some(seq) = propose(node, &enqueue(n)).await {
            accepted.insert(seq);
        }
        if rng.chance(40) {
            let pending: Vec<u64> = accepted
                .iter()
                .filter(|s| !acked.contains(s) && !maybe_acked.contains(s))
                .copied()
                .collect();
            if !pending.is_empty() {
                let seq = pending[rng.below(pending.len() as u64) as usize];
                let cmd = Cmd::Settle {
                    consumer: 1,
                    seq,
                    outcome: Outcome::Accepted,
                    now: 1,
                };
                if propose(node, &cmd).await.is_some() {
                    acked.insert(seq);
                } else {
                    // No answer: the acknowledgement may or may not have been committed.
                    maybe_acked.insert(seq);
                }
            }
        }
    }
    // Heal everything and let the replicas converge.
    if let Ok(mut w) = world.lock() {
        w.isolated.clear();
        w.drop_percent = 0;
    }
    for i in 0..3 {
        if c.nodes[i].is_none() {
            c.start(i).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut nudged = false;
    loop {
        // One fresh write on the leader makes every replica apply everything before it.
        let leader = if nudged { None } else { c.leader().await };
        if let Some(l) = leader {
            nudged = propose(c.nodes[l].as_ref().unwrap(), &Cmd::Tick { now: 2 })
                .await
                .is_some();
        }
        let applied: Vec<Option<u64>> = (0..3).map(|i| c.applied(i)).collect();
        let states: Vec<Option<BTreeSet<u64>>> = (0..3).map(|i| c.live(i)).collect();
        let same =
            applied.iter().all(|a| *a == applied[0]) && states.iter().all(|s| *s == states[0]);
        if nudged && same {
            let live = states[0].clone().unwrap_or_default();
            for seq in &accepted {
                if acked.contains(seq) {
                    assert!(
                        !live.contains(seq),
                        "seed {seed}: acknowledged message {seq} is still held (invariant 2)"
                    );
                } else if !maybe_acked.contains(seq) {
                    assert!(
                        live.contains(seq),
                        "seed {seed}: accepted message {seq} was lost (invariant 1)"
                    );
                }
            }
            eprintln!(
                "seed {seed}: {} accepted, {} acked, {} held, converged",
                accepted.len(),
                acked.len(),
                live.len()
            );
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            for n in c.nodes.iter().flatten() {
                let m = n.handle().raft().metrics();
                eprintln!(
                    "{:?}",
                    openraft::rt::WatchReceiver::borrow_watched(&m).clone()
                );
            }
            panic!("seed {seed}: replicas did not converge: applied {applied:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..3 {
        c.stop(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_invariants_under_loss_reordering_partitions_and_restarts() {
    let seeds: u64 = std::env::var("ENMESH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    for seed in 1..=seeds {
        run_seed(seed).await;
    }
}
