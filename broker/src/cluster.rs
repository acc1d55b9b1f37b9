//! A broker process in a cluster: the replicas of the shards placed on it, the Raft transport
//! they share, and the router-facing service of each shard it leads.
//!
//! Placement of replicas: shard `s` has its replicas on the brokers at positions
//! `s, s+1, …, s+r-1` (mod n) of the sorted broker ids, so replicas spread evenly and every
//! broker computes the same map from the same configuration.
//!
//! Leaders spread too (`broker.cluster.balance_leaders`, on by default): shard `s` prefers
//! the voter at position `s mod v` of its sorted voters. A leader that is not the
//! preferred one, has led for [`BALANCE_AFTER`] and sees the
//! preferred replica alive and caught up hands leadership over (Raft's leader transfer; for
//! clients a leader change like any other, which routers hide). Without this the broker
//! that initialised every group led them all, and one process did all the leaders' work.
//!
//! A shard's service takes router connections only while this replica leads: before it does,
//! it makes sure the new term can commit and numbers its connections above any id a previous
//! leader used. The consumers recorded in the state belonged to connections of the previous
//! leader: their routers resume them within [`crate::remote::RESUME_GRACE`], or they are
//! detached (their unacknowledged messages return to the queues). When
//! leadership moves away, its router connections are closed; routers then ask another broker,
//! which answers with the leader's address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::rt::WatchReceiver;
use openraft::{ChangeMembers, ServerState};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::net::{NetFactory, Peers, Registry};
use crate::node::{NodeOptions, ShardHandle, ShardNode};
use crate::raft::NodeAddr;
use crate::remote::{Admin, ShardService, ToBroker, ToRouter, answer, read_first, refuse};
use crate::shard::Cmd;

/// One broker's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddrs {
    /// Where its peers reach it for Raft.
    pub raft: String,
    /// Where routers reach it.
    pub client: String,
}

/// The cluster as every broker and router sees it (from configuration).
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub brokers: BTreeMap<u64, BrokerAddrs>,
    pub shards: u32,
    pub replicas: usize,
}

impl ClusterSpec {
    /// The brokers holding shard `shard`'s replicas.
    pub fn replicas_of(&self, shard: u32) -> Vec<u64> {
        let ids: Vec<u64> = self.brokers.keys().copied().collect();
        let n = ids.len();
        let r = self.replicas.clamp(1, n.max(1));
        (0..r)
            .filter_map(|k| ids.get((shard as usize + k) % n.max(1)).copied())
            .collect()
    }

    /// Router-facing addresses to try for shard `shard`, its replicas first.
    pub fn client_addrs(&self, shard: u32) -> Vec<String> {
        let mut out: Vec<String> = self
            .replicas_of(shard)
            .iter()
            .filter_map(|id| self.brokers.get(id).map(|b| b.client.clone()))
            .collect();
        for b in self.brokers.values() {
            if !out.contains(&b.client) {
                out.push(b.client.clone());
            }
        }
        out
    }
}

struct Hosted {
    handle: ShardHandle,
    service: ShardService,
    /// Shared with the service: deliveries are made only while leading.
    leading: Arc<AtomicBool>,
}

/// Where a broker listens.
pub struct Listeners {
    /// Raft peers.
    pub raft: TcpListener,
    /// Routers.
    pub client: TcpListener,
}

/// The shards a broker hosts, kept in `DIR/hosted` (one shard number per line) so that a
/// replica moved away is not recreated by the initial placement on the next start.
fn load_hosted(dir: &Path) -> io::Result<Option<BTreeSet<u32>>> {
    match std::fs::read_to_string(dir.join("hosted")) {
        Ok(text) => text
            .split_whitespace()
            .map(|w| {
                w.parse::<u32>()
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad hosted file"))
            })
            .collect::<io::Result<BTreeSet<u32>>>()
            .map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn save_hosted(dir: &Path, shards: &BTreeSet<u32>) -> io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("hosted.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    for s in shards {
        writeln!(f, "{s}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("hosted"))?;
    std::fs::File::open(dir)?.sync_all()
}

/// One broker process: its replicas (which change with membership) and what opening one needs.
struct Broker {
    me: u64,
    spec: ClusterSpec,
    dir: PathBuf,
    opts: NodeOptions,
    registry: Registry,
    peers: Peers,
    hosted: std::sync::Mutex<HashMap<u32, Arc<Hosted>>>,
    /// Whether to run [`balance_leadership`] for each hosted shard.
    balance_leaders: bool,
}

impl Broker {
    fn get(&self, shard: u32) -> Option<Arc<Hosted>> {
        self.hosted.lock().ok().and_then(|g| g.get(&shard).cloned())
    }

    fn persist(&self) -> io::Result<()> {
        let ids: BTreeSet<u32> = match self.hosted.lock() {
            Ok(g) => g.keys().copied().collect(),
            Err(_) => return Err(io::Error::other("hosted map poisoned")),
        };
        save_hosted(&self.dir, &ids)
    }

    /// Opens this broker's replica of `shard` (`members` initialize a new group when this
    /// broker has the lowest id among them; empty for a replica joining an existing group).
    async fn host(&self, shard: u32, members: BTreeMap<u64, NodeAddr>) -> io::Result<()> {
        if self.get(shard).is_some() {
            return Ok(());
        }
        let net = NetFactory {
            shard,
            peers: self.peers.clone(),
        };
        let dir = self.dir.join(format!("shard-{shard}"));
        let node = ShardNode::open_replica(&dir, self.me, members, net, self.opts)
            .await
            .map_err(io::Error::other)?;
        let handle = node.handle();
        self.registry.insert(shard, handle.raft());
        let leading = Arc::new(AtomicBool::new(false));
        let h = Arc::new(Hosted {
            handle,
            service: ShardService::start_replica(node, leading.clone()),
            leading,
        });
        tokio::spawn(follow_leadership(shard, h.clone()));
        if self.balance_leaders {
            tokio::spawn(balance_leadership(shard, self.me, h.handle.raft()));
        }
        if let Ok(mut g) = self.hosted.lock() {
            g.insert(shard, h);
        }
        self.persist()
    }

    /// Deletes this broker's replica of `shard` (the group no longer counts it).
    async fn unhost(&self, shard: u32) -> io::Result<()> {
        let Some(h) = self.get(shard) else {
            return Ok(());
        };
        if h.leading.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "this replica leads the shard: remove it from the group first",
            ));
        }
        if let Ok(mut g) = self.hosted.lock() {
            g.remove(&shard);
        }
        self.registry.remove(shard);
        h.service.abort();
        let _ = h.handle.raft().shutdown().await;
        self.persist()?;
        let dir = self.dir.join(format!("shard-{shard}"));
        // The shard's files are closed once its tasks end; retry briefly.
        for _ in 0..50 {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        std::fs::remove_dir_all(&dir)
    }

    /// The router-facing address of broker `id`, from a shard's membership (brokers added
    /// later are known there) or the configuration.
    fn client_of(&self, h: &Hosted, id: u64) -> Option<String> {
        let from_members = {
            let m = h.handle.raft().metrics();
            let m = m.borrow_watched();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.client.clone())
                .filter(|c| !c.is_empty())
        };
        from_members.or_else(|| self.spec.brokers.get(&id).map(|b| b.client.clone()))
    }

    async fn admin(&self, a: Admin) -> ToRouter {
        let ok = |text: String| ToRouter::Admin {
            ok: true,
            text,
            leader: None,
        };
        let fail = |text: String, leader: Option<String>| ToRouter::Admin {
            ok: false,
            text,
            leader,
        };
        match a {
            Admin::Status => ok(self.status()),
            Admin::Host { shard } => match self.host(shard, BTreeMap::new()).await {
                Ok(()) => ok(format!("broker {} hosts shard {shard}", self.me)),
                Err(e) => fail(e.to_string(), None),
            },
            Admin::Unhost { shard } => match self.unhost(shard).await {
                Ok(()) => ok(format!("broker {} no longer hosts shard {shard}", self.me)),
                Err(e) => fail(e.to_string(), None),
            },
            Admin::AddReplica { shard, .. }
            | Admin::RemoveReplica { shard, .. }
            | Admin::Lead { shard, .. } => {
                let Some(h) = self.get(shard) else {
                    return fail(format!("shard {shard} is not hosted here"), None);
                };
                if !h.leading.load(Ordering::Acquire) {
                    let leader = match h.handle.leader().await {
                        Some(id) => self.client_of(&h, id),
                        None => None,
                    };
                    return fail("not the shard's leader".into(), leader);
                }
                let raft = h.handle.raft();
                let r = match a {
                    Admin::AddReplica {
                        id,
                        raft: r,
                        client,
                        ..
                    } => {
                        let node = NodeAddr { addr: r, client };
                        // Blocking: returns once the learner has caught up, so that making it
                        // a voter does not stall commits.
                        match raft.add_learner(id, node, true).await {
                            Ok(_) => raft
                                .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                                .await
                                .map(|_| format!("broker {id} is a voter of shard {shard}")),
                            Err(e) => Err(e),
                        }
                    }
                    Admin::RemoveReplica { id, .. } => raft
                        .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                        .await
                        .map(|_| format!("broker {id} removed from shard {shard}")),
                    Admin::Lead { to, .. } => {
                        return match hand_over(&raft, to).await {
                            Ok(()) => ok(format!("broker {to} leads shard {shard}")),
                            Err(why) => fail(why, None),
                        };
                    }
                    _ => return fail("unreachable".into(), None),
                };
                match r {
                    Ok(text) => ok(text),
                    Err(e) => fail(e.to_string(), None),
                }
            }
        }
    }

    /// What `Admin::Status` answers: per hosted shard, its leader, voters and learners as
    /// this replica knows them, and its last applied entry.
    fn status(&self) -> String {
        let mut shards: Vec<(u32, Arc<Hosted>)> = match self.hosted.lock() {
            Ok(g) => g.iter().map(|(s, h)| (*s, h.clone())).collect(),
            Err(_) => Vec::new(),
        };
        shards.sort_by_key(|(s, _)| *s);
        let list: Vec<String> = shards
            .into_iter()
            .map(|(shard, h)| {
                let m = h.handle.raft().metrics();
                let m = m.borrow_watched();
                let mem = m.membership_config.membership();
                let ids = |v: Vec<u64>| {
                    v.iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                format!(
                    "{{\"shard\":{shard},\"leading\":{},\"leader\":{},\"voters\":[{}],\"learners\":[{}],\"applied\":{}}}",
                    h.leading.load(Ordering::Acquire),
                    m.current_leader
                        .map_or_else(|| "null".to_string(), |l| l.to_string()),
                    ids(mem.voter_ids().collect()),
                    ids(mem.learner_ids().collect()),
                    m.last_applied.as_ref().map_or(0, |l| l.index),
                )
            })
            .collect();
        format!("{{\"broker\":{},\"shards\":[{}]}}", self.me, list.join(","))
    }
}

/// Runs broker `me` of `spec` until `shutdown`; shard data under `dir/shard-N`. On its first
/// start a broker hosts the replicas the initial placement gives it, or none if `join` (a
/// broker added to a running cluster: `enmesh cluster move|drain` gives it replicas).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    spec: ClusterSpec,
    me: u64,
    join: bool,
    balance_leaders: bool,
    dir: &Path,
    opts: NodeOptions,
    listeners: Listeners,
    ready: impl FnOnce(),
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let Listeners { raft, client } = listeners;
    let registry = Registry::default();
    let server = tokio::spawn(crate::net::serve(raft, registry.clone()));
    let initial: BTreeSet<u32> = (0..spec.shards)
        .filter(|s| spec.replicas_of(*s).contains(&me))
        .collect();
    let shards = match load_hosted(dir)? {
        Some(s) => s,
        None if join => BTreeSet::new(),
        None => initial.clone(),
    };
    let broker = Arc::new(Broker {
        me,
        spec: spec.clone(),
        dir: dir.to_path_buf(),
        opts,
        registry: registry.clone(),
        peers: Peers::default(),
        hosted: std::sync::Mutex::new(HashMap::new()),
        balance_leaders,
    });
    save_hosted(dir, &shards)?;
    for shard in shards {
        // Only a replica of the initial placement may start a group (and only if it never
        // has: an initialized replica ignores this).
        let members: BTreeMap<u64, NodeAddr> = if initial.contains(&shard) {
            spec.replicas_of(shard)
                .iter()
                .filter_map(|id| {
                    spec.brokers.get(id).map(|b| {
                        (
                            *id,
                            NodeAddr {
                                addr: b.raft.clone(),
                                client: b.client.clone(),
                            },
                        )
                    })
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        broker.host(shard, members).await?;
    }
    ready();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = client.accept() => {
                let (sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                // Each connection's first frame is read on its own task: a slow peer or a
                // long admin request (a learner catching up) holds up no one else.
                tokio::spawn(first_frame(broker.clone(), sock, peer));
            }
        }
    }
    server.abort();
    let all: Vec<(u32, Arc<Hosted>)> = match broker.hosted.lock() {
        Ok(mut g) => g.drain().collect(),
        Err(_) => Vec::new(),
    };
    for (shard, h) in all {
        registry.remove(shard);
        h.service.abort();
        let _ = h.handle.raft().shutdown().await;
    }
    Ok(())
}

async fn first_frame(broker: Arc<Broker>, mut sock: tokio::net::TcpStream, peer: SocketAddr) {
    let shard = match read_first(&mut sock).await {
        Ok(ToBroker::Hello { shard }) => shard,
        Ok(ToBroker::Admin(a)) => {
            tracing::info!("admin request from {peer}: {a:?}");
            let reply = broker.admin(a).await;
            answer(sock, reply).await;
            return;
        }
        Ok(_) => return,
        Err(e) => {
            tracing::warn!("router {peer}: {e}");
            return;
        }
    };
    match broker.get(shard) {
        Some(h) if h.leading.load(Ordering::Acquire) => {
            h.service.attach(sock, peer.to_string());
        }
        other => {
            // Point the router at the leader, if this broker knows it.
            let hint = match other {
                Some(h) => match h.handle.leader().await {
                    Some(id) => broker.client_of(&h, id),
                    None => None,
                },
                None => None,
            };
            refuse(sock, hint).await;
        }
    }
}

/// Opens and closes a shard's service to routers as this replica gains and loses leadership.
async fn follow_leadership(shard: u32, h: Arc<Hosted>) {
    let raft = h.handle.raft();
    let mut metrics = raft.metrics();
    loop {
        let (leader_now, term) = {
            let m = metrics.borrow_watched();
            (m.state == ServerState::Leader, m.current_term)
        };
        let was = h.leading.load(Ordering::Acquire);
        if leader_now && !was {
            if take_over(&h, term).await {
                tracing::info!("shard {shard}: leading (term {term})");
                h.leading.store(true, Ordering::Release);
            }
        } else if !leader_now && was {
            tracing::info!("shard {shard}: no longer leading");
            h.leading.store(false, Ordering::Release);
            h.service.kick_all();
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// How long a replica leads before it considers handing leadership to the preferred one (a
/// broker that just came back must first prove itself, and leadership must not flap).
pub const BALANCE_AFTER: Duration = Duration::from_secs(10);

/// A preferred replica counts as caught up within this many entries of the leader's log.
const BALANCE_LAG: u64 = 1000;

/// The voter that should lead `shard`: position `shard mod v` of the sorted voters.
pub fn preferred_leader(shard: u32, voters: &[u64]) -> Option<u64> {
    let mut v = voters.to_vec();
    v.sort_unstable();
    v.get(shard as usize % v.len().max(1)).copied()
}

/// Hands `shard`'s leadership to its preferred voter when this replica has led it for
/// [`BALANCE_AFTER`] and the preferred one answered heartbeats in the last second and is
/// within [`BALANCE_LAG`] entries. Ends when the replica shuts down.
async fn balance_leadership(
    shard: u32,
    me: u64,
    raft: openraft::Raft<crate::raft::C, crate::raft::StateMachine>,
) {
    use openraft::Instant as _;
    let metrics = raft.metrics();
    let mut led_since: Option<(u64, tokio::time::Instant)> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = metrics.borrow_watched().clone();
        if m.state == ServerState::Shutdown || m.running_state.is_err() {
            return;
        }
        if m.state != ServerState::Leader {
            led_since = None;
            continue;
        }
        let since = match led_since {
            Some((term, at)) if term == m.current_term => at,
            _ => {
                let now = tokio::time::Instant::now();
                led_since = Some((m.current_term, now));
                now
            }
        };
        if since.elapsed() < BALANCE_AFTER {
            continue;
        }
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let Some(to) = preferred_leader(shard, &voters).filter(|p| *p != me) else {
            continue;
        };
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&to).cloned().flatten())
            .map(|l| l.index);
        let caught_up = matched
            .zip(m.last_log_index)
            .is_some_and(|(got, last)| got + BALANCE_LAG >= last);
        let alive = m
            .heartbeat
            .as_ref()
            .and_then(|h| h.get(&to).cloned().flatten())
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if caught_up && alive {
            tracing::info!("shard {shard}: handing leadership to its preferred replica {to}");
            if raft.trigger().transfer_leader(to).await.is_err() {
                return;
            }
            led_since = None;
        }
    }
}

/// Hands leadership to voter `to` and waits (up to 10 s) until the group reports it leading.
async fn hand_over(
    raft: &openraft::Raft<crate::raft::C, crate::raft::StateMachine>,
    to: u64,
) -> Result<(), String> {
    let voters: Vec<u64> = raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    if !voters.contains(&to) {
        return Err(format!("broker {to} is not a voter of this shard"));
    }
    raft.trigger()
        .transfer_leader(to)
        .await
        .map_err(|e| e.to_string())?;
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(to, "leadership handed over")
        .await
        .map(|_| ())
        .map_err(|e| format!("broker {to} did not take over: {e}"))
}

/// Readies a new leader: the term can commit, the previous leader's consumers are detached
/// unless resumed within the grace period, connection numbers start above theirs. False if
/// leadership was lost meanwhile.
async fn take_over(h: &Hosted, term: u64) -> bool {
    let now = crate::service::now_ms();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match h.handle.propose(&Cmd::Tick { now }).await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => return false,
        }
    }
    // The previous leader's consumers stay attached for a grace period: their routers are
    // reconnecting and resume them under new ids (keeping the messages their clients hold).
    // Those not resumed by then are detached; what they held returns to the queues.
    let stale = h.handle.consumer_ids();
    if !stale.is_empty() {
        let handle = h.handle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(crate::remote::RESUME_GRACE).await;
            let now = crate::service::now_ms();
            for consumer in stale {
                // Resumed ones are gone already (a no-op); a lost leadership fails these,
                // and the next leader does the same.
                if handle
                    .propose(&Cmd::Detach { consumer, now })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    // Connection numbers live in the top 24 bits of consumer ids: start each term's above
    // the previous terms' (stale ones were detached above in any case).
    h.service.renumber((term % 256) << 16);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u64, shards: u32, replicas: usize) -> ClusterSpec {
        ClusterSpec {
            brokers: (1..=n)
                .map(|i| {
                    (
                        i,
                        BrokerAddrs {
                            raft: format!("r{i}"),
                            client: format!("c{i}"),
                        },
                    )
                })
                .collect(),
            shards,
            replicas,
        }
    }

    #[test]
    fn preferred_leaders_spread_over_the_voters() {
        assert_eq!(preferred_leader(0, &[3, 1, 2]), Some(1));
        assert_eq!(preferred_leader(1, &[3, 1, 2]), Some(2));
        assert_eq!(preferred_leader(5, &[3, 1, 2]), Some(3));
        assert_eq!(preferred_leader(7, &[4]), Some(4));
        assert_eq!(preferred_leader(0, &[]), None);
    }

    #[test]
    fn replicas_spread_and_every_shard_has_its_count() {
        let s = spec(3, 6, 3);
        let mut per_broker = [0; 3];
        for shard in 0..6 {
            let r = s.replicas_of(shard);
            assert_eq!(r.len(), 3);
            for id in r {
                per_broker[id as usize - 1] += 1;
            }
        }
        assert_eq!(per_broker, [6, 6, 6]);
        let s = spec(5, 5, 3);
        assert_eq!(s.replicas_of(0), vec![1, 2, 3]);
        assert_eq!(s.replicas_of(4), vec![5, 1, 2]);
        assert_eq!(s.client_addrs(4)[..3], ["c5", "c1", "c2"]);
        assert_eq!(s.client_addrs(4).len(), 5);
        // More replicas asked than brokers: capped.
        assert_eq!(spec(2, 1, 3).replicas_of(0).len(), 2);
    }
}
