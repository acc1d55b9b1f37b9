//! A one-voter shard on disk: commands become effects once committed, bodies come back from the
//! log, and a restart replays the log: acknowledged messages stay gone, unacknowledged ones
//! return (one more attempt counted) for the next consumer.

use broker::node::ShardNode;
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
            s.info()
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
