"""Malformed input over raw sockets must not disturb anyone else.

Each case runs against a fresh router while a healthy proton client keeps
sending and receiving on its own connection (in a background thread). The
router must answer the bad socket (protocol header, close frame and/or closing
the socket, as the case requires), the healthy client must see no error, and
the router must still accept new connections afterwards.
"""

import os
import struct
import threading
import time
import traceback

import pytest
from proton import Delivery, Message

import rawamqp
from rawamqp import (AMQP_HEADER, CLOSE, END, RawConnection, begin_frame, encode, frame, open_frame,
                     performative, transfer_frame)
from helpers import (TERMINAL, available, close_quietly, connect, pump, send_async, settle, state_name, take,
                     wait_outcomes)

ANSWER_TIMEOUT = 5.0
FRAMING = {"amqp:connection:framing-error", "amqp:framing-error", "amqp:decode-error"}


class HealthyClient(threading.Thread):
    """Sends and receives one message at a time on its own connection until stopped."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url = url
        self.stop_evt = threading.Event()
        self.started_evt = threading.Event()
        self.count = 0
        self.error = None

    def run(self):
        conn = None
        try:
            conn = connect(self.url)
            rcv = conn.create_receiver("health/check", credit=10)
            snd = conn.create_sender("health/check")
            i = 0
            while not self.stop_evt.is_set():
                d = send_async(snd, Message(body="health %d" % i))
                pump([conn], lambda: available(rcv) >= 1, timeout=5, what="healthy message %d" % i)
                m, md = take(rcv)
                settle(md)
                pump([conn], lambda: d.remote_state in TERMINAL, timeout=5, what="healthy outcome %d" % i)
                assert m.body == "health %d" % i, m.body
                assert d.remote_state == Delivery.ACCEPTED, state_name(d.remote_state)
                i += 1
                self.count = i
                self.started_evt.set()
                time.sleep(0.01)
        except BaseException:
            self.error = traceback.format_exc()
            self.started_evt.set()
        finally:
            close_quietly(conn)

    def stop(self):
        self.stop_evt.set()
        self.join(15)


# ---------------------------------------------------------------- cases --
# Each case: (bytes-producing function, expectation, allowed conditions)
#   "header+eof":   router answers its own AMQP header and closes the socket
#   "close|eof":    router sends close (with one of the allowed conditions, if a close is seen)
#                   or closes the socket
#   "condition":    router sends end or close carrying exactly one of the allowed conditions
#   "eof":          router closes the socket (no answer needed)


def _garbage(c):
    c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64))


def _http(c):
    c.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")


def _wrong_version(c):
    c.send(b"AMQP\x00\x02\x00\x00")


def _amqp091(c):
    c.send(b"AMQP\x00\x00\x09\x01")


def _frame_without_header(c):
    c.send(open_frame("no-header"))


def _truncated_then_close(c):
    c.handshake()
    whole = begin_frame()
    c.send(whole[:len(whole) // 2])
    c.sock.shutdown(1)  # SHUT_WR: we will never send the rest


def _oversized(c):
    c.handshake()
    # claims 16 MiB; the router's max-frame-size is 64 KiB (and we send only a little of it)
    c.try_send(struct.pack(">IBBH", 16 * 1024 * 1024, 2, 0, 0) + performative(rawamqp.BEGIN, None, 0, 100, 100)
               + b"\x00" * 1024)


def _size_below_header(c):
    c.handshake()
    c.try_send(struct.pack(">IBBH", 4, 2, 0, 0))


def _bad_doff(c):
    c.handshake()
    body = performative(rawamqp.BEGIN, None, rawamqp.UInt(0), rawamqp.UInt(100), rawamqp.UInt(100))
    c.try_send(struct.pack(">IBBH", 8 + len(body), 1, 0, 0) + body)


def _begin_before_open(c):
    c.send(AMQP_HEADER)
    c.read_until(lambda x: len(x.data) >= 8, 2)
    c.try_send(begin_frame())


def _transfer_unattached(c):
    c.handshake()
    c.send(begin_frame())
    c.read_until(lambda x: x.has_frame(rawamqp.BEGIN), ANSWER_TIMEOUT)
    assert c.has_frame(rawamqp.BEGIN), "router did not answer begin: %r" % c.frames()
    c.try_send(transfer_frame(handle=7, delivery_id=0, tag=b"x"))


def _unknown_descriptor(c):
    c.handshake()
    c.try_send(frame(encode(rawamqp.Described(rawamqp.ULong(0x7E), ["what", "is", "this"]))))


def _invalid_type_code(c):
    c.handshake()
    c.try_send(frame(b"\x00\x53\x11\xc0\x04\x02\xff\xff\xff"))


def _attach_without_begin(c):
    c.handshake()
    c.try_send(rawamqp.attach_frame("orphan", 0, True, source_address="x", channel=3))


CASES = {
    "garbage": (_garbage, "header+eof", None),
    "http-request": (_http, "header+eof", None),
    "wrong-amqp-version": (_wrong_version, "header+eof", None),
    "amqp-0-9-1-header": (_amqp091, "header+eof", None),
    "frame-without-header": (_frame_without_header, "header+eof", None),
    "truncated-frame-then-close": (_truncated_then_close, "eof", None),
    "oversized-frame": (_oversized, "close|eof", FRAMING),
    "frame-size-below-8": (_size_below_header, "close|eof", FRAMING),
    "doff-below-2": (_bad_doff, "close|eof", FRAMING),
    "begin-before-open": (_begin_before_open, "close|eof", None),
    "transfer-on-unattached-handle": (_transfer_unattached, "condition",
                                      {"amqp:session:unattached-handle"}),
    "unknown-descriptor": (_unknown_descriptor, "close|eof", FRAMING),
    "invalid-type-code": (_invalid_type_code, "close|eof", FRAMING),
    "attach-on-unbegun-channel": (_attach_without_begin, "close|eof", None),
}


def _check_answer(c, expect, allowed):
    if expect == "header+eof":
        c.read_to_eof(ANSWER_TIMEOUT)
        hdrs = c.headers()
        assert hdrs and hdrs[0] == AMQP_HEADER, \
            "router should answer its AMQP header; got %r" % bytes(c.data[:64])
        assert c.eof, "router did not close the socket within %ss (got %r)" % (ANSWER_TIMEOUT, bytes(c.data[:64]))
    elif expect == "eof":
        assert c.read_to_eof(ANSWER_TIMEOUT), "router did not close the socket; got %r" % c.frames()
        closes = [f for f in c.frames() if f.code == CLOSE and f.condition]
        if closes and allowed:
            assert closes[0].condition in allowed, closes
    elif expect == "close|eof":
        c.read_until(lambda x: x.eof or x.has_frame(CLOSE), ANSWER_TIMEOUT)
        closes = [f for f in c.frames() if f.code == CLOSE]
        assert c.eof or closes, "router neither sent close nor closed the socket; got %r" % c.frames()
        if closes:
            cond = closes[0].condition
            assert cond is not None and cond.startswith("amqp:"), "close without error condition: %r" % closes[0]
            if allowed:
                assert cond in allowed, "close condition %s not in %s" % (cond, sorted(allowed))
    elif expect == "condition":
        c.read_until(lambda x: x.eof or any(f.code in (CLOSE, END) and f.condition for f in x.frames()),
                     ANSWER_TIMEOUT)
        errs = [f for f in c.frames() if f.code in (CLOSE, END) and f.condition]
        assert errs, "expected end/close with %s; got %r (eof=%s)" % (sorted(allowed), c.frames(), c.eof)
        assert errs[0].condition in allowed, "condition %s not in %s (%r)" % (errs[0].condition, sorted(allowed),
                                                                              errs[0])
    else:
        raise ValueError(expect)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_contained(router, case):
    action, expect, allowed = CASES[case]
    healthy = HealthyClient(router.amqp_url)
    healthy.start()
    raw = None
    try:
        assert healthy.started_evt.wait(10), "healthy client did not start"
        assert healthy.error is None, healthy.error
        before = healthy.count
        raw = RawConnection.to(router.amqp_addr)
        action(raw)
        _check_answer(raw, expect, allowed)
        raw.close()
        raw = None
        # the healthy client kept going throughout
        deadline = time.monotonic() + 5
        while healthy.count < before + 5 and healthy.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthy.error is None, "healthy client failed:\n%s" % healthy.error
        assert healthy.count >= before + 5, "healthy client stalled (%d -> %d)" % (before, healthy.count)
        assert router.alive(), "router died"
        # new connections are still served
        fresh = RawConnection.to(router.amqp_addr)
        try:
            fresh.handshake()
        finally:
            fresh.close()
    finally:
        if raw is not None:
            raw.close()
        healthy.stop()
    assert healthy.error is None, "healthy client failed:\n%s" % healthy.error
    assert router.alive(), "router died"


def test_many_bad_connections_in_a_row(router):
    """A burst of every bad case, one after another on one router, while the healthy client runs."""
    healthy = HealthyClient(router.amqp_url)
    healthy.start()
    try:
        assert healthy.started_evt.wait(10), "healthy client did not start"
        for _ in range(2):
            for name, (action, expect, allowed) in CASES.items():
                raw = RawConnection.to(router.amqp_addr)
                try:
                    try:
                        action(raw)
                    except (AssertionError, OSError):
                        pass  # the answer itself is checked by test_bad_input_is_contained
                    raw.read_until(lambda x: x.eof or x.has_frame(CLOSE), 0.3)
                finally:
                    raw.close()
                assert healthy.error is None, "healthy client failed after %s:\n%s" % (name, healthy.error)
        before = healthy.count
        deadline = time.monotonic() + 5
        while healthy.count < before + 5 and healthy.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthy.error is None, healthy.error
        assert healthy.count >= before + 5, "healthy client stalled"
    finally:
        healthy.stop()
    c = connect(router.amqp_url)
    try:
        r = c.create_receiver("after/burst", credit=1)
        s = c.create_sender("after/burst")
        send_async(s, Message(body="ok"))
        pump([c], lambda: available(r) >= 1, what="message after the burst")
        assert take(r)[0].body == "ok"
    finally:
        close_quietly(c)


def test_transfer_beyond_credit_detaches_only_that_link(router):
    """Credit overflow: a sender that transfers without credit (no consumer exists, so the
    router granted none) gets its link detached with amqp:link:transfer-limit-exceeded; the
    connection and a healthy client elsewhere carry on."""
    healthy = connect(router.amqp_url)
    c = RawConnection.to(router.amqp_addr)
    try:
        hr = healthy.create_receiver("overflow/healthy", credit=5)
        hs = healthy.create_sender("overflow/healthy")
        c.handshake()
        c.send(begin_frame())
        c.read_until(lambda x: x.has_frame(rawamqp.BEGIN), ANSWER_TIMEOUT)
        c.send(rawamqp.attach_frame("overflow-sender", 0, False, target_address="overflow/nobody",
                                    initial_delivery_count=0))
        c.read_until(lambda x: x.has_frame(rawamqp.ATTACH), ANSWER_TIMEOUT)
        assert c.has_frame(rawamqp.ATTACH), "router did not answer attach: %r" % c.frames()
        c.send(transfer_frame(handle=0, delivery_id=0, tag=b"x"))
        c.read_until(lambda x: x.has_frame(rawamqp.DETACH), ANSWER_TIMEOUT)
        detach = c.frame(rawamqp.DETACH)
        assert detach is not None, "no detach after a transfer without credit: %r" % c.frames()
        assert detach.condition == "amqp:link:transfer-limit-exceeded", detach
        assert not c.eof, "only the link should go, not the connection"
        d = send_async(hs, Message(body="still fine"))
        pump([healthy], lambda: available(hr) >= 1, what="healthy client traffic")
        m, md = take(hr)
        settle(md)
        wait_outcomes([healthy], [d])
        assert m.body == "still fine"
        assert d.remote_state == Delivery.ACCEPTED
    finally:
        c.close()
        close_quietly(healthy)
