//! Driver of the MQTT codec's fuzz target: decoding arbitrary bytes must never panic, and a
//! packet that decodes must re-encode to bytes that decode to the same packet.

use mqtt_gateway::codec::{Packet, Version, decode_slice, encode};

/// `[version selector][bytes]`: 0 = before CONNECT, 1 = 3.1.1, 2 = 5.0. A stream of packets
/// is decoded one after another, as a connection would.
pub fn mqtt_codec(data: &[u8]) {
    let Some((&which, mut rest)) = data.split_first() else {
        return;
    };
    let mut version = match which % 3 {
        0 => None,
        1 => Some(Version::V311),
        _ => Some(Version::V5),
    };
    let max = 1 + usize::from(which) * 64;
    while let Ok(Some((p, used))) = decode_slice(rest, version, max) {
        assert!(used > 0 && used <= rest.len());
        let v = match &p {
            Packet::Connect(c) => c.version,
            _ => version.unwrap_or(Version::V5),
        };
        let mut again = bytes::BytesMut::new();
        encode(&p, v, &mut again);
        let back = decode_slice(&again, version, usize::MAX).ok().flatten();
        assert_eq!(back.map(|(b, _)| b), Some(p.clone()));
        if let Packet::Connect(c) = &p {
            version = Some(c.version);
        }
        rest = &rest[used..];
    }
}

/// A message delivered by the router, read for an MQTT subscriber: arbitrary bytes never
/// panic, and a message that reads agrees with the generic AMQP parser on what both read.
pub fn amqp_to_mqtt(data: &[u8]) {
    let msg = bytes::Bytes::copy_from_slice(data);
    let Ok(m) = mqtt_gateway::bridge::from_amqp(&msg, "mqtt/") else {
        return;
    };
    if let Ok(p) = amqp::message::parse(data) {
        assert_eq!(
            m.properties.message_expiry_interval,
            p.ttl_ms.map(|t| t.div_ceil(1000))
        );
        let topic = p
            .to
            .as_deref()
            .and_then(|t| mqtt_gateway::topic::address_topic("mqtt/", t));
        assert_eq!(m.topic.as_deref(), topic);
        assert!(m.payload.len() <= p.body.len());
    }
}

/// What a WebSocket client sends (`[selector][bytes]`): even selector, the bytes are an opening
/// handshake's head; odd, they are frames, fed in pieces of the selector's size. Never a panic,
/// and what the parser holds stays within its bounds.
pub fn ws(data: &[u8]) {
    use mqtt_gateway::ws::{Frames, answer};
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(a) = answer(rest) {
            assert!(a.starts_with("HTTP/1.1 101 ") && a.ends_with("\r\n\r\n"));
        }
        return;
    }
    let max_packet = 64;
    let mut f = Frames::new(max_packet);
    let mut fed = 0;
    for piece in rest.chunks(usize::from(which / 2).max(1)) {
        f.received(piece);
        fed += piece.len();
        loop {
            match f.parse() {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => return,
            }
        }
        assert!(f.data().len() <= 4 * (max_packet + 16));
        assert!(f.out().len() <= fed);
        // The reader takes what was parsed, as the MQTT session would.
        let n = f.data().len() / 2;
        let _ = f.data().split_to(n);
    }
}
