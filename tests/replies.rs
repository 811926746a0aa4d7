//! Replies to devices against real mosquitto: a `request_response` rule with `[rules.reply]`
//! publishes the function's response to the request's MQTT 5 Response Topic (with its
//! Correlation Data and the request's id), else to `reply.topic`; function errors and replies
//! that cannot be published go to the dead letters; a reply survives a broker restart, a broker
//! that lost our session, and a kill -9 of the bridge (the message stays buffered until the
//! broker has the reply).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use support::fake_lambda::{FakeLambdaServer, Reply};
use support::{Daemon, Mosquitto, PATIENCE, Protocol, config_for, free_port};
use tokio::sync::Notify;

/// A device's view of one reply.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    payload: serde_json::Value,
    correlation: Option<Bytes>,
    request_id: Option<String>,
    content_type: Option<String>,
}

/// A device speaking MQTT 5: publishes requests and collects what arrives on `filter`. Its
/// session persists (the broker queues replies while it reconnects), and it subscribes again
/// at every connection (a broker that lost its session has forgotten it).
struct Device {
    client: AsyncClient,
    received: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn connect(port: u16, filter: &str) -> Device {
        let mut options = MqttOptions::new(format!("device-{}", free_port()), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let subscribed = Arc::new(Notify::new());
        let task = {
            let (client, received, arrived, subscribed) = (
                client.clone(),
                received.clone(),
                arrived.clone(),
                subscribed.clone(),
            );
            let filter = filter.to_owned();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                            let _ = client
                                .subscribe_many([Filter::new(filter.clone(), QoS::AtLeastOnce)])
                                .await;
                        }
                        Ok(Event::Incoming(Incoming::SubAck(_))) => subscribed.notify_one(),
                        Ok(Event::Incoming(Incoming::Publish(p))) => {
                            let props = p.properties.clone().unwrap_or_default();
                            let request_id = props
                                .user_properties
                                .iter()
                                .find(|(k, _)| k == "request_id")
                                .map(|(_, v)| v.clone());
                            received.lock().expect("lock").push(Received {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: serde_json::from_slice(&p.payload)
                                    .unwrap_or(serde_json::Value::Null),
                                correlation: props.correlation_data,
                                request_id,
                                content_type: props.content_type,
                            });
                            arrived.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        tokio::time::timeout(PATIENCE, subscribed.notified())
            .await
            .expect("device subscribes");
        Device {
            client,
            received,
            arrived,
            task,
        }
    }

    /// Publishes a request (QoS 1), with a Response Topic and Correlation Data when given.
    async fn request(&self, topic: &str, payload: &str, respond_to: Option<(&str, &str)>) {
        let properties = PublishProperties {
            response_topic: respond_to.map(|(t, _)| t.to_owned()),
            correlation_data: respond_to.map(|(_, c)| Bytes::from(c.to_owned())),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_owned(),
                properties,
            )
            .await
            .expect("queue the request");
    }

    /// Waits until `n` replies have arrived, and returns them.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            let arrived = self.arrived.notified();
            let now = self.received.lock().expect("lock").clone();
            if now.len() >= n {
                return now;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("only {} of {n} replies arrived: {now:?}", now.len());
            }
        }
    }

    /// Waits until a message `is` the one awaited, and returns everything received by then.
    async fn wait_until(&self, what: &str, is: impl Fn(&Received) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + PATIENCE * 2;
        loop {
            let arrived = self.arrived.notified();
            let now = self.received();
            if now.iter().any(&is) {
                return now;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let topics: Vec<&str> = now.iter().map(|r| r.topic.as_str()).collect();
                panic!(
                    "{what} never arrived; {} messages did, on {topics:?}",
                    now.len()
                );
            }
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The bridge running `rules` against `broker` and the Lambda at `endpoint`, subscribed, and a
/// device listening on `filter`.
async fn bridge_and_device(
    broker: &Mosquitto,
    endpoint: &str,
    protocol: Protocol,
    rules: &str,
    filter: &str,
) -> (Daemon, Device) {
    let daemon = Daemon::start(&config_for(protocol, &broker.url(), endpoint, rules)).await;
    daemon.wait_for_log("subscribed").await;
    (daemon, Device::connect(broker.port, filter).await)
}

/// A replying rule: requests on `dev/<id>/req`, replies to `replies/{topic}` when the request
/// names no Response Topic.
const RULES: &str = r#"
[[rules]]
name = "cmd"
topic = "dev/+/req"
function = "handler"
invocation = "request_response"
[rules.reply]
topic = "replies/{topic}"
"#;

/// The message id the function saw in each invocation, in order.
fn invoked_ids(lambda: &FakeLambdaServer) -> Vec<String> {
    lambda
        .fake
        .invocations()
        .iter()
        .filter_map(|i| i.body["messages"][0]["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn mqtt5_replies_go_to_the_response_topic_with_correlation_data_else_to_the_template() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let metrics_port = free_port();
    let rules = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{RULES}allow = [\"dev/+/answers\"]\n"
    );
    let (daemon, device) =
        bridge_and_device(&broker, &lambda.endpoint(), Protocol::V5, &rules, "#").await;

    device
        .request("dev/1/req", r#"{"n":1}"#, Some(("dev/1/answers", "c-1")))
        .await;
    device
        .request("dev/2/req", r#"{"n":2}"#, Some(("dev/2/answers", "c-2")))
        .await;
    device.request("dev/3/req", r#"{"n":3}"#, None).await;
    // The requests themselves arrive too (the device listens on everything): 3 + 3 replies.
    let all = device.wait_for(6).await;
    let replies: Vec<&Received> = all
        .iter()
        .filter(|r| r.payload.get("answer").is_some())
        .collect();
    assert_eq!(replies.len(), 3, "{all:?}");
    let ids = invoked_ids(&lambda);
    assert_eq!(ids.len(), 3);

    let on = |topic: &str| {
        replies
            .iter()
            .find(|r| r.topic == topic)
            .unwrap_or_else(|| panic!("no reply on {topic}: {replies:?}"))
    };
    for (n, topic, correlation) in [
        (1, "dev/1/answers", Some("c-1")),
        (2, "dev/2/answers", Some("c-2")),
        (3, "replies/dev/3/req", None),
    ] {
        let reply = on(topic);
        // The function's response, as it returned it.
        assert_eq!(reply.payload["answer"], serde_json::json!({ "n": n }));
        let id = reply.payload["to"]
            .as_str()
            .expect("the function saw an id");
        assert_eq!(
            reply.request_id.as_deref(),
            Some(id),
            "request_id is the message id"
        );
        assert!(ids.iter().any(|i| i == id));
        assert_eq!(reply.correlation.as_deref(), correlation.map(str::as_bytes));
        assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    }
    // Each request was invoked once and answered once; nothing is left in the buffer.
    daemon.wait_for_log_count("reply published", 3).await;
    let metrics = support::scrape_metrics(metrics_port).await;
    assert!(
        metrics.contains("mlb_replies_total{rule=\"cmd\",result=\"published\"} 3"),
        "{metrics}"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("left_in_buffer=0"), "{log}");
    assert!(
        log.contains(
            "reply summary rule=cmd replies_published=3 replies_without_topic=0 replies_dead_lettered=0"
        ),
        "{log}"
    );
}

#[tokio::test]
async fn mqtt311_replies_go_to_the_configured_topic() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = RULES.replace("replies/{topic}", "{topic}/reply");
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V311,
        &rules,
        "dev/+/req/reply",
    )
    .await;

    for n in 0..5 {
        device
            .request(&format!("dev/{n}/req"), &format!(r#"{{"n":{n}}}"#), None)
            .await;
    }
    let replies = device.wait_for(5).await;
    for n in 0..5 {
        let reply = replies
            .iter()
            .find(|r| r.topic == format!("dev/{n}/req/reply"))
            .unwrap_or_else(|| panic!("no reply for request {n}: {replies:?}"));
        assert_eq!(reply.payload["answer"], serde_json::json!({ "n": n }));
        // MQTT 3.1.1 carries no properties.
        assert_eq!(reply.request_id, None);
    }
    drop(daemon);
}

/// A replying rule that takes one topic `RULES` replies to, which validation (it checks a
/// sample topic) lets through: only the check at publish time stops that loop.
const TRAP: &str = r#"
[[rules]]
name = "trap"
topic = "replies/dev/2/req"
function = "handler"
invocation = "request_response"
[rules.reply]
topic = "out/{topic}"
"#;

#[tokio::test]
async fn function_errors_and_replies_that_would_loop_go_to_the_dead_letters() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // The first request's function fails every time (three attempts make it permanent).
    lambda.fake.script(
        "handler",
        [
            Reply::FunctionError,
            Reply::FunctionError,
            Reply::FunctionError,
        ],
    );
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        &format!("{RULES}{TRAP}"),
        "replies/#",
    )
    .await;

    device.request("dev/1/req", r#"{"n":1}"#, None).await;
    // A Response Topic the rule itself takes is not allowed (nothing is): the reply goes to
    // reply.topic, replies/dev/2/req, which the trap rule takes: it would come back as a
    // request.
    device
        .request("dev/2/req", r#"{"n":2}"#, Some(("dev/9/req", "c")))
        .await;
    device.request("dev/3/req", r#"{"n":3}"#, None).await;

    let replies = device.wait_for(1).await;
    assert_eq!(replies[0].topic, "replies/dev/3/req");
    assert_eq!(replies[0].payload["answer"], serde_json::json!({ "n": 3 }));
    daemon.wait_for_log_count("reply published", 1).await;
    // Both others are dead letters, with their reasons; the function saw request 2 once.
    let dead_letters = daemon.buffer_dir().join("cmd/dead-letters.jsonl");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let letters: Vec<serde_json::Value> = loop {
        let letters: Vec<serde_json::Value> = std::fs::read_to_string(&dead_letters)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if letters.len() >= 2 || tokio::time::Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let codes: Vec<&str> = letters.iter().filter_map(|l| l["code"].as_str()).collect();
    assert!(codes.contains(&"FunctionError"), "{letters:?}");
    assert!(codes.contains(&"ReplyLoop"), "{letters:?}");
    let looped = letters
        .iter()
        .find(|l| l["code"] == "ReplyLoop")
        .expect("loop letter");
    assert_eq!(looped["event"]["messages"][0]["payload"]["n"], 2);
    assert!(
        looped["reason"]
            .as_str()
            .is_some_and(|r| r.contains("replies/dev/2/req") && r.contains("rule trap")),
        "{looped}"
    );
    // Three failed attempts for request 1, one answer each for 2 and 3, and no fourth request:
    // nothing was published to the looping topic.
    assert_eq!(lambda.fake.refused(), 3);
    assert_eq!(invoked_ids(&lambda).len(), 2);
    assert_eq!(device.received().len(), 1);
}

#[tokio::test]
async fn a_reply_waits_for_the_broker_to_come_back() {
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // The function takes a while: the broker goes down meanwhile.
    lambda
        .fake
        .script("handler", [Reply::Slow(Duration::from_millis(1500))]);
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        RULES,
        "replies/#",
    )
    .await;

    device.request("dev/1/req", r#"{"n":1}"#, None).await;
    lambda.fake.wait_arrived(1).await;
    // Stopped gracefully, the broker keeps both sessions (the bridge's and the device's).
    broker.stop_gracefully().await;
    daemon
        .wait_for_log("cannot connect to the MQTT broker")
        .await;
    // The function answers; its reply waits for the broker.
    lambda
        .fake
        .wait_until("the function answers", |i| !i.is_empty())
        .await;
    assert_eq!(daemon.count_log("reply published"), 0);
    broker.start_again().await;

    let replies = device.wait_for(1).await;
    assert_eq!(replies[0].topic, "replies/dev/1/req");
    assert_eq!(replies[0].payload["answer"], serde_json::json!({ "n": 1 }));
    daemon.wait_for_log("reply published").await;
    assert_eq!(invoked_ids(&lambda).len(), 1, "answered once, invoked once");
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("left_in_buffer=0"), "{log}");
}

#[tokio::test]
async fn a_reply_in_flight_when_the_broker_loses_the_session_is_published_again() {
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // Retained, so the device finds the reply whenever it subscribes again to the new broker
    // (which forgot its session too).
    let rules = format!("{RULES}retain = true\n");
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        &rules,
        "replies/#",
    )
    .await;
    device.request("dev/0/req", r#"{"n":0}"#, None).await;
    device.wait_for(1).await;

    // Frozen, the broker takes the next request's reply into its socket but never answers
    // with a PUBACK; then it dies without saving anything.
    lambda
        .fake
        .script("handler", [Reply::Slow(Duration::from_millis(700))]);
    device.request("dev/1/req", r#"{"n":1}"#, None).await;
    lambda.fake.wait_arrived(2).await;
    broker.freeze();
    // The function answers and the bridge sends the reply into the frozen broker's socket.
    daemon
        .wait_for_log_count("reply sent; waiting for the broker's acknowledgement", 2)
        .await;
    broker.restart().await;

    // A new broker, a new session: the bridge subscribes again and publishes the reply again.
    daemon.wait_for_log_count("subscribed", 2).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let reply = loop {
        if let Some(r) = device
            .received()
            .into_iter()
            .find(|r| r.topic == "replies/dev/1/req")
        {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reply to request 1: {:?}",
            device.received()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply.payload["answer"], serde_json::json!({ "n": 1 }));
    assert!(
        daemon
            .log_text()
            .contains("publishing the replies it had not acknowledged again"),
        "{}",
        daemon.log_text()
    );
    daemon.wait_for_log_count("reply published", 2).await;
    assert_eq!(
        invoked_ids(&lambda).len(),
        2,
        "the function is not invoked again"
    );
    drop(daemon);
}

#[tokio::test]
async fn a_message_stays_buffered_until_its_reply_is_at_the_broker_even_across_kill_9() {
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda
        .fake
        .script("handler", [Reply::Slow(Duration::from_millis(1000))]);
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        RULES,
        "replies/#",
    )
    .await;

    device.request("dev/1/req", r#"{"n":1}"#, None).await;
    lambda.fake.wait_arrived(1).await;
    broker.stop_gracefully().await;
    // The function answers while the broker is down; then the bridge is killed.
    lambda
        .fake
        .wait_until("the function answers", |i| !i.is_empty())
        .await;
    let daemon = daemon.kill().await;
    broker.start_again().await;
    let daemon = daemon.restart().await;

    // The message was still buffered: the function is asked again, and this reply arrives.
    let replies = device.wait_for(1).await;
    assert_eq!(replies[0].payload["answer"], serde_json::json!({ "n": 1 }));
    let ids = invoked_ids(&lambda);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], ids[1], "the same message, with the same id");
    assert_eq!(replies[0].request_id.as_deref(), Some(ids[0].as_str()));
    drop(daemon);
}

#[tokio::test]
async fn a_real_handler_s_return_value_is_the_reply() {
    let broker = Mosquitto::start().await;
    let ministack = support::MiniStack::start().await;
    let record = ministack.deploy_recorder("record-commands").await;
    let rules = RULES
        .replace("\"handler\"", "\"record-commands\"")
        .replace("replies/{topic}", "{topic}/reply");
    let (daemon, device) = bridge_and_device(
        &broker,
        &ministack.endpoint(),
        Protocol::V311,
        &rules,
        "dev/+/req/reply",
    )
    .await;

    device.request("dev/1/req", r#"{"open":true}"#, None).await;
    let replies = device.wait_for(1).await;
    // demo/handler.py returns {"received": <messages in the event>}.
    assert_eq!(replies[0].topic, "dev/1/req/reply");
    assert_eq!(replies[0].payload, serde_json::json!({"received": 1}));
    let events = support::wait_for_recorded(&record, 1).await;
    assert_eq!(events[0]["messages"][0]["payload"]["open"], true);
    drop(daemon);
}

#[tokio::test]
async fn many_requests_at_once_each_get_their_own_reply() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // More invocations in flight than replies may wait for their PUBACK at once.
    let rules = RULES.replace(
        "invocation = \"request_response\"",
        "invocation = \"request_response\"\nmax_concurrency = 32",
    ) + "allow = [\"answers/#\"]\n";
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        &rules,
        "answers/#",
    )
    .await;

    const N: usize = 60;
    for n in 0..N {
        let answers = format!("answers/{n}");
        let correlation = format!("c-{n}");
        device
            .request(
                &format!("dev/{n}/req"),
                &format!(r#"{{"n":{n}}}"#),
                Some((&answers, &correlation)),
            )
            .await;
    }
    let replies = device.wait_for(N).await;
    for n in 0..N {
        let mine: Vec<&Received> = replies
            .iter()
            .filter(|r| r.topic == format!("answers/{n}"))
            .collect();
        assert_eq!(mine.len(), 1, "request {n}: {mine:?}");
        assert_eq!(mine[0].payload["answer"], serde_json::json!({ "n": n }));
        assert_eq!(
            mine[0].correlation.as_deref(),
            Some(format!("c-{n}").as_bytes())
        );
        assert_eq!(
            mine[0].request_id.as_deref(),
            mine[0].payload["to"].as_str()
        );
    }
    drop(daemon);
}

#[tokio::test]
async fn a_reply_larger_than_the_broker_accepts_is_dead_lettered_without_a_reconnect_loop() {
    // mosquitto announces its Maximum Packet Size to MQTT 5 clients in CONNACK.
    let broker = Mosquitto::start_with("max_packet_size 2000").await;
    let lambda = FakeLambdaServer::start().await;
    let (daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        RULES,
        "replies/#",
    )
    .await;

    // The request fits; the function's answer around it does not.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(1880));
    device.request("dev/1/req", &big, None).await;
    device.request("dev/2/req", r#"{"n":2}"#, None).await;
    let replies = device.wait_for(1).await;
    assert_eq!(replies[0].topic, "replies/dev/2/req");
    let letters = std::fs::read_to_string(daemon.buffer_dir().join("cmd/dead-letters.jsonl"))
        .expect("a dead letter");
    assert!(letters.contains("\"code\":\"ReplyTooLarge\""), "{letters}");
    assert!(letters.contains("Maximum Packet Size"), "{letters}");
    assert_eq!(
        daemon.count_log("connected to the MQTT broker"),
        1,
        "no reconnect"
    );
    drop(daemon);
}

#[tokio::test]
async fn a_shutdown_while_a_reply_waits_for_the_broker_keeps_the_message_for_the_next_start() {
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda
        .fake
        .script("handler", [Reply::Slow(Duration::from_millis(700))]);
    let (mut daemon, device) = bridge_and_device(
        &broker,
        &lambda.endpoint(),
        Protocol::V5,
        RULES,
        "replies/#",
    )
    .await;

    device.request("dev/1/req", r#"{"n":1}"#, None).await;
    lambda.fake.wait_arrived(1).await;
    broker.stop_gracefully().await;
    lambda
        .fake
        .wait_until("the function answers", |i| !i.is_empty())
        .await;
    // SIGTERM while the reply waits: the daemon waits for it until shutdown_timeout (5 s
    // here), then stops with the message still buffered.
    let started = std::time::Instant::now();
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(5 + 2),
        "took {:?}",
        started.elapsed()
    );
    assert!(log.contains("left_in_buffer=1"), "{log}");
    assert_eq!(daemon.count_log("reply published"), 0);

    broker.start_again().await;
    let daemon = daemon.restart().await;
    let replies = device.wait_for(1).await;
    assert_eq!(replies[0].payload["answer"], serde_json::json!({ "n": 1 }));
    let ids = invoked_ids(&lambda);
    assert_eq!(ids.len(), 2, "invoked again after the restart: {ids:?}");
    assert_eq!(ids[0], ids[1]);
    drop(daemon);
}

/// What arrived on `topic`, of everything a device listening on `#` saw.
fn on_topic(received: &[Received], topic: &str) -> Vec<Received> {
    received
        .iter()
        .filter(|r| r.topic == topic)
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_response_topic_outside_reply_allow_is_never_published_to() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // No reply.allow: no Response Topic is honoured, replies go to reply.topic.
    let (daemon, device) =
        bridge_and_device(&broker, &lambda.endpoint(), Protocol::V5, RULES, "#").await;

    // Device 1 asks the bridge to publish its reply on device 2's command topic.
    device
        .request("dev/1/req", r#"{"n":1}"#, Some(("dev/2/cmd", "c-1")))
        .await;
    // A plain request after it: replies go out in order, so once this one's reply is there,
    // the first one's has been published (or not) already.
    device.request("dev/1/req", r#"{"n":2}"#, None).await;
    // The bridge publishes its replies in order and the broker forwards them in order: once
    // the second reply is here, a publish on device 2's topic would be here too.
    let received = device
        .wait_until("the reply to the plain request", |r| {
            r.payload["answer"] == serde_json::json!({ "n": 2 })
        })
        .await;
    assert_eq!(
        on_topic(&received, "dev/2/cmd").len(),
        0,
        "a device chose where the bridge publishes: {:?}",
        on_topic(&received, "dev/2/cmd")
    );
    let replies = on_topic(&received, "replies/dev/1/req");
    assert_eq!(
        replies.len(),
        2,
        "both replies go to reply.topic: {received:?}"
    );
    // The redirected reply still carries the request's Correlation Data.
    assert_eq!(replies[0].payload["answer"], serde_json::json!({ "n": 1 }));
    assert_eq!(replies[0].correlation.as_deref(), Some(&b"c-1"[..]));
    drop(daemon);
}

#[tokio::test]
async fn an_allowed_response_topic_is_used_and_one_not_allowed_without_reply_topic_is_dead_lettered()
 {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // Response Topics under answers/ only, and no reply.topic to fall back on.
    let rules = r#"
[[rules]]
name = "cmd"
topic = "dev/+/req"
function = "handler"
invocation = "request_response"
[rules.reply]
allow = ["answers/#"]
"#;
    let (mut daemon, device) =
        bridge_and_device(&broker, &lambda.endpoint(), Protocol::V5, rules, "#").await;

    device
        .request("dev/1/req", r#"{"n":1}"#, Some(("answers/1", "c-1")))
        .await;
    device
        .request("dev/1/req", r#"{"n":2}"#, Some(("dev/2/cmd", "c-2")))
        .await;
    device
        .request("dev/1/req", r#"{"n":3}"#, Some(("answers/3", "c-3")))
        .await;
    // Replies go out in order: once the third is here, anything on dev/2/cmd would be too.
    let received = device
        .wait_until("the reply on answers/3", |r| r.topic == "answers/3")
        .await;
    assert_eq!(
        on_topic(&received, "dev/2/cmd").len(),
        0,
        "a device chose where the bridge publishes"
    );
    for (n, topic) in [(1, "answers/1"), (3, "answers/3")] {
        let replies = on_topic(&received, topic);
        assert_eq!(replies.len(), 1, "one reply on {topic}");
        assert_eq!(replies[0].payload["answer"], serde_json::json!({ "n": n }));
        assert_eq!(
            replies[0].correlation.as_deref(),
            Some(format!("c-{n}").as_bytes())
        );
    }
    // The function answered all three; the refusal is counted with the replies dead-lettered.
    assert_eq!(invoked_ids(&lambda).len(), 3);
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("left_in_buffer=0"), "{log}");
    assert!(
        log.contains(
            "reply summary rule=cmd replies_published=2 replies_without_topic=0 replies_dead_lettered=1"
        ),
        "{log}"
    );
    // The refused one is a dead letter naming the topic and the key to change (written before
    // the message left the buffer, which it did: left_in_buffer=0).
    let letters: Vec<serde_json::Value> =
        std::fs::read_to_string(daemon.buffer_dir().join("cmd/dead-letters.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
    assert_eq!(letters.len(), 1, "one dead letter, got {}", letters.len());
    assert_eq!(letters[0]["code"], "ReplyNotAllowed");
    assert_eq!(letters[0]["event"]["messages"][0]["payload"]["n"], 2);
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("\"dev/2/cmd\"") && reason.contains("reply.allow"),
        "{reason}"
    );
}
