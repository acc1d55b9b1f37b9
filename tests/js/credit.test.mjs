// Anycast flow control: a producer gets credit only while the address has a consumer.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startRouter, until, collect, trackOutcomes, uniqueAddress, sleep, withTimeout } from './lib/harness.mjs';

let router;
before(async () => { router = await startRouter(); });
afterEach(async () => { if (router) await router.closeClients(); });
after(async () => { if (router) await router.shutdown(); });

test('credit: no consumer -> no credit; a consumer attaching unblocks the producer', { timeout: 15_000 }, async () => {
  const address = uniqueAddress('credit/wait-');
  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  const sendable = new Promise((resolve) => sender.once('sendable', resolve));

  // Not sendable for 500 ms.
  const deadline = Date.now() + 500;
  while (Date.now() < deadline) {
    assert.equal(sender.sendable(), false, `producer got credit (${sender.credit}) with no consumer attached`);
    await sleep(20);
  }
  assert.equal(sender.credit, 0);

  const consumer = await router.connect();
  const receiver = await consumer.openReceiver({ source: { address } });
  const got = collect(receiver);

  await withTimeout(sendable, 5000, "'sendable' after a consumer attached");
  assert.equal(sender.sendable(), true);
  const d = sender.send({ body: 'finally' });
  await until(() => got.length >= 1, 5000, 'the message at the consumer');
  await until(() => outcomes.has(d), 5000, 'outcome at the producer');
  assert.equal(got[0].message.body, 'finally');
  assert.equal(outcomes.get(d).outcome, 'accepted');
});
