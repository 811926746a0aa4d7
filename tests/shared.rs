//! Shared subscriptions: several bridges (real binaries, each its own client id and buffer) in
//! one `$share` group on one mosquitto split the load, and a kill -9 of one loses nothing.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::fake_lambda::{FakeLambda, FakeLambdaServer, Invocation};
use support::{Daemon, Mosquitto, Protocol, Publisher, config_for};

/// The rule every member runs; `{function}` tells the members apart at the fake Lambda.
fn rules(function: &str) -> String {
    format!(
        r#"
[[rules]]
name = "stream"
topic = "$share/bridges/stream/#"
function = "{function}"
[rules.batch]
max_messages = 50
max_wait = "20ms"
"#
    )
}

/// Per payload number, how many times each function received it.
fn deliveries(all: &[Invocation]) -> BTreeMap<u64, BTreeMap<String, usize>> {
    let mut seen: BTreeMap<u64, BTreeMap<String, usize>> = BTreeMap::new();
    for call in all {
        for m in call.body["messages"].as_array().into_iter().flatten() {
            if let Some(n) = m["payload"].as_u64() {
                *seen
                    .entry(n)
                    .or_default()
                    .entry(call.function.clone())
                    .or_default() += 1;
            }
        }
    }
    seen
}

async fn wait_every_payload(fake: &FakeLambda, n: u64) -> BTreeMap<u64, BTreeMap<String, usize>> {
    fake.wait_until(&format!("payloads 0..{n}"), |all| {
        deliveries(all).len() as u64 >= n
    })
    .await;
    fake.with_invocations(deliveries)
}

async fn member(
    protocol: Protocol,
    broker: &Mosquitto,
    lambda: &FakeLambdaServer,
    function: &str,
) -> Daemon {
    // `config_for` gives each a client id of its own, `Daemon::start` a buffer dir of its own.
    let text = config_for(
        protocol,
        &broker.url(),
        &lambda.endpoint(),
        &rules(function),
    );
    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    daemon
}

#[tokio::test]
async fn two_bridges_in_one_group_each_take_a_fair_share_and_every_message_arrives_once() {
    fair_share_once_each(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_two_bridges_in_one_group_split_the_load_and_every_message_arrives_once() {
    fair_share_once_each(Protocol::V5).await;
}

async fn fair_share_once_each(protocol: Protocol) {
    const N: u64 = 1000;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let a = member(protocol, &broker, &lambda, "a").await;
    let b = member(protocol, &broker, &lambda, "b").await;
    assert!(a.log_text().contains("filter=$share/bridges/stream/#"));

    let publisher = Publisher::connect(broker.port).await;
    for i in 0..N {
        publisher.publish("stream/x", 1, i.to_string()).await;
    }
    publisher.wait_acked(N as usize).await;
    let seen = wait_every_payload(&lambda.fake, N).await;

    let once = seen.values().all(|by| by.values().sum::<usize>() == 1);
    assert!(once, "a payload arrived twice: {seen:?}");
    let share = |f: &str| seen.values().filter(|by| by.contains_key(f)).count() as u64;
    let (share_a, share_b) = (share("a"), share("b"));
    assert_eq!(share_a + share_b, N);
    assert!(
        share_a >= N / 4 && share_b >= N / 4,
        "unfair split: a {share_a}, b {share_b}"
    );
    for daemon in [a, b] {
        let (code, log) = daemon.terminate().await;
        assert_eq!(code, Some(0), "{log}");
    }
}

#[tokio::test]
async fn kill_9_of_one_member_mid_stream_loses_nothing() {
    const N: u64 = 2000;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let a = member(Protocol::V311, &broker, &lambda, "a").await;
    let b = member(Protocol::V311, &broker, &lambda, "b").await;

    let publisher = Publisher::connect(broker.port).await;
    let stream = publisher.stream_in_bursts("stream/x", N, 100, Duration::from_millis(15));
    // Mid-stream: once b has buffered some, kill it without a chance to ack what it holds.
    b.wait_buffered(100).await;
    let b = b.kill().await;
    stream.await.expect("publisher");
    publisher.wait_acked(N as usize).await;
    // mosquitto keeps a stopped member's persistent session in the group: its unacked
    // messages, and its turn of the new ones, wait for it (see the README's limits).
    let b = b.restart().await;
    let seen = wait_every_payload(&lambda.fake, N).await;
    assert_eq!(seen.len() as u64, N, "every payload at least once");
    for daemon in [a, b] {
        let (code, log) = daemon.terminate().await;
        assert_eq!(code, Some(0), "{log}");
    }
}
