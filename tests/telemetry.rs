//! `[telemetry]` against real mosquitto and the fake Invoke API: the retained JSON snapshot a
//! subscriber gets holds what was received and delivered, a rule on the telemetry topic
//! forwards it to Lambda, and `check` shows the section or refuses a bad one naming the key.

mod support;

use std::process::Stdio;

use serde_json::Value;
use support::fake_lambda::FakeLambdaServer;
use support::{Daemon, Mosquitto, PATIENCE, Publisher, config};
use tokio::io::{AsyncBufReadExt, BufReader};

const TOPIC: &str = "gateways/gw-01/bridge/health";

/// `[telemetry]` on [`TOPIC`] every second.
fn with_telemetry(config: String) -> String {
    format!("{config}\n[telemetry]\ntopic = \"{TOPIC}\"\ninterval = \"1s\"\n")
}

/// One message of `mosquitto_sub -F '%r %p'`: its retain flag and its JSON payload.
fn parse(line: &str) -> (bool, Value) {
    let (retained, payload) = line.split_once(' ').expect("'%r %p'");
    let json = serde_json::from_str(payload).unwrap_or_else(|e| panic!("{e}: {payload}"));
    (retained == "1", json)
}

/// Subscribes to [`TOPIC`] with mosquitto_sub and reads snapshots until `done` holds over one;
/// returns it, with its retain flag.
async fn snapshot_until(port: u16, what: &str, done: impl Fn(&Value) -> bool) -> (bool, Value) {
    let mut child = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", TOPIC, "-F", "%r %p"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut last = None;
    let found = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let (retained, json) = parse(&line);
            if done(&json) {
                return Some((retained, json));
            }
            last = Some(json);
        }
        None
    })
    .await;
    match found {
        Ok(Some(found)) => found,
        _ => panic!("no snapshot with {what}; the last one: {last:?}"),
    }
}

#[tokio::test]
async fn a_subscriber_gets_the_retained_snapshot_of_what_was_delivered() {
    const N: u64 = 6;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = "[[rules]]\nname = \"temperature\"\ntopic = \"sensors/#\"\nfunction = \"f\"\n\n\
                 [buffer]\nmax_size = \"1MiB\"\n";
    let daemon = Daemon::start(&with_telemetry(config(
        &broker.url(),
        &lambda.endpoint(),
        rules,
    )))
    .await;
    daemon.wait_for_log("subscribed").await;
    daemon.wait_for_log("publishing telemetry").await;

    let publisher = Publisher::connect(broker.port).await;
    for i in 0..N {
        publisher.publish(&format!("sensors/{i}"), 1, "21.5").await;
    }
    publisher.wait_acked(N as usize).await;
    lambda.fake.wait_for_messages("f", N as usize).await;

    let delivered_all = |json: &Value| {
        json["rules"]["temperature"]["delivered"] == N
            && json["rules"]["temperature"]["buffer"]["messages"] == 0
    };
    // A new subscriber: the broker hands it the retained snapshot first.
    let (retained, json) = snapshot_until(broker.port, "6 delivered", delivered_all).await;
    let rule = &json["rules"]["temperature"];
    assert_eq!(rule["received"], N, "{json}");
    assert_eq!(rule["dead_letters"], 0, "{json}");
    assert_eq!(rule["invocations"]["ok"].as_u64(), Some(N), "{json}");
    assert_eq!(rule["dropped"]["throttled"], 0, "{json}");
    assert_eq!(rule["buffer"]["max_bytes"], 1024 * 1024, "{json}");
    assert_eq!(rule["stalled"], false, "{json}");
    assert_eq!(json["mqtt"]["connected"], true, "{json}");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"), "{json}");
    let process = &json["process"];
    assert!(
        process["resident_memory_bytes"].as_u64() > Some(1 << 20),
        "{json}"
    );
    assert!(process["open_fds"].as_u64() > Some(0), "{json}");
    assert!(process["uptime_seconds"].as_u64() < Some(600), "{json}");
    let start = process["start_time_seconds"].as_u64().expect("start time");
    assert!(json["time"].as_u64() >= Some(start), "{json}");
    if !retained {
        // It arrived live, published while this subscriber was there; the next subscriber
        // must get it (or a newer one) retained.
        let (retained, json) = snapshot_until(broker.port, "6 delivered", delivered_all).await;
        assert!(
            retained,
            "a fresh subscriber got it live, not retained: {json}"
        );
    }

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("cannot publish telemetry"), "{log}");
}

#[tokio::test]
async fn a_rule_on_the_telemetry_topic_forwards_the_snapshots_to_lambda() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = format!(
        "[[rules]]\nname = \"temperature\"\ntopic = \"sensors/#\"\nfunction = \"f\"\n\n\
         [[rules]]\nname = \"health\"\ntopic = \"{TOPIC}\"\nfunction = \"fleet-health\"\n"
    );
    let daemon = Daemon::start(&with_telemetry(config(
        &broker.url(),
        &lambda.endpoint(),
        &rules,
    )))
    .await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("sensors/1", 1, "21.5").await;
    lambda.fake.wait_for_messages("f", 1).await;

    // Each snapshot is a message of rule `health`; one taken after the delivery says so.
    lambda
        .fake
        .wait_until("a forwarded snapshot counting the delivery", |all| {
            all.iter()
                .filter(|i| i.function == "fleet-health")
                .flat_map(|i| i.body["messages"].as_array().cloned().unwrap_or_default())
                .any(|m| {
                    m["topic"] == TOPIC
                        && m["payload"]["rules"]["temperature"]["delivered"] == 1
                        && m["payload"]["rules"]["health"]["received"].as_u64() >= Some(1)
                })
        })
        .await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn check_shows_telemetry_and_refuses_a_wildcard_topic_or_a_short_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let rules = format!(
        "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n\n[buffer]\ndir = \"{}\"\n",
        dir.path().join("b").display()
    );
    let base = config("mqtt://127.0.0.1:1883", "http://127.0.0.1:9", &rules);
    let check = |telemetry: &str| {
        std::fs::write(&path, format!("{base}\n[telemetry]\n{telemetry}\n")).expect("write");
        let mut cmd = std::process::Command::new(support::binary());
        cmd.args(["check", "--config"]).arg(&path);
        cmd.env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        let out = cmd.output().expect("run check");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };

    let (code, stdout, stderr) = check("topic = \"gw/health\"");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(
            "telemetry: a JSON snapshot of the metrics every 1m to gw/health (QoS 1, retained)"
        ),
        "{stdout}"
    );

    let (code, _, stderr) = check("topic = \"gw/#\"\ninterval = \"100ms\"");
    assert_eq!(code, Some(78), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("telemetry.topic") && lines[0].contains("'+' or '#'"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("telemetry.interval") && lines[1].contains("at least 1s, got 100ms"),
        "{stderr}"
    );

    let (code, _, stderr) = check("interval = \"5s\"");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("telemetry") && stderr.contains("topic"),
        "{stderr}"
    );
}
