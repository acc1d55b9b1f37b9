//! Interop tests: the enmesh router driven by the external fe2o3-amqp client.
//!
//! Every test starts its own router (see `enmesh_tests::Router`) and runs its body under a tokio
//! timeout, so a misbehaving router fails a test instead of hanging the run. Connections are made
//! over our own `TcpStream` with TCP_NODELAY set, and keep a second handle on the socket so a test
//! can kill the connection abruptly (no close frame). Receivers that get presettled deliveries
//! use manual credit: fe2o3's default auto credit only refills when deliveries are disposed.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::Shutdown;
use std::time::Duration;

use enmesh_tests::{DataDir, Router};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::CreditMode;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorValue};
use fe2o3_amqp::types::messaging::{
    Data, Header, Message, Modified, Outcome, Properties, Source, Target, TerminusDurability,
    TerminusExpiryPolicy,
};
use fe2o3_amqp::types::primitives::{Binary, Symbol};
use fe2o3_amqp::{Connection, Delivery, Receiver, Sendable, Sender, Session};
use tokio::task::JoinHandle;

/// Run a test body with a deadline.
async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Run `main` while a background task (a consumer or service loop) runs; if the task ends first
/// (it panicked, or its link failed), fail with its result instead of waiting for the deadline.
async fn alongside<T>(main: impl Future<Output = T>, task: &mut JoinHandle<()>) -> T {
    tokio::select! {
        v = main => v,
        r = task => match r {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            other => panic!("background task ended early: {other:?}"),
        },
    }
}

/// One client connection with one session, plus a raw handle on its socket.
struct Client {
    conn: ConnectionHandle<()>,
    session: SessionHandle<()>,
    socket: std::net::TcpStream,
}

impl Client {
    async fn connect(router: &Router, id: &str) -> Client {
        let std_stream = std::net::TcpStream::connect(router.amqp).expect("tcp connect");
        std_stream.set_nodelay(true).expect("nodelay");
        let socket = std_stream.try_clone().expect("clone socket");
        std_stream.set_nonblocking(true).expect("nonblocking");
        let stream = tokio::net::TcpStream::from_std(std_stream).expect("tokio stream");
        let mut conn = Connection::builder()
            .container_id(id)
            .hostname("127.0.0.1")
            .open_with_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("open connection {id}: {e:?}"));
        let session = Session::begin(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("begin session on {id}: {e:?}"));
        Client {
            conn,
            session,
            socket,
        }
    }

    async fn sender(&mut self, name: &str, address: &str) -> Sender {
        Sender::attach(&mut self.session, name, address)
            .await
            .unwrap_or_else(|e| panic!("attach sender {name} -> {address}: {e:?}"))
    }

    /// A sender with a null target (anonymous relay): each message carries `to`.
    async fn anonymous_sender(&mut self, name: &str) -> Sender {
        Sender::builder()
            .name(name)
            .target(Target::builder().build())
            .attach(&mut self.session)
            .await
            .unwrap_or_else(|e| panic!("attach anonymous sender {name}: {e:?}"))
    }

    /// A receiver with fe2o3's default auto credit (for unsettled deliveries).
    async fn receiver(&mut self, name: &str, address: &str) -> Receiver {
        Receiver::attach(&mut self.session, name, address)
            .await
            .unwrap_or_else(|e| panic!("attach receiver {name} <- {address}: {e:?}"))
    }

    /// A receiver with manual credit, granted `credit` right after attach.
    async fn manual_receiver(&mut self, name: &str, address: &str, credit: u32) -> Receiver {
        let mut r = Receiver::builder()
            .name(name)
            .source(address)
            .credit_mode(CreditMode::Manual)
            .attach(&mut self.session)
            .await
            .unwrap_or_else(|e| panic!("attach receiver {name} <- {address}: {e:?}"));
        r.set_credit(credit).await.expect("set credit");
        r
    }

    /// Orderly shutdown (best effort: errors are ignored).
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.session.end().await;
            let _ = self.conn.close().await;
        })
        .await;
    }

    /// Kill the TCP connection without any AMQP close.
    fn kill(self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        drop(self);
    }
}

/// Text body of a delivery whose body is an amqp-value string.
fn text(d: &Delivery<String>) -> &str {
    d.body().as_str()
}

/// Poll the router's /api/v1/links until `pred` holds for the JSON array (or time out).
async fn wait_links(
    router: &Router,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last;
    loop {
        match router.http_get("/api/v1/links") {
            Ok((200, body)) => {
                if let Ok(serde_json::Value::Array(links)) = serde_json::from_str(&body)
                    && pred(&links)
                {
                    return links;
                }
                last = body;
            }
            Ok((status, body)) => last = format!("HTTP {status}: {body}"),
            Err(e) => last = format!("error: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for links: {what}; last /api/v1/links: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Count router links with this address and client-side role that hold credit > 0.
fn receivers_with_credit(links: &[serde_json::Value], address: &str) -> usize {
    links
        .iter()
        .filter(|l| {
            l["address"] == address
                && l["role"] == "receiver"
                && l["credit"].as_u64().unwrap_or(0) > 0
        })
        .count()
}

fn error_condition(e: &AmqpErrorValue) -> String {
    format!("{:?}", e.condition)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anycast_send_receive() {
    let router = Router::start();
    within(Duration::from_secs(30), "anycast send/receive", async {
        let mut consumer = Client::connect(&router, "anycast-consumer").await;
        let mut producer = Client::connect(&router, "anycast-producer").await;
        let mut receiver = consumer.receiver("r", "anycast/a").await;
        let mut sender = producer.sender("s", "anycast/a").await;

        let recv = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..10 {
                let d: Delivery<String> = receiver.recv().await.expect("recv");
                got.push(text(&d).to_string());
                receiver.accept(&d).await.expect("accept");
            }
            (receiver, got)
        });
        for i in 0..10 {
            let outcome = sender.send(format!("m{i}")).await.expect("send");
            assert!(
                matches!(outcome, Outcome::Accepted(_)),
                "message {i}: {outcome:?}"
            );
        }
        let (receiver, got) = recv.await.unwrap();
        let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        assert_eq!(got, want);

        sender.close().await.expect("close sender");
        receiver.close().await.expect("close receiver");
        producer.close().await;
        consumer.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_the_load() {
    const N: usize = 200;
    let router = Router::start();
    within(Duration::from_secs(30), "competing consumers", async {
        let mut c1 = Client::connect(&router, "cc-1").await;
        let mut c2 = Client::connect(&router, "cc-2").await;
        let mut producer = Client::connect(&router, "cc-producer").await;
        let r1 = c1.receiver("r1", "anycast/work").await;
        let r2 = c2.receiver("r2", "anycast/work").await;

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
        let mut tasks = Vec::new();
        for (idx, mut r) in [r1, r2].into_iter().enumerate() {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let d: Delivery<String> = match r.recv().await {
                        Ok(d) => d,
                        Err(_) => break,
                    };
                    r.accept(&d).await.expect("accept");
                    if tx.send((idx, text(&d).to_string())).is_err() {
                        break;
                    }
                }
            }));
        }
        drop(tx);

        let mut sender = producer.sender("s", "anycast/work").await;
        let mut futs = Vec::new();
        for i in 0..N {
            futs.push(
                sender
                    .send_batchable(format!("w{i}"))
                    .await
                    .expect("send_batchable"),
            );
        }
        let mut counts = [0usize; 2];
        let mut bodies = BTreeSet::new();
        for _ in 0..N {
            let (idx, body) = rx.recv().await.expect("consumer channel closed early");
            counts[idx] += 1;
            assert!(bodies.insert(body.clone()), "duplicate delivery {body}");
        }
        for (i, f) in futs.into_iter().enumerate() {
            let outcome = f.await.expect("outcome");
            assert!(matches!(outcome, Outcome::Accepted(_)), "w{i}: {outcome:?}");
        }
        assert_eq!(bodies.len(), N);
        println!("competing consumers: {counts:?}");
        assert!(
            counts[0] > 0 && counts[1] > 0,
            "load not shared between consumers: {counts:?}"
        );
        // Nothing more arrives.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.recv())
                .await
                .is_err(),
            "extra delivery after all {N}"
        );
        for t in tasks {
            t.abort();
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        c1.close().await;
        c2.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multicast_to_three_receivers() {
    const N: usize = 20;
    let router =
        Router::start_with_config("addresses:\n  - prefix: \"mc/\"\n    type: multicast\n");
    within(Duration::from_secs(30), "multicast", async {
        let mut consumers = Vec::new();
        let mut receivers = Vec::new();
        for i in 0..3 {
            let mut c = Client::connect(&router, &format!("mc-consumer-{i}")).await;
            // Multicast copies are presettled: use manual credit.
            receivers.push(c.manual_receiver(&format!("r{i}"), "mc/news", 100).await);
            consumers.push(c);
        }
        // Make sure the router has seen all three credit grants before publishing.
        wait_links(&router, "3 multicast receivers with credit", |links| {
            receivers_with_credit(links, "mc/news") == 3
        })
        .await;

        let mut producer = Client::connect(&router, "mc-producer").await;
        let mut sender = producer.sender("s", "mc/news").await;
        for i in 0..N {
            let outcome = sender.send(format!("n{i}")).await.expect("send");
            assert!(matches!(outcome, Outcome::Accepted(_)), "n{i}: {outcome:?}");
        }
        let want: Vec<String> = (0..N).map(|i| format!("n{i}")).collect();
        for (i, r) in receivers.iter_mut().enumerate() {
            let mut got = Vec::new();
            for _ in 0..N {
                let d: Delivery<String> = r.recv().await.expect("recv");
                got.push(text(&d).to_string());
            }
            assert_eq!(got, want, "receiver {i}");
        }
        for r in receivers.iter_mut() {
            let extra = tokio::time::timeout(Duration::from_millis(200), r.recv::<String>()).await;
            assert!(extra.is_err(), "extra multicast delivery: {extra:?}");
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        for c in consumers {
            c.close().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_through_dynamic_reply_address() {
    let router = Router::start();
    within(Duration::from_secs(30), "rpc", async {
        // Service: receives requests on rpc/echo, answers to reply-to via an anonymous sender.
        let mut service = Client::connect(&router, "rpc-service").await;
        let mut requests = service.receiver("requests", "rpc/echo").await;
        let mut replier = service.anonymous_sender("replies").await;
        let mut service_task = tokio::spawn(async move {
            loop {
                let d: Delivery<String> = match requests.recv().await {
                    Ok(d) => d,
                    Err(_) => break,
                };
                let props = d.message().properties.clone().expect("request properties");
                let reply_to = props.reply_to.clone().expect("reply_to");
                let reply = Message::builder()
                    .properties(
                        Properties::builder()
                            .to(reply_to)
                            .correlation_id(props.message_id.clone().expect("message_id"))
                            .build(),
                    )
                    .value(text(&d).to_uppercase())
                    .build();
                // Settle the request first: the requester waits for its outcome before it
                // reads the reply, and the reply's outcome needs the requester to accept it.
                requests.accept(&d).await.expect("accept request");
                let outcome = replier.send(reply).await.expect("send reply");
                assert!(
                    matches!(outcome, Outcome::Accepted(_)),
                    "reply: {outcome:?}"
                );
            }
        });

        // Client: a dynamic receiver for replies, a sender for requests.
        let mut client = Client::connect(&router, "rpc-client").await;
        alongside(
            async {
                let mut replies = Receiver::builder()
                    .name("reply-receiver")
                    .source(Source::builder().dynamic(true).build())
                    .attach(&mut client.session)
                    .await
                    .expect("attach dynamic receiver");
                let reply_address = replies
                    .source()
                    .as_ref()
                    .and_then(|s| s.address.clone())
                    .expect("router must assign a dynamic source address");
                assert!(
                    reply_address.starts_with("_dynamic/"),
                    "dynamic address {reply_address:?}"
                );
                let mut requester = client.sender("requester", "rpc/echo").await;
                for i in 0..5u64 {
                    let req = Message::builder()
                        .properties(
                            Properties::builder()
                                .message_id(i)
                                .reply_to(reply_address.clone())
                                .build(),
                        )
                        .value(format!("hello {i}"))
                        .build();
                    let outcome = requester.send(req).await.expect("send request");
                    assert!(
                        matches!(outcome, Outcome::Accepted(_)),
                        "request {i}: {outcome:?}"
                    );
                    let d: Delivery<String> = replies.recv().await.expect("recv reply");
                    assert_eq!(text(&d), format!("HELLO {i}"));
                    let corr = d
                        .message()
                        .properties
                        .as_ref()
                        .and_then(|p| p.correlation_id.clone());
                    assert_eq!(corr, Some(i.into()), "correlation id of reply {i}");
                    replies.accept(&d).await.expect("accept reply");
                }
                requester.close().await.expect("close requester");
                replies.close().await.expect("close replies");
            },
            &mut service_task,
        )
        .await;
        service_task.abort();
        client.close().await;
        service.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_propagate_to_producer() {
    let router = Router::start();
    within(Duration::from_secs(30), "outcomes", async {
        let mut consumer = Client::connect(&router, "outcome-consumer").await;
        let mut producer = Client::connect(&router, "outcome-producer").await;
        let mut receiver = consumer.receiver("r", "anycast/outcomes").await;
        let mut consumer_task = tokio::spawn(async move {
            loop {
                let d: Delivery<String> = match receiver.recv().await {
                    Ok(d) => d,
                    Err(_) => break,
                };
                match text(&d) {
                    "reject" => {
                        let err = AmqpErrorValue::new(
                            AmqpError::PreconditionFailed,
                            Some("consumer says no".to_string()),
                            None,
                        );
                        receiver.reject(&d, err).await.expect("reject")
                    }
                    "release" => receiver.release(&d).await.expect("release"),
                    "modify" => receiver
                        .modify(
                            &d,
                            Modified {
                                delivery_failed: Some(true),
                                undeliverable_here: Some(true),
                                message_annotations: None,
                            },
                        )
                        .await
                        .expect("modify"),
                    _ => receiver.accept(&d).await.expect("accept"),
                }
            }
        });
        let mut sender = producer.sender("s", "anycast/outcomes").await;
        alongside(
            async {
                match sender.send("reject").await.expect("send reject") {
                    Outcome::Rejected(r) => {
                        let e = r
                            .error
                            .expect("rejected outcome must carry the consumer's error");
                        assert!(
                            matches!(
                                e.condition,
                                fe2o3_amqp::types::definitions::ErrorCondition::AmqpError(
                                    AmqpError::PreconditionFailed
                                )
                            ),
                            "condition {}",
                            error_condition(&e)
                        );
                        assert_eq!(e.description.as_deref(), Some("consumer says no"));
                    }
                    other => panic!("expected rejected, got {other:?}"),
                }
                match sender.send("release").await.expect("send release") {
                    Outcome::Released(_) => {}
                    other => panic!("expected released, got {other:?}"),
                }
                match sender.send("modify").await.expect("send modify") {
                    Outcome::Modified(m) => {
                        assert_eq!(m.delivery_failed, Some(true), "{m:?}");
                        assert_eq!(m.undeliverable_here, Some(true), "{m:?}");
                    }
                    other => panic!("expected modified, got {other:?}"),
                }
                match sender.send("accept").await.expect("send accept") {
                    Outcome::Accepted(_) => {}
                    other => panic!("expected accepted, got {other:?}"),
                }
            },
            &mut consumer_task,
        )
        .await;
        consumer_task.abort();
        sender.close().await.expect("close sender");
        producer.close().await;
        consumer.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_without_consumer_gets_no_credit() {
    let router = Router::start();
    within(
        Duration::from_secs(30),
        "no credit without consumer",
        async {
            let mut producer = Client::connect(&router, "nocredit-producer").await;
            let mut sender = producer.sender("s", "anycast/nobody-yet").await;
            let send = tokio::spawn(async move {
                let outcome = sender.send("waited").await;
                (sender, outcome)
            });
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The router's view agrees: the producer link holds no credit and nothing was taken in.
            wait_links(&router, "producer link with zero credit", |links| {
                links.iter().any(|l| {
                    l["address"] == "anycast/nobody-yet"
                        && l["role"] == "sender"
                        && l["credit"] == 0
                        && l["deliveries"] == 0
                })
            })
            .await;
            assert!(
                !send.is_finished(),
                "send completed within 500 ms although no consumer exists: {:?}",
                send.await.map(|(_, o)| o)
            );

            let mut consumer = Client::connect(&router, "nocredit-consumer").await;
            let mut receiver = consumer.receiver("r", "anycast/nobody-yet").await;
            let d: Delivery<String> = within(
                Duration::from_secs(5),
                "message after consumer attached",
                receiver.recv(),
            )
            .await
            .expect("recv");
            assert_eq!(text(&d), "waited");
            receiver.accept(&d).await.expect("accept");
            let (sender, outcome) = within(Duration::from_secs(5), "producer outcome", send)
                .await
                .unwrap();
            assert!(
                matches!(outcome, Ok(Outcome::Accepted(_))),
                "outcome {outcome:?}"
            );
            sender.close().await.expect("close sender");
            receiver.close().await.expect("close receiver");
            producer.close().await;
            consumer.close().await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_dropped_with_unsettled_deliveries() {
    const N: usize = 5;
    let router = Router::start();
    within(Duration::from_secs(30), "consumer dropped", async {
        let mut consumer = Client::connect(&router, "dying-consumer").await;
        let mut producer = Client::connect(&router, "dying-producer").await;
        let mut receiver = consumer.receiver("r", "anycast/dying").await;
        let mut sender = producer.sender("s", "anycast/dying").await;

        let mut futs = Vec::new();
        for i in 0..N {
            futs.push(
                sender
                    .send_batchable(format!("u{i}"))
                    .await
                    .expect("send_batchable"),
            );
        }
        // Receive everything but settle nothing.
        let mut held = Vec::new();
        for _ in 0..N {
            let d: Delivery<String> = receiver.recv().await.expect("recv");
            held.push(DeliveryInfo::from(d));
        }
        assert_eq!(held.len(), N);
        // Kill the consumer's TCP connection: no detach, no close.
        consumer.kill();
        drop(receiver);

        for (i, f) in futs.into_iter().enumerate() {
            let outcome = within(
                Duration::from_secs(10),
                "producer outcome after consumer died",
                f,
            )
            .await;
            println!("u{i}: {outcome:?}");
            match outcome {
                Ok(Outcome::Released(_)) => {}
                Ok(Outcome::Modified(m)) => {
                    assert_eq!(m.delivery_failed, Some(true), "u{i}: {m:?}")
                }
                other => panic!("u{i}: expected released or modified, got {other:?}"),
            }
        }
        sender.close().await.expect("close sender");
        producer.close().await;
    })
    .await;
}

/// Deterministic, non-repeating-looking payload.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn large_round_trip(size: usize) {
    let router = Router::start();
    within(Duration::from_secs(60), "large message round trip", async {
        let mut consumer = Client::connect(&router, "large-consumer").await;
        let mut producer = Client::connect(&router, "large-producer").await;
        let mut receiver = consumer.receiver("r", "anycast/large").await;
        let mut sender = producer.sender("s", "anycast/large").await;
        let body = payload(size, size as u64);
        let expected = body.clone();
        let recv = tokio::spawn(async move {
            let d: Delivery<Data> = receiver.recv().await.expect("recv large");
            receiver.accept(&d).await.expect("accept");
            (receiver, d.into_body().0.into_vec())
        });
        let outcome = sender
            .send(Data(Binary::from(body)))
            .await
            .expect("send large");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        let (receiver, got) = recv.await.unwrap();
        assert_eq!(got.len(), expected.len(), "length");
        assert!(got == expected, "{size}-byte body differs");
        sender.close().await.expect("close sender");
        receiver.close().await.expect("close receiver");
        producer.close().await;
        consumer.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabyte_round_trip() {
    large_round_trip(1024 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabyte_round_trip() {
    large_round_trip(10 * 1024 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_links_on_one_connection() {
    const LINKS: usize = 1000;
    let router = Router::start();
    within(Duration::from_secs(60), "1000 links", async {
        let mut consumer = Client::connect(&router, "scale-consumer").await;
        let mut receivers = Vec::with_capacity(LINKS);
        for i in 0..LINKS {
            receivers.push(
                consumer
                    .manual_receiver(&format!("r{i}"), &format!("scale/{i}"), 1)
                    .await,
            );
        }
        let links = wait_links(&router, "1000 receivers with credit", |links| {
            links
                .iter()
                .filter(|l| {
                    l["role"] == "receiver"
                        && l["credit"].as_u64().unwrap_or(0) > 0
                        && l["address"]
                            .as_str()
                            .is_some_and(|a| a.starts_with("scale/"))
                })
                .count()
                == LINKS
        })
        .await;
        let per_conn: HashMap<String, usize> = links.iter().fold(HashMap::new(), |mut m, l| {
            *m.entry(l["connection"].to_string()).or_default() += 1;
            m
        });
        assert!(
            per_conn.values().any(|&n| n == LINKS),
            "expected {LINKS} links on one connection: {per_conn:?}"
        );

        let mut producer = Client::connect(&router, "scale-producer").await;
        let mut sender = producer.anonymous_sender("relay").await;
        let send_task = tokio::spawn(async move {
            let mut futs = Vec::with_capacity(LINKS);
            for i in 0..LINKS {
                let msg = Message::builder()
                    .properties(Properties::builder().to(format!("scale/{i}")).build())
                    .value(format!("to {i}"))
                    .build();
                futs.push(
                    sender
                        .send_batchable(Sendable::from(msg))
                        .await
                        .expect("send_batchable"),
                );
            }
            let mut outcomes = Vec::with_capacity(LINKS);
            for f in futs {
                outcomes.push(f.await);
            }
            (sender, outcomes)
        });
        for (i, r) in receivers.iter_mut().enumerate() {
            let d: Delivery<String> = r.recv().await.expect("recv");
            assert_eq!(text(&d), format!("to {i}"));
            r.accept(&d).await.expect("accept");
        }
        let (sender, outcomes) = send_task.await.unwrap();
        for (i, o) in outcomes.into_iter().enumerate() {
            assert!(matches!(o, Ok(Outcome::Accepted(_))), "to scale/{i}: {o:?}");
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        consumer.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_connections() {
    const CONNS: usize = 2000;
    let router = std::sync::Arc::new(Router::start());
    within(Duration::from_secs(120), "2000 connections", async {
        let mut opening = tokio::task::JoinSet::new();
        for i in 0..CONNS {
            let r = router.clone();
            opening.spawn(async move { Client::connect(&r, &format!("many-{i}")).await });
        }
        let mut clients = Vec::with_capacity(CONNS);
        while let Some(c) = opening.join_next().await {
            clients.push(c.expect("connect task"));
        }
        let (status, body) = router.http_get("/api/v1/connections").expect("http");
        assert_eq!(status, 200);
        let listed: Vec<serde_json::Value> = serde_json::from_str(&body).expect("json");
        assert!(
            listed.len() >= CONNS,
            "router lists {} connections, want {CONNS}",
            listed.len()
        );
        // Traffic still flows between two of them.
        let mut last = clients.pop().expect("a client");
        let mut first = clients.pop().expect("a client");
        let mut receiver = first.receiver("r", "many/check").await;
        let mut sender = last.sender("s", "many/check").await;
        let recv = tokio::spawn(async move {
            let d: Delivery<String> = receiver.recv().await.expect("recv");
            receiver.accept(&d).await.expect("accept");
            text(&d).to_string()
        });
        let outcome = sender.send("across 2000".to_string()).await.expect("send");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        assert_eq!(recv.await.unwrap(), "across 2000");
        for c in clients {
            c.kill();
        }
        first.kill();
        last.kill();
    })
    .await;
}

/// A queue served by the standalone broker shard: stored before any consumer exists,
/// `accepted` once stored, FIFO to a consumer, a rejected message lands in the dead-letter
/// queue, and an acknowledged one does not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_store_and_forward_with_dead_letter() {
    let router = Router::start_with_config(
        "addresses:\n  - prefix: jobs/\n    type: queue\n    dead_letter: jobs-dlq\n  - name: jobs-dlq\n    type: queue\n",
    );
    within(Duration::from_secs(30), "queue scenario", async {
        let mut producer = Client::connect(&router, "queue-producer").await;
        let mut sender = producer.sender("s", "jobs/a").await;
        for i in 0..3 {
            let outcome = sender.send(format!("job-{i}")).await.expect("send");
            assert!(
                matches!(outcome, Outcome::Accepted(_)),
                "stored message {i}: {outcome:?}"
            );
        }
        let mut consumer = Client::connect(&router, "queue-consumer").await;
        let mut receiver = consumer.receiver("r", "jobs/a").await;
        let mut got = Vec::new();
        for i in 0..3 {
            let d: Delivery<String> = receiver.recv().await.expect("recv");
            got.push(text(&d).to_string());
            if i == 1 {
                let err = AmqpErrorValue::new(AmqpError::PreconditionFailed, None, None);
                receiver.reject(&d, err).await.expect("reject");
            } else {
                receiver.accept(&d).await.expect("accept");
            }
        }
        assert_eq!(got, vec!["job-0", "job-1", "job-2"]);
        let mut dlq = consumer.receiver("dlq", "jobs-dlq").await;
        let d: Delivery<String> = dlq.recv().await.expect("dead letter");
        assert_eq!(text(&d), "job-1");
        dlq.accept(&d).await.expect("accept dead letter");
        // Nothing else is waiting in the queue.
        let more =
            tokio::time::timeout(Duration::from_millis(500), receiver.recv::<String>()).await;
        assert!(more.is_err(), "an acknowledged message came back: {more:?}");
        sender.close().await.expect("close sender");
        producer.close().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Queue and topic scenarios on the standalone broker shard: work queues with acknowledgements,
// a departed worker, prefetch, modified/released redelivery, TTL, shared and wildcard topic
// subscriptions, per-producer order.

/// A standalone config: `work/` queues (at most 5 delivery attempts), `t/` topics.
const STORE_CONFIG: &str = "addresses:\n  - prefix: work/\n    type: queue\n    max_delivery_attempts: 5\n  - prefix: t/\n    type: topic\n";

/// Per-scenario deadline: each scenario below takes a few seconds at most.
const SCENARIO_LIMIT: Duration = Duration::from_secs(10);

type GotTx = tokio::sync::mpsc::UnboundedSender<Got>;
type GotRx = tokio::sync::mpsc::UnboundedReceiver<Got>;

/// A message as a consumer task reports it: which consumer, the body, and the header's
/// delivery-count (0 when the message carries no header).
#[derive(Debug, Clone)]
struct Got {
    consumer: usize,
    body: String,
    delivery_count: u32,
}

fn delivery_count(d: &Delivery<String>) -> u32 {
    d.message().header.as_ref().map_or(0, |h| h.delivery_count)
}

impl Client {
    /// A receiver whose auto credit keeps about `credit` messages of prefetch (fe2o3 refills
    /// to `credit` once half of it has been disposed).
    async fn prefetch_receiver(&mut self, name: &str, source: Source, credit: u32) -> Receiver {
        Receiver::builder()
            .name(name)
            .source(source)
            .credit_mode(CreditMode::Auto(credit))
            .attach(&mut self.session)
            .await
            .unwrap_or_else(|e| panic!("attach receiver {name}: {e:?}"))
    }
}

/// A source with the `shared` capability: a subscription named by the link name alone.
fn shared_source(address: &str) -> Source {
    Source::builder()
        .address(address)
        .capabilities(vec![Symbol::from("shared")])
        .build()
}

/// Consume on `receiver` until its link fails, accepting each delivery and reporting it.
fn spawn_acking_consumer(idx: usize, mut receiver: Receiver, tx: GotTx) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let d: Delivery<String> = match receiver.recv().await {
                Ok(d) => d,
                Err(_) => break,
            };
            if receiver.accept(&d).await.is_err() {
                break;
            }
            let got = Got {
                consumer: idx,
                body: text(&d).to_string(),
                delivery_count: delivery_count(&d),
            };
            if tx.send(got).is_err() {
                break;
            }
        }
    })
}

/// Receive `n` reports from the consumer tasks.
async fn collect(rx: &mut GotRx, n: usize) -> Vec<Got> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(g)) => out.push(g),
            Ok(None) => panic!("consumer tasks ended after {} of {n}: {out:?}", out.len()),
            Err(_) => panic!("only {} of {n} messages within 5 s: {out:?}", out.len()),
        }
    }
    out
}

/// Assert no consumer task reports anything for `ms` milliseconds.
async fn assert_quiet(rx: &mut GotRx, ms: u64, what: &str) {
    if let Ok(Some(g)) = tokio::time::timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("{what}: unexpected extra delivery {g:?}");
    }
}

/// Send `bodies` pipelined and require `accepted` (stored) for each.
async fn send_all_accepted(sender: &mut Sender, bodies: impl IntoIterator<Item = String>) {
    let mut futs = Vec::new();
    for b in bodies {
        let f = sender
            .send_batchable(b.clone())
            .await
            .expect("send_batchable");
        futs.push((b, f));
    }
    for (b, f) in futs {
        let outcome = f.await.expect("outcome");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{b}: {outcome:?}");
    }
}

/// Receive one delivery within 5 s.
async fn recv_within(r: &mut Receiver, what: &str) -> Delivery<String> {
    within(Duration::from_secs(5), what, r.recv::<String>())
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Assert `r` receives nothing for `ms` milliseconds.
async fn assert_nothing(r: &mut Receiver, ms: u64, what: &str) {
    if let Ok(d) = tokio::time::timeout(Duration::from_millis(ms), r.recv::<String>()).await {
        panic!(
            "{what}: unexpected delivery {:?}",
            d.map(|d| text(&d).to_string())
        );
    }
}

/// Wait until the router lists `n` receiver links on `address` with credit, then a little
/// longer so the broker shard has the consumers (and subscriptions) too.
async fn consumers_ready(router: &Router, address: &str, n: usize) {
    wait_links(
        router,
        &format!("{n} consumers with credit on {address}"),
        |links| receivers_with_credit(links, address) == n,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Poll GET /api/v1/queues until `pred` holds for the entry of `address` (or time out).
async fn wait_queue(
    router: &Router,
    address: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    loop {
        if let Ok((200, body)) = router.http_get("/api/v1/queues") {
            if let Ok(serde_json::Value::Array(qs)) = serde_json::from_str(&body)
                && let Some(q) = qs.into_iter().find(|q| q["address"] == address)
                && pred(&q)
            {
                return q;
            }
            last = body;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for queue {address}: {what}; last /api/v1/queues: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three workers with acknowledgements share a work queue: every job exactly once, and each
/// worker gets some (round-robin among consumers with credit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_work_queue_three_workers_each_message_once() {
    const N: usize = 60;
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "work queue with 3 workers", async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut workers = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..3 {
            let mut c = Client::connect(&router, &format!("wq-worker-{i}")).await;
            let r = c
                .prefetch_receiver(&format!("w{i}"), Source::from("work/jobs"), 4)
                .await;
            tasks.push(spawn_acking_consumer(i, r, tx.clone()));
            workers.push(c);
        }
        drop(tx);
        consumers_ready(&router, "work/jobs", 3).await;
        let mut producer = Client::connect(&router, "wq-producer").await;
        let mut sender = producer.sender("s", "work/jobs").await;
        send_all_accepted(&mut sender, (0..N).map(|i| format!("job-{i}"))).await;
        let got = collect(&mut rx, N).await;
        let mut seen = BTreeSet::new();
        let mut per_worker = [0usize; 3];
        for g in &got {
            assert!(seen.insert(g.body.clone()), "job delivered twice: {g:?}");
            assert_eq!(g.delivery_count, 0, "a first delivery: {g:?}");
            per_worker[g.consumer] += 1;
        }
        assert_eq!(seen.len(), N);
        println!("work queue: jobs per worker {per_worker:?}");
        assert!(
            per_worker.iter().all(|&n| n > 0),
            "every worker should get jobs: {per_worker:?}"
        );
        assert_quiet(&mut rx, 500, "after every job was acknowledged").await;
        for t in tasks {
            t.abort();
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        for c in workers {
            c.close().await;
        }
    })
    .await;
}

/// A worker whose connection dies while it holds unacknowledged jobs: those jobs go to the
/// other workers, with one attempt counted (header delivery-count 1); its acknowledged job
/// does not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_worker_disconnect_hands_unacked_to_others() {
    const N: usize = 10;
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "departed worker", async {
        let mut producer = Client::connect(&router, "dw-producer").await;
        let mut sender = producer.sender("s", "work/handover").await;
        send_all_accepted(&mut sender, (0..N).map(|i| format!("h{i}"))).await;

        // The doomed worker takes 4 (manual credit 4), acknowledges one, holds three.
        let mut doomed = Client::connect(&router, "dw-doomed").await;
        let mut r = doomed.manual_receiver("w", "work/handover", 4).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(recv_within(&mut r, "doomed worker's prefetch").await);
        }
        let bodies: Vec<&str> = held.iter().map(text).collect();
        assert_eq!(bodies, ["h0", "h1", "h2", "h3"], "FIFO");
        r.accept(&held[0]).await.expect("accept h0");
        // The acknowledgement reaches the broker before the connection dies.
        wait_queue(&router, "work/handover", "h0 acknowledged", |q| {
            q["acknowledged"] == 1
        })
        .await;

        // Two other workers take the rest of the queue.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut others = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..2 {
            let mut c = Client::connect(&router, &format!("dw-worker-{i}")).await;
            let rr = c
                .prefetch_receiver(&format!("w{i}"), Source::from("work/handover"), 10)
                .await;
            tasks.push(spawn_acking_consumer(i, rr, tx.clone()));
            others.push(c);
        }
        drop(tx);
        let first = collect(&mut rx, N - 4).await;
        let mut bodies: BTreeSet<String> = first.iter().map(|g| g.body.clone()).collect();
        assert_eq!(
            bodies,
            (4..N).map(|i| format!("h{i}")).collect::<BTreeSet<_>>(),
            "the jobs nobody held"
        );

        // Kill the doomed worker's TCP connection: no detach, no close.
        doomed.kill();
        drop(r);
        let again = collect(&mut rx, 3).await;
        for g in &again {
            assert!(
                ["h1", "h2", "h3"].contains(&g.body.as_str()),
                "only held jobs come back: {g:?}"
            );
            assert_eq!(
                g.delivery_count, 1,
                "a job returned by a departed consumer counts one attempt: {g:?}"
            );
            assert!(bodies.insert(g.body.clone()), "delivered twice: {g:?}");
        }
        assert_quiet(
            &mut rx,
            700,
            "after the held jobs were handed over (h0 was acked)",
        )
        .await;
        for t in tasks {
            t.abort();
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        for c in others {
            c.close().await;
        }
    })
    .await;
}

/// A consumer's link credit is its prefetch: with manual credit 5 it gets exactly 5, nothing
/// more after acknowledging them, 5 more after new credit; a second consumer gets the next 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_prefetch_respected_with_manual_credit() {
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "prefetch", async {
        let mut producer = Client::connect(&router, "pf-producer").await;
        let mut sender = producer.sender("s", "work/prefetch").await;
        send_all_accepted(&mut sender, (0..20).map(|i| format!("p{i:02}"))).await;

        let mut c1 = Client::connect(&router, "pf-1").await;
        let mut r1 = c1.manual_receiver("r1", "work/prefetch", 5).await;
        let mut first = Vec::new();
        for _ in 0..5 {
            first.push(recv_within(&mut r1, "first consumer's 5").await);
        }
        let bodies: Vec<&str> = first.iter().map(text).collect();
        assert_eq!(bodies, ["p00", "p01", "p02", "p03", "p04"]);
        assert_nothing(&mut r1, 700, "beyond the first consumer's credit of 5").await;
        assert_eq!(r1.credit(), 0, "credit used up");

        let mut c2 = Client::connect(&router, "pf-2").await;
        let mut r2 = c2.manual_receiver("r2", "work/prefetch", 5).await;
        let mut second = Vec::new();
        for _ in 0..5 {
            second.push(recv_within(&mut r2, "second consumer's 5").await);
        }
        let bodies: Vec<&str> = second.iter().map(text).collect();
        assert_eq!(bodies, ["p05", "p06", "p07", "p08", "p09"]);
        assert_nothing(&mut r2, 500, "beyond the second consumer's credit of 5").await;

        // Acknowledging does not grant more.
        for d in &first {
            r1.accept(d).await.expect("accept");
        }
        assert_nothing(&mut r1, 700, "after acknowledging without new credit").await;
        // New credit does.
        r1.set_credit(5).await.expect("set credit");
        let mut more = Vec::new();
        for _ in 0..5 {
            more.push(recv_within(&mut r1, "5 more after new credit").await);
        }
        let bodies: Vec<&str> = more.iter().map(text).collect();
        assert_eq!(bodies, ["p10", "p11", "p12", "p13", "p14"]);
        assert_nothing(&mut r1, 500, "beyond the new credit").await;
        for d in &more {
            r1.accept(d).await.expect("accept");
        }
        for d in &second {
            r2.accept(d).await.expect("accept");
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        c1.close().await;
        c2.close().await;
    })
    .await;
}

/// modified with delivery-failed redelivers with header delivery-count incremented; released
/// redelivers without counting an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_modified_delivery_failed_redelivers_with_count() {
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "modified redelivery", async {
        let mut producer = Client::connect(&router, "mod-producer").await;
        let mut sender = producer.sender("s", "work/flaky").await;
        send_all_accepted(&mut sender, ["flaky".to_string()]).await;

        let mut consumer = Client::connect(&router, "mod-consumer").await;
        let mut r = consumer.manual_receiver("r", "work/flaky", 1).await;
        let failed = Modified {
            delivery_failed: Some(true),
            undeliverable_here: None,
            message_annotations: None,
        };
        let mut counts = Vec::new();
        for _ in 0..2 {
            let d = recv_within(&mut r, "flaky").await;
            assert_eq!(text(&d), "flaky");
            counts.push(delivery_count(&d));
            r.modify(&d, failed.clone()).await.expect("modify");
            r.set_credit(1).await.expect("credit");
        }
        // Released: back without an attempt counted.
        let d = recv_within(&mut r, "flaky after two failures").await;
        counts.push(delivery_count(&d));
        r.release(&d).await.expect("release");
        r.set_credit(1).await.expect("credit");
        let d = recv_within(&mut r, "flaky after release").await;
        counts.push(delivery_count(&d));
        assert_eq!(
            counts,
            [0, 1, 2, 2],
            "delivery-count per delivery: two failures counted, a release not"
        );
        r.accept(&d).await.expect("accept");
        r.set_credit(1).await.expect("credit");
        assert_nothing(&mut r, 700, "after the message was accepted").await;
        sender.close().await.expect("close sender");
        producer.close().await;
        consumer.close().await;
    })
    .await;
}

/// A command sent to a queue whose consumer is offline expires by its header ttl; one
/// without ttl is still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_command_to_offline_consumer_expires_by_ttl() {
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "ttl expiry", async {
        let mut producer = Client::connect(&router, "ttl-producer").await;
        let mut sender = producer.sender("s", "work/device-7").await;
        let stale = Message::builder()
            .header(Header::builder().ttl(300u32).build())
            .value("stale".to_string())
            .build();
        let outcome = sender.send(stale).await.expect("send stale");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        let outcome = sender.send("fresh".to_string()).await.expect("send fresh");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        // The device is offline past the first command's TTL (checked every 500 ms).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut device = Client::connect(&router, "ttl-device").await;
        let mut r = device.manual_receiver("r", "work/device-7", 10).await;
        let d = recv_within(&mut r, "the unexpired command").await;
        assert_eq!(text(&d), "fresh", "the expired command was delivered");
        r.accept(&d).await.expect("accept");
        assert_nothing(&mut r, 700, "the expired command").await;
        sender.close().await.expect("close sender");
        producer.close().await;
        device.close().await;
    })
    .await;
}

/// Two consumers on different connections (and container ids) attach to a topic with the
/// `shared` capability and the same link name: one subscription, they compete; a plain
/// subscriber on the same topic still gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_shared_subscription_consumers_compete() {
    const N: usize = 20;
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "shared subscription", async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..2 {
            let mut c = Client::connect(&router, &format!("shared-{i}")).await;
            let r = c
                .prefetch_receiver("workers", shared_source("t/shared/news"), 4)
                .await;
            tasks.push(spawn_acking_consumer(i, r, tx.clone()));
            clients.push(c);
        }
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel();
        let mut plain = Client::connect(&router, "shared-plain").await;
        let r = plain
            .prefetch_receiver("plain", Source::from("t/shared/news"), 50)
            .await;
        tasks.push(spawn_acking_consumer(9, r, ptx));
        drop(tx);
        consumers_ready(&router, "t/shared/news", 3).await;

        let mut producer = Client::connect(&router, "shared-producer").await;
        let mut sender = producer.sender("s", "t/shared/news").await;
        send_all_accepted(&mut sender, (0..N).map(|i| format!("n{i:02}"))).await;
        let want: BTreeSet<String> = (0..N).map(|i| format!("n{i:02}")).collect();

        let got = collect(&mut rx, N).await;
        let mut seen = BTreeSet::new();
        let mut per = [0usize; 2];
        for g in &got {
            assert!(
                seen.insert(g.body.clone()),
                "delivered to both shared consumers: {g:?}"
            );
            per[g.consumer] += 1;
        }
        assert_eq!(seen, want);
        println!("shared subscription: per consumer {per:?}");
        assert!(
            per[0] > 0 && per[1] > 0,
            "both shared consumers should get some: {per:?}"
        );
        assert_quiet(&mut rx, 500, "shared subscription after all 20").await;

        let plain_got = collect(&mut prx, N).await;
        let plain_bodies: Vec<String> = plain_got.iter().map(|g| g.body.clone()).collect();
        assert_eq!(
            plain_bodies,
            want.iter().cloned().collect::<Vec<_>>(),
            "the plain subscriber gets every message in order"
        );
        for t in tasks {
            t.abort();
        }
        sender.close().await.expect("close sender");
        producer.close().await;
        plain.close().await;
        for c in clients {
            c.close().await;
        }
    })
    .await;
}

/// Wildcard topic filters: `*` exactly one level, `#` zero or more (also in the middle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_wildcard_subscriptions() {
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "wildcard subscriptions", async {
        let filters = ["t/a/*/temp", "t/a/#", "t/#/temp"];
        let mut subscribers = Vec::new();
        let mut rxs = Vec::new();
        let mut tasks = Vec::new();
        for (i, f) in filters.iter().enumerate() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut c = Client::connect(&router, &format!("wild-{i}")).await;
            let r = c
                .prefetch_receiver(&format!("sub{i}"), Source::from(*f), 50)
                .await;
            tasks.push(spawn_acking_consumer(i, r, tx));
            subscribers.push(c);
            rxs.push(rx);
        }
        for f in filters {
            consumers_ready(&router, f, 1).await;
        }
        let mut producer = Client::connect(&router, "wild-producer").await;
        let topics = [
            "t/a/x/temp",   // all three
            "t/a/x/y/temp", // t/a/# and t/#/temp (* is exactly one level)
            "t/a/temp",     // t/a/# and t/#/temp (# matches zero levels)
            "t/a",          // t/a/# only (# matches zero levels)
            "t/a/x/hum",    // t/a/# only
            "t/b/temp",     // t/#/temp only
            "t/temp",       // t/#/temp only
            "t/b/x",        // nobody
            "t/a/x/temp/x", // t/a/# only
        ];
        for (i, t) in topics.iter().enumerate() {
            let mut s = producer.sender(&format!("s{i}"), t).await;
            send_all_accepted(&mut s, [format!("to {t}")]).await;
            s.close().await.expect("close sender");
        }
        let want: [&[&str]; 3] = [
            &["t/a/x/temp"],
            &[
                "t/a/x/temp",
                "t/a/x/y/temp",
                "t/a/temp",
                "t/a",
                "t/a/x/hum",
                "t/a/x/temp/x",
            ],
            &[
                "t/a/x/temp",
                "t/a/x/y/temp",
                "t/a/temp",
                "t/b/temp",
                "t/temp",
            ],
        ];
        for (i, rx) in rxs.iter_mut().enumerate() {
            let got = collect(rx, want[i].len()).await;
            let bodies: Vec<String> = got.into_iter().map(|g| g.body).collect();
            let expected: Vec<String> = want[i].iter().map(|t| format!("to {t}")).collect();
            assert_eq!(bodies, expected, "subscriber {}", filters[i]);
        }
        for (i, rx) in rxs.iter_mut().enumerate() {
            assert_quiet(rx, 300, filters[i]).await;
        }
        for t in tasks {
            t.abort();
        }
        producer.close().await;
        for c in subscribers {
            c.close().await;
        }
    })
    .await;
}

/// Three producers send 200 numbered messages each to one queue at the same time; one
/// consumer receives all 600 and, per producer, the numbers strictly increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_per_producer_order_with_one_consumer() {
    const PER: usize = 200;
    let router = Router::start_with_config(STORE_CONFIG);
    within(SCENARIO_LIMIT, "per-producer order", async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut consumer = Client::connect(&router, "order-consumer").await;
        let r = consumer
            .prefetch_receiver("r", Source::from("work/ordered"), 100)
            .await;
        let mut task = spawn_acking_consumer(0, r, tx);
        consumers_ready(&router, "work/ordered", 1).await;

        let mut producers = Vec::new();
        for p in 0..3 {
            let mut c = Client::connect(&router, &format!("order-producer-{p}")).await;
            let s = c.sender("s", "work/ordered").await;
            producers.push((c, s));
        }
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(3));
        let mut sending = Vec::new();
        for (p, (c, mut s)) in producers.into_iter().enumerate() {
            let start = start.clone();
            sending.push(tokio::spawn(async move {
                start.wait().await;
                let mut futs = Vec::with_capacity(PER);
                for i in 0..PER {
                    futs.push(s.send_batchable(format!("{p}:{i}")).await.expect("send"));
                    if i % 10 == 9 {
                        tokio::task::yield_now().await;
                    }
                }
                for (i, f) in futs.into_iter().enumerate() {
                    let o = f.await.expect("outcome");
                    assert!(matches!(o, Outcome::Accepted(_)), "{p}:{i}: {o:?}");
                }
                s.close().await.expect("close sender");
                c.close().await;
            }));
        }
        let got = alongside(collect(&mut rx, 3 * PER), &mut task).await;
        for s in sending {
            s.await.expect("producer task");
        }
        let mut last: [Option<usize>; 3] = [None; 3];
        let mut seen = BTreeSet::new();
        let mut switches = 0;
        let mut prev_producer = None;
        for g in &got {
            let (p, i) = g.body.split_once(':').expect("p:i body");
            let (p, i): (usize, usize) = (p.parse().unwrap(), i.parse().unwrap());
            assert!(seen.insert((p, i)), "duplicate {p}:{i}");
            if let Some(prev) = last[p] {
                assert!(i > prev, "producer {p}: {i} arrived after {prev}");
            }
            last[p] = Some(i);
            if prev_producer.is_some_and(|q| q != p) {
                switches += 1;
            }
            prev_producer = Some(p);
        }
        assert_eq!(seen.len(), 3 * PER);
        println!("per-producer order: {switches} producer switches in the consumer's stream");
        assert!(
            switches >= 2,
            "the producers were not concurrent at the consumer ({switches} switches)"
        );
        assert_quiet(&mut rx, 300, "after all 600").await;
        task.abort();
        consumer.close().await;
    })
    .await;
}

/// A durable source with expiry-policy never: a JMS-style durable subscription, identified by
/// the container id and the link name.
fn durable_source(address: &str) -> Source {
    Source::builder()
        .address(address)
        .durable(TerminusDurability::UnsettledState)
        .expiry_policy(TerminusExpiryPolicy::Never)
        .build()
}

/// A durable topic subscription outlives its subscriber and two router crashes: the subscriber
/// (fixed container id and link name) proves it is subscribed, detaches without closing the
/// link and disconnects; 10 messages published meanwhile survive a SIGKILL and restart over the
/// same data directory and arrive once, in order, when it reattaches. Once accepted they are
/// gone for good: after a second SIGKILL (this time with the subscriber attached) and restart
/// nothing comes back, while a new message still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_durable_subscription_survives_client_and_broker_restart() {
    const CONFIG: &str = "addresses:\n  - prefix: t/\n    type: topic\n";
    const TOPIC: &str = "t/news/x";
    const CONTAINER: &str = "durable-subscriber";
    const LINK: &str = "news-subscription";
    // The broker queue behind the subscription (GET /api/v1/queues lists it as `$sub:NAME`).
    let queue = format!("$sub:{CONTAINER}:{LINK}");
    let data = DataDir::new();
    // Outside the timed body, so a timeout still prints the (current) router's stderr.
    let mut router = Router::start_with_data(Some(CONFIG), data.path());
    within(Duration::from_secs(15), "durable subscription", async {
        // Subscribe, and prove it with one message.
        let mut subscriber = Client::connect(&router, CONTAINER).await;
        let mut r = subscriber
            .prefetch_receiver(LINK, durable_source(TOPIC), 20)
            .await;
        consumers_ready(&router, TOPIC, 1).await;
        let mut publisher = Client::connect(&router, "durable-publisher").await;
        let mut sender = publisher.sender("s", TOPIC).await;
        send_all_accepted(&mut sender, ["hello".to_string()]).await;
        let d = recv_within(&mut r, "the first message on the new subscription").await;
        assert_eq!(text(&d), "hello");
        r.accept(&d).await.expect("accept hello");
        wait_queue(&router, &queue, "hello acknowledged", |q| {
            q["depth"] == 0 && q["acknowledged"] == 1
        })
        .await;
        // Leave without unsubscribing: detach with closed=false (dropping the receiver would
        // close the link), then close the connection.
        if let Err((_, e)) = r.detach().await {
            panic!("detach the subscriber's link: {e:?}");
        }
        subscriber.close().await;

        // Publish while the subscriber is away; `accepted` means stored.
        let want: Vec<String> = (0..10).map(|i| format!("n{i:02}")).collect();
        send_all_accepted(&mut sender, want.clone()).await;
        wait_queue(
            &router,
            &queue,
            "10 messages kept for the absent subscriber",
            |q| q["depth"] == 10 && q["consumers"] == 0,
        )
        .await;
        sender.close().await.expect("close sender");
        publisher.close().await;

        // Crash and restart over the same data.
        router.kill();
        router = Router::start_with_data(Some(CONFIG), data.path());
        wait_queue(&router, &queue, "the 10 messages recovered", |q| {
            q["depth"] == 10
        })
        .await;

        // Reattach: all 10, once, in order, never delivered before.
        let mut subscriber = Client::connect(&router, CONTAINER).await;
        let mut r = subscriber
            .prefetch_receiver(LINK, durable_source(TOPIC), 20)
            .await;
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let d = recv_within(&mut r, "the messages kept across the restart").await;
            assert_eq!(delivery_count(&d), 0, "{} was delivered before", text(&d));
            got.push(text(&d).to_string());
            r.accept(&d).await.expect("accept");
        }
        assert_eq!(got, want, "kept messages, in order");
        assert_nothing(&mut r, 300, "after the 10 kept messages").await;
        wait_queue(&router, &queue, "the 10 acknowledged", |q| q["depth"] == 0).await;

        // Crash again, this time with the subscriber attached.
        router.kill();
        subscriber.kill();
        drop(r);
        router = Router::start_with_data(Some(CONFIG), data.path());
        wait_queue(&router, &queue, "the subscription recovered, empty", |q| {
            q["depth"] == 0
        })
        .await;
        let mut subscriber = Client::connect(&router, CONTAINER).await;
        let mut r = subscriber
            .prefetch_receiver(LINK, durable_source(TOPIC), 20)
            .await;
        assert_nothing(
            &mut r,
            1500,
            "acknowledged messages after the second restart",
        )
        .await;

        // The subscription still collects new messages.
        let mut publisher = Client::connect(&router, "durable-publisher").await;
        let mut sender = publisher.sender("s", TOPIC).await;
        send_all_accepted(&mut sender, ["fresh".to_string()]).await;
        let d = recv_within(&mut r, "a message published after the second restart").await;
        assert_eq!(text(&d), "fresh");
        r.accept(&d).await.expect("accept fresh");
        assert_nothing(&mut r, 300, "after the fresh message").await;
        sender.close().await.expect("close sender");
        publisher.close().await;
        if let Err((_, e)) = r.detach().await {
            panic!("detach the subscriber's link: {e:?}");
        }
        subscriber.close().await;
    })
    .await;
}
