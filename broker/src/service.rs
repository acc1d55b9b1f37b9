//! The broker as a task the router talks to: requests in (enqueue, publish, consumer attach,
//! credit, settle, detach), deliveries out. It owns the [`ShardNode`] and is the only proposer.
//!
//! Requests are proposed in arrival order, in batches: everything queued when the task wakes
//! goes into one `client_write_many` (one append, one fsync for all of it: group commit), and
//! the next batch is submitted without waiting for the previous one to commit. A producer's
//! request completes (`done`) when its message is committed, which is when the router may send
//! `accepted`.

use tokio::sync::{mpsc, oneshot};

use crate::node::{ShardHandle, ShardNode};
use crate::queue::{ConsumerId, Outcome, Seq};
use crate::shard::{Cmd, ShardEffect};

/// Most requests proposed as one batch.
const MAX_BATCH: usize = 1024;

/// Outcome of a store request: `Ok` once durable.
pub type Done = oneshot::Sender<Result<(), String>>;

#[derive(Debug)]
pub enum Request {
    Enqueue {
        address: String,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        body: Vec<u8>,
        done: Option<Done>,
    },
    Publish {
        topic: String,
        ttl_ms: Option<u64>,
        absolute_expiry: Option<u64>,
        body: Vec<u8>,
        done: Option<Done>,
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
    },
    Detach {
        consumer: ConsumerId,
    },
}

/// A message for a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub consumer: ConsumerId,
    pub seq: Seq,
    pub delivery_count: u32,
    pub body: Vec<u8>,
}

/// Milliseconds since the Unix epoch (the proposer's clock goes into each command).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn to_cmd(r: Request, now: u64) -> (Cmd, Option<Done>) {
    match r {
        Request::Enqueue {
            address,
            ttl_ms,
            absolute_expiry,
            body,
            done,
        } => (
            Cmd::Enqueue {
                address,
                now,
                ttl_ms,
                absolute_expiry,
                body,
            },
            done,
        ),
        Request::Publish {
            topic,
            ttl_ms,
            absolute_expiry,
            body,
            done,
        } => (
            Cmd::Publish {
                topic,
                now,
                ttl_ms,
                absolute_expiry,
                body,
            },
            done,
        ),
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
        } => (
            Cmd::Settle {
                consumer,
                seq,
                outcome,
                now,
            },
            None,
        ),
        Request::Detach { consumer } => (Cmd::Detach { consumer, now }, None),
    }
}

/// Runs the broker until `requests` closes. Deliveries (with their bodies read from the log)
/// go to `deliveries`; a periodic tick expires messages.
pub async fn run(
    node: ShardNode,
    mut requests: mpsc::Receiver<Request>,
    deliveries: mpsc::UnboundedSender<Vec<Delivery>>,
) {
    let handle = node.handle();
    let ShardNode { mut effects, .. } = node;
    // Bodies are read off the log by a separate task so that proposing never waits on reads.
    let reader = handle.clone();
    let (fx_tx, mut fx_rx) = mpsc::unbounded_channel::<Vec<ShardEffect>>();
    let body_task = tokio::spawn(async move {
        while let Some(fx) = fx_rx.recv().await {
            let mut out = Vec::new();
            for e in fx {
                if let ShardEffect::Deliver {
                    consumer,
                    seq,
                    delivery_count,
                } = e
                {
                    match reader.body(seq).await {
                        Ok(body) => out.push(Delivery {
                            consumer,
                            seq,
                            delivery_count,
                            body,
                        }),
                        Err(e) => tracing::error!("cannot read message {seq}: {e}"),
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
    loop {
        tokio::select! {
            n = requests.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    break;
                }
                let now = now_ms();
                let (cmds, dones): (Vec<Cmd>, Vec<Option<Done>>) =
                    batch.drain(..).map(|r| to_cmd(r, now)).unzip();
                submit(&handle, cmds, dones).await;
            }
            Some(fx) = effects.recv() => {
                let _ = fx_tx.send(fx);
            }
            _ = tick.tick() => {
                submit(&handle, vec![Cmd::Tick { now: now_ms() }], vec![None]).await;
            }
        }
    }
    drop(fx_tx);
    let _ = body_task.await;
}

/// Submits one batch in order and completes its `done` senders as commits arrive, without
/// holding up the next batch.
async fn submit(handle: &ShardHandle, cmds: Vec<Cmd>, dones: Vec<Option<Done>>) {
    use futures_util::StreamExt;
    match handle.propose_many(cmds).await {
        Ok(mut results) => {
            tokio::spawn(async move {
                for done in dones {
                    let r = results.next().await;
                    if let Some(d) = done {
                        let _ = d.send(match r {
                            Some(Ok(_)) => Ok(()),
                            Some(Err(e)) => Err(e.to_string()),
                            None => Err("shard stopped".into()),
                        });
                    }
                }
            });
        }
        Err(e) => {
            for d in dones.into_iter().flatten() {
                let _ = d.send(Err(e.to_string()));
            }
        }
    }
}
