//! End to end against MiniStack: a real Python handler receives the events.

mod support;

use std::collections::HashSet;

use serde_json::json;
use support::{Daemon, MiniStack, Mosquitto, Publisher, config, wait_for_recorded};

#[tokio::test]
async fn n_qos1_messages_in_n_events_out_and_a_non_matching_topic_never_arrives() {
    const N: usize = 25;
    let broker = Mosquitto::start().await;
    let ministack = MiniStack::start().await;
    let record = ministack.deploy_recorder("record-temperature").await;
    let rules = r#"
[[rules]]
name = "temperature"
topic = "sensors/+/temperature"
function = "record-temperature"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &ministack.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;

    let publisher = Publisher::connect(broker.port).await;
    publisher
        .publish("sensors/other/humidity", 1, r#"{"never": true}"#)
        .await;
    for i in 0..N {
        publisher
            .publish(
                &format!("sensors/dev{}/temperature", i % 3),
                1,
                format!(r#"{{"seq": {i}, "c": 21.5}}"#),
            )
            .await;
    }
    publisher.wait_acked(N + 1).await;
    daemon.wait_buffered(N).await;
    // Every buffered message is invoked before a clean exit.
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(&format!("delivered={N}")), "{log}");

    let events = wait_for_recorded(&record, N).await;
    assert_eq!(events.len(), N, "exactly N events");
    let mut seqs = HashSet::new();
    let mut ids = HashSet::new();
    for event in &events {
        assert_eq!(event["rule"], json!("temperature"));
        let messages = event["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        let seq = m["payload"]["seq"].as_u64().expect("payload kept as JSON") as usize;
        assert_eq!(
            m["topic"],
            json!(format!("sensors/dev{}/temperature", seq % 3))
        );
        assert_eq!(m["payload"]["c"], json!(21.5));
        assert_eq!(m["qos"], json!(1));
        seqs.insert(seq);
        ids.insert(m["id"].as_str().expect("id").to_owned());
        assert!(m.get("never").is_none() && m["payload"].get("never").is_none());
    }
    assert_eq!(seqs, (0..N).collect::<HashSet<_>>(), "every message, once");
    assert_eq!(ids.len(), N, "ids intact and unique");
    // The non-matching message was acknowledged and dropped, never invoked.
    assert!(
        !std::fs::read_to_string(&record)
            .unwrap_or_default()
            .contains("humidity")
    );
}

#[tokio::test]
async fn a_function_that_does_not_exist_is_logged_with_the_aws_error_code() {
    let broker = Mosquitto::start().await;
    let ministack = MiniStack::start().await;
    let rules = r#"
[[rules]]
name = "ghost"
topic = "g/#"
function = "no-such-function"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &ministack.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("g/1", 1, "x").await;
    daemon.wait_for_log("code=ResourceNotFoundException").await;
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("ResourceNotFoundException"))
        .unwrap_or_default();
    assert!(
        line.contains("rule=ghost") && line.contains("function=no-such-function"),
        "{line}"
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}
