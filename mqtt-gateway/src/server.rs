//! The gateway's server: accepts MQTT connections and bridges each to the router over links
//! of its own on a shared AMQP connection ([`crate::mux`], container id `mqtt`).
//!
//! Per MQTT connection, one task owns everything about it (one owner for each piece of state):
//! the MQTT socket, its port on the shared connection, the packet-id tables. It reads MQTT
//! only while its publishing links have credit (back-pressure reaches the device as a TCP read
//! pause) and writes MQTT with `write_all` (a slow device stalls its own task, and through it
//! only its own links).
//!
//! - PUBLISH → the anonymous relay (`to` = `prefix + topic`): QoS 0 settled, QoS 1 and 2
//!   unsettled; PUBACK / PUBREC once the router says `accepted` (stored, for a topic address).
//!   QoS 2 packet ids are remembered from PUBREC until PUBREL, so a resent PUBLISH is not
//!   forwarded twice (exactly once between client and gateway).
//! - SUBSCRIBE → one receiving link per filter, source `prefix + filter` (`+` as `*`):
//!   settled for QoS 0, unsettled otherwise; a delivery goes out as PUBLISH at the lower of the
//!   publisher's and the subscription's QoS and is accepted once the device acknowledged it
//!   (PUBACK, or PUBCOMP for QoS 2). At most `inflight` unacknowledged per subscription.
//! - UNSUBSCRIBE detaches the link; PINGREQ → PINGRESP; keep alive: 1.5 × the client's value.
//! - A second connection with the same client id takes over: the first gets DISCONNECT 0x8E
//!   (MQTT 5) and is closed ([`Clients`]).
//! - Will: published when the connection ends any other way than a DISCONNECT with reason 0
//!   (0x04 asks for it), after the will delay (MQTT 5; at most the session expiry interval),
//!   unless the client connects again meanwhile. The session's AMQP connection stays open
//!   for that wait.
//! - Bad input: the decoder's reason code in a DISCONNECT (MQTT 5) or CONNACK, then close;
//!   only that connection is affected.
//!
//! - Persistent sessions (3.1.1 clean session 0; MQTT 5 session expiry > 0) live in the
//!   brokers: each subscription is a durable subscription named by the AMQP container id
//!   `mqtt` and the link name `<client id>:<qos>:<filter>`, which keeps collecting while the
//!   device is away. On a reconnect (to this gateway or any other in front of the same
//!   routers) the gateway finds them in the router's queue list (`$sub:mqtt:<id>:...`) and
//!   attaches them again: session present, and what arrived meanwhile is delivered. Clean
//!   start unsubscribes them. An MQTT 5 session expiry interval travels as the sources'
//!   expiry-policy `link-detach` with that timeout: the brokers end the session ([`Keep`]).
//!
//! - MQTT 5 topic aliases from the device (up to [`TOPIC_ALIASES`]).
//! - A per-connection publish rate (`max_publish_rate`): over it, the device is not read until
//!   its budget refills (back-pressure, not disconnection).
//!
//! - Retained messages: one queue per topic (`retained_prefix`), purged and refilled on each
//!   retained PUBLISH, read without taking (released) at SUBSCRIBE.
//!
//! - Shared subscriptions `$share/GROUP/FILTER`: the router's shared subscription named by
//!   the group and filter; in a persistent session, also recorded as a durable subscription of
//!   the client's own on [`MARKER`] so that a resume joins the group again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amqp::connection::AttachRequest;
use amqp::{DeliveryState, LinkId, Role};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::bridge;
use crate::codec::{
    self, Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Publish, QoS, SubAck,
    SubOptions, Version, Will, reason,
};
use crate::mgmt::RouterApi;
use crate::mux::{self, Ev, Outcome, Pool, Port, Takeover, Woken};
use crate::topic;

/// Read buffer of a device that sends little (15,000 idle devices each keep one).
const IDLE_BUF: usize = 64;

/// An output buffer this small is released once written (idle devices keep none).
const SMALL_WBUF: usize = 256;

/// Topic aliases a device may set (MQTT 5, device → gateway).
const TOPIC_ALIASES: u16 = 64;

/// Most router-side events handled before the device's output is written.
const BATCH: usize = 256;

/// What the gateway needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The router: its AMQP listener (host:port, or an in-process pipe), or in standalone its
    /// core ([`crate::mux::Upstream`]).
    pub router: crate::mux::Upstream,
    /// Enmesh address prefix of MQTT topics (a topic address in the router's configuration).
    pub topic_prefix: String,
    /// Largest MQTT packet accepted (and announced to MQTT 5 clients).
    pub max_packet_size: usize,
    /// Connections served at once; more are refused (CONNACK "server busy").
    pub max_connections: usize,
    /// Unacknowledged QoS 1/2 messages per subscription towards a device.
    pub inflight: u16,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// The router's management HTTP API, where persistent sessions are found; without it
    /// every session is clean.
    pub router_http: Option<Arc<RouterApi>>,
    /// PUBLISHes per second one connection may send (0: no limit). Beyond it the gateway stops
    /// reading from the device until the budget refills (bursts of one second's worth).
    pub max_publish_rate: u32,
    /// Address prefix of the queues holding retained messages (one queue per topic, declared
    /// a queue prefix in the router); retain is not available without it and `router_http`.
    pub retained_prefix: Option<String>,
    /// Devices sharing one AMQP connection to the router ([`crate::mux`]).
    pub devices_per_connection: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            router: amqp::pipe::Dialer::Tcp("127.0.0.1:5672".into()).into(),
            topic_prefix: "mqtt/".into(),
            max_packet_size: 1024 * 1024,
            max_connections: 100_000,
            inflight: 64,
            connect_timeout: Duration::from_secs(10),
            router_http: None,
            max_publish_rate: 0,
            retained_prefix: None,
            devices_per_connection: 500,
        }
    }
}

/// The connected clients of this gateway by client id, so that a new connection with an id in
/// use takes over from the old one, and a will waiting out its delay is cancelled.
#[derive(Default)]
pub struct Clients {
    map: Mutex<HashMap<String, (u64, Takeover)>>,
    next: AtomicU64,
}

/// How often every device's keep-alive is checked: a device is disconnected between 1.5 and
/// 1.5 times its keep-alive plus this long after it was last heard.
const KEEP_ALIVE_SWEEP: Duration = Duration::from_secs(1);

/// How long a new connection waits for the one it took over from to let its links go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Clients {
    /// Registers a connection of `id` with its takeover signals, kicking any earlier one;
    /// returns its generation and the earlier connection's signals.
    fn register(&self, id: &str, kick: &Takeover) -> (u64, Option<Takeover>) {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let mut earlier = None;
        if let Ok(mut g) = self.map.lock()
            && let Some((_, old)) = g.insert(id.to_owned(), (generation, kick.clone()))
        {
            old.kick();
            earlier = Some(old);
        }
        (generation, earlier)
    }

    /// Disconnects the devices whose keep-alive ran out (each closes itself when woken).
    fn sweep(&self, now: Instant) {
        let now_ms = mux::clock_ms(now);
        if let Ok(g) = self.map.lock() {
            for (_, t) in g.values() {
                t.sweep(now_ms);
            }
        }
    }

    fn unregister(&self, id: &str, generation: u64) {
        if let Ok(mut g) = self.map.lock()
            && g.get(id).is_some_and(|(n, _)| *n == generation)
        {
            g.remove(id);
        }
    }
}

/// Accepts MQTT connections on `listener` (and MQTT over WebSocket on `ws`) until `shutdown`
/// turns true. Both share the client registry and the connection limit.
pub async fn serve(
    listener: TcpListener,
    ws: Option<TcpListener>,
    cfg: Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    let clients = Arc::new(Clients::default());
    let pool = Pool::new(cfg.router.clone(), cfg.devices_per_connection);
    let mut sweep = tokio::time::interval(KEEP_ALIVE_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (accepted, websocket) = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            _ = sweep.tick() => {
                clients.sweep(Instant::now());
                continue;
            }
            a = listener.accept() => (a, false),
            a = accept_on(&ws) => (a, true),
        };
        let (sock, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("mqtt accept: {e}");
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let cfg = cfg.clone();
        let live = live.clone();
        let clients = clients.clone();
        let pool = pool.clone();
        let n = live.fetch_add(1, Ordering::AcqRel);
        // Boxed here (8 bytes, where the task would keep the 32 of a socket).
        let sock = Box::new(sock);
        tokio::spawn(async move {
            let busy = n >= cfg.max_connections;
            if let Err(e) = connection(sock, websocket, &cfg, &clients, &pool, busy).await {
                tracing::debug!("mqtt connection: {e}");
            }
            live.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// A device's byte stream: the socket, or a WebSocket's inside once its handshake is done
/// (boxed: the handshake's future would otherwise size every device's task).
async fn open(sock: Box<TcpStream>, websocket: bool, cfg: &Config) -> Result<Io, ConnError> {
    if !websocket {
        return Ok(sock);
    }
    match Box::pin(tokio::time::timeout(
        cfg.connect_timeout,
        crate::ws::accept(*sock, cfg.max_packet_size),
    ))
    .await
    {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ConnError::Closed("no WebSocket handshake in time")),
    }
}

async fn accept_on(l: &Option<TcpListener>) -> io::Result<(TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("router: {0}")]
    Router(#[from] amqp::client::ClientError),
    #[error("{0}")]
    Closed(&'static str),
    /// A device broke a rule with its own reason code (MQTT 5 DISCONNECT).
    #[error("{1}")]
    Reason(u8, &'static str),
}

/// A device's byte stream: TCP, or the inside of a WebSocket.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
type Io = Box<dyn Stream>;

/// A device's small maps (its in-flight packets, bounded by the windows): Fx hashing, whose
/// zero-sized hasher state saves 16 bytes per map on every device over `RandomState` and
/// which is several times cheaper than SipHash. The keys are our own tags and packet ids, so
/// there is no one else's collision to fear.
type SmallMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;

async fn write(sock: &mut Io, p: &Packet, v: Version) -> io::Result<()> {
    let mut b = BytesMut::new();
    codec::encode(p, v, &mut b);
    sock.write_all(&b).await?;
    sock.flush().await
}

fn connack(reason: u8, properties: Properties) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        reason,
        properties,
    })
}

/// Reads packets until CONNECT arrives (or the timeout); answers bad ones.
async fn read_connect(
    sock: &mut Io,
    buf: &mut BytesMut,
    cfg: &Config,
) -> Result<Connect, ConnError> {
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    loop {
        match codec::decode(buf, None, cfg.max_packet_size) {
            Ok(Some((Packet::Connect(c), used))) => {
                let _ = buf.split_to(used);
                return Ok(*c);
            }
            Ok(Some(_)) => return Err(ConnError::Closed("first packet not CONNECT")),
            Ok(None) => {}
            Err(e @ DecodeError::UnsupportedVersion(_)) => {
                // Answered in 3.1.1's format, which every version reads (§3.1.2.2).
                write(
                    sock,
                    &connack(e.reason(), Properties::default()),
                    Version::V311,
                )
                .await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        let n = tokio::time::timeout_at(deadline, sock.read_buf(buf))
            .await
            .map_err(|_| ConnError::Closed("no CONNECT in time"))??;
        if n == 0 {
            return Err(ConnError::Closed("closed before CONNECT"));
        }
    }
}

/// A connected device between CONNACK and the end of its session.
struct Live<'a> {
    s: Session<'a>,
    buf: BytesMut,
    /// Used when the session ends.
    end: Ending,
}

/// What ending a session needs to know of how it began (besides the session's version and
/// client id).
struct Ending {
    /// This connection keeps its session after it ends.
    persistent: bool,
    /// The session expiry interval CONNECT asked for (MQTT 5; 0 otherwise).
    connect_expiry: u32,
    /// A kept session was resumed.
    session_present: bool,
    will: Option<Box<Will>>,
    will_delay: Duration,
    generation: u64,
    kicked: Takeover,
}

/// One device's connection. Set-up and tear-down run in boxed futures of their own: what an
/// idle device keeps is the small future of [`Session::run`] (thousands of them are idle).
async fn connection(
    sock: Box<TcpStream>,
    websocket: bool,
    cfg: &Config,
    clients: &Clients,
    pool: &Arc<Pool>,
    busy: bool,
) -> Result<(), ConnError> {
    // Boxed, with the session it returns: an async fn keeps a value it awaited and the
    // binding it was moved to as two slots, which every idle device would pay for.
    let sock = open(sock, websocket, cfg).await?;
    let mut live = Box::pin(start(sock, cfg, clients, pool, busy)).await?;
    let Live { s, buf, .. } = &mut *live;
    let r = s.run(buf).await;
    Box::pin(finish(live, r, cfg, clients, pool)).await
}

/// CONNECT to CONNACK: the session resumed or begun.
async fn start<'a>(
    mut sock: Io,
    cfg: &'a Config,
    clients: &Clients,
    pool: &Arc<Pool>,
    busy: bool,
) -> Result<Box<Live<'a>>, ConnError> {
    // Small to start with (most devices are idle: a PINGREQ is 2 bytes); grown in
    // `Session::run` for busy ones.
    let mut buf = BytesMut::with_capacity(IDLE_BUF);
    let c = read_connect(&mut sock, &mut buf, cfg).await?;
    let v = c.version;
    if busy {
        write(
            &mut sock,
            &connack(reason::SERVER_BUSY, Properties::default()),
            v,
        )
        .await?;
        return Err(ConnError::Closed("too many connections"));
    }
    if c.properties.authentication_method.is_some() {
        // Enhanced authentication: no method is supported, and the connection must then be
        // closed (§4.12, MQTT-4.12.0-1).
        write(
            &mut sock,
            &connack(reason::BAD_AUTHENTICATION_METHOD, Properties::default()),
            v,
        )
        .await?;
        return Err(ConnError::Closed("unsupported authentication method"));
    }
    let mut props = Properties::default();
    let client_id = if c.client_id.is_empty() {
        if v == Version::V311 && !c.clean_start {
            // §3.1.3-8: a persistent session needs an identifier.
            write(
                &mut sock,
                &connack(reason::CLIENT_IDENTIFIER_NOT_VALID, props),
                v,
            )
            .await?;
            return Err(ConnError::Closed("empty client id without clean session"));
        }
        let id = format!("enmesh-{:016x}", rand_u64());
        if v == Version::V5 {
            props.assigned_client_identifier = Some(id.clone());
        }
        id
    } else {
        c.client_id.clone()
    };
    let port = match pool.join().await {
        Ok(p) => p,
        Err(e) => {
            write(
                &mut sock,
                &connack(reason::SERVER_UNAVAILABLE, Properties::default()),
                v,
            )
            .await?;
            return Err(e.into());
        }
    };
    if v == Version::V5 {
        props.retain_available = Some(u8::from(retained_store(cfg).is_some()));
        props.shared_subscription_available = Some(1);
        props.subscription_identifier_available = Some(1);
        props.wildcard_subscription_available = Some(1);
        props.maximum_packet_size = u32::try_from(cfg.max_packet_size).ok();
        props.topic_alias_maximum = Some(TOPIC_ALIASES);
    }
    let keep = match (cfg.router_http.is_some(), v) {
        (false, _) => Keep::No,
        (true, Version::V311) if c.clean_start => Keep::No,
        (true, Version::V311) => Keep::Always,
        (true, Version::V5) => match c.properties.session_expiry_interval.unwrap_or(0) {
            0 => Keep::No,
            u32::MAX => Keep::Always,
            s => Keep::For(s),
        },
    };
    let persistent = keep != Keep::No;
    let connect_expiry = c.properties.session_expiry_interval.unwrap_or(0);
    let clean_start = c.clean_start;
    let will = c.will.clone();
    // Will delay (MQTT 5), bounded by the session expiry interval (§3.1.3.2.2).
    let will_delay = Duration::from_secs(u64::from(
        will.as_ref()
            .and_then(|w| w.properties.will_delay_interval)
            .unwrap_or(0)
            .min(c.properties.session_expiry_interval.unwrap_or(0)),
    ));
    let kicked = port.events.takeover();
    let (generation, earlier) = clients.register(&client_id, &kicked);
    if let Some(e) = earlier {
        // Its links go first (bounded: a stuck connection does not hold this one forever).
        let _ = tokio::time::timeout(TAKEOVER_WAIT, e.wait_gone()).await;
    }
    let mut s = Session::new(sock, port, v, c, client_id.clone(), cfg);
    let resumed = async {
        // A clean start's answer is known before the brokers are asked (no session present):
        // the device may send its next packets while the old session is looked up and ended.
        // They are read only once it has ended.
        if clean_start {
            write(&mut s.sock, &connack(reason::SUCCESS, props.clone()), v).await?;
        }
        // The session kept in the brokers: resumed, or ended by a clean start.
        let kept = match &cfg.router_http {
            Some(api) => match session_subscriptions(api, &client_id).await {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!("sessions not readable at {}: {e}", api.host());
                    let refusal = if !clean_start {
                        Some(connack(reason::SERVER_UNAVAILABLE, props))
                    } else if v == Version::V5 {
                        Some(Packet::Disconnect(Disconnect {
                            reason: reason::SERVER_UNAVAILABLE,
                            properties: Properties::default(),
                        }))
                    } else {
                        None
                    };
                    if let Some(p) = refusal {
                        let _ = write(&mut s.sock, &p, v).await;
                    }
                    return Err(e.into());
                }
            },
            None => Vec::new(),
        };
        let mut session_present = false;
        // Resumed subscriptions attach their durable subscriptions again, with this
        // connection's expiry (a connection that keeps no session ends them when it ends).
        s.keep = if keep == Keep::No { Keep::Always } else { keep };
        for (qos, f) in kept {
            if clean_start {
                s.unsubscribe_kept(&f, qos).await?;
            } else {
                let k = s.keep;
                s.subscribe(f, SubOptions::qos(qos), None, k).await?;
                session_present = true;
            }
        }
        s.keep = keep;
        if !clean_start {
            let mut ack = connack(reason::SUCCESS, props);
            if let Packet::ConnAck(a) = &mut ack {
                a.session_present = session_present;
            }
            write(&mut s.sock, &ack, v).await?;
        }
        Ok::<bool, ConnError>(session_present)
    };
    match resumed.await {
        Ok(session_present) => Ok(Box::new(Live {
            s,
            buf,
            end: Ending {
                persistent,
                connect_expiry,
                session_present,
                will: will.map(Box::new),
                will_delay,
                generation,
                kicked,
            },
        })),
        Err(e) => {
            clients.unregister(&client_id, generation);
            drop(s);
            kicked.gone();
            Err(e)
        }
    }
}

/// The session's end: DISCONNECT with the reason (MQTT 5), the will, the client id free.
async fn finish(
    live: Box<Live<'_>>,
    r: Result<End, ConnError>,
    cfg: &Config,
    clients: &Clients,
    pool: &Arc<Pool>,
) -> Result<(), ConnError> {
    let Live { mut s, end, .. } = *live;
    let Ending {
        persistent,
        connect_expiry,
        session_present,
        will,
        mut will_delay,
        generation,
        kicked,
    } = end;
    let mut r = r;
    let v = s.v;
    if let Ok(End::Disconnected {
        expiry: Some(x), ..
    }) = r
    {
        if connect_expiry == 0 && x != 0 {
            // A session that was to end with its connection cannot be kept now (§3.14.2.2.2).
            r = Err(ConnError::Reason(
                reason::PROTOCOL_ERROR,
                "session expiry set at DISCONNECT after none at CONNECT",
            ));
        } else if persistent {
            // The new interval replaces CONNECT's: 0 ends the session now; otherwise the
            // brokers are given the new timeout. A delayed will waits at most that long.
            if x == 0 {
                s.unsubscribe_all();
            } else if let Err(e) = s
                .rekeep(if x == u32::MAX {
                    Keep::Always
                } else {
                    Keep::For(x)
                })
                .await
            {
                tracing::warn!("session expiry of {} not changed: {e}", s.client_id);
            }
            let asked = will.as_ref().and_then(|w| w.properties.will_delay_interval);
            will_delay = Duration::from_secs(u64::from(asked.unwrap_or(0).min(x)));
        }
    }
    let client_id = std::mem::take(&mut s.client_id);
    if !persistent && session_present {
        // Resumed, but this connection asked for no session after it (MQTT 5 expiry 0).
        s.unsubscribe_all();
    }
    let mut reason_out = None;
    let send_will = match &r {
        Ok(End::Disconnected { will, .. }) => *will,
        Ok(End::TakenOver) => {
            reason_out = Some((reason::SESSION_TAKEN_OVER, None));
            // A delayed will is not sent when the client is back (§3.1.3.2.2).
            will_delay.is_zero()
        }
        Err(ConnError::Decode(e)) => {
            reason_out = Some((e.reason(), Some(e.to_string())));
            true
        }
        Err(ConnError::Reason(code, why)) => {
            reason_out = Some((*code, Some((*why).to_owned())));
            true
        }
        Err(_) => true,
    };
    if let (Some((code, why)), Version::V5) = (reason_out, v) {
        // The reason string only if the packet stays within the device's Maximum Packet Size
        // (header, reason code, property length, then 3 + its bytes).
        let max = usize::try_from(s.max_out).unwrap_or(usize::MAX);
        let why = why.filter(|w| w.len().saturating_add(8) <= max);
        let d = Packet::Disconnect(Disconnect {
            reason: code,
            properties: Properties {
                reason_string: why,
                ..Properties::default()
            },
        });
        let _ = write(&mut s.sock, &d, v).await;
    }
    let _ = s.sock.shutdown().await;
    // The device's links go (not closing: a persistent session's subscriptions stay).
    drop(s);
    kicked.gone();
    if let (true, Some(w)) = (send_will, will) {
        let cancelled = if will_delay.is_zero() {
            false
        } else {
            // Wait out the delay unless the same client connects again.
            tokio::select! {
                _ = tokio::time::sleep(will_delay) => false,
                _ = kicked.wait() => true,
            }
        };
        if !cancelled && let Err(e) = publish_will(cfg, pool, &client_id, *w).await {
            tracing::debug!("will of {client_id} not published: {e}");
        }
    }
    clients.unregister(&client_id, generation);
    r.map(|_| ())
}

/// Publishes a will like a PUBLISH from the device, on a link of its own, and waits up to 5 s
/// for the router's outcome when its QoS asks for one.
async fn publish_will(
    cfg: &Config,
    pool: &Arc<Pool>,
    client_id: &str,
    w: Will,
) -> Result<(), ConnError> {
    let wp = w.properties;
    let p = Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic,
        packet_id: None,
        properties: Properties {
            payload_format_indicator: wp.payload_format_indicator,
            message_expiry_interval: wp.message_expiry_interval,
            content_type: wp.content_type,
            response_topic: wp.response_topic,
            correlation_data: wp.correlation_data,
            user_properties: wp.user_properties,
            ..Properties::default()
        },
        payload: w.payload,
    };
    let run = async {
        let mut port = pool.join().await?;
        let settled = p.qos == QoS::AtMostOnce;
        let name = format!("will:{}", port.id());
        // Unsettled when the will is retained: its retained copy is sent first and confirmed.
        let link = port
            .attach(sender_request(name, settled && !p.retain), 0)
            .await?;
        if p.retain
            && !p.topic.starts_with('$')
            && let Some(retained) = replace_retained(cfg, client_id, &p, &p.topic).await?
            && will_send(&mut port, link, 1, retained, false).await? != Some(Outcome::Accepted)
        {
            tracing::warn!("retained will of {client_id} on {} not stored", p.topic);
        }
        let mut msg = BytesMut::new();
        bridge::to_amqp(&p, client_id, &cfg.topic_prefix, &mut msg);
        will_send(&mut port, link, 2, msg.freeze(), settled).await?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| ConnError::Closed("will not published in time"))?
}

/// Sends `msg` on a will's link once it has credit; an unsettled send waits for its outcome
/// (matched by `tag`, which differs between a will's sends).
async fn will_send(
    port: &mut Port,
    link: LinkId,
    tag: u64,
    msg: Bytes,
    settled: bool,
) -> Result<Option<Outcome>, ConnError> {
    while port.credit(link) == 0 {
        match port.events.recv().await {
            Some(Ev::Credit {
                link,
                credit,
                applied,
            }) => port.credit_report(link, credit, applied),
            Some(Ev::LinkClosed { .. }) | Some(Ev::Closed) | None => {
                return Err(ConnError::Closed("will link gone"));
            }
            Some(_) => {}
        }
    }
    port.send(link, tag, msg, None, settled)?;
    if settled {
        return Ok(None);
    }
    loop {
        match port.events.recv().await {
            Some(Ev::Outcome { tag: t, outcome }) if t == tag => return Ok(Some(outcome)),
            Some(Ev::Closed) | None => return Err(ConnError::Closed("router gone")),
            Some(_) => {}
        }
    }
}

/// Clears topic `topic`'s retained message (its queue is purged) for `p`, a retained
/// publication, and returns the message that stores `p` in that queue (none for an empty
/// payload, which only clears). Nothing to do when the gateway keeps no retained messages.
async fn replace_retained(
    cfg: &Config,
    client_id: &str,
    p: &Publish,
    topic: &str,
) -> Result<Option<Bytes>, ConnError> {
    let Some((api, prefix)) = retained_store(cfg) else {
        return Ok(None);
    };
    let queue = format!("{prefix}{topic}");
    api.purge(&queue).await?;
    if p.payload.is_empty() {
        return Ok(None);
    }
    let mut stored = p.clone();
    stored.topic = topic.to_owned();
    stored.properties.topic_alias = None;
    let mut msg = BytesMut::new();
    bridge::to_amqp(&stored, client_id, &cfg.topic_prefix, &mut msg);
    // Addressed to the retained queue rather than the topic (sent on the anonymous relay).
    let mut to = BytesMut::new();
    bridge::retarget(&msg, &queue, &mut to);
    Ok(Some(to.freeze()))
}

/// The retained queues that may hold messages for filter `f` (none without a retained store).
async fn retained_queues(cfg: &Config, f: &str) -> io::Result<Vec<crate::mgmt::Queue>> {
    let Some((api, prefix)) = retained_store(cfg) else {
        return Ok(Vec::new());
    };
    // Only queues under the filter's literal head can match.
    let head = f.split(['+', '#']).next().unwrap_or("");
    api.queues(&format!("{prefix}{head}")).await
}

/// Where retained messages live, if the gateway keeps them: (router API, queue prefix).
fn retained_store(cfg: &Config) -> Option<(&RouterApi, &str)> {
    Some((cfg.router_http.as_deref()?, cfg.retained_prefix.as_deref()?))
}

/// A client id with `%` and `:` escaped, so that the `<client>:` prefixes of two clients'
/// subscription names never overlap.
fn escaped(client_id: &str) -> String {
    client_id.replace('%', "%25").replace(':', "%3A")
}

/// The link name of a persistent session's subscription, which with the gateway's container
/// id names its durable subscription in the brokers: `<client>:<qos>:<filter>`.
fn durable_name(client_id: &str, qos: QoS, filter: &str) -> String {
    format!("{}:{}:{filter}", escaped(client_id), qos as u8)
}

/// The link name of shared subscription `$share/<group>/<filter>`, which names the router's
/// shared subscription: every member of the group, through any gateway, attaches the same.
fn shared_name(group: &str, filter: &str) -> String {
    format!("mqtt:share:{group}:{filter}")
}

/// Where the records of shared subscriptions in persistent sessions point (under the topic
/// prefix): a topic no device can publish to (`$share` is not a topic name the gateway accepts).
const MARKER: &str = "$share";

/// How long a persistent session outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Not at all (a clean session).
    No,
    /// For good (3.1.1 clean session 0; MQTT 5 session expiry 0xFFFFFFFF).
    Always,
    /// This many seconds (MQTT 5 session expiry interval).
    For(u32),
}

/// A subscription's source: durable for a persistent session (kept while the device is away,
/// for good with expiry-policy `never`, or for the session expiry interval: expiry-policy
/// `link-detach` with that timeout, which the brokers enforce, so it holds through gateway
/// restarts); `shared` makes the router name it by the link name alone.
fn source(address: String, keep: Keep, shared: bool) -> amqp::Terminus {
    let (durable, expiry_policy, timeout) = match keep {
        Keep::No => (None, None, None),
        Keep::Always => (Some(2), Some("never".to_owned()), None),
        Keep::For(s) => (Some(2), Some("link-detach".to_owned()), Some(s)),
    };
    amqp::Terminus {
        address: Some(address),
        durable,
        expiry_policy,
        timeout,
        capabilities: shared.then(|| amqp::Value::Symbol("shared".into())),
        ..amqp::Terminus::default()
    }
}

/// A sending link on the anonymous relay.
fn sender_request(name: String, settled: bool) -> AttachRequest {
    AttachRequest {
        name,
        role: Role::Sender,
        source: Some(amqp::Terminus::default()),
        target: Some(amqp::Terminus::default()),
        snd_settle_mode: if settled { 1 } else { 0 },
        rcv_settle_mode: 0,
    }
}

/// A receiving link from `source`.
fn receiver_request(name: String, source: amqp::Terminus, settled: bool) -> AttachRequest {
    AttachRequest {
        name,
        role: Role::Receiver,
        source: Some(source),
        target: Some(amqp::Terminus::default()),
        snd_settle_mode: if settled { 1 } else { 2 },
        rcv_settle_mode: 0,
    }
}

/// The subscriptions a client's persistent session keeps in the brokers, as `(QoS, filter)`,
/// from the router's queue list.
async fn session_subscriptions(api: &RouterApi, client_id: &str) -> io::Result<Vec<(QoS, String)>> {
    let prefix = format!("$sub:{}:{}:", mux::CONTAINER, escaped(client_id));
    let mut out = Vec::new();
    for q in api.queues(&prefix).await? {
        let Some(rest) = q.address.strip_prefix(&prefix) else {
            continue;
        };
        let Some((qos, filter)) = rest.split_once(':') else {
            continue;
        };
        if let Some(qos) = qos.parse().ok().and_then(QoS::from_u8) {
            out.push((qos, filter.to_owned()));
        }
    }
    Ok(out)
}

/// How a connection's session ended without an error.
enum End {
    /// DISCONNECT: with the will (reason 0x04) or not, and the session expiry interval it
    /// sets (MQTT 5), which replaces CONNECT's.
    Disconnected { will: bool, expiry: Option<u32> },
    /// Another connection with the same client id.
    TakenOver,
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A subscription's link towards the device.
struct Sub {
    link: LinkId,
    opts: SubOptions,
    /// Its subscription identifier (MQTT 5), sent with each delivery.
    id: Option<u32>,
    /// The filter, when it has no wildcard: the topic of deliveries that name none.
    literal: Option<String>,
    /// A shared subscription's record in a persistent session ([`Session::attach_marker`]).
    marker: Option<LinkId>,
}

/// A device's subscriptions by filter, each with its link. A vector: a device usually has
/// one or a few (two hash maps cost ~450 bytes for one, ×15,000 idle devices), and the
/// router bounds links per connection anyway.
#[derive(Default)]
struct Subs(Vec<(String, Sub)>);

impl Subs {
    fn contains(&self, f: &str) -> bool {
        self.0.iter().any(|(k, _)| k == f)
    }
    fn insert(&mut self, f: String, sub: Sub) {
        self.remove(&f);
        // Exactly one more slot while small (a first push reserves four).
        if self.0.len() < 4 {
            self.0.reserve_exact(1);
        }
        self.0.push((f, sub));
    }
    fn remove(&mut self, f: &str) -> Option<Sub> {
        let i = self.0.iter().position(|(k, _)| k == f)?;
        Some(self.0.swap_remove(i).1)
    }
    fn by_link(&self, link: LinkId) -> Option<(&str, &Sub)> {
        self.0
            .iter()
            .find(|(_, s)| s.link == link)
            .map(|(f, s)| (f.as_str(), s))
    }
    fn remove_link(&mut self, link: LinkId) -> Option<(String, Sub)> {
        let i = self.0.iter().position(|(_, s)| s.link == link)?;
        Some(self.0.swap_remove(i))
    }
    fn drain(&mut self) -> Vec<Sub> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }
}

/// A session's state that most devices never use (15,000 idle devices would each keep three
/// empty tables inline).
#[derive(Default)]
struct Rare {
    /// QoS 2 from the device: forwarded, not yet stored (a resend is dropped).
    qos2_storing: HashSet<u16>,
    /// QoS 2 from the device: stored and PUBREC sent, waiting for PUBREL.
    qos2_stored: HashSet<u16>,
    /// Topic aliases the device set (at most [`TOPIC_ALIASES`]).
    aliases: HashMap<u16, String>,
}

/// An outbound QoS 1/2 message the device has not acknowledged yet.
struct Outbound {
    /// The AMQP delivery to accept once the device acknowledged (none for a retained message,
    /// which stays where it is).
    from: Option<(LinkId, u32)>,
}

struct Session<'a> {
    sock: Io,
    port: Port,
    v: Version,
    cfg: &'a Config,
    /// Keep alive × 1.5 in milliseconds (0: none).
    keep_alive_ms: u32,
    /// Publishing links, settled (QoS 0) and unsettled; attached at the first PUBLISH.
    pub0: Option<LinkId>,
    pub1: Option<LinkId>,
    /// What most devices never use, boxed on first use.
    rare: Option<Box<Rare>>,
    subs: Subs,
    /// Queues and maps of a device that has sent or received messages, boxed on first use:
    /// a device that only subscribed (most of an idle fleet) keeps none.
    busy: Option<Box<Busy>>,
    next_id: u16,
    wbuf: BytesMut,
    /// Short acknowledgements to write while `wbuf` is empty (then `wbuf` stays empty until
    /// they are written or moved into it): a publisher is sent one per message, and the output
    /// buffer, released when small, would be allocated again for each.
    acks: ([u8; 12], u8),
    /// Delivery tags of our publishes.
    tags: u64,
    /// Whether and how long new subscriptions are kept in the brokers (a persistent session).
    keep: Keep,
    /// The device's publish rate budget (none without a limit).
    budget: Option<Box<Budget>>,
    client_id: String,
    /// QoS 1/2 messages the device accepts unacknowledged (its receive maximum).
    receive_max: u16,
    /// The device's Maximum Packet Size (MQTT 5; none: the protocol's own limit). A PUBLISH
    /// larger than this is not sent (MQTT-3.1.2-24/25).
    max_out: u32,
}

/// A session's in-flight state (see [`Session::busy`]).
#[derive(Default)]
struct Busy {
    /// Events read while waiting for another (handled first by the main loop).
    backlog: VecDeque<Ev>,
    /// Our unsettled publishes by tag → the device's (packet id, QoS).
    publishing: Publishing,
    /// Our unacknowledged PUBLISHes to the device by packet id.
    out: SmallMap<u16, Outbound>,
    /// Decoded PUBLISHes waiting for publishing credit.
    waiting: VecDeque<Publish>,
    /// Deliveries waiting for a slot under `receive_max` (bounded by the links' credit).
    held: VecDeque<mux::Delivery>,
}

/// Unsettled publishes by tag. Most devices have one at a time: it is kept inline, so that
/// its outcome does not reach into a table of its own (a cache miss per message when
/// thousands of devices take turns).
#[derive(Default)]
struct Publishing {
    first: Option<(u64, (u16, QoS))>,
    more: SmallMap<u64, (u16, QoS)>,
}

impl Publishing {
    fn insert(&mut self, tag: u64, v: (u16, QoS)) {
        match self.first {
            None => self.first = Some((tag, v)),
            Some(_) => {
                self.more.insert(tag, v);
            }
        }
    }

    fn remove(&mut self, tag: &u64) -> Option<(u16, QoS)> {
        match self.first {
            Some((t, v)) if t == *tag => {
                self.first = None;
                Some(v)
            }
            _ => self.more.remove(tag),
        }
    }
}

impl<'a> Session<'a> {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    /// Outbound `packet_id` is unacknowledged.
    fn awaits_ack(&self, packet_id: u16) -> bool {
        self.busy
            .as_ref()
            .is_some_and(|b| b.out.contains_key(&packet_id))
    }

    fn new(
        sock: Io,
        port: Port,
        v: Version,
        c: Connect,
        client_id: String,
        cfg: &'a Config,
    ) -> Session<'a> {
        Session {
            sock,
            port,
            v,
            cfg,
            keep_alive_ms: u32::from(c.keep_alive) * 1500,
            pub0: None,
            pub1: None,
            rare: None,
            subs: Subs::default(),
            busy: None,
            next_id: 1,
            wbuf: BytesMut::new(),
            acks: ([0; 12], 0),
            tags: 0,
            keep: Keep::No,
            budget: (cfg.max_publish_rate > 0).then(|| Box::new(Budget::new(cfg.max_publish_rate))),
            client_id,
            receive_max: c.properties.receive_maximum.unwrap_or(u16::MAX),
            max_out: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
        }
    }

    /// Whether PUBLISH `p` is within the device's Maximum Packet Size.
    fn fits(&self, p: &Publish) -> bool {
        self.max_out == u32::MAX
            || codec::publish_len(p, self.v) <= usize::try_from(self.max_out).unwrap_or(usize::MAX)
    }

    fn emit(&mut self, p: &Packet) {
        let (held, n) = &mut self.acks;
        let at = usize::from(*n);
        if self.wbuf.is_empty()
            && at + 4 <= held.len()
            && let Some(b) = codec::short_ack(p, self.v)
        {
            held[at..at + 4].copy_from_slice(&b);
            *n += 4;
            return;
        }
        if at > 0 {
            // In order: what was held goes first.
            self.wbuf.extend_from_slice(&held[..at]);
            *n = 0;
        }
        codec::encode(p, self.v, &mut self.wbuf);
    }

    async fn flush(&mut self) -> Result<(), ConnError> {
        if self.acks.1 > 0 {
            let (held, n) = self.acks;
            self.sock.write_all(&held[..usize::from(n)]).await?;
            self.sock.flush().await?;
            self.acks.1 = 0;
        }
        if !self.wbuf.is_empty() {
            // Written from the buffer itself: splitting it off would make it shared (a small
            // allocation every idle device would keep).
            self.sock.write_all(&self.wbuf).await?;
            self.sock.flush().await?;
            self.wbuf.clear();
            if self.wbuf.capacity() <= SMALL_WBUF {
                // A few acknowledgements' worth: released rather than kept while idle.
                self.wbuf = BytesMut::new();
            }
        }
        Ok(())
    }

    /// Whether the device may be read: nothing waits for publishing credit.
    fn can_publish(&self) -> bool {
        self.busy.as_ref().is_none_or(|b| b.waiting.is_empty())
    }

    /// The publishing link for `qos`, attached on first use.
    async fn pub_link(&mut self, qos: QoS) -> Result<LinkId, ConnError> {
        let settled = qos == QoS::AtMostOnce;
        if let Some(l) = if settled { self.pub0 } else { self.pub1 } {
            return Ok(l);
        }
        let name = format!("pub{}:{}", u8::from(!settled), self.port.id());
        let link = self.port.attach(sender_request(name, settled), 0).await?;
        if settled {
            self.pub0 = Some(link);
        } else {
            self.pub1 = Some(link);
        }
        Ok(link)
    }

    /// Waits until `link` has publishing credit, keeping other events for later.
    async fn wait_credit(&mut self, link: LinkId) -> Result<(), ConnError> {
        while self.port.credit(link) == 0 {
            if let Some(e) = self.next_event().await? {
                self.busy().backlog.push_back(e);
            }
        }
        Ok(())
    }

    /// Waits for the router's outcome of send `tag`, keeping other events for later.
    async fn wait_outcome(&mut self, tag: u64) -> Result<Outcome, ConnError> {
        loop {
            match self.next_event().await? {
                Some(Ev::Outcome { tag: t, outcome }) if t == tag => return Ok(outcome),
                Some(e) => self.busy().backlog.push_back(e),
                None => {}
            }
        }
    }

    /// The router's next event while the session waits for one: credit is applied at once
    /// (`None`), the connection's end is an error, anything else is returned.
    async fn next_event(&mut self) -> Result<Option<Ev>, ConnError> {
        match self.port.events.recv().await {
            Some(Ev::Credit {
                link,
                credit,
                applied,
            }) => {
                self.port.credit_report(link, credit, applied);
                Ok(None)
            }
            Some(Ev::Closed) | None => Err(ConnError::Closed("router connection gone")),
            Some(e) => Ok(Some(e)),
        }
    }

    /// The session's loop; `buf` holds what the device sent after CONNECT.
    async fn run(&mut self, buf: &mut BytesMut) -> Result<End, ConnError> {
        self.port
            .events
            .keep_alive(self.keep_alive_ms, Instant::now());
        loop {
            while let Some(e) = self.busy.as_mut().and_then(|b| b.backlog.pop_front()) {
                self.on_amqp(e)?;
            }
            // Everything already buffered first (CONNECT may have arrived with more).
            loop {
                let end = match self.read_packets(buf)? {
                    Step::Idle => break,
                    Step::End(end) => Some(end),
                    // Boxed: the future every idle device keeps stays small.
                    Step::Slow(p) => Box::pin(self.on_slow(*p)).await?,
                };
                if let Some(end) = end {
                    self.flush().await?;
                    return Ok(end);
                }
            }
            self.flush().await?;
            // The keep-alive is the gateway's sweeper's ([`Woken::Expired`]); the only
            // timer here is a rate-limited device's refill.
            let wake = (!self.can_publish())
                .then(|| self.budget.as_ref()?.next())
                .flatten();
            let read_mqtt = self.can_publish();
            if !read_mqtt {
                // Not read while it waits for credit: its silence is ours, not its own.
                self.port.events.heard(Instant::now());
            }
            if buf.capacity() - buf.len() < 256 {
                // Empty: take the first bytes back (pings of an idle device wear its buffer
                // down); otherwise a busy device gets room for bursts.
                buf.reserve(if buf.is_empty() { IDLE_BUF } else { 16 * 1024 });
            }
            let woke = {
                let Session { sock, port, .. } = &mut *self;
                // The inbox also carries a takeover: one waker for both (an idle device
                // keeps this future).
                tokio::select! {
                    r = sock.read_buf(buf), if read_mqtt => Woke::Mqtt(r),
                    w = std::future::poll_fn(|cx| port.events.poll_woken(cx, true)) => Woke::Amqp(w),
                    _ = sleep_until(wake), if wake.is_some() => Woke::Timer,
                }
            };
            match woke {
                Woke::Amqp(Woken::Kicked) => return Ok(End::TakenOver),
                Woke::Amqp(Woken::Expired) => {
                    if self.v == Version::V5 {
                        self.emit(&Packet::Disconnect(Disconnect {
                            reason: reason::KEEP_ALIVE_TIMEOUT,
                            properties: Properties::default(),
                        }));
                        self.flush().await?;
                    }
                    return Err(ConnError::Closed("keep alive expired"));
                }
                Woke::Mqtt(r) => {
                    if r? == 0 {
                        return Err(ConnError::Closed("device closed the connection"));
                    }
                }
                Woke::Amqp(Woken::Closed) => {
                    return Err(ConnError::Closed("router connection gone"));
                }
                Woke::Amqp(Woken::Event(e)) => {
                    self.on_amqp(e)?;
                    for _ in 0..BATCH {
                        match self.port.events.try_recv() {
                            Some(e) => self.on_amqp(e)?,
                            None => break,
                        }
                    }
                    self.drain_waiting()?;
                }
                Woke::Timer => self.drain_waiting()?,
            }
        }
    }

    /// Handles the packets `buf` holds while the device may publish, up to one that waits on
    /// the router or ends the session.
    fn read_packets(&mut self, buf: &mut BytesMut) -> Result<Step, ConnError> {
        let mut heard = false;
        while self.can_publish() {
            let Some((p, used)) = codec::decode(buf, Some(self.v), self.cfg.max_packet_size)?
            else {
                break;
            };
            let _ = buf.split_to(used);
            if !heard {
                // Once per read: the sweeper's granularity is a second anyway.
                self.port.events.heard(Instant::now());
                heard = true;
            }
            if self.is_slow(&p) {
                return Ok(Step::Slow(Box::new(p)));
            }
            if let Some(end) = self.on_packet(p)? {
                return Ok(Step::End(end));
            }
        }
        Ok(Step::Idle)
    }

    /// Whether handling `p` waits on the router: a SUBSCRIBE, a retained PUBLISH, or the first
    /// PUBLISH of its kind (its link is attached then).
    fn is_slow(&self, p: &Packet) -> bool {
        match p {
            Packet::Subscribe(_) => true,
            Packet::Publish(p) => {
                p.retain
                    || (if p.qos == QoS::AtMostOnce {
                        self.pub0
                    } else {
                        self.pub1
                    })
                    .is_none()
            }
            _ => false,
        }
    }

    /// Handles a packet [`Session::is_slow`] picked.
    async fn on_slow(&mut self, p: Packet) -> Result<Option<End>, ConnError> {
        match p {
            Packet::Publish(p) => {
                if p.retain && !self.retain(&p).await? {
                    // The retained store refused it: refused as a whole, not published.
                    match p.packet_id {
                        Some(id) if p.qos != QoS::AtMostOnce => {
                            self.published(id, p.qos, Outcome::Refused)?
                        }
                        _ => tracing::warn!("retained QoS 0 message on {} not stored", p.topic),
                    }
                    return Ok(None);
                }
                self.pub_link(p.qos).await?;
                self.on_packet(Packet::Publish(p))
            }
            Packet::Subscribe(s) => {
                let mut reasons = Vec::with_capacity(s.filters.len());
                let id = s.properties.subscription_identifiers.first().copied();
                let mut retained = Vec::new();
                for (f, opts) in s.filters {
                    let new = !self.subs.contains(&f);
                    let r = self.subscribe(f.clone(), opts, id, self.keep).await?;
                    // Retained messages: at subscribe (handling 0), or only for a new
                    // subscription (1); never to a shared subscription (§4.8.2).
                    if r < 0x80
                        && topic::shared(&f).is_none()
                        && (opts.retain_handling == 0 || (opts.retain_handling == 1 && new))
                    {
                        retained.push((f, opts));
                    }
                    reasons.push(r);
                }
                self.emit(&Packet::SubAck(SubAck {
                    packet_id: s.packet_id,
                    properties: Properties::default(),
                    reasons,
                }));
                // After the SUBACK (§3.8.4 allows either order): the device need not wait for
                // the retained store's answer to learn that it is subscribed.
                if !retained.is_empty() {
                    self.flush().await?;
                    // Asked once the subscription is attached: a retained message stored
                    // before its live copy went out is then found here if it was missed live.
                    for (f, opts) in retained {
                        let found = retained_queues(self.cfg, &f).await?;
                        self.send_retained(&f, opts, id, found).await?;
                    }
                }
                Ok(None)
            }
            p => self.on_packet(p),
        }
    }

    /// Handles one packet from the device that needs no wait; how the session ends if it does.
    fn on_packet(&mut self, p: Packet) -> Result<Option<End>, ConnError> {
        match p {
            Packet::Publish(p) => {
                self.busy().waiting.push_back(p);
                self.drain_waiting()?;
            }
            Packet::PubRel(a) => {
                let known = self
                    .rare
                    .as_mut()
                    .is_some_and(|r| r.qos2_stored.remove(&a.packet_id));
                let mut ack = Ack::new(a.packet_id);
                if !known {
                    ack.reason = reason::PACKET_IDENTIFIER_NOT_FOUND;
                }
                self.emit(&Packet::PubComp(ack));
            }
            Packet::PubAck(a) => self.acknowledged(a.packet_id)?,
            Packet::PubRec(a) => {
                if self.awaits_ack(a.packet_id) {
                    if a.reason >= 0x80 {
                        // Refused by the device: done with it (accepted: it will not retry).
                        self.acknowledged(a.packet_id)?;
                    } else {
                        // PUBCOMP, which completes it, follows.
                        self.emit(&Packet::PubRel(Ack::new(a.packet_id)));
                    }
                }
            }
            Packet::PubComp(a) => self.acknowledged(a.packet_id)?,
            Packet::Subscribe(_) => {
                // Handled by `on_slow`; never routed here.
                return Err(ConnError::Closed("SUBSCRIBE on the fast path"));
            }
            Packet::Unsubscribe(u) => {
                let mut reasons = Vec::with_capacity(u.filters.len());
                for f in u.filters {
                    reasons.push(match self.subs.remove(&f) {
                        Some(sub) => {
                            self.end_sub(sub, true)?;
                            reason::SUCCESS
                        }
                        None => reason::NO_SUBSCRIPTION_EXISTED,
                    });
                }
                self.emit(&Packet::UnsubAck(SubAck {
                    packet_id: u.packet_id,
                    properties: Properties::default(),
                    reasons,
                }));
            }
            Packet::PingReq => self.emit(&Packet::PingResp),
            Packet::Disconnect(d) => {
                return Ok(Some(End::Disconnected {
                    will: d.reason == reason::DISCONNECT_WITH_WILL,
                    expiry: d.properties.session_expiry_interval,
                }));
            }
            Packet::Auth(_) => {
                return Err(DecodeError::Protocol("AUTH without an authentication method").into());
            }
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => {
                return Err(DecodeError::Protocol("a packet only a server sends").into());
            }
        }
        Ok(None)
    }

    /// Publishes what waits, as far as credit goes.
    fn drain_waiting(&mut self) -> Result<(), ConnError> {
        while let Some(qos) = self
            .busy
            .as_ref()
            .and_then(|b| b.waiting.front())
            .map(|p| p.qos)
        {
            let link = if qos == QoS::AtMostOnce {
                self.pub0
            } else {
                self.pub1
            };
            let Some(link) = link else {
                return Err(ConnError::Closed("publishing link gone"));
            };
            if self.port.credit(link) == 0
                || !self.budget.as_mut().is_none_or(|b| b.take(Instant::now()))
            {
                break;
            }
            let Some(p) = self.busy.as_mut().and_then(|b| b.waiting.pop_front()) else {
                break;
            };
            self.publish(p, link)?;
        }
        Ok(())
    }

    fn publish(&mut self, mut p: Publish, link: LinkId) -> Result<(), ConnError> {
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias > TOPIC_ALIASES {
                return Err(ConnError::Reason(
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias above the maximum",
                ));
            }
            if p.topic.is_empty() {
                match self.rare.as_ref().and_then(|r| r.aliases.get(&alias)) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(ConnError::Reason(
                            reason::PROTOCOL_ERROR,
                            "topic alias not set",
                        ));
                    }
                }
            } else {
                self.rare().aliases.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return Err(DecodeError::Protocol("PUBLISH without a topic").into());
        }
        if p.topic.starts_with('$') {
            // `$` topics are not for messages between clients (§4.7.2; `$share` records
            // shared subscriptions): acknowledged as refused (MQTT 5) or dropped (3.1.1, as
            // a denied topic), never forwarded.
            if let Some(id) = p.packet_id {
                let mut ack = Ack::new(id);
                if self.v == Version::V5 {
                    ack.reason = reason::TOPIC_NAME_INVALID;
                }
                if p.qos == QoS::ExactlyOnce {
                    if self.v == Version::V311 {
                        self.rare().qos2_stored.insert(id);
                    }
                    self.emit(&Packet::PubRec(ack));
                } else {
                    self.emit(&Packet::PubAck(ack));
                }
            }
            return Ok(());
        }
        if p.qos == QoS::ExactlyOnce {
            let id = p.packet_id.unwrap_or(0);
            if self
                .rare
                .as_ref()
                .is_some_and(|r| r.qos2_stored.contains(&id))
            {
                // Resent after our PUBREC was lost: already stored.
                self.emit(&Packet::PubRec(Ack::new(id)));
                return Ok(());
            }
            if !self.rare().qos2_storing.insert(id) {
                return Ok(());
            }
        }
        let mut msg = BytesMut::new();
        bridge::to_amqp(&p, &self.client_id, &self.cfg.topic_prefix, &mut msg);
        let settled = p.qos == QoS::AtMostOnce;
        let tag = self.next_tag();
        // The address the message's `to` holds, handed along so that the router need not
        // read it back; the topic's own string when there is no prefix (no copy).
        let to = if self.cfg.topic_prefix.is_empty() {
            std::mem::take(&mut p.topic)
        } else {
            topic::name_address(&self.cfg.topic_prefix, &p.topic)
        };
        self.port.send(link, tag, msg.freeze(), Some(to), settled)?;
        if let (false, Some(id)) = (settled, p.packet_id) {
            self.busy().publishing.insert(tag, (id, p.qos));
        }
        Ok(())
    }

    fn next_tag(&mut self) -> u64 {
        self.tags = self.tags.wrapping_add(1);
        self.tags
    }

    /// Subscribes to `f`; `keep` makes it a durable subscription kept in the brokers. Retained
    /// messages are the caller's: a SUBSCRIBE sends them, a resumed session does not (its
    /// subscriptions are not new, §3.3.1.3).
    async fn subscribe(
        &mut self,
        f: String,
        opts: SubOptions,
        id: Option<u32>,
        keep: Keep,
    ) -> Result<u8, ConnError> {
        let durable = keep != Keep::No;
        let qos = opts.qos;
        // `$share/GROUP/FILTER`: the group's members compete for what FILTER collects.
        let shared = topic::shared(&f);
        let inner = shared.map_or(f.as_str(), |(_, inner)| inner);
        let Some(address) = topic::filter_address(&self.cfg.topic_prefix, inner) else {
            return Ok(if topic::valid_filter(inner) {
                // `$...` filters, or a literal `*` level (a wildcard in Enmesh).
                reason::IMPLEMENTATION_SPECIFIC_ERROR
            } else {
                reason::TOPIC_FILTER_INVALID
            });
        };
        if shared.is_some() && opts.no_local {
            // §3.8.3.1.
            return Err(ConnError::Reason(
                reason::PROTOCOL_ERROR,
                "no local on a shared subscription",
            ));
        }
        // A repeated filter replaces the subscription (§3.8.4): the old link goes.
        if let Some(old) = self.subs.remove(&f) {
            self.end_sub(old, true)?;
        }
        let presettled = qos == QoS::AtMostOnce;
        let credit = if presettled {
            256
        } else {
            u32::from(self.cfg.inflight)
        };
        let source = source(address, keep, shared.is_some());
        let name = match shared {
            Some((group, inner)) => shared_name(group, inner),
            None if durable => durable_name(&self.client_id, qos, &f),
            None => format!("{}:{}:{f}", self.port.id(), qos as u8),
        };
        let link = match self
            .port
            .attach(receiver_request(name, source, presettled), credit)
            .await
        {
            Ok(link) => link,
            Err(amqp::client::ClientError::Refused(e)) => {
                tracing::debug!("subscription {f} refused: {e:?}");
                return Ok(reason::UNSPECIFIED_ERROR);
            }
            Err(e) => return Err(e.into()),
        };
        // A persistent session's membership of a shared subscription (named by the group, not
        // by the client) is recorded as a durable subscription of the client's own that
        // collects nothing, so that a resume finds it like the others.
        let marker = if shared.is_some() && durable {
            match self.attach_marker(qos, &f).await {
                Ok(l) => Some(l),
                Err(e) => {
                    self.port.detach(link, false)?;
                    return Err(e);
                }
            }
        } else {
            None
        };
        // Events that arrived while attaching are handled by the main loop.
        let literal = (!inner.contains(['+', '#'])).then(|| inner.to_owned());
        self.subs.insert(
            f.clone(),
            Sub {
                link,
                opts,
                id,
                literal,
                marker,
            },
        );
        Ok(qos as u8)
    }

    /// Attaches the durable subscription that records shared filter `f` in this client's
    /// persistent session (address [`MARKER`], where nothing is published; no credit).
    async fn attach_marker(&mut self, qos: QoS, f: &str) -> Result<LinkId, ConnError> {
        let source = source(
            format!("{}{MARKER}", self.cfg.topic_prefix),
            self.keep,
            false,
        );
        let name = durable_name(&self.client_id, qos, f);
        Ok(self
            .port
            .attach(receiver_request(name, source, false), 0)
            .await?)
    }

    /// Ends a subscription's links (closing: the brokers drop what is only this session's).
    fn end_sub(&mut self, sub: Sub, closed: bool) -> Result<(), ConnError> {
        self.port.detach(sub.link, closed)?;
        if let Some(m) = sub.marker {
            self.port.detach(m, closed)?;
        }
        Ok(())
    }

    /// Replaces topic `p.topic`'s retained message by `p` (an empty payload just clears it):
    /// the topic's retained queue is purged, then `p` is stored there. Returns once the store
    /// accepted it (false: refused), so that the device's acknowledgement, and any subscribe
    /// after it, finds it there.
    async fn retain(&mut self, p: &Publish) -> Result<bool, ConnError> {
        let alias = p.properties.topic_alias;
        let topic = match alias.and_then(|a| self.rare.as_ref()?.aliases.get(&a)) {
            Some(t) if p.topic.is_empty() => t.clone(),
            _ => p.topic.clone(),
        };
        if topic.starts_with('$') {
            return Ok(true);
        }
        let Some(msg) = replace_retained(self.cfg, &self.client_id, p, &topic).await? else {
            return Ok(true);
        };
        // Unsettled: a pre-settled copy could still be on its way (or lost) when the device
        // hears PUBACK.
        let link = self.pub_link(QoS::AtLeastOnce).await?;
        self.wait_credit(link).await?;
        let tag = self.next_tag();
        self.port.send(link, tag, msg, None, false)?;
        Ok(self.wait_outcome(tag).await? == Outcome::Accepted)
    }

    /// Sends the retained messages whose topics match `f` (each its topic's last one), from
    /// `queues`, what [`retained_queues`] found for `f`.
    async fn send_retained(
        &mut self,
        f: &str,
        opts: SubOptions,
        id: Option<u32>,
        queues: Vec<crate::mgmt::Queue>,
    ) -> Result<(), ConnError> {
        let Some((_, prefix)) = retained_store(self.cfg) else {
            return Ok(());
        };
        for q in queues {
            let Some(topic) = q.address.strip_prefix(prefix) else {
                continue;
            };
            if q.depth == 0 || !topic::matches(f, topic) {
                continue;
            }
            let topic = topic.to_owned();
            if let Some(m) = self.browse_last(&q.address, q.depth).await? {
                let qos = m.qos.unwrap_or(QoS::AtLeastOnce).min(opts.qos);
                let mut properties = if self.v == Version::V5 {
                    m.properties
                } else {
                    Properties::default()
                };
                properties.subscription_identifiers = id.into_iter().collect();
                let mut p = Publish {
                    dup: false,
                    qos,
                    retain: true,
                    topic,
                    packet_id: (qos != QoS::AtMostOnce).then_some(0),
                    properties,
                    payload: m.payload,
                };
                if !self.fits(&p) {
                    // Too large for the device: not sent (MQTT-3.1.2-25).
                    continue;
                }
                if qos != QoS::AtMostOnce {
                    let id = self.free_id();
                    self.busy().out.insert(id, Outbound { from: None });
                    p.packet_id = Some(id);
                }
                self.emit(&Packet::Publish(p));
            }
        }
        Ok(())
    }

    /// Reads a retained queue without taking from it (deliveries are released) and returns
    /// its newest message.
    async fn browse_last(
        &mut self,
        queue: &str,
        depth: u64,
    ) -> Result<Option<bridge::Incoming>, ConnError> {
        let n = u32::try_from(depth.min(64)).unwrap_or(64);
        let name = format!("retained:{}", self.port.id());
        let source = amqp::Terminus::with_address(queue);
        let link = match self
            .port
            .attach(receiver_request(name, source, false), n)
            .await
        {
            Ok(l) => l,
            Err(amqp::client::ClientError::Refused(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while got.len() < n as usize {
            match tokio::time::timeout_at(deadline, self.port.events.recv()).await {
                Ok(Some(Ev::Delivery(d))) if d.link == link => got.push(d),
                Ok(Some(Ev::Closed)) | Ok(None) => {
                    return Err(ConnError::Closed("router connection gone"));
                }
                Ok(Some(e)) => self.busy().backlog.push_back(e),
                Err(_) => break,
            }
        }
        for d in &got {
            self.port
                .settle(link, d.delivery_id, DeliveryState::Released, 0)?;
        }
        self.port.detach(link, true)?;
        Ok(got
            .last()
            .and_then(|d| bridge::from_amqp(&d.payload, &self.cfg.topic_prefix).ok()))
    }

    /// Ends a subscription kept from an earlier session: attach it and detach it closed.
    async fn unsubscribe_kept(&mut self, f: &str, qos: QoS) -> Result<(), ConnError> {
        self.touch_kept(f, qos, Keep::Always, true).await
    }

    /// Attaches the links behind kept subscription `f` (without credit) with expiry `keep`,
    /// then detaches them: `closed` ends the subscription, otherwise it stays with that
    /// expiry (a durable attach sets its subscription's timeout in the brokers).
    async fn touch_kept(
        &mut self,
        f: &str,
        qos: QoS,
        keep: Keep,
        closed: bool,
    ) -> Result<(), ConnError> {
        for (name, source) in self.kept_links(f, qos, keep) {
            match self
                .port
                .attach(receiver_request(name, source, qos == QoS::AtMostOnce), 0)
                .await
            {
                Ok(link) => self.port.detach(link, closed)?,
                Err(amqp::client::ClientError::Refused(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The links (name and source, kept for `keep`) behind this client's subscription to
    /// filter `f` at `qos` in a persistent session: its durable subscription, or for a shared
    /// filter the record of its membership, then the group's subscription.
    fn kept_links(&self, f: &str, qos: QoS, keep: Keep) -> Vec<(String, amqp::Terminus)> {
        let prefix = &self.cfg.topic_prefix;
        let mut links = Vec::new();
        match topic::shared(f) {
            Some((group, inner)) => {
                let Some(address) = topic::filter_address(prefix, inner) else {
                    return links;
                };
                // The record, then the group's subscription (which the router keeps while
                // another member reads it).
                let marker = format!("{prefix}{MARKER}");
                links.push((
                    durable_name(&self.client_id, qos, f),
                    source(marker, keep, false),
                ));
                links.push((shared_name(group, inner), source(address, keep, true)));
            }
            None => {
                if let Some(address) = topic::filter_address(prefix, f) {
                    links.push((
                        durable_name(&self.client_id, qos, f),
                        source(address, keep, false),
                    ));
                }
            }
        }
        links
    }

    /// Gives the session's subscriptions a new expiry (an MQTT 5 DISCONNECT's session expiry
    /// interval): each is detached and attached once more with it, which the brokers take as
    /// the subscription's new timeout, then detached as the connection ends.
    async fn rekeep(&mut self, keep: Keep) -> Result<(), ConnError> {
        self.keep = keep;
        for (f, sub) in std::mem::take(&mut self.subs.0) {
            let qos = sub.opts.qos;
            self.end_sub(sub, false)?;
            self.touch_kept(&f, qos, keep, false).await?;
        }
        Ok(())
    }

    /// Ends every subscription (closing detaches: durable ones are deleted).
    fn unsubscribe_all(&mut self) {
        for sub in self.subs.drain() {
            let _ = self.end_sub(sub, true);
        }
    }

    fn on_amqp(&mut self, e: Ev) -> Result<(), ConnError> {
        match e {
            Ev::Outcome { tag, outcome } => {
                if let Some((packet_id, qos)) =
                    self.busy.as_mut().and_then(|b| b.publishing.remove(&tag))
                {
                    self.published(packet_id, qos, outcome)?;
                }
            }
            Ev::Credit {
                link,
                credit,
                applied,
            } => self.port.credit_report(link, credit, applied),
            Ev::Delivery(d) => self.deliver(d)?,
            Ev::LinkClosed { link, error } => {
                if Some(link) == self.pub0 || Some(link) == self.pub1 {
                    return Err(ConnError::Closed("router detached a publishing link"));
                }
                if let Some((f, _)) = self.subs.remove_link(link) {
                    tracing::debug!("subscription {f} ended by the router: {error:?}");
                }
            }
            Ev::Closed => return Err(ConnError::Closed("router closed the connection")),
        }
        Ok(())
    }

    /// The router's outcome for a device's QoS 1/2 message.
    fn published(&mut self, packet_id: u16, qos: QoS, outcome: Outcome) -> Result<(), ConnError> {
        let code = match outcome {
            Outcome::Accepted => reason::SUCCESS,
            Outcome::Released => reason::NO_MATCHING_SUBSCRIBERS,
            Outcome::Refused => reason::UNSPECIFIED_ERROR,
        };
        if code >= 0x80 && self.v == Version::V311 {
            // 3.1.1 has no negative acknowledgement: close without one, the device resends.
            return Err(ConnError::Closed("the router refused a message"));
        }
        let mut ack = Ack::new(packet_id);
        ack.reason = code;
        if qos == QoS::ExactlyOnce {
            let rare = self.rare();
            rare.qos2_storing.remove(&packet_id);
            if code < 0x80 {
                rare.qos2_stored.insert(packet_id);
            }
            self.emit(&Packet::PubRec(ack));
        } else {
            self.emit(&Packet::PubAck(ack));
        }
        Ok(())
    }

    fn deliver(&mut self, d: mux::Delivery) -> Result<(), ConnError> {
        let Some((_, sub)) = self.subs.by_link(d.link) else {
            // A subscription just removed: give the message back.
            if !d.settled {
                self.port
                    .settle(d.link, d.delivery_id, DeliveryState::Released, 0)?;
            }
            return Ok(());
        };
        let (link, opts, sub_id, literal) = (sub.link, sub.opts, sub.id, sub.literal.clone());
        let sub_qos = opts.qos;
        let m = match bridge::from_amqp(&d.payload, &self.cfg.topic_prefix) {
            Ok(m) => m,
            Err(_) => {
                self.reject(&d)?;
                return Ok(());
            }
        };
        if opts.no_local && m.publisher.as_deref() == Some(self.client_id.as_bytes()) {
            // Its own message on a no-local subscription: taken, not sent.
            self.consumed(link, &d)?;
            return Ok(());
        }
        let Some(topic) = m.topic.clone().or(literal) else {
            // No topic to give it: an AMQP message without `to` on a wildcard subscription.
            self.reject(&d)?;
            return Ok(());
        };
        let qos = m.qos.unwrap_or(QoS::AtLeastOnce).min(sub_qos);
        let unacknowledged = self.busy.as_ref().map_or(0, |b| b.out.len());
        if qos != QoS::AtMostOnce && !d.settled && unacknowledged >= usize::from(self.receive_max) {
            // The device's receive maximum is reached: wait for an acknowledgement.
            self.busy().held.push_back(d);
            return Ok(());
        }
        let mut properties = if self.v == Version::V5 {
            m.properties
        } else {
            Properties::default()
        };
        properties.subscription_identifiers = sub_id.into_iter().collect();
        let retain = opts.retain_as_published && m.retain;
        let payload = m.payload;
        let qos = if d.settled { QoS::AtMostOnce } else { qos };
        let mut p = Publish {
            dup: false,
            qos,
            retain,
            topic,
            packet_id: (qos != QoS::AtMostOnce).then_some(0),
            properties,
            payload,
        };
        if !self.fits(&p) {
            // Too large for the device: dropped as if it had been sent and acknowledged
            // (MQTT-3.1.2-25), so it is neither redelivered nor held back.
            return self.consumed(link, &d);
        }
        if qos != QoS::AtMostOnce {
            let id = self.free_id();
            self.busy().out.insert(
                id,
                Outbound {
                    from: Some((link, d.delivery_id)),
                },
            );
            p.packet_id = Some(id);
        }
        let sent_once = p.packet_id.is_none();
        self.emit(&Packet::Publish(p));
        if sent_once {
            self.consumed(link, &d)?;
        }
        Ok(())
    }

    /// A delivery done with at once (QoS 0 out, or skipped): accepted, and its credit back.
    fn consumed(&mut self, link: LinkId, d: &mux::Delivery) -> Result<(), ConnError> {
        if d.settled {
            self.port.add_credit(link, 1)?;
        } else {
            self.port
                .settle(link, d.delivery_id, DeliveryState::Accepted, 1)?;
        }
        Ok(())
    }

    /// A delivery the device cannot be given: rejected, and its credit back.
    fn reject(&mut self, d: &mux::Delivery) -> Result<(), ConnError> {
        if d.settled {
            self.port.add_credit(d.link, 1)?;
        } else {
            self.port
                .settle(d.link, d.delivery_id, DeliveryState::Rejected(None), 1)?;
        }
        Ok(())
    }

    fn free_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.awaits_ack(id) {
                return id;
            }
        }
    }

    /// The device acknowledged outbound `packet_id` (PUBACK for QoS 1, PUBCOMP for QoS 2).
    fn acknowledged(&mut self, packet_id: u16) -> Result<(), ConnError> {
        let Some(o) = self.busy.as_mut().and_then(|b| b.out.remove(&packet_id)) else {
            return Ok(());
        };
        let Some((link, delivery_id)) = o.from else {
            return Ok(());
        };
        self.port
            .settle(link, delivery_id, DeliveryState::Accepted, 1)?;
        // A slot under the device's receive maximum: the next held delivery goes out.
        if let Some(d) = self.busy.as_mut().and_then(|b| b.held.pop_front()) {
            self.deliver(d)?;
        }
        Ok(())
    }
}

/// A token bucket: `rate` PUBLISHes per second, at most one second's worth saved up.
struct Budget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn new(rate: u32) -> Budget {
        Budget {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    /// Takes one token if there is one (always, without a limit).
    fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is there (none without a limit).
    fn next(&self) -> Option<Instant> {
        (self.rate > 0.0)
            .then(|| self.at + Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0)))
    }
}

/// What [`Session::read_packets`] stopped at.
enum Step {
    /// Nothing more to handle now.
    Idle,
    End(End),
    /// A packet to handle in [`Session::on_slow`].
    Slow(Box<Packet>),
}

enum Woke {
    Mqtt(io::Result<usize>),
    Amqp(Woken),
    Timer,
}

/// A timer for `at` (`None`: a timer that is never polled, so never registered): a bare
/// `Sleep`, the smallest timer future.
fn sleep_until(at: Option<Instant>) -> tokio::time::Sleep {
    let at = at.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
    tokio::time::sleep_until(at.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle device costs the gateway is mostly the future its task keeps: the rare
    /// steps (CONNECT, SUBSCRIBE, retained messages, the will, a WebSocket handshake) and the
    /// session are boxed so that it stays small (it was 8 KB, then 1.5 KB).
    #[tokio::test]
    async fn an_idle_device_keeps_a_small_future() {
        let cfg = Config::default();
        let clients = Clients::default();
        let pool = Pool::new(amqp::pipe::Dialer::Tcp("127.0.0.1:1".into()), 10);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let f = connection(Box::new(a), false, &cfg, &clients, &pool, false);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 384, "connection future: {size} bytes");
        assert!(std::mem::size_of::<Ev>() <= 48);
    }
}
