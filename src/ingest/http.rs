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
//! 400  {"error":"..."}   the topic is empty, holds + or # or NUL, starts with $, is not UTF-8 or
//!                        has a bad %-escape; or the body was cut off or malformed
//! 401                    no bearer token, or a wrong one (WWW-Authenticate: Bearer)
//! 404                    no rule matches the topic; or a path other than /topics/<topic>
//! 405                    a method other than POST (Allow: POST)
//! 408                    the body did not arrive within http.read_timeout
//! 413                    the body is larger than http.max_body (by Content-Length, or as read)
//! 503                    not stored within STORE_WAIT (the buffer is full with when_full =
//!                        "block", or the disk is full or failing), the daemon is stopping, or
//!                        too many bodies are held in memory; with Retry-After
//! ```
//!
//! Every answer is one line of JSON. `<topic>` is the rest of the path, %-decoded: its `/` are
//! the topic's levels (`/topics/sensors/dev%201/temp` is `sensors/dev 1/temp`). The message
//! enters as QoS 1, retain false, with a fresh id; the same rules match it as an MQTT message
//! (`routing.rs`: `Routes::admit`, then `Routes::store`, against one snapshot of the rule set
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
//! - At most [`MAX_CONNECTIONS`] connections (so requests) at once; further ones wait in the
//!   kernel's accept backlog.
//! - A request head must fit in [`MAX_HEAD_BYTES`] (431 beyond it) and arrive within
//!   `http.read_timeout`, also between requests on a kept-alive connection (then it is closed);
//!   the body has `http.read_timeout` again (408 after).
//! - Bodies held in memory at once are bounded by [`BODY_MEMORY_BUDGET`] (or `http.max_body`
//!   when larger): a request reserves its Content-Length (or `max_body` when the length is not
//!   declared) before its body is read, and waits for room until its read deadline (503 after).
//! - Storing may take [`STORE_WAIT`]; then 503 with Retry-After, and the request is let go.
//!
//! # Shutdown
//!
//! At the stop signal (before the queues close) the listener stops accepting; requests in
//! flight finish (a store still waiting [`STOP_GRACE`] after the signal is answered 503), idle
//! connections close, and what is left at the shutdown deadline is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::buffer::DiskQueue;
use crate::core::config::{HttpConfig, WhenFull};
use crate::core::shutdown::Shutdown;
use crate::http::BoundedAccept;
use crate::ingest::routes::{Received, RouteTable};
use crate::rule::Route;

/// Connections (and so requests: HTTP/1.1 serves one at a time per connection) served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head: a device's few headers and a long token fit many times over.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in a request head.
const MAX_HEADERS: usize = 32;
/// Largest read buffer of one connection (hyper's minimum is 8 KiB): bounds what a connection
/// holds beyond its body.
const CONNECTION_BUFFER: usize = 64 * 1024;
/// Request bodies held in memory at once, all connections together: 64 bodies of the default
/// `max_body`. Raised to `max_body` when that is larger, so one request always fits.
pub const BODY_MEMORY_BUDGET: u64 = 16 * 1024 * 1024;
/// Longest wait for a message to be stored. A buffer full with `when_full = "block"` or a full
/// disk can last as long as Lambda is down; a device is better told to come back than held.
pub const STORE_WAIT: Duration = Duration::from_secs(10);
/// After the stop signal, time a store still gets before the request is answered 503: a healthy
/// fsync takes milliseconds, so one still waiting is held by a full buffer or a failing disk.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// What a 503 tells the client to wait before trying again, in seconds.
const RETRY_AFTER_SECS: u64 = 5;
/// The path every message is sent to, followed by the topic.
const TOPICS_PREFIX: &str = "/topics/";
/// MQTT's longest topic name.
const MAX_TOPIC_BYTES: usize = u16::MAX as usize;
/// The `WWW-Authenticate` challenge of a 401.
const CHALLENGE: &str = "Bearer realm=\"mqtt-lambda-bridge\"";
/// The same, when a token was given and is wrong (RFC 6750 §3.1).
const CHALLENGE_INVALID: &str = "Bearer realm=\"mqtt-lambda-bridge\", error=\"invalid_token\"";

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

fn file_error(key: &'static str, message: String) -> HttpError {
    HttpError::File { key, message }
}

/// The bearer token; never printed.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

impl Token {
    /// A token from its text (tests, and the file's first line).
    pub fn new(text: &str) -> Token {
        Token(text.as_bytes().to_vec())
    }
}

/// Reads `http.token_file`: its first line, trimmed, which must not be empty.
pub fn read_token(path: &Path) -> Result<Token, HttpError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        file_error(
            "http.token_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(file_error(
            "http.token_file",
            format!(
                "{}: the first line is empty; put the token there (e.g. from `openssl rand -hex 32`)",
                path.display()
            ),
        ));
    }
    Ok(Token::new(token))
}

/// The rustls server configuration for `cert_file` and `key_file` (ring, TLS 1.2 and 1.3),
/// or `None` for plain HTTP. `check` builds it too, so a bad pair fails before the start.
pub fn tls_config(config: &HttpConfig) -> Result<Option<Arc<rustls::ServerConfig>>, HttpError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error("http.cert_file", format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(file_error(
            "http.cert_file",
            format!(
                "{}: no certificate in it; expected PEM with -----BEGIN CERTIFICATE-----",
                cert.display()
            ),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error("http.key_file", format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("http.cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            file_error(
                "http.cert_file",
                format!(
                    "the certificate {} and the key {} cannot be used together: {e}",
                    cert.display(),
                    key.display()
                ),
            )
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(server)))
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
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind {
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
    task: JoinHandle<()>,
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
        health: Arc<crate::core::health::Health>,
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
            task: tokio::spawn(accept(self.listener, self.tls, ingest, stopping)),
        }
    }
}

impl Running {
    /// Once the stop signal fired: waits for the requests in flight until `deadline`, then
    /// drops what is left.
    pub async fn finish(mut self, deadline: Instant) {
        if tokio::time::timeout_at(deadline, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("HTTP ingest requests still open at the shutdown deadline: dropped");
            self.task.abort();
        }
        tracing::info!("HTTP ingest stopped");
    }
}

/// Accepts connections until `stopping`, then waits for the open ones to finish.
async fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ingest: Arc<Ingest>,
    stopping: Shutdown,
) {
    let acceptor = BoundedAccept::new(listener, MAX_CONNECTIONS, "HTTP ingest");
    let mut connections = JoinSet::new();
    while let Some((stream, slot)) = acceptor.next(&stopping).await {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (ingest, tls, stopping) = (ingest.clone(), tls.clone(), stopping.clone());
        connections.spawn(async move {
            connection(stream, tls, ingest, stopping).await;
            drop(slot);
        });
    }
    // No new connections from here on: the port is closed.
    drop(acceptor);
    while connections.join_next().await.is_some() {}
}

/// Serves one connection, over TLS when configured.
async fn connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    ingest: Arc<Ingest>,
    stopping: Shutdown,
) {
    // Answers are small and final: send them without waiting on Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        return serve_connection(TokioIo::new(stream), ingest, stopping).await;
    };
    let handshake = tokio::time::timeout(ingest.settings.read_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(stream)) => stream,
            // The client's problem (wrong CA, plain HTTP to an HTTPS port): not ours to log above debug.
            Ok(Err(err)) => return tracing::debug!(error = %err, "HTTP ingest: TLS handshake failed"),
            Err(_) => return tracing::debug!("HTTP ingest: TLS handshake too slow"),
        },
        _ = stopping.wait() => return,
    };
    serve_connection(TokioIo::new(stream), ingest, stopping).await
}

async fn serve_connection<I>(io: I, ingest: Arc<Ingest>, stopping: Shutdown)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let read_timeout = ingest.settings.read_timeout;
    let service = hyper::service::service_fn(move |request| {
        let ingest = ingest.clone();
        async move {
            let answer = ingest.handle(request).await;
            ingest.health.http_answers.record(answer.status().as_u16());
            Ok::<_, Infallible>(answer)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size(CONNECTION_BUFFER)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = stopping.wait() => {
            // Finish the request in flight, if any, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // Errors are the client's (it went away, was too slow): not ours to log above debug.
    if let Err(err) = ended {
        tracing::debug!(error = %err, "HTTP ingest connection ended");
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
    health: Arc<crate::core::health::Health>,
}

type Answer = Response<Full<Bytes>>;

/// How a store ended.
enum Stored {
    /// In every matching rule's buffer.
    Done,
    /// Not within the store wait.
    TooSlow,
    /// The daemon is stopping.
    Stopping,
}

impl Ingest {
    async fn handle(&self, request: Request<Incoming>) -> Answer {
        let deadline = Instant::now() + self.settings.read_timeout;
        if let Some(token) = &self.settings.token {
            match authorize(request.headers(), token) {
                Auth::Granted => {}
                Auth::Missing => {
                    return closing(with_header(
                        error(
                            StatusCode::UNAUTHORIZED,
                            "a bearer token is required: send Authorization: Bearer <token>",
                        ),
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(CHALLENGE),
                    ));
                }
                Auth::Wrong => {
                    tracing::debug!("HTTP ingest: a request with a wrong token refused");
                    return closing(with_header(
                        error(
                            StatusCode::UNAUTHORIZED,
                            "the bearer token is not the one configured",
                        ),
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(CHALLENGE_INVALID),
                    ));
                }
            }
        }
        let Some(raw_topic) = request.uri().path().strip_prefix(TOPICS_PREFIX) else {
            return closing(error(
                StatusCode::NOT_FOUND,
                "not found: send messages with POST /topics/<topic>",
            ));
        };
        if request.method() != Method::POST {
            return closing(with_header(
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "only POST is served: POST /topics/<topic> with the payload as the body",
                ),
                header::ALLOW,
                HeaderValue::from_static("POST"),
            ));
        }
        let topic = match publish_topic(raw_topic) {
            Ok(topic) => topic,
            Err(why) => return closing(error(StatusCode::BAD_REQUEST, why)),
        };
        let max_body = self.settings.max_body;
        let declared = content_length(request.headers());
        if declared.is_some_and(|n| n > max_body) {
            return closing(too_large(max_body));
        }
        let reserve = declared.unwrap_or(max_body);
        let permits = u32::try_from(reserve).unwrap_or(u32::MAX);
        let held =
            tokio::time::timeout_at(deadline, self.bodies.clone().acquire_many_owned(permits));
        let Ok(Ok(_held)) = held.await else {
            return closing(retry_later(
                "too many messages are being received at once; retry later".into(),
            ));
        };
        // Room for a declared length at once; an undeclared one grows as it comes.
        let hint = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0));
        let payload = match read_body(request.into_body(), max_body, hint, deadline).await {
            Ok(payload) => payload,
            Err(BodyError::TooLarge) => return closing(too_large(max_body)),
            Err(BodyError::Slow) => {
                return closing(error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the body did not arrive within {} (http.read_timeout)",
                        humantime::format_duration(self.settings.read_timeout)
                    ),
                ));
            }
            Err(BodyError::Broken(err)) => {
                return closing(error(
                    StatusCode::BAD_REQUEST,
                    format!("the body was cut off or malformed: {err}"),
                ));
            }
        };
        self.store(topic, payload).await
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
        let mut id = None;
        let mut matched: Vec<usize> = Vec::new();
        for (i, messages) in admission.append.iter().enumerate() {
            if let Some(message) = messages.first() {
                id = Some(message.id);
                matched.push(i);
            }
        }
        let mut set_aside: Vec<usize> = Vec::new();
        for (i, message, _) in &admission.set_aside {
            id = Some(message.id);
            set_aside.push(*i);
        }
        let Some(id) = id else {
            tracing::debug!(topic = %topic, "HTTP ingest: no rule matches; refused");
            return error(
                StatusCode::NOT_FOUND,
                format!("no rule matches the topic {topic:?}: nothing stored"),
            );
        };
        let name = |i: &usize| {
            routes
                .get(*i)
                .map(|r| r.plan.name.clone())
                .unwrap_or_default()
        };
        let mut all: Vec<usize> = matched.iter().chain(&set_aside).copied().collect();
        all.sort_unstable();
        let stopping = self.stopping.clone();
        let stored = tokio::select! {
            stored = snapshot.store(admission, &self.stopping) => {
                if stored.is_done() { Stored::Done } else { Stored::Stopping }
            }
            _ = tokio::time::sleep(self.settings.store_wait) => Stored::TooSlow,
            _ = async move {
                stopping.wait().await;
                tokio::time::sleep(STOP_GRACE).await;
            } => Stored::Stopping,
        };
        match stored {
            Stored::Done => {
                let rules: Vec<String> = all.iter().map(name).collect();
                tracing::debug!(topic = %topic, id = %id, rules = %rules.join(","), "HTTP message buffered");
                let mut body = serde_json::Map::new();
                body.insert("id".into(), id.hyphenated().to_string().into());
                body.insert("rules".into(), rules.into());
                if !set_aside.is_empty() {
                    let names: Vec<String> = set_aside.iter().map(name).collect();
                    body.insert("set_aside".into(), names.into());
                }
                json(StatusCode::ACCEPTED, &serde_json::Value::Object(body))
            }
            Stored::Stopping => closing(retry_later("the bridge is stopping; retry later".into())),
            Stored::TooSlow => {
                let stuck: Vec<_> = all.iter().filter_map(|i| routes.get(*i).copied()).collect();
                let why = self.unstored_reason(&stuck);
                tracing::warn!(topic = %topic, reason = %why, "HTTP message refused with 503");
                closing(retry_later(why))
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

/// Whether a request carries the token. The comparison takes the same time whatever the bytes
/// (only the length may show), so a client cannot find the token byte by byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    Granted,
    Missing,
    Wrong,
}

fn authorize(headers: &HeaderMap, token: &Token) -> Auth {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Auth::Missing;
    };
    let value = value.as_bytes().trim_ascii();
    let Some(space) = value.iter().position(|b| *b == b' ') else {
        return Auth::Wrong;
    };
    let (scheme, given) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Auth::Wrong;
    }
    if bool::from(given.trim_ascii().ct_eq(&token.0)) {
        Auth::Granted
    } else {
        Auth::Wrong
    }
}

/// The topic a path names (the part after `/topics/`), %-decoded and checked as MQTT checks a
/// topic to publish to. Pure.
pub fn publish_topic(raw: &str) -> Result<String, String> {
    let bytes = percent_decode(raw)?;
    let topic =
        String::from_utf8(bytes).map_err(|_| "the topic is not UTF-8 once %-decoded".to_owned())?;
    if topic.is_empty() {
        return Err(
            "the topic is empty: POST /topics/<topic>, e.g. /topics/sensors/dev1/temperature"
                .into(),
        );
    }
    if topic.contains(['+', '#']) {
        return Err(format!(
            "the topic {topic:?} holds a wildcard (+ or #): a message is published to one concrete topic"
        ));
    }
    if topic.contains('\0') {
        return Err("the topic contains a NUL character".into());
    }
    if topic.starts_with('$') {
        return Err(format!(
            "the topic {topic:?} starts with $: such topics belong to the broker"
        ));
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err("the topic is longer than MQTT allows (65535 bytes)".into());
    }
    Ok(topic)
}

/// `%XX` escapes to bytes; anything else is kept as is. Pure.
fn percent_decode(text: &str) -> Result<Vec<u8>, String> {
    let hex = |c: u8| char::from(c).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = bytes.get(i + 1).copied().and_then(hex);
            let low = bytes.get(i + 2).copied().and_then(hex);
            let (Some(high), Some(low)) = (high, low) else {
                return Err(format!(
                    "the topic has a bad %-escape at byte {i}: write % as %25"
                ));
            };
            // Two hex digits make at most 255.
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// The declared body length, when there is a valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why a body was not read whole.
#[derive(Debug)]
enum BodyError {
    /// Over `max_body`.
    TooLarge,
    /// Not within the read deadline.
    Slow,
    /// The client went away mid-body, or sent a malformed chunk.
    Broken(hyper::Error),
}

/// Reads the whole body, at most `max` bytes, before `deadline`.
async fn read_body(
    mut body: Incoming,
    max: u64,
    hint: usize,
    deadline: Instant,
) -> Result<Vec<u8>, BodyError> {
    let mut payload = Vec::with_capacity(hint);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Slow),
            Ok(None) => return Ok(payload),
            Ok(Some(Err(err))) => return Err(BodyError::Broken(err)),
            Ok(Some(Ok(frame))) => frame,
        };
        // Trailers carry nothing we keep.
        if let Ok(data) = frame.into_data() {
            if payload.len() as u64 + data.len() as u64 > max {
                return Err(BodyError::TooLarge);
            }
            payload.extend_from_slice(&data);
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Answer {
    let mut text = value.to_string();
    text.push('\n');
    let mut answer = Response::new(Full::new(Bytes::from(text)));
    *answer.status_mut() = status;
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn with_header(mut answer: Answer, name: header::HeaderName, value: HeaderValue) -> Answer {
    answer.headers_mut().insert(name, value);
    answer
}

/// The answer, then the connection closes: its body may be unread, so it cannot be reused.
fn closing(answer: Answer) -> Answer {
    with_header(
        answer,
        header::CONNECTION,
        HeaderValue::from_static("close"),
    )
}

fn too_large(max_body: u64) -> Answer {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body is larger than http.max_body ({max_body} bytes)"),
    )
}

fn retry_later(why: String) -> Answer {
    with_header(
        error(StatusCode::SERVICE_UNAVAILABLE, why),
        header::RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER_SECS),
    )
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_topic_is_percent_decoded_and_checked_as_a_publish_topic() {
        assert_eq!(publish_topic("sensors/dev1/t"), Ok("sensors/dev1/t".into()));
        assert_eq!(
            publish_topic("sensors/dev%201%2Ft"),
            Ok("sensors/dev 1/t".into())
        );
        assert_eq!(publish_topic("caf%C3%A9"), Ok("café".into()));
        assert_eq!(
            publish_topic("a//b/"),
            Ok("a//b/".into()),
            "empty levels are levels"
        );
        for (raw, says) in [
            ("", "empty"),
            ("a/+/b", "wildcard"),
            ("a/%23", "wildcard"),
            ("a%00b", "NUL"),
            ("$SYS/x", "starts with $"),
            ("%24SYS/x", "starts with $"),
            ("a%2", "%-escape"),
            ("a%zz", "%-escape"),
            ("a%+1", "%-escape"),
            ("%FF", "not UTF-8"),
        ] {
            let err = publish_topic(raw).expect_err(raw);
            assert!(err.contains(says), "{raw}: {err}");
        }
        assert!(publish_topic(&"a".repeat(65_536)).is_err());
    }

    #[test]
    fn the_bearer_token_is_required_and_compared_whole() {
        let token = Token::new("s3cret");
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("header"),
            );
            authorize(&headers, &token)
        };
        assert_eq!(authorize(&HeaderMap::new(), &token), Auth::Missing);
        assert_eq!(with("Bearer s3cret"), Auth::Granted);
        assert_eq!(with("bearer  s3cret "), Auth::Granted);
        assert_eq!(with("Bearer s3cre"), Auth::Wrong);
        assert_eq!(with("Bearer s3cret2"), Auth::Wrong);
        assert_eq!(with("Basic s3cret"), Auth::Wrong);
        assert_eq!(with("s3cret"), Auth::Wrong);
        assert_eq!(format!("{token:?}"), "Token(***)");
    }

    #[test]
    fn the_token_is_the_first_line_of_its_file_trimmed_and_not_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc \nignored\n").expect("write");
        assert_eq!(read_token(&path).expect("token").0, b"abc");
        std::fs::write(&path, "\nabc\n").expect("write");
        let err = read_token(&path).expect_err("empty first line").to_string();
        assert!(err.starts_with("http.token_file: "), "{err}");
        assert!(err.contains("first line is empty"), "{err}");
        let err = read_token(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

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
    async fn a_full_blocking_buffer_is_answered_503_after_the_store_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Room for one message of 300 bytes, not two; nothing is ever delivered.
        let (table, _queue) = table(dir.path(), WhenFull::Block, 600, FaultStorage::new());
        let listener = listener(WhenFull::Block, Duration::from_millis(300)).await;
        let addr = listener.local_addr();
        let (_stop, stopping) = crate::core::shutdown::channel();
        let _running = listener.serve(
            table,
            Arc::new(crate::core::health::Health::new()),
            stopping,
        );
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
