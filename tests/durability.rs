//! The delivery promise end to end: kill -9, Lambda outages, throttling, daemon and broker
//! restarts. Every message the broker handed over reaches the function at least once.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::fake_lambda::{FakeLambda, FakeLambdaServer, Invocation, Reply, deliveries};
use support::{Daemon, Mosquitto, Protocol, Publisher, binary, config, config_for};

const RULES: &str = r#"
[[rules]]
name = "stream"
topic = "stream/#"
function = "sink"
[rules.batch]
max_messages = 50
max_wait = "20ms"
"#;

/// Payload numbers in these invocations, each counted once.
fn payloads_of(all: &[Invocation]) -> BTreeSet<u64> {
    all.iter()
        .flat_map(|c| c.body["messages"].as_array().into_iter().flatten())
        .filter_map(|m| m["payload"].as_u64())
        .collect()
}

/// Payload numbers that reached the function, each counted once.
fn delivered(fake: &FakeLambda) -> BTreeSet<u64> {
    fake.with_invocations(payloads_of)
}

async fn wait_all_delivered(fake: &FakeLambda, n: u64) {
    // The predicate runs under the fake's lock: it must not lock it again.
    fake.wait_until(&format!("payloads 0..{n}"), |all| {
        all.iter().map(|i| i.messages as u64).sum::<u64>() >= n
            && payloads_of(all).len() as u64 >= n
    })
    .await;
    assert_eq!(delivered(fake), (0..n).collect::<BTreeSet<_>>());
}

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test]
async fn kill_9_at_random_points_while_streaming_loses_nothing() {
    kill_9_while_streaming(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_kill_9_at_random_points_while_streaming_loses_nothing() {
    kill_9_while_streaming(Protocol::V5).await;
}

async fn kill_9_while_streaming(protocol: Protocol) {
    const N: u64 = 3000;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let mut daemon = Daemon::start(&config_for(
        protocol,
        &broker.url(),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;

    let publisher = Publisher::connect(broker.port).await;
    let stream = publisher.stream_in_bursts("stream/x", N, 100, Duration::from_millis(15));
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261127);
    let mut rng = Lcg(seed);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(50 + rng.next(250))).await;
        daemon = daemon.kill().await.restart().await;
        daemon.wait_for_log("connected to the MQTT broker").await;
    }
    stream.await.expect("publisher");
    publisher.wait_acked(N as usize).await;
    wait_all_delivered(&lambda.fake, N).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_lambda_outage_then_throttling_then_recovery_delivers_everything_across_a_restart() {
    const N: u64 = 200;
    let broker = Mosquitto::start().await;
    // Lambda is down: nothing listens on its port.
    let outage = support::Outage::begin();
    let lambda_port = support::free_port();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let daemon = Daemon::start(&config(&broker.url(), &endpoint, RULES)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..N / 2 {
        publisher.publish("stream/a", 1, i.to_string()).await;
    }
    daemon.wait_buffered((N / 2) as usize).await;
    daemon.wait_for_log("code=ConnectionFailed").await;

    // Restart the daemon during the outage: what it buffered stays on disk.
    let mut daemon = daemon;
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("left_in_buffer=100"), "{log}");
    let daemon = daemon.restart().await;
    daemon.wait_for_log("buffered messages from before").await;
    for i in N / 2..N {
        publisher.publish("stream/a", 1, i.to_string()).await;
    }
    daemon.wait_buffered((N / 2) as usize).await;

    // Lambda comes back, throttling at first.
    let fake = FakeLambda::back_after(&outage);
    fake.script(
        "sink",
        [
            Reply::throttle(Some("1")),
            Reply::throttle(None),
            Reply::service_error(),
        ],
    );
    let _lambda = FakeLambdaServer::start_on(lambda_port, fake.clone()).await;
    wait_all_delivered(&fake, N).await;
    assert_eq!(fake.refused(), 3);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("TooManyRequestsException"), "{log}");
}

#[tokio::test]
async fn a_backlog_flood_from_the_broker_is_ingested_without_stalling() {
    backlog_flood(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_a_backlog_flood_from_the_broker_is_ingested_without_stalling() {
    backlog_flood(Protocol::V5).await;
}

async fn backlog_flood(protocol: Protocol) {
    // mosquitto with persistence sends a stored backlog without waiting for acks; rumqttc then
    // lags in sending them, which once deadlocked ingest at about 10,000 messages.
    const N: u64 = 20_000;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let mut daemon = Daemon::start(&config_for(
        protocol,
        &broker.url(),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    daemon.stop().await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..N {
        publisher.publish("stream/flood", 1, i.to_string()).await;
    }
    publisher.wait_acked(N as usize).await;
    let daemon = daemon.restart().await;
    wait_all_delivered(&lambda.fake, N).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn every_stored_message_is_acknowledged_so_a_restart_brings_none_again() {
    all_acknowledged(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_every_stored_message_is_acknowledged_so_a_restart_brings_none_again() {
    all_acknowledged(Protocol::V5).await;
}

/// A backlog arrives in full in-flight windows, so acknowledgements go out in groups (under
/// MQTT 3.1.1 the rest of a group is written behind its first); QoS 1 and 2 mixed, so both
/// PUBACK and PUBREC go out. An acknowledgement that never reached the broker would bring its
/// message again, with a new id, after the restart.
async fn all_acknowledged(protocol: Protocol) {
    const N: u64 = 3_000;
    let rules = RULES.replace("function = \"sink\"", "function = \"sink\"\nqos = 2");
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let config = config_for(protocol, &broker.url(), &lambda.endpoint(), &rules);
    let mut daemon = Daemon::start(&config).await;
    daemon.wait_for_log("subscribed").await;
    daemon.stop().await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..N {
        publisher
            .publish("stream/acks", 1 + (i % 2) as u8, i.to_string())
            .await;
    }
    publisher.wait_acked(N as usize).await;
    let daemon = daemon.restart().await;
    wait_all_delivered(&lambda.fake, N).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("had not released"), "{log}");

    // Whatever the broker still held for the session comes right after the CONNACK, before a
    // message published once the bridge is connected again.
    let daemon = Daemon::start(&config).await;
    daemon.wait_for_log("connected to the MQTT broker").await;
    publisher.publish("stream/acks", 1, N.to_string()).await;
    lambda
        .fake
        .wait_until("the message after the restart", |all| {
            payloads_of(all).contains(&N)
        })
        .await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let copies = lambda.fake.with_invocations(deliveries);
    let again: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        again.is_empty(),
        "{} messages came again after the restart (payload, copies), e.g. {:?}",
        again.len(),
        &again[..again.len().min(10)]
    );
    assert_eq!(copies.len() as u64, N + 1);
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    broker_restart_mid_stream(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_a_broker_restart_mid_stream_loses_nothing() {
    broker_restart_mid_stream(Protocol::V5).await;
}

async fn broker_restart_mid_stream(protocol: Protocol) {
    const N: u64 = 1000;
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.script(
        "sink",
        (0..5).map(|_| Reply::Slow(Duration::from_millis(100))),
    );
    let daemon = Daemon::start(&config_for(
        protocol,
        &broker.url(),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    {
        let publisher = Publisher::connect(broker.port).await;
        for i in 0..N / 2 {
            publisher.publish("stream/b", 1, i.to_string()).await;
        }
        publisher.wait_acked((N / 2) as usize).await;
    }
    // Gracefully: mosquitto saves sessions and in-flight messages to its persistence file.
    broker.stop_gracefully().await;
    broker.start_again().await;
    daemon
        .wait_for_log_count("connected to the MQTT broker", 2)
        .await;
    let publisher = Publisher::connect(broker.port).await;
    for i in N / 2..N {
        publisher.publish("stream/b", 1, i.to_string()).await;
    }
    publisher.wait_acked((N / 2) as usize).await;
    wait_all_delivered(&lambda.fake, N).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn buffer_commands_refuse_while_the_daemon_runs_and_replay_dead_letters_after() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.missing("sink");
    let mut daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), RULES)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..10 {
        publisher.publish("stream/c", 1, i.to_string()).await;
    }
    daemon.wait_for_log("moved to the dead-letter store").await;

    let config_path = daemon.config_path.clone();
    let cli = |args: &[&str]| {
        std::process::Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .output()
            .expect("run the CLI")
    };
    let out = cli(&["buffer", "stats"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("in use by another mqtt-lambda-bridge process")
    );

    // Everything buffered is dead-lettered by the drain at SIGTERM.
    daemon.wait_buffered(10).await;
    let (code, _) = daemon.stop().await;
    assert_eq!(code, Some(0));
    let out = cli(&["buffer", "dead-letters", "list"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listing.contains("stream  ResourceNotFoundException"),
        "{listing}"
    );
    let out = cli(&["buffer", "dead-letters", "list", "--json"]);
    let ids: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|l| {
            l["event"]["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 10);
    let out = cli(&["buffer", "dead-letters", "list", "--rule", "nope"]);
    assert_eq!(out.status.code(), Some(64));

    let out = cli(&["buffer", "dead-letters", "replay"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stream: 10 message(s) back in the queue")
    );
    let out = cli(&["buffer", "stats"]);
    let stats = String::from_utf8_lossy(&out.stdout).to_string();
    let row = stats
        .lines()
        .find(|l| l.starts_with("stream"))
        .unwrap_or_default()
        .to_owned();
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns.get(1), Some(&"10"), "10 pending: {stats}");
    assert_eq!(columns.last(), Some(&"0"), "no dead letters left: {stats}");

    // The function exists now: the replayed messages arrive with their original ids.
    let fixed = FakeLambdaServer::start().await;
    let text = std::fs::read_to_string(&daemon.config_path)
        .expect("config")
        .replace(&lambda.endpoint(), &fixed.endpoint());
    std::fs::write(&daemon.config_path, text).expect("rewrite config");
    let daemon = daemon.restart().await;
    fixed.fake.wait_for_messages("sink", 10).await;
    let got: BTreeSet<String> = fixed
        .fake
        .invocations()
        .iter()
        .flat_map(|c| c.body["messages"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(got, ids);
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

/// A measurement, not a check of timing: run it on its own, with the release binary for the
/// rate the README quotes (`cargo test --release --test durability -- --ignored
/// duplicates_per_kill --nocapture`). Streams `DUPS_N` (6,000) QoS 1 messages in bursts of 500
/// with `DUPS_PAUSE_MS` (70) between them, one message per invocation, kills the bridge with SIGKILL `DUPS_KILLS` (3) times at random
/// points, and counts the messages the buffer delivered again (same id) after each kill,
/// against the bound: the invocations in flight (at most 64 by default) plus
/// `ACK_WRITE_EVERY` (32).
#[tokio::test]
#[ignore = "a measurement: run it on its own, with --release for the real rate"]
async fn duplicates_per_kill_9_while_streaming_stay_within_the_bound() {
    let n: u64 = env_or("DUPS_N", 6000);
    let kills: usize = env_or("DUPS_KILLS", 3);
    // The pause after each burst of 500: 70 ms streams faster than the bridge delivers; 1 s
    // gives the 500 msg/s the README's earlier figures were measured at.
    let pause_ms: u64 = env_or("DUPS_PAUSE_MS", 70);
    let rules = "[[rules]]\nname = \"stream\"\ntopic = \"stream/#\"\nfunction = \"sink\"\n";
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let mut daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    let stream = publisher.stream_in_bursts("stream/x", n, 500, Duration::from_millis(pause_ms));
    let mut rng = Lcg(env_or("KILL_SEED", 20261204));
    let mut restarts = Vec::new();
    let mut killed_at = Vec::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rng.next(300))).await;
        killed_at.push(std::time::Instant::now());
        daemon = daemon.kill().await.restart().await;
        restarts.push(std::time::Instant::now());
        daemon.wait_for_log("connected to the MQTT broker").await;
    }
    stream.await.expect("publisher");
    publisher.wait_acked(n as usize).await;
    wait_all_delivered(&lambda.fake, n).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");

    let (rate, per_kill, again_by_payload) = lambda.fake.with_invocations(|all| {
        // The rate before the first kill, from the first arrival.
        let before: Vec<_> = all.iter().filter(|i| i.at < killed_at[0]).collect();
        let span = before
            .last()
            .zip(before.first())
            .map_or(0.0, |(l, f)| (l.at - f.at).as_secs_f64());
        let rate = before.iter().map(|i| i.messages).sum::<usize>() as f64 / span.max(1e-3);
        // Each id's later copies, by the restart they came after.
        let mut seen = std::collections::HashMap::new();
        let mut per_kill = vec![0usize; kills];
        for invocation in all {
            for m in invocation.body["messages"].as_array().into_iter().flatten() {
                let id = m["id"].as_str().unwrap_or_default().to_owned();
                if std::mem::replace(seen.entry(id).or_insert(false), true) {
                    let after = restarts.iter().rposition(|r| invocation.at >= *r);
                    per_kill[after.unwrap_or(0)] += 1;
                }
            }
        }
        let copies = deliveries(all);
        let again = copies.values().filter(|c| **c > 1).count();
        (rate, per_kill, again)
    });
    eprintln!(
        "{n} messages, one per invocation, {kills} kills: delivered at {rate:.0} msg/s before the \
         first kill; the buffer delivered again (same id) {per_kill:?} after each kill; {again_by_payload} \
         payloads arrived more than once in all (the broker's redeliveries of messages not yet \
         acknowledged to it included)"
    );
    let bound = 64 + 32;
    assert!(
        per_kill.iter().all(|&d| d <= bound),
        "duplicates per kill {per_kill:?}, at most {bound} allowed"
    );
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
