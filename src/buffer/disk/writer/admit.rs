//! Admission at the cap: which appends of a group commit are written, and what makes room.
//!
//! A rule's share of `buffer.max_size` is a promise to the SD card: the bytes of the rule's
//! segment files stay at or under it. Each append is measured against the bytes on disk, plus
//! what the group being formed already took, plus [`GROUP_OVERHEAD`] (what a group commit may
//! write besides its records), so many appends landing in one group commit cannot take the
//! share past the cap together.
//!
//! When an append does not fit, delivered records still on disk are freed first: the ack
//! position is written to the `ack` file at once (not an interval later), the segments behind
//! it are deleted, and a delivered newest segment is reused. Then, by `when_full`:
//! - `drop_newest`: the append is answered as dropped (counted, logged); the group keeps what
//!   it took before.
//! - `drop_oldest`: the oldest segments are deleted until it fits, their unacknowledged
//!   records counted as dropped. When only the newest segment is left and the group itself is
//!   what does not fit, the group is committed first, so that it can be dropped in turn.
//! - `block`: the appender waited before it reached the writer (`DiskQueue::append`),
//!   reserving its bytes in `State::reserved` under the state lock; the writer releases them
//!   once it has written them.
//!
//! The one exception: an append larger than the whole cap, with nothing else in the queue, is
//! written alone under `drop_oldest` and `block` (it could never fit, and refusing it would
//! stop the rule), and dropped under `drop_newest`.

use std::io;
use std::sync::atomic::Ordering;

use super::{PendingAppend, Reply, Writer};
use crate::buffer::disk::segment::MAGIC_LEN;
use crate::buffer::{Appended, record};
use crate::core::config::WhenFull;
use crate::core::envelope::Message;

/// What a group commit may write besides its message records: a new segment's magic and the
/// ack record it opens with, and one ack record carried with the messages.
pub const GROUP_OVERHEAD: u64 = MAGIC_LEN + 2 * record::ACK_RECORD_LEN as u64;

/// The appends of one group commit.
#[derive(Default)]
pub(super) struct Group {
    /// Their messages, in order.
    pub(super) messages: Vec<Message>,
    /// Who waits for how many of them.
    pub(super) replies: Vec<(Reply, u64)>,
    /// The bytes of their records.
    bytes: u64,
    /// What `block` appenders reserved for them, released once they are written.
    pub(super) reserved: u64,
}

/// What admission decided for one append.
enum Admit {
    /// It joins the group.
    Take,
    /// `drop_newest`: it is dropped.
    Drop,
    /// The group must be committed before this append can be admitted.
    CommitFirst,
}

impl Writer {
    /// Admits each append in order into the group to write, committing earlier groups when
    /// `drop_oldest` needs to (see the module head); answers the dropped and failed ones.
    pub(super) fn admit_all(&mut self, appends: Vec<PendingAppend>) -> Group {
        let block = self.shared.config.when_full == WhenFull::Block;
        let mut group = Group::default();
        for (messages, reply) in appends {
            let size: u64 = messages.iter().map(|m| record::encoded_len(m) as u64).sum();
            loop {
                match self.admit(size, group.bytes) {
                    Ok(Admit::CommitFirst) => self.commit(std::mem::take(&mut group)),
                    Ok(Admit::Take) => {
                        group.bytes += size;
                        group.reserved += if block { size } else { 0 };
                        group.replies.push((reply, messages.len() as u64));
                        group.messages.extend(messages);
                        break;
                    }
                    Ok(Admit::Drop) => {
                        self.drop_newest(messages, reply);
                        break;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        break;
                    }
                }
            }
        }
        group
    }

    /// Whether an append of `size` bytes fits beside the `pending` bytes of the group, and if
    /// not, what `when_full` makes of it.
    fn admit(&mut self, size: u64, pending: u64) -> io::Result<Admit> {
        let config = self.shared.config.clone();
        let need = pending + size + GROUP_OVERHEAD;
        if self.shared.lock().bytes + need <= config.max_size {
            return Ok(Admit::Take);
        }
        self.free_delivered();
        if self.shared.lock().bytes + need <= config.max_size {
            return Ok(Admit::Take);
        }
        match config.when_full {
            // The appender waited for room before it came (or is the one exception).
            WhenFull::Block => Ok(Admit::Take),
            WhenFull::DropNewest => Ok(Admit::Drop),
            WhenFull::DropOldest => self.make_room(size, pending),
        }
    }

    /// Frees what delivered records hold when that frees anything: writes the ack position to
    /// the `ack` file now (one fsync, only at the cap), deletes the segments behind it and
    /// reuses a delivered newest segment.
    fn free_delivered(&mut self) {
        let frees = {
            let state = self.shared.lock();
            let behind = state.segments.len() > 1 && state.segments[1].first_seq <= state.ack_next;
            let all_delivered = state.ack_next == self.next_seq && self.len > self.data_start;
            behind || all_delivered
        };
        if frees {
            self.short_of_room = true;
            let _ = self.persist_ack_and_delete();
            self.short_of_room = false;
        }
    }

    /// Answers an append `drop_newest` drops, and counts and logs it.
    fn drop_newest(&self, messages: Vec<Message>, reply: Reply) {
        let n = messages.len() as u64;
        self.shared
            .counters
            .dropped_newest
            .fetch_add(n, Ordering::Relaxed);
        tracing::warn!(
            dir = %self.shared.config.dir.display(), messages = n,
            "buffer full (buffer.when_full = drop_newest): new messages dropped"
        );
        let _ = reply.send(Ok(Appended::dropped(n)));
    }

    /// With `drop_oldest`, deletes the oldest segments until `size` more bytes fit beside the
    /// group's `pending` ones; asks for the group to be committed first when it alone is what
    /// does not fit.
    fn make_room(&mut self, size: u64, pending: u64) -> io::Result<Admit> {
        let shared = self.shared.clone();
        let config = &shared.config;
        loop {
            let (bytes, segments) = {
                let state = self.shared.lock();
                (state.bytes, state.segments.len())
            };
            if bytes + pending + size + GROUP_OVERHEAD <= config.max_size {
                return Ok(Admit::Take);
            }
            if segments <= 1 {
                if self.len <= self.data_start {
                    // Nothing older is left: the group is too big, or this one append alone
                    // is larger than the cap (written anyway).
                    return Ok(if pending > 0 {
                        Admit::CommitFirst
                    } else {
                        Admit::Take
                    });
                }
                self.roll_over()?;
                continue;
            }
            let dropped = {
                let mut state = self.shared.lock();
                let Some(old) = state.segments.pop_front() else {
                    return Ok(Admit::Take);
                };
                let end = state
                    .segments
                    .front()
                    .map_or(self.next_seq, |s| s.first_seq);
                let unacked = end.saturating_sub(state.ack_next.max(old.first_seq));
                state.ack_next = state.ack_next.max(end);
                state.bytes -= old.len;
                (old, unacked)
            };
            let (old, unacked) = dropped;
            shared.storage.remove_file(&old.path)?;
            shared.storage.sync_dir(&config.dir)?;
            self.shared
                .counters
                .dropped_oldest
                .fetch_add(unacked, Ordering::Relaxed);
            tracing::warn!(
                file = %old.path.display(), dropped = unacked,
                "buffer full (buffer.when_full = drop_oldest): oldest segment deleted"
            );
        }
    }

    /// Gives back what `block` appenders reserved for a group now written (or failed), and
    /// wakes those waiting for room.
    pub(super) fn release_reserved(&self, reserved: u64) {
        if reserved > 0 {
            let mut state = self.shared.lock();
            state.reserved = state.reserved.saturating_sub(reserved);
            drop(state);
            self.shared.freed.notify_waiters();
        }
    }
}
