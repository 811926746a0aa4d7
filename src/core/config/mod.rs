//! The configuration file: its shape, its defaults, and its validation.
//!
//! Loading is two steps, as in pingora's server configuration: figment reads the TOML file and the
//! `MLB_` environment overrides into [`Config`] (serde rejects unknown keys, so a typo never passes
//! silently), then [`Config::validate`] checks everything serde cannot — topic filters, unique
//! rule names, URLs — and collects *every* problem instead of stopping at the first. Nothing
//! connects anywhere before both steps pass. Each problem names the key as a user writes it
//! (`rules[1].topic`) and, where the file has it, the line.
//!
//! - [`validate`]: one function per section, each returning its [`Issue`]s.
//! - [`keys`]: what every key holds, so a value of the wrong type reads as a person would say
//!   it (`rules[2].qos: expected a number 0, 1 or 2, got "2"`), and text overrides from the
//!   environment stay text.
//!
//! What needs the file system or the environment beyond `MLB_` (files named by keys, the
//! buffer directory, the AWS region chain) is checked by `crate::daemon::preflight`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Deserializer};

mod group_by;
pub mod keys;
pub mod validate;

pub use validate::{Issue, RESERVED_RULE_NAMES};

pub use group_by::GroupBy;

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

/// The shortest keep-alive rumqttc's MQTT 5 client accepts (it panics below it).
pub const MIN_KEEP_ALIVE_V5: Duration = Duration::from_secs(5);

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
    /// The HTTP listener for `/metrics`, `/healthz` and `/readyz`; absent: none.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// HTTP ingest (`POST /topics/<topic>`); without `http.listen`, none.
    #[serde(default)]
    pub http: HttpConfig,
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
    /// The MQTT version spoken: `"3.1.1"` (the default) or `"5"`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// MQTT 5 only: how long the broker keeps our session (and queues messages for it) after
    /// a disconnect. Default [`DEFAULT_SESSION_EXPIRY`]; 0 with `clean_start = true`.
    pub session_expiry: Option<HumanDuration>,
    /// MQTT 5 only: most unacknowledged QoS 1/2 messages the broker may send at once.
    /// Default [`DEFAULT_RECEIVE_MAXIMUM`].
    pub receive_maximum: Option<u16>,
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

/// `mqtt.protocol`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// How long an MQTT 5 broker keeps our session by default: a gateway offline for a long
/// weekend still finds its messages queued (within the broker's own limits).
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Unacknowledged messages an MQTT 5 broker may send at once by default: one ingest group
/// (one durable append per rule) per round trip.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 256;

impl MqttConfig {
    /// The session expiry interval sent in CONNECT (MQTT 5), in seconds.
    pub fn session_expiry_secs(&self) -> u32 {
        match (self.session_expiry, self.clean_start) {
            (Some(d), _) => u32::try_from(d.0.as_secs()).unwrap_or(u32::MAX),
            (None, true) => 0,
            (None, false) => DEFAULT_SESSION_EXPIRY.as_secs() as u32,
        }
    }

    /// The receive maximum sent in CONNECT (MQTT 5).
    pub fn receive_maximum(&self) -> u16 {
        self.receive_maximum.unwrap_or(DEFAULT_RECEIVE_MAXIMUM)
    }
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
    /// Temporary credentials from the AWS IoT credentials provider, with the device's X.509
    /// certificate, instead of the SDK's default chain.
    pub iot: Option<IotConfig>,
}

/// `[aws.iot]`: the AWS IoT credentials provider, the way Greengrass devices get credentials.
/// The device presents its certificate (mutual TLS) and receives temporary credentials for the
/// IAM role behind `role_alias`; no long-lived key is stored on the device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IotConfig {
    /// The account's credentials endpoint, `host` or `host:port`
    /// (`aws iot describe-endpoint --endpoint-type iot:CredentialProvider`).
    pub credentials_endpoint: String,
    /// The IoT role alias that points at the IAM role the bridge assumes.
    pub role_alias: String,
    /// The thing the certificate is attached to; sent as `x-amzn-iot-thingname`.
    pub thing_name: String,
    /// PEM device certificate (chain).
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// PEM CA certificates that sign the endpoint's certificate (Amazon Root CA 1); absent:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
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
            iot: None,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port of the HTTP listener, e.g. `127.0.0.1:9464` (validated as an IP
    /// socket address, so a typo is a configuration error rather than a failed bind).
    pub listen: String,
}

impl MetricsConfig {
    /// The listen address; validation made sure it parses.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.listen.trim().parse().map_err(|_| {
            format!(
                "expected an IP address and port like \"127.0.0.1:9464\" or \"[::1]:9464\", got \"{}\"",
                self.listen
            )
        })
    }
}

/// `[http]`: HTTP ingest for devices that cannot speak MQTT (`crate::ingest::http`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address and port to listen on, e.g. `127.0.0.1:8080`; absent: no listener.
    pub listen: Option<String>,
    /// A file whose first line (trimmed) is the bearer token every request must carry.
    pub token_file: Option<PathBuf>,
    /// Largest request body (the message's payload); larger ones are refused with 413.
    #[serde(default = "defaults::http_max_body")]
    pub max_body: Size,
    /// Time a client has to send a request's head, and again its body; slower ones are cut off.
    #[serde(default = "defaults::http_read_timeout")]
    pub read_timeout: HumanDuration,
    /// PEM certificate chain: with `key_file`, the listener speaks HTTPS only.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: None,
            token_file: None,
            max_body: defaults::http_max_body(),
            read_timeout: defaults::http_read_timeout(),
            cert_file: None,
            key_file: None,
        }
    }
}

impl HttpConfig {
    /// The listen address, when there is one; validation made sure it parses.
    pub fn listen_addr(&self) -> Option<Result<std::net::SocketAddr, String>> {
        let listen = self.listen.as_ref()?;
        Some(listen.trim().parse().map_err(|_| {
            format!(
                "expected an IP address and port like \"127.0.0.1:8080\" or \"[::1]:8080\", got \"{listen}\""
            )
        }))
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
    /// Publish the function's response back to MQTT (`request_response` rules only).
    pub reply: Option<ReplyConfig>,
}

/// `[rules.reply]`: where a `request_response` rule publishes the function's response.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// The topic for requests without an MQTT 5 Response Topic; `{topic}` stands for the
    /// request's topic. Without it, such requests get no reply.
    pub topic: Option<String>,
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
    pub fn http_max_body() -> Size {
        Size(256 * 1024)
    }
    pub fn http_read_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn client_id() -> String {
        // gethostname(2), not /proc/sys/kernel/hostname: the systemd unit hides /proc/sys
        // (ProcSubset=pid), and a client id that changed with it would lose the broker session.
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its whole length; the name is read up to its NUL.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let host = (rc == 0)
            .then(|| {
                let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
                String::from_utf8_lossy(&buf[..end]).trim().to_owned()
            })
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
        // As many as one event rule adapts up to by default (ratelimit.rs says why).
        super::EVENT_DEFAULT_MAX_CONCURRENCY
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
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                // The key table words the message (`keys::figment_problem`), humantime's
                // reason included.
                humantime::parse_duration(text.trim())
                    .map(HumanDuration)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(text), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A byte size written as `"256KiB"`, `"1MiB"`, `"512MB"`, or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Size, E> {
                bytesize::ByteSize::from_str(text.trim())
                    .map(|b| Size(b.as_u64()))
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(text), &self))
            }
        }
        d.deserialize_any(Visitor)
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
        let env = env.split("__");
        let figment = Figment::new()
            .merge(Toml::string(text))
            .merge(env.clone())
            .merge(keys::EnvText(env.clone()));
        let config: Config = figment.extract().map_err(|err| {
            ConfigError::Invalid(
                err.into_iter()
                    .map(|e| keys::figment_problem(e, &file_name, text))
                    .collect(),
            )
        })?;
        config.validate_with(&Source::new(&file_name, text, &env))
    }

    /// Checks what serde cannot, section by section; every problem is collected, none stops
    /// the others. `text` is the file's, to find lines; `MLB_` variables of the process name
    /// the keys they set.
    pub fn validate(self, file_name: &str, text: &str) -> Result<Config, ConfigError> {
        let env = Env::prefixed(ENV_PREFIX).split("__");
        self.validate_with(&Source::new(file_name, text, &env))
    }

    fn validate_with(self, source: &Source) -> Result<Config, ConfigError> {
        let mut issues = validate::mqtt(&self.mqtt);
        issues.extend(validate::aws(&self.aws));
        issues.extend(validate::buffer(&self.buffer, self.rules.len()));
        issues.extend(validate::metrics(self.metrics.as_ref()));
        issues.extend(validate::http(&self.http));
        issues.extend(validate::rules(&self.rules));
        issues.extend(validate::replies(&self.rules, self.mqtt.protocol));
        if issues.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError::Invalid(source.locate(issues)))
        }
    }
}

/// Where the configuration's values came from: the file (its name and text, for lines) and
/// the keys the environment set.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file's path as given.
    file_name: String,
    /// The file's text.
    text: String,
    /// Keys set by `MLB_` variables (`mqtt.password_file`).
    from_env: std::collections::HashSet<String>,
}

impl Source {
    fn new(file_name: &str, text: &str, env: &Env) -> Self {
        Source {
            file_name: file_name.to_owned(),
            text: text.to_owned(),
            from_env: env.iter().map(|(k, _)| k.as_str().to_owned()).collect(),
        }
    }

    /// The file at `path` and the process's `MLB_` variables, for problems found after loading
    /// (preflight). An unreadable file only loses the line numbers.
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let env = Env::prefixed(ENV_PREFIX).split("__");
        Source::new(&path.display().to_string(), &text, &env)
    }

    /// Places each issue: in the environment variable that set its key when one did,
    /// otherwise in the file, at the key's line where the file has it.
    pub fn locate(&self, issues: Vec<Issue>) -> Vec<Problem> {
        issues
            .into_iter()
            .map(|issue| {
                if self.from_env.contains(&issue.key) {
                    Problem {
                        source: format!("environment variable {}", keys::env_var(&issue.key)),
                        key: issue.key,
                        line: None,
                        message: issue.message,
                    }
                } else {
                    Problem {
                        source: self.file_name.clone(),
                        line: keys::line_of(&self.text, &issue.key),
                        key: issue.key,
                        message: issue.message,
                    }
                }
            })
            .collect()
    }
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

    /// The configuration as serde reads it, before validation (for the section validators).
    pub(super) fn load_unvalidated(text: &str) -> Config {
        Figment::new()
            .merge(Toml::string(text))
            .extract()
            .expect("the text parses")
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
                "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got 3",
            ),
            (
                "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n[rules.batch]\nmax_wait = \"5 parsecs\"\n",
                "test.toml:15: rules[1].batch.max_wait: expected a duration like \"1s\", got \"5 parsecs\" (unknown time unit \"parsecs\"",
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
                "test.toml:11: buffer.max_size: expected a size like \"256MiB\" or a number of bytes, got \"lots\"",
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
                    "environment variable MLB_MQTT__KEEP_ALIVE: mqtt.keep_alive: expected a duration like \"30s\", got \"soon\""
                ),
                "{text}"
            );
            Ok(())
        });
    }

    /// Replaces `key = …` in MINIMAL or appends `extra`, returning the only problem line.
    fn only_problem(text: &str) -> String {
        let got = problems(text);
        assert_eq!(got.len(), 1, "{text}\n{got:#?}");
        got.into_iter().next().unwrap_or_default()
    }

    #[test]
    fn a_value_of_the_wrong_type_is_described_as_a_person_would() {
        const RULE: &str = "[[rules]]\nname = \"a\"\ntopic = \"a\"\nfunction = \"f\"\n";
        // (appended to MINIMAL, the whole expected problem line)
        let table: &[(&str, &str)] = &[
            (
                "qos = \"2\"\n",
                "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got \"2\" (write it without quotes)",
            ),
            (
                "qos = 300\n",
                "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got 300",
            ),
            (
                "qos = -1\n",
                "test.toml:14: rules[1].qos: expected a number 0, 1 or 2, got -1",
            ),
            (
                "max_concurrency = 2.5\n",
                "test.toml:14: rules[1].max_concurrency: expected a whole number like 4, got 2.5",
            ),
            (
                "invocation = 1\n",
                "test.toml:14: rules[1].invocation: expected one of \"event\", \"request_response\", got 1 (write the word in quotes)",
            ),
            (
                "[rules.batch]\nmax_messages = \"100\"\n",
                "test.toml:15: rules[1].batch.max_messages: expected a whole number like 100, got \"100\" (write it without quotes)",
            ),
            (
                "[rules.batch]\nmax_bytes = 12.5\n",
                "test.toml:15: rules[1].batch.max_bytes: expected a size like \"256KiB\" or a number of bytes, got 12.5",
            ),
            (
                "[rules.batch]\nmax_wait = 5\n",
                "test.toml:15: rules[1].batch.max_wait: expected a duration like \"1s\", got 5 (write \"5s\" for seconds)",
            ),
            (
                "[rules.rate_limit]\ninvocations_per_second = \"5\"\n",
                "test.toml:15: rules[1].rate_limit.invocations_per_second: expected a number like 5 or 0.2, got \"5\" (write it without quotes)",
            ),
            (
                "[rules.throttle]\nonly_changes = \"yes\"\n",
                "test.toml:15: rules[1].throttle.only_changes: expected true or false, got \"yes\"",
            ),
            (
                "[rules.throttle]\nonly_changes = \"true\"\n",
                "test.toml:15: rules[1].throttle.only_changes: expected true or false, got \"true\" (write it without quotes)",
            ),
            (
                "[rules.aggregate]\nwindow = \"1m\"\nfields = \"/x\"\n",
                "test.toml:16: rules[1].aggregate.fields: expected a list of strings like [\"/temperature\"], got \"/x\"",
            ),
            (
                "[rules.aggregate]\nwindow = \"1m\"\nfields = [1]\n",
                "test.toml:16: rules[1].aggregate.fields[0]: expected a string like \"/temperature\", got 1 (put it in quotes: \"1\")",
            ),
            (
                "batch = 3\n",
                "test.toml:14: rules[1].batch: expected a table (a [rules.batch] header with its keys below), got 3",
            ),
        ];
        for (extra, expected) in table {
            let got = only_problem(&format!("{MINIMAL}{RULE}{extra}"));
            assert!(
                got.starts_with(expected),
                "for {extra:?}\nexpected {expected}\ngot      {got}"
            );
        }
        let sections: &[(&str, &str, &str)] = &[
            (
                "client_id = \"gw\"",
                "client_id = \"gw\"\nkeep_alive = 30",
                "test.toml:5: mqtt.keep_alive: expected a duration like \"30s\", got 30 (write \"30s\" for seconds)",
            ),
            (
                "client_id = \"gw\"",
                "client_id = 1234",
                "test.toml:4: mqtt.client_id: expected a string like \"gw-01-lambda-bridge\", got 1234 (put it in quotes: \"1234\")",
            ),
            (
                "client_id = \"gw\"",
                "client_id = \"gw\"\nclean_start = 1",
                "test.toml:5: mqtt.clean_start: expected true or false, got 1",
            ),
            (
                "client_id = \"gw\"",
                "client_id = \"gw\"\nusername = \"u\"\npassword = 123456",
                "test.toml:6: mqtt.password: expected a string, got a number",
            ),
            (
                "client_id = \"gw\"",
                "client_id = \"gw\"\n[mqtt.tls]\nca_file = [\"a\"]",
                "test.toml:6: mqtt.tls.ca_file: expected a path like \"/etc/mqtt-lambda-bridge/ca.pem\", got a list",
            ),
            (
                "[mqtt]",
                "shutdown_timeout = \"8 sec0nds\"\n[mqtt]",
                "test.toml:2: shutdown_timeout: expected a duration like \"8s\", got \"8 sec0nds\"",
            ),
            (
                "[mqtt]",
                "[buffer]\nmax_size = 12.5\n[mqtt]",
                "test.toml:3: buffer.max_size: expected a size like \"256MiB\" or a number of bytes, got 12.5",
            ),
            (
                "[mqtt]",
                "[buffer]\nmax_size = -5\n[mqtt]",
                "test.toml:3: buffer.max_size: expected a size like \"256MiB\" or a number of bytes, got -5",
            ),
            (
                "[mqtt]",
                "[buffer]\ndir = 5\n[mqtt]",
                "test.toml:3: buffer.dir: expected a path like \"/var/lib/mqtt-lambda-bridge\", got 5 (put it in quotes: \"5\")",
            ),
            (
                "[mqtt]",
                "[buffer]\nwhen_full = true\n[mqtt]",
                "test.toml:3: buffer.when_full: expected one of \"drop_oldest\", \"drop_newest\", \"block\", got true",
            ),
            (
                "[mqtt]",
                "[aws]\nregion = [\"eu-west-1\"]\n[mqtt]",
                "test.toml:3: aws.region: expected a string like \"eu-west-1\", got a list",
            ),
            (
                "[mqtt]",
                "[aws]\nmax_concurrency = \"lots\"\n[mqtt]",
                "test.toml:3: aws.max_concurrency: expected a whole number like 32, got \"lots\"",
            ),
            (
                "[mqtt]",
                "aws = 5\n[mqtt]",
                "test.toml:2: aws: expected a table (a [aws] header with its keys below), got 5",
            ),
            (
                "[[rules]]",
                "[rules]\nx = 1\n[[rules_]]",
                "test.toml:6: rules: expected one or more [[rules]] tables (double brackets, one per rule), got a table",
            ),
        ];
        for (from, to, expected) in sections {
            let text = MINIMAL.replacen(from, to, 1);
            let got = only_problem(&text);
            assert!(
                got.starts_with(expected),
                "for {to:?}\nexpected {expected}\ngot      {got}"
            );
            assert!(
                !got.contains("123456"),
                "a password is never repeated: {got}"
            );
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn text_from_the_environment_stays_text() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MLB_MQTT__CLIENT_ID", "0042");
            jail.set_env("MLB_MQTT__USERNAME", "true");
            jail.set_env("MLB_MQTT__PASSWORD", "1.50");
            jail.set_env("MLB_AWS__MAX_CONCURRENCY", "8");
            let config = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .map_err(|e| e.to_string())?;
            assert_eq!(config.mqtt.client_id, "0042");
            assert_eq!(config.mqtt.username.as_deref(), Some("true"));
            assert_eq!(
                config.mqtt.password.as_ref().map(Secret::expose),
                Some("1.50")
            );
            assert_eq!(config.aws.max_concurrency, 8);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn a_problem_with_a_value_from_the_environment_names_the_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MLB_MQTT__URL", "tcp://broker");
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "30");
            let err = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .expect_err("a number is not a duration");
            assert_eq!(
                err.problems(),
                [
                    "environment variable MLB_MQTT__KEEP_ALIVE: mqtt.keep_alive: expected a duration like \"30s\", got 30 (write \"30s\" for seconds)"
                ]
            );
            jail.set_env("MLB_MQTT__KEEP_ALIVE", "30s");
            let err = Config::from_toml_str(MINIMAL, Path::new("t.toml"), Env::prefixed("MLB_"))
                .expect_err("bad url");
            let problems = err.problems();
            assert_eq!(problems.len(), 1, "{problems:#?}");
            assert!(
                problems[0]
                    .starts_with("environment variable MLB_MQTT__URL: mqtt.url: \"tcp://broker\""),
                "{problems:#?}"
            );
            Ok(())
        });
    }

    #[test]
    fn rule_names_that_are_no_directory_of_their_own_name_the_key() {
        for name in [".", "..", "lock"] {
            let text =
                format!("{MINIMAL}[[rules]]\nname = \"{name}\"\ntopic = \"a\"\nfunction = \"f\"\n");
            let got = only_problem(&text);
            assert!(got.starts_with("test.toml:11: rules[1].name: "), "{got}");
            assert!(got.contains("directory in buffer.dir"), "{got}");
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

    #[test]
    fn the_default_client_id_names_the_host_without_reading_proc() {
        // The test itself runs outside the unit's sandbox, where /proc/sys is readable.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .expect("a hostname to compare with");
        assert_eq!(
            super::defaults::client_id(),
            format!("mqtt-lambda-bridge-{}", host.trim())
        );
    }
}
