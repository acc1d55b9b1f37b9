//! A router's connection to a remote broker (`enmesh broker`): the same request channel the
//! in-process shard offers, carried over [`broker::remote`]'s protocol.
//!
//! While the broker is unreachable the router keeps serving everything else: store requests
//! that wait for an answer fail at once (`rejected` for producers), consumers of brokered
//! addresses are detached with an error telling them to reattach, and the connection is retried
//! every second. Requests in flight when the connection drops are failed too: a producer whose
//! message was in doubt sees `rejected` and may send it again (at-least-once).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use broker::remote::{ToBroker, ToRouter, read_frame, write_frame};
use broker::service::{Request, StoreError, Tag};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::core::ToCore;

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
    let deadline = tokio::time::Instant::now() + wait;
    let mut dialer = Dialer::new(addrs, shard);
    let sock = loop {
        match dialer.dial().await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("no broker serves shard {shard}: {e}"),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(dialer, Some(sock), rx, core));
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
    /// for the next attempt and this one fails).
    async fn dial(&mut self) -> std::io::Result<TcpStream> {
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
            ToRouter::Welcome => Ok(sock),
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

/// What is waiting for the broker on the current connection.
#[derive(Default)]
struct Pending {
    tags: HashSet<Tag>,
    infos: HashMap<u64, oneshot::Sender<Vec<broker::shard::QueueInfo>>>,
    consumers: HashSet<u64>,
    next_info: u64,
}

async fn run(
    mut dialer: Dialer,
    mut sock: Option<TcpStream>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    core: mpsc::Sender<Vec<ToCore>>,
) {
    let mut failures = 0u32;
    loop {
        let Some(s) = sock.take() else {
            // No broker serves the shard right now: refuse what needs an answer while
            // retrying (quickly at first: a new leader is usually elected within a second).
            let pause = Duration::from_millis(if failures < 10 { 100 } else { 1000 });
            let retry = tokio::time::sleep(pause);
            tokio::pin!(retry);
            loop {
                tokio::select! {
                    _ = &mut retry => break,
                    r = requests.recv() => match r {
                        Some(r) => refuse(r, &core).await,
                        None => return,
                    },
                }
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
        let mut pending = Pending::default();
        let gone = serve(s, &mut requests, &core, &mut pending).await;
        match gone {
            Ok(false) => return,
            Ok(true) => tracing::warn!("broker of shard {} closed the connection", dialer.shard),
            Err(e) => tracing::warn!("broker of shard {}: {e}", dialer.shard),
        }
        fail_pending(pending, &core).await;
        // Reconnect at once (the same broker may still lead, or tell us who does).
        if let Ok(s) = dialer.dial().await {
            sock = Some(s);
        }
    }
}

/// Runs one connection; `Ok(true)` when the broker went away, `Ok(false)` when the router
/// is shutting down.
async fn serve(
    sock: TcpStream,
    requests: &mut mpsc::UnboundedReceiver<Request>,
    core: &mpsc::Sender<Vec<ToCore>>,
    pending: &mut Pending,
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
    // Liveness: a ping twice a second; no frame for this long means the broker is gone or
    // cut off (a partition drops packets silently, TCP would take minutes to notice).
    let silence = Duration::from_millis(1500);
    let mut ping = tokio::time::interval(Duration::from_millis(500));
    let mut last_frame = tokio::time::Instant::now();
    let result = loop {
        tokio::select! {
            _ = ping.tick() => {
                if last_frame.elapsed() > silence {
                    break Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "broker silent",
                    ));
                }
                if let Err(e) = write_frame(&mut wr, &mut buf, |o| ToBroker::Ping.encode(o)).await {
                    break Err(e);
                }
            }
            r = requests.recv() => {
                let Some(r) = r else { break Ok(false) };
                let m = match r {
                    Request::Info { reply } => {
                        pending.next_info += 1;
                        pending.infos.insert(pending.next_info, reply);
                        ToBroker::Info { id: pending.next_info }
                    }
                    r => {
                        track(&r, pending);
                        ToBroker::Request(r)
                    }
                };
                if let Err(e) = write_frame(&mut wr, &mut buf, |o| m.encode(o)).await {
                    break Err(e);
                }
            }
            f = frames.recv() => {
                let frame = match f {
                    Some(Ok(Some(frame))) => {
                        last_frame = tokio::time::Instant::now();
                        frame
                    }
                    Some(Err(e)) => break Err(e),
                    _ => break Ok(true),
                };
                let m = match ToRouter::decode(&frame) {
                    Ok(m) => m,
                    Err(e) => break Err(e),
                };
                let to_core = match m {
                    ToRouter::Pong => continue,
                    // Leadership moved while connected: reconnect (to the leader if named).
                    ToRouter::NotLeader { .. } | ToRouter::Welcome => break Ok(true),
                    ToRouter::Deliveries(d) => ToCore::StoreDeliveries(d),
                    ToRouter::Done(list) => {
                        for (t, _) in &list {
                            pending.tags.remove(t);
                        }
                        ToCore::Stored(list)
                    }
                    ToRouter::Info { id, queues } => {
                        if let Some(reply) = pending.infos.remove(&id) {
                            let _ = reply.send(queues);
                        }
                        continue;
                    }
                };
                if core.send(vec![to_core]).await.is_err() {
                    break Ok(false);
                }
            }
        }
    };
    reader.abort();
    result
}

/// Remembers what the broker owes an answer for.
fn track(r: &Request, p: &mut Pending) {
    match r {
        Request::Enqueue { done: Some(t), .. }
        | Request::Publish { done: Some(t), .. }
        | Request::Settle { done: Some(t), .. } => {
            p.tags.insert(*t);
        }
        Request::Attach { consumer, .. } | Request::Subscribe { consumer, .. } => {
            p.consumers.insert(*consumer);
        }
        Request::Detach { consumer } => {
            p.consumers.remove(consumer);
        }
        _ => {}
    }
}

fn lost() -> StoreError {
    StoreError::Failed("broker connection lost; the message may or may not be stored".into())
}

/// The connection dropped: fail what was in flight, detach its consumers.
async fn fail_pending(p: Pending, core: &mpsc::Sender<Vec<ToCore>>) {
    let mut out = Vec::new();
    if !p.tags.is_empty() {
        out.push(ToCore::Stored(
            p.tags.into_iter().map(|t| (t, Err(lost()))).collect(),
        ));
    }
    if !p.consumers.is_empty() {
        out.push(ToCore::StoreLost {
            consumers: p.consumers.into_iter().collect(),
        });
    }
    if !out.is_empty() {
        let _ = core.send(out).await;
    }
}

/// A request while the broker is unreachable.
async fn refuse(r: Request, core: &mpsc::Sender<Vec<ToCore>>) {
    let unavailable = || StoreError::Failed("broker unavailable".into());
    let m = match r {
        Request::Enqueue { done: Some(t), .. }
        | Request::Publish { done: Some(t), .. }
        | Request::Settle { done: Some(t), .. } => ToCore::Stored(vec![(t, Err(unavailable()))]),
        Request::Attach { consumer, .. } | Request::Subscribe { consumer, .. } => {
            ToCore::StoreLost {
                consumers: vec![consumer],
            }
        }
        Request::Info { reply } => {
            let _ = reply.send(Vec::new());
            return;
        }
        _ => return,
    };
    let _ = core.send(vec![m]).await;
}
