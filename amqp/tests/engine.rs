//! Client and server engines talking to each other in memory.

use std::time::Instant;

use amqp::sasl::{PlainAndAnonymous, SaslClient};
use amqp::{AttachReply, AttachRequest, Config, Connection, DeliveryState, Event, Role, Terminus};
use bytes::BytesMut;

fn pump(a: &mut Connection, b: &mut Connection, now: Instant) -> (Vec<Event>, Vec<Event>) {
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let mut x = a.output().split();
        let mut y = b.output().split();
        if x.is_empty() && y.is_empty() {
            break;
        }
        let _ = b.handle_input(&mut x, now);
        let _ = a.handle_input(&mut y, now);
        while let Some(e) = a.poll_event() {
            ea.push(e);
        }
        while let Some(e) = b.poll_event() {
            eb.push(e);
        }
    }
    (ea, eb)
}

fn server() -> Connection {
    let auth = PlainAndAnonymous {
        allow_anonymous: true,
        users: None,
    };
    Connection::server(
        Config {
            max_frame_size: 1024,
            ..Config::default()
        },
        Some(Box::new(auth)),
        Instant::now(),
    )
}

#[test]
fn transfer_round_trip_with_multi_frame_and_outcome() {
    let now = Instant::now();
    let mut c = Connection::client(
        Config {
            container_id: "client".into(),
            ..Config::default()
        },
        Some(SaslClient::plain("u", "p")),
        now,
    );
    let mut s = server();
    let (_, ev) = pump(&mut c, &mut s, now);
    assert!(ev.iter().any(|e| matches!(e, Event::Authenticated { .. })));
    assert!(ev.iter().any(|e| matches!(e, Event::Opened(_))));
    s.open();
    let ch = c.begin().unwrap();
    let link = c
        .attach(
            ch,
            AttachRequest {
                name: "l1".into(),
                role: Role::Sender,
                source: Some(Terminus::default()),
                target: Some(Terminus::with_address("q")),
                snd_settle_mode: 0,
                rcv_settle_mode: 0,
            },
        )
        .unwrap();
    let (_, ev) = pump(&mut c, &mut s, now);
    let slink = ev
        .iter()
        .find_map(|e| match e {
            Event::Attach { link, attach } => {
                assert_eq!(
                    attach.target.as_ref().unwrap().address.as_deref(),
                    Some("q")
                );
                Some(*link)
            }
            _ => None,
        })
        .expect("attach");
    s.accept_attach(slink, AttachReply::default());
    s.set_credit(slink, 5, false);
    let (ec, _) = pump(&mut c, &mut s, now);
    assert!(
        ec.iter()
            .any(|e| matches!(e, Event::Credit { credit: 5, .. }))
    );
    assert_eq!(c.credit(link), 5);
    let big = vec![7u8; 5000];
    let id = c.send(link, b"t1", &big, false, 0).unwrap();
    let (_, ev) = pump(&mut c, &mut s, now);
    let d = ev
        .iter()
        .find_map(|e| match e {
            Event::Delivery(d) => Some(d.clone()),
            _ => None,
        })
        .expect("delivery");
    assert_eq!(d.payload.len(), 5000);
    assert_eq!(&d.tag[..], b"t1");
    s.disposition(slink, d.delivery_id, true, Some(DeliveryState::Released));
    let (ec, _) = pump(&mut c, &mut s, now);
    assert!(ec.iter().any(|e| matches!(e,
        Event::Disposition { first, state: Some(DeliveryState::Released), settled: true, .. } if *first == id)));
}

#[test]
fn garbage_header_is_refused() {
    let mut s = server();
    let mut input = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    assert!(s.handle_input(&mut input, Instant::now()).is_err());
    assert!(s.output().starts_with(b"AMQP"));
}

#[test]
fn transfer_beyond_credit_detaches_link() {
    let now = Instant::now();
    let mut c = Connection::client(Config::default(), None, now);
    let mut s = server();
    pump(&mut c, &mut s, now);
    s.open();
    let ch = c.begin().unwrap();
    c.attach(
        ch,
        AttachRequest {
            name: "l".into(),
            role: Role::Sender,
            source: None,
            target: Some(Terminus::with_address("a")),
            snd_settle_mode: 2,
            rcv_settle_mode: 0,
        },
    );
    let (_, ev) = pump(&mut c, &mut s, now);
    let slink = ev.iter().find_map(|e| match e {
        Event::Attach { link, .. } => Some(*link),
        _ => None,
    });
    s.accept_attach(slink.unwrap(), AttachReply::default());
    pump(&mut c, &mut s, now);
    // Hand-craft a transfer without credit: 0x14 list [handle 0, delivery-id 0, tag ""].
    let mut raw = BytesMut::new();
    amqp::frames::write_frame(&mut raw, 0, 0, |b| {
        amqp::frames::Transfer {
            handle: 0,
            delivery_id: Some(0),
            delivery_tag: amqp::frames::DeliveryTag::new(b"x"),
            ..Default::default()
        }
        .encode(b)
    });
    s.handle_input(&mut raw, now).unwrap();
    let mut closed = false;
    while let Some(e) = s.poll_event() {
        if let Event::LinkClosed { error: Some(e), .. } = e {
            assert_eq!(e.condition, amqp::condition::TRANSFER_LIMIT_EXCEEDED);
            closed = true;
        }
    }
    assert!(closed);
}

/// Attach answers are matched to our links by name whatever their order, and a link's handle
/// is used again once the link is gone (a gateway's session holds thousands of links: neither
/// step searches all of them).
#[test]
fn attach_answers_match_by_name_and_freed_handles_are_reused() {
    let now = Instant::now();
    let mut c = Connection::client(Config::default(), Some(SaslClient::anonymous()), now);
    let mut s = server();
    pump(&mut c, &mut s, now);
    s.open();
    let ch = c.begin().unwrap();
    let req = |name: &str| AttachRequest {
        name: name.into(),
        role: Role::Receiver,
        source: Some(Terminus::with_address("q")),
        target: Some(Terminus::default()),
        snd_settle_mode: 0,
        rcv_settle_mode: 0,
    };
    let ours: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| c.attach(ch, req(n)).unwrap())
        .collect();
    let (_, ev) = pump(&mut c, &mut s, now);
    let mut theirs: Vec<(String, amqp::LinkId, u32)> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Attach { link, attach } => Some((attach.name.clone(), *link, attach.handle)),
            _ => None,
        })
        .collect();
    assert_eq!(theirs.len(), 3);
    // Answered in reverse order.
    for (_, l, _) in theirs.iter().rev() {
        s.accept_attach(*l, AttachReply::default());
    }
    let (ec, _) = pump(&mut c, &mut s, now);
    let answered: Vec<(amqp::LinkId, String)> = ec
        .iter()
        .filter_map(|e| match e {
            Event::Attach { link, attach } => Some((*link, attach.name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(answered.len(), 3);
    for (link, name) in &answered {
        let i = ["a", "b", "c"].iter().position(|n| n == name).unwrap();
        assert_eq!(*link, ours[i], "answer for {name}");
    }
    // "b" goes (both sides detach); the next link takes its handle.
    let b_handle = theirs.remove(1).2;
    c.detach(ours[1], None, true);
    let (_, ev) = pump(&mut c, &mut s, now);
    let sb = ev
        .iter()
        .find_map(|e| match e {
            Event::LinkClosed { link, .. } => Some(*link),
            _ => None,
        })
        .expect("detach reached the server");
    s.detach(sb, None, true);
    pump(&mut c, &mut s, now);
    c.attach(ch, req("d")).unwrap();
    let (_, ev) = pump(&mut c, &mut s, now);
    let d_handle = ev
        .iter()
        .find_map(|e| match e {
            Event::Attach { attach, .. } => Some(attach.handle),
            _ => None,
        })
        .expect("attach of d");
    assert_eq!(d_handle, b_handle);
}
