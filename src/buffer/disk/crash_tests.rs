//! What a crash replays: a process crash (the queue abandoned, as kill -9 leaves it) and a
//! power cut ([`FaultStorage::power_cut`]) against the bounds in the module head, with acks in
//! order and out of order.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::tests::config;
use super::{
    ACK_PERSIST_INTERVAL, ACK_SYNC_EVERY, ACK_WRITE_EVERY, DiskQueue, DiskQueueConfig, Queue, Seq,
    read_ack_contents, segment,
};
use crate::buffer::storage::FaultStorage;

/// Opens a queue on `storage` and appends `n` messages, all read (handed out).
async fn filled(dir: &Path, storage: &FaultStorage, n: usize) -> DiskQueue {
    let config = DiskQueueConfig {
        segment_size: 1 << 20,
        ..config(dir)
    };
    let queue = DiskQueue::open_with(config, Arc::new(storage.clone())).expect("open");
    let messages = (0..n).map(|i| segment::tests::message(&i.to_string()));
    queue.append(messages.collect()).await.expect("append");
    let mut read = 0;
    while read < n {
        read += queue.read(n).await.expect("read").len();
    }
    queue
}

/// Every sequence a reopened queue hands out.
async fn replayed(dir: &Path, storage: &FaultStorage) -> Vec<Seq> {
    let queue = DiskQueue::open_with(config(dir), Arc::new(storage.clone())).expect("reopen");
    let mut seqs = Vec::new();
    loop {
        let entries = queue.read_ready(100_000).await.expect("read");
        if entries.is_empty() {
            return seqs;
        }
        seqs.extend(entries.iter().map(|e| e.seq));
    }
}

/// What a failing bound check prints: how many, and the first few.
fn summary(seqs: &[Seq]) -> String {
    format!(
        "{} replayed, first {:?}",
        seqs.len(),
        &seqs[..seqs.len().min(10)]
    )
}

#[tokio::test]
async fn a_process_crash_replays_at_most_write_every_acks_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let queue = filled(dir.path(), &storage, 1000).await;
    for seq in 0..1000 {
        queue.ack(seq).await.expect("ack");
    }
    queue.abandon();
    let seqs = replayed(dir.path(), &storage).await;
    assert!(seqs.len() < ACK_WRITE_EVERY as usize, "{}", summary(&seqs));
}

#[tokio::test]
async fn a_process_crash_replays_what_was_in_flight_not_everything_acked_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let queue = filled(dir.path(), &storage, 1000).await;
    // 0 and 500 are slow invocations; everything else was accepted, out of order.
    for seq in (1..1000).rev().filter(|&s| s != 500) {
        queue.ack_range(seq, seq).await.expect("ack");
    }
    queue.abandon();
    let seqs = replayed(dir.path(), &storage).await;
    assert!(
        seqs.contains(&0) && seqs.contains(&500),
        "{}",
        summary(&seqs)
    );
    assert!(
        seqs.len() < 2 + ACK_WRITE_EVERY as usize,
        "{}",
        summary(&seqs)
    );
}

#[tokio::test]
async fn acked_ranges_survive_a_close_and_are_skipped_then_absorbed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let queue = filled(dir.path(), &storage, 20).await;
    queue.ack(2).await.expect("ack");
    queue.ack_range(5, 9).await.expect("ack");
    queue.ack_range(12, 12).await.expect("ack");
    queue.close().await;
    drop(queue);
    assert_eq!(
        read_ack_contents(dir.path()).expect("ack").ranges,
        [(5, 10), (12, 13)]
    );
    let queue =
        DiskQueue::open_with(config(dir.path()), Arc::new(storage.clone())).expect("reopen");
    let seqs: Vec<Seq> = queue
        .read(100)
        .await
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [3, 4, 10, 11, 13, 14, 15, 16, 17, 18, 19]);
    queue.ack(4).await.expect("ack");
    assert_eq!(queue.shared.lock().ack_next, 10, "3 and 4 reach the range");
}

#[tokio::test]
async fn a_power_cut_replays_at_most_sync_every_acks_beyond_those_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let queue = filled(dir.path(), &storage, 2000).await;
    // Seq 0 stays in flight; the others are accepted 200 at a time, an interval and a bit
    // apart (each chunk's acks are synced before the next comes).
    for chunk in (1..2000).collect::<Vec<Seq>>().chunks(200) {
        for &seq in chunk {
            queue.ack_range(seq, seq).await.expect("ack");
        }
        tokio::time::sleep(ACK_PERSIST_INTERVAL + ACK_PERSIST_INTERVAL / 5).await;
    }
    queue.ack_range(1999, 1999).await.expect("ack");
    queue.abandon();
    storage.power_cut().expect("power cut");
    let seqs = replayed(dir.path(), &storage).await;
    assert_eq!(seqs[0], 0, "{}", summary(&seqs));
    assert!(
        seqs.len() <= 1 + ACK_SYNC_EVERY as usize,
        "{}",
        summary(&seqs)
    );
}

#[tokio::test]
async fn a_trickle_of_acks_syncs_the_ack_file_at_most_once_per_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let queue = filled(dir.path(), &storage, 600).await;
    let before = storage.syncs_of("ack");
    let started = std::time::Instant::now();
    // About a thousand acks a second, half of them out of order: fewer than ACK_SYNC_EVERY
    // per interval.
    for seq in 0..600u64 {
        if seq % 2 == 0 {
            queue.ack_range(seq + 1, seq + 1).await.expect("ack");
        } else {
            queue.ack(seq).await.expect("ack");
        }
        if seq % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let elapsed = started.elapsed();
    let syncs = storage.syncs_of("ack") - before;
    let most = (elapsed.as_millis() / ACK_PERSIST_INTERVAL.as_millis()) as u64 + 1;
    assert!(
        syncs <= most,
        "{syncs} ack fsyncs in {elapsed:?}, at most {most} allowed"
    );
    assert!(syncs >= 1, "the ack file was never synced");
}

#[tokio::test]
async fn a_full_speed_drain_syncs_the_ack_file_once_per_sync_every_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let queue = filled(dir.path(), &storage, 3000).await;
    let before = storage.syncs_of("ack");
    for seq in 0..3000u64 {
        queue.ack(seq).await.expect("ack");
        if seq % 64 == 63 {
            // Let the writer take each burst, as invocations finishing would.
            tokio::task::yield_now().await;
        }
    }
    queue.close().await;
    let syncs = storage.syncs_of("ack") - before;
    let most = 3000 / ACK_SYNC_EVERY + 2;
    assert!(
        syncs <= most,
        "{syncs} ack fsyncs for 3,000 acks, at most {most}"
    );
}
