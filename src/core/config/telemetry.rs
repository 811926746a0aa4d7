//! `[telemetry]`: the bridge's own health, published to the local broker as one retained JSON
//! object at an interval (`crate::ops::metrics::telemetry` builds and publishes it).
//!
//! Invariant: a configuration that validates has a topic one may publish to (no wildcards, not
//! `$`-prefixed, not taken by a replying rule, where the snapshot would be an endless request)
//! and an interval of at least [`MIN_TELEMETRY_INTERVAL`].

use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Issue, RuleConfig};
use crate::core::rules;

/// The shortest interval: a snapshot reads every rule's counters and directory sizes, and a
/// faster one would be a flood on the broker rather than health.
pub const MIN_TELEMETRY_INTERVAL: Duration = Duration::from_secs(1);

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Where the snapshot is published (QoS 1, retained), e.g. `gateways/gw-01/bridge/health`.
    pub topic: String,
    /// How often: a snapshot every `interval`, the first one `interval` after the start.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
}

fn default_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

impl TelemetryConfig {
    /// `[telemetry]`; `rules` because a replying rule must not take the topic.
    pub(super) fn validate(&self, rules: &[RuleConfig]) -> Vec<Issue> {
        let mut issues = Vec::new();
        if let Err(why) = crate::core::reply::check_topic_name(&self.topic) {
            issues.push(Issue::new(
                "telemetry.topic",
                format!("{why}; write e.g. \"gateways/gw-01/bridge/health\""),
            ));
        } else if let Some((i, rule)) = rules.iter().enumerate().find(|(_, r)| {
            r.reply.is_some() && rules::matches(rules::match_filter(&r.topic), &self.topic)
        }) {
            issues.push(Issue::new(
                "telemetry.topic",
                format!(
                    "{:?} is taken by rules[{i}].topic {:?}, a rule that replies: each snapshot \
                     would be a request; forward telemetry through a rule without [rules.reply]",
                    self.topic, rule.topic
                ),
            ));
        }
        if self.interval.0 < MIN_TELEMETRY_INTERVAL {
            issues.push(Issue::new(
                "telemetry.interval",
                format!(
                    "must be at least 1s, got {}; write e.g. \"60s\"",
                    humantime::format_duration(self.interval.0)
                ),
            ));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use crate::core::config::tests::load_unvalidated;

    fn issues(telemetry: &str) -> Vec<(String, String)> {
        let text = format!(
            "[mqtt]\nurl = \"mqtt://x\"\n[telemetry]\n{telemetry}\n\
             [[rules]]\nname = \"ask\"\ntopic = \"ask/#\"\nfunction = \"f\"\n\
             invocation = \"request_response\"\n[rules.reply]\ntopic = \"answers/{{topic}}\"\n"
        );
        let config = load_unvalidated(&text);
        let telemetry = config.telemetry.expect("[telemetry] present");
        telemetry
            .validate(&config.rules)
            .into_iter()
            .map(|i| (i.key, i.message))
            .collect()
    }

    #[test]
    fn a_plain_topic_and_the_default_interval_pass() {
        assert_eq!(issues("topic = \"gw/1/health\""), []);
        let config = load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\n[telemetry]\ntopic = \"t\"\n");
        let telemetry = config.telemetry.expect("present");
        assert_eq!(telemetry.interval.0.as_secs(), 60);
    }

    #[test]
    fn wildcards_broker_topics_and_short_intervals_are_refused_naming_the_key() {
        let found = issues("topic = \"gw/+/health\"\ninterval = \"500ms\"");
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].0, "telemetry.topic");
        assert!(found[0].1.contains("'+' or '#'"), "{}", found[0].1);
        assert_eq!(found[1].0, "telemetry.interval");
        assert!(
            found[1].1.contains("at least 1s, got 500ms"),
            "{}",
            found[1].1
        );
        let found = issues("topic = \"$SYS/health\"");
        assert!(found[0].1.contains("belong to the broker"), "{found:?}");
        let found = issues("topic = \"\"");
        assert!(found[0].1.contains("must not be empty"), "{found:?}");
    }

    #[test]
    fn a_topic_a_replying_rule_takes_is_refused() {
        let found = issues("topic = \"ask/health\"");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0]
                .1
                .contains("rules[0].topic \"ask/#\", a rule that replies"),
            "{}",
            found[0].1
        );
    }
}
