//! `probe URL`: one HTTP GET to a loopback address, exit 0 when the answer is 200. It is the
//! container HEALTHCHECK (`probe http://127.0.0.1:PORT/readyz`) in an image that has no curl.
//! Plain HTTP/1.0 over std::net only, and only to loopback: it is a health probe, not a client.
//! Its request ([`send_get`]) also serves `cost --from`, which reads the whole answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connect, send and read each get this long; a health check that hangs is a failed one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The status line fits in this; the rest of the answer is not read.
const STATUS_LINE_MAX: usize = 256;
/// The only answer that means healthy.
const HTTP_OK: &str = "200";

/// Why a probe failed, in words for the health log.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: only http://HOST:PORT/PATH URLs are probed")]
    Url(String),
    #[error("{0} is not a loopback address: probe only checks this machine's own endpoints")]
    NotLoopback(String),
    #[error("cannot reach {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} answered {1:?}, not 200")]
    Status(String, String),
}

/// GETs `url`; Ok when the server answers 200.
pub fn probe(url: &str) -> Result<(), ProbeError> {
    let (authority, path) = split_url(url).ok_or_else(|| ProbeError::Url(url.to_owned()))?;
    let addrs = resolve(authority).ok_or_else(|| ProbeError::Url(url.to_owned()))?;
    if !addrs.iter().all(|a| a.ip().is_loopback()) {
        return Err(ProbeError::NotLoopback(authority.to_owned()));
    }
    let io = |e| ProbeError::Io(url.to_owned(), e);
    let mut stream = send_get(addrs[0], authority, path, PROBE_TIMEOUT).map_err(io)?;
    let mut head = Vec::with_capacity(STATUS_LINE_MAX);
    let mut buf = [0u8; STATUS_LINE_MAX];
    while !head.contains(&b'\n') && head.len() < STATUS_LINE_MAX {
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default().trim().to_owned();
    // "HTTP/1.1 200 OK": the second word is the code.
    if status_line.starts_with("HTTP/") && status_line.split_whitespace().nth(1) == Some(HTTP_OK) {
        Ok(())
    } else {
        Err(ProbeError::Status(url.to_owned(), status_line))
    }
}

/// `http://HOST:PORT/PATH` → (`HOST:PORT`, `/PATH`); the path is `/` when absent.
pub(crate) fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!authority.is_empty()).then_some((authority, path))
}

/// The addresses `HOST:PORT` names, at least one.
pub(crate) fn resolve(authority: &str) -> Option<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = authority.to_socket_addrs().ok()?.collect();
    (!addrs.is_empty()).then_some(addrs)
}

/// Connects to `addr` and sends `GET path` (HTTP/1.0, so the server closes after its answer);
/// the answer is read from the stream returned. Each step gets `timeout`.
pub(crate) fn send_get(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // One write: a request split over several segments can meet a server that answers after
    // the first and resets the connection over the unread rest.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server answering `answer` to the first request.
    fn serve_once(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                // The whole request first: closing over unread bytes would reset the connection.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(answer.as_bytes());
            }
        });
        format!("http://127.0.0.1:{port}/readyz")
    }

    #[test]
    fn a_200_is_healthy_anything_else_is_not() {
        let healthy = probe(&serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(healthy.is_ok(), "{healthy:?}");
        let err = probe(&serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n"))
            .expect_err("503 is unhealthy");
        assert!(matches!(err, ProbeError::Status(_, ref line) if line.contains("503")));
    }

    #[test]
    fn only_loopback_http_urls_are_probed() {
        assert!(matches!(
            probe("https://127.0.0.1:1/readyz"),
            Err(ProbeError::Url(_))
        ));
        assert!(matches!(
            probe("http://192.0.2.1:80/readyz"),
            Err(ProbeError::NotLoopback(_))
        ));
    }

    #[test]
    fn nothing_listening_is_unhealthy() {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        assert!(matches!(
            probe(&format!("http://127.0.0.1:{port}/readyz")),
            Err(ProbeError::Io(..))
        ));
    }
}
