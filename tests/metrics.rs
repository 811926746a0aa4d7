//! `[metrics]`: `/metrics`, `/healthz` and `/readyz` of the running daemon, against real
//! mosquitto and the fake Invoke API; the exposition is checked by Prometheus's own parser
//! (`promtool check metrics`) and scraped by a real Prometheus server.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::fake_lambda::{FakeLambdaServer, Reply};
use support::scrape::{Prometheus, get, request, sample, scrape_until, wait_status, with_metrics};
use support::{Daemon, Mosquitto, PATIENCE, Publisher, config, free_port, wait_for_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `promtool check metrics` on `text`: Prometheus's own parser and linter.
async fn promtool_check(text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/install-deps.sh installs it)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(text.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool rejects the exposition:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const TWO_RULES: &str = r#"
[[rules]]
name = "alpha"
topic = "a/#"
function = "fa"

[[rules]]
name = "beta"
topic = "b/#"
function = "fb"

[rules.throttle]
min_interval = "1h"
keep = "first"
"#;

#[tokio::test]
async fn counters_follow_what_was_delivered_dropped_and_dead_lettered_per_rule() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // alpha: one throttled attempt, then accepted. beta: the function does not exist, so its
    // one kept message is dead-lettered.
    lambda.fake.script("fa", [Reply::throttle(None)]);
    lambda.fake.missing("fb");
    let port = free_port();
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), TWO_RULES),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;

    let publisher = Publisher::connect(broker.port).await;
    for i in 0..5 {
        publisher
            .publish(&format!("a/{i}"), 1, format!("{i}"))
            .await;
    }
    // Too large for one Event invocation: set aside, counted as dropped and dead-lettered.
    publisher
        .publish("a/big", 1, vec![b'x'; 1024 * 1024 + 10])
        .await;
    // One topic three times inside beta's min_interval: the first is kept, two are dropped.
    for i in 0..3 {
        publisher.publish("b/1", 1, format!("{i}")).await;
    }
    publisher.wait_acked(9).await;

    let alpha = |name: &str| format!("{name}{{rule=\"alpha\"}}");
    let beta = |name: &str| format!("{name}{{rule=\"beta\"}}");
    let text = scrape_until(port, "alpha delivered 5, beta dead-lettered 1", |t| {
        sample(t, &alpha("mlb_messages_delivered_total")) == Some(5.0)
            && sample(t, &beta("mlb_dead_letters_total")) == Some(1.0)
            && sample(t, &alpha("mlb_buffer_messages")) == Some(0.0)
            && sample(t, &beta("mlb_buffer_messages")) == Some(0.0)
    })
    .await;
    let expect = [
        (alpha("mlb_messages_received_total"), 5.0),
        (beta("mlb_messages_received_total"), 3.0),
        (beta("mlb_messages_delivered_total"), 0.0),
        (alpha("mlb_dead_letters_total"), 1.0),
        (
            "mlb_messages_dropped_total{rule=\"alpha\",reason=\"oversize\"}".into(),
            1.0,
        ),
        (
            "mlb_messages_dropped_total{rule=\"beta\",reason=\"throttled\"}".into(),
            2.0,
        ),
        (
            "mlb_messages_dropped_total{rule=\"alpha\",reason=\"throttled\"}".into(),
            0.0,
        ),
        (
            "mlb_messages_dropped_total{rule=\"alpha\",reason=\"drop_oldest\"}".into(),
            0.0,
        ),
        (
            "mlb_messages_dropped_total{rule=\"beta\",reason=\"corrupt\"}".into(),
            0.0,
        ),
        (
            "mlb_invocations_total{rule=\"alpha\",result=\"ok\"}".into(),
            5.0,
        ),
        (
            "mlb_invocations_total{rule=\"alpha\",result=\"throttled\"}".into(),
            1.0,
        ),
        (
            "mlb_invocations_total{rule=\"alpha\",result=\"error\"}".into(),
            0.0,
        ),
        (
            "mlb_invocations_total{rule=\"beta\",result=\"dead_lettered\"}".into(),
            1.0,
        ),
        (
            "mlb_invocations_total{rule=\"beta\",result=\"ok\"}".into(),
            0.0,
        ),
        (alpha("mlb_invocation_duration_seconds_count"), 6.0),
        (beta("mlb_invocation_duration_seconds_count"), 1.0),
        (
            "mlb_invocation_duration_seconds_bucket{rule=\"alpha\",le=\"+Inf\"}".into(),
            6.0,
        ),
        (alpha("mlb_buffer_oldest_age_seconds"), 0.0),
        ("mlb_mqtt_connected".into(), 1.0),
    ];
    for (series, value) in &expect {
        assert_eq!(sample(&text, series), Some(*value), "{series} in\n{text}");
    }
    assert!(sample(&text, &alpha("mlb_buffer_bytes")).is_some());
    assert!(sample(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6));
    let start = sample(&text, "process_start_time_seconds").expect("start time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(start <= now && now - start < 600.0, "{start} vs {now}");
    for name in [
        "process_cpu_seconds_total",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(sample(&text, name).is_some(), "{name} in\n{text}");
    }
    promtool_check(&text).await;

    // A scrape changes nothing: counters stay where they were.
    let again = get(port, "/metrics").await.body;
    for (series, value) in &expect {
        assert_eq!(
            sample(&again, series),
            Some(*value),
            "{series} after a second scrape"
        );
    }

    // OpenMetrics when asked for, with its terminator.
    let om = request(
        port,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert_eq!(om.status, 200);
    assert!(
        om.content_type.starts_with("application/openmetrics-text"),
        "{om:?}"
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert_eq!(
        sample(&om.body, &alpha("mlb_messages_delivered_total")),
        Some(5.0)
    );
    let plain = get(port, "/metrics").await;
    assert!(
        plain.content_type.starts_with("text/plain; version=0.0.4"),
        "{plain:?}"
    );
    assert!(!plain.body.contains("# EOF"));

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn readyz_says_why_while_the_broker_is_down_and_healthz_stays_up() {
    let mut broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let port = free_port();
    let rules = "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n";
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), rules),
        port,
    ))
    .await;
    wait_for_port(port).await;
    let ready = wait_status(port, "/readyz", 200).await;
    assert_eq!(ready.body, "ready\n");
    assert_eq!(get(port, "/metrics").await.status, 200);

    broker.kill().await;
    let down = wait_status(port, "/readyz", 503).await;
    assert_eq!(
        down.body,
        format!(
            "not connected to the MQTT broker at mqtt://127.0.0.1:{}\n",
            broker.port
        )
    );
    let text = get(port, "/metrics").await.body;
    assert_eq!(sample(&text, "mlb_mqtt_connected"), Some(0.0));
    let health = get(port, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

    broker.start_again().await;
    wait_status(port, "/readyz", 200).await;
    let text = get(port, "/metrics").await.body;
    assert_eq!(sample(&text, "mlb_mqtt_connected"), Some(1.0));

    assert_eq!(get(port, "/").await.status, 404);
    assert_eq!(get(port, "/metricz").await.status, 404);
    let post = request(port, "POST", "/metrics", None).await;
    assert_eq!(post.status, 405);
    let head = request(port, "HEAD", "/healthz", None).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_slow_client_is_cut_off_and_an_oversized_head_refused() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let port = free_port();
    let rules = "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n";
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), rules),
        port,
    ))
    .await;
    wait_for_port(port).await;

    // Half a request line, then nothing: the server closes the connection on its own.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    slow.write_all(b"GET /metr").await.expect("send");
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest))
        .await
        .expect("the server hangs up on a client that sends no request head")
        .ok();

    // A head far beyond any scraper's.
    let mut big = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(64 * 1024)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, big.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains(" 200 "), "{answer}");

    // Still serving.
    assert_eq!(get(port, "/healthz").await.status, 200);
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_listen_address_in_use_fails_the_start_naming_the_key() {
    let broker = Mosquitto::start().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let rules = "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let text = with_metrics(config(&broker.url(), "http://127.0.0.1:9", rules), port);
    let buffer = format!("\n[buffer]\ndir = \"{}\"\n", dir.path().join("b").display());
    std::fs::write(&path, format!("{text}{buffer}")).expect("write config");
    let mut cmd = tokio::process::Command::new(support::binary());
    cmd.args(["run", "--config"]).arg(&path).kill_on_drop(true);
    support::aws_test_env(&mut cmd);
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .expect("the daemon exits on its own")
        .expect("run the daemon");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "metrics.listen 127.0.0.1:{port}: cannot listen there: Address already in use"
        )),
        "{log}"
    );
}

#[tokio::test]
async fn a_bad_listen_address_is_one_line_naming_metrics_listen_also_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let rules = "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\n";
    let base = config("mqtt://127.0.0.1:1883", "http://127.0.0.1:9", rules);
    let buffer = format!("\n[buffer]\ndir = \"{}\"\n", dir.path().join("b").display());
    let check = |env: Option<&'static str>| {
        let mut cmd = std::process::Command::new(support::binary());
        cmd.args(["check", "--config"]).arg(&path);
        if let Some(value) = env {
            cmd.env("MLB_METRICS__LISTEN", value);
        }
        cmd.env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "x")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd.output().expect("run check")
    };

    std::fs::write(
        &path,
        format!("{base}{buffer}[metrics]\nlisten = \"localhost\"\n"),
    )
    .expect("write");
    let out = check(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("metrics.listen")
            && lines[0].contains("\"127.0.0.1:9464\"")
            && lines[0].contains("\"localhost\""),
        "{stderr}"
    );

    // The environment override reaches the same key, and is checked the same way.
    std::fs::write(&path, format!("{base}{buffer}")).expect("write");
    let out = check(Some("9464"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("metrics.listen") && stderr.contains("\"9464\""),
        "{stderr}"
    );
    assert_eq!(check(Some("127.0.0.1:9464")).status.code(), Some(0));

    // Unknown keys stay errors.
    std::fs::write(
        &path,
        format!("{base}{buffer}[metrics]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n"),
    )
    .expect("write");
    let out = check(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("lisen"), "{stderr}");
}

#[tokio::test]
async fn a_real_prometheus_server_scrapes_the_bridge() {
    const N: usize = 7;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let port = free_port();
    let rules = "[[rules]]\nname = \"temperature\"\ntopic = \"sensors/#\"\nfunction = \"f\"\n";
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), rules),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let prometheus = Prometheus::start(port).await;

    let publisher = Publisher::connect(broker.port).await;
    for i in 0..N {
        publisher.publish(&format!("sensors/{i}"), 1, "21.5").await;
    }
    publisher.wait_acked(N).await;
    lambda
        .fake
        .wait_until("all delivered", |inv| inv.len() == N)
        .await;

    let series = prometheus
        .wait_value("mlb_messages_delivered_total", &N.to_string())
        .await;
    assert_eq!(series["metric"]["rule"], "temperature", "{series}");
    assert_eq!(series["metric"]["job"], "mqtt-lambda-bridge", "{series}");
    prometheus.wait_value("up", "1").await;
    prometheus.wait_value("mlb_mqtt_connected", "1").await;
    prometheus
        .wait_value(
            "mlb_invocation_duration_seconds_count{rule=\"temperature\"}",
            &N.to_string(),
        )
        .await;
    // Histogram buckets arrive as Prometheus expects them: a quantile can be computed.
    let q = prometheus
        .query("histogram_quantile(0.5, mlb_invocation_duration_seconds_bucket)")
        .await;
    assert_eq!(q["status"], "success", "{q}");

    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn the_oldest_buffered_message_ages_until_lambda_accepts_it() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    lambda
        .fake
        .script("slow", [Reply::Slow(Duration::from_secs(3))]);
    let port = free_port();
    let rules = "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"slow\"\n";
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), rules),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("t/1", 1, "x").await;
    publisher.wait_acked(1).await;

    let series = "mlb_buffer_oldest_age_seconds{rule=\"r\"}";
    let text = scrape_until(port, "the message is a second old, still buffered", |t| {
        sample(t, series).is_some_and(|age| age >= 1.0)
    })
    .await;
    assert_eq!(sample(&text, "mlb_buffer_messages{rule=\"r\"}"), Some(1.0));
    let age = sample(&text, series).expect("age");
    assert!(age < 3.5, "{age}");
    scrape_until(port, "delivered, nothing buffered", |t| {
        sample(t, "mlb_messages_delivered_total{rule=\"r\"}") == Some(1.0)
            && sample(t, series) == Some(0.0)
            && sample(t, "mlb_buffer_messages{rule=\"r\"}") == Some(0.0)
    })
    .await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_rule_added_by_a_reload_is_scraped_and_a_removed_one_goes_once_drained() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let port = free_port();
    let rule = |name: &str, topic: &str| {
        format!("[[rules]]\nname = \"{name}\"\ntopic = \"{topic}\"\nfunction = \"f{name}\"\n")
    };
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), &rule("a", "a/#")),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let process_start = sample(
        &get(port, "/metrics").await.body,
        "process_start_time_seconds",
    )
    .expect("process start");
    let before_reload = mqtt_lambda_bridge::cli::cost::now_seconds();

    // Add rule b and remove a: edit the file (keeping the buffer where it is) and send SIGHUP.
    let edited = with_metrics(
        config(&broker.url(), &lambda.endpoint(), &rule("b", "b/#")),
        port,
    );
    let buffer = format!("\n[buffer]\ndir = \"{}\"\n", daemon.buffer_dir().display());
    std::fs::write(&daemon.config_path, format!("{edited}{buffer}")).expect("write config");
    daemon.signal("HUP");
    daemon.wait_for_log("configuration reloaded").await;
    daemon.wait_for_log("rule=b filter=b/# granted").await;

    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("b/1", 1, "1").await;
    lambda.fake.wait_for_messages("fb", 1).await;
    let text = scrape_until(port, "rule b counted, rule a gone once drained", |t| {
        sample(t, "mlb_messages_delivered_total{rule=\"b\"}") == Some(1.0)
            && sample(t, "mlb_messages_received_total{rule=\"a\"}").is_none()
    })
    .await;
    assert_eq!(
        sample(&text, "mlb_messages_received_total{rule=\"b\"}"),
        Some(1.0)
    );
    // Rule b's counters began at the reload, not at the process start: its average rate is
    // over its own time.
    let b_start = sample(&text, "mlb_rule_start_time_seconds{rule=\"b\"}").expect("b's start");
    assert!(b_start >= before_reload, "{b_start} < {before_reload}");
    assert!(
        b_start > process_start + 0.001,
        "{b_start} vs {process_start}"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test]
async fn a_rule_that_cannot_read_its_buffer_is_not_ready_and_stalled_until_it_reads_again() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    // The first event takes long: meanwhile delivery reads about a megabyte ahead and stops,
    // so the newest segments stay unread on disk.
    lambda
        .fake
        .script("f", [Reply::Slow(Duration::from_secs(15))]);
    let port = free_port();
    let buffer = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        "[[rules]]\nname = \"r\"\ntopic = \"t/#\"\nfunction = \"f\"\nmax_concurrency = 1\n\n[buffer]\ndir = \"{}\"\nsegment_size = \"4KiB\"\n",
        buffer.path().display()
    );
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), &rules),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let publisher = Publisher::connect(broker.port).await;
    const MESSAGES: usize = 1000;
    let payload = "x".repeat(2000);
    publisher.publish("t/0", 1, payload.clone()).await;
    lambda.fake.wait_arrived(1).await;
    for n in 1..MESSAGES {
        publisher
            .publish(&format!("t/{n}"), 1, payload.clone())
            .await;
    }
    publisher.wait_acked(MESSAGES).await;
    scrape_until(port, "every message stored", |t| {
        sample(t, "mlb_messages_received_total{rule=\"r\"}") == Some(MESSAGES as f64)
    })
    .await;

    // A segment that delivery has not read yet goes away (a drop_oldest race, a failing card).
    let rule_dir = buffer.path().join("r");
    let mut segments: Vec<_> = std::fs::read_dir(&rule_dir)
        .expect("rule dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    let missing = segments[segments.len() - 2].clone();
    let away = rule_dir.join("away");
    std::fs::rename(&missing, &away).expect("rename");
    // Else delivery may have read past that segment already: the setup, not the daemon, failed.
    assert!(
        lambda.fake.invocations().is_empty(),
        "the first event was still in flight when the segment went away (the fake records it when it answers)"
    );

    let answer = wait_status(port, "/readyz", 503).await;
    assert!(
        answer
            .body
            .starts_with("rule r cannot read its buffer: No such file or directory")
            && answer.body.trim_end().ends_with("; retrying"),
        "{answer:?}"
    );
    scrape_until(port, "the rule is reported stalled", |t| {
        sample(t, "mlb_rule_stalled{rule=\"r\"}") == Some(1.0)
    })
    .await;
    daemon.wait_for_log("cannot read the rule's buffer").await;

    std::fs::rename(&away, &missing).expect("rename back");
    wait_status(port, "/readyz", 200).await;
    let text = scrape_until(port, "everything delivered", |t| {
        sample(t, "mlb_messages_delivered_total{rule=\"r\"}") == Some(MESSAGES as f64)
    })
    .await;
    assert_eq!(sample(&text, "mlb_rule_stalled{rule=\"r\"}"), Some(0.0));
    assert_eq!(sample(&text, "mlb_buffer_messages{rule=\"r\"}"), Some(0.0));
    let delivered: std::collections::HashSet<String> = lambda
        .fake
        .accepted_for("f")
        .iter()
        .flat_map(|i| i.body["messages"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["topic"].as_str().map(str::to_owned))
        .collect();
    let first_missing = (0..MESSAGES).find(|n| !delivered.contains(&format!("t/{n}")));
    assert_eq!(
        first_missing,
        None,
        "{} of {MESSAGES} delivered",
        delivered.len()
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    let errors = log.matches("cannot read the rule's buffer").count();
    assert_eq!(errors, 1, "logged once per outage:\n{log}");
    assert!(log.contains("the rule's buffer reads again"), "{log}");
}

#[tokio::test]
async fn messages_an_sql_where_does_not_keep_are_counted_as_filtered_not_received() {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let rules = r#"
[[rules]]
name = "hot"
function = "f"
sql = "SELECT * FROM 's/+' WHERE t > 50"
"#;
    let port = free_port();
    let daemon = Daemon::start(&with_metrics(
        config(&broker.url(), &lambda.endpoint(), rules),
        port,
    ))
    .await;
    daemon.wait_for_log("subscribed").await;
    wait_for_port(port).await;
    let publisher = Publisher::connect(broker.port).await;
    for t in [10, 60, 20] {
        publisher
            .publish("s/1", 1, format!(r#"{{"t": {t}}}"#))
            .await;
    }
    publisher.publish("s/2", 1, "not json").await;
    publisher.wait_acked(4).await;
    let text = scrape_until(port, "one delivered, three filtered", |t| {
        sample(t, "mlb_messages_delivered_total{rule=\"hot\"}") == Some(1.0)
            && sample(t, "mlb_messages_filtered_total{rule=\"hot\"}") == Some(3.0)
    })
    .await;
    assert_eq!(
        sample(&text, "mlb_messages_received_total{rule=\"hot\"}"),
        Some(1.0),
        "{text}"
    );
    promtool_check(&text).await;
    let (code, _) = daemon.terminate().await;
    assert_eq!(code, Some(0));
}
