//! The metrics listener's own small HTTP/1.1 server: one request head per connection, parsed
//! with httparse, answered, closed. It owns the listening socket and the connections, and
//! knows nothing of paths: what a request means is a [`Handler`]'s business
//! (`ops::metrics` routes `/metrics`, `/healthz`, `/readyz`).
//!
//! Why a second server beside the hyper one in `mod.rs`: measured with `bench/footprint.sh`'s
//! setup (x86_64, 5 alternating runs), serving the metrics endpoints through hyper's server
//! made idle RSS after a scrape 192 KiB higher (8,116 → 8,308 KiB median) and the binary 13 KiB
//! larger, almost all of it hyper's server code that a scrape keeps resident: on a gateway
//! without HTTP ingest (the common case) that code is otherwise never touched. The daemon's
//! idle budget is 8 MiB, so the metrics endpoints keep this listener.
//!
//! # Protocol
//!
//! ```text
//! client: <METHOD> <target> HTTP/1.x CRLF  headers CRLF CRLF      (parsed by httparse)
//! server: HTTP/1.1 <status> <reason> CRLF
//!         Content-Type, Content-Length, Connection: close, [extra headers] CRLF CRLF
//!         body (none for HEAD)
//! ```
//!
//! One request per connection: the server answers, then closes. Scrapers reconnect each
//! time at no cost worth keeping a connection for, and no idle connection holds a slot. A
//! request with a body is refused (413): none of the endpoints takes one.
//!
//! # Limits
//!
//! A gateway's management port must not let one client take the daemon's memory or sockets:
//!
//! - At most [`MAX_CONNECTIONS`] connections are served at once; further ones wait in the
//!   kernel's accept backlog until one ends.
//! - A request head must fit in [`MAX_HEAD_BYTES`] (431 beyond it) and arrive within
//!   [`HEADER_READ_TIMEOUT`]; a client that trickles bytes or sends nothing is disconnected.
//! - Writing the response may take at most [`WRITE_TIMEOUT`]: a client that does not read
//!   is disconnected too.
//! - No TLS and no authentication: bind it to localhost or a management network.
//!
//! Shutdown stops accepting and drops every connection.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::core::shutdown::Shutdown;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// How long to wait after a failed accept (out of file descriptors, most likely).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Longest wait for a complete request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head: plenty for a scraper's few headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers in a request head.
const MAX_HEADERS: usize = 32;
/// Longest time to write a response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request head, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, content type, body, and any further headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// More headers (name, value).
    pub headers: Vec<(&'static str, &'static str)>,
}

impl Response {
    /// A response with a status, a content type and a body.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// A plain-text response: `text` and a newline.
    pub fn text(status: u16, text: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{text}\n"))
    }

    /// The same response with one more header.
    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Response {
        self.headers.push((name, value));
        self
    }
}

/// Answers requests; one per server, shared by its connections.
pub trait Handler: Send + Sync + 'static {
    /// The response to `request`.
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}

/// Accepts connections on a listener, at most a fixed number open at once: each comes with the
/// permit that holds its place until dropped, and past the limit clients wait in the kernel's
/// backlog.
struct BoundedAccept {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    /// Names the listener in the one log line an accept failure gives.
    what: &'static str,
}

impl BoundedAccept {
    /// At most `max` connections of `listener` at once.
    fn new(listener: TcpListener, max: usize, what: &'static str) -> Self {
        BoundedAccept {
            listener,
            slots: Arc::new(Semaphore::new(max)),
            what,
        }
    }

    /// The next connection and its slot, or `None` once `shutdown` fires.
    async fn next(&self, shutdown: &Shutdown) -> Option<(TcpStream, OwnedSemaphorePermit)> {
        loop {
            // A slot first, then accept: past the limit, clients wait in the backlog.
            let slot = tokio::select! {
                slot = self.slots.clone().acquire_owned() => slot.ok()?,
                _ = shutdown.wait() => return None,
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.wait() => return None,
            };
            match accepted {
                Ok((stream, _)) => return Some((stream, slot)),
                Err(err) => {
                    // Out of file descriptors, most likely: wait a little rather than spin.
                    tracing::warn!(error = %err, "{} cannot accept a connection", self.what);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }
}

/// Serves connections on `listener` with `handler` until `shutdown`, then drops them all.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, shutdown: Shutdown) {
    let acceptor = BoundedAccept::new(listener, MAX_CONNECTIONS, "HTTP listener");
    let mut connections = JoinSet::new();
    while let Some((stream, slot)) = acceptor.next(&shutdown).await {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let handler = handler.clone();
        connections.spawn(async move {
            // Errors are the client's (it went away, was too slow): not ours to log above debug.
            if let Err(err) = connection(stream, &*handler).await {
                tracing::debug!(error = %err, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    connections.abort_all();
}

/// Reads one request head, answers it, closes.
async fn connection<H: Handler>(mut stream: TcpStream, handler: &H) -> io::Result<()> {
    let read = tokio::time::timeout(HEADER_READ_TIMEOUT, read_head(&mut stream)).await;
    let (response, head_only) = match read {
        Err(_) => return Ok(()), // too slow: hang up without a word
        Ok(Err(err)) => return Err(err),
        Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::Refused(response))) => (response, false),
        Ok(Ok(Head::Request(request))) => {
            let head_only = request.method == "HEAD";
            (handler.handle(request).await, head_only)
        }
    };
    let bytes = encode(&response, head_only);
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client did not read"))?
}

/// What reading a request head gave.
#[derive(Debug)]
enum Head {
    /// A request to hand to the handler.
    Request(Request),
    /// A request refused before the handler sees it (too large, malformed, with a body).
    Refused(Response),
    /// The client closed before a whole head.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Some(head) => return Ok(head),
            None if buf.len() >= MAX_HEAD_BYTES => {
                return Ok(Head::Refused(Response::text(431, "request head too large")));
            }
            None => {}
        }
    }
}

/// Parses a request head; `None` while it is incomplete. Pure.
fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => {
            Some(Head::Refused(Response::text(431, "too many headers")))
        }
        Err(_) => Some(Head::Refused(Response::text(400, "malformed request"))),
        Ok(httparse::Status::Complete(_)) => {
            let headers: Vec<(String, String)> = parsed
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).trim().to_owned(),
                    )
                })
                .collect();
            let has_body = headers
                .iter()
                .any(|(n, v)| (n == "content-length" && v != "0") || n == "transfer-encoding");
            if has_body {
                return Some(Head::Refused(Response::text(
                    413,
                    "request bodies are not accepted here",
                )));
            }
            let target = parsed.path.unwrap_or("/");
            let path = target.split('?').next().unwrap_or(target);
            Some(Head::Request(Request {
                method: parsed.method.unwrap_or("").to_owned(),
                path: path.to_owned(),
                headers,
            }))
        }
    }
}

/// The bytes of a response; without the body for HEAD. Pure.
fn encode(response: &Response, head_only: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(response.body.len() + 256);
    let status = response.status;
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(format!("content-type: {}\r\n", response.content_type).as_bytes());
    out.extend_from_slice(format!("content-length: {}\r\n", response.body.len()).as_bytes());
    out.extend_from_slice(b"connection: close\r\n");
    for (name, value) in &response.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &str) -> Option<Head> {
        parse_head(head.as_bytes())
    }

    #[test]
    fn a_head_is_parsed_once_complete_and_the_query_is_dropped() {
        assert!(request("GET /metrics HTTP/1.1\r\nHost: x\r\n").is_none());
        let Some(Head::Request(r)) =
            request("GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n")
        else {
            panic!("a request");
        };
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/metrics"));
        assert_eq!(r.header("accept"), Some("text/plain"));
    }

    #[test]
    fn malformed_heads_and_bodies_are_refused() {
        let status = |head: &str| match request(head) {
            Some(Head::Refused(r)) => r.status,
            other => panic!("{other:?}"),
        };
        assert_eq!(status("GET /\0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status("POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            413
        );
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    #[test]
    fn responses_carry_length_and_close_and_head_has_no_body() {
        let r = Response::text(503, "not ready").with_header("retry-after", "5");
        let text = String::from_utf8(encode(&r, false)).expect("utf-8");
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("content-length: 10\r\n"), "{text}");
        assert!(
            text.contains("connection: close\r\nretry-after: 5\r\n\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nnot ready\n"), "{text}");
        let head = String::from_utf8(encode(&r, true)).expect("utf-8");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}
