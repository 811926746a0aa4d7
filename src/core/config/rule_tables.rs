//! A rule's sub-tables: `[rules.batch]`, `[rules.rate_limit]`, `[rules.throttle]`,
//! `[rules.aggregate]` and `[rules.reply]`, each key's default, and what serde cannot check.
//!
//! Invariants: a batch's byte cap never exceeds Lambda's limit for the rule's invocation type; a
//! rule batches or aggregates, never both; a reply topic never lands in a replying rule's own
//! filter, and no `reply.allow` filter overlaps a replying rule's filter, so replies cannot come
//! back as requests.

use std::time::Duration;

use serde::Deserialize;

use super::{GroupBy, HumanDuration, InvocationType, Issue, MqttProtocol, RuleConfig, Size};
use crate::core::rules;

/// `[rules.reply]`: where a `request_response` rule publishes the function's response.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// The topic for requests without an MQTT 5 Response Topic that `allow` allows; `{topic}`
    /// stands for the request's topic. Without it, requests with no Response Topic get no
    /// reply, and those whose Response Topic is not allowed are dead-lettered.
    pub topic: Option<String>,
    /// Topic filters a request's Response Topic must match to be used; none by default, so a
    /// device cannot make the bridge publish where it likes.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Publish replies with the retain flag.
    #[serde(default)]
    pub retain: bool,
}

/// `[rules.throttle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// At most one message per topic per interval.
    pub min_interval: Option<HumanDuration>,
    /// Which one `min_interval` keeps.
    #[serde(default)]
    pub keep: KeepConfig,
    /// Drop a payload identical to the last one from its topic.
    #[serde(default)]
    pub only_changes: bool,
    /// Drop a message whose `deadband_field` moved less than this since the last one kept.
    pub deadband: Option<f64>,
    /// JSON pointer of the number the deadband watches, e.g. "/temperature".
    pub deadband_field: Option<String>,
}

/// `rules[].throttle.keep`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepConfig {
    /// The last message of each interval (it waits for the interval's end).
    #[default]
    Latest,
    /// The first message of each interval.
    First,
}

/// `[rules.aggregate]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Length of the tumbling windows.
    pub window: HumanDuration,
    /// JSON pointers of the numeric fields to summarize.
    pub fields: Vec<String>,
    /// "topic" (default), "none", or "level:N" (the Nth topic level, from 1).
    #[serde(default = "default_group_by")]
    pub group_by: String,
}

/// `[rules.batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// At most this many messages per invocation.
    #[serde(default = "default_batch_max_messages")]
    pub max_messages: usize,
    /// At most this many bytes of event per invocation (never above the Lambda limit).
    pub max_bytes: Option<Size>,
    /// How long a partly filled batch waits for more messages.
    #[serde(default = "default_batch_max_wait")]
    pub max_wait: HumanDuration,
}

/// `[rules.rate_limit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained invocations per second; fractional allowed.
    pub invocations_per_second: f64,
    /// Invocations allowed back to back after a quiet spell.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

impl BatchConfig {
    /// `[rules.batch]`: its byte cap depends on the rule's invocation type.
    pub(super) fn validate(&self, prefix: &str, invocation: InvocationType) -> Vec<Issue> {
        let mut issues = Vec::new();
        if self.max_messages == 0 {
            issues.push(Issue::new(
                format!("{prefix}.max_messages"),
                "must be at least 1",
            ));
        }
        if let Some(max_bytes) = self.max_bytes {
            let limit = invocation.payload_limit();
            if max_bytes.0 == 0 || max_bytes.0 > limit {
                issues.push(Issue::new(
                    format!("{prefix}.max_bytes"),
                    format!(
                        "must be between 1 and {limit} bytes (Lambda's limit for this invocation type), got {}",
                        max_bytes.0
                    ),
                ));
            }
        }
        issues
    }
}

impl ThrottleConfig {
    /// `[rules.throttle]`.
    pub(super) fn validate(&self, prefix: &str) -> Vec<Issue> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut issues = Vec::new();
        if self.min_interval.is_some_and(|d| d.0.is_zero()) {
            issues.push(Issue::new(key("min_interval"), "must be above zero"));
        }
        match (&self.deadband, &self.deadband_field) {
            (Some(band), Some(field)) => {
                if !(band.is_finite() && *band > 0.0) {
                    issues.push(Issue::new(
                        key("deadband"),
                        format!("must be a number above zero, got {band}"),
                    ));
                }
                if !field.starts_with('/') {
                    issues.push(Issue::new(
                        key("deadband_field"),
                        format!("{field:?} is not a JSON pointer; write e.g. \"/temperature\""),
                    ));
                }
            }
            (Some(_), None) => issues.push(Issue::new(
                key("deadband_field"),
                "deadband needs the field it watches, e.g. deadband_field = \"/temperature\"",
            )),
            (None, Some(_)) => issues.push(Issue::new(
                key("deadband"),
                "deadband_field needs a deadband, e.g. deadband = 0.5",
            )),
            (None, None) => {}
        }
        if self.min_interval.is_none() && !self.only_changes && self.deadband.is_none() {
            issues.push(Issue::new(
                prefix,
                "set min_interval, only_changes or deadband (an empty throttle does nothing)",
            ));
        }
        issues
    }
}

impl AggregateConfig {
    /// `[rules.aggregate]`; `has_batch` because a rule does one or the other.
    pub(super) fn validate(&self, prefix: &str, has_batch: bool) -> Vec<Issue> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut issues = Vec::new();
        if self.window.0 < Duration::from_secs(1) {
            issues.push(Issue::new(key("window"), "must be at least 1s"));
        }
        if self.fields.is_empty() {
            issues.push(Issue::new(
                key("fields"),
                "list at least one JSON pointer, e.g. [\"/temperature\"]",
            ));
        }
        for (j, field) in self.fields.iter().enumerate() {
            if !field.starts_with('/') {
                issues.push(Issue::new(
                    key(&format!("fields[{j}]")),
                    format!("{field:?} is not a JSON pointer; write e.g. \"/temperature\""),
                ));
            }
        }
        if let Err(message) = GroupBy::parse(&self.group_by) {
            issues.push(Issue::new(key("group_by"), message));
        }
        if has_batch {
            issues.push(Issue::new(
                prefix,
                "a rule either batches messages ([rules.batch]) or summarizes them ([rules.aggregate]), not both",
            ));
        }
        issues
    }
}

impl RateLimitConfig {
    /// `[rules.rate_limit]`.
    pub(super) fn validate(&self, prefix: &str) -> Vec<Issue> {
        let mut issues = Vec::new();
        if !(self.invocations_per_second.is_finite() && self.invocations_per_second > 0.0) {
            issues.push(Issue::new(
                format!("{prefix}.invocations_per_second"),
                format!(
                    "must be a number above zero, got {}",
                    self.invocations_per_second
                ),
            ));
        }
        if self.burst == 0 {
            issues.push(Issue::new(format!("{prefix}.burst"), "must be at least 1"));
        }
        issues
    }
}

/// `[rules.reply]` of every rule, which needs the protocol (MQTT 3.1.1 carries no Response
/// Topic) and the other rules (a reply must not come back as a request).
pub(super) fn replies(rules: &[RuleConfig], protocol: MqttProtocol) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let Some(reply) = &rule.reply else { continue };
        let key = format!("rules[{i}].reply");
        if rule.invocation != InvocationType::RequestResponse {
            issues.push(Issue::new(
                key.clone(),
                "replies need invocation = \"request_response\" (an event invocation returns no response)",
            ));
        }
        if rule.batch.is_some() || rule.aggregate.is_some() {
            issues.push(Issue::new(
                key.clone(),
                "replies need one message per invocation: remove [rules.batch] or [rules.aggregate] from this rule",
            ));
        }
        issues.extend(allow_issues(rules, &key, &reply.allow));
        let topic_key = format!("{key}.topic");
        match &reply.topic {
            None if protocol == MqttProtocol::V311 => issues.push(Issue::new(
                topic_key,
                "required with mqtt.protocol = \"3.1.1\": MQTT 3.1.1 messages carry no Response \
                 Topic, so no request would get a reply; e.g. \"{topic}/reply\"",
            )),
            None => {}
            Some(template) => {
                if let Err(message) = crate::core::reply::check_template(template) {
                    issues.push(Issue::new(topic_key, message));
                    continue;
                }
                // A request on a topic of this rule's filter, replied to where the template
                // says: if a replying rule takes that topic, replies come back as requests.
                let own = rules::match_filter(&rule.topic);
                let sample =
                    crate::core::reply::expand(template, &crate::core::reply::sample_topic(own));
                if let Some((j, other)) = rules.iter().enumerate().find(|(_, r)| {
                    r.reply.is_some() && rules::matches(rules::match_filter(&r.topic), &sample)
                }) {
                    issues.push(Issue::new(
                        topic_key,
                        format!(
                            "a reply to a request on {own:?} would go to {sample:?}, which \
                             rules[{j}].{} {:?} takes: replies would come back as requests, \
                             forever; choose a topic outside every replying rule's filter",
                            other.filter_key(),
                            other.topic
                        ),
                    ));
                }
            }
        }
    }
    issues
}

/// `reply.allow` of one rule (`key` is its `rules[i].reply`): topic filters, no templates, no
/// broker topics, and none that overlaps a replying rule's filter (a device could then name a
/// Response Topic that feeds the reply back in as a request).
fn allow_issues(rules: &[RuleConfig], key: &str, allow: &[String]) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (j, filter) in allow.iter().enumerate() {
        let at = format!("{key}.allow[{j}]");
        if let Err(message) = rules::validate_filter(filter) {
            let quoted = format!("{filter:?}");
            let message = if message.contains(&quoted) {
                message
            } else {
                format!("{quoted}: {message}")
            };
            issues.push(Issue::new(at, message));
            continue;
        }
        if filter.contains(['{', '}']) {
            issues.push(Issue::new(
                at,
                format!(
                    "{filter:?}: reply.allow holds topic filters, not templates (nothing in \
                     braces is replaced); use + for a level, e.g. \"dev/+/answers\""
                ),
            ));
            continue;
        }
        if filter.starts_with('$') {
            issues.push(Issue::new(
                at,
                format!(
                    "{filter:?}: topics starting with '$' belong to the broker and are never \
                     used as Response Topics; allow e.g. \"replies/#\""
                ),
            ));
            continue;
        }
        if let Some((k, other)) = rules.iter().enumerate().find(|(_, r)| {
            r.reply.is_some() && rules::overlap(filter, rules::match_filter(&r.topic))
        }) {
            issues.push(Issue::new(
                at,
                format!(
                    "{filter:?} overlaps rules[{k}].{} {:?}, which replies too: a device \
                     could name a Response Topic there and its reply would come back as a \
                     request, forever; allow only topics outside every replying rule's filter, \
                     e.g. \"replies/#\"",
                    other.filter_key(),
                    other.topic
                ),
            ));
        }
    }
    issues
}

fn default_batch_max_messages() -> usize {
    100
}

fn default_batch_max_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

fn default_burst() -> u32 {
    1
}

fn default_group_by() -> String {
    "topic".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::tests::load_unvalidated;

    #[test]
    fn replies_need_request_response_one_message_a_topic_under_3_1_1_and_no_loop() {
        let rule = |name: &str, topic: &str, extra: &str| {
            format!(
                "[[rules]]\nname = \"{name}\"\ntopic = \"{topic}\"\nfunction = \"f\"\n{extra}\n"
            )
        };
        let rr = "invocation = \"request_response\"";
        let text = [
            "[mqtt]\nurl = \"mqtt://x\"\n".to_owned(),
            // Fine: a template outside every replying rule's filter.
            rule(
                "ok",
                "dev/+/req",
                &format!("{rr}\n[rules.reply]\ntopic = \"replies/{{topic}}\""),
            ),
            // An event rule cannot reply; a batch cannot either.
            rule("ev", "ev/#", "[rules.reply]\ntopic = \"r/{topic}\""),
            rule(
                "batched",
                "b/#",
                &format!(
                    "{rr}\n[rules.batch]\nmax_messages = 2\n[rules.reply]\ntopic = \"r/{{topic}}\""
                ),
            ),
            // No topic under 3.1.1; a placeholder that does not exist; a loop onto itself.
            rule("bare", "bare/#", &format!("{rr}\n[rules.reply]")),
            rule(
                "odd",
                "odd/#",
                &format!("{rr}\n[rules.reply]\ntopic = \"{{device}}/x\""),
            ),
            rule(
                "loop",
                "loop/#",
                &format!("{rr}\n[rules.reply]\ntopic = \"{{topic}}/reply\""),
            ),
        ]
        .concat();
        let config = load_unvalidated(&text);
        let issues = replies(&config.rules, MqttProtocol::V311);
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "rules[1].reply",
                "rules[2].reply",
                "rules[3].reply.topic",
                "rules[4].reply.topic",
                "rules[5].reply.topic"
            ],
            "{issues:#?}"
        );
        assert!(issues[0].message.contains("request_response"));
        assert!(issues[1].message.contains("one message per invocation"));
        assert!(issues[2].message.contains("3.1.1"));
        assert!(issues[3].message.contains("only {topic} is replaced"));
        assert!(
            issues[4]
                .message
                .contains("\"loop/x/reply\", which rules[5].topic \"loop/#\" takes"),
            "{}",
            issues[4].message
        );
        // Under MQTT 5 a rule may rely on Response Topics alone.
        let issues = replies(&config.rules, MqttProtocol::V5);
        assert!(!issues.iter().any(|i| i.key == "rules[3].reply.topic"));
    }

    #[test]
    fn reply_allow_takes_filters_outside_every_replying_rule() {
        let text = r##"
[mqtt]
url = "mqtt://x"
protocol = "5"

[[rules]]
name = "cmd"
topic = "$share/g/dev/+/req"
function = "f"
invocation = "request_response"
[rules.reply]
allow = ["replies/#", "dev/+/answers", "a/#/b", "", "dev/{id}/answers", "$SYS/#", "dev/#", "#"]

[[rules]]
name = "plain"
topic = "telemetry/#"
function = "f"
"##;
        let config = load_unvalidated(text);
        let issues = replies(&config.rules, MqttProtocol::V5);
        let found: Vec<(&str, &str)> = issues
            .iter()
            .map(|i| (i.key.as_str(), i.message.as_str()))
            .collect();
        let keys: Vec<&str> = found.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "rules[0].reply.allow[2]",
                "rules[0].reply.allow[3]",
                "rules[0].reply.allow[4]",
                "rules[0].reply.allow[5]",
                "rules[0].reply.allow[6]",
                "rules[0].reply.allow[7]",
            ],
            "{issues:#?}"
        );
        assert!(
            found[0].1.contains("'#' must be the last level"),
            "{found:?}"
        );
        assert!(
            found[1].1.starts_with("\"\": the filter is empty"),
            "{found:?}"
        );
        assert!(found[2].1.contains("not templates"), "{found:?}");
        assert!(found[3].1.contains("belong to the broker"), "{found:?}");
        // A Response Topic there would be taken as a request again (through the share group's
        // filter); a non-replying rule's filter is no loop.
        for (_, message) in &found[4..] {
            assert!(
                message.contains("overlaps rules[0].topic \"$share/g/dev/+/req\""),
                "{message}"
            );
        }
        // Without the bad ones: no issue, and no reply.topic is needed under MQTT 5.
        let good = text.replace(
            r##", "a/#/b", "", "dev/{id}/answers", "$SYS/#", "dev/#", "#""##,
            "",
        );
        let config = load_unvalidated(&good);
        let issues = replies(&config.rules, MqttProtocol::V5);
        assert!(issues.is_empty(), "{issues:#?}");
        assert_eq!(
            config.rules[0].reply.as_ref().map(|r| r.allow.len()),
            Some(2)
        );
    }
}
