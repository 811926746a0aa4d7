//! One rule while the daemon runs: its [`Route`] (plan, filter, queue, counters, dead letters),
//! shared by ingest (which stores into it) and delivery (which reads from it), and its
//! summary in the log. Its life cycle (running, retiring, failed, stopped) is [`life`]: one
//! state per rule and one pure transition function the daemon's reload acts through.
//!
//! Invariant: one `Route` per rule in force, owned through `Arc`; a reload swaps whole routes,
//! it never edits one in place. There are no parallel lists indexed by rule.

pub mod life;

use std::sync::Arc;

use crate::buffer::DiskQueue;
use crate::buffer::deadletter::DeadLetters;
use crate::core::stats::{BufferReport, RuleReport, RuleStats};
use crate::shaping::plan::RulePlan;

/// Everything one rule owns while the daemon runs.
pub struct Route<Q> {
    /// What the rule does.
    pub plan: Arc<RulePlan>,
    /// Its MQTT topic filter.
    pub filter: String,
    /// The QoS it subscribes with.
    pub qos: u8,
    /// Its durable queue.
    pub queue: Arc<Q>,
    /// Its counters.
    pub stats: Arc<RuleStats>,
    /// Where its messages that can never be invoked go.
    pub dead_letters: DeadLetters,
}

impl<Q: BufferReport + 'static> Route<Q> {
    /// What the reporters see of this rule.
    pub fn report(&self) -> RuleReport {
        RuleReport {
            name: self.plan.name.clone(),
            replies: self.plan.reply.is_some(),
            stats: self.stats.clone(),
            buffer: self.queue.clone(),
        }
    }
}

/// Logs one rule's counters (at shutdown, or when a removed rule has drained).
pub fn summary(route: &Route<DiskQueue>) {
    let (queue, stats) = (&route.queue, &route.stats);
    let counters = queue.counters();
    let get = RuleStats::get;
    tracing::info!(
        rule = %route.plan.name,
        queued = get(&stats.queued),
        filtered = get(&stats.filtered),
        delivered = get(&stats.delivered),
        accepted_invocations = get(&stats.invocations),
        failed_invocation_attempts = get(&stats.failed_attempts),
        set_aside = get(&stats.set_aside),
        dead_lettered = get(&stats.dead_lettered),
        throttled_min_interval = get(&stats.throttled_min_interval),
        throttled_only_changes = get(&stats.throttled_unchanged),
        throttled_deadband = get(&stats.throttled_deadband),
        throttle_forgotten = get(&stats.throttle_forgotten),
        dropped_oldest = get(&counters.dropped_oldest),
        dropped_newest = get(&counters.dropped_newest),
        expired = get(&counters.expired),
        lost_to_corruption = get(&counters.lost),
        left_in_buffer = queue.stats().pending,
        "rule summary"
    );
    if route.plan.reply.is_some() {
        tracing::info!(
            rule = %route.plan.name,
            replies_published = get(&stats.replies_published),
            replies_without_topic = get(&stats.replies_without_topic),
            replies_dead_lettered = get(&stats.replies_refused),
            "reply summary"
        );
    }
}
