"""Queue and topic addresses served by the standalone broker shard, through the router, with
python-qpid-proton: accepted only after the message is durable, competing consumers, a
consumer gone with unacknowledged messages, kill -9 of the whole process, topic fan-out and a
durable subscription that outlives its consumer."""

import time

from proton import Delivery, Message

from conftest import Router
from helpers import (available, close_quietly, connect, http_json, pump, receive_n, send_async, settle,
                     take, wait_outcomes)

QUEUES = """\
addresses:
  - prefix: "q/"
    type: queue
  - prefix: "t/"
    type: topic
"""


def _send(conn, address, bodies):
    s = conn.create_sender(address)
    ds = [send_async(s, Message(body=b)) for b in bodies]
    states = wait_outcomes([conn], ds, what="outcomes from the broker")
    assert all(st == ds[0].ACCEPTED for st in states), states
    s.close()


def test_work_queue_competing_consumers_each_message_once(configured_router):
    r = configured_router(QUEUES)
    prod = connect(r.amqp_url)
    workers = [connect(r.amqp_url) for _ in range(3)]
    try:
        # Messages are stored before any consumer exists: the producer gets credit anyway.
        _send(prod, "q/jobs", ["job-%d" % i for i in range(30)])
        recvs = [w.create_receiver("q/jobs", credit=4) for w in workers]
        got = []
        deadline = time.monotonic() + 15
        while len(got) < 30 and time.monotonic() < deadline:
            pump(workers, lambda: any(available(x) for x in recvs), timeout=15, what="a job")
            for x in recvs:
                while available(x):
                    m, d = take(x)
                    got.append(m.body)
                    settle(d)
                    x.link.flow(1)  # prefetch of 4: one more for each one taken
        assert sorted(got) == sorted("job-%d" % i for i in range(30)), got
        # Nothing more: every message was acknowledged once.
        pump(workers, lambda: any(available(x) for x in recvs), timeout=1, raise_on_timeout=False)
        assert not any(available(x) for x in recvs)
    finally:
        close_quietly(prod, *workers)


def test_unacked_messages_of_a_departed_consumer_go_to_another(configured_router):
    r = configured_router(QUEUES)
    prod = connect(r.amqp_url)
    first = connect(r.amqp_url)
    second = None
    try:
        _send(prod, "q/handover", ["a", "b", "c"])
        rcv = first.create_receiver("q/handover", credit=3)
        held = receive_n([first], rcv, 3)
        assert [m.body for m, _ in held] == ["a", "b", "c"], "FIFO"
        settle(held[0][1])  # "a" acknowledged, "b" and "c" not
        pump([first], timeout=0.5, raise_on_timeout=False)
        close_quietly(first)
        first = None
        second = connect(r.amqp_url)
        rcv2 = second.create_receiver("q/handover", credit=10)
        again = receive_n([second], rcv2, 2)
        assert [m.body for m, _ in again] == ["b", "c"]
        for _, d in again:
            settle(d)
        pump([second], lambda: available(rcv2) > 0, timeout=1, raise_on_timeout=False)
        assert not available(rcv2), "an acknowledged message came back"
    finally:
        close_quietly(prod, first, second)


def test_accepted_messages_survive_kill_9(tmp_path):
    r = Router(config=QUEUES, tmpdir=tmp_path, name="durable")
    try:
        c = connect(r.amqp_url)
        _send(c, "q/keep", ["m%d" % i for i in range(20)])
        close_quietly(c)
    finally:
        r.kill()
    r2 = Router(config=QUEUES, tmpdir=tmp_path, name="durable")  # same data directory
    try:
        c = connect(r2.amqp_url)
        rcv = c.create_receiver("q/keep", credit=50)
        got = receive_n([c], rcv, 20)
        assert [m.body for m, _ in got] == ["m%d" % i for i in range(20)]
        for _, d in got:
            settle(d)
        pump([c], timeout=0.5, raise_on_timeout=False)
        close_quietly(c)
    finally:
        r2.kill()
    r3 = Router(config=QUEUES, tmpdir=tmp_path, name="durable")
    try:
        c = connect(r3.amqp_url)
        rcv = c.create_receiver("q/keep", credit=50)
        pump([c], lambda: available(rcv) > 0, timeout=1.5, raise_on_timeout=False)
        assert not available(rcv), "acknowledged messages were delivered again after restart"
        close_quietly(c)
    finally:
        r3.close()


def test_topic_fan_out_and_durable_subscription(configured_router):
    r = configured_router(QUEUES)
    pub = connect(r.amqp_url)
    a = connect(r.amqp_url)
    b = connect(r.amqp_url, container_id="durable-client")
    try:
        ra = a.create_receiver("t/sensors/#", credit=10)
        # A durable subscription: durable terminus, expiry-policy never (the JMS way).
        from proton.reactor import DurableSubscription
        rb = b.create_receiver("t/sensors/#", credit=10, name="sub1", options=DurableSubscription())
        pump([a, b], timeout=0.3, raise_on_timeout=False)
        _send(pub, "t/sensors/1/temp", ["21C"])
        assert [m.body for m, _ in receive_n([a], ra, 1)] == ["21C"]
        got_b = receive_n([b], rb, 1)
        assert [m.body for m, _ in got_b] == ["21C"]
        for x in [got_b[0][1]]:
            settle(x)
        pump([b], timeout=0.3, raise_on_timeout=False)
        close_quietly(b)
        b = None
        # Published while the durable subscriber is away: kept for it.
        _send(pub, "t/sensors/2/temp", ["22C"])
        b = connect(r.amqp_url, container_id="durable-client")
        rb = b.create_receiver("t/sensors/#", credit=10, name="sub1", options=DurableSubscription())
        assert [m.body for m, _ in receive_n([b], rb, 1)] == ["22C"]
    finally:
        close_quietly(pub, a, b)


POLICY = """\
addresses:
  - prefix: "orders/"
    type: queue
    dead_letter: "orders-dlq"
    max_delivery_attempts: 3
  - name: "orders-dlq"
    type: queue
  - prefix: "cmd/"
    type: queue
"""


def test_reject_dead_letters_and_modified_counts_attempts(configured_router):
    from proton import Delivery
    r = configured_router(POLICY)
    c = connect(r.amqp_url)
    try:
        _send(c, "orders/eu", ["bad", "flaky"])
        rcv = c.create_receiver("orders/eu", credit=1)
        (m, d), = receive_n([c], rcv, 1)
        assert m.body == "bad" and m.delivery_count == 0
        settle(d, Delivery.REJECTED)
        rcv.link.flow(1)
        # "flaky" fails twice (modified, delivery-failed): the count shows on redelivery.
        for attempt in range(2):
            (m, d), = receive_n([c], rcv, 1)
            assert m.body == "flaky" and m.delivery_count == attempt, (m.body, m.delivery_count)
            d.local.failed = True
            settle(d, Delivery.MODIFIED)
            rcv.link.flow(1)
        (m, d), = receive_n([c], rcv, 1)
        assert m.body == "flaky" and m.delivery_count == 2
        d.local.failed = True
        settle(d, Delivery.MODIFIED)  # third failure: out of attempts -> dead letter
        dlq = c.create_receiver("orders-dlq", credit=10)
        got = receive_n([c], dlq, 2)
        assert sorted(m.body for m, _ in got) == ["bad", "flaky"]
        for _, d in got:
            settle(d)
    finally:
        close_quietly(c)


def test_command_for_an_offline_consumer_expires_by_ttl(configured_router):
    r = configured_router(POLICY)
    c = connect(r.amqp_url)
    try:
        s = c.create_sender("cmd/device-7")
        ds = [send_async(s, Message(body="stale", ttl=0.3)), send_async(s, Message(body="fresh"))]
        wait_outcomes([c], ds)
        time.sleep(1.2)  # the device is offline past the first command's TTL
        rcv = c.create_receiver("cmd/device-7", credit=10)
        got = receive_n([c], rcv, 1)
        assert [m.body for m, _ in got] == ["fresh"]
        pump([c], lambda: available(rcv) > 0, timeout=0.5, raise_on_timeout=False)
        assert not available(rcv), "the expired command was delivered"
    finally:
        close_quietly(c)


def test_queue_depth_metrics_and_purge(configured_router):
    import subprocess
    from conftest import enmesh_bin
    from helpers import http
    r = configured_router(QUEUES)
    c = connect(r.amqp_url)
    try:
        _send(c, "q/depth", ["x%d" % i for i in range(5)])

        def depth():
            status, qs = http_json("GET", r.http_url + "/api/v1/queues")
            assert status == 200
            return {q["address"]: q for q in qs}.get("q/depth", {}).get("depth")

        deadline = time.monotonic() + 5
        while depth() != 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert depth() == 5
        status, text = http("GET", r.http_url + "/metrics")
        assert 'enmesh_queue_depth{queue="q/depth"} 5' in text, text[-1500:]
        out = subprocess.run([enmesh_bin(), "queue", "purge", "q/depth", "--http", r.http_url],
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 5
        while depth() != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert depth() == 0
    finally:
        close_quietly(c)


SUBSCRIPTIONS = """\
addresses:
  - prefix: "t/"
    type: topic
  - name: "audit"
    type: subscription
    topic: "t/orders/#"
"""


def test_subscription_address_collects_before_consumers_and_survives_restart(tmp_path):
    from proton.utils import LinkDetached
    r = Router(config=SUBSCRIPTIONS, tmpdir=tmp_path, name="subs")
    try:
        pub = connect(r.amqp_url)
        # Declared in configuration: it collects from its topic before anyone reads it.
        _send(pub, "t/orders/1", ["o1"])
        _send(pub, "t/other", ["not for audit"])
        _send(pub, "t/orders/eu/2", ["o2"])
        c = connect(r.amqp_url)
        rcv = c.create_receiver("audit", credit=10)
        got = receive_n([c], rcv, 2)
        assert [m.body for m, _ in got] == ["o1", "o2"]
        for _, d in got:
            settle(d)
        pump([c], lambda: available(rcv) > 0, timeout=0.5, raise_on_timeout=False)
        assert not available(rcv)
        # Read-only: a producer cannot write into it directly.
        try:
            c.create_sender("audit")
            raise AssertionError("a sender to a subscription address was attached")
        except LinkDetached as e:
            assert "not-allowed" in str(e), e
        close_quietly(c)
        _send(pub, "t/orders/3", ["o3"])
        close_quietly(pub)
    finally:
        r.kill()
    r2 = Router(config=SUBSCRIPTIONS, tmpdir=tmp_path, name="subs")
    try:
        a = connect(r2.amqp_url)
        b = connect(r2.amqp_url)
        pub = connect(r2.amqp_url)
        ra = a.create_receiver("audit", credit=10)
        rb = b.create_receiver("audit", credit=10)
        pump([a, b], timeout=0.3, raise_on_timeout=False)
        _send(pub, "t/orders/4", ["o4"])
        _send(pub, "t/orders/5", ["o5"])
        _send(pub, "t/orders/6", ["o6"])
        # Its consumers compete: o3 (kept across the kill) and the new ones, each once.
        seen = []
        deadline = time.monotonic() + 10
        while len(seen) < 4 and time.monotonic() < deadline:
            pump([a, b], lambda: available(ra) or available(rb), timeout=10, what="audit messages")
            for x in (ra, rb):
                while available(x):
                    m, d = take(x)
                    seen.append(m.body)
                    settle(d)
        assert sorted(seen) == ["o3", "o4", "o5", "o6"], seen
        close_quietly(a, b, pub)
    finally:
        r2.close()


EXPIRY = """\
addresses:
  - prefix: "cmd/"
    type: queue
    expiry_address: "expired"
  - name: "expired"
    type: queue
"""


def test_expired_messages_move_to_the_expiry_address(configured_router):
    r = configured_router(EXPIRY)
    c = connect(r.amqp_url)
    try:
        s = c.create_sender("cmd/device-9")
        ds = [send_async(s, Message(body="reboot", ttl=0.2)), send_async(s, Message(body="keep"))]
        wait_outcomes([c], ds)
        time.sleep(1.2)
        rcv = c.create_receiver("cmd/device-9", credit=10)
        assert [m.body for m, _ in receive_n([c], rcv, 1)] == ["keep"]
        exp = c.create_receiver("expired", credit=10)
        assert [m.body for m, _ in receive_n([c], exp, 1)] == ["reboot"]
        status, qs = http_json("GET", r.http_url + "/api/v1/queues")
        stats = {q["address"]: q for q in qs}
        assert stats["cmd/device-9"]["expired"] == 1, stats
    finally:
        close_quietly(c)


IN_MEMORY = """\
addresses:
  - prefix: "mem/"
    type: queue
    durable: false
  - prefix: "q/"
    type: queue
"""


def test_in_memory_queue_serves_like_a_queue_and_forgets_on_restart(tmp_path):
    r = Router(config=IN_MEMORY, tmpdir=tmp_path, name="mem")
    try:
        c = connect(r.amqp_url)
        _send(c, "mem/jobs", ["m%d" % i for i in range(5)])
        _send(c, "q/jobs", ["d0"])
        rcv = c.create_receiver("mem/jobs", credit=2)
        got = receive_n([c], rcv, 2)
        assert [m.body for m, _ in got] == ["m0", "m1"]
        settle(got[0][1])
        settle(got[1][1], Delivery.RELEASED)
        # The released one comes back (proton refills credit, so m2 and m3 may come first).
        got = receive_n([c], rcv, 4)
        assert sorted(m.body for m, _ in got) == ["m1", "m2", "m3", "m4"]
        for _, d in got:
            settle(d)
        _send(c, "mem/jobs", ["x1", "x2"])
        rcv.close()
        pump([c], timeout=0.3, raise_on_timeout=False)
        status, qs = http_json("GET", r.http_url + "/api/v1/queues")
        depth = {q["address"]: q["depth"] for q in qs}
        assert depth.get("mem/jobs") == 2, qs
        close_quietly(c)
    finally:
        r.kill()
    r2 = Router(config=IN_MEMORY, tmpdir=tmp_path, name="mem")
    try:
        c = connect(r2.amqp_url)
        mem = c.create_receiver("mem/jobs", credit=10)
        dur = c.create_receiver("q/jobs", credit=10)
        # The durable queue kept its message; the in-memory one started empty.
        assert [m.body for m, _ in receive_n([c], dur, 1)] == ["d0"]
        pump([c], lambda: available(mem) > 0, timeout=0.5, raise_on_timeout=False)
        assert not available(mem), "an in-memory queue kept messages across a restart"
        close_quietly(c)
    finally:
        r2.close()


def test_closing_a_durable_subscription_link_unsubscribes(configured_router):
    from proton.reactor import DurableSubscription
    r = configured_router(QUEUES)
    pub = connect(r.amqp_url)
    sub = connect(r.amqp_url, container_id="jms-like")
    try:
        rcv = sub.create_receiver("t/news/#", credit=10, name="daily", options=DurableSubscription())
        pump([sub], timeout=0.3, raise_on_timeout=False)
        _send(pub, "t/news/1", ["n1"])
        got = receive_n([sub], rcv, 1)
        settle(got[0][1])
        # A closing detach (JMS unsubscribe) ends the subscription.
        rcv.close()
        _send(pub, "t/news/2", ["n2"])
        status, qs = http_json("GET", r.http_url + "/api/v1/queues")
        assert not [q for q in qs if "jms-like:daily" in q["address"]], qs
        rcv = sub.create_receiver("t/news/#", credit=10, name="daily", options=DurableSubscription())
        pump([sub], lambda: available(rcv) > 0, timeout=0.8, raise_on_timeout=False)
        assert not available(rcv), "a message published after unsubscribing was kept"
    finally:
        close_quietly(pub, sub)
