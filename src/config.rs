//! The configuration file: its shape, its defaults, and its validation.
//!
//! Loading is two steps, as in pingora's server configuration: figment reads the TOML file and the
//! `MLB_` environment overrides into [`Config`] (serde rejects unknown keys, so a typo never passes
//! silently), then [`Config::validate`] checks everything serde cannot — topic filters, unique
//! rule names, URLs — and collects *every* problem instead of stopping at the first. Nothing
//! connects anywhere before both steps pass. Each problem names the key as a user writes it
//! (`rules[1].topic`) and, where the file has it, the line.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer};

use crate::rules;

/// Where `run` and `check` look when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mqtt-lambda-bridge/config.toml";
/// Environment variables with this prefix override the file; `__` separates levels.
pub const ENV_PREFIX: &str = "MLB_";
/// Smallest share of `buffer.max_size` one rule may get.
pub const MIN_QUEUE_SIZE: u64 = 64 * 1024;
/// Lambda's payload limit for asynchronous (`Event`) invocations.
pub const EVENT_PAYLOAD_LIMIT: u64 = 1024 * 1024;
/// Lambda's payload limit for synchronous (`RequestResponse`) invocations.
pub const REQUEST_RESPONSE_PAYLOAD_LIMIT: u64 = 6 * 1024 * 1024;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How long SIGTERM waits for in-flight invocations before exiting anyway; keep it below
    /// systemd's `TimeoutStopSec` and Docker's stop timeout (10 s).
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// The broker we subscribe to.
    pub mqtt: MqttConfig,
    /// How Lambda is reached.
    #[serde(default)]
    pub aws: AwsConfig,
    /// Where messages wait between the broker's acknowledgement and Lambda's.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Topic filters and the functions their messages go to.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub url: String,
    /// Stable identity: the broker keeps our persistent session (and queues QoS 1/2 messages
    /// while we are away) under it. Defaults to `mqtt-lambda-bridge-<hostname>`.
    #[serde(default = "defaults::client_id")]
    pub client_id: String,
    /// `false` (the default) asks the broker to keep our session across disconnects.
    #[serde(default)]
    pub clean_start: bool,
    /// MQTT keep-alive interval.
    #[serde(default = "defaults::keep_alive")]
    pub keep_alive: HumanDuration,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password; prefer `password_file` or `MLB_MQTT__PASSWORD` to keep it out of the file.
    pub password: Option<Secret>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// TLS settings for `mqtts://`.
    pub tls: Option<TlsConfig>,
}

/// `[mqtt.tls]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (needs `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// `[aws]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region; when absent, the SDK's chain (AWS_REGION, the profile, IMDS) decides.
    pub region: Option<String>,
    /// Any Lambda-compatible endpoint (LocalStack, MiniStack) instead of AWS's.
    pub endpoint_url: Option<String>,
    /// A named profile from `~/.aws/config` for credentials and region.
    pub profile: Option<String>,
    /// Time allowed to open the HTTPS connection to Lambda.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Time allowed for one Invoke call, response included (cover `request_response` functions).
    #[serde(default = "defaults::operation_timeout")]
    pub operation_timeout: HumanDuration,
    /// Most Invoke calls in flight across all rules.
    #[serde(default = "defaults::global_concurrency")]
    pub max_concurrency: usize,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint_url: None,
            profile: None,
            connect_timeout: defaults::connect_timeout(),
            operation_timeout: defaults::operation_timeout(),
            max_concurrency: defaults::global_concurrency(),
        }
    }
}

/// `[buffer]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Directory of the on-disk buffer (systemd's `StateDirectory`).
    #[serde(default = "defaults::buffer_dir")]
    pub dir: PathBuf,
    /// Cap on buffered bytes.
    #[serde(default = "defaults::max_size")]
    pub max_size: Size,
    /// What happens when the cap is reached.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Messages older than this are dropped (and counted).
    #[serde(default = "defaults::max_age")]
    pub max_age: HumanDuration,
    /// Size at which a new segment file starts.
    #[serde(default = "defaults::segment_size")]
    pub segment_size: Size,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: defaults::buffer_dir(),
            max_size: defaults::max_size(),
            when_full: WhenFull::default(),
            max_age: defaults::max_age(),
            segment_size: defaults::segment_size(),
        }
    }
}

/// `buffer.when_full`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest messages to make room.
    #[default]
    DropOldest,
    /// Refuse new messages (they are acknowledged and counted as dropped).
    DropNewest,
    /// Stop acknowledging: the broker holds the messages.
    Block,
}

/// `[[rules]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name; it names the rule's queue and appears in every event as `rule`.
    pub name: String,
    /// MQTT topic filter (`+` and `#` wildcards).
    pub topic: String,
    /// Function name, partial ARN or full ARN.
    pub function: String,
    /// Alias or version to invoke.
    pub qualifier: Option<String>,
    /// `event` (asynchronous, the default) or `request_response`.
    #[serde(default)]
    pub invocation: InvocationType,
    /// Subscription QoS.
    #[serde(default = "defaults::qos")]
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
    #[serde(default = "defaults::group_by")]
    pub group_by: String,
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

/// `[rules.batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// At most this many messages per invocation.
    #[serde(default = "defaults::batch_max_messages")]
    pub max_messages: usize,
    /// At most this many bytes of event per invocation (never above the Lambda limit).
    pub max_bytes: Option<Size>,
    /// How long a partly filled batch waits for more messages.
    #[serde(default = "defaults::batch_max_wait")]
    pub max_wait: HumanDuration,
}

/// `[rules.rate_limit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained invocations per second; fractional allowed.
    pub invocations_per_second: f64,
    /// Invocations allowed back to back after a quiet spell.
    #[serde(default = "defaults::burst")]
    pub burst: u32,
}

mod defaults {
    use super::{HumanDuration, Size};
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn shutdown_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(8))
    }
    pub fn client_id() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty());
        match host {
            Some(host) => format!("mqtt-lambda-bridge-{host}"),
            None => "mqtt-lambda-bridge".to_owned(),
        }
    }
    pub fn keep_alive() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn connect_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(5))
    }
    pub fn operation_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn buffer_dir() -> PathBuf {
        PathBuf::from("/var/lib/mqtt-lambda-bridge")
    }
    pub fn max_size() -> Size {
        Size(256 * 1024 * 1024)
    }
    pub fn max_age() -> HumanDuration {
        HumanDuration(Duration::from_secs(7 * 24 * 3600))
    }
    pub fn segment_size() -> Size {
        Size(8 * 1024 * 1024)
    }
    pub fn qos() -> u8 {
        1
    }
    pub fn batch_max_messages() -> usize {
        100
    }
    pub fn batch_max_wait() -> HumanDuration {
        HumanDuration(Duration::from_secs(1))
    }
    pub fn burst() -> u32 {
        1
    }
    pub fn global_concurrency() -> usize {
        32
    }
    pub fn group_by() -> String {
        "topic".to_owned()
    }
}

/// A duration written as a humantime string: `"500ms"`, `"5s"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write e.g. \"500ms\", \"5s\", \"7d\""
                ))
            })
    }
}

/// A byte size written as `"256KiB"`, `"1MiB"`, `"512MB"`, or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(text) => bytesize::ByteSize::from_str(text.trim())
                .map(|b| Size(b.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid size {text:?} ({e}); write e.g. \"256KiB\", \"1MiB\", \"512MB\""
                    ))
                }),
        }
    }
}

/// A value that must never be printed (passwords).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the value came from: the file's path or the environment variable.
    pub source: String,
    /// The key as a user writes it: `rules[1].topic`; empty for the file as a whole.
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read the configuration file: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but has problems; each is one line of output.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// Every problem, one per line, as `check` prints them.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Config {
    /// Reads `path`, applies `MLB_` overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, Env::prefixed(ENV_PREFIX))
    }

    /// As [`Config::load`], with the environment provider given (tests pass a fixed one).
    pub fn load_with_env(path: &Path, env: Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, env)
    }

    /// Parses TOML text (read from `path`, which only names it in messages), then validates.
    pub fn from_toml_str(text: &str, path: &Path, env: Env) -> Result<Config, ConfigError> {
        let file_name = path.display().to_string();
        let figment = Figment::new()
            .merge(Toml::string(text))
            .merge(env.split("__"));
        let config: Config = figment.extract().map_err(|err| {
            ConfigError::Invalid(
                err.into_iter()
                    .map(|e| figment_problem(e, &file_name, text))
                    .collect(),
            )
        })?;
        config.validate(&file_name, text)
    }

    /// Checks what serde cannot: every problem is collected, none stops the others.
    pub fn validate(self, file_name: &str, text: &str) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut report = |key: String, message: String| {
            let line = line_of(text, &key);
            problems.push(Problem {
                source: file_name.to_owned(),
                key,
                line,
                message,
            });
        };

        if let Err(message) = check_mqtt_url(&self.mqtt.url) {
            report("mqtt.url".into(), message);
        }
        if self.mqtt.client_id.trim().is_empty() {
            report("mqtt.client_id".into(), "must not be empty".into());
        }
        if self.mqtt.keep_alive.0 < Duration::from_secs(1) {
            report(
                "mqtt.keep_alive".into(),
                "must be at least 1s (MQTT counts it in whole seconds)".into(),
            );
        }
        if self.mqtt.password.is_some() && self.mqtt.password_file.is_some() {
            report(
                "mqtt.password_file".into(),
                "set either password or password_file, not both".into(),
            );
        }
        if (self.mqtt.password.is_some() || self.mqtt.password_file.is_some())
            && self.mqtt.username.is_none()
        {
            report(
                "mqtt.username".into(),
                "a password needs a username (MQTT 3.1.1 sends no password alone)".into(),
            );
        }
        if let Some(tls) = &self.mqtt.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                report(
                    "mqtt.tls".into(),
                    "cert_file and key_file go together for client certificates".into(),
                );
            }
            if !self.mqtt.url.starts_with("mqtts://") {
                report(
                    "mqtt.tls".into(),
                    "TLS settings need an mqtts:// url".into(),
                );
            }
        }
        if let Some(endpoint) = &self.aws.endpoint_url
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            report(
                "aws.endpoint_url".into(),
                format!("must start with http:// or https://, got {endpoint:?}"),
            );
        }
        if self.aws.operation_timeout.0.is_zero() {
            report("aws.operation_timeout".into(), "must be above zero".into());
        }
        if self.aws.max_concurrency == 0 {
            report("aws.max_concurrency".into(), "must be at least 1".into());
        }
        if self.aws.connect_timeout.0.is_zero() {
            report("aws.connect_timeout".into(), "must be above zero".into());
        }
        let per_rule = self.buffer.max_size.0 / (self.rules.len().max(1) as u64);
        if per_rule < MIN_QUEUE_SIZE {
            report(
                "buffer.max_size".into(),
                format!(
                    "{} bytes shared by {} rule(s) leaves each less than {} KiB; raise it",
                    self.buffer.max_size.0,
                    self.rules.len(),
                    MIN_QUEUE_SIZE / 1024
                ),
            );
        }
        if self.buffer.segment_size.0 < 4096 {
            report("buffer.segment_size".into(), "must be at least 4KiB".into());
        }
        if self.buffer.max_age.0.is_zero() {
            report("buffer.max_age".into(), "must be above zero".into());
        }

        if self.rules.is_empty() {
            report(
                "rules".into(),
                "no [[rules]]: add at least one rule with name, topic and function".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let key = |field: &str| format!("rules[{i}].{field}");
            if rule.name.trim().is_empty() {
                report(key("name"), "must not be empty".into());
            } else if !rule
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                report(
                    key("name"),
                    format!(
                        "{:?}: use letters, digits, '-', '_' and '.' only (it names files in the buffer)",
                        rule.name
                    ),
                );
            } else if !names.insert(rule.name.as_str()) {
                report(
                    key("name"),
                    format!(
                        "{:?} is used by an earlier rule; names must be unique",
                        rule.name
                    ),
                );
            }
            if let Err(message) = rules::validate_filter(&rule.topic) {
                report(key("topic"), message);
            }
            if let Err(message) = check_function(&rule.function) {
                report(key("function"), message);
            }
            if let Some(q) = &rule.qualifier
                && q.trim().is_empty()
            {
                report(key("qualifier"), "must not be empty when given".into());
            }
            if rule.qos > 2 {
                report(key("qos"), format!("must be 0, 1 or 2, got {}", rule.qos));
            }
            if let Some(batch) = &rule.batch {
                if batch.max_messages == 0 {
                    report(key("batch.max_messages"), "must be at least 1".into());
                }
                if let Some(max_bytes) = batch.max_bytes {
                    let limit = rule.invocation.payload_limit();
                    if max_bytes.0 == 0 || max_bytes.0 > limit {
                        report(
                            key("batch.max_bytes"),
                            format!(
                                "must be between 1 and {limit} bytes (Lambda's limit for this invocation type), got {}",
                                max_bytes.0
                            ),
                        );
                    }
                }
            }
            if rule.max_concurrency == Some(0) {
                report(key("max_concurrency"), "must be at least 1".into());
            }
            if let Some(throttle) = &rule.throttle {
                if throttle.min_interval.is_some_and(|d| d.0.is_zero()) {
                    report(key("throttle.min_interval"), "must be above zero".into());
                }
                match (&throttle.deadband, &throttle.deadband_field) {
                    (Some(band), Some(field)) => {
                        if !(band.is_finite() && *band > 0.0) {
                            report(key("throttle.deadband"), format!("must be a number above zero, got {band}"));
                        }
                        if !field.starts_with('/') {
                            report(key("throttle.deadband_field"), format!("{field:?} is not a JSON pointer; write e.g. \"/temperature\""));
                        }
                    }
                    (Some(_), None) => report(key("throttle.deadband_field"), "deadband needs the field it watches, e.g. deadband_field = \"/temperature\"".into()),
                    (None, Some(_)) => report(key("throttle.deadband"), "deadband_field needs a deadband, e.g. deadband = 0.5".into()),
                    (None, None) => {}
                }
                if throttle.min_interval.is_none()
                    && !throttle.only_changes
                    && throttle.deadband.is_none()
                {
                    report(key("throttle"), "set min_interval, only_changes or deadband (an empty throttle does nothing)".into());
                }
            }
            if let Some(aggregate) = &rule.aggregate {
                if aggregate.window.0 < Duration::from_secs(1) {
                    report(key("aggregate.window"), "must be at least 1s".into());
                }
                if aggregate.fields.is_empty() {
                    report(
                        key("aggregate.fields"),
                        "list at least one JSON pointer, e.g. [\"/temperature\"]".into(),
                    );
                }
                for (j, field) in aggregate.fields.iter().enumerate() {
                    if !field.starts_with('/') {
                        report(
                            key(&format!("aggregate.fields[{j}]")),
                            format!("{field:?} is not a JSON pointer; write e.g. \"/temperature\""),
                        );
                    }
                }
                if let Err(message) = crate::aggregate::GroupBy::parse(&aggregate.group_by) {
                    report(key("aggregate.group_by"), message);
                }
                if rule.batch.is_some() {
                    report(key("aggregate"), "a rule either batches messages ([rules.batch]) or summarizes them ([rules.aggregate]), not both".into());
                }
            }
            if let Some(rate) = &rule.rate_limit {
                if !(rate.invocations_per_second.is_finite() && rate.invocations_per_second > 0.0) {
                    report(
                        key("rate_limit.invocations_per_second"),
                        format!(
                            "must be a number above zero, got {}",
                            rate.invocations_per_second
                        ),
                    );
                }
                if rate.burst == 0 {
                    report(key("rate_limit.burst"), "must be at least 1".into());
                }
            }
        }

        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// `mqtt.url` must be `mqtt://host[:port]` or `mqtts://host[:port]`.
fn check_mqtt_url(url: &str) -> Result<(), String> {
    parse_mqtt_url(url).map(|_| ())
}

/// The parts of `mqtt.url` the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    /// Host name or address.
    pub host: String,
    /// TCP port (1883 for mqtt, 8883 for mqtts when absent).
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
}

/// Splits `mqtt://host[:port]` into its parts; the message says what to write instead.
pub fn parse_mqtt_url(url: &str) -> Result<BrokerAddress, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(format!(
            "{url:?}: the scheme must be mqtt:// or mqtts://, e.g. \"mqtt://127.0.0.1:1883\""
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('/') || authority.contains('?') || authority.contains('@') {
        return Err(format!(
            "{url:?}: write only scheme, host and port (user and password have their own keys)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // IPv6 literal: [::1]:1883
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(format!("{url:?}: unclosed '[' in an IPv6 address"));
        };
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("{url:?}: unexpected text after the IPv6 address")),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: the host is missing"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{url:?}: the port must be a number from 1 to 65535"))?,
    };
    Ok(BrokerAddress { host, port, tls })
}

/// A function is a name (`my-fn`), a partial ARN (`123456789012:function:my-fn`) or a full ARN
/// (`arn:aws:lambda:eu-west-1:123456789012:function:my-fn`), optionally with `:qualifier`.
fn check_function(function: &str) -> Result<(), String> {
    if function.trim().is_empty() {
        return Err("must not be empty: give the function's name, partial ARN or ARN".into());
    }
    if function.len() > 170 {
        return Err(format!(
            "{:?}... is {} characters; Lambda accepts at most 170",
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

/// Turns one figment error into a problem naming the file (or variable), key and line.
fn figment_problem(err: figment::Error, file_name: &str, text: &str) -> Problem {
    let mut path = err.path.clone();
    let message = match &err.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            if expected.is_empty() {
                format!("unknown key {field:?}")
            } else {
                format!(
                    "unknown key {field:?}; expected one of: {}",
                    expected.join(", ")
                )
            }
        }
        figment::error::Kind::MissingField(field) => {
            if path.last().map(String::as_str) != Some(field.as_ref()) {
                path.push(field.to_string());
            }
            "is required but missing".to_owned()
        }
        figment::error::Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value {found:?}; expected one of: {}",
                expected.join(", ")
            )
        }
        other => other.to_string(),
    };
    let key = render_key(&path);
    let source = match &err.metadata {
        Some(meta) if meta.name.contains("environment") => {
            let var = format!(
                "{ENV_PREFIX}{}",
                path.iter()
                    .map(|p| p.to_uppercase())
                    .collect::<Vec<_>>()
                    .join("__")
            );
            format!("environment variable {var}")
        }
        _ => file_name.to_owned(),
    };
    // A TOML syntax error carries its own line in the message; no key then.
    let line = if source == file_name {
        line_of(text, &key)
    } else {
        None
    };
    Problem {
        source,
        key,
        line,
        message,
    }
}

/// `["rules", "1", "topic"]` → `rules[1].topic`.
fn render_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// The 1-based line of `key` (`rules[1].batch.max_wait`) in the TOML `text`, where it is written.
fn line_of(text: &str, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, index) = match part.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let (k, item) = table.get_key_value(name)?;
        span = k.span().or_else(|| item.span()).or(span);
        let item = match (index, item) {
            (Some(i), toml_edit::Item::ArrayOfTables(array)) => {
                let t = array.get(i)?;
                span = t.span().or(span);
                if parts.peek().is_none() {
                    break;
                }
                table = t;
                continue;
            }
            (_, item) => item,
        };
        if parts.peek().is_none() {
            break;
        }
        table = item.as_table_like()?;
    }
    let offset = span?.start;
    Some(text[..offset.min(text.len())].matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(
            text,
            Path::new("test.toml"),
            Env::prefixed("MLB_TEST_UNUSED_"),
        )
    }

    const MINIMAL: &str = r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "gw"

[[rules]]
name = "t"
topic = "sensors/+/temperature"
function = "ingest"
"#;

    fn problems(text: &str) -> Vec<String> {
        match load(text) {
            Ok(_) => vec![],
            Err(e) => e.problems(),
        }
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let config = load(MINIMAL).expect("valid");
        assert!(!config.mqtt.clean_start);
        assert_eq!(config.mqtt.keep_alive.0, Duration::from_secs(30));
        assert_eq!(config.rules[0].qos, 1);
        assert_eq!(config.rules[0].invocation, InvocationType::Event);
        assert_eq!(config.buffer.when_full, WhenFull::DropOldest);
        assert_eq!(config.buffer.max_size.0, 256 * 1024 * 1024);
    }

    #[test]
    fn every_config_error_names_file_key_and_line() {
        // (what is appended to MINIMAL or replaces a part, the expected problem line)
        let table: &[(&str, &str)] = &[
            (
                "[[rules]]\nname = \"a\"\ntopic = \"sensors/#/x\"\nfunction = \"f\"\n",
                "test.toml:12: rules[1].topic: '#' must be the last level",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"sensors/a+\"\nfunction = \"f\"\n",
                "test.toml:12: rules[1].topic: '+' must be a whole level",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"\"\nfunction = \"f\"\n",
                "test.toml:12: rules[1].topic: the filter is empty",
            ),
            (
                "[[rules]]\nname = \"t\"\ntopic = \"a\"\nfunction = \"f\"\n",
                "test.toml:11: rules[1].name: \"t\" is used by an earlier rule",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"\"\n",
                "test.toml:13: rules[1].function: must not be empty",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\nqos = 3\n",
                "test.toml:14: rules[1].qos: must be 0, 1 or 2",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.batch]\nmax_wait = \"5 parsecs\"\n",
                "test.toml:15: rules[1].batch.max_wait: invalid duration \"5 parsecs\"",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.batch]\nmax_bytes = \"2MiB\"\n",
                "test.toml:15: rules[1].batch.max_bytes: must be between 1 and 1048576 bytes",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\ntopic_typo = 1\n",
                "test.toml:14: rules[1].topic_typo: unknown key \"topic_typo\"",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\ninvocation = \"sync\"\n",
                "rules[1].invocation: unknown value \"sync\"; expected one of: event, request_response",
            ),
            (
                "[[rules]]\nname = \"a b\"\ntopic = \"a\"\nfunction = \"f\"\n",
                "test.toml:11: rules[1].name: \"a b\": use letters",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"arn:aws:s3:::bucket\"\n",
                "rules[1].function: \"arn:aws:s3:::bucket\" is not a Lambda function ARN",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.rate_limit]\ninvocations_per_second = 0\n",
                "rules[1].rate_limit.invocations_per_second: must be a number above zero",
            ),
            (
                "[buffer]\nmax_size = \"lots\"\n",
                "test.toml:11: buffer.max_size: invalid size \"lots\"",
            ),
            (
                "[buffer]\nwhen_full = \"panic\"\n",
                "buffer.when_full: unknown value \"panic\"; expected one of: drop_oldest, drop_newest, block",
            ),
            (
                "[aws]\nendpoint_url = \"localhost:4566\"\n",
                "test.toml:11: aws.endpoint_url: must start with http:// or https://",
            ),
        ];
        for (extra, expected) in table {
            let text = format!("{MINIMAL}{extra}");
            let got = problems(&text);
            assert!(
                got.iter().any(|p| p.contains(expected)),
                "for {extra:?}\nexpected a line containing {expected:?}\ngot {got:#?}"
            );
        }
    }

    #[test]
    fn mqtt_section_errors_are_reported() {
        let table: &[(&str, &str)] = &[
            (
                "http://broker:1883",
                "mqtt.url: \"http://broker:1883\": the scheme must be mqtt:// or mqtts://",
            ),
            ("mqtt://", "mqtt.url: \"mqtt://\": the host is missing"),
            (
                "mqtt://broker:99999",
                "the port must be a number from 1 to 65535",
            ),
            ("mqtt://user:pw@broker", "write only scheme, host and port"),
        ];
        for (url, expected) in table {
            let text = MINIMAL.replace("mqtt://127.0.0.1:1883", url);
            let got = problems(&text);
            assert!(
                got.iter()
                    .any(|p| p.contains(expected) && p.starts_with("test.toml:3: ")),
                "for {url}: expected {expected:?}, got {got:#?}"
            );
        }
    }

    #[test]
    fn several_problems_are_all_reported() {
        let text =
            format!("{MINIMAL}[[rules]]\nname = \"t\"\ntopic = \"a/#/b\"\nfunction = \"\"\n");
        let got = problems(&text);
        assert_eq!(got.len(), 3, "{got:#?}");
    }

    #[test]
    fn missing_sections_and_rules_are_named() {
        let got = problems("[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n");
        assert!(
            got.iter()
                .any(|p| p.contains("mqtt: is required but missing")),
            "{got:#?}"
        );
        let got = problems("[mqtt]\nurl = \"mqtt://h\"\n");
        assert!(
            got.iter().any(|p| p.contains("rules: no [[rules]]")),
            "{got:#?}"
        );
    }

    #[test]
    fn toml_syntax_error_is_a_problem_not_a_panic() {
        let got = problems("[mqtt\nurl = 1");
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].starts_with("test.toml"), "{got:#?}");
    }

    #[test]
    fn password_is_never_in_debug_output() {
        let text = MINIMAL.replace(
            "client_id = \"gw\"",
            "client_id = \"gw\"\nusername = \"u\"\npassword = \"hunter2\"",
        );
        let config = load(&text).expect("valid");
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            config.mqtt.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MLB_AWS__REGION", "eu-west-1");
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "45s");
            let config = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .map_err(|e| e.to_string())?;
            assert_eq!(config.aws.region.as_deref(), Some("eu-west-1"));
            assert_eq!(config.mqtt.keep_alive.0, Duration::from_secs(45));
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "soon");
            let err = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .expect_err("invalid duration");
            let text = err.to_string();
            assert!(
                text.contains(
                    "environment variable MLB_MQTT__KEEP_ALIVE: mqtt.keep_alive: invalid duration"
                ),
                "{text}"
            );
            Ok(())
        });
    }

    #[test]
    fn function_names_and_arns_are_accepted() {
        for f in [
            "ingest",
            "123456789012:function:ingest",
            "arn:aws:lambda:eu-west-1:123456789012:function:ingest",
            "arn:aws:lambda:eu-west-1:123456789012:function:ingest:live",
        ] {
            assert_eq!(check_function(f), Ok(()), "{f}");
        }
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            parse_mqtt_url("mqtts://[::1]"),
            Ok(BrokerAddress {
                host: "::1".into(),
                port: 8883,
                tls: true
            })
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker.local:1884/"),
            Ok(BrokerAddress {
                host: "broker.local".into(),
                port: 1884,
                tls: false
            })
        );
    }
}
