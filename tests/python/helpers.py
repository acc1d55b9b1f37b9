"""Small utilities over python-qpid-proton's blocking API.

Each proton BlockingConnection owns its own Container and only does I/O while
one of its blocking calls runs. Tests that involve several connections (a
producer and consumers) therefore drive them all with `pump`, which round-robins
the containers until a condition holds or a deadline passes, so no test can
block forever on a single connection.
"""

import json
import subprocess
import time
import urllib.error
import urllib.request

from proton import Delivery, Endpoint, Link, Message
from proton.reactor import LinkOption
from proton.utils import BlockingConnection

DEFAULT_TIMEOUT = 10.0

TERMINAL = (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED)
STATE_NAMES = {
    Delivery.RECEIVED: "RECEIVED", Delivery.ACCEPTED: "ACCEPTED", Delivery.REJECTED: "REJECTED",
    Delivery.RELEASED: "RELEASED", Delivery.MODIFIED: "MODIFIED", 0: "NONE",
}


class PumpTimeout(AssertionError):
    pass


def connect(url, timeout=DEFAULT_TIMEOUT, **kwargs) -> BlockingConnection:
    return BlockingConnection(url, timeout=timeout, **kwargs)


def pump(conns, cond=lambda: False, timeout=DEFAULT_TIMEOUT, what="condition", raise_on_timeout=True):
    """Drive the I/O of every connection in `conns` until cond() is true.

    Raises PumpTimeout (an AssertionError) after `timeout` seconds unless
    raise_on_timeout is False, in which case it returns cond()'s last value.
    """
    conns = [c for c in conns if c is not None]
    saved = [c.container.timeout for c in conns]
    slice_ = 0.002 if len(conns) > 1 else 0.05
    for c in conns:
        c.container.timeout = slice_
    try:
        deadline = time.monotonic() + timeout
        while True:
            if cond():
                return True
            if time.monotonic() >= deadline:
                if raise_on_timeout:
                    raise PumpTimeout("timed out after %.1fs waiting for %s" % (timeout, what))
                return bool(cond())
            for c in conns:
                c.container.process()
    finally:
        for c, t in zip(conns, saved):
            if c.container is not None:
                c.container.timeout = t


def run_for(conns, seconds):
    """Drive the connections' I/O for a fixed time."""
    pump(conns, lambda: False, timeout=seconds, raise_on_timeout=False)


def send_async(sender, message: Message) -> Delivery:
    """Queue a message on a BlockingSender (or raw Sender) without waiting."""
    link = getattr(sender, "link", sender)
    return link.send(message)


def is_terminal(d: Delivery) -> bool:
    return d.remote_state in TERMINAL or d.settled


def state_name(state) -> str:
    return STATE_NAMES.get(state, str(state))


def wait_outcomes(conns, deliveries, timeout=DEFAULT_TIMEOUT, what="delivery outcomes"):
    pump(conns, lambda: all(d.remote_state in TERMINAL for d in deliveries), timeout,
         what="%s (states now %s)" % (what, [state_name(d.remote_state) for d in deliveries]))
    return [d.remote_state for d in deliveries]


def take(receiver):
    """Pop one (message, delivery) pair from a BlockingReceiver's prefetch buffer."""
    return receiver.fetcher.incoming.popleft()


def available(receiver) -> int:
    return receiver.fetcher.has_message


def receive_n(conns, receiver, n, timeout=DEFAULT_TIMEOUT, what=None):
    """Pump until `receiver` buffered n messages; return the n (message, delivery) pairs."""
    pump(conns, lambda: available(receiver) >= n, timeout,
         what=what or "%d messages on %s" % (n, receiver.link.name))
    return [take(receiver) for _ in range(n)]


def settle(delivery: Delivery, state=Delivery.ACCEPTED):
    if not delivery.settled:
        delivery.update(state)
        delivery.settle()


def close_quietly(*conns):
    for c in conns:
        if c is None:
            continue
        try:
            c.close()
        except Exception:
            pass


# ---------------------------------------------------------------- HTTP --

def http(method, url, body=None, timeout=5.0):
    """Returns (status, body_text). Non-2xx answers are returned, not raised."""
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode() if not isinstance(body, (bytes, str)) else (
            body.encode() if isinstance(body, str) else body)
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def http_json(method, url, body=None, timeout=5.0):
    status, text = http(method, url, body, timeout)
    try:
        return status, json.loads(text) if text else None
    except ValueError:
        raise AssertionError("%s %s -> %s: body is not JSON: %r" % (method, url, status, text[:500]))


def remote_active(endpoint) -> bool:
    return bool(endpoint.state & Endpoint.REMOTE_ACTIVE)


def remote_closed(endpoint) -> bool:
    return bool(endpoint.state & Endpoint.REMOTE_CLOSED)


class SettleSecond(LinkOption):
    """A receiver in rcv-settle-mode second: the router settles a delivery only once the
    consumer's outcome took effect (for queues: once the acknowledgement is durable)."""

    def apply(self, link):
        link.rcv_settle_mode = Link.RCV_SECOND


def drop(*conns):
    """Lets blocking connections go without close handshakes (their peer is dead)."""
    for x in conns:
        if x is None:
            continue
        try:
            x.conn.transport.close_head()
            x.conn.transport.close_tail()
        except Exception:
            pass
        try:
            x.container.stop()
        except Exception:
            pass


class ServerProcess:
    """Stopping a server started as `self.proc` with its stderr in the open file
    `self._stderr`: SIGKILL (`kill`) or SIGTERM with a SIGKILL after 10 s (`close`)."""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._stderr.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._stderr.close()
