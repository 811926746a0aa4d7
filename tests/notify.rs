//! systemd's notify protocol, spoken by the real binary to a socket this test binds the way
//! systemd does (`NOTIFY_SOCKET`, `WATCHDOG_USEC`), with the broker down at start.

mod support;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use support::fake_lambda::FakeLambdaServer;
use support::{Mosquitto, PATIENCE, aws_test_env, binary, config};

const RULES: &str = r#"
[[rules]]
name = "t"
topic = "s/+/t"
function = "f"
"#;

/// `WATCHDOG_USEC` given to the daemon: it must ping every second.
const WATCHDOG_USEC: u64 = 2_000_000;

/// Lines received from a process: notify datagrams or log lines, in order.
#[derive(Clone, Default)]
struct Lines {
    all: Arc<Mutex<Vec<String>>>,
    added: Arc<Notify>,
}

impl Lines {
    fn push(&self, line: String) {
        self.all.lock().expect("lock").push(line);
        self.added.notify_waiters();
    }

    fn snapshot(&self) -> Vec<String> {
        self.all.lock().expect("lock").clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.snapshot()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `n` lines contain `needle`.
    async fn wait_count(&self, needle: &str, n: usize, other: &Lines) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let added = self.added.notified();
            if self.count(needle) >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                panic!(
                    "never got {n} of {needle:?}; got:\n{}\nlog:\n{}",
                    self.snapshot().join("\n"),
                    other.snapshot().join("\n")
                );
            }
        }
    }
}

/// Binds a notify socket and collects every datagram (its assignments joined by `|`).
fn listen(path: &std::path::Path) -> Lines {
    let socket = UnixDatagram::bind(path).expect("bind the notify socket");
    let lines = Lines::default();
    let sink = lines.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf).await {
            let text = String::from_utf8_lossy(&buf[..n]);
            sink.push(text.trim_end().replace('\n', "|"));
        }
    });
    lines
}

fn start_daemon(config_path: &std::path::Path, notify_socket: &std::path::Path) -> (Child, Lines) {
    let mut cmd = Command::new(binary());
    cmd.arg("run")
        .arg("--config")
        .arg(config_path)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", notify_socket)
        .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    aws_test_env(&mut cmd);
    let mut child = cmd.spawn().expect("start the daemon");
    let log = Lines::default();
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.push(line);
            }
        });
    }
    (child, log)
}

#[tokio::test]
async fn ready_watchdog_status_and_stopping_reach_systemd_with_the_broker_down_at_start() {
    let mut broker = Mosquitto::start().await;
    // Down at boot: the daemon must still become ready.
    broker.kill().await;
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "{}\n[buffer]\ndir = \"{}\"\n",
            config(&broker.url(), &lambda.endpoint(), RULES),
            dir.path().join("buffer").display()
        ),
    )
    .expect("write config");
    let socket_path = dir.path().join("notify.sock");
    let notes = listen(&socket_path);
    let (mut daemon, log) = start_daemon(&config_path, &socket_path);

    notes.wait_count("READY=1", 1, &log).await;
    let ready = notes
        .snapshot()
        .into_iter()
        .find(|l| l.contains("READY=1"))
        .expect("READY");
    assert!(
        ready.contains("STATUS=broker not connected (reconnecting); 0 messages pending"),
        "{ready}"
    );
    // The first failure: one warn line naming the broker, the delay in human units.
    let failure = log
        .snapshot()
        .into_iter()
        .find(|l| l.contains("cannot connect to the MQTT broker"))
        .expect("the first failure is logged");
    assert!(failure.contains("WARN"), "{failure}");
    assert!(
        failure.contains(&format!("broker={}", broker.url())),
        "{failure}"
    );
    let retry_in = failure
        .split("retry_in=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("retry_in");
    assert!(
        retry_in.ends_with("ms") && retry_in.trim_end_matches("ms").parse::<u64>().is_ok(),
        "retry_in in whole milliseconds: {retry_in}"
    );

    // The watchdog is fed every WATCHDOG_USEC / 2 while the loops turn, broker down or not.
    let before = notes.count("WATCHDOG=1");
    let started = tokio::time::Instant::now();
    notes.wait_count("WATCHDOG=1", before + 3, &log).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_micros(WATCHDOG_USEC) * 3,
        "three pings took {took:?}"
    );

    broker.start_again().await;
    notes
        .wait_count("STATUS=broker connected; 0 messages pending", 1, &log)
        .await;
    log.wait_count(
        "connected to the MQTT broker again after an outage of",
        1,
        &notes,
    )
    .await;

    // A reload (SIGHUP, what ExecReload sends) is bracketed by RELOADING=1 and READY=1.
    let pid = daemon.id().expect("pid");
    std::process::Command::new("kill")
        .args(["-s", "HUP", "--"])
        .arg(pid.to_string())
        .status()
        .expect("kill");
    notes.wait_count("READY=1", 2, &log).await;
    log.wait_count("configuration reloaded", 1, &notes).await;
    let all = notes.snapshot();
    let reloading = all
        .iter()
        .position(|l| l.contains("RELOADING=1"))
        .expect("RELOADING=1 before the second READY=1");
    assert!(
        all[reloading].contains("MONOTONIC_USEC="),
        "{}",
        all[reloading]
    );
    assert!(all[reloading..].iter().any(|l| l.contains("READY=1")));

    std::process::Command::new("kill")
        .args(["-s", "TERM", "--"])
        .arg(pid.to_string())
        .status()
        .expect("kill");
    let status = tokio::time::timeout(PATIENCE, daemon.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    notes.wait_count("STOPPING=1", 1, &log).await;
    // STOPPING comes last among the state changes: nothing says READY after it.
    let all = notes.snapshot();
    let stopping = all
        .iter()
        .position(|l| l.contains("STOPPING=1"))
        .expect("STOPPING");
    assert!(!all[stopping..].iter().any(|l| l.contains("READY=1")));
    assert_eq!(notes.count("READY=1"), 2);
}
