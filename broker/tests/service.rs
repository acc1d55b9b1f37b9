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
                body: format!("job-{i}").into_bytes().into(),
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
            body: bytes::Bytes::from_static(b"alice"),
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
    assert_eq!(batch[0].body, &b"alice"[..]);
    drop(req_tx);
    task.await.unwrap();
}

fn publish(topic: &str, body: &str, tag: u64) -> Request {
    Request::Publish {
        topic: topic.into(),
        ttl_ms: None,
        absolute_expiry: None,
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        done: Some(tag),
        dedup: None,
    }
}

/// A message published only to non-durable subscriptions does not enter the log; one that
/// also reaches a durable subscription does, and both kinds receive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_durable_subscriptions_are_served_without_the_log() {
    use std::time::Duration;
    let d = TempDir::new();
    let node = ShardNode::open(&d.0, 1, service::now_ms()).await.unwrap();
    let h = node.handle();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (dl_tx, mut dl_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(service::run(node, req_rx, dl_tx, done_tx));
    let info = |tx: &mpsc::UnboundedSender<Request>| {
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(Request::Info {
            prefix: "$sub:".into(),
            reply,
        })
        .unwrap();
        rx
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    req_tx
        .send(Request::Subscribe {
            consumer: 1,
            name: "live".into(),
            filter: "t/#".into(),
            durable: false,
            credit: 1000,
        })
        .unwrap();
    let before = h.raft_applied();
    const N: u64 = 200;
    for i in 0..N {
        req_tx.send(publish("t/a", &format!("m{i}"), i)).unwrap();
    }
    let mut done = 0;
    while done < N {
        for (_, r) in done_rx.recv().await.unwrap() {
            r.unwrap();
            done += 1;
        }
    }
    let mut got = Vec::new();
    while got.len() < N as usize {
        got.extend(
            tokio::time::timeout(Duration::from_secs(5), dl_rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    for (i, dlv) in got.iter().enumerate() {
        assert_eq!(
            (dlv.consumer, dlv.body.to_vec()),
            (1, format!("m{i}").into_bytes())
        );
    }
    // At most the periodic ticks were logged meanwhile, none of the 200 messages.
    assert!(
        h.raft_applied() - before < 5,
        "messages went through the log"
    );
    let subs = info(&req_tx).await.unwrap();
    assert_eq!(subs.len(), 1, "{subs:?}");

    // A durable subscription on the same topics: the next message is logged and reaches both.
    req_tx
        .send(Request::Subscribe {
            consumer: 2,
            name: "kept".into(),
            filter: "t/*".into(),
            durable: true,
            credit: 1000,
        })
        .unwrap();
    let before = h.raft_applied();
    req_tx.send(publish("t/b", "both", 9999)).unwrap();
    assert_eq!(done_rx.recv().await.unwrap(), vec![(9999, Ok(()))]);
    assert!(
        h.raft_applied() >= before + 2,
        "subscribe and message logged"
    );
    let mut to = std::collections::BTreeSet::new();
    while to.len() < 2 {
        for dlv in tokio::time::timeout(Duration::from_secs(5), dl_rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            assert_eq!(dlv.body, &b"both"[..]);
            to.insert(dlv.consumer);
        }
    }
    // The non-durable subscription ends with its consumer; the durable one stays.
    req_tx.send(Request::Detach { consumer: 1 }).unwrap();
    req_tx.send(Request::Detach { consumer: 2 }).unwrap();
    let subs = info(&req_tx).await.unwrap();
    let names: Vec<_> = subs.iter().map(|q| q.address.as_str()).collect();
    assert_eq!(names, vec!["$sub:kept"]);
    drop(req_tx);
    task.await.unwrap();
}
