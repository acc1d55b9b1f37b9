// Process lifecycle and connection basics: ready line, plain AMQP / SASL, capabilities, SIGTERM.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startRouter, withTimeout } from './lib/harness.mjs';

let router;
before(async () => { router = await startRouter(); });
after(async () => { if (router) await router.shutdown(); });

test('ready line carries live AMQP and HTTP addresses', { timeout: 10_000 }, async () => {
  assert.equal(router.output.stdout.filter((l) => l.startsWith('enmesh ready')).length, 1,
    `exactly one ready line expected, stdout was ${JSON.stringify(router.output.stdout)}`);
  assert.equal(router.amqp.host, '127.0.0.1');
  assert.notEqual(router.amqp.port, 0);
  assert.notEqual(router.http.port, 0);
  const res = await withTimeout(fetch(`${router.httpUrl}/healthz`), 5000, 'GET /healthz');
  assert.equal(res.status, 200);
  assert.equal((await res.text()).trim(), 'ok');
});

test('plain AMQP connection (no SASL) opens and router offers ANONYMOUS-RELAY', { timeout: 10_000 }, async () => {
  const c = await router.connect();
  assert.ok(c.offeredCapabilities().includes('ANONYMOUS-RELAY'),
    `offered capabilities: ${JSON.stringify(c.offeredCapabilities())}`);
  assert.ok(c.conn.remote.open.container_id, 'router open frame has a container-id');
  await c.close();
  assert.deepEqual(c.errors, []);
});

test('SASL ANONYMOUS connection opens', { timeout: 10_000 }, async () => {
  const c = await router.connect({ username: 'anonymous' });
  assert.ok(c.conn.is_open());
  await c.close();
  assert.deepEqual(c.errors, []);
});

test('SASL PLAIN connection opens (any credentials accepted by default)', { timeout: 10_000 }, async () => {
  const c = await router.connect({ username: 'someone', password: 'secret' });
  assert.ok(c.conn.is_open());
  await c.close();
  assert.deepEqual(c.errors, []);
});

test('SIGTERM closes connections with amqp:connection:forced and exits 0', { timeout: 15_000 }, async () => {
  const r = await startRouter();
  try {
    const c = await r.connect();
    const closed = new Promise((resolve) => {
      c.conn.once('connection_close', (ctx) => resolve({ event: 'close', error: ctx.connection.error }));
      c.conn.once('disconnected', (ctx) => resolve({ event: 'disconnected', error: c.conn.error || ctx.error }));
    });
    const stopped = r.stop();
    const seen = await withTimeout(closed, 5000, 'connection closed by router on SIGTERM');
    assert.equal(seen.event, 'close', `expected an AMQP close frame, got socket ${seen.event} (${seen.error})`);
    assert.equal(String(seen.error && seen.error.condition), 'amqp:connection:forced',
      `close error was ${JSON.stringify(seen.error)}`);
    const result = await stopped;
    assert.equal(result.killed, false, 'router did not exit within 3 s of SIGTERM');
    assert.equal(result.code, 0, `exit ${JSON.stringify(result)}; stderr: ${r.stderrTail()}`);
  } finally {
    await r.shutdown();
  }
});
