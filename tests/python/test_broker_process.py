"""`enmesh broker` as its own process, with routers (`enmesh router`, `broker.url`) forwarding
queue addresses to it, driven by python-qpid-proton: store-and-forward through the remote
broker, two routers sharing one broker's queue, the broker SIGKILLed under a running router
and restarted on its data: within the router's resume window clients notice nothing; past it,
consumers are detached with amqp:link:detach-forced and producers refused while anycast goes
on; nothing acknowledged is lost or redelivered."""

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from proton import Message
from proton.utils import LinkDetached

from conftest import Router, enmesh_bin
from helpers import (ServerProcess, available, close_quietly, connect, pump, receive_n, send_async, settle,
                     take, wait_outcomes)

READY = re.compile(r"enmesh broker ready listen=([\d.]+):(\d+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker(ServerProcess):
    """A running `enmesh broker`."""

    def __init__(self, tmpdir: Path, port: int, name="broker"):
        self.port = port
        self.stderr_path = tmpdir / ("%s.stderr.log" % name)
        self._stderr = open(self.stderr_path, "ab")
        args = [enmesh_bin(), "broker", "--data", str(tmpdir / ("%s-data" % name)),
                "--listen", "127.0.0.1:%d" % port]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(15) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError("broker did not start:\n" + self.stderr_path.read_text(errors="replace"))

    def _read(self):
        for raw in self.proc.stdout:
            if READY.search(raw.decode("utf-8", "replace")):
                self._ready.set()
        self._ready.set()


def router_config(port):
    return """\
broker:
  url: 127.0.0.1:%d
addresses:
  - prefix: "q/"
    type: queue
""" % port


def _send(conn, address, bodies):
    s = conn.create_sender(address)
    ds = [send_async(s, Message(body=b)) for b in bodies]
    states = wait_outcomes([conn], ds, what="outcomes from the broker")
    s.close()
    return states


def test_two_routers_share_a_remote_brokers_queue(tmp_path):
    port = free_port()
    b = Broker(tmp_path, port)
    r1 = Router(config=router_config(port), tmpdir=tmp_path, name="r1", mode="router")
    r2 = Router(config=router_config(port), tmpdir=tmp_path, name="r2", mode="router")
    try:
        p = connect(r1.amqp_url)
        states = _send(p, "q/shared", ["m%02d" % i for i in range(20)])
        assert all(st == states[0].ACCEPTED for st in states), states
        # Consumers on two routers compete for the one queue at the broker.
        c1, c2 = connect(r1.amqp_url), connect(r2.amqp_url)
        x1 = c1.create_receiver("q/shared", credit=0)
        x2 = c2.create_receiver("q/shared", credit=0)
        x1.link.flow(10)
        x2.link.flow(10)
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 20 and time.monotonic() < deadline:
            pump([c1, c2], lambda: available(x1) or available(x2), timeout=10, what="messages")
            for x in (x1, x2):
                while available(x):
                    m, d = take(x)
                    got.append((x is x1, m.body))
                    settle(d)
        assert sorted(body for _, body in got) == ["m%02d" % i for i in range(20)]
        assert {side for side, _ in got} == {True, False}, "one router got everything"
        close_quietly(p, c1, c2)
    finally:
        r1.close()
        r2.close()
        b.close()


def _twenty_with_five_held(r):
    """20 messages on q/work; a consumer took 10 and acknowledged the first 5, so w05..w09
    are held unacknowledged. Returns (producer conn, consumer conn, receiver, first 10)."""
    p = connect(r.amqp_url)
    _send(p, "q/work", ["w%02d" % i for i in range(20)])
    c = connect(r.amqp_url)
    rcv = c.create_receiver("q/work", credit=0)
    rcv.link.flow(10)
    first = receive_n([c], rcv, 10)
    assert [m.body for m, _ in first] == ["w%02d" % i for i in range(10)]
    for _, d in first[:5]:
        settle(d)
    pump([c], timeout=0.5, raise_on_timeout=False)
    return p, c, rcv, first


def test_broker_restarted_within_the_window_goes_unnoticed(tmp_path):
    """SIGKILL the broker and start it again at once: the router resumes its consumer (the
    messages its client holds stay the client's) and sends what was waiting; the client sees
    no detach, no refusal, no duplicate."""
    port = free_port()
    b = Broker(tmp_path, port)
    r = Router(config=router_config(port), tmpdir=tmp_path, name="r", mode="router")
    try:
        p, c, rcv, first = _twenty_with_five_held(r)

        b.kill()
        s = p.create_sender("q/work")
        d = send_async(s, Message(body="while-down"))
        pump([p, c], timeout=0.3, raise_on_timeout=False)
        b = Broker(tmp_path, port)
        # The message sent while the broker was away is stored once it is back.
        (state,) = wait_outcomes([p, c], [d], timeout=15)
        assert state == d.ACCEPTED, state
        # The held messages are still the client's: acknowledging them works ...
        for _, dd in first[5:]:
            settle(dd)
        rcv.link.flow(20)
        rest = receive_n([c, p], rcv, 11, timeout=10)
        # ... and they do not come again; the rest does, once each.
        assert sorted(m.body for m, _ in rest) == ["w%02d" % i for i in range(10, 20)] + ["while-down"]
        for _, dd in rest:
            settle(dd)
        pump([c], lambda: available(rcv) > 0, timeout=1, raise_on_timeout=False)
        assert not available(rcv)
        assert not rcv.link.state & rcv.link.REMOTE_CLOSED
        close_quietly(p, c)
    finally:
        r.close()
        b.close()


def test_broker_away_past_the_window_then_restarted(tmp_path):
    """The broker stays away longer than the router's resume window (10 s): consumers are
    detached with amqp:link:detach-forced and producers refused while anycast goes on; once
    it is back, nothing acknowledged returns and everything else does."""
    port = free_port()
    b = Broker(tmp_path, port)
    r = Router(config=router_config(port), tmpdir=tmp_path, name="r", mode="router")
    try:
        p, c, rcv, first = _twenty_with_five_held(r)

        b.kill()
        # Past the window, the consumer is told to reattach; the router itself keeps running.
        try:
            pump([c], lambda: rcv.link.state & rcv.link.REMOTE_CLOSED, timeout=20,
                 what="detach of the consumer")
            detached = str(rcv.link.remote_condition)
        except LinkDetached as e:  # proton raises it from the pump
            detached = str(e)
        assert "amqp:link:detach-forced" in detached, detached
        # A message to a queue is refused while the broker is away ...
        s = p.create_sender("q/work")
        d = send_async(s, Message(body="while-down"))
        (state,) = wait_outcomes([p], [d])
        assert state == d.REJECTED, state
        # ... while anycast traffic goes on.
        a = connect(r.amqp_url)
        ar = a.create_receiver("direct", credit=5)
        pump([a], timeout=0.2, raise_on_timeout=False)
        send_async(p.create_sender("direct"), Message(body="any"))
        assert [m.body for m, d in receive_n([a, p], ar, 1)] == ["any"]

        b = Broker(tmp_path, port)
        # The router reconnects by itself (within about a second).
        deadline = time.monotonic() + 10
        got = []
        while time.monotonic() < deadline:
            try:
                c2 = connect(r.amqp_url)
                rcv2 = c2.create_receiver("q/work", credit=20)
                got = receive_n([c2], rcv2, 15, timeout=3)
                break
            except Exception:
                time.sleep(0.3)
        bodies = sorted(m.body for m, _ in got)
        # Nothing acknowledged comes back; the unacknowledged and the undelivered all do.
        assert bodies == ["w%02d" % i for i in range(5, 20)], bodies
        for _, dd in got:
            settle(dd)
        pump([c2], lambda: available(rcv2) > 0, timeout=0.5, raise_on_timeout=False)
        assert not available(rcv2)
        close_quietly(p, c, a, c2)
    finally:
        r.close()
        b.close()
