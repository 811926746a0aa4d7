//! The durable queue: a FIFO of records in segment files, one directory per rule.
//!
//! # On disk
//!
//! ```text
//! <buffer.dir>/<rule>/
//!     segment-00000000000000000000.log   records with sequence numbers from 0
//!     segment-00000000000000052311.log   records from 52311 (the name is its first sequence)
//!     ack                                the first unacknowledged sequence number and the
//!                                        acknowledged ranges above it (see ackfile.rs)
//!     dead-letters.jsonl                 events Lambda can never accept (see deadletter.rs)
//! ```
//!
//! A segment starts with the 8-byte magic `MLBSEG02`, followed by records (`record.rs`: length,
//! CRC32C, sequence number, then a message, or an ack record: the first unacknowledged
//! sequence, marked by QoS 0xAC). Segments with the magic `MLBSEG01` (written before ack
//! records existed) are read as before and never appended to: the first append after start-up
//! begins a new segment. An older binary cannot read `MLBSEG02` segments: to downgrade, drain
//! the buffer first. The `ack` file holds three slots, each a 24-byte header (generation, first
//! unacknowledged sequence, CRC32C) and up to 84 acknowledged ranges above that position: two
//! for fsync'd writes, written alternately, and one for writes without an fsync; an update
//! never overwrites the slot holding the last fsync'd state, so a torn write leaves it intact. A binary from before the ranges reads the headers and ignores the ranges (it
//! replays them; see `ackfile.rs`). The file is created when the queue opens, so that
//! recording an ack later never needs a free block.
//!
//! # Invariants
//!
//! - Sequence numbers grow by one per message record, across segments (ack records take
//!   none, and readers skip them: never a gap, a loss or corruption); a segment holds only sequences
//!   from its name up to the next segment's name. Records at or past the next segment's name
//!   can only be what an append whose fsync failed left behind: readers skip them.
//! - A record is handed to a reader only once it is fsync'd: `append` returns, and the MQTT
//!   message is acknowledged, only after that. An append whose write or fsync fails returns the
//!   error, and the bytes it wrote are cut off the file before anything else happens.
//! - After a failed fsync the segment file takes no more appends: the next append starts a new
//!   segment file. Linux may drop the pages it could not write and report success for a later
//!   fsync of the same file, so nothing written there after the failure could be trusted.
//! - The ack position on disk is the higher of the `ack` file's and the highest ack record in
//!   the newest segment. Under steady appends the position rides in each group commit: when it
//!   moved past what is on disk, one ack record follows the messages in the same write and the
//!   same fsync (no extra fsync, 36 bytes). When appends pause, it reaches the `ack` file within
//!   [`ACK_PERSIST_INTERVAL`] of the `ack` (one `pwrite`, one fdatasync; at most one per
//!   interval, none while appends keep coming). The `ack` file is also written at `close`, at
//!   open when it is missing or behind what recovery found, and before a segment is reused. A
//!   crash (kill -9 or power cut) therefore delivers again what was in flight plus what was
//!   acknowledged since the last group commit (or, when appends had paused, in the last
//!   interval), and never skips a record that was not acknowledged: an ack record only ever
//!   holds a position that was acknowledged, and it is durable only with its group commit.
//! - Delivery acknowledges in order through a low-water mark, and also each event Lambda
//!   accepted ahead of an older one still in flight ([`Queue::ack_range`]): those ranges live
//!   beside the position (`ranges.rs` in memory, up to [`MAX_RANGES`]; the lowest 84 in the
//!   `ack` file) and recovery skips the records inside them. The position absorbs a range it
//!   reaches. Every [`ACK_WRITE_EVERY`] acks the position and ranges go into the `ack` file's
//!   third slot with one `pwrite` and no fsync, on a blocking thread of the acking side (never
//!   behind the writer thread's fsyncs): a process crash (kill -9, OOM, panic) keeps the page cache,
//!   so it replays at most what was in flight plus [`ACK_WRITE_EVERY`]. The fsync follows
//!   within [`ACK_PERSIST_INTERVAL`] (at most one per interval for a trickle of acks), or at
//!   once when [`ACK_SYNC_EVERY`] acks are not durable: a power cut replays at most what was in
//!   flight plus [`ACK_SYNC_EVERY`], at any rate; a full speed drain costs one fdatasync of one
//!   block per [`ACK_SYNC_EVERY`] messages. Group commits carry the position only; while ranges
//!   are not on disk, the `ack` file is synced as when appends pause.
//! - The newest segment holds the newest position the log carried: a new segment written while
//!   the `ack` file is behind opens with an ack record, in the same write and fsync as its
//!   magic. So recovery, which reads only the newest segment, never finds less than the
//!   position older segments were deleted on the strength of.
//! - The segment files of a queue never hold more than `max_size` bytes together, however many
//!   appends land in one group commit: each is admitted against what is on disk, what the
//!   group already took and [`GROUP_OVERHEAD`] (`writer/admit.rs`); `block` appenders reserve
//!   their bytes before they reach the writer. The one exception is a single append larger
//!   than `max_size` when nothing else is queued (written alone, except under `drop_newest`).
//! - A segment is deleted only when every record in it is acknowledged and that acknowledgement
//!   is on disk — or when `when_full = "drop_oldest"` drops it, and then its unacknowledged
//!   records are counted as dropped. The directory is fsync'd after every create, rename and
//!   delete.
//! - The newest segment is reused in place once every record in it is acknowledged and that
//!   acknowledgement is on disk, and writes are failing (a full disk), or the queue is at its
//!   size cap, or the segment holds at least 1/[`REUSE_FRACTION`] of `segment_size` (so small
//!   acks under normal traffic never touch the directory). Steps, in this order, with no read
//!   in progress: write the position to the `ack` file if only an ack record held it (the cut
//!   removes the segment's ack records); cut it to its header and fsync it; rename it to
//!   `segment-<next sequence>.log`; fsync the directory. Cutting and renaming need no free
//!   block, so a full disk recovers by itself, and the next append succeeds. A crash between
//!   any two steps recovers: before the cut, its records are all behind the ack position;
//!   after the cut, an empty newest segment behind the ack position is renamed at start-up;
//!   after the rename, it is an ordinary empty segment (and should a file system keep the
//!   rename but lose the cut, its records are below its name and readers skip them). If the
//!   rename fails, the file keeps its name and takes the following sequences, which the
//!   "from its name" rule above allows.
//!
//! # Life cycle
//!
//! One writer thread per queue owns every file mutation. Appends queue up for it; it writes all
//! pending appends (with `max_ack_delay`, also those coming within the delay of the first:
//! `writer/gather.rs`) and a moved ack position, fsyncs once for all of them (group commit),
//! answers each, and deletes the segments behind the position. When the ack deadline passes while it
//! waits (no append carried the position), it writes the `ack` file, deletes the segments
//! behind it and reuses the newest one if worthwhile. Readers
//! read the fsync'd part of the segments with their own file handle, on tokio's blocking
//! threads, one read at a time per queue; what a read brings in waits in a hand-over list, so
//! a caller that stops waiting (a cancelled `select!` branch) loses nothing. Acks move a shared position (or add a range)
//! and wake the writer; every [`ACK_WRITE_EVERY`] acks they also hand one unsynced `pwrite` of
//! the `ack` file's third slot to a blocking thread.
//!
//! # Recovery
//!
//! Start-up reads only the newest segment (to find its last whole record and its highest ack
//! record, and truncate a torn tail, ack records included) and the `ack` file (fsync'd at
//! once: a crashed process may have left an unsynced write); the ack position is the higher of
//! the two, moved past the ranges it reaches. Ranges past the last record are dropped (their
//! sequences go to new messages). The reader then scans forward within one segment to the
//! ack position. Older segments are trusted by their names and checked as they are read: a corrupt
//! record is skipped by scanning for the next valid one, a missing segment is a gap; both are
//! counted and logged with the file name. Nothing makes recovery refuse to start or loop.
//!
//! # Where each piece lives
//!
//! ```text
//! mod.rs          this text; DiskQueue and its config, the Queue impl, the shared state
//! segment.rs      a segment file: its name, its header, scanning its bytes
//! ackfile.rs      the two-slot `ack` file; the ack position and ranges on disk
//! ranges.rs       the acknowledged ranges above the position (pure)
//! recovery.rs     opening: the newest segment, the ack position, what to cut, rename, delete
//! reader.rs       reads into the hand-over list; skipping ack records, leftovers, corruption
//! append.rs       handing an append to the writer: room for `block`, when its wait starts
//! writer/mod.rs   the writer thread: group commit, rollover, drop_oldest, deleting behind
//! writer/ack.rs   when the ack state goes into the `ack` file, synced or not
//! writer/gather.rs what the writer takes for one group commit; `max_ack_delay`'s wait
//! writer/reuse.rs reusing the newest segment in place
//! ```
//!
//! All file operations go through [`Storage`], so tests can inject faults ([`FaultStorage`]).
//!
//! [`FaultStorage`]: super::storage::FaultStorage

mod ackfile;
mod append;
mod ranges;
mod reader;
mod recovery;
mod segment;
mod writer;

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use super::storage::{RealStorage, Storage};
use super::{Appended, Entry, Queue, QueueError, Seq};
use crate::core::config::WhenFull;
use crate::core::envelope::Message;
use reader::Reader;

pub use ackfile::{
    AckFileContents, MAX_FILE_RANGES, read_ack_contents, read_ack_file, read_ack_position,
};
pub use ranges::MAX_RANGES;
pub use segment::{SEGMENT_MAGIC, SEGMENT_MAGIC_V1, ScanResult, scan_segment, segment_files};
pub use writer::GROUP_OVERHEAD;

/// When no append comes, a moved ack position reaches the `ack` file this long after the `ack`
/// (under steady appends it rides in the next group commit instead, at no extra fsync). Also
/// the least time between two writes of the `ack` file for fewer than [`ACK_SYNC_EVERY`] acks,
/// so a trickle of acks costs an SD card at most ten ack fsyncs a second, and none while
/// appends keep coming and acks come in order.
pub const ACK_PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// A process crash replays at most this many acknowledged messages beyond those in flight:
/// the ack state goes into the `ack` file (one `pwrite`, no fdatasync; the page cache survives
/// a kill -9) each time this many more were acknowledged.
pub const ACK_WRITE_EVERY: u64 = 32;
/// Once this many acks are not durable, the `ack` file is fdatasync'd at once (instead of an
/// interval after the first of them): a power cut replays at most this many acknowledged
/// messages beyond those in flight, at any rate. A full speed drain of 6,000 messages a second
/// costs about 23 fdatasyncs of one 4 KiB block a second.
pub const ACK_SYNC_EVERY: u64 = 256;
/// Default segment size: large enough for sequential writes, small enough that deleting a
/// whole segment frees space in useful steps.
pub const DEFAULT_SEGMENT_SIZE: u64 = 8 * 1024 * 1024;
/// Smallest segment size accepted (tests use tiny ones).
pub const MIN_SEGMENT_SIZE: u64 = 512;
/// A fully acknowledged newest segment is reused in place (cut to its header, renamed) once it
/// holds `segment_size / REUSE_FRACTION` bytes, even when the disk has room: often enough that
/// delivered data does not sit on disk, rarely enough that a steady trickle does not rename a
/// file on every ack.
pub const REUSE_FRACTION: u64 = 2;

/// How a rule's queue behaves.
#[derive(Debug, Clone)]
pub struct DiskQueueConfig {
    /// The rule's directory.
    pub dir: PathBuf,
    /// A new segment starts once the current one reaches this size.
    pub segment_size: u64,
    /// Cap on the bytes of all segments.
    pub max_size: u64,
    /// What to do at the cap.
    pub when_full: WhenFull,
    /// Records older than this are dropped when read (`None`: never).
    pub max_age: Option<Duration>,
    /// How long a group commit may wait for more appends after its first (`buffer.max_ack_delay`;
    /// zero: it never waits). See `writer/gather.rs`.
    pub max_ack_delay: Duration,
}

pub use crate::core::stats::{BufferCounters as Counters, QueueStats};

impl crate::core::stats::BufferReport for DiskQueue {
    fn counters(&self) -> &Counters {
        DiskQueue::counters(self)
    }

    fn stats(&self) -> QueueStats {
        DiskQueue::stats(self)
    }

    fn writable(&self) -> bool {
        DiskQueue::writable(self)
    }

    fn max_bytes(&self) -> u64 {
        self.shared.config.max_size
    }
}

/// One segment file as the queue tracks it.
#[derive(Debug, Clone)]
struct Segment {
    /// Sequence number of its first record (its name; after an interrupted reuse, possibly
    /// lower than its first record).
    first_seq: Seq,
    path: PathBuf,
    /// Durable length in bytes (what readers may read).
    len: u64,
}

/// What appends, reads and acks change together, under one lock.
#[derive(Debug)]
struct State {
    /// Oldest first; the last one is being written.
    segments: VecDeque<Segment>,
    /// All sequences below this are durable and readable.
    durable_seq: Seq,
    /// First unacknowledged sequence.
    ack_next: Seq,
    /// Acknowledged ranges above `ack_next` (events accepted while an older one was in flight).
    ranges: ranges::AckRanges,
    /// Messages acknowledged so far (a running count, for how often the `ack` file is written).
    acks: u64,
    /// Sum of segment lengths.
    bytes: u64,
    /// Bytes of `block` appends admitted and not yet written: an appender reserves its bytes
    /// here when it finds room, so that many appenders cannot take the same room at once.
    reserved: u64,
    /// Set when the writer thread has stopped.
    closed: bool,
}

/// Everything the writer thread and the blocking reads share with the queue handle.
struct Shared {
    state: Mutex<State>,
    /// The disk reader; held for the whole of a blocking read, and by the writer while it
    /// reuses a segment (so no read sees a file being cut).
    reader: Mutex<Reader>,
    /// Entries read from disk and not yet handed out, in order: a read whose caller stopped
    /// waiting leaves its entries here for the next one.
    ready: Mutex<VecDeque<Entry>>,
    /// `reader.next_seq`, readable without waiting for a read in progress.
    read_next: AtomicU64,
    /// Wakes readers when records become durable.
    appended: Notify,
    /// Wakes `block`-mode appenders when space is freed.
    freed: Notify,
    counters: Counters,
    config: DiskQueueConfig,
    storage: Arc<dyn Storage>,
    /// False while the last segment write or fsync failed (for readiness checks).
    writable: AtomicBool,
    /// Set when the ack position moved and the writer was told; the writer clears it when it
    /// takes the message, so a burst of acks sends one message.
    ack_signalled: AtomicBool,
    /// The `ack` file's unsynced slot, written from the acking side.
    volatile: ackfile::VolatileAck,
    /// `State::acks` when the ack state last went into the `ack` file, synced or not.
    acks_written: AtomicU64,
    /// An unsynced write is queued or running.
    volatile_busy: AtomicBool,
    /// A disk read is queued or running (`reader::fill_ready`): at most one per queue, however
    /// many callers stopped waiting for theirs.
    fetching: AtomicBool,
    /// Wakes callers that found a disk read in flight, when it ends.
    fetched: Notify,
    /// Disk reads started so far.
    #[cfg(test)]
    reads_started: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation under this lock is completed before it is released, so a poisoned
        // lock still guards a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_reader(&self) -> MutexGuard<'_, Reader> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_ready(&self) -> MutexGuard<'_, VecDeque<Entry>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the queue handle asks of the writer thread.
enum WriterMsg {
    Append {
        messages: Vec<Message>,
        reply: oneshot::Sender<io::Result<Appended>>,
        /// When it was sent: `max_ack_delay` counts from the first append of a group.
        sent: std::time::Instant,
    },
    /// The ack position moved.
    Acked,
    /// Shutdown has begun: write what waits for `max_ack_delay` now, and wait no more.
    Hurry,
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Stop without persisting the ack position, as a crash would (tests).
    Abandon,
}

/// A durable per-rule queue.
pub struct DiskQueue {
    shared: Arc<Shared>,
    writer: Mutex<mpsc::Sender<WriterMsg>>,
    /// The writer thread, joined by `abandon`.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue")
            .field("dir", &self.shared.config.dir)
            .finish()
    }
}

impl DiskQueue {
    /// Opens (and recovers) the queue in `config.dir`, creating it if needed.
    pub fn open(config: DiskQueueConfig) -> io::Result<DiskQueue> {
        DiskQueue::open_with(config, Arc::new(RealStorage))
    }

    /// [`DiskQueue::open`] on the given storage (tests pass a
    /// [`FaultStorage`](super::storage::FaultStorage)).
    pub fn open_with(config: DiskQueueConfig, storage: Arc<dyn Storage>) -> io::Result<DiskQueue> {
        let (shared, writer) = recovery::open(config, storage)?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(DiskQueue {
            shared,
            writer: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// What the queue counted.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Pending messages, bytes and segments now.
    pub fn stats(&self) -> QueueStats {
        let state = self.shared.lock();
        QueueStats {
            pending: state.durable_seq.saturating_sub(state.ack_next),
            bytes: state.bytes,
            segments: state.segments.len(),
        }
    }

    /// Whether the last segment write and fsync succeeded: false from a failed append (a full
    /// disk, a read-only file system, an I/O error) until an append succeeds again.
    pub fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::Relaxed)
    }

    /// Shutdown has begun: appends waiting for `max_ack_delay` are written now, and later ones
    /// do not wait, so a stop never waits the delay out.
    pub fn hurry(&self) {
        if !self.shared.config.max_ack_delay.is_zero() {
            let _ = self.send(WriterMsg::Hurry);
        }
    }

    /// Persists the ack position and stops the writer; later appends fail.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.send(WriterMsg::Close { reply }).is_ok() {
            let _ = done.await;
        }
    }

    /// Stops the writer without persisting the ack position, as `kill -9` would; appends that
    /// returned are on disk, and an unsynced write of the ack state already started finishes
    /// (a `pwrite` a kill -9 interrupts is torn, which the slot's CRCs catch). For crash tests.
    pub fn abandon(self) {
        while self.shared.volatile_busy.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let _ = self.send(WriterMsg::Abandon);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    fn send(&self, msg: WriterMsg) -> Result<(), QueueError> {
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(msg)
            .map_err(|_| QueueError::Closed)
    }

    /// After [`ACK_WRITE_EVERY`] acks (`acks` is the running count), writes the ack state into
    /// the `ack` file's unsynced slot: one `pwrite` on a blocking thread (never on the runtime,
    /// and never behind the writer thread's fsyncs), so a process crash replays at most that
    /// many acknowledged messages beyond what was in flight.
    fn write_ahead(&self, acks: u64) {
        let written = self.shared.acks_written.load(Ordering::Acquire);
        if acks.saturating_sub(written) < ACK_WRITE_EVERY
            || self.shared.volatile_busy.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || shared.write_volatile())),
            // Not on a runtime (no async caller to hold up): write here.
            Err(_) => shared.write_volatile(),
        }
    }

    /// Tells the writer the ack position moved, once per burst of acks.
    fn signal_ack(&self) {
        if !self.shared.ack_signalled.swap(true, Ordering::AcqRel) {
            // Best effort: when the writer is gone the position is persisted at the next start.
            let _ = self.send(WriterMsg::Acked);
        }
    }
}

pub(super) fn join_error(e: tokio::task::JoinError) -> QueueError {
    QueueError::Io(io::Error::other(format!(
        "the buffer read task stopped: {e}"
    )))
}

impl Queue for DiskQueue {
    async fn append(&self, messages: Vec<Message>) -> Result<Appended, QueueError> {
        self.append_sent(messages, std::time::Instant::now()).await
    }

    async fn append_gathered(&self, messages: Vec<Message>) -> Result<Appended, QueueError> {
        // Its wait is over: as if sent a whole delay ago.
        let now = std::time::Instant::now();
        let sent = now
            .checked_sub(self.shared.config.max_ack_delay)
            .unwrap_or(now);
        self.append_sent(messages, sent).await
    }

    fn max_ack_delay(&self) -> Duration {
        self.shared.config.max_ack_delay
    }

    async fn read(&self, max: usize) -> Result<Vec<Entry>, QueueError> {
        loop {
            let waiting = self.shared.appended.notified();
            let entries = self.read_ready(max).await?;
            if !entries.is_empty() {
                return Ok(entries);
            }
            if self.shared.lock().closed {
                return Err(QueueError::Closed);
            }
            waiting.await;
        }
    }

    async fn read_ready(&self, max: usize) -> Result<Vec<Entry>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if reader::fill_ready(&self.shared, max).await? {
            self.signal_ack();
        }
        // Entries leave the hand-over list only here, after the last await: a caller that stops
        // waiting earlier leaves them for the next read.
        Ok(self.shared.take_ready(max))
    }

    async fn rewind(&self) -> Result<(), QueueError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.rewind())
            .await
            .map_err(join_error)
    }

    async fn ack(&self, through: Seq) -> Result<(), QueueError> {
        let acks = {
            let mut state = self.shared.lock();
            let next = (through + 1).min(state.durable_seq);
            if next <= state.ack_next {
                return Ok(());
            }
            state.acks += next - state.ack_next;
            state.ack_next = state.ranges.advance(next);
            state.acks
        };
        self.write_ahead(acks);
        // A `block`-mode append waits for room or for everything to be acknowledged: this ack
        // may be the second, which frees no file and so wakes nobody else.
        self.shared.freed.notify_waiters();
        self.signal_ack();
        Ok(())
    }

    async fn ack_range(&self, first: Seq, last: Seq) -> Result<(), QueueError> {
        let acks = {
            let mut state = self.shared.lock();
            let end = (last + 1).min(state.durable_seq);
            let position = state.ack_next;
            let added = state.ranges.insert(first, end, position);
            if added == 0 {
                return Ok(());
            }
            state.acks += added;
            state.ack_next = state.ranges.advance(position);
            state.acks
        };
        self.write_ahead(acks);
        self.shared.freed.notify_waiters();
        self.signal_ack();
        Ok(())
    }
}

impl Drop for DiskQueue {
    fn drop(&mut self) {
        let (reply, _done) = oneshot::channel();
        let _ = self.send(WriterMsg::Close { reply });
    }
}

#[cfg(test)]
mod crash_tests;

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;

    /// Small segments, no size pressure, no expiry.
    pub(crate) fn config(dir: &Path) -> DiskQueueConfig {
        DiskQueueConfig {
            dir: dir.to_owned(),
            segment_size: 1024,
            max_size: 1 << 30,
            when_full: WhenFull::Block,
            max_age: None,
            max_ack_delay: Duration::ZERO,
        }
    }

    /// Each entry's payload as text.
    pub(crate) fn payloads(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.message.payload).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn close_persists_the_ack_position_and_a_reopen_resumes_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = DiskQueue::open(config(dir.path())).expect("open");
        let messages = (0..5).map(|i| segment::tests::message(&i.to_string()));
        queue.append(messages.collect()).await.expect("append");
        let read = queue.read(3).await.expect("read");
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
        queue.ack(2).await.expect("ack");
        queue.close().await;
        assert!(matches!(
            queue.append(vec![]).await,
            Ok(Appended {
                stored: 0,
                dropped: 0
            })
        ));
        assert!(
            queue
                .append(vec![segment::tests::message("late")])
                .await
                .is_err()
        );
        assert_eq!(read_ack_position(dir.path()).expect("ack"), Some(3));
        drop(queue);
        let queue = DiskQueue::open(config(dir.path())).expect("reopen");
        let read = queue.read(10).await.expect("read");
        assert_eq!(payloads(&read), ["3", "4"]);
        assert_eq!(read[0].seq, 3);
    }
}
