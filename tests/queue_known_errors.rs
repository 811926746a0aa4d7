//! The disk queue against damaged files: each known error is made on disk, then the queue is
//! reopened and must recover as far as possible, count what it could not read, and go on.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqtt_lambda_bridge::buffer::disk::{
    SEGMENT_MAGIC, SEGMENT_MAGIC_V1, read_ack_file, read_ack_position, segment_files,
};
use mqtt_lambda_bridge::buffer::{DiskQueue, DiskQueueConfig, Queue, record};
use mqtt_lambda_bridge::core::config::WhenFull;
use mqtt_lambda_bridge::core::envelope::Message;

fn config(dir: &Path) -> DiskQueueConfig {
    DiskQueueConfig {
        dir: dir.to_owned(),
        segment_size: 1024,
        max_size: 1 << 30,
        when_full: WhenFull::Block,
        max_age: None,
        max_ack_delay: std::time::Duration::ZERO,
    }
}

/// One segment holds everything these tests write.
fn big_segments(dir: &Path) -> DiskQueueConfig {
    DiskQueueConfig {
        segment_size: 1 << 20,
        ..config(dir)
    }
}

fn msg(n: u32) -> Message {
    Message::received(
        format!("t/{n}"),
        format!("payload number {n:05} with some padding to make it longer").into_bytes(),
        1,
        false,
        SystemTime::now(),
    )
}

fn numbers(messages: &[Message]) -> Vec<u32> {
    messages
        .iter()
        .map(|m| m.topic[2..].parse().expect("topic number"))
        .collect()
}

async fn fill(dir: &Path, n: u32) {
    let q = DiskQueue::open(config(dir)).expect("open");
    for i in 0..n {
        q.append(vec![msg(i)]).await.expect("append");
    }
    q.close().await;
}

async fn drain(q: &DiskQueue) -> Vec<Message> {
    let mut out = Vec::new();
    loop {
        let got = q.read_ready(100).await.expect("read");
        if got.is_empty() {
            return out;
        }
        out.extend(got.into_iter().map(|e| e.message));
    }
}

#[tokio::test]
async fn a_clean_restart_resumes_at_the_ack_position_and_deletes_delivered_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 50).await;
    let before = segment_files(dir.path()).expect("list").len();
    assert!(before > 3, "tiny segments roll over: {before}");
    {
        let q = DiskQueue::open(config(dir.path())).expect("open");
        let got = q.read_ready(30).await.expect("read");
        assert_eq!(
            numbers(&got.iter().map(|e| e.message.clone()).collect::<Vec<_>>()),
            (0..30).collect::<Vec<_>>()
        );
        q.ack(got[29].seq).await.expect("ack");
        q.close().await;
    }
    assert!(
        segment_files(dir.path()).expect("list").len() < before,
        "delivered segments deleted"
    );
    let q = DiskQueue::open(config(dir.path())).expect("open");
    assert_eq!(numbers(&drain(&q).await), (30..50).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_truncated_tail_is_cut_and_appending_continues() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 20).await;
    let newest = segment_files(dir.path())
        .expect("list")
        .pop()
        .expect("a segment");
    let len = std::fs::metadata(&newest).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .expect("open");
    file.set_len(len - 5).expect("truncate"); // power cut mid-write
    drop(file);

    let q = DiskQueue::open(config(dir.path())).expect("open");
    assert!(q.counters().corrupt_bytes.load(Ordering::Relaxed) > 0);
    q.append(vec![msg(100)])
        .await
        .expect("append after recovery");
    let got = numbers(&drain(&q).await);
    assert_eq!(got, (0..19).chain([100]).collect::<Vec<_>>());
}

#[tokio::test]
async fn flipped_bytes_in_an_older_segment_lose_that_record_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 30).await;
    let first = segment_files(dir.path()).expect("list").remove(0);
    let mut bytes = std::fs::read(&first).expect("read");
    // Inside the second record's payload (the first starts after the 8-byte magic).
    let flip = 8 + 100 + 60;
    bytes[flip] ^= 0xff;
    std::fs::write(&first, bytes).expect("write");

    let q = DiskQueue::open(config(dir.path())).expect("open");
    let got = numbers(&drain(&q).await);
    assert_eq!(got.len(), 29, "{got:?}");
    assert!(!got.contains(&1), "the damaged record is skipped: {got:?}");
    assert_eq!(q.counters().lost.load(Ordering::Relaxed), 1);
    assert!(q.counters().corrupt_bytes.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn a_zero_length_newest_segment_is_recovered() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 10).await;
    let newest = segment_files(dir.path())
        .expect("list")
        .pop()
        .expect("a segment");
    std::fs::write(&newest, b"").expect("empty it");
    let q = DiskQueue::open(config(dir.path())).expect("open");
    q.append(vec![msg(200)]).await.expect("append");
    let got = numbers(&drain(&q).await);
    assert!(got.ends_with(&[200]), "{got:?}");
    assert!(got.len() < 11);
}

#[tokio::test]
async fn a_missing_segment_is_a_counted_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 40).await;
    let files = segment_files(dir.path()).expect("list");
    assert!(files.len() >= 4);
    std::fs::remove_file(&files[1]).expect("delete one");
    let q = DiskQueue::open(config(dir.path())).expect("open");
    let got = numbers(&drain(&q).await);
    let lost = q.counters().lost.load(Ordering::Relaxed) as usize;
    assert!(lost > 0);
    assert_eq!(got.len() + lost, 40, "every record is delivered or counted");
    assert!(got.starts_with(&[0]) && got.ends_with(&[39]));
}

#[tokio::test]
async fn an_ack_file_from_the_future_means_everything_was_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 10).await;
    // Generation 9, first unacked sequence 1000, valid CRC.
    let mut slot = [0u8; 24];
    slot[0..8].copy_from_slice(&9u64.to_le_bytes());
    slot[8..16].copy_from_slice(&1000u64.to_le_bytes());
    let crc = crc32c::crc32c(&slot[0..16]);
    slot[16..20].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.path().join("ack"), slot).expect("write ack");

    let q = DiskQueue::open(config(dir.path())).expect("open");
    assert!(drain(&q).await.is_empty());
    q.append(vec![msg(7)]).await.expect("append");
    let got = q.read_ready(10).await.expect("read");
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].seq, 1000,
        "sequence numbers continue above the ack position"
    );
    q.close().await;
    let q = DiskQueue::open(config(dir.path())).expect("reopen");
    assert_eq!(numbers(&drain(&q).await), vec![7]);
}

#[tokio::test]
async fn a_garbage_ack_file_replays_from_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path(), 5).await;
    std::fs::write(dir.path().join("ack"), [0xAB; 48]).expect("garbage");
    let q = DiskQueue::open(config(dir.path())).expect("open");
    assert_eq!(numbers(&drain(&q).await), (0..5).collect::<Vec<_>>());
}

#[tokio::test]
async fn garbage_after_the_magic_of_the_only_segment_never_stops_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path()).expect("dir");
    let mut junk = b"MLBSEG01".to_vec();
    junk.extend((0..5000u32).map(|i| (i * 7919 % 251) as u8));
    std::fs::write(dir.path().join("segment-00000000000000000000.log"), junk).expect("write");
    std::fs::write(dir.path().join("segment-notanumber.log"), b"x").expect("write");
    let q = DiskQueue::open(config(dir.path())).expect("open");
    assert!(drain(&q).await.is_empty());
    q.append(vec![msg(1)]).await.expect("append");
    assert_eq!(numbers(&drain(&q).await), vec![1]);
}

#[tokio::test]
async fn drop_oldest_deletes_whole_segments_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.when_full = WhenFull::DropOldest;
    c.max_size = 4096;
    let q = DiskQueue::open(c).expect("open");
    for i in 0..200 {
        q.append(vec![msg(i)]).await.expect("append");
    }
    let stats = q.stats();
    assert!(stats.bytes <= 4096 + 1024, "{stats:?}");
    let dropped = q.counters().dropped_oldest.load(Ordering::Relaxed) as usize;
    let got = numbers(&drain(&q).await);
    assert!(dropped > 0);
    assert_eq!(got.len() + dropped, 200, "kept + dropped = appended");
    assert_eq!(*got.last().expect("newest kept"), 199);
}

#[tokio::test]
async fn drop_newest_refuses_new_messages_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.when_full = WhenFull::DropNewest;
    c.max_size = 4096;
    let q = DiskQueue::open(c).expect("open");
    for i in 0..200 {
        q.append(vec![msg(i)]).await.expect("append");
    }
    let dropped = q.counters().dropped_newest.load(Ordering::Relaxed) as usize;
    let got = numbers(&drain(&q).await);
    assert!(dropped > 0);
    assert_eq!(got.len() + dropped, 200);
    assert_eq!(got[0], 0, "the oldest are kept");
}

#[tokio::test]
async fn block_waits_for_acks_instead_of_dropping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.when_full = WhenFull::Block;
    c.max_size = 4096;
    let q = std::sync::Arc::new(DiskQueue::open(c).expect("open"));
    let writer = {
        let q = q.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                q.append(vec![msg(i)]).await.expect("append");
            }
        })
    };
    let mut got = Vec::new();
    while got.len() < 200 {
        let entries = tokio::time::timeout(Duration::from_secs(20), q.read(10))
            .await
            .expect("progress")
            .expect("read");
        assert!(q.stats().bytes <= 4096 + 2048, "{:?}", q.stats());
        q.ack(entries.last().expect("entries").seq)
            .await
            .expect("ack");
        got.extend(entries.into_iter().map(|e| e.message));
    }
    writer.await.expect("writer");
    assert_eq!(numbers(&got), (0..200).collect::<Vec<_>>());
    assert_eq!(q.counters().dropped_oldest.load(Ordering::Relaxed), 0);
    assert_eq!(q.counters().dropped_newest.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn messages_older_than_max_age_are_dropped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.max_age = Some(Duration::from_secs(3600));
    let q = DiskQueue::open(c).expect("open");
    let old = Message::received(
        "t/1".into(),
        b"old".to_vec(),
        1,
        false,
        SystemTime::now() - Duration::from_secs(2 * 3600),
    );
    q.append(vec![old, msg(2)]).await.expect("append");
    assert_eq!(numbers(&drain(&q).await), vec![2]);
    assert_eq!(q.counters().expired.load(Ordering::Relaxed), 1);
}

/// A message stamped while the clock was unset (1970, before NTP) has no age anyone can know:
/// it counts from the daemon's start, so the clock being set does not expire it.
#[tokio::test]
async fn a_message_stamped_before_the_clock_was_set_is_not_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.max_age = Some(Duration::from_secs(3600));
    let q = DiskQueue::open(c).expect("open");
    let unset = Message::received(
        "t/1".into(),
        b"stamped in 1970".to_vec(),
        1,
        false,
        UNIX_EPOCH + Duration::from_secs(1),
    );
    q.append(vec![unset, msg(2)]).await.expect("append");
    assert_eq!(numbers(&drain(&q).await), vec![1, 2]);
    assert_eq!(q.counters().expired.load(Ordering::Relaxed), 0);
}

/// Kill -9 right after an append that carried a moved ack position: the ack file still holds
/// the older position, the newest segment's ack record the newer one, and recovery takes it.
#[tokio::test]
async fn recovery_takes_the_newest_ack_record_over_an_older_ack_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = DiskQueue::open(big_segments(dir.path())).expect("open");
    q.append((0..10).map(msg).collect()).await.expect("append");
    let got = q.read_ready(10).await.expect("read");
    q.ack(got[5].seq).await.expect("ack");
    q.append(vec![msg(10)]).await.expect("append");
    q.abandon();

    let file = read_ack_file(dir.path())
        .expect("ack file")
        .map(|(_, at)| at);
    assert_eq!(
        file,
        Some(0),
        "the ack file was not written (appends kept coming)"
    );
    assert_eq!(read_ack_position(dir.path()).expect("position"), Some(6));
    let q = DiskQueue::open(big_segments(dir.path())).expect("reopen");
    assert_eq!(numbers(&drain(&q).await), (6..=10).collect::<Vec<_>>());
    assert_eq!(q.counters().lost.load(Ordering::Relaxed), 0);
    assert_eq!(q.counters().corrupt_bytes.load(Ordering::Relaxed), 0);
}

/// A segment written before ack records existed (magic MLBSEG01, made here by hand) is read
/// whole, never gets an ack record, and the next append starts an MLBSEG02 segment.
#[tokio::test]
async fn a_segment_in_the_old_format_is_read_and_never_appended_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join("segment-00000000000000000000.log");
    let mut bytes = SEGMENT_MAGIC_V1.to_vec();
    for n in 0..5u32 {
        record::encode(u64::from(n), &msg(n), &mut bytes);
    }
    std::fs::write(&old, &bytes).expect("write old segment");

    let q = DiskQueue::open(big_segments(dir.path())).expect("open");
    let got = q.read_ready(100).await.expect("read");
    assert_eq!(
        numbers(&got.iter().map(|e| e.message.clone()).collect::<Vec<_>>()),
        [0, 1, 2, 3, 4]
    );
    q.ack(got[2].seq).await.expect("ack");
    q.append(vec![msg(5)]).await.expect("append");
    q.close().await;
    drop(q);

    assert_eq!(
        std::fs::read(&old).expect("old segment"),
        bytes,
        "the old segment is untouched"
    );
    let files = segment_files(dir.path()).expect("list");
    let newest = files.last().expect("a segment");
    assert_eq!(
        newest.file_name().expect("name"),
        "segment-00000000000000000005.log"
    );
    assert_eq!(&std::fs::read(newest).expect("newest")[..8], SEGMENT_MAGIC);
    let q = DiskQueue::open(big_segments(dir.path())).expect("reopen");
    assert_eq!(numbers(&drain(&q).await), [3, 4, 5]);
    assert_eq!(q.counters().lost.load(Ordering::Relaxed), 0);
    assert_eq!(q.counters().corrupt_bytes.load(Ordering::Relaxed), 0);
}

/// Every append after an ack carries an ack record (and small segments roll over often, each
/// new one opening with one): readers, live and after a restart, see only messages, with
/// contiguous sequence numbers and nothing counted lost or corrupt.
#[tokio::test]
async fn ack_records_are_never_handed_to_readers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = DiskQueue::open(config(dir.path())).expect("open");
    for n in 0..40u32 {
        q.append(vec![msg(n)]).await.expect("append");
        let got = q.read_ready(10).await.expect("read");
        assert_eq!(got.len(), 1, "message {n}");
        assert_eq!(got[0].seq, u64::from(n));
        assert_eq!(numbers(&[got[0].message.clone()]), [n]);
        q.ack(got[0].seq).await.expect("ack");
        assert_eq!(q.stats().pending, 0);
    }
    q.append(vec![msg(40), msg(41)]).await.expect("append");
    assert_eq!(q.stats().pending, 2);
    assert!(
        segment_files(dir.path()).expect("list").len() <= 2,
        "delivered segments are deleted on the strength of the ack records"
    );
    q.abandon();

    let q = DiskQueue::open(config(dir.path())).expect("reopen");
    assert_eq!(q.stats().pending, 2);
    let got = q.read_ready(100).await.expect("read");
    assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), [40, 41]);
    assert_eq!(q.counters().lost.load(Ordering::Relaxed), 0);
    assert_eq!(q.counters().corrupt_bytes.load(Ordering::Relaxed), 0);
}

/// A power cut in the middle of an ack record at the end of the newest segment: it is cut
/// like any torn record, and the position falls back to what the ack file holds.
#[tokio::test]
async fn a_torn_ack_record_at_the_tail_is_cut_like_any_torn_record() {
    const TORN_OFF: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let q = DiskQueue::open(big_segments(dir.path())).expect("open");
    q.append((0..5).map(msg).collect()).await.expect("append");
    let got = q.read_ready(10).await.expect("read");
    q.ack(got[2].seq).await.expect("ack");
    q.append(vec![msg(5)]).await.expect("append"); // [message 5][ack record: 3]
    q.abandon();
    assert_eq!(read_ack_position(dir.path()).expect("position"), Some(3));
    let newest = segment_files(dir.path())
        .expect("list")
        .pop()
        .expect("a segment");
    let len = std::fs::metadata(&newest).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .expect("open");
    file.set_len(len - TORN_OFF).expect("truncate");
    drop(file);

    let q = DiskQueue::open(big_segments(dir.path())).expect("reopen");
    assert_eq!(
        q.counters().corrupt_bytes.load(Ordering::Relaxed),
        record::ACK_RECORD_LEN as u64 - TORN_OFF
    );
    assert_eq!(
        std::fs::metadata(&newest).expect("meta").len(),
        len - record::ACK_RECORD_LEN as u64
    );
    assert_eq!(numbers(&drain(&q).await), [0, 1, 2, 3, 4, 5]);
    q.append(vec![msg(6)]).await.expect("append after recovery");
    assert_eq!(numbers(&drain(&q).await), [6]);
    assert_eq!(q.counters().lost.load(Ordering::Relaxed), 0);
}
