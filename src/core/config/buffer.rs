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
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: default_buffer_dir(),
            max_size: default_max_size(),
            when_full: WhenFull::default(),
            max_age: default_max_age(),
            segment_size: default_segment_size(),
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
        if self.dir.as_os_str().is_empty() {
            issues.push(Issue::new(
                "buffer.dir",
                "must not be empty; write e.g. \"/var/lib/mqtt-lambda-bridge\"",
            ));
        }
        issues
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
