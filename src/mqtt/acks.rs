//! Acknowledgements, from the ingest loop (which knows when a group of publishes is stored) to
//! the broker, through the poll task (which owns the connection).
//!
//! rumqttc writes and flushes every request on its own: one `write` per PUBACK. Under a flood
//! that is a system call, a wake-up of the broker and a turn of rumqttc's event loop per
//! message, and the broker's in-flight window (mosquitto's `max_inflight_messages`) refills
//! one message at a time. Under MQTT 3.1.1 rumqttc lets its owner write to the connection
//! between polls, so a stored group's acknowledgements go out in one write: the group's first
//! goes through rumqttc's request channel (which wakes the event loop and keeps its place among
//! everything else sent there); when rumqttc reports it sent, the poll task writes the rest of
//! the group behind it, before it polls again. Under MQTT 5 rumqttc keeps the connection to
//! itself, and every acknowledgement goes through the channel.
//!
//! Invariants:
//! - Nothing here acknowledges a publish that is not stored: the ingest loop hands a group over
//!   only after the buffer has it.
//! - On one connection, acknowledgements go out in the order their publishes came (MQTT 3.1.1
//!   section 4.6): a group's first goes through the channel in order, the rest follow it at
//!   once, and a group is registered in the [`AckLine`] before its first enters the channel.
//! - Acknowledgements for a connection that broke are dropped from the line, as rumqttc drops
//!   the PUBACKs still in its channel: the broker sends those publishes again on the next
//!   connection (same packet ids, DUP set), and they are acknowledged then. Acknowledgements
//!   the poll task cannot write (the broker took no data for 5 s) end the connection for that
//!   reason (`internals.rs`): on a connection that stayed up the broker would never send those
//!   publishes again, and their in-flight slots would leak.
//! - Neither task waits for the other: the line's lock is held only to push or pop a group, and
//!   acknowledgements that find rumqttc's channel full wait in the [`AckQueue`] while ingest
//!   goes on (see `hold.rs` for why that matters).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::hold::Hold;
use super::protocol::{Ack, Client, Inbound};

/// Groups whose first acknowledgement is in rumqttc's request channel, the rest waiting to be
/// written behind it by the poll task. Shared by the ingest loop and the poll task.
#[derive(Debug, Default)]
pub struct AckLine {
    /// In the order their first acknowledgements entered the channel; never empty groups.
    groups: VecDeque<Vec<Ack>>,
}

impl AckLine {
    /// Registers a group whose first acknowledgement is about to enter the channel.
    pub(super) fn push(&mut self, group: Vec<Ack>) {
        if !group.is_empty() {
            self.groups.push_back(group);
        }
    }

    /// Takes back the group just pushed: its first acknowledgement did not fit in the channel.
    fn take_last(&mut self) -> Option<Vec<Ack>> {
        self.groups.pop_back()
    }

    /// rumqttc sent an acknowledgement for `pkid`: when it is the first of the oldest group,
    /// returns that group's others, to write now. Any other (one left from a broken connection)
    /// changes nothing.
    pub fn on_sent(&mut self, pkid: u16) -> Option<Vec<Ack>> {
        if self.groups.front()?.first()?.pkid != pkid {
            return None;
        }
        let mut group = self.groups.pop_front()?;
        group.remove(0);
        Some(group)
    }

    /// The connection broke: what was not written is for the broker to send again.
    pub fn on_connection_lost(&mut self) {
        self.groups.clear();
    }

    /// Groups waiting for their first to be sent.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.groups.len()
    }
}

/// The line, shared; a panic elsewhere while it was held leaves it usable.
pub fn lock(line: &Mutex<AckLine>) -> MutexGuard<'_, AckLine> {
    line.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// QoS 2 messages acknowledged (PUBREC handed over) that the broker has not released yet (its
/// PUBREL, which rumqttc answers with PUBCOMP), by packet id.
///
/// The bridge says DISCONNECT only once these are done, or after a bounded wait: mosquitto
/// sends an MQTT 5 client's unreleased QoS 2 messages again as new PUBLISHes after a
/// reconnect, which the buffer would store a second time with new ids.
#[derive(Debug, Default)]
pub struct Exchanges {
    open: Mutex<BTreeSet<u16>>,
    changed: Notify,
}

impl Exchanges {
    fn open(&self) -> MutexGuard<'_, BTreeSet<u16>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// PUBRECs for these packet ids were handed over.
    fn opened(&self, pkids: impl IntoIterator<Item = u16>) {
        self.open().extend(pkids);
    }

    /// A PUBCOMP went out for `pkid`; one for an exchange of an earlier connection changes
    /// nothing.
    pub fn completed(&self, pkid: u16) {
        if self.open().remove(&pkid) {
            self.changed.notify_waiters();
        }
    }

    /// The connection broke: its exchanges cannot complete on it (the broker resends them).
    pub fn forget(&self) {
        self.open().clear();
        self.changed.notify_waiters();
    }

    /// Waits until none is open, at most `within`; `false` when some still are.
    pub async fn settled(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            if self.open().is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.open().is_empty();
            }
        }
    }
}

/// Acknowledgements of stored publishes waiting for room in rumqttc's request channel, in the
/// order received.
///
/// rumqttc's event loop takes one request per turn but reads up to ten packets per turn, so a
/// broker that floods us can fill the request channel. If ingest then *awaited* room there, it
/// would stop draining the publish channel, the poll task would stop polling, and nothing would
/// ever drain the acks: a deadlock. So acks are handed over without waiting, and the rest wait
/// here (a packet id and a QoS each) while ingest goes on.
pub struct AckQueue {
    waiting: VecDeque<Ack>,
    /// Under MQTT 3.1.1: where a group waits for the poll task to write it in one go.
    line: Option<Arc<Mutex<AckLine>>>,
    /// Told how many wait after each flush, so the poll task never pauses while they do.
    hold: Arc<Hold>,
    /// Told of every PUBREC handed over.
    exchanges: Arc<Exchanges>,
}

impl AckQueue {
    pub fn new(
        hold: Arc<Hold>,
        line: Option<Arc<Mutex<AckLine>>>,
        exchanges: Arc<Exchanges>,
    ) -> Self {
        AckQueue {
            waiting: VecDeque::new(),
            line,
            hold,
            exchanges,
        }
    }

    pub fn extend(&mut self, publishes: &[Inbound]) {
        self.waiting
            .extend(publishes.iter().map(|p| p.ack).filter(|ack| ack.qos > 0));
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Hands over as many acks as fit; `Err` when the event loop (the poll task) is gone.
    pub fn flush(&mut self, client: &Client, poll_task: &JoinHandle<()>) -> Result<(), ()> {
        let handed = match self.line.clone() {
            Some(line) => self.hand_group(client, &line),
            None => self.hand_each(client),
        };
        self.hold.set_acks_waiting(self.waiting.len());
        // Full, or closed because the poll task ended.
        if !handed && poll_task.is_finished() {
            return Err(());
        }
        Ok(())
    }

    /// Everything waiting as one group: its first through the channel, the rest on the line.
    /// `false` when the first did not fit.
    fn hand_group(&mut self, client: &Client, line: &Mutex<AckLine>) -> bool {
        let Some(&first) = self.waiting.front() else {
            return true;
        };
        let mut line = lock(line);
        let recs: Vec<u16> = (self.waiting.iter())
            .filter(|ack| ack.qos == 2)
            .map(|ack| ack.pkid)
            .collect();
        // Registered before the first can be sent, so the poll task finds it when it is.
        line.push(self.waiting.drain(..).collect());
        if client.try_ack(first) {
            self.exchanges.opened(recs);
            return true;
        }
        self.waiting.extend(line.take_last().unwrap_or_default());
        false
    }

    /// One by one through the channel; `false` when one did not fit.
    fn hand_each(&mut self, client: &Client) -> bool {
        while let Some(ack) = self.waiting.front() {
            if !client.try_ack(*ack) {
                return false;
            }
            if ack.qos == 2 {
                self.exchanges.opened([ack.pkid]);
            }
            self.waiting.pop_front();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(pkids: &[u16]) -> Vec<Ack> {
        pkids.iter().map(|&pkid| Ack { pkid, qos: 1 }).collect()
    }

    #[test]
    fn a_group_is_released_when_its_first_is_sent_and_groups_go_in_order() {
        let mut line = AckLine::default();
        line.push(acks(&[1, 2, 3]));
        line.push(acks(&[4]));
        line.push(acks(&[5, 6]));
        assert_eq!(line.on_sent(1), Some(acks(&[2, 3])));
        assert_eq!(line.on_sent(4), Some(Vec::new()));
        assert_eq!(line.on_sent(5), Some(acks(&[6])));
        assert_eq!(line.len(), 0);
    }

    #[test]
    fn an_ack_that_starts_no_waiting_group_releases_nothing() {
        let mut line = AckLine::default();
        assert_eq!(line.on_sent(7), None);
        line.push(acks(&[1, 2]));
        // Left from a broken connection, or the second of a group: not this group's first.
        assert_eq!(line.on_sent(2), None);
        assert_eq!(line.on_sent(9), None);
        assert_eq!(line.len(), 1);
        assert_eq!(line.on_sent(1), Some(acks(&[2])));
    }

    #[test]
    fn a_broken_connection_drops_what_was_not_written() {
        let mut line = AckLine::default();
        line.push(acks(&[1, 2]));
        line.push(acks(&[3, 4]));
        line.on_connection_lost();
        assert_eq!(line.on_sent(1), None);
        assert_eq!(line.on_sent(3), None);
        // Packet ids repeat on the next connection: a new group with the same first is its own.
        line.push(acks(&[1, 5]));
        assert_eq!(line.on_sent(1), Some(acks(&[5])));
    }

    #[tokio::test(start_paused = true)]
    async fn exchanges_settle_when_each_is_released_or_the_connection_is_lost() {
        let exchanges = Arc::new(Exchanges::default());
        assert!(exchanges.settled(Duration::from_secs(1)).await);
        exchanges.opened([3, 4]);
        assert!(!exchanges.settled(Duration::from_millis(100)).await);
        let waiter = {
            let exchanges = exchanges.clone();
            tokio::spawn(async move { exchanges.settled(Duration::from_secs(5)).await })
        };
        exchanges.completed(3);
        // A release of an earlier connection's exchange is not one of these.
        exchanges.completed(9);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "4 is still open");
        exchanges.completed(4);
        assert!(waiter.await.expect("waiter"));
        exchanges.opened([5]);
        assert!(!exchanges.settled(Duration::from_millis(100)).await);
        exchanges.forget();
        assert!(exchanges.settled(Duration::ZERO).await);
    }

    #[test]
    fn a_group_taken_back_is_not_released_and_empty_groups_are_not_kept() {
        let mut line = AckLine::default();
        line.push(Vec::new());
        line.push(acks(&[1, 2]));
        assert_eq!(line.take_last(), Some(acks(&[1, 2])));
        assert_eq!(line.on_sent(1), None);
        assert_eq!(line.len(), 0);
    }
}
