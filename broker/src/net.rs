//! Raft traffic between broker processes: one TCP connection per pair of brokers carries the
//! RPCs of every shard they share (the shard number is in each frame), so a process with
//! hundreds of shards does not open hundreds of connections per peer.
//!
//! Frames are `[u32 length][u64 request id][u8 kind][u32 shard][body]`; the answer carries the
//! request's id, so many RPCs are in flight on one connection and answers may come in any
//! order. Bodies use the broker's own encoding (entries as in the log, see
//! [`crate::raft::encode_entry`]); every decode is bounds-checked and a bad frame closes that
//! connection only.
//!
//! Snapshots travel in chunks ([`SNAPSHOT_CHUNK`] bytes each, one RPC per chunk, the next sent
//! when the previous is acknowledged): a snapshot carries the bodies of every live message of
//! the shard, and one frame of that size would hold up every other shard's heartbeats on the
//! shared connection (and could exceed [`MAX_FRAME`]). The receiving side of a connection
//! assembles at most one transfer per shard; the last chunk installs it. The seam for TLS is [`connect`]/[`serve`]'s stream type: both work on any
//! `AsyncRead + AsyncWrite`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{
    LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf,
};
use openraft::{OptionalSend, RPCTypes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::raft::{C, NodeAddr, SnapshotData, StateMachine, codec};
use crate::wire::{Reader, put_bytes, put_varint};

/// Largest frame: a batch of entries (messages may be up to the routers' maximum size).
const MAX_FRAME: usize = 512 * 1024 * 1024;

/// Bytes of snapshot per chunk.
pub const SNAPSHOT_CHUNK: usize = 1024 * 1024;

/// Largest snapshot a replica accepts (assembled in memory before it is installed).
const MAX_SNAPSHOT: u64 = 64 * 1024 * 1024 * 1024;

const APPEND: u8 = 1;
const VOTE: u8 = 2;
/// A chunk of a snapshot (kind 3 was a whole snapshot in one frame, no longer sent).
const CHUNK: u8 = 4;
/// A leader hands over: the named voter campaigns at once (once its log has caught up), the
/// others let it (they drop the leader lease).
const TRANSFER: u8 = 5;
const OK: u8 = 0x80;
const FAILED: u8 = 0xff;

type Raft = openraft::Raft<C, StateMachine>;

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

// --- message encoding ---------------------------------------------------------------------

fn put_opt_log_id(o: &mut Vec<u8>, id: Option<&LogIdOf<C>>) {
    codec::put_opt_log_id(o, id);
}

pub fn encode_append(r: &AppendEntriesRequest<C>, o: &mut Vec<u8>) {
    codec::put_vote(o, &r.vote);
    put_opt_log_id(o, r.prev_log_id.as_ref());
    put_opt_log_id(o, r.leader_commit.as_ref());
    o.extend_from_slice(&(r.entries.len() as u32).to_be_bytes());
    for e in &r.entries {
        put_bytes(o, &crate::raft::encode_entry(e));
    }
}

pub fn decode_append(r: &mut Reader) -> io::Result<AppendEntriesRequest<C>> {
    let vote = codec::get_vote(r)?;
    let prev_log_id = codec::get_opt_log_id(r)?;
    let leader_commit = codec::get_opt_log_id(r)?;
    let n = r.u32()? as usize;
    if n > r.0.len() / 4 {
        return Err(bad("entry count exceeds frame"));
    }
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(crate::raft::decode_entry(&r.bytes()?)?);
    }
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

pub fn encode_append_response(r: &AppendEntriesResponse<C>, o: &mut Vec<u8>) {
    match r {
        AppendEntriesResponse::Success => o.push(0),
        AppendEntriesResponse::PartialSuccess(id) => {
            o.push(1);
            put_opt_log_id(o, id.as_ref());
        }
        AppendEntriesResponse::Conflict => o.push(2),
        AppendEntriesResponse::HigherVote(v) => {
            o.push(3);
            codec::put_vote(o, v);
        }
    }
}

pub fn decode_append_response(r: &mut Reader) -> io::Result<AppendEntriesResponse<C>> {
    Ok(match r.u8()? {
        0 => AppendEntriesResponse::Success,
        1 => AppendEntriesResponse::PartialSuccess(codec::get_opt_log_id(r)?),
        2 => AppendEntriesResponse::Conflict,
        3 => AppendEntriesResponse::HigherVote(codec::get_vote(r)?),
        _ => return Err(bad("bad append-entries response")),
    })
}

pub fn encode_vote(r: &VoteRequest<C>, o: &mut Vec<u8>) {
    codec::put_vote(o, &r.vote);
    put_opt_log_id(o, r.last_log_id.as_ref());
    o.push(u8::from(r.leadership_transfer));
}

pub fn encode_transfer(t: &TransferLeaderRequest<C>, o: &mut Vec<u8>) {
    codec::put_vote(o, t.from_leader());
    put_varint(o, *t.to_node_id());
    put_opt_log_id(o, t.last_log_id());
}

pub fn decode_transfer(r: &mut Reader) -> io::Result<TransferLeaderRequest<C>> {
    let from = codec::get_vote(r)?;
    let to = r.varint()?;
    let last = codec::get_opt_log_id(r)?;
    Ok(TransferLeaderRequest::new(from, to, last))
}

pub fn decode_vote(r: &mut Reader) -> io::Result<VoteRequest<C>> {
    let vote = codec::get_vote(r)?;
    let last_log_id = codec::get_opt_log_id(r)?;
    let mut req = VoteRequest::new(vote, last_log_id);
    req.leadership_transfer = r.u8()? != 0;
    Ok(req)
}

pub fn encode_vote_response(r: &VoteResponse<C>, o: &mut Vec<u8>) {
    codec::put_vote(o, &r.vote);
    o.push(u8::from(r.vote_granted));
    put_opt_log_id(o, r.last_log_id.as_ref());
}

pub fn decode_vote_response(r: &mut Reader) -> io::Result<VoteResponse<C>> {
    let vote = codec::get_vote(r)?;
    let granted = r.u8()? != 0;
    let last = codec::get_opt_log_id(r)?;
    Ok(VoteResponse::new(vote, last, granted))
}

pub fn encode_snapshot(vote: &VoteOf<C>, s: &SnapshotOf<C, SnapshotData>, o: &mut Vec<u8>) {
    codec::put_vote(o, vote);
    put_opt_log_id(o, s.meta.last_log_id.as_ref());
    put_opt_log_id(o, s.meta.last_membership.log_id().as_ref());
    codec::put_membership(o, s.meta.last_membership.membership());
    put_bytes(o, &s.snapshot);
}

pub fn decode_snapshot(r: &mut Reader) -> io::Result<(VoteOf<C>, SnapshotOf<C, SnapshotData>)> {
    let vote = codec::get_vote(r)?;
    let last_log_id = codec::get_opt_log_id(r)?;
    let mlog = codec::get_opt_log_id(r)?;
    let m = codec::get_membership(r)?;
    let data = r.bytes()?;
    Ok((
        vote,
        SnapshotOf::<C, SnapshotData> {
            meta: SnapshotMetaOf::<C> {
                last_log_id,
                last_membership: StoredMembershipOf::<C>::new(mlog, m),
            },
            snapshot: data,
        },
    ))
}

/// One chunk of a snapshot transfer: `[u64 transfer id][u64 offset][u64 total][bytes]`. The
/// transfer's bytes are an [`encode_snapshot`] message.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub transfer: u64,
    pub offset: u64,
    pub total: u64,
    pub data: &'a [u8],
}

pub fn encode_chunk(c: &Chunk, o: &mut Vec<u8>) {
    o.extend_from_slice(&c.transfer.to_be_bytes());
    o.extend_from_slice(&c.offset.to_be_bytes());
    o.extend_from_slice(&c.total.to_be_bytes());
    o.extend_from_slice(c.data);
}

pub fn decode_chunk<'a>(b: &'a [u8]) -> io::Result<Chunk<'a>> {
    let mut r = Reader(b);
    let transfer = r.u64()?;
    let offset = r.u64()?;
    let total = r.u64()?;
    let data = r.0;
    let end = offset.checked_add(data.len() as u64);
    if end.is_none_or(|e| e > total) {
        return Err(bad("snapshot chunk past the transfer's end"));
    }
    Ok(Chunk {
        transfer,
        offset,
        total,
        data,
    })
}

/// A snapshot being received on one connection, for one shard.
struct Incoming {
    transfer: u64,
    total: u64,
    buf: Vec<u8>,
}

/// Adds `c` to the shard's transfer; the whole snapshot message once the last chunk is in.
/// A chunk of a new transfer at offset 0 replaces an unfinished one (the sender gave up on
/// it); any other gap or mismatch is an error and the sender starts over.
fn assemble(
    incoming: &mut HashMap<u32, Incoming>,
    shard: u32,
    c: &Chunk,
) -> Result<Option<Vec<u8>>, String> {
    if c.total > MAX_SNAPSHOT {
        return Err(format!(
            "snapshot of {} bytes is larger than {MAX_SNAPSHOT}",
            c.total
        ));
    }
    if c.offset == 0 {
        incoming.insert(
            shard,
            Incoming {
                transfer: c.transfer,
                total: c.total,
                // Grows with the chunks received, not with what the sender claims.
                buf: Vec::with_capacity(c.data.len()),
            },
        );
    }
    let Some(t) = incoming.get_mut(&shard) else {
        return Err("snapshot chunk of no transfer in progress".into());
    };
    if t.transfer != c.transfer || t.total != c.total || t.buf.len() as u64 != c.offset {
        incoming.remove(&shard);
        return Err("snapshot chunk out of order".into());
    }
    t.buf.extend_from_slice(c.data);
    if (t.buf.len() as u64) < t.total {
        return Ok(None);
    }
    Ok(incoming.remove(&shard).map(|t| t.buf))
}

// --- frames -------------------------------------------------------------------------------

struct Frame {
    id: u64,
    kind: u8,
    shard: u32,
    body: Vec<u8>,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if !(13..=MAX_FRAME).contains(&n) {
        return Err(bad("frame length out of range"));
    }
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).await?;
    let mut rd = Reader(&b);
    let id = rd.u64()?;
    let kind = rd.u8()?;
    let shard = rd.u32()?;
    Ok(Some(Frame {
        id,
        kind,
        shard,
        body: b[13..].to_vec(),
    }))
}

fn frame(id: u64, kind: u8, shard: u32, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut o = Vec::with_capacity(64);
    o.extend_from_slice(&[0; 4]);
    o.extend_from_slice(&id.to_be_bytes());
    o.push(kind);
    o.extend_from_slice(&shard.to_be_bytes());
    body(&mut o);
    let n = (o.len() - 4) as u32;
    o[..4].copy_from_slice(&n.to_be_bytes());
    o
}

// --- server -------------------------------------------------------------------------------

/// The shards this process serves Raft RPCs for, by shard number.
#[derive(Clone, Default)]
pub struct Registry {
    shards: Arc<Mutex<HashMap<u32, Raft>>>,
}

impl Registry {
    pub fn insert(&self, shard: u32, raft: Raft) {
        if let Ok(mut g) = self.shards.lock() {
            g.insert(shard, raft);
        }
    }

    pub fn remove(&self, shard: u32) {
        if let Ok(mut g) = self.shards.lock() {
            g.remove(&shard);
        }
    }

    fn get(&self, shard: u32) -> Option<Raft> {
        self.shards.lock().ok().and_then(|g| g.get(&shard).cloned())
    }
}

/// Accepts peer connections on `listener` and hands their RPCs to the registered shards.
pub async fn serve(listener: TcpListener, registry: Registry) -> io::Result<()> {
    loop {
        let (sock, _) = listener.accept().await?;
        let _ = sock.set_nodelay(true);
        tokio::spawn(serve_stream(sock, registry.clone()));
    }
}

/// Serves one peer connection (any stream: the TLS seam).
pub async fn serve_stream<S: AsyncRead + AsyncWrite + Send + 'static>(sock: S, registry: Registry) {
    let (mut rd, mut wr) = tokio::io::split(sock);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let mut incoming: HashMap<u32, Incoming> = HashMap::new();
    loop {
        let mut f = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!("raft peer connection: {e}");
                break;
            }
        };
        let Some(raft) = registry.get(f.shard) else {
            let _ = tx.send(frame(f.id, FAILED, f.shard, |o| {
                put_bytes(o, b"no such shard here")
            }));
            continue;
        };
        if f.kind == CHUNK {
            // Chunks are assembled here, in order; only the last one goes on to install.
            let whole = decode_chunk(&f.body)
                .map_err(|e| e.to_string())
                .and_then(|c| assemble(&mut incoming, f.shard, &c));
            match whole {
                Ok(Some(snapshot)) => f.body = snapshot,
                Ok(None) => {
                    let _ = tx.send(frame(f.id, OK | CHUNK, f.shard, |_| {}));
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(frame(f.id, FAILED, f.shard, |o| put_bytes(o, e.as_bytes())));
                    continue;
                }
            }
        }
        let tx = tx.clone();
        // Each RPC runs on its own: a snapshot install must not hold up heartbeats.
        tokio::spawn(async move {
            let answer = handle(&raft, &f).await;
            let out = match answer {
                Ok(body) => frame(f.id, OK | f.kind, f.shard, |o| o.extend_from_slice(&body)),
                Err(e) => frame(f.id, FAILED, f.shard, |o| put_bytes(o, e.as_bytes())),
            };
            let _ = tx.send(out);
        });
    }
    drop(tx);
    let _ = writer.await;
}

async fn handle(raft: &Raft, f: &Frame) -> Result<Vec<u8>, String> {
    let mut r = Reader(&f.body);
    let mut o = Vec::new();
    match f.kind {
        APPEND => {
            let req = decode_append(&mut r).map_err(|e| e.to_string())?;
            let resp = raft.append_entries(req).await.map_err(|e| e.to_string())?;
            encode_append_response(&resp, &mut o);
        }
        VOTE => {
            let req = decode_vote(&mut r).map_err(|e| e.to_string())?;
            let resp = raft.vote(req).await.map_err(|e| e.to_string())?;
            encode_vote_response(&resp, &mut o);
        }
        TRANSFER => {
            let req = decode_transfer(&mut r).map_err(|e| e.to_string())?;
            // A refusal (log not yet flushed, vote changed) is an answer, not a failure of
            // the RPC: the leader retries or the lease runs out.
            match raft
                .handle_transfer_leader(req)
                .await
                .map_err(|e| e.to_string())?
            {
                Ok(()) => o.push(0),
                Err(why) => {
                    o.push(1);
                    put_bytes(&mut o, why.to_string().as_bytes());
                }
            }
        }
        CHUNK => {
            // The body is the assembled transfer.
            let (vote, snap) = decode_snapshot(&mut r).map_err(|e| e.to_string())?;
            let resp = raft
                .install_full_snapshot(vote, snap)
                .await
                .map_err(|e| e.to_string())?;
            codec::put_vote(&mut o, &resp.vote);
        }
        _ => return Err("unknown rpc".into()),
    }
    Ok(o)
}

// --- client -------------------------------------------------------------------------------

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

/// One connection to a peer, shared by every shard's client to it.
struct PeerConn {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
}

/// This process's connections to its peers (one per peer address).
#[derive(Clone, Default)]
pub struct Peers {
    conns: Arc<Mutex<HashMap<String, Arc<PeerConn>>>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl Peers {
    /// The connection to `addr`, connecting if there is none (or the last one failed).
    async fn conn(&self, addr: &str) -> io::Result<Arc<PeerConn>> {
        let open = self.conns.lock().ok().and_then(|g| g.get(addr).cloned());
        if let Some(c) = open.filter(|c| !c.tx.is_closed()) {
            return Ok(c);
        }
        let sock = TcpStream::connect(addr).await?;
        let _ = sock.set_nodelay(true);
        let c = Arc::new(connect(sock));
        if let Ok(mut g) = self.conns.lock() {
            g.insert(addr.to_owned(), c.clone());
        }
        Ok(c)
    }

    async fn call(
        &self,
        addr: &str,
        kind: u8,
        shard: u32,
        body: impl FnOnce(&mut Vec<u8>),
        ttl: Duration,
    ) -> io::Result<Vec<u8>> {
        let c = self.conn(addr).await?;
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut g) = c.pending.lock() {
            g.insert(id, tx);
        }
        if c.tx.send(frame(id, kind, shard, body)).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "peer connection closed",
            ));
        }
        let answer = tokio::time::timeout(ttl, rx).await;
        if let Ok(mut g) = c.pending.lock() {
            g.remove(&id);
        }
        let f = match answer {
            Ok(Ok(f)) => f,
            Ok(Err(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "peer connection closed",
                ));
            }
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "rpc timed out")),
        };
        if f.kind == FAILED {
            let why = Reader(&f.body)
                .string()
                .unwrap_or_else(|_| "remote error".into());
            return Err(io::Error::other(why));
        }
        if f.kind != OK | kind {
            return Err(bad("answer of the wrong kind"));
        }
        Ok(f.body)
    }
}

/// Runs a client connection over any stream (the TLS seam); answers complete pending calls.
fn connect<S: AsyncRead + AsyncWrite + Send + 'static>(sock: S) -> PeerConn {
    let (mut rd, mut wr) = tokio::io::split(sock);
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let pending: Pending = Default::default();
    let p = pending.clone();
    tokio::spawn(async move {
        let writer = async {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
        };
        let reader = async {
            while let Ok(Some(f)) = read_frame(&mut rd).await {
                if let Some(tx) = p.lock().ok().and_then(|mut g| g.remove(&f.id)) {
                    let _ = tx.send(f);
                }
            }
        };
        // Either side ending ends the connection; pending calls see their sender dropped.
        tokio::select! {
            _ = writer => {}
            _ = reader => {}
        }
        if let Ok(mut g) = p.lock() {
            g.clear();
        }
    });
    PeerConn { tx, pending }
}

/// Creates the clients one shard's Raft uses to reach its peers.
#[derive(Clone)]
pub struct NetFactory {
    pub shard: u32,
    pub peers: Peers,
}

pub struct NetClient {
    shard: u32,
    target: u64,
    addr: String,
    peers: Peers,
}

impl RaftNetworkFactory<C> for NetFactory {
    type Network = NetClient;
    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> NetClient {
        NetClient {
            shard: self.shard,
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

fn unreachable(e: &io::Error) -> Unreachable<C> {
    Unreachable::new(e)
}

impl NetClient {
    fn rpc_error(&self, e: io::Error, action: RPCTypes, ttl: Duration) -> RPCError<C> {
        if e.kind() == io::ErrorKind::TimedOut {
            RPCError::Timeout(Timeout {
                action,
                id: 0,
                target: self.target,
                timeout: ttl,
            })
        } else {
            RPCError::Unreachable(unreachable(&e))
        }
    }
}

impl RaftNetworkV2<C> for NetClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let ttl = option.hard_ttl();
        let body = self
            .peers
            .call(
                &self.addr,
                APPEND,
                self.shard,
                |o| encode_append(&rpc, o),
                ttl,
            )
            .await
            .map_err(|e| self.rpc_error(e, RPCTypes::AppendEntries, ttl))?;
        decode_append_response(&mut Reader(&body))
            .map_err(|e| RPCError::Unreachable(unreachable(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        let ttl = option.hard_ttl();
        let body = self
            .peers
            .call(&self.addr, VOTE, self.shard, |o| encode_vote(&rpc, o), ttl)
            .await
            .map_err(|e| self.rpc_error(e, RPCTypes::Vote, ttl))?;
        decode_vote_response(&mut Reader(&body)).map_err(|e| RPCError::Unreachable(unreachable(&e)))
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        let ttl = option.hard_ttl();
        let body = self
            .peers
            .call(
                &self.addr,
                TRANSFER,
                self.shard,
                |o| encode_transfer(&req, o),
                ttl,
            )
            .await
            .map_err(|e| self.rpc_error(e, RPCTypes::TransferLeader, ttl))?;
        let mut r = Reader(&body);
        match r.u8() {
            Ok(0) => Ok(Ok(())),
            _ => Err(RPCError::Unreachable(unreachable(&io::Error::other(
                r.string().unwrap_or_else(|_| "transfer refused".into()),
            )))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        // Snapshots are larger than other RPCs: each chunk, and the install that the last
        // one starts, gets longer than a heartbeat's budget.
        let ttl = option.hard_ttl().max(Duration::from_secs(30));
        let mut whole = Vec::new();
        encode_snapshot(&vote, &snapshot, &mut whole);
        drop(snapshot);
        let transfer = self
            .peers
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let total = whole.len() as u64;
        let send = async {
            let mut answer = Vec::new();
            for (i, data) in whole.chunks(SNAPSHOT_CHUNK).enumerate() {
                let c = Chunk {
                    transfer,
                    offset: (i * SNAPSHOT_CHUNK) as u64,
                    total,
                    data,
                };
                answer = self
                    .peers
                    .call(&self.addr, CHUNK, self.shard, |o| encode_chunk(&c, o), ttl)
                    .await?;
            }
            Ok::<_, io::Error>(answer)
        };
        let body = tokio::select! {
            r = send => r.map_err(|e| StreamingError::Unreachable(unreachable(&e)))?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let vote = codec::get_vote(&mut Reader(&body))
            .map_err(|e| StreamingError::Unreachable(unreachable(&e)))?;
        Ok(SnapshotResponse::new(vote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Command;
    use openraft::entry::RaftEntry;
    use openraft::type_config::alias::EntryOf;

    #[test]
    fn snapshot_chunks_assemble_in_order_only() {
        let mut inc = HashMap::new();
        let c = |transfer, offset, total, data| Chunk {
            transfer,
            offset,
            total,
            data,
        };
        assert_eq!(assemble(&mut inc, 1, &c(7, 0, 6, b"abc")), Ok(None));
        assert_eq!(
            assemble(&mut inc, 1, &c(7, 3, 6, b"def")),
            Ok(Some(b"abcdef".to_vec()))
        );
        assert!(inc.is_empty());
        // A gap, a chunk of another transfer, or a chunk with no transfer: refused.
        assert_eq!(assemble(&mut inc, 1, &c(8, 0, 6, b"ab")), Ok(None));
        assert!(assemble(&mut inc, 1, &c(8, 3, 6, b"def")).is_err());
        assert!(assemble(&mut inc, 1, &c(9, 2, 6, b"cd")).is_err());
        // A new transfer at offset 0 replaces an unfinished one; shards are independent.
        assert_eq!(assemble(&mut inc, 1, &c(10, 0, 4, b"wx")), Ok(None));
        assert_eq!(
            assemble(&mut inc, 2, &c(11, 0, 2, b"zz")),
            Ok(Some(b"zz".to_vec()))
        );
        assert_eq!(
            assemble(&mut inc, 1, &c(12, 0, 2, b"yy")),
            Ok(Some(b"yy".to_vec()))
        );
        assert!(assemble(&mut inc, 1, &c(13, 0, MAX_SNAPSHOT + 1, b"x")).is_err());
        // Decoding refuses a chunk that claims to run past its transfer's end.
        let mut o = Vec::new();
        encode_chunk(&c(1, 5, 6, b"ab"), &mut o);
        assert!(decode_chunk(&o).is_err());
        o.clear();
        encode_chunk(&c(1, 4, 6, b"ab"), &mut o);
        assert_eq!(decode_chunk(&o).ok(), Some(c(1, 4, 6, b"ab")));
    }

    fn log_id(term: u64, index: u64) -> LogIdOf<C> {
        LogIdOf::<C>::new(
            openraft::vote::leader_id_adv::LeaderId { term, node_id: 2 },
            index,
        )
    }

    #[test]
    fn rpcs_round_trip_and_truncations_fail() {
        let vote = VoteOf::<C>::new_committed(3, 2);
        let append = AppendEntriesRequest::<C> {
            vote,
            prev_log_id: Some(log_id(3, 9)),
            entries: vec![
                EntryOf::<C>::new_normal(log_id(3, 10), Command(b"abc".to_vec())),
                EntryOf::<C>::new_blank(log_id(3, 11)),
            ],
            leader_commit: Some(log_id(3, 8)),
        };
        let mut o = Vec::new();
        encode_append(&append, &mut o);
        let back = decode_append(&mut Reader(&o)).unwrap();
        let mut again = Vec::new();
        encode_append(&back, &mut again);
        assert_eq!(o, again);
        for n in 0..o.len() {
            assert!(decode_append(&mut Reader(&o[..n])).is_err());
        }
        for resp in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(log_id(1, 2))),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(VoteOf::<C>::new(9, 1)),
        ] {
            let mut o = Vec::new();
            encode_append_response(&resp, &mut o);
            assert_eq!(decode_append_response(&mut Reader(&o)).unwrap(), resp);
        }
        let mut req = VoteRequest::<C>::new(VoteOf::<C>::new(4, 1), Some(log_id(3, 11)));
        req.leadership_transfer = true;
        let mut o = Vec::new();
        encode_vote(&req, &mut o);
        assert_eq!(decode_vote(&mut Reader(&o)).unwrap(), req);
        let resp = VoteResponse::<C>::new(VoteOf::<C>::new(4, 1), None, true);
        let mut o = Vec::new();
        encode_vote_response(&resp, &mut o);
        assert_eq!(decode_vote_response(&mut Reader(&o)).unwrap(), resp);
    }
}
