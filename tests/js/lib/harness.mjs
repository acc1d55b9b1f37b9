// Test harness for the Enmesh acceptance suite.
//
// - startRouter(): spawns `enmesh standalone --listen 127.0.0.1:0 --http 127.0.0.1:0 [--config F]`
//   and waits for the ready line `enmesh ready amqp=HOST:PORT http=HOST:PORT`.
// - Client: a thin promise wrapper around one rhea connection (reconnect disabled, every error
//   captured instead of thrown from the container).
// - until()/sleep(): bounded polling so no test can hang.
//
// The router binary is $ENMESH_BIN, else <repo>/target/debug/enmesh.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomUUID } from 'node:crypto';
import rhea from 'rhea';

export { rhea };

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(HERE, '..', '..', '..');

export function routerBinary() {
  return process.env.ENMESH_BIN || path.join(REPO_ROOT, 'target', 'debug', 'enmesh');
}

const READY_RE = /^enmesh ready amqp=(\S+) http=(\S+)$/;
const READY_TIMEOUT_MS = 15_000;
const TERM_GRACE_MS = 3_000;

/** Every router process still running, killed hard if the test process exits early. */
const live = new Set();
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Poll `predicate` every 10 ms until it is truthy; reject after `timeoutMs` with a message built
 * from `describe()` (a function, so it reports the state at the moment of the failure).
 */
export async function until(predicate, timeoutMs, describe = () => 'condition') {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() >= deadline) {
      const what = typeof describe === 'function' ? describe() : String(describe);
      throw new Error(`timed out after ${timeoutMs} ms waiting for: ${what}`);
    }
    await sleep(10);
  }
}

/** Race a promise against a timer. */
export function withTimeout(promise, timeoutMs, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms: ${what}`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function splitHostPort(s) {
  const i = s.lastIndexOf(':');
  if (i <= 0) throw new Error(`cannot parse address '${s}'`);
  let host = s.slice(0, i);
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  const port = Number(s.slice(i + 1));
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`bad port in '${s}'`);
  return { host, port };
}

export class Router {
  constructor(child, amqp, http, output, cleanupDir) {
    this.child = child;
    this.amqp = amqp; // { host, port }
    this.http = http; // { host, port }
    this.httpUrl = `http://${http.host.includes(':') ? `[${http.host}]` : http.host}:${http.port}`;
    this.output = output; // { stdout: string[], stderr: string }
    this.cleanupDir = cleanupDir;
    this.clients = new Set();
    this.exit = new Promise((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) {
        resolve({ code: child.exitCode, signal: child.signalCode });
      } else {
        child.once('exit', (code, signal) => resolve({ code, signal }));
      }
    });
  }

  /** Last lines of the router's stderr, for failure messages. */
  stderrTail(chars = 4000) {
    const s = this.output.stderr;
    return s.length > chars ? `...${s.slice(-chars)}` : s;
  }

  get running() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Open a client connection (resolves once the router's open frame arrived). */
  async connect(options = {}, timeoutMs = 5000) {
    const client = new Client(this, options);
    this.clients.add(client);
    await client.opened(timeoutMs);
    return client;
  }

  /** Close every client this router handed out (best effort, bounded). */
  async closeClients() {
    const all = [...this.clients];
    this.clients.clear();
    await Promise.all(all.map((c) => c.close().catch(() => {})));
  }

  /**
   * SIGTERM, wait up to 3 s, then SIGKILL. Resolves to { code, signal, killed } where killed is
   * true if SIGKILL was needed.
   */
  async stop() {
    let killed = false;
    if (this.running) {
      this.child.kill('SIGTERM');
      let timer;
      const grace = new Promise((resolve) => { timer = setTimeout(() => resolve('timeout'), TERM_GRACE_MS); });
      const first = await Promise.race([this.exit, grace]);
      clearTimeout(timer);
      if (first === 'timeout') {
        killed = true;
        this.child.kill('SIGKILL');
      }
    }
    const result = await this.exit;
    live.delete(this.child);
    if (this.cleanupDir) {
      rmSync(this.cleanupDir, { recursive: true, force: true });
      this.cleanupDir = undefined;
    }
    return { ...result, killed };
  }

  /** Close clients, then stop the process. Safe to call more than once. */
  async shutdown() {
    await this.closeClients();
    return this.stop();
  }
}

/**
 * Start a router. `config` (optional) is YAML text written to a temporary file and passed with
 * --config. Rejects (with the router's stderr) if the process exits or stays silent.
 */
export async function startRouter({ config, args = [] } = {}) {
  const bin = routerBinary();
  if (!existsSync(bin)) {
    throw new Error(`router binary not found at ${bin} (build it, or set ENMESH_BIN)`);
  }
  // Each router keeps its broker shard's data in a directory of its own.
  const dir = mkdtempSync(path.join(tmpdir(), 'enmesh-js-'));
  const argv = ['standalone', '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0',
    '--data', path.join(dir, 'data')];
  if (config !== undefined) {
    const file = path.join(dir, 'config.yaml');
    writeFileSync(file, config);
    argv.push('--config', file);
  }
  argv.push(...args);

  const child = spawn(bin, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { RUST_LOG: 'warn', ...process.env },
  });
  live.add(child);
  const output = { stdout: [], stderr: '' };
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    output.stderr += d;
    if (output.stderr.length > 200_000) output.stderr = output.stderr.slice(-100_000);
  });

  const ready = new Promise((resolve, reject) => {
    let buf = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, '');
        buf = buf.slice(nl + 1);
        output.stdout.push(line);
        const m = READY_RE.exec(line);
        if (m) {
          try {
            resolve({ amqp: splitHostPort(m[1]), http: splitHostPort(m[2]) });
          } catch (e) {
            reject(e);
          }
        }
      }
    });
    child.once('error', (e) => reject(new Error(`failed to spawn ${bin}: ${e.message}`)));
    child.once('exit', (code, signal) =>
      reject(new Error(`router exited (code=${code} signal=${signal}) before the ready line.\n` +
        `argv: ${argv.join(' ')}\nstdout: ${output.stdout.join('\n')}\nstderr: ${output.stderr}`)));
  });

  let addrs;
  try {
    addrs = await withTimeout(ready, READY_TIMEOUT_MS, `ready line from ${bin} ${argv.join(' ')}`);
  } catch (e) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    live.delete(child);
    if (dir) rmSync(dir, { recursive: true, force: true });
    if (!/^router exited/.test(e.message)) {
      e.message += `\nstdout so far: ${JSON.stringify(output.stdout)}\nstderr: ${output.stderr}`;
    }
    throw e;
  }
  return new Router(child, addrs.amqp, addrs.http, output, dir);
}

/**
 * One rhea connection to the router. Errors from rhea are recorded on `this.errors` rather than
 * thrown out of the container's EventEmitter.
 */
export class Client {
  constructor(router, options = {}) {
    this.router = router;
    this.errors = [];
    this.container = rhea.create_container({ id: options.container_id || `js-${randomUUID()}` });
    this.container.on('error', (e) => this.errors.push(e));
    this.closed = false;
    this.conn = this.container.connect({
      host: router.amqp.host,
      port: router.amqp.port,
      reconnect: false,
      idle_time_out: 0,
      ...options,
    });
    this.conn.on('connection_error', (ctx) => this.errors.push(ctx.connection.error || ctx.error));
    this.conn.on('protocol_error', (e) => this.errors.push(e));
    // A listener keeps rhea from printing "disconnected" warnings.
    this.conn.on('disconnected', (ctx) => {
      this.closed = true;
      if (ctx.error) this.errors.push(ctx.error);
    });
    this.conn.on('connection_close', () => { this.closed = true; });
  }

  opened(timeoutMs = 5000) {
    if (this.conn.is_open()) return Promise.resolve(this);
    return withTimeout(new Promise((resolve, reject) => {
      this.conn.once('connection_open', () => resolve(this));
      this.conn.once('connection_close', (ctx) =>
        reject(new Error(`connection closed before open: ${fmtErr(ctx.connection.error)}`)));
      this.conn.once('disconnected', (ctx) =>
        reject(new Error(`disconnected before open: ${fmtErr(ctx.error)}`)));
    }), timeoutMs, 'AMQP connection open');
  }

  /** Capabilities the router offered in its open frame, as strings. */
  offeredCapabilities() {
    const caps = this.conn.remote.open && this.conn.remote.open.offered_capabilities;
    if (caps === undefined || caps === null) return [];
    return (Array.isArray(caps) ? caps : [caps]).map(String);
  }

  /** Open a receiver; resolves with the rhea Receiver once the router answered the attach. */
  openReceiver(options, timeoutMs = 5000) {
    return openLink(this.conn.open_receiver(options), 'receiver', timeoutMs);
  }

  /**
   * Open a sender; resolves with the rhea Sender once the router answered the attach.
   * 'modified' is reported as 'modified' (rhea's default folds it into 'released').
   */
  openSender(options, timeoutMs = 5000) {
    const opts = typeof options === 'string' ? { target: { address: options } } : (options || {});
    return openLink(this.conn.open_sender({ treat_modified_as_released: false, ...opts }), 'sender', timeoutMs);
  }

  /** Polite close: send close, wait (bounded) for the router's close or the socket to drop. */
  async close(timeoutMs = 2000) {
    this.router.clients.delete(this);
    if (this.closed || !this.conn.is_open()) {
      this.destroy();
      return;
    }
    const done = new Promise((resolve) => {
      this.conn.once('connection_close', resolve);
      this.conn.once('disconnected', resolve);
    });
    this.conn.close();
    try {
      await withTimeout(done, timeoutMs, 'connection close');
    } catch {
      /* fall through: destroy the socket */
    }
    this.destroy();
  }

  /**
   * Abrupt: drop the TCP socket without an AMQP close. Goes through rhea's abort_socket so rhea
   * also clears its heartbeat timers (a bare socket.destroy() leaves them running, which keeps
   * the test process alive forever when the router advertised an idle-time-out).
   */
  destroy() {
    this.closed = true;
    try {
      if (this.conn.socket) {
        if (typeof this.conn.abort_socket === 'function') this.conn.abort_socket(this.conn.socket);
        else this.conn.socket.destroy();
      }
    } catch { /* ignore */ }
  }
}

function openLink(link, kind, timeoutMs) {
  return withTimeout(new Promise((resolve, reject) => {
    link.once(`${kind}_open`, () => resolve(link));
    link.once(`${kind}_error`, (ctx) =>
      reject(new Error(`${kind} attach refused: ${fmtErr(ctx[kind].error)}`)));
    link.once(`${kind}_close`, (ctx) =>
      reject(new Error(`${kind} closed before open: ${fmtErr(ctx[kind].error)}`)));
  }), timeoutMs, `${kind} attach (name=${link.name})`);
}

export function fmtErr(e) {
  if (!e) return '(no error)';
  if (e.condition !== undefined) return `${e.condition}${e.description ? `: ${e.description}` : ''}`;
  return String(e.message || e);
}

/** Outcome name of a settled/updated delivery as seen by a sender ('accepted', 'rejected', ...). */
export function outcomeName(delivery) {
  const s = delivery.remote_state;
  return s && s.constructor && s.constructor.composite_type ? s.constructor.composite_type : undefined;
}

/**
 * Track the outcomes a sender observes (first outcome per delivery). Senders from
 * Client.openSender report 'modified' separately from 'released'.
 */
export function trackOutcomes(sender) {
  const outcomes = new Map(); // delivery -> { outcome, state }
  for (const ev of ['accepted', 'rejected', 'released', 'modified']) {
    sender.on(ev, (ctx) => {
      if (!outcomes.has(ctx.delivery)) outcomes.set(ctx.delivery, { outcome: ev, state: ctx.delivery.remote_state });
    });
  }
  // Settled without an outcome we know (e.g. settled with no state): keep it visible.
  sender.on('settled', (ctx) => {
    if (!outcomes.has(ctx.delivery)) outcomes.set(ctx.delivery, { outcome: outcomeName(ctx.delivery) || 'settled-no-outcome', state: ctx.delivery.remote_state });
  });
  return outcomes;
}

/** Collect messages from a receiver. */
export function collect(receiver) {
  const got = [];
  receiver.on('message', (ctx) => got.push({ message: ctx.message, delivery: ctx.delivery }));
  return got;
}

/** Unique address under a prefix, so tests never share state. */
export function uniqueAddress(prefix) {
  return `${prefix}${randomUUID().slice(0, 8)}`;
}
