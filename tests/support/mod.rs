//! Test harness: real mosquitto brokers, MiniStack, an in-process fake Lambda Invoke API, and
//! the daemon binary itself, each on its own ephemeral 127.0.0.1 port.
#![allow(dead_code)]

pub mod fake_lambda;
pub mod relay;
pub mod scrape;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// How long any awaited condition may take before the test fails, on a machine other work
/// shares (two cores, several builds and test runs beside this one). A wait that depends on
/// the bridge's own retry schedule adds that schedule to it: see [`Outage`].
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Lambda being down, from when a test makes it unreachable (or starts the daemon without it)
/// until it comes back. The bridge retries each event with delays that double from
/// `RETRY_MIN_DELAY` (jitter adds up to as much again), so the longer the outage, the longer
/// it may sleep before it notices Lambda is back: a wait after an outage allows for that.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    began: std::time::Instant,
}

impl Outage {
    /// Lambda is unreachable from now on.
    pub fn begin() -> Outage {
        Outage {
            began: std::time::Instant::now(),
        }
    }

    /// How long Lambda has been down so far.
    pub fn lasted(&self) -> Duration {
        self.began.elapsed()
    }

    /// How long to wait for deliveries once Lambda is back: the longest retry delay the bridge
    /// may have begun during the outage so far, plus [`PATIENCE`] for the deliveries themselves.
    pub fn patience(&self) -> Duration {
        PATIENCE + longest_retry_sleep(self.lasted())
    }
}

/// The longest delay the bridge may be sleeping between two invocation attempts after failing
/// for `down_for`. Unjittered delays double from the minimum, so the one in progress is at most
/// the sum of those before it plus the minimum, and those are at most `down_for` (load only
/// stretches them); jitter at most doubles a delay, and the cap bounds it before jitter.
pub fn longest_retry_sleep(down_for: Duration) -> Duration {
    use mqtt_lambda_bridge::delivery::pipeline::{RETRY_MAX_DELAY, RETRY_MIN_DELAY};
    (down_for + RETRY_MIN_DELAY).min(RETRY_MAX_DELAY) * 2
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A mosquitto broker on its own port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Lines that override the default configuration (later lines win in mosquitto).
    extra_conf: String,
}

impl Mosquitto {
    /// Starts a broker that keeps persistent sessions in memory.
    pub async fn start() -> Mosquitto {
        Self::start_with("").await
    }

    /// Starts a broker with extra configuration lines (e.g. `max_inflight_messages 0`).
    pub async fn start_with(extra_conf: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = Mosquitto {
            port: free_port(),
            dir,
            child: None,
            extra_conf: extra_conf.to_owned(),
        };
        broker.launch().await;
        broker
    }

    async fn launch(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nuser root\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_inflight_messages 100\nmax_queued_messages 1000000\nlog_dest stderr\nlog_type error\n{}\n",
                self.port,
                self.dir.path().display(),
                self.extra_conf
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start mosquitto (is it installed? .ci/run installs it)");
        self.child = Some(child);
        wait_for_port(self.port).await;
    }

    /// Stops the broker abruptly (SIGKILL): sessions not persisted to disk are lost.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered. `restart` or
    /// `kill` end it.
    pub fn freeze(&self) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            let _ = std::process::Command::new("kill")
                .args(["-s", "STOP", "--"])
                .arg(pid.to_string())
                .status();
        }
    }

    /// Stops the broker with SIGTERM: it saves its sessions and queued messages first.
    pub async fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "TERM", "--"])
                    .arg(pid.to_string())
                    .status();
            }
            let _ = tokio::time::timeout(PATIENCE, child.wait()).await;
        }
    }

    /// Starts the broker again on the same port and persistence file.
    pub async fn start_again(&mut self) {
        self.launch().await;
    }

    /// Stops and starts the broker on the same port.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

fn mosquitto_binary() -> PathBuf {
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("mosquitto")
}

/// A publishing client, connected and ready.
pub struct Publisher {
    pub client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
    acked: Arc<std::sync::atomic::AtomicUsize>,
    ack_notify: Arc<Notify>,
}

impl Publisher {
    /// Publishes `0..n` (the numbers as payloads) at QoS 1 to `topic` in a task, pausing
    /// `pause` after every `burst` messages: a stream of sensor readings.
    pub fn stream_in_bursts(
        &self,
        topic: &'static str,
        n: u64,
        burst: u64,
        pause: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        tokio::spawn(async move {
            for i in 0..n {
                client
                    .publish(topic, rumqttc::QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .expect("queue publish");
                if i % burst == burst - 1 {
                    tokio::time::sleep(pause).await;
                }
            }
        })
    }

    pub async fn connect(port: u16) -> Publisher {
        let id = format!("test-pub-{}", free_port());
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        options.set_inflight(100);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10_000);
        let connected = Arc::new(Notify::new());
        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ack_notify = Arc::new(Notify::new());
        let task = {
            let connected = connected.clone();
            let acked = acked.clone();
            let ack_notify = ack_notify.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                            connected.notify_one()
                        }
                        Ok(rumqttc::Event::Incoming(
                            rumqttc::Incoming::PubAck(_) | rumqttc::Incoming::PubComp(_),
                        )) => {
                            acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            ack_notify.notify_waiters();
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        tokio::time::timeout(PATIENCE, connected.notified())
            .await
            .expect("publisher connects");
        Publisher {
            client,
            task,
            acked,
            ack_notify,
        }
    }

    pub async fn publish(&self, topic: &str, qos: u8, payload: impl Into<Vec<u8>>) {
        let qos = match qos {
            0 => rumqttc::QoS::AtMostOnce,
            1 => rumqttc::QoS::AtLeastOnce,
            _ => rumqttc::QoS::ExactlyOnce,
        };
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .expect("queue publish");
    }

    /// Waits until the broker acknowledged `n` QoS 1/2 publishes in all.
    pub async fn wait_acked(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let waiting = self.ack_notify.notified();
            if self.acked.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                panic!(
                    "broker acknowledged only {} of {n} publishes",
                    self.acked.load(std::sync::atomic::Ordering::SeqCst)
                );
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The daemon binary, running, with its log captured.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    log_notify: Arc<Notify>,
    pub config_path: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

/// Environment that isolates the daemon from the machine's AWS setup.
pub fn aws_test_env(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION");
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mqtt-lambda-bridge")
}

/// `config` with `dir = "<dir>"` in its `[buffer]` table when that table has no `dir` (or when
/// there is no `[buffer]` table at all).
pub fn with_buffer_dir(config: &str, dir: &Path) -> String {
    let mut doc: toml_edit::DocumentMut = config.parse().expect("a test config is TOML");
    let buffer = doc
        .entry("buffer")
        .or_insert_with(toml_edit::table)
        .as_table_like_mut()
        .expect("[buffer] is a table");
    if !buffer.contains_key("dir") {
        buffer.insert("dir", toml_edit::value(dir.display().to_string()));
    }
    doc.to_string()
}

impl Daemon {
    /// Writes `config` to a temp file and runs `mqtt-lambda-bridge run` on it.
    /// Unless `[buffer]` names a `dir`, the buffer goes into the daemon's own temp dir: a test
    /// never writes to the packaged default (/var/lib/mqtt-lambda-bridge).
    pub async fn start(config: &str) -> Daemon {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config_path = dir.path().join("config.toml");
        let text = with_buffer_dir(config, &dir.path().join("buffer"));
        std::fs::write(&config_path, text).expect("write config");
        Self::start_at(config_path, dir).await
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The daemon's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// The buffer directory when `start` chose it.
    pub fn buffer_dir(&self) -> PathBuf {
        self._dir.path().join("buffer")
    }

    async fn start_at(config_path: PathBuf, dir: Arc<tempfile::TempDir>) -> Daemon {
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,mqtt_lambda_bridge=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        aws_test_env(&mut cmd);
        let mut child = cmd.spawn().expect("start the daemon");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_notify = Arc::new(Notify::new());
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            let notify = log_notify.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("TEST_DAEMON_LOG").is_some() {
                        eprintln!("daemon: {line}");
                    }
                    log.lock().expect("log lock").push(line);
                    notify.notify_waiters();
                }
                notify.notify_waiters();
            });
        }
        Daemon {
            child,
            log,
            log_notify,
            config_path,
            _dir: dir,
        }
    }

    /// Starts the same config again after a stop.
    pub async fn restart(self) -> Daemon {
        let Daemon {
            config_path, _dir, ..
        } = self;
        Self::start_at(config_path, _dir).await
    }

    /// Waits until `n` log lines contain `needle`.
    pub async fn wait_for_log_count(&self, needle: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let waiting = self.log_notify.notified();
            if self.count_log(needle) >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                panic!(
                    "the daemon logged {needle:?} {} of {n} times within {PATIENCE:?}; {}",
                    self.count_log(needle),
                    self.log_tail()
                );
            }
        }
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        self.wait_for_log_count(needle, 1).await
    }

    /// Waits until the daemon has buffered and acknowledged `n` publishes in all.
    pub async fn wait_buffered(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let waiting = self.log_notify.notified();
            if self.buffered() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                panic!(
                    "the daemon buffered only {} of {n} within {PATIENCE:?}; {}",
                    self.buffered(),
                    self.log_tail()
                );
            }
        }
    }

    /// Publishes the daemon has buffered and acknowledged so far (from its debug log).
    pub fn buffered(&self) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains("buffered and acknowledged"))
            .filter_map(|l| l.split("publishes=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter_map(|n| n.parse::<usize>().ok())
            .sum()
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// The log's last [`LOG_TAIL`] lines, leaving out the per-message debug lines a long run
    /// writes thousands of: what a failing wait prints.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        let telling: Vec<&String> = log.iter().filter(|l| !is_chatter(l)).collect();
        let start = telling.len().saturating_sub(LOG_TAIL);
        let lines: Vec<&str> = telling[start..].iter().map(|l| l.as_str()).collect();
        format!(
            "the last {} of {} log lines (per-batch debug lines left out):\n{}",
            lines.len(),
            log.len(),
            lines.join("\n")
        )
    }

    /// Log lines containing `needle`, one per line: what an assertion about them prints.
    pub fn log_lines(&self, needle: &str) -> String {
        let log = self.log.lock().expect("log lock");
        let lines: Vec<&str> = log
            .iter()
            .filter(|l| l.contains(needle))
            .map(String::as_str)
            .collect();
        lines.join("\n")
    }

    /// Sends the signal `name` (e.g. "HUP", as `systemctl reload` does) to the running daemon.
    pub fn signal(&self, name: &str) {
        let pid = self.pid().expect("the daemon runs");
        let status = std::process::Command::new("kill")
            .args(["-s", name, "--"])
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -s {name} {pid}");
    }

    /// Sends SIGTERM and waits for the exit code.
    pub async fn terminate(mut self) -> (Option<i32>, String) {
        self.stop().await
    }

    /// Sends SIGTERM and waits for the exit code, keeping the config and buffer for `restart`.
    pub async fn stop(&mut self) -> (Option<i32>, String) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", "--"])
                .arg(pid.to_string())
                .status();
        }
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the daemon exits after SIGTERM")
            .expect("wait");
        // Let the log reader drain.
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status.code(), self.log_text())
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill(mut self) -> Daemon {
        let _ = self.child.kill().await;
        self
    }
}

/// Lines a failing wait's log tail shows at most.
const LOG_TAIL: usize = 40;

/// Debug lines the daemon writes per batch or per publish: thousands in a long test, and
/// never what explains a failure.
fn is_chatter(line: &str) -> bool {
    line.contains("DEBUG")
        && (line.contains("buffered and acknowledged") || line.contains(" delivered"))
}

/// A daemon configuration for tests: `rules` is appended verbatim.
pub fn config(mqtt_url: &str, lambda_endpoint: &str, rules: &str) -> String {
    format!(
        r#"shutdown_timeout = "5s"

[mqtt]
url = "{mqtt_url}"
client_id = "bridge-under-test-{id}"

[aws]
region = "us-east-1"
endpoint_url = "{lambda_endpoint}"

{rules}
"#,
        id = free_port()
    )
}

/// MiniStack (a local AWS emulator that runs real Python Lambda handlers) on its own port; its
/// whole process group is killed on drop, Lambda workers included.
pub struct MiniStack {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl MiniStack {
    /// Starts MiniStack and waits until it answers HTTP.
    pub async fn start() -> MiniStack {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("ministack.log")).expect("log file");
        let child = Command::new("ministack")
            .env("BIND_HOST", "127.0.0.1")
            .env("GATEWAY_PORT", port.to_string())
            .env("IOT_MTLS_ENABLED", "0")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("start ministack (pip install ministack; .ci/run installs it)");
        wait_for_port(port).await;
        MiniStack { port, child, dir }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Deploys demo/handler.py as `name`; it appends each event to the returned file.
    pub async fn deploy_recorder(&self, name: &str) -> PathBuf {
        let record = self.dir.path().join(format!("{name}.jsonl"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/deploy_function.py");
        let status = Command::new("python3")
            .arg(script)
            .args([
                "--endpoint",
                &self.endpoint(),
                "--name",
                name,
                "--record-file",
            ])
            .arg(&record)
            .status()
            .await
            .expect("run deploy_function.py");
        assert!(status.success(), "deploying {name} to MiniStack failed");
        record
    }
}

impl Drop for MiniStack {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                // `--` matters: without it, kill(1) reads "-<pid>" as an option and may signal
                // every process (-1).
                .args(["-s", "KILL", "--"])
                .arg(format!("-{pid}"))
                .status();
        }
    }
}

/// Reads the events a recorder function wrote, waiting until there are `n`.
pub async fn wait_for_recorded(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    loop {
        let events: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if events.len() >= n {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the function recorded {} of {n} events",
            events.len()
        );
        // The handler runs in MiniStack's worker process and writes a file: there is no event
        // to await, so poll it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The MQTT version a test speaks, for tests run over both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

/// [`config`] speaking `protocol` (MQTT 5 keeps the defaults: a 7-day session expiry).
pub fn config_for(
    protocol: Protocol,
    mqtt_url: &str,
    lambda_endpoint: &str,
    rules: &str,
) -> String {
    let text = config(mqtt_url, lambda_endpoint, rules);
    match protocol {
        Protocol::V311 => text,
        Protocol::V5 => text.replacen("[mqtt]\n", "[mqtt]\nprotocol = \"5\"\n", 1),
    }
}

/// The daemon's `/metrics` exposition, from `metrics.listen` on `port` (the body only).
pub async fn scrape_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics listener");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("the metrics listener answers")
        .expect("read the answer");
    answer
        .split_once("\r\n\r\n")
        .map_or(answer.clone(), |(_, body)| body.to_owned())
}

/// The value of one sample in an exposition (`name{labels}` exactly as it is written).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}
