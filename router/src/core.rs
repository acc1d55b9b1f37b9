//! The routing core: the single owner of the address table, of every link's routing state and
//! of deliveries in flight. Connection tasks talk to it in batches of [`ToCore`] messages and
//! it answers in batches of [`ToConn`] messages, one batch per connection per round
//! (Qpid Dispatch / skupper-router style: a single-threaded core fed by an action queue).
//!
//! Credit is end to end: a producer is granted credit (up to `link_capacity`) only while its
//! address has a consumer; a delivery waits in the address's pending queue until some consumer
//! has credit, and only leaving that queue frees the producer's credit again. So the memory the
//! core holds per producer is bounded by its capacity.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use amqp::{DeliveryState, ErrorCondition, LinkId, condition};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use broker::queue::Outcome as StoreOutcome;
use broker::service::{Delivery as StoreDelivery, Request as StoreRequest, StoreError, Tag};

use crate::placement::Placement;

use crate::addresses::{Origin, Rule, Rules};
use crate::config::{AddressDecl, AddressType, Limits};

pub type ConnId = u64;

/// A link anywhere in the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkRef {
    pub conn: ConnId,
    pub link: LinkId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The client sends: the router receives on this link.
    Producer,
    /// The client receives.
    Consumer,
}

/// Sent by connection tasks.
#[derive(Debug)]
pub enum ToCore {
    ConnOpened {
        conn: ConnId,
        tx: mpsc::UnboundedSender<Vec<ToConn>>,
        remote: String,
        container_id: String,
        /// Bytes of deliveries the core handed to this connection and it has not written yet.
        out_bytes: Arc<AtomicUsize>,
        /// Bytes this connection handed to the core that the core still holds.
        in_bytes: Arc<AtomicUsize>,
    },
    /// The connection's unwritten bytes fell below the budget again.
    Writable {
        conn: ConnId,
    },
    ConnClosed {
        conn: ConnId,
    },
    Attach {
        link: LinkRef,
        dir: Dir,
        name: String,
        /// `None`: a producer on the anonymous relay (per-message `to`).
        address: Option<String>,
        /// A consumer that asked for presettled deliveries.
        presettled: bool,
        /// A consumer whose source is durable with expiry-policy never (a durable
        /// subscription on a topic).
        durable: bool,
        /// A consumer whose source has the `shared` capability (subscription shared across
        /// connections, named by the link name alone).
        shared: bool,
        /// A durable source with an expiry policy other than `never` and a timeout: how long
        /// its subscription outlives its consumers.
        keep_ms: Option<u64>,
    },
    Detach {
        link: LinkRef,
        /// The peer's detach was closing (AMQP `closed`): a durable subscription behind the
        /// link ends with it (JMS unsubscribe).
        closed: bool,
    },
    /// Messages the broker hands to consumers.
    StoreDeliveries(Vec<StoreDelivery>),
    /// Store requests that became durable (or failed).
    Stored(Vec<(Tag, Result<(), StoreError>)>),
    /// The broker connection is gone (or was when these consumers attached): their links are
    /// detached with an error that tells the client to reattach.
    StoreLost {
        consumers: Vec<u64>,
    },
    /// A consumer's credit: it accepts deliveries up to sequence number `limit`.
    ConsumerCredit {
        link: LinkRef,
        limit: u32,
        drain: bool,
    },
    Deliver {
        link: LinkRef,
        delivery_id: u32,
        settled: bool,
        /// For the anonymous relay: the message's `to`.
        to: Option<String>,
        payload: Bytes,
        format: u32,
    },
    /// A consumer's outcome for an unsettled delivery (`dlv` is the core's id).
    Outcome {
        dlv: u64,
        state: DeliveryState,
        /// The consumer settles second: tell its connection (`ToConn::Confirm`) once the
        /// outcome has taken effect (for a queue: once the acknowledgement is durable).
        confirm: Option<LinkRef>,
    },
    Mgmt(Mgmt),
}

impl ToCore {
    /// Gives delivery `dlv` back to the core (released): its link went away, or its credit,
    /// after the core chose it, and its producer must still hear about it.
    pub fn give_back(dlv: u64) -> ToCore {
        ToCore::Outcome {
            dlv,
            state: DeliveryState::Released,
            confirm: None,
        }
    }
}

/// Sent to connection tasks.
#[derive(Debug)]
pub enum ToConn {
    AttachOk {
        link: LinkId,
    },
    AttachRefused {
        link: LinkId,
        error: ErrorCondition,
    },
    /// More credit for a producer link.
    AddCredit {
        link: LinkId,
        n: u32,
    },
    /// Producer credit taken back (the last consumer went away).
    RevokeCredit {
        link: LinkId,
    },
    Deliver {
        link: LinkId,
        /// `None`: send presettled.
        dlv: Option<u64>,
        payload: Bytes,
        format: u32,
    },
    Outcome {
        link: LinkId,
        delivery_id: u32,
        state: DeliveryState,
    },
    DrainDone {
        link: LinkId,
    },
    /// The outcome of delivery `dlv` took effect: the connection may settle it.
    Confirm {
        dlv: u64,
    },
    Close {
        error: ErrorCondition,
    },
    /// Detach a link from the router's side (closed, with this error).
    Detach {
        link: LinkId,
        error: ErrorCondition,
    },
}

/// Management requests (HTTP API and CLI go through these).
#[derive(Debug)]
pub enum Mgmt {
    Snapshot(oneshot::Sender<Snapshot>),
    AddAddress(AddressDecl, oneshot::Sender<Result<(), String>>),
    RemoveAddress(String, oneshot::Sender<bool>),
    /// Counters of the broker's queues (empty without a broker).
    /// The queues whose address starts with the prefix.
    Queues(String, oneshot::Sender<Vec<broker::shard::QueueInfo>>),
    /// Removes a queue's ready messages; false without a broker.
    Purge(String, oneshot::Sender<bool>),
    /// Which shard serves an address: (its type, the shard; None when not brokered).
    Placement(String, oneshot::Sender<(AddressType, Option<usize>, usize)>),
    Shutdown(ErrorCondition),
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub id: ConnId,
    pub remote: String,
    pub container_id: String,
    pub links: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkInfo {
    pub connection: ConnId,
    pub name: String,
    /// As seen by the client.
    pub role: &'static str,
    pub address: Option<String>,
    pub credit: i64,
    pub unsettled: usize,
    pub deliveries: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AddressStats {
    pub address: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub producers: usize,
    pub consumers: usize,
    pub pending: usize,
    #[serde(flatten)]
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub connections: Vec<ConnectionInfo>,
    pub links: Vec<LinkInfo>,
    pub rules: Vec<Rule>,
    pub addresses: Vec<AddressStats>,
}

struct Conn {
    tx: mpsc::UnboundedSender<Vec<ToConn>>,
    remote: String,
    container_id: String,
    links: usize,
    out_bytes: Arc<AtomicUsize>,
    in_bytes: Arc<AtomicUsize>,
}

struct Producer {
    name: String,
    /// Shared, so that each delivery names its address without an allocation.
    address: Option<Arc<str>>,
    /// Credit the producer holds as far as the core knows.
    outstanding: u32,
    /// Its deliveries waiting in pending queues.
    held: u32,
    deliveries: u64,
}

struct Consumer {
    name: String,
    /// The address record's name, shared (no copy per consumer or per delivery).
    address: Arc<str>,
    limit: u32,
    dispatched: u32,
    drain: bool,
    presettled: bool,
    deliveries: u64,
    /// Deliveries sent and not yet settled by this consumer.
    unsettled: u32,
    /// Set for a consumer of a queue or topic address: its id at the broker.
    store_id: Option<u64>,
    /// The durable subscription (container-id:link-name) this consumer reads, which a
    /// closing detach removes.
    durable_sub: Option<String>,
    /// Credit given up by drains: the broker counts deliveries, the link's delivery-count also
    /// moves by drained credit, so limits sent to the broker are shifted back by this.
    store_offset: u32,
    /// Multicast copies waiting for this consumer's credit (bounded by link capacity and by
    /// the connection buffer budget in bytes); boxed at the first one (most consumers never
    /// have any).
    mc: Option<Box<McQueue>>,
}

#[derive(Default)]
struct McQueue {
    queue: VecDeque<(Bytes, u32)>,
    bytes: usize,
}

impl Consumer {
    fn credit(&self) -> u32 {
        let c = self.limit.wrapping_sub(self.dispatched);
        if (c as i32) < 0 { 0 } else { c }
    }
}

struct Pending {
    producer: LinkRef,
    delivery_id: u32,
    settled: bool,
    payload: Bytes,
    format: u32,
}

struct Address {
    /// The key again, shared with deliveries in flight (no allocation per delivery).
    name: Arc<str>,
    kind: AddressType,
    producers: Vec<LinkRef>,
    consumers: Vec<LinkRef>,
    rr: usize,
    pending: VecDeque<Pending>,
    /// Its consumers: `consumers.len()` for a routed address, the broker's consumers through
    /// this router for a brokered one.
    consumer_count: usize,
    /// Allocated at the first delivery: an idle device's topic never sees one.
    counters: Option<Box<Counters>>,
    /// The queue policy from its declaration was sent to the broker while this record lives.
    store_declared: bool,
}

/// An address's traffic counters (reported in [`AddressStats`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub unsettled: u64,
    pub deliveries_in: u64,
    pub deliveries_out: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub released: u64,
    pub modified: u64,
    pub dropped: u64,
}

impl Address {
    fn counters(&mut self) -> &mut Counters {
        self.counters.get_or_insert_with(Box::default)
    }
}

/// What a consumer asked for in its attach, beyond its address.
#[derive(Debug, Clone, Copy, Default)]
struct LinkOptions {
    /// Presettled deliveries (snd-settle-mode settled).
    presettled: bool,
    /// Durable source with expiry-policy never.
    durable: bool,
    /// The `shared` source capability.
    shared: bool,
    /// A durable source with an expiry policy other than `never`: how long the subscription
    /// is kept without a consumer (the source's `timeout`).
    keep_ms: Option<u64>,
}

/// Where a delivery in flight to a consumer came from, and so where its outcome goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InFrom {
    Producer { link: LinkRef, delivery_id: u32 },
    Store { consumer: u64, seq: u64 },
}

struct InFlight {
    from: InFrom,
    consumer: LinkRef,
    address: Arc<str>,
}

/// A message handed to the broker and not yet durable.
struct Storing {
    producer: LinkRef,
    delivery_id: u32,
    settled: bool,
    len: usize,
}

/// Maps keyed by ids the router hands out itself: a fast hash (no peer picks these keys).
type IdMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

pub struct Core {
    limits: Limits,
    rules: Rules,
    conns: IdMap<ConnId, Conn>,
    producers: IdMap<LinkRef, Producer>,
    /// Boxed (as `addresses`): a table grown for 15k entries keeps up to twice as many slots.
    consumers: IdMap<LinkRef, Box<Consumer>>,
    addresses: HashMap<Arc<str>, Box<Address>>,
    inflight: IdMap<u64, InFlight>,
    next_dlv: u64,
    outbox: IdMap<ConnId, Vec<ToConn>>,
    /// Addresses declared by config or API keep their statistics while idle.
    declared: std::collections::HashSet<String>,
    /// The broker shard serving queue and topic addresses, when there is one.
    store: Option<Placement>,
    storing: IdMap<Tag, Storing>,
    next_tag: Tag,
    store_consumers: IdMap<u64, LinkRef>,
    next_store_consumer: u64,
    /// Acknowledgements on their way to durability, for consumers that settle second.
    confirming: IdMap<Tag, (LinkRef, u64)>,
}

/// The broker's name for the subscription behind a declared `subscription` address (its own
/// namespace: consumer-made subscriptions are named `container:link`, `shared:link`, `link:N`).
fn declared_subscription(address: &str) -> String {
    format!("address:{address}")
}

fn released() -> DeliveryState {
    DeliveryState::Released
}

fn failed() -> DeliveryState {
    DeliveryState::Modified {
        delivery_failed: true,
        undeliverable_here: false,
        message_annotations: None,
    }
}

impl Core {
    pub fn new(limits: Limits, rules: Rules, store: Option<Placement>) -> Self {
        let declared = rules
            .list()
            .into_iter()
            .filter_map(|r| r.decl.name)
            .collect();
        Core {
            limits,
            rules,
            conns: IdMap::default(),
            producers: IdMap::default(),
            consumers: IdMap::default(),
            addresses: HashMap::new(),
            inflight: IdMap::default(),
            next_dlv: 1,
            outbox: IdMap::default(),
            declared,
            store,
            storing: IdMap::default(),
            next_tag: 1,
            store_consumers: IdMap::default(),
            next_store_consumer: 1,
            confirming: IdMap::default(),
        }
    }

    /// Creates the broker subscriptions that the configuration declares.
    fn bind_declared_subscriptions(&mut self) {
        for r in self.rules.list() {
            self.bind_subscription(&r.decl);
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<ToCore>>) {
        self.bind_declared_subscriptions();
        while let Some(batch) = rx.recv().await {
            for m in batch {
                self.handle(m);
            }
            // Take whatever else is queued before answering, so answers go out in batches.
            let mut rounds = 0;
            while rounds < 64 {
                match rx.try_recv() {
                    Ok(batch) => {
                        for m in batch {
                            self.handle(m);
                        }
                    }
                    Err(_) => break,
                }
                rounds += 1;
            }
            self.flush();
        }
    }

    fn flush(&mut self) {
        for (conn, msgs) in self.outbox.drain() {
            if let Some(c) = self.conns.get(&conn) {
                let _ = c.tx.send(msgs);
            }
        }
    }

    fn send(&mut self, conn: ConnId, m: ToConn) {
        if self.conns.contains_key(&conn) {
            self.outbox.entry(conn).or_default().push(m);
        }
    }

    pub fn handle(&mut self, m: ToCore) {
        match m {
            ToCore::ConnOpened {
                conn,
                tx,
                remote,
                container_id,
                out_bytes,
                in_bytes,
            } => {
                self.conns.insert(
                    conn,
                    Conn {
                        tx,
                        remote,
                        container_id,
                        links: 0,
                        out_bytes,
                        in_bytes,
                    },
                );
            }
            ToCore::Writable { conn } => {
                let links: Vec<LinkRef> = self
                    .consumers
                    .keys()
                    .filter(|l| l.conn == conn)
                    .copied()
                    .collect();
                for l in links {
                    if let Some(a) = self.consumers.get(&l).map(|c| c.address.clone()) {
                        self.pump_consumer(l, &a);
                        self.pump_address(&a);
                    }
                }
            }
            ToCore::ConnClosed { conn } => {
                let links: Vec<LinkRef> = self
                    .producers
                    .keys()
                    .chain(self.consumers.keys())
                    .filter(|l| l.conn == conn)
                    .copied()
                    .collect();
                for l in links {
                    self.detach(l, false);
                }
                self.conns.remove(&conn);
                self.outbox.remove(&conn);
            }
            ToCore::Attach {
                link,
                dir,
                name,
                address,
                presettled,
                durable,
                shared,
                keep_ms,
            } => self.attach(
                link,
                dir,
                name,
                address,
                LinkOptions {
                    presettled,
                    durable,
                    shared,
                    keep_ms,
                },
            ),
            ToCore::StoreDeliveries(list) => self.store_deliveries(list),
            ToCore::Stored(list) => self.stored(list),
            ToCore::StoreLost { consumers } => self.store_lost(consumers),
            ToCore::Detach { link, closed } => self.detach(link, closed),
            ToCore::ConsumerCredit { link, limit, drain } => {
                if let Some(id) = self.consumers.get(&link).and_then(|c| c.store_id) {
                    self.store_credit(link, id, limit, drain);
                } else if let Some(c) = self.consumers.get_mut(&link) {
                    c.limit = limit;
                    c.drain = drain;
                    let a = c.address.clone();
                    self.pump_consumer(link, &a);
                    self.pump_address(&a);
                    self.finish_drain(link);
                }
            }
            ToCore::Deliver {
                link,
                delivery_id,
                settled,
                to,
                payload,
                format,
            } => self.deliver(link, delivery_id, settled, to, payload, format),
            ToCore::Outcome {
                dlv,
                state,
                confirm,
            } => self.outcome(dlv, state, confirm),
            ToCore::Mgmt(m) => self.mgmt(m),
        }
    }

    /// The address record, created on first use (attach paths only: it allocates the key).
    fn address_mut(&mut self, name: &str) -> &mut Address {
        let rules = &self.rules;
        // Looked up first: the key is made only for a new address. The key and the record
        // share one copy of the name.
        if !self.addresses.contains_key(name) {
            let kind = rules.resolve(name);
            let name: Arc<str> = Arc::from(name);
            self.addresses.insert(
                name.clone(),
                Box::new(Address {
                    name,
                    kind,
                    producers: Vec::new(),
                    consumers: Vec::new(),
                    rr: 0,
                    pending: VecDeque::new(),
                    store_declared: false,
                    consumer_count: 0,
                    counters: None,
                }),
            );
        }
        match self.addresses.get_mut(name) {
            Some(a) => a,
            // Present: checked or inserted just above (the borrow checker cannot see it).
            None => unreachable!("address {name} inserted above"),
        }
    }

    fn attach(
        &mut self,
        link: LinkRef,
        dir: Dir,
        name: String,
        address: Option<String>,
        opts: LinkOptions,
    ) {
        let presettled = opts.presettled;
        if let Some(a) = &address {
            let kind = self
                .addresses
                .get(a.as_str())
                .map_or_else(|| self.rules.resolve(a), |x| x.kind);
            if kind.is_brokered() {
                if let Some((cond, why)) = self.store_unavailable(kind, dir == Dir::Producer) {
                    self.send(
                        link.conn,
                        ToConn::AttachRefused {
                            link: link.link,
                            error: ErrorCondition::new(
                                cond,
                                format!("address '{a}' has type {}: {why}", kind.as_str()),
                            ),
                        },
                    );
                    return;
                }
                if dir == Dir::Consumer {
                    self.attach_store_consumer(link, name, a, kind, opts);
                    return;
                }
            }
        }
        if let Some(c) = self.conns.get_mut(&link.conn) {
            c.links += 1;
        }
        self.send(link.conn, ToConn::AttachOk { link: link.link });
        match dir {
            Dir::Producer => {
                self.producers.insert(
                    link,
                    Producer {
                        name,
                        address: address.as_deref().map(Arc::from),
                        outstanding: 0,
                        held: 0,
                        deliveries: 0,
                    },
                );
                match address {
                    Some(a) => {
                        self.address_mut(&a).producers.push(link);
                        self.grant(link);
                    }
                    None => self.grant(link),
                }
            }
            Dir::Consumer => {
                let Some(a) = address else { return };
                let shared = self.address_mut(&a).name.clone();
                self.consumers.insert(
                    link,
                    Box::new(Consumer {
                        name,
                        address: shared,
                        limit: 0,
                        dispatched: 0,
                        drain: false,
                        presettled,
                        deliveries: 0,
                        unsettled: 0,
                        store_id: None,
                        durable_sub: None,
                        store_offset: 0,
                        mc: None,
                    }),
                );
                let addr = self.address_mut(&a);
                addr.consumers.push(link);
                addr.consumer_count = addr.consumers.len();
                let first = addr.consumers.len() == 1;
                if first {
                    let producers = addr.producers.clone();
                    for p in producers {
                        self.grant(p);
                    }
                }
            }
        }
    }

    /// Tops a producer's credit up to its capacity when its address can take messages.
    fn grant(&mut self, link: LinkRef) {
        let cap = self.limits.link_capacity;
        let Some(p) = self.producers.get(&link) else {
            return;
        };
        let can = match &p.address {
            None => true,
            Some(a) => self
                .addresses
                .get(&**a)
                .is_some_and(|a| a.kind.is_brokered() || !a.consumers.is_empty()),
        };
        if !can {
            return;
        }
        let used = p.outstanding + p.held;
        // Replenish in batches: only once half the capacity is free.
        if used > cap / 2 {
            return;
        }
        let n = cap - used;
        if let Some(p) = self.producers.get_mut(&link) {
            p.outstanding += n;
        }
        self.send(link.conn, ToConn::AddCredit { link: link.link, n });
    }

    fn detach(&mut self, link: LinkRef, closed: bool) {
        if let Some(c) = self.conns.get_mut(&link.conn) {
            c.links = c.links.saturating_sub(1);
        }
        if let Some(p) = self.producers.remove(&link) {
            if let Some(a) = p.address {
                if let Some(addr) = self.addresses.get_mut(&*a) {
                    addr.producers.retain(|l| *l != link);
                }
                self.gc_address(&a);
            }
            return;
        }
        let Some(c) = self.consumers.remove(&link) else {
            return;
        };
        if let Some(id) = c.store_id {
            // The broker takes back what it held (one more attempt counted).
            self.store_consumers.remove(&id);
            self.inflight.retain(|_, f| f.consumer != link);
            self.send_store(StoreRequest::Detach { consumer: id });
            if let (true, Some(name)) = (closed, c.durable_sub) {
                // A shared subscription: not while another member reads it. (A subscription of
                // one client's own goes even if an older link of that client is still there,
                // as when a client reconnects and unsubscribes before its old link is gone.)
                let others = name.starts_with("shared:")
                    && self
                        .consumers
                        .values()
                        .any(|o| o.durable_sub.as_deref() == Some(name.as_str()));
                if !others {
                    self.send_store(StoreRequest::Unsubscribe { name });
                }
            }
            if let Some(addr) = self.addresses.get_mut(&*c.address) {
                addr.consumer_count = addr.consumer_count.saturating_sub(1);
            }
            self.gc_address(&c.address);
            return;
        }
        // Every unsettled delivery it had goes back to its producer: it may have been seen.
        let lost: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.consumer == link)
            .map(|(k, _)| *k)
            .collect();
        for dlv in lost {
            self.outcome(dlv, failed(), None);
        }
        let a = c.address;
        let no_consumers = {
            let Some(addr) = self.addresses.get_mut(&*a) else {
                return;
            };
            addr.consumers.retain(|l| *l != link);
            addr.consumer_count = addr.consumers.len();
            addr.consumers.is_empty()
        };
        if no_consumers {
            // Nobody can take messages: producers lose their credit, waiting messages go back.
            let (producers, pending) = {
                let Some(addr) = self.addresses.get_mut(&*a) else {
                    return;
                };
                (addr.producers.clone(), std::mem::take(&mut addr.pending))
            };
            for p in producers {
                if let Some(pr) = self.producers.get_mut(&p) {
                    pr.outstanding = 0;
                }
                self.send(p.conn, ToConn::RevokeCredit { link: p.link });
            }
            for d in pending {
                self.release_in(d.producer.conn, d.payload.len());
                self.unhold(d.producer);
                if let Some(addr) = self.addresses.get_mut(&*a) {
                    addr.counters().released += 1;
                }
                if !d.settled {
                    self.send(
                        d.producer.conn,
                        ToConn::Outcome {
                            link: d.producer.link,
                            delivery_id: d.delivery_id,
                            state: released(),
                        },
                    );
                }
            }
        } else {
            self.pump_address(&a);
        }
        self.gc_address(&a);
    }

    /// Forgets an address with no links and nothing pending, unless it was declared.
    fn gc_address(&mut self, a: &str) {
        let idle = self.addresses.get(a).is_some_and(|x| {
            x.producers.is_empty() && x.consumers.is_empty() && x.pending.is_empty()
        });
        if idle && !self.declared.contains(a) {
            self.addresses.remove(a);
        }
    }

    /// The core no longer holds `n` bytes that `conn` handed it.
    fn release_in(&self, conn: ConnId, n: usize) {
        if let Some(c) = self.conns.get(&conn) {
            c.in_bytes.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Whether `conn` may be handed more deliveries (its unwritten bytes are under budget).
    fn writable(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| {
            c.out_bytes.load(Ordering::Acquire) < self.limits.connection_buffer_bytes
        })
    }

    fn add_out(&self, conn: ConnId, n: usize) {
        if let Some(c) = self.conns.get(&conn) {
            c.out_bytes.fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Whether a consumer can take one more delivery now.
    fn can_take(&self, l: &LinkRef) -> bool {
        self.consumers
            .get(l)
            .is_some_and(|c| c.credit() > 0 && c.unsettled < self.limits.max_unsettled_per_link)
            && self.writable(l.conn)
    }

    fn unhold(&mut self, producer: LinkRef) {
        if let Some(p) = self.producers.get_mut(&producer) {
            p.held = p.held.saturating_sub(1);
        }
        self.grant(producer);
    }

    fn deliver(
        &mut self,
        link: LinkRef,
        delivery_id: u32,
        settled: bool,
        to: Option<String>,
        payload: Bytes,
        format: u32,
    ) {
        let len = payload.len();
        let Some(p) = self.producers.get_mut(&link) else {
            self.release_in(link.conn, len);
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        p.deliveries += 1;
        // The link's own target, or the message's `to` on the anonymous relay (used as it
        // came: no copy per message).
        let held: Option<Arc<str>> = p.address.clone();
        let to_address = if held.is_none() { to } else { None };
        let address: &str = match (&held, &to_address) {
            (Some(a), _) => a,
            (None, Some(to)) => to,
            (None, None) => {
                self.release_in(link.conn, len);
                self.settle_producer(
                    link,
                    delivery_id,
                    settled,
                    DeliveryState::Rejected(Some(ErrorCondition::new(
                        condition::INVALID_FIELD,
                        "message on the anonymous relay has no 'to' address",
                    ))),
                );
                self.grant(link);
                return;
            }
        };
        let kind = self
            .addresses
            .get(address)
            .map_or_else(|| self.rules.resolve(address), |a| a.kind);
        if kind.is_brokered() {
            if let Some((cond, why)) = self.store_unavailable(kind, true) {
                self.release_in(link.conn, len);
                self.settle_producer(
                    link,
                    delivery_id,
                    settled,
                    DeliveryState::Rejected(Some(ErrorCondition::new(
                        cond,
                        format!("address '{address}' has type {}: {why}", kind.as_str()),
                    ))),
                );
                self.grant(link);
                return;
            }
            // A relayed `to` is moved on to the store, not copied.
            let owned = match (to_address, held) {
                (Some(to), _) => to,
                (None, Some(a)) => a.to_string(),
                (None, None) => return,
            };
            self.store(link, delivery_id, settled, owned, kind, payload);
            return;
        }
        let has_consumers = self
            .addresses
            .get(address)
            .is_some_and(|a| !a.consumers.is_empty());
        if !has_consumers {
            self.release_in(link.conn, len);
            // Only the anonymous relay (or a race with the last consumer leaving) gets here.
            if let Some(a) = self.addresses.get_mut(address) {
                a.counters().released += 1;
            }
            self.settle_producer(link, delivery_id, settled, released());
            self.grant(link);
            return;
        }
        let Some(addr) = self.addresses.get_mut(address) else {
            return;
        };
        addr.counters().deliveries_in += 1;
        match kind {
            AddressType::Multicast => {
                // Taken out for the loop (no per-message copy of the list), put back below.
                let consumers = std::mem::take(&mut addr.consumers);
                let cap = self.limits.link_capacity as usize;
                let budget = self.limits.connection_buffer_bytes;
                let mut sent = 0u64;
                let mut dropped = 0u64;
                for &c in &consumers {
                    let writable = self.writable(c.conn);
                    let Some(cons) = self.consumers.get_mut(&c) else {
                        continue;
                    };
                    let queued = cons.mc.as_ref().map_or(0, |m| m.queue.len());
                    if writable && cons.credit() > 0 && queued == 0 {
                        cons.dispatched = cons.dispatched.wrapping_add(1);
                        cons.deliveries += 1;
                        sent += 1;
                        self.add_out(c.conn, len);
                        self.send(
                            c.conn,
                            ToConn::Deliver {
                                link: c.link,
                                dlv: None,
                                payload: payload.clone(),
                                format,
                            },
                        );
                    } else if queued < cap && cons.mc.as_ref().map_or(0, |m| m.bytes) < budget {
                        let m = cons.mc.get_or_insert_with(Box::default);
                        m.bytes += len;
                        m.queue.push_back((payload.clone(), format));
                    } else {
                        // A slow multicast consumer loses copies rather than slowing the rest.
                        dropped += 1;
                    }
                }
                if let Some(addr) = self.addresses.get_mut(address) {
                    addr.consumers = consumers;
                    addr.counters().deliveries_out += sent;
                    addr.counters().dropped += dropped;
                }
                self.release_in(link.conn, len);
                self.settle_producer(link, delivery_id, settled, DeliveryState::Accepted);
                self.grant(link);
            }
            _ => {
                if let Some(p) = self.producers.get_mut(&link) {
                    p.held += 1;
                }
                let Some(addr) = self.addresses.get_mut(address) else {
                    return;
                };
                addr.pending.push_back(Pending {
                    producer: link,
                    delivery_id,
                    settled,
                    payload,
                    format,
                });
                self.pump_address(address);
            }
        }
    }

    fn settle_producer(
        &mut self,
        link: LinkRef,
        delivery_id: u32,
        settled: bool,
        state: DeliveryState,
    ) {
        if !settled {
            self.send(
                link.conn,
                ToConn::Outcome {
                    link: link.link,
                    delivery_id,
                    state,
                },
            );
        }
    }

    /// Moves pending anycast deliveries to consumers with credit, balanced round-robin among
    /// those that have credit.
    fn pump_address(&mut self, a: &str) {
        loop {
            let Some(addr) = self.addresses.get(a) else {
                return;
            };
            if addr.pending.is_empty() || addr.kind == AddressType::Multicast {
                return;
            }
            let n = addr.consumers.len();
            let chosen = (0..n)
                .map(|i| addr.consumers[(addr.rr + i) % n])
                .find(|c| self.can_take(c));
            let Some(c) = chosen else { return };
            let Some(addr) = self.addresses.get_mut(a) else {
                return;
            };
            if let Some(idx) = addr.consumers.iter().position(|x| *x == c) {
                addr.rr = (idx + 1) % n;
            }
            let Some(d) = addr.pending.pop_front() else {
                return;
            };
            self.dispatch(a, c, d);
        }
    }

    fn dispatch(&mut self, a: &str, c: LinkRef, d: Pending) {
        let Some(cons) = self.consumers.get_mut(&c) else {
            return;
        };
        cons.dispatched = cons.dispatched.wrapping_add(1);
        cons.deliveries += 1;
        let presettled = cons.presettled;
        let tracked = !d.settled && !presettled;
        if tracked {
            cons.unsettled += 1;
        }
        let len = d.payload.len();
        self.release_in(d.producer.conn, len);
        self.add_out(c.conn, len);
        let Some(addr) = self.addresses.get_mut(a) else {
            return;
        };
        addr.counters().deliveries_out += 1;
        let dlv = if tracked {
            addr.counters().unsettled += 1;
            let id = self.next_dlv;
            self.next_dlv += 1;
            self.inflight.insert(
                id,
                InFlight {
                    from: InFrom::Producer {
                        link: d.producer,
                        delivery_id: d.delivery_id,
                    },
                    consumer: c,
                    address: addr.name.clone(),
                },
            );
            Some(id)
        } else {
            None
        };
        self.send(
            c.conn,
            ToConn::Deliver {
                link: c.link,
                dlv,
                payload: d.payload,
                format: d.format,
            },
        );
        if !d.settled && presettled {
            // The consumer asked for at-most-once: the router settles for it.
            self.settle_producer(d.producer, d.delivery_id, false, DeliveryState::Accepted);
        }
        self.unhold(d.producer);
    }

    /// Sends queued multicast copies to a consumer that got credit.
    fn pump_consumer(&mut self, link: LinkRef, a: &str) {
        let mut out = Vec::new();
        let mut bytes = 0;
        let budget = self.limits.connection_buffer_bytes;
        let already = self
            .conns
            .get(&link.conn)
            .map_or(usize::MAX, |c| c.out_bytes.load(Ordering::Acquire));
        if let Some(c) = self.consumers.get_mut(&link) {
            while c.credit() > 0 && already + bytes < budget {
                let Some((payload, format)) = c.mc.as_mut().and_then(|m| m.queue.pop_front())
                else {
                    break;
                };
                if let Some(m) = c.mc.as_mut() {
                    m.bytes -= payload.len();
                }
                bytes += payload.len();
                c.dispatched = c.dispatched.wrapping_add(1);
                c.deliveries += 1;
                out.push(ToConn::Deliver {
                    link: link.link,
                    dlv: None,
                    payload,
                    format,
                });
            }
        }
        if !out.is_empty() {
            self.add_out(link.conn, bytes);
            if let Some(addr) = self.addresses.get_mut(a) {
                addr.counters().deliveries_out += out.len() as u64;
            }
            for m in out {
                self.send(link.conn, m);
            }
        }
    }

    fn finish_drain(&mut self, link: LinkRef) {
        if let Some(c) = self.consumers.get_mut(&link).filter(|c| c.drain) {
            // Whatever credit is left is used up by the drain.
            c.dispatched = c.limit;
            c.drain = false;
            self.send(link.conn, ToConn::DrainDone { link: link.link });
        }
    }

    fn outcome(&mut self, dlv: u64, state: DeliveryState, confirm: Option<LinkRef>) {
        let Some(f) = self.inflight.remove(&dlv) else {
            // Unknown (already settled or its consumer is gone): nothing to wait for.
            if let Some(c) = confirm {
                self.send(c.conn, ToConn::Confirm { dlv });
            }
            return;
        };
        let mut repump = false;
        if let Some(c) = self.consumers.get_mut(&f.consumer) {
            repump = c.unsettled == self.limits.max_unsettled_per_link;
            c.unsettled = c.unsettled.saturating_sub(1);
        }
        if repump {
            self.pump_address(&f.address);
        }
        if let Some(addr) = self.addresses.get_mut(&*f.address) {
            addr.counters().unsettled = addr.counters().unsettled.saturating_sub(1);
            match &state {
                DeliveryState::Accepted => addr.counters().accepted += 1,
                DeliveryState::Rejected(_) => addr.counters().rejected += 1,
                DeliveryState::Released => addr.counters().released += 1,
                DeliveryState::Modified { .. } => addr.counters().modified += 1,
                _ => {}
            }
        }
        match f.from {
            InFrom::Producer { link, delivery_id } => {
                self.send(
                    link.conn,
                    ToConn::Outcome {
                        link: link.link,
                        delivery_id,
                        state,
                    },
                );
                if let Some(c) = confirm {
                    self.send(c.conn, ToConn::Confirm { dlv });
                }
            }
            InFrom::Store { consumer, seq } => {
                let outcome = match state {
                    DeliveryState::Accepted => StoreOutcome::Accepted,
                    DeliveryState::Rejected(_) => StoreOutcome::Rejected,
                    DeliveryState::Modified {
                        delivery_failed,
                        undeliverable_here,
                        ..
                    } => StoreOutcome::Modified {
                        delivery_failed,
                        undeliverable_here,
                    },
                    _ => StoreOutcome::Released,
                };
                let done = confirm.map(|c| {
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    self.confirming.insert(tag, (c, dlv));
                    tag
                });
                self.send_store(StoreRequest::Settle {
                    consumer,
                    seq,
                    outcome,
                    done,
                });
            }
        }
        self.gc_address(&f.address);
    }

    /// Why a queue/topic/subscription address cannot take this link or message, if it cannot:
    /// the error condition and its description.
    fn store_unavailable(
        &self,
        kind: AddressType,
        producer: bool,
    ) -> Option<(&'static str, &'static str)> {
        if self.store.is_none() {
            Some((
                condition::NOT_IMPLEMENTED,
                "this router runs without a broker shard (start standalone with a data directory)",
            ))
        } else if producer && kind == AddressType::Subscription {
            // A subscription is fed by its topic; writing into it directly would bypass the
            // topic's other subscribers.
            Some((
                condition::NOT_ALLOWED,
                "a subscription is read-only: publish to its topic",
            ))
        } else {
            None
        }
    }

    /// The declared topic filter of subscription address `address`.
    fn subscription_topic(&self, address: &str) -> Option<String> {
        self.rules
            .rule_for(address)
            .filter(|d| d.kind == AddressType::Subscription)
            .and_then(|d| d.topic.clone())
    }

    /// Asks the broker to create the named subscription of a `subscription` declaration, so
    /// it collects from its topic before any consumer attaches.
    fn bind_subscription(&mut self, decl: &crate::config::AddressDecl) {
        if let (AddressType::Subscription, Some(name), Some(topic)) =
            (decl.kind, &decl.name, &decl.topic)
        {
            self.send_store(StoreRequest::Bind {
                name: declared_subscription(name),
                filter: topic.clone(),
            });
        }
    }

    fn send_store(&mut self, r: StoreRequest) {
        if let Some(p) = &mut self.store {
            p.send(r);
        }
    }

    /// Sends a queue's declared policy (dead-letter address, attempts, max TTL) to the broker
    /// when the address becomes active here. Idempotent at the broker, so a router restart or
    /// a re-activation simply declares again.
    fn declare_store_policy(&mut self, address: &str) {
        // Every message to a queue passes here: the usual answer without allocating.
        if self
            .addresses
            .get(address)
            .is_some_and(|a| a.store_declared)
        {
            return;
        }
        let decl = self
            .rules
            .rule_for(address)
            .filter(|d| d.kind == AddressType::Queue)
            .cloned();
        let addr = self.address_mut(address);
        if addr.store_declared {
            return;
        }
        addr.store_declared = true;
        let Some(d) = decl else { return };
        if d.dead_letter.is_none()
            && d.max_delivery_attempts.is_none()
            && d.max_ttl_ms.is_none()
            && d.expiry_address.is_none()
            && d.durable.is_none()
        {
            return;
        }
        self.send_store(StoreRequest::Declare {
            address: address.to_owned(),
            durable: d.durable.unwrap_or(true),
            max_delivery_attempts: d
                .max_delivery_attempts
                .unwrap_or(broker::queue::Policy::default().max_delivery_attempts),
            max_ttl_ms: d.max_ttl_ms,
            dead_letter: d.dead_letter,
            expiry_address: d.expiry_address,
        });
    }

    /// A producer's message to a queue or topic: it counts against the producer's credit until
    /// the broker has made it durable; only then does the producer hear `accepted`.
    fn store(
        &mut self,
        link: LinkRef,
        delivery_id: u32,
        settled: bool,
        address: String,
        kind: AddressType,
        payload: Bytes,
    ) {
        let len = payload.len();
        if let Some(p) = self.producers.get_mut(&link) {
            p.held += 1;
        }
        if kind == AddressType::Queue {
            self.declare_store_policy(&address);
        }
        // Not `address_mut`: the record exists (its producer is attached), and that would
        // copy the name for every message.
        if let Some(a) = self.addresses.get_mut(address.as_str()) {
            a.counters().deliveries_in += 1;
        }
        let expiry = amqp::message::expiry(&payload).unwrap_or_default();
        let tag = self.next_tag;
        self.next_tag += 1;
        self.storing.insert(
            tag,
            Storing {
                producer: link,
                delivery_id,
                settled,
                len,
            },
        );
        // Shared with the store, not copied.
        let body = payload;
        // Ids too long to keep are ignored (the message is stored without one).
        let dedup = expiry
            .dedup_id
            .filter(|id| id.len() <= broker::shard::MAX_DEDUP_ID)
            .map(|id| {
                Box::new(broker::service::Dedup {
                    id,
                    new: expiry.dedup_new,
                    hash: expiry.dedup_hash,
                })
            });
        let r = if kind == AddressType::Topic {
            StoreRequest::Publish {
                topic: address,
                ttl_ms: expiry.ttl_ms,
                absolute_expiry: expiry.absolute_expiry_ms,
                body,
                done: Some(tag),
                dedup,
            }
        } else {
            StoreRequest::Enqueue {
                address,
                ttl_ms: expiry.ttl_ms,
                absolute_expiry: expiry.absolute_expiry_ms,
                body,
                done: Some(tag),
                dedup,
            }
        };
        self.send_store(r);
    }

    fn store_lost(&mut self, consumers: Vec<u64>) {
        for id in consumers {
            let Some(link) = self.store_consumers.get(&id).copied() else {
                continue;
            };
            self.detach(link, false);
            self.send(
                link.conn,
                ToConn::Detach {
                    link: link.link,
                    error: ErrorCondition::new(
                        condition::DETACH_FORCED,
                        "the broker serving this address is unavailable; reattach to retry",
                    ),
                },
            );
        }
    }

    fn stored(&mut self, list: Vec<(Tag, Result<(), StoreError>)>) {
        for (tag, r) in list {
            if let Some((c, dlv)) = self.confirming.remove(&tag) {
                // The acknowledgement is durable: the consumer may forget the delivery.
                self.send(c.conn, ToConn::Confirm { dlv });
                continue;
            }
            let Some(s) = self.storing.remove(&tag) else {
                continue;
            };
            self.release_in(s.producer.conn, s.len);
            self.unhold(s.producer);
            if !s.settled {
                let state = match r {
                    Ok(()) => DeliveryState::Accepted,
                    Err(e @ StoreError::Full(_)) => DeliveryState::Rejected(Some(
                        ErrorCondition::new(condition::RESOURCE_LIMIT_EXCEEDED, e.to_string()),
                    )),
                    Err(e) => DeliveryState::Rejected(Some(ErrorCondition::new(
                        condition::INTERNAL_ERROR,
                        format!("message not stored: {e}"),
                    ))),
                };
                self.settle_producer(s.producer, s.delivery_id, false, state);
            }
        }
    }

    fn attach_store_consumer(
        &mut self,
        link: LinkRef,
        name: String,
        address: &str,
        kind: AddressType,
        opts: LinkOptions,
    ) {
        let LinkOptions {
            presettled,
            durable,
            shared,
            keep_ms,
        } = opts;
        let id = self.next_store_consumer;
        self.next_store_consumer += 1;
        if let Some(c) = self.conns.get_mut(&link.conn) {
            c.links += 1;
        }
        let container = self
            .conns
            .get(&link.conn)
            .map(|c| c.container_id.clone())
            .unwrap_or_default();
        self.send(link.conn, ToConn::AttachOk { link: link.link });
        // A durable subscription (JMS-style, of its own or shared; not a declared subscription
        // address): a closing detach by its last consumer unsubscribes it.
        let durable_sub = (kind == AddressType::Topic && durable).then(|| {
            if shared {
                format!("shared:{name}")
            } else {
                format!("{container}:{name}")
            }
        });
        let expiring = durable_sub.clone();
        let request = if kind == AddressType::Subscription {
            // A declared subscription: its consumers compete for what it collected.
            StoreRequest::Subscribe {
                consumer: id,
                name: declared_subscription(address),
                filter: self.subscription_topic(address).unwrap_or_default(),
                durable: true,
                credit: 0,
            }
        } else if kind == AddressType::Topic {
            // JMS-style identity: a durable subscription is container-id + link name; a
            // shared one is the link name alone; anything else lives as long as the link. A
            // shared subscription is durable when its terminus is (else it goes away with its
            // last consumer; the latest consumer to attach decides).
            let sub = if shared {
                format!("shared:{name}")
            } else if durable {
                format!("{container}:{name}")
            } else {
                format!("link:{id}")
            };
            StoreRequest::Subscribe {
                consumer: id,
                name: sub,
                filter: address.to_owned(),
                durable,
                credit: 0,
            }
        } else {
            self.declare_store_policy(address);
            StoreRequest::Attach {
                consumer: id,
                address: address.to_owned(),
                credit: 0,
            }
        };
        let shared = self.address_mut(address).name.clone();
        self.consumers.insert(
            link,
            Box::new(Consumer {
                name,
                address: shared,
                limit: 0,
                dispatched: 0,
                drain: false,
                presettled,
                deliveries: 0,
                unsettled: 0,
                store_id: Some(id),
                durable_sub,
                store_offset: 0,
                mc: None,
            }),
        );
        self.store_consumers.insert(id, link);
        self.address_mut(address).consumer_count += 1;
        self.send_store(request);
        if let Some(name) = expiring {
            // Every durable attach says how long the subscription outlives its consumers
            // (none: for good), so a client may change it.
            self.send_store(StoreRequest::Expire { name, keep_ms });
        }
    }

    /// Tells the broker the consumer's credit limit (absolute, in the broker's count of
    /// deliveries to it). The broker is the consumer's prefetch: `max_unsettled_per_link` does
    /// not apply to queue and topic consumers (their credit does).
    fn store_credit(&mut self, link: LinkRef, id: u64, limit: u32, drain: bool) {
        let Some(c) = self.consumers.get_mut(&link) else {
            return;
        };
        c.limit = limit;
        if drain {
            // A drain takes the credit not used now: the link's delivery-count jumps by it,
            // the broker's count does not.
            let unused = c.credit();
            c.store_offset = c.store_offset.wrapping_add(unused);
            c.dispatched = c.limit;
            self.send(link.conn, ToConn::DrainDone { link: link.link });
        }
        let Some(c) = self.consumers.get(&link) else {
            return;
        };
        let credit = c.limit.wrapping_sub(c.store_offset);
        self.send_store(StoreRequest::Credit {
            consumer: id,
            credit,
        });
    }

    fn store_deliveries(&mut self, list: Vec<StoreDelivery>) {
        for d in list {
            // Deliveries for consumers that are gone (or from before a restart) are ignored:
            // the broker returns them when it applies the consumer's detach.
            let Some(&link) = self.store_consumers.get(&d.consumer) else {
                continue;
            };
            let Some(c) = self.consumers.get_mut(&link) else {
                continue;
            };
            c.dispatched = c.dispatched.wrapping_add(1);
            c.deliveries += 1;
            let presettled = c.presettled;
            if !presettled {
                c.unsettled += 1;
            }
            let address = c.address.clone();
            // A redelivery tells the consumer how many attempts came before (header
            // delivery-count); first deliveries go out exactly as stored.
            let body = if d.delivery_count > 0 {
                amqp::message::with_delivery_count(&d.body, d.delivery_count).unwrap_or(d.body)
            } else {
                d.body
            };
            let len = body.len();
            let dlv = if presettled {
                // At most once: the router settles for the consumer.
                self.send_store(StoreRequest::Settle {
                    consumer: d.consumer,
                    seq: d.seq,
                    outcome: StoreOutcome::Accepted,
                    done: None,
                });
                None
            } else {
                let id = self.next_dlv;
                self.next_dlv += 1;
                let name = address.clone();
                self.inflight.insert(
                    id,
                    InFlight {
                        from: InFrom::Store {
                            consumer: d.consumer,
                            seq: d.seq,
                        },
                        consumer: link,
                        address: name,
                    },
                );
                Some(id)
            };
            if let Some(addr) = self.addresses.get_mut(&*address) {
                addr.counters().deliveries_out += 1;
                if dlv.is_some() {
                    addr.counters().unsettled += 1;
                }
            }
            self.add_out(link.conn, len);
            self.send(
                link.conn,
                ToConn::Deliver {
                    link: link.link,
                    dlv,
                    payload: body,
                    format: 0,
                },
            );
        }
    }

    fn mgmt(&mut self, m: Mgmt) {
        match m {
            Mgmt::Snapshot(tx) => {
                let _ = tx.send(self.snapshot());
            }
            Mgmt::AddAddress(decl, tx) => {
                let r = decl.validate().map_err(|e| e.to_string()).and_then(|_| {
                    if let Some(n) = &decl.name {
                        self.declared.insert(n.clone());
                    }
                    self.bind_subscription(&decl);
                    if self.rules.insert(decl, Origin::Api) {
                        Ok(())
                    } else {
                        Err("address table full".to_owned())
                    }
                });
                let _ = tx.send(r);
            }
            Mgmt::RemoveAddress(key, tx) => {
                // Deleting a subscription address deletes the subscription and what it holds.
                if self.subscription_topic(&key).is_some() {
                    self.send_store(StoreRequest::Unsubscribe {
                        name: declared_subscription(&key),
                    });
                }
                let found = self.rules.remove(&key);
                self.declared.remove(&key);
                self.gc_address(&key);
                let _ = tx.send(found);
            }
            Mgmt::Queues(prefix, reply) => {
                if self.store.is_some() {
                    // The shards answer directly; the core only passes the request on.
                    self.send_store(StoreRequest::Info { prefix, reply });
                } else {
                    let _ = reply.send(Vec::new());
                }
            }
            Mgmt::Placement(address, reply) => {
                let kind = self
                    .addresses
                    .get(address.as_str())
                    .map_or_else(|| self.rules.resolve(&address), |a| a.kind);
                let (shard, shards) = match &self.store {
                    Some(p) if kind == AddressType::Queue => {
                        (Some(p.queue_shard(&address)), p.shard_count())
                    }
                    Some(p) if kind.is_brokered() => (Some(0), p.shard_count()),
                    Some(p) => (None, p.shard_count()),
                    None => (None, 0),
                };
                let _ = reply.send((kind, shard, shards));
            }
            Mgmt::Purge(address, reply) => {
                let ok = self.store.is_some();
                self.send_store(StoreRequest::Purge { address });
                let _ = reply.send(ok);
            }
            Mgmt::Shutdown(error) => {
                let conns: Vec<ConnId> = self.conns.keys().copied().collect();
                for c in conns {
                    self.send(
                        c,
                        ToConn::Close {
                            error: error.clone(),
                        },
                    );
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut connections: Vec<ConnectionInfo> = self
            .conns
            .iter()
            .map(|(id, c)| ConnectionInfo {
                id: *id,
                remote: c.remote.clone(),
                container_id: c.container_id.clone(),
                links: c.links,
            })
            .collect();
        connections.sort_by_key(|c| c.id);
        let unsettled_by_consumer =
            |l: &LinkRef| self.inflight.values().filter(|f| f.consumer == *l).count();
        let mut links: Vec<LinkInfo> = self
            .producers
            .iter()
            .map(|(l, p)| LinkInfo {
                connection: l.conn,
                name: p.name.clone(),
                role: "sender",
                address: p.address.as_deref().map(str::to_owned),
                credit: p.outstanding.into(),
                unsettled: self
                    .inflight
                    .values()
                    .filter(|f| matches!(f.from, InFrom::Producer { link, .. } if link == *l))
                    .count(),
                deliveries: p.deliveries,
            })
            .chain(self.consumers.iter().map(|(l, c)| LinkInfo {
                connection: l.conn,
                name: c.name.clone(),
                role: "receiver",
                address: Some(c.address.to_string()),
                credit: c.credit().into(),
                unsettled: unsettled_by_consumer(l),
                deliveries: c.deliveries,
            }))
            .collect();
        links.sort_by(|a, b| (a.connection, &a.name).cmp(&(b.connection, &b.name)));
        let mut addresses: Vec<AddressStats> = self
            .addresses
            .values()
            .map(|a| AddressStats {
                address: a.name.to_string(),
                kind: a.kind.as_str(),
                producers: a.producers.len(),
                consumers: a.consumer_count,
                pending: a.pending.len(),
                counters: a.counters.as_deref().cloned().unwrap_or_default(),
            })
            .collect();
        addresses.sort_by(|a, b| a.address.cmp(&b.address));
        Snapshot {
            connections,
            links,
            rules: self.rules.list(),
            addresses,
        }
    }
}
