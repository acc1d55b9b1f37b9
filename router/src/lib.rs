//! `enmesh-router`: the stateless AMQP 1.0 router.
//!
//! It owns the listener and one task per connection ([`conn`]), the routing core that holds the
//! address table, link routing state and deliveries in flight ([`core`]), address rules
//! ([`addresses`]), configuration ([`config`]) and the management HTTP API ([`http`]).
//! The router itself stores nothing durably: queue and topic addresses go to a broker shard
//! (`broker::service`) when the process runs one.
#![forbid(unsafe_code)]

pub mod addresses;
pub mod config;
pub mod conn;
pub mod core;
pub mod http;
pub mod local;
pub mod placement;
pub mod remote_store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use amqp::{ErrorCondition, condition};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::addresses::Rules;
use crate::config::Config;
use crate::conn::Shared;
use crate::core::{Core, Mgmt, ToCore};

/// Opens the broker shard in `dir` and starts its service; its deliveries and completions are
/// forwarded to the core.
async fn start_store(
    dir: &std::path::Path,
    section: &crate::config::BrokerSection,
    core: mpsc::Sender<Vec<ToCore>>,
) -> std::io::Result<mpsc::UnboundedSender<broker::service::Request>> {
    let node = broker::node::ShardNode::open_with(
        dir,
        section.node_id,
        broker::service::now_ms(),
        section.node_options(),
    )
    .await
    .map_err(std::io::Error::other)?;
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (dl_tx, mut dl_rx) = mpsc::unbounded_channel();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    tokio::spawn(broker::service::run(node, req_rx, dl_tx, done_tx));
    tokio::spawn(async move {
        loop {
            let m = tokio::select! {
                Some(d) = dl_rx.recv() => ToCore::StoreDeliveries(d),
                Some(c) = done_rx.recv() => ToCore::Stored(c),
                else => break,
            };
            if core.send(vec![m]).await.is_err() {
                break;
            }
        }
    });
    Ok(req_tx)
}

/// What standalone's MQTT gateway uses of the router in its process: an in-process AMQP
/// listener ([`amqp::pipe`]) served like the TCP one, the management API without HTTP, and
/// the core itself for connections in typed messages ([`local`]).
#[derive(Default)]
pub struct Local {
    pub amqp: Option<amqp::pipe::Accepted>,
    /// Given the management API once the router runs.
    pub api: Option<watch::Sender<Option<http::Api>>>,
    /// Given the core's channel once the router runs.
    pub core: Option<watch::Sender<Option<local::Core>>>,
}

/// The next pipe from an in-process listener (never, without one).
async fn accept_local(l: &mut Option<amqp::pipe::Accepted>) -> tokio::io::DuplexStream {
    match l {
        Some(rx) => match rx.recv().await {
            Some(s) => s,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Serves AMQP on `listener` (and `local`'s in-process listener) and HTTP on `http` until
/// `shutdown` turns true; then closes every connection with `amqp:connection:forced`
/// and returns.
/// `ready` is called once the broker shard (if any) is open and connections are about to be
/// accepted.
pub async fn run(
    config: Config,
    listener: TcpListener,
    http: TcpListener,
    local: Local,
    mut shutdown: watch::Receiver<bool>,
    ready: impl FnOnce(),
) -> std::io::Result<()> {
    let rules = Rules::new(&config.addresses, config.router.default_address_type);
    // Bounded: connection tasks wait (and stop reading) when the core is behind.
    let (core_tx, core_rx) = mpsc::channel(1024);
    let shards = match (
        &config.broker.data_dir,
        &config.broker.url,
        &config.broker.cluster,
    ) {
        (Some(dir), _, _) => vec![start_store(dir, &config.broker, core_tx.clone()).await?],
        (None, Some(url), _) => vec![
            remote_store::connect(
                vec![url.clone()],
                0,
                core_tx.clone(),
                Duration::from_secs(10),
            )
            .await?,
        ],
        (None, None, Some(cluster)) => {
            // One connection per shard, to its leader (followed as leadership moves).
            let spec = cluster.spec();
            let mut v = Vec::new();
            for shard in 0..spec.shards {
                v.push(
                    remote_store::connect(
                        spec.client_addrs(shard),
                        shard,
                        core_tx.clone(),
                        Duration::from_secs(30),
                    )
                    .await?,
                );
            }
            v
        }
        (None, None, None) => Vec::new(),
    };
    let store = (!shards.is_empty())
        .then(|| placement::Placement::new(shards, config.broker.placement.clone()));
    let core = Core::new(config.router.limits.clone(), rules, store);
    let core_task = tokio::spawn(core.run(core_rx));
    let users = (!config.router.users.is_empty())
        .then(|| config.router.users.clone().into_iter().collect());
    let shared = Arc::new(Shared {
        router_id: config.router.id.clone(),
        limits: config.router.limits.clone(),
        users,
        core: core_tx.clone(),
    });
    let api = http::Api {
        core: core_tx.clone(),
    };
    let mut http_shutdown = shutdown.clone();
    // Kept (not dropped) while the router runs.
    let local_api = local.api;
    if let Some(tx) = &local_api {
        let _ = tx.send(Some(api.clone()));
    }
    let local_core = local.core;
    if let Some(tx) = &local_core {
        let _ = tx.send(Some(local::Core {
            core: core_tx.clone(),
            budget: config.router.limits.connection_buffer_bytes,
        }));
    }
    let http_task = tokio::spawn(async move {
        let _ = axum::serve(http, http::app(api))
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|v| *v).await;
            })
            .await;
    });
    let mut local_amqp = local.amqp;
    let active = Arc::new(AtomicUsize::new(0));
    let next_id = AtomicU64::new(1);
    let (conn_shutdown_tx, conn_shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // Each connection's task, on either kind of listener.
    let spawn = |tasks: &mut tokio::task::JoinSet<()>, sock, peer: String| {
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let n = active.fetch_add(1, Ordering::AcqRel) + 1;
        let refuse = (n > config.router.limits.max_connections).then(|| {
            ErrorCondition::new(
                condition::RESOURCE_LIMIT_EXCEEDED,
                format!(
                    "at most {} connections",
                    config.router.limits.max_connections
                ),
            )
        });
        let shared = shared.clone();
        let active = active.clone();
        let rx = conn_shutdown_rx.clone();
        tasks.spawn(async move {
            conn::run(sock, id, peer, shared, rx, refuse).await;
            active.fetch_sub(1, Ordering::AcqRel);
        });
    };
    ready();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (sock, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and similar: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = sock.set_nodelay(true);
                spawn(&mut tasks, amqp::pipe::Stream::Tcp(sock), peer.to_string());
            }
            sock = accept_local(&mut local_amqp) => {
                spawn(&mut tasks, amqp::pipe::Stream::Local(sock), "in-process".to_owned());
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.wait_for(|v| *v) => break,
        }
    }
    drop(listener);
    let _ = core_tx
        .send(vec![ToCore::Mgmt(Mgmt::Shutdown(ErrorCondition::new(
            condition::CONNECTION_FORCED,
            "router shutting down",
        )))])
        .await;
    let _ = conn_shutdown_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    drop(shared);
    drop(core_tx);
    let _ = http_task.await;
    drop(local_api);
    drop(local_core);
    core_task.abort();
    Ok(())
}
