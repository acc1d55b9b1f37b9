// Request/response through a dynamic reply address and the anonymous relay.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startRouter, until, collect, trackOutcomes, uniqueAddress, sleep } from './lib/harness.mjs';

let router;
before(async () => { router = await startRouter(); });
afterEach(async () => { if (router) await router.closeClients(); });
after(async () => { if (router) await router.shutdown(); });

test('rpc: request with reply_to = dynamic address, reply via anonymous sender', { timeout: 15_000 }, async () => {
  const serviceAddress = uniqueAddress('rpc/upper-');

  // Service: consumes requests, answers through an anonymous-relay sender (null target).
  const service = await router.connect();
  assert.ok(service.offeredCapabilities().includes('ANONYMOUS-RELAY'),
    `offered capabilities: ${JSON.stringify(service.offeredCapabilities())}`);
  const requests = await service.openReceiver({ source: { address: serviceAddress } });
  const replier = await service.openSender({ target: {} });
  const replyOutcomes = trackOutcomes(replier);
  const served = [];
  requests.on('message', (ctx) => {
    const m = ctx.message;
    served.push(m.body);
    replier.send({ to: m.reply_to, correlation_id: m.correlation_id, body: String(m.body).toUpperCase() });
  });
  await until(() => replier.sendable(), 5000, 'credit on the anonymous sender');

  // Client: dynamic receiver for replies, sender for requests.
  const client = await router.connect();
  const replies = await client.openReceiver({ source: { dynamic: true } });
  const replyAddress = replies.source && replies.source.address;
  assert.ok(typeof replyAddress === 'string' && replyAddress.length > 0,
    `router assigned a dynamic address, attach source was ${JSON.stringify(replies.source)}`);
  assert.match(replyAddress, /^_dynamic\//, 'dynamic address has the documented _dynamic/ prefix');
  const got = collect(replies);

  const requester = await client.openSender({ target: { address: serviceAddress } });
  const requestOutcomes = trackOutcomes(requester);
  await until(() => requester.sendable(), 5000, 'credit for requests');

  const N = 5;
  for (let i = 0; i < N; i++) {
    requester.send({ reply_to: replyAddress, correlation_id: `req-${i}`, body: `hello ${i}` });
  }
  await until(() => got.length >= N, 10_000,
    () => `${got.length}/${N} replies (service saw ${served.length} requests)`);
  await until(() => replyOutcomes.size >= N && requestOutcomes.size >= N, 5000,
    () => `outcomes: ${requestOutcomes.size} requests, ${replyOutcomes.size} replies`);
  await sleep(100);

  assert.equal(got.length, N);
  const byId = new Map(got.map(({ message }) => [message.correlation_id, message.body]));
  for (let i = 0; i < N; i++) assert.equal(byId.get(`req-${i}`), `HELLO ${i}`, `reply for req-${i}`);
  assert.deepEqual([...new Set([...requestOutcomes.values()].map((o) => o.outcome))], ['accepted']);
  assert.deepEqual([...new Set([...replyOutcomes.values()].map((o) => o.outcome))], ['accepted']);
});

test('rpc: two dynamic receivers get distinct addresses', { timeout: 10_000 }, async () => {
  const c = await router.connect();
  const a = await c.openReceiver({ source: { dynamic: true } });
  const b = await c.openReceiver({ source: { dynamic: true } });
  assert.ok(a.source.address && b.source.address);
  assert.notEqual(a.source.address, b.source.address);
});

test('anonymous relay: message to an address nobody consumes is released', { timeout: 10_000 }, async () => {
  const c = await router.connect();
  const sender = await c.openSender({ target: {} });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'credit on the anonymous sender');
  sender.send({ to: uniqueAddress('nobody/'), body: 'lost' });
  await until(() => outcomes.size >= 1, 5000, 'an outcome');
  assert.equal([...outcomes.values()][0].outcome, 'released');
});
