//! SD-card wear: bytes written per message with and without `buffer.max_ack_delay`, what the
//! delay costs in acknowledgement latency and in ingest throughput against the broker's
//! in-flight window, and what a full-speed drain writes. The release binary, real mosquitto,
//! the in-process fake Lambda (every event accepted).
//!
//!     bench/sd-wear.sh              (as root: the buffer on a fresh ext4 loop device, so the
//!                                    device figure is the bridge's own writes, journal included)
//!     cargo bench --bench wear      (BENCH_DIR=… picks the disk; the device figure then
//!                                    includes whatever else writes to that disk)
//!
//! Sections (`BENCH_ONLY=bytes,window,drain` picks some):
//! - **bytes**: against the test broker (`max_inflight_messages 100`),
//!   `BENCH_WEAR_PUBLISHERS` (10) publishers, each publishing a 200-byte QoS 1
//!   message every 100 ms, out of step (100 msg/s in all), for `BENCH_WEAR_SECS` (20) s, to a
//!   bridge with one rule (defaults: one message per invocation) and `max_ack_delay` 0 and
//!   100 ms, alternating, `BENCH_WEAR_RUNS` (3) times each; also at 10 msg/s (one publisher),
//!   once each. Per message: the bridge's `write_bytes` (`/proc/PID/io`: a page counts each
//!   time it goes from clean to dirty, so a page rewritten after every fsync counts every
//!   time), sectors written to the device holding `BENCH_DIR` (`/sys/dev/block/M:m/stat`,
//!   after a `syncfs`, so writes still in the page cache count), and fsyncs
//!   (`mlb_buffer_fsyncs_total`); the time from each PUBLISH leaving its publisher to the
//!   bridge's PUBACK reaching the broker (through the PUBACK-counting relay).
//! - **window**: a backlog of `BENCH_WEAR_BACKLOG` (3,000) QoS 1 messages queued at the broker
//!   (the test broker: `max_inflight_messages 100`) for the bridge's session, taken with
//!   `max_ack_delay` 0 and 100 ms: the rate from the bridge's TCP connection to the broker's
//!   last PUBACK (through the PUBACK-counting relay).
//! - **drain**: `BENCH_WEAR_DRAIN` (20,000) messages buffered while Lambda is down, then
//!   delivered by a fresh process (one message per invocation, the default): its bytes written
//!   per message, from its start until every message is delivered and the ack file is synced.
//!
//! Rows are printed as the README's table rows; details go to stderr.

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::AckProxy;
use common::{Bridge, STEP_PATIENCE, bridge_config, env_number, median, range, row, thousands};
use support::fake_lambda::{FakeLambda, FakeLambdaServer};
use support::{Mosquitto, Publisher, metric, scrape_metrics};

const FUNCTION: &str = "sink";
/// Size of each message's payload, as a JSON sensor reading.
const PAYLOAD: usize = 200;
/// Each publisher's period in the bytes section: 10 messages a second each.
const PERIOD: Duration = Duration::from_millis(100);
/// The delays compared.
const DELAYS: [&str; 2] = ["0ms", "100ms"];

fn rule(delay: &str, metrics_port: u16) -> String {
    format!(
        "max_ack_delay = \"{delay}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [[rules]]\nname = \"wear\"\ntopic = \"sensors/#\"\nfunction = \"{FUNCTION}\"\n"
    )
}

fn payload(n: u64) -> Vec<u8> {
    let mut text = format!("{n}:").into_bytes();
    text.resize(PAYLOAD, b'x');
    text
}

/// Where the buffers go: `BENCH_DIR`, else a directory under `target/`.
fn base_dir() -> PathBuf {
    std::env::var_os("BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-wear"),
        PathBuf::from,
    )
}

/// A fresh directory for one run's buffer under [`base_dir`].
fn run_dir(name: &str) -> PathBuf {
    let dir = base_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the run's buffer directory");
    dir
}

/// Writes the file system holding `dir` out (`syncfs`), so the device counter includes what
/// the page cache still held.
fn sync_fs(dir: &Path) {
    let _ = std::process::Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status();
}

/// A QoS 1 publisher that notes when each PUBLISH goes out.
struct TimedPublisher {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
    sent: Arc<Mutex<Vec<Instant>>>,
}

impl TimedPublisher {
    async fn connect(port: u16, id: &str) -> TimedPublisher {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_inflight(100);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let sent = sent.clone();
            async move {
                let mut connected_tx = Some(connected_tx);
                loop {
                    use rumqttc::{Event, Incoming, Outgoing};
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                            if let Some(tx) = connected_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                            sent.lock().expect("lock").push(Instant::now());
                        }
                        Ok(_) => {}
                        Err(e) => panic!("publisher {e}"),
                    }
                }
            }
        });
        tokio::time::timeout(STEP_PATIENCE, connected)
            .await
            .expect("the publisher connects")
            .expect("connected");
        TimedPublisher { client, task, sent }
    }
}

impl Drop for TimedPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one run of the bytes section measured, per message.
#[derive(Debug, Clone, Copy)]
struct Wear {
    process: f64,
    device: Option<f64>,
    fsyncs: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
}

/// Messages delivered so far (the lean fake counts them without parsing).
fn delivered(lambda: &FakeLambdaServer) -> usize {
    lambda
        .fake
        .with_invocations(|all| all.iter().map(|i| i.messages).sum())
}

/// Waits until `n` messages were delivered.
async fn wait_delivered(lambda: &FakeLambdaServer, n: usize) {
    let (seen, _) =
        common::poll_until(Instant::now(), n, STEP_PATIENCE, || delivered(lambda)).await;
    assert!(seen >= n, "only {seen} of {n} messages were delivered");
}

/// One run of the bytes section: `publishers` publishers, 10 msg/s each, for `secs`.
async fn wear_run(delay: &str, publishers: usize, secs: u64, name: &str) -> Wear {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start_on(0, FakeLambda::lean()).await;
    let proxy = AckProxy::start(broker.port);
    let metrics_port = support::free_port();
    let dir = run_dir(name);
    let config = bridge_config(
        proxy.port,
        &format!("bench-wear-{name}"),
        &lambda.endpoint(),
        &dir,
        &rule(delay, metrics_port),
    );
    let bridge = Bridge::spawn(|_| config);
    bridge.wait_for_log("subscribed").await;
    let mut clients = Vec::new();
    for p in 0..publishers {
        clients.push(
            TimedPublisher::connect(broker.port, &format!("bench-wear-pub-{name}-{p}")).await,
        );
    }
    sync_fs(&dir);
    let (process_before, device_before) = (bridge.write_bytes(), common::device_writes(&dir));
    let per_publisher = secs * 1000 / PERIOD.as_millis() as u64;
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(p, c)| {
            let client = c.client.clone();
            let offset = PERIOD * p as u32 / publishers as u32;
            tokio::spawn(async move {
                for i in 0..per_publisher {
                    tokio::time::sleep_until(start + offset + PERIOD * i as u32).await;
                    let n = i * 1000 + p as u64;
                    client
                        .publish("sensors/x", rumqttc::QoS::AtLeastOnce, false, payload(n))
                        .await
                        .expect("queue publish");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher");
    }
    let total = per_publisher as usize * publishers;
    wait_delivered(&lambda, total).await;
    // The ack position reaches the ack file within 100 ms of the last ack.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let process = bridge.write_bytes().zip(process_before).map(|(a, b)| a - b);
    sync_fs(&dir);
    let device = common::device_writes(&dir)
        .zip(device_before)
        .map(|(a, b)| a - b);
    let text = scrape_metrics(metrics_port).await;
    let fsyncs = metric(&text, "mlb_buffer_fsyncs_total{rule=\"wear\"}").unwrap_or(f64::NAN);
    bridge.kill().await;
    // The bridge acknowledges in the order the broker sent, which is the order the publishers
    // sent (one broker, one subscription): the k-th PUBACK answers the k-th PUBLISH.
    let mut sent: Vec<Instant> = clients
        .iter()
        .flat_map(|c| c.sent.lock().expect("lock").clone())
        .collect();
    sent.sort_unstable();
    let mut latencies: Vec<f64> = sent
        .iter()
        .enumerate()
        .filter_map(|(k, at)| {
            let acked = proxy.nth_puback(k as u64 + 1)?;
            Some(acked.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let n = total as f64;
    let wear = Wear {
        process: process.unwrap_or(0) as f64 / n,
        device: device.map(|d| d as f64 / n),
        fsyncs: fsyncs / n,
        ack_p50_ms: pct(0.5),
        ack_p99_ms: pct(0.99),
    };
    eprintln!("{name}: {total} messages, max_ack_delay {delay}: {wear:?}");
    let _ = std::fs::remove_dir_all(&dir);
    wear
}

fn figure(values: &[f64], unit: &str) -> String {
    let (lo, hi) = range(values);
    if values.len() == 1 {
        format!("{} {unit}", thousands(values[0]))
    } else {
        format!(
            "{} {unit} ({}–{})",
            thousands(median(values)),
            thousands(lo),
            thousands(hi)
        )
    }
}

fn wear_rows(rate: usize, delay: &str, runs: &[Wear]) {
    let pick = |f: fn(&Wear) -> f64| runs.iter().map(f).collect::<Vec<_>>();
    let device: Vec<f64> = runs.iter().filter_map(|w| w.device).collect();
    let times = if runs.len() > 1 {
        format!(", median of {}", runs.len())
    } else {
        String::new()
    };
    row(
        &format!(
            "bytes written per 200-byte message at {rate} msg/s from {} publisher(s), `max_ack_delay = \"{delay}\"`: the bridge process / the whole device (journal included){times}",
            rate / 10
        ),
        &format!(
            "{} / {}",
            figure(&pick(|w| w.process), "B"),
            if device.is_empty() {
                "n/a".to_owned()
            } else {
                figure(&device, "B")
            }
        ),
        "",
    );
    let fsyncs = pick(|w| w.fsyncs);
    row(
        "the same: fsyncs per message; from a PUBLISH to the bridge's PUBACK reaching the broker, median / 99th percentile",
        &format!(
            "{:.2}; {:.1} / {:.1} ms",
            median(&fsyncs),
            median(&pick(|w| w.ack_p50_ms)),
            median(&pick(|w| w.ack_p99_ms))
        ),
        "",
    );
}

async fn bytes_section() {
    let runs = env_number("BENCH_WEAR_RUNS", 3usize);
    let publishers = env_number("BENCH_WEAR_PUBLISHERS", 10usize);
    let secs = env_number("BENCH_WEAR_SECS", 20u64);
    let mut results: HashMap<(usize, &str), Vec<Wear>> = HashMap::new();
    for run in 0..runs {
        for (i, delay) in DELAYS.iter().enumerate() {
            // Alternate which delay goes first.
            let delay = if run % 2 == 0 { *delay } else { DELAYS[1 - i] };
            let wear = wear_run(delay, publishers, secs, &format!("bytes-{run}-{delay}")).await;
            results
                .entry((publishers * 10, delay))
                .or_default()
                .push(wear);
        }
    }
    for delay in DELAYS {
        let wear = wear_run(delay, 1, secs * 3, &format!("trickle-{delay}")).await;
        results.entry((10, delay)).or_default().push(wear);
    }
    for rate in [publishers * 10, 10] {
        for delay in DELAYS {
            wear_rows(rate, delay, &results[&(rate, delay)]);
        }
    }
}

/// The rate at which the bridge takes a backlog of `n` from the broker.
async fn window_run(delay: &str, n: usize, name: &str) -> f64 {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start_on(0, FakeLambda::lean()).await;
    let proxy = AckProxy::start(broker.port);
    let dir = run_dir(name);
    let id = format!("bench-window-{name}");
    let config = bridge_config(
        proxy.port,
        &id,
        &lambda.endpoint(),
        &dir,
        &rule(delay, support::free_port()),
    );
    // Register the session, then queue the backlog for it while the bridge is away.
    let first = Bridge::spawn(|_| config.clone());
    first.wait_for_log("subscribed").await;
    first.kill().await;
    proxy.wait_idle(STEP_PATIENCE).await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..n {
        publisher.publish("sensors/x", 1, payload(i as u64)).await;
    }
    publisher.wait_acked(n).await;
    proxy.reset();
    let bridge = Bridge::spawn(|_| config);
    let connected = proxy.wait_connect(STEP_PATIENCE).await.expect("connects");
    let last = proxy
        .wait_pubacks(n as u64, Duration::from_secs(300))
        .await
        .unwrap_or_else(|| panic!("the broker got only {} of {n} PUBACKs", proxy.pubacks()));
    bridge.kill().await;
    let rate = n as f64 / last.duration_since(connected).as_secs_f64();
    eprintln!("{name}: max_ack_delay {delay}: {rate:.0} msg/s");
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

async fn window_section() {
    let n = env_number("BENCH_WEAR_BACKLOG", 3000usize);
    let runs = env_number("BENCH_WEAR_WINDOW_RUNS", 3usize);
    for delay in DELAYS {
        let mut rates = Vec::new();
        for run in 0..runs {
            rates.push(window_run(delay, n, &format!("window-{delay}-{run}")).await);
        }
        row(
            &format!(
                "a {}-message QoS 1 backlog taken from mosquitto (`max_inflight_messages 100`), `max_ack_delay = \"{delay}\"`, until mosquitto has every PUBACK, median of {runs}",
                thousands(n as f64),
            ),
            &figure(&rates, "msg/s"),
            "",
        );
    }
}

async fn drain_section() {
    let n = env_number("BENCH_WEAR_DRAIN", 20_000usize);
    let broker = Mosquitto::start().await;
    let dir = run_dir("drain");
    let id = "bench-wear-drain";
    // Lambda down: the bridge buffers everything.
    let down = format!("http://127.0.0.1:{}", support::free_port());
    let filling = Bridge::spawn(|_| {
        bridge_config(
            broker.port,
            id,
            &down,
            &dir,
            &rule("0ms", support::free_port()),
        )
    });
    filling.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..n {
        publisher.publish("sensors/x", 1, payload(i as u64)).await;
    }
    publisher.wait_acked(n).await;
    filling.kill().await;
    let lambda = FakeLambdaServer::start_on(0, FakeLambda::lean()).await;
    sync_fs(&dir);
    let device_before = common::device_writes(&dir);
    let bridge = Bridge::spawn(|_| {
        bridge_config(
            broker.port,
            id,
            &lambda.endpoint(),
            &dir,
            &rule("0ms", support::free_port()),
        )
    });
    let start = Instant::now();
    wait_delivered(&lambda, n).await;
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let process = bridge.write_bytes().unwrap_or(0);
    sync_fs(&dir);
    let device = common::device_writes(&dir)
        .zip(device_before)
        .map(|(a, b)| a - b);
    bridge.kill().await;
    eprintln!("drain: {n} messages in {took:.1?}: process {process} B, device {device:?} B");
    row(
        &format!(
            "a full-speed drain of {} buffered messages (one per invocation): bytes written per message, the process / the whole device",
            thousands(n as f64)
        ),
        &format!(
            "{:.0} B / {} ({} msg/s)",
            process as f64 / n as f64,
            device.map_or("n/a".to_owned(), |d| format!(
                "{:.0} B",
                d as f64 / n as f64
            )),
            thousands(n as f64 / took.as_secs_f64())
        ),
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    eprintln!(
        "buffers under {}; {}",
        base_dir().display(),
        common::load_line()
    );
    common::table_header();
    runtime.block_on(async {
        if common::selected("bytes") {
            bytes_section().await;
        }
        if common::selected("window") {
            window_section().await;
        }
        if common::selected("drain") {
            drain_section().await;
        }
    });
    eprintln!("{}", common::load_line());
}
