//! Forming events: what a rule does to the messages it reads before they are invoked.
//!
//! Pure: no I/O, no tokio, no clock. Every method that depends on time takes a [`Now`], so the
//! tests drive time by hand and the delivery loop (`delivery/pipeline`) only performs what this
//! decides.
//!
//! ```text
//! entry ──► throttle (per topic) ──► batch  (forwarding)  ──► ready events (Unit)
//!           drop / hold / pass       or window (summaries)
//! ```
//!
//! Invariants:
//! - Events come out in queue order (a window's chunks share the window's first sequence).
//! - [`Former::lowest_pending`] is the lowest sequence read but not yet in an event that was
//!   handed out: a held throttle message, an open batch or window, a formed event not yet taken.
//!   The queue is never acknowledged at or above it.
//! - Nothing here waits: a batch closes when full, when the next message would take it over
//!   `max_bytes`, or at its deadline, which [`Former::next_due`] reports.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::envelope;
use crate::core::envelope::{Entry, Seq};
use crate::core::stats::RuleStats;
use crate::shaping::aggregate::{Aggregator, Window};
use crate::shaping::plan::RulePlan;
use crate::shaping::throttle::{DropReason, MAX_TOPICS, Outcome as ThrottleOutcome, Throttle};

/// How long a statistics window stays open past its end for its last messages to arrive.
pub const WINDOW_GRACE: Duration = Duration::from_secs(1);

/// The two clocks the stage needs: monotonic for batch deadlines, wall time for windows and
/// throttle intervals (which follow each message's `received_at`).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time.
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
}

impl Now {
    /// The monotonic instant at which wall time reaches `wall_ms` (now, if it has).
    fn at_wall(self, wall_ms: u64) -> Instant {
        self.at + Duration::from_millis(wall_ms.saturating_sub(self.wall_ms))
    }
}

/// One event ready to invoke, and the queue positions it covers.
#[derive(Debug)]
pub struct Unit {
    /// Lowest sequence in it: acknowledgements stay below until it is done.
    pub first_seq: Seq,
    /// The encoded event.
    pub payload: Vec<u8>,
    /// Messages it carries (a window counts the messages it summarizes; its later chunks 0).
    pub messages: usize,
    /// The request it answers, when the rule replies (one message per event).
    pub request: Option<Box<crate::core::reply::Request>>,
}

/// The batch being filled, its messages already encoded and joined with commas.
#[derive(Debug, Default)]
struct OpenBatch {
    encoded: Vec<u8>,
    messages: usize,
    first_seq: Option<Seq>,
    /// Bytes the messages take in the event, a separating comma per message included.
    bytes: usize,
    /// When it must close even if not full.
    deadline: Option<Instant>,
    /// The request its message makes, when the rule replies (replies need one message per
    /// event, so it is the only one).
    request: Option<Box<crate::core::reply::Request>>,
}

/// Throttle, then batch or window, for one rule.
pub struct Former {
    plan: Arc<RulePlan>,
    stats: Arc<RuleStats>,
    throttle: Option<Throttle>,
    aggregator: Option<Aggregator>,
    batch: OpenBatch,
    /// Events formed and not yet taken by [`Former::take_ready`].
    ready: VecDeque<Unit>,
    /// Where each message is encoded before it joins the batch, kept to save an allocation
    /// per message.
    scratch: Vec<u8>,
    /// The event's bytes around its messages (the rule's name is fixed for a former's life).
    overhead: usize,
}

impl Former {
    /// Nothing read yet.
    pub fn new(plan: Arc<RulePlan>, stats: Arc<RuleStats>) -> Self {
        Former {
            throttle: plan.throttle.clone().map(Throttle::new),
            aggregator: plan.aggregate.clone().map(Aggregator::new),
            batch: OpenBatch::default(),
            ready: VecDeque::new(),
            scratch: Vec::new(),
            overhead: envelope::envelope_overhead(&plan.name),
            stats,
            plan,
        }
    }

    /// Takes one entry read from the queue.
    pub fn push(&mut self, entry: Entry, now: Now) {
        match self.throttle.as_mut() {
            Some(throttle) => {
                let out = throttle.push(entry);
                self.absorb(out, now);
            }
            None => self.output(entry, now),
        }
    }

    /// Counts what the throttle dropped or forgot, and forms events of what it passed.
    fn absorb(&mut self, out: ThrottleOutcome, now: Now) {
        self.count_drops(&out.dropped);
        if out.evicted > 0 {
            let before = RuleStats::get(&self.stats.throttle_forgotten);
            RuleStats::add(&self.stats.throttle_forgotten, out.evicted);
            // Once, then at every further thousand: enough to notice, never a flood.
            if before == 0 || before / 1000 != (before + out.evicted) / 1000 {
                tracing::warn!(
                    rule = %self.plan.name, forgotten = before + out.evicted, limit = MAX_TOPICS,
                    "[rules.throttle] tracks too many topics: forgot the least recently seen; each forgotten topic lets its next message through"
                );
            }
        }
        for entry in out.pass {
            self.output(entry, now);
        }
    }

    /// Handles what falls due at `now`: batch deadlines, windows, held throttle messages.
    pub fn tick(&mut self, now: Now) {
        if let Some(out) = self.throttle.as_mut().map(|t| t.release_due(now.wall_ms)) {
            self.absorb(out, now);
        }
        if let Some(window) = self
            .aggregator
            .as_mut()
            .and_then(|a| a.close_due(now.wall_ms, WINDOW_GRACE.as_millis() as u64))
        {
            self.window_units(window);
        }
        if self.batch.deadline.is_some_and(|d| d <= now.at) {
            self.close_batch();
        }
    }

    /// Turns everything partial into events now (shutdown, once the queue is read to its end).
    pub fn flush(&mut self, now: Now) {
        if let Some(out) = self.throttle.as_mut().map(|t| t.release_due(u64::MAX)) {
            self.absorb(out, now);
        }
        if let Some(window) = self.aggregator.as_mut().and_then(Aggregator::close_now) {
            self.window_units(window);
        }
        self.close_batch();
    }

    /// When [`Former::tick`] next has something to do.
    pub fn next_due(&self, now: Now) -> Option<Instant> {
        let throttle = self
            .throttle
            .as_ref()
            .and_then(Throttle::next_due_ms)
            .map(|ms| now.at_wall(ms));
        let window = self
            .aggregator
            .as_ref()
            .and_then(Aggregator::open_until_ms)
            .map(|end| now.at_wall(end + WINDOW_GRACE.as_millis() as u64));
        [self.batch.deadline, throttle, window]
            .into_iter()
            .flatten()
            .min()
    }

    /// Events formed and waiting to be invoked.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// The sizes of the formed events, oldest first.
    pub fn ready_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.ready.iter().map(|u| u.payload.len())
    }

    /// The oldest formed event, to invoke now.
    pub fn take_ready(&mut self) -> Option<Unit> {
        self.ready.pop_front()
    }

    /// The lowest sequence read but not yet in an event handed out.
    pub fn lowest_pending(&self) -> Option<Seq> {
        [
            self.batch.first_seq,
            self.aggregator
                .as_ref()
                .and_then(Aggregator::open_first_seq),
            self.throttle.as_ref().and_then(Throttle::lowest_held),
            self.ready.iter().map(|u| u.first_seq).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether nothing read is waiting here.
    pub fn is_idle(&self) -> bool {
        self.lowest_pending().is_none()
    }

    fn count_drops(&self, dropped: &[(Entry, DropReason)]) {
        for (entry, reason) in dropped {
            let counter = match reason {
                DropReason::MinInterval => &self.stats.throttled_min_interval,
                DropReason::Unchanged => &self.stats.throttled_unchanged,
                DropReason::Deadband => &self.stats.throttled_deadband,
            };
            RuleStats::add(counter, 1);
            tracing::debug!(rule = %self.plan.name, topic = %entry.message.topic, id = %entry.message.id, reason = reason.as_str(), "dropped by [rules.throttle]");
        }
    }

    fn output(&mut self, entry: Entry, now: Now) {
        if let Some(aggregator) = self.aggregator.as_mut() {
            if let Some(window) = aggregator.push(entry.seq, &entry.message) {
                self.window_units(window);
            }
            return;
        }
        // Encoded once, here: the size decides the batch, and the bytes go into the event.
        // Into a buffer kept from message to message: no allocation per message.
        let mut encoded = std::mem::take(&mut self.scratch);
        encoded.clear();
        envelope::encode_message(&entry.message, &mut encoded);
        let len = encoded.len() + 1;
        if self.batch.messages > 0 && self.overhead + self.batch.bytes + len > self.plan.max_bytes {
            self.close_batch();
        }
        let batch = &mut self.batch;
        if batch.messages > 0 {
            batch.encoded.push(b',');
        }
        batch.encoded.extend_from_slice(&encoded);
        self.scratch = encoded;
        let batch = &mut self.batch;
        batch.bytes += len;
        batch.messages += 1;
        batch.first_seq.get_or_insert(entry.seq);
        if self.plan.reply.is_some() {
            batch.request = Some(Box::new(crate::core::reply::Request::of(&entry.message)));
        }
        if batch.messages >= self.plan.max_messages || self.plan.max_wait.is_zero() {
            self.close_batch();
        } else if batch.deadline.is_none() {
            batch.deadline = Some(now.at + self.plan.max_wait);
        }
    }

    fn close_batch(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        let Some(first_seq) = batch.first_seq else {
            return;
        };
        self.ready.push_back(Unit {
            first_seq,
            payload: envelope::event_from_encoded(&self.plan.name, &batch.encoded),
            messages: batch.messages,
            request: batch.request,
        });
    }

    /// A closed window becomes one event, or several when its groups exceed the size limit.
    fn window_units(&mut self, window: Window) {
        let Some(spec) = self.aggregator.as_ref().map(|a| a.spec().clone()) else {
            return;
        };
        let first_seq = window.first_seq;
        let messages = window.messages as usize;
        let mut chunks: Vec<Window> = Vec::new();
        let mut current = Window {
            groups: Default::default(),
            ..window.clone()
        };
        for (key, group) in window.groups {
            current.groups.insert(key.clone(), group.clone());
            let size = serde_json::to_vec(&current.to_event(&self.plan.name, &spec))
                .map_or(0, |v| v.len());
            if size > self.plan.max_bytes && current.groups.len() > 1 {
                current.groups.remove(&key);
                let empty = Window {
                    groups: Default::default(),
                    ..current.clone()
                };
                chunks.push(std::mem::replace(&mut current, empty));
                current.groups.insert(key, group);
            }
        }
        chunks.push(current);
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.ready.push_back(Unit {
                first_seq,
                payload: serde_json::to_vec(&chunk.to_event(&self.plan.name, &spec))
                    .unwrap_or_default(),
                messages: if i == 0 { messages } else { 0 },
                request: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::InvocationType;
    use crate::core::envelope::Message;
    use std::time::UNIX_EPOCH;

    fn plan(max_messages: usize, max_wait: Duration) -> Arc<RulePlan> {
        let mut plan = RulePlan::for_tests("r");
        plan.max_messages = max_messages;
        plan.max_wait = max_wait;
        plan.invocation = InvocationType::Event;
        Arc::new(plan)
    }

    fn entry(seq: Seq) -> Entry {
        Entry {
            seq,
            message: Message::received(
                "t".into(),
                seq.to_string().into_bytes(),
                1,
                false,
                UNIX_EPOCH,
            ),
        }
    }

    fn now(start: Instant, ms: u64) -> Now {
        Now {
            at: start + Duration::from_millis(ms),
            wall_ms: 1_000_000 + ms,
        }
    }

    fn sizes(former: &mut Former) -> Vec<usize> {
        std::iter::from_fn(|| former.take_ready())
            .map(|u| u.messages)
            .collect()
    }

    #[test]
    fn a_full_batch_closes_at_once_and_a_partial_one_at_its_deadline() {
        let start = Instant::now();
        let mut former = Former::new(plan(3, Duration::from_secs(5)), Arc::default());
        for seq in 0..4 {
            former.push(entry(seq), now(start, 0));
        }
        assert_eq!(sizes(&mut former), vec![3]);
        assert_eq!(
            former.lowest_pending(),
            Some(3),
            "the open batch holds seq 3"
        );
        assert_eq!(
            former.next_due(now(start, 0)),
            Some(start + Duration::from_secs(5))
        );
        former.tick(now(start, 4_999));
        assert_eq!(former.ready_len(), 0);
        former.tick(now(start, 5_000));
        assert_eq!(sizes(&mut former), vec![1]);
        assert!(former.is_idle());
    }

    #[test]
    fn without_batching_every_message_is_its_own_event() {
        let start = Instant::now();
        let mut former = Former::new(plan(1, Duration::ZERO), Arc::default());
        for seq in 0..3 {
            former.push(entry(seq), now(start, 0));
        }
        let firsts: Vec<Seq> = std::iter::from_fn(|| former.take_ready())
            .map(|u| u.first_seq)
            .collect();
        assert_eq!(firsts, vec![0, 1, 2]);
        assert_eq!(former.next_due(now(start, 0)), None);
    }

    #[test]
    fn flush_turns_a_partial_batch_into_an_event() {
        let start = Instant::now();
        let mut former = Former::new(plan(10, Duration::from_secs(60)), Arc::default());
        former.push(entry(7), now(start, 0));
        former.push(entry(8), now(start, 0));
        assert_eq!(former.ready_len(), 0);
        former.flush(now(start, 1));
        let unit = former.take_ready().expect("an event");
        assert_eq!((unit.first_seq, unit.messages), (7, 2));
        let event: serde_json::Value = serde_json::from_slice(&unit.payload).expect("json");
        assert_eq!(event["messages"][1]["payload"], serde_json::json!(8));
    }
}
