"""Anycast routing: round trip, competing consumers, credit gating, large messages."""

import hashlib
import os
import time

import pytest
from proton import Delivery, Message, symbol
from proton.utils import LinkDetached

from helpers import (available, close_quietly, connect, pump, receive_n, run_for, send_async,
                     settle, state_name, take, wait_outcomes)


def test_anycast_round_trip_preserves_body_and_properties(router):
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/roundtrip", credit=20)
        snd = prod.create_sender("anycast/roundtrip")
        sent = []
        for i in range(10):
            m = Message(
                id="msg-%d" % i,
                subject="subject-%d" % i,
                content_type="text/plain" if i % 2 else "application/octet-stream",
                correlation_id="corr-%d" % i,
                durable=bool(i % 2),
                priority=i % 10,
                properties={"index": i, "kind": "roundtrip", "flag": i % 3 == 0, "ratio": i / 4.0},
                annotations={symbol("x-opt-test"): "ann-%d" % i},
                user_id=b"user-%d" % i,
                reply_to="reply/%d" % i,
                group_id="group-%d" % (i % 3),
                group_sequence=i,
                content_encoding="utf-8",
                creation_time=1700000000.0 + i,
                expiry_time=1800000000.0 + i,
                ttl=3600.0,
                first_acquirer=bool(i % 2),
                body=("hello %d" % i) if i % 2 else {"i": i, "list": [1, 2, i], "nested": {"s": "x" * i}},
            )
            sent.append(m)
        deliveries = [send_async(snd, m) for m in sent]
        got = receive_n([prod, cons], rcv, len(sent))
        for m, d in got:
            settle(d, Delivery.ACCEPTED)
        states = wait_outcomes([prod, cons], deliveries)
        assert all(s == Delivery.ACCEPTED for s in states), [state_name(s) for s in states]
        # anycast with a single consumer keeps order
        for want, (m, _) in zip(sent, got):
            assert m.id == want.id
            assert m.body == want.body
            assert m.subject == want.subject
            assert m.content_type == want.content_type
            assert m.correlation_id == want.correlation_id
            assert m.durable == want.durable
            assert m.priority == want.priority
            assert m.properties == want.properties
            assert m.user_id == want.user_id
            assert m.reply_to == want.reply_to
            assert m.group_id == want.group_id and m.group_sequence == want.group_sequence
            assert m.content_encoding == want.content_encoding
            assert m.creation_time == want.creation_time and m.expiry_time == want.expiry_time
            assert m.first_acquirer == want.first_acquirer
            assert m.ttl == pytest.approx(want.ttl, abs=1.0)
            assert m.annotations.get(symbol("x-opt-test")) == want.annotations[symbol("x-opt-test")]
    finally:
        close_quietly(prod, cons)


def test_anycast_blocking_send_completes_with_accepted(router):
    """The plain BlockingSender.send() path: returns once the consumer accepted."""
    cons = connect(router.amqp_url)
    prod = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/blocking", credit=5)
        snd = prod.create_sender("anycast/blocking")
        # let the consumer's credit reach the router
        run_for([cons, prod], 0.3)
        d = send_async(snd, Message(body="one"))
        [(m, md)] = receive_n([prod, cons], rcv, 1)
        assert m.body == "one"
        settle(md)
        wait_outcomes([prod, cons], [d])
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(prod, cons)


def test_competing_consumers_share_the_load(router):
    n_receivers, n_messages = 3, 60
    prod = connect(router.amqp_url)
    consumers = [connect(router.amqp_url) for _ in range(n_receivers)]
    conns = [prod] + consumers
    try:
        rcvs = [c.create_receiver("anycast/compete", credit=10) for c in consumers]
        snd = prod.create_sender("anycast/compete")
        run_for(conns, 0.5)  # every consumer's credit has reached the router
        deliveries = [send_async(snd, Message(body="m%03d" % i)) for i in range(n_messages)]
        per_receiver = [[] for _ in rcvs]

        def drain():
            for i, r in enumerate(rcvs):
                while available(r):
                    m, d = take(r)
                    settle(d)
                    per_receiver[i].append(m.body)
            return sum(len(x) for x in per_receiver) >= n_messages

        pump(conns, drain, timeout=15, what="%d messages across %d consumers" % (n_messages, n_receivers))
        wait_outcomes(conns, deliveries)
        run_for(conns, 0.3)
        drain()
        counts = [len(x) for x in per_receiver]
        all_bodies = sorted(b for x in per_receiver for b in x)
        assert all_bodies == sorted("m%03d" % i for i in range(n_messages)), \
            "messages lost or duplicated; counts per consumer %s" % counts
        assert all(c > 0 for c in counts), "some consumer got nothing: %s" % counts
        assert all(d.remote_state == Delivery.ACCEPTED for d in deliveries)
    finally:
        close_quietly(*conns)


def test_producer_without_consumer_gets_no_credit_until_consumer_attaches(router):
    prod = connect(router.amqp_url)
    cons = None
    try:
        snd = prod.create_sender("anycast/nocredit")
        # no consumer: the link must stay without credit
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            run_for([prod], 0.1)
            assert snd.credit == 0, "producer got credit %d with no consumer attached" % snd.credit
        d = send_async(snd, Message(body="waiting"))
        run_for([prod], 0.5)
        assert d.remote_state == 0 and not d.settled, "message was settled (%s) with no consumer" % state_name(
            d.remote_state)

        cons = connect(router.amqp_url)
        rcv = cons.create_receiver("anycast/nocredit", credit=5)
        [(m, md)] = receive_n([prod, cons], rcv, 1, what="the queued message after the consumer attached")
        assert m.body == "waiting"
        settle(md)
        wait_outcomes([prod, cons], [d])
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(prod, cons)


def test_credit_is_withdrawn_when_last_consumer_leaves(router):
    """After the only consumer detaches, the producer cannot push more messages in
    (either credit is drained/zero, or messages sent stay unsettled/released, never accepted)."""
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/withdraw", credit=5)
        snd = prod.create_sender("anycast/withdraw")
        pump([prod, cons], lambda: snd.credit > 0, what="producer credit with a consumer present")
        rcv.close()
        cons.close()
        cons = None
        run_for([prod], 1.0)
        d = send_async(snd, Message(body="nobody home"))
        run_for([prod], 1.0)
        assert d.remote_state != Delivery.ACCEPTED, "message accepted with no consumer"
    finally:
        close_quietly(prod, cons)


def _large_round_trip(router, size):
    payload = os.urandom(size)
    prod = connect(router.amqp_url, timeout=30)
    cons = connect(router.amqp_url, timeout=30)
    try:
        rcv = cons.create_receiver("anycast/large", credit=2)
        snd = prod.create_sender("anycast/large")
        run_for([prod, cons], 0.2)
        d = send_async(snd, Message(body=payload, properties={"sha": hashlib.sha256(payload).hexdigest()}))
        [(m, md)] = receive_n([prod, cons], rcv, 1, timeout=40, what="%d byte message" % size)
        settle(md)
        wait_outcomes([prod, cons], [d], timeout=20)
        body = bytes(m.body)
        assert len(body) == size
        assert hashlib.sha256(body).hexdigest() == m.properties["sha"]
        assert body == payload
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(prod, cons)


def test_1mb_message_round_trip(router):
    _large_round_trip(router, 1024 * 1024)


@pytest.mark.timeout(90)
def test_10mb_message_round_trip(router):
    _large_round_trip(router, 10 * 1024 * 1024)


def test_message_larger_than_max_message_size_detaches_link(configured_router):
    r = configured_router("router:\n  limits:\n    max_message_size: 4096\n")
    prod = connect(r.amqp_url)
    cons = connect(r.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/toolarge", credit=5)
        snd = prod.create_sender("anycast/toolarge")
        run_for([prod, cons], 0.3)
        send_async(snd, Message(body=b"x" * 20000))
        with pytest.raises(LinkDetached) as ei:
            pump([prod, cons], lambda: False, timeout=10, what="sender link detach")
        assert ei.value.condition == "amqp:link:message-size-exceeded", str(ei.value)
        assert available(rcv) == 0, "oversized message was forwarded to the consumer"
    finally:
        close_quietly(prod, cons)


def test_links_on_several_sessions(router):
    """Links spread over three sessions of one connection route independently."""
    from proton.handlers import MessagingHandler

    class Rec(MessagingHandler):
        def __init__(self):
            super().__init__(prefetch=10, auto_accept=True)
            self.got = []

        def on_message(self, event):
            self.got.append((event.link.source.address, event.message.body))

    c = connect(router.amqp_url)
    try:
        h = Rec()
        s1, s2, s3 = c.conn.session(), c.conn.session(), c.conn.session()
        for s in (s1, s2, s3):
            s.open()
        c.container.create_receiver(s1, "sessions/a", handler=h)
        c.container.create_receiver(s2, "sessions/b", handler=h)
        sa = c.container.create_sender(s3, "sessions/a", handler=h)
        sb = c.container.create_sender(s3, "sessions/b", handler=h)
        pump([c], lambda: sa.credit > 0 and sb.credit > 0, what="credit on both senders")
        sa.send(Message(body="to a"))
        sb.send(Message(body="to b"))
        pump([c], lambda: len(h.got) >= 2, what="messages on both sessions")
        assert sorted(h.got) == [("sessions/a", "to a"), ("sessions/b", "to b")]
    finally:
        close_quietly(c)


def test_consumer_credit_limits_delivery_and_router_holds_the_rest(router):
    """A consumer with credit 1 gets one message; the others wait unsettled in the router until
    it grants more credit."""
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/credit1", credit=None)  # no prefetch window
        rcv.link.flow(1)
        snd = prod.create_sender("anycast/credit1")
        pump([prod, cons], lambda: snd.credit > 0, what="producer credit")
        ds = [send_async(snd, Message(body=i)) for i in range(5)]
        got = receive_n([prod, cons], rcv, 1)
        run_for([prod, cons], 0.5)
        assert available(rcv) == 0, "router sent beyond the consumer's credit"
        assert rcv.link.credit == 0
        assert got[0][0].body == 0
        settle(got[0][1])
        rcv.link.flow(4)
        got += receive_n([prod, cons], rcv, 4, what="the held messages after more credit")
        for _, d in got[1:]:
            settle(d)
        wait_outcomes([prod, cons], ds)
        assert [m.body for m, _ in got] == list(range(5))
        assert all(d.remote_state == Delivery.ACCEPTED for d in ds)
    finally:
        close_quietly(prod, cons)


def test_drain_with_nothing_to_send_returns_credit(router):
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/drain", credit=None)
        rcv.link.drain(10)
        pump([cons], lambda: not rcv.link.draining(), timeout=5, what="drain to complete")
        assert rcv.link.credit == 0
    finally:
        close_quietly(cons)


def test_presettled_producer(router):
    from proton.reactor import AtMostOnce
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("anycast/presettled", credit=10)
        snd = prod.create_sender("anycast/presettled", options=AtMostOnce())
        pump([prod, cons], lambda: snd.credit > 0, what="producer credit")
        for i in range(5):
            d = send_async(snd, Message(body=i))
            d.settle()
        got = receive_n([prod, cons], rcv, 5)
        for _, d in got:
            settle(d)
        assert [m.body for m, _ in got] == list(range(5))
    finally:
        close_quietly(prod, cons)


def test_small_client_max_frame_size_is_respected(router):
    """Both clients announce max-frame-size 512: the router must split transfers to fit."""
    payload = os.urandom(100 * 1024)
    prod = connect(router.amqp_url, max_frame_size=512)
    cons = connect(router.amqp_url, max_frame_size=512)
    try:
        rcv = cons.create_receiver("anycast/smallframes", credit=2)
        snd = prod.create_sender("anycast/smallframes")
        run_for([prod, cons], 0.2)
        d = send_async(snd, Message(body=payload))
        [(m, md)] = receive_n([prod, cons], rcv, 1, timeout=20, what="100 KiB message in 512-byte frames")
        settle(md)
        wait_outcomes([prod, cons], [d])
        assert bytes(m.body) == payload
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(prod, cons)


def test_link_capacity_bounds_producer_credit(configured_router):
    r = configured_router("router:\n  limits:\n    link_capacity: 5\n")
    prod = connect(r.amqp_url)
    cons = connect(r.amqp_url)
    try:
        cons.create_receiver("anycast/capacity", credit=100)
        snd = prod.create_sender("anycast/capacity")
        pump([prod, cons], lambda: snd.credit > 0, what="producer credit")
        run_for([prod, cons], 0.3)
        assert 0 < snd.credit <= 5, "producer credit %d with link_capacity 5" % snd.credit
    finally:
        close_quietly(prod, cons)


def test_default_address_type_multicast(configured_router):
    r = configured_router("router:\n  default_address_type: multicast\n")
    prod = connect(r.amqp_url)
    c1, c2 = connect(r.amqp_url), connect(r.amqp_url)
    conns = [prod, c1, c2]
    try:
        r1, r2 = c1.create_receiver("any/where", credit=10), c2.create_receiver("any/where", credit=10)
        run_for(conns, 0.3)
        snd = prod.create_sender("any/where")
        pump(conns, lambda: snd.credit > 0, what="producer credit")
        ds = [send_async(snd, Message(body=i)) for i in range(3)]
        pump(conns, lambda: available(r1) >= 3 and available(r2) >= 3, what="both receivers get all 3")
        wait_outcomes(conns, ds)
        assert [take(r1)[0].body for _ in range(3)] == [0, 1, 2]
        assert [take(r2)[0].body for _ in range(3)] == [0, 1, 2]
    finally:
        close_quietly(*conns)
