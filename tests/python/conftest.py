"""Fixtures that start the enmesh router binary for the acceptance tests.

The binary is $ENMESH_BIN if set, else <repo>/target/debug/enmesh. It is
started as

    enmesh standalone --listen 127.0.0.1:0 --http 127.0.0.1:0 [--config FILE]

and the fixture waits for the single stdout line

    enmesh ready amqp=127.0.0.1:PORT http=127.0.0.1:PORT
"""

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
READY_RE = re.compile(r"enmesh ready amqp=(\S+):(\d+) http=(\S+):(\d+)")
MQTT_RE = re.compile(r"enmesh mqtt listening mqtt=(\S+):(\d+)")
MQTT_WS_RE = re.compile(r"enmesh mqtt-ws listening ws=(\S+):(\d+)")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

sys.path.insert(0, str(HERE))


def enmesh_bin() -> str:
    return os.environ.get("ENMESH_BIN") or str(REPO / "target" / "debug" / "enmesh")


def raise_nofile(want: int = 20000) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards `want`; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Router:
    """A running enmesh process."""

    def __init__(self, config: str = None, extra_args=(), tmpdir: Path = None, name="router", mode="standalone"):
        self.tmpdir = Path(tmpdir or tempfile.mkdtemp(prefix="enmesh-test-"))
        self.name = name
        self.config_path = None
        args = [enmesh_bin(), mode, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]
        if mode == "standalone":
            # Each standalone router keeps its broker shard's data in its own directory, and
            # serves MQTT on a port of its own (printed before the ready line).
            args += ["--data", str(self.tmpdir / ("%s-data" % name)), "--mqtt", "127.0.0.1:0",
                     "--mqtt-ws", "127.0.0.1:0"]
        if config is not None:
            self.config_path = self.tmpdir / ("%s.yaml" % name)
            self.config_path.write_text(config)
            args += ["--config", str(self.config_path)]
        args += list(extra_args)
        self.args = args
        self.stderr_path = self.tmpdir / ("%s.stderr.log" % name)
        self.stdout_lines = []
        self.amqp_host = self.http_host = None
        self.amqp_port = self.http_port = None
        self.mqtt_port = None
        self.mqtt_ws_port = None
        self._ready = threading.Event()
        self._stderr = open(self.stderr_path, "wb")
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=env)
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_TIMEOUT):
            self.kill()
            msg = ("router did not print its ready line within %ss\nargs: %s\nstdout: %r\n%s"
                   % (START_TIMEOUT, args, self.stdout_lines, self.stderr_tail()))
            self._stderr.close()
            raise RuntimeError(msg)
        if self.amqp_port is None:
            self.kill()
            msg = ("router exited before ready (rc=%s)\nargs: %s\nstdout: %r\n%s"
                   % (self.proc.returncode, args, self.stdout_lines, self.stderr_tail()))
            self._stderr.close()
            raise RuntimeError(msg)

    def _read_stdout(self):
        for raw in self.proc.stdout:  # keeps draining after ready so the pipe never fills
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            if not self._ready.is_set():
                mq = MQTT_RE.search(line)
                if mq:
                    self.mqtt_port = int(mq.group(2))
                ws = MQTT_WS_RE.search(line)
                if ws:
                    self.mqtt_ws_port = int(ws.group(2))
                m = READY_RE.search(line)
                if m:
                    self.amqp_host, self.amqp_port = m.group(1), int(m.group(2))
                    self.http_host, self.http_port = m.group(3), int(m.group(4))
                    self._ready.set()
        self._ready.set()  # EOF: process gone

    # addresses -----------------------------------------------------------
    @property
    def amqp_url(self) -> str:
        return "amqp://%s:%d" % (self.amqp_host, self.amqp_port)

    @property
    def amqp_addr(self):
        return (self.amqp_host, self.amqp_port)

    @property
    def http_url(self) -> str:
        return "http://%s:%d" % (self.http_host, self.http_port)

    # lifecycle -------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, n: int = 60) -> str:
        try:
            if not self._stderr.closed:
                self._stderr.flush()
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no stderr)"
        return "---- router stderr (last %d lines of %s) ----\n%s" % (n, self.stderr_path, "\n".join(lines[-n:]))

    def terminate(self, timeout: float = STOP_TIMEOUT):
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def close(self):
        self.terminate()
        self._reader.join(2)
        try:
            self.proc.stdout.close()
        except OSError:
            pass
        self._stderr.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def router_factory(request, tmp_path):
    """Callable: router_factory(config_yaml=None, extra_args=()) -> Router.

    Every router started is stopped at teardown. A router that died on its own
    during the test (crash/panic) fails the test; its stderr is shown when the
    test failed.
    """
    routers = []

    def start(config: str = None, extra_args=(), mode="standalone"):
        r = Router(config=config, extra_args=extra_args, tmpdir=tmp_path, name="router%d" % len(routers),
                   mode=mode)
        routers.append(r)
        return r

    yield start

    died = []
    for r in routers:
        if r.proc.poll() is not None and not getattr(r, "expected_exit", False):
            died.append(r)
        r.close()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed or died:
        for r in routers:
            sys.stderr.write("\n%s\n" % r.stderr_tail())
    if died:
        pytest.fail("router exited unexpectedly during the test (rc=%s)\n%s"
                    % ([r.proc.returncode for r in died], died[0].stderr_tail()), pytrace=False)


@pytest.fixture
def router(router_factory):
    """A standalone router with default configuration."""
    return router_factory()


@pytest.fixture
def configured_router(router_factory):
    """Callable: configured_router(yaml_string) -> Router started with --config."""
    return router_factory


MULTICAST_CONFIG = """\
router:
  id: test-multicast
addresses:
  - prefix: "mc/"
    type: multicast
  - name: "orders"
    type: anycast
  - pattern: "sensors/*/temp"
    type: multicast
  - pattern: "logs/#"
    type: multicast
  - name: "q/queue1"
    type: queue
  - prefix: "topic/"
    type: topic
"""


@pytest.fixture
def mc_router(router_factory):
    """A router whose config declares prefix `mc/` (and pattern sensors/*/temp) multicast,
    q/queue1 a queue and prefix topic/ a topic."""
    return router_factory(MULTICAST_CONFIG)
