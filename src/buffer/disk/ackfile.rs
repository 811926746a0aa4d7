//! The `ack` file: where the ack position rests when no group commit carries it.
//!
//! It holds two 24-byte slots, each `generation (u64 LE) | first unacknowledged sequence (u64
//! LE) | CRC32C of those 16 bytes (u32 LE) | 4 zero bytes`. Generation `g` goes to slot
//! `g % 2`, so each update overwrites the older slot.
//!
//! Invariants kept here:
//! - A torn write damages one slot only; the other still holds the previous position. A
//!   reader takes the valid slot with the highest generation and ignores a slot whose CRC does
//!   not match, so it sees the old or the new position, never a mix.
//! - An update is durable when [`AckFile::write`] returns (one `pwrite`, one fdatasync), and
//!   [`AckFile::holds`] names what is on disk only after that.
//! - Generation 1 goes to the second slot, so the first write makes the file both slots long:
//!   later updates overwrite blocks the file already has and need no free space. The queue
//!   writes it when it opens, while there is room.
//! - The position on disk is the higher of this file's and the highest ack record in the
//!   newest segment ([`read_ack_position`]).

use std::io;
use std::path::{Path, PathBuf};

use super::Seq;
use super::segment::{list_segments, read_whole, scan_segment};
use crate::buffer::storage::{OpenMode, RealStorage, Storage, StorageFile};

/// The file's name in the queue directory.
pub(super) const ACK_FILE: &str = "ack";
/// Bytes per slot.
const ACK_SLOT_LEN: u64 = 24;

/// Reads the ack file: the first unacknowledged sequence, from the valid slot with the highest
/// generation. `Ok(None)` when there is no file or no valid slot.
pub fn read_ack_file(dir: &Path) -> io::Result<Option<(u64, Seq)>> {
    read_ack_slots(&RealStorage, dir)
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

/// The valid slot with the highest generation, as `(generation, position)`.
pub(super) fn read_ack_slots(storage: &dyn Storage, dir: &Path) -> io::Result<Option<(u64, Seq)>> {
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

/// The writer's handle on the ack file: what it holds and the generation it was written with.
pub(super) struct AckFile {
    path: PathBuf,
    /// Opened at the first write, kept open after it.
    file: Option<Box<dyn StorageFile>>,
    /// Generation of the last slot written (0: none yet).
    generation: u64,
    /// The position the file holds on disk (`None`: no valid slot yet).
    holds: Option<Seq>,
}

impl AckFile {
    /// What the ack file in `dir` holds now (recovery reads it once, the writer keeps it).
    pub(super) fn read(storage: &dyn Storage, dir: &Path) -> io::Result<AckFile> {
        let slot = read_ack_slots(storage, dir)?;
        Ok(AckFile {
            path: dir.join(ACK_FILE),
            file: None,
            generation: slot.map_or(0, |(generation, _)| generation),
            holds: slot.map(|(_, seq)| seq),
        })
    }

    /// The position on disk in the file (`None`: no valid slot).
    pub(super) fn holds(&self) -> Option<Seq> {
        self.holds
    }

    /// Writes `seq` over the older slot and fdatasyncs; creates the file when missing.
    pub(super) fn write(&mut self, storage: &dyn Storage, seq: Seq) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            slot => slot.insert(storage.open(&self.path, OpenMode::OpenOrCreate)?),
        };
        let generation = self.generation + 1;
        let slot = encode_ack_slot(generation, seq);
        file.write_all_at(&slot, (generation % 2) * ACK_SLOT_LEN)?;
        file.sync_data()?;
        self.generation = generation;
        self.holds = Some(seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::disk::segment::{SEGMENT_MAGIC, segment_path};
    use crate::buffer::record;
    use crate::buffer::storage::FaultStorage;

    fn write_slots(dir: &Path, slots: &[[u8; ACK_SLOT_LEN as usize]]) {
        std::fs::write(dir.join(ACK_FILE), slots.concat()).expect("write ack file");
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
    fn each_write_overwrites_the_older_slot_and_syncs_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let mut ack = AckFile::read(&storage, dir.path()).expect("read");
        assert_eq!(ack.holds(), None);
        for (i, seq) in [10, 20, 30].into_iter().enumerate() {
            ack.write(&storage, seq).expect("write");
            assert_eq!(ack.holds(), Some(seq));
            let generation = i as u64 + 1;
            assert_eq!(
                read_ack_file(dir.path()).expect("read"),
                Some((generation, seq))
            );
            assert_eq!(storage.syncs_of(ACK_FILE), generation);
        }
        // Generation 3 is in slot 1, generation 2 (position 20) is still in slot 0.
        let bytes = std::fs::read(dir.path().join(ACK_FILE)).expect("read");
        assert_eq!(bytes.len(), 2 * ACK_SLOT_LEN as usize);
        assert_eq!(bytes[..24], encode_ack_slot(2, 20));
        assert_eq!(bytes[24..], encode_ack_slot(3, 30));
        // Reopened, it goes on from the generation on disk.
        let mut again = AckFile::read(&storage, dir.path()).expect("read");
        assert_eq!(again.holds(), Some(30));
        again.write(&storage, 40).expect("write");
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((4, 40)));
    }

    #[test]
    fn a_failed_write_leaves_the_previous_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let mut ack = AckFile::read(&storage, dir.path()).expect("read");
        ack.write(&storage, 5).expect("write");
        storage.read_only(true);
        assert!(ack.write(&storage, 9).is_err());
        assert_eq!(ack.holds(), Some(5));
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((1, 5)));
        storage.read_only(false);
        ack.write(&storage, 9).expect("write");
        assert_eq!(read_ack_file(dir.path()).expect("read"), Some((2, 9)));
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
