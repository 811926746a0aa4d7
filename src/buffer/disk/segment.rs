//! A segment file on its own: its name, its header, and what its bytes hold.
//!
//! A segment is named `segment-<first sequence, 20 digits>.log` and starts with the 8-byte
//! magic: [`SEGMENT_MAGIC`] (may hold ack records) or [`SEGMENT_MAGIC_V1`] (written before ack
//! records existed; read, never appended to). Records follow (`record.rs`).
//!
//! Invariants kept here:
//! - A name and its sequence convert both ways: [`segment_path`] writes what
//!   [`parse_segment_name`] reads. Other files in the directory are not segments.
//! - Listing orders segments by the sequence in their name (oldest first), which is also the
//!   order they were written in.
//! - [`scan_segment`] is pure: it decides from the bytes alone where the valid records end, so
//!   recovery can cut a torn tail and never a whole record.

use std::io;
use std::path::{Path, PathBuf};

use super::Seq;
use crate::buffer::record::{self, Decoded};
use crate::buffer::storage::{OpenMode, RealStorage, Storage};

/// Every new segment file starts with this; a different format gets a different magic.
/// `MLBSEG02` segments may hold ack records (see `record.rs`).
pub const SEGMENT_MAGIC: &[u8; 8] = b"MLBSEG02";
/// The magic of segments written before ack records existed: still read (they hold no ack
/// records), never appended to (the first append after start-up begins a new segment).
pub const SEGMENT_MAGIC_V1: &[u8; 8] = b"MLBSEG01";
/// Length of the header; a segment no longer than this holds no record.
pub(super) const MAGIC_LEN: u64 = SEGMENT_MAGIC.len() as u64;

/// The path of the segment whose first sequence is `first_seq`.
pub(super) fn segment_path(dir: &Path, first_seq: Seq) -> PathBuf {
    dir.join(format!("segment-{first_seq:020}.log"))
}

/// The first sequence a segment file name carries; `None` for any other file.
pub(super) fn parse_segment_name(name: &str) -> Option<Seq> {
    name.strip_prefix("segment-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// Reads a whole file through `storage`.
pub(super) fn read_whole(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let file = storage.open(path, OpenMode::Read)?;
    let mut buf = vec![0u8; file.size()? as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The first bytes of a new segment: the magic, then an ack record when `ack` is given.
pub(super) fn segment_head(ack: Option<Seq>) -> Vec<u8> {
    let mut head = SEGMENT_MAGIC.to_vec();
    if let Some(position) = ack {
        record::encode_ack(position, &mut head);
    }
    head
}

/// The segment files in `dir` with their first sequences, oldest first; other files are
/// ignored.
pub(super) fn list_segments(storage: &dyn Storage, dir: &Path) -> io::Result<Vec<(Seq, PathBuf)>> {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::core::envelope::Message;

    /// A small message whose payload tells which record it is.
    pub(crate) fn message(payload: &str) -> Message {
        Message {
            id: uuid::Uuid::from_u128(0x0123_4567_89ab_7def_8123_4567_89ab_cdef),
            topic: "t".to_owned(),
            payload: payload.as_bytes().to_vec(),
            qos: 1,
            retain: false,
            properties: None,
        }
    }

    /// A segment image: the magic, then one record per `(seq, payload)`.
    pub(crate) fn segment_bytes(records: &[(Seq, &str)]) -> Vec<u8> {
        let mut bytes = SEGMENT_MAGIC.to_vec();
        for (seq, payload) in records {
            record::encode(*seq, &message(payload), &mut bytes);
        }
        bytes
    }

    #[test]
    fn a_segment_name_and_its_first_sequence_convert_both_ways() {
        let dir = Path::new("/q");
        for seq in [0, 1, 52_311, u64::MAX] {
            let path = segment_path(dir, seq);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            assert_eq!(name.len(), "segment-".len() + 20 + ".log".len(), "{name}");
            assert_eq!(parse_segment_name(name), Some(seq), "{name}");
        }
        assert_eq!(
            segment_path(dir, 52_311),
            Path::new("/q/segment-00000000000000052311.log")
        );
    }

    #[test]
    fn other_files_are_not_segments() {
        for name in [
            "ack",
            "dead-letters.jsonl",
            "segment-00000000000000000001.tmp",
            "segment-.log",
            "segment-abc.log",
            "segment--1.log",
            "xsegment-00000000000000000001.log",
        ] {
            assert_eq!(parse_segment_name(name), None, "{name}");
        }
    }

    #[test]
    fn listing_orders_segments_by_their_first_sequence_and_ignores_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "segment-00000000000000000100.log",
            "ack",
            "segment-00000000000000000002.log",
            "segment-00000000000000000030.log",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        let listed = list_segments(&RealStorage, dir.path()).expect("list");
        let seqs: Vec<Seq> = listed.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, [2, 30, 100]);
        assert_eq!(
            segment_files(dir.path()).expect("files"),
            [2, 30, 100].map(|seq| segment_path(dir.path(), seq))
        );
    }

    #[test]
    fn a_whole_segment_scans_to_its_end() {
        let mut bytes = segment_bytes(&[(7, "a"), (8, "b")]);
        record::encode_ack(8, &mut bytes);
        record::encode_ack(6, &mut bytes);
        let scan = scan_segment(&bytes);
        assert_eq!(
            scan,
            ScanResult {
                valid_end: bytes.len() as u64,
                next_seq: Some(9),
                ack: Some(8),
                v1: false,
                corrupt_bytes: 0,
                tail_bytes: 0,
            }
        );
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail_after_the_first() {
        let first = segment_bytes(&[(0, "first")]);
        let both = segment_bytes(&[(0, "first"), (1, "second")]);
        for cut in first.len()..both.len() {
            let scan = scan_segment(&both[..cut]);
            assert_eq!(scan.valid_end, first.len() as u64, "cut at {cut}");
            assert_eq!(scan.next_seq, Some(1), "cut at {cut}");
            assert_eq!(scan.tail_bytes, (cut - first.len()) as u64, "cut at {cut}");
            assert_eq!(scan.corrupt_bytes, 0, "cut at {cut}");
        }
    }

    #[test]
    fn a_corrupt_record_in_the_middle_is_skipped_and_counted() {
        let before = segment_bytes(&[(0, "zero")]);
        let mut bytes = segment_bytes(&[(0, "zero"), (1, "one"), (2, "two")]);
        let middle = segment_bytes(&[(0, "zero"), (1, "one")]).len() - before.len();
        // Flip a payload byte of record 1: its CRC no longer matches.
        bytes[before.len() + middle - 1] ^= 0xFF;
        let scan = scan_segment(&bytes);
        assert_eq!(scan.valid_end, bytes.len() as u64);
        assert_eq!(scan.next_seq, Some(3));
        assert_eq!(scan.corrupt_bytes, middle as u64);
        assert_eq!(scan.tail_bytes, 0);
    }

    #[test]
    fn a_file_without_a_known_magic_is_all_tail() {
        for bytes in [&b""[..], b"MLB", b"MLBSEG99rest", &[0u8; 64]] {
            let scan = scan_segment(bytes);
            assert_eq!(scan.valid_end, 0, "{bytes:?}");
            assert_eq!(scan.tail_bytes, bytes.len() as u64, "{bytes:?}");
            assert_eq!(scan.next_seq, None, "{bytes:?}");
        }
    }

    #[test]
    fn an_old_segment_is_read_and_marked_v1() {
        let mut bytes = SEGMENT_MAGIC_V1.to_vec();
        record::encode(4, &message("old"), &mut bytes);
        let scan = scan_segment(&bytes);
        assert!(scan.v1);
        assert_eq!(scan.next_seq, Some(5));
        assert_eq!(scan.valid_end, bytes.len() as u64);
    }

    #[test]
    fn a_new_segment_head_carries_the_position_only_when_asked() {
        assert_eq!(segment_head(None), SEGMENT_MAGIC.to_vec());
        let head = segment_head(Some(42));
        assert_eq!(head.len(), SEGMENT_MAGIC.len() + record::ACK_RECORD_LEN);
        let scan = scan_segment(&head);
        assert_eq!(scan.ack, Some(42));
        assert_eq!(scan.next_seq, None);
        assert_eq!(scan.valid_end, head.len() as u64);
    }
}
