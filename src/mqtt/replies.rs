//! Replies to devices: a `request_response` rule with `[rules.reply]` publishes the function's
//! response back to MQTT, to the request's MQTT 5 Response Topic (with its Correlation Data)
//! when it matches `reply.allow`, or else to the rule's `reply.topic`, where `{topic}` stands
//! for the request's topic (`crate::core::reply::destination` decides).
//!
//! A reply is part of its message's delivery: the invocation counts as done only once the
//! broker has acknowledged the reply (PUBACK, QoS 1), so the queue is never acknowledged past a
//! message whose reply is not at the broker. A crash before that invokes the function again at
//! the next start and publishes the reply again: replies are at least once, like invocations,
//! and carry the request's `id` (MQTT 5 user property `request_id`) to deduplicate on.
//!
//! Which PUBACK answers which reply: rumqttc reports a packet id per publish sent
//! (`Outgoing::Publish`) in the order publishes were handed to it, and a PUBACK per packet id.
//! [`ReplyBook`] (pure) follows that: replies handed but not yet sent in order, sent ones by
//! packet id. Across a broken connection rumqttc keeps what it held (in flight, and not yet
//! sent) and sends it again when the broker kept the session; when the broker starts a new
//! session rumqttc drops it, so the poll task (`poll.rs`, told by `session.rs`) hands those
//! publishes back first of all ([`ReplyBook::on_connected`] says which, in which order) and
//! the book follows them. So a
//! reply waits through any number of broker restarts and reconnects without being lost or
//! matched to another reply's PUBACK.
//!
//! [`Replier`] is the async side the delivery loop uses: it checks the topic (a valid topic
//! name, and not one a replying rule takes, which would feed replies back in as requests
//! forever), hands the reply over and waits for its PUBACK.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::core::reply::{Request, check_topic_name};
use crate::mqtt::protocol::{Client, Reply};

/// How soon a reply that found rumqttc's request channel full is offered again.
const HAND_OFF_RETRY: Duration = Duration::from_millis(5);
/// Most replies handed over and not yet acknowledged by the broker. rumqttc numbers publishes
/// within its in-flight window (the broker's Receive Maximum under MQTT 5, mosquitto's
/// default being 20) and takes held publishes past that window after a reconnect, where two
/// could share a packet id; half the usual window keeps every reply's id its own.
pub const REPLIES_IN_FLIGHT: usize = 10;
/// What an MQTT 5 PUBLISH adds around topic, payload and properties, at most (fixed header,
/// lengths, packet id, property ids).
const PUBLISH_OVERHEAD: usize = 64;

/// Where each reply handed to rumqttc is, as its events tell. Pure: the poll task feeds it
/// events, and it hands back the waiter of a reply when its PUBACK came.
#[derive(Debug)]
pub struct ReplyBook<T> {
    /// Handed over, not yet reported sent, in the order handed.
    queued: VecDeque<T>,
    /// Sent with this packet id, waiting for the PUBACK.
    sent: HashMap<u16, T>,
    /// Packet ids whose "sent" report is still to come after a reconnect, already accounted.
    late: VecDeque<u16>,
    /// What rumqttc held when the connection broke (packet ids in its order, 0 = never sent),
    /// until the broker says whether it kept the session.
    held: Option<Vec<u16>>,
    /// Whether the connection is up (a failed connect attempt changes nothing).
    connected: bool,
}

impl<T> Default for ReplyBook<T> {
    fn default() -> Self {
        ReplyBook {
            queued: VecDeque::new(),
            sent: HashMap::new(),
            late: VecDeque::new(),
            held: None,
            connected: false,
        }
    }
}

impl<T> ReplyBook<T> {
    /// A reply is being handed to rumqttc (before it is: its report may come at once).
    pub fn handed(&mut self, waiter: T) {
        self.queued.push_back(waiter);
    }

    /// The reply just noted by [`ReplyBook::handed`] could not be handed over after all.
    pub fn withdraw_last(&mut self) -> Option<T> {
        self.queued.pop_back()
    }

    /// rumqttc sent a publish with `pkid`.
    pub fn on_sent(&mut self, pkid: u16) {
        if self.late.front() == Some(&pkid) {
            // Reported after a reconnect; accounted for when the connection broke.
            self.late.pop_front();
            return;
        }
        if self.sent.contains_key(&pkid) {
            // Sent again after a reconnect, with the same packet id.
            return;
        }
        if let Some(waiter) = self.queued.pop_front() {
            self.sent.insert(pkid, waiter);
        }
    }

    /// The broker acknowledged `pkid`: its reply's waiter.
    pub fn on_puback(&mut self, pkid: u16) -> Option<T> {
        self.sent.remove(&pkid)
    }

    /// The connection broke. `held`: the packet ids rumqttc holds to send again, in order;
    /// `unreported`: publishes it sent but will report only after the reconnect. Returns
    /// whether the book took note: `false` for a failed connect attempt, after which rumqttc
    /// still holds what it held at the break.
    pub fn on_connection_lost(&mut self, held: Vec<u16>, unreported: Vec<u16>) -> bool {
        if !self.connected {
            return false;
        }
        self.connected = false;
        for pkid in unreported {
            self.on_sent(pkid);
            self.late.push_back(pkid);
        }
        self.held = Some(held);
        true
    }

    /// The broker accepted the connection. Returns `true` when it started a new session and
    /// rumqttc dropped what it held: the caller hands those publishes back, first and in the
    /// order it held them, and the book now expects them so.
    pub fn on_connected(&mut self, session_present: bool) -> bool {
        self.connected = true;
        let Some(held) = self.held.take() else {
            return false;
        };
        if session_present || held.is_empty() {
            // rumqttc sends them again itself: in-flight ones with their packet ids, the
            // others as new publishes, in order.
            return false;
        }
        let mut again = VecDeque::with_capacity(held.len() + self.queued.len());
        for pkid in held {
            let waiter = if pkid == 0 {
                self.queued.pop_front()
            } else {
                self.sent.remove(&pkid)
            };
            again.extend(waiter);
        }
        again.append(&mut self.queued);
        self.queued = again;
        true
    }

    /// Every waiter, when the event loop has ended.
    pub fn drain(&mut self) -> Vec<T> {
        self.late.clear();
        self.held = None;
        let mut all: Vec<T> = self.queued.drain(..).collect();
        all.extend(self.sent.drain().map(|(_, w)| w));
        all
    }

    /// Replies waiting for their PUBACK.
    pub fn len(&self) -> usize {
        self.queued.len() + self.sent.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a reply was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The topic cannot be published to.
    #[error("the reply topic {topic:?} cannot be used: {why}")]
    BadTopic {
        /// The topic.
        topic: String,
        /// Why.
        why: String,
    },
    /// A replying rule takes the topic: the reply would come back as a request.
    #[error(
        "the reply topic {topic:?} is taken by rule {rule}, which replies too: replies would come back as requests forever; change [rules.reply] topic"
    )]
    Loop {
        /// The topic.
        topic: String,
        /// The rule that takes it.
        rule: String,
    },
    /// The broker refused it (MQTT 5 PUBACK reason).
    #[error("the broker refused the reply on {topic:?}: {reason}")]
    Refused {
        /// The topic.
        topic: String,
        /// Its reason code and string.
        reason: String,
    },
    /// Larger than the broker accepts (its MQTT 5 Maximum Packet Size).
    #[error(
        "the reply to {topic:?} is {size} bytes, more than the broker accepts ({max} bytes, its Maximum Packet Size)"
    )]
    TooLarge {
        /// The topic.
        topic: String,
        /// The reply's size as sent.
        size: usize,
        /// The broker's limit.
        max: usize,
    },
    /// The MQTT side has stopped (shutdown).
    #[error("the MQTT connection has stopped")]
    Stopped,
}

impl ReplyError {
    /// A short code for dead letters and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ReplyError::BadTopic { .. } => "ReplyTopicInvalid",
            ReplyError::Loop { .. } => "ReplyLoop",
            ReplyError::Refused { .. } => "ReplyRefused",
            ReplyError::TooLarge { .. } => "ReplyTooLarge",
            ReplyError::Stopped => "Stopped",
        }
    }
}

/// Tells which replying rule takes a topic, if one does.
pub type LoopGuard = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

pub(crate) type Waiter = oneshot::Sender<Result<(), String>>;

/// Publishes replies and waits for their PUBACKs; cheap to clone.
#[derive(Clone)]
pub struct Replier {
    shared: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// Handing over and noting happen under this lock, so the book's order is rumqttc's.
    book: Mutex<ReplyBook<Waiter>>,
    guard: OnceLock<LoopGuard>,
    /// Set when the event loop has ended: nothing handed over will go out.
    stopped: std::sync::atomic::AtomicBool,
    /// Bounds the replies waiting for their PUBACK ([`REPLIES_IN_FLIGHT`]).
    in_flight: tokio::sync::Semaphore,
    /// The broker's Maximum Packet Size (MQTT 5 CONNACK); 0 when it set none.
    max_packet: std::sync::atomic::AtomicUsize,
    /// Told of each reply handed over, so a paused poll task goes on polling for its PUBACK.
    handed: tokio::sync::Notify,
}

impl Replier {
    /// Replies through `client`, whose event loop the poll task reports to the reply book (`Replier::with_book`).
    pub fn new(client: Client) -> Self {
        Replier {
            shared: Arc::new(Shared {
                client,
                book: Mutex::new(ReplyBook::default()),
                guard: OnceLock::new(),
                stopped: std::sync::atomic::AtomicBool::new(false),
                in_flight: tokio::sync::Semaphore::new(REPLIES_IN_FLIGHT),
                max_packet: std::sync::atomic::AtomicUsize::new(0),
                handed: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Sets what tells a replying rule's topic (once the rules are running).
    pub fn set_loop_guard(&self, guard: LoopGuard) {
        let _ = self.shared.guard.set(guard);
    }

    /// The broker's Maximum Packet Size from its CONNACK (`None`: no limit).
    pub fn set_max_packet(&self, max: Option<u32>) {
        let max = max.map_or(0, |m| usize::try_from(m).unwrap_or(usize::MAX));
        self.shared
            .max_packet
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a reply waits for its PUBACK (the poll task must keep polling then).
    pub fn waiting(&self) -> bool {
        self.with_book(|b| !b.is_empty()).unwrap_or(false)
    }

    /// Resolves when a reply is handed over.
    pub async fn handed(&self) {
        self.shared.handed.notified().await;
    }

    /// Runs `f` on the book (the poll task, for each event that concerns it).
    pub fn with_book<R>(&self, f: impl FnOnce(&mut ReplyBook<Waiter>) -> R) -> Option<R> {
        self.shared.book.lock().ok().map(|mut book| f(&mut book))
    }

    /// The event loop has ended: every waiting reply fails with [`ReplyError::Stopped`].
    pub fn stop(&self) {
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(waiters) = self.with_book(|b| b.drain()) {
            for waiter in waiters {
                let _ = waiter.send(Err(String::new()));
            }
        }
    }

    /// Publishes `payload` to `topic` at QoS 1 and waits for the broker's PUBACK, through any
    /// number of reconnects.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        request: &Request,
    ) -> Result<(), ReplyError> {
        if let Err(why) = check_topic_name(&topic) {
            return Err(ReplyError::BadTopic { topic, why });
        }
        if let Some(rule) = self.shared.guard.get().and_then(|guard| guard(&topic)) {
            return Err(ReplyError::Loop { topic, rule });
        }
        let size = PUBLISH_OVERHEAD
            + topic.len()
            + payload.len()
            + request.id.len()
            + request.correlation_data.as_ref().map_or(0, Vec::len);
        let max = self
            .shared
            .max_packet
            .load(std::sync::atomic::Ordering::Relaxed);
        if max > 0 && size > max {
            // rumqttc would fail the connection on it, and send it again after every
            // reconnect: a loop.
            return Err(ReplyError::TooLarge { topic, size, max });
        }
        let Ok(_permit) = self.shared.in_flight.acquire().await else {
            return Err(ReplyError::Stopped);
        };
        let reply = Reply {
            topic: topic.clone(),
            payload: Bytes::from(payload),
            retain,
            correlation_data: request.correlation_data.clone().map(Bytes::from),
            request_id: request.id.clone(),
        };
        let (tx, rx) = oneshot::channel();
        let mut waiter = Some(tx);
        loop {
            if self
                .shared
                .stopped
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(ReplyError::Stopped);
            }
            let handed = {
                let Ok(mut book) = self.shared.book.lock() else {
                    return Err(ReplyError::Stopped);
                };
                if let Some(w) = waiter.take() {
                    book.handed(w);
                }
                if self.shared.client.try_publish_reply(reply.clone()) {
                    true
                } else {
                    waiter = book.withdraw_last();
                    false
                }
            };
            if handed {
                self.shared.handed.notify_one();
                break;
            }
            // The request channel is full (or the event loop is gone: checked above).
            tokio::time::sleep(HAND_OFF_RETRY).await;
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) if !reason.is_empty() => Err(ReplyError::Refused { topic, reason }),
            _ => Err(ReplyError::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book_with(n: u32) -> ReplyBook<u32> {
        let mut book = ReplyBook::default();
        book.on_connected(false);
        for i in 0..n {
            book.handed(i);
        }
        book
    }

    #[test]
    fn pubacks_answer_the_reply_sent_with_their_packet_id() {
        let mut book = book_with(3);
        book.on_sent(7);
        book.on_sent(8);
        assert_eq!(book.on_puback(8), Some(1));
        book.on_sent(9);
        assert_eq!(book.on_puback(7), Some(0));
        assert_eq!(book.on_puback(9), Some(2));
        assert!(book.is_empty());
        // A PUBACK nobody waits for (an ack of something else) changes nothing.
        assert_eq!(book.on_puback(7), None);
    }

    #[test]
    fn a_kept_session_resends_in_flight_replies_with_their_ids_and_the_rest_in_order() {
        let mut book = book_with(3);
        book.on_sent(1);
        // Reply 0 in flight as 1; replies 1 and 2 were still in the request channel.
        book.on_connection_lost(vec![1, 0, 0], vec![]);
        // Failed attempts while the broker is down change nothing.
        book.on_connection_lost(vec![1, 0, 0], vec![]);
        book.handed(3);
        assert!(!book.on_connected(true));
        book.on_sent(1); // reply 0 again, same id
        book.on_sent(2); // reply 1
        book.on_sent(3); // reply 2
        book.on_sent(4); // reply 3, handed during the outage
        assert_eq!(book.on_puback(1), Some(0));
        assert_eq!(book.on_puback(4), Some(3));
        assert_eq!(book.on_puback(3), Some(2));
        assert_eq!(book.on_puback(2), Some(1));
        assert!(book.is_empty());
    }

    #[test]
    fn a_new_session_gets_everything_held_again_first_and_in_order() {
        let mut book = book_with(4);
        book.on_sent(5); // reply 0
        book.on_sent(6); // reply 1
        assert_eq!(book.on_puback(5), Some(0));
        // Reply 1 in flight, 2 not yet sent; 3 handed after the break (still in the channel).
        book.on_connection_lost(vec![6, 0], vec![]);
        assert!(book.on_connected(false));
        // The poll task hands 1 and 2 back first, as new publishes; then 3 from the channel.
        book.on_sent(1);
        book.on_sent(2);
        book.on_sent(3);
        assert_eq!(book.on_puback(1), Some(1));
        assert_eq!(book.on_puback(2), Some(2));
        assert_eq!(book.on_puback(3), Some(3));
        assert!(book.is_empty());
    }

    #[test]
    fn sends_reported_late_after_a_break_are_counted_once() {
        let mut book = book_with(2);
        // Reply 0 went out as 9 in the turn that broke; rumqttc reports it after the reconnect.
        book.on_connection_lost(vec![9, 0], vec![9]);
        assert!(!book.on_connected(true));
        book.on_sent(9); // the late report
        book.on_sent(9); // sent again, same id
        book.on_sent(10); // reply 1
        assert_eq!(book.on_puback(9), Some(0));
        assert_eq!(book.on_puback(10), Some(1));

        let mut book = book_with(2);
        book.on_connection_lost(vec![9, 0], vec![9]);
        assert!(book.on_connected(false));
        book.on_sent(9); // the late report
        book.on_sent(1); // reply 0 handed back
        book.on_sent(2); // reply 1 handed back
        assert_eq!(book.on_puback(1), Some(0));
        assert_eq!(book.on_puback(2), Some(1));
        assert!(book.is_empty());
    }

    #[test]
    fn a_collision_reuses_an_id_only_after_its_puback() {
        let mut book = book_with(2);
        book.on_sent(1);
        // rumqttc holds reply 1 until 1 is acknowledged, then sends it as 1.
        assert_eq!(book.on_puback(1), Some(0));
        book.on_sent(1);
        assert_eq!(book.on_puback(1), Some(1));
    }
}
