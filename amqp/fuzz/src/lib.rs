//! Fuzz drivers for the AMQP engine; the targets in `fuzz_targets/` only call these.
//!
//! Every driver panics on a broken invariant (not only on a panic inside the engine): a decoded
//! value or performative that does not re-encode to something decodable, engine output that
//! is not well formed, or output out of proportion to the input.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use amqp::codec::{Decoder, Encoder, Value};
use amqp::error::DecodeError;
use amqp::frames::{
    self, AMQP_HEADER, Attach, Begin, FRAME_AMQP, FRAME_SASL, Flow, Open, Performative,
    SASL_HEADER, SaslFrame,
};
use amqp::sasl::{PlainAndAnonymous, SaslClient};
use amqp::{
    AttachReply, AttachRequest, Config, Connection, DeliveryState, Event, Role, Terminus, message,
};
use bytes::{Bytes, BytesMut};

/// Structural equality where floats compare bit for bit (NaN == NaN).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Double(x), Value::Double(y)) => x.to_bits() == y.to_bits(),
        (Value::List(x), Value::List(y)) | (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        (Value::Described(da, va), Value::Described(db, vb)) => same(da, db) && same(va, vb),
        _ => a == b,
    }
}

/// The decoder bounds an array's element count by its byte size, so an array of more nulls
/// than bytes (legal AMQP, but refused as a resource guard) is the one value it writes and
/// does not read back.
fn is_null_array_refusal(e: &DecodeError) -> bool {
    *e == DecodeError::Invalid("array count exceeds size")
}

/// `frame_decoder`: every decoder on the same bytes, plus re-encoding oracles.
pub fn frame_decoder(data: &[u8]) {
    // Generic values: what decodes must re-encode to the same value.
    let mut d = Decoder::new(data);
    if let Ok(v) = d.value() {
        let mut buf = BytesMut::new();
        Encoder::new(&mut buf).value(&v);
        match Decoder::new(&buf).value() {
            Ok(back) => assert!(same(&v, &back), "{v:?} re-decoded as {back:?}"),
            Err(e) => assert!(
                is_null_array_refusal(&e),
                "{v:?} re-encoded undecodably: {e}"
            ),
        }
        let mut s = Decoder::new(&buf);
        assert!(
            s.skip().is_ok() && s.is_empty(),
            "skip disagrees with value"
        );
    }
    let _ = Decoder::new(data).skip();

    // Performatives: decode, encode, decode again must reach a fixed point.
    if let Ok(p) = frames::decode_performative(Bytes::copy_from_slice(data)) {
        let mut b1 = BytesMut::new();
        p.encode(&mut b1);
        match frames::decode_performative(b1.clone().freeze()) {
            Ok(p2) => {
                let mut b2 = BytesMut::new();
                p2.encode(&mut b2);
                assert_eq!(b1, b2, "re-encoding of {p:?} is not stable");
            }
            Err(e) => assert!(
                is_null_array_refusal(&e),
                "{p:?} re-encoded undecodably: {e}"
            ),
        }
    }

    if let Ok(f) = frames::decode_sasl(data) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        match frames::decode_sasl(&b) {
            Ok(back) => assert_eq!(back, f),
            // sasl-server-mechanisms is mandatory: an empty list is written as null.
            Err(_) if f == SaslFrame::Mechanisms(Vec::new()) => {}
            Err(e) => assert!(
                is_null_array_refusal(&e),
                "{f:?} re-encoded undecodably: {e}"
            ),
        }
    }

    let _ = message::find_to(data);
    let _ = message::parse(data);
    let _ = message::expiry(data);
    // The in-place map reader visits exactly the entries the generic decoder builds.
    if let (Ok(Value::Map(entries)), Ok(mut m)) =
        (Decoder::new(data).value(), Decoder::new(data).map())
    {
        assert_eq!(m.left(), entries.len() * 2);
        for (k, _) in &entries {
            let want = match k {
                Value::String(s) | Value::Symbol(s) => Some(s.as_str()),
                _ => None,
            };
            assert_eq!(m.str_ref().ok().flatten(), want);
            assert!(m.skip().is_ok());
        }
        assert_eq!(m.left(), 0);
    }
}

fn frame(out: &mut Vec<u8>, frame_type: u8, channel: u16, body: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    frames::write_frame(&mut b, frame_type, channel, body);
    out.extend_from_slice(&b);
}

fn amqp(out: &mut Vec<u8>, channel: u16, p: Performative) {
    frame(out, FRAME_AMQP, channel, |b| p.encode(b));
}

fn sasl(out: &mut Vec<u8>, f: SaslFrame) {
    frame(out, FRAME_SASL, 0, |b| f.encode(b));
}

fn peer_open(idle_timeout: Option<u32>) -> Performative {
    Performative::Open(Open {
        container_id: "fuzz".into(),
        max_frame_size: Some(4096),
        channel_max: Some(16),
        idle_timeout,
        ..Open::default()
    })
}

fn attach(name: &str, handle: u32, role: Role) -> Performative {
    Performative::Attach(Box::new(Attach {
        name: name.into(),
        handle,
        role,
        snd_settle_mode: 2,
        rcv_settle_mode: 0,
        source: Some(Terminus::with_address("q")),
        target: Some(Terminus::with_address("q")),
        initial_delivery_count: (role == Role::Sender).then_some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }))
}

/// A begin on channel 0, a link on which the peer sends (handle 0), one on which it receives
/// (handle 1), and credit for the latter.
fn session_preamble(out: &mut Vec<u8>) {
    amqp(
        out,
        0,
        Performative::Begin(Begin {
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            ..Begin::default()
        }),
    );
    amqp(out, 0, attach("in", 0, Role::Sender));
    amqp(out, 0, attach("out", 1, Role::Receiver));
    amqp(
        out,
        0,
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(1),
            delivery_count: Some(0),
            link_credit: Some(10),
            ..Flow::default()
        }),
    );
}

/// Turns `data` into frames: records of [flags][len: u16 BE][body]; flags bits 0-1 are the
/// channel, bit 7 makes it a SASL frame, bit 6 an empty (heartbeat) frame.
fn records(mut data: &[u8], out: &mut Vec<u8>) {
    while data.len() >= 3 {
        let flags = data[0];
        let len = (u16::from_be_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
        let body = &data[3..3 + len];
        data = &data[3 + len..];
        let frame_type = if flags & 0x80 != 0 {
            FRAME_SASL
        } else {
            FRAME_AMQP
        };
        let body = if flags & 0x40 != 0 { &[][..] } else { body };
        frame(out, frame_type, u16::from(flags & 3), |b| {
            b.extend_from_slice(body)
        });
    }
    out.extend_from_slice(data);
}

/// Plays a cooperative owner: answers open and attaches, grants credit, sends one message per
/// credit event and settles deliveries, so that input reaches the deeper states.
fn react(c: &mut Connection, client: bool) {
    while let Some(e) = c.poll_event() {
        match e {
            Event::Opened(_) if client => {
                c.begin();
            }
            Event::Opened(_) => c.open(),
            Event::SessionBegun { channel } if client => {
                for (name, role) in [("in", Role::Receiver), ("out", Role::Sender)] {
                    c.attach(
                        channel,
                        AttachRequest {
                            name: name.into(),
                            role,
                            source: Some(Terminus::with_address("q")),
                            target: Some(Terminus::with_address("q")),
                            snd_settle_mode: 2,
                            rcv_settle_mode: 0,
                        },
                    );
                }
            }
            Event::Attach { link, .. } if client => c.set_credit(link, 8, false),
            Event::Attach { link, attach } => {
                c.accept_attach(
                    link,
                    AttachReply {
                        source: attach.source.clone(),
                        target: attach.target.clone(),
                        ..AttachReply::default()
                    },
                );
                c.set_credit(link, 8, false);
            }
            Event::Credit { link, credit, .. } if credit > 0 => {
                c.send(link, b"tag", b"hello", false, 0);
            }
            Event::Credit {
                link, drain: true, ..
            } => c.drain_complete(link),
            Event::Delivery(d) => {
                c.disposition(d.link, d.delivery_id, true, Some(DeliveryState::Accepted))
            }
            _ => {}
        }
    }
}

/// Asserts that what the engine wrote is protocol headers and frames whose bodies decode.
fn check_output(mut out: &[u8]) {
    while !out.is_empty() {
        if out.starts_with(b"AMQP") {
            assert!(out.len() >= 8, "truncated header in output");
            out = &out[8..];
            continue;
        }
        assert!(out.len() >= 8, "truncated frame in output");
        let size = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
        assert!(size >= 8 && size <= out.len(), "bad frame size {size}");
        let doff = out[4] as usize * 4;
        assert!(doff >= 8 && doff <= size, "bad data offset");
        let body = &out[doff..size];
        match out[5] {
            FRAME_AMQP if body.is_empty() => {}
            FRAME_AMQP => {
                if let Err(e) = frames::decode_performative(Bytes::copy_from_slice(body)) {
                    assert!(
                        is_null_array_refusal(&e),
                        "engine wrote an undecodable frame: {e}"
                    );
                }
            }
            FRAME_SASL => {
                if let Err(e) = frames::decode_sasl(body) {
                    panic!("engine wrote an undecodable sasl frame: {e}");
                }
            }
            t => panic!("unknown frame type {t} in output"),
        }
        out = &out[size..];
    }
}

/// `connection`: an engine fed the input in chunks.
///
/// Input: [mode][chunking][data...]. Mode bits 0-1: 0 server, raw input; 1 server after an AMQP
/// header and a valid open; 2 server after SASL ANONYMOUS, open, a begin and two attaches;
/// 3 client. Bit 2: `data` is frame records (see [`records`]) rather than raw bytes. Bit 3:
/// server with a user table (PLAIN checks passwords) / client with SASL. Bit 4: client gets a
/// valid server preamble first. Bit 5: the peer's open asks for heartbeats. The chunking byte
/// seeds the chunk sizes (0: all at once).
pub fn connection(data: &[u8]) {
    let [mode, chunking, data @ ..] = data else {
        return;
    };
    let (mode, chunking) = (*mode, *chunking);
    let client = mode & 3 == 3;
    let flag_auth = mode & 8 != 0;
    let idle = (mode & 0x20 != 0).then_some(1000);
    let start = Instant::now();
    let cfg = Config {
        max_frame_size: 4096,
        channel_max: 8,
        max_links: 4,
        max_message_size: 1 << 16,
        idle_timeout_ms: 60_000,
        ..Config::default()
    };

    let mut input = Vec::new();
    let mut c = if client {
        if mode & 0x10 != 0 {
            if flag_auth {
                input.extend_from_slice(&SASL_HEADER);
                sasl(&mut input, SaslFrame::Mechanisms(vec!["ANONYMOUS".into()]));
                sasl(
                    &mut input,
                    SaslFrame::Outcome {
                        code: 0,
                        additional_data: None,
                    },
                );
            }
            input.extend_from_slice(&AMQP_HEADER);
            amqp(&mut input, 0, peer_open(idle));
        }
        Connection::client(cfg, flag_auth.then(SaslClient::anonymous), start)
    } else {
        match mode & 3 {
            1 => {
                input.extend_from_slice(&AMQP_HEADER);
                amqp(&mut input, 0, peer_open(idle));
            }
            2 => {
                input.extend_from_slice(&SASL_HEADER);
                sasl(
                    &mut input,
                    SaslFrame::Init {
                        mechanism: "ANONYMOUS".into(),
                        initial_response: None,
                        hostname: None,
                    },
                );
                input.extend_from_slice(&AMQP_HEADER);
                amqp(&mut input, 0, peer_open(idle));
                session_preamble(&mut input);
            }
            _ => {}
        }
        let auth = PlainAndAnonymous {
            allow_anonymous: true,
            users: flag_auth.then(|| HashMap::from([("user".to_owned(), "pass".to_owned())])),
        };
        Connection::server(cfg, Some(Box::new(auth)), start)
    };
    if mode & 4 != 0 {
        records(data, &mut input);
    } else {
        input.extend_from_slice(data);
    }

    let mut buf = BytesMut::new();
    let mut written = c.output().split();
    let mut rest = &input[..];
    let mut state = u32::from(chunking);
    let mut now = start;
    while !rest.is_empty() {
        let n = if chunking == 0 {
            rest.len()
        } else {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            1 + (state >> 16) as usize % (usize::from(chunking) * 4)
        }
        .min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        now += Duration::from_millis(u64::from(chunking % 16) * 100);
        let r = c.handle_input(&mut buf, now);
        react(&mut c, client);
        let _ = c.tick(now);
        written.extend_from_slice(&c.output().split());
        if r.is_err() {
            assert!(c.is_closed(), "failed but not closed");
            break;
        }
    }
    assert!(
        written.len() <= 512 + 4 * input.len(),
        "{} bytes out for {} in",
        written.len(),
        input.len()
    );
    check_output(&written);
}
