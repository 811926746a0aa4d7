//! Disk-buffer benchmarks: append throughput with group commit, bytes written per byte stored,
//! start-up time with a large buffer, and peak memory while replaying a backlog.
//!
//!     cargo bench --bench buffer
//!
//! Every append is fsync'd (as in the daemon). Results are printed as Markdown table rows.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mqtt_lambda_bridge::config::WhenFull;
use mqtt_lambda_bridge::envelope::Message;
use mqtt_lambda_bridge::queue::{DiskQueue, DiskQueueConfig, Queue};

const TOPIC: &str = "sensors/dev-0042/temperature";

fn message(i: u64) -> Message {
    // ~200 bytes of topic and payload, like a JSON sensor reading.
    let payload = format!(
        r#"{{"seq":{i:>10},"temperature":21.53,"humidity":40.1,"battery":3.71,"rssi":-67,"fw":"1.4.2","status":"ok","pad":"{}"}}"#,
        "x".repeat(56)
    );
    Message::received(
        TOPIC.into(),
        payload.into_bytes(),
        1,
        false,
        SystemTime::now(),
    )
}

fn stored_len(m: &Message) -> u64 {
    (m.topic.len() + m.payload.len()) as u64
}

fn config(dir: &Path) -> DiskQueueConfig {
    DiskQueueConfig {
        dir: dir.to_owned(),
        segment_size: 8 * 1024 * 1024,
        max_size: 64 * 1024 * 1024 * 1024,
        when_full: WhenFull::Block,
        max_age: None,
    }
}

/// Bytes this process has caused to be written to storage (`/proc/self/io` write_bytes).
fn disk_writes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("write_bytes:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// `appenders` tasks each append `batch` messages at a time until `total` are in.
async fn append_run(dir: &Path, total: u64, appenders: u64, batch: u64) -> (f64, u64, u64) {
    let queue = Arc::new(DiskQueue::open(config(dir)).expect("open"));
    let before = disk_writes();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let per_task = total / appenders;
    for t in 0..appenders {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut stored = 0;
            let mut i = t * per_task;
            let end = i + per_task;
            while i < end {
                let n = batch.min(end - i);
                let messages: Vec<Message> = (i..i + n).map(message).collect();
                stored += messages.iter().map(stored_len).sum::<u64>();
                queue.append(messages).await.expect("append");
                i += n;
            }
            stored
        }));
    }
    let mut stored = 0;
    for task in tasks {
        stored += task.await.expect("join");
    }
    let elapsed = start.elapsed();
    queue.close().await;
    let written = disk_writes() - before;
    (
        per_task as f64 * appenders as f64 / elapsed.as_secs_f64(),
        stored,
        written,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--replay-child") {
        replay_child(Path::new(&args[2]));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // cargo bench --list / nextest probing
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = std::env::var_os("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!("| benchmark | result |");
    println!("|---|---|");
    for (label, total, appenders, batch) in [
        (
            "1 appender, 1 message per append (one fsync each)",
            5_000u64,
            1u64,
            1u64,
        ),
        (
            "64 concurrent appenders, 1 message each (group commit)",
            200_000,
            64,
            1,
        ),
        (
            "1 appender, 256 messages per append (the ingest loop's groups)",
            500_000,
            1,
            256,
        ),
    ] {
        let dir = tempfile::tempdir_in(&base).expect("tempdir");
        let (rate, stored, written) =
            runtime.block_on(append_run(dir.path(), total, appenders, batch));
        println!("| append, {label} | {rate:.0} msg/s |");
        if batch == 256 {
            println!(
                "| bytes written to disk / bytes of messages stored | {:.3} ({} / {}) |",
                written as f64 / stored as f64,
                written,
                stored
            );
        }
    }

    // A large buffer: start-up (recovery) time, then replay in a fresh process for its peak RSS.
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let target_bytes: u64 = std::env::var("BENCH_BUFFER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
        * 1024
        * 1024;
    let per = 236u64; // framed size of one message
    let total = target_bytes / per;
    runtime.block_on(async {
        let queue = DiskQueue::open(config(dir.path())).expect("open");
        let mut i = 0;
        while i < total {
            let n = 4096.min(total - i);
            queue
                .append((i..i + n).map(message).collect())
                .await
                .expect("append");
            i += n;
        }
        queue.close().await;
    });
    let start = Instant::now();
    let queue = DiskQueue::open(config(dir.path())).expect("reopen");
    let open_time = start.elapsed();
    let stats = queue.stats();
    runtime.block_on(queue.close());
    drop(queue);
    println!(
        "| start-up with {:.0} MiB ({} messages) buffered | {:.1} ms |",
        stats.bytes as f64 / 1048576.0,
        stats.pending,
        open_time.as_secs_f64() * 1000.0
    );

    // Replay 100,000 messages in a child process and report its peak RSS.
    let small = tempfile::tempdir_in(&base).expect("tempdir");
    runtime.block_on(async {
        let queue = DiskQueue::open(config(small.path())).expect("open");
        for chunk in 0..100u64 {
            queue
                .append((chunk * 1000..(chunk + 1) * 1000).map(message).collect())
                .await
                .expect("append");
        }
        queue.close().await;
    });
    let out = std::process::Command::new(&args[0])
        .arg("--replay-child")
        .arg(small.path())
        .output()
        .expect("run the replay child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let _ = Duration::ZERO;
}

/// Reads and acknowledges a whole queue in batches of 100, as the delivery loop does.
fn replay_child(dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let queue = DiskQueue::open(config(dir)).expect("open");
        let start = Instant::now();
        let mut n = 0;
        loop {
            let entries = queue.read_ready(100).await.expect("read");
            let Some(last) = entries.last() else { break };
            let body = mqtt_lambda_bridge::envelope::encode_event(
                "bench",
                &entries.iter().map(|e| e.message.clone()).collect::<Vec<_>>(),
            );
            std::hint::black_box(body);
            queue.ack(last.seq).await.expect("ack");
            n += entries.len();
        }
        queue.close().await;
        println!(
            "| replay {n} messages (read, encode events of 100, ack) | {:.0} msg/s, peak RSS {:.1} MiB |",
            n as f64 / start.elapsed().as_secs_f64(),
            peak_rss_kib() as f64 / 1024.0
        );
    });
}
