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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    const MIN: u64 = 60;

    /// The shared book and line over plain values; waiters are numbers.
    #[derive(Default)]
    struct Plain {
        book: RefCell<ReplyBook<u32>>,
        line: Option<RefCell<AckLine>>,
    }

    impl Shared<u32> for Plain {
        fn book<R>(&self, f: impl FnOnce(&mut ReplyBook<u32>) -> R) -> Option<R> {
            Some(f(&mut self.book.borrow_mut()))
        }

        fn line<R>(&self, f: impl FnOnce(&mut AckLine) -> R) -> Option<R> {
            self.line.as_ref().map(|line| f(&mut line.borrow_mut()))
        }
    }

    fn connected(session_present: bool) -> SessionEvent {
        SessionEvent::Connected {
            session_present,
            max_packet_size: None,
        }
    }

    fn lost(error: &str, held: Vec<u16>) -> SessionEvent {
        SessionEvent::ConnectionLost {
            error: error.into(),
            retry_in: Duration::from_secs(1),
            held,
            unreported: Vec::new(),
        }
    }

    fn notes(actions: &[Action<u32>]) -> Vec<&Note> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(note) => Some(note),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reminders_come_after_one_and_five_minutes_then_every_fifteen() {
        let at: Vec<u64> = (0..6).map(|n| reminder_after(n).as_secs()).collect();
        assert_eq!(
            at,
            vec![MIN, 5 * MIN, 20 * MIN, 35 * MIN, 50 * MIN, 65 * MIN]
        );
    }

    #[test]
    fn a_day_down_gives_about_a_hundred_reminders_not_one_per_retry() {
        let day = Duration::from_secs(24 * 3600);
        let reminders = (0..).take_while(|n| reminder_after(*n) <= day).count();
        // 1 min, 5 min, then 95 of every 15 min up to 24 h.
        assert_eq!(reminders, 2 + (24 * 60 - 5) / 15);
    }

    #[test]
    fn an_outage_is_reminded_on_schedule_and_its_length_told() {
        let (mut session, shared, start) = (Session::new(), Plain::default(), Instant::now());
        let first = session.on(lost("refused", vec![]), start, &shared);
        assert!(matches!(notes(&first)[..], [Note::CannotConnect { .. }]));
        // A retry every 30 s for 40 minutes.
        let mut reminders_seen = Vec::new();
        for i in 1..=80u64 {
            let now = start + Duration::from_secs(30 * i);
            let actions = session.on(lost("refused", vec![]), now, &shared);
            if matches!(notes(&actions)[..], [Note::StillDown { .. }]) {
                reminders_seen.push(30 * i);
            }
        }
        assert_eq!(reminders_seen, vec![60, 300, 1200, 2100]);
        let back = session.on(connected(true), start + Duration::from_secs(2401), &shared);
        assert!(notes(&back).contains(&&Note::Connected {
            session_present: true,
            after: Some(Duration::from_secs(2401)),
        }));
    }

    #[test]
    fn connection_lost_then_back_logs_one_warning_and_one_recovery() {
        let (mut session, shared, start) = (Session::new(), Plain::default(), Instant::now());
        let mut seen = Vec::new();
        let mut feed = |event, at: u64| {
            let actions = session.on(event, start + Duration::from_secs(at), &shared);
            seen.extend(notes(&actions).into_iter().cloned());
        };
        feed(connected(false), 0);
        feed(lost("connection reset", vec![]), 10);
        feed(lost("connection refused", vec![]), 11);
        feed(lost("connection refused", vec![]), 13);
        feed(connected(true), 20);
        let error = |e: &str| e.to_owned();
        let retry_in = Duration::from_secs(1);
        assert_eq!(
            seen,
            vec![
                Note::Connected {
                    session_present: false,
                    after: None
                },
                Note::CannotConnect {
                    error: error("connection reset"),
                    retry_in
                },
                Note::ReasonChanged {
                    error: error("connection refused"),
                    retry_in
                },
                Note::StillCannotConnect {
                    error: error("connection refused"),
                    retry_in
                },
                Note::Connected {
                    session_present: true,
                    after: Some(Duration::from_secs(10))
                },
            ]
        );
    }

    #[test]
    fn a_new_session_subscribes_every_filter_of_the_current_rules() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let subscribes = |actions: Vec<Action<u32>>| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::SubscribeAll))
                .count()
        };
        // The first connection of a process subscribes, even to a resumed session.
        assert_eq!(subscribes(session.on(connected(true), now, &shared)), 1);
        session.on(lost("reset", vec![]), now, &shared);
        // A resumed session keeps its subscriptions.
        assert_eq!(subscribes(session.on(connected(true), now, &shared)), 0);
        session.on(lost("reset", vec![]), now, &shared);
        // A new one has none.
        assert_eq!(subscribes(session.on(connected(false), now, &shared)), 1);
    }

    #[test]
    fn a_resumed_session_expects_repeated_releases_and_a_new_one_does_not() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let resumed = session.on(connected(true), now, &shared);
        assert!(resumed.contains(&Action::ExpectRepeatedReleases));
        let new = session.on(connected(false), now, &shared);
        assert!(!new.contains(&Action::ExpectRepeatedReleases));
    }

    #[test]
    fn a_suback_names_the_rules_it_answers() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let subscribe = Request::Subscribe(vec![
            ("a/#".into(), vec!["one".into(), "two".into()]),
            ("b/+".into(), vec!["three".into()]),
        ]);
        session.on(SessionEvent::Requested(subscribe), now, &shared);
        session.on(
            SessionEvent::Requested(Request::Unsubscribe("c".into())),
            now,
            &shared,
        );
        session.on(SessionEvent::RequestSent(4), now, &shared);
        session.on(SessionEvent::RequestSent(5), now, &shared);
        let unsuback = session.on(
            SessionEvent::UnsubAck {
                pkid: 5,
                refused: None,
            },
            now,
            &shared,
        );
        assert_eq!(notes(&unsuback), vec![&Note::Unsubscribed("c".into())]);
        let suback = session.on(
            SessionEvent::SubAck {
                pkid: 4,
                granted: vec![Granted::Qos(1), Granted::Refused("not authorized".into())],
            },
            now,
            &shared,
        );
        let subscribed = |rule: &str| Note::Subscribed {
            rule: rule.into(),
            filter: "a/#".into(),
            qos: 1,
        };
        assert_eq!(
            notes(&suback),
            vec![
                &subscribed("one"),
                &subscribed("two"),
                &Note::SubscriptionRefused {
                    rule: "three".into(),
                    filter: "b/+".into(),
                    reason: "not authorized".into(),
                },
            ]
        );
        // An answer to nothing noted (or answered already) names nothing.
        let again = session.on(
            SessionEvent::SubAck {
                pkid: 4,
                granted: vec![Granted::Qos(1)],
            },
            now,
            &shared,
        );
        assert!(again.is_empty());
    }

    #[test]
    fn replies_are_handed_back_after_a_new_session_and_answered_in_order() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        session.on(connected(false), now, &shared);
        for waiter in 0..3 {
            shared.book.borrow_mut().handed(waiter);
        }
        session.on(SessionEvent::PublishSent(1), now, &shared);
        // Reply 0 in flight as 1; 1 and 2 not sent yet.
        let broke = session.on(lost("reset", vec![1, 0, 0]), now, &shared);
        assert!(broke.contains(&Action::KeepHeld));
        // A failed attempt keeps what was kept at the break.
        let failed = session.on(lost("refused", vec![]), now, &shared);
        assert!(!failed.contains(&Action::KeepHeld));
        let back = session.on(connected(false), now, &shared);
        assert!(notes(&back).contains(&&Note::HandingBack(3)));
        let hand_back = back.iter().position(|a| *a == Action::HandBackHeld);
        let subscribe = back.iter().position(|a| *a == Action::SubscribeAll);
        assert!(hand_back.is_some() && subscribe.is_some());
        for pkid in [1, 2, 3] {
            session.on(SessionEvent::PublishSent(pkid), now, &shared);
        }
        let mut answered = Vec::new();
        for pkid in [3, 1, 2] {
            let refused = (pkid == 2).then(|| "quota exceeded".to_owned());
            for action in session.on(SessionEvent::PubAck { pkid, refused }, now, &shared) {
                if let Action::Answer(waiter, result) = action {
                    answered.push((waiter, result));
                }
            }
        }
        assert_eq!(
            answered,
            vec![
                (2, Ok(())),
                (0, Ok(())),
                (1, Err("quota exceeded".to_owned()))
            ]
        );
    }

    #[test]
    fn a_resumed_session_leaves_the_held_replies_to_rumqttc() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        session.on(connected(false), now, &shared);
        shared.book.borrow_mut().handed(0);
        session.on(SessionEvent::PublishSent(1), now, &shared);
        session.on(lost("reset", vec![1]), now, &shared);
        let back = session.on(connected(true), now, &shared);
        assert!(back.contains(&Action::ForgetHeld));
        assert!(!back.contains(&Action::HandBackHeld));
        session.on(SessionEvent::PublishSent(1), now, &shared);
        let acked = session.on(
            SessionEvent::PubAck {
                pkid: 1,
                refused: None,
            },
            now,
            &shared,
        );
        assert_eq!(acked, vec![Action::Answer(0, Ok(()))]);
    }

    #[test]
    fn the_first_ack_of_a_group_sent_writes_the_rest_and_a_lost_connection_drops_them() {
        let shared = Plain {
            line: Some(RefCell::default()),
            ..Plain::default()
        };
        let (mut session, now) = (Session::new(), Instant::now());
        let acks = |pkids: &[u16]| -> Vec<Ack> {
            pkids.iter().map(|&pkid| Ack { pkid, qos: 1 }).collect()
        };
        let push = |group: Vec<Ack>| shared.line(|line| line.push(group));
        push(acks(&[1, 2, 3]));
        push(acks(&[4]));
        assert_eq!(
            session.on(SessionEvent::AckSent(1), now, &shared),
            vec![Action::WriteAcks(acks(&[2, 3]))]
        );
        // A group of one has nothing to write behind its first.
        assert!(
            session
                .on(SessionEvent::AckSent(4), now, &shared)
                .is_empty()
        );
        push(acks(&[5, 6]));
        let lost = session.on(lost("reset", vec![]), now, &shared);
        assert!(lost.contains(&Action::ForgetExchanges));
        assert!(
            session
                .on(SessionEvent::AckSent(5), now, &shared)
                .is_empty()
        );
    }

    #[test]
    fn releases_complete_exchanges_and_a_disconnect_stops() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        assert_eq!(
            session.on(SessionEvent::Released(7), now, &shared),
            vec![Action::Released(7)]
        );
        assert_eq!(
            session.on(SessionEvent::DisconnectSent, now, &shared),
            vec![Action::Connected(false), Action::Stop]
        );
    }

    #[test]
    fn publishes_are_counted_in_the_log_every_ten_thousand_and_pauses_warn_once() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let logged: usize = (0..25_000)
            .map(|_| session.on(SessionEvent::Publish, now, &shared).len())
            .sum();
        assert_eq!(logged, 2);
        assert_eq!(
            session.on(SessionEvent::Paused, now, &shared),
            vec![Action::Log(Note::Pausing(1))]
        );
        assert_eq!(
            session.on(SessionEvent::Paused, now, &shared),
            vec![Action::Log(Note::Pausing(2))]
        );
    }
}
