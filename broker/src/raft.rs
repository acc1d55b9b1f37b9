//! The one module that sees openraft: the shard's Raft type configuration and its durable log
//! store over [`SegmentLog`].
//!
//! Group commit: `append` writes the entries to the segment (readable at once, as openraft
//! requires) and hands the append's callback to a flusher thread; the flusher takes every
//! callback that has queued up, makes them all durable with one `fdatasync`, then completes
//! them. A producer with many messages in flight therefore pays one sync per batch.
//!
//! The vote, the committed log id and the last purged log id live in a small metadata file
//! (CRC-checked, replaced atomically). Saving the vote first syncs the log, so a vote never
//! becomes durable ahead of entries appended before it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{EntryPayload, Membership, OptionalSend};

use crate::log::{LogError, SegmentLog};
use crate::shard::{Cmd, Shard, ShardEffect};
use crate::wire::{Reader, put_bytes};

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
    pub addr: String,
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
                put_bytes(&mut out, n.addr.as_bytes());
            }
        }
    }
    out
}

/// Decodes what [`encode_entry`] wrote.
pub fn decode_entry(b: &[u8]) -> io::Result<Entry> {
    let mut r = Reader(b);
    let log_id = get_log_id(&mut r)?;
    let payload = match r.u8()? {
        0 => EntryPayload::Blank,
        1 => EntryPayload::Normal(Command(r.bytes()?)),
        2 => {
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
                nodes.insert(id, NodeAddr { addr });
            }
            EntryPayload::Membership(Membership::new(configs, nodes).map_err(io_other)?)
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad entry tag")),
    };
    Ok(Entry::new(log_id, payload))
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
                out.extend_from_slice(&v.leader_id.term.to_be_bytes());
                out.extend_from_slice(&v.leader_id.node_id.to_be_bytes());
                out.push(v.committed as u8);
            }
            None => out.push(0),
        }
        for id in [&self.committed, &self.last_purged] {
            match id {
                Some(id) => {
                    out.push(1);
                    put_log_id(&mut out, id);
                }
                None => out.push(0),
            }
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
            _ => {
                let term = r.u64()?;
                let node = r.u64()?;
                let committed = r.u8()? != 0;
                Some(if committed {
                    Vote::new_committed(term, node)
                } else {
                    Vote::new(term, node)
                })
            }
        };
        let mut ids = [None, None];
        for slot in &mut ids {
            if r.u8()? != 0 {
                *slot = Some(get_log_id(&mut r)?);
            }
        }
        let [committed, last_purged] = ids;
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

struct Inner {
    log: SegmentLog,
    meta: Meta,
    meta_path: PathBuf,
}

impl Inner {
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
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    flush: std_mpsc::Sender<IOFlushed<C>>,
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
        Ok(LogStore { inner, flush: tx })
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
            out.push(decode_entry(&g.log.read(i)?)?);
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
            Some(i) if last_purged.is_none_or(|p| i > p.index) => {
                Some(decode_entry(&g.log.read(i)?)?.log_id)
            }
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
                if g.log.last_index().is_none() && g.log.next_index() != index {
                    // First entry of an empty log (fresh, or everything purged).
                    g.log.reset(index)?;
                }
                g.log.append(index, &encode_entry(&e))?;
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
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let mut g = lock(&self.inner)?;
        // Record the purge point first: entries up to it are invisible from now on, even
        // those still in a segment that straddles it.
        g.meta.last_purged = Some(log_id);
        g.save_meta()?;
        if g.log.last_index().is_none_or(|l| l <= log_id.index) {
            g.log.reset(log_id.index + 1)?;
        } else {
            g.log.purge(log_id.index)?;
        }
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

/// Snapshot contents: the state machine's own encoding.
pub type SnapshotData = Vec<u8>;

#[derive(Default)]
struct SmInner {
    last_applied: Option<LogId>,
    membership: StoredMembershipOf<C>,
    /// Normal commands applied so far.
    applied: u64,
    shard: Shard,
    /// Where the effects of applied commands go (the shard's owner); none in tests.
    effects: Option<tokio::sync::mpsc::UnboundedSender<Applied>>,
    current: Option<(SnapshotMetaOf<C>, SnapshotData)>,
}

/// The Raft-facing side of a shard: applies committed commands to the [`Shard`] and hands
/// their effects to the owner. Snapshots carry only the applied count so far, not shard
/// state: a shard runtime must keep snapshots off (see `node`) until they do.
#[derive(Clone, Default)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

fn sm_lock(m: &Mutex<SmInner>) -> io::Result<MutexGuard<'_, SmInner>> {
    m.lock()
        .map_err(|_| io_other("state machine lock poisoned"))
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

    /// Normal commands applied so far.
    pub fn applied(&self) -> u64 {
        sm_lock(&self.inner).map_or(0, |g| g.applied)
    }

    /// Reads the shard state.
    pub fn with_shard<T>(&self, f: impl FnOnce(&Shard) -> T) -> io::Result<T> {
        Ok(f(&sm_lock(&self.inner)?.shard))
    }
}

impl RaftSnapshotBuilder<C> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, SnapshotData>, io::Error> {
        let mut g = sm_lock(&self.inner)?;
        let meta = SnapshotMetaOf::<C> {
            last_log_id: g.last_applied,
            last_membership: g.membership.clone(),
        };
        let data = g.applied.to_be_bytes().to_vec();
        g.current = Some((meta.clone(), data.clone()));
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
                            let body = match &mut cmd {
                                Cmd::Enqueue { body, .. } | Cmd::Publish { body, .. } => {
                                    Some((entry.log_id.index, std::mem::take(body)))
                                }
                                _ => None,
                            };
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
        let mut g = sm_lock(&self.inner)?;
        let mut a = [0u8; 8];
        if snapshot.len() == 8 {
            a.copy_from_slice(&snapshot);
        }
        g.applied = u64::from_be_bytes(a);
        g.last_applied = meta.last_log_id;
        g.membership = meta.last_membership.clone();
        g.current = Some((meta.clone(), snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<C, SnapshotData>>, io::Error> {
        let g = sm_lock(&self.inner)?;
        Ok(g.current
            .as_ref()
            .map(|(meta, data)| SnapshotOf::<C, SnapshotData> {
                meta: meta.clone(),
                snapshot: data.clone(),
            }))
    }
}
