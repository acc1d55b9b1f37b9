//! One queue as a deterministic state machine: the part of a shard's state that decides which
//! consumer gets which message, what happens on each outcome, on a consumer's departure and on
//! expiry. It holds only metadata (sequence numbers, expiry, delivery counts); message bodies
//! stay in the log and are fetched by sequence number when an [`Effect::Deliver`] is carried out.
//!
//! Every input is a method call that the shard applies in log order; every decision comes back
//! as [`Effect`]s. No clock is read: time comes in with the calls, so replicas applying the same
//! log reach the same state.
//!
//! Semantics (design.md §2, invariant 2):
//! - FIFO: ready messages are dispatched in sequence order; a message that comes back
//!   (released, modified, consumer gone) returns to its place by sequence number, ahead of
//!   newer ones.
//! - Competing consumers: each consumer's credit is its prefetch; among consumers with credit,
//!   dispatch is round-robin.
//! - Outcomes: accepted removes the message; released returns it without counting an attempt;
//!   modified with delivery-failed counts an attempt; rejected dead-letters it; a message whose
//!   attempts reach the limit is dead-lettered instead of redelivered.
//! - A consumer that goes away returns its unacknowledged messages with one more attempt
//!   counted (it may have seen them).
//! - Expiry: a message past its expiry time is never dispatched; it is removed on the next
//!   call that looks at it and reported as [`Effect::Expired`].

use std::collections::{BTreeMap, BTreeSet};

use std::io;

use crate::seqset::SeqSet;
use crate::wire::{Reader, put_opt_u64, put_varint};

pub type Seq = u64;
pub type ConsumerId = u64;

/// Per-queue policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Deliveries after which a message that keeps failing is dead-lettered (0: unlimited).
    pub max_delivery_attempts: u32,
    /// Upper bound on any message's time to live, in ms.
    pub max_ttl_ms: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_delivery_attempts: 10,
            max_ttl_ms: None,
        }
    }
}

/// How a consumer settled a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Released,
    Modified {
        delivery_failed: bool,
        undeliverable_here: bool,
    },
    Rejected,
}

/// Why a message left the queue other than by acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Rejected,
    TooManyAttempts,
}

/// What the shard must do as a consequence of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send message `seq` to `consumer`; `delivery_count` is the number of earlier attempts.
    Deliver {
        consumer: ConsumerId,
        seq: Seq,
        delivery_count: u32,
    },
    /// Move `seq` to the dead-letter address (or drop it when there is none).
    DeadLetter { seq: Seq, reason: DeadReason },
    /// `seq` expired: move it to the expiry address or drop it.
    Expired { seq: Seq },
    /// The body of `seq` is no longer needed by this queue.
    Forget { seq: Seq },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Consumer {
    credit: u32,
    unacked: BTreeSet<Seq>,
}

/// A map kept as a vector sorted by key: most queues have one consumer or a few, and a
/// `BTreeMap` spends a whole node (11 slots) on the first (15,000 idle subscriptions made it
/// a large share of a device's cost). Iterates in key order, like the `BTreeMap` it replaced
/// (round-robin order must be the same on every replica).
#[derive(Debug, Clone, PartialEq, Eq)]
struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap(Vec::new())
    }
}

impl<K: Ord + Copy, V> VecMap<K, V> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn find(&self, k: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(x, _)| x.cmp(k))
    }
    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }
    fn insert(&mut self, k: K, v: V) {
        match self.find(&k) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => {
                if self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (k, v))
            }
        }
    }
    fn get_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(&k) {
            Ok(i) => i,
            Err(i) => {
                if self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (k, V::default()));
                i
            }
        };
        &mut self.0[i].1
    }
    fn remove(&mut self, k: &K) -> Option<V> {
        let i = self.find(k).ok()?;
        let v = self.0.remove(i).1;
        if self.0.capacity() > 4 && self.0.len() < self.0.capacity() / 4 {
            self.0.shrink_to(self.0.len() * 2);
        }
        Some(v)
    }
    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    /// Entries with keys from `from` on.
    fn iter_from(&self, from: &K) -> impl Iterator<Item = (&K, &V)> {
        let i = self.find(from).unwrap_or_else(|i| i);
        self.0[i..].iter().map(|(k, v)| (k, v))
    }
}

/// Counters for management and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub enqueued: u64,
    pub acknowledged: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    pub redelivered: u64,
}

/// Metadata of the messages that have any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Meta {
    /// Expiry time of every held message that has one (ready or unacknowledged).
    expiry: BTreeMap<Seq, u64>,
    /// The same, ordered by time, so a tick finds what expired without a scan.
    by_expiry: BTreeSet<(u64, Seq)>,
    /// Earlier delivery attempts of messages that have any.
    attempts: BTreeMap<Seq, u32>,
}

impl Meta {
    fn is_empty(&self) -> bool {
        self.expiry.is_empty() && self.attempts.is_empty()
    }
}

/// The queue's state. A plain message (no expiry, never delivered before) costs only its
/// member of `ready` (about 4 bytes): metadata lives in side maps for the exceptions, so a
/// backlog of millions stays small (design.md §9).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Queue {
    policy: Policy,
    /// Messages waiting for a consumer, in sequence order.
    ready: SeqSet,
    /// Per-message exceptions, boxed only while there are any (most queues, a subscription
    /// each, never have one).
    meta: Option<Box<Meta>>,
    consumers: VecMap<ConsumerId, Consumer>,
    /// Messages held unacknowledged by consumers (sum of their `unacked`).
    held: usize,
    /// Round-robin position: the last consumer served.
    last_served: Option<ConsumerId>,
    pub stats: Stats,
}

impl Queue {
    pub fn new(policy: Policy) -> Queue {
        Queue {
            policy,
            ..Default::default()
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Changes the policy; it applies to what happens next (messages keep their expiry).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Every message held (ready or unacknowledged), in sequence order.
    pub fn seqs(&self) -> Vec<Seq> {
        let mut all: Vec<Seq> = self.ready.iter().collect();
        for c in self.consumers.values() {
            all.extend(c.unacked.iter().copied());
        }
        all.sort_unstable();
        all
    }

    /// The oldest message held, if any.
    pub fn min_seq(&self) -> Option<Seq> {
        let held = self
            .consumers
            .values()
            .filter_map(|c| c.unacked.first().copied())
            .min();
        match (self.ready.first(), held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Messages held (ready or unacknowledged).
    pub fn depth(&self) -> usize {
        self.ready.len() + self.held
    }

    /// Messages waiting for a consumer.
    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    pub fn consumers(&self) -> usize {
        self.consumers.len()
    }

    /// The consumers attached.
    pub fn consumer_ids(&self) -> impl Iterator<Item = ConsumerId> + '_ {
        self.consumers.iter().map(|(id, _)| *id)
    }

    /// Adds message `seq` (sequence numbers increase with each enqueue). `ttl_ms` from the
    /// message header, `absolute_expiry` (ms since the epoch) from its properties; the
    /// queue's maximum TTL caps both.
    pub fn enqueue(
        &mut self,
        seq: Seq,
        now: u64,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
    ) -> Vec<Effect> {
        let by_ttl = ttl_ms
            .or(self.policy.max_ttl_ms)
            .map(|t| now.saturating_add(t.min(self.policy.max_ttl_ms.unwrap_or(u64::MAX))));
        let expires_at = match (by_ttl, absolute_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if !self.ready.insert(seq) {
            // Already held: a replayed or duplicated enqueue changes nothing.
            return Vec::new();
        }
        if let Some(t) = expires_at {
            let m = self.meta_mut();
            m.expiry.insert(seq, t);
            m.by_expiry.insert((t, seq));
        }
        self.stats.enqueued += 1;
        self.dispatch(now)
    }

    /// A consumer attaches with `credit` (its prefetch).
    pub fn attach(&mut self, consumer: ConsumerId, credit: u32, now: u64) -> Vec<Effect> {
        self.consumers.get_or_default(consumer).credit = credit;
        self.dispatch(now)
    }

    /// Sets a consumer's available credit.
    pub fn credit(&mut self, consumer: ConsumerId, credit: u32, now: u64) -> Vec<Effect> {
        if let Some(c) = self.consumers.get_mut(&consumer) {
            c.credit = credit;
        }
        self.dispatch(now)
    }

    /// A consumer settles `seq`. Settlements of messages it does not hold are ignored (a
    /// duplicate or late settlement must not touch a message redelivered to someone else).
    pub fn settle(
        &mut self,
        consumer: ConsumerId,
        seq: Seq,
        outcome: Outcome,
        now: u64,
    ) -> Vec<Effect> {
        let held = self
            .consumers
            .get_mut(&consumer)
            .is_some_and(|c| c.unacked.remove(&seq));
        if !held {
            return Vec::new();
        }
        self.held -= 1;
        let mut fx = Vec::new();
        match outcome {
            Outcome::Accepted => {
                self.forget_meta(seq);
                self.stats.acknowledged += 1;
                fx.push(Effect::Forget { seq });
            }
            Outcome::Released => self.requeue(seq, false, &mut fx),
            Outcome::Modified {
                delivery_failed, ..
            } => self.requeue(seq, delivery_failed, &mut fx),
            Outcome::Rejected => self.dead_letter(seq, DeadReason::Rejected, &mut fx),
        }
        fx.extend(self.dispatch(now));
        fx
    }

    /// A consumer goes away: what it held returns with one more attempt counted.
    pub fn detach(&mut self, consumer: ConsumerId, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if let Some(c) = self.consumers.remove(&consumer) {
            self.held -= c.unacked.len();
            for seq in c.unacked {
                self.requeue(seq, true, &mut fx);
            }
        }
        if self.last_served == Some(consumer) {
            self.last_served = None;
        }
        fx.extend(self.dispatch(now));
        fx
    }

    /// Hands what `old` holds to `new` (a consumer resumed under a new id after its router
    /// reconnected): messages in `keep` (the ones its router has) stay unacknowledged, now held
    /// by `new`; the others return to the queue without an attempt counted (the client never
    /// saw them). `old` is removed; `new` must be attached.
    pub fn transfer(
        &mut self,
        old: ConsumerId,
        new: ConsumerId,
        keep: &BTreeSet<Seq>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(c) = self.consumers.remove(&old) else {
            return;
        };
        if self.last_served == Some(old) {
            self.last_served = None;
        }
        for seq in c.unacked {
            let kept = keep.contains(&seq)
                && self
                    .consumers
                    .get_mut(&new)
                    .is_some_and(|n| n.unacked.insert(seq));
            if !kept {
                self.held -= 1;
                self.requeue(seq, false, fx);
            }
        }
    }

    /// Gives ready message `seq` to consumer `consumer` without a delivery (its router still
    /// has it from before a reconnection). False when the message is not ready (another
    /// consumer has it, or it is gone).
    pub fn claim(&mut self, consumer: ConsumerId, seq: Seq) -> bool {
        let Some(c) = self.consumers.get_mut(&consumer) else {
            return false;
        };
        if !self.ready.remove(seq) {
            return false;
        }
        c.unacked.insert(seq);
        self.held += 1;
        true
    }

    /// Time passes: expired ready messages are removed. (Unacknowledged ones are left to
    /// their consumer; if they come back they are checked again before any redelivery.)
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        let Some(meta) = &self.meta else {
            return Vec::new();
        };
        let due: Vec<Seq> = meta
            .by_expiry
            .range(..=(now, Seq::MAX))
            .map(|(_, s)| *s)
            .filter(|s| self.ready.contains(*s))
            .collect();
        let mut fx = Vec::new();
        for seq in due {
            self.expire(seq, &mut fx);
        }
        fx
    }

    /// Removes every ready message (management purge); unacknowledged ones stay. Returns
    /// what was removed, compactly (a purge may remove millions).
    pub fn purge(&mut self) -> SeqSet {
        let ready = std::mem::take(&mut self.ready);
        if self.meta.is_some() {
            for seq in ready.iter() {
                self.forget_meta(seq);
            }
        }
        ready
    }

    fn is_expired(&self, seq: Seq, now: u64) -> bool {
        self.meta
            .as_ref()
            .and_then(|m| m.expiry.get(&seq))
            .is_some_and(|t| *t <= now)
    }

    /// Drops the side metadata of a message that leaves the queue.
    fn forget_meta(&mut self, seq: Seq) {
        let Some(m) = self.meta.as_mut() else {
            return;
        };
        if let Some(t) = m.expiry.remove(&seq) {
            m.by_expiry.remove(&(t, seq));
        }
        m.attempts.remove(&seq);
        if m.is_empty() {
            self.meta = None;
        }
    }

    fn expire(&mut self, seq: Seq, fx: &mut Vec<Effect>) {
        self.ready.remove(seq);
        self.forget_meta(seq);
        self.stats.expired += 1;
        fx.push(Effect::Expired { seq });
    }

    fn requeue(&mut self, seq: Seq, count_attempt: bool, fx: &mut Vec<Effect>) {
        let mut count = self.attempts(seq);
        if count_attempt {
            count += 1;
        }
        let limit = self.policy.max_delivery_attempts;
        if limit > 0 && count >= limit {
            self.dead_letter(seq, DeadReason::TooManyAttempts, fx);
            return;
        }
        if count > 0 {
            self.meta_mut().attempts.insert(seq, count);
        }
        self.stats.redelivered += 1;
        self.ready.insert(seq);
    }

    fn dead_letter(&mut self, seq: Seq, reason: DeadReason, fx: &mut Vec<Effect>) {
        self.ready.remove(seq);
        self.forget_meta(seq);
        self.stats.dead_lettered += 1;
        fx.push(Effect::DeadLetter { seq, reason });
    }

    /// The next consumer with credit after the last one served.
    fn next_consumer(&self) -> Option<ConsumerId> {
        let after = self.last_served;
        let with_credit = |(id, c): (&ConsumerId, &Consumer)| (c.credit > 0).then_some(*id);
        let later = match after {
            Some(a) => self
                .consumers
                .iter_from(&a.saturating_add(1))
                .find_map(with_credit),
            None => None,
        };
        later.or_else(|| self.consumers.iter().find_map(with_credit))
    }

    fn dispatch(&mut self, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        while let Some(seq) = self.ready.first() {
            if self.is_expired(seq, now) {
                self.expire(seq, &mut fx);
                continue;
            }
            let Some(consumer) = self.next_consumer() else {
                break;
            };
            self.ready.pop_first();
            let delivery_count = self.attempts(seq);
            if let Some(c) = self.consumers.get_mut(&consumer) {
                c.credit -= 1;
                c.unacked.insert(seq);
                self.held += 1;
            }
            self.last_served = Some(consumer);
            fx.push(Effect::Deliver {
                consumer,
                seq,
                delivery_count,
            });
        }
        fx
    }
}

// --- snapshot encoding --------------------------------------------------------------------

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Writes increasing sequence numbers as a count and deltas (a dense backlog: ~1 byte each).
pub(crate) fn put_seqs(o: &mut Vec<u8>, len: usize, seqs: impl Iterator<Item = Seq>) {
    put_varint(o, len as u64);
    let mut prev = 0;
    for s in seqs {
        put_varint(o, s - prev);
        prev = s;
    }
}

/// [`put_seqs`] for a list in any order (sorted and deduplicated first).
pub(crate) fn put_sorted_seqs(o: &mut Vec<u8>, seqs: &[Seq]) {
    let mut s = seqs.to_vec();
    s.sort_unstable();
    s.dedup();
    put_seqs(o, s.len(), s.into_iter());
}

/// Reads what [`put_seqs`] wrote, handing each to `f`.
pub(crate) fn get_seqs(r: &mut Reader, mut f: impl FnMut(Seq)) -> io::Result<()> {
    let n = r.count(1)?;
    let mut prev: Seq = 0;
    for i in 0..n {
        let d = r.varint()?;
        // Every list written is a set in increasing order: a repeat is damage (and would
        // not survive a re-encoding).
        if i > 0 && d == 0 {
            return Err(bad("sequence numbers not increasing"));
        }
        prev = prev
            .checked_add(d)
            .ok_or_else(|| bad("sequence number overflow"))?;
        f(prev);
    }
    Ok(())
}

fn get_u32(r: &mut Reader) -> io::Result<u32> {
    u32::try_from(r.varint()?).map_err(|_| bad("value out of range"))
}

impl Queue {
    /// Appends this queue's state to a shard snapshot.
    pub fn encode(&self, o: &mut Vec<u8>) {
        put_varint(o, u64::from(self.policy.max_delivery_attempts));
        put_opt_u64(o, self.policy.max_ttl_ms);
        let st = &self.stats;
        for v in [
            st.enqueued,
            st.acknowledged,
            st.expired,
            st.dead_lettered,
            st.redelivered,
        ] {
            put_varint(o, v);
        }
        put_seqs(o, self.ready.len(), self.ready.iter());
        let empty = BTreeMap::new();
        let expiry = self.meta.as_ref().map_or(&empty, |m| &m.expiry);
        for side in [expiry, &self.attempts_u64()] {
            put_seqs(o, side.len(), side.keys().copied());
            for v in side.values() {
                put_varint(o, *v);
            }
        }
        put_varint(o, self.consumers.len() as u64);
        for (id, c) in self.consumers.iter() {
            put_varint(o, *id);
            put_varint(o, u64::from(c.credit));
            put_seqs(o, c.unacked.len(), c.unacked.iter().copied());
        }
        put_opt_u64(o, self.last_served);
    }

    fn attempts_u64(&self) -> BTreeMap<Seq, u64> {
        self.meta.as_ref().map_or_else(BTreeMap::new, |m| {
            m.attempts
                .iter()
                .map(|(s, n)| (*s, u64::from(*n)))
                .collect()
        })
    }

    /// Earlier delivery attempts of `seq`.
    fn attempts(&self, seq: Seq) -> u32 {
        self.meta
            .as_ref()
            .and_then(|m| m.attempts.get(&seq))
            .copied()
            .unwrap_or(0)
    }

    fn meta_mut(&mut self) -> &mut Meta {
        self.meta.get_or_insert_with(Box::default)
    }

    /// Reads what [`Queue::encode`] wrote.
    pub fn decode(r: &mut Reader) -> io::Result<Queue> {
        let mut q = Queue::new(Policy {
            max_delivery_attempts: get_u32(r)?,
            max_ttl_ms: r.opt_u64()?,
        });
        q.stats = Stats {
            enqueued: r.varint()?,
            acknowledged: r.varint()?,
            expired: r.varint()?,
            dead_lettered: r.varint()?,
            redelivered: r.varint()?,
        };
        let mut ready = SeqSet::new();
        get_seqs(r, |s| {
            ready.insert(s);
        })?;
        q.ready = ready;
        let mut keys = Vec::new();
        get_seqs(r, |s| keys.push(s))?;
        for s in keys.drain(..) {
            let t = r.varint()?;
            let m = q.meta_mut();
            m.expiry.insert(s, t);
            m.by_expiry.insert((t, s));
        }
        get_seqs(r, |s| keys.push(s))?;
        for s in keys.drain(..) {
            let n = get_u32(r)?;
            q.meta_mut().attempts.insert(s, n);
        }
        let n = r.count(3)?;
        for _ in 0..n {
            let id = r.varint()?;
            let credit = get_u32(r)?;
            let mut unacked = BTreeSet::new();
            get_seqs(r, |s| {
                unacked.insert(s);
            })?;
            q.held += unacked.len();
            q.consumers.insert(id, Consumer { credit, unacked });
        }
        q.last_served = r.opt_u64()?;
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_lists_round_trip_and_repeats_are_refused() {
        let mut o = Vec::new();
        put_sorted_seqs(&mut o, &[9, 3, 3, 0]);
        let mut got = Vec::new();
        get_seqs(&mut Reader(&o), |s| got.push(s)).unwrap();
        assert_eq!(got, vec![0, 3, 9]);
        // Count 2, deltas 5 and 0: a repeat (found by the store_decoders fuzz target).
        assert!(get_seqs(&mut Reader(&[2, 5, 0]), |_| {}).is_err());
    }

    fn delivered(fx: &[Effect]) -> Vec<(ConsumerId, Seq, u32)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Deliver {
                    consumer,
                    seq,
                    delivery_count,
                } => Some((*consumer, *seq, *delivery_count)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fifo_round_robin_and_prefetch() {
        let mut q = Queue::new(Policy::default());
        for s in 1..=6 {
            assert!(q.enqueue(s, 0, None, None).is_empty());
        }
        let mut fx = q.attach(1, 2, 0);
        fx.extend(q.attach(2, 2, 0));
        assert_eq!(
            delivered(&fx),
            vec![(1, 1, 0), (1, 2, 0), (2, 3, 0), (2, 4, 0)]
        );
        // Prefetch respected: nothing more until an ack and more credit.
        assert_eq!(q.ready(), 2);
        let fx = q.settle(1, 1, Outcome::Accepted, 0);
        assert_eq!(fx, vec![Effect::Forget { seq: 1 }]);
        let fx = q.credit(1, 1, 0);
        assert_eq!(delivered(&fx), vec![(1, 5, 0)]);
    }

    #[test]
    fn release_returns_in_order_modified_counts_and_limit_dead_letters() {
        let mut q = Queue::new(Policy {
            max_delivery_attempts: 2,
            max_ttl_ms: None,
        });
        q.enqueue(1, 0, None, None);
        q.enqueue(2, 0, None, None);
        let fx = q.attach(7, 1, 0);
        assert_eq!(delivered(&fx), vec![(7, 1, 0)]);
        // Released: back at the head, no attempt counted.
        q.settle(7, 1, Outcome::Released, 0);
        let fx = q.credit(7, 1, 0);
        assert_eq!(delivered(&fx), vec![(7, 1, 0)]);
        // Modified, failed: counted.
        let failed = Outcome::Modified {
            delivery_failed: true,
            undeliverable_here: false,
        };
        q.settle(7, 1, failed, 0);
        let fx = q.credit(7, 1, 0);
        assert_eq!(delivered(&fx), vec![(7, 1, 1)]);
        // Second failure reaches the limit: dead-lettered, and 2 is next.
        let fx = q.settle(7, 1, failed, 0);
        assert!(fx.contains(&Effect::DeadLetter {
            seq: 1,
            reason: DeadReason::TooManyAttempts
        }));
        let fx = q.credit(7, 1, 0);
        assert_eq!(delivered(&fx), vec![(7, 2, 0)]);
        let fx = q.settle(7, 2, Outcome::Rejected, 0);
        assert_eq!(
            fx,
            vec![Effect::DeadLetter {
                seq: 2,
                reason: DeadReason::Rejected
            }]
        );
        assert_eq!(q.depth(), 0);
    }

    #[test]
    fn consumer_gone_returns_unacked_to_others_with_count() {
        let mut q = Queue::new(Policy::default());
        for s in 1..=3 {
            q.enqueue(s, 0, None, None);
        }
        q.attach(1, 10, 0);
        let fx = q.attach(2, 10, 0);
        assert!(delivered(&fx).is_empty());
        let fx = q.detach(1, 0);
        assert_eq!(delivered(&fx), vec![(2, 1, 1), (2, 2, 1), (2, 3, 1)]);
        // A late settlement from the departed consumer changes nothing.
        assert!(q.settle(1, 1, Outcome::Accepted, 0).is_empty());
        assert_eq!(q.depth(), 3);
    }

    #[test]
    fn ttl_expiry_and_cap() {
        let mut q = Queue::new(Policy {
            max_delivery_attempts: 0,
            max_ttl_ms: Some(1000),
        });
        q.enqueue(1, 0, Some(100), None);
        q.enqueue(2, 0, None, None); // capped at 1000
        q.enqueue(3, 0, Some(5000), None); // capped at 1000
        q.enqueue(4, 0, None, Some(50)); // absolute expiry wins
        assert_eq!(q.tick(60), vec![Effect::Expired { seq: 4 }]);
        assert_eq!(q.tick(150), vec![Effect::Expired { seq: 1 }]);
        // An offline consumer coming back after expiry gets nothing.
        let fx = q.attach(9, 10, 2000);
        assert!(delivered(&fx).is_empty());
        assert_eq!(q.depth(), 0);
        assert_eq!(q.stats.expired, 4);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut q = Queue::new(Policy {
            max_delivery_attempts: 3,
            max_ttl_ms: Some(10_000),
        });
        for s in [3, 5, 9, 1000, 1001] {
            q.enqueue(s, 1, if s == 5 { Some(50) } else { None }, None);
        }
        q.attach(4, 2, 1);
        q.settle(4, 3, failed(), 1);
        q.attach(8, 1, 1);
        let mut o = Vec::new();
        q.encode(&mut o);
        let back = Queue::decode(&mut Reader(&o)).unwrap();
        assert_eq!(back, q);
        // Truncated snapshots are errors, never panics.
        for cut in 0..o.len() {
            assert!(Queue::decode(&mut Reader(&o[..cut])).is_err());
        }
    }

    fn failed() -> Outcome {
        Outcome::Modified {
            delivery_failed: true,
            undeliverable_here: false,
        }
    }
}
