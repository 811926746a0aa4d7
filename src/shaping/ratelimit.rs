//! Pacing of invocations, pure: a token bucket (with `now` passed in) and adaptive concurrency.
//!
//! The bucket delays, never drops: a caller takes a token and waits the returned duration; the
//! queue absorbs the wait. Tokens may go into debt, so callers that take tokens back to back are
//! spaced exactly `1 / rate` apart. [`Aimd`] says how many invocations may be in flight; it only
//! ever moves between 1 and its cap.

use std::time::Duration;

use std::time::Instant;

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

pub use crate::core::config::EVENT_DEFAULT_MAX_CONCURRENCY;

/// Adaptive concurrency: a throttle halves the number of invocations a rule may have in flight,
/// successes raise it again, up to the cap. A function with reserved concurrency is never
/// stormed, and a recovered one gets its full rate back.
///
/// Two ways to grow, as TCP's congestion window:
/// - *slow start* ([`Aimd::slow_start`]): from 1, each success allows one more, so the limit
///   doubles with every round trip of a full window, until the first throttle or the cap;
/// - *additive increase* (AIMD, as Vector's adaptive request concurrency): one more per window of
///   `limit` successes in a row. [`Aimd::new`] starts here, at the cap.
///
/// Invariant: `1 <= limit <= cap`.
#[derive(Debug, Clone)]
pub struct Aimd {
    /// The most invocations in flight ever allowed.
    cap: usize,
    /// The current limit, 1..=cap.
    limit: usize,
    /// Successes since the last change (additive increase only).
    successes: usize,
    /// Still in slow start: no throttle seen yet and the cap not reached.
    slow_start: bool,
}

impl Aimd {
    /// Starts at the cap: for a `max_concurrency` the user chose, which is trusted until Lambda
    /// throttles.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Aimd {
            cap,
            limit: cap,
            successes: 0,
            slow_start: false,
        }
    }

    /// Starts at 1 and doubles per round trip until the first throttle or `cap`: for a default
    /// limit, which should find the function's and the uplink's capacity without first storming
    /// either.
    pub fn slow_start(cap: usize) -> Self {
        let cap = cap.max(1);
        Aimd {
            cap,
            limit: 1,
            successes: 0,
            slow_start: cap > 1,
        }
    }

    /// Invocations allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Lambda throttled an invocation: halve (at least 1) and grow only additively from now on.
    pub fn on_throttle(&mut self) {
        self.limit = (self.limit / 2).max(1);
        self.successes = 0;
        self.slow_start = false;
    }

    /// An invocation succeeded: in slow start one more is allowed at once; afterwards one more
    /// after `limit` successes in a row.
    pub fn on_success(&mut self) {
        if self.slow_start {
            self.limit = (self.limit + 1).min(self.cap);
            self.slow_start = self.limit < self.cap;
            return;
        }
        self.successes += 1;
        if self.successes >= self.limit {
            self.successes = 0;
            self.limit = (self.limit + 1).min(self.cap);
        }
    }
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

    /// Runs one round trip: as many successes as the limit allows in flight.
    fn full_window_of_successes(aimd: &mut Aimd) {
        for _ in 0..aimd.limit() {
            aimd.on_success();
        }
    }

    #[test]
    fn slow_start_doubles_per_round_trip_up_to_the_cap() {
        let mut aimd = Aimd::slow_start(EVENT_DEFAULT_MAX_CONCURRENCY);
        let mut limits = vec![aimd.limit()];
        for _ in 0..7 {
            full_window_of_successes(&mut aimd);
            limits.push(aimd.limit());
        }
        assert_eq!(limits, vec![1, 2, 4, 8, 16, 32, 64, 64]);
    }

    #[test]
    fn slow_start_stops_at_a_cap_that_is_not_a_power_of_two() {
        let mut aimd = Aimd::slow_start(5);
        let mut limits = Vec::new();
        for _ in 0..4 {
            full_window_of_successes(&mut aimd);
            limits.push(aimd.limit());
        }
        assert_eq!(limits, vec![2, 4, 5, 5]);
    }

    #[test]
    fn a_throttle_in_slow_start_halves_and_then_grows_one_per_window() {
        let mut aimd = Aimd::slow_start(64);
        for _ in 0..4 {
            full_window_of_successes(&mut aimd);
        }
        assert_eq!(aimd.limit(), 16);
        aimd.on_throttle();
        assert_eq!(aimd.limit(), 8);
        aimd.on_success();
        assert_eq!(aimd.limit(), 8, "no longer one more per success");
        for _ in 0..7 {
            aimd.on_success();
        }
        assert_eq!(aimd.limit(), 9, "one more after a full window");
        full_window_of_successes(&mut aimd);
        assert_eq!(aimd.limit(), 10);
    }

    #[test]
    fn slow_start_with_a_cap_of_one_stays_at_one() {
        let mut aimd = Aimd::slow_start(1);
        full_window_of_successes(&mut aimd);
        assert_eq!(aimd.limit(), 1);
        let mut aimd = Aimd::slow_start(0);
        assert_eq!(aimd.limit(), 1, "a cap of zero is read as one");
        aimd.on_success();
        assert_eq!(aimd.limit(), 1);
    }

    proptest::proptest! {
        /// Whatever Lambda answers, in any order, the limit stays within 1..=cap.
        #[test]
        fn the_limit_never_leaves_one_to_cap(
            cap in 0usize..100,
            slow in proptest::bool::ANY,
            events in proptest::collection::vec(proptest::bool::weighted(0.8), 0..500),
        ) {
            let mut aimd = if slow { Aimd::slow_start(cap) } else { Aimd::new(cap) };
            for success in events {
                if success { aimd.on_success() } else { aimd.on_throttle() }
                proptest::prop_assert!((1..=cap.max(1)).contains(&aimd.limit()));
            }
        }
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
