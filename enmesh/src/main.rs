//! The `enmesh` binary: servers (`standalone`, `router`) and client commands (`send`,
//! `receive`, `address`). A thin shell over the crates; configuration errors exit with 64.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use amqp::client::Client;
use amqp::{DeliveryState, Event};
use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use router::config::{AddressDecl, AddressType, Config};

#[derive(Parser)]
#[command(
    name = "enmesh",
    version,
    about = "Enmesh messaging: router, broker, gateway and clients"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything in one process with local data: the router and one broker shard (data in
    /// `--data`, default ./enmesh-data).
    Standalone(ServerArgs),
    /// An AMQP 1.0 router (with a broker shard only if the config names a data directory;
    /// with `broker.url` it forwards brokered addresses to a remote `enmesh broker`).
    Router(ServerArgs),
    /// A broker shard as its own process, serving routers (`broker.url`) on `--listen`
    /// (default 127.0.0.1:5800); data in `--data` (default ./enmesh-data).
    Broker(ServerArgs),
    /// The MQTT gateway on its own: MQTT 3.1.1 / 5 devices on `--listen` (default
    /// 127.0.0.1:1883), bridged to the router at `--router` (default `mqtt.router`).
    MqttGateway {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        router: Option<String>,
        /// The router's management HTTP address (persistent sessions; default
        /// `mqtt.router_http`).
        #[arg(long)]
        router_http: Option<String>,
        /// MQTT over WebSocket listen address (default `mqtt.ws_listen`, off if unset).
        #[arg(long)]
        ws: Option<SocketAddr>,
    },
    /// Send messages to an address.
    Send {
        #[arg(long, default_value = "amqp://127.0.0.1:5672")]
        url: String,
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value = "hello")]
        body: String,
        /// Send presettled (at most once) instead of waiting for each outcome.
        #[arg(long)]
        presettled: bool,
    },
    /// Receive messages from an address and print their bodies, one per line.
    Receive {
        #[arg(long, default_value = "amqp://127.0.0.1:5672")]
        url: String,
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Give up after this many seconds without a message (0: wait forever).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
    },
    /// Manage declared addresses through the HTTP API.
    Address {
        #[command(subcommand)]
        op: AddressOp,
        #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
        http: String,
    },
    /// Inspect and purge the broker's queues through the HTTP API.
    Queue {
        #[command(subcommand)]
        op: QueueOp,
        #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
        http: String,
    },
    /// Manage a broker cluster's membership (the brokers of `broker.cluster` in `--config`,
    /// including any being added).
    Cluster {
        #[command(subcommand)]
        op: ClusterOp,
        /// The cluster's configuration (required).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterOp {
    /// Every reachable broker's replicas: leader, voters, learners, last applied entry.
    Status,
    /// Move shard `shard`'s replica from broker `from` to broker `to` (add `to` as a learner,
    /// wait until it has caught up, make it a voter, remove `from`, delete its copy).
    Move {
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
    },
    /// Move every replica off broker `broker` (to the brokers holding the fewest), so that it
    /// can be removed. Works with the broker down too (its copies are then left on its disk).
    Drain {
        #[arg(long)]
        broker: u64,
    },
    /// Hand the leadership of `shard` to broker `to` (one of its voters), e.g. before taking
    /// the current leader down for maintenance. Clients notice nothing.
    Lead {
        #[arg(long)]
        shard: u32,
        #[arg(long)]
        to: u64,
    },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// YAML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// AMQP listen address (overrides the config).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP management listen address (overrides the config).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Directory of the broker shard's data (overrides the config).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Standalone: MQTT listen address (overrides `mqtt.listen`, default 127.0.0.1:1883).
    #[arg(long)]
    mqtt: Option<SocketAddr>,
    /// Standalone: MQTT over WebSocket listen address (overrides `mqtt.ws_listen`; off unless
    /// one of them is given).
    #[arg(long)]
    mqtt_ws: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum AddressOp {
    List,
    Create {
        name: String,
        #[arg(long, value_enum, default_value = "anycast")]
        r#type: TypeArg,
        /// Declare a prefix rather than one exact address.
        #[arg(long, conflicts_with = "pattern")]
        prefix: bool,
        /// Declare a pattern ('*' one segment, '#' any number; separator '/').
        #[arg(long)]
        pattern: bool,
        /// Queue policy: dead-letter address for rejected messages and those out of attempts.
        #[arg(long)]
        dead_letter: Option<String>,
        /// Queue policy: delivery attempts before dead-lettering.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Queue policy: upper bound on message time to live, in ms.
        #[arg(long)]
        max_ttl_ms: Option<u64>,
        /// Queue policy: where expired messages go (dropped when unset).
        #[arg(long)]
        expiry_address: Option<String>,
        /// Subscription addresses: the topic filter the subscription collects from.
        #[arg(long)]
        topic: Option<String>,
        /// Queue: keep messages in memory only (not durable, lost on restart).
        #[arg(long)]
        in_memory: bool,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum QueueOp {
    /// Depth, consumers and counters of every queue.
    List,
    /// Remove the ready messages of a queue.
    Purge { name: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TypeArg {
    Anycast,
    Multicast,
    Queue,
    Topic,
    Subscription,
}

impl From<TypeArg> for AddressType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::Anycast => AddressType::Anycast,
            TypeArg::Multicast => AddressType::Multicast,
            TypeArg::Queue => AddressType::Queue,
            TypeArg::Topic => AddressType::Topic,
            TypeArg::Subscription => AddressType::Subscription,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if matches!(
        cli.cmd,
        Cmd::Standalone(_) | Cmd::Router(_) | Cmd::Broker(_) | Cmd::MqttGateway { .. }
    ) {
        // Before the runtime's threads exist (see `prepare_fds`).
        prepare_fds();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("enmesh: cannot start runtime: {e}");
            return ExitCode::from(70);
        }
    };
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Standalone(a) => serve(a, true).await,
            Cmd::MqttGateway {
                config,
                listen,
                router,
                router_http,
                ws,
            } => serve_gateway(config, listen, router, router_http, ws).await,
            Cmd::Router(a) => serve(a, false).await,
            Cmd::Broker(a) => serve_broker(a).await,
            Cmd::Send {
                url,
                address,
                count,
                body,
                presettled,
            } => send(&url, &address, count, &body, presettled).await,
            Cmd::Receive {
                url,
                address,
                count,
                timeout,
            } => receive(&url, &address, count, timeout).await,
            Cmd::Address { op, http } => address_cmd(op, &http).await,
            Cmd::Queue { op, http } => queue_cmd(op, &http).await,
            Cmd::Cluster { op, config } => match config {
                Some(c) => cluster_cmd(op, &c).await,
                None => Err(anyhow::anyhow!("--config is required")),
            },
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enmesh: {e:#}");
            if e.downcast_ref::<router::config::ConfigError>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Lets a server hold many connections: raises the soft descriptor limit to the hard one, and
/// grows the kernel's descriptor table to that size (at most [`FD_TABLE_MAX`]) while the
/// process has a single thread.
///
/// Why the table: it doubles as descriptors are taken (at 1,024, 2,048, … connections), and in
/// a process with several threads each doubling waits for an RCU grace period inside
/// `accept` (`expand_files` → `synchronize_rcu`): measured here, 10–36 ms during which the
/// accepting worker thread and every task queued on it stand still. A single-threaded process
/// skips that wait, so the table is grown once, here, by taking a descriptor near the top and
/// dropping it (the table never shrinks). It costs the kernel 8 bytes per slot.
fn prepare_fds() {
    let limit = match rlimit::Resource::NOFILE.get() {
        Ok((_, hard)) => {
            let _ = rlimit::Resource::NOFILE.set(hard, hard);
            rlimit::Resource::NOFILE.get().map_or(0, |(soft, _)| soft)
        }
        Err(_) => 0,
    };
    let top = limit.min(FD_TABLE_MAX);
    if top > 1024 {
        // Cannot fail in a way that matters: without it, the table grows as before.
        let _ = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), (top - 1) as i32);
    }
}

/// The descriptor table grown at start covers at most this many (512 KiB of kernel memory).
const FD_TABLE_MAX: u64 = 1 << 16;

async fn serve(a: ServerArgs, standalone: bool) -> anyhow::Result<()> {
    let mut config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(l) = a.listen {
        config.router.listen = l;
    }
    if let Some(h) = a.http {
        config.router.http = h;
    }
    if let Some(d) = a.data {
        config.broker.data_dir = Some(d);
    } else if standalone && config.broker.data_dir.is_none() {
        config.broker.data_dir = Some(PathBuf::from("enmesh-data"));
    }
    // Standalone serves MQTT too: bound first, so that its topic prefix can be declared.
    let mqtt = if standalone && config.mqtt.enabled {
        let explicit =
            a.mqtt.is_some() || config.mqtt.listen != router::config::MqttSection::default().listen;
        let at = a.mqtt.unwrap_or(config.mqtt.listen);
        match tokio::net::TcpListener::bind(at).await {
            Ok(l) => {
                declare_mqtt_topics(&mut config);
                Some(l)
            }
            // The default port taken (another broker, another Enmesh): go on without MQTT.
            Err(e) if !explicit => {
                tracing::warn!("MQTT not served: cannot listen on {at}: {e}");
                None
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {at}")),
        }
    } else {
        None
    };
    let listener = listen(config.router.listen)
        .with_context(|| format!("cannot listen on {}", config.router.listen))?;
    let http = tokio::net::TcpListener::bind(config.router.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.router.http))?;
    // Installed before anything is announced, so an early SIGTERM is clean too.
    let rx = shutdown_on_signal()?;
    let mut local = router::Local::default();
    if let Some(m) = mqtt {
        // The gateway's connections go straight to this process's router core in its own
        // typed messages (no AMQP encoding, decoding, socket pair or pipe), and it asks its
        // management questions by direct calls (no HTTP request and JSON answer per device).
        let (core_tx, core_rx) = tokio::sync::watch::channel(None);
        let (api_tx, api_rx) = tokio::sync::watch::channel(None);
        local.core = Some(core_tx);
        local.api = Some(api_tx);
        println!("enmesh mqtt listening mqtt={}", m.local_addr()?);
        let ws = bind_ws(a.mqtt_ws.or(config.mqtt.ws_listen)).await?;
        let api = mqtt_gateway::mgmt::RouterApi::direct(InProcess(api_rx));
        let cfg = gateway_config(
            &config.mqtt,
            mqtt_gateway::mux::Upstream::Core(core_rx),
            api,
        );
        tokio::spawn(mqtt_gateway::server::serve(
            m,
            ws,
            std::sync::Arc::new(cfg),
            rx.clone(),
        ));
    }
    let ready_line = format!(
        "enmesh ready amqp={} http={}",
        listener.local_addr()?,
        http.local_addr()?
    );
    // Announced only once the broker shard is open and connections are being accepted.
    router::run(config, listener, http, local, rx, move || {
        println!("{ready_line}")
    })
    .await?;
    Ok(())
}

/// Binds the MQTT-over-WebSocket listener, if one is asked for, and says where it listens.
async fn bind_ws(at: Option<SocketAddr>) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(at) = at else { return Ok(None) };
    let l = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("cannot listen on {at}"))?;
    println!("enmesh mqtt-ws listening ws={}", l.local_addr()?);
    Ok(Some(l))
}

/// A receiver that turns true on SIGTERM or Ctrl-C.
fn shutdown_on_signal() -> std::io::Result<tokio::sync::watch::Receiver<bool>> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Declares the MQTT topic prefix a topic address and the retained-message prefix a queue
/// prefix, unless the configuration declares them already.
fn declare_mqtt_topics(config: &mut Config) {
    let topics = config.mqtt.topic_prefix.clone();
    let retained = config.mqtt.retained_prefix.clone();
    for (prefix, kind) in [
        (topics, router::config::AddressType::Topic),
        (retained, router::config::AddressType::Queue),
    ] {
        if prefix.is_empty()
            || config
                .addresses
                .iter()
                .any(|a| a.prefix.as_deref() == Some(&prefix) || a.name.as_deref() == Some(&prefix))
        {
            continue;
        }
        config.addresses.push(router::config::AddressDecl {
            name: None,
            prefix: Some(prefix),
            pattern: None,
            kind,
            dead_letter: None,
            max_delivery_attempts: None,
            max_ttl_ms: None,
            durable: None,
            expiry_address: None,
            topic: None,
        });
    }
}

/// The standalone gateway's management calls, made straight to the router in this process
/// (its API is given once the router runs).
struct InProcess(tokio::sync::watch::Receiver<Option<router::http::Api>>);

impl InProcess {
    fn api(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<router::http::Api>> + Send + 'static
    {
        let mut rx = self.0.clone();
        async move {
            let api = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| std::io::Error::other("the router is gone"))?;
            api.clone()
                .ok_or_else(|| std::io::Error::other("the router is gone"))
        }
    }
}

fn unavailable(s: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("router: {s}"))
}

impl mqtt_gateway::mgmt::Direct for InProcess {
    fn queues(
        &self,
        prefix: String,
    ) -> mqtt_gateway::mgmt::BoxFuture<std::io::Result<Vec<mqtt_gateway::mgmt::Queue>>> {
        let api = self.api();
        Box::pin(async move {
            let list = api.await?.queues(prefix).await.map_err(unavailable)?;
            Ok(list
                .into_iter()
                .map(|q| mqtt_gateway::mgmt::Queue {
                    address: q.address,
                    depth: q.depth as u64,
                })
                .collect())
        })
    }

    fn purge(&self, address: String) -> mqtt_gateway::mgmt::BoxFuture<std::io::Result<()>> {
        let api = self.api();
        Box::pin(async move {
            if api.await?.purge(address).await.map_err(unavailable)? {
                Ok(())
            } else {
                Err(std::io::Error::other("no broker shard to purge in"))
            }
        })
    }
}

fn gateway_config(
    m: &router::config::MqttSection,
    router: mqtt_gateway::mux::Upstream,
    api: mqtt_gateway::mgmt::RouterApi,
) -> mqtt_gateway::server::Config {
    mqtt_gateway::server::Config {
        router,
        router_http: Some(std::sync::Arc::new(api)),
        topic_prefix: m.topic_prefix.clone(),
        max_packet_size: m.max_packet_size as usize,
        max_connections: m.max_connections,
        inflight: m.inflight,
        max_publish_rate: m.max_publish_rate,
        retained_prefix: (!m.retained_prefix.is_empty()).then(|| m.retained_prefix.clone()),
        devices_per_connection: m.devices_per_connection,
        ..mqtt_gateway::server::Config::default()
    }
}

/// `enmesh mqtt-gateway`: the gateway alone, in front of a router.
async fn serve_gateway(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    router: Option<String>,
    router_http: Option<String>,
    ws: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let config = match &config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let at = listen.unwrap_or(config.mqtt.listen);
    let l = tokio::net::TcpListener::bind(at)
        .await
        .with_context(|| format!("cannot listen on {at}"))?;
    let router = router.unwrap_or_else(|| config.mqtt.router.clone());
    // Installed before anything is announced, so an early SIGTERM is clean too.
    let rx = shutdown_on_signal()?;
    println!(
        "enmesh mqtt-gateway ready mqtt={} router={router}",
        l.local_addr()?
    );
    let ws = bind_ws(ws.or(config.mqtt.ws_listen)).await?;
    let http = router_http.unwrap_or_else(|| config.mqtt.router_http.clone());
    let cfg = gateway_config(
        &config.mqtt,
        amqp::pipe::Dialer::Tcp(router).into(),
        mqtt_gateway::mgmt::RouterApi::new(http),
    );
    mqtt_gateway::server::serve(l, ws, std::sync::Arc::new(cfg), rx).await?;
    Ok(())
}

/// `enmesh broker`: one shard, served to routers over the broker protocol.
async fn serve_broker(a: ServerArgs) -> anyhow::Result<()> {
    let mut config = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(l) = a.listen {
        config.broker.listen = l;
    }
    let dir = a
        .data
        .or(config.broker.data_dir.clone())
        .unwrap_or_else(|| PathBuf::from("enmesh-data"));
    if let Some(cluster) = config.broker.cluster.clone() {
        return serve_cluster_broker(cluster, a.listen, &dir, config.broker.node_options()).await;
    }
    let listener = tokio::net::TcpListener::bind(config.broker.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.broker.listen))?;
    let node = broker::node::ShardNode::open_with(
        &dir,
        config.broker.node_id,
        broker::service::now_ms(),
        config.broker.node_options(),
    )
    .await
    .with_context(|| format!("cannot open the shard in {}", dir.display()))?;
    // Installed before anything is announced, so an early SIGTERM is clean too.
    let rx = shutdown_on_signal()?;
    println!("enmesh broker ready listen={}", listener.local_addr()?);
    broker::remote::serve(node, listener, rx).await?;
    Ok(())
}

fn cluster_spec(config: &std::path::Path) -> anyhow::Result<broker::cluster::ClusterSpec> {
    let cfg = Config::load(config)?;
    Ok(cfg
        .broker
        .cluster
        .context("the configuration has no broker.cluster section")?
        .spec())
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends an admin request to one broker; its answer's text, or why it failed.
async fn admin_at(addr: &str, a: broker::remote::Admin) -> anyhow::Result<String> {
    match broker::remote::admin(addr, a, ADMIN_TIMEOUT).await? {
        broker::remote::ToRouter::Admin { ok: true, text, .. } => Ok(text),
        broker::remote::ToRouter::Admin { text, .. } => bail!("{addr}: {text}"),
        _ => bail!("{addr}: unexpected answer"),
    }
}

/// Sends an admin request to the leader of its shard: tries every broker, follows leader
/// hints, and retries for a while (an election may be under way).
async fn admin_at_leader(
    spec: &broker::cluster::ClusterSpec,
    a: broker::remote::Admin,
) -> anyhow::Result<String> {
    let addrs: Vec<String> = spec.brokers.values().map(|b| b.client.clone()).collect();
    let mut last = String::new();
    let mut hint: Option<String> = None;
    for round in 0..60 {
        let mut tries: Vec<String> = hint.take().into_iter().collect();
        tries.extend(addrs.iter().cloned());
        for addr in tries {
            match broker::remote::admin(&addr, a.clone(), ADMIN_TIMEOUT).await {
                Ok(broker::remote::ToRouter::Admin { ok: true, text, .. }) => return Ok(text),
                Ok(broker::remote::ToRouter::Admin { text, leader, .. }) => {
                    last = format!("{addr}: {text}");
                    if let Some(l) = leader {
                        hint = Some(l);
                        break;
                    }
                }
                Ok(_) => last = format!("{addr}: unexpected answer"),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        if round > 0 || hint.is_none() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    bail!("no leader took the request: {last}")
}

/// Every reachable broker's status (parsed).
async fn cluster_status(
    spec: &broker::cluster::ClusterSpec,
) -> Vec<(u64, anyhow::Result<serde_json::Value>)> {
    let mut out = Vec::new();
    for (id, b) in &spec.brokers {
        let r = admin_at(&b.client, broker::remote::Admin::Status)
            .await
            .and_then(|t| serde_json::from_str(&t).context("bad status"));
        out.push((*id, r));
    }
    out
}

async fn move_replica(
    spec: &broker::cluster::ClusterSpec,
    shard: u32,
    from: u64,
    to: u64,
) -> anyhow::Result<()> {
    use broker::remote::Admin;
    let target = spec
        .brokers
        .get(&to)
        .with_context(|| format!("broker {to} is not in the configuration"))?;
    println!("shard {shard}: opening a replica on broker {to}");
    admin_at(&target.client, Admin::Host { shard }).await?;
    println!("shard {shard}: adding broker {to} (waits until it has caught up)");
    let text = admin_at_leader(
        spec,
        Admin::AddReplica {
            shard,
            id: to,
            raft: target.raft.clone(),
            client: target.client.clone(),
        },
    )
    .await?;
    println!("shard {shard}: {text}");
    let text = admin_at_leader(spec, Admin::RemoveReplica { shard, id: from }).await?;
    println!("shard {shard}: {text}");
    // The removed replica may have led: it steps down once the change commits.
    if let Some(b) = spec.brokers.get(&from) {
        let mut last = None;
        for _ in 0..40 {
            match admin_at(&b.client, Admin::Unhost { shard }).await {
                Ok(t) => {
                    println!("shard {shard}: {t}");
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Some(e) = last {
            println!("shard {shard}: broker {from} keeps its copy for now ({e:#})");
        }
    }
    Ok(())
}

async fn cluster_cmd(op: ClusterOp, config: &std::path::Path) -> anyhow::Result<()> {
    let spec = cluster_spec(config)?;
    match op {
        ClusterOp::Status => {
            for (id, r) in cluster_status(&spec).await {
                match r {
                    Ok(v) => println!("{v}"),
                    Err(e) => println!("{{\"broker\":{id},\"error\":{:?}}}", format!("{e:#}")),
                }
            }
            Ok(())
        }
        ClusterOp::Move { shard, from, to } => move_replica(&spec, shard, from, to).await,
        ClusterOp::Lead { shard, to } => {
            let text = admin_at_leader(&spec, broker::remote::Admin::Lead { shard, to }).await?;
            println!("shard {shard}: {text}");
            Ok(())
        }
        ClusterOp::Drain { broker } => {
            // Who holds what: voters from each shard's leader, as reported by the brokers
            // that are up; hosted counts pick the targets.
            let mut voters: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
            let mut load: std::collections::BTreeMap<u64, usize> = Default::default();
            for (id, r) in cluster_status(&spec).await {
                let Ok(v) = r else { continue };
                let shards = v["shards"].as_array().cloned().unwrap_or_default();
                load.insert(id, shards.len());
                for sh in shards {
                    let (Some(s), Some(vs)) = (sh["shard"].as_u64(), sh["voters"].as_array())
                    else {
                        continue;
                    };
                    let vs: Vec<u64> = vs.iter().filter_map(|x| x.as_u64()).collect();
                    if sh["leading"].as_bool() == Some(true) || !voters.contains_key(&s) {
                        voters.insert(s, vs);
                    }
                }
            }
            load.remove(&broker);
            for (shard, vs) in voters {
                if !vs.contains(&broker) {
                    continue;
                }
                let Some((&to, _)) = load
                    .iter()
                    .filter(|(id, _)| !vs.contains(id))
                    .min_by_key(|(_, n)| **n)
                else {
                    bail!("shard {shard}: no broker left to take broker {broker}'s replica");
                };
                let shard = u32::try_from(shard).context("bad shard number")?;
                move_replica(&spec, shard, broker, to).await?;
                *load.entry(to).or_default() += 1;
            }
            println!("broker {broker} holds no replica");
            Ok(())
        }
    }
}

/// `enmesh broker` in a cluster: the replicas placed on this broker, Raft with its peers,
/// routers served for the shards it leads.
async fn serve_cluster_broker(
    cluster: router::config::ClusterSection,
    listen: Option<SocketAddr>,
    dir: &std::path::Path,
    opts: broker::node::NodeOptions,
) -> anyhow::Result<()> {
    let me = cluster
        .node_id
        .context("broker.cluster.node_id is required for `enmesh broker`")?;
    let spec = cluster.spec();
    let mine = spec
        .brokers
        .get(&me)
        .cloned()
        .context("broker.cluster.node_id is not one of the brokers")?;
    let raft = tokio::net::TcpListener::bind(&mine.raft)
        .await
        .with_context(|| format!("cannot listen on {}", mine.raft))?;
    let client_addr = listen.map_or(mine.client.clone(), |l| l.to_string());
    let client = tokio::net::TcpListener::bind(&client_addr)
        .await
        .with_context(|| format!("cannot listen on {client_addr}"))?;
    // Installed before anything is announced, so an early SIGTERM is clean too.
    let rx = shutdown_on_signal()?;
    let line = format!(
        "enmesh broker ready listen={} raft={} node={me}",
        client.local_addr()?,
        raft.local_addr()?
    );
    let listeners = broker::cluster::Listeners { raft, client };
    broker::cluster::run(
        spec,
        me,
        cluster.join,
        cluster.balance_leaders,
        dir,
        opts,
        listeners,
        move || println!("{line}"),
        rx,
    )
    .await?;
    Ok(())
}

/// A listener with a deep accept queue: thousands of clients may connect at once (tokio's
/// default backlog is 1024; the kernel caps it at `net.core.somaxconn`).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("amqp://")
        .trim_end_matches('/')
        .to_owned()
}

async fn send(
    url: &str,
    address: &str,
    count: u64,
    body: &str,
    presettled: bool,
) -> anyhow::Result<()> {
    let mut c = Client::connect(&host_port(url), "enmesh-send").await?;
    let link = c.sender("send", Some(address), presettled).await?;
    let mut buf = BytesMut::new();
    let mut sent = 0u64;
    let mut outcomes = 0u64;
    let mut bad = 0u64;
    while outcomes < count {
        while sent < count && c.conn.credit(link) > 0 {
            buf.clear();
            amqp::message::build(
                &amqp::message::Simple {
                    message_id: Some(sent),
                    body: body.as_bytes(),
                    body_as_string: true,
                    ..Default::default()
                },
                &mut buf,
            );
            c.conn.send(link, &sent.to_be_bytes(), &buf, presettled, 0);
            sent += 1;
            if presettled {
                outcomes += 1;
            }
        }
        if outcomes >= count {
            break;
        }
        c.pump().await?;
        while let Some(e) = c.events.pop_front() {
            if let Event::Disposition {
                first, last, state, ..
            } = e
            {
                let n = u64::from(last.wrapping_sub(first)) + 1;
                outcomes += n;
                if !matches!(state, Some(DeliveryState::Accepted)) {
                    bad += n;
                    eprintln!("delivery {first}..={last}: {state:?}");
                }
            }
        }
    }
    c.flush().await?;
    if bad > 0 {
        bail!("{bad} of {count} messages were not accepted");
    }
    eprintln!("sent {count} messages to {address}");
    Ok(())
}

async fn receive(url: &str, address: &str, count: u64, timeout: u64) -> anyhow::Result<()> {
    let mut c = Client::connect(&host_port(url), "enmesh-receive").await?;
    let credit = count.min(1000) as u32;
    let (link, _) = c.receiver("receive", Some(address), credit, false).await?;
    let mut got = 0u64;
    while got < count {
        let r = if timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(timeout), c.pump()).await {
                Ok(r) => r,
                Err(_) => bail!("no message within {timeout} s ({got} received)"),
            }
        } else {
            c.pump().await
        };
        r?;
        while let Some(e) = c.events.pop_front() {
            if let Event::Delivery(d) = e {
                let m = amqp::message::parse(&d.payload)?;
                println!("{}", String::from_utf8_lossy(&m.body));
                if !d.settled {
                    c.conn
                        .disposition(link, d.delivery_id, true, Some(DeliveryState::Accepted));
                }
                got += 1;
                let left = count - got;
                if c.conn.receiver_credit(link) == 0 && left > 0 {
                    c.conn.set_credit(link, left.min(1000) as u32, false);
                }
            }
        }
    }
    c.flush().await?;
    Ok(())
}

async fn http_call(
    method: &str,
    base: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hp = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(hp)
        .await
        .with_context(|| format!("cannot connect to {hp}"))?;
    let body = body.unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    Ok((status, body))
}

async fn address_cmd(op: AddressOp, http: &str) -> anyhow::Result<()> {
    match op {
        AddressOp::List => {
            let (status, body) = http_call("GET", http, "/api/v1/addresses", None).await?;
            if status != 200 {
                bail!("HTTP {status}: {body}");
            }
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        AddressOp::Create {
            name,
            r#type,
            prefix,
            pattern,
            dead_letter,
            max_attempts,
            max_ttl_ms,
            expiry_address,
            topic,
            in_memory,
        } => {
            let decl = AddressDecl {
                name: (!prefix && !pattern).then(|| name.clone()),
                prefix: prefix.then(|| name.clone()),
                pattern: pattern.then(|| name.clone()),
                kind: r#type.into(),
                dead_letter,
                max_delivery_attempts: max_attempts,
                max_ttl_ms,
                expiry_address,
                topic,
                durable: in_memory.then_some(false),
            };
            let (status, body) = http_call(
                "POST",
                http,
                "/api/v1/addresses",
                Some(serde_json::to_string(&decl)?),
            )
            .await?;
            if status != 201 {
                bail!("HTTP {status}: {body}");
            }
            println!("created {name}");
        }
        AddressOp::Delete { name } => {
            let (status, body) = http_call(
                "DELETE",
                http,
                &format!("/api/v1/addresses/{}", percent_encode(&name)),
                None,
            )
            .await?;
            match status {
                204 => println!("deleted {name}"),
                404 => bail!("no address {name}"),
                _ => bail!("HTTP {status}: {body}"),
            }
        }
    }
    Ok(())
}

async fn queue_cmd(op: QueueOp, http: &str) -> anyhow::Result<()> {
    match op {
        QueueOp::List => {
            let (status, body) = http_call("GET", http, "/api/v1/queues", None).await?;
            if status != 200 {
                bail!("HTTP {status}: {body}");
            }
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        QueueOp::Purge { name } => {
            let path = format!("/api/v1/purge/{}", percent_encode(&name));
            let (status, body) = http_call("POST", http, &path, None).await?;
            match status {
                204 => println!("purged {name}"),
                404 => bail!("no broker in this process"),
                _ => bail!("HTTP {status}: {body}"),
            }
        }
    }
    Ok(())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
