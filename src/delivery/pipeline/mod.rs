//! Delivery: one task per rule reads its queue, forms events (`shaping::batch`), invokes the
//! function with bounded, adaptive concurrency, and acknowledges the queue only below the
//! oldest event Lambda has not accepted yet.
//!
//! Split the way rumqttc splits `state.rs` from `eventloop.rs`: [`Core`] (`machine.rs`) is the
//! rule's delivery state and its transitions, pure, with its acknowledgement bookkeeping in
//! `ack.rs`; [`deliver_with`] here is a thin async loop that only waits for the next input and
//! performs what the core asks for: read, start invocations (`invoke.rs`, and `reply.rs` for a
//! rule that answers), acknowledge, write a dead letter. A read that fails is retried with
//! backoff while the rule is reported stalled (`outage.rs`).
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
//!   ever replays, never skips.
//! - A task starts by rewinding its queue to the first unacknowledged message: a task started
//!   again after one that died (a reload of a failed rule) reads what that one had in flight
//!   again, so its first acknowledgement covers only what it delivered itself.
//! - Only a closed queue ends the task on an error; a read error is an outage, retried.
//! - The loop holds no lock and allocates nothing per input beyond what an invocation carries;
//!   everything it decides, it asks of the core.

mod ack;
mod invoke;
mod machine;
mod outage;
mod reply;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::Instant;

use crate::buffer::{Queue, QueueError};
use crate::core::health::Beat;
use crate::core::shutdown::Shutdown;
use crate::delivery::invoker::Invoke;
use crate::mqtt::replies::Replier;
use crate::rule::Route;
use crate::shaping::batch::{Now, Unit};
use crate::shaping::plan::RulePlan;
use crate::shaping::ratelimit::{Aimd, TokenBucket};

pub use invoke::{PERMANENT_AFTER_ATTEMPTS, RETRY_MAX_DELAY, RETRY_MIN_DELAY, is_permanent};
pub use machine::{
    Core, LETTER_RETRY_MAX_DELAY, LETTER_RETRY_MIN_DELAY, MAX_INFLIGHT_BYTES, Mode, Outcome,
    ReadWant, Ticket, Wait,
};
pub use outage::{READ_RETRY_MAX_DELAY, READ_RETRY_MIN_DELAY};

use invoke::Invocation;
use outage::ReadOutage;
use reply::Answer;

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

/// What a reload wants of a rule's delivery task.
#[derive(Debug, Clone)]
pub enum Directive {
    /// Deliver with this plan (a changed rule, or a removed rule added back).
    Run(Arc<RulePlan>),
    /// The rule was removed: deliver what its queue holds, then stop.
    Retire,
}

fn now() -> Now {
    Now {
        at: Instant::now().into_std(),
        wall_ms: SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
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
/// stuck in an await outside its `select!` stops the watchdog. The task starts from the
/// queue's first unacknowledged message (see the module's invariants) and ends when a drain
/// (shutdown) or a retirement has delivered everything, or when its queue is closed; a read
/// error is retried while the rule is reported stalled (`outage.rs`). A rule with
/// `[rules.reply]` publishes each response through `replier` (reply.rs) before the event
/// counts as delivered.
pub async fn deliver_with<Q: Queue, I: Invoke>(
    route: Arc<Route<Q>>,
    invoker: Arc<I>,
    global: Arc<Semaphore>,
    drain: Shutdown,
    directives: watch::Receiver<Directive>,
    beat: Beat,
    replier: Option<Replier>,
) -> Result<(), DeliveryError> {
    let run = Run::new(&route, invoker, global.clone(), drain.clone(), replier);
    let ended = match route.queue.rewind().await {
        Ok(()) => turn_until_done(&route, run, &global, &drain, directives, &beat).await,
        Err(source) => Err(DeliveryError::Queue {
            rule: route.plan.name.clone(),
            source,
        }),
    };
    // Whatever the end, this loop is no longer watched: a failed rule is reported stalled by
    // its life (`rule::life`, `Effect::MarkStalled`), which a reload can clear by respawning.
    beat.retire();
    ended
}

/// The loop of [`deliver_with`]: waits for the next input, hands it to the core, performs what
/// the core asks, until the core says it is done or the queue fails.
async fn turn_until_done<Q: Queue, I: Invoke>(
    route: &Route<Q>,
    mut run: Run<Q, I>,
    global: &Arc<Semaphore>,
    drain: &Shutdown,
    mut directives: watch::Receiver<Directive>,
    beat: &Beat,
) -> Result<(), DeliveryError> {
    let queue = &*route.queue;
    let queue_err = |source| DeliveryError::Queue {
        rule: route.plan.name.clone(),
        source,
    };
    // A sender dropped without a directive leaves the rule as it is.
    let mut steered = true;
    loop {
        beat.turn();
        run.stop_reading_if_stopping();
        for (first, last) in run.core.accepted_ahead() {
            queue.ack_range(first, last).await.map_err(queue_err)?;
        }
        if let Some(through) = run.core.ack_through() {
            queue.ack(through).await.map_err(queue_err)?;
        }
        let short_of_slots = run.start_invocations();
        let at = now();
        run.write_letter(at);
        let wait = run.core.wait(at);
        if wait.done {
            return Ok(());
        }
        tokio::select! {
            Some(joined) = run.invocations.join_next_with_id(), if !run.invocations.is_empty() => {
                run.on_invocation_ended(joined);
            }
            Some(written) = run.letter_writes.join_next(), if !run.letter_writes.is_empty() => {
                let result = written.unwrap_or_else(|e| Err(e.to_string()));
                run.core.on_letter_written(result, now());
            }
            _ = drain.wait(), if wait.drain => run.core.on_drain(),
            changed = directives.changed(), if steered => match changed {
                Ok(()) => {
                    let directive = directives.borrow_and_update().clone();
                    run.on_directive(directive);
                }
                Err(_) => steered = false,
            },
            read = queue.read(READ_MAX), if wait.read == ReadWant::Wait && run.outage.may_read() => {
                if let Some(entries) = run.outage.on_read(read, Instant::now()).map_err(queue_err)? {
                    run.core.on_read(entries, now());
                }
            }
            read = queue.read_ready(READ_MAX), if wait.read == ReadWant::Now && run.outage.may_read() => {
                if let Some(entries) = run.outage.on_read(read, Instant::now()).map_err(queue_err)? {
                    run.core.on_read(entries, now());
                }
            }
            _ = sleep_until_opt(run.outage.retry_at()), if !run.outage.may_read() => {
                run.outage.on_retry_due();
            }
            _ = sleep_until_opt(wait.wake_at.map(Instant::from_std)) => run.core.on_tick(now()),
            permit = global.clone().acquire_owned(), if short_of_slots => {
                // A slot freed up in another rule; loop round to use it.
                drop(permit);
            }
            _ = beat.due() => {}
        }
    }
}

/// What the delivery loop owns besides its queue and its inputs: the core, the plan in force
/// with its pacing, and the tasks it started.
struct Run<Q, I> {
    route: Arc<Route<Q>>,
    invoker: Arc<I>,
    /// Invocations in flight across all rules.
    global: Arc<Semaphore>,
    drain: Shutdown,
    replier: Option<Replier>,
    plan: Arc<RulePlan>,
    pacing: Pacing,
    core: Core,
    /// Whether the queue's reads are failing, and when to try again.
    outage: ReadOutage,
    invocations: JoinSet<(Ticket, Outcome)>,
    /// Which event each invocation task carries, to account for a task that failed.
    carrying: BTreeMap<Id, Ticket>,
    letter_writes: JoinSet<Result<(), String>>,
}

impl<Q: Queue, I: Invoke> Run<Q, I> {
    fn new(
        route: &Arc<Route<Q>>,
        invoker: Arc<I>,
        global: Arc<Semaphore>,
        drain: Shutdown,
        replier: Option<Replier>,
    ) -> Self {
        let plan = route.plan.clone();
        Run {
            route: route.clone(),
            invoker,
            global,
            drain,
            replier,
            pacing: Pacing::new(&plan),
            core: Core::new(plan.clone(), route.stats.clone()),
            outage: ReadOutage::new(&plan.name, route.stats.clone()),
            plan,
            invocations: JoinSet::new(),
            carrying: BTreeMap::new(),
            letter_writes: JoinSet::new(),
        }
    }

    /// Starts what may start: the rule's limit, then a global slot each. Whether it was short
    /// of global slots (then a freed slot is worth waking for).
    fn start_invocations(&mut self) -> bool {
        let startable = self.core.startable(self.pacing.limit());
        let mut permits = Vec::with_capacity(startable);
        while permits.len() < startable {
            match self.global.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let short_of_slots = permits.len() < startable;
        for (unit, permit) in self.core.start(permits.len()).into_iter().zip(permits) {
            self.spawn_invocation(unit, permit);
        }
        short_of_slots
    }

    fn spawn_invocation(&mut self, unit: Unit, permit: OwnedSemaphorePermit) {
        let invocation = Invocation {
            plan: self.plan.clone(),
            invoker: self.invoker.clone(),
            stats: self.route.stats.clone(),
            bucket: self.pacing.bucket.clone(),
            aimd: self.pacing.aimd.clone(),
            drain: self.drain.clone(),
        };
        let replier = self.replier.clone();
        let ticket = Ticket::of(&unit);
        let handle = self.invocations.spawn(async move {
            let outcome = carry(&invocation, replier.as_ref(), &unit).await;
            drop(permit);
            (ticket, outcome)
        });
        self.carrying.insert(handle.id(), ticket);
    }

    /// At shutdown a buffer that cannot be read is not waited for: what was read is delivered,
    /// the rest stays buffered for the next start. (A retiring rule keeps retrying: nothing
    /// else would ever deliver what its buffer holds.)
    fn stop_reading_if_stopping(&mut self) {
        let reading = self.core.mode() == Mode::Draining { read_to_end: false };
        if reading && self.outage.is_open() && self.drain.is_triggered() {
            tracing::warn!(rule = %self.plan.name, "stopping while the rule's buffer cannot be read: what it holds stays there for the next start");
            self.core.on_read(Vec::new(), now());
        }
    }

    /// Writes the dead letter the core asks for, if any, off the runtime's threads.
    fn write_letter(&mut self, at: Now) {
        if let Some(letter) = self.core.letter_to_write(at) {
            let letters = self.route.dead_letters.clone();
            self.letter_writes
                .spawn_blocking(move || letters.append(&letter).map_err(|e| e.to_string()));
        }
    }

    fn on_invocation_ended(&mut self, joined: Result<(Id, (Ticket, Outcome)), JoinError>) {
        match joined {
            Ok((id, (ticket, outcome))) => {
                self.carrying.remove(&id);
                self.core.on_finished(ticket, Some(outcome));
            }
            Err(err) => {
                tracing::error!(rule = %self.plan.name, error = %err, "invocation task failed; this rule stops delivering until the next start");
                if let Some(ticket) = self.carrying.remove(&err.id()) {
                    self.core.on_finished(ticket, None);
                }
            }
        }
    }

    fn on_directive(&mut self, directive: Directive) {
        match directive {
            Directive::Run(next) => {
                self.core.on_resume();
                if !Arc::ptr_eq(&next, &self.plan) {
                    self.core.on_plan(next.clone(), now());
                    self.pacing = Pacing::new(&next);
                    self.plan = next;
                }
            }
            Directive::Retire => self.core.on_retire(),
        }
    }
}

/// One event, from invocation to outcome: the call with its retries, then, for a rule that
/// answers, the reply.
async fn carry<I: Invoke>(
    invocation: &Invocation<I>,
    replier: Option<&Replier>,
    unit: &Unit,
) -> Outcome {
    let plan = &*invocation.plan;
    match invocation.send(&unit.payload, unit.messages).await {
        Ok(response) => match (&plan.reply, unit.request.as_deref(), replier) {
            (Some(spec), Some(request), Some(replier)) => {
                let reply = Answer {
                    spec,
                    request,
                    response,
                    event: &unit.payload,
                };
                reply.publish(plan, replier, &invocation.stats).await
            }
            _ => Outcome::Delivered,
        },
        Err(outcome) => outcome,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::deadletter::DeadLetters;
    use crate::buffer::{DiskQueue, FaultStorage, MemoryQueue};
    use crate::core::envelope::{self, Message};
    use crate::core::shutdown;
    use crate::delivery::invoker::{InvokeError, InvokeRequest};
    use std::sync::Mutex;
    use std::time::Duration;
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

    /// Each event's first payload as a number, in the order the invoker saw them.
    fn delivered(invoker: &FakeInvoker) -> Vec<i64> {
        invoker
            .events()
            .iter()
            .filter_map(|e| e["messages"][0]["payload"].as_i64())
            .collect()
    }

    /// Waits until `done` (10 s at most, in the test's clock), else fails with `seen()`.
    async fn wait_until(what: &str, done: impl Fn() -> bool, seen: impl Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}: {}",
                seen()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Holds every invocation of a message numbered `hold_from` or more forever (a task that
    /// dies with it in flight), and records the others.
    struct Holding {
        hold_from: i64,
        inner: FakeInvoker,
    }

    impl Invoke for Holding {
        async fn invoke(&self, request: InvokeRequest) -> Result<Vec<u8>, InvokeError> {
            let event: serde_json::Value =
                serde_json::from_slice(&request.payload).map_err(|e| InvokeError::Transient {
                    code: "test".into(),
                    message: e.to_string(),
                })?;
            if event["messages"][0]["payload"].as_i64() >= Some(self.hold_from) {
                self.inner.requests.lock().expect("lock").push(request);
                return std::future::pending().await;
            }
            self.inner.invoke(request).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_started_again_does_not_acknowledge_what_the_dead_one_had_in_flight() {
        let queue = Arc::new(MemoryQueue::new(100));
        queue
            .append((0..10).map(msg).collect())
            .await
            .expect("append");
        let (_dir, route) = route(plan(1, Duration::ZERO), queue.clone());
        let (_trigger, drain) = shutdown::channel();
        let holding = Arc::new(Holding {
            hold_from: 3,
            inner: FakeInvoker::default(),
        });
        let dead = tokio::spawn(deliver(
            route.clone(),
            holding.clone(),
            Arc::new(Semaphore::new(32)),
            drain.clone(),
        ));
        wait_until(
            "message 3 is in flight",
            || delivered(&holding.inner).contains(&3),
            || format!("invoked {:?}", delivered(&holding.inner)),
        )
        .await;
        // The task dies with 3 in flight and 4..9 read: what a failed rule leaves behind.
        dead.abort();
        let _ = dead.await;
        assert_eq!(queue.len(), 7, "0, 1 and 2 acknowledged, 3..9 not");

        let invoker = Arc::new(FakeInvoker::default());
        let again = spawn_deliver(&route, &invoker, drain);
        queue
            .append((10..12).map(msg).collect())
            .await
            .expect("append");
        wait_until(
            "the queue is acknowledged to its end",
            || queue.is_empty(),
            || {
                format!(
                    "{} unacknowledged; delivered {:?}",
                    queue.len(),
                    delivered(&invoker)
                )
            },
        )
        .await;
        assert_eq!(
            delivered(&invoker),
            (3..12).collect::<Vec<i64>>(),
            "everything acknowledged was delivered by the new task: nothing the dead one had in flight or had read was skipped"
        );
        again.abort();
    }

    /// A disk queue over `storage` with small segments, in `dir`.
    fn disk_queue(dir: &std::path::Path, storage: Arc<dyn crate::buffer::Storage>) -> DiskQueue {
        let config = crate::buffer::DiskQueueConfig {
            dir: dir.to_owned(),
            segment_size: crate::buffer::disk::MIN_SEGMENT_SIZE,
            max_size: 1 << 30,
            when_full: crate::core::config::WhenFull::Block,
            max_age: None,
            max_ack_delay: std::time::Duration::ZERO,
        };
        DiskQueue::open_with(config, storage).expect("open")
    }

    fn disk_route(queue: DiskQueue, dir: &std::path::Path) -> Arc<Route<DiskQueue>> {
        Arc::new(Route {
            plan: Arc::new(plan(1, Duration::ZERO)),
            filter: "#".into(),
            qos: 1,
            queue: Arc::new(queue),
            stats: Arc::default(),
            dead_letters: DeadLetters::new(dir),
        })
    }

    /// A rule over five messages whose reads fail (EIO), delivering until it reports itself
    /// stalled.
    async fn stalled_on_unreadable_reads(
        dir: &std::path::Path,
    ) -> (
        FaultStorage,
        Arc<Route<DiskQueue>>,
        Arc<FakeInvoker>,
        shutdown::Trigger,
        tokio::task::JoinHandle<Result<(), DeliveryError>>,
    ) {
        let storage = FaultStorage::new();
        let queue = disk_queue(&dir.join("r"), Arc::new(storage.clone()));
        storage.fail_reads(true);
        queue
            .append((0..5).map(msg).collect())
            .await
            .expect("append");
        let route = disk_route(queue, dir);
        let (invoker, trigger, task) = deliver_until_stalled(&route).await;
        (storage, route, invoker, trigger, task)
    }

    /// Starts delivering `route` to a fake Lambda and waits until the rule reports itself
    /// stalled.
    async fn deliver_until_stalled(
        route: &Arc<Route<DiskQueue>>,
    ) -> (
        Arc<FakeInvoker>,
        shutdown::Trigger,
        tokio::task::JoinHandle<Result<(), DeliveryError>>,
    ) {
        let invoker = Arc::new(FakeInvoker::default());
        let (trigger, drain) = shutdown::channel();
        let task = tokio::spawn(deliver(
            route.clone(),
            invoker.clone(),
            Arc::new(Semaphore::new(32)),
            drain,
        ));
        wait_until(
            "the rule is reported stalled",
            || route.stats.stalled.is_stalled(),
            || {
                format!(
                    "task finished: {}; delivered {:?}",
                    task.is_finished(),
                    delivered(&invoker)
                )
            },
        )
        .await;
        (invoker, trigger, task)
    }

    #[tokio::test]
    async fn a_read_error_is_retried_the_rule_reported_stalled_and_everything_delivered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, route, invoker, trigger, task) =
            stalled_on_unreadable_reads(dir.path()).await;
        let reason = route.stats.stalled.reason().unwrap_or_default();
        assert!(
            reason.starts_with("cannot read its buffer: ") && reason.ends_with("; retrying"),
            "{reason}"
        );
        assert!(delivered(&invoker).is_empty());
        assert!(!task.is_finished(), "a read error does not end the rule");

        storage.fail_reads(false);
        wait_until(
            "everything is delivered and acknowledged",
            || route.queue.stats().pending == 0,
            || {
                format!(
                    "{} pending; delivered {:?}; stalled: {:?}",
                    route.queue.stats().pending,
                    delivered(&invoker),
                    route.stats.stalled.reason()
                )
            },
        )
        .await;
        assert_eq!(delivered(&invoker), (0..5).collect::<Vec<i64>>());
        assert!(!route.stats.stalled.is_stalled(), "cleared once it reads");
        trigger.trigger();
        task.await.expect("join").expect("deliver");
    }

    #[tokio::test]
    async fn what_was_read_before_a_missing_segment_is_delivered_and_nothing_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rule_dir = dir.path().join("r");
        let queue = disk_queue(&rule_dir, Arc::new(crate::buffer::RealStorage));
        for n in 0..40 {
            queue.append(vec![msg(n)]).await.expect("append");
        }
        let segments = crate::buffer::disk::segment_files(&rule_dir).expect("list");
        assert!(segments.len() >= 3, "{segments:?}");
        // The second segment is gone (a drop_oldest race, a failing card): reading stops there.
        let missing = segments[1].clone();
        let away = rule_dir.join("away");
        std::fs::rename(&missing, &away).expect("rename");
        let route = disk_route(queue, dir.path());
        let (invoker, trigger, task) = deliver_until_stalled(&route).await;
        std::fs::rename(&away, &missing).expect("rename back");
        wait_until(
            "everything is acknowledged",
            || route.queue.stats().pending == 0,
            || {
                format!(
                    "{} pending; delivered {:?}; task finished: {}",
                    route.queue.stats().pending,
                    delivered(&invoker),
                    task.is_finished()
                )
            },
        )
        .await;
        assert_eq!(
            delivered(&invoker),
            (0..40).collect::<Vec<i64>>(),
            "what was read before the error, then the rest: nothing acknowledged undelivered"
        );
        trigger.trigger();
        task.await.expect("join").expect("deliver");
    }

    #[tokio::test]
    async fn a_shutdown_does_not_wait_for_a_buffer_that_cannot_be_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_storage, route, invoker, trigger, task) =
            stalled_on_unreadable_reads(dir.path()).await;
        trigger.trigger();
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(())))),
            "the task ends at once: {ended:?}"
        );
        assert_eq!(route.queue.stats().pending, 5, "left for the next start");
        assert!(delivered(&invoker).is_empty());
    }
}
