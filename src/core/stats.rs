//! Counters each part writes and the reporters read (the rule summary, `/metrics`): a rule's
//! [`RuleStats`] and the invocation duration histogram. Plain atomics, written without locks;
//! a reader sees each counter on its own, not a consistent set. The one exception is
//! [`Stalled`], a short line behind a lock, written only when a rule stalls or recovers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Counters of one rule, for the rule summary and metrics.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Messages appended to the rule's queue.
    pub queued: AtomicU64,
    /// Messages matched to the rule that its SQL WHERE did not keep (never stored).
    pub filtered: AtomicU64,
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
    /// Why the rule delivers nothing now (its buffer cannot be read, or its delivery stopped),
    /// for `/readyz` and `mlb_rule_stalled`; clear while it delivers.
    pub stalled: Stalled,
    /// When these counters began: a rate since then is a count over the time since `since`
    /// (`mlb_rule_start_time_seconds`, read by `cost --from`).
    pub since: Since,
}

/// When a rule's counters began counting: when they were created, at the start or at the
/// reload that added the rule (a changed rule keeps its counters and their start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since(pub SystemTime);

impl Default for Since {
    fn default() -> Self {
        Since(SystemTime::now())
    }
}

impl Since {
    /// Seconds since the Unix epoch.
    pub fn epoch_seconds(self) -> f64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Why a rule cannot deliver now, as one line that completes "rule X …" (e.g. "cannot read
/// its buffer: …; retrying"); `None` while it can. Set by whoever sees the stall begin
/// (the delivery loop, the rule's life), cleared by whoever sees it end.
#[derive(Debug, Default)]
pub struct Stalled(Mutex<Option<String>>);

impl Stalled {
    /// The rule stalled, for this reason.
    pub fn set(&self, reason: String) {
        *self.lock() = Some(reason);
    }

    /// The rule delivers again.
    pub fn clear(&self) {
        *self.lock() = None;
    }

    /// Why it is stalled, or `None`.
    pub fn reason(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Whether it is stalled.
    pub fn is_stalled(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A plain store or load: a panic elsewhere cannot leave it half-written.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
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

/// What the buffer publishes of one rule's queue: drop counters, levels, and whether it can
/// be written. The disk queue (`crate::buffer`) implements it.
pub trait BufferReport: Send + Sync {
    /// Its drop and loss counters.
    fn counters(&self) -> &BufferCounters;
    /// Pending messages, bytes and segments now.
    fn stats(&self) -> QueueStats;
    /// Whether the last write succeeded.
    fn writable(&self) -> bool;
    /// The most bytes its segments may hold: the rule's share of `buffer.max_size`.
    fn max_bytes(&self) -> u64;
}

/// What the queue counted since it opened (recovery included).
#[derive(Debug, Default)]
pub struct BufferCounters {
    /// Messages dropped by `when_full = drop_oldest` (deleted unacknowledged segments).
    pub dropped_oldest: AtomicU64,
    /// Messages refused by `when_full = drop_newest`.
    pub dropped_newest: AtomicU64,
    /// Messages dropped for being older than `max_age`.
    pub expired: AtomicU64,
    /// Records that could not be read back (corruption, missing segments).
    pub lost: AtomicU64,
    /// Bytes skipped or truncated because they were not valid records.
    pub corrupt_bytes: AtomicU64,
    /// File fsyncs made: group commits of the segments and syncs of the `ack` file (each
    /// rewrites at least one page of the disk; directory fsyncs are not counted).
    pub fsyncs: AtomicU64,
}

/// A snapshot for `buffer stats` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages appended and not yet acknowledged.
    pub pending: u64,
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
}

/// One rule as the reporters (metrics, readiness, notify's status) see it.
#[derive(Clone)]
pub struct RuleReport {
    /// The rule's name.
    pub name: String,
    /// Whether it has `[rules.reply]` (its reply counters are reported).
    pub replies: bool,
    /// Its counters.
    pub stats: Arc<RuleStats>,
    /// Its buffer.
    pub buffer: Arc<dyn BufferReport>,
}

/// Every rule running (in force, and removed but draining), sorted by name; the daemon
/// replaces the list whenever a rule starts or stops, and reporters in other tasks read it.
pub type Board = Arc<RwLock<Vec<RuleReport>>>;

#[cfg(test)]
mod tests {
    use super::*;

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
}
