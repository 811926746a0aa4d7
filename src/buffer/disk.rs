//! The durable queue: a FIFO of records in segment files, one directory per rule.
//!
//! # On disk
//!
//! ```text
//! <buffer.dir>/<rule>/
//!     segment-00000000000000000000.log   records with sequence numbers from 0
//!     segment-00000000000000052311.log   records from 52311 (the name is its first sequence)
//!     ack                                the first unacknowledged sequence number (when idle)
//!     dead-letters.jsonl                 events Lambda can never accept (see deadletter.rs)
//! ```
//!
//! A segment starts with the 8-byte magic `MLBSEG02`, followed by records (`record.rs`: length,
//! CRC32C, sequence number, then a message, or an ack record: the first unacknowledged
//! sequence, marked by QoS 0xAC). Segments with the magic `MLBSEG01` (written before ack
//! records existed) are read as before and never appended to: the first append after start-up
//! begins a new segment. An older binary cannot read `MLBSEG02` segments: to downgrade, drain
//! the buffer first. The `ack` file holds two 24-byte slots (generation, first unacknowledged
//! sequence, CRC32C); each update overwrites the older slot, so a torn write leaves the other
//! slot intact. It is created when the queue opens, so that recording an ack later never needs
//! a free block.
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
//! - The newest segment holds the newest position the log carried: a new segment written while
//!   the `ack` file is behind opens with an ack record, in the same write and fsync as its
//!   magic. So recovery, which reads only the newest segment, never finds less than the
//!   position older segments were deleted on the strength of.
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
//! pending appends and a moved ack position, fsyncs once for all of them (group commit), answers
//! each, and deletes the segments behind the position. When the ack deadline passes while it
//! waits (no append carried the position), it writes the `ack` file, deletes the segments
//! behind it and reuses the newest one if worthwhile. Readers
//! read the fsync'd part of the segments with their own file handle, on tokio's blocking
//! threads; what a read brings in waits in a hand-over list, so a caller that stops waiting
//! (a cancelled `select!` branch) loses nothing. Acks move a shared position and wake the
//! writer.
//!
//! # Recovery
//!
//! Start-up reads only the newest segment (to find its last whole record and its highest ack
//! record, and truncate a torn tail, ack records included) and the `ack` file; the ack
//! position is the higher of the two. The reader then scans forward within one segment to the
//! ack position. Older segments are trusted by their names and checked as they are read: a corrupt
//! record is skipped by scanning for the next valid one, a missing segment is a gap; both are
//! counted and logged with the file name. Nothing makes recovery refuse to start or loop.
//!
//! All file operations go through [`Storage`], so tests can inject faults ([`FaultStorage`]).
//!
//! [`FaultStorage`]: super::storage::FaultStorage

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use super::record::{self, Decoded};
use super::storage::{OpenMode, RealStorage, Storage, StorageFile};
use super::{Entry, Queue, QueueError, Seq};
use crate::core::config::WhenFull;
use crate::core::envelope::Message;

/// Every new segment file starts with this; a different format gets a different magic.
/// `MLBSEG02` segments may hold ack records (see `record.rs`).
pub const SEGMENT_MAGIC: &[u8; 8] = b"MLBSEG02";
/// The magic of segments written before ack records existed: still read (they hold no ack
/// records), never appended to (the first append after start-up begins a new segment).
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"MLBSEG01";
/// When no append comes, a moved ack position reaches the `ack` file this long after the `ack`
/// (under steady appends it rides in the next group commit instead, at no extra fsync). Also
/// the least time between two writes of the `ack` file, so an SD card sees at most ten ack
/// fsyncs a second, and none while appends keep coming.
pub const ACK_PERSIST_INTERVAL: Duration = Duration::from_millis(100);
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
const MAGIC_LEN: u64 = SEGMENT_MAGIC.len() as u64;
const ACK_FILE: &str = "ack";
const ACK_SLOT_LEN: u64 = 24;
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
}

#[derive(Debug, Clone)]
struct Segment {
    /// Sequence number of its first record (its name; after an interrupted reuse, possibly
    /// lower than its first record).
    first_seq: Seq,
    path: PathBuf,
    /// Durable length in bytes (what readers may read).
    len: u64,
}

#[derive(Debug)]
struct State {
    /// Oldest first; the last one is being written.
    segments: VecDeque<Segment>,
    /// All sequences below this are durable and readable.
    durable_seq: Seq,
    /// First unacknowledged sequence.
    ack_next: Seq,
    /// Sum of segment lengths.
    bytes: u64,
    /// Set when the writer thread has stopped.
    closed: bool,
}

/// The reader's position: which segment file is open and where.
#[derive(Default)]
struct Reader {
    /// Next sequence to read from disk.
    next_seq: Seq,
    /// The open segment, if any.
    open: Option<OpenSegment>,
}

/// A segment file being read, with the bytes read ahead of the position.
struct OpenSegment {
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

enum WriterMsg {
    Append {
        messages: Vec<Message>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// The ack position moved.
    Acked,
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

fn segment_path(dir: &Path, first_seq: Seq) -> PathBuf {
    dir.join(format!("segment-{first_seq:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<Seq> {
    name.strip_prefix("segment-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// Reads a whole file through `storage`.
fn read_whole(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let file = storage.open(path, OpenMode::Read)?;
    let mut buf = vec![0u8; file.size()? as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// Reads the ack file: the first unacknowledged sequence, from the valid slot with the highest
/// generation. `Ok(None)` when there is no file or no valid slot.
pub fn read_ack_file(dir: &Path) -> io::Result<Option<(u64, Seq)>> {
    read_ack_slots(&RealStorage, dir)
}

fn read_ack_slots(storage: &dyn Storage, dir: &Path) -> io::Result<Option<(u64, Seq)>> {
    let buf = match read_whole(storage, &dir.join(ACK_FILE)) {
        Ok(buf) => buf,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut best: Option<(u64, Seq)> = None;
    for slot in buf.chunks_exact(ACK_SLOT_LEN as usize) {
        let generation = u64::from_le_bytes(slot[0..8].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(slot[8..16].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(slot[16..20].try_into().unwrap_or_default());
        if crc32c::crc32c(&slot[0..16]) == crc && best.is_none_or(|(g, _)| generation > g) {
            best = Some((generation, seq));
        }
    }
    Ok(best)
}

fn encode_ack_slot(generation: u64, seq: Seq) -> [u8; ACK_SLOT_LEN as usize] {
    let mut slot = [0u8; ACK_SLOT_LEN as usize];
    slot[0..8].copy_from_slice(&generation.to_le_bytes());
    slot[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&slot[0..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// What the writer needs to know about the newest segment file.
#[derive(Debug, Clone, Copy)]
struct NewestSegment {
    /// The highest ack record in it.
    ack_in_log: Option<Seq>,
    /// It has the old magic: no ack record may be written into it.
    v1: bool,
    /// Where its message records start (after the magic and a leading ack record): while its
    /// length is no more than this, it holds no message.
    data_start: u64,
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

/// The first bytes of a new segment: the magic, then an ack record when `ack` is given.
fn segment_head(ack: Option<Seq>) -> Vec<u8> {
    let mut head = SEGMENT_MAGIC.to_vec();
    if let Some(position) = ack {
        record::encode_ack(position, &mut head);
    }
    head
}

/// The ack position on disk in `dir`: the ack file's, or the highest ack record in the newest
/// segment if that is higher — what a restart resumes from. `Ok(None)` when neither exists.
pub fn read_ack_position(dir: &Path) -> io::Result<Option<Seq>> {
    let file = read_ack_slots(&RealStorage, dir)?.map(|(_, seq)| seq);
    let log = match list_segments(&RealStorage, dir)?.last() {
        Some((_, path)) => scan_segment(&read_whole(&RealStorage, path)?).ack,
        None => None,
    };
    Ok(file.max(log))
}

/// What scanning a segment's bytes found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Offset just after the last valid record (where appending may continue).
    pub valid_end: u64,
    /// Sequence after the last valid message record, if any message record was found.
    pub next_seq: Option<Seq>,
    /// The highest position an ack record in the segment holds.
    pub ack: Option<Seq>,
    /// The segment has the old magic `MLBSEG01`.
    pub v1: bool,
    /// Bytes inside `valid_end` that were not valid records.
    pub corrupt_bytes: u64,
    /// Bytes after `valid_end` (a torn tail, or garbage).
    pub tail_bytes: u64,
}

/// Walks a whole segment image (magic included) and finds where its valid records end. Pure:
/// the recovery decision for the newest segment.
pub fn scan_segment(bytes: &[u8]) -> ScanResult {
    let mut result = ScanResult::default();
    let magic = bytes.get(..SEGMENT_MAGIC.len());
    if magic == Some(SEGMENT_MAGIC_V1) {
        result.v1 = true;
    } else if magic != Some(SEGMENT_MAGIC) {
        result.tail_bytes = bytes.len() as u64;
        return result;
    }
    let mut at = SEGMENT_MAGIC.len();
    result.valid_end = at as u64;
    let mut pending_corrupt = 0u64;
    while at < bytes.len() {
        match record::decode(&bytes[at..]) {
            Decoded::Record { seq, len, .. } => {
                at += len;
                result.corrupt_bytes += pending_corrupt;
                pending_corrupt = 0;
                result.valid_end = at as u64;
                result.next_seq = Some(seq + 1);
            }
            Decoded::Ack { position, len } => {
                at += len;
                result.corrupt_bytes += pending_corrupt;
                pending_corrupt = 0;
                result.valid_end = at as u64;
                result.ack = result.ack.max(Some(position));
            }
            Decoded::Incomplete | Decoded::Corrupt => {
                // Look for a later valid record: a corrupt record in the middle is skipped, a
                // torn tail has none after it.
                at += 1;
                pending_corrupt += 1;
            }
        }
    }
    result.tail_bytes = bytes.len() as u64 - result.valid_end;
    result
}

impl DiskQueue {
    /// Opens (and recovers) the queue in `config.dir`, creating it if needed.
    pub fn open(config: DiskQueueConfig) -> io::Result<DiskQueue> {
        DiskQueue::open_with(config, Arc::new(RealStorage))
    }

    /// [`DiskQueue::open`] on the given storage (tests pass a
    /// [`FaultStorage`](super::storage::FaultStorage)).
    pub fn open_with(config: DiskQueueConfig, storage: Arc<dyn Storage>) -> io::Result<DiskQueue> {
        let dir = config.dir.clone();
        storage.create_dir_all(&dir)?;
        let counters = Counters::default();

        let names = list_segments(&*storage, &dir)?;

        let ack = read_ack_slots(&*storage, &dir)?;
        let file_ack = ack.map(|(_, seq)| seq);
        let generation = ack.map_or(0, |(g, _)| g);

        // The newest segment: find its end and its highest ack record, truncate a torn tail.
        let mut next_seq = 0;
        let mut newest_end = None;
        let mut newest = NewestSegment::default();
        let mut newest_has_messages = false;
        let mut segments: VecDeque<Segment> = VecDeque::new();
        for (i, (first_seq, path)) in names.iter().enumerate() {
            if i + 1 < names.len() {
                let len = storage.open(path, OpenMode::Read)?.size()?;
                if len <= MAGIC_LEN {
                    // An empty older segment (crash right after creating it) holds nothing.
                    storage.remove_file(path)?;
                    continue;
                }
                segments.push_back(Segment {
                    first_seq: *first_seq,
                    path: path.clone(),
                    len,
                });
                continue;
            }
            let bytes = read_whole(&*storage, path)?;
            let len = bytes.len() as u64;
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
            } else if scan.valid_end < len {
                file.set_len(scan.valid_end)?;
            }
            file.sync_all()?;
            let end = scan.next_seq.unwrap_or(*first_seq).max(*first_seq);
            next_seq = end;
            newest_end = Some(end);
            let len = scan.valid_end.max(MAGIC_LEN);
            newest_has_messages = scan.next_seq.is_some();
            newest = NewestSegment {
                ack_in_log: scan.ack,
                v1: scan.v1,
                data_start: if newest_has_messages { MAGIC_LEN } else { len },
            };
            segments.push_back(Segment {
                first_seq: *first_seq,
                path: path.clone(),
                len,
            });
        }

        let newest_is_empty = !segments.is_empty() && !newest_has_messages;
        let first_seq = segments.front().map_or(next_seq, |s| s.first_seq);
        // The position on disk: the ack file's, or a newer one an ack record in the newest
        // segment carries (see the invariants).
        let mut ack_pos = file_ack.max(newest.ack_in_log).unwrap_or(first_seq);
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
                segment_path(&dir, first_seq).display()
            );
            ack_pos = first_seq;
        }

        // Sequences inside a segment stay contiguous: when appending cannot continue the newest
        // segment (none, or the ack file moved past its end), start a new one.
        if newest_end != Some(next_seq) {
            let to = segment_path(&dir, next_seq);
            match segments.back_mut() {
                Some(last) if newest_is_empty => {
                    // No messages: rename it, which needs no free block (the disk may be full).
                    storage.rename(&last.path, &to)?;
                    last.first_seq = next_seq;
                    last.path = to;
                }
                _ => {
                    // Its first record carries the position when the ack file does not hold
                    // it, so the newest segment never holds less than the segment before it.
                    let carried = (file_ack < Some(ack_pos)).then_some(ack_pos);
                    let head = segment_head(carried);
                    let file = storage.open(&to, OpenMode::Create)?;
                    file.write_all_at(&head, 0)?;
                    file.sync_all()?;
                    let len = head.len() as u64;
                    newest = NewestSegment {
                        ack_in_log: carried,
                        v1: false,
                        data_start: len,
                    };
                    segments.push_back(Segment {
                        first_seq: next_seq,
                        path: to,
                        len,
                    });
                }
            }
        }
        // Delete segments wholly behind the ack position.
        while segments.len() > 1 && segments[1].first_seq <= ack_pos {
            if let Some(old) = segments.pop_front() {
                storage.remove_file(&old.path)?;
            }
        }
        storage.sync_dir(&dir)?;

        let bytes = segments.iter().map(|s| s.len).sum();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                segments,
                durable_seq: next_seq,
                ack_next: ack_pos,
                bytes,
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
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer::new(shared.clone(), next_seq, generation, file_ack, newest)?;
        if writer.ack_in_file.is_none() || writer.ack_on_disk() < Some(ack_pos) {
            // Create the ack file now, while there is room: a later ack write then only
            // overwrites a block the file already has, which works on a full disk. Also when
            // recovery moved the position past what is on disk (missing segments).
            match writer.write_ack(ack_pos) {
                Ok(()) => writer.ack_in_file = Some(ack_pos),
                Err(e) => tracing::warn!(
                    dir = %dir.display(), error = %e,
                    "cannot create the buffer's ack file; will retry at the first acknowledgement"
                ),
            }
        }
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

    /// Persists the ack position and stops the writer; later appends fail.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.send(WriterMsg::Close { reply }).is_ok() {
            let _ = done.await;
        }
    }

    /// Stops the writer without persisting the ack position, as `kill -9` would; appends that
    /// returned are on disk. For crash tests.
    pub fn abandon(self) {
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

    /// Tells the writer the ack position moved, once per burst of acks.
    fn signal_ack(&self) {
        if !self.shared.ack_signalled.swap(true, Ordering::AcqRel) {
            // Best effort: when the writer is gone the position is persisted at the next start.
            let _ = self.send(WriterMsg::Acked);
        }
    }
}

impl Shared {
    /// Up to `max` entries from the hand-over list, skipping any a drop released meanwhile.
    fn take_ready(&self, max: usize) -> Vec<Entry> {
        let ack_next = self.lock().ack_next;
        let mut ready = self.lock_ready();
        while ready.front().is_some_and(|e| e.seq < ack_next) {
            ready.pop_front();
        }
        let n = ready.len().min(max);
        ready.drain(..n).collect()
    }

    /// How many records a read of `max` should fetch from disk before it hands out: none when
    /// the hand-over list holds enough, or when the disk holds nothing unread.
    fn to_fetch(&self, max: usize) -> usize {
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
    fn read_into_ready(&self, max: usize) -> Result<bool, QueueError> {
        let mut reader = self.lock_reader();
        let result = self.read_available(&mut reader, max);
        // Hand the entries over before publishing the new position: whoever sees the position
        // finds the entries (see `has_unread`).
        let ack_moved = match result {
            Ok((entries, ack_moved)) => {
                let any = !entries.is_empty();
                self.lock_ready().extend(entries);
                if any {
                    // A reader whose read was cancelled is not waiting for these; others may be.
                    self.appended.notify_waiters();
                }
                Ok(ack_moved)
            }
            Err(e) => Err(e),
        };
        self.read_next.store(reader.next_seq, Ordering::Release);
        ack_moved
    }

    /// Reads at least `max` records if there are that many, and more up to
    /// [`READ_AHEAD_ENTRIES`] or [`READ_AHEAD_BYTES`], so small reads share one trip to a
    /// blocking thread.
    fn read_available(
        &self,
        reader: &mut Reader,
        max: usize,
    ) -> Result<(Vec<Entry>, bool), QueueError> {
        let mut out = Vec::new();
        let mut ack_moved = false;
        let mut bytes = 0;
        // One clock reading ages every message of this read (milliseconds apart at most).
        let clock = self.config.max_age.map(|_| crate::core::clock::reading());
        while out.len() < max || (out.len() < READ_AHEAD_ENTRIES && bytes < READ_AHEAD_BYTES) {
            let (durable_seq, ack_next, segment) = {
                let state = self.lock();
                if reader.next_seq < state.ack_next {
                    // Dropped (drop_oldest) or acknowledged behind our back: skip ahead.
                    reader.next_seq = state.ack_next;
                    reader.open = None;
                }
                let seg = state
                    .segments
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, s)| s.first_seq <= reader.next_seq)
                    .map(|(i, s)| (s.clone(), state.segments.get(i + 1).map(|n| n.first_seq)));
                (state.durable_seq, state.ack_next, seg)
            };
            if reader.next_seq >= durable_seq {
                break;
            }
            let Some((segment, next_first)) = segment else {
                break;
            };
            if reader
                .open
                .as_ref()
                .is_none_or(|open| open.first_seq != segment.first_seq)
            {
                let file = self.storage.open(&segment.path, OpenMode::Read)?;
                reader.open = Some(OpenSegment::new(segment.first_seq, file));
            }
            let Some(open) = reader.open.as_mut() else {
                break;
            };
            let record = if open.offset >= segment.len {
                None
            } else {
                match open.record(segment.len)? {
                    Some(Found::Message(seq, message, len)) => Some((seq, message, len)),
                    Some(Found::Ack(len)) => {
                        // The writer's bookkeeping, not a message: no sequence, no gap.
                        open.offset += len as u64;
                        continue;
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
                        continue;
                    }
                }
            };
            // The end of this segment: its durable part is read, or what follows belongs to
            // the next segment (the leftovers of an append whose fsync failed).
            let at_end = match &record {
                None => true,
                Some((seq, _, _)) => next_first.is_some_and(|next| *seq >= next),
            };
            if at_end {
                match next_first {
                    Some(next) => {
                        if next > reader.next_seq {
                            self.count_lost(
                                next - reader.next_seq,
                                &segment.path,
                                "records missing at the end of the segment",
                            );
                        }
                        reader.next_seq = reader.next_seq.max(next);
                        reader.open = None;
                        continue;
                    }
                    None => break,
                }
            }
            let Some((seq, message, len)) = record else {
                break;
            };
            open.offset += len as u64;
            if seq < reader.next_seq {
                continue;
            }
            if seq > reader.next_seq {
                self.count_lost(
                    seq - reader.next_seq,
                    &segment.path,
                    "a gap in sequence numbers",
                );
            }
            reader.next_seq = seq + 1;
            if let (Some(max_age), Some(clock)) = (self.config.max_age, &clock) {
                // Not `now - received_at`: a clock stepped by NTP must not expire a backlog
                // stamped before it (clock.rs).
                let age = clock.age_of(message.received_at_ms());
                if age > max_age {
                    self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        dir = %self.config.dir.display(), topic = %message.topic, id = %message.id,
                        age = %crate::core::clock::human(age), "message older than buffer.max_age: dropped"
                    );
                    let nothing_before = out.is_empty() && self.lock_ready().is_empty();
                    if nothing_before && seq == ack_next {
                        let mut state = self.lock();
                        if state.ack_next <= seq {
                            state.ack_next = seq + 1;
                            ack_moved = true;
                        }
                    }
                    continue;
                }
            }
            bytes += len;
            out.push(Entry { seq, message });
        }
        Ok((out, ack_moved))
    }

    fn count_lost(&self, n: u64, path: &Path, why: &str) {
        self.counters.lost.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(file = %path.display(), lost = n, "buffer: {why}; these records cannot be delivered");
    }
}

/// A valid record found in a segment.
enum Found {
    /// A message record: its sequence, the message, its length.
    Message(Seq, Message, usize),
    /// An ack record of this length (readers skip it).
    Ack(usize),
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

/// What a decoded record is to a reader: a message, an ack record, or nothing valid.
fn found(decoded: Decoded) -> Option<Found> {
    match decoded {
        Decoded::Record { seq, message, len } => Some(Found::Message(seq, message, len)),
        Decoded::Ack { len, .. } => Some(Found::Ack(len)),
        Decoded::Incomplete | Decoded::Corrupt => None,
    }
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

fn join_error(e: tokio::task::JoinError) -> QueueError {
    QueueError::Io(io::Error::other(format!(
        "the buffer read task stopped: {e}"
    )))
}

impl Queue for DiskQueue {
    async fn append(&self, messages: Vec<Message>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let size: u64 = messages.iter().map(|m| record::encoded_len(m) as u64).sum();
        if self.shared.config.when_full == WhenFull::Block {
            loop {
                let freed = self.shared.freed.notified();
                {
                    let state = self.shared.lock();
                    if state.closed {
                        return Err(QueueError::Closed);
                    }
                    let live = state.bytes;
                    if live + size <= self.shared.config.max_size
                        || state.durable_seq == state.ack_next
                    {
                        break;
                    }
                }
                freed.await;
            }
        }
        let (reply, done) = oneshot::channel();
        self.send(WriterMsg::Append { messages, reply })?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Io(e)),
            Err(_) => Err(QueueError::Closed),
        }
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
        let fetch = self.shared.to_fetch(max);
        if fetch > 0 {
            let shared = self.shared.clone();
            let ack_moved = tokio::task::spawn_blocking(move || shared.read_into_ready(fetch))
                .await
                .map_err(join_error)??;
            if ack_moved {
                self.signal_ack();
            }
        }
        // Entries leave the hand-over list only here, after the last await: a caller that stops
        // waiting earlier leaves them for the next read.
        Ok(self.shared.take_ready(max))
    }

    async fn ack(&self, through: Seq) -> Result<(), QueueError> {
        {
            let mut state = self.shared.lock();
            let next = (through + 1).min(state.durable_seq);
            if next <= state.ack_next {
                return Ok(());
            }
            state.ack_next = next;
        }
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

/// Owns the files: appends, fsyncs, rollovers, deletions, reuse, ack persistence.
struct Writer {
    shared: Arc<Shared>,
    /// The newest segment, open for appending.
    file: Box<dyn StorageFile>,
    /// Its durable length.
    len: u64,
    /// Sequence the next record gets.
    next_seq: Seq,
    /// Generation of the last ack slot written.
    ack_generation: u64,
    /// Ack position last written to the ack file (`None`: no valid ack file yet).
    ack_in_file: Option<Seq>,
    /// The highest ack record durable in the newest segment file (`None`: none there).
    ack_in_log: Option<Seq>,
    /// The newest segment file has the old magic: the next append starts a new one.
    v1: bool,
    /// Where the newest segment's message records start: no longer than this, it holds none.
    data_start: u64,
    ack_file: Option<Box<dyn StorageFile>>,
    /// When the moved ack position is to be written (`None`: nothing is due).
    ack_due: Option<Instant>,
    /// Set after a failed write or fsync, so the failure is logged once and a full disk gets
    /// its delivered segment reused; cleared by the next successful append.
    failing: bool,
    /// Set after a failed fsync (or a failed cut of a partial append): this segment file takes
    /// no more appends, the next one starts a new file.
    untrusted: bool,
    buf: Vec<u8>,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        next_seq: Seq,
        ack_generation: u64,
        ack_in_file: Option<Seq>,
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
            ack_generation,
            ack_in_file,
            ack_in_log: newest.ack_in_log,
            v1: newest.v1,
            data_start: newest.data_start,
            ack_file: None,
            ack_due: None,
            failing: false,
            untrusted: false,
            buf: Vec::new(),
        })
    }

    /// The ack position a restart would resume from: the ack file's or the newest segment's.
    fn ack_on_disk(&self) -> Option<Seq> {
        self.ack_in_file.max(self.ack_in_log)
    }

    fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
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
            let mut appends = Vec::new();
            let mut close = None;
            for msg in std::iter::once(first).chain(rx.try_iter()) {
                match msg {
                    WriterMsg::Append { messages, reply } => appends.push((messages, reply)),
                    WriterMsg::Acked => {
                        self.shared.ack_signalled.store(false, Ordering::Release);
                        self.schedule_ack();
                    }
                    WriterMsg::Close { reply } => close = Some(reply),
                    WriterMsg::Abandon => {
                        self.shared.lock().closed = true;
                        self.wake_all();
                        return;
                    }
                }
            }
            if !appends.is_empty() {
                self.append_all(appends);
            }
            self.persist_ack_if_due();
            if let Some(reply) = close {
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

    /// The ack position moved: the ack file is due one interval later, unless a group commit
    /// carries the position first (at most an interval after the ack, at most one ack-file
    /// fsync per interval, none while appends keep coming).
    fn schedule_ack(&mut self) {
        if self.ack_due.is_none() {
            // Set only once the position moved after the last ack-file write, so this also
            // spaces ack-file writes an interval apart.
            self.ack_due = Some(Instant::now() + ACK_PERSIST_INTERVAL);
        }
    }

    /// Persists the ack position when it is due. Also notices a position moved without a
    /// message (the writer's own drops, a signal still on its way).
    fn persist_ack_if_due(&mut self) {
        let ack_next = self.shared.lock().ack_next;
        // A group commit may have carried it already: then only a retried reuse is left.
        let on_disk = Some(ack_next) == self.ack_on_disk();
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

    /// Writes every pending append, fsyncs once, answers each.
    fn append_all(&mut self, appends: Vec<(Vec<Message>, oneshot::Sender<io::Result<()>>)>) {
        let shared = self.shared.clone();
        let config = &shared.config;
        let mut replies = Vec::with_capacity(appends.len());
        let mut accepted: Vec<Message> = Vec::new();
        for (messages, reply) in appends {
            let size: u64 = messages.iter().map(|m| record::encoded_len(m) as u64).sum();
            if let Err(e) = self.make_room(size) {
                let _ = reply.send(Err(e));
                continue;
            }
            let over = self.shared.lock().bytes + size > config.max_size;
            if over && config.when_full == WhenFull::DropNewest {
                self.shared
                    .counters
                    .dropped_newest
                    .fetch_add(messages.len() as u64, Ordering::Relaxed);
                tracing::warn!(
                    dir = %config.dir.display(), messages = messages.len(),
                    "buffer full (buffer.when_full = drop_newest): new messages dropped"
                );
                let _ = reply.send(Ok(()));
                continue;
            }
            accepted.extend(messages);
            replies.push(reply);
        }
        if replies.is_empty() {
            return;
        }
        let result = self.write_durably(&accepted);
        for reply in replies {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
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
                if position == self.shared.lock().ack_next {
                    // Carried by this group commit: the ack file need not be written.
                    self.ack_due = None;
                }
                self.delete_behind(position);
            }
        } else if !self.reuse_if_worthwhile() {
            // A read holds the segment: try again shortly.
            self.ack_due = Some(Instant::now() + ACK_PERSIST_INTERVAL);
        }
    }

    /// With `drop_oldest`, deletes the oldest segments until `size` more bytes fit.
    fn make_room(&mut self, size: u64) -> io::Result<()> {
        let shared = self.shared.clone();
        let config = &shared.config;
        if config.when_full != WhenFull::DropOldest {
            return Ok(());
        }
        loop {
            let (bytes, segments) = {
                let state = self.shared.lock();
                (state.bytes, state.segments.len())
            };
            if bytes + size <= config.max_size {
                return Ok(());
            }
            if segments <= 1 {
                if self.len <= self.data_start {
                    return Ok(()); // a single message larger than the cap: write it anyway
                }
                self.roll_over()?;
                continue;
            }
            let dropped = {
                let mut state = self.shared.lock();
                let Some(old) = state.segments.pop_front() else {
                    return Ok(());
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
        (self.ack_in_file < Some(ack_next) && self.ack_in_log < Some(ack_next)).then_some(ack_next)
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

    fn roll_over(&mut self) -> io::Result<()> {
        let shared = self.shared.clone();
        let dir = &shared.config.dir;
        let storage = &shared.storage;
        // An empty newest segment would give the new one its name: remove it first, so the new
        // file really is a new file (it is empty only when an untrusted segment is replaced).
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
            && let Err(e) = storage.remove_file(&old.path)
        {
            let mut state = self.shared.lock();
            state.bytes += old.len;
            state.segments.push_back(old);
            return Err(e);
        }
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

    /// Writes a moved ack position to the ack file, deletes the segments wholly behind it, and
    /// reuses the newest segment if worthwhile. Returns false when something should be tried
    /// again later.
    fn persist_ack_and_delete(&mut self) -> bool {
        let ack_next = self.shared.lock().ack_next;
        if Some(ack_next) != self.ack_in_file {
            if let Err(e) = self.write_ack_file(ack_next) {
                tracing::warn!(dir = %self.shared.config.dir.display(), error = %e, "cannot persist the ack position; will retry");
                return false;
            }
            self.delete_behind(ack_next);
        }
        self.reuse_if_worthwhile()
    }

    /// Writes the ack file and notes what it holds.
    fn write_ack_file(&mut self, seq: Seq) -> io::Result<()> {
        self.write_ack(seq)?;
        self.ack_in_file = Some(seq);
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

    /// Reuses the newest segment in place when everything in it is acknowledged on disk and
    /// its space is wanted (see the invariants). Returns false when a read in progress held it
    /// off, so the caller tries again.
    fn reuse_if_worthwhile(&mut self) -> bool {
        let shared = self.shared.clone();
        let config = &shared.config;
        if self.len <= self.data_start || self.ack_on_disk() != Some(self.next_seq) {
            return true;
        }
        let (path, bytes) = {
            let state = self.shared.lock();
            match state.segments.back() {
                Some(last) if state.ack_next == self.next_seq && state.segments.len() == 1 => {
                    (last.path.clone(), state.bytes)
                }
                _ => return true,
            }
        };
        let wanted = self.failing
            || bytes >= config.max_size
            || self.len >= config.segment_size / REUSE_FRACTION;
        if !wanted {
            return true;
        }
        // The cut removes the segment's ack records: the ack file must hold the position
        // first. It overwrites a block the file has, so this works on a full disk.
        if self.ack_in_file != Some(self.next_seq)
            && let Err(e) = self.write_ack_file(self.next_seq)
        {
            tracing::warn!(dir = %config.dir.display(), error = %e, "cannot persist the ack position before reusing a segment; will retry");
            return false;
        }
        // No read may see the file while it is cut.
        let Ok(mut reader) = self.shared.reader.try_lock() else {
            return false;
        };
        reader.open = None;
        if let Err(e) = self.file.set_len(MAGIC_LEN) {
            tracing::warn!(file = %path.display(), error = %e, "cannot reuse a delivered segment");
            return true;
        }
        let freed = self.len - MAGIC_LEN;
        self.len = MAGIC_LEN;
        self.data_start = MAGIC_LEN;
        self.ack_in_log = None;
        {
            let mut state = self.shared.lock();
            if let Some(last) = state.segments.back_mut() {
                last.len = MAGIC_LEN;
            }
            state.bytes -= freed;
        }
        // The cut is made durable before the rename can be: a renamed file must never get its
        // old records back. If this fsync fails the file is not trusted for appends.
        if let Err(e) = self.file.sync_all() {
            tracing::warn!(file = %path.display(), error = %e, "cannot fsync a reused segment; the next append starts a new one");
            self.untrusted = true;
        } else {
            let to = segment_path(&config.dir, self.next_seq);
            match self.shared.storage.rename(&path, &to) {
                Ok(()) => {
                    let mut state = self.shared.lock();
                    if let Some(last) = state.segments.back_mut() {
                        last.first_seq = self.next_seq;
                        last.path = to;
                    }
                }
                // Harmless: an empty segment holding later sequences than its name says.
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot rename a reused segment")
                }
            }
            let _ = self.shared.storage.sync_dir(&config.dir);
        }
        drop(reader);
        if self.failing {
            tracing::info!(
                dir = %config.dir.display(), freed_bytes = freed,
                "buffer: every message delivered; reused the segment file to free space"
            );
        } else {
            tracing::debug!(dir = %config.dir.display(), freed_bytes = freed, "buffer: reused a delivered segment file");
        }
        self.shared.freed.notify_waiters();
        true
    }

    fn write_ack(&mut self, seq: Seq) -> io::Result<()> {
        if self.ack_file.is_none() {
            let path = self.shared.config.dir.join(ACK_FILE);
            self.ack_file = Some(self.shared.storage.open(&path, OpenMode::OpenOrCreate)?);
        }
        let generation = self.ack_generation + 1;
        let slot = encode_ack_slot(generation, seq);
        if let Some(file) = &self.ack_file {
            file.write_all_at(&slot, (generation % 2) * ACK_SLOT_LEN)?;
            file.sync_data()?;
        }
        self.ack_generation = generation;
        Ok(())
    }
}

/// The segment files in `dir` with their first sequences, oldest first; other files are
/// ignored.
fn list_segments(storage: &dyn Storage, dir: &Path) -> io::Result<Vec<(Seq, PathBuf)>> {
    let mut segments = Vec::new();
    for path in storage.list_dir(dir)? {
        if let Some(seq) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_segment_name)
        {
            segments.push((seq, path));
        }
    }
    segments.sort();
    Ok(segments)
}

/// The segment files of a queue directory, oldest first, without opening the queue (tests and
/// tools).
pub fn segment_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(list_segments(&RealStorage, dir)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}
