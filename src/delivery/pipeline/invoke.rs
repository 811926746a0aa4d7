//! One event's invocation: pacing (token bucket), the call, retries with capped exponential
//! backoff and jitter (backon), honouring Lambda's `retryAfterSeconds`, adaptive concurrency
//! (AIMD), and the classification of a failure as one to retry or one that makes a dead
//! letter.
//!
//! Invariants:
//! - An event ends exactly one way: accepted (`Ok` with the response), refused for good (a
//!   dead letter saying why), or interrupted by shutdown (it stays in the queue).
//! - The task sleeps between attempts, so a failing function holds up only its own rule; a
//!   drain cuts the sleep short.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::machine::Outcome;
use crate::buffer::deadletter::{self, DeadLetter};
use crate::core::shutdown::Shutdown;
use crate::core::stats::RuleStats;
use crate::delivery::invoker::{Invoke, InvokeError, InvokeRequest};
use crate::shaping::plan::RulePlan;
use crate::shaping::ratelimit::{Aimd, TokenBucket};

/// First delay after a failed invocation.
pub const RETRY_MIN_DELAY: Duration = Duration::from_millis(500);
/// Longest delay between two attempts: a recovered function is noticed within this.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(60);

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

/// What an invocation task needs, owned so the task can outlive the loop's borrow.
pub(super) struct Invocation<I> {
    pub(super) plan: Arc<RulePlan>,
    pub(super) invoker: Arc<I>,
    pub(super) stats: Arc<RuleStats>,
    /// The rule's token bucket, when it has a rate limit.
    pub(super) bucket: Option<Arc<Mutex<TokenBucket>>>,
    /// The rule's adaptive concurrency.
    pub(super) aimd: Arc<Mutex<Aimd>>,
    pub(super) drain: Shutdown,
}

impl<I: Invoke> Invocation<I> {
    /// Invokes until Lambda accepts the event (`Ok` with the function's response), refuses it
    /// for good, or shutdown interrupts.
    pub(super) async fn send(&self, payload: &[u8], messages: usize) -> Result<Vec<u8>, Outcome> {
        let (plan, stats) = (&*self.plan, &*self.stats);
        let mut backoff = crate::core::retry::retry_delays(RETRY_MIN_DELAY, RETRY_MAX_DELAY);
        let mut attempt: u32 = 0;
        let first_attempt = SystemTime::now();
        loop {
            self.pace().await;
            attempt += 1;
            let err = match self.attempt(payload).await {
                Ok(response) => {
                    self.on_accepted(attempt, messages, payload.len());
                    return Ok(response);
                }
                Err(err) => err,
            };
            self.on_failed(&err);
            if is_permanent(&err, attempt) {
                RuleStats::add(&stats.attempts_refused, 1);
                let letter = refusal(plan, &err, attempt, first_attempt, payload);
                return Err(Outcome::Refused(Box::new(letter)));
            }
            match err {
                InvokeError::Throttled { .. } => RuleStats::add(&stats.attempts_throttled, 1),
                _ => RuleStats::add(&stats.attempts_error, 1),
            }
            let delay = retry_delay(&err, backoff.next());
            log_failure(plan, &err, attempt, messages, delay);
            if self.drain.is_triggered() {
                return Err(Outcome::Interrupted);
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.drain.wait() => return Err(Outcome::Interrupted),
            }
        }
    }

    /// Waits for the rate limit's next token, if the rule has one.
    async fn pace(&self) {
        let Some(bucket) = &self.bucket else {
            return;
        };
        let wait = bucket
            .lock()
            .map_or(Duration::ZERO, |mut b| b.take(Instant::now().into_std()));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// One call to the function, timed into the rule's histogram.
    async fn attempt(&self, payload: &[u8]) -> Result<Vec<u8>, InvokeError> {
        let plan = &*self.plan;
        let request = InvokeRequest {
            function: plan.function.clone(),
            qualifier: plan.qualifier.clone(),
            invocation: plan.invocation,
            payload: payload.to_vec(),
        };
        let started = Instant::now();
        let result = self.invoker.invoke(request).await;
        self.stats.invoke_seconds.observe(started.elapsed());
        result
    }

    fn on_accepted(&self, attempt: u32, messages: usize, bytes: usize) {
        if let Ok(mut aimd) = self.aimd.lock() {
            aimd.on_success();
        }
        let rule = &self.plan.name;
        if attempt > 1 {
            tracing::info!(rule = %rule, attempts = attempt, "delivered after retrying");
        }
        tracing::debug!(rule = %rule, messages, bytes, "delivered");
    }

    fn on_failed(&self, err: &InvokeError) {
        RuleStats::add(&self.stats.failed_attempts, 1);
        if let InvokeError::Throttled { .. } = err
            && let Ok(mut aimd) = self.aimd.lock()
        {
            aimd.on_throttle();
            tracing::info!(rule = %self.plan.name, concurrency = aimd.limit(), "throttled: fewer invocations in flight");
        }
    }
}

/// The backoff's next delay, at least what a throttle's `retryAfterSeconds` asks.
fn retry_delay(err: &InvokeError, next: Option<Duration>) -> Duration {
    let delay = next.unwrap_or(RETRY_MAX_DELAY);
    match err {
        InvokeError::Throttled {
            retry_after: Some(after),
            ..
        } => delay.max(*after),
        _ => delay,
    }
}

/// The dead letter of an event Lambda refused for good.
fn refusal(
    plan: &RulePlan,
    err: &InvokeError,
    attempt: u32,
    first_attempt: SystemTime,
    payload: &[u8],
) -> DeadLetter {
    let (code, reason) = match err {
        InvokeError::FunctionError { kind, detail } => (
            "FunctionError".to_owned(),
            format!("the function failed {attempt} times ({kind}): {detail}"),
        ),
        other => (other.code().to_owned(), other.to_string()),
    };
    DeadLetter {
        rule: plan.name.clone(),
        reason,
        code,
        attempts: attempt,
        first_attempt_at: deadletter::timestamp(first_attempt),
        last_attempt_at: deadletter::timestamp(SystemTime::now()),
        event: serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
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
    fn a_throttle_waits_at_least_what_lambda_asks() {
        let throttled = InvokeError::Throttled {
            code: "TooManyRequestsException".into(),
            message: String::new(),
            retry_after: Some(Duration::from_secs(7)),
        };
        let one = Some(Duration::from_secs(1));
        assert_eq!(retry_delay(&throttled, one), Duration::from_secs(7));
        let transient = InvokeError::Transient {
            code: "ServiceException".into(),
            message: String::new(),
        };
        assert_eq!(retry_delay(&transient, one), Duration::from_secs(1));
        assert_eq!(retry_delay(&transient, None), RETRY_MAX_DELAY);
    }
}
