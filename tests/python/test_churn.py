"""Consumers come and go while a producer keeps sending: every delivery gets exactly one
outcome, and what the producer sees as accepted is exactly what the consumers accepted."""

import collections

from proton import Delivery, Message

from helpers import (TERMINAL, available, close_quietly, connect, pump, run_for, send_async, state_name,
                     take)


def test_consumer_churn_keeps_outcomes_exact(router):
    address = "churn/q"
    prod = connect(router.amqp_url)
    consumers = []
    accepted_by_consumers = collections.Counter()
    sent = []
    try:
        def add_consumer():
            c = connect(router.amqp_url)
            consumers.append((c, c.create_receiver(address, credit=5)))

        def drain(leaving=None):
            for c, r in consumers:
                while available(r):
                    m, d = take(r)
                    if c is leaving and not available(r):
                        continue  # stays unsettled; this consumer is about to go away
                    d.update(Delivery.ACCEPTED)
                    d.settle()
                    accepted_by_consumers[m.body] += 1

        def conns():
            return [prod] + [c for c, _ in consumers]

        add_consumer()
        add_consumer()
        snd = prod.create_sender(address)
        pump(conns(), lambda: snd.credit > 0, what="producer credit")
        n = 0
        for step in range(30):
            for _ in range(min(snd.credit, 8)):
                sent.append(send_async(snd, Message(body=n)))
                n += 1
            run_for(conns(), 0.05)
            if step % 5 == 4:
                # the oldest consumer leaves (maybe holding an unsettled delivery); a new one comes
                drain(leaving=consumers[0][0])
                old, _ = consumers.pop(0)
                old.close()
                add_consumer()
            else:
                drain()
        assert n >= 50, "producer only managed to send %d messages" % n

        def settled_all():
            drain()
            return all(d.remote_state in TERMINAL for d in sent)

        pump(conns(), settled_all, timeout=20,
             what="outcomes for all %d deliveries (%d still open)" % (
                 n, sum(1 for d in sent if d.remote_state not in TERMINAL)))
        run_for(conns(), 0.3)
        drain()

        producer_accepted = collections.Counter(i for i, d in enumerate(sent) if d.remote_state == Delivery.ACCEPTED)
        dup = {b: k for b, k in accepted_by_consumers.items() if k > 1}
        assert not dup, "messages accepted more than once by consumers: %s" % dup
        assert producer_accepted == accepted_by_consumers, (
            "producer/consumer disagree: accepted at producer only %s; at consumers only %s" % (
                sorted(set(producer_accepted) - set(accepted_by_consumers))[:10],
                sorted(set(accepted_by_consumers) - set(producer_accepted))[:10]))
        others = [state_name(d.remote_state) for d in sent if d.remote_state != Delivery.ACCEPTED]
        assert set(others) <= {"RELEASED", "MODIFIED"}, others
    finally:
        close_quietly(prod, *[c for c, _ in consumers])
