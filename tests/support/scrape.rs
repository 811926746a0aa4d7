//! HTTP requests to the bridge's metrics listener (raw HTTP/1.1 over a fresh connection, as a
//! scraper sends them), reading samples of the exposition, and a real Prometheus server that
//! scrapes the bridge and evaluates alerting rules.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{PATIENCE, free_port, wait_for_port};

/// A response as the test saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// One HTTP/1.1 request over a fresh connection (the client closes it).
pub async fn request(port: u16, method: &str, path: &str, accept: Option<&str>) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics listener");
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("the server answers and closes")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let body = match header("transfer-encoding") {
        Some(chunked) if chunked.eq_ignore_ascii_case("chunked") => unchunk(body),
        _ => body.to_owned(),
    };
    Answer {
        status,
        content_type: header("content-type").unwrap_or_default(),
        body,
    }
}

/// The body of a chunked response (Prometheus' larger API answers).
fn unchunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = after[size..]
            .strip_prefix("\r\n")
            .expect("CRLF after a chunk");
    }
    body
}

pub async fn get(port: u16, path: &str) -> Answer {
    request(port, "GET", path, None).await
}

/// The value of one sample (`name{labels}` exactly as the exposition writes it).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Scrapes until `done` holds over the exposition, or fails after [`PATIENCE`].
pub async fn scrape_until(port: u16, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = get(port, "/metrics").await;
        assert_eq!(answer.status, 200);
        if done(&answer.body) {
            return answer.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached; last scrape:\n{}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests `path` until it answers `status`, or fails after [`PATIENCE`].
pub async fn wait_status(port: u16, path: &str, status: u16) -> Answer {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = get(port, path).await;
        if answer.status == status {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {status}; last: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `config` with `[metrics]` listening on `port`.
pub fn with_metrics(config: String, port: u16) -> String {
    format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// A Prometheus server on its own port, scraping the bridge every second (and evaluating its
/// rules every second, when given some); killed on drop.
pub struct Prometheus {
    port: u16,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes the metrics listener on `target_port`.
    pub async fn start(target_port: u16) -> Prometheus {
        Self::start_with_rules(target_port, None).await
    }

    /// Scrapes the metrics listener on `target_port` and evaluates `rules` (a rule file's
    /// text) every second.
    pub async fn start_with_rules(target_port: u16, rules: Option<&str>) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mqtt-lambda-bridge\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        );
        if let Some(rules) = rules {
            let path = dir.path().join("rules.yml");
            std::fs::write(&path, rules).expect("write the rule file");
            config.push_str(&format!("rule_files: ['{}']\n", path.display()));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/install-deps.sh installs it)");
        wait_for_port(port).await;
        // It listens before its storage is open, answering 503 until then.
        wait_status(port, "/-/ready", 200).await;
        Prometheus {
            port,
            child,
            _dir: dir,
        }
    }

    /// Runs an instant query; the JSON answer.
    pub async fn query(&self, query: &str) -> serde_json::Value {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let answer = get(self.port, &format!("/api/v1/query?query={encoded}")).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        serde_json::from_str(&answer.body).expect("JSON from Prometheus")
    }

    /// Waits until `query` returns exactly one series with `value`; returns the series.
    pub async fn wait_value(&self, query: &str, value: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let answer = self.query(query).await;
            let result = &answer["data"]["result"];
            if result.as_array().is_some_and(|r| r.len() == 1) && result[0]["value"][1] == value {
                return result[0].clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Prometheus never saw {query} = {value}; last answer {answer}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The alerts pending or firing now (`/api/v1/alerts`), each as Prometheus gives it.
    pub async fn alerts(&self) -> Vec<serde_json::Value> {
        let answer = get(self.port, "/api/v1/alerts").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let json: serde_json::Value =
            serde_json::from_str(&answer.body).expect("JSON from Prometheus");
        json["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until alert `name` fires with every label of `labels`; returns it.
    pub async fn wait_firing(&self, name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let alerts = self.alerts().await;
            let found = alerts.iter().find(|a| {
                a["state"] == "firing"
                    && a["labels"]["alertname"] == name
                    && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
            });
            if let Some(alert) = found {
                return alert.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} {labels:?} never fired; alerts now: {alerts:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
