//! The MQTT connection: persistent sessions, broker restarts, reconnect with backoff.

mod support;

use serde_json::json;
use support::fake_lambda::FakeLambdaServer;
use support::{Daemon, Mosquitto, Protocol, Publisher, config, config_for};

const RULES: &str = r#"
[[rules]]
name = "t"
topic = "s/+/t"
function = "f"
max_concurrency = 1
"#;

fn payloads(lambda: &FakeLambdaServer) -> Vec<serde_json::Value> {
    lambda
        .fake
        .invocations()
        .iter()
        .map(|c| c.body["messages"][0]["payload"].clone())
        .collect()
}

#[tokio::test]
async fn qos1_messages_published_while_the_daemon_is_stopped_arrive_after_it_starts() {
    published_while_stopped_arrive_after_start(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_the_session_expiry_keeps_messages_published_while_the_daemon_is_stopped() {
    published_while_stopped_arrive_after_start(Protocol::V5).await;
}

async fn published_while_stopped_arrive_after_start(protocol: Protocol) {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // The same text twice: the same client id, so the same broker session.
    let text = config_for(protocol, &broker.url(), &lambda.endpoint(), RULES);
    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));

    // The broker holds the session (clean_start = false) and queues for it.
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..10 {
        publisher.publish("s/a/t", 1, format!("{i}")).await;
    }
    publisher.wait_acked(10).await;
    assert!(lambda.fake.invocations().is_empty());

    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("session_present=true").await;
    lambda.fake.wait_for_messages("f", 10).await;
    assert_eq!(
        payloads(&lambda),
        (0..10).map(|i| json!(i)).collect::<Vec<_>>()
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn after_a_broker_restart_without_its_sessions_the_daemon_reconnects_and_resubscribes() {
    broker_restart_without_sessions(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_after_a_broker_restart_without_its_sessions_the_daemon_resubscribes() {
    broker_restart_without_sessions(Protocol::V5).await;
}

async fn broker_restart_without_sessions(protocol: Protocol) {
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
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
        publisher.publish("s/a/t", 1, "1").await;
        lambda.fake.wait_for_messages("f", 1).await;
    }

    // SIGKILL loses the in-memory session: the broker comes back knowing nothing of us.
    broker.restart().await;
    daemon.wait_for_log_count("session_present=false", 2).await;
    daemon.wait_for_log_count("subscribed", 2).await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("s/b/t", 1, "2").await;
    lambda.fake.wait_for_messages("f", 2).await;
    assert_eq!(payloads(&lambda), vec![json!(1), json!(2)]);
    assert!(
        daemon
            .log_text()
            .contains("cannot connect to the MQTT broker")
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_with_backoff_and_shutdown_still_works() {
    let port = support::free_port();
    let lambda = FakeLambdaServer::start().await;
    let daemon = Daemon::start(&config(
        &format!("mqtt://127.0.0.1:{port}"),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    daemon
        .wait_for_log("cannot connect to the MQTT broker")
        .await;
    // Let it fail a few times: repeats go to debug, each with a growing delay.
    daemon
        .wait_for_log_count("still cannot reach the MQTT broker", 2)
        .await;
    let attempts = daemon.count_log("still cannot reach") + 1;
    assert!(
        attempts < 10,
        "no tight reconnect loop: {attempts} attempts"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_qos2_release_repeated_from_an_earlier_connection_is_answered_and_ingest_goes_on() {
    release_from_an_earlier_connection(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_a_qos2_release_repeated_from_an_earlier_connection_is_answered() {
    release_from_an_earlier_connection(Protocol::V5).await;
}

/// The bridge's session is left with QoS 2 messages acknowledged (PUBREC) and not yet
/// completed, as a bridge killed or disconnected between its PUBRECs and the broker's PUBRELs
/// leaves it. The broker repeats the PUBRELs when the session's client connects; the MQTT
/// client library refused them as unsolicited and dropped the connection every time, so
/// nothing ever arrived again. Now they are answered on the first connection.
async fn release_from_an_earlier_connection(protocol: Protocol) {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = RULES.replace("max_concurrency = 1", "max_concurrency = 1\nqos = 2");
    let text = config_for(protocol, &broker.url(), &lambda.endpoint(), &rules);
    let client_id = text
        .lines()
        .find_map(|l| l.strip_prefix("client_id = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("client_id in the test config")
        .to_owned();
    leave_a_release_pending(broker.port, &client_id, protocol).await;

    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("s/after/t", 2, "2").await;
    // The PUBRECs of messages whose PUBREL was waiting may be lost with the socket (closed with
    // data unread, it resets): the broker then sends those messages again, and they arrive too.
    lambda
        .fake
        .wait_until("the message after the restart", |all| {
            all.iter()
                .any(|c| c.body["messages"][0]["payload"] == json!(2))
        })
        .await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("cannot connect"), "{log}");
    assert_eq!(
        log.matches("connected to the MQTT broker").count(),
        1,
        "one connection; log:\n{log}"
    );
}

/// QoS 2 messages the session is left with, acknowledged and not completed.
const LEFT_PENDING: usize = 5;

/// Under `client_id`'s persistent session: subscribes to `s/+/t` at QoS 2, takes
/// [`LEFT_PENDING`] messages, sends their PUBRECs and goes away without answering the broker's
/// PUBRELs.
async fn leave_a_release_pending(port: u16, client_id: &str, protocol: Protocol) {
    // The bridge's own seam over rumqttc's two versions: one loop serves both.
    use mqtt_lambda_bridge::mqtt::protocol::{Event, Options, connect};
    let options = match protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_clean_session(false).set_manual_acks(true);
            Options::V311(o)
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_clean_start(false)
                .set_session_expiry_interval(Some(3600))
                .set_manual_acks(true);
            Options::V5(o)
        }
    };
    let publisher = Publisher::connect(port).await;
    let (client, mut eventloop) = connect(options, 10);
    client
        .subscribe_many(vec![("s/+/t".to_owned(), 2)])
        .await
        .expect("subscribe");
    let mut recs = 0;
    let step = async {
        loop {
            match eventloop.poll().await.expect("poll") {
                Event::SubAck { .. } => {
                    for _ in 0..LEFT_PENDING {
                        publisher.publish("s/before/t", 2, "1").await;
                    }
                }
                Event::Publish(p) => assert!(client.try_ack(p.ack), "ack"),
                // A PUBREC went out (only QoS 2 messages come on this subscription).
                Event::AckSent(_) => {
                    recs += 1;
                    if recs == LEFT_PENDING {
                        return;
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), step)
        .await
        .expect("PUBRECs sent");
    // The event loop is dropped here with the socket: the broker's PUBREL goes unanswered.
}

#[tokio::test]
async fn a_subscribe_lost_with_its_connection_is_sent_again_on_the_resumed_session() {
    subscribe_lost_with_its_connection(Protocol::V311).await;
}

#[tokio::test]
async fn over_mqtt5_a_subscribe_lost_with_its_connection_is_sent_again() {
    subscribe_lost_with_its_connection(Protocol::V5).await;
}

/// The first SUBSCRIBE goes out and the connection dies before its SUBACK (a Wi-Fi blip right
/// after connecting): the broker never saw it, and the session it resumes has no subscription.
/// The client library does not send a request again that it wrote once, so the bridge must.
async fn subscribe_lost_with_its_connection(protocol: Protocol) {
    let broker = Mosquitto::start().await;
    let relay = support::relay::Relay::start(broker.port).await;
    relay.lose_subscribes(1);
    let lambda = FakeLambdaServer::start().await;
    let daemon = Daemon::start(&config_for(
        protocol,
        &relay.url(),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    relay.wait_cuts(1).await;
    daemon.wait_for_log("session_present=true").await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("s/a/t", 1, "1").await;
    lambda.fake.wait_for_messages("f", 1).await;
    assert_eq!(payloads(&lambda), vec![json!(1)]);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}
