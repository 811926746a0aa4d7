//! Opening a queue directory: what is on disk becomes the queue's starting state.
//!
//! Steps, in this order: list the segments; read the `ack` file; remove empty older segments
//! (a crash right after creating one); read the newest segment whole, find its last whole
//! record and its highest ack record, and cut a torn tail; settle the ack position and the
//! next sequence; continue the newest segment, or rename it (empty) or start a new one; delete
//! the segments wholly behind the ack position; fsync the directory. Then the shared state and
//! the writer are built from the result, and the `ack` file is written if it is missing or
//! behind the position recovery settled on.
//!
//! Invariants kept here:
//! - Only the newest segment is read whole; of older ones only the length is taken: they are
//!   trusted by their names, and their records are checked as they are read (`reader.rs`).
//! - The ack position is the higher of the `ack` file's and the highest ack record in the
//!   newest segment. Positions ahead of the records mean everything was delivered (an empty
//!   newest segment behind the position is a reuse a crash cut short, renamed here without a
//!   warning); positions behind the oldest segment mean missing segments, counted as lost.
//! - Sequences inside a segment stay contiguous: when the newest segment cannot take the next
//!   sequence, it is renamed if it holds no message (needs no free block), or a new segment
//!   starts, opening with an ack record when the `ack` file does not hold the position.
//! - The `ack` file is fsync'd before anything is deleted on its strength (a process that
//!   crashed may have left an unsynced write in the page cache). Its ranges move the position
//!   when they reach it; ranges at or past the next sequence are dropped, since new messages
//!   take those sequences.
//! - Nothing found on disk makes opening refuse or loop; only I/O errors do.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::ackfile::{AckFile, MAX_FILE_RANGES};
use super::ranges::AckRanges;
use super::reader::Reader;
use super::segment::{
    MAGIC_LEN, SEGMENT_MAGIC, list_segments, read_whole, scan_segment, segment_head, segment_path,
};
use super::writer::Writer;
use super::{Counters, DiskQueueConfig, Segment, Seq, Shared, State};
use crate::buffer::storage::{OpenMode, Storage};

/// What the writer needs to know about the newest segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewestSegment {
    /// The highest ack record in it.
    pub(super) ack_in_log: Option<Seq>,
    /// It has the old magic: no ack record may be written into it.
    pub(super) v1: bool,
    /// Where its message records start (after the magic and a leading ack record): while its
    /// length is no more than this, it holds no message.
    pub(super) data_start: u64,
}

impl Default for NewestSegment {
    fn default() -> Self {
        NewestSegment {
            ack_in_log: None,
            v1: false,
            data_start: MAGIC_LEN,
        }
    }
}

/// What recovery settled on disk: everything the queue starts from.
pub(super) struct Recovered {
    /// Oldest first; the last one takes the appends.
    pub(super) segments: VecDeque<Segment>,
    /// Sequence the next appended record gets.
    pub(super) next_seq: Seq,
    /// First unacknowledged sequence.
    pub(super) ack_pos: Seq,
    /// Acknowledged ranges above it, from the `ack` file, cut at `next_seq`.
    pub(super) ranges: AckRanges,
    pub(super) ack: AckFile,
    pub(super) newest: NewestSegment,
}

/// The segments as found: older ones as named, the newest cut after its last whole record.
struct Found {
    segments: VecDeque<Segment>,
    /// Sequence after the newest segment's last message (its name when it holds none);
    /// `None` when there is no segment.
    end: Option<Seq>,
    /// The newest segment holds no message record.
    newest_is_empty: bool,
    newest: NewestSegment,
}

/// Opens the queue directory: recovers it and builds the shared state and the writer (whose
/// thread the caller starts).
pub(super) fn open(
    config: DiskQueueConfig,
    storage: Arc<dyn Storage>,
) -> io::Result<(Arc<Shared>, Writer)> {
    let counters = Counters::default();
    let recovered = recover(&*storage, &config.dir, &counters)?;
    let ack_pos = recovered.ack_pos;
    let bytes = recovered.segments.iter().map(|s| s.len).sum();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            segments: recovered.segments,
            durable_seq: recovered.next_seq,
            ack_next: ack_pos,
            ranges: recovered.ranges,
            acks: 0,
            bytes,
            reserved: 0,
            closed: false,
        }),
        reader: Mutex::new(Reader {
            next_seq: ack_pos,
            open: None,
        }),
        ready: Mutex::new(VecDeque::new()),
        read_next: AtomicU64::new(ack_pos),
        appended: Notify::new(),
        freed: Notify::new(),
        counters,
        config,
        storage,
        writable: AtomicBool::new(true),
        ack_signalled: AtomicBool::new(false),
        volatile: recovered.ack.volatile(),
        acks_written: AtomicU64::new(0),
        volatile_busy: AtomicBool::new(false),
        fetching: AtomicBool::new(false),
        fetched: Notify::new(),
        #[cfg(test)]
        reads_started: AtomicU64::new(0),
    });
    let mut writer = Writer::new(
        shared.clone(),
        recovered.next_seq,
        recovered.ack,
        recovered.newest,
    )?;
    writer.settle_ack_file(ack_pos);
    Ok((shared, writer))
}

/// Recovers `dir` (created if missing) as the module head describes.
pub(super) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    counters: &Counters,
) -> io::Result<Recovered> {
    storage.create_dir_all(dir)?;
    let names = list_segments(storage, dir)?;
    let (mut ack, ranges) = AckFile::read(storage, dir)?;
    if let Err(e) = ack.sync_found(storage) {
        // Only a power cut in the next moments could then bring back an older position.
        tracing::warn!(dir = %dir.display(), error = %e, "buffer recovery: cannot fsync the ack file");
    }
    let mut found = find_segments(storage, &names, counters)?;
    let first_seq = found.segments.front().map(|s| s.first_seq);
    let (ack_pos, next_seq) = settle_positions(
        dir,
        first_seq,
        found.end.unwrap_or(0),
        ack.holds().max(found.newest.ack_in_log),
        found.newest_is_empty,
        counters,
    );
    // Ranges past the records are stale (the records they named were lost): sequences from
    // `next_seq` on are given to new messages.
    let mut ranges = AckRanges::from_list(&ranges, ack_pos);
    let stale = ranges.cut_at(next_seq);
    let ack_pos = ranges.advance(ack_pos);
    if stale {
        // Every slot, so none keeps a range that new messages' sequences would fall in.
        let kept = ranges.lowest(MAX_FILE_RANGES);
        for _ in 0..2 {
            ack.write(storage, ack_pos, &kept)?;
        }
        ack.volatile()
            .write_with(storage, || (ack_pos, kept.clone()))?;
    }
    if found.end != Some(next_seq) {
        let carried = (ack.holds() < Some(ack_pos)).then_some(ack_pos);
        continue_at(storage, dir, &mut found, next_seq, carried)?;
    }
    // Delete segments wholly behind the ack position.
    let segments = &mut found.segments;
    while segments.len() > 1 && segments[1].first_seq <= ack_pos {
        if let Some(old) = segments.pop_front() {
            storage.remove_file(&old.path)?;
        }
    }
    storage.sync_dir(dir)?;
    Ok(Recovered {
        segments: found.segments,
        next_seq,
        ack_pos,
        ranges,
        ack,
        newest: found.newest,
    })
}

/// Lists what the segments hold: older ones by their length (an empty one is removed), the
/// newest one read whole and cut after its last whole record.
fn find_segments(
    storage: &dyn Storage,
    names: &[(Seq, PathBuf)],
    counters: &Counters,
) -> io::Result<Found> {
    let mut found = Found {
        segments: VecDeque::new(),
        end: None,
        newest_is_empty: false,
        newest: NewestSegment::default(),
    };
    let Some(((newest_seq, newest_path), older)) = names.split_last() else {
        return Ok(found);
    };
    for (first_seq, path) in older {
        let len = storage.open(path, OpenMode::Read)?.size()?;
        if len <= MAGIC_LEN {
            // An empty older segment (crash right after creating it) holds nothing.
            storage.remove_file(path)?;
            continue;
        }
        found.segments.push_back(Segment {
            first_seq: *first_seq,
            path: path.clone(),
            len,
        });
    }
    let (segment, end, has_messages, newest) =
        recover_newest(storage, *newest_seq, newest_path, counters)?;
    found.segments.push_back(segment);
    found.end = Some(end);
    found.newest_is_empty = !has_messages;
    found.newest = newest;
    Ok(found)
}

/// Reads the newest segment whole, cuts it after its last whole record (or rewrites a
/// missing header), and fsyncs it. Returns it, the sequence after its last message, whether
/// it holds any message, and what the writer needs to know about it.
fn recover_newest(
    storage: &dyn Storage,
    first_seq: Seq,
    path: &Path,
    counters: &Counters,
) -> io::Result<(Segment, Seq, bool, NewestSegment)> {
    let bytes = read_whole(storage, path)?;
    let scan = scan_segment(&bytes);
    let corrupt = scan.corrupt_bytes + scan.tail_bytes;
    if corrupt > 0 {
        counters.corrupt_bytes.fetch_add(corrupt, Ordering::Relaxed);
        tracing::warn!(
            file = %path.display(), valid_bytes = scan.valid_end, corrupt_bytes = scan.corrupt_bytes,
            torn_tail_bytes = scan.tail_bytes,
            "buffer recovery: cutting the newest segment after its last whole record"
        );
    }
    let file = storage.open(path, OpenMode::Write)?;
    if scan.valid_end < MAGIC_LEN {
        // No valid header (empty or garbage): start the file afresh.
        file.set_len(0)?;
        file.write_all_at(SEGMENT_MAGIC, 0)?;
    } else if scan.valid_end < bytes.len() as u64 {
        file.set_len(scan.valid_end)?;
    }
    file.sync_all()?;
    let end = scan.next_seq.unwrap_or(first_seq).max(first_seq);
    let len = scan.valid_end.max(MAGIC_LEN);
    let has_messages = scan.next_seq.is_some();
    let newest = NewestSegment {
        ack_in_log: scan.ack,
        v1: scan.v1,
        data_start: if has_messages { MAGIC_LEN } else { len },
    };
    let segment = Segment {
        first_seq,
        path: path.to_owned(),
        len,
    };
    Ok((segment, end, has_messages, newest))
}

/// Where the queue resumes, as `(ack position, next sequence)`, from the oldest segment's
/// name, the sequence after the newest segment's last message (`end`) and the ack position on
/// disk. A position ahead of the records means all was delivered; one behind the oldest
/// segment means segments are missing, and their records are counted as lost.
fn settle_positions(
    dir: &Path,
    first_seq: Option<Seq>,
    end: Seq,
    on_disk: Option<Seq>,
    newest_is_empty: bool,
    counters: &Counters,
) -> (Seq, Seq) {
    let first_seq = first_seq.unwrap_or(end);
    let mut next_seq = end;
    let mut ack_pos = on_disk.unwrap_or(first_seq);
    if ack_pos > next_seq {
        // An empty newest segment behind the ack position is a reuse that a crash cut
        // short (see the invariants): nothing to warn about.
        if !newest_is_empty {
            tracing::warn!(
                dir = %dir.display(), ack = ack_pos, end = next_seq,
                "buffer recovery: the ack file is ahead of the records; treating everything as delivered"
            );
        }
        next_seq = ack_pos;
    }
    if ack_pos < first_seq {
        let lost = first_seq - ack_pos;
        counters.lost.fetch_add(lost, Ordering::Relaxed);
        tracing::warn!(
            dir = %dir.display(), lost,
            "buffer recovery: segments before {} are missing; their records are lost",
            segment_path(dir, first_seq).display()
        );
        ack_pos = first_seq;
    }
    (ack_pos, next_seq)
}

/// The newest segment cannot take `next_seq` (there is none, or the ack position moved past
/// its end): renames it when it holds no message, which needs no free block (the disk may be
/// full), or else starts a new segment, opening with an ack record for `carried`, so the
/// newest segment never holds less than the segment before it.
fn continue_at(
    storage: &dyn Storage,
    dir: &Path,
    found: &mut Found,
    next_seq: Seq,
    carried: Option<Seq>,
) -> io::Result<()> {
    let to = segment_path(dir, next_seq);
    if found.newest_is_empty
        && let Some(last) = found.segments.back_mut()
    {
        storage.rename(&last.path, &to)?;
        last.first_seq = next_seq;
        last.path = to;
        return Ok(());
    }
    let head = segment_head(carried);
    let file = storage.open(&to, OpenMode::Create)?;
    file.write_all_at(&head, 0)?;
    file.sync_all()?;
    let len = head.len() as u64;
    found.newest = NewestSegment {
        ack_in_log: carried,
        v1: false,
        data_start: len,
    };
    found.segments.push_back(Segment {
        first_seq: next_seq,
        path: to,
        len,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::disk::ackfile::{read_ack_contents, read_ack_file};
    use crate::buffer::disk::segment::segment_files;
    use crate::buffer::disk::segment::tests::segment_bytes;
    use crate::buffer::disk::tests::config;
    use crate::buffer::record;
    use crate::buffer::storage::{FaultStorage, RealStorage};

    fn write_ack(dir: &Path, position: Seq) {
        AckFile::read(&RealStorage, dir)
            .and_then(|(mut ack, _)| ack.write(&RealStorage, position, &[]))
            .expect("write ack file");
    }

    fn recover_dir(dir: &Path) -> (Recovered, Counters) {
        let counters = Counters::default();
        let recovered = recover(&RealStorage, dir, &counters).expect("recover");
        (recovered, counters)
    }

    fn firsts(recovered: &Recovered) -> Vec<Seq> {
        recovered.segments.iter().map(|s| s.first_seq).collect()
    }

    #[test]
    fn an_empty_newest_segment_behind_the_ack_position_is_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A reuse cut segment-0 to its header, and a crash came before the rename.
        std::fs::write(segment_path(dir.path(), 0), SEGMENT_MAGIC).expect("write");
        write_ack(dir.path(), 5);
        let (recovered, counters) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (5, 5));
        assert_eq!(firsts(&recovered), [5]);
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 5)]
        );
        assert_eq!(
            std::fs::read(segment_path(dir.path(), 5)).expect("read"),
            SEGMENT_MAGIC
        );
        assert_eq!(counters.lost.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_ack_position_past_the_records_starts_a_new_segment_and_deletes_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = segment_bytes(&[(0, "a"), (1, "b"), (2, "c")]);
        std::fs::write(segment_path(dir.path(), 0), &bytes).expect("write");
        write_ack(dir.path(), 10);
        let (recovered, _) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (10, 10));
        assert_eq!(
            segment_files(dir.path()).expect("list"),
            [segment_path(dir.path(), 10)]
        );
        // The ack file holds the position: the new segment needs no ack record.
        assert_eq!(
            std::fs::read(segment_path(dir.path(), 10)).expect("read"),
            SEGMENT_MAGIC
        );
        assert_eq!(recovered.newest.data_start, MAGIC_LEN);
    }

    #[test]
    fn acked_ranges_move_the_position_and_those_past_the_records_are_erased() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = segment_bytes(&[(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]);
        std::fs::write(segment_path(dir.path(), 0), &bytes).expect("write");
        // Two writes: the stale range is in both slots.
        let (mut ack, _) = AckFile::read(&RealStorage, dir.path()).expect("read");
        ack.write(&RealStorage, 1, &[(1, 2), (3, 4), (6, 9)])
            .expect("write");
        ack.write(&RealStorage, 1, &[(1, 2), (3, 4), (6, 9)])
            .expect("write");
        let (recovered, _) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (2, 5));
        assert_eq!(recovered.ranges.lowest(10), [(3, 4)]);
        let on_disk = read_ack_contents(dir.path()).expect("ack");
        assert!(
            on_disk.ranges.iter().all(|&(_, end)| end <= 5),
            "{:?}",
            on_disk.ranges
        );
    }

    #[test]
    fn a_torn_tail_of_the_newest_segment_is_cut_on_disk_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let whole = segment_bytes(&[(0, "a"), (1, "b")]);
        let torn = segment_bytes(&[(0, "a"), (1, "b"), (2, "c")]);
        let cut = whole.len() + (torn.len() - whole.len()) / 2;
        std::fs::write(segment_path(dir.path(), 0), &torn[..cut]).expect("write");
        let (recovered, counters) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (0, 2));
        assert_eq!(
            std::fs::read(segment_path(dir.path(), 0)).expect("read"),
            whole
        );
        assert_eq!(recovered.segments[0].len, whole.len() as u64);
        assert_eq!(
            counters.corrupt_bytes.load(Ordering::Relaxed),
            (cut - whole.len()) as u64
        );
    }

    #[test]
    fn a_newest_segment_without_a_header_starts_afresh_under_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(segment_path(dir.path(), 7), b"garbage, not a segment").expect("write");
        let (recovered, _) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (7, 7));
        assert_eq!(
            std::fs::read(segment_path(dir.path(), 7)).expect("read"),
            SEGMENT_MAGIC
        );
    }

    #[test]
    fn an_empty_older_segment_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(segment_path(dir.path(), 0), SEGMENT_MAGIC).expect("write");
        let newest = segment_bytes(&[(3, "d"), (4, "e")]);
        std::fs::write(segment_path(dir.path(), 3), &newest).expect("write");
        let (recovered, counters) = recover_dir(dir.path());
        assert_eq!(firsts(&recovered), [3]);
        assert_eq!((recovered.ack_pos, recovered.next_seq), (3, 5));
        assert!(!segment_path(dir.path(), 0).exists());
        assert_eq!(counters.lost.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn missing_segments_before_the_oldest_are_counted_as_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let newest = segment_bytes(&[(5, "f"), (6, "g")]);
        std::fs::write(segment_path(dir.path(), 5), &newest).expect("write");
        write_ack(dir.path(), 2);
        let (recovered, counters) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (5, 7));
        assert_eq!(counters.lost.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_newest_segment_s_ack_record_beats_an_older_ack_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let older = segment_bytes(&[(0, "a"), (1, "b")]);
        std::fs::write(segment_path(dir.path(), 0), &older).expect("write");
        let mut newest = segment_bytes(&[(2, "c"), (3, "d")]);
        record::encode_ack(3, &mut newest);
        std::fs::write(segment_path(dir.path(), 2), &newest).expect("write");
        write_ack(dir.path(), 1);
        let (recovered, _) = recover_dir(dir.path());
        assert_eq!((recovered.ack_pos, recovered.next_seq), (3, 4));
        assert_eq!(recovered.newest.ack_in_log, Some(3));
        // Segment 0 is wholly behind position 3.
        assert_eq!(firsts(&recovered), [2]);
        assert!(!segment_path(dir.path(), 0).exists());
    }

    #[test]
    fn a_fresh_directory_gets_a_first_segment_and_an_ack_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue_dir = dir.path().join("rule");
        let storage = FaultStorage::new();
        let (shared, _writer) = open(config(&queue_dir), Arc::new(storage.clone())).expect("open");
        let first = segment_path(&queue_dir, 0);
        assert_eq!(
            segment_files(&queue_dir).expect("list"),
            [segment_path(&queue_dir, 0)]
        );
        let scan = scan_segment(&std::fs::read(&first).expect("read"));
        assert_eq!((scan.next_seq, scan.ack), (None, Some(0)));
        assert_eq!(read_ack_file(&queue_dir).expect("ack"), Some((1, 0)));
        assert_eq!(storage.syncs_of("ack"), 1);
        let state = shared.lock();
        assert_eq!((state.durable_seq, state.ack_next), (0, 0));
    }

    #[test]
    fn an_ack_file_that_cannot_be_created_does_not_stop_the_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(segment_path(dir.path(), 0), segment_bytes(&[(0, "a")])).expect("write");
        let storage = FaultStorage::new();
        // Room for nothing new: the ack file cannot get its slots.
        storage.fill_after(0);
        let (shared, _writer) = open(config(dir.path()), Arc::new(storage.clone())).expect("open");
        assert_eq!(shared.lock().durable_seq, 1);
        assert_eq!(read_ack_file(dir.path()).expect("ack"), None);
    }
}
