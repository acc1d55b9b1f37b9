"""Minimal hand-rolled AMQP 1.0 encoder/decoder and raw socket client.

Used by the bad-input, idle-timeout and connection-scale tests, where a real
client library would refuse to produce the bytes we want (or would be too
heavy for thousands of connections).

Only what the tests need is implemented: the primitive types used by the
performatives (null, bool, ubyte, ushort, uint, ulong, str, sym, binary, list,
map, described) are encoded; the decoder understands every AMQP type
*category* (so it can skip over anything), and decodes the common ones.
"""

import re
import select
import socket
import struct
import time

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"

# performative / type descriptors (smallulong codes)
OPEN, BEGIN, ATTACH, FLOW, TRANSFER, DISPOSITION, DETACH, END, CLOSE = range(0x10, 0x19)
ERROR = 0x1D
SOURCE, TARGET = 0x28, 0x29
SASL_MECHANISMS, SASL_INIT, SASL_CHALLENGE, SASL_RESPONSE, SASL_OUTCOME = range(0x40, 0x45)
AMQP_VALUE = 0x77

PERFORMATIVE_NAMES = {
    OPEN: "open", BEGIN: "begin", ATTACH: "attach", FLOW: "flow", TRANSFER: "transfer",
    DISPOSITION: "disposition", DETACH: "detach", END: "end", CLOSE: "close",
    SASL_MECHANISMS: "sasl-mechanisms", SASL_INIT: "sasl-init", SASL_CHALLENGE: "sasl-challenge",
    SASL_RESPONSE: "sasl-response", SASL_OUTCOME: "sasl-outcome",
}


# ---------------------------------------------------------------- encoding --

class Symbol(str):
    pass


class UByte(int):
    pass


class UShort(int):
    pass


class UInt(int):
    pass


class ULong(int):
    pass


class Described:
    def __init__(self, descriptor, value):
        self.descriptor = descriptor
        self.value = value

    def __repr__(self):
        return "Described(%r, %r)" % (self.descriptor, self.value)


def encode(v) -> bytes:
    if v is None:
        return b"\x40"
    if v is True:
        return b"\x41"
    if v is False:
        return b"\x42"
    if isinstance(v, Described):
        d = v.descriptor
        if isinstance(d, int) and not isinstance(d, ULong):
            d = ULong(d)
        if isinstance(d, str) and not isinstance(d, Symbol):
            d = Symbol(d)
        return b"\x00" + encode(d) + encode(v.value)
    if isinstance(v, UByte):
        return b"\x50" + struct.pack(">B", v)
    if isinstance(v, UShort):
        return b"\x60" + struct.pack(">H", v)
    if isinstance(v, UInt):
        if v == 0:
            return b"\x43"
        if v < 256:
            return b"\x52" + struct.pack(">B", v)
        return b"\x70" + struct.pack(">I", v)
    if isinstance(v, ULong):
        if v == 0:
            return b"\x44"
        if v < 256:
            return b"\x53" + struct.pack(">B", v)
        return b"\x80" + struct.pack(">Q", v)
    if isinstance(v, int):  # plain int -> long
        return b"\x81" + struct.pack(">q", v)
    if isinstance(v, Symbol):
        b = v.encode("ascii")
        if len(b) < 256:
            return b"\xa3" + struct.pack(">B", len(b)) + b
        return b"\xb3" + struct.pack(">I", len(b)) + b
    if isinstance(v, str):
        b = v.encode("utf-8")
        if len(b) < 256:
            return b"\xa1" + struct.pack(">B", len(b)) + b
        return b"\xb1" + struct.pack(">I", len(b)) + b
    if isinstance(v, (bytes, bytearray)):
        if len(v) < 256:
            return b"\xa0" + struct.pack(">B", len(v)) + bytes(v)
        return b"\xb0" + struct.pack(">I", len(v)) + bytes(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return b"\x45"
        body = b"".join(encode(x) for x in v)
        if len(body) + 1 < 256 and len(v) < 256:
            return b"\xc0" + struct.pack(">BB", len(body) + 1, len(v)) + body
        return b"\xd0" + struct.pack(">II", len(body) + 4, len(v)) + body
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            items.append(encode(k))
            items.append(encode(x))
        body = b"".join(items)
        if len(body) + 1 < 256:
            return b"\xc1" + struct.pack(">BB", len(body) + 1, len(items)) + body
        return b"\xd1" + struct.pack(">II", len(body) + 4, len(items)) + body
    raise TypeError("cannot encode %r" % (v,))


def _trim(fields):
    """Drop trailing nulls from a performative field list (as encoders do)."""
    fields = list(fields)
    while fields and fields[-1] is None:
        fields.pop()
    return fields


def performative(code, *fields) -> bytes:
    return encode(Described(ULong(code), _trim(fields)))


def frame(body: bytes, channel: int = 0, ftype: int = 0, payload: bytes = b"") -> bytes:
    data = body + payload
    return struct.pack(">IBBH", 8 + len(data), 2, ftype, channel) + data


def open_frame(container_id="raw-client", hostname=None, max_frame_size=None, channel_max=None,
               idle_timeout=None) -> bytes:
    return frame(performative(
        OPEN, container_id, hostname,
        UInt(max_frame_size) if max_frame_size is not None else None,
        UShort(channel_max) if channel_max is not None else None,
        UInt(idle_timeout) if idle_timeout is not None else None))


def begin_frame(channel=0, remote_channel=None, next_outgoing_id=0, incoming_window=2048,
                outgoing_window=2048) -> bytes:
    return frame(performative(
        BEGIN,
        UShort(remote_channel) if remote_channel is not None else None,
        UInt(next_outgoing_id), UInt(incoming_window), UInt(outgoing_window)), channel=channel)


def attach_frame(name, handle, role_receiver, source_address=None, target_address=None,
                 channel=0, initial_delivery_count=None) -> bytes:
    source = Described(ULong(SOURCE), _trim([source_address]))
    target = Described(ULong(TARGET), _trim([target_address]))
    return frame(performative(
        ATTACH, name, UInt(handle), bool(role_receiver), None, None, source, target, None, None,
        UInt(initial_delivery_count) if initial_delivery_count is not None else None), channel=channel)


def transfer_frame(handle, delivery_id, tag=b"t", settled=False, channel=0, payload=None) -> bytes:
    if payload is None:
        payload = encode(Described(ULong(AMQP_VALUE), "raw"))
    return frame(performative(TRANSFER, UInt(handle), UInt(delivery_id), tag, UInt(0), settled),
                 channel=channel, payload=payload)


def close_frame(condition=None, description=None) -> bytes:
    err = None
    if condition:
        err = Described(ULong(ERROR), _trim([Symbol(condition), description]))
    return frame(performative(CLOSE, err))


def sasl_init_frame(mechanism="ANONYMOUS", initial_response=b"") -> bytes:
    return frame(performative(SASL_INIT, Symbol(mechanism), initial_response), ftype=1)


# ---------------------------------------------------------------- decoding --

class DecodeError(Exception):
    pass


def decode(buf: bytes, pos: int = 0):
    """Decode one AMQP value at pos; return (value, new_pos)."""
    try:
        code = buf[pos]
    except IndexError:
        raise DecodeError("truncated")
    pos += 1
    if code == 0x00:
        descriptor, pos = decode(buf, pos)
        value, pos = decode(buf, pos)
        return Described(descriptor, value), pos
    fixed = {0x40: None, 0x41: True, 0x42: False, 0x43: 0, 0x44: 0, 0x45: []}
    if code in fixed:
        return fixed[code], pos
    cat = code & 0xF0
    widths = {0x40: 0, 0x50: 1, 0x60: 2, 0x70: 4, 0x80: 8, 0x90: 16}
    if cat in widths:
        w = widths[cat]
        raw = buf[pos:pos + w]
        if len(raw) < w:
            raise DecodeError("truncated")
        pos += w
        if code == 0x56:
            return raw != b"\x00", pos
        unsigned = {0x50: ">B", 0x60: ">H", 0x70: ">I", 0x80: ">Q", 0x52: ">B", 0x53: ">B"}
        signed = {0x51: ">b", 0x61: ">h", 0x71: ">i", 0x81: ">q", 0x54: ">b", 0x55: ">b", 0x83: ">q"}
        if code in unsigned:
            return struct.unpack(unsigned[code], raw)[0], pos
        if code in signed:
            return struct.unpack(signed[code], raw)[0], pos
        return raw, pos
    if cat in (0xA0, 0xB0):
        if cat == 0xA0:
            n = buf[pos]
            pos += 1
        else:
            (n,) = struct.unpack(">I", buf[pos:pos + 4])
            pos += 4
        raw = buf[pos:pos + n]
        if len(raw) < n:
            raise DecodeError("truncated")
        pos += n
        if code in (0xA1, 0xB1):
            return raw.decode("utf-8", "replace"), pos
        if code in (0xA3, 0xB3):
            return Symbol(raw.decode("ascii", "replace")), pos
        return bytes(raw), pos
    if cat in (0xC0, 0xD0):
        if cat == 0xC0:
            size, count = buf[pos], buf[pos + 1]
            start = pos + 1
            pos += 2
        else:
            size, count = struct.unpack(">II", buf[pos:pos + 8])
            start = pos + 4
            pos += 8
        end = start + size
        items = []
        for _ in range(count):
            v, pos = decode(buf, pos)
            items.append(v)
        pos = end
        if code & 0x0F == 1:  # map
            return dict(zip(items[::2], items[1::2])), pos
        return items, pos
    if cat in (0xE0, 0xF0):
        if cat == 0xE0:
            size, count = buf[pos], buf[pos + 1]
            start = pos + 1
            pos += 2
        else:
            size, count = struct.unpack(">II", buf[pos:pos + 8])
            start = pos + 4
            pos += 8
        end = start + size
        # element constructor followed by `count` element bodies: decode by
        # re-prefixing the constructor byte for each element.
        ctor = buf[pos]
        pos += 1
        items = []
        for _ in range(count):
            v, npos = decode(bytes([ctor]) + buf[pos:end], 0)
            pos += npos - 1
            items.append(v)
        return items, end
    raise DecodeError("unknown type code 0x%02x" % code)


class Frame:
    def __init__(self, ftype, channel, body):
        self.type = ftype
        self.channel = channel
        self.body = body
        self.code = None
        self.fields = None
        self.error = None
        if body:
            try:
                v, _ = decode(body, 0)
                if isinstance(v, Described):
                    self.code = v.descriptor
                    self.fields = v.value if isinstance(v.value, list) else []
            except (DecodeError, IndexError, struct.error) as e:
                self.error = e

    @property
    def name(self):
        if not self.body:
            return "empty"
        return PERFORMATIVE_NAMES.get(self.code, "0x%x" % self.code if isinstance(self.code, int) else "?")

    @property
    def condition(self):
        """Error condition symbol of a close/end/detach frame, if any."""
        idx = {CLOSE: 0, END: 0, DETACH: 2}.get(self.code)
        if idx is not None and self.fields and len(self.fields) > idx:
            err = self.fields[idx]
            if isinstance(err, Described) and err.value:
                return str(err.value[0])
        # fallback: search the raw bytes
        m = re.search(rb"amqp:[A-Za-z0-9:._-]+", self.body)
        return m.group(0).decode() if m else None

    @property
    def description(self):
        idx = {CLOSE: 0, END: 0, DETACH: 2}.get(self.code)
        if idx is not None and self.fields and len(self.fields) > idx:
            err = self.fields[idx]
            if isinstance(err, Described) and isinstance(err.value, list) and len(err.value) > 1:
                return err.value[1]
        return None

    def __repr__(self):
        s = "<%s ch=%d" % (self.name, self.channel)
        if self.code in (CLOSE, END, DETACH):
            s += " condition=%s description=%r" % (self.condition, self.description)
        return s + ">"


def parse_stream(data: bytes):
    """Split received bytes into protocol headers and frames.

    Returns (headers, frames, rest) where headers is a list of 8-byte protocol
    headers seen, frames a list of Frame and rest the unparsed tail.
    """
    headers, frames = [], []
    pos = 0
    while True:
        if data[pos:pos + 4] == b"AMQP" and len(data) - pos >= 8:
            headers.append(bytes(data[pos:pos + 8]))
            pos += 8
            continue
        if len(data) - pos < 8:
            break
        size, doff, ftype, channel = struct.unpack(">IBBH", data[pos:pos + 8])
        if size < 8 or len(data) - pos < size:
            break
        frames.append(Frame(ftype, channel, bytes(data[pos + doff * 4:pos + size])))
        pos += size
    return headers, frames, bytes(data[pos:])


def conditions(data: bytes):
    """Every amqp:... condition symbol found anywhere in the bytes."""
    return [m.decode() for m in re.findall(rb"amqp:[A-Za-z0-9:._-]+", data)]


# -------------------------------------------------------------- raw socket --

class RawConnection:
    """A plain TCP socket speaking hand-built AMQP."""

    def __init__(self, host, port, timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.data = bytearray()
        self.eof = False
        self.reset = False

    @classmethod
    def to(cls, addr, timeout=5.0):
        host, port = addr
        return cls(host, port, timeout)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """sendall that reports (instead of raising) a peer that already closed."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.reset = True
            return False

    def _recv_some(self, wait: float) -> bool:
        if self.eof:
            return False
        r, _, _ = select.select([self.sock], [], [], max(wait, 0))
        if not r:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            self.reset = True
            self.eof = True
            return False
        except socket.timeout:
            return False
        if not chunk:
            self.eof = True
            return False
        self.data += chunk
        return True

    def read_until(self, predicate, timeout=5.0) -> bool:
        """Read until predicate(self) is true, EOF, or timeout. Returns predicate result."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return bool(predicate(self))
            self._recv_some(min(left, 0.2))
        return True

    def read_to_eof(self, timeout=5.0) -> bool:
        """Read until the peer closes the socket. Returns True on EOF."""
        self.read_until(lambda c: c.eof, timeout)
        return self.eof

    def parsed(self):
        return parse_stream(bytes(self.data))

    def frames(self):
        return self.parsed()[1]

    def headers(self):
        return self.parsed()[0]

    def has_frame(self, code):
        return any(f.code == code for f in self.frames())

    def frame(self, code):
        for f in self.frames():
            if f.code == code:
                return f
        return None

    def handshake(self, idle_timeout=None, max_frame_size=None, container_id="raw-client", timeout=5.0):
        """Send AMQP header + open and wait for the peer's header and open."""
        self.send(AMQP_HEADER + open_frame(container_id, max_frame_size=max_frame_size,
                                           idle_timeout=idle_timeout))
        ok = self.read_until(lambda c: c.has_frame(OPEN), timeout)
        if not ok:
            raise AssertionError("no open frame from router; got %r (eof=%s)" % (bytes(self.data[:200]), self.eof))
        hdrs = self.headers()
        assert hdrs and hdrs[0] == AMQP_HEADER, "router protocol header was %r" % hdrs
        return self.frame(OPEN)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
