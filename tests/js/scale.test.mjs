// Many links on one connection; many concurrent connections.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startRouter, until, collect, trackOutcomes, uniqueAddress, withTimeout } from './lib/harness.mjs';

let router;
before(async () => { router = await startRouter(); });
afterEach(async () => { if (router) await router.closeClients(); });
after(async () => { if (router) await router.shutdown(); });

test('scale: 1000 receiver links on one connection all open and work', { timeout: 30_000 }, async () => {
  const base = uniqueAddress('many/');
  const N = 1000;
  const c = await router.connect();
  const receivers = await withTimeout(
    Promise.all(Array.from({ length: N }, (_, i) =>
      c.openReceiver({ source: { address: `${base}/${i}` }, credit_window: 10 }, 20_000))),
    20_000, `${N} receiver attaches`);
  assert.equal(receivers.length, N);
  assert.ok(receivers.every((r) => r.is_open()), 'all open');
  assert.deepEqual(c.errors, []);

  // The first and the last link both route.
  const probes = [0, N - 1];
  const gots = probes.map((i) => collect(receivers[i]));
  const p = await router.connect();
  const sender = await p.openSender({ target: {} });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'anonymous sender credit');
  for (const i of probes) sender.send({ to: `${base}/${i}`, body: `probe-${i}` });
  await until(() => gots.every((g) => g.length === 1), 5000,
    () => `probe deliveries: ${gots.map((g) => g.length).join(', ')}`);
  probes.forEach((i, k) => assert.equal(gots[k][0].message.body, `probe-${i}`));
  await until(() => outcomes.size === probes.length, 5000, 'probe outcomes');
  assert.deepEqual([...new Set([...outcomes.values()].map((o) => o.outcome))], ['accepted']);
});

test('scale: 2000 concurrent connections each round-trip a message', { timeout: 90_000 }, async () => {
  const base = uniqueAddress('conns/');
  const N = 2000;
  const clients = await withTimeout(
    Promise.all(Array.from({ length: N }, () => router.connect({}, 60_000))),
    60_000, `${N} connections open`);
  assert.equal(clients.length, N);
  assert.ok(clients.every((c) => c.conn.is_open()));

  const results = await withTimeout(Promise.all(clients.map(async (c, i) => {
    const address = `${base}/${i}`;
    const receiver = await c.openReceiver({ source: { address } }, 15_000);
    const got = collect(receiver);
    const sender = await c.openSender({ target: { address } }, 15_000);
    const outcomes = trackOutcomes(sender);
    await until(() => sender.sendable(), 15_000, `credit on connection ${i}`);
    sender.send({ body: `conn-${i}` });
    await until(() => got.length >= 1 && outcomes.size >= 1, 15_000, `round trip on connection ${i}`);
    return { body: got[0].message.body, outcome: [...outcomes.values()][0].outcome };
  })), 60_000, `${N} round trips`);

  results.forEach((r, i) => {
    assert.equal(r.body, `conn-${i}`);
    assert.equal(r.outcome, 'accepted');
  });
  const errs = clients.flatMap((c) => c.errors);
  assert.deepEqual(errs, []);
});
