//! Batching, statistics windows, throttles, rate limits and adaptive concurrency, end to end
//! with mosquitto and the fake Lambda.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use support::fake_lambda::{FakeLambdaServer, Reply};
use support::{Daemon, Mosquitto, Publisher, config};

fn messages_in(body: &serde_json::Value) -> usize {
    body["messages"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_thousand_messages_with_max_messages_100_arrive_in_about_ten_invocations() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "batched"
topic = "b/#"
function = "f"
[rules.batch]
max_messages = 100
max_wait = "1s"
"#;
    let mut daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    daemon.stop().await;
    // A backlog, as after an outage: it replays as full batches.
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..1000 {
        publisher.publish("b/x", 1, i.to_string()).await;
    }
    publisher.wait_acked(1000).await;
    let daemon = daemon.restart().await;
    lambda.fake.wait_for_messages("f", 1000).await;
    let calls = lambda.fake.invocations();
    assert!(calls.iter().all(|c| messages_in(&c.body) <= 100));
    assert!(
        (10..=13).contains(&calls.len()),
        "about 10 invocations: {}",
        calls.len()
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn invocations_per_second_2_spaces_invocations_half_a_second_apart() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "paced"
topic = "p/#"
function = "f"
[rules.rate_limit]
invocations_per_second = 2
burst = 1
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..7 {
        publisher.publish("p/x", 1, i.to_string()).await;
    }
    lambda.fake.wait_for_messages("f", 7).await;
    let calls = lambda.fake.invocations();
    let span = calls[6].at.duration_since(calls[0].at);
    // Six gaps of 0.5 s: 3 s, give or take scheduling.
    assert!(
        span >= Duration::from_millis(2900) && span < Duration::from_millis(3600),
        "{span:?}"
    );
    for pair in calls.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(450), "{gap:?}");
    }
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_statistics_window_over_known_values_gives_exact_figures() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "stats"
topic = "sensors/+/temperature"
function = "f"
[rules.aggregate]
window = "3s"
fields = ["/t", "/env/h"]
group_by = "level:2"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    // Start just after a window boundary so every reading falls into one window.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let next = (now / 3000 + 1) * 3000 + 100;
    tokio::time::sleep(Duration::from_millis(next - now)).await;
    let readings = [
        ("dev1", 20.0),
        ("dev1", 22.5),
        ("dev2", 30.0),
        ("dev1", 21.0),
        ("dev2", 31.0),
    ];
    for (device, t) in readings {
        publisher
            .publish(
                &format!("sensors/{device}/temperature"),
                1,
                format!(r#"{{"t": {t}, "env": {{"h": 40}}}}"#),
            )
            .await;
    }
    publisher
        .publish("sensors/dev1/temperature", 1, r#"{"t": "broken"}"#)
        .await;
    lambda
        .fake
        .wait_until("a window event", |all| !all.is_empty())
        .await;
    let event = &lambda.fake.invocations()[0].body;
    assert!(event.get("messages").is_none(), "{event}");
    assert_eq!(event["rule"], json!("stats"));
    let groups = event["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "{event}");
    let dev1 = &groups[0];
    assert_eq!(dev1["group"], json!("dev1"));
    assert_eq!(dev1["messages"], json!(4));
    let t = &dev1["fields"]["/t"];
    assert_eq!(t["count"], json!(3));
    assert_eq!(t["skipped"], json!(1));
    assert_eq!(t["min"], json!(20.0));
    assert_eq!(t["max"], json!(22.5));
    assert_eq!(t["mean"], json!(21.166666666666668));
    assert_eq!(t["first"], json!(20.0));
    assert_eq!(t["last"], json!(21.0));
    let dev2 = &groups[1]["fields"]["/t"];
    assert_eq!(
        (dev2["count"].clone(), dev2["sum"].clone()),
        (json!(2), json!(61.0))
    );
    let start = humantime::parse_rfc3339(event["window"]["start"].as_str().expect("start"))
        .expect("rfc3339");
    let end =
        humantime::parse_rfc3339(event["window"]["end"].as_str().expect("end")).expect("rfc3339");
    assert_eq!(
        end.duration_since(start).expect("order"),
        Duration::from_secs(3)
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
    assert_eq!(
        lambda.fake.invocations().len(),
        1,
        "one window, one invocation"
    );
}

#[tokio::test]
async fn throttle_and_only_changes_drop_what_they_should_and_count_it() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "noisy"
topic = "n/#"
function = "f"
[rules.throttle]
min_interval = "1h"
keep = "first"

[[rules]]
name = "switch"
topic = "s/#"
function = "g"
max_concurrency = 1
[rules.throttle]
only_changes = true
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log_count("subscribed", 2).await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..5 {
        publisher.publish("n/a", 1, format!("{i}")).await;
        publisher.publish("n/b", 1, format!("{i}")).await;
    }
    for state in ["on", "on", "off", "off", "off", "on"] {
        publisher.publish("s/lamp", 1, state).await;
    }
    publisher.wait_acked(16).await;
    daemon.wait_buffered(16).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let payloads = |f: &str| -> Vec<serde_json::Value> {
        lambda
            .fake
            .accepted_for(f)
            .iter()
            .map(|c| c.body["messages"][0]["payload"].clone())
            .collect()
    };
    assert_eq!(
        payloads("f"),
        vec![json!(0), json!(0)],
        "one per topic per interval"
    );
    assert_eq!(payloads("g"), vec![json!("on"), json!("off"), json!("on")]);
    assert!(
        log.contains("rule=noisy") && log.contains("throttled_min_interval=8"),
        "{log}"
    );
    assert!(log.contains("throttled_only_changes=3"), "{log}");
}

#[tokio::test]
async fn a_throttling_function_sees_the_bridges_concurrency_drop() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // Four slow successes show the full concurrency, then throttles, then slow successes.
    let mut script: Vec<Reply> = (0..4)
        .map(|_| Reply::Slow(Duration::from_millis(300)))
        .collect();
    script.extend((0..6).map(|_| Reply::throttle(None)));
    script.extend((0..40).map(|_| Reply::Slow(Duration::from_millis(100))));
    lambda.fake.script("f", script);
    let rules = r#"
[[rules]]
name = "busy"
topic = "c/#"
function = "f"
max_concurrency = 4
"#;
    let mut daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    daemon.stop().await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..30 {
        publisher.publish("c/x", 1, i.to_string()).await;
    }
    publisher.wait_acked(30).await;
    let daemon = daemon.restart().await;
    lambda.fake.wait_for_messages("f", 30).await;
    let calls = lambda.fake.invocations();
    let early = calls
        .iter()
        .take(4)
        .map(|c| c.concurrent)
        .max()
        .unwrap_or(0);
    assert_eq!(early, 4, "four in flight before any throttle");
    // Right after the throttles the bridge allows one in flight, then climbs back.
    let after: Vec<usize> = calls.iter().skip(4).take(3).map(|c| c.concurrent).collect();
    assert!(
        after.iter().all(|c| *c <= 2),
        "concurrency dropped: {after:?}"
    );
    daemon
        .wait_for_log("throttled: fewer invocations in flight")
        .await;
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn sigterm_delivers_a_half_filled_window_and_batch() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "hourly"
topic = "h/#"
function = "w"
[rules.aggregate]
window = "1h"
fields = ["/v"]
group_by = "none"

[[rules]]
name = "slow-batch"
topic = "h/#"
function = "b"
[rules.batch]
max_messages = 1000
max_wait = "1h"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log_count("subscribed", 2).await;
    let publisher = Publisher::connect(broker.port).await;
    for v in [1, 2, 3] {
        publisher
            .publish("h/x", 1, format!(r#"{{"v": {v}}}"#))
            .await;
    }
    daemon.wait_buffered(3).await;
    assert!(
        lambda.fake.invocations().is_empty(),
        "nothing is due before the hour"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let window = lambda.fake.accepted_for("w");
    assert_eq!(window.len(), 1);
    assert_eq!(
        window[0].body["groups"][0]["fields"]["/v"]["sum"],
        json!(6.0)
    );
    let batch = lambda.fake.accepted_for("b");
    assert_eq!(batch.len(), 1);
    assert_eq!(messages_in(&batch[0].body), 3);
}
