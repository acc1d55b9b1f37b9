"""Durability the hard way: a producer and a consumer under load while the whole standalone
process is killed with SIGKILL and restarted, again and again; then an audit by sequence number.

- Every message the producer saw `accepted` is delivered at least once (invariant 1).
- No message is delivered after its acknowledgement was confirmed (invariant 2). The consumer
  settles second (rcv-settle-mode second): the router settles a delivery only once the
  acknowledgement is durable, so a confirmed acknowledgement cannot be lost in a crash.
  Acknowledgements cut off by a crash before confirmation may be redelivered (at least once).

ENMESH_CRASH_CYCLES sets the number of kill/restart cycles (default 20).
"""

import os
import random
import time

import pytest

from proton import Delivery, Message

from conftest import Router
from helpers import SettleSecond, available, close_quietly, connect, drop, pump, send_async, take

# Frequent snapshots and small segments: restarts load snapshots and compaction runs under load.
CONFIG = """\
broker:
  snapshot_every: 500
  segment_bytes: 65536
addresses:
  - prefix: "q/"
    type: queue
"""


@pytest.mark.timeout(240)
def test_kill_9_under_load_loses_nothing_and_never_redelivers_confirmed_acks(tmp_path):
    cycles = int(os.environ.get("ENMESH_CRASH_CYCLES", "20"))
    rng = random.Random(1234)
    accepted, confirmed = set(), set()
    delivered = {}
    violations = []
    seq = 0

    def consume(c, rcv, acking):
        while available(rcv):
            m, d = take(rcv)
            n = int(m.body)
            if n in confirmed:
                violations.append(n)
            delivered[n] = delivered.get(n, 0) + 1
            d.update(Delivery.ACCEPTED)  # outcome sent, not settled: we settle second
            acking.append((n, d))
            rcv.link.flow(1)
        for n, d in list(acking):
            if d.settled:  # the router settled: the acknowledgement is durable
                confirmed.add(n)
                d.settle()
                acking.remove((n, d))

    for cycle in range(cycles):
        r = Router(config=CONFIG, tmpdir=tmp_path, name="crash")
        p = c = None
        try:
            t0 = time.monotonic()
            p = connect(r.amqp_url, timeout=5)
            c = connect(r.amqp_url, timeout=5)
            snd = p.create_sender("q/audit")
            rcv = c.create_receiver("q/audit", credit=64, options=SettleSecond())
            pending, acking = [], []
            for _ in range(rng.randint(5, 25)):
                for _ in range(20):
                    pending.append((seq, send_async(snd, Message(body=str(seq)))))
                    seq += 1
                pump([p, c], timeout=0.02, raise_on_timeout=False)
                for n, d in list(pending):
                    if d.remote_state == Delivery.ACCEPTED:
                        accepted.add(n)
                        pending.remove((n, d))
                consume(c, rcv, acking)
            # One more burst, and the kill lands while it is on its way.
            for _ in range(20):
                pending.append((seq, send_async(snd, Message(body=str(seq)))))
                seq += 1
            pump([p, c], timeout=rng.uniform(0.001, 0.005), raise_on_timeout=False)
            for n, d in list(pending):
                if d.remote_state == Delivery.ACCEPTED:
                    accepted.add(n)
            consume(c, rcv, acking)
        finally:
            r.kill()  # SIGKILL in the middle of traffic
            drop(p, c)
            print("cycle %d: %.2fs sent=%d accepted=%d confirmed=%d"
                  % (cycle, time.monotonic() - t0, seq, len(accepted), len(confirmed)), flush=True)

    # Final run: drain everything that is left.
    r = Router(config=CONFIG, tmpdir=tmp_path, name="crash")
    try:
        c = connect(r.amqp_url, timeout=5)
        rcv = c.create_receiver("q/audit", credit=256, options=SettleSecond())
        acking = []
        idle = 0
        while idle < 10:
            before = len(delivered), len(confirmed)
            pump([c], timeout=0.1, raise_on_timeout=False)
            consume(c, rcv, acking)
            idle = idle + 1 if (len(delivered), len(confirmed)) == before else 0
        close_quietly(c)
    finally:
        r.close()

    missing = sorted(accepted - set(delivered))
    redelivered = sum(n - 1 for n in delivered.values())
    print("\ncrash audit: cycles=%d sent=%d accepted=%d delivered=%d confirmed=%d "
          "redeliveries=%d missing=%d violations=%d"
          % (cycles, seq, len(accepted), len(delivered), len(confirmed), redelivered,
             len(missing), len(violations)))
    assert accepted, "no message was accepted: the test did not exercise anything"
    assert not missing, "accepted messages lost: %s" % missing[:20]
    assert not violations, "delivered again after a confirmed acknowledgement: %s" % violations[:20]
