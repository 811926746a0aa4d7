//! `[buffer]`: where messages wait between the broker's acknowledgement and Lambda's, each
//! key's default, and what serde cannot check.
//!
//! Invariant: a configuration that validates leaves every rule at least [`MIN_QUEUE_SIZE`] of
//! `max_size` and segments of at least 4 KiB.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{HumanDuration, Issue, Size};

/// Smallest share of `buffer.max_size` one rule may get.
pub const MIN_QUEUE_SIZE: u64 = 64 * 1024;

/// Smallest segment a rule's queue may use.
const MIN_SEGMENT_SIZE: u64 = 4096;

/// Longest `max_ack_delay` accepted: every QoS 1/2 acknowledgement may wait this long, and the
/// broker sends no more than its in-flight window meanwhile, so a longer wait would cap ingest
/// at a few messages a second and hold a `block` appender, or a shutdown, as long.
pub const MAX_ACK_DELAY: Duration = Duration::from_secs(1);

/// With `max_ack_delay`, a group commit holding this many bytes of records goes at once: its
/// own bytes then outweigh the partial page and the journal commit its fsync costs.
pub const FULL_GROUP_BYTES: u64 = 16 * 1024;
/// The same for a group of this many messages, whatever their size: one fsync per 64 messages
/// is already a small share of what they cost the card.
pub const FULL_GROUP_MESSAGES: u64 = 64;

/// `[buffer]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Directory of the on-disk buffer (systemd's `StateDirectory`).
    #[serde(default = "default_buffer_dir")]
    pub dir: PathBuf,
    /// Cap on buffered bytes.
    #[serde(default = "default_max_size")]
    pub max_size: Size,
    /// What happens when the cap is reached.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Messages older than this are dropped (and counted).
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// Size at which a new segment file starts.
    #[serde(default = "default_segment_size")]
    pub segment_size: Size,
    /// How long a group commit may wait for more appends before its write and fsync (fewer
    /// writes on an SD card, later acknowledgements); zero: it never waits.
    #[serde(default = "default_max_ack_delay")]
    pub max_ack_delay: HumanDuration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: default_buffer_dir(),
            max_size: default_max_size(),
            when_full: WhenFull::default(),
            max_age: default_max_age(),
            segment_size: default_segment_size(),
            max_ack_delay: default_max_ack_delay(),
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

impl BufferConfig {
    /// `[buffer]`; `rule_count` because `max_size` is shared by the rules.
    pub(super) fn validate(&self, rule_count: usize) -> Vec<Issue> {
        let mut issues = Vec::new();
        let per_rule = self.max_size.0 / (rule_count.max(1) as u64);
        if per_rule < MIN_QUEUE_SIZE {
            issues.push(Issue::new(
                "buffer.max_size",
                format!(
                    "{} bytes shared by {} rule(s) leaves each less than {} KiB; raise it",
                    self.max_size.0,
                    rule_count,
                    MIN_QUEUE_SIZE / 1024
                ),
            ));
        }
        if self.segment_size.0 < MIN_SEGMENT_SIZE {
            issues.push(Issue::new("buffer.segment_size", "must be at least 4KiB"));
        }
        if self.max_age.0.is_zero() {
            issues.push(Issue::new("buffer.max_age", "must be above zero"));
        }
        if self.max_ack_delay.0 > MAX_ACK_DELAY {
            issues.push(Issue::new(
                "buffer.max_ack_delay",
                format!(
                    "must be at most \"1s\" (every acknowledgement may wait this long, and the broker sends at most its in-flight window meanwhile), got \"{}\"; \"100ms\" already saves most SD-card writes",
                    humantime::format_duration(self.max_ack_delay.0)
                ),
            ));
        }
        if self.dir.as_os_str().is_empty() {
            issues.push(Issue::new(
                "buffer.dir",
                "must not be empty; write e.g. \"/var/lib/mqtt-lambda-bridge\"",
            ));
        }
        issues
    }
}

/// mosquitto's `max_inflight_messages` by default: the QoS 1/2 messages it sends an MQTT 3.1.1
/// client before waiting for acknowledgements.
pub const MOSQUITTO_DEFAULT_INFLIGHT: u16 = 20;

impl BufferConfig {
    /// `check`'s line on `max_ack_delay` (`None` when it is zero): what it costs. The broker
    /// sends at most `window` unacknowledged messages (`Some(receive_maximum)` under MQTT 5;
    /// `None` under 3.1.1, where the broker decides), so with ingest taking one group per wait,
    /// QoS 1/2 ingest stays under about `window / delay` when the groups are not full.
    pub fn explain_ack_delay(&self, window: Option<u16>) -> Option<String> {
        let delay = self.max_ack_delay.0;
        if delay.is_zero() {
            return None;
        }
        let (window, whose) = match window {
            Some(n) => (n, format!("mqtt.receive_maximum = {n}")),
            None => (
                MOSQUITTO_DEFAULT_INFLIGHT,
                format!(
                    "MQTT 3.1.1: the broker's window, e.g. mosquitto's max_inflight_messages, {MOSQUITTO_DEFAULT_INFLIGHT} by default"
                ),
            ),
        };
        let cap = f64::from(window) / delay.as_secs_f64();
        Some(format!(
            "buffer.max_ack_delay = {}: each rule's buffer waits up to that long for more messages before one fsync, and acknowledges them after it; the broker sends at most {window} unacknowledged QoS 1/2 messages ({whose}), so ingest stays under about {cap:.0} msg/s unless a group fills {} KiB or {} messages (see README, \"SD cards\")",
            humantime::format_duration(delay),
            FULL_GROUP_BYTES / 1024,
            FULL_GROUP_MESSAGES,
        ))
    }
}

fn default_buffer_dir() -> PathBuf {
    PathBuf::from("/var/lib/mqtt-lambda-bridge")
}

fn default_max_size() -> Size {
    Size(256 * 1024 * 1024)
}

fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 24 * 3600))
}

fn default_segment_size() -> Size {
    Size(8 * 1024 * 1024)
}

fn default_max_ack_delay() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::tests::load_unvalidated;

    fn issues(buffer: &str) -> Vec<String> {
        load_unvalidated(&format!("[mqtt]\nurl = \"mqtt://x\"\n[buffer]\n{buffer}\n"))
            .buffer
            .validate(1)
            .into_iter()
            .map(|i| format!("{}: {}", i.key, i.message))
            .collect()
    }

    #[test]
    fn max_ack_delay_defaults_to_zero_and_is_capped_at_one_second() {
        let config = load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\n");
        assert_eq!(config.buffer.max_ack_delay.0, Duration::ZERO);
        assert!(issues("max_ack_delay = \"100ms\"").is_empty());
        assert!(issues("max_ack_delay = \"1s\"").is_empty());
        let got = issues("max_ack_delay = \"1500ms\"");
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("buffer.max_ack_delay: must be at most \"1s\"")
                && got[0].contains("got \"1s 500ms\""),
            "{got:?}"
        );
    }

    #[test]
    fn check_explains_what_a_delay_costs_in_ingest() {
        let config = load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\n");
        assert_eq!(
            config.buffer.explain_ack_delay(None),
            None,
            "0ms: nothing to say"
        );
        let config =
            load_unvalidated("[mqtt]\nurl = \"mqtt://x\"\n[buffer]\nmax_ack_delay = \"100ms\"\n");
        let v311 = config.buffer.explain_ack_delay(None).expect("a line");
        assert!(v311.starts_with("buffer.max_ack_delay = 100ms: "), "{v311}");
        assert!(
            v311.contains("max_inflight_messages, 20 by default"),
            "{v311}"
        );
        assert!(v311.contains("about 200 msg/s"), "{v311}");
        let v5 = config.buffer.explain_ack_delay(Some(256)).expect("a line");
        assert!(v5.contains("mqtt.receive_maximum = 256"), "{v5}");
        assert!(v5.contains("about 2560 msg/s"), "{v5}");
    }
}
