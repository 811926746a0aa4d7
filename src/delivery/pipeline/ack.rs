//! In-order acknowledgement: which events are unfinished, how far the queue was read, how far
//! it was acknowledged, and the receipt time of the oldest message not acknowledged yet.
//!
//! Invariants:
//! - The acknowledgement position only moves forward, and never reaches an unfinished event's
//!   first sequence (nor any other barrier the caller names): a crash only ever replays.
//! - The counters' `oldest_unacked_ms` is the receipt time of the oldest message read and not
//!   acknowledged (0 when none), republished whenever either end moves.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::buffer::Seq;
use crate::core::stats::RuleStats;

/// The acknowledgement bookkeeping of one rule's delivery. Pure.
#[derive(Debug)]
pub(super) struct Acks {
    stats: Arc<RuleStats>,
    /// First sequences of unfinished events (invoking, or refused and not yet dead-lettered),
    /// with how many events start there (a window's chunks share one).
    unfinished: BTreeMap<Seq, usize>,
    /// Highest sequence read from the queue.
    consumed: Option<Seq>,
    /// Acknowledged through this.
    acked: Option<Seq>,
    /// Sequence and receipt time (ms) of each message read and not yet acknowledged, oldest
    /// first: the front is the buffer's oldest message, for `mlb_buffer_oldest_age_seconds`.
    unacked_received: VecDeque<(Seq, u64)>,
}

impl Acks {
    /// Nothing read yet.
    pub(super) fn new(stats: Arc<RuleStats>) -> Self {
        Acks {
            stats,
            unfinished: BTreeMap::new(),
            consumed: None,
            acked: None,
            unacked_received: VecDeque::new(),
        }
    }

    /// One message read from the queue (call [`Acks::publish_oldest`] after a read).
    pub(super) fn read(&mut self, seq: Seq, received_ms: u64) {
        self.consumed = Some(self.consumed.map_or(seq, |c| c.max(seq)));
        self.unacked_received.push_back((seq, received_ms));
    }

    /// Tells the counters the receipt time of the oldest message still unacknowledged.
    pub(super) fn publish_oldest(&self) {
        let oldest = self.unacked_received.front().map_or(0, |(_, ms)| *ms);
        self.stats
            .oldest_unacked_ms
            .store(oldest, Ordering::Relaxed);
    }

    /// An event starting at `first_seq` was started: it holds the acknowledgements.
    pub(super) fn begin(&mut self, first_seq: Seq) {
        *self.unfinished.entry(first_seq).or_default() += 1;
    }

    /// Finished with one event starting at `first_seq`.
    pub(super) fn finish(&mut self, first_seq: Seq) {
        if let Some(n) = self.unfinished.get_mut(&first_seq) {
            *n -= 1;
            if *n == 0 {
                self.unfinished.remove(&first_seq);
            }
        }
    }

    /// A new acknowledgement position, when it moved: everything read below the oldest
    /// unfinished event and below `pending` (the first sequence of what is read but not started
    /// yet, if any).
    /// The position last reported by [`Acks::through`].
    pub(super) fn acked(&self) -> Option<Seq> {
        self.acked
    }

    pub(super) fn through(&mut self, pending: Option<Seq>) -> Option<Seq> {
        let barrier = [self.unfinished.keys().next().copied(), pending]
            .into_iter()
            .flatten()
            .min();
        let through = match barrier {
            Some(0) => None,
            Some(b) => self.consumed.map(|c| c.min(b - 1)),
            None => self.consumed,
        }?;
        if self.acked.is_some_and(|a| through <= a) {
            return None;
        }
        self.acked = Some(through);
        while self
            .unacked_received
            .front()
            .is_some_and(|(seq, _)| *seq <= through)
        {
            self.unacked_received.pop_front();
        }
        self.publish_oldest();
        Some(through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_stays_below_the_oldest_unfinished_event_and_only_moves_forward() {
        let mut acks = Acks::new(Arc::default());
        for seq in 0..4 {
            acks.read(seq, 1_000 + seq);
        }
        acks.begin(0);
        acks.begin(2);
        assert_eq!(acks.through(None), None, "event at 0 unfinished");
        acks.finish(0);
        assert_eq!(acks.through(None), Some(1));
        assert_eq!(acks.through(Some(1)), None, "never backwards");
        acks.finish(2);
        assert_eq!(acks.through(Some(3)), Some(2), "pending at 3 holds it");
        assert_eq!(acks.through(None), Some(3));
        assert_eq!(RuleStats::get(&acks.stats.oldest_unacked_ms), 0);
    }

    #[test]
    fn events_sharing_a_first_sequence_all_hold_it() {
        let mut acks = Acks::new(Arc::default());
        acks.read(0, 1);
        acks.begin(0);
        acks.begin(0);
        acks.finish(0);
        assert_eq!(
            acks.through(None),
            None,
            "one chunk of the window still out"
        );
        acks.finish(0);
        assert_eq!(acks.through(None), Some(0));
    }
}
