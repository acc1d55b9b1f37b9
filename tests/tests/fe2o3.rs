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

use enmesh_tests::Router;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::CreditMode;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{AmqpError, Error as AmqpErrorValue};
use fe2o3_amqp::types::messaging::{Data, Message, Modified, Outcome, Properties, Source, Target};
use fe2o3_amqp::types::primitives::Binary;
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
