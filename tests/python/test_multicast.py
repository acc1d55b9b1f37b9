"""Multicast routing (config-declared prefix `mc/` and pattern `sensors/*/temp`)."""

from proton import Delivery, Message

from helpers import (available, close_quietly, connect, pump, run_for, send_async, state_name, take,
                     wait_outcomes)


def _fan_out(router, address, n_receivers=3, n_messages=20):
    prod = connect(router.amqp_url)
    consumers = [connect(router.amqp_url) for _ in range(n_receivers)]
    conns = [prod] + consumers
    try:
        rcvs = [c.create_receiver(address, credit=100) for c in consumers]
        run_for(conns, 0.5)  # receivers' credit reaches the router before anything is sent
        snd = prod.create_sender(address)
        pump(conns, lambda: snd.credit > 0, what="multicast producer credit")
        deliveries = [send_async(snd, Message(body="mc-%02d" % i, properties={"i": i}))
                      for i in range(n_messages)]
        got = [[] for _ in rcvs]

        def drain():
            for i, r in enumerate(rcvs):
                while available(r):
                    m, d = take(r)
                    if not d.settled:
                        d.update(Delivery.ACCEPTED)
                        d.settle()
                    got[i].append(m.body)
            return all(len(g) >= n_messages for g in got)

        pump(conns, drain, timeout=15,
             what="every multicast receiver to get %d messages (got %s)" % (n_messages, [len(g) for g in got]))
        states = wait_outcomes(conns, deliveries)
        run_for(conns, 0.3)
        drain()
        want = ["mc-%02d" % i for i in range(n_messages)]
        for i, g in enumerate(got):
            assert g == want, "receiver %d got %s" % (i, g)
        assert all(s == Delivery.ACCEPTED for s in states), \
            "multicast producer deliveries should be settled accepted: %s" % [state_name(s) for s in states]
    finally:
        close_quietly(*conns)


def test_multicast_prefix_every_receiver_gets_every_message(mc_router):
    _fan_out(mc_router, "mc/news", n_receivers=3, n_messages=20)


def test_multicast_pattern_address(mc_router):
    _fan_out(mc_router, "sensors/kitchen/temp", n_receivers=2, n_messages=5)


def test_multicast_hash_pattern_matches_many_segments(mc_router):
    _fan_out(mc_router, "logs/app/web/1", n_receivers=2, n_messages=3)


def test_star_pattern_does_not_match_extra_segments(mc_router):
    """sensors/*/temp must not match sensors/a/b/temp: that address is anycast (default)."""
    prod = connect(mc_router.amqp_url)
    c1, c2 = connect(mc_router.amqp_url), connect(mc_router.amqp_url)
    conns = [prod, c1, c2]
    try:
        r1 = c1.create_receiver("sensors/a/b/temp", credit=10)
        r2 = c2.create_receiver("sensors/a/b/temp", credit=10)
        snd = prod.create_sender("sensors/a/b/temp")
        run_for(conns, 0.3)
        ds = [send_async(snd, Message(body=i)) for i in range(4)]
        bodies = []

        def drain():
            for r in (r1, r2):
                while available(r):
                    m, d = take(r)
                    d.update(Delivery.ACCEPTED)
                    d.settle()
                    bodies.append(m.body)
            return len(bodies) >= 4

        pump(conns, drain, what="4 anycast messages")
        wait_outcomes(conns, ds)
        run_for(conns, 0.3)
        drain()
        assert sorted(bodies) == [0, 1, 2, 3], "duplicates mean it was treated as multicast: %s" % bodies
    finally:
        close_quietly(*conns)


def test_multicast_receivers_get_presettled_copies(mc_router):
    prod = connect(mc_router.amqp_url)
    cons = connect(mc_router.amqp_url)
    try:
        rcv = cons.create_receiver("mc/presettled", credit=10)
        run_for([prod, cons], 0.3)
        snd = prod.create_sender("mc/presettled")
        pump([prod, cons], lambda: snd.credit > 0, what="producer credit")
        send_async(snd, Message(body="copy"))
        pump([prod, cons], lambda: available(rcv) >= 1, what="multicast copy")
        m, d = take(rcv)
        assert m.body == "copy"
        assert d.settled, "multicast copies are sent presettled"
    finally:
        close_quietly(prod, cons)


def test_anycast_address_next_to_multicast_prefix_is_still_anycast(mc_router):
    """`orders` is declared anycast: two consumers share messages, nobody gets duplicates."""
    prod = connect(mc_router.amqp_url)
    c1, c2 = connect(mc_router.amqp_url), connect(mc_router.amqp_url)
    conns = [prod, c1, c2]
    try:
        r1, r2 = c1.create_receiver("orders", credit=10), c2.create_receiver("orders", credit=10)
        snd = prod.create_sender("orders")
        run_for(conns, 0.3)
        ds = [send_async(snd, Message(body=i)) for i in range(10)]
        bodies = []

        def drain():
            for r in (r1, r2):
                while available(r):
                    m, d = take(r)
                    d.update(Delivery.ACCEPTED)
                    d.settle()
                    bodies.append(m.body)
            return len(bodies) >= 10

        pump(conns, drain, what="10 anycast messages")
        wait_outcomes(conns, ds)
        run_for(conns, 0.3)
        drain()
        assert sorted(bodies) == list(range(10))
    finally:
        close_quietly(*conns)
