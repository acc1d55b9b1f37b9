//! Interop test harness for the Enmesh router.
//!
//! This crate owns the Rust interop tests that drive the real `enmesh` binary through external
//! AMQP 1.0 clients (today fe2o3-amqp, see `tests/fe2o3.rs`), and the small harness they share:
//! [`Router::start`] spawns `enmesh standalone --listen 127.0.0.1:0 --http 127.0.0.1:0
//! [--config FILE]`, waits for the `enmesh ready amqp=HOST:PORT http=HOST:PORT` line and stops
//! the process (SIGTERM, then SIGKILL) when the [`Router`] is dropped. The router's stderr goes to a
//! log file in the temp directory; its tail is printed when a test fails.
//!
//! [`Router::start_with_data`] runs over a data directory the caller owns (see [`DataDir`]), so a
//! test can [`Router::kill`] the router and start a new one over the same broker state.
//!
//! The binary is `$ENMESH_BIN` if set, else `<repo>/target/debug/enmesh` (build it first with
//! `cargo build -p enmesh`). Only the standard library is used here, so the harness works from
//! both sync and async tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long to wait for the ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a SIGTERM'd router gets before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// Path of the router binary: `$ENMESH_BIN`, else `<repo>/target/debug/enmesh`.
pub fn router_binary() -> PathBuf {
    match std::env::var_os("ENMESH_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/enmesh"),
    }
}

/// A unique path in the temp directory (`enmesh-tests-<pid>-<n>-<nanos>.<ext>`).
pub fn temp_path(ext: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "enmesh-tests-{}-{n}-{nanos}.{ext}",
        std::process::id()
    ))
}

/// Parse `enmesh ready amqp=HOST:PORT http=HOST:PORT` into the two addresses.
pub fn parse_ready_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("enmesh ready ")?;
    let mut parts = rest.split_whitespace();
    let amqp = parts.next()?.strip_prefix("amqp=")?.parse().ok()?;
    let http = parts.next()?.strip_prefix("http=")?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((amqp, http))
}

/// A data directory that outlives the routers started over it; removed on drop.
pub struct DataDir(PathBuf);

impl DataDir {
    /// A fresh (not yet existing) directory path in the temp directory.
    pub fn new() -> DataDir {
        DataDir(temp_path("data"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for DataDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running router process; stopped on drop.
pub struct Router {
    child: Child,
    /// AMQP listener address.
    pub amqp: SocketAddr,
    /// HTTP (management, health, metrics) listener address.
    pub http: SocketAddr,
    /// MQTT listener address (the standalone's gateway).
    pub mqtt: Option<SocketAddr>,
    config_path: Option<PathBuf>,
    log_path: PathBuf,
    /// The broker shard's data; removed on drop unless the caller owns it.
    data_dir: PathBuf,
    owns_data: bool,
}

impl Router {
    /// Start `enmesh standalone` with no config file.
    pub fn start() -> Router {
        Self::start_with(None)
    }

    /// Start `enmesh standalone --config FILE` with `yaml` written to a temp file.
    pub fn start_with_config(yaml: &str) -> Router {
        Self::start_with(Some(yaml))
    }

    /// Start the router, optionally with a YAML config. Panics (with the router's stderr) if the
    /// binary is missing, exits early or does not print its ready line within [`READY_TIMEOUT`].
    pub fn start_with(config: Option<&str>) -> Router {
        // Each router keeps its broker shard's data in a directory of its own.
        Self::spawn(config, temp_path("data"), true)
    }

    /// Like [`Router::start_with`], over `data_dir`, which the caller owns: it is kept when the
    /// router stops, so another router started over it recovers the broker's state.
    pub fn start_with_data(config: Option<&str>, data_dir: &Path) -> Router {
        Self::spawn(config, data_dir.to_path_buf(), false)
    }

    fn spawn(config: Option<&str>, data_dir: PathBuf, owns_data: bool) -> Router {
        let bin = router_binary();
        assert!(
            bin.exists(),
            "router binary {} not found: run `cargo build -p enmesh` or set ENMESH_BIN",
            bin.display()
        );
        let config_path = config.map(|yaml| {
            let path = temp_path("yaml");
            std::fs::write(&path, yaml).expect("write router config");
            path
        });
        let log_path = temp_path("log");
        let log = std::fs::File::create(&log_path).expect("create router log");

        let mut cmd = Command::new(&bin);
        cmd.args([
            "standalone",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            "127.0.0.1:0",
        ]);
        if let Some(p) = &config_path {
            cmd.arg("--config").arg(p);
        }
        cmd.arg("--data").arg(&data_dir);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));

        // Read stdout on a thread: the first ready line is sent back, then the rest is drained so
        // the router never blocks on a full pipe.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Fails once the ready line was taken and the receiver dropped: keep draining.
                let _ = tx.send(line);
            }
        });

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = Vec::new();
        let mut mqtt = None;
        let (amqp, http) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addrs) = parse_ready_line(&line) {
                        break addrs;
                    }
                    if let Some(a) = line.strip_prefix("enmesh mqtt listening mqtt=") {
                        mqtt = a.trim().parse().ok();
                    }
                    seen.push(line);
                }
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    panic!(
                        "router did not print its ready line ({e:?}); status {status:?}; \
                         stdout {seen:?}; stderr:\n{}",
                        tail(&log_path, 4000)
                    );
                }
            }
        };
        Router {
            child,
            amqp,
            http,
            mqtt,
            config_path,
            log_path,
            data_dir,
            owns_data,
        }
    }

    /// `amqp://HOST:PORT`
    pub fn amqp_url(&self) -> String {
        format!("amqp://{}", self.amqp)
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `max` bytes of the router's stderr.
    pub fn stderr_tail(&self, max: usize) -> String {
        tail(&self.log_path, max)
    }

    /// Plain HTTP/1.1 GET against the management listener; returns (status, body).
    pub fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head:?}")))?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((status, body))
    }

    /// SIGKILL (a crash: nothing is flushed or closed) and reap the process.
    pub fn kill(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL. Returns the exit status if known.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- router stderr ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.log_path, 8000)
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
        if let Some(p) = &self.config_path {
            let _ = std::fs::remove_file(p);
        }
        if self.owns_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

fn tail(path: &PathBuf, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).into_owned()
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16);
        let Ok(size) = size else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let (a, h) =
            parse_ready_line("enmesh ready amqp=127.0.0.1:5672 http=127.0.0.1:8080\n").unwrap();
        assert_eq!(a.port(), 5672);
        assert_eq!(h.port(), 8080);
        assert!(parse_ready_line("enmesh starting").is_none());
        assert!(parse_ready_line("enmesh ready amqp=x http=127.0.0.1:1").is_none());
    }

    #[test]
    fn dechunk_works() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }

    #[test]
    fn temp_paths_are_unique() {
        assert_ne!(temp_path("yaml"), temp_path("yaml"));
    }
}
