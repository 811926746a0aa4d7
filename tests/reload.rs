//! Live reload: the real binary, real mosquitto and the fake Invoke API; the configuration file
//! is edited and SIGHUP sent, as `systemctl reload` does.

mod support;

use serde_json::json;
use support::fake_lambda::{FakeLambda, FakeLambdaServer};
use support::{Daemon, Mosquitto, Publisher, free_port};

/// Logged once per connection the broker accepted: one line means one MQTT session.
const CONNECTED: &str = "connected to the MQTT broker";
/// Logged once per applied reload.
const RELOADED: &str = "configuration reloaded";

fn rule(name: &str, topic: &str, function: &str) -> String {
    format!(
        "\n[[rules]]\nname = \"{name}\"\ntopic = \"{topic}\"\nfunction = \"{function}\"\nmax_concurrency = 1\n"
    )
}

/// The daemon's configuration: the test harness's, with a buffer directory that stays the
/// same across edits.
fn text(broker: &Mosquitto, lambda_endpoint: &str, client_id: &str, rules: &str) -> String {
    format!(
        r#"shutdown_timeout = "5s"

[mqtt]
url = "{url}"
client_id = "{client_id}"

[aws]
region = "us-east-1"
endpoint_url = "{lambda_endpoint}"
{rules}"#,
        url = broker.url()
    )
}

/// Rewrites the daemon's configuration file, keeping the buffer where `Daemon::start` put it.
fn rewrite_config(daemon: &Daemon, config: &str) {
    let buffer = format!("\n[buffer]\ndir = \"{}\"\n", daemon.buffer_dir().display());
    std::fs::write(&daemon.config_path, format!("{config}{buffer}")).expect("write config");
}

/// Rewrites the daemon's configuration file and sends SIGHUP.
fn edit_and_reload(daemon: &Daemon, config: &str) {
    rewrite_config(daemon, config);
    daemon.signal("HUP");
}

fn payloads(lambda: &FakeLambda, function: &str) -> Vec<serde_json::Value> {
    lambda
        .accepted_for(function)
        .iter()
        .flat_map(|i| i.body["messages"].as_array().cloned().unwrap_or_default())
        .map(|m| m["payload"].clone())
        .collect()
}

async fn started(config: &str, rules: usize) -> Daemon {
    let daemon = Daemon::start(config).await;
    daemon.wait_for_log_count("subscribed", rules).await;
    daemon
}

#[tokio::test]
async fn a_rule_added_to_the_file_takes_messages_after_sighup_on_the_same_session() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let id = format!("reload-{}", free_port());
    let one = rule("a", "a/#", "fa");
    let daemon = started(&text(&broker, &lambda.endpoint(), &id, &one), 1).await;

    // Also a start-time setting changed: reported, and the value in force stays.
    let two = format!("{one}{}", rule("b", "b/#", "fb"));
    let edited = text(&broker, &lambda.endpoint(), &id, &two).replace("\"5s\"", "\"7s\"");
    edit_and_reload(&daemon, &edited);
    daemon.wait_for_log(RELOADED).await;
    daemon.wait_for_log("rule=b filter=b/# granted").await;

    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("b/1", 1, "10").await;
    publisher.publish("a/1", 1, "11").await;
    lambda.fake.wait_for_messages("fb", 1).await;
    lambda.fake.wait_for_messages("fa", 1).await;
    assert_eq!(payloads(&lambda.fake, "fb"), vec![json!(10)]);
    assert_eq!(payloads(&lambda.fake, "fa"), vec![json!(11)]);

    let log = daemon.log_text();
    assert!(
        log.contains("shutdown_timeout changed: needs a restart"),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains(RELOADED)
            && l.contains("added=b")
            && l.contains("1 rule(s) added")),
        "{log}"
    );
    assert_eq!(
        daemon.count_log(CONNECTED),
        1,
        "no new MQTT session:\n{log}"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0));
    assert!(
        log.contains("timeout=5s"),
        "the old shutdown_timeout stays:\n{log}"
    );
}

#[tokio::test]
async fn a_changed_function_gets_the_messages_that_arrive_after_the_reload() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let id = format!("reload-{}", free_port());
    let daemon = started(
        &text(
            &broker,
            &lambda.endpoint(),
            &id,
            &rule("a", "a/#", "old-fn"),
        ),
        1,
    )
    .await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..3 {
        publisher.publish("a/x", 1, format!("{i}")).await;
    }
    lambda.fake.wait_for_messages("old-fn", 3).await;

    edit_and_reload(
        &daemon,
        &text(
            &broker,
            &lambda.endpoint(),
            &id,
            &rule("a", "a/#", "new-fn"),
        ),
    );
    daemon.wait_for_log(RELOADED).await;
    for i in 3..6 {
        publisher.publish("a/x", 1, format!("{i}")).await;
    }
    lambda.fake.wait_for_messages("new-fn", 3).await;
    assert_eq!(
        payloads(&lambda.fake, "old-fn"),
        (0..3).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(
        payloads(&lambda.fake, "new-fn"),
        (3..6).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert!(
        lambda
            .fake
            .accepted_for("new-fn")
            .iter()
            .all(|i| i.body["rule"] == json!("a")),
        "same rule, same queue"
    );
    assert_eq!(daemon.count_log(CONNECTED), 1, "{}", daemon.log_text());
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_removed_rule_delivers_what_it_buffered_while_lambda_was_down_and_takes_nothing_new() {
    let broker = Mosquitto::start().await;
    // Lambda is down: nothing listens on its port yet.
    let outage = support::Outage::begin();
    let lambda_port = free_port();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let id = format!("reload-{}", free_port());
    let both = format!("{}{}", rule("a", "a/#", "fa"), rule("b", "b/#", "fb"));
    let daemon = started(&text(&broker, &endpoint, &id, &both), 2).await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..5 {
        publisher.publish("b/x", 1, format!("{i}")).await;
    }
    publisher.wait_acked(5).await;
    daemon.wait_buffered(5).await;

    edit_and_reload(
        &daemon,
        &text(&broker, &endpoint, &id, &rule("a", "a/#", "fa")),
    );
    daemon.wait_for_log(RELOADED).await;
    daemon.wait_for_log("unsubscribed").await;
    // Published after the rule was removed: not taken by it.
    for i in 5..8 {
        publisher.publish("b/x", 1, format!("{i}")).await;
    }
    publisher.publish("a/x", 1, "100").await;
    publisher.wait_acked(9).await;

    // Lambda comes back: the removed rule's buffer is delivered, then it stops.
    let lambda = FakeLambdaServer::start_on(lambda_port, FakeLambda::back_after(&outage)).await;
    lambda.fake.wait_for_messages("fb", 5).await;
    lambda.fake.wait_for_messages("fa", 1).await;
    daemon.wait_for_log("removed rule's buffer delivered").await;
    assert_eq!(
        payloads(&lambda.fake, "fb"),
        (0..5).map(|i| json!(i)).collect::<Vec<_>>()
    );
    assert_eq!(payloads(&lambda.fake, "fa"), vec![json!(100)]);
    assert!(
        daemon.buffer_dir().join("b").is_dir(),
        "the removed rule's directory stays"
    );
    assert_eq!(daemon.count_log(CONNECTED), 1, "{}", daemon.log_text());
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0));
    assert_eq!(
        payloads(&lambda.fake, "fb").len(),
        5,
        "nothing new for b:\n{log}"
    );
}

#[tokio::test]
async fn an_invalid_file_is_reported_key_by_key_and_the_old_rules_keep_delivering() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let id = format!("reload-{}", free_port());
    let good = text(&broker, &lambda.endpoint(), &id, &rule("a", "a/#", "fa"));
    let daemon = started(&good, 1).await;

    let bad = text(
        &broker,
        &lambda.endpoint(),
        &id,
        &format!(
            "{}{}",
            rule("a", "a/#/x", "fa"),
            rule("b", "b/#", "fb").replace("max_concurrency = 1", "qos = 3")
        ),
    );
    edit_and_reload(&daemon, &bad);
    daemon.wait_for_log("configuration not reloaded").await;

    // The same lines `check` prints for this file, each on a log line of its own.
    let check = std::process::Command::new(support::binary())
        .args(["check", "--config"])
        .arg(&daemon.config_path)
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(78));
    let problems: Vec<String> = String::from_utf8_lossy(&check.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!problems.is_empty());
    let log = daemon.log_text();
    for problem in &problems {
        assert!(
            log.lines().any(|l| l.contains(problem.as_str())),
            "{problem:?} not logged:\n{log}"
        );
    }
    assert!(
        problems.iter().any(|p| p.contains("rules[1]")),
        "{problems:?}"
    );

    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("a/1", 1, "1").await;
    lambda.fake.wait_for_messages("fa", 1).await;
    assert_eq!(payloads(&lambda.fake, "fa"), vec![json!(1)]);
    assert!(!log.contains(RELOADED), "{log}");
    assert_eq!(daemon.count_log(CONNECTED), 1, "{log}");
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_removed_rule_stopped_before_its_drain_is_delivered_once_added_back() {
    let broker = Mosquitto::start().await;
    let outage = support::Outage::begin();
    let lambda_port = free_port();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let id = format!("reload-{}", free_port());
    let both = format!("{}{}", rule("a", "a/#", "fa"), rule("b", "b/#", "fb"));
    let quick = |t: String| t.replace("\"5s\"", "\"1s\"");
    let mut daemon = started(&quick(text(&broker, &endpoint, &id, &both)), 2).await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..3 {
        publisher.publish("b/x", 1, format!("{i}")).await;
    }
    daemon.wait_buffered(3).await;
    let only_a = quick(text(&broker, &endpoint, &id, &rule("a", "a/#", "fa")));
    edit_and_reload(&daemon, &only_a);
    daemon.wait_for_log(RELOADED).await;

    // Lambda stays down: the drain cannot end before the stop.
    let (code, log) = daemon.stop().await;
    assert_eq!(code, Some(0));
    assert!(
        log.lines().any(
            |l| l.contains("a removed rule stopped before its buffer was delivered")
                && l.contains("rule=b")
                && l.contains("left_in_buffer=3")
        ),
        "{log}"
    );

    // What the README says to do: add the rule back (same name).
    let lambda = FakeLambdaServer::start_on(lambda_port, FakeLambda::back_after(&outage)).await;
    rewrite_config(&daemon, &quick(text(&broker, &endpoint, &id, &both)));
    let daemon = daemon.restart().await;
    lambda.fake.wait_for_messages("fb", 3).await;
    assert_eq!(
        payloads(&lambda.fake, "fb"),
        (0..3).map(|i| json!(i)).collect::<Vec<_>>()
    );
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_rule_added_back_while_draining_keeps_its_queue_and_takes_messages_again() {
    let broker = Mosquitto::start().await;
    let outage = support::Outage::begin();
    let lambda_port = free_port();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let id = format!("reload-{}", free_port());
    let both = format!("{}{}", rule("a", "a/#", "fa"), rule("b", "b/#", "fb"));
    let daemon = started(&text(&broker, &endpoint, &id, &both), 2).await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..3 {
        publisher.publish("b/x", 1, format!("{i}")).await;
    }
    daemon.wait_buffered(3).await;
    edit_and_reload(
        &daemon,
        &text(&broker, &endpoint, &id, &rule("a", "a/#", "fa")),
    );
    daemon.wait_for_log_count(RELOADED, 1).await;
    daemon.wait_for_log("unsubscribed").await;
    edit_and_reload(&daemon, &text(&broker, &endpoint, &id, &both));
    daemon.wait_for_log_count(RELOADED, 2).await;
    daemon
        .wait_for_log("rule added back while its buffer was draining")
        .await;
    daemon
        .wait_for_log_count("rule=b filter=b/# granted", 2)
        .await;
    for i in 3..6 {
        publisher.publish("b/x", 1, format!("{i}")).await;
    }
    daemon.wait_buffered(6).await;

    let lambda = FakeLambdaServer::start_on(lambda_port, FakeLambda::back_after(&outage)).await;
    lambda.fake.wait_for_messages("fb", 6).await;
    assert_eq!(
        payloads(&lambda.fake, "fb"),
        (0..6).map(|i| json!(i)).collect::<Vec<_>>()
    );
    let log = daemon.log_text();
    assert!(!log.contains("removed rule's buffer delivered"), "{log}");
    assert_eq!(daemon.count_log(CONNECTED), 1, "{log}");
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}
