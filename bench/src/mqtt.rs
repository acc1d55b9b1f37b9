//! `enmesh-bench mqtt`: one MQTT 3.1.1 publisher and one subscriber on one topic, through any
//! MQTT server (Enmesh's gateway, mosquitto, ActiveMQ), driven from one polling thread like
//! the AMQP benchmark. QoS 0 all-out (or at `--rate`), or QoS 1 with `--window` PUBLISHes
//! unacknowledged; the subscriber acknowledges every QoS 1 message. Latency is end to end from
//! each message's intended send time, as in `amqp`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use mqtt_gateway::codec::{
    self, Ack, Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version,
};

use crate::{Parker, nanos, sample};

#[derive(clap::Args, Clone)]
pub struct MqttArgs {
    /// host:port of the MQTT server.
    #[arg(long, default_value = "127.0.0.1:1883")]
    url: String,
    #[arg(long, default_value = "bench/t")]
    topic: String,
    /// Messages to send (after warm-up).
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
    /// Payload size in bytes (at least 16: timestamp and sequence number).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// 0 or 1.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// QoS 1: PUBLISHes sent before their PUBACK.
    #[arg(long, default_value_t = 100)]
    window: u32,
    /// Fixed rate in messages per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value = "enmesh")]
    label: String,
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// A non-blocking MQTT connection.
struct Conn {
    s: TcpStream,
    inbuf: BytesMut,
    out: BytesMut,
    scratch: Vec<u8>,
}

impl Conn {
    fn connect(url: &str, client_id: &str) -> anyhow::Result<Conn> {
        Conn::connect_from(url, client_id, None)
    }

    /// Connects from local address `from` (port chosen by the kernel) when given.
    fn connect_from(
        url: &str,
        client_id: &str,
        from: Option<std::net::IpAddr>,
    ) -> anyhow::Result<Conn> {
        let s = match from {
            None => TcpStream::connect(url).with_context(|| format!("connect {url}"))?,
            Some(ip) => {
                use std::net::ToSocketAddrs;
                let to = url
                    .to_socket_addrs()?
                    .next()
                    .with_context(|| format!("no address for {url}"))?;
                let sock = socket2::Socket::new(
                    socket2::Domain::for_address(to),
                    socket2::Type::STREAM,
                    None,
                )?;
                sock.bind(&std::net::SocketAddr::new(ip, 0).into())?;
                sock.connect(&to.into())
                    .with_context(|| format!("connect {url} from {ip}"))?;
                sock.into()
            }
        };
        s.set_nodelay(true)?;
        let mut c = Conn {
            s,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            scratch: vec![0; 1 << 16],
        };
        c.send(&Packet::Connect(Box::new(Connect {
            version: Version::V311,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 600,
            username: None,
            password: None,
            will: None,
            properties: Properties::default(),
        })));
        c.flush()?;
        match c.read_blocking()? {
            Packet::ConnAck(a) if a.reason == 0 => {}
            p => bail!("no CONNACK: {p:?}"),
        }
        c.s.set_nonblocking(true)?;
        Ok(c)
    }

    fn send(&mut self, p: &Packet) {
        codec::encode(p, Version::V311, &mut self.out);
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let mut at = 0;
        while at < self.out.len() {
            match self.s.write(&self.out[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(e.into()),
            }
        }
        self.out.clear();
        Ok(())
    }

    fn read_blocking(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some((p, n)) = codec::decode(&self.inbuf, Some(Version::V311), usize::MAX)? {
                let _ = self.inbuf.split_to(n);
                return Ok(p);
            }
            let n = self.s.read(&mut self.scratch)?;
            if n == 0 {
                bail!("closed by the server");
            }
            self.inbuf.extend_from_slice(&self.scratch[..n]);
        }
    }

    /// Takes the `n` bytes just read into `scratch`; every whole packet goes to `f`.
    fn absorb(&mut self, n: usize, f: &mut impl FnMut(Packet)) -> anyhow::Result<()> {
        self.inbuf.extend_from_slice(&self.scratch[..n]);
        while let Some((p, used)) = codec::decode(&self.inbuf, Some(Version::V311), usize::MAX)? {
            let _ = self.inbuf.split_to(used);
            f(p);
        }
        Ok(())
    }

    /// Reads what is there; every whole packet goes to `f`. True if anything arrived.
    fn poll(&mut self, mut f: impl FnMut(Packet)) -> anyhow::Result<bool> {
        match self.s.read(&mut self.scratch) {
            Ok(0) => bail!("closed by the server"),
            Ok(n) => {
                self.absorb(n, &mut f)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Records a received benchmark payload's latency (its first 8 bytes: the intended send time
/// in ns since the run's base; the next 8: its sequence number, warm-up ones not recorded).
fn record_latency(hist: &mut Histogram<u64>, payload: &[u8], now: u64, warmup: u64) {
    let (Some(ts), Some(seq)) = (payload.get(..8), payload.get(8..16)) else {
        return;
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(seq);
    if u64::from_be_bytes(b) >= warmup {
        b.copy_from_slice(ts);
        let _ = hist.record(now.saturating_sub(u64::from_be_bytes(b)).max(1));
    }
}

/// The server's CPU share over `wall` seconds since `before`, and its RSS now.
fn server_usage(
    before: Option<crate::ProcSample>,
    pid: Option<u32>,
    wall: f64,
) -> (String, String) {
    match (before, pid.and_then(sample)) {
        (Some(b), Some(x)) => (
            format!(
                "{:.0}%",
                (x.cpu_ticks - b.cpu_ticks) as f64 / 100.0 / wall * 100.0
            ),
            format!("{} MiB", x.rss_kb / 1024),
        ),
        _ => ("n/a".into(), "n/a".into()),
    }
}

pub fn run(a: MqttArgs) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    if a.size < 16 {
        bail!("--size must be at least 16");
    }
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => bail!("--qos must be 0 or 1"),
    };
    let base = Instant::now();
    let mut sub = Conn::connect(&a.url, "bench-sub")?;
    sub.s.set_nonblocking(false)?;
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        properties: Properties::default(),
        filters: vec![(a.topic.clone(), SubOptions::qos(qos))],
    }));
    sub.flush()?;
    match sub.read_blocking()? {
        Packet::SubAck(s) if s.reasons.first().is_some_and(|r| *r < 0x80) => {}
        p => bail!("subscription refused: {p:?}"),
    }
    sub.s.set_nonblocking(true)?;
    let mut publ = Conn::connect(&a.url, "bench-pub")?;
    let mut parker = Parker::for_fds(&[sub.s.as_raw_fd(), publ.s.as_raw_fd()])?;
    let total = a.warmup + a.count;
    let mut payload = vec![0u8; a.size];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut sent, mut received, mut acked, mut inflight) = (0u64, 0u64, 0u64, 0u32);
    let before = a.server_pid.and_then(sample);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.timeout);
    let interval = (a.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / a.rate));
    let mut last_rx = start;
    let mut next_id: u16 = 1;
    while received < total || (qos == QoS::AtLeastOnce && acked < total) {
        let now = Instant::now();
        if now > deadline {
            bail!("timed out: sent={sent} received={received} acked={acked}");
        }
        let mut busy = false;
        let mut next_due = None;
        let mut batch = 0;
        while sent < total && batch < 256 && (qos == QoS::AtMostOnce || inflight < a.window) {
            let intended = match interval {
                Some(iv) => {
                    let due = start + iv * sent as u32;
                    if due > now {
                        next_due = Some(due);
                        break;
                    }
                    due.duration_since(base).as_nanos() as u64
                }
                None => nanos(base),
            };
            payload[..8].copy_from_slice(&intended.to_be_bytes());
            payload[8..16].copy_from_slice(&sent.to_be_bytes());
            let packet_id = (qos == QoS::AtLeastOnce).then(|| {
                let id = next_id;
                next_id = next_id.checked_add(1).unwrap_or(1);
                id
            });
            publ.send(&Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: a.topic.clone(),
                packet_id,
                properties: Properties::default(),
                payload: Bytes::copy_from_slice(&payload),
            }));
            sent += 1;
            batch += 1;
            if qos == QoS::AtLeastOnce {
                inflight += 1;
            }
        }
        busy |= batch > 0;
        publ.flush()?;
        busy |= publ.poll(|p| {
            if let Packet::PubAck(_) = p {
                acked += 1;
                inflight = inflight.saturating_sub(1);
            }
        })?;
        let t = nanos(base);
        let mut acks = Vec::new();
        let got = sub.poll(|p| {
            if let Packet::Publish(p) = p {
                received += 1;
                record_latency(&mut hist, &p.payload, t, a.warmup);
                if let Some(id) = p.packet_id {
                    acks.push(id);
                }
            }
        })?;
        if got {
            busy = true;
            last_rx = Instant::now();
            for id in acks {
                sub.send(&Packet::PubAck(Ack::new(id)));
            }
            sub.flush()?;
        }
        parker.turn(busy, now, next_due)?;
    }
    let wall = last_rx.duration_since(start).as_secs_f64();
    let (cpu, rss) = server_usage(before, a.server_pid, wall);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{label}: mqtt qos={q} size={size}B rate_target={rt} sent={sent} received={received} \
         wall={wall:.2}s rate={rate:.0} msg/s latency_us p50={p50:.0} p90={p90:.0} p99={p99:.0} \
         p99.9={p999:.0} max={max:.0} server_cpu={cpu} server_rss={rss}",
        label = a.label,
        q = a.qos,
        size = a.size,
        rt = if a.rate == 0 {
            "max".to_string()
        } else {
            a.rate.to_string()
        },
        rate = received as f64 / wall,
        p50 = us(0.5),
        p90 = us(0.9),
        p99 = us(0.99),
        p999 = us(0.999),
        max = hist.max() as f64 / 1000.0,
    );
    Ok(())
}

#[derive(clap::Args, Clone)]
pub struct IdleArgs {
    #[arg(long, default_value = "127.0.0.1:1883")]
    url: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long)]
    server_pid: u32,
    #[arg(long, default_value = "enmesh")]
    label: String,
    /// Seconds to keep the connections open after reporting (to inspect the server).
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

/// Opens `connections` MQTT connections one after another (CONNECT, then SUBSCRIBE to a topic
/// of its own, each waited for), reports the CONNECT rate, waits, and reports the server's
/// RSS growth per connection.
pub fn idle(a: IdleArgs) -> anyhow::Result<()> {
    let before = sample(a.server_pid).context("cannot read the server process")?;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(a.connections);
    // Loopback servers are reached from several local addresses, 8,000 connections each:
    // past ~14,000 connections from one address the kernel's search for a free ephemeral port
    // (half the range serves connect()) slows every CONNECT down, whichever the server. The
    // block of addresses is this process's own (by pid), so that the previous run's sockets
    // in TIME-WAIT do not slow the port search of the next server measured.
    let loopback = a.url.starts_with("127.");
    let block = 1 + (std::process::id() % 250) as u8;
    // Where each cycle's time goes (client-side means): connect() through CONNACK, and
    // SUBSCRIBE through SUBACK.
    let (mut to_connack, mut to_suback) = (Duration::ZERO, Duration::ZERO);
    for i in 0..a.connections {
        let t0 = Instant::now();
        let from = loopback
            .then(|| std::net::IpAddr::from([127, block, 0, 2 + (i / 8000).min(250) as u8]));
        let mut c = Conn::connect_from(&a.url, &format!("idle-{i}"), from)?;
        let t1 = Instant::now();
        to_connack += t1 - t0;
        c.s.set_nonblocking(false)?;
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![(format!("idle/{i}"), SubOptions::qos(QoS::AtLeastOnce))],
        }));
        c.flush()?;
        match c.read_blocking()? {
            Packet::SubAck(_) => {}
            p => bail!("no SUBACK: {p:?}"),
        }
        to_suback += t1.elapsed();
        conns.push(c);
        if (i + 1) % 5000 == 0 {
            eprintln!(
                "{} connections after {:.2} s",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let after = sample(a.server_pid).context("cannot read the server process")?;
    let per = after.rss_kb.saturating_sub(before.rss_kb) as f64 * 1024.0 / a.connections as f64;
    println!(
        "{}: mqtt idle connections={} (1 subscription each) connect+subscribe rate={:.0}/s \
         rss_before={} KiB rss_after={} KiB per_connection={:.0} B \
         connack_us={:.1} suback_us={:.1}",
        a.label,
        a.connections,
        a.connections as f64 / connect_secs,
        before.rss_kb,
        after.rss_kb,
        per,
        to_connack.as_secs_f64() * 1e6 / a.connections as f64,
        to_suback.as_secs_f64() * 1e6 / a.connections as f64,
    );
    std::thread::sleep(Duration::from_secs(a.hold));
    drop(conns);
    Ok(())
}

#[derive(clap::Args, Clone)]
pub struct ManyArgs {
    /// host:port of the MQTT server.
    #[arg(long, default_value = "127.0.0.1:1883")]
    url: String,
    /// Topic prefix: publisher i publishes on `<topic>/<i>`.
    #[arg(long, default_value = "bench/many")]
    topic: String,
    /// Publishers.
    #[arg(long, default_value_t = 1000)]
    publishers: usize,
    /// Subscribers: as many as publishers (subscriber i on `<topic>/<i>`: pairs), or 1 (on
    /// `<topic>/+`: fan-in).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages to send in all (after warm-up).
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// 0 or 1 (publish and subscribe).
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// QoS 1: PUBLISHes each publisher sends before their PUBACK.
    #[arg(long, default_value_t = 10)]
    window: u32,
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value = "enmesh")]
    label: String,
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// A connection of the many-connection benchmark: non-blocking, registered with mio.
struct Peer {
    c: Conn,
    inflight: u32,
    next_id: u16,
}

impl Conn {
    /// Reads until the socket has nothing more (edge-triggered readiness); every whole packet
    /// goes to `f`.
    fn drain(&mut self, mut f: impl FnMut(Packet)) -> anyhow::Result<()> {
        loop {
            match self.s.read(&mut self.scratch) {
                Ok(0) => bail!("closed by the server"),
                Ok(n) => self.absorb(n, &mut f)?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `enmesh-bench mqtt-many`: many publishers and subscribers at once (design.md §9: QoS 1
/// 1k ↔ 1k; fan-in from 10k publishers to one subscriber), all-out with a per-publisher
/// window, from one thread over epoll. Reports messages in (acknowledged to publishers) and
/// out (received by subscribers) per second, and end-to-end latency.
pub fn many(a: ManyArgs) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    if a.size < 16 {
        bail!("--size must be at least 16");
    }
    let qos = match a.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => bail!("--qos must be 0 or 1"),
    };
    let fan_in = a.subscribers == 1;
    if !fan_in && a.subscribers != a.publishers {
        bail!("--subscribers must be 1 (fan-in) or as many as --publishers (pairs)");
    }
    let label = a.label.clone();
    let mut subs = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let mut c = Conn::connect(&a.url, &format!("{label}-sub-{i}"))?;
        c.s.set_nonblocking(false)?;
        let filter = if fan_in {
            format!("{}/+", a.topic)
        } else {
            format!("{}/{i}", a.topic)
        };
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Properties::default(),
            filters: vec![(filter, SubOptions::qos(qos))],
        }));
        c.flush()?;
        match c.read_blocking()? {
            Packet::SubAck(s) if s.reasons.first().is_some_and(|r| *r < 0x80) => {}
            p => bail!("subscription refused: {p:?}"),
        }
        c.s.set_nonblocking(true)?;
        subs.push(c);
    }
    let mut pubs = Vec::with_capacity(a.publishers);
    for i in 0..a.publishers {
        pubs.push(Peer {
            c: Conn::connect(&a.url, &format!("{label}-pub-{i}"))?,
            inflight: 0,
            next_id: 1,
        });
    }
    let mut poll = mio::Poll::new()?;
    for (i, c) in subs.iter().enumerate() {
        let fd = c.s.as_raw_fd();
        poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(i),
            mio::Interest::READABLE,
        )?;
    }
    for (i, p) in pubs.iter().enumerate() {
        let fd = p.c.s.as_raw_fd();
        poll.registry().register(
            &mut mio::unix::SourceFd(&fd),
            mio::Token(subs.len() + i),
            mio::Interest::READABLE,
        )?;
    }
    let mut events = mio::Events::with_capacity(1024);
    let topics: Vec<String> = (0..a.publishers)
        .map(|i| format!("{}/{i}", a.topic))
        .collect();
    let total = a.warmup + a.count;
    let window = if qos == QoS::AtLeastOnce {
        a.window
    } else {
        u32::MAX
    };
    let base = Instant::now();
    let mut payload = vec![0u8; a.size];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut sent, mut received, mut acked) = (0u64, 0u64, 0u64);
    let before = a.server_pid.and_then(sample);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.timeout);
    let (mut last_rx, mut last_ack) = (start, start);
    let mut cursor = 0usize;
    let mut acks: Vec<u16> = Vec::new();
    while received < total || (qos == QoS::AtLeastOnce && acked < total) {
        let now = Instant::now();
        if now > deadline {
            bail!("timed out: sent={sent} received={received} acked={acked}");
        }
        // Send: one PUBLISH per publisher with room in its window, round robin, a bounded
        // batch per turn so that reading keeps up.
        let mut batch = 0;
        let mut idle_pass = 0;
        while sent < total && batch < 2048 && idle_pass < pubs.len() {
            let i = cursor;
            cursor = (cursor + 1) % pubs.len();
            let p = &mut pubs[i];
            if p.inflight >= window {
                idle_pass += 1;
                continue;
            }
            idle_pass = 0;
            payload[..8].copy_from_slice(&nanos(base).to_be_bytes());
            payload[8..16].copy_from_slice(&sent.to_be_bytes());
            let packet_id = (qos == QoS::AtLeastOnce).then(|| {
                let id = p.next_id;
                p.next_id = p.next_id.checked_add(1).unwrap_or(1);
                id
            });
            p.c.send(&Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: topics[i].clone(),
                packet_id,
                properties: Properties::default(),
                payload: Bytes::copy_from_slice(&payload),
            }));
            p.c.flush()?;
            if qos == QoS::AtLeastOnce {
                p.inflight += 1;
            }
            sent += 1;
            batch += 1;
        }
        let wait = if batch > 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        if let Err(e) = poll.poll(&mut events, Some(wait))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            return Err(e.into());
        }
        for ev in events.iter() {
            let t = ev.token().0;
            if t < subs.len() {
                let c = &mut subs[t];
                let at = nanos(base);
                c.drain(|p| {
                    if let Packet::Publish(p) = p {
                        received += 1;
                        record_latency(&mut hist, &p.payload, at, a.warmup);
                        if let Some(id) = p.packet_id {
                            acks.push(id);
                        }
                    }
                })?;
                last_rx = Instant::now();
                for id in acks.drain(..) {
                    c.send(&Packet::PubAck(Ack::new(id)));
                }
                c.flush()?;
            } else if let Some(p) = pubs.get_mut(t - subs.len()) {
                let mut n = 0u32;
                p.c.drain(|pk| {
                    if let Packet::PubAck(_) = pk {
                        n += 1;
                    }
                })?;
                p.inflight = p.inflight.saturating_sub(n);
                acked += u64::from(n);
                if n > 0 {
                    last_ack = Instant::now();
                }
            }
        }
    }
    let wall_out = last_rx.duration_since(start).as_secs_f64();
    let wall_in = if qos == QoS::AtLeastOnce {
        last_ack.duration_since(start).as_secs_f64()
    } else {
        wall_out
    };
    let (cpu, rss) = server_usage(before, a.server_pid, wall_out);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{label}: mqtt-many qos={q} publishers={np} subscribers={ns} window={w} size={size}B \
         sent={sent} received={received} in_rate={rin:.0} msg/s out_rate={rout:.0} msg/s \
         latency_us p50={p50:.0} p99={p99:.0} max={max:.0} server_cpu={cpu} server_rss={rss}",
        q = a.qos,
        np = a.publishers,
        ns = a.subscribers,
        w = a.window,
        size = a.size,
        rin = sent as f64 / wall_in,
        rout = received as f64 / wall_out,
        p50 = us(0.5),
        p99 = us(0.99),
        max = hist.max() as f64 / 1000.0,
    );
    Ok(())
}
