//! The `ack` file: where the ack position and the acknowledged ranges above it rest when no
//! group commit carries them.
//!
//! The file is a run of 24-byte chunks of two kinds:
//!
//! ```text
//! header: generation (u64 LE) | first unacknowledged sequence (u64 LE) | CRC32C of those 16 | 4 zero bytes
//! range:  start (u64 LE)      | end, exclusive (u64 LE)                | !CRC32C of those 16 | generation (low 32 bits, LE)
//! ```
//!
//! It holds three slots of [`SLOT_LEN`] bytes: a header, then up to [`MAX_FILE_RANGES`] range
//! chunks tagged with the header's generation, then zeros. A range chunk's check value is the
//! CRC inverted, so it can never pass for a header. Slots 0 and 1 (bytes 0 and 2040) take the
//! writes that are fdatasync'd, alternately; slot 2 (byte 4104, in a block of its own) takes
//! the writes that are not, from any thread ([`VolatileAck`]), so they never wait for the
//! writer thread or its fsyncs and never touch a synced slot.
//!
//! The first version of this file was two 24-byte headers and nothing else. Both versions read
//! the same way, chunk by chunk: the position is that of the valid header with the highest
//! generation (this binary takes the highest position of any valid header, which is the same
//! or newer: positions only grow). So a binary from before the ranges reads a new file as a position only (it sees
//! the two headers and no valid chunk besides: it replays what the ranges would have skipped,
//! never skips anything), and when it writes its next header at byte 0 or 24, this binary reads
//! that header back as the newest and ignores the range chunk it overwrote.
//!
//! Invariants kept here:
//! - A write never touches the slot holding the last fdatasync'd state (synced writes take the
//!   other of slots 0 and 1, unsynced ones slot 2), so a power cut during any write leaves that
//!   state readable; a torn chunk fails its CRC and is ignored, a range chunk only counts with
//!   the generation of a valid header.
//! - [`AckFile::write`] is durable when it returns (one `pwrite`, one fdatasync) and
//!   [`AckFile::holds`] names only that; [`VolatileAck::write_with`] is one `pwrite` (it
//!   survives a process crash, the page cache keeps it, but not a power cut).
//! - Generations come from one counter shared by both kinds of write: each header's is new.
//! - Acknowledgements only grow, so every range ever written holds acknowledged sequences:
//!   recovery takes the union of the valid ones, and cuts any past the records.
//! - More ranges than [`MAX_FILE_RANGES`]: the lowest are written; the others are replayed
//!   after a crash.
//! - The first write makes the file all three slots long (6144 bytes, two blocks): later
//!   updates overwrite blocks the file already has and need no free space. The queue writes it when it
//!   opens, while there is room.
//! - The position on disk is the higher of this file's and the highest ack record in the
//!   newest segment ([`read_ack_position`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::segment::{list_segments, read_whole, scan_segment};
use super::{ACK_WRITE_EVERY, Seq};
use crate::buffer::storage::{OpenMode, RealStorage, Storage, StorageFile};

/// The file's name in the queue directory.
pub(super) const ACK_FILE: &str = "ack";
/// Bytes per chunk (a header or a range).
const CHUNK_LEN: usize = 24;
/// Range chunks per slot: two slots fit one 4 KiB block.
pub const MAX_FILE_RANGES: usize = 84;
/// Bytes per slot: a header and its range chunks.
pub const SLOT_LEN: usize = CHUNK_LEN * (1 + MAX_FILE_RANGES);
/// Where the unsynced slot starts: a whole number of chunks, past the first block.
const VOLATILE_AT: usize = 171 * CHUNK_LEN;
/// The file's length once written.
const FILE_LEN: usize = VOLATILE_AT + SLOT_LEN;

/// What the `ack` file holds: the valid header with the highest generation, and the union of
/// the valid ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckFileContents {
    /// The generation of the newest valid header (0: none).
    pub generation: u64,
    /// Its first unacknowledged sequence (`None`: no valid header).
    pub position: Option<Seq>,
    /// Acknowledged ranges `[start, end)`, possibly overlapping or below the position.
    pub ranges: Vec<(Seq, Seq)>,
    /// Of slots 0 and 1, the one holding the newer valid header: the next synced write goes
    /// to the other.
    slot: usize,
    /// The file's length.
    len: usize,
}

/// Reads the ack file: the first unacknowledged sequence, from the valid header with the
/// highest generation. `Ok(None)` when there is no file or no valid header.
pub fn read_ack_file(dir: &Path) -> io::Result<Option<(u64, Seq)>> {
    read_ack_slots(&RealStorage, dir)
}

/// The whole ack file in `dir`: position and acknowledged ranges.
pub fn read_ack_contents(dir: &Path) -> io::Result<AckFileContents> {
    read_contents(&RealStorage, dir)
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

/// The valid header with the highest generation, as `(generation, position)`.
pub(super) fn read_ack_slots(storage: &dyn Storage, dir: &Path) -> io::Result<Option<(u64, Seq)>> {
    let contents = read_contents(storage, dir)?;
    Ok(contents.position.map(|p| (contents.generation, p)))
}

fn u64_at(chunk: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(chunk[at..at + 8].try_into().unwrap_or_default())
}

fn u32_at(chunk: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(chunk[at..at + 4].try_into().unwrap_or_default())
}

fn read_contents(storage: &dyn Storage, dir: &Path) -> io::Result<AckFileContents> {
    let buf = match read_whole(storage, &dir.join(ACK_FILE)) {
        Ok(buf) => buf,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(AckFileContents::default()),
        Err(e) => return Err(e),
    };
    let mut contents = AckFileContents {
        len: buf.len(),
        ..AckFileContents::default()
    };
    let mut generations = Vec::new();
    let mut tagged = Vec::new();
    let mut synced_generation = None;
    for (i, chunk) in buf.chunks_exact(CHUNK_LEN).enumerate() {
        let crc = crc32c::crc32c(&chunk[0..16]);
        let check = u32_at(chunk, 16);
        let (a, b) = (u64_at(chunk, 0), u64_at(chunk, 8));
        if check == crc {
            generations.push(a as u32);
            contents.generation = contents.generation.max(a);
            contents.position = contents.position.max(Some(b));
            let at = i * CHUNK_LEN;
            if at < VOLATILE_AT && synced_generation.is_none_or(|g| a > g) {
                synced_generation = Some(a);
                contents.slot = (at / SLOT_LEN).min(1);
            }
        } else if check == !crc && a < b {
            tagged.push((u32_at(chunk, 20), (a, b)));
        }
    }
    contents.ranges = tagged
        .into_iter()
        .filter(|(tag, _)| generations.contains(tag))
        .map(|(_, range)| range)
        .collect();
    Ok(contents)
}

/// One slot: its header, then a chunk per range (at most [`MAX_FILE_RANGES`]), then zeros.
fn encode_slot(generation: u64, position: Seq, ranges: &[(Seq, Seq)]) -> Vec<u8> {
    let mut slot = vec![0u8; SLOT_LEN];
    slot[0..8].copy_from_slice(&generation.to_le_bytes());
    slot[8..16].copy_from_slice(&position.to_le_bytes());
    let crc = crc32c::crc32c(&slot[0..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
    let chunks = slot[CHUNK_LEN..].chunks_exact_mut(CHUNK_LEN);
    for (chunk, &(start, end)) in chunks.zip(ranges) {
        chunk[0..8].copy_from_slice(&start.to_le_bytes());
        chunk[8..16].copy_from_slice(&end.to_le_bytes());
        let check = !crc32c::crc32c(&chunk[0..16]);
        chunk[16..20].copy_from_slice(&check.to_le_bytes());
        chunk[20..24].copy_from_slice(&(generation as u32).to_le_bytes());
    }
    slot
}

/// The writer's handle on the ack file: what it holds on disk and where the next write goes.
pub(super) struct AckFile {
    path: PathBuf,
    /// Opened at the first write, kept open after it.
    file: Option<Box<dyn StorageFile>>,
    /// The last generation given to a header (0: none yet), shared with [`VolatileAck`].
    generation: Arc<AtomicU64>,
    /// The file is [`FILE_LEN`] long.
    full: bool,
    /// The slot holding the last fdatasync'd state: writes go to the other one.
    durable_slot: usize,
    /// The position the file holds durably (`None`: no valid header yet).
    holds: Option<Seq>,
    /// The ranges it holds durably.
    holds_ranges: Vec<(Seq, Seq)>,
}

impl AckFile {
    /// What the ack file in `dir` holds now (recovery reads it once, the writer keeps it).
    pub(super) fn read(
        storage: &dyn Storage,
        dir: &Path,
    ) -> io::Result<(AckFile, Vec<(Seq, Seq)>)> {
        let contents = read_contents(storage, dir)?;
        let file = AckFile {
            path: dir.join(ACK_FILE),
            file: None,
            generation: Arc::new(AtomicU64::new(contents.generation)),
            full: contents.len >= FILE_LEN,
            durable_slot: contents.slot,
            holds: contents.position,
            holds_ranges: Vec::new(),
        };
        Ok((file, contents.ranges))
    }

    /// Makes what the file holds now durable (at open: a process that crashed may have left an
    /// unsynced write in the page cache, and recovery is about to delete segments on it).
    pub(super) fn sync_found(&mut self, storage: &dyn Storage) -> io::Result<()> {
        if self.generation.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        self.file_handle(storage)?.sync_data()
    }

    /// The position on disk in the file (`None`: no valid header).
    pub(super) fn holds(&self) -> Option<Seq> {
        self.holds
    }

    /// The ranges the file holds durably.
    pub(super) fn holds_ranges(&self) -> &[(Seq, Seq)] {
        &self.holds_ranges
    }

    /// Whether the file holds `position` and `ranges` durably.
    pub(super) fn holds_all(&self, position: Seq, ranges: &[(Seq, Seq)]) -> bool {
        self.holds == Some(position) && self.holds_ranges == ranges
    }

    /// The writer of the unsynced slot, sharing this file's generations.
    pub(super) fn volatile(&self) -> VolatileAck {
        VolatileAck {
            path: self.path.clone(),
            file: Mutex::new(None),
            generation: self.generation.clone(),
        }
    }

    /// Writes `position` and `ranges` (the lowest [`MAX_FILE_RANGES`] of them) into the slot
    /// not holding the durable state and fdatasyncs; creates the file when missing.
    pub(super) fn write(
        &mut self,
        storage: &dyn Storage,
        position: Seq,
        ranges: &[(Seq, Seq)],
    ) -> io::Result<()> {
        let slot = self.put(storage, position, ranges)?;
        self.file_handle(storage)?.sync_data()?;
        self.durable_slot = slot;
        self.holds = Some(position);
        self.holds_ranges = ranges[..ranges.len().min(MAX_FILE_RANGES)].to_vec();
        Ok(())
    }

    fn file_handle(&mut self, storage: &dyn Storage) -> io::Result<&mut Box<dyn StorageFile>> {
        Ok(match &mut self.file {
            Some(file) => file,
            slot => slot.insert(storage.open(&self.path, OpenMode::OpenOrCreate)?),
        })
    }

    /// One `pwrite` of the next generation into the non-durable slot; returns the slot.
    fn put(
        &mut self,
        storage: &dyn Storage,
        position: Seq,
        ranges: &[(Seq, Seq)],
    ) -> io::Result<usize> {
        let ranges = &ranges[..ranges.len().min(MAX_FILE_RANGES)];
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let slot = 1 - self.durable_slot;
        let bytes = encode_slot(generation, position, ranges);
        let full = self.full;
        let file = self.file_handle(storage)?;
        if !full {
            // Gives the unsynced slot its block now, with this write's fdatasync, while there is
            // room (zeros are no valid chunk).
            file.write_all_at(&[0u8; SLOT_LEN], VOLATILE_AT as u64)?;
        }
        file.write_all_at(&bytes, (slot * SLOT_LEN) as u64)?;
        self.full = true;
        Ok(slot)
    }
}

/// Writes the ack state into slot 2 without an fdatasync, from any thread: after a process
/// crash the page cache still has it, so a restart replays less.
pub(super) struct VolatileAck {
    path: PathBuf,
    /// Opened at the first write, kept open after it.
    file: Mutex<Option<Box<dyn StorageFile>>>,
    generation: Arc<AtomicU64>,
}

impl VolatileAck {
    /// Writes the state `snapshot` returns (taken under this slot's lock, so the last write is
    /// the newest state) into slot 2: one `pwrite`, no fdatasync.
    pub(super) fn write_with(
        &self,
        storage: &dyn Storage,
        snapshot: impl FnOnce() -> (Seq, Vec<(Seq, Seq)>),
    ) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let file = match &mut *file {
            Some(file) => file,
            slot => slot.insert(storage.open(&self.path, OpenMode::OpenOrCreate)?),
        };
        let (position, ranges) = snapshot();
        let ranges = &ranges[..ranges.len().min(MAX_FILE_RANGES)];
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        file.write_all_at(
            &encode_slot(generation, position, ranges),
            VOLATILE_AT as u64,
        )
    }
}

impl super::Shared {
    /// Writes the ack state into the `ack` file's unsynced slot until fewer than
    /// [`ACK_WRITE_EVERY`] acks are left unwritten (blocking file I/O).
    pub(super) fn write_volatile(&self) {
        loop {
            let mut acks = 0;
            let result = self.volatile.write_with(&*self.storage, || {
                let state = self.lock();
                acks = state.acks;
                (state.ack_next, state.ranges.lowest(MAX_FILE_RANGES))
            });
            match result {
                Ok(()) => {
                    self.acks_written.fetch_max(acks, Ordering::AcqRel);
                }
                Err(e) => {
                    // The synced writes log what fails; this one is only a head start, tried
                    // again after the next acks.
                    tracing::debug!(dir = %self.config.dir.display(), error = %e, "cannot write the ack file's unsynced slot");
                    self.volatile_busy.store(false, Ordering::Release);
                    return;
                }
            }
            self.volatile_busy.store(false, Ordering::Release);
            let unwritten = self.lock().acks - self.acks_written.load(Ordering::Acquire);
            if unwritten < ACK_WRITE_EVERY || self.volatile_busy.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::disk::segment::{SEGMENT_MAGIC, segment_path};
    use crate::buffer::record;
    use crate::buffer::storage::FaultStorage;

    fn write_slots(dir: &Path, slots: &[[u8; CHUNK_LEN]]) {
        std::fs::write(dir.join(ACK_FILE), slots.concat()).expect("write ack file");
    }

    /// A header as the first version of the file had it (two of them were the whole file).
    fn encode_ack_slot(generation: u64, seq: Seq) -> [u8; CHUNK_LEN] {
        let mut chunk = [0u8; CHUNK_LEN];
        chunk.copy_from_slice(&encode_slot(generation, seq, &[])[..CHUNK_LEN]);
        chunk
    }

    #[test]
    fn a_slot_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_slots(dir.path(), &[encode_ack_slot(1, 52_311)]);
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((1, 52_311)));
    }

    #[test]
    fn the_valid_slot_with_the_higher_generation_wins_wherever_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_slots(
            dir.path(),
            &[encode_ack_slot(4, 40), encode_ack_slot(3, 30)],
        );
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((4, 40)));
        write_slots(
            dir.path(),
            &[encode_ack_slot(4, 40), encode_ack_slot(5, 50)],
        );
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((5, 50)));
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let older = encode_ack_slot(6, 60);
        for byte in 0..20 {
            let mut newer = encode_ack_slot(7, 70);
            newer[byte] ^= 0x01;
            write_slots(dir.path(), &[older, newer]);
            assert_eq!(
                read_ack_file(dir.path()).expect("read"),
                Some((6, 60)),
                "byte {byte} damaged"
            );
        }
        // Half a slot (a write cut short at the end of the file) is no slot.
        let mut bytes = older.to_vec();
        bytes.extend_from_slice(&encode_ack_slot(7, 70)[..12]);
        std::fs::write(dir.path().join(ACK_FILE), bytes).expect("write");
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((6, 60)));
    }

    #[test]
    fn no_file_or_no_valid_slot_is_no_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_ack_file(dir.path()).expect("read"), None);
        std::fs::write(dir.path().join(ACK_FILE), [0u8; 48]).expect("write");
        assert_eq!(read_ack_file(dir.path()).expect("read"), None);
    }

    #[test]
    fn each_write_goes_to_the_slot_not_holding_the_durable_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        assert_eq!(ack.holds(), None);
        for (i, seq) in [10, 20, 30].into_iter().enumerate() {
            ack.write(&storage, seq, &[]).expect("write");
            assert_eq!(ack.holds(), Some(seq));
            let generation = i as u64 + 1;
            assert_eq!(
                read_ack_file(dir.path()).expect("read"),
                Some((generation, seq))
            );
            assert_eq!(storage.syncs_of(ACK_FILE), generation);
        }
        // Generation 3 is in slot 1, generation 2 (position 20) is still in slot 0; slot 2
        // was given its block, zeroed.
        let bytes = std::fs::read(dir.path().join(ACK_FILE)).expect("read");
        assert_eq!(bytes.len(), FILE_LEN);
        assert_eq!(bytes[..SLOT_LEN], encode_slot(2, 20, &[]));
        assert_eq!(bytes[SLOT_LEN..2 * SLOT_LEN], encode_slot(3, 30, &[]));
        assert!(bytes[VOLATILE_AT..].iter().all(|&b| b == 0));
        // Unsynced writes all go to slot 2, leaving both synced slots alone.
        let volatile = ack.volatile();
        for (position, end) in [(40, 50), (41, 51)] {
            volatile
                .write_with(&storage, || (position, vec![(45, end)]))
                .expect("write");
        }
        assert_eq!(storage.syncs_of(ACK_FILE), 3);
        assert_eq!(ack.holds(), Some(30));
        let bytes = std::fs::read(dir.path().join(ACK_FILE)).expect("read");
        assert_eq!(bytes[..SLOT_LEN], encode_slot(2, 20, &[]));
        assert_eq!(bytes[SLOT_LEN..2 * SLOT_LEN], encode_slot(3, 30, &[]));
        assert_eq!(bytes[VOLATILE_AT..], encode_slot(5, 41, &[(45, 51)]));
        let contents = read_ack_contents(dir.path()).expect("read");
        assert_eq!((contents.generation, contents.position), (5, Some(41)));
        assert_eq!(contents.ranges, [(45, 51)]);
        // Reopened, it goes on from the generation on disk, into the older synced slot.
        let (mut again, ranges) = AckFile::read(&storage, dir.path()).expect("read");
        assert_eq!((again.holds(), ranges), (Some(41), vec![(45, 51)]));
        again.write(&storage, 60, &[]).expect("write");
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((6, 60)));
        let bytes = std::fs::read(dir.path().join(ACK_FILE)).expect("read");
        assert_eq!(bytes[..SLOT_LEN], encode_slot(6, 60, &[]));
    }

    #[test]
    fn a_power_cut_during_unsynced_writes_leaves_the_last_synced_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        ack.write(&storage, 10, &[(12, 15)]).expect("write");
        let volatile = ack.volatile();
        for (position, start) in [(20, 22), (25, 26)] {
            volatile
                .write_with(&storage, || (position, vec![(start, 30)]))
                .expect("write");
        }
        storage.power_cut().expect("power cut");
        let contents = read_ack_contents(dir.path()).expect("read");
        assert_eq!(contents.position, Some(10));
        assert_eq!(contents.ranges, [(12, 15)]);
    }

    #[test]
    fn ranges_round_trip_and_past_the_slot_only_the_lowest_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        let many: Vec<(Seq, Seq)> = (0..100).map(|i| (10 * i + 5, 10 * i + 8)).collect();
        ack.write(&storage, 3, &many).expect("write");
        let contents = read_ack_contents(dir.path()).expect("read");
        assert_eq!(contents.position, Some(3));
        assert_eq!(contents.ranges, many[..MAX_FILE_RANGES]);
        assert!(ack.holds_all(3, &many[..MAX_FILE_RANGES]));
    }

    #[test]
    fn a_range_chunk_never_reads_as_a_header_and_counts_only_with_its_generation() {
        let slot = encode_slot(7, 100, &[(120, 130)]);
        let chunk = &slot[CHUNK_LEN..2 * CHUNK_LEN];
        // What the first version of the file checks for a header fails.
        assert_ne!(crc32c::crc32c(&chunk[0..16]), u32_at(chunk, 16));
        let dir = tempfile::tempdir().expect("tempdir");
        // A range chunk whose header is gone (an older binary overwrote it) does not count.
        let mut bytes = encode_slot(9, 100, &[]);
        bytes.extend_from_slice(chunk);
        std::fs::write(dir.path().join(ACK_FILE), &bytes).expect("write");
        let contents = read_ack_contents(dir.path()).expect("read");
        assert_eq!((contents.position, contents.ranges), (Some(100), vec![]));
    }

    #[test]
    fn a_binary_from_before_the_ranges_reads_a_true_position_from_every_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        ack.write(&storage, 10, &[(12, 15)]).expect("write");
        ack.write(&storage, 16, &[(18, 19)]).expect("write");
        ack.volatile()
            .write_with(&storage, || (17, vec![(18, 30)]))
            .expect("write");
        // How the first version read the file: every 24-byte chunk whose CRC matches is a
        // header; the highest generation wins.
        let bytes = std::fs::read(dir.path().join(ACK_FILE)).expect("read");
        let headers: Vec<(u64, u64)> = bytes
            .chunks_exact(CHUNK_LEN)
            .filter(|c| crc32c::crc32c(&c[0..16]) == u32_at(c, 16))
            .map(|c| (u64_at(c, 0), u64_at(c, 8)))
            .collect();
        assert_eq!(headers, [(2, 16), (1, 10), (3, 17)]);
    }

    #[test]
    fn a_header_an_older_binary_wrote_over_a_range_chunk_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        ack.write(&storage, 10, &[]).expect("write"); // generation 1, slot 1
        ack.write(&storage, 20, &[(25, 30)]).expect("write"); // generation 2, slot 0
        // An older binary writes generation 3 at byte 24: slot 0's first range chunk.
        let mut bytes = std::fs::read(dir.path().join(ACK_FILE)).expect("read");
        bytes[CHUNK_LEN..2 * CHUNK_LEN].copy_from_slice(&encode_ack_slot(3, 22));
        std::fs::write(dir.path().join(ACK_FILE), &bytes).expect("write");
        let contents = read_ack_contents(dir.path()).expect("read");
        assert_eq!((contents.generation, contents.position), (3, Some(22)));
        assert_eq!(contents.ranges, []);
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        ack.write(&storage, 31, &[]).expect("write");
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((4, 31)));
    }

    #[test]
    fn a_failed_write_leaves_the_previous_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (mut ack, _) = AckFile::read(&storage, dir.path()).expect("read");
        ack.write(&storage, 5, &[]).expect("write");
        storage.read_only(true);
        assert!(ack.write(&storage, 9, &[]).is_err());
        assert_eq!(ack.holds(), Some(5));
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((1, 5)));
        storage.read_only(false);
        ack.write(&storage, 9, &[]).expect("write");
        // The failed write used generation 2: generations are unique, not gapless.
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((3, 9)));
    }

    #[test]
    fn the_position_on_disk_is_the_higher_of_the_file_and_the_newest_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_ack_position(dir.path()).expect("read"), None);
        write_slots(dir.path(), &[encode_ack_slot(1, 12)]);
        assert_eq!(read_ack_position(dir.path()).expect("read"), Some(12));
        // An older segment's ack record does not count, the newest one's does.
        let mut older = SEGMENT_MAGIC.to_vec();
        record::encode_ack(99, &mut older);
        std::fs::write(segment_path(dir.path(), 0), &older).expect("write");
        let mut newest = SEGMENT_MAGIC.to_vec();
        record::encode_ack(15, &mut newest);
        std::fs::write(segment_path(dir.path(), 10), &newest).expect("write");
        assert_eq!(read_ack_position(dir.path()).expect("read"), Some(15));
        write_slots(dir.path(), &[encode_ack_slot(2, 20)]);
        assert_eq!(read_ack_position(dir.path()).expect("read"), Some(20));
    }
}
