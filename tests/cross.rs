//! The ARM release binaries, run under qemu-user against a real mosquitto and the fake Invoke
//! API: messages delivered end to end, then kill -9 while streaming and a restart on the same
//! buffer, with nothing lost.
//!
//! The binaries are cross-compiled outside cargo's test build, so the test takes their paths
//! from the environment (scripts/test.sh builds them and sets these):
//!   BRIDGE_CROSS_AARCH64=target/aarch64-unknown-linux-gnu/release/mqtt-lambda-bridge
//!   BRIDGE_CROSS_ARMV7=target/armv7-unknown-linux-gnueabihf/release/mqtt-lambda-bridge
//! (Not MLB_: that prefix is the daemon's own configuration override.)
//! Without the variable a test says so on stderr and passes: `cargo nextest run` alone does not
//! cross-compile. With it, the file must be an ELF for that architecture (so the host binary
//! can never stand in for it) and qemu must be installed.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use support::fake_lambda::{FakeLambda, FakeLambdaServer, Invocation};
use support::{Mosquitto, Publisher, aws_test_env, config};

/// ELF e_machine values (at byte 18, little-endian on both targets).
const EM_ARM: u16 = 40;
const EM_AARCH64: u16 = 183;
/// Where e_machine sits in the ELF header.
const ELF_MACHINE_OFFSET: usize = 18;
/// Emulation is slower than the host by an order of magnitude: awaited conditions get longer.
const EMULATED_PATIENCE: Duration = Duration::from_secs(120);

/// One cross target: where its binary comes from and how qemu runs it.
struct Target {
    env_var: &'static str,
    machine: u16,
    /// qemu-user binaries, the static one (Debian's qemu-user-static) first.
    qemu: [&'static str; 2],
    /// The target's glibc and loader, from Debian's libc6-*-cross (a dependency of the cross gcc).
    sysroot: &'static str,
}

const AARCH64: Target = Target {
    env_var: "BRIDGE_CROSS_AARCH64",
    machine: EM_AARCH64,
    qemu: ["qemu-aarch64-static", "qemu-aarch64"],
    sysroot: "/usr/aarch64-linux-gnu",
};

const ARMV7: Target = Target {
    env_var: "BRIDGE_CROSS_ARMV7",
    machine: EM_ARM,
    qemu: ["qemu-arm-static", "qemu-arm"],
    sysroot: "/usr/arm-linux-gnueabihf",
};

impl Target {
    /// The binary to test, or None when the environment does not name one.
    fn binary(&self) -> Option<PathBuf> {
        let path = PathBuf::from(std::env::var_os(self.env_var)?);
        let header = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{} names {}: {e}", self.env_var, path.display()));
        assert!(
            header.len() > ELF_MACHINE_OFFSET + 1 && header.starts_with(b"\x7fELF"),
            "{} is not an ELF binary",
            path.display()
        );
        let machine =
            u16::from_le_bytes([header[ELF_MACHINE_OFFSET], header[ELF_MACHINE_OFFSET + 1]]);
        assert_eq!(
            machine,
            self.machine,
            "{} is built for another architecture (ELF machine {machine})",
            path.display()
        );
        Some(path)
    }

    fn qemu(&self) -> PathBuf {
        let path = std::env::var_os("PATH").unwrap_or_default();
        for name in self.qemu {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join(name);
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        panic!(
            "neither {} is installed (apt-get install qemu-user-static)",
            self.qemu.join(" nor ")
        );
    }
}

/// The daemon running under qemu, with its log captured.
struct Emulated {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    log_notify: Arc<Notify>,
    /// Set when its stderr closed: the daemon exited, nothing more will be logged.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Emulated {
    fn start(target: &Target, binary: &Path, config: &Path) -> Emulated {
        let mut cmd = Command::new(target.qemu());
        cmd.arg("-L")
            .arg(target.sysroot)
            .arg(binary)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,mqtt_lambda_bridge=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        aws_test_env(&mut cmd);
        let mut child = cmd.spawn().expect("start the daemon under qemu");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_notify = Arc::new(Notify::new());
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            let notify = log_notify.clone();
            let ended = ended.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("TEST_DAEMON_LOG").is_some() {
                        eprintln!("daemon: {line}");
                    }
                    log.lock().expect("log lock").push(line);
                    notify.notify_waiters();
                }
                ended.store(true, std::sync::atomic::Ordering::SeqCst);
                notify.notify_waiters();
            });
        }
        Emulated {
            child,
            log,
            log_notify,
            ended,
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + EMULATED_PATIENCE;
        loop {
            let waiting = self.log_notify.notified();
            if self
                .log
                .lock()
                .expect("log lock")
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            assert!(
                !self.ended.load(std::sync::atomic::Ordering::SeqCst),
                "the emulated daemon exited before logging {needle:?}; log:\n{}",
                self.log_text()
            );
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                panic!(
                    "the emulated daemon never logged {needle:?}; log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// SIGKILL: qemu-user is the process, so the emulated daemon dies with it.
    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then the exit code and the log.
    async fn terminate(mut self) -> (Option<i32>, String) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", "--"])
                .arg(pid.to_string())
                .status();
        }
        let status = tokio::time::timeout(EMULATED_PATIENCE, self.child.wait())
            .await
            .expect("the emulated daemon exits after SIGTERM")
            .expect("wait");
        // Let the log reader drain.
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status.code(), self.log_text())
    }
}

const RULES: &str = r#"
[[rules]]
name = "stream"
topic = "stream/#"
function = "sink"
[rules.batch]
max_messages = 50
max_wait = "20ms"
"#;

/// Payload numbers that reached the function, each counted once.
fn payloads_of(all: &[Invocation]) -> BTreeSet<u64> {
    all.iter()
        .flat_map(|c| c.body["messages"].as_array().into_iter().flatten())
        .filter_map(|m| m["payload"].as_u64())
        .collect()
}

async fn wait_delivered(fake: &FakeLambda, range: std::ops::Range<u64>) {
    let what = format!("payloads {}..{}", range.start, range.end);
    let expected: BTreeSet<u64> = range.collect();
    fake.wait_until(&what, |all| payloads_of(all).is_superset(&expected))
        .await;
    let delivered = fake.with_invocations(payloads_of);
    let missing: Vec<_> = expected.difference(&delivered).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}

/// Delivery, then kill -9 twice while a stream is published, then a restart on the same buffer:
/// every payload the broker acknowledged reaches the function.
async fn delivers_and_survives_kill_9(target: &Target) {
    let Some(binary) = target.binary() else {
        eprintln!(
            "{} is not set: skipped (scripts/test.sh cross-compiles and sets it)",
            target.env_var
        );
        return;
    };
    /// Messages before the kills, and in the stream the kills interrupt.
    const FIRST: u64 = 100;
    const STREAM: u64 = 600;

    let broker = Mosquitto::start().await;
    let lambda = FakeLambdaServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.toml");
    let mut text = config(&broker.url(), &lambda.endpoint(), RULES);
    text.push_str(&format!(
        "\n[buffer]\ndir = \"{}\"\n",
        dir.path().join("buffer").display()
    ));
    std::fs::write(&config_path, text).expect("write config");

    let daemon = Emulated::start(target, &binary, &config_path);
    daemon.wait_for_log("subscribed").await;
    let publisher = Publisher::connect(broker.port).await;
    for i in 0..FIRST {
        publisher.publish("stream/a", 1, i.to_string()).await;
    }
    publisher.wait_acked(FIRST as usize).await;
    wait_delivered(&lambda.fake, 0..FIRST).await;

    // A stream the daemon is killed in the middle of, twice.
    let stream = {
        let client = publisher.client.clone();
        tokio::spawn(async move {
            for i in FIRST..FIRST + STREAM {
                client
                    .publish("stream/b", rumqttc::QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .expect("queue publish");
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    let mut daemon = daemon;
    for pause in [Duration::from_millis(150), Duration::from_millis(400)] {
        tokio::time::sleep(pause).await;
        daemon.kill().await;
        daemon = Emulated::start(target, &binary, &config_path);
        daemon.wait_for_log("connected to the MQTT broker").await;
    }
    stream.await.expect("publisher");
    publisher.wait_acked((FIRST + STREAM) as usize).await;
    wait_delivered(&lambda.fake, 0..FIRST + STREAM).await;
    let (code, log) = daemon.terminate().await;
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aarch64_binary_under_qemu_delivers_and_survives_kill_9() {
    delivers_and_survives_kill_9(&AARCH64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn armv7_binary_under_qemu_delivers_and_survives_kill_9() {
    delivers_and_survives_kill_9(&ARMV7).await;
}
