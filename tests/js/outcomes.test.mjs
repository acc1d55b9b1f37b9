// Delivery outcomes travel from the consumer back to the producer; a consumer that goes away
// with unsettled deliveries must not leave the producer hanging.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startRouter, until, collect, trackOutcomes, uniqueAddress, sleep } from './lib/harness.mjs';

let router;
before(async () => { router = await startRouter(); });
afterEach(async () => { if (router) await router.closeClients(); });
after(async () => { if (router) await router.shutdown(); });

test('outcomes: accepted, rejected (with error), released and modified reach the producer', { timeout: 15_000 }, async () => {
  const address = uniqueAddress('outcomes/mixed-');
  const consumer = await router.connect();
  const receiver = await consumer.openReceiver({ source: { address }, autoaccept: false });
  const seen = [];
  receiver.on('message', (ctx) => {
    const action = ctx.message.application_properties.action;
    seen.push(action);
    switch (action) {
      case 'accept': ctx.delivery.accept(); break;
      case 'reject':
        ctx.delivery.reject({ condition: 'amqp:precondition-failed', description: 'order total must be positive' });
        break;
      case 'release': ctx.delivery.release(); break;
      case 'modify': ctx.delivery.modified({ delivery_failed: true, undeliverable_here: true }); break;
      default: throw new Error(`unexpected action ${action}`);
    }
  });

  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'producer credit');

  // One at a time: rhea 3.0.5 coalesces dispositions for consecutive delivery ids issued in the
  // same tick into one range and can give the second delivery the first one's state, so each
  // disposition must go out on its own.
  const actions = ['accept', 'reject', 'release', 'modify'];
  const deliveries = {};
  for (const action of actions) {
    const d = sender.send({ body: action, application_properties: { action } });
    deliveries[action] = d;
    await until(() => outcomes.has(d), 5000,
      () => `outcome for '${action}'; so far ${JSON.stringify(actions.map((a) => [a, outcomes.get(deliveries[a])?.outcome]))}; consumer saw ${JSON.stringify(seen)}`);
  }

  assert.equal(outcomes.get(deliveries.accept).outcome, 'accepted');

  const rej = outcomes.get(deliveries.reject);
  assert.equal(rej.outcome, 'rejected');
  assert.ok(rej.state && rej.state.error, `rejected outcome carries an error: ${JSON.stringify(rej.state)}`);
  assert.equal(String(rej.state.error.condition), 'amqp:precondition-failed');
  assert.equal(rej.state.error.description, 'order total must be positive');

  assert.equal(outcomes.get(deliveries.release).outcome, 'released');

  const mod = outcomes.get(deliveries.modify);
  assert.equal(mod.outcome, 'modified');
  assert.equal(mod.state.delivery_failed, true, `modified state: ${JSON.stringify(mod.state)}`);
  assert.equal(mod.state.undeliverable_here, true, `modified state: ${JSON.stringify(mod.state)}`);

  // Every delivery ends settled at the producer.
  for (const a of actions) assert.equal(deliveries[a].remote_settled, true, `${a} settled by router`);
});

async function consumerGoesAway(how) {
  const address = uniqueAddress(`outcomes/dies-${how}-`);
  const consumer = await router.connect();
  const receiver = await consumer.openReceiver({ source: { address }, autoaccept: false, credit_window: 0 });
  const got = collect(receiver);
  const N = 5;
  receiver.add_credit(N);

  const producer = await router.connect();
  const sender = await producer.openSender({ target: { address } });
  const outcomes = trackOutcomes(sender);
  await until(() => sender.sendable(), 5000, 'producer credit');

  const sent = [];
  for (let i = 0; i < N; i++) sent.push(sender.send({ body: `unsettled-${i}` }));
  await until(() => got.length >= N, 5000, () => `${got.length}/${N} reached the consumer`);
  await sleep(50);
  assert.equal(outcomes.size, 0, 'nothing settled while the consumer holds the deliveries');

  if (how === 'close') await consumer.close();
  else consumer.destroy();

  await until(() => sent.every((d) => outcomes.has(d)), 5000,
    () => `${sent.filter((d) => outcomes.has(d)).length}/${N} deliveries settled at the producer after the consumer went away`);
  for (const d of sent) {
    const o = outcomes.get(d);
    assert.ok(o.outcome === 'released' || o.outcome === 'modified',
      `expected released or modified, got ${o.outcome} ${JSON.stringify(o.state)}`);
    if (o.outcome === 'modified') {
      assert.equal(o.state.delivery_failed, true, `modified for a delivery the consumer saw has delivery-failed: ${JSON.stringify(o.state)}`);
    }
  }
}

test('outcomes: consumer closes its connection with unsettled deliveries -> producer sees released/modified', { timeout: 15_000 }, async () => {
  await consumerGoesAway('close');
});

test('outcomes: consumer socket dies with unsettled deliveries -> producer sees released/modified', { timeout: 15_000 }, async () => {
  await consumerGoesAway('drop');
});
