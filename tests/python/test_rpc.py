"""Request/response over dynamic reply addresses and the anonymous relay."""

from proton import Delivery, Message, symbol

from helpers import (available, close_quietly, connect, pump, run_for, send_async, settle, state_name,
                     take, wait_outcomes)


def test_connection_offers_anonymous_relay(router):
    c = connect(router.amqp_url)
    try:
        caps = c.conn.remote_offered_capabilities or []
        assert symbol("ANONYMOUS-RELAY") in [symbol(str(x)) for x in caps], caps
    finally:
        close_quietly(c)


def test_dynamic_receiver_gets_unique_address(router):
    c = connect(router.amqp_url)
    try:
        r1 = c.create_receiver(None, dynamic=True, credit=1)
        r2 = c.create_receiver(None, dynamic=True, credit=1)
        a1, a2 = r1.remote_source.address, r2.remote_source.address
        assert a1 and a2, "dynamic source address missing: %r %r" % (a1, a2)
        assert a1 != a2
        assert a1.startswith("_dynamic/") and a2.startswith("_dynamic/"), (a1, a2)
    finally:
        close_quietly(c)


def test_rpc_request_reply(router):
    client = connect(router.amqp_url)
    service = connect(router.amqp_url)
    conns = [client, service]
    try:
        # service side: a consumer of requests and an anonymous (null target) sender for replies
        srv_rcv = service.create_receiver("rpc/echo", credit=10)
        srv_snd = service.create_sender(None)
        # client side: dynamic reply address + request sender
        reply_rcv = client.create_receiver(None, dynamic=True, credit=10)
        reply_to = reply_rcv.remote_source.address
        assert reply_to, "no dynamic address assigned"
        req_snd = client.create_sender("rpc/echo")
        run_for(conns, 0.3)

        n = 5
        requests = [Message(body="request %d" % i, reply_to=reply_to, correlation_id="corr-%d" % i)
                    for i in range(n)]
        req_ds = [send_async(req_snd, m) for m in requests]

        reply_ds = []
        served = []

        def serve():
            while available(srv_rcv):
                m, d = take(srv_rcv)
                served.append(m)
                assert m.reply_to == reply_to, "reply_to changed in transit: %r" % m.reply_to
                reply_ds.append(send_async(srv_snd, Message(address=m.reply_to, correlation_id=m.correlation_id,
                                                            body=m.body.upper())))
                settle(d)
            return available(reply_rcv) >= n

        pump(conns, serve, timeout=15, what="%d replies (served %d)" % (n, len(served)))
        replies = [take(reply_rcv) for _ in range(n)]
        for m, d in replies:
            settle(d)
        wait_outcomes(conns, req_ds + reply_ds)
        by_corr = {m.correlation_id: m.body for m, _ in replies}
        assert by_corr == {"corr-%d" % i: "REQUEST %d" % i for i in range(n)}
        assert all(d.remote_state == Delivery.ACCEPTED for d in req_ds + reply_ds), \
            [state_name(d.remote_state) for d in req_ds + reply_ds]
    finally:
        close_quietly(*conns)


def test_sender_attached_to_dynamic_address_reaches_it(router):
    client = connect(router.amqp_url)
    other = connect(router.amqp_url)
    try:
        rcv = client.create_receiver(None, dynamic=True, credit=5)
        addr = rcv.remote_source.address
        snd = other.create_sender(addr)
        run_for([client, other], 0.3)
        d = send_async(snd, Message(body="direct"))
        pump([client, other], lambda: available(rcv) >= 1, what="message on the dynamic address")
        m, md = take(rcv)
        settle(md)
        wait_outcomes([client, other], [d])
        assert m.body == "direct"
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(client, other)


def test_anonymous_relay_to_address_without_consumer_is_released(router):
    c = connect(router.amqp_url)
    try:
        snd = c.create_sender(None)
        pump([c], lambda: snd.credit > 0, what="credit on the anonymous relay link")
        d = send_async(snd, Message(address="nobody/listens/here", body="lost"))
        wait_outcomes([c], [d])
        assert d.remote_state == Delivery.RELEASED, state_name(d.remote_state)
    finally:
        close_quietly(c)


def test_anonymous_relay_to_multicast_and_anycast(mc_router):
    c = connect(mc_router.amqp_url)
    m1, m2 = connect(mc_router.amqp_url), connect(mc_router.amqp_url)
    conns = [c, m1, m2]
    try:
        mr1, mr2 = m1.create_receiver("mc/relay", credit=5), m2.create_receiver("mc/relay", credit=5)
        ar = m1.create_receiver("relay/any", credit=5)
        run_for(conns, 0.3)
        snd = c.create_sender(None)
        pump(conns, lambda: snd.credit > 0, what="anonymous relay credit")
        ds = [send_async(snd, Message(address="mc/relay", body="fan")),
              send_async(snd, Message(address="relay/any", body="one"))]
        pump(conns, lambda: available(mr1) and available(mr2) and available(ar), what="relayed messages")
        m, d = take(ar)
        settle(d)
        wait_outcomes(conns, ds)
        assert take(mr1)[0].body == "fan" and take(mr2)[0].body == "fan" and m.body == "one"
        assert [x.remote_state for x in ds] == [Delivery.ACCEPTED, Delivery.ACCEPTED]
    finally:
        close_quietly(*conns)
