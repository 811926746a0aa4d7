//! A model check of the disk queue: random appends, reads, acks (in order, and ahead of older
//! unacknowledged messages), clean restarts, crashes and power cuts, compared with a
//! `VecDeque`. Nothing appended is lost; nothing is delivered twice unless a crash or power cut
//! came in between (and then only what was acknowledged since the last append or clean
//! restart: an append's group commit carries the ack position; and after a process crash fewer
//! than `ACK_WRITE_EVERY` of them). A message acknowledged ahead does not come back after a
//! clean restart.

use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use mqtt_lambda_bridge::buffer::disk::ACK_WRITE_EVERY;
use mqtt_lambda_bridge::buffer::{DiskQueue, DiskQueueConfig, Entry, FaultStorage, Queue};
use mqtt_lambda_bridge::core::config::WhenFull;
use mqtt_lambda_bridge::core::envelope::Message;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    Read(u8),
    /// Acknowledge this many of the read-but-unacknowledged messages.
    Ack(u8),
    /// Acknowledge one read-but-unacknowledged message (this index, modulo how many there
    /// are) on its own, ahead of older ones: an event accepted while an older one is in flight.
    AckAhead(u8),
    Restart,
    /// The process dies (kill -9): what the OS has written stays.
    Crash,
    /// The machine loses power: what was not fsync'd is gone too.
    PowerCut,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..20).prop_map(Op::Append),
        4 => (1u8..30).prop_map(Op::Read),
        3 => (0u8..30).prop_map(Op::Ack),
        3 => any::<u8>().prop_map(Op::AckAhead),
        1 => Just(Op::Restart),
        1 => Just(Op::Crash),
        1 => Just(Op::PowerCut),
    ]
}

fn config(dir: &Path) -> DiskQueueConfig {
    DiskQueueConfig {
        dir: dir.to_owned(),
        segment_size: 700,
        max_size: 1 << 30,
        when_full: WhenFull::Block,
        max_age: None,
        max_ack_delay: std::time::Duration::ZERO,
    }
}

fn message(n: u64) -> Message {
    Message::received(
        format!("m/{n}"),
        n.to_le_bytes().to_vec(),
        1,
        false,
        UNIX_EPOCH,
    )
}

fn number(entry: &Entry) -> u64 {
    entry.message.topic[2..].parse().expect("number")
}

/// The model: what was appended, what is acknowledged, what is read and not yet acknowledged.
#[derive(Default)]
struct Model {
    /// Appended and not acknowledged, oldest first.
    unacked: VecDeque<u64>,
    /// How many of `unacked` were read since the last restart.
    read: usize,
    next: u64,
    /// Acknowledged since the ack position last surely reached disk (a clean restart, or an
    /// append, whose group commit carries it in an ack record); a crash may deliver these again.
    acked_since_durable: Vec<u64>,
    /// Of `unacked`, those acknowledged ahead (`ack_range`).
    ahead: BTreeSet<u64>,
}

fn open(dir: &Path, storage: &FaultStorage) -> DiskQueue {
    DiskQueue::open_with(config(dir), Arc::new(storage.clone())).expect("open")
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = FaultStorage::new();
    let mut queue = open(dir.path(), &storage);
    let mut model = Model::default();
    let mut last_read: Vec<Entry> = Vec::new();
    for op in ops {
        match op {
            Op::Append(n) => {
                let messages: Vec<Message> =
                    (0..n as u64).map(|i| message(model.next + i)).collect();
                queue.append(messages).await.expect("append");
                model.unacked.extend(model.next..model.next + n as u64);
                model.next += n as u64;
                // The group commit carried every earlier ack in an ack record.
                model.acked_since_durable.clear();
            }
            Op::Read(max) => {
                let entries = queue.read_ready(max as usize).await.expect("read");
                let got: Vec<u64> = entries.iter().map(number).collect();
                let expected: Vec<u64> = model
                    .unacked
                    .iter()
                    .skip(model.read)
                    .take(max as usize)
                    .copied()
                    .collect();
                prop_assert_eq!(
                    &got,
                    &expected,
                    "read returns the next unread messages in order"
                );
                model.read += got.len();
                last_read.extend(entries);
            }
            Op::Ack(k) => {
                let k = (k as usize).min(model.read);
                if k > 0 {
                    let through = last_read[k - 1].seq;
                    queue.ack(through).await.expect("ack");
                    last_read.drain(..k);
                    for _ in 0..k {
                        if let Some(n) = model.unacked.pop_front() {
                            model.ahead.remove(&n);
                            model.acked_since_durable.push(n);
                        }
                    }
                    model.read -= k;
                }
            }
            Op::AckAhead(i) => {
                if model.read > 0 {
                    let entry = &last_read[i as usize % model.read];
                    queue.ack_range(entry.seq, entry.seq).await.expect("ack");
                    model.ahead.insert(number(entry));
                }
            }
            Op::Restart => {
                queue.close().await;
                drop(queue);
                queue = open(dir.path(), &storage);
                // Acks ahead were written at close: they do not come back.
                let ahead = std::mem::take(&mut model.ahead);
                model.unacked.retain(|n| !ahead.contains(n));
                model.read = 0;
                model.acked_since_durable.clear();
                last_read.clear();
            }
            Op::Crash | Op::PowerCut => {
                queue.abandon();
                if matches!(op, Op::PowerCut) {
                    storage.power_cut().expect("power cut");
                }
                queue = open(dir.path(), &storage);
                // Everything unacknowledged must come back; some acknowledged messages may too.
                let mut everything = Vec::new();
                loop {
                    let got = queue.read_ready(1000).await.expect("read");
                    if got.is_empty() {
                        break;
                    }
                    everything.extend(got.iter().map(number));
                }
                prop_assert!(
                    everything.windows(2).all(|w| w[0] < w[1]),
                    "after a crash messages come back in order, each once: {:?}",
                    everything
                );
                let delivered: BTreeSet<u64> = everything.iter().copied().collect();
                let missing: Vec<u64> = model
                    .unacked
                    .iter()
                    .filter(|n| !model.ahead.contains(n) && !delivered.contains(n))
                    .copied()
                    .collect();
                prop_assert!(
                    missing.is_empty(),
                    "after a crash every unacknowledged message is delivered: {} missing, first {:?}",
                    missing.len(),
                    missing.first()
                );
                let replayed: Vec<u64> = everything
                    .iter()
                    .filter(|n| !model.unacked.contains(n) || model.ahead.contains(n))
                    .copied()
                    .collect();
                prop_assert!(
                    replayed
                        .iter()
                        .all(|n| model.acked_since_durable.contains(n) || model.ahead.contains(n)),
                    "only recently acknowledged messages come back: {:?} vs {:?}",
                    replayed,
                    model.acked_since_durable
                );
                if matches!(op, Op::Crash) {
                    prop_assert!(
                        replayed.len() < ACK_WRITE_EVERY as usize,
                        "a process crash replays fewer than {} acknowledged messages: {}",
                        ACK_WRITE_EVERY,
                        replayed.len()
                    );
                }
                // Start this incarnation clean: what came back is what is unacknowledged now.
                queue.close().await;
                drop(queue);
                queue = open(dir.path(), &storage);
                model.unacked = everything.into_iter().collect();
                model.ahead.clear();
                model.read = 0;
                model.acked_since_durable.clear();
                last_read.clear();
            }
        }
    }
    // Finally: a clean restart returns exactly the unacknowledged messages.
    queue.close().await;
    drop(queue);
    let queue = open(dir.path(), &storage);
    let mut rest = Vec::new();
    loop {
        let got = queue.read_ready(1000).await.expect("read");
        if got.is_empty() {
            break;
        }
        rest.extend(got.iter().map(number));
    }
    let expected: Vec<u64> = model
        .unacked
        .iter()
        .filter(|n| !model.ahead.contains(n))
        .copied()
        .collect();
    prop_assert_eq!(rest, expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_disk_queue_behaves_like_a_fifo_across_restarts_crashes_and_power_cuts(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(ops))?;
    }
}
