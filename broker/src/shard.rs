//! A shard's state: its queues and consumers, changed only by [`Cmd`]s applied in log order.
//!
//! A message's sequence number is the log index of the `Enqueue` entry that carried it, so its
//! body stays in the log and the state holds only metadata. Moving a message to a dead-letter
//! queue moves its sequence number; the body is not copied.
//!
//! Time is part of each command (the proposer's clock), so every replica applying the log makes
//! the same expiry decisions.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

use crate::queue::{
    ConsumerId, Effect, Outcome, Policy, Queue, Seq, get_seqs, put_seqs, put_sorted_seqs,
};
use crate::wire::{Reader, put_bytes, put_opt_u64, put_varint};

/// What a shard's log carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// Creates or updates a queue. Undeclared queues are created on first use with the default
    /// policy and no dead-letter address.
    Declare {
        address: String,
        max_delivery_attempts: u32,
        max_ttl_ms: Option<u64>,
        dead_letter: Option<String>,
        /// Where expired messages go (dropped when none).
        expiry_address: Option<String>,
    },
    Enqueue {
        address: String,
        now: u64,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        body: Vec<u8>,
    },
    Attach {
        consumer: ConsumerId,
        address: String,
        credit: u32,
        now: u64,
    },
    /// The consumer's credit as an absolute limit: how many deliveries it accepts in total
    /// since it attached (AMQP: delivery-count + link-credit). Absolute, so a repeated or late
    /// update cannot over-grant while deliveries are on their way.
    Credit {
        consumer: ConsumerId,
        credit: u32,
        now: u64,
    },
    Settle {
        consumer: ConsumerId,
        seq: Seq,
        outcome: Outcome,
        now: u64,
    },
    Detach {
        consumer: ConsumerId,
        now: u64,
    },
    Tick {
        now: u64,
    },
    Purge {
        address: String,
    },
    /// Attaches `consumer` to subscription `name` on topics matching `filter` (creating the
    /// subscription if needed). A durable subscription keeps collecting messages while no
    /// consumer is attached; a non-durable one goes away with its last consumer. Several
    /// consumers of one subscription compete (shared subscription).
    Subscribe {
        consumer: ConsumerId,
        name: String,
        filter: String,
        durable: bool,
        credit: u32,
        now: u64,
    },
    /// A message published on `topic`: every subscription whose filter matches gets it.
    Publish {
        topic: String,
        now: u64,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        body: Vec<u8>,
    },
    /// Removes a subscription and what it holds.
    Unsubscribe {
        name: String,
    },
    /// Subscription `name` is deleted once it has had no consumer for `keep_ms` (AMQP source
    /// expiry-policy other than `never` with a timeout; MQTT 5's session expiry interval);
    /// `None`: kept while it has none (a durable subscription). Set again by each attach that
    /// says so; a consumer attaching meanwhile stops the clock.
    Expire {
        name: String,
        keep_ms: Option<u64>,
        now: u64,
    },
    /// Creates (or re-filters) durable subscription `name` on topics matching `filter` with no
    /// consumer: it collects messages from now on (the `subscription` address type).
    Bind {
        name: String,
        filter: String,
    },
    /// An `Enqueue` or `Publish` that a router may send more than once (it resends what was
    /// in doubt when a leader changed): applied only if `seq` is above the last one applied
    /// from `origin`. A router's requests reach the log in order, so this drops exactly the
    /// repeats.
    Once {
        origin: u64,
        seq: u64,
        cmd: Box<Cmd>,
    },
    /// An `Enqueue` or `Publish` with a client's deduplication id (duplicate detection, like
    /// Artemis's): skipped when `id` was last applied with the same body, unless `new` (the
    /// client says this is a new message that reuses the id, as an MQTT packet id is reused).
    /// The MQTT gateway uses it for QoS 2: a PUBLISH resent to another gateway after the first
    /// one died is stored once.
    Dedup {
        id: String,
        new: bool,
        /// The message's hash from the router (without the annotations that carry `id`).
        hash: u64,
        cmd: Box<Cmd>,
    },
    /// The consumer known as `old` (every id its router gave it since one was last known
    /// to be applied, oldest first: a resume sent just before another reconnection may never
    /// have reached the log), whose router reconnected (to a new leader, or after a network
    /// break), continues as `new` on `target`: of what those ids held, the messages in `keep`
    /// (those its router received and has not settled) pass to `new`, the rest return to the
    /// queue uncounted (never seen). `keep` messages still ready (their holder is gone) are
    /// claimed. `new` starts with `credit` deliveries available. A new id, so that deliveries
    /// to an old one still on their way are recognisably stale.
    Resume {
        old: Vec<ConsumerId>,
        new: ConsumerId,
        target: Target,
        keep: Vec<Seq>,
        credit: u32,
        now: u64,
    },
}

/// What a consumer reads: a queue, or a subscription (created if needed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Queue {
        address: String,
    },
    Subscription {
        name: String,
        filter: String,
        durable: bool,
    },
}

impl Target {
    fn encode(&self, o: &mut Vec<u8>) {
        match self {
            Target::Queue { address } => {
                o.push(0);
                put_bytes(o, address.as_bytes());
            }
            Target::Subscription {
                name,
                filter,
                durable,
            } => {
                o.push(1 | (u8::from(*durable) << 1));
                put_bytes(o, name.as_bytes());
                put_bytes(o, filter.as_bytes());
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> io::Result<Target> {
        Ok(match r.u8()? {
            0 => Target::Queue {
                address: r.string()?,
            },
            k @ (1 | 3) => Target::Subscription {
                name: r.string()?,
                filter: r.string()?,
                durable: k == 3,
            },
            _ => return Err(bad("bad consumer target")),
        })
    }

    pub(crate) fn put(&self, o: &mut Vec<u8>) {
        self.encode(o)
    }
}

/// Origins (routers' resend identities) remembered for deduplication: forgotten after this
/// long without a message, and the least recently used go first past the count limit.
const ORIGIN_IDLE_MS: u64 = 10 * 60 * 1000;
/// Deduplication ids remembered per shard ([`Cmd::Dedup`]); past it the oldest quarter goes.
pub const MAX_DEDUP_IDS: usize = 1 << 20;
/// Longest deduplication id.
pub const MAX_DEDUP_ID: usize = 1024;
/// A deduplication id is forgotten after this long without use.
const DEDUP_IDLE_MS: u64 = 24 * 60 * 60 * 1000;

/// An `Enqueue` or `Publish` (or, with `dedup`, one inside a [`Cmd::Dedup`]).
fn is_message(c: &Cmd, dedup: bool) -> bool {
    match c {
        Cmd::Enqueue { .. } | Cmd::Publish { .. } => true,
        Cmd::Dedup { cmd, .. } => dedup && is_message(cmd, false),
        _ => false,
    }
}

const MAX_ORIGINS: usize = 65_536;

/// Most old ids one resume names (a router keeps at most this many unconfirmed ones).
pub const MAX_RESUMED_IDS: usize = 16;

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// An outcome as one byte (log and wire).
pub(crate) fn outcome_byte(o: Outcome) -> u8 {
    match o {
        Outcome::Accepted => 0,
        Outcome::Released => 1,
        Outcome::Modified {
            delivery_failed,
            undeliverable_here,
        } => 2 | (delivery_failed as u8) << 2 | (undeliverable_here as u8) << 3,
        Outcome::Rejected => 3,
    }
}

pub(crate) fn outcome_from(b: u8) -> io::Result<Outcome> {
    Ok(match b {
        0 => Outcome::Accepted,
        1 => Outcome::Released,
        3 => Outcome::Rejected,
        m if m & 3 == 2 => Outcome::Modified {
            delivery_failed: m & 4 != 0,
            undeliverable_here: m & 8 != 0,
        },
        _ => return Err(bad("bad outcome")),
    })
}

pub(crate) fn put_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(v) => {
            out.push(1);
            put_bytes(out, v.as_bytes());
        }
        None => out.push(0),
    }
}

pub(crate) fn get_opt_str(r: &mut Reader) -> io::Result<Option<String>> {
    Ok(if r.u8()? != 0 {
        Some(r.string()?)
    } else {
        None
    })
}

fn get_seq_list(r: &mut Reader, into: &mut Vec<Seq>) -> io::Result<()> {
    get_seqs(r, |s| into.push(s))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

impl Cmd {
    pub fn encode(&self) -> Vec<u8> {
        let body = self.body().map_or(0, Vec::len);
        let mut o = Vec::with_capacity(32 + body);
        self.encode_into(&mut o);
        o
    }

    /// Appends the encoding to `o` (a wrapped command goes in place, its body copied once).
    fn encode_into(&self, o: &mut Vec<u8>) {
        match self {
            Cmd::Declare {
                address,
                max_delivery_attempts,
                max_ttl_ms,
                dead_letter,
                expiry_address,
            } => {
                o.push(1);
                put_bytes(o, address.as_bytes());
                put_u32(o, *max_delivery_attempts);
                put_opt_u64(o, *max_ttl_ms);
                put_opt_str(o, dead_letter.as_deref());
                put_opt_str(o, expiry_address.as_deref());
            }
            Cmd::Enqueue {
                address,
                now,
                ttl_ms,
                absolute_expiry,
                body,
            } => {
                o.push(2);
                put_bytes(o, address.as_bytes());
                put_u64(o, *now);
                put_opt_u64(o, *ttl_ms);
                put_opt_u64(o, *absolute_expiry);
                put_bytes(o, body);
            }
            Cmd::Attach {
                consumer,
                address,
                credit,
                now,
            } => {
                o.push(3);
                put_u64(o, *consumer);
                put_bytes(o, address.as_bytes());
                put_u32(o, *credit);
                put_u64(o, *now);
            }
            Cmd::Credit {
                consumer,
                credit,
                now,
            } => {
                o.push(4);
                put_u64(o, *consumer);
                put_u32(o, *credit);
                put_u64(o, *now);
            }
            Cmd::Settle {
                consumer,
                seq,
                outcome,
                now,
            } => {
                o.push(5);
                put_u64(o, *consumer);
                put_u64(o, *seq);
                o.push(outcome_byte(*outcome));
                put_u64(o, *now);
            }
            Cmd::Detach { consumer, now } => {
                o.push(6);
                put_u64(o, *consumer);
                put_u64(o, *now);
            }
            Cmd::Tick { now } => {
                o.push(7);
                put_u64(o, *now);
            }
            Cmd::Purge { address } => {
                o.push(8);
                put_bytes(o, address.as_bytes());
            }
            Cmd::Subscribe {
                consumer,
                name,
                filter,
                durable,
                credit,
                now,
            } => {
                o.push(9);
                put_u64(o, *consumer);
                put_bytes(o, name.as_bytes());
                put_bytes(o, filter.as_bytes());
                o.push(*durable as u8);
                put_u32(o, *credit);
                put_u64(o, *now);
            }
            Cmd::Publish {
                topic,
                now,
                ttl_ms,
                absolute_expiry,
                body,
            } => {
                o.push(10);
                put_bytes(o, topic.as_bytes());
                put_u64(o, *now);
                put_opt_u64(o, *ttl_ms);
                put_opt_u64(o, *absolute_expiry);
                put_bytes(o, body);
            }
            Cmd::Unsubscribe { name } => {
                o.push(11);
                put_bytes(o, name.as_bytes());
            }
            Cmd::Expire { name, keep_ms, now } => {
                o.push(16);
                put_bytes(o, name.as_bytes());
                put_opt_u64(o, *keep_ms);
                put_u64(o, *now);
            }
            Cmd::Bind { name, filter } => {
                o.push(12);
                put_bytes(o, name.as_bytes());
                put_bytes(o, filter.as_bytes());
            }
            Cmd::Once { origin, seq, cmd } => {
                o.push(13);
                put_u64(o, *origin);
                put_u64(o, *seq);
                cmd.encode_into(o);
            }
            Cmd::Dedup { id, new, hash, cmd } => {
                o.push(15);
                put_bytes(o, id.as_bytes());
                o.push(u8::from(*new));
                put_u64(o, *hash);
                cmd.encode_into(o);
            }
            Cmd::Resume {
                old,
                new,
                target,
                keep,
                credit,
                now,
            } => {
                o.push(14);
                put_u32(o, old.len() as u32);
                for id in old {
                    put_u64(o, *id);
                }
                put_u64(o, *new);
                target.encode(o);
                put_sorted_seqs(o, keep);
                put_u32(o, *credit);
                put_u64(o, *now);
            }
        }
    }

    /// The message body this command carries, if any.
    pub fn body(&self) -> Option<&Vec<u8>> {
        match self {
            Cmd::Enqueue { body, .. } | Cmd::Publish { body, .. } => Some(body),
            Cmd::Once { cmd, .. } | Cmd::Dedup { cmd, .. } => cmd.body(),
            _ => None,
        }
    }

    /// [`Cmd::body`], mutably.
    pub fn body_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Cmd::Enqueue { body, .. } | Cmd::Publish { body, .. } => Some(body),
            Cmd::Once { cmd, .. } | Cmd::Dedup { cmd, .. } => cmd.body_mut(),
            _ => None,
        }
    }

    /// The proposer's clock carried by the command (0 for those without one).
    pub fn now(&self) -> u64 {
        match self {
            Cmd::Enqueue { now, .. }
            | Cmd::Publish { now, .. }
            | Cmd::Attach { now, .. }
            | Cmd::Credit { now, .. }
            | Cmd::Settle { now, .. }
            | Cmd::Detach { now, .. }
            | Cmd::Tick { now }
            | Cmd::Subscribe { now, .. }
            | Cmd::Expire { now, .. }
            | Cmd::Resume { now, .. } => *now,
            Cmd::Once { cmd, .. } | Cmd::Dedup { cmd, .. } => cmd.now(),
            Cmd::Declare { .. }
            | Cmd::Purge { .. }
            | Cmd::Unsubscribe { .. }
            | Cmd::Bind { .. } => 0,
        }
    }

    /// [`Cmd::body_mut`], by value.
    pub fn into_body(mut self) -> Option<Vec<u8>> {
        self.body_mut().map(std::mem::take)
    }

    pub fn decode(b: &[u8]) -> io::Result<Cmd> {
        let mut r = Reader(b);
        let cmd = match r.u8()? {
            1 => Cmd::Declare {
                address: r.string()?,
                max_delivery_attempts: r.u32()?,
                max_ttl_ms: r.opt_u64()?,
                dead_letter: get_opt_str(&mut r)?,
                expiry_address: get_opt_str(&mut r)?,
            },
            2 => Cmd::Enqueue {
                address: r.string()?,
                now: r.u64()?,
                ttl_ms: r.opt_u64()?,
                absolute_expiry: r.opt_u64()?,
                body: r.bytes()?,
            },
            3 => Cmd::Attach {
                consumer: r.u64()?,
                address: r.string()?,
                credit: r.u32()?,
                now: r.u64()?,
            },
            4 => Cmd::Credit {
                consumer: r.u64()?,
                credit: r.u32()?,
                now: r.u64()?,
            },
            5 => Cmd::Settle {
                consumer: r.u64()?,
                seq: r.u64()?,
                outcome: outcome_from(r.u8()?)?,
                now: r.u64()?,
            },
            6 => Cmd::Detach {
                consumer: r.u64()?,
                now: r.u64()?,
            },
            7 => Cmd::Tick { now: r.u64()? },
            8 => Cmd::Purge {
                address: r.string()?,
            },
            9 => Cmd::Subscribe {
                consumer: r.u64()?,
                name: r.string()?,
                filter: r.string()?,
                durable: r.u8()? != 0,
                credit: r.u32()?,
                now: r.u64()?,
            },
            10 => Cmd::Publish {
                topic: r.string()?,
                now: r.u64()?,
                ttl_ms: r.opt_u64()?,
                absolute_expiry: r.opt_u64()?,
                body: r.bytes()?,
            },
            11 => Cmd::Unsubscribe { name: r.string()? },
            16 => Cmd::Expire {
                name: r.string()?,
                keep_ms: r.opt_u64()?,
                now: r.u64()?,
            },
            12 => Cmd::Bind {
                name: r.string()?,
                filter: r.string()?,
            },
            13 => {
                let origin = r.u64()?;
                let seq = r.u64()?;
                let cmd = Cmd::decode(r.0)?;
                r.0 = &[];
                // Only messages are deduplicated (nesting at most Once(Dedup(message)):
                // decoding stays shallow).
                if !is_message(&cmd, true) {
                    return Err(bad("only a message may be sent once"));
                }
                Cmd::Once {
                    origin,
                    seq,
                    cmd: Box::new(cmd),
                }
            }
            15 => {
                let id = r.string()?;
                if id.len() > MAX_DEDUP_ID {
                    return Err(bad("deduplication id too long"));
                }
                let new = r.u8()? != 0;
                let hash = r.u64()?;
                let cmd = Cmd::decode(r.0)?;
                r.0 = &[];
                if !is_message(&cmd, false) {
                    return Err(bad("only a message has a deduplication id"));
                }
                Cmd::Dedup {
                    id,
                    new,
                    hash,
                    cmd: Box::new(cmd),
                }
            }
            14 => {
                let n = r.u32()? as usize;
                if n > MAX_RESUMED_IDS || n > r.0.len() / 8 {
                    return Err(bad("too many resumed ids"));
                }
                let mut old = Vec::with_capacity(n);
                for _ in 0..n {
                    old.push(r.u64()?);
                }
                let new = r.u64()?;
                let target = Target::decode(&mut r)?;
                let mut keep = Vec::new();
                get_seq_list(&mut r, &mut keep)?;
                Cmd::Resume {
                    old,
                    new,
                    target,
                    keep,
                    credit: r.u32()?,
                    now: r.u64()?,
                }
            }
            _ => return Err(bad("unknown command")),
        };
        if !r.is_empty() {
            return Err(bad("trailing bytes after command"));
        }
        Ok(cmd)
    }
}

/// What the shard's owner must do after applying a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardEffect {
    /// Send message `seq` (its body is in log entry `seq`) to `consumer`.
    Deliver {
        consumer: ConsumerId,
        seq: Seq,
        delivery_count: u32,
    },
    /// No queue holds `seq` any more: its log entry may be compacted away.
    Forget { seq: Seq },
}

struct QueueEntry {
    queue: Queue,
    /// Where its dead and expired messages go: boxed, as few queues have either.
    routes: Option<Box<Routes>>,
}

struct Routes {
    dead_letter: Option<String>,
    expiry_address: Option<String>,
}

impl QueueEntry {
    fn dead_letter(&self) -> Option<&str> {
        self.routes.as_ref()?.dead_letter.as_deref()
    }

    fn expiry_address(&self) -> Option<&str> {
        self.routes.as_ref()?.expiry_address.as_deref()
    }

    fn set_routes(&mut self, dead_letter: Option<String>, expiry_address: Option<String>) {
        self.routes = (dead_letter.is_some() || expiry_address.is_some()).then(|| {
            Box::new(Routes {
                dead_letter,
                expiry_address,
            })
        });
    }
}

/// Counters of one queue (management, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueInfo {
    pub address: String,
    /// The shard serving it (set by whoever gathers from several shards; 0 here).
    pub shard: u32,
    pub depth: usize,
    pub ready: usize,
    pub consumers: usize,
    pub enqueued: u64,
    pub acknowledged: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    pub redelivered: u64,
}

/// A subscription's binding to topics.
struct Binding {
    filter: Name,
    durable: bool,
    /// Deleted after this long without a consumer ([`Cmd::Expire`]).
    keep_ms: Option<u64>,
    /// Since when it has had no consumer (kept only with `keep_ms`).
    idle_since: Option<u64>,
}

/// The subscriptions' bindings by queue, indexed for publishing: a topic finds the
/// subscriptions with its literal filter by lookup and matches only the wildcard ones (a
/// thousand devices each on its own topic made every PUBLISH match a thousand filters).
#[derive(Default)]
struct Bindings {
    by_queue: BTreeMap<Name, Binding>,
    /// Filters without wildcards → their queues, sorted (usually one: a set's node would
    /// cost a few hundred bytes per subscription).
    literal: BTreeMap<Name, Vec<Name>>,
    /// Queues whose filter has a wildcard.
    wild: BTreeSet<Name>,
}

/// A queue's or filter's name, shared by every map that holds it (a subscription's queue
/// name is in four of them) and cloned per message without an allocation.
pub type Name = Arc<str>;

fn is_wild(filter: &str) -> bool {
    filter.split('/').any(|l| l == "*" || l == "#")
}

impl Bindings {
    fn get(&self, queue: &str) -> Option<&Binding> {
        self.by_queue.get(queue)
    }

    fn len(&self) -> usize {
        self.by_queue.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&Name, &Binding)> {
        self.by_queue.iter()
    }

    /// Binds `queue` to `filter` (replacing its earlier binding, keeping its expiry; a
    /// consumer is attaching, so its idle clock stops).
    fn set(&mut self, queue: Name, filter: &str, durable: bool) {
        let keep_ms = self.by_queue.get(&queue).and_then(|b| b.keep_ms);
        // The filter's name is shared with the literal index when it is there already.
        let filter: Name = match self.literal.get_key_value(filter) {
            Some((f, _)) => f.clone(),
            None => Arc::from(filter),
        };
        self.remove(&queue);
        if is_wild(&filter) {
            self.wild.insert(queue.clone());
        } else {
            let qs = self.literal.entry(filter.clone()).or_default();
            if let Err(i) = qs.binary_search(&queue) {
                if qs.len() < 4 {
                    qs.reserve_exact(1);
                }
                qs.insert(i, queue.clone());
            }
        }
        self.by_queue.insert(
            queue,
            Binding {
                filter,
                durable,
                keep_ms,
                idle_since: None,
            },
        );
    }

    /// Sets `queue`'s expiry; `idle_since` if it has no consumer now.
    fn expire(&mut self, queue: &str, keep_ms: Option<u64>, idle_since: Option<u64>) {
        if let Some(b) = self.by_queue.get_mut(queue) {
            b.keep_ms = keep_ms;
            b.idle_since = keep_ms.and(idle_since);
        }
    }

    /// Its last consumer left `queue` at `now`: an expiring subscription's clock starts.
    fn idle(&mut self, queue: &str, now: u64) {
        if let Some(b) = self.by_queue.get_mut(queue)
            && b.keep_ms.is_some()
        {
            b.idle_since = Some(now);
        }
    }

    /// Subscriptions whose time without a consumer ran out at `now`.
    fn expired(&self, now: u64) -> Vec<Name> {
        self.by_queue
            .iter()
            .filter(|(_, b)| match (b.keep_ms, b.idle_since) {
                (Some(keep), Some(since)) => now.saturating_sub(since) >= keep,
                _ => false,
            })
            .map(|(q, _)| q.clone())
            .collect()
    }

    fn remove(&mut self, queue: &str) {
        let Some(b) = self.by_queue.remove(queue) else {
            return;
        };
        if !self.wild.remove(queue)
            && let Some(qs) = self.literal.get_mut(&b.filter)
        {
            qs.retain(|q| &**q != queue);
            if qs.is_empty() {
                self.literal.remove(&b.filter);
            }
        }
    }

    /// Whether any subscription matches `topic` (allocates nothing).
    fn any_target(&self, topic: &str) -> bool {
        self.literal.contains_key(topic)
            || self.wild.iter().any(|q| {
                self.by_queue
                    .get(q)
                    .is_some_and(|b| crate::topic::matches(&b.filter, topic))
            })
    }

    /// The queues of the subscriptions matching `topic`, in queue order (deterministic on
    /// every replica).
    fn targets(&self, topic: &str) -> Vec<Name> {
        // `wild` iterates in order; literal matches (sorted, and never wild) are merged in.
        let mut out: Vec<Name> = self
            .wild
            .iter()
            .filter(|q| {
                self.by_queue
                    .get(*q)
                    .is_some_and(|b| crate::topic::matches(&b.filter, topic))
            })
            .cloned()
            .collect();
        if let Some(qs) = self.literal.get(topic) {
            let wild = out.len();
            out.extend(qs.iter().cloned());
            if wild > 0 {
                out.sort_unstable();
                out.dedup();
            }
        }
        out
    }
}

/// Purges that remove at most this many messages report each one as forgotten.
const PURGE_REPORT_MAX: usize = 65_536;

/// The queue that holds a subscription's messages.
fn sub_queue(name: &str) -> String {
    format!("$sub:{name}")
}

#[derive(Default)]
pub struct Shard {
    /// Boxed: a node of the map holds 11 entries, and most shards hold many small queues
    /// (a subscription each).
    queues: BTreeMap<Name, Box<QueueEntry>>,
    /// Which queue each attached consumer reads.
    consumers: BTreeMap<ConsumerId, Name>,
    /// Subscriptions by queue name.
    bindings: Bindings,
    /// How many queues hold each message held by more than one (a published message may be
    /// in many); a message held by one queue has no entry, so a queue backlog costs nothing
    /// here.
    refs: BTreeMap<Seq, u32>,
    /// Deliveries made to each consumer since it attached (against its credit limit).
    delivered: BTreeMap<ConsumerId, u32>,
    /// For [`Cmd::Once`]: the last sequence applied from each origin, and when.
    origins: BTreeMap<u64, (u64, u64)>,
    /// For [`Cmd::Dedup`]: each id's body hash, and when it was last applied.
    dedup: BTreeMap<String, (u64, u64)>,
}

impl Shard {
    pub fn new() -> Shard {
        Shard::default()
    }

    fn queue(&mut self, address: &str) -> &mut QueueEntry {
        if !self.queues.contains_key(address) {
            let name: Name = Arc::from(address);
            return self.queue_named(&name);
        }
        match self.queues.get_mut(address) {
            Some(q) => q,
            // Present: checked just above (the borrow checker cannot see it).
            None => unreachable!("queue {address} checked above"),
        }
    }

    /// `address` as a [`Name`]: the queue's own when it exists (no allocation).
    fn name(&self, address: &str) -> Name {
        match self.queues.get_key_value(address) {
            Some((n, _)) => n.clone(),
            None => Arc::from(address),
        }
    }

    fn queue_named(&mut self, address: &Name) -> &mut QueueEntry {
        // A name's clone is a reference count, not a copy: the entry API costs no allocation.
        self.queues.entry(address.clone()).or_insert_with(|| {
            Box::new(QueueEntry {
                queue: Queue::new(Policy::default()),
                routes: None,
            })
        })
    }

    /// Applies the command carried by log entry `index`.
    pub fn apply(&mut self, index: Seq, cmd: Cmd) -> Vec<ShardEffect> {
        let (address, fx, now) = match cmd {
            Cmd::Declare {
                address,
                max_delivery_attempts,
                max_ttl_ms,
                dead_letter,
                expiry_address,
            } => {
                let q = self.queue(&address);
                q.queue.set_policy(Policy {
                    max_delivery_attempts,
                    max_ttl_ms,
                });
                q.set_routes(dead_letter, expiry_address);
                return Vec::new();
            }
            Cmd::Bind { name, filter } => {
                let q = self.name(&sub_queue(&name));
                self.bindings.set(q.clone(), &filter, true);
                self.queue_named(&q);
                return Vec::new();
            }
            Cmd::Enqueue {
                address,
                now,
                ttl_ms,
                absolute_expiry,
                body: _,
            } => {
                let fx = self
                    .queue(&address)
                    .queue
                    .enqueue(index, now, ttl_ms, absolute_expiry);
                return self.resolve(&address, fx, now);
            }
            Cmd::Attach {
                consumer,
                address,
                credit,
                now,
            } => {
                return self
                    .attach(consumer, Target::Queue { address }, credit, now)
                    .1;
            }
            Cmd::Credit {
                consumer,
                credit,
                now,
            } => {
                let Some(address) = self.consumers.get(&consumer).cloned() else {
                    return Vec::new();
                };
                let delivered = self.delivered.get(&consumer).copied().unwrap_or(0);
                let left = credit.wrapping_sub(delivered);
                let available = if (left as i32) < 0 { 0 } else { left };
                let fx = self
                    .queue_named(&address)
                    .queue
                    .credit(consumer, available, now);
                (address, fx, now)
            }
            Cmd::Settle {
                consumer,
                seq,
                outcome,
                now,
            } => {
                let Some(address) = self.consumers.get(&consumer).cloned() else {
                    return Vec::new();
                };
                let fx = self
                    .queue_named(&address)
                    .queue
                    .settle(consumer, seq, outcome, now);
                (address, fx, now)
            }
            Cmd::Detach { consumer, now } => return self.detach(consumer, now),
            Cmd::Tick { now } => {
                self.origins
                    .retain(|_, (_, at)| now.saturating_sub(*at) < ORIGIN_IDLE_MS);
                self.dedup
                    .retain(|_, (_, at)| now.saturating_sub(*at) < DEDUP_IDLE_MS);
                let mut out = Vec::new();
                for q in self.bindings.expired(now) {
                    out.extend(self.unsubscribe(&q));
                }
                // Walked in place (a shard may hold a subscription queue for each of tens of
                // thousands of idle devices, ticked twice a second): only the queues whose
                // expiries fell due are looked up again to resolve their effects.
                let due: Vec<(Name, Vec<Effect>)> = self
                    .queues
                    .iter_mut()
                    .filter_map(|(a, q)| {
                        let fx = q.queue.tick(now);
                        (!fx.is_empty()).then(|| (a.clone(), fx))
                    })
                    .collect();
                for (a, fx) in due {
                    out.extend(self.resolve(&a, fx, now));
                }
                return out;
            }
            Cmd::Purge { address } => {
                let purged = self.queue(&address).queue.purge();
                // Forget effects only evict cached bodies (the cache is bounded and ages out
                // on its own): a purge of millions does not list them all.
                let report = purged.len() <= PURGE_REPORT_MAX;
                let mut out = Vec::new();
                for seq in purged.iter() {
                    let gone = self.release_quiet(seq);
                    if gone && report {
                        out.push(ShardEffect::Forget { seq });
                    }
                }
                return out;
            }
            Cmd::Subscribe {
                consumer,
                name,
                filter,
                durable,
                credit,
                now,
            } => {
                let target = Target::Subscription {
                    name,
                    filter,
                    durable,
                };
                return self.attach(consumer, target, credit, now).1;
            }
            Cmd::Once { origin, seq, cmd } => {
                if self.seen(origin, seq, cmd.now()) {
                    // A repeat: its entry holds no message anyone needs.
                    return vec![ShardEffect::Forget { seq: index }];
                }
                return self.apply(index, *cmd);
            }
            Cmd::Dedup { id, new, hash, cmd } => {
                let now = cmd.now();
                if !new && self.dedup.get(&id).is_some_and(|(h, _)| *h == hash) {
                    if let Some(e) = self.dedup.get_mut(&id) {
                        e.1 = now;
                    }
                    return vec![ShardEffect::Forget { seq: index }];
                }
                if self.dedup.len() >= MAX_DEDUP_IDS && !self.dedup.contains_key(&id) {
                    // Full: the oldest quarter goes (amortised over as many inserts).
                    let mut ats: Vec<u64> = self.dedup.values().map(|(_, at)| *at).collect();
                    ats.sort_unstable();
                    let cut = ats[ats.len() / 4];
                    self.dedup.retain(|_, (_, at)| *at > cut);
                }
                self.dedup.insert(id, (hash, now));
                return self.apply(index, *cmd);
            }
            Cmd::Resume {
                old,
                new,
                target,
                keep,
                credit,
                now,
            } => return self.resume(old, new, target, keep, credit, now),
            Cmd::Publish {
                topic,
                now,
                ttl_ms,
                absolute_expiry,
                body: _,
            } => {
                let targets = self.bindings.targets(&topic);
                if targets.is_empty() {
                    // Nobody subscribed: the message is not kept.
                    return vec![ShardEffect::Forget { seq: index }];
                }
                if targets.len() > 1 {
                    self.refs.insert(index, targets.len() as u32);
                }
                let mut out = Vec::new();
                for q in targets {
                    let fx =
                        self.queue_named(&q)
                            .queue
                            .enqueue(index, now, ttl_ms, absolute_expiry);
                    out.extend(self.resolve(&q, fx, now));
                }
                return out;
            }
            Cmd::Unsubscribe { name } => return self.unsubscribe(&sub_queue(&name)),
            Cmd::Expire { name, keep_ms, now } => {
                let q = sub_queue(&name);
                let idle = self
                    .queues
                    .get(q.as_str())
                    .is_none_or(|e| e.queue.consumers() == 0);
                self.bindings.expire(&q, keep_ms, idle.then_some(now));
                return Vec::new();
            }
        };
        self.resolve(&address, fx, now)
    }

    /// Attaches `consumer` to `target` (leaving whatever it read before); returns the queue
    /// it reads.
    fn attach(
        &mut self,
        consumer: ConsumerId,
        target: Target,
        credit: u32,
        now: u64,
    ) -> (Name, Vec<ShardEffect>) {
        // A consumer id reattaching elsewhere leaves its old queue first.
        let mut fx = self.detach(consumer, now);
        let q = match target {
            Target::Queue { address } => self.name(&address),
            Target::Subscription {
                name,
                filter,
                durable,
            } => {
                let q = self.name(&sub_queue(&name));
                // A durable subscription reattached with another filter takes the new one.
                self.bindings.set(q.clone(), &filter, durable);
                q
            }
        };
        self.consumers.insert(consumer, q.clone());
        self.delivered.insert(consumer, 0);
        let more = self.queue_named(&q).queue.attach(consumer, credit, now);
        fx.extend(self.resolve(&q, more, now));
        (q, fx)
    }

    /// See [`Cmd::Resume`].
    fn resume(
        &mut self,
        old: Vec<ConsumerId>,
        new: ConsumerId,
        target: Target,
        keep: Vec<Seq>,
        credit: u32,
        now: u64,
    ) -> Vec<ShardEffect> {
        let (q, mut fx) = self.attach(new, target, 0, now);
        let keep: std::collections::BTreeSet<Seq> = keep.into_iter().collect();
        let mut qfx = Vec::new();
        for old in old {
            if old == new {
                continue;
            }
            if self.consumers.get(&old) == Some(&q) {
                self.consumers.remove(&old);
                self.delivered.remove(&old);
                self.queue(&q).queue.transfer(old, new, &keep, &mut qfx);
            } else {
                // Gone already, never attached (a resume that did not reach the log), or
                // reading something else: what it held went back with an attempt counted;
                // take back below what is still there.
                fx.extend(self.detach(old, now));
            }
        }
        let queue = &mut self.queue_named(&q).queue;
        for seq in &keep {
            queue.claim(new, *seq);
        }
        qfx.extend(queue.credit(new, credit, now));
        fx.extend(self.resolve(&q, qfx, now));
        fx
    }

    /// True if `seq` from `origin` was applied already; records it otherwise.
    fn seen(&mut self, origin: u64, seq: u64, now: u64) -> bool {
        if let Some((last, at)) = self.origins.get_mut(&origin) {
            if seq <= *last {
                return true;
            }
            *last = seq;
            *at = now;
            return false;
        }
        if self.origins.len() >= MAX_ORIGINS {
            let oldest = self.origins.iter().min_by_key(|(_, (_, at))| *at);
            if let Some(&o) = oldest.map(|(o, _)| o) {
                self.origins.remove(&o);
            }
        }
        self.origins.insert(origin, (seq, now));
        false
    }

    fn detach(&mut self, consumer: ConsumerId, now: u64) -> Vec<ShardEffect> {
        let Some(address) = self.consumers.remove(&consumer) else {
            return Vec::new();
        };
        self.delivered.remove(&consumer);
        let fx = self.queue_named(&address).queue.detach(consumer, now);
        let mut out = self.resolve(&address, fx, now);
        let alone = self
            .queues
            .get(&address)
            .is_some_and(|q| q.queue.consumers() == 0);
        let orphan = alone && self.bindings.get(&address).is_some_and(|b| !b.durable);
        if orphan {
            out.extend(self.unsubscribe(&address));
        } else if alone {
            self.bindings.idle(&address, now);
        }
        out
    }

    /// Drops a subscription queue, its binding, its consumers and its hold on messages.
    fn unsubscribe(&mut self, queue: &str) -> Vec<ShardEffect> {
        self.bindings.remove(queue);
        let mut out = Vec::new();
        if let Some(entry) = self.queues.remove(queue) {
            // The queue lists its own consumers (each is in `consumers` under this queue's
            // name): a scan of every consumer of the shard would make a mass disconnect of
            // clean-session devices quadratic.
            for id in entry.queue.consumer_ids() {
                if self.consumers.get(&id).is_some_and(|q| &**q == queue) {
                    self.consumers.remove(&id);
                    self.delivered.remove(&id);
                }
            }
            for seq in entry.queue.seqs() {
                self.release(seq, &mut out);
            }
        }
        out
    }

    /// One queue no longer holds `seq`; the log entry is forgotten when none does.
    fn release(&mut self, seq: Seq, out: &mut Vec<ShardEffect>) {
        if self.release_quiet(seq) {
            out.push(ShardEffect::Forget { seq });
        }
    }

    /// Drops one hold on `seq`; true when no queue holds it any more.
    fn release_quiet(&mut self, seq: Seq) -> bool {
        match self.refs.get_mut(&seq) {
            Some(n) if *n > 2 => {
                *n -= 1;
                false
            }
            Some(_) => {
                // Two holders left one: back to the implicit single holder.
                self.refs.remove(&seq);
                false
            }
            None => true,
        }
    }

    /// Turns queue effects into shard effects; dead letters move to the dead-letter queue.
    fn resolve(&mut self, address: &str, fx: Vec<Effect>, now: u64) -> Vec<ShardEffect> {
        let mut out = Vec::with_capacity(fx.len());
        // Dead-lettering can chain (a dead-letter queue with its own dead-letter address);
        // bound the chain so a cycle in configuration cannot loop. The first queue's effects
        // need no owned copy of its name (nothing is allocated for the usual single queue).
        let mut pending: Vec<(String, Vec<Effect>)> = Vec::new();
        let mut hops = 0;
        let mut next = Some((std::borrow::Cow::Borrowed(address), fx));
        while let Some((addr, fx)) = next.take() {
            let addr = &*addr;
            for e in fx {
                match e {
                    Effect::Deliver {
                        consumer,
                        seq,
                        delivery_count,
                    } => {
                        let n = self.delivered.entry(consumer).or_default();
                        *n = n.wrapping_add(1);
                        out.push(ShardEffect::Deliver {
                            consumer,
                            seq,
                            delivery_count,
                        })
                    }
                    Effect::Forget { seq } => self.release(seq, &mut out),
                    Effect::DeadLetter { .. } | Effect::Expired { .. } => {
                        let (seq, to) = match e {
                            Effect::Expired { seq } => (
                                seq,
                                self.queues
                                    .get(addr)
                                    .and_then(|q| q.expiry_address().map(str::to_owned)),
                            ),
                            Effect::DeadLetter { seq, .. } => (
                                seq,
                                self.queues
                                    .get(addr)
                                    .and_then(|q| q.dead_letter().map(str::to_owned)),
                            ),
                            _ => continue,
                        };
                        let dl = to.filter(|d| d != addr);
                        match dl {
                            Some(d) if hops < 8 => {
                                hops += 1;
                                let fx = self.queue(&d).queue.enqueue(seq, now, None, None);
                                pending.push((d, fx));
                            }
                            _ => self.release(seq, &mut out),
                        }
                    }
                }
            }
            next = pending
                .pop()
                .map(|(a, fx)| (std::borrow::Cow::Owned(a), fx));
        }
        out
    }

    /// Whether a message published on `topic` now would reach any subscription.
    pub fn publishes_to(&self, topic: &str) -> bool {
        self.bindings.any_target(topic)
    }

    /// Whether `consumer` is attached.
    pub fn has_consumer(&self, consumer: ConsumerId) -> bool {
        self.consumers.contains_key(&consumer)
    }

    /// Whether any subscription exists.
    pub fn has_bindings(&self) -> bool {
        self.bindings.len() > 0
    }

    /// Whether subscription `name` exists.
    pub fn has_subscription(&self, name: &str) -> bool {
        self.bindings.get(&sub_queue(name)).is_some()
    }

    /// Consumers attached in the state (after a restart, these belong to connections that
    /// died with the process and must be detached).
    pub fn consumer_ids(&self) -> Vec<ConsumerId> {
        self.consumers.keys().copied().collect()
    }

    /// Every message some queue holds (ready or unacknowledged), once each.
    pub fn live_seqs(&self) -> std::collections::BTreeSet<Seq> {
        self.queues.values().flat_map(|q| q.queue.seqs()).collect()
    }

    /// The oldest message any queue still holds: log entries before it hold no live message.
    pub fn oldest_live(&self) -> Option<Seq> {
        self.queues.values().filter_map(|q| q.queue.min_seq()).min()
    }

    /// The whole state, for a snapshot (see [`Shard::decode`]).
    pub fn encode(&self, o: &mut Vec<u8>) {
        put_varint(o, self.queues.len() as u64);
        for (name, q) in &self.queues {
            put_bytes(o, name.as_bytes());
            put_opt_str(o, q.dead_letter());
            put_opt_str(o, q.expiry_address());
            q.queue.encode(o);
        }
        put_varint(o, self.consumers.len() as u64);
        for (id, q) in &self.consumers {
            put_varint(o, *id);
            put_bytes(o, q.as_bytes());
        }
        put_varint(o, self.bindings.len() as u64);
        for (q, b) in self.bindings.iter() {
            put_bytes(o, q.as_bytes());
            put_bytes(o, b.filter.as_bytes());
            o.push(u8::from(b.durable));
            put_opt_u64(o, b.keep_ms);
            put_opt_u64(o, b.idle_since);
        }
        put_seqs(o, self.refs.len(), self.refs.keys().copied());
        for n in self.refs.values() {
            put_varint(o, u64::from(*n));
        }
        put_varint(o, self.delivered.len() as u64);
        for (id, n) in &self.delivered {
            put_varint(o, *id);
            put_varint(o, u64::from(*n));
        }
        put_varint(o, self.origins.len() as u64);
        for (origin, (seq, at)) in &self.origins {
            put_varint(o, *origin);
            put_varint(o, *seq);
            put_varint(o, *at);
        }
        put_varint(o, self.dedup.len() as u64);
        for (id, (hash, at)) in &self.dedup {
            put_bytes(o, id.as_bytes());
            put_u64(o, *hash);
            put_varint(o, *at);
        }
    }

    /// Reads what [`Shard::encode`] wrote; damaged input is an error.
    pub fn decode(b: &[u8]) -> io::Result<Shard> {
        let mut r = Reader(b);
        let mut shard = Shard::new();
        let small = |v: u64| u32::try_from(v).map_err(|_| bad("value out of range"));
        for _ in 0..r.count(5)? {
            let name = r.string()?;
            let dead_letter = get_opt_str(&mut r)?;
            let expiry_address = get_opt_str(&mut r)?;
            let queue = Queue::decode(&mut r)?;
            let mut entry = Box::new(QueueEntry {
                queue,
                routes: None,
            });
            entry.set_routes(dead_letter, expiry_address);
            shard.queues.insert(Arc::from(name), entry);
        }
        for _ in 0..r.count(5)? {
            let id = r.varint()?;
            let q = shard.name(&r.string()?);
            shard.consumers.insert(id, q);
        }
        for _ in 0..r.count(9)? {
            let q = shard.name(&r.string()?);
            let filter = r.string()?;
            let durable = r.u8()? != 0;
            let keep_ms = r.opt_u64()?;
            let idle_since = r.opt_u64()?;
            shard.bindings.set(q.clone(), &filter, durable);
            shard.bindings.expire(&q, keep_ms, idle_since);
        }
        let mut seqs = Vec::new();
        get_seq_list(&mut r, &mut seqs)?;
        for seq in seqs {
            shard.refs.insert(seq, small(r.varint()?)?);
        }
        for _ in 0..r.count(2)? {
            let id = r.varint()?;
            shard.delivered.insert(id, small(r.varint()?)?);
        }
        for _ in 0..r.count(3)? {
            let origin = r.varint()?;
            let seq = r.varint()?;
            let at = r.varint()?;
            shard.origins.insert(origin, (seq, at));
        }
        for _ in 0..r.count(10)? {
            let id = r.string()?;
            let hash = r.u64()?;
            let at = r.varint()?;
            shard.dedup.insert(id, (hash, at));
        }
        if !r.is_empty() {
            return Err(bad("trailing bytes after shard state"));
        }
        Ok(shard)
    }

    /// Counters of the queues whose address starts with `prefix`.
    pub fn info(&self, prefix: &str) -> Vec<QueueInfo> {
        // Addresses are sorted: the ones under `prefix` are one range.
        self.queues
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(a, _)| a.starts_with(prefix))
            .map(|(a, q)| QueueInfo {
                address: a.to_string(),
                shard: 0,
                depth: q.queue.depth(),
                ready: q.queue.ready(),
                consumers: q.queue.consumers(),
                enqueued: q.queue.stats.enqueued,
                acknowledged: q.queue.stats.acknowledged,
                expired: q.queue.stats.expired,
                dead_lettered: q.queue.stats.dead_lettered,
                redelivered: q.queue.stats.redelivered,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enqueue(address: &str, now: u64) -> Cmd {
        Cmd::Enqueue {
            address: address.into(),
            now,
            ttl_ms: None,
            absolute_expiry: None,
            body: b"x".to_vec(),
        }
    }

    #[test]
    fn commands_round_trip() {
        let cmds = vec![
            Cmd::Declare {
                address: "q".into(),
                max_delivery_attempts: 3,
                max_ttl_ms: Some(5),
                dead_letter: Some("dlq".into()),
                expiry_address: None,
            },
            enqueue("q", 7),
            Cmd::Attach {
                consumer: 9,
                address: "q".into(),
                credit: 10,
                now: 1,
            },
            Cmd::Credit {
                consumer: 9,
                credit: 2,
                now: 2,
            },
            Cmd::Settle {
                consumer: 9,
                seq: 4,
                outcome: Outcome::Modified {
                    delivery_failed: true,
                    undeliverable_here: false,
                },
                now: 3,
            },
            Cmd::Detach {
                consumer: 9,
                now: 4,
            },
            Cmd::Tick { now: 5 },
            Cmd::Purge {
                address: "q".into(),
            },
            Cmd::Once {
                origin: u64::MAX,
                seq: 3,
                cmd: Box::new(enqueue("q", 8)),
            },
            Cmd::Once {
                origin: 1,
                seq: 1,
                cmd: Box::new(publish("t/a")),
            },
            Cmd::Once {
                origin: 2,
                seq: 9,
                cmd: Box::new(dedup("mqtt:c:7", false, 42, enqueue("q", 9))),
            },
            dedup("x", true, u64::MAX, publish("t/b")),
            Cmd::Expire {
                name: "s".into(),
                keep_ms: Some(60_000),
                now: 3,
            },
            Cmd::Resume {
                old: vec![1 << 50],
                new: 7,
                target: Target::Queue {
                    address: "q".into(),
                },
                keep: vec![3, 9, 27],
                credit: 4,
                now: 6,
            },
            Cmd::Resume {
                old: vec![2, 5],
                new: 8,
                target: Target::Subscription {
                    name: "n".into(),
                    filter: "t/#".into(),
                    durable: true,
                },
                keep: vec![],
                credit: 0,
                now: 7,
            },
        ];
        for c in cmds {
            assert_eq!(Cmd::decode(&c.encode()).unwrap(), c);
        }
        assert!(Cmd::decode(&[2, 0, 0]).is_err());
        assert!(Cmd::decode(&[99]).is_err());
        // Only a message may be wrapped, once.
        let mut nested = vec![13];
        nested.extend_from_slice(&[0; 16]);
        nested.extend_from_slice(&Cmd::Tick { now: 1 }.encode());
        assert!(Cmd::decode(&nested).is_err());
    }

    fn once(origin: u64, seq: u64, address: &str) -> Cmd {
        Cmd::Once {
            origin,
            seq,
            cmd: Box::new(enqueue(address, 0)),
        }
    }

    fn queue_depth(s: &Shard, address: &str) -> (usize, usize) {
        s.info("")
            .iter()
            .find(|i| i.address == address)
            .map_or((0, 0), |i| (i.depth, i.ready))
    }

    #[test]
    fn indexed_bindings_find_what_matching_every_filter_finds() {
        let filters = [
            "a/b", "a/*", "a/#", "#", "a/b/c", "x/y", "a*b", "*/b", "a/b",
        ];
        let mut b = Bindings::default();
        for (i, f) in filters.iter().enumerate() {
            b.set(format!("q{i}").into(), f, false);
        }
        // Re-binding moves a queue from one index to the other; removal leaves no trace.
        b.set("q1".into(), "x/y", true);
        b.set("q4".into(), "*/c", true);
        b.remove("q5");
        for topic in ["a/b", "a/c", "a/b/c", "x/y", "a*b", "z", "b/c"] {
            let naive: Vec<Name> = b
                .iter()
                .filter(|(_, x)| crate::topic::matches(&x.filter, topic))
                .map(|(q, _)| q.clone())
                .collect();
            assert_eq!(b.targets(topic), naive, "{topic}");
        }
        assert!(
            b.literal
                .values()
                .all(|qs| !qs.iter().any(|q| &**q == "q5"))
        );
    }

    fn dedup(id: &str, new: bool, hash: u64, cmd: Cmd) -> Cmd {
        Cmd::Dedup {
            id: id.into(),
            new,
            hash,
            cmd: Box::new(cmd),
        }
    }

    #[test]
    fn a_message_with_a_deduplication_id_is_stored_once_unless_new() {
        let mut s = Shard::new();
        assert!(
            s.apply(1, dedup("mqtt:c:1", true, 10, enqueue("q", 1)))
                .is_empty()
        );
        // Resent (DUP) through another gateway: the same id and hash, not stored again.
        assert_eq!(
            s.apply(2, dedup("mqtt:c:1", false, 10, enqueue("q", 2))),
            vec![ShardEffect::Forget { seq: 2 }]
        );
        assert_eq!(queue_depth(&s, "q"), (1, 1));
        // A resend of another message under that id (the first attempt never arrived).
        assert!(
            s.apply(3, dedup("mqtt:c:1", false, 11, enqueue("q", 3)))
                .is_empty()
        );
        // A new message reusing the id: stored even with the same hash.
        assert!(
            s.apply(4, dedup("mqtt:c:1", true, 11, enqueue("q", 4)))
                .is_empty()
        );
        assert_eq!(queue_depth(&s, "q"), (3, 3));
        // Remembered across a snapshot; forgotten after a long silence.
        let mut snap = Vec::new();
        s.encode(&mut snap);
        let mut b = Shard::decode(&snap).unwrap();
        assert_eq!(
            b.apply(5, dedup("mqtt:c:1", false, 11, enqueue("q", 5))),
            vec![ShardEffect::Forget { seq: 5 }]
        );
        b.apply(
            6,
            Cmd::Tick {
                now: DEDUP_IDLE_MS + 10,
            },
        );
        assert!(
            b.apply(
                7,
                dedup("mqtt:c:1", false, 11, enqueue("q", DEDUP_IDLE_MS + 10))
            )
            .is_empty()
        );
    }

    #[test]
    fn a_resent_message_is_applied_once() {
        let mut s = Shard::new();
        assert!(s.apply(1, once(7, 1, "q")).is_empty());
        assert!(s.apply(2, once(7, 2, "q")).is_empty());
        // The router resends 2 and 3 after a leader change: 2 is a repeat.
        assert_eq!(
            s.apply(3, once(7, 2, "q")),
            vec![ShardEffect::Forget { seq: 3 }]
        );
        assert!(s.apply(4, once(7, 3, "q")).is_empty());
        // Another origin counts on its own.
        assert!(s.apply(5, once(8, 1, "q")).is_empty());
        assert_eq!(queue_depth(&s, "q"), (4, 4));
        // Remembered across a snapshot.
        let mut snap = Vec::new();
        s.encode(&mut snap);
        let mut b = Shard::decode(&snap).unwrap();
        assert_eq!(
            b.apply(6, once(7, 3, "q")),
            vec![ShardEffect::Forget { seq: 6 }]
        );
        // Forgotten after a long silence (a new router process uses a new origin anyway).
        b.apply(
            7,
            Cmd::Tick {
                now: ORIGIN_IDLE_MS + 1,
            },
        );
        assert!(b.apply(8, once(7, 3, "q")).is_empty());
    }

    fn attach(consumer: u64, address: &str, credit: u32) -> Cmd {
        Cmd::Attach {
            consumer,
            address: address.into(),
            credit,
            now: 0,
        }
    }

    fn resume(old: u64, new: u64, keep: Vec<u64>, credit: u32) -> Cmd {
        Cmd::Resume {
            old: vec![old],
            new,
            target: Target::Queue {
                address: "q".into(),
            },
            keep,
            credit,
            now: 0,
        }
    }

    #[test]
    fn a_resumed_consumer_keeps_what_its_client_holds() {
        let mut s = Shard::new();
        s.apply(1, attach(1, "q", 3));
        for i in 2..=4 {
            assert_eq!(s.apply(i, enqueue("q", 0)), vec![deliver(1, i)]);
        }
        // Its router got 2 and 3; 4 was lost with the old leader's connection.
        assert!(s.apply(5, resume(1, 2, vec![2, 3], 0)).is_empty());
        assert_eq!(queue_depth(&s, "q"), (3, 1));
        // The old id is gone: its late settlement does nothing; the new id's works.
        assert!(s.apply(6, settle(1, 3)).is_empty());
        assert_eq!(
            s.apply(7, settle(2, 3)),
            vec![ShardEffect::Forget { seq: 3 }]
        );
        // 4 comes again, as a first delivery (the client never saw it).
        assert_eq!(
            s.apply(
                8,
                Cmd::Credit {
                    consumer: 2,
                    credit: 1,
                    now: 0
                }
            ),
            vec![deliver(2, 4)]
        );
        assert_eq!(s.consumer_ids(), vec![2]);
    }

    #[test]
    fn a_resume_names_every_id_since_the_last_applied_one() {
        let mut s = Shard::new();
        s.apply(1, attach(1, "q", 2));
        assert_eq!(s.apply(2, enqueue("q", 0)), vec![deliver(1, 2)]);
        assert_eq!(s.apply(3, enqueue("q", 0)), vec![deliver(1, 3)]);
        // The router resumed 1 as 2, but that resume never reached the log before the
        // connection broke again; the next one names both. 1's messages pass to 3.
        let mut r = resume(1, 3, vec![2, 3], 0);
        if let Cmd::Resume { old, .. } = &mut r {
            old.push(2);
        }
        assert!(s.apply(4, r).is_empty());
        assert_eq!(s.consumer_ids(), vec![3]);
        // Both held by 3, none ready (no redelivery).
        assert_eq!(queue_depth(&s, "q"), (2, 0));
        assert_eq!(
            s.apply(5, settle(3, 2)),
            vec![ShardEffect::Forget { seq: 2 }]
        );
    }

    #[test]
    fn a_consumer_resumed_after_its_detach_claims_what_is_still_there() {
        let mut s = Shard::new();
        s.apply(1, attach(1, "q", 2));
        s.apply(2, enqueue("q", 0));
        s.apply(3, enqueue("q", 0));
        // Detached after the grace period; 2 and 3 are ready again.
        assert!(
            s.apply(
                4,
                Cmd::Detach {
                    consumer: 1,
                    now: 0
                }
            )
            .is_empty()
        );
        assert_eq!(queue_depth(&s, "q"), (2, 2));
        // The router comes back holding 2 (3 was settled in the meantime, say, and is not
        // kept): 2 is claimed without a delivery, 3 is delivered.
        let fx = s.apply(5, resume(1, 2, vec![2], 5));
        assert_eq!(
            fx,
            vec![ShardEffect::Deliver {
                consumer: 2,
                seq: 3,
                delivery_count: 1
            }]
        );
        assert_eq!(queue_depth(&s, "q"), (2, 0));
        assert_eq!(
            s.apply(6, settle(2, 2)),
            vec![ShardEffect::Forget { seq: 2 }]
        );
    }

    #[test]
    fn resuming_the_only_consumer_of_a_temporary_subscription_keeps_it() {
        let mut s = Shard::new();
        s.apply(1, subscribe(1, "link:1", "t/#", false));
        assert_eq!(s.apply(2, publish("t/a")), vec![deliver(1, 2)]);
        let fx = s.apply(
            3,
            Cmd::Resume {
                old: vec![1],
                new: 2,
                target: Target::Subscription {
                    name: "link:1".into(),
                    filter: "t/#".into(),
                    durable: false,
                },
                keep: vec![2],
                credit: 10,
                now: 0,
            },
        );
        assert!(fx.is_empty());
        assert_eq!(s.apply(4, publish("t/b")), vec![deliver(2, 4)]);
        assert_eq!(
            s.apply(5, settle(2, 2)),
            vec![ShardEffect::Forget { seq: 2 }]
        );
    }

    #[test]
    fn rejected_message_moves_to_dead_letter_queue_by_seq() {
        let mut s = Shard::new();
        s.apply(
            1,
            Cmd::Declare {
                address: "orders".into(),
                max_delivery_attempts: 5,
                max_ttl_ms: None,
                dead_letter: Some("orders.dlq".into()),
                expiry_address: None,
            },
        );
        s.apply(2, enqueue("orders", 0));
        let fx = s.apply(
            3,
            Cmd::Attach {
                consumer: 1,
                address: "orders".into(),
                credit: 5,
                now: 0,
            },
        );
        assert_eq!(
            fx,
            vec![ShardEffect::Deliver {
                consumer: 1,
                seq: 2,
                delivery_count: 0
            }]
        );
        let fx = s.apply(
            4,
            Cmd::Settle {
                consumer: 1,
                seq: 2,
                outcome: Outcome::Rejected,
                now: 0,
            },
        );
        assert!(fx.is_empty(), "moved, not forgotten: {fx:?}");
        let fx = s.apply(
            5,
            Cmd::Attach {
                consumer: 2,
                address: "orders.dlq".into(),
                credit: 5,
                now: 0,
            },
        );
        assert_eq!(
            fx,
            vec![ShardEffect::Deliver {
                consumer: 2,
                seq: 2,
                delivery_count: 0
            }]
        );
        assert_eq!(s.oldest_live(), Some(2));
        let fx = s.apply(
            6,
            Cmd::Settle {
                consumer: 2,
                seq: 2,
                outcome: Outcome::Accepted,
                now: 0,
            },
        );
        assert_eq!(fx, vec![ShardEffect::Forget { seq: 2 }]);
        assert_eq!(s.oldest_live(), None);
    }
    fn publish(topic: &str) -> Cmd {
        Cmd::Publish {
            topic: topic.into(),
            now: 0,
            ttl_ms: None,
            absolute_expiry: None,
            body: b"t".to_vec(),
        }
    }

    fn subscribe(consumer: u64, name: &str, filter: &str, durable: bool) -> Cmd {
        Cmd::Subscribe {
            consumer,
            name: name.into(),
            filter: filter.into(),
            durable,
            credit: 10,
            now: 0,
        }
    }

    fn settle(consumer: u64, seq: u64) -> Cmd {
        Cmd::Settle {
            consumer,
            seq,
            outcome: Outcome::Accepted,
            now: 0,
        }
    }

    fn deliver(consumer: u64, seq: u64) -> ShardEffect {
        ShardEffect::Deliver {
            consumer,
            seq,
            delivery_count: 0,
        }
    }

    #[test]
    fn topic_commands_round_trip() {
        for c in [
            publish("a/b"),
            subscribe(3, "s", "a/#", true),
            Cmd::Unsubscribe { name: "s".into() },
        ] {
            assert_eq!(Cmd::decode(&c.encode()).unwrap(), c);
        }
    }

    #[test]
    fn fan_out_to_matching_subscriptions_and_forget_after_last_ack() {
        let mut s = Shard::new();
        assert_eq!(
            s.apply(1, publish("sensors/a/temp")),
            vec![ShardEffect::Forget { seq: 1 }]
        );
        s.apply(2, subscribe(10, "all", "sensors/#", false));
        s.apply(3, subscribe(11, "a-temp", "sensors/a/temp", false));
        s.apply(4, subscribe(12, "b", "sensors/b/*", false));
        let fx = s.apply(5, publish("sensors/a/temp"));
        assert_eq!(fx, vec![deliver(11, 5), deliver(10, 5)]);
        assert!(s.apply(6, settle(10, 5)).is_empty(), "still held by a-temp");
        assert_eq!(
            s.apply(7, settle(11, 5)),
            vec![ShardEffect::Forget { seq: 5 }]
        );
        assert_eq!(s.oldest_live(), None);
    }

    #[test]
    fn an_expiring_subscription_goes_after_its_time_without_a_consumer() {
        let mut s = Shard::new();
        let expire = |keep_ms, now| Cmd::Expire {
            name: "e".into(),
            keep_ms,
            now,
        };
        s.apply(1, subscribe(1, "e", "dev/#", true));
        s.apply(2, expire(Some(1000), 0));
        s.apply(
            3,
            Cmd::Detach {
                consumer: 1,
                now: 100,
            },
        );
        // Kept within the time (collecting), the clock stopped by a consumer coming back.
        s.apply(4, Cmd::Tick { now: 1000 });
        assert!(s.apply(5, publish("dev/x")).is_empty());
        assert_eq!(
            s.apply(6, subscribe(2, "e", "dev/#", true)),
            vec![deliver(2, 5)]
        );
        s.apply(7, Cmd::Tick { now: 5000 });
        assert_eq!(queue_depth(&s, "$sub:e"), (1, 0));
        // Gone for good 1 s after the last consumer left; a snapshot keeps the clock.
        s.apply(
            8,
            Cmd::Detach {
                consumer: 2,
                now: 6000,
            },
        );
        let mut snap = Vec::new();
        s.encode(&mut snap);
        let mut b = Shard::decode(&snap).unwrap();
        b.apply(9, Cmd::Tick { now: 6999 });
        assert_eq!(b.info("$sub:e").len(), 1);
        b.apply(10, Cmd::Tick { now: 7000 });
        assert!(b.info("$sub:e").is_empty());
        assert!(
            b.apply(11, publish("dev/x"))
                .iter()
                .all(|e| matches!(e, ShardEffect::Forget { .. }))
        );
        // Expiry None: kept for good.
        b.apply(12, subscribe(3, "f", "dev/#", true));
        b.apply(13, expire(None, 0));
        b.apply(
            14,
            Cmd::Detach {
                consumer: 3,
                now: 0,
            },
        );
        b.apply(15, Cmd::Tick { now: u64::MAX / 2 });
        assert_eq!(b.info("$sub:f").len(), 1);
    }

    #[test]
    fn durable_subscription_keeps_messages_while_away_non_durable_does_not() {
        let mut s = Shard::new();
        s.apply(1, subscribe(1, "d", "news/#", true));
        s.apply(2, subscribe(2, "nd", "news/#", false));
        s.apply(
            3,
            Cmd::Detach {
                consumer: 1,
                now: 0,
            },
        );
        // The non-durable one goes away with its consumer.
        s.apply(
            4,
            Cmd::Detach {
                consumer: 2,
                now: 0,
            },
        );
        assert!(
            s.apply(5, publish("news/x")).is_empty(),
            "kept for the durable one"
        );
        let fx = s.apply(6, subscribe(3, "d", "news/#", true));
        assert_eq!(fx, vec![deliver(3, 5)]);
        assert_eq!(
            s.apply(7, settle(3, 5)),
            vec![ShardEffect::Forget { seq: 5 }]
        );
    }

    #[test]
    fn shared_subscription_consumers_compete() {
        let mut s = Shard::new();
        s.apply(1, subscribe(1, "work", "jobs", true));
        s.apply(2, subscribe(2, "work", "jobs", true));
        let mut got = Vec::new();
        for i in 3..7 {
            got.extend(s.apply(i, publish("jobs")));
        }
        assert_eq!(
            got,
            vec![deliver(1, 3), deliver(2, 4), deliver(1, 5), deliver(2, 6)]
        );
    }

    /// A snapshot taken at any point restores a shard that behaves exactly like the original
    /// from there on.
    #[test]
    fn snapshot_restores_an_equivalent_shard() {
        let script = vec![
            Cmd::Declare {
                address: "q".into(),
                max_delivery_attempts: 2,
                max_ttl_ms: Some(100_000),
                dead_letter: Some("dlq".into()),
                expiry_address: None,
            },
            enqueue("q", 1),
            enqueue("q", 2),
            subscribe(5, "s1", "t/#", true),
            subscribe(6, "s2", "t/*", false),
            Cmd::Publish {
                topic: "t/a".into(),
                now: 3,
                ttl_ms: Some(10),
                absolute_expiry: None,
                body: vec![],
            },
            Cmd::Attach {
                consumer: 9,
                address: "q".into(),
                credit: 1,
                now: 4,
            },
            Cmd::Settle {
                consumer: 9,
                seq: 2,
                outcome: Outcome::Modified {
                    delivery_failed: true,
                    undeliverable_here: false,
                },
                now: 5,
            },
            Cmd::Credit {
                consumer: 9,
                credit: 3,
                now: 6,
            },
            enqueue("q", 7),
            Cmd::Detach {
                consumer: 6,
                now: 8,
            },
            Cmd::Tick { now: 20 },
            Cmd::Settle {
                consumer: 9,
                seq: 2,
                outcome: Outcome::Rejected,
                now: 9,
            },
            once(3, 1, "q"),
            Cmd::Resume {
                old: vec![9],
                new: 10,
                target: Target::Queue {
                    address: "q".into(),
                },
                keep: vec![1],
                credit: 2,
                now: 21,
            },
            once(3, 1, "q"),
            once(3, 2, "q"),
        ];
        for cut in 0..=script.len() {
            let mut a = Shard::new();
            for (i, c) in script[..cut].iter().enumerate() {
                a.apply(i as u64 + 1, c.clone());
            }
            let mut snap = Vec::new();
            a.encode(&mut snap);
            let mut b = Shard::decode(&snap).unwrap();
            let mut again = Vec::new();
            b.encode(&mut again);
            assert_eq!(snap, again, "cut {cut}");
            for (i, c) in script.iter().enumerate().skip(cut) {
                let idx = i as u64 + 1;
                assert_eq!(
                    a.apply(idx, c.clone()),
                    b.apply(idx, c.clone()),
                    "cut {cut}"
                );
            }
            for n in 0..snap.len() {
                assert!(Shard::decode(&snap[..n]).is_err());
            }
        }
    }

    #[test]
    fn unsubscribe_releases_what_it_held() {
        let mut s = Shard::new();
        s.apply(1, subscribe(1, "x", "t", true));
        s.apply(2, subscribe(2, "y", "t", true));
        s.apply(
            3,
            Cmd::Detach {
                consumer: 1,
                now: 0,
            },
        );
        s.apply(4, publish("t"));
        let fx = s.apply(5, Cmd::Unsubscribe { name: "x".into() });
        assert!(fx.is_empty(), "y still holds it: {fx:?}");
        assert_eq!(
            s.apply(6, settle(2, 4)),
            vec![ShardEffect::Forget { seq: 4 }]
        );
    }
    #[test]
    fn unsubscribe_takes_the_subscriptions_consumers_and_no_others() {
        let mut s = Shard::new();
        // Two consumers share "x" (a resumed client and its replacement, say); "y" has one.
        s.apply(1, subscribe(1, "x", "t", true));
        s.apply(2, subscribe(2, "x", "t", true));
        s.apply(3, subscribe(3, "y", "t", true));
        s.apply(4, Cmd::Unsubscribe { name: "x".into() });
        assert!(!s.has_consumer(1) && !s.has_consumer(2));
        assert!(s.has_consumer(3));
        assert_eq!(s.consumer_ids(), vec![3]);
        // Their credit no longer brings "x" back.
        s.apply(
            5,
            Cmd::Credit {
                consumer: 1,
                credit: 5,
                now: 0,
            },
        );
        assert!(!s.has_subscription("x"));
        assert_eq!(s.apply(6, publish("t")), vec![deliver(3, 6)]);
    }
}
