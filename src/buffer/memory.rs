//! A bounded in-memory [`Queue`]: the stand-in until the disk buffer, and the reference the
//! disk buffer's model tests compare against. Not durable: what is unacked when the process
//! exits is gone.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use super::{Appended, Entry, Queue, QueueError, Seq};
use crate::core::envelope::Message;

/// Messages held before `append` waits for acks: bounds memory, and past it the broker holds
/// the rest (we stop acknowledging).
pub const DEFAULT_CAPACITY: usize = 10_000;

/// A bounded FIFO in memory.
#[derive(Debug)]
pub struct MemoryQueue {
    /// The messages and cursors.
    state: Mutex<State>,
    /// Wakes readers when messages arrive.
    appended: Notify,
    /// Wakes appenders waiting for room when messages are acked.
    acked: Notify,
    /// Unacked messages allowed before `append` waits.
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Unacked messages; `entries[0]` has sequence number `head`.
    entries: VecDeque<Message>,
    /// Sequence number of `entries[0]`.
    head: Seq,
    /// Sequence number of the next message `read` hands out.
    next_read: Seq,
}

impl MemoryQueue {
    /// A queue holding at most `capacity` unacked messages.
    pub fn new(capacity: usize) -> Self {
        MemoryQueue {
            state: Mutex::new(State::default()),
            appended: Notify::new(),
            acked: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Unacked messages, read or not.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is waiting for an ack.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every mutation is a
        // single step), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_unread(&self, max: usize) -> Vec<Entry> {
        let mut state = self.lock();
        let start = (state.next_read - state.head) as usize;
        let entries: Vec<Entry> = state
            .entries
            .iter()
            .skip(start)
            .take(max)
            .enumerate()
            .map(|(i, message)| Entry {
                seq: state.next_read + i as Seq,
                message: message.clone(),
            })
            .collect();
        state.next_read += entries.len() as Seq;
        entries
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue::new(DEFAULT_CAPACITY)
    }
}

impl Queue for MemoryQueue {
    async fn append(&self, messages: Vec<Message>) -> Result<Appended, QueueError> {
        // It waits for room and never drops: every message is stored.
        let stored = Appended::stored(messages.len() as u64);
        let mut pending = messages.into_iter().peekable();
        while pending.peek().is_some() {
            let waiting = self.acked.notified();
            {
                let mut state = self.lock();
                while state.entries.len() < self.capacity {
                    match pending.next() {
                        Some(m) => state.entries.push_back(m),
                        None => break,
                    }
                }
            }
            self.appended.notify_waiters();
            if pending.peek().is_some() {
                waiting.await;
            }
        }
        Ok(stored)
    }

    async fn read(&self, max: usize) -> Result<Vec<Entry>, QueueError> {
        loop {
            let waiting = self.appended.notified();
            let entries = self.take_unread(max);
            if !entries.is_empty() {
                return Ok(entries);
            }
            waiting.await;
        }
    }

    async fn read_ready(&self, max: usize) -> Result<Vec<Entry>, QueueError> {
        Ok(self.take_unread(max))
    }

    async fn rewind(&self) -> Result<(), QueueError> {
        let mut state = self.lock();
        state.next_read = state.head;
        Ok(())
    }

    async fn ack_range(&self, _first: Seq, _last: Seq) -> Result<(), QueueError> {
        // Nothing survives a restart here, so nothing is replayed: `ack` releases in order.
        Ok(())
    }

    async fn ack(&self, through: Seq) -> Result<(), QueueError> {
        {
            let mut state = self.lock();
            let through = through.min(state.next_read.saturating_sub(1));
            while state.head <= through && !state.entries.is_empty() {
                state.entries.pop_front();
                state.head += 1;
            }
        }
        self.acked.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    fn msg(n: u32) -> Message {
        Message::received(
            format!("t/{n}"),
            n.to_be_bytes().to_vec(),
            1,
            false,
            UNIX_EPOCH,
        )
    }

    #[tokio::test]
    async fn reads_in_order_and_acks_release() {
        let q = MemoryQueue::new(10);
        q.append((0..5).map(msg).collect()).await.expect("append");
        let first = q.read(2).await.expect("read");
        assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(first[1].message.topic, "t/1");
        let rest = q.read_ready(10).await.expect("read");
        assert_eq!(
            rest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(q.read_ready(10).await.expect("read").is_empty());
        q.ack(1).await.expect("ack");
        assert_eq!(q.len(), 3);
        q.ack(4).await.expect("ack");
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn ack_never_releases_unread_messages() {
        let q = MemoryQueue::new(10);
        q.append((0..3).map(msg).collect()).await.expect("append");
        let _ = q.read(1).await.expect("read");
        q.ack(100).await.expect("ack");
        assert_eq!(q.len(), 2);
        assert_eq!(q.read_ready(5).await.expect("read")[0].seq, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn append_waits_for_room_and_read_waits_for_messages() {
        let q = Arc::new(MemoryQueue::new(2));
        let reader = {
            let q = q.clone();
            tokio::spawn(async move { q.read(10).await })
        };
        tokio::task::yield_now().await;
        assert!(!reader.is_finished());
        let writer = {
            let q = q.clone();
            tokio::spawn(async move { q.append((0..3).map(msg).collect()).await })
        };
        let got = reader.await.expect("join").expect("read");
        assert!(!got.is_empty());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !writer.is_finished(),
            "the third message must wait for room"
        );
        let last = got.last().map(|e| e.seq).unwrap_or_default();
        q.ack(last).await.expect("ack");
        writer.await.expect("join").expect("append");
        assert!(q.len() <= 2);
    }
}
