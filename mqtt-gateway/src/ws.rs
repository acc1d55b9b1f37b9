//! MQTT over WebSocket (RFC 6455, subprotocol `mqtt`): the opening handshake, then a stream
//! that carries MQTT bytes in binary frames, so the MQTT server reads and writes it like TCP.
//!
//! Frames from the client must be masked; text frames are refused (MQTT is binary), pings are
//! answered with pongs, a close frame ends the stream. A frame larger than the gateway's
//! maximum packet size (plus slack for MQTT's own header) ends the connection: memory per
//! connection stays bounded by the buffers, not by what a peer announces.

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
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("handshake not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let upgrade = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let key = header("sec-websocket-key");
    let (true, true, Some(key)) = (request.starts_with("GET "), upgrade, key) else {
        sock.write_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        return Err(bad("not a WebSocket upgrade"));
    };
    let protocols = header("sec-websocket-protocol").unwrap_or_default();
    let offered: Vec<&str> = protocols.split(',').map(str::trim).collect();
    let chosen = ["mqtt", "mqttv3.1"]
        .into_iter()
        .find(|p| offered.contains(p));
    let mut answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(&key)
    );
    if let Some(p) = chosen {
        answer.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    answer.push_str("\r\n");
    sock.write_all(answer.as_bytes()).await?;
    let _ = buf.split_to(end + 4);
    Ok(WsStream {
        sock,
        raw: buf,
        data: BytesMut::new(),
        out: BytesMut::new(),
        max_frame: max_frame + 16,
        closed: false,
    })
}

/// The bytes inside a WebSocket's binary frames, as a byte stream.
pub struct WsStream {
    sock: TcpStream,
    /// Received, not yet parsed.
    raw: BytesMut,
    /// Unmasked payload not yet read.
    data: BytesMut,
    /// Framed output (and pongs) not yet written.
    out: BytesMut,
    max_frame: usize,
    closed: bool,
}

impl WsStream {
    /// Parses whole frames out of `raw`; false if more bytes are needed.
    fn parse(&mut self) -> io::Result<bool> {
        let b = &self.raw[..];
        if b.len() < 2 {
            return Ok(false);
        }
        let (fin_op, mask_len) = (b[0], b[1]);
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
        match fin_op & 0x0f {
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

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.sock).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out.advance(n),
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
            if !me.data.is_empty() {
                let n = me.data.len().min(dst.remaining());
                dst.put_slice(&me.data.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if me.closed {
                return Poll::Ready(Ok(()));
            }
            if me.parse()? {
                // A pong may be waiting; a failed write shows up on the next write.
                let _ = me.poll_drain(cx);
                continue;
            }
            me.raw.reserve(4096);
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut me.sock).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => me.raw.extend_from_slice(rb.filled()),
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
        frame(&mut me.out, 0x2, src);
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
