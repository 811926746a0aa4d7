//! Delivery: one task per rule reads its queue, forms batches, paces them, invokes the function,
//! and acknowledges the queue only after Lambda accepted the event.
//!
//! A failed invocation is retried in place with capped exponential backoff and jitter (backon),
//! honouring Lambda's `retryAfterSeconds`; the task sleeps between attempts, so a failing
//! function holds up only its own rule. Order within a rule is FIFO: a batch is retried until it
//! is accepted before the next one is formed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;

use crate::config::{InvocationType, RuleConfig};
use crate::envelope::{self, Message};
use crate::invoker::{Invoke, InvokeError, InvokeRequest};
use crate::queue::deadletter::{self, DeadLetter, DeadLetters};
use crate::queue::{Entry, Queue, QueueError};
use crate::ratelimit::TokenBucket;
use crate::shutdown::Shutdown;

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

/// Delivers the rule's queue until `drain` is triggered and the queue is empty.
pub async fn deliver<Q: Queue, I: Invoke>(
    plan: RulePlan,
    queue: Arc<Q>,
    invoker: Arc<I>,
    stats: Arc<RuleStats>,
    dead_letters: DeadLetters,
    drain: Shutdown,
) -> Result<(), DeliveryError> {
    let queue_err = |source| DeliveryError::Queue {
        rule: plan.name.clone(),
        source,
    };
    let mut bucket = plan
        .rate_limit
        .map(|(rate, burst)| TokenBucket::new(rate, burst, Instant::now()));
    let overhead = envelope::envelope_overhead(&plan.name);
    // Entries read but left for the next batch because they did not fit.
    let mut carry: VecDeque<(Entry, usize)> = VecDeque::new();
    loop {
        let mut batch: Vec<Entry> = Vec::new();
        let mut bytes = overhead;
        let mut deadline: Option<Instant> = None;
        loop {
            if batch.len() >= plan.max_messages {
                break;
            }
            let next = match carry.pop_front() {
                Some(next) => Some(next),
                None => {
                    let wanted = plan.max_messages - batch.len();
                    let mut got = queue.try_read(wanted).map_err(queue_err)?;
                    if got.is_empty() {
                        let wait_until = match (batch.is_empty(), deadline) {
                            (true, _) => None,
                            (false, Some(d)) => Some(d),
                            (false, None) => break,
                        };
                        if drain.is_triggered() {
                            if batch.is_empty() {
                                return Ok(());
                            }
                            break;
                        }
                        tokio::select! {
                            read = queue.read(wanted) => got = read.map_err(queue_err)?,
                            _ = sleep_until_opt(wait_until) => break,
                            _ = drain.wait() => continue,
                        }
                    }
                    carry.extend(got.into_iter().map(|e| {
                        let len = envelope::encoded_message_len(&e.message);
                        (e, len)
                    }));
                    carry.pop_front()
                }
            };
            let Some((entry, len)) = next else { break };
            if !batch.is_empty() && bytes + len > plan.max_bytes {
                carry.push_front((entry, len));
                break;
            }
            bytes += len;
            batch.push(entry);
            if deadline.is_none() && !plan.max_wait.is_zero() {
                deadline = Some(Instant::now() + plan.max_wait);
            }
        }
        if batch.is_empty() {
            continue;
        }
        match send_batch(&plan, &batch, &*invoker, &stats, bucket.as_mut(), &drain).await {
            Outcome::Delivered => {
                RuleStats::add(&stats.delivered, batch.len() as u64);
                RuleStats::add(&stats.invocations, 1);
            }
            Outcome::Refused(letter) => {
                // Ack only once the dead letter is on disk; if it cannot be written, keep the
                // batch and try again later rather than lose it.
                if let Err(err) = dead_letters.append(&letter) {
                    tracing::error!(rule = %plan.name, error = %err, "cannot write the dead-letter store; retrying later");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_MAX_DELAY) => {}
                        _ = drain.wait() => return Ok(()),
                    }
                    carry.extend(batch.into_iter().map(|e| {
                        let len = envelope::encoded_message_len(&e.message);
                        (e, len)
                    }));
                    continue;
                }
                RuleStats::add(&stats.dead_lettered, batch.len() as u64);
                tracing::error!(
                    rule = %plan.name, function = %plan.function, code = %letter.code,
                    messages = batch.len(), attempts = letter.attempts, file = %dead_letters.path().display(),
                    "moved to the dead-letter store: {}", letter.reason
                );
            }
            Outcome::Interrupted => {
                // Draining and Lambda refuses: leave the rest in the queue for the next start.
                return Ok(());
            }
        }
        if let Some(last) = batch.last() {
            queue.ack(last.seq).await.map_err(queue_err)?;
        }
    }
}

/// How one batch ended.
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

/// Invokes until Lambda accepts the batch, refuses it for good, or shutdown interrupts.
async fn send_batch<I: Invoke>(
    plan: &RulePlan,
    batch: &[Entry],
    invoker: &I,
    stats: &RuleStats,
    mut bucket: Option<&mut TokenBucket>,
    drain: &Shutdown,
) -> Outcome {
    let messages: Vec<Message> = batch.iter().map(|e| e.message.clone()).collect();
    let payload = envelope::encode_event(&plan.name, &messages);
    drop(messages);
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN_DELAY)
        .with_max_delay(RETRY_MAX_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt: u32 = 0;
    let first_attempt = SystemTime::now();
    loop {
        if let Some(bucket) = bucket.as_deref_mut() {
            let wait = bucket.take(Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        attempt += 1;
        let request = InvokeRequest {
            function: plan.function.clone(),
            qualifier: plan.qualifier.clone(),
            invocation: plan.invocation,
            payload: payload.clone(),
        };
        let err = match invoker.invoke(request).await {
            Ok(()) => {
                if attempt > 1 {
                    tracing::info!(rule = %plan.name, attempts = attempt, "delivered after retrying");
                }
                tracing::debug!(rule = %plan.name, messages = batch.len(), bytes = payload.len(), "delivered");
                return Outcome::Delivered;
            }
            Err(err) => err,
        };
        RuleStats::add(&stats.failed_attempts, 1);
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
                event: serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null),
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
        log_failure(plan, &err, attempt, batch.len(), delay);
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
