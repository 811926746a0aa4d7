//! Disk-buffer benchmarks: append throughput with group commit, bytes written per byte stored
//! (at 256 messages per fsync and at one), start-up of the whole daemon with 1 GiB buffered
//! from a cold page cache, and peak memory while replaying a backlog.
//!
//!     cargo bench --bench buffer            (BENCH_DIR=… picks the disk; root drops caches)
//!
//! Every append is fsync'd, as in the daemon. Rows are printed as the README's table rows;
//! details go to stderr.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::{device_writes, median, range, row, thousands};
use mqtt_lambda_bridge::buffer::{DiskQueue, DiskQueueConfig, Queue};
use mqtt_lambda_bridge::core::config::WhenFull;
use mqtt_lambda_bridge::core::envelope::Message;

const TOPIC: &str = "sensors/dev-0042/temperature";
/// The rule whose directory the start-up benchmark fills.
const RULE: &str = "bench";
/// What the daemon logs once every queue is open.
const STARTED_LINE: &str = "mqtt-lambda-bridge started";
/// How long to wait for a systemd `READY=1` after the started line before deciding this
/// build does not send one.
const READY_GRACE: Duration = Duration::from_secs(2);
/// Messages read (and acknowledged) at a time by the consumer, as a batched rule reads them.
const CONSUMER_BATCH: usize = 100;

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
        max_ack_delay: std::time::Duration::ZERO,
    }
}

/// Bytes this process has caused to be written to storage (`/proc/self/io` write_bytes: a page
/// counts each time it goes from clean to dirty, so a page rewritten after every fsync counts
/// every time — as the device writes it every time).
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

/// `appenders` tasks each append `batch` messages at a time until `total` are in; the rate.
async fn append_run(dir: &Path, total: u64, appenders: u64, batch: u64) -> f64 {
    let queue = Arc::new(DiskQueue::open(config(dir)).expect("open"));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let per_task = total / appenders;
    for t in 0..appenders {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = t * per_task;
            let end = i + per_task;
            while i < end {
                let n = batch.min(end - i);
                queue
                    .append((i..i + n).map(message).collect())
                    .await
                    .expect("append");
                i += n;
            }
        }));
    }
    for task in tasks {
        task.await.expect("join");
    }
    let elapsed = start.elapsed();
    queue.close().await;
    per_task as f64 * appenders as f64 / elapsed.as_secs_f64()
}

/// Bytes written per message byte: one appender, `batch` messages per append (each awaited,
/// so one fsync per append), and a consumer that reads and acknowledges every message as the
/// delivery loop does, so the ack file's writes count too. Returns (written, stored, device).
async fn amplification_run(dir: &Path, total: u64, batch: u64) -> (u64, u64, Option<u64>) {
    let queue = Arc::new(DiskQueue::open(config(dir)).expect("open"));
    let before = disk_writes();
    let device_before = device_writes(dir);
    let consumer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut acked = 0u64;
            while acked < total {
                let entries = queue.read(CONSUMER_BATCH).await.expect("read");
                if let Some(last) = entries.last() {
                    queue.ack(last.seq).await.expect("ack");
                    acked += entries.len() as u64;
                }
            }
        })
    };
    let mut stored = 0;
    let mut i = 0;
    while i < total {
        let n = batch.min(total - i);
        let messages: Vec<Message> = (i..i + n).map(message).collect();
        stored += messages.iter().map(stored_len).sum::<u64>();
        queue.append(messages).await.expect("append");
        i += n;
    }
    consumer.await.expect("consumer");
    // Closing persists the last ack position: part of what acknowledging costs.
    queue.close().await;
    let written = disk_writes() - before;
    let device = device_before
        .zip(device_writes(dir))
        .map(|(before, after)| after - before);
    (written, stored, device)
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; why not, when it cannot.
fn drop_caches() -> Result<(), String> {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    if !synced {
        return Err("sync failed".into());
    }
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .map_err(|e| format!("cannot write /proc/sys/vm/drop_caches ({e}); run as root"))
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
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!("{} (start)", common::load_line());
    common::table_header();
    if common::selected("append") {
        appends(&runtime, &base);
    }
    if common::selected("written") {
        bytes_written(&runtime, &base);
    }
    if common::selected("startup") {
        startup(&runtime, &base);
    }
    if common::selected("replay") {
        replay(&runtime, &base, &args[0]);
    }
    println!("{} (end)", common::load_line());
}

fn appends(runtime: &tokio::runtime::Runtime, base: &Path) {
    for (label, total, appenders, batch, target) in [
        (
            "queue append, one appender, one message per append (one fsync each)",
            5_000u64,
            1u64,
            1u64,
            "",
        ),
        (
            "queue append, 64 concurrent appenders of one 200-byte message each, fsync on (group commit)",
            200_000,
            64,
            1,
            "≥ 50,000",
        ),
        (
            "queue append, one appender, 256 messages per append (ingest appends what arrived together, up to 1,024)",
            500_000,
            1,
            256,
            "",
        ),
    ] {
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let rate = runtime.block_on(append_run(dir.path(), total, appenders, batch));
        row(label, &format!("{} msg/s", thousands(rate)), target);
    }
}

fn bytes_written(runtime: &tokio::runtime::Runtime, base: &Path) {
    let trickle = common::env_number("BENCH_TRICKLE_N", 3_000u64);
    for (label, total, batch, target) in [
        (
            "bytes written to disk / bytes of 200-byte messages stored, 256 messages per fsync (a backlog or a burst), every message acknowledged",
            200_000u64,
            256u64,
            "≤ 1.3",
        ),
        (
            "the same at one message per fsync (a slow trickle of sensors: one append awaited at a time), every message acknowledged",
            trickle,
            1,
            "",
        ),
    ] {
        let dir = tempfile::tempdir_in(base).expect("tempdir");
        let (written, stored, device) =
            runtime.block_on(amplification_run(dir.path(), total, batch));
        eprintln!(
            "bytes written, {batch} per fsync: {written} by this process (segments and ack file) for {stored} bytes of {total} messages; whole device meanwhile (journal and every other writer included): {}",
            device.map_or("unknown".into(), |d| d.to_string())
        );
        row(
            label,
            &format!(
                "{:.2} ({} B per message)",
                written as f64 / stored as f64,
                thousands(written as f64 / total as f64)
            ),
            target,
        );
    }
}

/// Fills a rule's directory with `BENCH_BUFFER_MIB` (1024) MiB, then times the daemon's start
/// from a cold page cache: `DiskQueue::open` alone, and `mqtt-lambda-bridge run` from spawn to
/// "mqtt-lambda-bridge started" (and to systemd's READY=1, if this build sends one).
fn startup(runtime: &tokio::runtime::Runtime, base: &Path) {
    let buffer = tempfile::tempdir_in(base).expect("tempdir");
    let rule_dir = buffer.path().join(RULE);
    let target_bytes: u64 = common::env_number("BENCH_BUFFER_MIB", 1024u64) * 1024 * 1024;
    // Framed size of one message (36 bytes of framing + topic + payload).
    let per = 236u64;
    let total = target_bytes / per;
    runtime.block_on(async {
        let queue = DiskQueue::open(config(&rule_dir)).expect("open");
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

    let cold = drop_caches();
    let start = Instant::now();
    let queue = DiskQueue::open(config(&rule_dir)).expect("reopen");
    let open_time = start.elapsed();
    let stats = queue.stats();
    runtime.block_on(queue.close());
    drop(queue);
    let cache = match &cold {
        Ok(()) => "cold page cache".to_owned(),
        Err(why) => format!("warm page cache: {why}"),
    };
    let buffered = format!(
        "{:.0} MiB ({:.1} M messages)",
        stats.bytes as f64 / 1048576.0,
        stats.pending as f64 / 1e6
    );

    let runs = common::env_number("BENCH_STARTUP_RUNS", 3usize).max(1);
    let (mut started, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        if let Err(why) = drop_caches() {
            eprintln!("start-up: {why}");
        }
        let (to_started, to_ready) = run_until_started(buffer.path());
        started.push(to_started.as_secs_f64() * 1000.0);
        if let Some(r) = to_ready {
            ready.push(r.as_secs_f64() * 1000.0);
        }
    }
    let (lo, hi) = range(&started);
    row(
        &format!(
            "start-up with {buffered} buffered, {cache}: `mqtt-lambda-bridge run` from spawn until it logs \"{STARTED_LINE}\" (every queue open), median of {runs}"
        ),
        &format!("{:.0} ms ({lo:.0}–{hi:.0})", median(&started)),
        "well under 1 s",
    );
    if ready.len() == runs {
        let (lo, hi) = range(&ready);
        row(
            "the same until systemd's READY=1 (buffers recovered, first broker connection tried)",
            &format!("{:.0} ms ({lo:.0}–{hi:.0})", median(&ready)),
            "well under 1 s",
        );
    } else {
        eprintln!(
            "start-up: no READY=1 on NOTIFY_SOCKET within {READY_GRACE:?} of the started line: this build does not send one"
        );
    }
    row(
        &format!("of which the queue's own recovery (`DiskQueue::open`), {cache}"),
        &format!("{:.1} ms", open_time.as_secs_f64() * 1000.0),
        "",
    );
}

/// Spawns the daemon on a buffer directory holding rule `RULE`; returns the time from spawn to
/// its started line, and to READY=1 when it sends one.
fn run_until_started(buffer_dir: &Path) -> (Duration, Option<Duration>) {
    let work = tempfile::tempdir().expect("tempdir");
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let config = format!(
        r#"shutdown_timeout = "1s"
[mqtt]
url = "mqtt://127.0.0.1:{closed_port}"
client_id = "bench-startup"
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:{closed_port}"
[buffer]
dir = "{}"
max_size = "4GiB"
when_full = "block"
[[rules]]
name = "{RULE}"
topic = "bench/#"
function = "sink"
"#,
        buffer_dir.display()
    );
    let config_path = work.path().join("config.toml");
    std::fs::write(&config_path, config).expect("config");
    let socket_path = work.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("socket timeout");
    let (ready_tx, ready_rx) = mpsc::channel();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf)
                    && String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                {
                    let _ = ready_tx.send(Instant::now());
                    return;
                }
            }
        })
    };

    let mut cmd = std::process::Command::new(common::binary());
    cmd.arg("run")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("AWS_ACCESS_KEY_ID", "AKIDBENCH")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let spawned = Instant::now();
    let mut child = cmd.spawn().expect("start mqtt-lambda-bridge");
    let stderr = child.stderr.take().expect("stderr");
    let mut started = None;
    let mut log = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.contains(STARTED_LINE) {
            started = Some(spawned.elapsed());
            break;
        }
        log.push(line);
    }
    let Some(started) = started else {
        let _ = child.kill();
        panic!(
            "the daemon exited before logging {STARTED_LINE:?}:\n{}",
            log.join("\n")
        );
    };
    let ready = ready_rx
        .recv_timeout(READY_GRACE)
        .ok()
        .map(|at| at - spawned);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = child.kill();
    let _ = child.wait();
    let _ = listener.join();
    (started, ready)
}

/// Replays 100,000 messages in a fresh process and prints its peak RSS.
fn replay(runtime: &tokio::runtime::Runtime, base: &Path, me: &str) {
    let small = tempfile::tempdir_in(base).expect("tempdir");
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
    let out = std::process::Command::new(me)
        .arg("--replay-child")
        .arg(small.path())
        .output()
        .expect("run the replay child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
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
            let entries = queue.read_ready(CONSUMER_BATCH).await.expect("read");
            let Some(last) = entries.last() else { break };
            let body = mqtt_lambda_bridge::core::envelope::encode_event(
                "bench",
                &entries
                    .iter()
                    .map(|e| e.message.clone())
                    .collect::<Vec<_>>(),
            );
            std::hint::black_box(body);
            queue.ack(last.seq).await.expect("ack");
            n += entries.len();
        }
        queue.close().await;
        row(
            &format!(
                "replay of {} messages (read, encode events of 100, ack): peak RSS",
                thousands(n as f64)
            ),
            &format!(
                "{:.1} MiB ({} msg/s)",
                peak_rss_kib() as f64 / 1024.0,
                thousands(n as f64 / start.elapsed().as_secs_f64())
            ),
            "≤ 20 MiB",
        );
    });
}
