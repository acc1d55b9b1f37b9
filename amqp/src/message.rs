//! Just enough of the message format (part 3) for a router: find the `to` address of a message
//! without decoding it, and build or read simple messages for the CLI and the bench tool.
//! Bodies are never re-encoded on the forwarding path.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{Decoder, Encoder, Fields, Value};
use crate::error::DecodeError;

pub const HEADER: u64 = 0x70;
pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
pub const PROPERTIES: u64 = 0x73;
pub const APPLICATION_PROPERTIES: u64 = 0x74;
pub const DATA: u64 = 0x75;
pub const AMQP_SEQUENCE: u64 = 0x76;
pub const AMQP_VALUE: u64 = 0x77;
pub const FOOTER: u64 = 0x78;

/// Walks the sections before the body and returns the `to` field of the properties section.
pub fn find_to(msg: &[u8]) -> Result<Option<String>, DecodeError> {
    let mut d = Decoder::new(msg);
    while !d.is_empty() {
        let mut probe = d.clone();
        let code = probe.descriptor()?;
        match code {
            Some(HEADER) | Some(DELIVERY_ANNOTATIONS) | Some(MESSAGE_ANNOTATIONS) => d.skip()?,
            Some(PROPERTIES) => {
                let mut l = probe.list()?;
                l.skip()?; // message-id
                l.skip()?; // user-id
                return l.address();
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// What a store needs to know of a message: the header's `ttl` (ms) and the properties'
/// `absolute-expiry-time` (ms since the epoch), to expire it; and the message annotations
/// `x-opt-dedup-id` (string) and `x-opt-dedup-new` (boolean), its deduplication id (a
/// resend with the same id and body is stored once; `new` marks a new message reusing an id).
/// Sections after the properties are not read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expiry {
    pub ttl_ms: Option<u64>,
    pub absolute_expiry_ms: Option<u64>,
    pub dedup_id: Option<String>,
    pub dedup_new: bool,
    /// With a deduplication id: a hash of what follows the message annotations (where the id
    /// and the `new` flag are), so that a resend hashes the same as the original.
    pub dedup_hash: u64,
}

/// FNV-1a, 64 bits: stable across processes and releases (it is kept in broker snapshots).
fn fnv64(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Message annotation keys of a deduplication id (see [`Expiry`]).
pub const DEDUP_ID: &str = "x-opt-dedup-id";
pub const DEDUP_NEW: &str = "x-opt-dedup-new";

pub fn expiry(msg: &[u8]) -> Result<Expiry, DecodeError> {
    let mut e = Expiry::default();
    let mut d = Decoder::new(msg);
    while !d.is_empty() {
        let mut probe = d.clone();
        match probe.descriptor()? {
            Some(HEADER) => {
                let mut l = probe.list()?;
                l.skip()?; // durable
                l.skip()?; // priority
                e.ttl_ms = l.any_uint()?.map(u64::from);
                d.skip()?;
            }
            Some(MESSAGE_ANNOTATIONS) => {
                // Read in place: only two keys matter, and every message passes here.
                let mut m = probe.map()?;
                while m.left() > 0 {
                    match m.str_ref()? {
                        Some(DEDUP_ID) => {
                            if let Some(Value::String(id)) = m.value()? {
                                e.dedup_id = Some(id);
                            }
                        }
                        Some(DEDUP_NEW) => {
                            if let Some(Value::Bool(b)) = m.value()? {
                                e.dedup_new = b;
                            }
                        }
                        _ => m.skip()?,
                    }
                }
                d.skip()?;
                if e.dedup_id.is_some() {
                    e.dedup_hash = fnv64(d.rest());
                }
            }
            Some(DELIVERY_ANNOTATIONS) => d.skip()?,
            Some(PROPERTIES) => {
                let mut l = probe.list()?;
                for _ in 0..8 {
                    l.skip()?; // message-id .. creation-time's predecessors
                }
                if let Some(Value::Timestamp(t)) = l.value()? {
                    e.absolute_expiry_ms = u64::try_from(t).ok();
                }
                return Ok(e);
            }
            _ => return Ok(e),
        }
    }
    Ok(e)
}

/// The message with its header's `delivery-count` set to `count` (and `first-acquirer`
/// false), for a store redelivering it. A header section is added when there is none; the
/// rest of the message is copied as it is. Only redeliveries pay for this.
pub fn with_delivery_count(msg: &[u8], count: u32) -> Result<Bytes, DecodeError> {
    let mut d = Decoder::new(msg);
    let mut fields: [Option<Value>; 5] = [None, None, None, None, None];
    let mut rest = msg;
    if !d.is_empty() {
        let mut probe = d.clone();
        if probe.descriptor()? == Some(HEADER) {
            let mut l = probe.list()?;
            for f in fields.iter_mut() {
                *f = l.value()?;
            }
            d.skip()?;
            rest = d.rest();
        }
    }
    fields[3] = Some(Value::Bool(false));
    fields[4] = Some(Value::Uint(count));
    let mut out = BytesMut::with_capacity(msg.len() + 16);
    let mut f = Fields::new(&mut out, HEADER);
    for v in &fields {
        f.value(v.as_ref());
    }
    f.finish();
    out.put_slice(rest);
    Ok(out.freeze())
}

/// Options for [`build`].
#[derive(Default, Clone)]
pub struct Simple<'a> {
    pub message_id: Option<u64>,
    pub to: Option<&'a str>,
    pub reply_to: Option<&'a str>,
    pub correlation_id: Option<u64>,
    pub creation_time_ms: Option<i64>,
    pub body: &'a [u8],
    /// Send the body as an amqp-value string instead of a data section.
    pub body_as_string: bool,
    /// Add a header section marking the message durable (brokers that keep non-durable
    /// messages in memory only must write these to disk).
    pub durable: bool,
}

/// Encodes a message with a properties section and one body section.
pub fn build(m: &Simple, out: &mut BytesMut) {
    if m.durable {
        let mut f = Fields::new(out, HEADER);
        f.boolean(Some(true));
        f.finish();
    }
    if m.message_id.is_some()
        || m.to.is_some()
        || m.reply_to.is_some()
        || m.correlation_id.is_some()
        || m.creation_time_ms.is_some()
    {
        let mut f = Fields::new(out, PROPERTIES);
        f.ulong(m.message_id)
            .null()
            .string(m.to)
            .null()
            .string(m.reply_to)
            .ulong(m.correlation_id)
            .null() // content-type
            .null() // content-encoding
            .null(); // absolute-expiry-time
        if let Some(t) = m.creation_time_ms {
            f.e.value(&Value::Timestamp(t));
            if let Some(l) = f.l.as_mut() {
                l.field(f.e.buf, true);
            }
        }
        f.finish();
    }
    let mut e = Encoder::new(out);
    if m.body_as_string {
        e.descriptor(AMQP_VALUE);
        e.string(&String::from_utf8_lossy(m.body));
    } else {
        e.descriptor(DATA);
        e.binary(m.body);
    }
}

/// What [`parse`] extracts from a message.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Parsed {
    pub message_id: Option<Value>,
    pub to: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<Value>,
    pub creation_time_ms: Option<i64>,
    pub content_type: Option<String>,
    /// The header's time to live (ms).
    pub ttl_ms: Option<u32>,
    pub message_annotations: Option<Value>,
    pub application_properties: Option<Value>,
    /// The body: concatenated data sections, or the amqp-value (string/binary) bytes.
    pub body: Bytes,
}

/// Reads the common parts of a message (CLI, bench, MQTT gateway; not the router's
/// forwarding path).
pub fn parse(msg: &[u8]) -> Result<Parsed, DecodeError> {
    let mut p = Parsed::default();
    let mut d = Decoder::new(msg);
    let mut body = BytesMut::new();
    while !d.is_empty() {
        let mut probe = d.clone();
        let code = probe.descriptor()?;
        match code {
            Some(HEADER) => {
                let mut l = probe.list()?;
                l.skip()?; // durable
                l.skip()?; // priority
                p.ttl_ms = l.any_uint()?;
                d.skip()?;
            }
            Some(MESSAGE_ANNOTATIONS) => {
                p.message_annotations = Some(probe.value()?);
                d.skip()?;
            }
            Some(PROPERTIES) => {
                let mut l = probe.list()?;
                p.message_id = l.value()?;
                l.skip()?;
                p.to = l.address()?;
                l.skip()?;
                p.reply_to = l.address()?;
                p.correlation_id = l.value()?;
                if let Some(Value::Symbol(s) | Value::String(s)) = l.value()? {
                    p.content_type = Some(s);
                }
                l.skip()?; // content-encoding
                l.skip()?; // absolute-expiry-time
                if let Some(Value::Timestamp(t)) = l.value()? {
                    p.creation_time_ms = Some(t);
                }
                d.skip()?;
            }
            Some(APPLICATION_PROPERTIES) => {
                p.application_properties = Some(probe.value()?);
                d.skip()?;
            }
            Some(DATA) => {
                if let Value::Binary(b) = probe.value()? {
                    body.put_slice(&b);
                }
                d.skip()?;
            }
            Some(AMQP_VALUE) => {
                match probe.value()? {
                    Value::Binary(b) => body.put_slice(&b),
                    Value::String(s) | Value::Symbol(s) => body.put_slice(s.as_bytes()),
                    other => body.put_slice(format!("{other:?}").as_bytes()),
                }
                d.skip()?;
            }
            _ => d.skip()?,
        }
    }
    p.body = body.freeze();
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_time_is_field_nine_and_expiry_reads_header_and_properties() {
        let mut b = BytesMut::new();
        build(
            &Simple {
                message_id: Some(1),
                creation_time_ms: Some(42),
                body: b"x",
                ..Default::default()
            },
            &mut b,
        );
        assert_eq!(parse(&b).unwrap().creation_time_ms, Some(42));
        // header [durable=false, priority=null, ttl=5000] + properties with absolute-expiry 99
        let mut m = BytesMut::new();
        let mut f = Fields::new(&mut m, HEADER);
        f.boolean(Some(false)).null().uint(Some(5000));
        f.finish();
        let mut f = Fields::new(&mut m, PROPERTIES);
        for _ in 0..8 {
            f.null();
        }
        f.e.value(&Value::Timestamp(99));
        if let Some(l) = f.l.as_mut() {
            l.field(f.e.buf, true);
        }
        f.finish();
        let e = expiry(&m).unwrap();
        assert_eq!(e.ttl_ms, Some(5000));
        assert_eq!(e.absolute_expiry_ms, Some(99));
        assert_eq!(expiry(&b).unwrap(), Expiry::default());
    }

    #[test]
    fn delivery_count_is_set_keeping_the_rest() {
        let mut b = BytesMut::new();
        build(
            &Simple {
                message_id: Some(7),
                body: b"payload",
                ..Default::default()
            },
            &mut b,
        );
        // No header before: one is added.
        let m = with_delivery_count(&b, 2).unwrap();
        assert_eq!(parse(&m).unwrap(), parse(&b).unwrap());
        let hdr = |m: &[u8]| {
            let mut d = Decoder::new(m);
            assert_eq!(d.descriptor().unwrap(), Some(HEADER));
            let mut l = d.list().unwrap();
            (0..5).map(|_| l.value().unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(hdr(&m)[4], Some(Value::Uint(2)));
        // A header already there keeps its other fields (ttl here).
        let mut h = BytesMut::new();
        let mut f = Fields::new(&mut h, HEADER);
        f.boolean(Some(true)).null().uint(Some(500));
        f.finish();
        h.put_slice(&b);
        let m2 = with_delivery_count(&h, 3).unwrap();
        let fields = hdr(&m2);
        assert_eq!(fields[0], Some(Value::Bool(true)));
        assert_eq!(fields[2], Some(Value::Uint(500)));
        assert_eq!(fields[4], Some(Value::Uint(3)));
        // The rest of the message is unchanged (the header's ttl, checked above, aside: parse
        // reports it).
        let rest = Parsed {
            ttl_ms: None,
            ..parse(&m2).unwrap()
        };
        assert_eq!(rest, parse(&b).unwrap());
    }
}
