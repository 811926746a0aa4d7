//! MQTT 5 end to end against real mosquitto: user properties and content type reach the
//! function's event, and a subscription the broker's ACL denies is logged with its filter and
//! reason code. (Durability over MQTT 5 runs in durability.rs and mqtt_session.rs.)

mod support;

use serde_json::json;
use support::fake_lambda::{FakeLambda, FakeLambdaServer};
use support::{Daemon, Mosquitto, Protocol, config_for};

const RULES: &str = r#"
[[rules]]
name = "t"
topic = "s/#"
function = "f"
[rules.batch]
max_messages = 10
max_wait = "200ms"
"#;

/// Publishes with mosquitto_pub over MQTT 5, with extra `-D` properties.
async fn publish_v5(port: u16, topic: &str, payload: &str, properties: &[&str]) {
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-V", "mqttv5", "-q", "1"])
        .args(["-t", topic, "-m", payload])
        .args(properties)
        .status()
        .await
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub failed");
}

#[tokio::test]
async fn user_properties_and_content_type_reach_the_function_only_when_present() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let daemon = Daemon::start(&config_for(
        Protocol::V5,
        &broker.url(),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;

    publish_v5(
        broker.port,
        "s/1",
        r#"{"c":21.5}"#,
        &[
            "-D",
            "publish",
            "user-property",
            "site",
            "north",
            "-D",
            "publish",
            "user-property",
            "tag",
            "a",
            "-D",
            "publish",
            "user-property",
            "tag",
            "b",
            "-D",
            "publish",
            "content-type",
            "application/json",
        ],
    )
    .await;
    publish_v5(broker.port, "s/2", "plain", &[]).await;
    lambda.fake.wait_for_messages("f", 2).await;

    let messages: Vec<serde_json::Value> = lambda
        .fake
        .invocations()
        .iter()
        .flat_map(|c| c.body["messages"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["payload"], json!({"c": 21.5}));
    assert_eq!(
        messages[0]["properties"],
        json!({
            "user": {"site": "north", "tag": ["a", "b"]},
            "content_type": "application/json"
        })
    );
    assert!(
        messages[1].get("properties").is_none(),
        "no properties, no key: {}",
        messages[1]
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn properties_survive_a_restart_in_the_disk_buffer() {
    let broker = Mosquitto::start().await;
    // Lambda is down: the message waits in the buffer across a restart.
    let outage = support::Outage::begin();
    let lambda_port = support::free_port();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let mut daemon =
        Daemon::start(&config_for(Protocol::V5, &broker.url(), &endpoint, RULES)).await;
    daemon.wait_for_log("subscribed").await;
    publish_v5(
        broker.port,
        "s/kept",
        "1",
        &["-D", "publish", "user-property", "k", "v"],
    )
    .await;
    daemon.wait_buffered(1).await;
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0), "{log}");

    let daemon = daemon.restart().await;
    let lambda = FakeLambdaServer::start_on(lambda_port, FakeLambda::back_after(&outage)).await;
    lambda.fake.wait_for_messages("f", 1).await;
    let event = &lambda.fake.invocations()[0].body;
    assert_eq!(
        event["messages"][0]["properties"],
        json!({"user": {"k": "v"}})
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn properties_are_kept_in_dead_letters() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda.fake.missing("f");
    let daemon = Daemon::start(&config_for(
        Protocol::V5,
        &broker.url(),
        &lambda.endpoint(),
        RULES,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    publish_v5(
        broker.port,
        "s/dead",
        "1",
        &["-D", "publish", "content-type", "text/plain"],
    )
    .await;
    daemon.wait_for_log("moved to the dead-letter store").await;
    let dead = std::fs::read_to_string(daemon.buffer_dir().join("t/dead-letters.jsonl"))
        .expect("dead letters written");
    let letter: serde_json::Value =
        serde_json::from_str(dead.lines().next().expect("a letter")).expect("json line");
    assert_eq!(
        letter["event"]["messages"][0]["properties"],
        json!({"content_type": "text/plain"})
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

/// mosquitto's dynamic-security plugin, which (unlike `acl_file`, whose ACLs only filter
/// delivery and never refuse a SUBSCRIBE) answers a denied subscription with a failure code.
fn dynsec_plugin() -> &'static str {
    const CANDIDATES: [&str; 3] = [
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
    ];
    CANDIDATES
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mosquitto_dynamic_security.so (installed with the mosquitto package)")
}

async fn denied_subscription_is_logged(protocol: Protocol, reason: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dynsec = dir.path().join("dynsec.json");
    // Anonymous clients may subscribe to allowed/# and nothing else.
    let acl = json!({
        "defaultACLAccess": {
            "publishClientSend": true, "publishClientReceive": true,
            "subscribe": false, "unsubscribe": true
        },
        "clients": [],
        "groups": [{"groupname": "anon", "roles": [{"rolename": "reader"}], "clients": []}],
        "roles": [{"rolename": "reader", "acls": [
            {"acltype": "subscribePattern", "topic": "allowed/#", "priority": 0, "allow": true}
        ]}],
        "anonymousGroup": "anon"
    });
    std::fs::write(&dynsec, acl.to_string()).expect("write dynsec.json");
    let broker = Mosquitto::start_with(&format!(
        "plugin {}\nplugin_opt_config_file {}",
        dynsec_plugin(),
        dynsec.display()
    ))
    .await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "ok"
topic = "allowed/#"
function = "f"

[[rules]]
name = "nope"
topic = "denied/#"
function = "f"
"#;
    let daemon = Daemon::start(&config_for(
        protocol,
        &broker.url(),
        &lambda.endpoint(),
        rules,
    ))
    .await;
    daemon
        .wait_for_log("the broker refused the subscription")
        .await;
    daemon.wait_for_log("subscribed").await;
    let log = daemon.log_text();
    let refused = log
        .lines()
        .find(|l| l.contains("the broker refused the subscription"))
        .expect("refusal line");
    assert!(refused.contains("rule=nope"), "{refused}");
    assert!(refused.contains("filter=denied/#"), "{refused}");
    assert!(refused.contains(reason), "{refused}");
    assert!(
        log.lines()
            .any(|l| l.contains("subscribed") && l.contains("rule=ok")),
        "{log}"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn over_mqtt5_a_subscription_denied_by_acl_names_the_filter_and_the_reason_code() {
    denied_subscription_is_logged(Protocol::V5, "not authorized (0x87)").await;
}

#[tokio::test]
async fn over_mqtt311_a_subscription_denied_by_acl_names_the_filter() {
    denied_subscription_is_logged(Protocol::V311, "failure (0x80)").await;
}

#[tokio::test]
async fn over_mqtt5_a_refused_connection_is_logged_with_its_reason_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let passwords = dir.path().join("passwd");
    std::fs::write(&passwords, "").expect("write password file");
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}",
        passwords.display()
    ))
    .await;
    let lambda = FakeLambdaServer::start().await;
    let text = config_for(Protocol::V5, &broker.url(), &lambda.endpoint(), RULES).replacen(
        "[mqtt]\n",
        "[mqtt]\nusername = \"bridge\"\npassword = \"wrong\"\n",
        1,
    );
    let daemon = Daemon::start(&text).await;
    daemon
        .wait_for_log("the broker refused the connection")
        .await;
    let log = daemon.log_text();
    assert!(
        log.contains("(0x86)") || log.contains("(0x87)"),
        "a reason code: {log}"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn idle_over_mqtt5_takes_about_the_memory_of_mqtt311() {
    // rumqttc's MQTT 5 client sizes its outgoing table by the in-flight limit, 65,535 unless
    // set: about 13 MiB more at idle.
    const MARGIN_KIB: u64 = 4 * 1024;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let mut peaks = Vec::new();
    for protocol in [Protocol::V311, Protocol::V5] {
        let daemon = Daemon::start(&config_for(
            protocol,
            &broker.url(),
            &lambda.endpoint(),
            RULES,
        ))
        .await;
        daemon.wait_for_log("subscribed").await;
        peaks.push(daemon.peak_rss_kib().expect("VmHWM"));
        let (code, log) = daemon.terminate().await;
        assert_eq!(code, Some(0), "{log}");
    }
    assert!(
        peaks[1] <= peaks[0] + MARGIN_KIB,
        "MQTT 3.1.1 peak {} KiB, MQTT 5 peak {} KiB",
        peaks[0],
        peaks[1]
    );
}
