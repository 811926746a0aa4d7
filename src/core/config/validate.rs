//! The one place every section's problems are collected, in the order `check` prints them:
//! `[mqtt]`, `[aws]`, `[buffer]`, `[metrics]`, `[telemetry]`, `[http]`, then each `[[rules]]` entry and the
//! rules' replies. Each section's own module says what is wrong with it as [`Issue`]s (key and
//! message); `load` places them in the file. None stops the others, and none touches the file
//! system or the network: that is `preflight`'s job.

use super::{Config, MetricsConfig, rule_tables, rules};

/// One problem found by a section's validator: the key as a user writes it and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The key as a user writes it: `rules[1].topic`.
    pub key: String,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl Issue {
    /// An issue with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Compiles the rules' `sql` statements (each then has its topic): before [`Self::issues`],
    /// which checks the filters.
    pub(super) fn compile_sql(&mut self) -> Vec<Issue> {
        rules::compile_sql(&mut self.rules)
    }

    /// Every section's problems, in the order the module overview lists the sections.
    pub(super) fn issues(&self) -> Vec<Issue> {
        let mut issues = self.mqtt.validate();
        issues.extend(self.aws.validate());
        issues.extend(self.buffer.validate(self.rules.len()));
        issues.extend(self.metrics.iter().flat_map(MetricsConfig::validate));
        let telemetry = self.telemetry.as_ref();
        issues.extend(telemetry.into_iter().flat_map(|t| t.validate(&self.rules)));
        issues.extend(self.http.validate());
        issues.extend(rules::validate(&self.rules));
        issues.extend(rule_tables::replies(&self.rules, self.mqtt.protocol));
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::tests::load_unvalidated;

    #[test]
    fn each_section_reports_only_its_own_keys() {
        let config = load_unvalidated(
            "[mqtt]\nurl = \"tcp://x\"\nkeep_alive = \"0s\"\n\
             [aws]\nmax_concurrency = 0\n\
             [buffer]\nmax_age = \"0s\"\n\
             [[rules]]\nname = \"..\"\ntopic = \"a/#/b\"\nfunction = \"f\"\n",
        );
        let keys = |issues: Vec<Issue>| issues.into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(
            keys(config.mqtt.validate()),
            ["mqtt.url", "mqtt.keep_alive"]
        );
        assert_eq!(keys(config.aws.validate()), ["aws.max_concurrency"]);
        assert_eq!(
            keys(config.buffer.validate(config.rules.len())),
            ["buffer.max_age"]
        );
        assert_eq!(
            keys(rules::validate(&config.rules)),
            ["rules[0].name", "rules[0].topic"]
        );
    }
}
