//! The MQTT session as a state machine: [`Session::on`] takes one thing that happened on the
//! connection ([`SessionEvent`]) and returns what to do about it ([`Action`]s), in order. It
//! does no I/O and knows no clock: the poll task (`poll.rs`) polls rumqttc, feeds each event
//! here, and performs the actions (log, subscribe, write acknowledgements, answer a reply,
//! wait before reconnecting).
//!
//! What it decides:
//! - subscribing: on every connection, each filter of the rules in force that the broker's
//!   session has no SUBACK for ([`Answered`], emptied by a new session), so a SUBSCRIBE lost
//!   with its connection (written, no SUBACK; rumqttc never sends it again) is sent again on
//!   the resumed session, and the first connection of a process subscribes every filter;
//! - which filters and rules a SUBACK or UNSUBACK answers: requests are noted in the order the
//!   subscriber sent them ([`SessionEvent::Requested`]), matched to packet ids as rumqttc
//!   reports them sent, and to answers by packet id; those rumqttc held pending when the
//!   connection broke are forgotten when a new session drops them ([`RequestsHeld`]);
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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::acks::AckLine;
pub use super::notes::Note;
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
    /// Each filter, the QoS asked and the names of the rules that use it.
    Subscribe(Vec<(String, u8, Vec<String>)>),
    /// One filter.
    Unsubscribe(String),
}

/// The filters the broker's session answered with a SUBACK (granted or refused), with the
/// QoS asked: what it need not be asked again.
pub type Answered = HashMap<String, u8>;

/// Of `current` (the rules' filters with their QoS, in rule order), those to subscribe: each
/// that has no SUBACK in the broker's session, or one for another QoS.
pub fn unanswered(current: Vec<(String, u8)>, answered: &Answered) -> Vec<(String, u8)> {
    current
        .into_iter()
        .filter(|(filter, qos)| answered.get(filter) != Some(qos))
        .collect()
}

/// What the broker's session may hold, as far as this process knows: what it answered, and
/// every filter asked for on it and not answered by an UNSUBACK since.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Standing {
    /// What it answered with a SUBACK: need not be asked again.
    pub answered: Answered,
    /// Named by a SUBSCRIBE (answered or not: the SUBACK may have been lost) or an UNSUBSCRIBE
    /// on this session, and not unsubscribed with an UNSUBACK since.
    pub asked: BTreeSet<String>,
}

impl Standing {
    /// A request is on its way: the broker's session may hold its filters until an UNSUBACK
    /// says it does not (an UNSUBSCRIBE may be of one a previous process subscribed).
    fn note(&mut self, request: &Request) {
        match request {
            Request::Subscribe(filters) => {
                let asked = filters.iter().map(|(filter, _, _)| filter.clone());
                self.asked.extend(asked);
            }
            Request::Unsubscribe(filter) => {
                self.asked.insert(filter.clone());
            }
        }
    }
}

/// Of the filters the broker's session may hold, those no rule in `current` uses any more,
/// sorted: their UNSUBSCRIBE was lost with its connection (or is still on its way, and a
/// second one is harmless), so the broker would go on sending what matches them.
pub fn forgotten(current: &[(String, u8)], standing: &Standing) -> Vec<String> {
    standing
        .asked
        .iter()
        .filter(|filter| !current.iter().any(|(f, _)| f == *filter))
        .cloned()
        .collect()
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
        /// The subscriber's requests rumqttc holds, not reported sent yet.
        requests: RequestsHeld,
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
    /// Ingest is far behind and the poll task may not pause: a QoS 0 publish was dropped
    /// (`hold.rs`).
    DroppedQos0,
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
    /// Subscribe each filter of the rules in force that is not answered with the QoS it
    /// wants ([`unanswered`] says which, in rule order), and unsubscribe each the session may
    /// hold that no rule uses ([`forgotten`]).
    Subscribe(Standing),
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

/// The SUBSCRIBEs and UNSUBSCRIBEs rumqttc holds right after a connection broke, not yet
/// reported sent; the oldest requests noted, in this order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestsHeld {
    /// Taken and written: their reports come after the reconnect, whatever the session.
    pub taken: usize,
    /// In its pending list: sent after a reconnect that keeps the session, dropped by one
    /// that does not (and then never reported).
    pub pending: usize,
}

/// Requests in the order the subscriber sent them, then by packet id once they went out.
#[derive(Debug, Default)]
struct Requested {
    /// Handed to the event loop, not yet seen going out (the event loop keeps their order).
    queued: VecDeque<Request>,
    /// Gone out, waiting for the broker's answer.
    sent: HashMap<u16, Request>,
    /// What rumqttc held of them when the connection broke, until it connects again.
    held: RequestsHeld,
}

impl Requested {
    /// Connected again: a new session dropped the requests rumqttc held pending, so their
    /// notes go too, or each answer would name the filters of another request.
    fn on_connected(&mut self, session_present: bool) {
        let RequestsHeld { taken, pending } = std::mem::take(&mut self.held);
        if !session_present {
            let from = taken.min(self.queued.len());
            let to = (taken + pending).min(self.queued.len());
            self.queued.drain(from..to);
        }
    }
}

/// The session's state between events; see the module's overview.
#[derive(Debug, Default)]
pub struct Session {
    requested: Requested,
    /// What the broker's session answered and was asked; empty at the start of a process
    /// (what the session holds from before is not known) and after a new session.
    standing: Standing,
    outage: Option<Outage>,
    received: u64,
    pauses: u64,
    /// QoS 0 publishes dropped since the process started, and since the current run of drops
    /// began (0: none is going on).
    dropped_qos0: u64,
    dropping_qos0: u64,
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
                requests,
            } => {
                self.requested.held = requests;
                self.lost(error, retry_in, held, unreported, now, shared)
            }
            SessionEvent::Requested(request) => {
                self.standing.note(&request);
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
            SessionEvent::Publish => self.taken(),
            SessionEvent::DroppedQos0 => self.dropped(),
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
        // A new session has no subscriptions. A resumed one has those answered, and maybe
        // some whose SUBSCRIBE reached the broker before the connection died: asking again
        // is harmless, missing one leaves its rule deaf until a restart. It may also still
        // have filters no rule uses, whose UNSUBSCRIBE was lost: the subscriber asks again.
        self.requested.on_connected(session_present);
        if !session_present {
            // Requests still queued go out on the new session: their filters it may hold.
            self.standing = Standing::default();
            for request in &self.requested.queued {
                self.standing.note(request);
            }
        }
        actions.push(Action::Subscribe(self.standing.clone()));
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

    /// A publish went to ingest: counted, and the end of a run of QoS 0 drops told.
    fn taken<W>(&mut self) -> Vec<Action<W>> {
        let mut actions = Vec::new();
        if self.dropping_qos0 > 0 {
            actions.push(Action::Log(Note::StoppedDroppingQos0 {
                dropped: std::mem::take(&mut self.dropping_qos0),
                total: self.dropped_qos0,
            }));
        }
        self.received += 1;
        if self.received.is_multiple_of(RECEIVED_EVERY) {
            actions.push(Action::Log(Note::Received(self.received)));
        }
        actions
    }

    /// A QoS 0 publish was dropped: a warning at the first of a run, then a count every
    /// [`RECEIVED_EVERY`], and one line when the run ends, so each drop is in the log.
    fn dropped<W>(&mut self) -> Vec<Action<W>> {
        self.dropped_qos0 += 1;
        self.dropping_qos0 += 1;
        let note = match self.dropping_qos0 {
            1 => Note::DroppingQos0,
            n if n.is_multiple_of(RECEIVED_EVERY) => Note::StillDroppingQos0(n),
            _ => return Vec::new(),
        };
        vec![Action::Log(note)]
    }

    fn suback<W>(&mut self, pkid: u16, granted: Vec<Granted>) -> Vec<Action<W>> {
        let filters = match self.requested.sent.remove(&pkid) {
            Some(Request::Subscribe(filters)) => filters,
            _ => Vec::new(),
        };
        let mut actions = Vec::new();
        for ((filter, qos, rules), granted) in filters.into_iter().zip(granted) {
            self.standing.answered.insert(filter.clone(), qos);
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
            None => {
                self.standing.answered.remove(&filter);
                self.standing.asked.remove(&filter);
                Note::Unsubscribed(filter)
            }
            Some(reason) => Note::UnsubscribeRefused { filter, reason },
        };
        vec![Action::Log(note)]
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
            requests: RequestsHeld::default(),
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

    /// What the subscriber would send on `actions`, given the rules' `current` filters.
    fn subscribed(actions: &[Action<u32>], current: &[(&str, u8)]) -> Vec<Vec<(String, u8)>> {
        let current: Vec<(String, u8)> = current.iter().map(|(f, q)| (f.to_string(), *q)).collect();
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Subscribe(standing) => {
                    Some(unanswered(current.clone(), &standing.answered))
                }
                _ => None,
            })
            .collect()
    }

    /// The subscriber asks for `filters` (at QoS 1, for rule "r") and rumqttc sends it as `pkid`.
    fn ask(session: &mut Session, shared: &Plain, filters: &[&str], pkid: u16) {
        let asked = filters.iter().map(|f| (f.to_string(), 1, vec!["r".into()]));
        let now = Instant::now();
        session.on(
            SessionEvent::Requested(Request::Subscribe(asked.collect())),
            now,
            shared,
        );
        session.on(SessionEvent::RequestSent(pkid), now, shared);
    }

    fn suback(pkid: u16, n: usize) -> SessionEvent {
        SessionEvent::SubAck {
            pkid,
            granted: vec![Granted::Qos(1); n],
        }
    }

    fn owned(filters: &[(&str, u8)]) -> Vec<Vec<(String, u8)>> {
        vec![filters.iter().map(|(f, q)| (f.to_string(), *q)).collect()]
    }

    #[test]
    fn the_first_connection_of_a_process_subscribes_every_filter_even_to_a_resumed_session() {
        let (shared, now) = (Plain::default(), Instant::now());
        let rules = [("a/#", 1), ("b/+", 2)];
        for present in [false, true] {
            let actions = Session::new().on(connected(present), now, &shared);
            assert_eq!(subscribed(&actions, &rules), owned(&rules));
        }
    }

    #[test]
    fn a_subscribe_lost_with_its_connection_is_asked_again_on_the_resumed_session() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let rules = [("a/#", 1), ("b/+", 1)];
        session.on(connected(false), now, &shared);
        ask(&mut session, &shared, &["a/#", "b/+"], 1);
        // The connection dies before the SUBACK.
        session.on(lost("reset", vec![]), now, &shared);
        let back = session.on(connected(true), now, &shared);
        assert_eq!(subscribed(&back, &rules), owned(&rules));
        ask(&mut session, &shared, &["a/#", "b/+"], 2);
        session.on(suback(2, 2), now, &shared);
        // Answered: a later resumed session asks nothing.
        session.on(lost("reset", vec![]), now, &shared);
        let again = session.on(connected(true), now, &shared);
        assert_eq!(subscribed(&again, &rules), owned(&[]));
        // A new session has no subscriptions at all.
        session.on(lost("reset", vec![]), now, &shared);
        let new = session.on(connected(false), now, &shared);
        assert_eq!(subscribed(&new, &rules), owned(&rules));
    }

    #[test]
    fn a_reload_s_subscribe_lost_is_asked_again_alone_in_rule_order_and_a_qos_change_too() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        session.on(connected(false), now, &shared);
        ask(&mut session, &shared, &["a/#"], 1);
        session.on(suback(1, 1), now, &shared);
        // A reload adds two rules; their SUBSCRIBE dies with the connection.
        ask(&mut session, &shared, &["c", "b"], 2);
        session.on(lost("reset", vec![]), now, &shared);
        let back = session.on(connected(true), now, &shared);
        let rules = [("b", 1), ("a/#", 2), ("c", 1)];
        // a/# was answered at QoS 1, and a rule now wants 2.
        assert_eq!(subscribed(&back, &rules), owned(&rules));
        let rules = [("b", 1), ("a/#", 1), ("c", 1)];
        assert_eq!(subscribed(&back, &rules), owned(&[("b", 1), ("c", 1)]));
    }

    #[test]
    fn an_unsubscribed_filter_is_no_longer_answered() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        session.on(connected(false), now, &shared);
        ask(&mut session, &shared, &["a"], 1);
        session.on(suback(1, 1), now, &shared);
        let unsubscribe = Request::Unsubscribe("a".into());
        session.on(SessionEvent::Requested(unsubscribe), now, &shared);
        session.on(SessionEvent::RequestSent(2), now, &shared);
        let unsuback = SessionEvent::UnsubAck {
            pkid: 2,
            refused: None,
        };
        session.on(unsuback, now, &shared);
        session.on(lost("reset", vec![]), now, &shared);
        // A rule takes it again: it is asked on the resumed session.
        let back = session.on(connected(true), now, &shared);
        assert_eq!(subscribed(&back, &[("a", 1)]), owned(&[("a", 1)]));
    }

    /// The filters the subscriber unsubscribes after `actions`, with `current` in force.
    fn unsubscribed(actions: &[Action<u32>], current: &[(&str, u8)]) -> Vec<Vec<String>> {
        let current: Vec<(String, u8)> = current.iter().map(|(f, q)| (f.to_string(), *q)).collect();
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Subscribe(standing) => Some(forgotten(&current, standing)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_unsubscribe_lost_with_its_connection_is_asked_again_on_the_resumed_session() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        session.on(connected(false), now, &shared);
        ask(&mut session, &shared, &["a", "b"], 1);
        session.on(suback(1, 2), now, &shared);
        // A reload removes "b"; its UNSUBSCRIBE dies with the connection.
        let unsubscribe = Request::Unsubscribe("b".into());
        session.on(SessionEvent::Requested(unsubscribe), now, &shared);
        session.on(SessionEvent::RequestSent(2), now, &shared);
        session.on(lost("reset", vec![]), now, &shared);
        let back = session.on(connected(true), now, &shared);
        assert_eq!(unsubscribed(&back, &[("a", 1)]), [vec!["b".to_owned()]]);
        // Answered: a later resumed session asks nothing; a new one holds nothing.
        let unsubscribe = Request::Unsubscribe("b".into());
        session.on(SessionEvent::Requested(unsubscribe), now, &shared);
        session.on(SessionEvent::RequestSent(3), now, &shared);
        let unsuback = SessionEvent::UnsubAck {
            pkid: 3,
            refused: None,
        };
        session.on(unsuback, now, &shared);
        session.on(lost("reset", vec![]), now, &shared);
        let again = session.on(connected(true), now, &shared);
        assert_eq!(unsubscribed(&again, &[("a", 1)]), [Vec::<String>::new()]);
        session.on(lost("reset", vec![]), now, &shared);
        let new = session.on(connected(false), now, &shared);
        assert_eq!(unsubscribed(&new, &[]), [Vec::<String>::new()]);
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
            ("a/#".into(), 1, vec!["one".into(), "two".into()]),
            ("b/+".into(), 1, vec!["three".into()]),
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
        let subscribe = back
            .iter()
            .position(|a| matches!(a, Action::Subscribe(standing) if standing.answered.is_empty()));
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

    #[test]
    fn each_qos0_drop_is_counted_in_the_log_a_warning_first_and_the_run_s_end_told() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let mut seen = Vec::new();
        for _ in 0..25_000 {
            seen.extend(session.on(SessionEvent::DroppedQos0, now, &shared));
        }
        seen.extend(session.on(SessionEvent::Publish, now, &shared));
        seen.extend(session.on(SessionEvent::Publish, now, &shared));
        seen.extend(session.on(SessionEvent::DroppedQos0, now, &shared));
        seen.extend(session.on(SessionEvent::Publish, now, &shared));
        assert_eq!(
            notes(&seen),
            vec![
                &Note::DroppingQos0,
                &Note::StillDroppingQos0(10_000),
                &Note::StillDroppingQos0(20_000),
                &Note::StoppedDroppingQos0 {
                    dropped: 25_000,
                    total: 25_000
                },
                &Note::DroppingQos0,
                &Note::StoppedDroppingQos0 {
                    dropped: 1,
                    total: 25_001
                },
            ]
        );
    }

    #[test]
    fn a_request_noted_during_the_outage_survives_a_new_session_and_its_answer_names_it_alone() {
        let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
        let rules = [("a", 1), ("b", 1)];
        session.on(connected(false), now, &shared);
        let asked = |filters: &[&str]| {
            let named = filters
                .iter()
                .map(|f| (f.to_string(), 1, vec![f.to_string()]));
            SessionEvent::Requested(Request::Subscribe(named.collect()))
        };
        // "a" waits in rumqttc's pending list when the connection breaks; "b" (a reload) is
        // handed during the outage and waits in its request channel.
        session.on(asked(&["a"]), now, &shared);
        let broke = SessionEvent::ConnectionLost {
            error: "reset".into(),
            retry_in: Duration::from_secs(1),
            held: Vec::new(),
            unreported: Vec::new(),
            requests: RequestsHeld {
                taken: 0,
                pending: 1,
            },
        };
        session.on(broke, now, &shared);
        session.on(asked(&["b"]), now, &shared);
        // A new session: rumqttc dropped "a" and sends "b" first, then the subscriber's "a, b".
        let back = session.on(connected(false), now, &shared);
        assert_eq!(subscribed(&back, &rules), owned(&rules));
        session.on(asked(&["a", "b"]), now, &shared);
        session.on(SessionEvent::RequestSent(1), now, &shared);
        session.on(SessionEvent::RequestSent(2), now, &shared);
        // Only "b" is answered; the connection breaks before "a, b" is.
        session.on(suback(1, 1), now, &shared);
        session.on(lost("reset", vec![]), now, &shared);
        let resumed = session.on(connected(true), now, &shared);
        assert_eq!(subscribed(&resumed, &rules), owned(&[("a", 1)]));
    }

    #[test]
    fn a_new_session_drops_the_notes_of_requests_rumqttc_dropped_so_answers_name_the_right_ones() {
        for session_present in [false, true] {
            let (mut session, shared, now) = (Session::new(), Plain::default(), Instant::now());
            session.on(connected(false), now, &shared);
            let asked = |filter: &str| {
                SessionEvent::Requested(Request::Subscribe(vec![(
                    filter.into(),
                    1,
                    vec![filter.into()],
                )]))
            };
            // "a" was written as the connection broke (its report comes after the reconnect);
            // "b" waited in rumqttc's pending list; "c" was asked during the outage.
            session.on(asked("a"), now, &shared);
            session.on(asked("b"), now, &shared);
            let lost = SessionEvent::ConnectionLost {
                error: "reset".into(),
                retry_in: Duration::from_secs(1),
                held: Vec::new(),
                unreported: Vec::new(),
                requests: RequestsHeld {
                    taken: 1,
                    pending: 1,
                },
            };
            session.on(lost, now, &shared);
            session.on(asked("c"), now, &shared);
            session.on(connected(session_present), now, &shared);
            // A new session: rumqttc sends "c" only; a kept one: "b", then "c".
            let sent: &[&str] = if session_present {
                &["a", "b", "c"]
            } else {
                &["a", "c"]
            };
            for (pkid, _) in (1..).zip(sent) {
                session.on(SessionEvent::RequestSent(pkid), now, &shared);
            }
            let last = sent.len() as u16;
            let answer = session.on(suback(last, 1), now, &shared);
            assert_eq!(
                notes(&answer),
                vec![&Note::Subscribed {
                    rule: "c".into(),
                    filter: "c".into(),
                    qos: 1
                }],
                "session_present={session_present}"
            );
        }
    }
}
