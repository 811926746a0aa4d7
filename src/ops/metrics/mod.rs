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
//! mlb_messages_filtered_total{rule}            counter  matched, but the rule's SQL WHERE did
//!                                                       not keep it: acknowledged, not stored
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
//! mlb_buffer_max_bytes{rule}                   gauge    the rule's share of buffer.max_size
//! mlb_buffer_oldest_age_seconds{rule}          gauge    age of the oldest buffered message that
//!                                                       delivery holds (0 when none)
//! mlb_buffer_fsyncs_total{rule}                counter  file fsyncs of the rule's buffer (group
//!                                                       commits, ack file syncs)
//! mlb_rule_stalled{rule}                       gauge    1 while the rule delivers nothing: its
//!                                                       buffer cannot be read (retried) or its
//!                                                       delivery stopped (/readyz says why)
//! mlb_rule_start_time_seconds{rule}           gauge    when the rule's counters began (the start,
//!                                                       or the reload that added the rule)
//! mlb_mqtt_qos0_dropped_total                  counter  QoS 0 messages dropped on arrival: ingest
//!                                                       far behind, reads unable to pause
//! mlb_mqtt_connected                           gauge    1 while the broker connection is up
//! process_resident_memory_bytes, process_virtual_memory_bytes, process_cpu_seconds_total,
//! process_open_fds, process_max_fds, process_start_time_seconds   (Linux, from /proc)
//! ```
//!
//! Invariant: nothing here counts. Every number is read at scrape time from the counters the
//! owning parts keep anyway (`families.rs`; `process.rs` for the `process_*` ones), so a scrape
//! never changes a value and counters only ever grow across scrapes.
//!
//! # Connections
//!
//! Served by the small listener `crate::http::small` (not the hyper server HTTP ingest uses:
//! that one would keep about 190 KiB more resident after a scrape; `small`'s head has the
//! measurement): one request per connection (the answer closes it: scrapers reconnect at no
//! cost worth an idle slot), at most 16 at once, a request head of at most 8 KiB within 5 s, a
//! response write within 10 s. A request with a body is refused (413): no endpoint takes one.
//! No TLS and no authentication: bind it to localhost or a management network. Stopping drops
//! every connection at once.

mod families;
mod process;
pub mod telemetry;

use std::fmt;
use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::core::config::{MetricsConfig, parse_mqtt_url};
use crate::core::health::Health;
use crate::core::shutdown::{self, Shutdown, Trigger};
use crate::core::stats::Board;
use crate::http::small::{self, Request, Response};
use families::{Collected, now_seconds};

/// The Prometheus text format's content type.
const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The OpenMetrics text format's content type.
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What a scraper puts in `Accept` to get OpenMetrics.
const OPENMETRICS_MEDIA_TYPE: &str = "application/openmetrics-text";

pub use small::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_HEAD_BYTES, WRITE_TIMEOUT};

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
            // Scrapes are retried by the scraper: none is worth holding the stop for.
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
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(addr);
    let endpoints = Arc::new(Endpoints::new(broker_url, routes, health));
    let (stop, shutdown): (Trigger, Shutdown) = shutdown::channel();
    let task = tokio::spawn(small::serve(listener, endpoints, shutdown));
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
            start_time: process::start_time().unwrap_or_else(now_seconds),
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

impl small::Handler for Endpoints {
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

/// `mqtt://user:pass@host` → `mqtt://host`: what a URL may show to anyone. Pure.
fn without_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}{}", &url[..scheme_end + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::stats::{RuleReport, RuleStats};
    use std::time::SystemTime;

    /// Sends `head` to a metrics listener with no rules and reads the answer to the close.
    async fn exchange(head: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = MetricsConfig {
            listen: "127.0.0.1:0".into(),
        };
        let health = Arc::new(Health::new());
        let metrics = serve(
            Some(&config),
            "mqtt://broker:1883",
            Board::default(),
            health,
        )
        .await
        .expect("listen");
        let addr = metrics.local_addr().expect("listening");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        metrics.stop().await;
        answer
    }

    #[tokio::test]
    async fn other_methods_are_told_what_is_allowed_and_bodies_are_refused() {
        let post = exchange("POST /metrics HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("allow: GET, HEAD\r\n"), "{post}");
        let body = exchange("GET /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi").await;
        assert!(body.starts_with("HTTP/1.1 413 "), "{body}");
        let open = "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n";
        let open = exchange(open).await;
        assert!(
            open.contains(&format!("content-type: {OPENMETRICS_TEXT}\r\n")),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
        let ready = exchange("GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
        assert!(
            ready.ends_with("\r\n\r\nnot connected to the MQTT broker at mqtt://broker:1883\n"),
            "{ready}"
        );
    }

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
                max_ack_delay: std::time::Duration::ZERO,
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

    #[test]
    fn each_rule_says_when_its_counters_began() {
        let stats = RuleStats {
            since: crate::core::stats::Since(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_000_500),
            ),
            ..RuleStats::default()
        };
        let buffer: Arc<dyn crate::core::stats::BufferReport> = Arc::new(Writable::default());
        let routes = Board::new(std::sync::RwLock::new(vec![RuleReport {
            name: "added-by-reload".into(),
            replies: false,
            stats: Arc::new(stats),
            buffer,
        }]));
        let endpoints = Endpoints::new("mqtt://broker.lan:1883", routes, Arc::new(Health::new()));
        let text = String::from_utf8_lossy(&endpoints.metrics(false).body).into_owned();
        assert!(
            text.lines()
                .any(|l| l == "mlb_rule_start_time_seconds{rule=\"added-by-reload\"} 1000.5"),
            "{text}"
        );
    }

    /// A buffer that is always writable and empty.
    #[derive(Default)]
    pub(super) struct Writable(pub(super) crate::core::stats::BufferCounters);

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
        fn max_bytes(&self) -> u64 {
            64 * 1024
        }
    }

    #[test]
    fn qos0_messages_dropped_by_the_connection_are_counted() {
        let routes = Board::new(std::sync::RwLock::new(Vec::new()));
        let health = Arc::new(Health::new());
        let endpoints = Endpoints::new("mqtt://broker.lan:1883", routes, health.clone());
        let line = || {
            let text = String::from_utf8_lossy(&endpoints.metrics(false).body).into_owned();
            text.lines()
                .find(|l| l.starts_with("mlb_mqtt_qos0_dropped"))
                .map(str::to_owned)
        };
        assert_eq!(line().as_deref(), Some("mlb_mqtt_qos0_dropped_total 0.0"));
        health.count_qos0_dropped();
        health.count_qos0_dropped();
        assert_eq!(line().as_deref(), Some("mlb_mqtt_qos0_dropped_total 2.0"));
    }
}
