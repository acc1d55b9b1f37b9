//! Inputs that once crashed the engine (found by the property tests in `proptests.rs` or by the
//! fuzz targets in `amqp/fuzz`, see docs/fuzzing.md), kept as regression tests; and the writer
//! of the fuzz seed corpus (`write_fuzz_seeds`, ignored by default).

use std::time::Instant;

use amqp::codec::{Decoder, Encoder, Value};
use amqp::frames::{
    self, AMQP_HEADER, Attach, Begin, Detach, Disposition, Flow, Open, Performative, SaslFrame,
    Transfer,
};
use amqp::sasl::PlainAndAnonymous;
use amqp::{Config, Connection, DeliveryState, ErrorCondition, Role, Terminus, message};
use bytes::{Bytes, BytesMut};

fn server() -> Connection {
    let auth = PlainAndAnonymous {
        allow_anonymous: true,
        users: None,
    };
    Connection::server(Config::default(), Some(Box::new(auth)), Instant::now())
}

fn frame(channel: u16, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frames::write_frame(&mut out, frames::FRAME_AMQP, channel, |b| {
        b.extend_from_slice(body)
    });
    out.to_vec()
}

/// An open whose outgoing-locales field (skipped, not decoded) is `n` descriptors each
/// describing the next: `Decoder::skip` recursed once per byte and overflowed the stack.
fn open_with_nested_descriptors(n: usize) -> Vec<u8> {
    let mut nested = vec![0x00; n];
    nested.extend_from_slice(&[0x53, 0x01, 0x40]);
    let mut body = vec![0x00, 0x53, 0x10, 0xd0];
    body.extend_from_slice(&((4 + 7 + nested.len()) as u32).to_be_bytes());
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(&[0xa1, 0x01, b'c', 0x40, 0x40, 0x40, 0x40]);
    body.extend_from_slice(&nested);
    body
}

#[test]
fn nested_descriptors_in_a_skipped_field_do_not_overflow_the_stack() {
    // Found by proptests::deeply_nested_descriptors_are_refused. 60 000 levels fit in one
    // 64 KiB frame, the default max-frame-size.
    let body = open_with_nested_descriptors(60_000);
    assert!(frames::decode_performative(Bytes::from(body.clone())).is_err());

    let mut s = server();
    let mut input = BytesMut::from(&AMQP_HEADER[..]);
    input.extend_from_slice(&frame(0, &body));
    let r = s.handle_input(&mut input, Instant::now());
    assert!(r.is_err());
    assert!(s.is_closed());
}

#[test]
fn nested_descriptors_in_a_message_do_not_overflow_the_stack() {
    // A properties section whose message-id is 1 MB of nested descriptors: the router calls
    // `find_to` on every message it forwards.
    let mut nested = vec![0x00; 1 << 20];
    nested.extend_from_slice(&[0x53, 0x01, 0x40]);
    let mut msg = vec![0x00, 0x53, 0x73, 0xd0];
    msg.extend_from_slice(&((4 + nested.len()) as u32).to_be_bytes());
    msg.extend_from_slice(&1u32.to_be_bytes());
    msg.extend_from_slice(&nested);
    assert!(message::find_to(&msg).is_err());
    assert!(message::parse(&msg).is_err());
    assert!(Decoder::new(&nested).skip().is_err());
    assert!(Decoder::new(&nested).value().is_err());
}

#[test]
fn skip_still_accepts_a_few_nested_descriptors() {
    // 0x00 (0x00 0x53 0x01 0x53 0x02) 0x40: a described null whose descriptor is described.
    let v = [0x00, 0x00, 0x53, 0x01, 0x53, 0x02, 0x40];
    let mut d = Decoder::new(&v);
    d.skip().unwrap();
    assert!(d.is_empty());
    assert!(Decoder::new(&v).value().is_ok());
}

// ---------------------------------------------------------------------------------------------
// Seed corpus for the fuzz targets

fn encode(p: &Performative) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.encode(&mut b);
    b.to_vec()
}

fn sample_value() -> Value {
    Value::Map(vec![
        (
            Value::Symbol("k".into()),
            Value::List(vec![Value::Uint(1), Value::String("s".into()), Value::Null]),
        ),
        (
            Value::String("a".into()),
            Value::Array(vec![Value::Long(-1), Value::Long(1 << 40)]),
        ),
        (
            Value::Ulong(9),
            Value::Described(
                Box::new(Value::Symbol("x:y".into())),
                Box::new(Value::Binary(Bytes::from_static(b"bin"))),
            ),
        ),
    ])
}

fn sample_performatives() -> Vec<Performative> {
    let err = ErrorCondition {
        condition: "amqp:internal-error".into(),
        description: Some("boom".into()),
        info: Some(sample_value()),
    };
    let mut source = Terminus::with_address("q");
    source.filter = Some(sample_value());
    source.capabilities = Some(Value::Array(vec![Value::Symbol("queue".into())]));
    source.dynamic = true;
    let mut states = vec![
        DeliveryState::Accepted,
        DeliveryState::Released,
        DeliveryState::Rejected(Some(err.clone())),
        DeliveryState::Modified {
            delivery_failed: true,
            undeliverable_here: true,
            message_annotations: Some(sample_value()),
        },
        DeliveryState::Received {
            section_number: 1,
            section_offset: 2,
        },
    ];
    states.push(DeliveryState::Other(Value::Described(
        Box::new(Value::Ulong(0x34)),
        Box::new(Value::List(vec![Value::Binary(Bytes::from_static(b"txn"))])),
    )));
    let mut out = vec![
        Performative::Open(Open {
            container_id: "c".into(),
            hostname: Some("h".into()),
            max_frame_size: Some(4096),
            channel_max: Some(7),
            idle_timeout: Some(1000),
            offered_capabilities: Some(Value::Symbol("cap".into())),
            desired_capabilities: None,
            properties: Some(sample_value()),
        }),
        Performative::Begin(Begin {
            remote_channel: Some(0),
            next_outgoing_id: 1,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Some(3),
            ..Begin::default()
        }),
        Performative::Attach(Box::new(Attach {
            name: "l".into(),
            handle: 0,
            role: Role::Sender,
            snd_settle_mode: 2,
            rcv_settle_mode: 0,
            source: Some(source),
            target: Some(Terminus::with_address("q")),
            initial_delivery_count: Some(0),
            max_message_size: Some(1 << 20),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })),
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 100,
            next_outgoing_id: 0,
            outgoing_window: 100,
            handle: Some(0),
            delivery_count: Some(0),
            link_credit: Some(10),
            available: Some(1),
            drain: true,
            echo: true,
        }),
        Performative::Detach(Detach {
            handle: 0,
            closed: true,
            error: Some(err.clone()),
        }),
        Performative::End(Some(err.clone())),
        Performative::Close(Some(err)),
    ];
    for (i, state) in states.into_iter().enumerate() {
        let mut msg = BytesMut::new();
        message::build(
            &message::Simple {
                message_id: Some(i as u64),
                to: Some("q"),
                reply_to: Some("r"),
                correlation_id: Some(1),
                creation_time_ms: Some(1_700_000_000_000),
                body: b"hello",
                body_as_string: i % 2 == 0,
                durable: i % 3 == 0,
            },
            &mut msg,
        );
        out.push(Performative::Transfer(
            Transfer {
                handle: 0,
                delivery_id: Some(i as u32),
                delivery_tag: amqp::frames::DeliveryTag::new(&[i as u8]),
                message_format: Some(0),
                settled: Some(false),
                more: i == 1,
                state: Some(state.clone()),
                ..Transfer::default()
            },
            msg.freeze(),
        ));
        out.push(Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: 0,
            last: Some(i as u32),
            settled: true,
            state: Some(state),
            batchable: false,
        }));
    }
    out
}

/// A record for the `connection` target's structured mode: [flags][len: u16][body].
fn record(channel: u8, sasl: bool, body: &[u8]) -> Vec<u8> {
    let mut r = vec![channel | if sasl { 0x80 } else { 0 }];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// Builds seed inputs for both fuzz targets and checks that every frame seed decodes. With
/// `ENMESH_WRITE_FUZZ_SEEDS=1` it also writes them to `amqp/fuzz/corpus/<target>/` (gitignored):
/// `ENMESH_WRITE_FUZZ_SEEDS=1 cargo test -p enmesh-amqp --test fuzz_regressions fuzz_seeds`.
#[test]
fn fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let save = std::env::var_os("ENMESH_WRITE_FUZZ_SEEDS").is_some();
    let write = |target: &str, name: String, data: &[u8]| {
        if target == "frame_decoder" && name.starts_with("perf-") {
            assert!(
                amqp::frames::decode_performative(Bytes::copy_from_slice(data)).is_ok(),
                "seed {name} does not decode"
            );
        }
        if save {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    };

    let perfs = sample_performatives();
    let sasl = [
        SaslFrame::Mechanisms(vec!["PLAIN".into(), "ANONYMOUS".into()]),
        SaslFrame::Init {
            mechanism: "PLAIN".into(),
            initial_response: Some(Bytes::from_static(b"\0user\0pass")),
            hostname: Some("h".into()),
        },
        SaslFrame::Challenge(Bytes::from_static(b"c")),
        SaslFrame::Response(Bytes::from_static(b"\0user\0pass")),
        SaslFrame::Outcome {
            code: 0,
            additional_data: None,
        },
    ];
    let sasl: Vec<Vec<u8>> = sasl
        .iter()
        .map(|f| {
            let mut b = BytesMut::new();
            f.encode(&mut b);
            b.to_vec()
        })
        .collect();

    // frame_decoder: performative and SASL bodies, a message, a value.
    for (i, p) in perfs.iter().enumerate() {
        write("frame_decoder", format!("perf-{i}"), &encode(p));
    }
    for (i, s) in sasl.iter().enumerate() {
        write("frame_decoder", format!("sasl-{i}"), s);
    }
    if let Some(Performative::Transfer(_, msg)) = perfs
        .iter()
        .find(|p| matches!(p, Performative::Transfer(..)))
    {
        write("frame_decoder", "message".into(), msg);
    }
    let mut v = BytesMut::new();
    Encoder::new(&mut v).value(&sample_value());
    write("frame_decoder", "value".into(), &v);

    // connection: every mode with all the performatives as records, and as raw frames.
    let mut recs = Vec::new();
    for p in &perfs {
        recs.extend_from_slice(&record(0, false, &encode(p)));
    }
    for mode in 0u8..64 {
        let mut input = vec![mode, if mode & 1 == 0 { 0 } else { 37 }];
        if mode & 4 != 0 {
            if mode & 3 == 0 {
                // A server before the header: SASL init and response records.
                input.extend_from_slice(&record(0, true, &sasl[1]));
                input.extend_from_slice(&record(0, true, &sasl[3]));
            }
            input.extend_from_slice(&recs);
        } else {
            if mode & 3 == 0 {
                input.extend_from_slice(&AMQP_HEADER);
            }
            for p in &perfs {
                input.extend_from_slice(&frame(0, &encode(p)));
            }
        }
        write("connection", format!("mode-{mode:02x}"), &input);
    }
}

/// Found by the `frame_decoder` fuzz target: an empty list at the nesting limit (descriptors
/// of descriptors, then `list0`) decoded, but was re-encoded as a `list32` (a compound, one
/// level deeper) that no longer decoded. Empty lists are now written as `list0`.
#[test]
fn an_empty_list_at_the_depth_limit_survives_re_encoding() {
    let mut input = vec![0x00; 32];
    input.extend(std::iter::repeat_n(0x45, 33));
    let v = amqp::codec::Decoder::new(&input).value().expect("decodes");
    let mut buf = BytesMut::new();
    amqp::codec::Encoder::new(&mut buf).value(&v);
    assert_eq!(
        amqp::codec::Decoder::new(&buf)
            .value()
            .expect("decodes again"),
        v
    );
    assert_eq!(&buf[..], &input[..]);
}
