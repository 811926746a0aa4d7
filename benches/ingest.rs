//! End-to-end ingest: how fast the daemon takes a QoS 1 backlog from mosquitto (receive, fsync
//! to the buffer, PUBACK), side by side with how fast the same broker drains the same backlog to
//! `mosquitto_sub`.
//!
//!     cargo bench --bench ingest            (needs mosquitto and mosquitto_sub)
//!
//! Both clients have a persistent session on one broker; a backlog of N messages is published
//! while both are away, then each connects in turn and takes it. The daemon's Lambda endpoint is
//! down during the run, so only ingest is measured.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{Daemon, Mosquitto, Publisher};

fn backlog() -> usize {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

fn payload(i: usize) -> String {
    // ~200 bytes with the topic, like a JSON sensor reading.
    format!(
        r#"{{"seq":{i:>10},"temperature":21.53,"humidity":40.1,"battery":3.71,"rssi":-67,"fw":"1.4.2","status":"ok","pad":"{}"}}"#,
        "x".repeat(60)
    )
}

/// Parses the RFC 3339 timestamp at the start of a log line.
fn log_time(line: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

async fn mosquitto_sub(port: u16, count: Option<usize>) -> Duration {
    let mut cmd = tokio::process::Command::new("mosquitto_sub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-c",
        "-i",
        "drain-sub",
        "-q",
        "1",
        "-t",
        "bench/#",
    ]);
    match count {
        Some(n) => cmd.args(["-C", &n.to_string()]),
        None => cmd.arg("-E"),
    };
    let start = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run mosquitto_sub (apt-get install mosquitto-clients)");
    assert!(status.success());
    start.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let n = backlog();
    let broker = Mosquitto::start().await;
    let lambda_down = format!("http://127.0.0.1:{}", support::free_port());
    let rules = r#"
[[rules]]
name = "bench"
topic = "bench/#"
function = "sink"
[rules.batch]
max_messages = 100
"#;
    let text = support::config(&broker.url(), &lambda_down, rules);
    // Register both persistent sessions, then disconnect both.
    mosquitto_sub(broker.port, None).await;
    let mut daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let live = std::env::var_os("BENCH_LIVE").is_some();
    if !live {
        daemon.stop().await;
    }

    let publisher = Publisher::connect(broker.port).await;
    let start = Instant::now();
    for i in 0..n {
        publisher
            .publish("bench/dev-0042/reading", 1, payload(i))
            .await;
    }
    publisher.wait_acked(n).await;
    let publish_time = start.elapsed();

    // The daemon takes its backlog: from its connection to its last PUBACK'd group.
    let daemon = if live { daemon } else { daemon.restart().await };
    daemon.wait_buffered(n).await;
    let log = daemon.log_text();
    let connected = log
        .lines()
        .find(|l| l.contains("connected to the MQTT broker"))
        .and_then(log_time)
        .expect("connect time");
    let last = log
        .lines()
        .filter(|l| {
            l.contains("buffered and acknowledged") || l.contains("every acknowledgement handed")
        })
        .filter_map(log_time)
        .max()
        .expect("last ingest time");
    let daemon_time = last.duration_since(connected).unwrap_or_default();
    let rss = std::fs::read_to_string("/proc/self/status").ok();
    let _ = rss;
    let (_, _) = daemon.terminate().await;

    // mosquitto_sub drains the same backlog.
    let sub_time = mosquitto_sub(broker.port, Some(n)).await;

    let daemon_rate = n as f64 / daemon_time.as_secs_f64();
    let sub_rate = n as f64 / sub_time.as_secs_f64();
    println!("| benchmark | result |");
    println!("|---|---|");
    println!(
        "| publish {n} QoS 1 messages (~200 B) to mosquitto | {:.0} msg/s |",
        n as f64 / publish_time.as_secs_f64()
    );
    println!(
        "| mosquitto → mosquitto_sub, QoS 1 backlog | {sub_rate:.0} msg/s ({:.2} s) |",
        sub_time.as_secs_f64()
    );
    println!(
        "| mosquitto → mqtt-lambda-bridge (fsync'd, then PUBACK), same backlog | {daemon_rate:.0} msg/s ({:.2} s) |",
        daemon_time.as_secs_f64()
    );
    println!(
        "| ratio bridge / mosquitto_sub | {:.2} |",
        daemon_rate / sub_rate
    );

    delivery(n).await;
    invocations_per_10k().await;
    sustained_rss().await;
}

const BATCH_100: &str = r#"
[[rules]]
name = "bench"
topic = "bench/#"
function = "sink"
[rules.batch]
max_messages = 100
max_wait = "200ms"
"#;

/// A backlog delivered end to end (broker → buffer → Lambda, batches of 100, up to 4 invocations
/// in flight) next to the same backlog drained by mosquitto_sub.
async fn delivery(n: usize) {
    let broker = Mosquitto::start().await;
    let lambda = support::fake_lambda::FakeLambdaServer::start().await;
    let rules = format!("{BATCH_100}\n").replace(
        "function = \"sink\"",
        "function = \"sink\"\nmax_concurrency = 4",
    );
    let text = support::config(&broker.url(), &lambda.endpoint(), &rules);
    mosquitto_sub(broker.port, None).await;
    let mut daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    daemon.stop().await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..n {
        publisher
            .publish("bench/dev-0042/reading", 1, payload(i))
            .await;
    }
    publisher.wait_acked(n).await;
    let start = Instant::now();
    let daemon = daemon.restart().await;
    lambda.fake.wait_for_messages("sink", n).await;
    let delivered = start.elapsed();
    let invocations = lambda.fake.with_invocations(|all| all.len());
    daemon.terminate().await;
    let sub_time = mosquitto_sub(broker.port, Some(n)).await;
    let rate = n as f64 / delivered.as_secs_f64();
    let sub_rate = n as f64 / sub_time.as_secs_f64();
    println!(
        "| delivered end to end, max_messages = 100, max_concurrency = 4 ({invocations} invocations), from process start | {rate:.0} msg/s ({:.2} s) |",
        delivered.as_secs_f64()
    );
    println!(
        "| the same backlog to mosquitto_sub, same run | {sub_rate:.0} msg/s ({:.2} s) |",
        sub_time.as_secs_f64()
    );
    println!(
        "| ratio delivered / mosquitto_sub | {:.2} |",
        rate / sub_rate
    );
}

/// Invocations needed for 10,000 messages: one by one, in batches of 100, in 60 s windows.
async fn invocations_per_10k() {
    const M: usize = 10_000;
    let unbatched = "[[rules]]\nname = \"bench\"\ntopic = \"bench/#\"\nfunction = \"sink\"\nmax_concurrency = 8\n";
    let windowed = "[[rules]]\nname = \"bench\"\ntopic = \"bench/#\"\nfunction = \"sink\"\n[rules.aggregate]\nwindow = \"60s\"\nfields = [\"/temperature\"]\n";
    for (label, rules) in [
        ("without batching", unbatched),
        ("max_messages = 100", BATCH_100),
        ("60 s statistics window, one topic", windowed),
    ] {
        let broker = Mosquitto::start().await;
        let lambda = support::fake_lambda::FakeLambdaServer::start().await;
        let daemon =
            Daemon::start(&support::config(&broker.url(), &lambda.endpoint(), rules)).await;
        daemon.wait_for_log("subscribed").await;
        let publisher = Publisher::connect(broker.port).await;
        for i in 0..M {
            publisher
                .publish("bench/dev-0042/reading", 1, payload(i))
                .await;
        }
        publisher.wait_acked(M).await;
        daemon.wait_buffered(M).await;
        let (_, log) = daemon.terminate().await;
        let invocations = lambda.fake.with_invocations(|all| all.len());
        assert!(log.contains("left_in_buffer=0"), "{log}");
        println!("| invocations for {M} messages, {label} | {invocations} |");
    }
}

/// Peak RSS of the daemon while 10,000 messages a second arrive for 10 s and are delivered in
/// batches of 100.
async fn sustained_rss() {
    let broker = Mosquitto::start().await;
    let lambda = support::fake_lambda::FakeLambdaServer::start().await;
    let daemon = Daemon::start(&support::config(
        &broker.url(),
        &lambda.endpoint(),
        BATCH_100,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    let start = Instant::now();
    let mut sent = 0;
    for tick in 0..10_000u64 {
        for _ in 0..10 {
            publisher
                .publish("bench/dev-0042/reading", 1, payload(sent))
                .await;
            sent += 1;
        }
        let next = start + Duration::from_millis(tick + 1);
        tokio::time::sleep_until(next.into()).await;
    }
    let elapsed = start.elapsed();
    lambda.fake.wait_for_messages("sink", sent).await;
    let peak = daemon.peak_rss_kib().unwrap_or(0);
    daemon.terminate().await;
    println!(
        "| peak RSS at {:.0} msg/s sustained for {:.1} s, delivered in batches of 100 | {:.1} MiB |",
        sent as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        peak as f64 / 1024.0
    );
}
