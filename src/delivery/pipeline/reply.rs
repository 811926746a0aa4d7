//! The reply step of a rule with `[rules.reply]`: the function's response is published to the
//! request's reply topic, and only the broker's PUBACK makes the event delivered.
//!
//! Invariants:
//! - A reply that can never be published becomes a dead letter carrying the event, so the
//!   request is not lost; shutdown while waiting leaves the message in the queue, to be
//!   invoked and answered again at the next start.
//! - A request with no reply topic (none in the message, none configured) is delivered
//!   without a reply, and counted.
//! - A device never chooses where the bridge publishes: a Response Topic outside `reply.allow`
//!   is replaced by `reply.topic`, and without one the reply becomes a `ReplyNotAllowed` dead
//!   letter (counted with the replies dead-lettered), never a publish.

use std::time::SystemTime;

use super::machine::Outcome;
use crate::buffer::deadletter::{self, DeadLetter};
use crate::core::reply::{self, Destination, ReplySpec, Request};
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
        let topic = match reply::destination(self.spec, self.request) {
            Destination::ResponseTopic(topic) => topic,
            Destination::Template { topic, refused } => {
                if let Some(refused) = refused {
                    tracing::debug!(rule = %plan.name, id = %self.request.id, response_topic = %refused, "Response Topic not in reply.allow: the reply goes to reply.topic");
                }
                topic
            }
            Destination::NotAllowed(refused) => {
                RuleStats::add(&stats.replies_refused, 1);
                let reason = format!(
                    "the request's Response Topic {refused:?} matches no filter of reply.allow \
                     and the rule has no reply.topic, so its reply was not published; add a \
                     filter for it to [rules.reply] allow if devices may choose that topic, or \
                     set reply.topic, then replay the dead letters"
                );
                tracing::warn!(rule = %plan.name, id = %self.request.id, code = reply::NOT_ALLOWED_CODE, "{reason}");
                return dead_letter(plan, self.event, reason, reply::NOT_ALLOWED_CODE);
            }
            Destination::Nowhere => {
                RuleStats::add(&stats.replies_without_topic, 1);
                tracing::debug!(rule = %plan.name, id = %self.request.id, "no Response Topic and no [rules.reply] topic: no reply");
                return Outcome::Delivered;
            }
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
                let reason =
                    format!("the function answered but its reply cannot be published: {err}");
                dead_letter(plan, self.event, reason, err.code())
            }
        }
    }
}

/// The answered `event` as a dead letter: the request is kept, its reply is not published.
fn dead_letter(plan: &RulePlan, event: &[u8], reason: String, code: &str) -> Outcome {
    let now = deadletter::timestamp(SystemTime::now());
    Outcome::Refused(Box::new(DeadLetter {
        rule: plan.name.clone(),
        reason,
        code: code.to_owned(),
        attempts: 1,
        first_attempt_at: now.clone(),
        last_attempt_at: now,
        event: serde_json::from_slice(event).unwrap_or(serde_json::Value::Null),
    }))
}
