//! Reusing the newest segment in place, so delivered data does not sit on disk and a full
//! disk recovers by itself.
//!
//! The newest segment is reused once it is the only segment, every record in it is
//! acknowledged and that acknowledgement is on disk, and its space is wanted: writes are
//! failing (a full disk), or the queue is at its size cap (or an append waits for room under
//! it), or the segment holds at least
//! 1/[`REUSE_FRACTION`] of `segment_size` (so small acks under normal traffic never touch the
//! directory).
//!
//! Invariants kept here, by the order of the steps:
//! 1. The `ack` file holds the position before the cut, because the cut removes the
//!    segment's ack records. Writing it overwrites a block the file has: no free block needed.
//! 2. No read is in progress: the reader lock is held from the cut to the rename, and the
//!    reader's open file is closed, so no read sees a file being cut.
//! 3. The cut (to the header) is fsync'd before the rename, so a renamed file never gets its
//!    old records back. If that fsync fails there is no rename and the file takes no more
//!    appends.
//! 4. The rename to `segment-<next sequence>.log` is followed by a directory fsync. If it
//!    fails the file keeps its name and takes the following sequences, which the "from its
//!    name" rule allows.
//!
//! Cutting and renaming need no free block, so on a full disk the next append succeeds. A
//! crash between any two steps recovers (see `disk/mod.rs`).

use std::path::{Path, PathBuf};

use super::Writer;
use crate::buffer::disk::REUSE_FRACTION;
use crate::buffer::disk::segment::{MAGIC_LEN, segment_path};

impl Writer {
    /// Reuses the newest segment in place when everything in it is acknowledged on disk and
    /// its space is wanted (see the module head). Returns false when a read in progress held it
    /// off (or the ack file could not be written first), so the caller tries again.
    pub(super) fn reuse_if_worthwhile(&mut self) -> bool {
        let Some(path) = self.reuse_candidate() else {
            return true;
        };
        let dir = self.shared.config.dir.clone();
        // The cut removes the segment's ack records: the ack file must hold the position
        // first. It overwrites a block the file has, so this works on a full disk.
        if self.ack.holds() != Some(self.next_seq)
            && let Err(e) = self.write_ack_file(self.next_seq)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot persist the ack position before reusing a segment; will retry");
            return false;
        }
        // No read may see the file while it is cut.
        let shared = self.shared.clone();
        let Ok(mut reader) = shared.reader.try_lock() else {
            return false;
        };
        reader.open = None;
        let Some(freed) = self.cut_to_header(&path) else {
            return true;
        };
        self.rename_reused(&path);
        drop(reader);
        if self.failing {
            tracing::info!(
                dir = %dir.display(), freed_bytes = freed,
                "buffer: every message delivered; reused the segment file to free space"
            );
        } else {
            tracing::debug!(dir = %dir.display(), freed_bytes = freed, "buffer: reused a delivered segment file");
        }
        self.shared.freed.notify_waiters();
        true
    }

    /// The newest segment's path when it is the only one, holds messages, every one of them
    /// is acknowledged on disk, and its space is wanted: writes are failing, the queue is at
    /// its cap, or it holds at least 1/[`REUSE_FRACTION`] of a segment.
    fn reuse_candidate(&self) -> Option<PathBuf> {
        if self.len <= self.data_start || self.ack_on_disk() != Some(self.next_seq) {
            return None;
        }
        let (path, bytes) = {
            let state = self.shared.lock();
            match state.segments.back() {
                Some(last) if state.ack_next == self.next_seq && state.segments.len() == 1 => {
                    (last.path.clone(), state.bytes)
                }
                _ => return None,
            }
        };
        let config = &self.shared.config;
        let wanted = self.failing
            || self.short_of_room
            || bytes >= config.max_size
            || self.len >= config.segment_size / REUSE_FRACTION;
        wanted.then_some(path)
    }

    /// Cuts the newest segment to its header (needs no free block); returns the bytes freed,
    /// `None` when the cut failed and the file is as it was.
    fn cut_to_header(&mut self, path: &Path) -> Option<u64> {
        if let Err(e) = self.file.set_len(MAGIC_LEN) {
            tracing::warn!(file = %path.display(), error = %e, "cannot reuse a delivered segment");
            return None;
        }
        let freed = self.len - MAGIC_LEN;
        self.len = MAGIC_LEN;
        self.data_start = MAGIC_LEN;
        self.ack_in_log = None;
        let mut state = self.shared.lock();
        if let Some(last) = state.segments.back_mut() {
            last.len = MAGIC_LEN;
        }
        state.bytes -= freed;
        Some(freed)
    }

    /// Makes the cut durable, then renames the cut segment after the next sequence. A renamed
    /// file must never get its old records back, so when the fsync fails there is no rename
    /// and the file takes no more appends. A failed rename is harmless: an empty segment
    /// holding later sequences than its name says.
    fn rename_reused(&mut self, path: &Path) {
        if let Err(e) = self.file.sync_all() {
            tracing::warn!(file = %path.display(), error = %e, "cannot fsync a reused segment; the next append starts a new one");
            self.untrusted = true;
            return;
        }
        let dir = &self.shared.config.dir;
        let to = segment_path(dir, self.next_seq);
        match self.shared.storage.rename(path, &to) {
            Ok(()) => {
                let mut state = self.shared.lock();
                if let Some(last) = state.segments.back_mut() {
                    last.first_seq = self.next_seq;
                    last.path = to;
                }
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot rename a reused segment")
            }
        }
        let _ = self.shared.storage.sync_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::tests::{append, open_writer, scan};
    use super::*;
    use crate::buffer::disk::ackfile::read_ack_file;
    use crate::buffer::disk::segment::{SEGMENT_MAGIC, segment_files};
    use crate::buffer::storage::FaultStorage;

    const FORTY: &str = "0123456789012345678901234567890123456789";

    fn ack_file(dir: &Path) -> Option<u64> {
        read_ack_file(dir).expect("ack").map(|(_, seq)| seq)
    }

    #[test]
    fn a_fully_acknowledged_newest_segment_past_the_fraction_is_cut_and_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1024);
        assert!(append(&mut writer, &[&[FORTY; 10]])[0].is_ok());
        shared.lock().ack_next = 10;
        assert!(writer.persist_ack_and_delete());
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 10)]
        );
        assert_eq!(
            std::fs::read(segment_path(dir.path(), 10)).expect("read"),
            SEGMENT_MAGIC
        );
        assert_eq!(ack_file(dir.path()), Some(10));
        {
            let state = shared.lock();
            assert_eq!(state.bytes, MAGIC_LEN);
            assert_eq!(state.segments[0].first_seq, 10);
        }
        // The next append goes on in the reused file.
        assert!(append(&mut writer, &[&["next"]])[0].is_ok());
        assert_eq!(scan(dir.path(), 10).next_seq, Some(11));
    }

    #[test]
    fn a_small_acknowledged_segment_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1024);
        assert!(append(&mut writer, &[&["a"]])[0].is_ok());
        shared.lock().ack_next = 1;
        assert!(writer.persist_ack_and_delete());
        assert_eq!(ack_file(dir.path()), Some(1));
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 0)]
        );
        assert_eq!(scan(dir.path(), 0).next_seq, Some(1));
    }

    #[test]
    fn a_read_in_progress_holds_the_reuse_off_until_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1024);
        assert!(append(&mut writer, &[&[FORTY; 10]])[0].is_ok());
        shared.lock().ack_next = 10;
        let reading = shared.lock_reader();
        assert!(!writer.persist_ack_and_delete(), "to be tried again");
        assert_eq!(scan(dir.path(), 0).next_seq, Some(10), "not cut");
        assert_eq!(ack_file(dir.path()), Some(10), "the ack file comes first");
        drop(reading);
        assert!(writer.persist_ack_and_delete());
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 10)]
        );
    }

    #[test]
    fn on_a_full_disk_a_delivered_segment_is_reused_and_the_next_append_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        // Far below the fraction: only the failing writes make the reuse worthwhile.
        let (shared, mut writer) = open_writer(dir.path(), &storage, 1 << 20);
        assert!(append(&mut writer, &[&["a", "b", "c"]])[0].is_ok());
        shared.lock().ack_next = 3;
        storage.fill_after(0);
        let failed = append(&mut writer, &[&["d"]]);
        assert_eq!(
            failed[0].as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(28))
        );
        assert!(!shared.writable.load(Ordering::Relaxed));
        assert!(writer.persist_ack_and_delete());
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 3)]
        );
        assert!(append(&mut writer, &[&["d"]])[0].is_ok());
        assert_eq!(scan(dir.path(), 3).next_seq, Some(4));
        assert!(shared.writable.load(Ordering::Relaxed));
    }
}
