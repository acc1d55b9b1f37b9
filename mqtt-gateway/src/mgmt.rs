//! The gateway's client of the router's management API, where persistent sessions and
//! retained messages are found and retained queues are purged: over HTTP/1.1 on a trusted
//! address, or by direct calls into a router in the same process (standalone, [`Direct`]).
//!
//! HTTP connections are kept alive and reused: a device's CONNECT and each of its SUBSCRIBEs
//! ask the router something, and a fresh TCP connection per question (a socket and an HTTP
//! connection task on both sides, torn down right after) cost more than the question, and left
//! holes in the heap between the long-lived state of the devices connecting meanwhile.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use amqp::pipe::{Dialer, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Idle connections kept for reuse (more are opened under bursts and closed after use).
const KEEP_IDLE: usize = 8;
/// Largest answer read.
const MAX_BODY: usize = 64 << 20;
/// A request's time limit, connecting included.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A queue (or subscription) as the router lists it: what the gateway reads of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub address: String,
    /// Messages held.
    pub depth: u64,
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The management calls the gateway makes, answered by a router in the same process without
/// HTTP: the same questions to the same router core, without a request to format and parse
/// and a JSON answer per device.
pub trait Direct: Send + Sync {
    /// The queues (subscriptions included, as `$sub:NAME`) whose address starts with `prefix`.
    fn queues(&self, prefix: String) -> BoxFuture<io::Result<Vec<Queue>>>;
    /// Removes the ready messages of queue `address`.
    fn purge(&self, address: String) -> BoxFuture<io::Result<()>>;
}

/// The router's management API.
pub struct RouterApi {
    via: Via,
}

enum Via {
    /// At an address, with idle kept-alive connections.
    Http {
        to: Dialer,
        idle: Mutex<Vec<Stream>>,
    },
    /// In this process.
    Direct(Box<dyn Direct>),
}

impl std::fmt::Debug for RouterApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterApi")
            .field("at", &self.host())
            .finish()
    }
}

/// Why an exchange failed: on a kept connection the router may have closed meanwhile
/// (nothing of an answer came), or for good.
enum Failed {
    Stale(io::Error),
    Other(io::Error),
}

impl RouterApi {
    /// The API over HTTP at TCP address `host` (host:port).
    pub fn new(host: impl Into<String>) -> RouterApi {
        RouterApi {
            via: Via::Http {
                to: Dialer::Tcp(host.into()),
                idle: Mutex::new(Vec::new()),
            },
        }
    }

    /// The API of a router in this process.
    pub fn direct(d: impl Direct + 'static) -> RouterApi {
        RouterApi {
            via: Via::Direct(Box::new(d)),
        }
    }

    /// Where it is, for messages.
    pub fn host(&self) -> &str {
        match &self.via {
            Via::Http { to, .. } => to.name(),
            Via::Direct(_) => "the router in this process",
        }
    }

    /// The queues whose address starts with `prefix` (filtered by the router).
    pub async fn queues(&self, prefix: &str) -> io::Result<Vec<Queue>> {
        let d = match &self.via {
            Via::Direct(d) => d,
            Via::Http { .. } => {
                let body = self
                    .request("GET", &format!("/api/v1/queues?prefix={}", percent(prefix)))
                    .await?;
                return parse_queues(&body);
            }
        };
        limit(d.queues(prefix.to_owned())).await
    }

    /// Removes the ready messages of queue `address`.
    pub async fn purge(&self, address: &str) -> io::Result<()> {
        let d = match &self.via {
            Via::Direct(d) => d,
            Via::Http { .. } => {
                self.request("POST", &format!("/api/v1/purge/{}", percent_path(address)))
                    .await?;
                return Ok(());
            }
        };
        limit(d.purge(address.to_owned())).await
    }

    /// An HTTP request without a body: the body of a 2xx answer, at most 64 MiB.
    async fn request(&self, method: &str, path: &str) -> io::Result<Vec<u8>> {
        let Via::Http { to, idle } = &self.via else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no HTTP to a router in this process",
            ));
        };
        let host = to.name();
        let run = async {
            let kept = idle.lock().ok().and_then(|mut g| g.pop());
            if let Some(s) = kept {
                match exchange(s, host, method, path).await {
                    Ok((body, s)) => return keep(idle, body, s),
                    // Closed by the router while idle: once more on a new connection (the
                    // requests are reads and purges, which may be repeated).
                    Err(Failed::Stale(_)) => {}
                    Err(Failed::Other(e)) => return Err(e),
                }
            }
            let s = to.dial().await?;
            match exchange(s, host, method, path).await {
                Ok((body, s)) => keep(idle, body, s),
                Err(Failed::Stale(e) | Failed::Other(e)) => Err(e),
            }
        };
        limit(run).await
    }
}

/// `f` within the time limit of a request.
async fn limit<T>(f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "router request timed out"))?
}

/// Keeps a reusable connection and passes the answer on.
fn keep(
    idle: &Mutex<Vec<Stream>>,
    body: io::Result<Vec<u8>>,
    s: Option<Stream>,
) -> io::Result<Vec<u8>> {
    if let (Some(s), Ok(mut idle)) = (s, idle.lock())
        && idle.len() < KEEP_IDLE
    {
        idle.push(s);
    }
    body
}

/// The router's JSON list of queues.
fn parse_queues(body: &[u8]) -> io::Result<Vec<Queue>> {
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(list
        .iter()
        .filter_map(|q| {
            Some(Queue {
                address: q["address"].as_str()?.to_owned(),
                depth: q["depth"].as_u64()?,
            })
        })
        .collect())
}

/// One request and its answer on `s`: the answer (an error for a non-2xx status) and the
/// connection when it may be used again.
async fn exchange(
    mut s: Stream,
    host: &str,
    method: &str,
    path: &str,
) -> Result<(io::Result<Vec<u8>>, Option<Stream>), Failed> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(Failed::Stale)?;
    let mut buf = Vec::with_capacity(512);
    let head = loop {
        let n = read_more(&mut s, &mut buf).await.map_err(|e| {
            if buf.is_empty() {
                Failed::Stale(e)
            } else {
                Failed::Other(e)
            }
        })?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "HTTP connection closed");
            return Err(if buf.is_empty() {
                Failed::Stale(e)
            } else {
                Failed::Other(e)
            });
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Head::parse(&buf[..end])
                .map_err(Failed::Other)?
                .with_start(end + 4);
        }
        if buf.len() > 64 * 1024 {
            return Err(Failed::Other(bad("HTTP header too long")));
        }
    };
    let other = Failed::Other;
    let body = match head.framing {
        Framing::Length(n) => {
            if n > MAX_BODY {
                return Err(other(bad("HTTP answer too large")));
            }
            while buf.len() < head.start + n {
                if read_more(&mut s, &mut buf).await.map_err(other)? == 0 {
                    return Err(other(bad("HTTP answer cut short")));
                }
            }
            buf[head.start..head.start + n].to_vec()
        }
        Framing::Chunked => loop {
            if let Some(body) = dechunk(&buf[head.start..]).map_err(other)? {
                break body;
            }
            if buf.len() > MAX_BODY + 64 * 1024 {
                return Err(other(bad("HTTP answer too large")));
            }
            if read_more(&mut s, &mut buf).await.map_err(other)? == 0 {
                return Err(other(bad("HTTP answer cut short")));
            }
        },
        Framing::UntilClose => {
            (&mut s)
                .take((MAX_BODY + head.start).saturating_sub(buf.len()) as u64)
                .read_to_end(&mut buf)
                .await
                .map_err(other)?;
            buf[head.start..].to_vec()
        }
    };
    let reuse = head.keep_alive && !matches!(head.framing, Framing::UntilClose);
    let answer = if head.ok {
        Ok(body)
    } else {
        Err(io::Error::other(format!("HTTP: {}", head.status)))
    };
    Ok((answer, reuse.then_some(s)))
}

async fn read_more(s: &mut Stream, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.reserve(4096);
    s.read_buf(buf).await
}

fn bad(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// What an answer's head says.
struct Head {
    status: String,
    ok: bool,
    framing: Framing,
    keep_alive: bool,
    /// Where the body starts in the read buffer.
    start: usize,
}

impl Head {
    fn parse(head: &[u8]) -> io::Result<Head> {
        let head = std::str::from_utf8(head).map_err(|_| bad("HTTP header not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("").to_owned();
        let code = status.split(' ').nth(1).unwrap_or("");
        let mut h = Head {
            ok: status.starts_with("HTTP/1.") && code.starts_with('2'),
            // HTTP/1.0 closes unless told otherwise.
            keep_alive: status.starts_with("HTTP/1.1"),
            framing: if matches!(code, "204" | "304") {
                Framing::Length(0)
            } else {
                Framing::UntilClose
            },
            status,
            start: 0,
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                if !matches!(h.framing, Framing::Chunked) {
                    let n = value.parse().map_err(|_| bad("bad HTTP content-length"))?;
                    h.framing = Framing::Length(n);
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if value.to_ascii_lowercase().contains("chunked") {
                    h.framing = Framing::Chunked;
                }
            } else if name.eq_ignore_ascii_case("connection") {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    h.keep_alive = false;
                } else if v.contains("keep-alive") {
                    h.keep_alive = true;
                }
            }
        }
        Ok(h)
    }

    fn with_start(mut self, start: usize) -> Head {
        self.start = start;
        self
    }
}

/// A chunked body's content once all of it (with its trailer) is in `b`; `None` while it is
/// not.
fn dechunk(mut b: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size = std::str::from_utf8(&b[..line_end]).map_err(|_| bad("bad chunked body"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunked body"))?;
        b = &b[line_end + 2..];
        if size == 0 {
            // Trailer lines, up to an empty one.
            loop {
                let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(out));
                }
                b = &b[end + 2..];
            }
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        if out.len() + size > MAX_BODY {
            return Err(bad("HTTP answer too large"));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Percent-encodes everything but unreserved characters (for a query value).
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a path's segments (keeps `/`).
fn percent_path(s: &str) -> String {
    s.split('/').map(percent).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_body_is_whole_only_with_its_last_chunk_and_trailer() {
        let whole = b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nX-T: 1\r\n\r\n";
        for cut in 0..whole.len() {
            assert!(dechunk(&whole[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        assert_eq!(dechunk(whole).unwrap().unwrap(), b"abcde");
        assert!(dechunk(b"zz\r\n").is_err());
    }

    /// A server on a real socket that answers `answers` requests per connection (then
    /// closes it without saying so, as a restarted router would have), counting connections.
    async fn server(answers: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::Ordering;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap().to_string();
        let conns = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let k = n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for i in 0..answers {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut b = [0u8; 512];
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(m) => buf.extend_from_slice(&b[..m]),
                            }
                        }
                        buf.clear();
                        let body = format!("conn {k} answer {i}");
                        // Chunked and with a length in turn.
                        let a = if i % 2 == 0 {
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                                body.len()
                            )
                        };
                        if s.write_all(a.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (at, conns)
    }

    #[tokio::test]
    async fn connections_are_kept_and_a_stale_one_is_replaced() {
        use std::sync::atomic::Ordering;
        let (at, conns) = server(3).await;
        let api = RouterApi::new(at);
        for i in 0..3 {
            let b = api.request("GET", "/x").await.unwrap();
            assert_eq!(String::from_utf8(b).unwrap(), format!("conn 0 answer {i}"));
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );
        // The server closed that connection after its third answer: the next request finds
        // it stale and goes again on a new one.
        let b = api.request("GET", "/x").await.unwrap();
        assert_eq!(String::from_utf8(b).unwrap(), "conn 1 answer 0");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn heads_say_how_the_body_ends_and_whether_the_connection_stays() {
        let h = Head::parse(b"HTTP/1.1 200 OK\r\ncontent-length: 12").unwrap();
        assert!(h.ok && h.keep_alive && matches!(h.framing, Framing::Length(12)));
        let h = Head::parse(
            b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nTransfer-Encoding: chunked",
        )
        .unwrap();
        assert!(!h.ok && !h.keep_alive && matches!(h.framing, Framing::Chunked));
        let h = Head::parse(b"HTTP/1.0 200 OK").unwrap();
        assert!(h.ok && !h.keep_alive && matches!(h.framing, Framing::UntilClose));
        assert!(Head::parse(b"HTTP/1.1 200 OK\r\nContent-Length: x").is_err());
    }
}
