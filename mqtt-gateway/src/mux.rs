//! Devices multiplexed over a few AMQP connections to the router.
//!
//! One AMQP connection per device would cost three sockets per device in standalone (device,
//! gateway → router, router ← gateway) and an AMQP connection's state on both ends; 15k
//! devices would not fit under a 20k descriptor limit. Instead a [`Pool`] keeps AMQP
//! connections of up to `per_connection` devices each, and every device task holds a
//! [`Port`] on one of them.
//!
//! Each pooled connection is owned by one task ([`run`]) that owns the AMQP engine, one
//! session, and the maps from links and deliveries to devices; devices talk to it by message
//! only (one owner for each piece of state). All devices of a connection share its session;
//! their links are their own, named by the device (a device's link names are unique on the
//! connection), so credit, settlement and back-pressure stay per device.
//!
//! The channels are unbounded but bounded by the protocol: towards a device, deliveries are
//! bounded by the credit the device granted and outcomes by what it sent; towards the
//! connection, a device sends only within the credit the connection reported to it
//! ([`Ev::Credit`] carries how many of the device's sends the task had applied, so the device
//! computes its remaining credit exactly), settles only deliveries it received, and waits for
//! each attach's answer.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use amqp::client::{Client, ClientError};
use amqp::connection::AttachRequest;
use amqp::{DeliveryState, ErrorCondition, Event, LinkId, Role};
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

/// The AMQP container id of every gateway connection: durable subscriptions are named
/// `<container>:<link name>` by the router, and must be found again through any gateway.
pub const CONTAINER: &str = "mqtt";

/// A delivery to a device: what it needs of [`amqp::Delivery`] (events are kept small, since
/// every device's channel allocates room for a block of them).
#[derive(Debug)]
pub struct Delivery {
    pub link: LinkId,
    pub delivery_id: u32,
    pub settled: bool,
    pub payload: Bytes,
}

/// The router's outcome of a device's unsettled send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Released or modified: not taken (no consumer), may be sent again.
    Released,
    /// Rejected, or no outcome given.
    Refused,
}

/// What a device hears from its connection.
#[derive(Debug)]
pub enum Ev {
    /// A delivery on one of the device's receiving links.
    Delivery(Delivery),
    /// The router's outcome of an unsettled send (by the device's tag).
    Outcome { tag: u64, outcome: Outcome },
    /// A sending link's credit: `credit` after `applied` of the device's sends on it.
    Credit {
        link: LinkId,
        credit: u32,
        applied: u64,
    },
    /// One of the device's links is gone.
    LinkClosed {
        link: LinkId,
        error: Option<Box<ErrorCondition>>,
    },
    /// The AMQP connection is gone.
    Closed,
}

type AttachReply = oneshot::Sender<Result<LinkId, Option<ErrorCondition>>>;

enum Cmd {
    Join {
        dev: u64,
        events: Outbox,
    },
    Attach {
        dev: u64,
        req: Box<AttachRequest>,
        credit: u32,
        reply: AttachReply,
    },
    Send {
        link: LinkId,
        tag: u64,
        msg: Bytes,
        /// The message's `to`, when its link is anonymous (the in-process path routes by it
        /// without reading the message again).
        to: Option<String>,
        settled: bool,
    },
    Settle {
        link: LinkId,
        delivery_id: u32,
        state: DeliveryState,
        credit: u32,
    },
    Credit {
        link: LinkId,
        add: u32,
    },
    Detach {
        link: LinkId,
        closed: bool,
    },
    Leave {
        dev: u64,
    },
}

/// Where the gateway's connections go: a router over AMQP (TCP, or an in-process pipe), or,
/// in standalone, the router's core in this process, spoken to in its own typed messages
/// ([`router::local`]; no AMQP encoding and decoding on either side).
#[derive(Debug, Clone)]
pub enum Upstream {
    Amqp(amqp::pipe::Dialer),
    /// Given once the router runs.
    #[cfg(feature = "in-process")]
    Core(tokio::sync::watch::Receiver<Option<router::local::Core>>),
}

impl From<amqp::pipe::Dialer> for Upstream {
    fn from(d: amqp::pipe::Dialer) -> Upstream {
        Upstream::Amqp(d)
    }
}

/// One pooled connection, as the pool sees it.
struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
    devices: Arc<AtomicUsize>,
}

/// The gateway's AMQP connections to the router.
pub struct Pool {
    router: Upstream,
    per_connection: usize,
    conns: Mutex<Vec<Handle>>,
    next_dev: AtomicU64,
}

impl Pool {
    pub fn new(router: impl Into<Upstream>, per_connection: usize) -> Arc<Pool> {
        let router = router.into();
        Arc::new(Pool {
            router,
            per_connection: per_connection.max(1),
            conns: Mutex::new(Vec::new()),
            next_dev: AtomicU64::new(1),
        })
    }

    /// A port for one device: on the least loaded live connection with room, or on a new one.
    pub async fn join(self: &Arc<Self>) -> Result<Port, ClientError> {
        let dev = self.next_dev.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = self.try_join(dev) {
            return Ok(p);
        }
        // Connected outside the lock; a race may open one connection more than needed.
        let (tx, rx) = mpsc::unbounded_channel();
        match &self.router {
            Upstream::Amqp(d) => {
                let client = Client::connect_via(d, CONTAINER, 1 << 16).await?;
                tokio::spawn(run(client, rx));
            }
            #[cfg(feature = "in-process")]
            Upstream::Core(core) => {
                let core = core
                    .clone()
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|c| c.clone())
                    .ok_or(ClientError::Closed(None))?;
                tokio::spawn(run_local(core, rx));
            }
        }
        let devices = Arc::new(AtomicUsize::new(0));
        if let Ok(mut g) = self.conns.lock() {
            g.retain(|h| !h.tx.is_closed());
            g.push(Handle {
                tx: tx.clone(),
                devices: devices.clone(),
            });
        }
        Ok(Port::new(dev, tx, devices))
    }

    fn try_join(&self, dev: u64) -> Option<Port> {
        let mut g = self.conns.lock().ok()?;
        g.retain(|h| !h.tx.is_closed());
        let h = g
            .iter()
            .filter(|h| h.devices.load(Ordering::Relaxed) < self.per_connection)
            .min_by_key(|h| h.devices.load(Ordering::Relaxed))?;
        Some(Port::new(dev, h.tx.clone(), h.devices.clone()))
    }

    /// AMQP connections open now.
    pub fn connections(&self) -> usize {
        self.conns.lock().map_or(0, |g| g.len())
    }
}

/// A device's access to its connection. Dropping it detaches the device's remaining links
/// (not closing: durable subscriptions stay).
pub struct Port {
    dev: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    devices: Arc<AtomicUsize>,
    pub events: Inbox,
    /// Per sending link: (credit reported, sends applied when reported, sends made). A
    /// device has one or two sending links: a vector, not a map.
    credit: Vec<(LinkId, (u32, u64, u64))>,
}

impl Port {
    fn new(dev: u64, tx: mpsc::UnboundedSender<Cmd>, devices: Arc<AtomicUsize>) -> Port {
        devices.fetch_add(1, Ordering::Relaxed);
        let (etx, events) = inbox();
        let _ = tx.send(Cmd::Join { dev, events: etx });
        Port {
            dev,
            tx,
            devices,
            events,
            credit: Vec::new(),
        }
    }

    fn sending(&self, link: LinkId) -> Option<&(u32, u64, u64)> {
        self.credit.iter().find(|(l, _)| *l == link).map(|(_, c)| c)
    }

    fn sending_mut(&mut self, link: LinkId) -> Option<&mut (u32, u64, u64)> {
        self.credit
            .iter_mut()
            .find(|(l, _)| *l == link)
            .map(|(_, c)| c)
    }

    /// This device's number, unique in the pool (for link names).
    pub fn id(&self) -> u64 {
        self.dev
    }

    fn cmd(&self, c: Cmd) -> Result<(), ClientError> {
        self.tx.send(c).map_err(|_| ClientError::Closed(None))
    }

    /// Attaches a link and waits for the router's answer; a receiver then gets `credit`.
    pub async fn attach(&mut self, req: AttachRequest, credit: u32) -> Result<LinkId, ClientError> {
        let (reply, answer) = oneshot::channel();
        let sender = req.role == Role::Sender;
        self.cmd(Cmd::Attach {
            dev: self.dev,
            req: Box::new(req),
            credit,
            reply,
        })?;
        let link = answer
            .await
            .map_err(|_| ClientError::Closed(None))?
            .map_err(ClientError::Refused)?;
        if sender {
            self.credit.retain(|(l, _)| *l != link);
            self.credit.push((link, (0, 0, 0)));
        }
        Ok(link)
    }

    /// Credit the device may still use on sending `link`.
    pub fn credit(&self, link: LinkId) -> u32 {
        self.sending(link).map_or(0, |&(c, applied, sent)| {
            let used = sent.saturating_sub(applied);
            u32::try_from(u64::from(c).saturating_sub(used)).unwrap_or(0)
        })
    }

    /// Records a credit report (call for every [`Ev::Credit`]).
    pub fn credit_report(&mut self, link: LinkId, credit: u32, applied: u64) {
        if let Some(c) = self.sending_mut(link) {
            c.0 = credit;
            c.1 = applied;
        }
    }

    /// Sends on `link` (within [`Port::credit`]); an unsettled send's outcome comes back as
    /// [`Ev::Outcome`] with `tag`.
    pub fn send(
        &mut self,
        link: LinkId,
        tag: u64,
        msg: Bytes,
        to: Option<String>,
        settled: bool,
    ) -> Result<(), ClientError> {
        if let Some(c) = self.sending_mut(link) {
            c.2 += 1;
        }
        self.cmd(Cmd::Send {
            link,
            tag,
            msg,
            to,
            settled,
        })
    }

    /// Settles a delivery the device received, granting `credit` more on its link.
    pub fn settle(
        &self,
        link: LinkId,
        delivery_id: u32,
        state: DeliveryState,
        credit: u32,
    ) -> Result<(), ClientError> {
        self.cmd(Cmd::Settle {
            link,
            delivery_id,
            state,
            credit,
        })
    }

    /// Grants `add` more credit on receiving `link`.
    pub fn add_credit(&self, link: LinkId, add: u32) -> Result<(), ClientError> {
        self.cmd(Cmd::Credit { link, add })
    }

    /// Detaches a link; `closed` ends its terminus (a durable subscription is deleted).
    pub fn detach(&mut self, link: LinkId, closed: bool) -> Result<(), ClientError> {
        self.credit.retain(|(l, _)| *l != link);
        self.cmd(Cmd::Detach { link, closed })
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Leave { dev: self.dev });
        self.devices.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the connection's task keeps about one link.
struct LinkState {
    dev: u64,
    /// Sends the device made on it that were applied (for [`Ev::Credit`]).
    applied: u64,
}

/// An attach sent, waiting for the router's answer.
struct Pending {
    dev: u64,
    credit: u32,
    reply: Option<AttachReply>,
    refused: bool,
}

/// The calls the multiplexer makes on its connection: the AMQP client engine's, or an
/// in-process connection's ([`router::local::Conn`]), which answers with the same events.
trait Engine {
    fn attach(&mut self, req: AttachRequest) -> Option<LinkId>;
    /// An unsettled send's outcome comes as a disposition for the returned delivery id.
    fn send(
        &mut self,
        link: LinkId,
        tag: u64,
        msg: Bytes,
        to: Option<String>,
        settled: bool,
    ) -> Option<u32>;
    fn settle(&mut self, link: LinkId, delivery_id: u32, state: DeliveryState);
    fn receiver_credit(&self, link: LinkId) -> u32;
    fn set_credit(&mut self, link: LinkId, credit: u32);
    fn detach(&mut self, link: LinkId, closed: bool);
}

impl Engine for Client {
    fn attach(&mut self, req: AttachRequest) -> Option<LinkId> {
        self.conn.attach(self.channel, req)
    }
    fn send(
        &mut self,
        link: LinkId,
        tag: u64,
        msg: Bytes,
        _to: Option<String>,
        settled: bool,
    ) -> Option<u32> {
        self.conn.send(link, &tag.to_be_bytes(), &msg, settled, 0)
    }
    fn settle(&mut self, link: LinkId, delivery_id: u32, state: DeliveryState) {
        self.conn.disposition(link, delivery_id, true, Some(state));
    }
    fn receiver_credit(&self, link: LinkId) -> u32 {
        self.conn.receiver_credit(link)
    }
    fn set_credit(&mut self, link: LinkId, credit: u32) {
        self.conn.set_credit(link, credit, false);
    }
    fn detach(&mut self, link: LinkId, closed: bool) {
        self.conn.detach(link, None, closed);
    }
}

#[cfg(feature = "in-process")]
impl Engine for router::local::Conn {
    fn attach(&mut self, req: AttachRequest) -> Option<LinkId> {
        router::local::Conn::attach(self, req)
    }
    fn send(
        &mut self,
        link: LinkId,
        _tag: u64,
        msg: Bytes,
        to: Option<String>,
        settled: bool,
    ) -> Option<u32> {
        router::local::Conn::send(self, link, msg, to, settled)
    }
    fn settle(&mut self, _link: LinkId, delivery_id: u32, state: DeliveryState) {
        self.disposition(delivery_id, state);
    }
    fn receiver_credit(&self, link: LinkId) -> u32 {
        router::local::Conn::receiver_credit(self, link)
    }
    fn set_credit(&mut self, link: LinkId, credit: u32) {
        router::local::Conn::set_credit(self, link, credit);
    }
    fn detach(&mut self, link: LinkId, closed: bool) {
        router::local::Conn::detach(self, link, closed);
    }
}

/// Maps keyed by ids the gateway or its engine hands out: a fast hash (no peer picks them).
type IdMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

struct Mux<E> {
    engine: E,
    devices: IdMap<u64, Outbox>,
    links: IdMap<LinkId, LinkState>,
    pending: IdMap<LinkId, Pending>,
    /// Unsettled sends by delivery id: (device, its tag).
    sent: IdMap<u32, (u64, u64)>,
    /// Attaches accepted but not yet told to their devices (see [`Mux::answer_attaches`]).
    accepted: Vec<(LinkId, AttachReply)>,
}

/// Most commands handled before the connection's output is written (and its input read).
const BATCH: usize = 256;

/// Drives one pooled connection until the router closes it or it fails; every device on it
/// then hears [`Ev::Closed`].
async fn run(client: Client, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut m = Mux::new(client);
    let r = m.serve(&mut rx).await;
    m.finish(r, rx);
}

/// [`run`] for a connection to the core in this process.
#[cfg(feature = "in-process")]
async fn run_local(core: router::local::Core, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let (conn, mut from_core) = router::local::Conn::open(CONTAINER, &core);
    let mut m = Mux::new(conn);
    let r = m.serve_local(&core, &mut from_core, &mut rx).await;
    let mut last = m.engine.take_output();
    last.extend(m.engine.close());
    let _ = core.core.send(last).await;
    m.finish(r, rx);
}

impl<E: Engine> Mux<E> {
    fn new(engine: E) -> Mux<E> {
        Mux {
            engine,
            devices: IdMap::default(),
            links: IdMap::default(),
            pending: IdMap::default(),
            sent: IdMap::default(),
            accepted: Vec::new(),
        }
    }

    /// After the connection ended: every device hears it, every attach waiting is refused.
    fn finish(mut self, r: Result<(), ClientError>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let m = &mut self;
        if let Err(e) = &r {
            tracing::info!("gateway connection to the router ended: {e}");
        }
        rx.close();
        while let Ok(c) = rx.try_recv() {
            if let Cmd::Join { events, .. } = c {
                events.send(Ev::Closed);
            }
        }
        for (_, d) in m.devices.drain() {
            d.send(Ev::Closed);
        }
        for (_, p) in m.pending.drain() {
            if let Some(r) = p.reply {
                let _ = r.send(Err(None));
            }
        }
        for (_, r) in m.accepted.drain(..) {
            let _ = r.send(Err(None));
        }
    }
}

#[cfg(feature = "in-process")]
impl Mux<router::local::Conn> {
    async fn serve_local(
        &mut self,
        core: &router::local::Core,
        from_core: &mut mpsc::UnboundedReceiver<Vec<router::core::ToConn>>,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> Result<(), ClientError> {
        loop {
            let out = self.engine.take_output();
            if !out.is_empty() && core.core.send(out).await.is_err() {
                return Err(ClientError::Closed(None));
            }
            if !self.accepted.is_empty() {
                // Answering may detach (a device gone): that output goes first.
                self.answer_attaches();
                continue;
            }
            // Devices' sends wait while the core holds too much of this connection's (the
            // TCP read pause of a network connection); the core's batches never do.
            let paused = self.engine.paused();
            tokio::select! {
                batch = from_core.recv() => {
                    let Some(batch) = batch else {
                        return Err(ClientError::Closed(None));
                    };
                    self.engine.apply(batch);
                    while let Ok(b) = from_core.try_recv() {
                        self.engine.apply(b);
                    }
                    while let Some(e) = self.engine.poll_event() {
                        self.on_event(e)?;
                    }
                }
                cmd = rx.recv(), if !paused => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.take_batch(cmd, rx).await;
                }
                _ = tokio::time::sleep(std::time::Duration::from_millis(2)), if paused => {}
            }
        }
    }
}

impl Mux<Client> {
    async fn serve(&mut self, rx: &mut mpsc::UnboundedReceiver<Cmd>) -> Result<(), ClientError> {
        loop {
            let next = self.engine.conn.tick(Instant::now())?;
            self.engine.flush().await?;
            if !self.accepted.is_empty() {
                self.answer_attaches();
                continue;
            }
            let c = &mut self.engine;
            tokio::select! {
                r = c.stream.read_buf(&mut c.inbuf) => {
                    if r? == 0 {
                        return Err(ClientError::Closed(None));
                    }
                    let res = c.conn.handle_input(&mut c.inbuf, Instant::now());
                    while let Some(e) = self.engine.conn.poll_event() {
                        self.on_event(e)?;
                    }
                    let c = &mut self.engine;
                    if c.inbuf.capacity() - c.inbuf.len() < 4096 {
                        c.inbuf.reserve(1 << 16);
                    }
                    res?;
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    self.take_batch(cmd, rx).await;
                }
                _ = sleep_until(next) => {}
            }
        }
    }
}

impl<E: Engine> Mux<E> {
    /// Handles `cmd` and a batch of the commands behind it.
    async fn take_batch(&mut self, cmd: Cmd, rx: &mut mpsc::UnboundedReceiver<Cmd>) {
        self.on_cmd(cmd);
        if self.take_cmds(rx, BATCH - 1) < BATCH - 1 {
            // A device that sends wakes this task at once (tokio runs the woken task next):
            // passing its send on now would cost a write (or a batch to the core) per
            // message. The other devices ready to run go first, and one batch carries what
            // they send.
            requeue().await;
            self.take_cmds(rx, BATCH);
        }
    }

    /// Handles up to `n` commands that are waiting; how many there were.
    fn take_cmds(&mut self, rx: &mut mpsc::UnboundedReceiver<Cmd>, n: usize) -> usize {
        for i in 0..n {
            match rx.try_recv() {
                Ok(cmd) => self.on_cmd(cmd),
                Err(_) => return i,
            }
        }
        n
    }

    /// Tells the devices whose attaches were accepted. Called once what accepting them
    /// produced (the new links' credit) has gone to the router: a device woken first would be
    /// run only after the router's task, and whatever that wakes in turn (the broker storing
    /// the new subscription), since the runtime runs the task woken last first. A SUBSCRIBE's
    /// SUBACK waited ~4 µs more for that (design.md §9, CONNECT rate).
    fn answer_attaches(&mut self) {
        for (link, reply) in std::mem::take(&mut self.accepted) {
            if reply.send(Ok(link)).is_err() {
                // Its device stopped waiting.
                self.links.remove(&link);
                self.engine.detach(link, false);
            }
        }
    }

    fn tell(&self, dev: u64, e: Ev) {
        if let Some(d) = self.devices.get(&dev) {
            d.send(e);
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        let conn = &mut self.engine;
        match c {
            Cmd::Join { dev, events } => {
                self.devices.insert(dev, events);
            }
            Cmd::Attach {
                dev,
                req,
                credit,
                reply,
            } => match conn.attach(*req) {
                Some(link) => {
                    self.pending.insert(
                        link,
                        Pending {
                            dev,
                            credit,
                            reply: Some(reply),
                            refused: false,
                        },
                    );
                }
                None => {
                    let _ = reply.send(Err(None));
                }
            },
            Cmd::Send {
                link,
                tag,
                msg,
                to,
                settled,
            } => {
                let Some(l) = self.links.get_mut(&link) else {
                    return;
                };
                l.applied += 1;
                let dev = l.dev;
                match conn.send(link, tag, msg, to, settled) {
                    Some(id) if !settled => {
                        self.sent.insert(id, (dev, tag));
                    }
                    Some(_) => {}
                    None => {
                        // Over credit (the device miscounted) or the link is going: refused.
                        if !settled {
                            self.tell(
                                dev,
                                Ev::Outcome {
                                    tag,
                                    outcome: Outcome::Released,
                                },
                            );
                        }
                    }
                }
            }
            Cmd::Settle {
                link,
                delivery_id,
                state,
                credit,
            } => {
                conn.settle(link, delivery_id, state);
                if credit > 0 && self.links.contains_key(&link) {
                    let c = conn.receiver_credit(link);
                    conn.set_credit(link, c.saturating_add(credit));
                }
            }
            Cmd::Credit { link, add } => {
                if self.links.contains_key(&link) {
                    let c = conn.receiver_credit(link);
                    conn.set_credit(link, c.saturating_add(add));
                }
            }
            Cmd::Detach { link, closed } => {
                if self.links.remove(&link).is_some() {
                    conn.detach(link, closed);
                }
            }
            Cmd::Leave { dev } => {
                self.devices.remove(&dev);
                let gone: Vec<LinkId> = self
                    .links
                    .iter()
                    .filter(|(_, l)| l.dev == dev)
                    .map(|(k, _)| *k)
                    .collect();
                for link in gone {
                    self.links.remove(&link);
                    conn.detach(link, false);
                }
                // Attaches still waiting are detached when answered (their device is gone).
            }
        }
    }

    fn on_event(&mut self, e: Event) -> Result<(), ClientError> {
        match e {
            Event::Attach { link, attach } => {
                let Some(p) = self.pending.get_mut(&link) else {
                    return Ok(());
                };
                let refused = match attach.role {
                    Role::Receiver => attach.target.is_none(),
                    Role::Sender => attach.source.is_none(),
                };
                if refused {
                    // The detach with the reason follows.
                    p.refused = true;
                    return Ok(());
                }
                let (dev, credit, reply) = (p.dev, p.credit, p.reply.take());
                self.pending.remove(&link);
                let conn = &mut self.engine;
                if !self.devices.contains_key(&dev) {
                    conn.detach(link, false);
                    return Ok(());
                }
                if credit > 0 {
                    conn.set_credit(link, credit);
                }
                self.links.insert(link, LinkState { dev, applied: 0 });
                match reply {
                    Some(r) => self.accepted.push((link, r)),
                    // Its device stopped waiting.
                    None => {
                        self.links.remove(&link);
                        self.engine.detach(link, false);
                    }
                }
            }
            Event::Credit { link, credit, .. } => {
                if let Some(l) = self.links.get(&link) {
                    self.tell(
                        l.dev,
                        Ev::Credit {
                            link,
                            credit,
                            applied: l.applied,
                        },
                    );
                }
            }
            Event::Delivery(d) => match self.links.get(&d.link) {
                Some(l) => self.tell(
                    l.dev,
                    Ev::Delivery(Delivery {
                        link: d.link,
                        delivery_id: d.delivery_id,
                        settled: d.settled,
                        payload: d.payload,
                    }),
                ),
                None => {
                    // Its device left or detached it: give the message back.
                    if !d.settled {
                        self.engine
                            .settle(d.link, d.delivery_id, DeliveryState::Released);
                    }
                }
            },
            Event::Disposition {
                role: Role::Receiver,
                first,
                last,
                state,
                ..
            } => {
                let outcome = match state {
                    Some(DeliveryState::Accepted) => Outcome::Accepted,
                    Some(DeliveryState::Released) | Some(DeliveryState::Modified { .. }) => {
                        Outcome::Released
                    }
                    _ => Outcome::Refused,
                };
                let span = last.wrapping_sub(first) as usize;
                if span < self.sent.len() {
                    let mut id = first;
                    loop {
                        if let Some((dev, tag)) = self.sent.remove(&id) {
                            self.tell(dev, Ev::Outcome { tag, outcome });
                        }
                        if id == last {
                            break;
                        }
                        id = id.wrapping_add(1);
                    }
                } else {
                    // A wide range: walk what is outstanding instead.
                    let mut done = Vec::new();
                    self.sent.retain(|&id, x| {
                        let inside = id.wrapping_sub(first) <= last.wrapping_sub(first);
                        if inside {
                            done.push(*x);
                        }
                        !inside
                    });
                    for (dev, tag) in done {
                        self.tell(dev, Ev::Outcome { tag, outcome });
                    }
                }
            }
            Event::LinkClosed { link, error, .. } => {
                if let Some(mut p) = self.pending.remove(&link) {
                    if let Some(r) = p.reply.take() {
                        let _ = r.send(Err(error));
                    }
                } else if let Some(l) = self.links.remove(&link) {
                    let error = error.map(Box::new);
                    self.tell(l.dev, Ev::LinkClosed { link, error });
                }
            }
            Event::Closed(e) => return Err(ClientError::Closed(e)),
            _ => {}
        }
        Ok(())
    }
}

/// A device's event queue, unbounded like the channels above (and bounded the same way), but
/// allocating nothing while empty: a tokio channel preallocates a block of 32 events per
/// device, and most devices are idle. It also carries the device's takeover signals
/// ([`Takeover`]), so that an idle device waits on one waker for everything that can wake it
/// besides its socket and its timer.
pub struct Inbox {
    shared: Arc<InboxShared>,
}

/// The connection's end of an [`Inbox`]; dropping it closes the inbox.
struct Outbox {
    shared: Arc<InboxShared>,
}

/// The signals that another connection took a device's client id over (`kicked`), and that
/// the device let its links go (`gone`), which the later connection waits for: its links
/// have the same names (a persistent session's) and may share the AMQP connection.
#[derive(Clone)]
pub struct Takeover {
    shared: Arc<InboxShared>,
}

/// Flags are set before the lock is taken to wake, and read under it before a waker is
/// left, so that no wake-up is lost.
struct InboxShared {
    state: Mutex<InboxState>,
    closed: AtomicBool,
    kicked: AtomicBool,
    gone: AtomicBool,
    /// The device's keep-alive ran out ([`Takeover::sweep`]).
    expired: AtomicBool,
    /// How long the device may stay silent, in ms (0: as long as it likes).
    keep_alive_ms: AtomicU32,
    /// When it was last heard, on [`clock_ms`].
    heard_ms: AtomicU64,
}

#[derive(Default)]
struct InboxState {
    queue: VecDeque<Ev>,
    /// The device's task (its inbox, or its kick once its session is over).
    waker: Option<Waker>,
    /// The connection that took over, waiting for `gone`.
    gone_waker: Option<Waker>,
}

fn inbox() -> (Outbox, Inbox) {
    let shared = Arc::new(InboxShared {
        state: Mutex::new(InboxState::default()),
        closed: AtomicBool::new(false),
        kicked: AtomicBool::new(false),
        gone: AtomicBool::new(false),
        expired: AtomicBool::new(false),
        keep_alive_ms: AtomicU32::new(0),
        heard_ms: AtomicU64::new(0),
    });
    (
        Outbox {
            shared: shared.clone(),
        },
        Inbox { shared },
    )
}

impl InboxShared {
    /// Runs `f` on the state, then wakes the device's task if `f` says so.
    fn wake_after(&self, f: impl FnOnce(&mut InboxState) -> Option<Waker>) {
        let w = self.state.lock().ok().and_then(|mut g| f(&mut g));
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Ready when `flag` is set; otherwise `cx`'s waker is left in the slot `slot` picks.
    fn poll_flag(
        &self,
        cx: &mut Context<'_>,
        flag: &AtomicBool,
        slot: fn(&mut InboxState) -> &mut Option<Waker>,
    ) -> Poll<()> {
        let Ok(mut g) = self.state.lock() else {
            return Poll::Ready(());
        };
        if flag.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        set_waker(slot(&mut g), cx);
        Poll::Pending
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &mut Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl Outbox {
    fn send(&self, e: Ev) {
        self.shared.wake_after(|s| {
            s.queue.push_back(e);
            s.waker.take()
        });
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake_after(|s| s.waker.take());
    }
}

/// What woke a device waiting on its inbox.
pub enum Woken {
    Event(Ev),
    /// Its connection is gone and every event was read.
    Closed,
    /// Another connection took its client id over.
    Kicked,
    /// Its keep-alive ran out.
    Expired,
}

impl Inbox {
    /// The next event; `None` once the connection dropped its end and all was read.
    pub async fn recv(&mut self) -> Option<Ev> {
        std::future::poll_fn(|cx| {
            self.poll_woken(cx, false).map(|w| match w {
                Woken::Event(e) => Some(e),
                Woken::Closed | Woken::Kicked | Woken::Expired => None,
            })
        })
        .await
    }

    /// The next event, or the end of the inbox, or (with `kick`) a takeover.
    pub fn poll_woken(&mut self, cx: &mut Context<'_>, kick: bool) -> Poll<Woken> {
        let Ok(mut g) = self.shared.state.lock() else {
            return Poll::Ready(Woken::Closed);
        };
        if let Some(e) = pop(&mut g.queue) {
            return Poll::Ready(Woken::Event(e));
        }
        if self.shared.closed.load(Ordering::Acquire) {
            return Poll::Ready(Woken::Closed);
        }
        if kick && self.shared.kicked.load(Ordering::Acquire) {
            return Poll::Ready(Woken::Kicked);
        }
        if kick && self.shared.expired.load(Ordering::Acquire) {
            return Poll::Ready(Woken::Expired);
        }
        set_waker(&mut g.waker, cx);
        Poll::Pending
    }

    /// Has the gateway's sweeper watch the device's keep-alive from `now` on: it must be
    /// heard within `ms` (0: never checked), or it wakes [`Woken::Expired`]. One sweep of
    /// every device a second replaces a timer per device set and cancelled around every
    /// packet it sends.
    pub fn keep_alive(&self, ms: u32, now: Instant) {
        self.heard(now);
        self.shared.keep_alive_ms.store(ms, Ordering::Release);
    }

    /// The device was heard at `now` (late or not: a keep-alive that ran out while its
    /// packets waited unread is forgiven).
    pub fn heard(&self, now: Instant) {
        self.shared.heard_ms.store(clock_ms(now), Ordering::Release);
        if self.shared.expired.load(Ordering::Relaxed) {
            self.shared.expired.store(false, Ordering::Release);
        }
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Ev> {
        pop(&mut self.shared.state.lock().ok()?.queue)
    }

    /// The device's takeover signals (for the gateway's client registry).
    pub fn takeover(&self) -> Takeover {
        Takeover {
            shared: self.shared.clone(),
        }
    }
}

fn pop(q: &mut VecDeque<Ev>) -> Option<Ev> {
    let e = q.pop_front();
    if q.is_empty() && q.capacity() > 8 {
        // A burst is over: give its room back (idle devices hold nothing).
        q.shrink_to(0);
    }
    e
}

impl Takeover {
    /// Flags the device and wakes it once its keep-alive ran out at `now_ms` ([`clock_ms`]).
    pub fn sweep(&self, now_ms: u64) {
        let s = &self.shared;
        let limit = u64::from(s.keep_alive_ms.load(Ordering::Acquire));
        if limit > 0
            && !s.expired.load(Ordering::Acquire)
            && now_ms.saturating_sub(s.heard_ms.load(Ordering::Acquire)) > limit
        {
            s.expired.store(true, Ordering::Release);
            s.wake_after(|st| st.waker.take());
        }
    }

    /// A later connection takes the client id over.
    pub fn kick(&self) {
        self.shared.kicked.store(true, Ordering::Release);
        self.shared.wake_after(|s| s.waker.take());
    }

    /// Returns once kicked (at once if already); for the device's task only, once it no
    /// longer waits on its inbox (they share a waker slot).
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            self.shared
                .poll_flag(cx, &self.shared.kicked, |s| &mut s.waker)
        })
        .await
    }

    /// The device let its links go (its port dropped).
    pub fn gone(&self) {
        self.shared.gone.store(true, Ordering::Release);
        self.shared.wake_after(|s| s.gone_waker.take());
    }

    /// Returns once [`Takeover::gone`] was called (at once if it was).
    pub async fn wait_gone(&self) {
        std::future::poll_fn(|cx| {
            self.shared
                .poll_flag(cx, &self.shared.gone, |s| &mut s.gone_waker)
        })
        .await
    }
}

/// Puts the task at the back of the run queue once. Unlike `tokio::task::yield_now`, which
/// also makes the worker poll for I/O first (an `epoll_wait` per call, what a quiet gateway
/// pays per CONNECT), a task that wakes itself while it runs is queued behind the others.
async fn requeue() {
    let mut once = false;
    std::future::poll_fn(|cx| {
        if once {
            return Poll::Ready(());
        }
        once = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Milliseconds since the gateway's clock started (the first call), for keep-alive checks.
pub fn clock_ms(at: Instant) -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn poll(i: &mut Inbox) -> Poll<Woken> {
        let mut cx = Context::from_waker(Waker::noop());
        i.poll_woken(&mut cx, true)
    }

    #[test]
    fn the_sweeper_expires_a_silent_device_only() {
        let (_out, mut inbox) = inbox();
        let t = inbox.takeover();
        let start = Instant::now();
        // No keep-alive set: never expires.
        t.sweep(clock_ms(start + Duration::from_secs(3600)));
        assert!(poll(&mut inbox).is_pending());
        inbox.keep_alive(1500, start);
        t.sweep(clock_ms(start + Duration::from_millis(1400)));
        assert!(poll(&mut inbox).is_pending(), "within its keep-alive");
        t.sweep(clock_ms(start + Duration::from_millis(1600)));
        assert!(matches!(poll(&mut inbox), Poll::Ready(Woken::Expired)));
        // Heard before it acted on it (its packets were waiting unread): forgiven.
        inbox.heard(start + Duration::from_millis(1600));
        assert!(poll(&mut inbox).is_pending());
        t.sweep(clock_ms(start + Duration::from_millis(3000)));
        assert!(poll(&mut inbox).is_pending(), "heard 1.4 s before");
        // Plain receiving (no kick) never ends on an expiry.
        t.sweep(clock_ms(start + Duration::from_millis(3200)));
        assert!(matches!(poll(&mut inbox), Poll::Ready(Woken::Expired)));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(inbox.poll_woken(&mut cx, false).is_pending());
    }
}
