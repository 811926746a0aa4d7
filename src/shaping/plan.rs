//! What a rule does, decided once from its validated configuration, and what it counted.
//!
//! [`RulePlan`] is read by ingest (the oversize decision), by the forming stage (`batch.rs`) and
//! by the delivery loop (`delivery/pipeline.rs`); what they count goes to
//! [`crate::core::stats::RuleStats`]. Pure: no I/O.

use std::sync::Arc;
use std::time::Duration;

use crate::core::config::{InvocationType, KeepConfig, RuleConfig};
use crate::core::envelope::{self, Message};
use crate::core::reply::ReplySpec;
use crate::core::sql::Statement;
use crate::shaping::aggregate::{AggregateSpec, GroupBy};
use crate::shaping::ratelimit::EVENT_DEFAULT_MAX_CONCURRENCY;
use crate::shaping::throttle::{Keep, ThrottleSpec};

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
    /// The rule's SQL statement, when it has one: evaluated at ingest, before storing.
    pub sql: Option<Arc<Statement>>,
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
                allow: r.allow.clone(),
                retain: r.retain,
            }),
            sql: rule.statement.clone(),
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
            sql: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn message(payload: Vec<u8>) -> Message {
        Message::received("t".into(), payload, 1, false, UNIX_EPOCH)
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
