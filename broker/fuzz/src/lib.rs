//! Drivers for the broker's fuzz targets: every decoder of bytes that come from disk (log
//! records, commands, snapshots) or from the network (the router↔broker protocol) must refuse
//! bad input with an error, never panic, and re-encode what it accepts to a fixed point.

use broker::remote::{ToBroker, ToRouter};
use broker::shard::{Cmd, Shard};

/// Log payloads and snapshots: the first byte picks the decoder.
pub fn store_decoders(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(c) = Cmd::decode(rest) {
                let again = c.encode();
                assert_eq!(Cmd::decode(&again).ok(), Some(c));
            }
        }
        1 => {
            if let Ok(e) = broker::raft::decode_entry(rest) {
                let again = broker::raft::encode_entry(&e);
                let back = broker::raft::decode_entry(&again).ok();
                assert_eq!(back.map(|b| broker::raft::encode_entry(&b)), Some(again));
            }
        }
        _ => {
            if let Ok((a, sh, b)) = broker::raft::decode_snapshot_data(rest) {
                let once = broker::raft::encode_snapshot_data(a, &sh, &b);
                let back = broker::raft::decode_snapshot_data(&once).ok();
                let twice = back.map(|(a, sh, b)| broker::raft::encode_snapshot_data(a, &sh, &b));
                assert_eq!(twice, Some(once));
            }
            if let Ok(s) = Shard::decode(rest) {
                let mut once = Vec::new();
                s.encode(&mut once);
                let mut twice = Vec::new();
                if let Ok(s2) = Shard::decode(&once) {
                    s2.encode(&mut twice);
                }
                assert_eq!(once, twice);
            }
        }
    }
}

/// Frames of the router↔broker protocol (both directions) and Raft RPCs between brokers.
pub fn broker_protocol(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 4 == 2 {
        raft_rpcs(rest);
        return;
    }
    if which % 2 == 0 {
        if let Ok(m) = ToBroker::decode(rest) {
            let mut once = Vec::new();
            if m.encode(&mut once).is_ok() {
                let back = ToBroker::decode(&once).ok();
                let mut twice = Vec::new();
                if let Some(b) = back {
                    let _ = b.encode(&mut twice);
                }
                assert_eq!(once, twice);
            }
        }
    } else if let Ok(m) = ToRouter::decode(rest) {
        let mut once = Vec::new();
        m.encode(&mut once);
        assert_eq!(ToRouter::decode(&once).ok(), Some(m));
    }
}

/// The Raft RPC decoders of `broker::net`: no panic; accepted requests re-encode stably.
fn raft_rpcs(b: &[u8]) {
    use broker::net::*;
    use broker::wire::Reader;
    if let Ok(r) = decode_append(&mut Reader(b)) {
        let mut once = Vec::new();
        encode_append(&r, &mut once);
        let mut twice = Vec::new();
        if let Ok(r2) = decode_append(&mut Reader(&once)) {
            encode_append(&r2, &mut twice);
        }
        assert_eq!(once, twice);
    }
    let _ = decode_append_response(&mut Reader(b));
    let _ = decode_vote(&mut Reader(b));
    let _ = decode_vote_response(&mut Reader(b));
    let _ = decode_snapshot(&mut Reader(b));
    if let Ok(t) = decode_transfer(&mut Reader(b)) {
        let mut once = Vec::new();
        encode_transfer(&t, &mut once);
        let mut twice = Vec::new();
        if let Ok(t2) = decode_transfer(&mut Reader(&once)) {
            encode_transfer(&t2, &mut twice);
        }
        assert_eq!(once, twice);
    }
    if let Ok(c) = decode_chunk(b) {
        let mut once = Vec::new();
        encode_chunk(&c, &mut once);
        assert_eq!(decode_chunk(&once).ok(), Some(c));
    }
}
