//! Management over HTTP (axum): health, readiness, Prometheus metrics and the JSON API for
//! connections, links and addresses. Every request is answered from a snapshot the core
//! takes, so the HTTP side holds no routing state of its own.

use std::fmt::Write as _;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::config::AddressDecl;
use crate::core::{Mgmt, Snapshot, ToCore};

#[derive(Clone)]
pub struct Api {
    pub core: mpsc::Sender<Vec<ToCore>>,
}

impl Api {
    /// Sends a management request to the core and waits for its answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Mgmt,
    ) -> Result<T, StatusCode> {
        let (tx, rx) = oneshot::channel();
        self.core
            .send(vec![ToCore::Mgmt(make(tx))])
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
        rx.await.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
    }

    /// The queues under `prefix` (filtered in the shards: a device's CONNECT asks for its own
    /// few among tens of thousands).
    pub async fn queues(
        &self,
        prefix: String,
    ) -> Result<Vec<broker::shard::QueueInfo>, StatusCode> {
        self.ask(|tx| Mgmt::Queues(prefix, tx)).await
    }

    /// Removes the ready messages of queue `name`; false when no broker shard is served.
    pub async fn purge(&self, name: String) -> Result<bool, StatusCode> {
        self.ask(|tx| Mgmt::Purge(name, tx)).await
    }

    async fn snapshot(&self) -> Result<Snapshot, StatusCode> {
        self.ask(Mgmt::Snapshot).await
    }
}

pub fn app(api: Api) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/connections", get(connections))
        .route("/api/v1/links", get(links))
        .route("/api/v1/addresses", get(addresses).post(create_address))
        .route("/api/v1/addresses/{*name}", delete(delete_address))
        .route("/api/v1/address-stats", get(address_stats))
        .route("/api/v1/queues", get(queues))
        .route("/api/v1/purge/{*name}", post(purge))
        .route("/api/v1/placement/{*name}", get(placement))
        .with_state(api)
}

async fn connections(State(api): State<Api>) -> Result<Response, StatusCode> {
    Ok(Json(api.snapshot().await?.connections).into_response())
}

async fn links(State(api): State<Api>) -> Result<Response, StatusCode> {
    Ok(Json(api.snapshot().await?.links).into_response())
}

/// Declared rules, each with the live statistics of its address when it names one.
async fn addresses(State(api): State<Api>) -> Result<Response, StatusCode> {
    let s = api.snapshot().await?;
    let mut out = Vec::new();
    for r in s.rules {
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        let stats = r
            .decl
            .name
            .as_ref()
            .and_then(|name| s.addresses.iter().find(|a| &a.address == name));
        if let (Some(st), Some(obj)) = (stats, v.as_object_mut()) {
            obj.insert("stats".into(), serde_json::to_value(st).unwrap_or_default());
        }
        out.push(v);
    }
    Ok(Json(out).into_response())
}

/// Statistics of every address in use, declared or not.
async fn address_stats(State(api): State<Api>) -> Result<Response, StatusCode> {
    Ok(Json(api.snapshot().await?.addresses).into_response())
}

fn queue_json(q: &broker::shard::QueueInfo) -> serde_json::Value {
    serde_json::json!({
        "address": q.address,
        "shard": q.shard,
        "depth": q.depth,
        "ready": q.ready,
        "consumers": q.consumers,
        "enqueued": q.enqueued,
        "acknowledged": q.acknowledged,
        "expired": q.expired,
        "dead_lettered": q.dead_lettered,
        "redelivered": q.redelivered,
    })
}

/// `?prefix=P` keeps the queues whose address starts with P.
#[derive(serde::Deserialize)]
struct QueueQuery {
    prefix: Option<String>,
}

/// Queues held by the broker shard (subscriptions appear as `$sub:NAME`).
async fn queues(
    State(api): State<Api>,
    axum::extract::Query(q): axum::extract::Query<QueueQuery>,
) -> Result<Response, StatusCode> {
    let prefix = q.prefix.unwrap_or_default();
    let list: Vec<serde_json::Value> = api.queues(prefix).await?.iter().map(queue_json).collect();
    Ok(Json(list).into_response())
}

/// Removes the ready messages of a queue.
async fn purge(State(api): State<Api>, Path(name): Path<String>) -> Result<StatusCode, StatusCode> {
    Ok(if api.purge(name).await? {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    })
}

/// Where an address lives: its type and, for brokered addresses, the shard serving it.
async fn placement(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, StatusCode> {
    let (kind, shard, shards) = api.ask(|tx| Mgmt::Placement(name.clone(), tx)).await?;
    Ok(Json(serde_json::json!({
        "address": name,
        "type": kind.as_str(),
        "shard": shard,
        "shards": shards,
    })))
}

async fn create_address(
    State(api): State<Api>,
    Json(decl): Json<AddressDecl>,
) -> Result<Response, StatusCode> {
    Ok(match api.ask(|tx| Mgmt::AddAddress(decl, tx)).await? {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    })
}

async fn delete_address(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<StatusCode, StatusCode> {
    Ok(if api.ask(|tx| Mgmt::RemoveAddress(name, tx)).await? {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    })
}

type Labels = Vec<(String, String)>;

/// A metric family of the broker's queues: name, help, is a counter, value.
type QueueMetric = (
    &'static str,
    &'static str,
    bool,
    fn(&broker::shard::QueueInfo) -> u64,
);

/// A metric family derived from per-address statistics: name, help, value.
type AddressMetric = (
    &'static str,
    &'static str,
    fn(&crate::core::AddressStats) -> u64,
);

async fn metrics(State(api): State<Api>) -> Result<Response, StatusCode> {
    let s = api.snapshot().await?;
    let mut reg = Registry::default();
    let conns = Gauge::<i64>::default();
    conns.set(s.connections.len() as i64);
    reg.register("enmesh_connections", "Open AMQP connections", conns);
    let links = Family::<Labels, Gauge<i64>>::default();
    for role in ["sender", "receiver"] {
        let n = s.links.iter().filter(|l| l.role == role).count();
        links
            .get_or_create(&vec![("role".into(), role.into())])
            .set(n as i64);
    }
    reg.register("enmesh_links", "Attached links by client role", links);
    let counters: [AddressMetric; 7] = [
        (
            "enmesh_deliveries_in",
            "Deliveries received from producers",
            |a| a.counters.deliveries_in,
        ),
        (
            "enmesh_deliveries_out",
            "Deliveries sent to consumers",
            |a| a.counters.deliveries_out,
        ),
        ("enmesh_accepted", "Deliveries accepted by consumers", |a| {
            a.counters.accepted
        }),
        ("enmesh_rejected", "Deliveries rejected by consumers", |a| {
            a.counters.rejected
        }),
        (
            "enmesh_released",
            "Deliveries released back to producers",
            |a| a.counters.released,
        ),
        ("enmesh_modified", "Deliveries returned as modified", |a| {
            a.counters.modified
        }),
        (
            "enmesh_dropped",
            "Multicast copies dropped for slow consumers",
            |a| a.counters.dropped,
        ),
    ];
    for (name, help, f) in counters {
        let fam = Family::<Labels, Counter>::default();
        for a in &s.addresses {
            fam.get_or_create(&vec![("address".into(), a.address.clone())])
                .inc_by(f(a));
        }
        reg.register(name, help, fam);
    }
    let gauges: [AddressMetric; 4] = [
        (
            "enmesh_unsettled",
            "Deliveries forwarded and not yet settled",
            |a| a.counters.unsettled,
        ),
        (
            "enmesh_pending",
            "Deliveries waiting for consumer credit",
            |a| a.pending as u64,
        ),
        ("enmesh_consumers", "Consumer links", |a| a.consumers as u64),
        ("enmesh_producers", "Producer links", |a| a.producers as u64),
    ];
    for (name, help, f) in gauges {
        let fam = Family::<Labels, Gauge<i64>>::default();
        for a in &s.addresses {
            fam.get_or_create(&vec![("address".into(), a.address.clone())])
                .set(f(a) as i64);
        }
        reg.register(name, help, fam);
    }
    let queues = api.queues(String::new()).await?;
    let queue_metrics: [QueueMetric; 7] = [
        (
            "enmesh_queue_depth",
            "Messages held by a queue (ready and unacknowledged)",
            false,
            |q| q.depth as u64,
        ),
        (
            "enmesh_queue_consumers",
            "Consumers of a queue",
            false,
            |q| q.consumers as u64,
        ),
        (
            "enmesh_queue_enqueued",
            "Messages stored in a queue",
            true,
            |q| q.enqueued,
        ),
        (
            "enmesh_queue_acknowledged",
            "Messages acknowledged by consumers",
            true,
            |q| q.acknowledged,
        ),
        ("enmesh_queue_expired", "Messages expired", true, |q| {
            q.expired
        }),
        (
            "enmesh_queue_dead_lettered",
            "Messages dead-lettered",
            true,
            |q| q.dead_lettered,
        ),
        (
            "enmesh_queue_redelivered",
            "Messages returned for redelivery",
            true,
            |q| q.redelivered,
        ),
    ];
    for (name, help, counter, f) in queue_metrics {
        if counter {
            let fam = Family::<Labels, Counter>::default();
            for q in &queues {
                fam.get_or_create(&vec![("queue".into(), q.address.clone())])
                    .inc_by(f(q));
            }
            reg.register(name, help, fam);
        } else {
            let fam = Family::<Labels, Gauge<i64>>::default();
            for q in &queues {
                fam.get_or_create(&vec![("queue".into(), q.address.clone())])
                    .set(f(q) as i64);
            }
            reg.register(name, help, fam);
        }
    }
    let mut text = String::new();
    encode(&mut text, &reg).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let _ = writeln!(text);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
