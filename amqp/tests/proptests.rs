//! Property tests of the wire format and the connection engine: encode/decode round trips for
//! values and every performative, and "never panics, output stays bounded" for hostile input.
//!
//! Case counts are kept small enough for `cargo test -p enmesh-amqp` to stay fast in debug;
//! set `PROPTEST_CASES` to run more (it overrides every `with_cases` below).

use std::time::Instant;

use amqp::codec::{Decoder, Encoder, Value};
use amqp::frames::{
    self, AMQP_HEADER, Attach, Begin, Detach, Disposition, Flow, Open, Performative, SASL_HEADER,
    SaslFrame, Transfer, descriptor,
};
use amqp::sasl::{PlainAndAnonymous, SaslClient};
use amqp::{
    AttachReply, AttachRequest, Config, Connection, DeliveryState, ErrorCondition, Event, Role,
    Terminus, message,
};
use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Generators

fn u32s() -> impl Strategy<Value = u32> + Clone {
    prop_oneof![Just(0u32), 1u32..256, any::<u32>()]
}

fn u64s() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![Just(0u64), 1u64..256, any::<u64>()]
}

fn small_bytes() -> impl Strategy<Value = Vec<u8>> + Clone {
    // Both the 8-bit and the 32-bit length forms.
    prop_oneof![4 => vec(any::<u8>(), 0..16), 1 => vec(any::<u8>(), 250..300)]
}

fn string() -> impl Strategy<Value = String> + Clone {
    prop_oneof![4 => "\\PC{0,12}", 1 => "[a-z]{250,270}"]
}

fn symbol() -> impl Strategy<Value = String> + Clone {
    "[a-z][a-z:.-]{0,15}"
}

/// Number of scalar kinds `scalar_of` knows; kind 0 is null.
const KINDS: usize = 21;

/// A scalar value of one kind, so that arrays can hold elements of a single type.
fn scalar_of(kind: usize) -> BoxedStrategy<Value> {
    match kind {
        0 => Just(Value::Null).boxed(),
        1 => any::<bool>().prop_map(Value::Bool).boxed(),
        2 => any::<u8>().prop_map(Value::Ubyte).boxed(),
        3 => any::<u16>().prop_map(Value::Ushort).boxed(),
        4 => u32s().prop_map(Value::Uint).boxed(),
        5 => u64s().prop_map(Value::Ulong).boxed(),
        6 => any::<i8>().prop_map(Value::Byte).boxed(),
        7 => any::<i16>().prop_map(Value::Short).boxed(),
        8 => prop_oneof![-128i32..128, any::<i32>()]
            .prop_map(Value::Int)
            .boxed(),
        9 => prop_oneof![-128i64..128, any::<i64>()]
            .prop_map(Value::Long)
            .boxed(),
        // Any bit pattern, NaNs included: compared bit for bit by `same`.
        10 => any::<u32>()
            .prop_map(|b| Value::Float(f32::from_bits(b)))
            .boxed(),
        11 => any::<u64>()
            .prop_map(|b| Value::Double(f64::from_bits(b)))
            .boxed(),
        12 => any::<[u8; 4]>().prop_map(Value::Decimal32).boxed(),
        13 => any::<[u8; 8]>().prop_map(Value::Decimal64).boxed(),
        14 => any::<[u8; 16]>().prop_map(Value::Decimal128).boxed(),
        15 => any::<u32>().prop_map(Value::Char).boxed(),
        16 => any::<i64>().prop_map(Value::Timestamp).boxed(),
        17 => any::<[u8; 16]>().prop_map(Value::Uuid).boxed(),
        18 => small_bytes()
            .prop_map(|b| Value::Binary(Bytes::from(b)))
            .boxed(),
        19 => string().prop_map(Value::String).boxed(),
        _ => symbol().prop_map(Value::Symbol).boxed(),
    }
}

fn scalar() -> impl Strategy<Value = Value> + Clone {
    (0..KINDS).prop_flat_map(scalar_of)
}

/// Elements of one non-null scalar kind. Arrays of nulls are left out on purpose: nulls take no
/// bytes in an array, and the decoder bounds an array's count by its byte size so that a few
/// bytes cannot claim billions of elements.
fn scalar_elems(max: usize) -> impl Strategy<Value = Vec<Value>> + Clone {
    (1..KINDS).prop_flat_map(move |k| vec(scalar_of(k), 0..max))
}

fn descriptor_value() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        u64s().prop_map(Value::Ulong),
        symbol().prop_map(Value::Symbol)
    ]
}

/// Drops an outer descriptor: a described value's own value is never described.
fn undescribed(v: Value) -> Value {
    match v {
        Value::Described(_, v) => *v,
        v => v,
    }
}

fn described(d: Value, v: Value) -> Value {
    Value::Described(Box::new(d), Box::new(undescribed(v)))
}

/// Any value: scalars, lists, maps, arrays of one element type (scalars, lists, maps, arrays,
/// described) and described values, nested a few levels deep.
fn value() -> BoxedStrategy<Value> {
    scalar()
        .prop_recursive(4, 48, 5, |inner| {
            let elems = prop_oneof![
                4 => scalar_elems(6),
                1 => vec(vec(inner.clone(), 0..3).prop_map(Value::List), 0..3),
                1 => vec(
                    vec((inner.clone(), inner.clone()), 0..3).prop_map(Value::Map),
                    0..3
                ),
                1 => vec(scalar_elems(4).prop_map(Value::Array), 0..3),
                1 => (descriptor_value(), scalar_elems(4)).prop_map(|(d, items)| {
                    items.into_iter().map(|v| described(d.clone(), v)).collect()
                }),
            ];
            prop_oneof![
                vec(inner.clone(), 0..5).prop_map(Value::List),
                vec((inner.clone(), inner.clone()), 0..4).prop_map(Value::Map),
                elems.prop_map(Value::Array),
                (descriptor_value(), inner).prop_map(|(d, v)| described(d, v)),
            ]
        })
        .boxed()
}

/// A value for an optional field: `Some(Value::Null)` is written as null and read back as `None`.
fn opt_value() -> impl Strategy<Value = Option<Value>> + Clone {
    option::of(value().prop_map(|v| match v {
        Value::Null => Value::Ulong(7),
        v => v,
    }))
}

fn error_condition() -> impl Strategy<Value = ErrorCondition> + Clone {
    (symbol(), option::of(string()), opt_value()).prop_map(|(condition, description, info)| {
        ErrorCondition {
            condition,
            description,
            info,
        }
    })
}

fn delivery_state() -> impl Strategy<Value = DeliveryState> + Clone {
    prop_oneof![
        (u32s(), u64s()).prop_map(|(section_number, section_offset)| {
            DeliveryState::Received {
                section_number,
                section_offset,
            }
        }),
        Just(DeliveryState::Accepted),
        option::of(error_condition()).prop_map(DeliveryState::Rejected),
        Just(DeliveryState::Released),
        (any::<bool>(), any::<bool>(), opt_value()).prop_map(|(f, u, a)| {
            DeliveryState::Modified {
                delivery_failed: f,
                undeliverable_here: u,
                message_annotations: a,
            }
        }),
        // States the engine does not interpret (e.g. transactional): an unknown numeric
        // descriptor over a list, or a symbolic descriptor over anything.
        (0x30u64..0x40, vec(value(), 0..3))
            .prop_map(|(d, f)| DeliveryState::Other(described(Value::Ulong(d), Value::List(f)))),
        (symbol(), value()).prop_map(|(d, v)| DeliveryState::Other(described(Value::Symbol(d), v))),
    ]
}

fn terminus(is_source: bool) -> impl Strategy<Value = Terminus> + Clone {
    let base = (
        option::of(string()),
        option::of(u32s()),
        option::of(symbol()),
        option::of(u32s()),
        any::<bool>(),
        opt_value(),
        opt_value(),
    );
    let source_only = (option::of(symbol()), opt_value(), opt_value(), opt_value());
    (base, source_only).prop_map(move |((a, d, e, t, dy, dnp, caps), (dm, f, dout, outs))| {
        let mut t = Terminus {
            address: a,
            durable: d,
            expiry_policy: e,
            timeout: t,
            dynamic: dy,
            dynamic_node_properties: dnp,
            capabilities: caps,
            ..Default::default()
        };
        if is_source {
            t.distribution_mode = dm;
            t.filter = f;
            t.default_outcome = dout;
            t.outcomes = outs;
        }
        t
    })
}

fn role() -> impl Strategy<Value = Role> + Clone {
    prop_oneof![Just(Role::Sender), Just(Role::Receiver)]
}

fn open() -> impl Strategy<Value = Open> {
    (
        string(),
        option::of(string()),
        option::of(u32s()),
        option::of(any::<u16>()),
        option::of(u32s()),
        opt_value(),
        opt_value(),
        opt_value(),
    )
        .prop_map(|(c, h, mfs, cm, it, oc, dc, p)| Open {
            container_id: c,
            hostname: h,
            max_frame_size: mfs,
            channel_max: cm,
            idle_timeout: it,
            offered_capabilities: oc,
            desired_capabilities: dc,
            properties: p,
        })
}

fn begin() -> impl Strategy<Value = Begin> {
    (
        option::of(any::<u16>()),
        u32s(),
        u32s(),
        u32s(),
        option::of(u32s()),
        opt_value(),
        opt_value(),
        opt_value(),
    )
        .prop_map(|(rc, no, iw, ow, hm, oc, dc, p)| Begin {
            remote_channel: rc,
            next_outgoing_id: no,
            incoming_window: iw,
            outgoing_window: ow,
            handle_max: hm,
            offered_capabilities: oc,
            desired_capabilities: dc,
            properties: p,
        })
}

fn attach() -> impl Strategy<Value = Attach> {
    (
        (string(), u32s(), role(), any::<u8>(), any::<u8>()),
        option::of(terminus(true)),
        option::of(terminus(false)),
        option::of(u32s()),
        option::of(u64s()),
        opt_value(),
        opt_value(),
        opt_value(),
    )
        .prop_map(
            |((name, handle, role, snd, rcv), s, t, idc, mms, oc, dc, p)| Attach {
                name,
                handle,
                role,
                snd_settle_mode: snd,
                rcv_settle_mode: rcv,
                source: s,
                target: t,
                initial_delivery_count: idc,
                max_message_size: mms,
                offered_capabilities: oc,
                desired_capabilities: dc,
                properties: p,
            },
        )
}

fn flow() -> impl Strategy<Value = Flow> {
    (
        option::of(u32s()),
        u32s(),
        u32s(),
        u32s(),
        option::of(u32s()),
        option::of(u32s()),
        option::of(u32s()),
        option::of(u32s()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(ni, iw, no, ow, h, dc, lc, av, drain, echo)| Flow {
            next_incoming_id: ni,
            incoming_window: iw,
            next_outgoing_id: no,
            outgoing_window: ow,
            handle: h,
            delivery_count: dc,
            link_credit: lc,
            available: av,
            drain,
            echo,
        })
}

fn transfer() -> impl Strategy<Value = Transfer> {
    (
        u32s(),
        option::of(u32s()),
        option::of(
            proptest::collection::vec(any::<u8>(), 0..=32)
                .prop_filter_map("tags are at most 32 bytes", |v| {
                    amqp::frames::DeliveryTag::new(&v)
                }),
        ),
        option::of(u32s()),
        option::of(any::<bool>()),
        any::<bool>(),
        option::of(any::<u8>()),
        option::of(delivery_state()),
        (any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(handle, id, tag, mf, settled, more, rsm, state, (resume, aborted, batchable))| {
                Transfer {
                    handle,
                    delivery_id: id,
                    delivery_tag: tag,
                    message_format: mf,
                    settled,
                    more,
                    rcv_settle_mode: rsm,
                    state,
                    resume,
                    aborted,
                    batchable,
                }
            },
        )
}

fn disposition() -> impl Strategy<Value = Disposition> {
    (
        role(),
        u32s(),
        option::of(u32s()),
        any::<bool>(),
        option::of(delivery_state()),
        any::<bool>(),
    )
        .prop_map(
            |(role, first, last, settled, state, batchable)| Disposition {
                role,
                first,
                last,
                settled,
                state,
                batchable,
            },
        )
}

fn detach() -> impl Strategy<Value = Detach> {
    (u32s(), any::<bool>(), option::of(error_condition())).prop_map(|(handle, closed, error)| {
        Detach {
            handle,
            closed,
            error,
        }
    })
}

fn performative() -> BoxedStrategy<Performative> {
    // Boxed variants keep the value trees on the heap: unboxed, their nested tuples make stack
    // frames of several MB in debug builds.
    prop_oneof![
        open().prop_map(Performative::Open).boxed(),
        begin().prop_map(Performative::Begin).boxed(),
        attach()
            .prop_map(|a| Performative::Attach(Box::new(a)))
            .boxed(),
        flow().prop_map(Performative::Flow).boxed(),
        (transfer(), small_bytes())
            .prop_map(|(t, p)| Performative::Transfer(t, Bytes::from(p)))
            .boxed(),
        disposition().prop_map(Performative::Disposition).boxed(),
        detach().prop_map(Performative::Detach).boxed(),
        option::of(error_condition())
            .prop_map(Performative::End)
            .boxed(),
        option::of(error_condition())
            .prop_map(Performative::Close)
            .boxed(),
    ]
    .boxed()
}

/// Bytes that are mostly format codes and small numbers, so that random input reaches past the
/// first constructor more often than uniform bytes do.
fn wire_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => any::<u8>(),
        2 => prop::sample::select(vec![
            0x00u8, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x50, 0x52, 0x53, 0x54, 0x55, 0x56, 0x60,
            0x70, 0x71, 0x80, 0x81, 0x98, 0xa0, 0xa1, 0xa3, 0xb0, 0xb1, 0xb3, 0xc0, 0xc1, 0xd0,
            0xd1, 0xe0, 0xf0,
        ]),
        2 => 0u8..8,
    ];
    vec(byte, 0..max)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Structural equality where floats compare bit for bit (NaN == NaN).
fn same(a: &Value, b: &Value) -> bool {
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

fn encode_value(v: &Value) -> BytesMut {
    let mut buf = BytesMut::new();
    Encoder::new(&mut buf).value(v);
    buf
}

fn encode_performative(p: &Performative) -> Bytes {
    let mut buf = BytesMut::new();
    p.encode(&mut buf);
    buf.freeze()
}

fn frame(channel: u16, p: &Performative) -> BytesMut {
    let mut out = BytesMut::new();
    frames::write_frame(&mut out, frames::FRAME_AMQP, channel, |b| p.encode(b));
    out
}

fn sasl_frame(f: &SaslFrame) -> BytesMut {
    let mut out = BytesMut::new();
    frames::write_frame(&mut out, frames::FRAME_SASL, 0, |b| f.encode(b));
    out
}

fn peer_open() -> Performative {
    Performative::Open(Open {
        container_id: "peer".into(),
        max_frame_size: Some(4096),
        channel_max: Some(16),
        ..Default::default()
    })
}

/// What the peer may send before the arbitrary part.
#[derive(Debug, Clone, Copy)]
enum Prefix {
    None,
    /// AMQP header and a valid open.
    Open,
    /// SASL header, sasl-init ANONYMOUS, AMQP header and a valid open.
    SaslOpen,
}

fn prefix_bytes(p: Prefix) -> Vec<u8> {
    let mut v = Vec::new();
    match p {
        Prefix::None => {}
        Prefix::Open => {
            v.extend_from_slice(&AMQP_HEADER);
            v.extend_from_slice(&frame(0, &peer_open()));
        }
        Prefix::SaslOpen => {
            v.extend_from_slice(&SASL_HEADER);
            v.extend_from_slice(&sasl_frame(&SaslFrame::Init {
                mechanism: "ANONYMOUS".into(),
                initial_response: None,
                hostname: None,
            }));
            v.extend_from_slice(&AMQP_HEADER);
            v.extend_from_slice(&frame(0, &peer_open()));
        }
    }
    v
}

fn prefix() -> impl Strategy<Value = Prefix> {
    prop_oneof![
        Just(Prefix::None),
        Just(Prefix::Open),
        Just(Prefix::SaslOpen)
    ]
}

/// A begin on channel 0, a link on which the peer sends (handle 0) and one on which it receives
/// (handle 1), and credit for the latter.
fn session_preamble() -> Vec<Performative> {
    let attach = |name: &str, handle, role| {
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
    };
    vec![
        Performative::Begin(Begin {
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            ..Begin::default()
        }),
        attach("in", 0, Role::Sender),
        attach("out", 1, Role::Receiver),
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
    ]
}

/// One frame of a session script: mostly link traffic on channel 0 with small handles and
/// delivery ids, sometimes session or connection level performatives.
fn step() -> impl Strategy<Value = (u16, Performative)> {
    let channel = prop_oneof![16 => Just(0u16), 1 => 1u16..4];
    let handle = prop_oneof![6 => Just(0u32), 1 => 0u32..3];
    let perf = prop_oneof![
        6 => (transfer(), small_bytes(), handle, prop::bool::weighted(0.9)).prop_map(
            |(mut t, p, handle, with_id)| {
            t.handle = handle;
            t.delivery_id = with_id.then(|| t.delivery_id.unwrap_or(0) % 16);
            Performative::Transfer(t, Bytes::from(p))
        }).boxed(),
        3 => flow().prop_map(|mut f| {
            f.handle = f.handle.map(|h| h % 3);
            Performative::Flow(f)
        }).boxed(),
        3 => disposition().prop_map(|mut d| {
            d.first %= 16;
            d.last = d.last.map(|l| l % 32);
            Performative::Disposition(d)
        }).boxed(),
        2 => attach().prop_map(|mut a| {
            a.handle %= 4;
            Performative::Attach(Box::new(a))
        }).boxed(),
        1 => detach().prop_map(|mut d| {
            d.handle %= 3;
            Performative::Detach(d)
        }).boxed(),
        1 => begin().prop_map(|mut b| {
            b.remote_channel = None;
            Performative::Begin(b)
        }).boxed(),
        1 => option::of(error_condition()).prop_map(Performative::End).boxed(),
        1 => performative(),
    ]
    .boxed();
    (channel, perf)
}

fn server() -> Connection {
    let auth = PlainAndAnonymous {
        allow_anonymous: true,
        users: None,
    };
    Connection::server(
        Config {
            max_frame_size: 4096,
            channel_max: 8,
            max_links: 4,
            max_message_size: 1 << 16,
            ..Config::default()
        },
        Some(Box::new(auth)),
        Instant::now(),
    )
}

/// Plays a cooperative owner: answers open and attaches, grants credit, sends one message per
/// credit event and settles deliveries, so that input reaches the deeper states.
fn react(c: &mut Connection, client: bool) -> usize {
    let mut n = 0;
    while let Some(e) = c.poll_event() {
        n += 1;
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
    n
}

/// Checks that what the engine wrote is well formed: protocol headers and frames whose bodies
/// decode.
fn check_output(mut out: &[u8]) -> Result<(), TestCaseError> {
    while !out.is_empty() {
        if out.starts_with(b"AMQP") {
            prop_assert!(out.len() >= 8, "truncated header in output");
            out = &out[8..];
            continue;
        }
        prop_assert!(out.len() >= 8, "truncated frame in output");
        let size = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
        prop_assert!(size >= 8 && size <= out.len(), "bad frame size {}", size);
        let doff = out[4] as usize * 4;
        prop_assert!(doff >= 8 && doff <= size);
        let body = &out[doff..size];
        match out[5] {
            frames::FRAME_AMQP if !body.is_empty() => {
                let r = frames::decode_performative(Bytes::copy_from_slice(body));
                prop_assert!(r.is_ok(), "engine wrote an undecodable frame: {:?}", r);
            }
            frames::FRAME_SASL => {
                let r = frames::decode_sasl(body);
                prop_assert!(r.is_ok(), "engine wrote an undecodable sasl frame: {:?}", r);
            }
            frames::FRAME_AMQP => {}
            t => prop_assert!(false, "unknown frame type {}", t),
        }
        out = &out[size..];
    }
    Ok(())
}

/// Feeds `chunks` to `c`, reacting to events. Returns (bytes in, bytes out, events).
fn feed(
    c: &mut Connection,
    client: bool,
    chunks: impl IntoIterator<Item = Vec<u8>>,
) -> Result<(usize, usize, usize), TestCaseError> {
    let now = Instant::now();
    let (mut bytes_in, mut bytes_out, mut events) = (0, 0, 0);
    let mut input = BytesMut::new();
    let mut written = BytesMut::new();
    for chunk in chunks {
        bytes_in += chunk.len();
        input.extend_from_slice(&chunk);
        let r = c.handle_input(&mut input, now);
        events += react(c, client);
        let out = c.output().split();
        bytes_out += out.len();
        written.extend_from_slice(&out);
        if r.is_err() {
            prop_assert!(c.is_closed());
            // Once failed, the engine takes no more input.
            let mut more = BytesMut::from(&b"AMQP\x00\x01\x00\x00"[..]);
            prop_assert!(c.handle_input(&mut more, now).is_err());
            break;
        }
        let _ = c.tick(now);
    }
    check_output(&written)?;
    Ok((bytes_in, bytes_out, events))
}

fn chunked(data: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(rest.len());
        let n = n.clamp(1, rest.len());
        out.push(rest[..n].to_vec());
        rest = &rest[n..];
        i += 1;
    }
    out
}

/// A peer gets back at most a constant (headers, our open, SASL mechanisms) plus a small
/// multiple of what it sent: no input makes the engine write without bound.
fn bounded(bytes_in: usize, bytes_out: usize) -> bool {
    bytes_out <= 512 + 4 * bytes_in
}

// ---------------------------------------------------------------------------------------------
// Round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn value_round_trip(v in value()) {
        let buf = encode_value(&v);
        let mut d = Decoder::new(&buf);
        let back = d.value();
        prop_assert!(back.is_ok(), "decode failed: {:?} for {:?}", back, v);
        let back = back.unwrap();
        prop_assert!(same(&v, &back), "{:?} decoded as {:?}", v, back);
        prop_assert!(d.is_empty(), "{} bytes left over", d.remaining());
        // Skipping a value consumes exactly its encoding.
        let mut s = Decoder::new(&buf);
        prop_assert!(s.skip().is_ok());
        prop_assert!(s.is_empty());
        // Re-encoding is stable.
        prop_assert_eq!(encode_value(&back), buf);
    }

    /// `ListReader::uint` and `::boolean` read their scalars in place; they must agree with
    /// the generic path (decode a `Value`, then match) on every kind of field, and on every
    /// truncation of it (an error either way, never a panic).
    #[test]
    fn list_reader_scalars_agree_with_generic_values(
        v in (0..KINDS).prop_flat_map(scalar_of),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = BytesMut::new();
        Encoder::new(&mut buf).value(&Value::List(vec![v.clone(), Value::Uint(7)]));
        let generic_uint = match v {
            Value::Null => Ok(None),
            Value::Uint(n) => Ok(Some(n)),
            _ => Err(()),
        };
        let generic_bool = match v {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(b)),
            _ => Err(()),
        };
        let mut l = Decoder::new(&buf).list().unwrap();
        let got = l.uint().map_err(|_| ());
        prop_assert_eq!(got, generic_uint);
        if got.is_ok() {
            // The field was consumed whole: the next one reads right.
            prop_assert_eq!(l.uint().ok(), Some(Some(7)));
        }
        let mut l = Decoder::new(&buf).list().unwrap();
        let got = l.boolean().map_err(|_| ());
        prop_assert_eq!(got, generic_bool);
        if got.is_ok() {
            prop_assert_eq!(l.uint().ok(), Some(Some(7)));
        }
        // A list whose last field is cut short: an error, not a panic.
        let n = cut.index(buf.len());
        if let Ok(mut l) = Decoder::new(&buf[..n]).list() {
            let _ = l.uint();
            let _ = l.boolean();
        }
    }

    #[test]
    fn performative_round_trip(p in performative()) {
        let body = encode_performative(&p);
        let back = frames::decode_performative(body.clone());
        prop_assert!(back.is_ok(), "decode failed: {:?} for {:?}", back, p);
        let back = back.unwrap();
        // Values with NaN floats do not compare equal; re-encoding compares them by bytes.
        prop_assert_eq!(encode_performative(&back), body.clone());
        if !format!("{p:?}").contains("NaN") {
            prop_assert_eq!(back, p);
        }
    }

    #[test]
    fn performative_in_frame_round_trip(ch in any::<u16>(), p in performative()) {
        let f = frame(ch, &p);
        let size = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        prop_assert_eq!(size, f.len());
        prop_assert_eq!(f[4], 2);
        prop_assert_eq!(u16::from_be_bytes([f[6], f[7]]), ch);
        let back = frames::decode_performative(Bytes::copy_from_slice(&f[8..])).unwrap();
        prop_assert_eq!(encode_performative(&back), encode_performative(&p));
    }

    #[test]
    fn sasl_round_trip(f in prop_oneof![
        // sasl-server-mechanisms is mandatory: an empty list is written as null.
        vec(symbol(), 1..4).prop_map(SaslFrame::Mechanisms),
        (symbol(), option::of(small_bytes().prop_map(Bytes::from)), option::of(string()))
            .prop_map(|(mechanism, initial_response, hostname)| SaslFrame::Init {
                mechanism, initial_response, hostname
            }),
        small_bytes().prop_map(|b| SaslFrame::Challenge(b.into())),
        small_bytes().prop_map(|b| SaslFrame::Response(b.into())),
        (any::<u8>(), option::of(small_bytes().prop_map(Bytes::from)))
            .prop_map(|(code, additional_data)| SaslFrame::Outcome { code, additional_data }),
    ]) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        let back = frames::decode_sasl(&buf);
        prop_assert!(back.is_ok(), "decode failed: {:?} for {:?}", back, f);
        prop_assert_eq!(back.unwrap(), f);
    }

    /// The in-place scan of message annotations finds what the generic decoder finds.
    #[test]
    fn expiry_reads_annotations_like_the_generic_decoder(
        others in vec((symbol(), scalar()), 0..6),
        id in option::of(string()),
        new in option::of(any::<bool>()),
        at in any::<prop::sample::Index>(),
        ttl in option::of(any::<u32>()),
    ) {
        let mut entries: Vec<(Value, Value)> = others
            .into_iter()
            .filter(|(k, _)| k != message::DEDUP_ID && k != message::DEDUP_NEW)
            .map(|(k, v)| (Value::Symbol(k), v))
            .collect();
        let i = at.index(entries.len() + 1);
        if let Some(id) = &id {
            entries.insert(i, (Value::Symbol(message::DEDUP_ID.into()), Value::String(id.clone())));
        }
        if let Some(n) = new {
            entries.push((Value::Symbol(message::DEDUP_NEW.into()), Value::Bool(n)));
        }
        let mut buf = BytesMut::new();
        {
            let mut f = amqp::codec::Fields::new(&mut buf, message::HEADER);
            f.boolean(Some(true)).null().uint(ttl);
            f.finish();
        }
        let mut e = Encoder::new(&mut buf);
        e.descriptor(message::MESSAGE_ANNOTATIONS);
        e.value(&Value::Map(entries));
        e.descriptor(message::DATA);
        e.binary(b"payload");
        let x = message::expiry(&buf).unwrap();
        prop_assert_eq!(x.ttl_ms, ttl.map(u64::from));
        prop_assert_eq!(x.dedup_id, id);
        prop_assert_eq!(x.dedup_new, new.unwrap_or(false));
    }

    #[test]
    fn message_round_trip(
        id in option::of(any::<u64>()),
        to in option::of("[a-z/]{0,300}"),
        reply_to in option::of("[a-z/]{0,20}"),
        cid in option::of(any::<u64>()),
        ct in option::of(any::<i64>()),
        body in vec(any::<u8>(), 0..600),
        as_string in any::<bool>(),
        durable in any::<bool>(),
    ) {
        let m = message::Simple {
            message_id: id,
            to: to.as_deref(),
            reply_to: reply_to.as_deref(),
            correlation_id: cid,
            creation_time_ms: ct,
            body: &body,
            body_as_string: as_string,
            durable,
        };
        let mut buf = BytesMut::new();
        message::build(&m, &mut buf);
        prop_assert_eq!(message::find_to(&buf).unwrap(), to.clone());
        let p = message::parse(&buf).unwrap();
        prop_assert_eq!(p.to, to);
        prop_assert_eq!(p.reply_to, reply_to);
        prop_assert_eq!(p.message_id, id.map(Value::Ulong));
        prop_assert_eq!(p.correlation_id, cid.map(Value::Ulong));
        prop_assert_eq!(p.creation_time_ms, ct);
        if as_string {
            let text = String::from_utf8_lossy(&body);
            prop_assert_eq!(&p.body[..], text.as_bytes());
        } else {
            prop_assert_eq!(&p.body[..], &body[..]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input never panics

fn decode_everything(bytes: &[u8]) {
    let _ = Decoder::new(bytes).value();
    let mut d = Decoder::new(bytes);
    let _ = d.skip();
    let _ = frames::decode_performative(Bytes::copy_from_slice(bytes));
    let _ = frames::decode_sasl(bytes);
    let _ = message::find_to(bytes);
    let _ = message::parse(bytes);
    let _ = message::expiry(bytes);
    let _ = Decoder::new(bytes).map().map(|mut m| {
        while m.left() > 0 && m.str_ref().is_ok() && m.binary_ref().is_ok() {}
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in wire_bytes(512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn decoding_uniform_bytes_never_panics(bytes in vec(any::<u8>(), 0..256)) {
        decode_everything(&bytes);
    }

    /// Valid performatives with a few bytes changed and possibly cut short.
    #[test]
    fn decoding_mutated_performatives_never_panics(
        p in performative(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut bytes = encode_performative(&p).to_vec();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if do_cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        decode_everything(&bytes);
    }

    /// A message body: arbitrary sections after a valid header section.
    #[test]
    fn message_with_arbitrary_sections_never_panics(tail in wire_bytes(256)) {
        let mut bytes = vec![0x00, 0x53, 0x70, 0x45];
        bytes.extend_from_slice(&tail);
        let _ = message::find_to(&bytes);
        let _ = message::parse(&bytes);
        let _ = message::expiry(&bytes);
        let mut props = vec![0x00, 0x53, 0x73];
        props.extend_from_slice(&tail);
        let _ = message::find_to(&props);
        let _ = message::parse(&props);
    }

    /// Descriptors of descriptors, nested far beyond `MAX_DEPTH`, in fields that are skipped
    /// rather than decoded (open's locales, a message's message-id) and in message sections.
    #[test]
    fn deeply_nested_descriptors_are_refused(n in 1usize..200_000, tail in any::<u8>()) {
        let mut nested = vec![0x00; n];
        nested.push(0x53);
        nested.push(tail);
        let mut open = vec![0x00, 0x53, 0x10, 0xd0];
        let fields_len = (4 + 3 + 4 + nested.len()) as u32;
        open.extend_from_slice(&fields_len.to_be_bytes());
        open.extend_from_slice(&6u32.to_be_bytes());
        open.extend_from_slice(&[0xa1, 0x01, b'c', 0x40, 0x40, 0x40, 0x40]);
        open.extend_from_slice(&nested);
        prop_assert!(frames::decode_performative(Bytes::from(open)).is_err());
        let mut props = vec![0x00, 0x53, 0x73, 0xd0];
        props.extend_from_slice(&((4 + nested.len()) as u32).to_be_bytes());
        props.extend_from_slice(&1u32.to_be_bytes());
        props.extend_from_slice(&nested);
        let _ = message::find_to(&props);
        let _ = message::parse(&props);
        let _ = Decoder::new(&nested).skip();
        let _ = Decoder::new(&nested).value();
    }
}

// ---------------------------------------------------------------------------------------------
// The connection engine fed hostile input

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn server_survives_arbitrary_bytes(
        pre in prefix(),
        data in wire_bytes(2048),
        sizes in vec(1usize..300, 1..8),
    ) {
        let mut all = prefix_bytes(pre);
        all.extend_from_slice(&data);
        let mut c = server();
        let (bytes_in, bytes_out, _) = feed(&mut c, false, chunked(&all, &sizes))?;
        prop_assert!(bounded(bytes_in, bytes_out), "{} bytes out for {} in", bytes_out, bytes_in);
    }

    /// Well-formed frames carrying arbitrary performatives on a few channels and handles, most
    /// often after a valid begin and two attaches, so that sessions, links, credit and
    /// deliveries are exercised, not only the decoder.
    #[test]
    fn server_survives_arbitrary_performatives(
        pre in prop_oneof![Just(Prefix::Open), Just(Prefix::SaslOpen)],
        preamble in prop::bool::weighted(0.8),
        steps in vec(step(), 1..24),
        garbage in option::of(wire_bytes(64)),
        sizes in vec(1usize..600, 1..4),
    ) {
        let mut all = prefix_bytes(pre);
        if preamble {
            for p in session_preamble() {
                all.extend_from_slice(&frame(0, &p));
            }
        }
        for (ch, p) in &steps {
            all.extend_from_slice(&frame(*ch, p));
        }
        if let Some(g) = garbage {
            all.extend_from_slice(&g);
        }
        let mut c = server();
        let (bytes_in, bytes_out, _) = feed(&mut c, false, chunked(&all, &sizes))?;
        prop_assert!(bounded(bytes_in, bytes_out), "{} bytes out for {} in", bytes_out, bytes_in);
    }

    #[test]
    fn client_survives_arbitrary_bytes(
        sasl in any::<bool>(),
        prefixed in any::<bool>(),
        data in wire_bytes(1024),
        sizes in vec(1usize..300, 1..8),
    ) {
        let now = Instant::now();
        let mut c = Connection::client(
            Config { max_frame_size: 4096, ..Config::default() },
            sasl.then(SaslClient::anonymous),
            now,
        );
        let mut all = Vec::new();
        if prefixed {
            if sasl {
                all.extend_from_slice(&SASL_HEADER);
                all.extend_from_slice(&sasl_frame(&SaslFrame::Mechanisms(vec!["ANONYMOUS".into()])));
                all.extend_from_slice(&sasl_frame(&SaslFrame::Outcome { code: 0, additional_data: None }));
            }
            all.extend_from_slice(&AMQP_HEADER);
            all.extend_from_slice(&frame(0, &peer_open()));
        }
        all.extend_from_slice(&data);
        let (bytes_in, bytes_out, _) = feed(&mut c, true, chunked(&all, &sizes))?;
        prop_assert!(bounded(bytes_in, bytes_out), "{} bytes out for {} in", bytes_out, bytes_in);
    }
}

/// Sanity check of the helpers above: the prefixes are accepted as they are.
#[test]
fn prefixes_are_accepted() {
    for pre in [Prefix::Open, Prefix::SaslOpen] {
        let mut c = server();
        let mut input = BytesMut::from(&prefix_bytes(pre)[..]);
        c.handle_input(&mut input, Instant::now()).unwrap();
        assert!(input.is_empty());
        let mut opened = false;
        while let Some(e) = c.poll_event() {
            opened |= matches!(e, Event::Opened(_));
        }
        assert!(opened, "{pre:?}");
        let _ = descriptor::OPEN;
    }
}
