//! The `buffer` commands: look into the buffer and the dead-letter stores while the daemon is
//! stopped, and put dead letters back into their queues.
//!
//! Invariants:
//! - Each command takes the buffer lock first, so it refuses clearly while a daemon runs.
//! - None creates `buffer.dir`: a directory that does not exist is reported
//!   ([`AdminError::NoBuffer`]), never made (run as root, it would appear root-owned, and under
//!   systemd's `DynamicUser=` in the wrong place). Nor does `stats` create a rule's directory.
//! - What a command creates in `buffer.dir` (the lock file, a segment written by recovery or
//!   replay) is handed to the directory's owner when the command runs as root, so the daemon's
//!   own user can still write there.
//! - `replay` never deletes a dead letter it did not put back ([`deadletter::plan_replay`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::buffer::deadletter::{self, DeadLetter, DeadLetters, KeptReason, StoredLine};
use crate::buffer::disk::GROUP_OVERHEAD;
use crate::buffer::layout::{LayoutError, queue_config, rule_dir};
use crate::buffer::{Appended, DiskQueue, Queue};
use crate::core::config::{Config, RuleConfig};

/// The lock file in `buffer.dir` (the daemon's `BufferLock` uses the same).
const LOCK_FILE: &str = "lock";

/// Why a `buffer` command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// `buffer.dir` does not exist: nothing was ever buffered there.
    #[error(
        "buffer.dir {0}: no such directory, so nothing is buffered there (is this the daemon's configuration? the daemon creates the directory when it first starts)"
    )]
    NoBuffer(PathBuf),
    /// `buffer.dir` exists but is not a directory.
    #[error("buffer.dir {0}: not a directory")]
    NotADirectory(PathBuf),
    /// The buffer could not be opened (or a daemon holds it).
    #[error(transparent)]
    Buffer(#[from] LayoutError),
    /// `--rule` names no rule of the configuration.
    #[error("--rule {0:?}: no such rule in the configuration (rules: {1})")]
    NoSuchRule(String, String),
    /// The dead-letter store could not be read or rewritten.
    #[error(transparent)]
    DeadLetters(#[from] deadletter::DeadLetterError),
    /// Appending replayed messages failed; the store is untouched.
    #[error(
        "rule {rule}: cannot put dead letters back into the queue: {source}; the dead-letter store is unchanged"
    )]
    Replay {
        /// The rule.
        rule: String,
        /// Why.
        source: crate::buffer::QueueError,
    },
    /// The queue's `buffer.when_full = "drop_newest"` dropped the replayed messages (its
    /// buffer is full); the store is untouched.
    #[error(
        "rule {rule}: the buffer is full and buffer.when_full = \"drop_newest\" dropped the {dropped} replayed message(s); the dead-letter store is unchanged: replay again once the rule's buffer has room"
    )]
    ReplayDropped {
        /// The rule.
        rule: String,
        /// Messages the queue dropped.
        dropped: u64,
    },
    /// The messages are back in the queue but the store still holds them.
    #[error(
        "rule {rule}: {restored} message(s) are back in the queue, but the dead-letter store could not be rewritten ({source}); it still holds them: do not replay again, or they are delivered twice (same ids)"
    )]
    Rewrite {
        /// The rule.
        rule: String,
        /// Messages already back in the queue.
        restored: usize,
        /// Why.
        source: deadletter::DeadLetterError,
    },
}

/// Exclusive use of an existing buffer directory for a `buffer` command.
#[derive(Debug)]
pub struct AdminLock {
    /// The open lock file; the lock goes with it.
    _file: File,
    /// The directory's owner, to hand new files to.
    owner: Owner,
}

/// Takes the buffer lock like the daemon's `BufferLock::acquire`, but never creates the
/// directory: a missing one is [`AdminError::NoBuffer`]. A missing lock file is created (and
/// handed to the directory's owner).
pub fn lock_existing(dir: &Path) -> Result<AdminLock, AdminError> {
    let owner = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Owner::of(&meta),
        Ok(_) => return Err(AdminError::NotADirectory(dir.to_owned())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(AdminError::NoBuffer(dir.to_owned()));
        }
        Err(source) => {
            return Err(LayoutError::Io {
                path: dir.to_owned(),
                source,
            }
            .into());
        }
    };
    let path = dir.join(LOCK_FILE);
    let io_err = |source| {
        AdminError::Buffer(LayoutError::Io {
            path: path.clone(),
            source,
        })
    };
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
        // Locking needs no write access; a lock file this user may only read still locks.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            File::open(&path).map_err(io_err)?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err)?;
            owner.give(&path);
            file
        }
        Err(e) => return Err(io_err(e)),
    };
    match file.try_lock() {
        Ok(()) => Ok(AdminLock { _file: file, owner }),
        Err(std::fs::TryLockError::WouldBlock) => Err(LayoutError::Locked(dir.to_owned()).into()),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(e)),
    }
}

/// Who owns `buffer.dir`: files a command run as root creates there are given to them.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    fn of(meta: &std::fs::Metadata) -> Self {
        Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        }
    }

    /// Hands `path` to the owner when this process runs as root and it is not theirs already.
    /// Best effort: a failure leaves the file as it is, and the daemon says so if it cannot
    /// write it.
    fn give(self, path: &Path) {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.uid() == self.uid && meta.gid() == self.gid {
            return;
        }
        if let Err(e) = std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)) {
            tracing::warn!(file = %path.display(), error = %e, "cannot hand the file to buffer.dir's owner");
        }
    }

    /// [`Owner::give`] for a rule's directory and everything directly in it.
    fn give_rule_dir(self, dir: &Path) {
        self.give(dir);
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                self.give(&entry.path());
            }
        }
    }
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
    /// Lines in the dead-letter store.
    pub dead_letters: usize,
}

fn selected<'a>(config: &'a Config, rule: Option<&str>) -> Result<Vec<&'a RuleConfig>, AdminError> {
    match rule {
        None => Ok(config.rules.iter().collect()),
        Some(wanted) => match config.rules.iter().find(|r| r.name == wanted) {
            Some(found) => Ok(vec![found]),
            None => Err(AdminError::NoSuchRule(
                wanted.to_owned(),
                config
                    .rules
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        },
    }
}

/// Opens one rule's queue (recovering it as the daemon would).
fn open_queue(config: &Config, rule: &RuleConfig) -> Result<DiskQueue, AdminError> {
    let qc = queue_config(config, rule);
    let dir = qc.dir.clone();
    DiskQueue::open(qc).map_err(|source| LayoutError::Io { path: dir, source }.into())
}

/// Per-rule pending messages, bytes, oldest age and dead letters. A rule without a directory
/// yet has nothing buffered; its directory is not created.
pub async fn stats(config: &Config) -> Result<Vec<RuleBuffer>, AdminError> {
    let lock = lock_existing(&config.buffer.dir)?;
    let now = SystemTime::now();
    let mut out = Vec::new();
    for rule in &config.rules {
        let dir = rule_dir(config, &rule.name);
        let dead_letters = DeadLetters::new(&dir).count();
        if !dir.is_dir() {
            out.push(RuleBuffer {
                rule: rule.name.clone(),
                pending: 0,
                bytes: 0,
                oldest: None,
                dead_letters,
            });
            continue;
        }
        let queue = open_queue(config, rule)?;
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
        queue.close().await;
        lock.owner.give_rule_dir(&dir);
        out.push(RuleBuffer {
            rule: rule.name.clone(),
            pending: stats.pending,
            bytes: stats.bytes,
            oldest,
            dead_letters,
        });
    }
    Ok(out)
}

/// The dead letters of the selected rules, and the lines of their stores that are not one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterListing {
    /// Every entry, rule by rule, oldest first.
    pub letters: Vec<DeadLetter>,
    /// Lines that are not entries: the store's file, the 1-based line, and why.
    pub unreadable: Vec<(PathBuf, usize, String)>,
}

/// Every dead letter of the selected rules.
pub fn list_dead_letters(
    config: &Config,
    rule: Option<&str>,
) -> Result<DeadLetterListing, AdminError> {
    let _lock = lock_existing(&config.buffer.dir)?;
    let mut out = DeadLetterListing::default();
    for rule in selected(config, rule)? {
        let store = DeadLetters::new(&rule_dir(config, &rule.name));
        for line in store.read()? {
            match line {
                StoredLine::Letter { letter, .. } => out.letters.push(letter),
                StoredLine::Unreadable { line, why, .. } => {
                    out.unreadable.push((store.path().to_owned(), line, why));
                }
            }
        }
    }
    Ok(out)
}

/// What a replay did for one rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// The rule.
    pub rule: String,
    /// Messages put back into the queue, with their original ids.
    pub restored: usize,
    /// What stayed in the store, one line per kind, each saying why and what to do.
    pub kept: Vec<String>,
}

/// Puts the selected rules' dead letters back into their queues (same ids); the next `run`
/// delivers them. Whatever cannot go back stays in the store, which is rewritten atomically;
/// [`Replayed::kept`] says what and why.
pub async fn replay_dead_letters(
    config: &Config,
    rule: Option<&str>,
) -> Result<Vec<Replayed>, AdminError> {
    let lock = lock_existing(&config.buffer.dir)?;
    let mut out = Vec::new();
    for rule in selected(config, rule)? {
        let dir = rule_dir(config, &rule.name);
        let store = DeadLetters::new(&dir);
        let lines = store.read()?;
        if lines.is_empty() {
            out.push(Replayed {
                rule: rule.name.clone(),
                restored: 0,
                kept: Vec::new(),
            });
            continue;
        }
        let queue = open_queue(config, rule)?;
        // The queue drops nothing only while it stays under its share of buffer.max_size,
        // counting what its group commit writes besides the records.
        let room = queue_config(config, rule)
            .max_size
            .saturating_sub(queue.stats().bytes + GROUP_OVERHEAD);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let plan = deadletter::plan_replay(lines, now_ms, config.buffer.max_age.0, room);
        let restored = plan.restore.len();
        let appended = if restored > 0 {
            queue.append(plan.restore).await
        } else {
            Ok(Appended::default())
        };
        queue.close().await;
        lock.owner.give_rule_dir(&dir);
        let appended = appended.map_err(|source| AdminError::Replay {
            rule: rule.name.clone(),
            source,
        })?;
        if appended.dropped > 0 {
            // The store must keep what the queue did not take.
            return Err(AdminError::ReplayDropped {
                rule: rule.name.clone(),
                dropped: appended.dropped,
            });
        }
        // Only once the messages are durable in the queue is the store rewritten: a crash in
        // between replays some twice (same ids), never loses one.
        store
            .replace(&plan.keep)
            .map_err(|source| AdminError::Rewrite {
                rule: rule.name.clone(),
                restored,
                source,
            })?;
        lock.owner.give(store.path());
        let kept = plan
            .kept
            .iter()
            .map(|(reason, count)| {
                kept_line(
                    config,
                    &rule.name,
                    store.path(),
                    *reason,
                    *count,
                    plan.oldest_kept_age,
                )
            })
            .collect();
        out.push(Replayed {
            rule: rule.name.clone(),
            restored,
            kept,
        });
    }
    Ok(out)
}

/// One line saying what replay kept, why, and what to do.
fn kept_line(
    config: &Config,
    rule: &str,
    store: &Path,
    reason: KeptReason,
    count: usize,
    oldest: Option<Duration>,
) -> String {
    let store = store.display();
    let what = match reason {
        KeptReason::UnreadableLine => format!(
            "kept {count} line(s) of {store} that are not dead-letter entries (a write cut short, \
             or edited by hand), as they are: look at them and fix or delete them by hand"
        ),
        KeptReason::Window => format!(
            "kept {count} statistics-window event(s): a summary cannot go back into the queue \
             (its messages are no longer buffered); `buffer dead-letters list --json --rule \
             {rule}` prints them to invoke the function with by hand, then delete them from {store}"
        ),
        KeptReason::UnknownEvent => format!(
            "kept {count} event(s) with neither messages nor a window: look at them in {store}"
        ),
        KeptReason::UnreadableMessage => format!(
            "kept {count} message(s) without a valid id, topic or payload: fix or delete them \
             by hand in {store}"
        ),
        KeptReason::TooOld => {
            let oldest = oldest.map_or_else(String::new, |age| {
                format!(
                    " (the oldest is {})",
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                )
            });
            format!(
                "kept {count} message(s) older than buffer.max_age ({}){oldest}: the queue \
                 would drop them as expired; raise buffer.max_age in the configuration above \
                 their age, replay again, and keep it raised until the daemon has delivered them",
                humantime::format_duration(config.buffer.max_age.0)
            )
        }
        KeptReason::NoRoom => format!(
            "kept {count} message(s): the rule's share of buffer.max_size is full; start the \
             daemon to deliver the backlog (or raise buffer.max_size), then replay again"
        ),
    };
    format!("{rule}: {what}")
}
