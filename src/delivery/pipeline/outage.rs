//! A rule whose buffer cannot be read (an SD card's EIO, a segment file gone): the delivery
//! loop keeps going, retries the read with capped backoff, and says so once per outage.
//!
//! ```text
//!  reading ──read fails (I/O)──► outage: log error once, rule reported stalled, retry later
//!     ▲                             │ read fails again: next delay (doubling, capped), no log
//!     └──────── a read works: log info once, stall cleared ◄──┘
//! ```
//!
//! Invariants:
//! - A read error never ends the delivery task: events in flight finish and are acknowledged
//!   as before, and nothing is acknowledged past what was read (the queue hands over what it
//!   read before the error and reads the failed part again).
//! - The rule is reported stalled ([`RuleStats::stalled`], read by `/readyz` and
//!   `mlb_rule_stalled`) from the first failed read until a read works again.
//! - One error line when an outage begins and one info line when it ends, whatever the number
//!   of attempts in between.
//! - Only the queue being closed (a stop) ends the task: [`QueueError::Closed`] passes through.
//! - At shutdown the loop stops reading a buffer in an outage (`mod.rs`): what it holds stays
//!   for the next start, unacknowledged. A retiring rule keeps retrying.

use std::sync::Arc;
use std::time::Duration;

use backon::ExponentialBackoff;
use tokio::time::Instant;

use crate::buffer::{Entry, QueueError};
use crate::core::retry::retry_delays;
use crate::core::stats::RuleStats;

/// First delay before reading a buffer again after a read failed.
pub const READ_RETRY_MIN_DELAY: Duration = Duration::from_millis(250);
/// Longest delay between two attempts at reading a buffer that keeps failing: an SD card
/// that recovers is read again within this.
pub const READ_RETRY_MAX_DELAY: Duration = Duration::from_secs(30);

/// The read outage of one rule, if any.
pub(super) struct ReadOutage {
    rule: String,
    stats: Arc<RuleStats>,
    current: Option<Current>,
}

/// An outage in progress.
struct Current {
    /// When the first read failed.
    since: Instant,
    /// Failed reads so far.
    failures: u64,
    /// The delays still to wait, one per failure.
    delays: ExponentialBackoff,
    /// Not before this; `None` when the next read may go now.
    retry_at: Option<Instant>,
}

impl ReadOutage {
    /// No outage.
    pub(super) fn new(rule: &str, stats: Arc<RuleStats>) -> Self {
        ReadOutage {
            rule: rule.to_owned(),
            stats,
            current: None,
        }
    }

    /// Whether a read may go now (no outage, or its retry is due).
    pub(super) fn may_read(&self) -> bool {
        self.retry_at().is_none()
    }

    /// Whether reads are failing (from the first failed read to the next good one).
    pub(super) fn is_open(&self) -> bool {
        self.current.is_some()
    }

    /// When to read again, while waiting to.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.current.as_ref().and_then(|c| c.retry_at)
    }

    /// The retry is due: the next read may go.
    pub(super) fn on_retry_due(&mut self) {
        if let Some(current) = &mut self.current {
            current.retry_at = None;
        }
    }

    /// What a read returned: its entries, or `None` after an I/O error (retried later). Only
    /// a closed queue is an error for the caller.
    pub(super) fn on_read(
        &mut self,
        read: Result<Vec<Entry>, QueueError>,
        now: Instant,
    ) -> Result<Option<Vec<Entry>>, QueueError> {
        match read {
            Ok(entries) => {
                self.recovered(now);
                Ok(Some(entries))
            }
            Err(QueueError::Io(error)) => {
                self.failed(&error, now);
                Ok(None)
            }
            Err(QueueError::Closed) => Err(QueueError::Closed),
        }
    }

    fn failed(&mut self, error: &std::io::Error, now: Instant) {
        let current = self.current.get_or_insert_with(|| {
            let reason = format!("cannot read its buffer: {error}; retrying");
            tracing::error!(
                rule = %self.rule, error = %error,
                "cannot read the rule's buffer: delivery of what was read goes on, nothing more is acknowledged, and the read is retried with backoff (up to {} s apart); the rule is reported stalled on /readyz and in mlb_rule_stalled until it reads again",
                READ_RETRY_MAX_DELAY.as_secs()
            );
            self.stats.stalled.set(reason);
            Current {
                since: now,
                failures: 0,
                delays: retry_delays(READ_RETRY_MIN_DELAY, READ_RETRY_MAX_DELAY),
                retry_at: None,
            }
        });
        current.failures += 1;
        let delay = current.delays.next().unwrap_or(READ_RETRY_MAX_DELAY);
        current.retry_at = Some(now + delay);
    }

    fn recovered(&mut self, now: Instant) {
        if let Some(current) = self.current.take() {
            self.stats.stalled.clear();
            let down = now.saturating_duration_since(current.since);
            tracing::info!(
                rule = %self.rule, failed_reads = current.failures,
                "the rule's buffer reads again after {:.1} s; delivery goes on",
                down.as_secs_f64()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eio() -> QueueError {
        QueueError::Io(std::io::Error::from_raw_os_error(5))
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_backs_off_reports_stalled_and_ends_at_the_first_good_read() {
        let stats = Arc::new(RuleStats::default());
        let mut outage = ReadOutage::new("temperature", stats.clone());
        let start = Instant::now();
        assert!(outage.may_read());
        assert!(matches!(outage.on_read(Err(eio()), start), Ok(None)));
        assert!(!outage.may_read(), "waits before reading again");
        let reason = stats.stalled.reason().unwrap_or_default();
        assert!(
            reason.starts_with("cannot read its buffer: ") && reason.ends_with("; retrying"),
            "{reason}"
        );
        let mut delays = Vec::new();
        for _ in 0..12 {
            let at = outage.retry_at().unwrap_or(start);
            delays.push(at - start);
            outage.on_retry_due();
            assert!(outage.may_read());
            assert!(matches!(outage.on_read(Err(eio()), start), Ok(None)));
        }
        assert!(
            delays.iter().all(|d| *d <= READ_RETRY_MAX_DELAY * 2),
            "capped: {delays:?}"
        );
        assert!(delays.last() > delays.first(), "it backs off: {delays:?}");
        outage.on_retry_due();
        let read = outage.on_read(Ok(Vec::new()), start);
        assert!(matches!(read, Ok(Some(v)) if v.is_empty()));
        assert!(!stats.stalled.is_stalled(), "cleared once it reads");
        assert!(outage.may_read());
        assert!(matches!(
            outage.on_read(Err(QueueError::Closed), start),
            Err(QueueError::Closed)
        ));
    }
}
