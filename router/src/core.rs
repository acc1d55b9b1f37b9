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
    },
    Detach {
        link: LinkRef,
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
    },
    Mgmt(Mgmt),
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
    Close {
        error: ErrorCondition,
    },
}

/// Management requests (HTTP API and CLI go through these).
#[derive(Debug)]
pub enum Mgmt {
    Snapshot(oneshot::Sender<Snapshot>),
    AddAddress(AddressDecl, oneshot::Sender<Result<(), String>>),
    RemoveAddress(String, oneshot::Sender<bool>),
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
    pub unsettled: u64,
    pub deliveries_in: u64,
    pub deliveries_out: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub released: u64,
    pub modified: u64,
    pub dropped: u64,
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
    address: String,
    limit: u32,
    dispatched: u32,
    drain: bool,
    presettled: bool,
    deliveries: u64,
    /// Deliveries sent and not yet settled by this consumer.
    unsettled: u32,
    /// Multicast copies waiting for this consumer's credit (bounded by link capacity and by
    /// the connection buffer budget in bytes).
    mc_queue: VecDeque<(Bytes, u32)>,
    mc_bytes: usize,
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
    stats: AddressStats,
}

struct InFlight {
    producer: LinkRef,
    delivery_id: u32,
    consumer: LinkRef,
    address: Arc<str>,
}

pub struct Core {
    limits: Limits,
    rules: Rules,
    conns: HashMap<ConnId, Conn>,
    producers: HashMap<LinkRef, Producer>,
    consumers: HashMap<LinkRef, Consumer>,
    addresses: HashMap<String, Address>,
    inflight: HashMap<u64, InFlight>,
    next_dlv: u64,
    outbox: HashMap<ConnId, Vec<ToConn>>,
    /// Addresses declared by config or API keep their statistics while idle.
    declared: std::collections::HashSet<String>,
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
    pub fn new(limits: Limits, rules: Rules) -> Self {
        let declared = rules
            .list()
            .into_iter()
            .filter_map(|r| r.decl.name)
            .collect();
        Core {
            limits,
            rules,
            conns: HashMap::new(),
            producers: HashMap::new(),
            consumers: HashMap::new(),
            addresses: HashMap::new(),
            inflight: HashMap::new(),
            next_dlv: 1,
            outbox: HashMap::new(),
            declared,
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Vec<ToCore>>) {
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
                    self.detach(l);
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
            } => self.attach(link, dir, name, address, presettled),
            ToCore::Detach { link } => self.detach(link),
            ToCore::ConsumerCredit { link, limit, drain } => {
                if let Some(c) = self.consumers.get_mut(&link) {
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
            ToCore::Outcome { dlv, state } => self.outcome(dlv, state),
            ToCore::Mgmt(m) => self.mgmt(m),
        }
    }

    /// The address record, created on first use (attach paths only: it allocates the key).
    fn address_mut(&mut self, name: &str) -> &mut Address {
        let rules = &self.rules;
        self.addresses.entry(name.to_owned()).or_insert_with(|| {
            let kind = rules.resolve(name);
            Address {
                name: Arc::from(name),
                kind,
                producers: Vec::new(),
                consumers: Vec::new(),
                rr: 0,
                pending: VecDeque::new(),
                stats: AddressStats {
                    address: name.to_owned(),
                    kind: kind.as_str(),
                    ..Default::default()
                },
            }
        })
    }

    fn attach(
        &mut self,
        link: LinkRef,
        dir: Dir,
        name: String,
        address: Option<String>,
        presettled: bool,
    ) {
        if let Some(a) = &address {
            let kind = self
                .addresses
                .get(a)
                .map_or_else(|| self.rules.resolve(a), |x| x.kind);
            if kind.is_brokered() {
                self.send(
                    link.conn,
                    ToConn::AttachRefused {
                        link: link.link,
                        error: ErrorCondition::new(
                            condition::NOT_IMPLEMENTED,
                            format!(
                                "address '{a}' has type {}, which broker shards serve; they are not available in this router yet",
                                kind.as_str()
                            ),
                        ),
                    },
                );
                return;
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
                        self.stats_producers(&a);
                        self.grant(link);
                    }
                    None => self.grant(link),
                }
            }
            Dir::Consumer => {
                let Some(a) = address else { return };
                self.consumers.insert(
                    link,
                    Consumer {
                        name,
                        address: a.clone(),
                        limit: 0,
                        dispatched: 0,
                        drain: false,
                        presettled,
                        deliveries: 0,
                        unsettled: 0,
                        mc_queue: VecDeque::new(),
                        mc_bytes: 0,
                    },
                );
                let addr = self.address_mut(&a);
                addr.consumers.push(link);
                addr.stats.consumers = addr.consumers.len();
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

    fn stats_producers(&mut self, a: &str) {
        if let Some(addr) = self.addresses.get_mut(a) {
            addr.stats.producers = addr.producers.len();
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
                .is_some_and(|a| !a.consumers.is_empty()),
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

    fn detach(&mut self, link: LinkRef) {
        if let Some(c) = self.conns.get_mut(&link.conn) {
            c.links = c.links.saturating_sub(1);
        }
        if let Some(p) = self.producers.remove(&link) {
            if let Some(a) = p.address {
                if let Some(addr) = self.addresses.get_mut(&*a) {
                    addr.producers.retain(|l| *l != link);
                    addr.stats.producers = addr.producers.len();
                }
                self.gc_address(&a);
            }
            return;
        }
        let Some(c) = self.consumers.remove(&link) else {
            return;
        };
        // Every unsettled delivery it had goes back to its producer: it may have been seen.
        let lost: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.consumer == link)
            .map(|(k, _)| *k)
            .collect();
        for dlv in lost {
            self.outcome(dlv, failed());
        }
        let a = c.address;
        let no_consumers = {
            let Some(addr) = self.addresses.get_mut(&a) else {
                return;
            };
            addr.consumers.retain(|l| *l != link);
            addr.stats.consumers = addr.consumers.len();
            addr.consumers.is_empty()
        };
        if no_consumers {
            // Nobody can take messages: producers lose their credit, waiting messages go back.
            let (producers, pending) = {
                let Some(addr) = self.addresses.get_mut(&a) else {
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
                if let Some(addr) = self.addresses.get_mut(&a) {
                    addr.stats.released += 1;
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
        let address: Arc<str> = match (&p.address, to) {
            (Some(a), _) => a.clone(),
            (None, Some(to)) => Arc::from(to),
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
            .get(&*address)
            .map_or_else(|| self.rules.resolve(&address), |a| a.kind);
        if kind.is_brokered() {
            self.release_in(link.conn, len);
            self.settle_producer(
                link,
                delivery_id,
                settled,
                DeliveryState::Rejected(Some(ErrorCondition::new(
                    condition::NOT_IMPLEMENTED,
                    format!("address '{address}' has type {}, served by broker shards, which this router does not have yet", kind.as_str()),
                ))),
            );
            self.grant(link);
            return;
        }
        let has_consumers = self
            .addresses
            .get(&*address)
            .is_some_and(|a| !a.consumers.is_empty());
        if !has_consumers {
            self.release_in(link.conn, len);
            // Only the anonymous relay (or a race with the last consumer leaving) gets here.
            if let Some(a) = self.addresses.get_mut(&*address) {
                a.stats.released += 1;
            }
            self.settle_producer(link, delivery_id, settled, released());
            self.grant(link);
            return;
        }
        let Some(addr) = self.addresses.get_mut(&*address) else {
            return;
        };
        addr.stats.deliveries_in += 1;
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
                    if writable && cons.credit() > 0 && cons.mc_queue.is_empty() {
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
                    } else if cons.mc_queue.len() < cap && cons.mc_bytes < budget {
                        cons.mc_bytes += len;
                        cons.mc_queue.push_back((payload.clone(), format));
                    } else {
                        // A slow multicast consumer loses copies rather than slowing the rest.
                        dropped += 1;
                    }
                }
                if let Some(addr) = self.addresses.get_mut(&*address) {
                    addr.consumers = consumers;
                    addr.stats.deliveries_out += sent;
                    addr.stats.dropped += dropped;
                }
                self.release_in(link.conn, len);
                self.settle_producer(link, delivery_id, settled, DeliveryState::Accepted);
                self.grant(link);
            }
            _ => {
                if let Some(p) = self.producers.get_mut(&link) {
                    p.held += 1;
                }
                let Some(addr) = self.addresses.get_mut(&*address) else {
                    return;
                };
                addr.pending.push_back(Pending {
                    producer: link,
                    delivery_id,
                    settled,
                    payload,
                    format,
                });
                self.pump_address(&address);
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
        addr.stats.deliveries_out += 1;
        let dlv = if tracked {
            addr.stats.unsettled += 1;
            let id = self.next_dlv;
            self.next_dlv += 1;
            self.inflight.insert(
                id,
                InFlight {
                    producer: d.producer,
                    delivery_id: d.delivery_id,
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
                let Some((payload, format)) = c.mc_queue.pop_front() else {
                    break;
                };
                c.mc_bytes -= payload.len();
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
                addr.stats.deliveries_out += out.len() as u64;
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

    fn outcome(&mut self, dlv: u64, state: DeliveryState) {
        let Some(f) = self.inflight.remove(&dlv) else {
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
            addr.stats.unsettled = addr.stats.unsettled.saturating_sub(1);
            match &state {
                DeliveryState::Accepted => addr.stats.accepted += 1,
                DeliveryState::Rejected(_) => addr.stats.rejected += 1,
                DeliveryState::Released => addr.stats.released += 1,
                DeliveryState::Modified { .. } => addr.stats.modified += 1,
                _ => {}
            }
        }
        self.send(
            f.producer.conn,
            ToConn::Outcome {
                link: f.producer.link,
                delivery_id: f.delivery_id,
                state,
            },
        );
        self.gc_address(&f.address);
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
                    if self.rules.insert(decl, Origin::Api) {
                        Ok(())
                    } else {
                        Err("address table full".to_owned())
                    }
                });
                let _ = tx.send(r);
            }
            Mgmt::RemoveAddress(key, tx) => {
                let found = self.rules.remove(&key);
                self.declared.remove(&key);
                self.gc_address(&key);
                let _ = tx.send(found);
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
                unsettled: self.inflight.values().filter(|f| f.producer == *l).count(),
                deliveries: p.deliveries,
            })
            .chain(self.consumers.iter().map(|(l, c)| LinkInfo {
                connection: l.conn,
                name: c.name.clone(),
                role: "receiver",
                address: Some(c.address.clone()),
                credit: c.credit().into(),
                unsettled: unsettled_by_consumer(l),
                deliveries: c.deliveries,
            }))
            .collect();
        links.sort_by(|a, b| (a.connection, &a.name).cmp(&(b.connection, &b.name)));
        let mut addresses: Vec<AddressStats> = self
            .addresses
            .values()
            .map(|a| {
                let mut s = a.stats.clone();
                s.pending = a.pending.len();
                s
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
