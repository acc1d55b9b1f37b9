//! MQTT PUBLISH ↔ AMQP message (the mapping docs/mqtt.md documents):
//!
//! | MQTT | AMQP |
//! |---|---|
//! | payload | one `data` section |
//! | topic `T` | properties `to` = `prefix + T` |
//! | QoS ≥ 1 | header `durable` = true |
//! | QoS | message annotation `x-opt-mqtt-qos` (ubyte) |
//! | retain flag | message annotation `x-opt-mqtt-retain` (boolean, when set) |
//! | message expiry interval (s) | header `ttl` (ms) |
//! | payload format indicator | message annotation `x-opt-mqtt-payload-format` (ubyte) |
//! | the publishing client's id | message annotation `x-opt-mqtt-client` (string; for no-local) |
//! | content type | properties `content-type` |
//! | response topic `R` | properties `reply-to` = `prefix + R` |
//! | correlation data | properties `correlation-id` (binary) |
//! | user properties | application-properties (string → string; a repeated key keeps the last) |
//!
//! In the other direction a message from an AMQP service is delivered with QoS 1 unless it
//! carries `x-opt-mqtt-qos` (then the lower of that and the subscription's); its topic is the
//! `to` address without the prefix, else the subscription's filter when that has no wildcard.
//! Application properties of string type become user properties; a `reply-to` under the
//! prefix becomes the response topic.

use amqp::Value;
use amqp::codec::{Decoder, Encoder, Fields};
use amqp::message::{APPLICATION_PROPERTIES, DATA, HEADER, MESSAGE_ANNOTATIONS, PROPERTIES};
use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{Properties, Publish, QoS};
use crate::topic;

const QOS: &str = "x-opt-mqtt-qos";
const RETAIN: &str = "x-opt-mqtt-retain";
const FORMAT: &str = "x-opt-mqtt-payload-format";
const CLIENT: &str = "x-opt-mqtt-client";

/// Encodes the AMQP message for PUBLISH `p` from client `client` (its topic already resolved,
/// alias included).
pub fn to_amqp(p: &Publish, client: &str, prefix: &str, out: &mut BytesMut) {
    // Sections and annotations around the payload: one allocation, not a few regrowths.
    out.reserve(p.payload.len() + p.topic.len() + prefix.len() + client.len() + 128);
    let props = &p.properties;
    let ttl = props
        .message_expiry_interval
        .map(|s| s.saturating_mul(1000));
    if p.qos != QoS::AtMostOnce || ttl.is_some() {
        let mut f = Fields::new(out, HEADER);
        f.boolean(Some(p.qos != QoS::AtMostOnce)).null().uint(ttl);
        f.finish();
    }
    // The annotations map, written in place (no `Value` tree per message): a map32 header
    // whose size and count are patched once the entries are in.
    let mut e = Encoder::new(out);
    e.descriptor(MESSAGE_ANNOTATIONS);
    e.buf.put_u8(amqp::codec::code::MAP32);
    let at = e.buf.len();
    e.buf.put_u64(0);
    let mut count = 4u32;
    e.symbol(QOS);
    e.ubyte(p.qos as u8);
    e.symbol(CLIENT);
    e.string(client);
    if p.retain {
        e.symbol(RETAIN);
        e.boolean(!p.dup);
        count += 2;
    }
    if let Some(v) = props.payload_format_indicator {
        e.symbol(FORMAT);
        e.ubyte(v);
        count += 2;
    }
    if let (QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id) {
        // Exactly once across gateways: the brokers store a QoS 2 message once per client and
        // packet id, unless the device says it is new (DUP 0: the id was reused); a resend
        // (DUP 1) through another gateway after the first died is not stored again.
        e.symbol(amqp::message::DEDUP_ID);
        e.string(&format!("mqtt:{client}:{id}"));
        e.symbol(amqp::message::DEDUP_NEW);
        e.boolean(!p.dup);
        count += 4;
    }
    let size = (e.buf.len() - at - 4) as u32;
    e.buf[at..at + 4].copy_from_slice(&size.to_be_bytes());
    e.buf[at + 4..at + 8].copy_from_slice(&count.to_be_bytes());
    let reply_to = props
        .response_topic
        .as_deref()
        .map(|r| topic::name_address(prefix, r));
    let correlation = props.correlation_data.clone().map(Value::Binary);
    let mut f = Fields::new(out, PROPERTIES);
    f.null() // message-id
        .null() // user-id
        .string2(prefix, &p.topic)
        .null() // subject
        .string(reply_to.as_deref())
        .value(correlation.as_ref())
        .symbol(props.content_type.as_deref());
    f.finish();
    if !props.user_properties.is_empty() {
        let map = props
            .user_properties
            .iter()
            .map(|(k, v)| (Value::String(k.clone()), Value::String(v.clone())))
            .collect();
        let mut e = Encoder::new(out);
        e.descriptor(APPLICATION_PROPERTIES);
        e.value(&Value::Map(map));
    }
    let mut e = Encoder::new(out);
    e.descriptor(DATA);
    e.binary(&p.payload);
}

/// Copies AMQP message `msg` with its `to` set to `address` (the message's other sections as
/// they are): a retained copy goes to the retained queue, not to the topic.
pub fn retarget(msg: &[u8], address: &str, out: &mut BytesMut) {
    let mut d = Decoder::new(msg);
    while !d.is_empty() {
        let start = msg.len() - d.remaining();
        let mut probe = d.clone();
        let is_props = matches!(probe.descriptor(), Ok(Some(PROPERTIES)));
        if d.skip().is_err() {
            break;
        }
        let end = msg.len() - d.remaining();
        if !is_props {
            out.extend_from_slice(&msg[start..end]);
            continue;
        }
        // Rewrite `to` (field 2), keep the rest of the list.
        let Ok(mut l) = probe.list() else { break };
        let mut fields = Vec::new();
        while let Ok(Some(v)) = l.next_field() {
            fields.push(v);
        }
        while fields.len() < 3 {
            fields.push(Value::Null);
        }
        fields[2] = Value::String(address.to_owned());
        let mut f = Fields::new(out, PROPERTIES);
        for v in &fields {
            f.value(Some(v).filter(|v| **v != Value::Null));
        }
        f.finish();
    }
}

/// What a delivery from the router becomes for an MQTT subscriber.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Incoming {
    /// The topic (from `to`), if the message names one under the prefix.
    pub topic: Option<String>,
    /// The publisher's QoS, if it came through a gateway.
    pub qos: Option<QoS>,
    pub retain: bool,
    /// The publishing MQTT client's id (UTF-8, a slice of the message: only a no-local
    /// subscription compares it), if it came through a gateway.
    pub publisher: Option<Bytes>,
    pub properties: Properties,
    pub payload: Bytes,
}

/// Reads an AMQP message (as delivered) for MQTT: unknown sections are skipped; an
/// `amqp-value` body becomes the payload as its bytes. Read in place (every delivery to a
/// device passes here): strings are copied only for the fields kept, and a single `data`
/// section becomes the payload without a copy.
pub fn from_amqp(msg: &Bytes, prefix: &str) -> Result<Incoming, amqp::DecodeError> {
    use amqp::message::AMQP_VALUE;
    let mut m = Incoming::default();
    let mut body: Option<Bytes> = None;
    let mut d = Decoder::new(msg);
    while !d.is_empty() {
        let mut probe = d.clone();
        match probe.descriptor()? {
            Some(HEADER) => {
                let mut l = probe.list()?;
                l.skip()?; // durable
                l.skip()?; // priority
                m.properties.message_expiry_interval = l.any_uint()?.map(|t| t.div_ceil(1000));
            }
            Some(MESSAGE_ANNOTATIONS) => {
                let mut a = probe.map()?;
                while a.left() > 0 {
                    match a.str_ref()? {
                        Some(QOS) => {
                            if let Some(Value::Ubyte(q)) = a.value()? {
                                m.qos = QoS::from_u8(q);
                            }
                        }
                        Some(RETAIN) => {
                            if let Some(Value::Bool(r)) = a.value()? {
                                m.retain = r;
                            }
                        }
                        Some(CLIENT) => {
                            m.publisher = a.str_ref()?.map(|c| msg.slice_ref(c.as_bytes()))
                        }
                        Some(FORMAT) => {
                            if let Some(Value::Ubyte(f)) = a.value()?
                                && f <= 1
                            {
                                m.properties.payload_format_indicator = Some(f);
                            }
                        }
                        _ => a.skip()?,
                    }
                }
            }
            Some(PROPERTIES) => {
                let mut l = probe.list()?;
                l.skip()?; // message-id
                l.skip()?; // user-id
                m.topic = l
                    .str_ref()?
                    .and_then(|t| topic::address_topic(prefix, t))
                    .map(str::to_owned);
                l.skip()?; // subject
                m.properties.response_topic = l
                    .str_ref()?
                    .and_then(|r| topic::address_topic(prefix, r))
                    .map(str::to_owned);
                m.properties.correlation_data = match l.value()? {
                    Some(Value::Binary(b)) => Some(b),
                    Some(Value::String(s)) => Some(Bytes::from(s.into_bytes())),
                    Some(Value::Ulong(n)) => Some(Bytes::copy_from_slice(&n.to_be_bytes())),
                    Some(Value::Uuid(u)) => Some(Bytes::copy_from_slice(&u)),
                    _ => None,
                };
                m.properties.content_type = l.str_ref()?.map(str::to_owned);
            }
            Some(APPLICATION_PROPERTIES) => {
                let mut a = probe.map()?;
                while a.left() > 0 {
                    let k = a.str_ref()?;
                    let v = a.str_ref()?;
                    if let (Some(k), Some(v)) = (k, v) {
                        m.properties
                            .user_properties
                            .push((k.to_owned(), v.to_owned()));
                    }
                }
            }
            Some(DATA) => {
                let b = msg.slice_ref(probe.binary_ref()?);
                body = Some(match body {
                    None => b,
                    Some(before) => {
                        let mut all = BytesMut::from(&before[..]);
                        all.put_slice(&b);
                        all.freeze()
                    }
                });
            }
            Some(AMQP_VALUE) => {
                let b = match probe.value()? {
                    Value::Binary(b) => b,
                    Value::String(s) | Value::Symbol(s) => Bytes::from(s.into_bytes()),
                    other => Bytes::from(format!("{other:?}").into_bytes()),
                };
                body = Some(b);
            }
            _ => {}
        }
        d.skip()?;
    }
    m.payload = body.unwrap_or_default();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qos_2_resend_carries_the_same_deduplication_id_and_hash() {
        let mut p = Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: "a/b".into(),
            packet_id: Some(9),
            properties: Properties::default(),
            payload: Bytes::from_static(b"reading"),
        };
        let mut first = BytesMut::new();
        to_amqp(&p, "dev:1", "mqtt/", &mut first);
        p.dup = true;
        let mut resend = BytesMut::new();
        to_amqp(&p, "dev:1", "mqtt/", &mut resend);
        let (a, b) = (
            amqp::message::expiry(&first).unwrap(),
            amqp::message::expiry(&resend).unwrap(),
        );
        assert_eq!(a.dedup_id.as_deref(), Some("mqtt:dev:1:9"));
        assert_eq!((a.dedup_new, b.dedup_new), (true, false));
        assert_eq!((&a.dedup_id, a.dedup_hash), (&b.dedup_id, b.dedup_hash));
        // Another payload under the same id hashes differently; QoS 1 carries no id.
        p.payload = Bytes::from_static(b"other");
        let mut other = BytesMut::new();
        to_amqp(&p, "dev:1", "mqtt/", &mut other);
        assert_ne!(
            amqp::message::expiry(&other).unwrap().dedup_hash,
            a.dedup_hash
        );
        p.qos = QoS::AtLeastOnce;
        let mut q1 = BytesMut::new();
        to_amqp(&p, "dev:1", "mqtt/", &mut q1);
        assert_eq!(amqp::message::expiry(&q1).unwrap().dedup_id, None);
    }

    #[test]
    fn a_publish_survives_the_trip_through_amqp() {
        let p = Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "devices/7/telemetry".into(),
            packet_id: Some(3),
            properties: Properties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(30),
                content_type: Some("application/json".into()),
                response_topic: Some("devices/7/replies".into()),
                correlation_data: Some(Bytes::from_static(b"c1")),
                user_properties: vec![("unit".into(), "C".into())],
                ..Properties::default()
            },
            payload: Bytes::from_static(b"{\"t\":21}"),
        };
        let mut b = BytesMut::new();
        to_amqp(&p, "dev-7", "mqtt/", &mut b);
        // Readable by the project's generic parser (what the CLI and AMQP tests use).
        let parsed = amqp::message::parse(&b).expect("parse");
        assert_eq!(parsed.to.as_deref(), Some("mqtt/devices/7/telemetry"));
        assert_eq!(parsed.reply_to.as_deref(), Some("mqtt/devices/7/replies"));
        assert_eq!(&parsed.body[..], b"{\"t\":21}");
        let b = b.freeze();
        let back = from_amqp(&b, "mqtt/").expect("from_amqp");
        assert_eq!(back.topic.as_deref(), Some("devices/7/telemetry"));
        assert_eq!(back.qos, Some(QoS::ExactlyOnce));
        assert!(back.retain);
        assert_eq!(back.publisher.as_deref(), Some(&b"dev-7"[..]));
        assert_eq!(back.properties.message_expiry_interval, Some(30));
        assert_eq!(back.properties.payload_format_indicator, Some(1));
        assert_eq!(
            back.properties.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(
            back.properties.response_topic.as_deref(),
            Some("devices/7/replies")
        );
        assert_eq!(
            back.properties.correlation_data.as_deref(),
            Some(&b"c1"[..])
        );
        assert_eq!(
            back.properties.user_properties,
            vec![("unit".into(), "C".into())]
        );
        assert_eq!(back.payload, p.payload);
        // Retargeted to a retained queue: only `to` changes.
        let mut r = BytesMut::new();
        retarget(&b, "mqtt-retained/devices/7/telemetry", &mut r);
        let parsed = amqp::message::parse(&r).expect("parse");
        assert_eq!(
            parsed.to.as_deref(),
            Some("mqtt-retained/devices/7/telemetry")
        );
        let again = from_amqp(&r.freeze(), "mqtt/").expect("from_amqp");
        assert_eq!(again.topic, None);
        assert_eq!(
            (again.properties, again.payload, again.qos, again.retain),
            (back.properties, back.payload, back.qos, back.retain)
        );
    }
}
