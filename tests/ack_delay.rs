//! `buffer.max_ack_delay` end to end: the daemon against real mosquitto and the fake Invoke
//! API, a trickle from several publishers, with and without the delay: fewer fsyncs per
//! message (`mlb_buffer_fsyncs_total`), every message delivered; and what `check` says of it.
//! (The queue under storage faults with a delay: `tests/queue_faults.rs`.)

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::fake_lambda::FakeLambdaServer;
use support::{Daemon, Mosquitto, Publisher, config, free_port, metric, scrape_metrics};

/// Publishers of the trickle, each at [`PER_PUBLISHER_RATE`].
const PUBLISHERS: u64 = 10;
/// Messages a second from each publisher: 100 a second in all.
const PER_PUBLISHER_RATE: u64 = 10;
/// Messages in all.
const MESSAGES: u64 = 300;

/// What one run of the daemon did with the trickle.
#[derive(Debug)]
struct Run {
    received: f64,
    fsyncs: f64,
}

impl Run {
    fn fsyncs_per_message(&self) -> f64 {
        self.fsyncs / self.received
    }
}

/// Payload `n`, padded to 200 bytes as a sensor reading might be.
fn payload(n: u64) -> String {
    let mut text = format!("{n}:");
    text.extend(std::iter::repeat_n('x', 200 - text.len()));
    text
}

/// The daemon with `max_ack_delay = delay` takes [`MESSAGES`] from [`PUBLISHERS`] publishers
/// at 100 msg/s in all; every one must reach the function exactly once.
async fn trickle(delay: &str) -> Run {
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let metrics_port = free_port();
    let rules = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n\
         [[rules]]\nname = \"sensors\"\ntopic = \"sensors/#\"\nfunction = \"f\"\n\
         [rules.batch]\nmax_messages = 50\nmax_wait = \"200ms\"\n"
    );
    let text = config(&broker.url(), &lambda.endpoint(), &rules);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{text}\n[buffer]\ndir = \"{}\"\nmax_ack_delay = \"{delay}\"\n",
        dir.path().display()
    );
    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        publishers.push(Arc::new(Publisher::connect(broker.port).await));
    }
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = publishers
        .iter()
        .enumerate()
        .map(|(p, publisher)| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                let period = Duration::from_millis(1000 / PER_PUBLISHER_RATE);
                // Publishers out of step, as independent sensors are.
                let offset = period * p as u32 / PUBLISHERS as u32;
                for (i, n) in (p as u64..MESSAGES)
                    .step_by(PUBLISHERS as usize)
                    .enumerate()
                {
                    tokio::time::sleep_until(start + offset + period * i as u32).await;
                    publisher
                        .publish(&format!("sensors/{p}"), 1, payload(n))
                        .await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher");
    }
    for publisher in &publishers {
        publisher.wait_acked((MESSAGES / PUBLISHERS) as usize).await;
    }
    let seen = lambda.fake.wait_for_payloads(MESSAGES).await;
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let text = scrape_metrics(metrics_port).await;
    let get =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    Run {
        received: get("mlb_messages_received_total{rule=\"sensors\"}"),
        fsyncs: get("mlb_buffer_fsyncs_total{rule=\"sensors\"}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_cuts_the_fsyncs_of_a_trickle_and_loses_nothing() {
    let without = trickle("0ms").await;
    let with = trickle("100ms").await;
    eprintln!("without a delay: {without:?}; with 100ms: {with:?}");
    assert_eq!(without.received, MESSAGES as f64);
    assert_eq!(with.received, MESSAGES as f64);
    // 100 msg/s. Without a delay a group commit takes what arrived during the previous fsync:
    // on an idle machine that is one message, on a busy one a few. With 100 ms about ten share
    // one (the ack position rides along; the ack file is synced at most every 100 ms).
    assert!(
        with.fsyncs_per_message() <= 0.2,
        "with 100ms: {with:?}, without: {without:?}"
    );
    assert!(
        with.fsyncs_per_message() < without.fsyncs_per_message() / 2.0,
        "with 100ms: {with:?}, without: {without:?}"
    );
}

#[tokio::test]
async fn check_says_what_the_delay_costs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let base = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[aws]\nregion = \"eu-west-1\"\n\
         [[rules]]\nname = \"t\"\ntopic = \"t/#\"\nfunction = \"f\"\n[buffer]\ndir = \"{}\"\n",
        dir.path().join("buffer").display()
    );
    let check = |extra: &str| {
        std::fs::write(&path, format!("{base}{extra}")).expect("write config");
        let out = std::process::Command::new(support::binary())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = check("max_ack_delay = \"100ms\"\n");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("buffer.max_ack_delay = 100ms: ") && stdout.contains("about 200 msg/s"),
        "{stdout}"
    );
    let (code, stdout, _) = check("");
    assert_eq!(code, Some(0));
    assert!(!stdout.contains("max_ack_delay"), "{stdout}");
    let (code, _, stderr) = check("max_ack_delay = \"5s\"\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("buffer.max_ack_delay: must be at most \"1s\"")
            && stderr.contains("got \"5s\""),
        "{stderr}"
    );
}
