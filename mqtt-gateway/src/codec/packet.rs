//! The fifteen control packets: their fields, how each is read from a packet's bytes after the
//! fixed header, and how each is written. Under MQTT 3.1.1 the v5-only fields (properties,
//! reason codes in acknowledgements, DISCONNECT and UNSUBACK contents) are absent.

use bytes::{BufMut, Bytes, BytesMut};

use super::props::{Ctx, Properties};
use super::wire::{Reader, binary_len, put_binary, put_string, put_varint};
use super::{DecodeError, QoS, Version, reason};

const M: fn(&'static str) -> DecodeError = DecodeError::Malformed;
const P: fn(&'static str) -> DecodeError = DecodeError::Protocol;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(SubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// An MQTT 5 reason code; under 3.1.1 mapped to a return code on the wire.
    pub reason: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when an MQTT 5 publisher uses a topic alias alone.
    pub topic: String,
    /// Present exactly when `qos` is 1 or 2.
    pub packet_id: Option<u16>,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: u16,
    pub reason: u8,
    pub properties: Properties,
}

impl Ack {
    pub fn new(packet_id: u16) -> Ack {
        Ack {
            packet_id,
            reason: reason::SUCCESS,
            properties: Properties::default(),
        }
    }
}

/// Subscription options (MQTT 5 §3.8.3.1; 3.1.1 has the QoS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

impl SubOptions {
    pub fn qos(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<(String, SubOptions)>,
}

/// SUBACK and UNSUBACK (a reason code per filter; a 3.1.1 UNSUBACK carries none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: Properties,
    pub reasons: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason: u8,
    pub properties: Properties,
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    let id = r.u16()?;
    if id == 0 {
        return Err(P("packet identifier 0"));
    }
    Ok(id)
}

/// `code` if the packet's table allows it (MQTT 5: an unexpected reason code is malformed).
fn known(code: u8, allowed: &[u8]) -> Result<u8, DecodeError> {
    if !allowed.contains(&code) {
        return Err(M("reason code not allowed in this packet"));
    }
    Ok(code)
}

fn props(r: &mut Reader, v: Version, ctx: Ctx) -> Result<Properties, DecodeError> {
    match v {
        Version::V5 => Properties::decode(r, ctx),
        Version::V311 => Ok(Properties::default()),
    }
}

fn done(r: &Reader) -> Result<(), DecodeError> {
    if !r.is_empty() {
        return Err(M("bytes left over after the packet's fields"));
    }
    Ok(())
}

/// Decodes a packet from its first byte and its bytes after the fixed header.
pub fn decode_body(
    first: u8,
    body: Bytes,
    version: Option<Version>,
) -> Result<Packet, DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0f;
    let mut r = Reader(body);
    let Some(v) = version else {
        if kind != 1 {
            return Err(P("the first packet must be CONNECT"));
        }
        if flags != 0 {
            return Err(M("reserved flags set"));
        }
        return decode_connect(&mut r).map(|c| Packet::Connect(Box::new(c)));
    };
    // Reserved fixed-header flags: PUBLISH has its own, PUBREL/SUBSCRIBE/UNSUBSCRIBE 0b0010.
    let want = match kind {
        3 => flags,
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != want {
        return Err(M("reserved flags set"));
    }
    let p = match kind {
        1 => return Err(P("a second CONNECT")),
        2 => {
            let ack = r.u8()?;
            if ack & 0xfe != 0 {
                return Err(M("reserved CONNACK flags set"));
            }
            let code = r.u8()?;
            let reason = match v {
                Version::V5 => known(code, reason::CONNACK)?,
                Version::V311 => {
                    if code > 5 {
                        return Err(M("unknown CONNACK return code"));
                    }
                    reason::from_v311_connack(code)
                }
            };
            Packet::ConnAck(ConnAck {
                session_present: ack & 1 == 1,
                reason,
                properties: props(&mut r, v, Ctx::ConnAck)?,
            })
        }
        3 => Packet::Publish(decode_publish(flags, &mut r, v)?),
        4..=7 => {
            let packet_id = packet_id(&mut r)?;
            let (reason, properties) = match v {
                Version::V5 if !r.is_empty() => {
                    let table = if kind <= 5 {
                        reason::PUBACK
                    } else {
                        reason::PUBREL
                    };
                    let code = known(r.u8()?, table)?;
                    let p = if r.is_empty() {
                        Properties::default()
                    } else {
                        Properties::decode(&mut r, Ctx::Ack)?
                    };
                    (code, p)
                }
                _ => (reason::SUCCESS, Properties::default()),
            };
            let a = Ack {
                packet_id,
                reason,
                properties,
            };
            match kind {
                4 => Packet::PubAck(a),
                5 => Packet::PubRec(a),
                6 => Packet::PubRel(a),
                _ => Packet::PubComp(a),
            }
        }
        8 => {
            let packet_id = packet_id(&mut r)?;
            let properties = props(&mut r, v, Ctx::Subscribe)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let f = r.string()?;
                let o = r.u8()?;
                let qos = QoS::from_u8(o & 3).ok_or(M("subscription QoS 3"))?;
                let opts = match v {
                    Version::V311 => {
                        if o & 0xfc != 0 {
                            return Err(M("reserved subscription option bits set"));
                        }
                        SubOptions::qos(qos)
                    }
                    Version::V5 => {
                        if o & 0xc0 != 0 {
                            return Err(M("reserved subscription option bits set"));
                        }
                        let retain_handling = (o >> 4) & 3;
                        if retain_handling == 3 {
                            return Err(P("retain handling 3"));
                        }
                        SubOptions {
                            qos,
                            no_local: o & 4 != 0,
                            retain_as_published: o & 8 != 0,
                            retain_handling,
                        }
                    }
                };
                filters.push((f, opts));
            }
            if filters.is_empty() {
                return Err(P("SUBSCRIBE without a topic filter"));
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        }
        9 | 11 => {
            let packet_id = packet_id(&mut r)?;
            let ctx = if kind == 9 {
                Ctx::SubAck
            } else {
                Ctx::UnsubAck
            };
            let properties = props(&mut r, v, ctx)?;
            let mut reasons = Vec::new();
            while !r.is_empty() {
                let code = r.u8()?;
                if v == Version::V311 && (kind == 11 || !matches!(code, 0..=2 | 0x80)) {
                    return Err(M(
                        "not a 3.1.1 SUBACK return code / UNSUBACK with a payload",
                    ));
                }
                let table = if kind == 9 {
                    reason::SUBACK
                } else {
                    reason::UNSUBACK
                };
                reasons.push(known(code, table)?);
            }
            // One reason code per filter: a SUBACK (and an MQTT 5 UNSUBACK) has at least one.
            if reasons.is_empty() && (kind == 9 || v == Version::V5) {
                return Err(P("acknowledgement without a reason code"));
            }
            let a = SubAck {
                packet_id,
                properties,
                reasons,
            };
            if kind == 9 {
                Packet::SubAck(a)
            } else {
                Packet::UnsubAck(a)
            }
        }
        10 => {
            let packet_id = packet_id(&mut r)?;
            let properties = props(&mut r, v, Ctx::Unsubscribe)?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(P("UNSUBSCRIBE without a topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        }
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 | 15 => {
            if kind == 15 && v == Version::V311 {
                return Err(M("AUTH under MQTT 3.1.1"));
            }
            let (reason, properties) = if r.is_empty() {
                (reason::SUCCESS, Properties::default())
            } else if v == Version::V311 {
                return Err(M("DISCONNECT with contents under MQTT 3.1.1"));
            } else {
                let (ctx, table) = if kind == 14 {
                    (Ctx::Disconnect, reason::DISCONNECT)
                } else {
                    (Ctx::Auth, reason::AUTH)
                };
                let code = known(r.u8()?, table)?;
                let p = if r.is_empty() {
                    Properties::default()
                } else {
                    Properties::decode(&mut r, ctx)?
                };
                (code, p)
            };
            if kind == 14 {
                Packet::Disconnect(Disconnect { reason, properties })
            } else {
                // §3.15.2.2.2: continuing or re-authenticating names the method.
                if reason != reason::SUCCESS && properties.authentication_method.is_none() {
                    return Err(P("AUTH without an authentication method"));
                }
                Packet::Auth(Auth { reason, properties })
            }
        }
        _ => return Err(M("reserved packet type")),
    };
    done(&r)?;
    Ok(p)
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(DecodeError::UnsupportedVersion(l)),
        _ => return Err(P("protocol name is not MQTT")),
    };
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(M("reserved CONNECT flag set"));
    }
    let keep_alive = r.u16()?;
    let properties = props(r, version, Ctx::Connect)?;
    let client_id = r.string()?;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0x20 != 0;
    let will = if will_flag {
        let properties = props(r, version, Ctx::Will)?;
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: QoS::from_u8(will_qos).ok_or(M("will QoS 3"))?,
            retain: will_retain,
            properties,
        })
    } else {
        if will_qos != 0 || will_retain {
            return Err(M("will QoS or retain without a will"));
        }
        None
    };
    let has_user = flags & 0x80 != 0;
    let has_pass = flags & 0x40 != 0;
    if version == Version::V311 && has_pass && !has_user {
        return Err(P("password without a user name"));
    }
    let username = if has_user { Some(r.string()?) } else { None };
    let password = if has_pass { Some(r.binary()?) } else { None };
    done(r)?;
    Ok(Connect {
        version,
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

fn decode_publish(flags: u8, r: &mut Reader, v: Version) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 3).ok_or(M("PUBLISH QoS 3"))?;
    let dup = flags & 8 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(M("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.string()?;
    if topic.contains(['+', '#']) {
        return Err(P("wildcard in a topic name"));
    }
    if topic.is_empty() && v == Version::V311 {
        return Err(P("empty topic name"));
    }
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(packet_id(r)?)
    };
    let properties = props(r, v, Ctx::Publish)?;
    let payload = r.take(r.remaining())?;
    Ok(Publish {
        dup,
        qos,
        retain: flags & 1 != 0,
        topic,
        packet_id,
        properties,
        payload,
    })
}

/// Writes the fixed header and the body `body_len` bytes long that `f` appends.
fn frame(out: &mut BytesMut, first: u8, body_len: usize, f: impl FnOnce(&mut BytesMut)) {
    out.reserve(5 + body_len);
    out.put_u8(first);
    put_varint(out, body_len);
    let before = out.len();
    f(out);
    debug_assert_eq!(out.len() - before, body_len, "packet length mismatch");
}

fn props_len(p: &Properties, v: Version) -> usize {
    match v {
        Version::V5 => p.wire_len(),
        Version::V311 => 0,
    }
}

fn put_props(out: &mut BytesMut, p: &Properties, v: Version) {
    if v == Version::V5 {
        p.encode(out);
    }
}

fn publish_body_len(p: &Publish, v: Version) -> usize {
    let id_len = if p.packet_id.is_some() { 2 } else { 0 };
    binary_len(p.topic.as_bytes()) + id_len + props_len(&p.properties, v) + p.payload.len()
}

/// The bytes [`encode`] writes for `p`, fixed header included: what a peer's Maximum Packet
/// Size is compared with.
pub fn publish_len(p: &Publish, v: Version) -> usize {
    let n = publish_body_len(p, v);
    1 + super::wire::varint_len(n) + n
}

pub fn encode(p: &Packet, v: Version, out: &mut BytesMut) {
    if let Some(b) = short_ack(p, v) {
        out.extend_from_slice(&b);
        return;
    }
    match p {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(a) => {
            let code = match v {
                Version::V5 => a.reason,
                Version::V311 => reason::to_v311_connack(a.reason),
            };
            frame(out, 0x20, 2 + props_len(&a.properties, v), |o| {
                o.put_u8(u8::from(a.session_present));
                o.put_u8(code);
                put_props(o, &a.properties, v);
            });
        }
        Packet::Publish(p) => {
            let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
            frame(out, first, publish_body_len(p, v), |o| {
                put_string(o, &p.topic);
                if let Some(id) = p.packet_id {
                    o.put_u16(id);
                }
                put_props(o, &p.properties, v);
                o.put_slice(&p.payload);
            });
        }
        Packet::PubAck(a) => encode_ack(0x40, a, out),
        Packet::PubRec(a) => encode_ack(0x50, a, out),
        Packet::PubRel(a) => encode_ack(0x62, a, out),
        Packet::PubComp(a) => encode_ack(0x70, a, out),
        Packet::Subscribe(s) => {
            let len = 2
                + props_len(&s.properties, v)
                + s.filters
                    .iter()
                    .map(|(f, _)| binary_len(f.as_bytes()) + 1)
                    .sum::<usize>();
            frame(out, 0x82, len, |o| {
                o.put_u16(s.packet_id);
                put_props(o, &s.properties, v);
                for (f, opts) in &s.filters {
                    put_string(o, f);
                    let mut b = opts.qos as u8;
                    if v == Version::V5 {
                        b |= u8::from(opts.no_local) << 2
                            | u8::from(opts.retain_as_published) << 3
                            | (opts.retain_handling & 3) << 4;
                    }
                    o.put_u8(b);
                }
            });
        }
        Packet::SubAck(a) => encode_suback(0x90, a, v, out),
        Packet::UnsubAck(a) => encode_suback(0xb0, a, v, out),
        Packet::Unsubscribe(u) => {
            let len = 2
                + props_len(&u.properties, v)
                + u.filters
                    .iter()
                    .map(|f| binary_len(f.as_bytes()))
                    .sum::<usize>();
            frame(out, 0xa2, len, |o| {
                o.put_u16(u.packet_id);
                put_props(o, &u.properties, v);
                for f in &u.filters {
                    put_string(o, f);
                }
            });
        }
        Packet::PingReq => frame(out, 0xc0, 0, |_| {}),
        Packet::PingResp => frame(out, 0xd0, 0, |_| {}),
        Packet::Disconnect(d) => encode_reasoned(0xe0, d.reason, &d.properties, v, out),
        Packet::Auth(a) => encode_reasoned(0xf0, a.reason, &a.properties, v, out),
    }
}

/// DISCONNECT and AUTH: empty when the reason is success and there are no properties (and
/// always empty under 3.1.1).
fn encode_reasoned(first: u8, code: u8, p: &Properties, v: Version, out: &mut BytesMut) {
    if v == Version::V311 || (code == reason::SUCCESS && p.is_empty()) {
        frame(out, first, 0, |_| {});
        return;
    }
    let pl = if p.is_empty() { 0 } else { p.wire_len() };
    frame(out, first, 1 + pl, |o| {
        o.put_u8(code);
        if !p.is_empty() {
            p.encode(o);
        }
    });
}

/// The four bytes of `p` when it is an acknowledgement in its short form (PUBACK, PUBREC,
/// PUBREL or PUBCOMP with nothing but a packet id to say).
pub fn short_ack(p: &Packet, v: Version) -> Option<[u8; 4]> {
    let (first, a) = match p {
        Packet::PubAck(a) => (0x40, a),
        Packet::PubRec(a) => (0x50, a),
        Packet::PubRel(a) => (0x62, a),
        Packet::PubComp(a) => (0x70, a),
        _ => return None,
    };
    // The short form when it says everything (MQTT 5 §3.4.2.1).
    if v == Version::V311 || (a.reason == reason::SUCCESS && a.properties.is_empty()) {
        let [hi, lo] = a.packet_id.to_be_bytes();
        Some([first, 2, hi, lo])
    } else {
        None
    }
}

/// An acknowledgement in its long form (MQTT 5, with a reason or properties; the short form
/// is [`short_ack`]'s).
fn encode_ack(first: u8, a: &Ack, out: &mut BytesMut) {
    let pl = if a.properties.is_empty() {
        0
    } else {
        a.properties.wire_len()
    };
    frame(out, first, 3 + pl, |o| {
        o.put_u16(a.packet_id);
        o.put_u8(a.reason);
        if !a.properties.is_empty() {
            a.properties.encode(o);
        }
    });
}

fn encode_suback(first: u8, a: &SubAck, v: Version, out: &mut BytesMut) {
    let unsub_v311 = first == 0xb0 && v == Version::V311;
    let reasons = if unsub_v311 { 0 } else { a.reasons.len() };
    frame(out, first, 2 + props_len(&a.properties, v) + reasons, |o| {
        o.put_u16(a.packet_id);
        put_props(o, &a.properties, v);
        if !unsub_v311 {
            for r in &a.reasons {
                // 3.1.1 SUBACK return codes: 0, 1, 2 or 0x80 (failure).
                let r = if v == Version::V311 && *r > 2 {
                    0x80
                } else {
                    *r
                };
                o.put_u8(r);
            }
        }
    });
}

fn encode_connect(c: &Connect, out: &mut BytesMut) {
    let v = c.version;
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    let will_len = c.will.as_ref().map_or(0, |w| {
        props_len(&w.properties, v) + binary_len(w.topic.as_bytes()) + binary_len(&w.payload)
    });
    let len = 6 // "MQTT"
        + 1 + 1 + 2
        + props_len(&c.properties, v)
        + binary_len(c.client_id.as_bytes())
        + will_len
        + c.username.as_ref().map_or(0, |u| binary_len(u.as_bytes()))
        + c.password.as_ref().map_or(0, |p| binary_len(p));
    frame(out, 0x10, len, |o| {
        put_string(o, "MQTT");
        o.put_u8(v.level());
        o.put_u8(flags);
        o.put_u16(c.keep_alive);
        put_props(o, &c.properties, v);
        put_string(o, &c.client_id);
        if let Some(w) = &c.will {
            put_props(o, &w.properties, v);
            put_string(o, &w.topic);
            put_binary(o, &w.payload);
        }
        if let Some(u) = &c.username {
            put_string(o, u);
        }
        if let Some(p) = &c.password {
            put_binary(o, p);
        }
    });
}
