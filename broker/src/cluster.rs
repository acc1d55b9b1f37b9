//! A broker process in a cluster: the replicas of the shards placed on it, the Raft transport
//! they share, and the router-facing service of each shard it leads.
//!
//! Placement of replicas: shard `s` has its replicas on the brokers at positions
//! `s, s+1, …, s+r-1` (mod n) of the sorted broker ids, so leaders and load spread evenly and
//! every broker computes the same map from the same configuration.
//!
//! A shard's service takes router connections only while this replica leads: before it does,
//! it makes sure the new term can commit and numbers its connections above any id a previous
//! leader used. The consumers recorded in the state belonged to connections of the previous
//! leader: their routers resume them within [`crate::remote::RESUME_GRACE`], or they are
//! detached (their unacknowledged messages return to the queues). When
//! leadership moves away, its router connections are closed; routers then ask another broker,
//! which answers with the leader's address.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::ServerState;
use openraft::rt::WatchReceiver;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::net::{NetFactory, Peers, Registry};
use crate::node::{NodeOptions, ShardHandle, ShardNode};
use crate::raft::NodeAddr;
use crate::remote::{ShardService, read_hello, refuse};
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

/// Runs broker `me` of `spec` until `shutdown`; shard data under `dir/shard-N`.
pub async fn run(
    spec: ClusterSpec,
    me: u64,
    dir: &Path,
    opts: NodeOptions,
    listeners: Listeners,
    ready: impl FnOnce(),
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let Listeners { raft, client } = listeners;
    let registry = Registry::default();
    let peers = Peers::default();
    let server = tokio::spawn(crate::net::serve(raft, registry.clone()));
    let mut hosted: HashMap<u32, Arc<Hosted>> = HashMap::new();
    for shard in 0..spec.shards {
        let replicas = spec.replicas_of(shard);
        if !replicas.contains(&me) {
            continue;
        }
        let members: BTreeMap<u64, NodeAddr> = replicas
            .iter()
            .filter_map(|id| {
                spec.brokers.get(id).map(|b| {
                    (
                        *id,
                        NodeAddr {
                            addr: b.raft.clone(),
                        },
                    )
                })
            })
            .collect();
        let net = NetFactory {
            shard,
            peers: peers.clone(),
        };
        let node =
            ShardNode::open_replica(&dir.join(format!("shard-{shard}")), me, members, net, opts)
                .await
                .map_err(io::Error::other)?;
        let handle = node.handle();
        registry.insert(shard, handle.raft());
        let leading = Arc::new(AtomicBool::new(false));
        let h = Arc::new(Hosted {
            handle,
            service: ShardService::start_replica(node, leading.clone()),
            leading,
        });
        tokio::spawn(follow_leadership(shard, h.clone()));
        hosted.insert(shard, h);
    }
    ready();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = client.accept() => {
                let (mut sock, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                let shard = match read_hello(&mut sock).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("router {peer}: {e}");
                        continue;
                    }
                };
                match hosted.get(&shard) {
                    Some(h) if h.leading.load(Ordering::Acquire) => {
                        h.service.attach(sock, peer.to_string());
                    }
                    other => {
                        // Point the router at the leader, if this broker knows it.
                        let leader = match other {
                            Some(h) => h.handle.leader().await,
                            None => None,
                        };
                        let hint = leader
                            .and_then(|id| spec.brokers.get(&id))
                            .map(|b| b.client.clone());
                        tokio::spawn(refuse(sock, hint));
                    }
                }
            }
        }
    }
    server.abort();
    for (shard, h) in hosted {
        registry.remove(shard);
        if let Ok(h) = Arc::try_unwrap(h) {
            h.service.stop().await;
            let _ = h.handle.raft().shutdown().await;
        }
    }
    Ok(())
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
