//! The durable queue: a FIFO of records in segment files, one directory per rule.
//!
//! # On disk
//!
//! ```text
//! <buffer.dir>/<rule>/
//!     segment-00000000000000000000.log   records with sequence numbers from 0
//!     segment-00000000000000052311.log   records from 52311 (the name is its first sequence)
//!     ack                                the first unacknowledged sequence number
//!     dead-letters.jsonl                 events Lambda can never accept (see deadletter.rs)
//! ```
//!
//! A segment starts with the 8-byte magic `MLBSEG01`, followed by records (`record.rs`: length,
//! CRC32C, sequence number, message). The `ack` file holds two 24-byte slots (generation, first
//! unacknowledged sequence, CRC32C); each update overwrites the older slot, so a torn write
//! leaves the other slot intact.
//!
//! # Invariants
//!
//! - Sequence numbers grow by one per record, across segments; a segment holds only sequences
//!   from its name up to the next segment's name.
//! - A record is handed to a reader only once it is fsync'd: `append` returns, and the MQTT
//!   message is acknowledged, only after that.
//! - A segment is deleted only when every record in it is acknowledged and that acknowledgement
//!   is on disk — or when `when_full = "drop_oldest"` drops it, and then its unacknowledged
//!   records are counted as dropped. The directory is fsync'd after every create and delete.
//! - The ack position is written at most once per [`ACK_PERSIST_INTERVAL`] and at shutdown: a
//!   crash can replay up to that much already-delivered work (at least once), never skip any.
//!
//! # Life cycle
//!
//! One writer thread per queue owns every file mutation. Appends queue up for it; it writes all
//! pending appends, fsyncs once for all of them (group commit), and answers each. Readers read
//! the fsync'd part of the segments with their own file handle. Acks move a shared position;
//! the writer persists it and deletes segments behind it.
//!
//! # Recovery
//!
//! Start-up reads only the newest segment (to find its last whole record and truncate a torn
//! tail) and the `ack` file; the reader then scans forward within one segment to the ack
//! position. Older segments are trusted by their names and checked as they are read: a corrupt
//! record is skipped by scanning for the next valid one, a missing segment is a gap; both are
//! counted and logged with the file name. Nothing makes recovery refuse to start or loop.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, oneshot};

use super::record::{self, Decoded};
use super::{Entry, Queue, QueueError, Seq};
use crate::config::WhenFull;
use crate::envelope::Message;

/// Every segment file starts with this; a different format gets a different magic.
pub const SEGMENT_MAGIC: &[u8; 8] = b"MLBSEG01";
/// How often the writer persists a moved ack position: the most delivered work a crash can
/// make us deliver again. Bounded so an SD card sees at most one ack write per second.
pub const ACK_PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// Default segment size: large enough for sequential writes, small enough that deleting a
/// whole segment frees space in useful steps.
pub const DEFAULT_SEGMENT_SIZE: u64 = 8 * 1024 * 1024;
/// Smallest segment size accepted (tests use tiny ones).
pub const MIN_SEGMENT_SIZE: u64 = 512;
const ACK_FILE: &str = "ack";
const ACK_SLOT_LEN: u64 = 24;
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

/// What the queue counted since it opened (recovery included).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages dropped by `when_full = drop_oldest` (deleted unacknowledged segments).
    pub dropped_oldest: AtomicU64,
    /// Messages refused by `when_full = drop_newest`.
    pub dropped_newest: AtomicU64,
    /// Messages dropped for being older than `max_age`.
    pub expired: AtomicU64,
    /// Records that could not be read back (corruption, missing segments).
    pub lost: AtomicU64,
    /// Bytes skipped or truncated because they were not valid records.
    pub corrupt_bytes: AtomicU64,
}

/// A snapshot for `buffer stats` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages appended and not yet acknowledged.
    pub pending: u64,
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
}

#[derive(Debug, Clone)]
struct Segment {
    /// Sequence number of its first record (its name).
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

struct Shared {
    state: Mutex<State>,
    /// Wakes readers when records become durable.
    appended: Notify,
    /// Wakes `block`-mode appenders when segments are deleted.
    freed: Notify,
    counters: Counters,
    config: DiskQueueConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation under this lock is completed before it is released, so a poisoned
        // lock still guards a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum WriterMsg {
    Append {
        messages: Vec<Message>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Acked,
    Close {
        reply: oneshot::Sender<()>,
    },
    /// Stop without persisting the ack position, as a crash would (tests).
    Abandon,
}

/// The reader's position: which segment file is open and where.
#[derive(Default)]
struct Reader {
    /// Next sequence to hand out.
    next_seq: Seq,
    /// The open segment: its first sequence, the file, and the byte offset of `next_seq`'s
    /// record (or of the next record to examine).
    open: Option<(Seq, File, u64)>,
}

/// A durable per-rule queue.
pub struct DiskQueue {
    shared: Arc<Shared>,
    writer: Mutex<mpsc::Sender<WriterMsg>>,
    /// The writer thread, joined by `abandon`.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Mutex<Reader>,
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the ack file: the first unacknowledged sequence, from the valid slot with the highest
/// generation. `Ok(None)` when there is no file or no valid slot.
pub fn read_ack_file(dir: &Path) -> io::Result<Option<(u64, Seq)>> {
    let mut buf = Vec::new();
    match File::open(dir.join(ACK_FILE)) {
        Ok(mut f) => {
            f.read_to_end(&mut buf)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
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

/// What scanning a segment's bytes found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// Offset just after the last valid record (where appending may continue).
    pub valid_end: u64,
    /// Sequence after the last valid record, if any record was found.
    pub next_seq: Option<Seq>,
    /// Bytes inside `valid_end` that were not valid records.
    pub corrupt_bytes: u64,
    /// Bytes after `valid_end` (a torn tail, or garbage).
    pub tail_bytes: u64,
}

/// Walks a whole segment image (magic included) and finds where its valid records end. Pure:
/// the recovery decision for the newest segment.
pub fn scan_segment(bytes: &[u8]) -> ScanResult {
    let mut result = ScanResult::default();
    if bytes.len() < SEGMENT_MAGIC.len() || &bytes[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
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
        let dir = config.dir.clone();
        fs::create_dir_all(&dir)?;
        let counters = Counters::default();

        let names = list_segments(&dir)?;

        let ack = read_ack_file(&dir)?;
        let mut ack_next = ack.map(|(_, seq)| seq);
        let generation = ack.map_or(0, |(g, _)| g);

        // The newest segment: find its end, truncate a torn tail.
        let mut next_seq = 0;
        let mut newest_end = None;
        let mut segments: VecDeque<Segment> = VecDeque::new();
        for (i, (first_seq, path)) in names.iter().enumerate() {
            let len = fs::metadata(path)?.len();
            if i + 1 < names.len() {
                if len <= SEGMENT_MAGIC.len() as u64 {
                    // An empty older segment (crash right after creating it) holds nothing.
                    fs::remove_file(path)?;
                    continue;
                }
                segments.push_back(Segment {
                    first_seq: *first_seq,
                    path: path.clone(),
                    len,
                });
                continue;
            }
            let bytes = fs::read(path)?;
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
            let file = OpenOptions::new().write(true).open(path)?;
            if scan.valid_end < SEGMENT_MAGIC.len() as u64 {
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
            segments.push_back(Segment {
                first_seq: *first_seq,
                path: path.clone(),
                len: scan.valid_end.max(SEGMENT_MAGIC.len() as u64),
            });
        }

        let first_seq = segments.front().map_or(next_seq, |s| s.first_seq);
        let mut ack_pos = ack_next.take().unwrap_or(first_seq);
        if ack_pos > next_seq {
            tracing::warn!(
                dir = %dir.display(), ack = ack_pos, end = next_seq,
                "buffer recovery: the ack file is ahead of the records; treating everything as delivered"
            );
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
            if let Some(last) = segments.back()
                && last.len <= SEGMENT_MAGIC.len() as u64
            {
                fs::remove_file(&last.path)?;
                segments.pop_back();
            }
            let path = segment_path(&dir, next_seq);
            let mut file = File::create(&path)?;
            file.write_all(SEGMENT_MAGIC)?;
            file.sync_all()?;
            segments.push_back(Segment {
                first_seq: next_seq,
                path,
                len: SEGMENT_MAGIC.len() as u64,
            });
        }
        // Delete segments wholly behind the ack position.
        while segments.len() > 1 && segments[1].first_seq <= ack_pos {
            if let Some(old) = segments.pop_front() {
                fs::remove_file(&old.path)?;
            }
        }
        sync_dir(&dir)?;

        let bytes = segments.iter().map(|s| s.len).sum();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                segments,
                durable_seq: next_seq,
                ack_next: ack_pos,
                bytes,
                closed: false,
            }),
            appended: Notify::new(),
            freed: Notify::new(),
            counters,
            config,
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(
            shared.clone(),
            next_seq,
            generation,
            ack.map(|(_, seq)| seq),
        )?;
        let thread = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(DiskQueue {
            shared,
            writer: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
            reader: Mutex::new(Reader {
                next_seq: ack_pos,
                open: None,
            }),
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

    fn read_available(&self, max: usize) -> Result<Vec<Entry>, QueueError> {
        let mut reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        while out.len() < max {
            let (durable_seq, ack_next, segment) = {
                let state = self.shared.lock();
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
                .is_none_or(|(first, _, _)| *first != segment.first_seq)
            {
                let file = File::open(&segment.path)?;
                reader.open = Some((segment.first_seq, file, SEGMENT_MAGIC.len() as u64));
            }
            let Some((_, file, offset)) = reader.open.as_mut() else {
                break;
            };
            if *offset >= segment.len {
                // The end of this segment's durable part.
                match next_first {
                    Some(next) => {
                        if next > reader.next_seq {
                            self.count_lost(
                                next - reader.next_seq,
                                &segment.path,
                                "records missing at the end of the segment",
                            );
                        }
                        reader.next_seq = next;
                        reader.open = None;
                        continue;
                    }
                    None => break,
                }
            }
            match read_record_at(file, *offset, segment.len)? {
                Some((seq, message, len)) => {
                    *offset += len as u64;
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
                    if let Some(max_age) = self.shared.config.max_age {
                        let age = now_ms().saturating_sub(message.received_at_ms());
                        if age > max_age.as_millis() as u64 {
                            self.shared.counters.expired.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                dir = %self.shared.config.dir.display(), topic = %message.topic, id = %message.id,
                                age = ?Duration::from_millis(age), "message older than buffer.max_age: dropped"
                            );
                            if out.is_empty() && seq == ack_next {
                                let mut state = self.shared.lock();
                                state.ack_next = state.ack_next.max(seq + 1);
                            }
                            continue;
                        }
                    }
                    out.push(Entry { seq, message });
                }
                None => {
                    // Not a valid record here: scan for the next one.
                    let (skipped, next) = scan_forward(file, *offset, segment.len)?;
                    self.shared
                        .counters
                        .corrupt_bytes
                        .fetch_add(skipped, Ordering::Relaxed);
                    tracing::warn!(
                        file = %segment.path.display(), offset = *offset, skipped_bytes = skipped,
                        "buffer: corrupt record skipped"
                    );
                    *offset = next;
                }
            }
        }
        Ok(out)
    }

    fn count_lost(&self, n: u64, path: &Path, why: &str) {
        self.shared.counters.lost.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(file = %path.display(), lost = n, "buffer: {why}; these records cannot be delivered");
    }
}

/// Reads the record at `offset` if a valid one is there and ends by `limit`.
fn read_record_at(
    file: &File,
    offset: u64,
    limit: u64,
) -> io::Result<Option<(Seq, Message, usize)>> {
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
    Ok(match record::decode(&buf) {
        Decoded::Record { seq, message, len } => Some((seq, message, len)),
        _ => None,
    })
}

/// Finds the next offset after `offset` (exclusive) where a valid record starts, before `limit`;
/// returns the bytes skipped and that offset (`limit` when there is none).
fn scan_forward(file: &File, offset: u64, limit: u64) -> io::Result<(u64, u64)> {
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
            let entries = self.read_available(max)?;
            if !entries.is_empty() {
                return Ok(entries);
            }
            if self.shared.lock().closed {
                return Err(QueueError::Closed);
            }
            waiting.await;
        }
    }

    fn try_read(&self, max: usize) -> Result<Vec<Entry>, QueueError> {
        self.read_available(max)
    }

    async fn ack(&self, through: Seq) -> Result<(), QueueError> {
        let crossed = {
            let mut state = self.shared.lock();
            let next = (through + 1).min(state.durable_seq);
            if next <= state.ack_next {
                return Ok(());
            }
            state.ack_next = next;
            state.segments.len() > 1 && state.segments[1].first_seq <= next
        };
        if crossed {
            // Best effort: when the writer is gone the position is persisted at the next start.
            let _ = self.send(WriterMsg::Acked);
        }
        Ok(())
    }
}

impl Drop for DiskQueue {
    fn drop(&mut self) {
        let (reply, _done) = oneshot::channel();
        let _ = self.send(WriterMsg::Close { reply });
    }
}

/// Owns the files: appends, fsyncs, rollovers, deletions, ack persistence.
struct Writer {
    shared: Arc<Shared>,
    /// The newest segment, open for appending.
    file: File,
    /// Its durable length.
    len: u64,
    /// Sequence the next record gets.
    next_seq: Seq,
    /// Generation of the last ack slot written.
    ack_generation: u64,
    /// Ack position last written to disk (`None`: no valid ack file yet).
    ack_persisted: Option<Seq>,
    ack_file: Option<File>,
    /// Set after a failed write, so the failure is logged once.
    failing: bool,
    buf: Vec<u8>,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        next_seq: Seq,
        ack_generation: u64,
        ack_persisted: Option<Seq>,
    ) -> io::Result<Writer> {
        let (path, len) = {
            let state = shared.lock();
            let last = state
                .segments
                .back()
                .ok_or_else(|| io::Error::other("no segment after recovery"))?;
            (last.path.clone(), last.len)
        };
        let file = OpenOptions::new().write(true).open(&path)?;
        Ok(Writer {
            shared,
            file,
            len,
            next_seq,
            ack_generation,
            ack_persisted,
            ack_file: None,
            failing: false,
            buf: Vec::new(),
        })
    }

    fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        loop {
            let first = match rx.recv_timeout(ACK_PERSIST_INTERVAL) {
                Ok(msg) => msg,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.persist_ack_and_delete();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut appends = Vec::new();
            let mut close = None;
            let mut acked = false;
            for msg in std::iter::once(first).chain(rx.try_iter()) {
                match msg {
                    WriterMsg::Append { messages, reply } => appends.push((messages, reply)),
                    WriterMsg::Acked => acked = true,
                    WriterMsg::Close { reply } => close = Some(reply),
                    WriterMsg::Abandon => {
                        self.shared.lock().closed = true;
                        return;
                    }
                }
            }
            if !appends.is_empty() {
                self.append_all(appends);
            }
            if acked {
                self.persist_ack_and_delete();
            }
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
        self.shared.appended.notify_waiters();
        self.shared.freed.notify_waiters();
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
        if result.is_ok() && self.failing {
            self.failing = false;
            tracing::info!(dir = %config.dir.display(), "buffer writes work again");
        }
        for reply in replies {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        if result.is_ok() {
            self.shared.appended.notify_waiters();
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
                if self.len <= SEGMENT_MAGIC.len() as u64 {
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
            fs::remove_file(&old.path)?;
            sync_dir(&config.dir)?;
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

    fn write_durably(&mut self, messages: &[Message]) -> io::Result<()> {
        if self.len >= self.shared.config.segment_size {
            self.roll_over()?;
        }
        self.buf.clear();
        for (i, m) in messages.iter().enumerate() {
            record::encode(self.next_seq + i as u64, m, &mut self.buf);
        }
        let written = self
            .file
            .write_all_at(&self.buf, self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Never leave a partial record behind: recovery would cut it anyway, but readers
            // of this process must not see it either.
            let _ = self.file.set_len(self.len);
            if !self.failing {
                self.failing = true;
                tracing::error!(
                    dir = %self.shared.config.dir.display(), error = %e,
                    "cannot write the buffer (disk full or read-only?): not acknowledging new messages until it works again"
                );
            }
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        self.next_seq += messages.len() as u64;
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
        let dir = self.shared.config.dir.clone();
        let path = segment_path(&dir, self.next_seq);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        file.write_all(SEGMENT_MAGIC)?;
        file.sync_all()?;
        sync_dir(&dir)?;
        self.file = file;
        self.len = SEGMENT_MAGIC.len() as u64;
        let mut state = self.shared.lock();
        state.segments.push_back(Segment {
            first_seq: self.next_seq,
            path,
            len: self.len,
        });
        state.bytes += self.len;
        Ok(())
    }

    /// Writes a moved ack position, then deletes the segments wholly behind it.
    fn persist_ack_and_delete(&mut self) {
        let ack_next = self.shared.lock().ack_next;
        if Some(ack_next) == self.ack_persisted {
            return;
        }
        if let Err(e) = self.write_ack(ack_next) {
            tracing::warn!(dir = %self.shared.config.dir.display(), error = %e, "cannot persist the ack position; will retry");
            return;
        }
        self.ack_persisted = Some(ack_next);
        let mut deleted = Vec::new();
        {
            let mut state = self.shared.lock();
            while state.segments.len() > 1 && state.segments[1].first_seq <= ack_next {
                if let Some(old) = state.segments.pop_front() {
                    state.bytes -= old.len;
                    deleted.push(old.path);
                }
            }
        }
        // Everything acknowledged and the current segment big: start afresh so it can go too.
        let everything_acked = ack_next >= self.next_seq;
        if everything_acked
            && self.len >= self.shared.config.segment_size / 2
            && self.roll_over().is_ok()
        {
            let mut state = self.shared.lock();
            if state.segments.len() > 1
                && let Some(old) = state.segments.pop_front()
            {
                state.bytes -= old.len;
                deleted.push(old.path);
            }
        }
        if deleted.is_empty() {
            return;
        }
        for path in &deleted {
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a delivered segment");
            }
        }
        let _ = sync_dir(&self.shared.config.dir);
        self.shared.freed.notify_waiters();
    }

    fn write_ack(&mut self, seq: Seq) -> io::Result<()> {
        if self.ack_file.is_none() {
            self.ack_file = Some(
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(self.shared.config.dir.join(ACK_FILE))?,
            );
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
fn list_segments(dir: &Path) -> io::Result<Vec<(Seq, PathBuf)>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push((seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// The segment files of a queue directory, oldest first, without opening the queue (tests and
/// tools).
pub fn segment_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(list_segments(dir)?.into_iter().map(|(_, p)| p).collect())
}
