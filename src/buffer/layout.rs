//! Where each rule's buffer lives and how large it may grow: one directory per rule under
//! `buffer.dir`, an equal share of `buffer.max_size` each, and the lock that keeps two
//! processes from using one buffer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::buffer::{DiskQueue, DiskQueueConfig};
use crate::core::config::{Config, RuleConfig};

/// Why a buffer directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The directory or a file in it is unusable.
    #[error("buffer.dir {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process (a running daemon) holds the buffer.
    #[error(
        "buffer.dir {0}: in use by another mqtt-lambda-bridge process (stop the daemon first, e.g. systemctl stop mqtt-lambda-bridge)"
    )]
    Locked(PathBuf),
}

/// Exclusive use of a buffer directory, held for the life of the daemon or a `buffer` command.
#[derive(Debug)]
pub struct BufferLock {
    /// The open lock file; the lock goes with it.
    _file: File,
}

impl BufferLock {
    /// Takes the lock on `<dir>/lock`, creating the directory; fails at once if it is held.
    pub fn acquire(dir: &Path) -> Result<BufferLock, LayoutError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| LayoutError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(BufferLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LayoutError::Locked(dir.to_owned())),
            Err(std::fs::TryLockError::Error(source)) => Err(LayoutError::Io { path, source }),
        }
    }
}

/// The queue settings of one rule: its own directory, and an equal share of `buffer.max_size`
/// (so the total stays under the configured cap).
pub fn queue_config(config: &Config, rule: &RuleConfig) -> DiskQueueConfig {
    let share = config.buffer.max_size.0 / config.rules.len().max(1) as u64;
    // At least four segments fit in a share, so drop_oldest frees space in steps of a quarter.
    let segment_size = config
        .buffer
        .segment_size
        .0
        .min(share / 4)
        .max(crate::buffer::disk::MIN_SEGMENT_SIZE);
    DiskQueueConfig {
        dir: rule_dir(config, &rule.name),
        segment_size,
        max_size: share,
        when_full: config.buffer.when_full,
        max_age: Some(config.buffer.max_age.0),
        max_ack_delay: config.buffer.max_ack_delay.0,
    }
}

/// Where a rule's queue and dead letters live.
pub fn rule_dir(config: &Config, rule: &str) -> PathBuf {
    config.buffer.dir.join(rule)
}

/// Opens every rule's queue, in rule order.
pub fn open_queues(config: &Config) -> Result<Vec<Arc<DiskQueue>>, LayoutError> {
    config
        .rules
        .iter()
        .map(|rule| {
            let qc = queue_config(config, rule);
            let dir = qc.dir.clone();
            DiskQueue::open(qc)
                .map(Arc::new)
                .map_err(|source| LayoutError::Io { path: dir, source })
        })
        .collect()
}
