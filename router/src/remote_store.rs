//! A router's connection to a remote broker (`enmesh broker`): the same request channel the
//! in-process shard offers, carried over [`broker::remote`]'s protocol, following the shard's
//! leader.
//!
//! A leader change (or a broken connection) is invisible to clients when the shard is back
//! within [`RESUME_WINDOW`]: this task keeps what the broker has not confirmed and replays it
//! on the new connection.
//! - Every message and settlement carries a completion tag (its own when the core gave none)
//!   and stays here until the broker confirms it. Messages are sent as [`Request::Once`] with
//!   this task's origin and a sequence number, so a resent one that was committed after all
//!   is dropped by the state machine: no duplicates.
//! - Consumers are resumed ([`Request::Resume`]) under new ids: the messages their clients
//!   hold stay theirs, anything delivered but never received goes back to the queue, and
//!   deliveries still on their way to the old id are recognisably stale.
//! - Declarations and subscriptions bound are replayed (they are idempotent).
//!
//! If no broker serves the shard within the window, what waits fails: producers see
//! `rejected`, consumers are detached with an error telling them to reattach; requests keep
//! failing at once until the shard is back. A request the broker fails is retried at the
//! leader (deduplicated) up to [`MAX_ATTEMPTS`] times before its failure is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::time::Duration;

use broker::remote::{ToBroker, ToRouter, encode_request, read_frame, write_frame};
use broker::service::{Request, StoreError, Tag};
use broker::shard::Target;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::core::ToCore;

/// How long requests and consumers wait for a broker to serve the shard again.
pub const RESUME_WINDOW: Duration = Duration::from_secs(10);
/// Attempts at a request the broker failed before the failure reaches the core.
const MAX_ATTEMPTS: u32 = 3;
/// Tags chosen here (for messages and settlements the core did not tag) have this bit; the
/// core's tags are a counter that stays far below it.
const OWN_TAG: u64 = 1 << 39;
/// Consumer ids on the wire are below this (the broker puts its connection number above).
const WIRE_IDS: u64 = 1 << 40;

/// Connects to the broker serving shard `shard`, trying `addrs` in turn and following
/// "not leader" answers (waiting up to `wait` for a first broker to answer), and returns the
/// request channel; answers go to `core`.
pub async fn connect(
    addrs: Vec<String>,
    shard: u32,
    core: mpsc::Sender<Vec<ToCore>>,
    wait: Duration,
) -> std::io::Result<mpsc::UnboundedSender<Request>> {
    if addrs.is_empty() {
        return Err(std::io::Error::other("no broker address"));
    }
    let deadline = Instant::now() + wait;
    let mut dialer = Dialer::new(addrs, shard);
    let first = loop {
        match dialer.dial().await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("no broker serves shard {shard}: {e}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let origin = std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        shard,
        std::time::SystemTime::now(),
    ));
    let session = Session::new(origin, core);
    tokio::spawn(run(dialer, Some(first), rx, session));
    Ok(tx)
}

/// Finds the broker that serves a shard: a hint from the last "not leader" answer first, else
/// the configured addresses in turn.
struct Dialer {
    addrs: Vec<String>,
    next: usize,
    hint: Option<String>,
    shard: u32,
}

impl Dialer {
    fn new(addrs: Vec<String>, shard: u32) -> Dialer {
        Dialer {
            addrs,
            next: 0,
            hint: None,
            shard,
        }
    }

    /// One attempt: connect, say hello, and get welcomed (or redirected: then the hint is kept
    /// for the next attempt and this one fails). Returns the socket and the connection number.
    async fn dial(&mut self) -> std::io::Result<(TcpStream, u64)> {
        let addr = match self.hint.take() {
            Some(h) => h,
            None => {
                let a = self.addrs[self.next % self.addrs.len()].clone();
                self.next += 1;
                a
            }
        };
        let mut sock = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        let _ = sock.set_nodelay(true);
        let mut buf = Vec::new();
        let hello = ToBroker::Hello { shard: self.shard };
        write_frame(&mut sock, &mut buf, |o| hello.encode(o)).await?;
        let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut sock))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no welcome"))??
            .ok_or_else(|| std::io::Error::other("closed before welcome"))?;
        match ToRouter::decode(&frame)? {
            ToRouter::Welcome { conn } => Ok((sock, conn)),
            ToRouter::NotLeader { leader } => {
                self.hint = leader;
                Err(std::io::Error::other(format!(
                    "{addr} does not lead shard {}",
                    self.shard
                )))
            }
            _ => Err(std::io::Error::other("unexpected answer to hello")),
        }
    }
}

/// A consumer of the core, as the broker knows it.
struct Consumer {
    target: Target,
    /// Its id on the current (or last) connection.
    wire: u64,
    /// The connection it was last attached through (`None`: not yet attached anywhere).
    conn: Option<u64>,
    /// Deliveries handed to the core since the core attached it (the core's count).
    delivered: u32,
    /// `delivered` when it was last (re)attached: the broker counts from there.
    base: u32,
    /// The core's last absolute credit limit (in the core's count).
    limit: u32,
    /// Delivered to the core and not settled by it.
    held: BTreeSet<u64>,
    /// Full ids (`conn << 40 | wire`) it had on earlier connections since a delivery last
    /// proved the broker applied its current id: a resume sent just before the connection
    /// broke again may never have reached the log, and then an older id still holds its
    /// messages. The next resume names them all.
    unconfirmed: Vec<u64>,
}

/// A message or settlement the broker has not confirmed yet.
struct Sent {
    order: u64,
    /// Consumer ids in it are the core's (translated when sent).
    request: Request,
    attempts: u32,
}

/// What survives reconnections: everything needed to replay the unconfirmed.
struct Session {
    core: mpsc::Sender<Vec<ToCore>>,
    origin: u64,
    next_seq: u64,
    next_order: u64,
    next_own: u64,
    next_wire: u64,
    sent: HashMap<Tag, Sent>,
    consumers: HashMap<u64, Consumer>,
    /// Wire id → core consumer id.
    wires: HashMap<u64, u64>,
    declares: BTreeMap<String, Request>,
    bindings: BTreeMap<String, Request>,
    /// The current connection's number, while connected.
    conn: Option<u64>,
    infos: HashMap<u64, oneshot::Sender<Vec<broker::shard::QueueInfo>>>,
    next_info: u64,
}

/// A frame to write: a message of its own, or an unconfirmed request (encoded from where
/// it is kept, so a message body is never copied).
enum Frame {
    Now(ToBroker),
    Sent(Tag),
    /// The kept declaration of a queue, or request about a named subscription.
    Declare(String),
    Binding(String),
}

type Out = Vec<Frame>;

impl Session {
    fn new(origin: u64, core: mpsc::Sender<Vec<ToCore>>) -> Session {
        Session {
            core,
            origin,
            next_seq: 1,
            next_order: 0,
            next_own: OWN_TAG,
            next_wire: 1,
            sent: HashMap::new(),
            consumers: HashMap::new(),
            wires: HashMap::new(),
            declares: BTreeMap::new(),
            bindings: BTreeMap::new(),
            conn: None,
            infos: HashMap::new(),
            next_info: 0,
        }
    }

    fn wire_id(&mut self, core: u64) -> u64 {
        let w = self.next_wire;
        self.next_wire = (self.next_wire + 1) % WIRE_IDS;
        self.wires.insert(w, core);
        w
    }

    /// The wire form of an unconfirmed request (consumer ids translated; messages wrapped
    /// for deduplication).
    fn wire_form(&self, s: &Sent) -> Option<Request> {
        Some(match &s.request {
            Request::Settle {
                consumer,
                seq,
                outcome,
                done,
            } => Request::Settle {
                consumer: self.consumers.get(consumer)?.wire,
                seq: *seq,
                outcome: *outcome,
                done: *done,
            },
            _ => return None,
        })
    }

    /// Takes a request from the core; adds what to send now to `out` (nothing while
    /// disconnected: it is kept for the next connection).
    async fn on_request(&mut self, r: Request, out: &mut Out) {
        let connected = self.conn.is_some();
        match r {
            Request::Enqueue { .. } | Request::Publish { .. } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let once = Request::Once {
                    origin: self.origin,
                    seq,
                    request: Box::new(r),
                };
                self.keep(once, connected.then_some(out));
            }
            Request::Settle {
                consumer,
                seq,
                done,
                ..
            } => {
                let Some(c) = self.consumers.get_mut(&consumer) else {
                    // Its consumer is gone: the broker returns what it held.
                    if let Some(t) = done {
                        let _ = self
                            .core
                            .send(vec![ToCore::Stored(vec![(t, Err(lost()))])])
                            .await;
                    }
                    return;
                };
                c.held.remove(&seq);
                self.keep(r, connected.then_some(out));
            }
            Request::Attach {
                consumer,
                address,
                credit,
            } => {
                let target = Target::Queue { address };
                self.add_consumer(consumer, target, credit, connected.then_some(out));
            }
            Request::Subscribe {
                consumer,
                name,
                filter,
                durable,
                credit,
            } => {
                let target = Target::Subscription {
                    name,
                    filter,
                    durable,
                };
                self.add_consumer(consumer, target, credit, connected.then_some(out));
            }
            Request::Credit { consumer, credit } => {
                let Some(c) = self.consumers.get_mut(&consumer) else {
                    return;
                };
                c.limit = credit;
                if connected {
                    out.push(Frame::Now(ToBroker::Request(Request::Credit {
                        consumer: c.wire,
                        credit: credit.wrapping_sub(c.base),
                    })));
                }
            }
            Request::Detach { consumer } => {
                // Pending settlements of its messages go with it (the broker returns them).
                self.sent.retain(|_, s| {
                    !matches!(s.request, Request::Settle { consumer: c, .. } if c == consumer)
                });
                let Some(c) = self.consumers.remove(&consumer) else {
                    return;
                };
                self.wires.remove(&c.wire);
                if connected && c.conn == self.conn {
                    out.push(Frame::Now(ToBroker::Request(Request::Detach {
                        consumer: c.wire,
                    })));
                }
                // Attached through an earlier connection: the broker detaches it after its
                // grace period.
            }
            Request::Declare { ref address, .. } => {
                let a = address.clone();
                self.declares.insert(a.clone(), r);
                if connected {
                    out.push(Frame::Declare(a));
                }
            }
            Request::Bind { ref name, .. } | Request::Unsubscribe { ref name } => {
                let n = name.clone();
                self.bindings.insert(n.clone(), r);
                if connected {
                    out.push(Frame::Binding(n));
                }
            }
            Request::Info { prefix, reply } => {
                if connected {
                    self.next_info += 1;
                    self.infos.insert(self.next_info, reply);
                    out.push(Frame::Now(ToBroker::Info {
                        id: self.next_info,
                        prefix,
                    }));
                } else {
                    let _ = reply.send(Vec::new());
                }
            }
            // Management: sent if connected, not replayed.
            r @ (Request::Purge { .. } | Request::Expire { .. }) => {
                if connected {
                    out.push(Frame::Now(ToBroker::Request(r)));
                }
            }
            // Made here only.
            Request::Once { .. } | Request::Resume { .. } => {}
        }
    }

    /// Remembers an unconfirmed message or settlement (tagging it here if the core did not)
    /// and sends it if connected.
    fn keep(&mut self, mut request: Request, out: Option<&mut Out>) {
        let Some(done) = done_mut(&mut request) else {
            return;
        };
        let next_own = &mut self.next_own;
        let tag = *done.get_or_insert_with(|| {
            *next_own += 1;
            *next_own - 1
        });
        let s = Sent {
            order: self.next_order,
            request,
            attempts: 0,
        };
        self.next_order += 1;
        self.sent.insert(tag, s);
        if let Some(out) = out {
            out.push(Frame::Sent(tag));
        }
    }

    fn add_consumer(&mut self, core: u64, target: Target, credit: u32, out: Option<&mut Out>) {
        let wire = self.wire_id(core);
        let c = Consumer {
            target,
            wire,
            // Attached through the current connection, if any (else when one comes).
            conn: out.as_ref().and(self.conn),
            delivered: 0,
            base: 0,
            limit: credit,
            held: BTreeSet::new(),
            unconfirmed: Vec::new(),
        };
        if let Some(out) = out {
            out.push(Frame::Now(ToBroker::Request(attach_request(&c))));
        }
        self.consumers.insert(core, c);
    }

    /// A new connection: replay declarations, resume consumers, resend the unconfirmed.
    fn connected(&mut self, conn: u64, out: &mut Out) {
        self.conn = Some(conn);
        out.extend(self.declares.keys().cloned().map(Frame::Declare));
        out.extend(self.bindings.keys().cloned().map(Frame::Binding));
        // Settlements not confirmed yet: their messages stay with the consumer.
        let mut settling: HashMap<u64, Vec<u64>> = HashMap::new();
        for s in self.sent.values() {
            if let Request::Settle { consumer, seq, .. } = &s.request {
                settling.entry(*consumer).or_default().push(*seq);
            }
        }
        let cores: Vec<u64> = self.consumers.keys().copied().collect();
        for core in cores {
            let wire = self.wire_id(core);
            let Some(c) = self.consumers.get_mut(&core) else {
                continue;
            };
            let old = std::mem::replace(&mut c.wire, wire);
            self.wires.remove(&old);
            let prev = c.conn.replace(conn);
            c.base = c.delivered;
            let credit = c.limit.wrapping_sub(c.base);
            let r = match prev {
                Some(prev) => {
                    let mut keep: Vec<u64> = c.held.iter().copied().collect();
                    let settling = settling.remove(&core).unwrap_or_default();
                    tracing::info!(
                        "resuming consumer {core}: held {}, settling {}, credit {credit}",
                        keep.len(),
                        settling.len()
                    );
                    keep.extend(settling);
                    c.unconfirmed.push((prev << 40) | old);
                    if c.unconfirmed.len() > broker::shard::MAX_RESUMED_IDS {
                        // Keep the oldest (the last one known applied) and the newest.
                        c.unconfirmed.remove(1);
                    }
                    Request::Resume {
                        old: c.unconfirmed.clone(),
                        consumer: wire,
                        target: c.target.clone(),
                        keep,
                        credit,
                    }
                }
                None => attach_request(c),
            };
            out.push(Frame::Now(ToBroker::Request(r)));
        }
        let mut replay: Vec<(u64, Tag)> = self.sent.iter().map(|(t, s)| (s.order, *t)).collect();
        replay.sort_unstable();
        out.extend(replay.into_iter().map(|(_, t)| Frame::Sent(t)));
    }

    /// The connection is gone: everything stays for the next one, but management questions
    /// in flight get an empty answer.
    fn disconnected(&mut self) {
        self.conn = None;
        for (_, reply) in self.infos.drain() {
            let _ = reply.send(Vec::new());
        }
    }

    /// No broker came back within the window: fail what waits, detach the consumers.
    async fn give_up(&mut self) {
        let mut out = Vec::new();
        let failed: Vec<_> = self
            .sent
            .drain()
            .filter(|(t, _)| !own(*t))
            .map(|(t, _)| (t, Err(lost())))
            .collect();
        if !failed.is_empty() {
            out.push(ToCore::Stored(failed));
        }
        let consumers: Vec<u64> = self.consumers.drain().map(|(k, _)| k).collect();
        self.wires.clear();
        if !consumers.is_empty() {
            out.push(ToCore::StoreLost { consumers });
        }
        if !out.is_empty() {
            let _ = self.core.send(out).await;
        }
    }

    /// A frame from the broker. `Err(())` when the connection should be dropped and the
    /// unconfirmed retried (the broker failed something that may succeed at the leader).
    async fn on_frame(&mut self, m: ToRouter) -> Result<(), ()> {
        let to_core = match m {
            ToRouter::Pong
            | ToRouter::Welcome { .. }
            | ToRouter::NotLeader { .. }
            | ToRouter::Admin { .. } => {
                return Ok(());
            }
            ToRouter::Deliveries(mut ds) => {
                ds.retain_mut(|d| {
                    // Deliveries to an id replaced by a resume are stale: the broker took
                    // those messages back when it applied the resume.
                    let Some(&core) = self.wires.get(&d.consumer) else {
                        return false;
                    };
                    let Some(c) = self.consumers.get_mut(&core) else {
                        return false;
                    };
                    if c.wire != d.consumer {
                        return false;
                    }
                    c.delivered = c.delivered.wrapping_add(1);
                    c.held.insert(d.seq);
                    // The broker knows the current id: the earlier ones are settled.
                    c.unconfirmed.clear();
                    d.consumer = core;
                    true
                });
                if ds.is_empty() {
                    return Ok(());
                }
                ToCore::StoreDeliveries(ds)
            }
            ToRouter::Done(list) => {
                let mut report = Vec::with_capacity(list.len());
                let mut retry = false;
                for (tag, r) in list {
                    let Some(mut s) = self.sent.remove(&tag) else {
                        if !own(tag) {
                            report.push((tag, r));
                        }
                        continue;
                    };
                    match &r {
                        // Leadership moved before it committed: not a failure, resent to
                        // the new leader when the session reconnects (within the window).
                        Err(StoreError::Moved) => {
                            self.sent.insert(tag, s);
                            retry = true;
                            continue;
                        }
                        Err(StoreError::Failed(why)) => {
                            s.attempts += 1;
                            if s.attempts < MAX_ATTEMPTS {
                                tracing::warn!("broker failed a request ({why}); retrying");
                                self.sent.insert(tag, s);
                                retry = true;
                                continue;
                            }
                        }
                        _ => {}
                    }
                    if !own(tag) {
                        report.push((tag, r));
                    }
                }
                if !report.is_empty() && self.core.send(vec![ToCore::Stored(report)]).await.is_err()
                {
                    return Ok(());
                }
                return if retry { Err(()) } else { Ok(()) };
            }
            ToRouter::Info { id, queues } => {
                if let Some(reply) = self.infos.remove(&id) {
                    let _ = reply.send(queues);
                }
                return Ok(());
            }
        };
        let _ = self.core.send(vec![to_core]).await;
        Ok(())
    }
}

/// Whether a tag was chosen here (its completion is not the core's business).
fn own(tag: Tag) -> bool {
    tag & OWN_TAG != 0
}

/// The completion tag of a message (inside `Once`) or settlement.
fn done_mut(r: &mut Request) -> Option<&mut Option<Tag>> {
    match r {
        Request::Enqueue { done, .. }
        | Request::Publish { done, .. }
        | Request::Settle { done, .. } => Some(done),
        Request::Once { request, .. } => done_mut(request),
        _ => None,
    }
}

/// The request attaching a consumer that was never attached (credit in the broker's count).
fn attach_request(c: &Consumer) -> Request {
    let credit = c.limit.wrapping_sub(c.base);
    match &c.target {
        Target::Queue { address } => Request::Attach {
            consumer: c.wire,
            address: address.clone(),
            credit,
        },
        Target::Subscription {
            name,
            filter,
            durable,
        } => Request::Subscribe {
            consumer: c.wire,
            name: name.clone(),
            filter: filter.clone(),
            durable: *durable,
            credit,
        },
    }
}

fn lost() -> StoreError {
    StoreError::Failed("no broker serves this address's shard; the message was not stored".into())
}

async fn run(
    mut dialer: Dialer,
    mut sock: Option<(TcpStream, u64)>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    mut session: Session,
) {
    let mut failures = 0u32;
    // Set while disconnected with something to resume: when waiting ends.
    let mut give_up_at: Option<Instant> = None;
    loop {
        let Some((s, conn)) = sock.take() else {
            // No broker serves the shard right now: keep what waits (or, past the window,
            // fail it) while retrying (quickly at first: a new leader is usually elected
            // within a second).
            let pause = Duration::from_millis(if failures < 10 { 100 } else { 1000 });
            let retry = tokio::time::sleep(pause);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut retry => break,
                    r = requests.recv() => match r {
                        Some(r) => {
                            let mut out = Vec::new();
                            session.on_request(r, &mut out).await;
                            if give_up_at.is_none() {
                                // Past the window: requests fail at once.
                                session.give_up().await;
                            }
                        }
                        None => return,
                    },
                }
            }
            if give_up_at.is_some_and(|t| Instant::now() >= t) {
                tracing::warn!(
                    "no broker serves shard {} after {:?}: failing what waited",
                    dialer.shard,
                    RESUME_WINDOW
                );
                session.give_up().await;
                give_up_at = None;
            }
            match dialer.dial().await {
                Ok(s) => {
                    tracing::info!("broker for shard {} reachable again", dialer.shard);
                    failures = 0;
                    sock = Some(s);
                }
                Err(_) => failures += 1,
            }
            continue;
        };
        let gone = serve(s, conn, &mut requests, &mut session).await;
        session.disconnected();
        match gone {
            Ok(false) => return,
            Ok(true) => tracing::warn!("broker of shard {} closed the connection", dialer.shard),
            Err(e) => tracing::warn!("broker of shard {}: {e}", dialer.shard),
        }
        give_up_at = Some(Instant::now() + RESUME_WINDOW);
        // Reconnect at once (the same broker may still lead, or tell us who does).
        if let Ok(s) = dialer.dial().await {
            sock = Some(s);
        }
    }
}

async fn write_all(
    wr: &mut OwnedWriteHalf,
    buf: &mut Vec<u8>,
    out: Out,
    session: &Session,
) -> std::io::Result<()> {
    for f in out {
        match f {
            Frame::Now(m) => write_frame(wr, buf, |o| m.encode(o)).await?,
            Frame::Declare(a) => {
                if let Some(r) = session.declares.get(&a) {
                    write_frame(wr, buf, |o| encode_request(r, o)).await?;
                }
            }
            Frame::Binding(n) => {
                if let Some(r) = session.bindings.get(&n) {
                    write_frame(wr, buf, |o| encode_request(r, o)).await?;
                }
            }
            Frame::Sent(tag) => {
                let Some(s) = session.sent.get(&tag) else {
                    continue;
                };
                match session.wire_form(s) {
                    Some(w) => write_frame(wr, buf, |o| encode_request(&w, o)).await?,
                    None => write_frame(wr, buf, |o| encode_request(&s.request, o)).await?,
                }
            }
        }
    }
    Ok(())
}

/// Runs one connection; `Ok(true)` when the broker went away, `Ok(false)` when the router
/// is shutting down.
async fn serve(
    sock: TcpStream,
    conn: u64,
    requests: &mut mpsc::UnboundedReceiver<Request>,
    session: &mut Session,
) -> std::io::Result<bool> {
    let (mut rd, mut wr) = sock.into_split();
    let (frames_tx, mut frames) = mpsc::channel::<std::io::Result<Option<Vec<u8>>>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let f = read_frame(&mut rd).await;
            let end = !matches!(f, Ok(Some(_)));
            if frames_tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    let mut buf = Vec::new();
    let mut out = Vec::new();
    session.connected(conn, &mut out);
    // Liveness: a ping twice a second; no frame for this long means the broker is gone or
    // cut off (a partition drops packets silently, TCP would take minutes to notice).
    let silence = Duration::from_millis(1500);
    let mut ping = tokio::time::interval(Duration::from_millis(500));
    let mut last_frame = Instant::now();
    let result = loop {
        if !out.is_empty()
            && let Err(e) = write_all(&mut wr, &mut buf, std::mem::take(&mut out), session).await
        {
            break Err(e);
        }
        tokio::select! {
            _ = ping.tick() => {
                if last_frame.elapsed() > silence {
                    break Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "broker silent",
                    ));
                }
                out.push(Frame::Now(ToBroker::Ping));
            }
            r = requests.recv() => {
                let Some(r) = r else {
                    // Shutting down: the broker may detach this router's consumers now.
                    let bye = vec![Frame::Now(ToBroker::Bye)];
                    let _ = write_all(&mut wr, &mut buf, bye, session).await;
                    break Ok(false);
                };
                session.on_request(r, &mut out).await;
            }
            f = frames.recv() => {
                let frame = match f {
                    Some(Ok(Some(frame))) => {
                        last_frame = Instant::now();
                        frame
                    }
                    Some(Err(e)) => break Err(e),
                    _ => break Ok(true),
                };
                let m = match ToRouter::decode(&frame) {
                    Ok(m) => m,
                    Err(e) => break Err(e),
                };
                // Leadership moved while connected: reconnect (to the leader if named).
                if matches!(m, ToRouter::NotLeader { .. } | ToRouter::Welcome { .. }) {
                    break Ok(true);
                }
                if session.on_frame(m).await.is_err() {
                    break Ok(true);
                }
            }
        }
    };
    reader.abort();
    result
}
