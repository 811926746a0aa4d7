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
}
