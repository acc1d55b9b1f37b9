//! The broker as a task the router talks to: requests in (enqueue, publish, consumer attach,
//! credit, settle, detach), deliveries out. It owns the [`ShardNode`] and is the only proposer.
//!
//! Requests are proposed in arrival order, in batches: everything queued when the task wakes
//! goes into one `client_write_many` (one append, one fsync for all of it: group commit), and
//! the next batch is submitted without waiting for the previous one to commit. A producer's
//! request completes (`done`) when its message is committed, which is when the router may send
//! `accepted`.
//!
//! Non-durable subscriptions are held in memory ([`Volatile`]) and a message published only
//! to such subscriptions does not enter the log: it completes as soon as it is queued for
//! them (a message is as durable as the subscriptions it lands in, as with mosquitto's clean
//! sessions or RabbitMQ's transient queues). Whether a publication needs the log is decided
//! against the applied state, so this takes the short path only on a replica that leads and
//! has applied its whole log, with no proposal that may add a subscription in flight.

use tokio::sync::mpsc;

use std::collections::BTreeMap;

use crate::node::{NodeError, ShardHandle, ShardNode};
use crate::queue::{ConsumerId, Outcome, Seq};
use crate::raft::Applied;
use crate::shard::{Cmd, QueueInfo, ShardEffect, Target};
use crate::volatile::{Limits as VolatileLimits, Volatile};

/// Ticks (of 500 ms) between snapshots taken because the shard had work and then went quiet.
const IDLE_SNAPSHOT_TICKS: u32 = 60;
/// Most requests proposed as one batch.
const MAX_BATCH: usize = 1024;
/// Bodies of recent messages kept for delivery without a log read.
const FRESH_BODIES: usize = 16_384;
const FRESH_BYTES: usize = 32 * 1024 * 1024;

/// A tag the caller chooses for a store request; its completion comes back with it.
pub type Tag = u64;

/// Why a store request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The in-memory store is at its limit (a clean refusal: try later).
    #[error("in-memory queue {0} is full")]
    Full(String),
    /// The shard could not commit it (storage or Raft failure).
    #[error("{0}")]
    Failed(String),
    /// This replica stopped leading before the request committed: its outcome is unknown
    /// (it may still commit under the new leader). A resend to the new leader settles it;
    /// the shard deduplicates resends (`Cmd::Once`).
    #[error("the shard's leader changed before this committed")]
    Moved,
}

/// Completions of store requests: `(tag, Ok)` once durable, `(tag, Err(why))` if it failed.
pub type Completions = mpsc::UnboundedSender<Vec<(Tag, Result<(), StoreError>)>>;

/// A message's deduplication id (see [`Cmd::Dedup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dedup {
    pub id: String,
    /// A new message reusing the id: stored whatever was stored under it before.
    pub new: bool,
    /// The message's hash, without the parts that differ between a send and its resend.
    pub hash: u64,
}

#[derive(Debug)]
pub enum Request {
    Enqueue {
        address: String,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        /// Shared, not copied, on its way from a producer into the in-memory store.
        body: bytes::Bytes,
        done: Option<Tag>,
        dedup: Option<Box<Dedup>>,
    },
    Publish {
        topic: String,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        body: bytes::Bytes,
        done: Option<Tag>,
        dedup: Option<Box<Dedup>>,
    },
    /// Sets a queue's policy (idempotent; sent when an address becomes active).
    Declare {
        address: String,
        /// False: an in-memory queue (see [`crate::volatile`]).
        durable: bool,
        max_delivery_attempts: u32,
        max_ttl_ms: Option<u64>,
        dead_letter: Option<String>,
        expiry_address: Option<String>,
    },
    /// Creates (or re-filters) a named durable subscription with no consumer yet.
    Bind {
        name: String,
        filter: String,
    },
    /// Removes a subscription and the messages it holds.
    Unsubscribe {
        name: String,
    },
    /// See [`Cmd::Expire`].
    Expire {
        name: String,
        keep_ms: Option<u64>,
    },
    Attach {
        consumer: ConsumerId,
        address: String,
        credit: u32,
    },
    Subscribe {
        consumer: ConsumerId,
        name: String,
        filter: String,
        durable: bool,
        credit: u32,
    },
    Credit {
        consumer: ConsumerId,
        credit: u32,
    },
    Settle {
        consumer: ConsumerId,
        seq: Seq,
        outcome: Outcome,
        /// Report when the settlement is durable (a consumer that settles second waits).
        done: Option<Tag>,
    },
    Detach {
        consumer: ConsumerId,
    },
    /// Removes the ready messages of a queue (unacknowledged ones stay).
    Purge {
        address: String,
    },
    /// An `Enqueue` or `Publish` that may arrive more than once: see [`Cmd::Once`].
    Once {
        origin: u64,
        seq: u64,
        request: Box<Request>,
    },
    /// A consumer continuing under a new id after its router reconnected: see
    /// [`Cmd::Resume`].
    Resume {
        old: Vec<ConsumerId>,
        consumer: ConsumerId,
        target: Target,
        keep: Vec<Seq>,
        credit: u32,
    },
    /// Counters of every queue, answered without going through the log.
    /// Counters of the queues whose address starts with `prefix`.
    Info {
        prefix: String,
        reply: tokio::sync::oneshot::Sender<Vec<QueueInfo>>,
    },
}

/// A message for a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub seq: Seq,
    pub delivery_count: u32,
    /// Shared with the store's copy (in memory) rather than copied for each delivery.
    pub body: bytes::Bytes,
}

/// Milliseconds since the Unix epoch (the proposer's clock goes into each command).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `cmd` inside a [`Cmd::Dedup`] when it has a deduplication id.
fn deduplicated(cmd: Cmd, dedup: Option<Box<Dedup>>) -> Cmd {
    match dedup.map(|d| *d) {
        Some(Dedup { id, new, hash }) => Cmd::Dedup {
            id,
            new,
            hash,
            cmd: Box::new(cmd),
        },
        None => cmd,
    }
}

/// The command a request proposes, and the tag of its completion (the in-memory store
/// converts the requests it serves the same way).
pub(crate) fn to_cmd(r: Request, now: u64) -> (Cmd, Option<Tag>) {
    match r {
        Request::Enqueue {
            address,
            ttl_ms,
            absolute_expiry,
            body,
            done,
            dedup,
        } => (
            deduplicated(
                Cmd::Enqueue {
                    address,
                    now,
                    ttl_ms,
                    absolute_expiry,
                    // No copy when the body is not shared.
                    body: Vec::from(body),
                },
                dedup,
            ),
            done,
        ),
        Request::Publish {
            topic,
            ttl_ms,
            absolute_expiry,
            body,
            done,
            dedup,
        } => (
            deduplicated(
                Cmd::Publish {
                    topic,
                    now,
                    ttl_ms,
                    absolute_expiry,
                    body: Vec::from(body),
                },
                dedup,
            ),
            done,
        ),
        Request::Declare {
            address,
            durable: _,
            max_delivery_attempts,
            max_ttl_ms,
            dead_letter,
            expiry_address,
        } => (
            Cmd::Declare {
                address,
                max_delivery_attempts,
                max_ttl_ms,
                dead_letter,
                expiry_address,
            },
            None,
        ),
        Request::Bind { name, filter } => (Cmd::Bind { name, filter }, None),
        Request::Unsubscribe { name } => (Cmd::Unsubscribe { name }, None),
        Request::Expire { name, keep_ms } => (Cmd::Expire { name, keep_ms, now }, None),
        Request::Attach {
            consumer,
            address,
            credit,
        } => (
            Cmd::Attach {
                consumer,
                address,
                credit,
                now,
            },
            None,
        ),
        Request::Subscribe {
            consumer,
            name,
            filter,
            durable,
            credit,
        } => (
            Cmd::Subscribe {
                consumer,
                name,
                filter,
                durable,
                credit,
                now,
            },
            None,
        ),
        Request::Credit { consumer, credit } => (
            Cmd::Credit {
                consumer,
                credit,
                now,
            },
            None,
        ),
        Request::Settle {
            consumer,
            seq,
            outcome,
            done,
        } => (
            Cmd::Settle {
                consumer,
                seq,
                outcome,
                now,
            },
            done,
        ),
        Request::Detach { consumer } => (Cmd::Detach { consumer, now }, None),
        Request::Purge { address } => (Cmd::Purge { address }, None),
        Request::Once {
            origin,
            seq,
            request,
        } => {
            let (cmd, done) = to_cmd(*request, now);
            let cmd = Cmd::Once {
                origin,
                seq,
                cmd: Box::new(cmd),
            };
            (cmd, done)
        }
        Request::Resume {
            old,
            consumer,
            target,
            keep,
            credit,
        } => (
            Cmd::Resume {
                old,
                new: consumer,
                target,
                keep,
                credit,
                now,
            },
            None,
        ),
        // Answered before proposing (see `run`).
        Request::Info { .. } => (Cmd::Tick { now }, None),
    }
}

/// The `Publish` inside `r` (itself or wrapped in `Once`).
fn as_publish(r: &Request) -> Option<&Request> {
    match r {
        Request::Publish { .. } => Some(r),
        Request::Once { request, .. } => as_publish(request),
        _ => None,
    }
}

/// Whether proposing `cmd` may add a subscription binding to the shard.
fn may_bind(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Subscribe { .. } | Cmd::Bind { .. } | Cmd::Resume { .. }
    )
}

/// What the service decides for one publication: hand it to the in-memory subscriptions
/// that match, and to the log too unless `direct` allows skipping it (then it completes at
/// once). Returns the request if it still has to be proposed.
fn publish(
    r: Request,
    volatile: &mut Volatile,
    direct: bool,
    handle: &ShardHandle,
    now: u64,
    out: &mut crate::volatile::Out,
    done: &mut Vec<(Tag, Result<(), StoreError>)>,
) -> Option<Request> {
    let Some(Request::Publish {
        topic,
        ttl_ms,
        absolute_expiry,
        body,
        dedup,
        ..
    }) = as_publish(&r)
    else {
        return Some(r);
    };
    let logged = !direct || handle.publishes_to(topic);
    if logged {
        if volatile.publishes_to(topic) {
            // A full store: these subscriptions miss it (the durable ones have it).
            let _ = volatile.publish(
                topic.clone(),
                *ttl_ms,
                *absolute_expiry,
                body.clone(),
                dedup.as_deref(),
                now,
                out,
            );
        }
        return Some(r);
    }
    let Request::Publish {
        topic,
        ttl_ms,
        absolute_expiry,
        body,
        done: tag,
        dedup,
    } = into_publish(r)
    else {
        return None;
    };
    let res = volatile.publish(
        topic,
        ttl_ms,
        absolute_expiry,
        body,
        dedup.as_deref(),
        now,
        out,
    );
    if let Some(t) = tag {
        done.push((t, res));
    }
    None
}

/// `r` without its `Once` wrappers.
fn into_publish(r: Request) -> Request {
    match r {
        Request::Once { request, .. } => into_publish(*request),
        r => r,
    }
}

/// Runs the broker until `requests` closes. Deliveries (with their bodies read from the log)
/// go to `deliveries`; a periodic tick expires messages.
pub async fn run(
    node: ShardNode,
    requests: mpsc::UnboundedReceiver<Request>,
    deliveries: mpsc::UnboundedSender<Vec<Delivery>>,
    completions: Completions,
) {
    let always = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    run_replica(node, requests, deliveries, completions, always).await
}

/// [`run`] for one replica of a replicated shard: while `serving` is false (a follower), the
/// effects of applied commands are dropped instead of turned into deliveries (its state's
/// consumers belong to the leader's routers; a new leader detaches them first).
pub async fn run_replica(
    node: ShardNode,
    mut requests: mpsc::UnboundedReceiver<Request>,
    deliveries: mpsc::UnboundedSender<Vec<Delivery>>,
    completions: Completions,
    serving: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let handle = node.handle();
    let ShardNode { mut effects, .. } = node;
    // Bodies come with the effects of the command that carried them and are kept (bounded)
    // until delivered and forgotten; older ones are read back from the log. A separate task,
    // so that proposing never waits on reads.
    let reader = handle.clone();
    let direct = deliveries.clone();
    let leads = serving.clone();
    let mut volatile = Volatile::new(VolatileLimits::default());
    let (fx_tx, mut fx_rx) = mpsc::unbounded_channel::<Applied>();
    let body_task = tokio::spawn(async move {
        let mut fresh: BTreeMap<Seq, bytes::Bytes> = BTreeMap::new();
        let mut fresh_bytes = 0usize;
        while let Some(applied) = fx_rx.recv().await {
            if !serving.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            if let Some((seq, body)) = applied.body {
                fresh_bytes += body.len();
                fresh.insert(seq, bytes::Bytes::from(body));
                // Bounded: the oldest go first (they are the ones a backlog reads from disk).
                while fresh.len() > FRESH_BODIES || fresh_bytes > FRESH_BYTES {
                    match fresh.pop_first() {
                        Some((_, b)) => fresh_bytes -= b.len(),
                        None => break,
                    }
                }
            }
            let mut out = Vec::new();
            for e in applied.effects {
                match e {
                    ShardEffect::Deliver {
                        consumer,
                        seq,
                        delivery_count,
                    } => {
                        let body = match fresh.get(&seq) {
                            Some(b) => Ok(b.clone()),
                            None => reader.body(seq).await.map(bytes::Bytes::from),
                        };
                        match body {
                            Ok(body) => out.push(Delivery {
                                consumer,
                                seq,
                                delivery_count,
                                body,
                            }),
                            Err(e) => tracing::error!("cannot read message {seq}: {e}"),
                        }
                    }
                    ShardEffect::Forget { seq } => {
                        if let Some(b) = fresh.remove(&seq) {
                            fresh_bytes -= b.len();
                        }
                    }
                }
            }
            if !out.is_empty() && deliveries.send(out).is_err() {
                return;
            }
        }
    });
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let (mut ticks, mut busy) = (0u32, false);
    // Leading with the whole log applied (see the module docs); and how many proposals that
    // may add a subscription are in flight.
    let mut warm = false;
    let binding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        tokio::select! {
            n = requests.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    break;
                }
                let now = now_ms();
                let leading = leads.load(std::sync::atomic::Ordering::Acquire);
                warm = leading && (warm || handle.caught_up());
                let mut direct_ok = warm && binding.load(std::sync::atomic::Ordering::Acquire) == 0;
                let (mut here, mut here_done) = (crate::volatile::Out::default(), Vec::new());
                let (cmds, tags): (Vec<Cmd>, Vec<Option<Tag>>) = batch
                    .drain(..)
                    .filter_map(|r| match r {
                        Request::Info { prefix, reply } => {
                            let mut all = handle.queues(&prefix);
                            all.extend(volatile.info(&prefix));
                            let _ = reply.send(all);
                            None
                        }
                        r => {
                            if as_publish(&r).is_some() {
                                return publish(r, &mut volatile, direct_ok, &handle, now, &mut here, &mut here_done)
                                    .map(|r| to_cmd(r, now));
                            }
                            // A new non-durable subscription is held in memory.
                            if let Request::Subscribe { name, durable: false, .. }
                            | Request::Resume {
                                target: Target::Subscription { name, durable: false, .. },
                                ..
                            } = &r
                                && warm
                                && !volatile.holds(name)
                                && !handle.has_subscription(name)
                            {
                                volatile.adopt();
                            }
                            match volatile.handle(r, now) {
                                Ok(out) => {
                                    here.deliveries.extend(out.deliveries);
                                    here_done.extend(out.done);
                                    None
                                }
                                Err(r) => {
                                    let (cmd, tag) = to_cmd(r, now);
                                    // Later publications of this batch see it only in the log.
                                    direct_ok &= !may_bind(&cmd);
                                    Some((cmd, tag))
                                }
                            }
                        }
                    })
                    .unzip();
                if !here.deliveries.is_empty() {
                    let _ = direct.send(here.deliveries);
                }
                here_done.extend(here.done);
                if !here_done.is_empty() {
                    let _ = completions.send(here_done);
                }
                if cmds.is_empty() {
                    continue;
                }
                busy = true;
                let binds = cmds.iter().filter(|c| may_bind(c)).count();
                binding.fetch_add(binds, std::sync::atomic::Ordering::AcqRel);
                submit(&handle, cmds, tags, &completions, (binds, &binding)).await;
            }
            Some(fx) = effects.recv() => {
                let _ = fx_tx.send(fx);
            }
            _ = tick.tick() => {
                let now = now_ms();
                let expired = volatile.tick(now);
                if !expired.is_empty() {
                    let _ = direct.send(expired);
                }
                submit(&handle, vec![Cmd::Tick { now }], vec![None], &completions, (0, &binding)).await;
                // Snapshots also come by entry count; this one lets a shard that went quiet
                // (a backlog drained, then silence) compact its log without waiting for it.
                ticks += 1;
                if ticks % IDLE_SNAPSHOT_TICKS == 0 && busy {
                    busy = false;
                    handle.trigger_snapshot().await;
                }
            }
        }
    }
    drop(fx_tx);
    let _ = body_task.await;
}

/// Submits one batch in order and reports its tagged requests as commits arrive, without
/// holding up the next batch.
///
/// `binding`: how many of `cmds` may add a subscription, and the count of those in flight
/// (taken back once the batch has been applied or failed).
async fn submit(
    handle: &ShardHandle,
    cmds: Vec<Cmd>,
    tags: Vec<Option<Tag>>,
    done: &Completions,
    binding: (usize, &std::sync::Arc<std::sync::atomic::AtomicUsize>),
) {
    use futures_util::StreamExt;
    struct Landed(usize, std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl Drop for Landed {
        fn drop(&mut self) {
            self.1
                .fetch_sub(self.0, std::sync::atomic::Ordering::AcqRel);
        }
    }
    let landed = Landed(binding.0, binding.1.clone());
    let any = tags.iter().any(Option::is_some);
    match handle.propose_many(cmds).await {
        Ok(mut results) => {
            let done = done.clone();
            tokio::spawn(async move {
                let _landed = landed;
                let mut out = Vec::new();
                for tag in tags {
                    let r = results.next().await;
                    if let Some(t) = tag {
                        out.push((
                            t,
                            match r {
                                Some(Ok(_)) => Ok(()),
                                Some(Err(NodeError::NotLeader)) | None => Err(StoreError::Moved),
                                Some(Err(e)) => Err(StoreError::Failed(e.to_string())),
                            },
                        ));
                    }
                }
                if any {
                    let _ = done.send(out);
                }
            });
        }
        Err(e) => {
            let err = match e {
                NodeError::NotLeader => StoreError::Moved,
                e => StoreError::Failed(e.to_string()),
            };
            let out: Vec<_> = tags
                .into_iter()
                .flatten()
                .map(|t| (t, Err(err.clone())))
                .collect();
            if !out.is_empty() {
                let _ = done.send(out);
            }
        }
    }
}
