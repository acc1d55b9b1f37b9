//! A shard replicated three ways over the real Raft transport (`broker::net`, TCP on
//! localhost): the group elects a leader, commits on a majority, every replica applies the same
//! state; when the leader stops another is elected and takes writes, nothing committed is lost,
//! and the old leader catches up when it comes back.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use broker::net::{NetFactory, Peers, Registry};
use broker::node::{NodeOptions, ShardNode};
use broker::raft::NodeAddr;
use broker::shard::Cmd;
use tokio::net::TcpListener;

mod common;
use common::TempDir;

const SHARD: u32 = 7;

struct Broker {
    registry: Registry,
    addr: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn broker(listener: TcpListener) -> Broker {
    let registry = Registry::default();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(broker::net::serve(listener, registry.clone()));
    Broker {
        registry,
        addr,
        server,
    }
}

async fn open(dir: &Path, id: u64, members: &BTreeMap<u64, NodeAddr>, b: &Broker) -> ShardNode {
    let net = NetFactory {
        shard: SHARD,
        peers: Peers::default(),
    };
    let node = ShardNode::open_replica(dir, id, members.clone(), net, NodeOptions::default())
        .await
        .expect("open replica");
    b.registry.insert(SHARD, node.handle().raft());
    node
}

/// Body size in the snapshot test.
const BIG: usize = 10_000;

fn enqueue(i: u32) -> Cmd {
    enqueue_sized(i, 0)
}

/// Body `m{i}` padded with `.` to at least `len` bytes.
fn body(i: u32, len: usize) -> Vec<u8> {
    let mut b = format!("m{i}").into_bytes();
    if b.len() < len {
        b.resize(len, b'.');
    }
    b
}

fn enqueue_sized(i: u32, len: usize) -> Cmd {
    Cmd::Enqueue {
        address: "q".into(),
        now: 1,
        ttl_ms: None,
        absolute_expiry: None,
        body: body(i, len),
    }
}

fn depth(node: &ShardNode) -> usize {
    node.with_shard(|s| {
        s.info("")
            .into_iter()
            .find(|q| q.address == "q")
            .map_or(0, |q| q.depth)
    })
    .unwrap_or(0)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes on the leader, retrying while a new leader is still establishing itself (it takes
/// writes once its first entry of the term is committed).
async fn propose(node: &ShardNode, cmd: &Cmd) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match node.propose(cmd).await {
            Ok(_) => return,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("not committed: {e}"),
        }
    }
}

/// The node id of the replica that is leader by its own account.
async fn find_leader(nodes: &[Option<ShardNode>]) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        for (i, n) in nodes.iter().enumerate() {
            let Some(n) = n else { continue };
            let me = i as u64 + 1;
            if n.handle().leader().await == Some(me) && n.handle().is_leader().await {
                return me;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_replicate_fail_over_and_catch_up() {
    let dirs = [TempDir::new(), TempDir::new(), TempDir::new()];
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let mut brokers = Vec::new();
    for l in listeners {
        brokers.push(broker(l).await);
    }
    let members: BTreeMap<u64, NodeAddr> = (1..=3u64)
        .map(|id| {
            (
                id,
                NodeAddr {
                    addr: brokers[id as usize - 1].addr.clone(),
                    client: String::new(),
                },
            )
        })
        .collect();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        nodes.push(Some(
            open(
                &dirs[id as usize - 1].0,
                id,
                &members,
                &brokers[id as usize - 1],
            )
            .await,
        ));
    }
    nodes[0]
        .as_ref()
        .unwrap()
        .handle()
        .wait_leader(Duration::from_secs(15))
        .await
        .expect("leader elected");
    let leader = find_leader(&nodes).await;
    let li = leader as usize - 1;
    for i in 0..50 {
        propose(nodes[li].as_ref().unwrap(), &enqueue(i)).await;
    }
    // Every replica applies what was committed.
    for n in nodes.iter().flatten() {
        eventually("replicas apply 50 messages", || depth(n) == 50).await;
    }

    // The leader goes away; the other two elect a new one, which takes writes.
    let old = nodes[li].take().unwrap();
    brokers[li].registry.remove(SHARD);
    old.shutdown().await.unwrap();
    let started = tokio::time::Instant::now();
    let new_leader = find_leader(&nodes).await;
    assert_ne!(new_leader, leader);
    let ni = new_leader as usize - 1;
    eprintln!(
        "fail-over: new leader {new_leader} after {:?}",
        started.elapsed()
    );
    for i in 50..80 {
        propose(nodes[ni].as_ref().unwrap(), &enqueue(i)).await;
    }
    eprintln!(
        "fail-over: writes resumed {:?} after the leader stopped",
        started.elapsed()
    );
    for n in nodes.iter().flatten() {
        eventually("survivors apply 80 messages", || depth(n) == 80).await;
    }

    // The old leader comes back from its disk and catches up, without divergence.
    let back = open(&dirs[li].0, leader, &members, &brokers[li]).await;
    eventually("old leader catches up", || depth(&back) == 80).await;
    let bodies = |n: &ShardNode| n.with_shard(|s| s.info("").len()).unwrap();
    assert_eq!(bodies(&back), bodies(nodes[ni].as_ref().unwrap()));
    for seq in [3u64, 40, 70] {
        let a = back.body(seq).await.ok();
        let b = nodes[ni].as_ref().unwrap().body(seq).await.ok();
        assert_eq!(a, b, "entry {seq} differs between replicas");
    }
    back.shutdown().await.unwrap();
    for n in nodes.into_iter().flatten() {
        n.shutdown().await.unwrap();
    }
    for b in brokers {
        b.server.abort();
    }
}

/// A replica that joins after the log was compacted gets a snapshot, and with it the bodies of
/// the live messages it covers (it never saw their log entries): it can deliver them, also
/// after its own restart. Bodies of 10 KB make the snapshot ~3 MB: it travels in several
/// chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replica_gets_a_snapshot_with_the_bodies_of_live_messages() {
    let dirs = [TempDir::new(), TempDir::new(), TempDir::new()];
    let mut brokers = Vec::new();
    for _ in 0..3 {
        brokers.push(broker(TcpListener::bind("127.0.0.1:0").await.unwrap()).await);
    }
    let members: BTreeMap<u64, NodeAddr> = (1..=3u64)
        .map(|id| {
            let addr = brokers[id as usize - 1].addr.clone();
            (
                id,
                NodeAddr {
                    addr,
                    client: String::new(),
                },
            )
        })
        .collect();
    let opts = NodeOptions {
        segment_bytes: 4096,
        snapshot_every: 1_000_000,
    };
    let open3 = |i: usize| {
        let members = members.clone();
        let dir = dirs[i].0.clone();
        let registry = brokers[i].registry.clone();
        async move {
            let net = NetFactory {
                shard: SHARD,
                peers: Peers::default(),
            };
            let node = ShardNode::open_replica(&dir, i as u64 + 1, members, net, opts)
                .await
                .expect("open replica");
            registry.insert(SHARD, node.handle().raft());
            node
        }
    };
    // Replica 3 is away while 1 and 2 (a majority) take 300 messages and compact their logs.
    let mut nodes = vec![Some(open3(0).await), Some(open3(1).await), None];
    let leader = find_leader(&nodes).await as usize - 1;
    let mut seqs = Vec::new();
    for i in 0..300 {
        seqs.push(propose_seq(nodes[leader].as_ref().unwrap(), &enqueue_sized(i, BIG)).await);
    }
    nodes[leader]
        .as_ref()
        .unwrap()
        .handle()
        .snapshot()
        .await
        .expect("snapshot");
    // Replica 3 joins: Raft must send it the snapshot (the entries are purged from Raft's view).
    nodes[2] = Some(open3(2).await);
    let third = nodes[2].as_ref().unwrap();
    eventually("replica 3 applies the snapshot", || depth(third) == 300).await;
    for (i, seq) in seqs.iter().enumerate().step_by(37) {
        assert_eq!(
            third.body(*seq).await.expect("body on the late replica"),
            body(i as u32, BIG)
        );
    }
    // The bodies came with the snapshot, not through log replication.
    let carried = std::fs::metadata(dirs[2].0.join("snapshot-bodies")).map_or(0, |m| m.len());
    assert!(
        carried >= 300 * BIG as u64,
        "snapshot carried {carried} bytes of bodies"
    );
    assert!(carried > 2 * broker::net::SNAPSHOT_CHUNK as u64);
    // After its own restart, from its disk.
    let third = nodes[2].take().unwrap();
    brokers[2].registry.remove(SHARD);
    third.shutdown().await.unwrap();
    let third = open3(2).await;
    eventually("replica 3 back", || depth(&third) == 300).await;
    assert_eq!(third.body(seqs[299]).await.unwrap(), body(299, BIG));
    assert_eq!(third.body(seqs[0]).await.unwrap(), body(0, BIG));
    third.shutdown().await.unwrap();
    for n in nodes.into_iter().flatten() {
        n.shutdown().await.unwrap();
    }
    for b in brokers {
        b.server.abort();
    }
}

async fn propose_seq(node: &ShardNode, cmd: &Cmd) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match node.propose(cmd).await {
            Ok(seq) => return seq,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("not committed: {e}"),
        }
    }
}
