//! The one retry policy of the daemon: capped exponential delays with jitter, never giving up
//! (reconnects, invocation retries and storing retries each with their own bounds). `backon`
//! computes them; `backoff` is unmaintained (RUSTSEC-2025-0012).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

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
