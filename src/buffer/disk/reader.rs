//! Reading: from the fsync'd part of the segments into the hand-over list, and from there to
//! the caller.
//!
//! A read runs on one of tokio's blocking threads with its own file handle, holding
//! `Shared::reader` for its whole length. It reads many records per `pread`, and more than
//! it was asked for (read-ahead); what it brings in waits in the hand-over list
//! (`Shared::ready`) until a caller takes it.
//!
//! Invariants kept here:
//! - At most one disk read per queue is queued or running ([`fill_ready`]). A caller that
//!   stopped waiting for its read (delivery's `select!` drops it whenever an invocation ends
//!   first) leaves that read running; the next caller waits for it instead of starting another.
//!   So a read starts only when the hand-over list holds fewer entries than asked for, and the
//!   list never holds more than one request plus one read-ahead ([`READ_AHEAD_ENTRIES`],
//!   [`READ_AHEAD_BYTES`]), and a flood of cancelled reads neither piles up blocking threads
//!   nor entries in memory.
//! - Only durable bytes are read: below the segment's length in the shared state, which the
//!   writer moves only after an fsync. Those bytes never change while a segment is open here;
//!   the one thing that rewrites them, reusing the segment, takes the reader lock and closes
//!   it first.
//! - Entries leave the hand-over list only after the caller's last await, so a caller that
//!   stops waiting (a cancelled `select!` branch) loses nothing: the next read returns them.
//! - The hand-over list is filled before the read position is published, so whoever sees the
//!   position finds the entries.
//! - A segment `drop_oldest` deletes while a read is about to open it is skipped like the
//!   records it held (the writer counted them as dropped): the read goes on with what is left.
//! - Each sequence is handed out once, in order. Ack records are skipped (they take no
//!   sequence). A record at or past the next segment's name is a leftover of an append whose
//!   fsync failed and is skipped; a corrupt record is skipped by scanning for the next valid
//!   one; a gap is counted as lost. Each is logged with the file name, and none stops a read.
//! - A message inside an acknowledged range above the ack position (`ranges.rs`, read from
//!   the `ack` file at recovery) was delivered before a crash: it is skipped, not handed out.
//! - A message older than `max_age` is dropped and counted; when nothing before it waits to
//!   be delivered, the ack position moves past it.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::segment::MAGIC_LEN;
use super::{Entry, QueueError, Segment, Seq, Shared, join_error};
use crate::buffer::record::{self, Decoded};
use crate::buffer::storage::{OpenMode, StorageFile};
use crate::core::clock::Reading;
use crate::core::envelope::Message;

/// A read from disk goes on past what was asked for, up to this many records or
/// [`READ_AHEAD_BYTES`]: the rest waits in memory for the next read, which then needs no trip to
/// a blocking thread.
const READ_AHEAD_ENTRIES: usize = 1000;
/// See [`READ_AHEAD_ENTRIES`]; bounds the memory a read-ahead holds.
const READ_AHEAD_BYTES: usize = 1024 * 1024;
/// Bytes a reader takes from a segment file at a time (many records per `pread`).
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read at a time while scanning past corruption.
const SCAN_CHUNK: usize = 64 * 1024;

/// Brings entries into the hand-over list until it holds `max` or the disk holds nothing more
/// that is durable, with at most one disk read per queue in flight (see the invariants).
/// Returns whether expiry moved the ack position.
pub(super) async fn fill_ready(shared: &Arc<Shared>, max: usize) -> Result<bool, QueueError> {
    loop {
        if shared.to_fetch(max) == 0 {
            return Ok(false);
        }
        let ended = shared.fetched.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if shared.fetching.swap(true, Ordering::AcqRel) {
            // Another read (perhaps one whose caller stopped waiting) is bringing entries in.
            ended.await;
            continue;
        }
        let fetching = Fetching(shared.clone());
        // Asked again now that no other read can be filling the list.
        let fetch = shared.to_fetch(max);
        if fetch == 0 {
            return Ok(false);
        }
        #[cfg(test)]
        shared.reads_started.fetch_add(1, Ordering::Relaxed);
        return tokio::task::spawn_blocking(move || fetching.0.read_into_ready(fetch))
            .await
            .map_err(join_error)?;
    }
}

/// The one disk read of a queue in flight: ends it, and wakes whoever waits, when dropped.
struct Fetching(Arc<Shared>);

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.fetching.store(false, Ordering::Release);
        self.0.fetched.notify_waiters();
    }
}

/// The reader's position: which segment file is open and where.
#[derive(Default)]
pub(super) struct Reader {
    /// Next sequence to read from disk.
    pub(super) next_seq: Seq,
    /// The open segment, if any.
    pub(super) open: Option<OpenSegment>,
}

/// A segment file being read, with the bytes read ahead of the position.
pub(super) struct OpenSegment {
    /// The segment's first sequence (its name).
    first_seq: Seq,
    file: Box<dyn StorageFile>,
    /// Byte offset of `next_seq`'s record (or of the next record to examine).
    offset: u64,
    /// Bytes of the file from `buf_at`, read [`READ_CHUNK`] at a time so that one `pread`
    /// brings in many records. Only durable bytes are read (below the segment's length at the
    /// time), and those never change while the segment is open here: the one thing that
    /// rewrites them, reusing the segment, closes it first (`Reader::open = None`).
    buf: Vec<u8>,
    buf_at: u64,
}

impl OpenSegment {
    fn new(first_seq: Seq, file: Box<dyn StorageFile>) -> Self {
        OpenSegment {
            first_seq,
            file,
            offset: MAGIC_LEN,
            buf: Vec::new(),
            buf_at: 0,
        }
    }

    /// The valid record at the current offset, if one is there and ends by `limit`.
    fn record(&mut self, limit: u64) -> io::Result<Option<Found>> {
        let offset = self.offset;
        let Some(header) = self.bytes(offset, record::HEADER_LEN, limit)? else {
            return Ok(None);
        };
        let Some(len) = record::claimed_len(header) else {
            return Ok(None);
        };
        let Some(bytes) = self.bytes(offset, len, limit)? else {
            return Ok(None);
        };
        Ok(found(record::decode(bytes)))
    }

    /// The `len` bytes at `at`, when they end by `limit`; read from the file only when the
    /// buffer does not hold them.
    fn bytes(&mut self, at: u64, len: usize, limit: u64) -> io::Result<Option<&[u8]>> {
        let end = at + len as u64;
        if end > limit {
            return Ok(None);
        }
        let buffered = at >= self.buf_at && end <= self.buf_at + self.buf.len() as u64;
        if !buffered {
            let take = (limit - at).min(len.max(READ_CHUNK) as u64) as usize;
            self.buf.clear();
            self.buf.resize(take, 0);
            if let Err(e) = self.file.read_exact_at(&mut self.buf, at) {
                self.buf.clear();
                return Err(e);
            }
            self.buf_at = at;
        }
        let start = (at - self.buf_at) as usize;
        Ok(self.buf.get(start..start + len))
    }
}

/// A valid record found in a segment.
enum Found {
    /// A message record: its sequence, the message, its length.
    Message(Seq, Message, usize),
    /// An ack record of this length (readers skip it).
    Ack(usize),
}

/// What a decoded record is to a reader: a message, an ack record, or nothing valid.
fn found(decoded: Decoded) -> Option<Found> {
    match decoded {
        Decoded::Record { seq, message, len } => Some(Found::Message(seq, message, len)),
        Decoded::Ack { len, .. } => Some(Found::Ack(len)),
        Decoded::Incomplete | Decoded::Corrupt => None,
    }
}

/// Reads the record at `offset` if a valid one is there and ends by `limit`.
fn read_record_at(file: &dyn StorageFile, offset: u64, limit: u64) -> io::Result<Option<Found>> {
    let mut header = [0u8; record::HEADER_LEN];
    if offset + header.len() as u64 > limit {
        return Ok(None);
    }
    file.read_exact_at(&mut header, offset)?;
    let Some(len) = record::claimed_len(&header) else {
        return Ok(None);
    };
    if offset + len as u64 > limit {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(found(record::decode(&buf)))
}

/// Finds the next offset after `offset` (exclusive) where a valid record starts, before `limit`;
/// returns the bytes skipped and that offset (`limit` when there is none).
fn scan_forward(file: &dyn StorageFile, offset: u64, limit: u64) -> io::Result<(u64, u64)> {
    let mut at = offset + 1;
    while at < limit {
        let take = ((limit - at) as usize).min(SCAN_CHUNK + record::MAX_BODY_LEN.min(SCAN_CHUNK));
        let mut buf = vec![0u8; take];
        file.read_exact_at(&mut buf, at)?;
        for i in 0..buf.len().min(SCAN_CHUNK) {
            if let Some(len) = record::claimed_len(&buf[i..]) {
                let start = at + i as u64;
                if start + len as u64 <= limit && read_record_at(file, start, limit)?.is_some() {
                    return Ok((start - offset, start));
                }
            }
        }
        at += SCAN_CHUNK as u64;
    }
    Ok((limit - offset, limit))
}

/// Where the next record to read lives, as the shared state says now.
struct Place {
    /// The segment holding the reader's next sequence.
    segment: Segment,
    /// The next segment's name: records at or past it belong there.
    next_first: Option<Seq>,
    /// The first unacknowledged sequence.
    ack_next: Seq,
}

/// One step through a segment file.
enum Step {
    /// A message record (the offset is past it).
    Message(Seq, Message, usize),
    /// An ack record or corrupt bytes were stepped over.
    Skipped,
    /// No valid record before the segment's durable length.
    End,
}

/// What one read has gathered so far.
#[derive(Default)]
struct Batch {
    entries: Vec<Entry>,
    bytes: usize,
    /// Expiry moved the ack position.
    ack_moved: bool,
}

impl Batch {
    /// Reads at least `max` records if there are that many, and more up to the read-ahead
    /// limits, so small reads share one trip to a blocking thread.
    fn wants_more(&self, max: usize) -> bool {
        let n = self.entries.len();
        n < max || (n < READ_AHEAD_ENTRIES && self.bytes < READ_AHEAD_BYTES)
    }
}

impl Shared {
    /// Up to `max` entries from the hand-over list, skipping any a drop released meanwhile.
    pub(super) fn take_ready(&self, max: usize) -> Vec<Entry> {
        let ack_next = self.lock().ack_next;
        let mut ready = self.lock_ready();
        while ready.front().is_some_and(|e| e.seq < ack_next) {
            ready.pop_front();
        }
        let n = ready.len().min(max);
        ready.drain(..n).collect()
    }

    /// Moves the read position back to the first unacknowledged sequence and empties the
    /// hand-over list: what an earlier reader took and did not acknowledge is read again
    /// (blocking: waits for a read in progress).
    pub(super) fn rewind(&self) {
        let mut reader = self.lock_reader();
        let ack_next = self.lock().ack_next;
        self.lock_ready().clear();
        reader.next_seq = ack_next;
        reader.open = None;
        self.read_next.store(ack_next, Ordering::Release);
    }

    /// How many records a read of `max` should fetch from disk before it hands out: none when
    /// the hand-over list holds enough, or when the disk holds nothing unread.
    pub(super) fn to_fetch(&self, max: usize) -> usize {
        // The position first: entries are in the hand-over list before it moves.
        let read_next = self.read_next.load(Ordering::Acquire);
        let ready = self.lock_ready().len();
        if ready >= max {
            return 0;
        }
        let state = self.lock();
        if read_next.max(state.ack_next) < state.durable_seq {
            max - ready
        } else {
            0
        }
    }

    /// Reads up to `max` durable records from disk into the hand-over list (blocking file
    /// I/O). Returns whether expiry moved the ack position.
    pub(super) fn read_into_ready(&self, max: usize) -> Result<bool, QueueError> {
        let mut reader = self.lock_reader();
        let result = self.read_available(&mut reader, max);
        // Hand the entries over before publishing the new position: whoever sees the position
        // finds the entries (see `to_fetch`).
        let ack_moved = match result {
            Ok(batch) => {
                let any = !batch.entries.is_empty();
                self.lock_ready().extend(batch.entries);
                if any {
                    // A reader whose read was cancelled is not waiting for these; others may be.
                    self.appended.notify_waiters();
                }
                Ok(batch.ack_moved)
            }
            Err(e) => Err(e),
        };
        self.read_next.store(reader.next_seq, Ordering::Release);
        ack_moved
    }

    /// Reads at least `max` records if there are that many, and more up to
    /// [`READ_AHEAD_ENTRIES`] or [`READ_AHEAD_BYTES`].
    fn read_available(&self, reader: &mut Reader, max: usize) -> Result<Batch, QueueError> {
        let mut batch = Batch::default();
        // One clock reading ages every message of this read (milliseconds apart at most).
        let clock = self.config.max_age.map(|_| crate::core::clock::reading());
        // Acknowledged ahead of the position (found at recovery: in this process's life the
        // reader has passed every range already). Read once; ranges only grow until the
        // position absorbs them.
        let acked = {
            let state = self.lock();
            (!state.ranges.is_empty()).then(|| state.ranges.clone())
        };
        while batch.wants_more(max) {
            let Some(place) = self.place(reader) else {
                break;
            };
            let record = match self.step(reader, &place.segment) {
                Ok(Step::Skipped) => continue,
                Ok(Step::End) => None,
                Ok(Step::Message(seq, message, len)) => Some((seq, message, len)),
                // What was read before the error is handed over (the position is past it);
                // the failed step left the position where it was, so the next read meets the
                // error again, or reads on once it is gone.
                Err(_) if !batch.entries.is_empty() => break,
                Err(e) => return Err(e),
            };
            // The end of this segment: its durable part is read, or what follows belongs to
            // the next segment (the leftovers of an append whose fsync failed).
            let at_end = match &record {
                None => true,
                Some((seq, _, _)) => place.next_first.is_some_and(|next| *seq >= next),
            };
            if at_end {
                if self.leave_segment(reader, &place) {
                    continue;
                }
                break;
            }
            let Some((seq, message, len)) = record else {
                break;
            };
            if seq < reader.next_seq {
                continue;
            }
            if seq > reader.next_seq {
                let path = &place.segment.path;
                self.count_lost(seq - reader.next_seq, path, "a gap in sequence numbers");
            }
            reader.next_seq = seq + 1;
            if acked.as_ref().is_some_and(|r| r.end_of(seq).is_some()) {
                continue;
            }
            if self.drop_if_expired(clock.as_ref(), &message) {
                batch.ack_moved |= self.release_expired(&batch, seq, place.ack_next);
                continue;
            }
            batch.bytes += len;
            batch.entries.push(Entry { seq, message });
        }
        Ok(batch)
    }

    /// The segment holding the reader's next sequence; `None` when nothing durable is left to
    /// read. Skips ahead past what was dropped or acknowledged meanwhile.
    fn place(&self, reader: &mut Reader) -> Option<Place> {
        let state = self.lock();
        if reader.next_seq < state.ack_next {
            // Dropped (drop_oldest) or acknowledged behind our back: skip ahead.
            reader.next_seq = state.ack_next;
            reader.open = None;
        }
        if reader.next_seq >= state.durable_seq {
            return None;
        }
        let (i, segment) = state
            .segments
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| s.first_seq <= reader.next_seq)?;
        Some(Place {
            segment: segment.clone(),
            next_first: state.segments.get(i + 1).map(|n| n.first_seq),
            ack_next: state.ack_next,
        })
    }

    /// Reads the next record of `segment` (opening it when the reader has another open) and
    /// moves the offset past it, or past the corrupt bytes before the next valid one.
    fn step(&self, reader: &mut Reader, segment: &Segment) -> Result<Step, QueueError> {
        let open = match &mut reader.open {
            Some(open) if open.first_seq == segment.first_seq => open,
            slot => match self.storage.open(&segment.path, OpenMode::Read) {
                Ok(file) => slot.insert(OpenSegment::new(segment.first_seq, file)),
                Err(e) if e.kind() == io::ErrorKind::NotFound && self.removed(segment) => {
                    // `drop_oldest` deleted it after `place` looked (it counted the records
                    // as dropped and moved the ack position past them): `place` now finds
                    // what is left.
                    return Ok(Step::Skipped);
                }
                Err(e) => return Err(e.into()),
            },
        };
        if open.offset >= segment.len {
            return Ok(Step::End);
        }
        match open.record(segment.len)? {
            Some(Found::Message(seq, message, len)) => {
                open.offset += len as u64;
                Ok(Step::Message(seq, message, len))
            }
            Some(Found::Ack(len)) => {
                // The writer's bookkeeping, not a message: no sequence, no gap.
                open.offset += len as u64;
                Ok(Step::Skipped)
            }
            None => {
                // Not a valid record here: scan for the next one.
                let (skipped, next) = scan_forward(&*open.file, open.offset, segment.len)?;
                self.counters
                    .corrupt_bytes
                    .fetch_add(skipped, Ordering::Relaxed);
                tracing::warn!(
                    file = %segment.path.display(), offset = open.offset, skipped_bytes = skipped,
                    "buffer: corrupt record skipped"
                );
                open.offset = next;
                Ok(Step::Skipped)
            }
        }
    }

    /// Whether the writer removed `segment` from the queue (`drop_oldest`).
    fn removed(&self, segment: &Segment) -> bool {
        let state = self.lock();
        !state
            .segments
            .iter()
            .any(|s| s.first_seq == segment.first_seq)
    }

    /// Moves the reader to the next segment, counting the sequences this one lacked; false
    /// when this is the newest segment (nothing more to read now).
    fn leave_segment(&self, reader: &mut Reader, place: &Place) -> bool {
        let Some(next) = place.next_first else {
            return false;
        };
        if next > reader.next_seq {
            self.count_lost(
                next - reader.next_seq,
                &place.segment.path,
                "records missing at the end of the segment",
            );
        }
        reader.next_seq = reader.next_seq.max(next);
        reader.open = None;
        true
    }

    /// Whether `message` is older than `buffer.max_age`: then it is counted and logged, and
    /// not handed out.
    fn drop_if_expired(&self, clock: Option<&Reading>, message: &Message) -> bool {
        let (Some(max_age), Some(clock)) = (self.config.max_age, clock) else {
            return false;
        };
        // Not `now - received_at`: a clock stepped by NTP must not expire a backlog stamped
        // before it (clock.rs).
        let age = clock.age_of(message.received_at_ms());
        if age <= max_age {
            return false;
        }
        self.counters.expired.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            dir = %self.config.dir.display(), topic = %message.topic, id = %message.id,
            age = %crate::core::clock::human(age), "message older than buffer.max_age: dropped"
        );
        true
    }

    /// Moves the ack position past the expired record `seq` when nothing before it waits to
    /// be delivered (this read's entries, the hand-over list); returns whether it moved.
    fn release_expired(&self, batch: &Batch, seq: Seq, ack_next: Seq) -> bool {
        let nothing_before = batch.entries.is_empty() && self.lock_ready().is_empty();
        if !nothing_before || seq != ack_next {
            return false;
        }
        let mut state = self.lock();
        if state.ack_next <= seq {
            state.ack_next = seq + 1;
            return true;
        }
        false
    }

    fn count_lost(&self, n: u64, path: &Path, why: &str) {
        self.counters.lost.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(file = %path.display(), lost = n, "buffer: {why}; these records cannot be delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::disk::DiskQueue;
    use crate::buffer::disk::segment::segment_path;
    use crate::buffer::disk::segment::tests::{message, segment_bytes};
    use crate::buffer::disk::tests::{config, payloads};
    use crate::buffer::storage::{RealStorage, Storage};

    /// Reads everything durable through the hand-over list, as a blocking read does.
    fn read_all(queue: &DiskQueue) -> Vec<Entry> {
        queue.shared.read_into_ready(100).expect("read");
        queue.shared.take_ready(100)
    }

    fn seqs(entries: &[Entry]) -> Vec<Seq> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn records_at_or_past_the_next_segment_s_name_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        // An append of 3 and 4 to segment 0 whose fsync failed left its records behind; they
        // were written again to segment 3. Record 2 is missing, so the reader is still in
        // segment 0 when it meets the leftovers.
        let older = segment_bytes(&[(0, "0"), (1, "1"), (3, "stale 3"), (4, "stale 4")]);
        std::fs::write(segment_path(dir.path(), 0), older).expect("write");
        let newest = segment_bytes(&[(3, "3"), (4, "4")]);
        std::fs::write(segment_path(dir.path(), 3), newest).expect("write");
        let queue = DiskQueue::open(config(dir.path())).expect("open");
        let read = read_all(&queue);
        assert_eq!(payloads(&read), ["0", "1", "3", "4"]);
        assert_eq!(seqs(&read), [0, 1, 3, 4]);
        assert_eq!(queue.counters().lost.load(Ordering::Relaxed), 1);
        assert_eq!(queue.counters().corrupt_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_corrupt_record_in_an_older_segment_is_skipped_and_its_sequence_counted_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut older = segment_bytes(&[(0, "0"), (1, "1"), (2, "2")]);
        let end_of_1 = segment_bytes(&[(0, "0"), (1, "1")]).len();
        let start_of_1 = segment_bytes(&[(0, "0")]).len();
        older[end_of_1 - 1] ^= 0xFF;
        std::fs::write(segment_path(dir.path(), 0), older).expect("write");
        std::fs::write(segment_path(dir.path(), 3), segment_bytes(&[(3, "3")])).expect("write");
        let queue = DiskQueue::open(config(dir.path())).expect("open");
        let read = read_all(&queue);
        assert_eq!(payloads(&read), ["0", "2", "3"]);
        let counters = queue.counters();
        assert_eq!(counters.lost.load(Ordering::Relaxed), 1);
        assert_eq!(
            counters.corrupt_bytes.load(Ordering::Relaxed),
            (end_of_1 - start_of_1) as u64
        );
    }

    #[test]
    fn ack_records_take_no_sequence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut older = segment_bytes(&[(0, "0")]);
        record::encode_ack(0, &mut older);
        record::encode(1, &message("1"), &mut older);
        std::fs::write(segment_path(dir.path(), 0), older).expect("write");
        std::fs::write(segment_path(dir.path(), 2), segment_bytes(&[(2, "2")])).expect("write");
        let queue = DiskQueue::open(config(dir.path())).expect("open");
        assert_eq!(payloads(&read_all(&queue)), ["0", "1", "2"]);
        assert_eq!(queue.counters().lost.load(Ordering::Relaxed), 0);
        assert_eq!(queue.counters().corrupt_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_read_brings_in_more_than_asked_and_the_rest_waits_in_the_hand_over_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let records: Vec<(Seq, String)> = (0..20).map(|i| (i, i.to_string())).collect();
        let records: Vec<(Seq, &str)> = records.iter().map(|(s, p)| (*s, p.as_str())).collect();
        std::fs::write(segment_path(dir.path(), 0), segment_bytes(&records)).expect("write");
        let queue = DiskQueue::open(config(dir.path())).expect("open");
        let shared = &queue.shared;
        assert_eq!(shared.to_fetch(2), 2);
        shared.read_into_ready(2).expect("read");
        // One trip to the disk read all 20 (read-ahead); a caller that stopped waiting took
        // none of them, so the next read finds them all.
        assert_eq!(shared.to_fetch(2), 0);
        assert_eq!(seqs(&shared.take_ready(2)), [0, 1]);
        assert_eq!(seqs(&shared.take_ready(3)), [2, 3, 4]);
        // An ack (or a drop) releases what waits in the list.
        shared.lock().ack_next = 10;
        assert_eq!(seqs(&shared.take_ready(2)), [10, 11]);
        assert_eq!(shared.take_ready(100).len(), 8);
        assert_eq!(shared.to_fetch(5), 0, "nothing unread on disk");
    }

    #[tokio::test]
    async fn reads_whose_callers_stopped_waiting_run_one_at_a_time_and_bound_the_hand_over_list() {
        use crate::buffer::Queue;
        use crate::buffer::storage::FaultStorage;
        const RECORDS: usize = 5 * READ_AHEAD_ENTRIES;
        let dir = tempfile::tempdir().expect("tempdir");
        let records: Vec<(Seq, String)> = (0..RECORDS).map(|i| (i as Seq, i.to_string())).collect();
        let records: Vec<(Seq, &str)> = records.iter().map(|(s, p)| (*s, p.as_str())).collect();
        std::fs::write(segment_path(dir.path(), 0), segment_bytes(&records)).expect("write");
        let storage = FaultStorage::new();
        let queue =
            DiskQueue::open_with(config(dir.path()), Arc::new(storage.clone())).expect("open");
        // The first read is slow (it opens the segment), as under a flood the reader lock is
        // held while the next caller comes.
        storage.slow_opens(std::time::Duration::from_millis(100));
        // As delivery's loop does when invocations keep ending first: each read is started
        // (polled once) and dropped, unless the hand-over list could answer it at once. (50
        // reads of 10 take less than one read-ahead: however slow this loop, one read is
        // enough.)
        let mut taken = Vec::new();
        for _ in 0..50 {
            let once = tokio::time::timeout(std::time::Duration::ZERO, queue.read_ready(10));
            if let Ok(entries) = once.await {
                taken.extend(seqs(&entries.expect("read")));
            }
        }
        // One read started; the other callers waited for it.
        assert_eq!(queue.shared.reads_started.load(Ordering::Relaxed), 1);
        fill_ready(&queue.shared, 1).await.expect("read");
        let held = queue.shared.lock_ready().len();
        assert!(held <= 10 + READ_AHEAD_ENTRIES, "{held} entries held");
        // Nothing was lost or handed out twice.
        while taken.len() < RECORDS {
            let entries = queue.read_ready(256).await.expect("read");
            assert!(!entries.is_empty(), "the read stopped at {}", taken.len());
            taken.extend(seqs(&entries));
        }
        assert_eq!(taken, (0..RECORDS as Seq).collect::<Vec<_>>());
    }

    /// A segment of messages received `ages` seconds ago, one per sequence from 0.
    fn aged_segment(dir: &std::path::Path, ages: &[u64]) {
        let mut bytes = crate::buffer::disk::SEGMENT_MAGIC.to_vec();
        for (seq, age) in ages.iter().enumerate() {
            let at = std::time::SystemTime::now() - std::time::Duration::from_secs(*age);
            let m = Message::received("t".into(), seq.to_string().into_bytes(), 1, false, at);
            record::encode(seq as Seq, &m, &mut bytes);
        }
        std::fs::write(segment_path(dir, 0), bytes).expect("write");
    }

    fn open_with_max_age(dir: &std::path::Path) -> DiskQueue {
        let config = crate::buffer::disk::DiskQueueConfig {
            max_age: Some(std::time::Duration::from_secs(60)),
            ..config(dir)
        };
        DiskQueue::open(config).expect("open")
    }

    #[test]
    fn expired_messages_at_the_head_are_dropped_and_move_the_ack_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        aged_segment(dir.path(), &[3600, 3600, 0]);
        let queue = open_with_max_age(dir.path());
        assert!(queue.shared.read_into_ready(10).expect("read"), "ack moved");
        assert_eq!(payloads(&queue.shared.take_ready(10)), ["2"]);
        assert_eq!(queue.shared.lock().ack_next, 2);
        assert_eq!(queue.counters().expired.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_expired_message_behind_an_undelivered_one_leaves_the_ack_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        aged_segment(dir.path(), &[0, 3600, 0]);
        let queue = open_with_max_age(dir.path());
        assert!(!queue.shared.read_into_ready(10).expect("read"));
        assert_eq!(payloads(&queue.shared.take_ready(10)), ["0", "2"]);
        assert_eq!(queue.shared.lock().ack_next, 0);
        assert_eq!(queue.counters().expired.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn scanning_past_corruption_finds_the_next_valid_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut bytes = vec![0xAB; 100];
        let record_at = bytes.len() as u64;
        record::encode(9, &message("x"), &mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let file = RealStorage.open(&path, OpenMode::Read).expect("open");
        let limit = bytes.len() as u64;
        assert_eq!(
            scan_forward(&*file, 10, limit).expect("scan"),
            (record_at - 10, record_at)
        );
        assert!(matches!(
            read_record_at(&*file, record_at, limit).expect("read"),
            Some(Found::Message(9, _, _))
        ));
        // Cut off by the limit (not yet durable): no record, and nothing found past it.
        assert!(
            read_record_at(&*file, record_at, limit - 1)
                .expect("read")
                .is_none()
        );
        assert_eq!(
            scan_forward(&*file, 10, limit - 1).expect("scan"),
            (limit - 11, limit - 1)
        );
    }
}
