//! The poll task: drives rumqttc's event loop (it must be polled for anything to happen, acks
//! and keep-alives included), feeds what it reports to the [`Session`], and performs the
//! actions the session returns. It forwards each publish to the ingest loop and never waits on
//! ingest, except past the [`Hold`]'s bound (see `hold.rs`).
//!
//! Invariants: the session's decisions are performed in the order returned, before the next
//! poll (acknowledgements written behind the first of their group go out before anything else
//! rumqttc sends; when they cannot be, the connection was dropped and the session hears of it
//! as a lost connection before anything else); the subscriber's notes are taken in before rumqttc's report that a request
//! went out, since each note is made before its request enters rumqttc's channel.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::core::health::Health;

use super::acks::{self, AckLine, Exchanges};
use super::hold::{Admit, Hold};
use super::protocol::{Event, EventLoop, Inbound, PendingPublishes};
use super::replies::{Replier, ReplyBook, Waiter};
use super::session::{Action, Request, Session, SessionEvent, Shared};
use super::subscriber::SubscriberEvent;
use super::{RECONNECT_MAX_DELAY, RECONNECT_MIN_DELAY};

/// Where the poll task sends what it hears, and what it shares.
pub(super) struct Channels {
    /// Told to subscribe everything.
    pub subscriber: mpsc::UnboundedSender<SubscriberEvent>,
    /// The subscriber's requests, noted before each is handed to rumqttc.
    pub notes: mpsc::UnboundedReceiver<Request>,
    /// Publishes for the ingest loop.
    pub tx: mpsc::UnboundedSender<Inbound>,
    pub hold: Arc<Hold>,
    pub replier: Replier,
    /// Under MQTT 3.1.1: acknowledgements to write behind the first of their group.
    pub line: Option<Arc<Mutex<AckLine>>>,
    /// QoS 2 messages acknowledged and not yet released.
    pub exchanges: Arc<Exchanges>,
}

/// The reply book and the ack line as the session reaches them.
struct Books<'a> {
    replier: &'a Replier,
    line: Option<&'a Mutex<AckLine>>,
}

impl Shared<Waiter> for Books<'_> {
    fn book<R>(&self, f: impl FnOnce(&mut ReplyBook<Waiter>) -> R) -> Option<R> {
        self.replier.with_book(f)
    }

    fn line<R>(&self, f: impl FnOnce(&mut AckLine) -> R) -> Option<R> {
        self.line.map(|line| f(&mut acks::lock(line)))
    }
}

/// Fails every reply still waiting when the poll task ends, however it ends.
struct StopReplies(Replier);

impl Drop for StopReplies {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn reconnect_backoff() -> backon::ExponentialBackoff {
    crate::core::retry::retry_delays(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY)
}

/// What performing an action left to do.
enum Performed {
    Done,
    /// The event loop is done.
    Stop,
    /// Feed this event to the session next (the action ended the connection).
    Then(SessionEvent),
}

/// The poll task's own state besides the session.
struct Poller {
    eventloop: EventLoop,
    channels: Channels,
    health: Arc<Health>,
    broker: String,
    session: Session,
    /// What rumqttc held when the connection broke, to hand back if the session is new.
    held: Option<PendingPublishes>,
    backoff: backon::ExponentialBackoff,
}

/// Drives the event loop until DISCONNECT went out (or the task is aborted).
pub(super) async fn poll(
    eventloop: EventLoop,
    channels: Channels,
    health: Arc<Health>,
    broker: String,
) {
    let _stop_replies = StopReplies(channels.replier.clone());
    let mut poller = Poller {
        eventloop,
        channels,
        health,
        broker,
        session: Session::new(),
        held: None,
        backoff: reconnect_backoff(),
    };
    loop {
        let event = match poller.eventloop.poll().await {
            Ok(Event::Publish(publish)) => {
                poller.forward(publish).await;
                continue;
            }
            Ok(event) => match poller.session_event(event) {
                Some(event) => event,
                None => continue,
            },
            Err(error) => poller.lost(error),
        };
        if poller.feed(event).await {
            return;
        }
    }
}

impl Poller {
    /// The connection broke for `error`: what rumqttc holds now and when to try again.
    fn lost(&mut self, error: String) -> SessionEvent {
        // The notes of the requests rumqttc holds are all in (each is made first).
        self.take_notes();
        SessionEvent::ConnectionLost {
            error,
            retry_in: self.backoff.next().unwrap_or(RECONNECT_MAX_DELAY),
            held: self.eventloop.pending_publishes().pkids(),
            unreported: self.eventloop.unreported_publishes_sent(),
            requests: self.eventloop.requests_held(),
        }
    }

    /// The session's name for `event`; `None` for what concerns it not.
    fn session_event(&mut self, event: Event) -> Option<SessionEvent> {
        Some(match event {
            Event::Connected {
                session_present,
                max_packet_size,
            } => SessionEvent::Connected {
                session_present,
                max_packet_size,
            },
            Event::SubscribeSent(pkid) | Event::UnsubscribeSent(pkid) => {
                self.take_notes();
                SessionEvent::RequestSent(pkid)
            }
            Event::SubAck { pkid, granted } => SessionEvent::SubAck { pkid, granted },
            Event::UnsubAck { pkid, refused } => SessionEvent::UnsubAck { pkid, refused },
            Event::PublishSent(pkid) => SessionEvent::PublishSent(pkid),
            Event::PubAck { pkid, refused } => SessionEvent::PubAck { pkid, refused },
            Event::DisconnectSent => SessionEvent::DisconnectSent,
            Event::AckSent(pkid) => SessionEvent::AckSent(pkid),
            Event::Released(pkid) => SessionEvent::Released(pkid),
            Event::Publish(_) | Event::Other => return None,
        })
    }

    /// Hands a publish to ingest; past the hold's bound, waits for ingest to catch up, or
    /// when it may not wait, drops a QoS 0 publish (see `hold.rs`).
    async fn forward(&mut self, publish: Inbound) {
        let replier = &self.channels.replier;
        if self.channels.hold.admit(publish.qos, || replier.waiting()) == Admit::DropQos0 {
            self.health.count_qos0_dropped();
            self.feed(SessionEvent::DroppedQos0).await;
            return;
        }
        self.feed(SessionEvent::Publish).await;
        if self.channels.tx.is_closed() {
            // Ingest has stopped; the broker keeps this one for next time.
            return;
        }
        self.channels.hold.add(&publish);
        let _ = self.channels.tx.send(publish);
        // A reply waiting for its PUBACK needs the socket read: pausing then could hold up a
        // delivery that ingest (a full buffer) waits for.
        if self.channels.hold.full() && !self.channels.replier.waiting() {
            self.feed(SessionEvent::Paused).await;
            let Channels {
                tx, hold, replier, ..
            } = &self.channels;
            tokio::select! {
                _ = hold.wait_for_room() => {}
                _ = tx.closed() => {}
                _ = replier.handed() => {}
            }
        }
    }

    /// Hands the session the subscriber's requests noted so far (they call for no action).
    fn take_notes(&mut self) {
        let books = Books {
            replier: &self.channels.replier,
            line: self.channels.line.as_deref(),
        };
        while let Ok(request) = self.channels.notes.try_recv() {
            let actions = self
                .session
                .on(SessionEvent::Requested(request), Instant::now(), &books);
            debug_assert!(actions.is_empty(), "a note calls for no action");
        }
    }

    /// Feeds `event` to the session and performs what it returns; `true` when the event loop
    /// is done.
    async fn feed(&mut self, event: SessionEvent) -> bool {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let books = Books {
                replier: &self.channels.replier,
                line: self.channels.line.as_deref(),
            };
            let actions = self.session.on(event, Instant::now(), &books);
            for action in actions {
                match self.perform(action).await {
                    Performed::Done => {}
                    Performed::Stop => return true,
                    // The session hears of it once the rest of these actions are done.
                    Performed::Then(event) => next = Some(event),
                }
            }
        }
        false
    }

    /// Performs one action.
    async fn perform(&mut self, action: Action<Waiter>) -> Performed {
        match action {
            Action::Log(note) => note.log(&self.broker),
            Action::Connected(up) => self.health.set_mqtt_connected(up),
            Action::MaxPacket(max) => self.channels.replier.set_max_packet(max),
            Action::ExpectRepeatedReleases => self.eventloop.expect_repeated_releases(),
            Action::KeepHeld => self.held = Some(self.eventloop.pending_publishes()),
            Action::HandBackHeld => {
                if let Some(again) = self.held.take() {
                    self.eventloop.requeue(again);
                }
            }
            Action::ForgetHeld => self.held = None,
            Action::ResetBackoff => self.backoff = reconnect_backoff(),
            Action::Subscribe(standing) => {
                let event = SubscriberEvent::SubscribeUnanswered(standing);
                let _ = self.channels.subscriber.send(event);
            }
            Action::Answer(waiter, result) => {
                let _ = waiter.send(result);
            }
            Action::WriteAcks(rest) => {
                if let Err(why) = self.eventloop.write_acks(&rest).await {
                    // write_acks dropped the connection: it is lost like any other.
                    return Performed::Then(self.lost(format!(
                        "{} acknowledgements could not be written ({why}), so the connection was dropped; the broker sends those messages again after the reconnect",
                        rest.len()
                    )));
                }
            }
            Action::Released(pkid) => self.channels.exchanges.completed(pkid),
            Action::ForgetExchanges => self.channels.exchanges.forget(),
            Action::Wait(delay) => tokio::time::sleep(delay).await,
            Action::Stop => return Performed::Stop,
        }
        Performed::Done
    }
}
