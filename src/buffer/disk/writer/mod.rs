//! The writer thread: the one owner of every file mutation of a queue.
//!
//! Appends queue up for it on a channel. It takes all that are waiting (and, with
//! `buffer.max_ack_delay`, those coming soon after: `gather.rs`), writes them and a
//! moved ack position in one write, fsyncs once for all of them (group commit), answers each,
//! and deletes the segments behind the position. When the ack deadline passes while it waits
//! (no append carried the position), it writes the `ack` file, deletes the segments behind it
//! and reuses the newest one if worthwhile. It also rolls over to a new segment, and drops the
//! oldest one when `when_full = "drop_oldest"` needs room.
//!
//! Invariants kept here (the full list is in `disk/mod.rs`):
//! - An append is answered Ok only after its records are fsync'd; only then does the shared
//!   state's durable length (what readers may read) move. A failed write or fsync cuts what
//!   the append wrote before anything else happens.
//! - After a failed fsync the segment file is untrusted: the next append starts a new one.
//! - The `ack` file gets the ack state (position and ranges) fsync'd at once when `ACK_SYNC_EVERY` acks are not durable,
//!   else `ACK_PERSIST_INTERVAL` after an ack (for a trickle, at most once per interval).
//! - An ack record holds only a position that was acknowledged, and is durable only with its
//!   group commit. A new segment opens with an ack record when the `ack` file is behind, so the
//!   newest segment never holds less than the position older segments were deleted on.
//! - A segment is deleted only behind a position that is on disk (the `ack` file or the newest
//!   segment, which is never deleted here), or by `drop_oldest`, which counts what it drops.
//!   The directory is fsync'd after every create, rename and delete.
//! - The newest segment is reused in place only when everything in it is acknowledged on
//!   disk and no read is in progress: `ack` file first, then the cut and its fsync, then the
//!   rename and the directory fsync (`reuse.rs`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::ackfile::AckFile;
use super::recovery::NewestSegment;
use super::segment::{segment_head, segment_path};
use super::{ACK_PERSIST_INTERVAL, Segment, Seq, Shared, WriterMsg};
use crate::buffer::storage::{OpenMode, StorageFile};
use crate::buffer::{Appended, record};
use crate::core::envelope::Message;

mod ack;
mod admit;
mod gather;
mod reuse;

pub use admit::GROUP_OVERHEAD;
use admit::Group;
use gather::Turn;

/// One append waiting for the group commit, with where its answer goes.
pub(super) type PendingAppend = (Vec<Message>, Reply);

/// Where an append's answer goes: how many it stored and how many the policy dropped.
pub(super) type Reply = oneshot::Sender<io::Result<Appended>>;

/// Owns the files: appends, fsyncs, rollovers, deletions, reuse, ack persistence.
pub(super) struct Writer {
    shared: Arc<Shared>,
    /// The newest segment, open for appending.
    file: Box<dyn StorageFile>,
    /// Its durable length.
    len: u64,
    /// Sequence the next record gets.
    next_seq: Seq,
    /// The `ack` file and the position it holds.
    ack: AckFile,
    /// The highest ack record durable in the newest segment file (`None`: none there).
    ack_in_log: Option<Seq>,
    /// The newest segment file has the old magic: the next append starts a new one.
    v1: bool,
    /// Where the newest segment's message records start: no longer than this, it holds none.
    data_start: u64,
    /// When the moved ack position is to be written (`None`: nothing is due).
    ack_due: Option<Instant>,
    /// The same when the ack state was last made durable.
    acks_synced: u64,
    /// When the `ack` file was last fdatasync'd.
    last_sync: Option<Instant>,
    /// Set after a failed write or fsync, so the failure is logged once and a full disk gets
    /// its delivered segment reused; cleared by the next successful append.
    failing: bool,
    /// Set after a failed fsync (or a failed cut of a partial append): this segment file takes
    /// no more appends, the next one starts a new file.
    untrusted: bool,
    /// Set while an append waits for room at the cap: the newest segment is then reused as
    /// soon as everything in it is delivered (`reuse.rs`).
    short_of_room: bool,
    /// Shutdown has begun: no group waits for company any more (`gather.rs`).
    hurry: bool,
    buf: Vec<u8>,
}

impl Writer {
    /// A writer appending to the newest segment in `shared`'s state, which recovery left there.
    pub(super) fn new(
        shared: Arc<Shared>,
        next_seq: Seq,
        ack: AckFile,
        newest: NewestSegment,
    ) -> io::Result<Writer> {
        let (path, len) = {
            let state = shared.lock();
            let last = state
                .segments
                .back()
                .ok_or_else(|| io::Error::other("no segment after recovery"))?;
            (last.path.clone(), last.len)
        };
        let file = shared.storage.open(&path, OpenMode::Write)?;
        Ok(Writer {
            shared,
            file,
            len,
            next_seq,
            ack,
            ack_in_log: newest.ack_in_log,
            v1: newest.v1,
            data_start: newest.data_start,
            ack_due: None,
            acks_synced: 0,
            last_sync: None,
            failing: false,
            untrusted: false,
            short_of_room: false,
            hurry: false,
            buf: Vec::new(),
        })
    }

    /// The thread's loop: until the queue closes, takes every waiting message at once, waits
    /// for more when `max_ack_delay` says so (`gather.rs`), and writes the group.
    pub(super) fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        loop {
            // Wait for work, but no longer than until the ack position is due on disk.
            let first = match self.ack_due {
                Some(due) => match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(msg) => msg,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.persist_ack_if_due();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(msg) => msg,
                    Err(mpsc::RecvError) => break,
                },
            };
            let mut turn = Turn::default();
            for msg in std::iter::once(first).chain(rx.try_iter()) {
                self.take(msg, &mut turn);
            }
            self.gather(&rx, &mut turn);
            if turn.abandon {
                self.shared.lock().closed = true;
                self.wake_all();
                return;
            }
            let appends = std::mem::take(&mut turn.appends);
            if !appends.is_empty() {
                self.append_all(appends);
            }
            self.persist_ack_if_due();
            if let Some(reply) = turn.close {
                self.stop();
                let _ = reply.send(());
                return;
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        self.persist_ack_and_delete();
        self.shared.lock().closed = true;
        self.wake_all();
    }

    fn wake_all(&self) {
        self.shared.appended.notify_waiters();
        self.shared.freed.notify_waiters();
    }

    /// Writes every pending append, fsyncs once, answers each. Admission (`admit.rs`) may
    /// split them into several group commits, so that the share never exceeds its cap.
    pub(super) fn append_all(&mut self, appends: Vec<PendingAppend>) {
        let group = self.admit_all(appends);
        self.commit(group);
    }

    /// Writes a group durably and answers each of its appends.
    fn commit(&mut self, group: Group) {
        if group.replies.is_empty() {
            return;
        }
        let result = self.write_durably(&group.messages);
        self.release_reserved(group.reserved);
        for (reply, n) in group.replies {
            let _ = reply.send(match &result {
                Ok(()) => Ok(Appended::stored(n)),
                // Each caller gets its own copy, with the OS error code when there is one.
                Err(e) => Err(match e.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(e.kind(), e.to_string()),
                }),
            });
        }
        if result.is_ok() {
            self.shared.appended.notify_waiters();
            if let Some(position) = self.ack_on_disk() {
                let (acks, ack_next, ranges) = self.ack_snapshot();
                if self.ack_state_on_disk(ack_next, &ranges) {
                    // Carried by this group commit: the ack file need not be written.
                    self.ack_due = None;
                    self.acks_synced = acks;
                }
                self.delete_behind(position);
            }
        } else if !self.reuse_if_worthwhile() {
            // A read holds the segment: try again shortly.
            self.ack_due = Some(Instant::now() + ACK_PERSIST_INTERVAL);
        }
    }

    /// Appends `messages` durably, keeping `failing` and `writable` up to date.
    fn write_durably(&mut self, messages: &[Message]) -> io::Result<()> {
        let result = self.try_write(messages);
        let dir = self.shared.config.dir.display();
        match &result {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(dir = %dir, "buffer writes work again");
                }
                self.shared.writable.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        dir = %dir, error = %e,
                        "cannot write the buffer (disk full or read-only?): not acknowledging new messages until it works again"
                    );
                }
                self.shared.writable.store(false, Ordering::Relaxed);
            }
        }
        result
    }

    /// The ack position a write should carry in an ack record: the in-memory one, when neither
    /// the ack file nor this segment file holds it yet.
    fn ack_to_carry(&self) -> Option<Seq> {
        let ack_next = self.shared.lock().ack_next;
        (self.ack.holds() < Some(ack_next) && self.ack_in_log < Some(ack_next)).then_some(ack_next)
    }

    fn try_write(&mut self, messages: &[Message]) -> io::Result<()> {
        if self.untrusted || self.v1 || self.len >= self.shared.config.segment_size {
            self.roll_over()?;
        }
        self.buf.clear();
        for (i, m) in messages.iter().enumerate() {
            record::encode(self.next_seq + i as u64, m, &mut self.buf);
        }
        // The ack position rides in the same write and fsync (group commit): no ack-file
        // write while appends keep coming.
        let carried = self.ack_to_carry();
        if let Some(position) = carried {
            record::encode_ack(position, &mut self.buf);
        }
        if let Err(e) = self.file.write_all_at(&self.buf, self.len) {
            // Cut what part of it landed: readers of this process must not see half an append,
            // and a full disk gets the space back.
            if self.file.set_len(self.len).is_err() {
                self.untrusted = true;
            }
            return Err(e);
        }
        if let Err(e) = self.file.sync_data() {
            // The kernel may have dropped the pages it could not write and will not say so
            // again: what this append wrote is not durable, and no later fsync of this file
            // proves anything. Cut it; the next append starts a new segment file.
            let _ = self.file.set_len(self.len);
            self.untrusted = true;
            tracing::warn!(
                dir = %self.shared.config.dir.display(), error = %e,
                "buffer fsync failed: the append is not acknowledged and the next one starts a new segment file"
            );
            return Err(e);
        }
        self.shared.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.len += self.buf.len() as u64;
        self.next_seq += messages.len() as u64;
        if carried.is_some() {
            self.ack_in_log = carried;
        }
        let mut state = self.shared.lock();
        if let Some(last) = state.segments.back_mut() {
            last.len = self.len;
        }
        state.bytes += self.buf.len() as u64;
        state.durable_seq = self.next_seq;
        if self.buf.capacity() > 4 * 1024 * 1024 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Starts a new segment named after the next sequence.
    fn roll_over(&mut self) -> io::Result<()> {
        self.remove_empty_newest()?;
        let shared = self.shared.clone();
        let dir = &shared.config.dir;
        let storage = &shared.storage;
        let path = segment_path(dir, self.next_seq);
        // The newest segment must hold the newest position the log carried (older segments
        // are deleted on its strength): it opens with an ack record, in the same write. The old
        // file's ack records no longer count (it may even be the empty one removed above).
        self.ack_in_log = None;
        let carried = self.ack_to_carry();
        let head = segment_head(carried);
        let created = storage.open(&path, OpenMode::Create).and_then(|file| {
            file.write_all_at(&head, 0)?;
            file.sync_all()?;
            storage.sync_dir(dir)?;
            Ok(file)
        });
        let file = match created {
            Ok(file) => file,
            Err(e) => {
                // Leave no half-made file behind (a full disk may have refused the magic).
                let _ = storage.remove_file(&path);
                return Err(e);
            }
        };
        self.file = file;
        self.len = head.len() as u64;
        self.data_start = self.len;
        self.ack_in_log = carried;
        self.untrusted = false;
        self.v1 = false;
        let mut state = self.shared.lock();
        state.segments.push_back(Segment {
            first_seq: self.next_seq,
            path,
            len: self.len,
        });
        state.bytes += self.len;
        Ok(())
    }

    /// An empty newest segment would give the new one its name: removes it first, so the new
    /// file really is a new file (it is empty only when an untrusted segment is replaced).
    fn remove_empty_newest(&mut self) -> io::Result<()> {
        let empty = {
            let mut state = self.shared.lock();
            match state.segments.back() {
                Some(last) if last.first_seq == self.next_seq => {
                    let last = state.segments.pop_back();
                    if let Some(last) = &last {
                        state.bytes -= last.len;
                    }
                    last
                }
                _ => None,
            }
        };
        if let Some(old) = empty
            && let Err(e) = self.shared.storage.remove_file(&old.path)
        {
            let mut state = self.shared.lock();
            state.bytes += old.len;
            state.segments.push_back(old);
            return Err(e);
        }
        Ok(())
    }

    /// Deletes the segments wholly behind `position`, which is on disk (in the ack file or in
    /// the newest segment, which is never deleted here).
    fn delete_behind(&mut self, position: Seq) {
        let mut deleted = Vec::new();
        {
            let mut state = self.shared.lock();
            while state.segments.len() > 1 && state.segments[1].first_seq <= position {
                if let Some(old) = state.segments.pop_front() {
                    state.bytes -= old.len;
                    deleted.push(old.path);
                }
            }
        }
        if !deleted.is_empty() {
            for path in &deleted {
                if let Err(e) = self.shared.storage.remove_file(path) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot delete a delivered segment");
                }
            }
            let _ = self.shared.storage.sync_dir(&self.shared.config.dir);
            self.shared.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::buffer::disk::ackfile::read_ack_file;
    use crate::buffer::disk::recovery;
    use crate::buffer::disk::segment::tests::message;
    use crate::buffer::disk::segment::{scan_segment, segment_files};
    use crate::buffer::disk::tests::config;
    use crate::buffer::disk::{DiskQueueConfig, ScanResult};
    use crate::buffer::storage::FaultStorage;

    /// A writer on `dir` without its thread, so a test drives it step by step.
    pub(super) fn open_writer(
        dir: &Path,
        storage: &FaultStorage,
        segment_size: u64,
    ) -> (Arc<Shared>, Writer) {
        let config = DiskQueueConfig {
            segment_size,
            ..config(dir)
        };
        recovery::open(config, Arc::new(storage.clone())).expect("open")
    }

    /// One group commit of `batches`, one append each; returns each append's answer.
    pub(super) fn append(writer: &mut Writer, batches: &[&[&str]]) -> Vec<io::Result<Appended>> {
        let mut answers = Vec::new();
        let mut appends = Vec::new();
        for batch in batches {
            let (reply, answer) = oneshot::channel();
            appends.push((batch.iter().map(|p| message(p)).collect(), reply));
            answers.push(answer);
        }
        writer.append_all(appends);
        answers
            .into_iter()
            .map(|mut answer| answer.try_recv().expect("answered"))
            .collect()
    }

    pub(super) fn scan(dir: &Path, first_seq: Seq) -> ScanResult {
        scan_segment(&std::fs::read(segment_path(dir, first_seq)).expect("read segment"))
    }

    const FIRST: &str = "segment-00000000000000000000.log";

    #[test]
    fn appends_waiting_together_share_one_fsync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1 << 20);
        let before = storage.syncs_of(FIRST);
        let answers = append(&mut writer, &[&["a", "b"], &["c", "d", "e"], &["f"]]);
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        assert_eq!(storage.syncs_of(FIRST), before + 1);
        assert_eq!(scan(dir.path(), 0).next_seq, Some(6));
        assert_eq!(shared.lock().durable_seq, 6);
    }

    #[test]
    fn a_moved_ack_position_rides_in_the_group_commit_without_an_ack_file_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1 << 20);
        append(&mut writer, &[&["a", "b", "c"]]);
        let ack_syncs = storage.syncs_of("ack");
        shared.lock().ack_next = 2;
        writer.schedule_ack();
        assert!(append(&mut writer, &[&["d"]])[0].is_ok());
        assert_eq!(scan(dir.path(), 0).ack, Some(2));
        assert_eq!(storage.syncs_of("ack"), ack_syncs);
        assert_eq!(writer.ack_due, None, "nothing left for the ack file");
        // The position did not move again: the next append carries no ack record.
        let len = std::fs::metadata(segment_path(dir.path(), 0))
            .expect("stat")
            .len();
        append(&mut writer, &[&["e"]]);
        let grown = std::fs::metadata(segment_path(dir.path(), 0))
            .expect("stat")
            .len()
            - len;
        assert_eq!(grown, record::encoded_len(&message("e")) as u64);
    }

    #[test]
    fn after_a_failed_fsync_the_append_is_cut_and_the_next_starts_a_new_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1 << 20);
        append(&mut writer, &[&["a", "b"]]);
        let len = std::fs::metadata(segment_path(dir.path(), 0))
            .expect("stat")
            .len();
        storage.fail_next_fsync();
        let failed = append(&mut writer, &[&["c"]]);
        assert_eq!(
            failed[0].as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(5))
        );
        assert_eq!(
            std::fs::metadata(segment_path(dir.path(), 0))
                .expect("stat")
                .len(),
            len
        );
        assert_eq!(shared.lock().durable_seq, 2);
        assert!(!shared.writable.load(Ordering::Relaxed));
        assert!(append(&mut writer, &[&["c again"]])[0].is_ok());
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 0), segment_path(dir.path(), 2)]
        );
        assert_eq!(scan(dir.path(), 2).next_seq, Some(3));
        assert!(shared.writable.load(Ordering::Relaxed));
    }

    #[test]
    fn segments_wholly_behind_the_persisted_position_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 512);
        let ten = ["0123456789012345678901234567890123456789"; 10];
        for _ in 0..3 {
            assert!(append(&mut writer, &[&ten])[0].is_ok());
        }
        let names = |dir: &Path| segment_files(dir).expect("list");
        assert_eq!(names(dir.path()).len(), 3, "10 messages fill a segment");
        shared.lock().ack_next = 20;
        assert!(writer.persist_ack_and_delete());
        assert_eq!(names(dir.path()), [segment_path(dir.path(), 20)]);
        assert_eq!(
            read_ack_file(dir.path()).expect("ack").map(|(_, s)| s),
            Some(20)
        );
        let state = shared.lock();
        let on_disk = std::fs::metadata(segment_path(dir.path(), 20))
            .expect("stat")
            .len();
        assert_eq!(state.bytes, on_disk);
        assert_eq!(state.segments.len(), 1);
    }
}
