//! Invariant 2 on the queue state machine under random operation sequences: an acknowledged
//! message is never delivered again, a message is with at most one consumer at a time, and
//! every message is accounted for (held, acknowledged, dead-lettered or expired).

use std::collections::{BTreeMap, BTreeSet};

use broker::queue::{Effect, Outcome, Policy, Queue};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Enqueue(Option<u16>),
    Attach(u8, u8),
    Credit(u8, u8),
    Settle(u8, u8, u8),
    Detach(u8),
    Tick(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::option::of(1u16..500).prop_map(Op::Enqueue),
        1 => (0u8..4, 0u8..5).prop_map(|(c, n)| Op::Attach(c, n)),
        2 => (0u8..4, 0u8..5).prop_map(|(c, n)| Op::Credit(c, n)),
        4 => (0u8..4, any::<u8>(), 0u8..5).prop_map(|(c, k, o)| Op::Settle(c, k, o)),
        1 => (0u8..4).prop_map(Op::Detach),
        1 => (0u16..300).prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn acked_never_redelivered_and_all_accounted(ops in proptest::collection::vec(op(), 1..200)) {
        let mut q = Queue::new(Policy { max_delivery_attempts: 3, max_ttl_ms: Some(400) });
        let mut now = 0u64;
        let mut next_seq = 1u64;
        let mut acked = BTreeSet::new();
        let mut gone = BTreeSet::new(); // dead-lettered or expired
        let mut holder: BTreeMap<u64, u64> = BTreeMap::new(); // seq -> consumer
        let mut held_by: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for op in ops {
            let fx = match op {
                Op::Enqueue(ttl) => {
                    let s = next_seq;
                    next_seq += 1;
                    q.enqueue(s, now, ttl.map(u64::from), None)
                }
                Op::Attach(c, n) => q.attach(c.into(), n.into(), now),
                Op::Credit(c, n) => q.credit(c.into(), n.into(), now),
                Op::Settle(c, k, o) => {
                    let list = held_by.get(&u64::from(c)).cloned().unwrap_or_default();
                    // Mostly settle something the consumer holds; sometimes a stale seq.
                    let seq = if list.is_empty() || k % 7 == 0 {
                        u64::from(k) % next_seq.max(1)
                    } else {
                        list[k as usize % list.len()]
                    };
                    let outcome = match o {
                        0 => Outcome::Accepted,
                        1 => Outcome::Released,
                        2 => Outcome::Modified { delivery_failed: true, undeliverable_here: false },
                        3 => Outcome::Rejected,
                        _ => Outcome::Accepted,
                    };
                    let legit = holder.get(&seq) == Some(&u64::from(c));
                    let fx = q.settle(c.into(), seq, outcome, now);
                    if legit {
                        holder.remove(&seq);
                        if let Some(v) = held_by.get_mut(&u64::from(c)) { v.retain(|s| *s != seq); }
                        if outcome == Outcome::Accepted { acked.insert(seq); }
                    } else {
                        prop_assert!(fx.is_empty(), "stale settlement had effects: {:?}", fx);
                    }
                    fx
                }
                Op::Detach(c) => {
                    for s in held_by.remove(&u64::from(c)).unwrap_or_default() { holder.remove(&s); }
                    q.detach(c.into(), now)
                }
                Op::Tick(dt) => { now += u64::from(dt); q.tick(now) }
            };
            for e in fx {
                match e {
                    Effect::Deliver { consumer, seq, .. } => {
                        prop_assert!(!acked.contains(&seq), "acked {} delivered again", seq);
                        prop_assert!(!gone.contains(&seq), "removed {} delivered", seq);
                        prop_assert!(holder.insert(seq, consumer).is_none(), "{} held twice", seq);
                        held_by.entry(consumer).or_default().push(seq);
                    }
                    Effect::DeadLetter { seq, .. } | Effect::Expired { seq } => {
                        prop_assert!(!holder.contains_key(&seq), "{} removed while held", seq);
                        prop_assert!(gone.insert(seq));
                    }
                    Effect::Forget { .. } => {}
                }
            }
            let total = next_seq - 1;
            prop_assert_eq!(total, acked.len() as u64 + gone.len() as u64 + q.depth() as u64);
        }
    }
}
