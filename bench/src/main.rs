//! `enmesh-bench`: the load generator for Enmesh and its peers (design.md §3, §8).
//!
//! It speaks AMQP 1.0 through the project's engine and drives any AMQP 1.0 server the same way:
//! one producer connection and N consumer connections, all-out or at a fixed rate (latency is
//! measured from each message's *intended* send time, so a stalled server cannot hide its
//! queueing: no coordinated omission), unsettled or presettled. It prints sent, received,
//! end-to-end rate, latency percentiles from an HDR histogram, and the server's CPU and RSS when
//! given its pid.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amqp::client::Client;
use amqp::{DeliveryState, Event};
use anyhow::{Context, bail};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;

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
}

#[derive(clap::Args, Clone)]
struct AmqpArgs {
    /// host:port of the AMQP server.
    #[arg(long, default_value = "127.0.0.1:5672")]
    url: String,
    #[arg(long, default_value = "bench")]
    address: String,
    /// Messages to send (after warm-up).
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Amqp(a) => amqp_bench(a).await,
            Cmd::Idle(a) => idle_bench(a).await,
        }
    })
}

/// Runs `f` on its own OS thread with a current-thread runtime, so that the producer's
/// precise sleeps never delay a consumer, and returns a handle to await its result.
fn on_thread<T: Send + 'static>(
    f: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> tokio::sync::oneshot::Receiver<anyhow::Result<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(f));
        let _ = tx.send(r);
    });
    rx
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

struct RecvResult {
    received: u64,
    hist: Histogram<u64>,
    last_at: Option<Instant>,
}

async fn consumer(
    a: AmqpArgs,
    idx: usize,
    base: Instant,
    expect: u64,
    measured_from: Arc<AtomicU64>,
) -> anyhow::Result<RecvResult> {
    let mut c = Client::connect(&a.url, &format!("bench-rx-{idx}")).await?;
    let (link, _) = c
        .receiver(
            &format!("rx-{idx}"),
            Some(&a.address),
            a.credit,
            a.presettled,
        )
        .await?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut received = 0u64;
    let mut last_at = None;
    let size = a.size;
    while received < expect {
        c.pump().await?;
        let now = nanos(base);
        while let Some(e) = c.events.pop_front() {
            match e {
                Event::Delivery(d) => {
                    received += 1;
                    let p = &d.payload;
                    if p.len() >= size {
                        let at = p.len() - size;
                        let mut ts = [0u8; 8];
                        ts.copy_from_slice(&p[at..at + 8]);
                        let sent = u64::from_be_bytes(ts);
                        let seq = {
                            let mut s = [0u8; 8];
                            if size >= 16 {
                                s.copy_from_slice(&p[at + 8..at + 16]);
                            }
                            u64::from_be_bytes(s)
                        };
                        if seq >= measured_from.load(Ordering::Relaxed) {
                            let _ = hist.record(now.saturating_sub(sent).max(1));
                        }
                    }
                    if !d.settled {
                        c.conn.disposition(
                            link,
                            d.delivery_id,
                            true,
                            Some(DeliveryState::Accepted),
                        );
                    }
                }
                Event::Closed(e) => bail!("consumer connection closed: {e:?}"),
                _ => {}
            }
        }
        last_at = Some(Instant::now());
        // Top credit up in batches.
        if c.conn.receiver_credit(link) < a.credit / 2 {
            c.conn.set_credit(link, a.credit, false);
        }
    }
    c.flush().await?;
    Ok(RecvResult {
        received,
        hist,
        last_at,
    })
}

async fn producer(a: AmqpArgs, base: Instant, total: u64) -> anyhow::Result<(u64, u64, u64)> {
    let mut c = Client::connect(&a.url, "bench-tx").await?;
    let link = c.sender("tx", Some(&a.address), a.presettled).await?;
    // One encoded message; each send patches its timestamp and sequence number in place.
    let body = vec![0u8; a.size.max(16)];
    let mut msg = BytesMut::new();
    amqp::message::build(
        &amqp::message::Simple {
            body: &body,
            ..Default::default()
        },
        &mut msg,
    );
    let at = msg.len() - body.len();
    let (mut sent, mut accepted, mut other) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let interval = (a.rate > 0).then(|| Duration::from_nanos(1_000_000_000 / a.rate));
    let mut inflight_outcomes = 0u64;
    loop {
        // Send what credit (and, at a fixed rate, the schedule) allows.
        let mut batch = 0;
        while sent < total && c.conn.credit(link) > 0 && batch < 500 {
            let intended = match interval {
                Some(iv) => {
                    let due = start + iv * sent as u32;
                    if due > Instant::now() {
                        break;
                    }
                    due.duration_since(base).as_nanos() as u64
                }
                None => nanos(base),
            };
            msg[at..at + 8].copy_from_slice(&intended.to_be_bytes());
            msg[at + 8..at + 16].copy_from_slice(&sent.to_be_bytes());
            c.conn
                .send(link, &sent.to_be_bytes(), &msg, a.presettled, 0);
            sent += 1;
            batch += 1;
            if !a.presettled {
                inflight_outcomes += 1;
            }
        }
        let done_sending = sent >= total;
        if done_sending && inflight_outcomes == 0 {
            break;
        }
        let out = c.conn.output();
        if !out.is_empty() {
            let b = out.split();
            c.stream.write_all(&b).await?;
        }
        // While there is credit and work left, read without blocking (at a fixed rate this
        // spins to the next due time: tokio's timer has 1 ms granularity, far coarser than
        // the 100 µs between messages at 10k msg/s). Block only when there is nothing to send.
        if !done_sending && c.conn.credit(link) > 0 {
            match c.stream.try_read_buf(&mut c.inbuf) {
                Ok(0) => bail!("producer connection closed"),
                Ok(_) => {
                    c.conn.handle_input(&mut c.inbuf, Instant::now())?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(iv) = interval {
                        // This thread runs only the producer: a short blocking sleep (~60 µs
                        // precision) keeps the schedule without spinning the core.
                        let due = start + iv * sent as u32;
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
            while let Some(e) = c.conn.poll_event() {
                c.events.push_back(e);
            }
        } else {
            c.pump().await?;
        }
        if c.inbuf.capacity() - c.inbuf.len() < 4096 {
            c.inbuf.reserve(1 << 16);
        }
        while let Some(e) = c.events.pop_front() {
            match e {
                Event::Disposition {
                    first, last, state, ..
                } => {
                    let n = u64::from(last.wrapping_sub(first)) + 1;
                    inflight_outcomes = inflight_outcomes.saturating_sub(n);
                    if matches!(state, Some(DeliveryState::Accepted)) {
                        accepted += n;
                    } else {
                        other += n;
                    }
                }
                Event::Closed(e) => bail!("producer connection closed: {e:?}"),
                _ => {}
            }
        }
    }
    c.flush().await?;
    Ok((sent, accepted, other))
}

async fn amqp_bench(a: AmqpArgs) -> anyhow::Result<()> {
    if a.size < 16 {
        bail!("--size must be at least 16 (timestamp and sequence number)");
    }
    let base = Instant::now();
    let total = a.warmup + a.count;
    let per_consumer = if a.fanout {
        total
    } else {
        total / a.receivers as u64
    };
    let measured_from = Arc::new(AtomicU64::new(a.warmup));
    let mut rx = Vec::new();
    for i in 0..a.receivers {
        let expect = if a.fanout || i + 1 < a.receivers {
            per_consumer
        } else {
            total - per_consumer * (a.receivers as u64 - 1)
        };
        rx.push(on_thread(consumer(
            a.clone(),
            i,
            base,
            expect,
            measured_from.clone(),
        )));
    }
    // Give consumers time to attach so the producer gets credit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = a.server_pid.and_then(sample);
    let t0 = Instant::now();
    let prod = on_thread(producer(a.clone(), base, total));
    let limit = Duration::from_secs(a.timeout);
    let (sent, accepted, other) = tokio::time::timeout(limit, prod)
        .await
        .context("producer timed out")???;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut received = 0;
    let mut last = t0;
    for r in rx {
        let r = tokio::time::timeout(limit, r)
            .await
            .context("consumer timed out")???;
        received += r.received;
        hist.add(&r.hist)?;
        if let Some(l) = r.last_at {
            last = last.max(l);
        }
    }
    let wall = last.duration_since(t0).as_secs_f64();
    let after = a.server_pid.and_then(sample);
    let rate = received as f64 / wall;
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
    println!(
        "{label}: {mode} size={size}B rate_target={rt} receivers={n} sent={sent} received={received} accepted={accepted} other_outcomes={other} \
         wall={wall:.2}s rate={rate:.0} msg/s latency_us p50={p50:.0} p90={p90:.0} p99={p99:.0} p99.9={p999:.0} max={max:.0} server_cpu={cpu} server_rss={rss} server_hwm={hwm}",
        label = a.label,
        size = a.size,
        rt = if a.rate == 0 {
            "max".to_string()
        } else {
            a.rate.to_string()
        },
        n = a.receivers,
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
        let addr = format!("{}/{i}", a.address);
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
