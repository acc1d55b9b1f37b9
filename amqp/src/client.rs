//! A small async client over tokio, driving the same engine the router uses. It serves the
//! CLI, the bench tool and tests; it is not on the router's path.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::connection::{AttachRequest, Config, Connection, Event, Fatal, LinkId};
use crate::frames::{ErrorCondition, Role, Terminus};
use crate::pipe::{Dialer, Stream};
use crate::sasl::SaslClient;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] Fatal),
    #[error("connection closed by peer: {0:?}")]
    Closed(Option<ErrorCondition>),
    #[error("link refused: {0:?}")]
    Refused(Option<ErrorCondition>),
}

pub struct Client {
    pub stream: Stream,
    pub conn: Connection,
    pub inbuf: BytesMut,
    pub events: VecDeque<Event>,
    pub channel: u16,
}

impl Client {
    /// Connects (SASL ANONYMOUS), opens and begins one session.
    pub async fn connect(addr: &str, container_id: &str) -> Result<Client, ClientError> {
        Self::connect_with(addr, container_id, 1 << 16).await
    }

    /// Like [`Client::connect`] with an input buffer of `capacity` bytes to start with (it
    /// grows as needed): many long-lived, mostly idle clients keep small ones.
    pub async fn connect_with(
        addr: &str,
        container_id: &str,
        capacity: usize,
    ) -> Result<Client, ClientError> {
        Self::connect_via(&Dialer::Tcp(addr.to_owned()), container_id, capacity).await
    }

    /// Like [`Client::connect_with`], over a stream `to` opens (TCP, or an in-process pipe).
    pub async fn connect_via(
        to: &Dialer,
        container_id: &str,
        capacity: usize,
    ) -> Result<Client, ClientError> {
        let stream = to.dial().await?;
        let cfg = Config {
            container_id: container_id.to_owned(),
            max_frame_size: 1 << 20,
            ..Config::default()
        };
        let conn = Connection::client(cfg, Some(SaslClient::anonymous()), Instant::now());
        let mut c = Client {
            stream,
            conn,
            inbuf: BytesMut::with_capacity(capacity),
            events: VecDeque::new(),
            channel: 0,
        };
        c.wait(|e| matches!(e, Event::Opened(_))).await?;
        c.channel = c.conn.begin().ok_or(ClientError::Closed(None))?;
        c.wait(|e| matches!(e, Event::SessionBegun { .. })).await?;
        Ok(c)
    }

    /// Writes pending output.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        let out = self.conn.output();
        if !out.is_empty() {
            let b = out.split();
            self.stream.write_all(&b).await?;
            self.conn.wrote(Instant::now());
        }
        Ok(())
    }

    /// Flushes, reads once and queues the events that arrived.
    pub async fn pump(&mut self) -> Result<(), ClientError> {
        let n = loop {
            // Timers first: heartbeats keep the peer's idle timeout satisfied while we wait.
            let next = self.conn.tick(Instant::now())?;
            self.flush().await?;
            let read = self.stream.read_buf(&mut self.inbuf);
            match next {
                Some(at) => match tokio::time::timeout_at(at.into(), read).await {
                    Ok(r) => break r?,
                    Err(_) => continue,
                },
                None => break read.await?,
            }
        };
        if n == 0 {
            return Err(ClientError::Closed(None));
        }
        let r = self.conn.handle_input(&mut self.inbuf, Instant::now());
        while let Some(e) = self.conn.poll_event() {
            self.events.push_back(e);
        }
        if self.inbuf.capacity() - self.inbuf.len() < 4096 {
            self.inbuf.reserve(1 << 16);
        }
        match r {
            Ok(()) => Ok(()),
            Err(Fatal::Closed) => {
                let err = self.events.iter().find_map(|e| match e {
                    Event::Closed(e) => e.clone(),
                    _ => None,
                });
                Err(ClientError::Closed(err))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Pumps until an event matching `f` arrives, and returns it (other events stay queued).
    pub async fn wait(&mut self, f: impl Fn(&Event) -> bool) -> Result<Event, ClientError> {
        loop {
            if let Some(e) = self
                .events
                .iter()
                .position(&f)
                .and_then(|i| self.events.remove(i))
            {
                return Ok(e);
            }
            if let Some(Event::Closed(e)) =
                self.events.iter().find(|e| matches!(e, Event::Closed(_)))
            {
                return Err(ClientError::Closed(e.clone()));
            }
            self.pump().await?;
        }
    }

    async fn attach(
        &mut self,
        req: AttachRequest,
    ) -> Result<(LinkId, Box<crate::frames::Attach>), ClientError> {
        let id = self
            .conn
            .attach(self.channel, req)
            .ok_or(ClientError::Closed(None))?;
        // The peer may refuse without answering the attach (ending the session, closing).
        let ev = self
            .wait(|e| {
                matches!(e, Event::Attach { link, .. } | Event::LinkClosed { link, .. } if *link == id)
            })
            .await?;
        let attach = match ev {
            Event::Attach { attach, .. } => attach,
            Event::LinkClosed { error, .. } => return Err(ClientError::Refused(error)),
            _ => return Err(ClientError::Closed(None)),
        };
        let refused = match attach.role {
            Role::Receiver => attach.target.is_none(),
            Role::Sender => attach.source.is_none(),
        };
        if refused {
            let e = self
                .wait(|e| matches!(e, Event::LinkClosed { link, .. } if *link == id))
                .await?;
            let err = match e {
                Event::LinkClosed { error, .. } => error,
                _ => None,
            };
            return Err(ClientError::Refused(err));
        }
        Ok((id, attach))
    }

    /// Attaches a sender; `address` None is the anonymous relay. `presettled` asks for
    /// settled sends (snd-settle-mode settled).
    pub async fn sender(
        &mut self,
        name: &str,
        address: Option<&str>,
        presettled: bool,
    ) -> Result<LinkId, ClientError> {
        let (id, _) = self
            .attach(AttachRequest {
                name: name.to_owned(),
                role: Role::Sender,
                source: Some(Terminus::default()),
                target: Some(Terminus {
                    address: address.map(str::to_owned),
                    ..Terminus::default()
                }),
                snd_settle_mode: if presettled { 1 } else { 0 },
                rcv_settle_mode: 0,
            })
            .await?;
        Ok(id)
    }

    /// Attaches a receiver reading from `source` (any terminus: durable, with a filter, ...)
    /// and grants `credit`.
    pub async fn receiver_from(
        &mut self,
        name: &str,
        source: Terminus,
        credit: u32,
        presettled: bool,
    ) -> Result<LinkId, ClientError> {
        Ok(self
            .attach_receiver(name, source, credit, presettled)
            .await?
            .0)
    }

    /// Attaches a receiver, grants `credit`; returns it and the source the peer answered with.
    async fn attach_receiver(
        &mut self,
        name: &str,
        source: Terminus,
        credit: u32,
        presettled: bool,
    ) -> Result<(LinkId, Option<Terminus>), ClientError> {
        let (id, attach) = self
            .attach(AttachRequest {
                name: name.to_owned(),
                role: Role::Receiver,
                source: Some(source),
                target: Some(Terminus::default()),
                snd_settle_mode: if presettled { 1 } else { 2 },
                rcv_settle_mode: 0,
            })
            .await?;
        self.conn.set_credit(id, credit, false);
        self.flush().await?;
        Ok((id, attach.source))
    }

    /// Attaches a receiver and grants `credit`. With `address` None the source is dynamic;
    /// the assigned address is returned.
    pub async fn receiver(
        &mut self,
        name: &str,
        address: Option<&str>,
        credit: u32,
        presettled: bool,
    ) -> Result<(LinkId, Option<String>), ClientError> {
        let source = Terminus {
            address: address.map(str::to_owned),
            dynamic: address.is_none(),
            ..Terminus::default()
        };
        let (id, answered) = self
            .attach_receiver(name, source, credit, presettled)
            .await?;
        Ok((id, answered.and_then(|s| s.address)))
    }
}
