//! Prometheus metrics and health checks over HTTP (`[metrics] listen`).
//!
//! # Endpoints
//!
//! ```text
//! GET /metrics   200  Prometheus text format 0.0.4; OpenMetrics 1.0 when the Accept header
//!                     names application/openmetrics-text
//! GET /healthz   200  "ok" while the process serves
//! GET /readyz    200  "ready" when the broker connection is up, every buffer is writable and
//!                     no rule is stalled
//!                503  one line saying why not
//! other paths    404;  other methods 405 (GET and HEAD are served)
//! ```
//!
//! # Metrics (names are a contract: dashboards and alerts use them; base units only)
//!
//! ```text
//! mlb_messages_received_total{rule}            counter  matched to the rule and buffered
//! mlb_messages_delivered_total{rule}           counter  in events Lambda accepted
//! mlb_messages_dropped_total{rule,reason}      counter  drop_oldest | drop_newest | expired |
//!                                                       throttled | oversize | corrupt
//! mlb_dead_letters_total{rule}                 counter  messages moved to the dead-letter store
//! mlb_invocations_total{rule,result}           counter  invocation attempts: ok | throttled |
//!                                                       error (retried) | dead_lettered
//! mlb_http_requests_total{status}              counter  HTTP ingest answers (only when it serves)
//! mlb_replies_total{rule,result}               counter  rules with [rules.reply]: published |
//!                                                       no_topic | dead_lettered
//! mlb_invocation_duration_seconds{rule}        histogram  each attempt, 10 ms … 30 s buckets
//! mlb_buffer_messages{rule}                    gauge    buffered, not yet acknowledged
//! mlb_buffer_bytes{rule}                       gauge    size of the rule's segment files
//! mlb_buffer_oldest_age_seconds{rule}          gauge    age of the oldest buffered message that
//!                                                       delivery holds (0 when none)
//! mlb_rule_stalled{rule}                       gauge    1 while the rule delivers nothing: its
//!                                                       buffer cannot be read (retried) or its
//!                                                       delivery stopped (/readyz says why)
//! mlb_mqtt_connected                           gauge    1 while the broker connection is up
//! process_resident_memory_bytes, process_virtual_memory_bytes, process_cpu_seconds_total,
//! process_open_fds, process_max_fds, process_start_time_seconds   (Linux, from /proc)
//! ```
//!
//! Invariant: nothing here counts. Every number is read at scrape time from the counters the
//! owning parts keep anyway (`plan::RuleStats`, the queue's `counters()` and `stats()`,
//! `health::Health`), so a scrape never changes a value and counters only ever grow across
//! scrapes.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::config::{MetricsConfig, parse_mqtt_url};
use crate::core::health::Health;
use crate::core::shutdown::{self, Shutdown, Trigger};
use crate::core::stats::{Board, RuleReport, RuleStats};
use crate::http::{self, Request, Response};

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The OpenMetrics text format's content type.
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What a scraper puts in `Accept` to get OpenMetrics.
const OPENMETRICS_MEDIA_TYPE: &str = "application/openmetrics-text";

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound (in use, not an address of this host, a privileged port).
    #[error("metrics.listen {addr}: cannot listen there: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The address is not an IP address and port (validation should have said so).
    #[error("metrics.listen: {0}")]
    Address(String),
}

/// The running listener, or nothing when `[metrics]` is absent.
#[derive(Debug)]
pub struct Metrics {
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    addr: std::net::SocketAddr,
    stop: Trigger,
    task: tokio::task::JoinHandle<()>,
}

impl Metrics {
    /// The bound address, when listening.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.as_ref().map(|r| r.addr)
    }

    /// Stops the listener and drops its connections.
    pub async fn stop(self) {
        if let Some(running) = self.running {
            running.stop.trigger();
            let _ = running.task.await;
        }
    }
}

/// Starts the listener when `config` asks for one: binds now (so a bad address fails the
/// start), then serves in a task until [`Metrics::stop`].
pub async fn serve(
    config: Option<&MetricsConfig>,
    broker_url: &str,
    routes: Board,
    health: Arc<Health>,
) -> Result<Metrics, MetricsError> {
    let Some(config) = config else {
        return Ok(Metrics { running: None });
    };
    let addr = config.listen_addr().map_err(MetricsError::Address)?;
    let listener = http::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let endpoints = Arc::new(Endpoints::new(broker_url, routes, health));
    let (stop, shutdown): (Trigger, Shutdown) = shutdown::channel();
    let task = tokio::spawn(http::serve(listener, endpoints, shutdown));
    tracing::info!(listen = %addr, "serving /metrics, /healthz and /readyz");
    Ok(Metrics {
        running: Some(Running { addr, stop, task }),
    })
}

/// Which endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/metrics`
    Metrics,
    /// `/healthz`
    Healthz,
    /// `/readyz`
    Readyz,
    /// A path we do not serve.
    NotFound,
    /// A path we serve, with a method we do not.
    MethodNotAllowed,
}

/// Routes a request by method and path. Pure.
pub fn route(method: &str, path: &str) -> Endpoint {
    let endpoint = match path {
        "/metrics" => Endpoint::Metrics,
        "/healthz" => Endpoint::Healthz,
        "/readyz" => Endpoint::Readyz,
        _ => return Endpoint::NotFound,
    };
    if method == "GET" || method == "HEAD" {
        endpoint
    } else {
        Endpoint::MethodNotAllowed
    }
}

/// Whether the scraper asked for OpenMetrics. Pure.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            // `q=0` (or `0.0`, `0.000`) means "not this one". Compared as text: parsing floats
            // would pull float parsing into memory for this alone.
            let refused = |q: &str| !q.is_empty() && q.chars().all(|c| c == '0' || c == '.');
            media.eq_ignore_ascii_case(OPENMETRICS_MEDIA_TYPE)
                && !params.any(|p| p.strip_prefix("q=").is_some_and(refused))
        })
    })
}

/// The HTTP side: routes requests to the registry and the readiness check.
struct Endpoints {
    registry: Registry,
    readiness: Arc<Collected>,
}

impl Endpoints {
    fn new(broker_url: &str, routes: Board, health: Arc<Health>) -> Self {
        // The URL without credentials or path: it goes into a response anyone may read.
        let broker = parse_mqtt_url(broker_url).map_or_else(
            |_| without_userinfo(broker_url),
            |a| {
                let scheme = if a.tls { "mqtts" } else { "mqtt" };
                format!("{scheme}://{}:{}", a.host, a.port)
            },
        );
        let collected = Arc::new(Collected {
            routes,
            health,
            broker,
            start_time: process_start_time().unwrap_or_else(now_seconds),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collected.clone()));
        Endpoints {
            registry,
            readiness: collected,
        }
    }

    fn metrics(&self, openmetrics: bool) -> Response {
        let mut out = String::with_capacity(16 * 1024);
        let (encoded, content_type) = if openmetrics {
            let encoded = prometheus_client::encoding::text::encode(&mut out, &self.registry);
            (encoded, OPENMETRICS_TEXT)
        } else {
            let encoded =
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
            (encoded, PROMETHEUS_TEXT)
        };
        match encoded {
            Ok(()) => Response::new(200, content_type, out),
            Err(fmt::Error) => {
                tracing::error!("cannot encode the metrics");
                Response::text(500, "cannot encode the metrics")
            }
        }
    }
}

impl http::Handler for Endpoints {
    async fn handle(&self, request: Request) -> Response {
        match route(&request.method, &request.path) {
            Endpoint::Metrics => self.metrics(wants_openmetrics(request.header("accept"))),
            Endpoint::Healthz => Response::text(200, "ok"),
            Endpoint::Readyz => match self.readiness.not_ready() {
                None => Response::text(200, "ready"),
                Some(reason) => Response::text(503, &reason),
            },
            Endpoint::NotFound => Response::text(
                404,
                "not found: the paths are /metrics, /healthz and /readyz",
            ),
            Endpoint::MethodNotAllowed => {
                Response::text(405, "method not allowed: use GET").with_header("allow", "GET, HEAD")
            }
        }
    }
}

/// What a scrape reads: the routes' counters and queues, and the health facts.
struct Collected {
    routes: Board,
    health: Arc<Health>,
    /// `mqtt://host:port`, for the readiness reason.
    broker: String,
    /// Seconds since the epoch when the process started.
    start_time: f64,
}

impl fmt::Debug for Collected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collected")
            .field("broker", &self.broker)
            .finish()
    }
}

impl Collected {
    /// Why the daemon is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<String> {
        if !self.health.mqtt_connected() {
            return Some(format!(
                "not connected to the MQTT broker at {}",
                self.broker
            ));
        }
        self.routes.read().ok()?.iter().find_map(|rule| {
            if !rule.buffer.writable() {
                return Some(format!(
                    "buffer for rule {} cannot be written: the last write failed (disk full, read-only or I/O error)",
                    rule.name
                ));
            }
            let stalled = rule.stats.stalled.reason();
            stalled.map(|why| format!("rule {} {why}", rule.name))
        })
    }
}

type Labels = Vec<(&'static str, String)>;

fn rule_label(route: &RuleReport) -> Labels {
    vec![("rule", route.name.clone())]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_owned()));
    labels
}

/// One counter family, one sample per label set.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
    }
    Ok(())
}

/// One gauge family, one sample per label set.
fn gauges<G: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, G)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One unlabelled metric.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> fmt::Result {
    let mut metric: MetricEncoder = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, f64, f64>(&value, None),
        _ => metric.encode_gauge(&value),
    }
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let get = RuleStats::get;
        let routes: Vec<RuleReport> = self.routes.read().map(|r| r.clone()).unwrap_or_default();
        let per_rule = |read: &dyn Fn(&RuleReport) -> u64| -> Vec<(Labels, u64)> {
            routes.iter().map(|r| (rule_label(r), read(r))).collect()
        };
        counters(
            &mut encoder,
            "mlb_messages_received",
            "Messages matched to the rule and buffered.",
            per_rule(&|r| get(&r.stats.queued)),
        )?;
        counters(
            &mut encoder,
            "mlb_messages_delivered",
            "Messages in events Lambda accepted.",
            per_rule(&|r| get(&r.stats.delivered)),
        )?;
        let mut dropped = Vec::new();
        for r in &routes {
            let (s, q) = (&r.stats, r.buffer.counters());
            let throttled = get(&s.throttled_min_interval)
                + get(&s.throttled_unchanged)
                + get(&s.throttled_deadband);
            let reasons = [
                ("drop_oldest", get(&q.dropped_oldest)),
                ("drop_newest", get(&q.dropped_newest)),
                ("expired", get(&q.expired)),
                ("throttled", throttled),
                ("oversize", get(&s.set_aside)),
                ("corrupt", get(&q.lost)),
            ];
            for (reason, value) in reasons {
                dropped.push((with(rule_label(r), "reason", reason), value));
            }
        }
        counters(
            &mut encoder,
            "mlb_messages_dropped",
            "Messages dropped, by reason: buffer full (drop_oldest, drop_newest), older than max_age (expired), rules.throttle (throttled), too large for Lambda (oversize, also dead-lettered), unreadable on disk (corrupt).",
            dropped,
        )?;
        counters(
            &mut encoder,
            "mlb_dead_letters",
            "Messages moved to the dead-letter store.",
            per_rule(&|r| get(&r.stats.dead_lettered)),
        )?;
        let mut invocations = Vec::new();
        for r in &routes {
            let s = &r.stats;
            for (result, counter) in [
                ("ok", &s.invocations),
                ("throttled", &s.attempts_throttled),
                ("error", &s.attempts_error),
                ("dead_lettered", &s.attempts_refused),
            ] {
                invocations.push((with(rule_label(r), "result", result), get(counter)));
            }
        }
        counters(
            &mut encoder,
            "mlb_invocations",
            "Invocation attempts, by result: ok, throttled (retried), error (retried), dead_lettered (the event went to the dead-letter store).",
            invocations,
        )?;
        let mut replies = Vec::new();
        for r in routes.iter().filter(|r| r.replies) {
            let s = &r.stats;
            for (result, counter) in [
                ("published", &s.replies_published),
                ("no_topic", &s.replies_without_topic),
                ("dead_lettered", &s.replies_refused),
            ] {
                replies.push((with(rule_label(r), "result", result), get(counter)));
            }
        }
        if let Some(answers) = self.health.http_answers.snapshot() {
            counters(
                &mut encoder,
                "mlb_http_requests",
                "HTTP ingest requests, by the status answered (202 stored; 0: any other).",
                answers
                    .into_iter()
                    .map(|(status, n)| (vec![("status", status.to_string())], n)),
            )?;
        }
        // Only when a rule replies: the family is noise on every other gateway.
        if !replies.is_empty() {
            counters(
                &mut encoder,
                "mlb_replies",
                "Replies of rules with [rules.reply], by result: published (the broker acknowledged it), no_topic (no Response Topic and no reply.topic), dead_lettered (it could not be published).",
                replies,
            )?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "mlb_invocation_duration_seconds",
                "How long each invocation attempt took.",
                None,
                MetricType::Histogram,
            )?;
            for r in &routes {
                let h = r.stats.invoke_seconds.snapshot();
                family
                    .encode_family(&rule_label(r))?
                    .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
            }
        }
        let stats: Vec<_> = routes.iter().map(|r| (r, r.buffer.stats())).collect();
        gauges(
            &mut encoder,
            "mlb_buffer_messages",
            "Messages buffered and not yet acknowledged by Lambda.",
            stats.iter().map(|(r, s)| (rule_label(r), s.pending)),
        )?;
        gauges(
            &mut encoder,
            "mlb_buffer_bytes",
            "Bytes of the rule's buffer segment files.",
            stats.iter().map(|(r, s)| (rule_label(r), s.bytes)),
        )?;
        let now_ms = now_seconds() * 1000.0;
        gauges(
            &mut encoder,
            "mlb_buffer_oldest_age_seconds",
            "Age of the oldest buffered message (0 when the buffer is empty).",
            stats.iter().map(|(r, s)| {
                let oldest = get(&r.stats.oldest_unacked_ms);
                let age = if s.pending == 0 || oldest == 0 {
                    0.0
                } else {
                    ((now_ms - oldest as f64) / 1000.0).max(0.0)
                };
                (rule_label(r), age)
            }),
        )?;
        gauges(
            &mut encoder,
            "mlb_rule_stalled",
            "1 while the rule delivers nothing: its buffer cannot be read (retried) or its delivery stopped on an error (/readyz says why); else 0.",
            routes
                .iter()
                .map(|r| (rule_label(r), u64::from(r.stats.stalled.is_stalled()))),
        )?;
        single(
            &mut encoder,
            "mlb_mqtt_connected",
            "1 while the connection to the MQTT broker is up, else 0.",
            MetricType::Gauge,
            if self.health.mqtt_connected() {
                1.0
            } else {
                0.0
            },
        )?;
        encode_process(&mut encoder, self.start_time)
    }
}

/// The usual `process_*` metrics, from /proc (each left out when it cannot be read).
fn encode_process(encoder: &mut DescriptorEncoder, start_time: f64) -> fmt::Result {
    let process = ProcessStat::read();
    if let Some(p) = &process {
        single(
            encoder,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            MetricType::Counter,
            p.cpu_seconds,
        )?;
        single(
            encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            MetricType::Gauge,
            p.resident_bytes,
        )?;
        single(
            encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            MetricType::Gauge,
            p.virtual_bytes,
        )?;
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        single(
            encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            MetricType::Gauge,
            fds.count() as f64,
        )?;
    }
    if let Some(max) = max_fds() {
        single(
            encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            MetricType::Gauge,
            max,
        )?;
    }
    single(
        encoder,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        MetricType::Gauge,
        start_time,
    )
}

/// What `/proc/self/stat` says of the process, in base units.
#[derive(Debug, Clone, PartialEq)]
struct ProcessStat {
    cpu_seconds: f64,
    virtual_bytes: f64,
    resident_bytes: f64,
    /// Since boot, in seconds.
    started_after_boot: f64,
}

impl ProcessStat {
    fn read() -> Option<ProcessStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        parse_stat(&text, ticks as f64, page as f64)
    }
}

/// Parses `/proc/<pid>/stat`: fields counted after the command name, which may hold spaces
/// and parentheses, so it is skipped up to its last `)`. Pure.
fn parse_stat(text: &str, ticks_per_second: f64, page_size: f64) -> Option<ProcessStat> {
    if ticks_per_second <= 0.0 || page_size <= 0.0 {
        return None;
    }
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); utime is field 14.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Whole numbers, parsed as such (float parsing is a lot of code to keep resident).
    let field = |n: usize| -> Option<f64> { Some(fields.get(n - 3)?.parse::<u64>().ok()? as f64) };
    Some(ProcessStat {
        cpu_seconds: (field(14)? + field(15)?) / ticks_per_second,
        started_after_boot: field(22)? / ticks_per_second,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
    })
}

/// When the process started, from its start after boot and the boot time in `/proc/stat`.
fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot as f64 + ProcessStat::read()?.started_after_boot)
}

/// The soft limit on open file descriptors.
fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "unlimited" is left out, as the Go client does.
    let max: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(max as f64)
}

/// `mqtt://user:pass@host` → `mqtt://host`: what a URL may show to anyone. Pure.
fn without_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}{}", &url[..scheme_end + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods_are_routed() {
        assert_eq!(route("GET", "/metrics"), Endpoint::Metrics);
        assert_eq!(route("HEAD", "/healthz"), Endpoint::Healthz);
        assert_eq!(route("GET", "/readyz"), Endpoint::Readyz);
        assert_eq!(route("GET", "/"), Endpoint::NotFound);
        assert_eq!(route("GET", "/metrics/"), Endpoint::NotFound);
        assert_eq!(route("POST", "/metrics"), Endpoint::MethodNotAllowed);
        assert_eq!(route("DELETE", "/nope"), Endpoint::NotFound);
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("Application/OpenMetrics-Text")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }

    #[tokio::test]
    async fn not_ready_names_the_broker_then_a_buffer_that_cannot_be_written() {
        use crate::buffer::{DiskQueue, DiskQueueConfig, FaultStorage};

        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let queue = DiskQueue::open_with(
            DiskQueueConfig {
                dir: dir.path().join("temperature"),
                segment_size: crate::buffer::disk::DEFAULT_SEGMENT_SIZE,
                max_size: 1024 * 1024,
                when_full: crate::core::config::WhenFull::DropOldest,
                max_age: None,
            },
            Arc::new(storage.clone()),
        )
        .expect("open");
        let queue = Arc::new(queue);
        let routes = Board::new(std::sync::RwLock::new(vec![RuleReport {
            name: "temperature".into(),
            replies: false,
            stats: Arc::default(),
            buffer: queue.clone(),
        }]));
        let health = Arc::new(Health::new());
        let endpoints =
            Endpoints::new("mqtt://user:secret@broker.lan:1884", routes, health.clone());
        let reason = || endpoints.readiness.not_ready();

        assert_eq!(
            reason().as_deref(),
            Some("not connected to the MQTT broker at mqtt://broker.lan:1884")
        );
        health.set_mqtt_connected(true);
        assert_eq!(reason(), None);

        storage.read_only(true);
        let message = crate::core::envelope::Message::received(
            "t/1".into(),
            b"1".to_vec(),
            1,
            false,
            SystemTime::now(),
        );
        use crate::buffer::Queue;
        assert!(queue.append(vec![message]).await.is_err());
        assert_eq!(
            reason().as_deref(),
            Some(
                "buffer for rule temperature cannot be written: the last write failed (disk full, read-only or I/O error)"
            )
        );
    }

    #[test]
    fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 4 0 \
                    12345 10485760 1900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_stat(stat, 100.0, 4096.0).expect("parses");
        assert_eq!(p.cpu_seconds, 2.0);
        assert_eq!(p.started_after_boot, 123.45);
        assert_eq!(p.virtual_bytes, 10_485_760.0);
        assert_eq!(p.resident_bytes, 1900.0 * 4096.0);
        assert_eq!(parse_stat("garbage", 100.0, 4096.0), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let p = ProcessStat::read().expect("/proc/self/stat");
        assert!(p.resident_bytes > 0.0);
        let start = process_start_time().expect("start time");
        assert!(start > 1.5e9 && start <= now_seconds() + 1.0, "{start}");
        assert!(max_fds().is_some());
    }

    #[test]
    fn a_stalled_rule_is_not_ready_and_its_gauge_is_one() {
        let stats = Arc::new(RuleStats::default());
        let buffer: Arc<dyn crate::core::stats::BufferReport> = Arc::new(Writable::default());
        let routes = Board::new(std::sync::RwLock::new(vec![RuleReport {
            name: "temperature".into(),
            replies: false,
            stats: stats.clone(),
            buffer,
        }]));
        let health = Arc::new(Health::new());
        health.set_mqtt_connected(true);
        let endpoints = Endpoints::new("mqtt://broker.lan:1883", routes, health);
        let gauge = || {
            let text = String::from_utf8_lossy(&endpoints.metrics(false).body).into_owned();
            text.lines()
                .find(|l| l.starts_with("mlb_rule_stalled{rule=\"temperature\"}"))
                .map(str::to_owned)
        };
        assert_eq!(endpoints.readiness.not_ready(), None);
        assert_eq!(
            gauge().as_deref(),
            Some("mlb_rule_stalled{rule=\"temperature\"} 0")
        );
        stats
            .stalled
            .set("cannot read its buffer: Input/output error (os error 5); retrying".into());
        assert_eq!(
            endpoints.readiness.not_ready().as_deref(),
            Some(
                "rule temperature cannot read its buffer: Input/output error (os error 5); retrying"
            )
        );
        assert_eq!(
            gauge().as_deref(),
            Some("mlb_rule_stalled{rule=\"temperature\"} 1")
        );
        stats.stalled.clear();
        assert_eq!(endpoints.readiness.not_ready(), None);
    }

    /// A buffer that is always writable and empty.
    #[derive(Default)]
    struct Writable(crate::core::stats::BufferCounters);

    impl crate::core::stats::BufferReport for Writable {
        fn counters(&self) -> &crate::core::stats::BufferCounters {
            &self.0
        }
        fn stats(&self) -> crate::core::stats::QueueStats {
            crate::core::stats::QueueStats {
                pending: 0,
                bytes: 0,
                segments: 0,
            }
        }
        fn writable(&self) -> bool {
            true
        }
    }
}
