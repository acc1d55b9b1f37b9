//! The router↔broker link: how a router that runs no shard itself reaches `enmesh broker`.
//!
//! The protocol carries exactly the [`service`](crate::service) interface over TCP: requests
//! one way, deliveries, completions and management answers the other. Frames are
//! `[u32 length][u8 kind][body]` in the broker's own binary encoding ([`crate::wire`]); every
//! decode is bounds-checked and a bad frame closes that connection only.
//!
//! Several routers may connect to one broker. Consumer ids and completion tags are chosen by
//! each router, so the server puts the connection's number in their top bits on the way in and
//! takes it off on the way out; when a router's connection ends, its consumers are detached
//! (their unacknowledged messages return to the queue, as for any consumer that goes away).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::node::ShardNode;
use crate::queue::ConsumerId;
use crate::service::{Dedup, Delivery, Request, StoreError, Tag};
use crate::shard::{
    QueueInfo, Target, get_opt_str, outcome_byte, outcome_from, put_opt_str, put_u64,
};
use crate::wire::{Reader, put_bytes, put_opt_u64, put_varint};

/// Largest frame accepted: a message of the router's largest size plus headroom.
pub const MAX_FRAME: usize = 256 * 1024 * 1024;
/// Deliveries are batched into frames of about this many bytes.
const BATCH_BYTES: usize = 1024 * 1024;
/// Consumer ids and tags a router may use: the bits above carry the connection number.
const LOCAL_BITS: u32 = 40;
const LOCAL_MASK: u64 = (1 << LOCAL_BITS) - 1;

/// Cluster management requests (see `broker::cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admin {
    /// The shards this broker hosts: leader, voters, learners, last applied entry (JSON).
    Status,
    /// Open an empty replica of `shard` here (it receives the log or a snapshot from the
    /// leader once added to the group).
    Host { shard: u32 },
    /// Delete this broker's replica of `shard` (after the group removed it; refused while
    /// this replica leads).
    Unhost { shard: u32 },
    /// At the shard's leader: add broker `id` as a learner, wait until it has caught up, then
    /// make it a voter.
    AddReplica {
        shard: u32,
        id: u64,
        raft: String,
        client: String,
    },
    /// At the shard's leader: remove broker `id` from the group.
    RemoveReplica { shard: u32, id: u64 },
    /// At the shard's leader: hand leadership to voter `to` and wait until it leads.
    Lead { shard: u32, to: u64 },
}

impl Admin {
    fn encode(&self, o: &mut Vec<u8>) {
        match self {
            Admin::Status => o.push(0),
            Admin::Host { shard } => {
                o.push(1);
                put_varint(o, u64::from(*shard));
            }
            Admin::Unhost { shard } => {
                o.push(2);
                put_varint(o, u64::from(*shard));
            }
            Admin::AddReplica {
                shard,
                id,
                raft,
                client,
            } => {
                o.push(3);
                put_varint(o, u64::from(*shard));
                put_varint(o, *id);
                put_bytes(o, raft.as_bytes());
                put_bytes(o, client.as_bytes());
            }
            Admin::RemoveReplica { shard, id } => {
                o.push(4);
                put_varint(o, u64::from(*shard));
                put_varint(o, *id);
            }
            Admin::Lead { shard, to } => {
                o.push(5);
                put_varint(o, u64::from(*shard));
                put_varint(o, *to);
            }
        }
    }

    fn decode(r: &mut Reader) -> io::Result<Admin> {
        Ok(match r.u8()? {
            0 => Admin::Status,
            1 => Admin::Host {
                shard: get_u32v(r)?,
            },
            2 => Admin::Unhost {
                shard: get_u32v(r)?,
            },
            3 => Admin::AddReplica {
                shard: get_u32v(r)?,
                id: r.varint()?,
                raft: r.string()?,
                client: r.string()?,
            },
            4 => Admin::RemoveReplica {
                shard: get_u32v(r)?,
                id: r.varint()?,
            },
            5 => Admin::Lead {
                shard: get_u32v(r)?,
                to: r.varint()?,
            },
            _ => return Err(bad("unknown admin request")),
        })
    }
}

/// Sends one admin request to the broker at `addr` and returns its answer.
pub async fn admin(addr: &str, a: Admin, timeout: std::time::Duration) -> io::Result<ToRouter> {
    let run = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        let mut buf = Vec::new();
        let m = ToBroker::Admin(a);
        write_frame(&mut sock, &mut buf, |o| m.encode(o)).await?;
        let frame = read_frame(&mut sock)
            .await?
            .ok_or_else(|| bad("closed before answering"))?;
        ToRouter::decode(&frame)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer from broker"))?
}

/// Writes one answer to an admin request and closes.
pub async fn answer<S: AsyncWrite + Unpin>(mut sock: S, m: ToRouter) {
    let mut buf = Vec::new();
    let _ = write_frame(&mut sock, &mut buf, |o| {
        m.encode(o);
        Ok(())
    })
    .await;
    let _ = sock.shutdown().await;
}

/// How long the consumers of a connection that broke (rather than said [`ToBroker::Bye`])
/// stay attached, waiting for their router to resume them on a new connection.
pub const RESUME_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A store request's outcome, by tag.
pub type Completion = (Tag, Result<(), StoreError>);

/// Router → broker.
#[derive(Debug)]
pub enum ToBroker {
    /// Any request but `Info`.
    Request(Request),
    /// Counters of the queues under `prefix`, answered with [`ToRouter::Info`] carrying the
    /// same id.
    Info { id: u64, prefix: String },
    /// The first frame of a connection: which shard it is for. Answered by
    /// [`ToRouter::NotLeader`] (and the connection closed) when this broker does not lead it.
    Hello { shard: u32 },
    /// Liveness: answered by [`ToRouter::Pong`]. Routers send one twice a second; a partition
    /// that drops packets silently is noticed within seconds on both sides.
    Ping,
    /// Cluster management instead of a `Hello` (`enmesh cluster …`): answered by one
    /// [`ToRouter::Admin`], then the connection closes.
    Admin(Admin),
    /// The router is leaving for good (shutting down): its consumers are detached at once.
    /// A connection that ends without it leaves them attached for [`RESUME_GRACE`], for the
    /// router to resume them.
    Bye,
}

/// Broker → router.
#[derive(Debug, PartialEq, Eq)]
pub enum ToRouter {
    Deliveries(Vec<Delivery>),
    Done(Vec<Completion>),
    Info {
        id: u64,
        queues: Vec<QueueInfo>,
    },
    /// This broker does not lead the shard; `leader` is the router-facing address of the one
    /// that does, if known.
    NotLeader {
        leader: Option<String>,
    },
    /// The answer to [`ToBroker::Admin`]: `text` is the result (JSON for `Status`) or why it
    /// failed; `leader` names the shard leader's router-facing address when the request must
    /// go there.
    Admin {
        ok: bool,
        text: String,
        leader: Option<String>,
    },
    /// The broker serves this connection's shard: requests may follow. `conn` is the
    /// connection's number, the top bits of the ids of consumers attached through it (a
    /// router resuming consumers after a reconnection names them by it).
    Welcome {
        conn: u64,
    },
    Pong,
}

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn put_opt_tag(o: &mut Vec<u8>, t: Option<Tag>) {
    put_opt_u64(o, t);
}

fn get_u32v(r: &mut Reader) -> io::Result<u32> {
    u32::try_from(r.varint()?).map_err(|_| bad("value out of range"))
}

impl ToBroker {
    /// Encodes the frame body (kind byte first).
    pub fn encode(&self, o: &mut Vec<u8>) -> io::Result<()> {
        match self {
            ToBroker::Info { id, prefix } => {
                o.push(100);
                put_varint(o, *id);
                put_bytes(o, prefix.as_bytes());
            }
            ToBroker::Hello { shard } => {
                o.push(101);
                put_varint(o, u64::from(*shard));
            }
            ToBroker::Ping => o.push(102),
            ToBroker::Bye => o.push(103),
            ToBroker::Admin(a) => {
                o.push(104);
                a.encode(o);
            }
            ToBroker::Request(r) => encode_request(r, o)?,
        }
        Ok(())
    }

    pub fn decode(b: &[u8]) -> io::Result<ToBroker> {
        let mut r = Reader(b);
        let kind = r.u8()?;
        let m = match kind {
            100 => ToBroker::Info {
                id: r.varint()?,
                prefix: r.string()?,
            },
            101 => ToBroker::Hello {
                shard: get_u32v(&mut r)?,
            },
            102 => ToBroker::Ping,
            103 => ToBroker::Bye,
            104 => ToBroker::Admin(Admin::decode(&mut r)?),
            k => ToBroker::Request(decode_request(k, &mut r)?),
        };
        if !r.is_empty() {
            return Err(bad("trailing bytes in frame"));
        }
        Ok(m)
    }
}

/// Encodes a request as a frame body (what [`ToBroker::Request`] carries), from a reference.
pub fn encode_request(r: &Request, o: &mut Vec<u8>) -> io::Result<()> {
    match r {
        Request::Enqueue {
            address,
            ttl_ms,
            absolute_expiry,
            body,
            done,
            dedup,
        } => {
            o.push(1);
            put_bytes(o, address.as_bytes());
            put_opt_u64(o, *ttl_ms);
            put_opt_u64(o, *absolute_expiry);
            put_bytes(o, body);
            put_opt_tag(o, *done);
            put_dedup(o, dedup.as_deref());
        }
        Request::Publish {
            topic,
            ttl_ms,
            absolute_expiry,
            body,
            done,
            dedup,
        } => {
            o.push(2);
            put_bytes(o, topic.as_bytes());
            put_opt_u64(o, *ttl_ms);
            put_opt_u64(o, *absolute_expiry);
            put_bytes(o, body);
            put_opt_tag(o, *done);
            put_dedup(o, dedup.as_deref());
        }
        Request::Declare {
            address,
            durable,
            max_delivery_attempts,
            max_ttl_ms,
            dead_letter,
            expiry_address,
        } => {
            o.push(3);
            put_bytes(o, address.as_bytes());
            o.push(u8::from(*durable));
            put_varint(o, u64::from(*max_delivery_attempts));
            put_opt_u64(o, *max_ttl_ms);
            put_opt_str(o, dead_letter.as_deref());
            put_opt_str(o, expiry_address.as_deref());
        }
        Request::Bind { name, filter } => {
            o.push(4);
            put_bytes(o, name.as_bytes());
            put_bytes(o, filter.as_bytes());
        }
        Request::Expire { name, keep_ms } => {
            o.push(14);
            put_bytes(o, name.as_bytes());
            put_opt_u64(o, *keep_ms);
        }
        Request::Unsubscribe { name } => {
            o.push(5);
            put_bytes(o, name.as_bytes());
        }
        Request::Attach {
            consumer,
            address,
            credit,
        } => {
            o.push(6);
            put_varint(o, *consumer);
            put_bytes(o, address.as_bytes());
            put_varint(o, u64::from(*credit));
        }
        Request::Subscribe {
            consumer,
            name,
            filter,
            durable,
            credit,
        } => {
            o.push(7);
            put_varint(o, *consumer);
            put_bytes(o, name.as_bytes());
            put_bytes(o, filter.as_bytes());
            o.push(u8::from(*durable));
            put_varint(o, u64::from(*credit));
        }
        Request::Credit { consumer, credit } => {
            o.push(8);
            put_varint(o, *consumer);
            put_varint(o, u64::from(*credit));
        }
        Request::Settle {
            consumer,
            seq,
            outcome,
            done,
        } => {
            o.push(9);
            put_varint(o, *consumer);
            put_varint(o, *seq);
            o.push(outcome_byte(*outcome));
            put_opt_tag(o, *done);
        }
        Request::Detach { consumer } => {
            o.push(10);
            put_varint(o, *consumer);
        }
        Request::Purge { address } => {
            o.push(11);
            put_bytes(o, address.as_bytes());
        }
        Request::Once {
            origin,
            seq,
            request,
        } => {
            o.push(12);
            put_varint(o, *origin);
            put_varint(o, *seq);
            match **request {
                Request::Enqueue { .. } | Request::Publish { .. } => encode_request(request, o)?,
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "only a message may be sent once",
                    ));
                }
            }
        }
        Request::Resume {
            old,
            consumer,
            target,
            keep,
            credit,
        } => {
            o.push(13);
            put_varint(o, old.len() as u64);
            for id in old {
                put_varint(o, *id);
            }
            put_varint(o, *consumer);
            target.put(o);
            crate::queue::put_sorted_seqs(o, keep);
            put_varint(o, u64::from(*credit));
        }
        Request::Info { .. } => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Info travels as ToBroker::Info",
            ));
        }
    }
    Ok(())
}

fn put_dedup(o: &mut Vec<u8>, d: Option<&Dedup>) {
    put_opt_str(o, d.map(|d| d.id.as_str()));
    if let Some(d) = d {
        o.push(u8::from(d.new));
        put_u64(o, d.hash);
    }
}

fn get_dedup(r: &mut Reader) -> io::Result<Option<Box<Dedup>>> {
    let Some(id) = get_opt_str(r)? else {
        return Ok(None);
    };
    if id.len() > crate::shard::MAX_DEDUP_ID {
        return Err(bad("deduplication id too long"));
    }
    Ok(Some(Box::new(Dedup {
        id,
        new: r.u8()? != 0,
        hash: r.u64()?,
    })))
}

fn decode_request(kind: u8, r: &mut Reader) -> io::Result<Request> {
    Ok(match kind {
        1 => Request::Enqueue {
            address: r.string()?,
            ttl_ms: r.opt_u64()?,
            absolute_expiry: r.opt_u64()?,
            body: r.bytes()?.into(),
            done: r.opt_u64()?,
            dedup: get_dedup(r)?,
        },
        2 => Request::Publish {
            topic: r.string()?,
            ttl_ms: r.opt_u64()?,
            absolute_expiry: r.opt_u64()?,
            body: r.bytes()?.into(),
            done: r.opt_u64()?,
            dedup: get_dedup(r)?,
        },
        3 => Request::Declare {
            address: r.string()?,
            durable: r.u8()? != 0,
            max_delivery_attempts: get_u32v(r)?,
            max_ttl_ms: r.opt_u64()?,
            dead_letter: get_opt_str(r)?,
            expiry_address: get_opt_str(r)?,
        },
        4 => Request::Bind {
            name: r.string()?,
            filter: r.string()?,
        },
        5 => Request::Unsubscribe { name: r.string()? },
        14 => Request::Expire {
            name: r.string()?,
            keep_ms: r.opt_u64()?,
        },
        6 => Request::Attach {
            consumer: r.varint()?,
            address: r.string()?,
            credit: get_u32v(r)?,
        },
        7 => Request::Subscribe {
            consumer: r.varint()?,
            name: r.string()?,
            filter: r.string()?,
            durable: r.u8()? != 0,
            credit: get_u32v(r)?,
        },
        8 => Request::Credit {
            consumer: r.varint()?,
            credit: get_u32v(r)?,
        },
        9 => Request::Settle {
            consumer: r.varint()?,
            seq: r.varint()?,
            outcome: outcome_from(r.u8()?)?,
            done: r.opt_u64()?,
        },
        10 => Request::Detach {
            consumer: r.varint()?,
        },
        11 => Request::Purge {
            address: r.string()?,
        },
        12 => {
            let origin = r.varint()?;
            let seq = r.varint()?;
            let request = match r.u8()? {
                k @ (1 | 2) => decode_request(k, r)?,
                _ => return Err(bad("only a message may be sent once")),
            };
            Request::Once {
                origin,
                seq,
                request: Box::new(request),
            }
        }
        13 => {
            let n = r.count(1)?;
            if n > crate::shard::MAX_RESUMED_IDS {
                return Err(bad("too many resumed ids"));
            }
            let mut old = Vec::with_capacity(n);
            for _ in 0..n {
                old.push(r.varint()?);
            }
            let consumer = r.varint()?;
            let target = Target::decode(r)?;
            let mut keep = Vec::new();
            crate::queue::get_seqs(r, |s| keep.push(s))?;
            Request::Resume {
                old,
                consumer,
                target,
                keep,
                credit: get_u32v(r)?,
            }
        }
        _ => return Err(bad("unknown request kind")),
    })
}

impl ToRouter {
    pub fn encode(&self, o: &mut Vec<u8>) {
        match self {
            ToRouter::Deliveries(ds) => {
                o.push(1);
                put_varint(o, ds.len() as u64);
                for d in ds {
                    put_varint(o, d.consumer);
                    put_varint(o, d.seq);
                    put_varint(o, u64::from(d.delivery_count));
                    put_bytes(o, &d.body);
                }
            }
            ToRouter::Done(list) => {
                o.push(2);
                put_varint(o, list.len() as u64);
                for (tag, r) in list {
                    put_varint(o, *tag);
                    match r {
                        Ok(()) => o.push(0),
                        Err(StoreError::Full(a)) => {
                            o.push(1);
                            put_bytes(o, a.as_bytes());
                        }
                        Err(StoreError::Failed(why)) => {
                            o.push(2);
                            put_bytes(o, why.as_bytes());
                        }
                        Err(StoreError::Moved) => o.push(3),
                    }
                }
            }
            ToRouter::NotLeader { leader } => {
                o.push(4);
                put_opt_str(o, leader.as_deref());
            }
            ToRouter::Welcome { conn } => {
                o.push(5);
                put_varint(o, *conn);
            }
            ToRouter::Admin { ok, text, leader } => {
                o.push(7);
                o.push(u8::from(*ok));
                put_bytes(o, text.as_bytes());
                put_opt_str(o, leader.as_deref());
            }
            ToRouter::Pong => o.push(6),
            ToRouter::Info { id, queues } => {
                o.push(3);
                put_varint(o, *id);
                put_varint(o, queues.len() as u64);
                for q in queues {
                    put_bytes(o, q.address.as_bytes());
                    for v in [q.depth as u64, q.ready as u64, q.consumers as u64] {
                        put_varint(o, v);
                    }
                    for v in [
                        q.enqueued,
                        q.acknowledged,
                        q.expired,
                        q.dead_lettered,
                        q.redelivered,
                    ] {
                        put_varint(o, v);
                    }
                }
            }
        }
    }

    pub fn decode(b: &[u8]) -> io::Result<ToRouter> {
        let mut r = Reader(b);
        let usize_v =
            |r: &mut Reader| usize::try_from(r.varint()?).map_err(|_| bad("value out of range"));
        let m = match r.u8()? {
            1 => {
                let n = r.count(4)?;
                let mut ds = Vec::with_capacity(n);
                for _ in 0..n {
                    ds.push(Delivery {
                        consumer: r.varint()?,
                        seq: r.varint()?,
                        delivery_count: get_u32v(&mut r)?,
                        body: r.bytes()?.into(),
                    });
                }
                ToRouter::Deliveries(ds)
            }
            2 => {
                let n = r.count(2)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let tag = r.varint()?;
                    let res = match r.u8()? {
                        0 => Ok(()),
                        1 => Err(StoreError::Full(r.string()?)),
                        2 => Err(StoreError::Failed(r.string()?)),
                        3 => Err(StoreError::Moved),
                        _ => return Err(bad("bad completion")),
                    };
                    list.push((tag, res));
                }
                ToRouter::Done(list)
            }
            3 => {
                let id = r.varint()?;
                let n = r.count(12)?;
                let mut queues = Vec::with_capacity(n);
                for _ in 0..n {
                    queues.push(QueueInfo {
                        address: r.string()?,
                        shard: 0,
                        depth: usize_v(&mut r)?,
                        ready: usize_v(&mut r)?,
                        consumers: usize_v(&mut r)?,
                        enqueued: r.varint()?,
                        acknowledged: r.varint()?,
                        expired: r.varint()?,
                        dead_lettered: r.varint()?,
                        redelivered: r.varint()?,
                    });
                }
                ToRouter::Info { id, queues }
            }
            4 => ToRouter::NotLeader {
                leader: get_opt_str(&mut r)?,
            },
            5 => ToRouter::Welcome { conn: r.varint()? },
            7 => ToRouter::Admin {
                ok: r.u8()? != 0,
                text: r.string()?,
                leader: get_opt_str(&mut r)?,
            },
            6 => ToRouter::Pong,
            _ => return Err(bad("unknown frame kind")),
        };
        if !r.is_empty() {
            return Err(bad("trailing bytes in frame"));
        }
        Ok(m)
    }
}

/// Reads one frame body; `None` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_FRAME {
        return Err(bad("frame length out of range"));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Writes one frame whose body `encode` appends.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut Vec<u8>,
    encode: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    buf.clear();
    buf.extend_from_slice(&[0; 4]);
    encode(buf)?;
    let n = buf.len() - 4;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
    w.write_all(buf).await
}

/// Splits deliveries into frames of about [`BATCH_BYTES`].
fn batches(ds: Vec<Delivery>) -> Vec<Vec<Delivery>> {
    let mut out = Vec::new();
    let (mut cur, mut bytes) = (Vec::new(), 0);
    for d in ds {
        bytes += d.body.len() + 16;
        cur.push(d);
        if bytes >= BATCH_BYTES {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

// --- server -------------------------------------------------------------------------------

/// What the demultiplexer knows about each router connection.
type Conns = std::sync::Arc<std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<ToRouter>>>>;

fn conns_send(conns: &Conns, conn: u64, m: ToRouter) {
    if let Some(tx) = conns.lock().ok().and_then(|g| g.get(&conn).cloned()) {
        let _ = tx.send(m);
    }
}

/// One shard's service as routers reach it: the service task, the demultiplexer of its
/// deliveries and completions, and the router connections attached to it.
pub struct ShardService {
    requests: mpsc::UnboundedSender<Request>,
    conns: Conns,
    next_conn: std::sync::atomic::AtomicU64,
    /// Bumped to make every attached router connection close (leadership lost).
    kick: watch::Sender<u64>,
    service: tokio::task::JoinHandle<()>,
    demux: tokio::task::JoinHandle<()>,
}

impl ShardService {
    /// Starts the service for `node` (always serving).
    pub fn start(node: ShardNode) -> ShardService {
        ShardService::start_replica(node, Arc::new(AtomicBool::new(true)))
    }

    /// Starts the service for one replica; it turns effects into deliveries only while
    /// `serving` (see [`crate::service::run_replica`]).
    pub fn start_replica(node: ShardNode, serving: Arc<AtomicBool>) -> ShardService {
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (dl_tx, mut dl_rx) = mpsc::unbounded_channel::<Vec<Delivery>>();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let service = tokio::spawn(crate::service::run_replica(
            node, req_rx, dl_tx, done_tx, serving,
        ));
        let conns: Conns = Default::default();
        // Deliveries and completions go back to the connection whose number is in their top
        // bits.
        let demux = {
            let conns = conns.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        Some(ds) = dl_rx.recv() => {
                            let mut by: HashMap<u64, Vec<Delivery>> = HashMap::new();
                            for mut d in ds {
                                let conn = d.consumer >> LOCAL_BITS;
                                d.consumer &= LOCAL_MASK;
                                by.entry(conn).or_default().push(d);
                            }
                            for (conn, ds) in by {
                                for b in batches(ds) {
                                    conns_send(&conns, conn, ToRouter::Deliveries(b));
                                }
                            }
                        }
                        Some(list) = done_rx.recv() => {
                            let mut by: HashMap<u64, Vec<Completion>> = HashMap::new();
                            for (tag, r) in list {
                                by.entry(tag >> LOCAL_BITS).or_default().push((tag & LOCAL_MASK, r));
                            }
                            for (conn, list) in by {
                                conns_send(&conns, conn, ToRouter::Done(list));
                            }
                        }
                        else => break,
                    }
                }
            })
        };
        ShardService {
            requests: req_tx,
            conns,
            next_conn: std::sync::atomic::AtomicU64::new(1),
            kick: watch::channel(0).0,
            service,
            demux,
        }
    }

    /// Sends a request to the shard directly (the broker's own housekeeping).
    pub fn request(&self, r: Request) {
        let _ = self.requests.send(r);
    }

    /// Numbers the next connections from `base` up (a new leader starts above anything a
    /// previous one may have used, so stale consumer ids cannot collide with new ones).
    pub fn renumber(&self, base: u64) {
        self.next_conn
            .store(base.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes every router connection (leadership moved elsewhere).
    pub fn kick_all(&self) {
        self.kick.send_modify(|n| *n += 1);
    }

    /// Serves a router connection whose `Hello` (if any) has been read.
    pub fn attach<S>(&self, sock: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let conn = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            & ((1 << (64 - LOCAL_BITS)) - 1);
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(ToRouter::Welcome { conn });
        if let Ok(mut g) = self.conns.lock() {
            g.insert(conn, tx.clone());
        }
        tracing::info!("router {peer} connected (connection {conn})");
        tokio::spawn(serve_conn(
            sock,
            conn,
            tx,
            rx,
            self.requests.clone(),
            self.conns.clone(),
            self.kick.subscribe(),
        ));
    }

    /// Stops the service (after its connections are gone).
    /// Stops at once (the replica is being deleted): router connections close, nothing more
    /// is proposed.
    pub fn abort(&self) {
        self.kick_all();
        if let Ok(mut g) = self.conns.lock() {
            g.clear();
        }
        self.service.abort();
        self.demux.abort();
    }

    pub async fn stop(self) {
        self.kick_all();
        drop(self.requests);
        if let Ok(mut g) = self.conns.lock() {
            g.clear();
        }
        let _ = self.service.await;
        self.demux.abort();
    }
}

/// Serves the shard in `node` to routers connecting on `listener` until `shutdown` is set (one
/// shard, no cluster: the shard number in `Hello` must be 0).
pub async fn serve(
    node: ShardNode,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let svc = ShardService::start(node);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (mut sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                match read_hello(&mut sock).await {
                    Ok(0) => svc.attach(sock, peer.to_string()),
                    Ok(_) => refuse(sock, None).await,
                    Err(e) => tracing::warn!("router {peer}: {e}"),
                }
            }
        }
    }
    svc.stop().await;
    Ok(())
}

/// Reads a connection's first frame, which must be `Hello`.
pub async fn read_hello<S: AsyncRead + Unpin>(sock: &mut S) -> io::Result<u32> {
    match read_first(sock).await? {
        ToBroker::Hello { shard } => Ok(shard),
        _ => Err(bad("the first frame must be hello")),
    }
}

/// The first frame of a connection: a `Hello` (a router) or an `Admin` request.
pub async fn read_first<S: AsyncRead + Unpin>(sock: &mut S) -> io::Result<ToBroker> {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(10), read_frame(sock))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))??
        .ok_or_else(|| bad("closed before hello"))?;
    match ToBroker::decode(&frame)? {
        m @ (ToBroker::Hello { .. } | ToBroker::Admin(_)) => Ok(m),
        _ => Err(bad("the first frame must be hello")),
    }
}

/// Tells a router this broker does not lead the shard it asked for, then closes.
pub async fn refuse<S: AsyncWrite + Unpin>(mut sock: S, leader: Option<String>) {
    let mut buf = Vec::new();
    let m = ToRouter::NotLeader { leader };
    let _ = write_frame(&mut sock, &mut buf, |o| {
        m.encode(o);
        Ok(())
    })
    .await;
    let _ = sock.shutdown().await;
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Send + 'static>(
    sock: S,
    conn: u64,
    tx: mpsc::UnboundedSender<ToRouter>,
    mut rx: mpsc::UnboundedReceiver<ToRouter>,
    requests: mpsc::UnboundedSender<Request>,
    conns: Conns,
    mut kick: watch::Receiver<u64>,
) {
    let (mut rd, mut wr) = tokio::io::split(sock);
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(m) = rx.recv().await {
            if write_frame(&mut wr, &mut buf, |o| {
                m.encode(o);
                Ok(())
            })
            .await
            .is_err()
            {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let high = conn << LOCAL_BITS;
    let mut consumers: HashSet<ConsumerId> = HashSet::new();
    let reading = async {
        // A router pings twice a second: silence this long means it is gone (or cut off).
        let silence = std::time::Duration::from_secs(10);
        while let Some(frame) = tokio::time::timeout(silence, read_frame(&mut rd))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "router silent"))??
        {
            let req = match ToBroker::decode(&frame)? {
                ToBroker::Ping => {
                    let _ = tx.send(ToRouter::Pong);
                    continue;
                }
                ToBroker::Bye => return Ok(true),
                ToBroker::Info { id, prefix } => {
                    let (reply, answer) = oneshot::channel();
                    let _ = requests.send(Request::Info { prefix, reply });
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if let Ok(queues) = answer.await {
                            let _ = tx.send(ToRouter::Info { id, queues });
                        }
                    });
                    continue;
                }
                ToBroker::Hello { .. } | ToBroker::Admin(_) => return Err(bad("hello twice")),
                ToBroker::Request(r) => r,
            };
            let req = namespace(req, high, &mut consumers)?;
            if requests.send(req).is_err() {
                return Ok(false);
            }
        }
        Ok::<bool, io::Error>(false)
    };
    let result = tokio::select! {
        r = reading => r,
        _ = kick.changed() => Ok(false),
    };
    let bye = match result {
        Ok(bye) => bye,
        Err(e) => {
            tracing::warn!("router connection {conn}: {e}");
            false
        }
    };
    if bye {
        for c in consumers {
            let _ = requests.send(Request::Detach { consumer: c });
        }
    } else if !consumers.is_empty() {
        // The router may be back in a moment and resume them under new ids (then these
        // detaches find nothing). Weak: a stopping service does not wait for the grace.
        let requests = requests.downgrade();
        tokio::spawn(async move {
            tokio::time::sleep(RESUME_GRACE).await;
            if let Some(requests) = requests.upgrade() {
                for c in consumers {
                    let _ = requests.send(Request::Detach { consumer: c });
                }
            }
        });
    }
    if let Ok(mut g) = conns.lock() {
        g.remove(&conn);
    }
    drop(tx);
    let _ = writer.await;
}

/// Puts the connection number into a request's consumer id and tag; refuses ids that would
/// collide with it.
fn namespace(
    mut r: Request,
    high: u64,
    consumers: &mut HashSet<ConsumerId>,
) -> io::Result<Request> {
    let global = |id: u64| {
        if id > LOCAL_MASK {
            Err(bad("consumer id or tag out of range"))
        } else {
            Ok(id | high)
        }
    };
    if let Request::Once { request, .. } = &mut r {
        let inner = std::mem::replace(
            &mut **request,
            Request::Purge {
                address: String::new(),
            },
        );
        **request = namespace(inner, high, consumers)?;
        return Ok(r);
    }
    match &mut r {
        Request::Enqueue { done, .. }
        | Request::Publish { done, .. }
        | Request::Settle { done, .. } => {
            if let Some(t) = done {
                *t = global(*t)?;
            }
        }
        _ => {}
    }
    match &mut r {
        Request::Attach { consumer, .. }
        | Request::Subscribe { consumer, .. }
        | Request::Resume { consumer, .. } => {
            // (A resumed consumer's `old` id is already global: it names a consumer of an
            // earlier connection.)
            *consumer = global(*consumer)?;
            consumers.insert(*consumer);
        }
        Request::Detach { consumer } => {
            *consumer = global(*consumer)?;
            consumers.remove(consumer);
        }
        Request::Credit { consumer, .. } | Request::Settle { consumer, .. } => {
            *consumer = global(*consumer)?;
        }
        _ => {}
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Outcome;

    fn requests() -> Vec<Request> {
        vec![
            Request::Enqueue {
                address: "q".into(),
                ttl_ms: Some(5),
                absolute_expiry: None,
                body: bytes::Bytes::from_static(b"hello"),
                done: Some(9),
                dedup: None,
            },
            Request::Publish {
                topic: "t/a".into(),
                ttl_ms: None,
                absolute_expiry: Some(7),
                body: bytes::Bytes::new(),
                done: None,
                dedup: None,
            },
            Request::Declare {
                address: "q".into(),
                durable: false,
                max_delivery_attempts: 3,
                max_ttl_ms: Some(1),
                dead_letter: Some("dlq".into()),
                expiry_address: None,
            },
            Request::Bind {
                name: "n".into(),
                filter: "t/#".into(),
            },
            Request::Unsubscribe { name: "n".into() },
            Request::Expire {
                name: "n".into(),
                keep_ms: Some(3_600_000),
            },
            Request::Attach {
                consumer: 4,
                address: "q".into(),
                credit: 10,
            },
            Request::Subscribe {
                consumer: 5,
                name: "c:l".into(),
                filter: "t/*".into(),
                durable: true,
                credit: 0,
            },
            Request::Credit {
                consumer: 4,
                credit: u32::MAX,
            },
            Request::Settle {
                consumer: 4,
                seq: 123_456,
                outcome: Outcome::Modified {
                    delivery_failed: true,
                    undeliverable_here: false,
                },
                done: Some(1),
            },
            Request::Detach { consumer: 4 },
            Request::Purge {
                address: "q".into(),
            },
            Request::Once {
                origin: u64::MAX,
                seq: 12,
                request: Box::new(Request::Enqueue {
                    address: "q".into(),
                    ttl_ms: None,
                    absolute_expiry: None,
                    body: bytes::Bytes::from_static(b"again"),
                    done: Some(3),
                    dedup: None,
                }),
            },
            Request::Resume {
                old: vec![5 << LOCAL_BITS | 4, 6 << LOCAL_BITS | 1],
                consumer: 9,
                target: Target::Subscription {
                    name: "c:l".into(),
                    filter: "t/#".into(),
                    durable: true,
                },
                keep: vec![7, 8, 100],
                credit: 64,
            },
        ]
    }

    #[test]
    fn frames_round_trip_and_truncations_fail() {
        for r in requests() {
            let mut o = Vec::new();
            ToBroker::Request(r).encode(&mut o).unwrap();
            let back = ToBroker::decode(&o).unwrap();
            let mut again = Vec::new();
            back.encode(&mut again).unwrap();
            assert_eq!(o, again);
            for n in 0..o.len() {
                assert!(ToBroker::decode(&o[..n]).is_err());
            }
        }
        for m in [
            ToBroker::Ping,
            ToBroker::Bye,
            ToBroker::Admin(Admin::Status),
            ToBroker::Admin(Admin::Host { shard: 3 }),
            ToBroker::Admin(Admin::Unhost { shard: 3 }),
            ToBroker::Admin(Admin::AddReplica {
                shard: 1,
                id: 4,
                raft: "r:1".into(),
                client: "c:1".into(),
            }),
            ToBroker::Admin(Admin::RemoveReplica { shard: 1, id: 2 }),
            ToBroker::Admin(Admin::Lead { shard: 2, to: 3 }),
            ToBroker::Hello { shard: 7 },
            ToBroker::Info {
                id: 3,
                prefix: "$sub:".into(),
            },
        ] {
            let mut o = Vec::new();
            m.encode(&mut o).unwrap();
            let mut again = Vec::new();
            ToBroker::decode(&o).unwrap().encode(&mut again).unwrap();
            assert_eq!(o, again);
        }
        let msgs = vec![
            ToRouter::Pong,
            ToRouter::Welcome { conn: 3 },
            ToRouter::Admin {
                ok: false,
                text: "not leader".into(),
                leader: Some("c:2".into()),
            },
            ToRouter::NotLeader {
                leader: Some("10.0.0.2:5800".into()),
            },
            ToRouter::NotLeader { leader: None },
            ToRouter::Deliveries(vec![Delivery {
                consumer: 3,
                seq: 99,
                delivery_count: 2,
                body: bytes::Bytes::from_static(b"x"),
            }]),
            ToRouter::Done(vec![
                (1, Ok(())),
                (2, Err(StoreError::Full("q".into()))),
                (3, Err(StoreError::Failed("disk".into()))),
                (4, Err(StoreError::Moved)),
            ]),
            ToRouter::Info {
                id: 7,
                queues: vec![QueueInfo {
                    address: "q".into(),
                    shard: 0,
                    depth: 3,
                    ready: 2,
                    consumers: 1,
                    enqueued: 10,
                    acknowledged: 7,
                    expired: 0,
                    dead_lettered: 0,
                    redelivered: 1,
                }],
            },
        ];
        for m in msgs {
            let mut o = Vec::new();
            m.encode(&mut o);
            assert_eq!(ToRouter::decode(&o).unwrap(), m);
            for n in 0..o.len() {
                assert!(ToRouter::decode(&o[..n]).is_err());
            }
        }
    }

    #[test]
    fn namespacing_keeps_routers_apart() {
        let mut seen = HashSet::new();
        let r = namespace(
            Request::Attach {
                consumer: 4,
                address: "q".into(),
                credit: 1,
            },
            2 << LOCAL_BITS,
            &mut seen,
        )
        .unwrap();
        assert!(matches!(r, Request::Attach { consumer, .. } if consumer == (2 << LOCAL_BITS) | 4));
        assert!(seen.contains(&((2 << LOCAL_BITS) | 4)));
        // A resumed consumer: the new id is namespaced, the old one is kept as given; the tag
        // of a message sent once is namespaced inside.
        let old = (1 << LOCAL_BITS) | 4;
        let r = namespace(
            Request::Resume {
                old: vec![old],
                consumer: 5,
                target: Target::Queue {
                    address: "q".into(),
                },
                keep: vec![],
                credit: 0,
            },
            2 << LOCAL_BITS,
            &mut seen,
        )
        .unwrap();
        assert!(
            matches!(r, Request::Resume { old: o, consumer, .. } if o == vec![old] && consumer == (2 << LOCAL_BITS) | 5)
        );
        let r = namespace(
            Request::Once {
                origin: 1,
                seq: 1,
                request: Box::new(Request::Publish {
                    topic: "t".into(),
                    ttl_ms: None,
                    absolute_expiry: None,
                    body: bytes::Bytes::new(),
                    done: Some(6),
                    dedup: None,
                }),
            },
            2 << LOCAL_BITS,
            &mut seen,
        )
        .unwrap();
        assert!(matches!(r, Request::Once { request, .. }
            if matches!(*request, Request::Publish { done: Some(t), .. } if t == (2 << LOCAL_BITS) | 6)));
        assert!(
            namespace(
                Request::Detach {
                    consumer: 1 << LOCAL_BITS
                },
                1 << LOCAL_BITS,
                &mut seen
            )
            .is_err()
        );
    }
}
