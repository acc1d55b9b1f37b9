//! `enmesh-bench`: the load generator for Enmesh and its peers (design.md §3, §8).
//!
//! It speaks AMQP 1.0 through the project's engine and drives any AMQP 1.0 server the same way:
//! one producer connection and N consumer connections, all-out or at a fixed rate (latency is
//! measured from each message's *intended* send time, so a stalled server cannot hide its
//! queueing: no coordinated omission), unsettled or presettled. It prints sent, received,
//! end-to-end rate, latency percentiles from an HDR histogram, and the server's CPU and RSS when
//! given its pid.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use amqp::client::Client;
use amqp::{DeliveryState, Event};
use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

#[derive(Parser)]
#[command(name = "enmesh-bench", about = "AMQP 1.0 load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Producer → server → consumers throughput and latency.
    Amqp(AmqpArgs),
    /// Memory per idle connection: opens N connections with one session and two links each.
    Idle(IdleArgs),
    /// MQTT publisher → server → subscriber throughput and latency (any MQTT 3.1.1 server).
    Mqtt(mqtt::MqttArgs),
    /// MQTT: CONNECT rate, then memory per idle connection (each with one subscription).
    MqttIdle(mqtt::IdleArgs),
    /// MQTT: many publishers and subscribers at once (1k ↔ 1k pairs, or fan-in to one).
    MqttMany(mqtt::ManyArgs),
}

mod mqtt;

#[derive(clap::Args, Clone)]
struct AmqpArgs {
    /// host:port of the AMQP server.
    #[arg(long, default_value = "127.0.0.1:5672")]
    url: String,
    /// Address to send to and receive from; a comma-separated list runs one producer and
    /// `--receivers` consumers per address at once (counts, rates and latencies are totals).
    #[arg(long, default_value = "bench")]
    address: String,
    /// Messages to send per address (after warm-up).
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Warm-up messages sent first and not measured.
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
    /// Body size in bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Send presettled (at most once) instead of unsettled with outcomes flowing back.
    #[arg(long)]
    presettled: bool,
    /// Mark messages durable (header durable=true), as a store benchmark must.
    #[arg(long)]
    durable: bool,
    /// Fixed rate in messages per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Consumer connections (anycast: they compete; multicast: each gets every message).
    #[arg(long, default_value_t = 1)]
    receivers: usize,
    /// Credit each consumer grants.
    #[arg(long, default_value_t = 1000)]
    credit: u32,
    /// Expect every consumer to receive every message (multicast).
    #[arg(long)]
    fanout: bool,
    /// Server process to sample CPU and RSS from.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label for the report line.
    #[arg(long, default_value = "enmesh")]
    label: String,
    /// Only produce (no consumers): fills a queue, e.g. for a backlog test. Finishes when
    /// every message has its outcome.
    #[arg(long, conflicts_with = "consume_only")]
    produce_only: bool,
    /// Only consume `warmup + count` messages already stored (drains a backlog).
    #[arg(long)]
    consume_only: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(clap::Args)]
struct IdleArgs {
    #[arg(long, default_value = "127.0.0.1:5672")]
    url: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    #[arg(long)]
    server_pid: u32,
    #[arg(long, default_value = "enmesh")]
    label: String,
    #[arg(long, default_value = "idle")]
    address: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Amqp(a) => amqp_bench(a).await,
            Cmd::Idle(a) => idle_bench(a).await,
            Cmd::Mqtt(a) => mqtt::run(a),
            Cmd::MqttIdle(a) => mqtt::idle(a),
            Cmd::MqttMany(a) => mqtt::many(a),
        }
    })
}

/// Nanoseconds since the bench started; both sides live in this process.
fn nanos(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

#[derive(Clone, Copy, Default)]
struct ProcSample {
    cpu_ticks: u64,
    rss_kb: u64,
    hwm_kb: u64,
}

fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" of the command name: utime is 14th, stime 15th overall.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample {
        cpu_ticks: utime + stime,
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
    })
}

/// A connection driven by polling: a non-blocking std socket (tokio's `try_read` only reads
/// after its reactor saw readiness, and a busy loop never lets the reactor run). The loop
/// spins while there is work and parks in [`Parker`] once it has been idle for a moment.
struct Raw {
    s: std::net::TcpStream,
    conn: amqp::Connection,
    inbuf: BytesMut,
    events: std::collections::VecDeque<Event>,
    scratch: Vec<u8>,
}

/// Where the load loop sleeps when nothing has happened for [`SPIN`]: spinning for good would
/// take a core the servers under test could use (the replicated benchmark runs four server
/// processes on this machine's two cores), sleeping at once would add a wake-up to every
/// latency sample.
pub(crate) struct Parker {
    poll: mio::Poll,
    events: mio::Events,
    idle_since: Option<Instant>,
}

const SPIN: Duration = Duration::from_micros(50);

impl Parker {
    fn new(conns: &[&Raw]) -> anyhow::Result<Parker> {
        use std::os::fd::AsRawFd;
        let fds: Vec<_> = conns.iter().map(|c| c.s.as_raw_fd()).collect();
        Parker::for_fds(&fds)
    }

    fn for_fds(fds: &[std::os::fd::RawFd]) -> anyhow::Result<Parker> {
        let poll = mio::Poll::new()?;
        for (i, fd) in fds.iter().enumerate() {
            let fd = *fd;
            poll.registry().register(
                &mut mio::unix::SourceFd(&fd),
                mio::Token(i),
                mio::Interest::READABLE,
            )?;
        }
        Ok(Parker {
            poll,
            events: mio::Events::with_capacity(64),
            idle_since: None,
        })
    }

    /// Called once per loop turn: `busy` if the turn sent or received anything. Registration
    /// is edge-triggered and persists, so data that arrives between the last empty read and
    /// the wait still wakes it.
    fn turn(&mut self, busy: bool, now: Instant, until: Option<Instant>) -> anyhow::Result<()> {
        if busy {
            self.idle_since = None;
            return Ok(());
        }
        let since = *self.idle_since.get_or_insert(now);
        if now.duration_since(since) < SPIN {
            return Ok(());
        }
        let wait = until.map_or(Duration::from_millis(5), |u| {
            u.saturating_duration_since(now)
                .min(Duration::from_millis(5))
        });
        if let Err(e) = self.poll.poll(&mut self.events, Some(wait))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            return Err(e.into());
        }
        Ok(())
    }
}

impl Raw {
    fn from(c: Client) -> anyhow::Result<Raw> {
        let Client {
            stream,
            conn,
            inbuf,
            events,
            ..
        } = c;
        let amqp::pipe::Stream::Tcp(stream) = stream else {
            anyhow::bail!("not a TCP connection");
        };
        let s = stream.into_std()?;
        s.set_nonblocking(true)?;
        Ok(Raw {
            s,
            conn,
            inbuf,
            events,
            scratch: vec![0; 1 << 16],
        })
    }

    /// Reads whatever is available without waiting; true if anything arrived.
    fn poll_read(&mut self) -> anyhow::Result<bool> {
        use std::io::Read;
        match self.s.read(&mut self.scratch) {
            Ok(0) => bail!("connection closed by the server"),
            Ok(n) => {
                self.inbuf.extend_from_slice(&self.scratch[..n]);
                self.conn.handle_input(&mut self.inbuf, Instant::now())?;
                while let Some(e) = self.conn.poll_event() {
                    self.events.push_back(e);
                }
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes all pending output, spinning while the socket is full.
    fn write_out(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        let out = self.conn.output();
        if out.is_empty() {
            return Ok(());
        }
        let b = out.split();
        let mut at = 0;
        while at < b.len() {
            match self.s.write(&b[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// The producer and every consumer are driven from one busy-polling loop on one thread: the
/// bench owns a core, and a single thread never waits for the scheduler, so the latencies it
/// records are the server's, not the generator's.
async fn amqp_bench(a: AmqpArgs) -> anyhow::Result<()> {
    if a.size < 16 {
        bail!("--size must be at least 16 (timestamp and sequence number)");
    }
    let base = Instant::now();
    let total = a.warmup + a.count;
    let expect = if a.fanout {
        total * a.receivers as u64
    } else {
        total
    };
    let expect = if a.produce_only { 0 } else { expect };
    let total = if a.consume_only { 0 } else { total };
    let receivers = if a.produce_only { 0 } else { a.receivers };
    let addresses: Vec<&str> = a.address.split(',').filter(|s| !s.is_empty()).collect();
    if addresses.is_empty() {
        bail!("--address names no address");
    }
    let n_addr = addresses.len() as u64;
    let (expect, total_all) = (expect * n_addr, total * n_addr);
    let mut consumers = Vec::new();
    for (k, address) in addresses.iter().enumerate() {
        for i in 0..receivers {
            let mut c = Client::connect(&a.url, &format!("bench-rx-{k}-{i}")).await?;
            let (link, _) = c
                .receiver(&format!("rx-{i}"), Some(address), a.credit, a.presettled)
                .await?;
            consumers.push((Raw::from(c)?, link, k));
        }
    }
    // One producer connection per address, each sending `total`.
    let mut producers = Vec::new();
    for (k, address) in addresses.iter().enumerate() {
        let mut p = Client::connect(&a.url, &format!("bench-tx-{k}")).await?;
        let link = p.sender("tx", Some(address), a.presettled).await?;
        producers.push((Raw::from(p)?, link, 0u64));
    }
    let mut parker = {
        let mut all: Vec<&Raw> = consumers.iter().map(|(c, _, _)| c).collect();
        all.extend(producers.iter().map(|(p, _, _)| p));
        Parker::new(&all)?
    };
    // One encoded message; each send patches its timestamp and sequence number in place.
    let body = vec![0u8; a.size];
    let mut msg = BytesMut::new();
    amqp::message::build(
        &amqp::message::Simple {
            body: &body,
            durable: a.durable,
            ..Default::default()
        },
        &mut msg,
    );
    let at = msg.len() - body.len();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut sent, mut received, mut accepted, mut other, mut outstanding) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let before = a.server_pid.and_then(sample);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(a.timeout);
    let interval = (a.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / a.rate));
    let mut last_rx = start;
    let mut last_ack = start;
    let size = a.size;
    // Sequence numbers seen, per address (per consumer with --fanout): a second delivery of
    // one is a duplicate, reported (the first few with their timing) but not an error.
    let mut seen: Vec<std::collections::HashMap<u64, Duration>> =
        vec![Default::default(); consumers.len().max(1)];
    let mut dups: Vec<(usize, u64, Duration, Duration)> = Vec::new();
    let mut dup_count = 0u64;
    while received < expect || outstanding > 0 || sent < total_all {
        let now = Instant::now();
        if now > deadline {
            bail!("timed out: sent={sent} received={received} outcomes pending={outstanding}");
        }
        let mut busy = false;
        let mut next_due = None;
        for (p, plink, psent) in producers.iter_mut() {
            // Send what credit (and, at a fixed rate, the schedule) allows.
            let plink = *plink;
            let mut batch = 0;
            while *psent < total && batch < 256 && p.conn.credit(plink) > 0 {
                let intended = match interval {
                    Some(iv) => {
                        let due = start + iv * *psent as u32;
                        if due > now {
                            next_due = Some(next_due.map_or(due, |d: Instant| d.min(due)));
                            break;
                        }
                        due.duration_since(base).as_nanos() as u64
                    }
                    None => nanos(base),
                };
                msg[at..at + 8].copy_from_slice(&intended.to_be_bytes());
                msg[at + 8..at + 16].copy_from_slice(&psent.to_be_bytes());
                p.conn
                    .send(plink, &psent.to_be_bytes(), &msg, a.presettled, 0);
                *psent += 1;
                sent += 1;
                batch += 1;
                if !a.presettled {
                    outstanding += 1;
                }
            }
            p.write_out()?;
            busy |= batch > 0;
            if p.poll_read()? {
                busy = true;
                while let Some(e) = p.events.pop_front() {
                    if let Event::Disposition {
                        first, last, state, ..
                    } = e
                    {
                        let n = u64::from(last.wrapping_sub(first)) + 1;
                        outstanding = outstanding.saturating_sub(n);
                        if matches!(state, Some(DeliveryState::Accepted)) {
                            accepted += n;
                        } else {
                            other += n;
                        }
                        last_ack = Instant::now();
                    }
                }
            }
        }
        for (i, (c, link, k)) in consumers.iter_mut().enumerate() {
            let key = if a.fanout { i } else { *k };
            if !c.poll_read()? {
                continue;
            }
            busy = true;
            let t = nanos(base);
            while let Some(e) = c.events.pop_front() {
                if let Event::Delivery(d) = e {
                    received += 1;
                    let pl = &d.payload;
                    if pl.len() >= size {
                        let at = pl.len() - size;
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&pl[at..at + 8]);
                        let mut seq = [0u8; 8];
                        seq.copy_from_slice(&pl[at + 8..at + 16]);
                        let n = u64::from_be_bytes(seq);
                        let at = now.duration_since(start);
                        if let Some(first) = seen[key].insert(n, at) {
                            dup_count += 1;
                            if dups.len() < 10 {
                                dups.push((key, n, first, at));
                            }
                        }
                        if n >= a.warmup {
                            let _ = hist.record(t.saturating_sub(u64::from_be_bytes(ts)).max(1));
                        }
                    }
                    if !d.settled {
                        c.conn.disposition(
                            *link,
                            d.delivery_id,
                            true,
                            Some(DeliveryState::Accepted),
                        );
                    }
                }
            }
            last_rx = Instant::now();
            if c.conn.receiver_credit(*link) < a.credit / 2 {
                c.conn.set_credit(*link, a.credit, false);
            }
            c.write_out()?;
        }
        parker.turn(busy, now, next_due)?;
    }
    let (wall, done) = if a.produce_only {
        (
            last_ack.duration_since(start).as_secs_f64(),
            accepted + other,
        )
    } else {
        (last_rx.duration_since(start).as_secs_f64(), received)
    };
    let after = a.server_pid.and_then(sample);
    let rate = done as f64 / wall;
    let mode = if a.presettled {
        "presettled"
    } else {
        "unsettled"
    };
    let (cpu, rss, hwm) = match (before, after) {
        (Some(b), Some(x)) => {
            let ticks = x.cpu_ticks - b.cpu_ticks;
            (
                format!("{:.0}%", ticks as f64 / 100.0 / wall * 100.0),
                format!("{} MiB", x.rss_kb / 1024),
                format!("{} MiB", x.hwm_kb / 1024),
            )
        }
        _ => ("n/a".into(), "n/a".into(), "n/a".into()),
    };
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    for (k, n, first, again) in &dups {
        eprintln!(
            "duplicate: address #{k} seq {n}: first at {:.3}s, again at {:.3}s",
            first.as_secs_f64(),
            again.as_secs_f64()
        );
    }
    println!(
        "{label}: {mode} size={size}B rate_target={rt} addresses={n_addr} receivers={n} sent={sent} received={received} accepted={accepted} other_outcomes={other} duplicates={dup_count} \
         wall={wall:.2}s rate={rate:.0} msg/s latency_us p50={p50:.0} p90={p90:.0} p99={p99:.0} p99.9={p999:.0} max={max:.0} server_cpu={cpu} server_rss={rss} server_hwm={hwm}",
        label = a.label,
        rt = if a.rate == 0 {
            "max".to_string()
        } else {
            a.rate.to_string()
        },
        n = receivers,
        p50 = us(0.5),
        p90 = us(0.9),
        p99 = us(0.99),
        p999 = us(0.999),
        max = hist.max() as f64 / 1000.0,
    );
    Ok(())
}

async fn idle_bench(a: IdleArgs) -> anyhow::Result<()> {
    let before = sample(a.server_pid).context("cannot read server process")?;
    let mut conns = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let mut c = Client::connect(&a.url, &format!("idle-{i}")).await?;
        let addr = format!("{}-idle-{i}", a.address);
        c.receiver("r", Some(&addr), 10, false).await?;
        c.sender("s", Some(&addr), false).await?;
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sample(a.server_pid).context("cannot read server process")?;
    let per = (after.rss_kb.saturating_sub(before.rss_kb)) as f64 * 1024.0 / a.connections as f64;
    println!(
        "{}: idle connections={} (1 session, 2 links each) rss_before={} KiB rss_after={} KiB per_connection={:.0} B",
        a.label, a.connections, before.rss_kb, after.rss_kb, per
    );
    drop(conns);
    Ok(())
}
