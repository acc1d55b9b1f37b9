//! A client connection inside the router's process that speaks to the core in its own typed
//! messages ([`ToCore`], [`ToConn`]) instead of AMQP frames.
//!
//! Standalone's MQTT gateway multiplexes its devices over a few connections to the router. Over
//! AMQP (even through an in-process pipe) every message was encoded by the gateway's engine,
//! decoded by the router's, and its outcome encoded and decoded back: `perf` put a fifth of the
//! process's CPU in those two engines when 10,000 devices publish to one subscriber. [`Conn`]
//! offers the gateway the same calls and events as the AMQP client engine
//! ([`amqp::Connection`]), so the gateway's multiplexer drives either, and does what the
//! router's connection task ([`crate::conn`]) does with a peer's frames: attaches become
//! [`ToCore::Attach`] (termini read by the same [`Subscription::of`]), credit becomes
//! [`ToCore::ConsumerCredit`], deliveries and outcomes keep their core ids. The same byte
//! budgets bound what each side holds of the other's messages.
//!
//! Sans-IO: the owner hands [`Conn::take_output`] to the core and feeds the core's batches to
//! [`Conn::apply`]. Not supported, as the gateway needs neither: dynamic sources and targets,
//! receivers that settle second (treated as settling first), drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use amqp::frames::{Attach, DeliveryTag, Terminus};
use amqp::{AttachRequest, DeliveryState, Event, LinkId, Role};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::conn::Subscription;
use crate::core::{ConnId, Dir, LinkRef, ToConn, ToCore};

/// What a process needs to open [`Conn`]s on its router: the core's channel and the per
/// connection byte budget (`router.limits.connection_buffer_bytes`).
#[derive(Clone, Debug)]
pub struct Core {
    pub core: mpsc::Sender<Vec<ToCore>>,
    pub budget: usize,
}

/// In-process connection ids are taken from the top of the range, apart from the listener's.
static NEXT_ID: AtomicU64 = AtomicU64::new(1 << 62);

struct LinkState {
    dir: Dir,
    /// The core accepted the attach.
    open: bool,
    /// A producer on the anonymous relay: each message names its address.
    anonymous: bool,
    /// Consumer: deliveries received (AMQP delivery-count) and credit left. Producer: credit
    /// left to send with.
    delivery_count: u32,
    credit: u32,
    /// The attach's name and termini, echoed in the answer event.
    request: Option<Box<AttachRequest>>,
}

/// One in-process connection to the core.
pub struct Conn {
    id: ConnId,
    links: HashMap<LinkId, LinkState, rustc_hash::FxBuildHasher>,
    next_link: u32,
    /// Next id for a producer's delivery (echoed in its outcome) and for a delivery to a
    /// consumer (the id the owner settles).
    next_out: u32,
    next_in: u32,
    /// Deliveries to consumers not settled yet: id → (core id, link).
    unsettled: HashMap<u32, (u64, LinkId), rustc_hash::FxBuildHasher>,
    out: Vec<ToCore>,
    events: std::collections::VecDeque<Event>,
    out_bytes: Arc<AtomicUsize>,
    in_bytes: Arc<AtomicUsize>,
    budget: usize,
    closed: bool,
}

impl Conn {
    /// Opens a connection as container `container_id` (durable subscriptions are named after
    /// it); the core's batches for it arrive on the returned receiver.
    pub fn open(container_id: &str, core: &Core) -> (Conn, mpsc::UnboundedReceiver<Vec<ToConn>>) {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let out_bytes = Arc::new(AtomicUsize::new(0));
        let in_bytes = Arc::new(AtomicUsize::new(0));
        let c = Conn {
            id,
            links: HashMap::default(),
            next_link: 0,
            next_out: 0,
            next_in: 0,
            unsettled: HashMap::default(),
            out: vec![ToCore::ConnOpened {
                conn: id,
                tx,
                remote: "in-process".to_owned(),
                container_id: container_id.to_owned(),
                out_bytes: out_bytes.clone(),
                in_bytes: in_bytes.clone(),
            }],
            events: Default::default(),
            out_bytes,
            in_bytes,
            budget: core.budget,
            closed: false,
        };
        (c, rx)
    }

    fn r(&self, link: LinkId) -> LinkRef {
        LinkRef {
            conn: self.id,
            link,
        }
    }

    /// What to hand to the core now (empty: nothing).
    pub fn take_output(&mut self) -> Vec<ToCore> {
        std::mem::take(&mut self.out)
    }

    /// The core holds more of this connection's messages than the budget allows: take no more
    /// sends until it has caught up (the TCP read pause of a network connection).
    pub fn paused(&self) -> bool {
        self.in_bytes.load(Ordering::Acquire) >= self.budget
    }

    /// The message the core must hear when the owner is done (or the core's close was seen).
    pub fn close(&mut self) -> Option<ToCore> {
        (!std::mem::replace(&mut self.closed, true)).then_some(ToCore::ConnClosed { conn: self.id })
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Asks the core for a link; its answer comes as [`Event::Attach`] (accepted) or
    /// [`Event::LinkClosed`] (refused, with the reason). `None`: not supported here.
    pub fn attach(&mut self, req: AttachRequest) -> Option<LinkId> {
        // The request's role is ours: a sender of ours is the core's producer.
        let dir = match req.role {
            Role::Sender => Dir::Producer,
            Role::Receiver => Dir::Consumer,
        };
        let terminus = match dir {
            Dir::Producer => req.target.as_ref(),
            Dir::Consumer => req.source.as_ref(),
        };
        if terminus.is_some_and(|t| t.dynamic) {
            return None;
        }
        let address = terminus.and_then(|t| t.address.clone());
        if address.is_none() && dir == Dir::Consumer {
            return None;
        }
        // Ids are not reused soon: the core may still send for a link it has not seen
        // detached yet, and that must not reach a new link.
        let mut link = LinkId(self.next_link);
        while self.links.contains_key(&link) {
            link = LinkId(link.0.wrapping_add(1));
        }
        self.next_link = link.0.wrapping_add(1);
        let sub = Subscription::of(dir, req.source.as_ref());
        let presettled = dir == Dir::Consumer && req.snd_settle_mode == 1;
        let name = req.name.clone();
        self.links.insert(
            link,
            LinkState {
                dir,
                open: false,
                anonymous: address.is_none(),
                delivery_count: 0,
                credit: 0,
                request: Some(Box::new(req)),
            },
        );
        let r = self.r(link);
        self.out.push(ToCore::Attach {
            link: r,
            dir,
            name,
            address,
            presettled,
            durable: sub.durable,
            shared: sub.shared,
            keep_ms: sub.keep_ms,
        });
        Some(link)
    }

    /// Sends on a producer link within its credit; the outcome of an unsettled send comes as
    /// [`Event::Disposition`] for the returned id. `None`: no credit, or no such link.
    /// `to`: the message's `to` as the caller wrote it, if it knows it (an anonymous link's
    /// message is routed by it; otherwise it is read back out of the message).
    pub fn send(
        &mut self,
        link: LinkId,
        msg: Bytes,
        to: Option<String>,
        settled: bool,
    ) -> Option<u32> {
        let l = self
            .links
            .get_mut(&link)
            .filter(|l| l.open && l.dir == Dir::Producer && l.credit > 0)?;
        let to = match (l.anonymous, to) {
            (false, _) => None,
            (true, Some(to)) => Some(to),
            // The gateway builds its messages; one it cannot read back is not sent.
            (true, None) => amqp::message::find_to(&msg).ok()?,
        };
        l.credit -= 1;
        let id = self.next_out;
        self.next_out = self.next_out.wrapping_add(1);
        self.in_bytes.fetch_add(msg.len(), Ordering::AcqRel);
        let r = self.r(link);
        self.out.push(ToCore::Deliver {
            link: r,
            delivery_id: id,
            settled,
            to,
            payload: msg,
            format: 0,
        });
        Some(id)
    }

    /// Settles a delivery received on a consumer link with `state`.
    pub fn disposition(&mut self, delivery_id: u32, state: DeliveryState) {
        if let Some((dlv, _)) = self.unsettled.remove(&delivery_id) {
            let state = if state.is_terminal() {
                state
            } else {
                DeliveryState::Released
            };
            self.out.push(ToCore::Outcome {
                dlv,
                state,
                confirm: None,
            });
        }
    }

    /// A consumer link's credit left (0 for any other).
    pub fn receiver_credit(&self, link: LinkId) -> u32 {
        self.links
            .get(&link)
            .filter(|l| l.dir == Dir::Consumer)
            .map_or(0, |l| l.credit)
    }

    /// Sets a consumer link's credit.
    pub fn set_credit(&mut self, link: LinkId, credit: u32) {
        let Some(l) = self
            .links
            .get_mut(&link)
            .filter(|l| l.open && l.dir == Dir::Consumer)
        else {
            return;
        };
        l.credit = credit;
        let limit = l.delivery_count.wrapping_add(credit);
        let r = self.r(link);
        self.out.push(ToCore::ConsumerCredit {
            link: r,
            limit,
            drain: false,
        });
    }

    /// Detaches a link; `closed` ends its terminus (a durable subscription is deleted).
    /// Its unsettled deliveries go back to the core with the link.
    pub fn detach(&mut self, link: LinkId, closed: bool) {
        if let Some(l) = self.links.remove(&link) {
            if l.open {
                let r = self.r(link);
                self.out.push(ToCore::Detach { link: r, closed });
            }
            self.forget(link);
        }
    }

    fn forget(&mut self, link: LinkId) {
        self.unsettled.retain(|_, (_, lk)| *lk != link);
    }

    /// Applies one of the core's batches; its effects are read with [`Conn::poll_event`].
    pub fn apply(&mut self, batch: Vec<ToConn>) {
        let mut drained = 0;
        for m in batch {
            match m {
                ToConn::AttachOk { link } => {
                    let Some(l) = self.links.get_mut(&link) else {
                        continue;
                    };
                    l.open = true;
                    let Some(req) = l.request.take() else {
                        continue;
                    };
                    // The answer as a peer would give it: the termini echoed, roles swapped.
                    let attach = Attach {
                        name: req.name,
                        handle: link.0,
                        role: match req.role {
                            Role::Sender => Role::Receiver,
                            Role::Receiver => Role::Sender,
                        },
                        snd_settle_mode: req.snd_settle_mode,
                        rcv_settle_mode: 0,
                        source: req.source.or_else(|| Some(Terminus::default())),
                        target: req.target.or_else(|| Some(Terminus::default())),
                        initial_delivery_count: None,
                        max_message_size: None,
                        offered_capabilities: None,
                        desired_capabilities: None,
                        properties: None,
                    };
                    self.events.push_back(Event::Attach {
                        link,
                        attach: Box::new(attach),
                    });
                }
                // Refused, or detached by the router: the link is gone either way.
                ToConn::AttachRefused { link, error } | ToConn::Detach { link, error } => {
                    if self.links.remove(&link).is_some() {
                        self.forget(link);
                        self.events.push_back(Event::LinkClosed {
                            link,
                            error: Some(error),
                            remote: true,
                            closed: true,
                        });
                    }
                }
                ToConn::AddCredit { link, n } => {
                    self.producer_credit(link, |c| c.saturating_add(n))
                }
                ToConn::RevokeCredit { link } => self.producer_credit(link, |_| 0),
                ToConn::Deliver {
                    link,
                    dlv,
                    payload,
                    format,
                } => {
                    drained += payload.len();
                    self.deliver(link, dlv, payload, format);
                }
                ToConn::Outcome {
                    link: _,
                    delivery_id,
                    state,
                } => self.events.push_back(Event::Disposition {
                    channel: 0,
                    role: Role::Receiver,
                    first: delivery_id,
                    last: delivery_id,
                    settled: true,
                    state: Some(state),
                }),
                // Neither is asked for here (no drain, no settling second).
                ToConn::DrainDone { .. } | ToConn::Confirm { .. } => {}
                ToConn::Close { error } => {
                    self.events.push_back(Event::Closed(Some(error)));
                }
            }
        }
        // Deliveries count against the core's budget for this connection until they are
        // handed on (the owner's consumers are bounded by their credit from here).
        if drained > 0 {
            let before = self.out_bytes.fetch_sub(drained, Ordering::AcqRel);
            if before >= self.budget && before - drained < self.budget {
                self.out.push(ToCore::Writable { conn: self.id });
            }
        }
    }

    fn producer_credit(&mut self, link: LinkId, f: impl FnOnce(u32) -> u32) {
        if let Some(l) = self.links.get_mut(&link).filter(|l| l.dir == Dir::Producer) {
            l.credit = f(l.credit);
            self.events.push_back(Event::Credit {
                link,
                credit: l.credit,
                drain: false,
            });
        }
    }

    fn deliver(&mut self, link: LinkId, dlv: Option<u64>, payload: Bytes, format: u32) {
        let Some(l) = self
            .links
            .get_mut(&link)
            .filter(|l| l.dir == Dir::Consumer && l.credit > 0)
        else {
            // The link went away (or its credit was used up) after the core chose it: give
            // the delivery back so the producer hears about it.
            if let Some(d) = dlv {
                self.out.push(ToCore::give_back(d));
            }
            return;
        };
        l.credit -= 1;
        l.delivery_count = l.delivery_count.wrapping_add(1);
        let id = self.next_in;
        self.next_in = self.next_in.wrapping_add(1);
        if let Some(d) = dlv {
            self.unsettled.insert(id, (d, link));
        }
        let tag = DeliveryTag::new(&dlv.unwrap_or(0).to_be_bytes()).unwrap_or_default();
        self.events.push_back(Event::Delivery(amqp::Delivery {
            link,
            delivery_id: id,
            tag,
            settled: dlv.is_none(),
            message_format: format,
            rcv_settle_mode: None,
            payload,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amqp::ErrorCondition;

    fn open() -> (Conn, ConnId) {
        let (core, _rx) = mpsc::channel(1);
        let (mut c, _from_core) = Conn::open("mqtt", &Core { core, budget: 1000 });
        let id = match c.take_output().as_slice() {
            [
                ToCore::ConnOpened {
                    conn, container_id, ..
                },
            ] => {
                assert_eq!(container_id, "mqtt");
                *conn
            }
            other => panic!("expected ConnOpened, got {other:?}"),
        };
        (c, id)
    }

    fn request(role: Role, address: Option<&str>) -> AttachRequest {
        let t = Terminus {
            address: address.map(str::to_owned),
            ..Default::default()
        };
        AttachRequest {
            name: "dev-1".into(),
            role,
            source: Some(t.clone()),
            target: Some(t),
            snd_settle_mode: 0,
            rcv_settle_mode: 0,
        }
    }

    #[test]
    fn a_consumer_attaches_gets_credit_and_settles_with_core_ids() {
        let (mut c, id) = open();
        let link = c.attach(request(Role::Receiver, Some("t/a"))).unwrap();
        assert!(matches!(
            c.take_output().as_slice(),
            [ToCore::Attach { link: r, dir: Dir::Consumer, address: Some(a), .. }]
                if r.conn == id && a == "t/a"
        ));
        // No credit before the core answers.
        c.set_credit(link, 5);
        assert!(c.take_output().is_empty());
        c.apply(vec![ToConn::AttachOk { link }]);
        assert!(matches!(c.poll_event(), Some(Event::Attach { link: l, .. }) if l == link));
        c.set_credit(link, 2);
        assert!(matches!(
            c.take_output().as_slice(),
            [ToCore::ConsumerCredit {
                limit: 2,
                drain: false,
                ..
            }]
        ));
        let msg = Bytes::from_static(b"m");
        c.apply(vec![
            ToConn::Deliver {
                link,
                dlv: Some(41),
                payload: msg.clone(),
                format: 0,
            },
            ToConn::Deliver {
                link,
                dlv: Some(42),
                payload: msg.clone(),
                format: 0,
            },
            // Past the credit: given back.
            ToConn::Deliver {
                link,
                dlv: Some(43),
                payload: msg.clone(),
                format: 0,
            },
        ]);
        let mut ids = Vec::new();
        while let Some(e) = c.poll_event() {
            match e {
                Event::Delivery(d) => ids.push(d.delivery_id),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ids.len(), 2);
        assert!(matches!(
            c.take_output().as_slice(),
            [ToCore::Outcome {
                dlv: 43,
                state: DeliveryState::Released,
                ..
            }]
        ));
        assert_eq!(c.receiver_credit(link), 0);
        c.disposition(ids[1], DeliveryState::Accepted);
        c.set_credit(link, 1);
        assert!(matches!(
            c.take_output().as_slice(),
            [
                ToCore::Outcome {
                    dlv: 42,
                    state: DeliveryState::Accepted,
                    ..
                },
                ToCore::ConsumerCredit { limit: 3, .. },
            ]
        ));
        // A second settlement of the same delivery is not passed on.
        c.disposition(ids[1], DeliveryState::Accepted);
        assert!(c.take_output().is_empty());
        c.detach(link, false);
        assert!(matches!(
            c.take_output().as_slice(),
            [ToCore::Detach { closed: false, .. }]
        ));
        // Its other unsettled delivery went with it.
        c.disposition(ids[0], DeliveryState::Accepted);
        assert!(c.take_output().is_empty());
    }

    #[test]
    fn an_anonymous_producer_routes_by_the_given_to_or_by_the_message() {
        let (mut c, _) = open();
        let link = c.attach(request(Role::Sender, None)).unwrap();
        c.take_output();
        c.apply(vec![
            ToConn::AttachOk { link },
            ToConn::AddCredit { link, n: 3 },
        ]);
        let mut b = bytes::BytesMut::new();
        amqp::message::build(
            &amqp::message::Simple {
                to: Some("in/message"),
                body: b"x",
                ..Default::default()
            },
            &mut b,
        );
        let msg = b.freeze();
        // Given by the caller: taken as it is, the message not read again.
        c.send(link, msg.clone(), Some("given".into()), true)
            .unwrap();
        // Not given: read out of the message.
        c.send(link, msg, None, true).unwrap();
        // Not given, and not a message: not sent.
        assert_eq!(c.send(link, Bytes::from_static(b"\xff"), None, true), None);
        let out = c.take_output();
        let tos: Vec<_> = out
            .iter()
            .filter_map(|m| match m {
                ToCore::Deliver { to, .. } => Some(to.as_deref()),
                _ => None,
            })
            .collect();
        assert_eq!(tos, [Some("given"), Some("in/message")]);
    }

    #[test]
    fn a_producer_sends_within_its_credit_and_hears_outcomes() {
        let (mut c, _) = open();
        let link = c.attach(request(Role::Sender, Some("q"))).unwrap();
        c.take_output();
        c.apply(vec![ToConn::AttachOk { link }]);
        assert!(matches!(c.poll_event(), Some(Event::Attach { .. })));
        let msg = Bytes::from_static(b"hello");
        assert_eq!(
            c.send(link, msg.clone(), None, false),
            None,
            "no credit yet"
        );
        c.apply(vec![ToConn::AddCredit { link, n: 1 }]);
        assert!(matches!(
            c.poll_event(),
            Some(Event::Credit { credit: 1, .. })
        ));
        let id = c.send(link, msg.clone(), None, false).unwrap();
        assert_eq!(
            c.send(link, msg.clone(), None, false),
            None,
            "credit used up"
        );
        assert!(matches!(
            c.take_output().as_slice(),
            [ToCore::Deliver {
                settled: false,
                to: None,
                ..
            }]
        ));
        c.apply(vec![ToConn::Outcome {
            link,
            delivery_id: id,
            state: DeliveryState::Accepted,
        }]);
        assert!(matches!(
            c.poll_event(),
            Some(Event::Disposition { first, last, state: Some(DeliveryState::Accepted), .. })
                if first == id && last == id
        ));
        c.apply(vec![ToConn::RevokeCredit { link }]);
        assert!(matches!(
            c.poll_event(),
            Some(Event::Credit { credit: 0, .. })
        ));
    }

    #[test]
    fn refusals_and_detaches_close_the_link_and_ids_are_not_reused_at_once() {
        let (mut c, _) = open();
        assert_eq!(c.attach(request(Role::Receiver, None)), None);
        let a = c.attach(request(Role::Receiver, Some("x"))).unwrap();
        c.apply(vec![ToConn::AttachRefused {
            link: a,
            error: ErrorCondition::new("amqp:not-found", "no such address"),
        }]);
        assert!(matches!(
            c.poll_event(),
            Some(Event::LinkClosed { link, error: Some(_), .. }) if link == a
        ));
        let b = c.attach(request(Role::Receiver, Some("y"))).unwrap();
        assert_ne!(a, b);
        c.apply(vec![
            ToConn::AttachOk { link: b },
            ToConn::Detach {
                link: b,
                error: ErrorCondition::new("amqp:internal-error", "gone"),
            },
        ]);
        assert!(matches!(c.poll_event(), Some(Event::Attach { .. })));
        assert!(matches!(c.poll_event(), Some(Event::LinkClosed { .. })));
        assert!(c.close().is_some());
        assert!(c.close().is_none(), "closed once");
    }
}
