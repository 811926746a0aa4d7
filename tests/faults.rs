//! Promises under faults, end to end with real mosquitto: few duplicates after kill -9, a
//! connection that stays healthy while ingest waits, a full disk that recovers by itself, and
//! a QoS 0 flood that stays bounded in memory while ingest waits and a reply waits too.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::fake_lambda::{FakeLambda, FakeLambdaServer, deliveries};
use support::{Daemon, Mosquitto, Publisher, config};

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

async fn wait_every_payload(fake: &FakeLambda, n: u64) -> BTreeMap<u64, usize> {
    fake.wait_until(&format!("payloads 0..{n}"), |all| {
        deliveries(all).len() as u64 >= n
    })
    .await;
    let seen = fake.with_invocations(deliveries);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>()
    );
    seen
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
    let stream = {
        let client = publisher.client.clone();
        tokio::spawn(async move {
            // Sensors every few ms: five messages every 10 ms, about 500 a second.
            for i in 0..N {
                client
                    .publish("stream/x", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .expect("queue publish");
                if i % 5 == 4 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
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
    let seen = wait_every_payload(&lambda.fake, N).await;
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
        daemon.log_text()
    );
    assert_eq!(daemon.count_log("cannot connect to the MQTT broker"), 0);

    let fake = FakeLambda::default();
    drop(down_lambda);
    let _lambda = FakeLambdaServer::start_on(lambda_port, fake.clone()).await;
    wait_every_payload(&fake, N).await;
    assert_eq!(daemon.count_log("connected to the MQTT broker"), 1);
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
    let fake = FakeLambda::default();
    drop(down_lambda);
    let _lambda = FakeLambdaServer::start_on(lambda_port, fake.clone()).await;
    wait_every_payload(&fake, N).await;
    assert_eq!(
        daemon.count_log("connected to the MQTT broker"),
        1,
        "no reconnect churn while the disk was full"
    );
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
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
