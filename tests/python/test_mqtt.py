"""The MQTT gateway of `enmesh standalone` (issue 5), with paho-mqtt (3.1.1 and 5) and, on the
AMQP side, python-qpid-proton; raw sockets for exact packets (QoS 2 resends, bad input).

Topics map to the Enmesh topic address `mqtt/<topic>`; `+` becomes `*` (docs/mqtt.md).
"""

import socket
import struct
import threading
import time

import pytest
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from proton import Message

from helpers import connect

V311, V5 = mqtt.MQTTv311, mqtt.MQTTv5


class Collector:
    """What a paho client receives, in order, with a wait for the first n."""

    def _collect(self):
        self.got = []
        self.cond = threading.Condition()
        self.c.on_message = self._on_message

    def _on_message(self, c, u, m):
        with self.cond:
            self.got.append(m)
            self.cond.notify_all()

    def wait(self, n, timeout=5):
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout)
        return list(self.got)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class Device(Collector):
    """A paho client on its own network thread, collecting what it receives."""

    def __init__(self, router, client_id, proto=V5, **kw):
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kw)
        self._collect()
        self.suback = None
        self.c.on_subscribe = lambda c, u, mid, codes, props: setattr(self, "suback", codes)
        self.c.connect("127.0.0.1", router.mqtt_port, keepalive=30)
        self.c.loop_start()

    def subscribe(self, topic, qos=1):
        self.suback = None
        rc, mid = self.c.subscribe(topic, qos=qos)
        deadline = time.time() + 5
        while self.suback is None and time.time() < deadline:
            time.sleep(0.01)
        assert self.suback is not None, "no SUBACK"
        return [int(getattr(x, "value", x)) for x in self.suback]


@pytest.mark.parametrize("proto", [V311, V5], ids=["3.1.1", "5"])
def test_publish_subscribe_qos_0_1_2_with_wildcards(router, proto):
    sub = Device(router, "sub", proto)
    pub = Device(router, "pub", proto)
    try:
        assert sub.subscribe("devices/+/telemetry", qos=2) == [2]
        assert sub.subscribe("alerts/#", qos=1) == [1]
        infos = [pub.c.publish("devices/%d/telemetry" % q, b"t%d" % q, qos=q) for q in (0, 1, 2)]
        infos.append(pub.c.publish("alerts/a/b", b"alert", qos=2))
        infos.append(pub.c.publish("other/x", b"nobody", qos=1))
        for i in infos:
            i.wait_for_publish(5)
        got = sub.wait(4)
        time.sleep(0.3)
        seen = sorted((m.topic, m.payload, m.qos) for m in sub.got)
        # Delivered QoS: the lower of the publisher's and the subscription's.
        assert seen == [("alerts/a/b", b"alert", 1),
                        ("devices/0/telemetry", b"t0", 0),
                        ("devices/1/telemetry", b"t1", 1),
                        ("devices/2/telemetry", b"t2", 2)], seen
        assert len(got) == 4
    finally:
        sub.close()
        pub.close()


def test_devices_to_an_amqp_service_and_commands_back(router):
    """MQTT → AMQP on a topic pattern; AMQP → a device's command topic."""
    dev = Device(router, "dev-7", V5)
    amqp = connect(router.amqp_url)
    try:
        rcv = amqp.create_receiver("mqtt/devices/*/telemetry")
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.ResponseTopic = "devices/7/replies"
        props.CorrelationData = b"c-1"
        props.UserProperty = [("unit", "C")]
        props.MessageExpiryInterval = 60
        dev.c.publish("devices/7/telemetry", b'{"t":21}', qos=1, properties=props).wait_for_publish(5)
        m = rcv.receive(timeout=5)
        assert m.body in (b'{"t":21}', '{"t":21}'), m.body
        assert m.address == "mqtt/devices/7/telemetry"
        assert m.content_type == "application/json"
        assert m.reply_to == "mqtt/devices/7/replies"
        assert m.correlation_id == b"c-1"
        assert m.properties == {"unit": "C"}
        assert m.durable and m.ttl == 60
        rcv.accept()
        # A command from the service; the device subscribed to its own command topic.
        assert dev.subscribe("devices/7/cmd/#", qos=1) == [1]
        snd = amqp.create_sender("mqtt/devices/7/cmd/reboot")
        cmd = Message(body=b"now", address="mqtt/devices/7/cmd/reboot", correlation_id=b"k",
                      properties={"by": "ops"})
        snd.send(cmd, timeout=5)
        got = dev.wait(1)
        assert [(g.topic, g.payload, g.qos) for g in got] == [("devices/7/cmd/reboot", b"now", 1)]
        p = got[0].properties
        assert p.CorrelationData == b"k" and ("by", "ops") in p.UserProperty
    finally:
        amqp.close()
        dev.close()


# ---------------------------------------------------------------- raw packets --

def raw(router):
    s = socket.create_connection(("127.0.0.1", router.mqtt_port), timeout=5)
    return s


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def pkt(first, body):
    return bytes([first]) + varint(len(body)) + body


def s16(b):
    return struct.pack(">H", len(b)) + b


def connect_pkt(client_id, level=5, keep_alive=30, clean=True, props=b""):
    """CONNECT; `props`: MQTT 5 properties, already encoded (identifier, then value)."""
    body = s16(b"MQTT") + bytes([level, 0x02 if clean else 0]) + struct.pack(">H", keep_alive)
    if level == 5:
        body += varint(len(props)) + props
    return pkt(0x10, body + s16(client_id.encode()))


def read_packet(s):
    first = s.recv(1)
    if not first:
        return None
    n, shift = 0, 0
    while True:
        b = s.recv(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            break
        body += chunk
    return first[0], body


def test_qos2_resent_before_pubrel_is_delivered_once(router):
    sub = Device(router, "q2-sub", V5)
    s = raw(router)
    try:
        assert sub.subscribe("q2/#", qos=2) == [2]
        s.sendall(connect_pkt("q2-raw"))
        assert read_packet(s)[0] == 0x20
        publish = s16(b"q2/x") + struct.pack(">H", 5) + b"\x00" + b"once"
        s.sendall(pkt(0x34, publish))
        first, body = read_packet(s)
        assert first == 0x50 and body[:2] == struct.pack(">H", 5)  # PUBREC
        # PUBREC lost (as far as the device knows): it resends with DUP, then releases.
        s.sendall(pkt(0x3C, publish))
        first, body = read_packet(s)
        assert first == 0x50
        s.sendall(pkt(0x62, struct.pack(">H", 5)))
        first, body = read_packet(s)
        assert first == 0x70 and body[:2] == struct.pack(">H", 5)  # PUBCOMP
        sub.wait(1)
        time.sleep(0.5)
        assert [(m.topic, m.payload) for m in sub.got] == [("q2/x", b"once")]
    finally:
        s.close()
        sub.close()


def test_malformed_packets_get_a_reason_code_and_only_that_client_goes(router):
    bystander = Device(router, "bystander", V5)
    try:
        assert bystander.subscribe("ok/#") == [1]
        # MQTT 5: a PUBLISH with QoS 3 is malformed: DISCONNECT 0x81, then the socket closes.
        s = raw(router)
        s.sendall(connect_pkt("bad-5"))
        assert read_packet(s)[0] == 0x20
        s.sendall(pkt(0x36, s16(b"a") + b"\x00\x01\x00"))
        first, body = read_packet(s)
        assert first == 0xE0 and body[0] == 0x81, (first, body)
        assert read_packet(s) is None
        s.close()
        # A property not allowed in PUBLISH (session expiry): protocol error 0x82.
        s = raw(router)
        s.sendall(connect_pkt("bad-5b"))
        read_packet(s)
        s.sendall(pkt(0x30, s16(b"a") + b"\x05\x11\x00\x00\x00\x01"))
        first, body = read_packet(s)
        assert first == 0xE0 and body[0] == 0x82, (first, body)
        s.close()
        # Unsupported protocol level: CONNACK with return code 1 (3.1.1 format), closed.
        s = raw(router)
        s.sendall(connect_pkt("old", level=3))
        first, body = read_packet(s)
        assert first == 0x20 and body == b"\x00\x01", body
        s.close()
        # Not CONNECT first: closed without an answer.
        s = raw(router)
        s.sendall(pkt(0xC0, b""))
        assert read_packet(s) is None
        s.close()
        # The bystander is still served.
        pub = Device(router, "ok-pub", V311)
        pub.c.publish("ok/1", b"fine", qos=1).wait_for_publish(5)
        assert [m.payload for m in bystander.wait(1)] == [b"fine"]
        pub.close()
    finally:
        bystander.close()


def test_invalid_filters_are_refused_in_suback(router):
    # paho checks filters itself: these go out as raw SUBSCRIBE packets.
    filters = [b"a/#/b", b"a/b+", b"$share/g+/x", b"ok/+"]
    for level, want in [(5, [0x8F, 0x8F, 0x8F, 0x01]), (4, [0x80, 0x80, 0x80, 0x01])]:
        s = raw(router)
        try:
            s.sendall(connect_pkt("filters-%d" % level, level=level))
            assert read_packet(s)[0] == 0x20
            body = struct.pack(">H", 9) + (b"\x00" if level == 5 else b"")
            for f in filters:
                body += s16(f) + b"\x01"
            s.sendall(pkt(0x82, body))
            first, ack = read_packet(s)
            assert first == 0x90 and ack[:2] == struct.pack(">H", 9)
            codes = list(ack[3:] if level == 5 else ack[2:])
            assert codes == want, (level, codes)
        finally:
            s.close()


def test_keep_alive_expiry_disconnects_with_0x8d(router):
    s = raw(router)
    try:
        s.sendall(connect_pkt("sleepy", keep_alive=1))
        assert read_packet(s)[0] == 0x20
        t = time.time()
        first, body = read_packet(s)  # nothing sent for 1.5 s
        assert first == 0xE0 and body[0] == 0x8D, (first, body)
        assert 1.2 < time.time() - t < 4
    finally:
        s.close()



def test_enhanced_authentication_is_refused_with_0x8c_and_closed(router):
    """No authentication method is supported: CONNACK 0x8C, then the connection closes
    (MQTT-4.12.0-1); the next device is served."""
    s = raw(router)
    try:
        # Property 0x15, authentication method.
        s.sendall(connect_pkt("scram", props=b"\x15" + s16(b"SCRAM-SHA-1")))
        first, ack = read_packet(s)
        assert first == 0x20 and ack[1] == 0x8C, (first, ack)
        assert read_packet(s) is None, "connection left open"
    finally:
        s.close()
    s = raw(router)
    try:
        s.sendall(connect_pkt("after-scram"))
        first, ack = read_packet(s)
        assert first == 0x20 and ack[1] == 0x00, (first, ack)
    finally:
        s.close()


def test_keep_alive_expiry_after_a_publish(router):
    """A device that publishes (QoS 1, v5 with no properties) and then falls silent is
    still disconnected once its keep-alive runs out."""
    s = raw(router)
    try:
        s.sendall(connect_pkt("busy-then-sleepy", keep_alive=1))
        assert read_packet(s)[0] == 0x20
        s.sendall(pkt(0x32, s16(b"ka/x") + struct.pack(">H", 1) + b"\x00" + b"m"))
        first, body = read_packet(s)
        assert first == 0x40 and body[:2] == b"\x00\x01", (first, body)
        t = time.time()
        first, body = read_packet(s)
        assert first == 0xE0 and body[0] == 0x8D, (first, body)
        assert time.time() - t < 4
    finally:
        s.close()

def test_ping_and_clean_disconnect(router):
    s = raw(router)
    try:
        s.sendall(connect_pkt("pinger", level=4))
        first, body = read_packet(s)
        assert first == 0x20 and body == b"\x00\x00"
        s.sendall(pkt(0xC0, b""))
        assert read_packet(s) == (0xD0, b"")
        s.sendall(pkt(0xE0, b""))
        assert read_packet(s) is None
    finally:
        s.close()


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients(router, version):
    """mosquitto_sub / mosquitto_pub (Debian mosquitto-clients 2.0.11), QoS 1 and 2."""
    import subprocess
    port = str(router.mqtt_port)
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-V", version,
                            "-t", "m/+/x", "-q", "2", "-C", "2", "-v", "-i", "msub-" + version],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # subscribed
        for i, q in [(1, "1"), (2, "2")]:
            r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", version,
                                "-t", "m/%d/x" % i, "-q", q, "-m", "hello %d" % i],
                               capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr
        out, err = sub.communicate(timeout=10)
        assert sub.returncode == 0, err
        assert out.splitlines() == ["m/1/x hello 1", "m/2/x hello 2"], out
    finally:
        if sub.poll() is None:
            sub.kill()


def will_connect(client_id, level=5, will_topic=b"wills/x", will_payload=b"gone", will_qos=1,
                 will_delay=None, session_expiry=None, keep_alive=30, will_retain=False):
    flags = 0x02 | 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    body = s16(b"MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive)
    if level == 5:
        props = b"" if session_expiry is None else b"\x11" + struct.pack(">I", session_expiry)
        body += varint(len(props)) + props
    body += s16(client_id.encode())
    if level == 5:
        wp = b"" if will_delay is None else b"\x18" + struct.pack(">I", will_delay)
        body += varint(len(wp)) + wp
    body += s16(will_topic) + s16(will_payload)
    return pkt(0x10, body)


@pytest.mark.parametrize("level", [4, 5], ids=["3.1.1", "5"])
def test_will_published_on_abnormal_close_not_on_disconnect(router, level):
    watcher = Device(router, "will-watch-%d" % level, V5)
    try:
        assert watcher.subscribe("wills/#", qos=1) == [1]
        # Closed without DISCONNECT: the will goes out.
        s = raw(router)
        s.sendall(will_connect("w1-%d" % level, level=level, will_topic=b"wills/a"))
        assert read_packet(s)[0] == 0x20
        s.close()
        got = watcher.wait(1)
        assert [(m.topic, m.payload, m.qos) for m in got] == [("wills/a", b"gone", 1)]
        # A clean DISCONNECT: no will.
        s = raw(router)
        s.sendall(will_connect("w2-%d" % level, level=level, will_topic=b"wills/b"))
        assert read_packet(s)[0] == 0x20
        s.sendall(pkt(0xE0, b""))
        assert read_packet(s) is None
        s.close()
        if level == 5:
            # DISCONNECT with reason 0x04 asks for the will.
            s = raw(router)
            s.sendall(will_connect("w3", will_topic=b"wills/c"))
            assert read_packet(s)[0] == 0x20
            s.sendall(pkt(0xE0, b"\x04"))
            s.close()
        time.sleep(0.7)
        topics = [m.topic for m in watcher.got]
        assert topics == (["wills/a", "wills/c"] if level == 5 else ["wills/a"]), topics
    finally:
        watcher.close()


@pytest.mark.parametrize("level", [4, 5], ids=["3.1.1", "5"])
def test_a_retained_will_becomes_the_topics_retained_message(router, level):
    topic = "rwills/%d" % level
    watcher = Device(router, "rw-watch-%d" % level, V5)
    late = None
    try:
        assert watcher.subscribe(topic, qos=1) == [1]
        s = raw(router)
        s.sendall(will_connect("rw-%d" % level, level=level, will_topic=topic.encode(),
                               will_payload=b"offline", will_retain=True))
        assert read_packet(s)[0] == 0x20
        s.close()
        # Live to a subscriber that exists (not flagged retained, 3.3.1.3)...
        got = watcher.wait(1)
        assert [(m.topic, m.payload, m.retain) for m in got] == [(topic, b"offline", False)]
        # ...and stored as the topic's retained message for one that comes later.
        late = Device(router, "rw-late-%d" % level, V5)
        assert late.subscribe(topic, qos=1) == [1]
        got = late.wait(1)
        time.sleep(0.3)
        assert [(m.topic, m.payload, m.retain) for m in late.got] == [(topic, b"offline", True)]
    finally:
        watcher.close()
        if late:
            late.close()


def test_will_delay_is_cancelled_by_a_reconnect(router):
    watcher = Device(router, "delay-watch", V5)
    try:
        assert watcher.subscribe("wills/#", qos=1) == [1]
        # Will delay 2 s, session expiry 10 s; the client comes back after 0.5 s: no will.
        s = raw(router)
        s.sendall(will_connect("wd", will_topic=b"wills/late", will_delay=2, session_expiry=10))
        assert read_packet(s)[0] == 0x20
        s.close()
        time.sleep(0.5)
        s = raw(router)
        s.sendall(connect_pkt("wd"))
        assert read_packet(s)[0] == 0x20
        time.sleep(2.5)
        assert watcher.got == []
        s.close()
        # Gone for good: the will arrives after its delay.
        s = raw(router)
        s.sendall(will_connect("wd2", will_topic=b"wills/late", will_delay=1, session_expiry=10))
        assert read_packet(s)[0] == 0x20
        t = time.time()
        s.close()
        got = watcher.wait(1, timeout=6)
        assert [m.topic for m in got] == ["wills/late"]
        assert time.time() - t >= 0.9
    finally:
        watcher.close()


def test_a_second_connection_with_the_same_client_id_takes_over(router):
    first = raw(router)
    second = raw(router)
    try:
        first.sendall(connect_pkt("twin"))
        assert read_packet(first)[0] == 0x20
        second.sendall(connect_pkt("twin"))
        assert read_packet(second)[0] == 0x20
        pkt_type, body = read_packet(first)
        assert pkt_type == 0xE0 and body[0] == 0x8E, (pkt_type, body)
        assert read_packet(first) is None
        # The second one works.
        second.sendall(pkt(0xC0, b""))
        assert read_packet(second) == (0xD0, b"")
    finally:
        first.close()
        second.close()


class Persistent(Collector):
    """A paho device with a persistent session (3.1.1 clean session 0, or MQTT 5 with a
    session expiry), connecting to `port`; records session-present and what it receives."""

    def __init__(self, port, client_id, proto, clean=False, expiry=3600):
        if proto == V311:
            self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V311,
                                 clean_session=clean)
        else:
            self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5)
        self.present = None
        self._collect()
        self.c.on_connect = lambda c, u, flags, rc, props: setattr(self, "present", flags.session_present)
        if proto == V311:
            self.c.connect("127.0.0.1", port, keepalive=30)
        else:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if clean else expiry
            self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
        self.c.loop_start()
        deadline = time.time() + 5
        while self.present is None and time.time() < deadline:
            time.sleep(0.01)



@pytest.mark.parametrize("proto", [V311, V5], ids=["3.1.1", "5"])
def test_persistent_session_collects_while_away_and_clean_start_ends_it(router, proto):
    cid = "pers-%d" % proto
    d = Persistent(router.mqtt_port, cid, proto)
    assert d.present is False
    rc, _ = d.c.subscribe("cmd/%s/#" % cid, qos=1)
    time.sleep(0.5)
    # The session's subscription, as the gateway finds it (a prefix query of the queue list).
    from urllib.parse import quote
    status, mine = __import__("helpers").http_json(
        "GET", router.http_url + "/api/v1/queues?prefix=" + quote("$sub:mqtt:%s:" % cid))
    assert status == 200 and [q["address"] for q in mine] == ["$sub:mqtt:%s:1:cmd/%s/#" % (cid, cid)], mine
    d.close()
    amqp = connect(router.amqp_url)
    try:
        snd = amqp.create_sender(None)
        for i in range(3):
            snd.send(Message(address="mqtt/cmd/%s/x" % cid, body=b"c%d" % i), timeout=5)
    finally:
        amqp.close()
    # Back: the session is there, and so is what arrived meanwhile (no new SUBSCRIBE).
    d = Persistent(router.mqtt_port, cid, proto)
    try:
        assert d.present is True
        got = d.wait(3)
        assert [(m.topic, m.payload, m.qos) for m in got] == \
            [("cmd/%s/x" % cid, b"c%d" % i, 1) for i in range(3)]
    finally:
        d.close()
    # A clean start ends the session: nothing is kept for the device any more (the
    # unsubscribe commits in the shard shortly after CONNACK: polled, not raced).
    d = Persistent(router.mqtt_port, cid, proto, clean=True)
    d.close()
    _wait_no_queues(router, cid)


def _wait_no_queues(router, part, timeout=5):
    """Polls the queue list until no queue's address contains `part`."""
    deadline = time.time() + timeout
    while True:
        status, queues = __import__("helpers").http_json("GET", router.http_url + "/api/v1/queues")
        left = [q for q in queues if part in q["address"]]
        if status == 200 and not left:
            return
        assert time.time() < deadline, left
        time.sleep(0.1)


def test_persistent_session_resumed_on_a_second_gateway(router, tmp_path):
    """A device's session lives in the broker, not in a gateway: it goes away from the
    standalone's gateway and comes back through a separate `enmesh mqtt-gateway` process."""
    import subprocess
    from conftest import enmesh_bin
    gw = subprocess.Popen([str(enmesh_bin()), "mqtt-gateway", "--listen", "127.0.0.1:0",
                           "--router", "127.0.0.1:%d" % router.amqp_port,
                           "--router-http", "127.0.0.1:%d" % router.http_port],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = gw.stdout.readline()
        assert line.startswith("enmesh mqtt-gateway ready mqtt="), line
        port = int(line.split("mqtt=")[1].split()[0].rsplit(":", 1)[1])
        d = Persistent(router.mqtt_port, "roamer", V5)
        d.c.subscribe("fleet/roamer/+", qos=1)
        time.sleep(0.5)
        d.close()
        pub = Device(router, "fleet-ops", V311)
        for i in range(5):
            pub.c.publish("fleet/roamer/cmd", b"k%d" % i, qos=1).wait_for_publish(5)
        pub.close()
        d = Persistent(port, "roamer", V5)
        try:
            assert d.present is True
            got = d.wait(5)
            assert [m.payload for m in got] == [b"k%d" % i for i in range(5)]
            # And new messages keep coming through the second gateway.
            pub = Device(router, "fleet-ops-2", V5)
            pub.c.publish("fleet/roamer/cmd", b"live", qos=1).wait_for_publish(5)
            pub.close()
            assert [m.payload for m in d.wait(6)][-1] == b"live"
        finally:
            d.close()
    finally:
        gw.terminate()
        gw.wait(timeout=10)


def test_topic_aliases_from_a_device(router):
    sub = Device(router, "alias-sub", V5)
    s = raw(router)
    try:
        assert sub.subscribe("ta/#", qos=1) == [1]
        s.sendall(connect_pkt("alias-dev"))
        first, body = read_packet(s)
        assert first == 0x20
        assert b"\x22\x00\x40" in body  # topic alias maximum 64 in CONNACK's properties
        # Alias 1 set with the topic, then used alone (empty topic).
        s.sendall(pkt(0x30, s16(b"ta/x") + b"\x03\x23\x00\x01" + b"one"))
        s.sendall(pkt(0x30, s16(b"") + b"\x03\x23\x00\x01" + b"two"))
        got = sub.wait(2)
        assert [(m.topic, m.payload) for m in got] == [("ta/x", b"one"), ("ta/x", b"two")]
        # An alias above the maximum: DISCONNECT 0x94.
        s.sendall(pkt(0x30, s16(b"ta/y") + b"\x03\x23\x00\x63" + b"bad"))
        first, body = read_packet(s)
        assert first == 0xE0 and body[0] == 0x94, (first, body)
    finally:
        s.close()
        sub.close()


def test_subscription_identifiers_no_local_and_retain_as_published(router):
    from paho.mqtt.subscribeoptions import SubscribeOptions
    me = Device(router, "opts-me", V5)
    other = Device(router, "opts-other", V5)
    try:
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = 42
        me.c.subscribe([("so/#", SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True))],
                       properties=props)
        other.c.subscribe([("so/#", SubscribeOptions(qos=1))])
        time.sleep(0.5)
        me.c.publish("so/mine", b"m", qos=1).wait_for_publish(5)
        other.c.publish("so/theirs", b"t", qos=1, retain=True).wait_for_publish(5)
        got_me = me.wait(1)
        got_other = other.wait(2)
        time.sleep(0.3)
        # No-local: my own message does not come back to me; it does to the other subscriber.
        assert [(m.topic, m.retain) for m in me.got] == [("so/theirs", True)]
        assert got_me[0].properties.SubscriptionIdentifier == [42]
        # Without retain-as-published the flag is cleared on delivery.
        assert sorted((m.topic, m.retain) for m in other.got) == [("so/mine", False), ("so/theirs", False)]
    finally:
        me.close()
        other.close()


def test_maximum_packet_size_of_a_device_is_respected(router):
    """A PUBLISH larger than the device's Maximum Packet Size is not sent to it (MQTT-3.1.2-24)
    and is dropped as if delivered (MQTT-3.1.2-25): the next small one still arrives, and the
    big one does not come back later."""
    pub = Device(router, "mps-pub", V311)
    s = raw(router)
    try:
        # Maximum packet size 128.
        s.sendall(connect_pkt("mps-dev", props=b"\x27" + struct.pack(">I", 128)))
        assert read_packet(s)[0] == 0x20
        s.sendall(pkt(0x82, struct.pack(">H", 1) + b"\x00" + s16(b"mps/#") + b"\x01"))
        assert read_packet(s)[0] == 0x90
        pub.c.publish("mps/x", b"B" * 500, qos=1).wait_for_publish(5)
        pub.c.publish("mps/x", b"small", qos=1).wait_for_publish(5)
        s.settimeout(2.0)
        first, p = read_packet(s)
        assert first & 0xF0 == 0x30, first
        assert len(p) + 2 <= 128 and p.endswith(b"small"), p
        s.sendall(pkt(0x40, p[2 + p[1]:2 + p[1] + 2]))  # PUBACK with its packet id
        s.settimeout(1.0)
        try:
            again = read_packet(s)
        except socket.timeout:
            again = None
        assert again is None, again
    finally:
        s.close()
        pub.close()


def test_a_disconnect_within_a_small_maximum_packet_size_leaves_out_its_reason_string(router):
    s = raw(router)
    try:
        # Maximum packet size 16.
        s.sendall(connect_pkt("mps-small", props=b"\x27" + struct.pack(">I", 16)))
        assert read_packet(s)[0] == 0x20
        # No local on a shared subscription: a protocol error, with a reason string that
        # would not fit.
        s.sendall(pkt(0x82, struct.pack(">H", 1) + b"\x00" + s16(b"$share/g/t") + b"\x05"))
        first, d = read_packet(s)
        assert first == 0xE0 and d[0] == 0x82, (first, d)
        assert 2 + len(d) <= 16, d
    finally:
        s.close()


def test_receive_maximum_bounds_unacknowledged_deliveries(router):
    pub = Device(router, "rm-pub", V311)
    s = raw(router)
    try:
        s.sendall(connect_pkt("rm-dev", props=b"\x21\x00\x02"))  # receive maximum 2
        assert read_packet(s)[0] == 0x20
        s.sendall(pkt(0x82, struct.pack(">H", 1) + b"\x00" + s16(b"rm/#") + b"\x01"))
        assert read_packet(s)[0] == 0x90
        for i in range(5):
            pub.c.publish("rm/x", b"%d" % i, qos=1).wait_for_publish(5)
        ids = []
        s.settimeout(1.0)
        try:
            while True:
                first, b = read_packet(s)
                assert first & 0xF0 == 0x30
                ids.append(struct.unpack(">H", b[2 + 4:2 + 4 + 2])[0])
        except socket.timeout:
            pass
        assert len(ids) == 2, ids  # nothing more until an acknowledgement
        s.settimeout(5)
        s.sendall(pkt(0x40, struct.pack(">H", ids[0])))
        first, b = read_packet(s)
        assert first & 0xF0 == 0x30
    finally:
        s.close()
        pub.close()


@pytest.mark.parametrize("proto", [V311, V5], ids=["3.1.1", "5"])
def test_mqtt_over_websocket_meets_mqtt_over_tcp(router, proto):
    ws = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ws-%d" % proto, protocol=proto,
                     transport="websockets")
    ws.ws_set_options(path="/mqtt")
    got = []
    ws.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    ws.connect("127.0.0.1", router.mqtt_ws_port, keepalive=30)
    ws.loop_start()
    tcp = Device(router, "tcp-%d" % proto, proto)
    try:
        ws.subscribe("web/#", qos=1)
        time.sleep(0.5)
        # TCP → WebSocket, and a large message across several frames' worth.
        tcp.c.publish("web/a", b"hi", qos=1).wait_for_publish(5)
        tcp.c.publish("web/big", b"x" * 200_000, qos=1).wait_for_publish(5)
        # WebSocket → TCP.
        assert tcp.subscribe("back/#") == [1]
        ws.publish("back/b", b"from the browser", qos=1).wait_for_publish(5)
        assert [(m.topic, m.payload) for m in tcp.wait(1)] == [("back/b", b"from the browser")]
        deadline = time.time() + 5
        while len(got) < 2 and time.time() < deadline:
            time.sleep(0.02)
        assert got == [("web/a", b"hi"), ("web/big", b"x" * 200_000)]
    finally:
        ws.disconnect()
        ws.loop_stop()
        tcp.close()


def test_websocket_port_refuses_plain_http(router):
    s = socket.create_connection(("127.0.0.1", router.mqtt_ws_port), timeout=5)
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    finally:
        s.close()


def test_publish_rate_limit_slows_a_device_down_without_dropping(tmp_path):
    from conftest import Router
    r = Router(config="mqtt:\n  max_publish_rate: 50\n", tmpdir=tmp_path, name="ratelimited")
    try:
        sub = Device(r, "rl-sub", V311)
        assert sub.subscribe("rl/#", qos=1) == [1]
        s = raw(r)
        s.sendall(connect_pkt("rl-pub", level=4))
        assert read_packet(s)[0] == 0x20
        t = time.time()
        # 100 QoS 1 PUBLISHes at once: 50 from the budget, the rest at 50 per second.
        s.sendall(b"".join(pkt(0x32, s16(b"rl/x") + struct.pack(">H", i + 1) + b"m")
                           for i in range(100)))
        acks = 0
        while acks < 100:
            first, _ = read_packet(s)
            acks += first == 0x40
        elapsed = time.time() - t
        assert elapsed >= 0.8, elapsed
        assert len(sub.wait(100, timeout=10)) == 100
        s.close()
        sub.close()
    finally:
        r.close()


@pytest.mark.parametrize("proto", [V311, V5], ids=["3.1.1", "5"])
def test_a_resumed_session_is_not_sent_retained_messages_again(router, proto):
    # Retained messages go to a new subscription (§3.3.1.3); a resumed session's subscriptions
    # are not new. Sent after the SUBACK here (§3.8.4 allows either order).
    cid = "rt-resume-%d" % proto
    pub = Device(router, "rt-resume-pub-%d" % proto, V311)
    try:
        pub.c.publish("rtr/%d" % proto, b"kept", qos=1, retain=True).wait_for_publish(5)
    finally:
        pub.close()
    d = Persistent(router.mqtt_port, cid, proto)
    d.c.subscribe("rtr/%d" % proto, qos=1)
    assert [(m.payload, m.retain) for m in d.wait(1)] == [(b"kept", True)]
    d.close()
    d = Persistent(router.mqtt_port, cid, proto)
    try:
        assert d.present is True
        time.sleep(0.7)
        assert d.got == []
    finally:
        d.close()
        Persistent(router.mqtt_port, cid, proto, clean=True).close()


def test_retained_messages_set_replace_clear_and_sent_on_subscribe(router):
    from paho.mqtt.subscribeoptions import SubscribeOptions
    pub = Device(router, "rt-pub", V311)
    try:
        for topic, body in [("rt/a", b"v1"), ("rt/a", b"v2"), ("rt/b", b"b1")]:
            pub.c.publish(topic, body, qos=1, retain=True).wait_for_publish(5)
        first = Device(router, "rt-sub-1", V5)
        assert first.subscribe("rt/+", qos=1) == [1]
        got = first.wait(2)
        time.sleep(0.3)
        assert sorted((m.topic, m.payload, m.retain) for m in first.got) == \
            [("rt/a", b"v2", True), ("rt/b", b"b1", True)]
        # A live message to a subscriber that exists: not flagged retained.
        pub.c.publish("rt/b", b"b2", qos=1).wait_for_publish(5)
        live = first.wait(3)[-1]
        assert (live.topic, live.payload, live.retain) == ("rt/b", b"b2", False)
        first.close()
        # An empty retained payload clears the topic's retained message.
        pub.c.publish("rt/a", b"", qos=1, retain=True).wait_for_publish(5)
        second = Device(router, "rt-sub-2", V311)
        assert second.subscribe("rt/#", qos=1) == [1]
        second.wait(1)
        time.sleep(0.3)
        assert [(m.topic, m.payload) for m in second.got] == [("rt/b", b"b1")]
        second.close()
        # Retain handling 2: none sent at subscribe.
        third = Device(router, "rt-sub-3", V5)
        third.c.subscribe([("rt/#", SubscribeOptions(qos=1, retainHandling=2))])
        time.sleep(0.7)
        assert third.got == []
        third.close()
    finally:
        pub.close()


def _amqp_publish(router, address, bodies):
    amqp = connect(router.amqp_url)
    try:
        snd = amqp.create_sender(None)
        for b in bodies:
            snd.send(Message(address=address, body=b), timeout=5)
    finally:
        amqp.close()


def test_shared_subscriptions_compete_and_end_with_their_last_member(router):
    # One member on MQTT 5, one on 3.1.1 (which has no $share, but devices use it), and a
    # plain subscriber that gets its own copy of everything.
    a = Device(router, "share-a", V5)
    b = Device(router, "share-b", V311)
    plain = Device(router, "share-plain", V5)
    try:
        assert a.subscribe("$share/workers/jobs/#") == [1]
        assert b.subscribe("$share/workers/jobs/#") == [1]
        assert plain.subscribe("jobs/#") == [1]
        time.sleep(0.3)
        want = [b"j%02d" % i for i in range(20)]
        pub = Device(router, "share-pub", V5)
        for m in want:
            pub.c.publish("jobs/x", m, qos=1).wait_for_publish(5)
        pub.close()
        deadline = time.time() + 10
        while len(a.got) + len(b.got) < 20 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        got_a, got_b = [m.payload for m in a.got], [m.payload for m in b.got]
        assert sorted(got_a + got_b) == want, (got_a, got_b)
        assert got_a and got_b, "both members take some: a=%s b=%s" % (got_a, got_b)
        assert all(m.topic == "jobs/x" for m in a.got + b.got)
        assert [m.payload for m in plain.wait(20)] == want
        # No local on a shared subscription is a protocol error (MQTT 5 §3.8.3.1).
        s = raw(router)
        s.sendall(connect_pkt("share-nolocal"))
        assert read_packet(s)[0] == 0x20
        s.sendall(pkt(0x82, struct.pack(">H", 1) + b"\x00" + s16(b"$share/g/t") + b"\x05"))
        first, body = read_packet(s)
        assert first == 0xE0 and body[0] == 0x82, (first, body)
        s.close()
    finally:
        a.close()
        b.close()
        plain.close()
    # Both members gone (clean sessions): the group's subscription went with them.
    _wait_no_queues(router, "workers")


@pytest.mark.parametrize("proto", [V311, V5], ids=["3.1.1", "5"])
def test_shared_subscription_in_a_persistent_session(router, proto):
    cid = "share-pers-%d" % proto
    d = Persistent(router.mqtt_port, cid, proto)
    assert d.present is False
    d.c.subscribe("$share/keep/orders/%d/#" % proto, qos=1)
    time.sleep(0.5)
    d.close()
    # The group keeps collecting while its only member is away...
    _amqp_publish(router, "mqtt/orders/%d/x" % proto, [b"o%d" % i for i in range(3)])
    # ... and the member's session still has it: session present, the three delivered.
    d = Persistent(router.mqtt_port, cid, proto)
    try:
        assert d.present is True
        got = d.wait(3)
        assert [(m.topic, m.payload) for m in got] == \
            [("orders/%d/x" % proto, b"o%d" % i) for i in range(3)]
    finally:
        d.close()
    # A clean start ends the session and, with its last member gone, the group's subscription.
    d = Persistent(router.mqtt_port, cid, proto, clean=True)
    d.close()
    _wait_no_queues(router, cid)
    _wait_no_queues(router, "keep")


def test_dollar_topics_are_not_forwarded(router):
    sub = Device(router, "dollar-sub", V5)
    try:
        assert sub.subscribe("#") == [1]
        s = raw(router)
        s.sendall(connect_pkt("dollar-pub"))
        assert read_packet(s)[0] == 0x20
        # QoS 1 PUBLISH to "$share": PUBACK 0x90 (topic name invalid), nothing delivered.
        s.sendall(pkt(0x32, s16(b"$share") + struct.pack(">H", 7) + b"\x00" + b"x"))
        first, body = read_packet(s)
        assert first == 0x40 and body[:2] == struct.pack(">H", 7) and body[2] == 0x90, body
        s.close()
        time.sleep(0.3)
        assert sub.got == []
    finally:
        sub.close()


def _gateway_process(router, http_port=None):
    """A separate `enmesh mqtt-gateway` in front of the standalone's router (its management API
    at `http_port` if given): (process, port)."""
    import subprocess
    from conftest import enmesh_bin
    gw = subprocess.Popen([str(enmesh_bin()), "mqtt-gateway", "--listen", "127.0.0.1:0",
                           "--router", "127.0.0.1:%d" % router.amqp_port,
                           "--router-http", "127.0.0.1:%d" % (http_port or router.http_port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = gw.stdout.readline()
    assert line.startswith("enmesh mqtt-gateway ready mqtt="), line
    return gw, int(line.split("mqtt=")[1].split()[0].rsplit(":", 1)[1])


def _publish2(pid, payload, dup=False):
    """An MQTT 5 QoS 2 PUBLISH on audit/q2."""
    return pkt(0x34 | (0x08 if dup else 0), s16(b"audit/q2") + struct.pack(">H", pid) + b"\x00" + payload)


def _expect(s, first, pid):
    got, body = read_packet(s)
    assert got == first and body[:2] == struct.pack(">H", pid), (hex(got), body, pid)
    assert len(body) == 2 or body[2] < 0x80, ("refused", body)


def test_qos2_exactly_once_across_a_gateway_restart(router):
    """QoS 2 from a device through a gateway that is SIGKILLed after storing; the device
    resends everything (DUP) through a new gateway process: each message stored once (the
    brokers deduplicate by client and packet id), one never sent before is stored, and a
    new message reusing an id (DUP 0) is stored again. Audited by an AMQP subscriber."""
    amqp = connect(router.amqp_url)
    gws = []
    try:
        rcv = amqp.create_receiver("mqtt/audit/q2", credit=500)
        time.sleep(0.3)
        gw, port = _gateway_process(router)
        gws.append(gw)
        n = 40
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(connect_pkt("q2-roamer", clean=False))
        assert read_packet(s)[0] == 0x20
        s.sendall(b"".join(_publish2(i, b"m%d" % i) for i in range(1, n + 1)))
        for i in range(1, n + 1):
            _expect(s, 0x50, i)  # PUBREC: stored
        # The gateway dies before any PUBREL (the device saw none of the PUBRECs, say).
        gw.kill()
        gw.wait(timeout=10)
        s.close()
        gw, port = _gateway_process(router)
        gws.append(gw)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(connect_pkt("q2-roamer", clean=False))
        assert read_packet(s)[0] == 0x20
        # Everything resent as in doubt, plus one the first gateway never saw.
        s.sendall(b"".join(_publish2(i, b"m%d" % i, dup=True) for i in range(1, n + 2)))
        for i in range(1, n + 2):
            _expect(s, 0x50, i)
        s.sendall(b"".join(pkt(0x62, struct.pack(">H", i)) for i in range(1, n + 2)))
        for i in range(1, n + 2):
            _expect(s, 0x70, i)  # PUBCOMP
        # A new message reusing packet id 1 (DUP 0), even with the same payload: stored.
        s.sendall(_publish2(1, b"m1"))
        _expect(s, 0x50, 1)
        s.sendall(pkt(0x62, struct.pack(">H", 1)))
        _expect(s, 0x70, 1)
        s.close()
        got = []
        while True:
            try:
                m = rcv.receive(timeout=2)
            except Exception:
                break
            got.append(bytes(m.body) if not isinstance(m.body, str) else m.body.encode())
            rcv.accept()
        want = sorted([b"m%d" % i for i in range(1, n + 2)] + [b"m1"])
        from collections import Counter
        diff = (Counter(got) - Counter(want)) + (Counter(want) - Counter(got))
        assert sorted(got) == want, "duplicates or losses: %s" % dict(diff)
    finally:
        amqp.close()
        for gw in gws:
            gw.kill()
            gw.wait(timeout=10)


def test_session_expiry_ends_a_session_after_its_interval(router):
    """MQTT 5 session expiry is kept by the brokers (the subscription's source has
    expiry-policy link-detach with the interval as timeout), not by a gateway timer."""
    from urllib.parse import quote
    helpers = __import__("helpers")
    cid = "expiring"
    mine = router.http_url + "/api/v1/queues?prefix=" + quote("$sub:mqtt:%s:" % cid)
    d = Persistent(router.mqtt_port, cid, V5, expiry=2)
    assert d.present is False
    d.c.subscribe("exp/%s/#" % cid, qos=1)
    time.sleep(0.5)
    d.close()
    _amqp_publish(router, "mqtt/exp/%s/x" % cid, [b"while away"])
    # Back within the interval: the session and what arrived meanwhile are there.
    time.sleep(0.5)
    d = Persistent(router.mqtt_port, cid, V5, expiry=2)
    try:
        assert d.present is True
        assert [m.payload for m in d.wait(1)] == [b"while away"]
    finally:
        d.close()
    # Away longer than the interval: the brokers ended the session.
    deadline = time.time() + 10
    while time.time() < deadline:
        status, queues = helpers.http_json("GET", mine)
        if status == 200 and not queues:
            break
        time.sleep(0.25)
    assert queues == [], queues
    d = Persistent(router.mqtt_port, cid, V5, expiry=2)
    try:
        assert d.present is False
    finally:
        d.close()


def test_standalone_gateway_reaches_its_router_in_process(router):
    """Standalone's gateway connects to its router through in-process pipes (docs/mqtt.md):
    the router lists those AMQP connections with the remote address `in-process`, and a device
    works through them."""
    helpers = __import__("helpers")
    d = Device(router, "inproc", V5)
    try:
        d.c.subscribe("inproc/t", qos=1)
        time.sleep(0.3)
        _amqp_publish(router, "mqtt/inproc/t", [b"through the pipe"])
        assert [m.payload for m in d.wait(1)] == [b"through the pipe"]
        status, conns = helpers.http_json("GET", router.http_url + "/api/v1/connections")
        assert status == 200
        assert any(c.get("remote") == "in-process" for c in conns), conns
    finally:
        d.close()


def test_disconnect_sets_a_new_session_expiry(router):
    """MQTT 5 DISCONNECT's session expiry interval replaces CONNECT's (§3.14.2.2.2): 0 ends
    the session at once, a longer one keeps it past CONNECT's, and a non-zero one after
    CONNECT's 0 is a protocol error."""
    from urllib.parse import quote
    helpers = __import__("helpers")

    def kept(cid):
        status, queues = helpers.http_json(
            "GET", router.http_url + "/api/v1/queues?prefix=" + quote("$sub:mqtt:%s:" % cid))
        assert status == 200
        return queues

    def disconnect(d, expiry):
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = expiry
        d.c.disconnect(properties=props)
        d.c.loop_stop()

    # CONNECT asked for an hour, DISCONNECT for 0: the subscription goes now.
    d = Persistent(router.mqtt_port, "dx-zero", V5, expiry=3600)
    d.c.subscribe("dx/zero/#", qos=1)
    time.sleep(0.5)
    assert len(kept("dx-zero")) == 1
    disconnect(d, 0)
    deadline = time.time() + 5
    while kept("dx-zero") and time.time() < deadline:
        time.sleep(0.1)
    assert kept("dx-zero") == []
    d = Persistent(router.mqtt_port, "dx-zero", V5, expiry=3600)
    try:
        assert d.present is False
    finally:
        disconnect(d, 0)

    # CONNECT asked for 1 s, DISCONNECT for an hour: still there well after 1 s, and resumed.
    d = Persistent(router.mqtt_port, "dx-long", V5, expiry=1)
    d.c.subscribe("dx/long/#", qos=1)
    time.sleep(0.5)
    disconnect(d, 3600)
    time.sleep(3)
    assert len(kept("dx-long")) == 1
    _amqp_publish(router, "mqtt/dx/long/x", [b"kept"])
    d = Persistent(router.mqtt_port, "dx-long", V5, expiry=3600)
    try:
        assert d.present is True
        assert [m.payload for m in d.wait(1)] == [b"kept"]
    finally:
        disconnect(d, 0)

    # CONNECT asked for none: DISCONNECT may not ask for one. DISCONNECT 0x82 back, closed.
    s = raw(router)
    s.sendall(connect_pkt("dx-none", level=5, clean=True))
    first, body = read_packet(s)
    assert (first, body[1]) == (0x20, 0x00)
    s.sendall(pkt(0xE0, bytes([0x00, 5, 0x11]) + struct.pack(">I", 60)))
    first, body = read_packet(s)
    assert (first, body[0]) == (0xE0, 0x82)
    assert read_packet(s) is None
    s.close()


def test_sessions_unreadable_refuse_the_connection_with_the_right_code(router):
    # The router's management API is not reachable (a port nobody listens on). A clean start
    # has had its CONNACK already (it is answered before the lookup): MQTT 5 then gets
    # DISCONNECT 0x88, 3.1.1 a closed connection; a session to resume gets CONNACK 0x88.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead = probe.getsockname()[1]
    probe.close()
    gw, port = _gateway_process(router, http_port=dead)
    try:
        def connect(level, clean):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(connect_pkt("unreadable-%d-%d" % (level, clean), level=level, clean=clean))
            return s

        s = connect(5, True)
        first, body = read_packet(s)
        assert (first, body[1]) == (0x20, 0x00)
        first, body = read_packet(s)
        assert (first, body[0]) == (0xE0, 0x88)
        assert read_packet(s) is None
        s = connect(4, True)
        first, body = read_packet(s)
        assert (first, body[1]) == (0x20, 0x00)
        assert read_packet(s) is None
        s = connect(5, False)
        first, body = read_packet(s)
        assert (first, body[1]) == (0x20, 0x88)
        assert read_packet(s) is None
    finally:
        gw.kill()
        gw.wait()
