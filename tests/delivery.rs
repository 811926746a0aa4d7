//! The daemon binary between a real mosquitto and the fake Lambda Invoke API.

mod support;

use std::collections::HashSet;

use serde_json::json;
use support::fake_lambda::{FakeLambdaServer, Reply};
use support::{Daemon, Mosquitto, Publisher, config};

const RULES: &str = r#"
[[rules]]
name = "temperature"
topic = "sensors/+/temperature"
function = "ingest-temperature"
# These tests check queue order: one invocation at a time keeps it.
max_concurrency = 1
"#;

#[tokio::test]
async fn qos1_messages_arrive_as_async_events_with_the_spec_envelope() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), RULES)).await;
    daemon.wait_for_log("subscribed").await;

    let publisher = Publisher::connect(broker.port).await;
    publisher
        .publish("sensors/dev1/temperature", 1, r#"{"c": 21.5}"#)
        .await;
    publisher
        .publish("sensors/dev2/temperature", 1, "21.7 C")
        .await;
    publisher
        .publish("sensors/dev3/temperature", 1, vec![0xff, 0x00])
        .await;
    publisher.publish("sensors/dev4/temperature", 1, "").await;
    publisher.publish("sensors/dev5/humidity", 1, "40").await;
    publisher.wait_acked(5).await;
    lambda.fake.wait_for_messages("ingest-temperature", 4).await;

    let calls = lambda.fake.invocations();
    assert_eq!(
        calls.len(),
        4,
        "one event per message without batching: {calls:#?}"
    );
    for call in &calls {
        assert_eq!(call.invocation_type.as_deref(), Some("Event"));
        assert_eq!(call.qualifier, None);
        let auth = call.authorization.as_deref().unwrap_or_default();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/"),
            "{auth}"
        );
        assert_eq!(call.body["rule"], json!("temperature"));
        let messages = call.body["messages"].as_array().expect("messages[]");
        assert_eq!(messages.len(), 1);
        let m = &messages[0];
        assert_eq!(m["qos"], json!(1));
        assert_eq!(m["retain"], json!(false));
        assert!(m["id"].as_str().is_some_and(|id| id.len() >= 32), "{m}");
        let at = m["received_at"].as_str().expect("received_at");
        assert!(at.ends_with('Z') && at.len() == 24, "{at}");
    }
    let by_topic = |topic: &str| {
        calls
            .iter()
            .map(|c| &c.body["messages"][0])
            .find(|m| m["topic"] == json!(topic))
            .cloned()
            .unwrap_or_else(|| panic!("no event for {topic}"))
    };
    assert_eq!(
        by_topic("sensors/dev1/temperature")["payload"],
        json!({"c": 21.5})
    );
    assert_eq!(
        by_topic("sensors/dev2/temperature")["payload"],
        json!("21.7 C")
    );
    assert_eq!(
        by_topic("sensors/dev3/temperature")["payload_base64"],
        json!("/wA=")
    );
    assert_eq!(by_topic("sensors/dev4/temperature")["payload"], json!(""));
    let ids: HashSet<String> = calls
        .iter()
        .map(|c| {
            c.body["messages"][0]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 4, "ids are unique");

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains("test-secret"),
        "credentials must never be logged"
    );
}

#[tokio::test]
async fn one_message_matching_two_rules_reaches_both_functions_with_their_settings() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "by-name"
topic = "plant/#"
function = "plain"
qualifier = "live"

[[rules]]
name = "by-arn"
topic = "plant/+/pressure"
function = "arn:aws:lambda:us-east-1:123456789012:function:pressure"
invocation = "request_response"

[[rules]]
name = "by-partial-arn"
topic = "plant/line1/pressure"
function = "123456789012:function:partial"
qos = 2
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log_count("subscribed", 3).await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("plant/line1/pressure", 2, "1013").await;
    publisher.wait_acked(1).await;
    lambda
        .fake
        .wait_until("three invocations", |all| all.len() == 3)
        .await;

    let plain = lambda.fake.accepted_for("plain");
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].qualifier.as_deref(), Some("live"));
    assert_eq!(plain[0].invocation_type.as_deref(), Some("Event"));
    let arn = lambda
        .fake
        .accepted_for("arn:aws:lambda:us-east-1:123456789012:function:pressure");
    assert_eq!(arn.len(), 1);
    assert_eq!(arn[0].invocation_type.as_deref(), Some("RequestResponse"));
    assert_eq!(arn[0].body["rule"], json!("by-arn"));
    let partial = lambda.fake.accepted_for("123456789012:function:partial");
    assert_eq!(partial.len(), 1);
    assert_eq!(partial[0].body["messages"][0]["qos"], json!(2));
    let id = plain[0].body["messages"][0]["id"].clone();
    assert_eq!(
        arn[0].body["messages"][0]["id"], id,
        "copies share the message id"
    );
    assert_eq!(partial[0].body["messages"][0]["id"], id);
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_missing_function_goes_to_dead_letters_without_holding_up_other_rules() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.missing("does-not-exist");
    let rules = r#"
[[rules]]
name = "broken"
topic = "a/#"
function = "does-not-exist"

[[rules]]
name = "healthy"
topic = "a/#"
function = "works"
max_concurrency = 1
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log_count("subscribed", 2).await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..20 {
        publisher
            .publish(&format!("a/{i}"), 1, format!("{i}"))
            .await;
    }
    publisher.wait_acked(20).await;
    lambda.fake.wait_for_messages("works", 20).await;
    let payloads: Vec<_> = lambda
        .fake
        .accepted_for("works")
        .iter()
        .map(|c| c.body["messages"][0]["payload"].clone())
        .collect();
    assert_eq!(
        payloads,
        (0..20).map(|i| json!(i)).collect::<Vec<_>>(),
        "FIFO per rule"
    );
    daemon
        .wait_for_log_count("moved to the dead-letter store", 20)
        .await;
    let line = daemon
        .log_text()
        .lines()
        .find(|l| l.contains("moved to the dead-letter store"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        line.contains("rule=broken") && line.contains("code=ResourceNotFoundException"),
        "{line}"
    );

    let dead = std::fs::read_to_string(daemon.buffer_dir().join("broken/dead-letters.jsonl"))
        .expect("dead letters written");
    let dead: Vec<serde_json::Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(dead.len(), 20);
    assert_eq!(dead[0]["code"], json!("ResourceNotFoundException"));
    assert_eq!(dead[0]["rule"], json!("broken"));
    assert_eq!(dead[0]["event"]["messages"][0]["payload"], json!(0));
    assert_eq!(
        lambda.fake.refused(),
        20,
        "one attempt each: not found is permanent"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0));
    assert!(log.contains("dead_lettered=20"), "{log}");
}

#[tokio::test]
async fn throttles_and_server_errors_are_retried_until_accepted() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.script(
        "ingest-temperature",
        [
            Reply::throttle(Some("1")),
            Reply::service_error(),
            Reply::throttle(None),
        ],
    );
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), RULES)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("sensors/d/temperature", 1, "1").await;
    publisher.publish("sensors/d/temperature", 1, "2").await;
    lambda.fake.wait_for_messages("ingest-temperature", 2).await;
    assert_eq!(lambda.fake.refused(), 3);
    let payloads: Vec<_> = lambda
        .fake
        .invocations()
        .iter()
        .map(|c| c.body["messages"][0]["payload"].clone())
        .collect();
    assert_eq!(payloads, vec![json!(1), json!(2)]);
    assert!(daemon.log_text().contains("TooManyRequestsException"));
    assert!(daemon.log_text().contains("ServiceException"));
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn an_oversize_message_is_set_aside_and_the_next_ones_flow() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), RULES)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher
        .publish("sensors/big/temperature", 1, vec![b'x'; 1024 * 1024 + 10])
        .await;
    publisher
        .publish("sensors/small/temperature", 1, "ok")
        .await;
    publisher.wait_acked(2).await;
    lambda.fake.wait_for_messages("ingest-temperature", 1).await;
    daemon.wait_for_log("too large").await;
    let line = daemon
        .log_text()
        .lines()
        .find(|l| l.contains("too large"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(line.contains("rule=temperature"), "{line}");
    assert!(line.contains("topic=sensors/big/temperature"), "{line}");
    assert!(line.contains("payload_bytes=1048586"), "{line}");
    let dead = std::fs::read_to_string(daemon.buffer_dir().join("temperature/dead-letters.jsonl"))
        .expect("set aside in the dead-letter store");
    assert_eq!(dead.lines().count(), 1);
    assert!(dead.contains("PayloadTooLarge"));
    let calls = lambda.fake.invocations();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].body["messages"][0]["topic"],
        json!("sensors/small/temperature")
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn batches_carry_several_messages_up_to_max_messages() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "batched"
topic = "b/#"
function = "batch-fn"
max_concurrency = 1
[rules.batch]
max_messages = 10
max_wait = "500ms"
"#;
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..35 {
        publisher.publish("b/x", 1, format!("{i}")).await;
    }
    publisher.wait_acked(35).await;
    lambda.fake.wait_for_messages("batch-fn", 35).await;
    let calls = lambda.fake.invocations();
    assert!(
        calls
            .iter()
            .all(|c| c.body["messages"].as_array().map_or(0, Vec::len) <= 10)
    );
    assert!(
        calls.len() <= 8,
        "35 messages in at most a few batches: {}",
        calls.len()
    );
    let payloads: Vec<_> = calls
        .iter()
        .flat_map(|c| c.body["messages"].as_array().cloned().unwrap_or_default())
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(payloads, (0..35).map(|i| json!(i)).collect::<Vec<_>>());
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn sigterm_delivers_what_is_queued_then_exits_zero() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.script(
        "ingest-temperature",
        [Reply::Slow(std::time::Duration::from_millis(300))],
    );
    let daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), RULES)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..5 {
        publisher
            .publish("sensors/d/temperature", 1, format!("{i}"))
            .await;
    }
    publisher.wait_acked(5).await;
    daemon.wait_buffered(5).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        lambda.fake.invocations().len(),
        5,
        "queued messages are delivered before exit: {log}"
    );
}
