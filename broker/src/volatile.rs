//! In-memory (non-durable) queues: the same deterministic [`Shard`] logic as durable queues,
//! applied directly instead of through the Raft log, with bodies held in memory. A producer's
//! message is accepted as soon as it is queued; everything is gone after a restart. Memory is
//! bounded: past [`Limits`] an enqueue is refused ([`StoreError::Full`]) rather than queued.
//!
//! Owned by the service task, which routes to it every request for an address declared
//! non-durable (and for the consumers attached to one). The dead-letter and expiry addresses of
//! an in-memory queue are in memory too.
//!
//! Non-durable subscriptions live here as well (an MQTT clean session's, an AMQP receiver's
//! without a durable terminus): they end with their consumer, so replicating them would buy
//! nothing, and a message published only to such subscriptions never enters the log (a
//! message is as durable as the subscriptions it lands in; see [`crate::service`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;

use crate::queue::{ConsumerId, Seq};
use crate::service::{Dedup, Delivery, Request, StoreError, Tag};
use crate::shard::{Cmd, QueueInfo, Shard, ShardEffect, Target};

/// Bounds of the in-memory store (all non-durable queues of a shard together).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_messages: 1_000_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Effect lists up to this long are scanned in place (see `Volatile::apply`).
const SHORT_EFFECTS: usize = 16;

/// What handling one request produced.
#[derive(Debug, Default)]
pub struct Out {
    pub deliveries: Vec<Delivery>,
    pub done: Option<(Tag, Result<(), StoreError>)>,
}

#[derive(Default)]
pub struct Volatile {
    shard: Shard,
    /// By sequence number: a B-tree, since numbers are taken in order and mostly forgotten
    /// in order, so both ends stay in cache even with a deep backlog.
    bodies: BTreeMap<Seq, Bytes>,
    bytes: usize,
    next: Seq,
    queues: HashSet<String>,
    /// A subscription is being created here (see [`Volatile::adopt`]). The subscriptions
    /// themselves are only in `shard` (no copy of each name: thousands of devices each have
    /// one).
    adopting: bool,
    consumers: HashSet<ConsumerId>,
    limits: Limits,
}

impl Volatile {
    pub fn new(limits: Limits) -> Volatile {
        Volatile {
            limits,
            next: 1,
            ..Default::default()
        }
    }

    /// Whether subscription `name` is held here.
    pub fn holds(&self, name: &str) -> bool {
        self.shard.has_subscription(name)
    }

    /// The next request handled, which creates a subscription, creates it here (its later
    /// requests and those of its consumers are then handled here).
    pub fn adopt(&mut self) {
        self.adopting = true;
    }

    /// Whether a message published on `topic` reaches a subscription held here.
    pub fn publishes_to(&self, topic: &str) -> bool {
        self.shard.publishes_to(topic)
    }

    /// Publishes a message on `topic` to the subscriptions held here (none: nothing happens).
    /// Refused when the store is full.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &mut self,
        topic: String,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        body: Bytes,
        dedup: Option<&Dedup>,
        now: u64,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        if !self.publishes_to(&topic) {
            return Ok(());
        }
        let len = body.len();
        if self.bodies.len() >= self.limits.max_messages || self.bytes + len > self.limits.max_bytes
        {
            return Err(StoreError::Full(topic));
        }
        let seq = self.next;
        self.next += 1;
        self.bodies.insert(seq, body);
        self.bytes += len;
        let cmd = Cmd::Publish {
            topic,
            now,
            ttl_ms,
            absolute_expiry,
            body: Vec::new(),
        };
        // In memory, duplicates are detected as long as this process leads the shard.
        let cmd = match dedup {
            Some(d) => Cmd::Dedup {
                id: d.id.clone(),
                new: d.new,
                hash: d.hash,
                cmd: Box::new(cmd),
            },
            None => cmd,
        };
        self.apply(seq, cmd, out);
        Ok(())
    }

    /// Handles `r` if it concerns an in-memory queue or subscription; otherwise hands it back.
    pub fn handle(&mut self, r: Request, now: u64) -> Result<Out, Request> {
        let adopting = std::mem::take(&mut self.adopting);
        let mut out = Out::default();
        let cmd = match r {
            Request::Declare {
                address,
                durable: false,
                max_delivery_attempts,
                max_ttl_ms,
                dead_letter,
                expiry_address,
            } => {
                self.queues.insert(address.clone());
                self.queues.extend(dead_letter.iter().cloned());
                self.queues.extend(expiry_address.iter().cloned());
                Cmd::Declare {
                    address,
                    max_delivery_attempts,
                    max_ttl_ms,
                    dead_letter,
                    expiry_address,
                }
            }
            Request::Enqueue {
                address,
                ttl_ms,
                absolute_expiry,
                body,
                done,
                // In-memory queues keep no deduplication ids (nothing survives a restart).
                dedup: _,
            } if self.queues.contains(&address) => {
                let len = body.len();
                if self.bodies.len() >= self.limits.max_messages
                    || self.bytes + len > self.limits.max_bytes
                {
                    out.done = done.map(|t| (t, Err(StoreError::Full(address))));
                    return Ok(out);
                }
                let seq = self.next;
                self.next += 1;
                self.bodies.insert(seq, body);
                self.bytes += len;
                out.done = done.map(|t| (t, Ok(())));
                self.apply(
                    seq,
                    Cmd::Enqueue {
                        address,
                        now,
                        ttl_ms,
                        absolute_expiry,
                        body: Vec::new(),
                    },
                    &mut out,
                );
                return Ok(out);
            }
            Request::Unsubscribe { name } if self.shard.has_subscription(&name) => {
                self.apply(0, Cmd::Unsubscribe { name }, &mut out);
                // Its consumers went with it.
                let shard = &self.shard;
                self.consumers.retain(|c| shard.has_consumer(*c));
                return Ok(out);
            }
            // In memory, nothing is replicated: a repeat after a leader change cannot meet the
            // original (it died with the old leader).
            Request::Once {
                origin,
                seq,
                request,
            } => {
                return self.handle(*request, now).map_err(|r| Request::Once {
                    origin,
                    seq,
                    request: Box::new(r),
                });
            }
            r => {
                // The rest is converted as for the log, once it is known to be ours.
                let ours = match &r {
                    Request::Attach { address, .. }
                    | Request::Purge { address }
                    | Request::Resume {
                        target: Target::Queue { address },
                        ..
                    } => self.queues.contains(address),
                    Request::Credit { consumer, .. }
                    | Request::Settle { consumer, .. }
                    | Request::Detach { consumer } => self.consumers.contains(consumer),
                    Request::Subscribe { name, .. }
                    | Request::Resume {
                        target: Target::Subscription { name, .. },
                        ..
                    } => adopting || self.shard.has_subscription(name),
                    Request::Expire { name, .. } => self.shard.has_subscription(name),
                    _ => false,
                };
                if !ours {
                    return Err(r);
                }
                match &r {
                    Request::Attach { consumer, .. } | Request::Subscribe { consumer, .. } => {
                        self.consumers.insert(*consumer);
                    }
                    Request::Resume { old, consumer, .. } => {
                        for id in old {
                            self.consumers.remove(id);
                        }
                        self.consumers.insert(*consumer);
                    }
                    Request::Detach { consumer } => {
                        self.consumers.remove(consumer);
                    }
                    _ => {}
                }
                let (cmd, done) = crate::service::to_cmd(r, now);
                // A settlement here is final at once (nothing to wait for).
                out.done = done.map(|t| (t, Ok(())));
                cmd
            }
        };
        self.apply(0, cmd, &mut out);
        Ok(out)
    }

    /// Time passes: expiry.
    pub fn tick(&mut self, now: u64) -> Vec<Delivery> {
        let mut out = Out::default();
        if !self.queues.is_empty() || !self.consumers.is_empty() || self.shard.has_bindings() {
            self.apply(0, Cmd::Tick { now }, &mut out);
        }
        out.deliveries
    }

    pub fn info(&self, prefix: &str) -> Vec<QueueInfo> {
        self.shard.info(prefix)
    }

    /// Messages and body bytes held.
    pub fn held(&self) -> (usize, usize) {
        (self.bodies.len(), self.bytes)
    }

    fn apply(&mut self, seq: Seq, cmd: Cmd, out: &mut Out) {
        let fx = self.shard.apply(seq, cmd);
        // Messages delivered and forgotten by the same command (a pre-settled consumer, the
        // only target): the last delivery of each takes the body instead of a copy. A short
        // list (one publication: deliver, forget) is scanned in place, allocating nothing; a
        // long one (a credit may release thousands of deliveries) is indexed in one pass.
        let short = fx.len() <= SHORT_EFFECTS;
        let mut moves: HashMap<Seq, usize> = HashMap::new();
        if !short && fx.iter().any(|f| matches!(f, ShardEffect::Forget { .. })) {
            let mut last = HashMap::new();
            for (i, f) in fx.iter().enumerate() {
                match f {
                    ShardEffect::Deliver { seq, .. } => {
                        last.insert(*seq, i);
                    }
                    ShardEffect::Forget { seq } => {
                        if let Some(d) = last.get(seq) {
                            moves.insert(*seq, *d);
                        }
                    }
                }
            }
        }
        for (i, e) in fx.iter().enumerate() {
            match *e {
                ShardEffect::Deliver {
                    consumer,
                    seq,
                    delivery_count,
                } => {
                    let forgotten = if short {
                        let later = &fx[i + 1..];
                        !later
                            .iter()
                            .any(|f| matches!(f, ShardEffect::Deliver { seq: s, .. } if *s == seq))
                            && later
                                .iter()
                                .any(|f| matches!(f, ShardEffect::Forget { seq: s } if *s == seq))
                    } else {
                        moves.get(&seq) == Some(&i)
                    };
                    let body = if forgotten {
                        self.bodies.remove(&seq).inspect(|b| self.bytes -= b.len())
                    } else {
                        self.bodies.get(&seq).cloned()
                    };
                    if let Some(body) = body {
                        out.deliveries.push(Delivery {
                            consumer,
                            seq,
                            delivery_count,
                            body,
                        });
                    }
                }
                ShardEffect::Forget { seq } => {
                    if let Some(b) = self.bodies.remove(&seq) {
                        self.bytes -= b.len();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Outcome;

    fn enqueue(address: &str, body: &[u8], tag: Tag) -> Request {
        Request::Enqueue {
            address: address.into(),
            ttl_ms: None,
            absolute_expiry: None,
            body: Bytes::copy_from_slice(body),
            done: Some(tag),
            dedup: None,
        }
    }

    #[test]
    fn only_declared_queues_and_their_consumers_are_handled_here() {
        let mut v = Volatile::new(Limits::default());
        assert!(v.handle(enqueue("q", b"x", 1), 0).is_err());
        let declare = Request::Declare {
            address: "q".into(),
            durable: false,
            max_delivery_attempts: 3,
            max_ttl_ms: None,
            dead_letter: None,
            expiry_address: None,
        };
        assert!(v.handle(declare, 0).is_ok());
        let out = v.handle(enqueue("q", b"hello", 7), 0).unwrap();
        assert!(matches!(out.done, Some((7, Ok(())))));
        let out = v
            .handle(
                Request::Attach {
                    consumer: 5,
                    address: "q".into(),
                    credit: 10,
                },
                0,
            )
            .unwrap();
        assert_eq!(out.deliveries.len(), 1);
        assert_eq!(out.deliveries[0].body, &b"hello"[..]);
        let seq = out.deliveries[0].seq;
        // Another consumer id is not ours.
        assert!(v.handle(Request::Detach { consumer: 6 }, 0).is_err());
        v.handle(
            Request::Settle {
                consumer: 5,
                seq,
                outcome: Outcome::Accepted,
                done: None,
            },
            0,
        )
        .unwrap();
        assert_eq!(v.held(), (0, 0));
    }

    #[test]
    fn full_store_refuses_and_frees_on_ack() {
        let mut v = Volatile::new(Limits {
            max_messages: 2,
            max_bytes: 1 << 20,
        });
        v.handle(
            Request::Declare {
                address: "q".into(),
                durable: false,
                max_delivery_attempts: 3,
                max_ttl_ms: None,
                dead_letter: None,
                expiry_address: None,
            },
            0,
        )
        .unwrap();
        for t in 1..=2 {
            assert!(matches!(
                v.handle(enqueue("q", b"m", t), 0).unwrap().done,
                Some((_, Ok(())))
            ));
        }
        let out = v.handle(enqueue("q", b"m", 3), 0).unwrap();
        assert!(matches!(out.done, Some((3, Err(StoreError::Full(_))))));
        let out = v
            .handle(
                Request::Attach {
                    consumer: 1,
                    address: "q".into(),
                    credit: 1,
                },
                0,
            )
            .unwrap();
        let seq = out.deliveries[0].seq;
        v.handle(
            Request::Settle {
                consumer: 1,
                seq,
                outcome: Outcome::Accepted,
                done: None,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            v.handle(enqueue("q", b"m", 4), 0).unwrap().done,
            Some((4, Ok(())))
        ));
    }
}
