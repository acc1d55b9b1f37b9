"""Chaos with replicated shards: three `enmesh broker` processes (3 shards, 3 replicas each)
behind one `enmesh router`; a producer and a consumer under load through the router while the
brokers are SIGKILLed in turn (so every shard loses its leader again and again) and restarted.
Audit by sequence number at the end (python-qpid-proton):

- every message the producer saw `accepted` is delivered at least once (invariant 1);
- no message is delivered after its acknowledgement was confirmed (invariant 2; the consumer
  settles second, so a confirmed acknowledgement is committed on a majority);
- the time from each kill to the next accepted message is reported (writes resumed);
- clients notice nothing: the consumer's link stays attached, no message is refused, and none
  is delivered twice (the router resumes its consumers at the new leader and resends what was
  in doubt, deduplicated by the shard).

ENMESH_CHAOS_CYCLES sets the number of kills (default 6).

The same audit runs while the leadership of the audited queue's shard is handed from broker to
broker (`enmesh cluster lead`, Raft leader transfer: the old leader is alive and steps down with
requests in flight), ENMESH_LEAD_CYCLES times (default 6).
"""
import json

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from proton import Delivery, Message
from proton.utils import LinkDetached

from conftest import Router, enmesh_bin
from helpers import ServerProcess, SettleSecond, available, close_quietly, connect, http_json, pump, send_async, take

READY = re.compile(r"enmesh broker ready")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_yaml(ports, node_id=None):
    lines = ["broker:", "  cluster:"]
    if node_id is not None:
        lines.append("    node_id: %d" % node_id)
    lines += ["    shards: 3", "    replicas: 3", "    brokers:"]
    for i in range(3):
        lines.append('      %d: {raft: "127.0.0.1:%d", client: "127.0.0.1:%d"}'
                     % (i + 1, ports[2 * i], ports[2 * i + 1]))
    return "\n".join(lines) + "\n"


class ClusterBroker(ServerProcess):
    def __init__(self, tmpdir: Path, ports, node_id):
        self.tmpdir, self.ports, self.node_id = tmpdir, ports, node_id
        self.start()

    def start(self):
        cfg = self.tmpdir / ("b%d.yaml" % self.node_id)
        cfg.write_text(cluster_yaml(self.ports, self.node_id))
        self._stderr = open(self.tmpdir / ("b%d.stderr.log" % self.node_id), "ab")
        self.proc = subprocess.Popen(
            [enmesh_bin(), "broker", "--config", str(cfg),
             "--data", str(self.tmpdir / ("b%d-data" % self.node_id))],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            if READY.search(raw.decode("utf-8", "replace")):
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout=30):
        assert self._ready.wait(timeout) and self.proc.poll() is None, \
            "broker %d did not start" % self.node_id


@pytest.mark.timeout(300)
def test_brokers_killed_in_turn_under_load_lose_nothing(tmp_path):
    def kill_and_restart(cycle, brokers, step, resumes):
        victim = brokers[cycle % 3]
        victim.kill()
        killed = time.monotonic()
        resumed = None
        while time.monotonic() - killed < 10:
            if step() and resumed is None:
                resumed = time.monotonic() - killed
                break
        resumes.append(resumed)
        for _ in range(20):
            step()
        victim.start()
        victim.wait_ready()
        return "killed broker %d, writes resumed after %s" % (
            victim.node_id, "%.2fs" % resumed if resumed is not None else "never")

    audited_chaos(tmp_path, int(os.environ.get("ENMESH_CHAOS_CYCLES", "6")), kill_and_restart)


def cluster_cli(cfg, *args):
    return subprocess.run([str(enmesh_bin()), "cluster", "--config", str(cfg)] + list(args),
                          capture_output=True, text=True, timeout=60)


def test_leadership_handed_over_under_load_unnoticed(tmp_path):
    cfg = tmp_path / "cluster.yaml"
    state = {}

    def hand_over(cycle, brokers, step, resumes):
        cfg.write_text(cluster_yaml(brokers[0].ports))
        shard = state["audit_shard"]
        out = cluster_cli(cfg, "status").stdout
        leaders = {sh["shard"]: sh["leader"] for b in map(json.loads, out.splitlines())
                   for sh in b.get("shards", [])}
        to = next(b for b in (1 + (cycle + k) % 3 for k in range(3)) if b != leaders.get(shard))
        # Keep the load going while the CLI waits for the hand-over.
        proc = subprocess.Popen([str(enmesh_bin()), "cluster", "--config", str(cfg), "lead",
                                 "--shard", str(shard), "--to", str(to)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 30:
            step()
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, out
        resumed = None
        t = time.monotonic()
        while time.monotonic() - t < 10:
            if step():
                resumed = time.monotonic() - started
                break
        resumes.append(resumed)
        for _ in range(20):
            step()
        return "shard %d handed to broker %d: %s" % (shard, to, out.strip())

    audited_chaos(tmp_path, int(os.environ.get("ENMESH_LEAD_CYCLES", "6")), hand_over, state)


def audited_chaos(tmp_path, cycles, disrupt, state_out=None):
    """Three brokers and a router, a producer and a consumer on q/audit with a sequence audit;
    `disrupt(cycle, brokers, step, resumes)` runs `cycles` times under load."""
    ports = free_ports(6)
    brokers = [ClusterBroker(tmp_path, ports, i + 1) for i in range(3)]
    for b in brokers:
        b.wait_ready()
    router_cfg = (cluster_yaml(ports).replace("  cluster:", "  placement:\n    q/pinned: 2\n  cluster:")
                  + 'addresses:\n  - prefix: "q/"\n    type: queue\n  - prefix: "t/"\n    type: topic\n')
    r = Router(config=router_cfg, tmpdir=tmp_path, name="router", mode="router")
    # Placement is visible in the management API: an override, a hashed queue, the topic home.
    st, pinned = http_json("GET", r.http_url + "/api/v1/placement/q/pinned")
    assert st == 200 and pinned["shard"] == 2 and pinned["shards"] == 3, pinned
    st, audit = http_json("GET", r.http_url + "/api/v1/placement/q/audit")
    assert audit["type"] == "queue" and audit["shard"] in (0, 1, 2), audit
    if state_out is not None:
        state_out["audit_shard"] = audit["shard"]
    st, topic = http_json("GET", r.http_url + "/api/v1/placement/t/x")
    assert topic["shard"] == 0, topic
    st, anycast = http_json("GET", r.http_url + "/api/v1/placement/plain")
    assert anycast["type"] == "anycast" and anycast["shard"] is None, anycast
    accepted, confirmed, delivered = set(), set(), {}
    violations, resumes = [], []
    events = {"detached": 0, "refused": 0}
    seq = 0
    p = connect(r.amqp_url)
    c = connect(r.amqp_url)
    snd = p.create_sender("q/audit")
    state = {"rcv": None}
    pending, acking = [], []

    def receiver():
        if state["rcv"] is None:
            try:
                state["rcv"] = c.create_receiver("q/audit", credit=64, options=SettleSecond())
            except LinkDetached:
                state["rcv"] = None
        return state["rcv"]

    def step():
        """Send a burst, collect outcomes and deliveries; returns how many became accepted."""
        nonlocal seq
        got = 0
        for _ in range(10):
            pending.append((seq, send_async(snd, Message(body=str(seq)))))
            seq += 1
        try:
            pump([p, c], timeout=0.02, raise_on_timeout=False)
        except LinkDetached:
            events["detached"] += 1
            state["rcv"] = None  # the link was detached: reattach
            acking.clear()
        for n, d in list(pending):
            if d.remote_state == Delivery.ACCEPTED:
                accepted.add(n)
                got += 1
                pending.remove((n, d))
            elif d.remote_state is not None and d.remote_state != 0:
                events["refused"] += 1
                pending.remove((n, d))  # refused: not accepted
        consume()
        return got

    def consume():
        """Take what arrived, acknowledge it (settling second), record confirmations."""
        rcv = receiver()
        while rcv is not None and available(rcv):
            m, d = take(rcv)
            n = int(m.body)
            if n in confirmed:
                violations.append(n)
            delivered[n] = delivered.get(n, 0) + 1
            d.update(Delivery.ACCEPTED)
            acking.append((n, d))
            rcv.link.flow(1)
        for n, d in list(acking):
            if d.settled:
                confirmed.add(n)
                d.settle()
                acking.remove((n, d))

    try:
        for _ in range(30):
            step()
        for cycle in range(cycles):
            what = disrupt(cycle, brokers, step, resumes)
            for _ in range(30):
                step()
            print("cycle %d: %s, accepted=%d confirmed=%d"
                  % (cycle, what, len(accepted), len(confirmed)), flush=True)
        # Drain.
        idle = 0
        while idle < 20:
            before = len(delivered), len(confirmed)
            try:
                pump([p, c], timeout=0.1, raise_on_timeout=False)
            except LinkDetached:
                state["rcv"] = None
            consume()
            idle = idle + 1 if (len(delivered), len(confirmed)) == before else 0
    finally:
        close_quietly(p, c)
        r.close()
        for b in brokers:
            b.close()
    missing = sorted(accepted - set(delivered))
    twice = sorted(n for n, k in delivered.items() if k > 1)
    known = [x for x in resumes if x is not None]
    print("\nchaos audit: cycles=%d sent=%d accepted=%d delivered=%d confirmed=%d missing=%d "
          "violations=%d duplicates=%d detaches=%d refused=%d resume max=%s"
          % (cycles, seq, len(accepted), len(delivered), len(confirmed), len(missing),
             len(violations), len(twice), events["detached"], events["refused"],
             "%.2fs" % max(known) if known else "n/a"))
    assert accepted, "nothing was accepted"
    assert not missing, "accepted messages lost: %s" % missing[:20]
    assert not violations, "delivered again after a confirmed acknowledgement: %s" % violations[:20]
    assert all(x is not None for x in resumes), "writes never resumed: %s" % resumes
    assert events["detached"] == 0, "the consumer's link was detached %d times" % events["detached"]
    assert events["refused"] == 0, "%d messages were refused" % events["refused"]
    assert not twice, "delivered more than once: %s" % twice[:20]


@pytest.mark.timeout(180)
def test_topic_subscribers_across_a_leader_kill(tmp_path):
    """A durable and a non-durable subscriber on one topic while the topic's shard loses its
    leader (SIGKILL; ENMESH_TOPIC_KILLS times, default 1). The durable subscription (in the replicated log) loses nothing that was
    accepted; the non-durable one (held in memory on the leader, docs/router.md) is resumed on
    the new leader by the router without a detach and receives what is published from then on;
    neither gets a message twice."""
    from proton.reactor import DurableSubscription
    ports = free_ports(6)
    brokers = [ClusterBroker(tmp_path, ports, i + 1) for i in range(3)]
    for b in brokers:
        b.wait_ready()
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(cluster_yaml(ports))
    router_cfg = cluster_yaml(ports) + 'addresses:\n  - prefix: "t/"\n    type: topic\n'
    r = Router(config=router_cfg, tmpdir=tmp_path, name="router", mode="router")
    p, c = connect(r.amqp_url), connect(r.amqp_url)
    got = {"kept": [], "live": []}
    detached = []
    seq, accepted, pending, resumed = 0, [], [], []
    kills = int(os.environ.get("ENMESH_TOPIC_KILLS", "1"))
    try:
        kept = c.create_receiver("t/live", credit=500, name="kept",
                                 options=[DurableSubscription(), SettleSecond()])
        live = c.create_receiver("t/live", credit=500, name="live")
        snd = p.create_sender("t/live")

        def step():
            nonlocal seq
            for _ in range(5):
                pending.append((seq, send_async(snd, Message(body=str(seq)))))
                seq += 1
            try:
                pump([p, c], timeout=0.02, raise_on_timeout=False)
            except LinkDetached as e:
                detached.append(str(e))
            for n, d in list(pending):
                if d.remote_state == Delivery.ACCEPTED:
                    accepted.append(n)
                    pending.remove((n, d))
                elif d.remote_state is not None and d.remote_state != 0:
                    pending.remove((n, d))
            for name, rcv in (("kept", kept), ("live", live)):
                while available(rcv):
                    m, d = take(rcv)
                    got[name].append(int(m.body))
                    d.update(Delivery.ACCEPTED)
                    d.settle()
                    rcv.link.flow(1)

        for _ in range(40):
            step()
        before = len(accepted)
        assert before > 0
        for _ in range(kills):
            status = cluster_cli(cfg, "status").stdout
            leader = next(sh["leader"] for b in map(json.loads, status.splitlines())
                          for sh in b.get("shards", []) if sh["shard"] == 0 and sh.get("leader"))
            victim = brokers[leader - 1]
            victim.kill()
            killed, at = time.monotonic(), len(accepted)
            while len(accepted) < at + 200 and time.monotonic() - killed < 30:
                step()
            resumed.append(len(accepted) - at)
            victim.start()
            victim.wait_ready()
            for _ in range(20):
                step()
        after_kill = min(resumed)
        idle = 0
        while idle < 20:
            n = len(got["kept"]), len(got["live"])
            try:
                pump([p, c], timeout=0.1, raise_on_timeout=False)
            except LinkDetached as e:
                detached.append(str(e))
            for name, rcv in (("kept", kept), ("live", live)):
                while available(rcv):
                    m, d = take(rcv)
                    got[name].append(int(m.body))
                    d.update(Delivery.ACCEPTED)
                    d.settle()
            idle = idle + 1 if (len(got["kept"]), len(got["live"])) == n else 0
    finally:
        close_quietly(p, c)
        r.close()
        for b in brokers:
            b.close()
    print("\ntopic across leader kills: kills=%d accepted=%d (after each kill at least %d) "
          "kept=%d live=%d" % (kills, len(accepted), after_kill, len(got["kept"]), len(got["live"])))
    assert after_kill > 0, "publishing did not resume after a kill: %s" % resumed
    assert not detached, detached
    missing = sorted(set(accepted) - set(got["kept"]))
    assert not missing, "accepted messages lost by the durable subscription: %s" % missing[:20]
    for name in ("kept", "live"):
        assert len(got[name]) == len(set(got[name])), "%s got duplicates" % name
    # The in-memory subscription goes on after the kill.
    late = [n for n in got["live"] if n >= accepted[before]]
    assert late, "the non-durable subscriber received nothing after the leader was killed"
