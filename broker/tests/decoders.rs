//! Every broker decoder of bytes from disk or the network, fed garbage and mutated valid
//! encodings: an error, never a panic, and what decodes re-encodes to a fixed point. (The
//! same drivers run under libFuzzer in `broker/fuzz`.)

use broker::remote::{ToBroker, ToRouter};
use broker::service::{Delivery, Request};
use broker::shard::{Cmd, Shard};
use proptest::prelude::*;

fn valid_samples() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    out.push(
        Cmd::Enqueue {
            address: "q".into(),
            now: 5,
            ttl_ms: Some(1),
            absolute_expiry: None,
            body: b"body".to_vec(),
        }
        .encode(),
    );
    out.push(
        Cmd::Declare {
            address: "q".into(),
            max_delivery_attempts: 3,
            max_ttl_ms: None,
            dead_letter: Some("d".into()),
            expiry_address: Some("e".into()),
        }
        .encode(),
    );
    let mut s = Shard::new();
    s.apply(
        1,
        Cmd::Enqueue {
            address: "q".into(),
            now: 0,
            ttl_ms: Some(100),
            absolute_expiry: None,
            body: vec![],
        },
    );
    s.apply(
        2,
        Cmd::Attach {
            consumer: 3,
            address: "q".into(),
            credit: 1,
            now: 0,
        },
    );
    let mut snap = Vec::new();
    s.encode(&mut snap);
    out.push(snap);
    let mut f = Vec::new();
    ToBroker::Request(Request::Enqueue {
        address: "q".into(),
        ttl_ms: None,
        absolute_expiry: None,
        body: bytes::Bytes::from_static(b"x"),
        done: Some(4),
        dedup: None,
    })
    .encode(&mut f)
    .unwrap();
    out.push(f);
    let mut f = Vec::new();
    ToRouter::Deliveries(vec![Delivery {
        consumer: 1,
        seq: 2,
        delivery_count: 0,
        body: bytes::Bytes::from_static(b"y"),
    }])
    .encode(&mut f);
    out.push(f);
    out
}

fn exercise(b: &[u8]) {
    {
        use broker::net::*;
        use broker::wire::Reader;
        if let Ok(r) = decode_append(&mut Reader(b)) {
            let mut once = Vec::new();
            encode_append(&r, &mut once);
            let mut twice = Vec::new();
            encode_append(&decode_append(&mut Reader(&once)).unwrap(), &mut twice);
            assert_eq!(once, twice);
        }
        let _ = decode_append_response(&mut Reader(b));
        let _ = decode_vote(&mut Reader(b));
        let _ = decode_vote_response(&mut Reader(b));
        let _ = decode_snapshot(&mut Reader(b));
    }
    if let Ok(c) = Cmd::decode(b) {
        assert_eq!(Cmd::decode(&c.encode()).ok(), Some(c));
    }
    if let Ok(e) = broker::raft::decode_entry(b) {
        let once = broker::raft::encode_entry(&e);
        let back = broker::raft::decode_entry(&once).unwrap();
        assert_eq!(broker::raft::encode_entry(&back), once);
    }
    if let Ok((applied, shard, bodies)) = broker::raft::decode_snapshot_data(b) {
        let once = broker::raft::encode_snapshot_data(applied, &shard, &bodies);
        let (a2, s2, b2) = broker::raft::decode_snapshot_data(&once).unwrap();
        assert_eq!(broker::raft::encode_snapshot_data(a2, &s2, &b2), once);
    }
    if let Ok(s) = Shard::decode(b) {
        let mut once = Vec::new();
        s.encode(&mut once);
        let mut twice = Vec::new();
        Shard::decode(&once).unwrap().encode(&mut twice);
        assert_eq!(once, twice);
    }
    if let Ok(m) = ToBroker::decode(b) {
        let mut once = Vec::new();
        m.encode(&mut once).unwrap();
        let mut twice = Vec::new();
        ToBroker::decode(&once).unwrap().encode(&mut twice).unwrap();
        assert_eq!(once, twice);
    }
    if let Ok(m) = ToRouter::decode(b) {
        let mut once = Vec::new();
        m.encode(&mut once);
        assert_eq!(ToRouter::decode(&once).unwrap(), m);
    }
}

proptest! {
    #[test]
    fn garbage_is_an_error_not_a_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        exercise(&b);
    }

    #[test]
    fn mutated_valid_encodings_are_an_error_or_consistent(
        which in 0usize..5,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut b = valid_samples()[which].clone();
        for (at, v) in flips {
            let n = b.len();
            if n > 0 {
                b[at % n] = v;
            }
        }
        let keep = cut % (b.len() + 1);
        exercise(&b[..keep]);
        exercise(&b);
    }
}
