//! The broker task: many producers' messages committed in batches, then delivered in order
//! with their bodies to a consumer that settles them.

use broker::node::ShardNode;
use broker::queue::Outcome;
use broker::service::{self, Request};
use tokio::sync::mpsc;

mod common;
use common::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_commit_deliver_settle() {
    let d = TempDir::new();
    let node = ShardNode::open(&d.0, 1, service::now_ms()).await.unwrap();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (dl_tx, mut dl_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(service::run(node, req_rx, dl_tx, done_tx));

    const N: usize = 500;
    for i in 0..N {
        req_tx
            .send(Request::Enqueue {
                address: "work".into(),
                ttl_ms: None,
                absolute_expiry: None,
                body: format!("job-{i}").into_bytes(),
                done: Some(i as u64),
                dedup: None,
            })
            .unwrap();
    }
    let mut committed = std::collections::BTreeSet::new();
    while committed.len() < N {
        for (tag, r) in done_rx.recv().await.expect("completions") {
            r.expect("committed");
            assert!(committed.insert(tag));
        }
    }
    req_tx
        .send(Request::Attach {
            consumer: 1,
            address: "work".into(),
            credit: N as u32,
        })
        .unwrap();
    let mut got = Vec::new();
    while got.len() < N {
        let batch = tokio::time::timeout(std::time::Duration::from_secs(10), dl_rx.recv())
            .await
            .expect("deliveries in time")
            .expect("open");
        got.extend(batch);
    }
    for (i, dlv) in got.iter().enumerate() {
        assert_eq!(dlv.consumer, 1);
        assert_eq!(dlv.body, format!("job-{i}").into_bytes(), "FIFO order");
        req_tx
            .send(Request::Settle {
                consumer: 1,
                seq: dlv.seq,
                outcome: Outcome::Accepted,
                done: None,
            })
            .unwrap();
    }
    // A topic publish reaches a durable subscriber.
    req_tx
        .send(Request::Subscribe {
            consumer: 2,
            name: "audit".into(),
            filter: "events/#".into(),
            durable: true,
            credit: 10,
        })
        .unwrap();
    req_tx
        .send(Request::Publish {
            topic: "events/login".into(),
            ttl_ms: None,
            absolute_expiry: None,
            body: b"alice".to_vec(),
            done: Some(7777),
            dedup: None,
        })
        .unwrap();
    let c = done_rx.recv().await.unwrap();
    assert_eq!(c, vec![(7777, Ok(()))]);
    let batch = tokio::time::timeout(std::time::Duration::from_secs(10), dl_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch[0].consumer, 2);
    assert_eq!(batch[0].body, b"alice");
    drop(req_tx);
    task.await.unwrap();
}
