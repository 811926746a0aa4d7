//! The session's lines for the log: [`Note`] names what happened with what a person needs to
//! act on it; [`Note::log`] words it. The session (`session.rs`) decides which note to write
//! and when, so how often a line comes (an outage's reminders, the first of many pauses) is
//! tested there without a logger.

use std::time::Duration;

use crate::core::clock::human;

/// A line for the log, with what a person needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Connected, maybe after an outage of this long.
    Connected {
        /// The broker had our session.
        session_present: bool,
        /// How long the broker was unreachable.
        after: Option<Duration>,
    },
    /// A new session: these many replies are published again.
    HandingBack(usize),
    /// A rule's filter is subscribed.
    Subscribed {
        /// The rule.
        rule: String,
        /// Its filter.
        filter: String,
        /// The QoS granted.
        qos: u8,
    },
    /// The broker refused a rule's filter.
    SubscriptionRefused {
        /// The rule.
        rule: String,
        /// Its filter.
        filter: String,
        /// Why.
        reason: String,
    },
    /// No rule uses the filter any more, and it is unsubscribed.
    Unsubscribed(String),
    /// The broker refused to unsubscribe the filter.
    UnsubscribeRefused {
        /// The filter.
        filter: String,
        /// Why.
        reason: String,
    },
    /// Publishes received so far.
    Received(u64),
    /// Reads paused; `pauses` counts them (the first is a warning).
    Pausing(u64),
    /// The first QoS 0 publish dropped of a run (see `hold.rs`).
    DroppingQos0,
    /// QoS 0 publishes dropped so far in this run.
    StillDroppingQos0(u64),
    /// A run of QoS 0 drops ended.
    StoppedDroppingQos0 {
        /// Dropped in this run.
        dropped: u64,
        /// Dropped since the process started.
        total: u64,
    },
    /// A reply went out with this packet id.
    ReplySent(u16),
    /// The first failure of an outage.
    CannotConnect {
        /// Why.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
    },
    /// A reminder that the broker is still down.
    StillDown {
        /// Why.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
        /// Down so far.
        down_for: Duration,
    },
    /// Still down, for another reason than before.
    ReasonChanged {
        /// Why, now.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
    },
    /// Still down, as before (debug).
    StillCannotConnect {
        /// Why.
        error: String,
        /// Next attempt in.
        retry_in: Duration,
    },
}

impl Note {
    /// Writes the line; `broker` is the broker's URL, for the connection's lines.
    pub fn log(&self, broker: &str) {
        match self {
            Note::Connected {
                session_present,
                after: Some(outage),
            } => tracing::info!(
                broker = %broker,
                session_present,
                "connected to the MQTT broker again after an outage of {}",
                human(*outage)
            ),
            Note::Connected {
                session_present,
                after: None,
            } => tracing::info!(broker = %broker, session_present, "connected to the MQTT broker"),
            Note::HandingBack(replies) => tracing::info!(
                replies,
                "the broker started a new session: publishing the replies it had not acknowledged again"
            ),
            Note::Subscribed { rule, filter, qos } => {
                tracing::info!(rule = %rule, filter = %filter, granted = qos, "subscribed")
            }
            Note::SubscriptionRefused {
                rule,
                filter,
                reason,
            } => tracing::error!(
                rule = %rule, filter = %filter, reason = %reason,
                "the broker refused the subscription ({reason}); check its ACL for this client"
            ),
            Note::Unsubscribed(filter) => {
                tracing::info!(filter = %filter, "unsubscribed: no rule uses this filter any more")
            }
            Note::UnsubscribeRefused { filter, reason } => tracing::warn!(
                filter = %filter, reason = %reason,
                "the broker refused to unsubscribe; messages on this filter that match no rule are acknowledged and dropped"
            ),
            Note::Received(received) => {
                tracing::debug!(received, "publishes received from the broker")
            }
            Note::Pausing(1) => tracing::warn!(
                held = super::INGEST_HOLD_MAX,
                "ingest is far behind the broker: pausing reads from it while the buffer catches up"
            ),
            Note::Pausing(pauses) => tracing::debug!(pauses, "pausing reads from the broker again"),
            Note::ReplySent(pkid) => {
                tracing::debug!(pkid, "reply sent; waiting for the broker's acknowledgement")
            }
            _ => self.log_outage(broker),
        }
    }

    fn log_drops(&self) {
        match self {
            Note::DroppingQos0 => tracing::warn!(
                held = super::INGEST_HOLD_MAX,
                "ingest is far behind the broker and reads cannot pause while a reply or acknowledgements wait on the connection: dropping QoS 0 messages until ingest catches up (QoS 1 and 2 messages are kept)"
            ),
            Note::StillDroppingQos0(dropped) => {
                tracing::warn!(
                    dropped,
                    "still dropping QoS 0 messages: ingest is far behind"
                )
            }
            Note::StoppedDroppingQos0 { dropped, total } => tracing::warn!(
                dropped,
                total,
                "ingest caught up: QoS 0 messages are taken again after {dropped} were dropped"
            ),
            _ => {}
        }
    }

    fn log_outage(&self, broker: &str) {
        match self {
            Note::CannotConnect { error, retry_in } => tracing::warn!(
                broker = %broker,
                retry_in = %human(*retry_in),
                "cannot connect to the MQTT broker: {error}; retrying with backoff, no messages arrive meanwhile"
            ),
            Note::StillDown {
                error,
                retry_in,
                down_for,
            } => tracing::warn!(
                broker = %broker,
                retry_in = %human(*retry_in),
                "the MQTT broker is still unreachable after {}: {error}; no messages arrive meanwhile",
                human(*down_for)
            ),
            Note::ReasonChanged { error, retry_in } => tracing::info!(
                broker = %broker, retry_in = %human(*retry_in),
                "the MQTT broker still cannot be reached, now: {error}"
            ),
            Note::StillCannotConnect { error, retry_in } => tracing::debug!(
                broker = %broker, retry_in = %human(*retry_in),
                "still cannot reach the MQTT broker: {error}"
            ),
            _ => self.log_drops(),
        }
    }
}
