//! A small HTTP/1.1 server for the daemon's own endpoints: it owns the listening socket and
//! the connections, and knows nothing of paths. What a request means is a [`Handler`]'s
//! business (`metrics.rs` routes `/metrics`, `/healthz`, `/readyz`), so another feature can
//! serve its own routes with the same listener code.
//!
//! # Limits
//!
//! A gateway's management port must not let one client take the daemon's memory or sockets:
//!
//! - At most [`MAX_CONNECTIONS`] connections are served at once; further ones wait in the
//!   kernel's accept backlog until one ends.
//! - A request head (request line and headers) must arrive within [`HEADER_READ_TIMEOUT`], and
//!   must fit in [`MAX_HEAD_BYTES`] (hyper answers 431 beyond it); a client that trickles
//!   bytes or sends nothing is disconnected.
//! - A connection lives at most [`CONNECTION_LIFETIME`], keep-alive included: a scraper simply
//!   reconnects, and an idle client cannot hold a slot forever.
//! - No TLS and no authentication: bind it to localhost or a management network.
//!
//! Shutdown stops accepting and drops every connection.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::shutdown::Shutdown;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest wait for a complete request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head; hyper's smallest read buffer, plenty for a scraper's few headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Longest life of one connection, requests and keep-alive together.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// A response body: the whole of it, in memory.
pub type Body = Full<Bytes>;

/// Answers requests; one per server, shared by its connections.
pub trait Handler: Send + Sync + 'static {
    /// The response to `request`.
    fn handle(&self, request: Request<Incoming>) -> impl Future<Output = Response<Body>> + Send;
}

/// A response with a status, a content type and a body.
pub fn response(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// A plain-text response: `text` and a newline.
pub fn text(status: u16, text: &str) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", format!("{text}\n"))
}

/// Binds the listening socket (before anything is served, so a bad address fails the start).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves connections on `listener` with `handler` until `shutdown`, then drops them all.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        // A slot first, then accept: past the limit, clients wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = shutdown.wait() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait() => break,
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, most likely: wait a little rather than spin.
                tracing::warn!(error = %err, "HTTP listener cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(request).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            // Errors are the client's (it went away, sent garbage, was too slow): not ours to log
            // above debug.
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(err)) => tracing::debug!(error = %err, "HTTP connection ended"),
                Err(_) => tracing::debug!("HTTP connection closed after its lifetime"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
    connections.abort_all();
}
