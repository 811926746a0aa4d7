//! What the writer takes from its channel for one group commit, and how long the group waits
//! for company first (`buffer.max_ack_delay`).
//!
//! An SD card pays for an fsync more than for the bytes: each one rewrites the segment's last
//! partial page (4 KiB) and, on ext4, commits a journal block or two. A steady trickle of
//! messages, one append per fsync, therefore writes about 4.4 KB per 200-byte message. With a
//! delay, the writer keeps taking appends for up to that long after the first append of a group
//! was sent, then writes and fsyncs them together: the same bytes for many messages.
//!
//! Invariants kept here:
//! - No append is answered before its fsync: waiting only moves the write and the fsync later;
//!   admission (`admit.rs`: `max_size`, `when_full`) runs on the whole group when it is written,
//!   exactly as for appends that arrived together.
//! - The wait ends at the delay after the *first* append of the group was sent (the earliest
//!   `sent` time, not when the writer took it), so that append's answer waits at most the
//!   delay plus the write and fsync. An append its producer already held back for the delay
//!   (`DiskQueue::append_gathered`: MQTT ingest, which takes one group at a time and so could
//!   never add to a waiting one) counts as sent a delay ago: it and its group go at once.
//! - A full group goes at once: once it holds [`FULL_GROUP_BYTES`] of records or
//!   [`FULL_GROUP_MESSAGES`] messages, waiting longer saves the card little.
//! - A close (shutdown, a removed rule) or an abandon ends the wait at once, and after
//!   [`WriterMsg::Hurry`] (shutdown has begun) no group waits again.
//! - Zero delay is the behaviour without this module: the writer takes what is waiting and
//!   writes it.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{PendingAppend, Writer};
use crate::buffer::disk::WriterMsg;
use crate::buffer::record;
use crate::core::config::{FULL_GROUP_BYTES, FULL_GROUP_MESSAGES};

/// What the writer took from its channel for one turn.
#[derive(Default)]
pub(super) struct Turn {
    /// The appends of the group, in the order they came.
    pub(super) appends: Vec<PendingAppend>,
    /// When the group's earliest append was sent: the wait counts from it.
    first_sent: Option<Instant>,
    /// The group's size so far (counted only while a delay is in force).
    size: GroupSize,
    /// The queue is closing: write the group, persist the ack position, answer this, stop.
    pub(super) close: Option<oneshot::Sender<()>>,
    /// Stop at once, as a crash would: nothing of the group is written or answered.
    pub(super) abandon: bool,
}

/// How much a group holds: bytes of records and messages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupSize {
    pub(super) bytes: u64,
    pub(super) messages: u64,
}

impl GroupSize {
    fn is_full(self) -> bool {
        self.bytes >= FULL_GROUP_BYTES || self.messages >= FULL_GROUP_MESSAGES
    }
}

/// How much longer a group whose first append was sent at `first_sent` waits for company at
/// `now`, or `None` when it is to be written now: the delay has passed, or the group is full.
/// Pure, so tests drive the time by hand.
pub(super) fn wait_left(
    first_sent: Instant,
    now: Instant,
    delay: Duration,
    size: GroupSize,
) -> Option<Duration> {
    if size.is_full() {
        return None;
    }
    (first_sent + delay)
        .checked_duration_since(now)
        .filter(|left| !left.is_zero())
}

impl Writer {
    /// Takes one message into `turn`; acks and hurries act at once.
    pub(super) fn take(&mut self, msg: WriterMsg, turn: &mut Turn) {
        match msg {
            WriterMsg::Append {
                messages,
                reply,
                sent,
            } => {
                turn.first_sent = Some(turn.first_sent.map_or(sent, |first| first.min(sent)));
                if !self.delay().is_zero() {
                    turn.size.messages += messages.len() as u64;
                    turn.size.bytes += messages
                        .iter()
                        .map(|m| record::encoded_len(m) as u64)
                        .sum::<u64>();
                }
                turn.appends.push((messages, reply));
            }
            WriterMsg::Acked => {
                self.shared.ack_signalled.store(false, Ordering::Release);
                self.schedule_ack();
            }
            WriterMsg::Hurry => self.hurry = true,
            WriterMsg::Close { reply } => turn.close = Some(reply),
            WriterMsg::Abandon => turn.abandon = true,
        }
    }

    /// The wait in force: `max_ack_delay`, or none once shutdown has begun.
    fn delay(&self) -> Duration {
        if self.hurry {
            Duration::ZERO
        } else {
            self.shared.config.max_ack_delay
        }
    }

    /// Keeps taking messages into `turn` until its group is to be written (see the module
    /// head). Returns at once without a delay, without an append, or when the queue closes.
    pub(super) fn gather(&mut self, rx: &mpsc::Receiver<WriterMsg>, turn: &mut Turn) {
        let Some(first_sent) = turn.first_sent else {
            return;
        };
        while turn.close.is_none() && !turn.abandon {
            let Some(left) = wait_left(first_sent, Instant::now(), self.delay(), turn.size) else {
                return;
            };
            match rx.recv_timeout(left) {
                Ok(msg) => self.take(msg, turn),
                // Disconnected: the writer's loop sees it at its next receive, after this
                // group is written.
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::buffer::disk::segment::tests::message;
    use crate::buffer::disk::tests::config;
    use crate::buffer::disk::{DiskQueue, DiskQueueConfig};
    use crate::buffer::storage::FaultStorage;
    use crate::buffer::{Appended, Queue};
    use crate::core::config::{FULL_GROUP_BYTES, FULL_GROUP_MESSAGES};

    const MS: Duration = Duration::from_millis(1);
    const FIRST: &str = "segment-00000000000000000000.log";

    fn size(messages: u64, bytes: u64) -> GroupSize {
        GroupSize { bytes, messages }
    }

    #[test]
    fn a_group_waits_until_the_delay_after_its_first_append_was_sent() {
        let sent = Instant::now();
        let delay = 100 * MS;
        assert_eq!(wait_left(sent, sent, delay, size(1, 236)), Some(100 * MS));
        assert_eq!(
            wait_left(sent, sent + 30 * MS, delay, size(5, 1180)),
            Some(70 * MS)
        );
        // The writer took the append late (it was busy with the previous fsync): the wait is
        // shorter by that much, never longer.
        assert_eq!(wait_left(sent, sent + 100 * MS, delay, size(9, 2124)), None);
        assert_eq!(wait_left(sent, sent + 250 * MS, delay, size(9, 2124)), None);
    }

    #[test]
    fn without_a_delay_a_group_never_waits() {
        let sent = Instant::now();
        assert_eq!(wait_left(sent, sent, Duration::ZERO, size(1, 236)), None);
    }

    #[test]
    fn a_full_group_goes_at_once() {
        let sent = Instant::now();
        let delay = 100 * MS;
        let just_under = size(FULL_GROUP_MESSAGES - 1, FULL_GROUP_BYTES - 1);
        assert_eq!(wait_left(sent, sent, delay, just_under), Some(delay));
        assert_eq!(
            wait_left(sent, sent, delay, size(FULL_GROUP_MESSAGES, 64 * 40)),
            None
        );
        assert_eq!(
            wait_left(sent, sent, delay, size(2, FULL_GROUP_BYTES)),
            None
        );
    }

    fn delayed(dir: &std::path::Path, delay: Duration) -> DiskQueueConfig {
        DiskQueueConfig {
            segment_size: 1 << 20,
            max_ack_delay: delay,
            ..config(dir)
        }
    }

    /// A queue with `delay` on a fault-injecting storage (to count fsyncs), and the fsyncs of
    /// its first segment so far (its creation's).
    fn open(dir: &std::path::Path, delay: Duration) -> (DiskQueue, FaultStorage, u64) {
        let storage = FaultStorage::new();
        let queue =
            DiskQueue::open_with(delayed(dir, delay), Arc::new(storage.clone())).expect("open");
        let before = storage.syncs_of(FIRST);
        (queue, storage, before)
    }

    /// `n` appenders of one message each, all started at once; each one's answer and how long
    /// it took.
    async fn appenders(queue: &Arc<DiskQueue>, n: usize) -> Vec<(Appended, Duration)> {
        let mut tasks = Vec::new();
        for i in 0..n {
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let appended = queue
                    .append(vec![message(&format!("m{i}"))])
                    .await
                    .expect("append");
                (appended, start.elapsed())
            }));
        }
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("appender"));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_within_the_delay_share_one_fsync_and_wait_at_most_the_delay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let delay = 300 * MS;
        let (queue, storage, before) = open(dir.path(), delay);
        let queue = Arc::new(queue);
        let fsyncs = || queue.counters().fsyncs.load(Ordering::Relaxed);
        let counted = fsyncs();
        let answers = appenders(&queue, 8).await;
        assert!(answers.iter().all(|(a, _)| a.stored == 1), "{answers:?}");
        assert_eq!(storage.syncs_of(FIRST), before + 1, "one group commit");
        assert_eq!(fsyncs(), counted + 1, "counted");
        let slowest = answers.iter().map(|(_, t)| *t).max().unwrap_or_default();
        // Answered after the wait (the appends were sent together), and not much after it: the
        // margin is for one fsync and a busy machine's scheduling.
        assert!(slowest >= delay - 20 * MS, "answered after {slowest:?}");
        assert!(slowest < delay + 250 * MS, "answered after {slowest:?}");
        assert_eq!(queue.read(100).await.expect("read").len(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_delay_an_append_alone_is_written_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let queue = DiskQueue::open_with(
            delayed(dir.path(), Duration::ZERO),
            Arc::new(storage.clone()),
        )
        .expect("open");
        let before = storage.syncs_of(FIRST);
        for i in 0..3 {
            let start = Instant::now();
            queue
                .append(vec![message(&i.to_string())])
                .await
                .expect("append");
            assert!(start.elapsed() < 200 * MS, "{:?}", start.elapsed());
        }
        assert_eq!(
            storage.syncs_of(FIRST),
            before + 3,
            "one fsync per lone append"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_group_does_not_wait_out_the_delay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, storage, before) = open(dir.path(), Duration::from_secs(1));
        let start = Instant::now();
        let batch = (0..FULL_GROUP_MESSAGES).map(|i| message(&i.to_string()));
        queue.append(batch.collect()).await.expect("append");
        assert!(start.elapsed() < 500 * MS, "{:?}", start.elapsed());
        assert_eq!(storage.syncs_of(FIRST), before + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closing_or_hurrying_does_not_wait_out_the_delay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, storage, before) = open(dir.path(), Duration::from_secs(1));
        let start = Instant::now();
        // Shutdown begins while the group waits: it is written now, and later ones do not wait.
        let (stored, ()) = tokio::join!(queue.append(vec![message("a")]), async {
            tokio::time::sleep(50 * MS).await;
            queue.hurry();
        });
        assert_eq!(stored.expect("append").stored, 1);
        assert!(start.elapsed() < 700 * MS, "{:?}", start.elapsed());
        let start = Instant::now();
        queue.append(vec![message("b")]).await.expect("append");
        assert!(start.elapsed() < 500 * MS, "{:?}", start.elapsed());
        assert_eq!(storage.syncs_of(FIRST), before + 2);

        // A close while a group waits writes it, then stops.
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = DiskQueue::open(delayed(dir.path(), Duration::from_secs(1))).expect("open");
        let start = Instant::now();
        // The append is sent before the close (join polls it first).
        let (stored, ()) = tokio::join!(queue.append(vec![message("c")]), queue.close());
        assert_eq!(stored.expect("append").stored, 1);
        assert!(start.elapsed() < 700 * MS, "{:?}", start.elapsed());
        drop(queue);
        let reopened = DiskQueue::open(config(dir.path())).expect("reopen");
        assert_eq!(reopened.read(10).await.expect("read").len(), 1);
    }
}
