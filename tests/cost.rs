//! `mqtt-lambda-bridge cost`: the table and `--json` for given rates, the flags it refuses, and
//! `--from` against a running bridge (real mosquitto, the fake Invoke API).

mod support;

use std::path::Path;
use std::process::{Command, Output};

use mqtt_lambda_bridge::cli::cost::now_seconds;
use mqtt_lambda_bridge::cli::cost::scrape::{Observed, fetch};
use serde_json::Value;
use support::fake_lambda::FakeLambdaServer;
use support::{Daemon, Mosquitto, PATIENCE, Publisher, config, free_port, wait_for_port};

/// A config with one rule `r` on `t/#` (plus `rule_extra`) and `aws` keys `aws_extra`.
fn write_config(dir: &Path, aws_extra: &str, rule_extra: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[aws]\n{aws_extra}\n\
         [[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n{rule_extra}\n"
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// `cost --config PATH ARGS…` with no AWS settings from this environment.
fn cost(config: &Path, args: &[&str]) -> Output {
    Command::new(support::binary())
        .env_clear()
        .arg("cost")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run cost")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `cost … --json`, exit 0, parsed.
fn cost_json(config: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cost(config, &all);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn the_table_shows_each_rule_priced_at_its_regions_price_and_the_total() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "region = \"eu-west-1\"", "");
    let out = cost(&path, &["--rate", "t/a=10/s"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("prices: $0.2 per million requests, $0.0000166667 per GB-second (x86, on demand, USD; Lambda's eu-west-1 price)\n"), "{text}");
    assert!(
        text.contains("each invocation: 128 MB for 100ms; messages of 100 bytes"),
        "{text}"
    );
    // 10/s, one message per invocation: 25,920,000 a month, $5.18 of requests and 324,000
    // GB-seconds ($5.40) of compute.
    let row = text
        .lines()
        .find(|l| l.starts_with("r "))
        .expect("row of r");
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "r",
            "10.0",
            "100%",
            "10.0",
            "25,920,000",
            "$5.18",
            "$5.40",
            "$10.58",
            "one",
            "message",
            "per",
            "invocation"
        ],
        "{text}"
    );
    let total = text
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .expect("total");
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        ["TOTAL", "25,920,000", "$5.18", "$5.40", "$10.58"]
    );
}

#[test]
fn json_carries_every_figure_and_flags_override_the_prices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "",
        "[rules.batch]\nmax_messages = 100\n[rules.rate_limit]\ninvocations_per_second = 5.0\n",
    );
    let json = cost_json(
        &path,
        &[
            "--rate",
            "t/+=60000/min",
            "--memory-mb",
            "256",
            "--duration",
            "1s",
            "--price-per-million",
            "1",
            "--keep",
            "r=0.5",
        ],
    );
    assert_eq!(json["region"], Value::Null);
    assert_eq!(
        json["prices_from"],
        "--price-per-million; GB-seconds at Lambda's us-east-1 price (no aws.region or AWS_REGION set)"
    );
    let rule = &json["rules"][0];
    // 1,000/s, half kept: 500/s in batches of 100 is 5/s, just what the rate limit allows.
    assert_eq!(rule["messages_per_second"], 1000.0);
    assert_eq!(rule["kept_per_second"], 500.0);
    assert_eq!(rule["messages_per_invocation"], 100.0);
    assert_eq!(rule["decided_by"], "max_messages");
    assert_eq!(rule["invocations_per_month"], 12_960_000.0);
    assert_eq!(rule["request_cost"], 12.96);
    assert_eq!(rule["gb_seconds"], 0.25 * 12_960_000.0);
    assert_eq!(json["total"]["invocations_per_month"], 12_960_000.0);
    let cost = json["total"]["cost"].as_f64().expect("cost");
    assert!((cost - (12.96 + 3_240_000.0 * 0.000_016_666_7)).abs() < 1e-6);
}

#[test]
fn a_throttle_follows_the_topics_and_changes_flags_and_says_what_it_assumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        "region = \"us-east-1\"",
        "[rules.throttle]\nmin_interval = \"10s\"\nonly_changes = true\n",
    );
    // 50 topics at 0.2/s each: one per 10 s each is 5/s in total.
    let json = cost_json(&path, &["--rate", "t/+=10/s", "--topics", "r=50"]);
    let passed = json["rules"][0]["passed_per_second"]
        .as_f64()
        .expect("passed");
    assert!((passed - 5.0).abs() < 1e-9, "{passed}");
    let notes = json["rules"][0]["notes"].to_string();
    assert!(
        notes.contains("only_changes/deadband counted as dropping nothing"),
        "{notes}"
    );
    // Without --topics the filter is one topic: one message per 10 s.
    let json = cost_json(&path, &["--rate", "t/+=10/s", "--changes", "r=0.5"]);
    assert_eq!(json["rules"][0]["passed_per_second"], 0.1);
    let notes = json["rules"][0]["notes"].to_string();
    assert!(notes.contains("t/+ counted as one topic"), "{notes}");
}

#[test]
fn flags_it_cannot_use_exit_64_naming_the_flag_and_a_bad_config_78() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "", "");
    for (args, expected) in [
        (vec!["--rate", "t/a=10"], "--rate \"t/a=10\": no unit"),
        (vec!["--rate", "t/#/x=1/s"], "--rate \"t/#/x=1/s\""),
        (vec!["--rate", "t/a=-1/s"], "a rate is 0 or more"),
        (
            vec!["--rate", "t/a=1/s", "--keep", "nope=0.1"],
            "--keep \"nope=0.1\": no rule named \"nope\" in the configuration (rules: r)",
        ),
        (
            vec!["--rate", "t/a=1/s", "--keep", "r=2"],
            "a fraction from 0 to 1",
        ),
        (vec!["--rate", "t/a=1/s", "--topics", "r=0"], "at least 1"),
        (
            vec!["--rate", "t/a=1/s", "--memory-mb", "64"],
            "128 to 10240 MB",
        ),
        (
            vec!["--rate", "t/a=1/s", "--duration", "soon"],
            "--duration \"soon\"",
        ),
        (vec![], "no rates: give --rate"),
        (
            vec!["--rate", "t/a=1/s", "--from", "http://127.0.0.1:1/metrics"],
            "give --rate or --from, not both",
        ),
        (
            vec!["--from", "https://x/metrics"],
            "--from https://x/metrics",
        ),
    ] {
        let out = cost(&path, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
    std::fs::write(&path, "[mqtt]\nurl = 3\n").expect("write");
    let out = cost(&path, &["--rate", "t/a=1/s"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    // Nothing listening at --from: 69, as for anything unavailable.
    let path = write_config(dir.path(), "", "");
    let port = free_port();
    let out = cost(
        &path,
        &["--from", &format!("http://127.0.0.1:{port}/metrics")],
    );
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read the metrics"),
        "{}",
        stderr(&out)
    );
}

const TWO_RULES: &str = r#"
[[rules]]
name = "counted"
topic = "c/#"
function = "fc"

[[rules]]
name = "quiet"
topic = "q/#"
function = "fq"
"#;

#[tokio::test]
async fn from_takes_each_rules_average_rate_since_it_began_from_a_running_bridge() {
    const MESSAGES: usize = 40;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let port = free_port();
    let before = now_seconds();
    let text = config(&broker.url(), &lambda.endpoint(), TWO_RULES);
    let daemon = Daemon::start(&format!(
        "{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let subscribed = now_seconds();
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..MESSAGES {
        publisher
            .publish(&format!("c/{}", i % 4), 1, format!("{i}"))
            .await;
    }
    publisher.wait_acked(MESSAGES).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let observed = loop {
        let observed = Observed::parse(&fetch(&url).expect("scrape"));
        if observed.rules.get("counted").map(|c| c.received) == Some(MESSAGES as f64) {
            break observed;
        }
        assert!(tokio::time::Instant::now() < deadline, "{observed:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let since = observed.rules["counted"]
        .since
        .expect("mlb_rule_start_time_seconds");
    assert!(
        (before..=subscribed).contains(&since),
        "{before} {since} {subscribed}"
    );

    let asked = now_seconds();
    let config_path = daemon.config_path.clone();
    let args = ["--from", url.as_str(), "--duration", "200ms"].map(str::to_owned);
    let json = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cost_json(&config_path, &args)
    })
    .await
    .expect("cost");
    let answered = now_seconds();
    assert_eq!(json["from"], url.as_str());
    let counted = &json["rules"][0];
    assert_eq!(counted["rule"], "counted");
    // MESSAGES since the rule began: over at least asked − subscribed, at most answered − before.
    let rate = counted["messages_per_second"].as_f64().expect("rate");
    let (low, high) = (
        MESSAGES as f64 / (answered - before),
        MESSAGES as f64 / (asked - subscribed),
    );
    assert!((low..=high).contains(&rate), "{low} <= {rate} <= {high}");
    assert_eq!(
        counted["kept_per_second"], rate,
        "nothing filtered: all kept"
    );
    let month = counted["invocations_per_month"].as_f64().expect("month");
    assert_eq!(month, (rate * 2_592_000.0).round());
    assert_eq!(json["rules"][1]["rule"], "quiet");
    assert_eq!(json["rules"][1]["messages_per_second"], 0.0);
    assert_eq!(json["rules"][1]["decided_by"], "no_messages");
}
