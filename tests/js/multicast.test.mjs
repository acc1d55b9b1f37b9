// Multicast: an address configured with `prefix: "mc/"`, `type: multicast` fans out to every consumer.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startRouter, until, collect, trackOutcomes, uniqueAddress, sleep } from './lib/harness.mjs';

const CONFIG = `router:
  id: js-multicast
addresses:
  - prefix: "mc/"
    type: multicast
`;

let router;
before(async () => { router = await startRouter({ config: CONFIG }); });
afterEach(async () => { if (router) await router.closeClients(); });
after(async () => { if (router) await router.shutdown(); });

test('multicast: each of 3 consumers receives every message', { timeout: 15_000 }, async () => {
  const address = uniqueAddress('mc/news-');
  const consumers = [];
  for (let k = 0; k < 3; k++) {
    const c = await router.connect();
    const receiver = await c.openReceiver({ source: { address } });
    consumers.push(collect(receiver));
  }

  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'producer credit on multicast address');

  const N = 20;
  for (let i = 0; i < N; i++) sender.send({ body: `news-${i}`, application_properties: { seq: i } });

  await until(() => consumers.every((g) => g.length >= N), 10_000,
    () => `each consumer has ${N}; got ${consumers.map((g) => g.length).join(', ')}`);
  await until(() => outcomes.size >= N, 5000, () => `${outcomes.size}/${N} outcomes at producer`);
  await sleep(150); // duplicates would show up now

  const expected = Array.from({ length: N }, (_, i) => `news-${i}`);
  consumers.forEach((g, k) => {
    assert.deepEqual(g.map((x) => x.message.body), expected, `consumer ${k} got every message once, in order`);
  });
  assert.deepEqual([...new Set([...outcomes.values()].map((o) => o.outcome))], ['accepted'],
    'router settles the producer\'s unsettled deliveries with accepted');
  consumers.forEach((g, k) => {
    assert.ok(g.every((x) => x.delivery.remote_settled === true), `consumer ${k} copies are presettled`);
  });
});
