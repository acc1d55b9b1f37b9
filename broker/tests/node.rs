//! A one-voter shard on disk: commands become effects once committed, bodies come back from the
//! log, and a restart replays the log: acknowledged messages stay gone, unacknowledged ones
//! return (one more attempt counted) for the next consumer. Snapshots: the log is compacted
//! down to the oldest live message and never past it, and a restart from a snapshot restores
//! the same state.

use broker::node::{NodeOptions, ShardNode};
use broker::queue::Outcome;
use broker::shard::{Cmd, ShardEffect};

mod common;
use common::TempDir;

fn enqueue(address: &str, body: &[u8]) -> Cmd {
    Cmd::Enqueue {
        address: address.into(),
        now: 1,
        ttl_ms: None,
        absolute_expiry: None,
        body: body.to_vec(),
    }
}

async fn next_deliveries(node: &mut ShardNode, n: usize) -> Vec<(u64, u64, u32)> {
    let mut got = Vec::new();
    while got.len() < n {
        let fx = tokio::time::timeout(std::time::Duration::from_secs(5), node.effects.recv())
            .await
            .expect("effects in time")
            .expect("effects channel open");
        for e in fx.effects {
            if let ShardEffect::Deliver {
                consumer,
                seq,
                delivery_count,
            } = e
            {
                got.push((consumer, seq, delivery_count));
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_restart_and_acked_ones_stay_acked() {
    let d = TempDir::new();
    let seqs;
    {
        let mut node = ShardNode::open(&d.0, 1, 1).await.expect("open");
        let mut s = Vec::new();
        for body in [b"m1", b"m2", b"m3"] {
            s.push(
                node.propose(&enqueue("orders", body))
                    .await
                    .expect("enqueue"),
            );
        }
        seqs = s;
        node.propose(&Cmd::Attach {
            consumer: 7,
            address: "orders".into(),
            credit: 2,
            now: 2,
        })
        .await
        .unwrap();
        let got = next_deliveries(&mut node, 2).await;
        assert_eq!(got, vec![(7, seqs[0], 0), (7, seqs[1], 0)]);
        assert_eq!(node.body(seqs[0]).await.unwrap(), b"m1");
        node.propose(&Cmd::Settle {
            consumer: 7,
            seq: seqs[0],
            outcome: Outcome::Accepted,
            now: 3,
        })
        .await
        .unwrap();
        node.shutdown().await.unwrap();
    }
    // Restart: consumer 7's connection is gone; m2 returns with one attempt counted.
    let mut node = ShardNode::open(&d.0, 1, 10).await.expect("reopen");
    let depth = node
        .with_shard(|s| {
            s.info("")
                .into_iter()
                .find(|q| q.address == "orders")
                .map(|q| q.depth)
        })
        .unwrap();
    assert_eq!(depth, Some(2));
    while node.effects.try_recv().is_ok() {}
    node.propose(&Cmd::Attach {
        consumer: 8,
        address: "orders".into(),
        credit: 10,
        now: 11,
    })
    .await
    .unwrap();
    let got = next_deliveries(&mut node, 2).await;
    assert_eq!(got, vec![(8, seqs[1], 1), (8, seqs[2], 0)]);
    assert_eq!(node.body(seqs[1]).await.unwrap(), b"m2");
    assert_eq!(node.body(seqs[2]).await.unwrap(), b"m3");
    node.shutdown().await.unwrap();
}

async fn settle_all(node: &ShardNode, consumer: u64, seqs: &[u64]) {
    for seq in seqs {
        node.propose(&Cmd::Settle {
            consumer,
            seq: *seq,
            outcome: Outcome::Accepted,
            now: 3,
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_compact_the_log_but_never_a_live_message() {
    let d = TempDir::new();
    let opts = NodeOptions {
        segment_bytes: 4096,
        snapshot_every: 1_000_000,
    };
    let body = [7u8; 100];
    let keep;
    {
        let mut node = ShardNode::open_with(&d.0, 1, 1, opts).await.expect("open");
        // One message nobody consumes, then many that are consumed and acknowledged.
        keep = node.propose(&enqueue("keep", b"oldest")).await.unwrap();
        let mut seqs = Vec::new();
        for _ in 0..300 {
            seqs.push(node.propose(&enqueue("work", &body)).await.unwrap());
        }
        node.propose(&Cmd::Attach {
            consumer: 1,
            address: "work".into(),
            credit: 300,
            now: 2,
        })
        .await
        .unwrap();
        next_deliveries(&mut node, 300).await;
        settle_all(&node, 1, &seqs).await;
        let before = node.handle().segments();
        assert!(before > 10, "{before} segments");
        node.handle().snapshot().await.expect("snapshot");
        // The oldest live message is in the first segment: nothing can go yet.
        assert_eq!(node.handle().segments(), before);
        assert_eq!(node.body(keep).await.unwrap(), b"oldest");
        node.shutdown().await.unwrap();
    }
    {
        // Restart from the snapshot: the kept message is there, the acked ones are not.
        let mut node = ShardNode::open_with(&d.0, 1, 5, opts)
            .await
            .expect("reopen");
        let info = node.with_shard(|s| s.info("")).unwrap();
        let depth = |a: &str| info.iter().find(|q| q.address == a).map(|q| q.depth);
        assert_eq!(depth("keep"), Some(1));
        assert_eq!(depth("work"), Some(0));
        node.propose(&Cmd::Attach {
            consumer: 2,
            address: "keep".into(),
            credit: 1,
            now: 6,
        })
        .await
        .unwrap();
        assert_eq!(next_deliveries(&mut node, 1).await, vec![(2, keep, 0)]);
        assert_eq!(node.body(keep).await.unwrap(), b"oldest");
        settle_all(&node, 2, &[keep]).await;
        // Nothing live any more: the next snapshot compacts the log to its tail.
        node.handle().snapshot().await.expect("snapshot");
        assert!(
            node.handle().segments() <= 2,
            "{}",
            node.handle().segments()
        );
        let s = node.propose(&enqueue("work", b"after")).await.unwrap();
        node.propose(&Cmd::Attach {
            consumer: 3,
            address: "work".into(),
            credit: 5,
            now: 7,
        })
        .await
        .unwrap();
        assert_eq!(next_deliveries(&mut node, 1).await, vec![(3, s, 0)]);
        node.shutdown().await.unwrap();
    }
    // And once more from the compacted log.
    let mut node = ShardNode::open_with(&d.0, 1, 9, opts)
        .await
        .expect("reopen");
    let info = node.with_shard(|s| s.info("")).unwrap();
    assert_eq!(
        info.iter().find(|q| q.address == "work").map(|q| q.depth),
        Some(1)
    );
    node.propose(&Cmd::Attach {
        consumer: 4,
        address: "work".into(),
        credit: 5,
        now: 10,
    })
    .await
    .unwrap();
    let got = next_deliveries(&mut node, 1).await;
    assert_eq!(node.body(got[0].1).await.unwrap(), b"after");
    node.shutdown().await.unwrap();
}
