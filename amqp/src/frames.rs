//! Frames and performatives (AMQP 1.0 part 2) and SASL frames (part 5).
//!
//! Every performative is decoded field by field straight from the frame bytes; a transfer's
//! payload is returned as a slice of the received buffer so that the router forwards it without
//! copying or re-encoding.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{Decoder, Fields, ListReader, Value};
use crate::error::DecodeError;

pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// Smallest max-frame-size a peer may impose (spec: 512).
pub const MIN_MAX_FRAME_SIZE: u32 = 512;
pub const FRAME_AMQP: u8 = 0;
pub const FRAME_SASL: u8 = 1;

pub mod descriptor {
    pub const OPEN: u64 = 0x10;
    pub const BEGIN: u64 = 0x11;
    pub const ATTACH: u64 = 0x12;
    pub const FLOW: u64 = 0x13;
    pub const TRANSFER: u64 = 0x14;
    pub const DISPOSITION: u64 = 0x15;
    pub const DETACH: u64 = 0x16;
    pub const END: u64 = 0x17;
    pub const CLOSE: u64 = 0x18;
    pub const ERROR: u64 = 0x1d;
    pub const RECEIVED: u64 = 0x23;
    pub const ACCEPTED: u64 = 0x24;
    pub const REJECTED: u64 = 0x25;
    pub const RELEASED: u64 = 0x26;
    pub const MODIFIED: u64 = 0x27;
    pub const SOURCE: u64 = 0x28;
    pub const TARGET: u64 = 0x29;
    pub const DELETE_ON_CLOSE: u64 = 0x2b;
    pub const SASL_MECHANISMS: u64 = 0x40;
    pub const SASL_INIT: u64 = 0x41;
    pub const SASL_CHALLENGE: u64 = 0x42;
    pub const SASL_RESPONSE: u64 = 0x43;
    pub const SASL_OUTCOME: u64 = 0x44;
}

/// The `error` composite.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ErrorCondition {
    pub condition: String,
    pub description: Option<String>,
    pub info: Option<Value>,
}

impl ErrorCondition {
    pub fn new(condition: &str, description: impl Into<String>) -> Self {
        ErrorCondition {
            condition: condition.to_owned(),
            description: Some(description.into()),
            info: None,
        }
    }
    fn decode(v: Value) -> Result<Self, DecodeError> {
        let Value::Described(d, body) = v else {
            return Err(DecodeError::Invalid("error must be described"));
        };
        if d.as_u64() != Some(descriptor::ERROR) && d.as_str() != Some("amqp:error:list") {
            return Err(DecodeError::Invalid("not an error"));
        }
        let Value::List(mut f) = *body else {
            return Err(DecodeError::Invalid("error must be a list"));
        };
        f.resize(3, Value::Null);
        let mut it = f.into_iter();
        let condition = match it.next() {
            Some(Value::Symbol(s)) => s,
            _ => return Err(DecodeError::Missing("error.condition")),
        };
        let description = match it.next() {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let info = it.next().filter(|v| *v != Value::Null);
        Ok(ErrorCondition {
            condition,
            description,
            info,
        })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::ERROR);
        f.symbol(Some(&self.condition))
            .string(self.description.as_deref())
            .value(self.info.as_ref());
        f.finish();
    }
    fn read(l: &mut ListReader) -> Result<Option<Self>, DecodeError> {
        l.value()?.map(ErrorCondition::decode).transpose()
    }
}

/// Delivery states (outcomes and `received`).
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryState {
    Received {
        section_number: u32,
        section_offset: u64,
    },
    Accepted,
    Rejected(Option<ErrorCondition>),
    Released,
    Modified {
        delivery_failed: bool,
        undeliverable_here: bool,
        message_annotations: Option<Value>,
    },
    /// Transactional and other states the router does not interpret; carried as they came.
    Other(Value),
}

/// A transfer's or disposition's state: accepted and released read in place (no value tree
/// per message), the others through [`DeliveryState::decode`].
fn delivery_state(l: &mut ListReader) -> Result<Option<DeliveryState>, DecodeError> {
    match l.empty_described()? {
        Some(descriptor::ACCEPTED) => return Ok(Some(DeliveryState::Accepted)),
        Some(descriptor::RELEASED) => return Ok(Some(DeliveryState::Released)),
        Some(d) => {
            return DeliveryState::decode(Value::Described(
                Box::new(Value::Ulong(d)),
                Box::new(Value::List(Vec::new())),
            ))
            .map(Some);
        }
        None => {}
    }
    l.value()?.map(DeliveryState::decode).transpose()
}

impl DeliveryState {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, DeliveryState::Received { .. })
    }
    pub fn decode(v: Value) -> Result<Self, DecodeError> {
        let Value::Described(d, body) = v else {
            return Err(DecodeError::Invalid("delivery state must be described"));
        };
        let Some(code) = d.as_u64() else {
            return Ok(DeliveryState::Other(Value::Described(d, body)));
        };
        let fields = match body.as_ref() {
            Value::List(f) => f.clone(),
            _ => return Err(DecodeError::Invalid("delivery state must be a list")),
        };
        let get = |i: usize| fields.get(i).cloned().unwrap_or(Value::Null);
        Ok(match code {
            descriptor::ACCEPTED => DeliveryState::Accepted,
            descriptor::RELEASED => DeliveryState::Released,
            descriptor::REJECTED => DeliveryState::Rejected(match get(0) {
                Value::Null => None,
                v => Some(ErrorCondition::decode(v)?),
            }),
            descriptor::MODIFIED => DeliveryState::Modified {
                delivery_failed: matches!(get(0), Value::Bool(true)),
                undeliverable_here: matches!(get(1), Value::Bool(true)),
                message_annotations: Some(get(2)).filter(|v| *v != Value::Null),
            },
            descriptor::RECEIVED => DeliveryState::Received {
                section_number: get(0).as_u64().unwrap_or(0) as u32,
                section_offset: get(1).as_u64().unwrap_or(0),
            },
            _ => DeliveryState::Other(Value::Described(d, body)),
        })
    }
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            DeliveryState::Accepted => Fields::new(buf, descriptor::ACCEPTED).finish(),
            DeliveryState::Released => Fields::new(buf, descriptor::RELEASED).finish(),
            DeliveryState::Rejected(err) => {
                let mut f = Fields::new(buf, descriptor::REJECTED);
                f.with(err.is_some(), |b| {
                    if let Some(e) = err {
                        e.encode(b)
                    }
                });
                f.finish();
            }
            DeliveryState::Modified {
                delivery_failed,
                undeliverable_here,
                message_annotations,
            } => {
                let mut f = Fields::new(buf, descriptor::MODIFIED);
                f.boolean(Some(*delivery_failed))
                    .boolean(Some(*undeliverable_here))
                    .value(message_annotations.as_ref());
                f.finish();
            }
            DeliveryState::Received {
                section_number,
                section_offset,
            } => {
                let mut f = Fields::new(buf, descriptor::RECEIVED);
                f.uint(Some(*section_number)).ulong(Some(*section_offset));
                f.finish();
            }
            DeliveryState::Other(v) => crate::codec::Encoder::new(buf).value(v),
        }
    }
}

/// Link source or target terminus. Fields the router does not act on are carried so the attach
/// reply echoes them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Terminus {
    pub address: Option<String>,
    pub durable: Option<u32>,
    pub expiry_policy: Option<String>,
    pub timeout: Option<u32>,
    pub dynamic: bool,
    pub dynamic_node_properties: Option<Value>,
    /// Source only: distribution-mode, filter, default-outcome, outcomes.
    pub distribution_mode: Option<String>,
    pub filter: Option<Value>,
    pub default_outcome: Option<Value>,
    pub outcomes: Option<Value>,
    pub capabilities: Option<Value>,
}

impl Terminus {
    pub fn with_address(a: impl Into<String>) -> Self {
        Terminus {
            address: Some(a.into()),
            ..Default::default()
        }
    }
    fn decode(v: Value, is_source: bool) -> Result<Self, DecodeError> {
        let Value::Described(d, body) = v else {
            return Err(DecodeError::Invalid("terminus must be described"));
        };
        let want = if is_source {
            descriptor::SOURCE
        } else {
            descriptor::TARGET
        };
        if d.as_u64() != Some(want) {
            // Coordinator targets (transactions) and unknown termini are not supported.
            return Err(DecodeError::Invalid("unsupported terminus"));
        }
        let Value::List(mut f) = *body else {
            return Err(DecodeError::Invalid("terminus must be a list"));
        };
        f.resize(11, Value::Null);
        let opt = |v: &Value| Some(v.clone()).filter(|v| *v != Value::Null);
        let s = |v: &Value| v.as_str().map(str::to_owned);
        let u = |v: &Value| v.as_u64().map(|n| n as u32);
        let mut t = Terminus {
            address: s(&f[0]),
            durable: u(&f[1]),
            expiry_policy: s(&f[2]),
            timeout: u(&f[3]),
            dynamic: matches!(f[4], Value::Bool(true)),
            dynamic_node_properties: opt(&f[5]),
            ..Default::default()
        };
        if is_source {
            t.distribution_mode = s(&f[6]);
            t.filter = opt(&f[7]);
            t.default_outcome = opt(&f[8]);
            t.outcomes = opt(&f[9]);
            t.capabilities = opt(&f[10]);
        } else {
            t.capabilities = opt(&f[6]);
        }
        Ok(t)
    }
    fn encode(&self, buf: &mut BytesMut, is_source: bool) {
        let mut f = Fields::new(
            buf,
            if is_source {
                descriptor::SOURCE
            } else {
                descriptor::TARGET
            },
        );
        f.string(self.address.as_deref())
            .uint(self.durable)
            .symbol(self.expiry_policy.as_deref())
            .uint(self.timeout)
            .boolean(self.dynamic.then_some(true))
            .value(self.dynamic_node_properties.as_ref());
        if is_source {
            f.symbol(self.distribution_mode.as_deref())
                .value(self.filter.as_ref())
                .value(self.default_outcome.as_ref())
                .value(self.outcomes.as_ref());
        }
        f.value(self.capabilities.as_ref());
        f.finish();
    }
    pub fn has_capability(&self, cap: &str) -> bool {
        self.capabilities
            .as_ref()
            .is_some_and(|c| c.symbols().contains(&cap))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    fn from_bool(b: bool) -> Self {
        if b { Role::Receiver } else { Role::Sender }
    }
    fn as_bool(self) -> bool {
        self == Role::Receiver
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Open {
    pub container_id: String,
    pub hostname: Option<String>,
    pub max_frame_size: Option<u32>,
    pub channel_max: Option<u16>,
    pub idle_timeout: Option<u32>,
    pub offered_capabilities: Option<Value>,
    pub desired_capabilities: Option<Value>,
    pub properties: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Begin {
    pub remote_channel: Option<u16>,
    pub next_outgoing_id: u32,
    pub incoming_window: u32,
    pub outgoing_window: u32,
    pub handle_max: Option<u32>,
    pub offered_capabilities: Option<Value>,
    pub desired_capabilities: Option<Value>,
    pub properties: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attach {
    pub name: String,
    pub handle: u32,
    pub role: Role,
    /// 0 unsettled, 1 settled, 2 mixed (default).
    pub snd_settle_mode: u8,
    /// 0 first (default), 1 second.
    pub rcv_settle_mode: u8,
    pub source: Option<Terminus>,
    pub target: Option<Terminus>,
    pub initial_delivery_count: Option<u32>,
    pub max_message_size: Option<u64>,
    pub offered_capabilities: Option<Value>,
    pub desired_capabilities: Option<Value>,
    pub properties: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Flow {
    pub next_incoming_id: Option<u32>,
    pub incoming_window: u32,
    pub next_outgoing_id: u32,
    pub outgoing_window: u32,
    pub handle: Option<u32>,
    pub delivery_count: Option<u32>,
    pub link_credit: Option<u32>,
    pub available: Option<u32>,
    pub drain: bool,
    pub echo: bool,
}

/// A delivery tag (at most 32 bytes, AMQP 1.0 §2.7.5), held inline: one arrives with every
/// message, and copying it out of the frame would be an allocation per message (slicing it
/// instead would keep the whole read buffer alive while the delivery is unsettled).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryTag {
    len: u8,
    bytes: [u8; DeliveryTag::MAX],
}

impl DeliveryTag {
    pub const MAX: usize = 32;

    /// `b` as a tag; none if it is longer than 32 bytes.
    pub fn new(b: &[u8]) -> Option<DeliveryTag> {
        let mut t = DeliveryTag::default();
        t.bytes.get_mut(..b.len())?.copy_from_slice(b);
        t.len = b.len() as u8;
        Some(t)
    }
}

impl std::ops::Deref for DeliveryTag {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for DeliveryTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeliveryTag({:02x?})", &**self)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transfer {
    pub handle: u32,
    pub delivery_id: Option<u32>,
    pub delivery_tag: Option<DeliveryTag>,
    pub message_format: Option<u32>,
    pub settled: Option<bool>,
    pub more: bool,
    pub rcv_settle_mode: Option<u8>,
    pub state: Option<DeliveryState>,
    pub resume: bool,
    pub aborted: bool,
    pub batchable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Disposition {
    pub role: Role,
    pub first: u32,
    pub last: Option<u32>,
    pub settled: bool,
    pub state: Option<DeliveryState>,
    pub batchable: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Detach {
    pub handle: u32,
    pub closed: bool,
    pub error: Option<ErrorCondition>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Performative {
    Open(Open),
    Begin(Begin),
    Attach(Box<Attach>),
    Flow(Flow),
    /// The transfer and its payload (the rest of the frame body).
    Transfer(Transfer, Bytes),
    Disposition(Disposition),
    Detach(Detach),
    End(Option<ErrorCondition>),
    Close(Option<ErrorCondition>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum SaslFrame {
    Mechanisms(Vec<String>),
    Init {
        mechanism: String,
        initial_response: Option<Bytes>,
        hostname: Option<String>,
    },
    Challenge(Bytes),
    Response(Bytes),
    Outcome {
        code: u8,
        additional_data: Option<Bytes>,
    },
}

fn need<T>(v: Option<T>, name: &'static str) -> Result<T, DecodeError> {
    v.ok_or(DecodeError::Missing(name))
}

/// Decodes an AMQP frame body. `body` is the frame after its header; the payload of a transfer
/// is sliced out of it.
pub fn decode_performative(body: Bytes) -> Result<Performative, DecodeError> {
    let mut d = Decoder::new(&body);
    let code = d
        .descriptor()?
        .ok_or(DecodeError::Invalid("symbolic performative descriptor"))?;
    let mut l = d.list()?;
    let p = match code {
        descriptor::OPEN => Performative::Open(Open {
            container_id: need(l.string()?, "open.container-id")?,
            hostname: l.string()?,
            max_frame_size: l.any_uint()?,
            channel_max: l.ushort()?,
            idle_timeout: l.any_uint()?,
            offered_capabilities: {
                l.skip()?; // outgoing-locales
                l.skip()?; // incoming-locales
                l.value()?
            },
            desired_capabilities: l.value()?,
            properties: l.value()?,
        }),
        descriptor::BEGIN => Performative::Begin(Begin {
            remote_channel: l.ushort()?,
            next_outgoing_id: need(l.uint()?, "begin.next-outgoing-id")?,
            incoming_window: need(l.uint()?, "begin.incoming-window")?,
            outgoing_window: need(l.uint()?, "begin.outgoing-window")?,
            handle_max: l.uint()?,
            offered_capabilities: l.value()?,
            desired_capabilities: l.value()?,
            properties: l.value()?,
        }),
        descriptor::ATTACH => {
            let name = need(l.string()?, "attach.name")?;
            let handle = need(l.uint()?, "attach.handle")?;
            let role = Role::from_bool(need(l.boolean()?, "attach.role")?);
            let snd_settle_mode = l.ubyte()?.unwrap_or(2);
            let rcv_settle_mode = l.ubyte()?.unwrap_or(0);
            let source = l.value()?.map(|v| Terminus::decode(v, true)).transpose()?;
            let target = l.value()?.map(|v| Terminus::decode(v, false)).transpose()?;
            l.skip()?; // unsettled (resumption is not supported)
            l.skip()?; // incomplete-unsettled
            Performative::Attach(Box::new(Attach {
                name,
                handle,
                role,
                snd_settle_mode,
                rcv_settle_mode,
                source,
                target,
                initial_delivery_count: l.uint()?,
                max_message_size: l.ulong()?,
                offered_capabilities: l.value()?,
                desired_capabilities: l.value()?,
                properties: l.value()?,
            }))
        }
        descriptor::FLOW => Performative::Flow(Flow {
            next_incoming_id: l.uint()?,
            incoming_window: need(l.uint()?, "flow.incoming-window")?,
            next_outgoing_id: need(l.uint()?, "flow.next-outgoing-id")?,
            outgoing_window: need(l.uint()?, "flow.outgoing-window")?,
            handle: l.uint()?,
            delivery_count: l.uint()?,
            link_credit: l.uint()?,
            available: l.uint()?,
            drain: l.boolean()?.unwrap_or(false),
            echo: l.boolean()?.unwrap_or(false),
        }),
        descriptor::TRANSFER => {
            let t = Transfer {
                handle: need(l.uint()?, "transfer.handle")?,
                delivery_id: l.uint()?,
                delivery_tag: match l.binary_ref()? {
                    Some(b) => Some(
                        DeliveryTag::new(b)
                            .ok_or(DecodeError::Invalid("delivery-tag longer than 32 bytes"))?,
                    ),
                    None => None,
                },
                message_format: l.uint()?,
                settled: l.boolean()?,
                more: l.boolean()?.unwrap_or(false),
                rcv_settle_mode: l.ubyte()?,
                state: delivery_state(&mut l)?,
                resume: l.boolean()?.unwrap_or(false),
                aborted: l.boolean()?.unwrap_or(false),
                batchable: l.boolean()?.unwrap_or(false),
            };
            let at = d.position();
            return Ok(Performative::Transfer(t, body.slice(at..)));
        }
        descriptor::DISPOSITION => Performative::Disposition(Disposition {
            role: Role::from_bool(need(l.boolean()?, "disposition.role")?),
            first: need(l.uint()?, "disposition.first")?,
            last: l.uint()?,
            settled: l.boolean()?.unwrap_or(false),
            state: delivery_state(&mut l)?,
            batchable: l.boolean()?.unwrap_or(false),
        }),
        descriptor::DETACH => Performative::Detach(Detach {
            handle: need(l.uint()?, "detach.handle")?,
            closed: l.boolean()?.unwrap_or(false),
            error: ErrorCondition::read(&mut l)?,
        }),
        descriptor::END => Performative::End(ErrorCondition::read(&mut l)?),
        descriptor::CLOSE => Performative::Close(ErrorCondition::read(&mut l)?),
        other => return Err(DecodeError::UnknownDescriptor(other)),
    };
    Ok(p)
}

/// Decodes a SASL frame body.
pub fn decode_sasl(body: &[u8]) -> Result<SaslFrame, DecodeError> {
    let mut d = Decoder::new(body);
    let code = d
        .descriptor()?
        .ok_or(DecodeError::Invalid("symbolic sasl descriptor"))?;
    let mut l = d.list()?;
    Ok(match code {
        descriptor::SASL_MECHANISMS => {
            let v = need(l.value()?, "sasl-mechanisms.sasl-server-mechanisms")?;
            SaslFrame::Mechanisms(v.symbols().into_iter().map(str::to_owned).collect())
        }
        descriptor::SASL_INIT => SaslFrame::Init {
            mechanism: need(l.symbol()?, "sasl-init.mechanism")?,
            initial_response: l.binary()?,
            hostname: l.string()?,
        },
        descriptor::SASL_CHALLENGE => {
            SaslFrame::Challenge(need(l.binary()?, "sasl-challenge.challenge")?)
        }
        descriptor::SASL_RESPONSE => {
            SaslFrame::Response(need(l.binary()?, "sasl-response.response")?)
        }
        descriptor::SASL_OUTCOME => SaslFrame::Outcome {
            code: need(l.ubyte()?, "sasl-outcome.code")?,
            additional_data: l.binary()?,
        },
        other => return Err(DecodeError::UnknownDescriptor(other)),
    })
}

/// Writes a frame: reserves the header, lets `body` encode, then fills in the size.
pub fn write_frame(
    out: &mut BytesMut,
    frame_type: u8,
    channel: u16,
    body: impl FnOnce(&mut BytesMut),
) {
    let start = out.len();
    out.put_u32(0);
    out.put_u8(2);
    out.put_u8(frame_type);
    out.put_u16(channel);
    body(out);
    let size = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
}

/// An empty frame: the heartbeat.
pub fn write_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[0, 0, 0, 8, 2, 0, 0, 0]);
}

impl Open {
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::OPEN);
        f.string(Some(&self.container_id))
            .string(self.hostname.as_deref())
            .uint(self.max_frame_size)
            .ushort(self.channel_max)
            .uint(self.idle_timeout)
            .null()
            .null()
            .value(self.offered_capabilities.as_ref())
            .value(self.desired_capabilities.as_ref())
            .value(self.properties.as_ref());
        f.finish();
    }
}

impl Begin {
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::BEGIN);
        f.ushort(self.remote_channel)
            .uint(Some(self.next_outgoing_id))
            .uint(Some(self.incoming_window))
            .uint(Some(self.outgoing_window))
            .uint(self.handle_max)
            .value(self.offered_capabilities.as_ref())
            .value(self.desired_capabilities.as_ref())
            .value(self.properties.as_ref());
        f.finish();
    }
}

impl Attach {
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::ATTACH);
        f.string(Some(&self.name))
            .uint(Some(self.handle))
            .boolean(Some(self.role.as_bool()))
            .ubyte(Some(self.snd_settle_mode))
            .ubyte(Some(self.rcv_settle_mode))
            .with(self.source.is_some(), |b| {
                if let Some(s) = &self.source {
                    s.encode(b, true)
                }
            })
            .with(self.target.is_some(), |b| {
                if let Some(t) = &self.target {
                    t.encode(b, false)
                }
            })
            .null()
            .null()
            .uint(self.initial_delivery_count)
            .ulong(self.max_message_size)
            .value(self.offered_capabilities.as_ref())
            .value(self.desired_capabilities.as_ref())
            .value(self.properties.as_ref());
        f.finish();
    }
}

impl Flow {
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::FLOW);
        f.uint(self.next_incoming_id)
            .uint(Some(self.incoming_window))
            .uint(Some(self.next_outgoing_id))
            .uint(Some(self.outgoing_window))
            .uint(self.handle)
            .uint(self.delivery_count)
            .uint(self.link_credit)
            .uint(self.available)
            .boolean(self.drain.then_some(true))
            .boolean(self.echo.then_some(true));
        f.finish();
    }
}

impl Transfer {
    pub fn encode(&self, buf: &mut BytesMut) {
        self.encode_with_tag(self.delivery_tag.as_deref(), buf);
    }

    /// Encodes with `tag` as the delivery tag in place of the struct's own: a sender encodes
    /// its frames from a borrowed tag, with no copy per message.
    pub fn encode_with_tag(&self, tag: Option<&[u8]>, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::TRANSFER);
        f.uint(Some(self.handle))
            .uint(self.delivery_id)
            .binary(tag)
            .uint(self.message_format)
            .boolean(self.settled)
            .boolean(self.more.then_some(true))
            .ubyte(self.rcv_settle_mode)
            .with(self.state.is_some(), |b| {
                if let Some(s) = &self.state {
                    s.encode(b)
                }
            })
            .boolean(self.resume.then_some(true))
            .boolean(self.aborted.then_some(true))
            .boolean(self.batchable.then_some(true));
        f.finish();
    }
}

impl Disposition {
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::DISPOSITION);
        f.boolean(Some(self.role.as_bool()))
            .uint(Some(self.first))
            .uint(self.last)
            .boolean(self.settled.then_some(true))
            .with(self.state.is_some(), |b| {
                if let Some(s) = &self.state {
                    s.encode(b)
                }
            })
            .boolean(self.batchable.then_some(true));
        f.finish();
    }
}

impl Detach {
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut f = Fields::new(buf, descriptor::DETACH);
        f.uint(Some(self.handle))
            .boolean(self.closed.then_some(true))
            .with(self.error.is_some(), |b| {
                if let Some(e) = &self.error {
                    e.encode(b)
                }
            });
        f.finish();
    }
}

/// `end` and `close` carry only an optional error.
pub fn encode_end_or_close(buf: &mut BytesMut, code: u64, error: Option<&ErrorCondition>) {
    let mut f = Fields::new(buf, code);
    f.with(error.is_some(), |b| {
        if let Some(e) = error {
            e.encode(b)
        }
    });
    f.finish();
}

impl Performative {
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Performative::Open(o) => o.encode(buf),
            Performative::Begin(b) => b.encode(buf),
            Performative::Attach(a) => a.encode(buf),
            Performative::Flow(f) => f.encode(buf),
            Performative::Transfer(t, payload) => {
                t.encode(buf);
                buf.put_slice(payload);
            }
            Performative::Disposition(d) => d.encode(buf),
            Performative::Detach(d) => d.encode(buf),
            Performative::End(e) => encode_end_or_close(buf, descriptor::END, e.as_ref()),
            Performative::Close(e) => encode_end_or_close(buf, descriptor::CLOSE, e.as_ref()),
        }
    }
}

impl SaslFrame {
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            SaslFrame::Mechanisms(m) => {
                let m: Vec<&str> = m.iter().map(String::as_str).collect();
                let mut f = Fields::new(buf, descriptor::SASL_MECHANISMS);
                f.symbols(&m);
                f.finish();
            }
            SaslFrame::Init {
                mechanism,
                initial_response,
                hostname,
            } => {
                let mut f = Fields::new(buf, descriptor::SASL_INIT);
                f.symbol(Some(mechanism))
                    .binary(initial_response.as_deref())
                    .string(hostname.as_deref());
                f.finish();
            }
            SaslFrame::Challenge(c) => {
                let mut f = Fields::new(buf, descriptor::SASL_CHALLENGE);
                f.binary(Some(c));
                f.finish();
            }
            SaslFrame::Response(c) => {
                let mut f = Fields::new(buf, descriptor::SASL_RESPONSE);
                f.binary(Some(c));
                f.finish();
            }
            SaslFrame::Outcome {
                code,
                additional_data,
            } => {
                let mut f = Fields::new(buf, descriptor::SASL_OUTCOME);
                f.ubyte(Some(*code)).binary(additional_data.as_deref());
                f.finish();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disposition(state: Option<DeliveryState>) -> Disposition {
        Disposition {
            role: Role::Receiver,
            first: 3,
            last: Some(9),
            settled: true,
            state,
            batchable: false,
        }
    }

    fn decoded(b: BytesMut) -> Option<DeliveryState> {
        match decode_performative(b.freeze()) {
            Ok(Performative::Disposition(d)) => d.state,
            other => panic!("not a disposition: {other:?}"),
        }
    }

    #[test]
    fn outcomes_read_in_place_equal_the_general_decoding() {
        for state in [
            DeliveryState::Accepted,
            DeliveryState::Released,
            DeliveryState::Rejected(None),
            DeliveryState::Modified {
                delivery_failed: false,
                undeliverable_here: false,
                message_annotations: None,
            },
        ] {
            let mut b = BytesMut::new();
            disposition(Some(state.clone())).encode(&mut b);
            assert_eq!(decoded(b), Some(state));
        }
        // Accepted as a list8 with no fields (other encoders): the general path.
        let mut b = BytesMut::new();
        let mut f = Fields::new(&mut b, descriptor::DISPOSITION);
        f.boolean(Some(true))
            .uint(Some(3))
            .uint(None)
            .boolean(Some(true))
            .with(true, |b| {
                b.put_slice(&[0x00, 0x53, 0x24, 0xc0, 0x01, 0x00]);
            });
        f.finish();
        assert_eq!(decoded(b), Some(DeliveryState::Accepted));
    }

    #[test]
    fn delivery_tags_of_up_to_32_bytes_are_read_inline_and_longer_ones_refused() {
        for n in [0usize, 1, 8, 32, 33, 300] {
            let tag = vec![n as u8; n];
            let mut b = BytesMut::new();
            Transfer::default().encode_with_tag(Some(&tag), &mut b);
            match decode_performative(b.freeze()) {
                Ok(Performative::Transfer(t, _)) => {
                    assert!(n <= DeliveryTag::MAX, "{n} bytes read");
                    assert_eq!(t.delivery_tag.as_deref(), Some(&tag[..]));
                }
                Err(e) => {
                    assert!(n > DeliveryTag::MAX, "{n} bytes refused: {e}");
                }
                Ok(other) => panic!("not a transfer: {other:?}"),
            }
        }
    }
}
