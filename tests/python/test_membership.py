"""Membership changes with real processes: three `enmesh broker`s (2 shards x 3 replicas) and a
router; a fourth broker joins (`join: true`, no replica yet) and `enmesh cluster drain` moves
every replica off broker 1 onto it while a producer keeps writing. Then brokers 1 and 2 are
SIGKILLed: the shards live on brokers 3 and 4, a majority of each group, so broker 4 must
hold the data. Audit: every message the producer saw accepted is delivered, once; the router
(configured with brokers 1-3 only) finds leaders on broker 4 through the membership's
addresses. python-qpid-proton on the client side."""

import json
import subprocess
import threading
import time

import pytest
from proton import Delivery, Message

from conftest import Router, enmesh_bin
from helpers import available, close_quietly, connect, pump, send_async, settle, take
from test_cluster import ClusterBroker, free_ports


def yaml(ports, ids, node_id=None, join=False, placement=False):
    lines = ["broker:"]
    if placement:
        lines += ["  placement:", "    q/a: 0", "    q/b: 1"]
    lines.append("  cluster:")
    if node_id is not None:
        lines.append("    node_id: %d" % node_id)
    if join:
        lines.append("    join: true")
    lines += ["    shards: 2", "    replicas: 3", "    brokers:"]
    for i in ids:
        lines.append('      %d: {raft: "127.0.0.1:%d", client: "127.0.0.1:%d"}'
                     % (i, ports[2 * (i - 1)], ports[2 * (i - 1) + 1]))
    return "\n".join(lines) + "\n"


class Member(ClusterBroker):
    def __init__(self, tmpdir, ports, node_id, ids, join=False):
        self.ids, self.join = ids, join
        super().__init__(tmpdir, ports, node_id)

    def start(self):
        cfg = self.tmpdir / ("b%d.yaml" % self.node_id)
        cfg.write_text(yaml(self.ports, self.ids, self.node_id, self.join))
        self._stderr = open(self.tmpdir / ("b%d.stderr.log" % self.node_id), "ab")
        self.proc = subprocess.Popen(
            [enmesh_bin(), "broker", "--config", str(cfg),
             "--data", str(self.tmpdir / ("b%d-data" % self.node_id))],
            stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()


def status(cli_cfg):
    out = subprocess.run([enmesh_bin(), "cluster", "status", "--config", str(cli_cfg)],
                         capture_output=True, text=True, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.timeout(300)
def test_drain_a_broker_onto_a_new_one_under_load(tmp_path):
    ports = free_ports(8)
    brokers = [Member(tmp_path, ports, i, [1, 2, 3]) for i in (1, 2, 3)]
    for b in brokers:
        b.wait_ready()
    router_cfg = yaml(ports, [1, 2, 3], placement=True) + \
        'addresses:\n  - prefix: "q/"\n    type: queue\n'
    r = Router(config=router_cfg, tmpdir=tmp_path, name="router", mode="router")
    cli_cfg = tmp_path / "cluster.yaml"
    cli_cfg.write_text(yaml(ports, [1, 2, 3, 4]))
    accepted, seq = set(), [0]
    p = connect(r.amqp_url)
    senders = {a: p.create_sender(a) for a in ("q/a", "q/b")}
    pending = []

    def produce(n):
        for _ in range(n):
            for a, s in senders.items():
                body = "%s-%d" % (a, seq[0])
                pending.append((body, send_async(s, Message(body=body))))
            seq[0] += 1
        pump([p], timeout=0.05, raise_on_timeout=False)
        for body, d in list(pending):
            if d.remote_state == Delivery.ACCEPTED:
                accepted.add(body)
                pending.remove((body, d))
            elif d.remote_state:
                pending.remove((body, d))

    try:
        for _ in range(20):
            produce(10)
        b4 = Member(tmp_path, ports, 4, [1, 2, 3, 4], join=True)
        brokers.append(b4)
        b4.wait_ready()
        drain = subprocess.Popen([enmesh_bin(), "cluster", "drain", "--broker", "1",
                                  "--config", str(cli_cfg)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while drain.poll() is None:
            produce(5)
        out, err = drain.communicate()
        print(out)
        assert drain.returncode == 0, out + err
        for _ in range(20):
            produce(10)
        # Broker 1 holds nothing; broker 4 is a voter of both shards.
        st = {s["broker"]: s for s in status(cli_cfg) if "shards" in s}
        assert st[1]["shards"] == [], st[1]
        assert sorted(s["shard"] for s in st[4]["shards"]) == [0, 1], st[4]
        for s in st[4]["shards"]:
            assert sorted(s["voters"]) == [2, 3, 4], s
        assert not list((tmp_path / "b1-data").glob("shard-*")), "broker 1 kept a copy"

        # Brokers 1 and 2 die: brokers 3 and 4 are a majority of both groups.
        brokers[0].kill()
        brokers[1].kill()
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            produce(0)
            time.sleep(0.05)
        assert not pending, "outcomes never came: %s" % [b for b, _ in pending][:10]

        c = connect(r.amqp_url)
        rcvs = [c.create_receiver(a, credit=500) for a in ("q/a", "q/b")]
        got, twice, idle = set(), [], 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (idle < 30 or not accepted <= got):
            pump([c], timeout=0.1, raise_on_timeout=False)
            before = len(got)
            for rcv in rcvs:
                while available(rcv):
                    m, d = take(rcv)
                    if m.body in got:
                        twice.append(m.body)
                    got.add(m.body)
                    settle(d)
            idle = idle + 1 if len(got) == before else 0
        missing = sorted(accepted - got)
        print("membership audit: sent=%d accepted=%d delivered=%d missing=%d duplicates=%d"
              % (2 * seq[0], len(accepted), len(got), len(missing), len(twice)))
        assert accepted
        assert not missing, "accepted messages lost: %s" % missing[:20]
        assert not twice, "delivered twice: %s" % twice[:20]
        close_quietly(p, c)
    finally:
        r.close()
        for b in brokers:
            b.close()
