//! The writer's side of the ack state: when the position and the ranges go into the `ack`
//! file's synced slots (every `ACK_SYNC_EVERY` acks, or else `ACK_PERSIST_INTERVAL` after an
//! ack), and what a restart would resume from. The unsynced writes every `ACK_WRITE_EVERY`
//! acks are not the writer's: they go from the acking side to the `ack` file's third slot, so
//! they never wait behind a group commit's fsync (`DiskQueue::write_ahead`).
//!
//! Invariants kept here (the full list is in `disk/mod.rs`):
//! - A segment is deleted only behind a position that is durable: the `ack` file's after its
//!   fdatasync, or the newest segment's ack record after its group commit.
//! - An fdatasync of the `ack` file comes only for `ACK_SYNC_EVERY` acks, or for fewer at most
//!   once per `ACK_PERSIST_INTERVAL`: its cost follows the ack rate (a trickle of acks costs at
//!   most ten a second, a full speed drain one per 256 messages). An unsynced write never
//!   stands in for a durable one.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Writer;
use crate::buffer::disk::ackfile::MAX_FILE_RANGES;
use crate::buffer::disk::{ACK_PERSIST_INTERVAL, ACK_SYNC_EVERY, Seq};

impl Writer {
    /// The ack position a restart would resume from: the ack file's or the newest segment's.
    pub(super) fn ack_on_disk(&self) -> Option<Seq> {
        self.ack.holds().max(self.ack_in_log)
    }

    /// At open: creates the ack file now, while there is room, so a later ack write only
    /// overwrites a block the file already has, which works on a full disk. Also writes it
    /// when recovery moved the position past what is on disk (missing segments).
    pub(in crate::buffer::disk) fn settle_ack_file(&mut self, ack_pos: Seq) {
        if self.ack.holds().is_some() && self.ack_on_disk() >= Some(ack_pos) {
            return;
        }
        if let Err(e) = self.write_ack_file(ack_pos) {
            tracing::warn!(
                dir = %self.shared.config.dir.display(), error = %e,
                "cannot create the buffer's ack file; will retry at the first acknowledgement"
            );
        }
    }

    /// The ack position moved: the ack file is due one interval later, unless a group commit
    /// carries the position first (at most an interval after the ack, at most one ack-file
    /// fsync per interval for fewer than [`ACK_SYNC_EVERY`] acks, none while appends keep
    /// coming and acks come in order). Once [`ACK_SYNC_EVERY`] acks are not durable, it is due
    /// now: a power cut then replays at most that many beyond what was in flight, at any rate.
    /// With `max_ack_delay` the interval is longer by the delay: under steady traffic group
    /// commits come that far apart, and the next one should carry the position instead of an
    /// ack-file fsync of its own.
    pub(super) fn schedule_ack(&mut self) {
        let now = Instant::now();
        let unsynced = self.shared.lock().acks - self.acks_synced;
        let due = if unsynced >= ACK_SYNC_EVERY {
            now
        } else {
            now + ACK_PERSIST_INTERVAL + self.shared.config.max_ack_delay
        };
        // A due time set earlier stays: set only once the position moved after the last
        // ack-file write, it spaces the writes for a trickle of acks an interval apart.
        self.ack_due = Some(self.ack_due.map_or(due, |at| at.min(due)));
    }

    /// The running ack count, the position and the ranges the `ack` file has room for.
    pub(super) fn ack_snapshot(&self) -> (u64, Seq, Vec<(Seq, Seq)>) {
        let state = self.shared.lock();
        (
            state.acks,
            state.ack_next,
            state.ranges.lowest(MAX_FILE_RANGES),
        )
    }

    /// Whether what a restart would resume from holds the whole ack state: the position (in
    /// the ack file or the newest segment) and the ranges (in the ack file).
    pub(super) fn ack_state_on_disk(&self, position: Seq, ranges: &[(Seq, Seq)]) -> bool {
        self.ack_on_disk() == Some(position) && self.ack.holds_ranges() == ranges
    }

    /// Persists the ack position when it is due. Also notices a position moved without a
    /// message (the writer's own drops, a signal still on its way).
    pub(super) fn persist_ack_if_due(&mut self) {
        let (_, ack_next, ranges) = self.ack_snapshot();
        // A group commit may have carried it already: then only a retried reuse is left.
        let on_disk = self.ack_state_on_disk(ack_next, &ranges);
        if self.ack_due.is_none() {
            if on_disk {
                return;
            }
            self.schedule_ack();
        }
        let now = Instant::now();
        if self.ack_due.is_some_and(|due| due > now) {
            return;
        }
        self.ack_due = None;
        let done = if on_disk {
            self.reuse_if_worthwhile()
        } else {
            self.persist_ack_and_delete()
        };
        if !done {
            self.ack_due = Some(now + ACK_PERSIST_INTERVAL);
        }
    }

    /// Writes a moved ack position to the ack file, deletes the segments wholly behind it, and
    /// reuses the newest segment if worthwhile. Returns false when something should be tried
    /// again later.
    pub(super) fn persist_ack_and_delete(&mut self) -> bool {
        let (_, ack_next, ranges) = self.ack_snapshot();
        if !self.ack.holds_all(ack_next, &ranges) {
            if let Err(e) = self.write_ack_file(ack_next) {
                tracing::warn!(dir = %self.shared.config.dir.display(), error = %e, "cannot persist the ack position; will retry");
                return false;
            }
            self.delete_behind(ack_next);
        }
        self.reuse_if_worthwhile()
    }

    /// Writes `seq` and the ranges above it to the ack file and fdatasyncs it (the file then
    /// notes what it holds).
    pub(super) fn write_ack_file(&mut self, seq: Seq) -> io::Result<()> {
        let (acks, _, ranges) = self.ack_snapshot();
        let ranges: Vec<(Seq, Seq)> = ranges.into_iter().filter(|&(s, _)| s > seq).collect();
        self.ack.write(&*self.shared.storage, seq, &ranges)?;
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.last_sync = Some(Instant::now());
        self.shared.acks_written.fetch_max(acks, Ordering::AcqRel);
        self.acks_synced = acks;
        Ok(())
    }
}
