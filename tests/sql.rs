//! SQL rules end to end: a WHERE keeps some messages out of the buffer and the function
//! receives the SELECT result (a real Python handler in MiniStack); batches and statistics
//! windows are formed of what the SELECT produced; HTTP ingest answers for a filtered message.

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::fake_lambda::FakeLambdaServer;
use support::{Daemon, MiniStack, Mosquitto, Publisher, config, wait_for_recorded};

#[tokio::test]
async fn a_where_keeps_messages_out_of_the_buffer_and_the_function_receives_the_select_result() {
    let broker = Mosquitto::start().await;
    let ministack = MiniStack::start().await;
    let record = ministack.deploy_recorder("alarm").await;
    let rules = r#"
[[rules]]
name = "hot"
function = "alarm"
sql = "SELECT temperature AS t, topic(2) AS device, missing FROM 'sensors/+/temperature' WHERE temperature > 50"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &ministack.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    // 0, 10, … 90: four over 50. Then one without the field and one that is not JSON.
    for i in 0..10 {
        let payload = format!(
            r#"{{"temperature": {}, "other": "dropped by SELECT"}}"#,
            i * 10
        );
        publisher
            .publish(&format!("sensors/dev{i}/temperature"), 1, payload)
            .await;
    }
    publisher
        .publish("sensors/dev10/temperature", 1, r#"{"humidity": 99}"#)
        .await;
    publisher
        .publish("sensors/dev11/temperature", 1, "hot!")
        .await;
    publisher.wait_acked(12).await;
    daemon.wait_buffered(12).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let summary = log
        .lines()
        .find(|l| l.contains("rule summary"))
        .unwrap_or_default();
    // Only the kept four were written to the buffer; the other eight were acknowledged unstored.
    assert!(
        summary.contains("queued=4") && summary.contains("filtered=8"),
        "{summary}"
    );

    let events = wait_for_recorded(&record, 4).await;
    assert_eq!(events.len(), 4);
    let mut seen = BTreeSet::new();
    for event in &events {
        assert_eq!(event["rule"], json!("hot"));
        let m = &event["messages"][0];
        let device = m["payload"]["device"].as_str().expect("device").to_owned();
        let t = m["payload"]["t"].as_i64().expect("t");
        assert!(t > 50, "{event}");
        // The SELECT result replaced the payload; the envelope stayed.
        assert_eq!(m["payload"], json!({"t": t, "device": device}), "{event}");
        assert_eq!(m["topic"], json!(format!("sensors/{device}/temperature")));
        assert_eq!(m["qos"], json!(1));
        assert!(
            m["id"].is_string() && m["received_at"].is_string(),
            "{event}"
        );
        seen.insert(t);
    }
    assert_eq!(seen, BTreeSet::from([60, 70, 80, 90]));
}

#[tokio::test]
async fn batches_and_windows_are_formed_of_what_the_select_produced() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "even"
function = "batched"
sql = "SELECT n, topic(2) AS dev FROM 'b/+' WHERE n % 2 = 0"
[rules.batch]
max_messages = 100
max_wait = "300ms"

[[rules]]
name = "doubled"
function = "windowed"
sql = "SELECT c * 2 AS c2 FROM 'w/+' WHERE c > 0"
[rules.aggregate]
window = "1h"
fields = ["/c2"]
group_by = "none"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for n in 0..10 {
        publisher
            .publish(&format!("b/dev{n}"), 1, format!(r#"{{"n": {n}, "x": 1}}"#))
            .await;
    }
    for c in [-1, 1, 2, 3] {
        publisher
            .publish("w/dev", 1, format!(r#"{{"c": {c}}}"#))
            .await;
    }
    publisher.wait_acked(14).await;
    let batched = |all: &[support::fake_lambda::Invocation]| -> usize {
        all.iter()
            .filter(|i| i.function == "batched")
            .map(|i| i.messages)
            .sum()
    };
    lambda
        .fake
        .wait_until("the five even messages", |all| batched(all) >= 5)
        .await;
    // Stopping closes the open window into its event.
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let invocations = lambda.fake.invocations();
    let mut payloads: Vec<serde_json::Value> = invocations
        .iter()
        .filter(|i| i.function == "batched")
        .flat_map(|i| i.body["messages"].as_array().cloned().unwrap_or_default())
        .map(|m| m["payload"].clone())
        .collect();
    payloads.sort_by_key(|p| p["n"].as_i64());
    let expected: Vec<_> = [0, 2, 4, 6, 8]
        .iter()
        .map(|n| json!({"n": n, "dev": format!("dev{n}")}))
        .collect();
    assert_eq!(payloads, expected);
    let windows: Vec<_> = invocations
        .iter()
        .filter(|i| i.function == "windowed")
        .collect();
    assert_eq!(windows.len(), 1, "{invocations:?}");
    let group = &windows[0].body["groups"][0];
    assert_eq!(group["messages"], json!(3), "{group}");
    let c2 = &group["fields"]["/c2"];
    assert_eq!(
        (&c2["count"], &c2["min"], &c2["max"], &c2["sum"]),
        (&json!(3), &json!(2.0), &json!(6.0), &json!(12.0)),
        "{c2}"
    );
}
