//! The one HTTP/1.1 server of the daemon (hyper), shared by HTTP ingest and the metrics
//! listener: it owns the listening socket, the connections and their limits, and knows nothing
//! of paths. What a request means is a [`Handler`]'s business (`ops::metrics` routes
//! `/metrics`, `/healthz`, `/readyz`; `ingest::http` routes `POST /topics/<topic>`).
//!
//! # Limits
//!
//! A gateway's ports must not let one client take the daemon's memory or sockets. Each server
//! is given its [`Limits`]:
//!
//! - At most `max_connections` connections are served at once; further ones wait in the
//!   kernel's accept backlog until one ends.
//! - A request head must fit in `max_head_bytes` and [`MAX_HEADERS`] headers (hyper answers
//!   431 beyond) and arrive within `header_read_timeout`, also between requests on a
//!   kept-alive connection; a client that trickles bytes or sends nothing is disconnected.
//! - A write of the response may stall at most `write_timeout`: a client that does not read
//!   is disconnected too.
//! - A TLS handshake, when the server has TLS, must end within `header_read_timeout`.
//!
//! Bodies are the handler's: it reads them (or not) with its own limits.
//!
//! # Stopping
//!
//! At the stop signal the listener stops accepting and closes its port; idle connections and
//! ones still sending a head close, requests in flight are answered, then their connections
//! close. [`Server::finish`] waits for that until a deadline and then drops what is left.
//!
//! The metrics endpoints are served by [`small`], a one-request-per-connection listener that
//! keeps hyper's server code out of memory on gateways without HTTP ingest (its head says by
//! how much).

pub mod small;
mod timed_write;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::core::shutdown::Shutdown;
use timed_write::TimedWrite;

/// A request as a handler gets it: the head parsed, the body still to be read.
pub type Request = hyper::Request<hyper::body::Incoming>;
/// A response: the whole body at once (every answer of the daemon is small).
pub type Answer = hyper::Response<Full<Bytes>>;

/// Most headers in a request head: plenty for a scraper's or a device's few.
pub const MAX_HEADERS: usize = 32;
/// How long to wait after a failed accept (out of file descriptors, most likely).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// hyper's smallest read buffer; a smaller one would make it panic.
const MIN_READ_BUFFER: usize = 8 * 1024;

/// Answers requests; one per server, shared by its connections.
pub trait Handler: Send + Sync + 'static {
    /// The response to `request`.
    fn handle(&self, request: Request) -> impl Future<Output = Answer> + Send;
}

/// What one server holds its clients to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Names the server in its log lines ("HTTP ingest", "metrics listener").
    pub name: &'static str,
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest wait for a whole request head (and for a TLS handshake).
    pub header_read_timeout: Duration,
    /// Largest request head.
    pub max_head_bytes: usize,
    /// Largest read buffer of one connection: bounds what a connection holds beyond the body
    /// its handler reads. At least 8 KiB.
    pub read_buffer: usize,
    /// Longest time a write of the response may stall.
    pub write_timeout: Duration,
    /// Whether a connection may serve more than one request; without, each answer closes it.
    pub keep_alive: bool,
    /// Whether answers carry a `Date` header. Off, rendering it is hyper code a scrape does not
    /// touch (what it saves in idle RSS was lost in the noise of fault-around: at most 0.1 MiB).
    pub date_header: bool,
}

/// Binds the listening socket (before anything is served, so a bad address fails the start).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A response with a status, a content type and a body.
pub fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut answer = hyper::Response::new(Full::new(body.into()));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    answer
}

/// A plain-text response: `text` and a newline.
pub fn text(status: StatusCode, text: &str) -> Answer {
    answer(status, "text/plain; charset=utf-8", format!("{text}\n"))
}

/// The same response with one more header (replacing one of that name).
pub fn with_header(mut answer: Answer, name: header::HeaderName, value: HeaderValue) -> Answer {
    answer.headers_mut().insert(name, value);
    answer
}

/// A server running in its own task.
#[derive(Debug)]
pub struct Server {
    task: JoinHandle<()>,
}

/// Serves `listener` with `handler` (over TLS when `tls` is given) until `stopping`.
pub fn spawn<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    stopping: Shutdown,
) -> Server {
    let task = tokio::spawn(accept(listener, handler, limits, tls, stopping));
    Server { task }
}

impl Server {
    /// Once the stop signal fired: waits for the requests in flight until `deadline`, then
    /// drops what is left, and returns once the port is closed. False when something had to
    /// be dropped.
    pub async fn finish(mut self, deadline: Instant) -> bool {
        if tokio::time::timeout_at(deadline, &mut self.task)
            .await
            .is_ok()
        {
            return true;
        }
        self.task.abort();
        // Once the aborted task is dropped the port is closed: the caller may bind it again.
        let _ = self.task.await;
        false
    }
}

/// Accepts connections until `stopping`, at most `limits.max_connections` at once, then waits
/// for the open ones to finish.
async fn accept<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    stopping: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        // A slot first, then accept: past the limit, clients wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopping.wait() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, most likely: wait a little rather than spin.
                tracing::warn!(error = %err, "{} cannot accept a connection", limits.name);
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (handler, tls, stopping) = (handler.clone(), tls.clone(), stopping.clone());
        connections.spawn(async move {
            connection(stream, tls, handler, limits, stopping).await;
            drop(slot);
        });
    }
    // No new connections from here on: the port is closed.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one connection, over TLS when configured.
async fn connection<H: Handler>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    limits: Limits,
    stopping: Shutdown,
) {
    // Answers are small and final: send them without waiting on Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = tls else {
        return serve_connection(stream, handler, limits, stopping).await;
    };
    let handshake = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
    let name = limits.name;
    let stream = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(stream)) => stream,
            // The client's problem (wrong CA, plain HTTP to an HTTPS port): not ours to log above debug.
            Ok(Err(err)) => return tracing::debug!(error = %err, "{name}: TLS handshake failed"),
            Err(_) => return tracing::debug!("{name}: TLS handshake too slow"),
        },
        _ = stopping.wait() => return,
    };
    serve_connection(stream, handler, limits, stopping).await
}

/// Serves the requests of one connection until it closes, or until `stopping` and the request
/// in flight is answered.
async fn serve_connection<S, H>(stream: S, handler: Arc<H>, limits: Limits, stopping: Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let service = hyper::service::service_fn(move |request| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.handle(request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(limits.keep_alive)
        .auto_date_header(limits.date_header)
        .max_buf_size(limits.read_buffer.max(MIN_READ_BUFFER))
        .max_headers(MAX_HEADERS)
        .max_header_size(limits.max_head_bytes);
    let io = TokioIo::new(TimedWrite::new(stream, limits.write_timeout));
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
        tracing::debug!(error = %err, "{} connection ended", limits.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every request with its method and path.
    struct Echo;

    impl Handler for Echo {
        async fn handle(&self, request: Request) -> Answer {
            let said = format!("{} {}", request.method(), request.uri().path());
            text(StatusCode::OK, &said)
        }
    }

    const TEST_LIMITS: Limits = Limits {
        name: "test server",
        max_connections: 2,
        header_read_timeout: Duration::from_millis(400),
        max_head_bytes: 8 * 1024,
        read_buffer: 8 * 1024,
        write_timeout: Duration::from_secs(1),
        keep_alive: false,
        date_header: false,
    };

    async fn start(limits: Limits) -> (SocketAddr, crate::core::shutdown::Trigger, Server) {
        let listener = bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopping) = crate::core::shutdown::channel();
        let server = spawn(listener, Arc::new(Echo), limits, None, stopping);
        (addr, stop, server)
    }

    /// Sends `head` on a fresh connection and reads until the server closes it.
    async fn exchange(addr: SocketAddr, head: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .expect("read");
        String::from_utf8(answer).expect("utf-8")
    }

    #[tokio::test]
    async fn without_keep_alive_each_answer_closes_and_head_has_no_body() {
        let (addr, stop, server) = start(TEST_LIMITS).await;
        let get = exchange(addr, "GET /x?q=1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.contains("connection: close\r\n"), "{get}");
        assert!(!get.contains("date: "), "no Date when not asked for: {get}");
        assert!(get.ends_with("\r\n\r\nGET /x\n"), "{get}");
        let head = exchange(addr, "HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        // What `probe` sends.
        let old = exchange(addr, "GET /readyz HTTP/1.0\r\nHost: a\r\n\r\n").await;
        assert!(old.split(' ').nth(1) == Some("200"), "{old}");
        stop.trigger();
        assert!(server.finish(Instant::now() + Duration::from_secs(5)).await);
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port is closed"
        );
    }

    #[tokio::test]
    async fn oversized_and_malformed_heads_are_refused() {
        let (addr, _stop, _server) = start(TEST_LIMITS).await;
        let padding = "p".repeat(16 * 1024);
        let big = exchange(addr, &format!("GET / HTTP/1.1\r\nX-P: {padding}\r\n\r\n")).await;
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let many = exchange(addr, &format!("GET / HTTP/1.1\r\n{many}\r\n")).await;
        assert!(many.starts_with("HTTP/1.1 431 "), "{many}");
        let bad = exchange(addr, "GET /\0 HTTP/1.1\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    }

    #[tokio::test]
    async fn silent_clients_hold_their_slots_only_until_the_header_read_timeout() {
        let (addr, _stop, _server) = start(TEST_LIMITS).await;
        let started = std::time::Instant::now();
        // Both slots taken by clients that send nothing.
        let _silent = (
            TcpStream::connect(addr).await.expect("connect"),
            TcpStream::connect(addr).await.expect("connect"),
        );
        let answer = exchange(addr, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        // Served once a silent one was hung up on, not before.
        assert!(started.elapsed() >= Duration::from_millis(350));
    }
}
