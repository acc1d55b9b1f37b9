// Anycast routing: point-to-point, competing consumers, large messages.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  startRouter, until, collect, trackOutcomes, uniqueAddress, sleep, rhea,
} from './lib/harness.mjs';

let router;
before(async () => { router = await startRouter(); });
afterEach(async () => { if (router) await router.closeClients(); });
after(async () => { if (router) await router.shutdown(); });

test('anycast: messages sent to an address arrive at its consumer, in order, and are accepted', { timeout: 15_000 }, async () => {
  const address = uniqueAddress('anycast/basic-');
  const consumer = await router.connect();
  const receiver = await consumer.openReceiver({ source: { address } });
  const got = collect(receiver);

  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'producer credit');

  const N = 50;
  for (let i = 0; i < N; i++) {
    sender.send({ message_id: `m-${i}`, subject: 'basic', application_properties: { seq: i }, body: `hello ${i}` });
  }
  await until(() => got.length >= N, 5000, () => `${got.length}/${N} messages received`);
  await until(() => outcomes.size >= N, 5000, () => `${outcomes.size}/${N} outcomes at producer`);
  await sleep(100); // anything extra (duplicates) would show up now

  assert.equal(got.length, N, 'no duplicates');
  got.forEach(({ message }, i) => {
    assert.equal(message.body, `hello ${i}`);
    assert.equal(message.message_id, `m-${i}`);
    assert.equal(message.subject, 'basic');
    assert.equal(message.application_properties.seq, i);
  });
  const kinds = [...outcomes.values()].map((o) => o.outcome);
  assert.deepEqual([...new Set(kinds)], ['accepted']);
});

test('anycast: competing consumers share the load, every message delivered exactly once', { timeout: 20_000 }, async () => {
  const address = uniqueAddress('anycast/compete-');
  // Consumers grant a small amount of credit and only top it up after a short pause, so a router
  // that respects credit cannot push everything to one of them.
  const consumers = [];
  for (let k = 0; k < 2; k++) {
    const c = await router.connect();
    const receiver = await c.openReceiver({ source: { address }, credit_window: 0 });
    const got = [];
    receiver.on('message', (ctx) => {
      got.push(ctx.message.body);
      if (receiver.credit === 0) setTimeout(() => receiver.add_credit(5), 20);
    });
    receiver.add_credit(5);
    consumers.push({ c, receiver, got });
  }

  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'producer credit');

  const N = 200;
  for (let i = 0; i < N; i++) sender.send({ body: `job-${i}` });

  const total = () => consumers.reduce((n, x) => n + x.got.length, 0);
  await until(() => total() >= N, 15_000,
    () => `${total()}/${N} received (split ${consumers.map((x) => x.got.length).join('+')})`);
  await until(() => outcomes.size >= N, 5000, () => `${outcomes.size}/${N} outcomes at producer`);
  await sleep(100);

  const [a, b] = consumers.map((x) => x.got);
  assert.equal(a.length + b.length, N, `total exact (split ${a.length}+${b.length})`);
  assert.ok(a.length > 0 && b.length > 0, `both consumers get some (split ${a.length}+${b.length})`);
  const all = [...a, ...b].sort();
  const expected = Array.from({ length: N }, (_, i) => `job-${i}`).sort();
  assert.deepEqual(all, expected, 'each message exactly once');
  assert.deepEqual([...new Set([...outcomes.values()].map((o) => o.outcome))], ['accepted']);
});

for (const [label, size] of [['1 MiB', 1024 * 1024], ['10 MiB', 10 * 1024 * 1024]]) {
test(`anycast: ${label} binary message round-trips byte-exact`, { timeout: 40_000 }, async () => {
  const address = uniqueAddress('anycast/big-');
  const consumer = await router.connect();
  const receiver = await consumer.openReceiver({ source: { address } });
  const got = collect(receiver);

  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'producer credit');

  const payload = randomBytes(size);
  sender.send({ message_id: 'big', body: rhea.message.data_section(payload) });

  await until(() => got.length >= 1, 30_000, `the ${label} message`);
  await until(() => outcomes.size >= 1, 5000, `outcome for the ${label} message`);
  const body = got[0].message.body;
  assert.equal(body && body.typecode, 0x75, 'body is a single data section');
  const bytes = body.content;
  assert.ok(Buffer.isBuffer(bytes), 'data section content is binary');
  assert.equal(bytes.length, payload.length, 'length');
  assert.ok(bytes.equals(payload), 'bytes identical');
  assert.equal(got[0].message.message_id, 'big');
  assert.equal([...outcomes.values()][0].outcome, 'accepted');
});
}
