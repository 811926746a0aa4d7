//! What the benchmarks share: the release binary run as a user runs it, the PUBACK-counting
//! relay (`proxy.rs`), medians of alternating runs, and output as README table rows
//! (`| what | result | target |`) so figures can be pasted as printed.
#![allow(dead_code)]

pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;

/// How long any one step of a benchmark may take before it is reported as failed.
pub const STEP_PATIENCE: Duration = Duration::from_secs(120);

/// An environment variable as a number, or `default`.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether the section `name` should run: all of them unless `BENCH_ONLY` lists some
/// (comma-separated).
pub fn selected(name: &str) -> bool {
    match std::env::var("BENCH_ONLY") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == name),
        _ => true,
    }
}

/// The machine's load, to print beside the figures (other work shares these cores).
pub fn load_line() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = load.split_whitespace();
    let avg: Vec<&str> = fields.by_ref().take(3).collect();
    format!(
        "load average (1, 5, 15 min): {} on {} cores",
        avg.join(" "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

/// Prints the table header the README uses.
pub fn table_header() {
    println!("| what | result | target |");
    println!("|---|---|---|");
}

/// Prints one README table row.
pub fn row(what: &str, result: &str, target: &str) {
    println!("| {what} | {result} | {target} |");
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

/// Smallest and largest of `values`.
pub fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// The release binary cargo built for this benchmark, or `BENCH_BRIDGE_BIN` (another build, to
/// compare two versions run after run on the same busy machine).
pub fn binary() -> String {
    std::env::var("BENCH_BRIDGE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_mqtt-lambda-bridge").to_owned())
}

/// Isolates the daemon from the machine's AWS setup (the fake Lambda ignores signatures).
pub fn aws_env(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", "AKIDBENCH")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION");
}

/// A bridge configuration; `rules` is appended verbatim.
pub fn bridge_config(
    mqtt_port: u16,
    client_id: &str,
    lambda_endpoint: &str,
    buffer_dir: &Path,
    rules: &str,
) -> String {
    format!(
        r#"shutdown_timeout = "5s"

[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
client_id = "{client_id}"

[aws]
region = "us-east-1"
endpoint_url = "{lambda_endpoint}"

[buffer]
dir = "{}"

{rules}
"#,
        buffer_dir.display()
    )
}

/// `mqtt-lambda-bridge run` as a user runs it (`RUST_LOG` at its default, info), in its own
/// temporary directory (config and buffer), with its log kept; killed on drop.
pub struct Bridge {
    child: Child,
    /// When the process was spawned.
    pub spawned: Instant,
    log: Arc<Mutex<Vec<String>>>,
    log_changed: Arc<Notify>,
    _dir: tempfile::TempDir,
}

impl Bridge {
    /// Writes the config (`config_for(buffer_dir)`) and starts the daemon on it.
    pub fn spawn(config_for: impl FnOnce(&Path) -> String) -> Bridge {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config_for(&dir.path().join("buffer"))).expect("config");
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        aws_env(&mut cmd);
        let spawned = Instant::now();
        let mut child = cmd.spawn().expect("start mqtt-lambda-bridge");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_changed = Arc::new(Notify::new());
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            let changed = log_changed.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
                        eprintln!("daemon: {line}");
                    }
                    log.lock().expect("log lock").push(line);
                    changed.notify_waiters();
                }
                changed.notify_waiters();
            });
        }
        Bridge {
            child,
            spawned,
            log,
            log_changed,
            _dir: dir,
        }
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + STEP_PATIENCE;
        loop {
            let changed = self.log_changed.notified();
            if self.log_text().contains(needle) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "the bridge never logged {needle:?}; log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// CPU time the process has used so far (user + system, all threads), in milliseconds;
    /// steadier evidence than wall-clock time on a shared machine.
    pub fn cpu_ms(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()?)).ok()?;
        // Fields after the command name (which may hold spaces) and its closing parenthesis:
        // utime and stime are the 14th and 15th fields of the whole line.
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(ticks * 1000 / per_second)
    }

    /// Bytes the process has caused to be written to storage so far (`/proc/PID/io`
    /// `write_bytes`: a page counts each time it goes from clean to dirty).
    pub fn write_bytes(&self) -> Option<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.child.id()?)).ok()?;
        io.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))?
            .trim()
            .parse()
            .ok()
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// SIGKILL: used once a run's figure is taken, so shutdown work is not waited for.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Bytes written to the whole block device holding `dir` (its journal included, and every
/// other process's writes too), when the device can be found.
pub fn device_writes(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    // Linux's encoding of st_dev.
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    const SECTOR: u64 = 512;
    stat.split_whitespace()
        .nth(6)?
        .parse::<u64>()
        .ok()
        .map(|s| s * SECTOR)
}

/// Polls `count` until it reaches `n` or `cap` has passed since `start`; returns the count and
/// the time taken. For waits longer than a test's patience (a slow uplink at today's defaults).
pub async fn poll_until(
    start: Instant,
    n: usize,
    cap: Duration,
    count: impl Fn() -> usize,
) -> (usize, Duration) {
    // Polling granularity: small against runs of seconds.
    const TICK: Duration = Duration::from_millis(5);
    loop {
        let seen = count();
        let elapsed = start.elapsed();
        if seen >= n || elapsed >= cap {
            return (seen, elapsed);
        }
        tokio::time::sleep(TICK).await;
    }
}

/// A venv under `target/` with paho-mqtt at `version`, made on first use; `None` (and a line
/// saying why) when it cannot be made, e.g. without access to PyPI.
pub fn python_with_paho(version: &str) -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-venv");
    let python = venv.join("bin/python");
    let check = |python: &Path| {
        std::process::Command::new(python)
            .args(["-c", "import paho.mqtt; print(paho.mqtt.__version__)"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == version)
    };
    if check(&python) {
        return Some(python);
    }
    eprintln!("setting up {} with paho-mqtt=={version}", venv.display());
    let made = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", &format!("paho-mqtt=={version}")])
            .status()
            .is_ok_and(|s| s.success());
    if made && check(&python) {
        Some(python)
    } else {
        eprintln!(
            "cannot set up paho-mqtt=={version} in {}: the Python baseline is skipped",
            venv.display()
        );
        None
    }
}
