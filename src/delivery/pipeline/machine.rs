//! The delivery state of one rule and its transitions ([`Core`]), pure: it takes `now`,
//! performs no I/O and never waits. The loop in `mod.rs` feeds it inputs (entries read, time,
//! invocations ended, letters written, drain, a new plan) and asks it what to do next (what
//! may start, what to acknowledge, what to wait for).
//!
//! # Modes
//!
//! ```text
//!  Running ──drain──► Draining ──queue read to its end, partials flushed, nothing left──► done
//!     │                  │
//!     │ invocation task  │ Lambda still refusing when asked to stop
//!     │ failed           ▼
//!     └────────────► Halting ──nothing in flight──► done (the rest stays in the queue)
//! ```
//!
//! Invariants:
//! - Acknowledgements stay below every unfinished event, every event formed and not started,
//!   and everything the former still holds (`ack.rs`).
//! - A refused event counts as unfinished until its dead letter is on disk; while a dead-letter
//!   write is failing, nothing new starts (it is retried with backoff), so nothing piles up.
//! - Halting starts nothing and reads nothing: in every mode each input the loop waits for can
//!   arrive, so the loop never spins.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::ack::Acks;
use crate::buffer::deadletter::DeadLetter;
use crate::buffer::{Entry, Seq};
use crate::core::stats::RuleStats;
use crate::shaping::batch::{Former, Now, Unit};
use crate::shaping::plan::RulePlan;

/// First delay before writing a dead letter again after the store failed (disk full?).
pub const LETTER_RETRY_MIN_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts at writing a dead letter.
pub const LETTER_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
/// Events formed ahead of free invocation slots: bounds memory while Lambda is slow.
const READY_AHEAD: usize = 4;
/// Bytes of a rule's events in flight at once (one event always may go, whatever its size):
/// with large batches, memory stays bounded whatever the concurrency. Each event in flight is
/// held about three times (the event, the request's copy, the SDK's body), so this holds a
/// flood's delivery to about 3 MiB. It costs no throughput an uplink can carry: 1 MiB per
/// round trip is 10 MiB/s at 100 ms (at 8 MiB, 64 events of 100 messages were in flight, 2 MiB).
pub const MAX_INFLIGHT_BYTES: usize = 1024 * 1024;

/// What the delivery of one rule is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reading the queue as it fills and delivering.
    Running,
    /// Shutdown asked: deliver what is already queued without waiting for more.
    Draining {
        /// The queue had nothing more to read, and partial batches were flushed.
        read_to_end: bool,
    },
    /// Start nothing more; let what is in flight finish, then stop.
    Halting,
}

/// How the loop should read next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadWant {
    /// Not now.
    None,
    /// Wait until something is there.
    Wait,
    /// Take what is there now, possibly nothing.
    Now,
}

/// What the loop waits for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Whether and how to read the queue.
    pub read: ReadWant,
    /// When to call [`Core::on_tick`] (batch deadline, window end, throttle slot, letter retry).
    pub wake_at: Option<std::time::Instant>,
    /// Whether a drain request would change anything.
    pub drain: bool,
    /// Nothing more to do: the delivery task ends.
    pub done: bool,
}

/// How one event's invocation ended.
#[derive(Debug)]
pub enum Outcome {
    /// Lambda accepted it.
    Delivered,
    /// Lambda can never accept it: this dead letter records why.
    Refused(Box<DeadLetter>),
    /// Shutdown came while it was being retried.
    Interrupted,
}

/// A refused event whose dead letter is not on disk yet.
#[derive(Debug)]
struct PendingLetter {
    first_seq: Seq,
    messages: usize,
    letter: Box<DeadLetter>,
    /// Failed writes so far.
    failures: u32,
    /// Not before this (after a failure).
    retry_at: Option<std::time::Instant>,
}

/// The delivery state of one rule and its transitions. Pure.
pub struct Core {
    plan: Arc<RulePlan>,
    stats: Arc<RuleStats>,
    mode: Mode,
    former: Former,
    /// Events formed under an earlier plan and not started yet; they go before the former's.
    carried: VecDeque<Unit>,
    /// What is unfinished, read and acknowledged.
    acks: Acks,
    /// Invocations in flight.
    invoking: usize,
    /// Bytes of their events.
    invoking_bytes: usize,
    /// Refused events waiting for their dead letter to be written, oldest first.
    letters: VecDeque<PendingLetter>,
    /// Whether the front letter is being written now.
    writing_letter: bool,
    /// Events in flight that cover a run of sequences wholly (first → last), and those runs
    /// once accepted, for `Queue::ack_range`: a crash then need not replay them.
    spans: BTreeMap<Seq, Seq>,
    accepted: Vec<(Seq, Seq)>,
}

impl Core {
    /// Nothing read yet.
    pub fn new(plan: Arc<RulePlan>, stats: Arc<RuleStats>) -> Self {
        Core {
            former: Former::new(plan.clone(), stats.clone()),
            acks: Acks::new(stats.clone()),
            plan,
            stats,
            mode: Mode::Running,
            carried: VecDeque::new(),
            invoking: 0,
            invoking_bytes: 0,
            letters: VecDeque::new(),
            writing_letter: false,
            spans: BTreeMap::new(),
            accepted: Vec::new(),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Entries read from the queue. In `Draining`, an empty read means the queue is read to
    /// its end: partial batches, windows and held messages become events now.
    pub fn on_read(&mut self, entries: Vec<Entry>, now: Now) {
        if entries.is_empty() {
            if let Mode::Draining { read_to_end } = &mut self.mode {
                *read_to_end = true;
                self.former.flush(now);
            }
            return;
        }
        for entry in entries {
            self.acks.read(entry.seq, entry.message.received_at_ms());
            self.former.push(entry, now);
        }
        self.acks.publish_oldest();
    }

    /// Time passed: batch deadlines, windows, held messages (letter retries are due by
    /// [`Core::letter_to_write`], which compares `now` itself).
    pub fn on_tick(&mut self, now: Now) {
        if self.mode == Mode::Running {
            self.former.tick(now);
        }
    }

    /// Shutdown asked to deliver what is queued and stop.
    pub fn on_drain(&mut self) {
        if self.mode == Mode::Running {
            self.mode = Mode::Draining { read_to_end: false };
        }
    }

    /// A reload changed the rule: what was read and not formed into events yet becomes events
    /// now (they have no later chance under the old batching), and everything formed from now
    /// on follows `plan`.
    pub fn on_plan(&mut self, plan: Arc<RulePlan>, now: Now) {
        self.former.flush(now);
        let mut old = std::mem::replace(
            &mut self.former,
            Former::new(plan.clone(), self.stats.clone()),
        );
        // Their spans are known now, under the plan that formed them: once accepted they are
        // reported as ranges like any other event (else an old event still in flight would
        // hold back every carried one's acknowledgement, and a crash would replay them all).
        for unit in std::iter::from_fn(|| old.take_ready()) {
            self.note_span(&unit);
            self.carried.push_back(unit);
        }
        self.plan = plan;
    }

    /// Records the sequences `unit` covers, for [`Core::accepted_ahead`], when the plan in force
    /// (the one that formed it) makes that known: without a throttle or windows, the former's
    /// events are consecutive runs of what was read, so one of m messages covers
    /// first..first+m-1 wholly (gaps are records the queue skipped).
    fn note_span(&mut self, unit: &Unit) {
        let contiguous = self.plan.throttle.is_none() && self.plan.aggregate.is_none();
        if contiguous && unit.messages > 0 {
            self.spans
                .insert(unit.first_seq, unit.first_seq + unit.messages as Seq - 1);
        }
    }

    /// The rule was removed: deliver what is queued, then stop (as at shutdown, for this rule).
    pub fn on_retire(&mut self) {
        self.on_drain();
    }

    /// The rule was added back while it was draining: take new messages again.
    pub fn on_resume(&mut self) {
        if let Mode::Draining { .. } = self.mode {
            self.mode = Mode::Running;
        }
    }

    /// How many invocations may start now, given the rule's current concurrency limit and
    /// [`MAX_INFLIGHT_BYTES`].
    pub fn startable(&self, limit: usize) -> usize {
        let blocked =
            self.mode == Mode::Halting || self.letters.front().is_some_and(|l| l.failures > 0);
        if blocked {
            return 0;
        }
        let slots = limit.saturating_sub(self.invoking);
        let mut bytes = self.invoking_bytes;
        let mut n = 0;
        let sizes = self
            .carried
            .iter()
            .map(|u| u.payload.len())
            .chain(self.former.ready_sizes());
        for size in sizes.take(slots) {
            if self.invoking + n > 0 && bytes + size > MAX_INFLIGHT_BYTES {
                break;
            }
            bytes += size;
            n += 1;
        }
        n
    }

    /// Takes up to `n` formed events to invoke now.
    pub fn start(&mut self, n: usize) -> Vec<Unit> {
        // Carried events got their spans from the plan that formed them (`on_plan`).
        let carried = self.carried.len();
        let units: Vec<Unit> = std::iter::from_fn(|| {
            self.carried
                .pop_front()
                .or_else(|| self.former.take_ready())
        })
        .take(n)
        .collect();
        for (i, unit) in units.iter().enumerate() {
            if i >= carried {
                self.note_span(unit);
            }
            self.acks.begin(unit.first_seq);
            self.invoking += 1;
            self.invoking_bytes += unit.payload.len();
        }
        units
    }

    /// An invocation ended. `None` is an invocation task that failed (a bug): stop taking
    /// work, leaving its event in the queue for the next start.
    pub fn on_finished(&mut self, ticket: Ticket, outcome: Option<Outcome>) {
        let Ticket {
            first_seq,
            messages,
            bytes,
        } = ticket;
        self.invoking = self.invoking.saturating_sub(1);
        self.invoking_bytes = self.invoking_bytes.saturating_sub(bytes);
        let span = self.spans.remove(&first_seq);
        match outcome {
            Some(Outcome::Delivered) => {
                self.accepted.extend(span.map(|last| (first_seq, last)));
                self.acks.finish(first_seq);
                RuleStats::add(&self.stats.delivered, messages as u64);
                RuleStats::add(&self.stats.invocations, 1);
            }
            Some(Outcome::Refused(letter)) => self.letters.push_back(PendingLetter {
                first_seq,
                messages,
                letter,
                failures: 0,
                retry_at: None,
            }),
            Some(Outcome::Interrupted) | None => self.mode = Mode::Halting,
        }
    }

    /// The dead letter to write now, if any (one at a time, in order).
    pub fn letter_to_write(&mut self, now: Now) -> Option<DeadLetter> {
        if self.writing_letter {
            return None;
        }
        let front = self.letters.front()?;
        if front.retry_at.is_some_and(|at| at > now.at) {
            return None;
        }
        self.writing_letter = true;
        Some((*front.letter).clone())
    }

    /// The front letter's write ended; on failure it is retried with backoff.
    pub fn on_letter_written(&mut self, result: Result<(), String>, now: Now) {
        self.writing_letter = false;
        match result {
            Ok(()) => {
                if let Some(done) = self.letters.pop_front() {
                    self.acks.finish(done.first_seq);
                    RuleStats::add(&self.stats.dead_lettered, done.messages as u64);
                    tracing::error!(
                        rule = %self.plan.name, function = %self.plan.function, code = %done.letter.code,
                        messages = done.messages, attempts = done.letter.attempts,
                        "moved to the dead-letter store: {}", done.letter.reason
                    );
                }
            }
            Err(error) => {
                if let Some(front) = self.letters.front_mut() {
                    front.failures += 1;
                    let delay = letter_retry_delay(front.failures);
                    front.retry_at = Some(now.at + delay);
                    if front.failures == 1 {
                        tracing::error!(
                            rule = %self.plan.name, error = %error,
                            "cannot write the dead-letter store; the event stays in the buffer and this rule pauses until it can be written"
                        );
                    }
                }
            }
        }
    }

    /// Runs of sequences Lambda accepted since the last call, above the acknowledgement
    /// position (events that finished ahead of an older one).
    pub fn accepted_ahead(&mut self) -> Vec<(Seq, Seq)> {
        let acked = self.acks.acked();
        let mut runs = std::mem::take(&mut self.accepted);
        runs.retain(|&(_, last)| acked.is_none_or(|a| last > a));
        runs
    }

    /// A new acknowledgement position, when it moved: everything read below the oldest
    /// unfinished event.
    pub fn ack_through(&mut self) -> Option<Seq> {
        let pending = [
            self.former.lowest_pending(),
            self.carried.iter().map(|u| u.first_seq).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        self.acks.through(pending)
    }

    /// What to wait for next.
    pub fn wait(&self, now: Now) -> Wait {
        let room = self.former.ready_len() + self.carried.len() < READY_AHEAD;
        let letter_retry = self
            .letters
            .front()
            .filter(|_| !self.writing_letter)
            .and_then(|l| l.retry_at);
        let nothing_left = self.invoking == 0 && self.letters.is_empty() && !self.writing_letter;
        let (read, timers, done) = match self.mode {
            Mode::Running => (
                if room { ReadWant::Wait } else { ReadWant::None },
                self.former.next_due(now),
                false,
            ),
            Mode::Draining { read_to_end } => (
                if room && !read_to_end {
                    ReadWant::Now
                } else {
                    ReadWant::None
                },
                None,
                read_to_end && self.former.is_idle() && self.carried.is_empty() && nothing_left,
            ),
            // Letters still failing at halt stay unacknowledged: the next start redelivers.
            Mode::Halting => (
                ReadWant::None,
                None,
                self.invoking == 0 && !self.writing_letter,
            ),
        };
        Wait {
            read,
            wake_at: [timers, letter_retry].into_iter().flatten().min(),
            drain: self.mode == Mode::Running,
            done,
        }
    }
}

fn letter_retry_delay(failures: u32) -> Duration {
    LETTER_RETRY_MIN_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(LETTER_RETRY_MAX_DELAY)
}

/// Which event an invocation carries, to account for it when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The event's first sequence.
    pub first_seq: Seq,
    /// Messages in it.
    pub messages: usize,
    /// Its encoded size.
    pub bytes: usize,
}

impl Ticket {
    /// The ticket of a formed event.
    pub fn of(unit: &Unit) -> Self {
        Ticket {
            first_seq: unit.first_seq,
            messages: unit.messages,
            bytes: unit.payload.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::envelope::Message;
    use std::time::UNIX_EPOCH;

    fn plan(max_messages: usize, max_wait: Duration) -> RulePlan {
        let mut plan = RulePlan::for_tests("r");
        plan.max_messages = max_messages;
        plan.max_wait = max_wait;
        plan
    }

    fn msg(n: u32) -> Message {
        Message::received(
            format!("t/{n}"),
            n.to_string().into_bytes(),
            1,
            false,
            UNIX_EPOCH,
        )
    }

    fn entries(seqs: std::ops::Range<Seq>) -> Vec<Entry> {
        seqs.map(|seq| Entry {
            seq,
            message: msg(seq as u32),
        })
        .collect()
    }

    fn at(start: std::time::Instant, ms: u64) -> Now {
        Now {
            at: start + Duration::from_millis(ms),
            wall_ms: 1_000_000 + ms,
        }
    }

    fn letter() -> Box<DeadLetter> {
        Box::new(DeadLetter {
            rule: "r".into(),
            reason: "Function not found".into(),
            code: "ResourceNotFoundException".into(),
            attempts: 1,
            first_attempt_at: String::new(),
            last_attempt_at: String::new(),
            event: serde_json::Value::Null,
        })
    }

    #[test]
    fn acks_stay_below_the_oldest_event_not_yet_accepted() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(1, Duration::ZERO)), Arc::default());
        core.on_read(entries(0..3), at(start, 0));
        assert_eq!(core.startable(8), 3);
        let units = core.start(3);
        assert_eq!(core.ack_through(), None, "nothing accepted yet");
        // The second and third are accepted before the first: still nothing can be acked.
        core.on_finished(Ticket::of(&units[1]), Some(Outcome::Delivered));
        core.on_finished(Ticket::of(&units[2]), Some(Outcome::Delivered));
        assert_eq!(core.ack_through(), None);
        core.on_finished(Ticket::of(&units[0]), Some(Outcome::Delivered));
        assert_eq!(core.ack_through(), Some(2));
        assert_eq!(core.ack_through(), None, "reported once");
    }

    #[test]
    fn the_oldest_unacknowledged_message_is_published_until_its_ack() {
        let start = std::time::Instant::now();
        let stats = Arc::new(RuleStats::default());
        let mut core = Core::new(Arc::new(plan(1, Duration::ZERO)), stats.clone());
        let received = |n: u64| {
            Message::received(
                "t".into(),
                b"x".to_vec(),
                1,
                false,
                UNIX_EPOCH + Duration::from_secs(1_000 + n),
            )
        };
        let read: Vec<Entry> = (0..2)
            .map(|seq| Entry {
                seq,
                message: received(seq),
            })
            .collect();
        core.on_read(read, at(start, 0));
        let oldest = || RuleStats::get(&stats.oldest_unacked_ms);
        assert_eq!(oldest(), 1_000_000);
        let units = core.start(2);
        core.on_finished(Ticket::of(&units[0]), Some(Outcome::Delivered));
        assert_eq!(core.ack_through(), Some(0));
        assert_eq!(oldest(), 1_001_000, "the second is the oldest now");
        core.on_finished(Ticket::of(&units[1]), Some(Outcome::Delivered));
        assert_eq!(core.ack_through(), Some(1));
        assert_eq!(oldest(), 0, "none left");
    }

    #[test]
    fn a_failing_dead_letter_write_pauses_the_rule_and_is_retried_later_not_in_a_spin() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(1, Duration::ZERO)), Arc::default());
        core.on_read(entries(0..3), at(start, 0));
        let unit = core.start(1).remove(0);
        core.on_finished(Ticket::of(&unit), Some(Outcome::Refused(letter())));
        assert!(core.letter_to_write(at(start, 0)).is_some());
        assert!(
            core.letter_to_write(at(start, 0)).is_none(),
            "one write at a time"
        );
        core.on_letter_written(Err("No space left on device".into()), at(start, 0));

        // Paused: nothing starts, nothing is written before the retry time, and the loop is
        // told to sleep until then rather than to loop.
        assert_eq!(core.startable(8), 0);
        assert!(core.letter_to_write(at(start, 10)).is_none());
        let wait = core.wait(at(start, 10));
        assert_eq!(
            wait.wake_at,
            Some(start + LETTER_RETRY_MIN_DELAY),
            "{wait:?}"
        );
        assert_eq!(core.ack_through(), None, "the refused event is not acked");

        assert!(core.letter_to_write(at(start, 1_000)).is_some());
        core.on_letter_written(Ok(()), at(start, 1_000));
        assert_eq!(core.ack_through(), Some(0));
        assert_eq!(core.startable(8), 2, "the rule flows again");
    }

    #[test]
    fn halting_reads_and_starts_nothing_and_ends_once_nothing_is_in_flight() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(1, Duration::ZERO)), Arc::default());
        core.on_read(entries(0..4), at(start, 0));
        let units = core.start(2);
        core.on_drain();
        core.on_finished(Ticket::of(&units[0]), Some(Outcome::Interrupted));
        assert_eq!(core.mode(), Mode::Halting);
        assert_eq!(core.startable(8), 0);
        let wait = core.wait(at(start, 0));
        assert_eq!((wait.read, wait.done), (ReadWant::None, false));
        core.on_finished(Ticket::of(&units[1]), Some(Outcome::Delivered));
        assert!(core.wait(at(start, 0)).done);
        assert_eq!(core.ack_through(), None, "seq 0 was never accepted");
    }

    #[test]
    fn draining_reads_what_is_there_flushes_partials_then_ends() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(10, Duration::from_secs(60))), Arc::default());
        core.on_read(entries(0..3), at(start, 0));
        core.on_drain();
        assert_eq!(core.wait(at(start, 0)).read, ReadWant::Now);
        core.on_read(Vec::new(), at(start, 0));
        assert_eq!(core.startable(8), 1, "the partial batch became an event");
        let unit = core.start(1).remove(0);
        assert!(!core.wait(at(start, 0)).done);
        core.on_finished(Ticket::of(&unit), Some(Outcome::Delivered));
        assert_eq!(core.ack_through(), Some(2));
        assert!(core.wait(at(start, 0)).done);
    }

    #[test]
    fn the_bytes_of_events_in_flight_are_capped_whatever_the_concurrency() {
        let start = std::time::Instant::now();
        let mut big = plan(1, Duration::ZERO);
        big.max_bytes = usize::MAX;
        let mut core = Core::new(Arc::new(big), Arc::default());
        let big_message = |seq| Entry {
            seq,
            message: Message::received(
                "t".into(),
                vec![b'a'; MAX_INFLIGHT_BYTES * 3 / 8],
                1,
                false,
                UNIX_EPOCH,
            ),
        };
        core.on_read((0..4).map(big_message).collect(), at(start, 0));
        assert_eq!(
            core.startable(64),
            2,
            "two of 3/8 of the budget fit under it, three do not"
        );
        let units = core.start(2);
        assert_eq!(core.startable(64), 0);
        core.on_finished(Ticket::of(&units[0]), Some(Outcome::Delivered));
        assert_eq!(core.startable(64), 1);
    }

    #[test]
    fn a_new_plan_turns_the_open_batch_into_an_event_that_goes_first_and_holds_the_acks() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(10, Duration::from_secs(60))), Arc::default());
        core.on_read(entries(0..3), at(start, 0));
        assert_eq!(core.startable(8), 0, "the batch waits for more");
        let mut next = plan(1, Duration::ZERO);
        next.function = "g".into();
        core.on_plan(Arc::new(next), at(start, 10));
        assert_eq!(
            core.ack_through(),
            None,
            "the carried event is not delivered yet"
        );
        core.on_read(entries(3..5), at(start, 20));
        assert_eq!(
            core.startable(8),
            3,
            "the carried batch, then one event per message"
        );
        let units = core.start(3);
        assert_eq!(units[0].messages, 3);
        assert_eq!(units[0].first_seq, 0);
        assert_eq!(units[1].first_seq, 3);
        for unit in &units {
            core.on_finished(Ticket::of(unit), Some(Outcome::Delivered));
        }
        assert_eq!(core.ack_through(), Some(4));
    }

    #[test]
    fn events_accepted_ahead_of_a_slow_one_are_reported_as_runs_once() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(2, Duration::from_secs(1))), Arc::default());
        core.on_read(entries(0..6), at(start, 0));
        let units = core.start(3);
        assert_eq!(units.len(), 3, "three events of two");
        core.on_finished(Ticket::of(&units[2]), Some(Outcome::Delivered));
        core.on_finished(Ticket::of(&units[1]), Some(Outcome::Delivered));
        assert_eq!(core.accepted_ahead(), [(4, 5), (2, 3)]);
        assert_eq!(core.accepted_ahead(), [], "reported once");
        assert_eq!(core.ack_through(), None, "the first is still in flight");
        core.on_finished(Ticket::of(&units[0]), Some(Outcome::Delivered));
        assert_eq!(core.ack_through(), Some(5));
        assert_eq!(core.accepted_ahead(), [], "in order: no range needed");
    }

    #[test]
    fn events_carried_over_a_new_plan_are_reported_as_runs_once_accepted() {
        let start = std::time::Instant::now();
        let mut core = Core::new(Arc::new(plan(1, Duration::ZERO)), Arc::default());
        core.on_read(entries(0..5), at(start, 0));
        let slow = core.start(1);
        assert_eq!(
            slow[0].first_seq, 0,
            "the oldest goes first and stays in flight"
        );
        core.on_plan(Arc::new(plan(2, Duration::ZERO)), at(start, 10));
        let carried = core.start(4);
        assert_eq!(
            carried.len(),
            4,
            "formed under the old plan: one event each"
        );
        for unit in &carried {
            core.on_finished(Ticket::of(unit), Some(Outcome::Delivered));
        }
        assert_eq!(
            core.accepted_ahead(),
            [(1, 1), (2, 2), (3, 3), (4, 4)],
            "accepted while the first is in flight: recorded, so a crash does not replay them"
        );
        assert_eq!(core.ack_through(), None, "the first is still in flight");
    }

    #[test]
    fn a_throttled_rule_reports_no_runs() {
        let start = std::time::Instant::now();
        let mut throttled = plan(1, Duration::ZERO);
        throttled.throttle = Some(crate::shaping::throttle::ThrottleSpec {
            min_interval_ms: None,
            keep: crate::shaping::throttle::Keep::First,
            only_changes: true,
            deadband: None,
        });
        let mut core = Core::new(Arc::new(throttled), Arc::default());
        core.on_read(entries(0..2), at(start, 0));
        let units = core.start(2);
        assert_eq!(units.len(), 2);
        core.on_finished(Ticket::of(&units[1]), Some(Outcome::Delivered));
        assert_eq!(core.accepted_ahead(), []);
    }
}
