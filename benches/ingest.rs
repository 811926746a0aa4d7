//! The bridge against the broker and Lambda, end to end, with the release binary.
//!
//!     cargo bench --bench ingest            (needs mosquitto and mosquitto_sub; Python 3 and
//!                                            PyPI for the slow-uplink baseline)
//!
//! Sections (`BENCH_ONLY=ingest,delivery,flood,uplink,invocations,sustained,sql` picks some):
//! - **ingest**: a QoS 1 backlog of `BENCH_N` (100,000) messages taken from mosquitto by the
//!   bridge (appended, fsync'd, then PUBACK) and by `mosquitto_sub -q 1`, alternately,
//!   `BENCH_PAIRS` (5) times, each run on a fresh backlog. Both connect through a relay
//!   (`common/proxy.rs`) that timestamps each PUBACK as it is written to the broker: a run
//!   lasts from the client's TCP connection to the moment the broker has the last PUBACK.
//! - **delivery**: `BENCH_DELIVERY_PAIRS` (9) alternating pairs, each a backlog of
//!   `BENCH_DELIVERY_N` (50,000) delivered end to end (batches of
//!   100, concurrency at its default, or `BENCH_DELIVERY_CONCURRENCY` to compare) to the
//!   in-process fake Lambda, from the bridge's process start to the arrival of the last event;
//!   alternating with `mosquitto_sub` from its process start to the broker's receipt of its
//!   last PUBACK. The bridge's peak RSS (VmHWM) in those runs is printed too. With `BENCH_DELIVERY_SQL=1` the rule is [`RULE_SQL_KEEP_ALL`]: an SQL rule
//!   whose WHERE keeps every message and whose SELECT reshapes it (the cost of SQL itself).
//! - **flood**: `BENCH_FLOOD_RUNS` (9) runs of the bridge alone, each on a fresh
//!   `BENCH_DELIVERY_N` backlog delivered as in **delivery**: peak RSS (VmHWM) and drain rate,
//!   medians, ranges and how far the furthest run is from the median.
//! - **uplink**: the fake Lambda answers every Invoke after 25 ms; a `BENCH_SLOW_N` (5,000)
//!   backlog, one message per invocation, the bridge with the default configuration, with
//!   `max_concurrency = 32`, and a naive 8-thread Python bridge (`bench/python_bridge.py`).
//!   A run stops after `BENCH_SLOW_SECS` (30) if not done; the rate is what was delivered.
//! - **invocations**: invocations needed for 10,000 messages with and without batching.
//! - **sustained**: peak RSS at a target of 10,000 msg/s for 10 s, with the rate the broker
//!   actually saw acknowledged.
//! - **sql**: the SQL evaluator alone, in this process on one thread: [`SQL_TYPICAL`] applied to
//!   `BENCH_SQL_N` (1,000,000) benchmark payloads, each parsed from its bytes as ingest does,
//!   half kept; `BENCH_SQL_RUNS` (5) runs, median and spread.
//!
//! Rows are printed as the README's table rows; run details go to stderr. `BENCH_BRIDGE_BIN`
//! runs another build of the bridge instead (to compare two versions, alternating runs).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::proxy::AckProxy;
use common::{Bridge, STEP_PATIENCE, bridge_config, median, range, row, thousands};
use support::fake_lambda::{FakeLambda, FakeLambdaServer, Reply};
use support::{Mosquitto, Publisher};

const TOPIC: &str = "bench/dev-0042/reading";
/// Alternating pairs of the delivery section (`BENCH_DELIVERY_PAIRS` overrides it).
const DELIVERY_PAIRS: usize = 9;
const FILTER: &str = "bench/#";
const FUNCTION: &str = "sink";
/// Round trip the slow-uplink fake Lambda adds to every Invoke (an LTE gateway sees 20–100 ms).
const UPLINK_DELAY: Duration = Duration::from_millis(25);
/// The Python baseline's worker threads, and the paho-mqtt it runs on.
const PYTHON_THREADS: usize = 8;
const PAHO_VERSION: &str = "2.1.0";

/// One rule, batches of 100, everything else at its default. `max_wait` only matters for a
/// last partial batch.
const RULE_BATCH_100: &str = r#"
[[rules]]
name = "bench"
topic = "bench/#"
function = "sink"
[rules.batch]
max_messages = 100
max_wait = "200ms"
"#;

/// [`RULE_BATCH_100`] with an SQL statement instead of `topic`: every benchmark payload has
/// `status = 'ok'`, so every message is kept, reshaped by the SELECT.
const RULE_SQL_KEEP_ALL: &str = r#"
[[rules]]
name = "bench"
sql = "SELECT seq, temperature AS t, humidity, topic(2) AS device FROM 'bench/#' WHERE status = 'ok' AND temperature > -40"
function = "sink"
[rules.batch]
max_messages = 100
max_wait = "200ms"
"#;

/// A typical filtering rule for the `sql` section: two conditions, a reshaping SELECT.
const SQL_TYPICAL: &str = "SELECT seq, temperature AS t, topic(2) AS device, timestamp() AS ts \
     FROM 'bench/#' WHERE status = 'ok' AND temperature > 21.5";

/// One rule, one message per invocation, everything at its default.
const RULE_PLAIN: &str = r#"
[[rules]]
name = "bench"
topic = "bench/#"
function = "sink"
"#;

fn payload(i: usize) -> String {
    // ~200 bytes with the topic, like a JSON sensor reading.
    format!(
        r#"{{"seq":{i:>10},"temperature":21.53,"humidity":40.1,"battery":3.71,"rssi":-67,"fw":"1.4.2","status":"ok","pad":"{}"}}"#,
        "x".repeat(60)
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    common::proxy::self_check();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("{} (start)", common::load_line());
    common::table_header();
    runtime.block_on(run());
    println!("{} (end)", common::load_line());
}

async fn run() {
    let pairs = common::env_number("BENCH_PAIRS", 5usize).max(1);
    if common::selected("ingest") {
        ingest(common::env_number("BENCH_N", 100_000), pairs).await;
    }
    if common::selected("delivery") {
        // Single delivery pairs swing widely on a shared 2-core machine: more pairs by default.
        let pairs = common::env_number("BENCH_DELIVERY_PAIRS", DELIVERY_PAIRS).max(1);
        delivery(common::env_number("BENCH_DELIVERY_N", 50_000), pairs).await;
    }
    if common::selected("flood") {
        flood(
            common::env_number("BENCH_DELIVERY_N", 50_000),
            common::env_number("BENCH_FLOOD_RUNS", 9usize).max(1),
        )
        .await;
    }
    if common::selected("uplink") {
        uplink(
            common::env_number("BENCH_SLOW_N", 5_000),
            Duration::from_secs(common::env_number("BENCH_SLOW_SECS", 30)),
        )
        .await;
    }
    if common::selected("invocations") {
        invocations_per_10k().await;
    }
    if common::selected("sustained") {
        sustained_rss().await;
    }
    if common::selected("sql") {
        sql_evaluation(
            common::env_number("BENCH_SQL_N", 1_000_000),
            common::env_number("BENCH_SQL_RUNS", 5usize).max(1),
        );
    }
}

/// Messages per second through [`SQL_TYPICAL`] on one thread: payload bytes parsed as JSON,
/// the WHERE evaluated, the SELECT result encoded for the kept half.
fn sql_evaluation(n: usize, runs: usize) {
    use mqtt_lambda_bridge::core::sql::{self, Input, Outcome};
    let statement = sql::compile(SQL_TYPICAL).expect("the typical statement compiles");
    // Half the readings are over 21.5: temperature alternates 21.53 and 21.43.
    let payloads: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let p = payload(i);
            if i % 2 == 0 {
                p
            } else {
                p.replace("21.53", "21.43")
            }
            .into_bytes()
        })
        .collect();
    let mut rates = Vec::new();
    for run in 0..runs {
        let (mut kept, mut bytes) = (0usize, 0usize);
        let start = Instant::now();
        for i in 0..n {
            let raw = &payloads[i % payloads.len()];
            let parsed = statement.parse_payload(raw);
            let input = Input {
                topic: TOPIC,
                payload: parsed.as_ref(),
                received_ms: 1_764_000_000_000,
            };
            if let Outcome::Kept(out) = statement.apply(&input) {
                kept += 1;
                bytes += out.map_or(0, |o| o.len());
            }
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        assert_eq!(kept, n / 2, "half the payloads are kept");
        eprintln!(
            "sql run {}: {} msg/s, {kept} kept, {bytes} bytes of SELECT results",
            run + 1,
            thousands(rate)
        );
        rates.push(rate);
    }
    let (lo, hi) = range(&rates);
    row(
        &format!(
            "SQL evaluation on one thread: {} ~200-byte JSON payloads parsed, `WHERE status = 'ok' AND temperature > 21.5` (half kept), `SELECT seq, temperature AS t, topic(2) AS device, timestamp() AS ts` encoded, median of {runs}",
            thousands(n as f64)
        ),
        &format!(
            "{} msg/s ({}–{})",
            thousands(median(&rates)),
            thousands(lo),
            thousands(hi)
        ),
        "",
    );
}

/// Which client takes its backlog first in a pair: alternating, so neither always runs on a
/// broker that just did the same work.
#[derive(Debug, Clone, Copy)]
enum Side {
    Bridge,
    Sub,
}

/// Client ids of one pair's two persistent sessions: new for each pair (and deleted after it),
/// so nothing a run left behind — a message sent to a connection that was closing, a
/// redelivery — reaches another run.
fn pair_sessions(section: &str, pair: usize) -> (String, String) {
    (
        format!("bench-{section}-bridge-{pair}"),
        format!("bench-{section}-sub-{pair}"),
    )
}

fn order(pair: usize) -> [Side; 2] {
    if pair.is_multiple_of(2) {
        [Side::Bridge, Side::Sub]
    } else {
        [Side::Sub, Side::Bridge]
    }
}

/// `mosquitto_sub` on a persistent session (`-c`), QoS 1, writing every message to /dev/null;
/// `-C n` exits after `n` messages, `None` (-E) right after subscribing.
fn mosquitto_sub(port: u16, client_id: &str, count: Option<usize>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("mosquitto_sub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", "-i"])
        .arg(client_id)
        .args(["-q", "1", "-t", FILTER]);
    match count {
        Some(n) => cmd.args(["-C", &n.to_string()]),
        None => cmd.arg("-E"),
    };
    cmd.stdout(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn run_to_end(mut cmd: tokio::process::Command, what: &str) {
    let status = tokio::time::timeout(STEP_PATIENCE, cmd.status())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
        .unwrap_or_else(|e| panic!("cannot run {what}: {e} (apt-get install mosquitto-clients)"));
    assert!(status.success(), "{what} failed: {status}");
}

/// Deletes the broker's session for `client_id` (a clean-session connect), so nothing queued
/// for it outlives its pair of runs.
async fn forget_session(port: u16, client_id: &str) {
    let mut cmd = tokio::process::Command::new("mosquitto_sub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i"])
        .arg(client_id)
        .args(["-t", "bench/forget", "-E"])
        .stdout(Stdio::null());
    run_to_end(cmd, "mosquitto_sub (clean session)").await;
}

/// Registers the bridge's persistent session (and subscription) under its client id.
async fn register_bridge(config: impl FnOnce(&Path) -> String) {
    let bridge = Bridge::spawn(config);
    bridge.wait_for_log("subscribed").await;
    bridge.kill().await;
}

/// Publishes `n` QoS 1 messages and waits until the broker has acknowledged `acked_total`
/// publishes in all (the publisher counts across calls).
async fn publish_backlog(publisher: &Publisher, n: usize, acked_total: usize) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        publisher.publish(TOPIC, 1, payload(i)).await;
    }
    publisher.wait_acked(acked_total).await;
    n as f64 / start.elapsed().as_secs_f64()
}

/// Waits for the relay to see `n` PUBACKs; panics with `context` if they never come.
async fn nth_puback(proxy: &AckProxy, n: usize, context: impl FnOnce() -> String) -> Instant {
    match proxy.wait_pubacks(n as u64, STEP_PATIENCE).await {
        Some(at) => at,
        None => panic!(
            "mosquitto received only {} of {n} PUBACKs: {}",
            proxy.pubacks(),
            context()
        ),
    }
}

/// Median rows for `a` against `b` and the ratio of the medians.
fn print_pairs(what_a: &str, a: &[f64], what_b: &str, b: &[f64], ratio_what: &str, target: &str) {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    let (lo, hi) = range(&ratios);
    let runs = a.len();
    let spread = |v: &[f64]| {
        let (lo, hi) = range(v);
        format!("{}–{}", thousands(lo), thousands(hi))
    };
    row(
        &format!("{what_a}, median of {runs}"),
        &format!("{} msg/s ({})", thousands(median(a)), spread(a)),
        "",
    );
    row(
        &format!("{what_b}, median of {runs}"),
        &format!("{} msg/s ({})", thousands(median(b)), spread(b)),
        "",
    );
    row(
        &format!("{ratio_what} (ratio of medians; single pairs {lo:.2}–{hi:.2})"),
        &format!("{:.2}", median(a) / median(b)),
        target,
    );
}

/// Ingest of a QoS 1 backlog: the bridge and mosquitto_sub alternately, PUBACKs timed at the
/// broker's side of the relay.
async fn ingest(n: usize, pairs: usize) {
    let broker = Mosquitto::start().await;
    let proxy = AckProxy::start(broker.port);
    // Lambda is down: only ingest runs (delivery retries with backoff in the background).
    let lambda_down = format!("http://127.0.0.1:{}", support::free_port());
    let publisher = Publisher::connect(broker.port).await;

    let (mut bridge_rates, mut sub_rates) = (Vec::new(), Vec::new());
    for pair in 0..pairs {
        let (bridge_id, sub_id) = pair_sessions("ingest", pair);
        let config =
            |dir: &Path| bridge_config(proxy.port, &bridge_id, &lambda_down, dir, RULE_BATCH_100);
        register_bridge(config).await;
        run_to_end(mosquitto_sub(proxy.port, &sub_id, None), "mosquitto_sub").await;
        proxy.wait_idle(STEP_PATIENCE).await;
        let published = publish_backlog(&publisher, n, (pair + 1) * n).await;
        eprintln!(
            "ingest pair {}: published {n} at {} msg/s",
            pair + 1,
            thousands(published)
        );
        for side in order(pair) {
            proxy.reset();
            let rate = match side {
                Side::Bridge => {
                    // A fresh buffer each run, same session: the broker's backlog for it.
                    let bridge = Bridge::spawn(config);
                    let connected = proxy.wait_connect(STEP_PATIENCE).await.expect("connects");
                    let done = nth_puback(&proxy, n, || bridge.log_text()).await;
                    bridge.kill().await;
                    let rate = n as f64 / (done - connected).as_secs_f64();
                    bridge_rates.push(rate);
                    rate
                }
                Side::Sub => {
                    let mut child = mosquitto_sub(proxy.port, &sub_id, Some(n))
                        .spawn()
                        .expect("run mosquitto_sub");
                    let connected = proxy.wait_connect(STEP_PATIENCE).await.expect("connects");
                    let done = nth_puback(&proxy, n, || "mosquitto_sub".into()).await;
                    let _ = tokio::time::timeout(STEP_PATIENCE, child.wait()).await;
                    let rate = n as f64 / (done - connected).as_secs_f64();
                    sub_rates.push(rate);
                    rate
                }
            };
            proxy.wait_idle(STEP_PATIENCE).await;
            eprintln!(
                "ingest pair {}: {side:?} {} msg/s ({} PUBACKs seen, {} connection(s))",
                pair + 1,
                thousands(rate),
                proxy.pubacks(),
                proxy.connections()
            );
        }
        forget_session(broker.port, &bridge_id).await;
        forget_session(broker.port, &sub_id).await;
    }
    print_pairs(
        &format!(
            "ingest of a {}-message QoS 1 backlog: mosquitto → bridge (fsync'd, then PUBACK), until mosquitto has every PUBACK",
            thousands(n as f64)
        ),
        &bridge_rates,
        "the same backlog, same broker, alternating: mosquitto → `mosquitto_sub -q 1`, until mosquitto has every PUBACK",
        &sub_rates,
        "ratio bridge / `mosquitto_sub`",
        "≥ 0.8",
    );
}

/// Messages the fake Lambda accepted for the benchmark's function.
fn delivered(lambda: &FakeLambdaServer) -> usize {
    lambda.fake.with_invocations(|all| {
        all.iter()
            .filter(|i| i.function == FUNCTION)
            .map(|i| i.messages)
            .sum()
    })
}

/// A backlog delivered end to end (batches of 100, default concurrency) to the in-process fake
/// Lambda, alternating with mosquitto_sub on the same backlog.
/// Milliseconds from `start` to `at` for a timeline line; `-` when it never happened.
fn ms_after(start: Instant, at: Option<Instant>) -> String {
    at.map_or("-".to_owned(), |at| {
        format!("{:.0}", (at - start).as_secs_f64() * 1000.0)
    })
}

/// One bridge run of the delivery section: its drain rate, peak RSS and invocations.
struct Drained {
    /// Messages per second from process start to the arrival of the last event.
    rate: f64,
    /// VmHWM of the bridge process just before it was killed.
    peak_kib: u64,
    invocations: usize,
}

/// Spawns the bridge on a backlog of `n` already queued for its session, waits until the fake
/// Lambda has all of it and the broker every PUBACK, and prints the run's timeline.
async fn drain_once(
    proxy: &AckProxy,
    n: usize,
    label: &str,
    config: impl Fn(&Path, &str) -> String,
) -> Drained {
    let lambda = FakeLambdaServer::start_on(0, FakeLambda::lean()).await;
    let bridge = Bridge::spawn(|dir| config(dir, &lambda.endpoint()));
    let (got, _) =
        common::poll_until(bridge.spawned, n, STEP_PATIENCE, || delivered(&lambda)).await;
    assert!(
        got >= n,
        "the fake Lambda received {got} of {n}; log:\n{}",
        bridge.log_text()
    );
    // The arrival of the last event, not the moment the poll noticed it.
    let last = lambda
        .fake
        .with_invocations(|all| all.iter().map(|i| i.at).max())
        .expect("invocations");
    // Not timed: the broker must have every PUBACK before the bridge is killed, or the next
    // run would get this backlog again.
    let acked = nth_puback(proxy, n, || bridge.log_text()).await;
    eprintln!(
        "{label}: the broker had the bridge's last PUBACK {:.0} ms after the last event reached the fake Lambda",
        acked.saturating_duration_since(last).as_secs_f64() * 1000.0
    );
    let spawned = bridge.spawned;
    let cpu = bridge.cpu_ms();
    let peak_kib = bridge.peak_rss_kib().unwrap_or(0);
    bridge.kill().await;
    let invocations = lambda.fake.with_invocations(|all| all.len());
    let ms = |at: Option<Instant>| ms_after(spawned, at);
    let (first_invoke, half_delivered) = lambda.fake.with_invocations(|all| {
        let mut sum = 0;
        let half = all.iter().find_map(|i| {
            sum += i.messages;
            (sum >= n / 2).then_some(i.at)
        });
        (all.iter().map(|i| i.at).min(), half)
    });
    eprintln!(
        "{label}: bridge timeline (ms from spawn): connected {}, first PUBACK {}, half PUBACKs {}, first event {}, half delivered {}, last event {}, last PUBACK {}; CPU {} ms; peak RSS {:.1} MiB",
        ms(proxy.first_connect()),
        ms(proxy.nth_puback(1)),
        ms(proxy.nth_puback(n as u64 / 2)),
        ms(first_invoke),
        ms(half_delivered),
        ms(Some(last)),
        ms(Some(acked)),
        cpu.map_or("-".to_owned(), |c| c.to_string()),
        peak_kib as f64 / 1024.0
    );
    let tenths: Vec<String> = (1..=10)
        .map(|k| ms(proxy.nth_puback((n * k / 10) as u64)))
        .collect();
    eprintln!(
        "{label}: PUBACKs at each tenth of the backlog (ms from spawn): {}",
        tenths.join(" ")
    );
    Drained {
        rate: n as f64 / (last - spawned).as_secs_f64(),
        peak_kib,
        invocations,
    }
}

/// The delivery rule (batches of 100) and how its concurrency is described:
/// `BENCH_DELIVERY_CONCURRENCY=4` sets the rule's max_concurrency, to compare settings.
fn delivery_rules() -> (String, String) {
    let with_sql = std::env::var("BENCH_DELIVERY_SQL").is_ok_and(|v| v == "1");
    let rule = if with_sql {
        RULE_SQL_KEEP_ALL
    } else {
        RULE_BATCH_100
    };
    let (rules, mut label) = match std::env::var("BENCH_DELIVERY_CONCURRENCY").ok() {
        Some(c) => (
            rule.replace(
                "function = \"sink\"",
                &format!("function = \"sink\"\nmax_concurrency = {c}"),
            ),
            format!("`max_concurrency = {c}`"),
        ),
        None => (rule.to_owned(), "default concurrency".to_owned()),
    };
    if with_sql {
        label.push_str(", an SQL rule keeping every message (`WHERE status = 'ok' AND temperature > -40`, a reshaping SELECT)");
    }
    (rules, label)
}

/// Runs of the bridge alone, each on a fresh backlog of `n`: its peak RSS and drain rate, with
/// their medians, ranges and the run furthest from the median.
async fn flood(n: usize, runs: usize) {
    let broker = Mosquitto::start().await;
    let proxy = AckProxy::start(broker.port);
    let publisher = Publisher::connect(broker.port).await;
    let (rules, concurrency_label) = delivery_rules();
    let (mut rates, mut peaks) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let id = format!("bench-flood-{run}");
        let config =
            |dir: &Path, endpoint: &str| bridge_config(proxy.port, &id, endpoint, dir, &rules);
        {
            let lambda = FakeLambdaServer::start_on(0, FakeLambda::lean()).await;
            register_bridge(|dir| config(dir, &lambda.endpoint())).await;
        }
        proxy.wait_idle(STEP_PATIENCE).await;
        publish_backlog(&publisher, n, (run + 1) * n).await;
        proxy.reset();
        let drained = drain_once(&proxy, n, &format!("flood run {}", run + 1), config).await;
        proxy.wait_idle(STEP_PATIENCE).await;
        eprintln!(
            "flood run {}: {} msg/s, peak RSS {:.1} MiB",
            run + 1,
            thousands(drained.rate),
            drained.peak_kib as f64 / 1024.0
        );
        rates.push(drained.rate);
        peaks.push(drained.peak_kib as f64 / 1024.0);
        forget_session(broker.port, &id).await;
    }
    let backlog = thousands(n as f64);
    row(
        &format!(
            "peak RSS (VmHWM) draining a {backlog}-message QoS 1 backlog, `max_messages = 100`, {concurrency_label}, to an in-process fake Lambda, median of {runs}"
        ),
        &mib_spread(&peaks),
        "≤ 16 MiB",
    );
    let mid = median(&rates);
    let furthest = rates
        .iter()
        .map(|r| (r - mid).abs() / mid)
        .fold(0.0, f64::max);
    let (lo, hi) = range(&rates);
    row(
        &format!("drain rate in the same runs, from process start, median of {runs}"),
        &format!(
            "{} msg/s ({}–{}; furthest run {:.0}% from the median)",
            thousands(mid),
            thousands(lo),
            thousands(hi),
            furthest * 100.0
        ),
        "every run within 20% of the median",
    );
}

/// `12.3 MiB (11.9–12.8)`: the median and range of figures in MiB.
fn mib_spread(values: &[f64]) -> String {
    let (lo, hi) = range(values);
    format!("{:.1} MiB ({lo:.1}–{hi:.1})", median(values))
}

async fn delivery(n: usize, pairs: usize) {
    let broker = Mosquitto::start().await;
    let proxy = AckProxy::start(broker.port);
    let publisher = Publisher::connect(broker.port).await;

    let (mut bridge_rates, mut sub_rates, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    let mut invocations = 0;
    let (rules, concurrency_label) = delivery_rules();
    for pair in 0..pairs {
        let (bridge_id, sub_id) = pair_sessions("delivery", pair);
        let config = |dir: &Path, endpoint: &str| {
            bridge_config(proxy.port, &bridge_id, endpoint, dir, &rules)
        };
        {
            let lambda = FakeLambdaServer::start_on(0, FakeLambda::lean()).await;
            register_bridge(|dir| config(dir, &lambda.endpoint())).await;
        }
        run_to_end(mosquitto_sub(proxy.port, &sub_id, None), "mosquitto_sub").await;
        proxy.wait_idle(STEP_PATIENCE).await;
        publish_backlog(&publisher, n, (pair + 1) * n).await;
        for side in order(pair) {
            proxy.reset();
            let rate = match side {
                Side::Bridge => {
                    let run =
                        drain_once(&proxy, n, &format!("delivery pair {}", pair + 1), config).await;
                    peaks.push(run.peak_kib as f64 / 1024.0);
                    bridge_rates.push(run.rate);
                    invocations = run.invocations;
                    run.rate
                }
                Side::Sub => {
                    let spawned = Instant::now();
                    let mut child = mosquitto_sub(proxy.port, &sub_id, Some(n))
                        .spawn()
                        .expect("run mosquitto_sub");
                    let done = nth_puback(&proxy, n, || "mosquitto_sub".into()).await;
                    let _ = tokio::time::timeout(STEP_PATIENCE, child.wait()).await;
                    let ms = |at: Option<Instant>| ms_after(spawned, at);
                    eprintln!(
                        "delivery pair {}: mosquitto_sub timeline (ms from spawn): connected {}, first PUBACK {}, half PUBACKs {}, last PUBACK {}",
                        pair + 1,
                        ms(proxy.first_connect()),
                        ms(proxy.nth_puback(1)),
                        ms(proxy.nth_puback(n as u64 / 2)),
                        ms(Some(done)),
                    );
                    let rate = n as f64 / (done - spawned).as_secs_f64();
                    sub_rates.push(rate);
                    rate
                }
            };
            proxy.wait_idle(STEP_PATIENCE).await;
            eprintln!(
                "delivery pair {}: {side:?} {} msg/s ({} PUBACKs seen, {} connection(s))",
                pair + 1,
                thousands(rate),
                proxy.pubacks(),
                proxy.connections()
            );
        }
        forget_session(broker.port, &bridge_id).await;
        forget_session(broker.port, &sub_id).await;
    }
    print_pairs(
        &format!(
            "a {}-message backlog delivered end to end, `max_messages = 100`, {concurrency_label}, to an in-process fake Lambda ({invocations} invocations), from process start",
            thousands(n as f64)
        ),
        &bridge_rates,
        "the same backlog, alternating: mosquitto → `mosquitto_sub -q 1`, from process start",
        &sub_rates,
        "ratio delivered / `mosquitto_sub`",
        "≥ 0.85",
    );
    row(
        "peak RSS of the bridge in those runs (VmHWM)",
        &mib_spread(&peaks),
        "≤ 16 MiB",
    );
}

/// One message per invocation through a link that takes 25 ms per Invoke: the bridge with its
/// defaults, with `max_concurrency = 32`, and the naive Python bridge.
async fn uplink(n: usize, cap: Duration) {
    const DEFAULT_ID: &str = "bench-uplink-default";
    const TUNED_ID: &str = "bench-uplink-32";
    const PYTHON_ID: &str = "bench-uplink-python";
    let broker = Mosquitto::start().await;
    let tuned_rules = RULE_PLAIN.replace(
        "function = \"sink\"",
        "function = \"sink\"\nmax_concurrency = 32",
    );
    let config = |id: &'static str, rules: String| {
        let port = broker.port;
        move |dir: &Path, endpoint: &str| bridge_config(port, id, endpoint, dir, &rules)
    };
    let default_config = config(DEFAULT_ID, RULE_PLAIN.to_owned());
    let tuned_config = config(TUNED_ID, tuned_rules);
    let python = common::python_with_paho(PAHO_VERSION);
    let python_cmd = |lambda_port: u16, register: bool| {
        let mut cmd = tokio::process::Command::new(python.as_ref()?);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/python_bridge.py"))
            .args(["--port", &broker.port.to_string()])
            .args(["--client-id", PYTHON_ID, "--topic", FILTER])
            .args(["--lambda-port", &lambda_port.to_string()])
            .args(["--function", FUNCTION])
            .args(["--threads", &PYTHON_THREADS.to_string()])
            .kill_on_drop(true);
        if register {
            cmd.arg("--register");
        }
        Some(cmd)
    };

    // Three persistent sessions, then one backlog that the broker queues for each.
    {
        let lambda = FakeLambdaServer::start().await;
        register_bridge(|dir| default_config(dir, &lambda.endpoint())).await;
        register_bridge(|dir| tuned_config(dir, &lambda.endpoint())).await;
    }
    if let Some(cmd) = python_cmd(support::free_port(), true) {
        run_to_end(cmd, "python_bridge.py --register").await;
    }
    let publisher = Publisher::connect(broker.port).await;
    publish_backlog(&publisher, n, n).await;

    let report = |label: &str, (got, took): (usize, Duration)| {
        eprintln!(
            "uplink: {label}: {got} of {n} delivered in {:.1} s",
            took.as_secs_f64()
        );
        got as f64 / took.as_secs_f64()
    };

    let python_rate = match python.is_some() {
        true => {
            let lambda = slow_lambda(n).await;
            let mut cmd = python_cmd(lambda.port, false).expect("python");
            let start = Instant::now();
            let mut child = cmd.spawn().expect("run python_bridge.py");
            let result = common::poll_until(start, n, cap, || delivered(&lambda)).await;
            let _ = child.kill().await;
            Some(report("python", result))
        }
        false => None,
    };
    let default_rate = report(
        "default configuration",
        uplink_run(n, cap, &default_config).await,
    );
    let tuned_rate = report(
        "max_concurrency = 32",
        uplink_run(n, cap, &tuned_config).await,
    );

    let backlog = thousands(n as f64);
    row(
        &format!(
            "one message per invocation through a 25 ms link (the fake Lambda answers each Invoke after 25 ms), default configuration, {backlog}-message backlog, from process start"
        ),
        &format!("{} msg/s", thousands(default_rate)),
        "",
    );
    row(
        "the same with `max_concurrency = 32`",
        &format!("{} msg/s", thousands(tuned_rate)),
        "",
    );
    match python_rate {
        Some(python_rate) => {
            row(
                &format!(
                    "a naive Python bridge (paho-mqtt {PAHO_VERSION}, {PYTHON_THREADS} worker threads, `bench/python_bridge.py`), same link and backlog"
                ),
                &format!("{} msg/s", thousands(python_rate)),
                "",
            );
            row(
                "ratio default configuration / Python",
                &format!(
                    "{:.1} (`max_concurrency = 32`: {:.1})",
                    default_rate / python_rate,
                    tuned_rate / python_rate
                ),
                "≥ 4",
            );
        }
        None => row(
            "a naive Python bridge",
            "skipped: paho-mqtt could not be installed",
            "",
        ),
    }
}

/// A fake Lambda that answers each of a run's requests after the uplink's delay.
async fn slow_lambda(n: usize) -> FakeLambdaServer {
    let lambda = FakeLambdaServer::start().await;
    // Unscripted requests would be answered at once: script more than the run can send.
    lambda.fake.script(
        FUNCTION,
        std::iter::repeat_n(Reply::Slow(UPLINK_DELAY), n + n / 2),
    );
    lambda
}

/// One bridge run on the slow link: messages delivered, and the time from process start until
/// the last of them or `cap`.
async fn uplink_run(
    n: usize,
    cap: Duration,
    config: &impl Fn(&Path, &str) -> String,
) -> (usize, Duration) {
    let lambda = slow_lambda(n).await;
    let bridge = Bridge::spawn(|dir| config(dir, &lambda.endpoint()));
    let result = common::poll_until(bridge.spawned, n, cap, || delivered(&lambda)).await;
    bridge.kill().await;
    result
}

/// Invocations needed for 10,000 messages: one by one, in batches of 100, in 60 s windows.
async fn invocations_per_10k() {
    const M: usize = 10_000;
    let unbatched = "[[rules]]\nname = \"bench\"\ntopic = \"bench/#\"\nfunction = \"sink\"\nmax_concurrency = 8\n";
    let windowed = "[[rules]]\nname = \"bench\"\ntopic = \"bench/#\"\nfunction = \"sink\"\n[rules.aggregate]\nwindow = \"60s\"\nfields = [\"/temperature\"]\n";
    let mut counts = Vec::new();
    for rules in [unbatched, RULE_BATCH_100, windowed] {
        let broker = Mosquitto::start().await;
        let lambda = FakeLambdaServer::start().await;
        let daemon =
            support::Daemon::start(&support::config(&broker.url(), &lambda.endpoint(), rules))
                .await;
        daemon.wait_for_log("subscribed").await;
        let publisher = Publisher::connect(broker.port).await;
        for i in 0..M {
            publisher.publish(TOPIC, 1, payload(i)).await;
        }
        publisher.wait_acked(M).await;
        daemon.wait_buffered(M).await;
        let (_, log) = daemon.terminate().await;
        assert!(log.contains("left_in_buffer=0"), "{log}");
        counts.push(thousands(
            lambda.fake.with_invocations(|all| all.len()) as f64
        ));
    }
    row(
        "invocations for 10,000 messages: without batching / `max_messages = 100` / a 60 s window on one topic",
        &counts.join(" / "),
        "",
    );
}

/// Peak RSS of the bridge while a publisher aims at 10,000 msg/s for 10 s, delivered in batches
/// of 100; the rate reported is the one the broker saw acknowledged.
async fn sustained_rss() {
    const TARGET_PER_MS: usize = 10;
    const MILLIS: u64 = 10_000;
    let broker = Mosquitto::start().await;
    let proxy = AckProxy::start(broker.port);
    let lambda = FakeLambdaServer::start().await;
    let bridge = Bridge::spawn(|dir| {
        bridge_config(
            proxy.port,
            "bench-sustained",
            &lambda.endpoint(),
            dir,
            RULE_BATCH_100,
        )
    });
    bridge.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    proxy.clear_counts();
    let start = Instant::now();
    let mut sent = 0;
    for tick in 0..MILLIS {
        for _ in 0..TARGET_PER_MS {
            publisher.publish(TOPIC, 1, payload(sent)).await;
            sent += 1;
        }
        tokio::time::sleep_until((start + Duration::from_millis(tick + 1)).into()).await;
    }
    let enqueued = start.elapsed();
    let acked = nth_puback(&proxy, sent, || bridge.log_text()).await;
    let (got, _) = common::poll_until(start, sent, STEP_PATIENCE, || delivered(&lambda)).await;
    assert!(got >= sent, "delivered {got} of {sent}");
    let last_delivered = lambda
        .fake
        .with_invocations(|all| all.iter().map(|i| i.at).max())
        .expect("invocations");
    let first_ack = proxy.nth_puback(1).expect("a first PUBACK");
    let peak = bridge.peak_rss_kib().unwrap_or(0);
    bridge.kill().await;
    let at_broker = sent as f64 / (acked - first_ack).as_secs_f64();
    let delivered_rate = sent as f64 / (last_delivered - start).as_secs_f64();
    eprintln!(
        "sustained: {sent} messages enqueued by the publisher in {:.1} s; PUBACKs at the broker over {:.1} s; delivered {:.1} s after the first publish",
        enqueued.as_secs_f64(),
        (acked - first_ack).as_secs_f64(),
        (last_delivered - start).as_secs_f64()
    );
    row(
        &format!(
            "peak RSS while the bridge took {} msg/s for {:.1} s (PUBACKs at the broker; {} msg/s delivered), batches of 100",
            thousands(at_broker),
            (acked - first_ack).as_secs_f64(),
            thousands(delivered_rate)
        ),
        &format!("{:.1} MiB", peak as f64 / 1024.0),
        "≤ 20 MiB",
    );
}
