//! Delivery: one task per rule reads its queue, forms batches, paces them, invokes the function,
//! and acknowledges the queue only after Lambda accepted the event.
//!
//! A failed invocation is retried in place with capped exponential backoff and jitter (backon),
//! honouring Lambda's `retryAfterSeconds`; the task sleeps between attempts, so a failing
//! function holds up only its own rule. Order within a rule is FIFO: a batch is retried until it
//! is accepted before the next one is formed.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::aggregate::{AggregateSpec, Aggregator, Window};
use crate::config::{InvocationType, RuleConfig};
use crate::envelope::{self, Message};
use crate::invoker::{Invoke, InvokeError, InvokeRequest};
use crate::queue::deadletter::{self, DeadLetter, DeadLetters};
use crate::queue::{Entry, Queue, QueueError, Seq};
use crate::ratelimit::{Aimd, TokenBucket};
use crate::shutdown::Shutdown;
use crate::throttle::{DropReason, Throttle, ThrottleSpec};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// First delay after a failed invocation.
pub const RETRY_MIN_DELAY: Duration = Duration::from_millis(500);
/// Longest delay between two attempts: a recovered function is noticed within this.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(60);
/// Headroom kept under Lambda's payload limit for what the SDK adds around the event.
pub const PAYLOAD_HEADROOM: usize = 1024;

/// What the delivery task needs to know of its rule.
#[derive(Debug, Clone)]
pub struct RulePlan {
    /// The rule's name, written into every event.
    pub name: String,
    /// Function name or ARN.
    pub function: String,
    /// Alias or version.
    pub qualifier: Option<String>,
    /// Event or RequestResponse.
    pub invocation: InvocationType,
    /// Most messages per invocation (1 without `[rules.batch]`).
    pub max_messages: usize,
    /// Most bytes per encoded event: the batch setting or the Lambda limit, whichever is lower.
    pub max_bytes: usize,
    /// How long a partly filled batch waits for more.
    pub max_wait: Duration,
    /// Invocations per second and burst, when paced.
    pub rate_limit: Option<(f64, u32)>,
    /// Per-topic throttling, when configured.
    pub throttle: Option<ThrottleSpec>,
    /// Statistics windows instead of forwarding, when configured.
    pub aggregate: Option<AggregateSpec>,
    /// Most invocations of this rule in flight (adaptive below it).
    pub max_concurrency: usize,
}

impl RulePlan {
    /// The plan for a validated rule.
    pub fn from_config(rule: &RuleConfig) -> Self {
        let limit = usize::try_from(rule.invocation.payload_limit()).unwrap_or(usize::MAX)
            - PAYLOAD_HEADROOM;
        let (max_messages, max_bytes, max_wait) = match &rule.batch {
            Some(b) => (
                b.max_messages.max(1),
                b.max_bytes.map_or(limit, |s| {
                    usize::try_from(s.0).unwrap_or(usize::MAX).min(limit)
                }),
                b.max_wait.0,
            ),
            None => (1, limit, Duration::ZERO),
        };
        RulePlan {
            name: rule.name.clone(),
            function: rule.function.clone(),
            qualifier: rule.qualifier.clone(),
            invocation: rule.invocation,
            max_messages,
            max_bytes,
            max_wait,
            rate_limit: rule
                .rate_limit
                .as_ref()
                .map(|r| (r.invocations_per_second, r.burst)),
            throttle: rule.throttle.as_ref().map(|t| ThrottleSpec {
                min_interval_ms: t.min_interval.map(|d| d.0.as_millis() as u64),
                keep: match t.keep {
                    crate::config::KeepConfig::First => crate::throttle::Keep::First,
                    crate::config::KeepConfig::Latest => crate::throttle::Keep::Latest,
                },
                only_changes: t.only_changes,
                deadband: t.deadband_field.clone().zip(t.deadband),
            }),
            aggregate: rule.aggregate.as_ref().map(|a| AggregateSpec {
                window_ms: a.window.0.as_millis().max(1) as u64,
                fields: a.fields.clone(),
                group_by: crate::aggregate::GroupBy::parse(&a.group_by)
                    .unwrap_or(crate::aggregate::GroupBy::Topic),
            }),
            max_concurrency: rule.max_concurrency.max(1),
        }
    }

    /// The encoded size of an event carrying `message` alone, when that is over the limit.
    pub fn oversize(&self, message: &Message) -> Option<usize> {
        let limit = usize::try_from(self.invocation.payload_limit()).unwrap_or(usize::MAX)
            - PAYLOAD_HEADROOM;
        // Cheap upper bound first: base64 grows by 4/3, escaping a topic at most by 6.
        let bound = envelope::envelope_overhead(&self.name)
            + message.payload.len() / 3 * 4
            + 4
            + message.topic.len() * 6
            + 36
            + 128;
        if bound <= limit {
            return None;
        }
        let size =
            envelope::envelope_overhead(&self.name) + envelope::encoded_message_len(message) - 1;
        (size > limit).then_some(size)
    }
}

/// Counters of one rule, for logs and (later) metrics.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Messages appended to the rule's queue.
    pub queued: AtomicU64,
    /// Messages in events Lambda accepted.
    pub delivered: AtomicU64,
    /// Successful invocations.
    pub invocations: AtomicU64,
    /// Failed invocation attempts.
    pub failed_attempts: AtomicU64,
    /// Messages set aside because their event would exceed Lambda's limit.
    pub set_aside: AtomicU64,
    /// Messages moved to the dead-letter store (set-aside ones included).
    pub dead_lettered: AtomicU64,
    /// Messages dropped by `throttle.min_interval`.
    pub throttled_min_interval: AtomicU64,
    /// Messages dropped by `throttle.only_changes`.
    pub throttled_unchanged: AtomicU64,
    /// Messages dropped by `throttle.deadband`.
    pub throttled_deadband: AtomicU64,
}

impl RuleStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

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
}

/// One event ready to send, and the queue positions it covers.
struct Unit {
    /// Lowest sequence in it: acknowledgements must stay below until it is done.
    first_seq: Seq,
    /// The encoded event.
    payload: Vec<u8>,
    /// Messages it carries (for counters; a window counts the messages it summarizes).
    messages: usize,
}

/// What the delivery task holds between the queue and Lambda.
struct Stage {
    plan: Arc<RulePlan>,
    throttle: Option<Throttle>,
    aggregator: Option<Aggregator>,
    /// The batch being filled (forwarding mode): its messages, encoded and joined with commas.
    batch: Vec<u8>,
    /// Messages in `batch`, and the sequence of its first.
    batch_len: usize,
    batch_first: Option<Seq>,
    /// Bytes `batch` takes in the event, a separating comma per message included.
    batch_bytes: usize,
    batch_deadline: Option<Instant>,
    /// Events formed, waiting for a free invocation slot.
    ready: VecDeque<Unit>,
    /// Highest sequence read from the queue.
    consumed: Option<Seq>,
    stats: Arc<RuleStats>,
}

/// How long a statistics window stays open past its end for its last messages to arrive.
pub const WINDOW_GRACE: Duration = Duration::from_secs(1);
/// Events formed ahead of free invocation slots: bounds memory while Lambda is slow.
const READY_AHEAD: usize = 4;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Stage {
    fn new(plan: Arc<RulePlan>, stats: Arc<RuleStats>) -> Self {
        Stage {
            throttle: plan.throttle.clone().map(Throttle::new),
            aggregator: plan.aggregate.clone().map(Aggregator::new),
            batch: Vec::new(),
            batch_len: 0,
            batch_first: None,
            batch_bytes: 0,
            batch_deadline: None,
            ready: VecDeque::new(),
            consumed: None,
            stats,
            plan,
        }
    }

    /// Takes one entry from the queue through throttle and batch or window.
    fn take(&mut self, entry: Entry) {
        self.consumed = Some(self.consumed.map_or(entry.seq, |c| c.max(entry.seq)));
        let passing = match self.throttle.as_mut() {
            Some(throttle) => {
                let out = throttle.push(entry);
                self.count_drops(&out.dropped);
                out.pass
            }
            None => vec![entry],
        };
        for entry in passing {
            self.output(entry);
        }
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

    fn output(&mut self, entry: Entry) {
        if let Some(aggregator) = self.aggregator.as_mut() {
            if let Some(window) = aggregator.push(entry.seq, &entry.message) {
                self.window_units(window);
            }
            return;
        }
        // Encoded once, here: the size decides the batch, and the bytes go into the event.
        let mut encoded = Vec::new();
        envelope::encode_message(&entry.message, &mut encoded);
        let len = encoded.len() + 1;
        let overhead = envelope::envelope_overhead(&self.plan.name);
        if self.batch_len > 0 && overhead + self.batch_bytes + len > self.plan.max_bytes {
            self.close_batch();
        }
        if self.batch_len > 0 {
            self.batch.push(b',');
        }
        self.batch.extend_from_slice(&encoded);
        self.batch_bytes += len;
        self.batch_len += 1;
        self.batch_first.get_or_insert(entry.seq);
        if self.batch_len >= self.plan.max_messages || self.plan.max_wait.is_zero() {
            self.close_batch();
        } else if self.batch_deadline.is_none() {
            self.batch_deadline = Some(Instant::now() + self.plan.max_wait);
        }
    }

    fn close_batch(&mut self) {
        self.batch_deadline = None;
        self.batch_bytes = 0;
        let messages = std::mem::take(&mut self.batch_len);
        let Some(first_seq) = self.batch_first.take() else {
            return;
        };
        let batch = std::mem::take(&mut self.batch);
        self.ready.push_back(Unit {
            first_seq,
            payload: envelope::event_from_encoded(&self.plan.name, &batch),
            messages,
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
            });
        }
    }

    /// Handles what falls due at `now`: batch deadlines, windows, held throttle messages.
    fn tick(&mut self, now: Instant) {
        let wall = now_ms();
        if let Some(throttle) = self.throttle.as_mut() {
            let out = throttle.release_due(wall);
            self.count_drops(&out.dropped);
            for entry in out.pass {
                self.output(entry);
            }
        }
        if let Some(window) = self
            .aggregator
            .as_mut()
            .and_then(|a| a.close_due(wall, WINDOW_GRACE.as_millis() as u64))
        {
            self.window_units(window);
        }
        if self.batch_deadline.is_some_and(|d| d <= now) {
            self.close_batch();
        }
    }

    /// Shutdown: everything partial becomes an event now.
    fn flush(&mut self) {
        if let Some(throttle) = self.throttle.as_mut() {
            let out = throttle.release_due(u64::MAX);
            self.count_drops(&out.dropped);
            for entry in out.pass {
                self.output(entry);
            }
        }
        if let Some(window) = self.aggregator.as_mut().and_then(Aggregator::close_now) {
            self.window_units(window);
        }
        self.close_batch();
    }

    /// When `tick` next has something to do.
    fn next_due(&self) -> Option<Instant> {
        let wall = now_ms();
        let from_wall = |ms: u64| Instant::now() + Duration::from_millis(ms.saturating_sub(wall));
        let mut due = self.batch_deadline;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        };
        consider(
            self.throttle
                .as_ref()
                .and_then(Throttle::next_due_ms)
                .map(from_wall),
        );
        consider(
            self.aggregator
                .as_ref()
                .and_then(Aggregator::open_until_ms)
                .map(|end| from_wall(end + WINDOW_GRACE.as_millis() as u64)),
        );
        due
    }

    /// The lowest sequence read but not yet finished here (batch, window, held message).
    fn lowest_pending(&self) -> Option<Seq> {
        [
            self.batch_first,
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

    fn is_idle(&self) -> bool {
        self.lowest_pending().is_none()
    }
}

/// What one invocation task reports back.
struct Done {
    first_seq: Seq,
    messages: usize,
    outcome: Outcome,
}

/// Delivers the rule's queue until `drain` is triggered and everything read is delivered (or
/// Lambda refuses during the drain: then the rest stays in the queue).
///
/// Events are formed in queue order and invoked with up to the rule's adaptive concurrency (and
/// the global cap) in flight; the queue is acknowledged up to the lowest event not yet accepted,
/// so a crash only ever replays, never skips.
pub async fn deliver<Q: Queue, I: Invoke>(
    plan: RulePlan,
    queue: Arc<Q>,
    invoker: Arc<I>,
    stats: Arc<RuleStats>,
    dead_letters: DeadLetters,
    global: Arc<Semaphore>,
    drain: Shutdown,
) -> Result<(), DeliveryError> {
    let plan = Arc::new(plan);
    let queue_err = |source| DeliveryError::Queue {
        rule: plan.name.clone(),
        source,
    };
    let bucket = plan
        .rate_limit
        .map(|(rate, burst)| Arc::new(Mutex::new(TokenBucket::new(rate, burst, Instant::now()))));
    let aimd = Arc::new(Mutex::new(Aimd::new(plan.max_concurrency)));
    let mut stage = Stage::new(plan.clone(), stats.clone());
    let mut inflight: JoinSet<Done> = JoinSet::new();
    // First sequences of the events in flight: the queue is acknowledged below the lowest.
    let mut inflight_firsts: BTreeSet<Seq> = BTreeSet::new();
    let mut acked: Option<Seq> = None;
    let mut draining = false;
    let mut stopping = false;
    let read_size = plan.max_messages.clamp(1, 256);
    loop {
        // Start what may start.
        while !stopping
            && !stage.ready.is_empty()
            && inflight.len() < aimd.lock().map_or(1, |a| a.limit())
        {
            let Ok(permit) = global.clone().try_acquire_owned() else {
                break;
            };
            let Some(unit) = stage.ready.pop_front() else {
                break;
            };
            inflight_firsts.insert(unit.first_seq);
            let (plan, invoker, stats, bucket, aimd, drain) = (
                plan.clone(),
                invoker.clone(),
                stats.clone(),
                bucket.clone(),
                aimd.clone(),
                drain.clone(),
            );
            inflight.spawn(async move {
                let outcome = send_event(
                    &plan,
                    &unit.payload,
                    unit.messages,
                    &*invoker,
                    &stats,
                    bucket.as_deref(),
                    &aimd,
                    &drain,
                )
                .await;
                drop(permit);
                Done {
                    first_seq: unit.first_seq,
                    messages: unit.messages,
                    outcome,
                }
            });
        }

        // Acknowledge everything below the lowest event not yet accepted.
        let barrier = [inflight_firsts.first().copied(), stage.lowest_pending()]
            .into_iter()
            .flatten()
            .min();
        let through = match barrier {
            Some(0) => None,
            Some(b) => stage.consumed.map(|c| c.min(b - 1)),
            None => stage.consumed,
        };
        if let Some(through) = through
            && acked.is_none_or(|a| through > a)
        {
            queue.ack(through).await.map_err(queue_err)?;
            acked = Some(through);
        }

        if draining && inflight.is_empty() && (stopping || stage.is_idle()) {
            return Ok(());
        }

        let may_read = !stopping && stage.ready.len() < READY_AHEAD;
        let limit = aimd.lock().map_or(1, |a| a.limit());
        if draining {
            // Deliver what is queued without waiting for more: read what is there, then turn
            // partial batches, windows and held messages into events.
            if may_read {
                let entries = queue.read_ready(read_size).await.map_err(queue_err)?;
                if !entries.is_empty() {
                    for entry in entries {
                        stage.take(entry);
                    }
                    continue;
                }
                stage.flush();
            }
            tokio::select! {
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    handle_done(done, &plan, &stats, &dead_letters, &mut inflight_firsts, &mut stopping);
                }
                permit = global.clone().acquire_owned(), if !stage.ready.is_empty() && inflight.len() < limit => {
                    drop(permit);
                }
                else => {}
            }
            continue;
        }
        let due = stage.next_due();
        let need_permit =
            !stage.ready.is_empty() && inflight.len() < aimd.lock().map_or(1, |a| a.limit());
        tokio::select! {
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                handle_done(done, &plan, &stats, &dead_letters, &mut inflight_firsts, &mut stopping);
            }
            _ = drain.wait(), if !draining => {
                draining = true;
            }
            read = queue.read(read_size), if may_read => {
                for entry in read.map_err(queue_err)? {
                    stage.take(entry);
                }
            }
            _ = sleep_until_opt(due) => {
                stage.tick(Instant::now());
            }
            permit = global.clone().acquire_owned(), if need_permit => {
                // A slot freed up elsewhere; loop round to use it.
                drop(permit);
            }
        }
    }
}

fn handle_done(
    done: Result<Done, tokio::task::JoinError>,
    plan: &RulePlan,
    stats: &RuleStats,
    dead_letters: &DeadLetters,
    inflight_firsts: &mut BTreeSet<Seq>,
    stopping: &mut bool,
) {
    let done = match done {
        Ok(done) => done,
        Err(err) => {
            // A panicked invocation task: its event stays unacknowledged for the next start.
            tracing::error!(rule = %plan.name, error = %err, "invocation task failed");
            *stopping = true;
            return;
        }
    };
    match done.outcome {
        Outcome::Delivered => {
            inflight_firsts.remove(&done.first_seq);
            RuleStats::add(&stats.delivered, done.messages as u64);
            RuleStats::add(&stats.invocations, 1);
        }
        Outcome::Refused(letter) => {
            // Acknowledged only once the dead letter is on disk; if it cannot be written, the
            // event stays in flight (unacknowledged) and delivery of this rule stops until the
            // next start rather than lose it.
            if let Err(err) = dead_letters.append(&letter) {
                tracing::error!(rule = %plan.name, error = %err, "cannot write the dead-letter store; the event stays in the buffer");
                *stopping = true;
                return;
            }
            inflight_firsts.remove(&done.first_seq);
            RuleStats::add(&stats.dead_lettered, done.messages as u64);
            tracing::error!(
                rule = %plan.name, function = %plan.function, code = %letter.code,
                messages = done.messages, attempts = letter.attempts, file = %dead_letters.path().display(),
                "moved to the dead-letter store: {}", letter.reason
            );
        }
        Outcome::Interrupted => {
            // Draining and Lambda refuses: stop; the event stays in the queue.
            *stopping = true;
        }
    }
}

/// How one event ended.
enum Outcome {
    /// Lambda accepted it.
    Delivered,
    /// Lambda can never accept it: this dead letter records why.
    Refused(Box<DeadLetter>),
    /// Shutdown came while it was being retried.
    Interrupted,
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

/// Invokes until Lambda accepts the event, refuses it for good, or shutdown interrupts.
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
) -> Outcome {
    let mut backoff = crate::ratelimit::retry_delays(RETRY_MIN_DELAY, RETRY_MAX_DELAY);
    let mut attempt: u32 = 0;
    let first_attempt = SystemTime::now();
    loop {
        if let Some(bucket) = bucket {
            let wait = bucket
                .lock()
                .map_or(Duration::ZERO, |mut b| b.take(Instant::now()));
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
        let err = match invoker.invoke(request).await {
            Ok(()) => {
                if let Ok(mut aimd) = aimd.lock() {
                    aimd.on_success();
                }
                if attempt > 1 {
                    tracing::info!(rule = %plan.name, attempts = attempt, "delivered after retrying");
                }
                tracing::debug!(rule = %plan.name, messages, bytes = payload.len(), "delivered");
                return Outcome::Delivered;
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
            let (code, reason) = match &err {
                InvokeError::FunctionError { kind, detail } => (
                    "FunctionError".to_owned(),
                    format!("the function failed {attempt} times ({kind}): {detail}"),
                ),
                other => (other.code().to_owned(), other.to_string()),
            };
            return Outcome::Refused(Box::new(DeadLetter {
                rule: plan.name.clone(),
                reason,
                code,
                attempts: attempt,
                first_attempt_at: deadletter::timestamp(first_attempt),
                last_attempt_at: deadletter::timestamp(SystemTime::now()),
                event: serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
            }));
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
            return Outcome::Interrupted;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = drain.wait() => return Outcome::Interrupted,
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
    use crate::queue::MemoryQueue;
    use crate::shutdown;
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
        async fn invoke(&self, request: InvokeRequest) -> Result<(), InvokeError> {
            let mut requests = self.requests.lock().expect("lock");
            requests.push(request);
            match &self.error {
                Some(e) if requests.len() <= self.fail_first => Err(e.clone()),
                _ => Ok(()),
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
        RulePlan {
            name: "r".into(),
            function: "f".into(),
            qualifier: None,
            invocation: InvocationType::Event,
            max_messages,
            max_bytes: 1_000_000,
            max_wait,
            rate_limit: None,
            throttle: None,
            aggregate: None,
            max_concurrency: 1,
        }
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

    fn letters() -> (tempfile::TempDir, DeadLetters) {
        let dir = tempfile::tempdir().expect("tempdir");
        let letters = DeadLetters::new(dir.path());
        (dir, letters)
    }

    async fn run_until_drained(plan: RulePlan, queue: Arc<MemoryQueue>, invoker: Arc<FakeInvoker>) {
        let (_dir, letters) = letters();
        let (trigger, drain) = shutdown::channel();
        let task = tokio::spawn(deliver(
            plan,
            queue.clone(),
            invoker,
            Arc::default(),
            letters,
            Arc::new(Semaphore::new(32)),
            drain,
        ));
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
        let (_dir, letters) = letters();
        let task = tokio::spawn(deliver(
            plan(10, Duration::from_secs(5)),
            queue.clone(),
            invoker.clone(),
            Arc::default(),
            letters,
            Arc::new(Semaphore::new(32)),
            drain,
        ));
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
        let (_dir, letters) = letters();
        let task = tokio::spawn(deliver(
            plan(1, Duration::ZERO),
            queue.clone(),
            invoker.clone(),
            Arc::default(),
            letters,
            Arc::new(Semaphore::new(32)),
            drain,
        ));
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
        let (dir, letters) = letters();
        let (trigger, drain) = shutdown::channel();
        let stats = Arc::new(RuleStats::default());
        let task = tokio::spawn(deliver(
            plan(1, Duration::ZERO),
            queue.clone(),
            invoker.clone(),
            stats.clone(),
            letters.clone(),
            Arc::new(Semaphore::new(32)),
            drain,
        ));
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

    #[test]
    fn oversize_messages_are_detected_per_invocation_type() {
        let mut p = plan(1, Duration::ZERO);
        let small = msg(1);
        assert_eq!(p.oversize(&small), None);
        let big = Message::received("t".into(), vec![b'a'; 1024 * 1024], 1, false, UNIX_EPOCH);
        assert!(p.oversize(&big).is_some());
        p.invocation = InvocationType::RequestResponse;
        assert_eq!(p.oversize(&big), None);
        let binary = Message::received("t".into(), vec![0xff; 800 * 1024], 1, false, UNIX_EPOCH);
        p.invocation = InvocationType::Event;
        assert!(p.oversize(&binary).is_some(), "base64 grows it past 1 MiB");
    }
}
