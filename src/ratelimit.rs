//! A token bucket that paces invocations: pure, with `now` passed in.
//!
//! It delays, never drops: a caller takes a token and waits the returned duration; the queue
//! absorbs the wait. Tokens may go into debt, so callers that take tokens back to back are
//! spaced exactly `1 / rate` apart.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use tokio::time::Instant;

/// `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens saved up while idle.
    burst: f64,
    /// Tokens available now; negative when callers are waiting on future tokens.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            updated: now,
        }
    }

    /// Takes one token and says how long to wait before using it (zero when one was ready).
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Adaptive concurrency (AIMD, as Vector's adaptive request concurrency): a throttle halves the
/// number of invocations a rule may have in flight, successes raise it again one step per
/// "window" of successes, up to the configured maximum. A function with reserved concurrency is
/// never stormed, and a recovered one gets its full rate back.
#[derive(Debug, Clone)]
pub struct Aimd {
    /// The configured maximum.
    max: usize,
    /// The current limit, 1..=max.
    limit: usize,
    /// Successes since the last change.
    successes: usize,
}

impl Aimd {
    /// Starts at the maximum.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Aimd {
            max,
            limit: max,
            successes: 0,
        }
    }

    /// Invocations allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Lambda throttled an invocation: halve (at least 1).
    pub fn on_throttle(&mut self) {
        self.limit = (self.limit / 2).max(1);
        self.successes = 0;
    }

    /// An invocation succeeded: after `limit` successes in a row, one more is allowed.
    pub fn on_success(&mut self) {
        self.successes += 1;
        if self.successes >= self.limit {
            self.successes = 0;
            self.limit = (self.limit + 1).min(self.max);
        }
    }
}

/// Delays for retrying: from `min`, doubling with jitter, capped at `max`, never giving up.
/// Reconnects and invocation retries both use it, with their own bounds.
pub fn retry_delays(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_free_then_calls_are_spaced_by_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 3, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(t0), Duration::ZERO);
        }
        assert_eq!(bucket.take(t0), Duration::from_millis(500));
        assert_eq!(bucket.take(t0), Duration::from_millis(1000));
    }

    #[test]
    fn aimd_halves_on_throttles_and_climbs_back_step_by_step() {
        let mut aimd = Aimd::new(8);
        assert_eq!(aimd.limit(), 8);
        aimd.on_throttle();
        assert_eq!(aimd.limit(), 4);
        aimd.on_throttle();
        aimd.on_throttle();
        aimd.on_throttle();
        assert_eq!(aimd.limit(), 1, "never below one");
        aimd.on_success();
        assert_eq!(aimd.limit(), 2, "one success at limit 1 is a full window");
        for _ in 0..2 {
            aimd.on_success();
        }
        assert_eq!(aimd.limit(), 3);
        for _ in 0..100 {
            aimd.on_success();
        }
        assert_eq!(aimd.limit(), 8, "never above the maximum");
    }

    #[test]
    fn idle_time_refills_up_to_burst_only() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(0.2, 1, t0);
        assert_eq!(bucket.take(t0), Duration::ZERO);
        assert_eq!(bucket.take(t0), Duration::from_secs(5));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bucket.take(later), Duration::ZERO);
        assert_eq!(bucket.take(later), Duration::from_secs(5));
    }
}
