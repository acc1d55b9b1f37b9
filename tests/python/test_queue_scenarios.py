"""Queue and topic scenarios on the standalone broker shard, with python-qpid-proton:

- a consumer's link credit is its prefetch (nothing beyond it, even after acknowledging);
- a shared topic subscription (the `shared` source capability, named by link name): its
  consumers on different connections compete for the messages;
- wildcard topic filters (`*` one level, `#` zero or more levels, `#` also in the middle);
- per-producer order with three interleaved producers and one consumer;
- a durable subscription that survives both its consumer's disconnect and a SIGKILL of the
  whole process, and whose acknowledgements survive another SIGKILL.

Receivers that test prefetch are created with credit 0 and flowed by hand: a proton
BlockingReceiver created with credit N tops its credit back up to N on every delivery.
"""

from proton import Data, Delivery, Message
from proton.reactor import DurableSubscription, ReceiverOption

from conftest import Router
from helpers import (SettleSecond, available, close_quietly, connect, drop, pump, receive_n, remote_active, run_for,
                     send_async, settle, take, wait_outcomes)

CONFIG = """\
addresses:
  - prefix: "q/"
    type: queue
  - prefix: "t/"
    type: topic
"""


class SharedSubscription(ReceiverOption):
    """Source capability `shared`: the subscription is named by the link name alone."""

    def apply(self, receiver):
        caps = receiver.source.capabilities
        caps.put_array(False, Data.SYMBOL)
        caps.enter()
        caps.put_symbol("shared")
        caps.exit()


def _send(conn, address, bodies, properties=None):
    """Send `bodies` unsettled and require `accepted` (stored) for each."""
    s = conn.create_sender(address)
    ds = [send_async(s, Message(body=b, properties=properties)) for b in bodies]
    states = wait_outcomes([conn], ds, what="outcomes from the broker for %s" % address)
    assert all(st == Delivery.ACCEPTED for st in states), states
    s.close()


def _attached(conns, rcvs, settle_time=0.3):
    """Pump until every receiver's attach was answered, then a little longer so the
    subscription and the credit are in place before anything is published."""
    pump(conns, lambda: all(remote_active(r.link) for r in rcvs), what="receivers attached")
    run_for(conns, settle_time)


def _drain(rcv, into, accept=True):
    while available(rcv):
        m, d = take(rcv)
        into.append(m.body)
        if accept:
            settle(d)


def _nothing_more(conns, rcvs, seconds=1.0):
    pump(conns, lambda: any(available(r) for r in rcvs), timeout=seconds, raise_on_timeout=False)
    return [r.link.name for r in rcvs if available(r)]


# -------------------------------------------------------------------- a) prefetch --

def test_prefetch_is_respected(configured_router):
    r = configured_router(CONFIG)
    prod = connect(r.amqp_url)
    c1 = connect(r.amqp_url)
    c2 = connect(r.amqp_url)
    try:
        _send(prod, "q/prefetch", ["p%02d" % i for i in range(20)])

        rcv1 = c1.create_receiver("q/prefetch", credit=0, name="first")
        rcv1.link.flow(5)
        first = receive_n([c1], rcv1, 5)
        assert [m.body for m, _ in first] == ["p%02d" % i for i in range(5)], "FIFO"
        # Exactly 5: the credit is used up and nothing more comes.
        assert not _nothing_more([c1], [rcv1]), "more than the 5 messages of credit arrived"
        assert rcv1.link.credit == 0, rcv1.link.credit

        # A second consumer with credit 5 gets the next 5, different ones.
        rcv2 = c2.create_receiver("q/prefetch", credit=0, name="second")
        rcv2.link.flow(5)
        second = receive_n([c1, c2], rcv2, 5)
        assert [m.body for m, _ in second] == ["p%02d" % i for i in range(5, 10)]
        assert not _nothing_more([c1, c2], [rcv1, rcv2]), "a consumer got more than its credit"

        # Acknowledging alone does not grant more: the prefetch is the credit, not a window
        # of unacknowledged messages.
        for _, d in first:
            settle(d)
        assert not _nothing_more([c1, c2], [rcv1, rcv2]), \
            "acknowledging without new credit brought more messages"

        # Flowing more credit does.
        rcv1.link.flow(5)
        more = receive_n([c1, c2], rcv1, 5)
        assert [m.body for m, _ in more] == ["p%02d" % i for i in range(10, 15)]
        assert not _nothing_more([c1, c2], [rcv1, rcv2]), "more than the new credit arrived"

        seen = [m.body for m, _ in first + second + more]
        assert len(set(seen)) == 15, seen
        for _, d in second + more:
            settle(d)
    finally:
        close_quietly(prod, c1, c2)


# ------------------------------------------------------- b) shared subscription --

def test_shared_subscription_consumers_compete(configured_router):
    r = configured_router(CONFIG)
    pub = connect(r.amqp_url)
    a = connect(r.amqp_url, container_id="shared-a")
    b = connect(r.amqp_url, container_id="shared-b")
    other = connect(r.amqp_url)
    try:
        # Same link name, different connections and container ids: one subscription.
        ra = a.create_receiver("t/shared/news", credit=10, name="workers",
                               options=SharedSubscription())
        rb = b.create_receiver("t/shared/news", credit=10, name="workers",
                               options=SharedSubscription())
        # A plain subscriber on the same topic still gets its own copy of everything.
        ro = other.create_receiver("t/shared/news", credit=30)
        conns = [pub, a, b, other]
        _attached(conns, [ra, rb, ro])

        n = 20
        _send(pub, "t/shared/news", ["n%02d" % i for i in range(n)])
        got_a, got_b, got_o = [], [], []

        def drained():
            _drain(ra, got_a)
            _drain(rb, got_b)
            _drain(ro, got_o)
            return len(got_a) + len(got_b) >= n and len(got_o) >= n

        pump(conns, drained, timeout=10,
             what="20 messages across the shared consumers (a=%s b=%s)" % (got_a, got_b))
        run_for(conns, 0.5)
        drained()
        want = ["n%02d" % i for i in range(n)]
        assert sorted(got_a + got_b) == want, \
            "each message exactly once across the shared subscription: a=%s b=%s" % (got_a, got_b)
        assert got_a and got_b, "both shared consumers should get some: a=%s b=%s" % (got_a, got_b)
        assert got_o == want, "the separate subscriber got %s" % got_o
    finally:
        close_quietly(pub, a, b, other)


# ---------------------------------------------------------------- c) wildcards --

def test_wildcard_subscriptions(configured_router):
    r = configured_router(CONFIG)
    pub = connect(r.amqp_url)
    filters = ["t/a/*/temp", "t/a/#", "t/#/temp"]
    subs = [connect(r.amqp_url) for _ in filters]
    try:
        rcvs = [c.create_receiver(f, credit=50) for c, f in zip(subs, filters)]
        conns = [pub] + subs
        _attached(conns, rcvs)
        topics = [
            "t/a/x/temp",    # all three
            "t/a/x/y/temp",  # t/a/# and t/#/temp (* is exactly one level)
            "t/a/temp",      # t/a/# and t/#/temp (# in the middle matches zero levels)
            "t/a",           # t/a/# only (# matches zero levels)
            "t/a/x/hum",     # t/a/# only
            "t/b/temp",      # t/#/temp only
            "t/temp",        # t/#/temp only
            "t/b/x",         # nobody
            "t/a/x/temp/x",  # t/a/# only
        ]
        for t in topics:
            _send(pub, t, ["to " + t])
        want = {
            "t/a/*/temp": ["to t/a/x/temp"],
            "t/a/#": ["to t/a/x/temp", "to t/a/x/y/temp", "to t/a/temp", "to t/a",
                      "to t/a/x/hum", "to t/a/x/temp/x"],
            "t/#/temp": ["to t/a/x/temp", "to t/a/x/y/temp", "to t/a/temp", "to t/b/temp",
                         "to t/temp"],
        }
        got = {f: [] for f in filters}

        def drained():
            for f, rc in zip(filters, rcvs):
                _drain(rc, got[f])
            return all(len(got[f]) >= len(want[f]) for f in filters)

        pump(conns, drained, timeout=10, what="wildcard deliveries (got %s)" % got)
        run_for(conns, 0.7)
        drained()
        for f in filters:
            assert sorted(got[f]) == sorted(want[f]), "%s got %s, want %s" % (f, got[f], want[f])
            # Published one after the other, each acknowledged before the next: in order.
            assert got[f] == want[f], "%s: order %s" % (f, got[f])
    finally:
        close_quietly(pub, *subs)


# ----------------------------------------------------- d) per-producer order --

def test_per_producer_order_with_interleaved_producers(configured_router):
    r = configured_router(CONFIG)
    producers = [connect(r.amqp_url) for _ in range(3)]
    cons = connect(r.amqp_url)
    conns = producers + [cons]
    n = 200
    try:
        rcv = cons.create_receiver("q/ordered", credit=50)
        _attached(conns, [rcv], settle_time=0.1)
        senders = [p.create_sender("q/ordered") for p in producers]
        pump(conns, lambda: all(s.link.credit >= n for s in senders), what="producer credit")
        got = []
        deliveries = []

        def consume():
            while available(rcv):
                m, d = take(rcv)
                got.append((m.properties["producer"], m.properties["seq"]))
                settle(d)
            return len(got) >= 3 * n

        # Interleave: 10 from each producer in turn, with I/O in between, while the consumer
        # is already taking messages.
        for base in range(0, n, 10):
            for p, s in enumerate(senders):
                for i in range(base, base + 10):
                    deliveries.append(send_async(
                        s, Message(body="%d:%d" % (p, i), properties={"producer": p, "seq": i})))
            run_for(conns, 0.005)
            consume()
        pump(conns, consume, timeout=20, what="600 messages (got %d)" % len(got))
        states = wait_outcomes(conns, deliveries, timeout=10)
        assert all(st == Delivery.ACCEPTED for st in states)
        run_for(conns, 0.5)
        consume()
        assert len(got) == 3 * n, "got %d messages, want %d" % (len(got), 3 * n)
        assert len(set(got)) == 3 * n, "duplicates among %d" % len(got)
        producers_seen = {p for p, _ in got}
        assert producers_seen == {0, 1, 2}
        for p in range(3):
            seqs = [i for q, i in got if q == p]
            assert seqs == list(range(n)), \
                "producer %d out of order: first disorder at %s" % (
                    p, next((k for k in range(1, len(seqs)) if seqs[k] <= seqs[k - 1]), None))
        # The producers really were interleaved at the consumer.
        switches = sum(1 for k in range(1, len(got)) if got[k][0] != got[k - 1][0])
        print("per-producer order: %d producer switches at the consumer" % switches)
        assert switches >= 3, "producers not interleaved (%d switches)" % switches
    finally:
        close_quietly(*conns)


# ------------------------------- e) durable subscription across client + broker restart --

def _durable_receiver(conn):
    return conn.create_receiver("t/alerts/#", credit=50, name="alerts-sub",
                                options=[DurableSubscription(), SettleSecond()])


def test_durable_subscription_survives_client_and_broker_restart(tmp_path):
    n = 10
    want = ["alert-%02d" % i for i in range(n)]

    # 1. Subscribe durably, then go away.
    r1 = Router(config=CONFIG, tmpdir=tmp_path, name="dsub")
    try:
        sub = connect(r1.amqp_url, container_id="dsub-client")
        rcv = _durable_receiver(sub)
        _attached([sub], [rcv])
        close_quietly(sub)
        # 2. Published while the subscriber is away: stored for its subscription.
        pub = connect(r1.amqp_url)
        _send(pub, "t/alerts/fire", want[: n // 2])
        _send(pub, "t/alerts/flood/north", want[n // 2:])
        close_quietly(pub)
    finally:
        r1.kill()  # SIGKILL

    # 3. Restarted over the same data directory: the subscription and its messages are there.
    r2 = Router(config=CONFIG, tmpdir=tmp_path, name="dsub")
    sub = None
    try:
        sub = connect(r2.amqp_url, container_id="dsub-client")
        rcv = _durable_receiver(sub)
        got = receive_n([sub], rcv, n, what="%d stored messages for the durable subscription" % n)
        assert [m.body for m, _ in got] == want
        extra = _nothing_more([sub], [rcv])
        assert not extra, "more than %d messages: %s" % (
            n, [take(rcv)[0].body for _ in range(available(rcv))])
        # Acknowledge, settling second: the router settles once the acknowledgement is durable.
        for _, d in got:
            d.update(Delivery.ACCEPTED)
        pump([sub], lambda: all(d.settled for _, d in got), timeout=10,
             what="the router to confirm the acknowledgements")
        for _, d in got:
            d.settle()
        run_for([sub], 0.1)
    finally:
        r2.kill()  # SIGKILL again, right after the acknowledgements were confirmed
        drop(sub)

    # 4. After another restart nothing comes again, but the subscription still exists.
    r3 = Router(config=CONFIG, tmpdir=tmp_path, name="dsub")
    sub = pub = None
    try:
        sub = connect(r3.amqp_url, container_id="dsub-client")
        rcv = _durable_receiver(sub)
        _attached([sub], [rcv])
        pump([sub], lambda: available(rcv) > 0, timeout=1.5, raise_on_timeout=False)
        assert not available(rcv), "acknowledged messages came again after restart: %s" % [
            take(rcv)[0].body for _ in range(available(rcv))]
        pub = connect(r3.amqp_url)
        _send(pub, "t/alerts/after", ["after-restart"])
        (m, d), = receive_n([sub, pub], rcv, 1, what="a new message on the durable subscription")
        assert m.body == "after-restart"
        d.update(Delivery.ACCEPTED)
        pump([sub], lambda: d.settled, timeout=10, what="ack confirmed")
        d.settle()
        close_quietly(sub, pub)
        sub = pub = None
    finally:
        close_quietly(sub, pub)
        r3.close()
