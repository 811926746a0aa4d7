//! HTTP ingest (`[http]`): devices that cannot speak MQTT POST a message, and it enters the same
//! rules and the same durable buffer as an MQTT message published on that topic.
//!
//! # API
//!
//! ```text
//! POST /topics/<topic>      body: the payload, as is (any bytes, at most http.max_body)
//!      Authorization: Bearer <token>            required when http.token_file is set
//!
//! 202  {"id":"<uuid>","rules":["a","b"]}        stored (fsync'd) in every matching rule's buffer;
//!      [,"set_aside":["b"]]                     rules whose event would exceed Lambda's limit:
//!                                               in their dead-letter store, never invoked
//!      [,"filtered":["c"]]                      rules whose SQL WHERE did not keep it: not
//!                                               stored for them ("rules" may then be empty)
//! 400  {"error":"..."}   the topic is empty, holds + or # or NUL, starts with $, is not UTF-8 or
//!                        has a bad %-escape; or the body was cut off or malformed
//! 401                    no bearer token, or a wrong one (WWW-Authenticate: Bearer)
//! 404                    no rule matches the topic; or a path other than /topics/<topic>
//! 405                    a method other than POST (Allow: POST)
//! 408                    the body did not arrive within http.read_timeout
//! 413                    the body is larger than http.max_body (by Content-Length, or as read)
//! 503                    a matching rule's full buffer dropped it (when_full = "drop_newest";
//!                        the answer names the rule), not stored within STORE_WAIT (the buffer
//!                        is full with when_full = "block", or the disk is full or failing),
//!                        the daemon is stopping, or too many bodies are held in memory; with
//!                        Retry-After. 202 is never given for a message a policy dropped.
//! ```
//!
//! Every answer is one line of JSON (`answer.rs`); the checks of a request are `request.rs`. `<topic>` is the rest of the path, %-decoded: its `/` are
//! the topic's levels (`/topics/sensors/dev%201/temp` is `sensors/dev 1/temp`). The message
//! enters as QoS 1, retain false, with a fresh id; the same rules match it as an MQTT message
//! (`routes.rs`: `Routes::admit`, then `Routes::store`, against one snapshot of the rule set
//! in force, so a reload's new rules apply at once).
//!
//! # What 202 promises
//!
//! The answer is sent only once the message is fsync'd in every matching rule's buffer (or, for
//! one too large for Lambda, in that rule's dead-letter store): a crash or power cut after the
//! 202 loses nothing, and each matching rule delivers it at least once, as an acknowledged MQTT
//! message. `id` is the message's `id` in the event: the same in every rule's event, in every
//! retry, across restarts. Any other answer, or none (a dropped connection), promises nothing:
//! the message may be stored for some rules or none; sending it again may deliver it twice.
//!
//! # Limits
//!
//! Connections are served by the daemon's one HTTP server (`crate::http`), with these limits:
//!
//! - At most [`MAX_CONNECTIONS`] connections (so requests) at once; further ones wait in the
//!   kernel's accept backlog.
//! - A request head must fit in [`MAX_HEAD_BYTES`] (431 beyond it) and arrive within
//!   `http.read_timeout`, also between requests on a kept-alive connection (then it is closed);
//!   the body has `http.read_timeout` again (408 after). A TLS handshake has
//!   `http.read_timeout` too.
//! - A write of the answer may stall at most [`WRITE_TIMEOUT`]: a client that does not read
//!   it is disconnected.
//! - Bodies held in memory at once are bounded by [`BODY_MEMORY_BUDGET`] (or `http.max_body`
//!   when larger): a request reserves its Content-Length (or `max_body` when the length is not
//!   declared) before its body is read, and waits for room until its read deadline (503 after).
//! - Storing may take [`STORE_WAIT`]; then 503 with Retry-After, and the request is let go.
//!
//! # Shutdown
//!
//! At the stop signal (before the queues close) the listener stops accepting; requests in
//! flight finish (a store still waiting half a second after the signal gives up, as every
//! store does at shutdown in `routes.rs`, and is answered 503), idle connections close, and
//! what is left at the shutdown deadline is dropped.

mod answer;
mod files;
mod request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::Method;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use uuid::Uuid;

use crate::buffer::DiskQueue;
use crate::core::config::{HttpConfig, WhenFull};
use crate::core::health::Health;
use crate::core::shutdown::Shutdown;
use crate::http::{self, Answer, Limits};
use crate::ingest::routes::{Admission, Received, RouteTable, StoreOutcome};
use crate::rule::Route;
use request::TOPICS_PREFIX;

pub use files::{Token, read_token, tls_config};
pub use request::publish_topic;

/// Connections (and so requests: HTTP/1.1 serves one at a time per connection) served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head: a device's few headers and a long token fit many times over.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest read buffer of one connection (hyper's minimum is 8 KiB): bounds what a connection
/// holds beyond its body.
const CONNECTION_BUFFER: usize = 64 * 1024;
/// Longest time a write of an answer may stall (answers are a line of JSON: only a client
/// that reads nothing stalls one).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bodies held in memory at once, all connections together: 64 bodies of the default
/// `max_body`. Raised to `max_body` when that is larger, so one request always fits.
pub const BODY_MEMORY_BUDGET: u64 = 16 * 1024 * 1024;
/// Longest wait for a message to be stored. A buffer full with `when_full = "block"` or a full
/// disk can last as long as Lambda is down; a device is better told to come back than held.
pub const STORE_WAIT: Duration = Duration::from_secs(10);

/// Why HTTP ingest cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address could not be bound (in use, not an address of this host, a privileged port).
    #[error("http.listen {addr}: cannot listen there: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The address is not an IP address and port (validation should have said so).
    #[error("http.listen: {0}")]
    Address(String),
    /// A file named in `[http]` cannot be read or used.
    #[error("{key}: {message}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// What is wrong, naming the file.
        message: String,
    },
}

/// The bound listener with what it needs to serve, before the rules exist.
pub struct Listener {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    settings: Settings,
}

/// What requests are held to; fixed until a restart.
#[derive(Debug, Clone)]
struct Settings {
    /// Required bearer token, if any.
    token: Option<Token>,
    /// Largest body.
    max_body: u64,
    /// For the head, and again for the body.
    read_timeout: Duration,
    /// Longest wait for a store.
    store_wait: Duration,
    /// Worded into a 503 when a store takes too long.
    when_full: WhenFull,
}

/// Binds `http.listen` and reads the token and TLS files: a bad address or file fails the start
/// before anything is served. `None` when `http.listen` is absent.
pub async fn bind(config: &HttpConfig, when_full: WhenFull) -> Result<Option<Listener>, HttpError> {
    let Some(addr) = config.listen_addr() else {
        return Ok(None);
    };
    let addr = addr.map_err(HttpError::Address)?;
    let token = config.token_file.as_deref().map(read_token).transpose()?;
    let tls = tls_config(config)?.map(TlsAcceptor::from);
    let listener = http::bind(addr).await.map_err(|source| HttpError::Bind {
        addr: config.listen.clone().unwrap_or_default(),
        source,
    })?;
    let addr = listener.local_addr().unwrap_or(addr);
    if token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(listen = %addr, "HTTP ingest listens beyond this host without http.token_file: anyone who reaches the port can send messages to every rule");
    }
    Ok(Some(Listener {
        listener,
        addr,
        tls,
        settings: Settings {
            token,
            max_body: config.max_body.0,
            read_timeout: config.read_timeout.0,
            store_wait: STORE_WAIT,
            when_full,
        },
    }))
}

/// HTTP ingest, serving.
pub struct Running {
    server: http::Server,
    /// What the requests share, for tests to look into.
    #[cfg(test)]
    ingest: Arc<Ingest>,
}

impl Listener {
    /// The address it listens on (the port chosen when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stopping`: messages are matched against, and stored with, the rule set
    /// `table` has in force at each request.
    pub fn serve(
        self,
        table: RouteTable<DiskQueue>,
        health: Arc<Health>,
        stopping: Shutdown,
    ) -> Running {
        health.http_answers.set_serving();
        tracing::info!(
            listen = %self.addr,
            tls = self.tls.is_some(),
            token = self.settings.token.is_some(),
            max_body = self.settings.max_body,
            "HTTP ingest listening: POST /topics/<topic>"
        );
        let limits = Limits {
            name: "HTTP ingest",
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: self.settings.read_timeout,
            max_head_bytes: MAX_HEAD_BYTES,
            read_buffer: CONNECTION_BUFFER,
            write_timeout: WRITE_TIMEOUT,
            keep_alive: true,
            date_header: true,
        };
        let budget = BODY_MEMORY_BUDGET.max(self.settings.max_body);
        let ingest = Arc::new(Ingest {
            table,
            bodies: Arc::new(Semaphore::new(
                usize::try_from(budget).unwrap_or(Semaphore::MAX_PERMITS),
            )),
            settings: self.settings,
            stopping: stopping.clone(),
            health,
        });
        Running {
            #[cfg(test)]
            ingest: ingest.clone(),
            server: http::spawn(self.listener, ingest, limits, self.tls, stopping),
        }
    }
}

impl Running {
    /// Once the stop signal fired: waits for the requests in flight until `deadline`, then
    /// drops what is left.
    pub async fn finish(self, deadline: Instant) {
        if !self.server.finish(deadline).await {
            tracing::warn!("HTTP ingest requests still open at the shutdown deadline: dropped");
        }
        tracing::info!("HTTP ingest stopped");
    }
}

/// What every request shares.
struct Ingest {
    table: RouteTable<DiskQueue>,
    settings: Settings,
    /// Bytes of request bodies that may be held at once.
    bodies: Arc<Semaphore>,
    stopping: Shutdown,
    /// Where answers are counted, by status.
    health: Arc<Health>,
}

/// How a store ended.
enum Stored {
    /// In every matching rule's buffer.
    Done,
    /// The buffers of these rules were full and their `when_full = "drop_newest"` dropped the
    /// message (the other matching rules stored it).
    Dropped(Vec<String>),
    /// Not within the store wait.
    TooSlow,
    /// The daemon is stopping.
    Stopping,
}

/// Where an admitted message goes: its id, and the rules (indices in the snapshot) that store
/// it, of which some set it aside as too large for Lambda.
struct Destinations {
    id: Uuid,
    /// Every rule it went to, in rule order.
    all: Vec<usize>,
    set_aside: Vec<usize>,
    /// Rules it matched whose SQL WHERE did not keep it (nothing stored for them).
    filtered: Vec<usize>,
}

impl Destinations {
    /// `None` when no rule matched.
    fn of(admission: &Admission) -> Option<Destinations> {
        let mut id = None;
        let mut all: Vec<usize> = Vec::new();
        for (i, messages) in admission.append.iter().enumerate() {
            if let Some(message) = messages.first() {
                id = Some(message.id);
                all.push(i);
            }
        }
        let mut set_aside: Vec<usize> = Vec::new();
        for (i, message, _) in &admission.set_aside {
            id = Some(message.id);
            set_aside.push(*i);
        }
        all.extend(&set_aside);
        all.sort_unstable();
        let mut filtered: Vec<usize> = Vec::new();
        for (i, filtered_id, _) in &admission.filtered {
            id = Some(*filtered_id);
            filtered.push(*i);
        }
        Some(Destinations {
            id: id?,
            all,
            set_aside,
            filtered,
        })
    }
}

impl http::Handler for Ingest {
    async fn handle(&self, request: http::Request) -> Answer {
        let answer = self.answer(request).await;
        self.health.http_answers.record(answer.status().as_u16());
        answer
    }
}

impl Ingest {
    async fn answer(&self, request: http::Request) -> Answer {
        let deadline = Instant::now() + self.settings.read_timeout;
        if let Some(token) = &self.settings.token
            && let Some(refused) =
                answer::unauthorized(request::authorize(request.headers(), token))
        {
            return refused;
        }
        let Some(raw_topic) = request.uri().path().strip_prefix(TOPICS_PREFIX) else {
            return answer::not_found();
        };
        if request.method() != Method::POST {
            return answer::post_only();
        }
        let topic = match publish_topic(raw_topic) {
            Ok(topic) => topic,
            Err(why) => return answer::error(hyper::StatusCode::BAD_REQUEST, why),
        };
        match self.receive(request, deadline).await {
            // The body's share of the memory budget is held until the message is stored.
            Ok((payload, _held)) => self.store(topic, payload).await,
            Err(refused) => refused,
        }
    }

    /// Reads the body within `max_body`, the memory budget, and `deadline`: the body, and its
    /// share of the budget, to hold as long as the body is.
    async fn receive(
        &self,
        request: http::Request,
        deadline: Instant,
    ) -> Result<(Vec<u8>, OwnedSemaphorePermit), Answer> {
        let max_body = self.settings.max_body;
        let declared = request::content_length(request.headers());
        if declared.is_some_and(|n| n > max_body) {
            return Err(answer::too_large(max_body));
        }
        let reserve = declared.unwrap_or(max_body);
        let permits = u32::try_from(reserve).unwrap_or(u32::MAX);
        let held =
            tokio::time::timeout_at(deadline, self.bodies.clone().acquire_many_owned(permits));
        let Ok(Ok(held)) = held.await else {
            return Err(answer::retry_later(
                "too many messages are being received at once; retry later".into(),
            ));
        };
        // Room for a declared length at once; an undeclared one grows as it comes.
        let hint = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0));
        match request::read_body(request.into_body(), max_body, hint, deadline).await {
            Ok(payload) => Ok((payload, held)),
            Err(why) => Err(answer::body_failed(
                why,
                max_body,
                self.settings.read_timeout,
            )),
        }
    }

    /// Matches and stores one message; answers once it is durable, or why it is not.
    async fn store(&self, topic: String, payload: Vec<u8>) -> Answer {
        // Held until stored, so a reload that removes a matched rule drains it only after.
        let snapshot = self.table.snapshot();
        let received = Received {
            topic: topic.clone(),
            payload,
            qos: 1,
            retain: false,
            properties: None,
        };
        let admission = snapshot.admit([received], SystemTime::now());
        let routes: Vec<&Arc<Route<DiskQueue>>> = snapshot.iter().collect();
        let Some(to) = Destinations::of(&admission) else {
            tracing::debug!(topic = %topic, "HTTP ingest: no rule matches; refused");
            return answer::no_rule(&topic);
        };
        let names = |indices: &[usize]| -> Vec<String> {
            let name = |i: &usize| routes.get(*i).map(|r| r.plan.name.clone());
            indices.iter().filter_map(name).collect()
        };
        // A store gives up by itself shortly after the stop signal (`Routes::store`).
        let stored = tokio::select! {
            stored = snapshot.store(admission, &self.stopping) => match stored {
                StoreOutcome::Done { dropped } if dropped.is_empty() => Stored::Done,
                StoreOutcome::Done { dropped } => {
                    Stored::Dropped(dropped.into_iter().map(|(rule, _)| rule).collect())
                }
                StoreOutcome::Stopping => Stored::Stopping,
            },
            _ = tokio::time::sleep(self.settings.store_wait) => Stored::TooSlow,
        };
        match stored {
            Stored::Done => {
                let rules = names(&to.all);
                tracing::debug!(topic = %topic, id = %to.id, rules = %rules.join(","), "HTTP message buffered");
                answer::stored(to.id, rules, names(&to.set_aside), names(&to.filtered))
            }
            Stored::Dropped(rules) => {
                let why = answer::dropped_reason(&rules);
                tracing::warn!(topic = %topic, id = %to.id, reason = %why, "HTTP message refused with 503");
                answer::retry_later(why)
            }
            Stored::Stopping => answer::retry_later("the bridge is stopping; retry later".into()),
            Stored::TooSlow => {
                let stuck: Vec<_> = to
                    .all
                    .iter()
                    .filter_map(|i| routes.get(*i).copied())
                    .collect();
                let why = self.unstored_reason(&stuck);
                tracing::warn!(topic = %topic, reason = %why, "HTTP message refused with 503");
                answer::retry_later(why)
            }
        }
    }

    /// Why a store took longer than the store wait, in words for the client.
    fn unstored_reason(&self, routes: &[&Arc<Route<DiskQueue>>]) -> String {
        let within = humantime::format_duration(self.settings.store_wait);
        match routes.iter().find(|r| !r.queue.writable()) {
            Some(route) => format!(
                "not stored within {within}: the buffer of rule {:?} cannot be written (the disk is full or failing); retry later",
                route.plan.name
            ),
            None if self.settings.when_full == WhenFull::Block => format!(
                "not stored within {within}: the buffer is full and buffer.when_full = \"block\" holds new messages back until Lambda takes some; retry later"
            ),
            None => format!("not stored within {within}: the buffer is slow to write; retry later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::deadletter::DeadLetters;
    use crate::buffer::{DiskQueueConfig, FaultStorage, Queue};
    use crate::core::config::Size;
    use crate::core::stats::RuleStats;
    use crate::ingest::routes::Routes;
    use crate::shaping::plan::RulePlan;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// One rule `r` on `a/#` over a disk queue; `storage` lets a test inject faults.
    fn table(
        dir: &Path,
        when_full: WhenFull,
        max_size: u64,
        storage: FaultStorage,
    ) -> (RouteTable<DiskQueue>, Arc<DiskQueue>) {
        let config = DiskQueueConfig {
            dir: dir.join("r"),
            segment_size: crate::buffer::disk::MIN_SEGMENT_SIZE,
            max_size,
            when_full,
            max_age: None,
            max_ack_delay: std::time::Duration::ZERO,
        };
        let queue = Arc::new(DiskQueue::open_with(config, Arc::new(storage)).expect("open queue"));
        let route = Arc::new(Route {
            plan: Arc::new(RulePlan::for_tests("r")),
            filter: "a/#".into(),
            qos: 1,
            queue: queue.clone(),
            stats: Arc::new(RuleStats::default()),
            dead_letters: DeadLetters::new(&dir.join("r")),
        });
        (RouteTable::new(Routes::new(vec![route])), queue)
    }

    /// Serves one rule `r` whose buffer has room for one message of 300 bytes, not two (nothing
    /// is ever delivered), until the returned guards drop.
    async fn serve_a_small_buffer(
        dir: &Path,
        when_full: WhenFull,
        store_wait: Duration,
    ) -> (
        SocketAddr,
        Arc<DiskQueue>,
        (crate::core::shutdown::Trigger, Running),
    ) {
        let (table, queue) = table(dir, when_full, 600, FaultStorage::new());
        let listener = listener(when_full, store_wait).await;
        let addr = listener.local_addr();
        let (stop, stopping) = crate::core::shutdown::channel();
        let running = listener.serve(
            table,
            Arc::new(crate::core::health::Health::new()),
            stopping,
        );
        (addr, queue, (stop, running))
    }

    async fn listener(when_full: WhenFull, store_wait: Duration) -> Listener {
        let config = HttpConfig {
            listen: Some("127.0.0.1:0".into()),
            max_body: Size(1024),
            ..HttpConfig::default()
        };
        let mut listener = bind(&config, when_full)
            .await
            .expect("bind")
            .expect("a listener");
        listener.settings.store_wait = store_wait;
        listener
    }

    /// POSTs `body` to `path` and returns the status and the body of the answer.
    async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn a_message_is_answered_202_with_its_stored_id_and_404_when_no_rule_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (table, queue) = table(dir.path(), WhenFull::Block, 1 << 20, FaultStorage::new());
        let listener = listener(WhenFull::Block, STORE_WAIT).await;
        let addr = listener.local_addr();
        let (stop, stopping) = crate::core::shutdown::channel();
        let health = Arc::new(crate::core::health::Health::new());
        let running = listener.serve(table, health.clone(), stopping);

        let (status, body) = post(addr, "/topics/a/x", r#"{"t":1}"#).await;
        assert_eq!(status, 202, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(answer["rules"], serde_json::json!(["r"]));
        let stored = queue.read_ready(10).await.expect("read");
        assert_eq!(stored.len(), 1);
        let message = &stored[0].message;
        assert_eq!(answer["id"], message.id.hyphenated().to_string());
        assert_eq!(
            (
                message.topic.as_str(),
                message.payload.as_slice(),
                message.qos,
                message.retain
            ),
            ("a/x", br#"{"t":1}"#.as_slice(), 1, false)
        );

        let (status, body) = post(addr, "/topics/b/x", "1").await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("no rule matches"), "{body}");
        // Both answers are counted for metrics, by status.
        let counted = health.http_answers.snapshot().expect("serving");
        assert!(
            counted.contains(&(202, 1)) && counted.contains(&(404, 1)),
            "{counted:?}"
        );
        assert_eq!(queue.read_ready(10).await.expect("read").len(), 0);

        stop.trigger();
        running
            .finish(Instant::now() + Duration::from_secs(5))
            .await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port is closed"
        );
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed_after_the_read_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (table, _queue) = table(dir.path(), WhenFull::Block, 1 << 20, FaultStorage::new());
        let mut listener = listener(WhenFull::Block, STORE_WAIT).await;
        listener.settings.read_timeout = Duration::from_millis(300);
        let addr = listener.local_addr();
        let (_stop, stopping) = crate::core::shutdown::channel();
        let _running = listener.serve(
            table,
            Arc::new(crate::core::health::Health::new()),
            stopping,
        );
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /topics/a/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1")
            .await
            .expect("send");
        let started = std::time::Instant::now();
        let mut answer = String::new();
        // The connection stays open after the 202 (keep-alive) until the idle limit.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
            .await
            .expect("closed by the server")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn a_message_a_full_drop_newest_buffer_drops_is_answered_503_naming_the_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, queue, _serving) =
            serve_a_small_buffer(dir.path(), WhenFull::DropNewest, Duration::from_secs(5)).await;
        let payload = "x".repeat(300);
        assert_eq!(post(addr, "/topics/a/1", &payload).await.0, 202);
        let (status, body) = post(addr, "/topics/a/2", &payload).await;
        assert_eq!(
            status, 503,
            "a dropped message must not be answered 202: {body}"
        );
        assert!(body.contains("rule \\\"r\\\""), "{body}");
        assert!(body.contains("drop_newest"), "{body}");
        // Only the first message is in the buffer: the device knows to retry the second.
        let read = queue.read_ready(10).await.expect("read");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].message.topic, "a/1");
    }

    #[tokio::test]
    async fn a_full_blocking_buffer_is_answered_503_after_the_store_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, _queue, _serving) =
            serve_a_small_buffer(dir.path(), WhenFull::Block, Duration::from_millis(300)).await;
        let payload = "x".repeat(300);
        assert_eq!(post(addr, "/topics/a/1", &payload).await.0, 202);
        let started = std::time::Instant::now();
        let (status, body) = post(addr, "/topics/a/2", &payload).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("when_full = \\\"block\\\""), "{body}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn an_unwritable_buffer_is_answered_503_naming_the_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FaultStorage::new();
        let (table, _queue) = table(dir.path(), WhenFull::DropOldest, 1 << 20, storage.clone());
        let listener = listener(WhenFull::DropOldest, Duration::from_millis(500)).await;
        let addr = listener.local_addr();
        let (_stop, stopping) = crate::core::shutdown::channel();
        let _running = listener.serve(
            table,
            Arc::new(crate::core::health::Health::new()),
            stopping,
        );
        storage.read_only(true);
        let (status, body) = post(addr, "/topics/a/1", "1").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("rule \\\"r\\\" cannot be written"), "{body}");
        storage.read_only(false);
        assert_eq!(post(addr, "/topics/a/1", "1").await.0, 202, "works again");
    }

    #[tokio::test]
    async fn a_store_waiting_at_the_stop_is_answered_503_within_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (table, _queue) = table(dir.path(), WhenFull::Block, 600, FaultStorage::new());
        let listener = listener(WhenFull::Block, STORE_WAIT).await;
        let addr = listener.local_addr();
        let (stop, stopping) = crate::core::shutdown::channel();
        let running = listener.serve(
            table,
            Arc::new(crate::core::health::Health::new()),
            stopping,
        );
        let payload = "x".repeat(300);
        assert_eq!(post(addr, "/topics/a/1", &payload).await.0, 202);
        let waiting = tokio::spawn(async move { post(addr, "/topics/a/2", &payload).await });
        // Once that request holds its body's memory it is past accept: then stop.
        let budget = running.ingest.bodies.available_permits();
        let mut turns = 0;
        while running.ingest.bodies.available_permits() == budget {
            turns += 1;
            assert!(turns < 5000, "the request never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = std::time::Instant::now();
        stop.trigger();
        let (status, body) = waiting.await.expect("join");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("stopping"), "{body}");
        assert!(started.elapsed() < STORE_WAIT);
        running
            .finish(Instant::now() + Duration::from_secs(5))
            .await;
    }
}
