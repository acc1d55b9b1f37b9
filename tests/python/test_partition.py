"""A network partition with real network namespaces: three `enmesh broker`s, each in its own
namespace on its own veth address behind a bridge, and two routers: one in the root namespace
(with the majority after the cut) and one inside the namespace of the broker that gets cut off.
Cutting a broker off (its veth taken down: no packet in or out, addresses on this machine only):

- the minority side accepts no write for the shards it led (invariant 6): a producer on the
  router inside the cut-off namespace sees no `accepted` while the cut lasts;
- the majority elects new leaders and goes on: writes through the root router resume;
- after the heal, the old leader catches up: everything the majority accepted is delivered,
  exactly once. The minority leader's uncommitted entries are cut from its log; the router
  inside still holds those messages (within its resume window) and, once it reaches the
  majority's leader, sends them there, deduplicated: such a message may be delivered, once,
  as if its producer had resent it.

Needs root and `ip netns` (as CI has); python-qpid-proton on the client side.
"""

import os
import shutil
import sys
import subprocess
import threading
import time
from pathlib import Path

import pytest
from proton import Delivery, Message

from conftest import enmesh_bin
from helpers import ServerProcess, available, close_quietly, connect, pump, send_async, settle, take

PREFIX = "enmp%d" % (os.getpid() % 10000)
BRIDGE = PREFIX + "br"
NET = "10.%d.%d" % (100 + os.getpid() % 100, os.getpid() % 200)


def sh(*args, check=True):
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def ns(i):
    return "%sn%d" % (PREFIX, i)


def veth(i):
    return "%sv%d" % (PREFIX, i)


def setup_network():
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", NET + ".254/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for i in (1, 2, 3):
        sh("ip", "netns", "add", ns(i))
        sh("ip", "link", "add", veth(i), "type", "veth", "peer", "name", "eth0", "netns", ns(i))
        sh("ip", "link", "set", veth(i), "master", BRIDGE)
        sh("ip", "link", "set", veth(i), "up")
        sh("ip", "netns", "exec", ns(i), "ip", "addr", "add", "%s.%d/24" % (NET, i), "dev", "eth0")
        sh("ip", "netns", "exec", ns(i), "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns(i), "ip", "link", "set", "lo", "up")


def teardown_network():
    for i in (1, 2, 3):
        sh("ip", "netns", "del", ns(i), check=False)
        sh("ip", "link", "del", veth(i), check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def cluster_yaml(node_id=None):
    lines = ["broker:", "  cluster:"]
    if node_id is not None:
        lines.append("    node_id: %d" % node_id)
    lines += ["    shards: 3", "    replicas: 3", "    brokers:"]
    for i in (1, 2, 3):
        lines.append('      %d: {raft: "%s.%d:5900", client: "%s.%d:5800"}' % (i, NET, i, NET, i))
    return "\n".join(lines) + "\n"


class Proc(ServerProcess):
    """A process started inside a namespace (or the root one), ready once `marker` is printed."""

    def __init__(self, args, marker, log: Path, netns=None):
        if netns:
            args = ["ip", "netns", "exec", netns] + args
        self._stderr = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL)
        self.lines = []
        self._ready = threading.Event()
        self.marker = marker
        threading.Thread(target=self._read, daemon=True).start()
        assert self._ready.wait(40) and self.proc.poll() is None, \
            "%s did not start: %s" % (args, log.read_text(errors="replace")[-2000:])

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            if self.marker in line:
                self._ready.set()
        self._ready.set()


# Runs inside the cut-off namespace: sends 20 messages through the router there and prints
# each outcome that arrives within 6 s.
MINORITY_PRODUCER = '''
import sys, time
from proton import Message
from proton.utils import BlockingConnection
c = BlockingConnection(sys.argv[1], timeout=5)
s = c.create_sender("q/part")
ds = [s.link.send(Message(body="minority-%d" % i)) for i in range(20)]
c.container.timeout = 0.05
deadline = time.time() + 6
while time.time() < deadline:
    c.container.process()
for d in ds:
    if d.remote_state == d.ACCEPTED:
        print("ACCEPTED", d.tag)
    else:
        print("NOT", d.remote_state)
'''


def router_url(p: Proc):
    for line in p.lines:
        if "enmesh ready amqp=" in line:
            return "amqp://" + line.split("amqp=")[1].split()[0]
    raise AssertionError("no ready line")


@pytest.mark.timeout(240)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                    reason="needs root and iproute2 for network namespaces")
def test_partition_minority_accepts_nothing_majority_goes_on_old_leader_catches_up(tmp_path):
    teardown_network()
    setup_network()
    procs = []
    try:
        for i in (1, 2, 3):
            cfg = tmp_path / ("b%d.yaml" % i)
            cfg.write_text(cluster_yaml(i))
            procs.append(Proc([enmesh_bin(), "broker", "--config", str(cfg),
                               "--data", str(tmp_path / ("b%d" % i))],
                              "enmesh broker ready", tmp_path / ("b%d.log" % i), ns(i)))
        rcfg = tmp_path / "router.yaml"
        rcfg.write_text(cluster_yaml() + 'addresses:\n  - prefix: "q/"\n    type: queue\n')
        main = Proc([enmesh_bin(), "router", "--config", str(rcfg), "--listen", "127.0.0.1:0",
                     "--http", "127.0.0.1:0"], "enmesh ready", tmp_path / "main.log")
        procs.append(main)
        # Broker 1 initialised every shard's group it is in, so it leads some: cut it off.
        cut = 1
        inside = Proc([enmesh_bin(), "router", "--config", str(rcfg), "--listen",
                       "127.0.0.1:0", "--http", "127.0.0.1:0"], "enmesh ready",
                      tmp_path / "inside.log", ns(cut))
        procs.append(inside)

        p = connect(router_url(main))
        snd = p.create_sender("q/part")
        accepted = set()

        def send(conn, sender, bodies, wait=5.0):
            ds = [(b, send_async(sender, Message(body=b))) for b in bodies]
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(d.remote_state is None or d.remote_state == 0
                                                      for _, d in ds):
                pump([conn], timeout=0.05, raise_on_timeout=False)
            return [(b, d.remote_state) for b, d in ds]

        for b, st in send(p, snd, ["before-%d" % i for i in range(50)]):
            if st == Delivery.ACCEPTED:
                accepted.add(b)
        assert len(accepted) == 50

        sh("ip", "link", "set", veth(cut), "down")
        cut_at = time.monotonic()

        # Minority: a producer inside the cut-off namespace, on the router there; nothing it
        # sends during the cut may be accepted (invariant 6).
        minority = subprocess.Popen(["ip", "netns", "exec", ns(cut), sys.executable, "-c",
                                     MINORITY_PRODUCER, router_url(inside)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        # Meanwhile the majority: writes resume through the root router.
        resumed = None
        n = 0
        while time.monotonic() - cut_at < 20:
            outcome = send(p, snd, ["during-%d" % n], wait=1.0)
            n += 1
            if outcome[0][1] == Delivery.ACCEPTED:
                accepted.add(outcome[0][0])
                resumed = resumed or time.monotonic() - cut_at
                if n >= 40:
                    break
        assert resumed is not None, "the majority never accepted a write after the cut"
        print("\npartition: majority accepting again %.2fs after the cut" % resumed)
        out, err = minority.communicate(timeout=30)
        assert minority.returncode == 0, err[-2000:]
        wrongly = [line for line in out.splitlines() if line.startswith("ACCEPTED")]
        assert not wrongly, "the cut-off side accepted writes: %s" % wrongly
        assert len(out.splitlines()) == 20, out

        # Heal; the old leader catches up, and everything accepted is there, exactly the majority's.
        sh("ip", "link", "set", veth(cut), "up")
        time.sleep(3)
        c = connect(router_url(main))
        rcv = c.create_receiver("q/part", credit=200)
        got, twice = set(), []
        deadline = time.monotonic() + 20
        idle = 0
        while time.monotonic() < deadline and idle < 15:
            try:
                pump([c], timeout=0.1, raise_on_timeout=False)
            except Exception:
                rcv = c.create_receiver("q/part", credit=200)
            before = len(got)
            while available(rcv):
                m, d = take(rcv)
                if m.body in got:
                    twice.append(m.body)
                got.add(m.body)
                settle(d)
            idle = idle + 1 if len(got) == before else 0
        missing = sorted(accepted - got)
        leaked = sorted(b for b in got if b.startswith("minority-"))
        print("partition audit: accepted=%d delivered=%d missing=%d duplicates=%d "
              "minority-resent-after-heal=%d"
              % (len(accepted), len(got), len(missing), len(twice), len(leaked)))
        assert not missing, "accepted messages lost across the partition: %s" % missing[:10]
        assert not twice, "delivered more than once: %s" % twice[:10]
        # (A majority write whose outcome did not come within its second may be stored too.)
        sent = accepted | {"during-%d" % i for i in range(n)}
        unknown = sorted(got - sent - set(leaked))
        assert not unknown, "delivered but never sent: %s" % unknown[:10]
        close_quietly(p, c)
    finally:
        for pr in reversed(procs):
            pr.close()
        teardown_network()
