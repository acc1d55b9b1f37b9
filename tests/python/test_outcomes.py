"""Consumer outcomes travel back to the producer; a dying consumer never strands deliveries."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from proton import Condition, Delivery, Message, symbol

from helpers import (close_quietly, connect, pump, receive_n, run_for, send_async, settle, state_name,
                     wait_outcomes)

HERE = Path(__file__).resolve().parent


def _one_through(router, address, consumer_action):
    """Send one unsettled message through `address`; the consumer applies consumer_action(delivery).
    Returns the producer's delivery once it has a terminal remote state."""
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver(address, credit=5)
        snd = prod.create_sender(address)
        run_for([prod, cons], 0.3)
        d = send_async(snd, Message(body="outcome test", properties={"k": "v"}))
        [(m, md)] = receive_n([prod, cons], rcv, 1)
        assert m.body == "outcome test"
        consumer_action(md)
        wait_outcomes([prod, cons], [d], what="outcome at the producer")
        run_for([prod, cons], 0.2)  # let any trailing settlement arrive
        return d
    finally:
        close_quietly(prod, cons)


def test_accept_propagates(router):
    def accept(md):
        md.update(Delivery.ACCEPTED)
        md.settle()

    d = _one_through(router, "outcome/accept", accept)
    assert d.remote_state == Delivery.ACCEPTED, state_name(d.remote_state)


def test_reject_with_condition_propagates(router):
    def reject(md):
        md.local.condition = Condition("amqp:precondition-failed", "consumer says no",
                                       {symbol("reason"): "test"})
        md.update(Delivery.REJECTED)
        md.settle()

    d = _one_through(router, "outcome/reject", reject)
    assert d.remote_state == Delivery.REJECTED, state_name(d.remote_state)
    cond = d.remote.condition
    assert cond is not None, "rejected outcome lost its error condition"
    assert cond.name == "amqp:precondition-failed"
    assert cond.description == "consumer says no"


def test_release_propagates(router):
    def release(md):
        md.update(Delivery.RELEASED)
        md.settle()

    d = _one_through(router, "outcome/release", release)
    assert d.remote_state == Delivery.RELEASED, state_name(d.remote_state)


def test_modify_with_flags_propagates(router):
    def modify(md):
        md.local.failed = True
        md.local.undeliverable = True
        md.update(Delivery.MODIFIED)
        md.settle()

    d = _one_through(router, "outcome/modify", modify)
    assert d.remote_state == Delivery.MODIFIED, state_name(d.remote_state)
    assert d.remote.failed is True
    assert d.remote.undeliverable is True


def test_modify_without_flags_propagates(router):
    def modify(md):
        md.local.failed = False
        md.local.undeliverable = False
        md.update(Delivery.MODIFIED)
        md.settle()

    d = _one_through(router, "outcome/modify2", modify)
    assert d.remote_state == Delivery.MODIFIED, state_name(d.remote_state)
    assert d.remote.failed is False
    assert d.remote.undeliverable is False


def test_mixed_outcomes_map_to_the_right_deliveries(router):
    """Several in-flight deliveries settled out of order get their own outcome each."""
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("outcome/mixed", credit=10)
        snd = prod.create_sender("outcome/mixed")
        run_for([prod, cons], 0.3)
        wanted = [Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED] * 2
        ds = [send_async(snd, Message(body=i)) for i in range(len(wanted))]
        got = receive_n([prod, cons], rcv, len(wanted))
        for m, md in reversed(got):  # settle in reverse order
            md.update(wanted[m.body])
            md.settle()
        wait_outcomes([prod, cons], ds)
        assert [d.remote_state for d in ds] == wanted, [state_name(d.remote_state) for d in ds]
    finally:
        close_quietly(prod, cons)


def _read_lines(proc, sink):
    for raw in proc.stdout:
        sink.append(raw.decode().strip())


def test_killed_consumer_with_unsettled_deliveries(router):
    """A consumer that dies (SIGKILL) holding unsettled deliveries: the producer's deliveries
    end up RELEASED or MODIFIED (delivery-failed), never left unsettled."""
    n = 5
    address = "outcome/killed"
    proc = subprocess.Popen([sys.executable, str(HERE / "unsettling_consumer.py"), router.amqp_url, address,
                             str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    t = threading.Thread(target=_read_lines, args=(proc, lines), daemon=True)
    t.start()
    prod = None
    try:
        deadline = time.monotonic() + 15
        while "attached" not in lines:
            assert proc.poll() is None, "consumer process died: %s" % proc.stderr.read().decode()
            assert time.monotonic() < deadline, "consumer process never attached"
            time.sleep(0.05)
        prod = connect(router.amqp_url)
        snd = prod.create_sender(address)
        ds = [send_async(snd, Message(body="unsettled %d" % i)) for i in range(n)]
        deadline = time.monotonic() + 15
        while "received %d" % n not in lines:
            assert proc.poll() is None, "consumer process died: %s" % proc.stderr.read().decode()
            assert time.monotonic() < deadline, "consumer never received its %d messages (%s)" % (n, lines)
            run_for([prod], 0.05)
        run_for([prod], 0.3)
        assert all(d.remote_state not in (Delivery.ACCEPTED, Delivery.REJECTED) for d in ds)

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        states = wait_outcomes([prod], ds, timeout=10, what="outcomes after the consumer was killed")
        for d, s in zip(ds, states):
            assert s in (Delivery.RELEASED, Delivery.MODIFIED), state_name(s)
            if s == Delivery.MODIFIED:
                assert d.remote.failed, "modified outcome for a delivery the consumer saw must set delivery-failed"
        run_for([prod], 0.3)
        assert all(d.settled for d in ds), "router did not settle the producer's deliveries"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        close_quietly(prod)


def _detaching_consumer(router, how):
    """The consumer holds unsettled deliveries, then goes away cleanly (`how`)."""
    n = 4
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("outcome/detach-" + how, credit=n)
        snd = prod.create_sender("outcome/detach-" + how)
        run_for([prod, cons], 0.3)
        ds = [send_async(snd, Message(body=i)) for i in range(n)]
        receive_n([prod, cons], rcv, n)  # never settled
        if how == "link":
            rcv.link.close()
            run_for([cons], 0.2)
        else:
            cons.close()
            cons = None
        states = wait_outcomes([prod, cons], ds, what="outcomes after the consumer went away (%s)" % how)
        for d, s in zip(ds, states):
            assert s in (Delivery.RELEASED, Delivery.MODIFIED), state_name(s)
            if s == Delivery.MODIFIED:
                assert d.remote.failed
        run_for([prod], 0.2)
        assert all(d.settled for d in ds)
    finally:
        close_quietly(prod, cons)


def test_consumer_detaching_link_with_unsettled(router):
    _detaching_consumer(router, "link")


def test_consumer_closing_connection_with_unsettled(router):
    _detaching_consumer(router, "connection")


def test_held_messages_go_to_a_consumer_that_attaches_later(router):
    """Messages the router holds (first consumer out of credit) go to a second consumer that attaches later."""
    prod = connect(router.amqp_url)
    c1 = connect(router.amqp_url)
    c2 = None
    try:
        r1 = c1.create_receiver("outcome/handover", credit=None)
        r1.link.flow(1)
        snd = prod.create_sender("outcome/handover")
        pump([prod, c1], lambda: snd.credit > 0, what="producer credit")
        ds = [send_async(snd, Message(body=i)) for i in range(3)]
        [(m0, d0)] = receive_n([prod, c1], r1, 1)
        settle(d0)
        pump([prod, c1], lambda: ds[0].remote_state in (Delivery.ACCEPTED,), what="first accepted")
        c2 = connect(router.amqp_url)
        r2 = c2.create_receiver("outcome/handover", credit=10)
        got = receive_n([prod, c1, c2], r2, 2, what="held messages at the second consumer")
        for _, d in got:
            settle(d)
        wait_outcomes([prod, c1, c2], ds)
        assert sorted(m.body for m, _ in got) == [1, 2]
        assert all(d.remote_state == Delivery.ACCEPTED for d in ds)
    finally:
        close_quietly(prod, c1, c2)


def test_producer_gone_before_consumer_settles(router):
    """The consumer settles deliveries whose producer already disconnected: the router must
    cope (no crash, no stuck state) and keep routing."""
    prod = connect(router.amqp_url)
    cons = connect(router.amqp_url)
    try:
        rcv = cons.create_receiver("outcome/orphaned", credit=10)
        snd = prod.create_sender("outcome/orphaned")
        run_for([prod, cons], 0.3)
        for i in range(3):
            send_async(snd, Message(body=i))
        got = receive_n([prod, cons], rcv, 3)
        prod.close()
        prod = None
        run_for([cons], 0.3)
        for _, d in got:
            settle(d, Delivery.ACCEPTED)
        run_for([cons], 0.3)
        assert router.alive()
        # routing on the same address still works
        prod = connect(router.amqp_url)
        snd = prod.create_sender("outcome/orphaned")
        d = send_async(snd, Message(body="again"))
        [(m, md)] = receive_n([prod, cons], rcv, 1, what="message after the orphaned settlements")
        settle(md)
        wait_outcomes([prod, cons], [d])
        assert m.body == "again" and d.remote_state == Delivery.ACCEPTED
    finally:
        close_quietly(prod, cons)
