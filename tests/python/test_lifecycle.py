"""Startup/config, SASL, refused address types, SIGTERM shutdown, CLI."""

import signal
import subprocess
import time

import pytest
from proton import Delivery, Endpoint, Message
from proton.utils import ConnectionClosed, LinkDetached

import rawamqp
from conftest import Router, enmesh_bin
from helpers import (available, close_quietly, connect, http_json, pump, run_for, send_async, settle, take,
                     wait_outcomes)


# ------------------------------------------------------------- config --

def test_ready_line_and_ports(router):
    assert router.amqp_port > 0 and router.http_port > 0
    assert router.amqp_port != router.http_port
    ready = [ln for ln in router.stdout_lines if ln.startswith("enmesh ready")]
    assert len(ready) == 1, router.stdout_lines


def test_router_mode_with_config_file(tmp_path):
    r = Router(config=MODE_CONFIG, tmpdir=tmp_path, name="routermode", mode="router")
    try:
        status, addrs = http_json("GET", r.http_url + "/api/v1/addresses")
        assert status == 200
        assert [a for a in addrs if a.get("prefix") == "mc/" and a.get("type") == "multicast"], addrs
        c = connect(r.amqp_url)
        try:
            _round_trip(c, "router/mode")
        finally:
            close_quietly(c)
    finally:
        rc = r.terminate()
        r.close()
    assert rc == 0, "exit code %s after SIGTERM" % rc


MODE_CONFIG = """\
router:
  id: router-mode-test
  listen: 127.0.0.1:0
  http: 127.0.0.1:0
  default_address_type: anycast
  limits:
    max_connections: 100
    max_sessions_per_connection: 8
    max_links_per_connection: 100
    max_message_size: 1048576
    link_capacity: 100
    max_frame_size: 65536
    idle_timeout_ms: 30000
addresses:
  - prefix: "mc/"
    type: multicast
"""


def test_unknown_config_field_is_rejected(tmp_path):
    with pytest.raises(RuntimeError, match="exited before ready"):
        Router(config="router:\n  id: x\n  no_such_field: 1\n", tmpdir=tmp_path, name="badcfg")


def test_invalid_address_type_is_rejected(tmp_path):
    with pytest.raises(RuntimeError, match="exited before ready"):
        Router(config="addresses:\n  - name: a\n    type: bogus\n", tmpdir=tmp_path, name="badtype")


# --------------------------------------------------------------- SASL --

def _round_trip(conn, address):
    r = conn.create_receiver(address, credit=1)
    s = conn.create_sender(address)
    d = send_async(s, Message(body="sasl"))
    pump([conn], lambda: available(r) >= 1, what="message on %s" % address)
    m, md = take(r)
    settle(md)
    wait_outcomes([conn], [d])
    assert m.body == "sasl" and d.remote_state == Delivery.ACCEPTED


def test_sasl_anonymous(router):
    c = connect(router.amqp_url, allowed_mechs="ANONYMOUS")
    try:
        _round_trip(c, "sasl/anon")
    finally:
        close_quietly(c)


def test_sasl_plain_any_credentials(router):
    c = connect(router.amqp_url, user="alice", password="secret", allowed_mechs="PLAIN",
                allow_insecure_mechs=True)
    try:
        _round_trip(c, "sasl/plain")
    finally:
        close_quietly(c)


def test_no_sasl_layer(router):
    c = connect(router.amqp_url, sasl_enabled=False)
    try:
        _round_trip(c, "sasl/none")
    finally:
        close_quietly(c)


def test_raw_sasl_mechanisms(router):
    raw = rawamqp.RawConnection.to(router.amqp_addr)
    try:
        raw.send(rawamqp.SASL_HEADER)
        raw.read_until(lambda c: any(f.code == rawamqp.SASL_MECHANISMS for f in c.frames()), 5)
        hdrs, frames, _ = raw.parsed()
        assert hdrs and hdrs[0] == rawamqp.SASL_HEADER, hdrs
        mechs = [f for f in frames if f.code == rawamqp.SASL_MECHANISMS]
        assert mechs, frames
        offered = mechs[0].fields[0] if mechs[0].fields else []
        offered = [offered] if isinstance(offered, str) else offered
        assert "ANONYMOUS" in offered and "PLAIN" in offered, offered
        # complete ANONYMOUS, then AMQP on the same socket
        raw.send(rawamqp.sasl_init_frame("ANONYMOUS", b"anonymous"))
        raw.read_until(lambda c: any(f.code == rawamqp.SASL_OUTCOME for f in c.frames()), 5)
        outcome = [f for f in raw.frames() if f.code == rawamqp.SASL_OUTCOME]
        assert outcome and outcome[0].fields[0] == 0, outcome  # 0 = ok
        raw.data.clear()
        raw.handshake()
    finally:
        raw.close()


# ------------------------------------------------- refused address types --

@pytest.mark.parametrize("address,role", [("q/queue1", "receiver"), ("q/queue1", "sender"),
                                          ("topic/t1", "receiver")])
def test_brokered_address_without_a_broker_is_refused(router_factory, address, role):
    # `enmesh router` without a data directory runs no broker shard.
    from conftest import MULTICAST_CONFIG
    r = router_factory(MULTICAST_CONFIG, mode="router")
    c = connect(r.amqp_url)
    try:
        t0 = time.monotonic()
        with pytest.raises(LinkDetached) as ei:
            if role == "receiver":
                c.create_receiver(address, credit=1)
            else:
                c.create_sender(address)
        assert time.monotonic() - t0 < 5, "refusal took too long"
        assert ei.value.condition == "amqp:not-implemented", str(ei.value)
        # the connection itself is fine afterwards
        _round_trip(c, "after/refusal")
    finally:
        close_quietly(c)


# ------------------------------------------------------------ SIGTERM --

def test_sigterm_closes_connections_with_forced_and_exits_0(router):
    c = connect(router.amqp_url)
    c2 = connect(router.amqp_url)
    try:
        c.create_receiver("sigterm/addr", credit=5)
        c2.create_sender(None)
        run_for([c, c2], 0.2)
        router.expected_exit = True
        router.proc.send_signal(signal.SIGTERM)
        conds = {}
        for conn in (c, c2):
            try:
                pump([conn], lambda: conn.conn.state & Endpoint.REMOTE_CLOSED or conn.disconnected,
                     timeout=10, what="connection close after SIGTERM")
            except ConnectionClosed as e:
                conds[id(conn)] = e.condition
            else:
                rc = conn.conn.remote_condition
                conds[id(conn)] = rc.name if rc else ("disconnected: %s" % conn.disconnected)
        assert list(conds.values()) == ["amqp:connection:forced"] * 2, conds
        rc = router.proc.wait(10)
        assert rc == 0, "router exit code %s after SIGTERM\n%s" % (rc, router.stderr_tail())
    finally:
        close_quietly(c, c2)


def test_sigterm_with_no_connections_exits_0(router):
    router.expected_exit = True
    router.proc.send_signal(signal.SIGTERM)
    assert router.proc.wait(10) == 0


# ---------------------------------------------------------------- CLI --

def _cli(*args, timeout=20):
    return subprocess.run([enmesh_bin(), *args], capture_output=True, text=True, timeout=timeout)


def test_cli_send_and_receive(router):
    recv = subprocess.Popen([enmesh_bin(), "receive", "--url", router.amqp_url, "--address", "cli/q",
                             "--count", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            _, links = http_json("GET", router.http_url + "/api/v1/links")
            if any(lk.get("address") == "cli/q" and lk.get("role") == "receiver" for lk in links):
                break
            assert recv.poll() is None, "enmesh receive exited early: %s" % recv.stderr.read()
            assert time.monotonic() < deadline, "enmesh receive never attached"
            time.sleep(0.1)
        sent = _cli("send", "--url", router.amqp_url, "--address", "cli/q", "--count", "3", "--body", "hello-cli")
        assert sent.returncode == 0, sent.stderr
        out, err = recv.communicate(timeout=10)
        assert recv.returncode == 0, err
        assert out.splitlines() == ["hello-cli"] * 3, out
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def test_cli_address_commands(router):
    r = _cli("address", "create", "cli-mc", "--type", "multicast", "--http", router.http_url)
    assert r.returncode == 0, r.stderr
    r = _cli("address", "list", "--http", router.http_url)
    assert r.returncode == 0, r.stderr
    assert "cli-mc" in r.stdout and "multicast" in r.stdout, r.stdout
    r = _cli("address", "delete", "cli-mc", "--http", router.http_url)
    assert r.returncode == 0, r.stderr
    _, addrs = http_json("GET", router.http_url + "/api/v1/addresses")
    assert not [a for a in addrs if a.get("name") == "cli-mc"], addrs


# ------------------------------------------------------------- limits --

def test_max_links_per_connection(configured_router):
    r = configured_router("router:\n  limits:\n    max_links_per_connection: 5\n")
    c = connect(r.amqp_url)
    try:
        for i in range(5):
            c.create_receiver("limits/links/%d" % i, credit=1)
        t0 = time.monotonic()
        with pytest.raises((LinkDetached, ConnectionClosed)) as ei:
            c.create_receiver("limits/links/5", credit=1)
            pump([c], lambda: False, timeout=5, what="refusal of the 6th link")
        assert time.monotonic() - t0 < 5
        assert ei.value.condition == "amqp:resource-limit-exceeded", str(ei.value)
    finally:
        close_quietly(c)


def test_max_connections(configured_router):
    r = configured_router("router:\n  limits:\n    max_connections: 3\n")
    conns = [rawamqp.RawConnection.to(r.amqp_addr) for _ in range(3)]
    extra = None
    try:
        for rc in conns:
            rc.handshake()
        extra = rawamqp.RawConnection.to(r.amqp_addr)
        extra.try_send(rawamqp.AMQP_HEADER + rawamqp.open_frame("one-too-many"))
        extra.read_until(lambda x: x.eof or x.has_frame(rawamqp.CLOSE), 5)
        closes = [f for f in extra.frames() if f.code == rawamqp.CLOSE]
        assert extra.eof or closes, "4th connection accepted with max_connections 3: %r" % extra.frames()
        if closes:
            assert closes[0].condition == "amqp:resource-limit-exceeded", closes[0]
        extra.close()
        extra = None
        # freeing a slot lets a new connection in
        conns.pop().close()
        deadline = time.monotonic() + 5
        while True:
            again = rawamqp.RawConnection.to(r.amqp_addr)
            try:
                again.try_send(rawamqp.AMQP_HEADER + rawamqp.open_frame("after-free"))
                again.read_until(lambda x: x.eof or x.has_frame(rawamqp.OPEN), 3)
                if again.has_frame(rawamqp.OPEN) and not again.has_frame(rawamqp.CLOSE):
                    break
            finally:
                again.close()
            assert time.monotonic() < deadline, "no connection accepted after one was closed"
            time.sleep(0.2)
    finally:
        for rc in conns:
            rc.close()
        if extra:
            extra.close()


def test_max_sessions_per_connection(configured_router):
    r = configured_router("router:\n  limits:\n    max_sessions_per_connection: 2\n")
    raw = rawamqp.RawConnection.to(r.amqp_addr)
    try:
        raw.handshake()
        for ch in range(3):
            raw.try_send(rawamqp.begin_frame(channel=ch))
        raw.read_until(lambda x: x.eof or any(f.code in (rawamqp.CLOSE, rawamqp.END) for f in x.frames())
                       or sum(1 for f in x.frames() if f.code == rawamqp.BEGIN) >= 3, 5)
        begins = [f for f in raw.frames() if f.code == rawamqp.BEGIN]
        errors = [f for f in raw.frames() if f.code in (rawamqp.CLOSE, rawamqp.END) and f.condition]
        assert len(begins) <= 2, "3 sessions accepted with max_sessions_per_connection 2: %r" % raw.frames()
        assert errors or raw.eof, "third session neither refused nor connection closed: %r" % raw.frames()
    finally:
        raw.close()
