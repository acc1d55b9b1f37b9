//! MQTT 5 properties: every identifier of the specification (§2.2.2.2), where each may appear,
//! its type, its allowed values, and the rule that only User Property (and Subscription
//! Identifier in PUBLISH) may repeat. Under MQTT 3.1.1 packets carry no properties.

use bytes::{BufMut, Bytes, BytesMut};

use super::DecodeError;
use super::wire::{Reader, binary_len, put_binary, put_string, put_varint, varint_len};

/// Where a property list sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    Connect,
    ConnAck,
    Publish,
    Will,
    /// PUBACK, PUBREC, PUBREL, PUBCOMP.
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

/// The properties of one packet (or of a will). Absent = `None` / empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Whether property `id` may appear in `ctx` (§2.2.2.2, table 2-4).
pub(super) fn allowed(id: u8, ctx: Ctx) -> bool {
    use Ctx::*;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
        0x0B => matches!(ctx, Publish | Subscribe),
        0x11 => matches!(ctx, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == ConnAck,
        0x15 | 0x16 => matches!(ctx, Connect | ConnAck | Auth),
        0x17 | 0x19 => ctx == Connect,
        0x18 => ctx == Will,
        0x1C => matches!(ctx, ConnAck | Disconnect),
        0x1F => matches!(ctx, ConnAck | Ack | SubAck | UnsubAck | Disconnect | Auth),
        0x21 | 0x22 | 0x27 => matches!(ctx, Connect | ConnAck),
        0x23 => ctx == Publish,
        0x26 => true,
        _ => false,
    }
}

const P: fn(&'static str) -> DecodeError = DecodeError::Protocol;

fn once<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(P("property given twice"));
    }
    *slot = Some(v);
    Ok(())
}

fn flag(v: u8) -> Result<u8, DecodeError> {
    if v > 1 {
        return Err(P("property value must be 0 or 1"));
    }
    Ok(v)
}

impl Properties {
    /// Reads a property list (its varint length, then the properties) for `ctx`.
    pub fn decode(r: &mut Reader, ctx: Ctx) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        let mut r = Reader(r.take(len)?);
        let mut p = Properties::default();
        while !r.is_empty() {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property"))?;
            if !allowed(id, ctx) {
                return Err(if matches!(id, 0x01..=0x2A) {
                    P("property not allowed in this packet")
                } else {
                    DecodeError::Malformed("unknown property")
                });
            }
            match id {
                0x01 => once(&mut p.payload_format_indicator, flag(r.u8()?)?)?,
                0x02 => once(&mut p.message_expiry_interval, r.u32()?)?,
                0x03 => once(&mut p.content_type, r.string()?)?,
                0x08 => once(&mut p.response_topic, r.string()?)?,
                0x09 => once(&mut p.correlation_data, r.binary()?)?,
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(P("subscription identifier 0"));
                    }
                    if ctx == Ctx::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(P("property given twice"));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => once(&mut p.session_expiry_interval, r.u32()?)?,
                0x12 => once(&mut p.assigned_client_identifier, r.string()?)?,
                0x13 => once(&mut p.server_keep_alive, r.u16()?)?,
                0x15 => once(&mut p.authentication_method, r.string()?)?,
                0x16 => once(&mut p.authentication_data, r.binary()?)?,
                0x17 => once(&mut p.request_problem_information, flag(r.u8()?)?)?,
                0x18 => once(&mut p.will_delay_interval, r.u32()?)?,
                0x19 => once(&mut p.request_response_information, flag(r.u8()?)?)?,
                0x1A => once(&mut p.response_information, r.string()?)?,
                0x1C => once(&mut p.server_reference, r.string()?)?,
                0x1F => once(&mut p.reason_string, r.string()?)?,
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(P("receive maximum 0"));
                    }
                    once(&mut p.receive_maximum, v)?
                }
                0x22 => once(&mut p.topic_alias_maximum, r.u16()?)?,
                0x23 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(P("topic alias 0"));
                    }
                    once(&mut p.topic_alias, v)?
                }
                0x24 => once(&mut p.maximum_qos, flag(r.u8()?)?)?,
                0x25 => once(&mut p.retain_available, flag(r.u8()?)?)?,
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(P("maximum packet size 0"));
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                0x28 => once(&mut p.wildcard_subscription_available, flag(r.u8()?)?)?,
                0x29 => once(&mut p.subscription_identifier_available, flag(r.u8()?)?)?,
                0x2A => once(&mut p.shared_subscription_available, flag(r.u8()?)?)?,
                _ => return Err(DecodeError::Malformed("unknown property")),
            }
        }
        Ok(p)
    }

    /// Calls `f` with each property as `(id, value)`, in identifier order.
    fn each(&self, mut f: impl FnMut(u8, Val<'_>)) {
        let b = |v: &Option<u8>| v.map(Val::Byte);
        let items: [(u8, Option<Val<'_>>); 24] = [
            (0x01, b(&self.payload_format_indicator)),
            (0x02, self.message_expiry_interval.map(Val::U32)),
            (0x03, self.content_type.as_deref().map(Val::Str)),
            (0x08, self.response_topic.as_deref().map(Val::Str)),
            (0x09, self.correlation_data.as_deref().map(Val::Bin)),
            (0x11, self.session_expiry_interval.map(Val::U32)),
            (
                0x12,
                self.assigned_client_identifier.as_deref().map(Val::Str),
            ),
            (0x13, self.server_keep_alive.map(Val::U16)),
            (0x15, self.authentication_method.as_deref().map(Val::Str)),
            (0x16, self.authentication_data.as_deref().map(Val::Bin)),
            (0x17, b(&self.request_problem_information)),
            (0x18, self.will_delay_interval.map(Val::U32)),
            (0x19, b(&self.request_response_information)),
            (0x1A, self.response_information.as_deref().map(Val::Str)),
            (0x1C, self.server_reference.as_deref().map(Val::Str)),
            (0x1F, self.reason_string.as_deref().map(Val::Str)),
            (0x21, self.receive_maximum.map(Val::U16)),
            (0x22, self.topic_alias_maximum.map(Val::U16)),
            (0x23, self.topic_alias.map(Val::U16)),
            (0x24, b(&self.maximum_qos)),
            (0x25, b(&self.retain_available)),
            (0x27, self.maximum_packet_size.map(Val::U32)),
            (0x28, b(&self.wildcard_subscription_available)),
            (0x29, b(&self.subscription_identifier_available)),
        ];
        for (id, v) in items {
            if let Some(v) = v {
                f(id, v);
            }
        }
        if let Some(v) = self.shared_subscription_available {
            f(0x2A, Val::Byte(v));
        }
        for id in &self.subscription_identifiers {
            f(0x0B, Val::Var(*id));
        }
        for (k, v) in &self.user_properties {
            f(0x26, Val::Pair(k, v));
        }
    }

    /// Bytes of the property list without its length prefix.
    pub fn body_len(&self) -> usize {
        let mut n = 0;
        self.each(|_, v| n += 1 + v.len());
        n
    }

    /// Bytes of the property list with its length prefix.
    pub fn wire_len(&self) -> usize {
        let n = self.body_len();
        varint_len(n) + n
    }

    /// Appends the list (length, then properties).
    pub fn encode(&self, out: &mut BytesMut) {
        put_varint(out, self.body_len());
        self.each(|id, v| {
            out.put_u8(id);
            v.put(out);
        });
    }

    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

enum Val<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    Var(u32),
    Str(&'a str),
    Bin(&'a [u8]),
    Pair(&'a str, &'a str),
}

impl Val<'_> {
    fn len(&self) -> usize {
        match self {
            Val::Byte(_) => 1,
            Val::U16(_) => 2,
            Val::U32(_) => 4,
            Val::Var(v) => varint_len(*v as usize),
            Val::Str(s) => binary_len(s.as_bytes()),
            Val::Bin(b) => binary_len(b),
            Val::Pair(k, v) => binary_len(k.as_bytes()) + binary_len(v.as_bytes()),
        }
    }
    fn put(&self, out: &mut BytesMut) {
        match self {
            Val::Byte(v) => out.put_u8(*v),
            Val::U16(v) => out.put_u16(*v),
            Val::U32(v) => out.put_u32(*v),
            Val::Var(v) => put_varint(out, *v as usize),
            Val::Str(s) => put_string(out, s),
            Val::Bin(b) => put_binary(out, b),
            Val::Pair(k, v) => {
                put_string(out, k);
                put_string(out, v);
            }
        }
    }
}
