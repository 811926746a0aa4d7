//! Delivery: one task per rule reads its queue, forms events (`batch.rs`), invokes the function
//! with bounded, adaptive concurrency, and acknowledges the queue only below the oldest event
//! Lambda has not accepted yet.
//!
//! Split the way rumqttc splits `state.rs` from `eventloop.rs`: [`Core`] is the rule's delivery
//! state and its transitions, pure (it takes `now`, performs no I/O and never waits), and
//! [`deliver`] is a thin async loop that only waits for the next input and performs what the
//! core asks for: read, start invocations, acknowledge, write a dead letter.
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
//! A reload steers a running task with a [`Directive`]: `Run` with a changed plan swaps it in
//! place over the same queue (the open batch, window or held messages become events at once;
//! events not yet started go out under the new plan, those in flight finish under the old);
//! `Retire` (the rule was removed) is a drain of this rule alone: read the queue to its end,
//! deliver, stop. `Run` again before the end (the rule was added back) returns it to Running.
//!
//! Invariants:
//! - The queue is acknowledged through `min(every unfinished event's first sequence) - 1`, never
//!   past a message not yet accepted by Lambda or written to the dead-letter store: a crash only
//!   ever replays, never skips. An accepted event above that covering a run of sequences
//!   wholly (no throttle, no windows) is acknowledged ahead as a range.
//! - A refused event counts as unfinished until its dead letter is on disk; while a dead-letter
//!   write is failing, no new invocation starts (it is retried with backoff), so nothing piles up.
//! - Halting starts nothing and reads nothing: in every mode each input the loop waits for can
//!   arrive, so the loop never spins.
//!
//! A failed invocation is retried in place with capped exponential backoff and jitter (backon),
//! honouring Lambda's `retryAfterSeconds`; the invocation task sleeps between attempts, so a
//! failing function holds up only its own rule.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::buffer::deadletter::{self, DeadLetter};
use crate::buffer::{Entry, Queue, QueueError, Seq};
use crate::core::health::Beat;
use crate::core::reply::{self, ReplySpec, Request};
use crate::core::shutdown::Shutdown;
use crate::core::stats::RuleStats;
use crate::delivery::invoker::{Invoke, InvokeError, InvokeRequest};
use crate::mqtt::replies::{Replier, ReplyError};
use crate::rule::Route;
use crate::shaping::batch::{Former, Now, Unit};
use crate::shaping::plan::RulePlan;
use crate::shaping::ratelimit::{Aimd, TokenBucket};

/// First delay after a failed invocation.
pub const RETRY_MIN_DELAY: Duration = Duration::from_millis(500);
/// Longest delay between two attempts: a recovered function is noticed within this.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(60);
/// First delay before writing a dead letter again after the store failed (disk full?).
pub const LETTER_RETRY_MIN_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts at writing a dead letter.
pub const LETTER_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
/// Events formed ahead of free invocation slots: bounds memory while Lambda is slow.
const READY_AHEAD: usize = 4;
/// Bytes of a rule's events in flight at once (one event always may go, whatever its size):
/// with large batches, memory stays bounded whatever the concurrency.
pub const MAX_INFLIGHT_BYTES: usize = 8 * 1024 * 1024;
/// Most entries read from the queue at a time.
const READ_MAX: usize = 256;

/// Why a delivery task stopped before the shutdown asked it to.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The rule's queue failed.
    #[error("rule {rule}: {source}")]
    Queue {
        /// The rule.
        rule: String,
        /// What the queue said.
        source: QueueError,
    },
    /// The delivery task itself failed (a bug).
    #[error("delivery task failed: {0}")]
    Task(String),
}

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

/// What a reload wants of a rule's delivery task.
#[derive(Debug, Clone)]
pub enum Directive {
    /// Deliver with this plan (a changed rule, or a removed rule added back).
    Run(Arc<RulePlan>),
    /// The rule was removed: deliver what its queue holds, then stop.
    Retire,
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
    /// First sequences of unfinished events (invoking, or refused and not yet dead-lettered),
    /// with how many events start there (a window's chunks share one).
    unfinished: BTreeMap<Seq, usize>,
    /// Invocations in flight.
    invoking: usize,
    /// Bytes of their events.
    invoking_bytes: usize,
    /// Refused events waiting for their dead letter to be written, oldest first.
    letters: VecDeque<PendingLetter>,
    /// Whether the front letter is being written now.
    writing_letter: bool,
    /// Highest sequence read from the queue.
    consumed: Option<Seq>,
    /// Acknowledged through this.
    acked: Option<Seq>,
    /// Sequence and receipt time (ms) of each message read and not yet acknowledged, oldest
    /// first: the front is the buffer's oldest message, for `mlb_buffer_oldest_age_seconds`.
    unacked_received: VecDeque<(Seq, u64)>,
    /// Events in flight that cover a run of sequences wholly (first → last), and those runs
    /// once accepted, for [`Queue::ack_range`]: a crash then need not replay them.
    spans: BTreeMap<Seq, Seq>,
    accepted: Vec<(Seq, Seq)>,
}

impl Core {
    /// Nothing read yet.
    pub fn new(plan: Arc<RulePlan>, stats: Arc<RuleStats>) -> Self {
        Core {
            former: Former::new(plan.clone(), stats.clone()),
            plan,
            stats,
            mode: Mode::Running,
            carried: VecDeque::new(),
            unfinished: BTreeMap::new(),
            invoking: 0,
            invoking_bytes: 0,
            letters: VecDeque::new(),
            writing_letter: false,
            consumed: None,
            acked: None,
            unacked_received: VecDeque::new(),
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
            self.consumed = Some(self.consumed.map_or(entry.seq, |c| c.max(entry.seq)));
            self.unacked_received
                .push_back((entry.seq, entry.message.received_at_ms()));
            self.former.push(entry, now);
        }
        self.publish_oldest();
    }

    /// Tells the counters the receipt time of the oldest message still unacknowledged.
    fn publish_oldest(&self) {
        let oldest = self.unacked_received.front().map_or(0, |(_, ms)| *ms);
        self.stats
            .oldest_unacked_ms
            .store(oldest, Ordering::Relaxed);
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
        self.carried.extend(std::iter::from_fn(|| old.take_ready()));
        self.plan = plan;
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
        // Without a throttle or windows, the former's events are consecutive runs of what was
        // read, so one of m messages covers first..first+m-1 wholly (gaps are records the queue
        // skipped). Carried events may come from a plan that had either: none of those.
        let (carried, contiguous) = (
            self.carried.len(),
            self.plan.throttle.is_none() && self.plan.aggregate.is_none(),
        );
        let units: Vec<Unit> = std::iter::from_fn(|| {
            self.carried
                .pop_front()
                .or_else(|| self.former.take_ready())
        })
        .take(n)
        .collect();
        for (i, unit) in units.iter().enumerate() {
            if contiguous && i >= carried && unit.messages > 0 {
                self.spans
                    .insert(unit.first_seq, unit.first_seq + unit.messages as Seq - 1);
            }
            *self.unfinished.entry(unit.first_seq).or_default() += 1;
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
                self.finish(first_seq);
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
                    self.finish(done.first_seq);
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
    /// position.
    pub fn accepted_ahead(&mut self) -> Vec<(Seq, Seq)> {
        let acked = self.acked;
        let mut runs = std::mem::take(&mut self.accepted);
        runs.retain(|&(_, last)| acked.is_none_or(|a| last > a));
        runs
    }

    /// A new acknowledgement position, when it moved: everything read below the oldest
    /// unfinished event.
    pub fn ack_through(&mut self) -> Option<Seq> {
        let barrier = [
            self.unfinished.keys().next().copied(),
            self.former.lowest_pending(),
            self.carried.iter().map(|u| u.first_seq).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        let through = match barrier {
            Some(0) => None,
            Some(b) => self.consumed.map(|c| c.min(b - 1)),
            None => self.consumed,
        }?;
        if self.acked.is_some_and(|a| through <= a) {
            return None;
        }
        self.acked = Some(through);
        while self
            .unacked_received
            .front()
            .is_some_and(|(seq, _)| *seq <= through)
        {
            self.unacked_received.pop_front();
        }
        self.publish_oldest();
        Some(through)
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

    /// Finished with one event starting at `first_seq`.
    fn finish(&mut self, first_seq: Seq) {
        if let Some(n) = self.unfinished.get_mut(&first_seq) {
            *n -= 1;
            if *n == 0 {
                self.unfinished.remove(&first_seq);
            }
        }
    }
}

fn letter_retry_delay(failures: u32) -> Duration {
    LETTER_RETRY_MIN_DELAY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(LETTER_RETRY_MAX_DELAY)
}

fn now() -> Now {
    Now {
        at: Instant::now().into_std(),
        wall_ms: SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
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

/// Delivers the rule's queue until `drain` is triggered and everything read is delivered (or
/// Lambda refuses during the drain: then the rest stays in the queue).
///
/// Relies on the queue's reads being cancel-safe (the `Queue` contract): a read that loses the
/// race against another input hands its entries to the next read.
pub async fn deliver<Q: Queue, I: Invoke>(
    route: Arc<Route<Q>>,
    invoker: Arc<I>,
    global: Arc<Semaphore>,
    drain: Shutdown,
) -> Result<(), DeliveryError> {
    let (_steady, directives) = watch::channel(Directive::Run(route.plan.clone()));
    deliver_with(
        route,
        invoker,
        global,
        drain,
        directives,
        Beat::unwatched(),
        None,
    )
    .await
}

/// The pacing state a plan asks for: its token bucket and its adaptive concurrency.
struct Pacing {
    bucket: Option<Arc<Mutex<TokenBucket>>>,
    aimd: Arc<Mutex<Aimd>>,
}

impl Pacing {
    fn new(plan: &RulePlan) -> Self {
        Pacing {
            bucket: plan.rate_limit.map(|(rate, burst)| {
                Arc::new(Mutex::new(TokenBucket::new(
                    rate,
                    burst,
                    Instant::now().into_std(),
                )))
            }),
            aimd: Arc::new(Mutex::new(if plan.slow_start {
                Aimd::slow_start(plan.max_concurrency)
            } else {
                Aimd::new(plan.max_concurrency)
            })),
        }
    }

    fn limit(&self) -> usize {
        self.aimd.lock().map_or(1, |a| a.limit())
    }
}

/// As [`deliver`], steered by a reload through `directives` (see [`Directive`]) and proving the
/// loop alive through `beat` (health.rs): it turns each time round and when idle, so a loop
/// stuck in an await outside its `select!` stops the watchdog. The task ends when a drain
/// (shutdown) or a retirement has delivered everything, or on a queue failure. A rule with
/// `[rules.reply]` publishes each response through `replier` (reply.rs) before the event
/// counts as delivered.
pub async fn deliver_with<Q: Queue, I: Invoke>(
    route: Arc<Route<Q>>,
    invoker: Arc<I>,
    global: Arc<Semaphore>,
    drain: Shutdown,
    mut directives: watch::Receiver<Directive>,
    beat: Beat,
    replier: Option<Replier>,
) -> Result<(), DeliveryError> {
    let mut plan = route.plan.clone();
    let queue = &*route.queue;
    let queue_err = |source| DeliveryError::Queue {
        rule: route.plan.name.clone(),
        source,
    };
    let mut pacing = Pacing::new(&plan);
    // A sender dropped without a directive leaves the rule as it is.
    let mut steered = true;
    let mut core = Core::new(plan.clone(), route.stats.clone());
    let mut invocations: JoinSet<(Ticket, Outcome)> = JoinSet::new();
    // Which event each invocation task carries, to account for a task that failed.
    let mut carrying: BTreeMap<tokio::task::Id, Ticket> = BTreeMap::new();
    let mut letter_writes: JoinSet<Result<(), String>> = JoinSet::new();
    loop {
        beat.turn();
        for (first, last) in core.accepted_ahead() {
            queue.ack_range(first, last).await.map_err(queue_err)?;
        }
        if let Some(through) = core.ack_through() {
            queue.ack(through).await.map_err(queue_err)?;
        }

        // Start what may start: the rule's limit, then a global slot each.
        let startable = core.startable(pacing.limit());
        let mut permits = Vec::with_capacity(startable);
        while permits.len() < startable {
            match global.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let short_of_slots = permits.len() < startable;
        for (unit, permit) in core.start(permits.len()).into_iter().zip(permits) {
            let (plan, invoker, stats, bucket, aimd, drain, replier) = (
                plan.clone(),
                invoker.clone(),
                route.stats.clone(),
                pacing.bucket.clone(),
                pacing.aimd.clone(),
                drain.clone(),
                replier.clone(),
            );
            let ticket = Ticket::of(&unit);
            let handle = invocations.spawn(async move {
                let outcome = match send_event(
                    &plan,
                    &unit.payload,
                    unit.messages,
                    &*invoker,
                    &stats,
                    bucket.as_deref(),
                    &aimd,
                    &drain,
                )
                .await
                {
                    Ok(response) => match (&plan.reply, unit.request.as_deref(), &replier) {
                        (Some(spec), Some(request), Some(replier)) => {
                            let reply = Answer {
                                spec,
                                request,
                                response,
                                event: &unit.payload,
                            };
                            reply.publish(&plan, replier, &stats).await
                        }
                        _ => Outcome::Delivered,
                    },
                    Err(outcome) => outcome,
                };
                drop(permit);
                (ticket, outcome)
            });
            carrying.insert(handle.id(), ticket);
        }

        let at = now();
        if let Some(letter) = core.letter_to_write(at) {
            let letters = route.dead_letters.clone();
            letter_writes
                .spawn_blocking(move || letters.append(&letter).map_err(|e| e.to_string()));
        }

        let wait = core.wait(at);
        if wait.done {
            // A normal end; on an error the beat stays watched and the watchdog sees it stall.
            beat.retire();
            return Ok(());
        }
        tokio::select! {
            Some(joined) = invocations.join_next_with_id(), if !invocations.is_empty() => {
                match joined {
                    Ok((id, (ticket, outcome))) => {
                        carrying.remove(&id);
                        core.on_finished(ticket, Some(outcome));
                    }
                    Err(err) => {
                        tracing::error!(rule = %plan.name, error = %err, "invocation task failed; this rule stops delivering until the next start");
                        if let Some(ticket) = carrying.remove(&err.id()) {
                            core.on_finished(ticket, None);
                        }
                    }
                }
            }
            Some(written) = letter_writes.join_next(), if !letter_writes.is_empty() => {
                let result = written.unwrap_or_else(|e| Err(e.to_string()));
                core.on_letter_written(result, now());
            }
            _ = drain.wait(), if wait.drain => core.on_drain(),
            changed = directives.changed(), if steered => {
                if changed.is_err() {
                    steered = false;
                    continue;
                }
                let directive = directives.borrow_and_update().clone();
                match directive {
                    Directive::Run(next) => {
                        core.on_resume();
                        if !Arc::ptr_eq(&next, &plan) {
                            core.on_plan(next.clone(), now());
                            pacing = Pacing::new(&next);
                            plan = next;
                        }
                    }
                    Directive::Retire => core.on_retire(),
                }
            }
            read = queue.read(READ_MAX), if wait.read == ReadWant::Wait => {
                core.on_read(read.map_err(queue_err)?, now());
            }
            read = queue.read_ready(READ_MAX), if wait.read == ReadWant::Now => {
                core.on_read(read.map_err(queue_err)?, now());
            }
            _ = sleep_until_opt(wait.wake_at.map(Instant::from_std)) => core.on_tick(now()),
            permit = global.clone().acquire_owned(), if short_of_slots => {
                // A slot freed up in another rule; loop round to use it.
                drop(permit);
            }
            _ = beat.due() => {}
        }
    }
}

/// Failed attempts before an `AccessDeniedException` or a function error counts as permanent:
/// a policy being attached or a function being fixed gets this long to take effect.
pub const PERMANENT_AFTER_ATTEMPTS: u32 = 3;

/// Whether this failure, at this attempt, means the batch can never be delivered.
pub fn is_permanent(err: &InvokeError, attempt: u32) -> bool {
    match err {
        InvokeError::Permanent { code, .. } if code.starts_with("AccessDenied") => {
            attempt >= PERMANENT_AFTER_ATTEMPTS
        }
        InvokeError::Permanent { .. } => true,
        InvokeError::FunctionError { .. } => attempt >= PERMANENT_AFTER_ATTEMPTS,
        InvokeError::Throttled { .. } | InvokeError::Transient { .. } => false,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Invokes until Lambda accepts the event (`Ok` with the function's response), refuses it for
/// good, or shutdown interrupts.
#[allow(clippy::too_many_arguments)]
async fn send_event<I: Invoke>(
    plan: &RulePlan,
    payload: &[u8],
    messages: usize,
    invoker: &I,
    stats: &RuleStats,
    bucket: Option<&Mutex<TokenBucket>>,
    aimd: &Mutex<Aimd>,
    drain: &Shutdown,
) -> Result<Vec<u8>, Outcome> {
    let mut backoff = crate::core::retry::retry_delays(RETRY_MIN_DELAY, RETRY_MAX_DELAY);
    let mut attempt: u32 = 0;
    let first_attempt = SystemTime::now();
    loop {
        if let Some(bucket) = bucket {
            let wait = bucket
                .lock()
                .map_or(Duration::ZERO, |mut b| b.take(Instant::now().into_std()));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        attempt += 1;
        let request = InvokeRequest {
            function: plan.function.clone(),
            qualifier: plan.qualifier.clone(),
            invocation: plan.invocation,
            payload: payload.to_vec(),
        };
        let started = Instant::now();
        let result = invoker.invoke(request).await;
        stats.invoke_seconds.observe(started.elapsed());
        let err = match result {
            Ok(response) => {
                if let Ok(mut aimd) = aimd.lock() {
                    aimd.on_success();
                }
                if attempt > 1 {
                    tracing::info!(rule = %plan.name, attempts = attempt, "delivered after retrying");
                }
                tracing::debug!(rule = %plan.name, messages, bytes = payload.len(), "delivered");
                return Ok(response);
            }
            Err(err) => err,
        };
        RuleStats::add(&stats.failed_attempts, 1);
        if let InvokeError::Throttled { .. } = err
            && let Ok(mut aimd) = aimd.lock()
        {
            aimd.on_throttle();
            tracing::info!(rule = %plan.name, concurrency = aimd.limit(), "throttled: fewer invocations in flight");
        }
        if is_permanent(&err, attempt) {
            RuleStats::add(&stats.attempts_refused, 1);
            let (code, reason) = match &err {
                InvokeError::FunctionError { kind, detail } => (
                    "FunctionError".to_owned(),
                    format!("the function failed {attempt} times ({kind}): {detail}"),
                ),
                other => (other.code().to_owned(), other.to_string()),
            };
            return Err(Outcome::Refused(Box::new(DeadLetter {
                rule: plan.name.clone(),
                reason,
                code,
                attempts: attempt,
                first_attempt_at: deadletter::timestamp(first_attempt),
                last_attempt_at: deadletter::timestamp(SystemTime::now()),
                event: serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
            })));
        }
        match err {
            InvokeError::Throttled { .. } => RuleStats::add(&stats.attempts_throttled, 1),
            _ => RuleStats::add(&stats.attempts_error, 1),
        }
        let mut delay = backoff.next().unwrap_or(RETRY_MAX_DELAY);
        if let InvokeError::Throttled {
            retry_after: Some(after),
            ..
        } = &err
        {
            delay = delay.max(*after);
        }
        log_failure(plan, &err, attempt, messages, delay);
        if drain.is_triggered() {
            return Err(Outcome::Interrupted);
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = drain.wait() => return Err(Outcome::Interrupted),
        }
    }
}

/// A function's response to publish as the reply to its request.
struct Answer<'a> {
    spec: &'a ReplySpec,
    request: &'a Request,
    response: Vec<u8>,
    /// The event the function answered, for a dead letter.
    event: &'a [u8],
}

impl Answer<'_> {
    /// Publishes the reply and waits for the broker's PUBACK, through reconnects: only then is
    /// the event delivered. A reply that cannot be published becomes a dead letter; shutdown
    /// leaves the message in the queue, to be invoked and answered again at the next start.
    async fn publish(self, plan: &RulePlan, replier: &Replier, stats: &RuleStats) -> Outcome {
        let Some(topic) = reply::destination(self.spec, self.request) else {
            RuleStats::add(&stats.replies_without_topic, 1);
            tracing::debug!(rule = %plan.name, id = %self.request.id, "no Response Topic and no [rules.reply] topic: no reply");
            return Outcome::Delivered;
        };
        // The broker may be down for a while: the reply waits for it. At shutdown the MQTT
        // connection stays until delivery has finished (or its time is up).
        let result = replier
            .publish(topic.clone(), self.response, self.spec.retain, self.request)
            .await;
        match result {
            Ok(()) => {
                RuleStats::add(&stats.replies_published, 1);
                tracing::debug!(rule = %plan.name, id = %self.request.id, topic = %topic, "reply published");
                Outcome::Delivered
            }
            Err(ReplyError::Stopped) => Outcome::Interrupted,
            Err(err) => {
                RuleStats::add(&stats.replies_refused, 1);
                tracing::error!(
                    rule = %plan.name, id = %self.request.id, code = err.code(),
                    "the function answered but its reply cannot be published: {err}; the message goes to the dead letters"
                );
                let now = deadletter::timestamp(SystemTime::now());
                Outcome::Refused(Box::new(DeadLetter {
                    rule: plan.name.clone(),
                    reason: format!(
                        "the function answered but its reply cannot be published: {err}"
                    ),
                    code: err.code().to_owned(),
                    attempts: 1,
                    first_attempt_at: now.clone(),
                    last_attempt_at: now,
                    event: serde_json::from_slice(self.event).unwrap_or(serde_json::Value::Null),
                }))
            }
        }
    }
}

fn log_failure(plan: &RulePlan, err: &InvokeError, attempt: u32, messages: usize, delay: Duration) {
    let retry_in = humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
    match err {
        InvokeError::Permanent { code, message } => tracing::error!(
            rule = %plan.name, function = %plan.function, code = %code, attempt, messages,
            "Lambda refused the invocation: {message}; check the function name and the bridge's permissions — retrying in {retry_in}"
        ),
        InvokeError::FunctionError { kind, detail } => tracing::error!(
            rule = %plan.name, function = %plan.function, code = "FunctionError", attempt, messages,
            "the function raised an error ({kind}): {detail} — retrying in {retry_in}"
        ),
        InvokeError::Throttled { code, .. } | InvokeError::Transient { code, .. } => {
            tracing::warn!(
                rule = %plan.name, function = %plan.function, code = %code, attempt, messages,
                "invocation failed: {err} — retrying in {retry_in}"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::MemoryQueue;
    use crate::buffer::deadletter::DeadLetters;
    use crate::core::envelope::{self, Message};
    use crate::core::shutdown;
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    /// Records requests; fails the first `fail_first` attempts with `error`.
    #[derive(Default)]
    struct FakeInvoker {
        requests: Mutex<Vec<InvokeRequest>>,
        fail_first: usize,
        error: Option<InvokeError>,
    }

    impl Invoke for FakeInvoker {
        async fn invoke(&self, request: InvokeRequest) -> Result<Vec<u8>, InvokeError> {
            let mut requests = self.requests.lock().expect("lock");
            requests.push(request);
            match &self.error {
                Some(e) if requests.len() <= self.fail_first => Err(e.clone()),
                _ => Ok(Vec::new()),
            }
        }
    }

    impl FakeInvoker {
        fn events(&self) -> Vec<serde_json::Value> {
            self.requests
                .lock()
                .expect("lock")
                .iter()
                .map(|r| serde_json::from_slice(&r.payload).expect("json"))
                .collect()
        }
    }

    fn plan(max_messages: usize, max_wait: Duration) -> RulePlan {
        let mut plan = RulePlan::for_tests("r");
        plan.max_messages = max_messages;
        plan.max_wait = max_wait;
        plan
    }

    /// A route over `queue` with its dead letters in a temporary directory.
    fn route(
        plan: RulePlan,
        queue: Arc<MemoryQueue>,
    ) -> (tempfile::TempDir, Arc<Route<MemoryQueue>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let route = Arc::new(Route {
            plan: Arc::new(plan),
            filter: "#".into(),
            qos: 1,
            queue,
            stats: Arc::default(),
            dead_letters: DeadLetters::new(dir.path()),
        });
        (dir, route)
    }

    fn spawn_deliver(
        route: &Arc<Route<MemoryQueue>>,
        invoker: &Arc<FakeInvoker>,
        drain: Shutdown,
    ) -> tokio::task::JoinHandle<Result<(), DeliveryError>> {
        tokio::spawn(deliver(
            route.clone(),
            invoker.clone(),
            Arc::new(Semaphore::new(32)),
            drain,
        ))
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

    async fn run_until_drained(plan: RulePlan, queue: Arc<MemoryQueue>, invoker: Arc<FakeInvoker>) {
        let (_dir, route) = route(plan, queue.clone());
        let (trigger, drain) = shutdown::channel();
        let task = spawn_deliver(&route, &invoker, drain);
        while !queue.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        trigger.trigger();
        task.await.expect("join").expect("deliver");
    }

    #[tokio::test(start_paused = true)]
    async fn without_batching_each_message_is_one_event_in_order() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue
            .append((0..5).map(msg).collect())
            .await
            .expect("append");
        let invoker = Arc::new(FakeInvoker::default());
        run_until_drained(plan(1, Duration::ZERO), queue, invoker.clone()).await;
        let events = invoker.events();
        assert_eq!(events.len(), 5);
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["messages"].as_array().map(Vec::len), Some(1));
            assert_eq!(e["messages"][0]["payload"], serde_json::json!(i));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batches_close_by_count_and_by_bytes() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue
            .append((0..25).map(msg).collect())
            .await
            .expect("append");
        let invoker = Arc::new(FakeInvoker::default());
        run_until_drained(
            plan(10, Duration::from_secs(1)),
            queue.clone(),
            invoker.clone(),
        )
        .await;
        let sizes: Vec<usize> = invoker
            .events()
            .iter()
            .map(|e| e["messages"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, vec![10, 10, 5]);

        let one = envelope::encoded_message_len(&msg(1));
        let mut by_bytes = plan(10, Duration::from_secs(1));
        by_bytes.max_bytes = envelope::envelope_overhead("r") + 3 * one;
        queue
            .append((0..7).map(msg).collect())
            .await
            .expect("append");
        let invoker = Arc::new(FakeInvoker::default());
        run_until_drained(by_bytes.clone(), queue, invoker.clone()).await;
        for request in invoker.requests.lock().expect("lock").iter() {
            assert!(
                request.payload.len() <= by_bytes.max_bytes,
                "{}",
                request.payload.len()
            );
        }
        let total: usize = invoker
            .events()
            .iter()
            .map(|e| e["messages"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(total, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_waits_max_wait_then_goes() {
        let queue = Arc::new(MemoryQueue::new(100));
        let invoker = Arc::new(FakeInvoker::default());
        let (_trigger, drain) = shutdown::channel();
        let (_dir, route) = route(plan(10, Duration::from_secs(5)), queue.clone());
        let task = spawn_deliver(&route, &invoker, drain);
        queue
            .append((0..3).map(msg).collect())
            .await
            .expect("append");
        tokio::time::sleep(Duration::from_millis(4900)).await;
        assert!(invoker.events().is_empty(), "must wait for max_wait");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(invoker.events().len(), 1);
        assert_eq!(
            invoker.events()[0]["messages"].as_array().map(Vec::len),
            Some(3)
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_backoff_and_throttles_honour_retry_after() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue.append(vec![msg(1)]).await.expect("append");
        let invoker = Arc::new(FakeInvoker {
            fail_first: 3,
            error: Some(InvokeError::Throttled {
                code: "TooManyRequestsException".into(),
                message: "Rate exceeded".into(),
                retry_after: Some(Duration::from_secs(7)),
            }),
            ..Default::default()
        });
        let start = Instant::now();
        run_until_drained(plan(1, Duration::ZERO), queue.clone(), invoker.clone()).await;
        assert_eq!(invoker.requests.lock().expect("lock").len(), 4);
        assert!(
            start.elapsed() >= Duration::from_secs(21),
            "{:?}",
            start.elapsed()
        );
        assert!(queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_batch_is_not_acked_while_draining() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue.append(vec![msg(1)]).await.expect("append");
        let invoker = Arc::new(FakeInvoker {
            fail_first: usize::MAX,
            error: Some(InvokeError::Transient {
                code: "ServiceException".into(),
                message: "try again".into(),
            }),
            ..Default::default()
        });
        let (trigger, drain) = shutdown::channel();
        let (_dir, route) = route(plan(1, Duration::ZERO), queue.clone());
        let task = spawn_deliver(&route, &invoker, drain);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let attempts = invoker.requests.lock().expect("lock").len();
        assert!(
            (3..20).contains(&attempts),
            "backoff, not a busy loop: {attempts}"
        );
        trigger.trigger();
        task.await.expect("join").expect("deliver");
        assert_eq!(queue.len(), 1, "the message stays unacked");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_invocations() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue
            .append((0..5).map(msg).collect())
            .await
            .expect("append");
        let invoker = Arc::new(FakeInvoker::default());
        let mut paced = plan(1, Duration::ZERO);
        paced.rate_limit = Some((2.0, 1));
        let start = Instant::now();
        run_until_drained(paced, queue, invoker.clone()).await;
        assert_eq!(invoker.events().len(), 5);
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2100),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_failure_goes_to_dead_letters_and_the_next_message_flows() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue.append(vec![msg(1), msg(2)]).await.expect("append");
        let invoker = Arc::new(FakeInvoker {
            fail_first: 1,
            error: Some(InvokeError::Permanent {
                code: "ResourceNotFoundException".into(),
                message: "Function not found".into(),
            }),
            ..Default::default()
        });
        let (dir, route) = route(plan(1, Duration::ZERO), queue.clone());
        let (letters, stats) = (route.dead_letters.clone(), route.stats.clone());
        let (trigger, drain) = shutdown::channel();
        let task = spawn_deliver(&route, &invoker, drain);
        while !queue.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        trigger.trigger();
        task.await.expect("join").expect("deliver");
        let dead = letters.list().expect("list");
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].code, "ResourceNotFoundException");
        assert_eq!(dead[0].attempts, 1);
        assert_eq!(
            dead[0].event["messages"][0]["payload"],
            serde_json::json!(1)
        );
        assert_eq!(
            invoker
                .events()
                .last()
                .map(|e| e["messages"][0]["payload"].clone()),
            Some(serde_json::json!(2))
        );
        assert_eq!(
            stats
                .dead_lettered
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        drop(dir);
    }

    #[test]
    fn access_denied_and_function_errors_become_permanent_after_a_few_attempts() {
        let denied = InvokeError::Permanent {
            code: "AccessDeniedException".into(),
            message: String::new(),
        };
        assert!(!is_permanent(&denied, 1));
        assert!(is_permanent(&denied, PERMANENT_AFTER_ATTEMPTS));
        let failed = InvokeError::FunctionError {
            kind: "Unhandled".into(),
            detail: String::new(),
        };
        assert!(!is_permanent(&failed, 2));
        assert!(is_permanent(&failed, 3));
        let throttled = InvokeError::Throttled {
            code: "x".into(),
            message: String::new(),
            retry_after: None,
        };
        assert!(!is_permanent(&throttled, 1000));
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
        let three_mib = |seq| Entry {
            seq,
            message: Message::received(
                "t".into(),
                vec![b'a'; 3 * 1024 * 1024],
                1,
                false,
                UNIX_EPOCH,
            ),
        };
        core.on_read((0..4).map(three_mib).collect(), at(start, 0));
        assert_eq!(
            core.startable(64),
            2,
            "two of 3 MiB fit under 8 MiB, three do not"
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

    fn spawn_steered(
        route: &Arc<Route<MemoryQueue>>,
        invoker: &Arc<FakeInvoker>,
        drain: Shutdown,
    ) -> (
        watch::Sender<Directive>,
        tokio::task::JoinHandle<Result<(), DeliveryError>>,
    ) {
        let (tx, rx) = watch::channel(Directive::Run(route.plan.clone()));
        let task = tokio::spawn(deliver_with(
            route.clone(),
            invoker.clone(),
            Arc::new(Semaphore::new(32)),
            drain,
            rx,
            Beat::unwatched(),
            None,
        ));
        (tx, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_plan_sends_what_was_not_in_flight_to_the_new_function() {
        let queue = Arc::new(MemoryQueue::new(100));
        let invoker = Arc::new(FakeInvoker::default());
        let (_dir, route) = route(plan(10, Duration::from_secs(60)), queue.clone());
        let (_trigger, drain) = shutdown::channel();
        let (steer, task) = spawn_steered(&route, &invoker, drain);
        queue
            .append((0..3).map(msg).collect())
            .await
            .expect("append");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(invoker.events().is_empty(), "the batch is open");

        let mut next = plan(1, Duration::ZERO);
        next.function = "g".into();
        steer.send_replace(Directive::Run(Arc::new(next)));
        // Let the task take the directive before more messages arrive.
        tokio::time::sleep(Duration::from_millis(10)).await;
        queue
            .append((3..5).map(msg).collect())
            .await
            .expect("append");
        while !queue.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let requests = invoker.requests.lock().expect("lock").clone();
        let sent: Vec<(String, usize)> = requests
            .iter()
            .map(|r| {
                let event: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
                (
                    r.function.clone(),
                    event["messages"].as_array().map_or(0, Vec::len),
                )
            })
            .collect();
        assert_eq!(
            sent,
            vec![("g".into(), 3), ("g".into(), 1), ("g".into(), 1)]
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_rule_delivers_its_queue_then_stops_unless_it_comes_back() {
        let queue = Arc::new(MemoryQueue::new(100));
        let invoker = Arc::new(FakeInvoker {
            fail_first: 2,
            error: Some(InvokeError::Transient {
                code: "ServiceException".into(),
                message: "down".into(),
            }),
            ..Default::default()
        });
        let (_dir, route) = route(plan(1, Duration::ZERO), queue.clone());
        let (_trigger, drain) = shutdown::channel();
        let (steer, task) = spawn_steered(&route, &invoker, drain.clone());
        queue
            .append((0..5).map(msg).collect())
            .await
            .expect("append");
        steer.send_replace(Directive::Retire);
        task.await.expect("join").expect("deliver");
        assert!(queue.is_empty(), "everything delivered before it stopped");
        assert_eq!(
            invoker.events().len(),
            2 + 5,
            "two failed attempts, five deliveries"
        );

        // Retired, then added back before the end: it keeps taking messages.
        let (steer, task) = spawn_steered(&route, &invoker, drain);
        steer.send_replace(Directive::Retire);
        steer.send_replace(Directive::Run(route.plan.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!task.is_finished(), "running again");
        queue.append(vec![msg(9)]).await.expect("append");
        while !queue.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(invoker.events().len(), 2 + 6);
        task.abort();
    }
}
