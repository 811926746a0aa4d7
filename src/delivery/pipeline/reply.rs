//! The reply step of a rule with `[rules.reply]`: the function's response is published to the
//! request's reply topic, and only the broker's PUBACK makes the event delivered.
//!
//! Invariants:
//! - A reply that can never be published becomes a dead letter carrying the event, so the
//!   request is not lost; shutdown while waiting leaves the message in the queue, to be
//!   invoked and answered again at the next start.
//! - A request with no reply topic (none in the message, none configured) is delivered
//!   without a reply, and counted.

use std::time::SystemTime;

use super::machine::Outcome;
use crate::buffer::deadletter::{self, DeadLetter};
use crate::core::reply::{self, ReplySpec, Request};
use crate::core::stats::RuleStats;
use crate::mqtt::replies::{Replier, ReplyError};
use crate::shaping::plan::RulePlan;

/// A function's response to publish as the reply to its request.
pub(super) struct Answer<'a> {
    pub(super) spec: &'a ReplySpec,
    pub(super) request: &'a Request,
    pub(super) response: Vec<u8>,
    /// The event the function answered, for a dead letter.
    pub(super) event: &'a [u8],
}

impl Answer<'_> {
    /// Publishes the reply and waits for the broker's PUBACK, through reconnects: only then is
    /// the event delivered. A reply that cannot be published becomes a dead letter; shutdown
    /// leaves the message in the queue, to be invoked and answered again at the next start.
    pub(super) async fn publish(
        self,
        plan: &RulePlan,
        replier: &Replier,
        stats: &RuleStats,
    ) -> Outcome {
        let Some(topic) = reply::destination(self.spec, self.request) else {
            RuleStats::add(&stats.replies_without_topic, 1);
            tracing::debug!(rule = %plan.name, id = %self.request.id, "no Response Topic and no [rules.reply] topic: no reply");
            return Outcome::Delivered;
        };
        // The broker may be down for a while: the reply waits for it. At shutdown the MQTT
        // connection stays until delivery has finished (or its time is up).
        let result = replier
            .publish(topic.clone(), self.response, self.spec.retain, self.request)
            .await;
        match result {
            Ok(()) => {
                RuleStats::add(&stats.replies_published, 1);
                tracing::debug!(rule = %plan.name, id = %self.request.id, topic = %topic, "reply published");
                Outcome::Delivered
            }
            Err(ReplyError::Stopped) => Outcome::Interrupted,
            Err(err) => {
                RuleStats::add(&stats.replies_refused, 1);
                tracing::error!(
                    rule = %plan.name, id = %self.request.id, code = err.code(),
                    "the function answered but its reply cannot be published: {err}; the message goes to the dead letters"
                );
                let now = deadletter::timestamp(SystemTime::now());
                Outcome::Refused(Box::new(DeadLetter {
                    rule: plan.name.clone(),
                    reason: format!(
                        "the function answered but its reply cannot be published: {err}"
                    ),
                    code: err.code().to_owned(),
                    attempts: 1,
                    first_attempt_at: now.clone(),
                    last_attempt_at: now,
                    event: serde_json::from_slice(self.event).unwrap_or(serde_json::Value::Null),
                }))
            }
        }
    }
}
