//! What serde cannot check, one function per section: `[mqtt]` (and `[mqtt.tls]`), `[aws]`,
//! `[buffer]`, `[metrics]`, `[http]`, and each `[[rules]]` entry with its sub-tables. Each returns the problems it
//! found as [`Issue`]s (key and message); [`super::Config::validate`] collects them all and
//! places them in the file. None stops the others, and none touches the file system or the
//! network: that is `preflight`'s job.

use std::collections::HashMap;
use std::time::Duration;

use super::{
    AggregateConfig, AwsConfig, BatchConfig, BufferConfig, HttpConfig, InvocationType, IotConfig,
    MIN_QUEUE_SIZE, MetricsConfig, MqttConfig, MqttProtocol, REQUEST_RESPONSE_PAYLOAD_LIMIT,
    RateLimitConfig, RuleConfig, ThrottleConfig, TlsConfig, parse_mqtt_url,
};
use crate::core::rules;

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

/// Names a rule cannot take because the daemon keeps a file of that name directly in
/// `buffer.dir`, beside the rules' directories (`lib.rs`: `BufferLock`). Every file or
/// directory the daemon ever creates at that level must be listed here.
pub const RESERVED_RULE_NAMES: &[&str] = &["lock"];

/// Longest rule name: it names a directory, and Linux file systems allow 255 bytes per name.
pub const MAX_RULE_NAME_LEN: usize = 255;

/// Longest function name, partial ARN or ARN (with qualifier) Lambda accepts.
const MAX_FUNCTION_LEN: usize = 170;

/// Smallest segment a rule's queue may use.
const MIN_SEGMENT_SIZE: u64 = 4096;

/// `[mqtt]` and `[mqtt.tls]`.
pub fn mqtt(mqtt: &MqttConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Err(message) = parse_mqtt_url(&mqtt.url) {
        issues.push(Issue::new("mqtt.url", message));
    }
    if mqtt.client_id.trim().is_empty() {
        issues.push(Issue::new("mqtt.client_id", "must not be empty"));
    }
    if mqtt.keep_alive.0 < Duration::from_secs(1) {
        issues.push(Issue::new(
            "mqtt.keep_alive",
            "must be at least 1s (MQTT counts it in whole seconds)",
        ));
    }
    if mqtt.password.is_some() && mqtt.password_file.is_some() {
        issues.push(Issue::new(
            "mqtt.password_file",
            "set either password or password_file, not both",
        ));
    }
    if (mqtt.password.is_some() || mqtt.password_file.is_some()) && mqtt.username.is_none() {
        issues.push(Issue::new(
            "mqtt.username",
            "a password needs a username (MQTT 3.1.1 sends no password alone)",
        ));
    }
    if let Some(tls) = &mqtt.tls {
        issues.extend(mqtt_tls(tls, &mqtt.url));
    }
    issues.extend(mqtt_v5(mqtt));
    issues
}

/// The keys only MQTT 5 uses.
fn mqtt_v5(mqtt: &MqttConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    if mqtt.protocol != MqttProtocol::V5 {
        for (set, key) in [
            (mqtt.session_expiry.is_some(), "mqtt.session_expiry"),
            (mqtt.receive_maximum.is_some(), "mqtt.receive_maximum"),
        ] {
            if set {
                issues.push(Issue::new(
                    key,
                    "is used only with mqtt.protocol = \"5\" (MQTT 3.1.1 has no such setting); \
                     remove it or set the protocol",
                ));
            }
        }
        return issues;
    }
    if let Some(expiry) = mqtt.session_expiry {
        if expiry.0.as_secs() > u64::from(u32::MAX) {
            issues.push(Issue::new(
                "mqtt.session_expiry",
                format!("must be at most {}s (about 136 years)", u32::MAX),
            ));
        } else if mqtt.clean_start && !expiry.0.is_zero() {
            issues.push(Issue::new(
                "mqtt.session_expiry",
                "clean_start = true starts a fresh session on every connection, so a kept \
                 session is never used: remove session_expiry or set clean_start = false",
            ));
        } else if !mqtt.clean_start && expiry.0 < Duration::from_secs(1) {
            issues.push(Issue::new(
                "mqtt.session_expiry",
                "must be at least 1s with clean_start = false: at 0 the broker drops our \
                 session at each disconnect and the messages published meanwhile are lost \
                 (write clean_start = true to mean that)",
            ));
        }
    }
    if mqtt.keep_alive.0 >= Duration::from_secs(1) && mqtt.keep_alive.0 < super::MIN_KEEP_ALIVE_V5 {
        issues.push(Issue::new(
            "mqtt.keep_alive",
            "must be at least 5s with mqtt.protocol = \"5\" (the MQTT 5 client allows no less)",
        ));
    }
    if mqtt.receive_maximum == Some(0) {
        issues.push(Issue::new(
            "mqtt.receive_maximum",
            "must be 1 to 65535 (MQTT 5 forbids 0)",
        ));
    }
    issues
}

/// `[mqtt.tls]`: its files are read by `preflight`; here only how the keys fit together.
fn mqtt_tls(tls: &TlsConfig, url: &str) -> Vec<Issue> {
    let mut issues = Vec::new();
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        issues.push(Issue::new(
            "mqtt.tls",
            "cert_file and key_file go together for client certificates",
        ));
    }
    if !url.starts_with("mqtts://") {
        issues.push(Issue::new("mqtt.tls", "TLS settings need an mqtts:// url"));
    }
    issues
}

/// `[aws]`. Whether a region can be found is `preflight`'s question (it needs the
/// environment and the profile files).
pub fn aws(aws: &AwsConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Some(endpoint) = &aws.endpoint_url
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        issues.push(Issue::new(
            "aws.endpoint_url",
            format!("must start with http:// or https://, got {endpoint:?}"),
        ));
    }
    if aws.operation_timeout.0.is_zero() {
        issues.push(Issue::new("aws.operation_timeout", "must be above zero"));
    }
    if aws.max_concurrency == 0 {
        issues.push(Issue::new("aws.max_concurrency", "must be at least 1"));
    }
    if aws.connect_timeout.0.is_zero() {
        issues.push(Issue::new("aws.connect_timeout", "must be above zero"));
    }
    if let Some(iot) = &aws.iot {
        issues.extend(aws_iot(iot));
    }
    issues
}

/// `[aws.iot]`: the shape of the endpoint and the names; its files are read by `preflight`.
fn aws_iot(iot: &IotConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Err(message) = iot_endpoint(&iot.credentials_endpoint) {
        issues.push(Issue::new("aws.iot.credentials_endpoint", message));
    }
    // AWS's patterns: role alias [\w=,@-]+, thing name [a-zA-Z0-9:_-]+; both go into the
    // request as they are, so nothing else may pass.
    let names = [
        ("aws.iot.role_alias", &iot.role_alias, "=,@"),
        ("aws.iot.thing_name", &iot.thing_name, ":"),
    ];
    for (key, value, extra) in names {
        if value.is_empty() {
            issues.push(Issue::new(key, "must not be empty"));
        } else if let Some(bad) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || extra.contains(*c)))
        {
            issues.push(Issue::new(
                key,
                format!("{value:?} contains {bad:?}; AWS IoT allows letters, digits, '_', '-' and {extra:?}"),
            ));
        }
    }
    issues
}

/// `host` or `host:port`, as `aws iot describe-endpoint` prints it: no scheme, no path.
pub fn iot_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.contains("://") || endpoint.contains('/') {
        return Err(format!(
            "{endpoint:?}: write the host alone, e.g. \"c1234567890abc.credentials.iot.eu-west-1.amazonaws.com\" (the bridge adds https:// and the path)"
        ));
    }
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (endpoint, None),
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(format!("{endpoint:?} is not a host name"));
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!(
            "{endpoint:?}: the port must be a number from 1 to 65535"
        ));
    }
    Ok(())
}

/// `[buffer]`; `rule_count` because `max_size` is shared by the rules.
pub fn buffer(buffer: &BufferConfig, rule_count: usize) -> Vec<Issue> {
    let mut issues = Vec::new();
    let per_rule = buffer.max_size.0 / (rule_count.max(1) as u64);
    if per_rule < MIN_QUEUE_SIZE {
        issues.push(Issue::new(
            "buffer.max_size",
            format!(
                "{} bytes shared by {} rule(s) leaves each less than {} KiB; raise it",
                buffer.max_size.0,
                rule_count,
                MIN_QUEUE_SIZE / 1024
            ),
        ));
    }
    if buffer.segment_size.0 < MIN_SEGMENT_SIZE {
        issues.push(Issue::new("buffer.segment_size", "must be at least 4KiB"));
    }
    if buffer.max_age.0.is_zero() {
        issues.push(Issue::new("buffer.max_age", "must be above zero"));
    }
    if buffer.dir.as_os_str().is_empty() {
        issues.push(Issue::new(
            "buffer.dir",
            "must not be empty; write e.g. \"/var/lib/mqtt-lambda-bridge\"",
        ));
    }
    issues
}

/// `[metrics]`: the listen address must be an IP address and a port.
pub fn metrics(metrics: Option<&MetricsConfig>) -> Vec<Issue> {
    match metrics.map(MetricsConfig::listen_addr) {
        Some(Err(message)) => vec![Issue::new("metrics.listen", message)],
        _ => Vec::new(),
    }
}

/// `[http]`: an IP address and port to listen on, a body limit no function could exceed, a
/// read timeout above zero, and the TLS files as a pair.
pub fn http(http: &HttpConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    if let Some(Err(message)) = http.listen_addr() {
        issues.push(Issue::new("http.listen", message));
    }
    if http.max_body.0 == 0 || http.max_body.0 > REQUEST_RESPONSE_PAYLOAD_LIMIT {
        issues.push(Issue::new(
            "http.max_body",
            format!(
                "must be from 1 byte to 6MiB (Lambda's largest payload: a larger message could never be invoked), got {} bytes",
                http.max_body.0
            ),
        ));
    }
    if http.read_timeout.0.is_zero() {
        issues.push(Issue::new(
            "http.read_timeout",
            "must be above zero; write e.g. \"30s\"",
        ));
    }
    match (&http.cert_file, &http.key_file) {
        (Some(_), None) => issues.push(Issue::new(
            "http.key_file",
            "http.cert_file is set: set http.key_file too (its private key), or neither for plain HTTP",
        )),
        (None, Some(_)) => issues.push(Issue::new(
            "http.cert_file",
            "http.key_file is set: set http.cert_file too (its certificate chain), or neither for plain HTTP",
        )),
        _ => {}
    }
    issues
}

/// `[[rules]]`: at least one, names unique (also ignoring letter case), then each rule.
pub fn rules(rules: &[RuleConfig]) -> Vec<Issue> {
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
        issues.extend(rule_fields(&prefix, rule));
        if let Some((first, why)) = rules[..i]
            .iter()
            .enumerate()
            .find_map(|(j, r)| rules::conflict(&r.topic, &rule.topic).map(|why| (j, why)))
        {
            issues.push(Issue::new(
                format!("{prefix}.topic"),
                format!("conflicts with rules[{first}].topic: {why}"),
            ));
        }
    }
    issues
}

/// `[rules.reply]` of every rule, which needs the protocol (MQTT 3.1.1 carries no Response
/// Topic) and the other rules (a reply must not come back as a request).
pub fn replies(rules: &[RuleConfig], protocol: MqttProtocol) -> Vec<Issue> {
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
                             rules[{j}].topic {:?} takes: replies would come back as requests, \
                             forever; choose a topic outside every replying rule's filter",
                            other.topic
                        ),
                    ));
                }
            }
        }
    }
    issues
}

/// A rule's name names its directory in `buffer.dir`: it must be a plain, portable file name
/// that is neither `.`/`..` nor a file the daemon keeps there.
pub fn rule_name(name: &str) -> Result<(), String> {
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

/// The keys of one rule other than its name, then its sub-tables.
fn rule_fields(prefix: &str, rule: &RuleConfig) -> Vec<Issue> {
    let key = |field: &str| format!("{prefix}.{field}");
    let mut issues = Vec::new();
    if let Err(message) = rules::validate_topic(&rule.topic) {
        issues.push(Issue::new(key("topic"), message));
    }
    if let Err(message) = function(&rule.function) {
        issues.push(Issue::new(key("function"), message));
    }
    if let Some(q) = &rule.qualifier
        && q.trim().is_empty()
    {
        issues.push(Issue::new(key("qualifier"), "must not be empty when given"));
    }
    if rule.qos > 2 {
        issues.push(Issue::new(
            key("qos"),
            format!("expected a number 0, 1 or 2, got {}", rule.qos),
        ));
    }
    if let Some(b) = &rule.batch {
        issues.extend(batch(&key("batch"), b, rule.invocation));
    }
    if rule.max_concurrency == Some(0) {
        issues.push(Issue::new(key("max_concurrency"), "must be at least 1"));
    }
    if let Some(t) = &rule.throttle {
        issues.extend(throttle(&key("throttle"), t));
    }
    if let Some(a) = &rule.aggregate {
        issues.extend(aggregate(&key("aggregate"), a, rule.batch.is_some()));
    }
    if let Some(r) = &rule.rate_limit {
        issues.extend(rate_limit(&key("rate_limit"), r));
    }
    issues
}

/// `[rules.batch]`: its byte cap depends on the rule's invocation type.
fn batch(prefix: &str, batch: &BatchConfig, invocation: InvocationType) -> Vec<Issue> {
    let mut issues = Vec::new();
    if batch.max_messages == 0 {
        issues.push(Issue::new(
            format!("{prefix}.max_messages"),
            "must be at least 1",
        ));
    }
    if let Some(max_bytes) = batch.max_bytes {
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

/// `[rules.throttle]`.
fn throttle(prefix: &str, throttle: &ThrottleConfig) -> Vec<Issue> {
    let key = |field: &str| format!("{prefix}.{field}");
    let mut issues = Vec::new();
    if throttle.min_interval.is_some_and(|d| d.0.is_zero()) {
        issues.push(Issue::new(key("min_interval"), "must be above zero"));
    }
    match (&throttle.deadband, &throttle.deadband_field) {
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
    if throttle.min_interval.is_none() && !throttle.only_changes && throttle.deadband.is_none() {
        issues.push(Issue::new(
            prefix,
            "set min_interval, only_changes or deadband (an empty throttle does nothing)",
        ));
    }
    issues
}

/// `[rules.aggregate]`; `has_batch` because a rule does one or the other.
fn aggregate(prefix: &str, aggregate: &AggregateConfig, has_batch: bool) -> Vec<Issue> {
    let key = |field: &str| format!("{prefix}.{field}");
    let mut issues = Vec::new();
    if aggregate.window.0 < Duration::from_secs(1) {
        issues.push(Issue::new(key("window"), "must be at least 1s"));
    }
    if aggregate.fields.is_empty() {
        issues.push(Issue::new(
            key("fields"),
            "list at least one JSON pointer, e.g. [\"/temperature\"]",
        ));
    }
    for (j, field) in aggregate.fields.iter().enumerate() {
        if !field.starts_with('/') {
            issues.push(Issue::new(
                key(&format!("fields[{j}]")),
                format!("{field:?} is not a JSON pointer; write e.g. \"/temperature\""),
            ));
        }
    }
    if let Err(message) = super::GroupBy::parse(&aggregate.group_by) {
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

/// `[rules.rate_limit]`.
fn rate_limit(prefix: &str, rate: &RateLimitConfig) -> Vec<Issue> {
    let mut issues = Vec::new();
    if !(rate.invocations_per_second.is_finite() && rate.invocations_per_second > 0.0) {
        issues.push(Issue::new(
            format!("{prefix}.invocations_per_second"),
            format!(
                "must be a number above zero, got {}",
                rate.invocations_per_second
            ),
        ));
    }
    if rate.burst == 0 {
        issues.push(Issue::new(format!("{prefix}.burst"), "must be at least 1"));
    }
    issues
}

/// A function is a name (`my-fn`), a partial ARN (`123456789012:function:my-fn`) or a full ARN
/// (`arn:aws:lambda:eu-west-1:123456789012:function:my-fn`), optionally with `:qualifier`.
pub fn function(function: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_needs_an_ip_address_a_body_limit_lambda_can_take_and_both_tls_files() {
        assert!(
            http(&HttpConfig::default()).is_empty(),
            "no listener, no problem"
        );
        let config = HttpConfig {
            listen: Some("localhost:8080".into()),
            max_body: crate::core::config::Size(7 * 1024 * 1024),
            read_timeout: crate::core::config::HumanDuration(Duration::ZERO),
            cert_file: Some("/etc/c.pem".into()),
            ..HttpConfig::default()
        };
        let issues = http(&config);
        let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "http.listen",
                "http.max_body",
                "http.read_timeout",
                "http.key_file"
            ]
        );
        assert!(
            issues[0].message.contains("\"127.0.0.1:8080\""),
            "{issues:?}"
        );
        let fine = HttpConfig {
            listen: Some("[::1]:8080".into()),
            max_body: crate::core::config::Size(REQUEST_RESPONSE_PAYLOAD_LIMIT),
            ..HttpConfig::default()
        };
        assert!(http(&fine).is_empty());
        let key_only = HttpConfig {
            key_file: Some("/etc/k.pem".into()),
            ..HttpConfig::default()
        };
        assert_eq!(http(&key_only)[0].key, "http.cert_file");
    }

    #[test]
    fn iot_endpoints_are_a_host_and_an_optional_port() {
        for ok in [
            "c1.credentials.iot.eu-west-1.amazonaws.com",
            "localhost:8443",
        ] {
            assert_eq!(iot_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, expected) in [
            (
                "https://c1.credentials.iot.eu-west-1.amazonaws.com",
                "write the host alone",
            ),
            ("host/role-aliases", "write the host alone"),
            ("host:0", "port must be"),
            ("host:https", "port must be"),
            ("", "not a host name"),
            ("a b", "not a host name"),
        ] {
            let err = iot_endpoint(bad).expect_err(bad);
            assert!(err.contains(expected), "{bad:?}: {err}");
        }
    }

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
    fn each_section_reports_only_its_own_keys() {
        let config = super::super::tests::load_unvalidated(
            "[mqtt]\nurl = \"tcp://x\"\nkeep_alive = \"0s\"\n\
             [aws]\nmax_concurrency = 0\n\
             [buffer]\nmax_age = \"0s\"\n\
             [[rules]]\nname = \"..\"\ntopic = \"a/#/b\"\nfunction = \"f\"\n",
        );
        let keys = |issues: Vec<Issue>| issues.into_iter().map(|i| i.key).collect::<Vec<_>>();
        assert_eq!(keys(mqtt(&config.mqtt)), ["mqtt.url", "mqtt.keep_alive"]);
        assert_eq!(keys(aws(&config.aws)), ["aws.max_concurrency"]);
        assert_eq!(
            keys(buffer(&config.buffer, config.rules.len())),
            ["buffer.max_age"]
        );
        assert_eq!(
            keys(rules(&config.rules)),
            ["rules[0].name", "rules[0].topic"]
        );
    }

    #[test]
    fn mqtt5_keys_need_protocol_5_and_sensible_values() {
        let issues = |extra: &str| {
            let config = super::super::tests::load_unvalidated(&format!(
                "[mqtt]\nurl = \"mqtt://x\"\n{extra}\n"
            ));
            mqtt(&config.mqtt)
                .into_iter()
                .map(|i| format!("{}: {}", i.key, i.message))
                .collect::<Vec<_>>()
        };
        assert!(
            issues("protocol = \"5\"\nsession_expiry = \"1h\"\nreceive_maximum = 10").is_empty()
        );
        assert!(issues("protocol = \"3.1.1\"").is_empty());
        let got = issues("session_expiry = \"1h\"\nreceive_maximum = 5");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("mqtt.session_expiry: is used only with mqtt.protocol = \"5\""));
        let got = issues("protocol = \"5\"\nclean_start = true\nsession_expiry = \"1h\"");
        assert!(
            got[0].contains("fresh session on every connection"),
            "{got:?}"
        );
        let got = issues("protocol = \"5\"\nsession_expiry = \"0s\"");
        assert!(got[0].contains("must be at least 1s"), "{got:?}");
        let got = issues("protocol = \"5\"\nkeep_alive = \"2s\"");
        assert!(got[0].contains("at least 5s"), "{got:?}");
        let got = issues("protocol = \"5\"\nreceive_maximum = 0");
        assert!(got[0].contains("1 to 65535"), "{got:?}");
        let config = super::super::tests::load_unvalidated(
            "[mqtt]\nurl = \"mqtt://x\"\nprotocol = \"5\"\nclean_start = true\n",
        );
        assert_eq!(config.mqtt.session_expiry_secs(), 0);
        let config =
            super::super::tests::load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\nprotocol = \"5\"\n");
        assert_eq!(config.mqtt.session_expiry_secs(), 7 * 24 * 3600);
        assert_eq!(config.mqtt.receive_maximum(), 256);
    }

    #[test]
    fn shared_topics_are_checked_and_conflicts_named() {
        let config = super::super::tests::load_unvalidated(
            "[mqtt]\nurl = \"mqtt://x\"\n\
             [[rules]]\nname = \"a\"\ntopic = \"$share/g/s/#\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"b\"\ntopic = \"$share/g/s/#\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"c\"\ntopic = \"s/x\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"d\"\ntopic = \"$share/g+/s\"\nfunction = \"f\"\n",
        );
        let issues = rules(&config.rules);
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
        let config = super::super::tests::load_unvalidated(&text);
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
    fn names_differing_only_in_case_are_one_directory_on_fat() {
        let config = super::super::tests::load_unvalidated(
            "[mqtt]\nurl = \"mqtt://x\"\n\
             [[rules]]\nname = \"Temp\"\ntopic = \"a\"\nfunction = \"f\"\n\
             [[rules]]\nname = \"temp\"\ntopic = \"b\"\nfunction = \"f\"\n",
        );
        let issues = rules(&config.rules);
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].key, "rules[1].name");
        assert!(
            issues[0].message.contains("only in letter case"),
            "{issues:#?}"
        );
    }
}
