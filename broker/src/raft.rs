//! The one module that sees openraft: the shard's Raft type configuration and its durable log
//! store over [`SegmentLog`].
//!
//! Group commit: `append` writes the entries to the segment (readable at once, as openraft
//! requires) and hands the append's callback to a flusher thread; the flusher takes every
//! callback that has queued up, makes them all durable with one `fdatasync`, then completes
//! them. A producer with many messages in flight therefore pays one sync per batch.
//!
//! The newest entries also stay in memory (a few MiB per shard, [`TAIL_BYTES`]): the leader
//! reads each entry back once per follower and once more to apply it, and serving those from
//! memory rather than from the segment (two `pread`s and a decode each) was a third of the
//! leader's CPU in the replicated benchmark.
//!
//! The vote, the committed log id and the last purged log id live in a small metadata file
//! (CRC-checked, replaced atomically). Saving the vote first syncs the log, so a vote never
//! becomes durable ahead of entries appended before it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{EntryPayload, Membership, OptionalSend};

use crate::log::{LogError, SegmentLog};
use crate::shard::{Cmd, Shard, ShardEffect};
use crate::wire::{Reader, put_bytes, put_varint};

/// A command in a shard's log (the state machine's input), opaque at this layer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Command(pub Vec<u8>);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command({} bytes)", self.0.len())
    }
}

/// A broker node as Raft membership records it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeAddr {
    /// Where its peers reach it for Raft.
    pub addr: String,
    /// Where routers reach it (leader hints come from the membership, so a broker added
    /// later need not be in every configuration).
    pub client: String,
}

openraft::declare_raft_types!(
    /// Raft types of a broker shard.
    pub TypeConfig:
        D = Command,
        R = (),
        NodeId = u64,
        Node = NodeAddr,
        AsyncRuntime = openraft_rt_tokio::TokioRuntime,
);

pub type C = TypeConfig;
type LogId = LogIdOf<C>;
type Vote = VoteOf<C>;
type Entry = EntryOf<C>;

fn io_other(e: impl fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl From<LogError> for io::Error {
    fn from(e: LogError) -> io::Error {
        match e {
            LogError::Io { source, .. } => source,
            other => io_other(other),
        }
    }
}

// --- encoding -----------------------------------------------------------------------------

fn put_log_id(out: &mut Vec<u8>, id: &LogId) {
    out.extend_from_slice(&id.leader_id.term.to_be_bytes());
    out.extend_from_slice(&id.leader_id.node_id.to_be_bytes());
    out.extend_from_slice(&id.index.to_be_bytes());
}

fn get_log_id(r: &mut Reader) -> io::Result<LogId> {
    let term = r.u64()?;
    let node = r.u64()?;
    let index = r.u64()?;
    Ok(LogId::new_term_index_node(term, node, index))
}

trait LogIdExt {
    fn new_term_index_node(term: u64, node: u64, index: u64) -> Self;
}

impl LogIdExt for LogId {
    fn new_term_index_node(term: u64, node: u64, index: u64) -> Self {
        LogId::new(
            openraft::vote::leader_id_adv::LeaderId {
                term,
                node_id: node,
            },
            index,
        )
    }
}

/// Encodes an entry: `[log id][tag][payload]`.
pub fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    put_log_id(&mut out, &e.log_id);
    match &e.payload {
        EntryPayload::Blank => out.push(0),
        EntryPayload::Normal(c) => {
            out.push(1);
            put_bytes(&mut out, &c.0);
        }
        EntryPayload::Membership(m) => {
            out.push(2);
            put_membership(&mut out, m);
        }
    }
    out
}

fn put_membership(out: &mut Vec<u8>, m: &Membership<u64, NodeAddr>) {
    let configs = m.get_joint_config();
    out.extend_from_slice(&(configs.len() as u32).to_be_bytes());
    for set in configs {
        out.extend_from_slice(&(set.len() as u32).to_be_bytes());
        for id in set {
            out.extend_from_slice(&id.to_be_bytes());
        }
    }
    let nodes: Vec<(&u64, &NodeAddr)> = m.nodes().collect();
    out.extend_from_slice(&(nodes.len() as u32).to_be_bytes());
    for (id, n) in nodes {
        out.extend_from_slice(&id.to_be_bytes());
        put_bytes(out, n.addr.as_bytes());
        put_bytes(out, n.client.as_bytes());
    }
}

fn get_membership(r: &mut Reader) -> io::Result<Membership<u64, NodeAddr>> {
    let n = r.u32()? as usize;
    let mut configs = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        let k = r.u32()? as usize;
        let mut set = BTreeSet::new();
        for _ in 0..k {
            set.insert(r.u64()?);
        }
        configs.push(set);
    }
    let n = r.u32()? as usize;
    let mut nodes = BTreeMap::new();
    for _ in 0..n {
        let id = r.u64()?;
        let addr = String::from_utf8(r.bytes()?).map_err(io_other)?;
        let client = String::from_utf8(r.bytes()?).map_err(io_other)?;
        nodes.insert(id, NodeAddr { addr, client });
    }
    Membership::new(configs, nodes).map_err(io_other)
}

fn put_opt_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
    match id {
        Some(id) => {
            out.push(1);
            put_log_id(out, id);
        }
        None => out.push(0),
    }
}

fn get_opt_log_id(r: &mut Reader) -> io::Result<Option<LogId>> {
    Ok(if r.u8()? != 0 {
        Some(get_log_id(r)?)
    } else {
        None
    })
}

/// Decodes what [`encode_entry`] wrote.
pub fn decode_entry(b: &[u8]) -> io::Result<Entry> {
    let mut r = Reader(b);
    let log_id = get_log_id(&mut r)?;
    let payload = match r.u8()? {
        0 => EntryPayload::Blank,
        1 => EntryPayload::Normal(Command(r.bytes()?)),
        2 => EntryPayload::Membership(get_membership(&mut r)?),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad entry tag")),
    };
    Ok(Entry::new(log_id, payload))
}

/// Encodings of openraft's types, shared by the log store, snapshots and the Raft network.
pub mod codec {
    use super::{LogId, NodeAddr, Vote};
    use crate::wire::Reader;
    use openraft::Membership;
    use std::io;

    pub fn put_vote(out: &mut Vec<u8>, v: &Vote) {
        out.extend_from_slice(&v.leader_id.term.to_be_bytes());
        out.extend_from_slice(&v.leader_id.node_id.to_be_bytes());
        out.push(v.committed as u8);
    }

    pub fn get_vote(r: &mut Reader) -> io::Result<Vote> {
        let term = r.u64()?;
        let node = r.u64()?;
        let committed = r.u8()? != 0;
        Ok(if committed {
            Vote::new_committed(term, node)
        } else {
            Vote::new(term, node)
        })
    }

    pub fn put_opt_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
        super::put_opt_log_id(out, id)
    }

    pub fn get_opt_log_id(r: &mut Reader) -> io::Result<Option<LogId>> {
        super::get_opt_log_id(r)
    }

    pub fn put_membership(out: &mut Vec<u8>, m: &Membership<u64, NodeAddr>) {
        super::put_membership(out, m)
    }

    pub fn get_membership(r: &mut Reader) -> io::Result<Membership<u64, NodeAddr>> {
        super::get_membership(r)
    }
}

// --- metadata file ------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Meta {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.vote {
            Some(v) => {
                out.push(1);
                codec::put_vote(&mut out, v);
            }
            None => out.push(0),
        }
        for id in [&self.committed, &self.last_purged] {
            put_opt_log_id(&mut out, id.as_ref());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    fn decode(b: &[u8]) -> io::Result<Meta> {
        if b.len() < 4 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short metadata"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_be_bytes() != crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "metadata checksum mismatch",
            ));
        }
        let mut r = Reader(body);
        let vote = match r.u8()? {
            0 => None,
            _ => Some(codec::get_vote(&mut r)?),
        };
        let committed = get_opt_log_id(&mut r)?;
        let last_purged = get_opt_log_id(&mut r)?;
        Ok(Meta {
            vote,
            committed,
            last_purged,
        })
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

// --- the store ----------------------------------------------------------------------------

/// Bytes of recent entries a shard's log store keeps in memory (see the module docs).
pub const TAIL_BYTES: usize = 4 << 20;

/// The newest entries, contiguous by index, bounded by [`TAIL_BYTES`].
#[derive(Default)]
struct Tail {
    entries: VecDeque<Entry>,
    bytes: usize,
}

fn entry_cost(e: &Entry) -> usize {
    64 + match &e.payload {
        EntryPayload::Normal(c) => c.0.len(),
        _ => 0,
    }
}

impl Tail {
    fn push(&mut self, e: Entry) {
        if self
            .entries
            .back()
            .is_some_and(|b| b.index() + 1 != e.index())
        {
            self.clear();
        }
        self.bytes += entry_cost(&e);
        self.entries.push_back(e);
        while self.bytes > TAIL_BYTES {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= entry_cost(&old),
                None => break,
            }
        }
    }
    fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.entries.front()?.index();
        self.entries
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }
    /// Forgets entries at `from` and above (a truncated suffix).
    fn cut_from(&mut self, from: u64) {
        while self.entries.back().is_some_and(|b| b.index() >= from) {
            if let Some(old) = self.entries.pop_back() {
                self.bytes -= entry_cost(&old);
            }
        }
    }
    /// Forgets entries up to `upto` (purged).
    fn cut_upto(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|f| f.index() <= upto) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= entry_cost(&old);
            }
        }
    }
    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

struct Inner {
    log: SegmentLog,
    meta: Meta,
    meta_path: PathBuf,
    tail: Tail,
}

impl Inner {
    /// Entry `index` from memory if it is recent, else from the segment.
    fn entry(&mut self, index: u64) -> io::Result<Entry> {
        match self.tail.get(index) {
            Some(e) => Ok(e.clone()),
            None => decode_entry(&self.log.read(index)?),
        }
    }

    fn save_meta(&self) -> io::Result<()> {
        replace_file(&self.meta_path, &self.meta.encode())
    }
    /// Index of the first entry that is visible (not purged).
    fn first_visible(&self) -> u64 {
        let purged_next = self.meta.last_purged.as_ref().map_or(0, |l| l.index + 1);
        self.log.first_index().unwrap_or(0).max(purged_next)
    }
}

/// A shard's Raft log on disk. Clones share the same log (one is the reader).
///
/// The log is also where message bodies live, so compaction has two bounds: openraft's purge
/// point (entries up to it are covered by a snapshot and become invisible to Raft) and the
/// oldest message the shard still holds ([`LogStore::retention`]). Segments are deleted only
/// below both; bodies of live messages under the purge point stay readable through
/// [`LogStore::read_retained`].
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    flush: std_mpsc::Sender<IOFlushed<C>>,
    keep_from: Arc<AtomicU64>,
}

fn lock(m: &Mutex<Inner>) -> io::Result<MutexGuard<'_, Inner>> {
    m.lock().map_err(|_| io_other("log store lock poisoned"))
}

impl LogStore {
    /// Opens (or creates) the store in `dir`, recovering the log (see [`SegmentLog::open`]).
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<LogStore> {
        let (log, _recovery) = SegmentLog::open(&dir.join("log"), segment_bytes)?;
        let meta_path = dir.join("raft-meta");
        let meta = match fs::read(&meta_path) {
            Ok(b) => Meta::decode(&b)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(e),
        };
        let inner = Arc::new(Mutex::new(Inner {
            log,
            meta,
            meta_path,
            tail: Tail::default(),
        }));
        let (tx, rx) = std_mpsc::channel::<IOFlushed<C>>();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                // One sync for every callback that queued up while the previous one ran.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(cb) = rx.try_recv() {
                        batch.push(cb);
                    }
                    // Take a handle under the lock, sync outside it: appends are not held up
                    // by the disk while this batch becomes durable.
                    let handle = match weak.upgrade() {
                        Some(inner) => lock(&inner).and_then(|mut g| Ok(g.log.sync_handle()?)),
                        None => Err(io_other("log store closed")),
                    };
                    let result = match handle {
                        Ok(Some(f)) => f.sync_data(),
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    };
                    for cb in batch {
                        cb.io_completed(match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                        });
                    }
                }
            })?;
        Ok(LogStore {
            inner,
            flush: tx,
            keep_from: Arc::new(AtomicU64::new(u64::MAX)),
        })
    }

    /// The lowest log index that must stay on disk (the oldest live message); the state
    /// machine sets it when it takes a snapshot. `u64::MAX`: no bound (plain Raft purge).
    pub fn retention(&self) -> Arc<AtomicU64> {
        self.keep_from.clone()
    }

    /// Log segments on disk.
    pub fn segment_count(&self) -> usize {
        lock(&self.inner).map_or(0, |g| g.log.segment_count())
    }

    /// Reads entry `index` if it is still on disk, purged from Raft's view or not (a live
    /// message's body under the snapshot's purge point).
    pub fn read_retained(&self, index: u64) -> io::Result<Entry> {
        lock(&self.inner)?.entry(index)
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => Some(e),
        Bound::Excluded(&e) => e.checked_sub(1),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        if range.end_bound() == Bound::Excluded(&0) {
            return Ok(Vec::new());
        }
        let mut g = lock(&self.inner)?;
        let Some(last) = g.log.last_index() else {
            return Ok(Vec::new());
        };
        let from = start.max(g.first_visible());
        let to = end.map_or(last, |e| e.min(last));
        let mut out = Vec::new();
        let mut i = from;
        while i <= to {
            out.push(g.entry(i)?);
            i += 1;
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(lock(&self.inner)?.meta.vote)
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let mut g = lock(&self.inner)?;
        let last_purged = g.meta.last_purged;
        let last = match g.log.last_index() {
            Some(i) if last_purged.is_none_or(|p| i > p.index) => Some(g.entry(i)?.log_id),
            _ => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut g = lock(&self.inner)?;
        g.log.sync()?;
        g.meta.vote = Some(*vote);
        g.save_meta()
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Kept in memory and written with the next vote or purge, never synced on its own:
        // openraft calls this on every commit, and a lost value only means the leader
        // re-commits the log after a restart (the log is the record, not this hint).
        lock(&self.inner)?.meta.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(lock(&self.inner)?.meta.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut g = lock(&self.inner)?;
            for e in entries {
                let index = e.index();
                let next = g.log.next_index();
                // The first entry after an installed snapshot may leave a gap above entries
                // kept only for their bodies (which the snapshot brought along): start the
                // log again there, as for the first entry of an empty log.
                let after_snapshot =
                    index > next && g.meta.last_purged.is_some_and(|p| p.index + 1 == index);
                if (g.log.last_index().is_none() && next != index) || after_snapshot {
                    g.log.reset(index)?;
                    g.tail.clear();
                }
                g.log.append(index, &encode_entry(&e))?;
                g.tail.push(e);
            }
            // Readable by readers now; durable once the flusher has synced.
            g.log.flush()?;
        }
        self.flush
            .send(callback)
            .map_err(|_| io_other("log flusher stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let mut g = lock(&self.inner)?;
        let from = last_log_id.map_or(0, |l| l.index + 1);
        if g.log.last_index().is_some_and(|l| l >= from) {
            if g.log.first_index().is_some_and(|f| from <= f) {
                g.log.reset(from)?;
            } else {
                g.log.truncate(from)?;
            }
        }
        g.tail.cut_from(from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut g = lock(&self.inner)?;
        // Record the purge point first: entries up to it are invisible from now on, even
        // those still in a segment that straddles it.
        g.meta.last_purged = Some(log_id);
        g.save_meta()?;
        // Never delete a live message's body: physically purge only below the oldest one.
        let keep_from = self.keep_from.load(Ordering::Acquire);
        let upto = log_id.index.min(keep_from.saturating_sub(1));
        if upto == log_id.index && g.log.last_index().is_none_or(|l| l <= upto) {
            g.log.reset(log_id.index + 1)?;
            g.tail.clear();
        } else {
            g.log.purge(upto)?;
        }
        // Purged entries are invisible to Raft; a live body under the purge point is read
        // from the segment by `read_retained`, rarely.
        g.tail.cut_upto(log_id.index);
        Ok(())
    }
}

// --- state machine ------------------------------------------------------------------------

use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, StoredMembershipOf};

/// What applying one committed command produced: the shard's effects, and the message body
/// the command carried (enqueue/publish) with its sequence number.
#[derive(Debug, Default)]
pub struct Applied {
    pub effects: Vec<ShardEffect>,
    pub body: Option<(u64, Vec<u8>)>,
}

/// Snapshot contents: `[applied count: u64][u32 length][shard state][bodies]` (see
/// [`Shard::encode`]). Snapshots kept on disk carry no bodies: they stay in the log, which
/// keeps every segment holding a live one. A snapshot sent to another replica carries the
/// bodies of the live messages it covers (`[varint n][n × (varint seq, bytes)]`), since that
/// replica never saw their log entries; it keeps them in its [`BodyStore`].
pub type SnapshotData = Vec<u8>;

/// Bodies of live messages that arrived with an installed snapshot (their log entries are not
/// on this replica's disk). One file, `snapshot-bodies`, records `[seq][len][crc32c][body]`,
/// replaced atomically; the index is in memory. Rewritten without dead messages at each local
/// snapshot.
#[derive(Default)]
struct BodyStore {
    path: Option<PathBuf>,
    index: BTreeMap<u64, (u64, u32)>,
    file: Option<fs::File>,
    mem: BTreeMap<u64, Vec<u8>>,
}

impl BodyStore {
    fn open(path: PathBuf) -> io::Result<BodyStore> {
        let mut store = BodyStore {
            path: Some(path.clone()),
            ..Default::default()
        };
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(store),
            Err(e) => return Err(e),
        };
        let mut at = 0usize;
        while at + 16 <= data.len() {
            let mut r = Reader(&data[at..]);
            let seq = r.u64()?;
            let len = r.u32()?;
            let crc = r.u32()?;
            let body = r.take(len as usize)?;
            if crc32c::crc32c(body) != crc {
                return Err(invalid("snapshot body checksum mismatch"));
            }
            store.index.insert(seq, ((at + 16) as u64, len));
            at += 16 + len as usize;
        }
        if at != data.len() {
            return Err(invalid("truncated snapshot body file"));
        }
        store.file = Some(fs::File::open(&path)?);
        Ok(store)
    }

    fn get(&self, seq: u64) -> io::Result<Option<Vec<u8>>> {
        if let Some(b) = self.mem.get(&seq) {
            return Ok(Some(b.clone()));
        }
        let (Some(&(off, len)), Some(f)) = (self.index.get(&seq), self.file.as_ref()) else {
            return Ok(None);
        };
        let mut b = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut b, off)?;
        Ok(Some(b))
    }

    fn is_empty(&self) -> bool {
        self.index.is_empty() && self.mem.is_empty()
    }

    /// Replaces the contents with `bodies`.
    fn replace(&mut self, bodies: Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            self.mem = bodies.into_iter().collect();
            return Ok(());
        };
        let mut out = Vec::new();
        let mut index = BTreeMap::new();
        for (seq, b) in &bodies {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(&crc32c::crc32c(b).to_be_bytes());
            index.insert(*seq, ((out.len()) as u64, b.len() as u32));
            out.extend_from_slice(b);
        }
        replace_file(&path, &out)?;
        self.index = index;
        self.file = Some(fs::File::open(&path)?);
        Ok(())
    }

    /// Keeps only the bodies of `live` messages.
    fn retain(&mut self, live: &std::collections::BTreeSet<u64>) -> io::Result<()> {
        if self.is_empty()
            || self
                .index
                .keys()
                .chain(self.mem.keys())
                .all(|s| live.contains(s))
        {
            return Ok(());
        }
        let mut keep = Vec::new();
        let seqs: Vec<u64> = self.index.keys().chain(self.mem.keys()).copied().collect();
        for seq in seqs {
            if !live.contains(&seq) {
                continue;
            }
            if let Some(b) = self.get(seq)? {
                keep.push((seq, b));
            }
        }
        self.replace(keep)
    }
}

/// The message body carried by log entry `e`, if it carries one.
fn entry_body(e: Entry) -> Option<Vec<u8>> {
    match e.payload {
        EntryPayload::Normal(c) => match Cmd::decode(&c.0) {
            Ok(cmd) => cmd.into_body(),
            Err(_) => None,
        },
        _ => None,
    }
}

const SNAPSHOT_MAGIC: &[u8; 8] = b"ENSNAP01";

#[derive(Default)]
struct SmInner {
    last_applied: Option<LogId>,
    membership: StoredMembershipOf<C>,
    /// Normal commands applied so far.
    applied: u64,
    shard: Shard,
    /// Where the effects of applied commands go (the shard's owner); none in tests.
    effects: Option<tokio::sync::mpsc::UnboundedSender<Applied>>,
    /// The current snapshot's metadata; its data is in `snapshot_file` (or `mem_snapshot`
    /// when the state machine has no directory).
    current: Option<SnapshotMetaOf<C>>,
    snapshot_file: Option<PathBuf>,
    mem_snapshot: Option<SnapshotData>,
    /// The log store's retention bound, moved forward with each snapshot.
    keep_from: Option<Arc<AtomicU64>>,
    /// The log (for the bodies a snapshot sent to another replica must carry).
    log: Option<LogStore>,
    bodies: BodyStore,
}

/// The Raft-facing side of a shard: applies committed commands to the [`Shard`] and hands
/// their effects to the owner; snapshots the shard state to a file (written atomically,
/// checksummed) and restores it on open, so a restart replays only the log after it.
#[derive(Clone, Default)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

fn sm_lock(m: &Mutex<SmInner>) -> io::Result<MutexGuard<'_, SmInner>> {
    m.lock()
        .map_err(|_| io_other("state machine lock poisoned"))
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// `[magic][crc32c of the rest][meta][data]`.
fn encode_snapshot_file(meta: &SnapshotMetaOf<C>, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(data.len() + 64);
    put_opt_log_id(&mut body, meta.last_log_id.as_ref());
    put_opt_log_id(&mut body, meta.last_membership.log_id().as_ref());
    put_membership(&mut body, meta.last_membership.membership());
    body.extend_from_slice(data);
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_snapshot_file(b: &[u8]) -> io::Result<(SnapshotMetaOf<C>, SnapshotData)> {
    if b.len() < 12 || &b[..8] != SNAPSHOT_MAGIC {
        return Err(invalid("not a shard snapshot"));
    }
    let body = &b[12..];
    if crc32c::crc32c(body).to_be_bytes() != b[8..12] {
        return Err(invalid("snapshot checksum mismatch"));
    }
    let mut r = Reader(body);
    let last_log_id = get_opt_log_id(&mut r)?;
    let mlog = get_opt_log_id(&mut r)?;
    let m = get_membership(&mut r)?;
    let meta = SnapshotMetaOf::<C> {
        last_log_id,
        last_membership: StoredMembershipOf::<C>::new(mlog, m),
    };
    Ok((meta, r.0.to_vec()))
}

/// Message bodies by sequence number, as a snapshot carries them.
pub type Bodies = Vec<(u64, Vec<u8>)>;

/// Snapshot data: the applied count, the shard state and the bodies it carries.
pub fn encode_snapshot_data(applied: u64, shard: &Shard, bodies: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&applied.to_be_bytes());
    data.extend_from_slice(&[0; 4]);
    shard.encode(&mut data);
    let n = (data.len() - 12) as u32;
    data[8..12].copy_from_slice(&n.to_be_bytes());
    put_varint(&mut data, bodies.len() as u64);
    for (seq, b) in bodies {
        put_varint(&mut data, *seq);
        put_bytes(&mut data, b);
    }
    data
}

/// Splits snapshot data into the applied count, the shard state and the bodies it carries.
pub fn decode_snapshot_data(data: &[u8]) -> io::Result<(u64, Shard, Bodies)> {
    let mut r = Reader(data);
    let applied = r.u64()?;
    let n = r.u32()? as usize;
    let shard = Shard::decode(r.take(n)?)?;
    let count = r.count(5)?;
    let mut bodies = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = r.varint()?;
        bodies.push((seq, r.bytes()?));
    }
    if !r.is_empty() {
        return Err(invalid("trailing bytes after snapshot"));
    }
    Ok((applied, shard, bodies))
}

impl StateMachine {
    /// A state machine whose applied commands' effects are sent to `effects`.
    pub fn with_effects(effects: tokio::sync::mpsc::UnboundedSender<Applied>) -> Self {
        let sm = StateMachine::default();
        if let Ok(mut g) = sm.inner.lock() {
            g.effects = Some(effects);
        }
        sm
    }

    /// A state machine that keeps its snapshot in `dir` (restoring the one found there) and
    /// moves `keep_from` (the log store's [`LogStore::retention`]) with each snapshot.
    pub fn open(
        dir: &Path,
        effects: Option<tokio::sync::mpsc::UnboundedSender<Applied>>,
        keep_from: Arc<AtomicU64>,
    ) -> io::Result<Self> {
        let path = dir.join("snapshot");
        let mut inner = SmInner {
            effects,
            snapshot_file: Some(path.clone()),
            ..Default::default()
        };
        match fs::read(&path) {
            Ok(b) => {
                let (meta, data) = decode_snapshot_file(&b)?;
                let (applied, shard, _) = decode_snapshot_data(&data)?;
                keep_from.store(retention_of(&shard, &meta), Ordering::Release);
                inner.applied = applied;
                inner.shard = shard;
                inner.last_applied = meta.last_log_id;
                inner.membership = meta.last_membership.clone();
                inner.current = Some(meta);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        inner.keep_from = Some(keep_from);
        inner.bodies = BodyStore::open(dir.join("snapshot-bodies"))?;
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// Index of the last applied log entry.
    pub fn last_applied_index(&self) -> io::Result<Option<u64>> {
        Ok(sm_lock(&self.inner)?.last_applied.map(|l| l.index))
    }

    /// Gives the state machine the log, so a snapshot it sends to another replica can carry
    /// the bodies of the live messages it covers.
    pub fn attach_log(&self, log: LogStore) {
        if let Ok(mut g) = self.inner.lock() {
            g.log = Some(log);
        }
    }

    /// The body of `seq` if it came with an installed snapshot.
    pub fn snapshot_body(&self, seq: u64) -> io::Result<Option<Vec<u8>>> {
        sm_lock(&self.inner)?.bodies.get(seq)
    }

    /// The body of live message `seq`: from the log if this replica has its entry, else from
    /// the bodies that came with an installed snapshot.
    fn body_for_transfer(g: &SmInner, seq: u64) -> Option<Vec<u8>> {
        let from_log = g
            .log
            .as_ref()
            .and_then(|l| l.read_retained(seq).ok())
            .and_then(entry_body);
        from_log.or_else(|| g.bodies.get(seq).ok().flatten())
    }

    /// Normal commands applied so far.
    pub fn applied(&self) -> u64 {
        sm_lock(&self.inner).map_or(0, |g| g.applied)
    }

    /// Reads the shard state.
    pub fn with_shard<T>(&self, f: impl FnOnce(&Shard) -> T) -> io::Result<T> {
        Ok(f(&sm_lock(&self.inner)?.shard))
    }

    /// Makes `meta`/`data` the current snapshot: on disk first (atomically), then in memory,
    /// then the log's retention bound moves up to the oldest message the snapshot holds.
    fn keep_snapshot(
        &self,
        meta: &SnapshotMetaOf<C>,
        data: &[u8],
        retention: u64,
    ) -> io::Result<()> {
        let (file, keep_from) = {
            let g = sm_lock(&self.inner)?;
            (g.snapshot_file.clone(), g.keep_from.clone())
        };
        // Kept in memory only without a directory (tests); otherwise read back on demand.
        let g_data = match &file {
            Some(path) => {
                replace_file(path, &encode_snapshot_file(meta, data))?;
                None
            }
            None => Some(data.to_vec()),
        };
        let mut g = sm_lock(&self.inner)?;
        // A snapshot older than the current one (a slow build racing an install) is dropped.
        let newer = match (&g.current, &meta.last_log_id) {
            (Some(cur), Some(new)) => cur
                .last_log_id
                .as_ref()
                .is_none_or(|c| c.index <= new.index),
            _ => true,
        };
        if newer {
            g.current = Some(meta.clone());
            g.mem_snapshot = g_data;
            if let Some(k) = keep_from {
                k.store(retention, Ordering::Release);
            }
        }
        Ok(())
    }
}

/// The lowest log index a snapshot still needs on disk: its oldest live message, or the entry
/// after the snapshot when it holds none.
fn retention_of(shard: &Shard, meta: &SnapshotMetaOf<C>) -> u64 {
    shard
        .oldest_live()
        .unwrap_or_else(|| meta.last_log_id.as_ref().map_or(0, |l| l.index + 1))
}

impl RaftSnapshotBuilder<C> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, SnapshotData>, io::Error> {
        // Encoded under the lock (consistent with last_applied; a few ms even for millions of
        // messages), written to disk outside it.
        let (meta, data, retention) = {
            let g = sm_lock(&self.inner)?;
            let meta = SnapshotMetaOf::<C> {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
            };
            let data = encode_snapshot_data(g.applied, &g.shard, &[]);
            let retention = retention_of(&g.shard, &meta);
            (meta, data, retention)
        };
        // Bodies that came with an installed snapshot are kept only while their message lives.
        {
            let mut g = sm_lock(&self.inner)?;
            if !g.bodies.is_empty() {
                let live = g.shard.live_seqs();
                g.bodies.retain(&live)?;
            }
        }
        self.keep_snapshot(&meta, &data, retention)?;
        Ok(SnapshotOf::<C, SnapshotData> {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<C> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembershipOf<C>), io::Error> {
        let g = sm_lock(&self.inner)?;
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            {
                let mut g = sm_lock(&self.inner)?;
                g.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(c) => {
                        g.applied += 1;
                        // A command that does not decode is skipped on every replica alike.
                        if let Ok(mut cmd) = Cmd::decode(&c.0) {
                            // The shard keeps metadata only; the body travels with the effects
                            // so the owner can deliver it without reading the log back.
                            let body = cmd
                                .body_mut()
                                .map(|b| (entry.log_id.index, std::mem::take(b)));
                            let effects = g.shard.apply(entry.log_id.index, cmd);
                            let worth = !effects.is_empty() || body.is_some();
                            if let (true, Some(tx)) = (worth, g.effects.as_ref()) {
                                let _ = tx.send(Applied { effects, body });
                            }
                        }
                    }
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembershipOf::<C>::new(Some(entry.log_id), m)
                    }
                }
            }
            // Every client write waits for this.
            if let Some(r) = responder {
                r.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let (applied, shard, bodies) = decode_snapshot_data(&snapshot)?;
        let retention = retention_of(&shard, meta);
        // Bodies first: once the snapshot is current, its messages must be deliverable.
        sm_lock(&self.inner)?.bodies.replace(bodies)?;
        self.keep_snapshot(meta, &encode_snapshot_data(applied, &shard, &[]), retention)?;
        let mut g = sm_lock(&self.inner)?;
        g.applied = applied;
        g.shard = shard;
        g.last_applied = meta.last_log_id;
        g.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<C, SnapshotData>>, io::Error> {
        let (meta, file, mem) = {
            let g = sm_lock(&self.inner)?;
            (
                g.current.clone(),
                g.snapshot_file.clone(),
                g.mem_snapshot.clone(),
            )
        };
        let Some(meta) = meta else {
            return Ok(None);
        };
        let (meta, data) = match (mem, file) {
            (Some(d), _) => (meta, d),
            // The file's own metadata: a newer snapshot may have replaced it meanwhile.
            (None, Some(path)) => decode_snapshot_file(&fs::read(path)?)?,
            (None, None) => return Ok(None),
        };
        // This is what goes to another replica: add the bodies of the live messages it covers.
        let (applied, shard, _) = decode_snapshot_data(&data)?;
        let upto = meta.last_log_id.as_ref().map_or(0, |l| l.index);
        let bodies = {
            let g = sm_lock(&self.inner)?;
            let mut out = Vec::new();
            for seq in shard.live_seqs().into_iter().filter(|s| *s <= upto) {
                match StateMachine::body_for_transfer(&g, seq) {
                    Some(b) => out.push((seq, b)),
                    None => tracing::error!("snapshot: body of live message {seq} not found"),
                }
            }
            out
        };
        Ok(Some(SnapshotOf::<C, SnapshotData> {
            meta,
            snapshot: encode_snapshot_data(applied, &shard, &bodies),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, len: usize) -> Entry {
        EntryOf::<C>::new_normal(
            LogId::new_term_index_node(1, 1, index),
            Command(vec![7; len]),
        )
    }

    #[test]
    fn tail_stays_contiguous_and_bounded() {
        let mut t = Tail::default();
        for i in 1..=10 {
            t.push(entry(i, 100));
        }
        assert_eq!(t.get(1).map(|e| e.index()), Some(1));
        assert_eq!(t.get(10).map(|e| e.index()), Some(10));
        assert!(t.get(11).is_none());
        t.cut_from(8);
        assert!(t.get(8).is_none());
        t.cut_upto(3);
        assert!(t.get(3).is_none());
        assert_eq!(t.get(4).map(|e| e.index()), Some(4));
        // A gap (an entry after an installed snapshot) starts the tail again.
        t.push(entry(20, 100));
        assert!(t.get(7).is_none());
        assert_eq!(t.get(20).map(|e| e.index()), Some(20));
        // Big entries push old ones out.
        for i in 21..=40 {
            t.push(entry(i, TAIL_BYTES / 8));
        }
        assert!(t.bytes <= TAIL_BYTES);
        assert!(t.get(21).is_none());
        assert!(t.get(40).is_some());
    }
}
