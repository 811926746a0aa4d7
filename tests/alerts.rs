//! `packaging/prometheus/alerts.yml` and `packaging/grafana/mqtt-lambda-bridge.json` against
//! the running bridge: a real Prometheus server scrapes it and evaluates the alerts, which fire
//! as the bridge's situation changes (Lambda unreachable: the buffer grows and fills;
//! the broker killed; the bridge restarted); and every metric name the alerts and the
//! dashboard use is one the bridge serves.
//!
//! The alerts' `for:` durations (5 and 10 minutes) are shortened to one second in the copy the
//! test's Prometheus loads; the expressions are the file's own.

mod support;

use std::path::Path;

use support::scrape::{Prometheus, get, with_metrics};
use support::{Daemon, Mosquitto, Publisher, config, free_port, wait_for_port};

/// The file under the repository's root.
fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `alerts.yml` with every `for:` duration shortened to one second.
fn alerts_for_a_test() -> String {
    let text = read("packaging/prometheus/alerts.yml");
    let shortened: Vec<String> = text
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_owned(),
        })
        .collect();
    assert!(
        shortened.iter().filter(|l| l.ends_with("for: 1s")).count() >= 4,
        "the alerts have for: durations to shorten"
    );
    shortened.join("\n")
}

/// The names in `text` that look like the bridge's metrics (`mlb_…`, `process_…`).
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("mlb_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Every PromQL text of the dashboard: its panels' queries and its variables' queries.
fn dashboard_queries(json: &serde_json::Value, out: &mut Vec<String>) {
    match json {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => dashboard_queries(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_use_is_served() {
    let broker = Mosquitto::start().await;
    let port = free_port();
    let rules = "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n";
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), "http://127.0.0.1:9", rules),
        port,
    ))
    .await;
    wait_for_port(port).await;
    let exposition = get(port, "/metrics").await.body;
    let served: Vec<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("packaging/grafana/mqtt-lambda-bridge.json"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 15, "{queries:?}");
    let used = metric_names(&(queries.join("\n") + &read("packaging/prometheus/alerts.yml")));
    for wanted in [
        "mlb_buffer_max_bytes",
        "mlb_invocation_duration_seconds_bucket",
    ] {
        assert!(
            used.iter().any(|u| u == wanted),
            "{wanted} unused: {used:?}"
        );
    }
    let unknown: Vec<&String> = used.iter().filter(|u| !served.contains(u)).collect();
    assert!(
        unknown.is_empty(),
        "not served by the bridge: {unknown:?}\n{exposition}"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn the_alerts_fire_as_lambda_the_broker_and_the_bridge_go_away() {
    let mut broker = Mosquitto::start().await;
    let port = free_port();
    let buffer = tempfile::tempdir().expect("tempdir");
    // Lambda unreachable from the start; a 64 KiB share.
    let rules = format!(
        "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n\n\
         [buffer]\ndir = \"{}\"\nmax_size = \"64KiB\"\n",
        buffer.path().display()
    );
    let lambda_down = format!("http://127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda_down, &rules),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let prometheus = Prometheus::start_with_rules(port, Some(&alerts_for_a_test())).await;
    // A sample from before the buffer grows, for delta() to compare with.
    prometheus.wait_value("mlb_buffer_messages", "0").await;

    // 40 messages of 1.5 KB, one at a time: about 90% of the share, nothing dropped.
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..40 {
        publisher
            .publish(&format!("t/{i}"), 1, "x".repeat(1500))
            .await;
        publisher.wait_acked(i + 1).await;
    }
    let rule = [("rule", "r")];
    let growing = prometheus
        .wait_firing("MqttLambdaBridgeBufferGrowing", &rule)
        .await;
    assert_eq!(growing["labels"]["severity"], "warning", "{growing}");
    assert!(
        growing["annotations"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("rule r delivers nothing while its buffer grows")),
        "{growing}"
    );
    let full = prometheus
        .wait_firing("MqttLambdaBridgeBufferNearlyFull", &rule)
        .await;
    assert!(
        full["value"]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v > 0.8 && v <= 1.0),
        "{full}"
    );
    let alerts = prometheus.alerts().await;
    for quiet in [
        "MqttLambdaBridgeBrokerDown",
        "MqttLambdaBridgeRestarted",
        "MqttLambdaBridgeMessagesDropped",
    ] {
        assert!(
            !alerts.iter().any(|a| a["labels"]["alertname"] == quiet),
            "{quiet} while the broker is up and the bridge never restarted: {alerts:?}"
        );
    }

    broker.kill().await;
    let down = prometheus
        .wait_firing("MqttLambdaBridgeBrokerDown", &[])
        .await;
    assert_eq!(down["labels"]["severity"], "critical", "{down}");

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda_down, &rules),
        port,
    ))
    .await;
    wait_for_port(port).await;
    prometheus
        .wait_firing("MqttLambdaBridgeRestarted", &[])
        .await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}
