//! The sans-IO connection engine: bytes in, events and bytes out.
//!
//! It owns everything the protocol itself defines: header and SASL exchange, open/close,
//! sessions and their windows, link handles, credit and delivery counts, multi-frame
//! assembly and splitting, idle timeout and heartbeats. It knows nothing of addresses or
//! routing; the caller (router connection task, CLI, bench) reacts to [`Event`]s and calls the
//! action methods. Time is passed in, never read, so tests drive it deterministically.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::Value;
use crate::error::{ConnectionError, condition};
use crate::frames::{
    self, AMQP_HEADER, Attach, Begin, DeliveryState, Detach, Disposition, ErrorCondition,
    FRAME_AMQP, FRAME_SASL, Flow, MIN_MAX_FRAME_SIZE, Open, Performative, Role, SASL_HEADER,
    SaslFrame, Terminus, Transfer, descriptor,
};
use crate::sasl::{Authenticator, SaslClient, SaslStep};

/// Identifies a link within one connection (an index, reused after the link is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u32);

/// Connection settings offered to the peer and limits enforced on it.
pub struct Config {
    pub container_id: String,
    pub hostname: Option<String>,
    pub max_frame_size: u32,
    pub channel_max: u16,
    /// Local idle timeout in ms (0: none). The peer must send something at least this often.
    pub idle_timeout_ms: u32,
    pub max_links: usize,
    pub max_message_size: u64,
    pub offered_capabilities: Vec<String>,
    pub desired_capabilities: Vec<String>,
    pub properties: Option<Value>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            container_id: "enmesh".into(),
            hostname: None,
            max_frame_size: 65536,
            channel_max: 255,
            idle_timeout_ms: 0,
            max_links: 65536,
            max_message_size: 100 * 1024 * 1024,
            offered_capabilities: Vec::new(),
            desired_capabilities: Vec::new(),
            properties: None,
        }
    }
}

/// What the engine tells its owner.
#[derive(Debug)]
pub enum Event {
    /// SASL finished; `identity` is the authenticated user (or "anonymous").
    Authenticated { mechanism: String, identity: String },
    /// The peer's open. A server answers with [`Connection::open`].
    Opened(Box<Open>),
    /// A session was begun by the peer (and answered) or our begin was answered.
    SessionBegun { channel: u16 },
    /// The peer attached a link (server: answer with `accept_attach` or `refuse_attach`), or
    /// answered our attach (client).
    Attach { link: LinkId, attach: Box<Attach> },
    /// A sender link's credit changed (ours to use). `drain` asks us to use it or give it up.
    Credit {
        link: LinkId,
        credit: u32,
        drain: bool,
    },
    /// A complete delivery arrived on a receiving link.
    Delivery(Delivery),
    /// The peer updated deliveries (outcomes, settlement).
    Disposition {
        channel: u16,
        role: Role,
        first: u32,
        last: u32,
        settled: bool,
        state: Option<DeliveryState>,
    },
    /// A link is gone: detached by the peer (`remote`), or by the engine for a protocol
    /// violation on it, or because its session ended.
    LinkClosed {
        link: LinkId,
        error: Option<ErrorCondition>,
        remote: bool,
        /// The peer's detach had `closed` set: the link's terminus is to be destroyed (e.g. a
        /// durable subscription unsubscribed), not just suspended.
        closed: bool,
    },
    /// The peer closed the connection (the engine has answered).
    Closed(Option<ErrorCondition>),
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub link: LinkId,
    pub delivery_id: u32,
    pub tag: crate::frames::DeliveryTag,
    pub settled: bool,
    pub message_format: u32,
    pub rcv_settle_mode: Option<u8>,
    pub payload: Bytes,
}

/// Why the engine stopped: write out what it produced, then drop the socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    #[error("protocol header mismatch")]
    HeaderMismatch,
    #[error("sasl authentication failed")]
    AuthFailed,
    #[error(transparent)]
    Protocol(#[from] ConnectionError),
    #[error("connection closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the peer's protocol header (`sasl` = whether it must be the SASL one).
    Header {
        sasl: bool,
    },
    Sasl,
    AwaitOpen,
    Open,
    Closed,
}

struct Link {
    channel: u16,
    handle: u32,
    remote_handle: Option<u32>,
    name: String,
    role: Role,
    delivery_count: u32,
    credit: u32,
    /// Receiver: highest delivery-count we ever allowed; transfers beyond it overflow credit.
    allowed_until: u32,
    drain: bool,
    /// Boxed: only a transfer split over frames has one, and every link of every idle
    /// device would carry its 80 bytes.
    partial: Option<Box<Partial>>,
    /// We sent detach and wait for the peer's.
    detaching: bool,
    /// The peer's max-message-size for what we send on this link. Recorded, not enforced yet:
    /// a router consumer with a smaller limit than a message's size receives it anyway.
    max_message_size: u64,
}

struct Partial {
    delivery_id: u32,
    tag: crate::frames::DeliveryTag,
    settled: bool,
    message_format: u32,
    rcv_settle_mode: Option<u8>,
    buf: BytesMut,
}

struct Session {
    remote_channel: Option<u16>,
    next_outgoing_id: u32,
    next_delivery_id: u32,
    next_incoming_id: u32,
    incoming_window: u32,
    remote_incoming_window: u32,
    handle_max: u32,
    remote_handles: HashMap<u32, LinkId>,
    local_handles: Vec<Option<LinkId>>,
    /// Free slots of `local_handles`: a gateway's session holds thousands of links, and
    /// searching for a free one on every attach would cost that much each time.
    free_handles: Vec<u32>,
    /// Links we attached whose peer has not answered yet (searched by name when an attach
    /// arrives; a few at a time, not every link of the session).
    awaiting: Vec<LinkId>,
    /// Transfer frames waiting for the peer's incoming window.
    blocked: VecDeque<Bytes>,
    pending_disposition: Option<Disposition>,
    ending: bool,
}

const WINDOW: u32 = i32::MAX as u32;

/// One AMQP connection, either side.
pub struct Connection {
    cfg: Config,
    server: bool,
    phase: Phase,
    auth: Option<Box<dyn Authenticator>>,
    sasl_client: Option<SaslClient>,
    out: BytesMut,
    events: VecDeque<Event>,
    sessions: Vec<Option<Session>>,
    remote_channels: HashMap<u16, u16>,
    links: Vec<Option<Link>>,
    free_links: Vec<u32>,
    live_links: usize,
    remote_max_frame: u32,
    remote_channel_max: u16,
    remote_idle_ms: u32,
    last_recv: Instant,
    last_sent: Instant,
    open_sent: bool,
    close_sent: bool,
}

fn err(cond: &'static str, desc: impl Into<String>) -> Fatal {
    Fatal::Protocol(ConnectionError::new(cond, desc))
}

impl Connection {
    /// A server connection. With an authenticator, SASL is offered (and plain AMQP still
    /// accepted when `auth.allow_no_sasl()` says so).
    pub fn server(cfg: Config, auth: Option<Box<dyn Authenticator>>, now: Instant) -> Self {
        Self::new(cfg, true, auth, None, now)
    }

    /// A client connection: writes the header (SASL first if given) and open immediately.
    pub fn client(cfg: Config, sasl: Option<SaslClient>, now: Instant) -> Self {
        let mut c = Self::new(cfg, false, None, sasl, now);
        if c.sasl_client.is_some() {
            c.out.put_slice(&SASL_HEADER);
            c.phase = Phase::Header { sasl: true };
        } else {
            c.out.put_slice(&AMQP_HEADER);
            c.phase = Phase::Header { sasl: false };
            c.open();
        }
        c
    }

    fn new(
        cfg: Config,
        server: bool,
        auth: Option<Box<dyn Authenticator>>,
        sasl_client: Option<SaslClient>,
        now: Instant,
    ) -> Self {
        Connection {
            cfg,
            server,
            phase: Phase::Header { sasl: false },
            auth,
            sasl_client,
            out: BytesMut::new(),
            events: VecDeque::new(),
            sessions: Vec::new(),
            remote_channels: HashMap::new(),
            links: Vec::new(),
            free_links: Vec::new(),
            live_links: 0,
            remote_max_frame: MIN_MAX_FRAME_SIZE,
            remote_channel_max: 0,
            remote_idle_ms: 0,
            last_recv: now,
            last_sent: now,
            open_sent: false,
            close_sent: false,
        }
    }

    /// Bytes to write to the peer. The caller writes and clears them (or `split`s them off).
    pub fn output(&mut self) -> &mut BytesMut {
        self.flush_dispositions();
        &mut self.out
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
            || self
                .sessions
                .iter()
                .flatten()
                .any(|s| s.pending_disposition.is_some())
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn remote_max_frame_size(&self) -> u32 {
        self.remote_max_frame
    }

    /// Consumes every complete frame in `input`. On `Err`, the output holds whatever the peer
    /// should still be told (header, close with error); write it and drop the connection.
    pub fn handle_input(&mut self, input: &mut BytesMut, now: Instant) -> Result<(), Fatal> {
        if !input.is_empty() {
            self.last_recv = now;
        }
        let r = self.process(input);
        if let Err(Fatal::Protocol(e)) = &r {
            self.send_close(Some(ErrorCondition::new(
                e.condition,
                e.description.clone(),
            )));
            self.phase = Phase::Closed;
        }
        if r.is_err() {
            self.phase = Phase::Closed;
        }
        r
    }

    fn process(&mut self, input: &mut BytesMut) -> Result<(), Fatal> {
        loop {
            match self.phase {
                Phase::Closed => {
                    input.clear();
                    return Err(Fatal::Closed);
                }
                Phase::Header { sasl } => {
                    if input.len() < 8 {
                        // A peer that cannot even send a header may be sending garbage: check
                        // the prefix we have so garbage is refused at once.
                        if !b"AMQP"[..input.len().min(4)].eq(&input[..input.len().min(4)]) {
                            self.out.put_slice(&AMQP_HEADER);
                            return Err(Fatal::HeaderMismatch);
                        }
                        return Ok(());
                    }
                    let h = input.split_to(8);
                    self.on_header(&h, sasl)?;
                }
                _ => {
                    if input.len() < 4 {
                        return Ok(());
                    }
                    let size = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
                    if size < 8 {
                        return Err(err(condition::FRAMING_ERROR, "frame size below 8"));
                    }
                    if size > self.cfg.max_frame_size.max(MIN_MAX_FRAME_SIZE) {
                        return Err(err(
                            condition::FRAMING_ERROR,
                            format!(
                                "frame of {size} bytes exceeds max-frame-size {}",
                                self.cfg.max_frame_size
                            ),
                        ));
                    }
                    if input.len() < size as usize {
                        input.reserve(size as usize - input.len());
                        return Ok(());
                    }
                    let frame = input.split_to(size as usize).freeze();
                    self.on_frame(frame)?;
                }
            }
        }
    }

    fn on_header(&mut self, h: &[u8], expect_sasl: bool) -> Result<(), Fatal> {
        if self.server {
            if h == SASL_HEADER && self.auth.is_some() {
                self.out.put_slice(&SASL_HEADER);
                let mechs = self
                    .auth
                    .as_ref()
                    .map(|a| a.mechanisms())
                    .unwrap_or_default();
                self.write_sasl(&SaslFrame::Mechanisms(mechs));
                self.phase = Phase::Sasl;
                Ok(())
            } else if h == AMQP_HEADER
                && (!expect_sasl)
                && self.auth.as_ref().is_none_or(|a| a.allow_no_sasl())
            {
                self.out.put_slice(&AMQP_HEADER);
                self.phase = Phase::AwaitOpen;
                Ok(())
            } else if h == AMQP_HEADER && expect_sasl {
                // The header that follows a successful SASL exchange.
                self.out.put_slice(&AMQP_HEADER);
                self.phase = Phase::AwaitOpen;
                Ok(())
            } else {
                // Answer with the header we speak, then close (spec §2.2).
                self.out.put_slice(&AMQP_HEADER);
                Err(Fatal::HeaderMismatch)
            }
        } else if expect_sasl && h == SASL_HEADER {
            self.phase = Phase::Sasl;
            Ok(())
        } else if !expect_sasl && h == AMQP_HEADER {
            self.phase = Phase::AwaitOpen;
            Ok(())
        } else {
            Err(Fatal::HeaderMismatch)
        }
    }

    fn write_sasl(&mut self, f: &SaslFrame) {
        frames::write_frame(&mut self.out, FRAME_SASL, 0, |b| f.encode(b));
    }

    fn on_frame(&mut self, frame: Bytes) -> Result<(), Fatal> {
        let doff = frame[4] as usize * 4;
        let ftype = frame[5];
        let channel = u16::from_be_bytes([frame[6], frame[7]]);
        if doff < 8 || doff > frame.len() {
            return Err(err(condition::FRAMING_ERROR, "bad data offset"));
        }
        let body = frame.slice(doff..);
        if self.phase == Phase::Sasl {
            if ftype != FRAME_SASL {
                return Err(err(condition::FRAMING_ERROR, "expected a SASL frame"));
            }
            let f = frames::decode_sasl(&body).map_err(ConnectionError::from)?;
            return self.on_sasl(f);
        }
        if ftype != FRAME_AMQP {
            return Err(err(condition::FRAMING_ERROR, "unexpected frame type"));
        }
        if body.is_empty() {
            return Ok(()); // heartbeat
        }
        let p = frames::decode_performative(body).map_err(ConnectionError::from)?;
        if self.phase == Phase::AwaitOpen {
            return match p {
                Performative::Open(o) => self.on_open(o),
                Performative::Close(e) => {
                    self.events.push_back(Event::Closed(e));
                    self.send_close(None);
                    Err(Fatal::Closed)
                }
                _ => Err(err(
                    condition::NOT_ALLOWED,
                    "expected open as the first frame",
                )),
            };
        }
        match p {
            Performative::Open(_) => Err(err(condition::NOT_ALLOWED, "second open")),
            Performative::Begin(b) => self.on_begin(channel, b),
            Performative::Attach(a) => self.on_attach(channel, *a),
            Performative::Flow(f) => self.on_flow(channel, f),
            Performative::Transfer(t, payload) => self.on_transfer(channel, t, payload),
            Performative::Disposition(d) => self.on_disposition(channel, d),
            Performative::Detach(d) => self.on_detach(channel, d),
            Performative::End(e) => self.on_end(channel, e),
            Performative::Close(e) => {
                self.events.push_back(Event::Closed(e));
                self.send_close(None);
                self.phase = Phase::Closed;
                Err(Fatal::Closed)
            }
        }
    }

    fn on_sasl(&mut self, f: SaslFrame) -> Result<(), Fatal> {
        if self.server {
            let step = match (&f, self.auth.as_mut()) {
                (
                    SaslFrame::Init {
                        mechanism,
                        initial_response,
                        ..
                    },
                    Some(a),
                ) => a.start(mechanism, initial_response.as_deref()),
                (SaslFrame::Response(r), Some(a)) => a.step(r),
                _ => return Err(err(condition::NOT_ALLOWED, "unexpected SASL frame")),
            };
            match step {
                SaslStep::Challenge(c) => {
                    self.write_sasl(&SaslFrame::Challenge(c));
                    Ok(())
                }
                SaslStep::Success { identity } => {
                    self.write_sasl(&SaslFrame::Outcome {
                        code: 0,
                        additional_data: None,
                    });
                    let mechanism = match f {
                        SaslFrame::Init { mechanism, .. } => mechanism,
                        _ => String::new(),
                    };
                    self.events.push_back(Event::Authenticated {
                        mechanism,
                        identity,
                    });
                    self.phase = Phase::Header { sasl: true };
                    Ok(())
                }
                SaslStep::Failure(code) => {
                    self.write_sasl(&SaslFrame::Outcome {
                        code,
                        additional_data: None,
                    });
                    Err(Fatal::AuthFailed)
                }
            }
        } else {
            match f {
                SaslFrame::Mechanisms(m) => {
                    let Some(c) = self.sasl_client.as_ref() else {
                        return Err(Fatal::AuthFailed);
                    };
                    if !m.contains(&c.mechanism) {
                        return Err(Fatal::AuthFailed);
                    }
                    let init = SaslFrame::Init {
                        mechanism: c.mechanism.clone(),
                        initial_response: c.initial_response.clone(),
                        hostname: self.cfg.hostname.clone(),
                    };
                    self.write_sasl(&init);
                    Ok(())
                }
                SaslFrame::Outcome { code: 0, .. } => {
                    self.out.put_slice(&AMQP_HEADER);
                    self.phase = Phase::Header { sasl: false };
                    self.open();
                    Ok(())
                }
                _ => Err(Fatal::AuthFailed),
            }
        }
    }

    fn on_open(&mut self, o: Open) -> Result<(), Fatal> {
        self.remote_max_frame = o.max_frame_size.unwrap_or(u32::MAX).max(MIN_MAX_FRAME_SIZE);
        self.remote_channel_max = o.channel_max.unwrap_or(u16::MAX);
        self.remote_idle_ms = o.idle_timeout.unwrap_or(0);
        self.phase = Phase::Open;
        self.events.push_back(Event::Opened(Box::new(o)));
        Ok(())
    }

    /// Sends our open (a server calls it after `Event::Opened`).
    pub fn open(&mut self) {
        if self.open_sent {
            return;
        }
        self.open_sent = true;
        let caps: Vec<Value> = self
            .cfg
            .offered_capabilities
            .iter()
            .map(|c| Value::Symbol(c.clone()))
            .collect();
        let desired: Vec<Value> = self
            .cfg
            .desired_capabilities
            .iter()
            .map(|c| Value::Symbol(c.clone()))
            .collect();
        let o = Open {
            container_id: self.cfg.container_id.clone(),
            hostname: self.cfg.hostname.clone(),
            max_frame_size: Some(self.cfg.max_frame_size),
            channel_max: Some(self.cfg.channel_max),
            // Advertise half the threshold we enforce (spec §2.4.5), so a peer that
            // heartbeats once per advertised interval is never cut off by jitter.
            idle_timeout: (self.cfg.idle_timeout_ms > 0)
                .then_some((self.cfg.idle_timeout_ms / 2).max(1)),
            offered_capabilities: (!caps.is_empty()).then_some(Value::Array(caps)),
            desired_capabilities: (!desired.is_empty()).then_some(Value::Array(desired)),
            properties: self.cfg.properties.clone(),
        };
        frames::write_frame(&mut self.out, FRAME_AMQP, 0, |b| o.encode(b));
    }

    fn send_close(&mut self, e: Option<ErrorCondition>) {
        if self.close_sent {
            return;
        }
        if !self.open_sent {
            // A close must follow our open.
            if self.phase == Phase::Sasl || matches!(self.phase, Phase::Header { .. }) {
                return;
            }
            self.open();
        }
        self.close_sent = true;
        self.flush_dispositions();
        frames::write_frame(&mut self.out, FRAME_AMQP, 0, |b| {
            frames::encode_end_or_close(b, descriptor::CLOSE, e.as_ref())
        });
    }

    /// Closes the connection with an optional error. Write the output, then drop the socket
    /// (or wait briefly for the peer's close).
    pub fn close(&mut self, e: Option<ErrorCondition>) {
        self.send_close(e);
        self.phase = Phase::Closed;
    }

    fn alloc_channel(&mut self) -> Option<u16> {
        let max = self.cfg.channel_max.min(self.remote_channel_max) as usize;
        if let Some(i) = self.sessions.iter().position(Option::is_none) {
            return Some(i as u16);
        }
        if self.sessions.len() <= max {
            self.sessions.push(None);
            return Some((self.sessions.len() - 1) as u16);
        }
        None
    }

    fn new_session(&self, remote_channel: Option<u16>) -> Session {
        Session {
            remote_channel,
            next_outgoing_id: 0,
            next_delivery_id: 0,
            next_incoming_id: 0,
            incoming_window: WINDOW,
            remote_incoming_window: 0,
            handle_max: u32::MAX,
            remote_handles: HashMap::new(),
            local_handles: Vec::new(),
            free_handles: Vec::new(),
            awaiting: Vec::new(),
            blocked: VecDeque::new(),
            pending_disposition: None,
            ending: false,
        }
    }

    fn on_begin(&mut self, remote_ch: u16, b: Begin) -> Result<(), Fatal> {
        if let Some(local) = b.remote_channel {
            // The answer to our begin.
            let s = self
                .sessions
                .get_mut(local as usize)
                .and_then(Option::as_mut)
                .ok_or_else(|| err(condition::FRAMING_ERROR, "begin for unknown channel"))?;
            s.remote_channel = Some(remote_ch);
            s.next_incoming_id = b.next_outgoing_id;
            s.remote_incoming_window = b.incoming_window;
            s.handle_max = b.handle_max.unwrap_or(u32::MAX);
            self.remote_channels.insert(remote_ch, local);
            self.events
                .push_back(Event::SessionBegun { channel: local });
            return Ok(());
        }
        if self.remote_channels.contains_key(&remote_ch) {
            return Err(err(condition::NOT_ALLOWED, "channel already in use"));
        }
        let Some(local) = self.alloc_channel() else {
            return Err(err(
                condition::RESOURCE_LIMIT_EXCEEDED,
                "too many sessions on this connection",
            ));
        };
        let mut s = self.new_session(Some(remote_ch));
        s.next_incoming_id = b.next_outgoing_id;
        s.remote_incoming_window = b.incoming_window;
        s.handle_max = b.handle_max.unwrap_or(u32::MAX);
        let reply = Begin {
            remote_channel: Some(remote_ch),
            next_outgoing_id: s.next_outgoing_id,
            incoming_window: s.incoming_window,
            outgoing_window: WINDOW,
            handle_max: Some(self.cfg.max_links.min(u32::MAX as usize) as u32),
            ..Default::default()
        };
        self.sessions[local as usize] = Some(s);
        self.remote_channels.insert(remote_ch, local);
        frames::write_frame(&mut self.out, FRAME_AMQP, local, |buf| reply.encode(buf));
        self.events
            .push_back(Event::SessionBegun { channel: local });
        Ok(())
    }

    /// Begins a session (client side). Returns the local channel.
    pub fn begin(&mut self) -> Option<u16> {
        let ch = self.alloc_channel()?;
        let s = self.new_session(None);
        let b = Begin {
            remote_channel: None,
            next_outgoing_id: s.next_outgoing_id,
            incoming_window: s.incoming_window,
            outgoing_window: WINDOW,
            handle_max: None,
            ..Default::default()
        };
        self.sessions[ch as usize] = Some(s);
        frames::write_frame(&mut self.out, FRAME_AMQP, ch, |buf| b.encode(buf));
        Some(ch)
    }

    fn local_channel(&self, remote_ch: u16) -> Result<u16, Fatal> {
        self.remote_channels
            .get(&remote_ch)
            .copied()
            .ok_or_else(|| {
                err(
                    condition::FRAMING_ERROR,
                    format!("no session on channel {remote_ch}"),
                )
            })
    }

    fn session_mut(&mut self, ch: u16) -> Result<&mut Session, Fatal> {
        self.sessions
            .get_mut(ch as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| err(condition::FRAMING_ERROR, "no such session"))
    }

    fn alloc_link(&mut self, link: Link) -> LinkId {
        self.live_links += 1;
        if let Some(i) = self.free_links.pop() {
            self.links[i as usize] = Some(link);
            LinkId(i)
        } else {
            self.links.push(Some(link));
            LinkId((self.links.len() - 1) as u32)
        }
    }

    fn free_link(&mut self, id: LinkId) -> Option<Link> {
        let l = self.links.get_mut(id.0 as usize)?.take()?;
        self.live_links -= 1;
        self.free_links.push(id.0);
        if let Some(s) = self
            .sessions
            .get_mut(l.channel as usize)
            .and_then(Option::as_mut)
        {
            if let Some(slot) = s.local_handles.get_mut(l.handle as usize)
                && *slot == Some(id)
            {
                *slot = None;
                s.free_handles.push(l.handle);
            }
            if l.remote_handle.is_none() {
                s.awaiting.retain(|a| *a != id);
            }
            if let Some(rh) = l.remote_handle {
                s.remote_handles.remove(&rh);
            }
        }
        Some(l)
    }

    fn alloc_handle(s: &mut Session, id: LinkId) -> u32 {
        if let Some(i) = s.free_handles.pop() {
            s.local_handles[i as usize] = Some(id);
            i
        } else {
            s.local_handles.push(Some(id));
            (s.local_handles.len() - 1) as u32
        }
    }

    fn on_attach(&mut self, remote_ch: u16, a: Attach) -> Result<(), Fatal> {
        let ch = self.local_channel(remote_ch)?;
        let max_links = self.cfg.max_links;
        let live = self.live_links;
        if self.session_mut(ch)?.remote_handles.contains_key(&a.handle) {
            return Err(err(
                condition::HANDLE_IN_USE,
                format!("handle {} in use", a.handle),
            ));
        }
        // Is it the answer to a link we attached (same name, opposite role, no remote handle)?
        let ours = self.sessions[ch as usize].as_ref().and_then(|s| {
            s.awaiting.iter().position(|id| {
                self.links
                    .get(id.0 as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|l| {
                        l.remote_handle.is_none() && l.name == a.name && l.role != a.role
                    })
            })
        });
        if let Some(at) = ours {
            let s = self.session_mut(ch)?;
            let id = s.awaiting.swap_remove(at);
            s.remote_handles.insert(a.handle, id);
            if let Some(l) = self.links[id.0 as usize].as_mut() {
                l.remote_handle = Some(a.handle);
                if l.role == Role::Receiver {
                    l.delivery_count = a.initial_delivery_count.unwrap_or(0);
                    l.allowed_until = l.delivery_count.wrapping_add(l.credit);
                }
                if let Some(m) = a.max_message_size.filter(|m| *m > 0) {
                    l.max_message_size = m;
                }
            }
            self.events.push_back(Event::Attach {
                link: id,
                attach: Box::new(a),
            });
            return Ok(());
        }
        let our_role = match a.role {
            Role::Sender => Role::Receiver,
            Role::Receiver => Role::Sender,
        };
        // Handles are only map keys here (links are counted above), so any value is harmless;
        // still refuse nonsense beyond the signed range some peers mishandle.
        if a.handle > u32::MAX / 2 {
            return Err(err(condition::INVALID_FIELD, "handle above handle-max"));
        }
        let link = Link {
            channel: ch,
            handle: 0,
            remote_handle: Some(a.handle),
            name: a.name.clone(),
            role: our_role,
            delivery_count: if our_role == Role::Receiver {
                a.initial_delivery_count.unwrap_or(0)
            } else {
                0
            },
            credit: 0,
            allowed_until: a.initial_delivery_count.unwrap_or(0),
            drain: false,
            partial: None,
            detaching: false,
            max_message_size: a.max_message_size.filter(|m| *m > 0).unwrap_or(u64::MAX),
        };
        let id = self.alloc_link(link);
        let s = self.session_mut(ch)?;
        let handle = Self::alloc_handle(s, id);
        s.remote_handles.insert(a.handle, id);
        if let Some(l) = self.links[id.0 as usize].as_mut() {
            l.handle = handle;
        }
        if live >= max_links.saturating_mul(2) {
            // Refused links wait for the peer's detach; a peer that keeps attaching without
            // answering would grow them without bound.
            return Err(err(
                condition::RESOURCE_LIMIT_EXCEEDED,
                format!("too many links (limit {max_links}) and refused attaches not detached"),
            ));
        }
        if live >= max_links {
            // Refused on a real handle: attach with a null terminus, then detach with the error.
            self.refuse_attach(
                id,
                ErrorCondition::new(
                    condition::RESOURCE_LIMIT_EXCEEDED,
                    format!("at most {max_links} links per connection"),
                ),
            );
            return Ok(());
        }
        self.events.push_back(Event::Attach {
            link: id,
            attach: Box::new(a),
        });
        Ok(())
    }

    fn link(&self, id: LinkId) -> Option<&Link> {
        self.links.get(id.0 as usize).and_then(Option::as_ref)
    }
    fn link_mut(&mut self, id: LinkId) -> Option<&mut Link> {
        self.links.get_mut(id.0 as usize).and_then(Option::as_mut)
    }

    /// Answers the peer's attach. `source`/`target` are what we settled on; our role is the
    /// opposite of the peer's.
    pub fn accept_attach(&mut self, id: LinkId, reply: AttachReply) {
        let Some(l) = self.link(id) else { return };
        let a = Attach {
            name: l.name.clone(),
            handle: l.handle,
            role: l.role,
            snd_settle_mode: reply.snd_settle_mode,
            rcv_settle_mode: reply.rcv_settle_mode,
            source: reply.source,
            target: reply.target,
            initial_delivery_count: (l.role == Role::Sender).then_some(l.delivery_count),
            max_message_size: (l.role == Role::Receiver && self.cfg.max_message_size > 0)
                .then_some(self.cfg.max_message_size),
            offered_capabilities: reply.offered_capabilities,
            desired_capabilities: None,
            properties: None,
        };
        let ch = l.channel;
        frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| a.encode(b));
    }

    /// Refuses the peer's attach: attach with a null terminus, then detach with `error`.
    pub fn refuse_attach(&mut self, id: LinkId, error: ErrorCondition) {
        let Some(l) = self.link(id) else { return };
        let a = Attach {
            name: l.name.clone(),
            handle: l.handle,
            role: l.role,
            snd_settle_mode: 2,
            rcv_settle_mode: 0,
            source: None,
            target: None,
            initial_delivery_count: (l.role == Role::Sender).then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let ch = l.channel;
        frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| a.encode(b));
        self.detach(id, Some(error), true);
    }

    /// Attaches a link (client side). `role` is ours.
    pub fn attach(&mut self, channel: u16, a: AttachRequest) -> Option<LinkId> {
        let link = Link {
            channel,
            handle: 0,
            remote_handle: None,
            name: a.name.clone(),
            role: a.role,
            delivery_count: 0,
            credit: 0,
            allowed_until: 0,
            drain: false,
            partial: None,
            detaching: false,
            max_message_size: u64::MAX,
        };
        self.sessions.get(channel as usize)?.as_ref()?;
        let id = self.alloc_link(link);
        let s = self.sessions.get_mut(channel as usize)?.as_mut()?;
        let handle = Self::alloc_handle(s, id);
        s.awaiting.push(id);
        if let Some(l) = self.link_mut(id) {
            l.handle = handle;
        }
        let frame = Attach {
            name: a.name,
            handle,
            role: a.role,
            snd_settle_mode: a.snd_settle_mode,
            rcv_settle_mode: a.rcv_settle_mode,
            source: a.source,
            target: a.target,
            initial_delivery_count: (a.role == Role::Sender).then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frames::write_frame(&mut self.out, FRAME_AMQP, channel, |b| frame.encode(b));
        Some(id)
    }

    fn session_flow(&self, s: &Session) -> Flow {
        Flow {
            next_incoming_id: s.remote_channel.map(|_| s.next_incoming_id),
            incoming_window: s.incoming_window,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: WINDOW,
            ..Default::default()
        }
    }

    fn write_link_flow(&mut self, id: LinkId, drain: bool, echo: bool) {
        let Some(l) = self.link(id) else { return };
        let ch = l.channel;
        let Some(s) = self.sessions.get(ch as usize).and_then(Option::as_ref) else {
            return;
        };
        let mut f = self.session_flow(s);
        f.handle = Some(l.handle);
        f.delivery_count = Some(l.delivery_count);
        f.link_credit = Some(l.credit);
        f.drain = drain;
        f.echo = echo;
        self.flush_dispositions();
        frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| f.encode(b));
    }

    fn on_flow(&mut self, remote_ch: u16, f: Flow) -> Result<(), Fatal> {
        let ch = self.local_channel(remote_ch)?;
        let s = self.session_mut(ch)?;
        // Peer's view of our outgoing transfers gives its remaining incoming window.
        let next_in = f.next_incoming_id.unwrap_or(0);
        s.remote_incoming_window = next_in
            .wrapping_add(f.incoming_window)
            .wrapping_sub(s.next_outgoing_id);
        let link_id = match f.handle {
            Some(h) => Some(*s.remote_handles.get(&h).ok_or_else(|| {
                err(
                    condition::UNATTACHED_HANDLE,
                    format!("flow on unattached handle {h}"),
                )
            })?),
            None => None,
        };
        self.unblock(ch);
        let Some(id) = link_id else {
            if f.echo {
                let s = self.session_mut(ch)?;
                let reply = Flow {
                    next_incoming_id: Some(s.next_incoming_id),
                    incoming_window: s.incoming_window,
                    next_outgoing_id: s.next_outgoing_id,
                    outgoing_window: WINDOW,
                    ..Default::default()
                };
                frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| reply.encode(b));
            }
            return Ok(());
        };
        let Some(l) = self.link_mut(id) else {
            return Ok(());
        };
        if l.detaching {
            return Ok(());
        }
        match l.role {
            Role::Sender => {
                // credit = peer's delivery-count + link-credit - our delivery-count.
                let their_dc = f.delivery_count.unwrap_or(l.delivery_count);
                let credit = f.link_credit.unwrap_or(0);
                let limit = their_dc.wrapping_add(credit);
                let c = limit.wrapping_sub(l.delivery_count);
                l.credit = if (c as i32) < 0 { 0 } else { c };
                l.drain = f.drain;
                let (credit, drain) = (l.credit, l.drain);
                self.events.push_back(Event::Credit {
                    link: id,
                    credit,
                    drain,
                });
                if f.echo {
                    self.write_link_flow(id, false, false);
                }
            }
            Role::Receiver => {
                if let Some(dc) = f.delivery_count {
                    // The sender may advance delivery-count (drain): credit shrinks with it.
                    let used = dc.wrapping_sub(l.delivery_count);
                    if (used as i32) > 0 {
                        l.credit = l.credit.saturating_sub(used);
                        l.delivery_count = dc;
                    }
                }
                if f.echo {
                    self.write_link_flow(id, false, false);
                }
            }
        }
        Ok(())
    }

    fn on_transfer(&mut self, remote_ch: u16, t: Transfer, payload: Bytes) -> Result<(), Fatal> {
        let ch = self.local_channel(remote_ch)?;
        let s = self.session_mut(ch)?;
        if s.incoming_window == 0 {
            return Err(err(
                condition::WINDOW_VIOLATION,
                "transfer beyond incoming-window",
            ));
        }
        s.incoming_window -= 1;
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        let refill = s.incoming_window < WINDOW / 2;
        let id = *s.remote_handles.get(&t.handle).ok_or_else(|| {
            err(
                condition::UNATTACHED_HANDLE,
                format!("transfer on unattached handle {}", t.handle),
            )
        })?;
        if refill {
            let s = self.session_mut(ch)?;
            s.incoming_window = WINDOW;
            let f = self.session_flow(self.sessions[ch as usize].as_ref().ok_or(Fatal::Closed)?);
            frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| f.encode(b));
        }
        let max_msg = self.cfg.max_message_size;
        // Partly received messages of all links together are bounded too (a peer could start
        // one large message on every link). Only multi-frame deliveries pay for this scan.
        let partial_total: u64 = if t.more {
            self.links
                .iter()
                .flatten()
                .filter_map(|l| l.partial.as_ref())
                .map(|p| p.buf.len() as u64)
                .sum()
        } else {
            0
        };
        let s_next_delivery = {
            let Some(l) = self.link_mut(id) else {
                return Ok(());
            };
            if l.role != Role::Receiver {
                return Err(err(
                    condition::NOT_ALLOWED,
                    "transfer on a link where the peer receives",
                ));
            }
            if l.detaching {
                return Ok(());
            }
            l.partial.is_none()
        };
        let l = self.link_mut(id).ok_or(Fatal::Closed)?;
        if s_next_delivery {
            // First frame of a delivery: it uses one credit.
            let Some(delivery_id) = t.delivery_id else {
                return Err(err(
                    condition::INVALID_FIELD,
                    "first transfer without delivery-id",
                ));
            };
            if l.delivery_count == l.allowed_until {
                self.fail_link(
                    id,
                    ErrorCondition::new(
                        condition::TRANSFER_LIMIT_EXCEEDED,
                        "transfer without link credit",
                    ),
                );
                return Ok(());
            }
            l.delivery_count = l.delivery_count.wrapping_add(1);
            l.credit = l.credit.saturating_sub(1);
            if !t.more && !t.aborted {
                // One frame, the usual case: delivered as it came, with no partial state
                // (nothing allocated per message).
                if payload.len() as u64 > max_msg {
                    self.fail_link(
                        id,
                        ErrorCondition::new(
                            condition::MESSAGE_SIZE_EXCEEDED,
                            format!("message larger than {max_msg} bytes"),
                        ),
                    );
                    return Ok(());
                }
                self.events.push_back(Event::Delivery(Delivery {
                    link: id,
                    delivery_id,
                    tag: t.delivery_tag.unwrap_or_default(),
                    settled: t.settled.unwrap_or(false),
                    message_format: t.message_format.unwrap_or(0),
                    rcv_settle_mode: t.rcv_settle_mode,
                    payload,
                }));
                return Ok(());
            }
            l.partial = Some(Box::new(Partial {
                delivery_id,
                tag: t.delivery_tag.unwrap_or_default(),
                settled: t.settled.unwrap_or(false),
                message_format: t.message_format.unwrap_or(0),
                rcv_settle_mode: t.rcv_settle_mode,
                buf: BytesMut::new(),
            }));
        }
        let limit = max_msg;
        let Some(p) = l.partial.as_mut() else {
            return Ok(());
        };
        if t.settled == Some(true) {
            p.settled = true;
        }
        if t.aborted {
            l.partial = None;
            return Ok(());
        }
        if (p.buf.len() + payload.len()) as u64 > limit {
            l.partial = None;
            self.fail_link(
                id,
                ErrorCondition::new(
                    condition::MESSAGE_SIZE_EXCEEDED,
                    format!("message larger than {limit} bytes"),
                ),
            );
            return Ok(());
        }
        if partial_total + payload.len() as u64 > max_msg.saturating_mul(2) {
            l.partial = None;
            self.fail_link(
                id,
                ErrorCondition::new(
                    condition::RESOURCE_LIMIT_EXCEEDED,
                    "too many bytes of partly received messages on this connection",
                ),
            );
            return Ok(());
        }
        if t.more {
            p.buf.extend_from_slice(&payload);
            return Ok(());
        }
        let Some(p) = l.partial.take() else {
            return Ok(());
        };
        let body = if p.buf.is_empty() {
            payload
        } else {
            let mut b = p.buf;
            b.extend_from_slice(&payload);
            b.freeze()
        };
        self.events.push_back(Event::Delivery(Delivery {
            link: id,
            delivery_id: p.delivery_id,
            tag: p.tag,
            settled: p.settled,
            message_format: p.message_format,
            rcv_settle_mode: p.rcv_settle_mode,
            payload: body,
        }));
        Ok(())
    }

    fn on_disposition(&mut self, remote_ch: u16, d: Disposition) -> Result<(), Fatal> {
        let ch = self.local_channel(remote_ch)?;
        let last = d.last.unwrap_or(d.first);
        if last.wrapping_sub(d.first) > 1 << 20 {
            return Err(err(condition::INVALID_FIELD, "disposition range too large"));
        }
        self.events.push_back(Event::Disposition {
            channel: ch,
            role: d.role,
            first: d.first,
            last,
            settled: d.settled,
            state: d.state,
        });
        Ok(())
    }

    fn on_detach(&mut self, remote_ch: u16, d: Detach) -> Result<(), Fatal> {
        let ch = self.local_channel(remote_ch)?;
        let s = self.session_mut(ch)?;
        let id = *s.remote_handles.get(&d.handle).ok_or_else(|| {
            err(
                condition::UNATTACHED_HANDLE,
                format!("detach of unattached handle {}", d.handle),
            )
        })?;
        let Some(l) = self.link(id) else {
            return Ok(());
        };
        if l.detaching {
            self.free_link(id);
            return Ok(());
        }
        // Answer in kind, then forget the link.
        let reply = Detach {
            handle: l.handle,
            closed: d.closed,
            error: None,
        };
        frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| reply.encode(b));
        self.free_link(id);
        self.events.push_back(Event::LinkClosed {
            link: id,
            error: d.error,
            remote: true,
            closed: d.closed,
        });
        Ok(())
    }

    /// Detaches a link for a violation on it and tells the owner (the connection goes on).
    fn fail_link(&mut self, id: LinkId, error: ErrorCondition) {
        self.detach(id, Some(error.clone()), true);
        self.events.push_back(Event::LinkClosed {
            link: id,
            error: Some(error),
            remote: false,
            closed: false,
        });
    }

    /// Detaches a link of ours; its id stays reserved until the peer answers.
    pub fn detach(&mut self, id: LinkId, error: Option<ErrorCondition>, closed: bool) {
        let Some(l) = self.link_mut(id) else { return };
        if l.detaching {
            return;
        }
        l.detaching = true;
        l.partial = None;
        let (ch, handle, attached) = (l.channel, l.handle, l.remote_handle.is_some());
        let d = Detach {
            handle,
            closed,
            error,
        };
        self.flush_dispositions();
        frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| d.encode(b));
        if !attached {
            self.free_link(id);
        }
    }

    fn on_end(&mut self, remote_ch: u16, e: Option<ErrorCondition>) -> Result<(), Fatal> {
        let ch = self.local_channel(remote_ch)?;
        self.remote_channels.remove(&remote_ch);
        let Some(s) = self.sessions.get_mut(ch as usize).and_then(Option::take) else {
            return Ok(());
        };
        let ids: Vec<LinkId> = s.local_handles.iter().flatten().copied().collect();
        let ending = s.ending;
        // Put the session back so free_link can clear handles, then drop it.
        self.sessions[ch as usize] = Some(s);
        for id in ids {
            let was_detaching = self.link(id).is_some_and(|l| l.detaching);
            self.free_link(id);
            if !was_detaching {
                self.events.push_back(Event::LinkClosed {
                    link: id,
                    error: e.clone(),
                    remote: true,
                    closed: false,
                });
            }
        }
        self.sessions[ch as usize] = None;
        if !ending {
            frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| {
                frames::encode_end_or_close(b, descriptor::END, None)
            });
        }
        Ok(())
    }

    /// Grants `credit` on a receiving link (replaces the current credit).
    pub fn set_credit(&mut self, id: LinkId, credit: u32, drain: bool) {
        let Some(l) = self.link_mut(id) else { return };
        if l.role != Role::Receiver || l.detaching {
            return;
        }
        l.credit = credit;
        let until = l.delivery_count.wrapping_add(credit);
        // Credit may shrink, but a transfer the peer sent under the old credit is still legal.
        if (until.wrapping_sub(l.allowed_until) as i32) > 0 {
            l.allowed_until = until;
        }
        self.write_link_flow(id, drain, false);
    }

    /// Credit left on a receiving link, as we granted it.
    pub fn receiver_credit(&self, id: LinkId) -> u32 {
        self.link(id).map_or(0, |l| l.credit)
    }

    /// Credit available on a sending link.
    pub fn credit(&self, id: LinkId) -> u32 {
        self.link(id)
            .filter(|l| l.role == Role::Sender && !l.detaching)
            .map_or(0, |l| l.credit)
    }

    pub fn link_name(&self, id: LinkId) -> Option<&str> {
        self.link(id).map(|l| l.name.as_str())
    }

    pub fn link_channel(&self, id: LinkId) -> Option<u16> {
        self.link(id).map(|l| l.channel)
    }

    pub fn link_delivery_count(&self, id: LinkId) -> u32 {
        self.link(id).map_or(0, |l| l.delivery_count)
    }

    /// Completes a drain: the credit we did not use is given up.
    pub fn drain_complete(&mut self, id: LinkId) {
        let Some(l) = self.link_mut(id) else { return };
        if l.role != Role::Sender || !l.drain {
            return;
        }
        l.delivery_count = l.delivery_count.wrapping_add(l.credit);
        l.credit = 0;
        l.drain = false;
        self.write_link_flow(id, true, false);
    }

    /// Sends one delivery on a sending link (split over frames as needed). Returns its
    /// delivery-id, or `None` if the link has no credit or is gone.
    pub fn send(
        &mut self,
        id: LinkId,
        tag: &[u8],
        payload: &[u8],
        settled: bool,
        message_format: u32,
    ) -> Option<u32> {
        let l = self.link_mut(id)?;
        if l.role != Role::Sender || l.detaching || l.credit == 0 {
            return None;
        }
        l.credit -= 1;
        l.delivery_count = l.delivery_count.wrapping_add(1);
        let (ch, handle) = (l.channel, l.handle);
        let max_frame = self
            .remote_max_frame
            .min(self.cfg.max_frame_size.max(MIN_MAX_FRAME_SIZE)) as usize;
        self.flush_dispositions();
        let s = self.sessions.get_mut(ch as usize)?.as_mut()?;
        let delivery_id = s.next_delivery_id;
        s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
        let mut first = true;
        let mut rest = payload;
        loop {
            let t = Transfer {
                handle,
                delivery_id: first.then_some(delivery_id),
                message_format: first.then_some(message_format),
                settled: (first && settled).then_some(true),
                more: true,
                ..Default::default()
            };
            let start = self.out.len();
            let blocked = s.remote_incoming_window == 0 || !s.blocked.is_empty();
            let mut tmp = BytesMut::new();
            let out: &mut BytesMut = if blocked { &mut tmp } else { &mut self.out };
            let fstart = if blocked { 0 } else { start };
            out.put_u32(0);
            out.put_u8(2);
            out.put_u8(FRAME_AMQP);
            out.put_u16(ch);
            let perf_at = out.len();
            let tag = first.then_some(tag);
            t.encode_with_tag(tag, out);
            let overhead = out.len() - fstart;
            let room = max_frame.saturating_sub(overhead).max(1);
            let last = rest.len() <= room;
            if last {
                // Re-encode without `more` (it is the one flag that differs).
                out.truncate(perf_at);
                Transfer { more: false, ..t }.encode_with_tag(tag, out);
            }
            let n = rest.len().min(room);
            out.put_slice(&rest[..n]);
            rest = &rest[n..];
            let size = (out.len() - fstart) as u32;
            out[fstart..fstart + 4].copy_from_slice(&size.to_be_bytes());
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
            if blocked {
                s.blocked.push_back(tmp.freeze());
            } else {
                s.remote_incoming_window -= 1;
            }
            first = false;
            if last {
                break;
            }
        }
        Some(delivery_id)
    }

    fn unblock(&mut self, ch: u16) {
        let Some(s) = self.sessions.get_mut(ch as usize).and_then(Option::as_mut) else {
            return;
        };
        while s.remote_incoming_window > 0 {
            let Some(f) = s.blocked.pop_front() else {
                break;
            };
            self.out.put_slice(&f);
            s.remote_incoming_window -= 1;
        }
    }

    /// Updates deliveries on the session of `id`. Adjacent calls with the same state are
    /// coalesced into one disposition range.
    pub fn disposition(
        &mut self,
        id: LinkId,
        delivery_id: u32,
        settled: bool,
        state: Option<DeliveryState>,
    ) {
        let Some(l) = self.link(id) else { return };
        let (ch, role) = (l.channel, l.role);
        self.disposition_on(ch, role, delivery_id, settled, state);
    }

    /// Like [`Connection::disposition`] but by session; used when the link is already gone.
    pub fn disposition_on(
        &mut self,
        ch: u16,
        role: Role,
        delivery_id: u32,
        settled: bool,
        state: Option<DeliveryState>,
    ) {
        let Some(s) = self.sessions.get_mut(ch as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Some(p) = s.pending_disposition.as_mut() {
            let last = p.last.unwrap_or(p.first);
            if p.role == role
                && p.settled == settled
                && p.state == state
                && last.wrapping_add(1) == delivery_id
            {
                p.last = Some(delivery_id);
                return;
            }
        }
        let prev = s.pending_disposition.replace(Disposition {
            role,
            first: delivery_id,
            last: None,
            settled,
            state,
            batchable: false,
        });
        if let Some(p) = prev {
            frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| p.encode(b));
        }
    }

    fn flush_dispositions(&mut self) {
        for (ch, s) in self.sessions.iter_mut().enumerate() {
            if let Some(p) = s.as_mut().and_then(|s| s.pending_disposition.take()) {
                frames::write_frame(&mut self.out, FRAME_AMQP, ch as u16, |b| p.encode(b));
            }
        }
    }

    /// Ends a session of ours.
    pub fn end(&mut self, ch: u16, error: Option<ErrorCondition>) {
        if let Some(s) = self.sessions.get_mut(ch as usize).and_then(Option::as_mut) {
            s.ending = true;
            frames::write_frame(&mut self.out, FRAME_AMQP, ch, |b| {
                frames::encode_end_or_close(b, descriptor::END, error.as_ref())
            });
        }
    }

    /// Drives timers: returns when to call again. Closes the connection with
    /// `amqp:resource-limit-exceeded` when the peer stayed silent past our idle timeout, and
    /// writes a heartbeat when the peer's idle timeout requires one.
    pub fn tick(&mut self, now: Instant) -> Result<Option<Instant>, Fatal> {
        if self.phase == Phase::Closed {
            return Err(Fatal::Closed);
        }
        let mut next: Option<Instant> = None;
        if self.cfg.idle_timeout_ms > 0 {
            let deadline = self.last_recv + Duration::from_millis(self.cfg.idle_timeout_ms.into());
            if now >= deadline {
                self.close(Some(ErrorCondition::new(
                    condition::RESOURCE_LIMIT_EXCEEDED,
                    "local-idle-timeout expired",
                )));
                return Err(Fatal::Protocol(ConnectionError::new(
                    condition::RESOURCE_LIMIT_EXCEEDED,
                    "idle timeout",
                )));
            }
            next = Some(deadline);
        }
        if self.remote_idle_ms > 0 && self.open_sent {
            let every = Duration::from_millis((self.remote_idle_ms / 2).max(1).into());
            if now >= self.last_sent + every && self.out.is_empty() {
                frames::write_heartbeat(&mut self.out);
                self.last_sent = now;
            }
            let hb = self.last_sent + every;
            next = Some(next.map_or(hb, |n| n.min(hb)));
        }
        Ok(next)
    }

    /// Tells the engine that output was written at `now` (heartbeat bookkeeping).
    pub fn wrote(&mut self, now: Instant) {
        self.last_sent = now;
    }
}

/// What a server answers to a peer's attach.
#[derive(Debug, Clone, Default)]
pub struct AttachReply {
    pub source: Option<Terminus>,
    pub target: Option<Terminus>,
    pub snd_settle_mode: u8,
    pub rcv_settle_mode: u8,
    pub offered_capabilities: Option<Value>,
}

/// A link a client attaches.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub name: String,
    pub role: Role,
    pub source: Option<Terminus>,
    pub target: Option<Terminus>,
    pub snd_settle_mode: u8,
    pub rcv_settle_mode: u8,
}
