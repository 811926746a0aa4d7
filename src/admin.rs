//! The `buffer` commands: look into the buffer and the dead-letter stores while the daemon is
//! stopped. Each takes the buffer lock first, so they refuse clearly while a daemon runs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::queue::Queue;
use crate::queue::deadletter::{self, DeadLetter, DeadLetters};
use crate::{BufferLock, RunError, open_queues, rule_dir};

/// Why a `buffer` command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The buffer could not be opened (or a daemon holds it).
    #[error(transparent)]
    Run(#[from] RunError),
    /// `--rule` names no rule of the configuration.
    #[error("--rule {0:?}: no such rule in the configuration (rules: {1})")]
    NoSuchRule(String, String),
    /// The dead-letter store could not be read or cleared.
    #[error(transparent)]
    DeadLetters(#[from] deadletter::DeadLetterError),
    /// Appending replayed messages failed.
    #[error("rule {rule}: cannot put dead letters back into the queue: {source}")]
    Replay {
        /// The rule.
        rule: String,
        /// Why.
        source: crate::queue::QueueError,
    },
}

/// One rule's buffer, for `buffer stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleBuffer {
    /// The rule.
    pub rule: String,
    /// Messages waiting for Lambda.
    pub pending: u64,
    /// Bytes of segment files on disk.
    pub bytes: u64,
    /// Age of the oldest waiting message.
    pub oldest: Option<Duration>,
    /// Entries in the dead-letter store.
    pub dead_letters: usize,
}

fn selected<'a>(config: &'a Config, rule: Option<&'a str>) -> Result<Vec<&'a str>, AdminError> {
    let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    match rule {
        None => Ok(names),
        Some(wanted) if names.contains(&wanted) => Ok(vec![wanted]),
        Some(wanted) => Err(AdminError::NoSuchRule(wanted.to_owned(), names.join(", "))),
    }
}

/// Per-rule pending messages, bytes, oldest age and dead letters.
pub async fn stats(config: &Config) -> Result<Vec<RuleBuffer>, AdminError> {
    let _lock = BufferLock::acquire(&config.buffer.dir)?;
    let queues = open_queues(config)?;
    let now = SystemTime::now();
    let mut out = Vec::new();
    for (rule, queue) in config.rules.iter().zip(&queues) {
        let stats = queue.stats();
        let oldest = queue
            .read_ready(1)
            .await
            .ok()
            .and_then(|entries| entries.into_iter().next())
            .and_then(|e| {
                now.duration_since(UNIX_EPOCH + Duration::from_millis(e.message.received_at_ms()))
                    .ok()
            });
        out.push(RuleBuffer {
            rule: rule.name.clone(),
            pending: stats.pending,
            bytes: stats.bytes,
            oldest,
            dead_letters: DeadLetters::new(&rule_dir(config, &rule.name)).count(),
        });
        queue.close().await;
    }
    Ok(out)
}

/// Every dead letter of the selected rules.
pub fn list_dead_letters(
    config: &Config,
    rule: Option<&str>,
) -> Result<Vec<DeadLetter>, AdminError> {
    let _lock = BufferLock::acquire(&config.buffer.dir)?;
    let mut out = Vec::new();
    for name in selected(config, rule)? {
        out.extend(DeadLetters::new(&rule_dir(config, name)).list()?);
    }
    Ok(out)
}

/// Puts the selected rules' dead letters back into their queues (same ids), then empties the
/// stores; the next `run` delivers them. Returns messages replayed per rule.
pub async fn replay_dead_letters(
    config: &Config,
    rule: Option<&str>,
) -> Result<Vec<(String, usize)>, AdminError> {
    let _lock = BufferLock::acquire(&config.buffer.dir)?;
    let wanted = selected(config, rule)?;
    let queues = open_queues(config)?;
    let mut out = Vec::new();
    for (rule, queue) in config.rules.iter().zip(&queues) {
        if !wanted.contains(&rule.name.as_str()) {
            continue;
        }
        let store = DeadLetters::new(&rule_dir(config, &rule.name));
        let messages: Vec<_> = store
            .list()?
            .iter()
            .flat_map(deadletter::messages_of)
            .collect();
        let count = messages.len();
        if count > 0 {
            queue
                .append(messages)
                .await
                .map_err(|source| AdminError::Replay {
                    rule: rule.name.clone(),
                    source,
                })?;
        }
        // Only once the messages are durable in the queue is the store emptied: a crash in
        // between replays some twice, never loses one.
        store.clear()?;
        out.push((rule.name.clone(), count));
    }
    for queue in &queues {
        queue.close().await;
    }
    Ok(out)
}
