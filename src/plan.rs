//! What a rule does, decided once from its validated configuration, and what it counted.
//!
//! [`RulePlan`] is read by ingest (the oversize decision), by the forming stage (`batch.rs`) and
//! by the delivery loop (`pipeline.rs`); [`RuleStats`] is written by all three and read by the
//! rule summary (and metrics). Pure: no I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::aggregate::{AggregateSpec, GroupBy};
use crate::config::{InvocationType, KeepConfig, RuleConfig};
use crate::envelope::{self, Message};
use crate::ratelimit::EVENT_DEFAULT_MAX_CONCURRENCY;
use crate::reply::ReplySpec;
use crate::throttle::{Keep, ThrottleSpec};

/// Headroom kept under Lambda's payload limit for what the SDK adds around the event.
pub const PAYLOAD_HEADROOM: usize = 1024;
/// Worst growth of a payload in the event: a control character in a text payload becomes a
/// six-byte `\u00XX` escape (base64 grows binary by only 4/3, JSON travels verbatim).
const WORST_ESCAPE_GROWTH: usize = 6;
/// The fixed fields of one message in the event (id, qos, retain, received_at, punctuation).
const MESSAGE_FIELDS_BOUND: usize = 160;
/// An event with an empty rule name and no messages; each byte of the name adds at most
/// [`WORST_ESCAPE_GROWTH`].
const EMPTY_EVENT_LEN: usize = r#"{"rule":"","messages":[]}"#.len();

/// What the delivery of one rule needs to know of it.
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
    /// Whether concurrency starts at one and grows (the default for `event` rules) rather
    /// than starting at `max_concurrency` (set explicitly).
    pub slow_start: bool,
    /// Where the function's response is published, when the rule replies.
    pub reply: Option<ReplySpec>,
}

impl RulePlan {
    /// The plan for a validated rule.
    pub fn from_config(rule: &RuleConfig) -> Self {
        let limit = payload_limit(rule.invocation);
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
        let (max_concurrency, slow_start) = match (rule.max_concurrency, rule.invocation) {
            (Some(n), _) => (n.max(1), false),
            (None, InvocationType::Event) => (EVENT_DEFAULT_MAX_CONCURRENCY, true),
            // A synchronous function's replies are awaited in order: one at a time.
            (None, InvocationType::RequestResponse) => (1, false),
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
                    KeepConfig::First => Keep::First,
                    KeepConfig::Latest => Keep::Latest,
                },
                only_changes: t.only_changes,
                deadband: t.deadband_field.clone().zip(t.deadband),
            }),
            aggregate: rule.aggregate.as_ref().map(|a| AggregateSpec {
                window_ms: a.window.0.as_millis().max(1) as u64,
                fields: a.fields.clone(),
                group_by: GroupBy::parse(&a.group_by).unwrap_or(GroupBy::Topic),
            }),
            max_concurrency,
            slow_start,
            reply: rule.reply.as_ref().map(|r| ReplySpec {
                topic: r.topic.clone(),
                retain: r.retain,
            }),
        }
    }

    /// A forwarding `event` plan with defaults, one message per event (tests).
    #[doc(hidden)]
    pub fn for_tests(name: &str) -> Self {
        RulePlan {
            name: name.into(),
            function: "f".into(),
            qualifier: None,
            invocation: InvocationType::Event,
            max_messages: 1,
            max_bytes: payload_limit(InvocationType::Event),
            max_wait: Duration::ZERO,
            rate_limit: None,
            throttle: None,
            aggregate: None,
            max_concurrency: 1,
            slow_start: false,
            reply: None,
        }
    }

    /// The encoded size of an event carrying `message` alone, when that is over the limit.
    pub fn oversize(&self, message: &Message) -> Option<usize> {
        let limit = payload_limit(self.invocation);
        // A bound that holds for every rule name, payload and topic first, by arithmetic alone
        // (this runs for every message received); encode only near the limit.
        let bound = EMPTY_EVENT_LEN
            + (self.name.len() + message.payload.len() + message.topic.len()) * WORST_ESCAPE_GROWTH
            + MESSAGE_FIELDS_BOUND;
        if bound <= limit {
            return None;
        }
        // encoded_message_len counts a separating comma that a lone message does not have.
        let size =
            envelope::envelope_overhead(&self.name) + envelope::encoded_message_len(message) - 1;
        (size > limit).then_some(size)
    }
}

/// The largest event this invocation type accepts, less headroom for the SDK.
fn payload_limit(invocation: InvocationType) -> usize {
    usize::try_from(invocation.payload_limit())
        .unwrap_or(usize::MAX)
        .saturating_sub(PAYLOAD_HEADROOM)
}

/// Counters of one rule, for the rule summary and metrics.
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
    /// Topics `[rules.throttle]` forgot to stay under its cap on tracked topics.
    pub throttle_forgotten: AtomicU64,
    /// Failed invocation attempts that Lambda throttled (retried).
    pub attempts_throttled: AtomicU64,
    /// Failed invocation attempts retried for any other reason.
    pub attempts_error: AtomicU64,
    /// Failed invocation attempts after which the event went to the dead-letter store.
    pub attempts_refused: AtomicU64,
    /// Replies the broker acknowledged.
    pub replies_published: AtomicU64,
    /// Requests answered without a reply: no Response Topic and no `reply.topic`.
    pub replies_without_topic: AtomicU64,
    /// Replies that could not be published (their messages went to the dead letters).
    pub replies_refused: AtomicU64,
    /// How long each invocation attempt took.
    pub invoke_seconds: DurationHistogram,
    /// Receipt time (ms since the epoch) of the oldest message delivery has read and not yet
    /// acknowledged in the queue; 0 when it holds none.
    pub oldest_unacked_ms: AtomicU64,
}

impl RuleStats {
    /// Adds `n` to one of the counters.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads one of the counters.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the invocation duration buckets: an Invoke over a good link
/// takes tens of milliseconds, over LTE hundreds, and the SDK gives up on a dead one after its
/// timeouts, some tens of seconds.
pub const INVOKE_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];

/// A histogram of durations over [`INVOKE_BUCKETS`], written without locks.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    /// Observations per bucket (not cumulative); the last one is above every bound (+Inf).
    buckets: [AtomicU64; INVOKE_BUCKETS.len() + 1],
    /// Sum of all observations, in microseconds.
    sum_micros: AtomicU64,
}

/// What a [`DurationHistogram`] held when read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of the observations, in seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// (upper bound, observations in this bucket alone), the last bound `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
}

impl DurationHistogram {
    /// Counts one duration.
    pub fn observe(&self, duration: Duration) {
        let secs = duration.as_secs_f64();
        let i = INVOKE_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(INVOKE_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The counts now. The count is the buckets' total, so the two always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = INVOKE_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        HistogramSnapshot {
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn message(payload: Vec<u8>) -> Message {
        Message::received("t".into(), payload, 1, false, UNIX_EPOCH)
    }

    #[test]
    fn durations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::default();
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_millis(11));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.01, 1));
        assert_eq!(s.buckets[1], (0.025, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum - 60.021).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn oversize_messages_are_detected_per_invocation_type() {
        let mut p = RulePlan::for_tests("r");
        assert_eq!(p.oversize(&message(b"1".to_vec())), None);
        let big = message(vec![b'a'; 1024 * 1024]);
        assert!(p.oversize(&big).is_some());
        p.invocation = InvocationType::RequestResponse;
        assert_eq!(p.oversize(&big), None);
        p.invocation = InvocationType::Event;
        let binary = message(vec![0xff; 800 * 1024]);
        assert!(p.oversize(&binary).is_some(), "base64 grows it past 1 MiB");
    }

    #[test]
    fn escaped_text_is_measured_as_encoded_not_guessed() {
        let p = RulePlan::for_tests("r");
        // 200 KiB of control characters: each becomes \u0001 (6 bytes) — 1.2 MiB encoded,
        // well over the 1 MiB event limit though the payload is small.
        let escaped = message(vec![0x01; 200 * 1024]);
        let size = p.oversize(&escaped).expect("over the limit");
        assert!(size > 6 * 200 * 1024, "{size}");
        // Plain text of the same length fits.
        assert_eq!(p.oversize(&message(vec![b'a'; 200 * 1024])), None);
    }

    #[test]
    fn event_rules_slow_start_by_default_and_request_response_keeps_one() {
        let rule = |extra: serde_json::Value| -> RuleConfig {
            let mut value = serde_json::json!({"name": "r", "topic": "t", "function": "f"});
            if let (Some(all), Some(more)) = (value.as_object_mut(), extra.as_object()) {
                all.extend(more.clone());
            }
            serde_json::from_value(value).expect("rule")
        };
        let event = RulePlan::from_config(&rule(serde_json::json!({})));
        assert_eq!(
            (event.max_concurrency, event.slow_start),
            (EVENT_DEFAULT_MAX_CONCURRENCY, true)
        );
        let sync =
            RulePlan::from_config(&rule(serde_json::json!({"invocation": "request_response"})));
        assert_eq!((sync.max_concurrency, sync.slow_start), (1, false));
        let strict = RulePlan::from_config(&rule(serde_json::json!({"max_concurrency": 1})));
        assert_eq!((strict.max_concurrency, strict.slow_start), (1, false));
    }
}
