//! The configuration file: its shape, its defaults, and its validation, one module per section.
//!
//! Loading is two steps, as in pingora's server configuration: figment reads the TOML file and the
//! `MLB_` environment overrides into [`Config`] (serde rejects unknown keys, so a typo never passes
//! silently), then [`Config::validate`] checks everything serde cannot — topic filters, unique
//! rule names, URLs — and collects *every* problem instead of stopping at the first. Nothing
//! connects anywhere before both steps pass. Each problem names the key as a user writes it
//! (`rules[1].topic`) and, where the file has it, the line.
//!
//! Each section's module holds its structs, each key's default beside the key, and the section's
//! `validate`, which returns its [`Issue`]s without touching the disk or the network:
//!
//! - `mqtt`: `[mqtt]`, `[mqtt.tls]`, and [`parse_mqtt_url`].
//! - `aws`: `[aws]` and `[aws.iot]`.
//! - `buffer`: `[buffer]`.
//! - `http`: `[http]` (HTTP ingest).
//! - `metrics`: `[metrics]`.
//! - `telemetry`: `[telemetry]`.
//! - `rules`: each `[[rules]]` entry's own keys; `rule_tables`: its sub-tables (batch,
//!   rate_limit, throttle, aggregate, reply).
//! - `units`: [`HumanDuration`] and [`Size`], the value types keys are written in.
//! - `validate`: [`Issue`], and the one place the sections' problems are collected, in key order.
//! - `load`: reading the file and the environment, and placing each problem ([`Source`]).
//! - [`keys`]: what every key holds, so a value of the wrong type reads as a person would say
//!   it (`rules[2].qos: expected a number 0, 1 or 2, got "2"`), and text overrides from the
//!   environment stay text.
//!
//! What needs the file system or the environment beyond `MLB_` (files named by keys, the
//! buffer directory, the AWS region chain) is checked by `crate::daemon::preflight`.

use std::time::Duration;

use serde::Deserialize;

mod aws;
mod buffer;
mod group_by;
mod http;
pub mod keys;
mod load;
mod metrics;
mod mqtt;
mod rule_tables;
mod rules;
mod telemetry;
mod units;
mod validate;

pub use aws::{AwsConfig, IotConfig};
pub use buffer::{
    BufferConfig, FULL_GROUP_BYTES, FULL_GROUP_MESSAGES, MAX_ACK_DELAY, MIN_QUEUE_SIZE, WhenFull,
};
pub use group_by::GroupBy;
pub use http::HttpConfig;
pub use load::{ConfigError, DEFAULT_CONFIG_PATH, ENV_PREFIX, Problem, Source};
pub use metrics::MetricsConfig;
pub use mqtt::{
    BrokerAddress, DEFAULT_RECEIVE_MAXIMUM, DEFAULT_SESSION_EXPIRY, MIN_KEEP_ALIVE_V5, MqttConfig,
    MqttProtocol, Secret, TlsConfig, parse_mqtt_url,
};
pub use rule_tables::{
    AggregateConfig, BatchConfig, KeepConfig, RateLimitConfig, ReplyConfig, ThrottleConfig,
};
pub use rules::{
    EVENT_DEFAULT_MAX_CONCURRENCY, EVENT_PAYLOAD_LIMIT, InvocationType,
    REQUEST_RESPONSE_PAYLOAD_LIMIT, RESERVED_RULE_NAMES, RuleConfig,
};
pub use telemetry::{MIN_TELEMETRY_INTERVAL, TelemetryConfig};
pub use units::{HumanDuration, Size};
pub use validate::Issue;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How long SIGTERM waits for in-flight invocations before exiting anyway; keep it below
    /// systemd's `TimeoutStopSec` and Docker's stop timeout (10 s).
    #[serde(default = "default_shutdown_timeout")]
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
    /// A retained JSON snapshot of the metrics on a local topic at an interval; absent: none.
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
    /// HTTP ingest (`POST /topics/<topic>`); without `http.listen`, none.
    #[serde(default)]
    pub http: HttpConfig,
    /// Topic filters and the functions their messages go to.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(8))
}

#[cfg(test)]
mod tests {
    use figment::Figment;
    use figment::providers::{Format, Toml};

    use super::Config;

    /// The configuration as serde reads it, before validation (for the section validators).
    pub(super) fn load_unvalidated(text: &str) -> Config {
        Figment::new()
            .merge(Toml::string(text))
            .extract()
            .expect("the text parses")
    }
}
