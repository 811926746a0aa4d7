//! The MQTT session as a state machine: [`Session::on`] takes one thing that happened on the
//! connection ([`SessionEvent`]) and returns what to do about it ([`Action`]s), in order. It
//! does no I/O and knows no clock: the poll task (`poll.rs`) polls rumqttc, feeds each event
//! here, and performs the actions (log, subscribe, write acknowledgements, answer a reply,
//! wait before reconnecting).
//!
//! What it decides:
//! - subscribing: every filter of the rules in force on a new session, and once per process
//!   start even on a resumed one (rules added to the config since the session began);
//! - which filters and rules a SUBACK or UNSUBACK answers: requests are noted in the order the
//!   subscriber sent them ([`SessionEvent::Requested`]), matched to packet ids as rumqttc
//!   reports them sent, and to answers by packet id;
//! - the replies: the reply book follows what rumqttc sent, and after a new session the
//!   publishes rumqttc held are handed back first ([`Action::HandBackHeld`]);
//! - acknowledgements: when the first of a group went out, the rest of it is written at once
//!   ([`Action::WriteAcks`]); QoS 2 exchanges completed or lost;
//! - the outage log: one warning at the first failure, reminders after [`reminder_after`], one
//!   line with the outage's length when the broker is back, debug lines in between.
//!
//! The reply book and the ack line are shared with the tasks that fill them (delivery hands
//! replies, ingest hands acknowledgements), so the session reaches them through [`Shared`],
//! which tests implement over plain values.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::core::clock::human;

use super::acks::AckLine;
use super::protocol::{Ack, Granted};
use super::replies::ReplyBook;

/// When a broker is still down, the first reminders in the log come after these times...
const OUTAGE_FIRST_REMINDERS: [Duration; 2] = [Duration::from_secs(60), Duration::from_secs(300)];
/// ...and then one every this long.
const OUTAGE_REMINDER_EVERY: Duration = Duration::from_secs(15 * 60);
/// A debug line counts publishes received every this many.
const RECEIVED_EVERY: u64 = 10_000;

/// When the `n`-th reminder (from 0) that the broker is still down is due, counted from the
/// outage's first failure: 1 min, 5 min, then every 15 min (20 min, 35 min, ...).
pub fn reminder_after(n: u32) -> Duration {
    match OUTAGE_FIRST_REMINDERS.get(n as usize) {
        Some(at) => *at,
        None => {
            let last = OUTAGE_FIRST_REMINDERS[OUTAGE_FIRST_REMINDERS.len() - 1];
            let beyond = n - (OUTAGE_FIRST_REMINDERS.len() as u32 - 1);
            last + OUTAGE_REMINDER_EVERY * beyond
        }
    }
}

/// A SUBSCRIBE or UNSUBSCRIBE as sent, to name its filters (and the rules that use them)
/// when the broker answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Each filter and the names of the rules that use it.
    Subscribe(Vec<(String, Vec<String>)>),
    /// One filter.
    Unsubscribe(String),
}

/// What the reply book and the ack line are behind: shared with delivery and ingest.
pub trait Shared<W> {
    /// Runs `f` on the reply book; `None` when it cannot be had.
    fn book<R>(&self, f: impl FnOnce(&mut ReplyBook<W>) -> R) -> Option<R>;
    /// Runs `f` on the ack line; `None` when there is none (MQTT 5).
    fn line<R>(&self, f: impl FnOnce(&mut AckLine) -> R) -> Option<R>;
}

/// One thing that happened on the connection.
#[derive(Debug)]
pub enum SessionEvent {
    /// The broker accepted the connection.
    Connected {
        /// It still had our session.
        session_present: bool,
        /// Its Maximum Packet Size (MQTT 5), when it said.
        max_packet_size: Option<u32>,
    },
    /// A connection attempt failed or the connection broke.
    ConnectionLost {
        /// Why, in words.
        error: String,
        /// The delay before the next attempt (the backoff's).
        retry_in: Duration,
        /// Packet ids of the publishes rumqttc holds to send again, in order (0: never sent).
        held: Vec<u16>,
        /// Packet ids of publishes rumqttc sent but will report only after the reconnect.
        unreported: Vec<u16>,
    },
    /// The subscriber is about to hand this request to rumqttc.
    Requested(Request),
    /// A SUBSCRIBE or UNSUBSCRIBE went out with this packet id.
    RequestSent(u16),
    /// The answer to a SUBSCRIBE, per filter.
    SubAck {
        /// Its packet id.
        pkid: u16,
        /// Per filter, in the order sent.
        granted: Vec<Granted>,
    },
    /// The answer to an UNSUBSCRIBE.
    UnsubAck {
        /// Its packet id.
        pkid: u16,
        /// Why the broker refused, if it did.
        refused: Option<String>,
    },
    /// A publish arrived (forwarded to ingest by the poll task).
    Publish,
    /// Ingest is far behind: the poll task stops reading until it catches up.
    Paused,
    /// One of our replies went out with this packet id.
    PublishSent(u16),
    /// The broker acknowledged our reply with this packet id.
    PubAck {
        /// Its packet id.
        pkid: u16,
        /// Why the broker refused it, if it did.
        refused: Option<String>,
    },
    /// A PUBACK or PUBREC went out through the request channel.
    AckSent(u16),
    /// The broker released the QoS 2 message with this packet id.
    Released(u16),
    /// Our DISCONNECT went out.
    DisconnectSent,
}

/// What to do, in the order returned.
#[derive(Debug, PartialEq)]
pub enum Action<W> {
    /// Write this line to the log.
    Log(Note),
    /// Tell health whether the broker is connected.
    Connected(bool),
    /// The broker's Maximum Packet Size for replies (`None`: no limit).
    MaxPacket(Option<u32>),
    /// Make rumqttc accept the broker's repeated PUBRELs (a resumed session).
    ExpectRepeatedReleases,
    /// Keep the publishes rumqttc holds now, to hand back if the next session is new.
    KeepHeld,
    /// Hand the kept publishes back to rumqttc, first of all.
    HandBackHeld,
    /// The kept publishes are rumqttc's again (or nobody's): drop them.
    ForgetHeld,
    /// Start the reconnect backoff over.
    ResetBackoff,
    /// Subscribe every filter of the rules in force.
    SubscribeAll,
    /// Answer a reply's waiter.
    Answer(W, Result<(), String>),
    /// Write these acknowledgements behind the one just sent.
    WriteAcks(Vec<Ack>),
    /// The QoS 2 exchange with this packet id is complete.
    Released(u16),
    /// The connection's QoS 2 exchanges will not complete on it.
    ForgetExchanges,
    /// Wait this long before polling again (the reconnect backoff).
    Wait(Duration),
    /// The event loop is done.
    Stop,
}

/// A line for the log, with what a person needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Connected, maybe after an outage of this long.
    Connected {
        /// The broker had our session.
        session_present: bool,
        /// How long the broker was unreachable.
        after: Option<Duration>,
    },
    /// A new session: these many replies are published again.
    HandingBack(usize),
    /// A rule's filter is subscribed.
    Subscribed {
        /// The rule.
        rule: String,
        /// Its filter.
        filter: String,
        /// The QoS granted.
        qos: u8,
    },
    /// The broker refused a rule's filter.
    SubscriptionRefused {
        /// The rule.
        rule: String,
        /// Its filter.
        filter: String,
        /// Why.
        reason: String,
    },
    /// No rule uses the filter any more, and it is unsubscribed.
    Unsubscribed(String),
    /// The broker refused to unsubscribe the filter.
    UnsubscribeRefused {
        /// The filter.
        filter: String,
        /// Why.
        reason: String,
    },
    /// Publishes received so far.
    Received(u64),
    /// Reads paused; `pauses` counts them (the first is a warning).
    Pausing(u64),
    /// A reply went out with this packet id.
    ReplySent(u16),
    /// The first failure of an outage.
    CannotConnect {
        /// Why.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
    },
    /// A reminder that the broker is still down.
    StillDown {
        /// Why.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
        /// Down so far.
        down_for: Duration,
    },
    /// Still down, for another reason than before.
    ReasonChanged {
        /// Why, now.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
    },
    /// Still down, as before (debug).
    StillCannotConnect {
        /// Why.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
    },
}

/// A broker outage as the log tells it.
#[derive(Debug)]
struct Outage {
    /// The first failed attempt.
    since: Instant,
    /// Reminders logged so far.
    reminders: u32,
    /// The last failure's words, to tell when the reason changes.
    error: String,
}

/// Requests in the order the subscriber sent them, then by packet id once they went out.
#[derive(Debug, Default)]
struct Requested {
    /// Handed to the event loop, not yet seen going out (the event loop keeps their order).
    queued: VecDeque<Request>,
    /// Gone out, waiting for the broker's answer.
    sent: HashMap<u16, Request>,
}

/// The session's state between events; see the module's overview.
#[derive(Debug, Default)]
pub struct Session {
    requested: Requested,
    /// Everything was subscribed once since the process started.
    subscribed_once: bool,
    outage: Option<Outage>,
    received: u64,
    pauses: u64,
    /// How many publishes are kept from a broken connection, if any are.
    held: Option<usize>,
}

impl Session {
    /// A session before its first connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// What to do about `event`, which happened at `now`.
    pub fn on<W>(
        &mut self,
        event: SessionEvent,
        now: Instant,
        shared: &impl Shared<W>,
    ) -> Vec<Action<W>> {
        match event {
            SessionEvent::Connected {
                session_present,
                max_packet_size,
            } => self.connected(session_present, max_packet_size, now, shared),
            SessionEvent::ConnectionLost {
                error,
                retry_in,
                held,
                unreported,
            } => self.lost(error, retry_in, held, unreported, now, shared),
            SessionEvent::Requested(request) => {
                self.requested.queued.push_back(request);
                Vec::new()
            }
            SessionEvent::RequestSent(pkid) => {
                if let Some(request) = self.requested.queued.pop_front() {
                    self.requested.sent.insert(pkid, request);
                }
                Vec::new()
            }
            SessionEvent::SubAck { pkid, granted } => self.suback(pkid, granted),
            SessionEvent::UnsubAck { pkid, refused } => self.unsuback(pkid, refused),
            SessionEvent::Publish => {
                self.received += 1;
                if self.received.is_multiple_of(RECEIVED_EVERY) {
                    return vec![Action::Log(Note::Received(self.received))];
                }
                Vec::new()
            }
            SessionEvent::Paused => {
                self.pauses += 1;
                vec![Action::Log(Note::Pausing(self.pauses))]
            }
            SessionEvent::PublishSent(pkid) => {
                shared.book(|book| book.on_sent(pkid));
                vec![Action::Log(Note::ReplySent(pkid))]
            }
            SessionEvent::PubAck { pkid, refused } => {
                match shared.book(|book| book.on_puback(pkid)).flatten() {
                    Some(waiter) => vec![Action::Answer(waiter, refused.map_or(Ok(()), Err))],
                    None => Vec::new(),
                }
            }
            SessionEvent::AckSent(pkid) => match shared.line(|line| line.on_sent(pkid)).flatten() {
                Some(rest) if !rest.is_empty() => vec![Action::WriteAcks(rest)],
                _ => Vec::new(),
            },
            SessionEvent::Released(pkid) => vec![Action::Released(pkid)],
            SessionEvent::DisconnectSent => vec![Action::Connected(false), Action::Stop],
        }
    }

    fn connected<W>(
        &mut self,
        session_present: bool,
        max_packet_size: Option<u32>,
        now: Instant,
        shared: &impl Shared<W>,
    ) -> Vec<Action<W>> {
        let mut actions = vec![Action::Connected(true), Action::MaxPacket(max_packet_size)];
        if session_present {
            actions.push(Action::ExpectRepeatedReleases);
        }
        let held = self.held.take();
        let new_session = shared.book(|book| book.on_connected(session_present)) == Some(true);
        match held {
            Some(replies) if new_session => {
                actions.push(Action::Log(Note::HandingBack(replies)));
                actions.push(Action::HandBackHeld);
            }
            Some(_) => actions.push(Action::ForgetHeld),
            None => {}
        }
        actions.push(Action::ResetBackoff);
        let after = self
            .outage
            .take()
            .map(|outage| now.saturating_duration_since(outage.since));
        actions.push(Action::Log(Note::Connected {
            session_present,
            after,
        }));
        // A new session has no subscriptions; a resumed one has those of the config it began
        // with, so the first connection of a process subscribes the current rules anyway.
        if !session_present || !self.subscribed_once {
            self.subscribed_once = true;
            actions.push(Action::SubscribeAll);
        }
        actions
    }

    fn lost<W>(
        &mut self,
        error: String,
        retry_in: Duration,
        held: Vec<u16>,
        unreported: Vec<u16>,
        now: Instant,
        shared: &impl Shared<W>,
    ) -> Vec<Action<W>> {
        let mut actions = vec![Action::Connected(false), Action::ForgetExchanges];
        shared.line(|line| line.on_connection_lost());
        let count = held.len();
        // `false` for a failed attempt: rumqttc still holds what it held at the break.
        if shared.book(|book| book.on_connection_lost(held, unreported)) == Some(true) {
            self.held = Some(count);
            actions.push(Action::KeepHeld);
        }
        actions.push(Action::Log(self.failure(error, retry_in, now)));
        actions.push(Action::Wait(retry_in));
        actions
    }

    /// The log line for one failed attempt: a warning at the first of an outage and at each
    /// reminder, info when the reason changes, debug otherwise (a broker down for a day must
    /// not fill the journal, nor fall silent).
    fn failure(&mut self, error: String, retry_in: Duration, now: Instant) -> Note {
        let Some(current) = &mut self.outage else {
            self.outage = Some(Outage {
                since: now,
                reminders: 0,
                error: error.clone(),
            });
            return Note::CannotConnect { error, retry_in };
        };
        let down_for = now.saturating_duration_since(current.since);
        let changed = current.error != error;
        current.error = error.clone();
        if down_for >= reminder_after(current.reminders) {
            current.reminders += 1;
            Note::StillDown {
                error,
                retry_in,
                down_for,
            }
        } else if changed {
            Note::ReasonChanged { error, retry_in }
        } else {
            Note::StillCannotConnect { error, retry_in }
        }
    }

    fn suback<W>(&mut self, pkid: u16, granted: Vec<Granted>) -> Vec<Action<W>> {
        let filters = match self.requested.sent.remove(&pkid) {
            Some(Request::Subscribe(filters)) => filters,
            _ => Vec::new(),
        };
        let mut actions = Vec::new();
        for ((filter, rules), granted) in filters.into_iter().zip(granted) {
            // One line per rule, so each rule's subscription can be found by its name.
            for rule in rules {
                let note = match &granted {
                    Granted::Qos(qos) => Note::Subscribed {
                        rule,
                        filter: filter.clone(),
                        qos: *qos,
                    },
                    Granted::Refused(reason) => Note::SubscriptionRefused {
                        rule,
                        filter: filter.clone(),
                        reason: reason.clone(),
                    },
                };
                actions.push(Action::Log(note));
            }
        }
        actions
    }

    fn unsuback<W>(&mut self, pkid: u16, refused: Option<String>) -> Vec<Action<W>> {
        let Some(Request::Unsubscribe(filter)) = self.requested.sent.remove(&pkid) else {
            return Vec::new();
        };
        let note = match refused {
            None => Note::Unsubscribed(filter),
            Some(reason) => Note::UnsubscribeRefused { filter, reason },
        };
        vec![Action::Log(note)]
    }
}

impl Note {
    /// Writes the line; `broker` is the broker's URL, for the connection's lines.
    pub fn log(&self, broker: &str) {
        match self {
            Note::Connected {
                session_present,
                after: Some(outage),
            } => tracing::info!(
                broker = %broker,
                session_present,
                "connected to the MQTT broker again after an outage of {}",
                human(*outage)
            ),
            Note::Connected {
                session_present,
                after: None,
            } => tracing::info!(broker = %broker, session_present, "connected to the MQTT broker"),
            Note::HandingBack(replies) => tracing::info!(
                replies,
                "the broker started a new session: publishing the replies it had not acknowledged again"
            ),
            Note::Subscribed { rule, filter, qos } => {
                tracing::info!(rule = %rule, filter = %filter, granted = qos, "subscribed")
            }
            Note::SubscriptionRefused {
                rule,
                filter,
                reason,
            } => tracing::error!(
                rule = %rule, filter = %filter, reason = %reason,
                "the broker refused the subscription ({reason}); check its ACL for this client"
            ),
            Note::Unsubscribed(filter) => {
                tracing::info!(filter = %filter, "unsubscribed: no rule uses this filter any more")
            }
            Note::UnsubscribeRefused { filter, reason } => tracing::warn!(
                filter = %filter, reason = %reason,
                "the broker refused to unsubscribe; messages on this filter that match no rule are acknowledged and dropped"
            ),
            Note::Received(received) => {
                tracing::debug!(received, "publishes received from the broker")
            }
            Note::Pausing(1) => tracing::warn!(
                held = super::INGEST_HOLD_MAX,
                "ingest is far behind the broker: pausing reads from it while the buffer catches up"
            ),
            Note::Pausing(pauses) => tracing::debug!(pauses, "pausing reads from the broker again"),
            Note::ReplySent(pkid) => {
                tracing::debug!(pkid, "reply sent; waiting for the broker's acknowledgement")
            }
            _ => self.log_outage(broker),
        }
    }

    fn log_outage(&self, broker: &str) {
        match self {
            Note::CannotConnect { error, retry_in } => tracing::warn!(
                broker = %broker,
                retry_in = %human(*retry_in),
                "cannot connect to the MQTT broker: {error}; retrying with backoff, no messages arrive meanwhile"
            ),
            Note::StillDown {
                error,
                retry_in,
                down_for,
            } => tracing::warn!(
                broker = %broker,
                retry_in = %human(*retry_in),
                "the MQTT broker is still unreachable after {}: {error}; no messages arrive meanwhile",
                human(*down_for)
            ),
            Note::ReasonChanged { error, retry_in } => tracing::info!(
                broker = %broker, retry_in = %human(*retry_in),
                "the MQTT broker still cannot be reached, now: {error}"
            ),
            Note::StillCannotConnect { error, retry_in } => tracing::debug!(
                broker = %broker, retry_in = %human(*retry_in),
                "still cannot reach the MQTT broker: {error}"
            ),
            _ => {}
        }
    }
}
