//! Which broker shard serves which brokered address, and the routing of every store request to
//! it. The router core owns one [`Placement`] and sends all broker requests through it.
//!
//! Rules:
//! - Queues: an explicit override (`broker.placement` in issue 4's config), else a stable hash
//!   of the address (FNV-1a, so placement does not change between runs or builds) modulo the
//!   number of shards.
//! - Topics and subscriptions (`Publish`, `Subscribe`, `Bind`, `Unsubscribe`, `$sub:` queues):
//!   shard 0, the topic space's home, so that a wildcard subscription sees every publication.
//! - Consumer requests (`Credit`, `Settle`, `Detach`) go to the shard the consumer attached to.
//! - Management (`Info`) asks every shard and merges the answers, each queue tagged with its
//!   shard.
//!
//! Today a router has one shard (standalone, or one `enmesh broker`); the map is written for
//! many. Open for issue 4: a queue and its dead-letter / expiry addresses must share a shard
//! (the shard moves messages between its own queues), which an override can ensure today.

use std::collections::{BTreeMap, HashMap};

use broker::service::Request;
use broker::shard::QueueInfo;
use tokio::sync::{mpsc, oneshot};

pub struct Placement {
    shards: Vec<mpsc::UnboundedSender<Request>>,
    overrides: BTreeMap<String, usize>,
    /// The shard of each attached consumer.
    consumers: HashMap<u64, usize>,
}

/// FNV-1a, 64-bit: stable across processes and versions (unlike `DefaultHasher`).
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Placement {
    /// Shards in order; `overrides` pin addresses to shard indexes (out-of-range ones are
    /// ignored).
    pub fn new(
        shards: Vec<mpsc::UnboundedSender<Request>>,
        overrides: BTreeMap<String, usize>,
    ) -> Placement {
        let n = shards.len();
        Placement {
            shards,
            overrides: overrides.into_iter().filter(|(_, s)| *s < n).collect(),
            consumers: HashMap::new(),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard serving queue `address`.
    pub fn queue_shard(&self, address: &str) -> usize {
        if address.starts_with("$sub:") {
            return 0;
        }
        if let Some(s) = self.overrides.get(address) {
            return *s;
        }
        match self.shards.len() {
            0 | 1 => 0,
            n => (stable_hash(address) % n as u64) as usize,
        }
    }

    /// Sends `r` to the shard that serves it.
    pub fn send(&mut self, r: Request) {
        let shard = match &r {
            Request::Enqueue { address, .. }
            | Request::Declare { address, .. }
            | Request::Purge { address } => self.queue_shard(address),
            Request::Attach {
                consumer, address, ..
            } => {
                let s = self.queue_shard(address);
                self.consumers.insert(*consumer, s);
                s
            }
            Request::Subscribe { consumer, .. } => {
                self.consumers.insert(*consumer, 0);
                0
            }
            // (Once and Resume are made by the broker link itself, never by the core.)
            Request::Publish { .. }
            | Request::Bind { .. }
            | Request::Unsubscribe { .. }
            | Request::Expire { .. }
            | Request::Once { .. }
            | Request::Resume { .. } => 0,
            Request::Credit { consumer, .. } | Request::Settle { consumer, .. } => {
                self.consumers.get(consumer).copied().unwrap_or(0)
            }
            Request::Detach { consumer } => self.consumers.remove(consumer).unwrap_or(0),
            Request::Info { .. } => {
                if let Request::Info { prefix, reply } = r {
                    self.info(prefix, reply);
                }
                return;
            }
        };
        if let Some(tx) = self.shards.get(shard) {
            let _ = tx.send(r);
        }
    }

    /// Asks every shard for its queues under `prefix` and answers with all of them, tagged by
    /// shard.
    fn info(&self, prefix: String, reply: oneshot::Sender<Vec<QueueInfo>>) {
        if let [tx] = self.shards.as_slice() {
            // One shard (standalone): its answer is the answer (shard 0), without a task to
            // gather answers (a device's CONNECT and SUBSCRIBE each ask).
            let _ = tx.send(Request::Info { prefix, reply });
            return;
        }
        let mut asks = Vec::new();
        for (i, tx) in self.shards.iter().enumerate() {
            let (one, answer) = oneshot::channel();
            let prefix = prefix.clone();
            if tx.send(Request::Info { prefix, reply: one }).is_ok() {
                asks.push((i, answer));
            }
        }
        tokio::spawn(async move {
            let mut all = Vec::new();
            for (i, answer) in asks {
                if let Ok(qs) = answer.await {
                    all.extend(qs.into_iter().map(|mut q| {
                        q.shard = i as u32;
                        q
                    }));
                }
            }
            let _ = reply.send(all);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> (Placement, Vec<mpsc::UnboundedReceiver<Request>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let overrides = BTreeMap::from([("pinned".to_string(), 2), ("bad".to_string(), 9)]);
        (Placement::new(txs, overrides), rxs)
    }

    fn drain(rxs: &mut [mpsc::UnboundedReceiver<Request>]) -> Vec<usize> {
        let mut got = Vec::new();
        for (i, rx) in rxs.iter_mut().enumerate() {
            while rx.try_recv().is_ok() {
                got.push(i);
            }
        }
        got
    }

    #[test]
    fn queues_spread_consumers_follow_topics_stay_home() {
        let (mut p, mut rxs) = shards(4);
        // Stable and spread: 100 queues land on every shard, the same way every time.
        let mut used = [0; 4];
        for i in 0..100 {
            let a = format!("q/{i}");
            assert_eq!(p.queue_shard(&a), p.queue_shard(&a));
            used[p.queue_shard(&a)] += 1;
        }
        assert!(used.iter().all(|n| *n > 10), "{used:?}");
        assert_eq!(p.queue_shard("pinned"), 2);
        assert_eq!(p.queue_shard("bad"), p.queue_shard("bad") % 4);
        // The published FNV-1a test vectors: placement must never change between versions.
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);

        let home = p.queue_shard("q/7");
        p.send(Request::Attach {
            consumer: 1,
            address: "q/7".into(),
            credit: 0,
        });
        p.send(Request::Credit {
            consumer: 1,
            credit: 5,
        });
        p.send(Request::Detach { consumer: 1 });
        assert_eq!(drain(&mut rxs), vec![home; 3]);
        p.send(Request::Subscribe {
            consumer: 2,
            name: "c:l".into(),
            filter: "t/#".into(),
            durable: false,
            credit: 0,
        });
        p.send(Request::Publish {
            topic: "t/x".into(),
            ttl_ms: None,
            absolute_expiry: None,
            body: bytes::Bytes::new(),
            done: None,
            dedup: None,
        });
        p.send(Request::Purge {
            address: "$sub:c:l".into(),
        });
        p.send(Request::Credit {
            consumer: 2,
            credit: 1,
        });
        assert_eq!(drain(&mut rxs), vec![0; 4]);
    }

    #[tokio::test]
    async fn info_merges_every_shard_tagged() {
        let (mut p, mut rxs) = shards(3);
        let (reply, answer) = oneshot::channel();
        p.send(Request::Info {
            prefix: String::new(),
            reply,
        });
        for (i, rx) in rxs.iter_mut().enumerate() {
            match rx.recv().await {
                Some(Request::Info { reply, .. }) => {
                    let _ = reply.send(vec![QueueInfo {
                        address: format!("q{i}"),
                        ..Default::default()
                    }]);
                }
                other => panic!("{other:?}"),
            }
        }
        let all = answer.await.unwrap();
        let tagged: Vec<(String, u32)> = all.into_iter().map(|q| (q.address, q.shard)).collect();
        assert_eq!(
            tagged,
            vec![("q0".into(), 0), ("q1".into(), 1), ("q2".into(), 2)]
        );
    }
}
