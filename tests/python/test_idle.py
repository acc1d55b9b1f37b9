"""Idle timeout (router configured with idle_timeout_ms: 2000)."""

import time

import pytest
from proton import Delivery, Message

from rawamqp import CLOSE, RawConnection
from helpers import available, close_quietly, connect, pump, run_for, send_async, settle, take, wait_outcomes

IDLE_CONFIG = """\
router:
  limits:
    idle_timeout_ms: 2000
"""


@pytest.fixture
def idle_router(configured_router):
    return configured_router(IDLE_CONFIG)


def test_router_advertises_its_idle_timeout(idle_router):
    raw = RawConnection.to(idle_router.amqp_addr)
    try:
        op = raw.handshake()
        fields = op.fields or []
        idle = fields[4] if len(fields) > 4 else None
        assert idle is not None and 0 < idle <= 2000, \
            "router open should carry idle-time-out <= 2000 ms so peers heartbeat; got %r" % (idle,)
    finally:
        raw.close()


def test_silent_raw_connection_is_closed(idle_router):
    raw = RawConnection.to(idle_router.amqp_addr)
    try:
        raw.handshake(idle_timeout=None)  # we advertise no idle timeout and then say nothing
        t0 = time.monotonic()
        raw.read_until(lambda c: c.eof or c.has_frame(CLOSE), timeout=6)
        elapsed = time.monotonic() - t0
        closes = [f for f in raw.frames() if f.code == CLOSE]
        assert raw.eof or closes, "silent connection still open after %.1fs" % elapsed
        assert elapsed >= 1.5, "closed after only %.2fs, before the 2 s idle timeout" % elapsed
        if closes:
            assert closes[0].condition == "amqp:resource-limit-exceeded", closes[0]
        # after the close the socket goes away too
        assert raw.read_to_eof(5), "router sent close but kept the socket open"
    finally:
        raw.close()


def test_raw_connection_sending_heartbeats_stays_open(idle_router):
    raw = RawConnection.to(idle_router.amqp_addr)
    try:
        raw.handshake()
        empty_frame = b"\x00\x00\x00\x08\x02\x00\x00\x00"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            raw.send(empty_frame)
            raw.read_until(lambda c: c.eof, 0.3)
            assert not raw.eof, "router closed a connection that kept sending heartbeats: %r" % raw.frames()
        assert not raw.has_frame(CLOSE), raw.frames()
    finally:
        raw.close()


def test_idle_proton_connection_survives(idle_router):
    c = connect(idle_router.amqp_url)
    try:
        r = c.create_receiver("idle/test", credit=5)
        s = c.create_sender("idle/test")
        # idle for 5 s while the event loop runs: proton answers the router's idle timeout with heartbeats
        run_for([c], 5.0)
        assert not c.disconnected, "connection dropped while idle: %s (router advertised idle %ss)" % (
            c.disconnected, c.conn.transport.remote_idle_timeout if c.conn.transport else "?")
        d = send_async(s, Message(body="after idle"))
        pump([c], lambda: available(r) >= 1, what="message after idling")
        m, md = take(r)
        settle(md)
        wait_outcomes([c], [d])
        assert m.body == "after idle"
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(c)


def test_enforced_idle_timeout_leaves_margin_over_advertised(idle_router):
    """AMQP 1.0 section 2.4.5: a peer SHOULD advertise half of its actual idle threshold, so that
    a partner heartbeating at the advertised interval is never cut off by scheduling jitter.
    Here: the time until a silent connection is closed must be clearly longer than the
    idle-time-out the router advertised in its open."""
    raw = RawConnection.to(idle_router.amqp_addr)
    try:
        op = raw.handshake()
        fields = op.fields or []
        advertised_ms = fields[4] if len(fields) > 4 else None
        assert advertised_ms, "router advertised no idle-time-out"
        t0 = time.monotonic()
        raw.read_until(lambda c: c.eof or c.has_frame(CLOSE), timeout=6)
        enforced_ms = (time.monotonic() - t0) * 1000
        assert raw.eof or raw.has_frame(CLOSE), "silent connection never closed"
        assert enforced_ms >= 1.5 * advertised_ms, (
            "router advertised idle-time-out %d ms but closed a silent peer after %.0f ms; it should "
            "advertise about half of its threshold" % (advertised_ms, enforced_ms))
    finally:
        raw.close()
