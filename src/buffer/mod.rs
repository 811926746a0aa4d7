//! The per-rule queue between matching and invoking: the seam the durable buffer plugs into.
//!
//! Life cycle of a message in a rule's queue:
//!
//! ```text
//! append ──► (durable) ──► MQTT ack ──► read ──► invoke ──► Lambda accepted ──► ack
//!                                         ▲                        │ failure
//!                                         └──── retried in place ◄─┘
//! ```
//!
//! Invariants every implementation keeps:
//! - `append` returns only when the messages are as durable as the implementation can make
//!   them; the ingest loop acknowledges the MQTT publish only after that. It says what it did
//!   ([`Appended`]): messages its `when_full` policy dropped instead of storing them
//!   (`drop_newest`) are counted apart, never as stored, so a sender that can be told (HTTP
//!   ingest) is told.
//! - `read` hands out messages in append order, each once per process lifetime, with a sequence
//!   number that grows by one per message.
//! - `ack(seq)` releases every message up to and including `seq`; what is not acked when the
//!   process stops is read again after a restart (for implementations that survive one).
//!   `ack_range(first, last)` releases a run above that position ahead of it (an event that
//!   finished before an older one), so a restart need not replay it either.
//! - `rewind` hands out again, from the first unacknowledged message, what was read and not
//!   acked: a new reader (a delivery task started again) begins where the acknowledgements
//!   are, not where a dead reader got to.
//! - No call does blocking file I/O on the async runtime: the disk queue reads on tokio's
//!   blocking threads and writes on its own writer thread.
//!
//! One queue per rule: a rule whose function fails stops reading its own queue only.

pub mod deadletter;
pub mod disk;
pub mod layout;
mod memory;
pub mod record;
pub mod storage;

pub use disk::{DiskQueue, DiskQueueConfig};
pub use memory::MemoryQueue;
pub use storage::{FaultStorage, RealStorage, Storage};

use std::future::Future;

use crate::core::envelope::Message;

pub use crate::core::envelope::{Entry, Seq};

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue was closed while an operation waited.
    #[error("the queue is closed")]
    Closed,
    /// The storage underneath failed.
    #[error("buffer I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// What one append did with the messages it was handed: every one is either stored or
/// dropped by the queue's `when_full` policy (`drop_newest`, counted and logged by the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Messages now in the queue (durable, for a durable queue).
    pub stored: u64,
    /// Messages the policy dropped instead of storing them.
    pub dropped: u64,
}

impl Appended {
    /// `n` messages, all stored.
    pub fn stored(n: u64) -> Self {
        Appended {
            stored: n,
            dropped: 0,
        }
    }

    /// `n` messages, all dropped by the policy.
    pub fn dropped(n: u64) -> Self {
        Appended {
            stored: 0,
            dropped: n,
        }
    }
}

/// A FIFO of messages for one rule.
pub trait Queue: Send + Sync + 'static {
    /// Adds `messages` at the tail; durable when it returns. It may wait for room. Says how
    /// many were stored and how many the `when_full` policy dropped instead.
    fn append(
        &self,
        messages: Vec<Message>,
    ) -> impl Future<Output = Result<Appended, QueueError>> + Send;

    /// [`Queue::append`] for messages a producer already held back for the queue's
    /// [`Queue::max_ack_delay`] (MQTT ingest gathers its publishes for it): they are written
    /// without waiting again.
    fn append_gathered(
        &self,
        messages: Vec<Message>,
    ) -> impl Future<Output = Result<Appended, QueueError>> + Send {
        self.append(messages)
    }

    /// How long an append may wait for company before it is written (`buffer.max_ack_delay`;
    /// zero for queues that never wait).
    fn max_ack_delay(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Waits until at least one unread message exists, then returns up to `max` of them in
    /// order. Cancel safe: when the future is dropped, nothing it read is lost; the next read
    /// returns it.
    fn read(&self, max: usize) -> impl Future<Output = Result<Vec<Entry>, QueueError>> + Send;

    /// Returns up to `max` unread messages without waiting for new ones (possibly none). It may
    /// still wait for the disk (reads run on blocking threads, never on the async runtime).
    /// Cancel safe like `read`.
    fn read_ready(&self, max: usize)
    -> impl Future<Output = Result<Vec<Entry>, QueueError>> + Send;

    /// Moves the read position back to the first unacknowledged message, so the next read
    /// starts there. The default does nothing: right only for a queue that one reader reads
    /// for its whole life (test doubles).
    fn rewind(&self) -> impl Future<Output = Result<(), QueueError>> + Send {
        async { Ok(()) }
    }

    /// Releases every message up to and including `through`.
    fn ack(&self, through: Seq) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Releases the messages from `first` through `last`: an event Lambda accepted while an
    /// older one is still in flight. The caller vouches that every sequence in between was
    /// delivered or dropped. A hint for what a crash replays: `ack(through)` still follows once
    /// everything before is done, and an implementation may keep fewer ranges than it is given
    /// (the disk queue keeps up to [`disk::MAX_RANGES`]) or none (the memory queue).
    fn ack_range(
        &self,
        first: Seq,
        last: Seq,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}
