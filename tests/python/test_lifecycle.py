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
def test_attach_to_unimplemented_address_type_is_refused(mc_router, address, role):
    c = connect(mc_router.amqp_url)
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
