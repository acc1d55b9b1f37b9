//! One task per client connection: owns the socket and the protocol engine, turns engine events
//! into batched [`ToCore`] messages and applies the core's [`ToConn`] batches.
//!
//! Each loop turn reads everything available, processes every frame, sends one batch to the
//! core and writes once, so syscalls stay per batch rather than per message.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use amqp::sasl::PlainAndAnonymous;
use amqp::{
    AttachReply, Connection, DeliveryState, ErrorCondition, Event, LinkId, Role, Terminus,
    condition,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::addresses::DYNAMIC_PREFIX;
use crate::config::Limits;
use crate::core::{ConnId, Dir, LinkRef, ToConn, ToCore};

const SMALL_READ: usize = 2 * 1024;
const BIG_READ: usize = 64 * 1024;

/// What every connection task shares.
pub struct Shared {
    pub router_id: String,
    pub limits: Limits,
    pub users: Option<HashMap<String, String>>,
    pub core: mpsc::Sender<Vec<ToCore>>,
}

/// The connection task's view of one link.
struct LinkState {
    dir: Dir,
    /// A consumer that asked for presettled deliveries (snd-settle-mode settled).
    presettled: bool,
    /// The core accepted the attach.
    open: bool,
    /// The peer's attach, kept until the core answers (the reply echoes its termini).
    attach: Option<Box<amqp::frames::Attach>>,
    /// The address given to a dynamic source.
    dynamic_address: Option<String>,
    /// A producer on the anonymous relay (null target): each message names its address.
    anonymous: bool,
    /// A consumer that settles second (rcv-settle-mode second): we settle a delivery only
    /// once its outcome took effect (for a queue, once the acknowledgement is durable).
    settle_second: bool,
}

/// Runs one connection to completion.
pub async fn run<S>(
    mut sock: S,
    conn_id: ConnId,
    remote: String,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    refuse: Option<ErrorCondition>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &shared.limits;
    let cfg = amqp::Config {
        container_id: shared.router_id.clone(),
        max_frame_size: limits.max_frame_size,
        channel_max: limits.max_sessions_per_connection.saturating_sub(1),
        idle_timeout_ms: limits.idle_timeout_ms,
        max_links: limits.max_links_per_connection,
        max_message_size: limits.max_message_size,
        offered_capabilities: vec!["ANONYMOUS-RELAY".into()],
        ..Default::default()
    };
    let auth = PlainAndAnonymous {
        allow_anonymous: shared.users.is_none(),
        users: shared.users.clone(),
    };
    let mut now = Instant::now();
    let mut engine = Connection::server(cfg, Some(Box::new(auth)), now);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<ToConn>>();
    let mut t = Task {
        conn_id,
        engine: &mut engine,
        links: HashMap::new(),
        unsettled: HashMap::new(),
        confirming: HashMap::new(),
        to_core: Vec::new(),
        opened: false,
        refuse,
        remote,
        tx: Some(tx),
        out_bytes: Arc::new(AtomicUsize::new(0)),
        in_bytes: Arc::new(AtomicUsize::new(0)),
        unwritten: 0,
        budget: limits.connection_buffer_bytes,
    };
    // Idle connections stay small; a connection whose reads fill the buffer gets a larger one
    // (up to 64 KiB), so busy ones read many frames per syscall.
    let mut inbuf = BytesMut::with_capacity(SMALL_READ);
    let mut deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    let mut done = false;
    while !done {
        // TCP read pause: while the core holds more of this connection's messages than the
        // budget allows, stop reading and look again shortly.
        let paused = t.in_bytes.load(Ordering::Acquire) >= t.budget;
        tokio::select! {
            r = sock.read_buf(&mut inbuf), if !paused => {
                now = Instant::now();
                match r {
                    Ok(0) | Err(_) => done = true,
                    Ok(n) => {
                        let filled = inbuf.capacity() == inbuf.len();
                        if t.engine.handle_input(&mut inbuf, now).is_err() {
                            done = true;
                        }
                        t.process_events();
                        let want = if filled { (n * 2).min(BIG_READ) } else { SMALL_READ };
                        if inbuf.capacity() - inbuf.len() < want / 2 {
                            inbuf.reserve(want);
                        }
                    }
                }
            }
            Some(batch) = rx.recv() => {
                t.apply(batch);
                while let Ok(batch) = rx.try_recv() {
                    t.apply(batch);
                }
                if t.engine.is_closed() {
                    done = true;
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(2)), if paused => {}
            _ = tokio::time::sleep_until(deadline) => {
                now = Instant::now();
                if t.engine.tick(now).is_err() {
                    done = true;
                }
            }
            _ = shutdown.changed() => {
                t.engine.close(Some(ErrorCondition::new(condition::CONNECTION_FORCED, "router shutting down")));
                done = true;
            }
        }
        if let Ok(Some(next)) = t.engine.tick(now) {
            deadline = tokio::time::Instant::from_std(next);
        }
        t.send_to_core(&shared).await;
        let out = t.engine.output();
        if !out.is_empty() {
            let buf = out.split();
            if sock.write_all(&buf).await.is_err() {
                break;
            }
            t.engine.wrote(Instant::now());
            if t.unwritten > 0 {
                let n = std::mem::take(&mut t.unwritten);
                let before = t.out_bytes.fetch_sub(n, Ordering::AcqRel);
                if before >= t.budget && before - n < t.budget {
                    t.to_core.push(ToCore::Writable { conn: conn_id });
                    t.send_to_core(&shared).await;
                }
            }
        }
    }
    let _ = sock.flush().await;
    let _ = sock.shutdown().await;
    if t.opened {
        let _ = shared
            .core
            .send(vec![ToCore::ConnClosed { conn: conn_id }])
            .await;
    }
}

struct Task<'a> {
    conn_id: ConnId,
    engine: &'a mut Connection,
    links: HashMap<LinkId, LinkState>,
    /// Our unsettled outgoing deliveries: (channel, delivery-id) → (core id, link).
    unsettled: HashMap<(u16, u32), (u64, LinkId)>,
    /// Outcomes given by consumers that settle second, waiting for `ToConn::Confirm`:
    /// core id → (link, delivery-id, outcome to echo).
    confirming: HashMap<u64, (LinkId, u32, DeliveryState)>,
    to_core: Vec<ToCore>,
    opened: bool,
    refuse: Option<ErrorCondition>,
    remote: String,
    tx: Option<mpsc::UnboundedSender<Vec<ToConn>>>,
    /// Shared with the core; see `ToCore::ConnOpened`.
    out_bytes: Arc<AtomicUsize>,
    in_bytes: Arc<AtomicUsize>,
    /// Payload bytes put in the engine's output since the last write.
    unwritten: usize,
    budget: usize,
}

impl Task<'_> {
    fn r(&self, link: LinkId) -> LinkRef {
        LinkRef {
            conn: self.conn_id,
            link,
        }
    }

    /// Tells the core how far a consumer's credit reaches (as an absolute delivery count, so
    /// deliveries already on their way are accounted for).
    fn report_credit(&mut self, link: LinkId, drain: bool) {
        let limit = self
            .engine
            .link_delivery_count(link)
            .wrapping_add(self.engine.credit(link));
        let r = self.r(link);
        self.to_core.push(ToCore::ConsumerCredit {
            link: r,
            limit,
            drain,
        });
    }

    /// Hands the batch to the core; waits when the core is behind (so a peer cannot queue
    /// unbounded work: its socket is not read meanwhile).
    async fn send_to_core(&mut self, shared: &Shared) {
        if !self.to_core.is_empty() {
            let _ = shared.core.send(std::mem::take(&mut self.to_core)).await;
        }
    }

    fn process_events(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            self.on_event(ev);
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Authenticated { .. } | Event::SessionBegun { .. } => {}
            Event::Opened(open) => {
                self.engine.open();
                if let Some(e) = self.refuse.take() {
                    self.engine.close(Some(e));
                    return;
                }
                self.opened = true;
                if let Some(tx) = self.tx.take() {
                    self.to_core.push(ToCore::ConnOpened {
                        conn: self.conn_id,
                        tx,
                        remote: self.remote.clone(),
                        container_id: open.container_id.clone(),
                        out_bytes: self.out_bytes.clone(),
                        in_bytes: self.in_bytes.clone(),
                    });
                }
            }
            Event::Attach { link, attach } => self.on_attach(link, attach),
            Event::Credit {
                link,
                credit: _,
                drain,
            } => {
                if self
                    .links
                    .get(&link)
                    .is_some_and(|l| l.dir == Dir::Consumer && l.open)
                {
                    self.report_credit(link, drain);
                }
            }
            Event::Delivery(d) => {
                let Some(l) = self.links.get(&d.link) else {
                    return;
                };
                let to = if l.anonymous {
                    match amqp::message::find_to(&d.payload) {
                        Ok(to) => to,
                        Err(e) => {
                            if !d.settled {
                                self.engine.disposition(
                                    d.link,
                                    d.delivery_id,
                                    true,
                                    Some(DeliveryState::Rejected(Some(ErrorCondition::new(
                                        condition::DECODE_ERROR,
                                        format!("cannot read message properties: {e}"),
                                    )))),
                                );
                            }
                            return;
                        }
                    }
                } else {
                    None
                };
                let r = self.r(d.link);
                self.in_bytes.fetch_add(d.payload.len(), Ordering::AcqRel);
                self.to_core.push(ToCore::Deliver {
                    link: r,
                    delivery_id: d.delivery_id,
                    settled: d.settled,
                    to,
                    payload: d.payload,
                    format: d.message_format,
                });
            }
            Event::Disposition {
                channel,
                role,
                first,
                last,
                settled,
                state,
            } => {
                if role != Role::Receiver {
                    // Dispositions from a sending peer (settling its deliveries after our
                    // outcome) need no action: we settled first.
                    return;
                }
                let mut id = first;
                loop {
                    if let Some(&(dlv, link)) = self.unsettled.get(&(channel, id)) {
                        let terminal = state.as_ref().is_some_and(DeliveryState::is_terminal);
                        if terminal || settled {
                            self.unsettled.remove(&(channel, id));
                            let st = match &state {
                                Some(s) if s.is_terminal() => s.clone(),
                                // Settled without an outcome: treat as released (spec: the
                                // sender's default outcome).
                                _ => DeliveryState::Released,
                            };
                            let second =
                                !settled && self.links.get(&link).is_some_and(|l| l.settle_second);
                            let confirm = second.then(|| self.r(link));
                            self.to_core.push(ToCore::Outcome {
                                dlv,
                                state: st.clone(),
                                confirm,
                            });
                            if second {
                                self.confirming.insert(dlv, (link, id, st));
                            } else if !settled {
                                self.engine.disposition(link, id, true, Some(st));
                            }
                        }
                    }
                    if id == last {
                        break;
                    }
                    id = id.wrapping_add(1);
                }
            }
            Event::LinkClosed { link, closed, .. } => {
                if let Some(l) = self.links.remove(&link) {
                    if l.open {
                        let r = self.r(link);
                        self.to_core.push(ToCore::Detach { link: r, closed });
                    }
                    self.unsettled.retain(|_, (_, lk)| *lk != link);
                    self.confirming.retain(|_, (lk, _, _)| *lk != link);
                }
            }
            Event::Closed(_) => {}
        }
    }

    fn on_attach(&mut self, link: LinkId, attach: Box<amqp::frames::Attach>) {
        // The peer's role tells ours: a peer sender is our producer.
        let dir = match attach.role {
            Role::Sender => Dir::Producer,
            Role::Receiver => Dir::Consumer,
        };
        let (address, dynamic) = match dir {
            Dir::Producer => {
                let t = attach.target.as_ref();
                (
                    t.and_then(|t| t.address.clone()),
                    t.is_some_and(|t| t.dynamic),
                )
            }
            Dir::Consumer => {
                let s = attach.source.as_ref();
                (
                    s.and_then(|s| s.address.clone()),
                    s.is_some_and(|s| s.dynamic),
                )
            }
        };
        let mut state = LinkState {
            dir,
            presettled: dir == Dir::Consumer && attach.snd_settle_mode == 1,
            open: false,
            attach: None,
            dynamic_address: None,
            anonymous: false,
            settle_second: dir == Dir::Consumer && attach.rcv_settle_mode == 1,
        };
        let address = if dynamic {
            if dir == Dir::Producer {
                self.engine.refuse_attach(
                    link,
                    ErrorCondition::new(
                        condition::NOT_IMPLEMENTED,
                        "dynamic targets are not supported",
                    ),
                );
                return;
            }
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let a = format!("{DYNAMIC_PREFIX}{}.{n}", self.conn_id);
            state.dynamic_address = Some(a.clone());
            Some(a)
        } else {
            address
        };
        if address.is_none() {
            if dir == Dir::Consumer {
                self.engine.refuse_attach(
                    link,
                    ErrorCondition::new(
                        condition::INVALID_FIELD,
                        "a receiver needs a source address or a dynamic source",
                    ),
                );
                return;
            }
            state.anonymous = true;
        }
        let presettled = state.presettled;
        let name = attach.name.clone();
        let Subscription {
            durable,
            shared,
            keep_ms,
        } = Subscription::of(dir, attach.source.as_ref());
        state.attach = Some(attach);
        self.links.insert(link, state);
        let r = self.r(link);
        self.to_core.push(ToCore::Attach {
            link: r,
            dir,
            name,
            address,
            presettled,
            durable,
            shared,
            keep_ms,
        });
    }

    fn apply(&mut self, batch: Vec<ToConn>) {
        for m in batch {
            match m {
                ToConn::AttachOk { link } => {
                    let Some(l) = self.links.get_mut(&link) else {
                        continue;
                    };
                    l.open = true;
                    let Some(a) = l.attach.take() else { continue };
                    let mut source = a.source.clone();
                    if let (Some(s), Some(addr)) = (source.as_mut(), l.dynamic_address.as_ref()) {
                        s.address = Some(addr.clone());
                    }
                    let reply = AttachReply {
                        source: source.or_else(|| Some(Terminus::default())),
                        target: a.target.clone(),
                        snd_settle_mode: a.snd_settle_mode,
                        rcv_settle_mode: u8::from(l.settle_second),
                        offered_capabilities: None,
                    };
                    let dir = l.dir;
                    self.engine.accept_attach(link, reply);
                    if dir == Dir::Consumer {
                        // Credit may have arrived with the attach (flow before our answer).
                        self.report_credit(link, false);
                    }
                }
                ToConn::AttachRefused { link, error } => {
                    self.links.remove(&link);
                    self.engine.refuse_attach(link, error);
                }
                ToConn::Detach { link, error } => {
                    if self.links.remove(&link).is_some() {
                        self.unsettled.retain(|_, (_, lk)| *lk != link);
                        self.confirming.retain(|_, (lk, _, _)| *lk != link);
                        self.engine.detach(link, Some(error), true);
                    }
                }
                ToConn::AddCredit { link, n } => {
                    let c = self.engine.receiver_credit(link).saturating_add(n);
                    self.engine.set_credit(link, c, false);
                }
                ToConn::RevokeCredit { link } => self.engine.set_credit(link, 0, false),
                ToConn::Deliver {
                    link,
                    dlv,
                    payload,
                    format,
                } => self.deliver(link, dlv, &payload, format),
                ToConn::Outcome {
                    link,
                    delivery_id,
                    state,
                } => self
                    .engine
                    .disposition(link, delivery_id, true, Some(state)),
                ToConn::DrainDone { link } => self.engine.drain_complete(link),
                ToConn::Confirm { dlv } => {
                    if let Some((link, id, st)) = self.confirming.remove(&dlv) {
                        self.engine.disposition(link, id, true, Some(st));
                    }
                }
                ToConn::Close { error } => self.engine.close(Some(error)),
            }
        }
    }

    fn deliver(&mut self, link: LinkId, dlv: Option<u64>, payload: &Bytes, format: u32) {
        // Counted against the budget until written, even if the send fails below.
        self.unwritten += payload.len();
        let tag = match dlv {
            Some(d) => d.to_be_bytes(),
            None => [0u8; 8],
        };
        let settled = dlv.is_none();
        let Some(id) = self.engine.send(link, &tag, payload, settled, format) else {
            // The link went away (or the peer took its credit back) after the core chose it:
            // give the delivery back so the producer hears about it.
            if let Some(d) = dlv {
                self.to_core.push(ToCore::give_back(d));
            }
            return;
        };
        if let (Some(d), Some(ch)) = (dlv, self.engine.link_channel(link)) {
            self.unsettled.insert((ch, id), (d, link));
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// What a consumer's source says of the subscription behind it (see [`ToCore::Attach`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Subscription {
    pub durable: bool,
    pub shared: bool,
    pub keep_ms: Option<u64>,
}

impl Subscription {
    /// A durable subscription (JMS and others): durable terminus, expiry-policy never; or
    /// another expiry policy with a timeout, kept that long without a consumer (MQTT 5
    /// session expiry). A producer's link has none.
    pub fn of(dir: Dir, source: Option<&Terminus>) -> Subscription {
        let source = source.filter(|_| dir == Dir::Consumer);
        let keep_ms = source.and_then(|s| {
            let expiring = !matches!(s.expiry_policy.as_deref(), Some("never"));
            (s.durable.unwrap_or(0) > 0 && expiring)
                .then_some(s.timeout)
                .flatten()
                .filter(|t| *t > 0)
                .map(|t| u64::from(t) * 1000)
        });
        let durable = keep_ms.is_some()
            || source.is_some_and(|s| {
                s.durable.unwrap_or(0) > 0 && s.expiry_policy.as_deref() == Some("never")
            });
        Subscription {
            durable,
            shared: source.is_some_and(|s| s.has_capability("shared")),
            keep_ms,
        }
    }
}
