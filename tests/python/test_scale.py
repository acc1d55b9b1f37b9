"""Many links on one connection, many concurrent connections."""

import errno
import os
import selectors
import socket
import time

import pytest
from proton import Delivery, Endpoint, Message
from proton.handlers import MessagingHandler

import rawamqp
from conftest import raise_nofile
from helpers import (available, close_quietly, connect, pump, run_for, send_async, settle, take,
                     wait_outcomes)


class _Collector(MessagingHandler):
    """Link handler that records messages and link errors, and never auto-accepts or closes."""

    def __init__(self):
        super().__init__(prefetch=0, auto_accept=False, auto_settle=False)
        self.messages = []  # (link name, message, delivery)
        self.link_errors = []

    def on_message(self, event):
        self.messages.append((event.link.name, event.message, event.delivery))

    def on_link_error(self, event):
        self.link_errors.append((event.link.name, event.link.remote_condition))


@pytest.mark.timeout(90)
def test_1000_receivers_on_one_connection(router):
    n = 1000
    c = connect(router.amqp_url, timeout=30)
    p = connect(router.amqp_url)
    try:
        handler = _Collector()
        links = [c.container.create_receiver(c.conn, "links/%04d" % i, name="rcv-%04d" % i, handler=handler)
                 for i in range(n)]
        for lk in links:
            lk.flow(1)

        def attached():
            return sum(1 for lk in links if lk.state & Endpoint.REMOTE_ACTIVE)

        pump([c], lambda: all(lk.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED) for lk in links),
             timeout=60, what="%d receiver attaches" % n)
        errors = [(lk.name, lk.remote_condition) for lk in links if lk.state & Endpoint.REMOTE_CLOSED]
        assert not errors, "%d links refused, first: %s" % (len(errors), errors[:3])
        assert attached() == n
        assert all(lk.remote_source.address == "links/%04d" % i for i, lk in enumerate(links))

        # the last and the first link are both usable
        for idx in (n - 1, 0):
            snd = p.create_sender("links/%04d" % idx)
            d = send_async(snd, Message(body="to %d" % idx))
            pump([c, p], lambda: handler.messages, what="message on link %d" % idx)
            name, msg, dlv = handler.messages.pop()
            assert name == "rcv-%04d" % idx
            assert msg.body == "to %d" % idx
            settle(dlv)
            wait_outcomes([c, p], [d])
            assert d.remote_state == Delivery.ACCEPTED
            snd.close()
    finally:
        close_quietly(p, c)


@pytest.mark.timeout(90)
def test_1000_senders_on_one_connection(router):
    n = 1000
    cons = connect(router.amqp_url)
    c = connect(router.amqp_url, timeout=30)
    try:
        rcv = cons.create_receiver("senders/shared", credit=50)
        run_for([cons], 0.2)
        handler = _Collector()
        links = [c.container.create_sender(c.conn, "senders/shared", name="snd-%04d" % i, handler=handler)
                 for i in range(n)]
        pump([c, cons], lambda: all(lk.state & (Endpoint.REMOTE_ACTIVE | Endpoint.REMOTE_CLOSED) for lk in links),
             timeout=60, what="%d sender attaches" % n)
        errors = [(lk.name, lk.remote_condition) for lk in links if lk.state & Endpoint.REMOTE_CLOSED]
        assert not errors, "%d links refused, first: %s" % (len(errors), errors[:3])
        picks = [0, 499, 999]
        pump([c, cons], lambda: all(links[i].credit > 0 for i in picks), what="credit on sampled senders")
        ds = [links[i].send(Message(body=i)) for i in picks]
        bodies = []

        def drain():
            while available(rcv):
                m, d = take(rcv)
                settle(d)
                bodies.append(m.body)
            return len(bodies) >= len(picks)

        pump([c, cons], drain, what="messages from sampled senders")
        wait_outcomes([c, cons], ds)
        assert sorted(bodies) == picks
    finally:
        close_quietly(c, cons)


def _open_raw_connections(addr, n, timeout):
    """Open n raw sockets, do the AMQP header + open handshake on all of them concurrently.
    Returns (sockets, failures)."""
    sel = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit
    hello = rawamqp.AMQP_HEADER + rawamqp.open_frame("scale-client")
    socks = []
    state = {}
    failures = []
    deadline = time.monotonic() + timeout
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            failures.append("connect %d: errno %d" % (i, err))
            s.close()
            continue
        socks.append(s)
        state[s] = {"buf": bytearray(), "sent": False, "done": False}
        sel.register(s, selectors.EVENT_WRITE)
        # keep the accept backlog drained while we go
        if i % 200 == 199:
            _service(sel, state, hello, failures, 0.05)
    while time.monotonic() < deadline and not all(st["done"] for st in state.values()):
        _service(sel, state, hello, failures, 0.2)
    sel.close()
    not_done = sum(1 for st in state.values() if not st["done"])
    if not_done:
        failures.append("%d connections did not complete the handshake" % not_done)
    return socks, failures


def _service(sel, state, hello, failures, wait):
    for key, ev in sel.select(wait):
        s = key.fileobj
        st = state[s]
        if ev & selectors.EVENT_WRITE and not st["sent"]:
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                failures.append("connect failed errno %d" % err)
                st["done"] = True
                sel.unregister(s)
                continue
            s.send(hello)
            st["sent"] = True
            sel.modify(s, selectors.EVENT_READ)
        elif ev & selectors.EVENT_READ:
            try:
                chunk = s.recv(65536)
            except OSError as e:
                failures.append("recv: %s" % e)
                st["done"] = True
                sel.unregister(s)
                continue
            if not chunk:
                failures.append("router closed a connection during the handshake: %r" % bytes(st["buf"][:100]))
                st["done"] = True
                sel.unregister(s)
                continue
            st["buf"] += chunk
            hdrs, frames, _ = rawamqp.parse_stream(bytes(st["buf"]))
            if any(f.code == rawamqp.OPEN for f in frames):
                st["done"] = True
                sel.unregister(s)
            elif any(f.code == rawamqp.CLOSE for f in frames):
                failures.append("router closed a connection: %s" % [f for f in frames if f.code == rawamqp.CLOSE])
                st["done"] = True
                sel.unregister(s)


@pytest.mark.timeout(120)
def test_2000_concurrent_connections(router):
    n = int(os.environ.get("ENMESH_TEST_CONNECTIONS", "2000"))
    limit = raise_nofile(20000)
    if limit < n + 200:
        pytest.skip("cannot raise RLIMIT_NOFILE high enough (%d)" % limit)
    # proton's reactor uses select(): create the proton clients *before* the raw sockets so their
    # descriptors stay below FD_SETSIZE.
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    socks = []
    try:
        rcv = cons.create_receiver("scale/conns", credit=10)
        snd = prod.create_sender("scale/conns")
        run_for([prod, cons], 0.2)
        t0 = time.monotonic()
        socks, failures = _open_raw_connections(router.amqp_addr, n, timeout=60)
        elapsed = time.monotonic() - t0
        assert not failures, "%d problems opening %d connections in %.1fs; first: %s" % (
            len(failures), n, elapsed, failures[:5])
        assert len(socks) == n

        # while all of them are open, the existing clients still work
        d = send_async(snd, Message(body="still working"))
        pump([prod, cons], lambda: available(rcv) >= 1, what="message while %d connections are open" % n)
        m, md = take(rcv)
        settle(md)
        wait_outcomes([prod, cons], [d])
        assert m.body == "still working"

        # and the router still accepts and handshakes one more
        extra = rawamqp.RawConnection.to(router.amqp_addr)
        try:
            extra.handshake()
        finally:
            extra.close()
    finally:
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        close_quietly(prod, cons)

    # after the mass disconnect the router is healthy
    c = connect(router.amqp_url)
    try:
        r = c.create_receiver("scale/after", credit=1)
        s = c.create_sender("scale/after")
        d = send_async(s, Message(body="after"))
        pump([c], lambda: available(r) >= 1, what="message after mass disconnect")
        m, md = take(r)
        settle(md)
        assert m.body == "after"
    finally:
        close_quietly(c)


def test_descriptor_table_is_grown_before_connections_arrive(router):
    """The server grows its descriptor table once at start (to its limit, at most 65,536), so
    that accepting the 1,025th, 2,049th, ... connection does not wait for the kernel to grow
    it (an RCU grace period in a multi-threaded process: 10-36 ms measured)."""
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if want <= 1024:
        pytest.skip("descriptor limit %d: nothing to grow" % hard)
    with open("/proc/%d/status" % router.proc.pid) as f:
        size = next(int(l.split()[1]) for l in f if l.startswith("FDSize:"))
    assert size >= want, "descriptor table of %d slots, expected at least %d" % (size, want)
