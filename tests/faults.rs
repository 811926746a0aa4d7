//! Promises under faults, end to end with real mosquitto: few duplicates after kill -9, a
//! connection that stays healthy while ingest waits, a full disk that recovers by itself, and
//! a QoS 0 flood that stays bounded in memory while ingest waits and a reply waits too.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::fake_lambda::{FakeLambda, FakeLambdaServer, deliveries};
use support::{Daemon, Mosquitto, Outage, Publisher, config};

/// A port for a Lambda that is down, and the socket that keeps it: bound but not listening,
/// so invocations are refused, and no listener another test starts meanwhile can take the port
/// (its invocations would then be answered by that test's fake). Drop it to start the fake.
fn lambda_down() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a port for the Lambda that is down");
    let port = socket.local_addr().expect("addr").port();
    (socket, port)
}

#[tokio::test]
async fn three_kill_9_during_a_stream_of_6000_deliver_at_most_150_duplicates() {
    const N: u64 = 6000;
    let rules = r#"
[[rules]]
name = "stream"
topic = "stream/#"
function = "sink"
[rules.batch]
max_messages = 50
max_wait = "20ms"
"#;
    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let mut daemon = Daemon::start(&config(&broker.url(), &lambda.endpoint(), rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    // Sensors every few ms: five messages every 10 ms, about 500 a second.
    let stream = publisher.stream_in_bursts("stream/x", N, 5, Duration::from_millis(10));
    for third in 1..=3u64 {
        // Kill once the function has seen about a third, two thirds… of the stream.
        lambda
            .fake
            .wait_until("a share of the stream", |all| {
                deliveries(all).len() as u64 >= third * N / 4
            })
            .await;
        daemon = daemon.kill().await.restart().await;
        daemon.wait_for_log("connected to the MQTT broker").await;
    }
    stream.await.expect("publisher");
    publisher.wait_acked(N as usize).await;
    let seen = lambda.fake.wait_for_payloads(N).await;
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    if std::env::var_os("DUP_DETAIL").is_some() {
        let ids = lambda.fake.with_invocations(|all| {
            let mut ids: BTreeMap<u64, std::collections::BTreeSet<String>> = BTreeMap::new();
            for m in all
                .iter()
                .flat_map(|c| c.body["messages"].as_array().into_iter().flatten())
            {
                if let Some(n) = m["payload"].as_u64() {
                    ids.entry(n).or_default().insert(m["id"].to_string());
                }
            }
            ids
        });
        let new_ids: usize = ids.values().map(|s| s.len() - 1).sum();
        eprintln!("duplicates with a new id (broker redelivery): {new_ids}");
    }
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
    eprintln!("duplicates after three kill -9 over {N} messages: {duplicates}");
    assert!(
        duplicates <= 150,
        "{duplicates} messages delivered more than once"
    );
}

#[tokio::test]
async fn while_the_buffer_blocks_ingest_keep_alives_flow_and_the_connection_stays_up() {
    // No in-flight limit: the broker pushes everything it holds, so the bridge holds more
    // publishes than one ingest group while its buffer refuses more.
    let broker = Mosquitto::start_with("max_inflight_messages 0").await;
    // Lambda is down: its port is held, bound but not listening, until the buffer is full.
    let outage = Outage::begin();
    let (down_lambda, lambda_port) = lambda_down();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let buffer = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        r#"
[buffer]
dir = "{}"
max_size = "64KiB"
when_full = "block"

[[rules]]
name = "blocked"
topic = "b/#"
function = "sink"
[rules.batch]
max_messages = 100
max_wait = "50ms"
"#,
        buffer.path().display()
    );
    let text = config(&broker.url(), &endpoint, &rules)
        .replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"1s\"\n");
    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    const N: u64 = 3000;
    for i in 0..N {
        publisher
            .publish("b/x", 1, format!("{i}:{}", "x".repeat(180)))
            .await;
    }
    publisher.wait_acked(N as usize).await;
    // The buffer is full (64 KiB) long before 3,000 messages of 200 bytes; Lambda is down.
    daemon.wait_for_log("code=ConnectionFailed").await;
    let buffered = daemon.buffered();
    assert!(
        buffered < N as usize,
        "the buffer must be holding ingest back"
    );
    // Four keep-alive periods with ingest held back: mosquitto drops a client that sends
    // nothing for 1.5 of them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        daemon.count_log("connected to the MQTT broker"),
        1,
        "{}",
        daemon.log_lines("MQTT")
    );
    assert_eq!(
        daemon.count_log("cannot connect to the MQTT broker"),
        0,
        "{}",
        daemon.log_lines("MQTT")
    );

    let fake = FakeLambda::back_after(&outage);
    drop(down_lambda);
    let _lambda = FakeLambdaServer::start_on(lambda_port, fake.clone()).await;
    fake.wait_for_payloads(N).await;
    assert_eq!(
        daemon.count_log("connected to the MQTT broker"),
        1,
        "{}",
        daemon.log_lines("MQTT")
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

/// SIGTERM while ingest waits for room in a full `block` buffer (Lambda down): the wait is
/// given up at once, the waiting messages are not acknowledged, the daemon exits within a
/// couple of seconds (not after `shutdown_timeout`) without an ERROR line, and after a restart
/// with Lambda back every message is delivered.
#[tokio::test]
async fn sigterm_while_ingest_waits_on_a_full_block_buffer_exits_promptly_and_loses_nothing() {
    let broker = Mosquitto::start().await;
    let lambda_port = support::free_port();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let buffer = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        r#"
[buffer]
dir = "{}"
max_size = "64KiB"
when_full = "block"

[[rules]]
name = "blocked"
topic = "b/#"
function = "sink"
"#,
        buffer.path().display()
    );
    // A long shutdown_timeout, so waiting it out cannot pass for a prompt exit.
    let text = config(&broker.url(), &endpoint, &rules)
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"20s\"");
    let mut daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    // About 200 bytes each: far more than 64 KiB, and Lambda is down.
    const N: u64 = 500;
    for i in 0..N {
        publisher
            .publish("b/x", 1, format!("{i}:{}", "x".repeat(180)))
            .await;
    }
    daemon.wait_for_log("holding new messages back").await;
    assert!(
        daemon.buffered() < N as usize,
        "the buffer holds ingest back"
    );

    let asked = std::time::Instant::now();
    let (code, log) = daemon.stop().await;
    let took = asked.elapsed();
    println!("stopped {took:?} after SIGTERM with ingest waiting for room");
    assert_eq!(code, Some(0), "{log}");
    let after_stop: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("stopping: no new messages"))
        .collect();
    let errors: Vec<&&str> = after_stop.iter().filter(|l| l.contains("ERROR")).collect();
    assert!(
        took < Duration::from_secs(3) && errors.is_empty(),
        "stopped after {took:?} (at most 3s); ERROR lines after SIGTERM: {errors:#?}"
    );

    let fake = FakeLambda::default();
    let _lambda = FakeLambdaServer::start_on(lambda_port, fake.clone()).await;
    let daemon = daemon.restart().await;
    fake.wait_for_payloads(N).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one of `size`, or `None` when this process may not mount (not root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_stops_acknowledging_then_recovers_by_itself_and_delivers_everything() {
    let Some(disk) = Tmpfs::mount("3m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let broker = Mosquitto::start_with("max_inflight_messages 0").await;
    // Lambda is down: its port is held, bound but not listening, until the buffer is full.
    let outage = Outage::begin();
    let (down_lambda, lambda_port) = lambda_down();
    let endpoint = format!("http://127.0.0.1:{lambda_port}");
    let rules = format!(
        r#"
[buffer]
dir = "{}"

[[rules]]
name = "full"
topic = "f/#"
function = "sink"
[rules.batch]
max_messages = 100
max_wait = "50ms"
"#,
        disk.dir.path().join("buffer").display()
    );
    let text = config(&broker.url(), &endpoint, &rules)
        .replace("[mqtt]\n", "[mqtt]\nkeep_alive = \"2s\"\n");
    let daemon = Daemon::start(&text).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    // 10,000 messages of about 450 bytes: 4.5 MB, more than the 3 MiB disk holds.
    const N: u64 = 10_000;
    let filler = "x".repeat(440);
    for i in 0..N {
        publisher.publish("f/x", 1, format!("{i}:{filler}")).await;
    }
    publisher.wait_acked(N as usize).await;
    daemon.wait_for_log("cannot write the buffer").await;
    assert!(daemon.buffered() < N as usize);

    // Lambda comes back: what is delivered frees its segment, ingest resumes, and every
    // message the broker kept arrives.
    let fake = FakeLambda::back_after(&outage);
    drop(down_lambda);
    let _lambda = FakeLambdaServer::start_on(lambda_port, fake.clone()).await;
    fake.wait_for_payloads(N).await;
    assert_eq!(
        daemon.count_log("connected to the MQTT broker"),
        1,
        "no reconnect churn while the disk was full:\n{}",
        daemon.log_lines("MQTT")
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

/// The patience after an outage (`Outage::patience`) rests on `support::longest_retry_sleep`
/// bounding how long the bridge may still be sleeping when Lambda comes back. Checked against
/// schedules the bridge's own retry policy draws (random jitter), at every quarter second of
/// outages up to ten minutes; a fixed patience is not enough (one such wait once gave up after
/// 30 s on a busy machine while the bridge slept in a grown backoff).
#[test]
fn the_patience_after_an_outage_covers_every_retry_delay_the_bridge_can_draw() {
    use mqtt_lambda_bridge::core::retry::retry_delays;
    use mqtt_lambda_bridge::delivery::pipeline::{RETRY_MAX_DELAY, RETRY_MIN_DELAY};
    use support::{PATIENCE, longest_retry_sleep};

    const HORIZON: Duration = Duration::from_secs(600);
    const STEP: Duration = Duration::from_millis(250);
    let mut beyond_fixed_patience = 0;
    for _ in 0..200 {
        // Attempts at 0, then after each delay; a failed attempt takes no time here (a refused
        // connection), which makes the delays start as early as they can.
        let mut attempts = vec![Duration::ZERO];
        let mut delays = retry_delays(RETRY_MIN_DELAY, RETRY_MAX_DELAY);
        while *attempts.last().unwrap_or(&HORIZON) < HORIZON {
            let last = *attempts.last().unwrap_or(&HORIZON);
            attempts.push(last + delays.next().unwrap_or(RETRY_MAX_DELAY));
        }
        let mut down_for = Duration::ZERO;
        let mut next = 1;
        while down_for < HORIZON {
            while attempts[next] <= down_for {
                next += 1;
            }
            let still_asleep = attempts[next] - down_for;
            assert!(
                still_asleep <= longest_retry_sleep(down_for),
                "after {down_for:?} down the bridge sleeps {still_asleep:?} more, beyond the \
                 {:?} allowed",
                longest_retry_sleep(down_for)
            );
            if down_for <= Duration::from_secs(20) && still_asleep > PATIENCE {
                beyond_fixed_patience += 1;
            }
            down_for += STEP;
        }
    }
    eprintln!(
        "outages of at most 20 s after which the bridge slept longer than {PATIENCE:?}: \
         {beyond_fixed_patience} of {} sampled",
        200 * 80
    );
}

/// With `when_full = "block"`, an append that does not fit waits until Lambda takes messages.
/// Once every message is acknowledged it must go in (an empty queue takes any append), even
/// when acknowledging freed no file: the bridge once stalled here for good, its first small
/// group delivered and the next, larger group never woken (seen as the blocked-ingest test
/// above getting 18 of 3,000 payloads on a busy machine).
#[tokio::test]
async fn a_blocked_append_goes_in_once_everything_before_it_is_acknowledged() {
    use mqtt_lambda_bridge::buffer::disk::DEFAULT_SEGMENT_SIZE;
    use mqtt_lambda_bridge::buffer::{DiskQueue, DiskQueueConfig, Queue};
    use mqtt_lambda_bridge::core::config::WhenFull;
    use mqtt_lambda_bridge::core::envelope::Message;

    const MAX_SIZE: u64 = 64 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = std::sync::Arc::new(
        DiskQueue::open(DiskQueueConfig {
            dir: dir.path().to_owned(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            max_size: MAX_SIZE,
            when_full: WhenFull::Block,
            max_age: None,
            max_ack_delay: std::time::Duration::ZERO,
        })
        .expect("open the queue"),
    );
    let message = |n: usize| {
        Message::received(
            "b/x".to_owned(),
            format!("{n}:{}", "x".repeat(180)).into_bytes(),
            1,
            false,
            std::time::SystemTime::now(),
        )
    };
    // A small first group, as ingest stores when the broker's flood has just begun…
    queue
        .append((0..18).map(message).collect())
        .await
        .expect("append the first group");
    // …then a group that does not fit beside it.
    let large = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.append((18..318).map(message).collect()).await })
    };
    let first = queue.read(100).await.expect("read the first group");
    assert_eq!(first.len(), 18);
    let last = first.last().map(|e| e.seq).expect("entries");
    queue.ack(last).await.expect("ack the first group");
    tokio::time::timeout(support::PATIENCE, large)
        .await
        .expect("the blocked append went in once everything before it was acknowledged")
        .expect("append task")
        .expect("append");
}

/// A failing wait prints what arrived in one line, never the events themselves.
#[test]
fn a_failing_wait_summarises_what_arrived_in_one_line() {
    use support::fake_lambda::{Invocation, summary};
    let invocation = |payloads: &[u64]| Invocation {
        function: "sink".to_owned(),
        qualifier: None,
        invocation_type: Some("Event".to_owned()),
        authorization: None,
        body: serde_json::json!({
            "messages": payloads.iter().map(|n| serde_json::json!({"payload": n})).collect::<Vec<_>>()
        }),
        body_len: 0,
        messages: payloads.len(),
        concurrent: 1,
        at: std::time::Instant::now(),
    };
    let all = [invocation(&[0, 1]), invocation(&[3, 4000])];
    let line = summary(&all);
    assert_eq!(
        line,
        "sink: 4 messages in 2 requests; 4 numbered payloads up to 4000, missing below it: \
         2, 4, 5, 6, 7, 8, 9, 10, 11, 12, …"
    );
    assert_eq!(summary(&[]), "no requests accepted");
}

#[tokio::test]
async fn a_qos0_flood_while_ingest_blocks_and_a_reply_waits_stays_bounded_in_memory() {
    // The broker holds nothing back from the bridge (no in-flight or queue limits).
    let broker = Mosquitto::start_with("max_inflight_messages 0\nmax_queued_messages 0\n").await;
    let relay = support::relay::Relay::start(broker.port).await;
    // The reply's PUBACK never comes: the reply waits, and with it its delivery.
    relay.swallow_pubacks(true);
    let lambda = FakeLambdaServer::start().await;
    let buffer = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        r#"
[buffer]
dir = "{}"
max_size = "64KiB"
when_full = "block"

[[rules]]
name = "cmd"
topic = "dev/+/req"
function = "handler"
invocation = "request_response"
[rules.reply]
topic = "replies/{{topic}}"
"#,
        buffer.path().display()
    );
    let mut daemon = Daemon::start(&config(&relay.url(), &lambda.endpoint(), &rules)).await;
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    publisher.publish("dev/1/req", 1, r#"{"n":1}"#).await;
    relay.wait_swallowed(1).await;
    let before = daemon.peak_rss_kib().expect("the daemon's memory");

    // 1 KiB messages: the buffer (64 KiB) is full after a few dozen, ingest blocks, and the
    // bridge may not pause reads (the reply's PUBACK is behind the flood).
    const N: usize = 30_000;
    let payload = "x".repeat(1024);
    for _ in 0..N {
        publisher.publish("dev/2/req", 0, payload.clone()).await;
    }
    // At most 4,096 publishes held, one ingest group and the buffer: the rest is dropped,
    // the log counting them every 10,000.
    const BOUND_KIB: u64 = 16 * 1024;
    let read = daemon.wait_for_log_count("still dropping QoS 0 messages", 2);
    let watched = async {
        loop {
            let grown = daemon.peak_rss_kib().unwrap_or(before) - before;
            assert!(
                grown < BOUND_KIB,
                "the daemon grew by {} MiB during a {} MiB QoS 0 flood: publishes pile up",
                grown / 1024,
                N / 1024
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = read => {}
        _ = watched => {}
    }
    let grown = daemon.peak_rss_kib().unwrap_or(before) - before;
    assert!(grown < BOUND_KIB, "grew by {} MiB", grown / 1024);
    assert_eq!(
        daemon.count_log("dropping QoS 0 messages until ingest catches up"),
        1
    );
    daemon.stop().await;
}
