//! Byte streams to a server: a TCP connection, or an in-process pipe to a server running in
//! the same process.
//!
//! Standalone runs the MQTT gateway, the router and the broker shard in one process. The
//! gateway still speaks AMQP and HTTP to its router (the same code paths as a separate gateway
//! process), but over in-memory pipes: over loopback TCP every frame cost a `sendto`, a
//! `recvfrom` and an `epoll_wait` on each side, which was most of what a device's CONNECT and
//! SUBSCRIBE cost the process. A pipe holds at most its capacity in each direction; a writer
//! past it waits for the reader (the same back-pressure as a full socket buffer).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A connected stream.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Local(DuplexStream),
}

/// Where to connect: a TCP address, or a server in this process.
#[derive(Debug, Clone)]
pub enum Dialer {
    Tcp(String),
    Local(Local),
}

/// The client end of an in-process listener.
#[derive(Debug, Clone)]
pub struct Local {
    name: String,
    capacity: usize,
    accept: mpsc::Sender<DuplexStream>,
}

/// Server ends of the pipes dialled through the matching [`Dialer::Local`].
pub type Accepted = mpsc::Receiver<DuplexStream>;

/// An in-process listener called `name` (what errors and logs say instead of an address),
/// with pipes of `capacity` bytes each way.
pub fn local(name: impl Into<String>, capacity: usize) -> (Dialer, Accepted) {
    // A few pipes may wait to be accepted; dialling waits beyond that.
    let (accept, rx) = mpsc::channel(64);
    let d = Dialer::Local(Local {
        name: name.into(),
        capacity: capacity.max(1024),
        accept,
    });
    (d, rx)
}

impl Dialer {
    /// Opens a stream (TCP without Nagle's delay: requests and frames are written whole).
    pub async fn dial(&self) -> io::Result<Stream> {
        match self {
            Dialer::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Dialer::Local(l) => {
                let (mine, theirs) = tokio::io::duplex(l.capacity);
                l.accept.send(theirs).await.map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("{} is not listening", l.name),
                    )
                })?;
                Ok(Stream::Local(mine))
            }
        }
    }

    /// The address, or the in-process listener's name.
    pub fn name(&self) -> &str {
        match self {
            Dialer::Tcp(a) => a,
            Dialer::Local(l) => &l.name,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Local(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_local_pipe_carries_bytes_both_ways_and_holds_back_a_writer_past_its_capacity() {
        let (d, mut accepted) = local("test", 1024);
        let mut c = d.dial().await.unwrap();
        let mut s = accepted.recv().await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
        // 4 KiB into a 1 KiB pipe nobody reads: the writer waits.
        let big = vec![7u8; 4096];
        let w = tokio::time::timeout(std::time::Duration::from_millis(50), c.write_all(&big));
        assert!(w.await.is_err(), "a full pipe holds the writer back");
        drop(accepted);
        drop(s);
        let (d2, accepted2) = local("gone", 1024);
        drop(accepted2);
        let e = d2.dial().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("gone"));
    }
}
