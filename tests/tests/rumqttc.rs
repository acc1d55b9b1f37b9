//! MQTT interop with rumqttc (MQTT 3.1.1 client) against `enmesh standalone`'s gateway:
//! QoS 0/1/2 publish/subscribe with a wildcard, and a message from an MQTT device read by an
//! AMQP service (fe2o3-amqp) on the mapped topic address.

use std::time::Duration;

use enmesh_tests::Router;
use fe2o3_amqp::{Connection, Receiver, Session};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

fn client(router: &Router, id: &str) -> (AsyncClient, EventLoop) {
    let at = router.mqtt.expect("the standalone serves MQTT");
    let mut o = MqttOptions::new(id, at.ip().to_string(), at.port());
    o.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(o, 100)
}

/// Polls `ev` until `f` has seen what it wants (true), within 10 s.
async fn poll_until(ev: &mut EventLoop, mut f: impl FnMut(&Event) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = ev.poll().await.expect("mqtt event loop");
            if f(&e) {
                return;
            }
        }
    })
    .await
    .expect("timed out waiting for an MQTT event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_publish_subscribe_qos_0_1_2() {
    let router = Router::start();
    let (sub, mut sub_ev) = client(&router, "rq-sub");
    sub.subscribe("rq/+/data", QoS::ExactlyOnce).await.unwrap();
    poll_until(&mut sub_ev, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_)))
    })
    .await;
    let (publ, mut pub_ev) = client(&router, "rq-pub");
    let pub_task = tokio::spawn(async move {
        for (i, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
            .into_iter()
            .enumerate()
        {
            publ.publish(format!("rq/{i}/data"), q, false, format!("m{i}"))
                .await
                .unwrap();
        }
        // Until the QoS 2 exchange completed.
        poll_until(&mut pub_ev, |e| {
            matches!(e, Event::Incoming(Packet::PubComp(_)))
        })
        .await;
        publ
    });
    let mut got = Vec::new();
    poll_until(&mut sub_ev, |e| {
        if let Event::Incoming(Packet::Publish(p)) = e {
            got.push((p.topic.clone(), p.payload.to_vec(), p.qos as u8));
        }
        got.len() == 3
    })
    .await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("rq/0/data".to_string(), b"m0".to_vec(), 0),
            ("rq/1/data".to_string(), b"m1".to_vec(), 1),
            ("rq/2/data".to_string(), b"m2".to_vec(), 2),
        ]
    );
    let _ = pub_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_device_to_an_amqp_service() {
    let router = Router::start();
    let mut conn = Connection::open("svc", router.amqp_url().as_str())
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut rx = Receiver::attach(&mut session, "telemetry", "mqtt/plant/*/temp")
        .await
        .unwrap();
    let (publ, mut ev) = client(&router, "rq-dev");
    publ.publish("plant/7/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    poll_until(&mut ev, |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await;
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        rx.recv::<fe2o3_amqp::types::messaging::Body<fe2o3_amqp::types::primitives::Value>>(),
    )
    .await
    .expect("no message for the AMQP service")
    .unwrap();
    let body = format!("{:?}", d.body());
    assert!(
        body.contains("21.5") || body.contains("50, 49, 46, 53"),
        "{body}"
    );
    rx.accept(&d).await.unwrap();
    rx.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}
