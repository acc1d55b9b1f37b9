//! MQTT over WebSocket (RFC 6455, subprotocol `mqtt`): the opening handshake, then a stream
//! that carries MQTT bytes in binary frames, so the MQTT server reads and writes it like TCP.
//!
//! Frames from the client must be masked; text frames are refused (MQTT is binary), pings are
//! answered with pongs, a close frame ends the stream. A frame larger than the gateway's
//! maximum packet size (plus slack for MQTT's own header) ends the connection: memory per
//! connection stays bounded by the buffers, not by what a peer announces.
//!
//! The protocol itself is sans-IO ([`answer`] for the handshake, [`Frames`] for the frames, both
//! fuzzed: `mqtt-gateway/fuzz`); [`accept`] and [`WsStream`] only move bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_HANDSHAKE: usize = 8192;

fn bad(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Standard base64 with padding.
fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(GUID.as_bytes());
    base64(&h.digest().bytes())
}

/// The answer to a client's opening handshake `head` (the request line and headers, without
/// the blank line that ends them): `101 Switching Protocols` with the accept key, and the
/// `mqtt` subprotocol when offered; an error says why the request is refused.
pub fn answer(head: &[u8]) -> Result<String, &'static str> {
    let head = std::str::from_utf8(head).map_err(|_| "handshake not UTF-8")?;
    let request = head.split("\r\n").next().unwrap_or("");
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let upgrade = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let (true, true, Some(key)) = (
        request.starts_with("GET "),
        upgrade,
        header("sec-websocket-key"),
    ) else {
        return Err("not a WebSocket upgrade");
    };
    let offered = header("sec-websocket-protocol").unwrap_or_default();
    let chosen = ["mqtt", "mqttv3.1"]
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p));
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = chosen {
        answer.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    answer.push_str("\r\n");
    Ok(answer)
}

/// Reads the client's opening handshake and answers it; the stream carries frames afterwards.
pub async fn accept(mut sock: TcpStream, max_frame: usize) -> io::Result<WsStream> {
    let mut buf = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HANDSHAKE {
            return Err(bad("handshake too long"));
        }
        if sock.read_buf(&mut buf).await? == 0 {
            return Err(bad("closed during the handshake"));
        }
    };
    match answer(&buf[..end]) {
        Ok(a) => sock.write_all(a.as_bytes()).await?,
        Err(why) => {
            sock.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Err(bad(why));
        }
    }
    let _ = buf.split_to(end + 4);
    let mut frames = Frames::new(max_frame);
    frames.raw = buf;
    Ok(WsStream { sock, frames })
}

/// Pongs owed past this many bytes (a client that pings and does not read): the stream reads
/// nothing more until they are written.
const MAX_OWED: usize = 64 * 1024;

/// A client's frames, parsed (sans-IO): binary payloads unmasked into the data the stream
/// reads, pings answered, a close remembered. Memory stays bounded: a frame larger than the
/// maximum is refused before it is buffered, and unread data past four of them too.
pub struct Frames {
    /// Received, not yet parsed.
    raw: BytesMut,
    /// Unmasked payload not yet read.
    data: BytesMut,
    /// Framed output (pongs, and the stream's own frames) not yet written.
    out: BytesMut,
    max_frame: usize,
    closed: bool,
}

impl Frames {
    /// For MQTT packets up to `max_packet` bytes (plus slack for MQTT's own header).
    pub fn new(max_packet: usize) -> Frames {
        Frames {
            raw: BytesMut::new(),
            data: BytesMut::new(),
            out: BytesMut::new(),
            max_frame: max_packet.saturating_add(16),
            closed: false,
        }
    }

    /// Bytes received from the client.
    pub fn received(&mut self, b: &[u8]) {
        self.raw.extend_from_slice(b);
    }

    /// The MQTT bytes parsed out so far (taken by the caller).
    pub fn data(&mut self) -> &mut BytesMut {
        &mut self.data
    }

    /// What is owed to the client (pongs, and the stream's own frames).
    pub fn out(&self) -> &[u8] {
        &self.out
    }

    /// Whether the client sent a close frame.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Parses one whole frame at the front of what was received; false if more bytes are
    /// needed. An error ends the connection.
    pub fn parse(&mut self) -> io::Result<bool> {
        let b = &self.raw[..];
        if b.len() < 2 {
            return Ok(false);
        }
        let (fin_op, mask_len) = (b[0], b[1]);
        if fin_op & 0x70 != 0 {
            // No extension was negotiated (RFC 6455 §5.2).
            return Err(bad("reserved bits set in a WebSocket frame"));
        }
        if mask_len & 0x80 == 0 {
            return Err(bad("unmasked frame from a client"));
        }
        let (len, at) = match mask_len & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => return Ok(false),
            n => (usize::from(n), 2),
        };
        let op = fin_op & 0x0f;
        if op & 0x08 != 0 && (len > 125 || fin_op & 0x80 == 0) {
            // Control frames are short and whole (§5.5).
            return Err(bad("fragmented or long WebSocket control frame"));
        }
        if len > self.max_frame {
            return Err(bad("WebSocket frame too large"));
        }
        if b.len() < at + 4 + len {
            return Ok(false);
        }
        let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        self.raw.advance(at + 4);
        let mut payload = self.raw.split_to(len);
        for (i, x) in payload.iter_mut().enumerate() {
            *x ^= mask[i % 4];
        }
        match op {
            0x0 | 0x2 => {
                if self.data.len() + payload.len() > self.max_frame * 4 {
                    return Err(bad("unread WebSocket data over its bound"));
                }
                self.data.extend_from_slice(&payload);
            }
            0x8 => self.closed = true,
            0x9 => frame(&mut self.out, 0xA, &payload),
            0xA => {}
            _ => return Err(bad("text or unknown WebSocket frame")),
        }
        Ok(true)
    }
}

/// The bytes inside a WebSocket's binary frames, as a byte stream.
pub struct WsStream {
    sock: TcpStream,
    frames: Frames,
}

impl WsStream {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.frames.out.is_empty() {
            match Pin::new(&mut self.sock).poll_write(cx, &self.frames.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.frames.out.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Appends an unmasked frame (server to client).
fn frame(out: &mut BytesMut, op: u8, payload: &[u8]) {
    out.put_u8(0x80 | op);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
}

impl AsyncRead for WsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        loop {
            let f = &mut me.frames;
            if !f.data.is_empty() {
                let n = f.data.len().min(dst.remaining());
                dst.put_slice(&f.data.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if f.closed {
                return Poll::Ready(Ok(()));
            }
            if f.out.len() > MAX_OWED && me.poll_drain(cx)?.is_pending() {
                // Read back-pressure: nothing more is read while the pongs are not written.
                return Poll::Pending;
            }
            if me.frames.parse()? {
                // A pong may be waiting; a failed write shows up on the next write.
                let _ = me.poll_drain(cx);
                continue;
            }
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut me.sock).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => me.frames.received(rb.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        src: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        // Earlier frames first: back-pressure, and the buffer stays one frame deep.
        if me.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        frame(&mut me.frames.out, 0x2, src);
        let _ = me.poll_drain(cx)?;
        Poll::Ready(Ok(src.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut me.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.poll_drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut me.sock).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A client's frame: masked, as RFC 6455 requires of clients.
    fn client_frame(fin: bool, op: u8, mask: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![u8::from(fin) << 7 | op];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn parse_all(f: &mut Frames) -> io::Result<()> {
        while f.parse()? {}
        Ok(())
    }

    proptest! {
        /// Binary and continuation frames, with pings between them, in any split: the data
        /// is their payloads in order, and each ping is answered by a pong with its payload.
        #[test]
        fn frames_in_any_split_give_the_payloads_and_pongs(
            frames in proptest::collection::vec(
                (any::<bool>(), any::<[u8; 4]>(), proptest::collection::vec(any::<u8>(), 0..300)),
                0..12,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let (mut wire, mut data, mut pongs) = (Vec::new(), Vec::new(), BytesMut::new());
            for (ping, mask, payload) in &frames {
                if *ping {
                    let p = &payload[..payload.len().min(125)];
                    wire.extend(client_frame(true, 0x9, *mask, p));
                    frame(&mut pongs, 0xA, p);
                } else {
                    wire.extend(client_frame(true, 0x2, *mask, payload));
                    data.extend_from_slice(payload);
                }
            }
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
            at.push(wire.len());
            at.sort_unstable();
            let mut f = Frames::new(1024);
            let mut from = 0;
            for to in at {
                f.received(&wire[from..to]);
                from = to;
                parse_all(&mut f).unwrap();
            }
            prop_assert_eq!(&f.data()[..], &data[..]);
            prop_assert_eq!(f.out(), &pongs[..]);
            prop_assert!(!f.closed());
        }

        /// Whatever a client sends: no panic, and what is held stays bounded.
        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut f = Frames::new(64);
            f.received(&bytes);
            let _ = parse_all(&mut f);
            prop_assert!(f.data().len() <= 4 * (64 + 16));
            prop_assert!(f.out().len() <= bytes.len() + 4);
        }

        /// Any handshake head: an answer or a reason, never a panic.
        #[test]
        fn arbitrary_handshakes_never_panic(head in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = answer(&head);
        }
    }

    #[test]
    fn frames_that_break_the_rules_end_the_connection() {
        let m = [1, 2, 3, 4];
        for (why, wire) in [
            ("text", client_frame(true, 0x1, m, b"hi")),
            ("unknown opcode", client_frame(true, 0x3, m, b"")),
            ("fragmented ping", client_frame(false, 0x9, m, b"")),
            ("long ping", client_frame(true, 0x9, m, &[0; 126])),
            ("too large", client_frame(true, 0x2, m, &[0; 200])),
            ("reserved bit", {
                let mut f = client_frame(true, 0x2, m, b"x");
                f[0] |= 0x40;
                f
            }),
            ("unmasked", vec![0x82, 0x01, b'x']),
        ] {
            let mut f = Frames::new(100);
            f.received(&wire);
            assert!(parse_all(&mut f).is_err(), "{why} accepted");
        }
        // A frame over the maximum is refused from its header, before its payload arrives.
        let mut f = Frames::new(100);
        f.received(&client_frame(true, 0x2, m, &[0; 70_000])[..14]);
        assert!(f.parse().is_err());
        // Close.
        let mut f = Frames::new(100);
        f.received(&client_frame(true, 0x8, m, &[0x03, 0xe8]));
        parse_all(&mut f).unwrap();
        assert!(f.closed());
    }

    #[test]
    fn the_handshake_is_answered_with_the_key_and_the_mqtt_subprotocol() {
        let head = b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\
            Sec-WebSocket-Version: 13";
        let a = answer(head).unwrap();
        assert!(a.starts_with("HTTP/1.1 101 "), "{a}");
        assert!(a.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(a.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        assert!(a.ends_with("\r\n\r\n"));
        assert!(answer(b"GET / HTTP/1.1\r\nUpgrade: websocket").is_err());
        assert!(answer(b"POST / HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: a").is_err());
    }

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }
}
