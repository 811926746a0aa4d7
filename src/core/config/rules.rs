//! `[[rules]]`: each rule's own keys (name, topic, function, invocation, QoS, concurrency), their
//! defaults, and what serde cannot check; the sub-tables are in `rule_tables`.
//!
//! Invariants: a rule name that validates is a portable directory name of its own in
//! `buffer.dir` (not `.`/`..`, not a file the daemon keeps there, not the same as another
//! rule's on a case-insensitive file system); no two rules' topic filters conflict.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::{AggregateConfig, BatchConfig, Issue, RateLimitConfig, ReplyConfig, ThrottleConfig};
use crate::core::rules;
use crate::core::sql::{self, Statement};

/// The adaptive cap on a rule's invocations in flight when it invokes asynchronously (`event`)
/// and the user did not set `max_concurrency`.
///
/// - Asynchronous invocations are queued by Lambda and run in no particular order, so keeping
///   one in flight buys no ordering; it only makes the uplink's round trip the bottleneck.
/// - On an LTE uplink at 25–100 ms per Invoke, one message per invocation: 64 in flight carry up
///   to 2,560 msg/s at 25 ms and 640 at 100 ms. Measured at 25 ms, 32 in flight delivered 3.8×
///   a naive 8-thread Python bridge, short of the 4× this default is held to; 64 leaves room
///   for slower round trips and jitter.
/// - It equals the default `aws.max_concurrency`, so one busy rule can use the whole process
///   budget, and stays far below Lambda's default of 1,000 concurrent executions per account and
///   Region (new accounts get less; a throttle halves the limit anyway).
/// - Each invocation in flight holds its event in memory; the delivery loop also caps the bytes
///   of a rule's events in flight (`pipeline::MAX_INFLIGHT_BYTES`), so large batches never
///   multiply by this number.
///
/// Slow start reaches it after 63 successes (six round trips of a full window).
pub const EVENT_DEFAULT_MAX_CONCURRENCY: usize = 64;

/// Lambda's payload limit for asynchronous (`Event`) invocations.
pub const EVENT_PAYLOAD_LIMIT: u64 = 1024 * 1024;
/// Lambda's payload limit for synchronous (`RequestResponse`) invocations.
pub const REQUEST_RESPONSE_PAYLOAD_LIMIT: u64 = 6 * 1024 * 1024;

/// Names a rule cannot take because the daemon keeps a file of that name directly in
/// `buffer.dir`, beside the rules' directories (`buffer/layout.rs`: `BufferLock`). Every file or
/// directory the daemon ever creates at that level must be listed here.
pub const RESERVED_RULE_NAMES: &[&str] = &["lock"];

/// Longest rule name: it names a directory, and Linux file systems allow 255 bytes per name.
const MAX_RULE_NAME_LEN: usize = 255;

/// Longest function name, partial ARN or ARN (with qualifier) Lambda accepts.
const MAX_FUNCTION_LEN: usize = 170;

/// `[[rules]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name; it names the rule's queue and appears in every event as `rule`.
    pub name: String,
    /// MQTT topic filter (`+` and `#` wildcards). With `sql`, filled from its `FROM` when the
    /// configuration is validated (the file must not give both).
    #[serde(default)]
    pub topic: String,
    /// An AWS IoT SQL statement instead of `topic`: `FROM` is the filter, `WHERE` decides which
    /// messages the rule keeps, `SELECT` what their payload becomes.
    pub sql: Option<String>,
    /// `sql` compiled, set by validation (never read from the file).
    #[serde(skip)]
    pub statement: Option<Arc<Statement>>,
    /// Function name, partial ARN or full ARN.
    pub function: String,
    /// Alias or version to invoke.
    pub qualifier: Option<String>,
    /// `event` (asynchronous, the default) or `request_response`.
    #[serde(default)]
    pub invocation: InvocationType,
    /// Subscription QoS.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Several messages per invocation.
    pub batch: Option<BatchConfig>,
    /// Pace of invocations.
    pub rate_limit: Option<RateLimitConfig>,
    /// Drop repetitive messages per topic.
    pub throttle: Option<ThrottleConfig>,
    /// Summarize numeric fields in windows instead of forwarding messages.
    pub aggregate: Option<AggregateConfig>,
    /// Most invocations of this rule in flight; halved on throttling, regained on success.
    /// Unset: `event` rules start at one and grow (slow start) to a default cap,
    /// `request_response` rules keep one.
    pub max_concurrency: Option<usize>,
    /// Publish the function's response back to MQTT (`request_response` rules only).
    pub reply: Option<ReplyConfig>,
}

/// `rules[].invocation`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvocationType {
    /// Asynchronous: Lambda queues the event and answers 202.
    #[default]
    Event,
    /// Synchronous: Lambda runs the function and answers 200 with its result.
    RequestResponse,
}

impl InvocationType {
    /// The largest request payload Lambda accepts for this invocation type.
    pub fn payload_limit(self) -> u64 {
        match self {
            InvocationType::Event => EVENT_PAYLOAD_LIMIT,
            InvocationType::RequestResponse => REQUEST_RESPONSE_PAYLOAD_LIMIT,
        }
    }
}

/// `[[rules]]`: at least one, names unique (also ignoring letter case), then each rule.
pub(super) fn validate(rules: &[RuleConfig]) -> Vec<Issue> {
    let mut issues = Vec::new();
    if rules.is_empty() {
        issues.push(Issue::new(
            "rules",
            "no [[rules]]: add at least one rule with name, topic and function",
        ));
    }
    // Lower-cased name → index of the first rule that has it.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let prefix = format!("rules[{i}]");
        let name_key = format!("{prefix}.name");
        match rule_name(&rule.name) {
            Err(message) => issues.push(Issue::new(name_key, message)),
            Ok(()) => match seen.get(&rule.name.to_ascii_lowercase()) {
                Some(&first) if rules[first].name == rule.name => issues.push(Issue::new(
                    name_key,
                    format!(
                        "{:?} is used by an earlier rule; names must be unique",
                        rule.name
                    ),
                )),
                Some(&first) => issues.push(Issue::new(
                    name_key,
                    format!(
                        "{:?} differs from rules[{first}].name {:?} only in letter case; each \
                         name is a directory in buffer.dir, and on a case-insensitive file \
                         system (FAT, exFAT) both would share one: choose another name",
                        rule.name, rules[first].name
                    ),
                )),
                None => {
                    seen.insert(rule.name.to_ascii_lowercase(), i);
                }
            },
        }
        issues.extend(rule.validate(&prefix));
        if let Some((first, why)) = rules[..i]
            .iter()
            .enumerate()
            .find_map(|(j, r)| rules::conflict(&r.topic, &rule.topic).map(|why| (j, why)))
        {
            issues.push(Issue::new(
                format!("{prefix}.{}", rule.filter_key()),
                format!(
                    "conflicts with rules[{first}].{}: {why}",
                    rules[first].filter_key()
                ),
            ));
        }
    }
    issues
}

impl RuleConfig {
    /// The keys of one rule other than its name, then its sub-tables.
    pub(super) fn validate(&self, prefix: &str) -> Vec<Issue> {
        let key = |field: &str| format!("{prefix}.{field}");
        let mut issues = Vec::new();
        if self.sql.is_some() {
            // Its FROM was checked when it was compiled (`compile_sql`).
        } else if self.topic.is_empty() {
            issues.push(Issue::new(
                key("topic"),
                "the filter is empty: give the rule topic = \"sensors/#\" (an MQTT filter), or \
                 sql = \"SELECT * FROM 'sensors/#' WHERE …\"",
            ));
        } else if let Err(message) = rules::validate_topic(&self.topic) {
            issues.push(Issue::new(key("topic"), message));
        }
        if let Err(message) = function(&self.function) {
            issues.push(Issue::new(key("function"), message));
        }
        if let Some(q) = &self.qualifier
            && q.trim().is_empty()
        {
            issues.push(Issue::new(key("qualifier"), "must not be empty when given"));
        }
        if self.qos > 2 {
            issues.push(Issue::new(
                key("qos"),
                format!("expected a number 0, 1 or 2, got {}", self.qos),
            ));
        }
        if let Some(b) = &self.batch {
            issues.extend(b.validate(&key("batch"), self.invocation));
        }
        if self.max_concurrency == Some(0) {
            issues.push(Issue::new(key("max_concurrency"), "must be at least 1"));
        }
        if let Some(t) = &self.throttle {
            issues.extend(t.validate(&key("throttle")));
        }
        if let Some(a) = &self.aggregate {
            issues.extend(a.validate(&key("aggregate"), self.batch.is_some()));
        }
        if let Some(r) = &self.rate_limit {
            issues.extend(r.validate(&key("rate_limit")));
        }
        issues
    }
}

/// Compiles each rule's `sql` and takes its `FROM` as the rule's topic; a statement that cannot
/// run, or one beside a `topic`, is an issue of `rules[i].sql`. Compiling again a rule already
/// compiled changes nothing.
pub(super) fn compile_sql(rules: &mut [RuleConfig]) -> Vec<Issue> {
    let mut issues = Vec::new();
    for (i, rule) in rules.iter_mut().enumerate() {
        let Some(text) = &rule.sql else { continue };
        if let Some(compiled) = &rule.statement
            && compiled.text() == text
            && compiled.from() == rule.topic
        {
            continue;
        }
        let key = format!("rules[{i}].sql");
        if !rule.topic.is_empty() {
            issues.push(Issue::new(
                key,
                format!(
                    "give either topic or sql, not both: the statement's FROM is the rule's \
                     topic filter (remove topic = {:?})",
                    rule.topic
                ),
            ));
            continue;
        }
        match sql::compile(text) {
            Ok(statement) => {
                rule.topic = statement.from().to_owned();
                rule.statement = Some(Arc::new(statement));
            }
            Err(error) => issues.push(Issue::new(key, error.to_string())),
        }
    }
    issues
}

impl RuleConfig {
    /// The key that gives this rule's filter: `sql` or `topic`.
    pub fn filter_key(&self) -> &'static str {
        if self.sql.is_some() { "sql" } else { "topic" }
    }
}

/// A rule's name names its directory in `buffer.dir`: it must be a plain, portable file name
/// that is neither `.`/`..` nor a file the daemon keeps there.
fn rule_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "{name:?}: use letters, digits, '-', '_' and '.' only (it names files in the buffer)"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "{name:?} cannot be a rule name: each name is a directory in buffer.dir, and {name:?} \
             already means this or the parent directory; choose another name, e.g. \"temperature\""
        ));
    }
    if let Some(reserved) = RESERVED_RULE_NAMES
        .iter()
        .find(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "{name:?} is reserved: each name is a directory in buffer.dir, where {reserved:?} is \
             the daemon's own lock file; choose another name"
        ));
    }
    if name.len() > MAX_RULE_NAME_LEN {
        return Err(format!(
            "is {} characters; at most {MAX_RULE_NAME_LEN} (it names a directory in buffer.dir)",
            name.len()
        ));
    }
    Ok(())
}

/// A function is a name (`my-fn`), a partial ARN (`123456789012:function:my-fn`) or a full ARN
/// (`arn:aws:lambda:eu-west-1:123456789012:function:my-fn`), optionally with `:qualifier`.
fn function(function: &str) -> Result<(), String> {
    if function.trim().is_empty() {
        return Err("must not be empty: give the function's name, partial ARN or ARN".into());
    }
    if function.len() > MAX_FUNCTION_LEN {
        return Err(format!(
            "{:?}... is {} characters; Lambda accepts at most {MAX_FUNCTION_LEN}",
            &function[..function
                .char_indices()
                .nth(20)
                .map_or(function.len(), |(i, _)| i)],
            function.len()
        ));
    }
    let valid_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '$' | '.');
    if let Some(bad) = function.chars().find(|c| !valid_char(*c)) {
        return Err(format!(
            "{function:?} contains {bad:?}; a function name, partial ARN or ARN uses letters, digits, '-', '_', ':'"
        ));
    }
    if function.starts_with("arn:") {
        let parts: Vec<&str> = function.split(':').collect();
        if parts.len() < 7 || parts[2] != "lambda" || parts[5] != "function" || parts[6].is_empty()
        {
            return Err(format!(
                "{function:?} is not a Lambda function ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME)"
            ));
        }
    }
    Ok(())
}

fn default_qos() -> u8 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::tests::load_unvalidated;

    #[test]
    fn function_names_and_arns_are_accepted() {
        for f in [
            "ingest",
            "123456789012:function:ingest",
            "arn:aws:lambda:eu-west-1:123456789012:function:ingest",
            "arn:aws:lambda:eu-west-1:123456789012:function:ingest:live",
        ] {
            assert_eq!(function(f), Ok(()), "{f}");
        }
    }

    #[test]
    fn rule_names_that_cannot_be_a_directory_of_their_own_are_rejected() {
        for (name, expected) in [
            (".", "cannot be a rule name"),
            ("..", "cannot be a rule name"),
            ("lock", "\"lock\" is reserved"),
            ("LOCK", "\"LOCK\" is reserved"),
            ("a/b", "use letters, digits"),
            ("", "must not be empty"),
        ] {
            let err = rule_name(name).expect_err(name);
            assert!(err.contains(expected), "{name:?}: {err}");
        }
        let long = "a".repeat(MAX_RULE_NAME_LEN + 1);
        assert!(rule_name(&long).expect_err("long").contains("at most 255"));
        for name in [
            "...",
            ".hidden",
            "lock.d",
            "locks",
            "a.b-c_d",
            &"a".repeat(255),
        ] {
            assert_eq!(rule_name(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn shared_topics_are_checked_and_conflicts_named() {
        let config = load_unvalidated(
            "[mqtt]\nurl = \"mqtt://x\"\n\
             [[rules]]\nname = \"a\"\ntopic = \"$share/g/s/#\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"b\"\ntopic = \"$share/g/s/#\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"c\"\ntopic = \"s/x\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"d\"\ntopic = \"$share/g+/s\"\nfunction = \"f\"\n",
        );
        let issues = validate(&config.rules);
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["rules[2].topic", "rules[3].topic"], "{issues:#?}");
        assert!(
            issues[0]
                .message
                .starts_with("conflicts with rules[0].topic")
        );
        assert!(issues[1].message.contains("must not contain '+' or '#'"));
    }

    #[test]
    fn names_differing_only_in_case_are_one_directory_on_fat() {
        let config = load_unvalidated(
            "[mqtt]\nurl = \"mqtt://x\"\n\
             [[rules]]\nname = \"Temp\"\ntopic = \"a\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"temp\"\ntopic = \"b\"\nfunction = \"f\"\n",
        );
        let issues = validate(&config.rules);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].key, "rules[1].name");
        assert!(
            issues[0].message.contains("only in letter case"),
            "{issues:#?}"
        );
    }
}
